//! What a new user trips over first, run as they would: one spelling of
//! host names and labels on `up` and `host`, errors naming a flag that
//! exists, the CLI finding the admin token `wharf scheduler` wrote (and
//! saying where it looked when it finds none), namespace tokens listing
//! their own services, listing and revoking tokens, the README's
//! self-signed certificate recipe, and `--help` saying what Wharf is.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;
use wharf_testkit::cluster::url_in;
use wharf_testkit::nats::NatsServer;
use wharf_testkit::process::Process;
use wharf_testkit::samples;
use wharf_testkit::wharf::Up;

const WHARF: &str = env!("CARGO_BIN_EXE_wharf");

/// Runs `wharf args` with `env` (and no inherited token or API): (success, stdout + stderr).
fn wharf(args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let mut command = Command::new(WHARF);
    command.args(args).env_remove("WHARF_TOKEN").env_remove("WHARF_API").env_remove("WHARF_DATA_DIR").stdin(Stdio::null());
    for (key, value) in env {
        command.env(key, value);
    }
    let output = command.output().expect("wharf runs");
    (output.status.success(), format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr)))
}

#[test]
fn help_opens_by_saying_what_wharf_is() {
    let (ok, text) = wharf(&["--help"], &[]);
    assert!(ok, "{text}");
    assert!(text.starts_with("Wharf: an orchestrator for WebAssembly"), "{text}");
    for command in ["logs", "events", "describe"] {
        assert!(text.contains(&format!("  {command} ")), "`{command}` is listed:\n{text}");
    }
    let (ok, text) = wharf(&["logs", "--help"], &[]);
    assert!(ok && text.contains("--follow") && text.contains("--since") && text.contains("--tail") && text.contains("--replica") && text.contains("--host"), "{text}");
}

#[test]
fn a_bad_host_name_is_refused_naming_flags_the_command_has_and_nothing_is_created() {
    let dir = tempfile::tempdir().expect("tempdir");
    // `wharf host` takes --host-id as well as --name, and --label as well as --labels.
    let (ok, text) = wharf(
        &["host", "--nats", "nats://127.0.0.1:1", "--host-id", "Bad_Name", "--label", "zone=a", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"],
        &[],
    );
    assert!(!ok, "{text}");
    assert!(text.contains("\"Bad_Name\" is not usable as a host name") && text.contains("--name (or --host-id)"), "{text}");
    assert!(!text.contains("unexpected argument"), "{text}");
    // `wharf up` takes --name and --labels a=b,c=d; a bad name stops it before the data directory exists.
    let data = dir.path().join("data");
    let data_arg = data.to_str().expect("utf-8");
    let (ok, text) =
        wharf(&["up", "--name", "Bad_Name", "--labels", "zone=a,disk=ssd", "--data-dir", data_arg, "--api", "127.0.0.1:0", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"], &[]);
    assert!(!ok && text.contains("--name (or --host-id)"), "{text}");
    assert!(!data.exists(), "nothing was created for a refused start");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_takes_host_spellings_namespace_tokens_list_their_services_and_revoked_tokens_get_401() {
    let dir = tempfile::tempdir().expect("tempdir");
    let up = Up::start(Path::new(WHARF), &dir.path().join("data"), &["--name", "box-1", "--labels", "zone=a,disk=ssd", "--log", "info"]);
    let hosts: serde_json::Value = serde_json::from_str(&up.ok(&["get", "hosts", "-o", "json"])).expect("json");
    let host = &hosts["hosts"][0];
    assert_eq!((host["id"].as_str(), host["labels"]["zone"].as_str(), host["labels"]["disk"].as_str()), (Some("box-1"), Some("a"), Some("ssd")), "{hosts}");
    assert!(!up.process.output().contains('\u{1b}'), "no colour codes in a log written to a pipe:\n{}", up.process.output());

    let hello = samples::path("hello");
    let hello = hello.to_str().expect("utf-8");
    up.ok(&["deploy", hello, "--name", "cart", "--namespace", "shop", "--no-wait"]);
    up.ok(&["deploy", hello, "--name", "web", "--route", "/web"]);
    // One node, the in-process bus: logs and events work the same.
    let response = reqwest::get(format!("{}/web/one", up.ingress)).await.expect("answered");
    assert_eq!(response.status(), 200);
    let logs = up.ok(&["logs", "web"]);
    assert!(logs.lines().any(|l| l == "[box-1 r0 rev1] hello: served /web/one"), "{logs}");
    let events = up.ok(&["events"]);
    assert!(events.lines().any(|l| l.contains("default/web") && l.contains("Placed") && l.contains("box-1")), "{events}");
    let shop = up.ok(&["token", "create", "-n", "shop"]).trim().to_string();
    let as_shop = |args: &[&str]| wharf(args, &[("WHARF_API", &up.api), ("WHARF_TOKEN", &shop)]);
    // A namespace token lists its own services, and only those.
    let (ok, text) = as_shop(&["get", "services"]);
    assert!(ok && text.contains("shop/cart") && !text.contains("default/web"), "{text}");
    let (ok, text) = as_shop(&["get", "services", "-n", "shop"]);
    assert!(ok && text.contains("shop/cart"), "{text}");
    let (ok, text) = as_shop(&["get", "services", "-n", "default"]);
    assert!(!ok && text.contains("may act only in namespace(s) shop, not default"), "{text}");

    // Tokens are listed (ids and roles, never the secrets) and revoked by id.
    let id = shop.split('_').nth(1).expect("an id").to_string();
    let listed = up.ok(&["token", "list"]);
    assert!(listed.contains(&id) && listed.contains("read in shop") && listed.contains("admin") && !listed.contains(&shop), "{listed}");
    let (ok, text) = as_shop(&["token", "list"]);
    assert!(!ok && text.contains("only admin tokens manage tokens"), "{text}");
    let (ok, text) = up.wharf(&["token", "revoke", "0123456789ab"]);
    assert!(!ok && text.contains("no token with id \"0123456789ab\""), "{text}");
    assert!(up.ok(&["token", "revoke", &id]).contains("revoked"));
    let (ok, text) = as_shop(&["get", "services"]);
    assert!(!ok && text.contains("unknown or revoked token"), "{text}");
    let response = reqwest::Client::new().get(format!("{}/v1/namespaces/shop/services", up.api)).bearer_auth(&shop).send().await.expect("answered");
    assert_eq!(response.status(), 401);
    assert!(!up.ok(&["token", "list"]).contains(&id), "a revoked token is no longer listed");
}

#[test]
fn the_cli_finds_the_admin_token_wharf_scheduler_wrote_and_says_where_it_looked_when_there_is_none() {
    let nats = NatsServer::start();
    let home = tempfile::tempdir().expect("tempdir");
    let (data, config) = (home.path().join("data"), home.path().join("config"));
    // `wharf scheduler` with no --data-dir, as the README runs it.
    let mut scheduler = Process::spawn_with(
        Command::new(WHARF)
            .args(["scheduler", "--nats", &nats.url(), "--api", "127.0.0.1:0"])
            .env("XDG_DATA_HOME", &data)
            .env("XDG_CONFIG_HOME", &config)
            .env_remove("WHARF_DATA_DIR"),
    );
    let api = url_in(&scheduler.wait_for_line("Wharf scheduler: API", Duration::from_secs(60)));
    // Printed to stderr around the same time as the API line (to stdout): either may come first.
    std::thread::sleep(Duration::from_millis(200));
    let output = scheduler.output();
    let note = output.lines().find(|l| l.starts_with("admin token:")).unwrap_or_default().to_string();
    assert!(note.contains("scheduler/admin-token") && note.contains("the CLI on this machine reads it"), "{note}");
    let env = [("WHARF_API", api.as_str()), ("XDG_DATA_HOME", data.to_str().expect("utf-8")), ("XDG_CONFIG_HOME", config.to_str().expect("utf-8"))];
    let (ok, text) = wharf(&["get", "services"], &env);
    assert!(ok && text.contains("SERVICE"), "{text}");

    // Elsewhere (another user's data directory) the CLI finds none and says where it looked.
    let empty = tempfile::tempdir().expect("tempdir");
    let env = [("WHARF_API", api.as_str()), ("XDG_DATA_HOME", empty.path().to_str().expect("utf-8")), ("XDG_CONFIG_HOME", empty.path().to_str().expect("utf-8"))];
    let (ok, text) = wharf(&["get", "services"], &env);
    assert!(!ok && text.contains("none was found") && text.contains("WHARF_TOKEN") && text.contains("wharf/scheduler/admin-token"), "{text}");
}

/// The README's recipe: one self-signed certificate for loopback, marked
/// as no CA; and the `openssl req -x509` default (CA:TRUE), which TLS
/// clients refuse as a server certificate, explained when used.
#[test]
fn the_readme_self_signed_certificate_recipe_works_and_a_ca_certificate_as_server_certificate_is_explained() {
    let dir = tempfile::tempdir().expect("tempdir");
    let openssl = |extra: &[&str], name: &str| {
        let mut args = vec!["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "365", "-subj", "/CN=wharf-api"];
        args.extend_from_slice(&["-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"]);
        args.extend_from_slice(extra);
        let (key, cert) = (dir.path().join(format!("{name}.key")), dir.path().join(format!("{name}.pem")));
        let status = Command::new("openssl")
            .args(&args)
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("openssl runs (Debian: apt-get install openssl)");
        assert!(status.success());
        (cert.to_str().expect("utf-8").to_string(), key.to_str().expect("utf-8").to_string())
    };
    let (good_cert, good_key) = openssl(&["-addext", "basicConstraints=critical,CA:FALSE"], "api");
    let (ca_cert, ca_key) = openssl(&[], "ca-as-server");
    for (cert, key, works) in [(&good_cert, &good_key, true), (&ca_cert, &ca_key, false)] {
        let data = dir.path().join(if works { "good" } else { "ca" });
        let up = Up::start(Path::new(WHARF), &data, &["--api-tls-cert", cert, "--api-tls-key", key]);
        let (ok, text) = wharf(&["get", "services", "--ca-cert", cert], &[("WHARF_API", &up.api), ("WHARF_TOKEN", &up.token)]);
        if works {
            assert!(ok && text.contains("SERVICE"), "{text}");
        } else {
            assert!(!ok && text.contains("is a CA certificate (CA:TRUE") && text.contains("basicConstraints=critical,CA:FALSE"), "{text}");
        }
    }
}
