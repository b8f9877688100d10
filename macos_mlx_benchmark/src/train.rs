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
use mlx_rs::transforms::{async_eval, eval};
use mlx_rs::{nn, ops, Array, Device, Dtype};
use shared::config::{Config, TrainConfig};
use shared::data::batch::Step;
use shared::error::ConfigError;
use shared::measure::probe::{self, Software};
use shared::model::ParamCounts;
use shared::runner::{Backend, Calibration, MemoryReading, StepReport};
use shared::summary::BackendInfo;
use shared::tensors::Held;
use shared::workload::Prepared;

use crate::decoder::{
    rope_freqs, CausalLM, Compiled, Kernels, MicroBatchArrays, ParamDtype, Precision, SwiGlu,
};
use crate::device::{self, MlxDevice};
use crate::fused_adamw::FusedAdamW;
use crate::tuning::Tuning;

/// The MLX library version: from mlx-sys's build metadata where it is a direct dependency
/// (Linux), else the version mlx-sys 0.7.0 pins (its mlx-c fetches MLX v0.32.2).
const MLX_VERSION: &str = match option_env!("FTB_MLX_VERSION") {
    Some(v) => v,
    None => "0.32.2",
};
const MLX_RS_CRATE: &str = "mlx-rs 0.33.0";

/// AdamW state of one trainable tensor.
struct AdamState {
    m: Array,
    v: Array,
    /// Updates applied so far.
    steps: u64,
}

pub struct MlxBackend {
    model: CausalLM,
    precision: Precision,
    device: MlxDevice,
    device_name: String,
    train: TrainConfig,
    optimizer: HashMap<Rc<str>, AdamState>,
    counts: ParamCounts,
    tuning: Tuning,
    /// RoPE wavelengths on the device (`decoder::rope_freqs`).
    freqs: Array,
    /// How each tensor's AdamW update runs (`Tuning::fused_adamw`, `Tuning::compile`).
    update: Update,
    /// Positions computed in the last step by attention (padding columns of
    /// `Tuning::seq_multiple` included) and by everything else (real tokens only with
    /// `Tuning::real_tokens`).
    attention_tokens: usize,
    dense_tokens: usize,
    /// The MLX library loaded (`/proc/self/maps`), for the summary.
    libmlx: Option<String>,
    /// On CUDA, MLX's compiled-kernel cache as the run found it.
    kernel_cache: Option<device::KernelCache>,
    /// `FTB_PROFILE=1`: host seconds per phase of the step, summed over the run (the summary's
    /// `backend.details.profile_by_phase_total_s`). MLX encodes GPU work on the calling thread
    /// when an evaluation starts, so these say where the host's time goes: building the graph,
    /// encoding it (`async_eval`), and the step's final evaluation (encoding the rest and waiting).
    profile: Option<std::collections::BTreeMap<&'static str, f64>>,
    /// With `profile`: the highest MLX allocated peak within each phase over the run, in bytes
    /// (`backend.details.profile_peak_by_phase_gib`). MLX allocates a kernel's outputs when the
    /// host encodes it and frees them when the GPU has run it (its CUDA backend keeps every
    /// input of a recorded graph until the graph completes), so the window of a phase is where its
    /// memory was asked for, with what the GPU still held from before.
    profile_peaks: std::collections::BTreeMap<&'static str, usize>,
    /// With `profile`: the operations of MLX's graph for the first micro-batch's loss and
    /// gradients, by name (`graph::count_ops`), taken once.
    graph_ops: Option<std::collections::BTreeMap<String, usize>>,
    /// Seconds spent building the model: making the initial values on the host, and putting them
    /// on the device (the summary's `backend.details.load_breakdown_s`).
    load_host_s: f64,
    load_device_s: f64,
}

/// Checks `--device` (and the `FTB_MLX_*` tuning variables) before anything is loaded, so that a
/// bad value exits with the usage code. Returns the device and how the step runs there.
pub fn check_device(cfg: &Config) -> Result<(MlxDevice, Tuning), ConfigError> {
    let d = device::resolve(cfg.run.device)?;
    for name in ["FTB_HOST_INIT", "FTB_PROFILE"] {
        shared::hooks::flag(name)?;
    }
    let t = Tuning::for_device(d, cfg.workload.strategy.kind)?;
    t.apply_to_mlx(d);
    Ok((d, t))
}

impl MlxBackend {
    pub fn new(cfg: &Config, prepared: &Prepared) -> Result<Self> {
        catch_mlx(|| Self::build(cfg, prepared))
    }

    fn build(cfg: &Config, prepared: &Prepared) -> Result<Self> {
        let (device, tuning) = check_device(cfg)?;
        // Before anything runs on the GPU (the random initialisation compiles kernels too).
        let kernel_cache = (device == MlxDevice::Cuda)
            .then(|| device::KernelCache::find(MLX_VERSION, |k| std::env::var(k).ok()));
        let precision = Precision::resolve(cfg.run.dtype, device.is_gpu());
        Device::set_default(&if device.is_gpu() {
            Device::gpu()
        } else {
            Device::cpu()
        });
        // Peak memory is reported "since the backend was built" (each repeat starts fresh).
        crate::memory::start_of_run()?;
        if device == MlxDevice::Cuda {
            crate::memory::limit_on_cuda(tuning.memory_percent, tuning.cache_percent)?;
        }
        let shape = prepared.shape.clone();
        let strategy = &cfg.workload.strategy;
        let specs = shared::tensors::expected(&shape, strategy);
        let dtype = precision.param_dtype();
        let mut tensors = HashMap::with_capacity(specs.len());
        // LoRA adapters draw from their own stream (`shared::model::adapter_seed`); base weights from the
        // weight source (the workload seed, or the checkpoint).
        let adapter_seed = shared::model::adapter_seed(cfg.workload.seed);
        let (mut load_host_s, mut load_device_s) = (0.0, 0.0);
        let mut t_host = Instant::now();
        #[cfg(not(macos))]
        let on_device = match &prepared.weights {
            shared::model::WeightSource::Random { seed }
                if device == MlxDevice::Cuda && !shared::hooks::flag("FTB_HOST_INIT")? =>
            {
                Some(*seed)
            }
            _ => None,
        };
        #[cfg(macos)]
        let on_device: Option<u64> = None;
        if let Some(seed) = on_device {
            // Random weights on CUDA: generated there (same values; see `init.rs`).
            #[cfg(not(macos))]
            for spec in &specs {
                let s = shared::model::random_init_seed(&spec.name, seed, adapter_seed);
                let a = crate::init::init_on_cuda(spec, s)?.as_dtype(dtype)?;
                // Evaluated one by one so that the fp32 source of a bf16 cast is freed.
                a.eval()?;
                tensors.insert(spec.name.clone(), a);
            }
            load_device_s = t_host.elapsed().as_secs_f64();
            let _ = seed;
        } else {
            prepared
                .weights
                .for_each(&specs, adapter_seed, |spec, data| {
                    let t_device = Instant::now();
                    load_host_s += t_device.duration_since(t_host).as_secs_f64();
                    let dims: Vec<i32> = spec.shape.iter().map(|&d| d as i32).collect();
                    let a = Array::from_slice(&data.values, &dims).as_dtype(dtype)?;
                    // Evaluated one by one so the host copy and an fp32 source of a bf16 cast are freed.
                    a.eval()?;
                    tensors.insert(spec.name.clone(), a);
                    t_host = Instant::now();
                    load_device_s += t_host.duration_since(t_device).as_secs_f64();
                    Ok(())
                })?;
        }
        let kernels = Kernels {
            precision,
            fast_norm: tuning.fast_kernels,
            swiglu: SwiGlu::new(tuning.compile),
            head_chunk: tuning.head_chunk,
        };
        let model = CausalLM::from_tensors(&shape, strategy, kernels, tensors)?;

        // The counts the summary reports, from the arrays as built (shared checks each one).
        let all = model.parameters().flatten();
        let trainable = model.trainable_parameters().flatten();
        let held = all
            .iter()
            .map(|(name, a)| Held::new(name, a.shape(), trainable.contains_key(name)));
        let counts = shared::tensors::check_held(&shape, strategy, held)?;
        drop((all, trainable));
        let device_name = device.kind().hardware_name();
        let freqs = rope_freqs(&shape);
        freqs.eval()?;
        Ok(Self {
            model,
            precision,
            device,
            device_name,
            train: cfg.workload.train.clone(),
            optimizer: HashMap::new(),
            counts,
            tuning,
            freqs,
            update: if tuning.fused_adamw {
                Update::Fused(FusedAdamW::new()?)
            } else if tuning.compile {
                let weight_decay = cfg.workload.train.weight_decay != 0.0;
                Update::Compiled(Compiled::new(move |x: &[Array]| {
                    adamw_update(weight_decay, x)
                }))
            } else {
                Update::Ops
            },
            attention_tokens: 0,
            dense_tokens: 0,
            libmlx: device::loaded_libmlx(),
            kernel_cache,
            profile: shared::hooks::flag("FTB_PROFILE")?.then(Default::default),
            profile_peaks: Default::default(),
            graph_ops: None,
            load_host_s,
            load_device_s,
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
/// round to 1.0); results are rounded to the storage dtype. `how` runs it as MLX operations, as
/// the same compiled into one function, or as the fused CUDA kernel (`fused_adamw.rs`).
fn adamw(
    state: &mut HashMap<Rc<str>, AdamState>,
    key: &Rc<str>,
    p: &Array,
    g: &Array,
    scalars: &AdamScalars,
    how: &Update,
) -> Result<Array> {
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
    if st.steps + 1 != scalars.t {
        bail!("internal: AdamW's bias correction was made for another update count");
    }
    let operands = || {
        let mut x = vec![p.clone(), g.clone(), st.m.clone(), st.v.clone()];
        x.extend(scalars.arrays.iter().cloned());
        x
    };
    let out: Vec<Array> = match how {
        Update::Fused(k) => {
            let packed = scalars
                .packed
                .as_ref()
                .context("internal: the fused AdamW update without its packed scalars")?;
            k.apply(p, g, &st.m, &st.v, packed)?.into()
        }
        Update::Compiled(k) => k.call(&operands())?,
        Update::Ops => adamw_update(scalars.weight_decay, &operands())?,
    };
    let [new_p, m, v]: [Array; 3] = out
        .try_into()
        .map_err(|_| anyhow::anyhow!("internal: the AdamW update returned the wrong arity"))?;
    st.m = m;
    st.v = v;
    st.steps += 1;
    Ok(new_p)
}

/// How a tensor's AdamW update is computed.
enum Update {
    /// MLX operations ([`adamw_update`]).
    Ops,
    /// The same operations, compiled into one kernel (`Tuning::compile`).
    Compiled(Compiled),
    /// One hand-written CUDA kernel, clipping included (`Tuning::fused_adamw`).
    Fused(FusedAdamW),
}

/// AdamW's scalars for one step, as fp32 arrays made once per step and shared by every tensor's
/// update: `[decay, step_size, 1/sqrt(1 - b2^t), b1, 1 - b1, b2, 1 - b2, eps]`. Made once rather
/// than per tensor and per operation: on MLX's CUDA backend every scalar made on the host is a
/// managed-memory allocation that the GPU then reads.
struct AdamScalars {
    /// The update count these are for (every tensor is updated every step, so one `t` serves all).
    t: u64,
    weight_decay: bool,
    arrays: Vec<Array>,
    /// For the fused kernel: the eight in one fp32 array, then the clipping coefficient.
    packed: Option<Array>,
}

impl AdamScalars {
    /// `clip`: the fused kernel's clipping coefficient (a `[]` array on the device), which also
    /// asks for the packed form.
    fn new(tc: &TrainConfig, lr: f64, t: u64, clip: Option<&Array>) -> Result<Self> {
        let ti = t as i32;
        let v = [
            1.0 - lr * tc.weight_decay,
            lr / (1.0 - tc.beta1.powi(ti)),
            1.0 / (1.0 - tc.beta2.powi(ti)).sqrt(),
            tc.beta1,
            1.0 - tc.beta1,
            tc.beta2,
            1.0 - tc.beta2,
            tc.eps,
        ];
        let eight = v.map(|x| x as f32);
        let (arrays, packed) = match clip {
            // The fused kernel reads the packed form only.
            Some(c) => (
                Vec::new(),
                Some(crate::fused_adamw::pack_scalars(&eight, c)?),
            ),
            None => {
                let a: Vec<Array> = eight.iter().map(|&x| Array::from_f32(x)).collect();
                eval(a.iter())?;
                (a, None)
            }
        };
        Ok(Self {
            t,
            weight_decay: tc.weight_decay != 0.0,
            arrays,
            packed,
        })
    }
}

/// `[p, g, m, v, decay, step_size, 1/sqrt(1 - b2^t), b1, 1 - b1, b2, 1 - b2, eps]` ->
/// `[p', m', v']` in fp32 arithmetic, rounded to the parameter's and the state's dtypes (see
/// [`adamw`]).
pub(crate) fn adamw_update(weight_decay: bool, x: &[Array]) -> Result<Vec<Array>, Exception> {
    let f32 = Dtype::Float32;
    let (p, g, m, v) = (&x[0], &x[1], &x[2], &x[3]);
    let (decay, step_size, inv_bc2_sqrt) = (&x[4], &x[5], &x[6]);
    let (b1, one_minus_b1, b2, one_minus_b2, eps) = (&x[7], &x[8], &x[9], &x[10], &x[11]);
    let state_dtype = m.dtype();
    let g = g.as_dtype(f32)?;
    let mut p32 = p.as_dtype(f32)?;
    if weight_decay {
        p32 = p32.multiply(decay)?;
    }
    let m = m
        .as_dtype(f32)?
        .multiply(b1)?
        .add(g.multiply(one_minus_b1)?)?
        .as_dtype(state_dtype)?;
    let v = v
        .as_dtype(f32)?
        .multiply(b2)?
        .add(g.square()?.multiply(one_minus_b2)?)?
        .as_dtype(state_dtype)?;
    let denom = v.as_dtype(f32)?.sqrt()?.multiply(inv_bc2_sqrt)?.add(eps)?;
    let update = m.as_dtype(f32)?.divide(&denom)?.multiply(step_size)?;
    let new_p = p32.subtract(update)?.as_dtype(p.dtype())?;
    Ok(vec![new_p, m, v])
}

impl MlxBackend {
    /// `FTB_PROFILE=1`: charges the host time since `*mark` to `phase`.
    fn charge(&mut self, phase: &'static str, mark: &mut Instant) {
        if let Some(p) = &mut self.profile {
            let now = Instant::now();
            *p.entry(phase).or_default() += now.duration_since(*mark).as_secs_f64();
            let peak = crate::memory::close_peak_window();
            let e = self.profile_peaks.entry(phase).or_default();
            *e = (*e).max(peak);
            *mark = Instant::now();
        }
    }

    /// One optimizer step (see `Backend::train_step`).
    fn step(&mut self, step: &Step, lr: f64) -> Result<StepReport> {
        let mut mark = Instant::now();
        // The step's loss = sum over micro-batches of (token CE sum / the step's loss tokens).
        let denom = Array::from_f32(step.loss_tokens.max(1) as f32);
        let mut grads: Option<HashMap<Rc<str>, Array>> = None;
        let mut loss: Option<Array> = None;
        let n_micro = step.micro_batches.len();
        (self.attention_tokens, self.dense_tokens) = (0, 0);
        let mut ran = 0;
        for (i, mb) in step.micro_batches.iter().enumerate() {
            if mb.loss_tokens == 0 {
                // No label counts: its loss and gradients are exactly zero, so it is not run (as
                // on every backend; the FLOP count leaves it out).
                continue;
            }
            ran += 1;
            let arrays = MicroBatchArrays::new(mb, &self.freqs, &self.tuning)?;
            self.attention_tokens += arrays.attention_tokens;
            self.dense_tokens += arrays.dense_tokens;
            let loss_fn = |model: &mut CausalLM,
                           (a, denom): (&MicroBatchArrays, &Array)|
             -> Result<Array, Exception> {
                model.loss(&a.forward_inputs(), &a.targets, denom)
            };
            // Gradients w.r.t. the trainable (unfrozen) parameters only.
            let mut value_and_grad = nn::value_and_grad(loss_fn);
            let (mb_loss, mb_grads) = value_and_grad(&mut self.model, (&arrays, &denom))?;
            if self.profile.is_some() && self.graph_ops.is_none() {
                let outputs: Vec<&Array> =
                    mb_grads.values().chain(std::iter::once(&mb_loss)).collect();
                self.graph_ops = Some(crate::graph::count_ops(&outputs)?);
            }
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
            self.charge("build_forward_backward", &mut mark);
            if i + 1 < n_micro {
                // Materialise the running sums so that this micro-batch's activations are freed
                // before the next one runs. With `overlap` (GPU) this is not a sync: the host goes
                // on to build the next micro-batch's graph while the device computes this one.
                let (g, l) = (
                    grads.as_ref().context("gradients")?,
                    loss.as_ref().context("loss")?,
                );
                let outputs = g.values().chain(std::iter::once(l));
                if self.tuning.overlap {
                    async_eval(outputs)?;
                } else {
                    // Device sync.
                    eval(outputs)?;
                }
                self.charge("eval_micro_batch", &mut mark);
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
        if self.profile.is_some() {
            // Profiling only: the last micro-batch encoded on its own, not inside the first
            // tensor's update, so that its time and memory are its own phase.
            async_eval(grads.values().chain(std::iter::once(&loss)))?;
            self.charge("eval_last_micro_batch", &mut mark);
        }

        // Global gradient norm (fp32), then clipping: coef = max / (norm + 1e-6), applied if < 1.
        let mut sq = Array::from_f32(0.0);
        for g in grads.values() {
            sq = sq.add(g.as_dtype(Dtype::Float32)?.square()?.sum(None)?)?;
        }
        let grad_norm = sq.sqrt()?;
        let coef = if self.train.max_grad_norm > 0.0 {
            let coef = Array::from_f32(self.train.max_grad_norm as f32)
                .divide(grad_norm.add(Array::from_f32(1e-6))?)?;
            Some(ops::minimum(&coef, Array::from_f32(1.0))?)
        } else {
            None
        };
        // The fused kernel multiplies by the coefficient itself (1 without clipping).
        let fused = matches!(self.update, Update::Fused(_));
        let fused_clip = fused.then(|| coef.clone().unwrap_or_else(|| Array::from_f32(1.0)));
        if let (false, Some(coef)) = (fused, &coef) {
            for g in grads.values_mut() {
                // In fp32, rounded back to the gradient's dtype.
                *g = g
                    .as_dtype(Dtype::Float32)?
                    .multiply(coef)?
                    .as_dtype(g.dtype())?;
            }
        }

        // AdamW over the trainable tensors, then write the new values into the model.
        let t = self.optimizer.values().next().map_or(1, |s| s.steps + 1);
        let scalars = AdamScalars::new(&self.train, lr, t, fused_clip.as_ref())?;
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
                let new_p = adamw(
                    &mut self.optimizer,
                    k,
                    &p,
                    &grads[k],
                    &scalars,
                    &self.update,
                )?;
                // One tensor at a time: the update's fp32 temporaries (parameter, gradient, both
                // moments) then exist for one tensor, not for every trainable tensor at once. Not
                // a sync: the host goes on to the next tensor.
                let st = &self.optimizer[k];
                async_eval([&new_p, &st.m, &st.v])?;
                updated.push((k.clone(), new_p));
            }
        }
        self.charge("optimizer", &mut mark);
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
        self.charge("final_eval", &mut mark);
        Ok(StepReport {
            loss: f64::from(loss.item_exact::<f32>()),
            grad_norm: Some(f64::from(grad_norm.item_exact::<f32>())),
            micro_batches_run: Some(ran),
        })
    }
}

/// MLX reports errors through mlx-c as `Exception`s, which the step returns; a panic (an mlx-rs
/// call that unwraps, an operator overload) is turned into an error too, so that a failure of
/// MLX's backend ends the run `failed` with its message rather than aborting without a summary.
fn catch_mlx<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        // A checkpointed layer's failure in the backward pass reaches here as MLX's "closure
        // returned a non-zero value": add the layer's own message.
        Ok(Err(e)) => match crate::checkpoint::take_last_error() {
            Some(why) => Err(e.context(format!("in a checkpointed layer: {why}"))),
            None => Err(e),
        },
        Ok(r) => r,
        Err(p) => {
            let msg =
                shared::error::panic_message(&*p).unwrap_or_else(|| "MLX raised an error".into());
            bail!("{msg}")
        }
    }
}

/// The hint for MLX's CUDA backend running out of device memory (`None` for other errors). Both
/// messages seen on an 80 GB H100 come from memory MLX's allocator does not count against its
/// limit: `cudaGraphInstantiate ... out of memory` (2026-12-05, the CUDA graphs) and
/// `cudaMallocAsync ... out of memory` with the process at 79 GiB and MLX's allocated peak at 38-41
/// (2026-12-06, at an 80 % limit with the cache as large: MLX's cache kept buffers of earlier
/// sizes while CUDA's pool needed new memory beside them; `Tuning::cache_percent`, now 10 %).
fn cuda_oom_hint(message: &str, percent: usize, cache_percent: usize) -> Option<String> {
    let graph = message.contains("cudaGraphInstantiate");
    if !(graph || (message.contains("cudaMalloc") && message.contains("out of memory"))) {
        return None;
    }
    let limit = if percent == 0 {
        "95 % of the card, MLX's own limit".to_string()
    } else {
        format!(
            "{percent} % of the card, FTB_MLX_MEMORY_PERCENT, {cache_percent} % of it in its buffer cache, FTB_MLX_CACHE_PERCENT"
        )
    };
    Some(format!(
        "MLX's CUDA backend ran out of device memory {} while its allocator may hold {limit}; \
         the CUDA graphs and CUDA's memory pool are outside that count. Set \
         FTB_MLX_CACHE_PERCENT or FTB_MLX_MEMORY_PERCENT lower, \
         --max-tokens-per-micro-batch smaller, or --grad-checkpoint where it is off (what MLX 0.32.2 on \
         CUDA holds outside its count: benchmarks/RESULTS.md, \"MLX's buffer cache\")",
        if graph {
            "for a CUDA graph"
        } else {
            "for a buffer"
        },
    ))
}

impl Backend for MlxBackend {
    fn train_step(&mut self, step: &Step, lr: f64) -> Result<StepReport> {
        let (percent, cache) = (self.tuning.memory_percent, self.tuning.cache_percent);
        catch_mlx(|| self.step(step, lr)).map_err(|e| {
            match cuda_oom_hint(&format!("{e:#}"), percent, cache) {
                Some(hint) => e.context(hint),
                None => e,
            }
        })
    }

    /// MLX's held memory (active + cache) between steps, outside the timed region.
    fn after_step(&mut self) {
        crate::memory::sample_held();
    }

    fn memory(&mut self) -> MemoryReading {
        crate::memory::reading(self.device.is_gpu())
    }

    fn notes(&self) -> Vec<String> {
        self.kernel_cache
            .as_ref()
            .and_then(device::KernelCache::cold_note)
            .into_iter()
            .collect()
    }

    fn info(&self) -> BackendInfo {
        let mut details = serde_json::Map::new();
        details.insert("mlx_version".into(), MLX_VERSION.into());
        details.insert("mlx_backend".into(), self.device.backend_name().into());
        if let Some(lib) = &self.libmlx {
            details.insert("libmlx".into(), lib.clone().into());
        }
        details.insert("tuning".into(), self.tuning.to_json());
        if let Some(cache) = &self.kernel_cache {
            details.insert("mlx_cuda_kernel_cache".into(), cache.to_json());
        }
        if self.model.grad_checkpoint {
            details.insert(
                "activation_checkpointing".into(),
                "per layer that trains: MLX's checkpoint transform with the layer's trainable parameters as inputs; the backward pass computes the layer again".into(),
            );
        }
        if let Some(p) = &self.profile {
            details.insert(
                "profile_by_phase_total_s".into(),
                serde_json::to_value(p).unwrap_or_default(),
            );
            let gib: std::collections::BTreeMap<_, f64> = self
                .profile_peaks
                .iter()
                .map(|(k, v)| (*k, *v as f64 / (1u64 << 30) as f64))
                .collect();
            details.insert(
                "profile_peak_by_phase_gib".into(),
                serde_json::to_value(gib).unwrap_or_default(),
            );
            if let Some(ops) = &self.graph_ops {
                let total: usize = ops.values().sum();
                let views: usize = ops
                    .iter()
                    .filter(|(k, _)| crate::graph::is_view(k))
                    .map(|(_, v)| v)
                    .sum();
                details.insert(
                    "profile_graph_ops_first_micro_batch".into(),
                    serde_json::json!({
                        "total": total,
                        "not_views": total - views,
                        "by_operation": ops,
                    }),
                );
            }
        }
        details.insert(
            "positions_computed_last_step".into(),
            serde_json::json!({
                "attention": self.attention_tokens,
                "projections_and_mlp": self.dense_tokens,
            }),
        );
        details.insert(
            "load_breakdown_s".into(),
            serde_json::json!({
                "initial_values_on_host": self.load_host_s,
                "to_device": self.load_device_s,
            }),
        );
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
        // Which BLAS/LAPACK MLX's CPU backend uses (setup-mlx-linux.sh points it at OpenBLAS).
        let blas = device::mapped_files(|p| p.contains("blas") || p.contains("lapack"));
        if !blas.is_empty() {
            details.insert("blas".into(), blas.join(", ").into());
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
            device: self.device.kind().summary_label(),
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
        let library = match self.device {
            MlxDevice::Cuda => format!("MLX {MLX_VERSION} (CUDA backend)"),
            MlxDevice::Metal => format!("MLX {MLX_VERSION} (Metal backend)"),
            MlxDevice::Cpu => format!("MLX {MLX_VERSION}"),
        };
        probe::software(MLX_RS_CRATE, &library)
    }

    /// One n×n×n matrix product in the run's compute precision (fp32 for float32 runs, bf16 for
    /// bf16 and mixed-bf16 ones): n = 8192 on the GPU, 1024 on the CPU; the mean of 10 timed
    /// products after 3 warm-ups.
    fn calibrate_tflops(&mut self) -> Result<Calibration> {
        let n = shared::runner::calibration_size(self.device.is_gpu()) as i32;
        let dtype = match self.precision {
            Precision::Float32 => Dtype::Float32,
            Precision::Bf16 | Precision::MixedBf16 => Dtype::Bfloat16,
        };
        let a = mlx_rs::random::normal::<f32>(&[n, n], None, None, None)?.as_dtype(dtype)?;
        let b = mlx_rs::random::normal::<f32>(&[n, n], None, None, None)?.as_dtype(dtype)?;
        eval([&a, &b])?;
        // Device sync per product (`eval`), so nothing is left to wait for after the loop.
        let tflops =
            shared::runner::time_products(n as usize, || Ok(a.matmul(&b)?.eval()?), || Ok(()))?;
        drop((a, b));
        // The calibration's arrays are not the training's: the peaks restart from here.
        crate::memory::start_of_run()?;
        Ok(Calibration {
            tflops,
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

#[cfg(test)]
mod tests {
    use super::cuda_oom_hint;

    /// The two messages MLX 0.32.2 ended H100 runs with (verbatim from their summaries) get the
    /// hint naming the limit in force; other errors, and an out-of-memory that is not CUDA's,
    /// are left as they are.
    #[test]
    fn cuda_out_of_memory_errors_get_the_hint() {
        let graph = "cudaGraphInstantiate(&handle_, graph, nullptr, nullptr, 0) failed: out of memory at mlx/c/transforms.cpp:15";
        let pool =
            "cudaMallocAsync(&data, size, stream) failed: out of memory at mlx/c/transforms.cpp:15";
        let h = cuda_oom_hint(graph, 80, 20).expect("graph hint");
        assert!(
            h.contains("for a CUDA graph")
                && h.contains("80 % of the card")
                && h.contains("20 % of it in its buffer cache"),
            "{h}"
        );
        let h = cuda_oom_hint(pool, 0, 0).expect("pool hint");
        assert!(
            h.contains("for a buffer") && h.contains("MLX's own limit"),
            "{h}"
        );
        assert!(
            h.contains("FTB_MLX_MEMORY_PERCENT")
                && h.contains("FTB_MLX_CACHE_PERCENT")
                && h.contains("--max-tokens-per-micro-batch")
                && h.contains("--grad-checkpoint")
        );
        assert_eq!(
            cuda_oom_hint("[broadcast_shapes] shapes cannot be broadcast", 80, 80),
            None
        );
        assert_eq!(cuda_oom_hint("std::bad_alloc: out of memory", 80, 80), None);
    }
}
