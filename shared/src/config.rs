//! One tree of settings for a run: built-in defaults < preset < TOML file < command-line flags.
//!
//! Every field that changes the work done (model, data, strategy, batching, optimizer, seed) lives in
//! [`Workload`] and is hashed into the summary; how and where it runs (device, dtype, output) lives
//! in [`RunOptions`]. Unknown TOML keys and bad values are errors that name the value and the fix.

use std::fmt;
use std::path::{Path, PathBuf};

use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};

use crate::error::ConfigError;

/// `fast` trains on the first 100 records, `full` on all of dolly-15k (15,011 records).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum TuningMode {
    Fast,
    Full,
}

impl TuningMode {
    pub const FAST_SAMPLES: usize = 100;
    pub const DOLLY_RECORDS: usize = 15_011;

    pub fn samples(self) -> usize {
        match self {
            TuningMode::Fast => Self::FAST_SAMPLES,
            TuningMode::Full => Self::DOLLY_RECORDS,
        }
    }
}

/// Which parameters train.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum StrategyKind {
    /// The last N blocks + the LM head train; everything before is frozen (the seed's recipe, N = 4).
    LastN,
    /// Every parameter trains.
    Full,
    /// Low-rank adapters on the target projections; the base model is frozen.
    Lora,
}

/// The projections a LoRA adapter can wrap (Phi-3's fused names; on the split families of
/// `shared::model` each adapts every projection it covers: `ModelShape::projections`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ValueEnum, PartialOrd, Ord,
)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum LoraTarget {
    QkvProj,
    OProj,
    GateUpProj,
    DownProj,
}

impl LoraTarget {
    pub const ALL: [LoraTarget; 4] = [Self::QkvProj, Self::OProj, Self::GateUpProj, Self::DownProj];
}

/// How a step's records are laid out in micro-batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum BatchPlanKind {
    /// Consecutive records, `micro_batch_size` per micro-batch, padded to the longest (or `pad_to`).
    Padded,
    /// The step's records sorted by length and cut into micro-batches under a padded-token budget.
    Bucketed,
    /// The step's records concatenated into rows; attention and positions stay inside each record.
    Packed,
}

/// Initial weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum WeightsKind {
    /// The checkpoint's weights (hub id or local folder).
    Pretrained,
    /// The exact architecture, initialised from the seed (see `model::init_value`).
    Random,
}

/// Built-in model shapes (`shared::model::ModelShape::from_preset`; the hub ids that resolve to
/// each: [`ModelPreset::hub_ids`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ModelPreset {
    /// microsoft/phi-3-mini-4k-instruct: 3.82 B parameters.
    Phi3Mini,
    /// Two Phi-3 blocks, width 64, the real 32,064 vocabulary: runs in seconds on a CPU.
    Tiny,
    /// meta-llama/Llama-3.2-1B-Instruct: 1.24 B parameters (tied head).
    #[serde(rename = "llama-3.2-1b")]
    #[value(name = "llama-3.2-1b")]
    Llama32_1b,
    /// meta-llama/Llama-3.2-3B-Instruct: 3.21 B parameters (tied head).
    #[serde(rename = "llama-3.2-3b")]
    #[value(name = "llama-3.2-3b")]
    Llama32_3b,
    /// Qwen/Qwen3-0.6B: 0.60 B parameters (tied head).
    #[serde(rename = "qwen3-0.6b")]
    #[value(name = "qwen3-0.6b")]
    Qwen3_0_6b,
    /// Qwen/Qwen3-1.7B: 1.72 B parameters (tied head).
    #[serde(rename = "qwen3-1.7b")]
    #[value(name = "qwen3-1.7b")]
    Qwen3_1_7b,
    /// Qwen/Qwen3-4B: 4.02 B parameters (tied head).
    #[serde(rename = "qwen3-4b")]
    #[value(name = "qwen3-4b")]
    Qwen3_4b,
    /// Two Llama 3 blocks, width 64, grouped-query attention, llama3 RoPE, tied head, the real
    /// 128,256 vocabulary.
    TinyLlama,
    /// Two Qwen3 blocks, width 64, head_dim 32, q/k norm, tied head, the real 151,936 vocabulary.
    TinyQwen3,
}

impl ModelPreset {
    /// The test shapes: no published weights, no tokenizer.
    pub fn is_tiny(self) -> bool {
        matches!(self, Self::Tiny | Self::TinyLlama | Self::TinyQwen3)
    }

    /// The hub ids whose `config.json` the preset's built-in shape is (instruct first, then the
    /// base model); none for the test shapes.
    pub fn hub_ids(self) -> &'static [&'static str] {
        match self {
            Self::Phi3Mini => &["microsoft/Phi-3-mini-4k-instruct"],
            Self::Llama32_1b => &[
                "meta-llama/Llama-3.2-1B-Instruct",
                "meta-llama/Llama-3.2-1B",
            ],
            Self::Llama32_3b => &[
                "meta-llama/Llama-3.2-3B-Instruct",
                "meta-llama/Llama-3.2-3B",
            ],
            Self::Qwen3_0_6b => &["Qwen/Qwen3-0.6B", "Qwen/Qwen3-0.6B-Base"],
            Self::Qwen3_1_7b => &["Qwen/Qwen3-1.7B", "Qwen/Qwen3-1.7B-Base"],
            Self::Qwen3_4b => &["Qwen/Qwen3-4B", "Qwen/Qwen3-4B-Base"],
            Self::Tiny | Self::TinyLlama | Self::TinyQwen3 => &[],
        }
    }

    /// The hub id the preset downloads (its instruct model), if it has one.
    pub fn hub_id(self) -> Option<&'static str> {
        self.hub_ids().first().copied()
    }

    /// The built-in preset a hub id names (case-insensitive), if any.
    pub fn for_hub_id(id: &str) -> Option<Self> {
        Self::value_variants()
            .iter()
            .copied()
            .find(|p| p.hub_ids().iter().any(|h| h.eq_ignore_ascii_case(id)))
    }
}

/// Whole-run presets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Preset {
    /// The benchmark's default workload on phi-3-mini.
    Phi3Mini,
    /// The tiny model on synthetic data with random weights: the demo and the tests.
    Tiny,
    /// The seed project's own configuration for this binary (see `Config::apply_seed_preset`).
    Seed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum DeviceChoice {
    /// CUDA if present, then MPS (PyTorch) / the GPU (MLX), else the CPU.
    Auto,
    Cpu,
    Cuda,
    Mps,
    /// MLX's GPU stream: Metal on a Mac.
    Gpu,
}

/// Numeric precision of weights and compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum DTypeChoice {
    /// `bf16` on CUDA and Apple GPUs, `float32` on the CPU.
    Auto,
    /// fp32 weights and compute: the reference for parity tests.
    Float32,
    /// bf16 weights, activations and gradients; loss, norms' statistics and softmax in fp32.
    Bf16,
    /// fp32 master weights and optimizer state, bf16 matrix products: what `torch.autocast(bf16)` does.
    MixedBf16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum OverlongPolicy {
    /// Keep the first `max_seq_len` tokens (counted in the summary).
    Truncate,
    /// Leave the record out (counted in the summary).
    Drop,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum BadRecordPolicy {
    /// Stop before the model loads, naming the file, the record and the field.
    Error,
    /// Leave the record out and count it in the summary.
    Skip,
}

/// Everything that defines the work: hashed into the summary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Workload {
    pub mode: TuningMode,
    /// Overrides the mode's sample count.
    pub samples: Option<usize>,
    pub seed: u64,
    pub model: ModelConfig,
    pub data: DataConfig,
    pub strategy: StrategyConfig,
    pub batch: BatchConfig,
    pub train: TrainConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// Hub id or local folder holding `config.json` (+ safetensors for pretrained weights).
    pub source: String,
    /// A built-in shape; when set, `config.json` is not read.
    pub preset: Option<ModelPreset>,
    pub weights: WeightsKind,
    /// Hub revision for `source`.
    pub revision: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// `synthetic`, a hub dataset id, or a local JSONL / Parquet / CSV file with the dolly fields.
    pub dataset: String,
    /// Tokenizer folder or hub id (holding `tokenizer.json` + `tokenizer_config.json`);
    /// defaults to the model source.
    pub tokenizer: Option<String>,
    pub max_seq_len: usize,
    /// Train on prompt tokens too (default: loss on the response only).
    pub train_on_prompt: bool,
    /// Pad every record to this length (the seed padded to 2048).
    pub pad_to: Option<usize>,
    pub overlong: OverlongPolicy,
    pub on_bad_record: BadRecordPolicy,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StrategyConfig {
    pub kind: StrategyKind,
    /// Blocks that train for `last-n` (the LM head always trains in `last-n`).
    pub last_n: usize,
    pub lora_rank: usize,
    pub lora_alpha: f64,
    pub lora_targets: Vec<LoraTarget>,
    /// Activation checkpointing: each block that needs gradients keeps only its input in the
    /// forward pass and is computed again in the backward pass. How a step computes, not what:
    /// the losses and gradients are the same (tested), so it is not in the workload hash.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub grad_checkpoint: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchConfig {
    pub plan: BatchPlanKind,
    /// Records per micro-batch (`padded`); with `grad_accum` it fixes the records per optimizer step.
    pub micro_batch_size: usize,
    pub grad_accum: usize,
    /// Padded-token budget of one micro-batch (`bucketed`, `packed`).
    pub max_tokens_per_micro_batch: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    pub epochs: usize,
    /// Stop after this many optimizer steps.
    pub max_steps: Option<usize>,
    pub lr: f64,
    /// Linear warm-up of the learning rate, in optimizer steps; cosine decay to 0 afterwards.
    pub lr_warmup_steps: usize,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Clip the global gradient norm to this value (0 disables).
    pub max_grad_norm: f64,
}

/// How a run is executed and measured; not part of the workload hash.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunOptions {
    pub device: DeviceChoice,
    pub dtype: DTypeChoice,
    /// Optimizer steps left out of the steady-state figures (default: min(3, 10 % of steps), at least 1).
    pub timing_warmup_steps: Option<usize>,
    pub repeats: usize,
    /// Folder that receives `runs/<run-id>/`; default: the binary's crate folder.
    pub output_dir: Option<PathBuf>,
    pub quiet: bool,
    /// Measure the device's bf16 matmul peak before training (for `mfu_measured`).
    pub calibrate: bool,
    /// Data-parallel processes this run spawns and supervises, one per GPU (1 = no spawning;
    /// ranks started by an external launcher are read from RANK/WORLD_SIZE instead).
    pub nproc: usize,
    /// Seconds a rank may wait in one collective (or the supervisor for a rank's next step)
    /// before the run fails naming the rank.
    pub dist_timeout_s: f64,
    /// Hardware telemetry sampling interval in milliseconds (utilisation, power, energy,
    /// temperature); 0 turns the sampler off entirely.
    pub telemetry_interval_ms: u64,
    /// Start even when the memory estimate exceeds the device's total memory (otherwise a usage
    /// error: such a run can only fail, often by the host killing it without a summary).
    pub allow_oversubscribe: bool,
    /// Set by [`Config::resolve`] when it chose the records per step from the record count (no
    /// preset, file or flag set them): the sentence `--plan` and the summary's notes show.
    #[serde(skip)]
    pub batch_note: Option<String>,
}

/// The whole configuration of one run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub workload: Workload,
    pub run: RunOptions,
}

/// Upper bounds on user numbers. They sit far above any real workload and keep every product the
/// benchmark forms from them (records x epochs, tokens x width x blocks in the memory estimate,
/// sequence length squared in a packed micro-batch's mask) inside 64 bits: a release build does not
/// check integer overflow, so an unbounded input would wrap to a wrong figure or a panic.
pub mod limits {
    /// Tokens per record (`max_seq_len`, `pad_to`).
    pub const MAX_SEQ_LEN: usize = 1 << 20;
    /// Padded tokens in one micro-batch (`max_tokens_per_micro_batch`; for the padded plan,
    /// `micro_batch_size` x the padded length).
    pub const MAX_TOKENS_PER_MICRO_BATCH: usize = 1 << 21;
    /// Records laid out in the plan: records x epochs, or max_steps x records per step if fewer.
    /// The plan holds every step's token ids (and labels, positions) in host memory before the
    /// model loads: about 8 KB per dolly-sized record (1M synthetic records: 8.3 GB, 32 s).
    pub const MAX_PLANNED_RECORDS: usize = 1 << 20;
    /// `dist_timeout` in seconds (one week).
    pub const MAX_DIST_TIMEOUT_S: f64 = 7.0 * 86_400.0;
}
/// Steps the default batch size leaves a run at least (where it has the records): one warm-up
/// step and 10 steady ones, so that the steady figures of the default fast run (100 records) rest
/// on 10 steps, not on one (see [`Config::records_per_step_for`]).
pub const MIN_STEPS_FOR_DEFAULT_BATCH: usize = 11;

pub const PHI3_MINI_HUB_ID: &str = "microsoft/Phi-3-mini-4k-instruct";
pub const DOLLY_HUB_ID: &str = "databricks/databricks-dolly-15k";
pub const SYNTHETIC: &str = "synthetic";

impl Default for Workload {
    fn default() -> Self {
        Self {
            mode: TuningMode::Fast,
            samples: None,
            seed: 42,
            model: ModelConfig::default(),
            data: DataConfig::default(),
            strategy: StrategyConfig::default(),
            batch: BatchConfig::default(),
            train: TrainConfig::default(),
        }
    }
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            source: PHI3_MINI_HUB_ID.into(),
            preset: None,
            weights: WeightsKind::Pretrained,
            revision: "main".into(),
        }
    }
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            dataset: DOLLY_HUB_ID.into(),
            tokenizer: None,
            max_seq_len: 2048,
            train_on_prompt: false,
            pad_to: None,
            overlong: OverlongPolicy::Truncate,
            on_bad_record: BadRecordPolicy::Error,
        }
    }
}

impl Default for StrategyConfig {
    fn default() -> Self {
        Self {
            kind: StrategyKind::LastN,
            last_n: 4,
            lora_rank: 16,
            lora_alpha: 32.0,
            lora_targets: LoraTarget::ALL.to_vec(),
            grad_checkpoint: false,
        }
    }
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            plan: BatchPlanKind::Bucketed,
            // 64 records (about 17k tokens of dolly) per optimizer step.
            micro_batch_size: 8,
            grad_accum: 8,
            max_tokens_per_micro_batch: 16_384,
        }
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            epochs: 1,
            max_steps: None,
            lr: 2e-5,
            lr_warmup_steps: 0,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            max_grad_norm: 1.0,
        }
    }
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            device: DeviceChoice::Auto,
            dtype: DTypeChoice::Auto,
            timing_warmup_steps: None,
            repeats: 1,
            output_dir: None,
            quiet: false,
            calibrate: false,
            nproc: 1,
            dist_timeout_s: 300.0,
            telemetry_interval_ms: crate::measure::telemetry::DEFAULT_INTERVAL_MS,
            allow_oversubscribe: false,
            batch_note: None,
        }
    }
}

/// Which binary is asking: presets differ where the seed's two scripts differed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Framework {
    Pytorch,
    Mlx,
}

impl fmt::Display for Framework {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Framework::Pytorch => "pytorch",
            Framework::Mlx => "mlx",
        })
    }
}

/// The flags both binaries accept. Every flag overrides the TOML file and the preset.
#[derive(Debug, Clone, Default, Args)]
pub struct CliArgs {
    /// TOML file with any of the settings (sections [workload.*] and [run]); flags override it.
    #[arg(long, value_name = "FILE.toml")]
    pub config: Option<PathBuf>,
    /// Start from a preset: phi3-mini (default workload), tiny (2-layer model, synthetic data,
    /// random weights), seed (the seed project's own configuration for this framework).
    #[arg(long, value_enum)]
    pub preset: Option<Preset>,
    /// fast = first 100 records, full = all 15,011 (overrides TUNING_MODE in main.rs).
    #[arg(long, value_enum)]
    pub mode: Option<TuningMode>,
    /// Number of records to train on (overrides --mode).
    #[arg(long)]
    pub samples: Option<usize>,
    #[arg(long, value_enum)]
    pub strategy: Option<StrategyKind>,
    /// Blocks that train with --strategy last-n (the LM head trains too).
    #[arg(long)]
    pub last_n: Option<usize>,
    #[arg(long)]
    pub lora_rank: Option<usize>,
    #[arg(long)]
    pub lora_alpha: Option<f64>,
    /// Comma-separated: qkv_proj,o_proj,gate_up_proj,down_proj (Phi-3's fused names; on Llama
    /// and Qwen3 qkv_proj adapts q_proj, k_proj and v_proj, gate_up_proj gate_proj and up_proj).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub lora_targets: Option<Vec<LoraTarget>>,
    /// Model: hub id or local folder with config.json (and safetensors for pretrained weights) of
    /// a Phi-3, Llama 3.x or Qwen3 model, or a built-in shape: phi3-mini, llama-3.2-1b,
    /// llama-3.2-3b, qwen3-0.6b, qwen3-1.7b, qwen3-4b, tiny (Phi-3), tiny-llama, tiny-qwen3.
    #[arg(long)]
    pub model: Option<String>,
    #[arg(long, value_enum)]
    pub weights: Option<WeightsKind>,
    /// Tokenizer folder or hub id (default: the model's).
    #[arg(long)]
    pub tokenizer: Option<String>,
    /// `synthetic`, a hub dataset id, or a local .jsonl / .parquet / .csv file with dolly's fields.
    #[arg(long)]
    pub dataset: Option<String>,
    #[arg(long, value_enum)]
    pub batch_plan: Option<BatchPlanKind>,
    #[arg(long)]
    pub micro_batch_size: Option<usize>,
    #[arg(long)]
    pub grad_accum: Option<usize>,
    /// Padded-token budget per micro-batch for the bucketed and packed plans.
    #[arg(long)]
    pub max_tokens_per_micro_batch: Option<usize>,
    #[arg(long)]
    pub max_seq_len: Option<usize>,
    /// Pad every record to N tokens (the seed's PyTorch script padded to 2048).
    #[arg(long)]
    pub pad_to: Option<usize>,
    /// Compute the loss on prompt tokens too.
    #[arg(long)]
    pub train_on_prompt: bool,
    /// Activation checkpointing: keep only each training block's input in the forward pass and
    /// compute the block again in the backward pass (less memory, about a third more FLOPs).
    #[arg(long)]
    pub grad_checkpoint: bool,
    #[arg(long, value_enum)]
    pub overlong: Option<OverlongPolicy>,
    #[arg(long, value_enum)]
    pub on_bad_record: Option<BadRecordPolicy>,
    #[arg(long)]
    pub max_steps: Option<usize>,
    #[arg(long)]
    pub epochs: Option<usize>,
    #[arg(long)]
    pub lr: Option<f64>,
    /// Learning-rate warm-up in optimizer steps (then cosine decay to zero).
    #[arg(long)]
    pub warmup_steps: Option<usize>,
    #[arg(long)]
    pub weight_decay: Option<f64>,
    #[arg(long)]
    pub max_grad_norm: Option<f64>,
    #[arg(long)]
    pub seed: Option<u64>,
    #[arg(long, value_enum)]
    pub dtype: Option<DTypeChoice>,
    #[arg(long, value_enum)]
    pub device: Option<DeviceChoice>,
    /// Optimizer steps excluded from steady-state timing.
    #[arg(long)]
    pub timing_warmup_steps: Option<usize>,
    /// Run the workload R times in fresh state and report the median and spread.
    #[arg(long)]
    pub repeats: Option<usize>,
    /// Measure the device's bf16 matmul peak first, for `mfu_measured`.
    #[arg(long)]
    pub calibrate: bool,
    /// Data parallelism: spawn and supervise N processes, one per GPU, NCCL between them
    /// (PyTorch binary, Linux + CUDA). Ranks started by another launcher need no flag: RANK,
    /// WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT are read from the environment.
    #[arg(long, value_name = "N")]
    pub nproc: Option<usize>,
    /// Seconds a collective (or a rank's next step) may take before the run fails naming the
    /// rank (default 300).
    #[arg(long, value_name = "SECONDS")]
    pub dist_timeout: Option<f64>,
    /// Folder that receives runs/<run-id>/ (default: this binary's crate folder).
    #[arg(long)]
    pub output_dir: Option<PathBuf>,
    /// No progress bar; only errors and the final line.
    #[arg(long)]
    pub quiet: bool,
    /// Print the workload, the batch plan and the memory estimate (and whether it fits the
    /// device's free memory), then exit without loading the model or writing anything.
    #[arg(long)]
    pub plan: bool,
    /// Print what fits where: for every built-in model, strategy and --grad-checkpoint on/off,
    /// the largest token budget whose memory estimate fits common device sizes (this binary's
    /// framework: CUDA cards for PyTorch, Apple unified memory for MLX), then exit.
    #[arg(long)]
    pub fit: bool,
    /// Sample GPU/CPU utilisation, power, energy and temperature every N ms into the run
    /// folder's telemetry.jsonl (default 200; 0 = off, no sampler thread at all).
    #[arg(long, value_name = "MS")]
    pub telemetry_interval_ms: Option<u64>,
    /// Start even when the memory estimate exceeds the device's total memory (by default such a
    /// run is refused before anything loads: it can only fail).
    #[arg(long)]
    pub allow_oversubscribe: bool,
}

impl Config {
    /// Defaults for a binary whose `main.rs` says `TUNING_MODE = mode`.
    pub fn defaults(mode: TuningMode) -> Self {
        let mut c = Config::default();
        c.workload.mode = mode;
        c
    }

    /// Applies a preset on top of the current values.
    pub fn apply_preset(&mut self, preset: Preset, framework: Framework) {
        let w = &mut self.workload;
        match preset {
            Preset::Phi3Mini => {
                w.model.preset = Some(ModelPreset::Phi3Mini);
                w.model.source = PHI3_MINI_HUB_ID.into();
            }
            Preset::Tiny => {
                w.model.preset = Some(ModelPreset::Tiny);
                w.model.weights = WeightsKind::Random;
                w.data.dataset = SYNTHETIC.into();
                w.data.max_seq_len = 512;
                // Two blocks: train the last one (+ head), so last-n still freezes a prefix.
                w.strategy.last_n = 1;
                w.batch.micro_batch_size = 4;
                w.batch.grad_accum = 4;
                w.batch.max_tokens_per_micro_batch = 2048;
                w.train.lr = 3e-3;
                w.train.lr_warmup_steps = 2;
            }
            Preset::Seed => self.apply_seed_preset(framework),
        }
    }

    /// The seed project's two scripts, reproduced. They trained different parameter sets with
    /// different padding; the preset keeps each binary's own so that reports show the gap.
    fn apply_seed_preset(&mut self, framework: Framework) {
        let w = &mut self.workload;
        w.model.preset = Some(ModelPreset::Phi3Mini);
        w.data.train_on_prompt = true;
        w.batch.plan = BatchPlanKind::Padded;
        w.batch.micro_batch_size = 1;
        w.train.lr_warmup_steps = 0;
        w.train.weight_decay = 0.0;
        match framework {
            Framework::Pytorch => {
                // HF Trainer: full fine-tuning, bf16 weights, every sample padded to 2048,
                // batch 1 x accumulation 4, AdamW lr 2e-5.
                w.strategy.kind = StrategyKind::Full;
                w.data.max_seq_len = 2048;
                w.data.pad_to = Some(2048);
                w.batch.grad_accum = 4;
                w.train.lr = 2e-5;
                self.run.dtype = DTypeChoice::Bf16;
            }
            Framework::Mlx => {
                // mlx script: last 4 blocks + head, batch 1, no padding, Adam lr 1e-5.
                w.strategy.kind = StrategyKind::LastN;
                w.strategy.last_n = 4;
                w.data.pad_to = None;
                w.batch.grad_accum = 1;
                w.train.lr = 1e-5;
                w.train.max_grad_norm = 0.0;
            }
        }
    }

    /// Builds the configuration: defaults < preset < TOML file < flags, then validates it.
    pub fn resolve(
        mode: TuningMode,
        args: &CliArgs,
        framework: Framework,
    ) -> Result<Self, ConfigError> {
        let mut cfg = Config::defaults(mode);
        let file_table = match &args.config {
            Some(path) => Some(read_toml(path)?),
            None => None,
        };
        // A preset named on the command line wins over one named in the file.
        let file_preset = match file_table.as_ref().and_then(|t| t.get("preset")) {
            Some(v) => Some(
                Preset::deserialize(v.clone()).map_err(|e| ConfigError::Value {
                    key: "preset".into(),
                    value: v.to_string(),
                    reason: e.to_string(),
                    fix: "use one of: phi3-mini, tiny, seed".into(),
                })?,
            ),
            None => None,
        };
        let preset = args.preset.or(file_preset);
        if let Some(p) = preset {
            cfg.apply_preset(p, framework);
        }
        // Whether anything but the built-in default says how many records a step holds.
        let file_sets_batch = file_table.as_ref().is_some_and(|t| {
            let batch = t
                .get("workload")
                .and_then(|w| w.get("batch"))
                .and_then(|b| b.as_table());
            batch
                .is_some_and(|b| b.contains_key("micro_batch_size") || b.contains_key("grad_accum"))
        });
        let batch_set = file_sets_batch
            || args.micro_batch_size.is_some()
            || args.grad_accum.is_some()
            || preset.is_some_and(|p| matches!(p, Preset::Tiny | Preset::Seed));
        if let (Some(mut table), Some(path)) = (file_table, &args.config) {
            table.remove("preset");
            cfg = merge_toml(&cfg, table, path)?;
        }
        cfg.apply_flags(args)?;
        if !batch_set {
            cfg.choose_records_per_step();
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// The default records per step, fitted to the run's record count (see
    /// [`Config::records_per_step_for`]); says so in `run.batch_note` when it differs from 8 x 8.
    fn choose_records_per_step(&mut self) {
        let records = self
            .sample_count()
            .saturating_mul(self.workload.train.epochs.max(1));
        let (mbs, ga) = Self::records_per_step_for(records);
        let b = &mut self.workload.batch;
        let d = BatchConfig::default();
        (b.micro_batch_size, b.grad_accum) = (mbs, ga);
        if (mbs, ga) != (d.micro_batch_size, d.grad_accum) {
            self.run.batch_note = Some(format!(
                "batch: {} records per step ({mbs} x {ga}) instead of the default {} ({} x {}): chosen so that {records} records make at least {MIN_STEPS_FOR_DEFAULT_BATCH} optimizer steps (1 warm-up, 10 steady); --micro-batch-size and --grad-accum set it",
                mbs * ga,
                d.micro_batch_size * d.grad_accum,
                d.micro_batch_size,
                d.grad_accum
            ));
        }
    }

    fn apply_flags(&mut self, a: &CliArgs) -> Result<(), ConfigError> {
        let w = &mut self.workload;
        if let Some(m) = a.mode {
            w.mode = m;
            w.samples = None;
        }
        set(&mut w.samples, a.samples.map(Some));
        set(&mut w.strategy.kind, a.strategy);
        set(&mut w.strategy.last_n, a.last_n);
        set(&mut w.strategy.lora_rank, a.lora_rank);
        set(&mut w.strategy.lora_alpha, a.lora_alpha);
        set(&mut w.strategy.lora_targets, a.lora_targets.clone());
        if let Some(m) = &a.model {
            match ModelPreset::from_str(m, true) {
                Ok(p) => {
                    w.model.preset = Some(p);
                    if let Some(id) = p.hub_id() {
                        w.model.source = id.into();
                    }
                }
                Err(_) => {
                    w.model.preset = None;
                    w.model.source = m.clone();
                }
            }
        }
        set(&mut w.model.weights, a.weights);
        set(&mut w.data.tokenizer, a.tokenizer.clone().map(Some));
        set(&mut w.data.dataset, a.dataset.clone());
        set(&mut w.batch.plan, a.batch_plan);
        set(&mut w.batch.micro_batch_size, a.micro_batch_size);
        set(&mut w.batch.grad_accum, a.grad_accum);
        set(
            &mut w.batch.max_tokens_per_micro_batch,
            a.max_tokens_per_micro_batch,
        );
        set(&mut w.data.max_seq_len, a.max_seq_len);
        set(&mut w.data.pad_to, a.pad_to.map(Some));
        if a.train_on_prompt {
            w.data.train_on_prompt = true;
        }
        if a.grad_checkpoint {
            w.strategy.grad_checkpoint = true;
        }
        set(&mut w.data.overlong, a.overlong);
        set(&mut w.data.on_bad_record, a.on_bad_record);
        set(&mut w.train.max_steps, a.max_steps.map(Some));
        set(&mut w.train.epochs, a.epochs);
        set(&mut w.train.lr, a.lr);
        set(&mut w.train.lr_warmup_steps, a.warmup_steps);
        set(&mut w.train.weight_decay, a.weight_decay);
        set(&mut w.train.max_grad_norm, a.max_grad_norm);
        set(&mut w.seed, a.seed);
        let r = &mut self.run;
        set(&mut r.dtype, a.dtype);
        set(&mut r.device, a.device);
        set(&mut r.timing_warmup_steps, a.timing_warmup_steps.map(Some));
        set(&mut r.repeats, a.repeats);
        set(&mut r.nproc, a.nproc);
        set(&mut r.dist_timeout_s, a.dist_timeout);
        set(&mut r.output_dir, a.output_dir.clone().map(Some));
        if a.quiet {
            r.quiet = true;
        }
        if a.calibrate {
            r.calibrate = true;
        }
        set(&mut r.telemetry_interval_ms, a.telemetry_interval_ms);
        if a.allow_oversubscribe {
            r.allow_oversubscribe = true;
        }
        Ok(())
    }

    /// Checks that do not need the model's shape. Shape-dependent checks (LoRA rank, `last_n`
    /// against the layer count, the tokenizer's vocabulary) are in `workload::validate_for_shape`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let w = &self.workload;
        let bad = |key: &str, value: String, reason: &str, fix: &str| ConfigError::Value {
            key: key.into(),
            value,
            reason: reason.into(),
            fix: fix.into(),
        };
        if w.samples == Some(0) {
            return Err(bad(
                "samples",
                "0".into(),
                "at least one record is needed",
                "use --samples 1 or more",
            ));
        }
        if w.batch.micro_batch_size == 0 {
            return Err(bad(
                "micro_batch_size",
                "0".into(),
                "must be at least 1",
                "use --micro-batch-size 1 or more",
            ));
        }
        if w.batch.grad_accum == 0 {
            return Err(bad(
                "grad_accum",
                "0".into(),
                "must be at least 1",
                "use --grad-accum 1 or more",
            ));
        }
        use limits::*;
        if w.batch
            .micro_batch_size
            .checked_mul(w.batch.grad_accum)
            .is_none()
        {
            return Err(bad(
                "micro_batch_size",
                w.batch.micro_batch_size.to_string(),
                &format!(
                    "times grad_accum ({}) overflows: no step can hold that many records",
                    w.batch.grad_accum
                ),
                "use values whose product is the records per step you want, e.g. --micro-batch-size 8 --grad-accum 8",
            ));
        }
        if w.data.dataset == SYNTHETIC && self.sample_count() > MAX_PLANNED_RECORDS {
            return Err(bad(
                "samples",
                self.sample_count().to_string(),
                &format!(
                    "above the {MAX_PLANNED_RECORDS} synthetic records the plan can hold in memory"
                ),
                "use fewer --samples (dolly-15k has 15,011), and --epochs for more steps",
            ));
        }
        if w.data.max_seq_len > MAX_SEQ_LEN {
            return Err(bad(
                "max_seq_len",
                w.data.max_seq_len.to_string(),
                &format!("above the largest supported length ({MAX_SEQ_LEN} tokens)"),
                "use the model's context length or less, e.g. --max-seq-len 2048",
            ));
        }
        if let Some(p) = w.data.pad_to.filter(|&p| p > MAX_SEQ_LEN) {
            return Err(bad(
                "pad_to",
                p.to_string(),
                &format!("above the largest supported length ({MAX_SEQ_LEN} tokens)"),
                "use --pad-to no longer than the model's context, e.g. --pad-to 2048",
            ));
        }
        if w.batch.plan != BatchPlanKind::Padded
            && w.batch.max_tokens_per_micro_batch > MAX_TOKENS_PER_MICRO_BATCH
        {
            return Err(bad(
                "max_tokens_per_micro_batch",
                w.batch.max_tokens_per_micro_batch.to_string(),
                &format!(
                    "above the largest supported micro-batch ({MAX_TOKENS_PER_MICRO_BATCH} tokens)"
                ),
                "use a budget that fits the device, e.g. --max-tokens-per-micro-batch 16384 (--plan estimates its memory)",
            ));
        }
        if w.batch.plan == BatchPlanKind::Padded {
            let len = w.data.pad_to.unwrap_or(w.data.max_seq_len);
            let tokens = w.batch.micro_batch_size.saturating_mul(len);
            if tokens > MAX_TOKENS_PER_MICRO_BATCH {
                return Err(bad(
                    "micro_batch_size",
                    w.batch.micro_batch_size.to_string(),
                    &format!(
                        "a padded micro-batch of that many records of {len} tokens holds {tokens} tokens, above the largest supported ({MAX_TOKENS_PER_MICRO_BATCH})"
                    ),
                    &format!(
                        "use --micro-batch-size {} or less (and a larger --grad-accum for the same records per step)",
                        (MAX_TOKENS_PER_MICRO_BATCH / len).max(1)
                    ),
                ));
            }
        }
        if w.data.max_seq_len < 8 {
            return Err(bad(
                "max_seq_len",
                w.data.max_seq_len.to_string(),
                "too short for the chat template",
                "use --max-seq-len 8 or more (2048 is the default)",
            ));
        }
        if let Some(p) = w.data.pad_to {
            if p < w.data.max_seq_len {
                return Err(bad(
                    "pad_to",
                    p.to_string(),
                    &format!(
                        "shorter than max_seq_len ({}), so some records could not be padded to it",
                        w.data.max_seq_len
                    ),
                    &format!("use --max-seq-len {p} with --pad-to {p}, or a larger --pad-to"),
                ));
            }
            if w.batch.plan != BatchPlanKind::Padded {
                return Err(bad(
                    "pad_to",
                    p.to_string(),
                    "only the padded batch plan pads to a fixed length",
                    "add --batch-plan padded, or drop --pad-to",
                ));
            }
        }
        if w.batch.max_tokens_per_micro_batch < w.data.max_seq_len
            && w.batch.plan != BatchPlanKind::Padded
        {
            return Err(bad(
                "max_tokens_per_micro_batch",
                w.batch.max_tokens_per_micro_batch.to_string(),
                &format!(
                    "smaller than max_seq_len ({}): the longest record would not fit",
                    w.data.max_seq_len
                ),
                &format!(
                    "use --max-tokens-per-micro-batch {} or more, or a smaller --max-seq-len",
                    w.data.max_seq_len
                ),
            ));
        }
        if w.train.epochs == 0 {
            return Err(bad(
                "epochs",
                "0".into(),
                "must be at least 1",
                "use --epochs 1 or more",
            ));
        }
        if w.train.max_steps == Some(0) {
            return Err(bad(
                "max_steps",
                "0".into(),
                "must be at least 1",
                "use --max-steps 1 or more, or drop it",
            ));
        }
        if !(w.train.lr.is_finite() && w.train.lr > 0.0) {
            return Err(bad(
                "lr",
                w.train.lr.to_string(),
                "must be a positive number",
                "e.g. --lr 2e-5",
            ));
        }
        if !(w.train.weight_decay.is_finite() && w.train.weight_decay >= 0.0) {
            return Err(bad(
                "weight_decay",
                w.train.weight_decay.to_string(),
                "must be >= 0",
                "e.g. --weight-decay 0.01",
            ));
        }
        if !(w.train.max_grad_norm.is_finite() && w.train.max_grad_norm >= 0.0) {
            return Err(bad(
                "max_grad_norm",
                w.train.max_grad_norm.to_string(),
                "must be >= 0 (0 disables clipping)",
                "e.g. --max-grad-norm 1.0",
            ));
        }
        for (k, v) in [("beta1", w.train.beta1), ("beta2", w.train.beta2)] {
            if !(0.0..1.0).contains(&v) {
                return Err(bad(
                    k,
                    v.to_string(),
                    "must lie in [0, 1)",
                    "e.g. 0.9 for beta1, 0.999 for beta2",
                ));
            }
        }
        if w.train.eps.is_nan() || w.train.eps <= 0.0 {
            return Err(bad(
                "eps",
                w.train.eps.to_string(),
                "must be > 0",
                "e.g. 1e-8",
            ));
        }
        if w.strategy.kind == StrategyKind::Lora {
            if w.strategy.lora_rank == 0 {
                return Err(bad(
                    "lora_rank",
                    "0".into(),
                    "must be at least 1",
                    "e.g. --lora-rank 16",
                ));
            }
            if w.strategy.lora_targets.is_empty() {
                return Err(bad(
                    "lora_targets",
                    "[]".into(),
                    "LoRA needs at least one target",
                    "e.g. --lora-targets qkv_proj,o_proj,gate_up_proj,down_proj",
                ));
            }
            if !(w.strategy.lora_alpha.is_finite() && w.strategy.lora_alpha > 0.0) {
                return Err(bad(
                    "lora_alpha",
                    w.strategy.lora_alpha.to_string(),
                    "must be > 0",
                    "e.g. --lora-alpha 32",
                ));
            }
        }
        if w.strategy.kind == StrategyKind::LastN && w.strategy.last_n == 0 {
            return Err(bad(
                "last_n",
                "0".into(),
                "at least one block must train",
                "use --last-n 1 or more, or --strategy full",
            ));
        }
        if !(1..=64).contains(&self.run.nproc) {
            return Err(bad(
                "nproc",
                self.run.nproc.to_string(),
                "must be between 1 and 64 processes",
                "use --nproc 1 (one GPU) up to the number of GPUs of the machine",
            ));
        }
        if !(self.run.dist_timeout_s.is_finite()
            && self.run.dist_timeout_s > 0.0
            && self.run.dist_timeout_s <= limits::MAX_DIST_TIMEOUT_S)
        {
            return Err(bad(
                "dist_timeout",
                self.run.dist_timeout_s.to_string(),
                "must be a positive number of seconds, at most a week (604800)",
                "use e.g. --dist-timeout 300",
            ));
        }
        if self.run.nproc > 1 && self.run.repeats > 1 {
            return Err(bad(
                "nproc",
                self.run.nproc.to_string(),
                "--repeats with several processes is not supported",
                "run the repeats as separate --nproc runs, or use --repeats 1",
            ));
        }
        if self.run.repeats == 0 {
            return Err(bad(
                "repeats",
                "0".into(),
                "must be at least 1",
                "use --repeats 1 or more",
            ));
        }
        let ti = self.run.telemetry_interval_ms;
        {
            use crate::measure::telemetry::{MAX_INTERVAL_MS, MIN_INTERVAL_MS};
            if ti != 0 && !(MIN_INTERVAL_MS..=MAX_INTERVAL_MS).contains(&ti) {
                return Err(bad(
                    "telemetry_interval_ms",
                    ti.to_string(),
                    &format!(
                        "must be 0 (off) or {MIN_INTERVAL_MS} to {MAX_INTERVAL_MS} ms: faster, the drivers' readings do not change between samples and sampling costs CPU time; slower, a steady phase gets too few samples"
                    ),
                    "use --telemetry-interval-ms 200 (the default), or 0 to turn telemetry off",
                ));
            }
        }
        if w.data.dataset.trim().is_empty() {
            return Err(bad(
                "dataset",
                "\"\"".into(),
                "empty",
                "use --dataset synthetic, a hub id or a file path",
            ));
        }
        Ok(())
    }

    /// Records to train on.
    pub fn sample_count(&self) -> usize {
        self.workload
            .samples
            .unwrap_or_else(|| self.workload.mode.samples())
    }

    /// Optimizer steps excluded from steady-state figures for a run of `steps` steps
    /// (`measure::steady::warmup_steps`: by default min(3, 10 % of steps), at least 1, so a
    /// 1-step run has no steady step).
    pub fn timing_warmup_steps(&self, steps: usize) -> usize {
        crate::measure::steady::warmup_steps(steps, self.run.timing_warmup_steps)
    }

    /// Records per optimizer step when no preset, file or flag sets `micro_batch_size` or
    /// `grad_accum`: the default 8 x 8 = 64 where that leaves at least
    /// [`MIN_STEPS_FOR_DEFAULT_BATCH`] steps (4,096 records, all of dolly), else fewer records
    /// per step so that the run has that many steps (100 records: 8 x 1 = 8, 13 steps). Keeps the
    /// micro-batch at 8 records while a step holds 8 or more; a step is cut in whole micro-batches.
    pub fn records_per_step_for(records: usize) -> (usize, usize) {
        let d = BatchConfig::default();
        let full = d.micro_batch_size * d.grad_accum;
        let per_step = (records / MIN_STEPS_FOR_DEFAULT_BATCH).clamp(1, full);
        if per_step >= d.micro_batch_size {
            (d.micro_batch_size, per_step / d.micro_batch_size)
        } else {
            (per_step, 1)
        }
    }
}

fn set<T>(slot: &mut T, value: Option<T>) {
    if let Some(v) = value {
        *slot = v;
    }
}

fn read_toml(path: &Path) -> Result<toml::Table, ConfigError> {
    // A regular file only (a FIFO would block the read forever); a byte-order mark is dropped.
    let text = crate::files::read_text(path).map_err(|e| ConfigError::File {
        path: path.to_path_buf(),
        reason: e,
    })?;
    text.parse::<toml::Table>().map_err(|e| ConfigError::File {
        path: path.to_path_buf(),
        reason: format!("not valid TOML: {e}"),
    })
}

/// Deep-merges `file` over `base` and deserializes, so unknown keys and bad values are reported
/// with their TOML path.
fn merge_toml(base: &Config, file: toml::Table, path: &Path) -> Result<Config, ConfigError> {
    let mut merged = toml::Table::try_from(base).map_err(|e| ConfigError::File {
        path: path.to_path_buf(),
        reason: format!("internal: defaults did not serialize: {e}"),
    })?;
    deep_merge(&mut merged, file);
    Config::deserialize(toml::Value::Table(merged)).map_err(|e| ConfigError::File {
        path: path.to_path_buf(),
        reason: format!(
            "{}. Valid sections: [workload], [workload.model], [workload.data], [workload.strategy], \
             [workload.batch], [workload.train], [run]; see README's configuration table",
            e.to_string().trim()
        ),
    })
}

fn deep_merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => deep_merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: CliArgs,
    }

    /// The flags `argv` (without the program name) as the binaries parse them.
    pub(crate) fn parse(argv: &[&str]) -> CliArgs {
        let mut v = vec!["bin"];
        v.extend_from_slice(argv);
        Cli::try_parse_from(v).expect("flags parse").args
    }

    fn write(text: &str) -> tempfile::NamedTempFile {
        let f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
        std::fs::write(f.path(), text).unwrap();
        f
    }

    #[test]
    fn hub_ids_name_their_presets() {
        assert_eq!(
            ModelPreset::for_hub_id("qwen/qwen3-0.6b"),
            Some(ModelPreset::Qwen3_0_6b)
        );
        assert_eq!(
            ModelPreset::for_hub_id("meta-llama/Llama-3.2-3B"),
            Some(ModelPreset::Llama32_3b)
        );
        assert_eq!(ModelPreset::for_hub_id("Qwen/Qwen2.5-0.5B"), None);
        for p in ModelPreset::value_variants() {
            assert_eq!(p.hub_id(), p.hub_ids().first().copied());
            assert_eq!(p.hub_id().is_none(), p.is_tiny(), "{p:?}");
            for id in p.hub_ids() {
                assert_eq!(ModelPreset::for_hub_id(id), Some(*p));
            }
        }
    }

    #[test]
    fn precedence_defaults_preset_file_flags() {
        let f = write("preset = \"tiny\"\n[workload.train]\nlr = 0.5\nepochs = 3\n[workload.batch]\ngrad_accum = 7\n");
        let path = f.path().to_str().unwrap().to_string();
        let c = Config::resolve(
            TuningMode::Fast,
            &parse(&["--config", &path, "--lr", "0.25"]),
            Framework::Pytorch,
        )
        .unwrap();
        assert_eq!(c.workload.train.lr, 0.25, "flag beats file");
        assert_eq!(c.workload.train.epochs, 3, "file beats default");
        assert_eq!(c.workload.batch.grad_accum, 7);
        assert_eq!(
            c.workload.model.preset,
            Some(ModelPreset::Tiny),
            "preset from file applied"
        );
        assert_eq!(c.workload.data.dataset, SYNTHETIC);
        assert_eq!(c.sample_count(), 100);
        let c = Config::resolve(TuningMode::Full, &parse(&[]), Framework::Pytorch).unwrap();
        assert_eq!(c.sample_count(), 15_011);
        let c = Config::resolve(
            TuningMode::Full,
            &parse(&["--mode", "fast"]),
            Framework::Pytorch,
        )
        .unwrap();
        assert_eq!(c.sample_count(), 100, "flag beats TUNING_MODE");
    }

    #[test]
    fn unknown_toml_key_is_an_error_naming_it() {
        let f = write("[workload.train]\nlearning_rate = 0.1\n");
        let path = f.path().to_str().unwrap().to_string();
        let e = Config::resolve(
            TuningMode::Fast,
            &parse(&["--config", &path]),
            Framework::Pytorch,
        )
        .unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("learning_rate"), "{msg}");
        assert!(msg.contains(&path), "{msg}");
    }

    #[test]
    fn bad_toml_value_names_valid_choices() {
        let f = write("[workload.strategy]\nkind = \"half\"\n");
        let path = f.path().to_str().unwrap().to_string();
        let msg = Config::resolve(
            TuningMode::Fast,
            &parse(&["--config", &path]),
            Framework::Pytorch,
        )
        .unwrap_err()
        .to_string();
        assert!(msg.contains("half") && msg.contains("last-n"), "{msg}");
    }

    #[test]
    fn bad_flag_values_name_the_fix() {
        let msg = Config::resolve(
            TuningMode::Fast,
            &parse(&["--grad-accum", "0"]),
            Framework::Pytorch,
        )
        .unwrap_err()
        .to_string();
        assert!(
            msg.contains("grad_accum") && msg.contains("--grad-accum 1"),
            "{msg}"
        );
        let msg = Config::resolve(
            TuningMode::Fast,
            &parse(&["--pad-to", "100"]),
            Framework::Pytorch,
        )
        .unwrap_err()
        .to_string();
        assert!(msg.contains("pad_to") && msg.contains("100"), "{msg}");
    }

    /// Products of user numbers never wrap: they are refused by name before anything runs.
    #[test]
    fn numbers_beyond_the_limits_are_refused() {
        for (argv, key) in [
            (
                &[
                    "--micro-batch-size",
                    "2305843009213693952",
                    "--grad-accum",
                    "8",
                ][..],
                "micro_batch_size",
            ),
            (&["--preset", "tiny", "--samples", "2000000"], "samples"),
            (&["--max-seq-len", "2000000"], "max_seq_len"),
            (
                &[
                    "--max-tokens-per-micro-batch",
                    "4000000",
                    "--max-seq-len",
                    "2048",
                ],
                "max_tokens_per_micro_batch",
            ),
            (
                &["--batch-plan", "padded", "--micro-batch-size", "100000"],
                "micro_batch_size",
            ),
            (&["--dist-timeout", "1e9"], "dist_timeout"),
        ] {
            let msg = Config::resolve(TuningMode::Fast, &parse(argv), Framework::Pytorch)
                .unwrap_err()
                .to_string();
            assert!(
                msg.contains(&format!("invalid {key} = ")),
                "{argv:?}: {msg}"
            );
        }
        // The largest values inside the limits are accepted.
        Config::resolve(
            TuningMode::Fast,
            &parse(&["--preset", "tiny", "--samples", "1048576"]),
            Framework::Pytorch,
        )
        .unwrap();
    }

    #[test]
    fn telemetry_interval_is_validated_and_0_turns_it_off() {
        let c = Config::resolve(TuningMode::Fast, &parse(&[]), Framework::Pytorch).unwrap();
        assert_eq!(c.run.telemetry_interval_ms, 200, "the default");
        let c = Config::resolve(
            TuningMode::Fast,
            &parse(&["--telemetry-interval-ms", "0"]),
            Framework::Pytorch,
        )
        .unwrap();
        assert_eq!(c.run.telemetry_interval_ms, 0);
        for bad in ["5", "600000"] {
            let msg = Config::resolve(
                TuningMode::Fast,
                &parse(&["--telemetry-interval-ms", bad]),
                Framework::Pytorch,
            )
            .unwrap_err()
            .to_string();
            assert!(
                msg.contains(&format!("telemetry_interval_ms = {bad}"))
                    && msg.contains("--telemetry-interval-ms 200")
                    && msg.contains("0 to turn telemetry off"),
                "{msg}"
            );
        }
        let f = write("[run]\ntelemetry_interval_ms = 1000\n");
        let path = f.path().to_str().unwrap().to_string();
        let c = Config::resolve(
            TuningMode::Fast,
            &parse(&["--config", &path]),
            Framework::Pytorch,
        )
        .unwrap();
        assert_eq!(c.run.telemetry_interval_ms, 1000, "the TOML key works");
    }

    #[test]
    fn seed_preset_differs_per_framework() {
        let t = Config::resolve(
            TuningMode::Fast,
            &parse(&["--preset", "seed"]),
            Framework::Pytorch,
        )
        .unwrap();
        assert_eq!(t.workload.strategy.kind, StrategyKind::Full);
        assert_eq!(t.workload.data.pad_to, Some(2048));
        assert_eq!(
            (
                t.workload.batch.micro_batch_size,
                t.workload.batch.grad_accum
            ),
            (1, 4)
        );
        let m = Config::resolve(
            TuningMode::Fast,
            &parse(&["--preset", "seed"]),
            Framework::Mlx,
        )
        .unwrap();
        assert_eq!(m.workload.strategy.kind, StrategyKind::LastN);
        assert_eq!(m.workload.data.pad_to, None);
        assert_eq!(m.workload.train.lr, 1e-5);
    }

    #[test]
    fn timing_warmup_default_follows_measuring_md() {
        let c = Config::default();
        assert_eq!(c.timing_warmup_steps(100), 3);
        assert_eq!(c.timing_warmup_steps(20), 2);
        assert_eq!(c.timing_warmup_steps(5), 1);
        assert_eq!(
            c.timing_warmup_steps(1),
            1,
            "a 1-step run's cold step is not steady"
        );
    }

    /// The default fast run (100 records) gets at least 11 steps; 4,096 records and the full
    /// data set keep 8 x 8 = 64 records per step (the committed H200 figures rely on it); any
    /// preset, file or flag that sets the batch wins.
    #[test]
    fn records_per_step_follow_the_record_count_unless_set() {
        let batch = |argv: &[&str], mode: TuningMode| {
            let c = Config::resolve(mode, &parse(argv), Framework::Pytorch).unwrap();
            let b = &c.workload.batch;
            (b.micro_batch_size, b.grad_accum, c.run.batch_note.is_some())
        };
        assert_eq!(batch(&[], TuningMode::Fast), (8, 1, true));
        let steps = |n: usize| {
            let (m, g) = Config::records_per_step_for(n);
            n.div_ceil(m * g)
        };
        assert_eq!(steps(100), 13);
        for n in [1, 5, 11, 50, 99, 100, 101, 200, 703] {
            assert!(
                steps(n) >= n.min(MIN_STEPS_FOR_DEFAULT_BATCH),
                "{n} records"
            );
        }
        assert_eq!(
            batch(&["--samples", "4096"], TuningMode::Fast),
            (8, 8, false)
        );
        assert_eq!(batch(&["--mode", "full"], TuningMode::Fast), (8, 8, false));
        assert_eq!(batch(&[], TuningMode::Full), (8, 8, false));
        assert_eq!(
            batch(&["--samples", "704"], TuningMode::Fast),
            (8, 8, false)
        );
        assert_eq!(batch(&["--samples", "200"], TuningMode::Fast), (8, 2, true));
        assert_eq!(batch(&["--samples", "40"], TuningMode::Fast), (3, 1, true));
        // Explicit settings win, one of the two is enough.
        assert_eq!(
            batch(&["--grad-accum", "8"], TuningMode::Fast),
            (8, 8, false)
        );
        assert_eq!(
            batch(&["--micro-batch-size", "2"], TuningMode::Fast),
            (2, 8, false)
        );
        assert_eq!(
            batch(&["--preset", "tiny"], TuningMode::Fast),
            (4, 4, false)
        );
        let f = write("[workload.batch]\ngrad_accum = 8\n");
        let path = f.path().to_str().unwrap().to_string();
        assert_eq!(batch(&["--config", &path], TuningMode::Fast), (8, 8, false));
        // Epochs count: 3 passes over 100 records make 300 records of work.
        assert_eq!(batch(&["--epochs", "3"], TuningMode::Fast), (8, 3, true));
    }
}
