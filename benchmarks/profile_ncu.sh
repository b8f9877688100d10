#!/usr/bin/env bash
# Kernel-level profile of the PyTorch binary's steady steps with Nsight Compute (device machine).
# Each kernel is timed in isolation (gpu__time_duration); summing by kernel name shows where GPU
# time goes, and the gap to the measured step time is launch/synchronisation overhead.
# Usage: bash benchmarks/profile_ncu.sh "FLAGS" [SKIP] [COUNT]
set -uo pipefail
export LD_LIBRARY_PATH=$(python3 -c "import torch,os;print(os.path.dirname(torch.__file__)+'/lib')"):${LD_LIBRARY_PATH:-} TORCH_CPP_LOG_LEVEL=ERROR
out=${OUT:-/tmp/out}
ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
flags=$1; skip=${2:-4000}; count=${3:-2500}
# shellcheck disable=SC2086
timeout 240 "$ncu" --clock-control none --launch-skip "$skip" --launch-count "$count" --metrics gpu__time_duration.sum --csv \
  --log-file "$out/ncu.csv" .device/windows_pytorch_benchmark $flags --quiet --output-dir /tmp/ncu-run >"$out/ncu-run.log" 2>&1
echo "ncu exit $?"
python3 - "$out/ncu.csv" <<'PY' | tee "$out/ncu-summary.txt"
import csv, sys, collections, re
rows = [r for r in csv.DictReader(l for l in open(sys.argv[1]) if l.startswith('"'))]
tot = collections.Counter(); n = collections.Counter()
for r in rows:
    if r.get("Metric Name") != "gpu__time_duration.sum": continue
    v = float(r["Metric Value"].replace(",", "")); unit = r.get("Metric Unit", "ns")
    v *= {"ns": 1e-9, "us": 1e-6, "usecond": 1e-6, "ms": 1e-3, "msecond": 1e-3, "nsecond": 1e-9}.get(unit, 1e-9)
    name = re.sub(r"<.*", "", r["Kernel Name"])[:70]
    tot[name] += v; n[name] += 1
s = sum(tot.values())
print(f"kernels profiled: {sum(n.values())}, GPU time {s*1e3:.1f} ms")
for k, v in tot.most_common(25):
    print(f"{100*v/s:6.1f} %  {v*1e3:9.2f} ms  {n[k]:6d}x  {k}")
PY
