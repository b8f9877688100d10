//! Phi-3 in mlx-rs: the whole decoder in one file, with the Hugging Face checkpoint's parameter
//! names (`model.layers.{i}.self_attn.qkv_proj.weight`, ...) so that real safetensors load
//! unchanged and the PyTorch binary's tensors line up name for name.
//!
//! The struct tree mirrors the checkpoint: `ModuleParameters` flattens field names with dots, so
//! `Phi3ForCausalLM.model.layers[0].self_attn.qkv_proj.lora_A.weight` is the key
//! `model.layers.0.self_attn.qkv_proj.lora_A.weight` (peft's adapter name).
//!
//! Numerics follow Hugging Face's `modeling_phi3.py` (and peft's LoRA):
//! - RMSNorm statistics in fp32, the normalised value cast back to the activation dtype, then
//!   multiplied by the weight (`Phi3RMSNorm`);
//! - the fused `qkv_proj` is split q | k | v, the fused `gate_up_proj` gate | up;
//! - RoPE in the non-interleaved ("rotate_half") form with per-token positions, so that packed
//!   documents restart at position 0;
//! - attention softmax in fp32 (`fast::scaled_dot_product_attention` with a causal or a
//!   document mask);
//! - logits are returned in the activation dtype (at the loss positions when asked); the loss
//!   (train.rs) upcasts them to fp32.

#![allow(non_snake_case)] // `lora_A` / `lora_B`: the field names are the checkpoint names.

use std::collections::HashMap;

use anyhow::{bail, Context, Result};
use mlx_rs::error::Exception;
use mlx_rs::fast::{self, ScaledDotProductAttentionMask};
use mlx_rs::macros::ModuleParameters;
use mlx_rs::module::{Param, Parameter};
use mlx_rs::{ops, Array, Dtype};
use shared::config::StrategyConfig;
use shared::data::batch::{MicroBatch, IGNORE_INDEX};
use shared::model::ModelShape;

/// How weights and activations are stored and computed (`--dtype`, resolved).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// fp32 weights and compute: the parity reference.
    Float32,
    /// bf16 weights, activations and gradients; norms' statistics, softmax and loss in fp32.
    Bf16,
    /// fp32 master weights; matrix products in bf16 by casting their inputs (as
    /// `torch.autocast(bfloat16)` does); norms, softmax, residual stream and loss in fp32.
    MixedBf16,
}

impl Precision {
    /// The name the summary uses.
    pub fn name(self) -> &'static str {
        match self {
            Precision::Float32 => "float32",
            Precision::Bf16 => "bf16",
            Precision::MixedBf16 => "mixed-bf16",
        }
    }

    /// Storage dtype of weights (and therefore of gradients).
    pub fn param_dtype(self) -> Dtype {
        match self {
            Precision::Bf16 => Dtype::Bfloat16,
            Precision::Float32 | Precision::MixedBf16 => Dtype::Float32,
        }
    }
}

/// `x * s` with the scalar in `x`'s dtype: an fp32 scalar would promote a bf16 array to fp32.
pub fn scale(x: &Array, s: f32) -> Result<Array, Exception> {
    x.multiply(Array::from_f32(s).as_dtype(x.dtype())?)
}

/// A bare weight (`<module>.weight`): the LoRA factors, the LM head and the embedding.
#[derive(Debug, ModuleParameters)]
pub struct Weight {
    #[param]
    pub weight: Param<Array>,
}

/// A bias-free linear projection `y = x W^T`, optionally with a LoRA adapter:
/// `y = x W^T + (alpha / rank) * (x A^T) B^T` (peft, no dropout).
#[derive(Debug, ModuleParameters)]
pub struct Projection {
    #[param]
    pub weight: Param<Array>,
    #[param]
    pub lora_A: Option<Weight>,
    #[param]
    pub lora_B: Option<Weight>,
    /// `alpha / rank`.
    pub lora_scale: f32,
}

/// `x W^T`; under mixed precision both operands are cast to bf16 first (autocast's rule for
/// `linear`), so the product is bf16.
fn matmul_t(x: &Array, w: &Array, p: Precision) -> Result<Array, Exception> {
    match p {
        Precision::MixedBf16 => x
            .as_dtype(Dtype::Bfloat16)?
            .matmul(w.as_dtype(Dtype::Bfloat16)?.t()),
        Precision::Float32 | Precision::Bf16 => x.matmul(w.t()),
    }
}

impl Projection {
    pub fn forward(&self, x: &Array, p: Precision) -> Result<Array, Exception> {
        let y = matmul_t(x, &self.weight, p)?;
        match (&self.lora_A, &self.lora_B) {
            (Some(a), Some(b)) => {
                let low = matmul_t(&matmul_t(x, &a.weight, p)?, &b.weight, p)?;
                y.add(scale(&low, self.lora_scale)?)
            }
            _ => Ok(y),
        }
    }
}

/// Phi-3's RMSNorm (`Phi3RMSNorm`).
#[derive(Debug, ModuleParameters)]
pub struct RmsNorm {
    #[param]
    pub weight: Param<Array>,
    pub eps: f32,
}

impl RmsNorm {
    /// `weight * (x32 * rsqrt(mean(x32^2) + eps)).to(x.dtype)`.
    pub fn forward(&self, x: &Array) -> Result<Array, Exception> {
        let x32 = x.as_dtype(Dtype::Float32)?;
        let var = x32.square()?.mean_axis(-1, true)?;
        let normed = x32.multiply(var.add(Array::from_f32(self.eps))?.rsqrt()?)?;
        self.weight.multiply(normed.as_dtype(x.dtype())?)
    }
}

#[derive(Debug, ModuleParameters)]
pub struct Attention {
    #[param]
    pub qkv_proj: Projection,
    #[param]
    pub o_proj: Projection,
    pub num_heads: i32,
    pub num_kv_heads: i32,
    pub head_dim: i32,
}

/// `rotate_half`: `[-x2, x1]` for the two halves of the last axis.
fn rotate_half(x: &Array) -> Result<Array, Exception> {
    let halves = x.split_equal(2, -1)?;
    ops::concatenate(&[halves[1].negative()?, halves[0].clone()], -1)
}

/// `x * cos + rotate_half(x) * sin`, with cos/sin cast to `x`'s dtype as Hugging Face does.
fn apply_rope(x: &Array, cos: &Array, sin: &Array) -> Result<Array, Exception> {
    let (cos, sin) = (cos.as_dtype(x.dtype())?, sin.as_dtype(x.dtype())?);
    x.multiply(&cos)?.add(rotate_half(x)?.multiply(&sin)?)
}

impl Attention {
    fn forward(
        &self,
        x: &Array,
        inp: &ForwardInputs<'_>,
        p: Precision,
    ) -> Result<Array, Exception> {
        let (b, t) = (x.dim(0), x.dim(1));
        let (h, kv, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let qkv = self.qkv_proj.forward(x, p)?;
        // q = the first h*d columns, k = the next kv*d, v = the rest.
        let parts = qkv.split_at_indices(&[h * d, (h + kv) * d], -1)?;
        // [B, T, heads, D] -> [B, heads, T, D]
        let heads = |a: &Array, n: i32| a.reshape(&[b, t, n, d])?.transpose_axes(&[0, 2, 1, 3]);
        let q = apply_rope(&heads(&parts[0], h)?, inp.cos, inp.sin)?;
        let k = apply_rope(&heads(&parts[1], kv)?, inp.cos, inp.sin)?;
        let v = heads(&parts[2], kv)?;
        let mask = match inp.mask {
            Some(m) => ScaledDotProductAttentionMask::Array(m),
            None => ScaledDotProductAttentionMask::Causal,
        };
        let scale = 1.0 / (d as f32).sqrt();
        let out = fast::scaled_dot_product_attention(&q, &k, &v, scale, mask, None)?;
        let out = out.transpose_axes(&[0, 2, 1, 3])?.reshape(&[b, t, h * d])?;
        self.o_proj.forward(&out, p)
    }
}

#[derive(Debug, ModuleParameters)]
pub struct Mlp {
    #[param]
    pub gate_up_proj: Projection,
    #[param]
    pub down_proj: Projection,
}

impl Mlp {
    /// `down(up * silu(gate))`, gate = the first half of `gate_up_proj`'s output.
    fn forward(&self, x: &Array, p: Precision) -> Result<Array, Exception> {
        let gu = self.gate_up_proj.forward(x, p)?.split_equal(2, -1)?;
        let (gate, up) = (&gu[0], &gu[1]);
        // silu written out: mlx-rs's `nn::silu` is a compiled closure, and compiling on the CPU
        // means generating and building C++ at run time (~12 s on the first call).
        let silu = gate.multiply(ops::sigmoid(gate)?)?;
        self.down_proj.forward(&up.multiply(silu)?, p)
    }
}

#[derive(Debug, ModuleParameters)]
pub struct DecoderLayer {
    #[param]
    pub input_layernorm: RmsNorm,
    #[param]
    pub self_attn: Attention,
    #[param]
    pub post_attention_layernorm: RmsNorm,
    #[param]
    pub mlp: Mlp,
}

impl DecoderLayer {
    fn forward(
        &self,
        x: &Array,
        inp: &ForwardInputs<'_>,
        p: Precision,
    ) -> Result<Array, Exception> {
        let h = x.add(
            self.self_attn
                .forward(&self.input_layernorm.forward(x)?, inp, p)?,
        )?;
        h.add(
            self.mlp
                .forward(&self.post_attention_layernorm.forward(&h)?, p)?,
        )
    }
}

#[derive(Debug, ModuleParameters)]
pub struct Phi3Model {
    #[param]
    pub embed_tokens: Weight,
    #[param]
    pub layers: Vec<DecoderLayer>,
    #[param]
    pub norm: RmsNorm,
}

#[derive(Debug, ModuleParameters)]
pub struct Phi3ForCausalLM {
    #[param]
    pub model: Phi3Model,
    #[param]
    pub lm_head: Weight,
    pub precision: Precision,
}

/// What a forward pass needs besides the token ids.
#[derive(Clone, Copy)]
pub struct ForwardInputs<'a> {
    /// `[B, T]` int32 token ids.
    pub ids: &'a Array,
    /// `[B, 1, T, head_dim]` fp32 RoPE tables for each token's position.
    pub cos: &'a Array,
    pub sin: &'a Array,
    /// `[B, 1, T, T]` boolean (true = may attend) for packed rows; `None` = causal.
    pub mask: Option<&'a Array>,
    /// `[L]` int32 flat indices into `B*T`: the positions whose logits are wanted (the loss
    /// positions); `None` = every position.
    pub positions: Option<&'a Array>,
}

impl Phi3ForCausalLM {
    /// Logits in the activation dtype (bf16 under bf16 and mixed-bf16): `[B, T, vocab]`, or
    /// `[L, vocab]` at `inp.positions` only.
    ///
    /// Training asks for the loss positions only: the logits elsewhere (prompt, padding) never
    /// reach the loss, and with Phi-3's 32,064-entry vocabulary the LM head and the softmax
    /// over it are most of a small model's work (on the CPU, MLX's `exp` is scalar code).
    pub fn forward(&self, inp: &ForwardInputs<'_>) -> Result<Array, Exception> {
        let p = self.precision;
        let mut x = self.model.embed_tokens.weight.take_axis(inp.ids, 0)?;
        for layer in &self.model.layers {
            x = layer.forward(&x, inp, p)?;
        }
        let x = match inp.positions {
            Some(idx) => x.reshape(&[-1, x.dim(-1)])?.take_axis(idx, 0)?,
            None => x,
        };
        // RMSNorm is per position, so selecting before it is the same as after.
        let x = self.model.norm.forward(&x)?;
        matmul_t(&x, &self.lm_head.weight, p)
    }

    /// Builds the model from named tensors (checkpoint names), freezing every parameter that
    /// does not train under `strategy`. Every tensor in `tensors` must be used exactly once.
    pub fn from_tensors(
        shape: &ModelShape,
        strategy: &StrategyConfig,
        precision: Precision,
        mut tensors: HashMap<String, Array>,
    ) -> Result<Self> {
        let mut take = |name: &str| -> Result<Param<Array>> {
            let a = tensors
                .remove(name)
                .with_context(|| format!("no tensor named {name}"))?;
            let mut p = Param::new(a);
            if !shape.is_trainable(name, strategy) {
                p.freeze(true);
            }
            Ok(p)
        };
        let lora_scale = (strategy.lora_alpha / strategy.lora_rank.max(1) as f64) as f32;
        let eps = shape.rms_norm_eps as f32;
        let mut layers = Vec::with_capacity(shape.num_layers);
        for l in 0..shape.num_layers {
            let mut proj = |module: &str| -> Result<Projection> {
                let base = format!("model.layers.{l}.{module}");
                let weight = take(&format!("{base}.weight"))?;
                let (a, b) = (
                    format!("{base}.lora_A.weight"),
                    format!("{base}.lora_B.weight"),
                );
                let adapted = shape.lora_parameters(strategy).iter().any(|s| s.name == a);
                let (lora_A, lora_B) = if adapted {
                    (
                        Some(Weight { weight: take(&a)? }),
                        Some(Weight { weight: take(&b)? }),
                    )
                } else {
                    (None, None)
                };
                Ok(Projection {
                    weight,
                    lora_A,
                    lora_B,
                    lora_scale,
                })
            };
            let qkv_proj = proj("self_attn.qkv_proj")?;
            let o_proj = proj("self_attn.o_proj")?;
            let gate_up_proj = proj("mlp.gate_up_proj")?;
            let down_proj = proj("mlp.down_proj")?;
            layers.push(DecoderLayer {
                input_layernorm: RmsNorm {
                    weight: take(&format!("model.layers.{l}.input_layernorm.weight"))?,
                    eps,
                },
                self_attn: Attention {
                    qkv_proj,
                    o_proj,
                    num_heads: shape.num_heads as i32,
                    num_kv_heads: shape.num_kv_heads as i32,
                    head_dim: shape.head_dim() as i32,
                },
                post_attention_layernorm: RmsNorm {
                    weight: take(&format!("model.layers.{l}.post_attention_layernorm.weight"))?,
                    eps,
                },
                mlp: Mlp {
                    gate_up_proj,
                    down_proj,
                },
            });
        }
        let model = Phi3Model {
            embed_tokens: Weight {
                weight: take("model.embed_tokens.weight")?,
            },
            layers,
            norm: RmsNorm {
                weight: take("model.norm.weight")?,
                eps,
            },
        };
        let lm_head = Weight {
            weight: take("lm_head.weight")?,
        };
        if !tensors.is_empty() {
            let mut left: Vec<&String> = tensors.keys().collect();
            left.sort();
            bail!("tensors not used by the Phi-3 model: {left:?}");
        }
        Ok(Self {
            model,
            lm_head,
            precision,
        })
    }
}

/// One micro-batch as device arrays (built on the host from shared's `MicroBatch`).
pub struct MicroBatchArrays {
    pub ids: Array,
    pub cos: Array,
    pub sin: Array,
    pub mask: Option<Array>,
    /// `[L]` int32 flat indices of the positions whose label counts (label != -100).
    pub positions: Array,
    /// `[L]` int32 target ids at those positions.
    pub targets: Array,
}

/// RoPE inverse frequencies as Hugging Face computes them (fp32): `theta^(-2j/D)`.
fn inv_freq(theta: f64, head_dim: usize) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|j| 1.0f32 / (theta as f32).powf((2 * j) as f32 / head_dim as f32))
        .collect()
}

impl MicroBatchArrays {
    pub fn new(mb: &MicroBatch, shape: &ModelShape) -> Result<Self> {
        let (b, t) = (mb.rows as i32, mb.seq_len as i32);
        let n = mb.rows * mb.seq_len;
        let ids: Vec<i32> = mb.input_ids.iter().map(|&x| x as i32).collect();
        let positions: Vec<i32> = (0..n)
            .filter(|&i| mb.labels[i] != IGNORE_INDEX)
            .map(|i| i as i32)
            .collect();
        let targets: Vec<i32> = positions
            .iter()
            .map(|&i| mb.labels[i as usize] as i32)
            .collect();
        // cos/sin of position * inv_freq, each half repeated (`emb = cat(freqs, freqs)`), in fp32
        // as Hugging Face computes them.
        let d = shape.head_dim();
        let inv = inv_freq(shape.rope_theta, d);
        let mut cos = Vec::with_capacity(n * d);
        let mut sin = Vec::with_capacity(n * d);
        for &pos in &mb.position_ids {
            let angles: Vec<f32> = inv.iter().map(|f| pos as f32 * f).collect();
            for _ in 0..2 {
                cos.extend(angles.iter().map(|a| a.cos()));
                sin.extend(angles.iter().map(|a| a.sin()));
            }
        }
        let mask = match &mb.segment_ids {
            None => None,
            Some(seg) => Some(document_mask(&Array::from_slice(seg, &[b, t]), t)?),
        };
        Ok(Self {
            ids: Array::from_slice(&ids, &[b, t]),
            cos: Array::from_slice(&cos, &[b, 1, t, d as i32]),
            sin: Array::from_slice(&sin, &[b, 1, t, d as i32]),
            mask,
            positions: Array::from_slice(&positions, &[positions.len() as i32]),
            targets: Array::from_slice(&targets, &[targets.len() as i32]),
        })
    }

    pub fn forward_inputs(&self) -> ForwardInputs<'_> {
        ForwardInputs {
            ids: &self.ids,
            cos: &self.cos,
            sin: &self.sin,
            mask: self.mask.as_ref(),
            positions: Some(&self.positions),
        }
    }
}

/// `[B, 1, T, T]` boolean mask of `MicroBatch::may_attend` for packed rows: query q sees key k
/// when k <= q and both belong to the same document; padding (segment -1) sees itself only.
fn document_mask(seg: &Array, t: i32) -> Result<Array, Exception> {
    let b = seg.dim(0);
    let sq = seg.reshape(&[b, 1, t, 1])?;
    let sk = seg.reshape(&[b, 1, 1, t])?;
    let q = ops::arange::<_, i32>(0, t, None)?.reshape(&[t, 1])?;
    let k = ops::arange::<_, i32>(0, t, None)?.reshape(&[1, t])?;
    let causal = k.le(&q)?;
    let diagonal = k.eq(&q)?;
    let same_document = sq.eq(&sk)?.logical_and(sq.ge(Array::from_int(0))?)?;
    causal.logical_and(same_document.logical_or(diagonal)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mlx_rs::Device;
    use shared::data::batch::MicroBatch;

    fn packed_micro_batch() -> MicroBatch {
        // One row of 7: document 0 (3 tokens), document 1 (2 tokens), 2 padding positions.
        let seg = vec![0, 0, 0, 1, 1, -1, -1];
        MicroBatch {
            rows: 1,
            seq_len: 7,
            input_ids: vec![5, 6, 7, 8, 9, 32000, 32000],
            labels: vec![6, 7, -100, 9, -100, -100, -100],
            position_ids: vec![0, 1, 2, 0, 1, 5, 6],
            segment_ids: Some(seg),
            row_lengths: vec![5],
            loss_tokens: 3,
            input_tokens: 5,
            padded_tokens: 7,
        }
    }

    #[test]
    fn document_mask_is_may_attend() {
        Device::set_default(&Device::cpu());
        let mb = packed_micro_batch();
        let arrays = MicroBatchArrays::new(&mb, &ModelShape::tiny()).unwrap();
        let m = arrays.mask.unwrap();
        assert_eq!(m.shape(), &[1, 1, 7, 7]);
        let v: Vec<bool> = m.as_slice::<bool>().to_vec();
        for q in 0..7 {
            for k in 0..7 {
                assert_eq!(v[q * 7 + k], mb.may_attend(0, q, k), "q {q} k {k}");
            }
        }
    }

    #[test]
    fn rope_tables_restart_per_document() {
        Device::set_default(&Device::cpu());
        let shape = ModelShape::tiny();
        let arrays = MicroBatchArrays::new(&packed_micro_batch(), &shape).unwrap();
        let d = shape.head_dim();
        let cos: Vec<f32> = arrays.cos.as_slice::<f32>().to_vec();
        // Position 0 (token 0 and token 3): cos = 1 everywhere.
        assert!(cos[..d].iter().all(|&c| c == 1.0));
        assert!(cos[3 * d..4 * d].iter().all(|&c| c == 1.0));
        // Position 1, frequency 0: cos(1); the second half repeats the first.
        assert!((cos[d] - 1f32.cos()).abs() < 1e-7);
        assert_eq!(cos[d], cos[d + d / 2]);
    }

    #[test]
    fn rotate_half_matches_hugging_face() {
        Device::set_default(&Device::cpu());
        let x = Array::from_slice(&[1f32, 2., 3., 4.], &[1, 4]);
        let r = rotate_half(&x).unwrap();
        assert_eq!(r.as_slice::<f32>(), &[-3., -4., 1., 2.]);
    }
}
