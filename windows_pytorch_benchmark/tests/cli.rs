//! End-to-end runs of the real binary on the tiny model.

mod common;
use common::*;

#[test]
fn each_strategy_writes_a_complete_valid_summary() {
    for strategy in ["last-n", "full", "lora"] {
        let d = tempfile::tempdir().unwrap();
        let o = run(d.path(), &["--strategy", strategy]);
        assert!(o.status.success(), "{strategy}: {}", stderr(&o));
        let s = summary(d.path());
        assert_eq!(s.status, shared::summary::Status::Completed);
        assert_eq!(s.backend.framework, "pytorch");
        assert_eq!(s.metrics.steps, 3);
        assert_eq!(s.metrics.warmup_steps + s.metrics.steady_steps, 3);
        assert!(s.metrics.tokens_per_s.unwrap() > 0.0);
        assert!(s.metrics.final_loss.unwrap().is_finite());
        // Every key the issue names is present in the JSON.
        let v: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(d.path().join("benchmark_summary.json")).unwrap(),
        )
        .unwrap();
        for k in [
            "schema_version",
            "status",
            "run",
            "workload",
            "backend",
            "hardware",
            "software",
            "metrics",
            "notes",
        ] {
            assert!(v.get(k).is_some(), "missing {k}");
        }
        for k in ["framework", "device", "dtype", "world_size"] {
            assert!(v["backend"].get(k).is_some(), "missing backend.{k}");
        }
        for k in [
            "total_s",
            "load_s",
            "warmup_s",
            "steady_s",
            "steps",
            "samples",
            "loss_tokens",
            "input_tokens",
            "padded_tokens",
            "tokens_per_s",
            "input_tokens_per_s",
            "samples_per_s",
            "step_time_s",
            "flops_per_input_token",
            "model_tflops_per_s",
            "mfu",
            "memory",
            "final_loss",
        ] {
            assert!(v["metrics"].get(k).is_some(), "missing metrics.{k}");
        }
        for k in ["median", "p10", "p90", "mean", "stdev"] {
            assert!(
                v["metrics"]["step_time_s"].get(k).is_some(),
                "missing step_time_s.{k}"
            );
        }
        assert!(v["workload"]["hash"].as_str().unwrap().len() == 64);
        assert!(
            s.notes.iter().any(|n| n.contains("synthetic")),
            "notes say what was synthetic"
        );
        // The run folder keeps the same summary and one log line per step.
        let run_dir = d.path().join(&s.run.run_dir);
        let steps = shared::files::read_steps(&run_dir).unwrap();
        assert_eq!(steps.len(), 3);
        for k in [
            "step",
            "loss",
            "lr",
            "step_time_s",
            "loss_tokens",
            "input_tokens",
            "padded_tokens",
        ] {
            assert!(steps[0].get(k).is_some(), "steps.jsonl lacks {k}");
        }
        // Trainable counts follow the strategy.
        let p = s.workload.parameters;
        match strategy {
            "full" => assert_eq!(p.trainable, p.total),
            "lora" => assert!(p.trainable < p.total / 10),
            _ => assert!(p.trainable < p.total && p.trainable > p.total / 4),
        }
    }
}

#[test]
fn runs_are_never_overwritten() {
    let d = tempfile::tempdir().unwrap();
    assert!(run(d.path(), &[]).status.success());
    assert!(run(d.path(), &[]).status.success());
    let runs: Vec<_> = std::fs::read_dir(d.path().join("runs")).unwrap().collect();
    assert_eq!(runs.len(), 2);
}

#[test]
fn bad_input_exits_2_naming_the_value_before_loading() {
    let d = tempfile::tempdir().unwrap();
    let o = run(d.path(), &["--last-n", "7"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("last_n") && stderr(&o).contains("--last-n 2"),
        "{}",
        stderr(&o)
    );
    let o = run(d.path(), &["--dataset", "/nonexistent/dolly.jsonl"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("/nonexistent/dolly.jsonl"),
        "{}",
        stderr(&o)
    );
    let o = std::process::Command::new(bin())
        .args(["--strategy", "half"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("half") && stderr(&o).contains("last-n"),
        "{}",
        stderr(&o)
    );
    assert!(
        !d.path().join("runs").exists(),
        "nothing written for bad input"
    );
}

/// Same records per step, same loss: the padded, bucketed and packed plans compute the same
/// per-step losses in fp32 (packing keeps documents apart; padding never reaches real tokens).
#[test]
fn padded_bucketed_and_packed_plans_give_the_same_losses() {
    let mut curves = Vec::new();
    for plan in ["padded", "bucketed", "packed"] {
        let d = tempfile::tempdir().unwrap();
        let o = run(d.path(), &["--batch-plan", plan, "--strategy", "full"]);
        assert!(o.status.success(), "{plan}: {}", stderr(&o));
        curves.push((plan, losses(d.path())));
    }
    let (_, base) = &curves[0];
    for (plan, c) in &curves[1..] {
        for (a, b) in base.iter().zip(c) {
            assert!(
                (a - b).abs() / a.abs() < 1e-4,
                "{plan}: {c:?} vs padded {base:?}"
            );
        }
    }
}

#[test]
fn seed_preset_reproduces_the_seed_configuration() {
    let d = tempfile::tempdir().unwrap();
    // The seed preset is phi-3-mini; check the plan it makes without loading the model, by
    // pointing it at the tiny shape and a single step.
    let o = std::process::Command::new(bin())
        .args([
            "--preset",
            "seed",
            "--model",
            "tiny",
            "--weights",
            "random",
            "--dataset",
            "synthetic",
            "--samples",
            "4",
            "--max-steps",
            "1",
            "--device",
            "cpu",
            "--quiet",
            "--output-dir",
        ])
        .arg(d.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let s = summary(d.path());
    let w = &s.workload.config;
    assert_eq!(w.strategy.kind, shared::config::StrategyKind::Full);
    assert_eq!(
        (w.batch.micro_batch_size, w.batch.grad_accum, w.data.pad_to),
        (1, 4, Some(2048))
    );
    assert_eq!(s.metrics.padded_tokens, 4 * 2048);
    assert!(w.data.train_on_prompt);
    assert_eq!(s.backend.dtype, "bf16");
}

/// Ctrl-C mid-training: the run stops after the current step, writes a valid summary with
/// `status: interrupted` and what it measured, and exits 130.
#[cfg(unix)]
#[test]
fn sigint_writes_an_interrupted_summary() {
    let d = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(bin())
        .args([
            "--preset",
            "tiny",
            "--device",
            "cpu",
            "--quiet",
            "--samples",
            "2000",
            "--output-dir",
        ])
        .arg(d.path())
        .spawn()
        .unwrap();
    wait_for_first_step(d.path());
    let kill = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    let s = summary(d.path());
    assert_eq!(s.status, shared::summary::Status::Interrupted);
    assert!(s.metrics.steps >= 1 && s.metrics.steps < 125);
    assert!(s.error.unwrap().message.contains("interrupted"));
}

/// The real loading path end to end: a Phi-3 checkpoint (config.json + safetensors), a local dolly
/// JSONL and the Phi-3 tokenizer, all from files; nothing synthetic.
#[test]
fn real_checkpoint_jsonl_and_tokenizer_from_local_files() {
    let Some(shared_dir) = shared_dir() else {
        eprintln!("skipped: ../shared/tokenizers/phi-3 is absent (the Phi-3 tokenizer beside the repository)");
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let model = d.path().join("tiny-phi3");
    shared::model::write_checkpoint(&model, &shared::model::ModelShape::tiny(), 11).unwrap();
    let data = d.path().join("dolly.jsonl");
    let mut lines = String::new();
    for i in 0..12 {
        let ctx = if i % 3 == 0 {
            "Some context passage about the topic."
        } else {
            ""
        };
        lines.push_str(&serde_json::json!({"instruction": format!("Question number {i}?"), "context": ctx, "response": format!("Answer {i}, in a few words."), "category": "open_qa"}).to_string());
        lines.push('\n');
    }
    std::fs::write(&data, lines).unwrap();
    let out = d.path().join("out");
    let o = std::process::Command::new(bin())
        .args([
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--quiet",
            "--weights",
            "pretrained",
            "--last-n",
            "1",
            "--micro-batch-size",
            "2",
            "--grad-accum",
            "2",
            "--max-steps",
            "2",
        ])
        .arg("--model")
        .arg(&model)
        .arg("--dataset")
        .arg(&data)
        .arg("--tokenizer")
        .arg(shared_dir.join("tokenizers/phi-3"))
        .arg("--output-dir")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let s = summary(&out);
    assert_eq!(s.metrics.steps, 2);
    assert!(!s.workload.data.synthetic);
    assert_eq!(s.workload.data.records_used, 12);
    assert!(s
        .workload
        .data
        .tokenizer
        .as_deref()
        .unwrap()
        .contains("phi-3"));
    assert_eq!(s.workload.model_shape.num_layers, 2);
    assert!(
        !s.notes
            .iter()
            .any(|n| n.contains("synthetic") || n.contains("random initialisation")),
        "{:?}",
        s.notes
    );
    // A randomly initialised model over the real vocabulary starts near ln(32064).
    assert!((s.metrics.first_loss.unwrap() - 32_064f64.ln()).abs() < 0.1);
}

/// The telemetry sampler over a real run: the series in the run folder, phases in order, the
/// host's figures, and the summary's `metrics.telemetry` made from that same series.
#[test]
fn telemetry_is_sampled_into_the_run_folder_and_summarized() {
    use shared::measure::telemetry::{read_series, Phase};
    let d = tempfile::tempdir().unwrap();
    let o = run(d.path(), &["--telemetry-interval-ms", "50"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let s = summary(d.path());
    let t = s.metrics.telemetry.as_ref().expect("metrics.telemetry");
    let run_dir = d.path().join(&s.run.run_dir);
    let series = read_series(&run_dir.join("telemetry.jsonl")).expect("telemetry.jsonl");
    assert_eq!(
        series.len(),
        t.samples,
        "the summary counts the file's samples"
    );
    assert!(
        t.samples >= 2,
        "a sample before the first phase and one after the last"
    );
    assert_eq!(
        (t.interval_ms, t.file.as_deref()),
        (50, Some("telemetry.jsonl"))
    );
    let first = &series[0];
    let last = series.last().unwrap();
    assert_eq!(first.phase, Phase::Load);
    assert_eq!((last.phase, last.steps_done), (Phase::Finish, 3));
    let order = |p: Phase| {
        [Phase::Load, Phase::Warmup, Phase::Steady, Phase::Finish]
            .iter()
            .position(|q| *q == p)
            .unwrap()
    };
    assert!(
        series
            .windows(2)
            .all(|w| order(w[0].phase) <= order(w[1].phase) && w[0].t_s <= w[1].t_s),
        "phases and times only move forward"
    );
    let (a, b) = (t.steady_start_s.unwrap(), t.steady_end_s.unwrap());
    assert!(
        a < b && b <= last.t_s,
        "steady window {a}..{b} inside the series"
    );
    // The host is sampled everywhere.
    let cpu = t
        .devices
        .iter()
        .find(|d| d.id == "cpu")
        .expect("the cpu device");
    let rss = cpu.process_rss_gib_peak.unwrap();
    assert!(rss > 0.01 && rss < 64.0, "peak RSS {rss} GiB");
    assert!(series
        .iter()
        .filter_map(|x| x.cpu.as_ref()?.process_cpu_cores)
        .any(|c| c > 0.0));
    // A CPU run has no energy reading: null, with the reason where the report looks for it.
    assert_eq!(t.joules_per_1k_tokens, None);
    assert!(
        s.notes
            .iter()
            .any(|n| n.starts_with("joules_per_1k_tokens: null:") && n.contains("CPU run")),
        "{:?}",
        s.notes
    );
    let raw: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(d.path().join("benchmark_summary.json")).unwrap(),
    )
    .unwrap();
    assert!(raw
        .pointer("/metrics/telemetry/joules_per_1k_tokens")
        .is_some());
    assert!(
        t.sampler_cost_ms.unwrap().mean < 50.0,
        "a tick costs well under its interval"
    );
}

#[test]
fn telemetry_off_starts_nothing_and_a_bad_interval_exits_2() {
    let d = tempfile::tempdir().unwrap();
    let o = run(d.path(), &["--telemetry-interval-ms", "0"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let s = summary(d.path());
    assert!(s.metrics.telemetry.is_none());
    assert!(!d
        .path()
        .join(&s.run.run_dir)
        .join("telemetry.jsonl")
        .exists());
    assert!(s
        .notes
        .iter()
        .any(|n| n.contains("--telemetry-interval-ms 0")));
    let o = run(d.path(), &["--telemetry-interval-ms", "7"]);
    assert_eq!(o.status.code(), Some(2));
    let e = stderr(&o);
    assert!(
        e.contains("telemetry_interval_ms = 7") && e.contains("--telemetry-interval-ms 200"),
        "{e}"
    );
}
