//! Egress walls on a real `wharf up`: `allow_outbound` entries that name
//! loopback, link-local or private addresses are refused when deployed,
//! unless the admin opened those ranges.

use std::path::Path;
use wharf_testkit::samples;
use wharf_testkit::wharf::Up;

const WHARF: &str = env!("CARGO_BIN_EXE_wharf");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_public_allow_outbound_entries_are_refused_at_deploy_unless_allowed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let up = Up::start(Path::new(WHARF), &dir.path().join("data"), &["--host-id", "walls"]);
    let frontend = samples::path("frontend");
    let frontend = frontend.to_str().expect("utf-8");
    for (entry, kind) in [("169.254.169.254", "link-local"), ("localhost:8080", "loopback"), ("10.0.0.7", "private"), ("[::1]:80", "loopback")] {
        let (ok, out) = up.wharf(&["deploy", frontend, "--name", "front", "--route", "/front", "--allow-outbound", entry, "--no-wait"]);
        assert!(!ok, "{entry} was accepted: {out}");
        assert!(out.contains("allow_outbound[0]") && out.contains(entry) && out.contains(kind) && out.contains("--allow-private-egress"), "{entry}: {out}");
    }
    assert!(up.service("front").is_null(), "nothing was deployed");
    let (ok, out) = up.wharf(&["deploy", frontend, "--name", "front", "--route", "/front", "--allow-outbound", "api.example.com", "--no-wait"]);
    assert!(ok, "a public name is accepted: {out}");

    // An admin who opens loopback may let services call it.
    let dir = tempfile::tempdir().expect("tempdir");
    let open = Up::start(Path::new(WHARF), &dir.path().join("data"), &["--host-id", "open", "--allow-private-egress", "127.0.0.0/8"]);
    let (ok, out) = open.wharf(&["deploy", frontend, "--name", "front", "--route", "/front", "--allow-outbound", "localhost:8080", "--no-wait"]);
    assert!(ok, "allowed range: {out}");
    let (ok, out) = open.wharf(&["deploy", frontend, "--name", "meta", "--route", "/meta", "--allow-outbound", "169.254.169.254", "--no-wait"]);
    assert!(!ok && out.contains("link-local"), "other ranges stay closed: {out}");
}
