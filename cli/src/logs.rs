//! `wharf logs`: a service's log lines from every replica on every host,
//! through the API, each tagged with its host, replica and revision.

use crate::client::{Api, ApiArgs, Output, parse_id, service_path};
use anyhow::bail;
use serde_json::Value;
use std::time::Duration;

#[derive(clap::Args)]
#[command(after_help = "Lines print as `[HOST rREPLICA revREVISION] text`, oldest first, merged over every host \
the service runs on. Without --tail or --since, the last 100 lines.\n\n\
Examples:\n  wharf logs web                      # the last 100 lines of every replica\n  \
wharf logs web -f                   # then every new line, until Ctrl-C\n  \
wharf logs shop/cart --since 10m --host edge-a --replica 0\n  \
wharf logs web --tail 20 -o json   # one JSON object per line")]
pub struct LogsArgs {
    /// The service (`name` or `namespace/name`).
    service: String,
    /// Keep printing new lines as replicas write them, until Ctrl-C.
    #[arg(short = 'f', long)]
    follow: bool,
    /// Only lines written in this last stretch of time (e.g. 30s, 10m, 2h).
    #[arg(long, value_parser = humantime::parse_duration)]
    since: Option<Duration>,
    /// Only the last N lines (over all replicas) before following.
    #[arg(long, value_name = "N")]
    tail: Option<usize>,
    /// Only this replica (its index, as `wharf get services NAME` shows).
    #[arg(long, value_name = "N")]
    replica: Option<u32>,
    /// Only replicas on this host.
    #[arg(long, value_name = "HOST")]
    host: Option<String>,
    /// Print each line's time too.
    #[arg(long)]
    timestamps: bool,
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    output: Output,
    #[command(flatten)]
    api: ApiArgs,
}

pub async fn logs(args: LogsArgs) -> anyhow::Result<()> {
    let id = parse_id(&args.service)?;
    let api = Api::new(&args.api)?;
    let mut query: Vec<(&str, String)> = Vec::new();
    if let Some(since) = args.since {
        query.push(("since", humantime::format_duration(since).to_string().replace(' ', "")));
    }
    if let Some(tail) = args.tail {
        query.push(("tail", tail.to_string()));
    }
    if let Some(replica) = args.replica {
        query.push(("replica", replica.to_string()));
    }
    if let Some(host) = &args.host {
        query.push(("host", host.clone()));
    }
    let url = format!("{}{}/logs", api.base, service_path(&id));
    if !args.follow {
        let answer = api.call(api.http.get(&url).query(&query)).await?;
        for record in answer["lines"].as_array().into_iter().flatten() {
            print_record(record, &args);
        }
        for missing in answer["missing"].as_array().into_iter().flatten() {
            eprintln!("warning: no lines from {}", missing.as_str().unwrap_or("a host"));
        }
        if answer["truncated"].as_bool() == Some(true) {
            eprintln!("warning: older lines were left out to fit one message per host; use --tail or --since");
        }
        return Ok(());
    }
    query.push(("follow", "true".to_string()));
    let response = api.send(api.http.get(&url).query(&query)).await?;
    crate::client::each_json_line(response, |record| match record["notice"].as_str() {
        Some(notice) => eprintln!("warning: {notice}"),
        None => print_record(&record, &args),
    })
    .await?;
    bail!("the API closed the log stream (did the scheduler stop?)")
}

fn print_record(record: &Value, args: &LogsArgs) {
    if args.output == Output::Json {
        println!("{record}");
        return;
    }
    let time = if args.timestamps {
        let at = std::time::UNIX_EPOCH + Duration::from_millis(record["time_ms"].as_u64().unwrap_or(0));
        format!("{} ", humantime::format_rfc3339_millis(at))
    } else {
        String::new()
    };
    println!(
        "{time}[{} r{} rev{}] {}",
        record["host"].as_str().unwrap_or("?"),
        record["replica"],
        record["revision"],
        record["line"].as_str().unwrap_or("")
    );
}
