//! `compare`: benchmark summaries side by side.
//!
//! ```text
//! cargo run -p shared --release --bin compare -- SUMMARY_OR_RUN_DIR... [--baseline N] [--output-dir DIR]
//! cargo run -p shared --release --bin compare -- --show SUMMARY_OR_RUN_DIR
//! ```
//! Writes `report.md` and a self-contained `report.html` (inline SVG plots, nothing fetched).
//! Exit codes: 0 written, 1 could not write, 2 bad arguments or a summary that cannot be read.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use shared::error::exit;
use shared::report::{self, Report};

#[derive(Debug, Parser)]
#[command(
    name = "compare",
    version,
    about = "Compare benchmark runs side by side: writes report.md and a self-contained report.html",
    after_help = "Each argument is a benchmark_summary.json or a run folder holding one (<output-dir>/runs/<run-id>/). \
                  A run folder also lends its steps.jsonl to the step-time plot."
)]
struct Args {
    /// Summaries to compare: benchmark_summary.json files or run folders.
    #[arg(value_name = "SUMMARY_OR_RUN_DIR", required_unless_present = "show")]
    inputs: Vec<PathBuf>,

    /// The run the others are measured against: its position among the arguments, from 1
    /// [default: the first run that could be read].
    #[arg(long, value_name = "N")]
    baseline: Option<usize>,

    /// Folder for report.md and report.html (created if missing).
    #[arg(long, value_name = "DIR", default_value = ".")]
    output_dir: PathBuf,

    /// Print one run as a table in the terminal instead; writes nothing.
    #[arg(long, value_name = "SUMMARY", conflicts_with_all = ["inputs", "baseline", "output_dir", "skip_invalid"])]
    show: Option<PathBuf>,

    /// Leave out summaries that cannot be read (with a warning each) instead of stopping.
    #[arg(long)]
    skip_invalid: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    ExitCode::from(run(&args) as u8)
}

fn run(args: &Args) -> i32 {
    if let Some(path) = &args.show {
        return match report::load_run(path, 1) {
            Ok(r) => {
                print!("{}", report::show::render(&r));
                exit::OK
            }
            Err(e) => {
                eprintln!("error: {e:#}");
                exit::USAGE
            }
        };
    }
    let (runs, skipped) = match report::load_runs(&args.inputs, args.skip_invalid) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("error: {e:#}\n(to compare the other runs without it, pass --skip-invalid)");
            return exit::USAGE;
        }
    };
    for e in &skipped {
        eprintln!("warning: skipping {e:#}");
    }
    if runs.is_empty() {
        eprintln!(
            "error: none of the {} summaries could be read; nothing to compare",
            args.inputs.len()
        );
        return exit::USAGE;
    }
    let chosen = args
        .baseline
        .map(|n| report::baseline_index(&runs, n, args.inputs.len()));
    let baseline = match chosen.unwrap_or(Ok(0)) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("error: {e:#}");
            return exit::USAGE;
        }
    };
    for d in report::diff::dtype_differences(&runs) {
        eprintln!("warning: {}", d.warning(|i| runs[i].label.clone()));
    }
    let written = Report::build(&runs, baseline).and_then(|r| report::write(&r, &args.output_dir));
    match written {
        Ok((md, html)) => {
            println!("{}", md.display());
            println!("{}", html.display());
            exit::OK
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            exit::FAILED
        }
    }
}
