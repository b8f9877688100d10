//! Data-parallel scaling: each multi-GPU run against a one-GPU run of the same workload (same
//! hash, same framework) among the runs being compared.

use super::Run;

#[derive(Debug, Clone, PartialEq)]
pub struct ScalingRow {
    /// Index into the runs of the multi-GPU run.
    pub run: usize,
    /// Index of the one-GPU run it is compared with.
    pub single: usize,
    pub world_size: usize,
    pub input_tokens_per_s: f64,
    pub per_gpu_input_tokens_per_s: f64,
    pub single_input_tokens_per_s: f64,
    /// Aggregate throughput / (world size x one-GPU throughput).
    pub efficiency: f64,
}

pub fn rows(runs: &[Run]) -> Vec<ScalingRow> {
    let tps = |r: &Run| r.summary.metrics.input_tokens_per_s;
    let mut out = Vec::new();
    for (i, r) in runs.iter().enumerate() {
        let n = r.summary.backend.world_size;
        let Some(t) = tps(r) else { continue };
        if n <= 1 {
            continue;
        }
        let single = runs.iter().enumerate().find(|(_, s)| {
            s.summary.backend.world_size <= 1
                && s.summary.workload.hash == r.summary.workload.hash
                && s.summary.backend.framework == r.summary.backend.framework
                && tps(s).is_some()
        });
        if let Some((j, s)) = single {
            let t1 = tps(s).unwrap_or(f64::NAN);
            out.push(ScalingRow {
                run: i,
                single: j,
                world_size: n,
                input_tokens_per_s: t,
                per_gpu_input_tokens_per_s: t / n as f64,
                single_input_tokens_per_s: t1,
                efficiency: t / (n as f64 * t1),
            });
        }
    }
    out
}

/// The scaling section as Markdown (empty when no run has a one-GPU counterpart).
pub fn markdown(runs: &[Run], rows: &[ScalingRow]) -> String {
    use std::fmt::Write;
    if rows.is_empty() {
        return String::new();
    }
    let mut s = String::from(
        "## Scaling (data parallel)\n\nEfficiency = aggregate input tokens/s / (GPUs x the one-GPU run's input tokens/s), same workload hash.\n\n| run | GPUs | input tokens/s | per GPU | one-GPU run | one-GPU tokens/s | efficiency |\n| --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for r in rows {
        let _ = writeln!(
            s,
            "| {} | {} | {:.0} | {:.0} | {} | {:.0} | {:.1} % |",
            super::markdown::text(&runs[r.run].label),
            r.world_size,
            r.input_tokens_per_s,
            r.per_gpu_input_tokens_per_s,
            super::markdown::text(&runs[r.single].label),
            r.single_input_tokens_per_s,
            100.0 * r.efficiency
        );
    }
    s.push('\n');
    s
}
