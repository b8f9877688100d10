//! The promise of the benchmark: both binaries compute the same thing. Same seed, fp32, tiny
//! preset: the PyTorch and MLX binaries' per-step losses agree within 1e-3 (relative) for 8
//! optimizer steps, for every strategy, with padded and packed batches; parameter counts and the
//! workload hash agree. And the check has teeth: switching prompt masking off on one side only
//! breaks it.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The PyTorch binary: `FTB_PYTORCH_BIN` (set by `scripts/test.sh` to the binary its build just
/// produced), else the one beside this binary in the same target folder.
fn pytorch_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("FTB_PYTORCH_BIN") {
        let p = PathBuf::from(p);
        assert!(p.exists(), "FTB_PYTORCH_BIN={} does not exist", p.display());
        return Some(p);
    }
    let mlx = PathBuf::from(env!("CARGO_BIN_EXE_macos_mlx_benchmark"));
    let p = mlx.with_file_name(format!(
        "windows_pytorch_benchmark{}",
        std::env::consts::EXE_SUFFIX
    ));
    if p.exists() {
        return Some(p);
    }
    if std::env::var_os("CI").is_some() {
        panic!(
            "{} is missing: build the workspace's binaries first (scripts/test.sh does)",
            p.display()
        );
    }
    eprintln!(
        "skipped: {} is not built (cargo build --release -p windows_pytorch_benchmark)",
        p.display()
    );
    None
}

const COMMON: &[&str] = &[
    "--preset",
    "tiny",
    "--device",
    "cpu",
    "--dtype",
    "float32",
    "--quiet",
    "--seed",
    "7",
    "--samples",
    "64",
    "--micro-batch-size",
    "4",
    "--grad-accum",
    "2",
    "--max-seq-len",
    "128",
    "--max-tokens-per-micro-batch",
    "512",
    "--max-steps",
    "8",
];

fn run(bin: &Path, out: &Path, extra: &[&str]) -> shared::summary::Summary {
    let o = Command::new(bin)
        .args(COMMON)
        .args(extra)
        .arg("--output-dir")
        .arg(out)
        .output()
        .expect("binary starts");
    assert!(
        o.status.success(),
        "{} {extra:?} failed: {}",
        bin.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    shared::summary::Summary::read(&out.join("benchmark_summary.json")).expect("valid summary")
}

fn max_rel_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "step counts differ");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / x.abs().max(1e-12))
        .fold(0.0, f64::max)
}

#[test]
fn both_frameworks_compute_the_same_losses() {
    let Some(torch) = pytorch_bin() else { return };
    let mlx = PathBuf::from(env!("CARGO_BIN_EXE_macos_mlx_benchmark"));
    for strategy in ["last-n", "full", "lora"] {
        for plan in ["padded", "packed"] {
            let (dt, dm) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
            let extra = ["--strategy", strategy, "--batch-plan", plan];
            let t = run(&torch, dt.path(), &extra);
            let m = run(&mlx, dm.path(), &extra);
            assert_eq!(
                t.workload.hash, m.workload.hash,
                "{strategy}/{plan}: same workload"
            );
            assert_eq!(
                t.workload.parameters, m.workload.parameters,
                "{strategy}/{plan}: parameter counts"
            );
            assert_eq!(
                (t.backend.framework.as_str(), m.backend.framework.as_str()),
                ("pytorch", "mlx")
            );
            let (lt, lm) = (&t.metrics.loss_curve, &m.metrics.loss_curve);
            assert_eq!(lt.len(), 8);
            let d = max_rel_diff(lt, lm);
            eprintln!("{strategy}/{plan}: max relative loss difference {d:.2e}");
            assert!(
                d < 1e-3,
                "{strategy}/{plan}: losses differ by {d:.2e}\n pytorch {lt:?}\n mlx     {lm:?}"
            );
        }
    }
}

#[test]
fn the_check_fails_when_one_side_changes() {
    let Some(torch) = pytorch_bin() else { return };
    let mlx = PathBuf::from(env!("CARGO_BIN_EXE_macos_mlx_benchmark"));
    let (dt, dm) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let t = run(&torch, dt.path(), &["--strategy", "full"]);
    let m = run(
        &mlx,
        dm.path(),
        &["--strategy", "full", "--train-on-prompt"],
    );
    assert_ne!(
        t.workload.hash, m.workload.hash,
        "prompt masking is part of the workload"
    );
    let d = max_rel_diff(&t.metrics.loss_curve, &m.metrics.loss_curve);
    assert!(
        d > 1e-3,
        "masking the prompt on one side only must break parity, got {d:.2e}"
    );
}
