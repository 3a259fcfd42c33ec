//! A request body that gives up on a client that stops sending.

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::Sleep;

/// A request body as a service receives it: hyper's, with a clock that
/// fails the body when no piece arrives for the body read timeout while
/// the service waits for one. The clock runs only while the service is
/// waiting, so a service that reads slowly never makes its client time out.
pub struct Body {
    inner: Incoming,
    timeout: Duration,
    /// Armed when a read found nothing; reset by every piece that arrives.
    /// Boxed once per body and reused, since `Sleep` is not `Unpin`.
    clock: Option<Pin<Box<Sleep>>>,
    armed: bool,
}

/// Why a request body ended early.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// The connection failed or the peer sent a malformed body.
    #[error(transparent)]
    Hyper(#[from] hyper::Error),
    /// The peer sent nothing for this long while someone waited.
    #[error("no body data arrived for {0:?}")]
    ReadTimeout(Duration),
}

impl Body {
    /// Wraps `inner`, failing it when nothing arrives for `timeout` while
    /// someone waits (the ingress's request bodies; the host's outbound
    /// responses use it for `wasi:http`'s between-bytes timeout).
    pub fn with_read_timeout(inner: Incoming, timeout: Duration) -> Self {
        Body { inner, timeout, clock: None, armed: false }
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.armed = false;
                Poll::Ready(frame.map(|frame| frame.map_err(BodyError::Hyper)))
            }
            Poll::Pending => {
                let deadline = tokio::time::Instant::now() + this.timeout;
                let clock = this.clock.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                if !this.armed {
                    clock.as_mut().reset(deadline);
                    this.armed = true;
                }
                if clock.as_mut().poll(cx).is_ready() {
                    this.armed = false;
                    return Poll::Ready(Some(Err(BodyError::ReadTimeout(this.timeout))));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
