//! The workload check: runs compare only when they did the same work. The workload hash covers the
//! settings and every micro-batch's token ids, so equal hashes mean the same work; for unequal ones
//! this names what differs, field by field (`workload.config.batch.plan: bucketed vs packed`).

use serde_json::Value;

use super::load::Run;

/// One field that differs between the baseline and another run.
#[derive(Debug, Clone, PartialEq)]
pub struct Difference {
    /// Dotted path from the summary's root, e.g. `workload.config.batch.plan`.
    pub path: String,
    pub baseline: String,
    pub other: String,
}

impl std::fmt::Display for Difference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {} vs {}", self.path, self.baseline, self.other)
    }
}

/// A run whose workload hash differs from the baseline's.
#[derive(Debug, Clone)]
pub struct Mismatch {
    /// Index into the report's runs.
    pub run: usize,
    /// Differences in the workload description (config, model shape, data statistics, ...).
    pub differences: Vec<Difference>,
    /// `workload.config` is identical: the hash differs because the batches' contents do.
    pub config_identical: bool,
}

impl Mismatch {
    /// What a reader is told beside the differences.
    pub fn explanation(&self) -> Option<&'static str> {
        self.config_identical.then_some(
            "workload.config is identical but the hashes differ, so the batches' contents differ (e.g. a different data file, tokenizer or dataset revision)",
        )
    }
}

#[derive(Debug, Clone)]
pub struct WorkloadCheck {
    pub baseline: usize,
    pub mismatches: Vec<Mismatch>,
    /// Runs that share a workload hash but ran in different precisions (the hash leaves the
    /// dtype out: it is how the work ran, not what it was).
    pub dtype_differences: Vec<DtypeDifference>,
}

/// Runs with one workload hash and more than one dtype.
#[derive(Debug, Clone, PartialEq)]
pub struct DtypeDifference {
    pub hash: String,
    /// (index into the report's runs, its `backend.dtype`), in run order.
    pub runs: Vec<(usize, String)>,
}

impl DtypeDifference {
    /// The warning a reader (and `compare`'s stderr) gets; `label` names run `i`.
    pub fn warning(&self, label: impl Fn(usize) -> String) -> String {
        let list = self
            .runs
            .iter()
            .map(|(i, d)| format!("{} {d}", label(*i)))
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            "runs with workload hash {} differ in dtype ({list}): the same work in different precisions, so their speed, memory and losses differ for that reason too",
            &self.hash[..12.min(self.hash.len())]
        )
    }
}

impl WorkloadCheck {
    pub fn all_same(&self) -> bool {
        self.mismatches.is_empty()
    }
}

/// Groups the runs by workload hash and returns the groups whose dtypes differ.
pub fn dtype_differences(runs: &[Run]) -> Vec<DtypeDifference> {
    let mut out: Vec<DtypeDifference> = Vec::new();
    for (i, r) in runs.iter().enumerate() {
        let hash = &r.summary.workload.hash;
        let entry = (i, r.summary.backend.dtype.clone());
        match out.iter_mut().find(|d| &d.hash == hash) {
            Some(d) => d.runs.push(entry),
            None => out.push(DtypeDifference {
                hash: hash.clone(),
                runs: vec![entry],
            }),
        }
    }
    out.retain(|d| d.runs.iter().any(|(_, t)| *t != d.runs[0].1));
    out
}

/// Compares every run's workload with the baseline's.
pub fn check(runs: &[Run], baseline: usize) -> WorkloadCheck {
    let base = &runs[baseline];
    let mismatches = runs
        .iter()
        .enumerate()
        .filter(|(i, r)| *i != baseline && r.summary.workload.hash != base.summary.workload.hash)
        .map(|(i, r)| {
            let mut differences = Vec::new();
            let (a, b) = (
                workload_without_hash(&base.raw),
                workload_without_hash(&r.raw),
            );
            diff_json("workload", &a, &b, &mut differences);
            let config_identical = !differences
                .iter()
                .any(|d| d.path.starts_with("workload.config"));
            Mismatch {
                run: i,
                differences,
                config_identical,
            }
        })
        .collect();
    WorkloadCheck {
        baseline,
        mismatches,
        dtype_differences: dtype_differences(runs),
    }
}

fn workload_without_hash(raw: &Value) -> Value {
    let mut w = raw.get("workload").cloned().unwrap_or(Value::Null);
    if let Some(o) = w.as_object_mut() {
        o.remove("hash");
    }
    w
}

/// How a value reads in a difference: strings bare, the rest as compact JSON.
fn show(v: Option<&Value>) -> String {
    match v {
        None => "(absent)".into(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

/// Appends every leaf where `a` and `b` differ, depth first, keys in sorted order.
pub fn diff_json(path: &str, a: &Value, b: &Value, out: &mut Vec<Difference>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let p = format!("{path}.{k}");
                match (x.get(k), y.get(k)) {
                    (Some(u), Some(v)) => diff_json(&p, u, v, out),
                    (u, v) => out.push(Difference {
                        path: p,
                        baseline: show(u),
                        other: show(v),
                    }),
                }
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (u, v)) in x.iter().zip(y).enumerate() {
                diff_json(&format!("{path}[{i}]"), u, v, out);
            }
        }
        _ if numbers_equal(a, b) || a == b => {}
        _ => out.push(Difference {
            path: path.to_string(),
            baseline: show(Some(a)),
            other: show(Some(b)),
        }),
    }
}

/// `1` and `1.0` are the same setting.
fn numbers_equal(a: &Value, b: &Value) -> bool {
    matches!((a.as_f64(), b.as_f64()), (Some(x), Some(y)) if x == y)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn names_dotted_paths() {
        let a = json!({"config": {"batch": {"plan": "bucketed", "micro_batch_size": 4}, "targets": ["q", "o"]}, "x": 1});
        let b = json!({"config": {"batch": {"plan": "packed", "micro_batch_size": 4}, "targets": ["q", "v"]}, "x": 1.0, "y": true});
        let mut out = Vec::new();
        diff_json("workload", &a, &b, &mut out);
        let lines: Vec<String> = out.iter().map(ToString::to_string).collect();
        assert_eq!(
            lines,
            [
                "workload.config.batch.plan: bucketed vs packed",
                "workload.config.targets[1]: o vs v",
                "workload.y: (absent) vs true"
            ]
        );
    }
}
