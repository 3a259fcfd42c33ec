//! `wharf serve` as a user runs it: the real binary, a real port.

use std::time::Duration;
use wharf_testkit::process::Process;
use wharf_testkit::samples;

const WHARF: &str = env!("CARGO_BIN_EXE_wharf");

fn serve(file: &std::path::Path, extra: &[&str]) -> Process {
    let file = file.to_str().expect("utf-8 path");
    let mut args = vec!["serve", file, "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--no-cache"];
    args.extend_from_slice(extra);
    Process::spawn(WHARF, &args)
}

fn url_of(process: &mut Process) -> String {
    urls_of(process).0
}

/// The ingress's URL and the admin listener's metrics URL `wharf serve` printed.
fn urls_of(process: &mut Process) -> (String, String) {
    let line = process.wait_for_line("serving http://", Duration::from_secs(60));
    let mut urls = line.split_whitespace().filter_map(|w| w.find("http://").map(|at| w[at..].trim_end_matches([')', ';']).to_string()));
    let ingress = urls.next().expect("ingress url");
    let metrics = urls.next().expect("metrics url");
    (ingress, metrics)
}

#[tokio::test]
async fn serves_hello_with_its_env_and_stops_on_sigterm() {
    let mut wharf = serve(&samples::path("hello"), &["--env", "GREETING=hi there"]);
    let (url, metrics_url) = urls_of(&mut wharf);
    let body = reqwest::get(&url).await.expect("answered").text().await.expect("body");
    assert_eq!(body, "hi there\n");
    // The component's stdout is printed once, tagged with the service, and
    // without colour codes when stderr is not a terminal.
    let line = wharf.wait_for_line("hello: served /", Duration::from_secs(10));
    assert!(line.contains("service=default/hello") && line.contains("stream=\"stdout\""), "{line}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(wharf.output().matches("hello: served /").count(), 1, "each guest line is logged once:\n{}", wharf.output());
    assert!(!wharf.output().contains('\u{1b}'), "no ANSI escape codes in a redirected log:\n{}", wharf.output());
    let metrics = reqwest::get(&metrics_url).await.expect("answered").text().await.expect("body");
    assert!(metrics.contains(r#"wharf_requests_total{service="default/hello",outcome="ok"} 1"#), "{metrics}");
    // The public port serves the component only: /metrics there is the component's.
    let on_ingress = reqwest::get(format!("{url}metrics")).await.expect("answered").text().await.expect("body");
    assert_eq!(on_ingress, "hi there\n", "the component answers /metrics on the public port");
    let status = wharf.terminate(Duration::from_secs(10));
    assert!(status.success(), "exits cleanly on SIGTERM: {status}\n{}", wharf.output());
}

#[tokio::test]
async fn limits_from_flags_apply() {
    let mut wharf = serve(&samples::path("spin"), &["--fuel", "1000000", "--timeout", "2s"]);
    let url = url_of(&mut wharf);
    let response = reqwest::get(format!("{url}?n=10000000000")).await.expect("answered");
    assert_eq!(response.status(), 500);
    assert_eq!(response.headers()["x-wharf-error"], "fuel_exhausted");
}

#[test]
fn refuses_bad_files_with_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let garbage = dir.path().join("garbage.wasm");
    std::fs::write(&garbage, b"hello, I am not wasm").expect("write");
    let cases = [
        (garbage, "not a WebAssembly component"),
        (samples::path("notcomponent"), "wasi:http/incoming-handler"),
        (dir.path().join("missing.wasm"), "cannot read"),
    ];
    for (file, expected) in cases {
        let mut wharf = serve(&file, &[]);
        let status = wharf.wait(Duration::from_secs(60));
        assert!(!status.success(), "{} must be refused", file.display());
        let output = wharf.output();
        assert!(output.contains("error:") && output.contains(expected), "{}: {output}", file.display());
    }
}

#[test]
fn rejects_bad_flags_naming_them() {
    let hello = samples::path("hello");
    for (flag, value, expected) in [("--memory", "lots", "--memory"), ("--timeout", "soon", "--timeout"), ("--env", "NOEQUALS", "KEY=VALUE")] {
        let mut wharf = serve(&hello, &[flag, value]);
        let status = wharf.wait(Duration::from_secs(30));
        assert!(!status.success());
        assert!(wharf.output().contains(expected), "{flag} {value}: {}", wharf.output());
    }
}

#[tokio::test]
async fn loopback_egress_needs_the_admin_flag() {
    let mut backend = serve(&samples::path("backend"), &[]);
    let port = url_of(&mut backend).trim_end_matches('/').rsplit(':').next().expect("port").to_string();
    let target = format!("localhost:{port}");
    let env = format!("BACKEND_URL=http://{target}");
    let frontend = samples::path("frontend");
    // Allowed by name, refused by address: localhost is loopback.
    let mut walled = serve(&frontend, &["--allow-outbound", &target, "--env", &env]);
    let url = url_of(&mut walled);
    let response = reqwest::get(format!("{url}x")).await.expect("answered");
    assert_eq!(response.status(), 502);
    assert!(response.text().await.expect("body").contains("Prohibited"));
    walled.wait_for_line("resolves to 127.0.0.1, a loopback address", Duration::from_secs(10));
    // The admin opens loopback: the call goes through.
    let mut open = serve(&frontend, &["--allow-outbound", &target, "--env", &env, "--allow-private-egress", "127.0.0.0/8"]);
    let url = url_of(&mut open);
    let body = reqwest::get(format!("{url}x")).await.expect("answered").text().await.expect("body");
    assert_eq!(body, "frontend got: backend ok /x\n");
}
