//! CUDA graphs: the kernels a piece of work launches, recorded once and launched again as one graph.
//! A decode step of a small batch is hundreds of short kernels whose launches, not the GPU, set its
//! time; replayed as a graph it costs one launch. A graph reads and writes the very memory it was
//! recorded over: its inputs are filled in place before each replay, its outputs read after.
use std::ffi::c_int;

use crate::cuda_object::{self, CudaObject};
use crate::ffi::WizardGraph;
use crate::KernelError;

/// A recorded graph on one CUDA device, with the memory its recorded work allocated.
pub struct CudaGraph {
    raw: *mut WizardGraph,
    object: &'static CudaObject,
}

// SAFETY: the graph is a libtorch object with no thread affinity; replay sets the device itself,
// and `&mut self` keeps replays from overlapping.
unsafe impl Send for CudaGraph {}

impl CudaGraph {
    /// Records the kernels `body` launches on CUDA device `device` (they do not run now) and what it
    /// returns (tensors that the graph writes at each replay). `body` must not wait on the GPU or
    /// copy to the host; where it does, libtorch fails (tch panics) and the error is returned, the
    /// capture ended. Work already queued is waited for first.
    pub fn capture<R, E: std::fmt::Display>(
        device: usize,
        body: impl FnOnce() -> Result<R, E>,
    ) -> Result<(CudaGraph, R), KernelError> {
        let object = cuda_object::opened("capture a CUDA graph", "CUDA graphs")?;
        let mut raw = std::ptr::null_mut();
        // SAFETY: `raw` receives an owned graph on success.
        object.check(unsafe { (object.graph_begin)(device as c_int, &mut raw) }, "capture a CUDA graph")?;
        let graph = CudaGraph { raw, object };
        let recorded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(body));
        // The capture always ends: the caller's stream comes back even where `body` failed.
        // SAFETY: `graph.raw` is the graph whose capture began above.
        let ended = object.check(unsafe { (object.graph_end)(graph.raw) }, "capture a CUDA graph");
        let failed = |message: String| KernelError::Torch { operation: "capture a CUDA graph", message };
        let recorded = match recorded {
            Ok(recorded) => recorded.map_err(|e| failed(e.to_string()))?,
            Err(panic) => {
                let message = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|text| text.to_string()));
                return Err(failed(message.unwrap_or_else(|| "the recorded work panicked".into())));
            }
        };
        ended?;
        Ok((graph, recorded))
    }

    /// Launches the recorded kernels on the device's current stream, after the work queued there.
    pub fn replay(&mut self) -> Result<(), KernelError> {
        // SAFETY: `self.raw` is a captured graph owned by `self`.
        self.object.check(unsafe { (self.object.graph_replay)(self.raw) }, "replay a CUDA graph")
    }
}

/// Whether CUDA graphs record and replay on `device` here: an increment recorded once and replayed
/// twice must count to 2.
pub fn probe(device: usize) -> Result<(), KernelError> {
    let counter = tch::Tensor::zeros([1], (tch::Kind::Float, tch::Device::Cuda(device)));
    let (mut graph, ()) = CudaGraph::capture(device, || counter.shallow_clone().f_add_scalar_(1.0).map(|_| ()))?;
    graph.replay()?;
    graph.replay()?;
    match counter.double_value(&[0]) {
        2.0 => Ok(()),
        counted => Err(KernelError::Torch {
            operation: "replay a CUDA graph",
            message: format!("an increment replayed twice counted {counted}, not 2"),
        }),
    }
}

impl Drop for CudaGraph {
    fn drop(&mut self) {
        // SAFETY: `self.raw` is owned by `self` and not used after this.
        unsafe { (self.object.graph_free)(self.raw) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind, Tensor};

    /// Without a GPU a capture says why; with one (scripts/gpu/check.sh) graphs replay, and a capture
    /// that waits on the device fails without breaking the next ones.
    #[test]
    fn graphs_replay_on_a_gpu_or_say_why_not() {
        if !tch::Cuda::is_available() {
            let error = CudaGraph::capture(0, || Ok::<_, KernelError>(())).err().expect("no GPU to capture on");
            assert!(error.to_string().contains("capture a CUDA graph"), "{error}");
            return;
        }
        probe(0).unwrap();
        let values = Tensor::ones([4], (Kind::Float, Device::Cuda(0)));
        let waits = CudaGraph::capture(0, || Ok::<_, KernelError>(values.sum(Kind::Float).double_value(&[])));
        let error = waits.err().expect("reading a value inside a capture fails");
        eprintln!("a capture that waits: {error}");
        probe(0).unwrap();
        assert_eq!(values.sum(Kind::Float).double_value(&[]), 4.0);
    }
}
