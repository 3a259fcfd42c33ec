//! Which client certificates the NATS servers accept: `pinned.conf` in the
//! server's config directory (deploy/nats as shipped), which the `tls`
//! block of every shipped server config includes. nats-server accepts a
//! client whose certificate is signed by the CA and, when the list is not
//! empty, whose public key's SHA-256 is in `pinned_certs`; a reload
//! (`nats-server --signal reload`) disconnects clients whose certificate is
//! no longer pinned. So one certificate can be revoked without a new CA:
//! `wharf nats unpin`, or `wharf nats remove-host` for a host whose
//! certificate `wharf nats add-host --cert` pinned along with its NKey.
//!
//! The file is generated: one entry per line, the name after `#` (a host's
//! entry is named `host <id>`, so removing the host removes it).

use anyhow::Context;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use tokio_rustls::rustls::pki_types::CertificateDer;
use tokio_rustls::rustls::pki_types::pem::PemObject;

/// The generated file of pinned certificates, in the server's config directory.
pub const PINS_FILE: &str = "pinned.conf";

#[derive(clap::Args)]
pub struct PinArgs {
    /// The NATS server's config directory, the one holding pinned.conf (deploy/nats as shipped).
    #[arg(long)]
    dir: PathBuf,
    /// Client certificates (PEM) to accept, as `wharf nats certs` wrote them.
    #[arg(required = true, value_name = "CERT")]
    certs: Vec<PathBuf>,
}

#[derive(clap::Args)]
pub struct UnpinArgs {
    /// The NATS server's config directory, the one holding pinned.conf.
    #[arg(long)]
    dir: PathBuf,
    /// Certificates (PEM files) or pins (the 64 hex digits `wharf nats pin` printed) to refuse from now on.
    #[arg(required = true, value_name = "CERT|SHA256")]
    certs: Vec<String>,
}

/// One pinned certificate: its public key's SHA-256 (hex), and a name for people.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pin {
    pub sha256: String,
    pub name: String,
}

pub fn pin(args: &PinArgs) -> anyhow::Result<()> {
    let mut pins = read(&args.dir)?;
    for cert in &args.certs {
        let sha256 = fingerprint_file(cert)?;
        let name = cert.file_stem().and_then(|s| s.to_str()).unwrap_or("certificate").to_owned();
        if pins.iter().any(|p| p.sha256 == sha256) {
            println!("{}: already pinned ({sha256})", cert.display());
            continue;
        }
        println!("{}: pinned {sha256}", cert.display());
        pins.push(Pin { sha256, name });
    }
    write(&args.dir, &pins)?;
    println!("reload the NATS server to apply: nats-server --signal reload (with a cluster, copy {PINS_FILE} to every node first)");
    Ok(())
}

pub fn unpin(args: &UnpinArgs) -> anyhow::Result<()> {
    let mut pins = read(&args.dir)?;
    for what in &args.certs {
        let sha256 = if is_sha256(what) { what.to_ascii_lowercase() } else { fingerprint_file(Path::new(what))? };
        let before = pins.len();
        pins.retain(|p| p.sha256 != sha256);
        anyhow::ensure!(pins.len() < before, "{what}: not pinned in {} ({sha256})", args.dir.join(PINS_FILE).display());
        println!("{what}: unpinned {sha256}");
    }
    refuse_empty(&args.dir, &pins)?;
    write(&args.dir, &pins)?;
    println!("reload the NATS server to drop its connections: nats-server --signal reload (with a cluster, copy {PINS_FILE} to every node first)");
    Ok(())
}

/// Pins `cert` as host `host`'s (replacing a pin of that host, if any).
pub fn pin_host(dir: &Path, host: &wharf_proto::HostId, cert: &Path) -> anyhow::Result<String> {
    let sha256 = fingerprint_file(cert)?;
    let name = host_pin_name(host);
    let mut pins = read(dir)?;
    pins.retain(|p| p.name != name && p.sha256 != sha256);
    pins.push(Pin { sha256: sha256.clone(), name });
    write(dir, &pins)?;
    Ok(sha256)
}

/// Removes host `host`'s pin; whether it had one.
pub fn unpin_host(dir: &Path, host: &wharf_proto::HostId) -> anyhow::Result<bool> {
    let Some(pins) = without_host(dir, host)? else { return Ok(false) };
    write(dir, &pins)?;
    Ok(true)
}

/// Checks that host `host`'s pin may be removed (so that `remove-host`
/// refuses before it changes anything).
pub fn check_unpin_host(dir: &Path, host: &wharf_proto::HostId) -> anyhow::Result<()> {
    without_host(dir, host).map(drop)
}

/// The pins without host `host`'s, if it has one; refused when none would be left.
fn without_host(dir: &Path, host: &wharf_proto::HostId) -> anyhow::Result<Option<Vec<Pin>>> {
    if !dir.join(PINS_FILE).exists() {
        return Ok(None);
    }
    let name = host_pin_name(host);
    let mut pins = read(dir)?;
    let before = pins.len();
    pins.retain(|p| p.name != name);
    if pins.len() == before {
        return Ok(None);
    }
    refuse_empty(dir, &pins)?;
    Ok(Some(pins))
}

/// An empty list makes the servers accept any certificate the CA signed,
/// the one just revoked among them: refused.
fn refuse_empty(dir: &Path, pins: &[Pin]) -> anyhow::Result<()> {
    anyhow::ensure!(
        !pins.is_empty(),
        "that would leave {} pinning nothing, and then the servers accept any certificate the CA signed, the revoked one included; \
         pin the certificates that should still connect first (wharf nats pin)",
        dir.join(PINS_FILE).display()
    );
    Ok(())
}

fn host_pin_name(host: &wharf_proto::HostId) -> String {
    format!("host {host}")
}

fn is_sha256(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The pins in `dir/pinned.conf` (none when it does not exist).
pub fn read(dir: &Path) -> anyhow::Result<Vec<Pin>> {
    let path = dir.join(PINS_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let mut pins = Vec::new();
    for line in text.lines() {
        let (entry, name) = line.split_once('#').unwrap_or((line, ""));
        let Some(quoted) = entry.trim().trim_end_matches(',').strip_prefix('"').and_then(|s| s.strip_suffix('"')) else { continue };
        anyhow::ensure!(is_sha256(quoted), "{}: {quoted:?} is not the SHA-256 (64 hex digits) of a public key", path.display());
        pins.push(Pin { sha256: quoted.to_ascii_lowercase(), name: name.trim().to_owned() });
    }
    Ok(pins)
}

/// Rewrites `dir/pinned.conf` (aside, then renamed over, so a server
/// reloading meanwhile never reads half).
fn write(dir: &Path, pins: &[Pin]) -> anyhow::Result<()> {
    let mut text = String::from(
        "# Written by `wharf nats pin` / `unpin` / `add-host --cert` / `remove-host`: do not\n\
         # edit by hand. The client certificates the servers accept, by the SHA-256 of\n\
         # their public keys; empty, any certificate the CA signed. Reload the server\n\
         # after a change (nats-server --signal reload): it drops clients no longer pinned.\n\
         pinned_certs: [\n",
    );
    for pin in pins {
        let _ = writeln!(text, "  \"{}\", # {}", pin.sha256, pin.name.replace(['\n', '\r'], " "));
    }
    text.push_str("]\n");
    let path = dir.join(PINS_FILE);
    let aside = dir.join(format!(".{PINS_FILE}.new"));
    std::fs::write(&aside, text).with_context(|| format!("cannot write {}", aside.display()))?;
    std::fs::rename(&aside, &path).with_context(|| format!("cannot replace {}", path.display()))
}

/// The pin of the certificate in PEM file `path`.
pub fn fingerprint_file(path: &Path) -> anyhow::Result<String> {
    let pem = std::fs::read(path).with_context(|| format!("cannot read the certificate {}", path.display()))?;
    let der = CertificateDer::from_pem_slice(&pem).map_err(|e| anyhow::anyhow!("{}: not a PEM certificate: {e}", path.display()))?;
    fingerprint(&der).with_context(|| format!("{}: not an X.509 certificate", path.display()))
}

/// The hex SHA-256 of a DER certificate's SubjectPublicKeyInfo, as
/// nats-server's `pinned_certs` holds it.
pub fn fingerprint(cert: &[u8]) -> Option<String> {
    subject_public_key_info(cert).map(|spki| wharf_proto::Digest::of(spki).hex())
}

/// One DER element at the start of `der`: its tag, its contents and what follows it.
fn element(der: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = der.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 4 || rest.len() < count {
            return None;
        }
        let len = rest[..count].iter().fold(0usize, |len, byte| (len << 8) | usize::from(*byte));
        (len, &rest[count..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// The SubjectPublicKeyInfo element (tag and length included) of an X.509
/// certificate: the seventh field of its TBSCertificate, or the sixth
/// without the optional version.
fn subject_public_key_info(cert: &[u8]) -> Option<&[u8]> {
    const SEQUENCE: u8 = 0x30;
    const VERSION: u8 = 0xa0;
    let (SEQUENCE, certificate, _) = element(cert)? else { return None };
    let (SEQUENCE, tbs, _) = element(certificate)? else { return None };
    let mut rest = tbs;
    if rest.first() == Some(&VERSION) {
        rest = element(rest)?.2;
    }
    // The serial number, the signature algorithm, the issuer, the validity, the subject.
    for _ in 0..5 {
        rest = element(rest)?.2;
    }
    let (SEQUENCE, _, after) = element(rest)? else { return None };
    Some(&rest[..rest.len() - after.len()])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A certificate signed by a fresh CA, and its key pair.
    fn certificate(name: &str) -> (String, rcgen::KeyPair) {
        let ca_key = rcgen::KeyPair::generate().expect("key");
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).expect("ca");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &ca).expect("signed");
        (cert.pem(), key)
    }

    #[test]
    fn the_pin_is_the_sha256_of_the_certificates_public_key_info() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (pem, key) = certificate("edge-a");
        let path = dir.path().join("edge-a.pem");
        std::fs::write(&path, pem).expect("write");
        let pin = fingerprint_file(&path).expect("a pin");
        assert_eq!(pin, wharf_proto::Digest::of(&rcgen::PublicKeyData::subject_public_key_info(&key)).hex());
        assert_eq!(pin.len(), 64);

        std::fs::write(&path, "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").expect("write");
        assert!(format!("{:#}", fingerprint_file(&path).expect_err("not a certificate")).contains("not an X.509 certificate"));
        std::fs::write(&path, "hello").expect("write");
        assert!(format!("{:#}", fingerprint_file(&path).expect_err("not PEM")).contains("not a PEM certificate"));
        for truncated in [&[0x30u8, 0x82, 0xff][..], &[0x30, 0x03, 0x30, 0x01][..], &[][..]] {
            assert_eq!(fingerprint(truncated), None, "{truncated:?}");
        }
    }

    #[test]
    fn pins_are_added_removed_and_named_per_host() {
        let dir = tempfile::tempdir().expect("tempdir");
        let write_cert = |name: &str| {
            let path = dir.path().join(format!("{name}.pem"));
            std::fs::write(&path, certificate(name).0).expect("write");
            path
        };
        let (scheduler, a, b) = (write_cert("scheduler"), write_cert("a"), write_cert("b"));
        pin(&PinArgs { dir: dir.path().into(), certs: vec![scheduler.clone(), scheduler.clone()] }).expect("pinned");
        let host_a = wharf_proto::HostId::new("a").expect("id");
        let pin_a = pin_host(dir.path(), &host_a, &a).expect("pinned");
        // A new certificate for the same host replaces its pin.
        let pin_b = pin_host(dir.path(), &host_a, &b).expect("pinned");
        let pins = read(dir.path()).expect("read");
        assert_eq!(pins.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["scheduler", "host a"]);
        assert_eq!(pins[1].sha256, pin_b);
        assert!(!pins.iter().any(|p| p.sha256 == pin_a));
        let text = std::fs::read_to_string(dir.path().join(PINS_FILE)).expect("read");
        assert!(text.contains("pinned_certs: [") && text.contains(&format!("\"{pin_b}\", # host a")), "{text}");

        assert!(unpin_host(dir.path(), &host_a).expect("unpinned"));
        assert!(!unpin_host(dir.path(), &host_a).expect("nothing to unpin"));
        let refused = unpin(&UnpinArgs { dir: dir.path().into(), certs: vec![pin_b.clone()] }).expect_err("not pinned");
        assert!(refused.to_string().contains("not pinned"), "{refused}");
        // The last pin stays: without it the servers would accept any certificate.
        let last = unpin(&UnpinArgs { dir: dir.path().into(), certs: vec![scheduler.to_str().expect("utf-8").into()] }).expect_err("the last pin");
        assert!(last.to_string().contains("accept any certificate"), "{last}");
        assert_eq!(read(dir.path()).expect("read").len(), 1, "nothing changed");
        pin_host(dir.path(), &host_a, &a).expect("pinned");
        unpin(&UnpinArgs { dir: dir.path().into(), certs: vec![scheduler.to_str().expect("utf-8").into()] }).expect("unpinned");
        assert!(check_unpin_host(dir.path(), &host_a).expect_err("the last pin").to_string().contains("accept any certificate"));
        assert_eq!(read(dir.path()).expect("read").len(), 1);

        std::fs::write(dir.path().join(PINS_FILE), "pinned_certs: [\n  \"not-hex\",\n]\n").expect("write");
        assert!(read(dir.path()).expect_err("bad pin").to_string().contains("not the SHA-256"));
    }
}
