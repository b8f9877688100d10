//! The model families this benchmark trains (Phi-3, Llama 3.x, Qwen3): one description per
//! family of which tensors exist (their Hugging Face names and shapes), how attention is built
//! (grouped-query, q/k RMSNorm per head, head width independent of the model's width), the RoPE
//! variant and whether the LM head is tied to the embedding. Both binaries, the FLOP count, the
//! memory estimate and the parameter counts read this one description. Also: the deterministic
//! random initialisation both binaries use, and checkpoint reading/writing in safetensors.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::config::{LoraTarget, ModelPreset, StrategyConfig, StrategyKind};
use crate::error::ConfigError;
use crate::rng;

/// The largest dimensions a `config.json` may give. Far above any published model (the largest
/// have widths near 16k-26k, MLPs near 53k-74k, vocabularies near 256k, about 126 blocks and 128
/// heads), they keep the parameter count, the memory estimate (tokens x width x blocks, a packed
/// micro-batch's length squared x heads x blocks) and the RoPE tables inside 64-bit arithmetic
/// together with the bounds on sequence lengths and micro-batches in `config::limits`.
pub mod shape_limits {
    pub const MAX_HIDDEN: usize = 1 << 16;
    pub const MAX_INTERMEDIATE: usize = 1 << 18;
    pub const MAX_VOCAB: usize = 1 << 22;
    pub const MAX_LAYERS: usize = 1 << 9;
    pub const MAX_HEADS: usize = 1 << 8;
    pub const MAX_POSITIONS: usize = 1 << 20;
    /// Qwen3 and Gemma use 128-256; 1024 keeps the RoPE tables small.
    pub const MAX_HEAD_DIM: usize = 1 << 10;
}

/// A decoder family: what differs between Phi-3, Llama 3.x and Qwen3 (all pre-norm RMSNorm
/// decoders with SwiGLU MLPs, RoPE and no biases).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, PartialOrd, Ord,
)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// `model_type` "phi3": fused `qkv_proj` and `gate_up_proj`, untied head.
    #[default]
    Phi3,
    /// `model_type` "llama": split q/k/v and gate/up, grouped-query attention, `rope_scaling`
    /// type "llama3", tied head in the 1B and 3B models.
    Llama,
    /// `model_type` "qwen3": as Llama plus RMSNorm on q and k per head (`q_norm`, `k_norm`) and a
    /// `head_dim` independent of the width; tied head up to 4B.
    Qwen3,
}

impl Family {
    pub const ALL: [Family; 3] = [Family::Phi3, Family::Llama, Family::Qwen3];

    /// `config.json`'s `model_type`.
    pub fn model_type(self) -> &'static str {
        match self {
            Family::Phi3 => "phi3",
            Family::Llama => "llama",
            Family::Qwen3 => "qwen3",
        }
    }

    /// `config.json`'s `architectures[0]` (the transformers class).
    pub fn architecture(self) -> &'static str {
        match self {
            Family::Phi3 => "Phi3ForCausalLM",
            Family::Llama => "LlamaForCausalLM",
            Family::Qwen3 => "Qwen3ForCausalLM",
        }
    }

    pub fn from_model_type(t: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.model_type() == t)
    }

    /// The supported `model_type`s, for messages.
    pub fn supported() -> String {
        Self::ALL
            .iter()
            .map(|f| format!("{:?}", f.model_type()))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Whether the checkpoint fuses q|k|v into `qkv_proj` and gate|up into `gate_up_proj`.
    pub fn fused_projections(self) -> bool {
        self == Family::Phi3
    }

    /// Whether q and k pass through an RMSNorm per head (weight `[head_dim]`) before RoPE.
    pub fn qk_norm(self) -> bool {
        self == Family::Qwen3
    }
}

/// Llama 3's `rope_scaling` (`rope_type` "llama3"): long wavelengths divided by `factor`, short
/// ones kept, a smooth blend between (`_compute_llama3_parameters` in transformers).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Llama3Rope {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

/// The architecture numbers of a decoder of one [`Family`]. The fields after
/// `max_position_embeddings` are left out of the JSON when they have Phi-3's values, so Phi-3's
/// summaries and workload hashes read as before and old summaries load.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelShape {
    pub name: String,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    #[serde(default, skip_serializing_if = "is_default")]
    pub family: Family,
    /// A head width other than `hidden_size / num_heads` (Qwen3: 128 at every width).
    #[serde(default, rename = "head_dim", skip_serializing_if = "Option::is_none")]
    pub explicit_head_dim: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<Llama3Rope>,
    /// The LM head is the embedding matrix (no `lm_head.weight` tensor).
    #[serde(default, skip_serializing_if = "is_default")]
    pub tie_word_embeddings: bool,
}

/// The subset of a Hugging Face `config.json` that defines a model of a supported family.
#[derive(Debug, Deserialize)]
struct HfConfig {
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    intermediate_size: usize,
    vocab_size: usize,
    rms_norm_eps: f64,
    rope_theta: Option<f64>,
    max_position_embeddings: usize,
    rope_scaling: Option<serde_json::Value>,
    tie_word_embeddings: Option<bool>,
    model_type: Option<String>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    hidden_act: Option<String>,
}

/// One linear layer of a block, as the checkpoint names it.
#[derive(Debug, Clone, PartialEq)]
pub struct Projection {
    /// The module path inside a block (`self_attn.q_proj`).
    pub module: &'static str,
    pub out_features: usize,
    pub in_features: usize,
    /// The LoRA target that adapts it (`qkv_proj` adapts q, k and v of split families,
    /// `gate_up_proj` gate and up).
    pub target: LoraTarget,
}

const LLAMA_3_2_ROPE: Llama3Rope = Llama3Rope {
    factor: 32.0,
    low_freq_factor: 1.0,
    high_freq_factor: 4.0,
    original_max_position_embeddings: 8192,
};

impl ModelShape {
    /// microsoft/phi-3-mini-4k-instruct.
    pub fn phi3_mini() -> Self {
        Self {
            name: "phi-3-mini-4k".into(),
            hidden_size: 3072,
            num_layers: 32,
            num_heads: 32,
            num_kv_heads: 32,
            intermediate_size: 8192,
            vocab_size: 32_064,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            max_position_embeddings: 4096,
            family: Family::Phi3,
            explicit_head_dim: None,
            rope_scaling: None,
            tie_word_embeddings: false,
        }
    }

    /// Two blocks, width 64, the real vocabulary: small enough for CPU tests and the demo.
    pub fn tiny() -> Self {
        Self {
            name: "phi-3-tiny".into(),
            hidden_size: 64,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 4,
            intermediate_size: 128,
            vocab_size: 32_064,
            ..Self::phi3_mini()
        }
    }

    /// A Llama 3.2 shape (`config.json` of meta-llama/Llama-3.2-*-Instruct).
    fn llama_3_2(name: &str, hidden: usize, layers: usize, heads: usize) -> Self {
        Self {
            name: name.into(),
            hidden_size: hidden,
            num_layers: layers,
            num_heads: heads,
            num_kv_heads: 8,
            intermediate_size: 8192,
            vocab_size: 128_256,
            rms_norm_eps: 1e-5,
            rope_theta: 500_000.0,
            max_position_embeddings: 131_072,
            family: Family::Llama,
            explicit_head_dim: Some(hidden / heads),
            rope_scaling: Some(LLAMA_3_2_ROPE),
            tie_word_embeddings: true,
        }
    }

    /// A Qwen3 shape (`config.json` of Qwen/Qwen3-*): head_dim 128 at every width, 8 kv heads.
    fn qwen3(name: &str, hidden: usize, layers: usize, heads: usize, inter: usize) -> Self {
        Self {
            name: name.into(),
            hidden_size: hidden,
            num_layers: layers,
            num_heads: heads,
            num_kv_heads: 8,
            intermediate_size: inter,
            vocab_size: 151_936,
            rms_norm_eps: 1e-6,
            rope_theta: 1_000_000.0,
            max_position_embeddings: 40_960,
            family: Family::Qwen3,
            explicit_head_dim: Some(128),
            rope_scaling: None,
            tie_word_embeddings: true,
        }
    }

    pub fn from_preset(p: ModelPreset) -> Self {
        match p {
            ModelPreset::Phi3Mini => Self::phi3_mini(),
            ModelPreset::Tiny => Self::tiny(),
            ModelPreset::Llama32_1b => Self::llama_3_2("llama-3.2-1b", 2048, 16, 32),
            ModelPreset::Llama32_3b => Self::llama_3_2("llama-3.2-3b", 3072, 28, 24),
            ModelPreset::Qwen3_0_6b => Self::qwen3("qwen3-0.6b", 1024, 28, 16, 3072),
            ModelPreset::Qwen3_1_7b => Self::qwen3("qwen3-1.7b", 2048, 28, 16, 6144),
            ModelPreset::Qwen3_4b => Self::qwen3("qwen3-4b", 2560, 36, 32, 9728),
            // Tiny shapes of the other families: two blocks of width 64, grouped-query attention
            // (4 heads, 2 kv heads), the family's real vocabulary (so its special ids exist).
            ModelPreset::TinyLlama => Self {
                name: "llama-tiny".into(),
                hidden_size: 64,
                num_layers: 2,
                num_heads: 4,
                num_kv_heads: 2,
                intermediate_size: 128,
                explicit_head_dim: Some(16),
                ..Self::llama_3_2("", 2048, 16, 32)
            },
            ModelPreset::TinyQwen3 => Self {
                name: "qwen3-tiny".into(),
                hidden_size: 64,
                num_layers: 2,
                num_heads: 4,
                num_kv_heads: 2,
                intermediate_size: 128,
                // Wider than 64 / 4: the head width is independent of the model's, as in Qwen3.
                explicit_head_dim: Some(32),
                ..Self::qwen3("", 1024, 28, 16, 3072)
            },
        }
    }

    /// Reads a Hugging Face `config.json`. Every problem (unreadable, not JSON, an unsupported
    /// model type or RoPE variant, an impossible or absurd shape) is a usage error naming the
    /// file, found before any data or weights are read.
    pub fn from_config_json(path: &Path) -> Result<Self, ConfigError> {
        let fix = format!(
            "point --model at a checkpoint folder of a supported family (model_type {}), or use a built-in shape such as --model phi3-mini --weights random",
            Family::supported()
        );
        let refuse = |problem: String| ConfigError::input(path, problem, &fix);
        let text = crate::files::read_text(path).map_err(refuse)?;
        let c: HfConfig = serde_json::from_str(&text).map_err(|e| {
            refuse(format!(
                "is not a model config.json ({e}; it needs hidden_size, num_hidden_layers, num_attention_heads, intermediate_size, vocab_size, rms_norm_eps, max_position_embeddings)"
            ))
        })?;
        // A config without model_type is taken as Phi-3's (the benchmark's first family).
        let family = match c.model_type.as_deref() {
            None => Family::Phi3,
            Some(t) => Family::from_model_type(t).ok_or_else(|| {
                refuse(format!(
                    "model_type is {t:?}; this benchmark implements model_type {}",
                    Family::supported()
                ))
            })?,
        };
        if c.attention_bias == Some(true) || c.mlp_bias == Some(true) {
            return Err(refuse(
                "attention_bias or mlp_bias is true; the benchmark's decoders have no biases"
                    .into(),
            ));
        }
        if let Some(act) = c.hidden_act.as_deref().filter(|a| *a != "silu") {
            return Err(refuse(format!(
                "hidden_act is {act:?}; the benchmark's decoders use SwiGLU (\"silu\")"
            )));
        }
        let rope_scaling = match c.rope_scaling.as_ref().filter(|v| !v.is_null()) {
            None => None,
            Some(v) => {
                let kind = v
                    .get("rope_type")
                    .or_else(|| v.get("type"))
                    .and_then(|t| t.as_str())
                    .unwrap_or("");
                if family != Family::Llama || kind != "llama3" {
                    return Err(ConfigError::input(
                        path,
                        format!("rope_scaling is set (type {kind:?}); the benchmark implements plain RoPE and Llama 3's \"llama3\" scaling (model_type \"llama\") only"),
                        "use a checkpoint without rope_scaling (e.g. microsoft/Phi-3-mini-4k-instruct) or a Llama 3.x checkpoint",
                    ));
                }
                let num = |k: &str| v.get(k).and_then(|x| x.as_f64());
                match (
                    num("factor"),
                    num("low_freq_factor"),
                    num("high_freq_factor"),
                    num("original_max_position_embeddings"),
                ) {
                    (Some(f), Some(lo), Some(hi), Some(orig))
                        if f >= 1.0 && lo > 0.0 && hi > lo && orig >= 1.0 && f.is_finite() && hi.is_finite() && orig < 1e9 =>
                    {
                        Some(Llama3Rope {
                            factor: f,
                            low_freq_factor: lo,
                            high_freq_factor: hi,
                            original_max_position_embeddings: orig as usize,
                        })
                    }
                    _ => {
                        return Err(refuse(format!(
                            "rope_scaling {v} needs factor >= 1, 0 < low_freq_factor < high_freq_factor and original_max_position_embeddings >= 1"
                        )))
                    }
                }
            }
        };
        let tie = c.tie_word_embeddings.unwrap_or(false);
        let width_head = c.hidden_size.checked_div(c.num_attention_heads);
        let shape = Self {
            name: path
                .parent()
                .and_then(|p| p.file_name())
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| family.model_type().into()),
            hidden_size: c.hidden_size,
            num_layers: c.num_hidden_layers,
            num_heads: c.num_attention_heads,
            num_kv_heads: c.num_key_value_heads.unwrap_or(c.num_attention_heads),
            intermediate_size: c.intermediate_size,
            vocab_size: c.vocab_size,
            rms_norm_eps: c.rms_norm_eps,
            rope_theta: c.rope_theta.unwrap_or(10_000.0),
            max_position_embeddings: c.max_position_embeddings,
            family,
            // Phi-3 has no head_dim key; a head_dim equal to width / heads is kept only where
            // the family writes it (Llama), so Phi-3's shape reads as before.
            explicit_head_dim: match (family, c.head_dim) {
                (Family::Phi3, Some(d)) if Some(d) == width_head => None,
                (_, d) => d,
            },
            rope_scaling,
            tie_word_embeddings: tie,
        };
        shape.check().map_err(refuse)?;
        Ok(shape)
    }

    /// The `config.json` a Hugging Face loader accepts for this shape.
    pub fn to_config_json(&self) -> serde_json::Value {
        let mut c = serde_json::json!({
            "architectures": [self.family.architecture()],
            "model_type": self.family.model_type(),
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "intermediate_size": self.intermediate_size,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": "silu",
            "rope_scaling": null,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": false,
            "torch_dtype": "float32",
        });
        match self.family {
            Family::Phi3 => {
                c["original_max_position_embeddings"] = self.max_position_embeddings.into();
                c["bos_token_id"] = 1.into();
                c["eos_token_id"] = 32000.into();
                c["pad_token_id"] = 32000.into();
            }
            Family::Llama => {
                c["head_dim"] = self.head_dim().into();
                c["mlp_bias"] = false.into();
                c["bos_token_id"] = 128_000.into();
                c["eos_token_id"] = 128_009.into();
                if let Some(r) = &self.rope_scaling {
                    c["rope_scaling"] = serde_json::json!({
                        "rope_type": "llama3",
                        "factor": r.factor,
                        "low_freq_factor": r.low_freq_factor,
                        "high_freq_factor": r.high_freq_factor,
                        "original_max_position_embeddings": r.original_max_position_embeddings,
                    });
                }
            }
            Family::Qwen3 => {
                c["head_dim"] = self.head_dim().into();
                c["bos_token_id"] = 151_643.into();
                c["eos_token_id"] = 151_645.into();
                c["use_sliding_window"] = false.into();
                c["max_window_layers"] = self.num_layers.into();
            }
        }
        c
    }

    /// Whether the numbers describe a model this benchmark can build, and the problem in words
    /// (with the `config.json` key) when not: every dimension at least 1 and at most the bounds in
    /// [`shape_limits`], heads that divide the width (unless `head_dim` is given), kv heads that
    /// divide the heads, an even head dimension for RoPE, a positive finite `rms_norm_eps` and
    /// `rope_theta`. Caught here, these would otherwise reach the framework as a reshape of 0
    /// elements, or as a NaN loss blamed on the learning rate.
    pub fn check(&self) -> std::result::Result<(), String> {
        use shape_limits::*;
        for (key, v, max) in [
            ("hidden_size", self.hidden_size, MAX_HIDDEN),
            ("num_hidden_layers", self.num_layers, MAX_LAYERS),
            ("num_attention_heads", self.num_heads, MAX_HEADS),
            ("num_key_value_heads", self.num_kv_heads, MAX_HEADS),
            (
                "intermediate_size",
                self.intermediate_size,
                MAX_INTERMEDIATE,
            ),
            ("vocab_size", self.vocab_size, MAX_VOCAB),
            (
                "max_position_embeddings",
                self.max_position_embeddings,
                MAX_POSITIONS,
            ),
            (
                "head_dim",
                self.explicit_head_dim.unwrap_or(1),
                MAX_HEAD_DIM,
            ),
        ] {
            if v == 0 {
                return Err(format!("{key} is 0; it must be at least 1"));
            }
            if v > max {
                return Err(format!(
                    "{key} is {v}, above {max}, the largest this benchmark builds (larger than any published model)"
                ));
            }
        }
        if self.explicit_head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_heads) {
            return Err(format!(
                "hidden_size {} is not a multiple of num_attention_heads {} (and no head_dim is given)",
                self.hidden_size, self.num_heads
            ));
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_heads, self.num_kv_heads
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(format!(
                "the head dimension ({}) must be even for RoPE",
                self.head_dim()
            ));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return Err(format!(
                "rms_norm_eps is {}; it must be a small positive number (Phi-3: 1e-5)",
                self.rms_norm_eps
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(format!(
                "rope_theta is {}; it must be a positive number (Phi-3: 10000)",
                self.rope_theta
            ));
        }
        Ok(())
    }

    /// The width of one attention head: `head_dim` where the config gives it, else
    /// `hidden_size / num_heads`.
    pub fn head_dim(&self) -> usize {
        self.explicit_head_dim
            .unwrap_or(self.hidden_size / self.num_heads.max(1))
    }

    /// Output width of q|k|v together (fused in Phi-3's `qkv_proj`, three projections elsewhere).
    pub fn qkv_out(&self) -> usize {
        (self.num_heads + 2 * self.num_kv_heads) * self.head_dim()
    }

    /// Width of the attention output (the input of `o_proj`).
    pub fn attention_width(&self) -> usize {
        self.num_heads * self.head_dim()
    }

    /// The checkpoint name of the LM head's matrix: `lm_head.weight`, or the embedding's when
    /// the head is tied to it.
    pub fn head_weight_name(&self) -> &'static str {
        if self.tie_word_embeddings {
            "model.embed_tokens.weight"
        } else {
            "lm_head.weight"
        }
    }

    /// The linear layers of one block in checkpoint order, as the family names them.
    pub fn projections(&self) -> Vec<Projection> {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        let (q, kv) = (self.attention_width(), self.num_kv_heads * self.head_dim());
        let p = |module, out_features, in_features, target| Projection {
            module,
            out_features,
            in_features,
            target,
        };
        if self.family.fused_projections() {
            vec![
                p("self_attn.qkv_proj", self.qkv_out(), h, LoraTarget::QkvProj),
                p("self_attn.o_proj", h, q, LoraTarget::OProj),
                p("mlp.gate_up_proj", 2 * i, h, LoraTarget::GateUpProj),
                p("mlp.down_proj", h, i, LoraTarget::DownProj),
            ]
        } else {
            vec![
                p("self_attn.q_proj", q, h, LoraTarget::QkvProj),
                p("self_attn.k_proj", kv, h, LoraTarget::QkvProj),
                p("self_attn.v_proj", kv, h, LoraTarget::QkvProj),
                p("self_attn.o_proj", h, q, LoraTarget::OProj),
                p("mlp.gate_proj", i, h, LoraTarget::GateUpProj),
                p("mlp.up_proj", i, h, LoraTarget::GateUpProj),
                p("mlp.down_proj", h, i, LoraTarget::DownProj),
            ]
        }
    }

    /// Every base parameter, in checkpoint order, with its shape. A tied head has no tensor of
    /// its own (the embedding is the head).
    pub fn parameters(&self) -> Vec<ParamSpec> {
        let (h, v) = (self.hidden_size, self.vocab_size);
        let mut out = vec![ParamSpec::new(
            "model.embed_tokens.weight",
            &[v, h],
            Init::Normal,
        )];
        let projections = self.projections();
        for l in 0..self.num_layers {
            let p = |s: &str| format!("model.layers.{l}.{s}");
            out.push(ParamSpec::new(
                &p("input_layernorm.weight"),
                &[h],
                Init::Ones,
            ));
            for pr in projections
                .iter()
                .filter(|x| x.module.starts_with("self_attn."))
            {
                out.push(ParamSpec::new(
                    &p(&format!("{}.weight", pr.module)),
                    &[pr.out_features, pr.in_features],
                    Init::Normal,
                ));
            }
            if self.family.qk_norm() {
                for n in ["self_attn.q_norm.weight", "self_attn.k_norm.weight"] {
                    out.push(ParamSpec::new(&p(n), &[self.head_dim()], Init::Ones));
                }
            }
            out.push(ParamSpec::new(
                &p("post_attention_layernorm.weight"),
                &[h],
                Init::Ones,
            ));
            for pr in projections.iter().filter(|x| x.module.starts_with("mlp.")) {
                out.push(ParamSpec::new(
                    &p(&format!("{}.weight", pr.module)),
                    &[pr.out_features, pr.in_features],
                    Init::Normal,
                ));
            }
        }
        out.push(ParamSpec::new("model.norm.weight", &[h], Init::Ones));
        if !self.tie_word_embeddings {
            out.push(ParamSpec::new("lm_head.weight", &[v, h], Init::Normal));
        }
        out
    }

    /// The multiplier of each RoPE inverse frequency `theta^(-2j/D)`, j < D/2, under the
    /// shape's `rope_scaling`; `None` for plain RoPE (the binaries then use their tables
    /// unchanged). Llama 3 (transformers' `_compute_llama3_parameters`): a wavelength
    /// `2π / inv_freq` above `original_max / low_freq_factor` is divided by `factor`, one below
    /// `original_max / high_freq_factor` is kept, and between them the two are blended with
    /// `s = (original_max / wavelength - low) / (high - low)`: `(1 - s) / factor + s`.
    pub fn rope_frequency_scale(&self) -> Option<Vec<f64>> {
        let r = self.rope_scaling.as_ref()?;
        let d = self.head_dim();
        let old = r.original_max_position_embeddings as f64;
        let (low_wavelen, high_wavelen) = (old / r.low_freq_factor, old / r.high_freq_factor);
        Some(
            (0..d / 2)
                .map(|j| {
                    let inv_freq = 1.0 / self.rope_theta.powf((2 * j) as f64 / d as f64);
                    let wavelen = std::f64::consts::TAU / inv_freq;
                    if wavelen < high_wavelen {
                        1.0
                    } else if wavelen > low_wavelen {
                        1.0 / r.factor
                    } else {
                        let s = (old / wavelen - r.low_freq_factor)
                            / (r.high_freq_factor - r.low_freq_factor);
                        (1.0 - s) / r.factor + s
                    }
                })
                .collect(),
        )
    }

    /// RoPE's wavelengths `theta^(2j/D)`, j < D/2, in fp32 as Hugging Face computes them (its
    /// inverse frequencies are `1 / this`), divided by [`ModelShape::rope_frequency_scale`]'s
    /// factors where the shape has `rope_scaling`: the `freqs` MLX's `fast::rope` takes. (The
    /// PyTorch binary computes its inverse frequencies with libtorch's own `pow` on the device,
    /// which differs from this host arithmetic in the last bit for a few frequencies.)
    pub fn rope_wavelengths(&self) -> Vec<f32> {
        let d = self.head_dim();
        let theta = self.rope_theta as f32;
        let mut f: Vec<f32> = (0..d / 2)
            .map(|j| theta.powf((2 * j) as f32 / d as f32))
            .collect();
        if let Some(scale) = self.rope_frequency_scale() {
            for (w, s) in f.iter_mut().zip(scale) {
                *w /= s as f32;
            }
        }
        f
    }

    /// LoRA adapter parameters (peft's names without the `base_model.model.` prefix), for every
    /// projection a target adapts (in target order, then checkpoint order).
    /// A: [rank, in], uniform(-1/sqrt(in), 1/sqrt(in)) as peft's kaiming-uniform(a=sqrt 5) gives;
    /// B: [out, rank], zeros, so the adapted model starts equal to the base model.
    pub fn lora_parameters(&self, s: &StrategyConfig) -> Vec<ParamSpec> {
        if s.kind != StrategyKind::Lora {
            return Vec::new();
        }
        let mut targets = s.lora_targets.clone();
        targets.sort();
        targets.dedup();
        let projections = self.projections();
        let mut out = Vec::new();
        for l in 0..self.num_layers {
            for t in &targets {
                for pr in projections.iter().filter(|p| p.target == *t) {
                    let base = format!("model.layers.{l}.{}", pr.module);
                    let bound = 1.0 / (pr.in_features as f64).sqrt();
                    out.push(ParamSpec::new(
                        &format!("{base}.lora_A.weight"),
                        &[s.lora_rank, pr.in_features],
                        Init::Uniform(bound),
                    ));
                    out.push(ParamSpec::new(
                        &format!("{base}.lora_B.weight"),
                        &[pr.out_features, s.lora_rank],
                        Init::Zeros,
                    ));
                }
            }
        }
        out
    }

    /// Whether a base parameter trains under the strategy (LoRA adapters always train). Under
    /// `last-n` the head trains; a tied head is the embedding, which then trains as the head
    /// only (see [`ModelShape::embedding_lookup_trains`]).
    pub fn is_trainable(&self, name: &str, s: &StrategyConfig) -> bool {
        match s.kind {
            StrategyKind::Full => true,
            StrategyKind::Lora => name.contains(".lora_A.") || name.contains(".lora_B."),
            StrategyKind::LastN => {
                if name == "lm_head.weight"
                    || name == "model.norm.weight"
                    || name == self.head_weight_name()
                {
                    return true;
                }
                match layer_index(name) {
                    Some(l) => l + s.last_n >= self.num_layers,
                    None => false,
                }
            }
        }
    }

    /// Whether the gradient of the embedding lookup is taken. Only under `full`: under `last-n`
    /// with a tied head the embedding trains through the head alone (its lookup sits before the
    /// frozen prefix, which runs without gradients, so the step costs what an untied last-n
    /// step costs); under LoRA the embedding is frozen.
    pub fn embedding_lookup_trains(&self, s: &StrategyConfig) -> bool {
        s.kind == StrategyKind::Full
    }

    /// Total and trainable parameter counts (scalars) under a strategy; a tied head counts once.
    pub fn parameter_counts(&self, s: &StrategyConfig) -> ParamCounts {
        let mut c = ParamCounts::default();
        for p in self
            .parameters()
            .iter()
            .chain(self.lora_parameters(s).iter())
        {
            c.total += p.numel();
            if self.is_trainable(&p.name, s) {
                c.trainable += p.numel();
            }
        }
        c
    }

    /// What the summary says about the trainable set beyond the strategy's name.
    pub fn strategy_note(&self, s: &StrategyConfig) -> Option<String> {
        (s.kind == StrategyKind::LastN && self.tie_word_embeddings).then(|| {
            format!(
                "strategy: last-n with a tied head trains the last {} blocks, the final norm and the tied embedding matrix as the LM head (its gradient through the head only; the lookup at the input is not differentiated)",
                s.last_n.min(self.num_layers)
            )
        })
    }
}

/// Seed of the LoRA adapters' initial values: its own stream, so the base weights are the same
/// with and without LoRA, and the same in both binaries.
pub fn adapter_seed(workload_seed: u64) -> u64 {
    workload_seed ^ 0x4c4f_5241 // "LORA"
}

/// `model.layers.<i>.…` → `i`.
pub fn layer_index(name: &str) -> Option<usize> {
    let rest = name.strip_prefix("model.layers.")?;
    rest.split('.').next()?.parse().ok()
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParamCounts {
    pub total: usize,
    pub trainable: usize,
}

/// How a parameter is initialised from the seed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// Normal(0, 0.02): Hugging Face's `initializer_range` for Phi-3.
    Normal,
    Ones,
    Zeros,
    Uniform(f64),
}

#[derive(Debug, Clone, PartialEq)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Init,
}

impl ParamSpec {
    fn new(name: &str, shape: &[usize], init: Init) -> Self {
        Self {
            name: name.to_string(),
            shape: shape.to_vec(),
            init,
        }
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The initial values (fp32) from `seed`: element `i` depends only on (seed, name, i), so this
    /// runs in parallel and both binaries get bit-identical weights without sharing a file.
    pub fn init_values(&self, seed: u64) -> Vec<f32> {
        use rayon::prelude::*;
        let n = self.numel();
        let key = rng::name_key(seed, &self.name);
        match self.init {
            Init::Ones => vec![1.0; n],
            Init::Zeros => vec![0.0; n],
            Init::Normal => {
                let mut v = vec![0f32; n];
                v.par_chunks_mut(1 << 16)
                    .enumerate()
                    .for_each(|(c, chunk)| {
                        let base = (c << 16) as u64;
                        for (j, x) in chunk.iter_mut().enumerate() {
                            *x = (0.02 * rng::normal_at(key, base + j as u64)) as f32;
                        }
                    });
                v
            }
            Init::Uniform(b) => {
                let mut v = vec![0f32; n];
                v.par_chunks_mut(1 << 16)
                    .enumerate()
                    .for_each(|(c, chunk)| {
                        let base = (c << 16) as u64;
                        for (j, x) in chunk.iter_mut().enumerate() {
                            *x = ((2.0 * rng::unit_f64(rng::hash(key, base + j as u64)) - 1.0) * b)
                                as f32;
                        }
                    });
                v
            }
        }
    }
}

/// A tensor as stored in a checkpoint.
pub struct WeightData {
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

/// Where the weights come from.
pub enum WeightSource {
    Random {
        seed: u64,
    },
    /// One or more safetensors files (sharded checkpoints list all shards).
    Safetensors {
        files: Vec<PathBuf>,
    },
}

impl WeightSource {
    /// Finds the safetensors files of a local checkpoint folder. Every file the index names must
    /// lie inside the folder (a name such as `../../etc/passwd` is refused, never opened) and be a
    /// readable regular file; problems are usage errors found before the data loads.
    pub fn from_dir(dir: &Path) -> Result<Self, ConfigError> {
        let index = dir.join("model.safetensors.index.json");
        let fix = "re-download the checkpoint, or use --weights random for the architecture alone";
        let files = if std::fs::symlink_metadata(&index).is_ok() {
            let refuse = |problem: String| ConfigError::input(&index, problem, fix);
            let text = crate::files::read_text(&index).map_err(refuse)?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| refuse(format!("is not valid JSON ({e})")))?;
            let map = v["weight_map"]
                .as_object()
                .filter(|m| !m.is_empty())
                .ok_or_else(|| refuse("has no weight_map naming the shard files".into()))?;
            let mut files = Vec::new();
            for (tensor, f) in map {
                let Some(name) = f.as_str() else {
                    return Err(refuse(format!(
                        "weight_map[{tensor:?}] is {f}, not a file name"
                    )));
                };
                let Some(path) = crate::files::file_inside(dir, name) else {
                    return Err(refuse(format!(
                        "weight_map[{tensor:?}] names {name:?}, outside the model folder; a checkpoint's shards lie beside its index"
                    )));
                };
                files.push(path);
            }
            files.sort();
            files.dedup();
            files
        } else {
            vec![dir.join("model.safetensors")]
        };
        for f in &files {
            if let Some(problem) = crate::files::regular_file_problem(f) {
                if files.len() == 1 && !index.exists() && problem == "does not exist" {
                    return Err(ConfigError::input(
                        dir,
                        "has no model.safetensors or model.safetensors.index.json",
                        "pass a checkpoint folder with its weights, or use --weights random for the architecture alone",
                    ));
                }
                return Err(ConfigError::input(f, problem, fix));
            }
        }
        Ok(Self::Safetensors { files })
    }

    /// What identifies the checkpoint's weights in the workload hash without reading them all: a
    /// SHA-256 over each safetensors file's header (tensor names, dtypes, shapes, offsets and
    /// metadata) and its size, in file order. Two checkpoints with the same tensors laid out the
    /// same way but other values share it; a changed dtype, shape, tensor set or file does not.
    /// `None` for random weights (named by their seed).
    pub fn digest(&self) -> Result<Option<String>> {
        use sha2::{Digest, Sha256};
        use std::io::Read;
        let WeightSource::Safetensors { files } = self else {
            return Ok(None);
        };
        let mut h = Sha256::new();
        for path in files {
            let mut f =
                std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
            let size = f
                .metadata()
                .with_context(|| format!("reading the size of {}", path.display()))?
                .len();
            let mut len = [0u8; 8];
            f.read_exact(&mut len)
                .with_context(|| format!("{}: not a safetensors file", path.display()))?;
            let n = u64::from_le_bytes(len);
            if n > size.saturating_sub(8) || n > 100 << 20 {
                bail!(
                    "{}: not a safetensors file (header length {n} of a {size}-byte file)",
                    path.display()
                );
            }
            let mut header = vec![0u8; n as usize];
            f.read_exact(&mut header)
                .with_context(|| format!("{}: truncated safetensors header", path.display()))?;
            h.update(n.to_le_bytes());
            h.update(&header);
            h.update(size.to_le_bytes());
        }
        Ok(Some(
            h.finalize().iter().map(|b| format!("{b:02x}")).collect(),
        ))
    }

    /// Calls `f(spec, data)` for every parameter in `specs`, in order. Checkpoint tensors are
    /// checked against the expected shapes; a missing tensor is an error naming it. Parameters
    /// absent from checkpoints because they are new (LoRA adapters) are initialised from `seed`.
    pub fn for_each(
        &self,
        specs: &[ParamSpec],
        adapter_seed: u64,
        mut f: impl FnMut(&ParamSpec, WeightData) -> Result<()>,
    ) -> Result<()> {
        match self {
            WeightSource::Random { seed } => {
                for s in specs {
                    let seed = random_init_seed(&s.name, *seed, adapter_seed);
                    f(
                        s,
                        WeightData {
                            shape: s.shape.clone(),
                            values: s.init_values(seed),
                        },
                    )?;
                }
            }
            WeightSource::Safetensors { files } => {
                let mut maps = Vec::new();
                for path in files {
                    let file = std::fs::File::open(path)
                        .with_context(|| format!("opening {}", path.display()))?;
                    // SAFETY: the file is opened read-only and not modified while mapped.
                    let mmap = unsafe { memmap2::Mmap::map(&file) }
                        .with_context(|| format!("mapping {}", path.display()))?;
                    maps.push((path.clone(), mmap));
                }
                let mut tables = Vec::new();
                for (path, m) in &maps {
                    let st = safetensors::SafeTensors::deserialize(m).with_context(|| {
                        format!("{} is not a valid safetensors file", path.display())
                    })?;
                    tables.push((path.clone(), st));
                }
                for s in specs {
                    if is_adapter(&s.name) {
                        f(
                            s,
                            WeightData {
                                shape: s.shape.clone(),
                                values: s.init_values(adapter_seed),
                            },
                        )?;
                        continue;
                    }
                    let found = tables
                        .iter()
                        .find_map(|(p, t)| t.tensor(&s.name).ok().map(|v| (p, v)));
                    let Some((path, view)) = found else {
                        bail!("checkpoint lacks tensor {} (looked in {} file(s)); does its config.json name the right model_type?", s.name, files.len());
                    };
                    if view.shape() != s.shape.as_slice() {
                        bail!(
                            "{}: tensor {} has shape {:?}, the config says {:?}",
                            path.display(),
                            s.name,
                            view.shape(),
                            s.shape
                        );
                    }
                    let values = to_f32(view.dtype(), view.data())
                        .with_context(|| format!("{}: tensor {}", path.display(), s.name))?;
                    f(
                        s,
                        WeightData {
                            shape: s.shape.clone(),
                            values,
                        },
                    )?;
                }
            }
        }
        Ok(())
    }
}

/// Whether a parameter is a LoRA adapter (initialised from the adapter seed).
pub fn is_adapter(name: &str) -> bool {
    name.contains(".lora_A.") || name.contains(".lora_B.")
}

/// The seed a randomly initialised tensor draws from: a LoRA adapter from its own stream
/// ([`adapter_seed`]), every base weight from the weight source's seed.
pub fn random_init_seed(name: &str, weights_seed: u64, adapter_seed: u64) -> u64 {
    if is_adapter(name) {
        adapter_seed
    } else {
        weights_seed
    }
}

fn to_f32(dtype: safetensors::Dtype, bytes: &[u8]) -> Result<Vec<f32>> {
    use safetensors::Dtype;
    Ok(match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        other => bail!("unsupported dtype {other:?} (expected F32, BF16 or F16)"),
    })
}

/// Writes `config.json` + `model.safetensors` (fp32) for a randomly initialised model: the real
/// loading path's test fixture, and `--save-init` for inspecting what both binaries start from.
pub fn write_checkpoint(dir: &Path, shape: &ModelShape, seed: u64) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    crate::files::write_atomic(
        &dir.join("config.json"),
        serde_json::to_string_pretty(&shape.to_config_json())?.as_bytes(),
    )?;
    let specs = shape.parameters();
    let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = specs
        .iter()
        .map(|s| {
            (
                s.name.clone(),
                s.shape.clone(),
                s.init_values(seed)
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect(),
            )
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, sh, b)| {
            Ok((
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, sh.clone(), b)?,
            ))
        })
        .collect::<Result<_>>()?;
    let mut meta = std::collections::HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    let bytes = safetensors::tensor::serialize(views, Some(meta))?;
    crate::files::write_atomic(&dir.join("model.safetensors"), &bytes)?;
    Ok(())
}

/// Reads every tensor of a safetensors file as fp32 (tests and tools).
pub fn read_safetensors(path: &Path) -> Result<BTreeMap<String, WeightData>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        out.insert(
            name.clone(),
            WeightData {
                shape: view.shape().to_vec(),
                values: to_f32(view.dtype(), view.data())?,
            },
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelPreset;

    #[test]
    fn phi3_mini_has_3_82_billion_parameters() {
        let c = ModelShape::phi3_mini().parameter_counts(&StrategyConfig {
            kind: StrategyKind::Full,
            ..Default::default()
        });
        assert_eq!(c.total, 3_821_079_552);
        assert_eq!(c.trainable, c.total);
    }

    #[test]
    fn last_n_trains_the_last_blocks_the_final_norm_and_the_head() {
        let shape = ModelShape::phi3_mini();
        let s = StrategyConfig {
            kind: StrategyKind::LastN,
            last_n: 4,
            ..Default::default()
        };
        assert!(shape.is_trainable("model.layers.31.mlp.down_proj.weight", &s));
        assert!(shape.is_trainable("model.layers.28.self_attn.qkv_proj.weight", &s));
        assert!(!shape.is_trainable("model.layers.27.self_attn.qkv_proj.weight", &s));
        assert!(!shape.is_trainable("model.embed_tokens.weight", &s));
        assert!(shape.is_trainable("lm_head.weight", &s));
        let per_block = 3072 * 9216 + 3072 * 3072 + 3072 * 16384 + 3072 * 8192 + 2 * 3072;
        let c = shape.parameter_counts(&s);
        assert_eq!(c.trainable, 4 * per_block + 3072 + 32_064 * 3072);
    }

    #[test]
    fn lora_counts_adapters_only() {
        let shape = ModelShape::tiny();
        let s = StrategyConfig {
            kind: StrategyKind::Lora,
            lora_rank: 4,
            ..Default::default()
        };
        let c = shape.parameter_counts(&s);
        // per block: qkv (192 out, 64 in), o (64, 64), gate_up (256, 64), down (64, 128)
        let per_block = 4 * (64 + 192) + 4 * (64 + 64) + 4 * (64 + 256) + 4 * (128 + 64);
        assert_eq!(c.trainable, 2 * per_block);
        let base = shape.parameter_counts(&StrategyConfig::default()).total;
        assert_eq!(c.total, base + c.trainable);
    }

    #[test]
    fn init_is_deterministic_and_scaled() {
        let s = &ModelShape::tiny().parameters()[1];
        assert_eq!(s.init, Init::Ones);
        let w = &ModelShape::tiny().parameters()[2];
        let a = w.init_values(1);
        assert_eq!(a, w.init_values(1));
        assert_ne!(a, w.init_values(2));
        let std = (a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>() / a.len() as f64).sqrt();
        assert!((std - 0.02).abs() < 0.001, "std {std}");
    }

    #[test]
    fn checkpoint_round_trips_with_config() {
        let dir = tempfile::tempdir().unwrap();
        let shape = ModelShape::tiny();
        write_checkpoint(dir.path(), &shape, 5).unwrap();
        let back = ModelShape::from_config_json(&dir.path().join("config.json")).unwrap();
        assert_eq!(back.hidden_size, shape.hidden_size);
        assert_eq!(back.num_layers, shape.num_layers);
        let src = WeightSource::from_dir(dir.path()).unwrap();
        let mut n = 0;
        src.for_each(&shape.parameters(), 0, |spec, d| {
            assert_eq!(d.values, spec.init_values(5));
            n += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(n, shape.parameters().len());
    }
    fn full() -> StrategyConfig {
        StrategyConfig {
            kind: StrategyKind::Full,
            ..Default::default()
        }
    }

    /// The counts (tied heads counted once), one test per built-in shape.
    fn count(p: ModelPreset) -> usize {
        let c = ModelShape::from_preset(p).parameter_counts(&full());
        assert_eq!(c.trainable, c.total);
        c.total
    }

    #[test]
    fn llama_3_2_1b_has_1_24_billion_parameters() {
        assert_eq!(count(ModelPreset::Llama32_1b), 1_235_814_400);
    }

    #[test]
    fn llama_3_2_3b_has_3_21_billion_parameters() {
        assert_eq!(count(ModelPreset::Llama32_3b), 3_212_749_824);
    }

    #[test]
    fn qwen3_0_6b_has_596_million_parameters() {
        assert_eq!(count(ModelPreset::Qwen3_0_6b), 596_049_920);
    }

    #[test]
    fn qwen3_1_7b_has_1_72_billion_parameters() {
        assert_eq!(count(ModelPreset::Qwen3_1_7b), 1_720_574_976);
    }

    #[test]
    fn qwen3_4b_has_4_02_billion_parameters() {
        assert_eq!(count(ModelPreset::Qwen3_4b), 4_022_468_096);
    }

    #[test]
    fn families_name_their_tensors_as_their_checkpoints() {
        let names = |p| -> Vec<String> {
            ModelShape::from_preset(p)
                .parameters()
                .into_iter()
                .filter(|s| layer_index(&s.name) == Some(0) || layer_index(&s.name).is_none())
                .map(|s| format!("{} {:?}", s.name, s.shape))
                .collect()
        };
        assert_eq!(
            names(ModelPreset::TinyQwen3),
            [
                "model.embed_tokens.weight [151936, 64]",
                "model.layers.0.input_layernorm.weight [64]",
                "model.layers.0.self_attn.q_proj.weight [128, 64]",
                "model.layers.0.self_attn.k_proj.weight [64, 64]",
                "model.layers.0.self_attn.v_proj.weight [64, 64]",
                "model.layers.0.self_attn.o_proj.weight [64, 128]",
                "model.layers.0.self_attn.q_norm.weight [32]",
                "model.layers.0.self_attn.k_norm.weight [32]",
                "model.layers.0.post_attention_layernorm.weight [64]",
                "model.layers.0.mlp.gate_proj.weight [128, 64]",
                "model.layers.0.mlp.up_proj.weight [128, 64]",
                "model.layers.0.mlp.down_proj.weight [64, 128]",
                "model.norm.weight [64]",
            ]
        );
        let llama = names(ModelPreset::TinyLlama);
        assert!(llama.contains(&"model.layers.0.self_attn.k_proj.weight [32, 64]".to_string()));
        assert!(!llama
            .iter()
            .any(|n| n.contains("q_norm") || n.contains("lm_head")));
        let phi = names(ModelPreset::Tiny);
        assert!(phi.contains(&"model.layers.0.self_attn.qkv_proj.weight [192, 64]".to_string()));
        assert!(phi.contains(&"lm_head.weight [32064, 64]".to_string()));
    }

    #[test]
    fn last_n_with_a_tied_head_trains_the_embedding_as_the_head() {
        let shape = ModelShape::from_preset(ModelPreset::Llama32_1b);
        let s = StrategyConfig {
            kind: StrategyKind::LastN,
            last_n: 2,
            ..Default::default()
        };
        assert!(shape.is_trainable("model.embed_tokens.weight", &s));
        assert!(!shape.embedding_lookup_trains(&s));
        assert!(shape.embedding_lookup_trains(&full()));
        let per_block = 60_821_504; // 2048·(2048 + 512 + 512 + 2048) + 3·2048·8192 + 2·2048
        let c = shape.parameter_counts(&s);
        assert_eq!(c.trainable, 2 * per_block + 2048 + 128_256 * 2048);
        assert!(shape.strategy_note(&s).unwrap().contains("tied embedding"));
        assert!(ModelShape::tiny().strategy_note(&s).is_none());
    }

    #[test]
    fn lora_targets_adapt_every_split_projection() {
        let shape = ModelShape::from_preset(ModelPreset::TinyQwen3);
        let s = StrategyConfig {
            kind: StrategyKind::Lora,
            lora_rank: 4,
            lora_targets: vec![LoraTarget::QkvProj, LoraTarget::GateUpProj],
            ..Default::default()
        };
        let names: Vec<String> = shape
            .lora_parameters(&s)
            .into_iter()
            .filter(|p| layer_index(&p.name) == Some(1))
            .map(|p| format!("{} {:?}", p.name, p.shape))
            .collect();
        assert_eq!(
            names,
            [
                "model.layers.1.self_attn.q_proj.lora_A.weight [4, 64]",
                "model.layers.1.self_attn.q_proj.lora_B.weight [128, 4]",
                "model.layers.1.self_attn.k_proj.lora_A.weight [4, 64]",
                "model.layers.1.self_attn.k_proj.lora_B.weight [64, 4]",
                "model.layers.1.self_attn.v_proj.lora_A.weight [4, 64]",
                "model.layers.1.self_attn.v_proj.lora_B.weight [64, 4]",
                "model.layers.1.mlp.gate_proj.lora_A.weight [4, 64]",
                "model.layers.1.mlp.gate_proj.lora_B.weight [128, 4]",
                "model.layers.1.mlp.up_proj.lora_A.weight [4, 64]",
                "model.layers.1.mlp.up_proj.lora_B.weight [128, 4]",
            ]
        );
    }

    #[test]
    fn every_family_round_trips_through_config_json() {
        for p in [
            ModelPreset::Tiny,
            ModelPreset::TinyLlama,
            ModelPreset::TinyQwen3,
            ModelPreset::Llama32_3b,
            ModelPreset::Qwen3_4b,
        ] {
            let dir = tempfile::tempdir().unwrap();
            let shape = ModelShape::from_preset(p);
            let path = dir.path().join("config.json");
            std::fs::write(&path, shape.to_config_json().to_string()).unwrap();
            let mut back = ModelShape::from_config_json(&path).unwrap();
            back.name = shape.name.clone();
            assert_eq!(back, shape, "{p:?}");
        }
    }

    #[test]
    fn an_unknown_model_type_is_refused_naming_the_supported_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let mut c = ModelShape::from_preset(ModelPreset::TinyLlama).to_config_json();
        c["model_type"] = "mistral".into();
        std::fs::write(&path, c.to_string()).unwrap();
        let e = ModelShape::from_config_json(&path).unwrap_err().to_string();
        assert!(
            e.contains("\"mistral\"") && e.contains("\"phi3\", \"llama\", \"qwen3\""),
            "{e}"
        );
        // Another RoPE scaling than llama3 is refused too.
        let mut c = ModelShape::from_preset(ModelPreset::TinyLlama).to_config_json();
        c["rope_scaling"]["rope_type"] = "yarn".into();
        std::fs::write(&path, c.to_string()).unwrap();
        let e = ModelShape::from_config_json(&path).unwrap_err().to_string();
        assert!(e.contains("yarn"), "{e}");
    }

    /// Llama 3's frequency correction in its three regimes, each against the rule written out
    /// again here for tiny-llama (head_dim 16, theta 500,000, factor 32, low 1, high 4, 8,192
    /// original positions: wavelengths 2π·500000^(j/8)).
    #[test]
    fn llama3_rope_scales_long_wavelengths_and_blends_the_middle() {
        let shape = ModelShape::from_preset(ModelPreset::TinyLlama);
        let s = shape.rope_frequency_scale().unwrap();
        assert_eq!(s.len(), 8);
        let wavelen = |j: usize| std::f64::consts::TAU * 500_000f64.powf(j as f64 / 8.0);
        // j <= 3: wavelength below 8192/4 = 2048: kept.
        assert!(wavelen(3) < 2048.0 && s[..4].iter().all(|&x| x == 1.0));
        // j = 4: between 2048 and 8192: blended.
        assert!(wavelen(4) > 2048.0 && wavelen(4) < 8192.0);
        let smooth = (8192.0 / wavelen(4) - 1.0) / 3.0;
        assert!((s[4] - ((1.0 - smooth) / 32.0 + smooth)).abs() < 1e-15);
        assert!(s[4] > 1.0 / 32.0 && s[4] < 1.0);
        // j >= 5: above 8192: divided by 32.
        assert!(wavelen(5) > 8192.0 && s[5..].iter().all(|&x| x == 1.0 / 32.0));
        assert!(ModelShape::tiny().rope_frequency_scale().is_none());
    }

    #[test]
    fn rope_wavelengths_are_the_inverse_frequencies_inverted() {
        let shape = ModelShape::from_preset(ModelPreset::TinyLlama);
        let w = shape.rope_wavelengths();
        let scale = shape.rope_frequency_scale().unwrap();
        let d = shape.head_dim();
        assert_eq!(w.len(), d / 2);
        assert_eq!(w[0], 1.0);
        for (j, (&w, s)) in w.iter().zip(scale).enumerate() {
            // Hugging Face's scaled inverse frequency, in f64.
            let inv_freq = s / shape.rope_theta.powf((2 * j) as f64 / d as f64);
            let rel = (f64::from(w) * inv_freq - 1.0).abs();
            assert!(rel < 1e-6, "j {j}: {w} x {inv_freq} is off by {rel}");
        }
        // Plain RoPE: no factor.
        let tiny = ModelShape::tiny();
        let d = tiny.head_dim();
        let w = tiny.rope_wavelengths();
        assert_eq!(w[1], (tiny.rope_theta as f32).powf(2.0 / d as f32));
    }

    /// Phi-3's shape serialises as before the families existed (summaries, workload hashes).
    #[test]
    fn phi3_shape_json_has_no_new_keys() {
        let v = serde_json::to_value(ModelShape::phi3_mini()).unwrap();
        assert_eq!(v.as_object().unwrap().len(), 10, "{v}");
        let back: ModelShape = serde_json::from_value(v).unwrap();
        assert_eq!(back, ModelShape::phi3_mini());
    }
}
