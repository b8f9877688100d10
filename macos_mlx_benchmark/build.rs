//! Links the binary so that it finds MLX at run time, and records the MLX version it was built
//! against.
//!
//! On Linux the (patched) mlx-sys links the shared `libmlx.so` of PyPI's mlx-cpu wheel and
//! publishes its folder as `DEP_MLX_LIB_DIR`. Cargo does not pass a dependency's
//! `rustc-link-arg` on to the final binary, so without this script the binary would only find
//! the library through the rpath that `setup-mlx-linux.sh` writes into `.cargo/config.toml`
//! (lost as soon as `RUSTFLAGS` is set). On macOS MLX is linked statically and nothing is needed.

fn main() {
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
