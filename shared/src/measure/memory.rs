//! Preflight memory estimate: how many bytes a run will hold at its peak, computed from the model
//! shape, the strategy, the precision and the batch plan before anything is loaded, so that a run
//! that cannot fit says so (and what would fit) instead of failing an hour in.
//!
//! The count follows the tensors the PyTorch backend (`windows_pytorch_benchmark`: `decoder.rs`,
//! `train.rs`) allocates; the MLX backend stores the same parameters, gradients and AdamW moments
//! (fp32 moments for fp32 master weights, the parameter dtype under bf16), so the persistent part
//! is the same there, while its activations depend on MLX's graph evaluation and are only
//! approximated by this count.
//!
//! Persistent, for the whole run:
//! - weights: every base parameter and LoRA adapter in the parameter dtype (fp32 for `float32` and
//!   `mixed-bf16`, whose fp32 weights are the master copy; bf16 for `bf16`);
//! - gradients: one per trainable parameter, in the parameter dtype;
//! - optimizer: AdamW's two moments per trainable parameter, in the parameter dtype (libtorch's
//!   `exp_avg`/`exp_avg_sq` are `zeros_like(param)`).
//!
//! Per micro-batch, at the start of its backward pass (the peak of a step; the worst micro-batch of
//! the plan is taken):
//! - activations: the tensors autograd saves in the blocks that need gradients (all of them for
//!   `full` and `lora`; the last N for `last-n`, whose frozen prefix runs without autograd and keeps
//!   nothing), counted per padded token below, plus the final norm's input;
//! - LM head and loss: computed only at loss positions, in fp32 logits: the saved hidden state, the
//!   log-softmax output kept for backward, and its gradient and input gradient at the backward
//!   peak: 12 bytes per vocabulary entry per loss token;
//! - weight casts: under `mixed-bf16` every product casts its fp32 weight to bf16 and autograd keeps
//!   that copy for the input gradient, in every block that needs gradients (and the head);
//! - transient: one block's largest live intermediates (its MLP, `4 × intermediate` values per
//!   token), the working set of a frozen block's forward or of one block's backward;
//! - attention masks: packed rows carry a boolean `[rows, T, T]` mask; SDPA turns it into an
//!   additive bias in the compute dtype that every block needing gradients keeps.
//!
//! With activation checkpointing (`--grad-checkpoint`) the forward pass runs without autograd
//! and each block that needs gradients keeps only its input (`activations`: residual values per
//! token per block); the LM head's backward runs first, then one block at a time is computed
//! again with autograd and its backward fed the gradient from above (`recompute`: that block's
//! saved activations and two residual-sized gradients; masks' biases and weight casts of one
//! block). On PyTorch the head's logits are freed before the first recomputation, so the peak
//! holds the larger of the head's phase and a block's; MLX, evaluating the step as one graph,
//! holds both.
//!
//! The sum is `peak_bytes`: the bytes of live tensors at the peak, which is what the framework's
//! allocated peak measures (`metrics.memory.device_peak_allocated_gib`; the summary keeps the
//! error against it). Beside it, not in it:
//! - runtime: on CUDA, an allowance for the CUDA context and library workspaces (cuBLAS, cuDNN) that
//!   the process holds besides tensors. Assumed, not measured: 1 GiB. `required_free_bytes` =
//!   `peak_bytes` + runtime is what the device must have free, checked before the model loads.

use serde::{Deserialize, Serialize};

use crate::config::{DTypeChoice, Framework, LoraTarget, StrategyConfig, StrategyKind};
use crate::data::batch::{MicroBatch, Step};
use crate::model::ModelShape;

const GIB: f64 = (1u64 << 30) as f64;

/// Assumed CUDA context + library workspaces (see the module documentation).
pub const CUDA_RUNTIME_ALLOWANCE_BYTES: u64 = 1 << 30;

/// Loss positions per chunk of the LM head and loss in the PyTorch binary's step
/// (`Decoder::head_loss_chunked`): one chunk's fp32 logits alive instead of the micro-batch's.
/// 1,024 positions of a 152k vocabulary are 1.7 GiB at 12 bytes a logit; the product per chunk
/// ([1,024 x H] by [H x V]) stays large enough for the matrix units.
pub const HEAD_CHUNK_TOKENS: usize = 1024;

/// Loss positions per chunk of the MLX binary's LM head and loss on Metal and the CPU
/// (`decoder::head_loss_chunked`, `Tuning::head_chunk`; MLX's CUDA backend keeps the head in one
/// graph). Smaller than PyTorch's: MLX holds more per logit in a chunk
/// ([`mlx_chunk_bytes_per_logit`]). On the CPU (tiny-qwen3, 2,513 loss positions per micro-batch,
/// fp32) MLX's peak was 0.99 / 1.64 / 2.94 GiB at chunks of 128 / 256 / 512 against 5.95 GiB
/// in one graph, at the same speed.
pub const MLX_HEAD_CHUNK_TOKENS: usize = 256;

/// The precision a run resolves to (`--dtype auto` resolved for the device).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Precision {
    Float32,
    Bf16,
    MixedBf16,
}

impl Precision {
    /// `auto` is bf16 on GPUs and fp32 on CPUs (both binaries resolve it so).
    pub fn resolve(choice: DTypeChoice, on_gpu: bool) -> Self {
        match choice {
            DTypeChoice::Auto if on_gpu => Precision::Bf16,
            DTypeChoice::Auto | DTypeChoice::Float32 => Precision::Float32,
            DTypeChoice::Bf16 => Precision::Bf16,
            DTypeChoice::MixedBf16 => Precision::MixedBf16,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Precision::Float32 => "float32",
            Precision::Bf16 => "bf16",
            Precision::MixedBf16 => "mixed-bf16",
        }
    }

    /// Bytes per stored parameter (and its gradient and AdamW moments).
    pub fn param_bytes(self) -> u64 {
        match self {
            Precision::Bf16 => 2,
            _ => 4,
        }
    }

    /// Bytes per activation value that a matrix product produces.
    pub fn compute_bytes(self) -> u64 {
        match self {
            Precision::Float32 => 4,
            _ => 2,
        }
    }

    /// Bytes per value of the residual stream (fp32 under `mixed-bf16`, as under autocast).
    pub fn residual_bytes(self) -> u64 {
        match self {
            Precision::Bf16 => 2,
            _ => 4,
        }
    }
}

/// The device a run will use, as far as the preflight needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    Cpu,
    /// CUDA device index as the framework numbers it (after `CUDA_VISIBLE_DEVICES`).
    Cuda(usize),
    /// Apple GPU through PyTorch's MPS.
    Mps,
    /// Apple GPU through MLX (Metal).
    MlxGpu,
}

impl DeviceKind {
    pub fn is_gpu(self) -> bool {
        !matches!(self, DeviceKind::Cpu)
    }
}

/// The estimate, broken down; all figures in bytes. Goes into the summary as
/// `metrics.memory.estimate`, next to the measured peak.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MemoryEstimate {
    /// The precision the figures are for.
    pub dtype: String,
    /// weights + gradients + optimizer + activations + head + weight casts + transient + masks
    /// (with checkpointing: the larger of head and recompute + transient in place of
    /// head + transient): the live tensors at the peak, to compare with the framework's allocated
    /// peak.
    pub peak_bytes: u64,
    /// `peak_bytes` + runtime: what the device must have free for the run (the fit check).
    #[serde(default)]
    pub required_free_bytes: u64,
    /// Base weights and LoRA adapters.
    pub weights_bytes: u64,
    /// LoRA adapters alone (included in `weights_bytes`).
    pub lora_adapter_bytes: u64,
    pub gradients_bytes: u64,
    /// AdamW's two moments.
    pub optimizer_bytes: u64,
    /// Saved for backward in the blocks that need gradients, worst micro-batch.
    pub activations_bytes: u64,
    /// LM head and loss at the loss positions (fp32 logits), worst micro-batch.
    pub head_bytes: u64,
    /// bf16 copies of fp32 weights kept for backward (`mixed-bf16` only).
    pub weight_casts_bytes: u64,
    /// One block's working set (forward of a frozen block or backward of one block).
    pub transient_bytes: u64,
    /// Packed rows' attention masks and the biases SDPA derives from them.
    pub attention_mask_bytes: u64,
    /// Activation checkpointing: one block's activations while it is computed again in the
    /// backward pass, with the gradients at its output and input; 0 without checkpointing.
    #[serde(default)]
    pub recompute_bytes: u64,
    /// Activation checkpointing is on: `activations_bytes` are the blocks' inputs only; on
    /// PyTorch the peak holds the larger of `head_bytes` and `recompute_bytes` +
    /// `transient_bytes` (the head's backward runs, and frees its logits, before any block is
    /// recomputed), on MLX both.
    #[serde(default)]
    pub grad_checkpoint: bool,
    /// CUDA context and library workspaces (assumed); 0 elsewhere. Not in `peak_bytes`.
    pub runtime_bytes: u64,
    /// Inputs of queued GPU work the framework keeps until it has run (MLX on CUDA; see
    /// `runner::DeviceFacts::queued_work_bytes`); 0 elsewhere. Not in `peak_bytes`.
    #[serde(default)]
    pub queued_work_bytes: u64,
    /// Blocks whose activations are kept for backward.
    pub blocks_with_grad: usize,
    /// The micro-batch the per-micro-batch figures are for: padded tokens (rows × length).
    pub micro_batch_padded_tokens: usize,
    pub micro_batch_loss_tokens: usize,
    pub micro_batch_rows: usize,
    pub micro_batch_seq_len: usize,
}

impl MemoryEstimate {
    pub fn peak_gib(&self) -> f64 {
        self.peak_bytes as f64 / GIB
    }

    /// The same estimate with `bytes` of queued work added to what must be free.
    pub fn with_queued_work(mut self, bytes: u64) -> Self {
        self.required_free_bytes = self.required_free_bytes - self.queued_work_bytes + bytes;
        self.queued_work_bytes = bytes;
        self
    }

    /// One line per component, for `--plan` and the first lines of a run.
    pub fn lines(&self) -> Vec<String> {
        let g = |b: u64| format!("{:.2} GiB", b as f64 / GIB);
        // Every term added up: MLX's checkpointed peak (PyTorch's takes the larger phase).
        let all_terms = self.weights_bytes
            + self.gradients_bytes
            + self.optimizer_bytes
            + self.activations_bytes
            + self.head_bytes
            + self.weight_casts_bytes
            + self.transient_bytes
            + self.attention_mask_bytes
            + self.recompute_bytes;
        let phases = if self.grad_checkpoint && self.peak_bytes == all_terms {
            format!(
                "activations {} (block inputs, checkpointed) + LM head/loss {} + recompute {} + transient {}",
                g(self.activations_bytes),
                g(self.head_bytes),
                g(self.recompute_bytes),
                g(self.transient_bytes)
            )
        } else if self.grad_checkpoint {
            format!(
                "activations {} (block inputs, checkpointed) + max(LM head/loss {}, recompute {} + transient {})",
                g(self.activations_bytes),
                g(self.head_bytes),
                g(self.recompute_bytes),
                g(self.transient_bytes)
            )
        } else {
            format!(
                "activations {} + LM head/loss {} + transient {}",
                g(self.activations_bytes),
                g(self.head_bytes),
                g(self.transient_bytes)
            )
        };
        let mut v = vec![format!(
            "memory estimate ({}): peak allocated {} = weights {} (LoRA adapters {}) + gradients {} + AdamW moments {} + {phases} + weight casts {} + attention masks {}; needs {} free with the runtime's {}{}",
            self.dtype,
            g(self.peak_bytes),
            g(self.weights_bytes),
            g(self.lora_adapter_bytes),
            g(self.gradients_bytes),
            g(self.optimizer_bytes),
            g(self.weight_casts_bytes),
            g(self.attention_mask_bytes),
            g(self.required_free_bytes),
            g(self.runtime_bytes),
            if self.queued_work_bytes > 0 {
                format!(" and queued GPU work's {}", g(self.queued_work_bytes))
            } else {
                String::new()
            },
        )];
        v.push(format!(
            "  worst micro-batch: {} rows x {} tokens = {} padded tokens, {} loss tokens; activations kept in {} blocks",
            self.micro_batch_rows,
            self.micro_batch_seq_len,
            self.micro_batch_padded_tokens,
            self.micro_batch_loss_tokens,
            self.blocks_with_grad
        ));
        v
    }
}

/// Which projections of a block keep their input for a weight gradient: those whose weight trains
/// or that carry a LoRA adapter (whose `A` needs the same input).
fn keeps_input(s: &StrategyConfig, t: LoraTarget) -> bool {
    match s.kind {
        StrategyKind::Full | StrategyKind::LastN => true,
        StrategyKind::Lora => s.lora_targets.contains(&t),
    }
}

/// Bytes autograd keeps per padded token in one block that needs gradients (see `decoder.rs`).
pub fn saved_bytes_per_token_per_block(
    shape: &ModelShape,
    s: &StrategyConfig,
    p: Precision,
) -> u64 {
    let a = p.compute_bytes();
    let r = p.residual_bytes();
    let (h, i) = (shape.hidden_size as u64, shape.intermediate_size as u64);
    let (nh, nkv, hd) = (
        shape.num_heads as u64,
        shape.num_kv_heads as u64,
        shape.head_dim() as u64,
    );
    let input = |t: LoraTarget, width: u64| if keeps_input(s, t) { width * a } else { 0 };
    // Two RMSNorms: input (residual dtype) and the fp32 reciprocal RMS.
    let norms = 2 * (r + 4);
    // q|k|v projection input; its output stays alive because v is a view of it that SDPA keeps.
    let qkv = input(LoraTarget::QkvProj, h) + shape.qkv_out() as u64 * a;
    // RoPE keeps the cos/sin tables it multiplies by: cast to the compute dtype per block
    // (no copy in fp32, where the shared fp32 tables are used; counted per micro-batch).
    let rope = if p == Precision::Float32 {
        0
    } else {
        2 * hd * a
    };
    // SDPA keeps the rotated q and k, its output and the fp32 log-sum-exp per head.
    let sdpa = (nh + nkv) * hd * a + nh * hd * a + nh * 4;
    // The output projection's input is a contiguous copy of the attention output.
    let o = input(LoraTarget::OProj, nh * hd);
    // MLP: gate|up input, the fused gate|up output (SiLU keeps gate, the product keeps up: both
    // views of it), SiLU's output, and the product that feeds down_proj.
    let mlp = input(LoraTarget::GateUpProj, h) + 2 * i * a + i * a + input(LoraTarget::DownProj, i);
    // LoRA: each adapter keeps x·Aᵀ (rank values) for B's gradient; a target of a split family
    // (Llama, Qwen3) has one adapter per projection it covers.
    let lora = match s.kind {
        StrategyKind::Lora => {
            let adapters = shape
                .projections()
                .iter()
                .filter(|p| s.lora_targets.contains(&p.target))
                .count();
            adapters as u64 * s.lora_rank as u64 * a
        }
        _ => 0,
    };
    // Qwen3's q/k RMSNorm per head keeps its input and the fp32 reciprocal RMS per head.
    let qk_norm = if shape.family.qk_norm() {
        (nh + nkv) * (hd * a + 4)
    } else {
        0
    };
    norms + qkv + rope + sdpa + o + mlp + lora + qk_norm
}

/// Blocks whose activations autograd keeps.
pub fn blocks_with_grad(shape: &ModelShape, s: &StrategyConfig) -> usize {
    match s.kind {
        StrategyKind::LastN => s.last_n.min(shape.num_layers),
        _ => shape.num_layers,
    }
}

/// Bytes MLX keeps per token per block that needs gradients beyond what
/// [`saved_bytes_per_token_per_block`] counts: the MLX model writes RMSNorm and SiLU out of
/// element-wise ops (`macos_mlx_benchmark/src/decoder.rs`), whose backward keeps each norm's fp32
/// input (a copy under bf16) and its normalised output in the residual dtype, and SiLU's
/// `sigmoid(gate)`.
pub fn mlx_extra_bytes_per_token_per_block(shape: &ModelShape, p: Precision) -> u64 {
    let (h, i) = (shape.hidden_size as u64, shape.intermediate_size as u64);
    2 * (4 * h + p.residual_bytes() * h) + p.compute_bytes() * i
}

/// Bytes per logit MLX holds at the backward peak of the loss (`token_loss_sum` in
/// `macos_mlx_benchmark/src/train.rs`), evaluated as one graph: the logits, exp's output, its
/// gradient and take_along_axis's scatter gradient in fp32 (16 B); under bf16 also the fp32 copy
/// of the bf16 logits, and the logits and their gradient in bf16 in place of fp32 ones (20 B).
/// The slope of MLX's measured peak over loss tokens on the CPU (MLX 0.32.2, tiny preset): 17.0 B
/// (fp32) and 20.5 B (bf16, mixed-bf16) per logit. PyTorch's fused log-softmax path keeps 12 B.
pub fn mlx_loss_bytes_per_logit(p: Precision) -> u64 {
    match p {
        Precision::Float32 => 16,
        Precision::Bf16 | Precision::MixedBf16 => 20,
    }
}

/// Bytes per logit MLX holds while it computes one chunk of the chunked head (the chunk's logits,
/// the loss graph and its VJP, `decoder::head_loss_chunked`): the slope of MLX's measured peak
/// over the chunk size on the CPU (MLX 0.32.2, tiny-qwen3, chunks of 128 and 512): 36 B (fp32,
/// last-n, the head trains), 40 B (fp32, LoRA, the head frozen), 40 B (bf16, last-n), so 4 B
/// more with a frozen head. More than the one-graph loss holds per logit
/// ([`mlx_loss_bytes_per_logit`]), but over a chunk's positions instead of all.
pub fn mlx_chunk_bytes_per_logit(p: Precision, head_trains: bool) -> u64 {
    let frozen = if head_trains { 0 } else { 4 };
    frozen
        + match p {
            Precision::Float32 => 36,
            Precision::Bf16 | Precision::MixedBf16 => 40,
        }
}

/// One micro-batch's bytes at the peak of its step, by term (see [`MemoryEstimate`]).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct MicroBatchBytes {
    activations: u64,
    head: u64,
    transient: u64,
    masks: u64,
    /// Activation checkpointing: one block's activations while it is computed again.
    recompute: u64,
    /// The step's gradients alive at this micro-batch's peak.
    gradients: u64,
    /// Checkpointing on a backend that runs the head's backward to its end (and frees its logits)
    /// before the first block is computed again: PyTorch.
    head_then_blocks: bool,
}

impl MicroBatchBytes {
    /// Without checkpointing every term is alive at the start of the backward pass. With it, on
    /// PyTorch the LM head's backward runs first, before any block is computed again, and frees
    /// its logits: the peak is the larger of the head's phase and one block's recomputation.
    /// MLX evaluates the step as one graph: its peak on the CPU held both (an 8-block Phi-3 of
    /// width 512: 1.18 GiB measured for LoRA, against 0.88 with the larger and 1.28 with both).
    fn peak(&self) -> u64 {
        let phases = if self.head_then_blocks {
            self.head.max(self.recompute + self.transient)
        } else {
            // (recompute is 0 without checkpointing)
            self.head + self.recompute + self.transient
        };
        self.activations + self.masks + self.gradients + phases
    }
}

/// Per-micro-batch bytes (gradients left at 0: they depend on the micro-batch's place in its step).
fn micro_batch_bytes(
    framework: Framework,
    shape: &ModelShape,
    s: &StrategyConfig,
    p: Precision,
    device: DeviceKind,
    mb: &MicroBatch,
) -> MicroBatchBytes {
    let tokens = (mb.rows * mb.seq_len) as u64;
    let loss = mb.loss_tokens as u64;
    let a = p.compute_bytes();
    let r = p.residual_bytes();
    let (h, i, v) = (
        shape.hidden_size as u64,
        shape.intermediate_size as u64,
        shape.vocab_size as u64,
    );
    let hd = shape.head_dim() as u64;
    let g = blocks_with_grad(shape, s) as u64;
    let mlx = framework == Framework::Mlx;
    let per_block = saved_bytes_per_token_per_block(shape, s, p)
        + if mlx {
            mlx_extra_bytes_per_token_per_block(shape, p)
        } else {
            0
        };
    // The final norm's input and fp32 statistics, and the RoPE tables gathered at each position
    // (fp32, shared by all blocks).
    let common = r + 4 + 2 * hd * 4;
    let ckpt = s.grad_checkpoint;
    // Checkpointing: every block that needs gradients keeps only its input (the residual stream)
    // through the step; one block at a time holds its activations again, with the gradient
    // arriving at its output and the one it sends to its input (2 more residual values).
    let (activations, recompute) = if ckpt {
        (
            tokens * (g * h * r + common),
            tokens * (per_block + 2 * h * r),
        )
    } else {
        (tokens * (g * per_block + common), 0)
    };
    // Blocks that hold their attention biases at once: all with gradients, or one when
    // checkpointing recomputes them block by block.
    let biased = if ckpt { g.min(1) } else { g };
    // Head: the hidden state at loss positions kept for the head's gradients, and, at the
    // backward peak, the fp32 log-softmax output, its gradient and the input gradient (12 B per
    // logit; MLX's loss graph holds more, see `mlx_loss_bytes_per_logit`). PyTorch runs the
    // head in chunks of `HEAD_CHUNK_TOKENS` loss positions, each with its backward: one chunk's
    // logits, and the hidden states' gradient beside the hidden states. Without checkpointing
    // the sum below still adds a block's transient to it (an overestimate by the smaller).
    // MLX on Metal and the CPU chunks its head too (`MLX_HEAD_CHUNK_TOKENS`): one chunk's
    // logits at `mlx_chunk_bytes_per_logit`, the hidden states and their gradient, and, when the
    // head trains, its gradient summed over the chunks in fp32 (V x H x 4).
    let head = if !mlx {
        loss * 2 * h * a + loss.min(HEAD_CHUNK_TOKENS as u64) * 12 * v
    } else if !matches!(device, DeviceKind::Cuda(_)) {
        let trains = shape.is_trainable(shape.head_weight_name(), s);
        let dw = if trains { v * h * 4 } else { 0 };
        let per_logit = mlx_chunk_bytes_per_logit(p, trains);
        loss * 2 * h * a + loss.min(MLX_HEAD_CHUNK_TOKENS as u64) * per_logit * v + dw
    } else {
        loss * (h * a + mlx_loss_bytes_per_logit(p) * v)
    };
    // One block's MLP working set: the fused gate|up output, SiLU and the product (4 × I values).
    let transient = tokens * 4 * i * a;
    let masks = match &mb.segment_ids {
        None => 0,
        Some(_) => {
            let t2 = (mb.rows * mb.seq_len * mb.seq_len) as u64;
            // The boolean mask, then SDPA's additive bias per block that needs gradients; on the
            // CPU a masked SDPA takes the math path, which also keeps the softmax per head.
            let mut b = t2 + biased * t2 * a;
            if device == DeviceKind::Cpu {
                b += biased * t2 * shape.num_heads as u64 * a;
            }
            b
        }
    };
    MicroBatchBytes {
        activations,
        head,
        transient,
        masks,
        recompute,
        gradients: 0,
        head_then_blocks: ckpt && !mlx,
    }
}

/// The steps as a backend that computes real tokens only sees them (one row of each micro-batch's
/// real tokens, documents apart without a mask), for the estimate.
pub fn without_padding(steps: &[Step]) -> Vec<Step> {
    steps
        .iter()
        .map(|s| Step {
            micro_batches: s
                .micro_batches
                .iter()
                .map(|m| MicroBatch {
                    rows: 1,
                    seq_len: m.input_tokens,
                    input_ids: Vec::new(),
                    labels: Vec::new(),
                    position_ids: Vec::new(),
                    segment_ids: None,
                    row_lengths: vec![m.input_tokens],
                    loss_tokens: m.loss_tokens,
                    input_tokens: m.input_tokens,
                    padded_tokens: m.input_tokens,
                })
                .collect(),
            doc_lengths: s.doc_lengths.clone(),
            computed_doc_lengths: s.computed_doc_lengths.clone(),
            sample_ids: s.sample_ids.clone(),
            ..*s
        })
        .collect()
}

/// The steps as a backend sees them that rounds every micro-batch's sequence length up to a
/// multiple of `multiple` (MLX on CUDA: 128, the tile its fused attention backward needs), for the
/// estimate. The rounding adds padding columns; nothing else changes.
pub fn padded_to_multiple(steps: &[Step], multiple: usize) -> Vec<Step> {
    let m = multiple.max(1);
    steps
        .iter()
        .map(|s| Step {
            micro_batches: s
                .micro_batches
                .iter()
                .map(|mb| {
                    let seq_len = mb.seq_len.div_ceil(m) * m;
                    MicroBatch {
                        seq_len,
                        input_ids: Vec::new(),
                        labels: Vec::new(),
                        position_ids: Vec::new(),
                        segment_ids: mb.segment_ids.as_ref().map(|_| Vec::new()),
                        row_lengths: mb.row_lengths.clone(),
                        padded_tokens: mb.rows * seq_len,
                        ..*mb
                    }
                })
                .collect(),
            doc_lengths: s.doc_lengths.clone(),
            sample_ids: s.sample_ids.clone(),
            computed_doc_lengths: s.computed_doc_lengths.clone(),
            ..*s
        })
        .collect()
}

/// The estimate for a run of `steps` (the prepared batch plan) on the PyTorch backend.
pub fn estimate(
    shape: &ModelShape,
    s: &StrategyConfig,
    p: Precision,
    device: DeviceKind,
    steps: &[Step],
) -> MemoryEstimate {
    estimate_for(Framework::Pytorch, shape, s, p, device, steps)
}

/// The estimate for `framework`'s backend. The PyTorch count is the one above; MLX's differs
/// where its model and step do: the element-wise RMSNorm and SiLU keep more per block
/// ([`mlx_extra_bytes_per_token_per_block`]), its loss graph more per logit
/// ([`mlx_loss_bytes_per_logit`]), and gradients are no persistent buffers (they exist from a
/// step's backward to its update), so a step's first micro-batch peaks with the LM head's
/// gradient alone, a later one with the step's accumulated gradients. Not counted on either:
/// the attention scores of backends that compute attention unfused (MLX on the CPU, on CUDA when
/// a row's length is no multiple of 128, and on Metal in MLX 0.32).
pub fn estimate_for(
    framework: Framework,
    shape: &ModelShape,
    s: &StrategyConfig,
    p: Precision,
    device: DeviceKind,
    steps: &[Step],
) -> MemoryEstimate {
    let pb = p.param_bytes();
    let counts = shape.parameter_counts(s);
    let lora_params: u64 = shape
        .lora_parameters(s)
        .iter()
        .map(|x| x.numel() as u64)
        .sum();
    let weights = counts.total as u64 * pb;
    let gradients = counts.trainable as u64 * pb;
    let optimizer = 2 * counts.trainable as u64 * pb;
    let g = blocks_with_grad(shape, s);
    // mixed-bf16: bf16 copies of the weights of every block that needs gradients, and of the head.
    let weight_casts = if p == Precision::MixedBf16 {
        let per_block: u64 = shape
            .parameters()
            .iter()
            .filter(|x| crate::model::layer_index(&x.name) == Some(0))
            .map(|x| x.numel() as u64)
            .sum();
        let adapters_per_block = lora_params / shape.num_layers.max(1) as u64;
        // Checkpointing: the forward pass keeps nothing, one recomputed block its casts.
        let cast_blocks = if s.grad_checkpoint { g.min(1) } else { g } as u64;
        2 * (cast_blocks * (per_block + adapters_per_block)
            + (shape.vocab_size * shape.hidden_size) as u64)
    } else {
        0
    };
    // MLX: the gradients alive at a micro-batch's peak (the head's, produced first in the
    // backward; all of them from the step's second micro-batch on).
    let head_gradient = if shape.is_trainable("lm_head.weight", s) {
        (shape.vocab_size * shape.hidden_size) as u64 * pb
    } else {
        0
    };
    let mut worst = MicroBatchBytes::default();
    let mut worst_mb: Option<&MicroBatch> = None;
    for st in steps {
        // Micro-batches without loss tokens are not run (see `Step::computed_doc_lengths`).
        let run = st.micro_batches.iter().filter(|m| m.loss_tokens > 0);
        for (k, mb) in run.enumerate() {
            let mut b = micro_batch_bytes(framework, shape, s, p, device, mb);
            b.gradients = match framework {
                Framework::Pytorch => gradients,
                Framework::Mlx if k == 0 => head_gradient.min(gradients),
                Framework::Mlx => gradients,
            };
            if worst_mb.is_none() || b.peak() > worst.peak() {
                worst = b;
                worst_mb = Some(mb);
            }
        }
    }
    let gradients = if worst_mb.is_some() {
        worst.gradients
    } else {
        gradients
    };
    let runtime = if matches!(device, DeviceKind::Cuda(_)) {
        CUDA_RUNTIME_ALLOWANCE_BYTES
    } else {
        0
    };
    let peak = weights + optimizer + weight_casts + worst.peak() - worst.gradients + gradients;
    let MicroBatchBytes {
        activations,
        head,
        transient,
        masks,
        recompute,
        ..
    } = worst;
    MemoryEstimate {
        dtype: p.name().into(),
        peak_bytes: peak,
        required_free_bytes: peak + runtime,
        weights_bytes: weights,
        lora_adapter_bytes: lora_params * pb,
        gradients_bytes: gradients,
        optimizer_bytes: optimizer,
        activations_bytes: activations,
        head_bytes: head,
        weight_casts_bytes: weight_casts,
        transient_bytes: transient,
        attention_mask_bytes: masks,
        recompute_bytes: recompute,
        grad_checkpoint: s.grad_checkpoint,
        runtime_bytes: runtime,
        queued_work_bytes: 0,
        blocks_with_grad: g,
        micro_batch_padded_tokens: worst_mb.map_or(0, |m| m.rows * m.seq_len),
        micro_batch_loss_tokens: worst_mb.map_or(0, |m| m.loss_tokens),
        micro_batch_rows: worst_mb.map_or(0, |m| m.rows),
        micro_batch_seq_len: worst_mb.map_or(0, |m| m.seq_len),
    }
}

/// The estimate's relative error against a measured allocated peak (GiB):
/// (estimated - measured) / measured; `None` without a (positive) measurement.
pub fn estimate_error(estimated_bytes: u64, measured_gib: Option<f64>) -> Option<f64> {
    let m = measured_gib.filter(|m| *m > 0.0 && m.is_finite())?;
    Some(estimated_bytes as f64 / GIB / m - 1.0)
}

/// Free memory of the device, in bytes, and where the figure comes from. CUDA: NVML's free memory
/// of the chosen GPU; CPU and Apple GPUs (unified memory): the host's available memory (sysinfo).
pub fn free_memory(device: DeviceKind) -> Option<(u64, String)> {
    // Testing hook: pretend the device has this much free memory.
    match crate::hooks::assume_free_memory_bytes().ok().flatten() {
        Some(b) => Some((b, crate::hooks::ASSUME_FREE_MEMORY_BYTES.into())),
        None => device_memory(
            device,
            ("free", |m| m.free),
            ("host available memory", |s| s.available_memory()),
        ),
    }
}

/// Total memory of the device, in bytes, and where the figure comes from: NVML's total of the
/// chosen GPU; the host's physical memory for the CPU and Apple GPUs (unified memory).
pub fn total_memory(device: DeviceKind) -> Option<(u64, String)> {
    // Testing hook: pretend the device has this much memory in all.
    match crate::hooks::assume_total_memory_bytes().ok().flatten() {
        Some(b) => Some((b, crate::hooks::ASSUME_TOTAL_MEMORY_BYTES.into())),
        None => device_memory(
            device,
            ("total", |m| m.total),
            ("host physical memory", |s| s.total_memory()),
        ),
    }
}

type NvmlFigure = fn(&nvml_wrapper::struct_wrappers::device::MemoryInfo) -> u64;
type HostFigure = fn(&sysinfo::System) -> u64;

/// One memory figure of a device, named: NVML's (`nvml`) for a CUDA device, else the host's
/// (`host`, from sysinfo).
fn device_memory(
    device: DeviceKind,
    (nvml_what, nvml): (&str, NvmlFigure),
    (host_what, host): (&str, HostFigure),
) -> Option<(u64, String)> {
    match device {
        DeviceKind::Cuda(i) => {
            let m = nvml_memory(i)?;
            Some((nvml(&m), format!("NVML {nvml_what} memory of GPU {i}")))
        }
        _ => {
            let mut sys = sysinfo::System::new();
            sys.refresh_memory();
            let b = host(&sys);
            (b > 0).then(|| {
                (
                    b,
                    format!("{host_what} (sysinfo; unified memory on Apple GPUs)"),
                )
            })
        }
    }
}

fn nvml_memory(i: usize) -> Option<nvml_wrapper::struct_wrappers::device::MemoryInfo> {
    let nvml = nvml_wrapper::Nvml::init().ok()?;
    let dev = match nvml_device_for_cuda_index(i) {
        NvmlPick::Index(k) => nvml.device_by_index(k).ok()?,
        NvmlPick::Uuid(u) => nvml.device_by_uuid(u.as_str()).ok()?,
    };
    dev.memory_info().ok()
}

/// A setting that would fit, with its estimate.
#[derive(Debug, Clone, PartialEq)]
pub struct Fit {
    /// The flags to add, e.g. `--strategy lora --max-tokens-per-micro-batch 8192`.
    pub flags: String,
    /// What the device must have free for it (`required_free_bytes`).
    pub peak_bytes: u64,
    /// What the device computes per token under this setting (hardware FLOPs: checkpointing's
    /// recomputation included) over the model FLOPs per token of the run as asked: at the same
    /// FLOP rate, throughput is its inverse. Another strategy is other work (its ratio says how
    /// much less it computes, not that it learns the same); a smaller micro-batch computes the
    /// same FLOPs, though smaller products may run at a lower rate.
    pub flops_ratio: f64,
}

impl Fit {
    /// `--flags (estimated X GiB; ...)`: the setting, its memory and its estimated cost.
    pub fn describe(&self) -> String {
        let cost = if (self.flops_ratio - 1.0).abs() < 1e-3 {
            "the same FLOPs per token".to_string()
        } else {
            format!(
                "{:.2}x the FLOPs per token: about {:.0} % of the throughput at the same FLOP rate",
                self.flops_ratio,
                100.0 / self.flops_ratio
            )
        };
        format!(
            "{} (estimated {:.2} GiB; {cost})",
            self.flags,
            self.peak_bytes as f64 / GIB
        )
    }
}

/// Settings that would fit in `free_bytes`, found by re-running the estimate: for the current
/// strategy, then `lora` and `last-n` (when not current), the largest micro-batch (token budget
/// for the bucketed and packed plans, records per micro-batch for the padded plan, with the
/// records per step kept) whose estimate fits. At most one setting per strategy without
/// activation checkpointing and one with it (`--grad-checkpoint`); the other strategies name
/// checkpointing only when nothing fits without it. `estimate` is the
/// run's own estimate of a strategy and plan (the runner's: the steps as its backend computes
/// them, with its queued work), so a setting is judged as the run itself would be.
pub fn settings_that_fit(
    cfg: &crate::config::Config,
    shape: &ModelShape,
    samples: &[crate::data::Sample],
    estimate: &dyn Fn(&StrategyConfig, &[Step]) -> MemoryEstimate,
    free_bytes: u64,
) -> Vec<Fit> {
    use crate::config::BatchPlanKind;
    let w = &cfg.workload;
    let mut strategies = vec![(w.strategy.clone(), String::new())];
    if w.strategy.kind != StrategyKind::Lora {
        let mut s = w.strategy.clone();
        s.kind = StrategyKind::Lora;
        strategies.push((s, "--strategy lora ".into()));
    }
    if w.strategy.kind != StrategyKind::LastN {
        let mut s = w.strategy.clone();
        s.kind = StrategyKind::LastN;
        s.last_n = s.last_n.clamp(1, shape.num_layers);
        let flags = format!("--strategy last-n --last-n {} ", s.last_n);
        strategies.push((s, flags));
    }
    let doc_flops = |f: fn(&ModelShape, &StrategyConfig, &[usize], usize) -> f64,
                     s: &StrategyConfig,
                     steps: &[Step]| {
        steps
            .iter()
            .map(|st| f(shape, s, &st.computed_doc_lengths, st.loss_tokens))
            .sum::<f64>()
    };
    let plan = |batch: &crate::config::BatchConfig| {
        crate::data::batch::plan_steps(
            samples,
            batch,
            w.data.pad_to,
            w.data.train_on_prompt,
            w.seed,
            w.train.epochs,
            w.train.max_steps,
        )
    };
    use crate::measure::flops::{step_flops, step_hardware_flops};
    let asked = doc_flops(step_flops, &w.strategy, &plan(&w.batch)).max(1.0);
    let mut variants = Vec::new();
    for (s, prefix) in strategies {
        let other = s.kind != w.strategy.kind;
        variants.push((s.clone(), prefix.clone(), false));
        if !s.grad_checkpoint {
            let mut c = s;
            c.grad_checkpoint = true;
            variants.push((c, format!("{prefix}--grad-checkpoint "), other));
        }
    }
    let mut out: Vec<Fit> = Vec::new();
    let mut fitted_kinds = Vec::new();
    for (s, prefix, only_if_none) in variants {
        if only_if_none && fitted_kinds.contains(&s.kind) {
            continue;
        }
        let current = s == w.strategy;
        // Candidate batch settings, largest first (the current one only for other strategies).
        let mut batches = Vec::new();
        let mut b = w.batch.clone();
        if !current {
            batches.push((b.clone(), String::new()));
        }
        loop {
            match w.batch.plan {
                BatchPlanKind::Padded => {
                    if b.micro_batch_size < 2 || !b.micro_batch_size.is_multiple_of(2) {
                        break;
                    }
                    b.micro_batch_size /= 2;
                    b.grad_accum *= 2;
                    batches.push((
                        b.clone(),
                        format!(
                            "--micro-batch-size {} --grad-accum {}",
                            b.micro_batch_size, b.grad_accum
                        ),
                    ));
                }
                _ => {
                    let next = b.max_tokens_per_micro_batch / 2;
                    if next < w.data.max_seq_len {
                        break;
                    }
                    b.max_tokens_per_micro_batch = next;
                    batches.push((b.clone(), format!("--max-tokens-per-micro-batch {next}")));
                }
            }
        }
        for (batch, flags) in batches {
            let steps = plan(&batch);
            let e = estimate(&s, &steps);
            if e.required_free_bytes <= free_bytes {
                out.push(Fit {
                    flags: format!("{prefix}{flags}").trim().to_string(),
                    peak_bytes: e.required_free_bytes,
                    flops_ratio: doc_flops(step_hardware_flops, &s, &steps) / asked,
                });
                fitted_kinds.push(s.kind);
                break;
            }
        }
    }
    out
}

enum NvmlPick {
    Index(u32),
    Uuid(String),
}

/// CUDA numbers the GPUs listed in `CUDA_VISIBLE_DEVICES` from 0; NVML numbers all of them.
fn nvml_device_for_cuda_index(i: usize) -> NvmlPick {
    let visible = std::env::var("CUDA_VISIBLE_DEVICES").ok();
    match visible
        .as_deref()
        .and_then(|v| v.split(',').nth(i).map(str::trim))
    {
        Some(e) if e.parse::<u32>().is_ok() => NvmlPick::Index(e.parse().unwrap_or(0)),
        Some(e) if e.starts_with("GPU-") => NvmlPick::Uuid(e.to_string()),
        _ => NvmlPick::Index(i as u32),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Sample;

    fn strategy(kind: StrategyKind) -> StrategyConfig {
        StrategyConfig {
            kind,
            last_n: 1,
            ..Default::default()
        }
    }

    fn one_micro_batch(rows: usize, seq_len: usize, loss_tokens: usize) -> Vec<Step> {
        let n = rows * seq_len;
        vec![Step {
            index: 0,
            epoch: 0,
            micro_batches: vec![MicroBatch {
                rows,
                seq_len,
                input_ids: vec![0; n],
                labels: vec![0; n],
                position_ids: vec![0; n],
                segment_ids: None,
                row_lengths: vec![seq_len; rows],
                loss_tokens,
                input_tokens: n,
                padded_tokens: n,
            }],
            samples: rows,
            loss_tokens,
            input_tokens: n,
            padded_tokens: n,
            doc_lengths: vec![seq_len; rows],
            computed_doc_lengths: vec![seq_len; rows],
            sample_ids: (0..rows).collect(),
        }]
    }

    /// The tiny shape counted by hand: H = 64, I = 128, 4 heads of 16, vocabulary 32,064, 2 blocks.
    #[test]
    fn tiny_shape_matches_a_hand_count() {
        let shape = ModelShape::tiny();
        // Parameters: embedding and head 2 x 32064 x 64 = 4,104,192; per block qkv 192x64 = 12,288,
        // o 64x64 = 4,096, gate_up 256x64 = 16,384, down 64x128 = 8,192, norms 128: 41,088;
        // final norm 64. Total 4,104,192 + 82,176 + 64 = 4,186,432.
        let total = 4_186_432u64;
        let s = strategy(StrategyKind::LastN);
        // last-n 1: block 1 (41,088) + final norm (64) + head (2,052,096) = 2,093,248 trainable.
        let trainable = 2_093_248u64;
        let steps = one_micro_batch(2, 100, 150);
        let e = estimate(&shape, &s, Precision::Float32, DeviceKind::Cpu, &steps);
        assert_eq!(e.weights_bytes, total * 4);
        assert_eq!(e.gradients_bytes, trainable * 4);
        assert_eq!(e.optimizer_bytes, 2 * trainable * 4);
        assert_eq!(e.lora_adapter_bytes, 0);
        assert_eq!(e.blocks_with_grad, 1);
        // Saved per token in one fp32 block: norms 2 x (4 + 4) = 16; qkv input 64 x 4 = 256 and
        // output 192 x 4 = 768; no RoPE casts in fp32; SDPA q,k (128 x 4 = 512), output (256),
        // lse (4 x 4 = 16); o input 256; gate|up input 256, output 1,024, SiLU 512, down input 512.
        let per_block = 16 + 256 + 768 + 512 + 256 + 16 + 256 + 256 + 1024 + 512 + 512;
        assert_eq!(
            saved_bytes_per_token_per_block(&shape, &s, Precision::Float32),
            per_block
        );
        // 200 padded tokens x (1 block + final norm 8 B + RoPE tables 2 x 16 x 4 = 128 B).
        assert_eq!(e.activations_bytes, 200 * (per_block + 8 + 128));
        // Head at 150 loss tokens (one chunk): the hidden states and their gradient 2 x 64 x 4,
        // and 12 B per logit x 32,064.
        assert_eq!(e.head_bytes, 150 * (2 * 256 + 12 * 32_064));
        assert_eq!(e.transient_bytes, 200 * 4 * 128 * 4);
        assert_eq!(e.weight_casts_bytes, 0);
        assert_eq!(e.runtime_bytes, 0);
        assert_eq!(
            e.peak_bytes,
            e.weights_bytes
                + e.gradients_bytes
                + e.optimizer_bytes
                + e.activations_bytes
                + e.head_bytes
                + e.transient_bytes
        );
        assert_eq!(
            (e.micro_batch_padded_tokens, e.micro_batch_loss_tokens),
            (200, 150)
        );
    }

    #[test]
    fn precision_and_strategy_change_what_is_counted() {
        let shape = ModelShape::phi3_mini();
        let steps = one_micro_batch(4, 1024, 2048);
        let full = strategy(StrategyKind::Full);
        let f32 = estimate(
            &shape,
            &full,
            Precision::Float32,
            DeviceKind::Cuda(0),
            &steps,
        );
        let bf16 = estimate(&shape, &full, Precision::Bf16, DeviceKind::Cuda(0), &steps);
        let mixed = estimate(
            &shape,
            &full,
            Precision::MixedBf16,
            DeviceKind::Cuda(0),
            &steps,
        );
        // 3.82 B parameters: 15.3 GB of fp32 weights, 7.6 GB in bf16.
        assert_eq!(f32.weights_bytes, 2 * bf16.weights_bytes);
        assert!((f32.weights_bytes as f64 / 1e9 - 15.28).abs() < 0.05);
        assert_eq!(mixed.optimizer_bytes, f32.optimizer_bytes);
        assert!(
            mixed.weight_casts_bytes > 7_000_000_000,
            "bf16 copies of 3.7 B weights"
        );
        assert_eq!(bf16.weight_casts_bytes, 0);
        assert_eq!(f32.runtime_bytes, CUDA_RUNTIME_ALLOWANCE_BYTES);
        assert_eq!(
            f32.required_free_bytes,
            f32.peak_bytes + CUDA_RUNTIME_ALLOWANCE_BYTES,
            "the runtime is needed free but is no tensor"
        );
        // last-n keeps activations in N blocks only; LoRA trains little but keeps all blocks'.
        let mut last4 = strategy(StrategyKind::LastN);
        last4.last_n = 4;
        let l4 = estimate(&shape, &last4, Precision::Bf16, DeviceKind::Cuda(0), &steps);
        assert_eq!(l4.blocks_with_grad, 4);
        assert!(l4.activations_bytes < bf16.activations_bytes / 6);
        let lora = estimate(
            &shape,
            &strategy(StrategyKind::Lora),
            Precision::Bf16,
            DeviceKind::Cuda(0),
            &steps,
        );
        assert!(lora.gradients_bytes < bf16.gradients_bytes / 50);
        assert!(lora.lora_adapter_bytes > 0 && lora.lora_adapter_bytes < lora.weights_bytes);
        assert_eq!(lora.blocks_with_grad, 32);
        // Halving the micro-batch halves what scales with it.
        let half = estimate(
            &shape,
            &full,
            Precision::Bf16,
            DeviceKind::Cuda(0),
            &one_micro_batch(2, 1024, 1024),
        );
        assert_eq!(half.activations_bytes * 2, bf16.activations_bytes);
        // The head's hidden states halve; its logits stay one chunk of HEAD_CHUNK_TOKENS.
        assert_eq!(bf16.head_bytes - half.head_bytes, 1024 * 2 * 3072 * 2);
    }

    #[test]
    fn queued_work_counts_in_what_must_be_free_not_in_the_peak() {
        let shape = ModelShape::tiny();
        let s = strategy(StrategyKind::Full);
        let steps = one_micro_batch(2, 16, 20);
        let e = estimate_for(
            Framework::Mlx,
            &shape,
            &s,
            Precision::Bf16,
            DeviceKind::Cuda(0),
            &steps,
        );
        let q = e.clone().with_queued_work(1000);
        assert_eq!(q.peak_bytes, e.peak_bytes);
        assert_eq!(q.required_free_bytes, e.required_free_bytes + 1000);
        // Applying it again replaces, never adds twice.
        let q2 = q.clone().with_queued_work(10);
        assert_eq!(q2.required_free_bytes, e.required_free_bytes + 10);
        assert!(q.lines()[0].contains("queued GPU work"));
        assert!(!e.lines()[0].contains("queued GPU work"));
    }

    #[test]
    fn worst_micro_batch_of_the_plan_is_taken() {
        let shape = ModelShape::tiny();
        let s = strategy(StrategyKind::Full);
        let samples: Vec<Sample> = (0..16)
            .map(|k| Sample {
                ids: vec![5; 20 + 10 * k],
                prompt_len: 10,
            })
            .collect();
        let cfg = crate::config::BatchConfig {
            plan: crate::config::BatchPlanKind::Bucketed,
            micro_batch_size: 4,
            grad_accum: 4,
            max_tokens_per_micro_batch: 512,
        };
        let steps = crate::data::batch::plan_steps(&samples, &cfg, None, false, 1, 1, None);
        let e = estimate(&shape, &s, Precision::Float32, DeviceKind::Cpu, &steps);
        let max_tokens = steps
            .iter()
            .flat_map(|s| &s.micro_batches)
            .map(|m| m.rows * m.seq_len)
            .max()
            .unwrap();
        assert_eq!(e.micro_batch_padded_tokens, max_tokens);
        assert!(e.micro_batch_padded_tokens <= 512);
    }

    #[test]
    fn settings_that_fit_are_smaller_and_fit() {
        let mut cfg = crate::config::Config::default();
        cfg.apply_preset(
            crate::config::Preset::Tiny,
            crate::config::Framework::Pytorch,
        );
        cfg.workload.strategy.kind = StrategyKind::Full;
        let p = crate::workload::prepare(&cfg).unwrap();
        let full = estimate(
            &p.shape,
            &cfg.workload.strategy,
            Precision::Float32,
            DeviceKind::Cpu,
            &p.steps,
        );
        // Room for everything but a third of this plan's per-micro-batch memory.
        let per_mb = full.activations_bytes + full.head_bytes + full.transient_bytes;
        let free = full.required_free_bytes - per_mb / 3;
        let as_run = |s: &StrategyConfig, steps: &[Step]| {
            estimate(&p.shape, s, Precision::Float32, DeviceKind::Cpu, steps)
        };
        let fits = settings_that_fit(&cfg, &p.shape, &p.samples, &as_run, free);
        assert!(!fits.is_empty());
        assert!(fits.iter().all(|f| f.peak_bytes <= free), "{fits:?}");
        assert!(
            fits[0].flags.starts_with("--max-tokens-per-micro-batch "),
            "{fits:?}"
        );
        assert!(fits.iter().any(|f| f.flags.starts_with("--strategy lora")));
        assert!(fits
            .iter()
            .any(|f| f.flags.starts_with("--strategy last-n --last-n 1")));
        // Checkpointing is named, costs more FLOPs per token than the run as asked, and fits
        // at a larger budget than the smaller micro-batch without it (or at the same).
        let ckpt = fits
            .iter()
            .find(|f| f.flags.starts_with("--grad-checkpoint"))
            .unwrap_or_else(|| panic!("no checkpointing setting in {fits:?}"));
        // (The tiny model's FLOPs are mostly its LM head, which is not recomputed.)
        assert!(ckpt.flops_ratio > 1.0, "{ckpt:?}");
        assert!(
            ckpt.describe().contains("x the FLOPs per token"),
            "{ckpt:?}"
        );
        assert!((fits[0].flops_ratio - 1.0).abs() < 1e-9, "{fits:?}");
        assert!(fits[0].describe().contains("the same FLOPs per token"));
        // Nothing fits in one byte.
        assert!(settings_that_fit(&cfg, &p.shape, &p.samples, &as_run, 1).is_empty());
    }

    /// Issue 15: with activation checkpointing the blocks keep their inputs only, and the peak
    /// holds the larger of the head's phase and one block's recomputation.
    #[test]
    fn checkpointing_keeps_block_inputs_and_recomputes_one_block() {
        let shape = ModelShape::phi3_mini();
        let steps = one_micro_batch(32, 512, 8192);
        for kind in [StrategyKind::Lora, StrategyKind::Full, StrategyKind::LastN] {
            let mut s = StrategyConfig {
                kind,
                last_n: 4,
                ..Default::default()
            };
            let without = estimate(&shape, &s, Precision::Bf16, DeviceKind::Cuda(0), &steps);
            s.grad_checkpoint = true;
            let with = estimate(&shape, &s, Precision::Bf16, DeviceKind::Cuda(0), &steps);
            assert!(with.grad_checkpoint && !without.grad_checkpoint);
            assert_eq!(without.recompute_bytes, 0);
            let tokens = 32 * 512u64;
            let g = without.blocks_with_grad as u64;
            let common = 2 + 4 + 2 * 96 * 4;
            assert_eq!(with.activations_bytes, tokens * (g * 3072 * 2 + common));
            let per_block = saved_bytes_per_token_per_block(&shape, &s, Precision::Bf16);
            assert_eq!(with.recompute_bytes, tokens * (per_block + 2 * 3072 * 2));
            // Without: every block's activations (the same per-block count).
            assert_eq!(without.activations_bytes, tokens * (g * per_block + common));
            // The head: the PyTorch step runs it in chunks of HEAD_CHUNK_TOKENS (8,192 loss
            // positions here: 8 chunks), with checkpointing or without.
            let (loss, v) = (8192u64, 32_064u64);
            let chunked = loss * 2 * 3072 * 2 + HEAD_CHUNK_TOKENS as u64 * 12 * v;
            assert_eq!(with.head_bytes, chunked);
            assert_eq!(without.head_bytes, chunked);
            let persistent = with.weights_bytes + with.gradients_bytes + with.optimizer_bytes;
            assert_eq!(
                with.peak_bytes,
                persistent
                    + with.activations_bytes
                    + with
                        .head_bytes
                        .max(with.recompute_bytes + with.transient_bytes)
            );
            assert!(with.peak_bytes < without.peak_bytes, "{kind:?}");
            assert!(with.lines()[0].contains("checkpointed"));
            assert!(with.lines()[0].contains("max(LM head/loss"));
            // MLX holds the head's phase and a block's recomputation at once.
            let mlx = estimate_for(
                Framework::Mlx,
                &shape,
                &s,
                Precision::Bf16,
                DeviceKind::MlxGpu,
                &steps,
            );
            let all = mlx.weights_bytes
                + mlx.gradients_bytes
                + mlx.optimizer_bytes
                + mlx.activations_bytes
                + mlx.head_bytes
                + mlx.recompute_bytes
                + mlx.transient_bytes;
            assert_eq!(mlx.peak_bytes, all, "{kind:?}");
            assert!(!mlx.lines()[0].contains("max("));
        }
    }
    /// Issue 14: a split family keeps one x·Aᵀ per adapted projection (q, k, v, o, gate, up,
    /// down: 7, against Phi-3's 4 fused ones), and Qwen3's q/k norm its input and fp32 RMS.
    #[test]
    fn split_families_count_each_adapter_and_the_qk_norm() {
        use crate::config::ModelPreset;
        let p = Precision::Float32;
        let lora = |rank| StrategyConfig {
            kind: StrategyKind::Lora,
            lora_rank: rank,
            ..Default::default()
        };
        let per_rank = |shape: &ModelShape| {
            saved_bytes_per_token_per_block(shape, &lora(8), p)
                - saved_bytes_per_token_per_block(shape, &lora(4), p)
        };
        let qwen = ModelShape::from_preset(ModelPreset::TinyQwen3);
        assert_eq!(per_rank(&qwen), 7 * 4 * 4);
        assert_eq!(per_rank(&ModelShape::tiny()), 4 * 4 * 4);
        // The same shape without the q/k norm: 4 + 2 heads of 32, fp32 input + fp32 RMS each.
        let mut no_norm = qwen.clone();
        no_norm.family = crate::model::Family::Llama;
        let full = StrategyConfig {
            kind: StrategyKind::Full,
            ..Default::default()
        };
        assert_eq!(
            saved_bytes_per_token_per_block(&qwen, &full, p)
                - saved_bytes_per_token_per_block(&no_norm, &full, p),
            6 * (32 * 4 + 4)
        );
    }
}
