//! JSON Lines: one JSON value per line, blank lines skipped. Corpora, instruction data, benchmarks,
//! samples and seeds are all read through [`Lines`], so every error names its line the same way.
use std::io::{self, BufRead};
use std::path::Path;

use serde::de::DeserializeOwned;

use crate::files;

/// Why a line could not be read.
#[derive(Debug, thiserror::Error)]
pub enum LineError {
    /// Reading failed (or a gzip stream is corrupt).
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The line is not UTF-8, not JSON, or not the expected shape.
    #[error("line {line}: {message}")]
    Bad {
        /// 1-based line number.
        line: usize,
        /// What is wrong, with the column when serde knows it.
        message: String,
    },
}

/// The values of a JSON Lines input, one line at a time.
pub struct Lines<R> {
    reader: R,
    /// 1-based number of the line last read.
    line: usize,
    buffer: Vec<u8>,
}

impl Lines<Box<dyn BufRead + Send>> {
    /// The lines of a file, gzipped or not (see [`files::open`]).
    pub fn open(path: &Path) -> io::Result<Self> {
        Ok(Lines::new(files::open(path)?))
    }
}

impl<R: BufRead> Lines<R> {
    /// The lines of `reader`.
    pub fn new(reader: R) -> Self {
        Lines { reader, line: 0, buffer: Vec::new() }
    }

    /// The 1-based number of the line last read (0 before the first).
    pub fn line(&self) -> usize {
        self.line
    }

    /// The next non-blank line as a `T`, or `None` at the end of the input.
    pub fn read<T: DeserializeOwned>(&mut self) -> Result<Option<T>, LineError> {
        loop {
            self.buffer.clear();
            if self.reader.read_until(b'\n', &mut self.buffer)? == 0 {
                return Ok(None);
            }
            self.line += 1;
            let text = std::str::from_utf8(&self.buffer).map_err(|e| self.error(format!("not UTF-8: {e}")))?;
            // As `str::lines` does, so that an error's column is within the line's own text.
            let text = text.strip_suffix('\n').map_or(text, |t| t.strip_suffix('\r').unwrap_or(t));
            if text.trim().is_empty() {
                continue;
            }
            return serde_json::from_str(text).map(Some).map_err(|e| {
                // serde counts lines within this one line: keep its column, drop its line.
                let message = e.to_string();
                let bare = message.rsplit_once(" at line ").map_or(message.as_str(), |(bare, _)| bare);
                match e.column() {
                    0 => self.error(bare.to_string()),
                    column => self.error(format!("{bare} at column {column}")),
                }
            });
        }
    }

    /// An error at the line last read, for a value that parsed but is not acceptable.
    pub fn error(&self, message: impl Into<String>) -> LineError {
        LineError::Bad { line: self.line, message: message.into() }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;

    /// Every value of `text` as JSON, or the first error.
    fn check(text: &[u8], expected: &str) {
        let mut lines = Lines::new(text);
        let mut got = Vec::new();
        loop {
            match lines.read::<Value>() {
                Ok(Some(value)) => got.push(format!("{}={value}", lines.line())),
                Ok(None) => break,
                Err(error) => {
                    got.push(error.to_string());
                    break;
                }
            }
        }
        assert_eq!(got.join(" "), expected, "{text:?}");
    }

    #[test]
    fn blank_lines_are_skipped_and_errors_name_line_and_column() {
        check(b"1\n\n  \n[2]\r\n{\"a\": 3}", "1=1 4=[2] 5={\"a\":3}");
        check(b"", "");
        check(b"1\n{\"a\": ]\n", "1=1 line 2: expected value at column 7");
        check(b"\n{\"a\": ", "line 2: EOF while parsing a value at column 6");
        check(b"{\"a\": 1\r\n", "line 1: EOF while parsing an object at column 7");
        check(b"\"caf\xe9\"\n", "line 1: not UTF-8: invalid utf-8 sequence of 1 bytes from index 4");
    }
}
