//! The measured loop both binaries share. A binary supplies a [`Backend`] (its model, optimizer
//! and one optimizer step); this module owns everything measured: phases, clocks, token counts,
//! the steps log, the summary, progress, signals and the output folders. Keeping it here is what
//! makes a PyTorch figure and an MLX figure mean the same thing.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{anyhow, Result};
use serde::Serialize;

use crate::config::{CliArgs, Config, DTypeChoice, Framework, StrategyConfig, TuningMode};
use crate::data::batch::Step;
use crate::dist::{self, Rank};
use crate::error::exit;
use crate::interrupt;
use crate::measure::flops::{step_flops, step_hardware_flops};
use crate::measure::memory::{self, DeviceKind, MemoryEstimate, Precision};
use crate::measure::peak;
use crate::measure::probe::{self, Software};
use crate::measure::stats::Spread;
use crate::measure::steady::{self, StepFigures};
use crate::measure::telemetry::nvidia::ProcessMemoryPeak;
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
    /// Micro-batches the backend ran. Every backend skips a micro-batch without loss tokens (its
    /// loss and gradients are zero), so this is the step's micro-batches with loss tokens; the
    /// runner checks it against the plan, whose FLOP count assumes so. `None`: not counted.
    pub micro_batches_run: Option<usize>,
}

/// A backend's device memory reading: high-water marks since the backend was built (each repeat
/// builds a new one). Each figure comes with its source, or, when null, the reason; see
/// [`crate::summary::MemoryInfo`] for what each means.
#[derive(Debug, Clone, Default)]
pub struct MemoryReading {
    /// The framework's peak of live tensors/arrays.
    pub allocated_gib: Option<f64>,
    pub allocated_source: String,
    /// The most the framework held from the device (allocated + its cache).
    pub reserved_gib: Option<f64>,
    pub reserved_source: String,
    /// The driver's figure for this process, where the backend reads one itself (on NVIDIA GPUs
    /// the runner reads NVML for every backend).
    pub process_gib: Option<f64>,
    pub process_source: String,
}

/// A `--calibrate` measurement: the dense matrix-product rate of the device in the run's own
/// compute precision.
#[derive(Debug, Clone, PartialEq)]
pub struct Calibration {
    pub tflops: f64,
    /// `bf16` or `fp32`: what the products ran in.
    pub precision: String,
    /// n of the n x n x n products timed.
    pub size: usize,
}

/// `--calibrate`'s product size: n x n x n with n = 8192 on a GPU, 1024 on the CPU.
pub fn calibration_size(on_gpu: bool) -> usize {
    if on_gpu {
        8192
    } else {
        1024
    }
}

/// `--calibrate`'s timing, the same in both binaries: 3 untimed products, then the mean of 10 timed
/// ones, in TFLOP/s (2 n^3 FLOPs a product). `product` runs one n x n x n product; `sync` waits
/// until the device has finished what was launched (a no-op where `product` already waits).
pub fn time_products(
    n: usize,
    mut product: impl FnMut() -> Result<()>,
    mut sync: impl FnMut() -> Result<()>,
) -> Result<f64> {
    for _ in 0..3 {
        product()?;
    }
    sync()?;
    let runs = 10;
    let t0 = Instant::now();
    for _ in 0..runs {
        product()?;
    }
    sync()?;
    let mean_s = t0.elapsed().as_secs_f64() / f64::from(runs);
    Ok(2.0 * (n as f64).powi(3) / mean_s / 1e12)
}

/// The precision `--calibrate` must measure in for a run of this dtype: the precision its matrix
/// products run in (bf16 for `bf16` and `mixed-bf16`, fp32 for `float32`).
pub fn calibration_precision(dtype: &str) -> &'static str {
    if dtype == "float32" {
        "fp32"
    } else {
        "bf16"
    }
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
    /// Dense matrix-product rate measured on this device, for `--calibrate`, in the run's own
    /// compute precision ([`calibration_precision`] of its dtype).
    fn calibrate_tflops(&mut self) -> Result<Calibration>;
    /// Waits until the device has finished the work queued so far (the model's weights after the
    /// build: CUDA copies and kernels are asynchronous), so the clock read after it measures the
    /// load.
    fn synchronize(&mut self) {}
    /// Data parallel: every rank's value of `v`, in rank order (called by every rank in the same
    /// order); `None` for a single process.
    fn gather_f64(&mut self, _v: f64) -> Option<Vec<f64>> {
        None
    }
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
    /// What the backend knows about this run's figures that the figures cannot say (e.g. a
    /// one-off cost inside them), added to the summary's notes; none by default.
    fn notes(&self) -> Vec<String> {
        Vec::new()
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
    /// Micro-batches the backend ran (those with loss tokens), where it says.
    micro_batches_run: Option<usize>,
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
    /// What the backend's queued, not yet run GPU work can hold beyond the live tensors (MLX on
    /// CUDA keeps every input of a queued graph until it has run); it must be free too, but is no
    /// part of the live-tensor peak the estimate is compared with. 0 for PyTorch.
    pub queued_work_bytes: u64,
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
        queued_work_bytes: 0,
    })
}

/// The device `--fit` sizes runs for, whatever this machine has: PyTorch on a CUDA card, MLX
/// on an Apple GPU, both in bf16, with what each binary's preflight says there (MLX on Metal
/// computes real tokens only and rounds sequence lengths to 32: `macos_mlx_benchmark`'s
/// `Tuning::default_for(Metal)`, which a test there checks against this).
pub fn fit_device_facts(framework: Framework) -> DeviceFacts {
    match framework {
        Framework::Pytorch => DeviceFacts {
            device: DeviceKind::Cuda(0),
            precision: Precision::Bf16,
            drops_padding: false,
            seq_multiple: 1,
            queued_work_bytes: 0,
        },
        Framework::Mlx => DeviceFacts {
            device: DeviceKind::MlxGpu,
            precision: Precision::Bf16,
            drops_padding: true,
            seq_multiple: 32,
            queued_work_bytes: 0,
        },
    }
}

/// A benchmark binary's command line: shared's flags ([`CliArgs`]) under the binary's name,
/// version and description. A bad flag exits here with clap's usage error (code 2); `--help` and
/// `--version` print and exit 0.
pub fn parse_args(name: &'static str, version: &'static str, about: &'static str) -> CliArgs {
    use clap::{Args, Command, FromArgMatches};
    // After `augment_args`, which sets CliArgs's own doc comment as the description.
    let matches = CliArgs::augment_args(Command::new(name))
        .version(version)
        .about(about)
        .long_about(None)
        .get_matches();
    CliArgs::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
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
    let writes = !args.plan && !args.fit && rank.as_ref().is_none_or(|r| r.is_leader());
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
    let estimate = estimate_as_run(
        framework,
        &p.shape,
        &facts,
        &cfg.workload.strategy,
        &p.steps,
    );
    if args.fit {
        let facts = fit_device_facts(framework);
        let targets = crate::measure::fit::targets(framework);
        let estimate = |shape: &crate::model::ModelShape, s: &StrategyConfig, steps: &[Step]| {
            estimate_as_run(framework, shape, &facts, s, steps)
        };
        let rows = crate::measure::fit::fit_rows(&cfg, &p.samples, &targets, &estimate);
        print!(
            "{}",
            crate::measure::fit::markdown(framework, &cfg, &rows, &targets)
        );
        return exit::OK;
    }
    if args.plan {
        print_plan(&cfg, p, &facts, &estimate);
        warn_if_it_will_not_fit(framework, &cfg, p, &facts, &estimate);
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
    warn_if_it_will_not_fit(framework, &cfg, p, &facts, &estimate);
    // Too few steady steps: say so before the run, so nobody waits for figures that will not be
    // reliable (the summary's `steady:` note says it again).
    let planned_warmup = cfg.timing_warmup_steps(p.steps.len());
    let planned_steady = p.steps.len() - planned_warmup;
    let warned_steady = planned_steady < steady::MIN_RELIABLE_STEADY_STEPS;
    if warned_steady && leader {
        eprintln!(
            "warning: this run has {} step(s), {planned_warmup} of them warm-up: {planned_steady} steady step(s), fewer than {}, so its steady figures will not be reliable; run more steps (more --samples, or fewer records per step with --micro-batch-size/--grad-accum)",
            p.steps.len(),
            steady::MIN_RELIABLE_STEADY_STEPS
        );
    }
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
    // Everything before the first model build (process start, preflight, data preparation, the
    // estimate), measured once: every repeat's end-to-end figures include it, so all repeats count
    // the same things.
    let before_build_s = process_start.elapsed().as_secs_f64();
    let before = BeforeBuild {
        startup_s: (before_build_s - data_s).max(0.0),
        data_s,
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
        // Each repeat builds a new backend from nothing (see `REPEAT_STATE` for what the process
        // keeps between repeats).
        let (summary, c) = run_once(
            &cfg,
            p,
            &build,
            &dir,
            &dir_rel,
            &run_id,
            framework,
            before,
            &interrupted,
        );
        if !leader {
            return c; // rank 0 writes the run folder
        }
        let mut summary = summary;
        attach_estimate(&mut summary, &estimate);
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
            merge_distributed_details(&mut summary, d);
        }
        if summary.metrics.steady_steps < steady::MIN_RELIABLE_STEADY_STEPS && !warned_steady {
            // Fewer steady steps than planned (an interrupt, a failure).
            if let Some(n) = summary.notes.iter().find(|n| n.starts_with("steady:")) {
                eprintln!("warning: {n}");
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
        combine_repeats(summaries, &run_id, framework)
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
    let mem = &m.memory;
    let memory_line = match (mem.device_peak_allocated_gib, mem.device_process_peak_gib) {
        (Some(a), Some(p)) => {
            format!("peak memory {a:.2} GiB allocated, {p:.2} GiB process (driver)")
        }
        (Some(a), None) => format!("peak memory {a:.2} GiB allocated"),
        (None, Some(p)) => format!("peak memory {p:.2} GiB process (driver)"),
        (None, None) => format!("peak RSS {} GiB (host)", fmt(mem.process_peak_rss_gib, 2)),
    };
    eprintln!(
        "{:?}: {} steps, {} loss tokens/s ({} input tokens/s, {} samples/s) steady; total {:.1} s; MFU {}; {memory_line}; final loss {}{}; summary {}",
        top.status,
        m.steps,
        fmt(m.tokens_per_s, 0),
        fmt(m.input_tokens_per_s, 0),
        fmt(m.samples_per_s, 2),
        m.total_s,
        match (m.mfu, m.hfu) {
            (Some(x), Some(h)) if h > x => format!("{:.1} % (HFU {:.1} % with the recomputation)", 100.0 * x, 100.0 * h),
            (Some(x), _) => format!("{:.1} %", 100.0 * x),
            (None, _) => "n/a (no peak for this device)".into(),
        },
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

/// The time before the first model build, measured once and charged to every repeat.
#[derive(Debug, Clone, Copy)]
struct BeforeBuild {
    /// Process start to the first build, data preparation excepted.
    startup_s: f64,
    data_s: f64,
}

impl BeforeBuild {
    fn total_s(self) -> f64 {
        self.startup_s + self.data_s
    }
}

/// The preflight estimate beside the measured peak: its bytes, its breakdown and its error
/// against the framework's allocated peak (or a note saying why there is none).
fn attach_estimate(s: &mut Summary, estimate: &MemoryEstimate) {
    let mem = &mut s.metrics.memory;
    mem.estimated_peak_bytes = Some(estimate.peak_bytes);
    mem.estimate = Some(estimate.clone());
    mem.estimate_error = memory::estimate_error(estimate.peak_bytes, mem.device_peak_allocated_gib);
    match mem.estimate_error {
        Some(e) => s.notes.push(format!(
            "memory: estimate {:.2} GiB vs allocated peak {:.2} GiB: {:+.1} %",
            estimate.peak_gib(),
            mem.device_peak_allocated_gib.unwrap_or_default(),
            100.0 * e
        )),
        None => s.notes.push(format!(
            "memory.estimate_error: null: no allocated peak to compare the estimate with ({})",
            mem.device_peak_allocated_source
        )),
    }
}

/// Adds `d`'s keys to `backend.details.distributed`.
fn merge_distributed_details(summary: &mut Summary, d: serde_json::Value) {
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
    let d = t.primary_device()?;
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
        "plan {:?}: {} steps of {} records ({} x {}), {} micro-batches; {} loss / {} input / {} padded tokens",
        w.batch.plan,
        p.steps.len(),
        w.batch.micro_batch_size * w.batch.grad_accum,
        w.batch.micro_batch_size,
        w.batch.grad_accum,
        mbs.len(),
        p.steps.iter().map(|s| s.loss_tokens).sum::<usize>(),
        p.steps.iter().map(|s| s.input_tokens).sum::<usize>(),
        p.steps.iter().map(|s| s.padded_tokens).sum::<usize>(),
    );
    if let Some(n) = &cfg.run.batch_note {
        println!("{n}");
    }
    let warmup = cfg.timing_warmup_steps(p.steps.len());
    println!(
        "timing: {warmup} warm-up step(s) + {} steady step(s){}",
        p.steps.len() - warmup,
        if p.steps.len() - warmup < steady::MIN_RELIABLE_STEADY_STEPS {
            format!(
                " (fewer than {}: the steady figures will not be reliable)",
                steady::MIN_RELIABLE_STEADY_STEPS
            )
        } else {
            String::new()
        }
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
            if estimate.required_free_bytes <= free {
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

/// The memory estimate of `steps` as this run's backend computes them (real tokens only, or
/// sequence lengths rounded up to its multiple), with its queued GPU work: for the run itself and
/// for every setting the fit advice weighs.
fn estimate_as_run(
    framework: Framework,
    shape: &crate::model::ModelShape,
    facts: &DeviceFacts,
    strategy: &StrategyConfig,
    steps: &[Step],
) -> MemoryEstimate {
    let as_computed;
    let steps = if facts.drops_padding {
        as_computed = memory::without_padding(steps);
        &as_computed
    } else if facts.seq_multiple > 1 {
        as_computed = memory::padded_to_multiple(steps, facts.seq_multiple);
        &as_computed
    } else {
        steps
    };
    memory::estimate_for(
        framework,
        shape,
        strategy,
        facts.precision,
        facts.device,
        steps,
    )
    .with_queued_work(facts.queued_work_bytes)
}

/// Before loading: warn when the estimate exceeds the device's free memory, naming settings whose
/// estimate fits.
fn warn_if_it_will_not_fit(
    framework: Framework,
    cfg: &Config,
    p: &Prepared,
    facts: &DeviceFacts,
    estimate: &MemoryEstimate,
) {
    let Some((free, source)) = memory::free_memory(facts.device) else {
        return;
    };
    if estimate.required_free_bytes <= free {
        return;
    }
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let as_run =
        |s: &StrategyConfig, steps: &[Step]| estimate_as_run(framework, &p.shape, facts, s, steps);
    let fits = memory::settings_that_fit(cfg, &p.shape, &p.samples, &as_run, free);
    let advice = if fits.is_empty() {
        "no smaller micro-batch, LoRA or last-n setting fits either, with or without --grad-checkpoint; use a device with more memory"
            .to_string()
    } else {
        format!(
            "settings that would fit: {}",
            fits.iter()
                .map(|f| f.describe())
                .collect::<Vec<_>>()
                .join("; ")
        )
    };
    eprintln!(
        "warning: the estimated peak memory ({:.2} GiB, runtime included) exceeds the free memory of the device ({:.2} GiB, {source}); the run may fail with out-of-memory. {advice}",
        gib(estimate.required_free_bytes),
        gib(free)
    );
}

/// This repeat's clock: its own start, and the time before the first build charged to it.
#[derive(Debug, Clone, Copy)]
struct RunClock {
    start: Instant,
    before: BeforeBuild,
}

impl RunClock {
    /// Seconds since the process started, as this repeat counts them.
    fn elapsed_s(&self) -> f64 {
        self.before.total_s() + self.start.elapsed().as_secs_f64()
    }
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
    before: BeforeBuild,
    interrupted: &AtomicBool,
) -> (Summary, i32) {
    let started_at = chrono::Utc::now().to_rfc3339();
    let clock = RunClock {
        start: Instant::now(),
        before,
    };
    // This repeat's peak RSS is its own (where the OS lets the high-water mark be reset).
    let rss_reset = probe::reset_peak_rss();
    // The sampler runs for the whole run (load, warm-up, steady, finish) on its own thread; it
    // appends to telemetry.jsonl as it goes. None when --telemetry-interval-ms 0.
    let tel = Telemetry::start(cfg.run.telemetry_interval_ms, dir);
    let t_model = Instant::now();
    let built = build(cfg, p).map(|mut b| {
        // Host-device sync: the weights are on the device before the load clock stops.
        b.synchronize();
        b
    });
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
                clock,
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
                None,
            );
            attach_telemetry(&mut s, tel, cfg, p.rank.as_ref());
            return (s, crate::error::exit_code_for(&e));
        }
    };
    // This process's device memory as the driver reports it (NVML), sampled after every step.
    let mut process_memory = ProcessMemoryPeak::new();
    process_memory.sample();
    let info = backend.info();
    if !cfg.run.quiet {
        let pc = backend.parameter_counts();
        eprintln!(
            "backend {} on {} ({}), dtype {}; parameters {} total, {} trainable",
            info.framework, info.device, info.device_name, info.dtype, pc.total, pc.trainable
        );
    }
    let mut calibration = None;
    if cfg.run.calibrate {
        match backend.calibrate_tflops() {
            Ok(c) => calibration = Some(c),
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
        process_memory.sample();
        let dt = backend.reduce_step_time(dt);
        if let Some(r) = &p.rank {
            r.beacon(&format!("step {} done", step.index));
        }
        match out {
            Ok(r) if r.loss.is_finite() => {
                let args = (
                    &p.shape,
                    &cfg.workload.strategy,
                    &step.computed_doc_lengths[..],
                    step.loss_tokens,
                );
                let flops = (
                    step_flops(args.0, args.1, args.2, args.3),
                    step_hardware_flops(args.0, args.1, args.2, args.3),
                );
                rec.record(step, &r, lr, dt, clock, flops);
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
    process_memory.sample();
    let reading = backend.memory();
    let mut mem = memory_info(
        reading,
        &process_memory,
        &info.device,
        probe::peak_rss(rss_reset),
    );
    let per_rank = gather_memory(&mut backend, &mut mem);
    let mut s = rec.summary(
        cfg,
        p,
        Some((&backend, mem)),
        framework,
        clock,
        model_load_s,
        started_at,
        run_id,
        dir_rel,
        status,
        error,
        calibration.as_ref(),
    );
    if let Some(d) = per_rank {
        merge_distributed_details(&mut s, d);
    }
    attach_telemetry(&mut s, tel, cfg, p.rank.as_ref());
    (s, code)
}

/// The summary's memory figures from the backend's reading, the driver's figure for this process
/// (the backend's own where it has one, else NVML's) and the host's peak RSS.
fn memory_info(
    reading: MemoryReading,
    process_memory: &ProcessMemoryPeak,
    device: &str,
    rss: (Option<f64>, String),
) -> MemoryInfo {
    let (process_gib, process_source) = match reading.process_gib {
        Some(g) => (Some(g), reading.process_source),
        None => match process_memory.peak_gib() {
            Some(g) => (Some(g), process_memory.source()),
            None if device == "cpu" => (
                None,
                "a CPU run: no device memory besides host memory (see process_peak_rss_gib)"
                    .to_string(),
            ),
            None if !reading.process_source.is_empty() => (None, reading.process_source),
            None => (None, process_memory.source()),
        },
    };
    let or_reason = |src: String, what: &str| {
        if src.is_empty() {
            format!("not reported by this backend ({what})")
        } else {
            src
        }
    };
    MemoryInfo {
        device_peak_allocated_gib: reading.allocated_gib,
        device_peak_allocated_source: or_reason(reading.allocated_source, "allocated peak"),
        device_peak_reserved_gib: reading.reserved_gib,
        device_peak_reserved_source: or_reason(reading.reserved_source, "reserved peak"),
        device_process_peak_gib: process_gib,
        device_process_peak_source: process_source,
        process_peak_rss_gib: rss.0,
        process_peak_rss_source: rss.1,
        estimated_peak_bytes: None,
        estimate_error: None,
        estimate: None,
    }
}

/// Data parallel: every rank's device memory figures, gathered (every rank calls this once, in
/// the same order); the summary's figures become the largest rank's, and the per-rank lists go to
/// `backend.details.distributed.memory_gib_per_rank`. `None` for a single process.
fn gather_memory<B: Backend>(backend: &mut B, mem: &mut MemoryInfo) -> Option<serde_json::Value> {
    // -1 stands for "no figure" in the gather.
    let mut lists = serde_json::Map::new();
    for (key, slot) in [
        ("device_peak_allocated", &mut mem.device_peak_allocated_gib),
        ("device_peak_reserved", &mut mem.device_peak_reserved_gib),
        ("device_process_peak", &mut mem.device_process_peak_gib),
    ] {
        let all = backend.gather_f64(slot.unwrap_or(-1.0))?;
        let present: Vec<Option<f64>> = all.iter().map(|&v| (v >= 0.0).then_some(v)).collect();
        *slot = present.iter().flatten().copied().reduce(f64::max);
        lists.insert(key.into(), serde_json::json!(present));
    }
    Some(serde_json::json!({ "memory_gib_per_rank": lists }))
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
    figures: Vec<StepFigures>,
    first_step_end_s: Option<f64>,
    /// Steps where the backend ran another number of micro-batches than the plan's with loss
    /// tokens: (step, ran, planned).
    micro_batch_mismatch: Vec<(usize, usize, usize)>,
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
            figures: Vec::new(),
            first_step_end_s: None,
            micro_batch_mismatch: Vec::new(),
        }
    }

    fn record(
        &mut self,
        step: &Step,
        r: &StepReport,
        lr: f64,
        dt: f64,
        clock: RunClock,
        (flops, hardware_flops): (f64, f64),
    ) {
        let elapsed = clock.elapsed_s();
        if self.first_step_end_s.is_none() {
            self.first_step_end_s = Some(elapsed);
        }
        self.losses.push(r.loss);
        self.figures.push(StepFigures {
            time_s: dt,
            samples: step.samples,
            loss_tokens: step.loss_tokens,
            input_tokens: step.input_tokens,
            padded_tokens: step.padded_tokens,
            flops,
            hardware_flops,
        });
        let planned = step
            .micro_batches
            .iter()
            .filter(|m| m.loss_tokens > 0)
            .count();
        if let Some(ran) = r.micro_batches_run {
            if ran != planned {
                self.micro_batch_mismatch.push((step.index, ran, planned));
            }
        }
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
            micro_batches_run: r.micro_batches_run,
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
        backend: Option<(&B, MemoryInfo)>,
        framework: Framework,
        clock: RunClock,
        model_load_s: f64,
        started_at: String,
        run_id: &str,
        dir_rel: &str,
        status: Status,
        error: Option<RunError>,
        calibration: Option<&Calibration>,
    ) -> Summary {
        let sum = |f: fn(&StepFigures) -> usize| self.figures.iter().map(f).sum::<usize>();
        let (loss_t, in_t, pad_t, samp) = (
            sum(|s| s.loss_tokens),
            sum(|s| s.input_tokens),
            sum(|s| s.padded_tokens),
            sum(|s| s.samples),
        );
        let total_s = clock.elapsed_s();
        let backend_notes = backend.as_ref().map(|(b, _)| b.notes()).unwrap_or_default();
        let (info, params, software, mem) = match backend {
            Some((b, m)) => (b.info(), b.parameter_counts(), b.software(), m),
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
                MemoryInfo {
                    device_peak_allocated_source: "the model was not built".into(),
                    device_peak_reserved_source: "the model was not built".into(),
                    device_process_peak_source: "the model was not built".into(),
                    process_peak_rss_gib: probe::process_rss_gib(),
                    process_peak_rss_source: "this process's RSS when the build failed".into(),
                    ..Default::default()
                },
            ),
        };
        let hardware = probe::probe_hardware();
        let low_precision = info.dtype != "float32";
        let mut notes = p.notes.clone();
        notes.extend(backend_notes);
        let pk = match info.device.as_str() {
            // No CPU has a row: on a Mac the CPU's name is the chip's, whose row is its GPU's.
            "cpu" | "unknown" => Err(format!(
                "no cited peak for device {:?} (a CPU; see shared/src/measure/peak.rs)",
                info.device_name
            )),
            _ => peak::lookup(
                &info.device_name,
                low_precision,
                hardware.apple.as_ref().and_then(|a| a.gpu_cores),
            ),
        };
        if let Err(why) = &pk {
            notes.push(format!(
                "mfu: null: {why} at {}",
                if low_precision { "bf16" } else { "fp32" }
            ));
        }
        let pk = pk.ok();
        if cfg.run.dtype == DTypeChoice::Auto {
            notes.push(format!("dtype: auto resolved to {}", info.dtype));
        }
        // The calibrated peak counts only in the run's own precision.
        let want = calibration_precision(&info.dtype);
        let measured = match calibration {
            Some(c) if c.precision == want => Some(c.tflops),
            Some(c) => {
                notes.push(format!(
                    "mfu_measured: null: --calibrate measured {} products, the run computes in {want}",
                    c.precision
                ));
                None
            }
            None => None,
        };
        let world = p.world_size();
        let sf = steady::steady_figures(
            &self.figures,
            self.warmup,
            world,
            pk.as_ref().map(|k| k.tflops),
            measured,
        );
        notes.extend(sf.note.clone());
        if let Some(&(step, ran, planned)) = self.micro_batch_mismatch.first() {
            notes.push(format!(
                "flops: at {} step(s) (first: step {step}) the backend ran {ran} micro-batches where the plan has {planned} with loss tokens; the FLOP count assumes the plan's",
                self.micro_batch_mismatch.len()
            ));
        }
        let last10 = &self.losses[self.losses.len().saturating_sub(10)..];
        let data_s = clock.before.data_s;
        let metrics = Metrics {
            total_s,
            load_s: data_s + model_load_s,
            data_s,
            model_load_s,
            startup_s: clock.before.startup_s,
            warmup_s: sf.warmup_s,
            steady_s: sf.steady_s,
            steps: self.figures.len(),
            warmup_steps: sf.warmup_steps,
            steady_steps: sf.steady_steps,
            samples: samp,
            loss_tokens: loss_t,
            input_tokens: in_t,
            padded_tokens: pad_t,
            padding_fraction: if pad_t > 0 {
                1.0 - in_t as f64 / pad_t as f64
            } else {
                0.0
            },
            steady_samples: sf.steady_samples,
            steady_loss_tokens: sf.steady_loss_tokens,
            steady_input_tokens: sf.steady_input_tokens,
            steady_padded_tokens: sf.steady_padded_tokens,
            tokens_per_s: sf.tokens_per_s,
            input_tokens_per_s: sf.input_tokens_per_s,
            samples_per_s: sf.samples_per_s,
            end_to_end_tokens_per_s: loss_t as f64 / total_s,
            end_to_end_input_tokens_per_s: in_t as f64 / total_s,
            end_to_end_samples_per_s: samp as f64 / total_s,
            time_to_first_step_s: self.first_step_end_s,
            step_time_s: sf.step_time_s,
            flops_per_input_token: sf.flops_per_input_token,
            model_tflops_per_s: sf.model_tflops_per_s,
            mfu: sf.mfu,
            hardware_tflops_per_s: sf.hardware_tflops_per_s,
            hfu: sf.hfu,
            peak: pk,
            mfu_measured: sf.mfu_measured,
            measured_peak_tflops: calibration.map(|c| c.tflops),
            measured_peak_precision: calibration.map(|c| c.precision.clone()),
            memory: mem,
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
            hardware,
            software,
            metrics,
            repeats: None,
            notes,
        }
    }
}

/// What one process keeps from one repeat to the next, per framework: each repeat builds its
/// model, optimizer state and batches anew, but some state belongs to the process.
fn repeat_state(framework: Framework) -> &'static str {
    match framework {
        Framework::Pytorch => "each repeat builds its model and optimizer anew after the CUDA caching allocator returned its cached blocks to the device and reset its peak statistics (so each repeat's memory figures are its own); what persists in the process: the CUDA context, cuBLAS/cuDNN handles and workspaces, loaded kernels and libtorch's thread pools, so the first repeat's model_load_s includes CUDA's initialisation and later repeats' do not",
        Framework::Mlx => "each repeat builds its model and optimizer anew after MLX's buffer cache was cleared and its peak-memory counter reset (so each repeat's memory figures are its own); what persists in the process: the device and its command queue, and the kernels MLX compiled or loaded, so the first repeat pays for them and later repeats do not",
    }
}

/// The median repeat (by `tokens_per_s`) becomes the headline; every repeat's figures are kept.
fn combine_repeats(mut runs: Vec<Summary>, run_id: &str, framework: Framework) -> Summary {
    let figs: Vec<RepeatFigures> = runs
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let m = &s.metrics;
            RepeatFigures {
                repeat: i + 1,
                run_dir: s.run.run_dir.clone(),
                status: s.status,
                tokens_per_s: m.tokens_per_s,
                input_tokens_per_s: m.input_tokens_per_s,
                samples_per_s: m.samples_per_s,
                total_s: m.total_s,
                step_time_median_s: m.step_time_s.map(|x| x.median),
                mfu: m.mfu,
                device_peak_allocated_gib: m.memory.device_peak_allocated_gib,
                device_peak_reserved_gib: m.memory.device_peak_reserved_gib,
                device_process_peak_gib: m.memory.device_process_peak_gib,
                process_peak_rss_gib: m.memory.process_peak_rss_gib,
                final_loss: m.final_loss,
            }
        })
        .collect();
    let median = steady::median_repeat(
        &runs
            .iter()
            .map(|s| s.metrics.tokens_per_s)
            .collect::<Vec<_>>(),
    );
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
    // The median run's summary whole: its memory, steps and notes are its own.
    let mut top = runs.swap_remove(median);
    top.run.run_id = run_id.to_string();
    top.notes.push(format!(
        "repeats: {} runs in one process; metrics are those of the median run by tokens_per_s (repeat {}); {}; every repeat's total_s includes the {:.2} s before the first model build (startup_s + data_s, measured once)",
        reps.count,
        reps.median_repeat,
        repeat_state(framework),
        top.metrics.startup_s + top.metrics.data_s
    ));
    top.repeats = Some(reps);
    top
}
