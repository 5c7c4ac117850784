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
    // ProcessGroupNCCL.hpp needs the full runtime headers: crt/ and CCCL's nv/target (PyPI's
    // nvidia-cuda-crt and nvidia-cuda-cccl) and nccl.h (nvidia-nccl, a torch dependency).
    let nccl_include = torch.join("../nvidia/nccl/include");
    let with_nccl = with_cuda
        && cuda_include.join("crt/host_config.h").exists()
        && cuda_include.join("nv/target").exists()
        && nccl_include.join("nccl.h").exists();

    let base = || {
        let mut build = cc::Build::new();
        build
            .cpp(true)
            .pic(true)
            .std("c++17")
            .include(torch.join("include"))
            .include(torch.join("include/torch/csrc/api/include"))
            .define("_GLIBCXX_USE_CXX11_ABI", "1")
            .flag_if_supported("-Wno-unused-parameter");
        if with_cuda {
            build.define("WIZARD_WITH_CUDA", None).include(&cuda_include);
        }
        build
    };
    if with_nccl {
        // Its own library: USE_CUDA changes what libtorch's headers declare, and only this file needs it.
        base()
            .define("USE_C10D_NCCL", None)
            .define("USE_CUDA", None)
            .flag_if_supported("-Wno-interference-size")
            .include(&nccl_include)
            .file("csrc/nccl.cpp")
            .compile("wizard_nccl");
    }
    let mut build = base();
    build
        .file("csrc/runtime.cpp")
        .file("csrc/collectives.cpp")
        .file("csrc/optim.cpp")
        .file("csrc/precision.cpp")
        .file("csrc/reducer.cpp")
        .file("csrc/linear.cpp")
        .file("csrc/amx_bf16.cpp")
        .file("csrc/attention.cpp")
        .file("csrc/block.cpp")
        .file("csrc/int8.cpp");
    // ProcessGroupGloo.hpp includes gloo's headers, which the wheel does not ship; Debian's
    // libgloo-dev provides them (scripts/setup.sh installs it). Only declarations are used.
    build.define("USE_C10D_GLOO", None);
    // at::parallel_for is inline code that runs in parallel only where it is compiled with OpenMP
    // (libtorch's backend); without the flag the kernels' parallel_for runs on one thread. The
    // GOMP calls resolve to the libgomp.so.1 that libtorch_cpu loads from the wheel (same soname,
    // found first through the rpath), so there is one OpenMP runtime in the process.
    build.flag("-fopenmp");
    build.compile("wizard_kernels");
    println!("cargo:rustc-link-lib=dylib=gomp");

    println!("cargo:rustc-env=WIZARD_LIBTORCH_LIB={}", lib.display());
    println!("cargo:rustc-check-cfg=cfg(wizard_with_cuda)");
    println!("cargo:rustc-check-cfg=cfg(wizard_with_nccl)");
    if with_nccl {
        println!("cargo:rustc-cfg=wizard_with_nccl");
    }
    if with_cuda {
        println!("cargo:rustc-cfg=wizard_with_cuda");
    }
    println!("cargo:rerun-if-changed=csrc");
    for header in [cuda_include.join("crt/host_config.h"), nccl_include.join("nccl.h")] {
        if header.exists() {
            println!("cargo:rerun-if-changed={}", header.display());
        }
    }
}
