#!/usr/bin/env bash
# Data parallelism on a lent multi-GPU machine, in one call (repo root, binary in .device/):
#   bash benchmarks/multigpu.sh
# 1. equivalence: the tiny model in fp32 at 1, 2 and 4 ranks, same global batches: per-step losses;
# 2. scaling: phi-3-mini last-n at 1, 2 and 4 GPUs, and a compare report with the scaling table;
# 3. failure handling: a rank that exits and a rank that hangs (FTB_FAULT, --dist-timeout 20).
# Everything goes into $OUT/results.tar.gz; a short table is printed last.
set -uo pipefail
torch=$(python3 -c "import torch,os;print(os.path.dirname(torch.__file__))")
export LD_LIBRARY_PATH=$torch/lib:${LD_LIBRARY_PATH:-} TORCH_CPP_LOG_LEVEL=ERROR
bin=${BIN:-.device/windows_pytorch_benchmark}
out=${OUT:-/tmp/out}
mkdir -p "$out/runs"
{ date -u; nvidia-smi --query-gpu=index,name,driver_version,memory.total,power.limit --format=csv; nvidia-smi topo -m; python3 -c "import torch;print('torch', torch.__version__, 'nccl', torch.cuda.nccl.version())"; } > "$out/machine.txt" 2>&1
ngpu=$(nvidia-smi -L | wc -l)
run() { # NAME [ENV=VAL ...] -- FLAGS...
  local name=$1; shift; local envs=()
  while [[ $1 != -- ]]; do envs+=("$1"); shift; done; shift
  echo "=== $name: ${envs[*]} $*" | tee -a "$out/log.txt"
  local t0=$SECONDS
  timeout -s INT "${VARIANT_TIMEOUT:-240}" env "${envs[@]}" "$bin" "$@" --quiet --output-dir "$out/runs/$name" >>"$out/log.txt" 2>&1
  echo "exit $? after $((SECONDS - t0)) s" | tee -a "$out/log.txt"
  tar czf "$out/results.tar.gz" -C "$out" runs log.txt machine.txt
}
T="--preset tiny --device cuda --dtype float32 --samples 128 --micro-batch-size 4 --grad-accum 4"
B="--weights random --dataset synthetic --samples 2048 --device cuda"
for n in 1 2 4; do ((n <= ngpu)) && run "tiny_np$n" X=1 -- $T --nproc $n; done
for n in 1 2 4; do ((n <= ngpu)) && run "lastn_np$n" X=1 -- $B --nproc $n; done
# The same with 256 records per optimizer step (4x the work per rank between all-reduces).
B256="--weights random --dataset synthetic --samples 4096 --grad-accum 32 --device cuda"
for n in 1 2 4; do ((n <= ngpu)) && run "lastn256_np$n" X=1 -- $B256 --nproc $n; done
run fault_exit FTB_FAULT=1:3:exit -- $T --nproc 2 --dist-timeout 20
run fault_hang FTB_FAULT=1:3:hang -- $T --nproc 2 --dist-timeout 20
if [[ -x .device/compare ]]; then
  .device/compare "$out"/runs/lastn_np*/benchmark_summary.json "$out"/runs/lastn256_np*/benchmark_summary.json --output-dir "$out/report" >>"$out/log.txt" 2>&1
  grep -A8 "## Scaling" "$out/report/report.md" | tee "$out/scaling.md"
fi
python3 - "$out/runs" <<'PY' | tee "$out/table.txt"
import json, os, sys
root = sys.argv[1]
def load(name):
    p = os.path.join(root, name, "benchmark_summary.json")
    return json.load(open(p)) if os.path.exists(p) else None
def losses(name):
    s = load(name)
    if not s: return None
    d = os.path.join(root, name, s["run"]["run_dir"], "steps.jsonl")
    return [json.loads(l)["loss"] for l in open(d)]
base = losses("tiny_np1")
for n in (2, 4):
    l = losses(f"tiny_np{n}")
    if base and l:
        rel = max(abs(a - b) / abs(a) for a, b in zip(base, l))
        print(f"tiny fp32 world {n} vs 1: {len(l)} steps, max relative loss difference {rel:.2e} (first losses {base[0]:.6f} / {l[0]:.6f})")
for pre in ("lastn", "lastn256"):
  one = load(f"{pre}_np1")
  for n in (1, 2, 4):
    s = load(f"{pre}_np{n}")
    if not s: print(f"{pre}_np{n}: no summary"); continue
    m = s["metrics"]; t = m["input_tokens_per_s"] or 0
    eff = t / (n * one["metrics"]["input_tokens_per_s"]) if one and s["workload"]["hash"] == one["workload"]["hash"] else float("nan")
    # Schema 2: per-rank lists of each memory figure; schema 1: NVML's per rank.
    dist = s["backend"]["details"].get("distributed", {})
    per = dist.get("memory_gib_per_rank") or dist.get("peak_memory_gib_per_rank")
    mem = m.get("memory", {})
    peak = f"allocated {mem.get('device_peak_allocated_gib')}, process {mem.get('device_process_peak_gib')}" if "device_process_peak_gib" in mem else m.get("peak_memory_gib")
    print(f"{pre} world {s['backend']['world_size']}: {s['status']}, {t:,.0f} input tok/s ({t/n:,.0f} per GPU), efficiency {100*eff:.1f} %, step median {m['step_time_s']['median']:.3f} s, peak GiB {peak} per rank {per}, hash {s['workload']['hash'][:12]}")
for f in ("fault_exit", "fault_hang"):
    s = load(f)
    print(f"{f}: " + ("no summary" if not s else f"{s['status']}, steps {s['metrics']['steps']}: {s['error']['message'] if s['error'] else ''}"))
PY
tar czf "$out/results.tar.gz" -C "$out" runs log.txt machine.txt table.txt $( [[ -d $out/report ]] && echo report )
rm -rf "$out/runs" "$out/report"
