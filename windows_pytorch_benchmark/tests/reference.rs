//! The tch Phi-3 against Hugging Face's implementation: logits of a fixed tiny checkpoint.
//!
//! How the expected values were obtained: this test writes the tiny checkpoint (shape `tiny`,
//! seed 7) with `shared::model::write_checkpoint`; with `FTB_REFERENCE_DIR=<dir>` it also leaves a
//! copy there. `scripts/reference_logits.py <dir>` then loads that folder with
//! `transformers.Phi3ForCausalLM` (transformers 4.57.x, torch 2.11.0, fp32, eager attention) and
//! prints the values below for the same input ids. Recorded once on 2026-11-28.

use std::collections::HashMap;

use shared::data::batch::{MicroBatch, IGNORE_INDEX};
use shared::model::{write_checkpoint, ModelShape, WeightSource};
use tch::{Device, Kind, Tensor};
use windows_pytorch_benchmark::phi3::{DType, Inputs, Phi3};

pub const IDS: [i64; 15] = [
    1, 32010, 29871, 13, 500, 600, 700, 32007, 29871, 13, 32001, 29871, 13, 800, 900,
];

/// (position, vocabulary id, logit) from Hugging Face.
const EXPECTED: [(usize, usize, f64); 6] = REFERENCE;
include!("common/reference_values.rs");

fn load(dir: &std::path::Path) -> Phi3 {
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
    Phi3::from_tensors(shape, DType::Float32, Device::Cpu, map, 1.0, 0).unwrap()
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
