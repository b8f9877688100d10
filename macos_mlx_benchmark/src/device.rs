//! Which device MLX computes on, asked of the MLX library this process loaded, at run time.
//!
//! One binary serves three MLX builds: Metal on a Mac, the CPU build of PyPI's `mlx-cpu` on
//! Linux, and the CUDA build of PyPI's `mlx-cuda-13` (same version, same ABI; selected by
//! `MLX_LINUX_BACKEND=cuda bash scripts/setup-mlx-linux.sh`, or by putting its `libmlx.so` first on
//! `LD_LIBRARY_PATH`). Which one runs is only known once the library is loaded, so `--device` is
//! resolved here rather than from the target OS.

use shared::config::{DeviceChoice, Framework};
use shared::device::Available;
use shared::error::ConfigError;
use shared::measure::memory::DeviceKind;

/// The MLX device that computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MlxDevice {
    Cpu,
    /// Apple GPU through Metal.
    #[cfg_attr(not(macos), allow(dead_code))]
    Metal,
    /// NVIDIA GPU through MLX's CUDA backend.
    Cuda,
}

impl MlxDevice {
    pub fn is_gpu(self) -> bool {
        self != MlxDevice::Cpu
    }

    /// The device as shared knows it (the memory estimate, the summary's names). MLX's CUDA
    /// backend computes on device 0 of CUDA_VISIBLE_DEVICES: NVML's free memory and the CUDA
    /// context's share of the estimate apply as for the PyTorch binary.
    pub fn kind(self) -> DeviceKind {
        match self {
            MlxDevice::Cpu => DeviceKind::Cpu,
            MlxDevice::Metal => DeviceKind::MlxGpu,
            MlxDevice::Cuda => DeviceKind::Cuda(0),
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
    #[cfg(macos)]
    {
        // mlx-rs's Metal build: every Apple Silicon Mac has the GPU.
        Some(MlxDevice::Metal)
    }
    #[cfg(not(macos))]
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

/// `--device` for this binary, by shared's rule (`shared::device::resolve`) over what the loaded
/// MLX library has: `auto` is its GPU when it has one (Metal on a Mac, CUDA with the CUDA build),
/// else the CPU; `gpu` and `cuda` insist on a GPU.
pub fn resolve(choice: DeviceChoice) -> Result<MlxDevice, ConfigError> {
    let gpu = gpu_backend();
    let libmlx = loaded_libmlx();
    let kind = shared::device::resolve(
        Framework::Mlx,
        choice,
        &Available {
            cuda: &|| gpu == Some(MlxDevice::Cuda),
            apple_gpu: &|| gpu == Some(MlxDevice::Metal),
            library: libmlx.as_deref(),
        },
    )?;
    Ok(match kind {
        DeviceKind::Cpu => MlxDevice::Cpu,
        DeviceKind::Cuda(_) => MlxDevice::Cuda,
        DeviceKind::MlxGpu | DeviceKind::Mps => MlxDevice::Metal,
    })
}

/// MLX's CUDA kernel cache as this run finds it, before its first step. MLX's CUDA backend
/// compiles its kernels with NVRTC on first use and keeps them in `MLX_PTX_CACHE_DIR`, else in
/// `<temp dir>/mlx/<version>/ptx` (MLX 0.32, `backend/cuda/jit_module.cpp`). A fresh machine
/// starts with it empty, and then the first steps include the compiling: measured on an H100
/// (2026-12-06), 18.8 s to the first step against 3.9 s for a run that found the cache filled, so
/// the end-to-end figure depends on it.
#[derive(Debug, Clone)]
pub struct KernelCache {
    pub dir: std::path::PathBuf,
    /// Files in `dir` when the run started.
    pub files: usize,
}

impl KernelCache {
    /// Where MLX keeps its compiled kernels for `version`, and how many are there; `var` reads
    /// the environment.
    pub fn find(version: &str, var: impl Fn(&str) -> Option<String>) -> Self {
        let dir = var("MLX_PTX_CACHE_DIR")
            .filter(|d| !d.is_empty())
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| std::env::temp_dir().join("mlx").join(version).join("ptx"));
        let files = std::fs::read_dir(&dir)
            .map(|d| d.flatten().filter(|e| e.path().is_file()).count())
            .unwrap_or(0);
        Self { dir, files }
    }

    /// The summary's `backend.details.mlx_cuda_kernel_cache`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "dir": self.dir.display().to_string(),
            "files_at_start": self.files,
            "note": if self.files == 0 {
                "empty when the run started: its first steps include NVRTC compiling MLX's CUDA kernels (time to first step and the end-to-end figure with them)"
            } else {
                "MLX's compiled CUDA kernels from earlier runs were there; kernels this run needs and no earlier run did are compiled in its steps"
            },
        })
    }

    /// The summary note for a run that found the cache empty: its first steps compiled MLX's
    /// kernels, a cost a later run on the machine does not pay.
    pub fn cold_note(&self) -> Option<String> {
        (self.files == 0).then(|| {
            format!(
                "time_to_first_step_s: includes NVRTC compiling MLX's CUDA kernels, once per machine and MLX version: MLX's kernel cache ({}) was empty when the run started, so its time to first step and end-to-end figures carry a cost that a later run on this machine does not (backend.details.mlx_cuda_kernel_cache)",
                self.dir.display()
            )
        })
    }
}

#[cfg(test)]
mod tests {
    /// The folder MLX reads (its variable, else the temp folder by version) and the files in it.
    #[test]
    fn the_kernel_cache_is_counted_where_mlx_keeps_it() {
        // No tempfile here: scripts/test.sh compiles this binary's tests without dev-dependencies
        // (the macOS cfg check).
        let dir = std::env::temp_dir().join(format!("ftb-kernel-cache-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let at = dir.display().to_string();
        let var = |k: &str| (k == "MLX_PTX_CACHE_DIR").then(|| at.clone());
        let cache = super::KernelCache::find("0.32.2", var);
        let empty = cache.to_json();
        assert_eq!(empty["dir"], at.as_str());
        assert_eq!(empty["files_at_start"], 0);
        assert!(empty["note"].as_str().unwrap().contains("NVRTC"));
        let note = cache.cold_note().expect("a note for an empty cache");
        assert!(
            note.starts_with("time_to_first_step_s:") && note.contains(&at),
            "{note}"
        );
        for n in ["a.ptx", "b.ptx", "c.cubin"] {
            std::fs::write(dir.join(n), b"x").unwrap();
        }
        std::fs::create_dir(dir.join("sub")).unwrap();
        let cache = super::KernelCache::find("0.32.2", var);
        let filled = cache.to_json();
        assert_eq!(filled["files_at_start"], 3);
        assert!(filled["note"].as_str().unwrap().contains("earlier runs"));
        assert_eq!(cache.cold_note(), None);
        let default = super::KernelCache::find("9.9.9", |_| None).to_json();
        let want = std::env::temp_dir().join("mlx/9.9.9/ptx");
        assert_eq!(default["dir"], want.display().to_string().as_str());
        assert_eq!(default["files_at_start"], 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
