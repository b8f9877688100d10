//! Links the binary so that it finds MLX at run time, and records the MLX version it was built
//! against.
//!
//! On Linux the (patched) mlx-sys links the shared `libmlx.so` of PyPI's mlx-cpu wheel and
//! publishes, as `DEP_MLX_LIB_DIR`, the folder of the `libmlx.so` to load at run time: the same
//! one, or with `MLX_LINUX_BACKEND=cuda` the CUDA wheel's (same SONAME and ABI). Cargo does not
//! pass a dependency's `rustc-link-arg` on to the final binary, so this script is what puts that
//! folder in the binary's rpath. On macOS MLX is linked statically and nothing is needed.

fn main() {
    // `cfg(macos)`: the code paths of a macOS build. Set here on macOS; `scripts/test.sh` also
    // type-checks those paths on Linux with `--cfg macos` (rustc refuses `--cfg target_os`), so
    // a Mac-only path that stops compiling is caught without a Mac.
    println!("cargo::rustc-check-cfg=cfg(macos)");
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("macos") {
        println!("cargo::rustc-cfg=macos");
    }
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=DEP_MLX_LIB_DIR");
    println!("cargo:rerun-if-env-changed=DEP_MLX_VERSION");
    if let Ok(dir) = std::env::var("DEP_MLX_LIB_DIR") {
        // Applies to the binary and to its unit-test harness (both link libmlx).
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
    // `DEP_MLX_VERSION` exists where mlx-sys is a direct dependency (not on macOS, see
    // Cargo.toml); src/train.rs falls back to the version mlx-sys 0.7.0 pins (MLX 0.32.2).
    if let Ok(v) = std::env::var("DEP_MLX_VERSION") {
        if !v.is_empty() {
            println!("cargo:rustc-env=FTB_MLX_VERSION={v}");
        }
    }
}
