//! Helpers for the end-to-end tests: run the real binary into a temporary folder.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_windows_pytorch_benchmark"))
}

/// Small, fast tiny-model settings: 3 steps of 8 short records.
pub const FAST: &[&str] = &[
    "--preset",
    "tiny",
    "--device",
    "cpu",
    "--dtype",
    "float32",
    "--quiet",
    "--samples",
    "24",
    "--micro-batch-size",
    "4",
    "--grad-accum",
    "2",
    "--max-seq-len",
    "256",
    "--max-tokens-per-micro-batch",
    "1024",
    "--max-steps",
    "3",
];

/// [`FAST`] without the flags `extra` sets itself (a flag may be given once), then `extra`.
pub fn fast_with<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = Vec::new();
    let mut i = 0;
    while i < FAST.len() {
        let flag = FAST[i];
        let takes_value = FAST.get(i + 1).is_some_and(|v| !v.starts_with("--"));
        if !extra.contains(&flag) {
            args.push(flag);
            if takes_value {
                args.push(FAST[i + 1]);
            }
        }
        i += if takes_value { 2 } else { 1 };
    }
    args.extend_from_slice(extra);
    args
}

pub fn run(out: &Path, extra: &[&str]) -> Output {
    let mut args = fast_with(extra);
    let o = out.to_str().expect("utf-8 temp path");
    args.extend_from_slice(&["--output-dir", o]);
    Command::new(bin())
        .args(&args)
        .output()
        .expect("binary runs")
}

pub fn summary(out: &Path) -> shared::summary::Summary {
    shared::summary::Summary::read(&out.join("benchmark_summary.json")).expect("a valid summary")
}

pub fn losses(out: &Path) -> Vec<f64> {
    summary(out).metrics.loss_curve
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The repository's ../shared folder (beside the checkout), if present.
pub fn shared_dir() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared");
    p.join("tokenizers/phi-3/tokenizer.json")
        .exists()
        .then_some(p)
}

/// Waits (at most 120 s) until a run under `out` has logged its first step.
pub fn wait_for_first_step(out: &Path) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while shared::files::steps_logged(out) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no step logged within 120 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// A word-level tokenizer folder written by the test (no files from outside needed), with `template`
/// as its chat template: `{{ bos_token }}` then `user <text> bot ` per user turn and `<text> |` per
/// assistant turn renders the prompt as a prefix of the conversation, as Phi-3's does.
pub fn word_tokenizer(dir: &Path, template: Option<&str>) -> PathBuf {
    let t = dir.join("tokenizer");
    std::fs::create_dir_all(&t).unwrap();
    let vocab = serde_json::json!({"<unk>":0,"<s>":1,"user":2,"bot":3,"|":4,"What":5,"is":6,"a":7,"llama?":8,"An":9,"animal.":10});
    let tj = serde_json::json!({
        "version":"1.0","truncation":null,"padding":null,
        "added_tokens":[{"id":1,"content":"<s>","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true}],
        "normalizer":null,"pre_tokenizer":{"type":"Whitespace"},"post_processor":null,"decoder":null,
        "model":{"type":"WordLevel","vocab":vocab,"unk_token":"<unk>"}
    });
    std::fs::write(t.join("tokenizer.json"), tj.to_string()).unwrap();
    let mut cfg = serde_json::json!({"bos_token":"<s>","eos_token":"|"});
    if let Some(tpl) = template {
        cfg["chat_template"] = tpl.into();
    }
    std::fs::write(t.join("tokenizer_config.json"), cfg.to_string()).unwrap();
    t
}

/// The chat template [`word_tokenizer`] uses by default.
pub const WORD_TEMPLATE: &str = "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}user {{ m['content'] }} bot {% else %}{{ m['content'] }} |{% endif %}{% endfor %}";

/// A model folder holding the tiny preset's `config.json` with `changes` merged over it (no
/// weights: use with `--weights random`).
pub fn model_folder(dir: &Path, changes: serde_json::Value) -> PathBuf {
    let m = dir.join("model");
    std::fs::create_dir_all(&m).unwrap();
    let mut c = shared::model::ModelShape::tiny().to_config_json();
    for (k, v) in changes.as_object().expect("an object of changes") {
        c[k] = v.clone();
    }
    std::fs::write(m.join("config.json"), c.to_string()).unwrap();
    m
}

/// Every `benchmark_summary.json` under `dir`.
pub fn summaries_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.file_name().is_some_and(|n| n == "benchmark_summary.json") {
                out.push(p);
            }
        }
    }
    out
}
