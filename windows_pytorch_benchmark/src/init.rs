//! `--weights random` generated on the GPU: the same counter-based values as
//! `shared::model::ParamSpec::init_values` (SplitMix64 hash of (seed, name, index), Box-Muller),
//! computed with 64-bit integer and fp64 tensor operations instead of on the host.
//!
//! Why: phi-3-mini has 3.8 billion parameters; generating them on the host and copying them over
//! took about 20 s of a run on the H200 machine (16 cores), most of the time to first step. On the
//! GPU it takes well under a second. The integer part (the hash) is exact; the fp64 logarithm and
//! cosine of CUDA may differ from the host's by an ulp, which after rounding to fp32 changes a
//! value in about one of many millions by one fp32 ulp (`tests/fast_path.rs` counts them on the
//! GPU). `FTB_HOST_INIT=1` keeps the host path.

use shared::model::{Init, ParamSpec};
use shared::rng;
use tch::{Device, Kind, Tensor};

const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;
const M1: u64 = 0xbf58_476d_1ce4_e5b9;
const M2: u64 = 0x94d0_49bb_1331_11eb;
/// Elements generated per pass (bounds the int64/fp64 temporaries to a few GB).
const CHUNK: i64 = 1 << 25;

/// Logical right shift of 64-bit patterns held in int64.
fn shr(z: &Tensor, s: i64) -> Tensor {
    z.bitwise_right_shift_tensor_scalar(s)
        .bitwise_and(((1u64 << (64 - s)) - 1) as i64)
}

/// `rng::mix64` elementwise (wrapping multiplication, as int64 arithmetic on the GPU does).
fn mix64(z: &Tensor) -> Tensor {
    let z = (z.bitwise_xor_tensor(&shr(z, 30))) * (M1 as i64);
    let z = (z.bitwise_xor_tensor(&shr(&z, 27))) * (M2 as i64);
    z.bitwise_xor_tensor(&shr(&z, 31))
}

/// `rng::hash(key, i)` for a tensor of counters `i`.
fn hash(key: u64, i: &Tensor) -> Tensor {
    mix64(&mix64(&((i + 1i64) * (GOLDEN as i64))).bitwise_xor(key as i64))
}

/// `rng::unit_f64`: the top 53 bits as a uniform draw in [0, 1), fp64.
fn unit(bits: &Tensor) -> Tensor {
    shr(bits, 11).to_kind(Kind::Double) * (1.0 / (1u64 << 53) as f64)
}

/// The initial values of `spec` from `seed`, fp32 on `device`.
pub fn init_on_device(spec: &ParamSpec, seed: u64, device: Device) -> Tensor {
    let dims: Vec<i64> = spec.shape.iter().map(|&d| d as i64).collect();
    let n = spec.numel() as i64;
    let key = rng::name_key(seed, &spec.name);
    let flat = match spec.init {
        Init::Ones => Tensor::ones([n], (Kind::Float, device)),
        Init::Zeros => Tensor::zeros([n], (Kind::Float, device)),
        Init::Normal | Init::Uniform(_) => {
            let out = Tensor::empty([n], (Kind::Float, device));
            let mut start = 0;
            while start < n {
                let len = CHUNK.min(n - start);
                let i = Tensor::arange_start(start, start + len, (Kind::Int64, device));
                let v = match spec.init {
                    Init::Normal => {
                        let u1 = unit(&hash(key, &(&i * 2i64)));
                        let u2 = unit(&hash(key, &(&i * 2i64 + 1i64)));
                        let r = (u1.neg() + 1.0).log().g_mul_scalar(-2.0).sqrt();
                        r * (u2 * std::f64::consts::TAU).cos() * 0.02
                    }
                    Init::Uniform(b) => (unit(&hash(key, &i)) * 2.0 - 1.0) * b,
                    _ => unreachable!(),
                };
                out.narrow(0, start, len).copy_(&v.to_kind(Kind::Float));
                start += len;
            }
            out
        }
    };
    flat.view(dims.as_slice())
}
