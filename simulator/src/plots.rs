//! Chart rendering to SVG and PNG with `plotters`.
//!
//! Text is rendered with an embedded DejaVu Sans font through the pure-Rust
//! `ab_glyph` rasteriser, so no system font libraries are required.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::coord::ranged1d::{AsRangedCoord, Ranged, ValueFormatter};
use plotters::prelude::*;
use plotters::style::{FontStyle, RGBColor, register_font};

/// Embedded font used for all chart text.
const FONT_BYTES: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");
/// Font family name the embedded font is registered under (plotters' default).
const FONT_FAMILY: &str = "sans-serif";
/// Output size in pixels (width, height).
const SIZE: (u32, u32) = (800, 500);
/// Series colours, cycled (Tableau 10).
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// One named series of (x, y) points.
#[derive(Clone, Debug)]
pub struct Series {
    /// Name shown in the legend.
    pub name: String,
    /// Data points as (x, y).
    pub points: Vec<(f64, f64)>,
}

/// How series are drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Style {
    /// Connect consecutive points with lines.
    Lines,
    /// Draw a marker at each point.
    Points,
    /// Lines with a marker at each point.
    LinesAndPoints,
}

/// A chart description.
#[derive(Clone, Debug)]
pub struct Chart {
    /// Chart title.
    pub title: String,
    /// X axis label.
    pub x_label: String,
    /// Y axis label.
    pub y_label: String,
    /// How the series are drawn.
    pub style: Style,
    /// Use a logarithmic x axis (non-positive x values are ignored).
    pub log_x: bool,
    /// The data series.
    pub series: Vec<Series>,
}

/// Errors returned by [`draw`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlotError {
    /// The drawing backend or font setup failed.
    #[error("plot backend error: {0}")]
    Backend(String),
    /// No series contained any plottable point.
    #[error("nothing to plot: all series are empty or have no usable points")]
    NothingToPlot,
}

/// Registers the embedded font once; later calls return the cached outcome.
fn ensure_font() -> Result<(), PlotError> {
    static FONT: OnceLock<Result<(), String>> = OnceLock::new();
    FONT.get_or_init(|| {
        register_font(FONT_FAMILY, FontStyle::Normal, FONT_BYTES)
            .map_err(|_| "failed to register embedded DejaVuSans.ttf font".to_string())
    })
    .clone()
    .map_err(PlotError::Backend)
}

fn backend_err<E: std::fmt::Display>(e: E) -> PlotError {
    PlotError::Backend(e.to_string())
}

/// A series reduced to its plottable points.
struct Prepared<'a> {
    name: &'a str,
    color: RGBColor,
    points: Vec<(f64, f64)>,
}

/// Filters out unusable points and drops series left empty.
fn prepare(chart: &Chart) -> Vec<Prepared<'_>> {
    chart
        .series
        .iter()
        .zip(PALETTE.iter().cycle())
        .filter_map(|(s, &color)| {
            let points: Vec<(f64, f64)> = s
                .points
                .iter()
                .copied()
                .filter(|&(x, y)| x.is_finite() && y.is_finite() && (!chart.log_x || x > 0.0))
                .collect();
            (!points.is_empty()).then_some(Prepared {
                name: &s.name,
                color,
                points,
            })
        })
        .collect()
}

/// Min and max of the values yielded, or `None` if there are none.
fn min_max(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    values.fold(None, |acc, v| match acc {
        None => Some((v, v)),
        Some((lo, hi)) => Some((lo.min(v), hi.max(v))),
    })
}

/// Linear range with a 5 % margin; degenerate ranges are widened.
fn pad_linear(lo: f64, hi: f64) -> (f64, f64) {
    // Halves avoid overflow for extreme data.
    let half_span = hi * 0.5 - lo * 0.5;
    let margin = if half_span > 0.0 {
        half_span * 0.1
    } else if lo.abs() > 0.0 {
        lo.abs() * 0.1
    } else {
        1.0
    };
    ((lo - margin).max(f64::MIN), (hi + margin).min(f64::MAX))
}

/// Logarithmic range (inputs > 0) with a margin in log space.
fn pad_log(lo: f64, hi: f64) -> (f64, f64) {
    let (llo, lhi) = (lo.ln(), hi.ln());
    if lhi - llo > 0.0 {
        let m = (lhi - llo) * 0.05;
        (
            (llo - m).exp().max(f64::MIN_POSITIVE),
            (lhi + m).exp().min(f64::MAX),
        )
    } else {
        (
            (lo / 10.0).max(f64::MIN_POSITIVE),
            (hi * 10.0).min(f64::MAX),
        )
    }
}

/// Removes trailing zeros after a decimal point ("1.500" -> "1.5", "2.000" -> "2").
fn trim_zeros(s: &str) -> String {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s.to_string()
    }
}

/// Compact scientific notation, e.g. "1.5e6".
fn sci(v: f64) -> String {
    let s = format!("{v:.3e}");
    match s.split_once('e') {
        Some((mantissa, exp)) => format!("{}e{exp}", trim_zeros(mantissa)),
        None => s,
    }
}

/// Tick formatter for a linear axis spanning `lo..hi`.
fn linear_formatter(lo: f64, hi: f64) -> impl Fn(&f64) -> String {
    let magnitude = lo.abs().max(hi.abs());
    let span = hi - lo;
    let decimals = if span > 0.0 && span.is_finite() {
        (-(span / 10.0).log10()).ceil().clamp(0.0, 8.0) as usize + 1
    } else {
        3
    };
    let scientific = !(1e-3..1e6).contains(&magnitude);
    move |v: &f64| {
        let v = *v;
        if scientific && v.abs() > 0.0 {
            sci(v)
        } else {
            let s = trim_zeros(&format!("{v:.decimals$}"));
            if s == "-0" { "0".to_string() } else { s }
        }
    }
}

/// Tick formatter for a logarithmic axis.
fn log_tick(v: &f64) -> String {
    let v = *v;
    if (1e-3..1e5).contains(&v.abs()) {
        trim_zeros(&format!("{v:.3}"))
    } else {
        sci(v)
    }
}

/// Picks the legend corner covering the fewest data points (ties: upper right).
fn legend_position(
    data: &[Prepared<'_>],
    log_x: bool,
    x_range: (f64, f64),
    y_range: (f64, f64),
) -> SeriesLabelPosition {
    let tx = |x: f64| if log_x { x.ln() } else { x };
    let (x0, x1) = (tx(x_range.0), tx(x_range.1));
    let (y0, y1) = y_range;
    // Corner boxes in normalised [0, 1] coordinates: (x_min, x_max, y_min, y_max).
    let corners = [
        (SeriesLabelPosition::UpperRight, (0.6, 1.0, 0.7, 1.0)),
        (SeriesLabelPosition::UpperLeft, (0.0, 0.4, 0.7, 1.0)),
        (SeriesLabelPosition::LowerRight, (0.6, 1.0, 0.0, 0.3)),
        (SeriesLabelPosition::LowerLeft, (0.0, 0.4, 0.0, 0.3)),
    ];
    let mut best = (SeriesLabelPosition::UpperRight, usize::MAX);
    for (pos, (ax, bx, ay, by)) in corners {
        let count = data
            .iter()
            .flat_map(|s| s.points.iter())
            .filter(|&&(x, y)| {
                let nx = (tx(x) - x0) / (x1 - x0);
                let ny = (y - y0) / (y1 - y0);
                (ax..=bx).contains(&nx) && (ay..=by).contains(&ny)
            })
            .count();
        if count < best.1 {
            best = (pos, count);
        }
    }
    best.0
}

/// Draws the chart onto `root` using `x_spec` as the x coordinate.
fn render<DB, XR>(
    root: &DrawingArea<DB, Shift>,
    chart: &Chart,
    data: &[Prepared<'_>],
    x_spec: XR,
    x_fmt: &dyn Fn(&f64) -> String,
    y_range: (f64, f64),
    legend_pos: SeriesLabelPosition,
) -> Result<(), PlotError>
where
    DB: DrawingBackend,
    XR: AsRangedCoord<Value = f64>,
    XR::CoordDescType: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    root.fill(&WHITE).map_err(backend_err)?;
    let (y_lo, y_hi) = y_range;
    let y_fmt = linear_formatter(y_lo, y_hi);

    let mut ctx = ChartBuilder::on(root)
        .caption(&chart.title, (FONT_FAMILY, 26))
        .margin(15)
        .x_label_area_size(50)
        .y_label_area_size(75)
        .build_cartesian_2d(x_spec, y_lo..y_hi)
        .map_err(backend_err)?;

    ctx.configure_mesh()
        .x_desc(chart.x_label.as_str())
        .y_desc(chart.y_label.as_str())
        .axis_desc_style((FONT_FAMILY, 18))
        .label_style((FONT_FAMILY, 14))
        .x_label_formatter(x_fmt)
        .y_label_formatter(&y_fmt)
        .light_line_style(RGBColor(235, 235, 235))
        .bold_line_style(RGBColor(200, 200, 200))
        .draw()
        .map_err(backend_err)?;

    for s in data {
        let color = s.color;
        let pts = s.points.iter().copied();
        let anno = match chart.style {
            Style::Lines | Style::LinesAndPoints => ctx
                .draw_series(LineSeries::new(pts, color.stroke_width(2)))
                .map_err(backend_err)?,
            Style::Points => ctx
                .draw_series(PointSeries::of_element(
                    pts,
                    3,
                    color.filled(),
                    &|c, size, st| Circle::new(c, size, st),
                ))
                .map_err(backend_err)?,
        };
        anno.label(s.name);
        match chart.style {
            Style::Lines => {
                anno.legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
            }
            Style::Points => {
                anno.legend(move |(x, y)| Circle::new((x + 10, y), 4, color.filled()));
            }
            Style::LinesAndPoints => {
                anno.legend(move |(x, y)| {
                    EmptyElement::at((x, y))
                        + PathElement::new(vec![(0, 0), (20, 0)], color.stroke_width(2))
                        + Circle::new((10, 0), 3, color.filled())
                });
                ctx.draw_series(PointSeries::of_element(
                    s.points.iter().copied(),
                    3,
                    color.filled(),
                    &|c, size, st| Circle::new(c, size, st),
                ))
                .map_err(backend_err)?;
            }
        }
    }

    if data.len() > 1 {
        ctx.configure_series_labels()
            .position(legend_pos)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font((FONT_FAMILY, 15))
            .draw()
            .map_err(backend_err)?;
    }
    root.present().map_err(backend_err)
}

/// Draws the chart on any backend, choosing a linear or logarithmic x axis.
fn render_any<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    chart: &Chart,
    data: &[Prepared<'_>],
    x_range: (f64, f64),
    y_range: (f64, f64),
) -> Result<(), PlotError> {
    let (x_lo, x_hi) = x_range;
    let legend_pos = legend_position(data, chart.log_x, x_range, y_range);
    if chart.log_x {
        render(
            root,
            chart,
            data,
            (x_lo..x_hi).log_scale(),
            &log_tick,
            y_range,
            legend_pos,
        )
    } else {
        let fmt = linear_formatter(x_lo, x_hi);
        render(root, chart, data, x_lo..x_hi, &fmt, y_range, legend_pos)
    }
}

/// `stem` with `ext` appended (keeps any dots already in the file name).
fn with_suffix(stem: &Path, ext: &str) -> PathBuf {
    let mut s = stem.as_os_str().to_owned();
    s.push(".");
    s.push(ext);
    PathBuf::from(s)
}

/// Writes `<stem>.svg` and `<stem>.png` (800x500) for `chart`.
///
/// Non-finite points (and, with `log_x`, points with x <= 0) are ignored and
/// series left without points are skipped. Returns
/// [`PlotError::NothingToPlot`] if no series has a usable point.
pub fn draw(chart: &Chart, stem: &Path) -> Result<(), PlotError> {
    let data = prepare(chart);
    let all = || data.iter().flat_map(|s| s.points.iter().copied());
    let (Some((x_lo, x_hi)), Some((y_lo, y_hi))) =
        (min_max(all().map(|p| p.0)), min_max(all().map(|p| p.1)))
    else {
        return Err(PlotError::NothingToPlot);
    };
    ensure_font()?;

    let x_range = if chart.log_x {
        pad_log(x_lo, x_hi)
    } else {
        pad_linear(x_lo, x_hi)
    };
    let y_range = pad_linear(y_lo, y_hi);

    let svg_path = with_suffix(stem, "svg");
    let png_path = with_suffix(stem, "png");
    {
        let root = SVGBackend::new(&svg_path, SIZE).into_drawing_area();
        render_any(&root, chart, &data, x_range, y_range)?;
    }
    let root = BitMapBackend::new(&png_path, SIZE).into_drawing_area();
    render_any(&root, chart, &data, x_range, y_range)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::time::{SystemTime, UNIX_EPOCH};

    fn temp_dir(tag: &str) -> PathBuf {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir =
            std::env::temp_dir().join(format!("plots-test-{}-{tag}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn check_outputs(stem: &Path, title: &str) {
        let svg = std::fs::read_to_string(with_suffix(stem, "svg")).unwrap();
        assert!(svg.contains("<svg"));
        assert!(svg.contains(title), "title missing from SVG");
        let png = std::fs::read(with_suffix(stem, "png")).unwrap();
        assert!(png.starts_with(&[0x89, b'P', b'N', b'G']));
        assert!(png.len() > 5_000, "PNG suspiciously small: {}", png.len());
    }

    fn series(name: &str, points: Vec<(f64, f64)>) -> Series {
        Series {
            name: name.to_string(),
            points,
        }
    }

    #[test]
    fn two_series_lines() {
        let dir = temp_dir("lines");
        let stem = dir.join("lines");
        let chart = Chart {
            title: "Throughput over time".to_string(),
            x_label: "time (s)".to_string(),
            y_label: "Mbit/s".to_string(),
            style: Style::Lines,
            log_x: false,
            series: vec![
                series(
                    "flow A",
                    (0..50)
                        .map(|i| (f64::from(i), f64::from(i).sin() * 10.0 + 20.0))
                        .collect(),
                ),
                series(
                    "flow B",
                    vec![(0.0, 5.0), (f64::NAN, 1.0), (25.0, 30.0), (49.0, 12.0)],
                ),
            ],
        };
        draw(&chart, &stem).unwrap();
        check_outputs(&stem, "Throughput over time");
        let svg = std::fs::read_to_string(with_suffix(&stem, "svg")).unwrap();
        assert!(svg.contains("flow A") && svg.contains("flow B"));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn log_x_points() {
        let dir = temp_dir("logx");
        let stem = dir.join("logx.v1");
        let chart = Chart {
            title: "Latency vs load".to_string(),
            x_label: "offered load".to_string(),
            y_label: "latency (ms)".to_string(),
            style: Style::Points,
            log_x: true,
            series: vec![series(
                "latency",
                vec![
                    (0.0, 99.0),
                    (-3.0, 99.0),
                    (1.0, 2.0),
                    (10.0, 3.0),
                    (100.0, 5.0),
                    (1000.0, 9.0),
                    (10000.0, 40.0),
                ],
            )],
        };
        draw(&chart, &stem).unwrap();
        check_outputs(&stem, "Latency vs load");
    }

    #[test]
    fn degenerate_ranges() {
        let dir = temp_dir("degenerate");
        for (i, (log_x, pts)) in [
            (false, vec![(1.0, 1.0)]),
            (false, vec![(0.0, 0.0), (0.0, 0.0)]),
            (false, vec![(3.0, 1.0), (3.0, 2.0)]),
            (true, vec![(5.0, 1.0)]),
            (true, vec![(5.0, 1.0), (5.0, 7.0)]),
        ]
        .into_iter()
        .enumerate()
        {
            let chart = Chart {
                title: format!("degenerate {i}"),
                x_label: "x".to_string(),
                y_label: "y".to_string(),
                style: Style::LinesAndPoints,
                log_x,
                series: vec![series("empty", vec![]), series("one", pts)],
            };
            let stem = dir.join(format!("d{i}"));
            draw(&chart, &stem).unwrap();
            check_outputs(&stem, &format!("degenerate {i}"));
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn nothing_to_plot() {
        let dir = temp_dir("empty");
        let mut chart = Chart {
            title: "empty".to_string(),
            x_label: "x".to_string(),
            y_label: "y".to_string(),
            style: Style::Lines,
            log_x: false,
            series: vec![series("a", vec![]), series("b", vec![])],
        };
        assert_eq!(draw(&chart, &dir.join("e")), Err(PlotError::NothingToPlot));
        chart.series = vec![series("nan", vec![(f64::NAN, 1.0), (1.0, f64::INFINITY)])];
        assert_eq!(draw(&chart, &dir.join("e")), Err(PlotError::NothingToPlot));
        chart.log_x = true;
        chart.series = vec![series("neg", vec![(-1.0, 1.0), (0.0, 2.0)])];
        assert_eq!(draw(&chart, &dir.join("e")), Err(PlotError::NothingToPlot));
        chart.series.clear();
        assert_eq!(draw(&chart, &dir.join("e")), Err(PlotError::NothingToPlot));
        assert!(!with_suffix(&dir.join("e"), "svg").exists());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn missing_dir_is_error_not_panic() {
        let dir = temp_dir("missing");
        let chart = Chart {
            title: "t".to_string(),
            x_label: "x".to_string(),
            y_label: "y".to_string(),
            style: Style::Lines,
            log_x: false,
            series: vec![series("a", vec![(0.0, 1.0), (1.0, 2.0)])],
        };
        let res = draw(&chart, &dir.join("no/such/dir/x"));
        assert!(matches!(res, Err(PlotError::Backend(_))), "{res:?}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
