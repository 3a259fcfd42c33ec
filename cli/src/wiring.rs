//! Pieces shared by the commands that run a host or the API (`up`, `host`,
//! `scheduler`, `serve`): sizing, labels, TLS files.

use anyhow::Context;
use std::path::{Path, PathBuf};
use wharf_host::tls::TlsAcceptor;
use wharf_host::{Runtime, RuntimeConfig};
use wharf_proto::{ByteSize, Capacity, HostId};
use wharf_scheduler::ComponentCheck;

/// The control plane checks uploads with the host runtime's own loader, so
/// a component it accepts is one a host will run.
pub struct RuntimeCheck(pub Runtime);

impl ComponentCheck for RuntimeCheck {
    fn check(&self, bytes: &[u8]) -> Result<(), String> {
        self.0.load(bytes, None).map(|_| ()).map_err(|e| e.to_string())
    }
}

/// How a host is sized and labelled.
#[derive(clap::Args, Debug, Clone)]
pub struct HostArgs {
    /// This host's id in the cluster (default: the machine's host name).
    #[arg(long, env = "WHARF_HOST_ID")]
    host_id: Option<String>,
    /// A label for placement constraints, as KEY=VALUE (e.g. zone=a). Repeatable.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_pair)]
    pub labels: Vec<(String, String)>,
    /// Instances that may run at once on this host, over all replicas.
    #[arg(long, default_value_t = 1000)]
    pub max_instances: u32,
    /// Memory offered to replicas (each reserves memory x concurrency); default: 80% of the machine's.
    #[arg(long)]
    pub memory: Option<ByteSize>,
    /// OS priority of the threads that run requests past their first few milliseconds of
    /// CPU (and the excess of a tenant crowding out others): `idle` (Linux SCHED_IDLE: only
    /// CPU nothing else wants) or a nice value 0-19 (keeps a share of a busy host).
    #[arg(long, default_value_t = wharf_host::cpu::BackgroundPriority::Idle)]
    pub background_priority: wharf_host::cpu::BackgroundPriority,
    /// Compiled code kept in memory for quick starts; past it the least recently used
    /// components are dropped from memory and reloaded from the disk cache when needed.
    #[arg(long, default_value_t = wharf_host::runtime::DEFAULT_CODE_CACHE)]
    pub code_cache: ByteSize,
}

impl HostArgs {
    /// Sizing given directly rather than parsed from `up`'s flags.
    pub fn new(host_id: Option<String>, labels: Vec<(String, String)>, max_instances: u32, memory: Option<ByteSize>) -> Self {
        HostArgs {
            host_id,
            labels,
            max_instances,
            memory,
            background_priority: wharf_host::cpu::BackgroundPriority::Idle,
            code_cache: wharf_host::runtime::DEFAULT_CODE_CACHE,
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
        HostId::new(raw.clone()).with_context(|| format!("host id {raw:?} is not usable (lowercase letters, digits and '-'); pass --host-id"))
    }

    pub fn capacity(&self) -> Capacity {
        let memory = self.memory.unwrap_or_else(|| ByteSize(machine_memory().saturating_mul(4) / 5));
        Capacity { memory, instances: self.max_instances }
    }

    pub fn runtime(&self, cache_dir: Option<PathBuf>) -> anyhow::Result<Runtime> {
        Ok(Runtime::new(RuntimeConfig {
            max_instances: self.max_instances,
            max_instance_memory: wharf_proto::spec::MAX_MEMORY,
            cache_dir,
            code_cache: self.code_cache,
            background: self.background_priority,
        })?)
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
