//! Process plumbing that needs the OS directly.

/// Makes the kernel send SIGKILL to this process when its parent dies (Linux), so ranks started by
/// `wizard train --nproc` never outlive a launcher that was killed. `parent` is the launcher's pid
/// as it knew it; if the launcher is already gone, this process exits at once.
pub fn die_with_parent(parent: u32) {
    // SAFETY: prctl(PR_SET_PDEATHSIG) and getppid take and return plain integers.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
        if libc::getppid() as u32 != parent {
            libc::_exit(1);
        }
    }
}

/// Keeps memory that training frees inside the process (glibc: no mmap, no trimming). Every step
/// allocates the same large buffers again (the logits of a 49k vocabulary are hundreds of MB), and
/// glibc would map each afresh and page-fault it in: a quarter of a CPU step for a 30M model.
pub fn keep_freed_memory() {
    // SAFETY: mallopt takes two integers and only changes the allocator's parameters.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX);
    }
}

/// Ends the process quietly, as Unix tools do, when what reads its standard output goes away
/// (`wizard doctor | head`): Rust ignores SIGPIPE, and the next print panics. Only for commands
/// whose product is their standard output and that write to no pipe or socket of their own, which
/// SIGPIPE would kill instead of reporting an error.
pub fn end_quietly_when_stdout_closes() {
    // SAFETY: signal() with a valid signal number and SIG_DFL only changes this process's disposition.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
