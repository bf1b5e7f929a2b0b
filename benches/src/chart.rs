//! PNG grouped-bar charts (plotters, bitmap backend), in the style of the Xenos paper's
//! VM-vs-physical figures: one group of bars per measurement, one bar per configuration.
//!
//! Text is drawn with DejaVu Sans from Debian's `fonts-dejavu-core`
//! (`apt-get install fonts-dejavu-core` if it is missing): plotters is built without its
//! fontconfig/freetype backends, so the font file is loaded here at run time.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

/// The TTF file every chart's text uses (package fonts-dejavu-core).
pub const FONT_PATH: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// Why a chart could not be drawn.
#[derive(Debug, thiserror::Error)]
pub enum ChartError {
    /// The font file is missing or unreadable.
    #[error("cannot read the chart font {path} ({source}); install it with `apt-get install fonts-dejavu-core`")]
    FontMissing {
        /// The font's path.
        path: PathBuf,
        /// Why reading it failed.
        source: std::io::Error,
    },
    /// The font file is not a font ab_glyph can parse.
    #[error("{path} is not a usable TrueType font")]
    FontInvalid {
        /// The font's path.
        path: PathBuf,
    },
    /// Drawing or writing the PNG failed.
    #[error("drawing {path}: {message}")]
    Draw {
        /// The PNG being drawn.
        path: PathBuf,
        /// plotters' error, as text.
        message: String,
    },
}

/// One bar series: its legend name and colour.
#[derive(Clone, Copy, Debug)]
pub struct Series {
    /// Legend text.
    pub name: &'static str,
    /// Bar colour.
    pub color: RGBColor,
}

/// One panel: a title, the y-axis description, and `values[group][series]` (None: not
/// measured, no bar).
#[derive(Clone, Debug)]
pub struct Panel {
    /// Panel title.
    pub title: String,
    /// Y-axis description (unit).
    pub y_desc: String,
    /// Group labels under the x axis.
    pub groups: Vec<String>,
    /// `values[group][series]`.
    pub values: Vec<Vec<Option<f64>>>,
    /// A horizontal line at this value (e.g. 1.0 = native on a ratio chart).
    pub reference: Option<f64>,
}

fn ensure_font() -> Result<(), ChartError> {
    static FONT: OnceLock<Result<(), String>> = OnceLock::new();
    let path = Path::new(FONT_PATH);
    let loaded = FONT.get_or_init(|| {
        let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
        // plotters keeps registered fonts for the life of the process.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        register_font("sans-serif", FontStyle::Normal, bytes).map_err(|_| "invalid".to_string())
    });
    match loaded {
        Ok(()) => Ok(()),
        Err(e) if e == "invalid" => Err(ChartError::FontInvalid { path: path.into() }),
        Err(e) => Err(ChartError::FontMissing {
            path: path.into(),
            source: std::io::Error::other(e.clone()),
        }),
    }
}

/// Draws `panels` into one PNG at `path`, `cols` panels per row, each panel `panel_size`
/// pixels, with one legend (from `series`) per panel.
pub fn draw(
    path: &Path,
    panels: &[Panel],
    series: &[Series],
    cols: usize,
    panel_size: (u32, u32),
) -> Result<(), ChartError> {
    ensure_font()?;
    let cols = cols.max(1);
    let rows = panels.len().div_ceil(cols).max(1);
    let size = (panel_size.0 * cols as u32, panel_size.1 * rows as u32);
    let err = |e: &dyn std::fmt::Display| ChartError::Draw {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let root = BitMapBackend::new(path, size).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    for (area, panel) in root.split_evenly((rows, cols)).iter().zip(panels) {
        draw_panel(area, panel, series).map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    panel: &Panel,
    series: &[Series],
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let n_groups = panel.groups.len().max(1);
    let max = panel
        .values
        .iter()
        .flatten()
        .flatten()
        .copied()
        .chain(panel.reference)
        .fold(0.0f64, f64::max);
    // Headroom above the tallest bar for its value label and the legend.
    let y_max = if max > 0.0 { max * 1.45 } else { 1.0 };
    let mut chart = ChartBuilder::on(area)
        .caption(&panel.title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(-0.5f64..n_groups as f64 - 0.5, 0f64..y_max)?;
    let groups = &panel.groups;
    // Ask for ticks every half unit so that every group centre (an integer) gets one;
    // the half-unit ticks get no text.
    let label = |x: &f64| {
        let g = x.round();
        if (x - g).abs() > 1e-6 || g < 0.0 {
            return String::new();
        }
        groups.get(g as usize).cloned().unwrap_or_default()
    };
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(2 * n_groups + 1)
        .x_label_formatter(&label)
        .y_desc(panel.y_desc.as_str())
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 14))
        .draw()?;

    // Bars take 80% of a group's width, split evenly among the series.
    let width = 0.8 / series.len().max(1) as f64;
    for (s, ser) in series.iter().enumerate() {
        let bars: Vec<(f64, f64)> = panel
            .values
            .iter()
            .enumerate()
            .filter_map(|(g, vals)| {
                vals.get(s)
                    .copied()
                    .flatten()
                    .map(|v| (g as f64 - 0.4 + s as f64 * width, v))
            })
            .collect();
        let color = ser.color;
        chart
            .draw_series(bars.iter().map(|&(x0, v)| {
                Rectangle::new([(x0, 0.0), (x0 + width * 0.95, v)], color.filled())
            }))?
            .label(ser.name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 12, y + 6)], color.filled()));
        chart.draw_series(bars.iter().map(|&(x0, v)| {
            Text::new(
                short(v),
                (x0 + width * 0.1, v + y_max * 0.06),
                ("sans-serif", 12).into_font().color(&BLACK),
            )
        }))?;
    }
    if let Some(r) = panel.reference {
        chart.draw_series(std::iter::once(PathElement::new(
            vec![(-0.5, r), (n_groups as f64 - 0.5, r)],
            BLACK.stroke_width(1),
        )))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .draw()?;
    Ok(())
}

/// A bar's value label: three significant figures at most.
fn short(v: f64) -> String {
    match v.abs() {
        a if a >= 100.0 => format!("{v:.0}"),
        a if a >= 10.0 => format!("{v:.1}"),
        _ => format!("{v:.2}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_labels() {
        assert_eq!(short(1234.4), "1234");
        assert_eq!(short(12.34), "12.3");
        assert_eq!(short(0.912), "0.91");
    }

    #[test]
    fn draws_a_png_when_the_font_is_installed() {
        if !Path::new(FONT_PATH).exists() {
            eprintln!("skipped: {FONT_PATH} missing");
            return;
        }
        let path =
            std::env::temp_dir().join(format!("hospes-chart-test-{}.png", std::process::id()));
        let panel = Panel {
            title: "t".into(),
            y_desc: "MB/s".into(),
            groups: vec!["a".into(), "b".into()],
            values: vec![vec![Some(1.0), None], vec![Some(2.0), Some(0.5)]],
            reference: Some(1.0),
        };
        let series = [
            Series {
                name: "x",
                color: RED,
            },
            Series {
                name: "y",
                color: BLUE,
            },
        ];
        draw(&path, &[panel.clone(), panel], &series, 2, (400, 300)).unwrap();
        let png = std::fs::read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(&png[1..4], b"PNG");
    }
}
