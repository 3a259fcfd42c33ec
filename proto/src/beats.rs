//! Which heartbeat a host sends on each tick: the full report when anything
//! in it changed (or was asked for, or has not gone out for a while), else
//! the few bytes of [`HeartbeatAlive`]. An idle host's replicas, however
//! many, then cost the control plane nothing per tick.

use crate::{Heartbeat, HeartbeatAlive};

/// A full heartbeat goes out at least this often, changed or not, so a
/// receiver that missed one and the request for it catches up by itself.
pub const FULL_EVERY_MS: u64 = 30_000;

/// What to send on one tick.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Beat {
    Full(Heartbeat),
    Alive(HeartbeatAlive),
}

/// The sender's memory: the last full heartbeat and its version.
#[derive(Debug, Default)]
pub struct Beats {
    last: Option<Heartbeat>,
    version: u64,
    resend: bool,
}

impl Beats {
    pub fn new() -> Beats {
        Beats::default()
    }

    /// The next beat is a full one (a receiver asked for it).
    pub fn resend(&mut self) {
        self.resend = true;
    }

    /// Turns this tick's report into what to send, numbering full reports.
    pub fn next(&mut self, mut heartbeat: Heartbeat) -> Beat {
        let now = heartbeat.sent_at_ms;
        if !self.resend
            && let Some(last) = &self.last
            && now.saturating_sub(last.sent_at_ms) < FULL_EVERY_MS
            && unchanged(last, &heartbeat)
        {
            return Beat::Alive(HeartbeatAlive {
                host: heartbeat.host,
                started_at_ms: heartbeat.started_at_ms,
                version: self.version,
                sent_at_ms: now,
            });
        }
        self.version += 1;
        self.resend = false;
        heartbeat.version = self.version;
        self.last = Some(heartbeat.clone());
        Beat::Full(heartbeat)
    }
}

/// Whether `now` says nothing `last` did not: every field but the send
/// time, the version and the resident memory, which moves on its own and
/// counts only when it moved by more than an eighth.
fn unchanged(last: &Heartbeat, now: &Heartbeat) -> bool {
    // Spelled out field by field, so a field added to heartbeats must be placed here.
    let Heartbeat {
        host,
        addr,
        labels,
        capacity,
        cached,
        replicas,
        sent_at_ms: _,
        started_at_ms,
        draining,
        demand,
        memory_reserved,
        memory_in_use,
        memory_overcommit,
        version: _,
        seal_key,
    } = now;
    let memory_close = last.memory_in_use.0.abs_diff(memory_in_use.0) <= last.memory_in_use.0 / 8;
    memory_close
        && last.host == *host
        && last.started_at_ms == *started_at_ms
        && last.draining == *draining
        && last.memory_reserved == *memory_reserved
        && last.capacity == *capacity
        && last.addr == *addr
        && last.labels == *labels
        && last.replicas == *replicas
        && last.demand == *demand
        && last.cached == *cached
        && last.seal_key == *seal_key
        && last.memory_overcommit == *memory_overcommit
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ByteSize, Capacity, HostId, ReplicaKey, ReplicaState, ReplicaStatus, ServiceId};

    fn heartbeat(at: u64, requests: u64) -> Heartbeat {
        Heartbeat {
            host: HostId::new("h1").expect("valid"),
            addr: None,
            labels: Default::default(),
            capacity: Capacity { memory: ByteSize::gib(1), instances: 10 },
            cached: Vec::new(),
            replicas: vec![ReplicaStatus {
                requests,
                ..ReplicaStatus::new(
                    ReplicaKey { service: ServiceId::new("default", "hello").expect("valid"), revision: 1, replica: 0 },
                    0,
                    ReplicaState::Ready,
                )
            }],
            sent_at_ms: at,
            started_at_ms: 1,
            draining: false,
            demand: Vec::new(),
            memory_reserved: ByteSize::mib(64),
            memory_in_use: ByteSize::mib(100),
            memory_overcommit: None,
            version: 0,
            seal_key: None,
        }
    }

    #[test]
    fn an_idle_host_sends_one_full_beat_then_alive_ones_naming_it() {
        let mut beats = Beats::new();
        let Beat::Full(first) = beats.next(heartbeat(1_000, 5)) else { panic!("the first beat must be full") };
        assert_eq!(first.version, 1);
        for at in [1_500, 2_000, 2_500] {
            assert_eq!(
                beats.next(heartbeat(at, 5)),
                Beat::Alive(HeartbeatAlive { host: first.host.clone(), started_at_ms: 1, version: 1, sent_at_ms: at })
            );
        }
    }

    #[test]
    fn any_change_a_request_for_it_or_a_long_silence_sends_a_full_beat() {
        let mut beats = Beats::new();
        beats.next(heartbeat(1_000, 5));
        let Beat::Full(counted) = beats.next(heartbeat(1_500, 6)) else { panic!("a counter moved") };
        assert_eq!(counted.version, 2);
        beats.resend();
        assert!(matches!(beats.next(heartbeat(2_000, 6)), Beat::Full(h) if h.version == 3));
        assert!(matches!(beats.next(heartbeat(2_500, 6)), Beat::Alive(a) if a.version == 3));
        assert!(matches!(beats.next(heartbeat(2_000 + FULL_EVERY_MS, 6)), Beat::Full(h) if h.version == 4));
        let mut grown = heartbeat(2_600 + FULL_EVERY_MS, 6);
        grown.memory_in_use = ByteSize::mib(200);
        assert!(matches!(beats.next(grown), Beat::Full(_)), "resident memory doubled");
        let mut wobble = heartbeat(3_000 + FULL_EVERY_MS, 6);
        wobble.memory_in_use = ByteSize::mib(201);
        assert!(matches!(beats.next(wobble), Beat::Alive(_)), "a 0.5% move in resident memory is not news");
    }
}
