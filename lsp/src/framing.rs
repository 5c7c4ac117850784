//! Limits on a TCP client's messages, read before tower-lsp buffers them: a header section of at
//! most [`MAX_HEADER_BYTES`] and a `Content-Length` of at most [`MAX_CONTENT_BYTES`]. Past either
//! the session ends, where the codec would keep buffering (a header without an end, or a length in
//! the gigabytes, held the bytes until the process ran out of memory).
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};

/// The longest header section (`Content-Length`, `Content-Type`, their line ends).
pub const MAX_HEADER_BYTES: usize = 8 << 10;
/// The largest message body (a whole document in `didOpen`).
pub const MAX_CONTENT_BYTES: u64 = 128 << 20;

/// Passes a stream through unchanged while it keeps to the limits.
pub struct Limited<R> {
    inner: R,
    /// The current header section's bytes; `None` inside a body.
    header: Option<Vec<u8>>,
    /// Body bytes still to come.
    body_left: u64,
}

impl<R> Limited<R> {
    /// `inner` from the start of a message.
    pub fn new(inner: R) -> Limited<R> {
        Limited { inner, header: Some(Vec::new()), body_left: 0 }
    }

    /// Follows `bytes` through headers and bodies.
    fn follow(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            let Some(header) = self.header.as_mut() else {
                let taken = bytes.len().min(usize::try_from(self.body_left).unwrap_or(usize::MAX));
                bytes = &bytes[taken..];
                self.body_left -= taken as u64;
                if self.body_left == 0 {
                    self.header = Some(Vec::new());
                }
                continue;
            };
            let (byte, rest) = (bytes[0], &bytes[1..]);
            bytes = rest;
            header.push(byte);
            if header.len() > MAX_HEADER_BYTES {
                return Err(refused(format!("a message's header is longer than {MAX_HEADER_BYTES} bytes")));
            }
            if header.ends_with(b"\r\n\r\n") {
                let length = content_length(header);
                if length > MAX_CONTENT_BYTES {
                    return Err(refused(format!(
                        "a message of {length} bytes is over the limit of {MAX_CONTENT_BYTES}"
                    )));
                }
                self.body_left = length;
                self.header = (length == 0).then(Vec::new);
            }
        }
        Ok(())
    }
}

/// The header section's `Content-Length` (0 where missing or unreadable: the codec answers those).
fn content_length(header: &[u8]) -> u64 {
    String::from_utf8_lossy(header)
        .lines()
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, value)| value.trim().parse().ok())
        .unwrap_or(0)
}

fn refused(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

impl<R: AsyncRead + Unpin> AsyncRead for Limited<R> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            if let Err(error) = this.follow(&buf.filled()[before..]) {
                tracing::warn!(%error, "language-server client cut off");
                return Poll::Ready(Err(error));
            }
        }
        polled
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(chunks: &[&[u8]], refused_at: Option<usize>) {
        let mut limited = Limited::new(tokio::io::empty());
        let outcome = chunks.iter().position(|chunk| limited.follow(chunk).is_err());
        assert_eq!(outcome, refused_at, "{:?}", chunks.iter().map(|c| c.len()).collect::<Vec<_>>());
    }

    #[test]
    fn messages_within_the_limits_pass_and_others_end_the_session() {
        let message = |body: &str| format!("Content-Length: {}\r\n\r\n{body}", body.len()).into_bytes();
        let body = "{\"jsonrpc\":\"2.0\",\"method\":\"initialized\",\"params\":{}}";
        // Whole, split anywhere, several in one read, a body that holds header-like bytes.
        check(&[&message(body), &message(body)], None);
        let bytes = message(body);
        for at in 0..bytes.len() {
            check(&[&bytes[..at], &bytes[at..], &bytes], None);
        }
        check(
            &[&[message(body), message("\r\n\r\nContent-Length: 99999999999\r\n\r\n")].concat(), &message(body)],
            None,
        );
        let big = "x".repeat(MAX_HEADER_BYTES * 4);
        check(&[&message(&big)], None);
        // A header without an end, a length in the gigabytes, either after good messages.
        let endless = format!("X-Pad: {}", "a".repeat(MAX_HEADER_BYTES));
        check(&[&message(body), endless.as_bytes()], Some(1));
        check(&[&message(body), b"Content-Length: 99999999999\r\n\r\n"], Some(1));
        check(&[format!("content-length: {}\r\n\r\n", MAX_CONTENT_BYTES + 1).as_bytes()], Some(0));
        check(&[format!("Content-Length: {MAX_CONTENT_BYTES}\r\n\r\n").as_bytes()], None);
    }
}
