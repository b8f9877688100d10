//! The Phi-3 shape, its parameter names (as in the Hugging Face checkpoint), the deterministic
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
}

/// The architecture numbers of a Phi-3 decoder.
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
}

/// The subset of a Hugging Face `config.json` that defines a Phi-3 model.
#[derive(Debug, Deserialize)]
struct HfConfig {
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    intermediate_size: usize,
    vocab_size: usize,
    rms_norm_eps: f64,
    rope_theta: Option<f64>,
    max_position_embeddings: usize,
    rope_scaling: Option<serde_json::Value>,
    tie_word_embeddings: Option<bool>,
    model_type: Option<String>,
}

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
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            max_position_embeddings: 4096,
        }
    }

    pub fn from_preset(p: ModelPreset) -> Self {
        match p {
            ModelPreset::Phi3Mini => Self::phi3_mini(),
            ModelPreset::Tiny => Self::tiny(),
        }
    }

    /// Reads a Hugging Face `config.json`. Every problem (unreadable, not JSON, another model
    /// type, a long-context variant, an impossible or absurd shape) is a usage error naming the
    /// file, found before any data or weights are read.
    pub fn from_config_json(path: &Path) -> Result<Self, ConfigError> {
        let fix = "point --model at a Phi-3 checkpoint folder (config.json of microsoft/Phi-3-mini-4k-instruct), or use --model phi3-mini --weights random";
        let refuse = |problem: String| ConfigError::input(path, problem, fix);
        let text = crate::files::read_text(path).map_err(refuse)?;
        let c: HfConfig = serde_json::from_str(&text).map_err(|e| {
            refuse(format!(
                "is not a Phi-3 config.json ({e}; it needs hidden_size, num_hidden_layers, num_attention_heads, intermediate_size, vocab_size, rms_norm_eps, max_position_embeddings)"
            ))
        })?;
        if let Some(t) = &c.model_type {
            if t != "phi3" {
                return Err(refuse(format!(
                    "model_type is {t:?}; this benchmark implements Phi-3 (model_type \"phi3\")"
                )));
            }
        }
        if c.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
            return Err(ConfigError::input(
                path,
                "rope_scaling is set (a long-context Phi-3 variant); only the 4k models with plain RoPE are supported",
                "use microsoft/Phi-3-mini-4k-instruct or another checkpoint without rope_scaling",
            ));
        }
        if c.tie_word_embeddings == Some(true) {
            return Err(refuse(
                "tie_word_embeddings is true; Phi-3 unties its embedding and LM head".into(),
            ));
        }
        let shape = Self {
            name: path
                .parent()
                .and_then(|p| p.file_name())
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "phi3".into()),
            hidden_size: c.hidden_size,
            num_layers: c.num_hidden_layers,
            num_heads: c.num_attention_heads,
            num_kv_heads: c.num_key_value_heads.unwrap_or(c.num_attention_heads),
            intermediate_size: c.intermediate_size,
            vocab_size: c.vocab_size,
            rms_norm_eps: c.rms_norm_eps,
            rope_theta: c.rope_theta.unwrap_or(10_000.0),
            max_position_embeddings: c.max_position_embeddings,
        };
        shape.check().map_err(refuse)?;
        Ok(shape)
    }

    /// The `config.json` a Hugging Face loader accepts for this shape.
    pub fn to_config_json(&self) -> serde_json::Value {
        serde_json::json!({
            "architectures": ["Phi3ForCausalLM"],
            "model_type": "phi3",
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "intermediate_size": self.intermediate_size,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "original_max_position_embeddings": self.max_position_embeddings,
            "hidden_act": "silu",
            "rope_scaling": null,
            "tie_word_embeddings": false,
            "bos_token_id": 1,
            "eos_token_id": 32000,
            "pad_token_id": 32000,
            "attention_bias": false,
            "torch_dtype": "float32",
        })
    }

    /// Whether the numbers describe a model this benchmark can build, and the problem in words
    /// (with the `config.json` key) when not: every dimension at least 1 and at most the bounds in
    /// [`shape_limits`], heads that divide the width, an even head dimension for RoPE, a positive
    /// finite `rms_norm_eps` and `rope_theta`. Caught here, these would otherwise reach the
    /// framework as a reshape of 0 elements, or as a NaN loss blamed on the learning rate.
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
        if !self.hidden_size.is_multiple_of(self.num_heads) {
            return Err(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
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
                "the head dimension (hidden_size / num_attention_heads = {}) must be even for RoPE",
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

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }

    /// Output width of the fused q|k|v projection.
    pub fn qkv_out(&self) -> usize {
        (self.num_heads + 2 * self.num_kv_heads) * self.head_dim()
    }

    /// Every base parameter, in checkpoint order, with its shape.
    pub fn parameters(&self) -> Vec<ParamSpec> {
        let (h, i, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let mut out = vec![ParamSpec::new(
            "model.embed_tokens.weight",
            &[v, h],
            Init::Normal,
        )];
        for l in 0..self.num_layers {
            let p = |s: &str| format!("model.layers.{l}.{s}");
            out.push(ParamSpec::new(
                &p("input_layernorm.weight"),
                &[h],
                Init::Ones,
            ));
            out.push(ParamSpec::new(
                &p("self_attn.qkv_proj.weight"),
                &[self.qkv_out(), h],
                Init::Normal,
            ));
            out.push(ParamSpec::new(
                &p("self_attn.o_proj.weight"),
                &[h, self.num_heads * self.head_dim()],
                Init::Normal,
            ));
            out.push(ParamSpec::new(
                &p("post_attention_layernorm.weight"),
                &[h],
                Init::Ones,
            ));
            out.push(ParamSpec::new(
                &p("mlp.gate_up_proj.weight"),
                &[2 * i, h],
                Init::Normal,
            ));
            out.push(ParamSpec::new(
                &p("mlp.down_proj.weight"),
                &[h, i],
                Init::Normal,
            ));
        }
        out.push(ParamSpec::new("model.norm.weight", &[h], Init::Ones));
        out.push(ParamSpec::new("lm_head.weight", &[v, h], Init::Normal));
        out
    }

    /// The (out, in) shape of a LoRA-wrappable projection.
    pub fn projection_shape(&self, t: LoraTarget) -> (usize, usize) {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        match t {
            LoraTarget::QkvProj => (self.qkv_out(), h),
            LoraTarget::OProj => (h, self.num_heads * self.head_dim()),
            LoraTarget::GateUpProj => (2 * i, h),
            LoraTarget::DownProj => (h, i),
        }
    }

    /// LoRA adapter parameters (peft's names without the `base_model.model.` prefix).
    /// A: [rank, in], uniform(-1/sqrt(in), 1/sqrt(in)) as peft's kaiming-uniform(a=sqrt 5) gives;
    /// B: [out, rank], zeros, so the adapted model starts equal to the base model.
    pub fn lora_parameters(&self, s: &StrategyConfig) -> Vec<ParamSpec> {
        if s.kind != StrategyKind::Lora {
            return Vec::new();
        }
        let mut targets = s.lora_targets.clone();
        targets.sort();
        targets.dedup();
        let mut out = Vec::new();
        for l in 0..self.num_layers {
            for t in &targets {
                let (o, i) = self.projection_shape(*t);
                let base = format!("model.layers.{l}.{}", t.module());
                let bound = 1.0 / (i as f64).sqrt();
                out.push(ParamSpec::new(
                    &format!("{base}.lora_A.weight"),
                    &[s.lora_rank, i],
                    Init::Uniform(bound),
                ));
                out.push(ParamSpec::new(
                    &format!("{base}.lora_B.weight"),
                    &[o, s.lora_rank],
                    Init::Zeros,
                ));
            }
        }
        out
    }

    /// Whether a base parameter trains under the strategy (LoRA adapters always train).
    pub fn is_trainable(&self, name: &str, s: &StrategyConfig) -> bool {
        match s.kind {
            StrategyKind::Full => true,
            StrategyKind::Lora => name.contains(".lora_A.") || name.contains(".lora_B."),
            StrategyKind::LastN => {
                if name == "lm_head.weight" || name == "model.norm.weight" {
                    return true;
                }
                match layer_index(name) {
                    Some(l) => l + s.last_n >= self.num_layers,
                    None => false,
                }
            }
        }
    }

    /// Total and trainable parameter counts (scalars) under a strategy.
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
                        bail!("checkpoint lacks tensor {} (looked in {} file(s)); is this a Phi-3 checkpoint?", s.name, files.len());
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
    crate::summary::write_atomic(
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
    crate::summary::write_atomic(&dir.join("model.safetensors"), &bytes)?;
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
}
