//! Replicas' log lines for `wharf logs`: each replica's new lines are
//! published on its service's logs subject, tagged with this host, the
//! revision and the replica; and this host answers requests for the recent
//! lines its replicas keep (the workload's bounded ring).
//!
//! Publishing costs one core-NATS message per line whether or not anyone
//! follows; lines are already rate-limited per service ([`crate::logs`]), so
//! a service can send at most its log rate.

use super::HostAgent;
use crate::logs::{LogLine, LogStream};
use crate::workload::Workload;
use bytes::Bytes;
use std::time::UNIX_EPOCH;
use tokio::sync::broadcast::error::RecvError;
use wharf_proto::observe::{LogBatch, LogQuery, LogRecord, LogStreamName};
use wharf_proto::names::{host_log_lines_subject, host_logs_subject};
use wharf_proto::{HostId, ReplicaKey};

/// What a reply may hold besides the lines (JSON framing), so it stays
/// within the bus's largest message.
const REPLY_OVERHEAD: usize = 1024;

fn record(host: &HostId, key: &ReplicaKey, line: &LogLine) -> LogRecord {
    LogRecord {
        time_ms: line.time.duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        host: host.clone(),
        service: key.service.clone(),
        revision: key.revision,
        replica: key.replica,
        stream: match line.stream {
            LogStream::Stdout => LogStreamName::Stdout,
            LogStream::Stderr => LogStreamName::Stderr,
        },
        seq: line.seq,
        line: line.line.clone(),
    }
}

impl HostAgent {
    /// Publishes every new line of `workload` (replica `key`) until the
    /// workload is dropped or the agent stops.
    pub(super) fn publish_logs(&self, key: ReplicaKey, workload: &Workload) {
        let mut lines = workload.logs().follow();
        let bus = self.inner.bus.clone();
        let host = self.inner.config.host.clone();
        let subject = host_log_lines_subject(&host, &key.service.namespace, &key.service.name);
        let mut stop = self.inner.stop.subscribe();
        tokio::spawn(async move {
            loop {
                let line = tokio::select! {
                    _ = stop.changed() => return,
                    line = lines.recv() => line,
                };
                let line = match line {
                    Ok(line) => line,
                    // A follower too slow for a burst loses lines, not the host's time.
                    Err(RecvError::Lagged(_)) => continue,
                    Err(RecvError::Closed) => return,
                };
                let Ok(payload) = serde_json::to_vec(&record(&host, &key, &line)) else { continue };
                if let Err(e) = bus.publish(&subject, Bytes::from(payload)).await {
                    tracing::debug!(replica = %key, "log line not published: {e}");
                }
            }
        });
    }

    /// Answers [`LogQuery`]s on this host's logs subject until the agent stops.
    pub(super) async fn answer_log_queries(&self) -> Result<(), wharf_bus::SubscribeError> {
        self.answer_requests(host_logs_subject(&self.inner.config.host), |agent, payload| {
            let batch = match serde_json::from_slice::<LogQuery>(payload) {
                Ok(query) => agent.recent_logs(&query),
                Err(e) => {
                    tracing::debug!("unreadable log query: {e}");
                    LogBatch::default()
                }
            };
            serde_json::to_vec(&batch).unwrap_or_default()
        })
        .await
    }

    /// The lines `query` asks for from the replicas here, oldest first,
    /// newest kept when they do not all fit in one bus message.
    pub(super) fn recent_logs(&self, query: &LogQuery) -> LogBatch {
        let host = &self.inner.config.host;
        let mut lines: Vec<LogRecord> = self
            .inner
            .replicas
            .workloads_of(&query.service)
            .into_iter()
            .map(|(key, workload)| (key, workload.logs().clone()))
            .chain(self.inner.jobs.logs_of(&query.service))
            .filter(|(key, _)| query.replica.is_none_or(|r| key.replica == r))
            .flat_map(|(key, logs)| logs.recent().into_iter().map(move |line| record(host, &key, &line)))
            .filter(|record| query.since_ms.is_none_or(|since| record.time_ms >= since))
            .collect();
        lines.sort_by_key(|r| (r.time_ms, r.revision, r.replica, r.seq));
        let mut truncated = false;
        if let Some(tail) = query.tail
            && lines.len() > tail
        {
            lines.drain(..lines.len() - tail);
        }
        let budget = self.inner.bus.max_payload().saturating_sub(REPLY_OVERHEAD);
        let mut size = 0usize;
        let keep_from = lines
            .iter()
            .rposition(|r| {
                size += serde_json::to_vec(r).map_or(0, |v| v.len()) + 1;
                size > budget
            })
            .map_or(0, |at| at + 1);
        if keep_from > 0 {
            truncated = true;
            lines.drain(..keep_from);
        }
        LogBatch { lines, truncated }
    }
}
