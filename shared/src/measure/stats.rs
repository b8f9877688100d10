//! Step-time statistics: median, p10, p90, mean and (sample) standard deviation.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Spread {
    pub median: f64,
    pub p10: f64,
    pub p90: f64,
    pub mean: f64,
    pub stdev: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

/// Linear-interpolated percentile (numpy's default) of sorted data; `q` in [0, 1].
pub fn percentile_sorted(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let pos = q * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

impl Spread {
    /// `None` for an empty series.
    pub fn of(values: &[f64]) -> Option<Self> {
        if values.is_empty() {
            return None;
        }
        let mut s: Vec<f64> = values.to_vec();
        s.sort_by(|a, b| a.total_cmp(b));
        let n = s.len();
        let mean = s.iter().sum::<f64>() / n as f64;
        let stdev = if n > 1 {
            (s.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
        } else {
            0.0
        };
        Some(Self {
            median: percentile_sorted(&s, 0.5),
            p10: percentile_sorted(&s, 0.1),
            p90: percentile_sorted(&s, 0.9),
            mean,
            stdev,
            min: s[0],
            max: s[n - 1],
            n,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_numpy() {
        // numpy.percentile([1..10], [10, 50, 90]) = 1.9, 5.5, 9.1; std(ddof=1) = 3.0276503540974917
        let v: Vec<f64> = (1..=10).map(f64::from).collect();
        let s = Spread::of(&v).unwrap();
        assert!(
            (s.p10 - 1.9).abs() < 1e-12
                && (s.median - 5.5).abs() < 1e-12
                && (s.p90 - 9.1).abs() < 1e-12
        );
        assert!((s.stdev - 3.027_650_354_097_491_7).abs() < 1e-12);
        assert_eq!(Spread::of(&[]), None);
        assert_eq!(Spread::of(&[2.0]).unwrap().stdev, 0.0);
    }
}
