//! How the MLX step is run on each device: the choices that make MLX fast there without changing
//! what is computed. Defaults per device; each one can be set by an `FTB_MLX_*` variable so that
//! every choice can be measured before and after (`benchmarks/mlx_gpu.sh` does).
//!
//! What is CUDA-only and what also serves Metal is said per field. The Metal defaults follow what
//! mlx-lm does on Apple GPUs; this project has not measured them on a Mac.

use shared::config::StrategyKind;
use shared::error::ConfigError;

use crate::device::MlxDevice;

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
    /// micro-batch); only attention sees the padded rows (`phi3::RealTokens`). With `seq_multiple`
    /// 128 that keeps the rounding's padding out of every matrix product. Serves every GPU backend
    /// (two gathers per layer against 25-40 % fewer positions in the products); off on the CPU,
    /// where the plan's padding is small and the parity reference keeps the plain layout.
    pub real_tokens: bool,
    /// MLX's CUDA backend records its kernels into CUDA graphs (its default) or launches them one
    /// by one (`MLX_USE_CUDA_GRAPHS=0`, which the binary then sets before MLX starts). CUDA only.
    /// Measured on the H200 (4,096 records, MLX 0.32.2): with graphs, LoRA (about twice the
    /// kernels per step of full fine-tuning: the adapters' small products) outgrows the graph
    /// cache, which raised "Cache thrashing" at MLX's 400 graphs and failed in
    /// `cudaGraphInstantiate` with out of memory at 4,000 (step 40); without graphs it completes
    /// (14,894 input tokens/s). Full fine-tuning is the reverse: with graphs it completes (10,805,
    /// 86.9 GiB), without them the host runs ahead and it ran out of memory at 133 GiB.
    pub cuda_graphs: bool,
}

impl Tuning {
    pub fn default_for(device: MlxDevice, strategy: StrategyKind) -> Self {
        match device {
            MlxDevice::Cuda => Tuning {
                seq_multiple: 128,
                fast_kernels: true,
                // Measured on the H200 (MLX 0.32.2): no steady gain (18,778 against 18,715 input
                // tokens/s, last-n) for 30 s of run-time compilation in the first step.
                compile: false,
                // Without CUDA graphs (LoRA) the host already runs ahead of the GPU; overlapping
                // micro-batches on top only holds more activations at once.
                overlap: strategy != StrategyKind::Lora,
                real_tokens: true,
                cuda_graphs: strategy != StrategyKind::Lora,
            },
            MlxDevice::Metal => Tuning {
                seq_multiple: 32,
                fast_kernels: true,
                compile: true,
                overlap: true,
                real_tokens: true,
                cuda_graphs: true,
            },
            MlxDevice::Cpu => Tuning {
                seq_multiple: 1,
                fast_kernels: true,
                compile: false,
                overlap: false,
                real_tokens: false,
                cuda_graphs: true,
            },
        }
    }

    /// The defaults for `device`, with any `FTB_MLX_SEQ_MULTIPLE`, `FTB_MLX_FAST_KERNELS`,
    /// `FTB_MLX_COMPILE`, `FTB_MLX_OVERLAP`, `FTB_MLX_REAL_TOKENS` applied. A value that does not parse is a usage error.
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
        if let Some(v) = var("FTB_MLX_SEQ_MULTIPLE") {
            t.seq_multiple = v
                .trim()
                .parse::<usize>()
                .ok()
                .filter(|m| (1..=4096).contains(m))
                .ok_or_else(|| {
                    bad(
                        "FTB_MLX_SEQ_MULTIPLE",
                        &v,
                        "use a whole number from 1 to 4096, or unset it",
                    )
                })?;
        }
        flag("FTB_MLX_FAST_KERNELS", &mut t.fast_kernels)?;
        flag("FTB_MLX_COMPILE", &mut t.compile)?;
        flag("FTB_MLX_OVERLAP", &mut t.overlap)?;
        flag("FTB_MLX_REAL_TOKENS", &mut t.real_tokens)?;
        // MLX's own switch wins over the default ("0" = off, as MLX reads it).
        if let Some(v) = var("MLX_USE_CUDA_GRAPHS") {
            t.cuda_graphs = v.trim() != "0";
        }
        Ok(t)
    }

    /// Tells MLX, before it starts its CUDA backend, what `cuda_graphs` says (MLX reads
    /// `MLX_USE_CUDA_GRAPHS` once, on first use).
    pub fn apply_to_mlx(self, device: MlxDevice) {
        if device == MlxDevice::Cuda && !self.cuda_graphs {
            std::env::set_var("MLX_USE_CUDA_GRAPHS", "0");
        }
    }

    pub fn to_json(self) -> serde_json::Value {
        serde_json::json!({
            "seq_multiple": self.seq_multiple,
            "fast_kernels": self.fast_kernels,
            "compile": self.compile,
            "overlap": self.overlap,
            "real_tokens": self.real_tokens,
            "cuda_graphs": self.cuda_graphs,
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

    #[test]
    fn cuda_rounds_to_the_attention_tile_and_the_cpu_does_not() {
        let d = |dev| Tuning::default_for(dev, StrategyKind::LastN);
        assert_eq!(d(MlxDevice::Cuda).seq_multiple, 128);
        assert_eq!(d(MlxDevice::Cpu).seq_multiple, 1);
        assert!(!d(MlxDevice::Cpu).compile);
        assert!(!d(MlxDevice::Cuda).compile);
        assert!(d(MlxDevice::Cuda).cuda_graphs);
        let lora = Tuning::default_for(MlxDevice::Cuda, StrategyKind::Lora);
        assert!(!lora.cuda_graphs && !lora.overlap);
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
        for (k, v) in [
            ("FTB_MLX_SEQ_MULTIPLE", "0"),
            ("FTB_MLX_SEQ_MULTIPLE", "abc"),
            ("FTB_MLX_FAST_KERNELS", "yes please"),
            ("FTB_MLX_OVERLAP", "2"),
        ] {
            let e = Tuning::with_env(MlxDevice::Cuda, StrategyKind::Full, env(&[(k, v)]))
                .unwrap_err()
                .to_string();
            assert!(e.contains(k) && e.contains(v), "{e}");
        }
    }
}
