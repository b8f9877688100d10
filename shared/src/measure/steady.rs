//! Steady-state arithmetic: from the list of completed optimizer steps to the figures a summary
//! reports about them. One pure function ([`steady_figures`]) does the warm-up split, the sums,
//! the rates, the step-time spread, the model FLOP rate and MFU over the world size, and says in
//! a `steady:` note when the figures rest on too few steps; [`warmup_steps`] decides the split and
//! [`median_repeat`] picks the repeat whose figures head a `--repeats` summary. Nothing here reads
//! a clock or a device, so the tests below check it on step lists made by hand.

use crate::measure::stats::Spread;

/// Fewer steady steps than this and the steady figures get a `steady:` note and a warning: with
/// 1-4 steps a percentile is one step's time and the spread says nothing.
pub const MIN_RELIABLE_STEADY_STEPS: usize = 5;

/// Steps the default warm-up split leaves out, at most (measuring.md: 3 or 10 % of the steps,
/// whichever is smaller, at least 1).
pub const MAX_DEFAULT_WARMUP_STEPS: usize = 3;

/// One completed optimizer step, as the steady-state arithmetic needs it. Token and record counts
/// are the whole step's (all ranks' together in a data-parallel run); `time_s` is the step's wall
/// time (the slowest rank's); `flops` the model FLOPs of what ran (see `measure::flops`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepFigures {
    pub time_s: f64,
    pub samples: usize,
    pub loss_tokens: usize,
    pub input_tokens: usize,
    pub padded_tokens: usize,
    pub flops: f64,
    /// What the device computed: `flops` plus activation checkpointing's recomputation (equal
    /// to `flops` without it).
    pub hardware_flops: f64,
}

/// What the summary reports about the steady steps (and the warm-up split that defines them).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SteadyFigures {
    pub warmup_steps: usize,
    pub steady_steps: usize,
    pub warmup_s: f64,
    pub steady_s: f64,
    pub steady_samples: usize,
    pub steady_loss_tokens: usize,
    pub steady_input_tokens: usize,
    pub steady_padded_tokens: usize,
    /// Steady loss tokens / steady seconds (the headline).
    pub tokens_per_s: Option<f64>,
    pub input_tokens_per_s: Option<f64>,
    pub samples_per_s: Option<f64>,
    pub step_time_s: Option<Spread>,
    /// Model FLOPs of the steady steps.
    pub steady_flops: f64,
    /// Steady FLOPs / steady input tokens: times `input_tokens_per_s` it gives
    /// `model_tflops_per_s` (x 1e12).
    pub flops_per_input_token: Option<f64>,
    pub model_tflops_per_s: Option<f64>,
    /// Against the table peak of one device times the world size.
    pub mfu: Option<f64>,
    /// Against the calibrated peak of one device times the world size.
    pub mfu_measured: Option<f64>,
    /// Hardware FLOPs (model FLOPs and activation checkpointing's recomputation) per second.
    pub hardware_tflops_per_s: Option<f64>,
    /// Hardware FLOP rate against the table peak (as `mfu`); equal to `mfu` without checkpointing.
    pub hfu: Option<f64>,
    /// `steady: ...` when the steady figures are null or rest on fewer than
    /// [`MIN_RELIABLE_STEADY_STEPS`] steps.
    pub note: Option<String>,
}

/// Optimizer steps left out of the steady figures in a run of `steps` steps. Default (no
/// `explicit`): min(3, 10 % of the steps) but at least 1, so a run's first (cold) step is never a
/// steady one; a 1-step run has no steady step. An explicit K is kept (capped at the run's steps).
pub fn warmup_steps(steps: usize, explicit: Option<usize>) -> usize {
    match explicit {
        Some(k) => k.min(steps),
        None => MAX_DEFAULT_WARMUP_STEPS.min(steps / 10).max(1).min(steps),
    }
}

/// The steady-state figures of `steps` (completed steps, in order) with the first `warmup` left
/// out. `world_size` ranks share each step (MFU is against all their peaks); `peak_tflops` is one
/// device's table peak, `measured_peak_tflops` one device's `--calibrate` figure.
pub fn steady_figures(
    steps: &[StepFigures],
    warmup: usize,
    world_size: usize,
    peak_tflops: Option<f64>,
    measured_peak_tflops: Option<f64>,
) -> SteadyFigures {
    let warmup = warmup.min(steps.len());
    let (cold, steady) = steps.split_at(warmup);
    let warmup_s: f64 = cold.iter().map(|s| s.time_s).sum();
    let steady_s: f64 = steady.iter().map(|s| s.time_s).sum();
    let sum = |f: fn(&StepFigures) -> usize| steady.iter().map(f).sum::<usize>();
    let (samples, loss, input, padded) = (
        sum(|s| s.samples),
        sum(|s| s.loss_tokens),
        sum(|s| s.input_tokens),
        sum(|s| s.padded_tokens),
    );
    let flops: f64 = steady.iter().map(|s| s.flops).sum();
    let hardware_flops: f64 = steady.iter().map(|s| s.hardware_flops).sum();
    // Rates exist only over a measured steady window: no steady step (or a zero-length one)
    // gives null figures, never the warm-up's.
    let timed = !steady.is_empty() && steady_s > 0.0;
    let rate = |x: f64| timed.then(|| x / steady_s);
    let model_tflops = rate(flops).map(|f| f / 1e12);
    let world = world_size.max(1) as f64;
    let hardware_tflops = rate(hardware_flops).map(|f| f / 1e12);
    let ratio = |tflops: Option<f64>, peak: Option<f64>| match (tflops, peak) {
        (Some(t), Some(p)) if p > 0.0 => Some(t / (p * world)),
        _ => None,
    };
    let against = |peak: Option<f64>| ratio(model_tflops, peak);
    let times: Vec<f64> = steady.iter().map(|s| s.time_s).collect();
    let note = if steady.is_empty() {
        Some(format!(
            "steady: null: no steady step: {} of the run's {} completed step(s) were warm-up steps, which the steady figures leave out (the first steps include one-off work); run more steps",
            cold.len(),
            steps.len()
        ))
    } else if steady.len() < MIN_RELIABLE_STEADY_STEPS {
        Some(format!(
            "steady: only {} steady step(s) (fewer than {MIN_RELIABLE_STEADY_STEPS}): the steady figures and the step-time spread rest on too few steps to be reliable; run more steps (more --samples, or fewer records per step)",
            steady.len()
        ))
    } else {
        None
    };
    SteadyFigures {
        warmup_steps: warmup,
        steady_steps: steady.len(),
        warmup_s,
        steady_s,
        steady_samples: samples,
        steady_loss_tokens: loss,
        steady_input_tokens: input,
        steady_padded_tokens: padded,
        tokens_per_s: rate(loss as f64),
        input_tokens_per_s: rate(input as f64),
        samples_per_s: rate(samples as f64),
        step_time_s: Spread::of(&times),
        steady_flops: flops,
        flops_per_input_token: (timed && input > 0).then(|| flops / input as f64),
        model_tflops_per_s: model_tflops,
        mfu: against(peak_tflops),
        mfu_measured: against(measured_peak_tflops),
        hardware_tflops_per_s: hardware_tflops,
        hfu: ratio(hardware_tflops, peak_tflops),
        note,
    }
}

/// The repeat whose figures head a `--repeats` summary: the median by steady tokens/s (the lower
/// middle one for an even count; a repeat without a steady rate sorts first). 0-based.
pub fn median_repeat(tokens_per_s: &[Option<f64>]) -> usize {
    let mut order: Vec<usize> = (0..tokens_per_s.len()).collect();
    order.sort_by(|&a, &b| {
        tokens_per_s[a]
            .unwrap_or(f64::NEG_INFINITY)
            .total_cmp(&tokens_per_s[b].unwrap_or(f64::NEG_INFINITY))
            .then(a.cmp(&b))
    });
    order
        .get(tokens_per_s.len().saturating_sub(1) / 2)
        .copied()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(time_s: f64, loss: usize, input: usize) -> StepFigures {
        StepFigures {
            time_s,
            samples: 4,
            loss_tokens: loss,
            input_tokens: input,
            padded_tokens: input + 10,
            flops: 1e12 * input as f64,
            hardware_flops: 1e12 * input as f64,
        }
    }

    #[test]
    fn the_warmup_split_never_makes_the_cold_step_steady() {
        assert_eq!(warmup_steps(0, None), 0);
        assert_eq!(warmup_steps(1, None), 1, "a 1-step run has no steady step");
        assert_eq!(warmup_steps(2, None), 1);
        assert_eq!(warmup_steps(13, None), 1);
        assert_eq!(warmup_steps(20, None), 2);
        assert_eq!(warmup_steps(100, None), 3);
        assert_eq!(warmup_steps(5, Some(0)), 0, "an explicit K is kept");
        assert_eq!(warmup_steps(5, Some(9)), 5, "capped at the run's steps");
    }

    #[test]
    fn rates_sums_and_spread_cover_the_steady_steps_only() {
        // A slow cold step, then six steady steps.
        let mut steps = vec![step(10.0, 1, 1)];
        for k in 0..6 {
            steps.push(step(1.0 + 0.1 * k as f64, 100, 200));
        }
        let f = steady_figures(&steps, 1, 1, Some(1000.0), None);
        assert_eq!((f.warmup_steps, f.steady_steps), (1, 6));
        assert_eq!(f.warmup_s, 10.0);
        let steady_s = 6.0 + 0.1 * 15.0;
        assert!((f.steady_s - steady_s).abs() < 1e-12);
        assert_eq!(
            (
                f.steady_loss_tokens,
                f.steady_input_tokens,
                f.steady_samples
            ),
            (600, 1200, 24)
        );
        assert_eq!(f.steady_padded_tokens, 6 * 210);
        assert!((f.tokens_per_s.unwrap() - 600.0 / steady_s).abs() < 1e-9);
        assert!((f.input_tokens_per_s.unwrap() - 1200.0 / steady_s).abs() < 1e-9);
        assert!((f.samples_per_s.unwrap() - 24.0 / steady_s).abs() < 1e-9);
        let st = f.step_time_s.unwrap();
        assert_eq!((st.n, st.min, st.max), (6, 1.0, 1.5));
        assert!(st.stdev > 0.0 && st.p10 < st.p90);
        assert_eq!(f.note, None);
    }

    /// FLOPs per input token times input tokens/s is the model FLOP rate: the per-token figure
    /// names the token the throughput counts.
    #[test]
    fn flops_per_input_token_times_input_throughput_is_the_model_rate() {
        let steps: Vec<StepFigures> = (0..8)
            .map(|k| StepFigures {
                flops: 3e12 + 1e11 * k as f64,
                hardware_flops: 3e12 + 1e11 * k as f64,
                ..step(0.5 + 0.01 * k as f64, 50 + k, 300 + 7 * k)
            })
            .collect();
        let f = steady_figures(&steps, 2, 1, None, None);
        let product = f.flops_per_input_token.unwrap() * f.input_tokens_per_s.unwrap() / 1e12;
        assert!((product / f.model_tflops_per_s.unwrap() - 1.0).abs() < 1e-12);
        // Loss tokens are fewer than input tokens: their product with the per-input-token figure
        // would understate the rate.
        let wrong = f.flops_per_input_token.unwrap() * f.tokens_per_s.unwrap() / 1e12;
        assert!(wrong < 0.5 * f.model_tflops_per_s.unwrap());
        assert_eq!(f.mfu, None, "no peak, no MFU");
    }

    #[test]
    fn mfu_is_against_the_peak_of_every_rank() {
        let steps = vec![step(1.0, 10, 10); 6];
        // 10 input tokens x 1e12 FLOPs per step-second: 10 TFLOP/s.
        let one = steady_figures(&steps, 1, 1, Some(100.0), Some(50.0));
        assert!((one.model_tflops_per_s.unwrap() - 10.0).abs() < 1e-9);
        assert!((one.mfu.unwrap() - 0.1).abs() < 1e-12);
        assert!((one.mfu_measured.unwrap() - 0.2).abs() < 1e-12);
        let four = steady_figures(&steps, 1, 4, Some(100.0), Some(50.0));
        assert!((four.mfu.unwrap() - 0.025).abs() < 1e-12);
        assert!((four.mfu_measured.unwrap() - 0.05).abs() < 1e-12);
    }

    #[test]
    fn hfu_counts_the_recomputation_and_mfu_does_not() {
        let mut steps = vec![step(1.0, 10, 10); 6];
        let same = steady_figures(&steps, 1, 1, Some(100.0), None);
        assert_eq!(same.hfu, same.mfu, "no recomputation: hfu = mfu");
        for s in &mut steps {
            s.hardware_flops = 1.5 * s.flops;
        }
        let f = steady_figures(&steps, 1, 2, Some(100.0), None);
        assert!((f.mfu.unwrap() - 0.05).abs() < 1e-12);
        assert!((f.hfu.unwrap() - 0.075).abs() < 1e-12);
        assert!((f.hardware_tflops_per_s.unwrap() - 15.0).abs() < 1e-9);
        assert_eq!(steady_figures(&steps, 1, 1, None, None).hfu, None);
    }

    #[test]
    fn without_steady_steps_the_figures_are_null_with_a_note() {
        // A 1-step run: the default split makes its only step a warm-up step.
        let steps = vec![step(3.0, 36, 40)];
        let f = steady_figures(&steps, warmup_steps(1, None), 1, Some(100.0), None);
        assert_eq!((f.warmup_steps, f.steady_steps), (1, 0));
        assert_eq!(f.warmup_s, 3.0);
        assert_eq!(f.steady_s, 0.0);
        assert_eq!(f.tokens_per_s, None, "never the warm-up step's rate");
        assert_eq!(f.input_tokens_per_s, None);
        assert_eq!(f.samples_per_s, None);
        assert_eq!(f.step_time_s, None);
        assert_eq!(f.flops_per_input_token, None);
        assert_eq!(f.model_tflops_per_s, None);
        assert_eq!(f.mfu, None);
        let note = f.note.unwrap();
        assert!(note.starts_with("steady: null: no steady step"), "{note}");
        // No step at all (a run that failed at its first step).
        let f = steady_figures(&[], 1, 1, None, None);
        assert_eq!((f.warmup_steps, f.steady_steps), (0, 0));
        assert!(f.note.unwrap().starts_with("steady: null:"));
    }

    #[test]
    fn fewer_than_five_steady_steps_are_flagged() {
        // The seed's default: 2 steps of 64 and 36 records, 1 warm-up: one steady step.
        let steps = vec![step(2.0, 64, 64), step(1.0, 36, 36)];
        let f = steady_figures(&steps, warmup_steps(2, None), 1, None, None);
        assert_eq!(f.steady_steps, 1);
        let st = f.step_time_s.unwrap();
        assert_eq!((st.stdev, st.p10, st.p90), (0.0, 1.0, 1.0));
        assert!(f.tokens_per_s.is_some(), "figures exist, flagged");
        let note = f.note.unwrap();
        assert!(
            note.starts_with("steady: only 1 steady step") && note.contains("fewer than 5"),
            "{note}"
        );
        let five = vec![step(1.0, 1, 1); 6];
        assert_eq!(steady_figures(&five, 1, 1, None, None).note, None);
        let four = vec![step(1.0, 1, 1); 5];
        assert!(steady_figures(&four, 1, 1, None, None).note.is_some());
    }

    #[test]
    fn the_median_repeat_is_the_middle_by_tokens_per_s() {
        assert_eq!(median_repeat(&[Some(3.0), Some(1.0), Some(2.0)]), 2);
        assert_eq!(
            median_repeat(&[Some(1.0), Some(4.0)]),
            0,
            "the lower middle"
        );
        assert_eq!(median_repeat(&[None, Some(5.0), Some(4.0)]), 2);
        assert_eq!(median_repeat(&[Some(7.0)]), 0);
        assert_eq!(median_repeat(&[]), 0);
    }
}
