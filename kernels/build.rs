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
        // The CUDA object (NCCL groups, CUDA graphs): a shared object of its own, which the binary
        // carries and opens only when it needs them: linking it would make libtorch_cuda (and the
        // CUDA libraries behind it, ~350 MiB resident) load into every process, CPU-only ones too.
        // USE_CUDA changes what libtorch's headers declare, and only these files need it.
        let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("libwizard_cuda.so");
        let compiler = base()
            .define("USE_C10D_NCCL", None)
            .define("USE_CUDA", None)
            .flag_if_supported("-Wno-interference-size")
            .include(&nccl_include)
            .get_compiler();
        let status = compiler
            .to_command()
            .args(["-shared", "-g0", "-o"])
            .arg(&out)
            .arg("csrc/nccl.cpp")
            .arg("csrc/cuda_graph.cpp")
            .arg(format!("-L{}", lib.display()))
            .arg(format!("-Wl,-rpath,{}", lib.display()))
            .args(["-ltorch_cuda", "-ltorch_cpu", "-lc10_cuda", "-lc10"])
            .status()
            .expect("the C++ compiler runs");
        assert!(status.success(), "compiling the CUDA object {} failed", out.display());
    }
    // Its constructor opens the CUDA backend before main: linked whole, so that every binary has it,
    // whether or not it calls into the object.
    base().file("csrc/cuda_backend.cpp").link_lib_modifier("+whole-archive").compile("wizard_cuda_backend");
    let mut build = base();
    build
        .file("csrc/runtime.cpp")
        .file("csrc/collectives.cpp")
        .file("csrc/optim.cpp")
        .file("csrc/precision.cpp")
        .file("csrc/reducer.cpp")
        .file("csrc/linear.cpp")
        .file("csrc/panel.cpp")
        .file("csrc/memory.cpp")
        .file("csrc/mapped.cpp")
        .file("csrc/amx_bf16.cpp")
        .file("csrc/attention.cpp")
        .file("csrc/prompt_attention.cpp")
        .file("csrc/block.cpp")
        .file("csrc/quantized.cpp");
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

    shadow_libtorch_wrapper(&base().get_compiler());

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

/// torch-sys links `libtorch.so`, a wrapper whose DT_NEEDED loads libtorch_cuda and the CUDA
/// libraries behind it (about 350 MiB resident) into every process, CPU-only ones too; the CUDA
/// backend is opened at run time instead (csrc/cuda_backend.cpp). An empty library of the
/// same name, found first, satisfies `-ltorch` and is dropped by `--as-needed`. The wrapper's own
/// exports are libstdc++ functions for systems older than GCC 11 (GLIBCXX_3.4.29); on such a
/// system the real wrapper stays linked.
fn shadow_libtorch_wrapper(compiler: &cc::Tool) {
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("libtorch-wrapper-shadow");
    std::fs::create_dir_all(&out).expect("OUT_DIR is writable");
    let libstdcxx =
        compiler.to_command().arg("-print-file-name=libstdc++.so.6").output().expect("the C++ compiler runs");
    let libstdcxx = PathBuf::from(String::from_utf8_lossy(&libstdcxx.stdout).trim());
    let recent = std::fs::read(&libstdcxx).is_ok_and(|bytes| bytes.windows(15).any(|w| w == b"GLIBCXX_3.4.29\0"));
    if !recent {
        println!(
            "cargo:warning={} predates GCC 11: libtorch.so stays linked, so every process loads the CUDA libraries",
            libstdcxx.display()
        );
        return;
    }
    let empty = out.join("empty.c");
    std::fs::write(&empty, "").expect("OUT_DIR is writable");
    let status = compiler
        .to_command()
        .args(["-x", "c", "-shared", "-Wl,-soname,libtorch.so", "-o"])
        .arg(out.join("libtorch.so"))
        .arg(&empty)
        .status()
        .expect("the C++ compiler runs");
    assert!(status.success(), "building the empty libtorch.so failed");
    println!("cargo:rustc-link-search=native={}", out.display());
}
