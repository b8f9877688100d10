#!/usr/bin/env bash
# Linux-only build step for mlx-rs 0.33 (mlx-sys 0.7.0). See scripts/MLX-LINUX.md.
#
# mlx-sys 0.7.0 does not build on Linux as published (it downloads MLX from GitHub at build
# time, links macOS libraries, needs <format>, and lacks half-precision types on x86-64). This
# script prepares, under a work dir in the target directory:
#   mlx-cpu-0.32.2/   the prebuilt MLX from PyPI's mlx-cpu wheel (libmlx.so, headers, CMake files),
#                     with its bundled reference BLAS/LAPACK pointed at the system OpenBLAS
#   mlx-sys-0.7.0/    a copy of mlx-sys from the cargo registry with our Linux build edits
# and writes <repo>/.cargo/config.toml (generated, never commit it) so that cargo uses that copy.
# It does nothing on macOS. Re-running is cheap: finished steps are skipped.
#
# Environment:
#   MLX_LINUX_DIR     work dir (default: $CARGO_TARGET_DIR/mlx-linux, else <repo>/target/mlx-linux)
#   MLX_LINUX_BLAS    "openblas" (default; falls back to "bundled" when no libopenblas.so.0 is found)
#                     or "bundled" (keep the wheel's reference BLAS/LAPACK; slower)
#   MLX_LINUX_BACKEND "cpu" (default) or "cuda": which MLX the binary loads at run time. "cuda" also
#                     downloads PyPI's mlx-cuda-13 of the same version (MLX's CUDA backend, for a
#                     Linux machine with an NVIDIA GPU) and points the binary's rpath at its
#                     libmlx.so. mlx-c is still built against the CPU wheel's headers (byte-identical
#                     in both wheels; the CUDA wheel's CMake files demand a CUDA toolkit) and linked
#                     against the CPU libmlx.so, whose SONAME and ABI the CUDA one shares.
#   PYTHON            python used for `pip download` and unzipping (default: python3)
set -euo pipefail

if [[ "$(uname -s)" == "Darwin" ]]; then
  exit 0 # macOS builds mlx-rs as published.
fi
if [[ "$(uname -s)" != "Linux" ]]; then
  echo "setup-mlx-linux.sh: unsupported OS $(uname -s)" >&2
  exit 1
fi

MLX_VERSION=0.32.2
MLX_SYS_VERSION=0.7.0
PYTHON=${PYTHON:-python3}

log() { echo "setup-mlx-linux: $*" >&2; }
die() { echo "setup-mlx-linux: error: $*" >&2; exit 1; }

SCRIPT_PATH=$(realpath "${BASH_SOURCE[0]}")
REPO_ROOT=$(dirname "$(dirname "$SCRIPT_PATH")")
if [[ -n "${MLX_LINUX_DIR:-}" ]]; then
  WORK=$(realpath -m "$MLX_LINUX_DIR")
elif [[ -n "${CARGO_TARGET_DIR:-}" ]]; then
  WORK=$(realpath -m "$CARGO_TARGET_DIR/mlx-linux")
else
  WORK="$REPO_ROOT/target/mlx-linux"
fi
mkdir -p "$WORK"

ARCH=$(uname -m)
case "$ARCH" in
  x86_64 | aarch64) ;;
  *) die "no mlx-cpu wheel for $ARCH" ;;
esac

# ---------------------------------------------------------------------------------------------
# 1. MLX from PyPI's mlx-cpu wheel. It is tagged py3-none-manylinux_2_35_{x86_64,aarch64}, so the
#    python version does not matter; --platform only makes the choice explicit.
# ---------------------------------------------------------------------------------------------
WHEEL_DIR="$WORK/mlx-cpu-$MLX_VERSION"
if [[ ! -f "$WHEEL_DIR/.complete" ]]; then
  log "downloading mlx-cpu==$MLX_VERSION from PyPI"
  rm -rf "$WORK/download" "$WHEEL_DIR" "$WHEEL_DIR.tmp"
  mkdir -p "$WORK/download"
  "$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps \
    --only-binary=:all: --platform "manylinux_2_35_$ARCH" --python-version 3.11 \
    --dest "$WORK/download" "mlx-cpu==$MLX_VERSION"
  wheel=$(ls "$WORK"/download/mlx_cpu-"$MLX_VERSION"-*.whl 2>/dev/null | head -n 1 || true)
  [[ -n "$wheel" ]] || die "pip did not produce an mlx_cpu-$MLX_VERSION wheel"
  "$PYTHON" -m zipfile -e "$wheel" "$WHEEL_DIR.tmp"
  [[ -f "$WHEEL_DIR.tmp/mlx/lib/libmlx.so" && -d "$WHEEL_DIR.tmp/mlx/share/cmake/MLX" ]] ||
    die "unexpected wheel layout in $wheel"
  touch "$WHEEL_DIR.tmp/.complete"
  mv "$WHEEL_DIR.tmp" "$WHEEL_DIR"
  rm -rf "$WORK/download"
fi
MLX_LIB_DIR="$WHEEL_DIR/mlx/lib"

# ---------------------------------------------------------------------------------------------
# 1b. MLX_LINUX_BACKEND=cuda: the CUDA libmlx of the same version, loaded at run time. It needs,
#     beside it, the wheel's mlx/include (MLX compiles kernels with NVRTC at run time and looks for
#     its headers at <libdir>/../include) and mlx_cuda_13.libs (named by its RPATH); and on the
#     machine, the NVIDIA driver (libcuda.so.1) and CUDA 13's cuBLAS, cuFFT, NVRTC, cuDNN 9 and NCCL.
# ---------------------------------------------------------------------------------------------
BACKEND=${MLX_LINUX_BACKEND:-cpu}
RUNTIME_LIB_DIR="$MLX_LIB_DIR"
case "$BACKEND" in
  cpu) ;;
  cuda)
    [[ "$ARCH" == x86_64 ]] || die "MLX_LINUX_BACKEND=cuda: PyPI's mlx-cuda-13 is built for x86_64 only"
    CUDA_WHEEL_DIR="$WORK/mlx-cuda-13-$MLX_VERSION"
    if [[ ! -f "$CUDA_WHEEL_DIR/.complete" ]]; then
      log "downloading mlx-cuda-13==$MLX_VERSION from PyPI (MLX's CUDA backend, about 90 MB)"
      rm -rf "$WORK/download-cuda" "$CUDA_WHEEL_DIR" "$CUDA_WHEEL_DIR.tmp"
      mkdir -p "$WORK/download-cuda"
      "$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps \
        --only-binary=:all: --platform "manylinux_2_35_$ARCH" --python-version 3.12 \
        --implementation cp --dest "$WORK/download-cuda" "mlx-cuda-13==$MLX_VERSION"
      wheel=$(ls "$WORK"/download-cuda/mlx_cuda_13-"$MLX_VERSION"-*.whl 2>/dev/null | head -n 1 || true)
      [[ -n "$wheel" ]] || die "pip did not produce an mlx_cuda_13-$MLX_VERSION wheel"
      "$PYTHON" -m zipfile -e "$wheel" "$CUDA_WHEEL_DIR.tmp"
      [[ -f "$CUDA_WHEEL_DIR.tmp/mlx/lib/libmlx.so" && -d "$CUDA_WHEEL_DIR.tmp/mlx/include" ]] ||
        die "unexpected wheel layout in $wheel"
      touch "$CUDA_WHEEL_DIR.tmp/.complete"
      mv "$CUDA_WHEEL_DIR.tmp" "$CUDA_WHEEL_DIR"
      rm -rf "$WORK/download-cuda"
    fi
    RUNTIME_LIB_DIR="$CUDA_WHEEL_DIR/mlx/lib"
    if ! (/sbin/ldconfig -p 2>/dev/null || true) | grep -q 'libcuda\.so\.1 '; then
      log "warning: no NVIDIA driver (libcuda.so.1) on this machine: the binary builds, but starts only where the driver and CUDA 13's libraries are installed"
    fi
    ;;
  *) die "MLX_LINUX_BACKEND must be cpu or cuda, not '$BACKEND'" ;;
esac

# ---------------------------------------------------------------------------------------------
# 2. BLAS. libmlx.so needs libblas-<hash>.so / liblapack-<hash>.so (Netlib reference builds that
#    auditwheel grafted into mlx_cpu.libs/, found through libmlx's RPATH $ORIGIN/../../mlx_cpu.libs).
#    Their symbols are unversioned, so replacing those two files in our copy of the wheel with
#    symlinks to the system OpenBLAS (which exports the same cblas_* and LAPACK symbols) makes MLX
#    use OpenBLAS with no relinking and no LD_PRELOAD. The originals are kept as *.reference.
# ---------------------------------------------------------------------------------------------
find_openblas() {
  local p
  p=$( (/sbin/ldconfig -p 2>/dev/null || ldconfig -p 2>/dev/null || true) |
    awk '/libopenblas\.so\.0 / && tolower($0) ~ /'"${ARCH//_/.}"'/ { print $NF; exit }')
  if [[ -z "$p" ]]; then
    for p in "/usr/lib/$ARCH-linux-gnu/libopenblas.so.0" /usr/lib64/libopenblas.so.0 /usr/lib/libopenblas.so.0; do
      [[ -e "$p" ]] && break
      p=
    done
  fi
  echo "$p"
}
BLAS_MODE=${MLX_LINUX_BLAS:-openblas}
OPENBLAS=
if [[ "$BLAS_MODE" == openblas ]]; then
  OPENBLAS=$(find_openblas)
  if [[ -z "$OPENBLAS" ]]; then
    log "libopenblas.so.0 not found (apt install libopenblas-dev); keeping the wheel's slow reference BLAS"
    BLAS_MODE=bundled
  fi
elif [[ "$BLAS_MODE" != bundled ]]; then
  die "MLX_LINUX_BLAS must be openblas or bundled, not '$BLAS_MODE'"
fi
shopt -s nullglob
for lib in "$WHEEL_DIR"/mlx_cpu.libs/libblas-*.so* "$WHEEL_DIR"/mlx_cpu.libs/liblapack-*.so*; do
  [[ "$lib" == *.reference ]] && continue
  if [[ ! -e "$lib.reference" ]]; then
    [[ -L "$lib" ]] && die "$lib is a symlink without a saved original; delete $WHEEL_DIR and re-run"
    mv "$lib" "$lib.reference"
  fi
  if [[ "$BLAS_MODE" == openblas ]]; then
    [[ "$(readlink "$lib" 2>/dev/null)" == "$OPENBLAS" ]] || ln -sfn "$OPENBLAS" "$lib"
  else
    [[ "$(readlink "$lib" 2>/dev/null)" == "$(basename "$lib").reference" ]] ||
      ln -sfn "$(basename "$lib").reference" "$lib"
  fi
done
shopt -u nullglob

# ---------------------------------------------------------------------------------------------
# 3. mlx-sys 0.7.0 source, copied out of the cargo registry and edited for Linux.
# ---------------------------------------------------------------------------------------------
CARGO_HOME=${CARGO_HOME:-$HOME/.cargo}
find_registry_src() {
  local d
  for d in "$CARGO_HOME"/registry/src/*/mlx-sys-"$MLX_SYS_VERSION"; do
    [[ -f "$d/build.rs" && -f "$d/src/mlx-c/CMakeLists.txt" ]] && { echo "$d"; return; }
  done
}
find_registry_crate() {
  local f
  for f in "$CARGO_HOME"/registry/cache/*/mlx-sys-"$MLX_SYS_VERSION".crate; do
    [[ -f "$f" ]] && { echo "$f"; return; }
  done
}

SYS_DIR="$WORK/mlx-sys-$MLX_SYS_VERSION"
# The stamp changes whenever this script changes, so edits to the patch steps are re-applied.
STAMP="$(sha256sum "$SCRIPT_PATH" | cut -c1-16)"
if [[ "$(cat "$SYS_DIR/.mlx-linux-stamp" 2>/dev/null || true)" != "$STAMP" ]]; then
  src=$(find_registry_src || true)
  if [[ -z "$src" && -z "$(find_registry_crate || true)" ]]; then
    log "fetching mlx-sys $MLX_SYS_VERSION into the cargo registry"
    fetch="$WORK/fetch-mlx-sys"
    mkdir -p "$fetch/src"
    cat >"$fetch/Cargo.toml" <<EOF
[package]
name = "fetch-mlx-sys"
version = "0.0.0"
edition = "2021"
publish = false

[dependencies]
mlx-sys = { version = "=$MLX_SYS_VERSION", default-features = false }

[workspace]
EOF
    : >"$fetch/src/lib.rs"
    (cd "$fetch" && cargo fetch --quiet)
    rm -rf "$fetch"
    src=$(find_registry_src || true)
  fi
  new="$SYS_DIR.new"
  rm -rf "$new"
  if [[ -n "$src" ]]; then
    cp -R "$src" "$new"
  else
    crate=$(find_registry_crate || true)
    [[ -n "$crate" ]] || die "mlx-sys $MLX_SYS_VERSION is neither in $CARGO_HOME/registry/src nor /cache"
    mkdir -p "$new"
    tar -xzf "$crate" -C "$new" --strip-components=1
  fi
  chmod -R u+w "$new"
  rm -f "$new/.cargo-ok" "$new/Cargo.lock"

  # (a) build.rs: on Linux, hand over to our own src/linux_build.rs (written below).
  perl -0pi -e '
    s{\A}{// setup-mlx-linux.sh: `Command` is only used by the macOS path.\n#![allow(unused_imports)]\n} or die;
    s{(mod native_link;\n)}{$1\n// Added by setup-mlx-linux.sh (Linux build of mlx-c against the mlx-cpu wheel).\n#[path = "src/linux_build.rs"]\nmod linux_build;\n} or die "native_link anchor not found\n";
    s{(fn build_and_link_mlx_c\(\) \{\n)}{$1    if env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {\n        return linux_build::build_and_link_mlx_c();\n    }\n} or die "build_and_link_mlx_c anchor not found\n";
  ' "$new/build.rs"

  cat >"$new/src/linux_build.rs" <<'EOF'
//! Linux build of mlx-sys 0.7.0, added by scripts/setup-mlx-linux.sh (not upstream code).
//!
//! Builds only mlx-c (static) against the prebuilt MLX of PyPI's `mlx-cpu` wheel
//! (`MLX_C_USE_SYSTEM_MLX=ON`) and links the wheel's shared libmlx instead of the macOS
//! libraries. The wheel is expected next to this crate (`../mlx-cpu-<version>`) unless
//! `MLX_LINUX_WHEEL_DIR` says otherwise.
use std::{
    env,
    path::{Path, PathBuf},
};

const MLX_VERSION: &str = "0.32.2";

fn wheel_dir() -> PathBuf {
    println!("cargo:rerun-if-env-changed=MLX_LINUX_WHEEL_DIR");
    let dir = match env::var_os("MLX_LINUX_WHEEL_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap())
            .join("..")
            .join(format!("mlx-cpu-{MLX_VERSION}")),
    };
    dir.canonicalize().unwrap_or_else(|_| {
        panic!(
            "mlx-cpu wheel not found at {}; run scripts/setup-mlx-linux.sh",
            dir.display()
        )
    })
}

pub fn build_and_link_mlx_c() {
    let wheel = wheel_dir();
    let mlx = wheel.join("mlx");
    let lib_dir = mlx.join("lib");
    let libmlx = lib_dir.join("libmlx.so");
    assert!(libmlx.is_file(), "{} is missing", libmlx.display());
    println!("cargo:rerun-if-changed={}", libmlx.display());
    println!("cargo:rerun-if-changed=src/linux_build.rs");
    println!("cargo:rerun-if-changed=src/linux_compat.c");

    let mlx_c_root = Path::new("src/mlx-c");
    let mut config = cmake::Config::new(mlx_c_root);
    config
        .define("MLX_C_USE_SYSTEM_MLX", "ON")
        .define("MLX_DIR", mlx.join("share").join("cmake").join("MLX"))
        .define("MLX_C_BUILD_EXAMPLES", "OFF")
        .define("BUILD_SHARED_LIBS", "OFF")
        .define("CMAKE_INSTALL_LIBDIR", "lib")
        // mlx-c is a thin wrapper; always optimise it (debug builds of it gain nothing).
        .define("CMAKE_BUILD_TYPE", "Release")
        .profile("Release");
    let dst = config.build();

    println!("cargo:rustc-link-search=native={}", dst.join("lib").display());
    println!("cargo:rustc-link-lib=static=mlxc");
    println!("cargo:rustc-link-search=native={}", lib_dir.display());
    println!("cargo:rustc-link-lib=dylib=mlx");
    println!("cargo:rustc-link-lib=dylib=stdc++");
    // Only reaches this crate's own tests/examples: cargo does not pass a dependency's link
    // args on: the benchmark binary's build.rs adds the rpath from `lib_dir` below.
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib_dir.display());

    // mlx-rs seeds its RNG with macOS's mach_approximate_time(); provide it.
    cc::Build::new()
        .file("src/linux_compat.c")
        .compile("mlx_sys_linux_compat");

    // Same DEP_MLX_* contract as upstream (include dirs, defines, version), plus lib_dir.
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let include = env::join_paths([mlx.join("include"), manifest.join(mlx_c_root)])
        .expect("MLX include directories must not contain the path-list separator");
    println!("cargo::metadata=include={}", include.display());
    println!("cargo::metadata=defines=");
    println!("cargo::metadata=version={MLX_VERSION}");
    // The folder of the libmlx.so loaded at run time: the CUDA wheel's with
    // MLX_LINUX_BACKEND=cuda (same SONAME and ABI), else the one linked against.
    println!("cargo:rerun-if-env-changed=MLX_LINUX_RUNTIME_LIB_DIR");
    let runtime = env::var("MLX_LINUX_RUNTIME_LIB_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| lib_dir.clone());
    println!("cargo::metadata=lib_dir={}", runtime.display());
}
EOF

  cat >"$new/src/linux_compat.c" <<'EOF'
/* Added by scripts/setup-mlx-linux.sh: macOS timing functions that mlx-rs calls, for Linux. */
#include <stdint.h>
#include <time.h>

static uint64_t monotonic_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

uint64_t mach_approximate_time(void) { return monotonic_ns(); }
uint64_t mach_absolute_time(void) { return monotonic_ns(); }
EOF

  # (b) mlx-c's CMake: nothing to edit; MLX_C_USE_SYSTEM_MLX / MLX_DIR / MLX_C_BUILD_EXAMPLES are
  #     passed as cache definitions by linux_build.rs above.

  # (c) GCC 12 has no <format>: give io.h a tiny "{}" formatter and use it instead of std::format.
  io_h="$new/src/mlx-c/mlx/c/private/io.h"
  perl -0pi -e '
    s{(#include <streambuf>\n)}{$1#include <sstream>
#include <string>
#include <string_view>

// Added by setup-mlx-linux.sh: GCC 12 lacks <format>; a C++20-format stand-in for plain "{}" fields.
namespace mlx_c_linux {
inline void format_into(std::ostringstream& out, std::string_view fmt) {
  out << fmt;
}
template <typename T, typename... Rest>
void format_into(
    std::ostringstream& out,
    std::string_view fmt,
    const T& value,
    const Rest&... rest) {
  auto pos = fmt.find("{}");
  if (pos == std::string_view::npos) {
    out << fmt;
    return;
  }
  out << fmt.substr(0, pos) << value;
  format_into(out, fmt.substr(pos + 2), rest...);
}
template <typename... Args>
std::string format(std::string_view fmt, const Args&... args) {
  std::ostringstream out;
  format_into(out, fmt, args...);
  return out.str();
}
} // namespace mlx_c_linux
} or die "io.h anchor not found\n";
    s{std::format\(}{mlx_c_linux::format(}g;
  ' "$io_h"
  ! grep -q 'std::format' "$io_h" || die "std::format left in $io_h"

  # (d) half.h: on targets without native half types (x86-64) define float16_t/bfloat16_t anyway:
  #     2-byte C types for bindgen (same Rust types as on aarch64) and MLX's own types for C++.
  half_h="$new/src/mlx-c/mlx/c/half.h"
  perl -0pi -e '
    s{\n#endif\s*\z}{
/* Added by setup-mlx-linux.sh: half types where the compiler has none natively (x86-64). */
#if !defined(HAS_FLOAT16) || !defined(HAS_BFLOAT16)
#ifdef __cplusplus
#include "mlx/types/half_types.h"
#else
#include <stdint.h>
#endif
#endif
#ifndef HAS_FLOAT16
#define HAS_FLOAT16
#ifdef __cplusplus
typedef mlx::core::float16_t float16_t;
#else
typedef __fp16 float16_t;
#endif
#endif
#ifndef HAS_BFLOAT16
#define HAS_BFLOAT16
#ifdef __cplusplus
typedef mlx::core::bfloat16_t bfloat16_t;
#else
typedef uint16_t bfloat16_t;
#endif
#endif

#endif
} or die "half.h anchor not found\n";
  ' "$half_h"

  echo "$STAMP" >"$new/.mlx-linux-stamp"
  # Replace the old copy only if something changed, so cargo does not rebuild mlx-sys needlessly.
  if [[ -d "$SYS_DIR" ]] && diff -rq -x .mlx-linux-stamp "$SYS_DIR" "$new" >/dev/null 2>&1; then
    echo "$STAMP" >"$SYS_DIR/.mlx-linux-stamp"
    rm -rf "$new"
  else
    rm -rf "$SYS_DIR"
    mv "$new" "$SYS_DIR"
  fi
fi

# ---------------------------------------------------------------------------------------------
# 4. <repo>/.cargo/config.toml: patch mlx-sys, [env] (which libmlx.so the binary loads).
#    (cargo run/test would find libmlx.so anyway when the work dir is inside the target dir.)
# ---------------------------------------------------------------------------------------------
CONFIG="$REPO_ROOT/.cargo/config.toml"
mkdir -p "$REPO_ROOT/.cargo"
content="# Generated by scripts/setup-mlx-linux.sh for this machine. Do not commit (keep it git-ignored).
# Re-run the script to regenerate it; delete it to build without the Linux mlx-sys patch.

[patch.crates-io]
mlx-sys = { path = \"$SYS_DIR\" }

# The MLX binary finds libmlx.so (PyPI mlx-$BACKEND $MLX_VERSION) at run time through the rpath that
# its build.rs adds from mlx-sys's lib_dir (MLX_LINUX_RUNTIME_LIB_DIR below). No rustflags here:
# they enter every crate's fingerprint, so a target folder moved or copied elsewhere (or a second
# worktree's) would rebuild everything, libtorch's C++ wrapper included.
[env]
LIBTORCH_USE_PYTORCH = \"1\"
MLX_LINUX_RUNTIME_LIB_DIR = \"$RUNTIME_LIB_DIR\""
if [[ "$(cat "$CONFIG" 2>/dev/null || true)" != "$content" ]]; then
  printf '%s\n' "$content" >"$CONFIG.tmp"
  mv "$CONFIG.tmp" "$CONFIG"
fi
if git -C "$REPO_ROOT" rev-parse --git-dir >/dev/null 2>&1 &&
  ! git -C "$REPO_ROOT" check-ignore -q "$CONFIG"; then
  log "warning: .cargo/config.toml is not git-ignored; add '/.cargo/config.toml' to .gitignore"
fi

echo "setup-mlx-linux: mlx-sys $MLX_SYS_VERSION patched at $SYS_DIR against mlx-cpu $MLX_VERSION ($BLAS_MODE BLAS${OPENBLAS:+: $OPENBLAS}); run time: $RUNTIME_LIB_DIR/libmlx.so ($BACKEND); wrote $CONFIG"
