//! Raw declarations of the shim in `csrc/`, and the helpers that make them safe to call.
use std::ffi::{c_char, c_int, c_long, c_ulonglong, CStr};

use crate::KernelError;

extern "C" {
    fn wizard_last_error(buf: *mut c_char, len: usize);
    fn wizard_torch_version(buf: *mut c_char, len: usize);
    fn wizard_libtorch_path(buf: *mut c_char, len: usize) -> c_int;
    fn wizard_cuda_summary(
        available: *mut c_int,
        cudnn: *mut c_int,
        device_count: *mut c_int,
        runtime_version: *mut c_long,
    ) -> c_int;
    fn wizard_cuda_device(
        index: c_int,
        name: *mut c_char,
        name_len: usize,
        total_memory: *mut c_ulonglong,
        major: *mut c_int,
        minor: *mut c_int,
    ) -> c_int;
}

const TEXT_LEN: usize = 4096;

/// Runs a shim function that writes a NUL-terminated string into the buffer it is given.
fn read_text(fill: impl FnOnce(*mut c_char, usize)) -> String {
    let mut buf = vec![0 as c_char; TEXT_LEN];
    fill(buf.as_mut_ptr(), buf.len());
    // SAFETY: the shim always NUL-terminates within the length it was given.
    unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned()
}

/// Turns a shim status into a result, reading the message of a failure (every C++ entry point
/// reports through the same `wizard_last_error`).
pub(crate) fn check(status: c_int, operation: &'static str) -> Result<(), KernelError> {
    if status == 0 {
        return Ok(());
    }
    // SAFETY: writes at most `len` bytes into the buffer.
    let message = read_text(|buf, len| unsafe { wizard_last_error(buf, len) });
    Err(KernelError::Torch { operation, message })
}

pub(crate) fn torch_version() -> String {
    // SAFETY: writes at most `len` bytes into the buffer.
    read_text(|buf, len| unsafe { wizard_torch_version(buf, len) })
}

pub(crate) fn libtorch_path() -> Result<String, KernelError> {
    let mut status = 0;
    // SAFETY: writes at most `len` bytes into the buffer.
    let path = read_text(|buf, len| status = unsafe { wizard_libtorch_path(buf, len) });
    check(status, "locate libtorch")?;
    Ok(path)
}

pub(crate) struct CudaSummary {
    pub available: bool,
    pub cudnn: bool,
    pub device_count: usize,
    pub runtime_version: i64,
}

pub(crate) fn cuda_summary() -> Result<CudaSummary, KernelError> {
    let (mut available, mut cudnn, mut count, mut runtime) = (0, 0, 0, 0);
    // SAFETY: all four pointers are to live locals.
    let status = unsafe { wizard_cuda_summary(&mut available, &mut cudnn, &mut count, &mut runtime) };
    check(status, "query CUDA")?;
    Ok(CudaSummary {
        available: available != 0,
        cudnn: cudnn != 0,
        device_count: usize::try_from(count).unwrap_or(0),
        runtime_version: runtime,
    })
}

pub(crate) struct CudaDevice {
    pub name: String,
    pub total_memory: u64,
    pub capability: (i32, i32),
}

pub(crate) fn cuda_device(index: usize) -> Result<CudaDevice, KernelError> {
    let index = c_int::try_from(index).map_err(|_| KernelError::Torch {
        operation: "query CUDA device",
        message: format!("device index {index} out of range"),
    })?;
    let (mut total, mut major, mut minor, mut status) = (0, 0, 0, 0);
    // SAFETY: the name buffer is `len` long; the other pointers are to live locals.
    let name = read_text(|buf, len| {
        status = unsafe { wizard_cuda_device(index, buf, len, &mut total, &mut major, &mut minor) }
    });
    check(status, "query CUDA device")?;
    Ok(CudaDevice { name, total_memory: total, capability: (major, minor) })
}
