//! Embeds an rpath to libtorch and forces `libtorch_cuda.so` into the link, so that binaries start
//! without `LD_LIBRARY_PATH` and `tch::Cuda::is_available()` sees the GPU (the default
//! `--as-needed` link drops the CUDA library because no symbol of it is referenced directly).
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    let Some(libtorch) = std::env::var_os("LIBTORCH") else {
        println!("cargo:rustc-env=SVF_LIBTORCH_VERSION=unknown");
        return;
    };
    let libtorch = PathBuf::from(libtorch);
    // Resolve the `.libtorch` link so the rpath names the real folder and survives a moved checkout.
    let libtorch = libtorch.canonicalize().unwrap_or(libtorch);
    println!(
        "cargo:rustc-env=SVF_LIBTORCH_VERSION={}",
        libtorch_version(&libtorch)
    );
    let lib = libtorch.join("lib");
    println!("cargo:rerun-if-changed={}", lib.display());
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-search=native={}", lib.display());
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
}

/// The version recorded by the PyPI wheel (`version.py`) or a libtorch zip (`build-version`).
fn libtorch_version(libtorch: &std::path::Path) -> String {
    if let Ok(text) = std::fs::read_to_string(libtorch.join("version.py")) {
        if let Some(line) = text.lines().find(|l| l.starts_with("__version__")) {
            return line
                .split(['\'', '"'])
                .nth(1)
                .unwrap_or("unknown")
                .to_string();
        }
    }
    std::fs::read_to_string(libtorch.join("build-version"))
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|_| "unknown".to_string())
}
