//! The measured loop both binaries share. A binary supplies a [`Backend`] (its model, optimizer
//! and one optimizer step); this module owns everything measured: phases, clocks, token counts,
//! the steps log, the summary, progress, signals and the output folders. Keeping it here is what
//! makes a PyTorch figure and an MLX figure mean the same thing.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{anyhow, Context, Result};
use serde::Serialize;

use crate::config::{CliArgs, Config, DTypeChoice, Framework, TuningMode};
use crate::data::batch::Step;
use crate::dist::{self, Rank};
use crate::error::exit;
use crate::interrupt;
use crate::measure::flops::step_flops;
use crate::measure::memory::{self, DeviceKind, MemoryEstimate, Precision};
use crate::measure::peak;
use crate::measure::probe::{self, Software};
use crate::measure::stats::Spread;
use crate::measure::telemetry::{self, Phase, Telemetry};
use crate::model::ParamCounts;
use crate::summary::{
    BackendInfo, MemoryInfo, Metrics, RepeatFigures, Repeats, RunError, RunInfo, Status, Summary,
    WorkloadInfo, SCHEMA_VERSION,
};
use crate::workload::{lr_at, prepare, Prepared};

/// What one optimizer step reports back.
#[derive(Debug, Clone, Copy, Default)]
pub struct StepReport {
    /// Mean loss over the step's loss tokens.
    pub loss: f64,
    /// Global gradient norm before clipping, where computed.
    pub grad_norm: Option<f64>,
}

/// A device memory reading (high-water marks since the backend was built).
#[derive(Debug, Clone, Default)]
pub struct MemoryReading {
    pub peak_allocated_gib: Option<f64>,
    pub peak_reserved_gib: Option<f64>,
    pub source: String,
}

/// What a binary implements: build the model (in the constructor) and run optimizer steps.
pub trait Backend {
    /// Runs one optimizer step: forward and backward over every micro-batch of `step` (loss =
    /// sum of per-token cross-entropy over the step / `step.loss_tokens`), gradient clipping, and
    /// the optimizer update at learning rate `lr`. Must wait for the device to finish everything
    /// the step produced (loss, parameters, optimizer state) before returning, because the caller
    /// reads the clock right after.
    fn train_step(&mut self, step: &Step, lr: f64) -> Result<StepReport>;
    fn memory(&mut self) -> MemoryReading;
    fn info(&self) -> BackendInfo;
    fn parameter_counts(&self) -> ParamCounts;
    fn software(&self) -> Software;
    /// Dense bf16 matrix-product rate measured on this device (TFLOP/s), for `--calibrate`.
    fn calibrate_tflops(&mut self) -> Result<f64>;
    /// Bookkeeping between steps (e.g. sampling device memory), called after the clock read that
    /// closes a step, so it never counts in step time.
    fn after_step(&mut self) {}
    /// Data parallel: the step time every rank agrees on (the slowest rank's). Called after the
    /// clock read, by every rank in the same order.
    fn reduce_step_time(&mut self, dt: f64) -> f64 {
        dt
    }
    /// Data parallel: whether any rank was asked to stop, so all ranks stop at the same step
    /// (a rank that stops alone would leave the others waiting in a collective).
    fn agree_stop(&mut self, stop: bool) -> bool {
        stop
    }
    /// Whether an error is the device running out of memory (for the failure hint). The default
    /// knows CUDA's and MPS's messages ("CUDA out of memory", "MPS backend out of memory") and
    /// Metal's as MLX reports them (`kIOGPUCommandBufferCallbackErrorOutOfMemory`, "Insufficient
    /// Memory", `[metal::malloc]` refusing a buffer); a backend with other messages overrides it.
    fn is_out_of_memory(&self, err: &anyhow::Error) -> bool {
        let s = format!("{err:#}").to_ascii_lowercase();
        [
            "out of memory",
            "outofmemory",
            "insufficient memory",
            "metal::malloc",
        ]
        .iter()
        .any(|k| s.contains(k))
    }
}

/// One step's line in `steps.jsonl`.
#[derive(Debug, Serialize)]
struct StepLog {
    step: usize,
    epoch: usize,
    phase: &'static str,
    loss: f64,
    lr: f64,
    grad_norm: Option<f64>,
    step_time_s: f64,
    elapsed_s: f64,
    samples: usize,
    micro_batches: usize,
    loss_tokens: usize,
    input_tokens: usize,
    padded_tokens: usize,
}

/// What a binary knows about its device before it builds the model: the device it will use and
/// the precision `--dtype` resolves to there. Found by the binary's preflight (see
/// [`main_with_preflight`]); an impossible choice (a device that is absent, a dtype the device
/// lacks) is a `ConfigError`, so the run stops with exit code 2 before anything is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceFacts {
    pub device: DeviceKind,
    pub precision: Precision,
    /// The backend computes only real tokens (variable-length attention), so padding costs no
    /// activation memory.
    pub drops_padding: bool,
    /// The backend rounds every micro-batch's sequence length up to a multiple of this (1: no
    /// rounding), adding padding columns the estimate must count (MLX on CUDA: 128).
    pub seq_multiple: usize,
}

/// The preflight a binary gets when it names none: the device from `--device` (`auto`: CUDA
/// device 0 when NVML sees a GPU, else the CPU) and the precision from `--dtype`.
pub fn default_device_facts(cfg: &Config) -> Result<DeviceFacts> {
    use crate::config::DeviceChoice;
    let device = match cfg.run.device {
        DeviceChoice::Cpu => DeviceKind::Cpu,
        DeviceChoice::Cuda => DeviceKind::Cuda(0),
        DeviceChoice::Mps => DeviceKind::Mps,
        DeviceChoice::Gpu => DeviceKind::MlxGpu,
        DeviceChoice::Auto => {
            if probe::probe_nvidia().is_ok_and(|g| !g.is_empty()) {
                DeviceKind::Cuda(0)
            } else {
                DeviceKind::Cpu
            }
        }
    };
    Ok(DeviceFacts {
        device,
        precision: Precision::resolve(cfg.run.dtype, device.is_gpu()),
        drops_padding: false,
        seq_multiple: 1,
    })
}

/// The whole run for a binary: parse, prepare, build, train, measure, write. Returns the exit code.
pub fn main_with<B: Backend>(
    framework: Framework,
    tuning_mode: TuningMode,
    args: &CliArgs,
    crate_dir: &Path,
    process_start: Instant,
    build: impl Fn(&Config, &Prepared) -> Result<B>,
) -> i32 {
    main_with_preflight(
        framework,
        tuning_mode,
        args,
        crate_dir,
        process_start,
        default_device_facts,
        build,
    )
}

/// [`main_with`] with the binary's own preflight: `preflight` resolves the device and precision
/// without building the model (and without allocating on the device); its `ConfigError`s exit
/// with code 2 before any file is written.
pub fn main_with_preflight<B: Backend>(
    framework: Framework,
    tuning_mode: TuningMode,
    args: &CliArgs,
    crate_dir: &Path,
    process_start: Instant,
    preflight: impl Fn(&Config) -> Result<DeviceFacts>,
    build: impl Fn(&Config, &Prepared) -> Result<B>,
) -> i32 {
    // First, before anything can block or be written: a signal now ends the process at once
    // (see `interrupt`: what a signal does depends on how far the run is).
    let interrupted = interrupt::install();
    let mut cfg = match Config::resolve(tuning_mode, args, framework) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return exit::USAGE;
        }
    };
    if let Err(e) = crate::hooks::check() {
        eprintln!("error: {e}");
        return exit::USAGE;
    }
    let rank = match Rank::from_env() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return exit::USAGE;
        }
    };
    if rank.as_ref().is_some_and(|r| !r.is_leader()) {
        cfg.run.quiet = true; // rank 0 speaks for the run
    }
    let facts = match preflight(&cfg) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: {e:#}");
            return crate::error::exit_code_for(&e);
        }
    };
    if let Err(e) = check_data_parallel_device(&cfg, rank.as_ref(), &facts) {
        eprintln!("error: {e}");
        return exit::USAGE;
    }
    let out_dir = cfg
        .run
        .output_dir
        .clone()
        .unwrap_or_else(|| crate_dir.to_path_buf());
    // A rank started by `--nproc` writes into the run folder its supervisor made (`FTB_RUN_ID`).
    let supervised_run_id = std::env::var("FTB_RUN_ID").ok().filter(|_| rank.is_some());
    // The run folder and the summary must be writable: found now, not after the data has loaded.
    // (`--plan` writes nothing; ranks other than 0 write nothing; a supervised rank 0 writes into
    // the folder its supervisor checked.)
    let writes = !args.plan && rank.as_ref().is_none_or(|r| r.is_leader());
    if writes && supervised_run_id.is_none() {
        if let Err(e) = crate::files::check_output_dir(&out_dir) {
            eprintln!("error: {e}");
            return exit::USAGE;
        }
    }
    if cfg.run.nproc > 1 && rank.is_none() {
        // The supervisor computes nothing itself: a signal is passed on to the ranks (they share
        // the terminal's process group), and this process waits for them.
        interrupt::running();
        return supervise_ranks(&cfg, framework, &out_dir);
    }
    let say = |s: &str| {
        if !cfg.run.quiet {
            eprintln!("{s}");
        }
    };
    let t_data = Instant::now();
    let mut prepared = match prepare(&cfg) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e:#}");
            return crate::error::exit_code_for(&e);
        }
    };
    if let Some(r) = &rank {
        let w = &cfg.workload;
        if let Err(e) = dist::shard_steps(
            &mut prepared.steps,
            &prepared.samples,
            &w.batch,
            w.data.pad_to,
            w.data.train_on_prompt,
            r.rank,
            r.world_size,
        ) {
            eprintln!("error: {e:#}");
            return exit::USAGE;
        }
        prepared.rank = Some(r.clone());
    }
    let leader = prepared.is_leader();
    let data_s = t_data.elapsed().as_secs_f64();
    let p = &prepared;
    say(&format!(
        "workload {}: {} on {} records ({}), {} steps of {} records, {} tokens ({} loss tokens), plan {:?}, strategy {:?}",
        &p.hash[..12],
        p.shape.name,
        p.data.records_used,
        p.data.source,
        p.steps.len(),
        cfg.workload.batch.micro_batch_size * cfg.workload.batch.grad_accum,
        p.steps.iter().map(|s| s.input_tokens).sum::<usize>(),
        p.steps.iter().map(|s| s.loss_tokens).sum::<usize>(),
        cfg.workload.batch.plan,
        cfg.workload.strategy.kind,
    ));
    // Preflight memory estimate: printed first, checked against the device's free memory before
    // the model loads, and kept in the summary next to the measured peak.
    let as_computed;
    let estimate = memory::estimate(
        &p.shape,
        &cfg.workload.strategy,
        facts.precision,
        facts.device,
        if facts.drops_padding {
            as_computed = memory::without_padding(&p.steps);
            &as_computed
        } else if facts.seq_multiple > 1 {
            as_computed = memory::padded_to_multiple(&p.steps, facts.seq_multiple);
            &as_computed
        } else {
            &p.steps
        },
    );
    if args.plan {
        print_plan(&cfg, p, &facts, &estimate);
        warn_if_it_will_not_fit(&cfg, p, &facts, &estimate);
        return exit::OK;
    }
    for line in estimate.lines() {
        say(&line);
    }
    if p.data.without_loss_tokens > 0 {
        eprintln!(
            "warning: {} of {} records keep no loss tokens after truncation to --max-seq-len {}; they cost compute but teach nothing",
            p.data.without_loss_tokens, p.data.records_used, cfg.workload.data.max_seq_len
        );
    }
    if let Err(e) = refuse_beyond_total_memory(&cfg, &facts, &estimate) {
        eprintln!("error: {e}");
        return exit::USAGE;
    }
    warn_if_it_will_not_fit(&cfg, p, &facts, &estimate);
    let repeats = cfg.run.repeats;
    // Until the first step starts, a signal removes the folder this process made and exits.
    let run_id = interrupt::loading(|| {
        match supervised_run_id {
            // `--nproc`: the supervisor made the run folder (and removes it if need be).
            Some(id) => (Some(id), None),
            // Ranks other than 0 write nothing.
            None if !leader => (
                Some(format!("rank-{}", rank.as_ref().map_or(0, |r| r.rank))),
                None,
            ),
            None => match new_run_folder(framework, &out_dir) {
                Some(id) => {
                    let dir = out_dir.join("runs").join(&id);
                    (Some(id), Some(dir))
                }
                None => (None, None),
            },
        }
    });
    let Some(run_id) = run_id else {
        return exit::FAILED;
    };
    let mut summaries = Vec::new();
    let mut code = exit::OK;
    for r in 0..repeats {
        let dir_rel = if repeats > 1 {
            format!("runs/{run_id}/repeat-{}", r + 1)
        } else {
            format!("runs/{run_id}")
        };
        let dir = out_dir.join(&dir_rel);
        // `create_dir`, not `create_dir_all`: the run folder is new, and so is each repeat's.
        if leader && repeats > 1 {
            if let Err(e) = std::fs::create_dir(&dir) {
                eprintln!(
                    "error: cannot create the run folder {}: {e}; pass a writable --output-dir",
                    dir.display()
                );
                return exit::FAILED;
            }
        }
        // Each repeat starts in fresh state: a new backend, built from nothing.
        let start = if r == 0 {
            process_start
        } else {
            Instant::now()
        };
        let data_time = if r == 0 { data_s } else { 0.0 };
        let (summary, c) = run_once(
            &cfg,
            p,
            &build,
            &dir,
            &dir_rel,
            &run_id,
            framework,
            start,
            data_time,
            &interrupted,
        );
        if !leader {
            return c; // rank 0 writes the run folder
        }
        let mut summary = summary;
        summary.metrics.memory.estimated_peak_bytes = Some(estimate.peak_bytes);
        summary.metrics.memory.estimate = Some(estimate.clone());
        if let Some(r) = &rank {
            // Rank 0's figures are aggregates (global tokens over the slowest rank's step time).
            let per_gpu = |v: Option<f64>| v.map(|x| x / r.world_size as f64);
            let m = &summary.metrics;
            let d = serde_json::json!({
                "launcher": if std::env::var_os("FTB_DIST_DIR").is_some() { "--nproc" } else { "environment (RANK, WORLD_SIZE, ...)" },
                "per_gpu_input_tokens_per_s": per_gpu(m.input_tokens_per_s),
                "per_gpu_tokens_per_s": per_gpu(m.tokens_per_s),
                "per_gpu_samples_per_s": per_gpu(m.samples_per_s),
            });
            let details = &mut summary.backend.details;
            match details
                .get_mut("distributed")
                .and_then(|v| v.as_object_mut())
            {
                Some(o) => o.extend(d.as_object().cloned().unwrap_or_default()),
                None => {
                    details.insert("distributed".into(), d);
                }
            }
        }
        if let Err(e) = summary.write(&dir.join("benchmark_summary.json")) {
            eprintln!("error: {e:#}");
            return exit::FAILED;
        }
        summaries.push(summary);
        code = c;
        if code != exit::OK {
            break;
        }
    }
    let mut top = if summaries.len() > 1 {
        combine_repeats(summaries, &run_id)
    } else {
        summaries.pop().expect("one run")
    };
    top.run.run_dir = format!("runs/{run_id}");
    let top_run = out_dir
        .join(&top.run.run_dir)
        .join("benchmark_summary.json");
    for path in [top_run, out_dir.join("benchmark_summary.json")] {
        if let Err(e) = top.write(&path) {
            eprintln!("error: {e:#}");
            return exit::FAILED;
        }
    }
    let m = &top.metrics;
    let fmt = |v: Option<f64>, d: usize| {
        v.map(|x| format!("{x:.d$}"))
            .unwrap_or_else(|| "n/a".into())
    };
    eprintln!(
        "{:?}: {} steps, {} loss tokens/s ({} input tokens/s, {} samples/s) steady; total {:.1} s; MFU {}; peak memory {} GiB; final loss {}{}; summary {}",
        top.status,
        m.steps,
        fmt(m.tokens_per_s, 0),
        fmt(m.input_tokens_per_s, 0),
        fmt(m.samples_per_s, 2),
        m.total_s,
        m.mfu.map(|x| format!("{:.1} %", 100.0 * x)).unwrap_or_else(|| "n/a (no peak for this device)".into()),
        fmt(m.peak_memory_gib, 2),
        fmt(m.final_loss, 4),
        match m.telemetry.as_ref() {
            Some(t) => match (t.joules_per_1k_tokens, primary_utilization(t)) {
                (Some(j), Some((d, u))) => {
                    format!("; {j:.1} J per 1k loss tokens, {d} utilization {u:.0} %")
                }
                (Some(j), None) => format!("; {j:.1} J per 1k loss tokens"),
                (None, Some((d, u))) => format!("; {d} utilization {u:.0} %"),
                (None, None) => String::new(),
            },
            None => String::new(),
        },
        out_dir.join(&top.run.run_dir).join("benchmark_summary.json").display()
    );
    code
}

/// `--nproc N`: starts N ranks of this executable, supervises them, and on a failure names the
/// rank in rank 0's summary. Rank 0 writes the run folder; this process only creates it.
fn supervise_ranks(cfg: &Config, framework: Framework, out_dir: &Path) -> i32 {
    let n = cfg.run.nproc;
    let Some(run_id) = new_run_folder(framework, out_dir) else {
        return exit::FAILED;
    };
    let run_dir = out_dir.join("runs").join(&run_id);
    let beacons = run_dir.join("ranks");
    if let Err(e) = std::fs::create_dir(&beacons) {
        eprintln!("error: cannot create {}: {e}", beacons.display());
        return exit::FAILED;
    }
    let cmds = match dist::free_port().and_then(|p| dist::rank_commands(n, p, &run_id, &beacons)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            return exit::FAILED;
        }
    };
    if !cfg.run.quiet {
        eprintln!(
            "starting {n} ranks (data parallel, NCCL); run folder {}",
            run_dir.display()
        );
    }
    let mut children = Vec::new();
    for (r, mut c) in cmds.into_iter().enumerate() {
        match c.spawn() {
            Ok(ch) => children.push(ch),
            Err(e) => {
                eprintln!("error: starting rank {r}: {e}");
                for mut ch in children {
                    let _ = ch.kill();
                }
                return exit::FAILED;
            }
        }
    }
    let timeout = std::time::Duration::from_secs_f64(cfg.run.dist_timeout_s);
    let grace = timeout + std::time::Duration::from_secs(60);
    let outcome = dist::supervise(&mut children, Some(&beacons), timeout, grace);
    let _ = std::fs::remove_dir_all(&beacons);
    match outcome {
        dist::Outcome::Completed => exit::OK,
        dist::Outcome::Interrupted => {
            // Interrupted before rank 0's first step: nothing measured, nothing to keep.
            if !run_dir.join("benchmark_summary.json").exists() {
                let _ = std::fs::remove_dir_all(&run_dir);
            }
            exit::INTERRUPTED
        }
        dist::Outcome::Failed { rank, reason } => {
            let what = format!("rank {rank} {reason}");
            eprintln!("error: {what}; the run failed");
            let path = run_dir.join("benchmark_summary.json");
            match Summary::read(&path) {
                Ok(mut s) => {
                    let prev = s.error.take();
                    s.status = Status::Failed;
                    s.error = Some(RunError {
                        message: match &prev {
                            Some(p) => format!("{what}; rank 0: {}", p.message),
                            None => what,
                        },
                        steps_completed: prev.as_ref().map_or(s.metrics.steps, |p| p.steps_completed),
                        hint: Some(format!("rank {rank} failed; its output above says why (a collective that waits longer than --dist-timeout fails the run)")),
                    });
                    for p in [path, out_dir.join("benchmark_summary.json")] {
                        if let Err(e) = s.write(&p) {
                            eprintln!("error: {e:#}");
                        }
                    }
                }
                Err(_) => eprintln!(
                    "rank 0 wrote no summary (it was stopped before it could); {} has the steps it logged",
                    run_dir.display()
                ),
            }
            exit::FAILED
        }
    }
}

/// Test hook for the failure handling of data-parallel runs: `FTB_FAULT=RANK:STEP:exit` makes
/// that rank exit with code 3 as it starts that step, `RANK:STEP:hang` makes it stop responding.
fn inject_rank_fault(r: &Rank, step: usize) {
    use crate::hooks::FaultKind;
    let Some(f) = crate::hooks::fault().ok().flatten() else {
        return;
    };
    if f.rank == r.rank && f.step == step {
        eprintln!("FTB_FAULT: rank {} {:?} at step {step}", r.rank, f.kind);
        match f.kind {
            FaultKind::Exit => std::process::exit(3),
            FaultKind::Hang => loop {
                std::thread::sleep(std::time::Duration::from_secs(3600));
            },
        }
    }
}

/// Data parallelism (`--nproc N > 1`, or ranks from a launcher) runs NCCL between CUDA GPUs: any
/// other device is a usage error found before anything is written.
fn check_data_parallel_device(
    cfg: &Config,
    rank: Option<&Rank>,
    facts: &DeviceFacts,
) -> Result<(), crate::error::ConfigError> {
    let world = rank.map_or(cfg.run.nproc, |r| r.world_size);
    if world <= 1 || matches!(facts.device, DeviceKind::Cuda(_)) {
        return Ok(());
    }
    let device = match facts.device {
        DeviceKind::Cpu => "cpu",
        DeviceKind::Mps => "mps",
        DeviceKind::MlxGpu => "gpu (MLX)",
        DeviceKind::Cuda(_) => "cuda",
    };
    Err(crate::error::ConfigError::value(
        if rank.is_some() { "WORLD_SIZE" } else { "nproc" },
        world,
        &format!(
            "data parallelism runs NCCL between CUDA GPUs (PyTorch binary on Linux), and this run's device is {device}"
        ),
        "use --device cuda with one GPU per rank, or --nproc 1",
    ))
}

/// A run whose memory estimate exceeds the device's total memory (not only its free memory) can
/// only fail, and on the host it fails badly: the allocator aborts, or the kernel kills the
/// process, with no summary. Refused before anything is written, unless `--allow-oversubscribe`.
fn refuse_beyond_total_memory(
    cfg: &Config,
    facts: &DeviceFacts,
    estimate: &MemoryEstimate,
) -> Result<(), crate::error::ConfigError> {
    let Some((total, source)) = memory::total_memory(facts.device) else {
        return Ok(());
    };
    if estimate.peak_bytes <= total {
        return Ok(());
    }
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    if cfg.run.allow_oversubscribe {
        eprintln!(
            "warning: the estimated peak memory ({:.2} GiB) exceeds the device's total memory ({:.2} GiB, {source}); starting anyway (--allow-oversubscribe)",
            gib(estimate.peak_bytes),
            gib(total)
        );
        return Ok(());
    }
    Err(crate::error::ConfigError::value(
        "memory estimate",
        format!("{:.2} GiB", gib(estimate.peak_bytes)),
        &format!(
            "above the device's total memory ({:.2} GiB, {source}): the run cannot fit, and would fail or be killed without a summary",
            gib(total)
        ),
        "use a smaller model or micro-batch (--plan shows the estimate and settings that fit), or pass --allow-oversubscribe to start anyway",
    ))
}

/// The device the run computed on and its steady mean utilization (for the closing line).
fn primary_utilization(t: &crate::summary::Telemetry) -> Option<(&str, f64)> {
    let d = crate::report::figures::primary_device(t)?;
    Some((d.id.as_str(), d.utilization_percent?.mean))
}

/// [`create_run_dir`], saying what went wrong on failure.
fn new_run_folder(framework: Framework, out_dir: &Path) -> Option<String> {
    create_run_dir(framework, out_dir)
        .map_err(|e| {
            eprintln!(
                "error: cannot create a run folder under {}: {e}; pass a writable --output-dir",
                out_dir.join("runs").display()
            )
        })
        .ok()
}

/// Creates `<out_dir>/runs/<run-id>/` and returns the id. A run folder is never reused: the
/// folder is made with `create_dir`, which fails if it exists (even when another process made it
/// a moment ago), and then the next counter is tried.
fn create_run_dir(framework: Framework, out_dir: &Path) -> std::io::Result<String> {
    let runs = out_dir.join("runs");
    std::fs::create_dir_all(&runs)?;
    let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%SZ");
    let base = format!("{stamp}-{framework}-{}", std::process::id());
    let mut id = base.clone();
    let mut k = 1;
    loop {
        match std::fs::create_dir(runs.join(&id)) {
            Ok(()) => return Ok(id),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && k < 10_000 => {
                k += 1;
                id = format!("{base}-{k}");
            }
            Err(e) => return Err(e),
        }
    }
}

/// `--plan`: what the run would do, on stdout, without loading the model or writing anything.
fn print_plan(cfg: &Config, p: &Prepared, facts: &DeviceFacts, estimate: &MemoryEstimate) {
    let w = &cfg.workload;
    let mbs: Vec<&crate::data::batch::MicroBatch> =
        p.steps.iter().flat_map(|s| &s.micro_batches).collect();
    let params = p.shape.parameter_counts(&w.strategy);
    println!("workload {}", p.hash);
    println!(
        "model {}: {} blocks, hidden {}, vocabulary {}; {} parameters, {} trainable ({:?})",
        p.shape.name,
        p.shape.num_layers,
        p.shape.hidden_size,
        p.shape.vocab_size,
        params.total,
        params.trainable,
        w.strategy.kind
    );
    println!(
        "data {}: {} records used of {} read ({} bad skipped, {} truncated, {} dropped as overlong)",
        p.data.source,
        p.data.records_used,
        p.data.records_read,
        p.data.bad_records_skipped,
        p.data.truncated,
        p.data.dropped_overlong
    );
    println!(
        "plan {:?}: {} steps, {} micro-batches; {} loss / {} input / {} padded tokens",
        w.batch.plan,
        p.steps.len(),
        mbs.len(),
        p.steps.iter().map(|s| s.loss_tokens).sum::<usize>(),
        p.steps.iter().map(|s| s.input_tokens).sum::<usize>(),
        p.steps.iter().map(|s| s.padded_tokens).sum::<usize>(),
    );
    println!(
        "device {:?}, dtype {}",
        facts.device,
        facts.precision.name()
    );
    for line in estimate.lines() {
        println!("{line}");
    }
    match memory::free_memory(facts.device) {
        Some((free, source)) => println!(
            "free memory {:.2} GiB ({source}): {}",
            free as f64 / (1u64 << 30) as f64,
            if estimate.peak_bytes <= free {
                "the estimate fits"
            } else {
                "the estimate does NOT fit"
            }
        ),
        None => println!("free memory: unknown on this device"),
    }
    if let Some((total, source)) = memory::total_memory(facts.device) {
        println!(
            "total memory {:.2} GiB ({source}){}",
            total as f64 / (1u64 << 30) as f64,
            if estimate.peak_bytes <= total {
                ""
            } else {
                ": the estimate exceeds it; a run refuses to start without --allow-oversubscribe"
            }
        );
    }
}

/// Before loading: warn when the estimate exceeds the device's free memory, naming settings whose
/// estimate fits.
fn warn_if_it_will_not_fit(
    cfg: &Config,
    p: &Prepared,
    facts: &DeviceFacts,
    estimate: &MemoryEstimate,
) {
    let Some((free, source)) = memory::free_memory(facts.device) else {
        return;
    };
    if estimate.peak_bytes <= free {
        return;
    }
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let fits = memory::settings_that_fit(
        cfg,
        &p.shape,
        &p.samples,
        facts.precision,
        facts.device,
        free,
    );
    let advice = if fits.is_empty() {
        "no smaller micro-batch, LoRA or last-n setting fits either; use a device with more memory"
            .to_string()
    } else {
        format!(
            "settings that would fit: {}",
            fits.iter()
                .map(|f| format!("{} (estimated {:.2} GiB)", f.flags, gib(f.peak_bytes)))
                .collect::<Vec<_>>()
                .join("; ")
        )
    };
    eprintln!(
        "warning: the estimated peak memory ({:.2} GiB) exceeds the free memory of the device ({:.2} GiB, {source}); the run may fail with out-of-memory. {advice}",
        gib(estimate.peak_bytes),
        gib(free)
    );
}

#[allow(clippy::too_many_arguments)]
fn run_once<B: Backend>(
    cfg: &Config,
    p: &Prepared,
    build: &impl Fn(&Config, &Prepared) -> Result<B>,
    dir: &Path,
    dir_rel: &str,
    run_id: &str,
    framework: Framework,
    start: Instant,
    data_s: f64,
    interrupted: &AtomicBool,
) -> (Summary, i32) {
    let started_at = chrono::Utc::now().to_rfc3339();
    // The sampler runs for the whole run (load, warm-up, steady, finish) on its own thread; it
    // appends to telemetry.jsonl as it goes. None when --telemetry-interval-ms 0.
    let tel = Telemetry::start(cfg.run.telemetry_interval_ms, dir);
    let t_model = Instant::now();
    let built = build(cfg, p);
    let model_load_s = t_model.elapsed().as_secs_f64();
    // From here a first signal stops the run after the current step, with a summary.
    interrupt::running();
    let mut rec = Recorder::new(cfg, p, dir, p.is_leader());
    let mut backend = match built {
        Ok(b) => b,
        Err(e) => {
            eprintln!("error: building the model failed: {e:#}");
            let mut s = rec.summary::<B>(
                cfg,
                p,
                None,
                framework,
                start,
                data_s,
                model_load_s,
                started_at,
                run_id,
                dir_rel,
                Status::Failed,
                Some(RunError {
                    message: format!("{e:#}"),
                    steps_completed: 0,
                    hint: Some(if format!("{e:#}").to_ascii_lowercase().contains("out of memory") {
                        "out of device memory while loading the model: the weights alone do not fit; use --dtype bf16 (half the bytes of float32 and mixed-bf16) or a device with more free memory (--plan shows the estimate)".into()
                    } else {
                        "the model could not be built or loaded; see the message".into()
                    }),
                }),
            );
            attach_telemetry(&mut s, tel, cfg, p.rank.as_ref());
            return (s, crate::error::exit_code_for(&e));
        }
    };
    let info = backend.info();
    if !cfg.run.quiet {
        let pc = backend.parameter_counts();
        eprintln!(
            "backend {} on {} ({}), dtype {}; parameters {} total, {} trainable",
            info.framework, info.device, info.device_name, info.dtype, pc.total, pc.trainable
        );
    }
    let mut measured_peak = None;
    if cfg.run.calibrate {
        match backend.calibrate_tflops() {
            Ok(t) => measured_peak = Some(t),
            Err(e) => eprintln!("warning: --calibrate failed: {e:#}"),
        }
    }
    let pb = progress_bar(cfg, p.steps.len());
    let total_steps = p.steps.len();
    // Testing hook: fail step K (0-based) as if the device ran out of memory (checked at start).
    let inject_oom_at = crate::hooks::inject_oom_at_step().ok().flatten();
    let mut status = Status::Completed;
    let mut error = None;
    let mut code = exit::OK;
    for step in &p.steps {
        if backend.agree_stop(interrupted.load(Ordering::SeqCst)) {
            status = Status::Interrupted;
            error = Some(RunError {
                message: "interrupted by a signal (Ctrl-C or SIGTERM)".into(),
                steps_completed: rec.losses.len(),
                hint: None,
            });
            code = exit::INTERRUPTED;
            break;
        }
        let lr = lr_at(
            cfg.workload.train.lr,
            step.index,
            cfg.workload.train.lr_warmup_steps,
            total_steps,
        );
        if let Some(r) = &p.rank {
            inject_rank_fault(r, step.index);
        }
        if let Some(t) = &tel {
            // Before the clock starts: an atomic store (and a short lock when the phase changes).
            t.set_phase(if step.index < rec.warmup {
                Phase::Warmup
            } else {
                Phase::Steady
            });
        }
        let t0 = Instant::now();
        let out = if inject_oom_at == Some(step.index) {
            // Testing hook: the failure path of a real out-of-memory, without the memory.
            Err(anyhow!(
                "out of memory (injected by FTB_INJECT_OOM_AT_STEP={} at step {})",
                step.index,
                step.index
            ))
        } else {
            backend.train_step(step, lr)
        };
        // train_step synchronised the device before returning: this clock read closes the step.
        let dt = t0.elapsed().as_secs_f64();
        backend.after_step();
        let dt = backend.reduce_step_time(dt);
        if let Some(r) = &p.rank {
            r.beacon(&format!("step {} done", step.index));
        }
        match out {
            Ok(r) if r.loss.is_finite() => {
                rec.record(step, &r, lr, dt, start);
                if let Some(t) = &tel {
                    t.step_done();
                }
                if let Some(pb) = &pb {
                    pb.set_message(format!(
                        "loss {:.4} | {:.0} tok/s",
                        r.loss,
                        step.input_tokens as f64 / dt
                    ));
                    pb.inc(1);
                }
            }
            Ok(r) => {
                status = Status::Failed;
                error = Some(RunError {
                    message: format!("loss became {} at step {}", r.loss, step.index),
                    steps_completed: rec.losses.len(),
                    hint: Some("lower --lr, or use --dtype float32 to rule out precision".into()),
                });
                code = exit::FAILED;
                break;
            }
            Err(e) => {
                let oom = backend.is_out_of_memory(&e);
                status = Status::Failed;
                error = Some(RunError {
                    message: format!("{e:#}"),
                    steps_completed: rec.losses.len(),
                    hint: Some(if oom {
                        format!("out of device memory at step {} after {} completed steps: lower --max-tokens-per-micro-batch (now {}) or --micro-batch-size, or use --strategy lora / last-n; `--plan` estimates the memory of a setting without running it", step.index, rec.losses.len(), cfg.workload.batch.max_tokens_per_micro_batch)
                    } else {
                        "see the message; the figures cover the steps completed before it".into()
                    }),
                });
                code = exit::FAILED;
                eprintln!("error at step {}: {e:#}", step.index);
                break;
            }
        }
    }
    if let Some(t) = &tel {
        t.set_phase(Phase::Finish);
    }
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    let mem = backend.memory();
    let mut s = rec.summary(
        cfg,
        p,
        Some((&backend, mem)),
        framework,
        start,
        data_s,
        model_load_s,
        started_at,
        run_id,
        dir_rel,
        status,
        error,
    );
    // Data parallel: the model FLOP rate is the ranks' together, so the peak is one GPU's times
    // the world size.
    let world = p.world_size() as f64;
    if let Some(t) = measured_peak {
        s.metrics.measured_peak_tflops = Some(t);
        s.metrics.mfu_measured = s.metrics.model_tflops_per_s.map(|x| x / (t * world));
    }
    attach_telemetry(&mut s, tel, cfg, p.rank.as_ref());
    (s, code)
}

/// Stops the sampler and puts its aggregate into the summary (with notes saying why a figure is
/// null); with telemetry off, says so.
fn attach_telemetry(s: &mut Summary, tel: Option<Telemetry>, cfg: &Config, rank: Option<&Rank>) {
    let Some(tel) = tel else {
        if cfg.run.telemetry_interval_ms == 0 {
            s.notes
                .push("telemetry: null: off (--telemetry-interval-ms 0)".into());
        } else {
            s.notes
                .push("telemetry: null: the sampler thread could not start".into());
        }
        return;
    };
    let recording = tel.finish();
    let cuda_visible = std::env::var("CUDA_VISIBLE_DEVICES").ok();
    // Data parallel on one host: the GPUs of ranks 0..world-1 (their LOCAL_RANK-th entries of the
    // job's CUDA_VISIBLE_DEVICES, which a rank narrows to its own GPU; see FTB_JOB_VISIBLE_DEVICES).
    let job_gpus = rank.map(|r| {
        let list = std::env::var("FTB_JOB_VISIBLE_DEVICES").unwrap_or_default();
        let entries: Vec<String> = list
            .split(',')
            .map(|e| e.trim().to_string())
            .filter(|e| !e.is_empty())
            .collect();
        (0..r.world_size)
            .map(|i| entries.get(i).cloned().unwrap_or_else(|| i.to_string()))
            .collect::<Vec<_>>()
            .join(",")
    });
    let cx = telemetry::aggregate::Context {
        steady_loss_tokens: s.metrics.steady_loss_tokens,
        steady_input_tokens: s.metrics.steady_input_tokens,
        backend_device: &s.backend.device,
        cuda_visible_devices: cuda_visible.as_deref(),
        job_gpus: job_gpus.as_deref(),
    };
    let (t, notes) = telemetry::aggregate::summarize(&recording, &cx);
    s.metrics.telemetry = Some(t);
    s.notes.extend(notes);
}

fn progress_bar(cfg: &Config, n: usize) -> Option<indicatif::ProgressBar> {
    if cfg.run.quiet {
        return None;
    }
    let pb = indicatif::ProgressBar::new(n as u64);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{elapsed_precise} [{bar:30}] {pos}/{len} steps, eta {eta} | {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    Some(pb)
}

/// Accumulates per-step figures and writes `steps.jsonl` as it goes.
struct Recorder {
    log: Option<std::io::BufWriter<std::fs::File>>,
    log_path: PathBuf,
    warmup: usize,
    losses: Vec<f64>,
    times: Vec<f64>,
    first_step_end_s: Option<f64>,
    steps_done: Vec<usize>,
}

impl Recorder {
    fn new(cfg: &Config, p: &Prepared, dir: &Path, write: bool) -> Self {
        let log_path = dir.join("steps.jsonl");
        let log = write
            .then(|| std::fs::File::create(&log_path).ok())
            .flatten()
            .map(std::io::BufWriter::new);
        Self {
            log,
            log_path,
            warmup: cfg.timing_warmup_steps(p.steps.len()),
            losses: Vec::new(),
            times: Vec::new(),
            first_step_end_s: None,
            steps_done: Vec::new(),
        }
    }

    fn record(&mut self, step: &Step, r: &StepReport, lr: f64, dt: f64, start: Instant) {
        let elapsed = start.elapsed().as_secs_f64();
        if self.first_step_end_s.is_none() {
            self.first_step_end_s = Some(elapsed);
        }
        self.losses.push(r.loss);
        self.times.push(dt);
        self.steps_done.push(step.index);
        let line = StepLog {
            step: step.index,
            epoch: step.epoch,
            phase: if step.index < self.warmup {
                "warmup"
            } else {
                "steady"
            },
            loss: r.loss,
            lr,
            grad_norm: r.grad_norm,
            step_time_s: dt,
            elapsed_s: elapsed,
            samples: step.samples,
            micro_batches: step.micro_batches.len(),
            loss_tokens: step.loss_tokens,
            input_tokens: step.input_tokens,
            padded_tokens: step.padded_tokens,
        };
        if let Some(w) = &mut self.log {
            // Flushed per line so an interrupted or crashed run keeps every completed step.
            let ok = serde_json::to_writer(&mut *w, &line).is_ok()
                && w.write_all(b"\n").is_ok()
                && w.flush().is_ok();
            if !ok {
                eprintln!("warning: could not append to {}", self.log_path.display());
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn summary<B: Backend>(
        &self,
        cfg: &Config,
        p: &Prepared,
        backend: Option<(&B, MemoryReading)>,
        framework: Framework,
        start: Instant,
        data_s: f64,
        model_load_s: f64,
        started_at: String,
        run_id: &str,
        dir_rel: &str,
        status: Status,
        error: Option<RunError>,
    ) -> Summary {
        let done: Vec<&Step> = self.steps_done.iter().map(|&i| &p.steps[i]).collect();
        let n = done.len();
        let warmup = self.warmup.min(n);
        let steady: Vec<&Step> = done[warmup..].to_vec();
        let steady_times = &self.times[warmup.min(self.times.len())..];
        let warmup_s: f64 = self.times[..warmup].iter().sum();
        let steady_s: f64 = steady_times.iter().sum();
        let sum = |v: &[&Step], f: fn(&Step) -> usize| v.iter().map(|s| f(s)).sum::<usize>();
        let (loss_t, in_t, pad_t, samp) = (
            sum(&done, |s| s.loss_tokens),
            sum(&done, |s| s.input_tokens),
            sum(&done, |s| s.padded_tokens),
            sum(&done, |s| s.samples),
        );
        let (s_loss, s_in, s_pad, s_samp) = (
            sum(&steady, |s| s.loss_tokens),
            sum(&steady, |s| s.input_tokens),
            sum(&steady, |s| s.padded_tokens),
            sum(&steady, |s| s.samples),
        );
        let rate = |x: usize| (steady_s > 0.0 && !steady.is_empty()).then(|| x as f64 / steady_s);
        let total_s = start.elapsed().as_secs_f64();
        let steady_flops: f64 = steady
            .iter()
            .map(|s| {
                step_flops(
                    &p.shape,
                    &cfg.workload.strategy,
                    &s.doc_lengths,
                    s.loss_tokens,
                )
            })
            .sum();
        let model_tflops =
            (steady_s > 0.0 && !steady.is_empty()).then(|| steady_flops / steady_s / 1e12);
        let (info, params, software, mem) = match &backend {
            Some((b, m)) => (b.info(), b.parameter_counts(), b.software(), m.clone()),
            None => (
                BackendInfo {
                    framework: framework.to_string(),
                    device: "unknown".into(),
                    device_name: "unknown".into(),
                    dtype: format!("{:?}", cfg.run.dtype).to_lowercase(),
                    world_size: 1,
                    details: Default::default(),
                },
                p.shape.parameter_counts(&cfg.workload.strategy),
                probe::software("", ""),
                MemoryReading::default(),
            ),
        };
        let low_precision = info.dtype != "float32";
        let pk = peak::lookup(&info.device_name, low_precision);
        let mut notes = p.notes.clone();
        if pk.is_none() {
            notes.push(format!(
                "mfu: null: no cited peak for device {:?} at {} (see shared/src/measure/peak.rs)",
                info.device_name,
                if low_precision { "bf16" } else { "fp32" }
            ));
        }
        if cfg.run.dtype == DTypeChoice::Auto {
            notes.push(format!("dtype: auto resolved to {}", info.dtype));
        }
        let rss = probe::process_rss_gib();
        let peak_mem = mem
            .peak_reserved_gib
            .or(mem.peak_allocated_gib)
            .or(if info.device == "cpu" { rss } else { None });
        let last10 = &self.losses[self.losses.len().saturating_sub(10)..];
        let metrics = Metrics {
            total_s,
            load_s: data_s + model_load_s,
            data_s,
            model_load_s,
            warmup_s,
            steady_s,
            steps: n,
            warmup_steps: warmup,
            steady_steps: steady.len(),
            samples: samp,
            loss_tokens: loss_t,
            input_tokens: in_t,
            padded_tokens: pad_t,
            padding_fraction: if pad_t > 0 {
                1.0 - in_t as f64 / pad_t as f64
            } else {
                0.0
            },
            steady_samples: s_samp,
            steady_loss_tokens: s_loss,
            steady_input_tokens: s_in,
            steady_padded_tokens: s_pad,
            tokens_per_s: rate(s_loss),
            input_tokens_per_s: rate(s_in),
            samples_per_s: rate(s_samp),
            end_to_end_tokens_per_s: loss_t as f64 / total_s,
            end_to_end_input_tokens_per_s: in_t as f64 / total_s,
            end_to_end_samples_per_s: samp as f64 / total_s,
            time_to_first_step_s: self.first_step_end_s,
            step_time_s: Spread::of(steady_times),
            flops_per_token: (s_in > 0).then(|| steady_flops / s_in as f64),
            model_tflops_per_s: model_tflops,
            mfu: match (&pk, model_tflops) {
                (Some(pk), Some(t)) => Some(t / (pk.tflops * p.world_size() as f64)),
                _ => None,
            },
            peak: pk,
            mfu_measured: None,
            measured_peak_tflops: None,
            peak_memory_gib: peak_mem,
            memory: MemoryInfo {
                device_peak_allocated_gib: mem.peak_allocated_gib,
                device_peak_reserved_gib: mem.peak_reserved_gib,
                source: if mem.source.is_empty() && info.device == "cpu" {
                    "process RSS (CPU run: host memory is device memory)".into()
                } else {
                    mem.source.clone()
                },
                process_peak_rss_gib: rss,
                estimated_peak_bytes: None,
                estimate: None,
            },
            first_loss: self.losses.first().copied(),
            final_loss: self.losses.last().copied(),
            final_loss_avg10: (!last10.is_empty())
                .then(|| last10.iter().sum::<f64>() / last10.len() as f64),
            loss_curve: self.losses.clone(),
            telemetry: None,
        };
        Summary {
            schema_version: SCHEMA_VERSION,
            status,
            error,
            run: RunInfo {
                run_id: run_id.to_string(),
                binary: match framework {
                    Framework::Pytorch => "windows_pytorch_benchmark".into(),
                    Framework::Mlx => "macos_mlx_benchmark".into(),
                },
                started_at,
                finished_at: chrono::Utc::now().to_rfc3339(),
                command_line: std::env::args().collect(),
                run_dir: dir_rel.to_string(),
            },
            workload: WorkloadInfo {
                hash: p.hash.clone(),
                config: cfg.workload.clone(),
                model_shape: p.shape.clone(),
                parameters: params,
                data: p.data.clone(),
                steps_planned: p.steps.len(),
                samples_per_step: cfg.workload.batch.micro_batch_size
                    * cfg.workload.batch.grad_accum,
            },
            backend: info,
            hardware: probe::probe_hardware(),
            software,
            metrics,
            repeats: None,
            notes,
        }
    }
}

/// The median repeat (by `tokens_per_s`) becomes the headline; every repeat's figures are kept.
fn combine_repeats(mut runs: Vec<Summary>, run_id: &str) -> Summary {
    let figs: Vec<RepeatFigures> = runs
        .iter()
        .enumerate()
        .map(|(i, s)| RepeatFigures {
            repeat: i + 1,
            run_dir: s.run.run_dir.clone(),
            status: s.status,
            tokens_per_s: s.metrics.tokens_per_s,
            input_tokens_per_s: s.metrics.input_tokens_per_s,
            samples_per_s: s.metrics.samples_per_s,
            total_s: s.metrics.total_s,
            step_time_median_s: s.metrics.step_time_s.map(|x| x.median),
            mfu: s.metrics.mfu,
            peak_memory_gib: s.metrics.peak_memory_gib,
            final_loss: s.metrics.final_loss,
        })
        .collect();
    let mut order: Vec<usize> = (0..runs.len()).collect();
    order.sort_by(|&a, &b| {
        runs[a]
            .metrics
            .tokens_per_s
            .unwrap_or(0.0)
            .total_cmp(&runs[b].metrics.tokens_per_s.unwrap_or(0.0))
    });
    let median = order[(order.len() - 1) / 2];
    let spread = |f: fn(&RepeatFigures) -> Option<f64>| {
        Spread::of(&figs.iter().filter_map(f).collect::<Vec<_>>())
    };
    let reps = Repeats {
        count: runs.len(),
        median_repeat: median + 1,
        tokens_per_s: spread(|r| r.tokens_per_s),
        input_tokens_per_s: spread(|r| r.input_tokens_per_s),
        total_s: spread(|r| Some(r.total_s)),
        runs: figs,
    };
    let mut top = runs.swap_remove(median);
    top.run.run_id = run_id.to_string();
    top.notes.push(format!("repeats: {} runs in fresh state; metrics are those of the median run by tokens_per_s (repeat {})", reps.count, reps.median_repeat));
    top.repeats = Some(reps);
    top
}

/// Reads the `steps.jsonl` of a run folder (tests and reports).
///
/// The log is the one file not written atomically: it is appended and flushed a line per step, so
/// that a crash keeps every completed step. A process killed in the middle of an append leaves a
/// last line without its newline; that torn line is left out, while a bad line anywhere else is an
/// error naming the file and the line.
pub fn read_steps(run_dir: &Path) -> Result<Vec<serde_json::Value>> {
    let path = run_dir.join("steps.jsonl");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let torn = !text.is_empty() && !text.ends_with('\n');
    let lines: Vec<(usize, &str)> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .collect();
    let last = lines.last().map(|(i, _)| *i);
    let mut out = Vec::with_capacity(lines.len());
    for (i, l) in lines {
        match serde_json::from_str(l) {
            Ok(v) => out.push(v),
            Err(_) if torn && Some(i) == last => {}
            Err(e) => anyhow::bail!(
                "{}: line {}: not a step record ({e})",
                path.display(),
                i + 1
            ),
        }
    }
    Ok(out)
}
