//! How the MLX step is run on each device: the choices that make MLX fast there without changing
//! what is computed. Defaults per device; each one can be set by an `FTB_MLX_*` variable so that
//! every choice can be measured before and after (`benchmarks/mlx_gpu.sh` does).
//!
//! What is CUDA-only and what also serves Metal is said per field. The Metal defaults follow what
//! mlx-lm does on Apple GPUs; this project has not measured them on a Mac.

use shared::config::StrategyKind;
use shared::error::ConfigError;

use crate::device::MlxDevice;

/// How the `[N, width]` real-token rows (`Tuning::real_tokens`) are laid out in attention's padded
/// `[B*T, width]` rows. Under right padding no real query attends to a padding slot (causal or
/// document mask) and no real token reads a padding slot's output, so whatever a padding slot
/// holds, its gradient is exactly zero and the results are the same in every form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PaddingSlots {
    /// A gather whose padding slots read row 0. Its backward is a scatter-add that piles every
    /// padding slot's (zero) gradient onto row 0 with atomics: MLX's `scatter<ScatterSum>` was
    /// the largest kernel of a LoRA step in Nsight Compute (200 us a launch, H200).
    Row0,
    /// A gather whose padding slot `s` reads row `s mod N`: the backward's atomics spread over
    /// the rows instead of contending for one.
    Spread,
    /// The real rows written into zeros (a scatter without reduction, no atomics); its backward
    /// is a gather of the real slots' gradients, also without atomics, and reads no padding slot.
    Scatter,
}

impl PaddingSlots {
    pub fn name(self) -> &'static str {
        match self {
            Self::Row0 => "row0",
            Self::Spread => "spread",
            Self::Scatter => "scatter",
        }
    }

    pub fn parse(v: &str) -> Option<Self> {
        [Self::Row0, Self::Spread, Self::Scatter]
            .into_iter()
            .find(|p| p.name() == v.trim())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuning {
    /// Every micro-batch's sequence length is rounded up to a multiple of this, with padding
    /// columns that carry no loss and that no real token attends to (right padding under a causal
    /// or document mask), so losses and gradients do not change.
    /// - CUDA: 128. MLX's fused attention backward (cuDNN) needs the query length to be a multiple
    ///   of its 128-row tile (`ScaledDotProductAttentionVJP::use_fallback` in MLX 0.32); any other
    ///   length falls back to attention written out as matrix products and a softmax over a
    ///   materialised `[B, H, T, T]`. Fewer distinct shapes also keep MLX's CUDA-graph and cuDNN
    ///   plan caches from thrashing.
    /// - Metal: 32, as mlx-lm pads its batches (fewer distinct shapes for Metal's kernel caches).
    /// - CPU: 1 (no padding; nothing to gain).
    pub seq_multiple: usize,
    /// MLX's fused kernels for RMSNorm (`fast::rms_norm`) and RoPE (`fast::rope`, rows whose
    /// positions count from 0) instead of the same arithmetic written as separate operations.
    /// Helps every GPU backend (one kernel instead of five to eight); on the CPU MLX runs the same
    /// arithmetic as the written-out form.
    pub fast_kernels: bool,
    /// Compiled element-wise chains (SwiGLU's `silu(gate) * up`, the AdamW update): MLX fuses each
    /// into one generated kernel. Metal (as mlx-lm compiles); not on CUDA, where it measured no
    /// faster and its first call costs 30 s of NVRTC; not on the CPU, where compiling means
    /// generating and building C++ at run time (about 12 s on the first call).
    pub compile: bool,
    /// `async_eval` between micro-batches, so the host builds the next micro-batch's graph while
    /// the device still runs the previous one (the step's last evaluation stays synchronous: the
    /// runner reads its clock after it). Serves every GPU backend.
    pub overlap: bool,
    /// Projections, norms and the MLP compute the real tokens only (one `[N, width]` matrix per
    /// micro-batch); only attention sees the padded rows (`decoder::RealTokens`). With `seq_multiple`
    /// 128 that keeps the rounding's padding out of every matrix product. Serves every GPU backend
    /// (two gathers per layer against 25-40 % fewer positions in the products); off on the CPU,
    /// where the plan's padding is small and the parity reference keeps the plain layout.
    pub real_tokens: bool,
    /// With `real_tokens`: the `[N, width]` matrices get spare rows up to a multiple of this (rows
    /// that nothing reads, so their gradient is zero). Fewer distinct shapes: MLX's CUDA allocator
    /// reuses a cached buffer only within 32 KiB of the size asked for, and its CUDA-graph cache
    /// keys graphs by their kernels' shapes.
    pub real_multiple: usize,
    /// With `real_tokens`: how the real-token rows reach attention's padded rows, and back in the
    /// backward pass (`PaddingSlots`). Exactly the same results in every form. Serves every GPU
    /// backend; the default stays `Row0` until a GPU measurement says otherwise
    /// (`FTB_MLX_PADDING_SLOTS=row0|spread|scatter`).
    pub padding_slots: PaddingSlots,
    /// With `real_tokens` and a fused q | k | v projection (Phi-3): the projection's output is
    /// laid out in the padded rows once, then split, instead of q, k and v each on their own:
    /// one gather (or scatter) per layer instead of three, and as many fewer in the backward;
    /// the same bytes moved. q, k and v are then strided views of one array. Predicted to help
    /// where the host's encoding bounds the step (MLX on CUDA, measured host-bound); off until
    /// measured (`FTB_MLX_QKV_LAYOUT_ONCE=1`). Serves every GPU backend; no effect on Llama and
    /// Qwen3, whose projections are separate.
    pub qkv_layout_once: bool,
    /// With `real_tokens`: attention's output `[B, heads, T, D]` reaches the real-token rows in one
    /// gather from the heads layout (`RealTokens::heads_to_real`) instead of a transpose that the
    /// reshape copies, then a gather: one kernel and one pass over the padded output fewer per
    /// layer, and the same in the backward of each trained layer. Off until measured
    /// (`FTB_MLX_GATHER_HEADS=1`); serves every GPU backend.
    pub gather_heads: bool,
    /// MLX's CUDA backend records its kernels into CUDA graphs (its default) or launches them one
    /// by one (`MLX_USE_CUDA_GRAPHS=0`, which the binary then sets before MLX starts). CUDA only.
    /// Graphs bound what queued work holds (`queue_mb`); without them MLX queues up to 1,000
    /// operations whatever their size. Measured on the H200 (MLX 0.32.2): full fine-tuning
    /// without graphs ran out of memory at 133 GiB; LoRA (512 records) held 86.9 GiB without
    /// graphs against 45.5 with them, for 17 % more speed (10,495 against 8,951 input tokens/s).
    /// Before `real_multiple` and the fused AdamW, LoRA with graphs outgrew the graph cache
    /// ("Cache thrashing" at MLX's 400 graphs; `cudaGraphInstantiate` out of memory at 4,000,
    /// step 40 of 64), and its default was no graphs.
    pub cuda_graphs: bool,
    /// The AdamW update and gradient clipping as one hand-written CUDA kernel per tensor
    /// (`fused_adamw.rs`) instead of about 21 MLX operations, each a kernel with an fp32
    /// temporary of the tensor's size. The same arithmetic, rounding for rounding. CUDA only.
    pub fused_adamw: bool,
    /// With `cuda_graphs`: MLX's CUDA backend ends a graph once its kernels' inputs pass this many
    /// MiB (`MLX_MAX_MB_PER_BUFFER`; MLX's default on an H100/H200 is 1000) and keeps every input
    /// of a graph allocated until the GPU has run it, with up to 10 graphs queued before the host
    /// waits. So queued work holds up to about 11 x this beyond the live tensors. Measured on the
    /// H200 (last-n, 512 records): 250 held 18.3 GiB against 23.8 at 1000, at the same speed
    /// (19,233 against 18,623 input tokens/s). 100 for full fine-tuning (see `default_for`).
    /// CUDA only.
    pub queue_mb: usize,
    /// The share of the GPU's memory MLX's allocator may hold in live arrays and its buffer cache
    /// together (`set_memory_limit` and `set_cache_limit`), in percent; 0 keeps MLX's own limit.
    /// MLX's CUDA allocator allows 95 % (MLX 0.32, `backend/cuda/allocator.cpp`) and its cache
    /// fills that as micro-batch shapes vary, leaving 5 % for what MLX does not count: the CUDA
    /// context, cuBLAS/cuDNN workspaces and the instantiated CUDA graphs (up to
    /// `MLX_CUDA_GRAPH_CACHE_SIZE` of them). Measured on an H100 80 GB (2026-12-05): with 95 %,
    /// qwen3-0.6b full and LoRA, llama-3.2-1b and -3b LoRA failed at step 17-31 with
    /// `cudaGraphInstantiate ... out of memory` at 79.2 GiB held by the process while MLX's
    /// allocated peak was 38-59 GiB. CUDA only (`FTB_MLX_MEMORY_PERCENT`); Metal keeps MLX's.
    pub memory_percent: usize,
    /// The share of the GPU's memory MLX's buffer cache may keep of what steps freed
    /// (`set_cache_limit`), in percent, at most `memory_percent`; MLX's own default is the memory
    /// limit. MLX's CUDA allocator takes fresh memory from CUDA's stream-ordered pool
    /// (`cudaMallocAsync`) when no cached buffer fits, and hands cached buffers back to that pool
    /// only under its own limit: with a cache as large as the limit the process held 79 GiB on an
    /// 80 GB H100 (2026-12-06, qwen3-0.6b full and LoRA) while MLX counted 63 GiB active + cached
    /// and 38-41 allocated, and a request for a new buffer failed. A smaller cache hands freed
    /// buffers back to CUDA's pool, which reuses them for any size. Measured on that H100
    /// (2026-12-06, `benchmarks/h100-2026-12-06-2/`, 4,096 records): at 10 % qwen3-0.6b full and
    /// LoRA complete (process 61 GiB), phi-3-mini last-n holds 33.3 GiB instead of 70.6 at 1.7 %
    /// less throughput (30,591 against 31,109 input tokens/s); at 0 % qwen3-0.6b full held 48.8
    /// GiB at 1.1 % less than at 10 %. The head in chunks with the cache at 80 % still failed.
    /// CUDA only (`FTB_MLX_CACHE_PERCENT`).
    pub cache_percent: usize,
    /// The LM head and the loss over this many loss positions at a time, each chunk computing
    /// its gradients before the next chunk's logits (`decoder::head_loss_chunked`); 0 keeps the
    /// head in the step's one graph (`FTB_MLX_HEAD_CHUNK`). With a 128k or 152k vocabulary the
    /// head's fp32 logits and their gradients are the largest term of a small model's step.
    pub head_chunk: usize,
}

/// Loss positions per chunk of the LM head on Metal and the CPU
/// (`shared::measure::memory::MLX_HEAD_CHUNK_TOKENS`, which the memory estimate counts).
const HEAD_CHUNK: usize = shared::measure::memory::MLX_HEAD_CHUNK_TOKENS;

/// On MLX's CUDA backend the head stays one graph until the chunks are measured there: the step
/// is bound by the host, and each chunk adds operations for it to encode.
const HEAD_CHUNK_CUDA: usize = 0;

impl Tuning {
    pub fn default_for(device: MlxDevice, strategy: StrategyKind) -> Self {
        match device {
            MlxDevice::Cuda => Tuning {
                seq_multiple: 128,
                fast_kernels: true,
                // Full fine-tuning (4,096 records): 79.3 GiB at 100 against 80.7 at 250, at the
                // same speed (12,982 against 12,601 input tokens/s); not measured at 100 for the
                // others.
                queue_mb: if strategy == StrategyKind::Full {
                    100
                } else {
                    250
                },
                // Measured on the H200 (MLX 0.32.2): no steady gain (18,778 against 18,715 input
                // tokens/s, last-n) for 30 s of run-time compilation in the first step.
                compile: false,
                overlap: true,
                real_tokens: true,
                // Measured on the H200 (last-n, 512 records): 20,206 input tokens/s at 1024,
                // 19,045 at 128, 18,623 at 1 (no spare rows).
                real_multiple: 1024,
                padding_slots: PaddingSlots::Row0,
                qkv_layout_once: false,
                gather_heads: false,
                cuda_graphs: true,
                fused_adamw: true,
                memory_percent: 80,
                cache_percent: 10,
                head_chunk: HEAD_CHUNK_CUDA,
            },
            MlxDevice::Metal => Tuning {
                seq_multiple: 32,
                fast_kernels: true,
                compile: true,
                overlap: true,
                real_tokens: true,
                real_multiple: 1,
                padding_slots: PaddingSlots::Row0,
                qkv_layout_once: false,
                gather_heads: false,
                cuda_graphs: true,
                fused_adamw: false,
                queue_mb: 0,
                memory_percent: 0,
                cache_percent: 0,
                head_chunk: HEAD_CHUNK,
            },
            MlxDevice::Cpu => Tuning {
                seq_multiple: 1,
                fast_kernels: true,
                compile: false,
                overlap: false,
                real_tokens: false,
                real_multiple: 1,
                padding_slots: PaddingSlots::Row0,
                qkv_layout_once: false,
                gather_heads: false,
                cuda_graphs: true,
                fused_adamw: false,
                queue_mb: 0,
                memory_percent: 0,
                cache_percent: 0,
                head_chunk: HEAD_CHUNK,
            },
        }
    }

    /// The defaults for `device`, with any `FTB_MLX_SEQ_MULTIPLE`, `FTB_MLX_FAST_KERNELS`,
    /// `FTB_MLX_COMPILE`, `FTB_MLX_OVERLAP`, `FTB_MLX_REAL_TOKENS`, `FTB_MLX_REAL_MULTIPLE`,
    /// `FTB_MLX_PADDING_SLOTS`, `FTB_MLX_QKV_LAYOUT_ONCE`, `FTB_MLX_GATHER_HEADS`,
    /// `FTB_MLX_FUSED_ADAMW`, `MLX_USE_CUDA_GRAPHS` and (CUDA)
    /// `MLX_MAX_MB_PER_BUFFER` applied. A value that does not parse is a usage error.
    pub fn for_device(device: MlxDevice, strategy: StrategyKind) -> Result<Self, ConfigError> {
        Self::with_env(device, strategy, |k| std::env::var(k).ok())
    }

    fn with_env(
        device: MlxDevice,
        strategy: StrategyKind,
        var: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let mut t = Self::default_for(device, strategy);
        let bad = |key: &str, value: &str, fix: &str| ConfigError::Value {
            key: key.into(),
            value: value.into(),
            reason: "not a value this testing variable takes".into(),
            fix: fix.into(),
        };
        // On/off variables follow every other testing hook's rule (`shared::hooks::flag`); unset
        // keeps the device's default.
        let flag = |key: &str, slot: &mut bool| -> Result<(), ConfigError> {
            if let Some(v) = var(key) {
                *slot = shared::hooks::parse_flag(key, Some(&v))?;
            }
            Ok(())
        };
        // Whole-number variables: unset keeps the default; a value outside `lo..=hi` is refused.
        let whole =
            |key: &str, lo: usize, hi: usize, slot: &mut usize| -> Result<(), ConfigError> {
                if let Some(v) = var(key) {
                    *slot = v
                        .trim()
                        .parse::<usize>()
                        .ok()
                        .filter(|m| (lo..=hi).contains(m))
                        .ok_or_else(|| {
                            bad(
                                key,
                                &v,
                                &format!("use a whole number from {lo} to {hi}, or unset it"),
                            )
                        })?;
                }
                Ok(())
            };
        whole("FTB_MLX_SEQ_MULTIPLE", 1, 4096, &mut t.seq_multiple)?;
        whole("FTB_MLX_REAL_MULTIPLE", 1, 65536, &mut t.real_multiple)?;
        flag("FTB_MLX_FAST_KERNELS", &mut t.fast_kernels)?;
        flag("FTB_MLX_COMPILE", &mut t.compile)?;
        flag("FTB_MLX_OVERLAP", &mut t.overlap)?;
        flag("FTB_MLX_REAL_TOKENS", &mut t.real_tokens)?;
        if let Some(v) = var("FTB_MLX_SPREAD_PADDING") {
            return Err(bad(
                "FTB_MLX_SPREAD_PADDING",
                &v,
                "it was replaced by FTB_MLX_PADDING_SLOTS: set FTB_MLX_PADDING_SLOTS=spread (or row0, scatter) and unset it",
            ));
        }
        if let Some(v) = var("FTB_MLX_PADDING_SLOTS") {
            t.padding_slots = PaddingSlots::parse(&v).ok_or_else(|| {
                bad(
                    "FTB_MLX_PADDING_SLOTS",
                    &v,
                    "use row0, spread or scatter, or unset it",
                )
            })?;
        }
        whole("FTB_MLX_HEAD_CHUNK", 0, 1 << 20, &mut t.head_chunk)?;
        flag("FTB_MLX_QKV_LAYOUT_ONCE", &mut t.qkv_layout_once)?;
        // Measured on the H200 (2026-12-05, MLX 0.32.2, benchmarks/h200-2026-12-05/): with MLX's
        // fused kernels, q, k and v as strided views of one laid-out q | k | v give a NaN loss at
        // step 0 (last-n and LoRA), and without CUDA graphs an illegal memory access; with
        // FTB_MLX_FAST_KERNELS=0 the same run trains. The CPU runs the written-out forms and
        // agrees exactly, so the fault is in a CUDA kernel's handling of those strides
        // (benchmarks/repro/mlx_cuda_strided_qkv.py narrows it down).
        if t.qkv_layout_once && t.fast_kernels && device == MlxDevice::Cuda {
            return Err(bad(
                "FTB_MLX_QKV_LAYOUT_ONCE",
                var("FTB_MLX_QKV_LAYOUT_ONCE").as_deref().unwrap_or_default(),
                "on MLX's CUDA backend (0.32.2) it gives a NaN loss with MLX's fused kernels: unset it, or add FTB_MLX_FAST_KERNELS=0 (slower, for experiments)",
            ));
        }
        flag("FTB_MLX_GATHER_HEADS", &mut t.gather_heads)?;
        flag("FTB_MLX_FUSED_ADAMW", &mut t.fused_adamw)?;
        if t.fused_adamw && device != MlxDevice::Cuda {
            return Err(bad(
                "FTB_MLX_FUSED_ADAMW",
                var("FTB_MLX_FUSED_ADAMW").as_deref().unwrap_or_default(),
                "the fused AdamW kernel is written for MLX's CUDA backend only: unset it or set it to 0 on this device",
            ));
        }
        // MLX's own switch wins over the default ("0" = off, as MLX reads it).
        if let Some(v) = var("MLX_USE_CUDA_GRAPHS") {
            t.cuda_graphs = v.trim() != "0";
        }
        if device == MlxDevice::Cuda {
            whole("MLX_MAX_MB_PER_BUFFER", 1, 1 << 20, &mut t.queue_mb)?;
            whole("FTB_MLX_MEMORY_PERCENT", 10, 95, &mut t.memory_percent)?;
            // Never above the memory limit: unset, the cache follows it down.
            t.cache_percent = t.cache_percent.min(t.memory_percent);
            whole(
                "FTB_MLX_CACHE_PERCENT",
                0,
                t.memory_percent,
                &mut t.cache_percent,
            )?;
        } else {
            for key in ["FTB_MLX_MEMORY_PERCENT", "FTB_MLX_CACHE_PERCENT"] {
                if let Some(v) = var(key) {
                    return Err(bad(
                        key,
                        &v,
                        "it limits MLX's CUDA allocator only: unset it on this device",
                    ));
                }
            }
        }
        Ok(t)
    }

    /// Tells MLX, before it starts its CUDA backend, what `cuda_graphs` says (MLX reads
    /// `MLX_USE_CUDA_GRAPHS` once, on first use).
    pub fn apply_to_mlx(self, device: MlxDevice) {
        if device == MlxDevice::Cuda && !self.cuda_graphs {
            std::env::set_var("MLX_USE_CUDA_GRAPHS", "0");
        }
        if device == MlxDevice::Cuda && std::env::var_os("MLX_MAX_MB_PER_BUFFER").is_none() {
            std::env::set_var("MLX_MAX_MB_PER_BUFFER", self.queue_mb.to_string());
        }
    }

    /// What queued GPU work can hold beyond the live tensors, in bytes: with CUDA graphs, 10
    /// queued graphs and the one being recorded, each up to `queue_mb` of inputs (see
    /// `queue_mb`). Without graphs MLX bounds the queue by operations only (100 a batch); the same
    /// figure is then a floor: LoRA without graphs measured 86.9 GiB against 45.5 with them.
    pub fn queued_work_bytes(self, device: MlxDevice) -> u64 {
        if device == MlxDevice::Cuda {
            11 * self.queue_mb as u64 * (1 << 20)
        } else {
            0
        }
    }

    pub fn to_json(self) -> serde_json::Value {
        serde_json::json!({
            "seq_multiple": self.seq_multiple,
            "fast_kernels": self.fast_kernels,
            "compile": self.compile,
            "overlap": self.overlap,
            "real_tokens": self.real_tokens,
            "real_multiple": self.real_multiple,
            "padding_slots": self.padding_slots.name(),
            "qkv_layout_once": self.qkv_layout_once,
            "gather_heads": self.gather_heads,
            "cuda_graphs": self.cuda_graphs,
            "fused_adamw": self.fused_adamw,
            "queue_mb": self.queue_mb,
            "memory_percent": self.memory_percent,
            "cache_percent": self.cache_percent,
            "head_chunk": self.head_chunk,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    /// `--fit` sizes MLX runs for Metal with shared's facts: they must be this binary's.
    #[test]
    fn the_fit_table_assumes_the_metal_defaults() {
        let f = shared::runner::fit_device_facts(shared::config::Framework::Mlx);
        for kind in [StrategyKind::LastN, StrategyKind::Full, StrategyKind::Lora] {
            let t = Tuning::default_for(MlxDevice::Metal, kind);
            assert_eq!(f.drops_padding, t.real_tokens);
            assert_eq!(f.seq_multiple, t.seq_multiple);
            assert_eq!(f.queued_work_bytes, t.queued_work_bytes(MlxDevice::Metal));
        }
    }

    #[test]
    fn cuda_rounds_to_the_attention_tile_and_the_cpu_does_not() {
        let d = |dev| Tuning::default_for(dev, StrategyKind::LastN);
        assert_eq!(d(MlxDevice::Cuda).seq_multiple, 128);
        assert_eq!(d(MlxDevice::Cpu).seq_multiple, 1);
        assert!(!d(MlxDevice::Cpu).compile);
        assert!(!d(MlxDevice::Cuda).compile);
        assert!(d(MlxDevice::Cuda).cuda_graphs);
        let lora = Tuning::default_for(MlxDevice::Cuda, StrategyKind::Lora);
        assert!(lora.cuda_graphs && lora.overlap);
        // Queued work: 11 graphs of 250 MiB on CUDA, nothing counted elsewhere.
        assert_eq!(
            d(MlxDevice::Cuda).queued_work_bytes(MlxDevice::Cuda),
            (11 * 250) << 20
        );
        assert_eq!(d(MlxDevice::Cpu).queued_work_bytes(MlxDevice::Cpu), 0);
        let full = Tuning::default_for(MlxDevice::Cuda, StrategyKind::Full);
        assert_eq!(full.queued_work_bytes(MlxDevice::Cuda), (11 * 100) << 20);
    }

    #[test]
    fn variables_override_and_bad_values_are_refused() {
        let t = Tuning::with_env(
            MlxDevice::Cuda,
            StrategyKind::Full,
            env(&[
                ("FTB_MLX_SEQ_MULTIPLE", "32"),
                ("FTB_MLX_COMPILE", "0"),
                ("MLX_USE_CUDA_GRAPHS", "0"),
            ]),
        )
        .unwrap();
        assert_eq!(t.seq_multiple, 32);
        assert!(!t.compile && !t.cuda_graphs);
        for p in [
            PaddingSlots::Row0,
            PaddingSlots::Spread,
            PaddingSlots::Scatter,
        ] {
            let t = Tuning::with_env(
                MlxDevice::Cuda,
                StrategyKind::Lora,
                env(&[("FTB_MLX_PADDING_SLOTS", p.name())]),
            );
            assert_eq!(t.unwrap().padding_slots, p);
        }
        for (k, v) in [
            ("FTB_MLX_SEQ_MULTIPLE", "0"),
            ("FTB_MLX_SEQ_MULTIPLE", "abc"),
            ("FTB_MLX_FAST_KERNELS", "yes please"),
            ("FTB_MLX_OVERLAP", "2"),
            ("FTB_MLX_REAL_MULTIPLE", "0"),
            ("FTB_MLX_PADDING_SLOTS", "spreadd"),
            ("FTB_MLX_MEMORY_PERCENT", "99"),
            ("FTB_MLX_MEMORY_PERCENT", "0.8"),
            ("FTB_MLX_HEAD_CHUNK", "-1"),
            ("FTB_MLX_HEAD_CHUNK", "all"),
            // The variable it replaced names its successor.
            ("FTB_MLX_SPREAD_PADDING", "1"),
        ] {
            let e = Tuning::with_env(MlxDevice::Cuda, StrategyKind::Full, env(&[(k, v)]))
                .unwrap_err()
                .to_string();
            assert!(e.contains(k) && e.contains(v), "{e}");
        }
        // The head in chunks of 256 on Metal and the CPU, one graph on CUDA unless set.
        for (dev, chunk) in [
            (MlxDevice::Metal, 256),
            (MlxDevice::Cpu, 256),
            (MlxDevice::Cuda, 0),
        ] {
            assert_eq!(
                Tuning::default_for(dev, StrategyKind::LastN).head_chunk,
                chunk
            );
        }
        let set = Tuning::with_env(
            MlxDevice::Cuda,
            StrategyKind::LastN,
            env(&[("FTB_MLX_HEAD_CHUNK", "512")]),
        );
        assert_eq!(set.unwrap().head_chunk, 512);
        // MLX's allocator limit: 80 % on CUDA unless set, MLX's own elsewhere, refused there.
        assert_eq!(
            Tuning::default_for(MlxDevice::Cuda, StrategyKind::Lora).memory_percent,
            80
        );
        let set = Tuning::with_env(
            MlxDevice::Cuda,
            StrategyKind::Lora,
            env(&[("FTB_MLX_MEMORY_PERCENT", "90")]),
        );
        assert_eq!(set.unwrap().memory_percent, 90);
        // The buffer cache: 10 % of the card unless set, never above the memory limit.
        let cache = |pairs: &[(&str, &str)]| {
            Tuning::with_env(MlxDevice::Cuda, StrategyKind::Full, env(pairs))
                .map(|t| (t.memory_percent, t.cache_percent))
                .map_err(|e| e.to_string())
        };
        assert_eq!(cache(&[]), Ok((80, 10)));
        assert_eq!(cache(&[("FTB_MLX_MEMORY_PERCENT", "60")]), Ok((60, 10)));
        assert_eq!(cache(&[("FTB_MLX_MEMORY_PERCENT", "10")]), Ok((10, 10)));
        assert_eq!(cache(&[("FTB_MLX_CACHE_PERCENT", "80")]), Ok((80, 80)));
        assert_eq!(cache(&[("FTB_MLX_CACHE_PERCENT", "0")]), Ok((80, 0)));
        assert_eq!(cache(&[("FTB_MLX_CACHE_PERCENT", "10")]), Ok((80, 10)));
        for pairs in [
            &[("FTB_MLX_CACHE_PERCENT", "81")][..],
            &[
                ("FTB_MLX_MEMORY_PERCENT", "50"),
                ("FTB_MLX_CACHE_PERCENT", "60"),
            ],
            &[("FTB_MLX_CACHE_PERCENT", "ten")],
        ] {
            let e = cache(pairs).unwrap_err();
            assert!(
                e.contains("FTB_MLX_CACHE_PERCENT") && e.contains(pairs.last().unwrap().1),
                "{e}"
            );
        }
        for dev in [MlxDevice::Cpu, MlxDevice::Metal] {
            assert_eq!(
                Tuning::default_for(dev, StrategyKind::Lora).memory_percent,
                0
            );
            let e = Tuning::with_env(
                dev,
                StrategyKind::Lora,
                env(&[("FTB_MLX_MEMORY_PERCENT", "80")]),
            )
            .unwrap_err()
            .to_string();
            assert!(
                e.contains("FTB_MLX_MEMORY_PERCENT") && e.contains("CUDA"),
                "{e}"
            );
            let e = Tuning::with_env(
                dev,
                StrategyKind::Lora,
                env(&[("FTB_MLX_CACHE_PERCENT", "10")]),
            )
            .unwrap_err()
            .to_string();
            assert!(
                e.contains("FTB_MLX_CACHE_PERCENT") && e.contains("CUDA"),
                "{e}"
            );
        }
        // The fused AdamW kernel is CUDA's: on by default there, refused elsewhere.
        assert!(Tuning::default_for(MlxDevice::Cuda, StrategyKind::LastN).fused_adamw);
        let off = Tuning::with_env(
            MlxDevice::Cuda,
            StrategyKind::LastN,
            env(&[("FTB_MLX_FUSED_ADAMW", "0")]),
        );
        assert!(!off.unwrap().fused_adamw);
        let e = Tuning::with_env(
            MlxDevice::Cpu,
            StrategyKind::LastN,
            env(&[("FTB_MLX_FUSED_ADAMW", "1")]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("FTB_MLX_FUSED_ADAMW") && e.contains("CUDA"),
            "{e}"
        );
        // q | k | v laid out once: refused with CUDA's fused kernels (NaN there), allowed
        // without them and on the CPU.
        let once = |device, extra: &[(&str, &str)]| {
            let mut vars = vec![("FTB_MLX_QKV_LAYOUT_ONCE", "1")];
            vars.extend_from_slice(extra);
            Tuning::with_env(device, StrategyKind::LastN, env(&vars))
        };
        let e = once(MlxDevice::Cuda, &[]).unwrap_err().to_string();
        assert!(
            e.contains("FTB_MLX_QKV_LAYOUT_ONCE") && e.contains("FTB_MLX_FAST_KERNELS=0"),
            "{e}"
        );
        assert!(
            once(MlxDevice::Cuda, &[("FTB_MLX_FAST_KERNELS", "0")])
                .unwrap()
                .qkv_layout_once
        );
        assert!(once(MlxDevice::Cpu, &[]).unwrap().qkv_layout_once);
    }
}
