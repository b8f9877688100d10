//! Turns a configuration into the exact work: model shape and weight source, tokenised records,
//! the steps of micro-batches, and the hash that identifies all of it.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::config::{Config, ModelPreset, OverlongPolicy, StrategyKind, WeightsKind};
use crate::data::batch::{plan_steps, Step};
use crate::data::records::{self, DatasetSource};
use crate::data::{chat, synthetic, DataStats, Sample};
use crate::error::ConfigError;
use crate::files::{self, Location};
use crate::model::{ModelShape, WeightSource};

pub struct Prepared {
    pub shape: ModelShape,
    pub weights: WeightSource,
    pub samples: Vec<Sample>,
    pub data: DataStats,
    pub steps: Vec<Step>,
    pub hash: String,
    /// Statements for the summary's notes (what was synthetic, ...).
    pub notes: Vec<String>,
    /// This process's rank in a data-parallel run (steps then hold its share of the records).
    pub rank: Option<crate::dist::Rank>,
}

impl Prepared {
    /// Data-parallel ranks sharing this workload (1 for a single process).
    pub fn world_size(&self) -> usize {
        self.rank.as_ref().map_or(1, |r| r.world_size)
    }

    /// Whether this process writes the run folder (rank 0, or a single process).
    pub fn is_leader(&self) -> bool {
        self.rank.as_ref().is_none_or(crate::dist::Rank::is_leader)
    }
}

/// Resolves the model: built-in shape or `config.json` (local folder or hub), and its weights.
pub fn resolve_model(cfg: &Config) -> Result<(ModelShape, WeightSource, Vec<String>)> {
    let m = &cfg.workload.model;
    let mut notes = Vec::new();
    let random = WeightSource::Random {
        seed: cfg.workload.seed,
    };
    // Random weights for the default hub model need no download: the built-in shape is the
    // published config.json's.
    let preset = m.preset.or_else(|| {
        (m.weights == WeightsKind::Random)
            .then(|| ModelPreset::for_hub_id(&m.source))
            .flatten()
    });
    if let Some(p) = preset {
        let shape = ModelShape::from_preset(p);
        return match (m.weights, p) {
            (WeightsKind::Random, _) => {
                notes.push(format!("weights: random initialisation of the {} architecture from seed {} (no pretrained weights were loaded)", shape.name, cfg.workload.seed));
                Ok((shape, random, notes))
            }
            (WeightsKind::Pretrained, p) if p.is_tiny() => Err(ConfigError::Value {
                key: "weights".into(),
                value: "pretrained".into(),
                reason: "the tiny preset is a test architecture with no published weights".into(),
                fix: "use --weights random with --preset tiny, or --model <checkpoint folder>"
                    .into(),
            }
            .into()),
            (WeightsKind::Pretrained, _) => {
                let dir = model_dir(&m.source, &m.revision, true)?;
                let shape = ModelShape::from_config_json(&dir.join("config.json"))?;
                Ok((shape, WeightSource::from_dir(&dir)?, notes))
            }
        };
    }
    let dir = model_dir(&m.source, &m.revision, m.weights == WeightsKind::Pretrained)?;
    let shape = ModelShape::from_config_json(&dir.join("config.json"))?;
    match m.weights {
        WeightsKind::Pretrained => Ok((shape, WeightSource::from_dir(&dir)?, notes)),
        WeightsKind::Random => {
            notes.push(format!(
                "weights: random initialisation of {}'s architecture from seed {}",
                m.source, cfg.workload.seed
            ));
            Ok((shape, random, notes))
        }
    }
}

/// A local checkpoint folder, or the hub's cached copy of `id` (config, and weights if asked).
/// A path that does not exist, a folder without `config.json` and a hub that cannot be reached are
/// usage errors (nothing has been read or written yet).
pub fn model_dir(source: &str, revision: &str, with_weights: bool) -> Result<PathBuf> {
    let fix = format!(
        "pass a checkpoint folder (config.json + *.safetensors), a hub id such as {}, or --preset tiny",
        crate::config::PHI3_MINI_HUB_ID
    );
    let id = match files::folder_or_hub_id(source, "model folder", &fix)? {
        Location::Folder(p) => {
            let config = p.join("config.json");
            if let Some(problem) = files::regular_file_problem(&config) {
                return Err(ConfigError::input(
                    &config,
                    problem,
                    "a model folder needs config.json (+ *.safetensors for --weights pretrained)",
                )
                .into());
            }
            return Ok(p);
        }
        Location::Hub(id) => id,
    };
    let hint = "no network or cache? pass a local folder with --model DIR, or --weights random --model phi3-mini for the architecture alone";
    let hub_error = |what: &str, e: String| -> anyhow::Error {
        ConfigError::value(
            "model",
            format!("hf://{id}@{revision}"),
            &format!("could not get {what} ({e})"),
            hint,
        )
        .into()
    };
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .build()
        .map_err(|e| hub_error("a hub client", e.to_string()))?;
    let repo = api.repo(hf_hub::Repo::with_revision(
        id.clone(),
        hf_hub::RepoType::Model,
        revision.to_string(),
    ));
    let config = repo
        .get("config.json")
        .map_err(|e| hub_error("config.json", e.to_string()))?;
    if with_weights {
        match repo.get("model.safetensors.index.json") {
            Ok(index) => {
                let text = files::read_text(&index)
                    .map_err(|e| hub_error("model.safetensors.index.json", e))?;
                let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
                    hub_error("a valid model.safetensors.index.json", e.to_string())
                })?;
                let mut shards: Vec<String> = v["weight_map"]
                    .as_object()
                    .map(|m| {
                        m.values()
                            .filter_map(|s| s.as_str().map(String::from))
                            .collect()
                    })
                    .unwrap_or_default();
                shards.sort();
                shards.dedup();
                for s in shards {
                    // Only names inside the repository (the cache path is built from them).
                    if files::file_inside(Path::new(""), &s).is_none() {
                        return Err(hub_error(
                            "the weights",
                            format!("the index names {s:?}, outside the repository"),
                        ));
                    }
                    repo.get(&s).map_err(|e| hub_error(&s, e.to_string()))?;
                }
            }
            Err(_) => {
                repo.get("model.safetensors")
                    .map_err(|e| hub_error("the weights (model.safetensors)", e.to_string()))?;
            }
        }
    }
    Ok(config.parent().map(Path::to_path_buf).unwrap_or_default())
}

/// The chat tokenizer real records need: `--tokenizer`, else the model's own; its vocabulary must
/// fit the model's embedding. Every problem is a usage error.
fn load_tokenizer(cfg: &Config, shape: &ModelShape) -> Result<chat::ChatTokenizer> {
    let w = &cfg.workload;
    let tok_spec = match (&w.data.tokenizer, w.model.preset) {
        (Some(t), _) => t.clone(),
        (None, Some(p)) if p.is_tiny() => return Err(ConfigError::Value {
            key: "tokenizer".into(),
            value: "(none)".into(),
            reason: "real records need a tokenizer and the tiny preset has none".into(),
            fix:
                "pass --tokenizer DIR (e.g. ../shared/tokenizers/phi-3) or use --dataset synthetic"
                    .into(),
        }
        .into()),
        (None, _) => w.model.source.clone(),
    };
    let (tj, tc, origin) = chat::locate(&tok_spec, &w.model.revision)?;
    let tok = chat::ChatTokenizer::load(&tj, &tc, origin)?;
    if tok.vocab_size() > shape.vocab_size {
        return Err(ConfigError::Value {
            key: "tokenizer".into(),
            value: tok_spec,
            reason: format!(
                "its vocabulary ({}) is larger than the model's embedding ({})",
                tok.vocab_size(),
                shape.vocab_size
            ),
            fix: "use the model's own tokenizer (Phi-3: 32,064 ids)".into(),
        }
        .into());
    }
    Ok(tok)
}

/// The settings' checks that need the model's shape (those that do not are
/// [`Config::validate`]).
pub fn validate_for_shape(cfg: &Config, shape: &ModelShape) -> Result<(), ConfigError> {
    let s = &cfg.workload.strategy;
    if s.kind == StrategyKind::LastN && s.last_n > shape.num_layers {
        return Err(ConfigError::Value {
            key: "last_n".into(),
            value: s.last_n.to_string(),
            reason: format!("the model has only {} blocks", shape.num_layers),
            fix: format!(
                "use --last-n {} or less, or --strategy full",
                shape.num_layers
            ),
        });
    }
    if s.kind == StrategyKind::Lora {
        let narrowest = shape.hidden_size.min(shape.head_dim() * shape.num_heads);
        if s.lora_rank > narrowest {
            return Err(ConfigError::Value {
                key: "lora_rank".into(),
                value: s.lora_rank.to_string(),
                reason: format!("above the narrowest wrapped layer's width ({narrowest})"),
                fix: format!(
                    "use --lora-rank {} or less (16 is usual)",
                    narrowest.min(64)
                ),
            });
        }
    }
    if let Some(p) = cfg
        .workload
        .data
        .pad_to
        .filter(|&p| p > shape.max_position_embeddings)
    {
        return Err(ConfigError::Value {
            key: "pad_to".into(),
            value: p.to_string(),
            reason: format!(
                "above the model's context ({})",
                shape.max_position_embeddings
            ),
            fix: format!("use --pad-to {} or less", shape.max_position_embeddings),
        });
    }
    if cfg.workload.data.max_seq_len > shape.max_position_embeddings {
        return Err(ConfigError::Value {
            key: "max_seq_len".into(),
            value: cfg.workload.data.max_seq_len.to_string(),
            reason: format!(
                "above the model's context ({})",
                shape.max_position_embeddings
            ),
            fix: format!(
                "use --max-seq-len {} or less",
                shape.max_position_embeddings
            ),
        });
    }
    Ok(())
}

/// Reads, formats, tokenises, truncates and plans: everything before the model loads.
pub fn prepare(cfg: &Config) -> Result<Prepared> {
    let w = &cfg.workload;
    let (shape, weights, mut notes) = resolve_model(cfg)?;
    validate_for_shape(cfg, &shape)?;
    let n = cfg.sample_count();
    let src = DatasetSource::parse(&w.data.dataset);
    let mut stats = DataStats {
        source: w.data.dataset.clone(),
        ..Default::default()
    };
    let mut samples: Vec<Sample> = match &src {
        DatasetSource::Synthetic => {
            let needed = synthetic::chat_ids(shape.family).vocab_needed();
            if shape.vocab_size < needed {
                return Err(ConfigError::Value {
                    key: "dataset".into(),
                    value: crate::config::SYNTHETIC.into(),
                    reason: format!(
                        "synthetic records use the {:?} family's token ids (up to {}), and the model's vocabulary (vocab_size) has only {} ids",
                        shape.family,
                        needed - 1,
                        shape.vocab_size
                    ),
                    fix: "use a model with its family's full vocabulary, or real records with the model's tokenizer (--dataset FILE --tokenizer DIR)".into(),
                }
                .into());
            }
            stats.synthetic = true;
            if n > crate::config::TuningMode::DOLLY_RECORDS {
                notes.push(format!(
                    "data: {n} synthetic records requested, more than dolly-15k's 15,011"
                ));
            }
            notes.push(format!(
                "data: synthetic dolly-shaped records (lengths exp(N(ln 200, 0.75)) clipped to [24, 1024] in Phi-3's template, dolly's category mix, {:?} chat structure) from seed {}; no tokenizer or dataset was read",
                shape.family,
                w.seed
            ));
            synthetic::generate_for(shape.family, n, w.seed)
                .into_iter()
                .map(|(s, _)| s)
                .collect()
        }
        _ => {
            // Cheap checks first: the data file's type, then the tokenizer, then the records.
            records::check_source(&src)?;
            let tok = load_tokenizer(cfg, &shape)?;
            let loaded = records::load(&src, n, w.data.on_bad_record)?;
            stats.source = loaded.source.clone();
            stats.bad_records_skipped = loaded.skipped;
            if loaded.records.is_empty() {
                bail!(crate::error::DataError {
                    source_name: loaded.source,
                    location: None,
                    problem: "no usable records".into(),
                    fix: "check the file's fields (instruction, context, response, category)"
                        .into()
                });
            }
            stats.tokenizer = Some(tok.origin.clone());
            let mut v = Vec::with_capacity(loaded.records.len());
            for (i, r) in loaded.records.iter().enumerate() {
                let s = tok.encode(r).map_err(|e| crate::error::DataError {
                    source_name: loaded.source.clone(),
                    location: Some(format!("record {}", i + 1)),
                    problem: format!("the chat template could not format it ({e:#})"),
                    fix: "check the tokenizer's chat_template, or leave the record out".into(),
                })?;
                if s.ids.is_empty() {
                    bail!(crate::error::DataError {
                        source_name: loaded.source.clone(),
                        location: Some(format!("record {}", i + 1)),
                        problem: "the chat template rendered it as no tokens at all".into(),
                        fix: "check the tokenizer's chat_template".into(),
                    });
                }
                v.push(s);
            }
            v
        }
    };
    // A tokenizer can produce ids its reported vocabulary does not count (added tokens): every id
    // must have a row in the model's embedding, or the framework fails with "index out of range".
    if let Some(top) = samples.iter().flat_map(|s| s.ids.iter().copied()).max() {
        if top as usize >= shape.vocab_size {
            bail!(ConfigError::Value {
                key: "tokenizer".into(),
                value: stats
                    .tokenizer
                    .clone()
                    .unwrap_or_else(|| "synthetic".into()),
                reason: format!(
                    "it produces token id {top}, beyond the model's vocabulary (vocab_size {})",
                    shape.vocab_size
                ),
                fix: "use the model's own tokenizer".into(),
            });
        }
    }
    stats.records_read = samples.len() + stats.bad_records_skipped;
    // Overlong records.
    let max = w.data.max_seq_len;
    let mut kept = Vec::with_capacity(samples.len());
    let shortest_prompt = samples.iter().map(|s| s.prompt_len).min().unwrap_or(0);
    for mut s in samples.drain(..) {
        if s.len() > max {
            match w.data.overlong {
                OverlongPolicy::Truncate => {
                    s.ids.truncate(max);
                    s.prompt_len = s.prompt_len.min(max);
                    stats.truncated += 1;
                }
                OverlongPolicy::Drop => {
                    stats.dropped_overlong += 1;
                    continue;
                }
            }
        }
        if s.loss_tokens(w.data.train_on_prompt) == 0 {
            stats.without_loss_tokens += 1;
        }
        kept.push(s);
    }
    let samples = kept;
    if samples.is_empty() {
        bail!(ConfigError::Value {
            key: "max_seq_len".into(),
            value: max.to_string(),
            reason: "every record was dropped as too long".into(),
            fix: "raise --max-seq-len or use --overlong truncate".into()
        });
    }
    if stats.without_loss_tokens > 0 {
        notes.push(format!(
            "data: {} of {} records keep no loss tokens (after truncation to --max-seq-len {max}); they cost compute but teach nothing",
            stats.without_loss_tokens,
            samples.len()
        ));
    }
    stats.records_used = samples.len();
    let mut lens: Vec<usize> = samples.iter().map(Sample::len).collect();
    lens.sort_unstable();
    stats.mean_tokens = lens.iter().sum::<usize>() as f64 / lens.len() as f64;
    stats.median_tokens = crate::measure::stats::percentile_sorted(
        &lens.iter().map(|&x| x as f64).collect::<Vec<_>>(),
        0.5,
    );
    stats.max_tokens = *lens.last().unwrap_or(&0);
    // The plan holds every step's token ids: bound it before building it.
    let per_step = w.batch.micro_batch_size.saturating_mul(w.batch.grad_accum);
    let planned = samples.len().saturating_mul(w.train.epochs).min(
        w.train
            .max_steps
            .map_or(usize::MAX, |m| m.saturating_mul(per_step)),
    );
    if planned > crate::config::limits::MAX_PLANNED_RECORDS {
        bail!(ConfigError::Value {
            key: "epochs".into(),
            value: w.train.epochs.to_string(),
            reason: format!(
                "the plan would lay out {planned} records ({} records x {} epochs), above the {} it can hold in memory",
                samples.len(),
                w.train.epochs,
                crate::config::limits::MAX_PLANNED_RECORDS
            ),
            fix: "use fewer --epochs, or --max-steps to stop earlier".into(),
        });
    }
    let steps = plan_steps(
        &samples,
        &w.batch,
        w.data.pad_to,
        w.data.train_on_prompt,
        w.seed,
        w.train.epochs,
        w.train.max_steps,
    );
    // Nothing to measure: a run whose steps have no loss tokens would report a loss of 0 and
    // 0 tokens/s as a completed run.
    if steps.iter().all(|s| s.loss_tokens == 0) {
        let (key, value, reason, fix) = if stats.truncated > 0 {
            (
                "max_seq_len",
                max.to_string(),
                format!(
                    "after truncation to {max} tokens no record keeps a response token: the prompts fill it (the shortest prompt has {shortest_prompt} tokens)"
                ),
                format!(
                    "use --max-seq-len well above {shortest_prompt} (2048 is the default), or --train-on-prompt"
                ),
            )
        } else {
            (
                "dataset",
                w.data.dataset.clone(),
                "no record has a response token to compute the loss on".to_string(),
                "check that the records have responses and that the chat template renders them, or use --train-on-prompt".to_string(),
            )
        };
        bail!(ConfigError::Value {
            key: key.into(),
            value,
            reason,
            fix,
        });
    }
    let hash = workload_hash(cfg, &shape, weights.digest()?.as_deref(), &samples, &steps)?;
    notes.extend(cfg.run.batch_note.clone());
    notes.extend(shape.strategy_note(&w.strategy));
    Ok(Prepared {
        shape,
        weights,
        samples,
        data: stats,
        steps,
        hash,
        notes,
        rank: None,
    })
}

/// SHA-256 over the settings that shape the computation and the exact tokens of every step.
///
/// What is hashed is the math: which records (token ids, loss mask) form each optimizer step, the
/// padding policy, the model, the initial weights, what trains and the optimizer. How a step is cut
/// into micro-batches under the token budget is not hashed: the loss and gradient of a step do not
/// depend on it (tested), and the budget is chosen to fit each device's memory, so a Mac and an
/// H200 running the same work get the same hash. Neither is the precision (`--dtype`): it is how
/// the work runs, and `compare` warns when runs with one hash differ in it.
///
/// Initial weights: random ones by their seed; a checkpoint by `weights_digest` (its safetensors
/// headers and sizes, see [`WeightSource::digest`]), and a hub checkpoint also by its id and
/// revision. A local checkpoint's folder path is not hashed: the same weights anywhere are the
/// same work. Strategy: only the fields that apply to its kind (`last_n` for last-n; rank, alpha
/// and the targets, in one order, for LoRA).
pub fn workload_hash(
    cfg: &Config,
    shape: &ModelShape,
    weights_digest: Option<&str>,
    samples: &[Sample],
    steps: &[Step],
) -> Result<String> {
    use crate::config::{LoraTarget, StrategyKind};
    #[derive(Serialize)]
    struct Strategy {
        kind: StrategyKind,
        last_n: Option<usize>,
        lora_rank: Option<usize>,
        lora_alpha: Option<f64>,
        lora_targets: Option<Vec<LoraTarget>>,
    }
    #[derive(Serialize)]
    struct Key<'a> {
        shape: &'a ModelShape,
        weights: WeightsKind,
        /// Pretrained weights from the hub: the repository and its revision.
        hub: Option<(&'a str, &'a str)>,
        /// Pretrained weights: the checkpoint's digest.
        weights_digest: Option<&'a str>,
        seed: u64,
        strategy: Strategy,
        train: &'a crate::config::TrainConfig,
        plan: crate::config::BatchPlanKind,
        /// Padded plans: records per micro-batch decide how much padding there is.
        padded_micro_batch: Option<usize>,
        pad_to: Option<usize>,
        train_on_prompt: bool,
    }
    let w = &cfg.workload;
    let padded = w.batch.plan == crate::config::BatchPlanKind::Padded;
    let pretrained = w.model.weights == WeightsKind::Pretrained;
    let from_hub = pretrained && !Path::new(&w.model.source).is_dir();
    let s = &w.strategy;
    let lora = s.kind == StrategyKind::Lora;
    let mut targets = s.lora_targets.clone();
    targets.sort();
    targets.dedup();
    let key = Key {
        shape,
        weights: w.model.weights,
        hub: from_hub.then_some((w.model.source.as_str(), w.model.revision.as_str())),
        weights_digest: weights_digest.filter(|_| pretrained),
        seed: w.seed,
        strategy: Strategy {
            kind: s.kind,
            last_n: (s.kind == StrategyKind::LastN).then_some(s.last_n),
            lora_rank: lora.then_some(s.lora_rank),
            lora_alpha: lora.then_some(s.lora_alpha),
            lora_targets: lora.then_some(targets),
        },
        train: &w.train,
        plan: w.batch.plan,
        padded_micro_batch: padded.then_some(w.batch.micro_batch_size),
        pad_to: w.data.pad_to,
        train_on_prompt: w.data.train_on_prompt,
    };
    let mut h = Sha256::new();
    let mut key_json = serde_json::to_value(&key)?;
    // The shape's display name does not change the work.
    key_json["shape"]["name"] = serde_json::Value::Null;
    h.update(serde_json::to_vec(&key_json)?);
    for s in steps {
        h.update((s.sample_ids.len() as u64).to_le_bytes());
        for &i in &s.sample_ids {
            let d = &samples[i];
            h.update((d.ids.len() as u64).to_le_bytes());
            h.update((d.prompt_len as u64).to_le_bytes());
            for x in &d.ids {
                h.update(x.to_le_bytes());
            }
        }
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Learning rate of optimizer step `step` (0-based) of `total`: Hugging Face's
/// `get_cosine_schedule_with_warmup` (linear from 0 over `warmup` steps, then cosine to 0).
pub fn lr_at(base: f64, step: usize, warmup: usize, total: usize) -> f64 {
    if step < warmup {
        return base * step as f64 / warmup.max(1) as f64;
    }
    let progress = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
    base * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::config::tests::parse;
    use crate::config::{Framework, TuningMode};

    /// Issue 14: each built-in `--model` name selects its shape (and its hub id for pretrained
    /// weights); a hub id of a built-in model with random weights resolves to the shape without
    /// a download.
    #[test]
    fn model_names_and_hub_ids_resolve_to_their_shapes() {
        let resolve = |argv: &[&str]| {
            let c = Config::resolve(TuningMode::Fast, &parse(argv), Framework::Pytorch).unwrap();
            resolve_model(&c).unwrap().0
        };
        for (name, hub, family) in [
            ("qwen3-0.6b", "Qwen/Qwen3-0.6B", crate::model::Family::Qwen3),
            (
                "llama-3.2-3b",
                "meta-llama/Llama-3.2-3B-Instruct",
                crate::model::Family::Llama,
            ),
        ] {
            let c = Config::resolve(
                TuningMode::Fast,
                &parse(&["--model", name]),
                Framework::Pytorch,
            )
            .unwrap();
            assert_eq!(
                c.workload.model.source, hub,
                "{name}: pretrained weights from its hub id"
            );
            let by_name = resolve(&["--model", name, "--weights", "random"]);
            let by_id = resolve(&["--model", hub, "--weights", "random"]);
            assert_eq!(by_name, by_id, "{name}");
            assert_eq!(by_name.family, family);
        }
        let tiny = resolve(&["--preset", "tiny", "--model", "tiny-qwen3"]);
        assert_eq!(tiny.head_dim(), 32);
        assert!(tiny.tie_word_embeddings);
        assert_eq!(
            resolve(&["--preset", "tiny"]).family,
            crate::model::Family::Phi3
        );
    }

    #[test]
    fn settings_beyond_the_shape_name_the_fix() {
        let c = Config::resolve(
            TuningMode::Fast,
            &parse(&["--preset", "tiny", "--last-n", "9"]),
            Framework::Pytorch,
        )
        .unwrap();
        let msg = validate_for_shape(&c, &ModelShape::tiny())
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("last_n") && msg.contains("--last-n 2"),
            "{msg}"
        );
    }

    #[test]
    fn schedule_matches_hugging_face() {
        // transformers.get_cosine_schedule_with_warmup(opt, 2, 10) multipliers at steps 0..4:
        // 0.0, 0.5, 1.0, 0.9619397662556434, 0.8535533905932737
        let want = [
            0.0,
            0.5,
            1.0,
            0.961_939_766_255_643_4,
            0.853_553_390_593_273_7,
        ];
        for (i, w) in want.iter().enumerate() {
            assert!((lr_at(1.0, i, 2, 10) - w).abs() < 1e-12, "step {i}");
        }
        assert_eq!(lr_at(1.0, 0, 0, 10), 1.0);
    }

    #[test]
    fn hash_is_equal_exactly_for_the_same_work() {
        let mut c = Config::default();
        c.apply_preset(
            crate::config::Preset::Tiny,
            crate::config::Framework::Pytorch,
        );
        let a = prepare(&c).unwrap();
        let b = prepare(&c).unwrap();
        assert_eq!(a.hash, b.hash);
        let mut d = c.clone();
        d.run.quiet = true; // how it runs does not change the work
        d.run.dtype = crate::config::DTypeChoice::Float32;
        assert_eq!(prepare(&d).unwrap().hash, a.hash);
        // The token budget only re-cuts a step into micro-batches: same math, same hash.
        d.workload.batch.max_tokens_per_micro_batch = 8192;
        let e = prepare(&d).unwrap();
        assert_eq!(e.hash, a.hash);
        assert_ne!(
            e.steps.iter().map(|s| s.micro_batches.len()).sum::<usize>(),
            a.steps.iter().map(|s| s.micro_batches.len()).sum::<usize>()
        );
        for change in [
            |c: &mut Config| c.workload.seed = 1,
            |c: &mut Config| c.workload.data.train_on_prompt = true,
            |c: &mut Config| c.workload.train.lr = 0.5,
            |c: &mut Config| c.workload.batch.plan = crate::config::BatchPlanKind::Packed,
            |c: &mut Config| c.workload.strategy.last_n = 2,
            |c: &mut Config| c.workload.samples = Some(99),
            |c: &mut Config| c.workload.batch.grad_accum = 2,
        ] {
            let mut e = c.clone();
            change(&mut e);
            assert_ne!(prepare(&e).unwrap().hash, a.hash);
        }
    }

    /// The hash names the work once: settings that do not apply to the strategy, and the order
    /// LoRA targets are listed in, leave it alone; the hub revision and a local checkpoint's
    /// weights (not its folder) are part of it.
    #[test]
    fn hash_covers_what_applies_and_the_checkpoint() {
        use crate::config::{LoraTarget, StrategyKind};
        let mut c = Config::default();
        c.apply_preset(
            crate::config::Preset::Tiny,
            crate::config::Framework::Pytorch,
        );
        c.workload.samples = Some(16);
        let base = prepare(&c).unwrap();
        let hash = |c: &Config| prepare(c).unwrap().hash;
        // last-n: LoRA's settings do not apply.
        let mut d = c.clone();
        d.workload.strategy.lora_rank = 4;
        d.workload.strategy.lora_targets = vec![LoraTarget::OProj];
        assert_eq!(hash(&d), base.hash);
        // full: neither does last_n.
        let mut full = c.clone();
        full.workload.strategy.kind = StrategyKind::Full;
        let mut full2 = full.clone();
        full2.workload.strategy.last_n = 2;
        assert_eq!(hash(&full), hash(&full2));
        // LoRA: the targets in any order (and repeated) are one set; last_n does not apply.
        let mut lora = c.clone();
        lora.workload.strategy.kind = StrategyKind::Lora;
        lora.workload.strategy.lora_targets = vec![LoraTarget::OProj, LoraTarget::QkvProj];
        let mut lora2 = lora.clone();
        lora2.workload.strategy.lora_targets =
            vec![LoraTarget::QkvProj, LoraTarget::OProj, LoraTarget::QkvProj];
        lora2.workload.strategy.last_n = 2;
        assert_eq!(hash(&lora), hash(&lora2));
        let mut lora3 = lora.clone();
        lora3.workload.strategy.lora_rank = 4;
        assert_ne!(hash(&lora), hash(&lora3));

        // Pretrained weights from the hub: the revision counts (hashed without a download).
        let mut hub = c.clone();
        hub.workload.model.weights = WeightsKind::Pretrained;
        hub.workload.model.source = "org/model".into();
        hub.workload.model.revision = "v1".into();
        let key = |c: &Config| {
            workload_hash(c, &base.shape, Some("d"), &base.samples, &base.steps).unwrap()
        };
        let mut hub2 = hub.clone();
        hub2.workload.model.revision = "v2".into();
        assert_ne!(key(&hub), key(&hub2));
        // Random weights: the revision and a digest do not apply.
        let mut random2 = c.clone();
        random2.workload.model.revision = "v2".into();
        assert_eq!(key(&c), key(&random2));

        // A local checkpoint: its weights' digest counts, its folder does not.
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        crate::model::write_checkpoint(&a, &ModelShape::tiny(), 1).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        for f in ["config.json", "model.safetensors"] {
            std::fs::copy(a.join(f), b.join(f)).unwrap();
        }
        let mut local = c.clone();
        local.workload.model.preset = None;
        local.workload.model.weights = WeightsKind::Pretrained;
        local.workload.model.source = a.display().to_string();
        let mut moved = local.clone();
        moved.workload.model.source = b.display().to_string();
        assert_eq!(hash(&local), hash(&moved), "the folder is not the work");
        // The same tensors stored in bf16: another checkpoint.
        let tensors = crate::model::read_safetensors(&a.join("model.safetensors")).unwrap();
        let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
            .iter()
            .map(|(n, t)| {
                let b = t
                    .values
                    .iter()
                    .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
                    .collect();
                (n.clone(), t.shape.clone(), b)
            })
            .collect();
        let views: Vec<(String, safetensors::tensor::TensorView)> = bytes
            .iter()
            .map(|(n, sh, b)| {
                let v =
                    safetensors::tensor::TensorView::new(safetensors::Dtype::BF16, sh.clone(), b)
                        .unwrap();
                (n.clone(), v)
            })
            .collect();
        let data = safetensors::tensor::serialize(views, None).unwrap();
        std::fs::write(b.join("model.safetensors"), data).unwrap();
        assert_ne!(hash(&local), hash(&moved), "other weights, other work");
    }

    /// Records longer than `max_seq_len`: `truncate` keeps their first `max_seq_len` tokens,
    /// `drop` leaves them out; both are counted for the summary's `workload.data`.
    #[test]
    fn overlong_records_are_truncated_or_dropped_and_counted() {
        let mut c = Config::default();
        c.apply_preset(
            crate::config::Preset::Tiny,
            crate::config::Framework::Pytorch,
        );
        c.workload.samples = Some(64);
        c.workload.data.max_seq_len = 128;
        let longest = synthetic::generate(64, c.workload.seed)
            .iter()
            .map(|(s, _)| s.len())
            .collect::<Vec<_>>();
        let over = longest.iter().filter(|&&n| n > 128).count();
        assert!(
            over > 0 && over < 64,
            "the test needs some overlong records"
        );

        c.workload.data.overlong = OverlongPolicy::Truncate;
        let t = prepare(&c).unwrap();
        assert_eq!(t.data.truncated, over);
        assert_eq!(t.data.dropped_overlong, 0);
        assert_eq!(t.data.records_used, 64);
        assert_eq!(t.data.max_tokens, 128);
        assert!(t.samples.iter().all(|s| s.len() <= 128));
        assert!(t
            .steps
            .iter()
            .flat_map(|s| &s.micro_batches)
            .all(|m| m.seq_len <= 128));

        c.workload.data.overlong = OverlongPolicy::Drop;
        let d = prepare(&c).unwrap();
        assert_eq!(d.data.dropped_overlong, over);
        assert_eq!(d.data.truncated, 0);
        assert_eq!(d.data.records_used, 64 - over);
        assert_eq!(d.data.records_read, 64);
        assert!(d.samples.iter().all(|s| s.len() <= 128));
        assert_ne!(d.hash, t.hash);

        // Every record dropped: a configuration error naming the fix, before any model loads.
        c.workload.data.max_seq_len = 8;
        let Err(e) = prepare(&c) else {
            panic!("every record dropped must be an error")
        };
        assert_eq!(crate::error::exit_code_for(&e), crate::error::exit::USAGE);
        assert!(e.to_string().contains("--overlong truncate"), "{e}");
    }
}
