//! `wharf up`: the whole cluster in one process on this machine: control
//! plane, one host and its ingress, over the in-process bus, with state in an
//! embedded store in the data directory.

use crate::wiring::{self, RuntimeCheck};
use anyhow::{Context, bail};
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use wharf_bus::{Bus, LocalStore};
use wharf_host::agent::{AgentConfig, HostAgent};
use wharf_host::metrics::HostMetrics;
use wharf_proto::{Route, ServiceId, ServiceSpec};
use wharf_scheduler::{ControlPlane, ControlPlaneConfig};

/// The samples `--samples` deploys (every sample that is an HTTP service).
const SAMPLES: &[&str] = &["hello", "echo", "spin", "hog", "panic", "sleep", "backend", "frontend"];

#[derive(clap::Args)]
#[command(after_help = "Examples:\n  wharf up --samples            # then: curl http://127.0.0.1:8080/hello\n  wharf up --data-dir /var/lib/wharf --listen 0.0.0.0:80\n  wharf up --tls-cert site.pem --tls-key site.key --api-tls-cert api.pem --api-tls-key api.key\n  wharf up --admin-listen 127.0.0.1:9100 --max-connections 20000 --header-timeout 5s\n\n\
State (services, components, compiled code) lives in the data directory and survives restarts, including kill -9.")]
pub struct Args {
    /// Where state lives (default: the user data dir, e.g. ~/.local/share/wharf).
    #[arg(long, env = "WHARF_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Address of the REST API the other commands talk to.
    #[arg(long, default_value = "127.0.0.1:7700")]
    api: SocketAddr,
    /// Address of the HTTP ingress that serves the services' routes.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Deploy the sample services, each at the route /<name>.
    #[arg(long)]
    samples: bool,
    /// Where the built samples are (default: sample-services/target/wasm32-wasip2/release under the current directory).
    #[arg(long, env = "WHARF_SAMPLES_DIR")]
    samples_dir: Option<PathBuf>,
    /// Run over this NATS server (JetStream) instead of the in-process bus and embedded store.
    #[arg(long, env = "WHARF_NATS")]
    nats: Option<String>,
    /// TLS to NATS (with --nats).
    #[command(flatten)]
    nats_tls: crate::cluster::NatsTlsArgs,
    /// How long a request for a service scaled to zero is held before it gets 503.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    activation_timeout: Duration,
    #[command(flatten)]
    host: wiring::HostArgs,
    #[command(flatten)]
    api_tls: wiring::ApiTlsArgs,
    #[command(flatten)]
    tls: wiring::IngressTlsArgs,
    #[command(flatten)]
    admin: wiring::AdminArgs,
    #[command(flatten)]
    edge: wiring::EdgeArgs,
    #[command(flatten)]
    secret_key: crate::at_rest::SecretKeyArgs,
}

pub async fn run(args: Args, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    // Certificates first: a bad file stops us before anything is created or served.
    let api_tls = args.api_tls.load()?;
    let ingress_tls = args.tls.load()?;
    let (api_scheme, ingress_scheme) = (wiring::scheme(api_tls.as_ref()), wiring::scheme(ingress_tls.as_ref()));
    let edge = args.edge.config()?;
    let host_id = args.host.host_id()?;
    let data_dir = match args.data_dir.clone() {
        Some(dir) => dir,
        None => dirs::data_dir().map(|d| d.join("wharf")).context("no user data directory; pass --data-dir")?,
    };
    crate::at_rest::private_dir(&data_dir)?;
    let secret_key = args.secret_key.load_or_create(&data_dir)?;
    let samples = if args.samples { Some(find_samples(args.samples_dir.as_deref())?) } else { None };
    // Bind first: a port in use is the most common failure, and says so at once.
    let api_listener = bind(args.api, "--api").await?;
    let ingress_listener = bind(args.listen, "--listen").await?;
    let admin_listener = args.admin.bind().await?;
    let ingress_addr = ingress_listener.local_addr()?;
    let api_addr = api_listener.local_addr()?;
    let admin_addr = admin_listener.local_addr()?;

    let bus = match &args.nats {
        Some(url) => crate::cluster::NatsArgs { tls: args.nats_tls.clone(), ..crate::cluster::NatsArgs::at(url) }.connect("wharf-up").await?,
        None => {
            let store = LocalStore::open(data_dir.join("state.redb"))?;
            // redb creates the file with the process's umask: only we may
            // read it (one found looser was tightened, with a warning, above).
            crate::at_rest::make_private(&data_dir.join("state.redb"))?;
            Bus::local(store)
        }
    };
    let runtime = args.host.runtime(Some(data_dir.join("compiled")))?;
    let metrics = HostMetrics::for_runtime(&runtime);
    let token_file = data_dir.join("admin-token");
    let config = ControlPlaneConfig {
        admin_token_file: Some(token_file.clone()),
        private_egress: args.host.guest.allow_private_egress.clone(),
        secret_key: Some(secret_key.clone()),
        ..ControlPlaneConfig::default()
    };
    let plane = ControlPlane::start(&bus, Arc::new(RuntimeCheck(runtime.clone())), config).await?;
    let agent = HostAgent::start(
        bus.clone(),
        runtime.clone(),
        metrics.clone(),
        AgentConfig {
            host: host_id,
            labels: args.host.labels.iter().cloned().collect(),
            capacity: args.host.capacity(),
            memory_overcommit: args.host.memory_overcommit,
            ingress_addr: Some(ingress_addr.to_string()),
            heartbeat_interval: Duration::from_millis(500),
            activation_timeout: args.activation_timeout,
            volumes_dir: Some(data_dir.join("volumes")),
            max_bus_handlers: wharf_host::agent::DEFAULT_MAX_BUS_HANDLERS,
            // One process: the host reads the secrets bucket with the control plane's key.
            seal_key: None,
            secret_key: Some(secret_key),
        },
    )
    .await?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let api_stop = wait_for(stop_rx.clone());
    let ingress_stop = wait_for(stop_rx.clone());
    let api = tokio::spawn({
        let plane = plane.clone();
        let edge = edge.clone();
        async move { plane.serve(api_listener, api_tls, edge, api_stop).await }
    });
    let ingress = tokio::spawn(wharf_host::ingress::serve(ingress_listener, ingress_tls, edge.clone(), Arc::new(agent.clone()), ingress_stop));
    tokio::spawn(wharf_host::admin::serve(admin_listener, edge, metrics, wait_for(stop_rx)));

    eprintln!("data directory: {}", data_dir.display());
    eprintln!("{}", wiring::admin_token_note(&token_file, args.data_dir.is_none()));
    println!("Wharf is up: API {api_scheme}://{api_addr}  ingress {ingress_scheme}://{ingress_addr}");
    println!("admin endpoints (metrics): http://{admin_addr}/metrics");
    if let Some(dir) = samples {
        let deployed = deploy_samples(&plane, &runtime, &dir).await?;
        wait_until_ready(&agent, &deployed, Duration::from_secs(120)).await;
        for id in &deployed {
            println!("  curl {ingress_scheme}://{ingress_addr}/{}", id.name);
        }
    }
    println!("Ctrl-C stops; `wharf get services` lists what runs.");
    tokio::select! {
        () = shutdown => {}
        result = api => bail!("the API server stopped: {}", result.map(|r| r.err().map(|e| e.to_string()).unwrap_or_default()).unwrap_or_else(|e| e.to_string())),
    }
    let _ = stop_tx.send(true);
    agent.drain(Duration::from_secs(5)).await;
    agent.shutdown();
    plane.shutdown();
    let _ = tokio::time::timeout(Duration::from_secs(6), ingress).await;
    Ok(())
}

async fn wait_for(mut stop: tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

async fn bind(addr: SocketAddr, flag: &str) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} (is another wharf running? choose another address with {flag})"))
}

fn find_samples(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    let dir = given.map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("sample-services/target/wasm32-wasip2/release"));
    let missing: Vec<&str> = SAMPLES.iter().copied().filter(|s| !dir.join(format!("{s}.wasm")).is_file()).collect();
    if !missing.is_empty() {
        bail!(
            "sample components {} not found in {}; build them with `cargo build --release --target wasm32-wasip2 --manifest-path sample-services/Cargo.toml` (or use ./run), or pass --samples-dir",
            missing.join(", "),
            dir.display()
        );
    }
    Ok(dir)
}

/// Uploads and deploys each sample at `/<name>`, in-process (no HTTP round trip).
/// A sample already deployed (perhaps changed by the user since) is left as it is.
async fn deploy_samples(plane: &ControlPlane, runtime: &wharf_host::Runtime, dir: &Path) -> anyhow::Result<Vec<ServiceId>> {
    let mut deployed = Vec::new();
    for name in SAMPLES {
        let path = dir.join(format!("{name}.wasm"));
        let bytes = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let loader = runtime.clone();
        let checked = bytes.clone();
        let component = tokio::task::spawn_blocking(move || loader.load(&checked, None)).await?.with_context(|| format!("sample {name}"))?;
        let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)).unwrap_or(0);
        let record = wharf_proto::wire::ArtifactRecord { size: bytes.len() as u64, uploaded_at_ms: now_ms, by: "wharf up --samples".to_string() };
        plane.store().put_artifact(&component.digest, bytes.into()).await?;
        plane.store().own_artifact(wharf_proto::names::DEFAULT_NAMESPACE, &component.digest, &record).await?;
        let mut spec = ServiceSpec::new(*name, component.digest.clone());
        spec.routes = vec![Route { host: None, path_prefix: format!("/{name}") }];
        let id = spec.id();
        if plane.store().service(&id).await?.is_none() {
            let change = wharf_scheduler::store::Change { by: "wharf up".to_string(), cause: "sample".to_string() };
            plane.store().put_service(spec, Some(0), &change, None).await?;
        }
        deployed.push(id);
    }
    Ok(deployed)
}

async fn wait_until_ready(agent: &HostAgent, services: &[ServiceId], timeout: Duration) {
    let mut changes = agent.changes();
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let waiting: Vec<&ServiceId> = services.iter().filter(|s| agent.ready_workload(s).is_none()).collect();
        if waiting.is_empty() {
            return;
        }
        tokio::select! {
            _ = changes.changed() => {}
            _ = tokio::time::sleep_until(deadline) => {
                eprintln!("still waiting for {} to be ready; see `wharf get services`", waiting.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(", "));
                return;
            }
        }
    }
}
