//! Where a loading model's memory comes from: weights in 2 MiB pages, large frees handed back.
use crate::ffi;

/// Runs `load` (a model being read, quantized or narrowed) with its weights in 2 MiB pages where
/// the kernel grants transparent huge pages: blocks of 2 MiB or more that libtorch allocates meanwhile
/// are mapped at a 2 MiB boundary and advised for them (csrc/memory.cpp), so a decode step, which
/// streams every weight, walks no page table every 4 KiB. Every freed block of 1 MiB or more is
/// handed back to the OS at once: glibc's heap would otherwise keep the fragments of the buffers
/// loading reads through (hundreds of MiB of peak memory on a 1B model). Afterwards blocks under
/// 32 MiB (the most glibc's own adaptive threshold reaches) come from the heap again, and the heap
/// keeps up to 64 MiB free at its top (as glibc's adaptive trim threshold would), so decoding's
/// temporaries cost no system calls or page faults.
pub fn loading_weights<T>(load: impl FnOnce() -> T) -> T {
    struct HugePages;
    impl Drop for HugePages {
        fn drop(&mut self) {
            ffi::huge_pages_end();
        }
    }
    ffi::huge_pages_begin();
    let _open = HugePages;
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes the allocator's thresholds; it is safe to call at any time.
        unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20) };
        let loaded = load();
        // SAFETY: as above.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
        }
        loaded
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    load()
}

/// Whether the kernel grants transparent huge pages where they are asked for (its setting is
/// `always` or `madvise`).
pub fn huge_pages_granted() -> bool {
    let setting = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
    setting.contains("[always]") || setting.contains("[madvise]")
}

/// This process's memory in transparent huge pages, in bytes (`AnonHugePages`); 0 where the kernel
/// does not say.
pub fn huge_page_bytes() -> u64 {
    let rollup = std::fs::read_to_string("/proc/self/smaps_rollup").unwrap_or_default();
    rollup
        .lines()
        .find_map(|line| line.strip_prefix("AnonHugePages:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

#[cfg(test)]
mod tests {
    use tch::{Device, Kind, Tensor};

    use super::*;

    /// Blocks of 2 MiB or more allocated while loading start at a 2 MiB boundary; smaller ones and
    /// those allocated after do not have to; all of them hold what was written.
    #[test]
    fn large_blocks_allocated_while_loading_are_huge_page_aligned() {
        let aligned = |t: &Tensor| (t.data_ptr() as usize).is_multiple_of(2 << 20);
        let (large, small) = loading_weights(|| {
            let large = Tensor::ones([3 << 18], (Kind::Float, Device::Cpu)); // 3 MiB
            let small = Tensor::ones([1 << 10], (Kind::Float, Device::Cpu));
            (large, small)
        });
        assert!(aligned(&large));
        assert_eq!(large.sum(Kind::Double).double_value(&[]), (3 << 18) as f64);
        assert_eq!(small.sum(Kind::Double).double_value(&[]), 1024.0);
        let after: Vec<Tensor> = (0..4).map(|_| Tensor::ones([3 << 18], (Kind::Float, Device::Cpu))).collect();
        assert!(!after.iter().all(aligned), "blocks allocated after loading come from libtorch's allocator");
        // Freed while other blocks live (the mapping is released, not the neighbours).
        drop(large);
        assert_eq!(small.sum(Kind::Double).double_value(&[]), 1024.0);
    }
}
