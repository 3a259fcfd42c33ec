//! `wharf run` (a `wasi:cli/run` component run to completion somewhere in
//! the cluster, once or on a schedule) and `wharf get jobs` (jobs and the
//! history of their runs), through the jobs API.

use crate::client::{Api, ApiArgs, Output, print_table};
use anyhow::{Context, bail};
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;
use wharf_proto::job::{ConcurrencyPolicy, JobHistory, JobRun, RunCause, RunState, StoredJob};
use wharf_proto::{ByteSize, ComponentRef, Digest, JobSpec, ManifestFormat, ServiceId, parse_job_manifest};

/// How often `wharf run` looks at the run and its new log lines.
const POLL: Duration = Duration::from_millis(250);

/// The job's exit code, when `wharf run` ends with it: `main` exits with it.
#[derive(Debug)]
pub struct JobExit {
    pub job: ServiceId,
    pub run: u64,
    pub code: u8,
    pub reason: String,
}

impl std::fmt::Display for JobExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "job {} run {}: {}", self.job, self.run, self.reason)
    }
}

impl std::error::Error for JobExit {}

#[derive(clap::Args)]
#[command(after_help = "The component must export wasi:cli/run (a command: for Rust, a binary with `fn main` \
built for wasm32-wasip2). It runs on a host the scheduler picks, under its limits (memory, fuel, a \
deadline), in a fresh instance per attempt. `wharf run` prints its output as it comes (stdout to \
stdout, stderr to stderr) and exits with its exit code (WASI 0.2 reports success or failure, so a \
failing job exits 1); killed by a limit, it exits 1 and says which.\n\n\
With --schedule (cron: five fields, or six with seconds first) or --every, the job is periodic and \
`wharf run` returns once it is stored. `wharf get jobs` lists jobs and their runs; `wharf logs NAME` \
prints a job's output (revision = run, replica = attempt).\n\n\
Examples:\n  wharf run report.wasm -- --since 1d\n  \
wharf run flaky.wasm --retries 3 --backoff 2s\n  \
wharf run cleanup.wasm --schedule \"*/5 * * * *\" --time-zone Europe/Berlin\n  \
wharf run tick.wasm --every 10s --concurrency-policy replace\n  \
wharf run -f nightly.yaml --detach")]
pub struct RunArgs {
    /// The component: a file, or oci://REGISTRY/REPOSITORY:TAG.
    #[arg(required_unless_present = "manifest")]
    component: Option<PathBuf>,
    /// A job manifest (YAML, TOML or JSON: one job, or a list under `jobs`) instead of a component and flags.
    #[arg(short = 'f', long = "file", value_name = "MANIFEST", conflicts_with = "component")]
    manifest: Option<PathBuf>,
    #[command(flatten)]
    registry: crate::oci::RegistryArgs,
    /// The job's name (a DNS label); default: the file's name.
    #[arg(long)]
    name: Option<String>,
    /// The namespace.
    #[arg(long, short = 'n', default_value = "default")]
    namespace: String,
    /// Attempts after the first when one fails (exits non-zero, traps, or hits a limit).
    #[arg(long)]
    retries: Option<u32>,
    /// Wait before the first retry, doubling for each further one (e.g. 1s).
    #[arg(long, value_name = "DURATION")]
    backoff: Option<String>,
    /// Run periodically on this cron schedule (e.g. "*/5 * * * *", or "*/2 * * * * *" with seconds).
    #[arg(long, value_name = "CRON")]
    schedule: Option<String>,
    /// The IANA time zone of --schedule (default UTC).
    #[arg(long, value_name = "ZONE")]
    time_zone: Option<String>,
    /// Run periodically every DURATION (e.g. 30s), counted from the Unix epoch.
    #[arg(long, value_name = "DURATION", conflicts_with = "schedule")]
    every: Option<String>,
    /// What a periodic job does when a run is due while one still runs.
    #[arg(long, value_enum)]
    concurrency_policy: Option<Policy>,
    /// Linear-memory cap of the instance (default 64MiB).
    #[arg(long)]
    memory: Option<ByteSize>,
    /// Fuel for the whole attempt, or `unlimited` (the default).
    #[arg(long)]
    fuel: Option<String>,
    /// Deadline of one attempt (default 10m).
    #[arg(long, value_name = "DURATION")]
    timeout: Option<String>,
    /// Environment variable KEY=VALUE. Repeatable.
    #[arg(long = "env", value_name = "KEY=VALUE", value_parser = crate::wiring::parse_pair)]
    env: Vec<(String, String)>,
    /// Outbound host the component may call. Repeatable.
    #[arg(long = "allow-outbound", value_name = "HOST")]
    allow_outbound: Vec<String>,
    /// A wasi:keyvalue bucket the component may open (in its namespace). Repeatable.
    #[arg(long = "keyvalue", value_name = "BUCKET")]
    keyvalue: Vec<String>,
    /// Runtime configuration (wasi:config) as KEY=VALUE. Repeatable.
    #[arg(long = "config", value_name = "KEY=VALUE", value_parser = crate::wiring::parse_pair)]
    config: Vec<(String, String)>,
    /// Host label the job's host must have, KEY=VALUE. Repeatable.
    #[arg(long = "on", value_name = "KEY=VALUE", value_parser = crate::wiring::parse_pair)]
    placement: Vec<(String, String)>,
    /// Return at once with the job's name instead of waiting for the run.
    #[arg(long, short = 'd')]
    detach: bool,
    /// Arguments for the component (after `--`).
    #[arg(last = true)]
    args: Vec<String>,
    #[command(flatten)]
    api: ApiArgs,
}

/// `--concurrency-policy`.
#[derive(clap::ValueEnum, Debug, Clone, Copy)]
enum Policy {
    Forbid,
    Allow,
    Replace,
}

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let api = Api::new(&args.api)?;
    let specs = match &args.manifest {
        Some(manifest) => from_manifest(&api, manifest, &args.registry).await?,
        None => vec![from_flags(&api, &args).await?],
    };
    let mut waits = Vec::new();
    for spec in &specs {
        let id = spec.id();
        // `wharf run` runs a one-off job even when it is unchanged.
        let answer = put(&api, spec, Some(!spec.is_periodic())).await?;
        let requested = answer["requested"].as_u64().unwrap_or(0);
        if spec.is_periodic() {
            let next = answer["next_run_ms"].as_u64().map(|ms| humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_millis(ms)).to_string());
            println!("job {id}: scheduled ({}), next run {}", schedule_text(&spec.schedule, spec.every, &spec.time_zone), next.as_deref().unwrap_or("unknown"));
        } else if args.detach || specs.len() > 1 {
            println!("job {id}: run requested (#{requested}); `wharf get jobs {id}` shows it, `wharf logs {id}` its output");
        } else {
            waits.push((id, requested));
        }
    }
    match waits.pop() {
        Some((id, requested)) => wait(&api, &id, requested).await,
        None => Ok(()),
    }
}

/// Writes a job; `run` asks for a run (`None`: the API's default, a run
/// of a one-off job that is new or changed).
pub(crate) async fn put(api: &Api, spec: &JobSpec, run: Option<bool>) -> anyhow::Result<Value> {
    let url = format!("{}/v1/namespaces/{}/jobs/{}", api.base, spec.namespace, spec.name);
    let mut request = api.http.put(url).json(spec);
    if let Some(run) = run {
        request = request.query(&[("run", run)]);
    }
    api.call(request).await.with_context(|| format!("job {}", spec.id()))
}

/// The spec the flags describe; the component is uploaded.
async fn from_flags(api: &Api, args: &RunArgs) -> anyhow::Result<JobSpec> {
    let Some(component) = &args.component else { bail!("give a component, or a manifest with -f") };
    let oci = crate::oci::reference_in(component)?;
    let name = crate::client::name_for(args.name.as_ref(), component, oci.as_ref()).context("cannot name the job from the file; pass --name")?;
    let mut spec = JobSpec::new(name, Digest::of(b""));
    spec.namespace = args.namespace.clone();
    spec.args = args.args.clone();
    spec.env = args.env.iter().cloned().collect();
    spec.allow_outbound = args.allow_outbound.clone();
    spec.keyvalue = args.keyvalue.clone();
    spec.config = args.config.iter().cloned().collect();
    spec.placement.labels = args.placement.iter().cloned().collect();
    if let Some(retries) = args.retries {
        spec.retries = retries;
    }
    if let Some(backoff) = &args.backoff {
        spec.backoff = wharf_proto::units::parse_duration(backoff).with_context(|| format!("--backoff {backoff}"))?;
    }
    spec.schedule = args.schedule.clone();
    if let Some(zone) = &args.time_zone {
        spec.time_zone = zone.clone();
    }
    if let Some(every) = &args.every {
        spec.every = Some(wharf_proto::units::parse_duration(every).with_context(|| format!("--every {every}"))?);
    }
    if let Some(policy) = args.concurrency_policy {
        spec.concurrency_policy = match policy {
            Policy::Forbid => ConcurrencyPolicy::Forbid,
            Policy::Allow => ConcurrencyPolicy::Allow,
            Policy::Replace => ConcurrencyPolicy::Replace,
        };
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
    // Refuse a bad schedule or time zone before uploading anything.
    spec.validate()?;
    spec.component = match &oci {
        Some(reference) => api.upload_pulled(reference, &args.registry, &spec.namespace).await?,
        None => api.upload(component, &spec.namespace).await?,
    };
    Ok(spec)
}

/// The jobs a manifest describes; their components are uploaded once every one is found valid.
async fn from_manifest(api: &Api, manifest: &Path, registry: &crate::oci::RegistryArgs) -> anyhow::Result<Vec<JobSpec>> {
    let format = ManifestFormat::from_path(manifest)?;
    let text = std::fs::read_to_string(manifest).with_context(|| format!("cannot read {}", manifest.display()))?;
    let jobs = parse_job_manifest(&text, format).with_context(|| format!("{} is not a valid job manifest", manifest.display()))?;
    let base = manifest.parent().map(Path::to_path_buf).unwrap_or_default();
    for job in &jobs {
        if let ComponentRef::File(path) = &job.component
            && !base.join(path).is_file()
        {
            bail!("job {}: component.file {} does not exist", job.id(), base.join(path).display());
        }
    }
    let mut specs = Vec::new();
    for job in jobs {
        let digest = api.component(&job.component, &base, registry, &job.namespace).await?;
        specs.push(job.with_component(digest));
    }
    Ok(specs)
}

/// Waits for the run that serves request `requested` of job `id`, printing
/// its attempts' new log lines as they come; ends with the run's exit code.
async fn wait(api: &Api, id: &ServiceId, requested: u64) -> anyhow::Result<()> {
    let path = format!("/v1/namespaces/{}/jobs/{}", id.namespace, id.name);
    let mut printed: BTreeSet<(String, u32, u64)> = BTreeSet::new();
    let mut announced = 0u32;
    let mut waiting_for: Option<String> = None;
    loop {
        let view = api.get(&path).await?;
        let history: JobHistory = serde_json::from_value(view["history"].clone()).context("the API returned an unreadable history")?;
        let run = history.runs.iter().find(|r| r.cause == RunCause::Request { number: requested }).cloned();
        let Some(run) = run else {
            tokio::time::sleep(POLL).await;
            continue;
        };
        let finished = run.state.is_finished();
        if let Some(reason) = run.pending.as_ref().filter(|reason| waiting_for.as_ref() != Some(*reason)) {
            eprintln!("wharf: run {} waits for a host: {reason}", run.run);
            waiting_for = Some(reason.clone());
        }
        print_new_lines(api, id, run.run, &mut printed).await?;
        let seen = announced;
        for attempt in run.attempts.iter().filter(|a| a.attempt > seen && a.finished_ms.is_some()) {
            if !attempt.succeeded() {
                eprintln!("wharf: attempt {} of run {} failed: {}", attempt.attempt, run.run, attempt.error.as_deref().or(attempt.outcome.as_deref()).unwrap_or("unknown"));
            }
            announced = attempt.attempt;
        }
        if finished {
            return finish(id, &run);
        }
        tokio::time::sleep(POLL).await;
    }
}

fn finish(id: &ServiceId, run: &JobRun) -> anyhow::Result<()> {
    let attempts = run.attempts.len();
    match (run.state, run.exit_code()) {
        (RunState::Succeeded, _) => Ok(()),
        (_, Some(code)) => Err(JobExit { job: id.clone(), run: run.run, code: u8::try_from(code).unwrap_or(1).max(1), reason: format!("exited with code {code} after {attempts} attempt(s)") }.into()),
        _ => {
            let last = run.attempts.last().and_then(|a| a.error.clone().or(a.outcome.clone())).unwrap_or_else(|| format!("{:?}", run.state).to_lowercase());
            Err(JobExit { job: id.clone(), run: run.run, code: 1, reason: format!("failed after {attempts} attempt(s): {last}") }.into())
        }
    }
}

/// Prints the lines of run `run` not printed yet: stdout to stdout, stderr to stderr.
async fn print_new_lines(api: &Api, id: &ServiceId, run: u64, printed: &mut BTreeSet<(String, u32, u64)>) -> anyhow::Result<()> {
    let url = format!("{}/v1/namespaces/{}/jobs/{}/logs", api.base, id.namespace, id.name);
    let answer = api.call(api.http.get(url).query(&[("tail", "10000")])).await?;
    for record in answer["lines"].as_array().into_iter().flatten().filter(|r| r["revision"].as_u64() == Some(run)) {
        let key = (record["host"].as_str().unwrap_or("").to_string(), record["replica"].as_u64().and_then(|r| u32::try_from(r).ok()).unwrap_or(0), record["seq"].as_u64().unwrap_or(0));
        if !printed.insert(key) {
            continue;
        }
        let line = record["line"].as_str().unwrap_or("");
        if record["stream"].as_str() == Some("stderr") {
            eprintln!("{line}");
        } else {
            println!("{line}");
        }
    }
    Ok(())
}

fn schedule_text(schedule: &Option<String>, every: Option<Duration>, zone: &str) -> String {
    match (schedule, every) {
        (Some(cron), _) => format!("{cron} {zone}"),
        (None, Some(every)) => format!("every {}", wharf_proto::units::format_duration(every)),
        (None, None) => "-".into(),
    }
}

/// `wharf get jobs [NAME]`: each job, then its runs (newest first).
pub async fn get(name: Option<String>, namespace: Option<String>, output: Output, api: &ApiArgs) -> anyhow::Result<()> {
    let api = Api::new(api)?;
    let views: Vec<Value> = match &name {
        Some(name) => {
            let id = crate::client::parse_id(name)?;
            vec![api.get(&format!("/v1/namespaces/{}/jobs/{}", id.namespace, id.name)).await?]
        }
        None => {
            let path = namespace.as_ref().map_or_else(|| "/v1/jobs".to_string(), |ns| format!("/v1/namespaces/{ns}/jobs"));
            api.get(&path).await?["jobs"].as_array().cloned().unwrap_or_default()
        }
    };
    if output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&views)?);
        return Ok(());
    }
    let mut jobs = vec![["JOB", "SCHEDULE", "POLICY", "RETRIES", "RUNS", "SKIPPED", "NEXT RUN"].map(String::from).to_vec()];
    let mut runs = vec![["JOB", "RUN", "STATE", "START", "DURATION", "EXIT", "ATTEMPTS", "HOST", "ERROR"].map(String::from).to_vec()];
    for view in &views {
        let job: StoredJob = serde_json::from_value(view["job"].clone()).context("the API returned an unreadable job")?;
        let history: JobHistory = serde_json::from_value(view["history"].clone()).unwrap_or_default();
        let spec = &job.spec;
        let id = spec.id().to_string();
        jobs.push(vec![
            id.clone(),
            schedule_text(&spec.schedule, spec.every, &spec.time_zone),
            if spec.is_periodic() { format!("{:?}", spec.concurrency_policy).to_lowercase() } else { "-".into() },
            spec.retries.to_string(),
            history.last_run.to_string(),
            history.skipped.to_string(),
            view["next_run_ms"].as_u64().map_or("-".into(), time_text),
        ]);
        for run in history.runs.iter().rev() {
            let started = run.attempts.first().map(|a| a.started_ms);
            let ended = run.finished_ms.or_else(|| run.attempts.last().and_then(|a| a.finished_ms));
            runs.push(vec![
                id.clone(),
                run.run.to_string(),
                format!("{:?}", run.state).to_lowercase(),
                started.map_or("-".into(), time_text),
                match (started, ended) {
                    (Some(start), Some(end)) => wharf_proto::units::format_duration(Duration::from_millis(end.saturating_sub(start))),
                    _ => "-".into(),
                },
                run.exit_code().map_or("-".into(), |c| c.to_string()),
                run.attempts.len().to_string(),
                run.attempts.last().and_then(|a| a.host.as_ref()).map_or("-".into(), |h| h.to_string()),
                run.pending.clone().or_else(|| run.attempts.last().and_then(|a| a.error.clone())).unwrap_or_default(),
            ]);
        }
    }
    print_table(&jobs);
    if runs.len() > 1 {
        println!();
        print_table(&runs);
    }
    Ok(())
}

fn time_text(ms: u64) -> String {
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}
