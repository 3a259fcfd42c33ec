//! `wharf events` and `wharf describe service`: what the control plane did
//! and why, and everything known about one service on one page.

use crate::client::{Api, ApiArgs, Output, parse_id, print_table, service_path};
use anyhow::{Context, bail};
use serde_json::Value;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(clap::Args)]
#[command(after_help = "Events are kept per namespace (the newest 500): placements, failures with their \
reasons and retries, moves, scaling, rollout steps.\n\n\
Examples:\n  wharf events                     # namespace default\n  \
wharf events -n shop --service cart -f\n  \
wharf events --limit 20 -o json")]
pub struct EventsArgs {
    /// The namespace.
    #[arg(short = 'n', long, default_value = wharf_proto::names::DEFAULT_NAMESPACE)]
    namespace: String,
    /// Only this service's events.
    #[arg(long, value_name = "NAME")]
    service: Option<String>,
    /// Only the newest N.
    #[arg(long, value_name = "N")]
    limit: Option<usize>,
    /// Keep printing new events as they happen, until Ctrl-C.
    #[arg(short = 'f', long)]
    follow: bool,
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    output: Output,
    #[command(flatten)]
    api: ApiArgs,
}

/// `wharf describe`.
#[derive(clap::Subcommand)]
pub enum DescribeWhat {
    /// A service: spec, revisions, replicas with their host and state, load and recent events.
    #[command(alias = "svc")]
    Service {
        /// The service (`name` or `namespace/name`).
        name: String,
        /// Recent events shown.
        #[arg(long, default_value_t = 20)]
        events: usize,
        #[command(flatten)]
        api: ApiArgs,
    },
}

pub async fn events(args: EventsArgs) -> anyhow::Result<()> {
    wharf_proto::names::check_label(&args.namespace).with_context(|| format!("--namespace {}", args.namespace))?;
    let api = Api::new(&args.api)?;
    let mut query: Vec<(&str, String)> = Vec::new();
    if let Some(service) = &args.service {
        query.push(("service", service.clone()));
    }
    if let Some(limit) = args.limit {
        query.push(("limit", limit.to_string()));
    }
    let url = format!("{}/v1/namespaces/{}/events", api.base, args.namespace);
    if !args.follow {
        let answer = api.call(api.http.get(&url).query(&query)).await?;
        let events = answer["events"].as_array().cloned().unwrap_or_default();
        if args.output == Output::Json {
            println!("{}", serde_json::to_string_pretty(&events)?);
        } else {
            print_events(&events);
        }
        return Ok(());
    }
    query.push(("follow", "true".to_string()));
    let response = api.send(api.http.get(&url).query(&query)).await?;
    if args.output == Output::Table {
        println!("{}", event_header().join("  "));
    }
    crate::client::each_json_line(response, |event| {
        if args.output == Output::Json {
            println!("{event}");
        } else {
            println!("{}", event_row(&event).join("  "));
        }
    })
    .await?;
    bail!("the API closed the event stream (did the scheduler stop?)")
}

fn event_header() -> Vec<String> {
    ["TIME", "SERVICE", "REASON", "HOST", "MESSAGE"].into_iter().map(String::from).collect()
}

fn event_row(event: &Value) -> Vec<String> {
    let at = UNIX_EPOCH + Duration::from_millis(event["time_ms"].as_u64().unwrap_or(0));
    let ago = SystemTime::now().duration_since(at).map(|d| Duration::from_secs(d.as_secs())).unwrap_or_default();
    vec![
        format!("{} ago", humantime::format_duration(ago)).replace(' ', ""),
        event["service"].as_str().unwrap_or("").to_string(),
        event["reason"].as_str().unwrap_or("").to_string(),
        event["host"].as_str().unwrap_or("-").to_string(),
        event["message"].as_str().unwrap_or("").to_string(),
    ]
}

fn print_events(events: &[Value]) {
    let mut rows = vec![event_header()];
    rows.extend(events.iter().map(event_row));
    print_table(&rows);
}

/// A size as the API writes it (exact bytes or a unit), as people read it.
fn human_size(text: &str) -> String {
    text.parse::<wharf_proto::ByteSize>().map_or_else(|_| text.to_string(), wharf_proto::ByteSize::human)
}

pub async fn describe(what: DescribeWhat) -> anyhow::Result<()> {
    let DescribeWhat::Service { name, events, api } = what;
    let id = parse_id(&name)?;
    let api = Api::new(&api)?;
    let path = service_path(&id);
    let view = api.get(&path).await?;
    let revisions = api.get(&format!("{path}/revisions")).await?;
    let recent = api
        .call(api.http.get(format!("{}/v1/namespaces/{}/events", api.base, id.namespace)).query(&[("service", id.name.clone()), ("limit", events.to_string())]))
        .await?;
    let spec = &view["service"]["spec"];
    let status = &view["status"];
    println!("Service:     {id}");
    println!("Revision:    {} (stable {})", view["service"]["revision"], status["rollout"]["stable"]);
    println!("Rollout:     {}", status["rollout"]["phase"].as_str().unwrap_or("-"));
    println!("Component:   {} ({})", spec["component"].as_str().unwrap_or("-"), spec["source"].as_str().unwrap_or("upload"));
    let routes: Vec<String> = spec["routes"].as_array().into_iter().flatten().map(|r| format!("{}{}", r["host"].as_str().unwrap_or(""), r["path_prefix"].as_str().unwrap_or(""))).collect();
    println!("Routes:      {}", if routes.is_empty() { "-".to_string() } else { routes.join(", ") });
    println!("Replicas:    {} ready of {} desired", status["ready"], status["desired"]);
    let memory = &status["memory"];
    let peak = memory["peak"].as_str().map_or("none yet".to_string(), human_size);
    println!(
        "Memory:      request {} per replica, limit {} per instance x {} at once; peak seen {peak}; new replicas reserve {}",
        human_size(memory["request"].as_str().unwrap_or("-")),
        memory["limit"].as_str().unwrap_or("-"),
        memory["concurrency"],
        human_size(memory["placed_by"].as_str().unwrap_or("-")),
    );
    let latency = status["latency_ms"].as_f64().map_or("-".to_string(), |ms| format!("{ms:.1} ms"));
    println!("Load:        {} in flight, {:.1} requests/s, mean latency {latency}", status["in_flight"], status["rps"].as_f64().unwrap_or(0.0));
    if let Some(reason) = status["autoscale"]["reason"].as_str() {
        println!("Autoscale:   {} replicas: {reason}", status["autoscale"]["desired"]);
    }
    if let Some(error) = status["last_error"].as_str() {
        println!("Last error:  {error}");
    }
    println!("\nRevisions:");
    let mut rows = vec![["REVISION", "CREATED", "BY", "CAUSE", "COMPONENT"].into_iter().map(String::from).collect::<Vec<_>>()];
    for r in revisions["revisions"].as_array().into_iter().flatten() {
        let created = r["created_at_ms"].as_u64().map(|ms| humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string());
        let mark = if r["current"].as_bool() == Some(true) { " (current)" } else if r["stable"].as_bool() == Some(true) { " (stable)" } else { "" };
        rows.push(vec![
            format!("{}{mark}", r["revision"]),
            created.unwrap_or_default(),
            r["created_by"].as_str().unwrap_or("").to_string(),
            r["cause"].as_str().unwrap_or("").to_string(),
            r["component"].as_str().map(|d| d.chars().take(19).collect()).unwrap_or_default(),
        ]);
    }
    print_table(&rows);
    println!("\nReplicas:");
    let mut rows = vec![["REPLICA", "REVISION", "HOST", "STATE", "ATTEMPT", "FAILURES", "ERROR"].into_iter().map(String::from).collect::<Vec<_>>()];
    for r in status["replicas"].as_array().into_iter().flatten() {
        rows.push(vec![
            r["replica"].to_string(),
            r["revision"].to_string(),
            r["host"].as_str().unwrap_or("-").to_string(),
            r["state"].as_str().unwrap_or("").to_string(),
            r["attempt"].as_u64().map_or("-".to_string(), |a| a.to_string()),
            r["failures"].as_u64().map_or("-".to_string(), |f| f.to_string()),
            r["error"].as_str().unwrap_or("").to_string(),
        ]);
    }
    print_table(&rows);
    println!("\nEvents:");
    let recent = recent["events"].as_array().cloned().unwrap_or_default();
    if recent.is_empty() {
        println!("  (none recorded)");
    } else {
        print_events(&recent);
    }
    Ok(())
}
