//! What the report shows for each run, computed once for every output format (Markdown, HTML,
//! terminal): the headline figures with their definitions (`measuring.md`), the speed-ups against
//! the baseline, and the hardware/software and workload tables.

use serde_json::Value;

use super::load::Run;
use crate::summary::{DeviceTelemetry, Telemetry};

/// A figure's name and its definition, as `measuring.md` states it.
#[derive(Debug)]
pub struct Definition {
    /// Anchor id (`def-<id>` in HTML) and footnote key.
    pub id: &'static str,
    pub name: &'static str,
    pub text: &'static str,
}

/// Every figure the report shows, in the order of the definitions section.
pub const DEFINITIONS: &[Definition] = &[
    Definition {
        id: "tokens-per-s",
        name: "tokens/s (loss tokens, steady)",
        text: "Headline throughput: steady loss tokens / steady seconds. Loss tokens are the target positions that contribute to the loss (labels != ignore). Steady steps are the optimizer steps after the first K warm-up steps (K configurable; default 3 or 10 % of the steps, whichever is smaller, at least 1); the device is synchronised before every clock read that closes a step.",
    },
    Definition {
        id: "repeats",
        name: "tokens/s across repeats",
        text: "With --repeats R the workload runs R times in one process, each repeat building its model and optimizer anew (the summary's notes say what the process keeps between repeats: CUDA context, loaded kernels). The other figures, memory included, are those of the median run by tokens/s; this row is the spread of tokens/s over the R runs: median, p10-p90 (linear interpolation, as numpy) and min-max.",
    },
    Definition {
        id: "speed-up",
        name: "speed-up vs baseline",
        text: "This run's steady tokens/s / the baseline run's steady tokens/s: above 1 is faster. It compares like with like only when both runs have the same workload hash (the same work).",
    },
    Definition { id: "input-tokens-per-s", name: "input tokens/s", text: "Steady non-padding input tokens (prompt + response positions fed to the model) / steady seconds." },
    Definition { id: "samples-per-s", name: "samples/s", text: "Steady records (samples) / steady seconds." },
    Definition {
        id: "end-to-end",
        name: "end-to-end tokens/s",
        text: "All loss tokens of the run / total_s (process wall clock, everything included). Reported beside the headline because loading, warm-up and recompilation count here.",
    },
    Definition { id: "total-s", name: "total time", text: "total_s: the wall clock from process start to the summary, everything included (loading, warm-up, steady steps). Each of --repeats R counts the same things: the time before the first model build (startup and data preparation, measured once) plus its own build, steps and finish." },
    Definition { id: "speed-up-total", name: "end-to-end speed-up vs baseline", text: "The baseline run's total_s / this run's total_s: above 1 finished sooner." },
    Definition {
        id: "time-to-first-step",
        name: "time to first step",
        text: "Process start to the end of the first optimizer step: data preparation, model build or load, and the first (often slowest) step.",
    },
    Definition {
        id: "step-time",
        name: "step time",
        text: "Wall time of each steady optimizer step, the device synchronised before the clock read that closes it (per-step times are in the run's steps.jsonl); median and p10-p90 over the steady steps.",
    },
    Definition {
        id: "model-tflops",
        name: "model TFLOP/s",
        text: "Model FLOPs of the steady steps / steady seconds, from one function flops_per_token(model_shape, strategy, seq_len): forward 2 x N_matmul per token plus attention 4 x L x d x T (causal halving stated); backward 2x forward where input gradients are needed and 2x more where weight gradients are; frozen last-n blocks cost forward only. Only micro-batches that ran count (one without loss tokens runs on no backend). The summary's flops_per_input_token x input tokens/s gives this rate.",
    },
    Definition {
        id: "mfu",
        name: "MFU",
        text: "Model FLOPs utilisation: model TFLOP/s / the dense peak of the device at the run's precision, from a table with a cited source per row. An unknown device has no peak, so its MFU is null: never a guess.",
    },
    Definition {
        id: "hfu",
        name: "HFU",
        text: "Hardware FLOPs utilisation: the model FLOPs plus what activation checkpointing (--grad-checkpoint) computes again (the forward pass of every block that trains), per second, / the same peak as MFU. MFU measures progress on the model; HFU what the device did. Shown only when a run recomputes.",
    },
    Definition { id: "mfu-measured", name: "MFU (measured peak)", text: "Model TFLOP/s / a dense matrix-product peak measured on this device by a --calibrate run, in the run's own precision (bf16 for bf16 and mixed-bf16 runs, fp32 for float32 runs)." },
    Definition {
        id: "memory-allocated",
        name: "peak memory: device allocated",
        text: "The framework's own peak of live tensors/arrays on the device, in GiB: the CUDA caching allocator's max allocated bytes (c10 device statistics, all pools), MLX's peak memory. On a CPU run the framework's peak on the host where it keeps one (MLX); libtorch keeps none for the CPU. The memory estimate is compared with this figure. The source is named per run.",
    },
    Definition {
        id: "memory-reserved",
        name: "peak memory: device reserved",
        text: "The most the framework held from the device, its cache of freed blocks included: the CUDA caching allocator's max reserved bytes; MLX's active + cache memory at its highest reading (read after every step).",
    },
    Definition {
        id: "memory-process",
        name: "peak memory: device process (driver)",
        text: "What the device's driver reports for this process, whichever framework: on NVIDIA GPUs NVML's memory of this process (framework memory, the CUDA context and library workspaces), the highest reading after every step. Null for CPU runs and where the OS gives no per-process figure.",
    },
    Definition {
        id: "memory-rss",
        name: "peak memory: host RSS (process)",
        text: "The process's peak resident set size in host memory (Linux VmHWM, macOS ru_maxrss). Not device memory: on a CPU run it holds the tensors beside everything else the process maps (libraries, data).",
    },
    Definition {
        id: "memory-estimate",
        name: "memory estimate",
        text: "The preflight estimate of the allocated peak (shared/src/measure/memory.rs: weights, gradients, AdamW moments, the worst micro-batch's activations, LM head and loss, ...), computed before the model loads; in brackets its error against the device allocated peak.",
    },
    Definition {
        id: "energy",
        name: "energy per 1k tokens",
        text: "Joules per 1,000 loss tokens over the steady window (from the start of the first steady step to the end of the last, wall clock), for the device the run computed on: NVIDIA from NVML's total-energy counter where the GPU has one, else the integral of power sampled every --telemetry-interval-ms; Apple from powermetrics only when run as root. Otherwise not measured, with the reason. In brackets the steady and whole-run energy.",
    },
    Definition {
        id: "utilization",
        name: "device utilization",
        text: "Samples taken during the steady window by the telemetry thread: NVIDIA's \"GPU utilization\" (percent of the sample period in which a kernel ran, not how busy the SMs were), the Apple GPU's ioreg \"Device Utilization %\", or all CPU cores' utilisation for CPU runs. Mean, and in brackets p50 and p95 (numpy's linear interpolation).",
    },
    Definition {
        id: "power",
        name: "device power",
        text: "Mean power over the steady window (steady energy / window length) and the highest power sample in it, for the device(s) whose energy counts.",
    },
    Definition {
        id: "throttled",
        name: "throttled",
        text: "Whether a device slowed its clocks during the steady window: NVML's slowdown reasons (software power cap, hardware slowdown, thermal slowdown, power brake; idle and application clocks do not count) or a macOS thermal warning (pmset -g therm). The reasons seen are listed.",
    },
    Definition {
        id: "telemetry-over-time",
        name: "utilization and power over time",
        text: "The raw telemetry series (telemetry.jsonl beside the summary) against seconds since sampling began: utilization of the device the run computed on, and the power of the device(s) whose energy counts. Thin vertical lines mark each run's steady window.",
    },
    Definition {
        id: "final-loss",
        name: "final loss",
        text: "Mean cross-entropy over the loss tokens of the last optimizer step; in brackets the mean of the last min(10, steps) steps, which is less noisy.",
    },
    Definition { id: "padding-fraction", name: "padding fraction", text: "1 - input tokens / padded tokens: the share of the positions the device computed on that were padding." },
    Definition { id: "steps", name: "steps", text: "Optimizer steps run: warm-up steps (excluded from the steady figures) + steady steps." },
    Definition {
        id: "loss-curve",
        name: "loss curve",
        text: "The loss of every optimizer step in order (mean cross-entropy over the step's loss tokens), from the summary's loss_curve; warm-up steps included.",
    },
    Definition {
        id: "throughput-whiskers",
        name: "throughput whiskers",
        text: "Bars: steady tokens/s. Whiskers: the p10-p90 range of per-step throughput, derived as steady loss tokens per steady step / step time p90 (low end) and / step time p10 (high end). Dots: each repeat's tokens/s, when the run has repeats.",
    },
    Definition {
        id: "step-time-distribution",
        name: "step-time distribution",
        text: "Box: p10-p90 of the steady step times; thick line: median; whiskers: min-max; dots: every steady step from the run's steps.jsonl when the run folder is available (otherwise the box comes from the summary's step_time_s spread alone).",
    },
];

/// The definition with this id. Panics on an unknown id: ids are constants of this module.
pub fn def(id: &str) -> &'static Definition {
    DEFINITIONS
        .iter()
        .find(|d| d.id == id)
        .unwrap_or_else(|| panic!("no definition {id:?}"))
}

/// The footnote number of a definition: its position in the definitions section.
pub fn footnote(id: &str) -> usize {
    DEFINITIONS
        .iter()
        .position(|d| d.id == id)
        .map_or(0, |i| i + 1)
}

/// One table cell: a value, optionally with a detail (source, peak used), or "n/a" with a reason.
#[derive(Debug, Clone, PartialEq)]
pub struct Cell {
    pub text: String,
    pub detail: Option<String>,
    pub missing: bool,
}

impl Cell {
    pub fn value(text: impl Into<String>) -> Self {
        Self {
            text: text.into(),
            detail: None,
            missing: false,
        }
    }

    pub fn with_detail(text: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            text: text.into(),
            detail: Some(detail.into()),
            missing: false,
        }
    }

    /// "n/a" with the reason a reader needs.
    pub fn missing(reason: impl Into<String>) -> Self {
        Self {
            text: "n/a".into(),
            detail: Some(reason.into()),
            missing: true,
        }
    }

    /// The cell as one line of plain text.
    pub fn plain(&self) -> String {
        match &self.detail {
            Some(d) => format!("{} ({d})", self.text),
            None => self.text.clone(),
        }
    }
}

/// A row of a per-run table: a label, the definition it stands for, one cell per run.
#[derive(Debug, Clone)]
pub struct Row {
    pub label: String,
    pub definition: Option<&'static Definition>,
    pub cells: Vec<Cell>,
}

impl Row {
    fn new(label: &str, def_id: Option<&str>, cells: Vec<Cell>) -> Self {
        Self {
            label: label.to_string(),
            definition: def_id.map(def),
            cells,
        }
    }
}

/// `x` with `digits` significant digits and thousands separators: 519.96 -> "520", 12345.6 ->
/// "12,346", 0.012345 -> "0.0123".
pub fn sig(x: f64, digits: i32) -> String {
    if !x.is_finite() || x == 0.0 {
        return if x == 0.0 { "0".into() } else { x.to_string() };
    }
    let magnitude = x.abs().log10().floor() as i32;
    fixed(x, (digits - 1 - magnitude).max(0) as usize)
}

/// `x` with `decimals` decimals and thousands separators: 1234.5, 1 -> "1,234.5".
pub fn fixed(x: f64, decimals: usize) -> String {
    let s = format!("{:.*}", decimals, x.abs());
    let (int, frac) = s
        .split_once('.')
        .map_or((s.as_str(), None), |(i, f)| (i, Some(f)));
    let mut grouped = String::new();
    for (i, c) in int.chars().enumerate() {
        if i > 0 && (int.len() - i) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(c);
    }
    let sign = if x < 0.0 && s.chars().any(|c| c.is_ascii_digit() && c != '0') {
        "-"
    } else {
        ""
    };
    match frac {
        Some(f) => format!("{sign}{grouped}.{f}"),
        None => format!("{sign}{grouped}"),
    }
}

/// A speed-up ratio as the report prints it (tests match this format).
pub fn ratio(x: f64) -> String {
    format!("{x:.2}×")
}

/// What a summary note (`"<field>: ..."`) says about `field`, if it is about that field.
fn about<'a>(note: &'a str, field: &str) -> Option<&'a str> {
    Some(note.strip_prefix(field)?.strip_prefix(':')?.trim_start())
}

/// A note on a figure that is not null (`"<field>: <what to know>"` in the summary's `notes`).
pub fn field_note<'a>(run: &'a Run, field: &str) -> Option<&'a str> {
    run.summary.notes.iter().find_map(|n| {
        let rest = about(n, field)?;
        (!rest.starts_with("null:")).then_some(rest)
    })
}

/// Why a figure is null, from the summary's `notes` (`"<field>: null: <why>"`), else `fallback`.
pub fn null_reason(run: &Run, fields: &[&str], fallback: &str) -> String {
    run.summary
        .notes
        .iter()
        .find_map(|n| {
            fields.iter().find_map(|f| {
                let rest = about(n, f)?;
                Some(
                    rest.strip_prefix("null:")
                        .unwrap_or(rest)
                        .trim()
                        .to_string(),
                )
            })
        })
        .unwrap_or_else(|| fallback.to_string())
}

/// Energy per 1k tokens, read from the raw JSON (`metrics.telemetry.joules_per_1k_tokens`) so
/// that a summary whose telemetry carries fields this reader does not know still shows it.
pub fn joules_per_1k_tokens(run: &Run) -> Option<f64> {
    run.raw
        .pointer("/metrics/telemetry/joules_per_1k_tokens")
        .and_then(Value::as_f64)
}

/// Tokens per steady step / step time p90 and / p10: the range of per-step throughput.
pub fn throughput_whiskers(run: &Run) -> Option<(f64, f64)> {
    let m = &run.summary.metrics;
    let st = m.step_time_s?;
    if m.steady_steps == 0 || st.p10 <= 0.0 || st.p90 <= 0.0 {
        return None;
    }
    let per_step = m.steady_loss_tokens as f64 / m.steady_steps as f64;
    Some((per_step / st.p90, per_step / st.p10))
}

fn opt_cell(
    v: Option<f64>,
    fmt: impl Fn(f64) -> String,
    run: &Run,
    fields: &[&str],
    fallback: &str,
) -> Cell {
    match v {
        Some(x) => Cell::value(fmt(x)),
        None => Cell::missing(null_reason(run, fields, fallback)),
    }
}

/// Why steady figures are null when no note says.
fn no_steady(run: &Run) -> &'static str {
    if run.summary.metrics.steady_steps == 0 {
        "no steady step completed: every step was a warm-up step"
    } else {
        "not reported"
    }
}

/// The headline table: one cell per run.
pub fn headline_rows(runs: &[Run], baseline: usize) -> Vec<Row> {
    let base = &runs[baseline];
    let per_run = |f: &dyn Fn(&Run) -> Cell| runs.iter().map(f).collect::<Vec<_>>();
    let mut rows = vec![Row::new(
        "status",
        None,
        per_run(&|r| match &r.summary.error {
            None => Cell::value(format!("{:?}", r.summary.status).to_lowercase()),
            Some(e) => Cell::with_detail(
                format!("{:?}", r.summary.status).to_lowercase(),
                format!(
                    "{} after {} steps{}",
                    e.message,
                    e.steps_completed,
                    e.hint
                        .as_ref()
                        .map(|h| format!("; {h}"))
                        .unwrap_or_default()
                ),
            ),
        }),
    )];
    rows.push(Row::new(
        "tokens/s (loss tokens, steady)",
        Some("tokens-per-s"),
        per_run(&|r| {
            opt_cell(
                r.summary.metrics.tokens_per_s,
                |x| sig(x, 4),
                r,
                &["tokens_per_s"],
                no_steady(r),
            )
        }),
    ));
    if runs.iter().any(|r| r.summary.repeats.is_some()) {
        rows.push(Row::new(
            "tokens/s across repeats",
            Some("repeats"),
            per_run(&|r| match &r.summary.repeats {
                None => Cell::with_detail("-", "single run: no --repeats"),
                Some(rep) => match &rep.tokens_per_s {
                    None => Cell::missing("no repeat has a steady tokens/s"),
                    Some(s) => Cell::with_detail(
                        format!(
                            "median {}, p10-p90 {}-{}, min-max {}-{}",
                            sig(s.median, 4),
                            sig(s.p10, 4),
                            sig(s.p90, 4),
                            sig(s.min, 4),
                            sig(s.max, 4)
                        ),
                        format!(
                            "{} repeats; headline figures from repeat {}",
                            rep.count, rep.median_repeat
                        ),
                    ),
                },
            }),
        ));
    }
    let base_tps = base.summary.metrics.tokens_per_s;
    rows.push(Row::new(
        "speed-up vs baseline (tokens/s)",
        Some("speed-up"),
        runs.iter()
            .enumerate()
            .map(|(i, r)| match (r.summary.metrics.tokens_per_s, base_tps) {
                _ if i == baseline => Cell::with_detail(ratio(1.0), "baseline"),
                (Some(a), Some(b)) if b > 0.0 => {
                    let c = Cell::value(ratio(a / b));
                    if r.summary.workload.hash != base.summary.workload.hash {
                        Cell::with_detail(c.text, "different workload: see the workload check")
                    } else {
                        c
                    }
                }
                (None, _) => Cell::missing("this run has no steady tokens/s"),
                _ => Cell::missing("the baseline has no steady tokens/s"),
            })
            .collect(),
    ));
    rows.push(Row::new(
        "input tokens/s",
        Some("input-tokens-per-s"),
        per_run(&|r| {
            opt_cell(
                r.summary.metrics.input_tokens_per_s,
                |x| sig(x, 4),
                r,
                &["input_tokens_per_s"],
                no_steady(r),
            )
        }),
    ));
    rows.push(Row::new(
        "samples/s",
        Some("samples-per-s"),
        per_run(&|r| {
            opt_cell(
                r.summary.metrics.samples_per_s,
                |x| sig(x, 3),
                r,
                &["samples_per_s"],
                no_steady(r),
            )
        }),
    ));
    rows.push(Row::new(
        "end-to-end tokens/s",
        Some("end-to-end"),
        per_run(&|r| Cell::value(sig(r.summary.metrics.end_to_end_tokens_per_s, 4))),
    ));
    rows.push(Row::new(
        "total time",
        Some("total-s"),
        per_run(&|r| Cell::value(format!("{} s", sig(r.summary.metrics.total_s, 3)))),
    ));
    let base_total = base.summary.metrics.total_s;
    rows.push(Row::new(
        "end-to-end speed-up vs baseline",
        Some("speed-up-total"),
        runs.iter()
            .enumerate()
            .map(|(i, r)| match r.summary.metrics.total_s {
                _ if i == baseline => Cell::with_detail(ratio(1.0), "baseline"),
                t if t > 0.0 => Cell::value(ratio(base_total / t)),
                _ => Cell::missing("total_s is 0"),
            })
            .collect(),
    ));
    rows.push(Row::new(
        "time to first step",
        Some("time-to-first-step"),
        per_run(&|r| {
            let cell = opt_cell(
                r.summary.metrics.time_to_first_step_s,
                |x| format!("{} s", sig(x, 3)),
                r,
                // Null only when no step completed: a note on the field is not a reason.
                &[],
                "no step completed",
            );
            // A backend's note on the figure (MLX compiling its CUDA kernels in a fresh
            // machine's first run) is pointed to where the figure is read.
            match field_note(r, "time_to_first_step_s") {
                Some(_) if !cell.missing => Cell::with_detail(cell.text, "see the notes"),
                _ => cell,
            }
        }),
    ));
    rows.push(Row::new(
        "step time median",
        Some("step-time"),
        per_run(&|r| {
            opt_cell(
                r.summary.metrics.step_time_s.map(|s| s.median),
                |x| format!("{} s", sig(x, 3)),
                r,
                &["step_time_s"],
                no_steady(r),
            )
        }),
    ));
    rows.push(Row::new(
        "step time p10-p90",
        Some("step-time"),
        per_run(&|r| match r.summary.metrics.step_time_s {
            Some(s) => Cell::with_detail(
                format!("{}-{} s", sig(s.p10, 3), sig(s.p90, 3)),
                format!("{} steady steps", s.n),
            ),
            None => Cell::missing(null_reason(r, &["step_time_s"], no_steady(r))),
        }),
    ));
    rows.push(Row::new(
        "model TFLOP/s",
        Some("model-tflops"),
        per_run(&|r| {
            opt_cell(
                r.summary.metrics.model_tflops_per_s,
                |x| sig(x, 3),
                r,
                &["model_tflops_per_s"],
                no_steady(r),
            )
        }),
    ));
    rows.push(Row::new(
        "MFU",
        Some("mfu"),
        per_run(&|r| {
            let m = &r.summary.metrics;
            match (m.mfu, &m.peak) {
                (Some(x), Some(p)) => Cell::with_detail(
                    format!("{:.1} %", 100.0 * x),
                    format!(
                        "of {} TFLOP/s, {} {}",
                        sig(p.tflops, 4),
                        p.device,
                        p.precision
                    ),
                ),
                (Some(x), None) => Cell::value(format!("{:.1} %", 100.0 * x)),
                (None, _) => {
                    Cell::missing(null_reason(r, &["mfu"], "no cited peak for this device"))
                }
            }
        }),
    ));
    // HFU only where some run recomputes (activation checkpointing): elsewhere it equals MFU.
    if runs.iter().any(|r| {
        let m = &r.summary.metrics;
        matches!((m.hfu, m.mfu), (Some(h), Some(x)) if h > x)
    }) {
        rows.push(Row::new(
            "HFU",
            Some("hfu"),
            per_run(&|r| match r.summary.metrics.hfu {
                Some(x) => Cell::value(format!("{:.1} %", 100.0 * x)),
                None => Cell::missing(null_reason(r, &["mfu"], "no cited peak for this device")),
            }),
        ));
    }
    if runs
        .iter()
        .any(|r| r.summary.metrics.mfu_measured.is_some())
    {
        rows.push(Row::new(
            "MFU (measured peak)",
            Some("mfu-measured"),
            per_run(&|r| {
                let m = &r.summary.metrics;
                match (m.mfu_measured, m.measured_peak_tflops) {
                    (Some(x), Some(p)) => Cell::with_detail(
                        format!("{:.1} %", 100.0 * x),
                        format!("of {} TFLOP/s measured", sig(p, 4)),
                    ),
                    (Some(x), None) => Cell::value(format!("{:.1} %", 100.0 * x)),
                    (None, _) => Cell::missing(null_reason(
                        r,
                        &["mfu_measured"],
                        "not calibrated (run with --calibrate)",
                    )),
                }
            }),
        ));
    }
    rows.extend(memory_rows(runs));
    rows.push(Row::new(
        "energy per 1k tokens",
        Some("energy"),
        per_run(&|r| match joules_per_1k_tokens(r) {
            Some(j) => {
                let e = r
                    .summary
                    .metrics
                    .telemetry
                    .as_ref()
                    .and_then(|t| t.energy_j.map(|e| (e, t.energy_devices.join(", "))));
                match e {
                    Some((e, devs)) => Cell::with_detail(
                        format!("{} J", sig(j, 3)),
                        format!(
                            "{devs}: {} J steady, {} J whole run",
                            e.steady.map_or("?".into(), |x| sig(x, 3)),
                            e.total.map_or("?".into(), |x| sig(x, 3))
                        ),
                    ),
                    None => Cell::value(format!("{} J", sig(j, 3))),
                }
            }
            None => {
                let why = null_reason(
                    r,
                    &[
                        "joules_per_1k_tokens",
                        "energy_j",
                        "energy",
                        "telemetry",
                        "power",
                    ],
                    "",
                );
                if why.is_empty() {
                    Cell::value("not measured")
                } else {
                    Cell::with_detail("not measured", why)
                }
            }
        }),
    ));
    if runs.iter().any(|r| r.summary.metrics.telemetry.is_some()) {
        rows.extend(telemetry_rows(runs));
    }
    rows.push(Row::new(
        "final loss",
        Some("final-loss"),
        per_run(&|r| {
            let m = &r.summary.metrics;
            match (m.final_loss, m.final_loss_avg10) {
                (Some(f), Some(a)) => Cell::value(format!("{f:.4} ({a:.4})")),
                (Some(f), None) => Cell::value(format!("{f:.4}")),
                (None, _) => Cell::missing(null_reason(r, &["final_loss"], "no step completed")),
            }
        }),
    ));
    rows.push(Row::new(
        "padding fraction",
        Some("padding-fraction"),
        per_run(&|r| {
            Cell::value(format!(
                "{:.1} %",
                100.0 * r.summary.metrics.padding_fraction
            ))
        }),
    ));
    rows.push(Row::new(
        "steps",
        Some("steps"),
        per_run(&|r| {
            let m = &r.summary.metrics;
            Cell::value(format!(
                "{} ({} warm-up + {} steady)",
                m.steps, m.warmup_steps, m.steady_steps
            ))
        }),
    ));
    rows
}

/// The memory rows: three device figures with one meaning each, the host RSS, and the estimate
/// against the allocated peak. A null figure shows its source's reason.
fn memory_rows(runs: &[Run]) -> Vec<Row> {
    use crate::summary::MemoryInfo;
    type Field = fn(&MemoryInfo) -> (Option<f64>, &str);
    let figure = |label: &str, def_id: &str, f: Field| {
        Row::new(
            label,
            Some(def_id),
            runs.iter()
                .map(|r| match f(&r.summary.metrics.memory) {
                    (Some(x), src) => Cell::with_detail(format!("{} GiB", sig(x, 3)), src),
                    (None, "") => Cell::missing("not reported"),
                    (None, why) => Cell::missing(why),
                })
                .collect(),
        )
    };
    let f_alloc: Field = |m| (m.device_peak_allocated_gib, &m.device_peak_allocated_source);
    let f_reserved: Field = |m| (m.device_peak_reserved_gib, &m.device_peak_reserved_source);
    let f_process: Field = |m| (m.device_process_peak_gib, &m.device_process_peak_source);
    let f_rss: Field = |m| (m.process_peak_rss_gib, &m.process_peak_rss_source);
    vec![
        figure("peak memory: device allocated", "memory-allocated", f_alloc),
        figure(
            "peak memory: device reserved",
            "memory-reserved",
            f_reserved,
        ),
        figure(
            "peak memory: device process (driver)",
            "memory-process",
            f_process,
        ),
        figure("peak memory: host RSS (process)", "memory-rss", f_rss),
        Row::new(
            "memory estimate",
            Some("memory-estimate"),
            runs.iter()
                .map(|r| {
                    let m = &r.summary.metrics.memory;
                    match (m.estimated_peak_bytes, m.estimate_error) {
                        (Some(b), Some(e)) => Cell::with_detail(
                            format!("{} GiB", sig(b as f64 / (1u64 << 30) as f64, 3)),
                            format!("{:+.1} % vs allocated", 100.0 * e),
                        ),
                        (Some(b), None) => Cell::with_detail(
                            format!("{} GiB", sig(b as f64 / (1u64 << 30) as f64, 3)),
                            null_reason(
                                r,
                                &["memory.estimate_error"],
                                "no allocated peak to compare with",
                            ),
                        ),
                        (None, _) => Cell::missing("no estimate in this summary"),
                    }
                })
                .collect(),
        ),
    ]
}

/// Utilization, power and throttling from `metrics.telemetry`.
fn telemetry_rows(runs: &[Run]) -> Vec<Row> {
    let per_run = |f: &dyn Fn(&Run, &Telemetry) -> Cell| {
        runs.iter()
            .map(|r| match &r.summary.metrics.telemetry {
                Some(t) => f(r, t),
                None => Cell::missing(null_reason(
                    r,
                    &["telemetry"],
                    "no telemetry in this summary",
                )),
            })
            .collect::<Vec<_>>()
    };
    vec![
        Row::new(
            "utilization (steady)",
            Some("utilization"),
            per_run(&|_, t| match t.primary_device() {
                Some(d) => match d.utilization_percent {
                    Some(u) => Cell::with_detail(
                        format!("{:.0} %", u.mean),
                        format!(
                            "{}: p50 {:.0} %, p95 {:.0} %, {} samples",
                            d.id, u.p50, u.p95, u.n
                        ),
                    ),
                    None => Cell::missing(format!(
                        "{}: no utilization sample in the steady window",
                        d.id
                    )),
                },
                None => Cell::missing("no device was sampled"),
            }),
        ),
        Row::new(
            "power (steady)",
            Some("power"),
            per_run(&|_, t| {
                let counted: Vec<&DeviceTelemetry> =
                    t.devices.iter().filter(|d| d.counted_in_energy).collect();
                let mean: Option<f64> = counted
                    .iter()
                    .map(|d| d.power_w_mean)
                    .sum::<Option<f64>>()
                    .filter(|_| !counted.is_empty());
                let peak: Option<f64> = counted
                    .iter()
                    .map(|d| d.power_w_peak)
                    .sum::<Option<f64>>()
                    .filter(|_| !counted.is_empty());
                match (mean, peak) {
                    (Some(m), Some(p)) => Cell::with_detail(
                        format!("{} W", sig(m, 3)),
                        format!("peak {} W", sig(p, 3)),
                    ),
                    (Some(m), None) => Cell::value(format!("{} W", sig(m, 3))),
                    _ => Cell::value("not measured"),
                }
            }),
        ),
        Row::new(
            "throttled",
            Some("throttled"),
            per_run(&|_, t| {
                let reasons: Vec<String> = t
                    .devices
                    .iter()
                    .filter(|d| d.throttled == Some(true))
                    .map(|d| format!("{}: {}", d.id, d.throttle_reasons.join(", ")))
                    .collect();
                if t.throttled {
                    Cell::with_detail("yes", reasons.join("; "))
                } else if t.devices.iter().any(|d| d.throttled.is_some()) {
                    Cell::value("no")
                } else {
                    Cell::value("unknown")
                }
            }),
        ),
    ]
}

/// A string at a JSON pointer, or a placeholder.
fn text_at(v: &Value, pointer: &str) -> String {
    match v.pointer(pointer) {
        None | Some(Value::Null) => "-".into(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

/// What each run trained on, in a few rows (read from the raw JSON so that the config's Rust types
/// can change without this table changing).
pub fn workload_rows(runs: &[Run]) -> Vec<Row> {
    let row = |label: &str, f: &dyn Fn(&Run) -> String| {
        Row::new(
            label,
            None,
            runs.iter().map(|r| Cell::value(f(r))).collect(),
        )
    };
    vec![
        row("workload hash", &|r| {
            r.summary.workload.hash.chars().take(12).collect()
        }),
        row("model", &|r| {
            let p = &r.summary.workload.parameters;
            format!(
                "{} ({} weights), {} parameters, {} trainable",
                r.summary.workload.model_shape.name,
                text_at(&r.raw, "/workload/config/model/weights"),
                sig(p.total as f64, 3),
                sig(p.trainable as f64, 3)
            )
        }),
        row("strategy", &|r| {
            let kind = text_at(&r.raw, "/workload/config/strategy/kind");
            let checkpointed = r
                .raw
                .pointer("/workload/config/strategy/grad_checkpoint")
                .and_then(|v| v.as_bool())
                .unwrap_or(false);
            let text = match kind.as_str() {
                "last-n" => format!(
                    "last-n (N = {})",
                    text_at(&r.raw, "/workload/config/strategy/last_n")
                ),
                "lora" => format!(
                    "lora (rank {}, alpha {})",
                    text_at(&r.raw, "/workload/config/strategy/lora_rank"),
                    text_at(&r.raw, "/workload/config/strategy/lora_alpha")
                ),
                _ => kind,
            };
            if checkpointed {
                format!("{text}, activation checkpointing")
            } else {
                text
            }
        }),
        row("batch plan", &|r| {
            format!(
                "{}: {} records x {} micro-batches per step, <= {} tokens per micro-batch",
                text_at(&r.raw, "/workload/config/batch/plan"),
                text_at(&r.raw, "/workload/config/batch/micro_batch_size"),
                text_at(&r.raw, "/workload/config/batch/grad_accum"),
                text_at(&r.raw, "/workload/config/batch/max_tokens_per_micro_batch")
            )
        }),
        row("data", &|r| {
            let d = &r.summary.workload.data;
            format!(
                "{}: {} records, median {} tokens, max seq len {}",
                d.source,
                d.records_used,
                sig(d.median_tokens, 3),
                text_at(&r.raw, "/workload/config/data/max_seq_len")
            )
        }),
        row("steps planned", &|r| {
            format!(
                "{} of {} records",
                r.summary.workload.steps_planned, r.summary.workload.samples_per_step
            )
        }),
    ]
}

/// The hardware and software each run used.
pub fn environment_rows(runs: &[Run]) -> Vec<Row> {
    let row = |label: &str, f: &dyn Fn(&Run) -> String| {
        Row::new(
            label,
            None,
            runs.iter().map(|r| Cell::value(f(r))).collect(),
        )
    };
    let or_dash = |s: &Option<String>| s.clone().unwrap_or_else(|| "-".into());
    let mut rows = vec![
        row("run id", &|r| r.summary.run.run_id.clone()),
        row("binary", &|r| r.summary.run.binary.clone()),
        row("started", &|r| r.summary.run.started_at.clone()),
        row("framework", &|r| r.summary.backend.framework.clone()),
        row("device", &|r| r.summary.backend.device.clone()),
        row("device name", &|r| r.summary.backend.device_name.clone()),
        row("dtype", &|r| r.summary.backend.dtype.clone()),
        row("world size", &|r| r.summary.backend.world_size.to_string()),
        row("CPU", &|r| {
            let h = &r.summary.hardware;
            let phys = h
                .cpu_physical_cores
                .map(|c| format!("{c} cores, "))
                .unwrap_or_default();
            format!("{} ({phys}{} threads)", h.cpu_model, h.cpu_logical_cores)
        }),
        row("RAM", &|r| {
            format!("{} GiB", sig(r.summary.hardware.ram_gib, 3))
        }),
        row("GPUs", &|r| {
            let h = &r.summary.hardware;
            if h.gpus.is_empty() {
                match (&h.apple, &h.gpu_probe_error) {
                    (Some(a), _) => format!(
                        "{} ({} GPU cores)",
                        a.chip,
                        a.gpu_cores
                            .map(|c| c.to_string())
                            .unwrap_or_else(|| "?".into())
                    ),
                    (None, Some(e)) => format!("none ({e})"),
                    (None, None) => "none".into(),
                }
            } else {
                h.gpus
                    .iter()
                    .map(|g| {
                        format!(
                            "{} ({} GiB, driver {}, CUDA {}, sm {})",
                            g.name,
                            sig(g.memory_gib, 3),
                            g.driver_version,
                            g.cuda_driver_version,
                            g.compute_capability
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("; ")
            }
        }),
        row("OS", &|r| {
            let h = &r.summary.hardware;
            format!(
                "{} {} (kernel {}, {})",
                h.os, h.os_version, h.kernel, h.arch
            )
        }),
        row("framework crate", &|r| {
            r.summary.software.framework_crate.clone()
        }),
        row("framework library", &|r| {
            r.summary.software.framework_library.clone()
        }),
        row("CUDA runtime", &|r| {
            or_dash(&r.summary.software.cuda_runtime)
        }),
        row("cuDNN", &|r| or_dash(&r.summary.software.cudnn)),
        row("rustc", &|r| r.summary.software.rustc.clone()),
        row("benchmark version", &|r| {
            r.summary.software.benchmark_version.clone()
        }),
        row("git commit", &|r| or_dash(&r.summary.software.git_commit)),
    ];
    if runs.iter().any(|r| r.summary.hardware.apple.is_some()) {
        rows.push(row("Apple chip", &|r| {
            r.summary
                .hardware
                .apple
                .as_ref()
                .map(|a| {
                    format!(
                        "{}, {} GiB unified memory",
                        a.chip,
                        sig(a.unified_memory_gib, 3)
                    )
                })
                .unwrap_or_else(|| "-".into())
        }));
    }
    let mut keys: Vec<&String> = runs
        .iter()
        .flat_map(|r| r.summary.backend.details.keys())
        .collect();
    keys.sort();
    keys.dedup();
    for k in keys {
        rows.push(row(&format!("backend: {k}"), &|r| {
            r.summary
                .backend
                .details
                .get(k)
                .map(|v| text_at(v, ""))
                .unwrap_or_else(|| "-".into())
        }));
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn significant_digits_and_grouping() {
        assert_eq!(sig(519.959, 3), "520");
        assert_eq!(sig(12_345.6, 4), "12,346");
        assert_eq!(sig(1_234_567.0, 3), "1,234,567");
        assert_eq!(sig(0.012_345, 3), "0.0123");
        assert_eq!(sig(4.579, 3), "4.58");
        assert_eq!(sig(-2.5, 2), "-2.5");
        assert_eq!(sig(0.0, 3), "0");
        assert_eq!(fixed(1234.56, 1), "1,234.6");
        assert_eq!(fixed(-0.001, 2), "0.00");
    }

    #[test]
    fn every_definition_id_is_unique() {
        for (i, d) in DEFINITIONS.iter().enumerate() {
            assert!(
                DEFINITIONS[i + 1..].iter().all(|e| e.id != d.id),
                "{}",
                d.id
            );
        }
    }
}
