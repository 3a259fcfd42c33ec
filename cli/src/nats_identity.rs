//! Each host's own NATS identity: `wharf nats add-host` makes a host an NKey
//! (the seed, its secret, in a file only its owner can read) and rewrites the
//! NATS server's `users.conf` with every host's public key and permissions
//! scoped to that host's subjects; `wharf host --nats-nkey` connects with it.
//!
//! The server's config directory (`deploy/nats/` as shipped) keeps one
//! public key per host in `hosts/<id>.pub`; `users.conf` is made from them
//! and the scheduler's user every time, so it never needs editing by hand
//! and no host's permissions can drift from the others'. NATS config has no
//! way to join arrays or to template a user's permissions with its name
//! (outside JWT accounts), hence one generated file holding the whole
//! `users` list of Wharf's account (the variable `WHARF_USERS`, which
//! `accounts.conf` gives the account).

use anyhow::Context;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use wharf_proto::HostId;
use wharf_proto::names;

#[derive(clap::Subcommand)]
pub enum NatsCommand {
    /// Give a host its own NATS identity (an NKey), permitted only its own subjects.
    ///
    /// Writes the host's NKey seed (its secret, mode 0600) and public key (DIR/hosts/HOST-ID.pub),
    /// and rewrites DIR/users.conf from every host's key, so that the host may publish only its
    /// own heartbeats and subscribe only to its own subjects and inboxes besides the shared
    /// subjects serving needs. Then copy the seed to the host, run it with
    /// `wharf host --name HOST-ID --nats-nkey SEED-FILE`, and reload the NATS server
    /// (`nats-server --signal reload`, or SIGHUP); with a cluster, copy users.conf to every node.
    #[command(after_help = "Example:\n  wharf nats add-host edge-a --dir /etc/nats/wharf\n  scp /etc/nats/wharf/hosts/edge-a.nk edge-a:/etc/wharf/nats.nk && rm /etc/nats/wharf/hosts/edge-a.nk\n  nats-server --signal reload\n  # on edge-a:\n  wharf host --nats nats://10.0.0.1:4222 --name edge-a --nats-nkey /etc/wharf/nats.nk")]
    AddHost(AddHostArgs),
    /// Revoke a host's NATS identity.
    ///
    /// Removes its public key (and its seed file, if still in DIR/hosts) and rewrites
    /// DIR/users.conf without it; reload the NATS server afterwards.
    RemoveHost(RemoveHostArgs),
    /// Write a CA, a server certificate and client certificates for NATS over mutual TLS.
    Certs(crate::nats_certs::CertsArgs),
    /// Accept only pinned client certificates: add certificates to DIR/pinned.conf.
    ///
    /// The shipped server configs include pinned.conf in their `tls` block: while it pins
    /// nothing, the servers accept any certificate the CA signed; once it pins some, only
    /// those (so one can be revoked with `wharf nats unpin`, without a new CA). Pin every
    /// client's certificate (the scheduler's, each host's: `wharf nats add-host --cert`
    /// pins a host's), then reload the NATS server.
    #[command(after_help = "Example:
  wharf nats pin --dir deploy/nats /etc/wharf/nats/scheduler.pem
  nats-server --signal reload")]
    Pin(crate::nats_pins::PinArgs),
    /// Revoke client certificates: remove them from DIR/pinned.conf.
    ///
    /// After a reload the servers drop connections made with them and refuse new ones.
    #[command(after_help = "Example:
  wharf nats unpin --dir deploy/nats /etc/wharf/nats/old-scheduler.pem
  nats-server --signal reload")]
    Unpin(crate::nats_pins::UnpinArgs),
}

#[derive(clap::Args)]
pub struct AddHostArgs {
    /// The host's id, as its `wharf host --name` says it (a DNS label).
    host: HostId,
    /// The NATS server's config directory, the one holding accounts.conf (deploy/nats as shipped).
    #[arg(long)]
    dir: PathBuf,
    /// Where to write the host's NKey seed (default: DIR/hosts/HOST-ID.nk); it must not exist.
    #[arg(long, value_name = "PATH")]
    seed_file: Option<PathBuf>,
    /// The host's client certificate (PEM), pinned in DIR/pinned.conf as the host's, so that
    /// `wharf nats remove-host` revokes it along with the NKey.
    #[arg(long, value_name = "PEM")]
    cert: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct RemoveHostArgs {
    /// The host's id.
    host: HostId,
    /// The NATS server's config directory, the one holding accounts.conf.
    #[arg(long)]
    dir: PathBuf,
}

pub fn run(command: NatsCommand) -> anyhow::Result<()> {
    match command {
        NatsCommand::AddHost(args) => {
            // The certificate is read before anything is written: a bad one changes nothing.
            if let Some(cert) = &args.cert {
                crate::nats_pins::fingerprint_file(cert)?;
            }
            let seed = add_host(&args.dir, &args.host, args.seed_file)?;
            println!("host {}: NKey seed in {} (mode 0600), permissions in {}", args.host, seed.display(), args.dir.join(USERS_FILE).display());
            if let Some(cert) = &args.cert {
                let pin = crate::nats_pins::pin_host(&args.dir, &args.host, cert)?;
                println!("host {}: certificate {} pinned ({pin}) in {}", args.host, cert.display(), args.dir.join(crate::nats_pins::PINS_FILE).display());
            }
            println!("copy the seed to the host and run it with: wharf host --name {} --nats-nkey <seed file>", args.host);
            println!("then reload the NATS server: nats-server --signal reload (with a cluster, copy users.conf to every node first)");
        }
        NatsCommand::Certs(args) => crate::nats_certs::certs(&args)?,
        NatsCommand::RemoveHost(args) => {
            // Checked before anything is removed: a refusal changes nothing.
            crate::nats_pins::check_unpin_host(&args.dir, &args.host)?;
            remove_host(&args.dir, &args.host)?;
            println!("host {}: identity removed from {}", args.host, args.dir.join(USERS_FILE).display());
            if crate::nats_pins::unpin_host(&args.dir, &args.host)? {
                println!("host {}: certificate unpinned in {}", args.host, args.dir.join(crate::nats_pins::PINS_FILE).display());
            }
            println!("reload the NATS server (nats-server --signal reload): it drops the host's connection");
        }
        NatsCommand::Pin(args) => crate::nats_pins::pin(&args)?,
        NatsCommand::Unpin(args) => crate::nats_pins::unpin(&args)?,
    }
    Ok(())
}

/// The generated file holding the `users` of Wharf's account.
pub const USERS_FILE: &str = "users.conf";

/// The directory (in the server's config directory) of hosts' public keys.
const HOSTS_DIR: &str = "hosts";

/// Makes `host` an NKey: its public key goes to `dir/hosts/<host>.pub`, its
/// seed to `seed_file` (default `dir/hosts/<host>.nk`, mode 0600, never
/// replacing a file), and `dir/users.conf` is rewritten. Returns where the seed is.
pub fn add_host(dir: &Path, host: &HostId, seed_file: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    anyhow::ensure!(
        dir.join("accounts.conf").exists(),
        "{} holds no accounts.conf: give --dir the NATS server's config directory (deploy/nats as shipped)",
        dir.display()
    );
    let hosts = dir.join(HOSTS_DIR);
    std::fs::create_dir_all(&hosts).with_context(|| format!("cannot create {}", hosts.display()))?;
    let public = public_key_file(dir, host);
    anyhow::ensure!(
        !public.exists(),
        "host {host} already has an identity ({}); to give it a new key, `wharf nats remove-host {host}` first",
        public.display()
    );
    let pair = nkeys::KeyPair::new_user();
    let seed = pair.seed().map_err(|e| anyhow::anyhow!("cannot encode the new key's seed: {e}"))?;
    let seed_file = seed_file.unwrap_or_else(|| hosts.join(format!("{host}.nk")));
    write_new_private(&seed_file, &format!("{seed}\n")).with_context(|| format!("cannot write the seed file {} (it must not exist)", seed_file.display()))?;
    std::fs::write(&public, format!("{}\n", pair.public_key())).with_context(|| format!("cannot write {}", public.display()))?;
    write_users(dir)?;
    Ok(seed_file)
}

/// Removes `host`'s public key (and seed, if it is still in `dir/hosts`) and rewrites `dir/users.conf`.
pub fn remove_host(dir: &Path, host: &HostId) -> anyhow::Result<()> {
    let public = public_key_file(dir, host);
    anyhow::ensure!(public.exists(), "host {host} has no identity in {}", dir.join(HOSTS_DIR).display());
    std::fs::remove_file(&public).with_context(|| format!("cannot remove {}", public.display()))?;
    let seed = dir.join(HOSTS_DIR).join(format!("{host}.nk"));
    if seed.exists() {
        std::fs::remove_file(&seed).with_context(|| format!("cannot remove {}", seed.display()))?;
    }
    write_users(dir)
}

fn public_key_file(dir: &Path, host: &HostId) -> PathBuf {
    dir.join(HOSTS_DIR).join(format!("{host}.pub"))
}

/// Every host with an identity in `dir`, and its public key, by id.
fn hosts(dir: &Path) -> anyhow::Result<Vec<(HostId, String)>> {
    let hosts = dir.join(HOSTS_DIR);
    let mut found = Vec::new();
    let entries = match std::fs::read_dir(&hosts) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(found),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", hosts.display())),
    };
    for entry in entries {
        let path = entry.with_context(|| format!("cannot read {}", hosts.display()))?.path();
        let Some(id) = path.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix(".pub")) else { continue };
        let host = HostId::new(id).with_context(|| format!("{}: not a host id", path.display()))?;
        let key = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?.trim().to_owned();
        let valid = nkeys::KeyPair::from_public_key(&key).is_ok_and(|k| matches!(k.key_pair_type(), nkeys::KeyPairType::User));
        anyhow::ensure!(valid, "{} does not hold a user's public NKey (U...)", path.display());
        found.push((host, key));
    }
    found.sort();
    Ok(found)
}

/// Rewrites `dir/users.conf` from the public keys in `dir/hosts` (written
/// aside and renamed over, so a server reloading meanwhile never reads half).
fn write_users(dir: &Path) -> anyhow::Result<()> {
    let text = users_conf(&hosts(dir)?);
    let path = dir.join(USERS_FILE);
    let aside = dir.join(format!(".{USERS_FILE}.new"));
    std::fs::write(&aside, text).with_context(|| format!("cannot write {}", aside.display()))?;
    std::fs::rename(&aside, &path).with_context(|| format!("cannot replace {}", path.display()))
}

/// The `users` of Wharf's account: the scheduler (password from the
/// server's environment, permissions `$WHARF_SCHEDULER` of roles.conf) and
/// one NKey user per host, each with [`host_permissions`].
pub fn users_conf(hosts: &[(HostId, String)]) -> String {
    let mut out = String::from(
        "# The users of Wharf's NATS account, WHARF_USERS (accounts.conf includes this file).\n\
         # Written by `wharf nats add-host` / `wharf nats remove-host` from the public keys\n\
         # in hosts/: do not edit; run one of them, then reload the server\n\
         # (nats-server --signal reload). Each host's permissions name its own subjects.\n\
         # (An included file sees only the variables it defines or includes itself.)\n\
         include ./roles.conf\n\
         WHARF_USERS = [\n  \
         # The control plane: everything (roles.conf).\n  \
         { user: scheduler, password: $WHARF_SCHEDULER_PASSWORD, permissions: $WHARF_SCHEDULER }\n",
    );
    for (host, key) in hosts {
        let permissions = host_permissions(host);
        let _ = writeln!(out, "  # Host {host}.\n  {{ nkey: {key}, permissions: {{");
        let list = |out: &mut String, name: &str, entries: &[(String, &str)]| {
            let _ = writeln!(out, "      {name}: [");
            for (subject, why) in entries {
                let quoted = format!("\"{subject}\"");
                let _ = if why.is_empty() { writeln!(out, "        {quoted}") } else { writeln!(out, "        {quoted:<40}# {why}") };
            }
            let _ = writeln!(out, "      ]");
        };
        out.push_str("    publish: {\n");
        list(&mut out, "allow", &permissions.publish);
        list(&mut out, "deny", &permissions.publish_deny);
        out.push_str("    }\n    subscribe: {\n");
        list(&mut out, "allow", &permissions.subscribe);
        out.push_str("    }\n  } }\n");
    }
    out.push_str("]\n");
    out
}

/// What one host's NATS identity may do: subjects, each with why.
pub struct HostPermissions {
    pub publish: Vec<(String, &'static str)>,
    pub publish_deny: Vec<(String, &'static str)>,
    pub subscribe: Vec<(String, &'static str)>,
}

/// The permissions of `host`: publish its own heartbeats (no other host's),
/// what serving and running jobs need (requests to other hosts' replicas
/// among them), asks to the control plane's brokers (consumers; services'
/// key-value data) and reads of the buckets it follows; never the control
/// plane's buckets, never a consumer. Subscribe only to its own
/// `wharf.host.<id>.>` subjects (requests for the services it runs among
/// them, and the messages the control plane takes in for triggered
/// services) and its own inboxes ([`names::host_inbox_prefix`]), besides
/// the shared announcements. Never components' messages (`wharf.msg.>`):
/// the control plane takes those in and hands each to one host.
pub fn host_permissions(host: &HostId) -> HostPermissions {
    let publish = vec![
        (names::host_heartbeat_subject(host), "its heartbeats, no other host's"),
        (names::host_alive_subject(host), "\"alive, nothing changed\" between them"),
        (names::ACTIVATE_SUBJECT.to_owned(), "scale-from-zero announcements"),
        (names::host_ready_wildcard(host), "a replica of a service is ready here, on its own subjects: it cannot announce for another host"),
        (names::HOST_REQUESTS_WILDCARD.to_owned(), "requests to other hosts' replicas (it receives only its own)"),
        (names::host_log_lines_wildcard(host), "its replicas' log lines, for `wharf logs -f`, on its own subjects: no other host's lines"),
        (wharf_proto::trigger::DELIVERIES_WILDCARD.to_owned(), "trigger messages handed to other hosts' replicas"),
        (names::job_result_subject(host), "how each job attempt it ran ended, no other host's"),
        ("_INBOX.>".to_owned(), "replies to requests it serves, and the frames of bodies streamed to or from other hosts (into their own inboxes)"),
        (names::consumer_broker_subject(host), "asks the control plane for its watches and key listings, delivered into its own inboxes"),
        (names::data_broker_subject(host), "asks the control plane for reads of what it follows and of components, for services' data of namespaces it runs, and to publish components' messages (wharf.msg.…, which a stream may store and acknowledge on any reply subject) of namespaces it runs"),
    ];
    // A subject wildcard matches whole tokens only, so `wharf-kv-*` cannot
    // be allowed on its own: every bucket of the control plane is denied.
    let mut publish_deny: Vec<(String, &'static str)> = CONTROL_PLANE_BUCKETS.iter().map(|bucket| (format!("$KV.{bucket}.>"), "the control plane's state")).collect();
    // Nothing of JetStream itself: JetStream answers a request (an API
    // call, a publish to a stream's subject, an acknowledgement) on
    // whatever reply subject it names, with the server's rights, which
    // nats-server does not check against the requester's; so a host could
    // have an answer written onto a control-plane key. Through its brokers
    // a host's answers come only into its own inboxes.
    for (subject, why) in [("$JS.>", "no JetStream request of its own: the brokers make them"), ("$KV.>", ""), ("$O.>", "")] {
        publish_deny.push((subject.to_owned(), why));
    }
    for api in ["CREATE", "UPDATE", "DELETE", "PURGE"] {
        publish_deny.push((format!("$JS.API.STREAM.{api}.>"), "streams are the control plane's"));
    }
    // No consumers: nats-server does not check where a consumer delivers
    // (a push consumer's deliver subject, a pull request's reply) against
    // its maker's rights, so one could copy a delete marker onto a control
    // plane key. The control plane makes a host's consumers, delivering
    // into the host's own inboxes (`consumer_broker_subject`).
    publish_deny.push(("$JS.API.CONSUMER.>".to_owned(), "consumers may deliver anywhere: the control plane makes them for the host"));
    // The secrets bucket is not read at all: a host receives the secrets of
    // its replicas sealed to its own key inside its assignment. Every way
    // JetStream reads a stream is denied for it (the message-get and
    // direct-get APIs, by sequence and by subject; consumers are denied
    // altogether, above, and the broker refuses this bucket), and its
    // subjects cannot be subscribed to (not in the subscribe allow list).
    let secrets_stream = format!("KV_{}", names::SECRETS_BUCKET);
    for (subject, why) in [
        (format!("$JS.API.DIRECT.GET.{secrets_stream}"), "secrets come sealed to the host in its assignment: no reads of the bucket"),
        (format!("$JS.API.DIRECT.GET.{secrets_stream}.>"), ""),
        (format!("$JS.API.STREAM.MSG.GET.{secrets_stream}"), ""),
    ] {
        publish_deny.push((subject, why));
    }
    let subscribe = vec![
        (format!("wharf.host.{host}.>"), "its own requests (services', trigger messages the control plane took in or another host handed over, resend, logs, jobs), no other host's"),
        (format!("{}.>", names::host_inbox_prefix(host)), "its own inboxes (replies, watches), no one else's"),
        (names::HOST_DOWN_SUBJECT.to_owned(), "lost hosts, to resend what it sent them"),
        (names::READY_WILDCARD.to_owned(), "replicas ready elsewhere: where requests may go"),
        ("$JS.EVENT.ADVISORY.STREAM.LEADER_ELECTED.>".to_owned(), "a bucket's new leader: its watches are renewed"),
    ];
    HostPermissions { publish, publish_deny, subscribe }
}

/// Every bucket of the control plane's state, which no host may write.
const CONTROL_PLANE_BUCKETS: [&str; 15] = [
    names::SERVICES_BUCKET,
    names::ASSIGNMENTS_BUCKET,
    wharf_scheduler::auth::TOKENS_BUCKET,
    names::NAMESPACES_BUCKET,
    names::SECRETS_BUCKET,
    names::VOLUMES_BUCKET,
    names::HOSTS_BUCKET,
    names::REVISIONS_BUCKET,
    names::STATUS_BUCKET,
    names::LEADER_BUCKET,
    names::EVENTS_BUCKET,
    names::JOBS_BUCKET,
    names::JOB_RUNS_BUCKET,
    names::ROUTE_CLAIMS_BUCKET,
    names::ARTIFACT_OWNERS_BUCKET,
];

/// Checks the seed file `wharf host --nats-nkey` names: readable, a user's
/// NKey seed, and readable by its owner only (tightened, with a log line, if
/// not). Returns the public key, for the log.
pub fn check_seed_file(path: &Path) -> anyhow::Result<String> {
    let seed = std::fs::read_to_string(path).with_context(|| format!("cannot read the NATS NKey seed {} (--nats-nkey)", path.display()))?;
    let pair = nkeys::KeyPair::from_seed(seed.trim())
        .ok()
        .filter(|pair| matches!(pair.key_pair_type(), nkeys::KeyPairType::User))
        .with_context(|| format!("{} is not a NATS user's NKey seed (one line starting with SU, as `wharf nats add-host` writes)", path.display()))?;
    crate::at_rest::tighten(path, 0o600)?;
    Ok(pair.public_key())
}

/// Writes a new file only its owner can read (refuses to replace one).
fn write_new_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)?.write_all(text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(id: &str) -> HostId {
        HostId::new(id).expect("valid host id")
    }

    /// The section of users.conf that belongs to `host`.
    fn section<'a>(conf: &'a str, host: &HostId) -> &'a str {
        let start = conf.find(&format!("# Host {host}.")).expect("the host's section");
        let rest = &conf[start..];
        let end = rest[1..].find("# Host ").map_or(rest.len(), |i| i + 1);
        &rest[..end]
    }

    #[test]
    fn each_host_is_permitted_its_own_subjects_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("accounts.conf"), "").expect("write");
        let (a, b) = (host("host-a"), host("host-b"));
        let seed_a = add_host(dir.path(), &a, None).expect("add host-a");
        add_host(dir.path(), &b, None).expect("add host-b");
        let conf = std::fs::read_to_string(dir.path().join(USERS_FILE)).expect("users.conf");
        assert!(conf.contains("{ user: scheduler, password: $WHARF_SCHEDULER_PASSWORD, permissions: $WHARF_SCHEDULER }"), "{conf}");

        let public_a = check_seed_file(&seed_a).expect("a user's seed");
        let own = section(&conf, &a);
        assert!(own.contains(&format!("nkey: {public_a}")), "{own}");
        for subject in ["\"wharf.host.host-a.heartbeat\"", "\"wharf.host.host-a.alive\"", "\"wharf.host.host-a.>\"", "\"_INBOX.host-host-a.>\"", "\"$KV.wharf-services.>\"", "\"$KV.wharf-tokens.>\""] {
            assert!(own.contains(subject), "{subject} missing:\n{own}");
        }
        for denied in ["\"$JS.API.DIRECT.GET.KV_wharf-secrets\"", "\"$JS.API.DIRECT.GET.KV_wharf-secrets.>\"", "\"$JS.API.STREAM.MSG.GET.KV_wharf-secrets\"", "\"$JS.API.CONSUMER.>\""] {
            let deny = &own[own.find("deny:").expect("deny")..own.find("subscribe:").expect("subscribe")];
            assert!(deny.contains(denied), "{denied} not denied:\n{own}");
        }
        assert!(!own.contains("host-b"), "host-b in host-a's permissions:\n{own}");
        // Requests go to other hosts' subjects, and no other of their subjects is open.
        let publish = &own[..own.find("deny:").expect("deny")];
        assert!(publish.contains("\"wharf.host.*.svc.>\"") && publish.contains("\"wharf.host.*.trigger.>\""), "{publish}");
        // Ready announcements: its own only, everyone's heard.
        assert!(publish.contains("\"wharf.host.host-a.ready.>\"") && !publish.contains("\"wharf.host.*.ready"), "{publish}");
        assert_eq!(own.matches("\"wharf.host.*").count(), 3, "{own}");
        // `_INBOX.>` is published to (replies), never subscribed to; no
        // service's requests but its own (under wharf.host.host-a.>).
        let subscribe = &own[own.find("subscribe:").expect("subscribe")..];
        assert!(subscribe.contains("\"wharf.host.*.ready.>\""), "{subscribe}");
        for shared in ["\"_INBOX.>\"", "\">\"", "\"wharf.host.*.svc", "\"wharf.host.*.trigger", "\"wharf.host.*.intake", "\"wharf.host.*.>", "\"wharf.svc", "\"wharf.trigger", "\"wharf.msg"] {
            assert!(!subscribe.contains(shared), "{shared} in:\n{subscribe}");
        }

        // The seed is the owner's only, never replaced, and a host is added once.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&seed_a).expect("seed").permissions().mode() & 0o777, 0o600);
        }
        let again = add_host(dir.path(), &a, None).expect_err("added twice");
        assert!(again.to_string().contains("already has an identity"), "{again}");
        let taken = add_host(dir.path(), &host("host-c"), Some(seed_a.clone())).expect_err("seed file exists");
        assert!(format!("{taken:#}").contains("must not exist"), "{taken:#}");
        assert!(!dir.path().join("hosts/host-c.pub").exists(), "a refused add left a key behind");

        // Removed, host-a is gone from the users; host-b stays.
        remove_host(dir.path(), &a).expect("remove host-a");
        let conf = std::fs::read_to_string(dir.path().join(USERS_FILE)).expect("users.conf");
        assert!(!conf.contains("host-a") && !conf.contains(&public_a) && conf.contains("# Host host-b."), "{conf}");
        assert!(!seed_a.exists());
        assert!(remove_host(dir.path(), &a).is_err(), "removed twice");
    }

    #[test]
    fn the_shipped_users_conf_is_the_generated_one_without_hosts() {
        let shipped = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/nats/users.conf")).expect("deploy/nats/users.conf");
        assert_eq!(shipped, users_conf(&[]), "regenerate deploy/nats/users.conf from users_conf");
    }

    #[test]
    fn add_host_needs_the_servers_config_directory_and_a_seed_file_a_seed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let refused = add_host(dir.path(), &host("h1"), None).expect_err("no accounts.conf");
        assert!(refused.to_string().contains("accounts.conf"), "{refused}");
        let not_seed = dir.path().join("not-a-seed");
        std::fs::write(&not_seed, "hello\n").expect("write");
        let refused = check_seed_file(&not_seed).expect_err("not a seed");
        assert!(refused.to_string().contains("not a NATS user's NKey seed"), "{refused}");
        assert!(check_seed_file(&dir.path().join("missing")).is_err());
    }
}
