//! `wharf serve FILE.wasm`: one component, one port, no control plane.

use anyhow::{Context, bail};
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use wharf_host::egress::EgressPolicy;
use wharf_host::metrics::HostMetrics;
use wharf_host::{Runtime, RuntimeConfig, Workload, WorkloadLimits, WorkloadSpec};
use wharf_proto::ByteSize;

#[derive(clap::Args)]
#[command(after_help = "Examples:\n  wharf serve hello.wasm\n  wharf serve api.wasm --listen 0.0.0.0:8080 --memory 128MiB --timeout 2s\n  wharf serve hello.wasm --tls-cert site.pem --tls-key site.key\n  wharf serve client.wasm --allow-outbound api.example.com --env MODE=dev\n\n\
Each request runs in a fresh instance. Failures answer with a status and an x-wharf-error header:\n  trap 500, fuel_exhausted 500, memory_limit 500, deadline 504, overloaded 503 (Retry-After).\n\
Prometheus metrics are served on the admin listener (--admin-listen, 127.0.0.1:7701), not on --listen.")]
pub struct Args {
    /// The component to serve: a wasm32-wasip2 component exporting wasi:http/incoming-handler.
    file: PathBuf,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Linear-memory cap of each instance (e.g. 64MiB, 1GiB).
    #[arg(long, default_value = "64MiB")]
    memory: ByteSize,
    /// Fuel (about one unit per wasm instruction) per request; `unlimited` turns metering off.
    #[arg(long, default_value = "1000000000", value_parser = parse_fuel)]
    fuel: Fuel,
    /// Wall-clock deadline per request (e.g. 500ms, 5s).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Instances that may run at once; further requests wait (see --queue-timeout).
    #[arg(long, default_value_t = 64)]
    concurrency: u32,
    /// How long a request waits for a free instance before it gets 503.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    queue_timeout: Duration,
    /// A host the component may call over wasi:http (`api.example.com`, `host:8443`, `*.example.com`). Repeatable.
    #[arg(long = "allow-outbound", value_name = "HOST")]
    allow_outbound: Vec<String>,
    /// An environment variable the component sees, as KEY=VALUE. Repeatable.
    #[arg(long = "env", value_name = "KEY=VALUE", value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// A wasi:keyvalue bucket the component may open (kept in memory while serving). Repeatable.
    #[arg(long = "keyvalue", value_name = "BUCKET")]
    keyvalue: Vec<String>,
    /// Directory for compiled code (default: the user cache dir, e.g. ~/.cache/wharf/compiled).
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Do not read or write the compile cache.
    #[arg(long, conflicts_with = "cache_dir")]
    no_cache: bool,
    #[command(flatten)]
    tls: crate::wiring::IngressTlsArgs,
    #[command(flatten)]
    guest: crate::wiring::GuestArgs,
    #[command(flatten)]
    admin: crate::wiring::AdminArgs,
    #[command(flatten)]
    edge: crate::wiring::EdgeArgs,
}

#[derive(Clone, Copy)]
struct Fuel(Option<u64>);

fn parse_fuel(s: &str) -> Result<Fuel, String> {
    if s.eq_ignore_ascii_case("unlimited") {
        return Ok(Fuel(None));
    }
    let digits: String = s.chars().filter(|c| *c != '_').collect();
    match digits.parse::<u64>() {
        Ok(0) => Err("fuel must be at least 1 (or `unlimited`)".into()),
        Ok(n) => Ok(Fuel(Some(n))),
        Err(_) => Err(format!("`{s}` is not a number of fuel units (or `unlimited`)")),
    }
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_string(), value.to_string())),
        _ => Err(format!("`{s}` is not KEY=VALUE")),
    }
}

/// The default compile cache directory.
pub fn default_cache_dir() -> Option<PathBuf> {
    dirs::cache_dir().map(|d| d.join("wharf").join("compiled"))
}

pub async fn run(args: Args, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    if args.concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    let tls = args.tls.load()?;
    let edge = args.edge.config()?;
    let scheme = crate::wiring::scheme(tls.as_ref());
    let bytes = std::fs::read(&args.file).with_context(|| format!("cannot read {}", args.file.display()))?;
    let cache_dir = if args.no_cache { None } else { args.cache_dir.clone().or_else(default_cache_dir) };
    let mut config = RuntimeConfig { max_instances: args.concurrency, max_instance_memory: args.memory, cache_dir, ..RuntimeConfig::default() };
    args.guest.apply(&mut config)?;
    let runtime = Runtime::new(config)?;
    let loader = runtime.clone();
    let component = tokio::task::spawn_blocking(move || loader.load(&bytes, None))
        .await
        .context("the compile task failed")?
        .with_context(|| format!("cannot serve {}", args.file.display()))?;
    if !component.handles_http() {
        bail!(
            "cannot serve {}: it exports no `wasi:http/incoming-handler` (a message handler is deployed with --trigger, a command runs with `wharf run`)",
            args.file.display()
        );
    }
    let name = args.file.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "component".into());
    let mut spec = WorkloadSpec::new(format!("default/{name}"));
    spec.limits = WorkloadLimits {
        memory: args.memory,
        fuel: args.fuel.0,
        timeout: args.timeout,
        concurrency: args.concurrency,
        queue_timeout: args.queue_timeout,
        // One replica has the host to itself.
        instances_request: args.concurrency,
        ..WorkloadLimits::default()
    };
    spec.env = args.env;
    spec.egress = EgressPolicy::allow(args.allow_outbound);
    let memory_bus = wharf_bus::Bus::local(wharf_bus::LocalStore::in_memory()?);
    spec.keyvalue = Some(wharf_host::keyvalue::KeyValueAccess::new(memory_bus, "default", &spec.service, args.keyvalue));
    let metrics = HostMetrics::for_runtime(&runtime);
    let how = if component.cached { "loaded compiled code from cache" } else { "compiled" };
    let took = component.load_time;
    let digest = component.digest.clone();
    let workload = Workload::new(&runtime, component, spec, &metrics)?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {} (is another server using it? pick one with --listen)", args.listen))?;
    let addr = listener.local_addr()?;
    let admin_listener = args.admin.bind().await?;
    let admin_addr = admin_listener.local_addr()?;
    // The component's lines reach stderr once, through the runtime's log
    // writer (rate-limited, tagged with the service): no second follower here.
    eprintln!("{} ({}): {how} in {took:.1?}", args.file.display(), digest.short());
    println!("serving {scheme}://{addr}/ (metrics at http://{admin_addr}/metrics); Ctrl-C stops");
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let admin = tokio::spawn(wharf_host::admin::serve(admin_listener, edge.clone(), metrics, async move {
        let _ = stop_rx.wait_for(|s| *s).await;
    }));
    wharf_host::ingress::serve(listener, tls, edge, Arc::new(workload), shutdown).await?;
    let _ = stop_tx.send(true);
    let _ = admin.await;
    Ok(())
}
