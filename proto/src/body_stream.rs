//! Frames of an HTTP body streamed between two hosts, one bus message each:
//! how a body larger than one message crosses the hop (see the host's
//! `body_stream.rs` for who sends which, and ARCHITECTURE.md for the flow).
//!
//! The receiver grants credit ([`Frame::Credit`]): the sender may send the
//! chunks numbered below `upto`, and no more. Chunks are numbered from 0 so
//! that a lost or reordered one is seen; [`Frame::End`] says how many there
//! were, and [`Frame::Abort`] ends the stream with an error from either
//! side; [`Frame::KeepAlive`] says a side that waits is still there.
//!
//! Frames are binary, not JSON, because they carry body bytes: one kind
//! byte, a big-endian `u64`, then the rest of the message.

/// Header on the head of a request or response whose body follows as a
/// stream of frames. Its value is the sender's inbox, where the receiver
/// sends [`Frame::Credit`] (and [`Frame::Abort`]). Set only by a host; a
/// client's or a component's own is dropped.
pub const STREAM_HEADER: &str = "x-wharf-stream";

/// One message of a streamed body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame<'a> {
    /// Chunk `seq` of the body (sender to receiver).
    Data { seq: u64, bytes: &'a [u8] },
    /// The body ended after `chunks` chunks (sender to receiver).
    End { chunks: u64 },
    /// The stream failed; `reason` says why (either way).
    Abort { reason: &'a str },
    /// The sender may send chunks numbered below `upto`, to `inbox`, the
    /// receiver's (receiver to sender). Credits only grow: a lost one is
    /// made good by the next.
    Credit { upto: u64, inbox: &'a str },
    /// Still here, with nothing to say (either way): a side that waits on
    /// its own peer (a slow client, a component that reads slowly) keeps
    /// the other from taking it for dead.
    KeepAlive,
}

const DATA: u8 = b'D';
const END: u8 = b'E';
const ABORT: u8 = b'A';
const CREDIT: u8 = b'C';
const KEEP_ALIVE: u8 = b'K';

/// Bytes a frame adds to what it carries.
pub const FRAME_OVERHEAD: usize = 9;

/// Why a message is not a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Shorter than a frame's fixed part.
    #[error("a stream frame of {0} bytes is too short")]
    Short(usize),
    /// The kind byte names no frame.
    #[error("unknown stream frame kind {0:#04x}")]
    UnknownKind(u8),
    /// An abort reason or an inbox that is not UTF-8.
    #[error("a stream frame's text is not UTF-8")]
    NotText,
}

impl<'a> Frame<'a> {
    /// The frame as one message's payload.
    pub fn encode(&self) -> Vec<u8> {
        let (kind, number, rest): (u8, u64, &[u8]) = match *self {
            Frame::Data { seq, bytes } => (DATA, seq, bytes),
            Frame::End { chunks } => (END, chunks, &[]),
            Frame::Abort { reason } => (ABORT, 0, reason.as_bytes()),
            Frame::Credit { upto, inbox } => (CREDIT, upto, inbox.as_bytes()),
            Frame::KeepAlive => (KEEP_ALIVE, 0, &[]),
        };
        let mut out = Vec::with_capacity(FRAME_OVERHEAD + rest.len());
        out.push(kind);
        out.extend_from_slice(&number.to_be_bytes());
        out.extend_from_slice(rest);
        out
    }

    /// Reads one message's payload; a [`Frame::Data`]'s bytes are
    /// `payload[FRAME_OVERHEAD..]`, borrowed, not copied.
    pub fn decode(payload: &'a [u8]) -> Result<Frame<'a>, FrameError> {
        let (Some(&kind), Some(number), Some(rest)) = (payload.first(), payload.get(1..FRAME_OVERHEAD), payload.get(FRAME_OVERHEAD..)) else {
            return Err(FrameError::Short(payload.len()));
        };
        let mut be = [0u8; 8];
        be.copy_from_slice(number);
        let number = u64::from_be_bytes(be);
        let text = || std::str::from_utf8(rest).map_err(|_| FrameError::NotText);
        match kind {
            DATA => Ok(Frame::Data { seq: number, bytes: rest }),
            END => Ok(Frame::End { chunks: number }),
            ABORT => Ok(Frame::Abort { reason: text()? }),
            CREDIT => Ok(Frame::Credit { upto: number, inbox: text()? }),
            KEEP_ALIVE => Ok(Frame::KeepAlive),
            other => Err(FrameError::UnknownKind(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_survive_the_trip() {
        let body = [0u8, 255, 13, 10];
        for frame in [
            Frame::Data { seq: 7, bytes: &body },
            Frame::Data { seq: u64::MAX, bytes: &[] },
            Frame::End { chunks: 400 },
            Frame::Abort { reason: "the client went away" },
            Frame::Credit { upto: 16, inbox: "_INBOX.host-a.x1" },
            Frame::KeepAlive,
        ] {
            let encoded = frame.encode();
            assert_eq!(Frame::decode(&encoded), Ok(frame));
        }
        assert_eq!(Frame::Data { seq: 1, bytes: &body }.encode().len(), FRAME_OVERHEAD + body.len());
    }

    #[test]
    fn non_frames_are_refused() {
        assert_eq!(Frame::decode(b"D1234"), Err(FrameError::Short(5)));
        assert_eq!(Frame::decode(b"HTTP/1.1 200 -\r\n\r\n"), Err(FrameError::UnknownKind(b'H')));
        assert_eq!(Frame::decode(b"A\0\0\0\0\0\0\0\0\xff"), Err(FrameError::NotText));
    }
}
