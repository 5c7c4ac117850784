//! Compiles the C++ shim against the headers of the libtorch that torch-sys links.
use std::env;
use std::path::PathBuf;

fn main() {
    // torch-sys (`links = "tch"`) publishes the lib directory of the libtorch it linked.
    let lib = PathBuf::from(env::var("DEP_TCH_LIBTORCH_LIB").expect("torch-sys did not report its libtorch"));
    let torch = lib.parent().expect("libtorch lib dir has a parent").to_path_buf();
    // The CUDA wheel keeps the CUDA runtime headers beside torch, in site-packages/nvidia/cu13.
    let cuda_include = torch.join("../nvidia/cu13/include");
    let with_cuda = lib.join("libtorch_cuda.so").exists() && cuda_include.join("cuda_runtime_api.h").exists();

    let mut build = cc::Build::new();
    build
        .cpp(true)
        .pic(true)
        .std("c++17")
        .include(torch.join("include"))
        .include(torch.join("include/torch/csrc/api/include"))
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .flag_if_supported("-Wno-unused-parameter")
        .file("csrc/runtime.cpp")
        .file("csrc/collectives.cpp")
        .file("csrc/optim.cpp")
        .file("csrc/precision.cpp");
    if with_cuda {
        build.define("WIZARD_WITH_CUDA", None).include(&cuda_include);
    }
    // ProcessGroupGloo.hpp includes gloo's headers, which the wheel does not ship; Debian's
    // libgloo-dev provides them (scripts/setup.sh installs it). Only declarations are used.
    build.define("USE_C10D_GLOO", None);
    build.compile("wizard_kernels");

    println!("cargo:rustc-env=WIZARD_LIBTORCH_LIB={}", lib.display());
    println!("cargo:rustc-check-cfg=cfg(wizard_with_cuda)");
    if with_cuda {
        println!("cargo:rustc-cfg=wizard_with_cuda");
    }
    println!("cargo:rerun-if-changed=csrc");
}
