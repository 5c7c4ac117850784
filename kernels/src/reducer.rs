//! Gradient reduction that overlaps backward (`csrc/reducer.cpp`): a post-accumulate-grad hook on each
//! parameter moves its gradient into a flat buffer as soon as autograd has it, and every bucket's
//! collective starts on the engine's threads once its last gradient is in, while backward goes on
//! with earlier layers (what DDP's Reducer does; tch exposes no gradient hooks, so this is C++).
use std::ffi::c_int;

use tch::Tensor;

use crate::collectives::ProcessGroup;
use crate::ffi::{self, check, TensorHandle, WizardReducer};
use crate::KernelError;

/// A range of the flat gradient buffer reduced by one collective.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bucket {
    /// First element.
    pub start: i64,
    /// Elements.
    pub len: i64,
    /// `None`: all-reduced (every rank gets the sum); `Some(r)`: reduced to rank `r` only (ZeRO-2).
    pub owner: Option<usize>,
}

/// Hooks on a model's parameters that reduce their gradients by buckets during backward.
pub struct GradientReducer {
    raw: *mut WizardReducer,
    buckets: usize,
}

// SAFETY: the reducer's state is behind a mutex in C++; Rust only hands the pointer around.
unsafe impl Send for GradientReducer {}

impl GradientReducer {
    /// `params[i]` owns `flat_grads[offsets[i]..offsets[i] + numel]`; `flat_grads` must be in the
    /// group's memory ([`ProcessGroup::home`]). The hooks stay on the parameters until drop.
    pub fn new(
        group: &ProcessGroup,
        params: &[Tensor],
        offsets: &[i64],
        flat_grads: &Tensor,
        buckets: &[Bucket],
    ) -> Result<Self, KernelError> {
        if flat_grads.device() != group.home() {
            return Err(KernelError::Torch {
                operation: "gradient reducer",
                message: format!(
                    "the gradient buffer is on {:?}; the engine works on {:?}",
                    flat_grads.device(),
                    group.home()
                ),
            });
        }
        let handles: Vec<TensorHandle> = params.iter().map(ffi::tensor).collect();
        let starts: Vec<i64> = buckets.iter().map(|b| b.start).collect();
        let lens: Vec<i64> = buckets.iter().map(|b| b.len).collect();
        let roots: Vec<c_int> = buckets.iter().map(|b| b.owner.map_or(-1, |r| r as c_int)).collect();
        let mut raw = std::ptr::null_mut();
        // SAFETY: every pointer is live for the call; the shim keeps its own references to the tensors
        // and to the group's engine.
        check(
            unsafe {
                ffi::wizard_reducer_new(
                    group.raw(),
                    handles.as_ptr(),
                    offsets.as_ptr(),
                    params.len() as i64,
                    ffi::tensor(flat_grads),
                    starts.as_ptr(),
                    lens.as_ptr(),
                    roots.as_ptr(),
                    buckets.len() as i64,
                    &mut raw,
                )
            },
            "gradient reducer",
        )?;
        Ok(GradientReducer { raw, buckets: buckets.len() })
    }

    /// How many buckets the gradients are reduced in.
    pub fn buckets(&self) -> usize {
        self.buckets
    }

    /// The next backward's gradients are reduced as they arrive (call before the last micro-batch's
    /// backward; earlier ones accumulate in the parameters' own gradients as usual).
    pub fn arm(&self) {
        // SAFETY: `raw` is live.
        unsafe { ffi::wizard_reducer_arm(self.raw) }
    }

    /// Moves any gradient no hook delivered, starts the buckets still waiting, and waits for all of
    /// them: afterwards the flat buffer holds the reduced gradients (in the owner's range for
    /// owned buckets) and the parameters' own gradients are zero. Returns how many buckets had
    /// started while backward ran.
    pub fn finish(&self) -> Result<usize, KernelError> {
        let mut early = 0;
        // SAFETY: `raw` is live; `early` is written before return.
        check(unsafe { ffi::wizard_reducer_finish(self.raw, &mut early) }, "gradient reduction")?;
        Ok(early as usize)
    }
}

impl Drop for GradientReducer {
    fn drop(&mut self) {
        // SAFETY: `raw` came from wizard_reducer_new and is freed once; this also removes the hooks.
        unsafe { ffi::wizard_reducer_free(self.raw) }
    }
}

#[cfg(test)]
mod tests {
    use tch::{Device, Kind};

    use super::*;
    use crate::collectives::tests::{check_ranks, values};

    /// Two ranks, three parameters over two buckets (one all-reduced, one reduced to rank 1): the
    /// hooks move gradients out during backward; `finish` leaves the sums where they belong. A second
    /// unarmed backward accumulates in the parameters as usual.
    #[test]
    fn gradients_are_reduced_by_buckets_during_backward() {
        let results = check_ranks(2, |group| {
            let r = group.rank() as f64 + 1.0;
            let params: Vec<Tensor> = [2, 3, 1]
                .iter()
                .map(|&n| Tensor::zeros([n], (Kind::Float, Device::Cpu)).set_requires_grad(true))
                .collect();
            let offsets = [0, 2, 5];
            let flat = Tensor::full([6], -1.0, (Kind::Float, Device::Cpu));
            let buckets = [Bucket { start: 0, len: 3, owner: None }, Bucket { start: 3, len: 3, owner: Some(1) }];
            let reducer = GradientReducer::new(group, &params, &offsets, &flat, &buckets).unwrap();
            // d(loss)/d(param i) = r * (i + 1) everywhere.
            let loss = |params: &[Tensor]| -> Tensor {
                params.iter().enumerate().map(|(i, p)| p.sum(Kind::Float) * (r * (i as f64 + 1.0))).sum::<Tensor>()
            };
            loss(&params).backward();
            let accumulated = values(&params[1].grad());
            reducer.arm();
            loss(&params).backward();
            let moved_during_backward = params.iter().all(|p| values(&p.grad()).iter().all(|&g| g == 0.0));
            let early = reducer.finish().unwrap();
            (accumulated, moved_during_backward, early, values(&flat))
        });
        for (rank, (accumulated, moved, early, flat)) in results.iter().enumerate() {
            let r = rank as f32 + 1.0;
            assert_eq!(accumulated, &vec![2.0 * r; 3]);
            assert!(moved, "rank {rank}: gradients left in the parameters after an armed backward");
            assert_eq!(*early, 2, "rank {rank}: both buckets start inside backward");
            // The unarmed backward's gradients were summed into the armed one: (1 + 1) x each rank's.
            let (g0, g1, g2) = (2.0 * 3.0, 2.0 * 2.0 * 3.0, 3.0 * 2.0 * 3.0);
            assert_eq!(&flat[..3], &[g0, g0, g1], "rank {rank}: the all-reduced bucket");
            if rank == 1 {
                assert_eq!(&flat[3..], &[g1, g1, g2], "the bucket reduced to its owner");
            }
        }
    }
}
