//! The piece of the shim that builds a `ProcessGroupNCCL` (csrc/nccl.cpp) links libtorch_cuda, so it
//! is a shared object of its own, carried inside the binary and opened the first time a group uses
//! NCCL: a process that never does (every CPU-only one) never maps the CUDA libraries.
use std::ffi::{c_char, c_int, c_long, CString};
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::OnceLock;

use crate::ffi::{read_text, WizardGroup};
use crate::runtime::{self, CudaBackend};
use crate::KernelError;

type GroupNew = unsafe extern "C" fn(*const c_char, c_int, c_int, c_int, c_long, c_int, *mut *mut WizardGroup) -> c_int;
type LastError = unsafe extern "C" fn(*mut c_char, usize);

/// The opened object's two entry points.
pub(crate) struct Nccl {
    group_new: GroupNew,
    last_error: LastError,
}

impl Nccl {
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
        if unsafe { (self.group_new)(host, port, rank, size, timeout_ms, device, out) } == 0 {
            return Ok(());
        }
        // SAFETY: writes at most `len` bytes into the buffer.
        let message = read_text(|buf, len| unsafe { (self.last_error)(buf, len) });
        Err(KernelError::Torch { operation: "join process group", message })
    }
}

/// The NCCL entry points, opened on first use; an error says why NCCL cannot run in this process
/// (and is not kept: the CUDA backend may load later).
pub(crate) fn opened() -> Result<&'static Nccl, KernelError> {
    static OPENED: OnceLock<Nccl> = OnceLock::new();
    if let Some(nccl) = OPENED.get() {
        return Ok(nccl);
    }
    let nccl = open().map_err(|message| KernelError::Torch { operation: "join process group", message })?;
    Ok(OPENED.get_or_init(|| nccl))
}

#[cfg(wizard_with_nccl)]
fn open() -> Result<Nccl, String> {
    static OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/libwizard_nccl.so"));
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
        return Err(format!("NCCL needs libtorch's CUDA backend, and {why}"));
    }
    // An anonymous in-memory file: nothing is written to disk, and nothing is left behind.
    // SAFETY: the name is a NUL-terminated literal; the returned descriptor is owned by `file`.
    let fd = unsafe { libc::memfd_create(c"wizard_nccl".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(format!("memfd_create: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.write_all(OBJECT).map_err(|e| format!("writing the NCCL shim to memory: {e}"))?;
    let path = format!("/proc/self/fd/{}", file.as_raw_fd());
    let handle = runtime::open_library(path.as_ref(), libc::RTLD_NOW | libc::RTLD_LOCAL)?;
    let symbol = |name: &str| {
        let name = CString::new(name).expect("no NUL in a symbol name");
        // SAFETY: `handle` is an open object and stays open for the process's life.
        let found = unsafe { libc::dlsym(handle, name.as_ptr()) };
        if found.is_null() {
            Err(format!("the NCCL shim lacks {}", name.to_string_lossy()))
        } else {
            Ok(found)
        }
    };
    // SAFETY: both symbols are the extern "C" functions of csrc/nccl.cpp, with these signatures.
    unsafe {
        Ok(Nccl {
            group_new: std::mem::transmute::<*mut libc::c_void, GroupNew>(symbol("wizard_group_new_nccl")?),
            last_error: std::mem::transmute::<*mut libc::c_void, LastError>(symbol("wizard_nccl_last_error")?),
        })
    }
}

#[cfg(not(wizard_with_nccl))]
fn open() -> Result<Nccl, String> {
    Err("this build has no NCCL: the CUDA headers were missing when it was compiled (run scripts/setup.sh, then \
         rebuild)"
        .into())
}
