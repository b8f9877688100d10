//! From a recorded series to the summary's `metrics.telemetry`: a pure function, so it is tested
//! on series built by hand.
//!
//! Energy: each device gets a cumulative energy curve E(t) at its sample times, from the card's
//! total-energy counter where every sample has it (counter minus its first reading), otherwise
//! the trapezoidal integral of sampled power. The energy of a window [a, b] is E(b) - E(a), with E
//! interpolated linearly between samples, so a window that starts or ends between two samples is
//! measured, not rounded to a sample. The sampler takes a sample before the run's first phase
//! and one after its last, so the steady window is always bracketed.

use std::collections::BTreeMap;

use super::{DeviceInfo, Phase, PhaseMark, Recording, FILE};
use crate::measure::stats::percentile_sorted;
use crate::summary::{DeviceTelemetry, EnergyJ, Percentiles, SamplerCost, Telemetry};

/// What the summary knows that the series does not.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    pub steady_loss_tokens: usize,
    pub steady_input_tokens: usize,
    /// The backend's device: `cuda:0`, `mps`, `gpu`, `cpu` (`unknown` when it was not built).
    pub backend_device: &'a str,
    /// `CUDA_VISIBLE_DEVICES` as this process saw it (CUDA ordinals then name other GPUs than
    /// NVML's indices).
    pub cuda_visible_devices: Option<&'a str>,
    /// Data parallel on one host: every rank's GPU (NVML indices or UUIDs, comma-separated);
    /// the run's energy is theirs together.
    pub job_gpus: Option<&'a str>,
}

/// One device's reading at one sample, whatever the device.
#[derive(Debug, Clone, Default)]
struct Point<'a> {
    t: f64,
    phase: Option<Phase>,
    util: Option<f64>,
    mem_used: Option<f64>,
    proc_mem: Option<f64>,
    power: Option<f64>,
    counter: Option<f64>,
    sm_clock: Option<f64>,
    temp: Option<f64>,
    throttle: &'a [String],
    thermal: Option<&'a str>,
    cpu_cores: Option<f64>,
    rss: Option<f64>,
    sys_mem: Option<f64>,
    errors: &'a [String],
}

/// Readings out of their physical range (a driver glitch) are dropped here rather than allowed
/// to make the summary fail its validation and cost the run its result.
fn sane(p: Point) -> Point {
    let pct = |v: Option<f64>| v.filter(|x| x.is_finite()).map(|x| x.clamp(0.0, 100.0));
    let nonneg = |v: Option<f64>| v.filter(|x| x.is_finite() && *x >= 0.0);
    Point {
        util: pct(p.util),
        power: nonneg(p.power),
        counter: nonneg(p.counter),
        mem_used: nonneg(p.mem_used),
        proc_mem: nonneg(p.proc_mem),
        sm_clock: nonneg(p.sm_clock),
        cpu_cores: nonneg(p.cpu_cores),
        rss: nonneg(p.rss),
        sys_mem: nonneg(p.sys_mem),
        temp: p.temp.filter(|x| x.is_finite()),
        ..p
    }
}

fn points<'a>(rec: &'a Recording, id: &str) -> Vec<Point<'a>> {
    let nv_index: Option<u32> = id.strip_prefix("nvidia:").and_then(|i| i.parse().ok());
    rec.samples
        .iter()
        .filter_map(|s| {
            let base = Point {
                t: s.t_s,
                phase: Some(s.phase),
                ..Default::default()
            };
            if id == "cpu" {
                let c = s.cpu.as_ref()?;
                Some(Point {
                    util: c.system_cpu_percent,
                    cpu_cores: c.process_cpu_cores,
                    rss: c.process_rss_gib,
                    sys_mem: c.system_memory_used_gib,
                    errors: &c.errors,
                    ..base
                })
            } else if id == "apple-gpu" {
                let a = s.apple_gpu.as_ref()?;
                Some(Point {
                    util: a.utilization_percent,
                    mem_used: a.memory_used_gib,
                    power: a.power_w,
                    thermal: a.thermal_state.as_deref(),
                    errors: &a.errors,
                    ..base
                })
            } else {
                let g = s.nvidia.iter().find(|g| Some(g.index) == nv_index)?;
                Some(Point {
                    util: g.utilization_percent,
                    mem_used: g.memory_used_gib,
                    proc_mem: g.process_memory_gib,
                    power: g.power_w,
                    counter: g.energy_counter_j,
                    sm_clock: g.sm_clock_mhz,
                    temp: g.temperature_c,
                    throttle: &g.throttle_reasons,
                    errors: &g.errors,
                    ..base
                })
            }
        })
        .map(sane)
        .collect()
}

/// The steady window from the phase marks: the steady mark to the next mark (or `end`).
pub fn steady_window(marks: &[PhaseMark], end: f64) -> Option<(f64, f64)> {
    let i = marks.iter().position(|m| m.phase == Phase::Steady)?;
    let start = marks[i].t_s;
    let stop = marks.get(i + 1).map_or(end, |m| m.t_s);
    (stop >= start).then_some((start, stop))
}

/// Mean, p50 and p95 (numpy's linear interpolation) of `v`; `None` when empty.
pub fn percentiles(v: &[f64]) -> Option<Percentiles> {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return None;
    }
    s.sort_by(f64::total_cmp);
    Some(Percentiles {
        mean: s.iter().sum::<f64>() / s.len() as f64,
        p50: percentile_sorted(&s, 0.5),
        p95: percentile_sorted(&s, 0.95),
        n: s.len(),
    })
}

/// A cumulative energy curve: (t, joules since the first point), non-decreasing in t.
#[derive(Debug, Clone, PartialEq)]
pub struct EnergyCurve {
    pub points: Vec<(f64, f64)>,
    pub source: String,
}

/// From the counter when at least two samples have it and it never runs backwards (a driver
/// reload resets it); else by integrating power (trapezoids). `None` without two readings.
pub fn energy_curve(
    t: &[f64],
    counter: &[Option<f64>],
    power: &[Option<f64>],
) -> Option<EnergyCurve> {
    let c: Vec<(f64, f64)> = t
        .iter()
        .zip(counter)
        .filter_map(|(&t, c)| c.map(|c| (t, c)))
        .collect();
    if c.len() >= 2 && c.windows(2).all(|w| w[1].1 >= w[0].1) {
        let c0 = c[0].1;
        return Some(EnergyCurve {
            points: c.into_iter().map(|(t, e)| (t, e - c0)).collect(),
            source: "nvml total-energy counter".into(),
        });
    }
    let p: Vec<(f64, f64)> = t
        .iter()
        .zip(power)
        .filter_map(|(&t, p)| p.map(|p| (t, p)))
        .collect();
    if p.len() < 2 {
        return None;
    }
    let mut e = 0.0;
    let mut points = vec![(p[0].0, 0.0)];
    for w in p.windows(2) {
        e += 0.5 * (w[0].1 + w[1].1) * (w[1].0 - w[0].0);
        points.push((w[1].0, e));
    }
    Some(EnergyCurve {
        points,
        source: "integral of sampled power".into(),
    })
}

impl EnergyCurve {
    /// E(t) by linear interpolation; `None` outside the sampled span.
    pub fn at(&self, t: f64) -> Option<f64> {
        let p = &self.points;
        let (first, last) = (p.first()?, p.last()?);
        const EPS: f64 = 1e-9;
        if t < first.0 - EPS || t > last.0 + EPS {
            return None;
        }
        let i = p.partition_point(|q| q.0 < t);
        if i == 0 {
            return Some(first.1);
        }
        if i >= p.len() {
            return Some(last.1);
        }
        let (a, b) = (p[i - 1], p[i]);
        if b.0 <= a.0 {
            return Some(b.1);
        }
        Some(a.1 + (b.1 - a.1) * (t - a.0) / (b.0 - a.0))
    }

    /// Energy between `a` and `b`; `None` unless samples bracket the window.
    pub fn between(&self, a: f64, b: f64) -> Option<f64> {
        Some(self.at(b)? - self.at(a)?)
    }

    pub fn total(&self) -> f64 {
        self.points.last().map_or(0.0, |l| l.1)
    }
}

/// Why the energy of the steady window `[a, b]` cannot be measured from `curve` though it exists,
/// or `None` when it can. A window that holds fewer than two readings is shorter than one sampling
/// interval: its energy would be an interpolation between readings taken outside it. A counter that
/// did not advance across the window updates more slowly than the window lasted (NVML's counter
/// on a 1 s run gave 0 J): its difference is 0 J, not the energy used.
fn too_short_to_measure(curve: &EnergyCurve, a: f64, b: f64, interval_ms: u64) -> Option<String> {
    const EPS: f64 = 1e-9;
    let inside = curve
        .points
        .iter()
        .filter(|(t, _)| *t >= a - EPS && *t <= b + EPS)
        .count();
    let secs = b - a;
    if inside < 2 {
        return Some(format!(
            "the steady window ({secs:.2} s) holds {inside} energy reading(s) (one every {interval_ms} ms): too short to measure its energy; run more steady steps"
        ));
    }
    if curve.source.contains("counter") && curve.between(a, b).is_some_and(|e| e <= 0.0) {
        return Some(format!(
            "the energy counter did not advance during the steady window ({secs:.2} s): it updates more slowly than that; run more steady steps"
        ));
    }
    None
}

/// The NVML device a `CUDA_VISIBLE_DEVICES` entry names: an index, or a (prefix of a) UUID.
fn nvml_device(entry: &str, nvidia: &[&DeviceInfo]) -> Option<String> {
    let e = entry.trim();
    nvidia
        .iter()
        .find(|d| match e.parse::<u32>() {
            Ok(i) => d.id == format!("nvidia:{i}"),
            Err(_) => d
                .uuid
                .as_deref()
                .is_some_and(|u| !e.is_empty() && u.starts_with(e)),
        })
        .map(|d| d.id.clone())
}

/// Which devices' energy counts, and how they were chosen.
fn energy_devices(rec: &Recording, cx: &Context, all: &[Vec<Point>]) -> (Vec<String>, String) {
    let dev = cx.backend_device;
    let nvidia: Vec<&DeviceInfo> = rec
        .devices
        .iter()
        .filter(|d| d.id.starts_with("nvidia:"))
        .collect();
    if let (true, Some(list)) = (dev.starts_with("cuda"), cx.job_gpus) {
        let ids: Vec<String> = list
            .split(',')
            .filter_map(|e| nvml_device(e, &nvidia))
            .collect();
        if !ids.is_empty() {
            let n = ids.len();
            return (
                ids,
                format!("the GPUs of the {n} data-parallel ranks on this host"),
            );
        }
    }
    if dev.starts_with("cuda") {
        // Where NVML lists this process: the surest sign of the GPU the run used.
        let mine: Vec<String> = rec
            .devices
            .iter()
            .zip(all)
            .filter(|(d, p)| {
                d.id.starts_with("nvidia:") && p.iter().any(|p| p.proc_mem.is_some_and(|m| m > 0.0))
            })
            .map(|(d, _)| d.id.clone())
            .collect();
        if !mine.is_empty() {
            return (mine, "the GPUs where NVML lists this process".into());
        }
        let ordinal: usize = dev
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        let by_ordinal = match cx.cuda_visible_devices.map(str::trim) {
            Some(v) if !v.is_empty() => v
                .split(',')
                .nth(ordinal)
                .and_then(|e| nvml_device(e, &nvidia)),
            _ => nvml_device(&ordinal.to_string(), &nvidia),
        };
        if let Some(id) = by_ordinal {
            return (
                vec![id],
                format!("{dev} mapped through CUDA_VISIBLE_DEVICES to NVML's index"),
            );
        }
        if !nvidia.is_empty() {
            return (
                nvidia.iter().map(|d| d.id.clone()).collect(),
                format!("{dev} could not be matched to one GPU, so every GPU NVML sees counts"),
            );
        }
        let why = rec
            .nvidia_unavailable
            .clone()
            .unwrap_or_else(|| "NVML sees no GPU".into());
        return (Vec::new(), format!("a CUDA run, but {why}"));
    }
    if matches!(dev, "gpu" | "mps") {
        if rec.devices.iter().any(|d| d.id == "apple-gpu") {
            return (vec!["apple-gpu".into()], "the Apple GPU".into());
        }
        return (
            Vec::new(),
            format!("the run computed on {dev}, which has no power reading here"),
        );
    }
    if dev == "cpu" {
        return (
            Vec::new(),
            "a CPU run: CPU energy is not read (RAPL needs root and is not portable)".into(),
        );
    }
    (
        Vec::new(),
        format!("the backend's device ({dev}) is not known to have a power reading"),
    )
}

/// Distinct messages with their counts, most frequent first, at most `max`.
fn distinct<'a>(msgs: impl Iterator<Item = &'a String>, max: usize) -> Vec<String> {
    let mut c: BTreeMap<&str, usize> = BTreeMap::new();
    for m in msgs {
        *c.entry(m.as_str()).or_default() += 1;
    }
    let mut v: Vec<(&str, usize)> = c.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    v.into_iter()
        .take(max)
        .map(|(m, n)| {
            if n > 1 {
                format!("{m} (x{n})")
            } else {
                m.to_string()
            }
        })
        .collect()
}

fn max_of(v: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    v.flatten()
        .filter(|x| x.is_finite())
        .fold(None, |m, x| Some(m.map_or(x, |m: f64| m.max(x))))
}

fn mean_of(v: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    let v: Vec<f64> = v.flatten().filter(|x| x.is_finite()).collect();
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// The summary's `metrics.telemetry` and the notes a reader needs (why a figure is null).
pub fn summarize(rec: &Recording, cx: &Context) -> (Telemetry, Vec<String>) {
    let mut notes = Vec::new();
    let end = rec.samples.last().map_or(0.0, |s| s.t_s);
    let window = steady_window(&rec.marks, end);
    let in_window = |p: &Point| match window {
        Some((a, b)) => p.phase == Some(Phase::Steady) && p.t >= a && p.t <= b + 1e-9,
        None => false,
    };
    let all: Vec<Vec<Point>> = rec.devices.iter().map(|d| points(rec, &d.id)).collect();
    let (counted, how) = energy_devices(rec, cx, &all);
    let mut devices = Vec::new();
    let mut device_null = Vec::new();
    // Devices whose steady energy is null though they have an energy curve, and why.
    let mut steady_null = Vec::new();
    let mut energies: Vec<(String, Option<EnergyJ>)> = Vec::new();
    for (info, pts) in rec.devices.iter().zip(&all) {
        let steady: Vec<&Point> = pts.iter().filter(|p| in_window(p)).collect();
        let t: Vec<f64> = pts.iter().map(|p| p.t).collect();
        let counter: Vec<Option<f64>> = pts.iter().map(|p| p.counter).collect();
        let power: Vec<Option<f64>> = pts.iter().map(|p| p.power).collect();
        let curve = energy_curve(&t, &counter, &power);
        let energy = curve.as_ref().map(|c| EnergyJ {
            steady: window.and_then(|(a, b)| {
                match too_short_to_measure(c, a, b, rec.interval_ms) {
                    Some(why) => {
                        steady_null.push((info.id.clone(), why));
                        None
                    }
                    None => c.between(a, b),
                }
            }),
            total: Some(c.total()),
        });
        let is_gpu = info.id != "cpu";
        let power_w_mean = match (energy.and_then(|e| e.steady), window) {
            (Some(e), Some((a, b))) if b > a => Some(e / (b - a)),
            _ => None,
        };
        let util: Vec<f64> = steady.iter().filter_map(|p| p.util).collect();
        let mut unavailable: Vec<String> = info
            .unsupported
            .iter()
            .map(|q| format!("{q}: not supported by this device"))
            .collect();
        unavailable.extend(info.unavailable.iter().cloned());
        if is_gpu && curve.is_none() {
            device_null.push((
                info.id.clone(),
                if info.unavailable.is_empty() {
                    "no energy counter and fewer than two power readings".to_string()
                } else {
                    info.unavailable.join("; ")
                },
            ));
        }
        let (throttled, reasons, thermal) = if info.id.starts_with("nvidia:") {
            let mut r: Vec<String> = steady
                .iter()
                .flat_map(|p| p.throttle.iter())
                .filter(|r| super::nvidia::SLOWDOWN_REASONS.contains(&r.as_str()))
                .cloned()
                .collect();
            r.sort();
            r.dedup();
            let known = !info.unsupported.iter().any(|q| q == "throttle_reasons");
            (known.then_some(!r.is_empty()), r, None)
        } else if info.id == "apple-gpu" {
            let states: Vec<&str> = steady.iter().filter_map(|p| p.thermal).collect();
            let worst = states.iter().find(|s| **s != "nominal").or(states.first());
            let hot: Vec<String> = states
                .iter()
                .filter(|s| **s != "nominal")
                .map(|s| format!("thermal: {s}"))
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            (
                (!states.is_empty()).then_some(!hot.is_empty()),
                hot,
                worst.map(|s| s.to_string()),
            )
        } else {
            (None, Vec::new(), None)
        };
        let cpu = info.id == "cpu";
        if let Some(e) = energy {
            energies.push((info.id.clone(), Some(e)));
        }
        devices.push(DeviceTelemetry {
            id: info.id.clone(),
            name: info.name.clone(),
            counted_in_energy: counted.contains(&info.id),
            utilization_percent: percentiles(&util),
            power_w_mean,
            power_w_peak: max_of(steady.iter().map(|p| p.power)),
            energy_j: energy,
            energy_source: curve.as_ref().map(|c| c.source.clone()),
            sm_clock_mhz_mean: mean_of(steady.iter().map(|p| p.sm_clock)),
            temperature_c_peak: max_of(pts.iter().map(|p| p.temp)),
            memory_used_gib_peak: max_of(pts.iter().map(|p| p.mem_used)),
            process_memory_gib_peak: max_of(pts.iter().map(|p| p.proc_mem)),
            throttled,
            throttle_reasons: reasons,
            thermal_state: thermal,
            process_cpu_cores: if cpu {
                percentiles(
                    &steady
                        .iter()
                        .filter_map(|p| p.cpu_cores)
                        .collect::<Vec<_>>(),
                )
            } else {
                None
            },
            process_rss_gib_peak: max_of(pts.iter().map(|p| p.rss)),
            system_memory_used_gib_peak: max_of(pts.iter().map(|p| p.sys_mem)),
            unavailable,
            errors: distinct(pts.iter().flat_map(|p| p.errors.iter()), 10),
        });
    }

    // Energy of the devices that count: the sum, or null with the reason.
    let mut why_null: Option<String> = None;
    let energy_j = if counted.is_empty() {
        why_null = Some(how.clone());
        None
    } else {
        let mut steady = Some(0.0);
        let mut total = Some(0.0);
        for id in &counted {
            match energies.iter().find(|(d, _)| d == id).and_then(|(_, e)| *e) {
                Some(e) => {
                    if e.steady.is_none() {
                        if let Some((_, why)) = steady_null.iter().find(|(d, _)| d == id) {
                            why_null = Some(format!("{id}: {why}"));
                        }
                    }
                    steady = steady.zip(e.steady).map(|(a, b)| a + b);
                    total = total.zip(e.total).map(|(a, b)| a + b);
                }
                None => {
                    let reason = device_null
                        .iter()
                        .find(|(d, _)| d == id)
                        .map_or("no energy reading".to_string(), |(_, r)| r.clone());
                    why_null = Some(format!("{id}: {reason}"));
                    steady = None;
                    total = None;
                }
            }
        }
        if why_null.is_none() && steady.is_none() {
            why_null = Some(match window {
                None => "no steady step completed, so there is no steady window".into(),
                Some(_) => "the steady window is not bracketed by samples".into(),
            });
        }
        (steady.is_some() || total.is_some()).then_some(EnergyJ { steady, total })
    };
    let steady_e = energy_j.and_then(|e| e.steady);
    let per_1k = |tokens: usize| {
        steady_e
            .filter(|_| tokens > 0)
            .map(|e| e / tokens as f64 * 1000.0)
    };
    let joules_per_1k_tokens = per_1k(cx.steady_loss_tokens);
    if joules_per_1k_tokens.is_none() {
        let why = why_null.clone().unwrap_or_else(|| {
            if cx.steady_loss_tokens == 0 {
                "no steady loss tokens".into()
            } else {
                "no steady energy".into()
            }
        });
        notes.push(format!("joules_per_1k_tokens: null: {why}"));
    } else {
        notes.push(format!(
            "telemetry: energy from {} ({how})",
            counted.join(", ")
        ));
    }
    let costs: Vec<f64> = rec.samples.iter().map(|s| s.cost_ms).collect();
    let mut errors = rec.errors.clone();
    errors.extend(distinct(
        rec.samples.iter().flat_map(|s| s.errors.iter()),
        10,
    ));
    let telemetry = Telemetry {
        interval_ms: rec.interval_ms,
        file: rec.file.as_ref().map(|_| FILE.to_string()),
        samples: rec.samples.len(),
        steady_samples: rec
            .samples
            .iter()
            .filter(|s| {
                s.phase == Phase::Steady
                    && window.is_some_and(|(a, b)| s.t_s >= a && s.t_s <= b + 1e-9)
            })
            .count(),
        steady_start_s: window.map(|w| w.0),
        steady_end_s: window.map(|w| w.1),
        energy_devices: counted,
        energy_j,
        joules_per_1k_tokens,
        joules_per_1k_input_tokens: per_1k(cx.steady_input_tokens),
        throttled: devices.iter().any(|d| d.throttled == Some(true)),
        devices,
        sampler_cost_ms: (!costs.is_empty()).then(|| SamplerCost {
            mean: costs.iter().sum::<f64>() / costs.len() as f64,
            max: costs.iter().copied().fold(0.0, f64::max),
        }),
        errors,
    };
    (telemetry, notes)
}

#[cfg(test)]
mod tests {
    use super::super::{CpuSample, NvidiaSample, Sample};
    use super::*;

    fn mark(phase: Phase, t_s: f64) -> PhaseMark {
        PhaseMark { phase, t_s }
    }

    fn gpu_info(i: u32) -> DeviceInfo {
        DeviceInfo {
            id: format!("nvidia:{i}"),
            name: "H200".into(),
            uuid: Some(format!("GPU-{i}abc")),
            unsupported: vec![],
            unavailable: vec![],
        }
    }

    fn phase_at(marks: &[PhaseMark], t: f64) -> Phase {
        marks.iter().rev().find(|m| m.t_s <= t).unwrap().phase
    }

    /// A recorded series: one sample per second from t = 0 to 10, marks load 0, warmup 2,
    /// steady 3.5, finish 8.5. GPU 0 draws 100 W + 10 W per second elapsed (power rising
    /// linearly, so trapezoids are exact), with a counter that matches, utilization = 10 * t.
    fn series(with_counter: bool, with_power: bool) -> Recording {
        let marks = vec![
            mark(Phase::Load, 0.0),
            mark(Phase::Warmup, 2.0),
            mark(Phase::Steady, 3.5),
            mark(Phase::Finish, 8.5),
        ];
        // E(t) = 100 t + 5 t^2 (the integral of 100 + 10 t), offset by the counter's start.
        let energy = |t: f64| 5000.0 + 100.0 * t + 5.0 * t * t;
        let samples = (0..=10)
            .map(|k| {
                let t = k as f64;
                Sample {
                    t_s: t,
                    phase: phase_at(&marks, t),
                    steps_done: k,
                    cost_ms: 0.5 + 0.1 * t,
                    cpu: Some(CpuSample {
                        system_cpu_percent: Some(50.0),
                        process_cpu_cores: Some(1.0 + t / 10.0),
                        process_rss_gib: Some(1.0 + t),
                        system_memory_used_gib: Some(8.0),
                        errors: vec![],
                    }),
                    nvidia: vec![NvidiaSample {
                        index: 0,
                        utilization_percent: Some(10.0 * t),
                        memory_used_gib: Some(20.0),
                        process_memory_gib: Some(18.0),
                        power_w: with_power.then_some(100.0 + 10.0 * t),
                        energy_counter_j: with_counter.then(|| energy(t)),
                        temperature_c: Some(40.0 + t),
                        throttle_reasons: if k == 5 {
                            vec!["sw_power_cap".into(), "gpu_idle".into()]
                        } else if k == 9 {
                            // In the finish phase: not part of the steady verdict.
                            vec!["hw_thermal_slowdown".into()]
                        } else {
                            vec![]
                        },
                        ..Default::default()
                    }],
                    apple_gpu: None,
                    errors: vec![],
                }
            })
            .collect();
        Recording {
            interval_ms: 1000,
            samples,
            marks,
            devices: vec![
                DeviceInfo {
                    id: "cpu".into(),
                    name: "cpu".into(),
                    uuid: None,
                    unsupported: vec![],
                    unavailable: vec![],
                },
                gpu_info(0),
            ],
            nvidia_unavailable: None,
            errors: vec![],
            file: Some("x/telemetry.jsonl".into()),
        }
    }

    fn cx(device: &str) -> Context<'_> {
        Context {
            steady_loss_tokens: 2_000,
            steady_input_tokens: 4_000,
            backend_device: device,
            cuda_visible_devices: None,
            job_gpus: None,
        }
    }

    const STEADY_J: f64 = (100.0 * 8.5 + 5.0 * 8.5 * 8.5) - (100.0 * 3.5 + 5.0 * 3.5 * 3.5);

    #[test]
    fn energy_by_counter_difference_interpolates_at_the_window_edges() {
        let (t, notes) = summarize(&series(true, false), &cx("cuda:0"));
        let g = &t.devices[1];
        assert_eq!(
            g.energy_source.as_deref(),
            Some("nvml total-energy counter")
        );
        // Between samples the counter is interpolated linearly: at 3.5 the curve's chord lies a
        // little above the parabola (5 * 0.25 J at each edge: 5 t^2 is convex).
        let e = g.energy_j.unwrap();
        let chord = |t: f64| {
            let (a, b) = (t.floor(), t.ceil());
            let f = |x: f64| 100.0 * x + 5.0 * x * x;
            f(a) + (f(b) - f(a)) * (t - a)
        };
        let expect = chord(8.5) - chord(3.5);
        assert!(
            (e.steady.unwrap() - expect).abs() < 1e-9,
            "{e:?} vs {expect}"
        );
        assert!(
            (expect - STEADY_J).abs() < 1e-9,
            "equal chords at both ends cancel"
        );
        assert!((e.total.unwrap() - (1000.0 + 500.0)).abs() < 1e-9);
        assert_eq!(t.energy_devices, ["nvidia:0"]);
        assert_eq!(t.energy_j, Some(e));
        let j = t.joules_per_1k_tokens.unwrap();
        assert!((j - expect / 2_000.0 * 1000.0).abs() < 1e-9);
        assert!((t.joules_per_1k_input_tokens.unwrap() - expect / 4.0).abs() < 1e-9);
        assert!((g.power_w_mean.unwrap() - expect / 5.0).abs() < 1e-9);
        assert!(
            notes.iter().any(|n| n.contains("energy from nvidia:0")),
            "{notes:?}"
        );
    }

    #[test]
    fn energy_by_integrating_power_when_there_is_no_counter() {
        let (t, notes) = summarize(&series(false, true), &cx("cuda:0"));
        let g = &t.devices[1];
        assert_eq!(
            g.energy_source.as_deref(),
            Some("integral of sampled power")
        );
        let e = g.energy_j.unwrap();
        // Power rises linearly, so trapezoids integrate it exactly; the window edges fall
        // mid-interval where the cumulative curve is interpolated linearly (the same chord error
        // at both edges, which cancels).
        assert!((e.steady.unwrap() - STEADY_J).abs() < 1e-9, "{e:?}");
        assert!((e.total.unwrap() - 1500.0).abs() < 1e-9);
        assert!(t.joules_per_1k_tokens.is_some(), "{notes:?}");
        // Peak power over steady samples (t = 4..8): 180 W.
        assert_eq!(g.power_w_peak, Some(180.0));
    }

    #[test]
    fn no_energy_reading_gives_null_with_the_reason() {
        let (t, notes) = summarize(&series(false, false), &cx("cuda:0"));
        assert_eq!(t.energy_j, None);
        assert_eq!(t.joules_per_1k_tokens, None);
        let n = notes
            .iter()
            .find(|n| n.starts_with("joules_per_1k_tokens: null:"))
            .unwrap();
        assert!(
            n.contains("nvidia:0") && n.contains("no energy counter"),
            "{n}"
        );
        // A CPU run never counts the GPU's energy, even where one is present.
        let (t, notes) = summarize(&series(true, true), &cx("cpu"));
        assert_eq!(t.joules_per_1k_tokens, None);
        assert!(t.energy_devices.is_empty());
        assert!(
            t.devices[1].energy_j.is_some(),
            "the GPU's own figures stay"
        );
        assert!(notes.iter().any(|n| n.contains("a CPU run")), "{notes:?}");
    }

    #[test]
    fn phase_tagging_percentiles_and_throttling_use_the_steady_samples_only() {
        let rec = series(true, true);
        let (t, _) = summarize(&rec, &cx("cuda:0"));
        // Steady window 3.5..8.5: samples at t = 4, 5, 6, 7, 8.
        assert_eq!((t.steady_start_s, t.steady_end_s), (Some(3.5), Some(8.5)));
        assert_eq!(t.steady_samples, 5);
        assert_eq!(t.samples, 11);
        let u = t.devices[1].utilization_percent.unwrap();
        // numpy: mean [40..80] = 60, p50 = 60, p95 = 78.
        assert_eq!(u.n, 5);
        assert!((u.mean - 60.0).abs() < 1e-9 && (u.p50 - 60.0).abs() < 1e-9);
        assert!((u.p95 - 78.0).abs() < 1e-9, "{u:?}");
        // Throttling: the power cap at t = 5 counts, gpu_idle is not a slowdown, the thermal
        // slowdown at t = 9 fell after the steady window.
        assert_eq!(t.devices[1].throttled, Some(true));
        assert_eq!(t.devices[1].throttle_reasons, ["sw_power_cap"]);
        assert!(t.throttled);
        // Peaks cover the whole run.
        assert_eq!(t.devices[1].temperature_c_peak, Some(50.0));
        assert_eq!(t.devices[0].process_rss_gib_peak, Some(11.0));
        let c = t.devices[0].process_cpu_cores.unwrap();
        assert!((c.mean - 1.6).abs() < 1e-9, "{c:?}");
        let cost = t.sampler_cost_ms.unwrap();
        assert!((cost.max - 1.5).abs() < 1e-9 && (cost.mean - 1.0).abs() < 1e-9);
        // A sample tagged steady but outside the window (a race at the edge) does not count.
        let mut r2 = rec.clone();
        r2.samples[9].phase = Phase::Steady;
        assert_eq!(summarize(&r2, &cx("cuda:0")).0.steady_samples, 5);
        // A driver glitch (utilization 250 %, negative power) is clamped or dropped, not passed on.
        let mut r3 = rec.clone();
        r3.samples[8].nvidia[0].utilization_percent = Some(250.0);
        r3.samples[8].nvidia[0].power_w = Some(-5.0);
        let (t3, _) = summarize(&r3, &cx("cuda:0"));
        let u3 = t3.devices[1].utilization_percent.unwrap();
        assert!(
            (u3.p95 - 94.0).abs() < 1e-9,
            "70 + 0.8 x (100 - 70), not 214: {u3:?}"
        );
        assert_eq!(
            t3.devices[1].power_w_peak,
            Some(170.0),
            "the 180 W at t = 8 is gone"
        );
    }

    #[test]
    fn without_a_steady_phase_steady_figures_are_null_and_say_why() {
        let mut rec = series(true, true);
        rec.marks.retain(|m| m.phase != Phase::Steady);
        for s in &mut rec.samples {
            if s.phase == Phase::Steady {
                s.phase = Phase::Warmup;
            }
        }
        let (t, notes) = summarize(&rec, &cx("cuda:0"));
        assert_eq!(t.steady_samples, 0);
        assert_eq!(t.devices[1].utilization_percent, None);
        assert_eq!(t.energy_j.unwrap().steady, None);
        assert!((t.energy_j.unwrap().total.unwrap() - 1500.0).abs() < 1e-9);
        assert!(
            notes.iter().any(|n| n.contains("no steady step completed")),
            "{notes:?}"
        );
    }

    /// A steady window too short for the energy readings gives null energy with the reason, never
    /// 0 J (a 1 s tiny run on the H200 reported 0.0 J per 1k tokens).
    #[test]
    fn a_steady_window_too_short_for_the_energy_readings_is_null_not_zero() {
        // 0.3 s of steady work between two samples a second apart: no reading inside.
        let mut rec = series(true, true);
        rec.marks[2].t_s = 4.2;
        rec.marks[3].t_s = 4.5;
        for s in &mut rec.samples {
            s.phase = phase_at(&rec.marks, s.t_s);
        }
        let (t, notes) = summarize(&rec, &cx("cuda:0"));
        assert_eq!(t.devices[1].energy_j.unwrap().steady, None);
        assert!(
            t.devices[1].energy_j.unwrap().total.is_some(),
            "the run's total stays"
        );
        assert_eq!(t.joules_per_1k_tokens, None);
        let n = notes
            .iter()
            .find(|n| n.starts_with("joules_per_1k_tokens: null:"))
            .unwrap();
        assert!(n.contains("nvidia:0") && n.contains("too short"), "{n}");
        // A counter that stood still over a window with readings in it (it updates more slowly
        // than the window lasted): 0 J is not the energy used.
        let mut rec = series(true, false);
        for s in &mut rec.samples {
            if (3.0..=9.0).contains(&s.t_s) {
                s.nvidia[0].energy_counter_j = Some(5000.0 + 100.0 * 3.0 + 45.0);
            }
        }
        let (t, notes) = summarize(&rec, &cx("cuda:0"));
        assert_eq!(t.joules_per_1k_tokens, None);
        assert_ne!(t.energy_j.and_then(|e| e.steady), Some(0.0));
        let n = notes
            .iter()
            .find(|n| n.starts_with("joules_per_1k_tokens: null:"))
            .unwrap();
        assert!(n.contains("did not advance"), "{n}");
    }

    #[test]
    fn the_gpu_that_counts_follows_the_process_then_cuda_visible_devices() {
        let mut rec = series(true, true);
        rec.devices.push(gpu_info(1));
        rec.devices.push(gpu_info(2));
        for s in &mut rec.samples {
            let mut g1 = s.nvidia[0].clone();
            g1.index = 1;
            g1.process_memory_gib = None;
            let mut g2 = g1.clone();
            g2.index = 2;
            s.nvidia.push(g1);
            s.nvidia.push(g2);
        }
        // NVML lists this process on GPU 0.
        assert_eq!(
            summarize(&rec, &cx("cuda:0")).0.energy_devices,
            ["nvidia:0"]
        );
        // Not visible (a container): cuda:1 with CUDA_VISIBLE_DEVICES=2,1 is NVML's 1; by UUID too.
        for s in &mut rec.samples {
            s.nvidia[0].process_memory_gib = None;
        }
        let mut c = cx("cuda:1");
        c.cuda_visible_devices = Some("2,1");
        assert_eq!(summarize(&rec, &c).0.energy_devices, ["nvidia:1"]);
        c.cuda_visible_devices = Some("GPU-2abc");
        c.backend_device = "cuda:0";
        let (t, _) = summarize(&rec, &c);
        assert_eq!(t.energy_devices, ["nvidia:2"]);
        assert!(t.devices[3].counted_in_energy && !t.devices[1].counted_in_energy);
        // Unset: CUDA's ordinal is NVML's index.
        assert_eq!(
            summarize(&rec, &cx("cuda:1")).0.energy_devices,
            ["nvidia:1"]
        );
        // Data parallel: every rank's GPU counts, whatever this process's own GPU is.
        let mut c = cx("cuda:0");
        c.job_gpus = Some("0,2");
        let (t, notes) = summarize(&rec, &c);
        assert_eq!(t.energy_devices, ["nvidia:0", "nvidia:2"]);
        assert!(
            notes.iter().any(|n| n.contains("2 data-parallel ranks")),
            "{notes:?}"
        );
        let one = summarize(&rec, &cx("cuda:0"))
            .0
            .energy_j
            .unwrap()
            .total
            .unwrap();
        let two = t.energy_j.unwrap().total.unwrap();
        assert!((two - 2.0 * one).abs() < 1e-6 * one, "{one} x 2 != {two}");
    }

    #[test]
    fn a_counter_that_runs_backwards_falls_back_to_power() {
        let t = [0.0, 1.0, 2.0];
        let c = energy_curve(
            &t,
            &[Some(10.0), Some(5.0), Some(20.0)],
            &[Some(100.0), Some(100.0), Some(100.0)],
        )
        .unwrap();
        assert_eq!(c.source, "integral of sampled power");
        assert_eq!(c.total(), 200.0);
        assert_eq!(c.between(0.5, 1.5), Some(100.0));
        assert_eq!(c.between(-1.0, 1.0), None, "outside the samples");
        assert_eq!(energy_curve(&t, &[None; 3], &[Some(1.0), None, None]), None);
    }
}
