#!/usr/bin/env python3
"""One line per run folder under ROOT (ROOT/NAME/benchmark_summary.json): the figures a device call
needs to compare variants; the device scripts (h200.sh, mlx_gpu.sh) print it last. Reads summary
schemas 1 and 2. Usage: summary_table.py ROOT"""
import json
import os
import sys

root = sys.argv[1]
cols = ("variant", "status", "steps", "in tok/s", "loss tok/s", "samp/s", "e2e in/s", "step med s",
        "MFU%", "alloc GiB", "proc GiB", "est err%", "load s", "total s", "loss", "util%", "W", "J/1k")
widths = (24, 11, 6, 10, 11, 8, 10, 11, 7, 10, 9, 9, 8, 9, 8, 7, 6, 7)


def row(values):
    return "".join(f"{str(v):<{w}}" if i < 2 else f"{str(v):>{w}}"
                   for i, (v, w) in enumerate(zip(values, widths)))


def f(v, d=0):
    return "n/a" if v is None else f"{v:.{d}f}"


print(row(cols))
for name in sorted(os.listdir(root)):
    p = os.path.join(root, name, "benchmark_summary.json")
    if not os.path.exists(p):
        print(f"{name:<24}no summary")
        continue
    s = json.load(open(p))
    m = s["metrics"]
    det = s.get("backend", {}).get("details", {})
    prof = det.get("profile_by_phase_total_s")
    if prof:
        print("   profile: " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(prof.items())))
    st = m.get("step_time_s") or {}
    tel = m.get("telemetry") or {}
    mem = m.get("memory") or {}
    # Schema 2: the framework's allocated peak and the driver's process figure; schema 1 had one
    # peak_memory_gib (NVML's process figure on CUDA).
    proc = mem.get("device_process_peak_gib", m.get("peak_memory_gib"))
    err = mem.get("estimate_error")
    dev = next((d for d in tel.get("devices", []) if d.get("counted_in_energy")), {})
    util = (dev.get("utilization_percent") or {}).get("mean")
    mfu = m.get("mfu")
    print(row((name, s["status"], m["steps"], f(m.get("input_tokens_per_s")),
               f(m.get("tokens_per_s")), f(m.get("samples_per_s"), 2),
               f(m.get("end_to_end_input_tokens_per_s")), f(st.get("median"), 3),
               f(None if mfu is None else 100 * mfu, 1),
               f(mem.get("device_peak_allocated_gib"), 1), f(proc, 1),
               f(None if err is None else 100 * err, 1), f(m.get("load_s"), 1),
               f(m.get("total_s"), 1), f(m.get("final_loss"), 3), f(util),
               f(dev.get("power_w_mean")), f(tel.get("joules_per_1k_tokens"), 1))))
    msg = (s.get("error") or {}).get("message")
    if msg:
        print(f"   error: {msg[:300]}")
    if "load_breakdown_s" in det:
        kc = det.get("mlx_cuda_kernel_cache")
        kernels = "" if kc is None else f"  kernel cache at start: {kc.get('files_at_start')} files"
        print(f"   load: {det['load_breakdown_s']}{kernels}  tuning: {det.get('tuning')}")
