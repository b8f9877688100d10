//! The fine-tuning benchmark on MLX (mlx-rs): Metal on Apple Silicon, the CPU elsewhere.
//! `cargo run -p macos_mlx_benchmark --release -- --help` lists the flags.

/// `Fast` trains on the first 100 records, `Full` on all of dolly-15k. Edit this line to change
/// the default; the command line (`--mode`, `--samples`) overrides it.
const TUNING_MODE: TuningMode = TuningMode::Fast;

#[cfg(target_os = "linux")]
mod openblas;
mod phi3;
mod train;

use std::path::Path;
use std::time::Instant;

use clap::Parser;
use shared::config::{CliArgs, Config, Framework};
use shared::error::exit;
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
    // `--device cuda` (or `device = "cuda"` in a TOML file) is a usage error for this binary.
    // The runner maps errors from building the backend to "run failed" (exit 1), so the device
    // is checked here first to exit with the usage code (2), naming the value and the choices.
    if let Ok(cfg) = Config::resolve(TUNING_MODE, &cli.args, Framework::Mlx) {
        if let Err(e) = train::check_device(&cfg) {
            eprintln!("error: {e}");
            std::process::exit(exit::USAGE);
        }
    }
    let code = shared::runner::main_with(
        Framework::Mlx,
        TUNING_MODE,
        &cli.args,
        Path::new(env!("CARGO_MANIFEST_DIR")),
        start,
        MlxBackend::new,
    );
    std::process::exit(code);
}
