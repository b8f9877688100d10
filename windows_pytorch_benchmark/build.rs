//! Links libtorch_cuda even though no symbol of it is referenced directly (the default
//! `--as-needed` would drop it and the binary would then see no GPU), and records the libtorch
//! version the binary was built against. The torch folder comes from the Python that
//! `LIBTORCH_USE_PYTORCH=1` points torch-sys at (`pip install torch==2.11.0`).
//!
//! Also compiles `csrc/ftb_ext.cpp`, a few ATen calls that tch does not wrap (variable-length
//! flash attention, the SDPA backend switches), against the same torch's headers.
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=LIBTORCH_USE_PYTORCH");
    let python = std::env::var("PYTHON_SYS_EXECUTABLE").unwrap_or_else(|_| "python3".into());
    let out = Command::new(&python)
        .args([
            "-c",
            "import torch, os; print(os.path.dirname(torch.__file__)); print(torch.__version__)",
        ])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
    let (lib_dir, version) = match (&out, std::env::var("LIBTORCH")) {
        (_, Ok(l)) => (
            format!("{l}/lib"),
            std::fs::read_to_string(format!("{l}/build-version"))
                .unwrap_or_default()
                .trim()
                .to_string(),
        ),
        (Some(o), _) => {
            let mut lines = o.lines();
            (
                format!("{}/lib", lines.next().unwrap_or_default()),
                lines.next().unwrap_or_default().to_string(),
            )
        }
        _ => (String::new(), String::new()),
    };
    println!("cargo:rustc-env=FTB_LIBTORCH_VERSION={version}");
    compile_extension(&lib_dir);
    if !lib_dir.is_empty() && !cfg!(windows) {
        // Find libtorch at run time without LD_LIBRARY_PATH (a RUNPATH, so LD_LIBRARY_PATH still
        // wins: that is how the device machine points the binary at its own torch).
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib_dir}");
    }
    if !lib_dir.is_empty()
        && std::path::Path::new(&lib_dir)
            .join("libtorch_cuda.so")
            .exists()
    {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-L{lib_dir},-ltorch_cuda,--as-needed");
    }
}

fn compile_extension(lib_dir: &str) {
    println!("cargo:rerun-if-changed=csrc/ftb_ext.cpp");
    let root = std::path::Path::new(lib_dir)
        .parent()
        .expect("the torch library folder has a parent");
    let include = root.join("include");
    if !include.join("ATen").join("ATen.h").exists() {
        panic!(
            "ATen headers not found under {} (install torch 2.11.0 with pip, or set LIBTORCH \
             to a libtorch folder with include/)",
            include.display()
        );
    }
    let mut b = cc::Build::new();
    b.cpp(true)
        .std("c++17")
        .file("csrc/ftb_ext.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .warnings(false);
    if !cfg!(windows) {
        // PyPI's torch is built with the C++11 ABI.
        b.define("_GLIBCXX_USE_CXX11_ABI", "1");
    }
    b.compile("ftb_ext");
}
