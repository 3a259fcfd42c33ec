//! `GET /v1/namespaces/{ns}/services/{name}/logs`: the log lines of every
//! replica of a service on every host, merged and tagged with host,
//! revision and replica.
//!
//! Recent lines are asked of each host the service is assigned to
//! (request/reply on the host's logs subject, all hosts at once, each
//! bounded by [`HOST_TIMEOUT`]); with `follow=true` the answer is a stream of
//! JSON lines: first those, then every new line the service's hosts
//! publish on their own log-lines subjects, until the client goes away. The
//! scheduler keeps no logs: lines live in the hosts' bounded rings.
//! Namespace tokens apply as on every `/v1/namespaces/{ns}/...` path (the
//! auth middleware).
//!
//! A line is shown only as coming from the host that sent it, and only
//! from a host that runs the service: a live line's sender is the host its
//! subject names (no host may publish on another's subjects), a recent
//! line's is the host asked; a line naming another host or service, or
//! sent by a host that runs none of the service, is dropped. So a
//! compromised host cannot put lines in another tenant's logs.

use crate::ControlPlane;
use crate::api::ApiError;
use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use futures::StreamExt;
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use wharf_proto::names::{host_logs_subject, host_of_subject, log_lines_wildcard};
use wharf_proto::observe::{LogBatch, LogQuery, LogRecord};
use wharf_proto::{HostId, ServiceId};

/// How long one host may take to answer for its recent lines.
pub const HOST_TIMEOUT: Duration = Duration::from_secs(2);

/// Followers (`follow=true`) one scheduler serves at once; more get 503.
pub const MAX_FOLLOWERS: usize = 256;

/// Lines asked for when neither `tail` nor `since` is given.
pub const DEFAULT_TAIL: usize = 100;

/// Followers being served now, against [`MAX_FOLLOWERS`].
static FOLLOWERS: AtomicUsize = AtomicUsize::new(0);

/// The routes of this module, merged into the API's router.
pub fn routes() -> Router<ControlPlane> {
    Router::new()
        .route("/v1/namespaces/{ns}/services/{name}/logs", get(logs))
        .route("/v1/namespaces/{ns}/jobs/{name}/logs", get(logs))
}

/// The query string, as people type it.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LogsParams {
    follow: Option<bool>,
    /// A duration back from now (`10m`, `1h30m`).
    since: Option<String>,
    tail: Option<usize>,
    replica: Option<u32>,
    host: Option<String>,
}

/// What the request asks for, checked.
struct Wanted {
    service: ServiceId,
    query: LogQuery,
    host: Option<HostId>,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn check(service: ServiceId, params: &LogsParams) -> Result<Wanted, ApiError> {
    let since_ms = match &params.since {
        Some(since) => {
            let back = wharf_proto::units::parse_duration(since).map_err(|e| ApiError::bad_request(format!("since: {e} (e.g. since=10m)")))?;
            Some(now_ms().saturating_sub(u64::try_from(back.as_millis()).unwrap_or(u64::MAX)))
        }
        None => None,
    };
    let host = match &params.host {
        Some(host) => Some(HostId::new(host.clone()).map_err(|e| ApiError::bad_request(format!("host: {e}")))?),
        None => None,
    };
    let tail = params.tail.or(if since_ms.is_none() { Some(DEFAULT_TAIL) } else { None });
    Ok(Wanted { query: LogQuery { service: service.clone(), since_ms, tail, replica: params.replica }, service, host })
}

async fn logs(
    State(plane): State<ControlPlane>,
    Path((ns, name)): Path<(String, String)>,
    params: Result<Query<LogsParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(params) = params.map_err(|e| ApiError::bad_request(format!("{e} (takes follow, since, tail, replica, host)")))?;
    let service = crate::api::service_id(&ns, &name)?;
    // A job's attempts log like replicas (revision = run, replica = attempt).
    if !plane.jobs.read(|state| state.jobs.contains_key(&service) || state.runs.contains_key(&service)) {
        crate::api::find_service(&plane, &service).await?;
    }
    let wanted = check(service, &params)?;
    if let Some(host) = &wanted.host
        && hosts_of(&plane, &wanted).is_empty()
    {
        return Err(ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("host {host} runs no replica of {} (`wharf get services {}` shows where they run)", wanted.service, wanted.service)));
    }
    if params.follow != Some(true) {
        let (lines, missing) = recent(&plane, &wanted).await;
        let truncated = lines.1;
        return Ok(axum::Json(serde_json::json!({"lines": lines.0, "truncated": truncated, "missing": missing})).into_response());
    }
    follow(plane, wanted).await
}

/// The hosts the service is assigned to, or that ran the job's attempts
/// kept in its history (all, or the one asked for). For an autoscaled
/// service, every ready host: any may have started an activation replica
/// of it (scale from zero), which no assignment names.
fn hosts_of(plane: &ControlPlane, wanted: &Wanted) -> BTreeSet<HostId> {
    let mut hosts: BTreeSet<HostId> = plane.jobs.read(|state| {
        state
            .runs
            .get(&wanted.service)
            .into_iter()
            .flat_map(|(history, _)| history.runs.iter().flat_map(|run| run.attempts.iter().filter_map(|a| a.host.clone())))
            .filter(|host| wanted.host.as_ref().is_none_or(|h| h == host))
            .collect()
    });
    hosts.extend(plane.informer.read(|state| {
        state
            .assignments
            .iter()
            .filter(|(host, _)| wanted.host.as_ref().is_none_or(|h| h == *host))
            .filter(|(_, assignment)| assignment.replicas.iter().any(|r| r.service == wanted.service))
            .map(|(host, _)| host.clone())
            .collect::<Vec<_>>()
    }));
    if plane.informer.service(&wanted.service).is_some_and(|s| s.spec.autoscale.is_some()) {
        let ready = plane.hosts.hosts().into_iter().filter(|h| h.ready).map(|h| h.heartbeat.host);
        hosts.extend(ready.filter(|host| wanted.host.as_ref().is_none_or(|h| h == host)));
    }
    hosts
}

/// Recent lines from every host, merged oldest first and cut to `tail`;
/// whether some were left out; and the hosts that did not answer, with why.
async fn recent(plane: &ControlPlane, wanted: &Wanted) -> ((Vec<LogRecord>, bool), Vec<String>) {
    let payload = Bytes::from(serde_json::to_vec(&wanted.query).unwrap_or_default());
    let asks = hosts_of(plane, wanted).into_iter().map(|host| {
        let payload = payload.clone();
        async move {
            let answer = plane.bus.request(&host_logs_subject(&host), payload, HOST_TIMEOUT).await;
            let batch = answer.map_err(|e| e.to_string()).and_then(|m| serde_json::from_slice::<LogBatch>(&m.payload).map_err(|e| format!("unreadable answer: {e}")));
            (host, batch)
        }
    });
    let mut lines = Vec::new();
    let mut truncated = false;
    let mut missing = Vec::new();
    for (host, batch) in futures::future::join_all(asks).await {
        match batch {
            Ok(batch) => {
                truncated |= batch.truncated;
                lines.extend(batch.lines.into_iter().filter(|record| from_sender(record, &host, &wanted.service)));
            }
            Err(e) => missing.push(format!("host {host}: {e}")),
        }
    }
    lines.sort_by(|a, b| (a.time_ms, &a.host, a.revision, a.replica, a.seq).cmp(&(b.time_ms, &b.host, b.revision, b.replica, b.seq)));
    if let Some(tail) = wanted.query.tail
        && lines.len() > tail
    {
        lines.drain(..lines.len() - tail);
    }
    ((lines, truncated), missing)
}

/// One of a bounded number of streams a scheduler serves at once (a
/// counter against its maximum); the slot is given back when dropped, that
/// is when the stream ends or its client goes away.
pub(crate) struct FollowerSlot(&'static AtomicUsize);

impl FollowerSlot {
    /// A slot of `counter`, or 503 naming `what` when all `max` are taken.
    pub(crate) fn take(counter: &'static AtomicUsize, max: usize, what: &str) -> Result<FollowerSlot, ApiError> {
        if counter.fetch_add(1, Ordering::Relaxed) >= max {
            counter.fetch_sub(1, Ordering::Relaxed);
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "too_many_followers",
                format!("this scheduler already streams {what} to {max} clients; try again later or ask another scheduler"),
            ));
        }
        Ok(FollowerSlot(counter))
    }
}

impl Drop for FollowerSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn follow(plane: ControlPlane, wanted: Wanted) -> Result<Response, ApiError> {
    let slot = FollowerSlot::take(&FOLLOWERS, MAX_FOLLOWERS, "logs")?;
    // Subscribe before asking for history, so no line falls between the two;
    // a line in both is dropped by its (host, revision, replica, seq) and
    // time: a replica loaded again numbers its lines from 1, later.
    let subject = log_lines_wildcard(&wanted.service.namespace, &wanted.service.name);
    let live = plane.bus.subscribe(&subject).await.map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "bus_unavailable", format!("cannot follow {subject}: {e}")))?;
    let ((history, _), missing) = recent(&plane, &wanted).await;
    let mut seen = Sent::new();
    let mut first = Vec::new();
    for host in missing {
        first.push(json_line(&serde_json::json!({"notice": format!("no recent lines from {host}")})));
    }
    for record in history {
        seen.insert((record.host.clone(), record.revision, record.replica), (record.seq, record.time_ms));
        first.push(json_line(&record));
    }
    let wanted = Arc::new(wanted);
    let senders = Arc::new(Senders::new(plane, wanted.clone()));
    let live = live.filter_map(move |message| {
        let wanted = wanted.clone();
        let line = serde_json::from_slice::<LogRecord>(&message.payload).ok().filter(|record| {
            let genuine = host_of_subject(&message.subject).is_some_and(|sender| from_sender(record, &sender, &wanted.service) && senders.admit(&sender));
            if !genuine {
                tracing::debug!(subject = %message.subject, host = %record.host, service = %record.service, "dropped a log line not from a host of the service");
                return false;
            }
            let replica_ok = wanted.query.replica.is_none_or(|r| record.replica == r);
            let host_ok = wanted.host.as_ref().is_none_or(|h| *h == record.host);
            let fresh = not_sent(&seen, record);
            replica_ok && host_ok && fresh
        });
        futures::future::ready(line.map(|record| json_line(&record)))
    });
    let stream = futures::stream::iter(first).chain(live).map(move |line| {
        let _held = &slot;
        Ok::<Bytes, std::convert::Infallible>(line)
    });
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], Body::from_stream(stream)).into_response())
}

/// Whether `record` is a line of `service` that `sender` may have written:
/// it names that host and that service.
fn from_sender(record: &LogRecord, sender: &HostId, service: &ServiceId) -> bool {
    record.host == *sender && record.service == *service
}

/// How often a follower looks again for the hosts that run its service
/// when a line comes from a host it did not know.
const SENDERS_REFRESH: Duration = Duration::from_secs(1);

/// The hosts whose live lines a follower shows: [`hosts_of`] the service,
/// looked up again (at most every [`SENDERS_REFRESH`]) when a line comes
/// from another host, since replicas start and move while a client follows.
struct Senders {
    plane: ControlPlane,
    wanted: Arc<Wanted>,
    known: Mutex<(Instant, BTreeSet<HostId>)>,
}

impl Senders {
    fn new(plane: ControlPlane, wanted: Arc<Wanted>) -> Senders {
        let hosts = hosts_of(&plane, &wanted);
        Senders { plane, wanted, known: Mutex::new((Instant::now(), hosts)) }
    }

    /// Whether `host` runs (or recently ran) the service.
    fn admit(&self, host: &HostId) -> bool {
        let Ok(mut known) = self.known.lock() else { return false };
        if !known.1.contains(host) && known.0.elapsed() >= SENDERS_REFRESH {
            *known = (Instant::now(), hosts_of(&self.plane, &self.wanted));
        }
        known.1.contains(host)
    }
}

/// The last line sent from history per (host, revision, replica): its seq and time.
type Sent = BTreeMap<(HostId, u64, u32), (u64, u64)>;

/// Whether a live `record` was not already sent from history: newer in its
/// ring, or from a ring started since (a replica loaded again numbers from 1).
fn not_sent(sent: &Sent, record: &LogRecord) -> bool {
    sent.get(&(record.host.clone(), record.revision, record.replica)).is_none_or(|(seq, time_ms)| record.seq > *seq || record.time_ms > *time_ms)
}

fn json_line(value: &impl serde::Serialize) -> Bytes {
    let mut bytes = serde_json::to_vec(value).unwrap_or_default();
    bytes.push(b'\n');
    Bytes::from(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use wharf_proto::observe::LogStreamName;

    fn line(host: &str, replica: u32, seq: u64, time_ms: u64) -> LogRecord {
        LogRecord {
            time_ms,
            host: HostId::new(host).expect("label"),
            service: "default/web".parse().expect("id"),
            revision: 1,
            replica,
            stream: LogStreamName::Stdout,
            seq,
            line: String::new(),
        }
    }

    #[test]
    fn a_line_counts_as_its_senders_only_when_it_names_that_host_and_the_service() {
        let (a, b) = (HostId::new("a").expect("label"), HostId::new("b").expect("label"));
        let web: ServiceId = "default/web".parse().expect("id");
        let shop: ServiceId = "shop/cart".parse().expect("id");
        assert!(from_sender(&line("a", 0, 1, 1), &a, &web));
        assert!(!from_sender(&line("a", 0, 1, 1), &b, &web), "host b sending a line that names host a");
        assert!(!from_sender(&line("a", 0, 1, 1), &a, &shop), "a line of another service");
    }

    #[test]
    fn live_lines_already_sent_from_history_are_dropped_and_a_reloaded_replica_is_not_mistaken_for_them() {
        let mut sent = Sent::new();
        sent.insert((HostId::new("a").expect("label"), 1, 0), (10, 5_000));
        assert!(!not_sent(&sent, &line("a", 0, 9, 4_990)), "in history");
        assert!(!not_sent(&sent, &line("a", 0, 10, 5_000)), "the last one in history");
        assert!(not_sent(&sent, &line("a", 0, 11, 5_001)), "the next one");
        assert!(not_sent(&sent, &line("a", 0, 1, 6_000)), "a replica loaded again starts at 1, later");
        assert!(not_sent(&sent, &line("a", 1, 3, 4_000)), "another replica");
        assert!(not_sent(&sent, &line("b", 0, 3, 4_000)), "another host");
    }
}
