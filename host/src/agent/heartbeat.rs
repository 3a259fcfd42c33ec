//! Heartbeats: every interval the host tells the control plane that it is
//! alive, what it can hold, what it has compiled, how each replica is doing
//! and what waits for activation. The same tick drops replicas that have
//! finished draining and activation replicas that are no longer needed.
//! Draining the host (SIGTERM) is here too: it stops taking work, says so,
//! and waits for requests in flight.

use super::HostAgent;
use bytes::Bytes;
use std::sync::atomic::Ordering;
use std::time::Duration;
use std::sync::Arc;
use wharf_proto::Heartbeat;
use wharf_proto::beats::Beat;
use wharf_proto::names::{host_alive_subject, host_heartbeat_subject, host_resend_subject};

/// How long a replica no longer assigned keeps answering what reached it
/// (requests NATS handed this host just before it stopped listening).
pub(crate) const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// The longest a draining replica is kept for its requests in flight.
pub(crate) const DRAIN_LIMIT: Duration = Duration::from_secs(60);

impl HostAgent {
    /// One tick: tidy up, then send a heartbeat.
    pub(super) async fn tick(&self) {
        if self.inner.replicas.sweep(DRAIN_GRACE, DRAIN_LIMIT) > 0 {
            self.replicas_changed();
        }
        let assigned = self.inner.replicas.revisions();
        self.inner.directory.forget_revisions(|service, revision| assigned.contains(&(service.clone(), revision)));
        self.inner.activations.expire(
            |service| self.inner.replicas.least_busy(service, None).is_some(),
            |service| self.inner.replicas.has_service(service),
        );
        self.send_heartbeat().await;
    }

    /// Stops taking work: leaves every queue group and reports itself
    /// draining, so the control plane places its replicas elsewhere; then
    /// waits (up to `timeout`) for requests in flight to finish.
    pub async fn drain(&self, timeout: Duration) {
        self.inner.draining.store(true, Ordering::Relaxed);
        self.update_listening();
        self.sync_triggers();
        self.send_heartbeat().await;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let in_flight = self.inner.replicas.in_flight();
            if in_flight == 0 || tokio::time::Instant::now() >= deadline {
                if in_flight > 0 {
                    tracing::warn!("{in_flight} request(s) still in flight after {timeout:?}; stopping anyway");
                }
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub(super) async fn send_heartbeat(&self) {
        let config = &self.inner.config;
        let heartbeat = Heartbeat {
            host: config.host.clone(),
            addr: config.ingress_addr.clone(),
            labels: config.labels.clone(),
            capacity: config.capacity,
            cached: self.inner.runtime.compiled_digests(),
            replicas: self.inner.replicas.statuses(),
            sent_at_ms: super::now_ms(),
            started_at_ms: self.inner.started_at_ms,
            draining: self.inner.draining.load(Ordering::Relaxed),
            demand: self.inner.activations.demand(),
            memory_reserved: wharf_proto::ByteSize(
                self.inner.replicas.memory_reserved() + self.inner.jobs.memory_reserved() + self.inner.activations.reserved(|id| self.inner.directory.memory_request(id)).0,
            ),
            memory_in_use: resident_memory(),
            memory_overcommit: Some(config.memory_overcommit),
            version: 0,
            seal_key: config.seal_key.as_ref().map(|key| key.public().to_string()),
        };
        // Full when something changed; else only "alive, nothing changed".
        let beat = match self.inner.beats.lock() {
            Ok(mut beats) => beats.next(heartbeat),
            Err(_) => Beat::Full(heartbeat),
        };
        let (subject, payload) = match &beat {
            Beat::Full(heartbeat) => (host_heartbeat_subject(&config.host), serde_json::to_vec(heartbeat)),
            Beat::Alive(alive) => (host_alive_subject(&config.host), serde_json::to_vec(alive)),
        };
        let payload = match payload {
            Ok(payload) => Bytes::from(payload),
            Err(e) => {
                tracing::error!("cannot encode a heartbeat (a bug): {e}");
                return;
            }
        };
        if let Err(e) = self.inner.bus.publish(&subject, payload).await {
            tracing::debug!("heartbeat not sent: {e}");
            // The control plane may have missed what changed: say it all next time.
            if let (Beat::Full(_), Ok(mut beats)) = (&beat, self.inner.beats.lock()) {
                beats.resend();
            }
        }
    }

    /// Hands the control plane's announcements of lost hosts to the
    /// directory (no request goes there any more) and to the requests in
    /// flight ([`HostAgent::send_once`](super::HostAgent)).
    pub(super) async fn follow_lost_hosts(&self) -> Result<(), wharf_bus::SubscribeError> {
        self.each_message(wharf_proto::names::HOST_DOWN_SUBJECT, |agent, message| async move {
            match serde_json::from_slice::<wharf_proto::HostDown>(&message.payload) {
                Ok(down) => {
                    agent.inner.directory.host_lost(&down.host);
                    // Nobody waiting is fine.
                    drop(agent.inner.hosts_down.send(Arc::new(down)));
                }
                Err(e) => tracing::debug!("ignoring an unreadable lost-host announcement: {e}"),
            }
        })
        .await
    }

    /// Sends a full heartbeat whenever the control plane asks for one (it
    /// heard "nothing changed" about a report it does not hold).
    pub(super) async fn answer_resend_requests(&self) -> Result<(), wharf_bus::SubscribeError> {
        self.each_message(&host_resend_subject(&self.inner.config.host), |agent, _| async move {
            if let Ok(mut beats) = agent.inner.beats.lock() {
                beats.resend();
            }
            agent.send_heartbeat().await;
        })
        .await
    }
}

/// This process's resident set, from /proc (0 where there is none).
fn resident_memory() -> wharf_proto::ByteSize {
    let kib = std::fs::read_to_string("/proc/self/status").ok().and_then(|status| {
        status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
    });
    wharf_proto::ByteSize(kib.unwrap_or(0) * 1024)
}
