#!/usr/bin/env bash
# Installs what building and testing the benchmark needs on a fresh Debian/Ubuntu machine (or a
# Mac), quickly on re-runs: Debian packages, PyTorch 2.11.0 from PyPI (whose libtorch tch 0.24
# links against), and on Linux the prebuilt-MLX build step for mlx-rs.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

if [[ "$(uname -s)" == "Linux" ]] && command -v apt-get >/dev/null; then
  # cmake, libclang-dev: mlx-sys's build (mlx-c, bindgen); libopenblas-dev: MLX's CPU BLAS;
  # g++: MLX compiles fused kernels at run time; chromium: the HTML report test.
  need=()
  for p in cmake libclang-dev libopenblas-dev g++ pkg-config chromium; do
    dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
  done
  if ((${#need[@]})); then
    sudo_cmd=""; [[ $(id -u) -ne 0 ]] && sudo_cmd="sudo"
    echo "setup: installing Debian packages: ${need[*]}"
    $sudo_cmd apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${need[@]}" >/dev/null
  fi
fi

py="${PYTHON:-python3}"
if ! "$py" -c 'import torch, sys; sys.exit(0 if torch.__version__.startswith("2.11.0") else 1)' 2>/dev/null; then
  echo "setup: installing torch==2.11.0 from PyPI (libtorch for tch 0.24; about 3 GB with its CUDA libraries)"
  "$py" -m pip install -q torch==2.11.0
fi
export LIBTORCH_USE_PYTORCH=1

# mlx-rs on Linux: prebuilt MLX (PyPI mlx-cpu) + an adapted mlx-sys, patched in through the
# generated, git-ignored .cargo/config.toml. Does nothing on macOS.
bash "$repo/scripts/setup-mlx-linux.sh"
