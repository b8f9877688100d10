//! Safe wrappers over `csrc/ftb_ext.cpp`: ATen calls tch 0.24 does not expose.

use std::ffi::{c_char, c_void, CStr};

use anyhow::{anyhow, Result};
use tch::Tensor;

extern "C" {
    fn ftb_free_error(e: *mut c_char);
    fn ftb_sdp_enable(flash: i32, mem_efficient: i32, math: i32, cudnn: i32) -> *mut c_char;
    fn ftb_flash_varlen(
        q: *const c_void,
        k: *const c_void,
        v: *const c_void,
        cu_seqlens: *const c_void,
        max_len: i64,
        out: *mut *mut c_void,
    ) -> *mut c_char;
    #[allow(clippy::too_many_arguments)]
    fn ftb_fused_adamw(
        params: *const *const c_void,
        grads: *const *const c_void,
        exp_avg: *const *const c_void,
        exp_avg_sq: *const *const c_void,
        n: i64,
        step: *const c_void,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
    ) -> *mut c_char;
    fn ftb_clip_grad_norm(
        grads: *const *const c_void,
        n: i64,
        max_norm: f64,
        norm: *mut *mut c_void,
    ) -> *mut c_char;
    fn ftb_allocator_stats(kind: i32, device: i32, out: *mut i64) -> *mut c_char;
    fn ftb_allocator_reset(kind: i32, device: i32, empty_cache: i32) -> *mut c_char;
}

fn ptrs(ts: &[Tensor]) -> Vec<*const c_void> {
    ts.iter().map(|t| t.as_ptr() as *const c_void).collect()
}

/// AdamW with ATen's fused multi-tensor kernel (`torch.optim.AdamW(fused=True)`): the same
/// update as libtorch's `torch::optim::AdamW`, in a few kernels for all parameters instead of
/// about ten per parameter. Moments are kept in each parameter's dtype, as libtorch's does.
pub struct FusedAdamW {
    params: Vec<Tensor>,
    exp_avg: Vec<Tensor>,
    exp_avg_sq: Vec<Tensor>,
    step: Tensor,
    pub beta1: f64,
    pub beta2: f64,
    pub weight_decay: f64,
    pub eps: f64,
}

impl FusedAdamW {
    pub fn new(params: &[Tensor], beta1: f64, beta2: f64, weight_decay: f64, eps: f64) -> Self {
        let (exp_avg, exp_avg_sq) = tch::no_grad(|| {
            (
                params.iter().map(Tensor::zeros_like).collect(),
                params.iter().map(Tensor::zeros_like).collect(),
            )
        });
        let device = params.first().map_or(tch::Device::Cpu, Tensor::device);
        Self {
            params: params.iter().map(Tensor::shallow_clone).collect(),
            exp_avg,
            exp_avg_sq,
            step: Tensor::zeros([], (tch::Kind::Float, device)),
            beta1,
            beta2,
            weight_decay,
            eps,
        }
    }

    /// One update with the parameters' current gradients.
    pub fn step(&mut self, lr: f64) -> Result<()> {
        let grads: Vec<Tensor> = self.params.iter().map(Tensor::grad).collect();
        if grads.iter().any(|g| !g.defined()) {
            return Err(anyhow!("internal: a trained parameter has no gradient"));
        }
        tch::no_grad(|| {
            let _ = self.step.g_add_scalar_(1.0);
        });
        let (p, g, m, v) = (
            ptrs(&self.params),
            ptrs(&grads),
            ptrs(&self.exp_avg),
            ptrs(&self.exp_avg_sq),
        );
        // SAFETY: four arrays of `n` live tensors and a live step tensor, for the call only.
        let e = unsafe {
            ftb_fused_adamw(
                p.as_ptr(),
                g.as_ptr(),
                m.as_ptr(),
                v.as_ptr(),
                p.len() as i64,
                self.step.as_ptr() as *const c_void,
                lr,
                self.beta1,
                self.beta2,
                self.weight_decay,
                self.eps,
            )
        };
        check(e, "fused AdamW")
    }

    /// Sets every gradient to zero (keeps the buffers).
    pub fn zero_grad(&mut self) {
        tch::no_grad(|| {
            for p in &self.params {
                let mut g = p.grad();
                if g.defined() {
                    let _ = g.zero_();
                }
            }
        });
    }
}

/// `torch.nn.utils.clip_grad_norm_(foreach=True)`: returns the total norm before clipping (a
/// device scalar; no synchronisation). Gradients that are not defined are left out.
pub fn clip_grad_norm(params: &[Tensor], max_norm: f64) -> Result<Tensor> {
    let grads: Vec<Tensor> = params
        .iter()
        .map(Tensor::grad)
        .filter(Tensor::defined)
        .collect();
    let g = ptrs(&grads);
    let mut out: *mut c_void = std::ptr::null_mut();
    // SAFETY: `n` live gradient tensors; `out` receives a new heap tensor on success.
    let e = unsafe { ftb_clip_grad_norm(g.as_ptr(), g.len() as i64, max_norm, &mut out) };
    check(e, "clipping the gradient norm")?;
    Ok(unsafe { Tensor::from_ptr(out as *mut _) })
}

fn check(e: *mut c_char, what: &str) -> Result<()> {
    if e.is_null() {
        return Ok(());
    }
    // SAFETY: a non-null return is a NUL-terminated string malloc'd by the extension.
    let msg = unsafe { CStr::from_ptr(e) }.to_string_lossy().into_owned();
    unsafe { ftb_free_error(e) };
    Err(anyhow!("{what}: {msg}"))
}

/// Which kernels `scaled_dot_product_attention` may choose from, process-wide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SdpBackends {
    pub flash: bool,
    pub mem_efficient: bool,
    pub math: bool,
    pub cudnn: bool,
}

pub fn set_sdp_backends(b: SdpBackends) -> Result<()> {
    // SAFETY: plain flag setters on ATen's global context.
    let e = unsafe {
        ftb_sdp_enable(
            b.flash as i32,
            b.mem_efficient as i32,
            b.math as i32,
            b.cudnn as i32,
        )
    };
    check(e, "setting the SDPA backends")
}

/// Causal FlashAttention-2 over documents laid end to end: `q` `[tokens, heads, head_dim]`,
/// `k`/`v` `[tokens, kv_heads, head_dim]` (bf16/fp16, CUDA), `cu_seqlens` int32 `[docs + 1]`.
/// Returns `[tokens, heads, head_dim]`, differentiable with respect to q, k and v.
pub fn flash_varlen(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cu_seqlens: &Tensor,
    max_len: i64,
) -> Result<Tensor> {
    let mut out: *mut c_void = std::ptr::null_mut();
    // SAFETY: the pointers are live tch tensors (`at::Tensor*`) for the duration of the call; on
    // success `out` is a new heap `at::Tensor` whose ownership passes to the returned `Tensor`.
    let e = unsafe {
        ftb_flash_varlen(
            q.as_ptr() as *const c_void,
            k.as_ptr() as *const c_void,
            v.as_ptr() as *const c_void,
            cu_seqlens.as_ptr() as *const c_void,
            max_len,
            &mut out,
        )
    };
    check(e, "flash attention (varlen)")?;
    Ok(unsafe { Tensor::from_ptr(out as *mut _) })
}

/// The caching allocator's byte counts for one device (all pools together).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllocatorStats {
    /// Max bytes in live tensors since the last reset (`allocated_bytes.all.peak`).
    pub peak_allocated: u64,
    /// Max bytes held from the device since the last reset, free cached blocks included
    /// (`reserved_bytes.all.peak`).
    pub peak_reserved: u64,
    pub allocated: u64,
    pub reserved: u64,
}

/// Which device allocator: CUDA's caching allocator, or MPS's.
fn allocator_kind(device: tch::Device) -> Result<(i32, i32)> {
    match device {
        tch::Device::Cuda(i) => Ok((0, i as i32)),
        tch::Device::Mps => Ok((1, 0)),
        d => Err(anyhow!(
            "{d:?} has no caching allocator with statistics in libtorch"
        )),
    }
}

/// `torch.cuda.memory_stats(device)`'s peaks and current values, through c10's device statistics.
pub fn allocator_stats(device: tch::Device) -> Result<AllocatorStats> {
    let (kind, index) = allocator_kind(device)?;
    let mut out = [0i64; 4];
    // SAFETY: `out` has room for the four values the extension writes.
    let e = unsafe { ftb_allocator_stats(kind, index, out.as_mut_ptr()) };
    check(e, "reading the caching allocator's statistics")?;
    let b = |x: i64| u64::try_from(x).unwrap_or(0);
    Ok(AllocatorStats {
        peak_allocated: b(out[0]),
        peak_reserved: b(out[1]),
        allocated: b(out[2]),
        reserved: b(out[3]),
    })
}

/// A new measurement window for the allocator: with `empty_cache`, its cached free blocks go back
/// to the device first (`torch.cuda.empty_cache()`); then the peaks are reset to the current values
/// (`torch.cuda.reset_peak_memory_stats()`). The device must be initialised.
pub fn reset_allocator(device: tch::Device, empty_cache: bool) -> Result<()> {
    let (kind, index) = allocator_kind(device)?;
    // SAFETY: plain calls on the allocator registered for the device.
    let e = unsafe { ftb_allocator_reset(kind, index, i32::from(empty_cache)) };
    check(e, "resetting the caching allocator's peaks")
}
