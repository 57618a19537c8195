//! Embeds an rpath to libtorch, so that binaries start without `LD_LIBRARY_PATH` (and
//! `device::load_cuda` finds `libtorch_cuda.so` there: it is loaded at run time, only where a GPU
//! driver is, not linked). Also compiles `src/backbone/onednn.cpp`, the bridge to oneDNN's
//! prepacked convolution.
use std::path::{Path, PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo::rustc-check-cfg=cfg(svf_onednn)");
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
    compile_onednn_bridge(&libtorch);
}

/// Builds the C++ bridge against the libtorch headers (the flags torch-sys uses for its own C++)
/// and turns on `cfg(svf_onednn)`; without libtorch headers the plain convolution is used.
fn compile_onednn_bridge(libtorch: &Path) {
    let source = "src/backbone/onednn.cpp";
    println!("cargo:rerun-if-changed={source}");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    let include = libtorch.join("include");
    if !include.join("ATen/core/dispatch/Dispatcher.h").exists() {
        println!(
            "cargo:warning=no libtorch headers under {}: oneDNN's prepacked convolution is off",
            include.display()
        );
        return;
    }
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".to_string());
    cc::Build::new()
        .cpp(true)
        .file(source)
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .warnings(false)
        .compile("svf_onednn");
    println!(
        "cargo:rustc-link-search=native={}",
        libtorch.join("lib").display()
    );
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
    println!("cargo:rustc-cfg=svf_onednn");
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
