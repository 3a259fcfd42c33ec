//! Wharf's control plane: the REST API, the desired-state store and the
//! controller that turns desired state into host assignments.
//!
//! Decisions (placement, reconciliation) are made by the pure
//! `wharf-scheduler-core`; this crate does the I/O around it. Everything
//! between the control plane and hosts is a `proto` message over the bus.

pub mod api;
pub mod auth;
pub mod autoscale;
pub mod controller;
pub mod hosts;
pub mod status;
pub mod store;

use controller::UnplaceableMap;
use hosts::HostTable;
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
}

/// Control-plane settings.
#[derive(Debug, Clone)]
pub struct ControlPlaneConfig {
    /// A host silent for longer than this is down.
    pub host_timeout: Duration,
    /// Where the admin token lives (created on first start). `None` turns
    /// authentication off: only for in-process tests of the API.
    pub admin_token_file: Option<std::path::PathBuf>,
    /// Non-public address ranges services may name in `allow_outbound`
    /// (hosts enforce their own `--allow-private-egress` on every connection).
    pub private_egress: wharf_proto::egress::PrivateEgress,
}

impl Default for ControlPlaneConfig {
    fn default() -> Self {
        ControlPlaneConfig { host_timeout: Duration::from_secs(2), admin_token_file: None, private_egress: Default::default() }
    }
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
}

/// A running control plane; cheap to clone. The controller stops when
/// [`ControlPlane::shutdown`] is called.
#[derive(Clone)]
pub struct ControlPlane {
    pub(crate) store: Store,
    pub(crate) hosts: HostTable,
    pub(crate) unplaceable: UnplaceableMap,
    pub(crate) check: Arc<dyn ComponentCheck>,
    pub(crate) autoscaling: autoscale::Autoscaling,
    pub(crate) bus: Bus,
    pub(crate) tokens: Option<auth::Tokens>,
    pub(crate) private_egress: wharf_proto::egress::PrivateEgress,
    stop: Arc<watch::Sender<bool>>,
}

impl ControlPlane {
    /// Opens the store, follows heartbeats and starts the controller.
    pub async fn start(bus: &Bus, check: Arc<dyn ComponentCheck>, config: ControlPlaneConfig) -> Result<ControlPlane, StartError> {
        let store = Store::open(bus).await?;
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
        let (stop, stopped) = watch::channel(false);
        let plane = ControlPlane {
            store,
            hosts,
            unplaceable: Arc::default(),
            check,
            autoscaling: Default::default(),
            bus: bus.clone(),
            tokens,
            private_egress: config.private_egress.clone(),
            stop: Arc::new(stop),
        };
        tokio::spawn(controller::run(
            bus.clone(),
            plane.store.clone(),
            plane.hosts.clone(),
            plane.unplaceable.clone(),
            plane.autoscaling.clone(),
            stopped,
        ));
        Ok(plane)
    }

    /// The desired-state store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The hosts known from heartbeats.
    pub fn hosts(&self) -> &HostTable {
        &self.hosts
    }

    /// Stops the controller.
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
