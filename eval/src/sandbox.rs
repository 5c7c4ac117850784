//! Sandboxed execution of Python programs. A pool of long-lived Python workers (`worker.py`), one per
//! thread, each in an empty network namespace and a new, read-only root, forking per program: a trusted
//! supervisor, and the sample as PID 1 of a new PID namespace with its own mount namespace (fresh /tmp),
//! uid nobody, a minimal environment, resource limits, no stdin, swallowed output and a deadline after
//! which everything it started is killed. The supervisor counts a program as passed only on a message
//! sealed with a secret the program cannot read (see ARCHITECTURE.md, "The sandbox's verdict").
//! Forking a warm interpreter instead of starting one per sample is what makes this faster than the
//! official harness. Where the namespaces cannot be made the run is refused, unless isolation is off.
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::Duration;

use serde::Deserialize;

use crate::error::{EvalError, Result};

const WORKER: &str = include_str!("worker.py");

/// The `--timeout` a sample may get, in seconds: the worker's timer cannot be armed finer than a
/// millisecond; a day at most.
pub const TIMEOUT_SECONDS: std::ops::RangeInclusive<f64> = 0.001..=86_400.0;

/// Limits and resources of the sandbox.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    /// The Python 3 interpreter that runs samples.
    pub python: PathBuf,
    /// Programs run at once (one worker process each).
    pub workers: usize,
    /// Wall-clock limit of one program (the official harness uses 3 s).
    pub timeout: Duration,
    /// Address-space limit (RLIMIT_AS) of a program.
    pub memory_bytes: u64,
    /// Process limit (RLIMIT_NPROC) of the sandbox user.
    pub max_processes: u64,
    /// Largest file a program may write (RLIMIT_FSIZE).
    pub max_file_bytes: u64,
    /// Characters of stdout/stderr kept in memory; the rest is dropped.
    pub output_chars: u64,
    /// Run samples in namespaces (network, mount with a new root, PID) and refuse to start where the
    /// kernel does not allow them. `false` (`--no-isolation`) runs them without: only the sealed verdict,
    /// the clean environment, uid nobody and the limits remain.
    pub isolation: bool,
}

impl SandboxConfig {
    /// Defaults: 3 s, 2 GiB, 256 processes, 16 MiB files, 1 Mi characters of output, one worker per core.
    pub fn new(python: PathBuf) -> SandboxConfig {
        SandboxConfig {
            python,
            workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
            timeout: Duration::from_secs(3),
            memory_bytes: 2 << 30,
            max_processes: 256,
            max_file_bytes: 16 << 20,
            output_chars: 1 << 20,
            isolation: true,
        }
    }
}

/// How a program ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// It ran to the end without an exception.
    Passed,
    /// It raised (a failed assertion, an error, `SystemExit`) or died.
    Failed,
    /// It ran past the timeout.
    TimedOut,
}

impl Status {
    /// `passed`, `failed` or `timed out`.
    pub fn name(self) -> &'static str {
        match self {
            Status::Passed => "passed",
            Status::Failed => "failed",
            Status::TimedOut => "timed out",
        }
    }
}

/// The outcome of one program.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// Passed, failed or timed out.
    pub status: Status,
    /// The official harness's result string: `passed`, `timed out` or `failed: <exception>`; a program
    /// that died or ended before its tests did is `failed: the program died of SIGNAL` or `failed: the
    /// program ended (status N) before its tests did`.
    pub result: String,
    /// Wall time in the sandbox.
    pub seconds: f64,
}

impl Outcome {
    fn from_result(result: String, seconds: f64) -> Outcome {
        let status = match result.as_str() {
            "passed" => Status::Passed,
            "timed out" => Status::TimedOut,
            _ => Status::Failed,
        };
        Outcome { status, result, seconds }
    }
}

/// What the sandbox could set up on this machine (reported by the workers at start-up).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Isolation {
    /// The interpreter's version.
    pub python: String,
    /// Every namespace below was made (always false under `--no-isolation`).
    pub isolated: bool,
    /// What could not be set up.
    pub errors: Vec<String>,
    /// Programs see a new root (system and interpreter directories only): no pathname socket of the host.
    pub private_root: bool,
    /// Programs run in an empty network namespace.
    pub network_namespace: bool,
    /// Why not, if not.
    pub network_error: Option<String>,
    /// /tmp (the working directory) and /dev/shm are fresh, size-capped tmpfs mounts for each program.
    pub private_tmp: bool,
    /// Every other mount is read-only to programs.
    pub read_only_root: bool,
    /// Each program is PID 1 of its own PID namespace, so all it forks dies with it.
    pub pid_namespace: bool,
    /// Programs run as uid 65534 (we are root), so they cannot write outside their directory.
    pub uid_nobody: bool,
    /// We are root and uid nobody cannot run the interpreter: the worker refuses to run samples.
    #[serde(default)]
    pub as_root: bool,
}

impl std::fmt::Display for Isolation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let yes = |b: bool| if b { "yes" } else { "no" };
        if !self.isolated {
            write!(f, "NOT ISOLATED; ")?;
        }
        write!(f, "python {}; network namespace: {}", self.python, yes(self.network_namespace))?;
        if let Some(error) = &self.network_error {
            write!(f, " ({error})")?;
        }
        write!(
            f,
            "; private root: {}; private /tmp: {}; read-only /: {}; PID namespace: {}; uid nobody: {}",
            yes(self.private_root),
            yes(self.private_tmp),
            yes(self.read_only_root),
            yes(self.pid_namespace),
            yes(self.uid_nobody)
        )
    }
}

/// One program to run, with a key the caller uses to match the outcome.
#[derive(Debug, Clone)]
pub struct Job {
    /// The caller's key.
    pub key: usize,
    /// The Python program.
    pub program: String,
}

struct Worker {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<std::io::Result<String>>,
}

impl Worker {
    fn start(config: &SandboxConfig) -> Result<(Worker, Isolation)> {
        let error = |message: String| EvalError::Python { python: config.python.clone(), message };
        // The worker, and so every sample, starts from an environment of PATH and LANG only: nothing of
        // the runner's (API keys) is in its memory to be read or to come back in a result.
        let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
        let mut child = Command::new(&config.python)
            .args(["-I", "-c", WORKER])
            .args(if config.isolation { None } else { Some("--no-isolation") })
            .env_clear()
            .env("PATH", path)
            .env("LANG", "C.UTF-8")
            .env("HOME", "/nonexistent")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| {
                error(format!("cannot start it ({e}); install python3 or name one with --python or WIZARD_PYTHON"))
            })?;
        let stdin = child.stdin.take().expect("piped");
        let stdout = child.stdout.take().expect("piped");
        let (sender, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        let mut worker = Worker { child, stdin, lines };
        let hello = worker.receive(Duration::from_secs(30)).map_err(|e| {
            error(format!("the sandbox worker did not start: {e} (is it Python 3.9 or newer on Linux?)"))
        })?;
        let isolation: Isolation =
            serde_json::from_str(&hello).map_err(|e| error(format!("unexpected greeting {hello:?}: {e}")))?;
        // Under --no-isolation too, root is never left to samples.
        if isolation.as_root {
            return Err(EvalError::AsRoot(config.python.clone()));
        }
        if config.isolation && !isolation.isolated {
            return Err(EvalError::Isolation(isolation.errors.join("; ")));
        }
        Ok((worker, isolation))
    }

    fn receive(&mut self, timeout: Duration) -> std::result::Result<String, String> {
        match self.lines.recv_timeout(timeout) {
            Ok(Ok(line)) => Ok(line),
            Ok(Err(e)) => Err(e.to_string()),
            Err(mpsc::RecvTimeoutError::Timeout) => Err(format!("no answer in {timeout:?}")),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err("it exited".into()),
        }
    }

    fn run(&mut self, config: &SandboxConfig, job: &Job) -> std::result::Result<Outcome, String> {
        let request = serde_json::json!({
            "program": job.program,
            "timeout": config.timeout.as_secs_f64(),
            "memory_bytes": config.memory_bytes,
            "max_processes": config.max_processes,
            "max_file_bytes": config.max_file_bytes,
            "output_chars": config.output_chars,
        });
        writeln!(self.stdin, "{request}").and_then(|()| self.stdin.flush()).map_err(|e| e.to_string())?;
        let line = self.receive(config.timeout + Duration::from_secs(10))?;
        #[derive(Deserialize)]
        struct Answer {
            result: String,
            seconds: f64,
        }
        let answer: Answer = serde_json::from_str(&line).map_err(|e| format!("bad answer {line:?}: {e}"))?;
        Ok(Outcome::from_result(answer.result, answer.seconds))
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Checks that the interpreter starts a worker, and says what isolation it gets; refuses (an
/// [`EvalError::Isolation`]) where samples cannot be isolated and `config.isolation` asks for it.
pub fn probe(config: &SandboxConfig) -> Result<Isolation> {
    Worker::start(config).map(|(_, isolation)| isolation)
}

/// Runs every job in the sandbox, `config.workers` at a time, calling `on_outcome` on this thread as each
/// finishes (in completion order). A worker that dies is replaced; its program counts as failed.
pub fn run(
    config: &SandboxConfig,
    jobs: Vec<Job>,
    mut on_outcome: impl FnMut(usize, Outcome) -> Result<()>,
) -> Result<Isolation> {
    if config.workers == 0 {
        return Err(EvalError::Invalid("the sandbox needs at least one worker".into()));
    }
    let (first, isolation) = Worker::start(config)?;
    if !isolation.isolated {
        tracing::warn!("samples run WITHOUT isolation: they can reach the network, the host's files and sockets");
    }
    let workers = config.workers.min(jobs.len().max(1));
    let queue = Mutex::new(jobs.into_iter());
    let (sender, outcomes) = mpsc::channel::<Result<(usize, Outcome)>>();
    std::thread::scope(|scope| {
        let mut first = Some(first);
        for _ in 0..workers {
            let sender = sender.clone();
            let queue = &queue;
            let mut worker = first.take();
            scope.spawn(move || loop {
                let Some(job) = queue.lock().expect("queue").next() else { break };
                let current = match worker.take() {
                    Some(current) => current,
                    None => match Worker::start(config) {
                        Ok((current, _)) => current,
                        Err(e) => {
                            let _ = sender.send(Err(e));
                            break;
                        }
                    },
                };
                let mut current = current;
                let outcome = match current.run(config, &job) {
                    Ok(outcome) => {
                        worker = Some(current);
                        outcome
                    }
                    Err(why) => {
                        tracing::warn!(job = job.key, "sandbox worker lost ({why}); starting another");
                        drop(current);
                        Outcome::from_result(format!("failed: the sandbox worker died ({why})"), 0.0)
                    }
                };
                if sender.send(Ok((job.key, outcome))).is_err() {
                    break;
                }
            });
        }
        drop(sender);
        // On an error the receiver is dropped, and each thread stops after its current program.
        for message in outcomes {
            let (key, outcome) = message?;
            on_outcome(key, outcome)?;
        }
        Ok::<(), EvalError>(())
    })?;
    Ok(isolation)
}
