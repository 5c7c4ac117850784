//! The pieces of the shim that call libtorch_cuda's own API (csrc/nccl.cpp: `ProcessGroupNCCL`;
//! csrc/cuda_graph.cpp: CUDA graphs) link libtorch_cuda, so they are a shared object of their own,
//! carried inside the binary and opened the first time a process needs one of them: a process that
//! never does (every CPU-only one) never maps the CUDA libraries.
use std::ffi::{c_char, c_int, c_long, CString};
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::{Mutex, OnceLock};

use crate::ffi::{read_text, WizardGraph, WizardGroup};
use crate::runtime::{self, CudaBackend};
use crate::KernelError;

type GroupNew = unsafe extern "C" fn(*const c_char, c_int, c_int, c_int, c_long, c_int, *mut *mut WizardGroup) -> c_int;
type LastError = unsafe extern "C" fn(*mut c_char, usize);
type GraphBegin = unsafe extern "C" fn(c_int, *mut *mut WizardGraph) -> c_int;
type GraphCall = unsafe extern "C" fn(*mut WizardGraph) -> c_int;
type GraphFree = unsafe extern "C" fn(*mut WizardGraph);

/// The opened object's entry points.
pub(crate) struct CudaObject {
    group_new: GroupNew,
    last_error: LastError,
    pub(crate) graph_begin: GraphBegin,
    pub(crate) graph_end: GraphCall,
    pub(crate) graph_replay: GraphCall,
    pub(crate) graph_free: GraphFree,
}

impl CudaObject {
    /// `wizard_group_new_nccl` of csrc/nccl.cpp, its error read from the object's own channel.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn group_new(
        &self,
        host: *const c_char,
        port: c_int,
        rank: c_int,
        size: c_int,
        timeout_ms: c_long,
        device: c_int,
        out: *mut *mut WizardGroup,
    ) -> Result<(), KernelError> {
        // SAFETY: `host` is a live C string for the call; `out` receives an owned pointer on success.
        let status = unsafe { (self.group_new)(host, port, rank, size, timeout_ms, device, out) };
        self.check(status, "join process group")
    }

    /// Turns an entry point's status into a result, its error read from the object's own channel
    /// (on the calling thread, right after the call).
    pub(crate) fn check(&self, status: c_int, operation: &'static str) -> Result<(), KernelError> {
        if status == 0 {
            return Ok(());
        }
        // SAFETY: writes at most `len` bytes into the buffer.
        let message = read_text(|buf, len| unsafe { (self.last_error)(buf, len) });
        Err(KernelError::Torch { operation, message })
    }
}

/// The object's entry points, opened on first use; an error says why it cannot run in this process
/// (and is not kept: the CUDA backend may load later). `operation` names the call that needed it,
/// `feature` the object's part (NCCL, CUDA graphs).
pub(crate) fn opened(operation: &'static str, feature: &str) -> Result<&'static CudaObject, KernelError> {
    static OPENED: OnceLock<CudaObject> = OnceLock::new();
    static OPENING: Mutex<()> = Mutex::new(());
    if let Some(object) = OPENED.get() {
        return Ok(object);
    }
    // One thread opens it; another that asked meanwhile finds it open.
    let _opening = OPENING.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(object) = OPENED.get() {
        return Ok(object);
    }
    let object = open().map_err(|why| KernelError::Torch { operation, message: format!("{feature}: {why}") })?;
    Ok(OPENED.get_or_init(|| object))
}

#[cfg(wizard_with_nccl)]
fn open() -> Result<CudaObject, String> {
    static OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/libwizard_cuda.so"));
    // libtorch_cuda must be in the process before the object that needs it (csrc/cuda_backend.cpp
    // opens it before main); loading it as the object's dependency would come after libtorch
    // settled on its CPU-only CUDA stub.
    let backend = runtime::cuda_backend();
    if !runtime::cuda_backend_in_process() {
        let why = match backend {
            CudaBackend::NoDriver => "there is no NVIDIA driver (libcuda.so.1)".to_string(),
            CudaBackend::NotBuilt => "this libtorch has no CUDA".to_string(),
            CudaBackend::Failed(message) => format!("libtorch_cuda did not load: {message}"),
            CudaBackend::Loaded => "libtorch_cuda is not loaded".to_string(),
        };
        return Err(format!("needs libtorch's CUDA backend, and {why}"));
    }
    // An anonymous in-memory file: nothing is written to disk, and nothing is left behind.
    // SAFETY: the name is a NUL-terminated literal; the returned descriptor is owned by `file`.
    let fd = unsafe { libc::memfd_create(c"wizard_cuda".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(format!("memfd_create: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.write_all(OBJECT).map_err(|e| format!("writing the CUDA object to memory: {e}"))?;
    let path = format!("/proc/self/fd/{}", file.as_raw_fd());
    let handle = runtime::open_library(path.as_ref(), libc::RTLD_NOW | libc::RTLD_LOCAL)?;
    let symbol = |name: &str| {
        let name = CString::new(name).expect("no NUL in a symbol name");
        // SAFETY: `handle` is an open object and stays open for the process's life.
        let found = unsafe { libc::dlsym(handle, name.as_ptr()) };
        if found.is_null() {
            Err(format!("the CUDA object lacks {}", name.to_string_lossy()))
        } else {
            Ok(found)
        }
    };
    // SAFETY: the symbols are the extern "C" functions of csrc/nccl.cpp and csrc/cuda_graph.cpp, with
    // these signatures.
    unsafe {
        use libc::c_void;
        use std::mem::transmute;
        Ok(CudaObject {
            group_new: transmute::<*mut c_void, GroupNew>(symbol("wizard_group_new_nccl")?),
            last_error: transmute::<*mut c_void, LastError>(symbol("wizard_cuda_last_error")?),
            graph_begin: transmute::<*mut c_void, GraphBegin>(symbol("wizard_graph_begin")?),
            graph_end: transmute::<*mut c_void, GraphCall>(symbol("wizard_graph_end")?),
            graph_replay: transmute::<*mut c_void, GraphCall>(symbol("wizard_graph_replay")?),
            graph_free: transmute::<*mut c_void, GraphFree>(symbol("wizard_graph_free")?),
        })
    }
}

#[cfg(not(wizard_with_nccl))]
fn open() -> Result<CudaObject, String> {
    Err("not in this build: the CUDA headers were missing when it was compiled (run scripts/setup.sh, then \
         rebuild)"
        .into())
}
