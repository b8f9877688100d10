//! The versioned summary schema (`benchmark_summary.json`), its validation, and atomic writes.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::config::Workload;
use crate::data::DataStats;
use crate::measure::peak::Peak;
use crate::measure::probe::{Hardware, Software};
use crate::measure::stats::Spread;
use crate::model::{ModelShape, ParamCounts};

/// Bumped on any change that an older reader would misread. 2: `metrics.flops_per_token` became
/// `flops_per_input_token`; `metrics.peak_memory_gib` gave way to three device memory figures with
/// one meaning each and their sources (`metrics.memory`), the estimate's error against the
/// allocated peak and the peak RSS in its own field; `startup_s`, `measured_peak_precision`.
/// [`Summary::read`] still reads schema 1 (see [`upgrade`]).
pub const SCHEMA_VERSION: u32 = 2;

/// The oldest schema [`Summary::read`] converts.
pub const OLDEST_READABLE_SCHEMA: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Completed,
    Interrupted,
    Failed,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Summary {
    pub schema_version: u32,
    pub status: Status,
    pub error: Option<RunError>,
    pub run: RunInfo,
    pub workload: WorkloadInfo,
    pub backend: BackendInfo,
    pub hardware: Hardware,
    pub software: Software,
    pub metrics: Metrics,
    /// Present when `--repeats R > 1`: each repeat's headline figures; `metrics` is the median run.
    pub repeats: Option<Repeats>,
    /// Plain statements a reader needs: what was synthetic, what could not be measured and why.
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunError {
    pub message: String,
    /// Optimizer steps completed before the failure.
    pub steps_completed: usize,
    pub hint: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunInfo {
    pub run_id: String,
    pub binary: String,
    pub started_at: String,
    pub finished_at: String,
    pub command_line: Vec<String>,
    /// Run folder, relative to the output folder.
    pub run_dir: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkloadInfo {
    /// SHA-256 of the workload settings and of every micro-batch's token ids, labels and
    /// positions: equal exactly when two runs did the same work.
    pub hash: String,
    pub config: Workload,
    pub model_shape: ModelShape,
    pub parameters: ParamCounts,
    pub data: DataStats,
    pub steps_planned: usize,
    pub samples_per_step: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackendInfo {
    /// `pytorch` or `mlx`.
    pub framework: String,
    /// `cuda:0`, `mps`, `cpu`, `gpu` (MLX Metal).
    pub device: String,
    /// Human name of the device that computed (GPU name or CPU model).
    pub device_name: String,
    /// `float32`, `bf16`, `mixed-bf16`.
    pub dtype: String,
    pub world_size: usize,
    /// Backend-specific settings worth knowing (attention kernel, compile, threads).
    pub details: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// Wall clock of the run, everything included: process start to the summary for a single
    /// run; for each of `--repeats R`, the time before the first model build (`startup_s` +
    /// `data_s`, measured once and charged to every repeat) plus the repeat's own build, steps and
    /// finish, so that every repeat counts the same things.
    pub total_s: f64,
    /// Data preparation + model build/load, before the first step.
    pub load_s: f64,
    pub data_s: f64,
    /// Model build or load, the device synchronised before the clock read that closes it (CUDA
    /// work is asynchronous).
    pub model_load_s: f64,
    /// Process start to the first model build, data preparation excepted (argument parsing, the
    /// device preflight, the memory estimate, the run folder). Absent in schema 1.
    #[serde(default)]
    pub startup_s: f64,
    /// First K optimizer steps (excluded from steady figures).
    pub warmup_s: f64,
    pub steady_s: f64,
    pub steps: usize,
    pub warmup_steps: usize,
    pub steady_steps: usize,
    pub samples: usize,
    pub loss_tokens: usize,
    pub input_tokens: usize,
    pub padded_tokens: usize,
    /// 1 - input_tokens / padded_tokens.
    pub padding_fraction: f64,
    pub steady_samples: usize,
    pub steady_loss_tokens: usize,
    pub steady_input_tokens: usize,
    pub steady_padded_tokens: usize,
    /// Headline: steady loss tokens / steady seconds.
    pub tokens_per_s: Option<f64>,
    /// Steady non-padding input tokens / steady seconds.
    pub input_tokens_per_s: Option<f64>,
    pub samples_per_s: Option<f64>,
    /// Total loss tokens / total_s.
    pub end_to_end_tokens_per_s: f64,
    pub end_to_end_input_tokens_per_s: f64,
    pub end_to_end_samples_per_s: f64,
    /// Process start to the end of the first optimizer step.
    pub time_to_first_step_s: Option<f64>,
    /// Steady steps' wall time.
    pub step_time_s: Option<Spread>,
    /// Model FLOPs of the steady steps / steady input (non-padding) tokens: times
    /// `input_tokens_per_s` it is `model_tflops_per_s` (x 1e12). FLOPs count the micro-batches
    /// that ran (a micro-batch without loss tokens runs on no backend).
    pub flops_per_input_token: Option<f64>,
    pub model_tflops_per_s: Option<f64>,
    /// Against the cited table peak (`peak`); null when the device has no row.
    pub mfu: Option<f64>,
    pub peak: Option<Peak>,
    /// Hardware FLOPs per second: the model FLOPs and what activation checkpointing computes
    /// again (`--grad-checkpoint`); equal to `model_tflops_per_s` without it.
    #[serde(default)]
    pub hardware_tflops_per_s: Option<f64>,
    /// `hardware_tflops_per_s` against the table peak: the device's use, where MFU is the
    /// model's progress.
    #[serde(default)]
    pub hfu: Option<f64>,
    /// Against a peak measured by `--calibrate` on this device.
    pub mfu_measured: Option<f64>,
    pub measured_peak_tflops: Option<f64>,
    /// The precision `--calibrate` measured in: the run's own compute precision (`bf16` for bf16
    /// and mixed-bf16 runs, `fp32` for float32 runs).
    #[serde(default)]
    pub measured_peak_precision: Option<String>,
    /// Device memory, three figures with one meaning each, and the host process's peak RSS.
    pub memory: MemoryInfo,
    pub first_loss: Option<f64>,
    pub final_loss: Option<f64>,
    /// Mean loss of the last min(10, steps) steps: less noisy than the final step's.
    pub final_loss_avg10: Option<f64>,
    /// Loss of every optimizer step, in order (the full log is `steps.jsonl`).
    pub loss_curve: Vec<f64>,
    /// What the hardware did (utilisation, power, energy, temperature, throttling), from the
    /// background sampler; null when `--telemetry-interval-ms 0` turned it off. Absent in
    /// summaries written before it existed, which still read.
    #[serde(default)]
    pub telemetry: Option<Telemetry>,
}

/// Hardware telemetry of a run (`shared/src/measure/telemetry/`). Steady figures cover the steady
/// window: from the start of the first steady step to the end of the last, wall clock.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Telemetry {
    pub interval_ms: u64,
    /// The raw series beside the summary (`telemetry.jsonl`), null when it could not be written.
    pub file: Option<String>,
    pub samples: usize,
    /// Samples taken during the steady window.
    pub steady_samples: usize,
    /// The steady window in seconds since sampling began (the series' `t_s` clock).
    pub steady_start_s: Option<f64>,
    pub steady_end_s: Option<f64>,
    /// The devices whose energy counts (the GPU the run computed on; see `devices[].counted_in_energy`).
    pub energy_devices: Vec<String>,
    /// Energy of `energy_devices`, over the steady window and over the whole sampled run.
    pub energy_j: Option<EnergyJ>,
    /// Steady energy / steady loss tokens x 1000 (the same tokens as the headline tokens/s).
    pub joules_per_1k_tokens: Option<f64>,
    /// Steady energy / steady input (non-padding) tokens x 1000.
    pub joules_per_1k_input_tokens: Option<f64>,
    /// Any device slowed its clocks (power cap, thermal) during the steady window.
    pub throttled: bool,
    pub devices: Vec<DeviceTelemetry>,
    /// Wall time the sampler spent per sample, in milliseconds (its cost, on its own thread).
    pub sampler_cost_ms: Option<SamplerCost>,
    /// Problems of the sampler and its probes, each once, with how often it happened.
    pub errors: Vec<String>,
}

impl Telemetry {
    /// The device a run's utilization is reported for: the first whose energy counts (the GPU the
    /// run computed on), else the first GPU, else the CPU.
    pub fn primary_device(&self) -> Option<&DeviceTelemetry> {
        self.devices
            .iter()
            .find(|d| d.counted_in_energy)
            .or_else(|| self.devices.iter().find(|d| d.id != "cpu"))
            .or_else(|| self.devices.first())
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct EnergyJ {
    pub steady: Option<f64>,
    pub total: Option<f64>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    pub mean: f64,
    pub p50: f64,
    pub p95: f64,
    pub n: usize,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct SamplerCost {
    pub mean: f64,
    pub max: f64,
}

/// One device's telemetry. Fields a device cannot have (power of the CPU, RSS of a GPU) are absent.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DeviceTelemetry {
    /// `nvidia:<NVML index>`, `apple-gpu` or `cpu`.
    pub id: String,
    pub name: String,
    pub counted_in_energy: bool,
    /// Steady window: GPU busy percent (NVML, ioreg), or all cores' utilisation for `cpu`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub utilization_percent: Option<Percentiles>,
    /// Steady window: energy / window length.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub power_w_mean: Option<f64>,
    /// Steady window: the highest power sample.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub power_w_peak: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub energy_j: Option<EnergyJ>,
    /// `nvml total-energy counter` or `integral of sampled power (...)`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub energy_source: Option<String>,
    /// Steady window.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sm_clock_mhz_mean: Option<f64>,
    /// Whole run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature_c_peak: Option<f64>,
    /// Whole run: device memory in use (all processes), and this process's share where visible.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_used_gib_peak: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub process_memory_gib_peak: Option<f64>,
    /// Steady window: clocks slowed by a power cap or heat (NVML's slowdown reasons, macOS's
    /// thermal warnings); null where the device cannot tell.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub throttled: Option<bool>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub throttle_reasons: Vec<String>,
    /// Apple: the worst thermal state seen in the steady window.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub thermal_state: Option<String>,
    /// `cpu`, steady window: this process's CPU time per second (1.0 = one core).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub process_cpu_cores: Option<Percentiles>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub process_rss_gib_peak: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system_memory_used_gib_peak: Option<f64>,
    /// Figures this device cannot give, and why (unsupported queries, no root for powermetrics).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unavailable: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
}

/// Peak memory of a run. Each figure has one meaning on every backend, and its source names where
/// it came from on this run (or why it is null):
/// - `device_peak_allocated_gib`: the framework's own peak of live tensors/arrays on the device
///   (the CUDA caching allocator's max allocated bytes; MLX's peak memory). What the preflight
///   estimate is compared with.
/// - `device_peak_reserved_gib`: what the framework held from the device at most: the caching
///   allocator's max reserved bytes; MLX's active + cache memory at its highest reading.
/// - `device_process_peak_gib`: what the device's driver reports for this process (NVML on NVIDIA,
///   whichever framework): framework memory plus the CUDA context and library workspaces.
/// - `process_peak_rss_gib`: host memory, the process's peak resident set size. Not device memory;
///   on a CPU run it holds the tensors and everything else of the process (libraries, data).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MemoryInfo {
    pub device_peak_allocated_gib: Option<f64>,
    pub device_peak_allocated_source: String,
    pub device_peak_reserved_gib: Option<f64>,
    pub device_peak_reserved_source: String,
    pub device_process_peak_gib: Option<f64>,
    pub device_process_peak_source: String,
    pub process_peak_rss_gib: Option<f64>,
    pub process_peak_rss_source: String,
    /// The preflight estimate of the allocated peak, in bytes (`estimate.peak_bytes`), to compare
    /// with `device_peak_allocated_gib`.
    #[serde(default)]
    pub estimated_peak_bytes: Option<u64>,
    /// (estimate - measured allocated peak) / measured allocated peak; null (with a note) where
    /// the backend has no allocated peak.
    #[serde(default)]
    pub estimate_error: Option<f64>,
    /// The estimate's breakdown (weights, gradients, optimizer, activations, ...); see
    /// `shared/src/measure/memory.rs`.
    #[serde(default)]
    pub estimate: Option<crate::measure::memory::MemoryEstimate>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RepeatFigures {
    pub repeat: usize,
    pub run_dir: String,
    pub status: Status,
    pub tokens_per_s: Option<f64>,
    pub input_tokens_per_s: Option<f64>,
    pub samples_per_s: Option<f64>,
    pub total_s: f64,
    pub step_time_median_s: Option<f64>,
    pub mfu: Option<f64>,
    /// The repeat's own memory figures (see [`MemoryInfo`]).
    pub device_peak_allocated_gib: Option<f64>,
    pub device_peak_reserved_gib: Option<f64>,
    pub device_process_peak_gib: Option<f64>,
    pub process_peak_rss_gib: Option<f64>,
    pub final_loss: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Repeats {
    pub count: usize,
    /// The repeat whose `tokens_per_s` is the median (its figures fill `metrics`).
    pub median_repeat: usize,
    pub runs: Vec<RepeatFigures>,
    pub tokens_per_s: Option<Spread>,
    pub input_tokens_per_s: Option<Spread>,
    pub total_s: Option<Spread>,
}

impl Summary {
    /// Checks invariants a reader relies on; names the field that breaks one.
    pub fn validate(&self) -> Result<()> {
        if self.schema_version != SCHEMA_VERSION {
            bail!(
                "schema_version is {}, this reader understands {SCHEMA_VERSION}",
                self.schema_version
            );
        }
        let m = &self.metrics;
        let nonneg = |k: &str, v: f64| -> Result<()> {
            if !(v.is_finite() && v >= 0.0) {
                bail!("metrics.{k} = {v} is not a finite non-negative number");
            }
            Ok(())
        };
        for (k, v) in [
            ("total_s", m.total_s),
            ("load_s", m.load_s),
            ("warmup_s", m.warmup_s),
            ("steady_s", m.steady_s),
            ("padding_fraction", m.padding_fraction),
        ] {
            nonneg(k, v)?;
        }
        for (k, v) in [
            ("tokens_per_s", m.tokens_per_s),
            ("input_tokens_per_s", m.input_tokens_per_s),
            ("samples_per_s", m.samples_per_s),
            ("mfu", m.mfu),
            ("hfu", m.hfu),
            ("model_tflops_per_s", m.model_tflops_per_s),
            ("flops_per_input_token", m.flops_per_input_token),
            (
                "memory.device_peak_allocated_gib",
                m.memory.device_peak_allocated_gib,
            ),
            (
                "memory.device_peak_reserved_gib",
                m.memory.device_peak_reserved_gib,
            ),
            (
                "memory.device_process_peak_gib",
                m.memory.device_process_peak_gib,
            ),
            ("memory.process_peak_rss_gib", m.memory.process_peak_rss_gib),
        ] {
            if let Some(v) = v {
                nonneg(k, v)?;
            }
        }
        nonneg("startup_s", m.startup_s)?;
        if let Some(e) = m.memory.estimate_error {
            if !e.is_finite() {
                bail!("metrics.memory.estimate_error = {e} is not a finite number");
            }
        }
        if m.warmup_steps + m.steady_steps != m.steps {
            bail!(
                "metrics.warmup_steps ({}) + steady_steps ({}) != steps ({})",
                m.warmup_steps,
                m.steady_steps,
                m.steps
            );
        }
        if m.input_tokens > m.padded_tokens || m.loss_tokens > m.input_tokens {
            bail!(
                "token counts out of order: loss {} <= input {} <= padded {} must hold",
                m.loss_tokens,
                m.input_tokens,
                m.padded_tokens
            );
        }
        if m.loss_curve.len() != m.steps {
            bail!(
                "metrics.loss_curve has {} entries for {} steps",
                m.loss_curve.len(),
                m.steps
            );
        }
        if self.status == Status::Completed && m.steps == 0 {
            bail!("status is completed but no step ran");
        }
        if self.status != Status::Completed && self.error.is_none() {
            bail!("status is {:?} but error is missing", self.status);
        }
        if let Some(t) = &m.telemetry {
            validate_telemetry(t, m)?;
        }
        if self.workload.hash.len() != 64
            || !self.workload.hash.chars().all(|c| c.is_ascii_hexdigit())
        {
            bail!(
                "workload.hash {:?} is not a SHA-256 hex digest",
                self.workload.hash
            );
        }
        Ok(())
    }

    /// Validates and writes atomically (temporary file + rename).
    pub fn write(&self, path: &Path) -> Result<()> {
        self.validate().with_context(|| {
            format!("refusing to write an invalid summary to {}", path.display())
        })?;
        let json = serde_json::to_string_pretty(self)?;
        // No summary is written once a second Ctrl-C has begun to end the process.
        let _exclusive = crate::interrupt::summary_write_guard();
        crate::files::write_atomic(path, json.as_bytes())
    }

    /// Reads and validates. Every error is one message (whole in `{}` as in `{:#}`) that names
    /// the file, the JSON path of the offending field and the problem.
    pub fn read(path: &Path) -> Result<Self> {
        let name = path.display();
        // A FIFO or device would block the read forever; a folder cannot be read.
        let text = crate::files::read_text(path).map_err(|e| anyhow!("{name}: {e}"))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| anyhow!("{name}: not valid JSON: {e}"))?;
        match v.get("schema_version") {
            Some(sv) => match sv.as_u64() {
                Some(n) if (u64::from(OLDEST_READABLE_SCHEMA)..=u64::from(SCHEMA_VERSION)).contains(&n) => {}
                Some(n) => bail!("{name}: unknown schema_version {n} (this build reads {OLDEST_READABLE_SCHEMA} to {SCHEMA_VERSION}); use a matching build of the benchmark"),
                None => bail!("{name}: schema_version is {sv}, not a whole number (this build reads {OLDEST_READABLE_SCHEMA} to {SCHEMA_VERSION}); the file was not written by the benchmark, or was edited"),
            },
            None => bail!("{name}: no schema_version; not a benchmark_summary.json"),
        }
        let v = upgrade(v);
        let s: Summary = serde_path_to_error::deserialize(v).map_err(|e| {
            let at = e.path().to_string();
            let at = if at.is_empty() || at == "." {
                "the top level".to_string()
            } else {
                format!("`{at}`")
            };
            anyhow!(
                "{name}: does not match the summary schema at {at}: {}",
                e.into_inner()
            )
        })?;
        s.validate()
            .map_err(|e| anyhow!("{name}: invalid summary: {e:#}"))?;
        Ok(s)
    }
}

/// Converts a summary of an older schema into the current one (JSON to JSON, before it is
/// deserialised), so that reports keep reading the committed results; a current summary passes
/// unchanged. Schema 1 to 2:
/// - `metrics.flops_per_token` was already per input token: renamed `flops_per_input_token`;
/// - `metrics.peak_memory_gib` and the one `memory.source` become the figure with that meaning:
///   NVML's process memory (PyTorch on CUDA) moves to `device_process_peak_gib`, MLX's peak memory
///   stays `device_peak_allocated_gib`, a CPU run's RSS goes to `process_peak_rss_gib`; what
///   schema 1 did not record is null, its source says so;
/// - the estimate's `peak_bytes` included the CUDA runtime allowance, which schema 2 keeps apart
///   (`required_free_bytes`): it is subtracted.
///
/// A note records the conversion.
pub fn upgrade(mut v: serde_json::Value) -> serde_json::Value {
    use serde_json::{json, Value};
    if v.get("schema_version").and_then(Value::as_u64) != Some(1) {
        return v;
    }
    const NOT_RECORDED: &str = "not recorded: a schema-1 summary has no such figure";
    let source = v
        .pointer("/metrics/memory/source")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let Some(metrics) = v.get_mut("metrics").and_then(Value::as_object_mut) else {
        return v;
    };
    if let Some(f) = metrics.remove("flops_per_token") {
        metrics.insert("flops_per_input_token".into(), f);
    }
    // Schema 1's headline memory figure was one of the memory fields below (NVML's, MLX's or the
    // RSS, as `memory.source` says); those fields carry it over.
    metrics.remove("peak_memory_gib");
    if let Some(mem) = metrics.get_mut("memory").and_then(Value::as_object_mut) {
        let from = |what: &str| format!("schema 1 ({source:?}): {what}");
        let old_rss = mem.remove("process_peak_rss_gib").unwrap_or(Value::Null);
        let old_alloc = mem
            .remove("device_peak_allocated_gib")
            .unwrap_or(Value::Null);
        let old_reserved = mem
            .remove("device_peak_reserved_gib")
            .unwrap_or(Value::Null);
        mem.remove("source");
        let nvml = source.starts_with("NVML");
        let (alloc, reserved, process) = if nvml {
            (Value::Null, Value::Null, old_reserved)
        } else {
            (old_alloc, old_reserved, Value::Null)
        };
        let rss = old_rss;
        let src = |v: &Value, meaning: &str| {
            if v.is_null() {
                NOT_RECORDED.to_string()
            } else {
                from(meaning)
            }
        };
        let entries = [
            ("device_peak_allocated", alloc, "the framework's peak"),
            ("device_peak_reserved", reserved, "the framework's reserve"),
            (
                "device_process_peak",
                process,
                "the driver's figure for the process",
            ),
            (
                "process_peak_rss",
                rss,
                "the process's RSS at the end of the run",
            ),
        ];
        for (k, val, meaning) in entries {
            mem.insert(format!("{k}_source"), json!(src(&val, meaning)));
            mem.insert(format!("{k}_gib"), val);
        }
        let runtime = mem
            .get("estimate")
            .and_then(|e| e.get("runtime_bytes"))
            .and_then(Value::as_u64)
            .unwrap_or(0);
        if let Some(e) = mem.get_mut("estimate").and_then(Value::as_object_mut) {
            if let Some(p) = e.get("peak_bytes").and_then(Value::as_u64) {
                e.insert("required_free_bytes".into(), json!(p));
                e.insert("peak_bytes".into(), json!(p.saturating_sub(runtime)));
            }
        }
        if let Some(p) = mem.get("estimated_peak_bytes").and_then(Value::as_u64) {
            mem.insert(
                "estimated_peak_bytes".into(),
                json!(p.saturating_sub(runtime)),
            );
        }
        let est = mem.get("estimated_peak_bytes").and_then(Value::as_u64);
        let measured = mem.get("device_peak_allocated_gib").and_then(Value::as_f64);
        let error = match (est, measured) {
            (Some(e), Some(m)) if m > 0.0 => json!(e as f64 / (m * GIB_F64) - 1.0),
            _ => Value::Null,
        };
        mem.insert("estimate_error".into(), error);
    }
    if let Some(runs) = v.pointer_mut("/repeats/runs").and_then(Value::as_array_mut) {
        for r in runs.iter_mut().filter_map(Value::as_object_mut) {
            let peak = r.remove("peak_memory_gib").unwrap_or(Value::Null);
            let slot = if source.starts_with("NVML") {
                "device_process_peak_gib"
            } else if source.contains("MLX") {
                "device_peak_allocated_gib"
            } else if source.contains("RSS") {
                "process_peak_rss_gib"
            } else {
                ""
            };
            for k in [
                "device_peak_allocated_gib",
                "device_peak_reserved_gib",
                "device_process_peak_gib",
                "process_peak_rss_gib",
            ] {
                r.insert(k.into(), if k == slot { peak.clone() } else { Value::Null });
            }
        }
    }
    if let Some(notes) = v.get_mut("notes").and_then(Value::as_array_mut) {
        notes.push(json!("schema: converted from schema 1 on reading (flops_per_token renamed flops_per_input_token; the one peak memory figure moved to the field of its meaning; the estimate without the CUDA runtime allowance)"));
    }
    v["schema_version"] = json!(SCHEMA_VERSION);
    v
}

const GIB_F64: f64 = (1u64 << 30) as f64;

fn validate_telemetry(t: &Telemetry, m: &Metrics) -> Result<()> {
    let nonneg = |k: &str, v: Option<f64>| -> Result<()> {
        match v {
            Some(v) if !(v.is_finite() && v >= 0.0) => {
                bail!("metrics.telemetry.{k} = {v} is not a finite non-negative number")
            }
            _ => Ok(()),
        }
    };
    let energy = |k: &str, e: &Option<EnergyJ>| -> Result<()> {
        if let Some(e) = e {
            nonneg(&format!("{k}.steady"), e.steady)?;
            nonneg(&format!("{k}.total"), e.total)?;
            if let (Some(s), Some(t)) = (e.steady, e.total) {
                if s > t * (1.0 + 1e-9) + 1e-6 {
                    bail!("metrics.telemetry.{k}: steady energy {s} J exceeds the total {t} J");
                }
            }
        }
        Ok(())
    };
    let pct = |k: &str, p: &Option<Percentiles>, max: f64| -> Result<()> {
        if let Some(p) = p {
            for (name, v) in [("mean", p.mean), ("p50", p.p50), ("p95", p.p95)] {
                if !(v.is_finite() && (0.0..=max).contains(&v)) {
                    bail!("metrics.telemetry.{k}.{name} = {v} is outside 0..={max}");
                }
            }
            if p.p50 > p.p95 + 1e-9 {
                bail!("metrics.telemetry.{k}: p50 {} > p95 {}", p.p50, p.p95);
            }
        }
        Ok(())
    };
    if t.steady_samples > t.samples {
        bail!(
            "metrics.telemetry.steady_samples ({}) > samples ({})",
            t.steady_samples,
            t.samples
        );
    }
    energy("energy_j", &t.energy_j)?;
    nonneg("joules_per_1k_tokens", t.joules_per_1k_tokens)?;
    nonneg("joules_per_1k_input_tokens", t.joules_per_1k_input_tokens)?;
    if let (Some(j), Some(s)) = (t.joules_per_1k_tokens, t.energy_j.and_then(|e| e.steady)) {
        let expect = s / m.steady_loss_tokens as f64 * 1000.0;
        if m.steady_loss_tokens == 0 || (j - expect).abs() > 1e-6 * expect.abs().max(1e-9) {
            bail!("metrics.telemetry.joules_per_1k_tokens = {j} is not steady energy {s} J / {} steady loss tokens x 1000", m.steady_loss_tokens);
        }
    }
    for d in &t.devices {
        let k = format!("devices[{}]", d.id);
        pct(
            &format!("{k}.utilization_percent"),
            &d.utilization_percent,
            100.0,
        )?;
        pct(
            &format!("{k}.process_cpu_cores"),
            &d.process_cpu_cores,
            f64::MAX,
        )?;
        energy(&format!("{k}.energy_j"), &d.energy_j)?;
        for (name, v) in [
            ("power_w_mean", d.power_w_mean),
            ("power_w_peak", d.power_w_peak),
            ("memory_used_gib_peak", d.memory_used_gib_peak),
            ("process_memory_gib_peak", d.process_memory_gib_peak),
            ("process_rss_gib_peak", d.process_rss_gib_peak),
            ("sm_clock_mhz_mean", d.sm_clock_mhz_mean),
        ] {
            nonneg(&format!("{k}.{name}"), v)?;
        }
    }
    Ok(())
}
