#!/usr/bin/env bash
# The device calls RESULTS.md lists under "What the next device calls should run", by number, so a
# session with a device runs them without retyping (each fits one 10-minute call; still to run
# after 2026-12-06: 5, and 3 on an H200 with MLX_FULL_FLAGS=; 6 fits beside any). On the device machine, after `bash benchmarks/pack_device.sh` here and with
# carry [".device"]:   bash benchmarks/next_calls.sh N
set -uo pipefail
S="--weights random --dataset synthetic --samples 4096"
g=mlx_gpu.sh
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
case ${1:-} in
1) # The MLX allocator limits (memory 80 %, cache 10 %, the CUDA defaults since 2026-12-06): the
   # Llama LoRA runs that failed on the H100 with the cache at 95 % (qwen3-0.6b's completed at 10 %),
   # phi-3-mini last-n at the memory limit MLX itself sets, for comparison
  # (llama-3.2-3b LoRA took 1.6 s a step there: 64 steps need the 130 s).
  TEST_TIMEOUT=${TEST_TIMEOUT:-60} FTB_PARITY_MODELS=${FTB_PARITY_MODELS:-tiny-qwen3} VARIANT_TIMEOUT=${VARIANT_TIMEOUT:-130} \
    bash "$here/$g" \
    llama-3.2-1b_lora "--device gpu $S --model llama-3.2-1b --strategy lora" \
    llama-3.2-3b_lora "--device gpu $S --model llama-3.2-3b --strategy lora" \
    mlx_lastn "--device gpu $S" \
    mlx_lastn_95 "FTB_MLX_MEMORY_PERCENT=95 --device gpu $S" ;;
2) # The MLX binary's remaining Qwen3 runs (qwen3-1.7b and qwen3-4b last-n ran on 2026-12-06;
   # qwen3-4b full checkpointed: 37 GiB estimated).
  SKIP_TESTS=1 VARIANT_TIMEOUT=${VARIANT_TIMEOUT:-150} bash "$here/$g" \
    qwen3-4b_full "--device gpu $S --model qwen3-4b --strategy full --grad-checkpoint" \
    qwen3-4b_lora "--device gpu $S --model qwen3-4b --strategy lora" ;;
3) # Issue 13: phi-3-mini through both binaries on one card, with the compare reports.
  SKIP_TESTS=1 VARIANT_TIMEOUT=${VARIANT_TIMEOUT:-130} COMPARE="mlx_lastn pt_lastn; mlx_full pt_full; mlx_lora pt_lora" \
    bash "$here/$g" \
    pt_lastn "--device cuda $S" mlx_lastn "--device gpu $S" \
    pt_lora "--device cuda $S --strategy lora" mlx_lora "--device gpu $S --strategy lora" \
    pt_full "--device cuda $S --strategy full" mlx_full "--device gpu $S --strategy full ${MLX_FULL_FLAGS---grad-checkpoint}" ;;
   # (On an H200, MLX_FULL_FLAGS= runs MLX's full fine-tuning without checkpointing, as PyTorch's:
   # it held 79.3 GiB there on 2026-12-04.)
4) # The PyTorch head in chunks without checkpointing (the default since aa4820c) against one chunk;
   # qwen3-0.6b full (22.7 % MFU, issue 14 asks 30) once more with its time by phase (FTB_PROFILE).
  SKIP_TESTS=1 VARIANT_TIMEOUT=${VARIANT_TIMEOUT:-90} bash "$here/$g" \
    pt_q06_full "--device cuda $S --model qwen3-0.6b --strategy full" \
    pt_q06_full_1chunk "FTB_HEAD_CHUNK_TOKENS=1000000 --device cuda $S --model qwen3-0.6b --strategy full" \
    pt_q06_full_prof "FTB_PROFILE=1 --device cuda $S --model qwen3-0.6b --strategy full" \
    pt_q06_full_late "FTB_LATE_INPUTS=1 --device cuda $S --model qwen3-0.6b --strategy full" \
    pt_lora_late "FTB_LATE_INPUTS=1 --device cuda $S --strategy lora" \
    pt_lora "--device cuda $S --strategy lora" \
    pt_lora_1chunk "FTB_HEAD_CHUNK_TOKENS=1000000 --device cuda $S --strategy lora" \
    pt_lastn "--device cuda $S" \
    pt_lastn_1chunk "FTB_HEAD_CHUNK_TOKENS=1000000 --device cuda $S" ;;
5) # The MLX head in chunks on CUDA (one graph there by default), 256 and 1,024 loss positions.
  SKIP_TESTS=1 VARIANT_TIMEOUT=${VARIANT_TIMEOUT:-90} bash "$here/$g" \
    mlx_lastn "--device gpu $S" mlx_lastn_chunk "FTB_MLX_HEAD_CHUNK=256 --device gpu $S" \
    mlx_lastn_chunk1k "FTB_MLX_HEAD_CHUNK=1024 --device gpu $S" \
    q06_full "--device gpu $S --model qwen3-0.6b --strategy full" \
    q06_full_chunk "FTB_MLX_HEAD_CHUNK=256 --device gpu $S --model qwen3-0.6b --strategy full" \
    q06_full_chunk1k "FTB_MLX_HEAD_CHUNK=1024 --device gpu $S --model qwen3-0.6b --strategy full" ;;
6) # The Python reproductions of MLX's CUDA failures (benchmarks/repro/), two to three minutes.
  bash "$here/repro/run_gpu.sh" ;;
7) # Issue 14: where qwen3-0.6b full's GPU time goes in the PyTorch binary (Nsight Compute, every
   # kernel timed alone; the window passes over the random initialisation's kernels, which
   # kernel_profile.py also sorts apart by name). Shares, not totals: the window is part of a run.
  SKIP_TESTS=1 VARIANT_TIMEOUT=${VARIANT_TIMEOUT:-300} NCU_ARGS=${NCU_ARGS:-"--launch-skip 20000 --launch-count 12000"} \
    bash "$here/$g" ncu_pt_q06_full "--device cuda --weights random --dataset synthetic --samples 1024 --model qwen3-0.6b --strategy full" ;;
8) # Issue 13: MLX's buffer cache below its memory limit (FTB_MLX_CACHE_PERCENT) against the
   # cudaMallocAsync failures of qwen3-0.6b full and LoRA at the 80 % default (2026-12-06, steps 45
   # and 22; not rerun here), the head in chunks as the other lever, and what a small cache costs
   # a run that completes (phi-3-mini last-n).
  SKIP_TESTS=1 VARIANT_TIMEOUT=${VARIANT_TIMEOUT:-100} bash "$here/$g" \
    q06_full_cache10 "FTB_MLX_CACHE_PERCENT=10 --device gpu $S --model qwen3-0.6b --strategy full" \
    q06_lora_cache10 "FTB_MLX_CACHE_PERCENT=10 --device gpu $S --model qwen3-0.6b --strategy lora" \
    mlx_lastn_cache10 "FTB_MLX_CACHE_PERCENT=10 --device gpu $S" \
    mlx_lastn "--device gpu $S" \
    q06_full_chunk1k "FTB_MLX_HEAD_CHUNK=1024 --device gpu $S --model qwen3-0.6b --strategy full" \
    q06_full_cache0 "FTB_MLX_CACHE_PERCENT=0 --device gpu $S --model qwen3-0.6b --strategy full" ;;
9) # Issue 13: where LoRA's GPU time goes in each binary (the strategy where MLX trails most, 0.46
   # on the H100), kernel by kernel under Nsight Compute. PyTorch: a window past its random
   # initialisation (about 10,000 kernels) and the first steps; MLX: from the start (with graph
   # nodes profiled one by one, ncu's launch count is not certain to count nodes), so its load and
   # first step, which kernel_profile.py puts apart / divides by the steps. Shares, not totals.
  (OUT=${OUT:-/tmp/out}/pt SKIP_TESTS=1 VARIANT_TIMEOUT=${VARIANT_TIMEOUT:-170} NCU_ARGS="--launch-skip 40000 --launch-count 8000" \
    bash "$here/$g" ncu_pt_lora "--device cuda --weights random --dataset synthetic --samples 512 --strategy lora")
  (OUT=${OUT:-/tmp/out}/mlx SKIP_TESTS=1 VARIANT_TIMEOUT=${VARIANT_TIMEOUT:-170} NCU_ARGS="--launch-count 8000" \
    bash "$here/$g" ncu_mlx_lora "--device gpu --weights random --dataset synthetic --samples 128 --strategy lora") ;;
*) echo "usage: bash benchmarks/next_calls.sh 1|2|3|4|5|6|7|8|9 (RESULTS.md, \"What the next device calls should run\")" >&2; exit 2 ;;
esac
