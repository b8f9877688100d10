//! `--fit`: what fits where. For every built-in model, strategy and activation checkpointing off
//! and on, the largest micro-batch token budget whose memory estimate (this binary's: the same
//! function the preflight checks a run with) fits each common device size, with its estimate.
//! The records are the run's own (its dataset, tokenized for its model), laid out by the token
//! budget plan; every figure is an estimate, and says so.

use crate::config::{BatchPlanKind, Config, Framework, ModelPreset, StrategyConfig, StrategyKind};
use crate::data::batch::Step;
use crate::data::Sample;
use crate::measure::memory::MemoryEstimate;
use crate::model::ModelShape;

const GIB: f64 = (1u64 << 30) as f64;

/// A device size the table asks about: its label and the bytes a run may use there.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    pub label: String,
    pub bytes: u64,
}

/// macOS lets the GPU wire about three quarters of unified memory by default (Metal's
/// `recommendedMaxWorkingSetSize`; `sysctl iogpu.wired_limit_mb` raises it): the share of an
/// Apple machine's memory the table lets MLX use.
pub const APPLE_GPU_SHARE: f64 = 0.75;

/// The sizes the table has columns for: NVIDIA cards (all of their memory: the estimate's
/// required free bytes include the CUDA runtime's share) for PyTorch; Apple unified memory
/// ([`APPLE_GPU_SHARE`] of it) for MLX.
pub fn targets(framework: Framework) -> Vec<Target> {
    match framework {
        Framework::Pytorch => [16u64, 24, 32, 48, 80]
            .iter()
            .map(|g| Target {
                label: format!("{g} GiB card"),
                bytes: g << 30,
            })
            .collect(),
        Framework::Mlx => [16u64, 24, 36, 48, 64, 128]
            .iter()
            .map(|g| Target {
                label: format!("{g} GB Mac"),
                bytes: (*g as f64 * 1e9 * APPLE_GPU_SHARE) as u64,
            })
            .collect(),
    }
}

/// The built-in models the table covers (the tiny test shapes left out).
pub const MODELS: [ModelPreset; 6] = [
    ModelPreset::Qwen3_0_6b,
    ModelPreset::Llama32_1b,
    ModelPreset::Qwen3_1_7b,
    ModelPreset::Llama32_3b,
    ModelPreset::Phi3Mini,
    ModelPreset::Qwen3_4b,
];

/// Token budgets tried, largest first (those below the run's `--max-seq-len` are skipped: a
/// record must fit one micro-batch; those that lay out a step as the next smaller one does are
/// left out).
pub const BUDGETS: [usize; 8] = [65536, 32768, 16384, 8192, 4096, 2048, 1024, 512];

/// One row: a model, a strategy, checkpointing; per target the largest budget that fits and
/// its estimate (`required_free_bytes`), or `None`.
#[derive(Debug, Clone, PartialEq)]
pub struct FitRow {
    pub model: String,
    pub strategy: String,
    pub grad_checkpoint: bool,
    pub cells: Vec<Option<(usize, u64)>>,
}

/// The table's rows. `estimate` is the binary's estimate for a shape, strategy and plan.
pub fn fit_rows(
    cfg: &Config,
    samples: &[Sample],
    targets: &[Target],
    estimate: &dyn Fn(&ModelShape, &StrategyConfig, &[Step]) -> MemoryEstimate,
) -> Vec<FitRow> {
    let w = &cfg.workload;
    let mut batch = w.batch.clone();
    if batch.plan == BatchPlanKind::Padded {
        batch.plan = BatchPlanKind::Bucketed;
    }
    // Each budget's plan, once (the same records for every model and strategy).
    let plans: Vec<(usize, Vec<Step>)> = BUDGETS
        .iter()
        .filter(|&&b| b >= w.data.max_seq_len)
        .map(|&b| {
            let mut batch = batch.clone();
            batch.max_tokens_per_micro_batch = b;
            let steps = crate::data::batch::plan_steps(
                samples,
                &batch,
                w.data.pad_to,
                w.data.train_on_prompt,
                w.seed,
                w.train.epochs,
                w.train.max_steps,
            );
            (b, steps)
        })
        .collect();
    // A budget larger than a step's tokens lays out the same micro-batches as the next smaller
    // one: name the smallest budget of each distinct layout.
    let count = |steps: &[Step]| steps.iter().map(|s| s.micro_batches.len()).sum::<usize>();
    let plans: Vec<(usize, Vec<Step>)> = (0..plans.len())
        .filter(|&i| i + 1 == plans.len() || count(&plans[i].1) != count(&plans[i + 1].1))
        .map(|i| plans[i].clone())
        .collect();
    let mut rows = Vec::new();
    for preset in MODELS {
        let shape = ModelShape::from_preset(preset);
        for kind in [StrategyKind::LastN, StrategyKind::Lora, StrategyKind::Full] {
            for grad_checkpoint in [false, true] {
                let s = StrategyConfig {
                    kind,
                    last_n: w.strategy.last_n.clamp(1, shape.num_layers),
                    grad_checkpoint,
                    ..w.strategy.clone()
                };
                let needs: Vec<(usize, u64)> = plans
                    .iter()
                    .map(|(b, steps)| (*b, estimate(&shape, &s, steps).required_free_bytes))
                    .collect();
                let cells = targets
                    .iter()
                    .map(|t| needs.iter().find(|(_, n)| *n <= t.bytes).copied())
                    .collect();
                rows.push(FitRow {
                    model: clap::ValueEnum::to_possible_value(&preset)
                        .map(|v| v.get_name().to_string())
                        .unwrap_or_default(),
                    strategy: match kind {
                        StrategyKind::LastN => format!("last-n {}", s.last_n),
                        StrategyKind::Lora => format!("lora r{}", s.lora_rank),
                        StrategyKind::Full => "full".into(),
                    },
                    grad_checkpoint,
                    cells,
                });
            }
        }
    }
    rows
}

/// The table as Markdown: a cell is `budget · GiB` (the largest token budget per micro-batch
/// that fits, and what the estimate says the device must have free for it), or `—`.
pub fn markdown(framework: Framework, cfg: &Config, rows: &[FitRow], targets: &[Target]) -> String {
    let mut out = String::new();
    let w = &cfg.workload;
    out.push_str(&format!(
        "What fits where ({}, bf16, estimates): the largest --max-tokens-per-micro-batch that fits, and the memory it needs (GiB){}; records: {} ({} of them), --max-seq-len {}.\n\n",
        match framework {
            Framework::Pytorch => "PyTorch on NVIDIA GPUs",
            Framework::Mlx => "MLX on Apple silicon",
        },
        match framework {
            Framework::Pytorch => ", the CUDA runtime's 1 GiB included".to_string(),
            Framework::Mlx => format!(
                "; a Mac's GPU may use {:.0} % of its memory by default",
                100.0 * APPLE_GPU_SHARE
            ),
        },
        w.data.dataset,
        w.samples.map_or("all".to_string(), |n| n.to_string()),
        w.data.max_seq_len,
    ));
    out.push_str("| model | strategy | checkpointing |");
    for t in targets {
        out.push_str(&format!(" {} |", t.label));
    }
    out.push_str("\n| --- | --- | --- |");
    for _ in targets {
        out.push_str(" --- |");
    }
    out.push('\n');
    for r in rows {
        out.push_str(&format!(
            "| {} | {} | {} |",
            r.model,
            r.strategy,
            if r.grad_checkpoint { "on" } else { "off" }
        ));
        for c in &r.cells {
            match c {
                Some((b, bytes)) => {
                    out.push_str(&format!(" {}k · {:.1} |", b / 1024, *bytes as f64 / GIB))
                }
                None => out.push_str(" — |"),
            }
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::measure::memory::{estimate_for, DeviceKind, Precision};

    /// Larger devices fit at least the budget smaller ones do; checkpointing fits at least the
    /// budget it fits without; each cell's estimate fits its device; full fine-tuning of the
    /// 4 B models fits no 16 GiB card, while LoRA with checkpointing on qwen3-0.6b does.
    #[test]
    fn larger_devices_and_checkpointing_fit_more() {
        let mut cfg = Config::default();
        cfg.workload.data.dataset = "synthetic".into();
        cfg.workload.samples = Some(256);
        cfg.workload.model.weights = crate::config::WeightsKind::Random;
        let p = crate::workload::prepare(&cfg).unwrap();
        let targets = targets(Framework::Pytorch);
        let est = |shape: &ModelShape, s: &StrategyConfig, steps: &[Step]| {
            estimate_for(
                Framework::Pytorch,
                shape,
                s,
                Precision::Bf16,
                DeviceKind::Cuda(0),
                steps,
            )
        };
        let rows = fit_rows(&cfg, &p.samples, &targets, &est);
        assert_eq!(rows.len(), MODELS.len() * 3 * 2);
        let budget = |c: &Option<(usize, u64)>| c.map_or(0, |(b, _)| b);
        for r in &rows {
            for (c, t) in r.cells.iter().zip(&targets) {
                if let Some((_, bytes)) = c {
                    assert!(*bytes <= t.bytes, "{r:?}");
                }
            }
            for pair in r.cells.windows(2) {
                assert!(budget(&pair[0]) <= budget(&pair[1]), "{r:?}");
            }
        }
        for pair in rows.chunks(2) {
            let (off, on) = (&pair[0], &pair[1]);
            assert!(!off.grad_checkpoint && on.grad_checkpoint);
            for (a, b) in off.cells.iter().zip(&on.cells) {
                assert!(budget(a) <= budget(b), "{off:?} {on:?}");
            }
        }
        let row = |m: &str, s: &str, ck: bool| {
            rows.iter()
                .find(|r| r.model == m && r.strategy.starts_with(s) && r.grad_checkpoint == ck)
                .unwrap()
        };
        assert_eq!(row("qwen3-4b", "full", true).cells[0], None);
        assert!(row("qwen3-0.6b", "lora", true).cells[0].is_some());
        let md = markdown(Framework::Pytorch, &cfg, &rows, &targets);
        assert!(md.contains("| qwen3-4b | full | on |"), "{md}");
        // The header, its rule and one line per row.
        assert_eq!(
            md.lines().filter(|l| l.starts_with("| ")).count(),
            rows.len() + 2
        );
    }
}
