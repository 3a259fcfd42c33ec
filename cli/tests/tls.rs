//! HTTPS for the API and the ingress, end to end: bad certificate files
//! are refused at startup.

use std::path::Path;
use std::process::Command;
use std::time::Duration;
use wharf_testkit::process::Process;
use wharf_testkit::tls;

const WHARF: &str = env!("CARGO_BIN_EXE_wharf");

fn text(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
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
        (["host", "--nats", nats, "--listen", "127.0.0.1:0", "--tls-cert", cert, "--tls-key", other].map(String::from).to_vec(), vec!["does not match", other]),
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
