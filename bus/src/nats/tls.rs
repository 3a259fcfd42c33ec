//! TLS on the connections to NATS: the CA and client certificate files are
//! read and checked before any server is dialled, so a bad file is named as
//! such, and a failed handshake is told apart from an unreachable server.
//!
//! async-nats reports most handshake failures as plain I/O errors; the
//! rustls error inside says what went wrong, and is matched by type, never
//! by its text.

use std::path::{Path, PathBuf};

use async_nats::rustls;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{AlertDescription, RootCertStore};

use crate::error::{ConnectError, TlsFailure, TlsFile};

/// TLS on every connection of the bus (the system-account one too). Giving
/// it makes TLS required: a server that does not speak TLS is refused, never
/// talked to in plain text. (A `tls://` URL requires TLS without it.)
#[derive(Debug, Clone, Default)]
pub struct NatsTls {
    /// A PEM file of the CA certificate(s) that sign the servers'
    /// certificates, trusted instead of the system's roots; `None`: the
    /// system's trusted roots.
    pub ca: Option<PathBuf>,
    /// This client's certificate, for servers that verify clients (`verify: true`).
    pub client: Option<ClientCertificate>,
}

/// A client certificate and its private key, both PEM files.
#[derive(Debug, Clone)]
pub struct ClientCertificate {
    /// The certificate, then any intermediate certificates.
    pub cert: PathBuf,
    /// The certificate's private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// [`NatsTls`] with its files read and checked: what every connection of a bus applies.
pub(super) struct TlsSetup {
    /// Built here when a CA is given, so that only it is trusted. Without
    /// one async-nats builds the configuration itself from the system's roots.
    config: Option<rustls::ClientConfig>,
    client: Option<ClientCertificate>,
}

impl TlsSetup {
    /// Reads and checks the files of `tls`.
    pub(super) async fn load(tls: &NatsTls) -> Result<TlsSetup, ConnectError> {
        let roots = match &tls.ca {
            Some(path) => Some(roots(path).await?),
            None => None,
        };
        // Built even without a CA, to check that the client's key belongs to its certificate.
        let builder = rustls::ClientConfig::builder()
            .with_root_certificates(roots.clone().unwrap_or_else(RootCertStore::empty));
        let config = match &tls.client {
            Some(client) => {
                let chain = certificates(&client.cert, TlsFile::ClientCertificate).await?;
                let key = private_key(&client.key).await?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|err| ConnectError::TlsFile {
                        file: TlsFile::ClientKey,
                        path: client.key.clone(),
                        problem: format!(
                            "it does not go with the certificate {}: {err}",
                            client.cert.display()
                        ),
                    })?
            }
            None => builder.with_no_client_auth(),
        };
        Ok(TlsSetup {
            config: roots.is_some().then_some(config),
            client: tls.client.clone(),
        })
    }

    /// `connect` with TLS required and these certificates.
    pub(super) fn apply(&self, connect: async_nats::ConnectOptions) -> async_nats::ConnectOptions {
        let connect = connect.require_tls(true);
        match (&self.config, &self.client) {
            (Some(config), _) => connect.tls_client_config(config.clone()),
            (None, Some(client)) => {
                connect.add_client_certificate(client.cert.clone(), client.key.clone())
            }
            (None, None) => connect,
        }
    }

    /// Whether a client certificate is given.
    pub(super) fn has_client_certificate(&self) -> bool {
        self.client.is_some()
    }
}

/// The CA certificates in `path`, as trust anchors.
async fn roots(path: &Path) -> Result<RootCertStore, ConnectError> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(path, TlsFile::Ca).await? {
        roots.add(cert).map_err(|err| ConnectError::TlsFile {
            file: TlsFile::Ca,
            path: path.to_owned(),
            problem: format!("it holds a certificate that cannot be a trusted root: {err}"),
        })?;
    }
    Ok(roots)
}

/// The PEM certificates in `path`; at least one.
async fn certificates(
    path: &Path,
    file: TlsFile,
) -> Result<Vec<CertificateDer<'static>>, ConnectError> {
    let fail = |problem: String| ConnectError::TlsFile {
        file,
        path: path.to_owned(),
        problem,
    };
    let pem = tokio::fs::read(path)
        .await
        .map_err(|err| fail(err.to_string()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| fail(format!("it is not valid PEM: {err}")))?;
    if certs.is_empty() {
        return Err(fail(
            "it holds no PEM certificate (-----BEGIN CERTIFICATE-----)".to_owned(),
        ));
    }
    Ok(certs)
}

/// The PEM private key in `path`.
async fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, ConnectError> {
    let fail = |problem: String| ConnectError::TlsFile {
        file: TlsFile::ClientKey,
        path: path.to_owned(),
        problem,
    };
    let pem = tokio::fs::read(path)
        .await
        .map_err(|err| fail(err.to_string()))?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|err| match err {
        rustls::pki_types::pem::Error::NoItemsFound => {
            fail("it holds no PEM private key (-----BEGIN PRIVATE KEY-----)".to_owned())
        }
        err => fail(format!("it is not a valid PEM private key: {err}")),
    })
}

/// What went wrong in a TLS handshake, if `err` is a handshake failure;
/// `client_certificate`: whether this client gave one.
pub(super) fn failure(
    err: &(dyn std::error::Error + 'static),
    client_certificate: bool,
) -> Option<TlsFailure> {
    let mut current = Some(err);
    while let Some(err) = current {
        let rustls_error = err.downcast_ref::<rustls::Error>().or_else(|| {
            // io::Error's `source` skips the error it wraps; `get_ref` does not.
            err.downcast_ref::<std::io::Error>()
                .and_then(std::io::Error::get_ref)
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        });
        if let Some(rustls_error) = rustls_error {
            return Some(classify(rustls_error, client_certificate));
        }
        current = err.source();
    }
    None
}

fn classify(err: &rustls::Error, client_certificate: bool) -> TlsFailure {
    match err {
        rustls::Error::InvalidCertificate(_) => TlsFailure::ServerCertificate,
        // What a server that does not speak TLS sends back (a NATS `-ERR`
        // line) is no TLS record at all.
        rustls::Error::InvalidMessage(_)
        | rustls::Error::InappropriateMessage { .. }
        | rustls::Error::InappropriateHandshakeMessage { .. } => TlsFailure::NotTls,
        // TLS 1.3 servers say `certificate_required`; TLS 1.2 ones say
        // `bad_certificate` for a missing certificate as for a bad one.
        rustls::Error::AlertReceived(
            AlertDescription::CertificateRequired
            | AlertDescription::BadCertificate
            | AlertDescription::UnknownCA
            | AlertDescription::CertificateUnknown
            | AlertDescription::CertificateExpired
            | AlertDescription::CertificateRevoked
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::AccessDenied,
        ) => {
            if client_certificate {
                TlsFailure::ClientCertificateRefused
            } else {
                TlsFailure::ClientCertificateRequired
            }
        }
        _ => TlsFailure::Other,
    }
}
