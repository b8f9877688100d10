//! The fine-tuning benchmark on MLX (mlx-rs): Metal on Apple Silicon, the CPU elsewhere.
//! `cargo run -p macos_mlx_benchmark --release -- --help` lists the flags.

/// `Fast` trains on the first 100 records, `Full` on all of dolly-15k. Edit this line to change
/// the default; the command line (`--mode`, `--samples`) overrides it.
const TUNING_MODE: TuningMode = TuningMode::Fast;

#[cfg(not(target_os = "macos"))]
mod checkpoint;
mod cuda_kernel;
mod decoder;
mod device;
#[cfg(not(target_os = "macos"))]
mod fused_adamw;
/// Metal has no fused AdamW kernel yet (`Tuning::fused_adamw` is CUDA-only).
#[cfg(target_os = "macos")]
mod fused_adamw {
    use anyhow::Result;
    use mlx_rs::Array;

    #[derive(Debug)]
    pub enum FusedAdamW {}

    impl FusedAdamW {
        pub fn new() -> Result<Self> {
            anyhow::bail!("the fused AdamW kernel is CUDA-only")
        }
        pub fn apply(
            &self,
            _: &Array,
            _: &Array,
            _: &Array,
            _: &Array,
            _: &Array,
        ) -> Result<[Array; 3]> {
            match *self {}
        }
    }

    pub fn pack_scalars(_: &[f32; 8], _: &Array) -> Result<Array> {
        anyhow::bail!("the fused AdamW kernel is CUDA-only")
    }
}
#[cfg(not(target_os = "macos"))]
mod init;
mod memory;
#[cfg(target_os = "linux")]
mod openblas;
mod train;
mod tuning;

use std::path::Path;
use std::time::Instant;

use shared::config::{Config, Framework};
use shared::measure::memory::Precision;
use shared::runner::DeviceFacts;
use shared::TuningMode;

use crate::train::MlxBackend;

fn main() {
    let start = Instant::now();
    #[cfg(target_os = "linux")]
    openblas::ensure_cpu_kernels();
    // MLX's CUDA backend computes float32 matrix products in TF32 unless told otherwise
    // (`MLX_ENABLE_TF32`, default 1); libtorch keeps them float32 (`allow_tf32` off). A float32
    // run computes float32 on both frameworks. Set before MLX reads it (on first use); a value
    // the user set is kept. No effect on bf16 runs, on the CPU or on Metal.
    if std::env::var_os("MLX_ENABLE_TF32").is_none() {
        std::env::set_var("MLX_ENABLE_TF32", "0");
    }
    // MLX's CUDA backend keeps 400 instantiated CUDA graphs by default and raises "Cache thrashing
    // is happening" past that; a training step of variable-length micro-batches goes past it
    // (measured on the H200: full and LoRA failed at step 6-7 with 400, completed with 4,000 at
    // the same peak memory). CUDA only; a value the user set is kept.
    if std::env::var_os("MLX_CUDA_GRAPH_CACHE_SIZE").is_none() {
        std::env::set_var("MLX_CUDA_GRAPH_CACHE_SIZE", "4000");
    }
    let args = shared::runner::parse_args(
        env!("CARGO_PKG_NAME"),
        env!("CARGO_PKG_VERSION"),
        env!("CARGO_PKG_DESCRIPTION"),
    );
    let code = shared::runner::main_with_preflight(
        Framework::Mlx,
        TUNING_MODE,
        &args,
        Path::new(env!("CARGO_MANIFEST_DIR")),
        start,
        preflight,
        MlxBackend::new,
    );
    std::process::exit(code);
}

/// `--device` is resolved against the MLX library this process loaded (`device.rs`): a GPU that
/// the library lacks is a usage error, checked here before anything is loaded or written, so it
/// exits with code 2 naming the value and the fix. MLX runs bf16 on every device, so no dtype is
/// refused.
fn preflight(cfg: &Config) -> anyhow::Result<DeviceFacts> {
    let (mlx_device, tuning) = train::check_device(cfg)?;
    let device = mlx_device.kind();
    Ok(DeviceFacts {
        device,
        precision: Precision::resolve(cfg.run.dtype, device.is_gpu()),
        // With real tokens only attention sees the padded rows (`decoder::RealTokens`).
        drops_padding: tuning.real_tokens,
        seq_multiple: tuning.seq_multiple,
        queued_work_bytes: tuning.queued_work_bytes(mlx_device),
    })
}
