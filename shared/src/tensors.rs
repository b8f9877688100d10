//! The named tensors a backend builds its model from, handled the same way in both binaries:
//! taken by checkpoint name while the model is built (each once; a missing one is an error naming
//! it; none may be left over), and the built model's tensors checked against shared's description
//! of the workload's model (every expected tensor held once, with its shape, training exactly
//! when the strategy trains it), which gives the parameter counts the summary reports. A backend
//! that built something else fails at load with the tensor's name, never with a wrong count.

use std::collections::HashMap;

use anyhow::{bail, Context, Result};

use crate::config::StrategyConfig;
use crate::model::{ModelShape, ParamCounts, ParamSpec};

/// Every tensor a backend holds for `shape` under `strategy`: the base parameters in checkpoint
/// order, then the LoRA adapters.
pub fn expected(shape: &ModelShape, strategy: &StrategyConfig) -> Vec<ParamSpec> {
    let mut specs = shape.parameters();
    specs.extend(shape.lora_parameters(strategy));
    specs
}

/// Loaded tensors by checkpoint name, handed out one by one as the model is built.
pub struct NamedTensors<T> {
    tensors: HashMap<String, T>,
}

impl<T> NamedTensors<T> {
    pub fn new(tensors: HashMap<String, T>) -> Self {
        Self { tensors }
    }

    /// The tensor `name`: it must have been loaded and not taken already.
    pub fn take(&mut self, name: &str) -> Result<T> {
        self.tensors
            .remove(name)
            .with_context(|| format!("internal: tensor {name} was not loaded (or was taken twice)"))
    }

    /// A tensor that may be absent: a LoRA adapter, there when the strategy adapts the projection.
    pub fn take_if_loaded(&mut self, name: &str) -> Option<T> {
        self.tensors.remove(name)
    }

    /// Ends the building: every loaded tensor was taken (one left over is a tensor of the
    /// description that the model left out).
    pub fn finish(self) -> Result<()> {
        if self.tensors.is_empty() {
            return Ok(());
        }
        let mut left: Vec<&String> = self.tensors.keys().collect();
        left.sort();
        bail!("internal: tensors loaded but not used by the model: {left:?}")
    }
}

/// One tensor a built model holds.
pub struct Held<'a> {
    pub name: &'a str,
    pub shape: Vec<usize>,
    /// Whether the backend computes its gradient and updates it.
    pub trainable: bool,
}

impl<'a> Held<'a> {
    /// From a framework's dimensions (libtorch's i64, MLX's i32).
    pub fn new<D: Copy + Into<i64>>(name: &'a str, dims: &[D], trainable: bool) -> Self {
        Self {
            name,
            shape: dims.iter().map(|&d| d.into() as usize).collect(),
            trainable,
        }
    }
}

/// Checks the tensors a built model holds against [`expected`]: each expected tensor held exactly
/// once, with its shape, trainable exactly when [`ModelShape::is_trainable`] says so, and nothing
/// else. Returns the parameter counts (a tied head counts once: it is one tensor).
pub fn check_held<'a>(
    shape: &ModelShape,
    strategy: &StrategyConfig,
    held: impl IntoIterator<Item = Held<'a>>,
) -> Result<ParamCounts> {
    let specs = expected(shape, strategy);
    let mut unseen: HashMap<&str, &ParamSpec> =
        specs.iter().map(|s| (s.name.as_str(), s)).collect();
    let mut counts = ParamCounts::default();
    for h in held {
        let Some(spec) = unseen.remove(h.name) else {
            if specs.iter().any(|s| s.name == h.name) {
                bail!("internal: the model holds {} twice", h.name);
            }
            bail!(
                "internal: the model holds {}, which the {:?} description has no place for",
                h.name,
                shape.family
            );
        };
        if h.shape != spec.shape {
            bail!(
                "internal: {} has shape {:?} in the model, {:?} in shared",
                h.name,
                h.shape,
                spec.shape
            );
        }
        if h.trainable != shape.is_trainable(h.name, strategy) {
            bail!(
                "internal: {} {} in the model but {} under the strategy",
                h.name,
                if h.trainable { "trains" } else { "is frozen" },
                if h.trainable { "is frozen" } else { "trains" }
            );
        }
        counts.total += spec.numel();
        if h.trainable {
            counts.trainable += spec.numel();
        }
    }
    if let Some(missing) = specs.iter().find(|s| unseen.contains_key(s.name.as_str())) {
        bail!("internal: the model has no tensor {}", missing.name);
    }
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{StrategyConfig, StrategyKind};

    fn lora() -> StrategyConfig {
        StrategyConfig {
            kind: StrategyKind::Lora,
            ..StrategyConfig::default()
        }
    }

    /// What a correct backend holds: every expected tensor, trainable as the strategy says.
    fn held<'a>(shape: &ModelShape, s: &StrategyConfig, specs: &'a [ParamSpec]) -> Vec<Held<'a>> {
        specs
            .iter()
            .map(|p| Held {
                name: &p.name,
                shape: p.shape.clone(),
                trainable: shape.is_trainable(&p.name, s),
            })
            .collect()
    }

    #[test]
    fn a_model_as_described_counts_as_shared_does() {
        for shape in [
            ModelShape::tiny(),
            ModelShape::from_preset(crate::config::ModelPreset::TinyQwen3),
        ] {
            for s in [StrategyConfig::default(), lora()] {
                let specs = expected(&shape, &s);
                let counts = check_held(&shape, &s, held(&shape, &s, &specs)).unwrap();
                assert_eq!(counts, shape.parameter_counts(&s));
            }
        }
    }

    #[test]
    fn every_departure_names_the_tensor() {
        let (shape, s) = (ModelShape::tiny(), lora());
        let specs = expected(&shape, &s);
        let err = |h: Vec<Held>| check_held(&shape, &s, h).unwrap_err().to_string();
        let name = "model.layers.1.self_attn.o_proj.weight";
        // Missing.
        let mut h = held(&shape, &s, &specs);
        h.retain(|x| x.name != name);
        assert!(err(h).contains(&format!("no tensor {name}")));
        // Twice.
        let mut h = held(&shape, &s, &specs);
        h.push(Held {
            name,
            shape: vec![64, 64],
            trainable: false,
        });
        assert!(err(h).contains(&format!("{name} twice")));
        // Unknown.
        let mut h = held(&shape, &s, &specs);
        h.push(Held {
            name: "lm_head.bias",
            shape: vec![1],
            trainable: false,
        });
        assert!(err(h).contains("lm_head.bias"));
        // Wrong shape.
        let mut h = held(&shape, &s, &specs);
        h.iter_mut().find(|x| x.name == name).unwrap().shape = vec![1, 2];
        let e = err(h);
        assert!(e.contains(name) && e.contains("[1, 2]"), "{e}");
        // Trains where the strategy freezes it (LoRA: base weights are frozen).
        let mut h = held(&shape, &s, &specs);
        h.iter_mut().find(|x| x.name == name).unwrap().trainable = true;
        let e = err(h);
        assert!(e.contains(name) && e.contains("trains in the model"), "{e}");
    }

    #[test]
    fn named_tensors_are_taken_once_and_all() {
        let map: HashMap<String, u8> = [("a".to_string(), 1), ("b".to_string(), 2)].into();
        let mut t = NamedTensors::new(map.clone());
        assert_eq!(t.take("a").unwrap(), 1);
        assert!(t.take("a").unwrap_err().to_string().contains("tensor a"));
        assert_eq!(t.take_if_loaded("c"), None);
        let e = t.finish().unwrap_err().to_string();
        assert!(e.contains("\"b\""), "{e}");
        let mut t = NamedTensors::new(map);
        t.take("a").unwrap();
        t.take("b").unwrap();
        t.finish().unwrap();
    }
}
