//! What a service looks like from outside: its stored spec, its rollout and
//! traffic split as the leader last wrote them, and where each replica runs
//! and how it is doing, joined from the assignments and the heartbeats.
//! Everything comes from memory (the informer and the host table), so any
//! scheduler answers, and a listing costs one pass over the assignments.

use crate::ControlPlane;
use crate::hosts::HostEntry;
use crate::informer::State;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use wharf_proto::{AssignedReplica, HostId, ReplicaKey, ReplicaState, ReplicaStatus, ServiceId, ServiceStatus, StoredService};

/// What views need from the cluster, gathered and indexed once per
/// request, so a listing of every service costs one pass over the
/// assignments and the heartbeats.
pub struct Views {
    hosts: BTreeMap<HostId, HostEntry>,
    /// Assigned replicas per service, with their hosts.
    assigned: HashMap<ServiceId, Vec<(HostId, AssignedReplica)>>,
    statuses: HashMap<ServiceId, ServiceStatus>,
    /// Replicas' reports per service, from ready and unready hosts alike.
    reports: HashMap<ServiceId, HashMap<(ReplicaKey, HostId), ReplicaStatus>>,
    /// Per service over ready hosts: requests in flight, requests/s, and
    /// requests/s x mean latency (for a weighted mean).
    load: HashMap<ServiceId, (u64, f64, f64)>,
}

impl Views {
    /// What the view of the one service `id` needs: a single service's
    /// answer (a get, or a put's reply) costs what that service has, not
    /// a copy of every service's status and reports.
    pub fn of(plane: &ControlPlane, id: &ServiceId) -> Views {
        Views::gather_where(plane, |service| service == id)
    }

    /// Reads the host table and the informer's assignments and statuses
    /// for the views of the services `wanted` keeps (a listing's).
    pub fn gather_where(plane: &ControlPlane, wanted: impl Fn(&ServiceId) -> bool) -> Views {
        let hosts: BTreeMap<HostId, HostEntry> = plane.hosts.hosts().into_iter().map(|h| (h.heartbeat.host.clone(), h)).collect();
        let (assigned, statuses) = plane.informer.read(|state: &State| {
            let mut assigned: HashMap<ServiceId, Vec<(HostId, AssignedReplica)>> = HashMap::new();
            for (host, assignment) in &state.assignments {
                for replica in assignment.replicas.iter().filter(|r| wanted(&r.service)) {
                    assigned.entry(replica.service.clone()).or_default().push((host.clone(), replica.clone()));
                }
            }
            let statuses = state.statuses.iter().filter(|(id, _)| wanted(id)).map(|(id, s)| (id.clone(), (**s).clone())).collect();
            (assigned, statuses)
        });
        let mut reports: HashMap<ServiceId, HashMap<(ReplicaKey, HostId), ReplicaStatus>> = HashMap::new();
        let mut load: HashMap<ServiceId, (u64, f64, f64)> = HashMap::new();
        for host in hosts.values() {
            let host: &HostEntry = host;
            for report in host.heartbeat.replicas.iter().filter(|r| wanted(&r.service)) {
                reports.entry(report.service.clone()).or_default().insert((report.key(), host.heartbeat.host.clone()), report.clone());
                if host.ready {
                    load.entry(report.service.clone()).or_default().0 += report.in_flight;
                }
            }
            if host.ready {
                for (service, rps) in host.rps.iter().filter(|(service, _)| wanted(service)) {
                    let entry = load.entry(service.clone()).or_default();
                    entry.1 += rps;
                    entry.2 += rps * host.latency_ms.get(service).copied().unwrap_or(0.0);
                }
            }
        }
        Views { hosts, assigned, statuses, reports, load }
    }

    /// The JSON view of one service: `{"service": ..., "status": ...}`.
    pub fn view(&self, plane: &ControlPlane, stored: &StoredService) -> Value {
        let id = stored.spec.id();
        let record = self.statuses.get(&id);
        let no_reports = HashMap::new();
        let reports = self.reports.get(&id).unwrap_or(&no_reports);
        let mut replicas = Vec::new();
        let mut ready = 0;
        let mut last_error: Option<String> = None;
        let mut per_revision: BTreeMap<u64, (u32, u32)> = BTreeMap::new();
        for (host, assigned) in self.assigned.get(&id).into_iter().flatten() {
            let entry = self.hosts.get(host);
            let reported = reports.get(&(assigned.key(), host.clone()));
            let (state, error) = match (entry, reported) {
                (Some(h), _) if !h.ready => ("lost", Some(format!("host {host} stopped sending heartbeats"))),
                (None, _) => ("lost", Some(format!("host {host} is unknown (never heard from)"))),
                (_, Some(r)) if r.attempt != assigned.attempt => ("loading", None),
                (_, Some(r)) => (state_name(r.state), r.error.clone()),
                _ => ("pending", None),
            };
            let counts = per_revision.entry(assigned.revision).or_default();
            counts.0 += 1;
            if state == "ready" {
                ready += 1;
                counts.1 += 1;
            }
            if let Some(e) = &error {
                last_error = Some(e.clone());
            }
            replicas.push(json!({
                "revision": assigned.revision,
                "replica": assigned.replica,
                "host": host,
                "state": state,
                "attempt": assigned.attempt,
                "failures": reported.map_or(0, |r| r.failures),
                "error": error,
            }));
        }
        for u in record.map(|r| r.unplaceable.as_slice()).unwrap_or(&[]) {
            last_error = Some(format!("replica {} of revision {} cannot be placed: {}", u.replica, u.revision, u.reason));
            replicas.push(json!({"revision": u.revision, "replica": u.replica, "host": null, "state": "unplaceable", "error": u.reason}));
        }
        replicas.sort_by_key(|r| (r["revision"].as_u64(), r["replica"].as_u64()));
        let mut desired = stored.spec.replicas;
        // The leader's live decision when this scheduler leads, else the one it recorded.
        // Growth the namespace's quota held back, as the leader last recorded it.
        let held = record.and_then(|r| r.autoscale.as_ref()?.held.clone());
        let autoscale = match plane.autoscaling.decision(&id) {
            Some(d) => {
                desired = d.replicas;
                Some(json!({"desired": d.replicas, "reason": d.reason, "stable_load": d.stable_load, "panic_load": d.panic_load, "panicking": d.panicking}))
            }
            None => record.and_then(|r| r.autoscale.as_ref()).map(|a| {
                desired = a.replicas;
                json!({"desired": a.replicas, "reason": a.reason})
            }),
        };
        let autoscale = match (autoscale, held) {
            (Some(mut shown), Some((granted, why))) if granted < desired => {
                shown["reason"] = json!(format!("{}; held at {granted}: {why}", shown["reason"].as_str().unwrap_or_default()));
                shown["held"] = json!({"replicas": granted, "why": why});
                desired = granted;
                Some(shown)
            }
            (shown, _) => shown,
        };
        // Mean latency weighted by each host's request rate.
        let (in_flight, rps, weighted) = self.load.get(&id).copied().unwrap_or((0, 0.0, 0.0));
        let latency_ms = if rps > 0.0 { Some(weighted / rps) } else { None };
        let revisions: Vec<Value> = record
            .map(|r| r.wanted.as_slice())
            .unwrap_or(&[])
            .iter()
            .map(|w| {
                let (assigned, ready) = per_revision.get(&w.revision).copied().unwrap_or((0, 0));
                json!({"revision": w.revision, "wanted": w.replicas, "assigned": assigned, "ready": ready})
            })
            .collect();
        if let Some(problem) = record.and_then(|r| r.problem.clone()) {
            last_error = Some(problem);
        }
        // What placement reserves per replica (the request, or the peak
        // learned when larger, for new replicas) and what one instance may
        // grow to (the limit).
        let peak = record.and_then(|r| r.memory_peak);
        let memory = json!({
            "request": stored.spec.memory_request(),
            "limit": stored.spec.limits.memory,
            "concurrency": stored.spec.limits.concurrency,
            "peak": peak,
            "placed_by": peak.map_or(stored.spec.memory_request(), |p| p.min(stored.spec.limits.most_memory()).max(stored.spec.memory_request())),
        });
        json!({
            "service": stored,
            "status": {
                "desired": desired,
                "memory": memory,
                "ready": ready,
                "in_flight": in_flight,
                "rps": rps,
                "latency_ms": latency_ms,
                "autoscale": autoscale,
                "rollout": record.map(|r| &r.rollout),
                "revisions": revisions,
                "ejected": record.map(|r| r.ejected.as_slice()).unwrap_or(&[]),
                "replicas": replicas,
                "last_error": last_error,
                "problem": record.and_then(|r| r.problem.clone()),
            }
        })
    }
}

fn state_name(state: ReplicaState) -> &'static str {
    match state {
        ReplicaState::Loading => "loading",
        ReplicaState::Probing => "probing",
        ReplicaState::Ready => "ready",
        ReplicaState::Failed => "failed",
    }
}
