//! Traces: one request through two hosts and two services (frontend on
//! host-a calls backend on host-b over NATS) is one trace, continuing the
//! caller's W3C `traceparent`, with spans from each host process, as a test
//! OTLP/HTTP receiver decodes them from the real OTLP protobuf; key-value
//! calls are spans of the guest's; without a traceparent a trace starts.

use axum::body::Bytes;
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use prost::Message;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use wharf_testkit::cluster::{Scheduler, url_in};
use wharf_testkit::nats::NatsServer;
use wharf_testkit::process::Process;
use wharf_testkit::samples;

const WHARF: &str = env!("CARGO_BIN_EXE_wharf");

/// One span as received: the process (service.name), its name, ids in hex.
#[derive(Debug, Clone)]
struct Received {
    process: String,
    name: String,
    trace: String,
    id: String,
    parent: String,
}

/// A minimal OTLP/HTTP collector: decodes each export and keeps its spans.
async fn receiver() -> (String, Arc<Mutex<Vec<Received>>>) {
    let spans: Arc<Mutex<Vec<Received>>> = Arc::default();
    let kept = spans.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: Bytes| {
            let kept = kept.clone();
            async move {
                let request = ExportTraceServiceRequest::decode(body).expect("an OTLP protobuf export");
                for resource in request.resource_spans {
                    let process = resource
                        .resource
                        .iter()
                        .flat_map(|r| &r.attributes)
                        .find(|a| a.key == "service.name")
                        .and_then(|a| a.value.as_ref())
                        .and_then(|v| match &v.value {
                            Some(opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(s)) => Some(s.clone()),
                            _ => None,
                        })
                        .unwrap_or_default();
                    for span in resource.scope_spans.into_iter().flat_map(|s| s.spans) {
                        kept.lock().expect("lock").push(Received {
                            process: process.clone(),
                            name: span.name,
                            trace: hex(&span.trace_id),
                            id: hex(&span.span_id),
                            parent: hex(&span.parent_span_id),
                        });
                    }
                }
                ([("content-type", "application/x-protobuf")], ExportTraceServiceResponse::default().encode_to_vec())
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, spans)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `wharf host` exporting its spans to `collector` as process `name`.
fn host(nats: &str, name: &str, zone: &str, dir: &Path, collector: &str) -> (Process, String) {
    let labels = format!("zone={zone}");
    let data = dir.join(name);
    let mut process = Process::spawn_with(
        Command::new(WHARF)
            .args(["host", "--nats", nats, "--name", name, "--labels", &labels, "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(&data)
            .args(["--otlp-endpoint", collector])
            .env("OTEL_SERVICE_NAME", name)
            .env("OTEL_BSP_SCHEDULE_DELAY", "100"),
    );
    let ingress = url_in(&process.wait_for_line("ingress http://", Duration::from_secs(60)));
    (process, ingress)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_through_two_hosts_and_two_services_is_one_trace_with_spans_from_each() {
    let (collector, spans) = receiver().await;
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let scheduler = Scheduler::start(Path::new(WHARF), &nats.url(), &dir.path().join("scheduler"), &[]);
    let (host_a, ingress_a) = host(&nats.url(), "host-a", "a", dir.path(), &collector);
    let (host_b, _) = host(&nats.url(), "host-b", "b", dir.path(), &collector);
    let (backend, frontend) = (samples::path("backend"), samples::path("frontend"));
    scheduler.ok(&["deploy", backend.to_str().expect("utf-8"), "--name", "backend", "--route", "/backend", "--on", "zone=b"]);
    scheduler.ok(&["deploy", frontend.to_str().expect("utf-8"), "--name", "frontend", "--route", "/frontend", "--on", "zone=a"]);

    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let response = reqwest::Client::new()
        .get(format!("{ingress_a}/frontend/x"))
        .header("traceparent", format!("00-{trace}-00f067aa0ba902b7-01"))
        .send()
        .await
        .expect("answered");
    assert_eq!(response.status(), 200, "{:?}", response.text().await);

    let wanted = [("host-a", "ingress"), ("host-a", "guest"), ("host-a", "instantiate"), ("host-a", "call"), ("host-a", "hop"), ("host-b", "from bus"), ("host-b", "guest"), ("host-b", "instantiate")];
    let deadline = Instant::now() + Duration::from_secs(20);
    let ours = loop {
        let ours: Vec<Received> = spans.lock().expect("lock").iter().filter(|s| s.trace == trace).cloned().collect();
        if wanted.iter().all(|(process, name)| ours.iter().any(|s| s.process == *process && s.name == *name)) {
            break ours;
        }
        assert!(
            Instant::now() < deadline,
            "not every span arrived: {ours:#?}\nall: {:#?}\nhost-a:\n{}\nhost-b:\n{}",
            spans.lock().expect("lock"),
            host_a.output(),
            host_b.output()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let find = |process: &str, name: &str| ours.iter().find(|s| s.process == process && s.name == name).expect("present").clone();
    assert_eq!(find("host-a", "ingress").parent, "00f067aa0ba902b7", "the ingress continues the caller's trace");
    assert_eq!(find("host-a", "guest").parent, find("host-a", "ingress").id);
    assert_eq!(find("host-a", "call").parent, find("host-a", "guest").id, "the call is made from inside the frontend guest");
    assert_eq!(find("host-a", "hop").parent, find("host-a", "call").id);
    assert_eq!(find("host-b", "from bus").parent, find("host-a", "hop").id, "the trace crosses NATS");
    assert_eq!(find("host-b", "guest").parent, find("host-b", "from bus").id);

    // A key-value host call is a span of its own, in the guest's.
    let counter = samples::path("counter");
    scheduler.ok(&["deploy", counter.to_str().expect("utf-8"), "--name", "counter", "--route", "/counter", "--keyvalue", "counter", "--on", "zone=a"]);
    let trace = "0af7651916cd43dd8448eb211c80319c";
    let response = reqwest::Client::new()
        .get(format!("{ingress_a}/counter"))
        .header("traceparent", format!("00-{trace}-b7ad6b7169203331-01"))
        .send()
        .await
        .expect("answered");
    assert_eq!(response.status(), 200);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ours: Vec<Received> = spans.lock().expect("lock").iter().filter(|s| s.trace == trace).cloned().collect();
        if let (Some(kv), Some(guest)) = (ours.iter().find(|s| s.name == "keyvalue"), ours.iter().find(|s| s.name == "guest")) {
            assert_eq!(kv.parent, guest.id, "{ours:#?}");
            break;
        }
        assert!(Instant::now() < deadline, "no key-value span: {ours:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Without a traceparent the ingress starts a trace of its own.
    let before = spans.lock().expect("lock").len();
    let response = reqwest::get(format!("{ingress_a}/frontend/y")).await.expect("answered");
    assert_eq!(response.status(), 200);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let fresh: Vec<Received> = spans.lock().expect("lock")[before..].to_vec();
        if let Some(root) = fresh.iter().find(|s| s.name == "ingress" && s.parent.is_empty()) {
            assert!(fresh.iter().any(|s| s.process == "host-b" && s.trace == root.trace), "host-b joins the new trace: {fresh:#?}");
            break;
        }
        assert!(Instant::now() < deadline, "no new trace: {fresh:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
