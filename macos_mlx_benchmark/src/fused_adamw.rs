//! The AdamW update of one tensor as one CUDA kernel (MLX's CUDA backend, `Tuning::fused_adamw`),
//! with gradient clipping folded in.
//!
//! Why: written as MLX operations (`train::adamw_update`) the update is about 18 element-wise
//! operations per tensor, plus 3 for clipping, each its own kernel and its own fp32 temporary of
//! the tensor's size. On the H200 the host spent 0.20 s of a 0.58 s last-n step building them
//! (`FTB_PROFILE=1`), and MLX's CUDA backend keeps each temporary until the GPU has run it. One
//! kernel per tensor reads p, g, m, v once and writes p, m, v once.
//!
//! The arithmetic is that of the operations, rounding for rounding: fp32 throughout, with the
//! intrinsics that round every product, sum, quotient and square root on its own (`__fmul_rn` &c.:
//! no fused multiply-add, which NVRTC would otherwise contract), the clipped gradient rounded to
//! the gradient's dtype, and the new moments rounded to the state dtype before the update reads
//! them, as the operations do. `tests/gpu.rs`-style check: `fused_matches_the_operations` below
//! compares every element on the GPU.

use anyhow::{Context, Result};
use mlx_rs::{Array, Dtype};

use crate::cuda_kernel::CudaKernel;

/// Inputs `p, g, m, v` (their dtypes: `PT`, `GT`, `ST`, `ST`) and `s`, fp32
/// `[decay, step_size, 1/sqrt(1 - b2^t), b1, 1 - b1, b2, 1 - b2, eps, clip]`.
const SOURCE: &str = r#"
  long long n = 1;
  for (int d = 0; d < p_ndim; ++d) n *= p_shape[d];
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const float decay = s[0], step_size = s[1], inv_bc2 = s[2];
  const float b1 = s[3], omb1 = s[4], b2 = s[5], omb2 = s[6], eps = s[7], clip = s[8];
  const float gc = static_cast<float>(GT(__fmul_rn(static_cast<float>(g[i]), clip)));
  const ST m1 = ST(__fadd_rn(__fmul_rn(static_cast<float>(m[i]), b1), __fmul_rn(gc, omb1)));
  const ST v1 = ST(__fadd_rn(__fmul_rn(static_cast<float>(v[i]), b2),
                             __fmul_rn(__fmul_rn(gc, gc), omb2)));
  const float denom = __fadd_rn(__fmul_rn(__fsqrt_rn(static_cast<float>(v1)), inv_bc2), eps);
  const float update = __fmul_rn(__fdiv_rn(static_cast<float>(m1), denom), step_size);
  out_p[i] = PT(__fsub_rn(__fmul_rn(static_cast<float>(p[i]), decay), update));
  out_m[i] = m1;
  out_v[i] = v1;
"#;

const THREADS: i32 = 256;

#[derive(Debug)]
pub struct FusedAdamW {
    kernel: CudaKernel,
}

impl FusedAdamW {
    pub fn new() -> Result<Self> {
        Ok(Self {
            kernel: CudaKernel::new(
                "ftb_adamw",
                &["p", "g", "m", "v", "s"],
                &["out_p", "out_m", "out_v"],
                SOURCE,
                "",
            )?,
        })
    }

    /// `[p', m', v']`; `s` as [`SOURCE`] says (see `train::AdamScalars`).
    pub fn apply(
        &self,
        p: &Array,
        g: &Array,
        m: &Array,
        v: &Array,
        s: &Array,
    ) -> Result<[Array; 3]> {
        let n = p.size();
        let grid =
            i32::try_from(n.div_ceil(THREADS as usize) * THREADS as usize).with_context(|| {
                format!("{n} elements are more than one AdamW kernel launch covers")
            })?;
        let (pt, st) = (p.dtype(), m.dtype());
        let out = self.kernel.apply(
            &[p, g, m, v, s],
            &[(p.shape(), pt), (p.shape(), st), (p.shape(), st)],
            &[("PT", pt), ("ST", st), ("GT", g.dtype())],
            grid,
            THREADS,
        )?;
        out.try_into()
            .map_err(|_| anyhow::anyhow!("internal: the AdamW kernel returned the wrong arity"))
    }
}

/// The packed scalars from the eight of `train::AdamScalars` and the clipping coefficient (a
/// `[]` fp32 array on the device, 1 without clipping).
pub fn pack_scalars(eight: &[f32; 8], clip: &Array) -> Result<Array> {
    let head = Array::from_slice(eight, &[8]);
    Ok(mlx_rs::ops::concatenate(
        &[head, clip.as_dtype(Dtype::Float32)?.reshape(&[1])?],
        0,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{gpu_backend, MlxDevice};

    /// On the GPU: the kernel against the update written as MLX operations (`train::adamw_update`
    /// after the clipping multiply), element for element, for bf16 and fp32 tensors, with and
    /// without clipping and weight decay. Skipped, saying so, without MLX's CUDA backend.
    #[test]
    fn fused_matches_the_operations() {
        if gpu_backend() != Some(MlxDevice::Cuda) {
            eprintln!("skipped: this MLX has no CUDA backend");
            return;
        }
        mlx_rs::Device::set_default(&mlx_rs::Device::gpu());
        let fused = FusedAdamW::new().unwrap();
        for dtype in [Dtype::Bfloat16, Dtype::Float32] {
            for (decay, clip) in [(1.0f32, 1.0f32), (0.999_99, 0.37)] {
                let shape = [515, 77];
                let r = |k: u64, scale: f32| {
                    let key = mlx_rs::random::key(k).unwrap();
                    mlx_rs::random::normal::<f32>(&shape, None, None, &key)
                        .unwrap()
                        .multiply(Array::from_f32(scale))
                        .unwrap()
                        .as_dtype(dtype)
                        .unwrap()
                };
                let (p, g, m) = (r(1, 0.02), r(2, 0.5), r(3, 0.01));
                let v = r(4, 0.001).square().unwrap();
                let eight = [
                    decay,
                    1.3e-4,
                    1.0 / (1.0f32 - 0.999f32.powi(3)).sqrt(),
                    0.9,
                    0.1,
                    0.999,
                    0.001,
                    1e-8,
                ];
                let clip_a = Array::from_f32(clip);
                let s = pack_scalars(&eight, &clip_a).unwrap();
                let [p1, m1, v1] = fused.apply(&p, &g, &m, &v, &s).unwrap();
                let gc = g
                    .as_dtype(Dtype::Float32)
                    .unwrap()
                    .multiply(&clip_a)
                    .unwrap()
                    .as_dtype(dtype)
                    .unwrap();
                let mut x = vec![p.clone(), gc, m.clone(), v.clone()];
                x.extend(eight.iter().map(|&e| Array::from_f32(e)));
                let ops = crate::train::adamw_update(decay != 1.0, &x).unwrap();
                for (name, a, b) in [
                    ("p", &p1, &ops[0]),
                    ("m", &m1, &ops[1]),
                    ("v", &v1, &ops[2]),
                ] {
                    let a: Vec<f32> = a
                        .as_dtype(Dtype::Float32)
                        .unwrap()
                        .as_slice::<f32>()
                        .to_vec();
                    let b: Vec<f32> = b
                        .as_dtype(Dtype::Float32)
                        .unwrap()
                        .as_slice::<f32>()
                        .to_vec();
                    let differ = a
                        .iter()
                        .zip(&b)
                        .filter(|(x, y)| x.to_bits() != y.to_bits())
                        .count();
                    eprintln!(
                        "{dtype:?} decay {decay} clip {clip} {name}: {differ} of {} differ",
                        a.len()
                    );
                    assert_eq!(differ, 0, "{dtype:?} {name}");
                }
            }
        }
    }
}
