//! `wharf nats certs`: a private CA, a certificate for the NATS servers and
//! client certificates for Wharf's processes, so that NATS runs over mutual
//! TLS (deploy/nats/) without hand-written openssl commands.

use anyhow::{Context, bail};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(clap::Args)]
#[command(after_help = "Writes ca.pem and ca.key (the CA), server.pem and server.key, and NAME.pem and NAME.key for \
each client, refusing to overwrite any. Keys are written 0600; keep ca.key offline once done.\n\n\
Examples:\n  wharf nats certs --dir /etc/wharf/nats --server-name nats.internal,10.0.0.5\n  \
wharf nats certs --dir certs --server-name nats-a,nats-b,nats-c --client scheduler,host-a,host-b")]
pub struct CertsArgs {
    /// Directory to write the files into (created if missing).
    #[arg(long)]
    dir: PathBuf,
    /// The DNS names and IP addresses clients and the other cluster nodes dial the NATS servers
    /// by; the server certificate names them all (repeat, or separate with commas).
    #[arg(long, required = true, value_delimiter = ',')]
    server_name: Vec<String>,
    /// One client certificate per name (its common name; files NAME.pem and NAME.key).
    #[arg(long, value_delimiter = ',', default_value = "scheduler,host")]
    client: Vec<String>,
    /// How long the certificates are valid.
    #[arg(long, default_value = "1year", value_parser = humantime::parse_duration)]
    valid_for: Duration,
}

/// How long before now certificates start being valid: clocks of machines differ a little.
const CLOCK_SKEW: Duration = Duration::from_secs(3600);

pub(crate) fn certs(args: &CertsArgs) -> anyhow::Result<()> {
    for name in &args.client {
        let file_safe = !name.is_empty()
            && !name.starts_with('.')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !file_safe || name == "ca" || name == "server" {
            bail!("--client {name:?}: a client name is letters, digits, '-', '_' and '.', and not `ca` or `server` (it names its files)");
        }
    }
    let mut files = vec!["ca.pem".to_owned(), "ca.key".to_owned(), "server.pem".to_owned(), "server.key".to_owned()];
    files.extend(args.client.iter().flat_map(|name| [format!("{name}.pem"), format!("{name}.key")]));
    std::fs::create_dir_all(&args.dir).with_context(|| format!("cannot create {}", args.dir.display()))?;
    // Checked before anything is written, so a refusal leaves the directory as it was.
    if let Some(existing) = files.iter().map(|file| args.dir.join(file)).find(|path| path.exists()) {
        bail!("{} already exists; give --dir an empty directory (certificates are never overwritten)", existing.display());
    }

    let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH).context("the clock is before 1970")?;
    let now = rcgen::date_time_ymd(1970, 1, 1) + since_epoch;
    let validity = |params: &mut rcgen::CertificateParams| {
        params.not_before = now - CLOCK_SKEW;
        params.not_after = now + args.valid_for;
    };

    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params.distinguished_name = distinguished_name("Wharf NATS CA");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign, rcgen::KeyUsagePurpose::DigitalSignature];
    validity(&mut ca_params);
    let ca_key = rcgen::KeyPair::generate()?;
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key)?;

    // The servers' certificate is also their client certificate on the routes between cluster nodes.
    let mut server_params = rcgen::CertificateParams::new(args.server_name.clone())
        .with_context(|| format!("--server-name {}: not a DNS name or an IP address", args.server_name.join(",")))?;
    server_params.distinguished_name = distinguished_name(&args.server_name[0]);
    server_params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth, rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    server_params.use_authority_key_identifier_extension = true;
    validity(&mut server_params);
    let server_key = rcgen::KeyPair::generate()?;
    let server = server_params.signed_by(&server_key, &ca)?;

    write(&args.dir.join("ca.pem"), &ca.pem(), false)?;
    write(&args.dir.join("ca.key"), &ca.key().serialize_pem(), true)?;
    write(&args.dir.join("server.pem"), &server.pem(), false)?;
    write(&args.dir.join("server.key"), &server_key.serialize_pem(), true)?;
    for name in &args.client {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = distinguished_name(name);
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        validity(&mut params);
        let key = rcgen::KeyPair::generate()?;
        let cert = params.signed_by(&key, &ca)?;
        write(&args.dir.join(format!("{name}.pem")), &cert.pem(), false)?;
        write(&args.dir.join(format!("{name}.key")), &key.serialize_pem(), true)?;
    }

    let dir = args.dir.canonicalize().unwrap_or_else(|_| args.dir.clone());
    let at = |file: &str| dir.join(file).display().to_string();
    println!("Wrote to {}: ca.pem, ca.key, server.pem, server.key (for {}), {}.", dir.display(), args.server_name.join(", "), args.client.iter().map(|name| format!("{name}.pem, {name}.key")).collect::<Vec<_>>().join(", "));
    println!("nats-server (deploy/nats/*.conf):\n  export WHARF_NATS_CA={} WHARF_NATS_SERVER_CERT={} WHARF_NATS_SERVER_KEY={}", at("ca.pem"), at("server.pem"), at("server.key"));
    if let Some(name) = args.client.first() {
        println!("Wharf ({name}):\n  --nats-ca {} --nats-cert {} --nats-key {}", at("ca.pem"), at(&format!("{name}.pem")), at(&format!("{name}.key")));
    }
    println!("Keep ca.key offline: whoever holds it can make certificates NATS accepts.");
    Ok(())
}

fn distinguished_name(common_name: &str) -> rcgen::DistinguishedName {
    let mut name = rcgen::DistinguishedName::new();
    name.push(rcgen::DnType::CommonName, common_name);
    name
}

/// Writes a new file (never over an existing one); a private key readable by its owner only.
fn write(path: &Path, contents: &str, private: bool) -> anyhow::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if private { 0o600 } else { 0o644 });
    }
    let mut file = options.open(path).with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(contents.as_bytes()).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}
