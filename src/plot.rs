//! Pictures of numbers: a run's training curves and the report's comparison with the published
//! results, as PNG files any image viewer opens.
//!
//! Drawn by `plotters` into an RGB buffer with the DejaVu Sans face embedded in the binary, so no
//! system font is needed; written by `image`, atomically (a reader never sees half a file).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;

/// Why a picture could not be drawn or written.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("cannot draw {path}: {message}")]
    Draw { path: PathBuf, message: String },
    #[error("cannot write {path}: {message}; check that the folder is writable")]
    Write { path: PathBuf, message: String },
}

/// One line of a panel: a name for the legend and its (x, y) points.
pub struct Series<'a> {
    pub name: &'a str,
    pub points: Vec<(f64, f64)>,
}

/// One panel of a figure: title, axis names and its lines.
pub struct Panel<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub series: Vec<Series<'a>>,
    /// Logarithmic y axis (learning rates).
    pub log_y: bool,
}

/// One group of bars: a label and one value per [`BarChart::legend`] entry (`None`: no bar).
pub struct BarGroup {
    pub label: String,
    pub values: Vec<Option<f64>>,
}

/// Grouped bars, e.g. our mIoU beside the published one for every table row.
pub struct BarChart<'a> {
    pub title: &'a str,
    pub y_label: &'a str,
    pub legend: Vec<&'a str>,
    pub groups: Vec<BarGroup>,
}

const FONT: &str = "sans-serif";
const PALETTE: [RGBColor; 4] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
];

/// Registers the embedded face once for plotters' glyph renderer.
fn register_font() {
    static REGISTERED: OnceLock<()> = OnceLock::new();
    REGISTERED.get_or_init(|| {
        // The embedded DejaVu Sans is a valid TrueType file: this cannot fail at run time.
        if plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular()).is_err()
        {
            tracing::warn!("the embedded font did not load; pictures will have no text");
        }
    });
}

/// Draws `draw` on a `width × height` white canvas and writes it to `path` as PNG.
fn render(
    path: &Path,
    (width, height): (u32, u32),
    draw: impl FnOnce(&DrawingArea<BitMapBackend, Shift>) -> Result<(), String>,
) -> Result<(), PlotError> {
    register_font();
    let mut buffer = vec![0u8; (width * height * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buffer, (width, height)).into_drawing_area();
        root.fill(&WHITE)
            .map_err(|e| e.to_string())
            .and_then(|_| draw(&root))
            .and_then(|_| root.present().map_err(|e| e.to_string()))
            .map_err(|message| PlotError::Draw {
                path: path.to_path_buf(),
                message,
            })?;
    }
    crate::visual::write_png(path, (width, height), png::ColorType::Rgb, &buffer, None).map_err(
        |e| PlotError::Write {
            path: path.to_path_buf(),
            message: e.message,
        },
    )
}

/// The range of `values` with a margin, never empty.
fn padded_range(values: impl Iterator<Item = f64>, log: bool) -> std::ops::Range<f64> {
    let (lo, hi) = values
        .filter(|v| v.is_finite() && (!log || *v > 0.0))
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    if !lo.is_finite() {
        return if log { 1e-4..1.0 } else { 0.0..1.0 };
    }
    if log {
        return lo / 2.0..hi * 2.0;
    }
    let pad = ((hi - lo) * 0.05).max(hi.abs() * 0.01).max(1e-6);
    lo - pad..hi + pad
}

fn draw_panel(area: &DrawingArea<BitMapBackend, Shift>, panel: &Panel) -> Result<(), String> {
    let points = || panel.series.iter().flat_map(|s| s.points.iter());
    let x = padded_range(points().map(|p| p.0), false);
    let y = padded_range(points().map(|p| p.1), panel.log_y);
    let mut builder = ChartBuilder::on(area);
    builder
        .caption(panel.title, (FONT, 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(64);
    let err = |e: DrawingAreaErrorKind<_>| e.to_string();
    if panel.log_y {
        let mut chart = builder.build_cartesian_2d(x, y.log_scale()).map_err(err)?;
        chart
            .configure_mesh()
            .x_desc(panel.x_label)
            .y_label_formatter(&|v| format!("{v:.0e}"))
            .label_style((FONT, 13))
            .draw()
            .map_err(err)?;
        draw_lines(&mut chart, panel)
    } else {
        let mut chart = builder.build_cartesian_2d(x, y).map_err(err)?;
        chart
            .configure_mesh()
            .x_desc(panel.x_label)
            .label_style((FONT, 13))
            .draw()
            .map_err(err)?;
        draw_lines(&mut chart, panel)
    }
}

/// The panel's lines, each point marked when there are few (validations: a single one shows
/// too), and a legend when there are several lines.
fn draw_lines<'a, Y>(
    chart: &mut ChartContext<'a, BitMapBackend<'a>, Cartesian2d<RangedCoordf64, Y>>,
    panel: &Panel,
) -> Result<(), String>
where
    Y: Ranged<ValueType = f64>,
{
    let err = |e: DrawingAreaErrorKind<_>| e.to_string();
    for (i, series) in panel.series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        chart
            .draw_series(LineSeries::new(
                series.points.iter().copied(),
                color.stroke_width(2),
            ))
            .map_err(err)?
            .label(series.name)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], color));
        if series.points.len() <= 60 {
            chart
                .draw_series(
                    series
                        .points
                        .iter()
                        .map(|&p| Circle::new(p, 3, color.filled())),
                )
                .map_err(err)?;
        }
    }
    if panel.series.len() > 1 {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font((FONT, 13))
            .draw()
            .map_err(err)?;
    }
    Ok(())
}

/// Writes `panels` as a grid of `columns` columns to `path` (PNG).
pub fn write_panels(path: &Path, panels: &[Panel], columns: usize) -> Result<(), PlotError> {
    let columns = columns.max(1);
    let rows = panels.len().div_ceil(columns).max(1);
    let size = (480 * columns as u32, 320 * rows as u32);
    render(path, size, |root| {
        for (area, panel) in root.split_evenly((rows, columns)).iter().zip(panels) {
            draw_panel(area, panel)?;
        }
        Ok(())
    })
}

/// Writes `chart` to `path` (PNG): one cluster of bars per group, one colour per legend entry.
pub fn write_bar_chart(path: &Path, chart: &BarChart) -> Result<(), PlotError> {
    let groups = chart.groups.len().max(1);
    let width = (160 + 150 * groups as u32).max(640);
    render(path, (width, 480), |root| {
        let err = |e: DrawingAreaErrorKind<_>| e.to_string();
        let values = chart.groups.iter().flat_map(|g| g.values.iter().flatten());
        let top = values.fold(0.0f64, |m, &v| m.max(v)) * 1.15 + 1e-9;
        let mut plot = ChartBuilder::on(root)
            .caption(chart.title, (FONT, 22))
            .margin(16)
            .x_label_area_size(90)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..groups as f64, 0.0..top.max(1.0))
            .map_err(err)?;
        let labels: Vec<&str> = chart.groups.iter().map(|g| g.label.as_str()).collect();
        plot.configure_mesh()
            .disable_x_mesh()
            .x_labels(groups * 2 + 1)
            .x_label_formatter(&|x| {
                let centre = x - x.floor();
                match labels.get(x.floor() as usize) {
                    Some(label) if (centre - 0.5).abs() < 1e-6 => label.to_string(),
                    _ => String::new(),
                }
            })
            .y_desc(chart.y_label)
            .label_style((FONT, 12))
            .draw()
            .map_err(err)?;
        let bars = chart.legend.len().max(1) as f64;
        let bar_width = 0.8 / bars;
        for (k, name) in chart.legend.iter().enumerate() {
            let color = PALETTE[k % PALETTE.len()];
            let rects = chart.groups.iter().enumerate().filter_map(|(g, group)| {
                let value = (*group.values.get(k)?)?;
                let left = g as f64 + 0.1 + k as f64 * bar_width;
                Some(Rectangle::new(
                    [(left, 0.0), (left + bar_width * 0.95, value)],
                    color.filled(),
                ))
            });
            plot.draw_series(rects)
                .map_err(err)?
                .label(*name)
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled())
                });
        }
        plot.configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font((FONT, 14))
            .draw()
            .map_err(err)?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("svf-plot-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Pixels of `color` (within 40 per channel) in `path`.
    fn count_colour(path: &Path, color: RGBColor) -> usize {
        let image = image::open(path).unwrap().to_rgb8();
        image
            .pixels()
            .filter(|p| {
                (0..3).all(|c| (p.0[c] as i32 - [color.0, color.1, color.2][c] as i32).abs() < 40)
            })
            .count()
    }

    #[test]
    fn panels_draw_their_lines_and_text() {
        let dir = scratch("panels");
        let path = dir.join("curves.png");
        let panels = [
            Panel {
                title: "loss",
                x_label: "iteration",
                series: vec![Series {
                    name: "loss",
                    points: (1..50).map(|i| (i as f64, 1.0 / i as f64)).collect(),
                }],
                log_y: false,
            },
            Panel {
                title: "learning rate",
                x_label: "iteration",
                series: vec![Series {
                    name: "head",
                    points: (1..50)
                        .map(|i| (i as f64, 0.01 * 0.99f64.powi(i)))
                        .collect(),
                }],
                log_y: true,
            },
            Panel {
                title: "empty",
                x_label: "epoch",
                series: vec![],
                log_y: false,
            },
        ];
        write_panels(&path, &panels, 2).unwrap();
        let image = image::open(&path).unwrap().to_rgb8();
        assert_eq!(image.dimensions(), (960, 640));
        // The first palette colour draws the lines; black draws axes and text.
        assert!(count_colour(&path, PALETTE[0]) > 200);
        let dark = image
            .pixels()
            .filter(|p| p.0.iter().all(|&c| c < 60))
            .count();
        assert!(dark > 2000, "axes and labels: {dark} dark pixels");
        assert!(!dir.join("curves.png.tmp").exists());
    }

    #[test]
    fn bar_chart_bars_are_proportional() {
        let dir = scratch("bars");
        let (one, two) = (dir.join("one.png"), dir.join("two.png"));
        let chart = |ours: f64| BarChart {
            title: "mIoU",
            y_label: "mIoU (%)",
            legend: vec!["ours", "paper"],
            groups: vec![BarGroup {
                label: "PFENet".into(),
                values: vec![Some(ours), Some(60.0)],
            }],
        };
        write_bar_chart(&one, &chart(30.0)).unwrap();
        write_bar_chart(&two, &chart(60.0)).unwrap();
        // Same axis (60 is the top either way): the "ours" bar doubles in area.
        let (a, b) = (
            count_colour(&one, PALETTE[0]),
            count_colour(&two, PALETTE[0]),
        );
        let ratio = b as f64 / a as f64;
        assert!((ratio - 2.0).abs() < 0.15, "{a} vs {b}");
    }
}
