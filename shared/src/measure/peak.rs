//! Dense peak throughput per device, each row with its source. Unknown device ⇒ no peak ⇒ MFU is
//! null: this benchmark never guesses a peak.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Peak {
    /// The row that matched.
    pub device: String,
    /// Dense (no sparsity) TFLOP/s for the precision the run used.
    pub tflops: f64,
    pub precision: String,
    pub source: String,
}

struct Row {
    /// Lower-case substrings that must all appear in the device name.
    matches: &'static [&'static str],
    name: &'static str,
    bf16: f64,
    fp32: f64,
    source: &'static str,
}

/// NVIDIA datasheet figures are dense (the "with sparsity" figures are halved here); fp32 is the
/// plain (non-tensor-core) rate since fp32 training runs do not use TF32 in this benchmark.
/// Apple GPUs: fp32 FLOPs = ALUs × 2 × clock, from Apple's published core counts and the clock
/// reported by Apple/third-party measurements; MLX runs bf16 at the fp32 ALU rate on M1-M4 (no
/// separate matrix units), so the bf16 peak equals the fp32 one.
const TABLE: &[Row] = &[
    Row { matches: &["h200"], name: "NVIDIA H200 (SXM)", bf16: 989.4, fp32: 66.9, source: "NVIDIA H200 Tensor Core GPU datasheet (2024): BF16 1,979 TFLOPS with sparsity => 989.4 dense; FP32 67" },
    Row { matches: &["h100", "pcie"], name: "NVIDIA H100 PCIe", bf16: 756.5, fp32: 51.2, source: "NVIDIA H100 datasheet: PCIe BF16 1,513 TFLOPS with sparsity => 756.5 dense; FP32 51" },
    Row { matches: &["h100"], name: "NVIDIA H100 (SXM)", bf16: 989.4, fp32: 66.9, source: "NVIDIA H100 datasheet: SXM BF16 1,979 TFLOPS with sparsity => 989.4 dense; FP32 67" },
    Row { matches: &["a100"], name: "NVIDIA A100", bf16: 312.0, fp32: 19.5, source: "NVIDIA A100 datasheet: BF16 312 TFLOPS dense; FP32 19.5" },
    Row { matches: &["l40s"], name: "NVIDIA L40S", bf16: 362.05, fp32: 91.6, source: "NVIDIA L40S datasheet: BF16 733 with sparsity => 362 dense; FP32 91.6" },
    Row { matches: &["l4"], name: "NVIDIA L4", bf16: 121.0, fp32: 30.3, source: "NVIDIA L4 datasheet: BF16 242 TFLOPS with sparsity => 121 dense; FP32 30.3" },
    Row { matches: &["rtx 4090"], name: "NVIDIA GeForce RTX 4090", bf16: 165.2, fp32: 82.6, source: "NVIDIA Ada Lovelace architecture whitepaper v2.1, Table 2: BF16 tensor (FP32 accumulate) 165.2 dense; FP32 82.6" },
    Row { matches: &["rtx 3090"], name: "NVIDIA GeForce RTX 3090", bf16: 71.0, fp32: 35.6, source: "NVIDIA Ampere GA102 whitepaper, Table 9: BF16 tensor (FP32 accumulate) 71 dense; FP32 35.6" },
    Row { matches: &["m4 max"], name: "Apple M4 Max (40-core GPU)", bf16: 18.4, fp32: 18.4, source: "40 GPU cores x 128 ALUs x 2 FLOP x 1.8 GHz (Apple M4 Max spec; clock per public measurements)" },
    Row { matches: &["m4 pro"], name: "Apple M4 Pro (20-core GPU)", bf16: 9.2, fp32: 9.2, source: "20 GPU cores x 128 ALUs x 2 FLOP x 1.8 GHz (Apple M4 Pro spec: 16 or 20 cores; the 20-core part)" },
    Row { matches: &["m4"], name: "Apple M4 (10-core GPU)", bf16: 4.6, fp32: 4.6, source: "10 GPU cores x 128 ALUs x 2 FLOP x 1.8 GHz" },
    Row { matches: &["m3 max"], name: "Apple M3 Max (40-core GPU)", bf16: 16.4, fp32: 16.4, source: "40 GPU cores x 128 ALUs x 2 FLOP x 1.6 GHz" },
    Row { matches: &["m2 ultra"], name: "Apple M2 Ultra (76-core GPU)", bf16: 27.2, fp32: 27.2, source: "Apple M2 Ultra press release: 27.2 TFLOPS (76-core GPU)" },
    Row { matches: &["m2 max"], name: "Apple M2 Max (38-core GPU)", bf16: 13.6, fp32: 13.6, source: "Apple M2 Max press release: 13.6 TFLOPS (38-core GPU)" },
    Row { matches: &["m1 ultra"], name: "Apple M1 Ultra (64-core GPU)", bf16: 21.0, fp32: 21.0, source: "Apple M1 Ultra press release: 21 TFLOPS (64-core GPU)" },
    Row { matches: &["m1 max"], name: "Apple M1 Max (32-core GPU)", bf16: 10.4, fp32: 10.4, source: "Apple M1 Max press release: 10.4 TFLOPS (32-core GPU)" },
    Row { matches: &["m1 pro"], name: "Apple M1 Pro (16-core GPU)", bf16: 5.2, fp32: 5.2, source: "Apple M1 Pro press release: 5.2 TFLOPS (16-core GPU)" },
    Row { matches: &["m1"], name: "Apple M1 (8-core GPU)", bf16: 2.6, fp32: 2.6, source: "Apple M1 press release: 2.6 TFLOPS (8-core GPU)" },
];

/// The table peak for a device name and precision (`bf16` or `fp32`), or `None` when unknown.
pub fn lookup(device_name: &str, low_precision: bool) -> Option<Peak> {
    let n = device_name.to_ascii_lowercase();
    let row = TABLE
        .iter()
        .find(|r| r.matches.iter().all(|m| contains_word(&n, m)))?;
    Some(Peak {
        device: row.name.into(),
        tflops: if low_precision { row.bf16 } else { row.fp32 },
        precision: if low_precision {
            "bf16".into()
        } else {
            "fp32".into()
        },
        source: row.source.into(),
    })
}

/// `m1` must not match `m1 pro` rows' shorter siblings wrongly: match whole words.
fn contains_word(hay: &str, needle: &str) -> bool {
    hay.match_indices(needle).any(|(i, _)| {
        let before = hay[..i]
            .chars()
            .next_back()
            .is_none_or(|c| !c.is_ascii_alphanumeric());
        let after = hay[i + needle.len()..]
            .chars()
            .next()
            .is_none_or(|c| !c.is_ascii_alphanumeric());
        before && after
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_known_devices_and_refuses_unknown() {
        assert_eq!(lookup("NVIDIA H200", true).unwrap().tflops, 989.4);
        assert_eq!(lookup("NVIDIA H100 PCIe", true).unwrap().tflops, 756.5);
        assert_eq!(lookup("NVIDIA H100 80GB HBM3", true).unwrap().tflops, 989.4);
        assert_eq!(lookup("Apple M4 Pro", true).unwrap().tflops, 9.2);
        assert_eq!(lookup("Apple M4", true).unwrap().tflops, 4.6);
        assert!(lookup("AMD EPYC 7763 64-Core Processor", false).is_none());
        assert!(
            lookup("NVIDIA L40", true).is_none(),
            "L40 must not match L4 or L40S"
        );
    }
}
