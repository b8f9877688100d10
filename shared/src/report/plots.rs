//! The report's plots, drawn with plotters into SVG strings that the HTML report inlines: nothing
//! to fetch, no fonts to embed (text stays text, in the reader's sans-serif).
//!
//! Runs sit on a numeric x axis at 0, 1, 2, ... (range -0.5..n-0.5) so that bars, whiskers and
//! boxes are placed in data coordinates, and the axis labels them with the runs' names.

use anyhow::{anyhow, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::figures::{fixed, sig, throughput_whiskers};
use super::load::Run;
use crate::measure::stats::Spread;

/// A drawn plot and what the report says about it.
#[derive(Debug, Clone)]
pub struct Plot {
    /// HTML id.
    pub id: &'static str,
    pub title: &'static str,
    /// The definition (see `figures::DEFINITIONS`) the caption quotes.
    pub definition: &'static str,
    /// Further lines for the caption (data sources per run).
    pub notes: Vec<String>,
    /// A complete `<svg>` element.
    pub svg: String,
}

const SIZE: (u32, u32) = (760, 380);
const FONT: &str = "sans-serif";

/// Tableau 10: distinguishable, and readable in grey print.
const PALETTE: [RGBColor; 10] = [
    RGBColor(78, 121, 167),
    RGBColor(242, 142, 43),
    RGBColor(225, 87, 89),
    RGBColor(118, 183, 178),
    RGBColor(89, 161, 79),
    RGBColor(237, 201, 72),
    RGBColor(176, 122, 161),
    RGBColor(255, 157, 167),
    RGBColor(156, 117, 95),
    RGBColor(186, 176, 172),
];

/// The colour of the `i`-th run, the same in every plot.
pub fn color(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

/// The four plots every report has, then utilization and power over time when at least one run
/// folder holds its telemetry series.
pub fn all(runs: &[Run]) -> Result<Vec<Plot>> {
    let mut v = vec![
        throughput(runs)?,
        loss_curves(runs)?,
        step_times(runs)?,
        peak_memory(runs)?,
    ];
    if runs.iter().any(|r| r.telemetry.is_some()) {
        v.push(over_time(runs, Series::Utilization)?);
        v.push(over_time(runs, Series::Power)?);
    }
    Ok(v)
}

fn svg_error<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("drawing a plot: {e}")
}

/// Draws into a fresh SVG string.
fn draw(f: impl FnOnce(&DrawingArea<SVGBackend, Shift>) -> Result<()>) -> Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(svg_error)?;
        f(&root)?;
        root.present().map_err(svg_error)?;
    }
    Ok(svg)
}

fn label_style(size: u32) -> TextStyle<'static> {
    TextStyle::from((FONT, size).into_font()).color(&BLACK)
}

/// Decimals that tell apart the labels of an axis spanning `span` (about five labels).
fn axis_decimals(span: f64) -> usize {
    if span > 0.0 && span.is_finite() {
        (1 - span.log10().floor() as i32).max(0) as usize
    } else {
        0
    }
}

/// Text sizes (plotters divides by 1.24 for SVG); the SVG is scaled to the page, so these are
/// chosen for a plot about 560 px wide.
const TEXT: u32 = 19;
const TEXT_SMALL: u32 = 17;

/// The upper end of a value axis: the largest value plus headroom for the labels above the bars.
fn axis_top(values: impl Iterator<Item = f64>) -> f64 {
    let max = values.filter(|v| v.is_finite()).fold(0.0_f64, f64::max);
    if max > 0.0 {
        max * 1.18
    } else {
        1.0
    }
}

/// A chart with one slot per run on the x axis.
fn per_run_chart<'a, 'b>(
    root: &'a DrawingArea<SVGBackend<'b>, Shift>,
    runs: &[Run],
    y_top: f64,
    y_desc: &str,
) -> Result<
    ChartContext<
        'a,
        SVGBackend<'b>,
        Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
    >,
> {
    let n = runs.len();
    let mut chart = ChartBuilder::on(root)
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(88)
        .build_cartesian_2d(-0.5..(n as f64 - 0.5), 0.0..y_top)
        .map_err(svg_error)?;
    // Full names fit under up to four runs; beyond that the number alone, matched by colour.
    let labels: Vec<String> = runs
        .iter()
        .map(|r| {
            if n <= 4 {
                r.label.clone()
            } else {
                format!("#{}", r.arg_index)
            }
        })
        .collect();
    let x_fmt = move |x: &f64| {
        let i = x.round();
        if (x - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < labels.len() {
            labels[i as usize].clone()
        } else {
            String::new()
        }
    };
    let decimals = axis_decimals(y_top);
    let y_fmt = move |y: &f64| fixed(*y, decimals);
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n)
        .x_label_formatter(&x_fmt)
        .y_label_formatter(&y_fmt)
        .y_desc(y_desc)
        .label_style(label_style(TEXT_SMALL))
        .axis_desc_style(label_style(TEXT))
        .light_line_style(TRANSPARENT)
        .bold_line_style(RGBColor(215, 215, 215))
        .draw()
        .map_err(svg_error)?;
    Ok(chart)
}

const BAR_HALF_WIDTH: f64 = 0.3;

/// Steady tokens/s per run, with the p10-p90 per-step range as whiskers and repeats as dots.
pub fn throughput(runs: &[Run]) -> Result<Plot> {
    let whiskers: Vec<Option<(f64, f64)>> = runs.iter().map(throughput_whiskers).collect();
    let repeat_points: Vec<Vec<f64>> = runs
        .iter()
        .map(|r| {
            r.summary
                .repeats
                .as_ref()
                .map(|rep| rep.runs.iter().filter_map(|x| x.tokens_per_s).collect())
                .unwrap_or_default()
        })
        .collect();
    let top = axis_top(
        runs.iter()
            .filter_map(|r| r.summary.metrics.tokens_per_s)
            .chain(whiskers.iter().flatten().map(|w| w.1))
            .chain(repeat_points.iter().flatten().copied()),
    );
    let svg = draw(|root| {
        let mut chart = per_run_chart(root, runs, top, "loss tokens/s (steady)")?;
        for (i, r) in runs.iter().enumerate() {
            let x = i as f64;
            let c = color(i);
            let Some(tps) = r.summary.metrics.tokens_per_s else {
                chart
                    .draw_series([Text::new(
                        "n/a",
                        (x, top * 0.02),
                        label_style(TEXT_SMALL).pos(Pos::new(HPos::Center, VPos::Bottom)),
                    )])
                    .map_err(svg_error)?;
                continue;
            };
            chart
                .draw_series([Rectangle::new(
                    [(x - BAR_HALF_WIDTH, 0.0), (x + BAR_HALF_WIDTH, tps)],
                    c.filled(),
                )])
                .map_err(svg_error)?;
            let mut label_at = tps;
            if let Some((lo, hi)) = whiskers[i] {
                let style = BLACK.stroke_width(2);
                chart
                    .draw_series([
                        PathElement::new(vec![(x, lo), (x, hi)], style),
                        PathElement::new(vec![(x - 0.08, lo), (x + 0.08, lo)], style),
                        PathElement::new(vec![(x - 0.08, hi), (x + 0.08, hi)], style),
                    ])
                    .map_err(svg_error)?;
                label_at = label_at.max(hi);
            }
            chart
                .draw_series(
                    repeat_points[i]
                        .iter()
                        .map(|&y| Circle::new((x + 0.18, y), 4, BLACK.mix(0.75).filled())),
                )
                .map_err(svg_error)?;
            label_at = repeat_points[i].iter().copied().fold(label_at, f64::max);
            chart
                .draw_series([EmptyElement::at((x, label_at))
                    + Text::new(
                        sig(tps, 4),
                        (0, -6),
                        label_style(TEXT_SMALL).pos(Pos::new(HPos::Center, VPos::Bottom)),
                    )])
                .map_err(svg_error)?;
        }
        Ok(())
    })?;
    let notes = runs
        .iter()
        .zip(&whiskers)
        .filter(|(_, w)| w.is_none())
        .map(|(r, _)| {
            format!(
                "{}: no whisker (no steady step-time spread in the summary)",
                r.label
            )
        })
        .collect();
    Ok(Plot {
        id: "plot-throughput",
        title: "Throughput",
        definition: "throughput-whiskers",
        notes,
        svg,
    })
}

/// Every run's loss per optimizer step, overlaid.
pub fn loss_curves(runs: &[Run]) -> Result<Plot> {
    let curves: Vec<&[f64]> = runs
        .iter()
        .map(|r| r.summary.metrics.loss_curve.as_slice())
        .collect();
    let steps = curves.iter().map(|c| c.len()).max().unwrap_or(0).max(2);
    let finite = || {
        curves
            .iter()
            .flat_map(|c| c.iter().copied())
            .filter(|v| v.is_finite())
    };
    let (mut lo, mut hi) = (
        finite().fold(f64::INFINITY, f64::min),
        finite().fold(f64::NEG_INFINITY, f64::max),
    );
    if !lo.is_finite() {
        (lo, hi) = (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.08).max(1e-3);
    let svg = draw(|root| {
        let mut chart = ChartBuilder::on(root)
            .margin(16)
            .x_label_area_size(52)
            .y_label_area_size(88)
            .build_cartesian_2d(0.0..(steps - 1) as f64, (lo - pad)..(hi + pad))
            .map_err(svg_error)?;
        let x_fmt = |x: &f64| format!("{x:.0}");
        let decimals = axis_decimals(hi - lo + 2.0 * pad);
        let y_fmt = move |y: &f64| fixed(*y, decimals);
        chart
            .configure_mesh()
            .x_labels(steps.min(12))
            .x_label_formatter(&x_fmt)
            .y_label_formatter(&y_fmt)
            .x_desc("optimizer step")
            .y_desc("loss")
            .label_style(label_style(TEXT_SMALL))
            .axis_desc_style(label_style(TEXT))
            .light_line_style(TRANSPARENT)
            .bold_line_style(RGBColor(215, 215, 215))
            .draw()
            .map_err(svg_error)?;
        for (i, (r, curve)) in runs.iter().zip(&curves).enumerate() {
            let c = color(i);
            let points: Vec<(f64, f64)> = curve
                .iter()
                .enumerate()
                .map(|(k, &l)| (k as f64, l))
                .collect();
            chart
                .draw_series(LineSeries::new(points.clone(), c.stroke_width(2)))
                .map_err(svg_error)?
                .label(r.label.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(3))
                });
            chart
                .draw_series(points.into_iter().map(|p| Circle::new(p, 3, c.filled())))
                .map_err(svg_error)?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(200, 200, 200))
            .label_font(label_style(TEXT_SMALL))
            .draw()
            .map_err(svg_error)?;
        Ok(())
    })?;
    Ok(Plot {
        id: "plot-loss",
        title: "Loss curves",
        definition: "loss-curve",
        notes: Vec::new(),
        svg,
    })
}

/// Steady step times per run: every step from `steps.jsonl` where the run folder is at hand, a
/// p10-p90 box with median and min-max whiskers either way.
pub fn step_times(runs: &[Run]) -> Result<Plot> {
    let data: Vec<(Option<&[f64]>, Option<Spread>)> = runs
        .iter()
        .map(|r| match &r.steps {
            Some(s) if !s.steady_step_time_s.is_empty() => (
                Some(s.steady_step_time_s.as_slice()),
                Spread::of(&s.steady_step_time_s),
            ),
            _ => (None, r.summary.metrics.step_time_s),
        })
        .collect();
    let top = axis_top(data.iter().flat_map(|(_, s)| s.map(|s| s.max)));
    let svg = draw(|root| {
        let mut chart = per_run_chart(root, runs, top, "steady step time (s)")?;
        for (i, (points, spread)) in data.iter().enumerate() {
            let x = i as f64;
            let c = color(i);
            let Some(s) = spread else {
                chart
                    .draw_series([Text::new(
                        "n/a",
                        (x, top * 0.02),
                        label_style(TEXT_SMALL).pos(Pos::new(HPos::Center, VPos::Bottom)),
                    )])
                    .map_err(svg_error)?;
                continue;
            };
            let w = BAR_HALF_WIDTH;
            chart
                .draw_series([
                    PathElement::new(vec![(x, s.min), (x, s.p10)], BLACK.stroke_width(1)),
                    PathElement::new(vec![(x, s.p90), (x, s.max)], BLACK.stroke_width(1)),
                    PathElement::new(
                        vec![(x - 0.08, s.min), (x + 0.08, s.min)],
                        BLACK.stroke_width(1),
                    ),
                    PathElement::new(
                        vec![(x - 0.08, s.max), (x + 0.08, s.max)],
                        BLACK.stroke_width(1),
                    ),
                ])
                .map_err(svg_error)?;
            chart
                .draw_series([Rectangle::new(
                    [(x - w, s.p10), (x + w, s.p90)],
                    c.mix(0.35).filled(),
                )])
                .map_err(svg_error)?;
            chart
                .draw_series([Rectangle::new(
                    [(x - w, s.p10), (x + w, s.p90)],
                    c.stroke_width(2),
                )])
                .map_err(svg_error)?;
            chart
                .draw_series([PathElement::new(
                    vec![(x - w, s.median), (x + w, s.median)],
                    BLACK.stroke_width(3),
                )])
                .map_err(svg_error)?;
            if let Some(points) = points {
                // A fixed, deterministic jitter so the dots of equal times do not hide each other.
                let jitter = |k: usize| ((k * 7) % 11) as f64 / 10.0 - 0.5;
                chart
                    .draw_series(points.iter().enumerate().map(|(k, &t)| {
                        Circle::new((x + 0.5 * w * jitter(k), t), 3, c.mix(0.9).filled())
                    }))
                    .map_err(svg_error)?;
            }
            chart
                .draw_series([EmptyElement::at((x, s.max))
                    + Text::new(
                        format!("median {} s", sig(s.median, 3)),
                        (0, -6),
                        label_style(TEXT_SMALL).pos(Pos::new(HPos::Center, VPos::Bottom)),
                    )])
                .map_err(svg_error)?;
        }
        Ok(())
    })?;
    let notes = runs
        .iter()
        .zip(&data)
        .map(|(r, (points, _))| match (points, &r.steps) {
            (Some(p), Some(log)) => format!(
                "{}: {} steady steps from {}",
                r.label,
                p.len(),
                log.path.display()
            ),
            _ => match &r.steps_problem {
                Some(problem) => {
                    format!("{}: the summary's step_time_s spread ({problem})", r.label)
                }
                None => format!(
                    "{}: the summary's step_time_s spread (no matching steps.jsonl beside {})",
                    r.label,
                    r.summary_path.display()
                ),
            },
        })
        .collect();
    Ok(Plot {
        id: "plot-step-time",
        title: "Step-time distribution",
        definition: "step-time-distribution",
        notes,
        svg,
    })
}

/// The framework's allocated peak per run (one meaning for every run; the report's memory rows
/// show the other figures).
pub fn peak_memory(runs: &[Run]) -> Result<Plot> {
    let alloc = |r: &Run| r.summary.metrics.memory.device_peak_allocated_gib;
    let top = axis_top(runs.iter().filter_map(alloc));
    let svg = draw(|root| {
        let mut chart = per_run_chart(root, runs, top, "peak allocated (GiB)")?;
        for (i, r) in runs.iter().enumerate() {
            let x = i as f64;
            let (text, y) = match alloc(r) {
                Some(gib) => {
                    chart
                        .draw_series([Rectangle::new(
                            [(x - BAR_HALF_WIDTH, 0.0), (x + BAR_HALF_WIDTH, gib)],
                            color(i).filled(),
                        )])
                        .map_err(svg_error)?;
                    (format!("{} GiB", sig(gib, 3)), gib)
                }
                None => ("n/a".to_string(), 0.0),
            };
            chart
                .draw_series([EmptyElement::at((x, y))
                    + Text::new(
                        text,
                        (0, -6),
                        label_style(TEXT_SMALL).pos(Pos::new(HPos::Center, VPos::Bottom)),
                    )])
                .map_err(svg_error)?;
        }
        Ok(())
    })?;
    let notes = runs
        .iter()
        .map(|r| {
            let src = &r.summary.metrics.memory.device_peak_allocated_source;
            format!(
                "{}: {}",
                r.label,
                if src.is_empty() {
                    "source not stated"
                } else {
                    src
                }
            )
        })
        .collect();
    Ok(Plot {
        id: "plot-memory",
        title: "Peak allocated memory",
        definition: "memory-allocated",
        notes,
        svg,
    })
}

/// Which telemetry series a time plot shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Series {
    Utilization,
    Power,
}

/// At most this many points per line: longer series are averaged in equal buckets.
const MAX_POINTS: usize = 1200;

fn downsample(points: Vec<(f64, f64)>) -> Vec<(f64, f64)> {
    if points.len() <= MAX_POINTS {
        return points;
    }
    let per = points.len().div_ceil(MAX_POINTS);
    points
        .chunks(per)
        .map(|c| {
            let n = c.len() as f64;
            (
                c.iter().map(|p| p.0).sum::<f64>() / n,
                c.iter().map(|p| p.1).sum::<f64>() / n,
            )
        })
        .collect()
}

/// A run's series from its telemetry log: the primary device's utilization, or the summed power
/// of the devices whose energy counts (at the samples where every one of them has a reading).
pub fn time_series(run: &Run, which: Series) -> Option<Vec<(f64, f64)>> {
    let log = run.telemetry.as_ref()?;
    let t = run.summary.metrics.telemetry.as_ref()?;
    let value = |s: &crate::measure::telemetry::Sample, id: &str| -> Option<f64> {
        if id == "cpu" {
            let c = s.cpu.as_ref()?;
            return match which {
                Series::Utilization => c.system_cpu_percent,
                Series::Power => None,
            };
        }
        if id == "apple-gpu" {
            let a = s.apple_gpu.as_ref()?;
            return match which {
                Series::Utilization => a.utilization_percent,
                Series::Power => a.power_w,
            };
        }
        let i: u32 = id.strip_prefix("nvidia:")?.parse().ok()?;
        let g = s.nvidia.iter().find(|g| g.index == i)?;
        match which {
            Series::Utilization => g.utilization_percent,
            Series::Power => g.power_w,
        }
    };
    let ids: Vec<&str> = match which {
        Series::Utilization => vec![t.primary_device()?.id.as_str()],
        Series::Power => {
            let counted: Vec<&str> = t
                .devices
                .iter()
                .filter(|d| d.counted_in_energy)
                .map(|d| d.id.as_str())
                .collect();
            if counted.is_empty() {
                vec![t.primary_device()?.id.as_str()]
            } else {
                counted
            }
        }
    };
    let points: Vec<(f64, f64)> = log
        .samples
        .iter()
        .filter_map(|s| {
            let v: Option<f64> = ids.iter().map(|id| value(s, id)).sum();
            v.filter(|v| v.is_finite()).map(|v| (s.t_s, v))
        })
        .collect();
    (!points.is_empty()).then(|| downsample(points))
}

/// Utilization or power against time since sampling began, one line per run that has the series.
pub fn over_time(runs: &[Run], which: Series) -> Result<Plot> {
    let series: Vec<Option<Vec<(f64, f64)>>> = runs.iter().map(|r| time_series(r, which)).collect();
    let t_max = series
        .iter()
        .flatten()
        .flat_map(|s| s.iter().map(|p| p.0))
        .fold(1.0_f64, f64::max);
    let (y_top, y_desc) = match which {
        // A little headroom so a line at 100 % stays visible above the frame.
        Series::Utilization => (105.0, "utilization (%)"),
        Series::Power => (
            axis_top(series.iter().flatten().flat_map(|s| s.iter().map(|p| p.1))),
            "power (W)",
        ),
    };
    let svg = draw(|root| {
        let mut chart = ChartBuilder::on(root)
            .margin(16)
            .x_label_area_size(52)
            .y_label_area_size(88)
            .build_cartesian_2d(0.0..t_max, 0.0..y_top)
            .map_err(svg_error)?;
        let x_decimals = axis_decimals(t_max);
        let x_fmt = move |x: &f64| fixed(*x, x_decimals);
        let y_decimals = axis_decimals(y_top);
        let y_fmt = move |y: &f64| fixed(*y, y_decimals);
        chart
            .configure_mesh()
            .x_labels(10)
            .x_label_formatter(&x_fmt)
            .y_label_formatter(&y_fmt)
            .x_desc("seconds since sampling began")
            .y_desc(y_desc)
            .label_style(label_style(TEXT_SMALL))
            .axis_desc_style(label_style(TEXT))
            .light_line_style(TRANSPARENT)
            .bold_line_style(RGBColor(215, 215, 215))
            .draw()
            .map_err(svg_error)?;
        let mut any = false;
        for (i, (r, s)) in runs.iter().zip(&series).enumerate() {
            let Some(points) = s else { continue };
            any = true;
            let c = color(i);
            if let Some(t) = &r.summary.metrics.telemetry {
                for x in [t.steady_start_s, t.steady_end_s].into_iter().flatten() {
                    chart
                        .draw_series([PathElement::new(
                            vec![(x, 0.0), (x, y_top)],
                            c.mix(0.6).stroke_width(1),
                        )])
                        .map_err(svg_error)?;
                }
            }
            chart
                .draw_series(LineSeries::new(points.clone(), c.stroke_width(2)))
                .map_err(svg_error)?
                .label(r.label.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(3))
                });
        }
        if any {
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .background_style(WHITE.mix(0.85))
                .border_style(RGBColor(200, 200, 200))
                .label_font(label_style(TEXT_SMALL))
                .draw()
                .map_err(svg_error)?;
        }
        Ok(())
    })?;
    let notes = runs
        .iter()
        .zip(&series)
        .map(|(r, s)| match (s, &r.telemetry) {
            (Some(p), Some(log)) => format!(
                "{}: {} points from {}",
                r.label,
                p.len(),
                log.path.display()
            ),
            (None, Some(_)) => format!(
                "{}: no {} readings in its telemetry series",
                r.label,
                match which {
                    Series::Utilization => "utilization",
                    Series::Power => "power",
                }
            ),
            (_, None) => match &r.telemetry_problem {
                Some(problem) => format!("{}: no telemetry plotted: {problem}", r.label),
                None => format!(
                    "{}: no telemetry.jsonl matching its summary beside {}",
                    r.label,
                    r.summary_path.display()
                ),
            },
        })
        .collect();
    Ok(match which {
        Series::Utilization => Plot {
            id: "plot-utilization",
            title: "Utilization over time",
            definition: "telemetry-over-time",
            notes,
            svg,
        },
        Series::Power => Plot {
            id: "plot-power",
            title: "Power over time",
            definition: "telemetry-over-time",
            notes,
            svg,
        },
    })
}
