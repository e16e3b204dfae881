// Build script shared by every package that links libtorch (see FACTS.md, "libtorch through tch").
//
// Why: torch-sys passes `-rpath` only to its own C++ glue, so our binaries and test executables
// would not find libtorch without LD_LIBRARY_PATH; and `--as-needed` drops libtorch_cuda.so because
// nothing references it by symbol, which makes CUDA invisible at run time. torch-sys exports its
// library directory to dependants' build scripts as DEP_TCH_LIBTORCH_LIB.
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        println!("cargo:warning=DEP_TCH_LIBTORCH_LIB unset: binaries will need LD_LIBRARY_PATH");
        return;
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    if std::path::Path::new(&lib).join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-L{lib}");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}
