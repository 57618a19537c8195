//! A reader for MATLAB level-5 MAT-files (MATLAB's `-v6`/`-v7` formats), as far as SBD's
//! `cls/<id>.mat` need: numeric arrays, structs and cells, zlib-compressed (`miCOMPRESSED`) or not.
//!
//! No maintained crate reads MAT5 structs (`matfile` 0.5 skips struct and cell arrays), and SBD keeps
//! its labels in the struct `GTcls`, so this is the small subset of the format that is needed.
//! Sparse, char and object arrays are parsed past (their bytes skipped) and reported as
//! [`MatValue::Unsupported`]: SBD's `GTcls.Boundaries` is a cell of sparse matrices that the labels
//! do not use. Big-endian files and MATLAB 7.3 (HDF5) files are rejected with a message.
//! Format: "MAT-File Format", The MathWorks, chapter 1 (level 5).

use std::io::Read;

/// Array classes (the low byte of the array flags).
const MX_CELL: u8 = 1;
const MX_STRUCT: u8 = 2;
const MX_DOUBLE: u8 = 6;
const MX_UINT64: u8 = 15;

/// Data element types.
const MI_INT8: u32 = 1;
const MI_UINT8: u32 = 2;
const MI_INT16: u32 = 3;
const MI_UINT16: u32 = 4;
const MI_INT32: u32 = 5;
const MI_UINT32: u32 = 6;
const MI_SINGLE: u32 = 7;
const MI_DOUBLE: u32 = 9;
const MI_INT64: u32 = 12;
const MI_UINT64: u32 = 13;
const MI_MATRIX: u32 = 14;
const MI_COMPRESSED: u32 = 15;

/// Nested structs/cells deeper than this are treated as a corrupt file (and cannot overflow the stack).
const MAX_DEPTH: usize = 16;
/// A compressed variable larger than this is refused: SBD's are below 1 MB, a zip bomb is not.
const MAX_INFLATED: u64 = 512 << 20;

/// One array of a MAT-file.
#[derive(Debug, Clone, PartialEq)]
pub enum MatValue {
    /// A real numeric array, values in column-major order (MATLAB's), widened to `f64`.
    Numeric { dims: Vec<usize>, values: Vec<f64> },
    /// A struct array: `elements[i]` holds the fields of element i, in `fields` order.
    Struct {
        dims: Vec<usize>,
        fields: Vec<String>,
        elements: Vec<Vec<MatValue>>,
    },
    Cell {
        dims: Vec<usize>,
        items: Vec<MatValue>,
    },
    /// An array this reader does not decode (sparse, char, object, complex), by its class number.
    Unsupported { class: u8 },
}

impl MatValue {
    /// Field `name` of the first element of a struct.
    pub fn field(&self, name: &str) -> Option<&MatValue> {
        match self {
            MatValue::Struct {
                fields, elements, ..
            } => {
                let i = fields.iter().position(|f| f == name)?;
                elements.first().map(|e| &e[i])
            }
            _ => None,
        }
    }

    /// What the array is, for messages.
    pub fn describe(&self) -> String {
        match self {
            MatValue::Numeric { dims, .. } => format!("a numeric array of size {dims:?}"),
            MatValue::Struct { fields, .. } => format!("a struct with fields {fields:?}"),
            MatValue::Cell { dims, .. } => format!("a cell array of size {dims:?}"),
            MatValue::Unsupported { class } => format!("an array of unsupported class {class}"),
        }
    }
}

/// The named variables of a MAT-file, in file order.
pub type MatVariables = Vec<(String, MatValue)>;

/// Little-endian reader over one element's bytes.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Cursor { bytes, pos: 0 }
    }

    fn u32_at(&self, pos: usize) -> Result<u32, String> {
        let b = self
            .bytes
            .get(pos..pos + 4)
            .ok_or("the file ends inside a data element tag (truncated?)")?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// The next data element: its type and its data bytes. Small elements keep type and size in one
    /// word and their data in the next four bytes; others are padded to 8 bytes, except compressed
    /// ones, which MATLAB writes unpadded.
    fn element(&mut self) -> Result<(u32, &'a [u8]), String> {
        let word = self.u32_at(self.pos)?;
        let (kind, len, start, stride) = if word >> 16 != 0 {
            let len = (word >> 16) as usize;
            if len > 4 {
                return Err(format!(
                    "a small data element claims {len} bytes (corrupt file)"
                ));
            }
            (word & 0xFFFF, len, self.pos + 4, 8)
        } else {
            let len = self.u32_at(self.pos + 4)? as usize;
            let padded = if word == MI_COMPRESSED {
                len
            } else {
                len.div_ceil(8) * 8
            };
            (word, len, self.pos + 8, 8 + padded)
        };
        let data = self.bytes.get(start..start + len).ok_or_else(|| {
            format!(
                "a data element of {len} bytes at offset {} runs past the end of the file (truncated?)",
                self.pos
            )
        })?;
        // The last element of a file may lack its padding.
        self.pos = (self.pos + stride).min(self.bytes.len());
        Ok((kind, data))
    }
}

/// Numeric element data widened to `f64`.
fn numbers(kind: u32, data: &[u8]) -> Result<Vec<f64>, String> {
    fn each<const N: usize>(data: &[u8], f: impl Fn([u8; N]) -> f64) -> Vec<f64> {
        data.chunks_exact(N)
            .map(|c| f(c.try_into().expect("chunk of N bytes")))
            .collect()
    }
    let size = match kind {
        MI_INT8 | MI_UINT8 => 1,
        MI_INT16 | MI_UINT16 => 2,
        MI_INT32 | MI_UINT32 | MI_SINGLE => 4,
        MI_DOUBLE | MI_INT64 | MI_UINT64 => 8,
        other => return Err(format!("numeric data of unknown element type {other}")),
    };
    if !data.len().is_multiple_of(size) {
        return Err(format!(
            "{} bytes of numeric data is not a whole number of {size}-byte values",
            data.len()
        ));
    }
    Ok(match kind {
        MI_INT8 => each(data, |b: [u8; 1]| i8::from_le_bytes(b) as f64),
        MI_UINT8 => each(data, |b: [u8; 1]| b[0] as f64),
        MI_INT16 => each(data, |b| i16::from_le_bytes(b) as f64),
        MI_UINT16 => each(data, |b| u16::from_le_bytes(b) as f64),
        MI_INT32 => each(data, |b| i32::from_le_bytes(b) as f64),
        MI_UINT32 => each(data, |b| u32::from_le_bytes(b) as f64),
        MI_SINGLE => each(data, |b| f32::from_le_bytes(b) as f64),
        MI_DOUBLE => each(data, f64::from_le_bytes),
        MI_INT64 => each(data, |b| i64::from_le_bytes(b) as f64),
        _ => each(data, |b| u64::from_le_bytes(b) as f64),
    })
}

fn int32s(kind: u32, data: &[u8], what: &str) -> Result<Vec<i64>, String> {
    if kind != MI_INT32 {
        return Err(format!(
            "{what} stored as element type {kind}, expected miINT32"
        ));
    }
    Ok(numbers(kind, data)?.into_iter().map(|v| v as i64).collect())
}

/// Parses the content of an `miMATRIX` element.
fn matrix(data: &[u8], depth: usize) -> Result<(String, MatValue), String> {
    if depth > MAX_DEPTH {
        return Err(format!("arrays nested deeper than {MAX_DEPTH} levels"));
    }
    if data.is_empty() {
        // MATLAB writes an empty array (e.g. `[]` in a struct field) as an empty element.
        return Ok((
            String::new(),
            MatValue::Numeric {
                dims: vec![0, 0],
                values: Vec::new(),
            },
        ));
    }
    let mut cur = Cursor::new(data);
    let (kind, flags) = cur.element()?;
    if kind != MI_UINT32 || flags.len() < 8 {
        return Err("an array without its array-flags element".into());
    }
    let class = flags[0];
    let complex = flags[1] & 0x08 != 0;
    let (kind, dims) = cur.element()?;
    let dims = int32s(kind, dims, "array dimensions")?;
    if dims.iter().any(|&d| d < 0) {
        return Err(format!("negative array dimensions {dims:?}"));
    }
    let dims: Vec<usize> = dims.into_iter().map(|d| d as usize).collect();
    let count = dims
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or_else(|| format!("array dimensions {dims:?} overflow"))?;
    let (_, name) = cur.element()?;
    let name = String::from_utf8_lossy(name).into_owned();
    let value = match class {
        MX_DOUBLE..=MX_UINT64 if complex => MatValue::Unsupported { class },
        MX_DOUBLE..=MX_UINT64 => {
            let (kind, real) = cur.element()?;
            let values = numbers(kind, real)?;
            if values.len() != count {
                return Err(format!(
                    "array `{name}` of size {dims:?} holds {} values, expected {count}",
                    values.len()
                ));
            }
            MatValue::Numeric { dims, values }
        }
        MX_STRUCT => {
            let (kind, len) = cur.element()?;
            let len = *int32s(kind, len, "struct field name length")?
                .first()
                .ok_or("a struct without its field name length")?;
            if len <= 0 {
                return Err(format!("struct field name length {len}"));
            }
            let (_, names) = cur.element()?;
            let fields: Vec<String> = names
                .chunks(len as usize)
                .map(|c| {
                    let end = c.iter().position(|&b| b == 0).unwrap_or(c.len());
                    String::from_utf8_lossy(&c[..end]).into_owned()
                })
                .collect();
            let mut elements = Vec::with_capacity(count.min(1 << 16));
            for _ in 0..count {
                let mut values = Vec::with_capacity(fields.len());
                for _ in &fields {
                    values.push(sub_matrix(&mut cur, depth)?);
                }
                elements.push(values);
            }
            MatValue::Struct {
                dims,
                fields,
                elements,
            }
        }
        MX_CELL => {
            let mut items = Vec::with_capacity(count.min(1 << 16));
            for _ in 0..count {
                items.push(sub_matrix(&mut cur, depth)?);
            }
            MatValue::Cell { dims, items }
        }
        // The rest of the element (sparse indices, characters, an object's class name) is skipped
        // with the element itself.
        _ => MatValue::Unsupported { class },
    };
    Ok((name, value))
}

fn sub_matrix(cur: &mut Cursor, depth: usize) -> Result<MatValue, String> {
    let (kind, data) = cur.element()?;
    if kind != MI_MATRIX {
        return Err(format!(
            "a struct field or cell holds element type {kind}, expected miMATRIX"
        ));
    }
    Ok(matrix(data, depth + 1)?.1)
}

fn inflate(data: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    flate2::read::ZlibDecoder::new(data)
        .take(MAX_INFLATED + 1)
        .read_to_end(&mut out)
        .map_err(|e| {
            format!("compressed variable cannot be inflated (truncated or corrupt): {e}")
        })?;
    if out.len() as u64 > MAX_INFLATED {
        return Err(format!(
            "a compressed variable inflates to more than {MAX_INFLATED} bytes"
        ));
    }
    Ok(out)
}

/// Parses a whole MAT-file. The message of an error says what is wrong; the caller names the file.
pub fn parse(bytes: &[u8]) -> Result<MatVariables, String> {
    if bytes.len() < 128 {
        return Err(format!(
            "{} bytes is too short for a MAT-file header (128 bytes)",
            bytes.len()
        ));
    }
    let text = String::from_utf8_lossy(&bytes[..116]);
    if text.starts_with("MATLAB 7.3") || bytes.starts_with(b"\x89HDF") {
        return Err("is a MATLAB 7.3 (HDF5) file; save it again with `save(..., '-v7')`".into());
    }
    if !text.starts_with("MATLAB 5.0 MAT-file") {
        return Err("is not a MATLAB 5 MAT-file (no `MATLAB 5.0 MAT-file` header)".into());
    }
    match &bytes[126..128] {
        b"IM" => {}
        b"MI" => return Err("is a big-endian MAT-file, which this reader does not support".into()),
        other => return Err(format!("has an unknown endian indicator {other:?}")),
    }
    let mut cur = Cursor::new(&bytes[128..]);
    let mut variables = Vec::new();
    loop {
        // MATLAB leaves compressed variables unpadded, other writers pad them to 8 bytes: skip
        // zeros up to the next 8-byte boundary (a tag's first byte, its type, is never 0), and
        // trailing zeros.
        while !cur.pos.is_multiple_of(8) && cur.bytes.get(cur.pos) == Some(&0) {
            cur.pos += 1;
        }
        if cur.bytes[cur.pos.min(cur.bytes.len())..]
            .iter()
            .all(|&b| b == 0)
        {
            break;
        }
        let (kind, data) = cur.element()?;
        let (name, value) = match kind {
            MI_MATRIX => matrix(data, 0)?,
            MI_COMPRESSED => {
                let inflated = inflate(data)?;
                let mut inner = Cursor::new(&inflated);
                let (kind, data) = inner.element()?;
                if kind != MI_MATRIX {
                    return Err(format!(
                        "a compressed variable holds element type {kind}, expected miMATRIX"
                    ));
                }
                matrix(data, 0)?
            }
            other => {
                return Err(format!(
                    "a top-level element of type {other}, expected a variable"
                ))
            }
        };
        variables.push((name, value));
    }
    Ok(variables)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A data element: tag and data, padded to 8 bytes.
    fn element(kind: u32, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend(kind.to_le_bytes());
        out.extend((data.len() as u32).to_le_bytes());
        out.extend(data);
        out.resize(out.len().div_ceil(8) * 8, 0);
        out
    }

    fn numeric_matrix(name: &str, class: u8, dims: &[i32], kind: u32, data: &[u8]) -> Vec<u8> {
        let mut body = element(MI_UINT32, &[class, 0, 0, 0, 0, 0, 0, 0]);
        let dims: Vec<u8> = dims.iter().flat_map(|d| d.to_le_bytes()).collect();
        body.extend(element(MI_INT32, &dims));
        body.extend(element(MI_INT8, name.as_bytes()));
        body.extend(element(kind, data));
        element(MI_MATRIX, &body)
    }

    fn header() -> Vec<u8> {
        let mut out = b"MATLAB 5.0 MAT-file, test".to_vec();
        out.resize(124, b' ');
        out.extend([0x00, 0x01, b'I', b'M']);
        out
    }

    #[test]
    fn reads_a_hand_built_uint8_matrix_in_column_major_order() {
        let mut file = header();
        file.extend(numeric_matrix(
            "m",
            9,
            &[2, 3],
            MI_UINT8,
            &[1, 2, 3, 4, 5, 6],
        ));
        let vars = parse(&file).unwrap();
        assert_eq!(vars[0].0, "m");
        assert_eq!(
            vars[0].1,
            MatValue::Numeric {
                dims: vec![2, 3],
                values: vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
            }
        );
    }

    fn compressed(element: &[u8], pad: bool) -> Vec<u8> {
        use std::io::Write;
        let mut encoder =
            flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        encoder.write_all(element).unwrap();
        let data = encoder.finish().unwrap();
        let mut out = Vec::new();
        out.extend(MI_COMPRESSED.to_le_bytes());
        out.extend((data.len() as u32).to_le_bytes());
        out.extend(data);
        if pad {
            out.resize(out.len().div_ceil(8) * 8, 0);
        }
        out
    }

    #[test]
    fn compressed_variables_padded_or_not_and_structs() {
        // A struct s with fields a (double 1x2) and b (empty), then a compressed uint8 scalar.
        let mut body = element(MI_UINT32, &[MX_STRUCT, 0, 0, 0, 0, 0, 0, 0]);
        body.extend(element(MI_INT32, &[1, 0, 0, 0, 1, 0, 0, 0]));
        body.extend(element(MI_INT8, b"s"));
        body.extend(element(MI_INT32, &[8, 0, 0, 0]));
        body.extend(element(MI_INT8, b"a\0\0\0\0\0\0\0b\0\0\0\0\0\0\0"));
        let doubles: Vec<u8> = [1.5f64, -2.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        body.extend(numeric_matrix("", MX_DOUBLE, &[1, 2], MI_DOUBLE, &doubles));
        body.extend(element(MI_MATRIX, &[]));
        let scalar = numeric_matrix("t", 9, &[1, 1], MI_UINT8, &[7]);
        for pad in [false, true] {
            let mut file = header();
            file.extend(compressed(&element(MI_MATRIX, &body), pad));
            file.extend(compressed(&scalar, pad));
            let vars = parse(&file).unwrap();
            assert_eq!(vars.len(), 2, "pad {pad}");
            assert_eq!(
                vars[0].1.field("a"),
                Some(&MatValue::Numeric {
                    dims: vec![1, 2],
                    values: vec![1.5, -2.0]
                })
            );
            assert!(
                matches!(vars[0].1.field("b"), Some(MatValue::Numeric { values, .. }) if values.is_empty())
            );
            assert_eq!(vars[1].0, "t");
        }
    }

    #[test]
    fn truncation_and_foreign_formats_are_errors() {
        let mut file = header();
        file.extend(numeric_matrix(
            "m",
            9,
            &[2, 3],
            MI_UINT8,
            &[1, 2, 3, 4, 5, 6],
        ));
        for cut in [130, file.len() - 12] {
            let message = parse(&file[..cut]).unwrap_err();
            assert!(
                message.contains("truncated") || message.contains("values"),
                "{message}"
            );
        }
        assert!(parse(b"short").unwrap_err().contains("too short"));
        let mut hdf5 = b"MATLAB 7.3 MAT-file".to_vec();
        hdf5.resize(200, 0);
        assert!(parse(&hdf5).unwrap_err().contains("7.3"));
        let mut big = header();
        big[126..128].copy_from_slice(b"MI");
        assert!(parse(&big).unwrap_err().contains("big-endian"));
    }
}
