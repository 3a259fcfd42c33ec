//! Wharf's control plane: the REST API, the desired-state store and the
//! controller that turns desired state into host assignments.
//!
//! Decisions (placement, reconciliation) are made by the pure
//! `wharf-scheduler-core`; this crate does the I/O around it. Everything
//! between the control plane and hosts is a `proto` message over the bus.

pub mod api;
mod artifacts_api;
pub mod auth;
pub mod autoscale;
mod claims;
mod consumers;
pub mod controller;
pub mod dashboard;
pub mod events;
pub mod events_api;
pub mod hosts;
pub mod informer;
mod intake;
pub mod jobs;
mod jobs_api;
pub mod leader;
pub mod logs_api;
pub mod rollout_api;
pub mod status;
pub mod store;
pub mod tokens_api;
mod triggers;

use hosts::HostTable;
use informer::Informer;
use leader::{LeaseConfig, Leadership};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use store::{Store, StoreError};
use tokio::sync::watch;
use wharf_bus::Bus;

/// Checks a component before it is accepted, so a bad one is refused at
/// upload time rather than failing on a host later. The CLI wires in the host
/// runtime's own loader, so "accepted" means "a host will run it".
pub trait ComponentCheck: Send + Sync + 'static {
    /// `Err` with a message naming the problem.
    fn check(&self, bytes: &[u8]) -> Result<(), String>;
    /// The names of the component's top-level exports (a service with
    /// triggers needs the message handler), or why they cannot be read.
    fn exports(&self, bytes: &[u8]) -> Result<Vec<String>, String>;
}

/// Control-plane settings.
#[derive(Debug, Clone)]
pub struct ControlPlaneConfig {
    /// A host silent for longer than this is down.
    pub host_timeout: Duration,
    /// Where the admin token lives (created on first start). `None` turns
    /// authentication off: only for in-process tests of the API.
    pub admin_token_file: Option<std::path::PathBuf>,
    /// This scheduler's name in the leader lease (unique per process).
    pub name: String,
    /// Leader lease timings.
    pub lease: LeaseConfig,
    /// Revisions kept per service.
    pub revision_history: usize,
    /// How failed replicas are retried and moved.
    pub retry: wharf_scheduler_core::RetryPolicy,
    /// Non-public address ranges services may name in `allow_outbound`
    /// (hosts enforce their own `--allow-private-egress` on every connection).
    pub private_egress: wharf_proto::egress::PrivateEgress,
    /// Seals secret values at rest (and, at start, those written before
    /// sealing existed); `None` stores them as given (in-process tests).
    pub secret_key: Option<wharf_proto::sealed::SecretKey>,
}

impl Default for ControlPlaneConfig {
    fn default() -> Self {
        ControlPlaneConfig {
            host_timeout: Duration::from_secs(2),
            admin_token_file: None,
            name: default_name(),
            lease: LeaseConfig::default(),
            revision_history: store::DEFAULT_REVISION_HISTORY,
            retry: wharf_scheduler_core::RetryPolicy::default(),
            private_egress: Default::default(),
            secret_key: None,
        }
    }
}

/// A scheduler's default name: the machine's host name, the process id and
/// a random suffix, so two processes never share one.
pub fn default_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default();
    let host = if host.is_empty() { "scheduler".to_string() } else { host };
    format!("{host}-{}-{:04x}", std::process::id(), rand::random::<u16>())
}

/// Why the control plane could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot follow host heartbeats: {0}")]
    Heartbeats(#[from] wharf_bus::SubscribeError),
    #[error("cannot set up API tokens: {0:#}")]
    Tokens(anyhow::Error),
    /// The secrets in the store were sealed with another key than this
    /// control plane's.
    #[error("the secrets in the store were sealed with key {sealed_with}, but this control plane's key is {have}: start it with the key file they were sealed with (--secret-key-file, or <data-dir>/secret.key)")]
    WrongSecretKey { sealed_with: String, have: String },
    /// The events bucket could not be opened or created.
    #[error("cannot open the events bucket: {0}")]
    Events(wharf_bus::KvError),
    /// Hosts' consumer or data asks cannot be served (see `consumers.rs`).
    #[error("cannot serve hosts' consumer and data asks: {0}")]
    ConsumerBroker(wharf_bus::SubscribeError),
}

/// A running control plane; cheap to clone. Every one serves the API; the
/// one holding the leader lease also runs the controller. Everything stops
/// when [`ControlPlane::shutdown`] is called.
#[derive(Clone)]
pub struct ControlPlane {
    pub(crate) store: Store,
    pub(crate) informer: Informer,
    pub(crate) hosts: HostTable,
    pub(crate) check: Arc<dyn ComponentCheck>,
    pub(crate) autoscaling: autoscale::Autoscaling,
    /// What the control loop's passes cost (while this process leads).
    pub(crate) pass_stats: controller::PassStats,
    pub(crate) bus: Bus,
    pub(crate) tokens: Option<auth::Tokens>,
    /// The events bucket (`wharf-events`), read by the API; the leader writes it through `controller::Context::events`.
    pub(crate) events: wharf_bus::Kv,
    /// Jobs and their runs (`jobs.rs`); the leader runs their loop.
    pub(crate) jobs: jobs::Jobs,
    pub(crate) leadership: watch::Receiver<Leadership>,
    /// Until when this scheduler's lease holds by its own clock.
    lease_clock: leader::LeaseClock,
    pub(crate) config: ControlPlaneConfig,
    stop: Arc<watch::Sender<bool>>,
}

impl ControlPlane {
    /// Opens the store, follows its state and the heartbeats, and campaigns
    /// for leadership; while it leads, it runs the controller.
    pub async fn start(bus: &Bus, check: Arc<dyn ComponentCheck>, config: ControlPlaneConfig) -> Result<ControlPlane, StartError> {
        let store = Store::open(bus).await?.with_history(config.revision_history);
        let informer = Informer::start(store.clone()).await?;
        let jobs = jobs::Jobs::start(bus).await?;
        let hosts = HostTable::follow(bus, config.host_timeout).await?;
        let tokens = match &config.admin_token_file {
            Some(file) => {
                let tokens = auth::Tokens::open(bus).await.map_err(|e| StartError::Tokens(e.into()))?;
                tokens.ensure_admin(file).await.map_err(StartError::Tokens)?;
                tracing::info!("admin token in {}", file.display());
                Some(tokens)
            }
            None => None,
        };
        if let Some(key) = &config.secret_key {
            seal_plain_secrets(store.secrets_kv(), key).await?;
        }
        consumers::serve(bus, informer.clone(), hosts.clone(), jobs.clone()).await.map_err(StartError::ConsumerBroker)?;
        let events = bus.kv(wharf_proto::names::EVENTS_BUCKET).await.map_err(StartError::Events)?;
        let (stop, stopped) = watch::channel(false);
        let (leadership, lease_clock) = leader::campaign(store.leader_kv().clone(), config.name.clone(), config.lease, stopped.clone());
        let autoscaling = autoscale::Autoscaling::default();
        let pass_stats = controller::PassStats::default();
        let context = controller::Context {
            bus: bus.clone(),
            store: store.clone(),
            informer: informer.clone(),
            hosts: hosts.clone(),
            autoscaling: autoscaling.clone(),
            retry: config.retry,
            events: events::Recorder::start(events.clone()),
            secret_key: config.secret_key.clone(),
            seal_salt: config.secret_key.clone().unwrap_or_else(|| wharf_proto::sealed::SecretKey::from_bytes(rand::random())),
            pass_stats: pass_stats.clone(),
            own_writes: controller::OwnWrites::default(),
        };
        intake::start(bus.clone(), informer.clone(), hosts.clone(), stopped.clone());
        tokio::spawn(lead(context, jobs.clone(), leadership.clone(), stopped));
        Ok(ControlPlane {
            store,
            informer,
            hosts,
            check,
            autoscaling,
            pass_stats,
            bus: bus.clone(),
            tokens,
            events,
            jobs,
            leadership,
            lease_clock,
            config,
            stop: Arc::new(stop),
        })
    }

    /// Whether this scheduler leads now.
    pub fn leadership(&self) -> Leadership {
        self.lease_clock.check(self.leadership.borrow().clone())
    }

    /// Follows this scheduler's leadership.
    pub fn leadership_changes(&self) -> watch::Receiver<Leadership> {
        self.leadership.clone()
    }

    /// The state the control plane keeps in memory.
    pub fn informer(&self) -> &Informer {
        &self.informer
    }

    /// The desired-state store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The jobs and their runs.
    pub fn jobs(&self) -> &jobs::Jobs {
        &self.jobs
    }

    /// The hosts known from heartbeats.
    pub fn hosts(&self) -> &HostTable {
        &self.hosts
    }

    /// Stops the controller and gives up the lease.
    pub fn shutdown(&self) {
        let _ = self.stop.send(true);
    }

    /// Serves the REST API on `listener` (HTTPS when `tls` is given) until
    /// `shutdown` resolves, on the same bounded edge server as a host's
    /// ingress (connection cap, header, idle and body clocks, TLS handshake
    /// in each connection's own task).
    pub async fn serve(
        &self,
        listener: tokio::net::TcpListener,
        tls: Option<tokio_rustls::TlsAcceptor>,
        config: wharf_edge::ServerConfig,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let service = hyper_util::service::TowerToHyperService::new(api::router(self.clone()));
        wharf_edge::serve(listener, tls, config, service, shutdown).await
    }
}

/// Refuses a key other than the one the stored secrets were sealed with,
/// then seals every secret still stored in plain text (written before
/// sealing existed), each by compare-and-set so a write meanwhile is kept.
/// A failure to seal is logged: such secrets stay readable and are sealed
/// when next written.
async fn seal_plain_secrets(kv: &wharf_bus::Kv, key: &wharf_proto::sealed::SecretKey) -> Result<(), StartError> {
    let entries = match kv.entries().await {
        Ok(entries) => entries,
        Err(e) => {
            tracing::warn!("cannot read the secrets to seal those stored in plain text: {e}");
            return Ok(());
        }
    };
    if let Some(sealed_with) = entries.iter().filter_map(|e| wharf_proto::sealed::sealed_with(&e.value)).find(|id| *id != key.id()) {
        return Err(StartError::WrongSecretKey { sealed_with, have: key.id() });
    }
    let mut sealed = 0;
    for entry in entries.into_iter().filter(|e| !wharf_proto::sealed::is_sealed(&e.value)) {
        let value = bytes::Bytes::from(key.seal(&entry.key, &entry.value, rand::random()));
        match kv.update(&entry.key, value, entry.revision).await {
            Ok(_) => sealed += 1,
            Err(e) => tracing::warn!(key = %entry.key, "cannot seal a secret stored in plain text (it is sealed when next written): {e}"),
        }
    }
    if sealed > 0 {
        tracing::info!("sealed {sealed} secret(s) that were stored in plain text (key {})", key.id());
    }
    Ok(())
}

/// The control loop, running as leader, on a thread and runtime of its own.
/// A pass over thousands of services is tens of milliseconds of CPU between
/// two awaits: on the process's shared runtime it would hold a worker, and
/// the tasks queued behind it, that serves the API and, in `wharf up`, the
/// host's requests (a wake's first request waited out a pass). On its own
/// thread, at a lower priority ([`below_serving`]), the OS runs the workers
/// first and the pass on what they leave.
/// Dropping the returned sender (or sending on it) stops the loop at its
/// next await, as aborting a task would.
fn spawn_control_loop(context: controller::Context, epoch: u64, quitting: watch::Receiver<bool>) -> tokio::sync::oneshot::Sender<()> {
    let (abort, aborted) = tokio::sync::oneshot::channel::<()>();
    let until_aborted = async move {
        tokio::select! {
            () = controller::run(context, epoch, quitting) => {}
            _ = aborted => {}
        }
    };
    let on_its_own = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string()).and_then(|runtime| {
        // The future moves to the thread only if the thread starts.
        let (start, started) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("wharf-controller".into())
            .spawn(move || {
                if let Ok(run) = started.recv() {
                    below_serving();
                    runtime.block_on(run);
                }
            })
            .map_err(|e| e.to_string())?;
        Ok(start)
    });
    match on_its_own {
        Ok(start) => {
            if let Err(std::sync::mpsc::SendError(run)) = start.send(until_aborted) {
                tokio::spawn(run);
            }
        }
        Err(e) => {
            tracing::warn!("the control loop runs on the shared runtime (no thread of its own: {e})");
            tokio::spawn(until_aborted);
        }
    }
    abort
}

/// Lowers the calling thread's priority (nice 10): when the cores are
/// busy, requests to the API and, in `wharf up`, the host's requests run
/// before a pass, which still gets about a tenth of a busy core and all of
/// an idle one. The OS may refuse; the loop then runs at the same priority.
fn below_serving() {
    #[cfg(target_os = "linux")]
    if let Err(e) = rustix::process::setpriority_process(Some(rustix::thread::gettid()), 10) {
        tracing::debug!("the control loop's thread keeps its priority: {e}");
    }
}

/// Runs the controller and the job loop whenever this scheduler leads, and
/// stops them when it no longer does.
async fn lead(context: controller::Context, jobs: jobs::Jobs, mut leadership: watch::Receiver<Leadership>, mut stop: watch::Receiver<bool>) {
    loop {
        let epoch = leadership.borrow_and_update().epoch();
        match epoch {
            Some(epoch) => {
                let (quit, quitting) = watch::channel(false);
                // Another leader may have recorded events meanwhile: number on from the bucket.
                context.events.renumber();
                let task = spawn_control_loop(context.clone(), epoch, quitting.clone());
                let job_loop = tokio::spawn(jobs.clone().lead(context.bus.clone(), context.hosts.clone(), context.events.clone(), epoch, quitting));
                // Lead until the epoch changes or the process stops.
                loop {
                    tokio::select! {
                        changed = leadership.changed() => {
                            if changed.is_err() || leadership.borrow().epoch() != Some(epoch) {
                                break;
                            }
                        }
                        _ = stop.changed() => break,
                    }
                }
                let _ = quit.send(true);
                drop(task);
                job_loop.abort();
                if *stop.borrow() {
                    return;
                }
            }
            None => {
                tokio::select! {
                    changed = leadership.changed() => if changed.is_err() { return },
                    _ = stop.changed() => return,
                }
            }
        }
    }
}
