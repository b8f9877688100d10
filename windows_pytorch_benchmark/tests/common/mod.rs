//! Helpers for the end-to-end tests: run the real binary into a temporary folder.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_windows_pytorch_benchmark"))
}

/// Small, fast tiny-model settings: 3 steps of 8 short records.
pub const FAST: &[&str] = &[
    "--preset",
    "tiny",
    "--device",
    "cpu",
    "--dtype",
    "float32",
    "--quiet",
    "--samples",
    "24",
    "--micro-batch-size",
    "4",
    "--grad-accum",
    "2",
    "--max-seq-len",
    "256",
    "--max-tokens-per-micro-batch",
    "1024",
    "--max-steps",
    "3",
];

pub fn run(out: &Path, extra: &[&str]) -> Output {
    let mut args: Vec<&str> = FAST.to_vec();
    args.extend_from_slice(extra);
    let o = out.to_str().expect("utf-8 temp path");
    args.extend_from_slice(&["--output-dir", o]);
    Command::new(bin())
        .args(&args)
        .output()
        .expect("binary runs")
}

pub fn summary(out: &Path) -> shared::summary::Summary {
    shared::summary::Summary::read(&out.join("benchmark_summary.json")).expect("a valid summary")
}

pub fn losses(out: &Path) -> Vec<f64> {
    summary(out).metrics.loss_curve
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The repository's ../shared folder (beside the checkout), if present.
pub fn shared_dir() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared");
    p.join("tokenizers/phi-3/tokenizer.json")
        .exists()
        .then_some(p)
}
