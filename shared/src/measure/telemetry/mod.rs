//! Telemetry: what the machine did while it trained. A background thread samples the hardware at
//! a fixed interval for the whole run (NVIDIA GPUs through NVML, the Apple GPU through `ioreg` and
//! `powermetrics`, the CPU and memory through `sysinfo`), tags each sample with the phase the run
//! was in, appends it to `telemetry.jsonl` in the run folder, and keeps it for the summary
//! ([`aggregate::summarize`]).
//!
//! Cost and safety: the thread does a handful of driver queries per tick (no allocation beyond the
//! sample itself, subprocess probes rate-limited to one per second); it never touches the device
//! the backend computes on; a probe that fails records its error in the sample instead of ending
//! anything; a panic inside a tick is caught and recorded; stopping wakes the thread at once (a
//! channel, not a sleep). `--telemetry-interval-ms 0` starts nothing at all.

pub mod aggregate;
pub mod apple;
pub mod cpu;
pub mod nvidia;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// The raw series' file name inside a run folder.
pub const FILE: &str = "telemetry.jsonl";
/// The default sampling interval.
pub const DEFAULT_INTERVAL_MS: u64 = 200;
/// Below this the drivers' own readings (NVML utilization and power are averaged over 1/6 s to
/// 1 s) do not change between samples and the sampler only costs CPU time the run needs.
pub const MIN_INTERVAL_MS: u64 = 50;
/// Above this a steady phase of a few minutes would get too few samples for percentiles.
pub const MAX_INTERVAL_MS: u64 = 60_000;
/// How long `start` waits for the first sample, so the steady window is bracketed by samples;
/// never longer, so a slow driver cannot stall the run.
const FIRST_SAMPLE_WAIT: Duration = Duration::from_secs(5);

/// The phase of the run a sample fell in (`measuring.md`: load, warm-up, steady; `finish` is the
/// time after the last step while the summary is being made).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Load,
    Warmup,
    Steady,
    Finish,
}

impl Phase {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => Phase::Warmup,
            2 => Phase::Steady,
            3 => Phase::Finish,
            _ => Phase::Load,
        }
    }

    fn as_u8(self) -> u8 {
        match self {
            Phase::Load => 0,
            Phase::Warmup => 1,
            Phase::Steady => 2,
            Phase::Finish => 3,
        }
    }
}

/// When the run entered a phase, in seconds since the sampler started.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PhaseMark {
    pub phase: Phase,
    pub t_s: f64,
}

/// One line of `telemetry.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// Seconds since the sampler started (the run folder's creation).
    pub t_s: f64,
    pub phase: Phase,
    /// Optimizer steps completed when the sample was taken.
    pub steps_done: usize,
    /// Wall time the sampler spent taking this sample: its own cost, in milliseconds.
    pub cost_ms: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<CpuSample>,
    /// One entry per NVIDIA GPU NVML sees.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nvidia: Vec<NvidiaSample>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub apple_gpu: Option<AppleGpuSample>,
    /// Errors of this tick that belong to no device (a caught panic, a write failure).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
}

/// The host: CPU and memory (`sysinfo`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CpuSample {
    /// Utilisation of all logical cores together, 0-100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_cpu_percent: Option<f64>,
    /// This process's CPU time per wall second: 1.0 = one core busy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process_cpu_cores: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process_rss_gib: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_memory_used_gib: Option<f64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
}

/// One NVIDIA GPU (NVML). A field is absent when the GPU does not support the query (named once
/// in the summary) or when it failed (the error is in `errors`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NvidiaSample {
    /// NVML's index (PCI order; not necessarily CUDA's ordinal, see `aggregate::energy_devices`).
    pub index: u32,
    /// Percent of the last sample period in which a kernel ran (NVML's "GPU utilization").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub utilization_percent: Option<f64>,
    /// Percent of the last sample period in which device memory was read or written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_utilization_percent: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_used_gib: Option<f64>,
    /// Device memory held by this process (absent where NVML cannot see our pid, e.g. in some
    /// containers, or under Windows WDDM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process_memory_gib: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power_w: Option<f64>,
    /// The card's total-energy counter (Volta and newer), joules since the driver loaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub energy_counter_j: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sm_clock_mhz: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_clock_mhz: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature_c: Option<f64>,
    /// Active clock-throttle reasons (NVML names in snake case, e.g. `sw_power_cap`, `gpu_idle`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub throttle_reasons: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
}

/// The Apple GPU: `ioreg` (no root needed) and `powermetrics` (root only).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AppleGpuSample {
    /// IOAccelerator's `Device Utilization %`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub utilization_percent: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renderer_utilization_percent: Option<f64>,
    /// IOAccelerator's `In use system memory`: unified memory the GPU holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_used_gib: Option<f64>,
    /// `powermetrics` GPU power (root only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power_w: Option<f64>,
    /// `powermetrics` combined CPU + GPU + ANE power (root only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub package_power_w: Option<f64>,
    /// From `pmset -g therm`: `nominal`, or the warning level / CPU speed limit macOS applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thermal_state: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
}

/// A device the sampler found, named once rather than in every sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceInfo {
    /// `nvidia:<nvml index>`, `apple-gpu` or `cpu`.
    pub id: String,
    pub name: String,
    /// NVML's UUID (matches `CUDA_VISIBLE_DEVICES=GPU-...`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    /// Queries this device does not support (asked once, then skipped).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unsupported: Vec<String>,
    /// Why a figure of this device cannot be measured at all (e.g. Apple power without root).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unavailable: Vec<String>,
}

/// Everything a finished sampler hands back.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Recording {
    pub interval_ms: u64,
    pub samples: Vec<Sample>,
    pub marks: Vec<PhaseMark>,
    pub devices: Vec<DeviceInfo>,
    /// Why NVIDIA GPUs were not sampled (no NVML: the normal case on a CPU machine or a Mac).
    pub nvidia_unavailable: Option<String>,
    /// Problems of the sampler itself (file, thread), each once.
    pub errors: Vec<String>,
    /// `telemetry.jsonl`'s path, when it could be written.
    pub file: Option<PathBuf>,
}

/// What the runner and the sampler thread share: the phase (written by the runner, read each tick).
struct Shared {
    origin: Instant,
    phase: AtomicU8,
    steps_done: AtomicUsize,
    marks: Mutex<Vec<PhaseMark>>,
}

/// The running sampler. Dropping it stops the thread; [`Telemetry::finish`] also returns the
/// series.
pub struct Telemetry {
    shared: Arc<Shared>,
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<Recording>>,
    interval_ms: u64,
}

impl Telemetry {
    /// Starts sampling every `interval_ms` into `run_dir/telemetry.jsonl`; `None` when
    /// `interval_ms` is 0 (telemetry off: no thread, no driver, no file). Waits (at most a few
    /// seconds) for the first sample so the phases that follow are bracketed by samples.
    pub fn start(interval_ms: u64, run_dir: &Path) -> Option<Self> {
        Self::start_with(interval_ms, run_dir, probes_for_this_machine)
    }

    /// As [`Telemetry::start`], with the probes chosen by `make` (tests use fakes).
    pub fn start_with(
        interval_ms: u64,
        run_dir: &Path,
        make: fn() -> Box<dyn Probe>,
    ) -> Option<Self> {
        if interval_ms == 0 {
            return None;
        }
        let shared = Arc::new(Shared {
            origin: Instant::now(),
            phase: AtomicU8::new(Phase::Load.as_u8()),
            steps_done: AtomicUsize::new(0),
            marks: Mutex::new(vec![PhaseMark {
                phase: Phase::Load,
                t_s: 0.0,
            }]),
        });
        let (stop_tx, stop_rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::channel();
        let path = run_dir.join(FILE);
        let sh = shared.clone();
        let spawned = std::thread::Builder::new()
            .name("telemetry".into())
            .spawn(move || sampler_loop(sh, interval_ms, path, make, stop_rx, ready_tx));
        let thread = match spawned {
            Ok(t) => t,
            Err(e) => {
                eprintln!("warning: telemetry off: could not start its thread: {e}");
                return None;
            }
        };
        let _ = ready_rx.recv_timeout(FIRST_SAMPLE_WAIT);
        Some(Self {
            shared,
            stop: Some(stop_tx),
            thread: Some(thread),
            interval_ms,
        })
    }

    /// Tells the sampler which phase the run is in now (recorded with its time when it changes).
    /// Cheap: an atomic read, and a lock only on a change.
    pub fn set_phase(&self, phase: Phase) {
        let old = self.shared.phase.swap(phase.as_u8(), Ordering::SeqCst);
        if old != phase.as_u8() {
            let t_s = self.shared.origin.elapsed().as_secs_f64();
            if let Ok(mut m) = self.shared.marks.lock() {
                m.push(PhaseMark { phase, t_s });
            }
        }
    }

    /// Counts a completed optimizer step (samples carry the count).
    pub fn step_done(&self) {
        self.shared.steps_done.fetch_add(1, Ordering::SeqCst);
    }

    /// Stops the thread (it takes one last sample, so the run's end is bracketed) and returns
    /// the series.
    pub fn finish(mut self) -> Recording {
        self.stop_and_join()
    }

    fn stop_and_join(&mut self) -> Recording {
        drop(self.stop.take());
        let marks = self
            .shared
            .marks
            .lock()
            .map(|m| m.clone())
            .unwrap_or_default();
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(mut rec)) => {
                rec.marks = marks;
                rec
            }
            Some(Err(_)) => Recording {
                interval_ms: self.interval_ms,
                marks,
                errors: vec!["the telemetry thread panicked; no series".into()],
                ..Default::default()
            },
            None => Recording::default(),
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if self.thread.is_some() {
            let _ = self.stop_and_join();
        }
    }
}

/// What the sampler thread asks each tick. Implemented by the real probes ([`MachineProbes`])
/// and by fakes in tests.
pub trait Probe {
    /// The devices this probe reports on (called once, after the first sample).
    fn devices(&self) -> Vec<DeviceInfo>;
    /// Why NVIDIA GPUs are not sampled, if they are not.
    fn nvidia_unavailable(&self) -> Option<String> {
        None
    }
    /// Fills the device parts of `sample`.
    fn sample(&mut self, sample: &mut Sample);
}

/// The real probes of this machine: the CPU always, NVIDIA where NVML loads, the Apple GPU on
/// macOS.
pub struct MachineProbes {
    cpu: cpu::CpuProbe,
    nvidia: Result<nvidia::NvidiaProbe, String>,
    apple: Option<apple::AppleProbe>,
}

fn probes_for_this_machine() -> Box<dyn Probe> {
    Box::new(MachineProbes::new())
}

impl MachineProbes {
    pub fn new() -> Self {
        #[cfg(macos)]
        let apple = Some(apple::AppleProbe::new());
        #[cfg(not(macos))]
        let apple = None;
        Self {
            cpu: cpu::CpuProbe::new(),
            nvidia: nvidia::NvidiaProbe::new(),
            apple,
        }
    }
}

impl Default for MachineProbes {
    fn default() -> Self {
        Self::new()
    }
}

impl Probe for MachineProbes {
    fn devices(&self) -> Vec<DeviceInfo> {
        let mut d = vec![self.cpu.device()];
        if let Ok(n) = &self.nvidia {
            d.extend(n.devices());
        }
        if let Some(a) = &self.apple {
            d.push(a.device());
        }
        d
    }

    fn nvidia_unavailable(&self) -> Option<String> {
        self.nvidia.as_ref().err().cloned()
    }

    fn sample(&mut self, s: &mut Sample) {
        // NVML first: its energy counter is read closest to the sample's timestamp.
        if let Ok(n) = &mut self.nvidia {
            s.nvidia = n.sample();
        }
        s.cpu = Some(self.cpu.sample());
        if let Some(a) = &mut self.apple {
            s.apple_gpu = a.sample();
        }
    }
}

/// The sampler thread: a sample now, then one per interval until the stop channel closes, then a
/// last one.
fn sampler_loop(
    shared: Arc<Shared>,
    interval_ms: u64,
    path: PathBuf,
    make: fn() -> Box<dyn Probe>,
    stop: mpsc::Receiver<()>,
    ready: mpsc::Sender<()>,
) -> Recording {
    let interval = Duration::from_millis(interval_ms);
    let mut rec = Recording {
        interval_ms,
        ..Default::default()
    };
    let mut probe = match std::panic::catch_unwind(make) {
        Ok(p) => p,
        Err(_) => {
            rec.errors
                .push("building the telemetry probes panicked; no series".into());
            let _ = ready.send(());
            return rec;
        }
    };
    rec.nvidia_unavailable = probe.nvidia_unavailable();
    let mut file = match std::fs::File::create(&path) {
        Ok(f) => {
            rec.file = Some(path.clone());
            Some(std::io::BufWriter::new(f))
        }
        Err(e) => {
            rec.errors.push(format!(
                "cannot write {}: {e}; the series is kept in memory for the summary only",
                path.display()
            ));
            None
        }
    };
    let mut next = Instant::now();
    let mut last = false;
    loop {
        let mut s = take_sample(&shared, probe.as_mut());
        if let Some(w) = &mut file {
            // Flushed per line so an interrupted or crashed run keeps every sample taken.
            let ok = serde_json::to_writer(&mut *w, &s).is_ok()
                && w.write_all(b"\n").is_ok()
                && w.flush().is_ok();
            if !ok {
                let msg = format!(
                    "could not append to {}; later samples are not in it",
                    path.display()
                );
                s.errors.push(msg.clone());
                rec.errors.push(msg);
                file = None;
            }
        }
        rec.samples.push(s);
        if rec.samples.len() == 1 {
            rec.devices = probe.devices();
            let _ = ready.send(());
        }
        if last {
            return rec;
        }
        // Fixed rate: the next tick is one interval after the previous one was due; a late tick
        // (a slow driver) is not caught up with a burst.
        next += interval;
        let now = Instant::now();
        if next < now {
            next = now + interval;
        }
        match stop.recv_timeout(next - now) {
            Err(RecvTimeoutError::Timeout) => {}
            // Stop (or the handle is gone): one last sample so the run's end is bracketed.
            Ok(()) | Err(RecvTimeoutError::Disconnected) => last = true,
        }
    }
}

fn take_sample(shared: &Shared, probe: &mut dyn Probe) -> Sample {
    let t0 = Instant::now();
    let mut s = Sample {
        t_s: shared.origin.elapsed().as_secs_f64(),
        phase: Phase::from_u8(shared.phase.load(Ordering::SeqCst)),
        steps_done: shared.steps_done.load(Ordering::SeqCst),
        cost_ms: 0.0,
        cpu: None,
        nvidia: Vec::new(),
        apple_gpu: None,
        errors: Vec::new(),
    };
    let mut filled = s.clone();
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| probe.sample(&mut filled))) {
        Ok(()) => s = filled,
        Err(p) => {
            let what = crate::error::panic_message(&*p).unwrap_or_else(|| "unknown panic".into());
            s.errors.push(format!("a probe panicked: {what}"));
        }
    }
    s.cost_ms = t0.elapsed().as_secs_f64() * 1e3;
    s
}

/// Reads a run folder's `telemetry.jsonl` (reports and tests). A torn last line (a run killed
/// mid-write) is skipped; any other bad line is an error naming it.
pub fn read_series(path: &Path) -> anyhow::Result<Vec<Sample>> {
    use anyhow::Context;
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let mut out = Vec::with_capacity(lines.len());
    for (i, l) in lines.iter().enumerate() {
        match serde_json::from_str(l) {
            Ok(s) => out.push(s),
            Err(_) if i + 1 == lines.len() && !text.ends_with('\n') => {}
            Err(e) => anyhow::bail!("{}: line {}: {e}", path.display(), i + 1),
        }
    }
    Ok(out)
}

pub(crate) const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

#[cfg(test)]
mod tests {
    use super::*;

    struct Fake {
        n: u32,
    }

    impl Probe for Fake {
        fn devices(&self) -> Vec<DeviceInfo> {
            vec![DeviceInfo {
                id: "nvidia:0".into(),
                name: "fake".into(),
                uuid: None,
                unsupported: vec![],
                unavailable: vec![],
            }]
        }
        fn sample(&mut self, s: &mut Sample) {
            self.n += 1;
            if self.n == 2 {
                panic!("probe broke");
            }
            s.nvidia = vec![NvidiaSample {
                index: 0,
                power_w: Some(100.0),
                ..Default::default()
            }];
        }
    }

    fn fake() -> Box<dyn Probe> {
        Box::new(Fake { n: 0 })
    }

    #[test]
    fn zero_interval_starts_nothing() {
        let d = tempfile::tempdir().unwrap();
        assert!(Telemetry::start_with(0, d.path(), fake).is_none());
        assert!(!d.path().join(FILE).exists(), "no file when off");
    }

    #[test]
    fn phases_are_tagged_a_panicking_probe_is_recorded_and_stop_is_prompt() {
        let d = tempfile::tempdir().unwrap();
        let t = Telemetry::start_with(20, d.path(), fake).unwrap();
        // Past the tick that panics (printing its backtrace can take a while) before the phases.
        let lines = || {
            std::fs::read_to_string(d.path().join(FILE))
                .map(|s| s.lines().count())
                .unwrap_or(0)
        };
        let until = Instant::now() + Duration::from_secs(10);
        while lines() < 3 && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(70));
        t.set_phase(Phase::Warmup);
        t.step_done();
        std::thread::sleep(Duration::from_millis(70));
        t.set_phase(Phase::Steady);
        std::thread::sleep(Duration::from_millis(70));
        t.set_phase(Phase::Finish);
        let t_stop = Instant::now();
        let rec = t.finish();
        assert!(
            t_stop.elapsed() < Duration::from_millis(500),
            "stop took {:?}",
            t_stop.elapsed()
        );
        let phases: Vec<Phase> = rec.marks.iter().map(|m| m.phase).collect();
        assert_eq!(
            phases,
            [Phase::Load, Phase::Warmup, Phase::Steady, Phase::Finish]
        );
        assert!(rec.samples.len() >= 6, "{} samples", rec.samples.len());
        // Samples are in time order and each carries the phase in force at its time.
        for w in rec.samples.windows(2) {
            assert!(w[0].t_s <= w[1].t_s);
        }
        for s in &rec.samples {
            let in_force = rec
                .marks
                .iter()
                .rev()
                .find(|m| m.t_s <= s.t_s)
                .map(|m| m.phase)
                .unwrap();
            // The phase is read a moment before t_s is final only within the same tick.
            assert!(
                s.phase == in_force
                    || rec
                        .marks
                        .iter()
                        .any(|m| (m.t_s - s.t_s).abs() < 0.005 && m.phase == s.phase),
                "sample at {} tagged {:?}, marks {:?}",
                s.t_s,
                s.phase,
                rec.marks
            );
        }
        assert!(rec.samples.iter().any(|s| s.phase == Phase::Steady));
        assert!(rec.samples.iter().any(|s| s.steps_done == 1));
        // The second tick panicked: recorded, and sampling went on.
        assert!(rec.samples[1].errors[0].contains("probe broke"));
        assert!(rec.samples[1].nvidia.is_empty());
        assert!(rec.samples[2].nvidia[0].power_w == Some(100.0));
        // The file holds the same series.
        let back = read_series(&d.path().join(FILE)).unwrap();
        assert_eq!(back.len(), rec.samples.len());
        for (a, b) in back.iter().zip(&rec.samples) {
            assert_eq!(
                (a.phase, a.steps_done, &a.nvidia),
                (b.phase, b.steps_done, &b.nvidia)
            );
            assert!((a.t_s - b.t_s).abs() < 1e-12);
        }
    }

    #[test]
    fn a_torn_last_line_is_skipped_but_a_bad_middle_line_is_named() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join(FILE);
        let good = r#"{"t_s":0.0,"phase":"load","steps_done":0,"cost_ms":0.1}"#;
        std::fs::write(&p, format!("{good}\n{good}\n{{\"t_s\":1")).unwrap();
        assert_eq!(read_series(&p).unwrap().len(), 2);
        std::fs::write(&p, format!("{good}\nnot json\n{good}\n")).unwrap();
        let e = read_series(&p).unwrap_err().to_string();
        assert!(e.contains("line 2"), "{e}");
    }
}
