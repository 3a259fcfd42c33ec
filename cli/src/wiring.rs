//! Pieces shared by the commands that run a host or the API (`up`, `host`,
//! `scheduler`, `serve`): sizing, labels, TLS files, the bounds every
//! listener puts on its clients, and the admin listener.

use anyhow::Context;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use wharf_host::tls::TlsAcceptor;
use wharf_host::{Runtime, RuntimeConfig};
use wharf_proto::egress::PrivateEgress;
use wharf_proto::{ByteSize, Capacity, HostId};
use wharf_scheduler::ComponentCheck;

/// The control plane checks uploads with the host runtime's own loader, so
/// a component it accepts is one a host will run.
pub struct RuntimeCheck(pub Runtime);

impl ComponentCheck for RuntimeCheck {
    fn check(&self, bytes: &[u8]) -> Result<(), String> {
        self.0.load(bytes, None).map(|_| ()).map_err(|e| {
            // A component that compiled but failed a later check (its world,
            // its links) leaves no compiled code behind.
            self.0.discard(&wharf_proto::Digest::of(bytes));
            e.to_string()
        })
    }

    fn exports(&self, bytes: &[u8]) -> Result<Vec<String>, String> {
        wharf_host::runtime::component_exports(bytes).map_err(|e| e.to_string())
    }
}

/// How a host is sized and labelled.
#[derive(clap::Args, Debug, Clone)]
pub struct HostArgs {
    /// This host's name in the cluster (default: the machine's host name); `wharf host` spells it the same.
    #[arg(long = "host-id", visible_alias = "name", env = "WHARF_HOST_ID")]
    host_id: Option<String>,
    /// Labels for placement, as KEY=VALUE (e.g. zone=a); repeat the flag or separate pairs with commas (zone=a,disk=ssd).
    #[arg(long = "label", visible_alias = "labels", value_name = "KEY=VALUE", value_delimiter = ',', value_parser = parse_pair)]
    pub labels: Vec<(String, String)>,
    /// Instances that may run at once on this host, over all replicas (each replica reserves
    /// its instance request, 1 by default; a request finding every slot busy waits its queue
    /// timeout, then gets 503 host_instances_full). Each slot reserves address space (not
    /// memory) for its largest memory: about 8.6GiB, so past about 14,000 the engine cannot start.
    #[arg(long, default_value_t = wharf_host::runtime::DEFAULT_MAX_INSTANCES)]
    pub max_instances: u32,
    /// Memory offered to replicas (each reserves its memory request); default: 80% of the machine's.
    #[arg(long)]
    pub memory: Option<ByteSize>,
    /// How far replicas' memory requests may add up past --memory (1.5: half as much again).
    /// Each instance stays capped at its limit; if the host really runs short, an instance
    /// is refused with a clean error (503), never a crash.
    #[arg(long, default_value_t = wharf_proto::Overcommit::NONE)]
    pub memory_overcommit: wharf_proto::Overcommit,
    /// OS priority of the threads that run requests past their first few milliseconds of
    /// CPU (and the excess of a tenant crowding out others): `idle` (Linux SCHED_IDLE: only
    /// CPU nothing else wants) or a nice value 0-19 (keeps a share of a busy host).
    #[arg(long, default_value_t = wharf_host::cpu::BackgroundPriority::Idle)]
    pub background_priority: wharf_host::cpu::BackgroundPriority,
    /// Compiled code kept in memory for quick starts; past it the least recently used
    /// components are dropped from memory and reloaded from the disk cache when needed.
    #[arg(long, default_value_t = wharf_host::runtime::DEFAULT_CODE_CACHE)]
    pub code_cache: ByteSize,
    #[command(flatten)]
    pub guest: GuestArgs,
}

/// What each component on a host may spend through its host calls: log
/// lines, key-value pages and batches, and the private networks it may call.
#[derive(clap::Args, Debug, Clone, PartialEq)]
pub struct GuestArgs {
    /// Log lines per second each service may write on this host (over all its replicas); more are dropped and counted.
    #[arg(long, default_value_t = 100.0)]
    pub log_rate: f64,
    /// Log lines a service may write at once after a quiet spell.
    #[arg(long, default_value_t = 1000.0)]
    pub log_burst: f64,
    /// Keys in one page of a component's wasi:keyvalue list-keys.
    #[arg(long, default_value_t = 1000)]
    pub kv_page_keys: usize,
    /// Keys in one wasi:keyvalue get-many, set-many or delete-many.
    #[arg(long, default_value_t = 1000)]
    pub kv_batch_keys: usize,
    /// Bytes of values one wasi:keyvalue get-many may return.
    #[arg(long, default_value = "16MiB")]
    pub kv_batch_bytes: ByteSize,
    /// Non-public address ranges components may call (CIDR,...; e.g. 10.0.0.0/8,127.0.0.1). Loopback, link-local, private ranges and this host's addresses are refused otherwise, after name resolution and in allow_outbound at deploy.
    #[arg(long, value_name = "CIDR,...", default_value = "", value_parser = parse_private_egress)]
    pub allow_private_egress: PrivateEgress,
}

impl Default for GuestArgs {
    fn default() -> Self {
        let logs = wharf_host::logs::LogLimits::default();
        let kv = wharf_host::keyvalue::KeyValueLimits::default();
        GuestArgs {
            log_rate: logs.lines_per_second,
            log_burst: logs.burst,
            kv_page_keys: kv.page_keys,
            kv_batch_keys: kv.batch_keys,
            kv_batch_bytes: ByteSize(kv.batch_bytes),
            allow_private_egress: PrivateEgress::default(),
        }
    }
}

impl GuestArgs {
    /// Checks the values and fills the runtime's share of its config.
    pub fn apply(&self, config: &mut RuntimeConfig) -> anyhow::Result<()> {
        if !(self.log_rate > 0.0 && self.log_burst >= 1.0) {
            anyhow::bail!("--log-rate must be above 0 and --log-burst at least 1 (got {} and {})", self.log_rate, self.log_burst);
        }
        if self.kv_page_keys == 0 || self.kv_batch_keys == 0 || self.kv_batch_bytes.bytes() == 0 {
            anyhow::bail!("--kv-page-keys, --kv-batch-keys and --kv-batch-bytes must be at least 1");
        }
        config.logs = wharf_host::logs::LogLimits { lines_per_second: self.log_rate, burst: self.log_burst };
        config.keyvalue = wharf_host::keyvalue::KeyValueLimits { page_keys: self.kv_page_keys, batch_keys: self.kv_batch_keys, batch_bytes: self.kv_batch_bytes.bytes() };
        config.private_egress = self.allow_private_egress.clone();
        Ok(())
    }
}

fn parse_private_egress(s: &str) -> Result<PrivateEgress, String> {
    PrivateEgress::parse(s).map_err(|e| e.to_string())
}

impl HostArgs {
    /// Sizing given directly rather than parsed from `up`'s flags.
    pub fn new(host_id: Option<String>, labels: Vec<(String, String)>, max_instances: u32, memory: Option<ByteSize>) -> Self {
        HostArgs {
            host_id,
            labels,
            max_instances,
            memory,
            memory_overcommit: wharf_proto::Overcommit::NONE,
            background_priority: wharf_host::cpu::BackgroundPriority::Idle,
            code_cache: wharf_host::runtime::DEFAULT_CODE_CACHE,
            guest: GuestArgs::default(),
        }
    }

    /// The default sizing, for processes that only check components.
    pub fn default_sizing() -> Self {
        Self::new(None, Vec::new(), 64, None)
    }

    pub fn host_id(&self) -> anyhow::Result<HostId> {
        let raw = match &self.host_id {
            Some(id) => id.clone(),
            None => machine_name(),
        };
        HostId::new(raw.clone()).with_context(|| format!("host id {raw:?} is not usable as a host name (lowercase letters, digits and '-'); pass one with --name (or --host-id)"))
    }

    pub fn capacity(&self) -> Capacity {
        let memory = self.memory.unwrap_or_else(|| ByteSize(machine_memory().saturating_mul(4) / 5));
        Capacity { memory, instances: self.max_instances }
    }

    pub fn runtime(&self, cache_dir: Option<PathBuf>) -> anyhow::Result<Runtime> {
        let mut config = RuntimeConfig {
            max_instances: self.max_instances,
            max_instance_memory: wharf_proto::spec::MAX_MEMORY,
            cache_dir,
            code_cache: self.code_cache,
            background: self.background_priority,
            // The safety net under overcommitted requests: instances
            // together never hold more than the memory the host offers.
            memory_budget: Some(self.capacity().memory),
            ..RuntimeConfig::default()
        };
        self.guest.apply(&mut config)?;
        Ok(Runtime::new(config)?)
    }
}

/// HTTPS for an ingress (`up`, `host`, `serve`).
#[derive(clap::Args, Debug, Clone)]
pub struct IngressTlsArgs {
    /// Serve the ingress over HTTPS with this PEM certificate chain (the server's certificate first, then any intermediates). Needs --tls-key.
    #[arg(long, value_name = "PATH", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The PEM private key (PKCS#8, PKCS#1 or SEC1) of --tls-cert.
    #[arg(long, value_name = "PATH", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

impl IngressTlsArgs {
    /// The acceptor for the ingress, or `None` for plain HTTP.
    pub fn load(&self) -> anyhow::Result<Option<TlsAcceptor>> {
        load_tls(self.tls_cert.as_deref(), self.tls_key.as_deref()).context("cannot serve the ingress over HTTPS (--tls-cert, --tls-key)")
    }
}

/// HTTPS for the REST API (`up`, `scheduler`).
#[derive(clap::Args, Debug, Clone)]
pub struct ApiTlsArgs {
    /// Serve the API over HTTPS with this PEM certificate chain (the server's certificate first, then any intermediates). Needs --api-tls-key.
    /// Clients then use https:// and, for a private CA, --ca-cert.
    #[arg(long, value_name = "PATH", requires = "api_tls_key")]
    api_tls_cert: Option<PathBuf>,
    /// The PEM private key (PKCS#8, PKCS#1 or SEC1) of --api-tls-cert.
    #[arg(long, value_name = "PATH", requires = "api_tls_cert")]
    api_tls_key: Option<PathBuf>,
}

impl ApiTlsArgs {
    /// The acceptor for the API, or `None` for plain HTTP.
    pub fn load(&self) -> anyhow::Result<Option<TlsAcceptor>> {
        load_tls(self.api_tls_cert.as_deref(), self.api_tls_key.as_deref()).context("cannot serve the API over HTTPS (--api-tls-cert, --api-tls-key)")
    }
}

fn load_tls(cert: Option<&Path>, key: Option<&Path>) -> anyhow::Result<Option<TlsAcceptor>> {
    match (cert, key) {
        (Some(cert), Some(key)) => Ok(Some(wharf_host::tls::load(cert, key)?)),
        // clap's `requires` refuses half a pair before this runs.
        _ => Ok(None),
    }
}

/// The bounds every listener of the process (ingress, API, admin) puts on
/// its clients. Defaults follow nginx and Envoy; see `wharf_edge::ServerConfig`.
#[derive(clap::Args, Debug, Clone)]
pub struct EdgeArgs {
    /// How long a client has to send a whole request head (from connecting, or from the first byte of a later request); slower clients are closed.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    header_timeout: Duration,
    /// How long a kept-alive connection may wait for its next request before it is closed (nginx's keepalive_timeout).
    #[arg(long, default_value = "75s", value_parser = humantime::parse_duration)]
    idle_timeout: Duration,
    /// How long a request body may go without new data while the server waits for it; the request then fails (nginx's client_body_timeout).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    body_timeout: Duration,
    /// Connections each listener keeps open at once; past it new connections are answered 503 and closed, established ones keep working.
    #[arg(long, default_value_t = 10_000)]
    max_connections: usize,
    /// Bytes each connection may buffer (its request head, and response bytes waiting to be sent).
    #[arg(long, default_value = "256KiB")]
    connection_buffer: ByteSize,
    /// How long a client has to finish a TLS handshake.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    tls_handshake_timeout: Duration,
    /// The largest request body the ingress accepts; larger ones get 413. Bodies stream through (to a replica here or on another host), so a large limit costs no memory per byte.
    #[arg(long, default_value = "16MiB")]
    max_request_body: ByteSize,
}

impl EdgeArgs {
    /// The checked server bounds. Raises this process's open-file limit to
    /// what the system allows, and warns if the connection cap does not fit in it.
    pub fn config(&self) -> anyhow::Result<wharf_edge::ServerConfig> {
        let config = wharf_edge::ServerConfig {
            header_read_timeout: self.header_timeout,
            idle_timeout: self.idle_timeout,
            body_read_timeout: self.body_timeout,
            max_connections: self.max_connections,
            max_buffer: usize::try_from(self.connection_buffer.bytes()).unwrap_or(usize::MAX),
            tls_handshake_timeout: self.tls_handshake_timeout,
            max_request_body: self.max_request_body.bytes(),
            ..wharf_edge::ServerConfig::default()
        };
        config.validate().context("bad listener bounds (--header-timeout, --idle-timeout, --body-timeout, --max-connections, --connection-buffer, --tls-handshake-timeout)")?;
        if let Some(files) = raise_open_file_limit() {
            // Room for the store, NATS, compiled code and volumes besides client sockets.
            const RESERVED: u64 = 1024;
            if u64::try_from(config.max_connections).unwrap_or(u64::MAX).saturating_add(RESERVED) > files {
                tracing::warn!(
                    "--max-connections {} does not fit this process's open-file limit of {files} (less {RESERVED} for everything else); accepts will fail before the cap refuses cleanly: raise the limit (ulimit -n) or lower the cap",
                    config.max_connections
                );
            }
        }
        Ok(config)
    }
}

/// Raises the soft limit on open files to the hard limit, as servers that
/// hold many connections do, and returns the limit now in force.
fn raise_open_file_limit() -> Option<u64> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let (Some(current), maximum) = (limit.current, limit.maximum) else { return None };
    let wanted = maximum.unwrap_or(current);
    if wanted > current && setrlimit(Resource::Nofile, Rlimit { current: Some(wanted), maximum }).is_ok() {
        return Some(wanted);
    }
    Some(current)
}

/// The admin listener (`up`, `host`, `serve`): operator endpoints such as
/// `/metrics`, off the public ingress.
#[derive(clap::Args, Debug, Clone)]
pub struct AdminArgs {
    /// Address of the admin listener, which serves /metrics and /healthz (loopback by default; the public ingress serves tenants' routes only).
    #[arg(long, default_value = "127.0.0.1:7701")]
    pub admin_listen: SocketAddr,
}

impl AdminArgs {
    /// Binds the admin address, saying which flag to change when it is taken.
    pub async fn bind(&self) -> anyhow::Result<tokio::net::TcpListener> {
        tokio::net::TcpListener::bind(self.admin_listen)
            .await
            .with_context(|| format!("cannot listen on {} for the admin endpoints (choose another address with --admin-listen)", self.admin_listen))
    }
}

/// The URL scheme a listener serves: `https` with TLS, else `http`.
pub fn scheme(tls: Option<&TlsAcceptor>) -> &'static str {
    if tls.is_some() { "https" } else { "http" }
}

pub fn parse_pair(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_string(), value.to_string())),
        _ => Err(format!("`{s}` is not KEY=VALUE")),
    }
}

/// The machine's host name, made into a DNS label.
fn machine_name() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_else(|_| "local".into());
    let label: String = raw
        .trim()
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(63)
        .collect();
    let label = label.trim_matches('-').to_string();
    if label.is_empty() { "local".into() } else { label }
}

/// Total memory from /proc/meminfo; 8 GiB when unknown.
fn machine_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines().find_map(|l| l.strip_prefix("MemTotal:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(8 << 30, |kib| kib * 1024)
}

/// Where the admin token is and how the CLI will find it: by itself when
/// `found_by_cli` (the default data directory, or the one `WHARF_DATA_DIR`
/// names), else only through `WHARF_TOKEN`.
pub fn admin_token_note(file: &Path, found_by_cli: bool) -> String {
    let named_by_env = std::env::var_os("WHARF_DATA_DIR").is_some_and(|dir| file.parent() == Some(Path::new(&dir)));
    if found_by_cli || named_by_env {
        format!("admin token: {} (the CLI on this machine reads it from there; elsewhere set WHARF_TOKEN)", file.display())
    } else {
        format!("admin token: {} (the CLI does not look there: export WHARF_TOKEN=$(cat {}), or WHARF_DATA_DIR={})", file.display(), file.display(), file.parent().map(|d| d.display().to_string()).unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(clap::Parser)]
    struct Flags {
        #[command(flatten)]
        edge: EdgeArgs,
        #[command(flatten)]
        guest: GuestArgs,
    }

    #[test]
    fn guest_flag_defaults_are_the_host_defaults() {
        let flags = Flags::try_parse_from(["wharf"]).expect("defaults parse");
        assert_eq!(flags.guest, GuestArgs::default());
        let mut config = RuntimeConfig::default();
        flags.guest.apply(&mut config).expect("valid");
        assert_eq!(config.logs, wharf_host::logs::LogLimits::default());
        assert_eq!(config.keyvalue, wharf_host::keyvalue::KeyValueLimits::default());
    }

    #[test]
    fn bad_guest_limits_are_refused() {
        let error = Flags::try_parse_from(["wharf", "--allow-private-egress", "10.0.0.0/99"]).err().expect("refused").to_string();
        assert!(error.contains("10.0.0.0/99"), "{error}");
        let flags = Flags::try_parse_from(["wharf", "--log-rate", "0"]).expect("parses");
        assert!(flags.guest.apply(&mut RuntimeConfig::default()).is_err());
    }

    #[test]
    fn listener_flag_defaults_are_the_edge_defaults() {
        let flags = Flags::try_parse_from(["wharf"]).expect("defaults parse");
        assert_eq!(flags.edge.config().expect("valid"), wharf_edge::ServerConfig::default());
    }

    #[test]
    fn bad_listener_bounds_are_refused_naming_the_flags() {
        let flags = Flags::try_parse_from(["wharf", "--max-connections", "0"]).expect("parses");
        let message = format!("{:#}", flags.edge.config().expect_err("refused"));
        assert!(message.contains("--max-connections") && message.contains("at least 1"), "{message}");
    }
}

