//! The commands that talk to the control plane's REST API: deploy, apply,
//! get, scale, delete. Tables for people by default, JSON with `-o json`.

use anyhow::{Context, bail};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;
use wharf_proto::{ByteSize, ComponentRef, Digest, ManifestFormat, Route, ServiceId, ServiceSpec, parse_apply_manifest};

/// Where the API is; shared by every client command.
#[derive(clap::Args, Debug, Clone)]
pub struct ApiArgs {
    /// The control plane's API (as printed by `wharf up`; https://... when it serves TLS).
    #[arg(long, global = true, env = "WHARF_API", default_value = "http://127.0.0.1:7700")]
    api: String,
    /// API token (default: WHARF_TOKEN, else ~/.config/wharf/token, else the
    /// admin token `wharf up` or `wharf scheduler` wrote: in $WHARF_DATA_DIR,
    /// or in their default data directories).
    #[arg(long, global = true, env = "WHARF_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// A PEM CA certificate (or bundle) to trust for an https:// API, besides
    /// the system's roots (default: WHARF_CA_CERT, else ~/.config/wharf/ca.pem
    /// if it exists).
    #[arg(long, global = true, env = "WHARF_CA_CERT", value_name = "PATH")]
    ca_cert: Option<PathBuf>,
}

impl ApiArgs {
    fn ca_cert(&self) -> Option<PathBuf> {
        if let Some(path) = &self.ca_cert {
            return Some(path.clone());
        }
        dirs::config_dir().map(|d| d.join("wharf").join("ca.pem")).filter(|path| path.is_file())
    }

    fn token(&self) -> Option<String> {
        if let Some(token) = &self.token {
            return Some(token.trim().to_string());
        }
        token_files().into_iter().find_map(|path| std::fs::read_to_string(path).ok()).map(|t| t.trim().to_string()).filter(|t| !t.is_empty())
    }
}

/// Where the CLI looks for a token when none is given, in order: the
/// user's own token file, then the admin token a control plane wrote in
/// the data directory `WHARF_DATA_DIR` names, in `wharf up`'s default one
/// and in `wharf scheduler`'s (`<data dir>/wharf/scheduler`).
fn token_files() -> Vec<PathBuf> {
    let mut files = Vec::new();
    if let Some(config) = dirs::config_dir() {
        files.push(config.join("wharf").join("token"));
    }
    if let Some(dir) = std::env::var_os("WHARF_DATA_DIR").filter(|d| !d.is_empty()) {
        files.push(PathBuf::from(dir).join("admin-token"));
    }
    if let Some(data) = dirs::data_dir() {
        files.push(data.join("wharf").join("admin-token"));
        files.push(data.join("wharf").join("scheduler").join("admin-token"));
    }
    files
}

/// Output format.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    Table,
    Json,
}

#[derive(clap::Args)]
#[command(after_help = "Deploying an existing service changes only what the flags set; the rest \
(replicas, routes, env, autoscaling, ...) is kept. A change to what runs (component, env, config, \
secrets, limits, routes, health) makes a new revision, rolled out without dropping the one that \
serves: new replicas start and pass their readiness check before old ones stop; a rollout that \
fails goes back to the last good revision (see `wharf rollout`).\n\n\
Examples:\n  wharf deploy hello.wasm --name hello --route /hello\n  \
wharf deploy api.wasm --name api --namespace shop --replicas 3 --memory 128MiB --env MODE=prod\n  \
wharf deploy api-v2.wasm --name api --namespace shop --readiness /healthz --canary 10\n  \
wharf deploy oci://ghcr.io/org/api:1.0 --route /api")]
pub struct DeployArgs {
    /// The component to deploy: a file, or oci://REGISTRY/REPOSITORY:TAG (or @sha256:...) in a registry.
    file: PathBuf,
    #[command(flatten)]
    registry: crate::oci::RegistryArgs,
    /// The service's name (a DNS label); default: the file's name.
    #[arg(long)]
    name: Option<String>,
    /// The namespace.
    #[arg(long, short = 'n', default_value = "default")]
    namespace: String,
    /// Path prefix routed to the service by the ingress. Repeatable; replaces the routes.
    #[arg(long = "route", value_name = "PREFIX")]
    routes: Vec<String>,
    /// Replicas to run (default 1 for a new service; kept for an existing one).
    #[arg(long)]
    replicas: Option<u32>,
    /// Linear-memory cap per instance.
    #[arg(long)]
    memory: Option<ByteSize>,
    /// Fuel per request, or `unlimited`.
    #[arg(long)]
    fuel: Option<String>,
    /// Deadline per request (e.g. 2s).
    #[arg(long)]
    timeout: Option<String>,
    /// Instances per replica at once.
    #[arg(long)]
    concurrency: Option<u32>,
    /// Memory placement reserves per replica (its request; at most --memory x --concurrency).
    /// Default: 8MiB, raised to the peak the service's instances are seen using.
    #[arg(long)]
    memory_request: Option<ByteSize>,
    /// Instance slots placement reserves per replica on its host (its request; at most
    /// --concurrency). Default: 1, as instances live only while a request runs.
    #[arg(long)]
    instances_request: Option<u32>,
    /// Environment variable KEY=VALUE. Repeatable; replaces the environment.
    #[arg(long = "env", value_name = "KEY=VALUE", value_parser = crate::wiring::parse_pair)]
    env: Vec<(String, String)>,
    /// Outbound host the component may call. Repeatable; replaces the list.
    #[arg(long = "allow-outbound", value_name = "HOST")]
    allow_outbound: Vec<String>,
    /// Host label every replica's host must have, KEY=VALUE. Repeatable; replaces the labels.
    #[arg(long = "on", value_name = "KEY=VALUE", value_parser = crate::wiring::parse_pair)]
    placement: Vec<(String, String)>,
    /// Autoscale: the fewest replicas (0 scales to zero when idle). Setting any autoscale flag replaces --replicas.
    #[arg(long)]
    min: Option<u32>,
    /// Autoscale: the most replicas.
    #[arg(long)]
    max: Option<u32>,
    /// Autoscale: in-flight requests per replica to aim for.
    #[arg(long)]
    target_concurrency: Option<u32>,
    /// Autoscale: requests per second per replica to aim for.
    #[arg(long, conflicts_with = "target_concurrency")]
    target_rps: Option<u32>,
    /// Autoscale: how long a lower count must be wanted before scaling down (e.g. 10s).
    #[arg(long)]
    scale_down_delay: Option<String>,
    /// Autoscale: idle time before the last replica stops, with --min 0 (e.g. 30s).
    #[arg(long)]
    scale_to_zero_after: Option<String>,
    /// A volume: a directory on the host the component sees at PATH (default /data), as NAME[:PATH].
    /// The service is pinned to the host that holds it. Repeatable; replaces the volumes.
    #[arg(long = "volume", value_name = "NAME[:PATH]")]
    volumes: Vec<String>,
    /// Runtime configuration (wasi:config) as KEY=VALUE. Repeatable; replaces the configuration.
    #[arg(long = "config", value_name = "KEY=VALUE", value_parser = crate::wiring::parse_pair)]
    config: Vec<(String, String)>,
    /// A secret of the namespace to hand to the component (as the config value of that name). Repeatable; replaces the list.
    #[arg(long = "secret", value_name = "NAME")]
    secrets: Vec<String>,
    /// A wasi:keyvalue bucket the component may open (in its namespace). Repeatable; replaces the list.
    #[arg(long = "keyvalue", value_name = "BUCKET")]
    keyvalue: Vec<String>,
    /// A message trigger: each message on SUBJECT (relative to the namespace;
    /// `*` and a final `>` match) invokes the component's
    /// wasmcloud:messaging handler. `SUBJECT@STREAM` reads it from JetStream
    /// stream STREAM (at least once, acknowledged after success, 5
    /// deliveries, then `dead-letter.<service>`); plain SUBJECT is core NATS
    /// (at most once). Repeatable; replaces the triggers. Other settings:
    /// `triggers:` in a manifest.
    #[arg(long = "trigger", value_name = "SUBJECT[@STREAM]")]
    triggers: Vec<String>,
    /// Spread replicas evenly over the values of this host label (e.g. zone).
    #[arg(long, value_name = "LABEL")]
    spread: Option<String>,
    /// Readiness check: a replica takes traffic once `GET PATH` answers 2xx.
    #[arg(long, value_name = "PATH")]
    readiness: Option<String>,
    /// Roll out as a canary: the new revision takes PERCENT of the requests
    /// until `wharf rollout promote` (or `abort`).
    #[arg(long, value_name = "PERCENT")]
    canary: Option<u32>,
    /// Rolling update: replicas allowed above the count (e.g. 25% or 1).
    #[arg(long, value_name = "AMOUNT")]
    max_surge: Option<wharf_proto::Amount>,
    /// Rolling update: ready replicas allowed below the count (e.g. 0 or 10%).
    #[arg(long, value_name = "AMOUNT")]
    max_unavailable: Option<wharf_proto::Amount>,
    /// How long a rollout may go without a new replica becoming ready before it fails (e.g. 2m).
    #[arg(long, value_name = "DURATION")]
    progress_deadline: Option<String>,
    /// Deploy even if a secret it grants does not exist yet: the rollout
    /// waits for it (and the old revision keeps serving).
    #[arg(long)]
    force: bool,
    /// Return without waiting for the rollout.
    #[arg(long)]
    no_wait: bool,
    #[command(flatten)]
    api: ApiArgs,
}

#[derive(clap::Args)]
#[command(after_help = "A manifest holds one service or a list under `services` (and jobs under `jobs`, as `wharf run -f` reads them), in YAML, TOML or JSON:\n\n  services:\n    - name: hello\n      component: { file: hello.wasm }\n      replicas: 2\n      routes: [{ path_prefix: /hello }]\n      limits: { memory: 64MiB, timeout: 2s }\n    - name: orders\n      component: { file: orders.wasm }\n      triggers: [{ subject: \"orders.>\", stream: orders, max_deliver: 5 }]\n\n\
Applying is idempotent. Every service is checked before any is written.")]
pub struct ApplyArgs {
    /// The manifest file (.yaml, .yml, .toml or .json).
    #[arg(short = 'f', long = "file")]
    file: PathBuf,
    /// Apply even if a secret a service grants does not exist yet: its
    /// rollout waits for it.
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    registry: crate::oci::RegistryArgs,
    /// Return without waiting for the rollouts.
    #[arg(long)]
    no_wait: bool,
    #[command(flatten)]
    api: ApiArgs,
}

#[derive(clap::Subcommand)]
pub enum GetWhat {
    /// Services with their desired and ready replicas.
    #[command(alias = "service", alias = "svc")]
    Services {
        /// One service (`name` or `namespace/name`).
        name: Option<String>,
        /// List only this namespace's services (default: every namespace the token may see).
        #[arg(short = 'n', long, conflicts_with = "name")]
        namespace: Option<String>,
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Output,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Jobs and the history of their runs (run, start, duration, exit code, attempts, host).
    #[command(alias = "job")]
    Jobs {
        /// One job (`name` or `namespace/name`).
        name: Option<String>,
        /// List only this namespace's jobs (default: every namespace the token may see).
        #[arg(short = 'n', long, conflicts_with = "name")]
        namespace: Option<String>,
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Output,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Hosts with their state and load.
    #[command(alias = "host")]
    Hosts {
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Output,
        #[command(flatten)]
        api: ApiArgs,
    },
}

/// `wharf kv`: operators' access to services' key-value data.
#[derive(clap::Subcommand)]
pub enum KvCommand {
    /// Print a key's value.
    Get { bucket: String, key: String, #[command(flatten)] scope: KvScope },
    /// Set a key's value.
    Put { bucket: String, key: String, value: String, #[command(flatten)] scope: KvScope },
    /// List a bucket's keys.
    List { bucket: String, #[command(flatten)] scope: KvScope },
    /// Delete a key.
    Delete { bucket: String, key: String, #[command(flatten)] scope: KvScope },
}

#[derive(clap::Args)]
pub struct KvScope {
    /// The namespace the bucket belongs to.
    #[arg(long, short = 'n', default_value = "default")]
    namespace: String,
    #[command(flatten)]
    api: ApiArgs,
}

pub async fn kv(command: KvCommand) -> anyhow::Result<()> {
    let (scope, path, method, body) = match &command {
        KvCommand::Get { bucket, key, scope } => (scope, format!("{}/{}", encode_segment(bucket), encode_segment(key)), reqwest::Method::GET, None),
        KvCommand::Put { bucket, key, value, scope } => (scope, format!("{}/{}", encode_segment(bucket), encode_segment(key)), reqwest::Method::PUT, Some(value.clone())),
        KvCommand::List { bucket, scope } => (scope, encode_segment(bucket), reqwest::Method::GET, None),
        KvCommand::Delete { bucket, key, scope } => (scope, format!("{}/{}", encode_segment(bucket), encode_segment(key)), reqwest::Method::DELETE, None),
    };
    let api = Api::new(&scope.api)?;
    let url = format!("{}/v1/namespaces/{}/kv/{path}", api.base, scope.namespace);
    let mut request = api.http.request(method, &url);
    if let Some(body) = body {
        request = request.body(body);
    }
    if let KvCommand::Get { .. } = command {
        let response = request.send().await.map_err(|e| api.unreachable(&e))?;
        if response.status().is_success() {
            let bytes = response.bytes().await?;
            println!("{}", String::from_utf8_lossy(&bytes));
            return Ok(());
        }
        let body: Value = response.json().await.unwrap_or(Value::Null);
        bail!("{}", body["error"]["message"].as_str().unwrap_or("the API refused the request"));
    }
    if let KvCommand::List { .. } = command {
        // Pages of keys until the API says there is no next one, printed sorted.
        let (mut keys, mut after) = (Vec::new(), 0);
        loop {
            let page = api.call(api.http.get(format!("{url}?after={after}"))).await?;
            keys.extend(page["keys"].as_array().into_iter().flatten().filter_map(|k| k.as_str().map(str::to_string)));
            match page["next"].as_u64() {
                Some(next) => after = next,
                None => break,
            }
        }
        keys.sort();
        for key in keys {
            println!("{key}");
        }
        return Ok(());
    }
    api.call(request).await?;
    match command {
        KvCommand::Put { key, .. } => println!("{key} set"),
        KvCommand::Delete { key, .. } => println!("{key} deleted"),
        KvCommand::List { .. } | KvCommand::Get { .. } => {}
    }
    Ok(())
}

/// `wharf namespace`: namespaces and their quotas.
#[derive(clap::Subcommand)]
pub enum NamespaceCommand {
    /// Set a namespace's quotas and who may call it (admin only), replacing its record: an absent
    /// quota flag means no limit, no --allow-from means calls only from inside the namespace.
    Set {
        name: String,
        /// Replicas over all its services (an autoscaled service counts its max).
        #[arg(long)]
        max_replicas: Option<u32>,
        /// Memory reserved over all its replicas (their memory requests).
        #[arg(long)]
        max_memory: Option<ByteSize>,
        /// Requests per second at each host's ingress.
        #[arg(long)]
        max_rps: Option<u32>,
        /// Bytes its services' key-value data may take (absent: 1GiB); a write past it is refused.
        #[arg(long)]
        kv_bytes: Option<ByteSize>,
        /// Components it may keep uploaded; an upload past it is refused (`wharf artifact rm` frees one).
        #[arg(long)]
        max_artifacts: Option<u32>,
        /// Bytes of the components it keeps uploaded.
        #[arg(long)]
        max_artifact_bytes: Option<ByteSize>,
        /// A namespace whose services may call this one's (`http://svc.NAME`); `*` for any.
        /// Repeatable. Without it, only the namespace's own services may call them.
        #[arg(long = "allow-from", value_name = "NAMESPACE")]
        allow_from: Vec<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Show a namespace's quotas and what it uses.
    Get {
        name: String,
        #[command(flatten)]
        api: ApiArgs,
    },
}

pub async fn namespace(command: NamespaceCommand) -> anyhow::Result<()> {
    match command {
        NamespaceCommand::Set { name, max_replicas, max_memory, max_rps, kv_bytes, max_artifacts, max_artifact_bytes, allow_from, api } => {
            let api = Api::new(&api)?;
            let quota = wharf_proto::Quota { replicas: max_replicas, memory: max_memory, rps: max_rps, kv_bytes, artifacts: max_artifacts, artifact_bytes: max_artifact_bytes };
            let body = json!({"quota": quota, "allow_from": allow_from});
            api.call(api.http.put(format!("{}/v1/namespaces/{name}", api.base)).json(&body)).await?;
            println!("namespace {name} set (quota and callers replaced)");
        }
        NamespaceCommand::Get { name, api } => {
            let api = Api::new(&api)?;
            println!("{}", serde_json::to_string_pretty(&api.get(&format!("/v1/namespaces/{name}")).await?)?);
        }
    }
    Ok(())
}

/// `wharf token`: API tokens.
#[derive(clap::Subcommand)]
pub enum TokenCommand {
    /// Create a token and print it (the only time it is shown).
    Create(TokenArgs),
    /// List tokens: id, role, created (never the tokens themselves).
    List {
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Output,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Revoke a token by its id (the 12 hex digits after `wharf_`, as `list` shows) or by the token itself
    /// (only its id is sent); it gets 401 from then on.
    /// The admin token in a control plane's data directory is registered again when it starts: to replace it, delete that file and restart.
    Revoke {
        /// The token's id, or the token (`wharf_...`).
        id: String,
        #[command(flatten)]
        api: ApiArgs,
    },
}

#[derive(clap::Args)]
pub struct TokenArgs {
    /// A namespace the token may act in. Repeatable.
    #[arg(long = "namespace", short = 'n')]
    namespaces: Vec<String>,
    /// Allow writes too (default: read only).
    #[arg(long)]
    write: bool,
    /// A cluster admin token instead.
    #[arg(long, conflicts_with_all = ["namespaces", "write"])]
    admin: bool,
    /// How long the token works (e.g. 24h, 30m, 7d); after that it gets 401 saying it expired.
    /// Default: until revoked.
    #[arg(long, value_parser = humantime::parse_duration)]
    ttl: Option<Duration>,
    #[command(flatten)]
    api: ApiArgs,
}

/// `wharf token create`: prints a new token (the only time it is shown).
pub async fn token(command: TokenCommand) -> anyhow::Result<()> {
    let args = match command {
        TokenCommand::Create(args) => args,
        TokenCommand::List { output, api } => return list_tokens(output, &api).await,
        TokenCommand::Revoke { id, api } => {
            // A whole token: its id is the 12 characters after `wharf_`; the
            // secret part never leaves this machine.
            let id = match id.strip_prefix("wharf_") {
                Some(rest) => rest.get(..12).with_context(|| format!("{id:?} is neither a token id nor a token"))?.to_string(),
                None => id,
            };
            let api = Api::new(&api)?;
            let answer = api.call(api.http.delete(format!("{}/v1/tokens/{id}", api.base))).await?;
            println!("token {} revoked", answer["revoked"].as_str().unwrap_or(&id));
            return Ok(());
        }
    };
    let api = Api::new(&args.api)?;
    let ttl = args.ttl.map(|ttl| humantime::format_duration(ttl).to_string());
    let body = json!({"namespaces": args.namespaces, "write": args.write, "admin": args.admin, "ttl": ttl});
    let answer = api.call(api.http.post(format!("{}/v1/tokens", api.base)).json(&body)).await?;
    println!("{}", answer["token"].as_str().unwrap_or(""));
    if let Some(ms) = answer["expires_at_ms"].as_u64() {
        eprintln!("expires {}", humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_millis(ms)));
    }
    Ok(())
}

/// `wharf token list`.
async fn list_tokens(output: Output, api: &ApiArgs) -> anyhow::Result<()> {
    let api = Api::new(api)?;
    let answer = api.get("/v1/tokens").await?;
    if output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&answer)?);
        return Ok(());
    }
    let mut rows = vec![vec!["ID".to_string(), "ROLE".to_string(), "CREATED".to_string(), "EXPIRES".to_string()]];
    for token in answer["tokens"].as_array().into_iter().flatten() {
        let role = &token["role"];
        let role = match role["kind"].as_str() {
            Some("admin") => "admin".to_string(),
            _ => {
                let namespaces: Vec<&str> = role["namespaces"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
                format!("{} in {}", if role["write"].as_bool() == Some(true) { "write" } else { "read" }, namespaces.join(","))
            }
        };
        let created = token["created_at_ms"].as_u64().map(|ms| humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_millis(ms)).to_string());
        let expires = match token["expires_at_ms"].as_u64() {
            None => "never".to_string(),
            Some(ms) => {
                let at = humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_millis(ms)).to_string();
                if token["expired"].as_bool() == Some(true) { format!("{at} (expired)") } else { at }
            }
        };
        rows.push(vec![token["id"].as_str().unwrap_or("").to_string(), role, created.unwrap_or_default(), expires]);
    }
    print_table(&rows);
    Ok(())
}

/// `wharf secret`: secrets per namespace. Values are write-only.
#[derive(clap::Subcommand)]
pub enum SecretCommand {
    /// Store a secret (the value from the argument, or from stdin with `-`).
    Set { name: String, value: String, #[command(flatten)] scope: KvScope },
    /// List the namespace's secrets (names only).
    List { #[command(flatten)] scope: KvScope },
    /// Delete a secret.
    Delete { name: String, #[command(flatten)] scope: KvScope },
}

pub async fn secret(command: SecretCommand) -> anyhow::Result<()> {
    match command {
        SecretCommand::Set { name, value, scope } => {
            let value = if value == "-" {
                let mut text = String::new();
                std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)?;
                text.trim_end_matches('\n').to_string()
            } else {
                value
            };
            let api = Api::new(&scope.api)?;
            api.call(api.http.put(format!("{}/v1/namespaces/{}/secrets/{name}", api.base, scope.namespace)).body(value)).await?;
            println!("secret {name} stored in namespace {}", scope.namespace);
        }
        SecretCommand::List { scope } => {
            let api = Api::new(&scope.api)?;
            let answer = api.get(&format!("/v1/namespaces/{}/secrets", scope.namespace)).await?;
            for name in answer["secrets"].as_array().into_iter().flatten() {
                println!("{}", name.as_str().unwrap_or(""));
            }
        }
        SecretCommand::Delete { name, scope } => {
            let api = Api::new(&scope.api)?;
            api.call(api.http.delete(format!("{}/v1/namespaces/{}/secrets/{name}", api.base, scope.namespace))).await?;
            println!("secret {name} deleted");
        }
    }
    Ok(())
}

/// Percent-encodes a key for one URL path segment.
fn encode_segment(key: &str) -> String {
    key.bytes()
        .map(|b| if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) { (b as char).to_string() } else { format!("%{b:02X}") })
        .collect()
}

#[derive(clap::Args)]
pub struct ScaleArgs {
    /// The service (`name` or `namespace/name`).
    name: String,
    /// Replicas wanted.
    replicas: u32,
    #[command(flatten)]
    api: ApiArgs,
}

#[derive(clap::Args)]
pub struct DeleteArgs {
    /// The service or job (`name` or `namespace/name`; they share the names of a namespace).
    name: String,
    #[command(flatten)]
    api: ApiArgs,
}

/// A thin JSON client for the API that turns every failure into a clear message.
pub(crate) struct Api {
    pub(crate) base: String,
    pub(crate) http: reqwest::Client,
    /// Whether a token is sent; without one, a 401 says where the CLI looked.
    has_token: bool,
}

impl Api {
    pub(crate) fn new(args: &ApiArgs) -> anyhow::Result<Api> {
        let mut headers = reqwest::header::HeaderMap::new();
        let token = args.token();
        let has_token = token.is_some();
        if let Some(token) = token
            && let Ok(mut value) = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
        {
            value.set_sensitive(true);
            headers.insert(reqwest::header::AUTHORIZATION, value);
        }
        let mut builder = reqwest::Client::builder().default_headers(headers);
        if let Some(path) = args.ca_cert() {
            let pem = std::fs::read(&path).with_context(|| format!("cannot read the CA certificate {} (--ca-cert, WHARF_CA_CERT)", path.display()))?;
            let roots = reqwest::Certificate::from_pem_bundle(&pem).with_context(|| format!("cannot read the CA certificate {}", path.display()))?;
            if roots.is_empty() {
                bail!("no certificate in {} (expected PEM: -----BEGIN CERTIFICATE-----)", path.display());
            }
            for root in roots {
                builder = builder.add_root_certificate(root);
            }
        }
        let http = builder.build().map_err(|e| anyhow::anyhow!("cannot set up the HTTP client: {}", error_chain(&e)))?;
        Ok(Api { base: args.api.trim_end_matches('/').to_string(), http, has_token })
    }

    /// Says why a request got no answer, with every cause (a TLS failure is
    /// only visible in the innermost one) and what to try.
    fn unreachable(&self, e: &reqwest::Error) -> anyhow::Error {
        let text = error_chain(e);
        let hint = if text.contains("CaUsedAsEndEntity") {
            "the API's certificate is a CA certificate (CA:TRUE, what `openssl req -x509` makes by default) used as a server certificate, which TLS clients refuse even when it is trusted: make one with `-addext basicConstraints=critical,CA:FALSE` (README, TLS)"
        } else if text.contains("certificate") {
            "the API's TLS certificate is not trusted: pass the CA that signed it with --ca-cert or WHARF_CA_CERT"
        } else if self.base.starts_with("http://") && !e.is_connect() && !e.is_timeout() {
            // Something answered, but not in plain HTTP: most likely TLS.
            "if the API is served over HTTPS, use an https:// URL (--api or WHARF_API)"
        } else {
            "is `wharf up` running? (set --api or WHARF_API)"
        };
        anyhow::anyhow!("cannot reach the Wharf API at {}: {text}; {hint}", self.base)
    }

    pub(crate) async fn call(&self, request: reqwest::RequestBuilder) -> anyhow::Result<Value> {
        let response = self.send(request).await?;
        Ok(response.json().await.unwrap_or(Value::Null))
    }

    /// Sends `request`; the response if it succeeded, else the API's error as a message.
    pub(crate) async fn send(&self, request: reqwest::RequestBuilder) -> anyhow::Result<reqwest::Response> {
        let response = request.send().await.map_err(|e| self.unreachable(&e))?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let body: Value = response.json().await.unwrap_or(Value::Null);
        if status == reqwest::StatusCode::UNAUTHORIZED && !self.has_token {
            let looked: Vec<String> = token_files().iter().map(|f| f.display().to_string()).collect();
            bail!(
                "the API needs a token and none was found: pass --token or set WHARF_TOKEN (e.g. export WHARF_TOKEN=$(cat <data-dir>/admin-token)); looked in {}",
                looked.join(", ")
            );
        }
        match body["error"]["message"].as_str() {
            Some(message) => bail!("{message} ({})", body["error"]["code"].as_str().unwrap_or("error")),
            None => bail!("the API answered {status}"),
        }
    }

    pub(crate) async fn upload(&self, file: &Path, namespace: &str) -> anyhow::Result<Digest> {
        let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
        self.upload_bytes(bytes, &file.display(), namespace).await
    }

    /// The digest of a manifest's component, uploading a file (relative to
    /// `base`) or a component pulled from its registry.
    pub(crate) async fn component(&self, component: &ComponentRef, base: &Path, registry: &crate::oci::RegistryArgs, namespace: &str) -> anyhow::Result<Digest> {
        match component {
            ComponentRef::File(path) => self.upload(&base.join(path), namespace).await,
            ComponentRef::Digest(digest) => Ok(digest.clone()),
            ComponentRef::Oci(reference) => self.upload_pulled(reference, registry, namespace).await,
        }
    }

    /// Pulls a component from its registry (digest checked) and uploads it.
    pub(crate) async fn upload_pulled(&self, reference: &wharf_proto::OciReference, registry: &crate::oci::RegistryArgs, namespace: &str) -> anyhow::Result<Digest> {
        let pulled = crate::oci::pull(reference, registry).await?;
        let digest = self.upload_bytes(pulled.bytes, reference, namespace).await?;
        if digest != pulled.digest {
            bail!("{reference}: the API stored {digest}, not the pulled {} (a bug)", pulled.digest);
        }
        eprintln!("pulled {reference} (manifest {}, component {digest})", pulled.manifest);
        Ok(digest)
    }

    /// Uploads a component for `namespace` (which then owns it).
    async fn upload_bytes(&self, bytes: Vec<u8>, what: &dyn std::fmt::Display, namespace: &str) -> anyhow::Result<Digest> {
        let body = self
            .call(self.http.post(format!("{}/v1/namespaces/{namespace}/artifacts", self.base)).header("content-type", "application/wasm").body(bytes))
            .await
            .with_context(|| format!("{what} was refused"))?;
        body["digest"].as_str().context("the API returned no digest")?.parse().context("the API returned a bad digest")
    }

    async fn put(&self, spec: &ServiceSpec, cause: &str, force: bool) -> anyhow::Result<Value> {
        let url = format!("{}/v1/namespaces/{}/services/{}", self.base, spec.namespace, spec.name);
        self.call(self.http.put(url).query(&[("cause", cause)]).query(&[("force", force)]).json(spec)).await
    }

    /// The stored spec of `id`, if the service exists.
    async fn existing(&self, id: &ServiceId) -> anyhow::Result<Option<ServiceSpec>> {
        let response = self.http.get(format!("{}{}", self.base, service_path(id))).send().await.map_err(|e| self.unreachable(&e))?;
        if response.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            bail!("{} ({})", body["error"]["message"].as_str().unwrap_or("the API refused to show the service"), status);
        }
        let spec = serde_json::from_value(body["service"]["spec"].clone()).context("the API returned an unreadable spec")?;
        Ok(Some(spec))
    }

    pub(crate) async fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.call(self.http.get(format!("{}{path}", self.base))).await
    }

}

/// Reads a stream of JSON lines (the API's `follow=true` answers) and hands
/// each to `each` until the server ends the stream; lines that are not JSON
/// are skipped.
pub(crate) async fn each_json_line(mut response: reqwest::Response, mut each: impl FnMut(Value)) -> anyhow::Result<()> {
    let mut pending: Vec<u8> = Vec::new();
    while let Some(chunk) = response.chunk().await.context("the stream from the API broke off")? {
        pending.extend_from_slice(&chunk);
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            if let Ok(value) = serde_json::from_slice::<Value>(&line) {
                each(value);
            }
        }
    }
    Ok(())
}

/// An error and its causes, outermost first, without repeats.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(inner) = cause {
        let message = inner.to_string();
        if !text.contains(&message) {
            text.push_str(": ");
            text.push_str(&message);
        }
        cause = inner.source();
    }
    text
}

pub(crate) fn service_path(id: &ServiceId) -> String {
    format!("/v1/namespaces/{}/services/{}", id.namespace, id.name)
}

pub(crate) fn parse_id(name: &str) -> anyhow::Result<ServiceId> {
    name.parse().with_context(|| format!("`{name}` is not a service name (`name` or `namespace/name`, lowercase letters, digits and '-')"))
}

/// How long `deploy`, `apply` and the rollout commands wait by default.
pub(crate) const READY_TIMEOUT: Duration = Duration::from_secs(300);

pub async fn deploy(args: DeployArgs) -> anyhow::Result<()> {
    let api = Api::new(&args.api)?;
    let oci = crate::oci::reference_in(&args.file)?;
    let name = name_for(args.name.as_ref(), &args.file, oci.as_ref()).context("cannot name the service from the file; pass --name")?;
    let id = ServiceId::new(args.namespace.clone(), name.clone()).with_context(|| format!("--name {name} / --namespace {}", args.namespace))?;
    // An existing service keeps whatever the flags do not set.
    let existing = api.existing(&id).await?;
    let mut spec = existing.clone().unwrap_or_else(|| {
        let mut spec = ServiceSpec::new(name, Digest::of(b""));
        spec.namespace = args.namespace.clone();
        spec
    });
    apply_flags(&args, &mut spec)?;
    spec.source = oci.clone();
    spec.validate()?;
    let digest = match &oci {
        Some(reference) => api.upload_pulled(reference, &args.registry, &spec.namespace).await?,
        None => api.upload(&args.file, &spec.namespace).await?,
    };
    spec.component = digest.clone();
    if let Some(percent) = args.canary {
        if existing.is_none() {
            bail!("--canary needs a service already running to split traffic with; deploy it first without --canary");
        }
        spec.traffic = vec![
            wharf_proto::TrafficTarget { revision: Some(current_stable(&api, &id).await?), latest: false, percent: 100 - percent.min(99) },
            wharf_proto::TrafficTarget { revision: None, latest: true, percent: percent.min(99) },
        ];
    } else {
        spec.traffic.clear();
    }
    let view = api.put(&spec, "deploy", args.force).await?;
    println!(
        "{} {id}: revision {} (component {})",
        view["result"].as_str().unwrap_or("deployed"),
        view["service"]["revision"],
        digest.short()
    );
    if !args.no_wait {
        crate::rollout::wait(&api, &id, READY_TIMEOUT).await?;
        println!("{id}: rolled out");
    }
    Ok(())
}

/// The name `--name` gives, else one made from the component's file or
/// repository name (lowercase, `-` for `_` and `.`).
pub(crate) fn name_for(given: Option<&String>, file: &Path, oci: Option<&wharf_proto::OciReference>) -> Option<String> {
    match (given, oci) {
        (Some(name), _) => Some(name.clone()),
        (None, Some(reference)) => Some(reference.name().replace(['_', '.'], "-")),
        (None, None) => file.file_stem().map(|s| s.to_string_lossy().to_ascii_lowercase().replace('_', "-")),
    }
}

/// The stable revision of `id`, which a canary splits traffic with.
async fn current_stable(api: &Api, id: &ServiceId) -> anyhow::Result<u64> {
    let status = api.get(&format!("{}/rollout", service_path(id))).await?;
    match status["rollout"]["stable"].as_u64().filter(|n| *n != 0) {
        Some(stable) => Ok(stable),
        None => bail!("{id} has no stable revision yet (its first rollout has not finished); wait for it, then deploy the canary"),
    }
}

/// Sets on `spec` what the deploy flags set, and nothing else.
fn apply_flags(args: &DeployArgs, spec: &mut ServiceSpec) -> anyhow::Result<()> {
    if let Some(replicas) = args.replicas {
        spec.replicas = replicas;
    }
    if !args.routes.is_empty() {
        spec.routes = args.routes.iter().map(|p| Route { host: None, path_prefix: p.clone() }).collect();
    }
    if let Some(memory) = args.memory {
        spec.limits.memory = memory;
    }
    if let Some(fuel) = &args.fuel {
        spec.limits.fuel = if fuel.eq_ignore_ascii_case("unlimited") { None } else { Some(fuel.replace('_', "").parse().with_context(|| format!("--fuel {fuel}: not a number or `unlimited`"))?) };
    }
    if let Some(timeout) = &args.timeout {
        spec.limits.timeout = wharf_proto::units::parse_duration(timeout).with_context(|| format!("--timeout {timeout}"))?;
    }
    if let Some(concurrency) = args.concurrency {
        spec.limits.concurrency = concurrency;
    }
    if let Some(request) = args.memory_request {
        spec.limits.memory_request = Some(request);
    }
    if let Some(request) = args.instances_request {
        spec.limits.instances_request = Some(request);
    }
    if !args.env.is_empty() {
        spec.env = args.env.iter().cloned().collect();
    }
    if !args.allow_outbound.is_empty() {
        spec.allow_outbound = args.allow_outbound.clone();
    }
    if !args.placement.is_empty() {
        spec.placement.labels = args.placement.iter().cloned().collect();
    }
    if args.spread.is_some() {
        spec.placement.spread = args.spread.clone();
    }
    if !args.keyvalue.is_empty() {
        spec.keyvalue = args.keyvalue.clone();
    }
    if !args.triggers.is_empty() {
        spec.triggers = args
            .triggers
            .iter()
            .map(|t| match t.split_once('@') {
                Some((subject, stream)) => wharf_proto::Trigger { stream: Some(stream.to_string()), ..wharf_proto::Trigger::subject(subject) },
                None => wharf_proto::Trigger::subject(t),
            })
            .collect();
    }
    if !args.config.is_empty() {
        spec.config = args.config.iter().cloned().collect();
    }
    if !args.secrets.is_empty() {
        spec.secrets = args.secrets.clone();
    }
    if !args.volumes.is_empty() {
        spec.volumes = args
            .volumes
            .iter()
            .map(|v| match v.split_once(':') {
                Some((name, path)) => wharf_proto::Volume { name: name.to_string(), path: path.to_string() },
                None => wharf_proto::Volume { name: v.clone(), path: "/data".to_string() },
            })
            .collect();
    }
    if let Some(path) = &args.readiness {
        spec.health.readiness = Some(wharf_proto::Readiness::new(path.clone()));
    }
    if let Some(surge) = args.max_surge {
        spec.rollout.max_surge = surge;
    }
    if let Some(unavailable) = args.max_unavailable {
        spec.rollout.max_unavailable = unavailable;
    }
    if let Some(deadline) = &args.progress_deadline {
        spec.rollout.progress_deadline = wharf_proto::units::parse_duration(deadline).with_context(|| format!("--progress-deadline {deadline}"))?;
    }
    let autoscaled = args.min.is_some()
        || args.max.is_some()
        || args.target_concurrency.is_some()
        || args.target_rps.is_some()
        || args.scale_down_delay.is_some()
        || args.scale_to_zero_after.is_some();
    if autoscaled {
        // Flags given change the policy (the existing one, or the defaults).
        let min = args.min.or(spec.autoscale.as_ref().map(|a| a.min)).unwrap_or(0);
        let max = args.max.or(spec.autoscale.as_ref().map(|a| a.max)).unwrap_or(min.max(10));
        let mut policy = spec.autoscale.clone().unwrap_or_else(|| wharf_proto::Autoscale::new(min, max));
        policy.min = min;
        policy.max = max;
        if args.target_concurrency.is_some() || args.target_rps.is_some() {
            policy.target_concurrency = args.target_concurrency;
            policy.target_rps = args.target_rps;
        }
        if let Some(delay) = &args.scale_down_delay {
            policy.scale_down_delay = wharf_proto::units::parse_duration(delay).with_context(|| format!("--scale-down-delay {delay}"))?;
        }
        if let Some(idle) = &args.scale_to_zero_after {
            policy.scale_to_zero_after = wharf_proto::units::parse_duration(idle).with_context(|| format!("--scale-to-zero-after {idle}"))?;
        }
        spec.autoscale = Some(policy);
        if args.replicas.is_none() {
            spec.replicas = min;
        }
    }
    Ok(())
}

pub async fn apply(args: ApplyArgs) -> anyhow::Result<()> {
    let api = Api::new(&args.api)?;
    let format = ManifestFormat::from_path(&args.file)?;
    let text = std::fs::read_to_string(&args.file).with_context(|| format!("cannot read {}", args.file.display()))?;
    let manifest = parse_apply_manifest(&text, format).with_context(|| format!("{} is not a valid manifest", args.file.display()))?;
    let base = args.file.parent().map(Path::to_path_buf).unwrap_or_default();
    // Every file must exist before anything is uploaded.
    let services = manifest.services.iter().map(|m| &m.component).enumerate().map(|(i, c)| (format!("services[{i}]"), c));
    let jobs = manifest.jobs.iter().map(|m| &m.component).enumerate().map(|(i, c)| (format!("jobs[{i}]"), c));
    for (entry, component) in services.chain(jobs) {
        if let ComponentRef::File(path) = component
            && !base.join(path).is_file()
        {
            bail!("{entry}.component.file: {} does not exist", base.join(path).display());
        }
    }
    // Upload every component (refused ones stop the apply before anything is written).
    let mut specs = Vec::new();
    for service in manifest.services {
        let digest = api.component(&service.component, &base, &args.registry, &service.namespace).await?;
        specs.push(service.into_spec(digest));
    }
    let mut jobs = Vec::new();
    for job in manifest.jobs {
        let digest = api.component(&job.component, &base, &args.registry, &job.namespace).await?;
        jobs.push(job.with_component(digest));
    }
    let mut ids = Vec::new();
    for spec in &specs {
        let view = api.put(spec, "apply", args.force).await.with_context(|| format!("service {}", spec.id()))?;
        println!("{} {}: revision {}", spec.id(), view["result"].as_str().unwrap_or("applied"), view["service"]["revision"]);
        ids.push(spec.id());
    }
    for job in &jobs {
        // A one-off job runs when it is new or changed, so applying again runs nothing.
        let view = crate::jobs::put(&api, job, None).await?;
        let ran = if view["run_requested"] == true { format!(", run requested (#{})", view["requested"]) } else { String::new() };
        println!("job {} {}{ran}", job.id(), view["result"].as_str().unwrap_or("applied"));
    }
    if !args.no_wait && !ids.is_empty() {
        for id in &ids {
            crate::rollout::wait(&api, id, READY_TIMEOUT).await?;
        }
        println!("all rolled out");
    }
    Ok(())
}

pub async fn get(what: GetWhat) -> anyhow::Result<()> {
    match what {
        GetWhat::Services { name, namespace, output, api } => {
            let api = Api::new(&api)?;
            // One service prints as an object, a listing as an array.
            let (views, json) = match name {
                Some(name) => {
                    let view = api.get(&service_path(&parse_id(&name)?)).await?;
                    (vec![view.clone()], view)
                }
                None => {
                    let path = match &namespace {
                        Some(ns) => format!("/v1/namespaces/{ns}/services"),
                        None => "/v1/services".to_string(),
                    };
                    let list = api.get(&path).await?["services"].clone();
                    (list.as_array().cloned().unwrap_or_default(), list)
                }
            };
            if output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&json)?);
                return Ok(());
            }
            let mut rows = vec![vec!["SERVICE", "READY", "REV", "ROLLOUT", "IN FLIGHT", "RPS", "ROUTES", "COMPONENT", "SOURCE", "LAST ERROR"].into_iter().map(String::from).collect()];
            for view in &views {
                let spec = &view["service"]["spec"];
                let status = &view["status"];
                let mut routes: Vec<String> = spec["routes"].as_array().into_iter().flatten().map(|r| format!("{}{}", r["host"].as_str().unwrap_or(""), r["path_prefix"].as_str().unwrap_or(""))).collect();
                // Message triggers are ways in too: `msg:SUBJECT[@STREAM]`.
                routes.extend(spec["triggers"].as_array().into_iter().flatten().map(|t| match t["stream"].as_str() {
                    Some(stream) => format!("msg:{}@{stream}", t["subject"].as_str().unwrap_or("")),
                    None => format!("msg:{}", t["subject"].as_str().unwrap_or("")),
                }));
                rows.push(vec![
                    format!("{}/{}", spec["namespace"].as_str().unwrap_or(""), spec["name"].as_str().unwrap_or("")),
                    format!("{}/{}", status["ready"], status["desired"]),
                    view["service"]["revision"].to_string(),
                    rollout_column(&status["rollout"]),
                    status["in_flight"].to_string(),
                    format!("{:.1}", status["rps"].as_f64().unwrap_or(0.0)),
                    if routes.is_empty() { "-".into() } else { routes.join(",") },
                    spec["component"].as_str().map(|d| d.chars().take(19).collect()).unwrap_or_default(),
                    spec["source"].as_str().unwrap_or("upload").to_string(),
                    status["last_error"].as_str().unwrap_or("").to_string(),
                ]);
            }
            print_table(&rows);
        }
        GetWhat::Jobs { name, namespace, output, api } => crate::jobs::get(name, namespace, output, &api).await?,
        GetWhat::Hosts { output, api } => {
            let api = Api::new(&api)?;
            let hosts = api.get("/v1/hosts").await?;
            if output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&hosts)?);
                return Ok(());
            }
            let mut rows = vec![vec!["HOST", "READY", "ADDR", "REPLICAS", "IN FLIGHT", "LABELS"].into_iter().map(String::from).collect()];
            for host in hosts["hosts"].as_array().into_iter().flatten() {
                let replicas = host["replicas"].as_array().map_or(0, Vec::len);
                let in_flight: u64 = host["replicas"].as_array().into_iter().flatten().filter_map(|r| r["in_flight"].as_u64()).sum();
                let labels: BTreeMap<String, Value> = serde_json::from_value(host["labels"].clone()).unwrap_or_default();
                rows.push(vec![
                    host["id"].as_str().unwrap_or("").to_string(),
                    if host["ready"].as_bool() == Some(true) { "yes".into() } else { format!("no (silent {} ms)", host["last_seen_ms"]) },
                    host["addr"].as_str().unwrap_or("-").to_string(),
                    replicas.to_string(),
                    in_flight.to_string(),
                    labels.iter().map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or(""))).collect::<Vec<_>>().join(","),
                ]);
            }
            print_table(&rows);
        }
    }
    Ok(())
}

/// A rollout in a few words: `complete`, `progressing`, `canary 1:90% 2:10%`, `failed (r3) -> r2`.
fn rollout_column(rollout: &Value) -> String {
    let phase = rollout["phase"].as_str().unwrap_or("-");
    let traffic: Vec<String> = rollout["traffic"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|w| format!("{}:{}%", w["revision"], w["percent"]))
        .collect();
    match phase {
        "failed" => format!("failed (r{}) -> r{}", rollout["failed"]["revision"], rollout["stable"]),
        _ if traffic.len() > 1 => format!("{phase} {}", traffic.join(" ")),
        _ => phase.to_string(),
    }
}

#[derive(clap::Args)]
pub struct TopArgs {
    /// Refresh interval.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// Print once and exit.
    #[arg(long)]
    once: bool,
    #[command(flatten)]
    api: ApiArgs,
}

/// `wharf top`: services with their load and the autoscaler's view, and hosts, refreshed.
pub async fn top(args: TopArgs) -> anyhow::Result<()> {
    let api = Api::new(&args.api)?;
    loop {
        let services = api.get("/v1/services").await?;
        let hosts = api.get("/v1/hosts").await?;
        let mut rows = vec![vec!["SERVICE", "READY", "IN FLIGHT", "RPS", "AUTOSCALE"].into_iter().map(String::from).collect()];
        for view in services["services"].as_array().into_iter().flatten() {
            let spec = &view["service"]["spec"];
            let status = &view["status"];
            let auto = &status["autoscale"];
            let autoscale = if auto.is_null() {
                "fixed".to_string()
            } else {
                format!("load {:.1} (burst {:.1}){}: {}", auto["stable_load"].as_f64().unwrap_or(0.0), auto["panic_load"].as_f64().unwrap_or(0.0), if auto["panicking"] == true { " PANIC" } else { "" }, auto["reason"].as_str().unwrap_or(""))
            };
            rows.push(vec![
                format!("{}/{}", spec["namespace"].as_str().unwrap_or(""), spec["name"].as_str().unwrap_or("")),
                format!("{}/{}", status["ready"], status["desired"]),
                status["in_flight"].to_string(),
                format!("{:.1}", status["rps"].as_f64().unwrap_or(0.0)),
                autoscale,
            ]);
        }
        rows.push(Vec::new());
        rows.push(vec!["HOST", "READY", "REPLICAS", "IN FLIGHT", ""].into_iter().map(String::from).collect());
        for host in hosts["hosts"].as_array().into_iter().flatten() {
            let replicas = host["replicas"].as_array().map_or(0, Vec::len);
            let in_flight: u64 = host["replicas"].as_array().into_iter().flatten().filter_map(|r| r["in_flight"].as_u64()).sum();
            rows.push(vec![host["id"].as_str().unwrap_or("").to_string(), (if host["ready"] == true { "yes" } else { "no" }).to_string(), replicas.to_string(), in_flight.to_string(), String::new()]);
        }
        if !args.once {
            print!("\x1b[2J\x1b[H");
        }
        print_table(&rows);
        if args.once {
            return Ok(());
        }
        tokio::time::sleep(args.interval).await;
    }
}

pub async fn scale(args: ScaleArgs) -> anyhow::Result<()> {
    let api = Api::new(&args.api)?;
    let id = parse_id(&args.name)?;
    let url = format!("{}{}/scale", api.base, service_path(&id));
    api.call(api.http.post(url).json(&json!({"replicas": args.replicas}))).await?;
    println!("{id} scaled to {} replica(s)", args.replicas);
    Ok(())
}

pub async fn delete(args: DeleteArgs) -> anyhow::Result<()> {
    let api = Api::new(&args.api)?;
    let id = parse_id(&args.name)?;
    let job = format!("{}/v1/namespaces/{}/jobs/{}", api.base, id.namespace, id.name);
    let is_job = api.http.get(&job).send().await.map_err(|e| api.unreachable(&e))?.status().is_success();
    if is_job {
        api.call(api.http.delete(job)).await?;
        println!("job {id} deleted (its running attempts are stopped)");
        return Ok(());
    }
    api.call(api.http.delete(format!("{}{}", api.base, service_path(&id)))).await?;
    println!("{id} deleted");
    Ok(())
}

pub(crate) fn print_table(rows: &[Vec<String>]) {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns).map(|c| rows.iter().filter_map(|r| r.get(c)).map(|s| s.chars().count()).max().unwrap_or(0)).collect();
    for row in rows {
        let line: Vec<String> = row.iter().enumerate().map(|(c, cell)| format!("{cell:<width$}", width = widths[c])).collect();
        println!("{}", line.join("  ").trim_end());
    }
}
