//! End-to-end tests of the `compare` binary: real summaries in, `report.md` and `report.html` out.
//!
//! The fixture is the summary and steps log of a real tiny run
//! (`windows_pytorch_benchmark --preset tiny --device cpu`, 7 steps); the tests derive variants by
//! editing its figures, so every number they check is computed here from the summaries' own values.
//! The browser test needs Debian's `chromium`; it is skipped (with the reason printed) where that is
//! missing, except under `CI`, where it fails.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const COMPARE: &str = env!("CARGO_BIN_EXE_compare");
const SUMMARY: &str = include_str!("fixtures/tiny_cpu_summary.json");
const STEPS: &str = include_str!("fixtures/tiny_cpu_steps.jsonl");

fn fixture() -> Value {
    serde_json::from_str(SUMMARY).expect("the fixture is valid JSON")
}

/// Writes `dir/name/benchmark_summary.json` (and the steps log when given); returns the folder.
fn write_run(dir: &Path, name: &str, summary: &Value, steps: Option<&str>) -> PathBuf {
    let run = dir.join(name);
    std::fs::create_dir_all(&run).unwrap();
    std::fs::write(
        run.join("benchmark_summary.json"),
        serde_json::to_string_pretty(summary).unwrap(),
    )
    .unwrap();
    if let Some(s) = steps {
        std::fs::write(run.join("steps.jsonl"), s).unwrap();
    }
    run
}

fn compare<P: AsRef<std::ffi::OsStr>>(args: &[P], extra: &[&str], cwd: &Path) -> Output {
    Command::new(COMPARE)
        .args(args)
        .args(extra)
        .current_dir(cwd)
        .output()
        .expect("running compare")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn f(v: &Value, pointer: &str) -> f64 {
    v.pointer(pointer)
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("{pointer} is not a number"))
}

/// Scales every throughput figure by `k` and every time by `1/k`: the same run, `k` times faster.
fn faster(s: &mut Value, k: f64) {
    let m = s["metrics"].as_object_mut().unwrap();
    for key in [
        "tokens_per_s",
        "input_tokens_per_s",
        "samples_per_s",
        "end_to_end_tokens_per_s",
        "end_to_end_input_tokens_per_s",
        "end_to_end_samples_per_s",
        "model_tflops_per_s",
    ] {
        m[key] = json!(m[key].as_f64().unwrap() * k);
    }
    for key in ["total_s", "steady_s", "warmup_s", "time_to_first_step_s"] {
        m[key] = json!(m[key].as_f64().unwrap() / k);
    }
    for v in m["step_time_s"].as_object_mut().unwrap().values_mut() {
        if v.is_f64() {
            *v = json!(v.as_f64().unwrap() / k);
        }
    }
}

/// The three runs most tests use: the fixture (a run folder with its steps log), an "MLX" run 1.5x
/// faster on the same workload (a bare summary file), and a run with another batch plan.
struct Runs {
    _dir: tempfile::TempDir,
    out: PathBuf,
    a: PathBuf,
    b: PathBuf,
    c: PathBuf,
    sa: Value,
    sb: Value,
    sc: Value,
}

fn three_runs() -> Runs {
    let dir = tempfile::tempdir().unwrap();
    let sa = fixture();
    let a = write_run(dir.path(), "run-a", &sa, Some(STEPS));

    let mut sb = fixture();
    faster(&mut sb, 1.5);
    sb["run"]["run_id"] = json!("20261128T000000Z-mlx-1");
    sb["backend"]["framework"] = json!("mlx");
    sb["metrics"]["telemetry"] = json!({ "joules_per_1k_tokens": 12.5 });
    let b_dir = write_run(dir.path(), "run-b", &sb, None);
    let b = b_dir.join("benchmark_summary.json");

    let mut sc = fixture();
    faster(&mut sc, 0.8);
    sc["run"]["run_id"] = json!("20261128T000000Z-pytorch-packed");
    sc["workload"]["config"]["batch"]["plan"] = json!("packed");
    sc["workload"]["hash"] = json!("c".repeat(64));
    let c = write_run(dir.path(), "run-c", &sc, None);

    let out = dir.path().join("report");
    Runs {
        out,
        a,
        b,
        c,
        sa,
        sb,
        sc,
        _dir: dir,
    }
}

/// Every inline `<svg>...</svg>` of a document.
fn inline_svgs(html: &str) -> Vec<&str> {
    let mut found = Vec::new();
    let mut at = 0;
    while let Some(start) = html[at..].find("<svg").map(|i| i + at) {
        let end = html[start..]
            .find("</svg>")
            .map(|i| start + i + "</svg>".len())
            .expect("every <svg> is closed");
        found.push(&html[start..end]);
        at = end;
    }
    found
}

#[test]
fn report_has_every_run_the_speed_ups_the_workload_check_and_well_formed_svg() {
    let r = three_runs();
    let t0 = Instant::now();
    let out = compare(
        &[&r.a, &r.b, &r.c],
        &["--output-dir", r.out.to_str().unwrap()],
        r.out.parent().unwrap(),
    );
    eprintln!("compare took {:?}", t0.elapsed());
    assert!(
        out.status.success(),
        "compare failed: {}",
        text(&out.stderr)
    );
    let stdout = text(&out.stdout);
    let (md_path, html_path) = (r.out.join("report.md"), r.out.join("report.html"));
    assert!(
        stdout.contains(md_path.to_str().unwrap()) && stdout.contains(html_path.to_str().unwrap()),
        "the two paths are printed: {stdout}"
    );
    let md = std::fs::read_to_string(&md_path).unwrap();
    let html = std::fs::read_to_string(&html_path).unwrap();

    for (name, doc) in [("report.md", &md), ("report.html", &html)] {
        for s in [&r.sa, &r.sb, &r.sc] {
            let id = s["run"]["run_id"].as_str().unwrap();
            assert!(doc.contains(id), "{name} names run {id}");
        }
        // Speed-ups against the baseline (the first argument), from the summaries' own numbers.
        let tps = |s: &Value| f(s, "/metrics/tokens_per_s");
        for s in [&r.sb, &r.sc] {
            let ratio = format!("{:.2}×", tps(s) / tps(&r.sa));
            assert!(doc.contains(&ratio), "{name} shows the speed-up {ratio}");
        }
        let total = |s: &Value| f(s, "/metrics/total_s");
        let ratio = format!("{:.2}×", total(&r.sa) / total(&r.sb));
        assert!(
            doc.contains(&ratio),
            "{name} shows the end-to-end speed-up {ratio}"
        );
        // The run with another batch plan is flagged, with the field that differs.
        assert!(
            doc.contains("Workload mismatch"),
            "{name} flags the mismatch"
        );
        assert!(
            doc.contains("workload.config.batch.plan: bucketed vs packed"),
            "{name} names the differing field"
        );
        // Energy where a (newer) summary carries it; "not measured" elsewhere.
        assert!(
            doc.contains("12.5 J") && doc.contains("not measured"),
            "{name} shows energy per 1k tokens"
        );
        // A null figure shows "n/a" with the reason from the notes.
        assert!(
            doc.contains("n/a") && doc.contains("no cited peak for device"),
            "{name} explains the null MFU"
        );
    }
    // Run b has the baseline's workload: it must not be listed as a mismatch.
    assert!(
        !md.contains("**#2 mlx cpu** (hash"),
        "the same workload is not flagged:\n{md}"
    );
    // Step times of run a come from its steps.jsonl, run b's from the summary's spread.
    assert!(md.contains("#1 pytorch cpu: 6 steady steps from"), "{md}");
    assert!(
        md.contains("#2 mlx cpu: the summary's step_time_s spread"),
        "{md}"
    );

    let svgs = inline_svgs(&html);
    assert_eq!(
        svgs.len(),
        4,
        "throughput, loss, step time and memory plots"
    );
    for svg in svgs {
        let doc = roxmltree::Document::parse(svg)
            .unwrap_or_else(|e| panic!("malformed SVG ({e}):\n{svg}"));
        assert_eq!(doc.root_element().tag_name().name(), "svg");
        let title = doc
            .root_element()
            .children()
            .find(|n| n.has_tag_name("title"))
            .expect("each plot carries its definition as a <title>");
        assert!(title.text().is_some_and(|t| t.len() > 20));
    }
}

#[test]
fn baseline_picks_the_run_to_divide_by() {
    let r = three_runs();
    let out = compare(
        &[&r.a, &r.b],
        &["--baseline", "2", "--output-dir", r.out.to_str().unwrap()],
        r.out.parent().unwrap(),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let md = std::fs::read_to_string(r.out.join("report.md")).unwrap();
    let ratio = format!(
        "{:.2}×",
        f(&r.sa, "/metrics/tokens_per_s") / f(&r.sb, "/metrics/tokens_per_s")
    );
    assert!(
        md.contains(&ratio),
        "run a against baseline b is {ratio}:\n{md}"
    );
    assert!(md.contains("#2 mlx cpu (baseline)"));

    let out = compare(
        &[&r.a, &r.b],
        &["--baseline", "3", "--output-dir", r.out.to_str().unwrap()],
        r.out.parent().unwrap(),
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("--baseline 3"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn identical_configs_with_different_hashes_mean_different_batches() {
    let dir = tempfile::tempdir().unwrap();
    let a = write_run(dir.path(), "a", &fixture(), None);
    let mut s = fixture();
    s["workload"]["hash"] = json!("d".repeat(64));
    let b = write_run(dir.path(), "b", &s, None);
    let out = compare(&[&a, &b], &["--output-dir", "out"], dir.path());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let md = std::fs::read_to_string(dir.path().join("out/report.md")).unwrap();
    assert!(md.contains("batches' contents differ"), "{md}");
}

#[test]
fn repeats_show_their_spread() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = fixture();
    let figures = |k: usize, tps: f64| {
        json!({"repeat": k, "run_dir": format!("runs/x/repeat-{k}"), "status": "completed", "tokens_per_s": tps, "input_tokens_per_s": null,
               "samples_per_s": null, "total_s": 10.0, "step_time_median_s": null, "mfu": null, "peak_memory_gib": null, "final_loss": null})
    };
    s["repeats"] = json!({
        "count": 3, "median_repeat": 2,
        "runs": [figures(1, 400.0), figures(2, 500.0), figures(3, 600.0)],
        "tokens_per_s": {"median": 500.0, "p10": 420.0, "p90": 580.0, "mean": 500.0, "stdev": 100.0, "min": 400.0, "max": 600.0, "n": 3},
        "input_tokens_per_s": null, "total_s": null
    });
    let a = write_run(dir.path(), "a", &s, None);
    let out = compare(&[&a], &[], dir.path());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let md = std::fs::read_to_string(dir.path().join("report.md")).unwrap();
    assert!(
        md.contains("median 500.0, p10-p90 420.0-580.0, min-max 400.0-600.0"),
        "{md}"
    );
    assert!(
        dir.path().join("report.html").is_file(),
        "the default output folder is the current one"
    );
}

/// Writes an invalid summary named `name` and returns its path.
fn invalid(dir: &Path, name: &str, content: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, content).unwrap();
    p
}

#[test]
fn unreadable_summaries_are_refused_naming_the_file_unless_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let good = write_run(dir.path(), "good", &fixture(), Some(STEPS));
    let mut v99 = fixture();
    v99["schema_version"] = json!(99);
    let mut no_key = fixture();
    no_key["metrics"].as_object_mut().unwrap().remove("total_s");
    let cases = [
        (
            invalid(dir.path(), "corrupt.json", "{ \"schema_version\": 1, "),
            "not valid JSON",
        ),
        (
            invalid(dir.path(), "future.json", &v99.to_string()),
            "schema_version 99",
        ),
        (
            invalid(dir.path(), "missing-key.json", &no_key.to_string()),
            "total_s",
        ),
        // Issue 16.11: a string version was called missing.
        (
            invalid(dir.path(), "string-version.json", &{
                let mut v = fixture();
                v["schema_version"] = json!("1");
                v.to_string()
            }),
            "schema_version is \"1\", not a whole number",
        ),
    ];
    for (bad, problem) in &cases {
        let name = bad.file_name().unwrap().to_str().unwrap();
        let out = compare(&[&good, bad], &["--output-dir", "out"], dir.path());
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name}: {stderr}");
        assert!(
            stderr.contains(name) && stderr.contains(problem),
            "{name}: the error names the file and {problem:?}: {stderr}"
        );
        assert!(
            !dir.path().join("out").exists(),
            "nothing is written when a summary is refused"
        );

        // The bad one first: the default baseline becomes the first run that could be read.
        let out = compare(
            &[bad, &good],
            &["--output-dir", "out", "--skip-invalid"],
            dir.path(),
        );
        let stderr = text(&out.stderr);
        assert!(out.status.success(), "{name} with --skip-invalid: {stderr}");
        assert!(
            stderr.contains("warning") && stderr.contains(name),
            "a warning names {name}: {stderr}"
        );
        let md = std::fs::read_to_string(dir.path().join("out/report.md")).unwrap();
        assert!(md.contains(fixture()["run"]["run_id"].as_str().unwrap()));
        std::fs::remove_dir_all(dir.path().join("out")).unwrap();
    }
    let bad: Vec<&Path> = cases.iter().map(|(p, _)| p.as_path()).collect();
    let out = compare(&bad, &["--skip-invalid"], dir.path());
    assert_eq!(
        out.status.code(),
        Some(2),
        "no valid run left: {}",
        text(&out.stderr)
    );

    let empty = dir.path().join("empty-run");
    std::fs::create_dir(&empty).unwrap();
    let out = compare(&[&empty], &[], dir.path());
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("empty-run"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn show_prints_one_run_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let s = fixture();
    let run = write_run(dir.path(), "run", &s, Some(STEPS));
    let cwd = tempfile::tempdir().unwrap();
    let out = Command::new(COMPARE)
        .arg("--show")
        .arg(&run)
        .current_dir(cwd.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains(s["run"]["run_id"].as_str().unwrap()),
        "{stdout}"
    );
    let tps = f(&s, "/metrics/tokens_per_s");
    assert!(
        stdout.contains(&format!("{tps:.1}")),
        "tokens/s {tps:.1} in:\n{stdout}"
    );
    assert!(
        stdout.contains("tokens/s (loss tokens, steady)") && stdout.contains("peak memory"),
        "{stdout}"
    );
    assert_eq!(
        std::fs::read_dir(cwd.path()).unwrap().count(),
        0,
        "--show writes no file"
    );
}

/// Runs a command with a deadline (a browser that hangs must not hang the test suite).
fn run_with_deadline(cmd: &mut Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting the command");
    let mut out_pipe = child.stdout.take().unwrap();
    let mut err_pipe = child.stderr.take().unwrap();
    let out_reader = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = out_pipe.read_to_end(&mut b);
        b
    });
    let err_reader = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = err_pipe.read_to_end(&mut b);
        b
    });
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Output {
        status,
        stdout: out_reader.join().unwrap(),
        stderr: err_reader.join().unwrap(),
    }
}

fn find_on_path(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|d| names.iter().map(move |n| d.join(n)))
        .find(|p| p.is_file())
}

#[test]
fn html_report_renders_in_headless_chromium_without_fetching_anything() {
    let r = three_runs();
    let out = compare(
        &[&r.a, &r.b, &r.c],
        &["--output-dir", r.out.to_str().unwrap()],
        r.out.parent().unwrap(),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let html_path = r.out.join("report.html");
    let html = std::fs::read_to_string(&html_path).unwrap();

    // Self-contained: the only URL is the SVG namespace name, which no browser fetches.
    let without_ns = html.replace("xmlns=\"http://www.w3.org/2000/svg\"", "");
    for needle in [
        "http://", "https://", "src=", "<link", "<script", "@import", "url(", "<img", "<iframe",
    ] {
        assert!(
            !without_ns.contains(needle),
            "report.html references an external resource ({needle})"
        );
    }

    let Some(browser) = find_on_path(&[
        "chromium",
        "chromium-browser",
        "google-chrome",
        "google-chrome-stable",
    ]) else {
        if std::env::var_os("CI").is_some() {
            panic!("CI is set but no chromium is installed; install it with `apt-get install -y chromium`");
        }
        eprintln!("skipped: chromium is not installed (apt-get install -y chromium); the static checks above passed");
        return;
    };
    let profile = tempfile::tempdir().unwrap();
    let url = format!("file://{}", html_path.display());
    let headless = |extra: &[&str]| {
        let mut c = Command::new(&browser);
        c.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(extra)
        .arg(&url);
        c
    };

    let dom = run_with_deadline(&mut headless(&["--dump-dom"]), Duration::from_secs(120));
    let dom_text = text(&dom.stdout);
    assert!(
        dom.status.success(),
        "chromium --dump-dom failed: {}",
        text(&dom.stderr)
    );
    assert_eq!(
        dom_text.matches("<svg").count(),
        4,
        "the rendered DOM holds the four plots"
    );
    assert!(dom_text.contains("Headline figures") && dom_text.contains("Workload mismatch"));

    let png = r.out.join("report.png");
    let shot = run_with_deadline(
        &mut headless(&[
            "--enable-logging=stderr",
            "--v=0",
            "--window-size=1300,4000",
            &format!("--screenshot={}", png.display()),
        ]),
        Duration::from_secs(120),
    );
    let log = text(&shot.stderr);
    assert!(shot.status.success(), "chromium --screenshot failed: {log}");
    let bytes = std::fs::read(&png).expect("chromium wrote the screenshot");
    assert!(
        bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.len() > 10_000,
        "a real PNG ({} bytes)",
        bytes.len()
    );
    for line in log.lines() {
        assert!(
            !line.contains("Failed to load resource") && !line.contains("net::ERR"),
            "a request failed: {line}"
        );
    }
}

/// A run with telemetry: the fixture's summary given a `metrics.telemetry` aggregated (by the
/// library, as the runner does) from a series built here, and that series as `telemetry.jsonl`.
/// GPU power rises from 100 W by 10 W per second; the steady window is 3.5 s to 8.5 s.
fn run_with_telemetry(dir: &Path) -> (PathBuf, Value) {
    use shared::measure::telemetry::aggregate::{summarize, Context};
    use shared::measure::telemetry::{
        CpuSample, DeviceInfo, NvidiaSample, Phase, PhaseMark, Recording, Sample,
    };
    let marks = vec![
        PhaseMark {
            phase: Phase::Load,
            t_s: 0.0,
        },
        PhaseMark {
            phase: Phase::Warmup,
            t_s: 2.0,
        },
        PhaseMark {
            phase: Phase::Steady,
            t_s: 3.5,
        },
        PhaseMark {
            phase: Phase::Finish,
            t_s: 8.5,
        },
    ];
    let samples: Vec<Sample> = (0..=10)
        .map(|k| {
            let t = k as f64;
            Sample {
                t_s: t,
                phase: marks.iter().rev().find(|m| m.t_s <= t).unwrap().phase,
                steps_done: k,
                cost_ms: 0.3,
                cpu: Some(CpuSample {
                    system_cpu_percent: Some(30.0),
                    process_cpu_cores: Some(1.0),
                    process_rss_gib: Some(2.0),
                    system_memory_used_gib: Some(8.0),
                    errors: vec![],
                }),
                nvidia: vec![NvidiaSample {
                    index: 0,
                    utilization_percent: Some(if (4..=8).contains(&k) { 90.0 } else { 5.0 }),
                    power_w: Some(100.0 + 10.0 * t),
                    temperature_c: Some(50.0),
                    throttle_reasons: if k == 6 {
                        vec!["sw_power_cap".into()]
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
    let device = |id: &str, name: &str| DeviceInfo {
        id: id.into(),
        name: name.into(),
        uuid: None,
        unsupported: vec![],
        unavailable: vec![],
    };
    let rec = Recording {
        interval_ms: 1000,
        samples: samples.clone(),
        marks,
        devices: vec![device("cpu", "test cpu"), device("nvidia:0", "NVIDIA H200")],
        nvidia_unavailable: None,
        errors: vec![],
        file: Some(PathBuf::from("telemetry.jsonl")),
    };
    let mut s = fixture();
    let cx = Context {
        steady_loss_tokens: s["metrics"]["steady_loss_tokens"].as_u64().unwrap() as usize,
        steady_input_tokens: s["metrics"]["steady_input_tokens"].as_u64().unwrap() as usize,
        backend_device: "cuda:0",
        cuda_visible_devices: None,
        job_gpus: None,
    };
    let (t, _) = summarize(&rec, &cx);
    s["run"]["run_id"] = json!("20261128T000000Z-pytorch-telemetry");
    s["metrics"]["telemetry"] = serde_json::to_value(&t).unwrap();
    let run = write_run(dir, "run-t", &s, Some(STEPS));
    let lines: String = samples
        .iter()
        .map(|x| serde_json::to_string(x).unwrap() + "\n")
        .collect();
    std::fs::write(run.join("telemetry.jsonl"), lines).unwrap();
    (run, s)
}

#[test]
fn telemetry_shows_energy_utilization_and_plots_over_time() {
    let dir = tempfile::tempdir().unwrap();
    let (t_run, st) = run_with_telemetry(dir.path());
    let plain = write_run(dir.path(), "run-plain", &fixture(), Some(STEPS));
    let out_dir = dir.path().join("report");
    let out = compare(
        &[&t_run, &plain],
        &["--output-dir", out_dir.to_str().unwrap()],
        dir.path(),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let md = std::fs::read_to_string(out_dir.join("report.md")).unwrap();
    let html = std::fs::read_to_string(out_dir.join("report.html")).unwrap();
    // Steady energy: the integral of 100 + 10 t from 3.5 to 8.5 = 500 + 5 (8.5^2 - 3.5^2) = 800 J.
    let steady_tokens = f(&st, "/metrics/steady_loss_tokens");
    let j = 800.0 / steady_tokens * 1000.0;
    assert!((f(&st, "/metrics/telemetry/joules_per_1k_tokens") - j).abs() < 1e-6);
    let shown = shared::report::figures::sig(j, 3);
    for (name, doc) in [("report.md", &md), ("report.html", &html)] {
        assert!(
            doc.contains(&format!("{shown} J")),
            "{name} shows {shown} J"
        );
        assert!(
            doc.contains("800 J steady"),
            "{name} shows the steady energy"
        );
        // Utilization over the steady samples (t = 4..8, all 90 %); the plain run has none.
        assert!(doc.contains("90 %"), "{name} shows the steady utilization");
        assert!(
            doc.contains("sw_power_cap"),
            "{name} names the throttle reason"
        );
        // Mean power = 800 J / 5 s.
        assert!(doc.contains("160 W"), "{name} shows the mean steady power");
        assert!(doc.contains("Utilization over time") && doc.contains("Power over time"));
    }
    assert!(
        md.contains("#2 pytorch cpu: no telemetry.jsonl matching its summary"),
        "{md}"
    );
    let svgs = inline_svgs(&html);
    assert_eq!(svgs.len(), 6, "four plots and the two over time");
    for svg in &svgs {
        roxmltree::Document::parse(svg).unwrap_or_else(|e| panic!("malformed SVG ({e})"));
    }
    // The power line reaches 200 W at t = 10: the axis covers it.
    let power_svg = svgs[5];
    assert!(power_svg.contains("power (W)"), "{power_svg}");
    // A telemetry series that does not match the summary (another run's) is not plotted.
    std::fs::write(
        t_run.join("telemetry.jsonl"),
        std::fs::read_to_string(t_run.join("telemetry.jsonl"))
            .unwrap()
            .lines()
            .take(3)
            .collect::<Vec<_>>()
            .join("\n")
            + "\n",
    )
    .unwrap();
    let out = compare(
        &[&t_run, &plain],
        &["--output-dir", out_dir.to_str().unwrap()],
        dir.path(),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let html = std::fs::read_to_string(out_dir.join("report.html")).unwrap();
    assert_eq!(
        inline_svgs(&html).len(),
        4,
        "a mismatched series is left out"
    );
}

#[test]
fn multi_gpu_runs_get_a_scaling_row_against_the_one_gpu_run() {
    let dir = tempfile::tempdir().unwrap();
    let one = fixture();
    let mut four = fixture();
    faster(&mut four, 3.6); // 3.6x the one-GPU rate on 4 GPUs: 90 % efficiency
    four["backend"]["world_size"] = json!(4);
    let mut other = four.clone(); // another workload: no one-GPU counterpart, no row
    other["workload"]["hash"] = json!("0".repeat(64));
    let a = write_run(dir.path(), "one", &one, None);
    let b = write_run(dir.path(), "four", &four, None);
    let c = write_run(dir.path(), "other", &other, None);
    let out_dir = dir.path().join("report");
    let out = compare(
        &[&a, &b, &c],
        &["--skip-invalid", "--output-dir", out_dir.to_str().unwrap()],
        dir.path(),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let md = std::fs::read_to_string(out_dir.join("report.md")).unwrap();
    assert!(md.contains("## Scaling (data parallel)"), "{md}");
    let rows: Vec<&str> = md
        .lines()
        .filter(|l| l.starts_with("| #") && l.contains("90.0 %"))
        .collect();
    assert_eq!(rows.len(), 1, "one scaling row at 90.0 %:\n{md}");
    assert!(rows[0].contains("| 4 |"), "{}", rows[0]);
    let html = std::fs::read_to_string(out_dir.join("report.html")).unwrap();
    assert!(html.contains("id=\"scaling\""));
}

/// Issue 16.10: `report.md` copied summary text as it was, so a device name or a note holding
/// `<script>` became markup (19 times in one report). Every string from a summary is shown
/// literally, as `report.html` escapes it: HTML as entities, link and code-span characters
/// escaped, and no newline or pipe can break a table.
#[test]
fn markdown_shows_summary_text_literally() {
    let dir = tempfile::tempdir().unwrap();
    let hostile = "<script>alert(1)</script> [x](javascript:alert(2)) `code` a|b\nnext";
    let mut s = fixture();
    s["backend"]["device_name"] = json!(hostile);
    s["backend"]["device"] = json!(format!("cpu{hostile}"));
    s["hardware"]["cpu_model"] = json!(hostile);
    s["notes"] = json!([hostile, format!("second note {hostile}")]);
    s["run"]["run_id"] = json!(format!("run-{hostile}"));
    s["workload"]["config"]["model"]["source"] = json!(hostile);
    s["status"] = json!("failed");
    s["error"] = json!({"message": hostile, "steps_completed": 7, "hint": hostile});
    let a = write_run(dir.path(), "a", &fixture(), Some(STEPS));
    let b = write_run(dir.path(), "b", &s, Some(STEPS));
    let out = compare(&[&a, &b], &["--output-dir", "out"], dir.path());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let md = std::fs::read_to_string(dir.path().join("out/report.md")).unwrap();
    let html = std::fs::read_to_string(dir.path().join("out/report.html")).unwrap();
    for (name, doc) in [("report.md", &md), ("report.html", &html)] {
        assert!(
            !doc.contains("<script"),
            "{name} carries raw markup:\n{doc}"
        );
        assert!(doc.contains("&lt;script&gt;"), "{name} shows the text");
    }
    assert!(!md.contains("[x](javascript:"), "a live link:\n{md}");
    assert!(md.contains("\\[x\\](javascript:alert(2))"), "{md}");
    // Every table row still has one cell per column (no pipe or newline from a summary split one).
    for line in md.lines().filter(|l| l.starts_with("| ")) {
        let cells = line.replace("\\|", "").matches('|').count();
        assert!(cells == 4 || cells == 5, "a broken row: {line}");
    }
}

/// Issue 16.11: `compare` on a FIFO waited for a writer forever; it is refused at once, naming it.
#[cfg(unix)]
#[test]
fn a_summary_that_is_a_fifo_is_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("benchmark_summary.json");
    if !Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .is_ok_and(|s| s.success())
    {
        eprintln!("skipped: mkfifo unavailable");
        return;
    }
    for args in [
        vec![fifo.to_str().unwrap().to_string()],
        vec![dir.path().to_str().unwrap().to_string()],
        vec!["--show".into(), fifo.to_str().unwrap().to_string()],
    ] {
        let out = run_with_deadline(
            Command::new(COMPARE)
                .args(&args)
                .args(if args[0] == "--show" {
                    vec![]
                } else {
                    vec!["--output-dir", "out"]
                })
                .current_dir(dir.path()),
            Duration::from_secs(30),
        );
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains("named pipe (FIFO)"), "{args:?}: {stderr}");
    }
    assert!(!dir.path().join("out").exists());
}

/// Issue 16.11: a torn or damaged `steps.jsonl` / `telemetry.jsonl` was reported as "no matching
/// steps.jsonl"; the report now says what is wrong with the file it found.
#[test]
fn damaged_logs_are_named_as_damaged() {
    let dir = tempfile::tempdir().unwrap();
    let lines: Vec<&str> = STEPS.lines().collect();
    // Cut in the middle of the last line (a kill during an append): the log is short of a step.
    let torn = {
        let mut t = lines[..lines.len() - 1].join("\n");
        t.push('\n');
        t.push_str(&lines[lines.len() - 1][..20]);
        t
    };
    // A line in the middle that is not a step.
    let damaged = {
        let mut l = lines.clone();
        l[2] = "{\"step\": 2, \"lo";
        l.join("\n") + "\n"
    };
    let a = write_run(dir.path(), "torn", &fixture(), Some(&torn));
    let b = write_run(dir.path(), "damaged", &fixture(), Some(&damaged));
    let (t_run, _) = run_with_telemetry(dir.path());
    let tel = std::fs::read_to_string(t_run.join("telemetry.jsonl")).unwrap();
    let mut tel_lines: Vec<&str> = tel.lines().collect();
    tel_lines[3] = "{\"t_s\": 3";
    std::fs::write(t_run.join("telemetry.jsonl"), tel_lines.join("\n") + "\n").unwrap();
    let out = compare(&[&a, &b, &t_run], &["--output-dir", "out"], dir.path());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let md = std::fs::read_to_string(dir.path().join("out/report.md")).unwrap();
    assert!(
        md.contains(&format!(
            "steps.jsonl is cut short ({} of the summary's {} steps; its last line is torn)",
            lines.len() - 1,
            lines.len()
        )),
        "{md}"
    );
    assert!(
        md.contains("steps.jsonl is damaged") && md.contains("line 3: not a step record"),
        "{md}"
    );
    assert!(
        md.contains("telemetry.jsonl is damaged") && md.contains("line 4"),
        "{md}"
    );
    assert!(!md.contains("no matching steps.jsonl"), "{md}");
}

/// The summaries committed under `benchmarks/` are schema 1: the report still loads them, with
/// NVML's figure in the device process row and the figures schema 1 did not record marked so.
#[test]
fn committed_schema_1_summaries_still_load_into_the_report() {
    let root =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../benchmarks/h200-2026-11-28-perf4/runs");
    if !root.exists() {
        eprintln!("skipped: {} is absent", root.display());
        return;
    }
    let (a, b) = (root.join("lastn"), root.join("full"));
    for p in [&a, &b] {
        let v: Value = serde_json::from_str(
            &std::fs::read_to_string(p.join("benchmark_summary.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(v["schema_version"], 1, "{}", p.display());
    }
    let dir = tempfile::tempdir().unwrap();
    let out = compare(&[&a, &b], &[], dir.path());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let md = std::fs::read_to_string(dir.path().join("report.md")).unwrap();
    let row = |label: &str| {
        md.lines()
            .find(|l| l.starts_with(&format!("| {label}")))
            .unwrap_or_else(|| panic!("no row {label}:\n{md}"))
            .to_string()
    };
    let process = row("peak memory: device process (driver)");
    assert!(
        process.contains("23.6 GiB") && process.contains("schema 1"),
        "{process}"
    );
    let allocated = row("peak memory: device allocated");
    assert!(
        allocated.contains("n/a") && allocated.contains("not recorded"),
        "{allocated}"
    );
    assert!(md.contains("schema: converted from schema 1"), "{md}");
}

/// Runs with one workload hash but different dtypes did the same work in other precisions:
/// `compare` warns on stderr and in the report.
#[test]
fn one_hash_in_two_dtypes_gets_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let a = write_run(dir.path(), "a", &fixture(), None);
    let mut sb = fixture();
    sb["backend"]["dtype"] = json!("bf16");
    sb["run"]["run_id"] = json!("20261128T000000Z-pytorch-bf16");
    let b = write_run(dir.path(), "b", &sb, None);
    let out = compare(&[&a, &b], &[], dir.path());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains("warning: runs with workload hash") && err.contains("differ in dtype"),
        "{err}"
    );
    assert!(err.contains("float32") && err.contains("bf16"), "{err}");
    for name in ["report.md", "report.html"] {
        let doc = std::fs::read_to_string(dir.path().join(name)).unwrap();
        assert!(doc.contains("Precision differs"), "{name}");
    }
    // The same dtype: no warning.
    let out = compare(&[&a, &a], &[], dir.path());
    assert!(!text(&out.stderr).contains("differ in dtype"));
}

/// The demo's pair (both binaries, tiny preset, CPU; summaries of real runs in `fixtures/`): the
/// report has one row per memory figure, each with one meaning for both runs: MLX's allocated
/// peak and its estimate's error, libtorch's CPU run without one (and saying why), no device
/// process figure on a CPU run, the host RSS of both.
#[test]
fn a_cpu_demo_pair_shows_the_memory_rows() {
    let dir = tempfile::tempdir().unwrap();
    let pt: Value =
        serde_json::from_str(include_str!("fixtures/demo_pytorch_summary.json")).unwrap();
    let mlx: Value = serde_json::from_str(include_str!("fixtures/demo_mlx_summary.json")).unwrap();
    assert_eq!(
        pt["workload"]["hash"], mlx["workload"]["hash"],
        "the demo's one workload"
    );
    let a = write_run(dir.path(), "pytorch", &pt, None);
    let b = write_run(dir.path(), "mlx", &mlx, None);
    let out = compare(&[&a, &b], &[], dir.path());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let md = std::fs::read_to_string(dir.path().join("report.md")).unwrap();
    let row = |label: &str| -> Vec<String> {
        let line = md
            .lines()
            .find(|l| l.starts_with(&format!("| {label}")))
            .unwrap_or_else(|| panic!("no row {label}:\n{md}"));
        line.split(" | ").skip(1).map(str::to_string).collect()
    };
    let gib = |v: &Value| format!("{:.3}", v.as_f64().unwrap());
    let alloc = row("peak memory: device allocated");
    assert!(
        alloc[0].contains("n/a") && alloc[0].contains("no allocation statistics for the CPU"),
        "{alloc:?}"
    );
    let mlx_alloc = mlx["metrics"]["memory"]["device_peak_allocated_gib"]
        .as_f64()
        .unwrap();
    assert!(
        alloc[1].contains(" GiB") && alloc[1].contains("MLX peak_memory"),
        "{alloc:?}"
    );
    assert!(
        mlx_alloc > 0.0,
        "{}",
        gib(&mlx["metrics"]["memory"]["device_peak_allocated_gib"])
    );
    row("peak memory: device reserved");
    let process = row("peak memory: device process (driver)");
    assert!(
        process
            .iter()
            .all(|c| c.contains("n/a") && c.contains("a CPU run")),
        "{process:?}"
    );
    let rss = row("peak memory: host RSS (process)");
    assert!(
        rss.iter()
            .all(|c| c.contains(" GiB") && c.contains("resident set")),
        "{rss:?}"
    );
    let est = row("memory estimate");
    assert!(est[0].contains("no allocated peak"), "{est:?}");
    assert!(est[1].contains("% vs allocated"), "{est:?}");
}

/// A run with activation checkpointing gets an HFU row (the recomputation counted) beside MFU,
/// and its strategy says so; runs without it get no HFU row (it would repeat MFU).
#[test]
fn checkpointed_runs_show_hfu_and_say_so() {
    let dir = tempfile::tempdir().unwrap();
    let mut plain = fixture();
    plain["metrics"]["mfu"] = json!(0.40);
    plain["metrics"]["hfu"] = json!(0.40);
    let a = write_run(dir.path(), "run-a", &plain, Some(STEPS));
    let mut ckpt = fixture();
    ckpt["run"]["run_id"] = json!("20261204T000000Z-pytorch-ckpt");
    ckpt["workload"]["config"]["strategy"]["grad_checkpoint"] = json!(true);
    ckpt["metrics"]["mfu"] = json!(0.30);
    ckpt["metrics"]["hfu"] = json!(0.45);
    let b = write_run(dir.path(), "run-b", &ckpt, None);
    let report = |runs: &[&PathBuf], name: &str| {
        let out = dir.path().join(name);
        let o = compare(runs, &["--output-dir", out.to_str().unwrap()], dir.path());
        assert!(o.status.success(), "compare failed: {}", text(&o.stderr));
        std::fs::read_to_string(out.join("report.md")).unwrap()
    };
    let md = report(&[&a, &b], "both");
    let hfu = md
        .lines()
        .find(|l| l.starts_with("| HFU"))
        .unwrap_or_else(|| panic!("no HFU row:\n{md}"));
    assert!(hfu.contains("40.0 %") && hfu.contains("45.0 %"), "{hfu}");
    let strategy = |md: &str| {
        md.lines()
            .find(|l| l.starts_with("| strategy"))
            .unwrap_or_else(|| panic!("no strategy row:\n{md}"))
            .to_string()
    };
    let row = strategy(&md);
    assert_eq!(row.matches("activation checkpointing").count(), 1, "{row}");
    let md = report(&[&a], "plain");
    assert!(!md.lines().any(|l| l.starts_with("| HFU")), "{md}");
    assert!(!strategy(&md).contains("activation checkpointing"));
}

/// A backend's note on the time to first step (MLX compiling its CUDA kernels in a fresh
/// machine's first run) is pointed to from the figure; without such a note the cell is the figure
/// alone, and a note is never taken for the reason of a missing figure.
#[test]
fn a_note_on_the_time_to_first_step_is_pointed_to_from_the_figure() {
    let dir = tempfile::tempdir().unwrap();
    let a = write_run(dir.path(), "run-a", &fixture(), Some(STEPS));
    let mut cold = fixture();
    cold["run"]["run_id"] = json!("20261206T000000Z-mlx-cold");
    let note = "time_to_first_step_s: includes NVRTC compiling MLX's CUDA kernels";
    cold["notes"] = json!([note]);
    let b = write_run(dir.path(), "run-b", &cold, None);
    let mut none = cold.clone();
    none["run"]["run_id"] = json!("20261206T000001Z-mlx-none");
    none["metrics"]["time_to_first_step_s"] = json!(null);
    let c = write_run(dir.path(), "run-c", &none, None);
    let out = compare(&[&a, &b, &c], &["--output-dir", "out"], dir.path());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let md = std::fs::read_to_string(dir.path().join("out/report.md")).unwrap();
    let row = md
        .lines()
        .find(|l| l.starts_with("| time to first step"))
        .unwrap_or_else(|| panic!("no time-to-first-step row:\n{md}"));
    let cells: Vec<&str> = row.split('|').map(str::trim).collect();
    assert!(!cells[2].contains("see the notes"), "{row}");
    assert!(cells[3].ends_with("(see the notes)"), "{row}");
    assert!(
        cells[4].contains("n/a") && cells[4].contains("no step completed"),
        "{row}"
    );
    assert!(
        md.contains("includes NVRTC compiling"),
        "the note itself:\n{md}"
    );
}
