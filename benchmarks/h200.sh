#!/usr/bin/env bash
# Runs benchmark variants of the PyTorch binary on the lent GPU machine in one call and prints a
# short table last. Usage (from the repo root on the device machine, binary carried in .device/):
#   bash benchmarks/h200.sh NAME1 "FLAGS1" NAME2 "FLAGS2" ...
# FLAGS may start with environment assignments (e.g. "FTB_ATTENTION=sdpa --strategy full").
# Test binaries carried in .device/tests/ run first (GPU-only tests skip on CPU machines).
# Every run writes under $OUT/runs/<NAME>; all of it is packed into $OUT/results.tar.gz.
# Telemetry (utilization, power, energy) is on by default; to measure its cost run the same flags
# twice, e.g.  lastn "FLAGS"  lastn_notel "FLAGS --telemetry-interval-ms 0".
set -uo pipefail
export LD_LIBRARY_PATH=$(python3 -c "import torch,os;print(os.path.dirname(torch.__file__)+'/lib')"):${LD_LIBRARY_PATH:-} TORCH_CPP_LOG_LEVEL=ERROR
bin=${BIN:-.device/windows_pytorch_benchmark}
out=${OUT:-/tmp/out}
mkdir -p "$out/runs"
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv; python3 -c "import torch;print('torch', torch.__version__)"; } | tee "$out/machine.txt"
for t in .device/tests/*; do
  [[ -x $t ]] || continue
  echo "=== test $t" | tee -a "$out/log.txt"
  "$t" --nocapture --test-threads 1 >>"$out/log.txt" 2>&1
  echo "exit $?" | tee -a "$out/log.txt"
  grep -E "^test result|^.*(packed=|skipped)" "$out/log.txt" | tail -6
done
while (($# >= 2)); do
  name=$1; flags=$2; shift 2
  echo "=== $name: $flags" | tee -a "$out/log.txt"
  # A variant whose name ends in _prof runs with FTB_PROFILE=1 (phase timings, synchronised).
  prof=""; [[ $name == *_prof ]] && prof=1
  envs=(); read -ra words <<<"$flags"
  while ((${#words[@]})) && [[ ${words[0]} =~ ^[A-Z_][A-Z0-9_]*= ]]; do envs+=("${words[0]}"); words=("${words[@]:1}"); done
  timeout --foreground -k 60 -s INT "${VARIANT_TIMEOUT:-240}" env FTB_PROFILE=$prof "${envs[@]}" "$bin" "${words[@]}" --quiet --output-dir "$out/runs/$name" >>"$out/log.txt" 2>&1
  echo "exit $?" | tee -a "$out/log.txt"
  tar czf "$out/results.tar.gz" -C "$out" runs log.txt machine.txt  # partial results survive a cut-off call
  tail -2 "$out/log.txt"
done
python3 benchmarks/summary_table.py "$out/runs" | tee "$out/table.txt"
tar czf "$out/results.tar.gz" -C "$out" runs log.txt machine.txt table.txt
rm -rf "$out/runs"  # only a few files come back: everything is in the tarball
