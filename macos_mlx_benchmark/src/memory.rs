//! MLX's memory figures for the summary (see `shared::summary::MemoryInfo` for what each means):
//! the allocated peak is MLX's own peak-memory counter; the reserved peak is the highest
//! active + cache reading, taken after every step (MLX keeps no peak of it). MLX's counters are
//! process-wide, so [`start_of_run`] clears the buffer cache and restarts both peaks for each
//! backend (each repeat).

use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context, Result};
use shared::runner::MemoryReading;

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

/// The highest active + cache reading since [`start_of_run`], in bytes.
static PEAK_HELD: AtomicUsize = AtomicUsize::new(0);

/// The highest allocated peak of the windows that [`close_peak_window`] closed since
/// [`start_of_run`], in bytes (MLX's counter restarts at each window).
static PEAK_CLOSED: AtomicUsize = AtomicUsize::new(0);

/// `FTB_PROFILE`'s memory per phase: MLX's allocated peak since the last call (or the start of
/// the run), after which MLX's counter restarts; the run's peak stays the highest of all windows.
pub fn close_peak_window() -> usize {
    let peak = mlx_rs::memory::peak_memory().unwrap_or(0);
    PEAK_CLOSED.fetch_max(peak, Ordering::Relaxed);
    let _ = mlx_rs::memory::reset_peak_memory();
    peak
}

/// A new measurement window: the buffer cache returned (a previous repeat's buffers would count
/// in this one), the peak-memory counter and the held-memory peak restarted.
pub fn start_of_run() -> Result<()> {
    mlx_rs::memory::clear_cache().context("clearing MLX's buffer cache")?;
    mlx_rs::memory::reset_peak_memory().context("resetting MLX's peak-memory counter")?;
    PEAK_HELD.store(0, Ordering::Relaxed);
    PEAK_CLOSED.store(0, Ordering::Relaxed);
    sample_held();
    Ok(())
}

/// MLX's CUDA allocator sets its memory limit to this share of the device's memory (MLX 0.32,
/// `backend/cuda/allocator.cpp`: `memory_limit_ = total_memory_ * 0.95`).
const MLX_CUDA_DEFAULT_SHARE: f64 = 0.95;

/// Limits what MLX's allocator holds (live arrays and buffer cache together) to `percent` of the
/// GPU's memory, and its buffer cache alone to `cache_percent`, both read back from MLX's own
/// default limit; `percent` 0 keeps MLX's limits. Called on MLX's CUDA backend only
/// (`Tuning::memory_percent` and `Tuning::cache_percent` say why). Returns the memory and cache
/// limits set, in bytes.
pub fn limit_on_cuda(percent: usize, cache_percent: usize) -> Result<Option<(usize, usize)>> {
    if percent == 0 {
        return Ok(None);
    }
    let default = mlx_rs::memory::memory_limit().context("reading MLX's memory limit")?;
    let share = |p: usize| {
        let bytes = (default as f64 / MLX_CUDA_DEFAULT_SHARE * p as f64 / 100.0) as usize;
        bytes.min(default)
    };
    let (limit, cache) = (share(percent), share(cache_percent.min(percent)));
    mlx_rs::memory::set_memory_limit(limit).context("setting MLX's memory limit")?;
    mlx_rs::memory::set_cache_limit(cache).context("setting MLX's cache limit")?;
    Ok(Some((limit, cache)))
}

/// Reads active + cache memory and keeps the highest (between steps, outside the timed region).
pub fn sample_held() {
    if let (Ok(a), Ok(c)) = (
        mlx_rs::memory::active_memory(),
        mlx_rs::memory::cache_memory(),
    ) {
        PEAK_HELD.fetch_max(a + c, Ordering::Relaxed);
    }
}

/// The reading for the summary; `on_gpu`: the arrays live in the GPU's memory (Metal's unified or CUDA device memory),
/// else in host memory (the CPU device).
pub fn reading(on_gpu: bool) -> MemoryReading {
    sample_held();
    let place = if on_gpu {
        "on the GPU"
    } else {
        "on the CPU device (host memory)"
    };
    let (allocated_gib, allocated_source) = match mlx_rs::memory::peak_memory() {
        Ok(b) => (
            Some(b.max(PEAK_CLOSED.load(Ordering::Relaxed)) as f64 / GIB),
            format!("MLX peak_memory: peak bytes of live MLX arrays {place} since the backend was built"),
        ),
        Err(e) => (None, format!("MLX peak_memory failed: {e}")),
    };
    let held = PEAK_HELD.load(Ordering::Relaxed) as f64 / GIB;
    // The cache keeps what a step freed, so after a step active + cache is what was held at the
    // step's peak; a reading below the allocated peak shows that the cache did not keep it (the
    // CPU allocator of MLX's Linux build caches little), and is then no reserved peak.
    let (reserved_gib, reserved_source) = match allocated_gib {
        Some(a) if held + 1e-9 < a => (
            None,
            format!(
                "not measured: MLX keeps no peak of active + cache memory, and its highest reading after a step ({held:.3} GiB {place}) is below the allocated peak, so the cache released what the step's peak held"
            ),
        ),
        _ => (
            (held > 0.0).then_some(held),
            format!(
                "MLX active_memory + cache_memory {place}: the highest reading, taken after every step (the cache keeps what a step freed; MLX keeps no peak of it)"
            ),
        ),
    };
    MemoryReading {
        allocated_gib,
        allocated_source,
        reserved_gib,
        reserved_source,
        process_gib: None,
        // On a Mac no per-process GPU figure is read yet (the task's graphics footprint,
        // `task_vm_info`, is the candidate); elsewhere the runner reads NVML.
        process_source: if cfg!(macos) && on_gpu {
            "not read: macOS gives no per-process GPU memory figure that this benchmark reads yet"
                .into()
        } else {
            String::new()
        },
    }
}

#[cfg(test)]
mod tests {
    /// The limits are the given shares of the memory MLX's default limit stands for, and MLX
    /// takes them (MLX's API answers on the CPU too; the call site is CUDA's alone).
    #[test]
    fn the_cuda_limits_are_shares_of_the_device() {
        let default = mlx_rs::memory::memory_limit().unwrap();
        assert_eq!(super::limit_on_cuda(0, 0).unwrap(), None);
        assert_eq!(mlx_rs::memory::memory_limit().unwrap(), default);
        let card = default as f64 / super::MLX_CUDA_DEFAULT_SHARE;
        let (set, cache) = super::limit_on_cuda(50, 10).unwrap().unwrap();
        assert!(
            (set as f64 - card * 0.5).abs() <= 1.0,
            "{set} against {card}"
        );
        assert!(
            (cache as f64 - card * 0.1).abs() <= 1.0,
            "{cache} against {card}"
        );
        assert_eq!(mlx_rs::memory::memory_limit().unwrap(), set);
        // MLX's setter answers the limit it replaces.
        assert_eq!(mlx_rs::memory::set_cache_limit(cache).unwrap(), cache);
        // Above MLX's own limit it keeps MLX's; the cache never above the memory limit.
        mlx_rs::memory::set_memory_limit(default).unwrap();
        assert_eq!(
            super::limit_on_cuda(100, 100).unwrap(),
            Some((default, default))
        );
        let (set, cache) = super::limit_on_cuda(30, 60).unwrap().unwrap();
        assert_eq!(set, cache);
        mlx_rs::memory::set_memory_limit(default).unwrap();
        mlx_rs::memory::set_cache_limit(default).unwrap();
    }
}
