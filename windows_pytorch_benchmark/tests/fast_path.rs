//! The fast attention path (real tokens only, FlashAttention-2 varlen) against the plain path
//! (the plan's padded rows through `scaled_dot_product_attention`).
//!
//! The host-side layout is tested everywhere; the kernels need CUDA and bf16, so that test skips
//! on a machine without a GPU (and says so) and runs on the lent H200 (`benchmarks/h200.sh`
//! carries the test binary there).

use std::collections::HashMap;

use shared::data::batch::{MicroBatch, IGNORE_INDEX};
use shared::model::{ModelShape, WeightSource};
use tch::{Device, Kind, Tensor};
use windows_pytorch_benchmark::decoder::{Attention, DType, Decoder, Inputs, Kinds};

/// Documents as one micro-batch: `packed` puts them end to end in one row (segment ids),
/// otherwise one per row, right-padded to the longest. Every position but a document's last
/// predicts the next token.
fn micro_batch(docs: &[Vec<i64>], packed: bool) -> MicroBatch {
    let total: usize = docs.iter().map(|d| d.len()).sum();
    let longest = docs.iter().map(|d| d.len()).max().unwrap();
    let (rows, seq_len) = if packed {
        (1, total + 2) // two padding positions at the end of the row
    } else {
        (docs.len(), longest)
    };
    let n = rows * seq_len;
    let mut mb = MicroBatch {
        rows,
        seq_len,
        input_ids: vec![32000; n],
        labels: vec![IGNORE_INDEX; n],
        position_ids: (0..n).map(|i| (i % seq_len) as i64).collect(),
        segment_ids: packed.then(|| vec![-1; n]),
        row_lengths: vec![0; rows],
        loss_tokens: 0,
        input_tokens: total,
        padded_tokens: n,
    };
    let mut offset = 0;
    for (k, d) in docs.iter().enumerate() {
        let (r, base) = if packed {
            (0, offset)
        } else {
            (k, k * seq_len)
        };
        for (t, &id) in d.iter().enumerate() {
            mb.input_ids[base + t] = id;
            mb.position_ids[base + t] = t as i64;
            if let Some(s) = &mut mb.segment_ids {
                s[base + t] = k as i32;
            }
            if t + 1 < d.len() {
                mb.labels[base + t] = d[t + 1];
                mb.loss_tokens += 1;
            }
        }
        offset += d.len();
        mb.row_lengths[r] = if packed { offset } else { d.len() };
    }
    mb
}

fn docs() -> Vec<Vec<i64>> {
    [7usize, 3, 12, 5]
        .iter()
        .enumerate()
        .map(|(k, &len)| {
            (0..len as i64)
                .map(|t| 100 + 37 * k as i64 + 11 * t)
                .collect()
        })
        .collect()
}

#[test]
fn varlen_inputs_keep_real_tokens_and_document_bounds() {
    for packed in [false, true] {
        let mb = micro_batch(&docs(), packed);
        assert!(mb.padded_tokens > mb.input_tokens, "the test needs padding");
        let inp = Inputs::varlen(&mb, Device::Cpu);
        let flat: Vec<i64> = docs().concat();
        assert_eq!(
            Vec::<i64>::try_from(inp.input_ids.view([-1])).unwrap(),
            flat
        );
        let pos: Vec<i64> = docs().iter().flat_map(|d| 0..d.len() as i64).collect();
        assert_eq!(
            Vec::<i64>::try_from(inp.position_ids.view([-1])).unwrap(),
            pos
        );
        let Attention::Varlen {
            cu_seqlens,
            max_len,
        } = &inp.attention
        else {
            panic!("varlen inputs without varlen attention")
        };
        assert_eq!(
            Vec::<i32>::try_from(cu_seqlens).unwrap(),
            vec![0, 7, 10, 22, 27],
            "packed = {packed}"
        );
        assert_eq!(*max_len, 12);
        // Loss positions: all but each document's last token, in flat order.
        let want: Vec<i64> = [(0, 7), (7, 10), (10, 22), (22, 27)]
            .iter()
            .flat_map(|&(a, b)| a..b - 1)
            .collect();
        assert_eq!(Vec::<i64>::try_from(&inp.loss_positions).unwrap(), want);
    }
}

fn tiny_model(shape: ModelShape, device: Device, dtype: DType) -> (Decoder, Vec<Tensor>) {
    let mut map = HashMap::new();
    let mut trainable = Vec::new();
    WeightSource::Random { seed: 11 }
        .for_each(&shape.parameters(), 0, |spec, d| {
            let dims: Vec<i64> = d.shape.iter().map(|&x| x as i64).collect();
            let t = Tensor::from_slice(&d.values)
                .view(dims.as_slice())
                .to_device(device)
                .to_kind(dtype.param_kind())
                .set_requires_grad(true);
            trainable.push(t.shallow_clone());
            map.insert(spec.name.clone(), t);
            Ok(())
        })
        .unwrap();
    let model = Decoder::from_tensors(shape, dtype, device, map, 1.0, 0).unwrap();
    (model, trainable)
}

fn loss_and_grad_norm(model: &Decoder, params: &[Tensor], inp: &Inputs) -> (f64, f64) {
    for p in params {
        let mut g = p.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    }
    let loss = model.loss_sum(inp);
    loss.backward();
    let norms: Vec<Tensor> = params
        .iter()
        .map(|p| p.grad().to_kind(Kind::Float).norm())
        .collect();
    let g = Tensor::stack(&norms, 0).norm().double_value(&[]);
    (loss.double_value(&[]), g)
}

#[test]
fn varlen_flash_matches_sdpa_on_cuda() {
    if !tch::Cuda::is_available() {
        eprintln!("skipped: needs a CUDA device (flash attention has no CPU kernel)");
        return;
    }
    let dev = Device::Cuda(0);
    // Every family: Phi-3's fused projections, Llama's grouped-query attention and tied head,
    // Qwen3's q/k norm and head_dim 32 at width 64.
    let shapes = [
        ModelShape::tiny(),
        ModelShape::from_preset(shared::config::ModelPreset::TinyLlama),
        ModelShape::from_preset(shared::config::ModelPreset::TinyQwen3),
    ];
    for (shape, dtype) in shapes
        .iter()
        .flat_map(|s| [DType::Bf16, DType::MixedBf16].map(|d| (s.clone(), d)))
    {
        let family = shape.family;
        let (model, params) = tiny_model(shape, dev, dtype);
        for packed in [false, true] {
            let mb = micro_batch(&docs(), packed);
            let (l0, g0) = loss_and_grad_norm(&model, &params, &Inputs::new(&mb, dev));
            let (l1, g1) = loss_and_grad_norm(&model, &params, &Inputs::varlen(&mb, dev));
            let rl = (l1 - l0).abs() / l0.abs();
            let rg = (g1 - g0).abs() / g0.abs();
            eprintln!(
                "{family:?} {} packed={packed}: loss {l0:.5} vs {l1:.5} ({rl:.1e}), grad norm {g0:.5} vs {g1:.5} ({rg:.1e})",
                dtype.name()
            );
            // bf16 rounding differs between the two kernels; a wrong mask or layout would be
            // off by far more (a document seeing another changes the loss by ~10 %).
            assert!(rl < 1e-2, "loss differs by {rl:.2e}");
            assert!(rg < 3e-2, "gradient norm differs by {rg:.2e}");
        }
    }
}

/// Random weights generated with tensor operations (on the GPU in real runs) against the host
/// generator that defines them: the hash is exact, fp64 log/cos may differ by an ulp, so at most
/// a handful of elements per million may differ, by one fp32 ulp.
#[test]
fn device_init_matches_the_host_definition() {
    let mut devices = vec![Device::Cpu];
    if tch::Cuda::is_available() {
        devices.push(Device::Cuda(0));
    } else {
        eprintln!("CUDA part skipped: no CUDA device");
    }
    let shape = ModelShape::tiny();
    let specs = shape.parameters();
    for device in devices {
        let (mut n, mut differ, mut worst) = (0usize, 0usize, 0f32);
        for spec in &specs {
            let host = spec.init_values(42);
            let dev = windows_pytorch_benchmark::init::init_on_device(spec, 42, device);
            assert_eq!(
                dev.size(),
                spec.shape.iter().map(|&d| d as i64).collect::<Vec<_>>()
            );
            let dev: Vec<f32> = Vec::try_from(dev.to_device(Device::Cpu).view([-1])).unwrap();
            for (a, b) in host.iter().zip(&dev) {
                n += 1;
                if a != b {
                    differ += 1;
                    let ulp = f32::from_bits(a.abs().to_bits() + 1) - a.abs();
                    worst = worst.max((a - b).abs() / ulp);
                }
            }
        }
        eprintln!("{device:?}: {differ} of {n} values differ, worst by {worst} fp32 ulp");
        assert!(n > 2_000_000, "the tiny model has {n} values");
        assert!(differ * 100_000 <= n, "{differ} of {n} values differ");
        assert!(worst <= 1.0, "a value differs by {worst} ulp");
    }
}

/// The fused multi-tensor AdamW and foreach clipping against libtorch's `torch::optim::AdamW`
/// and the per-tensor clipping they replace: same parameters after several steps.
#[test]
fn fused_adamw_and_clipping_match_libtorch() {
    use windows_pytorch_benchmark::ext::{clip_grad_norm, FusedAdamW};
    let mut devices = vec![Device::Cpu];
    if tch::Cuda::is_available() {
        devices.push(Device::Cuda(0));
    }
    for device in devices {
        tch::manual_seed(3);
        let shapes: [&[i64]; 3] = [&[7, 5], &[5], &[3, 4, 2]];
        let init: Vec<Tensor> = shapes
            .iter()
            .map(|s| Tensor::randn(*s, (Kind::Float, device)))
            .collect();
        let make = || -> Vec<Tensor> {
            init.iter()
                .map(|t| t.copy().set_requires_grad(true))
                .collect()
        };
        let (a, b) = (make(), make());
        let (lr, b1, b2, wd, eps) = (1e-2, 0.9, 0.95, 0.1, 1e-8);
        let mut reference = tch::COptimizer::adamw(lr, b1, b2, wd, eps, false).unwrap();
        for p in &a {
            reference.add_parameters(p, 0).unwrap();
        }
        let mut fused = FusedAdamW::new(&b, b1, b2, wd, eps);
        for step in 0..4 {
            let targets: Vec<Tensor> = shapes
                .iter()
                .map(|s| Tensor::randn(*s, (Kind::Float, device)) * (1.0 + step as f64))
                .collect();
            let loss = |ps: &[Tensor]| {
                ps.iter()
                    .zip(&targets)
                    .map(|(p, t)| (p - t).square().sum(Kind::Float))
                    .fold(Tensor::zeros([], (Kind::Float, device)), |x, y| x + y)
            };
            let lr_now = lr * (1.0 - 0.2 * step as f64);
            reference.zero_grad().unwrap();
            loss(&a).backward();
            // The clipping the backend used before: per-tensor fp32 norms on the device.
            let na = tch::no_grad(|| {
                let norms: Vec<Tensor> = a.iter().map(|p| p.grad().norm()).collect();
                let total = Tensor::stack(&norms, 0).norm();
                let coef = (1.0f64 / (&total + 1e-6)).clamp_max(1.0);
                for p in &a {
                    let _ = p.grad().g_mul_(&coef);
                }
                total.double_value(&[])
            });
            reference.set_learning_rate(lr_now).unwrap();
            reference.step().unwrap();
            fused.zero_grad();
            loss(&b).backward();
            let nb = clip_grad_norm(&b, 1.0).unwrap().double_value(&[]);
            fused.step(lr_now).unwrap();
            assert!((na - nb).abs() <= 1e-5 * na, "{device:?} norm {na} vs {nb}");
        }
        for (x, y) in a.iter().zip(&b) {
            let d = (x - y).abs().max().double_value(&[]);
            assert!(d < 1e-6, "{device:?}: parameters differ by {d}");
        }
        let moved = (&a[0] - &init[0]).abs().max().double_value(&[]);
        assert!(
            moved > 1e-3,
            "{device:?}: AdamW did not move the parameters ({moved})"
        );
    }
}

/// The step's forward and backward (`Decoder::forward`, with and without activation
/// checkpointing) compute the same loss and the same gradient of every parameter as one autograd
/// graph (`Decoder::loss_sum`): fp32 on the CPU, every family, a frozen prefix (last-n) and none
/// (full), padded rows and packed rows with document masks, the LM head in one chunk and in
/// several (`Decoder::head_chunk_tokens`).
#[test]
fn the_chunked_head_and_checkpointing_compute_the_same_gradients() {
    let shapes = [
        ModelShape::tiny(),
        ModelShape::from_preset(shared::config::ModelPreset::TinyLlama),
        ModelShape::from_preset(shared::config::ModelPreset::TinyQwen3),
    ];
    let dev = Device::Cpu;
    for shape in shapes {
        let family = shape.family;
        for first_grad_layer in [0, shape.num_layers - 1] {
            let (mut model, params) = tiny_model(shape.clone(), dev, DType::Float32);
            model.first_grad_layer = first_grad_layer;
            let grads = |model: &Decoder, inp: &Inputs, checkpoint: Option<bool>| {
                for p in &params {
                    let mut g = p.grad();
                    if g.defined() {
                        let _ = g.zero_();
                    }
                }
                let loss = match checkpoint {
                    // One graph: the head unchunked, one backward from the loss.
                    None => {
                        let l = model.loss_sum(inp) / 3.0;
                        l.backward();
                        l.double_value(&[])
                    }
                    Some(checkpoint) => {
                        let f = model.forward(inp, 3.0, checkpoint);
                        let loss = f.loss.double_value(&[]);
                        model.backward(f, inp);
                        loss
                    }
                };
                // A frozen prefix's parameters get no gradient: zeros, on both sides.
                let g: Vec<Tensor> = params
                    .iter()
                    .map(|p| match p.grad() {
                        g if g.defined() => g.copy(),
                        _ => p.zeros_like(),
                    })
                    .collect();
                (loss, g)
            };
            for packed in [false, true] {
                let mb = micro_batch(&docs(), packed);
                let inp = Inputs::new(&mb, dev);
                let (l0, g0) = grads(&model, &inp, None);
                // The step's head in one chunk (the default's 1,024 positions hold them all),
                // then in chunks of 3 loss positions, each with its own backward.
                let positions = inp.loss_positions.size()[0];
                assert!(
                    positions > 3 * 2,
                    "the test needs several chunks: {positions}"
                );
                for (chunk, checkpoint) in [
                    (shared::measure::memory::HEAD_CHUNK_TOKENS, false),
                    (3, false),
                    (shared::measure::memory::HEAD_CHUNK_TOKENS, true),
                    (3, true),
                ] {
                    model.head_chunk_tokens = chunk;
                    let (l1, g1) = grads(&model, &inp, Some(checkpoint));
                    let what = format!(
                        "{family:?} first_grad_layer {first_grad_layer} packed {packed} checkpoint {checkpoint} head chunk {chunk}"
                    );
                    assert!(
                        (l1 - l0).abs() <= 1e-6 * l0.abs(),
                        "{what}: loss {l0} vs {l1}"
                    );
                    let mut worst = 0.0f64;
                    for (a, b) in g0.iter().zip(&g1) {
                        let scale = a.abs().max().double_value(&[]).max(1e-12);
                        let d = (a - b).abs().max().double_value(&[]) / scale;
                        worst = worst.max(d);
                    }
                    eprintln!("{what}: loss {l0:.6}, worst gradient difference {worst:.1e}");
                    // Rounding, not a fault: the softmax sums the vocabulary in fp32, in a [3, V] chunk
                    // in another order than in the [N, V] tensor. Measured on an AMD EPYC (AVX2):
                    // every tensor within a near-uniform 3e-6 to 1.7e-5, growing as sqrt(V)
                    // (7.9e-6 Phi-3 32k, 1.6e-5 Llama 128k, 1.7e-5 Qwen3 152k), the losses equal;
                    // 4.2e-7 on the machine of an earlier session. A chunk missed, counted twice
                    // or scaled wrongly moves the gradients by about 3 / positions (> 1e-2).
                    assert!(worst < 1e-4, "{what}: gradients differ by {worst:.2e}");
                }
                // The gradients are not all zero (a frozen model would agree trivially).
                let nonzero = g0.iter().filter(|g| g.abs().max().double_value(&[]) > 0.0);
                assert!(
                    nonzero.count() > 3,
                    "{family:?} first_grad_layer {first_grad_layer} packed {packed}: no gradients"
                );
            }
        }
    }
}
