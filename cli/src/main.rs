//! `wharf`: the one binary. Parses arguments and hands each command to the
//! crate that does the work; no orchestration logic lives here.

use clap::{Parser, Subcommand};
use std::process::ExitCode;

mod client;
mod cluster;
mod events;
mod jobs;
mod logs;
mod nats_certs;
mod nats_identity;
mod nats_pins;
mod rollout;
mod oci;
mod serve;
mod telemetry;
mod tenancy;
mod at_rest;
mod up;
mod wiring;

/// Wharf: an orchestrator for WebAssembly (wasi:http) microservices.
#[derive(Parser)]
#[command(name = "wharf", version, about, long_about = None, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log filter (also RUST_LOG), e.g. `info`, `wharf_host=debug`.
    #[arg(long, global = true, default_value = "info", env = "WHARF_LOG")]
    log: String,
    /// Export the request path's spans (ingress, hops between hosts, calls between services,
    /// instantiation, the guest) to this OpenTelemetry collector over OTLP/HTTP
    /// (e.g. http://127.0.0.1:4318); W3C traceparent headers are honoured and passed on.
    /// Without it nothing is exported.
    #[arg(long, global = true, env = "OTEL_EXPORTER_OTLP_ENDPOINT", value_name = "URL")]
    otlp_endpoint: Option<String>,
}

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant, reason = "parsed once per process")]
enum Command {
    /// Run a one-node cluster: control plane, host and ingress in this process.
    Up(up::Args),
    /// Run the control plane (API, controller) over NATS.
    Scheduler(cluster::SchedulerArgs),
    /// Run a worker host over NATS: runs its assigned replicas and serves every route.
    Host(cluster::HostArgs),
    /// Upload a component (a file, or oci://REGISTRY/REPOSITORY:TAG) and create or replace its service.
    Deploy(client::DeployArgs),
    /// Run a wasi:cli/run component to completion in the cluster (a job), once or on a schedule.
    Run(jobs::RunArgs),
    /// Create or update the services a manifest describes (YAML, TOML or JSON).
    Apply(client::ApplyArgs),
    /// Publish a component to an OCI registry (the wasm OCI artifact layout).
    Push(oci::PushArgs),
    /// List services or hosts.
    #[command(subcommand)]
    Get(client::GetWhat),
    /// Read and write services' key-value data (wasi:keyvalue buckets).
    #[command(subcommand)]
    Kv(client::KvCommand),
    /// Namespaces and their quotas (replicas, memory, requests/s).
    #[command(subcommand)]
    Namespace(client::NamespaceCommand),
    /// Create, list and revoke API tokens: bound to namespaces (read, or --write), or admin.
    #[command(subcommand)]
    Token(client::TokenCommand),
    /// A namespace's components: list them, delete one.
    #[command(subcommand)]
    Artifact(tenancy::ArtifactCommand),
    /// Host names and path prefixes owned by namespaces: claim, grant (admin), release, list.
    #[command(subcommand)]
    Domain(tenancy::DomainCommand),
    /// Store, list and delete secrets (granted to services with --secret).
    #[command(subcommand)]
    Secret(client::SecretCommand),
    /// Live load per service and host, and the autoscaler's decisions.
    Top(client::TopArgs),
    /// Change a service's replica count.
    Scale(client::ScaleArgs),
    /// Revisions and rollouts: status, history, undo, canary, promote, abort.
    #[command(subcommand)]
    Rollout(rollout::RolloutCommand),
    /// Print a service's log lines from every replica on every host (-f to follow).
    Logs(logs::LogsArgs),
    /// Show everything known about a service: spec, revisions, replicas, load and recent events.
    #[command(subcommand)]
    Describe(events::DescribeWhat),
    /// List what the control plane did and why (placements, failures, retries, moves, scaling, rollouts).
    Events(events::EventsArgs),
    /// Delete a service (its replicas stop, its routes go) or a job (its running attempts stop).
    Delete(client::DeleteArgs),
    /// Serve one component over HTTP with no control plane (the development loop).
    Serve(serve::Args),
    /// NATS helpers: certificates for NATS over mutual TLS (certs), hosts' own NATS identities
    /// (add-host, remove-host).
    #[command(subcommand)]
    Nats(nats_identity::NatsCommand),
}

/// jemalloc, not glibc's malloc: glibc gives each thread that allocates an
/// arena of its own and keeps each arena's high-water mark, so the control
/// loop's thread (scheduler `spawn_control_loop`) held about 200 MiB more
/// at rest after its passes over 10,000 services. jemalloc's background
/// thread returns pages freed for a while (its decay, 10 s) to the system.
/// Measured in bench/RESULTS.md ("The allocator"): a third of the memory
/// at rest, and no slower to serve or to wake; mimalloc gave the memory
/// back too but woke services more slowly.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Held to the end of `main`: dropping it flushes spans still to be exported.
    let _telemetry = telemetry::init(&cli.log, cli.otlp_endpoint.as_deref());
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: could not start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Up(args) => up::run(args, shutdown_signal()).await,
            Command::Scheduler(args) => cluster::scheduler(args, shutdown_signal()).await,
            Command::Host(args) => cluster::host(args, shutdown_signal()).await,
            Command::Deploy(args) => client::deploy(args).await,
            Command::Run(args) => jobs::run(args).await,
            Command::Apply(args) => client::apply(args).await,
            Command::Push(args) => oci::push(args).await,
            Command::Get(what) => client::get(what).await,
            Command::Top(args) => client::top(args).await,
            Command::Kv(command) => client::kv(command).await,
            Command::Secret(command) => client::secret(command).await,
            Command::Artifact(command) => tenancy::artifact(command).await,
            Command::Domain(command) => tenancy::domain(command).await,
            Command::Token(command) => client::token(command).await,
            Command::Namespace(command) => client::namespace(command).await,
            Command::Scale(args) => client::scale(args).await,
            Command::Rollout(command) => rollout::rollout(command).await,
            Command::Logs(args) => logs::logs(args).await,
            Command::Describe(what) => events::describe(what).await,
            Command::Events(args) => events::events(args).await,
            Command::Delete(args) => client::delete(args).await,
            Command::Serve(args) => serve::run(args, shutdown_signal()).await,
            Command::Nats(command) => nats_identity::run(command),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // `wharf run` ends with the job's own exit code.
        Err(e) if e.downcast_ref::<jobs::JobExit>().is_some() => {
            eprintln!("wharf: {e}");
            e.downcast_ref::<jobs::JobExit>().map_or(ExitCode::FAILURE, |exit| ExitCode::from(exit.code))
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::warn!("cannot listen for Ctrl-C: {e}");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                tracing::warn!("cannot listen for SIGTERM: {e}");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutting down");
}
