//! Failures at the backend boundary and the files a run leaves, through the shared runner with a
//! fake backend (no framework needed): an out-of-memory error mid-run writes a `failed` summary
//! with the error, the step reached, the figures so far and a hint, and exits 1; summaries are
//! ordinary files and a damaged one is named with the field at fault.

use std::path::Path;
use std::time::Instant;

use anyhow::{anyhow, Result};
use shared::config::{CliArgs, Config, DeviceChoice, Framework, Preset, TuningMode};
use shared::data::batch::Step;
use shared::measure::probe::{self, Software};
use shared::model::ParamCounts;
use shared::runner::{main_with, Backend, Calibration, MemoryReading, StepReport};
use shared::summary::{BackendInfo, Status, Summary};
use shared::workload::Prepared;

/// A backend that "trains" by returning a falling loss, and fails at `fail_at` with `error`.
struct Fake {
    counts: ParamCounts,
    steps: usize,
    fail_at: Option<usize>,
    error: &'static str,
    /// Recognise the error as out-of-memory by its own rule (as an MLX/Metal backend would).
    custom_oom: bool,
    /// Work still queued on the "device" when the build returns (CUDA's is asynchronous):
    /// `synchronize` waits for it.
    queued_ms: u64,
}

impl Backend for Fake {
    fn train_step(&mut self, step: &Step, _lr: f64) -> Result<StepReport> {
        if self.fail_at == Some(step.index) {
            return Err(anyhow!(self.error));
        }
        self.steps += 1;
        std::thread::sleep(std::time::Duration::from_millis(2));
        Ok(StepReport {
            loss: 10.0 / (1.0 + step.index as f64),
            grad_norm: Some(1.0),
            micro_batches_run: None,
        })
    }
    fn memory(&mut self) -> MemoryReading {
        MemoryReading::default()
    }
    fn info(&self) -> BackendInfo {
        BackendInfo {
            framework: "fake".into(),
            device: "cpu".into(),
            device_name: "fake cpu".into(),
            dtype: "float32".into(),
            world_size: 1,
            details: Default::default(),
        }
    }
    fn parameter_counts(&self) -> ParamCounts {
        self.counts
    }
    fn software(&self) -> Software {
        probe::software("fake", "fake")
    }
    fn calibrate_tflops(&mut self) -> Result<Calibration> {
        Ok(Calibration {
            tflops: 1.0,
            precision: "fp32".into(),
            size: 1,
        })
    }
    fn notes(&self) -> Vec<String> {
        vec!["fake: the backend's own note".into()]
    }
    fn synchronize(&mut self) {
        std::thread::sleep(std::time::Duration::from_millis(self.queued_ms));
        self.queued_ms = 0;
    }
    fn is_out_of_memory(&self, err: &anyhow::Error) -> bool {
        if self.custom_oom {
            format!("{err:#}").contains("MTLBuffer")
        } else {
            let s = format!("{err:#}").to_ascii_lowercase();
            s.contains("out of memory")
        }
    }
}

fn args(out: &Path) -> CliArgs {
    CliArgs {
        preset: Some(Preset::Tiny),
        device: Some(DeviceChoice::Cpu),
        quiet: true,
        samples: Some(48),
        micro_batch_size: Some(4),
        grad_accum: Some(2),
        max_seq_len: Some(256),
        max_tokens_per_micro_batch: Some(1024),
        max_steps: Some(5),
        output_dir: Some(out.to_path_buf()),
        ..Default::default()
    }
}

fn run_fake(out: &Path, fail_at: Option<usize>, error: &'static str, custom_oom: bool) -> i32 {
    run_fake_queued(out, fail_at, error, custom_oom, 0)
}

fn run_fake_queued(
    out: &Path,
    fail_at: Option<usize>,
    error: &'static str,
    custom_oom: bool,
    queued_ms: u64,
) -> i32 {
    main_with(
        Framework::Pytorch,
        TuningMode::Fast,
        &args(out),
        out,
        Instant::now(),
        |cfg: &Config, p: &Prepared| {
            Ok(Fake {
                counts: p.shape.parameter_counts(&cfg.workload.strategy),
                steps: 0,
                fail_at,
                error,
                custom_oom,
                queued_ms,
            })
        },
    )
}

/// The load time is read after the device finished loading: the runner waits for the backend's
/// queued work before it stops the load clock (the fake's build returns with 300 ms still queued,
/// as a CUDA build returns before its copies and kernels finish).
#[test]
fn the_load_time_includes_the_work_the_device_still_had_queued() {
    let d = tempfile::tempdir().unwrap();
    assert_eq!(run_fake_queued(d.path(), None, "", false, 300), 0);
    let s = Summary::read(&d.path().join("benchmark_summary.json")).unwrap();
    assert!(s.metrics.model_load_s >= 0.3, "{}", s.metrics.model_load_s);
    assert!(s.metrics.load_s >= s.metrics.model_load_s);
    // And the first step does not pay for it.
    let steps = shared::files::read_steps(&d.path().join(&s.run.run_dir)).unwrap();
    let first = steps[0]["step_time_s"].as_f64().unwrap();
    assert!(first < 0.3, "the first step took {first} s");
}

/// What a backend notes about its figures (`Backend::notes`, e.g. MLX's kernels compiled in the
/// first steps) is in the summary's notes, of a completed run and of a failed one.
#[test]
fn the_backends_notes_reach_the_summary() {
    for fail_at in [None, Some(2)] {
        let d = tempfile::tempdir().unwrap();
        run_fake(d.path(), fail_at, "boom", false);
        let s = Summary::read(&d.path().join("benchmark_summary.json")).unwrap();
        assert!(
            s.notes.iter().any(|n| n == "fake: the backend's own note"),
            "{fail_at:?}: {:?}",
            s.notes
        );
    }
}

const CUDA_OOM: &str =
    "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 139.8 GiB total capacity)";

#[test]
fn out_of_memory_mid_run_writes_a_failed_summary_with_a_hint() {
    let d = tempfile::tempdir().unwrap();
    let code = run_fake(d.path(), Some(3), CUDA_OOM, false);
    assert_eq!(code, 1, "a failed run exits 1");
    let s = Summary::read(&d.path().join("benchmark_summary.json")).unwrap();
    assert_eq!(s.status, Status::Failed);
    let e = s.error.as_ref().expect("the error is in the summary");
    assert!(e.message.contains("CUDA out of memory"), "{}", e.message);
    assert_eq!(e.steps_completed, 3, "the step reached");
    let hint = e.hint.as_deref().unwrap();
    assert!(
        hint.contains("out of device memory")
            && hint.contains("--max-tokens-per-micro-batch")
            && hint.contains("lora"),
        "{hint}"
    );
    // The figures so far: three steps measured, their losses, tokens and times.
    assert_eq!(s.metrics.steps, 3);
    assert_eq!(s.metrics.loss_curve, vec![10.0, 5.0, 10.0 / 3.0]);
    assert!(s.metrics.loss_tokens > 0 && s.metrics.total_s > 0.0);
    assert_eq!(s.workload.steps_planned, 5);
    // The preflight estimate is kept beside the (absent) measured peak.
    let est = s.metrics.memory.estimate.as_ref().unwrap();
    assert_eq!(s.metrics.memory.estimated_peak_bytes, Some(est.peak_bytes));
    assert!(est.peak_bytes > est.weights_bytes);
    // The run folder holds the same summary and the completed steps' log.
    let run_dir = d.path().join(&s.run.run_dir);
    assert_eq!(shared::files::read_steps(&run_dir).unwrap().len(), 3);
    let in_run = Summary::read(&run_dir.join("benchmark_summary.json")).unwrap();
    assert_eq!(in_run.status, Status::Failed);
}

#[test]
fn an_error_the_backend_calls_out_of_memory_gets_the_memory_hint() {
    // The backend decides what is an out-of-memory error (Metal says it differently).
    let d = tempfile::tempdir().unwrap();
    let code = run_fake(
        d.path(),
        Some(0),
        "[metal::malloc] Resource limit exceeded: MTLBuffer",
        true,
    );
    assert_eq!(code, 1);
    let s = Summary::read(&d.path().join("benchmark_summary.json")).unwrap();
    let e = s.error.unwrap();
    assert_eq!(e.steps_completed, 0);
    assert!(e.hint.unwrap().contains("out of device memory"));
    // Another error keeps the generic hint.
    let d = tempfile::tempdir().unwrap();
    assert_eq!(run_fake(d.path(), Some(1), "shape mismatch", true), 1);
    let s = Summary::read(&d.path().join("benchmark_summary.json")).unwrap();
    assert!(!s.error.unwrap().hint.unwrap().contains("memory"));
}

#[test]
fn completed_run_files_are_ordinary_and_runs_are_not_reused() {
    let d = tempfile::tempdir().unwrap();
    assert_eq!(run_fake(d.path(), None, "", false), 0);
    assert_eq!(run_fake(d.path(), None, "", false), 0);
    let runs: Vec<_> = std::fs::read_dir(d.path().join("runs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(runs.len(), 2, "two runs, two folders");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for p in [
            d.path().join("benchmark_summary.json"),
            runs[0].join("benchmark_summary.json"),
        ] {
            let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o644, "{}: {mode:o}", p.display());
        }
    }
    // No temporary file is left beside the summary.
    let names: Vec<String> = std::fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        {
            let mut n = names.clone();
            n.sort();
            n
        },
        vec!["benchmark_summary.json".to_string(), "runs".to_string()],
        "{names:?}"
    );
}

#[test]
fn reading_a_damaged_summary_names_the_file_and_the_field() {
    let d = tempfile::tempdir().unwrap();
    assert_eq!(run_fake(d.path(), None, "", false), 0);
    let good = d.path().join("benchmark_summary.json");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&good).unwrap()).unwrap();

    let write = |name: &str, v: &serde_json::Value| {
        let p = d.path().join(name);
        std::fs::write(&p, serde_json::to_string(v).unwrap()).unwrap();
        p
    };
    // A missing field: the file, where, and which field, in the plain message.
    let mut missing = v.clone();
    missing["metrics"]
        .as_object_mut()
        .unwrap()
        .remove("steady_s");
    let p = write("missing.json", &missing);
    let msg = Summary::read(&p).unwrap_err().to_string();
    assert!(
        msg.contains(&p.display().to_string())
            && msg.contains("metrics")
            && msg.contains("steady_s"),
        "{msg}"
    );
    // A wrongly typed field.
    let mut typed = v.clone();
    typed["metrics"]["steps"] = serde_json::json!("three");
    let p = write("typed.json", &typed);
    let msg = Summary::read(&p).unwrap_err().to_string();
    assert!(
        msg.contains(&p.display().to_string()) && msg.contains("metrics.steps"),
        "{msg}"
    );
    // Broken invariants: named too.
    let mut bad = v.clone();
    bad["metrics"]["loss_curve"] = serde_json::json!([]);
    let p = write("invalid.json", &bad);
    let msg = Summary::read(&p).unwrap_err().to_string();
    assert!(
        msg.contains(&p.display().to_string()) && msg.contains("loss_curve"),
        "{msg}"
    );
    // Not JSON at all.
    let p = d.path().join("truncated.json");
    std::fs::write(&p, "{\"schema_version\": 1, \"status\"").unwrap();
    let msg = Summary::read(&p).unwrap_err().to_string();
    assert!(
        msg.contains(&p.display().to_string()) && msg.contains("not valid JSON"),
        "{msg}"
    );
    // A summary written before the memory estimate existed still reads.
    let mut old = v.clone();
    let m = old["metrics"]["memory"].as_object_mut().unwrap();
    m.remove("estimate");
    m.remove("estimated_peak_bytes");
    let p = write("old.json", &old);
    let s = Summary::read(&p).unwrap();
    assert!(s.metrics.memory.estimate.is_none());
}

/// The estimate of the current code against allocated peaks measured on a GPU, from summaries
/// committed under `benchmarks/`: the runs whose step the code has not changed since (the head
/// chunked, with checkpointing: `h100-2026-12-05/call1`, bf16, 4,096 synthetic records, 16k-token
/// micro-batches). Measured there: qwen3-1.7b full 16.50 GiB, phi-3-mini LoRA 10.98, qwen3-0.6b
/// full 7.49; estimated 15.74, 11.18, 6.78 (-4.6 %, +1.8 %, -9.6 %). Each must stay within 10 %
/// (issue 15). An earlier version of this test compared the H200 runs of 2026-11-28, which predate
/// the chunked head of every step (their step kept every loss position's logits).
#[test]
fn estimate_is_near_the_peaks_measured_on_a_gpu() {
    use clap::Parser;
    use shared::measure::memory::{estimate, DeviceKind, Precision};
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: CliArgs,
    }
    let root =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../benchmarks/h100-2026-12-05/call1/runs");
    if !root.exists() {
        eprintln!("skipped: {} is absent", root.display());
        return;
    }
    for run in ["pt_q17_full_ck", "pt_lora_ck", "pt_q06_full_ck"] {
        let path = root.join(run).join("benchmark_summary.json");
        let measured = Summary::read(&path).unwrap_or_else(|e| panic!("{e:#}"));
        let cli = Cli::try_parse_from(&measured.run.command_line).unwrap();
        let cfg = Config::resolve(TuningMode::Fast, &cli.args, Framework::Pytorch).unwrap();
        let p = shared::workload::prepare(&cfg).unwrap();
        assert_eq!(cfg.workload, measured.workload.config, "{run}");
        assert_eq!(p.steps.len(), measured.workload.steps_planned, "{run}");
        // The device computes real tokens only (flash attention's varlen path), as the run did.
        let steps = shared::measure::memory::without_padding(&p.steps);
        let e = estimate(
            &p.shape,
            &cfg.workload.strategy,
            Precision::Bf16,
            DeviceKind::Cuda(0),
            &steps,
        );
        let peak = measured.metrics.memory.device_peak_allocated_gib.unwrap();
        let est = e.peak_bytes as f64 / (1u64 << 30) as f64;
        let ratio = est / peak;
        eprintln!(
            "{run}: estimated {est:.2} GiB, measured {peak:.2} GiB ({:+.1} %)",
            100.0 * (ratio - 1.0)
        );
        assert!((ratio - 1.0).abs() < 0.10, "{run}: ratio {ratio:.3}");
    }
}

/// The steps log is appended line by line; a line torn by a kill mid-append is left out, any other
/// bad line is an error naming the file and the line.
#[test]
fn a_torn_last_line_of_the_steps_log_is_left_out() {
    let d = tempfile::tempdir().unwrap();
    let log = d.path().join("steps.jsonl");
    std::fs::write(&log, "{\"step\":0}\n{\"step\":1}\n{\"step\":2,\"lo").unwrap();
    let steps = shared::files::read_steps(d.path()).unwrap();
    assert_eq!(steps.len(), 2);
    std::fs::write(&log, "{\"step\":0}\nnot json\n{\"step\":2}\n").unwrap();
    let msg = shared::files::read_steps(d.path()).unwrap_err().to_string();
    assert!(
        msg.contains("steps.jsonl") && msg.contains("line 2"),
        "{msg}"
    );
}
