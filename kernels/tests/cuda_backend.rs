//! libtorch's CUDA backend is not linked: it is opened before main where there is a driver
//! (csrc/cuda_backend.cpp). Without one here, the test opens it by hand, as that constructor does, and checks that
//! libtorch then has its CUDA backend (the runtime version answers) and that the CUDA object (NCCL,
//! CUDA graphs), opened from the bytes the binary carries, runs. One test: the process's state is the subject.
use std::ffi::CString;
use std::path::PathBuf;
use std::time::Duration;

use kernels::collectives::ProcessGroup;
use kernels::cuda_graph::CudaGraph;
use kernels::runtime::{cuda_backend, cuda_backend_in_process, CudaBackend, RuntimeInfo};
use kernels::KernelError;

#[test]
fn the_cuda_backend_loads_at_run_time() {
    // SAFETY: a NUL-terminated name; opening the driver has no other effect.
    let driver = unsafe { !libc::dlopen(c"libcuda.so.1".as_ptr(), libc::RTLD_LAZY).is_null() };
    let backend = cuda_backend();
    assert_eq!(*backend == CudaBackend::Loaded, driver, "{backend:?}");
    assert_eq!(cuda_backend_in_process(), driver, "{backend:?}");
    if !driver {
        assert_eq!(*backend, CudaBackend::NoDriver);
        let error = ProcessGroup::nccl("127.0.0.1", 1, 0, 1, Duration::from_secs(5), 0).err().unwrap().to_string();
        assert!(error.contains("NCCL: needs libtorch's CUDA backend") && error.contains("no NVIDIA driver"), "{error}");
        // Not through RuntimeInfo: its CUDA question would settle libtorch on the CPU-only stub.
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let libtorch = maps.split_whitespace().find(|field| field.ends_with("/libtorch_cpu.so")).map(PathBuf::from);
        let libtorch = libtorch.expect("libtorch_cpu.so is mapped");
        let torch_cuda = CString::new(libtorch.with_file_name("libtorch_cuda.so").to_str().unwrap()).unwrap();
        // SAFETY: a NUL-terminated path; the library stays open for the process's life.
        let opened = unsafe { libc::dlopen(torch_cuda.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
        assert!(!opened.is_null(), "libtorch_cuda.so does not load");
        assert!(cuda_backend_in_process());
    }
    let info = RuntimeInfo::probe().unwrap();
    assert_eq!(info.cuda.runtime_version.as_deref(), Some("13.0"), "{info:?}");
    if info.cuda.devices.is_empty() {
        // The shim was opened from memory and reached ProcessGroupNCCL, which wants a GPU.
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let error = ProcessGroup::nccl("127.0.0.1", free, 0, 1, Duration::from_secs(20), 0).err().unwrap().to_string();
        assert!(error.contains("ProcessGroupNCCL"), "{error}");
        // The same object's CUDA graphs reach libtorch's, which want a device; nothing is recorded.
        let mut recorded = false;
        let error = CudaGraph::capture(0, || {
            recorded = true;
            Ok::<_, KernelError>(())
        });
        let error = error.err().expect("a capture without a GPU").to_string();
        assert!(error.contains("capture a CUDA graph") && !recorded, "{error}");
        eprintln!("{error}");
    }
}
