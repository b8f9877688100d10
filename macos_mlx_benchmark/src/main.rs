//! The fine-tuning benchmark on MLX (mlx-rs): Metal on Apple Silicon, MLX's CUDA backend on NVIDIA GPUs (Linux), the CPU elsewhere.
//! `cargo run -p macos_mlx_benchmark --release -- --help` lists the flags.

/// `Fast` trains on the first 100 records, `Full` on all of dolly-15k. Edit this line to change
/// the default; the command line (`--mode`, `--samples`) overrides it.
const TUNING_MODE: TuningMode = TuningMode::Fast;

// Activation checkpointing through MLX's C API: every backend, Metal included.
mod checkpoint;
// MLX's custom CUDA kernels, for the fused AdamW and the random init on the device.
#[cfg(not(macos))]
mod cuda_kernel;
mod decoder;
mod device;
#[cfg(not(macos))]
mod fused_adamw;
/// Metal has no fused AdamW kernel yet (`Tuning::fused_adamw` is CUDA-only).
#[cfg(macos)]
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
mod graph;
#[cfg(not(macos))]
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
    exit_without_teardown(code)
}

/// Ends the process once everything is written, without the C++ static destructors that
/// `std::process::exit` runs: MLX's CUDA backend synchronises its stream in them, and after a
/// failure of that backend the synchronisation throws, so the process aborted (exit 134) after
/// writing its `failed` summary (measured on the H200, 2026-12-05: a cuDNN error, then
/// `cudaStreamSynchronize ... illegal memory access` in teardown). The driver and the operating
/// system free the device and host memory either way.
fn exit_without_teardown(code: i32) -> ! {
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // SAFETY: fflush(NULL) flushes every C stream; _exit ends the process at once.
    unsafe {
        libc::fflush(std::ptr::null_mut());
        libc::_exit(code)
    }
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

#[cfg(test)]
mod tests {
    /// The crates a dependency table of `Cargo.toml` names.
    fn table(manifest: &str, header: &str) -> Vec<String> {
        let start = manifest
            .find(header)
            .unwrap_or_else(|| panic!("Cargo.toml has no {header}"));
        manifest[start + header.len()..]
            .lines()
            .skip(1)
            .take_while(|l| !l.starts_with('['))
            .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
            .filter_map(|l| l.split('=').next().map(|n| n.trim().to_string()))
            .collect()
    }

    /// `scripts/test.sh` type-checks the macOS code paths on Linux (`--cfg macos`) against the
    /// Linux dependencies, so the macOS table must name every MLX crate the Linux one does (the
    /// code calls `mlx_sys` directly): a crate missing there breaks only the Mac build.
    #[test]
    fn the_macos_build_has_every_mlx_crate_of_the_linux_build() {
        let m = include_str!("../Cargo.toml");
        let mac = table(m, "[target.'cfg(target_os = \"macos\")'.dependencies]");
        let linux = table(m, "[target.'cfg(not(target_os = \"macos\"))'.dependencies]");
        assert_eq!(linux, ["mlx-rs", "mlx-sys"]);
        for c in &linux {
            assert!(mac.contains(c), "the macOS dependencies lack {c}: {mac:?}");
        }
    }
}
