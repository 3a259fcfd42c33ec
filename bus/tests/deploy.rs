//! The shipped NATS configuration (`deploy/nats/`) works as its README says:
//! the three-node cluster and the single server start from the files as they
//! are (random ports and temporary stores put in by flags, certificates made
//! here), clients and routes speak mutual TLS, a scheduler-role client keeps
//! buckets on three servers, and the system user hears disconnects. Hosts'
//! own identities, which `wharf nats add-host` adds to these files, are
//! tested with the `wharf` binary in cli/tests/cluster.rs.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use wharf_bus::{
    Bus, ClientCertificate, ConnectError, NatsAuth, NatsOptions, NatsTls, TlsFailure,
};
use wharf_testkit::nats::{ClusterOptions, ConfigFile, NatsCluster, NatsServer};
use wharf_testkit::tls::{self, TestCerts};

/// The passwords `deploy/nats/accounts.conf` reads.
const PASSWORDS: [(&str, &str); 2] = [
    ("WHARF_SCHEDULER_PASSWORD", "s3cret-s"),
    ("WHARF_SYSTEM_PASSWORD", "s3cret-sys"),
];

/// The certificate variables the shipped configs' `tls` blocks read.
fn certificates(certs: &TestCerts) -> Vec<(String, String)> {
    [
        ("WHARF_NATS_CA", &certs.ca),
        ("WHARF_NATS_SERVER_CERT", &certs.cert),
        ("WHARF_NATS_SERVER_KEY", &certs.key),
    ]
    .map(|(key, path)| (key.to_owned(), path.display().to_string()))
    .to_vec()
}

/// A shipped config file, run as its README says: with the passwords and
/// certificates it reads and the store directory in `WHARF_NATS_DATA`.
fn shipped(file: &str, certs: &TestCerts) -> ConfigFile {
    let mut env = certificates(certs);
    env.extend(PASSWORDS.map(|(key, value)| (key.to_owned(), value.to_owned())));
    ConfigFile {
        path: PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/nats")).join(file),
        env,
        store_dir_var: Some("WHARF_NATS_DATA".to_owned()),
    }
}

/// TLS with the test CA and its client certificate, as every Wharf process connects.
fn mutual_tls(certs: &TestCerts) -> Option<NatsTls> {
    Some(NatsTls {
        ca: Some(certs.ca.clone()),
        client: Some(ClientCertificate {
            cert: certs.client_cert.clone(),
            key: certs.client_key.clone(),
        }),
    })
}

fn as_user(name: &str, user: &str, password: &str, certs: &TestCerts) -> NatsOptions {
    NatsOptions {
        name: name.to_owned(),
        auth: NatsAuth::UserPassword {
            user: user.to_owned(),
            password: password.to_owned(),
        },
        tls: mutual_tls(certs),
        ..NatsOptions::default()
    }
}

/// Checks the roles of the shipped accounts on the server(s) at `urls`,
/// over mutual TLS with `certs`; buckets the scheduler creates there get
/// `replicas` copies.
async fn roles_hold(
    urls: &str,
    certs: &TestCerts,
    replicas: u64,
    copies: impl Fn(&str) -> Option<u64>,
) {
    let scheduler = Bus::connect_nats(
        urls,
        NatsOptions {
            system_auth: Some(NatsAuth::UserPassword {
                user: "system".to_owned(),
                password: "s3cret-sys".to_owned(),
            }),
            ..as_user("wharf-scheduler", "scheduler", "s3cret-s", certs)
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
        let other = Bus::connect_nats(urls, as_user("wharf-other", "scheduler", "s3cret-s", certs))
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
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = tls::write(dir.path());
    let options = ClusterOptions {
        config_files: ["a", "b", "c"]
            .map(|node| shipped(&format!("cluster/node-{node}.conf"), &certs))
            .to_vec(),
        ..ClusterOptions::default()
    };
    // The nodes form a cluster only if their routes' TLS holds.
    let cluster = NatsCluster::start_with(3, &options);
    for node in 0..cluster.size() {
        let varz = cluster.monitor(node, "/varz").expect("varz");
        assert_eq!(
            (
                &varz["cluster"]["tls_required"],
                &varz["cluster"]["tls_verify"]
            ),
            (
                &serde_json::Value::Bool(true),
                &serde_json::Value::Bool(true)
            ),
            "routes of node {node}: {}",
            varz["cluster"]
        );
    }
    roles_hold(&cluster.urls(), &certs, 3, |stream| {
        cluster.stream_replicas(stream)
    })
    .await;
}

#[tokio::test]
async fn the_shipped_single_server_runs_with_the_roles() {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = tls::write(dir.path());
    let server = NatsServer::start_from(&shipped("nats-server.conf", &certs));
    // One server: the bus creates every bucket with one copy (three would be refused).
    roles_hold(&server.url(), &certs, 1, |_| Some(1)).await;

    // Without its client certificate, the right password is not enough.
    let without_certificate = NatsOptions {
        tls: Some(NatsTls {
            ca: Some(certs.ca.clone()),
            client: None,
        }),
        ..as_user("wharf-scheduler-s2", "scheduler", "s3cret-s", &certs)
    };
    match Bus::connect_nats(&server.url(), without_certificate).await {
        Err(ConnectError::Tls { failure, .. }) => {
            assert_eq!(failure, TlsFailure::ClientCertificateRequired);
        }
        Err(other) => panic!("refused, but not for the certificate: {other}"),
        Ok(_) => panic!("a client without a certificate connected"),
    }
}

#[tokio::test]
async fn the_shipped_configuration_needs_its_passwords_and_certificates() {
    // Without a variable nats-server refuses to start, naming the first one missing.
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = tls::write(dir.path());
    let refusal = |env: Vec<(String, String)>| {
        let file = ConfigFile {
            env,
            ..shipped("nats-server.conf", &certs)
        };
        match std::panic::catch_unwind(|| NatsServer::start_from(&file)) {
            Ok(_) => panic!("nats-server started without all its variables"),
            Err(panic) => panic.downcast_ref::<String>().cloned().unwrap_or_default(),
        }
    };
    let message = refusal(certificates(&certs));
    assert!(message.contains("WHARF_SCHEDULER_PASSWORD"), "{message}");
    let message = refusal(
        PASSWORDS
            .map(|(key, value)| (key.to_owned(), value.to_owned()))
            .to_vec(),
    );
    assert!(message.contains("WHARF_NATS_SERVER_CERT"), "{message}");
}
