//! Bad input, failures and interruptions, through the real binary on the tiny model (issue 7).
//!
//! Every bad input exits with code 2 before any model is loaded, names the file and line or row,
//! the field (or the value) and the fix, and leaves nothing behind: no run folder, no summary.

mod common;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

const GOOD: &str = r#"{"instruction":"What is a llama?","context":"","response":"An animal of the Andes.","category":"open_qa"}"#;

/// Runs the binary with the fast tiny settings plus `extra`, expects exit code 2 and no output
/// files, and returns stderr.
fn expect_usage_error(extra: &[&str]) -> String {
    let d = tempfile::tempdir().unwrap();
    let o = run(d.path(), extra);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{extra:?}: {err}");
    assert_nothing_written(d.path());
    err
}

fn assert_nothing_written(out: &Path) {
    let left: Vec<_> = std::fs::read_dir(out)
        .map(|r| r.map(|e| e.unwrap().file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "bad input left files behind: {left:?}");
}

/// A JSONL file whose first line is good and whose second line is `bad`.
fn jsonl(dir: &Path, bad: &[u8]) -> PathBuf {
    let p = dir.join("dolly.jsonl");
    let mut bytes = GOOD.as_bytes().to_vec();
    bytes.push(b'\n');
    bytes.extend_from_slice(bad);
    bytes.push(b'\n');
    std::fs::write(&p, bytes).unwrap();
    p
}

fn bad_record(bad: &[u8]) -> (String, String) {
    let d = tempfile::tempdir().unwrap();
    let p = jsonl(d.path(), bad);
    let name = p.display().to_string();
    (expect_usage_error(&["--dataset", &name]), name)
}

#[test]
fn bad_record_missing_field() {
    let (err, file) = bad_record(br#"{"instruction":"Why?","context":"","category":"open_qa"}"#);
    assert!(
        err.contains(&file)
            && err.contains("line 2")
            && err.contains("missing field \"response\"")
            && err.contains("--on-bad-record skip"),
        "{err}"
    );
}

#[test]
fn bad_record_wrongly_typed_field() {
    let (err, file) = bad_record(br#"{"instruction":"Why?","response":5}"#);
    assert!(
        err.contains(&file)
            && err.contains("line 2")
            && err.contains("\"response\" is a number, not a string")
            && err.contains("make \"response\" a string"),
        "{err}"
    );
}

#[test]
fn bad_record_empty_response() {
    let (err, file) = bad_record(br#"{"instruction":"Why?","response":"  "}"#);
    assert!(
        err.contains(&file)
            && err.contains("line 2")
            && err.contains("\"response\" is empty")
            && err.contains("give \"response\" text"),
        "{err}"
    );
}

#[test]
fn bad_record_invalid_utf8() {
    let (err, file) = bad_record(b"{\"instruction\":\"Why?\",\"response\":\"caf\xe9\"}");
    assert!(
        err.contains(&file)
            && err.contains("line 2")
            && err.contains("invalid UTF-8")
            && err.contains("\"response\"")
            && err.contains("re-encode the file as UTF-8"),
        "{err}"
    );
}

#[test]
fn bad_record_broken_jsonl_line() {
    let (err, file) = bad_record(br#"{"instruction":"Why?","response":"#);
    assert!(
        err.contains(&file)
            && err.contains("line 2")
            && err.contains("not valid JSON")
            && err.contains("each line must be one JSON object"),
        "{err}"
    );
}

#[test]
fn unreadable_parquet_file() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("dolly.parquet");
    std::fs::write(&p, b"PAR1 this is not a parquet file PAR1").unwrap();
    let name = p.display().to_string();
    let err = expect_usage_error(&["--dataset", &name]);
    assert!(
        err.contains(&name)
            && err.contains("not a readable Parquet file")
            && err.contains("re-download the file or convert it to JSONL"),
        "{err}"
    );
}

/// `--on-bad-record skip` runs on the good records and counts the bad ones in the summary.
#[test]
fn skipped_bad_records_are_counted() {
    let Some(shared_dir) = shared_dir() else {
        eprintln!("skipped: ../shared/tokenizers/phi-3 is absent");
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("dolly.jsonl");
    let mut text = String::new();
    for i in 0..8 {
        text.push_str(&GOOD.replace("llama", &format!("llama {i}")));
        text.push('\n');
    }
    text.push_str(
        "{\"instruction\":\"Why?\"}\n{\"instruction\":\"Why?\",\"response\":5}\nnot json\n",
    );
    std::fs::write(&p, text).unwrap();
    let out = d.path().join("out");
    let tok = shared_dir.join("tokenizers/phi-3");
    let o = run(
        &out,
        &[
            "--dataset",
            p.to_str().unwrap(),
            "--tokenizer",
            tok.to_str().unwrap(),
            "--on-bad-record",
            "skip",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let s = summary(&out);
    assert_eq!(s.workload.data.bad_records_skipped, 3);
    assert_eq!(s.workload.data.records_used, 8);
    assert_eq!(s.workload.data.records_read, 11);
}

#[test]
fn unknown_flag() {
    let d = tempfile::tempdir().unwrap();
    let o = Command::new(bin())
        .args(["--learning-rate", "0.1", "--output-dir"])
        .arg(d.path())
        .output()
        .unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--learning-rate") && err.contains("--help"),
        "{err}"
    );
    assert_nothing_written(d.path());
}

fn toml_file(dir: &Path, text: &str) -> String {
    let p = dir.join("bench.toml");
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

#[test]
fn unknown_toml_key() {
    let d = tempfile::tempdir().unwrap();
    let f = toml_file(d.path(), "[workload.train]\nlearning_rate = 0.1\n");
    let err = expect_usage_error(&["--config", &f]);
    assert!(
        err.contains(&f) && err.contains("learning_rate") && err.contains("Valid sections"),
        "{err}"
    );
}

#[test]
fn bad_toml_value() {
    let d = tempfile::tempdir().unwrap();
    let f = toml_file(d.path(), "[workload.strategy]\nkind = \"half\"\n");
    let err = expect_usage_error(&["--config", &f]);
    assert!(
        err.contains(&f) && err.contains("half") && err.contains("last-n") && err.contains("lora"),
        "{err}"
    );
    let f = toml_file(d.path(), "[workload.train]\nepochs = 0\n");
    let err = expect_usage_error(&["--config", &f]);
    assert!(
        err.contains("epochs = 0") && err.contains("--epochs 1"),
        "{err}"
    );
    let f = toml_file(d.path(), "[workload.train]\nweight_decay = \"a lot\"\n");
    let err = expect_usage_error(&["--config", &f]);
    assert!(
        err.contains(&f) && err.contains("a lot") && err.contains("weight_decay"),
        "{err}"
    );
}

#[test]
fn lora_rank_above_the_layer_width() {
    // The tiny model is 64 wide.
    let err = expect_usage_error(&["--strategy", "lora", "--lora-rank", "65"]);
    assert!(
        err.contains("lora_rank = 65") && err.contains("(64)") && err.contains("--lora-rank"),
        "{err}"
    );
}

#[test]
fn last_n_beyond_the_layer_count() {
    let err = expect_usage_error(&["--strategy", "last-n", "--last-n", "3"]);
    assert!(
        err.contains("last_n = 3") && err.contains("only 2 blocks") && err.contains("--last-n 2"),
        "{err}"
    );
}

/// libtorch runs bf16 on every device it supports (CPU included: `--preset seed` runs bf16 on the
/// CPU in `cli.rs`), so no dtype is impossible for this binary; the impossible device choices are
/// refused before anything loads.
#[test]
fn device_the_binary_cannot_use() {
    // Without the fast settings, which name --device cpu.
    let expect_usage_error = |device: &str| {
        let d = tempfile::tempdir().unwrap();
        let o = Command::new(bin())
            .args([
                "--preset",
                "tiny",
                "--quiet",
                "--device",
                device,
                "--output-dir",
            ])
            .arg(d.path())
            .output()
            .unwrap();
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert_nothing_written(d.path());
        err
    };
    let err = expect_usage_error("gpu");
    assert!(
        err.contains("device = gpu") && err.contains("--device auto, cuda, mps or cpu"),
        "{err}"
    );
    if !cfg!(target_os = "macos") {
        let err = expect_usage_error("mps");
        assert!(
            err.contains("device = mps") && err.contains("--device auto"),
            "{err}"
        );
    }
}

#[test]
fn tokenizer_vocabulary_larger_than_the_model() {
    let Some(shared_dir) = shared_dir() else {
        eprintln!("skipped: ../shared/tokenizers/phi-3 is absent");
        return;
    };
    let d = tempfile::tempdir().unwrap();
    // A Phi-3 model whose embedding has 1,000 rows, and the 32k-entry Phi-3 tokenizer.
    let model = d.path().join("small-vocab");
    std::fs::create_dir_all(&model).unwrap();
    let mut shape = shared::model::ModelShape::tiny();
    shape.vocab_size = 1000;
    std::fs::write(
        model.join("config.json"),
        shape.to_config_json().to_string(),
    )
    .unwrap();
    let data = jsonl(d.path(), GOOD.as_bytes());
    let tok = shared_dir.join("tokenizers/phi-3");
    let err = expect_usage_error(&[
        "--model",
        model.to_str().unwrap(),
        "--weights",
        "random",
        "--dataset",
        data.to_str().unwrap(),
        "--tokenizer",
        tok.to_str().unwrap(),
    ]);
    assert!(
        err.contains("tokenizer")
            && err.contains(tok.to_str().unwrap())
            && err.contains("model's embedding (1000)")
            && err.contains("use the model's own tokenizer"),
        "{err}"
    );
}

/// An out-of-memory error at step 1 (injected at the backend boundary by the runner's testing
/// hook): exit code 1, a `failed` summary with the error, the step reached, the figures of the
/// completed step, the memory estimate and a hint.
#[test]
fn out_of_memory_writes_a_failed_summary() {
    let d = tempfile::tempdir().unwrap();
    let mut args: Vec<&str> = FAST.to_vec();
    let out = d.path().to_str().unwrap();
    args.extend_from_slice(&["--output-dir", out]);
    let o = Command::new(bin())
        .args(&args)
        .env("FTB_INJECT_OOM_AT_STEP", "1")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let s = summary(d.path());
    assert_eq!(s.status, shared::summary::Status::Failed);
    let e = s.error.as_ref().unwrap();
    assert!(e.message.contains("out of memory"), "{}", e.message);
    assert_eq!(e.steps_completed, 1);
    assert!(e
        .hint
        .as_deref()
        .unwrap()
        .contains("--max-tokens-per-micro-batch"));
    assert_eq!(s.metrics.steps, 1);
    assert_eq!(s.metrics.loss_curve.len(), 1);
    assert!(s.metrics.input_tokens > 0);
    assert!(s.metrics.memory.estimated_peak_bytes.unwrap() > 0);
}

/// `--plan` prints the plan and the memory estimate and exits 0 without loading or writing; when
/// the estimate exceeds the free memory, it names settings that fit.
#[test]
fn plan_prints_the_estimate_and_what_would_fit() {
    let d = tempfile::tempdir().unwrap();
    let o = run(d.path(), &["--plan"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    for k in [
        "memory estimate (float32): peak",
        "weights",
        "gradients",
        "AdamW moments",
        "activations",
        "worst micro-batch",
        "free memory",
    ] {
        assert!(text.contains(k), "{k}: {text}");
    }
    assert_nothing_written(d.path());
    // 150 MB free: less than the tiny plan's estimate (about 0.21 GiB).
    let mut args: Vec<&str> = FAST.to_vec();
    args.push("--plan");
    let o = Command::new(bin())
        .args(&args)
        .env("FTB_ASSUME_FREE_MEMORY_BYTES", "150000000")
        .output()
        .unwrap();
    assert!(o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("warning: the estimated peak memory")
            && err.contains("settings that would fit: --max-tokens-per-micro-batch 256")
            && err.contains("--strategy lora"),
        "{err}"
    );
    // A real run prints the estimate in its first lines and records it in the summary.
    let d = tempfile::tempdir().unwrap();
    let mut args: Vec<&str> = FAST.iter().copied().filter(|a| *a != "--quiet").collect();
    args.extend_from_slice(&["--output-dir", d.path().to_str().unwrap()]);
    let o = Command::new(bin()).args(&args).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    let first: Vec<&str> = err.lines().take(3).collect();
    assert!(
        first.iter().any(|l| l.starts_with("memory estimate")),
        "{first:?}"
    );
    let s = summary(d.path());
    let e = s.metrics.memory.estimate.unwrap();
    assert_eq!(s.metrics.memory.estimated_peak_bytes, Some(e.peak_bytes));
    assert_eq!(e.dtype, "float32");
}

fn spawn_long_run(out: &Path, extra: &[&str]) -> std::process::Child {
    Command::new(bin())
        .args([
            "--preset",
            "tiny",
            "--device",
            "cpu",
            "--quiet",
            "--samples",
            "2000",
        ])
        .args(extra)
        .arg("--output-dir")
        .arg(out)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

fn signal(child: &std::process::Child, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig}");
}

/// Waits (at most 60 s) until `child` has installed its SIGINT handler: on Linux, until bit 2 of
/// `SigCgt` in `/proc/PID/status` is set; elsewhere, a few seconds.
fn wait_until_sigint_is_caught(child: &std::process::Child) {
    let status = format!("/proc/{}/status", child.id());
    if !Path::new(&status).exists() {
        std::thread::sleep(std::time::Duration::from_secs(3));
        return;
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let caught = std::fs::read_to_string(&status)
            .ok()
            .and_then(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix("SigCgt:"))
                    .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
            })
            .is_some_and(|mask| mask & (1 << (2 - 1)) != 0);
        if caught {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "no SIGINT handler");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// SIGTERM (what `kill`, systemd and schedulers send) is an interruption like Ctrl-C.
#[cfg(unix)]
#[test]
fn sigterm_writes_an_interrupted_summary() {
    let d = tempfile::tempdir().unwrap();
    let child = spawn_long_run(d.path(), &[]);
    wait_for_first_step(d.path());
    signal(&child, "-TERM");
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(130), "{}", stderr(&o));
    let s = summary(d.path());
    assert_eq!(s.status, shared::summary::Status::Interrupted);
    assert!(s.metrics.steps >= 1 && s.metrics.steps < 125);
    assert_eq!(s.metrics.loss_curve.len(), s.metrics.steps);
}

/// A second Ctrl-C exits at once, without a summary, however the two presses fall (issue 16.1: the
/// process used to exit from the signal thread through `exit()`, running libtorch's static
/// destructors under the main thread: 2 of 5 tries crashed with SIGSEGV, 2 wrote a `failed`
/// summary with a bogus libtorch error). 20 tries: the first press as soon as step 0 is logged,
/// the second 100 ms later, while the next step (about half a second of libtorch on 2 cores, more
/// under load) runs.
#[cfg(unix)]
#[test]
fn second_ctrl_c_exits_at_once_without_a_summary_20_times() {
    let started = std::time::Instant::now();
    for attempt in 1..=20 {
        let d = tempfile::tempdir().unwrap();
        let child = Command::new(bin())
            .args([
                "--preset",
                "tiny",
                "--device",
                "cpu",
                "--quiet",
                "--samples",
                "160",
                "--micro-batch-size",
                "8",
                "--grad-accum",
                "4",
                "--max-seq-len",
                "256",
                "--max-tokens-per-micro-batch",
                "2048",
                "--strategy",
                "full",
                "--telemetry-interval-ms",
                "0",
                "--output-dir",
            ])
            .arg(d.path())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        wait_for_first_step(d.path());
        signal(&child, "-INT");
        std::thread::sleep(std::time::Duration::from_millis(100));
        let t = std::time::Instant::now();
        signal(&child, "-INT");
        let o = child.wait_with_output().unwrap();
        let err = stderr(&o);
        assert_eq!(
            o.status.code(),
            Some(130),
            "attempt {attempt}: {:?} (a crash has no exit code): {err}",
            o.status
        );
        assert!(
            err.contains("second interrupt: exiting now, without a summary"),
            "attempt {attempt}: {err}"
        );
        assert!(
            !err.contains("error"),
            "attempt {attempt}: an error after the second press: {err}"
        );
        assert_eq!(
            summaries_under(d.path()),
            Vec::<PathBuf>::new(),
            "attempt {attempt}: no summary after the second press"
        );
        assert!(t.elapsed().as_secs_f64() < 5.0, "attempt {attempt}");
    }
    eprintln!(
        "20 double Ctrl-Cs in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// Issue 16.7: a signal while the data loads (here: a million synthetic records, half a minute of
/// work) stops the run at once with 130 and nothing written; it used to load on, load the model
/// and write a 0-step summary.
#[cfg(unix)]
#[test]
fn a_signal_while_the_data_loads_stops_at_once() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("out");
    let child = Command::new(bin())
        .args([
            "--preset",
            "tiny",
            "--device",
            "cpu",
            "--samples",
            "1000000",
        ])
        .arg("--output-dir")
        .arg(&out)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Loading libtorch takes a moment before `main` runs: wait until the handler is installed
    // (a signal before that ends the process the default way), then a little into the loading.
    wait_until_sigint_is_caught(&child);
    std::thread::sleep(std::time::Duration::from_millis(500));
    let t = std::time::Instant::now();
    signal(&child, "-INT");
    let o = child.wait_with_output().unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(130), "{err}");
    assert!(t.elapsed().as_secs_f64() < 3.0, "{:?}", t.elapsed());
    assert!(
        err.contains("interrupted before the run started: nothing was written"),
        "{err}"
    );
    assert!(!out.exists(), "nothing written");
}

/// Issue 16.7: a signal while the model loads (a 160M-parameter Phi-3 initialised on the host,
/// seconds of work) removes the run folder, which holds nothing measured yet, and exits 130.
#[cfg(unix)]
#[test]
fn a_signal_while_the_model_loads_stops_at_once() {
    let d = tempfile::tempdir().unwrap();
    let m = model_folder(
        d.path(),
        serde_json::json!({"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
            "num_key_value_heads": 12, "intermediate_size": 3072}),
    );
    let out = d.path().join("out");
    let child = Command::new(bin())
        .args([
            "--preset",
            "tiny",
            "--device",
            "cpu",
            "--samples",
            "16",
            "--model",
            m.to_str().unwrap(),
            "--weights",
            "random",
            "--strategy",
            "full",
        ])
        .arg("--output-dir")
        .arg(&out)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !std::fs::read_dir(out.join("runs")).is_ok_and(|mut r| r.next().is_some()) {
        assert!(std::time::Instant::now() < deadline, "no run folder");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let t = std::time::Instant::now();
    signal(&child, "-TERM");
    let o = child.wait_with_output().unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(130), "{err}");
    assert!(t.elapsed().as_secs_f64() < 3.0, "{:?}", t.elapsed());
    assert!(
        err.contains("interrupted while loading the model, before any step: removing"),
        "{err}"
    );
    let left: Vec<_> = std::fs::read_dir(out.join("runs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(left.is_empty(), "the run folder is removed: {left:?}");
    assert!(summaries_under(&out).is_empty());
}
