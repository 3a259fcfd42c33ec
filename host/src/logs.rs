//! A component's stdout and stderr, captured as log lines tagged with its service.
//!
//! Each workload owns a [`LogBuffer`]: a bounded ring of recent lines (old lines
//! are dropped first, and the drop is counted, so a chatty component cannot
//! grow the host's memory) plus a broadcast channel for live followers.

use bytes::Bytes;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;
use tokio::sync::broadcast;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError};

/// Longest line kept; the rest of a longer line is cut and marked.
const MAX_LINE: usize = 8 * 1024;

/// Which stream a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogStream {
    /// The component's stdout.
    Stdout,
    /// The component's stderr.
    Stderr,
}

impl LogStream {
    /// `stdout` or `stderr`.
    pub fn as_str(self) -> &'static str {
        match self {
            LogStream::Stdout => "stdout",
            LogStream::Stderr => "stderr",
        }
    }
}

/// One line a component wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    /// When the line was completed.
    pub time: SystemTime,
    /// The service that wrote it, `namespace/name`.
    pub service: Arc<str>,
    /// Stdout or stderr.
    pub stream: LogStream,
    /// The text, without its newline; invalid UTF-8 is replaced.
    pub line: String,
}

/// Recent log lines of one workload. Cheap to clone; clones share the buffer.
#[derive(Debug, Clone)]
pub struct LogBuffer {
    service: Arc<str>,
    /// The ring of recent lines and the count of lines dropped to keep it
    /// bounded. A std mutex: it is held only to push or copy lines, never across an await.
    ring: Arc<Mutex<Ring>>,
    live: broadcast::Sender<LogLine>,
}

#[derive(Debug)]
struct Ring {
    lines: VecDeque<LogLine>,
    capacity: usize,
    dropped: u64,
}

impl LogBuffer {
    /// A buffer for `service` keeping at most `capacity` lines.
    pub fn new(service: Arc<str>, capacity: usize) -> Self {
        let (live, _) = broadcast::channel(256);
        LogBuffer {
            service,
            ring: Arc::new(Mutex::new(Ring { lines: VecDeque::new(), capacity: capacity.max(1), dropped: 0 })),
            live,
        }
    }

    /// The most recent lines, oldest first.
    pub fn recent(&self) -> Vec<LogLine> {
        self.ring.lock().map(|ring| ring.lines.iter().cloned().collect()).unwrap_or_default()
    }

    /// How many lines were dropped because the buffer was full.
    pub fn dropped(&self) -> u64 {
        self.ring.lock().map(|ring| ring.dropped).unwrap_or(0)
    }

    /// Follows new lines as they are written.
    pub fn follow(&self) -> broadcast::Receiver<LogLine> {
        self.live.subscribe()
    }

    /// Records a line the host writes on the component's behalf (a denied
    /// call, say), so it shows up where the component's own errors do.
    pub(crate) fn push_host_note(&self, text: &str) {
        self.push(LogStream::Stderr, text.as_bytes());
    }

    fn push(&self, stream: LogStream, text: &[u8]) {
        let line = LogLine {
            time: SystemTime::now(),
            service: self.service.clone(),
            stream,
            line: String::from_utf8_lossy(text).into_owned(),
        };
        tracing::info!(target: "wharf::component", service = %line.service, stream = stream.as_str(), "{}", line.line);
        if let Ok(mut ring) = self.ring.lock() {
            if ring.lines.len() == ring.capacity {
                ring.lines.pop_front();
                ring.dropped += 1;
            }
            ring.lines.push_back(line.clone());
        }
        // Nobody following is the common case, not an error.
        let _ = self.live.send(line);
    }

    /// The WASI stdout/stderr implementation feeding this buffer.
    pub(crate) fn stream(&self, stream: LogStream) -> CapturedOutput {
        CapturedOutput { buffer: self.clone(), stream, partial: Arc::new(Mutex::new(Vec::new())) }
    }
}

/// One instance's stdout or stderr. Bytes are split into lines; a partial
/// line waits for its newline (or for the instance to finish).
#[derive(Clone)]
pub(crate) struct CapturedOutput {
    buffer: LogBuffer,
    stream: LogStream,
    /// The unfinished line. Shared between the clones WASI makes of the stream.
    partial: Arc<Mutex<Vec<u8>>>,
}

impl CapturedOutput {
    fn write_bytes(&self, mut bytes: &[u8]) {
        let Ok(mut partial) = self.partial.lock() else { return };
        while let Some(newline) = bytes.iter().position(|b| *b == b'\n') {
            extend_bounded(&mut partial, &bytes[..newline]);
            self.buffer.push(self.stream, &partial);
            partial.clear();
            bytes = &bytes[newline + 1..];
        }
        extend_bounded(&mut partial, bytes);
    }

    /// Emits a trailing line that never got its newline.
    pub(crate) fn finish(&self) {
        if let Ok(mut partial) = self.partial.lock()
            && !partial.is_empty()
        {
            self.buffer.push(self.stream, &partial);
            partial.clear();
        }
    }
}

fn extend_bounded(partial: &mut Vec<u8>, bytes: &[u8]) {
    const MARK: &[u8] = " …[line cut]".as_bytes();
    if partial.len() >= MAX_LINE {
        return;
    }
    let room = MAX_LINE - partial.len();
    if bytes.len() > room {
        partial.extend_from_slice(&bytes[..room]);
        partial.extend_from_slice(MARK);
    } else {
        partial.extend_from_slice(bytes);
    }
}

impl IsTerminal for CapturedOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for CapturedOutput {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[async_trait::async_trait]
impl Pollable for CapturedOutput {
    async fn ready(&mut self) {}
}

impl OutputStream for CapturedOutput {
    fn write(&mut self, bytes: Bytes) -> Result<(), StreamError> {
        self.write_bytes(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }

    fn check_write(&mut self) -> Result<usize, StreamError> {
        // Always ready: lines are bounded when stored, so writes never block the guest.
        Ok(64 * 1024)
    }
}

impl tokio::io::AsyncWrite for CapturedOutput {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.write_bytes(buf);
        std::task::Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: std::pin::Pin<&mut Self>, _cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: std::pin::Pin<&mut Self>, _cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_lines_and_keeps_the_buffer_bounded() {
        let buffer = LogBuffer::new("default/t".into(), 3);
        let out = buffer.stream(LogStream::Stdout);
        out.write_bytes(b"one\ntw");
        out.write_bytes(b"o\nthree\nfour\nfi");
        out.finish();
        let lines: Vec<String> = buffer.recent().into_iter().map(|l| l.line).collect();
        assert_eq!(lines, ["three", "four", "fi"]);
        assert_eq!(buffer.dropped(), 2);
    }

    #[test]
    fn cuts_overlong_lines() {
        let buffer = LogBuffer::new("default/t".into(), 3);
        let out = buffer.stream(LogStream::Stderr);
        out.write_bytes(&vec![b'x'; MAX_LINE * 2]);
        out.write_bytes(b"\n");
        let line = &buffer.recent()[0];
        assert!(line.line.ends_with("[line cut]"));
        assert!(line.line.len() < MAX_LINE + 32);
        assert_eq!(line.stream, LogStream::Stderr);
    }
}
