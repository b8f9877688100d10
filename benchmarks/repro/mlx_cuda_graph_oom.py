"""MLX's CUDA buffer cache leaves too little of the card for CUDA graphs: a small reproduction,
fit to report upstream (ml-explore/mlx).

What was seen (one H100 80GB, mlx-cuda-13 0.32.2, 2026-12-05, benchmarks/h100-2026-12-05/call2):
four training runs of the MLX binary (qwen3-0.6b full and LoRA, llama-3.2-1b LoRA, llama-3.2-3b
LoRA) failed after 17-31 steps with `cudaGraphInstantiate(...) failed: out of memory`, while MLX's
own allocated peak was 38-59 GiB and the process held 79.17 of the card's 79.6 GiB. MLX's CUDA
allocator lets live arrays and its cache of freed buffers together reach 95 % of the card
(`backend/cuda/allocator.cpp`: `memory_limit_ = total_memory * 0.95`; the cache limit defaults to
the same), and it frees cached buffers only when one of its own allocations would pass that limit.
CUDA graphs are instantiated outside the allocator, so once the cache has grown (micro-batches of
varying shapes each leave buffers of new sizes behind) a new graph can find the card full even
though MLX itself would have room. On the 143 GB H200 the 5 % left is 7 GiB, and the same runs had
not failed there.

The script does the same in two phases:
1. fill MLX's cache: arrays of distinct sizes, evaluated then dropped, up to `--fill` of MLX's
   memory limit (they stay in the cache: MLX's cache limit is the memory limit);
2. build new CUDA graphs: `--graphs` small computations of distinct shapes, each a chain of
   element-wise operations and a matrix product (each new shape is a new graph to instantiate),
   printing MLX's active and cache memory every so often.
Expected on an affected card: phase 2 fails with `cudaGraphInstantiate ... out of memory` (or a
cuBLAS / cuDNN allocation failure) while `active` is small. With `--limit 80` (what the benchmark
now sets on CUDA: `FTB_MLX_MEMORY_PERCENT`, default 80) MLX's memory and cache limits are 80 % of
the card, and phase 2 should complete. `--fill` may need tuning per card (0.97 of the limit by
default: the cache after phase 1 sits just under MLX's 95 %).

Run (CUDA): pip install mlx==0.32.2 mlx-cuda-13==0.32.2
    python benchmarks/repro/mlx_cuda_graph_oom.py --gpu            # expected to fail
    python benchmarks/repro/mlx_cuda_graph_oom.py --gpu --limit 80 # expected to complete
Run (CPU, a smoke test of the script only; the CPU has no CUDA graphs):
    pip install "mlx[cpu]==0.32.2"; python benchmarks/repro/mlx_cuda_graph_oom.py --fill-gib 1

Run here on the CPU (2026-12-05, MLX 0.32.2, 2 cores, `--fill-gib 1 --graphs 300`, 20 s): it
completes; MLX's CPU allocator did not keep phase 1's buffers (cache 0 MiB after it, peak 1,024
MiB), so the CPU cannot show the fault: it checks only that the script runs. Not yet run on a GPU:
the device was withdrawn before it could be.
"""

import argparse
import sys

import mlx.core as mx

GIB = 1 << 30
# MLX's CUDA allocator: memory_limit_ = total_memory * 0.95 (backend/cuda/allocator.cpp, 0.32).
MLX_CUDA_SHARE = 0.95


def memory_limit():
    """MLX's memory limit (Python has only the setter, which returns the previous value)."""
    previous = mx.set_memory_limit(1 << 30)
    mx.set_memory_limit(previous)
    return previous


def mib(b):
    return f"{b / (1 << 20):,.0f} MiB"


def memory_line(tag):
    return (
        f"{tag}: active {mib(mx.get_active_memory())}, cache {mib(mx.get_cache_memory())}, "
        f"peak {mib(mx.get_peak_memory())}, limit {mib(memory_limit())}"
    )


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu", action="store_true", help="run on MLX's GPU (CUDA)")
    p.add_argument("--limit", type=float, default=0, help="percent of the card for MLX's memory and cache limits (0: MLX's default)")
    p.add_argument("--fill", type=float, default=0.97, help="share of MLX's memory limit to leave in its cache")
    p.add_argument("--fill-gib", type=float, default=0, help="GiB to leave in the cache instead of --fill")
    p.add_argument("--graphs", type=int, default=600, help="distinct shapes to run in phase 2")
    a = p.parse_args()
    if a.gpu:
        mx.set_default_device(mx.gpu)
    default_limit = memory_limit()
    if a.limit:
        limit = int(default_limit / MLX_CUDA_SHARE * a.limit / 100)
        mx.set_memory_limit(limit)
        mx.set_cache_limit(limit)
    limit = memory_limit()
    print(f"mlx {mx.__version__}, device {mx.default_device()}, MLX memory limit {mib(limit)} (default {mib(default_limit)})")

    # Phase 1: buffers of distinct sizes (so no later allocation reuses one), freed into the cache.
    target = int(a.fill_gib * GIB) if a.fill_gib else int(limit * a.fill)
    held, i, arrays = 0, 0, []
    while held < target:
        n = min(256 << 20, target - held) // 2 - 4096 * i  # bf16 elements, each size its own
        if n <= 0:
            break
        x = mx.zeros((n,), dtype=mx.bfloat16)
        mx.eval(x)
        arrays.append(x)
        held += 2 * n
        i += 1
    del arrays, x
    print(memory_line(f"phase 1, {i} buffers freed into the cache"))

    # Phase 2: new shapes, each a new CUDA graph to instantiate beside the cached buffers.
    for g in range(a.graphs):
        rows = 64 + 8 * g
        x = mx.random.normal((rows, 256)).astype(mx.bfloat16)
        w = mx.random.normal((256, 256)).astype(mx.bfloat16)
        y = x
        for k in range(8):
            y = mx.maximum(y * (1.0 + k / 8), 0.0) + x
        y = (y @ w).sum()
        try:
            mx.eval(y)
        except Exception as e:  # MLX raises RuntimeError for CUDA failures
            print(memory_line(f"phase 2 FAILED at graph {g} (rows {rows})"))
            print(f"  {type(e).__name__}: {e}")
            sys.exit(1)
        if g % 100 == 0 or g == a.graphs - 1:
            print(memory_line(f"phase 2, graph {g}"))
    print(f"completed: {a.graphs} new shapes beside {mib(mx.get_cache_memory())} of cached buffers")


if __name__ == "__main__":
    main()
