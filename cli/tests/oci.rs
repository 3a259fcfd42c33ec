//! Components from OCI registries, against a real registry (Debian's
//! `docker-registry`) on loopback and a real `wharf up`: `push` then
//! `deploy oci://` round-trips in the standard wasm artifact layout, bad
//! references are refused with what was wrong and change nothing, and basic
//! auth and a private CA work.

use serde_json::Value;
use std::path::Path;
use wharf_proto::Digest;
use wharf_testkit::registry::{Registry, RegistryOptions};
use wharf_testkit::samples;
use wharf_testkit::wharf::Up;

const WHARF: &str = env!("CARGO_BIN_EXE_wharf");

fn sample(name: &str) -> String {
    samples::path(name).to_str().expect("utf-8 path").to_string()
}

async fn get(url: &str) -> (u16, String) {
    let response = reqwest::get(url).await.expect("answered");
    (response.status().as_u16(), response.text().await.expect("body"))
}

/// The services the API holds, as `get services -o json` prints them.
fn services(cluster: &Up) -> Vec<Value> {
    let text = cluster.ok(&["get", "services", "-o", "json"]);
    serde_json::from_str::<Value>(&text).expect("json").as_array().cloned().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_then_deploy_round_trips_in_the_wasm_artifact_layout() {
    let registry = Registry::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = Up::start(Path::new(WHARF), &dir.path().join("data"), &["--host-id", "oci"]);
    let hello = samples::bytes("hello");
    let reference = format!("{}/wharf/hello:v1", registry.addr);

    let pushed = cluster.ok(&["push", &sample("hello"), &reference]);
    assert!(pushed.contains(&format!("component {}", Digest::of(&hello))), "{pushed}");
    let pinned = pushed.lines().find_map(|l| l.strip_prefix("deploy it with: wharf deploy ")).expect("a pinned reference").trim().to_string();
    assert!(pinned.starts_with(&format!("oci://{reference}@sha256:")), "{pinned}");

    // What is in the registry is the layout `wkg oci push` writes.
    let client = reqwest::Client::new();
    let manifest: Value = client
        .get(format!("http://{}/v2/wharf/hello/manifests/v1", registry.addr))
        .header("accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await
        .expect("manifest")
        .json()
        .await
        .expect("json manifest");
    assert_eq!(manifest["mediaType"], "application/vnd.oci.image.manifest.v1+json", "{manifest}");
    assert_eq!(manifest["config"]["mediaType"], "application/vnd.wasm.config.v0+json", "{manifest}");
    let layers = manifest["layers"].as_array().expect("layers");
    assert_eq!(layers.len(), 1, "{manifest}");
    assert_eq!(layers[0]["mediaType"], "application/wasm");
    assert_eq!(layers[0]["digest"], Digest::of(&hello).to_string());
    let config_digest = manifest["config"]["digest"].as_str().expect("config digest");
    let config: Value =
        client.get(format!("http://{}/v2/wharf/hello/blobs/{config_digest}", registry.addr)).send().await.expect("config").json().await.expect("json config");
    assert_eq!((config["architecture"].as_str(), config["os"].as_str()), (Some("wasm"), Some("wasip2")), "{config}");
    assert_eq!(config["layerDigests"][0], Digest::of(&hello).to_string());
    let exports = config["component"]["exports"].as_array().expect("exports");
    assert!(exports.iter().any(|e| e.as_str().is_some_and(|e| e.starts_with("wasi:http/incoming-handler@0.2"))), "{config}");

    // By tag: the service is named after the repository and answers.
    let deployed = cluster.ok(&["deploy", &format!("oci://{reference}"), "--route", "/hello"]);
    assert!(deployed.contains("default/hello"), "{deployed}");
    let (status, body) = get(&format!("{}/hello", cluster.ingress)).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("Hello"), "{body}");
    let table = cluster.ok(&["get", "services"]);
    assert!(table.contains("SOURCE") && table.contains(&format!("oci://{reference}")), "{table}");
    let view = cluster.service("hello");
    assert_eq!(view["service"]["spec"]["source"], format!("oci://{reference}"), "{view}");
    assert_eq!(view["service"]["spec"]["component"], Digest::of(&hello).to_string());

    // By the pinned manifest digest, and from a manifest.
    cluster.ok(&["deploy", &pinned, "--name", "pinned", "--route", "/pinned"]);
    assert_eq!(cluster.service("pinned")["service"]["spec"]["source"], pinned);
    let manifest_file = dir.path().join("app.yaml");
    std::fs::write(&manifest_file, format!("name: listed\ncomponent: {{ oci: \"{reference}\" }}\nroutes: [{{ path_prefix: /listed }}]\n")).expect("write");
    cluster.ok(&["apply", "-f", manifest_file.to_str().expect("utf-8")]);
    let (status, body) = get(&format!("{}/listed", cluster.ingress)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(cluster.service("listed")["service"]["spec"]["source"], format!("oci://{reference}"));
    // A file upload says so.
    cluster.ok(&["deploy", &sample("echo"), "--name", "uploaded", "--no-wait"]);
    let table = cluster.ok(&["get", "services"]);
    let uploaded = table.lines().find(|l| l.starts_with("default/uploaded")).expect("listed");
    assert!(uploaded.contains("upload"), "{table}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_references_are_refused_with_what_was_wrong_and_change_nothing() {
    let registry = Registry::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = Up::start(Path::new(WHARF), &dir.path().join("data"), &["--host-id", "oci-bad"]);
    let repository = format!("{}/wharf/hello", registry.addr);
    cluster.ok(&["push", &sample("hello"), &format!("{repository}:v1")]);

    let refused = |args: &[&str], expected: &str| {
        let (ok, out) = cluster.wharf(args);
        assert!(!ok, "{args:?} should fail:\n{out}");
        assert!(out.contains(expected), "{args:?}: expected {expected:?} in:\n{out}");
    };
    let wrong = Digest::of(b"not this manifest");
    refused(&["deploy", &format!("oci://{repository}@{wrong}")], &format!("{repository} has no manifest {wrong}"));
    // The component's own digest is not the manifest's: the error says which one is meant.
    let component = Digest::of(&samples::bytes("hello"));
    refused(&["deploy", &format!("oci://{repository}:v1@{component}")], "must be the manifest's");
    refused(&["deploy", &format!("oci://{repository}:v2")], &format!("{repository} has no tag \"v2\""));
    refused(&["deploy", &format!("oci://{}/wharf/missing:v1", registry.addr)], "wharf/missing");
    refused(&["deploy", "oci://hello:v1"], "name the registry first");
    refused(&["deploy", &format!("oci://{repository}")], "give a tag");
    // A component that exports nothing a host runs is not pushed, so its tag stays unknown.
    let empty = dir.path().join("empty.wasm");
    std::fs::write(&empty, b"\0asm\x0d\0\x01\0").expect("write");
    refused(&["push", empty.to_str().expect("utf-8"), &format!("{repository}:broken")], "cannot be pushed");
    refused(&["deploy", &format!("oci://{repository}:broken")], "has no tag \"broken\"");
    // Nothing was deployed by any of these.
    assert!(services(&cluster).is_empty(), "{:?}", services(&cluster));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_and_a_private_ca() {
    let registry = Registry::start_with(RegistryOptions { basic_auth: Some(("deployer".into(), "s3cret-pass".into())), tls: true });
    let ca = registry.certs.as_ref().expect("tls").ca.to_str().expect("utf-8").to_string();
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = Up::start(Path::new(WHARF), &dir.path().join("data"), &["--host-id", "oci-auth"]);
    let reference = format!("{}/team/hello:v1", registry.addr);
    let credentials = ["--registry-user", "deployer", "--registry-password", "s3cret-pass"];

    let fails = |args: Vec<&str>, expected: &str| {
        let (ok, out) = cluster.wharf(&args);
        assert!(!ok, "{args:?} should fail:\n{out}");
        assert!(out.contains(expected), "{args:?}: expected {expected:?} in:\n{out}");
    };
    let hello = sample("hello");
    fails(vec!["push", &hello, &reference, "--registry-ca", &ca], "the registry needs credentials");
    let mut untrusted = vec!["push", hello.as_str(), reference.as_str()];
    untrusted.extend(credentials);
    fails(untrusted, "--registry-ca");
    let mut push = vec!["push", hello.as_str(), reference.as_str(), "--registry-ca", ca.as_str()];
    push.extend(credentials);
    cluster.ok(&push);

    let source = format!("oci://{reference}");
    fails(
        vec!["deploy", &source, "--registry-ca", &ca, "--registry-user", "deployer", "--registry-password", "wrong"],
        "the registry refused the credentials given",
    );
    assert!(services(&cluster).is_empty());
    let mut deploy = vec!["deploy", source.as_str(), "--route", "/", "--registry-ca", ca.as_str()];
    deploy.extend(credentials);
    cluster.ok(&deploy);
    let (status, body) = get(&format!("{}/", cluster.ingress)).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("Hello"), "{body}");
}
