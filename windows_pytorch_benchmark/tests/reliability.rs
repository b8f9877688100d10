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
    let tok = word_tokenizer(d.path(), Some(WORD_TEMPLATE));
    let err = expect_usage_error(&["--dataset", &name, "--tokenizer", tok.to_str().unwrap()]);
    (err, name)
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
    let tok = word_tokenizer(d.path(), Some(WORD_TEMPLATE));
    let err = expect_usage_error(&["--dataset", &name, "--tokenizer", tok.to_str().unwrap()]);
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
/// the second 150 ms later, while the next step (about half a second of libtorch on 2 cores, more
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
        // Later than `shared::interrupt::SAME_SIGNAL` (sooner is the first signal delivered twice).
        std::thread::sleep(std::time::Duration::from_millis(150));
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

/// Issue 16.2: `--micro-batch-size 2^61 --grad-accum 8` wrapped to 0 records per step and panicked
/// silently (exit 101, nothing printed). Every user number is checked: products that overflow and
/// values beyond what the plan, the memory estimate or a clock can hold are usage errors.
#[test]
fn numbers_that_overflow_are_refused_by_name() {
    for (args, want) in [
        (
            &[
                "--micro-batch-size",
                "2305843009213693952",
                "--grad-accum",
                "8",
            ][..],
            &[
                "micro_batch_size = 2305843009213693952",
                "overflows",
                "--micro-batch-size 8",
            ][..],
        ),
        (
            &["--max-tokens-per-micro-batch", "18446744073709551615"],
            &[
                "max_tokens_per_micro_batch",
                "largest supported",
                "--max-tokens-per-micro-batch 16384",
            ],
        ),
        (
            &["--max-seq-len", "9223372036854775807"],
            &["max_seq_len = 9223372036854775807", "--max-seq-len 2048"],
        ),
        (
            &["--batch-plan", "padded", "--micro-batch-size", "1000000000"],
            &["micro_batch_size = 1000000000", "--grad-accum"],
        ),
        (
            &["--samples", "1000000000000"],
            &["samples = 1000000000000", "synthetic records"],
        ),
        (
            &[
                "--epochs",
                "1000000000000000000",
                "--max-steps",
                "18446744073709551615",
            ],
            &["epochs = 1000000000000000000", "--max-steps"],
        ),
        (
            &["--dist-timeout", "1e300"],
            &["dist_timeout", "--dist-timeout 300"],
        ),
    ] {
        let err = expect_usage_error(args);
        for w in want {
            assert!(err.contains(w), "{args:?}: {w:?} in {err}");
        }
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

/// Issue 16.3: an estimate beyond the machine's total memory (not only its free memory) used to
/// warn and go on until the allocator aborted (exit 134, no summary). It is refused before anything
/// is written, unless `--allow-oversubscribe`.
#[test]
fn an_estimate_beyond_total_memory_is_refused_unless_allowed() {
    // A Phi-3 of width 16k and 256 blocks: terabytes, on any machine that runs this test.
    let d = tempfile::tempdir().unwrap();
    let model = model_folder(
        d.path(),
        serde_json::json!({"hidden_size": 16384, "num_hidden_layers": 256, "num_attention_heads": 128,
            "num_key_value_heads": 128, "intermediate_size": 65536}),
    );
    let err = expect_usage_error(&[
        "--model",
        model.to_str().unwrap(),
        "--weights",
        "random",
        "--max-steps",
        "1",
    ]);
    assert!(
        err.contains("memory estimate")
            && err.contains("above the device's total memory")
            && err.contains("--allow-oversubscribe"),
        "{err}"
    );
    // The tiny plan (about 0.2 GiB) on a device said to hold 100 MB in all.
    let d = tempfile::tempdir().unwrap();
    let mut args: Vec<&str> = FAST.to_vec();
    let out = d.path().to_str().unwrap();
    args.extend_from_slice(&["--output-dir", out]);
    let o = Command::new(bin())
        .args(&args)
        .env("FTB_ASSUME_TOTAL_MEMORY_BYTES", "100000000")
        .output()
        .unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("FTB_ASSUME_TOTAL_MEMORY_BYTES"), "{err}");
    assert_nothing_written(d.path());
    args.push("--allow-oversubscribe");
    let o = Command::new(bin())
        .args(&args)
        .env("FTB_ASSUME_TOTAL_MEMORY_BYTES", "100000000")
        .output()
        .unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(
        err.contains("exceeds the device's total memory") && err.contains("starting anyway"),
        "{err}"
    );
}

/// Issue 16.4: problems with the tokenizer folder, found before the model loads, are usage errors
/// (they used to exit 1 with no summary), reported before the data is read.
#[test]
fn tokenizer_folder_problems_are_usage_errors() {
    let d = tempfile::tempdir().unwrap();
    let data = jsonl(d.path(), GOOD.as_bytes());
    let data = data.to_str().unwrap();
    let empty = d.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let err = expect_usage_error(&["--dataset", data, "--tokenizer", empty.to_str().unwrap()]);
    assert!(
        err.contains("tokenizer.json: does not exist") && err.contains("--tokenizer"),
        "{err}"
    );
    // No chat template; a broken tokenizer.json; a broken tokenizer_config.json.
    let t = word_tokenizer(&d.path().join("none"), None);
    let err = expect_usage_error(&["--dataset", data, "--tokenizer", t.to_str().unwrap()]);
    assert!(
        err.contains("tokenizer_config.json") && err.contains("no chat_template"),
        "{err}"
    );
    let t = word_tokenizer(&d.path().join("broken"), Some(WORD_TEMPLATE));
    std::fs::write(t.join("tokenizer.json"), "{\"version\":").unwrap();
    let err = expect_usage_error(&["--dataset", data, "--tokenizer", t.to_str().unwrap()]);
    assert!(
        err.contains("tokenizer.json") && err.contains("not a tokenizers-format"),
        "{err}"
    );
    let t = word_tokenizer(&d.path().join("badcfg"), Some(WORD_TEMPLATE));
    std::fs::write(t.join("tokenizer_config.json"), "{").unwrap();
    let err = expect_usage_error(&["--dataset", data, "--tokenizer", t.to_str().unwrap()]);
    assert!(
        err.contains("tokenizer_config.json") && err.contains("not valid JSON"),
        "{err}"
    );
    // A template that does not parse, and one that cannot mask the prompt.
    for (tpl, want) in [
        ("{% for m in messages %}", "cannot format a conversation"),
        (
            "{% for m in messages %}{{ m['content'] }}{% endfor %}{{ bos_token }}",
            "cannot format a conversation",
        ),
    ] {
        let t = word_tokenizer(&d.path().join("tpl"), Some(tpl));
        let err = expect_usage_error(&["--dataset", data, "--tokenizer", t.to_str().unwrap()]);
        assert!(
            err.contains("chat_template") && err.contains(want),
            "{tpl}: {err}"
        );
    }
    // The tokenizer is checked before the records: a bad record after it is not what is reported.
    std::fs::create_dir(d.path().join("bad")).unwrap();
    let bad = jsonl(&d.path().join("bad"), b"not json");
    let err = expect_usage_error(&[
        "--dataset",
        bad.to_str().unwrap(),
        "--tokenizer",
        empty.to_str().unwrap(),
    ]);
    assert!(
        err.contains("tokenizer.json") && !err.contains("line 2"),
        "{err}"
    );
}

/// Issue 16.12: a missing path given as `--tokenizer` is said to be missing, as for `--model`,
/// and never looked up on the hub.
#[test]
fn a_missing_tokenizer_path_is_named_not_looked_up() {
    let d = tempfile::tempdir().unwrap();
    let data = jsonl(d.path(), GOOD.as_bytes());
    for tok in ["/no/such/tok", "./no/such/tok"] {
        let err = expect_usage_error(&["--dataset", data.to_str().unwrap(), "--tokenizer", tok]);
        assert!(
            err.contains(&format!("{tok}: tokenizer folder does not exist"))
                && !err.contains("hf://"),
            "{err}"
        );
    }
    let err = expect_usage_error(&["--model", "/no/such/model", "--weights", "random"]);
    assert!(
        err.contains("/no/such/model: model folder does not exist"),
        "{err}"
    );
    // The same for a data file without an extension.
    let err = expect_usage_error(&["--dataset", "/no/such/data"]);
    assert!(
        err.contains("/no/such/data: no such file") && !err.contains("hf://"),
        "{err}"
    );
}

/// Issue 16.4 and 16.6: problems with the model folder and its `config.json` are usage errors
/// naming the file and the key: they used to exit 1, or reach libtorch as "cannot reshape a tensor
/// of 0 elements", "index out of range in self", or a NaN loss blamed on the learning rate.
#[test]
fn model_config_problems_are_usage_errors() {
    for (changes, want) in [
        // Issue 14: another family than Phi-3, Llama 3.x and Qwen3, named with the supported ones.
        (
            serde_json::json!({"model_type": "mistral"}),
            "model_type is \"mistral\"; this benchmark implements model_type \"phi3\", \"llama\", \"qwen3\"",
        ),
        (
            serde_json::json!({"model_type": "llama", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}),
            "rope_scaling is set (type \"yarn\")",
        ),
        (
            serde_json::json!({"rope_scaling": {"type": "longrope"}}),
            "rope_scaling is set",
        ),
        (serde_json::json!({"hidden_size": 0}), "hidden_size is 0"),
        (
            serde_json::json!({"rms_norm_eps": -1.0}),
            "rms_norm_eps is -1",
        ),
        (
            serde_json::json!({"hidden_size": 8589934592u64}),
            "hidden_size is 8589934592, above 65536",
        ),
        (
            serde_json::json!({"num_attention_heads": 3}),
            "not a multiple",
        ),
        (
            serde_json::json!({"hidden_size": "wide"}),
            "is not a model config.json",
        ),
    ] {
        let d = tempfile::tempdir().unwrap();
        let m = model_folder(d.path(), changes.clone());
        let err = expect_usage_error(&["--model", m.to_str().unwrap(), "--weights", "random"]);
        assert!(
            err.contains(m.join("config.json").to_str().unwrap()) && err.contains(want),
            "{changes}: {err}"
        );
    }
    // A vocabulary smaller than the synthetic records' ids.
    let d = tempfile::tempdir().unwrap();
    let m = model_folder(d.path(), serde_json::json!({"vocab_size": 1000}));
    let err = expect_usage_error(&["--model", m.to_str().unwrap(), "--weights", "random"]);
    assert!(
        err.contains("dataset = synthetic")
            && err.contains("has only 1000 ids")
            && err.contains("Phi3 family's token ids (up to 32010)"),
        "{err}"
    );
    // A folder without config.json; a broken one.
    let d = tempfile::tempdir().unwrap();
    let err = expect_usage_error(&["--model", d.path().to_str().unwrap(), "--weights", "random"]);
    assert!(err.contains("config.json: does not exist"), "{err}");
    std::fs::write(d.path().join("config.json"), "{\"hidden_size\":").unwrap();
    let err = expect_usage_error(&["--model", d.path().to_str().unwrap(), "--weights", "random"]);
    assert!(err.contains("is not a model config.json"), "{err}");
}

/// Issue 16.4 and 16.11: a checkpoint's weight index that is broken, names a missing shard, or
/// names a file outside the model folder (`../../../../etc/passwd` used to be opened) is refused
/// before anything is read.
#[test]
fn weight_index_problems_are_usage_errors() {
    let d = tempfile::tempdir().unwrap();
    let m = model_folder(d.path(), serde_json::json!({}));
    let index = m.join("model.safetensors.index.json");
    for (text, want) in [
        (
            r#"{"weight_map":{"lm_head.weight":"../../../../etc/passwd"}}"#,
            "outside the model folder",
        ),
        (
            r#"{"weight_map":{"lm_head.weight":"/etc/passwd"}}"#,
            "outside the model folder",
        ),
        (r#"{"weight_map":"#, "is not valid JSON"),
        (r#"{"weight_map":{}}"#, "no weight_map"),
        (
            r#"{"weight_map":{"lm_head.weight":"model-00001.safetensors"}}"#,
            "model-00001.safetensors: does not exist",
        ),
    ] {
        std::fs::write(&index, text).unwrap();
        let err = expect_usage_error(&["--model", m.to_str().unwrap(), "--weights", "pretrained"]);
        assert!(err.contains(want), "{text}: {err}");
    }
    std::fs::remove_file(&index).unwrap();
    let err = expect_usage_error(&["--model", m.to_str().unwrap(), "--weights", "pretrained"]);
    assert!(
        err.contains("has no model.safetensors or model.safetensors.index.json"),
        "{err}"
    );
}

/// Runs with `--output-dir out` (plus the fast settings), expects exit 2 and returns stderr.
fn expect_refused_output_dir(out: &Path, extra: &[&str]) -> String {
    let args = fast_with(extra);
    let o = Command::new(bin())
        .args(&args)
        .arg("--output-dir")
        .arg(out)
        .output()
        .unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{}: {err}", out.display());
    assert!(err.contains("--output-dir"), "{err}");
    err
}

/// Issue 16.4: an output folder the run cannot write is refused before the data loads (it was
/// reported after, as "File exists (os error 17)"), and nothing is written.
#[test]
fn an_unusable_output_dir_is_refused_before_the_data_loads() {
    let d = tempfile::tempdir().unwrap();
    let file = d.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    let err = expect_refused_output_dir(&file, &[]);
    assert!(err.contains("is a file"), "{err}");
    let err = expect_refused_output_dir(&file.join("below"), &[]);
    assert!(err.contains("cannot be created"), "{err}");
    if Path::new("/proc/self").exists() {
        let err = expect_refused_output_dir(Path::new("/proc/ftb-out"), &[]);
        assert!(
            err.contains("/proc/ftb-out: cannot be created in /proc"),
            "{err}"
        );
    }
    #[cfg(unix)]
    {
        let link = d.path().join("dangling");
        std::os::unix::fs::symlink(d.path().join("gone"), &link).unwrap();
        let err = expect_refused_output_dir(&link, &[]);
        assert!(err.contains("which does not exist"), "{err}");
        assert!(
            !d.path().join("gone").exists(),
            "the link's target was not created"
        );
    }
    let runs_file = d.path().join("runs-is-a-file");
    std::fs::create_dir(&runs_file).unwrap();
    std::fs::write(runs_file.join("runs"), "x").unwrap();
    let err = expect_refused_output_dir(&runs_file, &[]);
    assert!(
        err.contains("where the run writes its run folders"),
        "{err}"
    );
    // Before the data: with a missing data file too, the folder is what is reported.
    let err = expect_refused_output_dir(&file, &["--dataset", "/no/such/data.jsonl"]);
    assert!(
        err.contains("a-file") && !err.contains("data.jsonl"),
        "{err}"
    );
    let left: Vec<_> = std::fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left.len(), 3, "only the test's own files: {left:?}");
    // An immutable folder, where the file system supports it and this process may set it.
    let imm = d.path().join("immutable");
    std::fs::create_dir(&imm).unwrap();
    let set = Command::new("chattr").arg("+i").arg(&imm).output();
    if set.as_ref().is_ok_and(|o| o.status.success()) {
        let err = expect_refused_output_dir(&imm, &[]);
        let _ = Command::new("chattr").arg("-i").arg(&imm).status();
        assert!(err.contains("cannot write there"), "{err}");
    } else {
        eprintln!("skipped the immutable folder: chattr +i is not possible here");
    }
}

/// Issue 16.4: `--nproc 2 --device cpu` made a run folder and exited 1 with a bad-value message.
/// Data parallelism runs NCCL between CUDA GPUs: any other device is refused up front.
#[test]
fn data_parallelism_off_cuda_is_a_usage_error() {
    let err = expect_usage_error(&["--nproc", "2"]);
    assert!(
        err.contains("nproc = 2") && err.contains("CUDA") && err.contains("--nproc 1"),
        "{err}"
    );
}

/// Issue 16.4 and 16.7: a dataset path that is a folder, or a FIFO (whose read blocks until a
/// writer comes: the run used to hang, deaf to SIGTERM), is refused up front.
#[test]
fn a_dataset_that_is_not_a_regular_file_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let tok = word_tokenizer(d.path(), Some(WORD_TEMPLATE));
    let tok = tok.to_str().unwrap();
    let folder = d.path().join("x.jsonl");
    std::fs::create_dir(&folder).unwrap();
    let err = expect_usage_error(&["--dataset", folder.to_str().unwrap(), "--tokenizer", tok]);
    assert!(
        err.contains("x.jsonl: is a folder, not a regular file"),
        "{err}"
    );
    #[cfg(unix)]
    {
        let fifo = d.path().join("pipe.jsonl");
        if Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .is_ok_and(|s| s.success())
        {
            let out = d.path().join("out");
            let args = fast_with(&["--dataset", fifo.to_str().unwrap(), "--tokenizer", tok]);
            let mut child = Command::new(bin())
                .args(&args)
                .arg("--output-dir")
                .arg(&out)
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
            while child.try_wait().unwrap().is_none() {
                if std::time::Instant::now() > deadline {
                    let _ = child.kill();
                    panic!("the run hangs on a FIFO");
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            let o = child.wait_with_output().unwrap();
            let err = stderr(&o);
            assert_eq!(o.status.code(), Some(2), "{err}");
            assert!(err.contains("named pipe (FIFO)"), "{err}");
            assert!(!out.exists());
        }
    }
}

/// Issue 16.5: Parquet columns are read as JSONL fields are: a `list<string>` or `int64` response
/// is named with its type (arrow used to cast them to text and train on it), and a binary column
/// with invalid UTF-8 is named as such (it was "missing field response").
#[test]
fn parquet_columns_that_are_not_text_are_named() {
    use arrow::array::{
        ArrayRef, BinaryArray, Int64Array, ListBuilder, StringArray, StringBuilder,
    };
    use std::sync::Arc;
    let write = |dir: &Path, response: ArrayRef| -> PathBuf {
        let p = dir.join("d.parquet");
        let batch = arrow::record_batch::RecordBatch::try_from_iter(vec![
            (
                "instruction",
                Arc::new(StringArray::from(vec!["What is a llama?", "Why?"])) as ArrayRef,
            ),
            ("response", response),
        ])
        .unwrap();
        let f = std::fs::File::create(&p).unwrap();
        let mut w = parquet::arrow::ArrowWriter::try_new(f, batch.schema(), None).unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
        p
    };
    let d = tempfile::tempdir().unwrap();
    let tok = word_tokenizer(d.path(), Some(WORD_TEMPLATE));
    let tok = tok.to_str().unwrap();
    let mut list = ListBuilder::new(StringBuilder::new());
    for _ in 0..2 {
        list.values().append_value("An animal.");
        list.append(true);
    }
    let cases: Vec<(ArrayRef, &str)> = vec![
        (Arc::new(list.finish()), "field \"response\" has type List"),
        (
            Arc::new(Int64Array::from(vec![1, 2])),
            "field \"response\" has type Int64, not a string",
        ),
        (
            Arc::new(BinaryArray::from(vec![&b"An animal."[..], &b"caf\xe9"[..]])),
            "(row 2): invalid UTF-8 at byte 3 in field \"response\"",
        ),
    ];
    for (response, want) in cases {
        let p = write(d.path(), response);
        let err = expect_usage_error(&["--dataset", p.to_str().unwrap(), "--tokenizer", tok]);
        assert!(err.contains(want), "{want}: {err}");
    }
}

/// Issue 16.6: an empty chat template used to reach libtorch as "cannot reshape tensor of 0
/// elements".
#[test]
fn an_empty_chat_template_is_a_usage_error() {
    let d = tempfile::tempdir().unwrap();
    let data = jsonl(d.path(), GOOD.as_bytes());
    for tpl in ["", "{# nothing #}"] {
        let t = word_tokenizer(&d.path().join("t"), Some(tpl));
        let err = expect_usage_error(&[
            "--dataset",
            data.to_str().unwrap(),
            "--tokenizer",
            t.to_str().unwrap(),
        ]);
        assert!(
            err.contains("tokenizer_config.json")
                && (err.contains("chat_template is empty")
                    || err.contains("renders the prompt as no tokens")),
            "{tpl:?}: {err}"
        );
    }
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

/// Issue 16.8: `--max-seq-len 8` kept no loss token in any record and reported a completed run
/// with "final loss 0.0000" and 0 tokens/s. A workload without loss tokens is refused.
#[test]
fn a_workload_without_loss_tokens_is_refused() {
    let err = expect_usage_error(&["--max-seq-len", "8", "--max-tokens-per-micro-batch", "64"]);
    assert!(
        err.contains("max_seq_len = 8")
            && err.contains("no record keeps a response token")
            && err.contains("--train-on-prompt"),
        "{err}"
    );
}

/// Issue 16.9: a UTF-8 byte-order mark (Windows editors write one) is not part of the first record;
/// it used to be "not valid JSON at line 1 column 1". The same for a TOML file and config.json.
#[test]
fn a_byte_order_mark_is_accepted() {
    let d = tempfile::tempdir().unwrap();
    let tok = word_tokenizer(d.path(), Some(WORD_TEMPLATE));
    let data = d.path().join("bom.jsonl");
    let mut bytes = b"\xef\xbb\xbf".to_vec();
    for _ in 0..8 {
        bytes.extend_from_slice(GOOD.as_bytes());
        bytes.push(b'\n');
    }
    std::fs::write(&data, bytes).unwrap();
    let toml = d.path().join("bom.toml");
    std::fs::write(&toml, "\u{feff}[workload.train]\nlr = 0.001\n").unwrap();
    let m = model_folder(d.path(), serde_json::json!({}));
    let config = std::fs::read_to_string(m.join("config.json")).unwrap();
    std::fs::write(m.join("config.json"), format!("\u{feff}{config}")).unwrap();
    let out = d.path().join("out");
    let o = run(
        &out,
        &[
            "--dataset",
            data.to_str().unwrap(),
            "--tokenizer",
            tok.to_str().unwrap(),
            "--config",
            toml.to_str().unwrap(),
            "--model",
            m.to_str().unwrap(),
            "--weights",
            "random",
            "--max-steps",
            "1",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let s = summary(&out);
    assert_eq!(s.workload.data.records_used, 8);
    assert_eq!(s.workload.config.train.lr, 0.001);
}

/// Issue 16.11 and the done criterion: every `FTB_*` testing hook that cannot parse its value stops
/// the run with exit 2 naming the variable and the value (`FTB_INJECT_OOM_AT_STEP=abc` used to be
/// ignored silently).
#[test]
fn testing_hooks_reject_values_they_cannot_parse() {
    for (var, value) in [
        ("FTB_INJECT_OOM_AT_STEP", "abc"),
        ("FTB_INJECT_OOM_AT_STEP", "-1"),
        ("FTB_ASSUME_FREE_MEMORY_BYTES", "lots"),
        ("FTB_ASSUME_TOTAL_MEMORY_BYTES", "1.5e9"),
        ("FTB_FAULT", "1:exit"),
        ("FTB_FAULT", "1:2:explode"),
        ("FTB_PROFILE", "maybe"),
        ("FTB_HOST_INIT", "2"),
        ("FTB_DEBUG_PANICS", "verbose"),
        ("FTB_ATTENTION", "fastest"),
        ("FTB_HEAD_CHUNK_TOKENS", "0"),
        ("FTB_HEAD_CHUNK_TOKENS", "1k"),
        ("FTB_LATE_INPUTS", "sometimes"),
    ] {
        let d = tempfile::tempdir().unwrap();
        let mut args: Vec<&str> = FAST.to_vec();
        args.extend_from_slice(&["--output-dir", d.path().to_str().unwrap()]);
        let o = Command::new(bin())
            .args(&args)
            .env(var, value)
            .output()
            .unwrap();
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{var}={value}: {err}");
        assert!(
            err.contains(var) && err.contains(value),
            "{var}={value}: {err}"
        );
        assert_nothing_written(d.path());
    }
}
