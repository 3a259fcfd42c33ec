//! The NATS flags of `wharf scheduler` reach NATS: bucket copies on a real
//! 3-node cluster, the data buckets' size limit, and the system account;
//! bad values stop the process with the flag named.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use wharf_testkit::nats::{NatsCluster, NatsServer};
use wharf_testkit::process::Process;

const WHARF: &str = env!("CARGO_BIN_EXE_wharf");

/// `wharf scheduler` over `nats` with `extra` flags, and its API URL and admin token, once it serves.
fn scheduler(nats: &str, dir: &Path, extra: &[&str]) -> (Process, String, String) {
    let mut args = vec![
        "scheduler",
        "--nats",
        nats,
        "--api",
        "127.0.0.1:0",
        "--data-dir",
        dir.to_str().expect("utf-8"),
    ];
    args.extend_from_slice(extra);
    let mut process = Process::spawn(WHARF, &args);
    let line = process.wait_for_line("Wharf scheduler: API", Duration::from_secs(60));
    let api = line
        .split_whitespace()
        .find(|word| word.starts_with("http://"))
        .expect("the API's URL")
        .to_owned();
    let token = std::fs::read_to_string(dir.join("admin-token"))
        .expect("admin token written on start")
        .trim()
        .to_owned();
    (process, api, token)
}

/// Waits until stream `stream` reports `replicas` copies.
fn wait_for_replicas(cluster: &NatsCluster, stream: &str, replicas: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while cluster.stream_replicas(stream) != Some(replicas) {
        assert!(
            Instant::now() < deadline,
            "{stream} has {:?} replicas, not {replicas}",
            cluster.stream_replicas(stream)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scheduler_lays_out_its_buckets_as_told() {
    let cluster = NatsCluster::start(3);
    let dir = tempfile::tempdir().expect("tempdir");
    let (_scheduler, api, token) = scheduler(
        &cluster.urls(),
        dir.path(),
        &["--kv-replicas", "2", "--data-kv-max-bytes", "16KiB"],
    );
    // The control plane's own buckets, and the component store.
    wait_for_replicas(&cluster, "KV_wharf-services", 2);
    wait_for_replicas(&cluster, "KV_wharf-assignments", 2);
    wait_for_replicas(&cluster, "OBJ_wharf-artifacts", 2);

    // A namespace's data bucket gets the data limit: 1 KiB values fill it
    // after some 15, and the next write is refused, naming the bucket.
    let client = reqwest::Client::new();
    let mut stored = 0;
    let refusal = loop {
        let response = client
            .put(format!("{api}/v1/namespaces/default/kv/notes/k{stored}"))
            .bearer_auth(&token)
            .body(vec![b'x'; 1024])
            .send()
            .await
            .expect("the API answers");
        if response.status() != 200 {
            break (response.status().as_u16(), response.text().await.unwrap_or_default());
        }
        stored += 1;
        assert!(stored < 64, "64 KiB went into a 16 KiB bucket");
    };
    assert_eq!(refusal.0, 507, "{refusal:?}");
    let body: Value = serde_json::from_str(&refusal.1).expect("a JSON error");
    assert_eq!(body["error"]["code"], "quota_exceeded", "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("wharf-kv-default") && message.contains("16 KiB"),
        "{message}"
    );
    assert!((10..16).contains(&stored), "{stored} values of 1 KiB fit");
    wait_for_replicas(&cluster, "KV_wharf-kv-default", 2);
}

#[test]
fn bad_nats_flags_are_refused_with_the_flag_named() {
    for (args, named) in [
        (&["--kv-replicas", "0"][..], "--kv-replicas"),
        (&["--kv-replicas", "6"][..], "--kv-replicas"),
        (&["--kv-max-bytes", "lots"][..], "--kv-max-bytes"),
        (&["--data-kv-max-bytes=-1"][..], "--data-kv-max-bytes"),
        (&["--nats-system-password", "x"][..], "--nats-system-user"),
        (
            &["--nats-system-user", "system", "--nats-system-creds", "/x.creds"][..],
            "--nats-system-creds",
        ),
    ] {
        let output = Command::new(WHARF)
            .args(["scheduler", "--nats", "nats://127.0.0.1:1"])
            .args(args)
            .env_remove("WHARF_NATS_SYSTEM_USER")
            .output()
            .expect("wharf runs");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?} was accepted");
        assert!(stderr.contains(named), "{args:?}: {stderr}");
    }
}

#[test]
fn a_wrong_system_password_stops_the_scheduler() {
    let server = NatsServer::start_with_config(
        r#"
        accounts {
          WHARF: { jetstream: enabled, users: [ { user: scheduler, password: s } ] }
          SYS: { users: [ { user: system, password: sys } ] }
        }
        system_account: SYS
        "#,
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let mut process = Process::spawn(
        WHARF,
        &[
            "scheduler",
            "--nats",
            &server.url(),
            "--nats-user",
            "scheduler",
            "--nats-password",
            "s",
            "--nats-system-user",
            "system",
            "--nats-system-password",
            "wrong",
            "--api",
            "127.0.0.1:0",
            "--data-dir",
            dir.path().to_str().expect("utf-8"),
        ],
    );
    let status = process.wait(Duration::from_secs(60));
    assert!(!status.success());
    let output = process.output();
    assert!(
        output.contains("cannot connect to the NATS system account"),
        "{output}"
    );
}
