//! The shipped NATS configuration (`deploy/nats/`) works as its README says:
//! the three-node cluster and the single server start from the files as they
//! are (random ports and temporary stores put in by flags), a scheduler-role
//! client keeps buckets on three servers, and the system user hears
//! disconnects. Hosts' own identities, which `wharf nats add-host` adds to
//! these files, are tested with the `wharf` binary in cli/tests/cluster.rs.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use wharf_bus::{Bus, NatsAuth, NatsOptions};
use wharf_testkit::nats::{ClusterOptions, ConfigFile, NatsCluster, NatsServer};

/// A shipped config file, run as its README says: with the passwords
/// `deploy/nats/accounts.conf` reads and the store directory in `WHARF_NATS_DATA`.
fn shipped(file: &str) -> ConfigFile {
    ConfigFile {
        path: PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/nats")).join(file),
        env: [
            ("WHARF_SCHEDULER_PASSWORD", "s3cret-s"),
            ("WHARF_SYSTEM_PASSWORD", "s3cret-sys"),
        ]
        .map(|(key, value)| (key.to_owned(), value.to_owned()))
        .to_vec(),
        store_dir_var: Some("WHARF_NATS_DATA".to_owned()),
    }
}

fn as_user(name: &str, user: &str, password: &str) -> NatsOptions {
    NatsOptions {
        name: name.to_owned(),
        auth: NatsAuth::UserPassword {
            user: user.to_owned(),
            password: password.to_owned(),
        },
        ..NatsOptions::default()
    }
}

/// Checks the roles of the shipped accounts on the server(s) at `urls`;
/// buckets the scheduler creates there get `replicas` copies.
async fn roles_hold(urls: &str, replicas: u64, copies: impl Fn(&str) -> Option<u64>) {
    let scheduler = Bus::connect_nats(
        urls,
        NatsOptions {
            system_auth: Some(NatsAuth::UserPassword {
                user: "system".to_owned(),
                password: "s3cret-sys".to_owned(),
            }),
            ..as_user("wharf-scheduler", "scheduler", "s3cret-s")
        },
    )
    .await
    .expect("the scheduler role connects, with the system user");
    let services = scheduler.kv("wharf-services").await.expect("create");
    services
        .put("default.web", Bytes::from_static(b"{}"))
        .await
        .expect("the scheduler writes desired state");
    scheduler
        .kv_with("wharf-kv-default", scheduler.storage_limits().data)
        .await
        .expect("create a data bucket");
    let deadline = Instant::now() + Duration::from_secs(30);
    while copies("KV_wharf-services") != Some(replicas) {
        assert!(
            Instant::now() < deadline,
            "wharf-services has {:?} copies, not {replicas}",
            copies("KV_wharf-services")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut disconnects = scheduler
        .client_disconnects()
        .await
        .expect("the system user hears advisories");

    {
        // Hosts' own identities (users.conf, `wharf nats add-host`) are
        // checked against this config in cli/tests/cluster.rs; here a second
        // client of the control plane's user comes and goes.
        let other = Bus::connect_nats(urls, as_user("wharf-other", "scheduler", "s3cret-s"))
            .await
            .expect("a second scheduler connects");
        other.kv("wharf-services").await.expect("open");
        // Its last handle dropped, the connection closes.
    }
    let gone = tokio::time::timeout(Duration::from_secs(10), disconnects.next())
        .await
        .expect("no advisory for the second connection")
        .expect("the advisories ended");
    assert_eq!(
        (gone.name.as_str(), gone.user.as_str()),
        ("wharf-other", "scheduler")
    );
    assert_eq!(gone.account, "WHARF");
}

#[tokio::test]
async fn the_shipped_cluster_runs_with_three_copies_and_the_roles() {
    let options = ClusterOptions {
        config_files: ["a", "b", "c"]
            .map(|node| shipped(&format!("cluster/node-{node}.conf")))
            .to_vec(),
        ..ClusterOptions::default()
    };
    let cluster = NatsCluster::start_with(3, &options);
    roles_hold(&cluster.urls(), 3, |stream| cluster.stream_replicas(stream)).await;
}

#[tokio::test]
async fn the_shipped_single_server_runs_with_the_roles() {
    let server = NatsServer::start_from(&shipped("nats-server.conf"));
    // One server: the bus creates every bucket with one copy (three would be refused).
    roles_hold(&server.url(), 1, |_| Some(1)).await;
}

#[tokio::test]
async fn the_shipped_configuration_needs_its_passwords() {
    // Without the variables nats-server refuses to start, naming the first one missing.
    let file = ConfigFile {
        env: Vec::new(),
        ..shipped("nats-server.conf")
    };
    let result = std::panic::catch_unwind(|| NatsServer::start_from(&file));
    let message = match result {
        Ok(_) => panic!("nats-server started without the passwords"),
        Err(panic) => panic.downcast_ref::<String>().cloned().unwrap_or_default(),
    };
    assert!(message.contains("WHARF_SCHEDULER_PASSWORD"), "{message}");
}
