//! What operators look at, as it travels between processes: log lines of
//! replicas asked of a host ([`LogQuery`] → [`LogBatch`]) or published live
//! ([`LogRecord`]), and the control plane's [`Event`]s.

use crate::{HostId, ServiceId};
use serde::{Deserialize, Serialize};

/// A request to one host for the recent log lines of a service's replicas
/// there, on [`crate::names::host_logs_subject`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogQuery {
    /// The service.
    pub service: ServiceId,
    /// Only lines written at or after this time (ms since the epoch).
    #[serde(default)]
    pub since_ms: Option<u64>,
    /// Only the last this many lines (of this host's replicas together).
    #[serde(default)]
    pub tail: Option<usize>,
    /// Only this replica index.
    #[serde(default)]
    pub replica: Option<u32>,
}

/// Which stream of a component a line came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogStreamName {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// One line a replica wrote, tagged with where it ran.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogRecord {
    /// When it was written (ms since the epoch, the host's clock).
    pub time_ms: u64,
    /// The host the replica runs on.
    pub host: HostId,
    /// The service.
    pub service: ServiceId,
    /// The revision the replica runs.
    pub revision: u64,
    /// The replica's index.
    pub replica: u32,
    /// Stdout or stderr.
    pub stream: LogStreamName,
    /// The line's number in its replica's log on that host, from 1, so a
    /// reader that got it twice (history and live) can drop the second.
    pub seq: u64,
    /// The text.
    pub line: String,
}

/// A host's answer to a [`LogQuery`], oldest line first.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogBatch {
    /// The lines.
    pub lines: Vec<LogRecord>,
    /// Older lines that matched were left out to keep the answer within one message.
    #[serde(default)]
    pub truncated: bool,
}

/// Something the control plane did or saw, and why: kept per namespace in
/// [`crate::names::EVENTS_BUCKET`] (a ring of [`EVENTS_PER_NAMESPACE`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Its number in its namespace, from 1, increasing.
    pub seq: u64,
    /// When it was recorded (ms since the epoch, the leader's clock).
    pub time_ms: u64,
    /// The service it is about.
    pub service: ServiceId,
    /// A short word for what happened: `Placed`, `Unplaceable`, `Failed`,
    /// `Retrying`, `Moved`, `Ready`, `Scaled`, `Rollout`, `Ejected`.
    pub reason: String,
    /// What happened and why, as a sentence.
    pub message: String,
    /// The host concerned, if one is.
    #[serde(default)]
    pub host: Option<HostId>,
    /// The revision concerned, if one is.
    #[serde(default)]
    pub revision: Option<u64>,
    /// The replica concerned, if one is.
    #[serde(default)]
    pub replica: Option<u32>,
}

/// Events kept per namespace: the newest overwrite the oldest.
pub const EVENTS_PER_NAMESPACE: u64 = 500;

/// Longest event message kept (bytes); a longer one is cut.
pub const MAX_EVENT_MESSAGE: usize = 1024;
