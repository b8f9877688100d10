//! One decoder in tch for every family of `shared::model` (Phi-3, Llama 3.x, Qwen3), parameter
//! names as in the Hugging Face checkpoints (`modeling_phi3.py`, `modeling_llama.py`,
//! `modeling_qwen3.py`): Phi-3's fused `qkv_proj`/`gate_up_proj` or the split q/k/v and gate/up
//! projections, grouped-query attention, Qwen3's RMSNorm on q and k per head, Llama 3's RoPE
//! frequency correction and a tied LM head all come from the shape; nothing is per family here.
//!
//! Precision follows `DType`: `float32` everywhere; `bf16` weights and activations (RMSNorm
//! statistics, softmax inside SDPA and the loss in fp32); `mixed-bf16` keeps fp32 master weights
//! and a fp32 residual stream and runs every matrix product in bf16, as `torch.autocast(bf16)` does.

use std::collections::HashMap;

use anyhow::Result;
use shared::data::batch::{self, MicroBatch, IGNORE_INDEX};
use shared::model::ModelShape;
use shared::tensors::NamedTensors;
use tch::{Device, Kind, Tensor};

/// The run's precision (`--dtype`, resolved by shared's one rule).
pub use shared::measure::memory::Precision as DType;

/// The libtorch kinds a precision stores and computes in.
pub trait Kinds {
    /// Kind the parameters are stored in.
    fn param_kind(self) -> Kind;
    /// Kind matrix products run in.
    fn compute_kind(self) -> Kind;
}

impl Kinds for DType {
    fn param_kind(self) -> Kind {
        match self {
            DType::Bf16 => Kind::BFloat16,
            _ => Kind::Float,
        }
    }
    fn compute_kind(self) -> Kind {
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
        let rows = self.weight.size()[0];
        self.forward_split(x, &[rows], dt).pop().expect("one part")
    }

    /// The output in parts, each from its own consecutive rows of the weight (`sizes` add up to
    /// the output width). Each part comes out of its own matrix product as a contiguous tensor,
    /// so what follows (RoPE on q/k, SiLU x up) runs on contiguous memory instead of strided
    /// views of one fused output. The weight rows are views, not copies; a trainable weight's
    /// gradient gathers the parts' gradients (ATen's `narrow` backward).
    fn forward_split(&self, x: &Tensor, sizes: &[i64], dt: DType) -> Vec<Tensor> {
        let ck = dt.compute_kind();
        let x = x.to_kind(ck);
        let w = self.weight.to_kind(ck);
        // LoRA: the scale goes on the rank-r activations (small), not on the output.
        let xa = self.lora.as_ref().map(|l| {
            let xa = x.linear::<Tensor>(&l.a.to_kind(ck), None);
            let r = xa.size()[xa.dim() - 1];
            (xa * l.scale).view([-1, r])
        });
        let whole = sizes.len() == 1;
        let mut start = 0;
        sizes
            .iter()
            .map(|&n| {
                let part = |t: &Tensor| {
                    if whole {
                        t.shallow_clone()
                    } else {
                        t.narrow(0, start, n)
                    }
                };
                let y = x.linear::<Tensor>(&part(&w), None);
                let y = match (&self.lora, &xa) {
                    // y + (s·xA) Bᵀ in one product that accumulates into y (addmm, beta = 1)
                    // instead of a product, a scaling pass and an addition over the output.
                    (Some(l), Some(xa)) => {
                        let shape = y.size();
                        y.view([-1, n])
                            .addmm(xa, &part(&l.b.to_kind(ck)).tr())
                            .view(shape.as_slice())
                    }
                    _ => y,
                };
                start += n;
                y
            })
            .collect()
    }
}

/// q, k and v: one fused projection (Phi-3) or three (Llama, Qwen3).
pub enum QkvProj {
    Fused(Linear),
    Split { q: Linear, k: Linear, v: Linear },
}

/// gate and up: one fused projection (Phi-3) or two.
pub enum GateUpProj {
    Fused(Linear),
    Split { gate: Linear, up: Linear },
}

pub struct Block {
    pub input_layernorm: Tensor,
    pub qkv: QkvProj,
    /// Qwen3: RMSNorm weights `[head_dim]` on q and k per head, before RoPE.
    pub q_norm: Option<Tensor>,
    pub k_norm: Option<Tensor>,
    pub o_proj: Linear,
    pub post_attention_layernorm: Tensor,
    pub gate_up: GateUpProj,
    pub down_proj: Linear,
}

pub struct Decoder {
    pub shape: ModelShape,
    pub dtype: DType,
    pub device: Device,
    pub embed_tokens: Tensor,
    pub layers: Vec<Block>,
    pub norm: Tensor,
    /// The LM head's matrix; with a tied head the embedding itself (the same leaf tensor, so
    /// both uses add into one gradient).
    pub lm_head: Tensor,
    /// Whether the embedding lookup is differentiated (`ModelShape::embedding_lookup_trains`):
    /// under last-n a tied embedding trains through the head only.
    pub lookup_grad: bool,
    /// RoPE tables [max_positions, head_dim] in fp32; the sine with its first half negated.
    cos: Tensor,
    sin_signed: Tensor,
    /// Blocks before this index are frozen with nothing trainable before them: they run without
    /// building an autograd graph (`last-n`).
    pub first_grad_layer: usize,
    /// The LM head and the loss run over this many loss tokens at a time, each chunk's backward
    /// right after its forward, so that one chunk's logits are alive at once
    /// (`shared::measure::memory::HEAD_CHUNK_TOKENS`, which the estimate counts).
    pub head_chunk_tokens: usize,
}

/// How attention keeps tokens apart.
pub enum Attention {
    /// One right-padded record per row: causal attention alone keeps real tokens off padding.
    Causal,
    /// Packed rows: boolean [rows, 1, T, T] mask (true = may attend).
    Mask(Tensor),
    /// One row of real tokens only, documents end to end (padding dropped): causal flash
    /// attention within each document, `cu_seqlens` int32 [docs + 1].
    Varlen { cu_seqlens: Tensor, max_len: i64 },
}

/// The micro-batch as device tensors.
pub struct Inputs {
    pub input_ids: Tensor,
    pub labels: Tensor,
    pub position_ids: Tensor,
    pub attention: Attention,
    /// Flat indices of the positions that carry a loss, built on the host (no device sync).
    pub loss_positions: Tensor,
}

/// [`shared::data::batch::loss_positions`] as an int64 tensor on the device.
fn loss_positions(labels: &[i64], device: Device) -> Tensor {
    let pos: Vec<i64> = batch::loss_positions(labels)
        .into_iter()
        .map(|i| i as i64)
        .collect();
    Tensor::from_slice(&pos).to_device(device)
}

impl Inputs {
    /// The micro-batch as laid out by the plan, padding included.
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
        Self {
            input_ids: t(&mb.input_ids),
            labels: t(&mb.labels),
            position_ids: t(&mb.position_ids),
            attention: mask.map_or(Attention::Causal, Attention::Mask),
            loss_positions: loss_positions(&mb.labels, device),
        }
    }

    /// The micro-batch's real tokens only, every document end to end in one row, for
    /// variable-length flash attention: no position of padding is computed at all, whatever the
    /// plan (a padded or bucketed row is one document, a packed row one or more). The loss is the
    /// same sum over the same labelled positions.
    pub fn varlen(mb: &MicroBatch, device: Device) -> Self {
        // Document ends (offsets into the flat tokens): shared's real-token layout.
        let real = mb.real_tokens();
        let labels = real.pick(&mb.labels);
        let cu: Vec<i32> = real.doc_bounds.iter().map(|&b| b as i32).collect();
        let t = |v: &[i64]| {
            Tensor::from_slice(v)
                .view([1, v.len() as i64])
                .to_device(device)
        };
        Self {
            input_ids: t(&real.pick(&mb.input_ids)),
            labels: t(&labels),
            position_ids: t(&real.pick(&mb.position_ids)),
            attention: Attention::Varlen {
                cu_seqlens: Tensor::from_slice(&cu).to_device(device),
                max_len: real.longest_doc() as i64,
            },
            loss_positions: loss_positions(&labels, device),
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

/// A micro-batch's forward pass, kept for its backward pass ([`Decoder::forward`]).
pub struct Forward {
    /// The micro-batch's loss sum over the step's loss tokens, without autograd: the head's
    /// backward has run (see `head_loss_chunked`).
    pub loss: Tensor,
    /// The hidden states at the loss positions (with the graph that made them) and their
    /// gradient from the head: the backward pass of the rest starts here.
    head_grad: Option<(Tensor, Tensor)>,
    checkpointed: Option<Checkpointed>,
}

/// What activation checkpointing keeps between the passes: the input of every block that needs
/// gradients, the RoPE tables, and the last block's output, cut from the (absent) graph of the
/// blocks, whose gradient starts their backward pass.
struct Checkpointed {
    inputs: Vec<Tensor>,
    last: Tensor,
    rope: Rope,
}

/// RoPE tables at each token's position, [rows, T, 1, head_dim] in the compute kind, with the
/// sine's first half negated so that HF's `x * cos + rotate_half(x) * sin` becomes
/// `x * cos + roll(x, half) * sin_signed`: three kernels (mul, roll, addcmul) instead of five.
pub struct Rope {
    cos: Tensor,
    sin_signed: Tensor,
}

impl Rope {
    fn apply(&self, x: &Tensor) -> Tensor {
        let half = x.size()[3] / 2;
        (x * &self.cos).addcmul(&x.roll([half], [3]), &self.sin_signed)
    }
}

impl Decoder {
    /// Builds the model from named tensors (already on the device and in the parameter kind).
    pub fn from_tensors(
        shape: ModelShape,
        dtype: DType,
        device: Device,
        t: HashMap<String, Tensor>,
        lora_scale: f64,
        first_grad_layer: usize,
    ) -> Result<Self> {
        let mut t = NamedTensors::new(t);
        let mut layers = Vec::with_capacity(shape.num_layers);
        for l in 0..shape.num_layers {
            let p = |s: &str| format!("model.layers.{l}.{s}");
            let lin = |m: &str, t: &mut NamedTensors<Tensor>| -> Result<Linear> {
                let weight = t.take(&p(&format!("{m}.weight")))?;
                let a = t.take_if_loaded(&p(&format!("{m}.lora_A.weight")));
                let b = t.take_if_loaded(&p(&format!("{m}.lora_B.weight")));
                Ok(Linear {
                    weight,
                    lora: a.zip(b).map(|(a, b)| Lora {
                        a,
                        b,
                        scale: lora_scale,
                    }),
                })
            };
            let input_layernorm = t.take(&p("input_layernorm.weight"))?;
            let (qkv, gate_up) = if shape.family.fused_projections() {
                (
                    QkvProj::Fused(lin("self_attn.qkv_proj", &mut t)?),
                    GateUpProj::Fused(lin("mlp.gate_up_proj", &mut t)?),
                )
            } else {
                (
                    QkvProj::Split {
                        q: lin("self_attn.q_proj", &mut t)?,
                        k: lin("self_attn.k_proj", &mut t)?,
                        v: lin("self_attn.v_proj", &mut t)?,
                    },
                    GateUpProj::Split {
                        gate: lin("mlp.gate_proj", &mut t)?,
                        up: lin("mlp.up_proj", &mut t)?,
                    },
                )
            };
            let (q_norm, k_norm) = if shape.family.qk_norm() {
                (
                    Some(t.take(&p("self_attn.q_norm.weight"))?),
                    Some(t.take(&p("self_attn.k_norm.weight"))?),
                )
            } else {
                (None, None)
            };
            let o_proj = lin("self_attn.o_proj", &mut t)?;
            let post_attention_layernorm = t.take(&p("post_attention_layernorm.weight"))?;
            let down_proj = lin("mlp.down_proj", &mut t)?;
            layers.push(Block {
                input_layernorm,
                qkv,
                q_norm,
                k_norm,
                o_proj,
                post_attention_layernorm,
                gate_up,
                down_proj,
            });
        }
        let embed_tokens = t.take("model.embed_tokens.weight")?;
        let norm = t.take("model.norm.weight")?;
        let lm_head = if shape.tie_word_embeddings {
            embed_tokens.shallow_clone()
        } else {
            t.take("lm_head.weight")?
        };
        t.finish()?;
        // RoPE tables, fp32, as HF's Phi3RotaryEmbedding: inv_freq[j] = theta^(-2j/D).
        let d = shape.head_dim() as i64;
        let inv_freq =
            Tensor::arange_start_step(0, d, 2, (Kind::Float, device)).divide_scalar(d as f64);
        let inv_freq = Tensor::from(shape.rope_theta)
            .to_device(device)
            .to_kind(Kind::Float)
            .pow(&inv_freq)
            .reciprocal();
        // Llama 3's `rope_scaling`: each inverse frequency times its factor (plain RoPE: none).
        let inv_freq = match shape.rope_frequency_scale() {
            Some(scale) => {
                let scale: Vec<f32> = scale.iter().map(|&x| x as f32).collect();
                inv_freq * Tensor::from_slice(&scale).to_device(device)
            }
            None => inv_freq,
        };
        let pos = Tensor::arange(shape.max_position_embeddings as i64, (Kind::Float, device));
        let freqs = pos.unsqueeze(1) * inv_freq.unsqueeze(0);
        let emb = Tensor::cat(&[&freqs, &freqs], 1);
        let sin = freqs.sin();
        Ok(Self {
            cos: emb.cos(),
            sin_signed: Tensor::cat(&[&sin.neg(), &sin], 1),
            shape,
            dtype,
            device,
            embed_tokens,
            layers,
            norm,
            lm_head,
            lookup_grad: true,
            first_grad_layer,
            head_chunk_tokens: shared::measure::memory::HEAD_CHUNK_TOKENS,
        })
    }

    fn attention(&self, b: &Block, x: &Tensor, rope: &Rope, attn: &Attention) -> Tensor {
        let s = &self.shape;
        let (bsz, t) = (x.size()[0], x.size()[1]);
        let (nh, nkv, hd) = (
            s.num_heads as i64,
            s.num_kv_heads as i64,
            s.head_dim() as i64,
        );
        let (q, k, v) = match &b.qkv {
            QkvProj::Fused(qkv_proj) => {
                // q and k in one contiguous product (RoPE on both in one pass), v in another.
                let mut parts = qkv_proj.forward_split(x, &[(nh + nkv) * hd, nkv * hd], self.dtype);
                let v = parts.pop().expect("v").view([bsz, t, nkv, hd]);
                let qk = rope.apply(&parts.pop().expect("qk").view([bsz, t, nh + nkv, hd]));
                (qk.narrow(2, 0, nh), qk.narrow(2, nh, nkv), v)
            }
            QkvProj::Split { q, k, v } => {
                let heads = |l: &Linear, n: i64, norm: &Option<Tensor>| {
                    let y = l.forward(x, self.dtype).view([bsz, t, n, hd]);
                    let y = match norm {
                        // Qwen3: RMSNorm over each head's width (statistics in fp32), back in
                        // the compute dtype for RoPE and attention.
                        Some(w) => rms_norm(&y, w, s.rms_norm_eps, self.dtype)
                            .to_kind(self.dtype.compute_kind()),
                        None => y,
                    };
                    rope.apply(&y)
                };
                (
                    heads(q, nh, &b.q_norm),
                    heads(k, nkv, &b.k_norm),
                    v.forward(x, self.dtype).view([bsz, t, nkv, hd]),
                )
            }
        };
        let gqa = nkv != nh;
        let y = match attn {
            Attention::Varlen {
                cu_seqlens,
                max_len,
            } => {
                let y = crate::ext::flash_varlen(
                    &q.squeeze_dim(0),
                    &k.squeeze_dim(0),
                    &v.squeeze_dim(0),
                    cu_seqlens,
                    *max_len,
                )
                .unwrap_or_else(|e| panic!("{e:#}"));
                y.view([bsz, t, nh * hd])
            }
            _ => {
                let (q, k, v) = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2));
                let y = match attn {
                    Attention::Mask(m) => Tensor::scaled_dot_product_attention(
                        &q,
                        &k,
                        &v,
                        Some(m),
                        0.0,
                        false,
                        None,
                        gqa,
                    ),
                    _ => Tensor::scaled_dot_product_attention::<Tensor>(
                        &q, &k, &v, None, 0.0, true, None, gqa,
                    ),
                };
                y.transpose(1, 2).reshape([bsz, t, nh * hd])
            }
        };
        b.o_proj.forward(&y, self.dtype)
    }

    fn block(&self, b: &Block, x: &Tensor, rope: &Rope, attn: &Attention) -> Tensor {
        let eps = self.shape.rms_norm_eps;
        let h = rms_norm(x, &b.input_layernorm, eps, self.dtype);
        let x = x + self.attention(b, &h, rope, attn);
        let h = rms_norm(&x, &b.post_attention_layernorm, eps, self.dtype);
        let inter = self.shape.intermediate_size as i64;
        let (gate, up) = match &b.gate_up {
            GateUpProj::Fused(gate_up_proj) => {
                let mut gu = gate_up_proj.forward_split(&h, &[inter, inter], self.dtype);
                let up = gu.pop().expect("up");
                (gu.pop().expect("gate"), up)
            }
            GateUpProj::Split { gate, up } => {
                (gate.forward(&h, self.dtype), up.forward(&h, self.dtype))
            }
        };
        x + b.down_proj.forward(&(up * gate.silu()), self.dtype)
    }

    /// RoPE tables gathered at each token's position, once for all blocks.
    fn rope_at(&self, inp: &Inputs) -> Rope {
        let (rows, t) = (inp.position_ids.size()[0], inp.position_ids.size()[1]);
        let ck = self.dtype.compute_kind();
        let at_positions = |table: &Tensor| {
            table
                .index_select(0, &inp.position_ids.view([-1]))
                .view([rows, t, 1, -1])
                .to_kind(ck)
        };
        Rope {
            cos: at_positions(&self.cos),
            sin_signed: at_positions(&self.sin_signed),
        }
    }

    /// The input of the first block that needs gradients: the embedding lookup (with autograd
    /// when the embedding trains through it), then the frozen prefix without autograd (no graph,
    /// no activations kept).
    fn first_grad_input(&self, inp: &Inputs, rope: &Rope) -> Tensor {
        let lookup = || Tensor::embedding(&self.embed_tokens, &inp.input_ids, -1, false, false);
        let emb = if self.lookup_grad {
            lookup()
        } else {
            tch::no_grad(lookup)
        };
        let mut x = match self.dtype {
            DType::MixedBf16 => emb, // fp32 residual stream
            _ => emb.to_kind(self.dtype.param_kind()),
        };
        if self.first_grad_layer > 0 {
            x = tch::no_grad(|| {
                let mut x = x;
                for b in &self.layers[..self.first_grad_layer] {
                    x = self.block(b, &x, rope, &inp.attention);
                }
                x
            });
        }
        x
    }

    /// Hidden states after the final norm, [rows, T, H].
    pub fn hidden(&self, inp: &Inputs) -> Tensor {
        let rope = self.rope_at(inp);
        let mut x = self.first_grad_input(inp, &rope);
        for b in &self.layers[self.first_grad_layer..] {
            x = self.block(b, &x, &rope, &inp.attention);
        }
        rms_norm(&x, &self.norm, self.shape.rms_norm_eps, self.dtype)
    }

    /// A micro-batch's forward pass: its loss sum over `denom` (the step's loss tokens), with
    /// what [`Decoder::backward`] needs. The LM head and the loss run in chunks with their
    /// backward (`head_loss_chunked`). With `checkpoint` (activation checkpointing) the blocks
    /// that need gradients run without autograd, each keeping only its input; the final norm
    /// runs with autograd from the last block's output.
    pub fn forward(&self, inp: &Inputs, denom: f64, checkpoint: bool) -> Forward {
        if !checkpoint {
            let (loss, head_grad) = self.head_loss_chunked(&self.hidden(inp), inp, denom);
            return Forward {
                loss,
                head_grad,
                checkpointed: None,
            };
        }
        let rope = self.rope_at(inp);
        let x = self.first_grad_input(inp, &rope);
        let layers = &self.layers[self.first_grad_layer..];
        let mut inputs = Vec::with_capacity(layers.len());
        let out = tch::no_grad(|| {
            let mut x = x;
            for b in layers {
                let y = self.block(b, &x, &rope, &inp.attention);
                inputs.push(std::mem::replace(&mut x, y));
            }
            x
        });
        // The backward pass of the blocks starts from this tensor's gradient.
        let last = out.detach().set_requires_grad(true);
        let h = rms_norm(&last, &self.norm, self.shape.rms_norm_eps, self.dtype);
        let (loss, head_grad) = self.head_loss_chunked(&h, inp, denom);
        Forward {
            loss,
            head_grad,
            checkpointed: Some(Checkpointed { inputs, last, rope }),
        }
    }

    /// The loss sum over `denom` of hidden states after the final norm, with the head's backward
    /// done: the LM head and the loss over `head_chunk_tokens` loss positions at a time, each
    /// chunk's backward run at once (into the head's gradient and the hidden states'), so that
    /// one chunk's fp32 logits are alive instead of every loss position's (12 bytes a logit: with
    /// a 128k or 152k vocabulary the largest term of a checkpointed step, and a large one of any
    /// step). Returns the loss (no graph) and the hidden states at the loss positions with their
    /// gradient, from which [`Decoder::backward`] carries it through the final norm and the
    /// blocks. The same sums as [`Decoder::head_loss`], added chunk by chunk.
    fn head_loss_chunked(
        &self,
        h: &Tensor,
        inp: &Inputs,
        denom: f64,
    ) -> (Tensor, Option<(Tensor, Tensor)>) {
        let (rows, labels) = at_loss_positions(h, inp);
        let n = rows.size()[0];
        let chunk = self.head_chunk_tokens.max(1) as i64;
        let leaf = rows.detach().set_requires_grad(true);
        let mut total = Tensor::zeros([], (Kind::Float, h.device()));
        let mut start = 0;
        while start < n {
            let len = chunk.min(n - start);
            let logits = self.head(&leaf.narrow(0, start, len));
            let loss = token_loss_sum(&logits, &labels.narrow(0, start, len)) / denom;
            loss.backward();
            total += loss.detach();
            start += len;
        }
        let g = leaf.grad();
        (total, g.defined().then_some((rows, g)))
    }

    /// The backward pass of [`Decoder::forward`]: gradients accumulate into the parameters'
    /// `.grad`. The head's backward ran in the forward pass (`head_loss_chunked`, its logits
    /// freed); from the gradient it left at the hidden states, the final norm's and the blocks'.
    /// With checkpointing, block by block from the last, the block computed again with autograd
    /// from its kept input and its backward fed the gradient arriving from above
    /// (`backward_from`), so the parameters get the same gradients as from one graph.
    pub fn backward(&self, f: Forward, inp: &Inputs) {
        // Nothing before the head may train (last-n over no block, with the norm frozen).
        if let Some((rows, g)) = f.head_grad.as_ref().filter(|(r, _)| r.requires_grad()) {
            backward_from(rows, g);
        }
        let Some(c) = f.checkpointed else {
            return;
        };
        // A micro-batch without loss positions leaves the last block's output without a
        // gradient: zeros.
        let mut grad = match c.last.grad() {
            g if g.defined() => g,
            _ => c.last.zeros_like(),
        };
        let layers = &self.layers[self.first_grad_layer..];
        for (k, (b, x)) in layers.iter().zip(c.inputs).enumerate().rev() {
            // The first block's input needs a gradient only where autograd already tracks it
            // (the embedding lookup when the embedding trains): a frozen prefix's output needs
            // none, as without checkpointing.
            let x = if k > 0 { x.set_requires_grad(true) } else { x };
            let y = self.block(b, &x, &c.rope, &inp.attention);
            backward_from(&y, &grad);
            if k > 0 {
                grad = x.grad();
            }
        }
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
        self.head_loss(&self.hidden(inp), inp)
    }

    /// The loss sum of hidden states after the final norm: the LM head at the loss positions.
    fn head_loss(&self, h: &Tensor, inp: &Inputs) -> Tensor {
        let (rows, labels) = at_loss_positions(h, inp);
        token_loss_sum(&self.head(&rows), &labels)
    }
}

/// Hidden states `[rows, T, H]` and labels at the micro-batch's loss positions: `[L, H]`, `[L]`.
fn at_loss_positions(h: &Tensor, inp: &Inputs) -> (Tensor, Tensor) {
    let keep = &inp.loss_positions;
    let rows = h.view([-1, h.size()[2]]).index_select(0, keep);
    (rows, inp.labels.view([-1]).index_select(0, keep))
}

/// Sum of the token cross-entropies of fp32 `logits` `[L, V]` against `labels` `[L]`.
fn token_loss_sum(logits: &Tensor, labels: &Tensor) -> Tensor {
    logits.cross_entropy_loss::<Tensor>(labels, None, tch::Reduction::Sum, IGNORE_INDEX, 0.0)
}

/// Runs `y`'s backward pass fed `grad` as the gradient arriving at `y`. libtorch's
/// `backward(gradient)` is not in tch: this runs it from `sum(y · grad)`, whose gradient at `y`
/// is `grad` exactly (an element-wise product by 1).
fn backward_from(y: &Tensor, grad: &Tensor) {
    (y * grad).sum(Kind::Float).backward();
}
