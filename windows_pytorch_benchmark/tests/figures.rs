//! Figures that mean what they say, through the real binary: the default step size and the
//! warm-up split (`--plan`), the `steady:` note of short runs, the memory figures of a CPU run,
//! FLOPs per input token, repeats, calibration in the run's precision, micro-batches without loss
//! tokens, and what a summary reports about each.

mod common;
use common::*;

use std::process::Command;

use shared::summary::{Status, Summary};

/// The tiny preset on the CPU; each test adds its records, step size and step count.
fn go(out: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(bin())
        .args(["--preset", "tiny", "--device", "cpu", "--quiet"])
        .args(args)
        .arg("--output-dir")
        .arg(out)
        .output()
        .expect("binary runs")
}

/// 24 records, 4 x 2 per step.
const SMALL: [&str; 6] = [
    "--samples",
    "24",
    "--micro-batch-size",
    "4",
    "--grad-accum",
    "2",
];

fn small<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut v: Vec<&'a str> = SMALL.to_vec();
    v.extend_from_slice(extra);
    v
}

fn plan(extra: &[&str]) -> String {
    let o = Command::new(bin())
        .args(["--plan", "--weights", "random", "--dataset", "synthetic"])
        .args(extra)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The words of the plan line `plan ...: N steps of R records (M x G), K micro-batches; ...`.
fn plan_words(plan: &str) -> Vec<&str> {
    let line = plan
        .lines()
        .find(|l| l.starts_with("plan "))
        .expect("a plan line");
    line.split_whitespace().collect()
}

/// `N` of the plan line, and R.
fn steps_and_records(plan: &str) -> (usize, usize) {
    let words = plan_words(plan);
    let at = words.iter().position(|w| *w == "steps").unwrap();
    (
        words[at - 1].parse().unwrap(),
        words[at + 2].parse().unwrap(),
    )
}

/// `K` of the plan line.
fn micro_batches(plan: &str) -> usize {
    let words = plan_words(plan);
    let at = words
        .iter()
        .position(|w| w.starts_with("micro-batches"))
        .unwrap();
    words[at - 1].parse().unwrap()
}

/// The default fast run (100 records) is planned in at least 11 steps, so its steady figures rest
/// on at least 10; 4,096 records and `--mode full` keep 8 x 8 = 64 records per step; explicit
/// flags win. (`--weights random --dataset synthetic` only because this machine has no hub
/// access: the step plan depends on the record count alone.)
#[test]
fn the_default_fast_plan_has_at_least_11_steps() {
    let p = plan(&[]);
    let (steps, records) = steps_and_records(&p);
    assert!(steps >= 11, "{p}");
    assert_eq!((steps, records), (13, 8), "{p}");
    assert!(
        p.contains("timing: 1 warm-up step(s) + 12 steady step(s)"),
        "{p}"
    );
    assert!(p.contains("batch: 8 records per step (8 x 1)"), "{p}");
    for full in [&["--samples", "4096"][..], &["--mode", "full"]] {
        let p = plan(full);
        assert_eq!(steps_and_records(&p).1, 64, "{full:?}: {p}");
        assert!(!p.lines().any(|l| l.starts_with("batch: ")), "{p}");
    }
    let p = plan(&["--micro-batch-size", "8", "--grad-accum", "8"]);
    assert_eq!(steps_and_records(&p), (2, 64), "{p}");
    assert!(
        p.contains("timing: 1 warm-up step(s) + 1 steady step(s) (fewer than 5"),
        "{p}"
    );
}

/// A 2-step run warns and notes that its steady figures rest on one step; a 1-step run has null
/// steady figures (never its cold step's) and says why.
#[test]
fn short_runs_say_their_steady_figures_are_unreliable() {
    let d = tempfile::tempdir().unwrap();
    let o = go(d.path(), &small(&["--max-steps", "2"]));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("warning: this run has 2 step(s), 1 of them warm-up: 1 steady"),
        "{}",
        stderr(&o)
    );
    let s = summary(d.path());
    assert_eq!((s.metrics.warmup_steps, s.metrics.steady_steps), (1, 1));
    assert!(
        s.notes
            .iter()
            .any(|n| n.starts_with("steady: only 1 steady step")),
        "{:?}",
        s.notes
    );
    let d = tempfile::tempdir().unwrap();
    let o = go(d.path(), &small(&["--max-steps", "1"]));
    assert!(o.status.success(), "{}", stderr(&o));
    let s = summary(d.path());
    let m = &s.metrics;
    assert_eq!((m.steps, m.warmup_steps, m.steady_steps), (1, 1, 0));
    assert_eq!(m.steady_s, 0.0);
    assert!(m.warmup_s > 0.0);
    assert_eq!(m.tokens_per_s, None);
    assert_eq!(m.input_tokens_per_s, None);
    assert_eq!(m.step_time_s, None);
    assert_eq!(m.model_tflops_per_s, None);
    assert_eq!(m.flops_per_input_token, None);
    assert!(
        s.notes.iter().any(|n| n.starts_with("steady: null:")),
        "{:?}",
        s.notes
    );
}

/// A CPU run: no device figures (each null with the reason), the host's peak RSS in its own
/// field, the estimate kept with the reason it has no error; the per-input-token FLOPs times the
/// input throughput is the model FLOP rate; the load is timed.
#[test]
fn a_cpu_run_names_each_memory_figure_and_its_flops_per_input_token() {
    let d = tempfile::tempdir().unwrap();
    let o = go(
        d.path(),
        &[
            "--samples",
            "48",
            "--micro-batch-size",
            "4",
            "--grad-accum",
            "2",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let s = summary(d.path());
    let mem = &s.metrics.memory;
    assert_eq!(mem.device_peak_allocated_gib, None);
    assert!(
        mem.device_peak_allocated_source
            .contains("no allocation statistics for the CPU"),
        "{}",
        mem.device_peak_allocated_source
    );
    assert_eq!(mem.device_peak_reserved_gib, None);
    assert_eq!(mem.device_process_peak_gib, None);
    assert!(
        mem.device_process_peak_source.contains("a CPU run"),
        "{}",
        mem.device_process_peak_source
    );
    let rss = mem.process_peak_rss_gib.unwrap();
    assert!(rss > 0.05 && rss < 64.0, "{rss}");
    assert!(
        mem.process_peak_rss_source.contains("resident set"),
        "{}",
        mem.process_peak_rss_source
    );
    assert!(mem.estimated_peak_bytes.is_some() && mem.estimate.is_some());
    assert_eq!(mem.estimate_error, None);
    assert!(s
        .notes
        .iter()
        .any(|n| n.starts_with("memory.estimate_error: null:")));
    let m = &s.metrics;
    let rate = m.flops_per_input_token.unwrap() * m.input_tokens_per_s.unwrap() / 1e12;
    assert!(
        (rate / m.model_tflops_per_s.unwrap() - 1.0).abs() < 1e-9,
        "{rate} vs {:?}",
        m.model_tflops_per_s
    );
    assert!(m.model_load_s > 0.0 && m.load_s >= m.model_load_s);
    assert!(m.total_s >= m.startup_s + m.load_s + m.warmup_s + m.steady_s);
}

/// `--repeats 2`: every repeat counts the time before the first build (measured once), keeps its
/// own memory figures, and the summary says what the process keeps between repeats.
#[test]
fn repeats_count_the_same_things_and_keep_their_own_memory() {
    let d = tempfile::tempdir().unwrap();
    let o = go(d.path(), &small(&["--max-steps", "3", "--repeats", "2"]));
    assert!(o.status.success(), "{}", stderr(&o));
    let top = summary(d.path());
    let reps = top.repeats.as_ref().expect("repeats");
    assert_eq!(reps.count, 2);
    let run_dir = d.path().join(&top.run.run_dir);
    let each: Vec<Summary> = (1..=2)
        .map(|k| {
            Summary::read(
                &run_dir
                    .join(format!("repeat-{k}"))
                    .join("benchmark_summary.json"),
            )
            .unwrap()
        })
        .collect();
    let (a, b) = (&each[0].metrics, &each[1].metrics);
    assert_eq!(a.data_s, b.data_s, "data preparation, measured once");
    assert_eq!(a.startup_s, b.startup_s);
    assert!(a.data_s > 0.0);
    for (k, s) in each.iter().enumerate() {
        let m = &s.metrics;
        assert!(
            m.total_s >= m.startup_s + m.data_s + m.model_load_s + m.warmup_s + m.steady_s,
            "repeat {}: {m:?}",
            k + 1
        );
        let r = &reps.runs[k];
        assert_eq!(r.total_s, m.total_s);
        assert_eq!(r.process_peak_rss_gib, m.memory.process_peak_rss_gib);
        assert_eq!(
            r.device_peak_allocated_gib,
            m.memory.device_peak_allocated_gib
        );
    }
    let median = &each[reps.median_repeat - 1];
    assert_eq!(
        top.metrics.memory, median.metrics.memory,
        "the median's own"
    );
    assert_eq!(top.metrics.loss_curve, median.metrics.loss_curve);
    let note = top
        .notes
        .iter()
        .find(|n| n.starts_with("repeats:"))
        .unwrap();
    assert!(
        note.contains("what persists") && note.contains("CUDA context"),
        "{note}"
    );
}

/// `--calibrate` measures the matrix-product peak in the run's own precision.
#[test]
fn calibration_runs_in_the_runs_precision() {
    for (dtype, want) in [
        ("float32", "fp32"),
        ("bf16", "bf16"),
        ("mixed-bf16", "bf16"),
    ] {
        let d = tempfile::tempdir().unwrap();
        let o = go(
            d.path(),
            &small(&["--max-steps", "2", "--calibrate", "--dtype", dtype]),
        );
        assert!(o.status.success(), "{dtype}: {}", stderr(&o));
        let s = summary(d.path());
        assert_eq!(s.backend.dtype, dtype);
        assert_eq!(
            s.metrics.measured_peak_precision.as_deref(),
            Some(want),
            "{dtype}"
        );
        let t = s.metrics.measured_peak_tflops.unwrap();
        assert!(t > 0.0 && t < 1e4, "{t}");
        assert!(s.metrics.mfu_measured.is_some());
    }
}

/// Micro-batches without loss tokens (records whose response was cut off) are not run, and the
/// FLOPs count only what ran: the summary's FLOPs are shared's count over the computed records.
#[test]
fn micro_batches_without_loss_tokens_are_skipped_and_not_counted() {
    use shared::config::{CliArgs, Config, Framework, TuningMode};
    use shared::measure::flops::step_flops;
    let args = [
        "--max-seq-len",
        "40",
        "--batch-plan",
        "padded",
        "--micro-batch-size",
        "1",
        "--grad-accum",
        "4",
        "--samples",
        "40",
        "--max-steps",
        "6",
    ];
    let d = tempfile::tempdir().unwrap();
    let o = go(d.path(), &args);
    assert!(o.status.success(), "{}", stderr(&o));
    let s = summary(d.path());
    // The same plan, prepared here.
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: CliArgs,
    }
    let cli = <Cli as clap::Parser>::try_parse_from(&s.run.command_line).unwrap();
    let cfg = Config::resolve(TuningMode::Fast, &cli.args, Framework::Pytorch).unwrap();
    let p = shared::workload::prepare(&cfg).unwrap();
    assert_eq!(p.hash, s.workload.hash);
    let steps = shared::files::read_steps(&d.path().join(&s.run.run_dir)).unwrap();
    let mut skipped = 0;
    for (line, step) in steps.iter().zip(&p.steps) {
        let with_loss = step
            .micro_batches
            .iter()
            .filter(|m| m.loss_tokens > 0)
            .count();
        assert_eq!(line["micro_batches_run"].as_u64(), Some(with_loss as u64));
        skipped += step.micro_batches.len() - with_loss;
    }
    assert!(
        skipped > 0,
        "the test needs micro-batches without loss tokens"
    );
    let warmup = s.metrics.warmup_steps;
    let steady_flops: f64 = p.steps[warmup..s.metrics.steps]
        .iter()
        .map(|st| {
            step_flops(
                &p.shape,
                &cfg.workload.strategy,
                &st.computed_doc_lengths,
                st.loss_tokens,
            )
        })
        .sum();
    let reported = s.metrics.flops_per_input_token.unwrap() * s.metrics.steady_input_tokens as f64;
    assert!((reported / steady_flops - 1.0).abs() < 1e-9);
    let all_records: f64 = p.steps[warmup..s.metrics.steps]
        .iter()
        .map(|st| {
            step_flops(
                &p.shape,
                &cfg.workload.strategy,
                &st.doc_lengths,
                st.loss_tokens,
            )
        })
        .sum();
    assert!(
        reported < all_records,
        "the skipped records are not counted"
    );
    assert!(
        !s.notes.iter().any(|n| n.starts_with("flops:")),
        "{:?}",
        s.notes
    );
    assert_eq!(s.status, Status::Completed);
}

/// Issue 15: the LM head and the loss run in chunks of loss positions, each with its backward
/// (`Decoder::head_loss_chunked`). tiny-qwen3 has Qwen3's 151,936-token vocabulary and two small
/// blocks, so at 2,513 loss positions per micro-batch the head's fp32 logits are most of its peak:
/// in chunks of 1,024 (the default) the run peaks far lower than with every loss position in one
/// chunk (`FTB_HEAD_CHUNK_TOKENS`), with the same losses, and the estimate counts one chunk.
/// Measured here on 2026-12-05: 2.95 against 6.32 GiB RSS (the step before the head was
/// chunked, one graph from the loss: 4.89).
#[test]
fn the_chunked_head_lowers_the_peak_of_a_large_vocabulary() {
    let run = |one_chunk: bool| {
        let d = tempfile::tempdir().unwrap();
        let mut c = Command::new(bin());
        c.args(["--preset", "tiny", "--device", "cpu", "--quiet"])
            .args([
                "--model",
                "tiny-qwen3",
                "--samples",
                "128",
                "--max-steps",
                "2",
            ])
            .args(["--max-tokens-per-micro-batch", "16384", "--output-dir"])
            .arg(d.path());
        if one_chunk {
            c.env("FTB_HEAD_CHUNK_TOKENS", "1000000");
        }
        let o = c.output().expect("binary runs");
        assert!(o.status.success(), "{}", stderr(&o));
        let s = summary(d.path());
        let head = s.metrics.memory.estimate.as_ref().unwrap().head_bytes;
        let rss = s.metrics.memory.process_peak_rss_gib.unwrap();
        (rss, head, s.metrics.loss_curve)
    };
    let (rss0, _, l0) = run(true);
    let (rss1, head, l1) = run(false);
    eprintln!(
        "peak RSS {rss1:.2} GiB in chunks, {rss0:.2} in one chunk; estimated head {head} bytes"
    );
    assert!(rss1 < 0.75 * rss0, "{rss1:.2} GiB against {rss0:.2}");
    // One chunk of 1,024 positions' fp32 logits and their gradients (12 bytes a logit), and the
    // small hidden states: not the 2,513 positions' 4.3 GiB.
    let one_chunk = shared::measure::memory::HEAD_CHUNK_TOKENS as u64 * 12 * 151_936;
    assert!(
        head < one_chunk + one_chunk / 10,
        "{head} against {one_chunk}"
    );
    assert_eq!(l0.len(), l1.len());
    for (a, b) in l0.iter().zip(&l1) {
        assert!(
            (a - b).abs() <= 1e-5 * a.abs(),
            "losses {l0:?} against {l1:?}"
        );
    }
}

/// The step copies every micro-batch's inputs to the device when it starts (a copy from pageable
/// memory waits for the CUDA stream, so one made after a micro-batch's backward would drain the
/// queue); `FTB_LATE_INPUTS=1` copies each just before its forward pass, as before. The same
/// inputs reach the same micro-batches either way: with 9-12 micro-batches per step, the losses
/// are identical to the last bit (an input given to the wrong micro-batch changes them).
#[test]
fn inputs_copied_when_the_step_starts_train_the_same() {
    let args = [
        "--preset",
        "tiny",
        "--samples",
        "64",
        "--max-tokens-per-micro-batch",
        "512",
    ];
    let run = |late: bool| {
        let d = tempfile::tempdir().unwrap();
        let mut c = Command::new(bin());
        c.args(args)
            .args(["--device", "cpu", "--quiet", "--output-dir"])
            .arg(d.path());
        if late {
            c.env("FTB_LATE_INPUTS", "1");
        }
        let o = c.output().expect("binary runs");
        assert!(o.status.success(), "{}", stderr(&o));
        let s = summary(d.path());
        assert_eq!(s.status, Status::Completed);
        s.metrics.loss_curve
    };
    let (early, late) = (run(false), run(true));
    assert!(early.len() >= 4, "{early:?}");
    assert_eq!(early, late);
    // Several micro-batches per step (the plan line: "4 steps of 16 records (4 x 4), 42
    // micro-batches; ..."), or the order of the copies would not matter.
    let plan = plan(&args);
    let (steps, _) = steps_and_records(&plan);
    assert!(micro_batches(&plan) >= 2 * steps, "{plan}");
}
