//! What this host knows of every service in the cluster, for routing: the
//! latest spec of each (routes, limits, autoscaling) from the services
//! bucket; from the status bucket, how its traffic is split between
//! revisions, how many replicas the control plane wants of it (for
//! namespace quotas at activation) and which hosts have ready replicas of
//! which revisions (where requests go), with what hosts announced since;
//! the route table built from the specs; and the specs of revisions, read
//! from the revisions bucket when needed and cached (they never change).

use crate::routes::RouteTable;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use wharf_bus::Kv;
use wharf_proto::names::revision_key;
use wharf_proto::{HostId, PlacedRevision, ReplicaReady, Revision, ServiceId, ServiceSpec, ServiceStatus, StoredService, TrafficWeight};

/// How long a host's announcement that a replica is ready there is
/// believed without the status saying so: the control plane writes the
/// status within a heartbeat or two of the replica becoming ready.
const ANNOUNCED_GRACE: Duration = Duration::from_secs(5);

/// A service as routing sees it.
struct Known {
    /// The latest spec and its revision.
    spec: Arc<ServiceSpec>,
    revision: u64,
}

/// How a service's requests are split between revisions.
#[derive(Default)]
struct Split {
    weights: Vec<TrafficWeight>,
    /// Requests routed so far, for an exact split (see [`Directory::pick`]).
    counter: AtomicU64,
}

/// Where a service runs, for sending its requests to other hosts.
#[derive(Default)]
struct Placement {
    /// Per host and revision, from the service's status.
    placed: Vec<PlacedRevision>,
    /// Replicas hosts announced ready, and when; believed only where
    /// `placed` has the host and revision (the control plane placed it
    /// there), for [`ANNOUNCED_GRACE`].
    announced: Vec<(HostId, u64, Instant)>,
    /// Requests sent so far, to spread them over the hosts in turn.
    sent: AtomicU64,
}

impl Placement {
    /// Whether `placed` has a ready replica, as the status says or its host announced.
    fn serves(&self, placed: &PlacedRevision, now: Instant) -> bool {
        placed.ready
            || self.announced.iter().any(|(host, revision, at)| *host == placed.host && *revision == placed.revision && now.duration_since(*at) < ANNOUNCED_GRACE)
    }
}

#[derive(Default)]
struct State {
    services: BTreeMap<ServiceId, Known>,
    splits: BTreeMap<ServiceId, Split>,
    /// Replicas the control plane wants of each service, over its revisions.
    wanted: BTreeMap<ServiceId, u64>,
    /// Where each service runs.
    placements: BTreeMap<ServiceId, Placement>,
    /// Local replicas' specs, whose routes stand in for a service the
    /// watch has not delivered yet (so a fresh host serves at once).
    local: BTreeMap<ServiceId, Arc<ServiceSpec>>,
    /// Every service's latest routes (else its local replicas'), changed a
    /// service at a time.
    routes: RouteTable,
}

impl State {
    /// Sets the route table's entries for `id` from what is known of it now.
    fn route(&mut self, id: &ServiceId) {
        let routes = match (self.services.get(id), self.local.get(id)) {
            (Some(known), _) => known.spec.routes.as_slice(),
            (None, Some(spec)) => spec.routes.as_slice(),
            (None, None) => &[],
        };
        self.routes.set(id, routes);
    }
}

/// The directory (see the module docs). One lock for the known services,
/// the splits and the route table, which are rebuilt together; reads on
/// the request path take it shared.
pub(crate) struct Directory {
    state: RwLock<State>,
    revisions_kv: Kv,
    /// Revisions read so far.
    revisions: Mutex<HashMap<(ServiceId, u64), Arc<ServiceSpec>>>,
}

impl Directory {
    pub(crate) fn new(revisions_kv: Kv) -> Directory {
        Directory { state: RwLock::default(), revisions_kv, revisions: Mutex::default() }
    }

    fn read<T>(&self, read: impl FnOnce(&State) -> T) -> T {
        match self.state.read() {
            Ok(state) => read(&state),
            Err(poisoned) => read(&poisoned.into_inner()),
        }
    }

    fn write<T>(&self, write: impl FnOnce(&mut State) -> T) -> T {
        match self.state.write() {
            Ok(mut state) => write(&mut state),
            Err(poisoned) => write(&mut poisoned.into_inner()),
        }
    }

    /// A service was created, changed (`Some`) or deleted (`None`).
    /// Returns the service's component, to compile ahead.
    pub(crate) fn service_changed(&self, key: &str, value: Option<&[u8]>) -> Option<wharf_proto::Digest> {
        let parsed = value.map(serde_json::from_slice::<StoredService>);
        let mut component = None;
        self.write(|state| match parsed {
            Some(Ok(stored)) => {
                component = Some(stored.spec.component.clone());
                let id = stored.spec.id();
                state.services.insert(id.clone(), Known { revision: stored.revision, spec: Arc::new(stored.spec) });
                state.route(&id);
            }
            Some(Err(e)) => tracing::error!(key, "ignoring an unreadable service: {e}"),
            None => {
                let known = state.services.keys().chain(state.splits.keys()).chain(state.wanted.keys()).chain(state.placements.keys());
                let gone: BTreeSet<ServiceId> = known.filter(|id| id.key() == key).cloned().collect();
                for id in &gone {
                    state.services.remove(id);
                    state.splits.remove(id);
                    state.wanted.remove(id);
                    state.placements.remove(id);
                    state.route(id);
                }
            }
        });
        component
    }

    /// A service's status changed: keep its traffic split and wanted replicas.
    pub(crate) fn status_changed(&self, value: Option<&[u8]>) {
        let Some(value) = value else { return };
        let status = match serde_json::from_slice::<ServiceStatus>(value) {
            Ok(status) => status,
            Err(e) => {
                tracing::error!("ignoring an unreadable service status: {e}");
                return;
            }
        };
        let wanted = status.wanted.iter().map(|w| u64::from(w.replicas)).sum();
        self.write(|state| {
            state.wanted.insert(status.service.clone(), wanted);
            state.placements.entry(status.service.clone()).or_default().placed = status.placed;
            match state.splits.get_mut(&status.service) {
                Some(split) => split.weights = status.rollout.traffic,
                None => {
                    state.splits.insert(status.service, Split { weights: status.rollout.traffic, counter: AtomicU64::new(0) });
                }
            }
        });
    }

    /// Another host announced a ready replica: requests may go there before
    /// the status says so (if the status places the revision there).
    pub(crate) fn replica_announced(&self, ready: ReplicaReady) {
        let now = Instant::now();
        self.write(|state| {
            let placement = state.placements.entry(ready.service).or_default();
            placement.announced.retain(|(host, revision, at)| now.duration_since(*at) < ANNOUNCED_GRACE && (*host != ready.host || *revision != ready.revision));
            placement.announced.push((ready.host, ready.revision, now));
        });
    }

    /// The control plane announced `host` lost: no request goes there
    /// until a status or an announcement says it serves again.
    pub(crate) fn host_lost(&self, host: &HostId) {
        self.write(|state| {
            for placement in state.placements.values_mut() {
                placement.placed.retain(|p| p.host != *host);
                placement.announced.retain(|(h, _, _)| h != host);
            }
        });
    }

    /// The host (other than `me`) and revision the next request for
    /// `service` goes to: one with a ready replica of `revision` (of any
    /// revision when `None`), not among `tried`, taking the hosts in turn.
    /// `None`: no other host serves it.
    pub(crate) fn choose(&self, service: &ServiceId, revision: Option<u64>, me: &HostId, tried: &[(HostId, u64)]) -> Option<(HostId, u64)> {
        let now = Instant::now();
        self.read(|state| {
            let placement = state.placements.get(service)?;
            let candidates: Vec<&PlacedRevision> = placement
                .placed
                .iter()
                .filter(|p| p.host != *me && revision.is_none_or(|r| p.revision == r))
                .filter(|p| !tried.iter().any(|(host, revision)| *host == p.host && *revision == p.revision))
                .filter(|p| placement.serves(p, now))
                .collect();
            if candidates.is_empty() {
                return None;
            }
            let turn = placement.sent.fetch_add(1, Ordering::Relaxed);
            let chosen = candidates[(turn % candidates.len() as u64) as usize];
            Some((chosen.host.clone(), chosen.revision))
        })
    }

    /// Replicas the control plane wants of the services of namespace `ns`
    /// other than `except`, and the memory they reserve.
    pub(crate) fn namespace_use(&self, ns: &str, except: &ServiceId) -> (u64, u64) {
        self.read(|state| {
            let others = state.wanted.iter().filter(|(id, _)| id.namespace == ns && *id != except);
            others.fold((0, 0), |(replicas, memory), (id, count)| {
                let each = state.services.get(id).map_or(0, |k| k.spec.memory_request().bytes());
                (replicas + count, memory + count.saturating_mul(each))
            })
        })
    }

    /// Local replicas changed: the routes of services known only from
    /// them follow (a cost in local replicas, not in services).
    pub(crate) fn local_replicas_changed(&self, local: BTreeMap<ServiceId, Arc<ServiceSpec>>) {
        self.write(|state| {
            let before = std::mem::replace(&mut state.local, local);
            let changed: Vec<ServiceId> = before
                .iter()
                .filter(|(id, spec)| state.local.get(*id).is_none_or(|now| now.routes != spec.routes))
                .map(|(id, _)| id.clone())
                .chain(state.local.keys().filter(|id| !before.contains_key(*id)).cloned())
                .filter(|id| !state.services.contains_key(id))
                .collect();
            for id in &changed {
                state.route(id);
            }
        });
    }

    /// The service a request for `host` and `path` goes to.
    pub(crate) fn lookup(&self, host: Option<&str>, path: &str) -> Option<ServiceId> {
        self.read(|state| state.routes.lookup(host, path).cloned())
    }

    /// The memory a replica of `service` reserves (its latest spec's
    /// request; 0 for a service unknown here).
    pub(crate) fn memory_request(&self, service: &ServiceId) -> u64 {
        self.read(|state| state.services.get(service).map_or(0, |k| k.spec.memory_request().bytes()))
    }

    /// The latest spec of `service`, if it exists.
    pub(crate) fn spec(&self, service: &ServiceId) -> Option<Arc<ServiceSpec>> {
        self.read(|state| state.services.get(service).map(|k| k.spec.clone()))
    }

    /// Every service with message triggers, with its latest spec.
    pub(crate) fn triggered(&self) -> Vec<(ServiceId, Arc<ServiceSpec>)> {
        self.read(|state| state.services.iter().filter(|(_, known)| !known.spec.triggers.is_empty()).map(|(id, known)| (id.clone(), known.spec.clone())).collect())
    }

    /// Whether `service` exists.
    pub(crate) fn exists(&self, service: &ServiceId) -> bool {
        self.read(|state| state.services.contains_key(service))
    }

    /// The revision the next request for `service` goes to, when its
    /// traffic is split; `None`: any ready replica of any revision.
    ///
    /// The n-th request is mapped to slot `n * 61 mod 100` (61 is coprime
    /// with 100, so every 100 consecutive requests cover the 100 slots
    /// once), and slots are dealt to revisions by their percents: each
    /// revision gets its exact share of every 100 requests at this host.
    pub(crate) fn pick(&self, service: &ServiceId) -> Option<u64> {
        self.read(|state| {
            let split = state.splits.get(service)?;
            if split.weights.len() < 2 {
                return split.weights.first().map(|w| w.revision);
            }
            let n = split.counter.fetch_add(1, Ordering::Relaxed);
            let slot = (n.wrapping_mul(61) % 100) as u32;
            let mut upto = 0;
            for weight in &split.weights {
                upto += weight.percent;
                if slot < upto {
                    return Some(weight.revision);
                }
            }
            split.weights.last().map(|w| w.revision)
        })
    }

    /// The revision a replica started for activation should run: the one
    /// taking most of the traffic, else the latest.
    pub(crate) fn serving_revision(&self, service: &ServiceId) -> Option<u64> {
        self.read(|state| {
            let heaviest = state.splits.get(service).and_then(|s| s.weights.iter().max_by_key(|w| w.percent).map(|w| w.revision));
            heaviest.or_else(|| state.services.get(service).map(|k| k.revision))
        })
    }

    /// The spec of revision `number` of `service`: the latest spec, a
    /// cached revision, or one read from the revisions bucket.
    pub(crate) async fn revision(&self, service: &ServiceId, number: u64) -> Result<Arc<ServiceSpec>, String> {
        let latest = self.read(|state| state.services.get(service).filter(|k| k.revision == number).map(|k| k.spec.clone()));
        if let Some(spec) = latest {
            return Ok(spec);
        }
        let key = (service.clone(), number);
        if let Some(spec) = self.revisions.lock().ok().and_then(|cache| cache.get(&key).cloned()) {
            return Ok(spec);
        }
        let entry = self
            .revisions_kv
            .get(&revision_key(service, number))
            .await
            .map_err(|e| format!("cannot read revision {number} of {service}: {e}"))?
            .ok_or_else(|| format!("revision {number} of {service} is not in the store"))?;
        let revision: Revision = serde_json::from_slice(&entry.value).map_err(|e| format!("revision {number} of {service} is unreadable: {e}"))?;
        let spec = Arc::new(revision.spec);
        if let Ok(mut cache) = self.revisions.lock() {
            cache.insert(key, spec.clone());
        }
        Ok(spec)
    }

    /// Forgets cached revisions not in use by `keep`.
    pub(crate) fn forget_revisions(&self, keep: impl Fn(&ServiceId, u64) -> bool) {
        if let Ok(mut cache) = self.revisions.lock() {
            cache.retain(|(id, number), _| keep(id, *number));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wharf_proto::names::REVISIONS_BUCKET;

    fn host(id: &str) -> HostId {
        HostId::new(id).expect("valid host id")
    }

    fn placed(id: &str, revision: u64, ready: bool) -> PlacedRevision {
        PlacedRevision { host: host(id), revision, ready }
    }

    async fn directory_with(service: &ServiceId, placed: Vec<PlacedRevision>) -> Directory {
        let bus = wharf_bus::Bus::local(wharf_bus::LocalStore::in_memory().expect("store"));
        let directory = Directory::new(bus.kv(REVISIONS_BUCKET).await.expect("bucket"));
        let status = ServiceStatus { placed, ..ServiceStatus::new(service.clone()) };
        directory.status_changed(Some(&serde_json::to_vec(&status).expect("json")));
        directory
    }

    /// What `choose` picks `n` times in a row, by host.
    fn picks(directory: &Directory, service: &ServiceId, revision: Option<u64>, tried: &[(HostId, u64)], n: usize) -> BTreeMap<String, usize> {
        let mut picks = BTreeMap::new();
        for _ in 0..n {
            if let Some((host, _)) = directory.choose(service, revision, &host("me"), tried) {
                *picks.entry(host.to_string()).or_default() += 1;
            }
        }
        picks
    }

    #[tokio::test]
    async fn requests_go_in_turn_to_other_hosts_the_status_says_have_a_ready_replica() {
        let web = ServiceId::new("shop", "web").expect("valid");
        let status = vec![placed("b", 1, true), placed("c", 1, true), placed("d", 2, false), placed("me", 1, true)];
        let directory = directory_with(&web, status).await;
        let expected: BTreeMap<String, usize> = [("b".to_string(), 3), ("c".to_string(), 3)].into();
        assert_eq!(picks(&directory, &web, None, &[], 6), expected, "in turn, never this host nor one not ready");
        assert_eq!(picks(&directory, &web, Some(1), &[], 6), expected);
        assert_eq!(directory.choose(&web, Some(2), &host("me"), &[]), None, "nobody serves revision 2");
        assert_eq!(directory.choose(&web, None, &host("me"), &[(host("b"), 1), (host("c"), 1)]), None, "both tried");
        assert_eq!(directory.choose(&web, None, &host("me"), &[(host("b"), 1)]), Some((host("c"), 1)));
        let other = ServiceId::new("shop", "other").expect("valid");
        assert_eq!(directory.choose(&other, None, &host("me"), &[]), None, "an unknown service");

        // A lost host gets nothing more.
        directory.host_lost(&host("b"));
        assert_eq!(picks(&directory, &web, None, &[], 4), [("c".to_string(), 4)].into());
    }

    #[tokio::test]
    async fn an_announcement_is_believed_only_where_the_status_places_the_revision() {
        let web = ServiceId::new("shop", "web").expect("valid");
        let directory = directory_with(&web, vec![placed("b", 1, true), placed("d", 2, false)]).await;
        // d was placed revision 2 and says it is ready: requests go there before the status says so.
        directory.replica_announced(ReplicaReady { host: host("d"), service: web.clone(), revision: 2 });
        assert_eq!(directory.choose(&web, Some(2), &host("me"), &[]), Some((host("d"), 2)));
        // A host announcing what it was not placed (another revision, another
        // service, or nothing at all) draws no requests.
        for (announcer, service, revision) in [("d", &web, 1), ("e", &web, 1), ("e", &web, 2)] {
            directory.replica_announced(ReplicaReady { host: host(announcer), service: service.clone(), revision });
        }
        let expected: BTreeMap<String, usize> = [("b".to_string(), 4)].into();
        assert_eq!(picks(&directory, &web, Some(1), &[], 4), expected, "only b serves revision 1");
        assert_eq!(picks(&directory, &web, Some(2), &[], 2), [("d".to_string(), 2)].into());
        // Announced before the status placed it: believed once the status does.
        let late = ServiceId::new("shop", "late").expect("valid");
        directory.replica_announced(ReplicaReady { host: host("f"), service: late.clone(), revision: 1 });
        assert_eq!(directory.choose(&late, None, &host("me"), &[]), None);
        let status = ServiceStatus { placed: vec![placed("f", 1, false)], ..ServiceStatus::new(late.clone()) };
        directory.status_changed(Some(&serde_json::to_vec(&status).expect("json")));
        assert_eq!(directory.choose(&late, None, &host("me"), &[]), Some((host("f"), 1)));
        // Lost, its announcement is forgotten too.
        directory.host_lost(&host("f"));
        directory.status_changed(Some(&serde_json::to_vec(&status).expect("json")));
        assert_eq!(directory.choose(&late, None, &host("me"), &[]), None);
    }
}
