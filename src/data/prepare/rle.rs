//! COCO's run-length masks, and polygons turned into them exactly as pycocotools does.
//!
//! A mask is run lengths over the pixels in column-major order (x outer, y inner), alternating
//! background and foreground runs and starting with background. Polygons are rasterised with
//! pycocotools' own algorithm (`rleFrPoly` in `maskApi.c`: upsample ×5, walk every edge, keep the
//! points where the walk crosses a pixel column, turn them into run boundaries), so labels made here
//! are pixel-identical to `annToMask`, which the published COCO-20i label maps were made with; a
//! scan-line fill would differ along every edge. Polygon lists are read as `frPyObjects` reads them
//! ([`Rle::from_polygons`]), odd lengths included; the lists it raises on are errors here too, and
//! so are coordinates it would not survive (non-finite, or absurdly far outside the image).

/// Pixels past this many image sizes outside the image mean a corrupt polygon: the upsampled edge
/// walk would allocate a point per step.
const MAX_OUTSIDE_FACTOR: f64 = 4.0;

/// A binary mask of `height` × `width` pixels as run lengths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rle {
    pub height: usize,
    pub width: usize,
    pub counts: Vec<u32>,
}

impl Rle {
    /// The masks of an annotation's polygon list, as pycocotools' `frPyObjects` reads it: as
    /// polygons only when the first one has more than 4 numbers (it takes a first one of exactly 4
    /// for boxes and raises on them, as it does on a shorter first one or an empty list); every
    /// polygon then goes to [`Rle::from_polygon`], whatever its length.
    pub fn from_polygons(
        polygons: &[Vec<f64>],
        height: usize,
        width: usize,
    ) -> Result<Vec<Rle>, String> {
        let cannot = "so pycocotools' annToMask cannot read this annotation either (it raises)";
        match polygons.first().map(Vec::len) {
            None => return Err(format!("its polygon list is empty, {cannot}")),
            Some(4) => {
                return Err(format!(
                    "its first polygon has 4 coordinates, which pycocotools' frPyObjects takes for \
                     a box, {cannot}"
                ))
            }
            Some(n) if n < 4 => {
                return Err(format!(
                    "its first polygon has {n} coordinates, fewer than the 5 pycocotools' \
                     frPyObjects needs to take the list for polygons, {cannot}"
                ))
            }
            Some(_) => {}
        }
        polygons
            .iter()
            .map(|p| Rle::from_polygon(p, height, width))
            .collect()
    }

    /// The mask of one polygon `[x1, y1, x2, y2, …]` (pixel coordinates, 0-indexed, pixel (0, 0)
    /// covering [0, 1)²), as pycocotools' `frPyObjects` computes it. Points outside the image are
    /// clipped by the algorithm itself. Like pycocotools, an odd last number is ignored (7 numbers
    /// are 3 points), and fewer than 3 points enclose no pixel. Errors: non-finite values, points
    /// absurdly far outside the image.
    pub fn from_polygon(xy: &[f64], height: usize, width: usize) -> Result<Rle, String> {
        let xy = &xy[..xy.len() / 2 * 2];
        let limit = MAX_OUTSIDE_FACTOR * height.max(width) as f64 + 16.0;
        if let Some(bad) = xy.iter().find(|v| !v.is_finite() || v.abs() > limit) {
            return Err(format!(
                "polygon coordinate {bad} lies far outside the {width}x{height} image"
            ));
        }
        let counts = if xy.is_empty() {
            vec![(height * width) as u32]
        } else {
            polygon_counts(xy, height as i64, width as i64)
        };
        Ok(Rle {
            height,
            width,
            counts,
        })
    }

    /// Uncompressed RLE (`{"counts": [..], "size": [h, w]}`), checked to cover the image exactly.
    pub fn from_counts(counts: Vec<u32>, height: usize, width: usize) -> Result<Rle, String> {
        let rle = Rle {
            height,
            width,
            counts,
        };
        rle.check_total()?;
        Ok(rle)
    }

    /// Compressed RLE (`"counts": "<string>"`): pycocotools' `rleFrString`, a LEB128-like code of 5
    /// bits per character (ASCII 48..111, bit 0x20 = more, bit 0x10 of the last = sign), every count
    /// from the fourth on stored as the difference to the count two places before.
    pub fn from_compressed(text: &str, height: usize, width: usize) -> Result<Rle, String> {
        let bytes = text.as_bytes();
        let mut counts: Vec<u32> = Vec::new();
        let mut p = 0;
        while p < bytes.len() {
            let (mut x, mut k, mut more) = (0i64, 0u32, true);
            while more {
                let Some(&byte) = bytes.get(p) else {
                    return Err(format!(
                        "compressed RLE ends inside a count (at character {p}); the string is truncated"
                    ));
                };
                if !(48..=111).contains(&byte) || k >= 7 {
                    return Err(format!(
                        "compressed RLE has an invalid character or run at position {p}"
                    ));
                }
                let c = (byte - 48) as i64;
                x |= (c & 0x1f) << (5 * k);
                more = c & 0x20 != 0;
                p += 1;
                k += 1;
                if !more && c & 0x10 != 0 {
                    x |= -1i64 << (5 * k);
                }
            }
            let m = counts.len();
            if m > 2 {
                x += counts[m - 2] as i64;
            }
            let count = u32::try_from(x)
                .map_err(|_| format!("compressed RLE decodes to an invalid count {x}"))?;
            counts.push(count);
        }
        Rle::from_counts(counts, height, width)
    }

    fn check_total(&self) -> Result<(), String> {
        let total: u64 = self.counts.iter().map(|&c| c as u64).sum();
        let pixels = (self.height * self.width) as u64;
        if total != pixels {
            return Err(format!(
                "RLE counts add up to {total} pixels but the mask is {}x{} = {pixels} (w x h)",
                self.width, self.height
            ));
        }
        Ok(())
    }

    /// Calls `f(y, x)` for every foreground pixel.
    pub fn for_each_pixel(&self, mut f: impl FnMut(usize, usize)) {
        let mut index = 0usize;
        for (i, &count) in self.counts.iter().enumerate() {
            if i % 2 == 1 {
                for k in index..index + count as usize {
                    f(k % self.height, k / self.height);
                }
            }
            index += count as usize;
        }
    }

    /// The mask row-major, 1 for foreground (for tests and comparisons).
    pub fn decode(&self) -> Vec<u8> {
        let mut mask = vec![0u8; self.height * self.width];
        self.for_each_pixel(|y, x| mask[y * self.width + x] = 1);
        mask
    }
}

/// pycocotools' `rleFrPoly`, step for step: C's `(int)` truncation is `as i64` here, its doubles are
/// `f64`, so the arithmetic is the same. (A zero-length edge divides 0 by 0 there too; the point it
/// makes never starts a run, because its x equals its neighbours'.)
fn polygon_counts(xy: &[f64], h: i64, w: i64) -> Vec<u32> {
    let scale = 5.0;
    let k = xy.len() / 2;
    let mut x: Vec<i64> = (0..k).map(|j| (scale * xy[2 * j] + 0.5) as i64).collect();
    let mut y: Vec<i64> = (0..k)
        .map(|j| (scale * xy[2 * j + 1] + 0.5) as i64)
        .collect();
    x.push(x[0]);
    y.push(y[0]);
    // Upsample and get discrete points densely along the entire boundary.
    let mut u: Vec<i64> = Vec::new();
    let mut v: Vec<i64> = Vec::new();
    for j in 0..k {
        let (mut xs, mut xe, mut ys, mut ye) = (x[j], x[j + 1], y[j], y[j + 1]);
        let dx = (xe - xs).abs();
        let dy = (ys - ye).abs();
        let flip = (dx >= dy && xs > xe) || (dx < dy && ys > ye);
        if flip {
            std::mem::swap(&mut xs, &mut xe);
            std::mem::swap(&mut ys, &mut ye);
        }
        let s = if dx >= dy {
            (ye - ys) as f64 / dx as f64
        } else {
            (xe - xs) as f64 / dy as f64
        };
        if dx >= dy {
            for d in 0..=dx {
                let t = if flip { dx - d } else { d };
                u.push(t + xs);
                v.push((ys as f64 + s * t as f64 + 0.5) as i64);
            }
        } else {
            for d in 0..=dy {
                let t = if flip { dy - d } else { d };
                v.push(t + ys);
                u.push((xs as f64 + s * t as f64 + 0.5) as i64);
            }
        }
    }
    // Get points along the y-boundary and downsample.
    let mut boundary: Vec<u32> = Vec::new();
    for j in 1..u.len() {
        if u[j] == u[j - 1] {
            continue;
        }
        let xd = (if u[j] < u[j - 1] { u[j] } else { u[j] - 1 }) as f64;
        let xd = (xd + 0.5) / scale - 0.5;
        if xd.floor() != xd || xd < 0.0 || xd > (w - 1) as f64 {
            continue;
        }
        let yd = v[j].min(v[j - 1]) as f64;
        let mut yd = (yd + 0.5) / scale - 0.5;
        if yd < 0.0 {
            yd = 0.0;
        } else if yd > h as f64 {
            yd = h as f64;
        }
        let yd = yd.ceil();
        boundary.push((xd as i64 * h + yd as i64) as u32);
    }
    // Run lengths from the boundary points.
    boundary.push((h * w) as u32);
    boundary.sort_unstable();
    let mut previous = 0u32;
    for a in boundary.iter_mut() {
        let t = *a;
        *a -= previous;
        previous = t;
    }
    let mut counts = vec![boundary[0]];
    let mut j = 1;
    while j < boundary.len() {
        if boundary[j] > 0 {
            counts.push(boundary[j]);
            j += 1;
        } else {
            j += 1;
            if j < boundary.len() {
                *counts.last_mut().expect("counts starts non-empty") += boundary[j];
                j += 1;
            }
        }
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(rle: &Rle) -> Vec<String> {
        rle.decode()
            .chunks(rle.width)
            .map(|r| r.iter().map(|&v| char::from(b'0' + v)).collect())
            .collect()
    }

    #[test]
    fn an_integer_rectangle_covers_its_half_open_pixel_box() {
        // Corners (2, 2) and (6, 5): pixels x 2..6, y 2..5, as pycocotools gives.
        let rle = Rle::from_polygon(&[2.0, 2.0, 6.0, 2.0, 6.0, 5.0, 2.0, 5.0], 7, 8).unwrap();
        assert_eq!(
            rows(&rle),
            ["00000000", "00000000", "00111100", "00111100", "00111100", "00000000", "00000000"]
        );
    }

    #[test]
    fn a_triangle_and_its_compressed_string_match_pycocotools() {
        // pycocotools 2.0.11: decode(merge(frPyObjects([[2.3,1.7,7.9,3.2,4.1,8.6]], 10, 10)))
        // and encode() of it, whose counts string is b'P1462ON1N2Ob0'.
        let expected = [
            "0000000000",
            "0000000000",
            "0001100000",
            "0001111100",
            "0001111000",
            "0001110000",
            "0000110000",
            "0000100000",
            "0000000000",
            "0000000000",
        ];
        let polygon = Rle::from_polygon(&[2.3, 1.7, 7.9, 3.2, 4.1, 8.6], 10, 10).unwrap();
        assert_eq!(rows(&polygon), expected);
        let compressed = Rle::from_compressed("P1462ON1N2Ob0", 10, 10).unwrap();
        assert_eq!(compressed.decode(), polygon.decode());
    }

    #[test]
    fn polygon_lists_are_read_as_pycocotools_reads_them() {
        // pycocotools 2.0.11: decode(merge(frPyObjects(segm, 10, 10))).sum() is 21 for
        // [[1,1,8,1,8,8,1]] (3 points) and 0 for [[1,1,8,1,8]]; it raises for [[1,1,8,1]] (boxes),
        // [[1,1]] and [].
        let area = |segm: &[Vec<f64>]| -> usize {
            Rle::from_polygons(segm, 10, 10)
                .unwrap()
                .iter()
                .map(|rle| rle.decode())
                .fold(vec![0u8; 100], |a, m| {
                    a.iter().zip(m).map(|(a, m)| a | m).collect()
                })
                .iter()
                .map(|&v| v as usize)
                .sum()
        };
        assert_eq!(area(&[vec![1.0, 1.0, 8.0, 1.0, 8.0, 8.0, 1.0]]), 21);
        assert_eq!(area(&[vec![1.0, 1.0, 8.0, 1.0, 8.0]]), 0);
        // Later polygons of any length.
        let square = vec![1.0, 1.0, 8.0, 1.0, 8.0, 8.0, 1.0, 8.0];
        assert_eq!(area(std::slice::from_ref(&square)), 49);
        assert_eq!(
            area(&[square, vec![], vec![3.0], vec![1.0, 1.0, 2.0, 2.0]]),
            49
        );
        for segm in [vec![vec![1.0, 1.0, 8.0, 1.0]], vec![vec![1.0, 1.0]], vec![]] {
            let message = Rle::from_polygons(&segm, 10, 10).unwrap_err();
            assert!(
                message.contains("cannot read this annotation either"),
                "{message}"
            );
        }
    }

    #[test]
    fn polygons_outside_the_image_are_clipped() {
        let rle = Rle::from_polygon(&[-5.0, -5.0, 3.0, -5.0, 3.0, 2.0, -5.0, 2.0], 4, 5).unwrap();
        assert_eq!(rows(&rle), ["11100", "11100", "00000", "00000"]);
        let outside = Rle::from_polygon(&[10.0, 10.0, 12.0, 10.0, 12.0, 12.0], 4, 5).unwrap();
        assert!(outside.decode().iter().all(|&v| v == 0));
    }

    #[test]
    fn bad_rles_and_polygons_are_errors() {
        assert!(Rle::from_counts(vec![3, 4], 3, 3)
            .unwrap_err()
            .contains("7 pixels"));
        assert!(Rle::from_compressed("P1462ON1N2Ob", 10, 10).is_err());
        assert!(Rle::from_compressed("P1462ON1N2Ob0~", 10, 10)
            .unwrap_err()
            .contains("invalid character"));
        // A continuation bit on the last character: the string was cut.
        assert!(Rle::from_compressed("1o", 10, 10)
            .unwrap_err()
            .contains("truncated"));
        assert!(Rle::from_polygon(&[1.0, f64::NAN, 3.0, 4.0], 5, 5).is_err());
        assert!(Rle::from_polygon(&[1.0, 1e12, 3.0, 4.0], 5, 5).is_err());
    }
}
