//! `wharf artifact` and `wharf domain`: what a namespace owns — the
//! components it uploaded, and the host names and path prefixes its routes
//! may use.

use crate::client::{Api, ApiArgs, Output, print_table};
use serde_json::{Value, json};

/// `wharf artifact`: a namespace's components.
#[derive(clap::Subcommand)]
pub enum ArtifactCommand {
    /// List the namespace's components: digest, size, the services that run them.
    #[command(visible_alias = "ls")]
    List {
        #[arg(long, short = 'n', default_value = "default")]
        namespace: String,
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Output,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Delete a component of the namespace (refused while a service runs it or keeps it in a revision).
    Rm {
        /// The component's digest (sha256:...), as `wharf artifact list` shows it, or a .wasm
        /// file whose digest it is.
        digest: String,
        #[arg(long, short = 'n', default_value = "default")]
        namespace: String,
        #[command(flatten)]
        api: ApiArgs,
    },
}

pub async fn artifact(command: ArtifactCommand) -> anyhow::Result<()> {
    match command {
        ArtifactCommand::List { namespace, output, api } => {
            let api = Api::new(&api)?;
            let answer = api.get(&format!("/v1/namespaces/{namespace}/artifacts")).await?;
            if output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&answer)?);
                return Ok(());
            }
            let mut rows = vec![vec!["DIGEST".to_string(), "SIZE".to_string(), "USED BY".to_string()]];
            for artifact in answer["artifacts"].as_array().into_iter().flatten() {
                let used: Vec<&str> = artifact["used_by"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
                let size = artifact["size"].as_u64().map(|b| wharf_proto::ByteSize(b).to_string()).unwrap_or_default();
                rows.push(vec![artifact["digest"].as_str().unwrap_or("").to_string(), size, if used.is_empty() { "-".to_string() } else { used.join(",") }]);
            }
            print_table(&rows);
        }
        ArtifactCommand::Rm { digest, namespace, api } => {
            let digest = match digest.parse::<wharf_proto::Digest>() {
                Ok(parsed) => parsed.to_string(),
                Err(not_digest) => match std::fs::read(&digest) {
                    Ok(bytes) => wharf_proto::Digest::of(&bytes).to_string(),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => anyhow::bail!("{not_digest}, and no file {digest} exists either"),
                    Err(e) => anyhow::bail!("cannot read {digest}: {e}"),
                },
            };
            let api = Api::new(&api)?;
            let answer = api.call(api.http.delete(format!("{}/v1/namespaces/{namespace}/artifacts/{digest}", api.base))).await?;
            let gone = if answer["bytes_removed"].as_bool() == Some(true) { " (its bytes removed)" } else { " (its bytes stay: another namespace or service still has them)" };
            println!("component {} deleted from namespace {namespace}{gone}", answer["deleted"].as_str().unwrap_or(&digest));
        }
    }
    Ok(())
}

/// `wharf domain`: host names and path prefixes owned by namespaces.
#[derive(clap::Subcommand)]
pub enum DomainCommand {
    /// Claim a host name (or with --path, a path prefix of routes that name no host) for the namespace: first come.
    Claim(DomainArgs),
    /// Give a host name or path prefix to the namespace, whoever claimed it (admin only; refused while another namespace routes it).
    Grant(DomainArgs),
    /// Give a claim of the namespace up (refused while its services route there).
    Release(DomainArgs),
    /// List the namespace's claims (every namespace's with --all, admin only).
    #[command(visible_alias = "ls")]
    List {
        #[arg(long, short = 'n', default_value = "default")]
        namespace: String,
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
}

#[derive(clap::Args)]
pub struct DomainArgs {
    /// The host name (e.g. shop.example.com), or with --path a path prefix (e.g. /shop).
    target: String,
    /// The target is a path prefix of routes that name no host.
    #[arg(long)]
    path: bool,
    #[arg(long, short = 'n', default_value = "default")]
    namespace: String,
    #[command(flatten)]
    api: ApiArgs,
}

impl DomainArgs {
    fn body(&self) -> Value {
        if self.path { json!({"path_prefix": self.target}) } else { json!({"host": self.target}) }
    }
}

pub async fn domain(command: DomainCommand) -> anyhow::Result<()> {
    match command {
        DomainCommand::Claim(args) => post(&args, false).await?,
        DomainCommand::Grant(args) => post(&args, true).await?,
        DomainCommand::Release(args) => {
            let api = Api::new(&args.api)?;
            let key = if args.path { "path_prefix" } else { "host" };
            api.call(api.http.delete(format!("{}/v1/namespaces/{}/claims", api.base, args.namespace)).query(&[(key, &args.target)])).await?;
            println!("{} released by namespace {}", args.target, args.namespace);
        }
        DomainCommand::List { namespace, all, api } => {
            let api = Api::new(&api)?;
            let answer = if all { api.get("/v1/claims").await? } else { api.get(&format!("/v1/namespaces/{namespace}/claims")).await? };
            let mut rows = vec![vec!["TARGET".to_string(), "NAMESPACE".to_string(), "HOW".to_string(), "BY".to_string()]];
            for claim in answer["claims"].as_array().into_iter().flatten() {
                let target = &claim["target"];
                let target = target["host"].as_str().map(str::to_string).or_else(|| target["path_prefix"].as_str().map(|p| format!("path {p}"))).unwrap_or_default();
                rows.push(vec![target, claim["namespace"].as_str().unwrap_or("").to_string(), claim["how"].as_str().unwrap_or("").to_string(), claim["by"].as_str().unwrap_or("").to_string()]);
            }
            print_table(&rows);
        }
    }
    Ok(())
}

async fn post(args: &DomainArgs, grant: bool) -> anyhow::Result<()> {
    let api = Api::new(&args.api)?;
    let mut body = args.body();
    body["grant"] = json!(grant);
    let answer = api.call(api.http.post(format!("{}/v1/namespaces/{}/claims", api.base, args.namespace)).json(&body)).await?;
    let owner = answer["claim"]["namespace"].as_str().unwrap_or(&args.namespace);
    println!("{} belongs to namespace {owner} ({})", args.target, answer["claim"]["how"].as_str().unwrap_or(if grant { "granted" } else { "claimed" }));
    Ok(())
}
