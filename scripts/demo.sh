#!/usr/bin/env bash
# The demo: both binaries fine-tune the tiny Phi-3-shaped model on the CPU on the same synthetic
# workload, then the comparison report puts them side by side. Output: demo-output/ (or $DEMO_OUTPUT).
#
# The binaries run are the ones this build produced: their paths come from the `executable` field of
# cargo's JSON messages, never from a guessed target/release path (where a leftover binary of an
# earlier commit could stand in for one that failed to build).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
bash scripts/setup.sh
export LIBTORCH_USE_PYTORCH=1
out="${DEMO_OUTPUT:-$repo/demo-output}"
mkdir -p "$out"
echo "demo: building (release; the first build takes about a quarter of an hour on 2 cores)"
# `--bins` per package: a `--bin NAME` filter would apply to every selected package.
bins="$(cargo build --release --message-format=json-render-diagnostics \
  -p windows_pytorch_benchmark -p macos_mlx_benchmark -p shared --bins | python3 scripts/cargo-bins.py)"
bin() {
  local p
  p="$(sed -n "s/^$1=//p" <<<"$bins")"
  if [[ -z "$p" || ! -x "$p" ]]; then
    echo "demo: error: this build produced no '$1' binary (cargo reported: ${bins//$'\n'/, })" >&2
    exit 1
  fi
  echo "$p"
}
pytorch="$(bin windows_pytorch_benchmark)"
mlx="$(bin macos_mlx_benchmark)"
compare="$(bin compare)"
echo "demo: PyTorch (tch) on the CPU, tiny preset"
"$pytorch" --preset tiny --device cpu --output-dir "$out/pytorch"
echo "demo: MLX (mlx-rs) on the CPU, tiny preset"
"$mlx" --preset tiny --device cpu --output-dir "$out/mlx"
echo "demo: comparison report"
"$compare" "$out/pytorch/benchmark_summary.json" "$out/mlx/benchmark_summary.json" --output-dir "$out"
echo "demo: done. Summaries: $out/pytorch/benchmark_summary.json, $out/mlx/benchmark_summary.json; report: $out/report.md, $out/report.html"
