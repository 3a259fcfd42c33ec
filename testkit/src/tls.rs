//! Throwaway certificates for TLS tests, made at test time: a CA, a server
//! certificate for `127.0.0.1` and `localhost` signed by it, and a client
//! certificate signed by it (for servers that verify clients, such as NATS
//! as deploy/nats/ configures it).

use std::path::{Path, PathBuf};

/// PEM files written by [`write`].
#[derive(Debug, Clone)]
pub struct TestCerts {
    /// The CA certificate clients trust.
    pub ca: PathBuf,
    /// The server's certificate chain (server certificate, then the CA).
    pub cert: PathBuf,
    /// The server certificate's private key (PKCS#8).
    pub key: PathBuf,
    /// A valid private key that belongs to no certificate here.
    pub other_key: PathBuf,
    /// A client certificate (then the CA) and its key. The server
    /// certificate, which names no usage, also serves as a client one
    /// (NATS routes between cluster nodes present it).
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

/// Generates the CA, the server certificate, a client certificate and a
/// stray key, and writes them as `ca.pem`, `server.pem`, `server.key`,
/// `client.pem`, `client.key` and `other.key` in `dir`.
///
/// # Panics
///
/// If generating or writing fails.
pub fn write(dir: &Path) -> TestCerts {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "Wharf test CA");
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().expect("CA key")).expect("CA certificate");
    let server_key = rcgen::KeyPair::generate().expect("server key");
    let server_params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).expect("server parameters");
    let server = server_params.signed_by(&server_key, &ca).expect("server certificate");
    let client_key = rcgen::KeyPair::generate().expect("client key");
    let mut client_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("client parameters");
    client_params.distinguished_name.push(rcgen::DnType::CommonName, "wharf test client");
    let client = client_params.signed_by(&client_key, &ca).expect("client certificate");
    let other_key = rcgen::KeyPair::generate().expect("other key");
    let certs = TestCerts {
        ca: dir.join("ca.pem"),
        cert: dir.join("server.pem"),
        key: dir.join("server.key"),
        other_key: dir.join("other.key"),
        client_cert: dir.join("client.pem"),
        client_key: dir.join("client.key"),
    };
    let write = |path: &Path, text: String| std::fs::write(path, text).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    write(&certs.ca, ca.pem());
    write(&certs.cert, format!("{}{}", server.pem(), ca.pem()));
    write(&certs.key, server_key.serialize_pem());
    write(&certs.other_key, other_key.serialize_pem());
    write(&certs.client_cert, format!("{}{}", client.pem(), ca.pem()));
    write(&certs.client_key, client_key.serialize_pem());
    certs
}
