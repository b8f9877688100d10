#!/usr/bin/env bash
# The demo: both binaries fine-tune the tiny Phi-3-shaped model on the CPU on the same synthetic
# workload, then the comparison report puts them side by side. Output: demo-output/.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
bash scripts/setup.sh
export LIBTORCH_USE_PYTORCH=1
out="${DEMO_OUTPUT:-$repo/demo-output}"
mkdir -p "$out"
echo "demo: building (release; the first build takes several minutes on 2 cores)"
cargo build --release -q -p windows_pytorch_benchmark -p macos_mlx_benchmark -p shared --bin compare
target="${CARGO_TARGET_DIR:-$repo/target}/release"
echo "demo: PyTorch (tch) on the CPU, tiny preset"
"$target/windows_pytorch_benchmark" --preset tiny --device cpu --output-dir "$out/pytorch"
echo "demo: MLX (mlx-rs) on the CPU, tiny preset"
"$target/macos_mlx_benchmark" --preset tiny --device cpu --output-dir "$out/mlx"
echo "demo: comparison report"
"$target/compare" "$out/pytorch/benchmark_summary.json" "$out/mlx/benchmark_summary.json" --output-dir "$out"
echo "demo: done. Summaries: $out/pytorch/benchmark_summary.json, $out/mlx/benchmark_summary.json; report: $out/report.md, $out/report.html"
