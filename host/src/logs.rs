//! A component's stdout and stderr, captured as log lines tagged with its service.
//!
//! Each workload owns a [`LogBuffer`]: a bounded ring of recent lines (old lines
//! are dropped first, and the drop is counted, so a chatty component cannot
//! grow the host's memory) plus a broadcast channel for live followers.
//!
//! Lines are rate-limited per service on the host (a token bucket shared by
//! its replicas, [`LogLimits`]); lines over the rate are dropped, counted in
//! `wharf_log_lines_dropped_total` and reported by a "N lines dropped" line
//! every few seconds. The host's own log (stderr) is written by one thread
//! ([`LogSink`]) fed through a bounded queue, so a guest never waits on a
//! write to stderr: when the queue is full the line is dropped and counted.

use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime};
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
    /// Its number in this buffer, from 1: readers that see a line both in
    /// [`LogBuffer::recent`] and from [`LogBuffer::follow`] keep one.
    pub seq: u64,
}

/// How fast each service may log on a host.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LogLimits {
    /// Lines per second a service may write, over all its replicas on the host.
    pub lines_per_second: f64,
    /// Lines a service may write at once after a quiet spell.
    pub burst: f64,
}

impl Default for LogLimits {
    /// 100 lines/s with bursts of 1,000: far above what a service logs per
    /// request, far below what one core can write in a loop.
    fn default() -> Self {
        LogLimits { lines_per_second: 100.0, burst: 1000.0 }
    }
}

/// Lines the writer thread may have queued; past it lines are dropped.
const WRITE_QUEUE: usize = 4096;

/// How often the writer thread reports dropped lines.
const DROP_REPORT_EVERY: Duration = Duration::from_secs(5);

/// The host's writer of component log lines to its own log, and the rate
/// limiters of the services on it. One per runtime; cheap to clone.
#[derive(Clone)]
pub struct LogSink {
    limits: LogLimits,
    queue: SyncSender<LogLine>,
    /// Live services' limiters by name, so replicas of one service share one.
    /// Held only to look up or insert, never across a write.
    services: Arc<Mutex<HashMap<Arc<str>, Weak<ServiceLog>>>>,
}

impl std::fmt::Debug for LogSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogSink").field("limits", &self.limits).finish_non_exhaustive()
    }
}

impl LogSink {
    /// Starts the writer thread; it ends when the last clone is dropped.
    pub fn start(limits: LogLimits) -> std::io::Result<LogSink> {
        let (queue, lines) = std::sync::mpsc::sync_channel(WRITE_QUEUE);
        let services: Arc<Mutex<HashMap<Arc<str>, Weak<ServiceLog>>>> = Arc::default();
        let reported = Arc::downgrade(&services);
        std::thread::Builder::new().name("wharf-logs".into()).spawn(move || write_lines(&lines, &reported))?;
        Ok(LogSink { limits, queue, services })
    }

    /// The limiter of `service`, shared with its other replicas on this host.
    fn service(&self, service: &Arc<str>, dropped_metric: Counter) -> Arc<ServiceLog> {
        let fresh = || {
            Arc::new(ServiceLog {
                service: service.clone(),
                limits: self.limits,
                bucket: Mutex::new((self.limits.burst, Instant::now())),
                dropped_since_report: AtomicU64::new(0),
                dropped_metric: dropped_metric.clone(),
                queue: self.queue.clone(),
            })
        };
        let Ok(mut services) = self.services.lock() else { return fresh() };
        if let Some(existing) = services.get(service).and_then(Weak::upgrade) {
            return existing;
        }
        services.retain(|_, log| log.strong_count() > 0);
        let log = fresh();
        services.insert(service.clone(), Arc::downgrade(&log));
        log
    }
}

/// The writer thread: writes queued lines to the host's log and, every few
/// seconds, one line per service that had lines dropped.
fn write_lines(lines: &Receiver<LogLine>, services: &Weak<Mutex<HashMap<Arc<str>, Weak<ServiceLog>>>>) {
    let mut next_report = Instant::now() + DROP_REPORT_EVERY;
    loop {
        match lines.recv_timeout(next_report.saturating_duration_since(Instant::now())) {
            Ok(line) => tracing::info!(target: "wharf::component", service = %line.service, stream = line.stream.as_str(), "{}", line.line),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        if Instant::now() < next_report {
            continue;
        }
        next_report = Instant::now() + DROP_REPORT_EVERY;
        let Some(services) = services.upgrade() else { return };
        let live: Vec<Arc<ServiceLog>> = services.lock().map(|s| s.values().filter_map(Weak::upgrade).collect()).unwrap_or_default();
        for log in live {
            let dropped = log.dropped_since_report.swap(0, Ordering::Relaxed);
            if dropped > 0 {
                tracing::warn!(
                    target: "wharf::component",
                    service = %log.service,
                    "{dropped} log lines dropped in the last {DROP_REPORT_EVERY:?} (over {} lines/s, or the host's log writer was behind)",
                    log.limits.lines_per_second
                );
            }
        }
    }
}

/// One service's token bucket and its path to the writer thread.
#[derive(Debug)]
struct ServiceLog {
    service: Arc<str>,
    limits: LogLimits,
    /// Tokens left and when they were last counted.
    bucket: Mutex<(f64, Instant)>,
    dropped_since_report: AtomicU64,
    dropped_metric: Counter,
    queue: SyncSender<LogLine>,
}

impl ServiceLog {
    /// Takes a token for one line; false (and the drop counted) if none is left.
    fn admit(&self) -> bool {
        let admitted = self.bucket.lock().is_ok_and(|mut bucket| {
            let now = Instant::now();
            let (tokens, since) = *bucket;
            let tokens = (tokens + now.duration_since(since).as_secs_f64() * self.limits.lines_per_second).min(self.limits.burst);
            let admitted = tokens >= 1.0;
            *bucket = (if admitted { tokens - 1.0 } else { tokens }, now);
            admitted
        });
        if !admitted {
            self.dropped();
        }
        admitted
    }

    fn dropped(&self) {
        self.dropped_since_report.fetch_add(1, Ordering::Relaxed);
        self.dropped_metric.inc();
    }

    /// Queues a line for the host's log without waiting.
    fn write(&self, line: LogLine) {
        if let Err(TrySendError::Full(_)) = self.queue.try_send(line) {
            self.dropped();
        }
    }
}

/// Recent log lines of one workload. Cheap to clone; clones share the buffer.
#[derive(Debug, Clone)]
pub struct LogBuffer {
    service: Arc<str>,
    /// The service's rate limit and way to the host's log.
    out: Arc<ServiceLog>,
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
    /// Lines pushed so far: the last line's `seq`.
    written: u64,
}

impl LogBuffer {
    /// A buffer for `service` keeping at most `capacity` lines, writing
    /// through `sink` within its rate; drops are counted in `dropped_metric`.
    pub fn new(service: Arc<str>, capacity: usize, sink: &LogSink, dropped_metric: Counter) -> Self {
        let (live, _) = broadcast::channel(256);
        LogBuffer {
            out: sink.service(&service, dropped_metric),
            service,
            ring: Arc::new(Mutex::new(Ring { lines: VecDeque::new(), capacity: capacity.max(1), dropped: 0, written: 0 })),
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
        if !self.out.admit() {
            return;
        }
        let mut line = LogLine {
            time: SystemTime::now(),
            service: self.service.clone(),
            stream,
            line: String::from_utf8_lossy(text).into_owned(),
            seq: 0,
        };
        // Numbered and sent to followers under the ring's lock, so followers
        // see lines in `seq` order.
        if let Ok(mut ring) = self.ring.lock() {
            ring.written += 1;
            line.seq = ring.written;
            if ring.lines.len() == ring.capacity {
                ring.lines.pop_front();
                ring.dropped += 1;
            }
            ring.lines.push_back(line.clone());
            // Nobody following is the common case, not an error.
            let _ = self.live.send(line.clone());
        }
        self.out.write(line);
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

    fn buffer(capacity: usize, limits: LogLimits) -> (LogBuffer, Counter) {
        let sink = LogSink::start(limits).expect("writer thread");
        let dropped = Counter::default();
        (LogBuffer::new("default/t".into(), capacity, &sink, dropped.clone()), dropped)
    }

    #[test]
    fn splits_lines_and_keeps_the_buffer_bounded() {
        let (buffer, _) = buffer(3, LogLimits::default());
        let out = buffer.stream(LogStream::Stdout);
        out.write_bytes(b"one\ntw");
        out.write_bytes(b"o\nthree\nfour\nfi");
        out.finish();
        let lines: Vec<String> = buffer.recent().into_iter().map(|l| l.line).collect();
        assert_eq!(lines, ["three", "four", "fi"]);
        assert_eq!(buffer.dropped(), 2);
    }

    #[test]
    fn lines_are_numbered_in_the_ring_and_for_followers_alike() {
        let (buffer, _) = buffer(2, LogLimits::default());
        let mut follower = buffer.follow();
        let out = buffer.stream(LogStream::Stderr);
        out.write_bytes(b"a\nb\nc\n");
        let kept: Vec<(u64, String)> = buffer.recent().into_iter().map(|l| (l.seq, l.line)).collect();
        assert_eq!(kept, [(2, "b".to_string()), (3, "c".to_string())]);
        let followed: Vec<u64> = (0..3).map(|_| follower.try_recv().expect("a line").seq).collect();
        assert_eq!(followed, [1, 2, 3]);
    }

    #[test]
    fn lines_over_the_rate_are_dropped_and_counted_per_service() {
        let limits = LogLimits { lines_per_second: 10.0, burst: 5.0 };
        let sink = LogSink::start(limits).expect("writer thread");
        let dropped = Counter::default();
        // Two replicas of one service share one bucket.
        let one = LogBuffer::new("ns/chatty".into(), 100, &sink, dropped.clone());
        let two = LogBuffer::new("ns/chatty".into(), 100, &sink, dropped.clone());
        let other = LogBuffer::new("ns/quiet".into(), 100, &sink, Counter::default());
        for i in 0..20 {
            one.push_host_note(&format!("line {i}"));
            two.push_host_note(&format!("line {i}"));
        }
        other.push_host_note("still heard");
        let kept = one.recent().len() + two.recent().len();
        assert!((5..=7).contains(&kept), "a burst of 5 (plus what refilled meanwhile) is kept, got {kept}");
        assert_eq!(dropped.get(), 40 - kept as u64);
        assert_eq!(other.recent().len(), 1, "another service has its own bucket");
        std::thread::sleep(Duration::from_millis(300));
        one.push_host_note("after a pause");
        assert_eq!(one.recent().last().map(|l| l.line.as_str()), Some("after a pause"), "tokens refill at the rate");
    }

    #[test]
    fn cuts_overlong_lines() {
        let (buffer, _) = buffer(3, LogLimits::default());
        let out = buffer.stream(LogStream::Stderr);
        out.write_bytes(&vec![b'x'; MAX_LINE * 2]);
        out.write_bytes(b"\n");
        let line = &buffer.recent()[0];
        assert!(line.line.ends_with("[line cut]"));
        assert!(line.line.len() < MAX_LINE + 32);
        assert_eq!(line.stream, LogStream::Stderr);
    }
}
