#!/usr/bin/env bash
# The Python reproductions of benchmarks/repro/ on the device's GPU, with MLX's Python binding
# (the mlx 0.32.2 cp312 wheel that benchmarks/pack_device.sh downloads into .device/mlxpy/)
# unzipped beside the same packed CUDA libmlx that the binary runs on (.device/mlxpack/, as
# benchmarks/mlx_gpu.sh unpacks it: the binding's `core` module finds `mlx/lib/libmlx.so` through
# its RUNPATH `$ORIGIN/lib`; the layout was checked on the CPU with the cp311 wheel and mlx-cpu).
# Usage (repo root on the device machine, carry [".device"]): bash benchmarks/repro/run_gpu.sh
# Each reproduction's printout goes to $OUT/repro_NAME.txt; a table of exit codes comes last.
set -uo pipefail
out=${OUT:-/tmp/out}
mkdir -p "$out"
source "$(dirname "${BASH_SOURCE[0]}")/../mlx_unpack.sh"
py=$(python3 -c 'import sys; print("cp%d%d" % sys.version_info[:2])')
wheel=$(ls .device/mlxpy/mlx-0.32.2-"$py"-*.whl 2>/dev/null | head -1)
[[ -n $wheel ]] || { echo "run_gpu: no mlx 0.32.2 wheel for $py in .device/mlxpy (benchmarks/pack_device.sh downloads cp312's)" >&2; exit 2; }
python3 -m zipfile -e "$wheel" $R
export PYTHONPATH=$R PYTHONUNBUFFERED=1
python3 -c "import mlx.core as mx; print('mlx', mx.__version__, mx.default_device(), mx.device_info())" 2>&1 | tee "$out/repro_mlx.txt"
summary=()
run() {
  local name=$1; shift
  echo "=== $name: python3 $*" | tee "$out/repro_$name.txt"
  timeout "${REPRO_TIMEOUT:-150}" python3 "$@" 2>&1 | tee -a "$out/repro_$name.txt"
  summary+=("$name exit ${PIPESTATUS[0]}")
}
# The strided q | k | v views through MLX's fused kernels (NaN at step 0 in the binary, 2026-12-05).
run strided_qkv benchmarks/repro/mlx_cuda_strided_qkv.py --gpu
# cudaGraphInstantiate out of memory beside MLX's buffer cache (four H100 runs, 2026-12-05):
# expected to fail at MLX's default limits and to complete at 80 %.
run graph_oom benchmarks/repro/mlx_cuda_graph_oom.py --gpu
run graph_oom_limit80 benchmarks/repro/mlx_cuda_graph_oom.py --gpu --limit 80
printf '%s\n' "${summary[@]}" | tee "$out/repro_table.txt"
