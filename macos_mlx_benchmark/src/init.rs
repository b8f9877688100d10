//! `--weights random` generated on an NVIDIA GPU (MLX's CUDA backend): the same counter-based
//! values as `shared::model::ParamSpec::init_values` (SplitMix64 hash of (seed, name, index), then
//! Box-Muller in fp64), computed by a kernel that MLX compiles at run time (`fast::cuda_kernel`,
//! NVRTC) instead of on the host.
//!
//! Why: phi-3-mini has 3.8 billion parameters; generating them on the host and copying them over
//! took most of the MLX binary's 26 s load on the H200 machine, against 1.6 s for the PyTorch
//! binary, which generates them on the GPU (`windows_pytorch_benchmark/src/init.rs`). MLX has no
//! fp64 on the GPU, so the arithmetic cannot be written with MLX operations; a custom kernel can use
//! CUDA's `double`. The integer hash is exact; CUDA's fp64 `log` and `cos` may differ from the host
//! libm's by an ulp, which after rounding to fp32 changes a value in about one of many millions by
//! one fp32 ulp (`tests/gpu.rs` counts them on the GPU). CUDA only: Metal has no fp64, so a Mac
//! generates on the host. `FTB_HOST_INIT=1` keeps the host path here too.

use anyhow::Result;
use mlx_rs::{Array, Dtype};
use shared::model::{Init, ParamSpec};
use shared::rng;

use crate::cuda_kernel::CudaKernel;

/// The kernel body (MLX wraps it in a `__global__` function with `params` and `out` arguments).
/// `params` = [key, n, bits of the uniform bound, normal (1) or uniform (0)].
const SOURCE: &str = r#"
  const unsigned long long key = params[0];
  const unsigned long long n = params[1];
  const unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  double v;
  if (params[3] == 1ull) {
    const double u1 = ftb_unit(ftb_hash(key, 2ull * i));
    const double u2 = ftb_unit(ftb_hash(key, 2ull * i + 1ull));
    const double r = sqrt(-2.0 * log(1.0 - u1));
    v = 0.02 * (r * cos(6.283185307179586 * u2));
  } else {
    const double b = __longlong_as_double((long long)params[2]);
    v = (2.0 * ftb_unit(ftb_hash(key, i)) - 1.0) * b;
  }
  out[i] = (float)v;
"#;

/// `shared::rng::{mix64, hash, unit_f64}`, written for the device.
const HEADER: &str = r#"
__device__ __forceinline__ unsigned long long ftb_mix64(unsigned long long z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
__device__ __forceinline__ unsigned long long ftb_hash(unsigned long long key, unsigned long long i) {
  return ftb_mix64(key ^ ftb_mix64((i + 1ull) * 0x9e3779b97f4a7c15ull));
}
__device__ __forceinline__ double ftb_unit(unsigned long long bits) {
  return (double)(bits >> 11) * (1.0 / 9007199254740992.0);
}
"#;

/// The initial values of `spec` from `seed`, fp32, on the GPU (MLX's CUDA backend).
pub fn init_on_cuda(spec: &ParamSpec, seed: u64) -> Result<Array> {
    let dims: Vec<i32> = spec.shape.iter().map(|&d| d as i32).collect();
    let n = spec.numel();
    let (normal, bound) = match spec.init {
        Init::Ones => return Ok(mlx_rs::ops::ones::<f32>(&dims)?),
        Init::Zeros => return Ok(mlx_rs::ops::zeros::<f32>(&dims)?),
        Init::Normal => (1u64, 0.0f64),
        Init::Uniform(b) => (0u64, b),
    };
    let grid = i32::try_from(n).map_err(|_| {
        anyhow::anyhow!(
            "{}: {n} elements are more than one kernel launch covers",
            spec.name
        )
    })?;
    let key = rng::name_key(seed, &spec.name);
    let params = Array::from_slice(&[key, n as u64, bound.to_bits(), normal], &[4]);
    let out = apply(&params, &dims, grid)?;
    Ok(out)
}

/// One launch of the kernel: `grid` threads, 256 per block, output `[dims]` fp32.
fn apply(params: &Array, dims: &[i32], grid: i32) -> Result<Array> {
    let kernel = CudaKernel::new("ftb_init_values", &["params"], &["out"], SOURCE, HEADER)?;
    let mut out = kernel.apply(&[params], &[(dims, Dtype::Float32)], &[], grid, 256)?;
    Ok(out.remove(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{gpu_backend, MlxDevice};

    /// On the GPU: the kernel's values against shared's host definition, element by element
    /// (fp32). Skipped, saying so, without MLX's CUDA backend.
    #[test]
    fn device_values_match_the_host_definition() {
        if gpu_backend() != Some(MlxDevice::Cuda) {
            eprintln!("skipped: this MLX has no CUDA backend");
            return;
        }
        mlx_rs::Device::set_default(&mlx_rs::Device::gpu());
        let specs = [
            ParamSpec {
                name: "model.layers.0.mlp.down_proj.weight".into(),
                shape: vec![1024, 4099],
                init: Init::Normal,
            },
            ParamSpec {
                name: "model.layers.0.self_attn.o_proj.lora_A.weight".into(),
                shape: vec![16, 3072],
                init: Init::Uniform(1.0 / 3072f64.sqrt()),
            },
            ParamSpec {
                name: "model.norm.weight".into(),
                shape: vec![3072],
                init: Init::Ones,
            },
        ];
        for spec in &specs {
            let host = spec.init_values(42);
            let dev = init_on_cuda(spec, 42).unwrap();
            dev.eval().unwrap();
            let dev: Vec<f32> = dev.as_slice::<f32>().to_vec();
            assert_eq!(dev.len(), host.len());
            let differ = host.iter().zip(&dev).filter(|(a, b)| a != b).count();
            let worst = host
                .iter()
                .zip(&dev)
                .map(|(a, b)| (a - b).abs() / a.abs().max(1e-30))
                .fold(0f32, f32::max);
            eprintln!(
                "{}: {differ} of {} values differ, worst relative {worst:.1e}",
                spec.name,
                host.len()
            );
            // An fp64 ulp of CUDA's log/cos against the host libm can move a rounded fp32 value by
            // one ulp, rarely; anything more is a wrong kernel.
            assert!(differ * 100_000 <= host.len(), "{differ} differ");
            assert!(worst <= 2.0 * f32::EPSILON, "worst {worst:e}");
        }
    }
}
