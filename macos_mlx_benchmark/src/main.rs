//! The fine-tuning benchmark on MLX (mlx-rs): Metal on Apple Silicon, the CPU elsewhere.
//! `cargo run -p macos_mlx_benchmark --release -- --help` lists the flags.

/// `Fast` trains on the first 100 records, `Full` on all of dolly-15k. Edit this line to change
/// the default; the command line (`--mode`, `--samples`) overrides it.
const TUNING_MODE: TuningMode = TuningMode::Fast;

mod memory;
#[cfg(target_os = "linux")]
mod openblas;
mod phi3;
mod train;

use std::path::Path;
use std::time::Instant;

use clap::Parser;
use shared::config::{CliArgs, Config, DeviceChoice, Framework};
use shared::measure::memory::{DeviceKind, Precision};
use shared::runner::DeviceFacts;
use shared::TuningMode;

use crate::train::MlxBackend;

/// Fine-tune Phi-3 with MLX and write benchmark_summary.json.
#[derive(Debug, Parser)]
#[command(name = "macos_mlx_benchmark", version, about)]
struct Cli {
    #[command(flatten)]
    args: CliArgs,
}

fn main() {
    let start = Instant::now();
    #[cfg(target_os = "linux")]
    openblas::ensure_cpu_kernels();
    let cli = Cli::parse();
    let code = shared::runner::main_with_preflight(
        Framework::Mlx,
        TUNING_MODE,
        &cli.args,
        Path::new(env!("CARGO_MANIFEST_DIR")),
        start,
        preflight,
        MlxBackend::new,
    );
    std::process::exit(code);
}

/// `--device cuda` (or `device = "cuda"` in a TOML file) is a usage error for this binary: checked
/// here, before anything is loaded or written, so it exits with code 2 naming the value and the
/// choices. MLX runs bf16 on both its devices, so no dtype is refused.
fn preflight(cfg: &Config) -> anyhow::Result<DeviceFacts> {
    train::check_device(cfg)?;
    let device = match cfg.run.device {
        DeviceChoice::Gpu => DeviceKind::MlxGpu,
        DeviceChoice::Auto if cfg!(target_os = "macos") => DeviceKind::MlxGpu,
        _ => DeviceKind::Cpu,
    };
    Ok(DeviceFacts {
        device,
        precision: Precision::resolve(cfg.run.dtype, device.is_gpu()),
        drops_padding: false,
    })
}
