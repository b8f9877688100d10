//! The tch decoder against Hugging Face's implementations: logits of a fixed tiny checkpoint of
//! each family (Phi-3, Llama 3, Qwen3).
//!
//! How the expected values were obtained: this test writes the tiny checkpoint (shape `tiny`,
//! seed 7) with `shared::model::write_checkpoint`; with `FTB_REFERENCE_DIR=<dir>` it also leaves a
//! copy there. `scripts/reference_logits.py <dir>` then loads that folder with
//! `transformers.Phi3ForCausalLM` (transformers 4.57.x, torch 2.11.0, fp32, eager attention) and
//! prints the values below for the same input ids. Recorded once on 2026-11-28.
//!
//! Llama 3 and Qwen3 (shapes `tiny-llama`, `tiny-qwen3`, seed 7): the test leaves
//! `<dir>/tiny-llama` and `<dir>/tiny-qwen3`; `scripts/reference_logits_families.py <dir>` loads
//! them with `transformers.AutoModelForCausalLM` (`LlamaForCausalLM`, `Qwen3ForCausalLM`;
//! transformers 4.57.x, torch 2.11.0, fp32, eager attention) at positions 1000.. (so that every
//! RoPE frequency, Llama 3's corrected ones included, turns far) and prints
//! `common/reference_families.rs`. Recorded once on 2026-12-04.

use std::collections::HashMap;

use shared::data::batch::{MicroBatch, IGNORE_INDEX};
use shared::model::{write_checkpoint, ModelShape, WeightSource};
use tch::{Device, Kind, Tensor};
use windows_pytorch_benchmark::decoder::{DType, Decoder, Inputs};

pub const IDS: [i64; 15] = [
    1, 32010, 29871, 13, 500, 600, 700, 32007, 29871, 13, 32001, 29871, 13, 800, 900,
];

/// (position, vocabulary id, logit) from Hugging Face.
const EXPECTED: [(usize, usize, f64); 6] = REFERENCE;
include!("common/reference_values.rs");
mod families {
    include!("common/reference_families.rs");
}

fn load(dir: &std::path::Path) -> Decoder {
    let shape = ModelShape::from_config_json(&dir.join("config.json")).unwrap();
    let mut map = HashMap::new();
    WeightSource::from_dir(dir)
        .unwrap()
        .for_each(&shape.parameters(), 0, |spec, d| {
            let dims: Vec<i64> = d.shape.iter().map(|&x| x as i64).collect();
            map.insert(
                spec.name.clone(),
                Tensor::from_slice(&d.values).view(dims.as_slice()),
            );
            Ok(())
        })
        .unwrap();
    Decoder::from_tensors(shape, DType::Float32, Device::Cpu, map, 1.0, 0).unwrap()
}

fn batch(ids: &[i64]) -> MicroBatch {
    let n = ids.len();
    MicroBatch {
        rows: 1,
        seq_len: n,
        input_ids: ids.to_vec(),
        labels: vec![IGNORE_INDEX; n],
        position_ids: (0..n as i64).collect(),
        segment_ids: None,
        row_lengths: vec![n],
        loss_tokens: 0,
        input_tokens: n,
        padded_tokens: n,
    }
}

#[test]
fn logits_match_hugging_face_phi3() {
    let d = tempfile::tempdir().unwrap();
    write_checkpoint(d.path(), &ModelShape::tiny(), 7).unwrap();
    if let Some(keep) = std::env::var_os("FTB_REFERENCE_DIR") {
        write_checkpoint(std::path::Path::new(&keep), &ModelShape::tiny(), 7).unwrap();
    }
    let model = load(d.path());
    let logits = tch::no_grad(|| model.logits(&Inputs::new(&batch(&IDS), Device::Cpu)));
    assert_eq!(logits.size(), vec![1, 15, 32_064]);
    for (pos, id, want) in EXPECTED {
        let got = logits.double_value(&[0, pos as i64, id as i64]);
        assert!(
            (got - want).abs() < 1e-4,
            "logit[{pos}, {id}] = {got}, Hugging Face gives {want}"
        );
    }
    let row_sums: Vec<f64> = (0..15)
        .map(|p| logits.get(0).get(p).sum(Kind::Double).double_value(&[]))
        .collect();
    for (p, (got, want)) in row_sums.iter().zip(REFERENCE_ROW_SUMS).enumerate() {
        assert!(
            (got - want).abs() < 1e-3,
            "row {p}: sum {got}, Hugging Face gives {want}"
        );
    }
}

/// Two documents packed in one row give each the logits it has alone.
#[test]
fn packed_row_equals_separate_documents() {
    let d = tempfile::tempdir().unwrap();
    write_checkpoint(d.path(), &ModelShape::tiny(), 7).unwrap();
    let model = load(d.path());
    let a = &IDS[..9];
    let b = &IDS[9..];
    let mut mb = batch(&IDS);
    mb.position_ids = (0..9).chain(0..6).collect();
    mb.segment_ids = Some([0; 9].into_iter().chain([1; 6]).collect());
    let packed = tch::no_grad(|| model.logits(&Inputs::new(&mb, Device::Cpu)));
    let la = tch::no_grad(|| model.logits(&Inputs::new(&batch(a), Device::Cpu)));
    let lb = tch::no_grad(|| model.logits(&Inputs::new(&batch(b), Device::Cpu)));
    let sep = Tensor::cat(&[la, lb], 1);
    let diff = (packed - &sep).abs().max().double_value(&[]);
    assert!(diff < 1e-5, "max |packed - separate| = {diff}");
}

/// Logits of a tiny checkpoint of `shape` (seed 7) at `ids`, positions from 1000. With
/// `FTB_REFERENCE_DIR` set, the checkpoint is also left at `<dir>/<keep_as>` for the script.
fn logits_at_1000(shape: &ModelShape, ids: &[i64], keep_as: Option<&str>) -> Tensor {
    let d = tempfile::tempdir().unwrap();
    write_checkpoint(d.path(), shape, 7).unwrap();
    if let (Some(keep), Some(name)) = (std::env::var_os("FTB_REFERENCE_DIR"), keep_as) {
        write_checkpoint(&std::path::Path::new(&keep).join(name), shape, 7).unwrap();
    }
    let model = load(d.path());
    assert_eq!(
        model.shape.family, shape.family,
        "config.json names the family"
    );
    let mut mb = batch(ids);
    mb.position_ids = (1000..1000 + ids.len() as i64).collect();
    tch::no_grad(|| model.logits(&Inputs::new(&mb, Device::Cpu)))
}

/// What `scripts/reference_logits_families.py` recorded for one family.
struct Reference<'a> {
    ids: &'a [i64],
    picks: &'a [(usize, usize, f64)],
    row_sums: &'a [f64],
    row_max_abs: &'a [f64],
    inv_freq: &'a [f64],
}

impl Reference<'_> {
    /// Largest difference from the picks, row sums and row maxima.
    fn max_difference(&self, logits: &Tensor) -> f64 {
        let mut worst = 0f64;
        for &(pos, id, want) in self.picks {
            let got = logits.double_value(&[0, pos as i64, id as i64]);
            worst = worst.max((got - want).abs());
        }
        for (p, (&sum, &max)) in self.row_sums.iter().zip(self.row_max_abs).enumerate() {
            let row = logits.get(0).get(p as i64).to_kind(Kind::Double);
            // Row sums add up 128k-152k logits: their tolerance is 10x the single values'.
            worst = worst.max((row.sum(Kind::Double).double_value(&[]) - sum).abs() / 10.0);
            worst = worst.max((row.abs().max().double_value(&[]) - max).abs());
        }
        worst
    }

    /// The tiny checkpoint of `preset` gives transformers' logits within 1e-4, and
    /// `theta^(-2j/D)` times `rope_frequency_scale` its inverse frequencies (fp32 there).
    fn check(&self, preset: shared::config::ModelPreset, dir_name: &str) {
        let shape = ModelShape::from_preset(preset);
        let logits = logits_at_1000(&shape, self.ids, Some(dir_name));
        assert_eq!(
            logits.size(),
            vec![1, self.ids.len() as i64, shape.vocab_size as i64]
        );
        let d = self.max_difference(&logits);
        assert!(
            d < 1e-4,
            "{dir_name}: logits differ from transformers' by {d:.2e}"
        );
        let dim = shape.head_dim() as f64;
        let scale = shape
            .rope_frequency_scale()
            .unwrap_or_else(|| vec![1.0; self.inv_freq.len()]);
        assert_eq!(scale.len(), self.inv_freq.len());
        for (j, (s, want)) in scale.iter().zip(self.inv_freq).enumerate() {
            let got = s / shape.rope_theta.powf(2.0 * j as f64 / dim);
            assert!(
                (got / want - 1.0).abs() < 1e-6,
                "{dir_name}: inv_freq[{j}] = {got}, transformers gives {want}"
            );
        }
    }
}

/// Llama 3 (grouped-query attention, llama3 RoPE scaling, tied head) against
/// `transformers.LlamaForCausalLM`. And the check has teeth: the same weights without the RoPE
/// correction miss the reference.
#[test]
fn logits_match_hugging_face_llama3() {
    use families::*;
    let r = Reference {
        ids: &TINY_LLAMA_IDS,
        picks: &TINY_LLAMA,
        row_sums: &TINY_LLAMA_ROW_SUMS,
        row_max_abs: &TINY_LLAMA_ROW_MAX_ABS,
        inv_freq: &TINY_LLAMA_INV_FREQ,
    };
    r.check(shared::config::ModelPreset::TinyLlama, "tiny-llama");
    let mut plain = ModelShape::from_preset(shared::config::ModelPreset::TinyLlama);
    plain.rope_scaling = None;
    let d = r.max_difference(&logits_at_1000(&plain, r.ids, None));
    // (Random weights this small make attention nearly uniform, so RoPE moves the logits
    // little: the miss is 1.8e-4, beyond the 1e-4 the check allows.)
    assert!(
        d > 1e-4,
        "without llama3 RoPE scaling the logits still match ({d:.2e})"
    );
}

/// Qwen3 (q/k RMSNorm per head, head_dim 32 at width 64, grouped-query attention, tied head)
/// against `transformers.Qwen3ForCausalLM`.
#[test]
fn logits_match_hugging_face_qwen3() {
    use families::*;
    Reference {
        ids: &TINY_QWEN3_IDS,
        picks: &TINY_QWEN3,
        row_sums: &TINY_QWEN3_ROW_SUMS,
        row_max_abs: &TINY_QWEN3_ROW_MAX_ABS,
        inv_freq: &TINY_QWEN3_INV_FREQ,
    }
    .check(shared::config::ModelPreset::TinyQwen3, "tiny-qwen3");
}
