#!/usr/bin/env bash
# Packs what a device call needs into .device/ (git-ignored; name it in the call's `carry`):
# the three release binaries and the GPU test binaries, stripped and xz-compressed, and MLX's CUDA
# libmlx (../shared/tools/mlx-cuda-pack.sh, once). benchmarks/device_unpack.sh undoes it there.
# Usage: bash benchmarks/pack_device.sh   (after a release build with the same CARGO_TARGET_DIR)
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
export LIBTORCH_USE_PYTORCH=1
mkdir -p .device/xz
[[ -f .device/mlxpack/libmlx.so.xz ]] || bash ../shared/tools/mlx-cuda-pack.sh .device/mlxpack 0.32.2 90
# MLX's Python binding for the device's Python 3.12 (0.7 MB), for benchmarks/repro/run_gpu.sh.
ls .device/mlxpy/mlx-0.32.2-cp312-*.whl >/dev/null 2>&1 || python3 -m pip download -q --no-deps \
  --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_35_x86_64 \
  -d .device/mlxpy mlx==0.32.2
bins="$(cargo build --release --message-format=json-render-diagnostics \
  -p windows_pytorch_benchmark -p macos_mlx_benchmark -p shared --bins | python3 scripts/cargo-bins.py)"
# Test binaries that run on the GPU: the parity test and the MLX binary's unit tests (device init).
tests="$(cargo test --release --no-run --message-format=json-render-diagnostics \
  -p macos_mlx_benchmark | python3 -c '
import json, sys
for line in sys.stdin:
    if not line.startswith("{"): continue
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m.get("profile", {}).get("test"):
        name = m["target"]["name"]
        if name in ("parity", "macos_mlx_benchmark"):
            print(name + "=" + m["executable"])
')"
rm -f .device/xz/*
while IFS='=' read -r name path; do
  [[ $name == shared ]] && continue
  strip -o ".device/xz/$name" "$path"
done <<<"$bins"
while IFS='=' read -r name path; do
  strip -o ".device/xz/test-$name" "$path"
done <<<"$tests"
git rev-parse HEAD >.device/xz/COMMIT
git status --short >.device/xz/DIRTY
(cd .device/xz && for f in *; do [[ $f == COMMIT || $f == DIRTY ]] || xz -T2 -6 -f "$f"; done)
du -sh .device/xz .device/mlxpack .device/mlxpy
ls -l .device/xz
