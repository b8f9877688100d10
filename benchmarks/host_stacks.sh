#!/usr/bin/env bash
# Where the MLX binary's host thread spends a step, on the device machine (no perf or gdb there;
# cuda-gdb attaches to a running program): runs the binary in the background and, once it is
# past loading and warm-up, samples its main thread: every 20 ms its state and system call
# (/proc/PID/syscall: blocked in the driver's ioctl, waiting on a futex, or running), and a few
# full stacks through cuda-gdb. Called by benchmarks/mlx_gpu.sh for a variant named stacks_*
# (environment already set there). Usage: host_stacks.sh NAME BIN OUTDIR ENV... -- ARGS...
set -uo pipefail
name=$1 bin=$2 dir=$3; shift 3
envs=(); while (($#)) && [[ $1 != -- ]]; do envs+=("$1"); shift; done; shift
mkdir -p "$dir"
env "${envs[@]}" "$bin" "$@" --quiet --output-dir "$dir/run" >"$dir/log.txt" 2>&1 &
pid=$!
sleep "${STACKS_WAIT:-14}"
gdb=$(command -v cuda-gdb || ls /usr/local/cuda*/bin/cuda-gdb 2>/dev/null | head -1)
for i in $(seq 1 "${STACKS_PROC:-300}"); do
  kill -0 $pid 2>/dev/null || break
  printf '%s %s\n' "$(awk '{print $3}' /proc/$pid/task/$pid/stat 2>/dev/null)" \
    "$(awk '{print $1}' /proc/$pid/task/$pid/syscall 2>/dev/null)" >>"$dir/proc.txt"
  sleep 0.02
done
if [[ -n $gdb ]]; then
  for i in $(seq 1 "${STACKS_GDB:-6}"); do
    kill -0 $pid 2>/dev/null || break
    timeout 40 "$gdb" -p $pid -batch -nx -ex 'set pagination off' -ex 'thread 1' -ex 'bt 40' \
      >>"$dir/stacks.txt" 2>&1
    echo "=== end of sample $i" >>"$dir/stacks.txt"
  done
else
  echo "no cuda-gdb" >"$dir/stacks.txt"
fi
wait $pid
echo "exit $?" >>"$dir/log.txt"
python3 - "$dir" <<'PY'
import collections, re, sys
d = sys.argv[1]
states = collections.Counter()
try:
    for line in open(f"{d}/proc.txt"):
        p = line.split()
        if len(p) == 2:
            # syscall 16 = ioctl (the NVIDIA driver), 202 = futex, 'running' = user code.
            states[(p[0], {"16": "ioctl", "202": "futex", "running": "-"}.get(p[1], p[1]))] += 1
except FileNotFoundError:
    pass
n = sum(states.values()) or 1
print(f"main thread, {n} samples (state, syscall):", ", ".join(f"{s}/{c}: {k/n:.0%}" for (s, c), k in states.most_common(8)))
funcs = collections.Counter(); samples = 0; seen = set()
try:
    for line in open(f"{d}/stacks.txt"):
        if line.startswith("=== end"):
            samples += 1; seen = set(); continue
        m = re.match(r"#\d+\s+(?:0x[0-9a-f]+ in )?([^ (]+)", line)
        if m and m.group(1) not in seen:
            seen.add(m.group(1)); funcs[m.group(1)] += 1
except FileNotFoundError:
    pass
print(f"stacks: {samples} samples; functions on the main thread's stack in most samples:")
for f, k in funcs.most_common(25):
    print(f"  {k:3d}  {f[:150]}")
PY
