//! What a connection is doing, and the clocks that close it when a client
//! takes too long: to send a head, or to come back on a kept-alive
//! connection.
//!
//! hyper cannot tell these apart (its header timer starts when it begins
//! waiting for a head, idle time included), so the connection's socket is
//! wrapped ([`Watched`]) to see the first byte of each request, the service
//! marks the connection busy, and each response body ([`Tracked`]) marks it
//! idle again when hyper has finished with it.

use bytes::Bytes;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio::time::Instant;

/// What a connection waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// The rest of a request head: since the connection (or TLS session)
    /// started, or since the first byte of a later request.
    Head,
    /// A request is being served; the server, not the client, is waited on
    /// (a request body has its own clock, see `body.rs`).
    Busy,
    /// The next request on a kept-alive connection.
    Idle,
}

/// One connection's phase and when it began. Shared by the socket wrapper,
/// the service, the response bodies and the clock; the mutex is held only
/// to read or swap the pair, never across an await.
pub(crate) struct Activity {
    state: Mutex<(Phase, Instant)>,
    /// Wakes [`expiry`] when the phase changes to one with an earlier
    /// deadline. One waiter, so `notify_one` keeps a wake-up that comes
    /// before the clock starts waiting.
    changed: Notify,
}

impl Activity {
    pub(crate) fn new() -> Self {
        Activity { state: Mutex::new((Phase::Head, Instant::now())), changed: Notify::new() }
    }

    fn set(&self, phase: Phase, only_from: Option<Phase>) {
        let Ok(mut state) = self.state.lock() else { return };
        if only_from.is_some_and(|from| state.0 != from) {
            return;
        }
        *state = (phase, Instant::now());
        drop(state);
        self.changed.notify_one();
    }

    /// Bytes arrived: the start of a new head if the connection was idle.
    fn read(&self) {
        self.set(Phase::Head, Some(Phase::Idle));
    }

    /// A request head was read and handed to the service.
    pub(crate) fn busy(&self) {
        self.set(Phase::Busy, None);
    }

    /// A response was written (or abandoned).
    fn idle(&self) {
        self.set(Phase::Idle, None);
    }

    fn snapshot(&self) -> (Phase, Instant) {
        // A poisoned lock means a panic elsewhere on this connection; treat it as busy so only hyper's backstop applies.
        self.state.lock().map(|state| *state).unwrap_or((Phase::Busy, Instant::now()))
    }
}

/// Which clock closed a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expired {
    Head(Duration),
    Idle(Duration),
}

impl std::fmt::Display for Expired {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Expired::Head(limit) => write!(f, "no complete request head within {limit:?}"),
            Expired::Idle(limit) => write!(f, "idle for {limit:?} between requests"),
        }
    }
}

/// Resolves when the connection has waited too long for its client: a head
/// longer than `header`, or an idle spell longer than `idle`. Never while a
/// request is being served.
pub(crate) async fn expiry(activity: &Activity, header: Duration, idle: Duration) -> Expired {
    loop {
        let (phase, since) = activity.snapshot();
        let (deadline, expired) = match phase {
            Phase::Head => (since + header, Expired::Head(header)),
            Phase::Idle => (since + idle, Expired::Idle(idle)),
            Phase::Busy => {
                activity.changed.notified().await;
                continue;
            }
        };
        tokio::select! {
            () = tokio::time::sleep_until(deadline) => {
                // Only if nothing moved on while we slept.
                if activity.snapshot() == (phase, since) {
                    return expired;
                }
            }
            () = activity.changed.notified() => {}
        }
    }
}

/// A connection's socket, reporting the bytes it reads to its [`Activity`].
pub(crate) struct Watched<IO> {
    io: IO,
    activity: Arc<Activity>,
}

impl<IO> Watched<IO> {
    pub(crate) fn new(io: IO, activity: Arc<Activity>) -> Self {
        Watched { io, activity }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Watched<IO> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.read();
        }
        polled
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Watched<IO> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[std::io::IoSlice<'_>]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// A response body that marks its connection idle once hyper drops it
/// (written to the end, or abandoned with the connection).
pub(crate) struct Tracked<B> {
    body: B,
    activity: Arc<Activity>,
}

impl<B> Tracked<B> {
    pub(crate) fn new(body: B, activity: Arc<Activity>) -> Self {
        Tracked { body, activity }
    }
}

impl<B> Drop for Tracked<B> {
    fn drop(&mut self) {
        self.activity.idle();
    }
}

impl<B: http_body::Body<Data = Bytes> + Unpin> http_body::Body for Tracked<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<http_body::Frame<Bytes>, B::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Real time, in tens of milliseconds: the workspace's tokio has no paused clock.
    const HEAD: Duration = Duration::from_millis(100);
    const IDLE: Duration = Duration::from_millis(400);

    #[tokio::test]
    async fn a_new_connection_gets_the_header_clock() {
        let activity = Activity::new();
        let started = Instant::now();
        assert_eq!(expiry(&activity, HEAD, IDLE).await, Expired::Head(HEAD));
        assert!(started.elapsed() >= HEAD && started.elapsed() < IDLE, "{:?}", started.elapsed());
    }

    #[tokio::test]
    async fn idle_then_a_first_byte_switches_to_the_header_clock() {
        let activity = Arc::new(Activity::new());
        activity.busy();
        activity.idle();
        let started = Instant::now();
        let reader = activity.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            reader.read();
        });
        assert_eq!(expiry(&activity, HEAD, IDLE).await, Expired::Head(HEAD));
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(300) && took < IDLE, "200 ms idle, then 100 ms for the head; took {took:?}");
    }

    #[tokio::test]
    async fn a_busy_connection_does_not_expire_until_idle() {
        let activity = Arc::new(Activity::new());
        activity.busy();
        let started = Instant::now();
        let server = activity.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(600)).await;
            server.idle();
        });
        assert_eq!(expiry(&activity, HEAD, IDLE).await, Expired::Idle(IDLE));
        assert!(started.elapsed() >= Duration::from_millis(1000), "busy 600 ms, then idle 400 ms; took {:?}", started.elapsed());
    }

    #[test]
    fn bytes_while_busy_do_not_start_a_head() {
        let activity = Activity::new();
        activity.busy();
        activity.read();
        assert_eq!(activity.snapshot().0, Phase::Busy);
        activity.idle();
        activity.read();
        assert_eq!(activity.snapshot().0, Phase::Head);
    }
}
