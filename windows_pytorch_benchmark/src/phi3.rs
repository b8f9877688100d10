//! Phi-3 in tch, parameter names as in the Hugging Face checkpoint (`modeling_phi3.py`).
//!
//! Precision follows `DType`: `float32` everywhere; `bf16` weights and activations (RMSNorm
//! statistics, softmax inside SDPA and the loss in fp32); `mixed-bf16` keeps fp32 master weights
//! and a fp32 residual stream and runs every matrix product in bf16, as `torch.autocast(bf16)` does.

use std::collections::HashMap;

use anyhow::{bail, Result};
use shared::data::batch::{MicroBatch, IGNORE_INDEX};
use shared::model::ModelShape;
use tch::{Device, Kind, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    Float32,
    Bf16,
    MixedBf16,
}

impl DType {
    pub fn name(self) -> &'static str {
        match self {
            DType::Float32 => "float32",
            DType::Bf16 => "bf16",
            DType::MixedBf16 => "mixed-bf16",
        }
    }
    /// Kind the parameters are stored in.
    pub fn param_kind(self) -> Kind {
        match self {
            DType::Bf16 => Kind::BFloat16,
            _ => Kind::Float,
        }
    }
    /// Kind matrix products run in.
    pub fn compute_kind(self) -> Kind {
        match self {
            DType::Float32 => Kind::Float,
            _ => Kind::BFloat16,
        }
    }
}

/// A bias-free linear layer with an optional LoRA adapter.
pub struct Linear {
    pub weight: Tensor,
    pub lora: Option<Lora>,
}

pub struct Lora {
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f64,
}

impl Linear {
    fn forward(&self, x: &Tensor, dt: DType) -> Tensor {
        let ck = dt.compute_kind();
        let x = x.to_kind(ck);
        let y = x.linear::<Tensor>(&self.weight.to_kind(ck), None);
        match &self.lora {
            None => y,
            Some(l) => {
                y + x
                    .linear::<Tensor>(&l.a.to_kind(ck), None)
                    .linear::<Tensor>(&l.b.to_kind(ck), None)
                    * l.scale
            }
        }
    }
}

pub struct Block {
    pub input_layernorm: Tensor,
    pub qkv_proj: Linear,
    pub o_proj: Linear,
    pub post_attention_layernorm: Tensor,
    pub gate_up_proj: Linear,
    pub down_proj: Linear,
}

pub struct Phi3 {
    pub shape: ModelShape,
    pub dtype: DType,
    pub device: Device,
    pub embed_tokens: Tensor,
    pub layers: Vec<Block>,
    pub norm: Tensor,
    pub lm_head: Tensor,
    /// RoPE tables [max_positions, head_dim] in fp32.
    cos: Tensor,
    sin: Tensor,
    /// Blocks before this index are frozen with nothing trainable before them: they run without
    /// building an autograd graph (`last-n`).
    pub first_grad_layer: usize,
}

/// The micro-batch as device tensors.
pub struct Inputs {
    pub input_ids: Tensor,
    pub labels: Tensor,
    pub position_ids: Tensor,
    /// Boolean [rows, 1, T, T] mask for packed rows (true = may attend); None ⇒ causal.
    pub mask: Option<Tensor>,
    /// Flat indices of the positions that carry a loss, built on the host (no device sync).
    pub loss_positions: Tensor,
}

impl Inputs {
    pub fn new(mb: &MicroBatch, device: Device) -> Self {
        let shape = [mb.rows as i64, mb.seq_len as i64];
        let t = |v: &[i64]| Tensor::from_slice(v).view(shape).to_device(device);
        let mask = mb.segment_ids.as_ref().map(|seg| {
            let s = Tensor::from_slice(seg).view(shape).to_device(device);
            let t_len = mb.seq_len as i64;
            let idx = Tensor::arange(t_len, (Kind::Int64, device));
            let causal = idx.unsqueeze(1).ge_tensor(&idx.unsqueeze(0)); // [T(q), T(k)]: k <= q
            let same = s.unsqueeze(2).eq_tensor(&s.unsqueeze(1)); // [B, T, T]
            let real = s.ge(0).unsqueeze(2);
            let diag = idx.unsqueeze(1).eq_tensor(&idx.unsqueeze(0));
            // Real tokens: same document and not in the future. Padding: itself only.
            (same.logical_and(&causal).logical_and(&real))
                .logical_or(&diag)
                .unsqueeze(1)
        });
        let pos: Vec<i64> = mb
            .labels
            .iter()
            .enumerate()
            .filter(|(_, &l)| l != IGNORE_INDEX)
            .map(|(i, _)| i as i64)
            .collect();
        Self {
            input_ids: t(&mb.input_ids),
            labels: t(&mb.labels),
            position_ids: t(&mb.position_ids),
            mask,
            loss_positions: Tensor::from_slice(&pos).to_device(device),
        }
    }
}

/// RMSNorm through libtorch's own `rms_norm` (a fused kernel on CUDA that accumulates in fp32),
/// replacing seven element-wise passes that each kept an fp32 copy of the activations for the
/// backward pass. In fp32 it computes HF's `Phi3RMSNorm` exactly; in bf16 it differs from HF only
/// in where the final rounding to bf16 happens.
fn rms_norm(x: &Tensor, w: &Tensor, eps: f64, dt: DType) -> Tensor {
    match dt {
        // fp32 residual stream and fp32 weight, as under autocast.
        DType::MixedBf16 | DType::Float32 => {
            x.to_kind(Kind::Float)
                .rms_norm(&[w.size()[0]][..], Some(w), eps)
        }
        DType::Bf16 => x.rms_norm(&[w.size()[0]][..], Some(w), eps),
    }
}

fn rotate_half(x: &Tensor) -> Tensor {
    let half = x.size()[3] / 2;
    let x1 = x.narrow(3, 0, half);
    let x2 = x.narrow(3, half, half);
    Tensor::cat(&[x2.neg(), x1], 3)
}

impl Phi3 {
    /// Builds the model from named tensors (already on the device and in the parameter kind).
    pub fn from_tensors(
        shape: ModelShape,
        dtype: DType,
        device: Device,
        mut t: HashMap<String, Tensor>,
        lora_scale: f64,
        first_grad_layer: usize,
    ) -> Result<Self> {
        let mut take = |n: &str| -> Result<Tensor> {
            match t.remove(n) {
                Some(x) => Ok(x),
                None => bail!("internal: tensor {n} was not loaded"),
            }
        };
        let mut layers = Vec::with_capacity(shape.num_layers);
        for l in 0..shape.num_layers {
            let p = |s: &str| format!("model.layers.{l}.{s}");
            let lin = |m: &str, take: &mut dyn FnMut(&str) -> Result<Tensor>| -> Result<Linear> {
                let weight = take(&p(&format!("{m}.weight")))?;
                let a = take(&p(&format!("{m}.lora_A.weight"))).ok();
                let b = take(&p(&format!("{m}.lora_B.weight"))).ok();
                Ok(Linear {
                    weight,
                    lora: a.zip(b).map(|(a, b)| Lora {
                        a,
                        b,
                        scale: lora_scale,
                    }),
                })
            };
            let input_layernorm = take(&p("input_layernorm.weight"))?;
            let qkv_proj = lin("self_attn.qkv_proj", &mut take)?;
            let o_proj = lin("self_attn.o_proj", &mut take)?;
            let post_attention_layernorm = take(&p("post_attention_layernorm.weight"))?;
            let gate_up_proj = lin("mlp.gate_up_proj", &mut take)?;
            let down_proj = lin("mlp.down_proj", &mut take)?;
            layers.push(Block {
                input_layernorm,
                qkv_proj,
                o_proj,
                post_attention_layernorm,
                gate_up_proj,
                down_proj,
            });
        }
        let embed_tokens = take("model.embed_tokens.weight")?;
        let norm = take("model.norm.weight")?;
        let lm_head = take("lm_head.weight")?;
        // RoPE tables, fp32, as HF's Phi3RotaryEmbedding: inv_freq[j] = theta^(-2j/D).
        let d = shape.head_dim() as i64;
        let inv_freq =
            Tensor::arange_start_step(0, d, 2, (Kind::Float, device)).divide_scalar(d as f64);
        let inv_freq = Tensor::from(shape.rope_theta)
            .to_device(device)
            .to_kind(Kind::Float)
            .pow(&inv_freq)
            .reciprocal();
        let pos = Tensor::arange(shape.max_position_embeddings as i64, (Kind::Float, device));
        let freqs = pos.unsqueeze(1) * inv_freq.unsqueeze(0);
        let emb = Tensor::cat(&[&freqs, &freqs], 1);
        Ok(Self {
            cos: emb.cos(),
            sin: emb.sin(),
            shape,
            dtype,
            device,
            embed_tokens,
            layers,
            norm,
            lm_head,
            first_grad_layer,
        })
    }

    fn attention(
        &self,
        b: &Block,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
    ) -> Tensor {
        let s = &self.shape;
        let (bsz, t) = (x.size()[0], x.size()[1]);
        let (nh, nkv, hd) = (
            s.num_heads as i64,
            s.num_kv_heads as i64,
            s.head_dim() as i64,
        );
        let qkv = b.qkv_proj.forward(x, self.dtype);
        let q = qkv
            .narrow(2, 0, nh * hd)
            .view([bsz, t, nh, hd])
            .transpose(1, 2);
        let k = qkv
            .narrow(2, nh * hd, nkv * hd)
            .view([bsz, t, nkv, hd])
            .transpose(1, 2);
        let v = qkv
            .narrow(2, (nh + nkv) * hd, nkv * hd)
            .view([bsz, t, nkv, hd])
            .transpose(1, 2);
        let (cos, sin) = (cos.to_kind(q.kind()), sin.to_kind(q.kind()));
        let q = &q * &cos + rotate_half(&q) * &sin;
        let k = &k * &cos + rotate_half(&k) * &sin;
        let gqa = nkv != nh;
        let y = match mask {
            // Right-padded rows: causal attention alone keeps every real token away from padding.
            None => Tensor::scaled_dot_product_attention::<Tensor>(
                &q, &k, &v, None, 0.0, true, None, gqa,
            ),
            Some(m) => {
                Tensor::scaled_dot_product_attention(&q, &k, &v, Some(m), 0.0, false, None, gqa)
            }
        };
        let y = y.transpose(1, 2).reshape([bsz, t, nh * hd]);
        b.o_proj.forward(&y, self.dtype)
    }

    fn block(
        &self,
        b: &Block,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
    ) -> Tensor {
        let eps = self.shape.rms_norm_eps;
        let h = rms_norm(x, &b.input_layernorm, eps, self.dtype);
        let x = x + self.attention(b, &h, cos, sin, mask);
        let h = rms_norm(&x, &b.post_attention_layernorm, eps, self.dtype);
        let gu = b.gate_up_proj.forward(&h, self.dtype);
        let half = gu.size()[2] / 2;
        let gate = gu.narrow(2, 0, half);
        let up = gu.narrow(2, half, half);
        x + b.down_proj.forward(&(up * gate.silu()), self.dtype)
    }

    /// Hidden states after the final norm, [rows, T, H].
    pub fn hidden(&self, inp: &Inputs) -> Tensor {
        // RoPE tables gathered at each token's position: [rows, 1, T, head_dim].
        let (rows, t) = (inp.position_ids.size()[0], inp.position_ids.size()[1]);
        let at_positions = |table: &Tensor| {
            table
                .index_select(0, &inp.position_ids.view([-1]))
                .view([rows, 1, t, -1])
        };
        let (cos, sin) = (at_positions(&self.cos), at_positions(&self.sin));
        let emb = Tensor::embedding(&self.embed_tokens, &inp.input_ids, -1, false, false);
        let mut x = match self.dtype {
            DType::MixedBf16 => emb, // fp32 residual stream
            _ => emb.to_kind(self.dtype.param_kind()),
        };
        let mask = inp.mask.as_ref();
        // Frozen prefix: no autograd graph, no activations kept.
        if self.first_grad_layer > 0 {
            x = tch::no_grad(|| {
                let mut x = x;
                for b in &self.layers[..self.first_grad_layer] {
                    x = self.block(b, &x, &cos, &sin, mask);
                }
                x
            });
        }
        for b in &self.layers[self.first_grad_layer..] {
            x = self.block(b, &x, &cos, &sin, mask);
        }
        rms_norm(&x, &self.norm, self.shape.rms_norm_eps, self.dtype)
    }

    /// The LM head on hidden states [..., H]: logits [..., V] in fp32.
    fn head(&self, h: &Tensor) -> Tensor {
        let ck = self.dtype.compute_kind();
        h.to_kind(ck)
            .linear::<Tensor>(&self.lm_head.to_kind(ck), None)
            .to_kind(Kind::Float)
    }

    /// Logits [rows, T, V] in fp32 at every position.
    pub fn logits(&self, inp: &Inputs) -> Tensor {
        self.head(&self.hidden(inp))
    }

    /// Sum of token cross-entropies over labelled positions (fp32 scalar). The LM head and the
    /// loss run only at positions that carry a loss (prompt and padding positions need no
    /// logits), as in the MLX binary; `step_flops` counts the head per loss token accordingly.
    pub fn loss_sum(&self, inp: &Inputs) -> Tensor {
        let h = self.hidden(inp);
        let hsz = h.size()[2];
        let labels = inp.labels.view([-1]);
        let keep = &inp.loss_positions;
        let logits = self.head(&h.view([-1, hsz]).index_select(0, keep));
        logits.cross_entropy_loss::<Tensor>(
            &labels.index_select(0, keep),
            None,
            tch::Reduction::Sum,
            IGNORE_INDEX,
            0.0,
        )
    }
}
