//! An LSP client for `wizard serve`: JSON-RPC with Content-Length framing over the child's stdio (or
//! any stream), requests answered by id, notifications kept until asked for.
use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::Duration;

use serde_json::{json, Value};

use super::WIZARD;

/// How long a message may take before the test fails instead of hanging.
const PATIENCE: Duration = Duration::from_secs(60);

/// Writes one framed message.
pub fn write_message(to: &mut impl Write, message: &Value) {
    let body = message.to_string();
    write!(to, "Content-Length: {}\r\n\r\n{body}", body.len()).unwrap();
    to.flush().unwrap();
}

/// Reads one framed message; None at the end of the stream.
pub fn read_message(from: &mut impl BufRead) -> Option<Value> {
    let mut length = None;
    loop {
        let mut line = String::new();
        if from.read_line(&mut line).unwrap_or(0) == 0 {
            return None;
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some(value) = line.strip_prefix("Content-Length: ") {
            length = Some(value.parse::<usize>().unwrap());
        }
    }
    let mut body = vec![0; length.expect("every message has a Content-Length")];
    from.read_exact(&mut body).unwrap();
    Some(serde_json::from_slice(&body).expect("the stream carries only JSON-RPC"))
}

/// A client speaking to a `wizard serve` child process that logs (at info) to its own file.
pub struct Client {
    child: Child,
    stdin: ChildStdin,
    messages: Receiver<Value>,
    next_id: i64,
    /// Notifications and other messages seen while waiting for responses, in arrival order.
    pub seen: Vec<Value>,
    log: tempfile::NamedTempFile,
}

impl Client {
    pub fn start(model: &Path) -> Client {
        Client::start_with(model, &[])
    }

    /// `wizard serve` on `model` with `extra` arguments (`--draft DIR`, ...).
    pub fn start_with(model: &Path, extra: &[&OsStr]) -> Client {
        let log = tempfile::NamedTempFile::new().unwrap();
        let mut command = Command::new(WIZARD);
        command.arg("--log-file").arg(log.path()).args(["serve", "--device", "cpu", "--model"]).arg(model);
        let mut child = command
            .args(extra)
            .env("WIZARD_LOG", "info")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let (sender, messages) = mpsc::channel();
        std::thread::spawn(move || {
            while let Some(message) = read_message(&mut stdout) {
                if sender.send(message).is_err() {
                    return;
                }
            }
        });
        Client { child, stdin, messages, next_id: 0, seen: Vec::new(), log }
    }

    fn send(&mut self, message: Value) {
        write_message(&mut self.stdin, &message);
    }

    pub fn notify(&mut self, method: &str, params: Value) {
        self.send(json!({"jsonrpc": "2.0", "method": method, "params": params}));
    }

    /// Sends a request and returns its id without waiting.
    pub fn request_async(&mut self, method: &str, params: Value) -> i64 {
        self.next_id += 1;
        let id = self.next_id;
        self.send(json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}));
        id
    }

    /// The next message from the server, failing the test on silence or exit.
    fn next(&mut self, waiting_for: &str) -> Value {
        match self.messages.recv_timeout(PATIENCE) {
            Ok(message) => message,
            Err(RecvTimeoutError::Timeout) => panic!("no {waiting_for} in {PATIENCE:?}; seen {:?}", self.seen),
            Err(RecvTimeoutError::Disconnected) => panic!("the server exited; log:\n{}", self.log_text()),
        }
    }

    /// Whether the response to `id` has come (while another was awaited) and waits to be read.
    pub fn has_response(&self, id: i64) -> bool {
        self.seen.iter().any(|m| is_response(m, id))
    }

    /// Waits for the response to `id`: `Ok(result)` or `Err(error)`.
    pub fn response(&mut self, id: i64) -> Result<Value, Value> {
        let answer = |message: &Value| match message.get("error") {
            Some(error) => Err(error.clone()),
            None => Ok(message["result"].clone()),
        };
        // It may have come while another response was awaited.
        if let Some(at) = self.seen.iter().position(|m| is_response(m, id)) {
            return answer(&self.seen.remove(at));
        }
        loop {
            let message = self.next(&format!("response to request {id}"));
            if is_response(&message, id) {
                return answer(&message);
            }
            self.seen.push(message);
        }
    }

    /// Waits for a notification (or server request) named `method`, which may already have come.
    pub fn notification(&mut self, method: &str) -> Value {
        if let Some(at) = self.seen.iter().position(|m| m["method"] == method) {
            return self.seen.remove(at);
        }
        loop {
            let message = self.next(method);
            if message["method"] == method {
                return message;
            }
            self.seen.push(message);
        }
    }

    pub fn request(&mut self, method: &str, params: Value) -> Result<Value, Value> {
        let id = self.request_async(method, params);
        self.response(id)
    }

    pub fn initialize(&mut self, capabilities: Value, options: Value) -> Value {
        let result = self
            .request("initialize", json!({"processId": null, "rootUri": null, "capabilities": capabilities, "initializationOptions": options}))
            .unwrap_or_else(|error| panic!("initialize: {error}"));
        self.notify("initialized", json!({}));
        result
    }

    pub fn open(&mut self, uri: &str, language: &str, text: &str) {
        self.notify(
            "textDocument/didOpen",
            json!({"textDocument": {"uri": uri, "languageId": language, "version": 1, "text": text}}),
        );
    }

    /// Sends `textDocument/inlineCompletion` at `line:character` without waiting.
    pub fn inline_async(&mut self, uri: &str, line: u32, character: u32) -> i64 {
        self.request_async(
            "textDocument/inlineCompletion",
            json!({"textDocument": {"uri": uri}, "position": {"line": line, "character": character}, "context": {"triggerKind": 2}}),
        )
    }

    pub fn inline(&mut self, uri: &str, line: u32, character: u32) -> Result<Value, Value> {
        let id = self.inline_async(uri, line, character);
        self.response(id)
    }

    /// The server's memory map (/proc/PID/maps): which files it has loaded.
    pub fn mapped_files(&self) -> String {
        std::fs::read_to_string(format!("/proc/{}/maps", self.child.id())).unwrap()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    /// `shutdown` then `exit`: the server answers null and exits with success.
    pub fn exit(mut self) {
        assert_eq!(self.request("shutdown", Value::Null), Ok(Value::Null), "shutdown");
        self.notify("exit", Value::Null);
        let mut status = None;
        super::wait_until("the server exiting after `exit`", Duration::from_secs(10), || {
            status = self.child.try_wait().unwrap();
            status.is_some()
        });
        let status = status.unwrap();
        assert!(status.success(), "the server exited with {status}; log:\n{}", self.log_text());
    }
}

impl Drop for Client {
    /// A test that failed halfway leaves no server behind (after `exit` the child is already gone).
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.child.kill().ok();
            self.child.wait().ok();
        }
    }
}

fn is_response(message: &Value, id: i64) -> bool {
    message.get("id") == Some(&json!(id)) && message.get("method").is_none()
}

/// The inline completion's text, or None for a null result.
pub fn inline_text(result: &Value) -> Option<String> {
    (!result.is_null()).then(|| result[0]["insertText"].as_str().unwrap().to_string())
}

/// Every value of the figure `name` in the log (` NAME=VALUE` in a request's span or event), in order.
pub fn figures(log: &str, name: &str) -> Vec<f64> {
    let key = format!(" {name}=");
    log.split(&key)
        .skip(1)
        .map(|rest| {
            let number = rest.split(|c: char| !(c.is_ascii_digit() || c == '.')).next().unwrap_or_default();
            number.parse().unwrap_or_else(|_| panic!("{name}={number:?} is not a number in the log:\n{log}"))
        })
        .collect()
}

/// The last value of the figure `name` in the log.
pub fn last_figure(log: &str, name: &str) -> f64 {
    *figures(log, name).last().unwrap_or_else(|| panic!("no {name} figure in the log:\n{log}"))
}
