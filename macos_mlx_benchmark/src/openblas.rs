//! Linux CPU runs: make sure OpenBLAS uses kernels for this CPU.
//!
//! `setup-mlx-linux.sh` points MLX's BLAS at the system OpenBLAS. Debian 12's OpenBLAS (0.3.21)
//! picks its kernels from the CPU model at load time and does not know recent Intel parts (the
//! Xeon here reports family 6, model 207), so it falls back to its Prescott (SSE3) kernels: about
//! 1.4x slower on the tiny demo than its Skylake-X (AVX-512) kernels. The kernel set can only be
//! chosen before the library loads (`OPENBLAS_CORETYPE`), so when OpenBLAS reports the fallback
//! on a CPU with AVX-512 (or AVX2 + FMA), the binary restarts itself once with the variable set.
//! Setting `OPENBLAS_CORETYPE` yourself (to anything) turns this off.

use std::ffi::{c_char, c_void, CStr};

extern "C" {
    fn dlsym(handle: *mut c_void, symbol: *const c_char) -> *mut c_void;
}

/// The kernel set OpenBLAS chose (`openblas_get_corename()`), if OpenBLAS is loaded.
pub fn corename() -> Option<String> {
    // SAFETY: dlsym with RTLD_DEFAULT (null on glibc) only looks the symbol up; the function it
    // returns takes no arguments and returns a static NUL-terminated string.
    unsafe {
        let f = dlsym(std::ptr::null_mut(), c"openblas_get_corename".as_ptr());
        if f.is_null() {
            return None;
        }
        let f: extern "C" fn() -> *const c_char = std::mem::transmute(f);
        let name = f();
        (!name.is_null()).then(|| CStr::from_ptr(name).to_string_lossy().trim().to_string())
    }
}

/// Restarts the process with `OPENBLAS_CORETYPE` set when OpenBLAS fell back to Prescott
/// kernels on a CPU that runs better ones. Returns only if no restart was needed or possible.
pub fn ensure_cpu_kernels() {
    if std::env::var_os("OPENBLAS_CORETYPE").is_some() {
        return;
    }
    if !corename().is_some_and(|c| c.eq_ignore_ascii_case("prescott")) {
        return;
    }
    let target = if cfg!(target_arch = "x86_64") {
        better_core()
    } else {
        None
    };
    let Some(target) = target else { return };
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new("/proc/self/exe");
    if let Some(arg0) = std::env::args_os().next() {
        cmd.arg0(arg0);
    }
    let err = cmd
        .args(std::env::args_os().skip(1))
        .env("OPENBLAS_CORETYPE", target)
        .exec();
    eprintln!("warning: OpenBLAS uses its generic Prescott kernels; restarting with OPENBLAS_CORETYPE={target} failed ({err}); continuing");
}

#[cfg(target_arch = "x86_64")]
fn better_core() -> Option<&'static str> {
    let avx512 = std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512dq")
        && std::arch::is_x86_feature_detected!("avx512vl");
    if avx512 {
        Some("SkylakeX")
    } else if std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
    {
        Some("Haswell")
    } else {
        None
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn better_core() -> Option<&'static str> {
    None
}
