//! The PyTorch backend: builds the decoder from the shared weights, and runs one optimizer step the way
//! Hugging Face's Trainer does (accumulate micro-batch gradients, clip the global norm, AdamW at the
//! scheduled learning rate), written by hand over libtorch.

use std::collections::HashMap;

use anyhow::{anyhow, Context, Result};
use shared::config::{Config, DeviceChoice, Framework, StrategyKind};
use shared::data::batch::{MicroBatch, Step};
use shared::device::Available;
use shared::error::ConfigError;
use shared::measure::memory::DeviceKind;
use shared::measure::probe::{self, Software};
use shared::model::{ParamCounts, WeightSource};
use shared::runner::{Backend, Calibration, MemoryReading, StepReport};
use shared::summary::BackendInfo;
use shared::tensors::Held;
use shared::workload::Prepared;
use tch::{COptimizer, Device, Kind, Tensor};

use crate::ext::FusedAdamW;

use crate::decoder::{DType, Decoder, Inputs, Kinds};

/// The AdamW implementation in use.
enum Optimizer {
    Fused(FusedAdamW),
    Libtorch(COptimizer),
}

impl Optimizer {
    fn zero_grad(&mut self) -> Result<()> {
        match self {
            Optimizer::Fused(o) => o.zero_grad(),
            Optimizer::Libtorch(o) => o.zero_grad()?,
        }
        Ok(())
    }

    fn step(&mut self, lr: f64) -> Result<()> {
        match self {
            Optimizer::Fused(o) => o.step(lr),
            Optimizer::Libtorch(o) => {
                o.set_learning_rate(lr)?;
                Ok(o.step()?)
            }
        }
    }

    fn describe(&self) -> &'static str {
        match self {
            Optimizer::Fused(_) => "ATen _fused_adamw_ (torch.optim.AdamW(fused=True)); clipping with _foreach_norm/_foreach_mul_",
            Optimizer::Libtorch(_) => "libtorch torch::optim::AdamW; clipping with _foreach_norm/_foreach_mul_",
        }
    }
}

pub struct TorchBackend {
    model: Decoder,
    /// Trainable tensors, in checkpoint order.
    trainable: Vec<Tensor>,
    opt: Optimizer,
    max_grad_norm: f64,
    /// `--grad-checkpoint`: blocks recomputed in the backward pass (`Decoder::forward`).
    grad_checkpoint: bool,
    counts: ParamCounts,
    device_name: String,
    attention: AttentionMode,
    /// Why the allocator's peaks could not be reset when the backend was built (they then cover
    /// the process so far, not this backend alone).
    allocator_reset_error: Option<String>,
    /// Data parallel: the communicator with the other ranks.
    #[cfg(target_os = "linux")]
    comm: Option<crate::nccl::Comm>,
    /// `FTB_PROFILE=1`: synchronise between phases and add up their wall time (forward, backward,
    /// clipping, optimizer). Costs the overlap between phases, so only for finding where time goes.
    profile: Option<[f64; 4]>,
    /// `FTB_LATE_INPUTS=1`: copy each micro-batch's inputs to the device just before its forward
    /// pass, as the binary did before (an A/B knob). A copy from pageable host memory makes
    /// libtorch wait for the stream, so on CUDA that drains the queue between micro-batches; by
    /// default the step's inputs are all copied when it starts, where the queue is empty anyway.
    late_inputs: bool,
}

/// `--device` for libtorch, by shared's rule (`shared::device::resolve`). Asks libtorch about
/// CUDA and MPS only when the choice needs it.
pub fn pick_device(choice: DeviceChoice) -> Result<DeviceKind, ConfigError> {
    shared::device::resolve(
        Framework::Pytorch,
        choice,
        &Available {
            cuda: &tch::Cuda::is_available,
            apple_gpu: &tch::utils::has_mps,
            library: None,
        },
    )
}

/// libtorch's device for a resolved kind (`MlxGpu` is the MLX binary's: never resolved here).
pub fn torch_device(kind: DeviceKind) -> Device {
    match kind {
        DeviceKind::Cpu => Device::Cpu,
        DeviceKind::Cuda(i) => Device::Cuda(i),
        DeviceKind::Mps | DeviceKind::MlxGpu => Device::Mps,
    }
}

/// The kind of a libtorch device (the inverse of [`torch_device`]; Vulkan is never picked).
fn kind_of(d: Device) -> DeviceKind {
    match d {
        Device::Cuda(i) => DeviceKind::Cuda(i),
        Device::Mps => DeviceKind::Mps,
        Device::Cpu | Device::Vulkan => DeviceKind::Cpu,
    }
}

/// Which attention path the model runs (`FTB_ATTENTION`; an implementation choice of this
/// backend, not part of the workload: every path computes the same loss).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionMode {
    /// Real tokens only, documents end to end, FlashAttention-2 varlen (CUDA, bf16): no compute
    /// on padding in any plan. The default where it applies.
    Varlen,
    /// `scaled_dot_product_attention` on the plan's padded rows (causal, or a document mask for
    /// packed rows), cuDNN's kernel excluded: flash for causal rows, memory-efficient for masks.
    Sdpa,
    /// The same with libtorch's default kernel choice (cuDNN first on Hopper).
    SdpaDefault,
}

/// Loss positions per chunk of the step's LM head: `FTB_HEAD_CHUNK_TOKENS` (a positive
/// integer) for A/B measurements on a device, `shared::measure::memory::HEAD_CHUNK_TOKENS` unset.
/// The memory estimate keeps counting the default, so a run with another value reports its own
/// peak against that estimate.
fn head_chunk_tokens() -> Result<usize, ConfigError> {
    const NAME: &str = "FTB_HEAD_CHUNK_TOKENS";
    match std::env::var(NAME) {
        Err(_) => Ok(shared::measure::memory::HEAD_CHUNK_TOKENS),
        Ok(v) => match v.trim().parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(ConfigError::value(
                NAME,
                format!("{v:?}"),
                "not a positive number of loss positions",
                &format!(
                    "unset it (default {}), or give e.g. 4096; a value above a micro-batch's loss \
                     positions runs the head in one chunk",
                    shared::measure::memory::HEAD_CHUNK_TOKENS
                ),
            )),
        },
    }
}

impl AttentionMode {
    /// `FTB_ATTENTION=auto|varlen|sdpa|sdpa-default` (unset = auto). `auto` is varlen where it
    /// applies, except with `--pad-to`: padding to a fixed length is then part of the
    /// configuration being reproduced (the seed preset), so it is computed, not dropped.
    pub fn pick(device: Device, dtype: DType, pad_to: Option<usize>) -> Result<Self> {
        let flash_ok = matches!(device, Device::Cuda(_)) && dtype.compute_kind() != Kind::Float;
        let v = std::env::var("FTB_ATTENTION").unwrap_or_default();
        Ok(match v.as_str() {
            "" | "auto" if flash_ok && pad_to.is_none() => AttentionMode::Varlen,
            "" | "auto" | "sdpa" => AttentionMode::Sdpa,
            "sdpa-default" => AttentionMode::SdpaDefault,
            "varlen" if flash_ok => AttentionMode::Varlen,
            "varlen" => {
                return Err(ConfigError::Value {
                    key: "FTB_ATTENTION".into(),
                    value: v,
                    reason: "flash attention needs a CUDA device and bf16 matrix products".into(),
                    fix: "unset FTB_ATTENTION, or use --device cuda with --dtype bf16/mixed-bf16"
                        .into(),
                }
                .into())
            }
            _ => {
                return Err(ConfigError::Value {
                    key: "FTB_ATTENTION".into(),
                    value: v,
                    reason: "unknown attention path".into(),
                    fix: "use auto, varlen, sdpa or sdpa-default".into(),
                }
                .into())
            }
        })
    }

    fn describe(self) -> &'static str {
        match self {
            AttentionMode::Varlen => "FlashAttention-2 varlen through ATen's _flash_attention_forward: real tokens only, documents end to end",
            AttentionMode::Sdpa => "torch scaled_dot_product_attention without cuDNN (flash for causal rows, memory-efficient with a document mask for packed rows)",
            AttentionMode::SdpaDefault => "torch scaled_dot_product_attention, libtorch's default kernel choice (causal; document mask for packed rows)",
        }
    }
}

/// The hooks this binary reads besides the shared runner's (`FTB_ATTENTION` is checked where the
/// attention path is picked): a value that does not parse is a usage error, found in the preflight.
pub fn check_hooks() -> Result<(), ConfigError> {
    for name in [
        "FTB_HOST_INIT",
        "FTB_PROFILE",
        "FTB_DEBUG_PANICS",
        "FTB_LATE_INPUTS",
    ] {
        shared::hooks::flag(name)?;
    }
    head_chunk_tokens()?;
    Ok(())
}

impl TorchBackend {
    /// Builds the model and the optimizer. libtorch reports a failure here (out of memory while
    /// the weights load, among others) as a panic; it becomes an error, so the run writes a
    /// `failed` summary instead of dying silently.
    pub fn new(cfg: &Config, p: &Prepared) -> Result<Self> {
        catch_torch(|| Self::build(cfg, p))
    }

    fn build(cfg: &Config, p: &Prepared) -> Result<Self> {
        let kind = pick_device(cfg.run.device)?;
        let device = torch_device(kind);
        #[cfg(target_os = "linux")]
        let comm = match &p.rank {
            Some(r) => {
                if !matches!(device, Device::Cuda(_)) {
                    return Err(ConfigError::Value {
                        key: "device".into(),
                        value: kind.summary_label(),
                        reason: "data parallelism runs NCCL between CUDA devices".into(),
                        fix: "use --device cuda (one GPU per rank), or --nproc 1".into(),
                    }
                    .into());
                }
                Some(crate::nccl::Comm::init(
                    r,
                    std::time::Duration::from_secs_f64(cfg.run.dist_timeout_s),
                )?)
            }
            None => None,
        };
        #[cfg(not(target_os = "linux"))]
        if p.rank.is_some() {
            return Err(ConfigError::Value {
                key: "nproc".into(),
                value: cfg.run.nproc.to_string(),
                reason: "data parallelism needs NCCL, which this binary uses on Linux only".into(),
                fix: "use --nproc 1".into(),
            }
            .into());
        }
        // Each backend (each repeat) starts from the same allocator state: CUDA initialised, the
        // caching allocator's cached blocks returned to the device (a previous repeat's pool would
        // otherwise count in this one's reserved and process figures) and its peaks reset.
        let allocator_reset_error = match device {
            Device::Cuda(_) => {
                let _ = Tensor::zeros([1], (Kind::Float, device));
                crate::ext::reset_allocator(device, true)
                    .err()
                    .map(|e| format!("{e:#}"))
            }
            _ => None,
        };
        let dtype = DType::resolve(cfg.run.dtype, kind.is_gpu());
        let attention = AttentionMode::pick(device, dtype, cfg.workload.data.pad_to)?;
        if attention == AttentionMode::Sdpa {
            crate::ext::set_sdp_backends(crate::ext::SdpBackends {
                flash: true,
                mem_efficient: true,
                math: true,
                cudnn: false,
            })?;
        }
        let strategy = &cfg.workload.strategy;
        let shape = p.shape.clone();
        let specs = shared::tensors::expected(&shape, strategy);
        let mut tensors = HashMap::new();
        let mut trainable = Vec::new();
        // Adapters draw from their own stream so that the base weights are the same with and
        // without LoRA.
        let adapter_seed = shared::model::adapter_seed(cfg.workload.seed);
        let mut add = |spec: &shared::model::ParamSpec, t: Tensor| {
            let t = t.to_kind(dtype.param_kind());
            let t = if shape.is_trainable(&spec.name, strategy) {
                let t = t.set_requires_grad(true);
                trainable.push(t.shallow_clone());
                t
            } else {
                t
            };
            tensors.insert(spec.name.clone(), t);
        };
        let host_init = shared::hooks::flag("FTB_HOST_INIT")?;
        match &p.weights {
            // Random weights on CUDA: generated there (same values; see `init.rs`).
            WeightSource::Random { seed } if matches!(device, Device::Cuda(_)) && !host_init => {
                for spec in &specs {
                    let s = shared::model::random_init_seed(&spec.name, *seed, adapter_seed);
                    add(spec, crate::init::init_on_device(spec, s, device));
                }
            }
            w => w.for_each(&specs, adapter_seed, |spec, data| {
                let dims: Vec<i64> = data.shape.iter().map(|&d| d as i64).collect();
                add(
                    spec,
                    Tensor::from_slice(&data.values)
                        .view(dims.as_slice())
                        .to_device(device),
                );
                Ok(())
            })?,
        }
        // The counts the summary reports, from the tensors as built (shared checks each one).
        let held = tensors
            .iter()
            .map(|(name, t)| Held::new(name, &t.size(), t.requires_grad()));
        let counts = shared::tensors::check_held(&shape, strategy, held)?;
        let first_grad_layer = match strategy.kind {
            StrategyKind::LastN => shape.num_layers - strategy.last_n.min(shape.num_layers),
            _ => 0,
        };
        let lora_scale = strategy.lora_alpha / strategy.lora_rank.max(1) as f64;
        let lookup_grad = shape.embedding_lookup_trains(strategy);
        let mut model =
            Decoder::from_tensors(shape, dtype, device, tensors, lora_scale, first_grad_layer)?;
        model.lookup_grad = lookup_grad;
        model.head_chunk_tokens = head_chunk_tokens()?;
        let t = &cfg.workload.train;
        // AdamW: ATen's fused multi-tensor kernel (torch.optim.AdamW(fused=True)) where it
        // exists; libtorch's per-parameter torch::optim::AdamW on MPS. Same update (tested).
        let opt = if device == Device::Mps {
            let mut o = COptimizer::adamw(t.lr, t.beta1, t.beta2, t.weight_decay, t.eps, false)
                .context("creating AdamW")?;
            for x in &trainable {
                o.add_parameters(x, 0)
                    .context("registering a parameter with AdamW")?;
            }
            Optimizer::Libtorch(o)
        } else {
            Optimizer::Fused(FusedAdamW::new(
                &trainable,
                t.beta1,
                t.beta2,
                t.weight_decay,
                t.eps,
            ))
        };
        Ok(Self {
            model,
            trainable,
            opt,
            max_grad_norm: t.max_grad_norm,
            grad_checkpoint: cfg.workload.strategy.grad_checkpoint,
            counts,
            device_name: kind.hardware_name(),
            attention,
            allocator_reset_error,
            #[cfg(target_os = "linux")]
            comm,
            profile: shared::hooks::flag("FTB_PROFILE")?.then_some([0.0; 4]),
            late_inputs: shared::hooks::flag("FTB_LATE_INPUTS")?,
        })
    }

    fn sync(&self) {
        match self.model.device {
            Device::Cuda(i) => tch::Cuda::synchronize(i as i64),
            // No public MPS synchronise in tch: reading a value back waits for the queue.
            Device::Mps => {
                if let Some(t) = self.trainable.last() {
                    let _ = t.sum(Kind::Float).double_value(&[]);
                }
            }
            _ => {}
        }
    }
}

impl Backend for TorchBackend {
    fn train_step(&mut self, step: &Step, lr: f64) -> Result<StepReport> {
        let profiling = self.profile.is_some();
        let mut marks = [0.0f64; 4];
        let mut t = std::time::Instant::now();
        // FTB_PROFILE=1 only: synchronise and charge the time since the last mark to a phase.
        macro_rules! lap {
            ($k:expr) => {
                if profiling {
                    self.sync();
                    marks[$k] += t.elapsed().as_secs_f64();
                    t = std::time::Instant::now();
                }
            };
        }
        let result = catch_torch(|| {
            self.opt.zero_grad()?;
            let denom = step.loss_tokens.max(1) as f64;
            let mut total = Tensor::zeros([], (Kind::Float, self.model.device));
            // No loss token: its loss and gradients are exactly zero, so it is not run (as on
            // every backend; the FLOP count leaves it out).
            let run: Vec<_> = step
                .micro_batches
                .iter()
                .filter(|mb| mb.loss_tokens > 0)
                .collect();
            let (device, attention) = (self.model.device, self.attention);
            let upload = |mb: &MicroBatch| match attention {
                AttentionMode::Varlen => Inputs::varlen(mb, device),
                _ => Inputs::new(mb, device),
            };
            // Every copy to the device waits for the stream (pageable host memory): made here,
            // before the first forward pass, none of them waits for a micro-batch's backward.
            let early: Vec<Option<Inputs>> = run
                .iter()
                .map(|mb| (!self.late_inputs).then(|| upload(mb)))
                .collect();
            let ran = run.len();
            for (mb, pre) in run.iter().zip(early) {
                let inp = pre.unwrap_or_else(|| upload(mb));
                // Sum over the micro-batch / the step's loss tokens: the micro-batches' losses add
                // up to the step's mean, whatever the batch plan.
                let f = self.model.forward(&inp, denom, self.grad_checkpoint);
                let loss = f.loss.detach();
                lap!(0);
                self.model.backward(f, &inp);
                lap!(1);
                total += loss;
            }
            if self.trainable.iter().any(|p| !p.grad().defined()) {
                // Nothing has defined the gradients yet (a first step, or a rank's share of it,
                // without loss tokens): zero gradients, so that clipping, the all-reduce and AdamW
                // see every parameter, as after a step whose gradients are all zero.
                for p in &self.trainable {
                    if !p.grad().defined() {
                        (p.sum(Kind::Float) * 0.0).backward();
                    }
                }
            }
            // Data parallel: each rank's gradients are its share of the step's sum (divided by
            // the global loss-token count), so their sum over ranks is the one-process gradient.
            #[cfg(target_os = "linux")]
            if let Some(c) = &self.comm {
                c.rank.beacon(&format!("step {} collective", step.index));
                let mut ts: Vec<Tensor> = self.trainable.iter().map(|p| p.grad()).collect();
                ts.push(total.shallow_clone());
                c.sum(&ts)?;
            }
            let grad_norm = if self.max_grad_norm > 0.0 {
                Some(crate::ext::clip_grad_norm(
                    &self.trainable,
                    self.max_grad_norm,
                )?)
            } else {
                None
            };
            lap!(2);
            self.opt.step(lr)?;
            lap!(3);
            Ok::<_, anyhow::Error>((total, grad_norm, ran))
        })?;
        if let Some(p) = &mut self.profile {
            for (a, b) in p.iter_mut().zip(marks) {
                *a += b;
            }
        }
        // Host-device sync: everything the step produced (loss, parameters, optimizer state) is
        // finished before the caller reads the clock.
        self.sync();
        #[cfg(target_os = "linux")]
        if let Some(c) = &self.comm {
            c.disarm()?;
        }
        let (total, grad_norm, ran) = result;
        let loss = total.double_value(&[]);
        let grad_norm = grad_norm.map(|g| g.double_value(&[]));
        Ok(StepReport {
            loss,
            grad_norm,
            micro_batches_run: Some(ran),
        })
    }

    fn synchronize(&mut self) {
        self.sync();
    }

    fn gather_f64(&mut self, v: f64) -> Option<Vec<f64>> {
        #[cfg(target_os = "linux")]
        if let Some(c) = &self.comm {
            return c.gather_f64(v, self.model.device).ok();
        }
        let _ = v;
        None
    }

    fn reduce_step_time(&mut self, dt: f64) -> f64 {
        #[cfg(target_os = "linux")]
        if let Some(c) = &self.comm {
            return c.max_f64(dt, self.model.device).unwrap_or(dt);
        }
        dt
    }

    fn agree_stop(&mut self, stop: bool) -> bool {
        #[cfg(target_os = "linux")]
        if let Some(c) = &self.comm {
            // A failed collective (a rank gone) also stops this rank.
            return c
                .max_f64(if stop { 1.0 } else { 0.0 }, self.model.device)
                .map_or(true, |v| v > 0.0);
        }
        stop
    }

    fn memory(&mut self) -> MemoryReading {
        const GIB: f64 = (1u64 << 30) as f64;
        let device = self.model.device;
        match device {
            Device::Cuda(_) | Device::Mps => match crate::ext::allocator_stats(device) {
                Ok(st) => {
                    let since = match &self.allocator_reset_error {
                        None => "since the backend was built".to_string(),
                        Some(e) => format!("since the process started (the reset failed: {e})"),
                    };
                    let name = if device == Device::Mps {
                        "MPS allocator"
                    } else {
                        "CUDA caching allocator"
                    };
                    MemoryReading {
                        allocated_gib: Some(st.peak_allocated as f64 / GIB),
                        allocated_source: format!("libtorch's {name}: max allocated bytes in live tensors (c10 device statistics, all pools) {since}"),
                        reserved_gib: Some(st.peak_reserved as f64 / GIB),
                        reserved_source: format!("libtorch's {name}: max reserved bytes (segments held from the device, cached free blocks included) {since}"),
                        ..Default::default()
                    }
                }
                Err(e) => MemoryReading {
                    allocated_source: format!("{e:#}"),
                    reserved_source: format!("{e:#}"),
                    ..Default::default()
                },
            },
            _ => MemoryReading {
                allocated_source: "libtorch keeps no allocation statistics for the CPU (host memory: process_peak_rss_gib)".into(),
                reserved_source: "libtorch's CPU allocator keeps no cache to report".into(),
                ..Default::default()
            },
        }
    }

    fn info(&self) -> BackendInfo {
        let mut details = serde_json::Map::new();
        details.insert("attention".into(), self.attention.describe().into());
        details.insert("optimizer".into(), self.opt.describe().into());
        details.insert("torch_threads".into(), tch::get_num_threads().into());
        details.insert(
            "frozen_prefix_without_autograd".into(),
            (self.model.first_grad_layer > 0).into(),
        );
        if self.grad_checkpoint {
            details.insert(
                "activation_checkpointing".into(),
                "per block: the forward pass without autograd keeps each input; the backward pass computes each block again with autograd from the last, fed the gradient from above".into(),
            );
        }
        #[cfg(target_os = "linux")]
        if let Some(c) = &self.comm {
            let mut d = serde_json::Map::new();
            d.insert(
                "engine".into(),
                format!("NCCL {} through cudarc", c.version()).into(),
            );
            d.insert("world_size".into(), c.rank.world_size.into());
            d.insert(
                "gradient_all_reduce".into(),
                "one NCCL group over all gradients after the step's last backward pass (libtorch's autograd hooks are not reachable from tch, so no overlap with backward)".into(),
            );
            details.insert("distributed".into(), d.into());
        }
        if let Ok(conf) = std::env::var("PYTORCH_CUDA_ALLOC_CONF") {
            details.insert("pytorch_cuda_alloc_conf".into(), conf.into());
        }
        if let Some(p) = self.profile {
            let names = ["forward_s", "backward_s", "clip_s", "optimizer_s"];
            let m: serde_json::Map<String, serde_json::Value> = names
                .iter()
                .zip(p)
                .map(|(n, v)| (n.to_string(), v.into()))
                .collect();
            details.insert("profile_by_phase_total_s".into(), m.into());
        }
        BackendInfo {
            framework: "pytorch".into(),
            device: kind_of(self.model.device).summary_label(),
            device_name: self.device_name.clone(),
            dtype: self.model.dtype.name().into(),
            world_size: {
                #[cfg(target_os = "linux")]
                {
                    self.comm.as_ref().map_or(1, |c| c.rank.world_size)
                }
                #[cfg(not(target_os = "linux"))]
                {
                    1
                }
            },
            details,
        }
    }

    fn parameter_counts(&self) -> ParamCounts {
        self.counts
    }

    fn software(&self) -> Software {
        let mut s = probe::software(
            "tch 0.24.0",
            &format!("libtorch {}", env!("FTB_LIBTORCH_VERSION")),
        );
        if let Device::Cuda(_) = self.model.device {
            s.cuda_runtime = Some(fmt_version(tch::utils::version_cudart()));
            s.cudnn = Some(fmt_version(tch::utils::version_cudnn()));
        }
        s
    }

    /// One n x n x n matrix product in the run's compute precision (fp32 for float32 runs, bf16
    /// for bf16 and mixed-bf16 ones, whose products are bf16): n = 1024 on the CPU, 8192 on a GPU;
    /// the mean of 10 timed products after 3 warm-ups.
    fn calibrate_tflops(&mut self) -> Result<Calibration> {
        let kind = self.model.dtype.compute_kind();
        let d = self.model.device;
        let n = shared::runner::calibration_size(d != Device::Cpu);
        let tflops = catch_torch(|| {
            let a = Tensor::randn([n as i64, n as i64], (kind, d));
            let b = Tensor::randn([n as i64, n as i64], (kind, d));
            shared::runner::time_products(
                n,
                || {
                    let _ = a.matmul(&b);
                    Ok(())
                },
                || {
                    self.sync();
                    Ok(())
                },
            )
        })?;
        if matches!(d, Device::Cuda(_)) && self.allocator_reset_error.is_none() {
            // The calibration's matrices are not the training's: the peaks restart from the
            // memory held now (the model and optimizer).
            crate::ext::reset_allocator(d, true)?;
        }
        Ok(Calibration {
            tflops,
            precision: if kind == Kind::Float { "fp32" } else { "bf16" }.into(),
            size: n,
        })
    }
}

fn fmt_version(v: i64) -> String {
    // cudart: 13000 => 13.0; cuDNN 9: 91900 => 9.19.0
    if v >= 90000 {
        format!("{}.{}.{}", v / 10000, (v / 100) % 100, v % 100)
    } else {
        format!("{}.{}", v / 1000, (v % 1000) / 10)
    }
}

/// libtorch reports errors (out of memory among them) as C++ exceptions that tch turns into
/// panics in its non-`f_` functions; this turns them back into errors so the run can write a
/// `failed` summary.
fn catch_torch<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    /// Leaves the "inside libtorch" mark however `f` ends.
    struct Mark;
    impl Drop for Mark {
        fn drop(&mut self) {
            CATCHING_TORCH.with(|c| c.set(c.get() - 1));
        }
    }
    CATCHING_TORCH.with(|c| c.set(c.get() + 1));
    let mark = Mark;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    drop(mark);
    match result {
        Ok(r) => r,
        Err(p) => {
            let msg = shared::error::panic_message(&*p)
                .unwrap_or_else(|| "libtorch raised an error".into());
            Err(anyhow!("{}", torch_message(&msg)))
        }
    }
}

thread_local! {
    /// Depth of [`catch_torch`] calls on this thread: a panic inside one is an error that the run
    /// reports, so the panic hook stays quiet about it.
    static CATCHING_TORCH: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Whether this thread is inside [`catch_torch`] (where a panic is libtorch reporting an error
/// that becomes the run's error, not a bug to print).
pub fn panic_is_caught() -> bool {
    CATCHING_TORCH.with(|c| c.get() > 0)
}

/// libtorch's exception text without tch's panic wrapping and without the C++ backtrace that
/// follows "Exception raised from" (40 frames of addresses in a CUDA out-of-memory error).
pub fn torch_message(panic: &str) -> String {
    let s = panic
        .strip_prefix("called `Result::unwrap()` on an `Err` value: ")
        .unwrap_or(panic);
    let s = s
        .strip_prefix("Torch(\"")
        .map(|r| r.strip_suffix("\")").unwrap_or(r))
        .unwrap_or(s);
    let s = s.replace("\\n", "\n");
    let s = s.split("\nException raised from").next().unwrap_or(&s);
    s.trim().to_string()
}

#[cfg(test)]
mod tests {
    #[test]
    fn torch_messages_lose_the_wrapping_and_the_backtrace() {
        let raw = "called `Result::unwrap()` on an `Err` value: Torch(\"CUDA out of memory. Tried to allocate 1024.00 MiB.\\nException raised from malloc at /pytorch/c10/cuda/CUDACachingAllocator.cpp:1574 (most recent call first):\\nframe #0: c10::Error::Error\")";
        assert_eq!(
            super::torch_message(raw),
            "CUDA out of memory. Tried to allocate 1024.00 MiB."
        );
        assert_eq!(super::torch_message("plain"), "plain");
    }
}
