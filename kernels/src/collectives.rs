//! Collectives through libtorch's own c10d engines: `ProcessGroupGloo` rendezvoused over a
//! `TCPStore`. Gloo reduces host memory, so CUDA tensors travel through a host copy. Every call
//! blocks until done or until the group's timeout, so a dead peer becomes an error instead of a hang.
use std::ffi::{c_char, c_int, c_long, c_void, CString};
use std::time::Duration;

use tch::{Device, Tensor};

use crate::ffi::check;
use crate::KernelError;

#[repr(C)]
struct WizardGroup {
    _private: [u8; 0],
}

extern "C" {
    fn wizard_group_new_gloo(
        host: *const c_char,
        port: c_int,
        rank: c_int,
        size: c_int,
        timeout_ms: c_long,
        out: *mut *mut WizardGroup,
    ) -> c_int;
    fn wizard_group_free(group: *mut WizardGroup);
    fn wizard_allreduce_sum(group: *mut WizardGroup, tensor: *mut c_void) -> c_int;
    fn wizard_reduce_scatter_sum(group: *mut WizardGroup, output: *mut c_void, input: *mut c_void) -> c_int;
    fn wizard_allgather(group: *mut WizardGroup, output: *mut c_void, input: *mut c_void) -> c_int;
    fn wizard_broadcast(group: *mut WizardGroup, tensor: *mut c_void, root: c_int) -> c_int;
    fn wizard_barrier(group: *mut WizardGroup) -> c_int;
}

fn handle(tensor: &Tensor) -> *mut c_void {
    // tch's tensor handle is an `at::Tensor*`; the shim only reads inputs.
    tensor.as_ptr() as *mut c_void
}

/// `tensor` itself when it is in host memory, else a host copy.
fn on_host(tensor: &Tensor) -> Tensor {
    match tensor.device() {
        Device::Cpu => tensor.shallow_clone(),
        _ => tensor.to_device(Device::Cpu),
    }
}

/// Runs `collective` on a host version of `tensor`, copying the result back when it was staged.
fn in_place(
    tensor: &mut Tensor,
    collective: impl FnOnce(&Tensor) -> Result<(), KernelError>,
) -> Result<(), KernelError> {
    let host = on_host(tensor);
    collective(&host)?;
    if tensor.device() != Device::Cpu {
        tensor.copy_(&host);
    }
    Ok(())
}

/// One rank's membership in a group of `size` ranks.
pub struct ProcessGroup {
    raw: *mut WizardGroup,
    rank: usize,
    size: usize,
}

// SAFETY: the group is used from one thread at a time (it is not Sync); c10d backends may be
// driven from any thread.
unsafe impl Send for ProcessGroup {}

impl ProcessGroup {
    /// Joins a Gloo group: rank 0 serves the TCP store at `host:port`, the others connect.
    pub fn gloo(host: &str, port: u16, rank: usize, size: usize, timeout: Duration) -> Result<Self, KernelError> {
        let host_c = CString::new(host).map_err(|_| KernelError::Torch {
            operation: "join process group",
            message: format!("host {host:?} contains a NUL byte"),
        })?;
        let mut raw = std::ptr::null_mut();
        let timeout_ms = timeout.as_millis().min(c_long::MAX as u128) as c_long;
        // SAFETY: `host_c` outlives the call; `raw` receives an owned pointer on success.
        let status = unsafe {
            wizard_group_new_gloo(
                host_c.as_ptr(),
                c_int::from(port),
                rank as c_int,
                size as c_int,
                timeout_ms,
                &mut raw,
            )
        };
        check(status, "join process group")?;
        Ok(ProcessGroup { raw, rank, size })
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of ranks.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Sums `tensor` across ranks, in place.
    pub fn all_reduce_sum(&self, tensor: &mut Tensor) -> Result<(), KernelError> {
        // SAFETY: `raw` is live; the tensor handle is valid for the call.
        in_place(tensor, |t| check(unsafe { wizard_allreduce_sum(self.raw, handle(t)) }, "all-reduce"))
    }

    /// `input` holds `size` equal chunks; `output` (one chunk long) gets the sum of every rank's
    /// chunk number `rank`.
    pub fn reduce_scatter_sum(&self, output: &mut Tensor, input: &Tensor) -> Result<(), KernelError> {
        let input = on_host(input);
        // SAFETY: as above.
        in_place(output, |out| {
            check(unsafe { wizard_reduce_scatter_sum(self.raw, handle(out), handle(&input)) }, "reduce-scatter")
        })
    }

    /// `output` (`size` chunks) gets every rank's `input`, in rank order.
    pub fn all_gather(&self, output: &mut Tensor, input: &Tensor) -> Result<(), KernelError> {
        let input = on_host(input);
        // SAFETY: as above.
        in_place(output, |out| check(unsafe { wizard_allgather(self.raw, handle(out), handle(&input)) }, "all-gather"))
    }

    /// Copies `root`'s `tensor` to every rank.
    pub fn broadcast(&self, tensor: &mut Tensor, root: usize) -> Result<(), KernelError> {
        // SAFETY: as above.
        in_place(tensor, |t| check(unsafe { wizard_broadcast(self.raw, handle(t), root as c_int) }, "broadcast"))
    }

    /// Waits until every rank arrives.
    pub fn barrier(&self) -> Result<(), KernelError> {
        // SAFETY: `raw` is live.
        check(unsafe { wizard_barrier(self.raw) }, "barrier")
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // SAFETY: `raw` came from wizard_group_new_gloo and is freed once.
        unsafe { wizard_group_free(self.raw) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    /// Runs `body(group)` on `size` ranks, each a thread with its own group, and returns their results.
    fn check_ranks<T: Send + 'static>(size: usize, body: fn(&ProcessGroup) -> T) -> Vec<T> {
        let port = free_port();
        let threads: Vec<_> = (0..size)
            .map(|rank| {
                std::thread::spawn(move || {
                    let group = ProcessGroup::gloo("127.0.0.1", port, rank, size, Duration::from_secs(20)).unwrap();
                    body(&group)
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    }

    fn values(tensor: &Tensor) -> Vec<f32> {
        Vec::<f32>::try_from(tensor).unwrap()
    }

    #[test]
    fn collectives_combine_every_rank() {
        let results = check_ranks(2, |group| {
            let r = group.rank() as f32 + 1.0;
            let mut summed = Tensor::from_slice(&[r, 2.0 * r, 3.0 * r]);
            group.all_reduce_sum(&mut summed).unwrap();
            let input = Tensor::from_slice(&[r, r, 10.0 * r, 10.0 * r]);
            let mut scattered = Tensor::zeros([2], (Kind::Float, Device::Cpu));
            group.reduce_scatter_sum(&mut scattered, &input).unwrap();
            let mut gathered = Tensor::zeros([4], (Kind::Float, Device::Cpu));
            group.all_gather(&mut gathered, &Tensor::from_slice(&[r, -r])).unwrap();
            let mut broadcast = Tensor::from_slice(&[r]);
            group.broadcast(&mut broadcast, 1).unwrap();
            group.barrier().unwrap();
            (values(&summed), values(&scattered), values(&gathered), values(&broadcast))
        });
        assert_eq!(results[0].0, vec![3.0, 6.0, 9.0]);
        assert_eq!(results[1].0, vec![3.0, 6.0, 9.0]);
        assert_eq!(results[0].1, vec![3.0, 3.0]);
        assert_eq!(results[1].1, vec![30.0, 30.0]);
        assert_eq!(results[0].2, vec![1.0, -1.0, 2.0, -2.0]);
        assert_eq!(results[1].3, vec![2.0]);
        assert_eq!(results[0].3, vec![2.0]);
    }

    #[test]
    fn a_missing_peer_is_an_error_within_the_timeout() {
        let start = std::time::Instant::now();
        let result = ProcessGroup::gloo("127.0.0.1", free_port(), 0, 2, Duration::from_secs(2));
        assert!(result.is_err());
        assert!(start.elapsed() < Duration::from_secs(30), "{:?}", start.elapsed());
    }
}
