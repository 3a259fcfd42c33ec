//! `wharf scheduler` and `wharf host`: the parts of a cluster as separate
//! processes on many machines, over a real NATS server (or NATS cluster).

use crate::wiring::{self, RuntimeCheck};
use anyhow::Context;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use wharf_bus::{BucketOptions, Bus, ClientCertificate, ConnectError, NatsAuth, NatsOptions, NatsTls, StorageLimits, TlsFailure, TlsFile};
use wharf_proto::ByteSize;
use wharf_host::agent::{AgentConfig, HostAgent};
use wharf_host::metrics::HostMetrics;
use wharf_scheduler::{ControlPlane, ControlPlaneConfig};

/// How to reach NATS, and how the buckets Wharf keeps there are laid out; shared by every command that runs over it.
#[derive(clap::Args, Debug, Clone)]
pub struct NatsArgs {
    /// The NATS server, or the members of a NATS cluster separated by commas
    /// (nats://10.0.0.1:4222,nats://10.0.0.2:4222); 2.10 or newer with JetStream.
    #[arg(long, env = "WHARF_NATS")]
    pub nats: String,
    /// A NATS .creds file (user JWT + NKey seed).
    #[arg(long, env = "WHARF_NATS_CREDS", conflicts_with = "nats_user")]
    pub nats_creds: Option<PathBuf>,
    /// A NATS user (see deploy/nats/ for the roles: scheduler, host).
    #[arg(long, env = "WHARF_NATS_USER")]
    pub nats_user: Option<String>,
    /// The NATS user's password.
    #[arg(long, env = "WHARF_NATS_PASSWORD", hide_env_values = true, requires = "nats_user")]
    pub nats_password: Option<String>,
    /// A user of the NATS system account, for a second connection that hears at once when
    /// another process's connection closes (deploy/nats/ names one: system); without it only
    /// missed heartbeats tell.
    #[arg(long, env = "WHARF_NATS_SYSTEM_USER", conflicts_with = "nats_system_creds")]
    pub nats_system_user: Option<String>,
    /// The NATS system user's password.
    #[arg(long, env = "WHARF_NATS_SYSTEM_PASSWORD", hide_env_values = true, requires = "nats_system_user")]
    pub nats_system_password: Option<String>,
    /// A .creds file of a NATS system account user, instead of --nats-system-user.
    #[arg(long, env = "WHARF_NATS_SYSTEM_CREDS")]
    pub nats_system_creds: Option<PathBuf>,
    #[command(flatten)]
    pub tls: NatsTlsArgs,
    /// Copies of each bucket Wharf creates, on different NATS servers, 1 to 5 (default: one per
    /// server of the cluster, up to 3). The scheduler also changes namespaces' data buckets to it.
    #[arg(long, env = "WHARF_KV_REPLICAS", value_parser = clap::value_parser!(u8).range(1..=5))]
    pub kv_replicas: Option<u8>,
    /// Size limit of each bucket of the control plane's state (services, assignments, ...); 0 for none.
    #[arg(long, env = "WHARF_KV_MAX_BYTES", default_value_t = ByteSize(StorageLimits::DEFAULT_STATE_BYTES))]
    pub kv_max_bytes: ByteSize,
    /// Size limit of each namespace's data bucket (wharf-kv-<namespace>), so that no tenant can
    /// fill the storage the control plane needs; 0 for none.
    #[arg(long, env = "WHARF_DATA_KV_MAX_BYTES", default_value_t = ByteSize(StorageLimits::DEFAULT_DATA_BYTES))]
    pub data_kv_max_bytes: ByteSize,
    /// Size limit of the component store; 0 for none.
    #[arg(long, env = "WHARF_OBJECTS_MAX_BYTES", default_value_t = ByteSize(StorageLimits::DEFAULT_OBJECT_BYTES))]
    pub objects_max_bytes: ByteSize,
}

impl NatsArgs {
    /// The server (or cluster) at `urls`, with every other setting at its default.
    pub fn at(urls: &str) -> NatsArgs {
        NatsArgs {
            nats: urls.to_owned(),
            nats_creds: None,
            nats_user: None,
            nats_password: None,
            nats_system_user: None,
            nats_system_password: None,
            nats_system_creds: None,
            tls: NatsTlsArgs::default(),
            kv_replicas: None,
            kv_max_bytes: ByteSize(StorageLimits::DEFAULT_STATE_BYTES),
            data_kv_max_bytes: ByteSize(StorageLimits::DEFAULT_DATA_BYTES),
            objects_max_bytes: ByteSize(StorageLimits::DEFAULT_OBJECT_BYTES),
        }
    }

    pub async fn connect(&self, name: &str) -> anyhow::Result<Bus> {
        self.connect_with(name, |_| {}).await
    }

    /// Like [`NatsArgs::connect`], with `adjust` applied to the options
    /// first (a host's own identity and inboxes).
    pub async fn connect_with(&self, name: &str, adjust: impl FnOnce(&mut NatsOptions)) -> anyhow::Result<Bus> {
        let system_auth = match (&self.nats_system_creds, &self.nats_system_user) {
            (None, None) => None,
            (creds, user) => Some(auth(creds, user, &self.nats_system_password)),
        };
        let mut options = NatsOptions {
            name: name.to_string(),
            auth: auth(&self.nats_creds, &self.nats_user, &self.nats_password),
            replicas: self.kv_replicas.map(usize::from),
            system_auth,
            tls: self.tls.options(),
            ..NatsOptions::default()
        };
        adjust(&mut options);
        let bus = Bus::connect_nats(&self.nats, options).await.map_err(NatsTlsArgs::explain)?.with_storage_limits(self.storage_limits());
        tracing::info!(url = %self.nats, "connected to NATS");
        Ok(bus)
    }

    fn storage_limits(&self) -> StorageLimits {
        let limit = |size: ByteSize| BucketOptions { max_bytes: Some(size.bytes()).filter(|bytes| *bytes > 0) };
        StorageLimits { state: limit(self.kv_max_bytes), data: limit(self.data_kv_max_bytes), objects: limit(self.objects_max_bytes) }
    }
}

/// TLS to NATS; shared by every command that connects to it. Any of these
/// makes TLS required on every connection (the system-account one too), as
/// does a tls:// URL: a server that does not speak TLS is refused.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct NatsTlsArgs {
    /// Require TLS to NATS, trusting the system's root CAs (implied by the other --nats-* TLS
    /// flags and by tls:// URLs).
    #[arg(long, env = "WHARF_NATS_TLS")]
    pub nats_tls: bool,
    /// PEM file of the CA that signs the NATS servers' certificates, trusted instead of the
    /// system's roots (`wharf nats certs` makes one); implies TLS.
    #[arg(long, env = "WHARF_NATS_CA", value_name = "FILE")]
    pub nats_ca: Option<PathBuf>,
    /// PEM file of this process's client certificate, for NATS servers that verify clients
    /// (`tls { verify: true }`, as deploy/nats/ does); with --nats-key.
    #[arg(long, env = "WHARF_NATS_CERT", value_name = "FILE", requires = "nats_key")]
    pub nats_cert: Option<PathBuf>,
    /// PEM file of the client certificate's private key.
    #[arg(long, env = "WHARF_NATS_KEY", value_name = "FILE", requires = "nats_cert")]
    pub nats_key: Option<PathBuf>,
}

impl NatsTlsArgs {
    /// The bus's TLS options; `None` when no flag asks for TLS.
    pub fn options(&self) -> Option<NatsTls> {
        let client = match (&self.nats_cert, &self.nats_key) {
            (Some(cert), Some(key)) => Some(ClientCertificate { cert: cert.clone(), key: key.clone() }),
            _ => None,
        };
        (self.nats_tls || self.nats_ca.is_some() || client.is_some()).then(|| NatsTls { ca: self.nats_ca.clone(), client })
    }

    /// `err` and, for TLS failures, the flag to look at: the bus knows the files, not the flags.
    fn explain(err: ConnectError) -> anyhow::Error {
        let hint = match (&err, tls_failure(&err)) {
            (ConnectError::TlsFile { file: TlsFile::Ca, .. }, _) => "check --nats-ca (WHARF_NATS_CA)",
            (ConnectError::TlsFile { file: TlsFile::ClientCertificate, .. }, _) => "check --nats-cert (WHARF_NATS_CERT)",
            (ConnectError::TlsFile { file: TlsFile::ClientKey, .. }, _) => "check --nats-key (WHARF_NATS_KEY)",
            (_, Some(TlsFailure::NotTls)) => "check that the URL is the TLS server's, port included",
            (_, Some(TlsFailure::ServerCertificate)) => {
                "give the CA that signed the server's certificate with --nats-ca, and dial a name or address the certificate lists"
            }
            (_, Some(TlsFailure::ClientCertificateRequired)) => "give a client certificate signed by the server's CA with --nats-cert and --nats-key",
            (_, Some(TlsFailure::ClientCertificateRefused)) => {
                "the certificate of --nats-cert must be signed by the CA the server's `tls { ca_file }` names, and be valid now"
            }
            (_, Some(TlsFailure::Other)) => "check the --nats-ca, --nats-cert and --nats-key files",
            (_, None) => return err.into(),
        };
        anyhow::anyhow!("{err}; {hint}")
    }
}

/// What failed in the TLS handshake, if that is why connecting failed (on either connection).
fn tls_failure(err: &ConnectError) -> Option<TlsFailure> {
    match err {
        ConnectError::Tls { failure, .. } => Some(*failure),
        ConnectError::SystemAccount { source, .. } => tls_failure(source),
        _ => None,
    }
}

/// Credentials from a .creds file, or a user and password, or none.
fn auth(creds: &Option<PathBuf>, user: &Option<String>, password: &Option<String>) -> NatsAuth {
    match (creds, user) {
        (Some(path), _) => NatsAuth::CredentialsFile(path.clone()),
        (None, Some(user)) => NatsAuth::UserPassword { user: user.clone(), password: password.clone().unwrap_or_default() },
        (None, None) => NatsAuth::None,
    }
}

/// Heartbeat timing shared by hosts and the control plane.
#[derive(clap::Args, Debug, Clone)]
pub struct HeartbeatArgs {
    /// How often hosts send a heartbeat.
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    pub heartbeat: Duration,
    /// Heartbeats a host may miss before the control plane declares it down and places its replicas elsewhere.
    #[arg(long, default_value_t = 3)]
    pub missed_heartbeats: u32,
}

impl HeartbeatArgs {
    pub fn host_timeout(&self) -> Duration {
        self.heartbeat * self.missed_heartbeats.max(1)
    }
}

#[derive(clap::Args)]
#[command(after_help = "Examples:\n  wharf scheduler --nats nats://10.0.0.1:4222 --api 0.0.0.0:7700\n  wharf scheduler --nats nats://10.0.0.1:4222 --api 0.0.0.0:7700 --api-tls-cert api.pem --api-tls-key api.key")]
pub struct SchedulerArgs {
    #[command(flatten)]
    nats: NatsArgs,
    /// Address of the REST API.
    #[arg(long, default_value = "127.0.0.1:7700")]
    api: SocketAddr,
    #[command(flatten)]
    heartbeats: HeartbeatArgs,
    /// Directory for the compile cache used to check uploaded components.
    #[arg(long, env = "WHARF_DATA_DIR")]
    data_dir: Option<PathBuf>,
    #[command(flatten)]
    api_tls: wiring::ApiTlsArgs,
    /// This scheduler's name in the leader lease (default: host name, process id and a random suffix).
    /// Run several schedulers over one NATS: all serve the API, one leads.
    #[arg(long)]
    name: Option<String>,
    /// How long the leader's lease lasts without renewal: a dead leader is
    /// replaced about this long after its last renewal.
    #[arg(long, default_value = "1500ms", value_parser = humantime::parse_duration)]
    lease_ttl: Duration,
    /// Revisions kept per service.
    #[arg(long, default_value_t = wharf_scheduler::store::DEFAULT_REVISION_HISTORY)]
    revision_history: usize,
    #[command(flatten)]
    edge: wiring::EdgeArgs,
    /// Non-public address ranges services may name in allow_outbound (CIDR,...); give hosts the same with their --allow-private-egress.
    #[arg(long, value_name = "CIDR,...", default_value = "", value_parser = |s: &str| wharf_proto::egress::PrivateEgress::parse(s).map_err(|e| e.to_string()))]
    allow_private_egress: wharf_proto::egress::PrivateEgress,
    #[command(flatten)]
    secret_key: crate::at_rest::SecretKeyArgs,
}

#[derive(clap::Args)]
#[command(after_help = "Examples:\n  wharf host --nats nats://10.0.0.1:4222 --name edge-1 --labels zone=a,disk=ssd --memory 2GiB --listen 0.0.0.0:8080\n  wharf host --nats nats://10.0.0.1:4222 --listen 0.0.0.0:443 --tls-cert site.pem --tls-key site.key\n  wharf host --nats nats://10.0.0.1:4222 --admin-listen 10.0.0.5:7701   # metrics for a Prometheus on the private network\n\n\
On SIGTERM the host drains: it stops taking new requests, finishes those in flight, tells the control plane, and exits.")]
pub struct HostArgs {
    #[command(flatten)]
    nats: NatsArgs,
    /// This host's name in the cluster (default: the machine's host name); `wharf up` spells it the same.
    #[arg(long, visible_alias = "host-id", env = "WHARF_HOST_ID")]
    name: Option<String>,
    /// This host's own NATS identity: the NKey seed file `wharf nats add-host` wrote for it
    /// (mode 0600). The server then lets it publish only its own heartbeats and subscribe only
    /// to its own subjects and inboxes.
    #[arg(long, env = "WHARF_NATS_NKEY", value_name = "PATH", conflicts_with_all = ["nats_user", "nats_creds"])]
    nats_nkey: Option<PathBuf>,
    /// Labels for placement, as KEY=VALUE (e.g. zone=a); repeat the flag or separate pairs with commas (zone=a,disk=ssd).
    #[arg(long, visible_alias = "label", value_name = "KEY=VALUE", value_delimiter = ',', value_parser = wiring::parse_pair)]
    labels: Vec<(String, String)>,
    /// Memory offered to replicas (each reserves its memory request); default: 80% of the machine's.
    #[arg(long)]
    memory: Option<wharf_proto::ByteSize>,
    /// How far replicas' memory requests may add up past --memory (1.5: half as much again).
    /// Each instance stays capped at its limit; if the host really runs short, an instance
    /// is refused with a clean error (503), never a crash.
    #[arg(long, default_value_t = wharf_proto::Overcommit::NONE)]
    memory_overcommit: wharf_proto::Overcommit,
    /// Instances that may run at once on this host, over all replicas (each replica reserves
    /// its instance request, 1 by default; a request finding every slot busy waits its queue
    /// timeout, then gets 503 host_instances_full). Each slot reserves address space (not
    /// memory) for its largest memory: about 8.6GiB, so past about 14,000 the engine cannot start.
    #[arg(long, default_value_t = wharf_host::runtime::DEFAULT_MAX_INSTANCES)]
    max_instances: u32,
    /// OS priority of the threads that run requests past their first few milliseconds of
    /// CPU (and the excess of a tenant crowding out others): `idle` (Linux SCHED_IDLE: only
    /// CPU nothing else wants) or a nice value 0-19 (keeps a share of a busy host).
    #[arg(long, default_value_t = wharf_host::cpu::BackgroundPriority::Idle)]
    background_priority: wharf_host::cpu::BackgroundPriority,
    /// Compiled code kept in memory for quick starts; past it the least recently used
    /// components are dropped from memory and reloaded from the disk cache when needed.
    #[arg(long, default_value_t = wharf_host::runtime::DEFAULT_CODE_CACHE)]
    code_cache: wharf_proto::ByteSize,
    #[command(flatten)]
    guest: wiring::GuestArgs,
    /// Address of this host's HTTP ingress (every route in the cluster is served here).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Where this host keeps its compile cache, volumes and its own sealing key
    /// (host-seal.key, 0600, made on first start: secrets come sealed to it in the host's
    /// assignment; remove it to have them sealed to a new one) (default: the user data dir).
    #[arg(long, env = "WHARF_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// How often to send a heartbeat.
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    heartbeat: Duration,
    /// How long a request for a service scaled to zero is held before it gets 503.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    activation_timeout: Duration,
    /// How long a draining host waits for requests in flight.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    drain_timeout: Duration,
    /// Requests from other hosts answered at once; past it the host reads
    /// no more from the bus until one finishes.
    #[arg(long, default_value_t = wharf_host::agent::DEFAULT_MAX_BUS_HANDLERS)]
    max_bus_handlers: usize,
    #[command(flatten)]
    tls: wiring::IngressTlsArgs,
    #[command(flatten)]
    admin: wiring::AdminArgs,
    #[command(flatten)]
    edge: wiring::EdgeArgs,
    #[command(flatten)]
    secret_key: crate::at_rest::SecretKeyArgs,
}

fn data_dir(given: Option<PathBuf>, sub: &str) -> anyhow::Result<PathBuf> {
    let dir = match given {
        Some(dir) => dir,
        None => dirs::data_dir().map(|d| d.join("wharf").join(sub)).context("no user data directory; pass --data-dir")?,
    };
    crate::at_rest::private_dir(&dir)?;
    Ok(dir)
}

pub async fn scheduler(args: SchedulerArgs, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
    let tls = args.api_tls.load()?;
    let edge = args.edge.config()?;
    let listener = tokio::net::TcpListener::bind(args.api)
        .await
        .with_context(|| format!("cannot listen on {} (choose another address with --api)", args.api))?;
    let addr = listener.local_addr()?;
    let bus = args.nats.connect("wharf-scheduler").await?;
    let default_dir = args.data_dir.is_none();
    let dir = data_dir(args.data_dir, "scheduler")?;
    let host_sizing = wiring::HostArgs::default_sizing();
    let runtime = host_sizing.runtime(Some(dir.join("compiled")))?;
    let token_file = dir.join("admin-token");
    let secret_key = args.secret_key.load_or_create(&dir)?;
    let mut config = ControlPlaneConfig {
        host_timeout: args.heartbeats.host_timeout(),
        admin_token_file: Some(token_file.clone()),
        revision_history: args.revision_history,
        private_egress: args.allow_private_egress.clone(),
        secret_key: Some(secret_key),
        ..ControlPlaneConfig::default()
    };
    if let Some(name) = args.name {
        config.name = name;
    }
    config.lease = wharf_scheduler::leader::LeaseConfig::with_ttl(args.lease_ttl);
    let name = config.name.clone();
    let plane = ControlPlane::start(&bus, Arc::new(RuntimeCheck(runtime)), config).await?;
    println!("Wharf scheduler: API {}://{addr} over NATS {} (this scheduler: {name})", wiring::scheme(tls.as_ref()), args.nats.nats);
    eprintln!("{}", wiring::admin_token_note(&token_file, default_dir));
    plane.serve(listener, tls, edge, shutdown).await?;
    plane.shutdown();
    Ok(())
}

pub async fn host(args: HostArgs, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let tls = args.tls.load()?;
    let edge = args.edge.config()?;
    let mut sizing = wiring::HostArgs::new(args.name.clone(), args.labels.clone(), args.max_instances, args.memory);
    sizing.background_priority = args.background_priority;
    sizing.code_cache = args.code_cache;
    sizing.guest = args.guest.clone();
    let id = sizing.host_id()?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {} (choose another address with --listen)", args.listen))?;
    let admin_listener = args.admin.bind().await?;
    let addr = listener.local_addr()?;
    let admin_addr = admin_listener.local_addr()?;
    let identity = match &args.nats_nkey {
        Some(path) => {
            let public = crate::nats_identity::check_seed_file(path)?;
            tracing::info!(host = %id, nkey = %public, "connecting to NATS with this host's own identity");
            Some(NatsAuth::NkeySeedFile(path.clone()))
        }
        None => None,
    };
    // Replies and watches come to this host's own inboxes, the only ones
    // its identity may read; the control plane makes its consumers, reads
    // and writes services' data for it, and publishes components' messages
    // (a stream may store them, and acknowledge on any reply subject).
    let inbox_prefix = wharf_proto::names::host_inbox_prefix(&id);
    let consumer_broker = wharf_proto::names::consumer_broker_subject(&id);
    let data_broker = wharf_proto::names::data_broker_subject(&id);
    let bus = args
        .nats
        .connect_with(&wharf_proto::names::host_connection_name(&id), |options| {
            if let Some(auth) = identity {
                options.auth = auth;
            }
            options.inbox_prefix = Some(inbox_prefix);
            options.consumer_broker = Some(consumer_broker);
            options.data_broker = Some(data_broker);
            options.brokered_subjects = vec![format!("{}.", wharf_proto::trigger::MESSAGE_PREFIX)];
        })
        .await?;
    let dir = data_dir(args.data_dir, id.as_str())?;
    // Secrets come sealed to this host's own key in its assignment; given
    // the control plane's key, the host reads the secrets bucket itself.
    let (seal_key, secret_key) = match &args.secret_key.secret_key_file {
        Some(_) => (None, args.secret_key.load_for_host(&dir)?),
        None => (Some(crate::at_rest::host_seal_key(&dir)?), None),
    };
    let runtime = sizing.runtime(Some(dir.join("compiled")))?;
    let metrics = HostMetrics::for_runtime(&runtime);
    let agent = HostAgent::start(
        bus,
        runtime,
        metrics.clone(),
        AgentConfig {
            host: id.clone(),
            labels: args.labels.iter().cloned().collect(),
            capacity: sizing.capacity(),
            memory_overcommit: args.memory_overcommit,
            ingress_addr: Some(addr.to_string()),
            heartbeat_interval: args.heartbeat,
            activation_timeout: args.activation_timeout,
            volumes_dir: Some(dir.join("volumes")),
            max_bus_handlers: args.max_bus_handlers,
            seal_key,
            secret_key,
        },
    )
    .await?;
    println!("Wharf host {id}: ingress {}://{addr} over NATS {}", wiring::scheme(tls.as_ref()), args.nats.nats);
    println!("admin endpoints (metrics): http://{admin_addr}/metrics");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut stop: tokio::sync::watch::Receiver<bool>| async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    let ingress = tokio::spawn(wharf_host::ingress::serve(listener, tls, edge.clone(), Arc::new(agent.clone()), stopped(stop_rx.clone())));
    tokio::spawn(wharf_host::admin::serve(admin_listener, edge, metrics, stopped(stop_rx)));
    shutdown.await;
    eprintln!("draining: no new requests; finishing those in flight (up to {:?})", args.drain_timeout);
    let _ = stop_tx.send(true);
    agent.drain(args.drain_timeout).await;
    let _ = tokio::time::timeout(args.drain_timeout, ingress).await;
    agent.shutdown();
    eprintln!("host {id} stopped");
    Ok(())
}
