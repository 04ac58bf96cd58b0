//! The two plots of the jitter experiment, as SVG: calls and completion time against the number
//! of clients, one line per strategy.

use std::path::{Path, PathBuf};

use plotters::prelude::*;

use super::args::JitterArgs;
use super::jitter::{Point, Strategy};
use super::DemoError;

/// The file names, in `--out`.
pub(crate) const CALLS_SVG: &str = "jitter-calls.svg";
pub(crate) const TIME_SVG: &str = "jitter-time.svg";

const COLORS: [RGBColor; 5] = [
    RGBColor(0x6b, 0x6b, 0x6b), // no backoff: grey
    RGBColor(0xd6, 0x27, 0x28), // exponential: red
    RGBColor(0x1f, 0x77, 0xb4), // full jitter: blue
    RGBColor(0x2c, 0xa0, 0x2c), // equal jitter: green
    RGBColor(0xff, 0x7f, 0x0e), // decorrelated jitter: orange
];

/// Writes both plots into `dir`; returns their paths and what each shows.
pub(crate) fn write(
    dir: &Path,
    points: &[Point],
    args: &JitterArgs,
) -> Result<Vec<(PathBuf, &'static str)>, DemoError> {
    let extra = if args.latency_jitter.is_zero() {
        String::new()
    } else {
        format!(" + up to {}", args.latency_jitter.as_millis())
    };
    let runs = if args.runs == 1 {
        "one run".to_owned()
    } else {
        format!("mean of {} runs", args.runs)
    };
    let note = format!(
        "base {} ms, cap {} ms, server {}{extra} ms per request, {runs}, seed {}",
        args.base.as_millis(),
        args.cap.as_millis(),
        args.latency.as_millis(),
        args.seed
    );
    let calls = dir.join(CALLS_SVG);
    chart(
        &calls,
        "Calls until every client has written",
        &note,
        "calls (reads + writes)",
        points,
        |p| p.calls as f64,
    )?;
    let time = dir.join(TIME_SVG);
    chart(
        &time,
        "Time until every client has written",
        &note,
        "completion time (ms)",
        points,
        |p| p.time_ms as f64,
    )?;
    Ok(vec![
        (calls, "calls against clients"),
        (time, "completion time against clients"),
    ])
}

fn chart(
    path: &Path,
    caption: &str,
    note: &str,
    y_label: &str,
    points: &[Point],
    value: impl Fn(&Point) -> f64,
) -> Result<(), DemoError> {
    let max_x = points.iter().map(|r| r.clients).max().unwrap_or(1) as f64;
    let max_y = points.iter().map(&value).fold(1.0_f64, f64::max);
    let root = SVGBackend::new(path, (900, 580)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let root = root
        .titled(caption, ("sans-serif", 26))
        .map_err(plot_error)?;
    root.draw_text(
        note,
        &TextStyle::from(("sans-serif", 15).into_font()).color(&BLACK.mix(0.7)),
        (60, 0),
    )
    .map_err(plot_error)?;
    let mut chart = ChartBuilder::on(&root)
        .margin(16)
        .margin_top(28)
        .x_label_area_size(50)
        .y_label_area_size(80)
        .build_cartesian_2d(0.0..max_x * 1.04, 0.0..max_y * 1.08)
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .x_desc("contending clients")
        .y_desc(y_label)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 17))
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(plot_error)?;
    for (strategy, color) in Strategy::ALL.into_iter().zip(COLORS) {
        let mut xy: Vec<(f64, f64)> = points
            .iter()
            .filter(|p| p.kind == strategy)
            .map(|p| (p.clients as f64, value(p)))
            .collect();
        xy.sort_by(|a, b| a.0.total_cmp(&b.0));
        let style = ShapeStyle::from(color).stroke_width(2);
        chart
            .draw_series(LineSeries::new(xy.clone(), style))
            .map_err(plot_error)?
            .label(strategy.name())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
        chart
            .draw_series(
                xy.into_iter()
                    .map(|p| Circle::new(p, 3, ShapeStyle::from(color).filled())),
            )
            .map_err(plot_error)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font(("sans-serif", 16))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK.mix(0.3))
        .draw()
        .map_err(plot_error)?;
    root.present().map_err(plot_error)?;
    Ok(())
}

fn plot_error(e: impl std::fmt::Display) -> DemoError {
    format!("cannot draw the plot: {e}").into()
}
