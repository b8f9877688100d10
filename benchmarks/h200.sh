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
  timeout -s INT "${VARIANT_TIMEOUT:-240}" env FTB_PROFILE=$prof "${envs[@]}" "$bin" "${words[@]}" --quiet --output-dir "$out/runs/$name" >>"$out/log.txt" 2>&1
  echo "exit $?" | tee -a "$out/log.txt"
  tar czf "$out/results.tar.gz" -C "$out" runs log.txt machine.txt  # partial results survive a cut-off call
  tail -2 "$out/log.txt"
done
python3 - "$out/runs" <<'PY' | tee "$out/table.txt"
import json, os, sys
root = sys.argv[1]
print(f"{'variant':<22}{'status':<11}{'steps':>6}{'in tok/s':>10}{'loss tok/s':>11}{'samp/s':>8}{'e2e in/s':>10}{'step med s':>11}{'MFU%':>7}{'alloc GiB':>10}{'proc GiB':>9}{'est err%':>9}{'total s':>9}{'loss':>8}{'util%':>7}{'W':>6}{'J/1k':>7}")
for name in sorted(os.listdir(root)):
    p = os.path.join(root, name, "benchmark_summary.json")
    if not os.path.exists(p):
        print(f"{name:<22}no summary"); continue
    s = json.load(open(p)); m = s["metrics"]
    f = lambda v, d=0: "n/a" if v is None else f"{v:.{d}f}"
    st = m.get("step_time_s") or {}
    prof = s["backend"]["details"].get("profile_by_phase_total_s")
    if prof: print("   profile: " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(prof.items())))
    tel = m.get("telemetry") or {}
    mem = m.get("memory") or {}
    # Schema 2: allocated (framework) and process (NVML) peaks; schema 1 had NVML's alone.
    proc = mem.get("device_process_peak_gib", m.get("peak_memory_gib"))
    err = mem.get("estimate_error")
    dev = next((d for d in tel.get("devices", []) if d.get("counted_in_energy")), {})
    util = (dev.get("utilization_percent") or {}).get("mean")
    print(f"{name:<22}{s['status']:<11}{m['steps']:>6}{f(m['input_tokens_per_s']):>10}{f(m['tokens_per_s']):>11}{f(m['samples_per_s'],2):>8}{f(m['end_to_end_input_tokens_per_s']):>10}{f(st.get('median'),3):>11}{f(None if m['mfu'] is None else 100*m['mfu'],1):>7}{f(mem.get('device_peak_allocated_gib'),1):>10}{f(proc,1):>9}{f(None if err is None else 100*err,1):>9}{f(m['total_s'],1):>9}{f(m['final_loss'],3):>8}{f(util):>7}{f(dev.get('power_w_mean')):>6}{f(tel.get('joules_per_1k_tokens'),1):>7}")
PY
tar czf "$out/results.tar.gz" -C "$out" runs log.txt machine.txt table.txt
rm -rf "$out/runs"  # only a few files come back: everything is in the tarball
