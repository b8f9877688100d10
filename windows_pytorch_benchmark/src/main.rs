//! Fine-tuning benchmark on PyTorch (libtorch through tch): CUDA on NVIDIA, MPS on a Mac, CPU
//! anywhere. The workload (data, batches, schedule, what trains) and the measurement come from the
//! `shared` crate; this binary builds Phi-3 in tch and runs the optimizer steps.

use std::path::Path;
use std::time::Instant;

use shared::config::{Framework, TuningMode};
use shared::measure::memory::Precision;
use shared::runner::DeviceFacts;

use windows_pytorch_benchmark::train;

/// `Fast` trains on the first 100 records, `Full` on all 15,011 of dolly-15k. Edit to change the
/// default; `--mode` / `--samples` override it.
const TUNING_MODE: TuningMode = TuningMode::Fast;

fn main() {
    let start = Instant::now();
    // A data-parallel rank: its own GPU only, and cudarc able to open libtorch's NCCL. Both
    // before CUDA initialises (the second may run this executable again).
    #[cfg(target_os = "linux")]
    {
        windows_pytorch_benchmark::nccl::select_rank_gpu();
        windows_pytorch_benchmark::nccl::bridge_nccl_library();
    }
    let args = shared::runner::parse_args(
        env!("CARGO_PKG_NAME"),
        env!("CARGO_PKG_VERSION"),
        "Fine-tune Phi-3 on dolly-15k with PyTorch (tch) and measure it",
    );
    // Micro-batch shapes change every step; expandable segments stop the caching allocator from
    // fragmenting (measured on the H200: full fine-tuning reserved 129 GiB without it). Must be
    // set before CUDA initialises; a user's own setting wins.
    if std::env::var_os("PYTORCH_CUDA_ALLOC_CONF").is_none() {
        std::env::set_var("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True");
    }
    // libtorch's errors arrive as panics; the backend catches them and turns them into errors
    // (its message is printed and kept in the summary), so the hook stays quiet about those. Any
    // other panic is a bug: it is printed, never hidden (exit code 101, Rust's for a panic).
    let debug_panics = shared::hooks::flag("FTB_DEBUG_PANICS").unwrap_or(false);
    std::panic::set_hook(Box::new(move |info| {
        if debug_panics || !train::panic_is_caught() {
            eprintln!(
                "error: internal error (a bug in the benchmark; please report it with the command line): {info}"
            );
        }
    }));
    let code = shared::runner::main_with_preflight(
        Framework::Pytorch,
        TUNING_MODE,
        &args,
        Path::new(env!("CARGO_MANIFEST_DIR")),
        start,
        preflight,
        train::TorchBackend::new,
    );
    std::process::exit(code);
}

/// The device and precision the backend will pick, found before anything is loaded so that an
/// absent device exits with the usage code (2) and the memory estimate uses the right dtype.
/// libtorch runs bf16 on every device it supports (CUDA, MPS, CPU), so no dtype is refused here.
fn preflight(cfg: &shared::config::Config) -> anyhow::Result<DeviceFacts> {
    train::check_hooks()?;
    let kind = train::pick_device(cfg.run.device)?;
    let device = train::torch_device(kind);
    // `--nproc N` starts a rank per GPU: N GPUs must be there (a rank of an external launcher
    // sees only its own GPU, and was counted by its launcher).
    let is_rank = shared::dist::Rank::from_env().ok().flatten().is_some();
    if cfg.run.nproc > 1 && !is_rank && matches!(device, tch::Device::Cuda(_)) {
        let gpus = tch::Cuda::device_count().max(0) as usize;
        if gpus < cfg.run.nproc {
            return Err(shared::error::ConfigError::value(
                "nproc",
                cfg.run.nproc,
                &format!("one rank per GPU, and libtorch sees {gpus} CUDA device(s)"),
                &format!("use --nproc {gpus} or less (CUDA_VISIBLE_DEVICES lists the GPUs a run may use)"),
            )
            .into());
        }
    }
    let precision = Precision::resolve(cfg.run.dtype, kind.is_gpu());
    // Which attention path the backend will take (an unknown FTB_ATTENTION stops here).
    let attention = train::AttentionMode::pick(device, precision, cfg.workload.data.pad_to)?;
    Ok(DeviceFacts {
        device: kind,
        precision,
        drops_padding: attention == train::AttentionMode::Varlen,
        seq_multiple: 1,
        queued_work_bytes: 0,
    })
}
