//! Raw declarations of the shim in `csrc/`, every one of them, and the helpers that make them safe
//! to call. Other modules reach C++ only through what is declared here.
use std::ffi::{c_char, c_int, c_long, c_ulonglong, c_void, CStr};

use tch::Tensor;

use crate::KernelError;

/// A tensor as the shim takes it: tch's `at::Tensor*`. The shim only writes into tensors that are
/// documented as outputs.
pub(crate) type TensorHandle = *mut c_void;

/// The handle of `tensor`, valid while `tensor` lives.
pub(crate) fn tensor(tensor: &Tensor) -> TensorHandle {
    tensor.as_ptr() as TensorHandle
}

/// A c10d process group (`csrc/group.h`).
#[repr(C)]
pub(crate) struct WizardGroup {
    _private: [u8; 0],
}

/// A CUDA graph being captured or replayed (`csrc/cuda_graph.cpp`).
#[repr(C)]
pub(crate) struct WizardGraph {
    _private: [u8; 0],
}

/// A collective in flight (`csrc/group.h`).
#[repr(C)]
pub(crate) struct WizardWork {
    _private: [u8; 0],
}

/// The gradient reducer's hooks and buckets (`csrc/reducer.cpp`).
#[repr(C)]
pub(crate) struct WizardReducer {
    _private: [u8; 0],
}

extern "C" {
    // csrc/runtime.cpp
    fn wizard_last_error(buf: *mut c_char, len: usize);
    fn wizard_torch_version(buf: *mut c_char, len: usize);
    fn wizard_libtorch_path(buf: *mut c_char, len: usize) -> c_int;
    // csrc/mapped.cpp
    pub(crate) fn wizard_map_bytes(fd: c_int, offset: i64, length: i64, tensor: *mut TensorHandle) -> c_int;
    pub(crate) fn wizard_mapped_file_lost(fd: c_int, lost: *mut u64) -> c_int;
    // csrc/memory.cpp
    fn wizard_huge_pages_begin();
    fn wizard_huge_pages_end();
    // csrc/cuda_backend.cpp
    fn wizard_cuda_backend(message: *mut c_char, len: usize) -> c_int;
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

    // csrc/collectives.cpp (csrc/nccl.cpp is opened at run time: crate::cuda_object)
    pub(crate) fn wizard_group_new_gloo(
        host: *const c_char,
        port: c_int,
        rank: c_int,
        size: c_int,
        timeout_ms: c_long,
        out: *mut *mut WizardGroup,
    ) -> c_int;
    pub(crate) fn wizard_group_free(group: *mut WizardGroup);
    pub(crate) fn wizard_allreduce_sum(group: *mut WizardGroup, tensor: TensorHandle) -> c_int;
    pub(crate) fn wizard_reduce_scatter_sum(
        group: *mut WizardGroup,
        output: TensorHandle,
        input: TensorHandle,
    ) -> c_int;
    pub(crate) fn wizard_broadcast(group: *mut WizardGroup, tensor: TensorHandle, root: c_int) -> c_int;
    pub(crate) fn wizard_allgather_start(
        group: *mut WizardGroup,
        output: TensorHandle,
        input: TensorHandle,
        out: *mut *mut WizardWork,
    ) -> c_int;
    pub(crate) fn wizard_work_wait(group: *mut WizardGroup, work: *mut WizardWork) -> c_int;
    pub(crate) fn wizard_work_free(work: *mut WizardWork);
    pub(crate) fn wizard_barrier(group: *mut WizardGroup) -> c_int;

    // csrc/reducer.cpp
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn wizard_reducer_new(
        group: *mut WizardGroup,
        params: *const TensorHandle,
        offsets: *const i64,
        n_params: i64,
        flat_grads: TensorHandle,
        starts: *const i64,
        lens: *const i64,
        roots: *const c_int,
        n_buckets: i64,
        out: *mut *mut WizardReducer,
    ) -> c_int;
    pub(crate) fn wizard_reducer_arm(reducer: *mut WizardReducer);
    pub(crate) fn wizard_reducer_finish(reducer: *mut WizardReducer, early: *mut i64) -> c_int;
    pub(crate) fn wizard_reducer_free(reducer: *mut WizardReducer);

    // csrc/attention.cpp
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn wizard_decode_attention(
        query: TensorHandle,
        new_keys: TensorHandle,
        new_values: TensorHandle,
        key_caches: *const TensorHandle,
        value_caches: *const TensorHandle,
        lens: *const i64,
        count: i64,
        scale: f64,
        result: *mut TensorHandle,
    ) -> c_int;
    pub(crate) fn wizard_sdpa_allow_cudnn(allowed: c_int) -> c_int;

    // csrc/prompt_attention.cpp
    pub(crate) fn wizard_prompt_attention(
        query: TensorHandle,
        key: TensorHandle,
        value: TensorHandle,
        scale: f64,
        result: *mut TensorHandle,
    ) -> c_int;

    // csrc/block.cpp
    pub(crate) fn wizard_gelu_tanh(x: TensorHandle, result: *mut TensorHandle) -> c_int;
    pub(crate) fn wizard_decode_block_applies(x: TensorHandle, parameters: *const TensorHandle) -> c_int;
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn wizard_decode_block(
        x: TensorHandle,
        parameters: *const TensorHandle,
        heads: i64,
        eps: f64,
        scale: f64,
        exact_gelu: c_int,
        key_caches: *const TensorHandle,
        value_caches: *const TensorHandle,
        lens: *const i64,
        count: i64,
        result: *mut TensorHandle,
    ) -> c_int;

    // csrc/linear.cpp (and csrc/amx_bf16.cpp)
    pub(crate) fn wizard_linear(
        x: TensorHandle,
        weight: TensorHandle,
        bias: TensorHandle,
        isa: c_int,
        result: *mut TensorHandle,
    ) -> c_int;
    pub(crate) fn wizard_linear_kernel_available(isa: c_int) -> c_int;
    pub(crate) fn wizard_linear_bf16_kernel() -> c_int;
    pub(crate) fn wizard_linear_one_row_prefetch(bf16: c_int, on: c_int) -> c_int;
    pub(crate) fn wizard_linear_one_row_stream(bf16: c_int, on: c_int) -> c_int;
    pub(crate) fn wizard_linear_few_positions_on_amx(on: c_int) -> c_int;

    // csrc/panel.cpp
    pub(crate) fn wizard_panel_pack(weight: TensorHandle, result: *mut TensorHandle) -> c_int;
    pub(crate) fn wizard_panel_unpack(panels: TensorHandle, result: *mut TensorHandle) -> c_int;

    // csrc/quantized.cpp
    pub(crate) fn wizard_quantized_quantize(
        weight: TensorHandle,
        bits: c_int,
        isa: c_int,
        packed: *mut TensorHandle,
    ) -> c_int;
    pub(crate) fn wizard_quantized_pack(
        values: TensorHandle,
        scales: TensorHandle,
        in_features: i64,
        bits: c_int,
        packed: *mut TensorHandle,
    ) -> c_int;
    pub(crate) fn wizard_quantized_unpack(
        packed: TensorHandle,
        out_features: i64,
        in_features: i64,
        bits: c_int,
        values: *mut TensorHandle,
        scales: *mut TensorHandle,
    ) -> c_int;
    pub(crate) fn wizard_quantized_rows(
        packed: TensorHandle,
        out_features: i64,
        in_features: i64,
        bits: c_int,
        ids: TensorHandle,
        result: *mut TensorHandle,
    ) -> c_int;
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn wizard_quantized_linear(
        x: TensorHandle,
        packed: TensorHandle,
        out_features: i64,
        in_features: i64,
        bits: c_int,
        bias: TensorHandle,
        isa: c_int,
        result: *mut TensorHandle,
    ) -> c_int;
    pub(crate) fn wizard_quantized_kernel_available(isa: c_int) -> c_int;
    pub(crate) fn wizard_quantized_kernel_isa() -> c_int;
    pub(crate) fn wizard_quantized_prefetch_bytes(bytes: i64) -> i64;

    // csrc/optim.cpp
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn wizard_fused_adamw(
        param: TensorHandle,
        grad: TensorHandle,
        exp_avg: TensorHandle,
        exp_avg_sq: TensorHandle,
        step: TensorHandle,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
    ) -> c_int;

    // csrc/precision.cpp
    pub(crate) fn wizard_autocast_enter(
        device_type: c_int,
        dtype: c_int,
        was_enabled: *mut c_int,
        previous: *mut c_int,
    ) -> c_int;
    pub(crate) fn wizard_autocast_exit(device_type: c_int, was_enabled: c_int, previous: c_int) -> c_int;
    pub(crate) fn wizard_cuda_memory(
        index: c_int,
        allocated: *mut i64,
        peak_allocated: *mut i64,
        reserved: *mut i64,
    ) -> c_int;
}

const TEXT_LEN: usize = 4096;

/// Runs a shim function that writes a NUL-terminated string into the buffer it is given.
pub(crate) fn read_text(fill: impl FnOnce(*mut c_char, usize)) -> String {
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

/// Blocks of 2 MiB or more from here to [`huge_pages_end`] go in transparent huge pages.
pub(crate) fn huge_pages_begin() {
    // SAFETY: increments an atomic counter.
    unsafe { wizard_huge_pages_begin() }
}

pub(crate) fn huge_pages_end() {
    // SAFETY: decrements an atomic counter.
    unsafe { wizard_huge_pages_end() }
}

/// What the constructor in csrc/cuda_backend.cpp did before main.
pub(crate) fn cuda_backend() -> crate::runtime::CudaBackend {
    use crate::runtime::CudaBackend;
    let mut state = 0;
    // SAFETY: writes at most `len` bytes into the buffer.
    let message = read_text(|buf, len| state = unsafe { wizard_cuda_backend(buf, len) });
    match state {
        0 => CudaBackend::Loaded,
        1 => CudaBackend::NoDriver,
        2 => CudaBackend::NotBuilt,
        _ => CudaBackend::Failed(message),
    }
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
