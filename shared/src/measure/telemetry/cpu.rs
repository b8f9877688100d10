//! The host through `sysinfo`: system and process CPU utilisation, process RSS, system memory.
//! Per tick it reads `/proc/stat`, `/proc/self/stat` and `/proc/meminfo` (or the platform's
//! equivalents): no process list is scanned.

use sysinfo::{Pid, ProcessRefreshKind, ProcessesToUpdate, System};

use super::{CpuSample, DeviceInfo, GIB};

pub struct CpuProbe {
    sys: System,
    pid: Pid,
    /// The first reading has no earlier one to take a difference from: its CPU figures are left out.
    primed: bool,
}

impl CpuProbe {
    pub fn new() -> Self {
        Self {
            sys: System::new(),
            pid: Pid::from_u32(std::process::id()),
            primed: false,
        }
    }

    pub fn device(&self) -> DeviceInfo {
        let mut sys = System::new();
        sys.refresh_cpu_all();
        let name = sys
            .cpus()
            .first()
            .map(|c| c.brand().trim().to_string())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "CPU".into());
        DeviceInfo {
            id: "cpu".into(),
            name: format!("{name} ({} logical cores)", sys.cpus().len()),
            uuid: None,
            unsupported: Vec::new(),
            unavailable: Vec::new(),
        }
    }

    pub fn sample(&mut self) -> CpuSample {
        self.sys.refresh_cpu_usage();
        self.sys.refresh_memory();
        self.sys.refresh_processes_specifics(
            ProcessesToUpdate::Some(&[self.pid]),
            false,
            ProcessRefreshKind::nothing().with_cpu().with_memory(),
        );
        let mut s = CpuSample {
            system_memory_used_gib: Some(self.sys.used_memory() as f64 / GIB),
            ..Default::default()
        };
        match self.sys.process(self.pid) {
            Some(p) => {
                s.process_rss_gib = Some(p.memory() as f64 / GIB);
                if self.primed {
                    s.process_cpu_cores = Some(f64::from(p.cpu_usage()).max(0.0) / 100.0);
                }
            }
            None => s
                .errors
                .push("sysinfo does not see this process; no process figures".into()),
        }
        if self.primed {
            s.system_cpu_percent = Some(f64::from(self.sys.global_cpu_usage()).clamp(0.0, 100.0));
        }
        self.primed = true;
        s
    }
}

impl Default for CpuProbe {
    fn default() -> Self {
        Self::new()
    }
}

/// Total system memory in GiB (for the summary).
pub fn system_memory_total_gib() -> f64 {
    let mut sys = System::new();
    sys.refresh_memory();
    sys.total_memory() as f64 / GIB
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The real probe while this thread keeps one core busy: plausible values, not exact ones
    /// (the machine is shared).
    #[test]
    fn the_cpu_probe_sees_this_process_working() {
        let mut p = CpuProbe::new();
        let first = p.sample();
        assert!(
            first.process_cpu_cores.is_none() && first.system_cpu_percent.is_none(),
            "no difference to take on the first reading"
        );
        let mut cores = Vec::new();
        let mut x = 0u64;
        for _ in 0..5 {
            let until = std::time::Instant::now() + std::time::Duration::from_millis(250);
            while std::time::Instant::now() < until {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            }
            let s = p.sample();
            assert!(s.errors.is_empty(), "{:?}", s.errors);
            let sys = s.system_cpu_percent.unwrap();
            assert!((0.0..=100.0).contains(&sys), "system cpu {sys}");
            assert!(sys > 0.0, "a busy core shows in the system figure");
            let rss = s.process_rss_gib.unwrap();
            assert!(rss > 0.0001 && rss < 64.0, "rss {rss} GiB");
            let used = s.system_memory_used_gib.unwrap();
            assert!(used > 0.0 && used <= system_memory_total_gib() * 1.01);
            cores.push(s.process_cpu_cores.unwrap());
        }
        std::hint::black_box(x);
        let mean = cores.iter().sum::<f64>() / cores.len() as f64;
        // One thread spinning: about one core; the test harness may run others beside it.
        assert!(mean > 0.4, "busy-looping thread: {cores:?} cores");
        assert!(mean < 64.0, "{cores:?}");
        assert!(p.device().name.contains("logical cores"));
    }
}
