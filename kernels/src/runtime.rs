//! What libtorch this process runs on: version, where it was loaded from, threads and CUDA devices.
use std::ffi::{c_int, c_void, CStr, CString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::{ffi, KernelError};

/// libtorch's CUDA backend in this process. libtorch_cuda and the CUDA libraries behind it (about
/// 350 MiB resident) are not linked: they load only where an NVIDIA driver is, so a CPU-only
/// process never maps them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CudaBackend {
    /// Loaded: libtorch sees the devices the driver shows.
    Loaded,
    /// No NVIDIA driver (libcuda.so.1), so no GPU is usable: the backend was not loaded.
    NoDriver,
    /// The libtorch in use has no libtorch_cuda.so.
    NotBuilt,
    /// libtorch_cuda.so did not load; the dynamic loader's message.
    Failed(String),
}

impl CudaBackend {
    /// In words, as `wizard doctor` shows it.
    pub fn describe(&self) -> String {
        match self {
            CudaBackend::Loaded => "loaded".into(),
            CudaBackend::NoDriver => "not loaded: no NVIDIA driver (libcuda.so.1)".into(),
            CudaBackend::NotBuilt => "not loaded: this libtorch has no libtorch_cuda.so".into(),
            CudaBackend::Failed(message) => format!("failed to load: {message}"),
        }
    }
}

/// libtorch's CUDA backend, as csrc/cuda_backend.cpp left it: that constructor opens it before main
/// where there is a driver, since libtorch settles on its CPU-only stub at the first CUDA question.
pub fn cuda_backend() -> &'static CudaBackend {
    static BACKEND: OnceLock<CudaBackend> = OnceLock::new();
    BACKEND.get_or_init(ffi::cuda_backend)
}

/// Whether libtorch_cuda is in this process, however it got there.
pub fn cuda_backend_in_process() -> bool {
    open_library(Path::new("libtorch_cuda.so"), libc::RTLD_NOW | libc::RTLD_NOLOAD).is_ok()
}

/// CUDA devices libtorch sees.
pub fn cuda_device_count() -> usize {
    usize::try_from(tch::Cuda::device_count()).unwrap_or(0)
}

/// `dlopen`; the handle stays open for the process's life. The error is the loader's message.
pub(crate) fn open_library(path: &Path, flags: c_int) -> Result<*mut c_void, String> {
    let name = CString::new(path.as_os_str().as_bytes()).map_err(|_| format!("{} holds a NUL", path.display()))?;
    // SAFETY: `name` is NUL-terminated; dlerror is read right after, on the same thread.
    unsafe {
        let handle = libc::dlopen(name.as_ptr(), flags);
        if !handle.is_null() {
            return Ok(handle);
        }
        let error = libc::dlerror();
        Err(if error.is_null() {
            format!("cannot load {}", path.display())
        } else {
            CStr::from_ptr(error).to_string_lossy().into_owned()
        })
    }
}

/// A snapshot of the libtorch runtime, as `wizard doctor` reports it.
#[derive(Debug, Clone)]
pub struct RuntimeInfo {
    /// The libtorch version wizard was compiled against, e.g. `2.11.0`.
    pub torch_version: String,
    /// The `libtorch_cpu.so` the dynamic loader actually picked.
    pub loaded_from: PathBuf,
    /// The lib directory that torch-sys linked at build time.
    pub linked_at_build: PathBuf,
    /// Whether this build references libtorch_cuda (the CUDA wheel).
    pub built_with_cuda: bool,
    /// Whether libtorch's CUDA backend is loaded, and why not.
    pub cuda_backend: CudaBackend,
    /// Whether the shim was compiled with ProcessGroupNCCL (the CUDA headers were present).
    pub built_with_nccl: bool,
    /// Threads used inside one op (`at::get_num_threads`).
    pub intra_op_threads: i32,
    /// Threads used across ops (`at::get_num_interop_threads`).
    pub inter_op_threads: i32,
    /// CUDA as seen by libtorch.
    pub cuda: CudaInfo,
}

/// CUDA as seen by libtorch.
#[derive(Debug, Clone)]
pub struct CudaInfo {
    /// A driver and at least one device are usable.
    pub available: bool,
    /// cuDNN is usable.
    pub cudnn: bool,
    /// The CUDA runtime version libtorch was built with, e.g. `13.0`; `None` without CUDA.
    pub runtime_version: Option<String>,
    /// Every visible device.
    pub devices: Vec<CudaDevice>,
}

/// One CUDA device.
#[derive(Debug, Clone)]
pub struct CudaDevice {
    /// Ordinal, as in `cuda:N`.
    pub index: usize,
    /// Marketing name, e.g. `NVIDIA H200`.
    pub name: String,
    /// Global memory in bytes.
    pub total_memory: u64,
    /// Compute capability (major, minor).
    pub capability: (i32, i32),
}

impl RuntimeInfo {
    /// Asks libtorch about itself; loads the CUDA driver if there is one.
    pub fn probe() -> Result<RuntimeInfo, KernelError> {
        let cuda_backend = cuda_backend().clone();
        let summary = ffi::cuda_summary()?;
        let devices = (0..summary.device_count)
            .map(|index| {
                let device = ffi::cuda_device(index)?;
                Ok(CudaDevice {
                    index,
                    name: device.name,
                    total_memory: device.total_memory,
                    capability: device.capability,
                })
            })
            .collect::<Result<Vec<_>, KernelError>>()?;
        let runtime_version = (summary.runtime_version > 0).then(|| {
            let (major, minor) = (summary.runtime_version / 1000, summary.runtime_version % 1000 / 10);
            format!("{major}.{minor}")
        });
        Ok(RuntimeInfo {
            torch_version: ffi::torch_version(),
            loaded_from: PathBuf::from(ffi::libtorch_path()?),
            linked_at_build: PathBuf::from(env!("WIZARD_LIBTORCH_LIB")),
            built_with_cuda: cfg!(wizard_with_cuda),
            cuda_backend,
            built_with_nccl: cfg!(wizard_with_nccl),
            intra_op_threads: tch::get_num_threads(),
            inter_op_threads: tch::get_num_interop_threads(),
            cuda: CudaInfo { available: summary.available, cudnn: summary.cudnn, runtime_version, devices },
        })
    }
}
