// Compiles the c10d shim (csrc/c10d_shim.cpp) against the libtorch that torch-sys links (the
// venv's wheel): its headers sit next to its library directory. The wheel ships no gloo headers;
// Debian's libgloo-dev provides them (scripts/setup.sh installs it; ProcessGroupGloo holds gloo
// types by pointer, so the version skew is harmless).
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=csrc/c10d_shim.cpp");
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let lib = PathBuf::from(std::env::var("DEP_TCH_LIBTORCH_LIB").expect("torch-sys exports DEP_TCH_LIBTORCH_LIB"));
    let include = lib.parent().map(|p| p.join("include")).expect("libtorch's include directory");
    if !std::path::Path::new("/usr/include/gloo/config.h").exists() {
        panic!("gloo headers missing: install Debian's libgloo-dev (scripts/setup.sh does)");
    }
    cc::Build::new()
        .cpp(true)
        .file("csrc/c10d_shim.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .flag("-DUSE_C10D_GLOO")
        .flag("-w")
        .compile("strata_c10d");
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
}
