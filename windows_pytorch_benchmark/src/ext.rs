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
