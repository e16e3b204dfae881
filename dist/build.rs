// Compiles the c10d shim (csrc/c10d_shim.cpp) against the libtorch that torch-sys links (the
// venv's wheel): its headers sit next to its library directory. The wheel ships no gloo headers;
// Debian's libgloo-dev provides them (scripts/setup.sh installs it; ProcessGroupGloo holds gloo
// types by pointer, so the version skew is harmless).
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=csrc/c10d_shim.cpp");
    println!("cargo:rerun-if-changed=csrc/nccl_shim.cpp");
    println!("cargo:rerun-if-changed=csrc/shim.hpp");
    println!("cargo:rerun-if-changed=csrc/cuda_memory.cpp");
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let lib = PathBuf::from(std::env::var("DEP_TCH_LIBTORCH_LIB").expect("torch-sys exports DEP_TCH_LIBTORCH_LIB"));
    let include = lib.parent().map(|p| p.join("include")).expect("libtorch's include directory");
    if !std::path::Path::new("/usr/include/gloo/config.h").exists() {
        panic!("gloo headers missing: install Debian's libgloo-dev (scripts/setup.sh does)");
    }
    let base = || {
        let mut b = cc::Build::new();
        b.cpp(true).include(&include).include(include.join("torch/csrc/api/include")).flag("-std=c++17").flag("-D_GLIBCXX_USE_CXX11_ABI=1").flag("-w");
        b
    };
    base().file("csrc/c10d_shim.cpp").flag("-DUSE_C10D_GLOO").compile("strata_c10d");
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
    // ProcessGroupNCCL: with the CUDA wheel, whose site-packages hold the CUDA runtime's and
    // NCCL's headers beside torch (nvidia/cu13, nvidia/nccl). Without them the Rust side reports
    // NCCL as not built in.
    println!("cargo::rustc-check-cfg=cfg(strata_nccl)");
    let site = lib.parent().and_then(|p| p.parent()).map(|p| p.join("nvidia"));
    let cuda_include = site.as_ref().and_then(|s| std::fs::read_dir(s).ok()?.flatten().map(|e| e.path().join("include")).find(|p| p.join("cuda_runtime_api.h").exists()));
    let nccl_include = site.as_ref().map(|s| s.join("nccl/include")).filter(|p| p.join("nccl.h").exists());
    // cuda_runtime.h needs its crt/ headers and cuda_fp16.h libcu++'s nv/target: the
    // nvidia-cuda-crt and nvidia-cuda-cccl wheels (scripts/setup.sh installs them) put them
    // beside it.
    let complete = cuda_include.as_ref().is_some_and(|c| c.join("crt/host_config.h").exists() && c.join("nv/target").exists());
    if let (Some(cuda), Some(nccl), true, true) = (cuda_include, nccl_include, complete, lib.join("libtorch_cuda.so").exists()) {
        base().file("csrc/nccl_shim.cpp").file("csrc/cuda_memory.cpp").include(cuda).include(nccl).flag("-DUSE_C10D_NCCL").flag("-DUSE_CUDA").compile("strata_nccl");
        println!("cargo:rustc-link-lib=dylib=torch_cuda");
        println!("cargo:rustc-link-lib=dylib=c10_cuda");
        println!("cargo:rustc-cfg=strata_nccl");
    }
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
}
