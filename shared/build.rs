//! Records the compiler and commit a binary was built from, for the summary's `software` block.
use std::process::Command;

fn main() {
    // `cfg(macos)`: the code paths of a macOS build. Set here on macOS; `scripts/test.sh` also
    // type-checks those paths on Linux with `--cfg macos` (rustc refuses `--cfg target_os`), so
    // a Mac-only path that stops compiling is caught without a Mac.
    println!("cargo::rustc-check-cfg=cfg(macos)");
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("macos") {
        println!("cargo::rustc-cfg=macos");
    }
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let v = Command::new(rustc)
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    println!("cargo:rustc-env=FTB_RUSTC_VERSION={v}");
    let commit = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    println!("cargo:rustc-env=FTB_GIT_COMMIT={commit}");
    println!("cargo:rerun-if-changed=../.git/HEAD");
    println!("cargo:rerun-if-changed=../.git/refs/heads");
    println!("cargo:rerun-if-changed=build.rs");
}
