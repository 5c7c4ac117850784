//! Collectives through libtorch's own c10d engines, rendezvoused over a `TCPStore`:
//! `ProcessGroupGloo` (host memory; CUDA tensors travel through a host copy) and `ProcessGroupNCCL`
//! (one GPU per rank; host tensors travel through that GPU). Every call blocks until done or until
//! the group's timeout, so a dead peer becomes an error instead of a hang.
use std::ffi::{c_char, c_int, c_long, CString};
use std::time::Duration;

use tch::{Device, Tensor};

use crate::ffi::{self, check, WizardGroup, WizardWork};
use crate::KernelError;

/// `tensor` itself when it is on `home`, else a copy there.
fn at_home(tensor: &Tensor, home: Device) -> Tensor {
    if tensor.device() == home {
        tensor.shallow_clone()
    } else {
        tensor.to_device(home)
    }
}

/// One rank's membership in a group of `size` ranks.
pub struct ProcessGroup {
    raw: *mut WizardGroup,
    rank: usize,
    size: usize,
    /// Where the engine's buffers live: the CPU for Gloo, the rank's GPU for NCCL.
    home: Device,
}

// SAFETY: the group is used from one thread at a time (it is not Sync); c10d backends may be
// driven from any thread.
unsafe impl Send for ProcessGroup {}

impl ProcessGroup {
    /// Joins a Gloo group: rank 0 serves the TCP store at `host:port`, the others connect.
    pub fn gloo(host: &str, port: u16, rank: usize, size: usize, timeout: Duration) -> Result<Self, KernelError> {
        let raw = join(host, timeout, |host, timeout_ms, raw| {
            // SAFETY: `host` outlives the call; `raw` receives an owned pointer on success.
            let status = unsafe {
                ffi::wizard_group_new_gloo(host, c_int::from(port), rank as c_int, size as c_int, timeout_ms, raw)
            };
            check(status, "join process group")
        })?;
        Ok(ProcessGroup { raw, rank, size, home: Device::Cpu })
    }

    /// Joins an NCCL group whose rank works on CUDA device `gpu` (one GPU per rank); the
    /// rendezvous is the same TCP store as for Gloo.
    pub fn nccl(
        host: &str,
        port: u16,
        rank: usize,
        size: usize,
        timeout: Duration,
        gpu: usize,
    ) -> Result<Self, KernelError> {
        let cuda = crate::cuda_object::opened("join process group", "NCCL")?;
        let raw = join(host, timeout, |host, timeout_ms, raw| {
            cuda.group_new(host, c_int::from(port), rank as c_int, size as c_int, timeout_ms, gpu as c_int, raw)
        })?;
        Ok(ProcessGroup { raw, rank, size, home: Device::Cuda(gpu) })
    }

    /// Runs `collective` into a buffer in the engine's memory that only receives (all-gather and
    /// reduce-scatter outputs: nothing to stage in), copying it into `output` when it had to move.
    fn receive(
        &self,
        output: &mut Tensor,
        collective: impl FnOnce(&Tensor) -> Result<(), KernelError>,
    ) -> Result<(), KernelError> {
        if output.device() == self.home {
            return collective(output);
        }
        let staged = Tensor::empty(output.size(), (output.kind(), self.home));
        collective(&staged)?;
        output.copy_(&staged);
        Ok(())
    }

    /// Runs `collective` on a version of `tensor` in the engine's memory, copying the result back
    /// when it had to move.
    fn in_place(
        &self,
        tensor: &mut Tensor,
        collective: impl FnOnce(&Tensor) -> Result<(), KernelError>,
    ) -> Result<(), KernelError> {
        let staged = at_home(tensor, self.home);
        collective(&staged)?;
        if tensor.device() != self.home {
            tensor.copy_(&staged);
        }
        Ok(())
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of ranks.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Where the engine works: the CPU for Gloo, the rank's GPU for NCCL.
    pub fn home(&self) -> Device {
        self.home
    }

    pub(crate) fn raw(&self) -> *mut WizardGroup {
        self.raw
    }

    /// Sums `tensor` across ranks, in place.
    pub fn all_reduce_sum(&self, tensor: &mut Tensor) -> Result<(), KernelError> {
        // SAFETY: `raw` is live; the tensor handle is valid for the call.
        self.in_place(tensor, |t| check(unsafe { ffi::wizard_allreduce_sum(self.raw, ffi::tensor(t)) }, "all-reduce"))
    }

    /// `input` holds `size` equal chunks; `output` (one chunk long) gets the sum of every rank's
    /// chunk number `rank`.
    pub fn reduce_scatter_sum(&self, output: &mut Tensor, input: &Tensor) -> Result<(), KernelError> {
        let input = at_home(input, self.home);
        // SAFETY: as above.
        self.receive(output, |out| {
            check(
                unsafe { ffi::wizard_reduce_scatter_sum(self.raw, ffi::tensor(out), ffi::tensor(&input)) },
                "reduce-scatter",
            )
        })
    }

    /// `output` (`size` chunks) gets every rank's `input`, in rank order.
    pub fn all_gather(&self, output: &mut Tensor, input: &Tensor) -> Result<(), KernelError> {
        self.all_gather_start(output, input)?.wait()
    }

    /// Starts [`all_gather`](Self::all_gather) and returns while it runs, so that computation can
    /// overlap it; `output` holds the result once [`PendingCollective::wait`] returns.
    pub fn all_gather_start<'g>(
        &'g self,
        output: &Tensor,
        input: &Tensor,
    ) -> Result<PendingCollective<'g>, KernelError> {
        let input = at_home(input, self.home);
        let staged = if output.device() == self.home {
            output.shallow_clone()
        } else {
            Tensor::empty(output.size(), (output.kind(), self.home))
        };
        let mut raw = std::ptr::null_mut();
        // SAFETY: `raw` is live; the handles are valid for the call and the Work keeps its own
        // references to both tensors until it completes.
        check(
            unsafe { ffi::wizard_allgather_start(self.raw, ffi::tensor(&staged), ffi::tensor(&input), &mut raw) },
            "all-gather",
        )?;
        Ok(PendingCollective { group: self, raw, staged, output: output.shallow_clone(), _input: input, waited: false })
    }

    /// Copies `root`'s `tensor` to every rank.
    pub fn broadcast(&self, tensor: &mut Tensor, root: usize) -> Result<(), KernelError> {
        // SAFETY: as above.
        self.in_place(tensor, |t| {
            check(unsafe { ffi::wizard_broadcast(self.raw, ffi::tensor(t), root as c_int) }, "broadcast")
        })
    }

    /// Waits until every rank arrives.
    pub fn barrier(&self) -> Result<(), KernelError> {
        // SAFETY: `raw` is live.
        check(unsafe { ffi::wizard_barrier(self.raw) }, "barrier")
    }
}

/// A collective started by [`ProcessGroup::all_gather_start`], not yet known to be complete.
/// Dropping it waits for it (ignoring errors), so no buffer is freed while the engine writes it.
pub struct PendingCollective<'g> {
    group: &'g ProcessGroup,
    raw: *mut WizardWork,
    staged: Tensor,
    output: Tensor,
    _input: Tensor,
    waited: bool,
}

impl PendingCollective<'_> {
    /// Blocks until the collective completes (or the group's timeout passes).
    pub fn wait(mut self) -> Result<(), KernelError> {
        self.waited = true;
        // SAFETY: both pointers are live: the work until Drop, the group for 'g.
        check(unsafe { ffi::wizard_work_wait(self.group.raw, self.raw) }, "all-gather")?;
        if self.output.device() != self.group.home {
            self.output.copy_(&self.staged);
        }
        Ok(())
    }
}

impl Drop for PendingCollective<'_> {
    fn drop(&mut self) {
        // SAFETY: as in `wait`; the work is freed exactly once, here.
        unsafe {
            if !self.waited {
                let _ = ffi::wizard_work_wait(self.group.raw, self.raw);
            }
            ffi::wizard_work_free(self.raw);
        }
    }
}

/// Creates a group through `create(host, timeout_ms, &mut raw)`, checking its status.
fn join(
    host: &str,
    timeout: Duration,
    create: impl FnOnce(*const c_char, c_long, *mut *mut WizardGroup) -> Result<(), KernelError>,
) -> Result<*mut WizardGroup, KernelError> {
    let host_c = CString::new(host).map_err(|_| KernelError::Torch {
        operation: "join process group",
        message: format!("host {host:?} contains a NUL byte"),
    })?;
    let mut raw = std::ptr::null_mut();
    let timeout_ms = timeout.as_millis().min(c_long::MAX as u128) as c_long;
    create(host_c.as_ptr(), timeout_ms, &mut raw)?;
    Ok(raw)
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // SAFETY: `raw` came from wizard_group_new_gloo and is freed once.
        unsafe { ffi::wizard_group_free(self.raw) }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    /// Runs `body(group)` on `size` ranks, each a thread with its own group, and returns their results.
    pub(crate) fn check_ranks<T: Send + 'static>(size: usize, body: fn(&ProcessGroup) -> T) -> Vec<T> {
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

    pub(crate) fn values(tensor: &Tensor) -> Vec<f32> {
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

    /// A started all-gather completes while the rank computes and runs other collectives.
    #[test]
    fn a_started_all_gather_overlaps_other_work() {
        let results = check_ranks(2, |group| {
            let r = group.rank() as f32 + 1.0;
            let gathered = Tensor::zeros([4], (Kind::Float, Device::Cpu));
            let pending = group.all_gather_start(&gathered, &Tensor::from_slice(&[r, 10.0 * r])).unwrap();
            let product = Tensor::ones([64, 64], (Kind::Float, Device::Cpu))
                .matmul(&Tensor::ones([64, 64], (Kind::Float, Device::Cpu)));
            let mut summed = Tensor::from_slice(&[r]);
            group.all_reduce_sum(&mut summed).unwrap();
            pending.wait().unwrap();
            (values(&gathered), values(&summed), product.double_value(&[0, 0]))
        });
        for (gathered, summed, product) in results {
            assert_eq!(gathered, vec![1.0, 10.0, 2.0, 20.0]);
            assert_eq!(summed, vec![3.0]);
            assert_eq!(product, 64.0);
        }
    }

    #[test]
    fn a_missing_peer_is_an_error_within_the_timeout() {
        let start = std::time::Instant::now();
        let result = ProcessGroup::gloo("127.0.0.1", free_port(), 0, 2, Duration::from_secs(2));
        assert!(result.is_err());
        assert!(start.elapsed() < Duration::from_secs(30), "{:?}", start.elapsed());
    }

    /// NCCL needs a GPU per rank: without CUDA, joining is an error that says so; with one, a group
    /// of one rank runs every collective on the GPU, staging host tensors through it.
    #[test]
    fn nccl_runs_on_the_gpu_or_says_why_not() {
        let joined = ProcessGroup::nccl("127.0.0.1", free_port(), 0, 1, Duration::from_secs(20), 0);
        if crate::runtime::cuda_device_count() == 0 {
            let message = joined.err().expect("NCCL without a GPU").to_string();
            assert!(message.contains("NCCL"), "{message}");
            return;
        }
        let group = joined.unwrap();
        let gpu = Device::Cuda(0);
        let mut on_gpu = Tensor::from_slice(&[1.0f32, 2.0]).to_device(gpu);
        group.all_reduce_sum(&mut on_gpu).unwrap();
        let mut on_host = Tensor::from_slice(&[3.0f32]);
        group.all_reduce_sum(&mut on_host).unwrap();
        let mut gathered = Tensor::zeros([2], (Kind::Float, gpu));
        group.all_gather(&mut gathered, &Tensor::from_slice(&[4.0f32, 5.0])).unwrap();
        let mut scattered = Tensor::zeros([2], (Kind::Float, gpu));
        group.reduce_scatter_sum(&mut scattered, &Tensor::from_slice(&[6.0f32, 7.0]).to_device(gpu)).unwrap();
        group.broadcast(&mut on_host, 0).unwrap();
        group.barrier().unwrap();
        assert_eq!(on_gpu.device(), gpu);
        assert_eq!(values(&on_gpu.to_device(Device::Cpu)), vec![1.0, 2.0]);
        assert_eq!(values(&on_host), vec![3.0]);
        assert_eq!(values(&gathered.to_device(Device::Cpu)), vec![4.0, 5.0]);
        assert_eq!(values(&scattered.to_device(Device::Cpu)), vec![6.0, 7.0]);
    }
}
