#!/usr/bin/env bash
# The test suite: set-up, formatting, lints, then every test of the workspace (release mode: the
# end-to-end tests run the real binaries). Fails when a test fails or when no test ran.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
bash scripts/setup.sh
export LIBTORCH_USE_PYTORCH=1
cargo fmt --all -- --check
cargo clippy -q --workspace --all-targets --release -- -D warnings
# The macOS code paths, type-checked here without a Mac: `cfg(macos)` is what each crate's build.rs
# sets on macOS (rustc refuses `--cfg target_os`). The MLX binary's Metal build is the one this
# benchmark exists for, and it cannot be built on Linux.
cargo rustc -q --profile check -p shared --lib -- --cfg macos -D warnings
cargo rustc -q --profile check -p macos_mlx_benchmark --bin macos_mlx_benchmark -- --cfg macos -D warnings
cargo rustc -q --profile check -p macos_mlx_benchmark --bin macos_mlx_benchmark -- --cfg macos -D warnings --test
# Build every binary first: the parity test runs both benchmark binaries. It is handed the PyTorch
# binary this build produced (cargo's `executable`), never a leftover in the target folder.
bins="$(cargo build --release --message-format=json-render-diagnostics --workspace --bins | python3 scripts/cargo-bins.py)"
FTB_PYTORCH_BIN="$(sed -n 's/^windows_pytorch_benchmark=//p' <<<"$bins")"
[[ -x "$FTB_PYTORCH_BIN" ]] || { echo "error: the build produced no windows_pytorch_benchmark binary" >&2; exit 1; }
export FTB_PYTORCH_BIN
log="$(mktemp)"
set +e
cargo test --release --workspace 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
count() { awk -v w="$1;" '/^test result:/ { for (i = 2; i <= NF; i++) if ($i == w) s += $(i - 1) } END { print s + 0 }' "$log"; }
passed=$(count passed)
failed=$(count failed)
rm -f "$log"
echo "tests: ${passed:-0} passed, ${failed:-0} failed"
if [[ $status -ne 0 ]]; then exit "$status"; fi
if [[ "${passed:-0}" -eq 0 ]]; then echo "error: no test ran" >&2; exit 1; fi
