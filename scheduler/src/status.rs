//! What a service looks like from outside: its stored spec plus where each
//! replica runs and how it is doing, joined from assignments and heartbeats.

use crate::ControlPlane;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use crate::hosts::HostEntry;
use wharf_proto::{Assignment, HostId, ReplicaState, StoredService};

/// The JSON view of one service: `{"service": ..., "status": ...}`.
pub fn service_view(plane: &ControlPlane, stored: &StoredService, assignments: &[Assignment]) -> Value {
    view(plane, stored, assignments, &host_map(plane))
}

/// The views of several services, reading the host table once.
pub fn service_views<'a>(plane: &ControlPlane, services: impl IntoIterator<Item = &'a StoredService>, assignments: &[Assignment]) -> Vec<Value> {
    let hosts = host_map(plane);
    services.into_iter().map(|stored| view(plane, stored, assignments, &hosts)).collect()
}

fn host_map(plane: &ControlPlane) -> BTreeMap<HostId, HostEntry> {
    plane.hosts.hosts().into_iter().map(|h| (h.heartbeat.host.clone(), h)).collect()
}

fn view(plane: &ControlPlane, stored: &StoredService, assignments: &[Assignment], hosts: &BTreeMap<HostId, HostEntry>) -> Value {
    let id = stored.spec.id();
    let mut replicas = Vec::new();
    let mut ready = 0;
    let mut last_error: Option<String> = None;
    for assignment in assignments {
        for assigned in assignment.replicas.iter().filter(|r| r.service == id) {
            let host = hosts.get(&assignment.host);
            let reported = host.and_then(|h| h.heartbeat.replicas.iter().find(|r| r.service == id && r.replica == assigned.replica));
            let (state, error) = match (host, reported) {
                (Some(h), _) if !h.ready => ("lost".to_string(), Some(format!("host {} stopped sending heartbeats", assignment.host))),
                (_, Some(r)) if r.generation != stored.generation => ("updating".to_string(), None),
                (_, Some(r)) => (state_name(r.state).to_string(), r.error.clone()),
                _ => ("pending".to_string(), None),
            };
            if state == "ready" {
                ready += 1;
            }
            if let Some(e) = &error {
                last_error = Some(e.clone());
            }
            replicas.push(json!({"replica": assigned.replica, "host": assignment.host, "state": state, "error": error}));
        }
    }
    if let Ok(unplaceable) = plane.unplaceable.lock()
        && let Some(list) = unplaceable.get(&id)
    {
        for u in list {
            last_error = Some(format!("replica {} cannot be placed: {}", u.replica, u.reason));
            replicas.push(json!({"replica": u.replica, "host": null, "state": "unplaceable", "error": u.reason}));
        }
    }
    replicas.sort_by_key(|r| r["replica"].as_u64());
    let mut desired = stored.spec.replicas;
    let autoscale = plane.autoscaling.decision(&id).map(|d| {
        desired = d.replicas;
        json!({"desired": d.replicas, "reason": d.reason, "stable_load": d.stable_load, "panic_load": d.panic_load, "panicking": d.panicking})
    });
    let (in_flight, rps) = hosts.values().filter(|h| h.ready).fold((0u64, 0.0f64), |(f, r), h| {
        let flying: u64 = h.heartbeat.replicas.iter().filter(|x| x.service == id).map(|x| x.in_flight).sum();
        (f + flying, r + h.rps.get(&id).copied().unwrap_or(0.0))
    });
    // Mean latency weighted by each host's request rate.
    let weighted: f64 = hosts.values().filter(|h| h.ready).map(|h| h.rps.get(&id).copied().unwrap_or(0.0) * h.latency_ms.get(&id).copied().unwrap_or(0.0)).sum();
    let latency_ms = if rps > 0.0 { Some(weighted / rps) } else { None };
    json!({
        "service": stored,
        "status": {
            "desired": desired,
            "ready": ready,
            "in_flight": in_flight,
            "rps": rps,
            "latency_ms": latency_ms,
            "autoscale": autoscale,
            "replicas": replicas,
            "last_error": last_error,
        }
    })
}

fn state_name(state: ReplicaState) -> &'static str {
    match state {
        ReplicaState::Loading => "loading",
        ReplicaState::Ready => "ready",
        ReplicaState::Failed => "failed",
    }
}
