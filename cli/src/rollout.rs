//! `wharf rollout`: a service's revisions and the hand controls of its
//! rollouts, and the wait that `deploy`, `apply` and `rollout status`
//! share: it prints progress as it changes and stops as soon as the
//! rollout completes or fails, saying why.

use crate::client::{Api, ApiArgs, parse_id, service_path};
use anyhow::{Context, bail};
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use wharf_proto::ServiceId;

/// `wharf rollout ...`
#[derive(clap::Subcommand)]
pub enum RolloutCommand {
    /// Wait for a service's rollout to finish, printing progress; exits
    /// non-zero if it fails (like `kubectl rollout status`).
    Status {
        /// The service (`name` or `namespace/name`).
        name: String,
        /// Give up after this long.
        #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
        timeout: Duration,
        /// Print where it stands once, without waiting.
        #[arg(long)]
        no_wait: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List a service's revisions (the last 10 are kept).
    History {
        /// The service (`name` or `namespace/name`).
        name: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Go back to a previous revision's component and configuration
    /// (default: the revision before the current one).
    Undo {
        /// The service (`name` or `namespace/name`).
        name: String,
        /// The revision to go back to.
        #[arg(long)]
        to: Option<u64>,
        /// Return without waiting for the rollout.
        #[arg(long)]
        no_wait: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Send a share of the requests to the latest revision, the rest to the
    /// stable one, until `promote` or `abort`.
    Canary {
        /// The service (`name` or `namespace/name`).
        name: String,
        /// Percent of requests for the latest revision (1-99).
        #[arg(long)]
        percent: u32,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Roll the latest revision out to every replica (ends a canary).
    Promote {
        /// The service (`name` or `namespace/name`).
        name: String,
        /// Return without waiting for the rollout.
        #[arg(long)]
        no_wait: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Drop the canary: back to the stable revision everywhere.
    Abort {
        /// The service (`name` or `namespace/name`).
        name: String,
        /// Return without waiting for the rollout.
        #[arg(long)]
        no_wait: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
}

pub async fn rollout(command: RolloutCommand) -> anyhow::Result<()> {
    match command {
        RolloutCommand::Status { name, timeout, no_wait, api } => {
            let api = Api::new(&api)?;
            let id = parse_id(&name)?;
            if no_wait {
                let status = api.get(&format!("{}/rollout", service_path(&id))).await?;
                println!("{}", describe(&id, &status).line);
                return Ok(());
            }
            wait(&api, &id, timeout).await
        }
        RolloutCommand::History { name, api } => {
            let api = Api::new(&api)?;
            let id = parse_id(&name)?;
            let history = api.get(&format!("{}/revisions", service_path(&id))).await?;
            let mut rows = vec![["REVISION", "CREATED", "BY", "CAUSE", "COMPONENT", ""].map(String::from).to_vec()];
            for r in history["revisions"].as_array().into_iter().flatten() {
                let mut marks = Vec::new();
                if r["current"] == true {
                    marks.push("current");
                }
                if r["stable"] == true {
                    marks.push("stable");
                }
                rows.push(vec![
                    r["revision"].to_string(),
                    ago(r["created_at_ms"].as_u64().unwrap_or(0)),
                    r["created_by"].as_str().unwrap_or("").to_string(),
                    r["cause"].as_str().unwrap_or("").to_string(),
                    r["component"].as_str().map(|d| d.chars().take(19).collect()).unwrap_or_default(),
                    marks.join(", "),
                ]);
            }
            crate::client::print_table(&rows);
            Ok(())
        }
        RolloutCommand::Undo { name, to, no_wait, api } => {
            let api = Api::new(&api)?;
            let id = parse_id(&name)?;
            let body = match to {
                Some(to) => json!({"to": to}),
                None => json!({}),
            };
            let answer = api.call(api.http.post(format!("{}{}/rollout/undo", api.base, service_path(&id))).json(&body)).await?;
            println!("{id}: back to the configuration of revision {} (now revision {})", answer["undone_to"], answer["revision"]);
            if no_wait { Ok(()) } else { wait(&api, &id, crate::client::READY_TIMEOUT).await }
        }
        RolloutCommand::Canary { name, percent, api } => {
            let api = Api::new(&api)?;
            let id = parse_id(&name)?;
            let answer =
                api.call(api.http.post(format!("{}{}/rollout/canary", api.base, service_path(&id))).json(&json!({"percent": percent}))).await?;
            println!(
                "{id}: revision {} takes {percent}% of requests, revision {} the rest; then `wharf rollout promote {name}` or `wharf rollout abort {name}`",
                answer["canary"], answer["stable"]
            );
            Ok(())
        }
        RolloutCommand::Promote { name, no_wait, api } => {
            let api = Api::new(&api)?;
            let id = parse_id(&name)?;
            let answer = api.call(api.http.post(format!("{}{}/rollout/promote", api.base, service_path(&id)))).await?;
            println!("{id}: rolling out revision {} to every replica", answer["promoted"]);
            if no_wait { Ok(()) } else { wait(&api, &id, crate::client::READY_TIMEOUT).await }
        }
        RolloutCommand::Abort { name, no_wait, api } => {
            let api = Api::new(&api)?;
            let id = parse_id(&name)?;
            let answer = api.call(api.http.post(format!("{}{}/rollout/abort", api.base, service_path(&id)))).await?;
            println!("{id}: canary of revision {} dropped; back to revision {}", answer["aborted"], answer["revision"]);
            if no_wait { Ok(()) } else { wait(&api, &id, crate::client::READY_TIMEOUT).await }
        }
    }
}

/// Where a rollout stands, for people and for the wait.
pub(crate) struct Progress {
    /// One line: phase, counts, message.
    pub(crate) line: String,
    pub(crate) outcome: Outcome,
}

#[derive(PartialEq, Eq)]
pub(crate) enum Outcome {
    Waiting,
    Done,
    Failed,
}

/// Reads a `GET .../rollout` answer.
pub(crate) fn describe(id: &ServiceId, status: &Value) -> Progress {
    let revision = status["revision"].as_u64().unwrap_or(0);
    let rollout = &status["rollout"];
    if status["planned"] != true || rollout.is_null() {
        return Progress { line: format!("{id}: revision {revision}: waiting for the control plane to plan it"), outcome: Outcome::Waiting };
    }
    let phase = rollout["phase"].as_str().unwrap_or("");
    let message = rollout["message"].as_str().unwrap_or("");
    let revisions = status["revisions"].as_array().cloned().unwrap_or_default();
    let settled = revisions.iter().all(|r| r["ready"].as_u64() >= r["wanted"].as_u64() && r["assigned"].as_u64() == r["wanted"].as_u64());
    let only_latest = revisions.iter().all(|r| r["revision"].as_u64() == Some(revision));
    let outcome = match phase {
        "failed" => Outcome::Failed,
        "complete" if settled && only_latest => Outcome::Done,
        "split" if settled => Outcome::Done,
        _ => Outcome::Waiting,
    };
    let counts: Vec<String> = revisions
        .iter()
        .map(|r| format!("revision {}: {}/{} ready", r["revision"], r["ready"].as_u64().unwrap_or(0), r["wanted"].as_u64().unwrap_or(0)))
        .collect();
    let line = if counts.is_empty() {
        format!("{id}: {phase}: {message}")
    } else {
        format!("{id}: {phase} ({}): {message}", counts.join(", "))
    };
    Progress { line, outcome }
}

/// Waits for a service's rollout: prints each change of progress; returns
/// when it completes, fails (with its reason) or `timeout` passes.
pub(crate) async fn wait(api: &Api, id: &ServiceId, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    loop {
        let status = api.get(&format!("{}/rollout", service_path(id))).await.with_context(|| format!("cannot follow the rollout of {id}"))?;
        let progress = describe(id, &status);
        if progress.line != last {
            eprintln!("{}", progress.line);
            last = progress.line.clone();
        }
        match progress.outcome {
            Outcome::Done => return Ok(()),
            Outcome::Failed => {
                let reason = status["rollout"]["failed"]["reason"].as_str().unwrap_or("see above");
                bail!("the rollout of {id} failed: {reason}");
            }
            Outcome::Waiting => {}
        }
        if Instant::now() > deadline {
            bail!("the rollout of {id} did not finish within {}: {last}", humantime::format_duration(timeout));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// How long ago `ms` (milliseconds since the Unix epoch) was, roughly.
fn ago(ms: u64) -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    let secs = now.saturating_sub(ms) / 1000;
    match secs {
        0..60 => format!("{secs}s ago"),
        60..3600 => format!("{}m ago", secs / 60),
        3600..86_400 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86_400),
    }
}
