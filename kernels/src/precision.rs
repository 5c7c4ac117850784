//! Mixed precision: libtorch's autocast in a chosen dtype (bf16 on CUDA, as `torch.autocast`), and
//! the CUDA caching allocator's memory statistics. tch binds neither.
use std::ffi::c_int;

use tch::{Device, Kind};

use crate::ffi::{self, check};
use crate::KernelError;

/// c10::DeviceType of a tch device.
fn device_type(device: Device) -> c_int {
    match device {
        Device::Cuda(_) => 1,
        _ => 0,
    }
}

/// c10::ScalarType of the dtypes autocast computes in.
fn scalar_type(kind: Kind) -> Result<c_int, KernelError> {
    match kind {
        Kind::Half => Ok(5),
        Kind::Float => Ok(6),
        Kind::BFloat16 => Ok(15),
        other => {
            Err(KernelError::Torch { operation: "autocast", message: format!("{other:?} is not an autocast dtype") })
        }
    }
}

/// Runs `f` with autocast on for `device`'s type in `dtype`: matmuls and attention in `dtype`,
/// reductions and normalisations in fp32, weights kept as they are (fp32 master weights).
pub fn autocast<T>(device: Device, dtype: Kind, f: impl FnOnce() -> T) -> Result<T, KernelError> {
    let (mut was_enabled, mut previous) = (0, 0);
    let kind = device_type(device);
    // SAFETY: plain integers in and out; the out-pointers are live locals.
    check(
        unsafe { ffi::wizard_autocast_enter(kind, scalar_type(dtype)?, &mut was_enabled, &mut previous) },
        "autocast",
    )?;
    let result = f();
    // SAFETY: as above.
    check(unsafe { ffi::wizard_autocast_exit(kind, was_enabled, previous) }, "autocast")?;
    Ok(result)
}

/// The CUDA caching allocator's view of one device, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CudaMemory {
    /// Held by live tensors now.
    pub allocated: i64,
    /// Most held by live tensors since the process started.
    pub peak_allocated: i64,
    /// Reserved from the driver (allocated plus cached).
    pub reserved: i64,
}

/// Memory statistics of CUDA device `index`.
pub fn cuda_memory(index: usize) -> Result<CudaMemory, KernelError> {
    let (mut allocated, mut peak_allocated, mut reserved) = (0, 0, 0);
    // SAFETY: integers in, out-pointers to live locals.
    let status = unsafe { ffi::wizard_cuda_memory(index as c_int, &mut allocated, &mut peak_allocated, &mut reserved) };
    check(status, "CUDA memory statistics")?;
    Ok(CudaMemory { allocated, peak_allocated, reserved })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Tensor;

    /// Inside the region a CPU matmul of fp32 inputs comes out in the autocast dtype, and the
    /// previous state returns afterwards, also when regions nest.
    #[test]
    fn autocast_computes_in_the_chosen_dtype_and_restores() {
        let a = Tensor::randn([8, 8], (Kind::Float, Device::Cpu));
        let inside = autocast(Device::Cpu, Kind::BFloat16, || {
            let nested = autocast(Device::Cpu, Kind::BFloat16, || a.matmul(&a).kind()).unwrap();
            (nested, a.matmul(&a).kind(), a.sum(Kind::Float).kind())
        })
        .unwrap();
        assert_eq!(inside, (Kind::BFloat16, Kind::BFloat16, Kind::Float));
        assert_eq!(a.matmul(&a).kind(), Kind::Float);
    }

    #[test]
    fn cuda_memory_is_an_error_without_cuda_or_counts_bytes() {
        match cuda_memory(0) {
            Ok(memory) => assert!(memory.reserved >= memory.allocated && memory.peak_allocated >= memory.allocated),
            Err(e) => assert_eq!(crate::runtime::cuda_device_count(), 0, "{e}"),
        }
    }
}
