//! Bodies that do not fit in one bus message, streamed between two hosts
//! as ordered chunks with credit-based flow control (the frames are
//! `wharf_proto::body_stream`'s; ARCHITECTURE.md draws the exchange).
//!
//! Each side listens only on an inbox of its own (a host's NATS identity
//! may subscribe to no other subjects) and publishes into the other's. The
//! sender names its inbox in the head it sends ([`STREAM_HEADER`]); the
//! receiver answers there with credit naming its own inbox, and the sender
//! sends chunks there, never more than the credit allows: at most
//! [`WINDOW`] chunks of [`CHUNK`] bytes are in flight, so neither side
//! holds more than that, whatever the body's size. A chunk out of order,
//! an end that does not match the count, an abort from the other side, or
//! [`IDLE`] without a word from it (each side sends keep-alives while it
//! waits on its own peer) ends the stream with an error on both sides;
//! dropping either end tells the other ([`Aborter`]).

use bytes::{Bytes, BytesMut};
use futures::{FutureExt, StreamExt};
use http_body::Body;
use http_body_util::BodyExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use wharf_bus::{Bus, Subscription};
use wharf_proto::body_stream::{FRAME_OVERHEAD, Frame};

pub use wharf_proto::body_stream::STREAM_HEADER;

/// A body as both directions carry it: requests' and responses' bodies are this type.
pub type StreamBody = http_body_util::combinators::UnsyncBoxBody<Bytes, wasmtime_wasi_http::Error>;

/// The most body bytes one chunk carries: a quarter of NATS' default
/// 1 MiB max payload, so a chunk never nears the limit and the bus
/// interleaves other traffic between chunks.
pub const CHUNK: usize = 256 * 1024;

/// Chunks the receiver lets the sender send ahead of what it consumed:
/// 8 × 256 KiB = 2 MiB in flight per stream, enough to keep a loopback or
/// LAN link busy while the receiver grants more at half the window.
pub const WINDOW: u64 = 8;

/// How long either side waits for a word from the other (credit, a chunk,
/// a keep-alive) before it takes the other for dead and ends the stream
/// with an error. Each side says it is alive every [`KEEP_ALIVE`] while it
/// waits on its own peer, so only a side that is gone (its process, its
/// connection to NATS) falls silent this long.
pub const IDLE: Duration = Duration::from_secs(10);

/// How often a side that has nothing to send says it is still there.
pub const KEEP_ALIVE: Duration = Duration::from_millis(2500);

/// A body to stream: what was read of it before the decision to stream
/// (less than one message), then the rest, unread.
pub struct Source {
    pub prefix: Bytes,
    pub rest: StreamBody,
}

/// A body waiting to be streamed, taken by the first stream that gets
/// credit for it. Shared by the tries of one request: a try that ends
/// before a receiver granted credit leaves it for the next; once taken,
/// part of it may be consumed and it cannot be sent again.
#[derive(Clone)]
pub struct SourceSlot(Arc<Mutex<Option<Source>>>);

impl SourceSlot {
    pub fn new(source: Source) -> SourceSlot {
        SourceSlot(Arc::new(Mutex::new(Some(source))))
    }

    /// Whether the body is still whole here (no stream took it).
    pub fn is_whole(&self) -> bool {
        self.0.lock().is_ok_and(|slot| slot.is_some())
    }

    /// The body, if no stream took it yet.
    pub fn take(&self) -> Option<Source> {
        self.0.lock().ok()?.take()
    }
}

impl Source {
    /// The body as one again: the prefix, then the rest.
    pub fn into_body(self) -> StreamBody {
        let prefix = futures::stream::once(std::future::ready(Ok::<_, wasmtime_wasi_http::Error>(http_body::Frame::data(self.prefix))));
        let rest = http_body_util::BodyStream::new(self.rest);
        http_body_util::StreamBody::new(prefix.chain(rest)).boxed_unsync()
    }
}

/// How a stream failed, as either side sees it.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The other side ended the stream.
    #[error("the other host ended the stream: {0}")]
    Aborted(String),
    /// Nothing came from the other side for [`IDLE`].
    #[error("no word from the other host for {0:?}; it is taken for gone")]
    Idle(Duration),
    /// A chunk was lost or arrived out of order, or the end did not match.
    #[error("the stream lost a chunk: {0}")]
    OutOfOrder(String),
    /// The body being sent failed (its client went away, say).
    #[error("the body being sent failed: {0}")]
    Body(String),
    /// The body was taken by an earlier try and cannot be sent again.
    #[error("the body was already sent in part to another host and cannot be sent again")]
    Consumed,
    /// The bus refused a frame or a subscription.
    #[error("the bus failed: {0}")]
    Bus(String),
    /// A message that is no frame, or the wrong frame for this side.
    #[error("unexpected message in a stream: {0}")]
    Protocol(String),
}

/// Tells the other side that this one gave up, unless disarmed: when a
/// stream's end is dropped (its request was cancelled, its client went
/// away) or fails, the other side learns at once rather than after [`IDLE`].
struct Aborter {
    bus: Bus,
    to: Option<String>,
    reason: &'static str,
}

impl Aborter {
    fn new(bus: &Bus, to: String, reason: &'static str) -> Aborter {
        Aborter { bus: bus.clone(), to: Some(to), reason }
    }

    /// Sends the abort now, with `reason`, and disarms.
    async fn abort(&mut self, reason: &str) {
        if let Some(to) = self.to.take() {
            let _ = self.bus.publish(&to, Bytes::from(Frame::Abort { reason }.encode())).await;
        }
    }

    fn disarm(&mut self) {
        self.to = None;
    }
}

impl Drop for Aborter {
    fn drop(&mut self) {
        let Some(to) = self.to.take() else { return };
        let bus = self.bus.clone();
        let frame = Bytes::from(Frame::Abort { reason: self.reason }.encode());
        // Drop cannot wait: the abort goes out from a task of its own.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = bus.publish(&to, frame).await;
            });
        }
    }
}

/// A new inbox of this host, subscribed.
pub async fn open_inbox(bus: &Bus) -> Result<(String, Subscription), StreamError> {
    let inbox = bus.new_inbox();
    let subscription = bus.subscribe(&inbox).await.map_err(|e| StreamError::Bus(e.to_string()))?;
    Ok((inbox, subscription))
}

/// Sends the body in `slot` to the receiver that grants credit on
/// `control` (this side's inbox, named in the head sent before), and
/// returns the bytes sent. Takes the body only once the first credit came:
/// until then it stays in the slot for another try.
pub async fn send(bus: &Bus, mut control: Subscription, slot: SourceSlot) -> Result<u64, StreamError> {
    let (mut upto, inbox) = loop {
        match next_frame(&mut control).await? {
            Control::Credit(upto, inbox) => break (upto, inbox),
            Control::KeepAlive => {}
            Control::Abort(reason) => return Err(StreamError::Aborted(reason)),
        }
    };
    let mut aborter = Aborter::new(bus, inbox.clone(), "the sending host stopped sending");
    let Some(source) = slot.take() else {
        aborter.abort(&StreamError::Consumed.to_string()).await;
        return Err(StreamError::Consumed);
    };
    let mut chunks = Chunks { pending: source.prefix, rest: source.rest };
    let (mut seq, mut sent) = (0u64, 0u64);
    // One schedule of keep-alives for the whole stream, put off by every
    // chunk sent: words from the receiver do not restart it.
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + KEEP_ALIVE, KEEP_ALIVE);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let chunk = {
            // The body may be slow (its client, its component): the
            // receiver hears from this side meanwhile. The read is not
            // cancelled by a tick: it holds what it joined so far.
            let next = chunks.next();
            tokio::pin!(next);
            loop {
                tokio::select! {
                    chunk = &mut next => break chunk,
                    _ = ticks.tick() => publish(bus, &inbox, Frame::KeepAlive).await?,
                }
            }
        };
        let chunk = match chunk {
            Ok(Some(chunk)) => chunk,
            Ok(None) => {
                aborter.disarm();
                publish(bus, &inbox, Frame::End { chunks: seq }).await?;
                return Ok(sent);
            }
            Err(e) => {
                let error = StreamError::Body(e.to_string());
                aborter.abort(&error.to_string()).await;
                return Err(error);
            }
        };
        // An abort may come while credit remains: look without waiting.
        while let Some(message) = control.next().now_or_never() {
            match control_frame(message)? {
                Control::KeepAlive => {}
                Control::Credit(granted, _) => upto = upto.max(granted),
                Control::Abort(reason) => {
                    aborter.disarm();
                    return Err(StreamError::Aborted(reason));
                }
            }
        }
        while seq >= upto {
            match hear(bus, &mut control, &inbox, &mut ticks).await {
                Ok(Control::KeepAlive) => {}
                Ok(Control::Credit(granted, _)) => upto = upto.max(granted),
                Ok(Control::Abort(reason)) => {
                    aborter.disarm();
                    return Err(StreamError::Aborted(reason));
                }
                Err(e) => {
                    aborter.abort(&e.to_string()).await;
                    return Err(e);
                }
            }
        }
        sent += chunk.len() as u64;
        publish(bus, &inbox, Frame::Data { seq, bytes: &chunk }).await?;
        ticks.reset();
        seq += 1;
    }
}

/// Receives the body whose sender waits for credit on `sender` (the inbox
/// its head named): grants the first credit when the body is first read
/// (so nothing is sent here before whoever reads it, a component, asks),
/// then yields the chunks in order as they are read, granting more as they
/// are consumed. Fails the body (never ends it short) on any of
/// [`StreamError`]'s causes.
pub async fn receive(bus: &Bus, sender: String) -> Result<StreamBody, StreamError> {
    let (inbox, subscription) = open_inbox(bus).await?;
    let aborter = Aborter::new(bus, sender.clone(), "the receiving host stopped reading");
    let granted = Arc::new(AtomicU64::new(0));
    // At most a window of chunks and the end can be waiting: one more
    // would be past the credit, which the forwarder refuses.
    let (frames, inbound) = tokio::sync::mpsc::channel(WINDOW as usize + 1);
    let forwarder = tokio::spawn(forward(bus.clone(), subscription, sender.clone(), granted.clone(), frames));
    let state = Receiving { bus: bus.clone(), inbound, inbox, sender, next: 0, granted, aborter, done: false, forwarder };
    let chunks = futures::stream::unfold(state, |mut state| async move {
        if state.done {
            return None;
        }
        let item = state.next_chunk().await;
        match item {
            Ok(Some(bytes)) => Some((Ok(http_body::Frame::data(bytes)), state)),
            Ok(None) => None,
            Err(e) => {
                state.done = true;
                state.aborter.abort(&e.to_string()).await;
                Some((Err(wasmtime_wasi_http::Error::InternalError(Some(format!("the body streamed from another host failed: {e}")))), state))
            }
        }
    });
    Ok(http_body_util::StreamBody::new(chunks).boxed_unsync())
}

/// Reads a receiving end's inbox as messages come, whether or not the body
/// is being read, so that what a sender sends is bounded by the credit,
/// not by NATS' buffer for a slow subscriber: hands chunks (never more
/// than the credit allows; one past it fails the stream), the end or an
/// abort on to the reader, says this side is alive to the sender every
/// [`KEEP_ALIVE`] (until the body is read, and while its reader is busy),
/// and, once credit was granted, fails the stream after [`IDLE`] without a
/// word from the sender (which keeps alive while it waits, too).
async fn forward(bus: Bus, mut subscription: Subscription, sender: String, granted: Arc<AtomicU64>, frames: tokio::sync::mpsc::Sender<Result<wharf_bus::Message, StreamError>>) {
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + KEEP_ALIVE, KEEP_ALIVE);
    let mut heard = tokio::time::Instant::now();
    // The sender can say nothing before it has credit (it does not know
    // this inbox yet): silence counts only from the first credit on.
    let mut credited = false;
    loop {
        let message = tokio::select! {
            message = subscription.next() => message,
            _ = ticks.tick() => {
                if !credited && granted.load(Ordering::Acquire) > 0 {
                    credited = true;
                    heard = tokio::time::Instant::now();
                }
                if credited && heard.elapsed() >= IDLE {
                    let _ = frames.send(Err(StreamError::Idle(IDLE))).await;
                    return;
                }
                if bus.publish(&sender, Bytes::from(Frame::KeepAlive.encode())).await.is_err() {
                    tracing::debug!("cannot tell a stream's sender this side is alive");
                }
                continue;
            }
        };
        let Some(message) = message else {
            let _ = frames.send(Err(StreamError::Bus("the stream's subscription ended".into()))).await;
            return;
        };
        heard = tokio::time::Instant::now();
        let last = match Frame::decode(&message.payload) {
            Ok(Frame::KeepAlive) => continue,
            Ok(Frame::Data { seq, .. }) => {
                let credit = granted.load(Ordering::Acquire);
                if seq >= credit {
                    let _ = frames.send(Err(StreamError::OutOfOrder(format!("chunk {seq} came past the credit granted (chunks below {credit})")))).await;
                    return;
                }
                false
            }
            // The end, an abort, or what no sender sends: the reader says which.
            _ => true,
        };
        if frames.send(Ok(message)).await.is_err() || last {
            return;
        }
    }
}

/// One receiving end of a stream.
struct Receiving {
    bus: Bus,
    /// What the forwarder took from this side's inbox.
    inbound: tokio::sync::mpsc::Receiver<Result<wharf_bus::Message, StreamError>>,
    /// This side's inbox, where chunks come.
    inbox: String,
    /// The sender's inbox, where credit goes.
    sender: String,
    /// The number of the chunk expected next.
    next: u64,
    /// The credit granted so far: chunks below it may come; 0 until the
    /// body is first read. Written here (before the credit is sent), read
    /// by the forwarder, which refuses chunks past it.
    granted: Arc<AtomicU64>,
    aborter: Aborter,
    done: bool,
    /// The forwarder; stopped with the body.
    forwarder: tokio::task::JoinHandle<()>,
}

impl Drop for Receiving {
    fn drop(&mut self) {
        self.forwarder.abort();
    }
}

impl Receiving {
    /// Grants credit for chunks below `upto`.
    async fn grant(&mut self, upto: u64) -> Result<(), StreamError> {
        self.granted.store(upto, Ordering::Release);
        publish(&self.bus, &self.sender, Frame::Credit { upto, inbox: &self.inbox }).await
    }

    async fn next_chunk(&mut self) -> Result<Option<Bytes>, StreamError> {
        if self.granted.load(Ordering::Acquire) == 0 {
            self.grant(WINDOW).await?;
        }
        loop {
            let message = match self.inbound.recv().await {
                Some(Ok(message)) => message,
                Some(Err(e)) => return Err(e),
                None => return Err(StreamError::Bus("the stream's inbox is no longer read".into())),
            };
            if let Some(chunk) = self.take(&message).await? {
                return Ok(chunk);
            }
        }
    }

    /// What one message means: a chunk, the end (`Some(None)`), or nothing
    /// to pass on (`None`, a keep-alive).
    async fn take(&mut self, message: &wharf_bus::Message) -> Result<Option<Option<Bytes>>, StreamError> {
        let chunk = match Frame::decode(&message.payload).map_err(|e| StreamError::Protocol(e.to_string()))? {
            Frame::Data { seq, bytes } if seq == self.next => {
                let bytes = message.payload.slice(FRAME_OVERHEAD..FRAME_OVERHEAD + bytes.len());
                self.next += 1;
                if self.granted.load(Ordering::Acquire).saturating_sub(self.next) <= WINDOW / 2 {
                    self.grant(self.next + WINDOW).await?;
                }
                Some(bytes)
            }
            Frame::Data { seq, .. } => {
                return Err(StreamError::OutOfOrder(format!("chunk {seq} arrived where chunk {} was expected", self.next)));
            }
            Frame::End { chunks } if chunks == self.next => {
                self.done = true;
                self.aborter.disarm();
                None
            }
            Frame::End { chunks } => return Err(StreamError::OutOfOrder(format!("the sender ended after {chunks} chunks, but {} arrived", self.next))),
            Frame::Abort { reason } => {
                self.aborter.disarm();
                return Err(StreamError::Aborted(reason.to_owned()));
            }
            Frame::KeepAlive => return Ok(None),
            Frame::Credit { .. } => return Err(StreamError::Protocol("credit sent to a receiver".into())),
        };
        Ok(Some(chunk))
    }
}

/// What the sender hears from the receiver.
enum Control {
    Credit(u64, String),
    KeepAlive,
    Abort(String),
}

/// The next word from the receiver, telling it meanwhile that this side
/// is alive (its reader may be slow: it waits for credit); an error after
/// [`IDLE`] without one.
async fn hear(bus: &Bus, control: &mut Subscription, receiver: &str, ticks: &mut tokio::time::Interval) -> Result<Control, StreamError> {
    let silent = tokio::time::sleep(IDLE);
    tokio::pin!(silent);
    loop {
        tokio::select! {
            message = control.next() => return control_frame(message),
            _ = ticks.tick() => publish(bus, receiver, Frame::KeepAlive).await?,
            _ = &mut silent => return Err(StreamError::Idle(IDLE)),
        }
    }
}

async fn next_frame(control: &mut Subscription) -> Result<Control, StreamError> {
    match tokio::time::timeout(IDLE, control.next()).await {
        Ok(message) => control_frame(message),
        Err(_) => Err(StreamError::Idle(IDLE)),
    }
}

fn control_frame(message: Option<wharf_bus::Message>) -> Result<Control, StreamError> {
    let Some(message) = message else { return Err(StreamError::Bus("the stream's subscription ended".into())) };
    match Frame::decode(&message.payload).map_err(|e| StreamError::Protocol(e.to_string()))? {
        Frame::Credit { upto, inbox } => Ok(Control::Credit(upto, inbox.to_owned())),
        Frame::Abort { reason } => Ok(Control::Abort(reason.to_owned())),
        Frame::KeepAlive => Ok(Control::KeepAlive),
        other => Err(StreamError::Protocol(format!("{other:?} sent to a sender"))),
    }
}

async fn publish(bus: &Bus, to: &str, frame: Frame<'_>) -> Result<(), StreamError> {
    bus.publish(to, Bytes::from(frame.encode())).await.map_err(|e| StreamError::Bus(e.to_string()))
}

/// A body cut into chunks of at most [`CHUNK`] bytes: pieces that are
/// ready are joined (an ingress hands a body over in pieces of a few KiB),
/// and a chunk goes as soon as no more is ready, so a slow body is not held back.
struct Chunks {
    pending: Bytes,
    rest: StreamBody,
}

impl Chunks {
    async fn next(&mut self) -> Result<Option<Bytes>, wasmtime_wasi_http::Error> {
        if self.pending.len() >= CHUNK {
            return Ok(Some(self.pending.split_to(CHUNK)));
        }
        let mut chunk = BytesMut::new();
        loop {
            if !self.pending.is_empty() {
                let take = self.pending.len().min(CHUNK - chunk.len());
                chunk.extend_from_slice(&self.pending.split_to(take));
                if chunk.len() == CHUNK {
                    return Ok(Some(chunk.freeze()));
                }
            }
            let frame = if chunk.is_empty() {
                self.rest.frame().await
            } else {
                match self.rest.frame().now_or_never() {
                    Some(frame) => frame,
                    // Nothing more is ready: send what is.
                    None => return Ok(Some(chunk.freeze())),
                }
            };
            match frame {
                None => return Ok((!chunk.is_empty()).then(|| chunk.freeze())),
                Some(Err(e)) => return Err(e),
                // Trailers do not cross the hop, as before.
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.pending = data;
                    }
                }
            }
        }
    }
}

/// How a body crosses the hop, from what its size hint says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyPlan {
    /// Known to fit in one message: read it whole and send it with the head.
    Whole,
    /// Known not to fit: stream it without reading any first.
    Stream,
    /// Unknown: read up to the limit; whole if it ends by then, else stream.
    ReadAhead,
}

/// Decides how a body with `hint` crosses the hop when one message holds
/// at most `limit` body bytes.
pub fn plan(hint: &http_body::SizeHint, limit: usize) -> BodyPlan {
    let limit = limit as u64;
    match hint.exact() {
        Some(len) if len <= limit => BodyPlan::Whole,
        _ if hint.lower() > limit => BodyPlan::Stream,
        _ => BodyPlan::ReadAhead,
    }
}

/// A body read whole, or as much as one message holds and the rest to stream.
pub enum ReadBody {
    Whole(Bytes),
    Stream(Source),
}

/// Reads `body` as [`plan`] says: whole when it has at most `limit`
/// bytes, else the bytes read so far (at most `limit` plus one piece)
/// and the rest, to stream.
pub async fn read(body: StreamBody, limit: usize) -> Result<ReadBody, wasmtime_wasi_http::Error> {
    let mut body = body;
    match plan(&body.size_hint(), limit) {
        BodyPlan::Stream => return Ok(ReadBody::Stream(Source { prefix: Bytes::new(), rest: body })),
        BodyPlan::Whole | BodyPlan::ReadAhead => {}
    }
    let mut read = BytesMut::new();
    while read.len() <= limit {
        match body.frame().await {
            None => return Ok(ReadBody::Whole(read.freeze())),
            Some(Err(e)) => return Err(e),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    read.extend_from_slice(&data);
                }
            }
        }
    }
    Ok(ReadBody::Stream(Source { prefix: read.freeze(), rest: body }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body::SizeHint;

    fn full(bytes: &'static [u8]) -> StreamBody {
        http_body_util::Full::new(Bytes::from_static(bytes)).map_err(|never: std::convert::Infallible| -> wasmtime_wasi_http::Error { match never {} }).boxed_unsync()
    }

    #[test]
    fn small_known_bodies_go_whole_large_ones_stream_and_unknown_ones_are_read_ahead() {
        let exact = SizeHint::with_exact;
        let at_least = |n| {
            let mut hint = SizeHint::new();
            hint.set_lower(n);
            hint
        };
        let check = |hint: SizeHint, expected| assert_eq!(plan(&hint, 1000), expected, "{hint:?}");
        check(exact(0), BodyPlan::Whole);
        check(exact(1000), BodyPlan::Whole);
        check(exact(1001), BodyPlan::Stream);
        check(at_least(1001), BodyPlan::Stream);
        check(SizeHint::new(), BodyPlan::ReadAhead);
        check(at_least(10), BodyPlan::ReadAhead);
    }

    #[tokio::test]
    async fn a_body_that_ends_within_the_limit_is_read_whole_else_kept_for_streaming() {
        let ReadBody::Whole(bytes) = read(full(b"0123456789"), 10).await.expect("reads") else { panic!("a 10-byte body streamed over a 10-byte limit") };
        assert_eq!(&bytes[..], b"0123456789");
        let unknown = http_body_util::StreamBody::new(futures::stream::iter(
            [&b"01234"[..], b"56789", b"abcde"].map(|piece| Ok::<_, wasmtime_wasi_http::Error>(http_body::Frame::data(Bytes::from_static(piece)))),
        ))
        .boxed_unsync();
        let ReadBody::Stream(source) = read(unknown, 6).await.expect("reads") else { panic!("a 15-byte body went whole over a 6-byte limit") };
        assert_eq!(&source.prefix[..], b"0123456789", "read ahead past the limit, not further");
        let whole = source.into_body().collect().await.expect("collects").to_bytes();
        assert_eq!(&whole[..], b"0123456789abcde", "nothing lost between the prefix and the rest");
    }

    fn local_bus() -> Bus {
        Bus::local(wharf_bus::LocalStore::in_memory().expect("store"))
    }

    #[tokio::test]
    async fn a_body_crosses_in_order_with_credit_and_arrives_whole() {
        let bus = local_bus();
        let data: Vec<u8> = (0..3 * CHUNK as u64 + 17).map(|i| (i % 251) as u8).collect();
        let pieces: Vec<Bytes> = data.chunks(10_000).map(Bytes::copy_from_slice).collect();
        let rest = http_body_util::StreamBody::new(futures::stream::iter(pieces.into_iter().map(|p| Ok::<_, wasmtime_wasi_http::Error>(http_body::Frame::data(p))))).boxed_unsync();
        let (inbox, control) = open_inbox(&bus).await.expect("inbox");
        let slot = SourceSlot::new(Source { prefix: Bytes::from_static(b""), rest });
        let sending = tokio::spawn({
            let (bus, slot) = (bus.clone(), slot.clone());
            async move { send(&bus, control, slot).await }
        });
        let body = receive(&bus, inbox).await.expect("receives");
        let got = body.collect().await.expect("whole").to_bytes();
        assert_eq!(got.len(), data.len());
        assert!(got[..] == data[..], "the bytes arrive in order");
        assert_eq!(sending.await.expect("task").expect("sent"), data.len() as u64);
        assert!(!slot.is_whole(), "the body was taken by the stream");
    }

    /// A receiver of a stream whose sender is this test: the receiver's
    /// body, its inbox, and the sender's own inbox subscription.
    async fn forged_sender(bus: &Bus) -> (StreamBody, String, Subscription) {
        let (inbox, mut control) = open_inbox(bus).await.expect("inbox");
        let mut body = receive(bus, inbox).await.expect("receives");
        assert!(body.frame().now_or_never().is_none(), "nothing to read before the sender sends");
        let message = control.next().await.expect("credit");
        let Ok(Frame::Credit { upto, inbox }) = Frame::decode(&message.payload) else { panic!("no credit first") };
        assert_eq!(upto, WINDOW);
        (body, inbox.to_owned(), control)
    }

    #[tokio::test]
    async fn credit_is_granted_only_once_the_body_is_read() {
        let bus = local_bus();
        let (inbox, mut control) = open_inbox(&bus).await.expect("inbox");
        let mut body = receive(&bus, inbox).await.expect("receives");
        let early = tokio::time::timeout(Duration::from_millis(300), control.next()).await;
        assert!(early.is_err(), "a message came before the body was read: {early:?}");
        assert!(body.frame().now_or_never().is_none(), "nothing to read yet");
        let message = tokio::time::timeout(Duration::from_secs(5), control.next()).await.expect("credit once read").expect("message");
        assert!(matches!(Frame::decode(&message.payload), Ok(Frame::Credit { upto: WINDOW, .. })), "{message:?}");
    }

    async fn error_of(body: StreamBody) -> String {
        match body.collect().await {
            Ok(whole) => panic!("a broken stream ended as a whole body of {} bytes", whole.to_bytes().len()),
            Err(e) => format!("{e:?}"),
        }
    }

    #[tokio::test]
    async fn a_lost_chunk_a_short_end_or_an_abort_fail_the_body_never_cut_it_short() {
        let bus = local_bus();
        let frame = |frame: Frame<'_>| Bytes::from(frame.encode());

        // Chunk 1 lost: chunk 2 arrives where 1 was expected.
        let (body, to, mut control) = forged_sender(&bus).await;
        for seq in [0, 2] {
            bus.publish(&to, frame(Frame::Data { seq, bytes: b"piece" })).await.expect("publish");
        }
        let error = error_of(body).await;
        assert!(error.contains("chunk 2 arrived where chunk 1 was expected"), "{error}");
        let told = control.next().await.expect("the sender is told");
        assert!(matches!(Frame::decode(&told.payload), Ok(Frame::Abort { .. })), "{told:?}");

        // An end that counts more chunks than came.
        let (body, to, _control) = forged_sender(&bus).await;
        bus.publish(&to, frame(Frame::Data { seq: 0, bytes: b"piece" })).await.expect("publish");
        bus.publish(&to, frame(Frame::End { chunks: 2 })).await.expect("publish");
        let error = error_of(body).await;
        assert!(error.contains("ended after 2 chunks, but 1 arrived"), "{error}");

        // The sender gives up.
        let (body, to, _control) = forged_sender(&bus).await;
        bus.publish(&to, frame(Frame::Data { seq: 0, bytes: b"piece" })).await.expect("publish");
        bus.publish(&to, frame(Frame::Abort { reason: "the client went away" })).await.expect("publish");
        let error = error_of(body).await;
        assert!(error.contains("the client went away"), "{error}");

        // A sender past its credit, while the body is not read: the inbox
        // holds no more than the credit allowed, and the body fails.
        let (mut body, to, _control) = forged_sender(&bus).await;
        for seq in 0..=WINDOW {
            bus.publish(&to, frame(Frame::Data { seq, bytes: b"piece" })).await.expect("publish");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut chunks = 0;
        let error = loop {
            match body.frame().await {
                Some(Ok(_)) => chunks += 1,
                Some(Err(e)) => break format!("{e:?}"),
                None => panic!("a stream past its credit ended after {chunks} chunks"),
            }
        };
        assert_eq!(chunks, WINDOW, "the chunks within the credit are read");
        assert!(error.contains("came past the credit granted"), "{error}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_reader_busy_for_longer_than_the_idle_time_keeps_its_stream() {
        let bus = local_bus();
        let data: Vec<u8> = (0..(WINDOW as usize + 4) * CHUNK).map(|i| (i % 249) as u8).collect();
        let rest = http_body_util::Full::new(Bytes::from(data.clone())).map_err(|never: std::convert::Infallible| -> wasmtime_wasi_http::Error { match never {} }).boxed_unsync();
        let (inbox, control) = open_inbox(&bus).await.expect("inbox");
        let sending = tokio::spawn({
            let bus = bus.clone();
            async move { send(&bus, control, SourceSlot::new(Source { prefix: Bytes::new(), rest })).await }
        });
        let mut body = receive(&bus, inbox).await.expect("receives");
        // Idle before the first read, then between reads with the sender
        // waiting for credit: three times the idle time each.
        tokio::time::sleep(IDLE * 3).await;
        let mut got = Vec::new();
        while let Some(frame) = body.frame().await {
            got.extend_from_slice(&frame.expect("no failure").into_data().expect("data"));
            if got.len() == CHUNK {
                tokio::time::sleep(IDLE * 3).await;
            }
        }
        assert!(got == data, "{} of {} bytes, in order", got.len(), data.len());
        assert_eq!(sending.await.expect("task").expect("sent"), data.len() as u64);
    }

    #[tokio::test]
    async fn a_receiver_dropped_mid_stream_stops_the_sender() {
        let bus = local_bus();
        let endless = http_body_util::StreamBody::new(futures::stream::repeat_with(|| Ok::<_, wasmtime_wasi_http::Error>(http_body::Frame::data(Bytes::from(vec![1u8; 64 * 1024]))))).boxed_unsync();
        let (inbox, control) = open_inbox(&bus).await.expect("inbox");
        let sending = tokio::spawn({
            let bus = bus.clone();
            async move { send(&bus, control, SourceSlot::new(Source { prefix: Bytes::new(), rest: endless })).await }
        });
        let mut body = receive(&bus, inbox).await.expect("receives");
        for _ in 0..3 {
            body.frame().await.expect("a chunk").expect("ok");
        }
        drop(body);
        let outcome = tokio::time::timeout(Duration::from_secs(5), sending).await.expect("the sender stops at once, not after the idle time").expect("task");
        assert!(matches!(outcome, Err(StreamError::Aborted(_))), "{outcome:?}");
    }

    #[tokio::test]
    async fn chunks_join_ready_pieces_and_split_large_ones() {
        let pieces: Vec<Bytes> = vec![Bytes::from(vec![1u8; 1000]), Bytes::from(vec![2u8; CHUNK + 10])];
        let body = http_body_util::StreamBody::new(futures::stream::iter(pieces.into_iter().map(|p| Ok::<_, wasmtime_wasi_http::Error>(http_body::Frame::data(p))))).boxed_unsync();
        let mut chunks = Chunks { pending: Bytes::from_static(b"abc"), rest: body };
        let mut sizes = Vec::new();
        while let Some(chunk) = chunks.next().await.expect("reads") {
            sizes.push(chunk.len());
        }
        assert_eq!(sizes, vec![CHUNK, 1013], "joined up to a chunk, then the remainder");
    }
}
