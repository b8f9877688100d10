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

/// An Apple GPU: the chip is sold with several GPU core counts (binned parts), so its peak is the
/// rate of one core times the cores this machine has (`hardware.apple.gpu_cores`, from ioreg).
struct AppleRow {
    /// Lower-case chip name, matched as whole words (`m4 max` does not match `m4`).
    chip: &'static str,
    /// GPU core counts the chip is sold with.
    cores: &'static [u32],
    /// FP32 TFLOP/s of one GPU core: 128 ALUs x 2 FLOP (fused multiply-add) x the GPU clock.
    per_core_tflops: f64,
    source: &'static str,
}

/// NVIDIA datasheet figures are dense (the "with sparsity" figures are halved here); fp32 is the
/// plain (non-tensor-core) rate since fp32 training runs do not use TF32 in this benchmark.
const TABLE: &[Row] = &[
    Row { matches: &["h200"], name: "NVIDIA H200 (SXM)", bf16: 989.4, fp32: 66.9, source: "NVIDIA H200 Tensor Core GPU datasheet (2024): BF16 1,979 TFLOPS with sparsity => 989.4 dense; FP32 67" },
    Row { matches: &["h100", "pcie"], name: "NVIDIA H100 PCIe", bf16: 756.5, fp32: 51.2, source: "NVIDIA H100 datasheet: PCIe BF16 1,513 TFLOPS with sparsity => 756.5 dense; FP32 51" },
    Row { matches: &["h100"], name: "NVIDIA H100 (SXM)", bf16: 989.4, fp32: 66.9, source: "NVIDIA H100 datasheet: SXM BF16 1,979 TFLOPS with sparsity => 989.4 dense; FP32 67" },
    Row { matches: &["a100"], name: "NVIDIA A100", bf16: 312.0, fp32: 19.5, source: "NVIDIA A100 datasheet: BF16 312 TFLOPS dense; FP32 19.5" },
    Row { matches: &["l40s"], name: "NVIDIA L40S", bf16: 362.05, fp32: 91.6, source: "NVIDIA L40S datasheet: BF16 733 with sparsity => 362 dense; FP32 91.6" },
    Row { matches: &["l4"], name: "NVIDIA L4", bf16: 121.0, fp32: 30.3, source: "NVIDIA L4 datasheet: BF16 242 TFLOPS with sparsity => 121 dense; FP32 30.3" },
    Row { matches: &["rtx 4090"], name: "NVIDIA GeForce RTX 4090", bf16: 165.2, fp32: 82.6, source: "NVIDIA Ada Lovelace architecture whitepaper v2.1, Table 2: BF16 tensor (FP32 accumulate) 165.2 dense; FP32 82.6" },
    Row { matches: &["rtx 3090"], name: "NVIDIA GeForce RTX 3090", bf16: 71.0, fp32: 35.6, source: "NVIDIA Ampere GA102 whitepaper, Table 9: BF16 tensor (FP32 accumulate) 71 dense; FP32 35.6" },
];

/// Apple GPUs, longest names first (`m4 max` before `m4`). Per-core rates: from Apple's
/// published totals where Apple gave one (total / the cores it was quoted for), else 128 ALUs x 2
/// FLOP x the clock from public measurements. MLX runs bf16 at the fp32 ALU rate on M1-M4 (no
/// separate matrix units), so the bf16 peak equals the fp32 one.
const APPLE: &[AppleRow] = &[
    AppleRow { chip: "m4 max", cores: &[32, 40], per_core_tflops: 0.4608, source: "128 ALUs x 2 FLOP x 1.8 GHz per GPU core (M4 Max: 32 or 40 cores; clock per public measurements)" },
    AppleRow { chip: "m4 pro", cores: &[16, 20], per_core_tflops: 0.4608, source: "128 ALUs x 2 FLOP x 1.8 GHz per GPU core (M4 Pro: 16 or 20 cores; clock per public measurements)" },
    AppleRow { chip: "m4", cores: &[8, 10], per_core_tflops: 0.4608, source: "128 ALUs x 2 FLOP x 1.8 GHz per GPU core (M4: 8 or 10 cores; clock per public measurements)" },
    AppleRow { chip: "m3 max", cores: &[30, 40], per_core_tflops: 0.4096, source: "128 ALUs x 2 FLOP x 1.6 GHz per GPU core (M3 Max: 30 or 40 cores; clock per public measurements)" },
    AppleRow { chip: "m2 ultra", cores: &[60, 76], per_core_tflops: 27.2 / 76.0, source: "Apple M2 Ultra press release: 27.2 TFLOPS with 76 GPU cores (60 or 76 cores)" },
    AppleRow { chip: "m2 max", cores: &[30, 38], per_core_tflops: 13.6 / 38.0, source: "Apple M2 Max press release: 13.6 TFLOPS with 38 GPU cores (30 or 38 cores)" },
    AppleRow { chip: "m2 pro", cores: &[16, 19], per_core_tflops: 6.8 / 19.0, source: "Apple M2 Pro press release: 6.8 TFLOPS with 19 GPU cores (16 or 19 cores)" },
    AppleRow { chip: "m2", cores: &[8, 10], per_core_tflops: 3.6 / 10.0, source: "Apple M2 press release: 3.6 TFLOPS with 10 GPU cores (8 or 10 cores)" },
    AppleRow { chip: "m1 ultra", cores: &[48, 64], per_core_tflops: 21.0 / 64.0, source: "Apple M1 Ultra press release: 21 TFLOPS with 64 GPU cores (48 or 64 cores)" },
    AppleRow { chip: "m1 max", cores: &[24, 32], per_core_tflops: 10.4 / 32.0, source: "Apple M1 Max press release: 10.4 TFLOPS with 32 GPU cores (24 or 32 cores)" },
    AppleRow { chip: "m1 pro", cores: &[14, 16], per_core_tflops: 5.2 / 16.0, source: "Apple M1 Pro press release: 5.2 TFLOPS with 16 GPU cores (14 or 16 cores)" },
    AppleRow { chip: "m1", cores: &[7, 8], per_core_tflops: 2.6 / 8.0, source: "Apple M1 press release: 2.6 TFLOPS with 8 GPU cores (7 or 8 cores)" },
];

/// The table peak for a device name and precision (`bf16` or `fp32`), or why there is none (an
/// unknown device; an Apple GPU whose core count was not read). `apple_gpu_cores` is the machine's
/// GPU core count, used for Apple chips only.
pub fn lookup(
    device_name: &str,
    low_precision: bool,
    apple_gpu_cores: Option<u32>,
) -> Result<Peak, String> {
    let n = device_name.to_ascii_lowercase();
    let precision = if low_precision { "bf16" } else { "fp32" };
    if let Some(row) = TABLE
        .iter()
        .find(|r| r.matches.iter().all(|m| contains_word(&n, m)))
    {
        return Ok(Peak {
            device: row.name.into(),
            tflops: if low_precision { row.bf16 } else { row.fp32 },
            precision: precision.into(),
            source: row.source.into(),
        });
    }
    let Some(row) = APPLE.iter().find(|r| contains_word(&n, r.chip)) else {
        return Err(format!(
            "no cited peak for device {device_name:?} (see shared/src/measure/peak.rs)"
        ));
    };
    let list = row
        .cores
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(" or ");
    let cores = match apple_gpu_cores {
        Some(c) => c,
        None if row.cores.len() == 1 => row.cores[0],
        None => {
            return Err(format!(
                "{device_name} is sold with {list} GPU cores and this machine's count was not read (ioreg's gpu-core-count)"
            ))
        }
    };
    let chip = device_name.trim();
    Ok(Peak {
        device: format!("{chip} ({cores}-core GPU)"),
        tflops: f64::from(cores) * row.per_core_tflops,
        precision: precision.into(),
        source: format!(
            "{cores} GPU cores x {:.4} TFLOP/s per core: {}",
            row.per_core_tflops, row.source
        ),
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
        assert_eq!(lookup("NVIDIA H200", true, None).unwrap().tflops, 989.4);
        assert_eq!(
            lookup("NVIDIA H100 PCIe", true, None).unwrap().tflops,
            756.5
        );
        assert_eq!(
            lookup("NVIDIA H100 80GB HBM3", true, None).unwrap().tflops,
            989.4
        );
        assert!(lookup("AMD EPYC 7763 64-Core Processor", false, None).is_err());
        assert!(
            lookup("NVIDIA L40", true, None).is_err(),
            "L40 must not match L4 or L40S"
        );
    }

    /// Binned Apple parts have fewer GPU cores than the full chip: the peak follows the machine's
    /// count, and without it there is no peak (never the bigger part's).
    #[test]
    fn apple_gpu_peaks_follow_the_core_count() {
        let full = lookup("Apple M4 Max", true, Some(40)).unwrap();
        let binned = lookup("Apple M4 Max", true, Some(32)).unwrap();
        assert!((full.tflops - 18.432).abs() < 1e-9, "{}", full.tflops);
        assert!((binned.tflops - 14.7456).abs() < 1e-9, "{}", binned.tflops);
        assert!(binned.device.contains("32-core"), "{}", binned.device);
        let why = lookup("Apple M4 Max", true, None).unwrap_err();
        assert!(
            why.contains("32 or 40") && why.contains("gpu-core-count"),
            "{why}"
        );
        // A 16-core M4 Pro, an M3 Max with 30 cores, an M2 Max quoted at 13.6 for 38 cores.
        assert!((lookup("Apple M4 Pro", true, Some(16)).unwrap().tflops - 7.3728).abs() < 1e-9);
        assert!((lookup("Apple M3 Max", true, Some(30)).unwrap().tflops - 12.288).abs() < 1e-9);
        assert!((lookup("Apple M2 Max", true, Some(38)).unwrap().tflops - 13.6).abs() < 1e-9);
        assert!((lookup("Apple M1 Pro", false, Some(14)).unwrap().tflops - 4.55).abs() < 1e-9);
        // Whole words: the M4 row is not the M4 Pro's, the M1 row not the M1 Max's.
        assert!((lookup("Apple M4", true, Some(10)).unwrap().tflops - 4.608).abs() < 1e-9);
        assert!((lookup("Apple M1 Max", true, Some(24)).unwrap().tflops - 7.8).abs() < 1e-9);
        assert_eq!(
            lookup("Apple M4 Pro", true, Some(20)).unwrap().precision,
            "bf16"
        );
        assert!(
            lookup("Apple M3 Pro", true, Some(18)).is_err(),
            "no cited figure"
        );
    }
}
