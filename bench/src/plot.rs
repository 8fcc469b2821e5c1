//! PNG charts of figures sampled over time (plotters' bitmap backend; text
//! drawn with ab_glyph from a TrueType font found on this machine, such as
//! Debian's fonts-dejavu-core).

use anyhow::{Context as _, Result, anyhow};
use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};
use std::path::Path;
use std::sync::OnceLock;

/// Fonts tried in order; the first that exists is used for every chart.
const FONTS: [&str; 4] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];
const FAMILY: &str = "sans-serif";

/// One line of a chart: what it shows and its `(seconds, value)` points.
#[derive(Debug, Clone)]
pub(crate) struct Series {
    /// Legend and axis text, e.g. `"drain rate (tasks/s)"`.
    pub(crate) label: String,
    pub(crate) points: Vec<(f64, f64)>,
}

/// Registers the first font of [`FONTS`] under [`FAMILY`], once.
fn font() -> Result<()> {
    static FONT: OnceLock<Result<(), String>> = OnceLock::new();
    FONT.get_or_init(|| {
        let path = FONTS
            .iter()
            .find(|p| Path::new(p).is_file())
            .ok_or_else(|| {
                format!(
                    "no TrueType font for the chart's text (looked for {}): apt-get install -y fonts-dejavu-core",
                    FONTS.join(", ")
                )
            })?;
        let bytes = std::fs::read(path).map_err(|e| format!("cannot read {path}: {e}"))?;
        // plotters keeps registered fonts for the whole process.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        register_font(FAMILY, FontStyle::Normal, bytes)
            .map_err(|_| format!("{path} is not a font plotters can read"))
    })
    .clone()
    .map_err(anyhow::Error::msg)
}

/// Largest value of `points` (at least `floor`), padded 10% for headroom.
fn top(points: &[(f64, f64)], floor: f64) -> f64 {
    points.iter().map(|p| p.1).fold(floor, f64::max) * 1.1
}

/// Writes a PNG to `path`: `left` against the left axis and `right` against
/// the right one, both over the same seconds.
pub(crate) fn two_axes(path: &Path, title: &str, left: &Series, right: &Series) -> Result<()> {
    font()?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let x_max = left
        .points
        .iter()
        .chain(&right.points)
        .map(|p| p.0)
        .fold(1.0, f64::max);
    let draw = || -> Result<(), Box<dyn std::error::Error + '_>> {
        let root = BitMapBackend::new(path, (1280, 720)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, (FAMILY, 26))
            .margin(20)
            .x_label_area_size(50)
            .y_label_area_size(90)
            .right_y_label_area_size(90)
            .build_cartesian_2d(0.0..x_max, 0.0..top(&left.points, 1.0))?
            .set_secondary_coord(0.0..x_max, 0.0..top(&right.points, 1.0));
        chart
            .configure_mesh()
            .x_desc("seconds since the drain started")
            .y_desc(left.label.as_str())
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| format!("{y:.0}"))
            .label_style((FAMILY, 16))
            .axis_desc_style((FAMILY, 18))
            .draw()?;
        chart
            .configure_secondary_axes()
            .y_desc(right.label.as_str())
            .y_label_formatter(&|y| format!("{y:.0}"))
            .label_style((FAMILY, 16))
            .axis_desc_style((FAMILY, 18))
            .draw()?;
        let blue = BLUE.stroke_width(2);
        let red = RED.stroke_width(2);
        chart
            .draw_series(LineSeries::new(left.points.iter().copied(), blue))?
            .label(left.label.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], blue));
        chart
            .draw_secondary_series(LineSeries::new(right.points.iter().copied(), red))?
            .label(right.label.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], red));
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerLeft)
            .label_font((FAMILY, 16))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| anyhow!("cannot draw {}: {e}", path.display()))
}
