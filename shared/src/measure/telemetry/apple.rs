//! The Apple GPU on macOS, without root: utilisation and GPU-held memory from the IORegistry
//! (`ioreg -r -c IOAccelerator`, the `PerformanceStatistics` dictionary Activity Monitor reads),
//! the thermal state from `pmset -g therm`. Power only with root: one long-lived `powermetrics`
//! process streams GPU and package power, read by a thread; without root power and energy are
//! null and the summary says why.
//!
//! Cost: `ioreg` and `pmset` are subprocesses (a few milliseconds each), so they run at most once
//! per second and once per ten seconds whatever the sampling interval; between them the Apple
//! GPU has no sample. The parsers are plain functions over text and compile on every platform so
//! the tests run anywhere; only [`AppleProbe`]'s use is limited to macOS (in `MachineProbes`).
//! Not yet run on Apple hardware: the parsers follow the output formats of macOS 13-15.

#![cfg_attr(not(macos), allow(dead_code))]

use std::io::{BufRead, Read};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{AppleGpuSample, DeviceInfo, GIB};

const IOREG_PERIOD: Duration = Duration::from_secs(1);
const PMSET_PERIOD: Duration = Duration::from_secs(10);

/// What `ioreg` says about the GPU.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct IoregGpu {
    pub model: Option<String>,
    pub device_utilization_percent: Option<f64>,
    pub renderer_utilization_percent: Option<f64>,
    pub tiler_utilization_percent: Option<f64>,
    pub in_use_system_memory_bytes: Option<f64>,
}

/// Parses `ioreg -r -c IOAccelerator -d 1 -w 0` output: the first accelerator that has a
/// `PerformanceStatistics` dictionary.
pub fn parse_ioreg(text: &str) -> Option<IoregGpu> {
    let key = "\"PerformanceStatistics\" = {";
    let start = text.find(key)? + key.len();
    // The dictionary ends at its matching brace (values can be nested dictionaries or arrays).
    let mut depth = 1usize;
    let mut end = None;
    let mut in_str = false;
    for (i, c) in text[start..].char_indices() {
        match c {
            '"' => in_str = !in_str,
            '{' | '(' if !in_str => depth += 1,
            '}' | ')' if !in_str => {
                depth -= 1;
                if depth == 0 {
                    end = Some(start + i);
                    break;
                }
            }
            _ => {}
        }
    }
    let body = &text[start..end?];
    let mut g = IoregGpu::default();
    for (k, v) in split_entries(body) {
        let num = v.trim().parse::<f64>().ok();
        match k.as_str() {
            "Device Utilization %" => g.device_utilization_percent = num,
            "Renderer Utilization %" => g.renderer_utilization_percent = num,
            "Tiler Utilization %" => g.tiler_utilization_percent = num,
            "In use system memory" => g.in_use_system_memory_bytes = num,
            _ => {}
        }
    }
    // `"model" = "Apple M2 Max"` in the same object's properties.
    g.model = text.lines().find_map(|l| {
        let rest = l.trim().strip_prefix("\"model\" = ")?;
        let s = rest.trim().trim_matches('"');
        (!s.is_empty()).then(|| s.to_string())
    });
    Some(g)
}

/// `"a"=1,"b"={..},"c"=3` -> [("a", "1"), ("b", "{..}"), ("c", "3")], splitting at top-level commas.
fn split_entries(body: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut depth = 0usize;
    let mut in_str = false;
    let mut cur = String::new();
    let mut push = |cur: &mut String| {
        if let Some((k, v)) = cur.split_once('=') {
            let k = k.trim().trim_matches('"').to_string();
            out.push((k, v.trim().to_string()));
        }
        cur.clear();
    };
    for c in body.chars() {
        match c {
            '"' => in_str = !in_str,
            '{' | '(' if !in_str => depth += 1,
            '}' | ')' if !in_str => depth = depth.saturating_sub(1),
            ',' if !in_str && depth == 0 => {
                push(&mut cur);
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    push(&mut cur);
    out
}

/// Parses `pmset -g therm`: `nominal`, or what macOS is limiting (warning levels, CPU speed limit).
pub fn parse_pmset_therm(text: &str) -> String {
    let mut parts = Vec::new();
    let number_in = |l: &str| -> Option<f64> {
        l.split(|c: char| !(c.is_ascii_digit() || c == '.'))
            .filter(|t| !t.is_empty() && t.chars().any(|c| c.is_ascii_digit()))
            .filter_map(|t| t.parse::<f64>().ok())
            .next_back()
    };
    for l in text.lines() {
        let low = l.to_ascii_lowercase();
        if low.contains("no ") && low.contains("has been recorded") {
            continue;
        }
        if low.contains("thermal warning level") {
            if let Some(n) = number_in(l).filter(|&n| n > 0.0) {
                parts.push(format!("thermal warning level {n}"));
            }
        } else if low.contains("performance warning level") {
            if let Some(n) = number_in(l).filter(|&n| n > 0.0) {
                parts.push(format!("performance warning level {n}"));
            }
        } else if low.contains("cpu_speed_limit") {
            if let Some(n) = number_in(l).filter(|&n| n < 100.0) {
                parts.push(format!("CPU speed limit {n} %"));
            }
        }
    }
    if parts.is_empty() {
        "nominal".into()
    } else {
        parts.join(", ")
    }
}

/// Which figure a `powermetrics` line carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerField {
    Gpu,
    Package,
}

/// Parses one `powermetrics` text line: `GPU Power: 1234 mW`, `Combined Power (CPU + GPU + ANE):
/// 4321 mW` (older releases: `Package Power: ...`). Returns watts.
pub fn parse_power_line(line: &str) -> Option<(PowerField, f64)> {
    let l = line.trim();
    let (field, rest) = if let Some(r) = l.strip_prefix("GPU Power:") {
        (PowerField::Gpu, r)
    } else if l.starts_with("Combined Power") || l.starts_with("Package Power") {
        (PowerField::Package, l.split_once(':')?.1)
    } else {
        return None;
    };
    let mut it = rest.split_whitespace();
    let v: f64 = it.next()?.parse().ok()?;
    let w = match it.next() {
        Some("mW") => v / 1000.0,
        Some("W") => v,
        _ => return None,
    };
    Some((field, w))
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PowerLatest {
    pub gpu_w: Option<f64>,
    pub package_w: Option<f64>,
}

/// A long-lived power-reporting process whose lines a thread parses; the latest values are read
/// without waiting. Killed when dropped.
pub struct PowerReader {
    child: Child,
    latest: Arc<Mutex<PowerLatest>>,
}

impl PowerReader {
    pub fn spawn(program: &str, args: &[String]) -> Result<Self, String> {
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {program}: {e}"))?;
        let out = child
            .stdout
            .take()
            .ok_or_else(|| format!("{program}: no stdout"))?;
        let latest = Arc::new(Mutex::new(PowerLatest::default()));
        let l = latest.clone();
        std::thread::Builder::new()
            .name("telemetry-power".into())
            .spawn(move || {
                for line in std::io::BufReader::new(out).lines() {
                    let Ok(line) = line else { break };
                    if let Some((f, w)) = parse_power_line(&line) {
                        if let Ok(mut p) = l.lock() {
                            match f {
                                PowerField::Gpu => p.gpu_w = Some(w),
                                PowerField::Package => p.package_w = Some(w),
                            }
                        }
                    }
                }
            })
            .map_err(|e| format!("cannot start the power reader thread: {e}"))?;
        Ok(Self { child, latest })
    }

    pub fn latest(&self) -> PowerLatest {
        self.latest.lock().map(|p| *p).unwrap_or_default()
    }

    /// `Some(reason)` once the process has ended (it should run until dropped).
    pub fn ended(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => {
                let mut err = String::new();
                if let Some(mut e) = self.child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                Some(format!(
                    "the power reader ended ({status}): {}",
                    err.lines().next().unwrap_or("").trim()
                ))
            }
            Ok(None) => None,
            Err(e) => Some(format!("the power reader: {e}")),
        }
    }
}

impl Drop for PowerReader {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run(program: &str, args: &[&str]) -> Result<String, String> {
    let o = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if !o.status.success() {
        return Err(format!("{program} {}: {}", args.join(" "), o.status));
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

fn is_root() -> bool {
    run("id", &["-u"]).is_ok_and(|s| s.trim() == "0")
}

pub struct AppleProbe {
    last_ioreg: Option<Instant>,
    last_pmset: Option<Instant>,
    thermal_state: Option<String>,
    model: Option<String>,
    power: Option<PowerReader>,
    power_unavailable: Option<String>,
}

impl AppleProbe {
    pub fn new() -> Self {
        let (power, power_unavailable) = if is_root() {
            // One sample per second: powermetrics averages over its interval.
            let args: Vec<String> = ["--samplers", "gpu_power,cpu_power", "-i", "1000"]
                .iter()
                .map(|s| s.to_string())
                .collect();
            match PowerReader::spawn("powermetrics", &args) {
                Ok(p) => (Some(p), None),
                Err(e) => (None, Some(format!("powermetrics could not start: {e}"))),
            }
        } else {
            (
                None,
                Some("powermetrics needs root: run the benchmark with sudo to measure Apple GPU power and energy".into()),
            )
        };
        let model = run(
            "ioreg",
            &["-r", "-c", "IOAccelerator", "-d", "1", "-w", "0"],
        )
        .ok()
        .and_then(|t| parse_ioreg(&t))
        .and_then(|g| g.model);
        Self {
            last_ioreg: None,
            last_pmset: None,
            thermal_state: None,
            model,
            power,
            power_unavailable,
        }
    }

    pub fn device(&self) -> DeviceInfo {
        DeviceInfo {
            id: "apple-gpu".into(),
            name: self.model.clone().unwrap_or_else(|| "Apple GPU".into()),
            uuid: None,
            unsupported: Vec::new(),
            unavailable: self.power_unavailable.iter().cloned().collect(),
        }
    }

    /// A sample at most once per second (the subprocess costs a few milliseconds); `None` between.
    pub fn sample(&mut self) -> Option<AppleGpuSample> {
        let now = Instant::now();
        if self.last_ioreg.is_some_and(|t| now - t < IOREG_PERIOD) {
            return None;
        }
        self.last_ioreg = Some(now);
        let mut s = AppleGpuSample::default();
        match run(
            "ioreg",
            &["-r", "-c", "IOAccelerator", "-d", "1", "-w", "0"],
        ) {
            Ok(text) => match parse_ioreg(&text) {
                Some(g) => {
                    s.utilization_percent = g.device_utilization_percent;
                    s.renderer_utilization_percent = g.renderer_utilization_percent;
                    s.memory_used_gib = g.in_use_system_memory_bytes.map(|b| b / GIB);
                }
                None => s
                    .errors
                    .push("ioreg: no IOAccelerator with PerformanceStatistics".into()),
            },
            Err(e) => s.errors.push(e),
        }
        if self.last_pmset.is_none_or(|t| now - t >= PMSET_PERIOD) {
            self.last_pmset = Some(now);
            match run("pmset", &["-g", "therm"]) {
                Ok(t) => self.thermal_state = Some(parse_pmset_therm(&t)),
                Err(e) => s.errors.push(e),
            }
        }
        s.thermal_state = self.thermal_state.clone();
        if let Some(p) = &mut self.power {
            if let Some(why) = p.ended() {
                self.power_unavailable = Some(why.clone());
                s.errors.push(why);
                self.power = None;
            } else {
                let l = p.latest();
                s.power_w = l.gpu_w;
                s.package_power_w = l.package_w;
            }
        }
        Some(s)
    }
}

impl Default for AppleProbe {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Shaped like `ioreg -r -c IOAccelerator -d 1 -w 0` on an M-series Mac (macOS 14).
    const IOREG: &str = r#"+-o AGXAcceleratorG14X  <class AGXAcceleratorG14X, id 0x1000003c9, registered, matched, active, busy 0 (1 ms), retain 110>
    {
      "IOClass" = "AGXAcceleratorG14X"
      "PerformanceStatistics" = {"In use system memory (driver)"=0,"Alloc system memory"=24461983744,"Tiler Utilization %"=14,"recoveryCount"=0,"lastRecoveryTime"=0,"Split Scene Count"=0,"Renderer Utilization %"=62,"TiledSceneBytes"=2490368,"Device Utilization %"=64,"SplitSceneCount"=0,"Allocated PB Size"=150994944,"In use system memory"=9126805504}
      "AGXParameterBufferMaxSizeNeverShrink" = 0
      "model" = "Apple M2 Max"
      "gpu-core-count" = 38
      "IOGLBundleName" = "AppleMetalOpenGLRenderer"
    }
"#;

    #[test]
    fn ioreg_performance_statistics_are_read() {
        let g = parse_ioreg(IOREG).expect("a GPU");
        assert_eq!(g.device_utilization_percent, Some(64.0));
        assert_eq!(g.renderer_utilization_percent, Some(62.0));
        assert_eq!(g.tiler_utilization_percent, Some(14.0));
        // "In use system memory (driver)" is a different key and must not be taken for it.
        assert_eq!(g.in_use_system_memory_bytes, Some(9_126_805_504.0));
        assert_eq!(g.model.as_deref(), Some("Apple M2 Max"));
        // Nested values do not end the dictionary early.
        let nested = IOREG.replace(
            "\"Tiler Utilization %\"=14,",
            "\"Tiler Utilization %\"=14,\"x\"={\"a\"=1,\"b\"=(1,2)},",
        );
        assert_eq!(
            parse_ioreg(&nested).unwrap().device_utilization_percent,
            Some(64.0)
        );
        assert_eq!(parse_ioreg("+-o IOService\n{\n}\n"), None);
    }

    #[test]
    fn pmset_thermal_state() {
        let calm = "Note: No thermal warning level has been recorded\nNote: No performance warning level has been recorded\nNote: No CPU power status has been recorded\n";
        assert_eq!(parse_pmset_therm(calm), "nominal");
        let full_speed = "2026-11-28 10:00:00 +0000 CPU Power notify\n\tCPU_Scheduler_Limit \t= 100\n\tCPU_Available_CPUs \t= 12\n\tCPU_Speed_Limit \t= 100\n";
        assert_eq!(parse_pmset_therm(full_speed), "nominal");
        let hot = "Thermal warning level set to 2.\n2026-11-28 CPU Power notify\n\tCPU_Speed_Limit \t= 72\n";
        assert_eq!(
            parse_pmset_therm(hot),
            "thermal warning level 2, CPU speed limit 72 %"
        );
    }

    #[test]
    fn powermetrics_lines() {
        assert_eq!(
            parse_power_line("GPU Power: 1234 mW"),
            Some((PowerField::Gpu, 1.234))
        );
        assert_eq!(
            parse_power_line("Combined Power (CPU + GPU + ANE): 4321 mW"),
            Some((PowerField::Package, 4.321))
        );
        assert_eq!(parse_power_line("GPU HW active residency:  45.1%"), None);
        assert_eq!(parse_power_line("CPU Power: 900 mW"), None);
    }

    /// The reader thread and the process handling, with `sh` standing in for `powermetrics`.
    #[test]
    fn the_power_reader_streams_the_latest_values_and_notices_an_exit() {
        let script =
            "echo 'GPU Power: 1500 mW'; echo 'Combined Power (CPU + GPU + ANE): 4200 mW'; sleep 5";
        let mut r = PowerReader::spawn("sh", &["-c".into(), script.into()]).unwrap();
        let until = Instant::now() + Duration::from_secs(3);
        while r.latest().package_w.is_none() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(
            r.latest(),
            PowerLatest {
                gpu_w: Some(1.5),
                package_w: Some(4.2)
            }
        );
        assert_eq!(r.ended(), None);
        let t = Instant::now();
        drop(r);
        assert!(t.elapsed() < Duration::from_secs(2), "dropping kills it");

        let mut r = PowerReader::spawn(
            "sh",
            &["-c".into(), "echo 'must be root' >&2; exit 1".into()],
        )
        .unwrap();
        let until = Instant::now() + Duration::from_secs(3);
        let mut why = None;
        while why.is_none() && Instant::now() < until {
            why = r.ended();
            std::thread::sleep(Duration::from_millis(10));
        }
        let why = why.expect("the exit is noticed");
        assert!(why.contains("must be root"), "{why}");
    }
}
