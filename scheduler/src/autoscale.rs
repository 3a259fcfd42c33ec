//! The autoscaler's I/O side: turns heartbeats (replica load, requests held
//! for activation) and activation announcements into load samples for the
//! pure `wharf_scheduler_core::Autoscaler`, and keeps its decisions for the
//! controller (replica counts) and for status (the load behind them).

use crate::hosts::HostEntry;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};
use wharf_proto::{ServiceId, StoredService};
use wharf_scheduler_core::{Autoscaler, Decision};

/// Shared autoscaling state; cheap to clone.
#[derive(Clone, Default)]
pub struct Autoscaling {
    inner: Arc<Mutex<State>>,
}

#[derive(Default)]
struct State {
    scaler: Autoscaler,
    decisions: BTreeMap<ServiceId, Decision>,
    /// Decisions that changed a service's replica count, by service and direction.
    changes: BTreeMap<(ServiceId, &'static str), u64>,
    /// Activation announcements not yet reflected in a heartbeat: demand now.
    announced: BTreeMap<ServiceId, u64>,
}

impl Autoscaling {
    /// Records that a request is waiting for `service` (an activation announcement).
    pub fn announce(&self, service: &ServiceId) {
        if let Ok(mut state) = self.inner.lock() {
            *state.announced.entry(service.clone()).or_default() += 1;
        }
    }

    /// Samples the load of every autoscaled service and decides its replica
    /// count. Returns whether any decision changed.
    pub fn tick<'a>(
        &self,
        services: impl IntoIterator<Item = &'a StoredService>,
        current: &std::collections::HashMap<ServiceId, u32>,
        hosts: &[HostEntry],
    ) -> bool {
        let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)).unwrap_or(0);
        let Ok(mut state) = self.inner.lock() else { return false };
        let announced = std::mem::take(&mut state.announced);
        // Load per service, summed over the ready hosts once (not once per service).
        let mut load: std::collections::HashMap<ServiceId, (f64, f64)> = std::collections::HashMap::new();
        for host in hosts.iter().filter(|h| h.ready) {
            for replica in &host.heartbeat.replicas {
                load.entry(replica.service.clone()).or_default().0 += replica.in_flight as f64;
            }
            for demand in &host.heartbeat.demand {
                load.entry(demand.service.clone()).or_default().0 += demand.waiting as f64;
            }
            for (service, rps) in &host.rps {
                load.entry(service.clone()).or_default().1 += rps;
            }
        }
        let mut changed = false;
        let mut known: std::collections::HashSet<ServiceId> = std::collections::HashSet::new();
        for stored in services {
            let spec = &stored.spec;
            let id = spec.id();
            known.insert(id.clone());
            let Some(policy) = &spec.autoscale else {
                if state.decisions.remove(&id).is_some() {
                    state.scaler.forget(&id);
                }
                continue;
            };
            let (mut in_flight, rps) = load.get(&id).copied().unwrap_or((0.0, 0.0));
            in_flight += announced.get(&id).copied().unwrap_or(0) as f64;
            let current = current.get(&id).copied().unwrap_or(0);
            state.scaler.observe(&id, now_ms, in_flight, rps);
            let decision = state.scaler.decide(&id, policy, now_ms, current);
            let before = state.decisions.get(&id).map(|d| d.replicas);
            if before != Some(decision.replicas) {
                tracing::info!(service = %id, from = current, to = decision.replicas, "autoscale: {}", decision.reason);
                changed = true;
                let direction = match decision.replicas.cmp(&current) {
                    std::cmp::Ordering::Greater => "up",
                    std::cmp::Ordering::Less => "down",
                    std::cmp::Ordering::Equal => "hold",
                };
                *state.changes.entry((id.clone(), direction)).or_default() += 1;
            }
            state.decisions.insert(id, decision);
        }
        let gone: Vec<ServiceId> = state.decisions.keys().filter(|id| !known.contains(id)).cloned().collect();
        for id in gone {
            state.decisions.remove(&id);
            state.scaler.forget(&id);
        }
        changed
    }

    /// The replica count the autoscaler wants for `service`, if it scales it.
    pub fn replicas(&self, service: &ServiceId) -> Option<u32> {
        self.inner.lock().ok()?.decisions.get(service).map(|d| d.replicas)
    }

    /// OpenMetrics text (without the closing `# EOF`): decisions that
    /// changed a replica count, and the replicas each autoscaled service
    /// wants now; only of services in namespaces `shown` allows.
    pub fn metrics(&self, shown: impl Fn(&str) -> bool) -> String {
        use std::fmt::Write;
        let Ok(state) = self.inner.lock() else { return String::new() };
        let mut out = String::new();
        out.push_str("# HELP wharf_autoscaler_decisions Autoscaler decisions that changed a service's replica count.\n# TYPE wharf_autoscaler_decisions counter\n");
        for ((service, direction), count) in state.changes.iter().filter(|((service, _), _)| shown(&service.namespace)) {
            let _ = writeln!(out, "wharf_autoscaler_decisions_total{{service=\"{service}\",direction=\"{direction}\"}} {count}");
        }
        out.push_str("# HELP wharf_autoscaler_desired_replicas Replicas the autoscaler wants.\n# TYPE wharf_autoscaler_desired_replicas gauge\n");
        for (service, decision) in state.decisions.iter().filter(|(service, _)| shown(&service.namespace)) {
            let _ = writeln!(out, "wharf_autoscaler_desired_replicas{{service=\"{service}\"}} {}", decision.replicas);
            let _ = writeln!(out, "wharf_autoscaler_load{{service=\"{service}\",window=\"stable\"}} {}", decision.stable_load);
            let _ = writeln!(out, "wharf_autoscaler_load{{service=\"{service}\",window=\"panic\"}} {}", decision.panic_load);
        }
        out
    }

    /// The last decision for `service`, for status.
    pub fn decision(&self, service: &ServiceId) -> Option<Decision> {
        self.inner.lock().ok()?.decisions.get(service).cloned()
    }
}
