#!/usr/bin/env python3
"""GPU time by kernel category from Nsight Compute CSV logs (benchmarks/mlx_gpu.sh, variants named
ncu_*: `ncu --csv --page raw --metrics gpu__time_duration.sum`, every kernel of the run, graph
nodes one by one). Usage: kernel_profile.py STEPS LOG.csv [LOG.csv ...]. Kernels that make the
initial weights (random init) are shown apart; the rest is divided by STEPS (the run's optimizer
steps) to give GPU time per step."""
import csv, collections, re, sys

CATEGORIES = [
    # The PyTorch binary's counter-based initialisation is integer element-wise work (xor, shifts,
    # 64-bit multiplies) and fp64 Box-Muller: put apart with the MLX binary's init kernel.
    ("load (init, fill)", r"ftb_init|init_values|philox|normal_|uniform_|fill|random|rng|bitwisexor|rshift_kernel|bitwiseand|functor<long|functor<double|functoronself_add<long|arange"),
    ("attention", r"fmha|flash|sdpa|attention|attn|cudnn_generated|cudnn"),
    ("matmul", r"gemm|cutlass|xmma|cublas|nvjet|sm90_|sm80_|gemv|matmul"),
    ("gather / scatter / copy", r"gather|scatter|index|copy|take|concat|slice|cat_|masked"),
    ("norm / softmax / reduce", r"reduce|rms|norm|softmax|sum|logsumexp|cross_entropy|nll"),
    ("AdamW", r"adam|ftb_adamw|multi_tensor|foreach"),
    ("element-wise", r"elementwise|binary|unary|ternary|vectorized|kernel|compiled|silu|mul|add"),
]


def category(name):
    low = name.lower()
    for cat, pat in CATEGORIES:
        if re.search(pat, low):
            return cat
    return "other"


def read(path):
    rows = []
    with open(path, newline="") as f:
        lines = [l for l in f if l.startswith('"')]
    reader = csv.reader(lines)
    header = None
    for r in reader:
        if header is None:
            if "Kernel Name" in r:
                header = r
            continue
        d = dict(zip(header, r))
        t = d.get("gpu__time_duration.sum", "").replace(",", "")
        try:
            rows.append((d["Kernel Name"], float(t)))
        except ValueError:
            pass  # the units row
    return rows


def main():
    steps = float(sys.argv[1])
    for path in sys.argv[2:]:
        rows = read(path)
        unit = 1e-6  # ns -> ms
        by_cat = collections.Counter()
        by_name = collections.Counter()
        count = collections.Counter()
        for name, t in rows:
            c = category(name)
            by_cat[c] += t
            count[c] += 1
            if c != "load (init, fill)":
                by_name[name[:90]] += t
        load = by_cat.pop("load (init, fill)", 0.0)
        total = sum(by_cat.values())
        print(f"{path}: {len(rows)} kernels; GPU ms per step (of {steps:g} steps; load kernels "
              f"{load * unit:.1f} ms apart): {total * unit / steps:.1f}")
        for c, t in by_cat.most_common():
            print(f"  {c:26s} {t * unit / steps:8.1f} ms/step {t / total:6.1%}  ({count[c] / steps:.0f} kernels/step)")
        print("  top kernels:")
        for n, t in by_name.most_common(12):
            print(f"    {t * unit / steps:8.1f} ms/step  {n}")


if __name__ == "__main__":
    main()
