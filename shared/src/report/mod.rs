//! `compare`: benchmark summaries side by side, as `report.md` and a self-contained `report.html`
//! (inline SVG plots; no scripts, styles, fonts or images fetched from anywhere).
//!
//! One [`Report`] is built from the loaded runs and then rendered by each format: the figures,
//! definitions and workload check are computed once, so the Markdown, the HTML and the terminal
//! view (`--show`) cannot disagree.

pub mod diff;
pub mod figures;
pub mod html;
pub mod load;
pub mod markdown;
pub mod plots;
pub mod scaling;
pub mod show;

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

pub use load::{load_run, load_runs, Run};

/// Everything a report shows, ready to render.
#[derive(Debug)]
pub struct Report<'a> {
    pub runs: &'a [Run],
    /// Index into `runs`.
    pub baseline: usize,
    pub workload: diff::WorkloadCheck,
    pub headline: Vec<figures::Row>,
    pub workload_rows: Vec<figures::Row>,
    pub environment: Vec<figures::Row>,
    pub plots: Vec<plots::Plot>,
    /// Multi-GPU runs against one-GPU runs of the same workload.
    pub scaling: Vec<scaling::ScalingRow>,
    /// UTC, RFC 3339.
    pub generated_at: String,
}

impl<'a> Report<'a> {
    /// `baseline` indexes `runs`.
    pub fn build(runs: &'a [Run], baseline: usize) -> Result<Self> {
        if runs.is_empty() {
            bail!("no run to report on; pass at least one benchmark_summary.json or run folder");
        }
        if baseline >= runs.len() {
            bail!(
                "baseline index {baseline} is out of range for {} runs",
                runs.len()
            );
        }
        Ok(Self {
            runs,
            baseline,
            workload: diff::check(runs, baseline),
            headline: figures::headline_rows(runs, baseline),
            workload_rows: figures::workload_rows(runs),
            environment: figures::environment_rows(runs),
            plots: plots::all(runs)?,
            scaling: scaling::rows(runs),
            generated_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        })
    }

    /// The column heading of run `i`.
    pub fn heading(&self, i: usize) -> String {
        let r = &self.runs[i];
        if i == self.baseline {
            format!("{} (baseline)", r.label)
        } else {
            r.label.clone()
        }
    }
}

/// Finds the run the user means by `--baseline N` (the N-th argument, 1-based).
pub fn baseline_index(runs: &[Run], arg_index: usize, arg_count: usize) -> Result<usize> {
    if arg_index == 0 || arg_index > arg_count {
        bail!("--baseline {arg_index} is out of range: pass a number from 1 to {arg_count} (the position of a summary among the arguments)");
    }
    match runs.iter().position(|r| r.arg_index == arg_index) {
        Some(i) => Ok(i),
        None => bail!("--baseline {arg_index} names a summary that was skipped as invalid; pick another run as the baseline"),
    }
}

/// Writes `report.md` and `report.html` into `out_dir` (each atomically) and returns their paths.
pub fn write(report: &Report, out_dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let md = out_dir.join("report.md");
    let html = out_dir.join("report.html");
    crate::files::write_atomic(&md, markdown::render(report).as_bytes())?;
    crate::files::write_atomic(&html, html::render(report).as_bytes())?;
    Ok((md, html))
}
