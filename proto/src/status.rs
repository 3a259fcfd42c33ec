//! What the control plane's leader observes and decides about each service,
//! stored in [`crate::names::STATUS_BUCKET`]: where its rollout stands, how
//! traffic is split between its revisions, how many replicas each revision
//! should run, what cannot be placed and why, and the autoscaler's last
//! decision. Every scheduler's API reads it (so any of them can answer
//! `wharf get` and `wharf rollout status`), and hosts read the traffic split
//! from it. Only the leader writes it, and only when it changes.

use crate::names::{HostId, ServiceId};
use serde::{Deserialize, Serialize};

/// The leader's record of one service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceStatus {
    /// The service.
    pub service: ServiceId,
    /// Where its rollout stands.
    #[serde(default)]
    pub rollout: RolloutState,
    /// Replicas wanted per revision now (a rolling update wants some of each).
    #[serde(default)]
    pub wanted: Vec<RevisionCount>,
    /// Replicas no host can take now, and why (at most [`MAX_LISTED`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unplaceable: Vec<UnplaceableReplica>,
    /// Unplaceable replicas beyond those listed.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub unplaceable_more: u32,
    /// The autoscaler's last decision, for an autoscaled service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscale: Option<AutoscaleSummary>,
    /// Replicas taken out of rotation as outliers, and why (at most [`MAX_LISTED`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ejected: Vec<EjectedReplica>,
    /// Where the service runs: each host assigned replicas of it, per
    /// revision, and whether one of them is ready there. Hosts send a
    /// request only to a host with a ready replica of the revision it
    /// picked, on that host's own subject
    /// ([`crate::names::host_request_subject`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub placed: Vec<PlacedRevision>,
    /// The most linear memory one instance of the service was seen using
    /// (hosts report it; this leader keeps the largest it heard since it
    /// took over). New replicas reserve the larger of this and the
    /// service's memory request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_peak: Option<crate::ByteSize>,
    /// A record of the service that could not be read or written, and
    /// why; the rest of the cluster is unaffected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
    /// The service record's generation this status was decided from (as
    /// Kubernetes' `observedGeneration`): a client that changed the service
    /// waits for it before reading the rollout.
    #[serde(default)]
    pub observed_generation: u64,
    /// The lease epoch of the leader that wrote it.
    #[serde(default)]
    pub epoch: u64,
    /// The KV revision it was read at (readers fill it in).
    #[serde(default)]
    pub version: u64,
}

impl ServiceStatus {
    /// The status of a service nothing is known of yet.
    pub fn new(service: ServiceId) -> Self {
        ServiceStatus {
            service,
            rollout: RolloutState::default(),
            wanted: Vec::new(),
            unplaceable: Vec::new(),
            unplaceable_more: 0,
            autoscale: None,
            ejected: Vec::new(),
            placed: Vec::new(),
            memory_peak: None,
            problem: None,
            observed_generation: 0,
            epoch: 0,
            version: 0,
        }
    }
}

/// How many entries a status lists of each kind; the rest are counted.
pub const MAX_LISTED: usize = 20;

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// A service's rollout: from the last good revision (`stable`) to the one
/// its spec asks for (`latest`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutState {
    /// The last revision fully rolled out (every replica ready); 0 before the first.
    #[serde(default)]
    pub stable: u64,
    /// The revision the spec asks for.
    #[serde(default)]
    pub latest: u64,
    /// Where the rollout stands.
    #[serde(default)]
    pub phase: RolloutPhase,
    /// Why, in a sentence for people.
    #[serde(default)]
    pub message: String,
    /// When the rollout to `latest` started, in milliseconds since the Unix epoch.
    #[serde(default)]
    pub started_at_ms: u64,
    /// When a replica of `latest` last became ready (or the rollout started):
    /// the progress deadline counts from here.
    #[serde(default)]
    pub progressed_at_ms: u64,
    /// Ready replicas of `latest` when last planned: a rise is progress.
    #[serde(default)]
    pub ready: u32,
    /// The canary step being taken (index into the policy's steps).
    #[serde(default)]
    pub step: u32,
    /// When that step started.
    #[serde(default)]
    pub step_started_at_ms: u64,
    /// The last rollout that failed, if it is `latest`'s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed: Option<FailedRollout>,
    /// How requests are split between revisions now; empty: over the ready
    /// replicas of every revision that runs (as during a rolling update).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub traffic: Vec<TrafficWeight>,
}

/// Where a rollout stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RolloutPhase {
    /// Every replica runs `latest` and is ready (or nothing is asked for).
    #[default]
    Complete,
    /// New replicas are starting; old ones stop as new ones become ready.
    Progressing,
    /// The new revision takes a share of the traffic while it is judged.
    Canary,
    /// The spec splits traffic between revisions explicitly.
    Split,
    /// The rollout to `latest` failed; see [`RolloutState::failed`].
    Failed,
}

impl RolloutPhase {
    /// The phase's name, as serialised.
    pub fn as_str(self) -> &'static str {
        match self {
            RolloutPhase::Complete => "complete",
            RolloutPhase::Progressing => "progressing",
            RolloutPhase::Canary => "canary",
            RolloutPhase::Split => "split",
            RolloutPhase::Failed => "failed",
        }
    }
}

/// A rollout that failed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailedRollout {
    /// The revision that failed.
    pub revision: u64,
    /// Why, for people.
    pub reason: String,
    /// When, in milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// Whether the service went back to the stable revision.
    pub rolled_back: bool,
    /// Whether one replica of the failed revision keeps being retried (with
    /// backoff), so the rollout resumes by itself once the cause is gone
    /// (a missing secret created, say). A rollout that failed on its
    /// requests (canary analysis, ejection) is not retried.
    pub retrying: bool,
}

/// One revision's share of the traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrafficWeight {
    /// The revision.
    pub revision: u64,
    /// Percent of requests, 0 to 100.
    pub percent: u32,
}

/// Replicas wanted for one revision.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevisionCount {
    /// The revision.
    pub revision: u64,
    /// How many replicas of it should run.
    pub replicas: u32,
}

/// A replica no host can take, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnplaceableReplica {
    /// Its revision.
    pub revision: u64,
    /// Its index.
    pub replica: u32,
    /// What kept every host out.
    pub reason: String,
}

/// Replicas of one revision of a service assigned to one host.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PlacedRevision {
    /// The host.
    pub host: HostId,
    /// The revision.
    pub revision: u64,
    /// Whether one of them is ready, on a host that is ready and not
    /// draining: the host listens for the revision's requests.
    pub ready: bool,
}

/// A replica taken out of rotation as an outlier.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EjectedReplica {
    /// Its revision.
    pub revision: u64,
    /// Its index.
    pub replica: u32,
    /// The host it failed on (its replacement goes elsewhere when it can).
    pub host: HostId,
    /// Why: its error rate against its siblings'.
    pub reason: String,
    /// When, in milliseconds since the Unix epoch.
    pub at_ms: u64,
}

/// The autoscaler's decision, as status shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AutoscaleSummary {
    /// Replicas it wants.
    pub replicas: u32,
    /// Why, for people.
    pub reason: String,
    /// Growth held below `replicas` by the namespace's quota: the replicas
    /// granted, and the quota that binds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held: Option<(u32, String)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_round_trips_and_reads_with_fields_missing() {
        let status = ServiceStatus {
            rollout: RolloutState {
                stable: 1,
                latest: 2,
                phase: RolloutPhase::Canary,
                traffic: vec![TrafficWeight { revision: 1, percent: 90 }, TrafficWeight { revision: 2, percent: 10 }],
                ..RolloutState::default()
            },
            wanted: vec![RevisionCount { revision: 1, replicas: 4 }, RevisionCount { revision: 2, replicas: 1 }],
            placed: vec![PlacedRevision { host: HostId::new("h-1").expect("valid"), revision: 2, ready: true }],
            ..ServiceStatus::new(ServiceId::new("shop", "web").expect("valid"))
        };
        let json = serde_json::to_value(&status).expect("serialises");
        assert_eq!(json["rollout"]["phase"], "canary");
        assert_eq!(json["placed"][0]["host"], "h-1");
        assert_eq!(serde_json::from_value::<ServiceStatus>(json).expect("parses"), status);
        let minimal: ServiceStatus = serde_json::from_str(r#"{"service": "shop/web"}"#).expect("defaults");
        assert_eq!(minimal.rollout.phase, RolloutPhase::Complete);
    }
}
