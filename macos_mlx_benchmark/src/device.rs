//! Which device MLX computes on, asked of the MLX library this process loaded, at run time.
//!
//! One binary serves three MLX builds: Metal on a Mac, the CPU build of PyPI's `mlx-cpu` on
//! Linux, and the CUDA build of PyPI's `mlx-cuda-13` (same version, same ABI; selected by
//! `MLX_LINUX_BACKEND=cuda bash scripts/setup-mlx-linux.sh`, or by putting its `libmlx.so` first on
//! `LD_LIBRARY_PATH`). Which one runs is only known once the library is loaded, so `--device` is
//! resolved here rather than from the target OS.

use shared::config::DeviceChoice;
use shared::error::ConfigError;

/// The MLX device that computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MlxDevice {
    Cpu,
    /// Apple GPU through Metal.
    #[cfg_attr(not(target_os = "macos"), allow(dead_code))]
    Metal,
    /// NVIDIA GPU through MLX's CUDA backend.
    Cuda,
}

impl MlxDevice {
    pub fn is_gpu(self) -> bool {
        self != MlxDevice::Cpu
    }

    /// `backend.device` in the summary. A CUDA GPU is named as the PyTorch binary names it, so
    /// telemetry, energy and the report treat both frameworks' GPU runs alike.
    pub fn summary_name(self) -> &'static str {
        match self {
            MlxDevice::Cpu => "cpu",
            MlxDevice::Metal => "gpu",
            MlxDevice::Cuda => "cuda:0",
        }
    }

    /// The MLX backend's name, as recorded in `backend.details.mlx_backend`.
    pub fn backend_name(self) -> &'static str {
        match self {
            MlxDevice::Cpu => "cpu",
            MlxDevice::Metal => "metal",
            MlxDevice::Cuda => "cuda",
        }
    }
}

/// The GPU backend of the loaded MLX library, if it has one.
pub fn gpu_backend() -> Option<MlxDevice> {
    #[cfg(target_os = "macos")]
    {
        // mlx-rs's Metal build: every Apple Silicon Mac has the GPU.
        Some(MlxDevice::Metal)
    }
    #[cfg(not(target_os = "macos"))]
    {
        let mut cuda = false;
        // SAFETY: mlx_cuda_is_available writes one bool and returns a status; it is exported by
        // every libmlx of this version (the CPU build answers false).
        let status = unsafe { mlx_sys::mlx_cuda_is_available(&mut cuda) };
        (status == 0 && cuda).then_some(MlxDevice::Cuda)
    }
}

/// The `libmlx` shared library mapped into this process (Linux), to record which MLX build ran.
pub fn loaded_libmlx() -> Option<String> {
    mapped_files(|p| {
        std::path::Path::new(p)
            .file_name()
            .is_some_and(|f| f.to_string_lossy().starts_with("libmlx"))
    })
    .into_iter()
    .next()
}

/// The files mapped into this process (`/proc/self/maps`, Linux; empty elsewhere) whose path
/// `keep` accepts, resolved through links, sorted, each once.
pub fn mapped_files(keep: impl Fn(&str) -> bool) -> Vec<String> {
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
        return Vec::new();
    };
    let mut files: Vec<String> = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .filter(|p| keep(p))
        .map(|p| {
            std::fs::canonicalize(p)
                .map(|c| c.display().to_string())
                .unwrap_or_else(|_| p.to_string())
        })
        .collect();
    files.sort();
    files.dedup();
    files
}

/// `--device` for this binary. `auto` is the GPU of the loaded MLX when it has one (Metal on a
/// Mac, CUDA with the CUDA build), else the CPU; `gpu` and `cuda` insist on a GPU.
pub fn resolve(choice: DeviceChoice) -> Result<MlxDevice, ConfigError> {
    resolve_with(choice, gpu_backend(), loaded_libmlx().as_deref())
}

fn resolve_with(
    choice: DeviceChoice,
    gpu: Option<MlxDevice>,
    libmlx: Option<&str>,
) -> Result<MlxDevice, ConfigError> {
    let bad = |value: &str, reason: String, fix: &str| ConfigError::Value {
        key: "device".into(),
        value: value.into(),
        reason,
        fix: fix.into(),
    };
    const CUDA_FIX: &str = "on Linux with an NVIDIA GPU, build the MLX binary against MLX's CUDA \
        backend: `MLX_LINUX_BACKEND=cuda bash scripts/setup-mlx-linux.sh`, then `cargo build \
        --release -p macos_mlx_benchmark` (README, \"The MLX binary on an NVIDIA GPU\"); or use \
        --device cpu";
    let no_gpu = || {
        format!(
            "the loaded MLX library ({}) has no GPU backend",
            libmlx.unwrap_or("libmlx")
        )
    };
    match choice {
        DeviceChoice::Cpu => Ok(MlxDevice::Cpu),
        DeviceChoice::Auto => Ok(gpu.unwrap_or(MlxDevice::Cpu)),
        DeviceChoice::Gpu => gpu.ok_or_else(|| bad("gpu", no_gpu(), CUDA_FIX)),
        DeviceChoice::Cuda => match gpu {
            Some(MlxDevice::Cuda) => Ok(MlxDevice::Cuda),
            Some(_) => Err(bad(
                "cuda",
                "MLX's GPU here is Metal, not CUDA".into(),
                "use --device gpu (or auto) on a Mac",
            )),
            None => Err(bad("cuda", no_gpu(), CUDA_FIX)),
        },
        DeviceChoice::Mps => Err(bad(
            "mps",
            "MPS is PyTorch's name for the Apple GPU".into(),
            "MLX calls it gpu: use --device gpu (or auto)",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_takes_the_gpu_when_there_is_one() {
        let r = |c, g| resolve_with(c, g, Some("/x/libmlx.so"));
        assert_eq!(r(DeviceChoice::Auto, None).unwrap(), MlxDevice::Cpu);
        assert_eq!(
            r(DeviceChoice::Auto, Some(MlxDevice::Cuda)).unwrap(),
            MlxDevice::Cuda
        );
        assert_eq!(
            r(DeviceChoice::Gpu, Some(MlxDevice::Metal)).unwrap(),
            MlxDevice::Metal
        );
        assert_eq!(
            r(DeviceChoice::Cuda, Some(MlxDevice::Cuda)).unwrap(),
            MlxDevice::Cuda
        );
        assert_eq!(
            r(DeviceChoice::Cpu, Some(MlxDevice::Cuda)).unwrap(),
            MlxDevice::Cpu
        );
    }

    #[test]
    fn a_gpu_that_is_not_there_names_the_library_and_the_fix() {
        for c in [DeviceChoice::Gpu, DeviceChoice::Cuda] {
            let e = resolve_with(c, None, Some("/w/mlx-cpu/libmlx.so"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("/w/mlx-cpu/libmlx.so"), "{e}");
            assert!(e.contains("MLX_LINUX_BACKEND=cuda"), "{e}");
        }
        let e = resolve_with(DeviceChoice::Cuda, Some(MlxDevice::Metal), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--device gpu"), "{e}");
        assert!(resolve_with(DeviceChoice::Mps, Some(MlxDevice::Metal), None).is_err());
    }
}
