//! Reading the runs a report compares: resolving each argument to a `benchmark_summary.json`,
//! validating it through [`Summary::read`], and finding the run's `steps.jsonl` when the run folder
//! is at hand (the step-time plot prefers every steady step to the summary's five-number spread).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::files::read_steps;
use crate::measure::telemetry::{self, Sample};
use crate::summary::{Summary, SCHEMA_VERSION};

/// The file a run folder holds its summary in.
pub const SUMMARY_FILE: &str = "benchmark_summary.json";

/// One run as the report sees it.
#[derive(Debug, Clone)]
pub struct Run {
    /// 1-based position on the command line (stable when `--skip-invalid` leaves some out).
    pub arg_index: usize,
    /// Short name used in tables and plot legends, e.g. `#2 pytorch cuda:0`.
    pub label: String,
    pub summary_path: PathBuf,
    pub summary: Summary,
    /// The file as JSON, for fields newer than this reader's schema structs (e.g. telemetry) and
    /// for diffing workloads field by field.
    pub raw: Value,
    /// Steady steps' times from `steps.jsonl`, when the run folder holds a log that matches.
    pub steps: Option<StepLog>,
    /// The raw telemetry series (`telemetry.jsonl`), when the run folder holds the one the
    /// summary's `metrics.telemetry` was made from.
    pub telemetry: Option<TelemetryLog>,
    /// Why `steps` is `None` although a `steps.jsonl` was found: damaged, cut short, or another
    /// run's (for the report's notes, which otherwise say none was found).
    pub steps_problem: Option<String>,
    /// Why `telemetry` is `None` although a `telemetry.jsonl` was found.
    pub telemetry_problem: Option<String>,
}

/// One run's `telemetry.jsonl`.
#[derive(Debug, Clone)]
pub struct TelemetryLog {
    pub path: PathBuf,
    pub samples: Vec<Sample>,
}

/// The steady steps of one run's `steps.jsonl`.
#[derive(Debug, Clone)]
pub struct StepLog {
    pub path: PathBuf,
    pub steady_step_time_s: Vec<f64>,
}

/// Resolves a command-line argument to the summary file it names.
pub fn summary_path(arg: &Path) -> Result<PathBuf> {
    if arg.is_dir() {
        let p = arg.join(SUMMARY_FILE);
        if !p.exists() {
            bail!(
                "{}: the folder has no {SUMMARY_FILE}; pass a run folder (`<output-dir>/runs/<run-id>/`) or a summary file",
                arg.display()
            );
        }
        regular(&p)
    } else if arg.exists() {
        regular(arg)
    } else {
        bail!(
            "{}: no such file or folder; pass a {SUMMARY_FILE} or the run folder holding one",
            arg.display()
        )
    }
}

impl Run {
    /// What was wrong with the logs found beside the summary (damaged, cut short), for the
    /// report's notes.
    pub fn log_problems(&self) -> Vec<String> {
        [&self.steps_problem, &self.telemetry_problem]
            .into_iter()
            .flatten()
            .cloned()
            .collect()
    }
}

/// A summary must be a regular file: reading a FIFO would wait for a writer forever.
fn regular(p: &Path) -> Result<PathBuf> {
    match crate::files::regular_file_problem(p) {
        None => Ok(p.to_path_buf()),
        Some(problem) => bail!(
            "{}: {problem}; pass a {SUMMARY_FILE} or the run folder holding one",
            p.display()
        ),
    }
}

/// Reads one run. Errors name the file, the problem and what to do about it.
pub fn load_run(arg: &Path, arg_index: usize) -> Result<Run> {
    let path = summary_path(arg)?;
    let summary = Summary::read(&path).map_err(|e| explain(&path, e))?;
    // In the current schema, as the summary itself was read (older schemas converted).
    let raw: Value = crate::summary::upgrade(
        serde_json::from_str(
            &std::fs::read_to_string(&path)
                .with_context(|| format!("{}: cannot read", path.display()))?,
        )
        .with_context(|| format!("{}: not valid JSON", path.display()))?,
    );
    let mut label = format!(
        "#{arg_index} {} {}",
        summary.backend.framework, summary.backend.device
    );
    if summary.backend.world_size > 1 {
        label.push_str(&format!(" x{}", summary.backend.world_size));
    }
    let (steps, steps_problem) = found(find_steps(&path, &summary));
    let (telemetry, telemetry_problem) = found(find_telemetry(&path, &summary));
    Ok(Run {
        arg_index,
        label,
        summary_path: path,
        summary,
        raw,
        steps,
        telemetry,
        steps_problem,
        telemetry_problem,
    })
}

/// Loads every argument. With `skip_invalid`, a run that cannot be read is returned in the second
/// list instead of ending the load; without it the first such error is returned.
pub fn load_runs(args: &[PathBuf], skip_invalid: bool) -> Result<(Vec<Run>, Vec<anyhow::Error>)> {
    let mut runs = Vec::new();
    let mut skipped = Vec::new();
    for (i, arg) in args.iter().enumerate() {
        match load_run(arg, i + 1) {
            Ok(r) => runs.push(r),
            Err(e) if skip_invalid => skipped.push(e),
            Err(e) => return Err(e),
        }
    }
    Ok((runs, skipped))
}

/// `Summary::read` says "does not match the summary schema: missing field `x`" without saying where
/// `x` belongs; deserialising once more through `serde_path_to_error` adds the dotted path.
fn explain(path: &Path, err: anyhow::Error) -> anyhow::Error {
    let Ok(text) = std::fs::read_to_string(path) else {
        return err;
    };
    let Ok(value) = serde_json::from_str::<Value>(&text) else {
        return err;
    };
    let value = crate::summary::upgrade(value);
    if value.get("schema_version").and_then(Value::as_u64) != Some(u64::from(SCHEMA_VERSION)) {
        return err;
    }
    match serde_path_to_error::deserialize::<_, Summary>(value) {
        Err(e) if !e.path().to_string().is_empty() && e.path().to_string() != "." => {
            let at = e.path().to_string();
            anyhow::anyhow!(
                "{}: does not match the summary schema at `{at}`: {}",
                path.display(),
                e.inner()
            )
        }
        _ => err,
    }
}

/// Where a run's steps log can be, most likely first: beside the summary (a run folder or a
/// repeat's folder); the median repeat's folder (a run folder of `--repeats R`); and, for the copy in
/// the output folder, the run folder the summary names.
fn step_log_candidates(summary_path: &Path, s: &Summary) -> Vec<PathBuf> {
    let dir = summary_path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut dirs = vec![dir.to_path_buf(), dir.join(&s.run.run_dir)];
    if let Some(r) = &s.repeats {
        let sub = format!("repeat-{}", r.median_repeat);
        dirs.insert(1, dir.join(&sub));
        dirs.push(dir.join(&s.run.run_dir).join(&sub));
    }
    dirs.into_iter().map(|d| d.join("steps.jsonl")).collect()
}

/// A log looked for beside a summary: found, or not, with what was wrong with the candidates
/// that exist (none when there were none).
enum Found<T> {
    Yes(T),
    No(Vec<String>),
}

fn found<T>(f: Found<T>) -> (Option<T>, Option<String>) {
    match f {
        Found::Yes(t) => (Some(t), None),
        Found::No(problems) if problems.is_empty() => (None, None),
        Found::No(problems) => (None, Some(problems.join("; "))),
    }
}

/// Whether a JSON-lines file ends in a line cut off by a kill (no final newline).
fn torn(path: &Path) -> bool {
    std::fs::read(path).is_ok_and(|b| !b.is_empty() && !b.ends_with(b"\n"))
}

/// The steps log whose losses are the summary's `loss_curve`: a log from another run (a stale
/// copy, another repeat) is ignored rather than plotted under this run's name, and a damaged or
/// cut-short one is named as such.
fn find_steps(summary_path: &Path, s: &Summary) -> Found<StepLog> {
    let mut problems = Vec::new();
    for path in step_log_candidates(summary_path, s) {
        if !path.is_file() {
            continue;
        }
        let Some(dir) = path.parent() else { continue };
        let lines = match read_steps(dir) {
            Ok(l) => l,
            Err(e) => {
                problems.push(format!("{} is damaged ({e:#})", path.display()));
                continue;
            }
        };
        let losses: Vec<f64> = lines
            .iter()
            .filter_map(|l| l.get("loss").and_then(Value::as_f64))
            .collect();
        let want = &s.metrics.loss_curve;
        let agree = |n: usize| {
            losses
                .iter()
                .zip(want)
                .take(n)
                .all(|(a, b)| (a - b).abs() <= 1e-9 * b.abs().max(1.0))
        };
        if losses.len() != want.len() || !agree(want.len()) {
            if losses.len() < want.len() && agree(losses.len()) {
                problems.push(format!(
                    "{} is cut short ({} of the summary's {} steps{})",
                    path.display(),
                    losses.len(),
                    want.len(),
                    if torn(&path) {
                        "; its last line is torn"
                    } else {
                        ""
                    }
                ));
            } else if dir == summary_path.parent().unwrap_or(Path::new(".")) {
                problems.push(format!(
                    "{} holds other losses than the summary (another run's log?)",
                    path.display()
                ));
            }
            continue;
        }
        let steady_step_time_s = lines
            .iter()
            .filter(|l| l.get("phase").and_then(Value::as_str) == Some("steady"))
            .filter_map(|l| l.get("step_time_s").and_then(Value::as_f64))
            .collect();
        return Found::Yes(StepLog {
            path,
            steady_step_time_s,
        });
    }
    Found::No(problems)
}

/// The telemetry series the summary's `metrics.telemetry` was made from (same number of
/// samples, same steady window), looked for where the steps log can be.
fn find_telemetry(summary_path: &Path, s: &Summary) -> Found<TelemetryLog> {
    let Some(t) = s.metrics.telemetry.as_ref() else {
        return Found::No(Vec::new());
    };
    let mut problems = Vec::new();
    for steps_path in step_log_candidates(summary_path, s) {
        let path = steps_path.with_file_name(telemetry::FILE);
        if !path.is_file() {
            continue;
        }
        let samples = match telemetry::read_series(&path) {
            Ok(x) => x,
            Err(e) => {
                problems.push(format!("{} is damaged ({e:#})", path.display()));
                continue;
            }
        };
        if samples.len() == t.samples {
            return Found::Yes(TelemetryLog { path, samples });
        }
        if samples.len() < t.samples {
            problems.push(format!(
                "{} is cut short ({} of the summary's {} samples{})",
                path.display(),
                samples.len(),
                t.samples,
                if torn(&path) {
                    "; its last line is torn"
                } else {
                    ""
                }
            ));
        }
    }
    Found::No(problems)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_argument_is_named() {
        let e = summary_path(Path::new("/nonexistent/run")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/run"), "{e}");
    }

    #[test]
    fn a_folder_without_a_summary_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let e = summary_path(dir.path()).unwrap_err();
        assert!(format!("{e}").contains(SUMMARY_FILE), "{e}");
    }
}
