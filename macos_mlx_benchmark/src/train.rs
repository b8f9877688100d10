//! The MLX backend: builds the model from shared's weights, runs one optimizer step per call
//! (forward/backward over the step's micro-batches, gradient clipping, AdamW), and reports what
//! the shared runner measures. Everything about *what* is trained comes from `shared`.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use mlx_rs::error::Exception;
use mlx_rs::module::ModuleParameters;
use mlx_rs::{nn, ops, transforms::eval, Array, Device, Dtype};
use shared::config::{Config, DTypeChoice, DeviceChoice, TrainConfig};
use shared::data::batch::Step;
use shared::error::ConfigError;
use shared::measure::probe::{self, Software};
use shared::model::{ModelShape, ParamCounts};
use shared::runner::{Backend, Calibration, MemoryReading, StepReport};
use shared::summary::BackendInfo;
use shared::workload::Prepared;

use crate::phi3::{scale, MicroBatchArrays, Phi3ForCausalLM, Precision};

/// The MLX library version: from mlx-sys's build metadata where it is a direct dependency
/// (Linux), else the version mlx-sys 0.7.0 pins (its mlx-c fetches MLX v0.32.2).
const MLX_VERSION: &str = match option_env!("FTB_MLX_VERSION") {
    Some(v) => v,
    None => "0.32.2",
};
const MLX_RS_CRATE: &str = "mlx-rs 0.33.0";

/// Which MLX device computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MlxDevice {
    Cpu,
    /// Metal on Apple Silicon.
    Gpu,
}

/// AdamW state of one trainable tensor.
struct AdamState {
    m: Array,
    v: Array,
    /// Updates applied so far.
    steps: u64,
}

pub struct MlxBackend {
    model: Phi3ForCausalLM,
    shape: ModelShape,
    precision: Precision,
    device: MlxDevice,
    device_name: String,
    train: TrainConfig,
    optimizer: HashMap<Rc<str>, AdamState>,
    counts: ParamCounts,
}

/// `--device` for this binary: `auto` is Metal on a Mac and the CPU elsewhere.
fn resolve_device(choice: DeviceChoice) -> Result<MlxDevice, ConfigError> {
    const FIX: &str = "use --device auto, gpu (Metal, on a Mac) or cpu with macos_mlx_benchmark; \
                       for CUDA or MPS run windows_pytorch_benchmark";
    let bad = |value: &str, reason: &str| ConfigError::Value {
        key: "device".into(),
        value: value.into(),
        reason: reason.into(),
        fix: FIX.into(),
    };
    match choice {
        DeviceChoice::Auto if cfg!(target_os = "macos") => Ok(MlxDevice::Gpu),
        DeviceChoice::Auto | DeviceChoice::Cpu => Ok(MlxDevice::Cpu),
        DeviceChoice::Gpu if cfg!(target_os = "macos") => Ok(MlxDevice::Gpu),
        DeviceChoice::Gpu => Err(bad("gpu", "this build of MLX has no GPU backend (MLX's GPU is Metal, on Apple Silicon; the Linux build is CPU-only)")),
        DeviceChoice::Cuda => Err(bad("cuda", "the MLX binary has no CUDA device (its devices are gpu = Metal and cpu)")),
        DeviceChoice::Mps => Err(bad("mps", "MPS is PyTorch's name for the Apple GPU; MLX calls it gpu")),
    }
}

/// Checks `--device` before anything is loaded, so that a bad value exits with the usage code.
pub fn check_device(cfg: &Config) -> Result<(), ConfigError> {
    resolve_device(cfg.run.device).map(|_| ())
}

fn resolve_precision(choice: DTypeChoice, device: MlxDevice) -> Precision {
    match choice {
        DTypeChoice::Auto => match device {
            MlxDevice::Gpu => Precision::Bf16,
            MlxDevice::Cpu => Precision::Float32,
        },
        DTypeChoice::Float32 => Precision::Float32,
        DTypeChoice::Bf16 => Precision::Bf16,
        DTypeChoice::MixedBf16 => Precision::MixedBf16,
    }
}

impl MlxBackend {
    pub fn new(cfg: &Config, prepared: &Prepared) -> Result<Self> {
        let device = resolve_device(cfg.run.device)?;
        let precision = resolve_precision(cfg.run.dtype, device);
        Device::set_default(&match device {
            MlxDevice::Cpu => Device::cpu(),
            MlxDevice::Gpu => Device::gpu(),
        });
        // Peak memory is reported "since the backend was built" (each repeat starts fresh).
        crate::memory::start_of_run()?;
        let shape = prepared.shape.clone();
        let strategy = &cfg.workload.strategy;
        let mut specs = shape.parameters();
        specs.extend(shape.lora_parameters(strategy));
        let dtype = precision.param_dtype();
        let mut tensors = HashMap::with_capacity(specs.len());
        // LoRA adapters draw from their own stream (`shared::model::adapter_seed`); base weights from the
        // weight source (the workload seed, or the checkpoint).
        let adapter_seed = shared::model::adapter_seed(cfg.workload.seed);
        prepared
            .weights
            .for_each(&specs, adapter_seed, |spec, data| {
                let dims: Vec<i32> = spec.shape.iter().map(|&d| d as i32).collect();
                let a = Array::from_slice(&data.values, &dims).as_dtype(dtype)?;
                // Evaluated one by one so the host copy and an fp32 source of a bf16 cast are freed.
                a.eval()?;
                tensors.insert(spec.name.clone(), a);
                Ok(())
            })?;
        let model = Phi3ForCausalLM::from_tensors(&shape, strategy, precision, tensors)?;

        // The counts the summary reports come from shared; check them against the arrays.
        let counts = shape.parameter_counts(strategy);
        let all = model.parameters().flatten();
        let trainable = model.trainable_parameters().flatten();
        let total: usize = all.values().map(|a| a.size()).sum();
        let trainable_total: usize = trainable.values().map(|a| a.size()).sum();
        if total != counts.total || trainable_total != counts.trainable || all.len() != specs.len()
        {
            bail!(
                "internal: the MLX model holds {} tensors, {total} parameters ({trainable_total} trainable) but shared expects {} tensors, {} ({})",
                all.len(),
                specs.len(),
                counts.total,
                counts.trainable
            );
        }
        for s in &specs {
            let a = all
                .get(s.name.as_str())
                .with_context(|| format!("internal: the MLX model has no tensor {}", s.name))?;
            let want: Vec<i32> = s.shape.iter().map(|&d| d as i32).collect();
            if a.shape() != want.as_slice() {
                bail!(
                    "internal: {} has shape {:?} in the MLX model, {:?} in shared",
                    s.name,
                    a.shape(),
                    want
                );
            }
            if trainable.contains_key(s.name.as_str()) != shape.is_trainable(&s.name, strategy) {
                bail!("internal: {} trains in the MLX model but not under the strategy, or the reverse", s.name);
            }
        }
        drop((all, trainable));

        let device_name = match device {
            MlxDevice::Cpu => probe::probe_hardware().cpu_model,
            MlxDevice::Gpu => probe::probe_hardware()
                .apple
                .map(|a| a.chip)
                .unwrap_or_else(|| "Apple GPU".into()),
        };
        Ok(Self {
            model,
            shape,
            precision,
            device,
            device_name,
            train: cfg.workload.train.clone(),
            optimizer: HashMap::new(),
            counts,
        })
    }
}

/// One PyTorch-semantics AdamW update of `p` with gradient `g` (decoupled weight decay):
/// `p *= 1 - lr*wd; m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*g^2;
///  p -= (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)`, t = this tensor's update count.
///
/// The state is stored in fp32 for fp32 master weights (float32, mixed-bf16) and in the
/// parameter dtype under bf16. The arithmetic is fp32 in every case, with the scalars computed
/// in f64 on the host, as PyTorch's kernels do for bf16 tensors (in bf16, beta2 = 0.999 would
/// round to 1.0); results are rounded to the storage dtype.
fn adamw(
    tc: &TrainConfig,
    state: &mut HashMap<Rc<str>, AdamState>,
    key: &Rc<str>,
    p: &Array,
    g: &Array,
    lr: f64,
) -> Result<Array, Exception> {
    let f32 = Dtype::Float32;
    let state_dtype = p.dtype();
    let st = match state.entry(key.clone()) {
        Entry::Occupied(o) => o.into_mut(),
        Entry::Vacant(slot) => {
            let zeros = ops::zeros_dtype(p.shape(), state_dtype)?;
            slot.insert(AdamState {
                m: zeros.clone(),
                v: zeros,
                steps: 0,
            })
        }
    };
    let t = (st.steps + 1) as i32;
    let g = g.as_dtype(f32)?;
    let mut p32 = p.as_dtype(f32)?;
    if tc.weight_decay != 0.0 {
        p32 = scale(&p32, (1.0 - lr * tc.weight_decay) as f32)?;
    }
    let m = scale(&st.m.as_dtype(f32)?, tc.beta1 as f32)?
        .add(scale(&g, (1.0 - tc.beta1) as f32)?)?
        .as_dtype(state_dtype)?;
    let v = scale(&st.v.as_dtype(f32)?, tc.beta2 as f32)?
        .add(scale(&g.square()?, (1.0 - tc.beta2) as f32)?)?
        .as_dtype(state_dtype)?;
    let step_size = lr / (1.0 - tc.beta1.powi(t));
    let bias_correction2_sqrt = (1.0 - tc.beta2.powi(t)).sqrt();
    let denom = scale(
        &v.as_dtype(f32)?.sqrt()?,
        (1.0 / bias_correction2_sqrt) as f32,
    )?
    .add(Array::from_f32(tc.eps as f32))?;
    let update = scale(&m.as_dtype(f32)?.divide(&denom)?, step_size as f32)?;
    let new_p = p32.subtract(update)?.as_dtype(p.dtype())?;
    st.m = m;
    st.v = v;
    st.steps += 1;
    Ok(new_p)
}

/// Sum of the token cross-entropies `logsumexp(logits) - logits[target]`, in fp32.
///
/// Written with a single `exp` pass: `lse = m + log(sum(exp(x - m)))` with the row maximum `m`
/// held constant (its gradient is zero). The backward pass reuses `exp`'s output, whereas
/// `logsumexp` recomputes the softmax; on the CPU, MLX's `exp` is scalar code and this halves the
/// time of the largest elementwise work of the step.
fn token_loss_sum(logits: &Array, targets: &Array) -> Result<Array, Exception> {
    let x = logits.as_dtype(Dtype::Float32)?;
    let m = mlx_rs::stop_gradient(x.max_axis(-1, true)?)?;
    let sum_exp = x.subtract(&m)?.exp()?.sum_axis(-1, false)?;
    let lse = m.squeeze_axes(&[-1])?.add(sum_exp.log()?)?;
    let picked = x
        .take_along_axis(targets.reshape(&[-1, 1])?, -1)?
        .squeeze_axes(&[-1])?;
    lse.subtract(picked)?.sum(None)
}

/// The BLAS/LAPACK libraries mapped into this process (Linux), to record which one MLX's CPU
/// backend uses (setup-mlx-linux.sh points it at OpenBLAS).
fn mapped_blas() -> Option<String> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    let mut libs: Vec<String> = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .filter(|p| p.contains("blas") || p.contains("lapack"))
        .map(|p| {
            std::fs::canonicalize(p)
                .map(|c| c.display().to_string())
                .unwrap_or_else(|_| p.to_string())
        })
        .collect();
    libs.sort();
    libs.dedup();
    (!libs.is_empty()).then(|| libs.join(", "))
}

impl Backend for MlxBackend {
    fn train_step(&mut self, step: &Step, lr: f64) -> Result<StepReport> {
        // The step's loss = sum over micro-batches of (token CE sum / the step's loss tokens).
        let denom = Array::from_f32(step.loss_tokens.max(1) as f32);
        let mut grads: Option<HashMap<Rc<str>, Array>> = None;
        let mut loss: Option<Array> = None;
        let n_micro = step.micro_batches.len();
        let mut ran = 0;
        for (i, mb) in step.micro_batches.iter().enumerate() {
            if mb.loss_tokens == 0 {
                // No label counts: its loss and gradients are exactly zero, so it is not run (as
                // on every backend; the FLOP count leaves it out).
                continue;
            }
            ran += 1;
            let arrays = MicroBatchArrays::new(mb, &self.shape)?;
            let loss_fn = |model: &mut Phi3ForCausalLM,
                           (a, denom): (&MicroBatchArrays, &Array)|
             -> Result<Array, Exception> {
                let logits = model.forward(&a.forward_inputs())?;
                token_loss_sum(&logits, &a.targets)?.divide(denom)
            };
            // Gradients w.r.t. the trainable (unfrozen) parameters only.
            let mut value_and_grad = nn::value_and_grad(loss_fn);
            let (mb_loss, mb_grads) = value_and_grad(&mut self.model, (&arrays, &denom))?;
            // Gradient accumulation: sum over the step's micro-batches.
            grads = Some(match grads.take() {
                None => mb_grads,
                Some(mut acc) => {
                    for (k, g) in mb_grads {
                        let sum = acc.get(&k).map(|a| a.add(&g)).transpose()?.unwrap_or(g);
                        acc.insert(k, sum);
                    }
                    acc
                }
            });
            loss = Some(match loss.take() {
                None => mb_loss,
                Some(l) => l.add(&mb_loss)?,
            });
            if i + 1 < n_micro {
                // Device sync: materialise the running sums so that this micro-batch's
                // activations are freed before the next one is traced.
                let (g, l) = (
                    grads.as_ref().context("gradients")?,
                    loss.as_ref().context("loss")?,
                );
                eval(g.values().chain(std::iter::once(l)))?;
            }
        }
        // A step without loss tokens still takes an optimizer step, with zero gradients (as
        // PyTorch's AdamW does when every gradient is zero).
        let mut grads = match grads {
            Some(g) => g,
            None => self
                .model
                .trainable_parameters()
                .flatten()
                .into_iter()
                .map(|(k, a)| Ok((k, ops::zeros_like(a)?)))
                .collect::<Result<_, Exception>>()?,
        };
        let loss = loss.unwrap_or_else(|| Array::from_f32(0.0));

        // Global gradient norm (fp32), then clipping: coef = max / (norm + 1e-6), applied if < 1.
        let mut sq = Array::from_f32(0.0);
        for g in grads.values() {
            sq = sq.add(g.as_dtype(Dtype::Float32)?.square()?.sum(None)?)?;
        }
        let grad_norm = sq.sqrt()?;
        if self.train.max_grad_norm > 0.0 {
            let coef = Array::from_f32(self.train.max_grad_norm as f32)
                .divide(grad_norm.add(Array::from_f32(1e-6))?)?;
            let coef = ops::minimum(&coef, Array::from_f32(1.0))?;
            for g in grads.values_mut() {
                // In fp32, rounded back to the gradient's dtype.
                *g = g
                    .as_dtype(Dtype::Float32)?
                    .multiply(&coef)?
                    .as_dtype(g.dtype())?;
            }
        }

        // AdamW over the trainable tensors, then write the new values into the model.
        let mut updated: Vec<(Rc<str>, Array)> = Vec::with_capacity(grads.len());
        {
            let params = self.model.parameters().flatten();
            let mut keys: Vec<&Rc<str>> = grads.keys().collect();
            keys.sort();
            for k in keys {
                let p = params
                    .get(k)
                    .with_context(|| format!("internal: gradient for unknown parameter {k}"))?;
                let p = (*p).clone();
                updated.push((
                    k.clone(),
                    adamw(&self.train, &mut self.optimizer, k, &p, &grads[k], lr)?,
                ));
            }
        }
        {
            let mut params = self.model.parameters_mut().flatten();
            for (k, new) in &updated {
                **params
                    .get_mut(k)
                    .with_context(|| format!("internal: no parameter {k}"))? = new.clone();
            }
        }
        // Device sync: the loss, every updated parameter and the optimizer state, before the
        // runner reads the clock.
        let mut outputs: Vec<&Array> = vec![&loss, &grad_norm];
        outputs.extend(updated.iter().map(|(_, a)| a));
        outputs.extend(self.optimizer.values().flat_map(|s| [&s.m, &s.v]));
        eval(outputs)?;
        Ok(StepReport {
            loss: f64::from(loss.item_exact::<f32>()),
            grad_norm: Some(f64::from(grad_norm.item_exact::<f32>())),
            micro_batches_run: Some(ran),
        })
    }

    /// MLX's held memory (active + cache) between steps, outside the timed region.
    fn after_step(&mut self) {
        crate::memory::sample_held();
    }

    fn memory(&mut self) -> MemoryReading {
        crate::memory::reading(self.device == MlxDevice::Gpu)
    }

    fn info(&self) -> BackendInfo {
        let mut details = serde_json::Map::new();
        details.insert("mlx_version".into(), MLX_VERSION.into());
        details.insert("compile".into(), false.into());
        details.insert(
            "attention".into(),
            "mlx fast::scaled_dot_product_attention (causal, or a boolean document mask for packed rows)".into(),
        );
        details.insert(
            "optimizer".into(),
            "AdamW with PyTorch semantics, written over the trainable arrays".into(),
        );
        details.insert(
            "optimizer_state_dtype".into(),
            format!("{:?}", self.precision.param_dtype())
                .to_lowercase()
                .into(),
        );
        if let Some(blas) = mapped_blas() {
            details.insert("blas".into(), blas.into());
        }
        #[cfg(target_os = "linux")]
        if let Some(core) = crate::openblas::corename() {
            details.insert("openblas_core".into(), core.into());
        }
        details.insert(
            "logits".into(),
            "computed at the loss positions only (label != -100)".into(),
        );
        BackendInfo {
            framework: "mlx".into(),
            device: match self.device {
                MlxDevice::Cpu => "cpu".into(),
                MlxDevice::Gpu => "gpu".into(),
            },
            device_name: self.device_name.clone(),
            dtype: self.precision.name().into(),
            world_size: 1,
            details,
        }
    }

    fn parameter_counts(&self) -> ParamCounts {
        self.counts
    }

    fn software(&self) -> Software {
        probe::software(MLX_RS_CRATE, &format!("MLX {MLX_VERSION}"))
    }

    /// One n×n×n matrix product in the run's compute precision (fp32 for float32 runs, bf16 for
    /// bf16 and mixed-bf16 ones): n = 4096 on the GPU, 1024 on the CPU; the mean of 10 timed
    /// products after 3 warm-ups.
    fn calibrate_tflops(&mut self) -> Result<Calibration> {
        let n = match self.device {
            MlxDevice::Gpu => 4096,
            MlxDevice::Cpu => 1024,
        };
        let dtype = match self.precision {
            Precision::Float32 => Dtype::Float32,
            Precision::Bf16 | Precision::MixedBf16 => Dtype::Bfloat16,
        };
        let a = mlx_rs::random::normal::<f32>(&[n, n], None, None, None)?.as_dtype(dtype)?;
        let b = mlx_rs::random::normal::<f32>(&[n, n], None, None, None)?.as_dtype(dtype)?;
        eval([&a, &b])?;
        for _ in 0..3 {
            a.matmul(&b)?.eval()?;
        }
        let runs = 10;
        let t0 = Instant::now();
        for _ in 0..runs {
            // Device sync per product.
            a.matmul(&b)?.eval()?;
        }
        let mean_s = t0.elapsed().as_secs_f64() / f64::from(runs);
        drop((a, b));
        // The calibration's arrays are not the training's: the peaks restart from here.
        crate::memory::start_of_run()?;
        Ok(Calibration {
            tflops: 2.0 * f64::from(n).powi(3) / mean_s / 1e12,
            precision: if dtype == Dtype::Float32 {
                "fp32"
            } else {
                "bf16"
            }
            .into(),
            size: n as usize,
        })
    }
}
