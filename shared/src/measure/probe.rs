//! What machine a run ran on: CPU, memory, OS (sysinfo); NVIDIA GPUs (NVML, loaded at run time so
//! the binaries need no NVIDIA library to start); Apple chip and unified memory (sysctl) on macOS.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Hardware {
    pub cpu_model: String,
    pub cpu_physical_cores: Option<usize>,
    pub cpu_logical_cores: usize,
    pub ram_gib: f64,
    pub os: String,
    pub os_version: String,
    pub kernel: String,
    pub arch: String,
    pub gpus: Vec<Gpu>,
    /// Why `gpus` is empty, when NVML could not be used.
    pub gpu_probe_error: Option<String>,
    pub apple: Option<AppleChip>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Gpu {
    pub index: u32,
    pub name: String,
    pub memory_gib: f64,
    pub driver_version: String,
    pub cuda_driver_version: String,
    pub compute_capability: String,
    pub power_limit_w: Option<f64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AppleChip {
    pub chip: String,
    pub unified_memory_gib: f64,
    pub gpu_cores: Option<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Software {
    pub benchmark_version: String,
    pub rustc: String,
    /// Framework crate and version, e.g. `tch 0.24.0`.
    pub framework_crate: String,
    /// The native library underneath, e.g. `libtorch 2.11.0+cu130`, `MLX 0.32.2`.
    pub framework_library: String,
    pub cuda_runtime: Option<String>,
    pub cudnn: Option<String>,
    pub git_commit: Option<String>,
}

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

pub fn probe_hardware() -> Hardware {
    use sysinfo::System;
    let mut sys = System::new();
    sys.refresh_memory();
    sys.refresh_cpu_all();
    let cpu_model = sys
        .cpus()
        .first()
        .map(|c| c.brand().trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into());
    let (gpus, gpu_probe_error) = match probe_nvidia() {
        Ok(g) => (g, None),
        Err(e) => (Vec::new(), Some(e)),
    };
    Hardware {
        cpu_model,
        cpu_physical_cores: System::physical_core_count(),
        cpu_logical_cores: sys.cpus().len(),
        ram_gib: sys.total_memory() as f64 / GIB,
        os: System::name().unwrap_or_else(|| std::env::consts::OS.into()),
        os_version: System::os_version().unwrap_or_default(),
        kernel: System::kernel_version().unwrap_or_default(),
        arch: std::env::consts::ARCH.into(),
        gpus,
        gpu_probe_error,
        apple: probe_apple(),
    }
}

/// NVIDIA GPUs through NVML; an error string (not a failure) where there is none.
pub fn probe_nvidia() -> Result<Vec<Gpu>, String> {
    let nvml = nvml_wrapper::Nvml::init().map_err(|e| format!("NVML unavailable: {e}"))?;
    let driver = nvml.sys_driver_version().unwrap_or_default();
    let cuda = nvml
        .sys_cuda_driver_version()
        .map(|v| {
            format!(
                "{}.{}",
                nvml_wrapper::cuda_driver_version_major(v),
                nvml_wrapper::cuda_driver_version_minor(v)
            )
        })
        .unwrap_or_default();
    let n = nvml
        .device_count()
        .map_err(|e| format!("NVML device count: {e}"))?;
    let mut out = Vec::new();
    for i in 0..n {
        let d = nvml
            .device_by_index(i)
            .map_err(|e| format!("NVML device {i}: {e}"))?;
        out.push(Gpu {
            index: i,
            name: d.name().unwrap_or_default(),
            memory_gib: d.memory_info().map(|m| m.total as f64 / GIB).unwrap_or(0.0),
            driver_version: driver.clone(),
            cuda_driver_version: cuda.clone(),
            compute_capability: d
                .cuda_compute_capability()
                .map(|c| format!("{}.{}", c.major, c.minor))
                .unwrap_or_default(),
            power_limit_w: d
                .enforced_power_limit()
                .ok()
                .map(|mw| f64::from(mw) / 1000.0),
        });
    }
    Ok(out)
}

fn probe_apple() -> Option<AppleChip> {
    if !cfg!(macos) {
        return None;
    }
    let sysctl = |k: &str| -> Option<String> {
        let o = std::process::Command::new("sysctl")
            .args(["-n", k])
            .output()
            .ok()?;
        o.status
            .success()
            .then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let chip = sysctl("machdep.cpu.brand_string")?;
    let mem = sysctl("hw.memsize")
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(0.0)
        / GIB;
    // GPU core count from the IORegistry (no root needed).
    let gpu_cores = std::process::Command::new("ioreg")
        .args(["-rc", "AGXAccelerator", "-d", "1"])
        .output()
        .ok()
        .and_then(|o| {
            let s = String::from_utf8_lossy(&o.stdout).into_owned();
            s.lines()
                .find(|l| l.contains("\"gpu-core-count\""))
                .and_then(|l| l.rsplit('=').next())
                .and_then(|v| v.trim().parse().ok())
        });
    Some(AppleChip {
        chip,
        unified_memory_gib: mem,
        gpu_cores,
    })
}

/// Software versions known to this crate; the binary fills in its framework.
pub fn software(framework_crate: &str, framework_library: &str) -> Software {
    Software {
        benchmark_version: env!("CARGO_PKG_VERSION").into(),
        rustc: env!("FTB_RUSTC_VERSION").into(),
        framework_crate: framework_crate.into(),
        framework_library: framework_library.into(),
        cuda_runtime: None,
        cudnn: None,
        git_commit: option_env!("FTB_GIT_COMMIT")
            .map(str::to_string)
            .filter(|s| !s.is_empty()),
    }
}

/// Resident set size of this process, in GiB.
pub fn process_rss_gib() -> Option<f64> {
    use sysinfo::{Pid, ProcessRefreshKind, ProcessesToUpdate, System};
    let mut sys = System::new();
    let pid = Pid::from_u32(std::process::id());
    sys.refresh_processes_specifics(
        ProcessesToUpdate::Some(&[pid]),
        true,
        ProcessRefreshKind::nothing().with_memory(),
    );
    sys.process(pid).map(|p| p.memory() as f64 / GIB)
}

/// Starts a new high-water mark of this process's resident set (Linux: `5` written to
/// `/proc/self/clear_refs` resets `VmHWM` to the current RSS), so that a repeat's peak RSS is its
/// own. Returns whether it did.
pub fn reset_peak_rss() -> bool {
    cfg!(target_os = "linux") && std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// This process's peak resident set size in GiB and where it comes from: Linux's `VmHWM` (since
/// [`reset_peak_rss`] when `reset` says it worked, else since the process started), macOS's
/// `ru_maxrss` (since the process started), elsewhere the current RSS.
pub fn peak_rss(reset: bool) -> (Option<f64>, String) {
    #[cfg(target_os = "linux")]
    {
        let hwm_kib = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmHWM:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            });
        if let Some(k) = hwm_kib {
            let since = if reset {
                "since this run (or repeat) started"
            } else {
                "since the process started"
            };
            return (
                Some(k * 1024.0 / GIB),
                format!("VmHWM: this process's peak resident set size (host memory) {since}"),
            );
        }
    }
    #[cfg(macos)]
    {
        let _ = reset;
        // SAFETY: getrusage fills the struct it is given.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } == 0 && ru.ru_maxrss > 0 {
            return (
                Some(ru.ru_maxrss as f64 / GIB),
                "ru_maxrss: this process's peak resident set size (host memory) since the process started".into(),
            );
        }
    }
    let _ = reset;
    (
        process_rss_gib(),
        "this process's resident set size (host memory) at the end of the run (no peak readable here)".into(),
    )
}
