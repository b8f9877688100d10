//! NVIDIA GPUs through NVML (`nvml-wrapper`, loaded at run time: a machine without the NVIDIA
//! driver simply has no NVIDIA series). Each tick asks each GPU nine cheap driver queries; a query
//! the GPU does not support is asked once and then skipped (and named in the summary), any other
//! failure is recorded in the sample's `errors`.

use nvml_wrapper::bitmasks::device::ThrottleReasons;
use nvml_wrapper::enum_wrappers::device::{Clock, TemperatureSensor};
use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::struct_wrappers::device::ProcessInfo;
use nvml_wrapper::{Device, Nvml};

use super::{DeviceInfo, NvidiaSample, GIB};

/// The queries, in the order `unsupported` flags them.
const QUERIES: [&str; 9] = [
    "utilization",
    "memory_info",
    "running_compute_processes",
    "power_usage",
    "total_energy_consumption",
    "sm_clock",
    "memory_clock",
    "temperature",
    "throttle_reasons",
];

struct Gpu {
    index: u32,
    name: String,
    uuid: Option<String>,
    unsupported: [bool; QUERIES.len()],
}

pub struct NvidiaProbe {
    nvml: Nvml,
    gpus: Vec<Gpu>,
    pid: u32,
}

/// Throttle reasons that slow the clocks down (the others say why clocks are low, e.g. idle).
pub const SLOWDOWN_REASONS: [&str; 5] = [
    "sw_power_cap",
    "hw_slowdown",
    "sw_thermal_slowdown",
    "hw_thermal_slowdown",
    "hw_power_brake_slowdown",
];

fn reason_names(r: ThrottleReasons) -> Vec<String> {
    let table = [
        (ThrottleReasons::GPU_IDLE, "gpu_idle"),
        (
            ThrottleReasons::APPLICATIONS_CLOCKS_SETTING,
            "applications_clocks_setting",
        ),
        (ThrottleReasons::SW_POWER_CAP, "sw_power_cap"),
        (ThrottleReasons::HW_SLOWDOWN, "hw_slowdown"),
        (ThrottleReasons::SYNC_BOOST, "sync_boost"),
        (ThrottleReasons::SW_THERMAL_SLOWDOWN, "sw_thermal_slowdown"),
        (ThrottleReasons::HW_THERMAL_SLOWDOWN, "hw_thermal_slowdown"),
        (
            ThrottleReasons::HW_POWER_BRAKE_SLOWDOWN,
            "hw_power_brake_slowdown",
        ),
        (
            ThrottleReasons::DISPLAY_CLOCK_SETTING,
            "display_clock_setting",
        ),
    ];
    table
        .iter()
        .filter(|(bit, _)| r.contains(*bit))
        .map(|(_, n)| (*n).to_string())
        .collect()
}

impl NvidiaProbe {
    /// Loads NVML and lists the GPUs; an error string (not a failure) where there is no NVML.
    pub fn new() -> Result<Self, String> {
        let nvml = Nvml::init().map_err(|e| format!("NVML unavailable: {e}"))?;
        let n = nvml
            .device_count()
            .map_err(|e| format!("NVML device count: {e}"))?;
        let mut gpus = Vec::new();
        for index in 0..n {
            let d = nvml
                .device_by_index(index)
                .map_err(|e| format!("NVML device {index}: {e}"))?;
            gpus.push(Gpu {
                index,
                name: d.name().unwrap_or_else(|_| "NVIDIA GPU".into()),
                uuid: d.uuid().ok(),
                unsupported: [false; QUERIES.len()],
            });
        }
        if gpus.is_empty() {
            return Err("NVML loaded but sees no GPU".into());
        }
        Ok(Self {
            nvml,
            gpus,
            pid: std::process::id(),
        })
    }

    pub fn devices(&self) -> Vec<DeviceInfo> {
        self.gpus
            .iter()
            .map(|g| DeviceInfo {
                id: format!("nvidia:{}", g.index),
                name: g.name.clone(),
                uuid: g.uuid.clone(),
                unsupported: QUERIES
                    .iter()
                    .zip(g.unsupported)
                    .filter(|(_, u)| *u)
                    .map(|(q, _)| (*q).to_string())
                    .collect(),
                unavailable: Vec::new(),
            })
            .collect()
    }

    pub fn sample(&mut self) -> Vec<NvidiaSample> {
        let pid = self.pid;
        let nvml = &self.nvml;
        self.gpus
            .iter_mut()
            .map(|g| match nvml.device_by_index(g.index) {
                Ok(d) => sample_gpu(&d, g, pid),
                Err(e) => NvidiaSample {
                    index: g.index,
                    errors: vec![format!("device_by_index: {e}")],
                    ..Default::default()
                },
            })
            .collect()
    }
}

/// This process's device memory on one GPU, as NVML lists it among the GPU's compute processes:
/// its CUDA context, the framework's memory and library workspaces. `None` when the process is not
/// listed or NVML withholds the figure. The one reading of it, for the telemetry sampler and for
/// [`ProcessMemoryPeak`].
pub fn process_bytes(processes: &[ProcessInfo], pid: u32) -> Option<u64> {
    processes
        .iter()
        .filter(|p| p.pid == pid)
        .find_map(|p| match p.used_gpu_memory {
            UsedGpuMemory::Used(b) => Some(b),
            UsedGpuMemory::Unavailable => None,
        })
}

/// The highest device memory NVML has reported for this process (over every GPU, which NVML
/// numbers physically whatever `CUDA_VISIBLE_DEVICES` says), sampled when asked: the runner asks
/// after every step, outside the timed region, for every backend. Sampling between steps misses
/// what a step frees before it ends, but the frameworks keep freed memory cached on the device, so
/// the process's figure falls only when they return it.
pub struct ProcessMemoryPeak {
    nvml: Result<Nvml, String>,
    pid: u32,
    peak_bytes: Option<u64>,
    samples: usize,
}

impl Default for ProcessMemoryPeak {
    fn default() -> Self {
        Self::new()
    }
}

impl ProcessMemoryPeak {
    /// Loads NVML; without it every reading is null and [`Self::source`] says why.
    pub fn new() -> Self {
        Self {
            nvml: Nvml::init().map_err(|e| format!("NVML unavailable: {e}")),
            pid: std::process::id(),
            peak_bytes: None,
            samples: 0,
        }
    }

    /// One reading: this process's memory summed over the GPUs that list it.
    pub fn sample(&mut self) {
        let Ok(nvml) = &self.nvml else { return };
        self.samples += 1;
        let mut total = None;
        for i in 0..nvml.device_count().unwrap_or(0) {
            let Ok(dev) = nvml.device_by_index(i) else {
                continue;
            };
            let procs = dev.running_compute_processes().unwrap_or_default();
            if let Some(b) = process_bytes(&procs, self.pid) {
                total = Some(total.unwrap_or(0) + b);
            }
        }
        if let Some(b) = total.filter(|&b| b > 0) {
            self.peak_bytes = Some(self.peak_bytes.map_or(b, |p| p.max(b)));
        }
    }

    pub fn peak_gib(&self) -> Option<f64> {
        self.peak_bytes.map(|b| b as f64 / GIB)
    }

    /// Where the figure comes from, or why there is none.
    pub fn source(&self) -> String {
        match (&self.nvml, self.peak_bytes) {
            (Err(e), _) => e.clone(),
            (Ok(_), Some(_)) => format!(
                "NVML: this process's device memory (CUDA context, framework memory, library workspaces), the highest of {} readings taken after every step",
                self.samples
            ),
            (Ok(_), None) => "NVML lists no device memory for this process on any GPU".into(),
        }
    }
}

/// Runs query `k` unless the GPU said it does not support it; records other errors.
fn ask<T>(
    g: &mut Gpu,
    errors: &mut Vec<String>,
    k: usize,
    f: impl FnOnce() -> Result<T, NvmlError>,
) -> Option<T> {
    if g.unsupported[k] {
        return None;
    }
    match f() {
        Ok(v) => Some(v),
        Err(NvmlError::NotSupported) => {
            g.unsupported[k] = true;
            None
        }
        Err(e) => {
            errors.push(format!("{}: {e}", QUERIES[k]));
            None
        }
    }
}

fn sample_gpu(d: &Device, g: &mut Gpu, pid: u32) -> NvidiaSample {
    let mut errors = Vec::new();
    let e = &mut errors;
    // The energy counter first: it is the figure most sensitive to when it is read.
    let energy = ask(g, e, 4, || d.total_energy_consumption());
    let power = ask(g, e, 3, || d.power_usage());
    let util = ask(g, e, 0, || d.utilization_rates());
    let mem = ask(g, e, 1, || d.memory_info());
    let procs = ask(g, e, 2, || d.running_compute_processes());
    let sm = ask(g, e, 5, || d.clock_info(Clock::SM));
    let memclk = ask(g, e, 6, || d.clock_info(Clock::Memory));
    let temp = ask(g, e, 7, || d.temperature(TemperatureSensor::Gpu));
    let thr = ask(g, e, 8, || d.current_throttle_reasons());
    let process_memory_gib = procs
        .and_then(|ps| process_bytes(&ps, pid))
        .map(|b| b as f64 / GIB);
    NvidiaSample {
        index: g.index,
        utilization_percent: util.as_ref().map(|u| f64::from(u.gpu)),
        memory_utilization_percent: util.as_ref().map(|u| f64::from(u.memory)),
        memory_used_gib: mem.map(|m| m.used as f64 / GIB),
        process_memory_gib,
        power_w: power.map(|mw| f64::from(mw) / 1000.0),
        energy_counter_j: energy.map(|mj| mj as f64 / 1000.0),
        sm_clock_mhz: sm.map(f64::from),
        memory_clock_mhz: memclk.map(f64::from),
        temperature_c: temp.map(f64::from),
        throttle_reasons: thr.map(reason_names).unwrap_or_default(),
        errors,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttle_reasons_get_their_names() {
        let r = ThrottleReasons::SW_POWER_CAP | ThrottleReasons::GPU_IDLE;
        assert_eq!(reason_names(r), ["gpu_idle", "sw_power_cap"]);
        assert!(reason_names(ThrottleReasons::empty()).is_empty());
    }

    /// The real NVML sampler on this machine's GPUs; skipped, saying why, where there is none.
    #[test]
    fn the_nvml_probe_reads_plausible_values() {
        let mut p = match NvidiaProbe::new() {
            Ok(p) => p,
            Err(why) => {
                eprintln!("skipped: no NVIDIA GPU to sample here ({why})");
                return;
            }
        };
        let first = p.sample();
        std::thread::sleep(std::time::Duration::from_millis(300));
        let second = p.sample();
        assert_eq!(first.len(), p.gpus.len());
        for (a, b) in first.iter().zip(&second) {
            assert!(b.errors.is_empty(), "GPU {}: {:?}", b.index, b.errors);
            let u = b
                .utilization_percent
                .expect("every NVIDIA GPU reports utilization");
            assert!((0.0..=100.0).contains(&u), "utilization {u}");
            let used = b.memory_used_gib.unwrap();
            // An idle GPU may report 0 bytes used (seen on the H200, driver 580).
            assert!((0.0..1024.0).contains(&used), "memory used {used} GiB");
            if let Some(w) = b.power_w {
                assert!(w > 1.0 && w < 3000.0, "power {w} W");
            }
            if let Some(t) = b.temperature_c {
                assert!(t > 5.0 && t < 120.0, "temperature {t} C");
            }
            if let Some(c) = b.sm_clock_mhz {
                assert!(c > 0.0 && c < 5000.0, "SM clock {c} MHz");
            }
            if let (Some(e0), Some(e1)) = (a.energy_counter_j, b.energy_counter_j) {
                assert!(e1 >= e0, "the energy counter never goes back: {e0} -> {e1}");
                // At most ~2 kW for 0.3 s (and the counter updates every few ms).
                assert!(e1 - e0 < 2000.0, "{} J in 0.3 s", e1 - e0);
            }
        }
        let devs = p.devices();
        assert!(devs[0].id.starts_with("nvidia:") && !devs[0].name.is_empty());
    }
}
