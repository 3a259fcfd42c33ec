//! TLS for Wharf's listeners: loads a PEM certificate chain and private key
//! into a rustls acceptor (the edge server runs each connection's handshake,
//! under its own timeout).
//!
//! The ingress and the control plane's API both take the [`TlsAcceptor`]
//! built here (the CLI loads it once, before binding anything), so every
//! listener checks certificates the same way and says the same things when
//! they are wrong. rustls runs on the `ring` provider.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio_rustls::rustls::pki_types::pem::{self, PemObject};
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{self, ServerConfig};

pub use tokio_rustls::TlsAcceptor;

/// Why a certificate and key could not be turned into a TLS acceptor. Every
/// variant names the file it is about.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read (missing, a directory, no permission).
    #[error("cannot read the TLS {what} {}: {error}", path.display())]
    Read { what: &'static str, path: PathBuf, error: std::io::Error },
    /// The certificate file has no PEM `CERTIFICATE` block, or a broken one.
    #[error("no certificate in {}: {problem} (expected a PEM chain starting with -----BEGIN CERTIFICATE-----, the server's own certificate first)", path.display())]
    NoCertificate { path: PathBuf, problem: String },
    /// The key file has no PEM private key, or a broken one.
    #[error("no private key in {}: {problem} (expected a PEM key: -----BEGIN PRIVATE KEY-----, RSA PRIVATE KEY or EC PRIVATE KEY)", path.display())]
    NoKey { path: PathBuf, problem: String },
    /// The server's certificate is not a well-formed X.509 certificate.
    #[error("the certificate in {} is not valid: {problem}", path.display())]
    BadCertificate { path: PathBuf, problem: String },
    /// The key does not belong to the certificate.
    #[error("the private key in {} does not match the certificate in {}", key.display(), cert.display())]
    Mismatch { cert: PathBuf, key: PathBuf },
    /// rustls refused the pair for another reason (a key it cannot parse
    /// or does not support).
    #[error("cannot use the certificate {} with the key {}: {error}", cert.display(), key.display())]
    Unusable { cert: PathBuf, key: PathBuf, error: rustls::Error },
}

/// Reads a PEM certificate chain (server certificate first) and a PEM
/// private key and builds an acceptor for TLS 1.2 and 1.3 that serves them.
pub fn load(cert: &Path, key: &Path) -> Result<TlsAcceptor, TlsError> {
    let read = |what, path: &Path| std::fs::read(path).map_err(|error| TlsError::Read { what, path: path.to_path_buf(), error });
    let cert_pem = read("certificate", cert)?;
    let key_pem = read("private key", key)?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::NoCertificate { path: cert.to_path_buf(), problem: e.to_string() })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate { path: cert.to_path_buf(), problem: "the file holds no certificate".into() });
    }
    let private_key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        let problem = match e {
            pem::Error::NoItemsFound => "the file holds no private key".to_string(),
            e => e.to_string(),
        };
        TlsError::NoKey { path: key.to_path_buf(), problem }
    })?;
    let config = ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .and_then(|builder| builder.with_no_client_auth().with_single_cert(chain, private_key))
        .map_err(|error| match error {
            rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
                TlsError::Mismatch { cert: cert.to_path_buf(), key: key.to_path_buf() }
            }
            rustls::Error::InvalidCertificate(problem) => TlsError::BadCertificate { path: cert.to_path_buf(), problem: format!("{problem:?}") },
            error => TlsError::Unusable { cert: cert.to_path_buf(), key: key.to_path_buf(), error },
        })?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Loads `cert` and `key` and checks the error names `wanted` (every
    /// piece); `wanted` empty means loading must succeed.
    fn check(cert: &Path, key: &Path, wanted: &[&str]) {
        match load(cert, key) {
            Ok(_) => assert!(wanted.is_empty(), "{} + {} loaded; expected an error naming {wanted:?}", cert.display(), key.display()),
            Err(e) => {
                let message = e.to_string();
                assert!(!wanted.is_empty(), "{} + {} refused: {message}", cert.display(), key.display());
                for piece in wanted {
                    assert!(message.contains(piece), "{message:?} does not name {piece:?}");
                }
            }
        }
    }

    #[test]
    fn certificates_and_keys_are_checked_and_errors_name_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let certs = wharf_testkit::tls::write(dir.path());
        let path = |name: &str| dir.path().join(name);
        let text = |p: &Path| p.display().to_string();
        std::fs::write(path("garbage.key"), "-----BEGIN PRIVATE KEY-----\nnot base64 at all!\n-----END PRIVATE KEY-----\n").expect("write");
        std::fs::write(path("nonsense.key"), "-----BEGIN PRIVATE KEY-----\naGVsbG8gd29ybGQ=\n-----END PRIVATE KEY-----\n").expect("write");
        std::fs::write(path("empty.pem"), "").expect("write");
        std::fs::write(path("nonsense.pem"), "-----BEGIN CERTIFICATE-----\naGVsbG8gd29ybGQ=\n-----END CERTIFICATE-----\n").expect("write");

        check(&certs.cert, &certs.key, &[]);
        check(&path("missing.pem"), &certs.key, &["cannot read the TLS certificate", &text(&path("missing.pem"))]);
        check(&certs.cert, &path("missing.key"), &["cannot read the TLS private key", &text(&path("missing.key"))]);
        check(&path("empty.pem"), &certs.key, &["no certificate in", &text(&path("empty.pem"))]);
        check(&certs.key, &certs.key, &["no certificate in", &text(&certs.key)]);
        check(&path("nonsense.pem"), &certs.key, &["the certificate in", &text(&path("nonsense.pem")), "is not valid"]);
        check(&certs.cert, &certs.cert, &["no private key in", &text(&certs.cert), "holds no private key"]);
        check(&certs.cert, &path("garbage.key"), &["no private key in", &text(&path("garbage.key"))]);
        check(&certs.cert, &path("nonsense.key"), &["cannot use the certificate", &text(&path("nonsense.key"))]);
        check(&certs.cert, &certs.other_key, &["does not match", &text(&certs.other_key), &text(&certs.cert)]);
    }
}
