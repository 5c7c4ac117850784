//! The sandbox against hostile samples, through `wizard eval score` as a user runs it: each escape
//! class as a sample whose code fails its test but tries to be counted as passed, reads the runner's
//! environment, reaches the host or survives into the next sample. Each must be contained with the right
//! outcome, and the run must finish.
mod common;

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener};
use std::path::{Path, PathBuf};

use common::{check_failure, read_lines, stdout_of, write_lines};
use serde_json::json;

/// Set in the runner's environment: it must never reach a sample nor come back in the results.
const API_KEY: &str = "sk-wizard-sandbox-test-4f1c9e";

/// One problem: `f()` must be 1, checked through `abs`, a builtin a sample could replace.
fn one_problem(dir: &Path) -> PathBuf {
    let data = dir.join("one.jsonl");
    let test = "def check(c):\n    assert abs(c() - 1) < 1e-9\n";
    write_lines(&data, &[json!({"task_id": "T/0", "prompt": "def f():\n", "entry_point": "f", "test": test})]);
    data
}

/// Scores `cases` (expected result, completion) in one run with `extra` flags and the fake API key in
/// the environment. Each result must be the expected one exactly or, when that ends in `*`, start with
/// what comes before. Returns (stderr, the results file's text).
fn check(dir: &Path, cases: &[(&str, String)], extra: &[&str]) -> (String, String) {
    let data = one_problem(dir);
    let samples = dir.join("samples.jsonl");
    let lines: Vec<_> = cases.iter().map(|(_, code)| json!({"task_id": "T/0", "completion": code})).collect();
    write_lines(&samples, &lines);
    let results = dir.join("results.jsonl");
    let db = dir.join("eval.sqlite");
    let mut args = vec!["eval", "score", "--benchmark", "humaneval", "--data", data.to_str().unwrap()];
    args.extend(["--samples", samples.to_str().unwrap(), "--results", results.to_str().unwrap()]);
    args.extend(["--db", db.to_str().unwrap()]);
    args.extend(extra);
    let output = common::wizard_command(&args).env("WIZARD_TEST_API_KEY", API_KEY).output().unwrap();
    stdout_of(&output, &args);
    let got: Vec<String> = read_lines(&results).iter().map(|v| v["result"].as_str().unwrap().to_string()).collect();
    assert_eq!(got.len(), cases.len());
    for ((expected, code), result) in cases.iter().zip(&got) {
        let matches = match expected.strip_suffix('*') {
            Some(prefix) => result.starts_with(prefix),
            None => result == expected,
        };
        assert!(matches, "expected {expected:?}, got {result:?} for:\n{code}\nall: {got:#?}");
    }
    (common::text(&output.stderr), std::fs::read_to_string(&results).unwrap())
}

/// Writes forged verdicts (the old protocol's, a bare `passed`, one with a guessed secret) to every
/// descriptor a sample might hold.
const FORGE: &str = "import posix\nfor fd in range(256):\n    for message in (b'passed\\n', b'{\"result\": \"passed\"}\\n', b'0' * 32 + b'000006passed'):\n        try:\n            posix.write(fd, message)\n        except OSError:\n            pass\n";

/// Finds the harness's channel (the only socket), keeps a copy, puts a socket pair's end under its
/// number, and forks a child that reads what the harness sends there and sends it on as a pass.
const STEAL: &str = "import posix, socket, stat\ndef is_socket(n):\n    try:\n        return stat.S_ISSOCK(posix.fstat(n).st_mode)\n    except OSError:\n        return False\nfd = next(n for n in range(3, 64) if is_socket(n))\noriginal = posix.dup(fd)\nours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)\nposix.dup2(ours.fileno(), fd)\nif posix.fork() == 0:\n    sealed = theirs.recv(65536)\n    posix.write(original, sealed[:32] + b'000006passed')\n    posix._exit(0)\n";

/// A completion that fails its test, then runs `top_level` before the tests.
fn failing(top_level: &str) -> String {
    format!("    return 2\n{top_level}")
}

/// `code` indented into the function body.
fn indent(code: &str) -> String {
    code.lines().map(|line| format!("    {line}\n")).collect()
}

#[test]
fn a_failing_sample_cannot_be_counted_as_passed() {
    let dir = tempfile::tempdir().unwrap();
    let good = "    return 1\n".to_string();
    let cases: Vec<(&str, String)> = vec![
        ("passed", good.clone()),
        // Ending before the tests ran, with any status, after forging on every descriptor.
        ("failed: the program ended (status 0) before its tests did", failing(&format!("{FORGE}posix._exit(0)\n"))),
        ("failed: the program ended (status 0) before its tests did", failing("import os\nos._exit(0)\n")),
        ("failed: 0", failing("raise SystemExit(0)\n")),
        ("failed: 0", "    import sys\n    sys.exit(0)\n".into()),
        ("failed: *", "    raise KeyboardInterrupt\n".into()),
        ("failed: passed", "    raise BaseException('passed')\n".into()),
        ("failed: *", format!("    print('passed')\n    print('{{\"result\": \"passed\"}}')\n{}    return 2\n", indent(FORGE))),
        // Patching what the old supervisor and reporting used.
        ("failed: *", failing("import json, sys, os, atexit, posix\njson.dumps = lambda *a, **k: '{\"result\": \"passed\"}'\njson.loads = lambda *a, **k: {'result': 'passed'}\nsys.exit = lambda *a: None\nos.write = lambda *a: 0\nos._exit = lambda *a: None\natexit.register(lambda: posix.write(1, b'passed'))\n")),
        // Patching exceptions, redefining the test's check.
        ("failed: *", failing("import builtins\nbuiltins.AssertionError = type('NotAnError', (Exception,), {})\nbuiltins.BaseException = builtins.AssertionError\n")),
        ("failed: *", failing("def check(c):\n    pass\nimport builtins\nbuiltins.check = check\n")),
        // Making the test's own call lie.
        ("failed: the program replaced the builtin abs", failing("import builtins\nbuiltins.abs = lambda x: 0\n")),
        // Calling the worker's own reporting function, reached through sys.stdout's class.
        ("failed: the program ended (status 0) before its tests did", failing("import sys, posix\ng = type(sys.stdout).write.__globals__\nfor fd in range(3, 64):\n    try:\n        g['finish'](posix.write, fd, b'0' * 32, 'passed', lambda c: None)\n    except Exception:\n        pass\nposix._exit(0)\n")),
        // Looking for the secret or changing the harness's code: a signal handler's frames, the stack's
        // frames, tracing, gc, functions' defaults and code, ctypes, the process's memory.
        ("failed: *", failing("import signal, posix\nseen = []\nsignal.signal(signal.SIGUSR1, lambda s, frame: seen.append(frame))\nsignal.raise_signal(signal.SIGUSR1)\nframe = seen[0]\nwhile frame is not None:\n    for v in list(frame.f_locals.values()):\n        if isinstance(v, bytes) and len(v) == 32:\n            for fd in range(3, 64):\n                try:\n                    posix.write(fd, v + b'000006passed')\n                except OSError:\n                    pass\n    frame = frame.f_back\n")),
        ("failed: *", "    import sys, posix\n    frame = sys._getframe()\n    while frame is not None:\n        for v in list(frame.f_locals.values()) + list(frame.f_globals.values()):\n            if isinstance(v, bytes) and len(v) == 32:\n                for fd in range(3, 64):\n                    try:\n                        posix.write(fd, v + b'000006passed')\n                    except OSError:\n                        pass\n        frame = frame.f_back\n    return 2\n".into()),
        ("failed: the sandbox refuses sys.settrace", failing("import sys\ndef skip(frame, event, arg):\n    return skip\nsys.settrace(skip)\n")),
        ("failed: the sandbox refuses gc.get_objects", failing("import gc\nfound = [o for o in gc.get_objects() if isinstance(o, bytes)]\n")),
        ("failed: the sandbox refuses gc.get_referents", failing("import gc, sys\ngc.get_referents(sys._getframe())\n")),
        ("failed: the sandbox refuses access to its import guard's __defaults__", "    import _imp\n    _imp.create_dynamic.__defaults__\n    return 2\n".into()),
        ("failed: the sandbox refuses to replace a function's __code__", "    import _imp\n    _imp.create_builtin.__code__ = (lambda spec: None).__code__\n    return 2\n".into()),
        // Rewriting the reporting function the trusted frame will call with the secret after the program.
        ("failed: the sandbox refuses to replace a function's __code__", failing("import __main__\ndef evil(write, fstat, channel, identity, secret, result, exit_):\n    write(channel, secret + b'%06d' % 6 + b'passed')\n    exit_(0)\n__main__.finish.__code__ = evil.__code__\n")),
        ("failed: the sandbox refuses to replace its own __defaults__", failing("import __main__\n__main__.finish.__defaults__ = (0,)\n")),
        // Bytecode of its own making, which could read the trusted frames' memory: made, unmarshalled,
        // or imported from a .pyc it wrote (the standard library still imports from its caches).
        ("failed: the sandbox refuses code.__new__", failing("def f():\n    return 1\nf.__code__.replace(co_code=f.__code__.co_code)\n")),
        ("failed: the sandbox refuses marshal.loads outside the import system", failing("import marshal\nmarshal.loads(marshal.dumps((lambda: 1).__code__))\n")),
        // The same refusal through _imp, which reports it as an invalid frozen object (the same bytes
        // load outside the sandbox).
        ("failed: Frozen object named 'x' is invalid", failing("import marshal, sys\nsys.modules['_imp'].get_frozen_object('x', marshal.dumps((lambda: 1).__code__))\n")),
        ("failed: the sandbox refuses bytecode from /tmp/evil.pyc", failing("import importlib.machinery as m\nopen('/tmp/evil.pyc', 'wb').write(b'x' * 64)\nm.SourcelessFileLoader('evil', '/tmp/evil.pyc').get_code('evil')\n")),
        ("failed: the sandbox refuses bytecode from '/tmp/evil.bin'", failing("import importlib.machinery as m, importlib.util, marshal\nopen('/tmp/evil.bin', 'wb').write(importlib.util.MAGIC_NUMBER + bytes(12) + marshal.dumps((lambda: 1).__code__))\nm.SourcelessFileLoader('evil', '/tmp/evil.bin').get_code('evil')\n")),
        ("failed: the sandbox refuses bytecode from '/usr/lib/x.pyc'", failing("import importlib.machinery as m, importlib.util, marshal\nclass L(m.SourcelessFileLoader):\n    def get_data(self, path):\n        return importlib.util.MAGIC_NUMBER + bytes(12) + marshal.dumps((lambda: 1).__code__)\nL('x', '/usr/lib/x.pyc').get_code('x')\n")),
        ("failed: the sandbox refuses bytecode from '/usr/lib/x.pyc'", failing("import importlib.machinery as m, importlib.util, marshal\nm.SourcelessFileLoader.__mro__[1].get_data = lambda self, path: importlib.util.MAGIC_NUMBER + bytes(12) + marshal.dumps((lambda: 1).__code__)\nm.SourcelessFileLoader('x', '/usr/lib/x.pyc').get_code('x')\n")),
        ("passed", "    import fractions, statistics, decimal\n    return 1\n".into()),
        // Native code the sample brings: an extension module written where the sample may write.
        ("failed: the sandbox refuses native code from /tmp/*", failing("import _bisect, sys\nopen('/tmp/' + _bisect.__file__.rsplit('/', 1)[1], 'wb').write(open(_bisect.__file__, 'rb').read())\ndel sys.modules['_bisect']\nsys.path.insert(0, '/tmp')\nimport _bisect\n")),
        ("failed: the sandbox refuses to import ctypes", "    import ctypes\n    return 2\n".into()),
        ("failed: the sandbox refuses to import _ctypes", "    import importlib.util\n    importlib.util.module_from_spec(importlib.util.find_spec('_ctypes'))\n    return 2\n".into()),
        ("failed: [Errno 2] No such file or directory: '/proc/self/mem'", "    open('/proc/self/mem', 'rb')\n    return 2\n".into()),
        // A thread that would forge verdicts while the test fails, or swap the harness's channel.
        ("failed: the sandbox refuses threads", failing("import threading, posix\ndef spam():\n    while True:\n        for fd in range(3, 16):\n            try:\n                posix.write(fd, b'0' * 32 + b'000006passed')\n            except OSError:\n                pass\nthreading.Thread(target=spam, daemon=True).start()\n")),
        ("failed: the sandbox refuses to import _thread", failing("import sys\ndel sys.modules['_thread']\nimport _thread\n")),
        // Putting its own socket under the channel's number, to read the sealed result in a child
        // and send it on, turned into a pass, through the original.
        ("failed: the program ended (status 3) before its tests did", failing(STEAL)),
        // Killing its parent, every process it can, and init of its namespace (itself).
        ("failed: *", "    import posix, signal\n    for pid in (posix.getppid(), -1, 1):\n        try:\n            posix.kill(pid, signal.SIGKILL)\n        except OSError:\n            pass\n    return 2\n".into()),
        // Crashes and timeouts stay apart from failures.
        ("failed: the program died of SIGSEGV", "    import sys\n    sys.setrecursionlimit(10 ** 7)\n    def r(n):\n        return list(map(r, [n + 1]))\n    r(0)\n".into()),
        ("timed out", "    while True:\n        pass\n".into()),
        ("timed out", "    while True:\n        try:\n            while True:\n                pass\n        except BaseException:\n            pass\n".into()),
        ("passed", good),
    ];
    let (stderr, _) = check(dir.path(), &cases, &["--workers", "2", "--timeout", "1"]);
    assert!(stderr.contains("private root: yes") && !stderr.contains("NOT ISOLATED"), "{stderr}");
}

#[test]
fn nothing_leaks_in_or_out() {
    let dir = tempfile::tempdir().unwrap();
    // Host sockets: a pathname one in the system's temporary directory (world-writable, as a careless
    // service would leave it), one in the target directory, and an abstract one.
    let in_tmp = dir.path().join("host.sock");
    let in_target = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let in_target = in_target.path().join("host.sock");
    let abstract_name = format!("wizard-sandbox-test-{}", std::process::id());
    let listeners = [
        UnixListener::bind(&in_tmp).unwrap(),
        UnixListener::bind(&in_target).unwrap(),
        UnixListener::bind_addr(&SocketAddr::from_abstract_name(&abstract_name).unwrap()).unwrap(),
    ];
    for path in [&in_tmp, &in_target] {
        common::python(&format!("import os; os.chmod({:?}, 0o777)", path.to_str().unwrap()), &[]);
    }
    for listener in &listeners {
        listener.set_nonblocking(true).unwrap();
    }
    let connect = format!(
        "    import socket\n    for address in ({:?}, {:?}, '\\0{abstract_name}'):\n        s = socket.socket(socket.AF_UNIX)\n        try:\n            s.connect(address)\n            s.send(b'hi')\n        except OSError:\n            pass\n    return 2\n",
        in_tmp.to_str().unwrap(),
        in_target.to_str().unwrap()
    );
    let cases: Vec<(&str, String)> = vec![
        // The environment is PATH, LANG and HOME (and the official guard's OMP_NUM_THREADS), in every copy.
        (
            "failed: {'PATH': '/usr/local/bin:/usr/bin:/bin', 'LANG': 'C.UTF-8', 'HOME': '/tmp', 'OMP_NUM_THREADS': '1'}",
            "    import os\n    assert False, dict(os.environ)\n".into(),
        ),
        ("failed: *", "    import posix\n    assert False, repr(posix.environ)\n".into()),
        ("failed: [Errno 2] No such file or directory: '/proc/1/environ'", "    open('/proc/1/environ').read()\n".into()),
        ("failed: *", connect),
        ("failed: [Errno 101] Network is unreachable", "    import socket\n    socket.create_connection(('1.1.1.1', 53), timeout=1)\n".into()),
    ];
    let (_, results) = check(dir.path(), &cases, &["--workers", "2"]);
    assert!(!results.contains(API_KEY) && !results.contains("WIZARD_TEST_API_KEY"), "{results}");
    for listener in &listeners {
        assert!(listener.accept().is_err(), "a sample connected to {:?}", listener.local_addr().unwrap());
    }
}

#[test]
fn nothing_survives_into_the_next_sample() {
    let dir = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let host = outside.path().join("left");
    // Files in /tmp, the working directory and /dev/shm, FIFOs, a symbolic link loop and one to /, a
    // background process that writes later, and a try at the host's directories.
    let leave = format!(
        "    import posix, time\n    open('/tmp/left', 'w').write('x')\n    open('left', 'w').write('x')\n    posix.mkfifo('/tmp/fifo')\n    posix.mkfifo('fifo')\n    posix.symlink('loop-b', 'loop-a')\n    posix.symlink('loop-a', 'loop-b')\n    posix.symlink('/', 'root')\n    posix.mkdir('/dev/shm/shared')\n    try:\n        open({host:?}, 'w').write('x')\n    except OSError:\n        pass\n    if posix.fork() == 0:\n        posix.setsid()\n        time.sleep(0.5)\n        open('/tmp/late', 'w').write('x')\n        posix._exit(0)\n    return 2\n",
        host = host.to_str().unwrap()
    );
    // Correct only where nothing of an earlier sample is left.
    let clean = "    import posix, time\n    time.sleep(0.6)\n    left = posix.listdir('/tmp') + posix.listdir('.') + posix.listdir('/dev/shm')\n    return 1 if not left else left\n";
    let cases: Vec<(&str, String)> =
        vec![("failed: *", leave.clone()), ("passed", clean.into()), ("failed: *", leave), ("passed", clean.into())];
    // One worker: each sample runs after the one before, forked from the same process.
    check(dir.path(), &cases, &["--workers", "1"]);
    assert!(!host.exists(), "a sample wrote {}", host.display());
}

#[test]
fn without_isolation_the_run_says_so_and_still_seals_the_verdict() {
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<(&str, String)> = vec![
        ("passed", "    return 1\n".into()),
        ("failed: the program ended (status 0) before its tests did", failing(&format!("{FORGE}posix._exit(0)\n"))),
        (
            "failed: {'PATH': '/usr/local/bin:/usr/bin:/bin', 'LANG': 'C.UTF-8', 'HOME': '*",
            "    import os\n    assert False, dict(os.environ)\n".into(),
        ),
    ];
    // As root, samples run as uid nobody or not at all: the default interpreter is refused where
    // nobody cannot read its standard library (under /root, as a pyenv of root's puts it), and
    // /usr/bin/python3 is taken.
    let root = common::text(&std::process::Command::new("id").arg("-u").output().unwrap().stdout).trim() == "0";
    let data = one_problem(dir.path());
    let samples = dir.path().join("default.jsonl");
    write_lines(&samples, &[json!({"task_id": "T/0", "completion": "    return 1\n"})]);
    let default = common::wizard_command(&["eval", "score", "--benchmark", "humaneval", "--no-isolation", "--data"])
        .args([data.as_os_str(), "--samples".as_ref(), samples.as_os_str()])
        .output()
        .unwrap();
    if !default.status.success() {
        assert!(root, "refused, not as root: {}", common::text(&default.stderr));
        check_failure(&default, "an interpreter nobody can read", &["samples would run as root"]);
    }
    let mut extra = vec!["--no-isolation", "--workers", "1"];
    if !default.status.success() {
        extra.extend(["--python", "/usr/bin/python3"]);
    }
    let (stderr, results) = check(dir.path(), &cases, &extra);
    assert!(stderr.contains("WARNING: --no-isolation") && stderr.contains("NOT ISOLATED"), "{stderr}");
    assert!(!results.contains(API_KEY), "{results}");
}

#[test]
fn where_namespaces_are_refused_the_run_is_refused_unless_told() {
    // A machine without namespaces, made here: an interpreter in a user namespace that may create no
    // further one (the outer namespace allows one child, which it is).
    let can_take_away = std::process::Command::new("unshare").args(["--user", "--map-root-user", "true"]).status();
    // The sandbox needs namespaces anyway: where there are none, every eval test is refused.
    assert!(can_take_away.is_ok_and(|s| s.success()), "no user namespaces here: the sandbox cannot run");
    let dir = tempfile::tempdir().unwrap();
    let python = dir.path().join("python-without-namespaces");
    let script = format!(
        "#!/bin/sh\nexec unshare --user --map-root-user sh -c 'echo 1 > /proc/sys/user/max_user_namespaces && exec unshare --user --map-user=1000 --map-group=1000 \"$0\" \"$@\"' {:?} \"$@\"\n",
        common::PYTHON
    );
    std::fs::write(&python, script).unwrap();
    common::python(&format!("import os; os.chmod({:?}, 0o755)", python.to_str().unwrap()), &[]);
    let data = one_problem(dir.path());
    let samples = dir.path().join("samples.jsonl");
    write_lines(&samples, &[json!({"task_id": "T/0", "completion": "    return 1\n"})]);
    let args = [
        "eval",
        "score",
        "--benchmark",
        "humaneval",
        "--data",
        data.to_str().unwrap(),
        "--samples",
        samples.to_str().unwrap(),
        "--python",
        python.to_str().unwrap(),
    ];
    let refused = common::wizard(&args);
    common::check_failure(&refused, args, &["the sandbox cannot isolate samples here", "--no-isolation"]);
    let cases: Vec<(&str, String)> = vec![
        ("passed", "    return 1\n".into()),
        ("failed: the program ended (status 0) before its tests did", failing(&format!("{FORGE}posix._exit(0)\n"))),
    ];
    let (stderr, _) = check(dir.path(), &cases, &["--no-isolation", "--python", python.to_str().unwrap()]);
    assert!(stderr.contains("WARNING: --no-isolation") && stderr.contains("NOT ISOLATED"), "{stderr}");
}
