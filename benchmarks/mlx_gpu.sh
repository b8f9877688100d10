#!/usr/bin/env bash
# MLX and PyTorch on one NVIDIA GPU in one call (the lent H200): unpacks MLX's CUDA libmlx (packed
# by ../shared/tools/mlx-cuda-pack.sh into .device/mlxpack/), runs the variants, prints a short
# table last. Usage (repo root on the device machine, binaries carried in .device/):
#   bash benchmarks/mlx_gpu.sh NAME1 "FLAGS1" NAME2 "FLAGS2" ...
# A NAME starting with `pt_` runs the PyTorch binary, any other the MLX binary. FLAGS may start
# with environment assignments (e.g. "FTB_MLX_COMPILE=0 --strategy full"). Test binaries in
# .device/tests/ run first (with FTB_PYTORCH_BIN and FTB_MLX_BIN set). With COMPARE="A B ...",
# compare writes the report of those runs. Everything is packed into $OUT/results.tar.gz.
set -uo pipefail
out=${OUT:-/tmp/out}
mkdir -p "$out/runs"
# Binaries packed by benchmarks/pack_device.sh (stripped, xz) into .device/xz/.
if [[ -d .device/xz ]]; then
  mkdir -p .device/tests
  for f in .device/xz/*.xz; do
    n=$(basename "$f" .xz)
    case $n in test-*) dst=.device/tests/${n#test-} ;; *) dst=.device/$n ;; esac
    xz -dc "$f" >"$dst" && chmod +x "$dst"
  done
  echo "binaries of commit $(cat .device/xz/COMMIT) (uncommitted: $(wc -l <.device/xz/DIRTY) files)"
fi
# PyTorch: the device's own torch 2.11 (libtorch for tch 0.24).
torch_lib=$(python3 -c "import torch,os;print(os.path.dirname(torch.__file__)+'/lib')")
# MLX: the CUDA build of the same version (0.32.2) in place of the CPU libmlx the binary links.
source "$(dirname "${BASH_SOURCE[0]}")/mlx_unpack.sh"
export LD_LIBRARY_PATH=$R/mlx/lib:$torch_lib:${LD_LIBRARY_PATH:-} TORCH_CPP_LOG_LEVEL=ERROR
export FTB_PYTORCH_BIN=$PWD/.device/windows_pytorch_benchmark FTB_MLX_BIN=$PWD/.device/macos_mlx_benchmark
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv
  python3 -c "import torch;print('torch', torch.__version__)"; echo "libmlx $(cat .device/mlxpack/VERSION) (CUDA, sm90 cubins)"
  git log -1 --format='commit %H %s' 2>/dev/null || true; } | tee "$out/machine.txt"
for t in .device/tests/*; do
  [[ -x $t && -z ${SKIP_TESTS:-} ]] || continue
  echo "=== test $t" | tee -a "$out/log.txt"
  # The GPU tests only (the rest run in CI): the parity test's GPU case, the device init check.
  case $(basename "$t") in parity) filter=on_the_gpu ;; macos_mlx_benchmark) filter="device_values fused_matches strided_qkv" ;; *) filter= ;; esac
  timeout "${TEST_TIMEOUT:-300}" "$t" $filter --nocapture --test-threads 1 >>"$out/log.txt" 2>&1
  echo "exit $?" | tee -a "$out/log.txt"
  grep -E "^test |^test result|skipped|max rel" "$out/log.txt" | tail -12
done
while (($# >= 2)); do
  name=$1; flags=$2; shift 2
  bin=$FTB_MLX_BIN; [[ $name == pt_* ]] && bin=$FTB_PYTORCH_BIN
  echo "=== $name: $flags" | tee -a "$out/log.txt"
  envs=(); read -ra words <<<"$flags"
  while ((${#words[@]})) && [[ ${words[0]} =~ ^[A-Z_][A-Z0-9_]*= ]]; do envs+=("${words[0]}"); words=("${words[@]:1}"); done
  if [[ $name == ncu_* ]]; then
    # GPU time of every kernel, graph nodes one by one (Nsight Compute; clocks left alone, as
    # METHOD.md asks); benchmarks/kernel_profile.py sums it by category. ncu_pt_* is PyTorch.
    ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
    [[ $name == ncu_pt_* ]] && bin=$FTB_PYTORCH_BIN
    mkdir -p "$out/ncu"
    # NCU_ARGS adds ncu options, e.g. "--launch-skip 20000 --launch-count 8000" to pass over the
    # random initialisation (about 10,000 kernels in the PyTorch binary at phi-3-mini scale).
    timeout -s INT "${VARIANT_TIMEOUT:-240}" env "${envs[@]}" "$ncu" --clock-control none --graph-profiling node \
      --metrics gpu__time_duration.sum --csv --page raw --log-file "$out/ncu/$name.csv" ${NCU_ARGS:-} \
      "$bin" "${words[@]}" --quiet --output-dir "$out/runs/$name" >>"$out/log.txt" 2>&1
    echo "exit $?" | tee -a "$out/log.txt"
    steps=$(python3 -c "import json,sys;print(json.load(open(sys.argv[1]))['metrics']['steps'])" "$out/runs/$name/benchmark_summary.json" 2>/dev/null || echo 1)
    python3 benchmarks/kernel_profile.py "$steps" "$out/ncu/$name.csv" | tee -a "$out/log.txt" "$out/ncu/$name.txt"
    continue
  fi
  if [[ $name == stacks_* ]]; then
    # Host-side samples of the MLX binary's main thread (benchmarks/host_stacks.sh).
    timeout -s INT "${VARIANT_TIMEOUT:-240}" bash benchmarks/host_stacks.sh "$name" "$bin" "$out/stacks/$name" \
      "${envs[@]}" -- "${words[@]}" | tee -a "$out/log.txt"
    continue
  fi
  # --foreground: the signal to the binary alone (without it coreutils' timeout sends it to the
  # process and again to its process group, which binaries before 2026-12-06 took for a second
  # Ctrl-C and ended without a summary); -k: KILL a minute later if the step never ends.
  timeout --foreground -k 60 -s INT "${VARIANT_TIMEOUT:-240}" env "${envs[@]}" "$bin" "${words[@]}" --quiet --output-dir "$out/runs/$name" >>"$out/log.txt" 2>&1
  echo "exit $?" | tee -a "$out/log.txt"
  tar czf "$out/results.tar.gz" -C "$out" runs log.txt machine.txt # partial results survive a cut-off call
  tail -2 "$out/log.txt"
done
# COMPARE="a b; c d": one report per group, in $out/report/<first>-<second>/.
if [[ -n ${COMPARE:-} ]]; then
  IFS=';' read -ra groups <<<"$COMPARE"
  for g in "${groups[@]}"; do
    args=(); read -ra names <<<"$g"
    for n in "${names[@]}"; do args+=("$out/runs/$n/benchmark_summary.json"); done
    dir="$out/report/$(IFS=-; echo "${names[*]}")"
    .device/compare "${args[@]}" --output-dir "$dir" >>"$out/log.txt" 2>&1 && echo "report: $dir"
  done
fi
python3 benchmarks/summary_table.py "$out/runs" | tee "$out/table.txt"
tar czf "$out/results.tar.gz" -C "$out" runs log.txt machine.txt table.txt $( [[ -d $out/report ]] && echo report) $( [[ -d $out/stacks ]] && echo stacks) $( [[ -d $out/ncu ]] && echo ncu)
rm -rf "$out/runs" "$out/report" "$out/stacks" "$out/ncu" # only a few files come back: everything is in the tarball
