//! The control plane's memory of the cluster's state: services, their
//! statuses, every host's assignment, the volume pins and the namespaces'
//! records (quotas), kept from watches
//! on their buckets. Every scheduler runs one; the API reads it (any
//! scheduler answers), and the leader's controller reads it instead of the
//! store, so a pass costs memory reads, not a scan of the buckets.
//!
//! A record that cannot be read is remembered as a problem under its key
//! and skipped; it never hides the others. Revisions are immutable and
//! fetched once, on demand, then cached.

use crate::store::{Store, StoreError, decode_service};
use futures::StreamExt;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use tokio::sync::watch;
use wharf_bus::{Kv, KvEvent};
use wharf_proto::{Assignment, HostId, Namespace, Revision, ServiceId, ServiceStatus, StoredService};

/// What the informer holds. Values are `Arc`s: a reader clones pointers, not records.
#[derive(Clone, Default)]
pub struct State {
    /// Services by id.
    pub services: BTreeMap<ServiceId, Arc<StoredService>>,
    /// The leader's status of each service.
    pub statuses: BTreeMap<ServiceId, Arc<ServiceStatus>>,
    /// Each host's assignment, with its version (`Assignment::version`).
    pub assignments: BTreeMap<HostId, Arc<Assignment>>,
    /// The host each service with volumes is pinned to.
    pub pins: BTreeMap<ServiceId, HostId>,
    /// Namespaces' records (quotas, callers), where one was set.
    pub namespaces: BTreeMap<String, Arc<Namespace>>,
    /// Records that could not be read, by bucket and key, and why.
    pub problems: BTreeMap<String, String>,
}

/// Which bucket an event came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    Services,
    Statuses,
    Assignments,
    Pins,
    Namespaces,
}

impl Source {
    fn name(self) -> &'static str {
        match self {
            Source::Services => "services",
            Source::Statuses => "status",
            Source::Assignments => "assignments",
            Source::Pins => "volume pins",
            Source::Namespaces => "namespaces",
        }
    }
}

/// The informer; cheap to clone. Its watch tasks end when the last clone is dropped.
#[derive(Clone)]
pub struct Informer {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    /// Written by the watch tasks (one event at a time, never across an
    /// await), read by the API and the controller.
    state: RwLock<State>,
    /// Bumped after every applied event.
    changes: watch::Sender<u64>,
    /// Buckets whose watch has replayed what existed when it started.
    synced: watch::Sender<usize>,
    /// Revisions fetched so far; they never change.
    revisions: Mutex<HashMap<(ServiceId, u64), Arc<Revision>>>,
}

const SOURCES: usize = 5;

impl Informer {
    /// Starts watching the store's buckets.
    pub async fn start(store: Store) -> Result<Informer, StoreError> {
        let (changes, _) = watch::channel(0);
        let (synced, _) = watch::channel(0);
        let informer = Informer {
            inner: Arc::new(Inner { store: store.clone(), state: RwLock::new(State::default()), changes, synced, revisions: Mutex::default() }),
        };
        for (source, kv) in [
            (Source::Services, store.services_kv()),
            (Source::Statuses, store.status_kv()),
            (Source::Assignments, store.assignments_kv()),
            (Source::Pins, store.volumes_kv()),
            (Source::Namespaces, store.namespaces_kv()),
        ] {
            informer.follow(source, kv).await?;
        }
        Ok(informer)
    }

    /// Watches one bucket. Its replay is done once an event at or past the
    /// newest revision present at start has been applied.
    async fn follow(&self, source: Source, kv: &Kv) -> Result<(), StoreError> {
        let newest = kv.entries().await?.iter().map(|e| e.revision).max().unwrap_or(0);
        let mut events = kv.watch(">").await?;
        let weak = Arc::downgrade(&self.inner);
        if newest == 0 {
            self.inner.synced.send_modify(|n| *n += 1);
        }
        tokio::spawn(async move {
            let mut replayed = newest == 0;
            while let Some(event) = events.next().await {
                let Some(inner) = weak.upgrade() else { break };
                let revision = event.revision;
                apply(&inner, source, event);
                if !replayed && revision >= newest {
                    replayed = true;
                    inner.synced.send_modify(|n| *n += 1);
                }
                inner.changes.send_modify(|n| *n = n.wrapping_add(1));
            }
        });
        Ok(())
    }

    /// Waits until every watch has replayed the state present at start.
    pub async fn synced(&self) {
        let mut synced = self.inner.synced.subscribe();
        let _ = synced.wait_for(|n| *n >= SOURCES).await;
    }

    /// A receiver that changes after every applied event.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.inner.changes.subscribe()
    }

    /// Reads the state under its lock (briefly: `read` must not block).
    pub fn read<T>(&self, read: impl FnOnce(&State) -> T) -> T {
        match self.inner.state.read() {
            Ok(state) => read(&state),
            Err(poisoned) => read(&poisoned.into_inner()),
        }
    }

    /// One service, if known.
    pub fn service(&self, id: &ServiceId) -> Option<Arc<StoredService>> {
        self.read(|s| s.services.get(id).cloned())
    }

    /// One service's status, if the leader wrote one.
    pub fn status(&self, id: &ServiceId) -> Option<Arc<ServiceStatus>> {
        self.read(|s| s.statuses.get(id).cloned())
    }

    /// Revision `number` of `service`, from the cache or the store.
    pub async fn revision(&self, service: &ServiceId, number: u64) -> Result<Option<Arc<Revision>>, StoreError> {
        let key = (service.clone(), number);
        if let Some(found) = self.inner.revisions.lock().ok().and_then(|cache| cache.get(&key).cloned()) {
            return Ok(Some(found));
        }
        let Some(revision) = self.inner.store.revision(service, number).await? else { return Ok(None) };
        let revision = Arc::new(revision);
        if let Ok(mut cache) = self.inner.revisions.lock() {
            cache.insert(key, revision.clone());
        }
        Ok(Some(revision))
    }

    /// A revision already in the cache (no fetch).
    pub fn cached_revision(&self, service: &ServiceId, number: u64) -> Option<Arc<Revision>> {
        self.inner.revisions.lock().ok().and_then(|cache| cache.get(&(service.clone(), number)).cloned())
    }

    /// Forgets cached revisions of services that no longer exist.
    fn forget_revisions(inner: &Inner, service: &ServiceId) {
        if let Ok(mut cache) = inner.revisions.lock() {
            cache.retain(|(id, _), _| id != service);
        }
    }
}

/// Applies one watch event to the state.
fn apply(inner: &Inner, source: Source, event: KvEvent) {
    let Ok(mut state) = inner.state.write() else { return };
    let problem_key = format!("{}/{}", source.name(), event.key);
    let mut forget = None;
    let outcome: Result<(), String> = match source {
        Source::Services => {
            let id = service_of_key(&event.key);
            match (event.value, id) {
                (None, Some(id)) => {
                    state.services.remove(&id);
                    forget = Some(id);
                    Ok(())
                }
                (Some(value), _) => match decode_service(&event.key, &value, event.revision) {
                    Ok(stored) => {
                        state.services.insert(stored.spec.id(), Arc::new(stored));
                        Ok(())
                    }
                    Err(e) => Err(e.to_string()),
                },
                (None, None) => Ok(()),
            }
        }
        Source::Statuses => match (event.value, service_of_key(&event.key)) {
            (None, Some(id)) => {
                state.statuses.remove(&id);
                Ok(())
            }
            (Some(value), _) => match serde_json::from_slice::<ServiceStatus>(&value) {
                Ok(mut status) => {
                    status.version = event.revision;
                    state.statuses.insert(status.service.clone(), Arc::new(status));
                    Ok(())
                }
                Err(e) => Err(format!("unreadable status: {e}")),
            },
            (None, None) => Ok(()),
        },
        Source::Assignments => match (event.value, HostId::new(event.key.clone())) {
            (None, Ok(host)) => {
                state.assignments.remove(&host);
                Ok(())
            }
            (Some(value), _) => match serde_json::from_slice::<Assignment>(&value) {
                Ok(mut assignment) => {
                    assignment.version = event.revision;
                    state.assignments.insert(assignment.host.clone(), Arc::new(assignment));
                    Ok(())
                }
                Err(e) => Err(format!("unreadable assignment: {e}")),
            },
            (None, Err(_)) => Ok(()),
        },
        Source::Pins => match service_of_key(&event.key) {
            Some(id) => match event.value {
                None => {
                    state.pins.remove(&id);
                    Ok(())
                }
                Some(value) => match HostId::new(String::from_utf8_lossy(&value).to_string()) {
                    Ok(host) => {
                        state.pins.insert(id, host);
                        Ok(())
                    }
                    Err(e) => Err(format!("unreadable volume pin: {e}")),
                },
            },
            None => Err("a volume pin under a key that names no service".to_string()),
        },
        Source::Namespaces => match event.value {
            None => {
                state.namespaces.remove(&event.key);
                Ok(())
            }
            Some(value) => match serde_json::from_slice::<Namespace>(&value) {
                Ok(record) => {
                    state.namespaces.insert(event.key.clone(), Arc::new(record));
                    Ok(())
                }
                Err(e) => {
                    // Unreadable: no quota rather than the last one, as the API reads it.
                    state.namespaces.remove(&event.key);
                    Err(format!("unreadable namespace record: {e}"))
                }
            },
        },
    };
    match outcome {
        Ok(()) => {
            state.problems.remove(&problem_key);
        }
        Err(problem) => {
            tracing::error!(key = %problem_key, "ignoring an unreadable record: {problem}");
            state.problems.insert(problem_key, problem);
        }
    }
    drop(state);
    if let Some(id) = forget {
        Informer::forget_revisions(inner, &id);
    }
}

/// The service a `<ns>.<name>` key names.
pub(crate) fn service_of_key(key: &str) -> Option<ServiceId> {
    let (ns, name) = key.split_once('.')?;
    ServiceId::new(ns, name).ok()
}

/// Problems per service, from [`State::problems`] (keys `services/<ns>.<name>`).
pub fn problems_of(state: &State) -> BTreeMap<ServiceId, String> {
    state
        .problems
        .iter()
        .filter_map(|(key, problem)| {
            let (_, record) = key.split_once('/')?;
            Some((service_of_key(record)?, problem.clone()))
        })
        .collect()
}
