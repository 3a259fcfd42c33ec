//! HTTPS for the API and the ingress, end to end: a real `wharf up` with a
//! CA and certificate made at test time, the CLI with and without that CA,
//! and bad certificate files refused at startup.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;
use wharf_testkit::process::Process;
use wharf_testkit::samples;
use wharf_testkit::tls::{self, TestCerts};
use wharf_testkit::wharf::Up;

const WHARF: &str = env!("CARGO_BIN_EXE_wharf");

fn text(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// A client command against `up` with `env` added. The config directory is
/// an empty one, so no `~/.config/wharf/ca.pem` of the machine's can help.
fn client(up: &Up, config_home: &Path, args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let output = Command::new(WHARF)
        .args(args)
        .env("WHARF_API", &up.api)
        .env("WHARF_TOKEN", &up.token)
        .env("XDG_CONFIG_HOME", config_home)
        .env_remove("WHARF_CA_CERT")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("wharf runs");
    (output.status.success(), format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr)))
}

/// An HTTP client that trusts the test CA (and nothing else).
fn trusting(certs: &TestCerts) -> reqwest::Client {
    let ca = reqwest::Certificate::from_pem(&std::fs::read(&certs.ca).expect("read CA")).expect("CA parses");
    reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(ca)
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client")
}

#[tokio::test]
async fn api_and_ingress_serve_https_and_the_cli_needs_the_ca() {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = tls::write(dir.path());
    let config_home = dir.path().join("config");
    std::fs::create_dir_all(&config_home).expect("config dir");
    let (cert, key) = (text(&certs.cert), text(&certs.key));
    let mut up = Up::start(
        Path::new(WHARF),
        &dir.path().join("data"),
        &["--host-id", "test-host", "--api-tls-cert", cert, "--api-tls-key", key, "--tls-cert", cert, "--tls-key", key],
    );
    assert!(up.api.starts_with("https://") && up.ingress.starts_with("https://"), "printed {} and {}", up.api, up.ingress);
    let ingress_addr = up.ingress.trim_start_matches("https://").to_string();
    let api_addr = up.api.trim_start_matches("https://").to_string();

    // Clients that connect and never start a handshake must not hold up
    // anyone else: the next clients are served well before the 10 s
    // handshake timeout would free an accept loop that waited on them.
    let _stalled = [
        std::net::TcpStream::connect(&ingress_addr).expect("connect to the ingress"),
        std::net::TcpStream::connect(&api_addr).expect("connect to the API"),
    ];
    let https = trusting(&certs);
    // Nothing is deployed yet: the ingress answers 404 (no route), over TLS.
    for (url, status) in [(format!("{}/nothing-here", up.ingress), 404), (format!("{}/healthz", up.api), 200)] {
        let response = https.get(&url).send().await.unwrap_or_else(|e| panic!("{url} behind a stalled client: {e:?}"));
        assert_eq!(response.status(), status, "{url}");
    }

    let hello = samples::path("hello");
    let ca = text(&certs.ca);
    let (ok, out) = client(&up, &config_home, &["deploy", text(&hello), "--name", "hello", "--route", "/hello"], &[("WHARF_CA_CERT", ca)]);
    assert!(ok && out.contains("ready"), "deploy over https with WHARF_CA_CERT: {out}\n--- wharf up:\n{}", up.process.output());
    let (ok, out) = client(&up, &config_home, &["get", "services", "--ca-cert", ca], &[]);
    assert!(ok && out.contains("default/hello"), "get services with --ca-cert: {out}");

    for url in [format!("{}/hello", up.ingress), format!("https://localhost:{}/hello", ingress_addr.rsplit(':').next().unwrap_or_default())] {
        let response = https.get(&url).send().await.unwrap_or_else(|e| panic!("{url}: {e:?}"));
        assert_eq!(response.status(), 200, "{url}");
        assert_eq!(response.text().await.expect("body"), "Hello from Wharf!\n");
    }

    // Plain HTTP to a TLS port gets no answer from a service; the next client is served.
    let plain = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().expect("client");
    for addr in [&ingress_addr, &api_addr] {
        let answer = plain.get(format!("http://{addr}/hello")).send().await;
        assert!(!matches!(&answer, Ok(r) if r.status().is_success()), "plain http to {addr} was answered: {answer:?}");
    }
    let again = https.get(format!("{}/hello", up.ingress)).send().await.expect("still serving after bad clients");
    assert_eq!(again.status(), 200);

    // Without the CA the CLI refuses the API's certificate and says what to do.
    let (ok, out) = client(&up, &config_home, &["get", "services"], &[]);
    assert!(!ok, "get services without the CA succeeded: {out}");
    assert!(out.contains("certificate") && out.contains("--ca-cert"), "{out}");

    // Graceful shutdown works with TLS, stalled handshakes included.
    let status = up.process.terminate(Duration::from_secs(15));
    assert!(status.success(), "clean exit on SIGTERM: {status}\n{}", up.process.output());
}

/// Runs `wharf args` and returns (exit code, output); panics if it is still
/// running after 10 s (it must not start serving).
fn fails_at_startup(args: &[&str]) -> (Option<i32>, String) {
    let mut process = Process::spawn_with(Command::new(WHARF).args(args).env("WHARF_LOG", "warn"));
    let status = process.wait(Duration::from_secs(10));
    (status.code(), process.output())
}

#[test]
fn bad_certificate_files_stop_startup_naming_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = tls::write(dir.path());
    let garbage = dir.path().join("garbage.key");
    std::fs::write(&garbage, "this is not a key\n").expect("write");
    let missing = dir.path().join("missing.pem");
    let data = dir.path().join("data");
    let (cert, key, other, garbage, missing) = (text(&certs.cert), text(&certs.key), text(&certs.other_key), text(&garbage), text(&missing));
    let up = |extra: &[&str]| -> Vec<String> {
        let mut args = vec!["up", "--data-dir", text(&data), "--api", "127.0.0.1:0", "--listen", "127.0.0.1:0"];
        args.extend_from_slice(extra);
        args.into_iter().map(str::to_string).collect()
    };
    let nats = "nats://127.0.0.1:1";
    let cases: Vec<(Vec<String>, Vec<&str>)> = vec![
        (up(&["--tls-cert", missing, "--tls-key", key]), vec!["--tls-cert", "cannot read the TLS certificate", missing]),
        (up(&["--api-tls-cert", cert, "--api-tls-key", garbage]), vec!["--api-tls-cert", "no private key in", garbage]),
        (up(&["--tls-cert", cert, "--tls-key", other]), vec!["does not match", other, cert]),
        (up(&["--api-tls-cert", key, "--api-tls-key", key]), vec!["no certificate in", key]),
        (
            ["scheduler", "--nats", nats, "--api", "127.0.0.1:0", "--api-tls-cert", missing, "--api-tls-key", key].map(String::from).to_vec(),
            vec!["cannot read the TLS certificate", missing],
        ),
        (["host", "--nats", nats, "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--tls-cert", cert, "--tls-key", other].map(String::from).to_vec(), vec!["does not match", other]),
        (["serve", "hello.wasm", "--listen", "127.0.0.1:0", "--tls-cert", cert, "--tls-key", garbage].map(String::from).to_vec(), vec!["no private key in", garbage]),
    ];
    for (args, wanted) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, output) = fails_at_startup(&args);
        assert_eq!(code, Some(1), "wharf {args:?} should fail; output:\n{output}");
        for piece in wanted {
            assert!(output.contains(piece), "wharf {args:?}: the error does not name {piece:?}:\n{output}");
        }
        assert!(!output.contains("Wharf is up") && !output.contains("serving"), "wharf {args:?} started serving:\n{output}");
    }
    assert!(!data.exists(), "wharf up created its data directory before checking its certificates");
}

#[test]
fn half_a_tls_pair_is_a_usage_error_naming_the_other_half() {
    let nats = "nats://127.0.0.1:1";
    let cases: [(&[&str], &str); 5] = [
        (&["up", "--tls-cert", "a.pem"], "--tls-key"),
        (&["up", "--api-tls-key", "a.key"], "--api-tls-cert"),
        (&["scheduler", "--nats", nats, "--api-tls-cert", "a.pem"], "--api-tls-key"),
        (&["host", "--nats", nats, "--tls-key", "a.key"], "--tls-cert"),
        (&["serve", "hello.wasm", "--tls-cert", "a.pem"], "--tls-key"),
    ];
    for (args, other) in cases {
        let (code, output) = fails_at_startup(args);
        assert_eq!(code, Some(2), "wharf {args:?} should be a usage error; output:\n{output}");
        assert!(output.contains(other), "wharf {args:?}: the error does not name {other}:\n{output}");
    }
}
