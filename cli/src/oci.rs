//! Components in OCI registries: `wharf push` publishes one, and `wharf
//! deploy oci://...` and manifests' `component: {oci: ...}` pull one.
//!
//! Artifacts use the wasm OCI artifact layout of the CNCF TAG Runtime
//! (what `wkg oci push` and `wash push` write): an OCI image manifest whose
//! config has media type `application/vnd.wasm.config.v0+json` and whose one
//! layer, `application/wasm`, is the component itself. The layer's digest is
//! therefore the component's sha256, the digest Wharf pins services by.
//!
//! The CLI pulls, not the control plane: registry credentials stay on the
//! machine of the person deploying (as with `docker`, `oras` or `wkg`), the
//! control plane makes no outbound requests to addresses a tenant names
//! (which would let any API user probe the control plane's network), and the
//! pulled bytes go through the same upload, checks and storage as a local
//! file. The spec records the reference as its `source`.
//!
//! Transport: HTTPS, trusting the system's roots plus `--registry-ca`. A
//! registry on a loopback address may speak plain HTTP, as docker and oras
//! allow for localhost: one probe decides, and only a server that answers
//! HTTPS with plain text is taken as HTTP (a certificate problem stays an
//! error).

use crate::client::error_chain;
use anyhow::Context;
use futures::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::manifest::{OciImageManifest, OciManifest};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Duration;
use wharf_proto::{Digest, OciReference};

/// The config media type of the wasm OCI artifact layout.
pub const WASM_CONFIG_MEDIA_TYPE: &str = "application/vnd.wasm.config.v0+json";
/// The media type of the layer holding the component.
pub const WASM_LAYER_MEDIA_TYPE: &str = "application/wasm";
/// The manifest media type the layout uses (a plain OCI image manifest).
const OCI_MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";

/// The largest component pulled: the API accepts no larger upload.
const MAX_COMPONENT: u64 = wharf_scheduler::api::MAX_ARTIFACT as u64;

/// How long the loopback transport probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// How to reach and authenticate to a registry; shared by `push`, `deploy` and `apply`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct RegistryArgs {
    /// User name for the registry (HTTP basic auth, or exchanged for a token where the registry uses token auth).
    #[arg(long, env = "WHARF_REGISTRY_USER", requires = "registry_password")]
    registry_user: Option<String>,
    /// The password for --registry-user (prefer the environment variable: flags are visible to other users).
    #[arg(long, env = "WHARF_REGISTRY_PASSWORD", hide_env_values = true, requires = "registry_user")]
    registry_password: Option<String>,
    /// A bearer token for the registry, instead of a user and password.
    #[arg(long, env = "WHARF_REGISTRY_TOKEN", hide_env_values = true, conflicts_with_all = ["registry_user", "registry_password"])]
    registry_token: Option<String>,
    /// A PEM CA certificate (or bundle) to trust for the registry, besides the system's roots.
    #[arg(long, env = "WHARF_REGISTRY_CA", value_name = "PATH")]
    registry_ca: Option<PathBuf>,
}

#[derive(clap::Args)]
#[command(after_help = "Examples:\n  wharf push hello.wasm ghcr.io/org/hello:1.0\n  wharf push hello.wasm 127.0.0.1:5000/hello:dev     # plain HTTP is fine on loopback\n\n\
The component is checked as `wharf deploy` would, then published in the wasm OCI artifact layout (as `wkg oci push` writes). \
Deploy it with `wharf deploy oci://REGISTRY/REPOSITORY:TAG`, or pin the printed digest with `@sha256:...`.")]
pub struct PushArgs {
    /// The component file.
    file: PathBuf,
    /// Where to publish it: REGISTRY/REPOSITORY:TAG.
    reference: OciReference,
    #[command(flatten)]
    registry: RegistryArgs,
}

/// The reference in a `deploy` argument written `oci://...`, or `None` for a file.
pub fn reference_in(argument: &Path) -> anyhow::Result<Option<OciReference>> {
    match argument.to_str() {
        Some(text) if text.starts_with(wharf_proto::oci::OCI_SCHEME) => Ok(Some(text.parse()?)),
        _ => Ok(None),
    }
}

/// A component pulled from a registry, its digest checked.
pub struct Pulled {
    pub bytes: Vec<u8>,
    /// The component's sha256 (the layer's digest).
    pub digest: Digest,
    /// The manifest's digest, which pins this version in the registry.
    pub manifest: String,
}

/// Pulls the component `reference` names and checks it is a wasm artifact
/// whose bytes match their digest.
pub async fn pull(reference: &OciReference, args: &RegistryArgs) -> anyhow::Result<Pulled> {
    let registry = Registry::connect(reference, args).await?;
    let image = registry.image(reference);
    let (manifest, manifest_digest) = registry.client.pull_manifest(&image, &registry.auth).await.map_err(|e| registry.explain(reference, e))?;
    let manifest = match manifest {
        OciManifest::Image(manifest) => manifest,
        OciManifest::ImageIndex(_) => anyhow::bail!(
            "{reference} is an image index (a multi-platform container image), not a wasm component; publish the component with `wharf push` or `wkg oci push`"
        ),
    };
    let layer = wasm_layer(reference, &manifest)?;
    let expected: Digest = layer.digest.parse().with_context(|| format!("{reference}: the component layer's digest {} is not sha256", layer.digest))?;
    let size = u64::try_from(layer.size).unwrap_or(u64::MAX);
    if size > MAX_COMPONENT {
        anyhow::bail!("{reference}: the component is {size} bytes; Wharf accepts components of at most {MAX_COMPONENT} bytes");
    }
    let mut stream = registry.client.pull_blob_stream(&image, &layer).await.map_err(|e| registry.explain(reference, e))?;
    let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.with_context(|| format!("{reference}: the download of the component broke off"))?;
        if (bytes.len() + chunk.len()) as u64 > size {
            anyhow::bail!("{reference}: the registry sent more than the {size} bytes the manifest declares for the component");
        }
        bytes.extend_from_slice(&chunk);
    }
    let actual = Digest::of(&bytes);
    if actual != expected {
        anyhow::bail!("{reference}: the component's bytes hash to {actual}, but the manifest says {expected}; refusing it (a broken or tampered registry)");
    }
    Ok(Pulled { bytes, digest: actual, manifest: manifest_digest })
}

/// The one `application/wasm` layer of a wasm artifact, or an error saying what the manifest holds instead.
fn wasm_layer(reference: &OciReference, manifest: &OciImageManifest) -> anyhow::Result<oci_client::manifest::OciDescriptor> {
    if manifest.config.media_type != WASM_CONFIG_MEDIA_TYPE {
        anyhow::bail!(
            "{reference} is not a wasm component artifact: its config has media type {}, not {WASM_CONFIG_MEDIA_TYPE} (publish components with `wharf push` or `wkg oci push`)",
            manifest.config.media_type
        );
    }
    match manifest.layers.as_slice() {
        [layer] if layer.media_type == WASM_LAYER_MEDIA_TYPE => Ok(layer.clone()),
        layers => {
            let types: Vec<&str> = layers.iter().map(|l| l.media_type.as_str()).collect();
            anyhow::bail!("{reference}: a wasm component artifact has exactly one {WASM_LAYER_MEDIA_TYPE} layer; this one has [{}]", types.join(", "))
        }
    }
}

/// The config blob of the wasm OCI artifact layout.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct WasmConfig {
    created: String,
    architecture: &'static str,
    os: &'static str,
    layer_digests: Vec<String>,
    component: ComponentInfo,
}

#[derive(Serialize)]
struct ComponentInfo {
    exports: Vec<String>,
    imports: Vec<String>,
    target: Option<String>,
}

/// `wharf push FILE REGISTRY/REPOSITORY:TAG`.
pub async fn push(args: PushArgs) -> anyhow::Result<()> {
    let reference = &args.reference;
    if reference.tag().is_none() || reference.digest().is_some() {
        anyhow::bail!("push to a tag (REGISTRY/REPOSITORY:TAG), not a digest: the registry computes the digest of what is pushed");
    }
    let bytes = std::fs::read(&args.file).with_context(|| format!("cannot read {}", args.file.display()))?;
    // The same checks as an upload, so what is published is what a host runs.
    let checked = bytes.clone();
    let interfaces = tokio::task::spawn_blocking(move || component_interfaces(&checked))
        .await
        .context("the component check failed")?
        .with_context(|| format!("{} cannot be pushed", args.file.display()))?;
    let digest = Digest::of(&bytes);
    let config = WasmConfig {
        created: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        architecture: "wasm",
        os: "wasip2",
        layer_digests: vec![digest.to_string()],
        component: ComponentInfo { exports: interfaces.exports, imports: interfaces.imports, target: None },
    };
    let config = Config { data: serde_json::to_vec(&config)?.into(), media_type: WASM_CONFIG_MEDIA_TYPE.to_string(), annotations: None };
    let layers = vec![ImageLayer { data: bytes.into(), media_type: WASM_LAYER_MEDIA_TYPE.to_string(), annotations: None }];
    let mut manifest = OciImageManifest::build(&layers, &config, None);
    manifest.media_type = Some(OCI_MANIFEST_MEDIA_TYPE.to_string());

    let registry = Registry::connect(reference, &args.registry).await?;
    let image = registry.image(reference);
    registry.client.push(&image, &layers, config, &registry.auth, Some(manifest)).await.map_err(|e| registry.explain(reference, e))?;
    let manifest_digest = registry.client.fetch_manifest_digest(&image, &registry.auth).await.map_err(|e| registry.explain(reference, e))?;
    let pinned = manifest_digest.parse::<Digest>().map(|d| reference.pinned(d).to_string()).unwrap_or_else(|_| reference.to_string());
    println!("pushed {reference} (component {digest}, manifest {manifest_digest})");
    println!("deploy it with: wharf deploy {pinned}");
    Ok(())
}

struct Interfaces {
    imports: Vec<String>,
    exports: Vec<String>,
}

/// Checks a component with the host runtime's loader (as the API checks an
/// upload) and lists its imports and exports for the artifact's config.
fn component_interfaces(bytes: &[u8]) -> anyhow::Result<Interfaces> {
    let runtime = wharf_host::Runtime::new(wharf_host::RuntimeConfig {
        max_instances: 1,
        max_instance_memory: wharf_proto::ByteSize::mib(16),
        cache_dir: None,
        ..wharf_host::RuntimeConfig::default()
    })?;
    let loaded = runtime.load(bytes, None)?;
    let (imports, exports) = runtime.interfaces(&loaded);
    Ok(Interfaces { imports, exports })
}

/// An OCI client set up for one registry: transport, trusted CAs, credentials.
struct Registry {
    client: Client,
    auth: RegistryAuth,
    /// Whether credentials were given, to say so when the registry refuses.
    credentials: bool,
}

impl Registry {
    async fn connect(reference: &OciReference, args: &RegistryArgs) -> anyhow::Result<Registry> {
        // reqwest (under oci-client) is built without a crypto provider of
        // its own: use ring, as the rest of Wharf does. Installing twice is
        // harmless (the second call reports the first provider).
        let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
        let mut extra_root_certificates = Vec::new();
        if let Some(path) = &args.registry_ca {
            let pem = std::fs::read(path).with_context(|| format!("cannot read the registry CA certificate {} (--registry-ca, WHARF_REGISTRY_CA)", path.display()))?;
            if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
                anyhow::bail!("no certificate in {} (expected PEM: -----BEGIN CERTIFICATE-----)", path.display());
            }
            extra_root_certificates.push(oci_client::client::Certificate { encoding: oci_client::client::CertificateEncoding::Pem, data: pem });
        }
        let protocol = if reference.is_loopback() && speaks_plain_http(reference.registry()).await { ClientProtocol::Http } else { ClientProtocol::Https };
        let config = ClientConfig { protocol, extra_root_certificates, connect_timeout: Some(Duration::from_secs(10)), ..ClientConfig::default() };
        let client = Client::try_from(config).map_err(|e| anyhow::anyhow!("cannot set up the registry client: {}", error_chain(&e)))?;
        let (auth, credentials) = match (&args.registry_token, &args.registry_user, &args.registry_password) {
            (Some(token), _, _) => (RegistryAuth::Bearer(token.clone()), true),
            (None, Some(user), Some(password)) => (RegistryAuth::Basic(user.clone(), password.clone()), true),
            _ => (RegistryAuth::Anonymous, false),
        };
        Ok(Registry { client, auth, credentials })
    }

    fn image(&self, reference: &OciReference) -> Reference {
        let (registry, repository) = (reference.registry().to_string(), reference.repository().to_string());
        match (reference.tag(), reference.digest()) {
            (Some(tag), Some(digest)) => Reference::with_tag_and_digest(registry, repository, tag.to_string(), digest.to_string()),
            (None, Some(digest)) => Reference::with_digest(registry, repository, digest.to_string()),
            (Some(tag), None) => Reference::with_tag(registry, repository, tag.to_string()),
            // OciReference refuses references with neither.
            (None, None) => Reference::with_tag(registry, repository, "latest".to_string()),
        }
    }

    /// Turns a registry failure into a message that names what was asked for and what to do.
    fn explain(&self, reference: &OciReference, error: OciDistributionError) -> anyhow::Error {
        let repository = format!("{}/{}", reference.registry(), reference.repository());
        let wanted = match (reference.tag(), reference.digest()) {
            (_, Some(digest)) => format!("manifest {digest}"),
            (Some(tag), None) => format!("tag {tag:?}"),
            (None, None) => "the reference".to_string(),
        };
        let credentials = if self.credentials {
            "the registry refused the credentials given (--registry-user/--registry-password or --registry-token, or WHARF_REGISTRY_*): check them and that they may access this repository"
        } else {
            "the registry needs credentials: pass --registry-user and WHARF_REGISTRY_PASSWORD (or --registry-token)"
        };
        match &error {
            OciDistributionError::RegistryError { envelope, .. } => {
                let codes: Vec<&OciErrorCode> = envelope.errors.iter().map(|e| &e.code).collect();
                if codes.iter().any(|c| matches!(c, OciErrorCode::ManifestUnknown | OciErrorCode::NotFound)) {
                    let hint = if reference.digest().is_some() {
                        " (the digest after @ must be the manifest's, as `wharf push` prints it, not the component's)"
                    } else {
                        ""
                    };
                    return anyhow::anyhow!("{repository} has no {wanted}{hint}");
                }
                if codes.iter().any(|c| matches!(c, OciErrorCode::NameUnknown)) {
                    return anyhow::anyhow!("the registry {} has no repository {}", reference.registry(), reference.repository());
                }
                if codes.iter().any(|c| matches!(c, OciErrorCode::Unauthorized | OciErrorCode::Denied)) {
                    return anyhow::anyhow!("{repository}: {credentials}");
                }
                anyhow::anyhow!("{repository}: the registry refused the request: {}", error_chain(&error))
            }
            OciDistributionError::UnauthorizedError { .. } => anyhow::anyhow!("{repository}: {credentials} (HTTP 401)"),
            OciDistributionError::ServerError { code: code @ (401 | 403), .. } => anyhow::anyhow!("{repository}: {credentials} (HTTP {code})"),
            // Some registries answer a blob's digest asked for as a manifest
            // with a server error (distribution 2.8: 500, it fails to parse
            // the component as JSON).
            OciDistributionError::ServerError { code, .. } if reference.digest().is_some() => anyhow::anyhow!(
                "{repository}: the registry could not serve {wanted} (HTTP {code}); the digest after @ must be the manifest's, as `wharf push` prints it, not the component's"
            ),
            OciDistributionError::AuthenticationFailure(reason) => anyhow::anyhow!("{repository}: the registry's token service refused: {reason}; {credentials}"),
            OciDistributionError::DigestError(_) => {
                anyhow::anyhow!("{repository}: what the registry sent for {wanted} does not match its digest; refusing it ({})", error_chain(&error))
            }
            OciDistributionError::RequestError(e) => {
                let text = error_chain(e);
                let hint = if text.contains("certificate") || text.contains("UnknownIssuer") {
                    "; the registry's TLS certificate is not trusted: pass the CA that signed it with --registry-ca or WHARF_REGISTRY_CA"
                } else {
                    ""
                };
                anyhow::anyhow!("cannot reach the registry {}: {text}{hint}", reference.registry())
            }
            _ => anyhow::anyhow!("{repository}: {}", error_chain(&error)),
        }
    }
}

/// Whether a loopback registry answers plain HTTP: an HTTPS request whose
/// handshake fails because the server sent something other than TLS.
/// Anything else (it speaks TLS, with whatever certificate; nothing listens)
/// keeps HTTPS, so a real TLS problem is reported as one.
async fn speaks_plain_http(registry: &str) -> bool {
    let Ok(client) = reqwest::Client::builder().timeout(PROBE_TIMEOUT).danger_accept_invalid_certs(true).build() else { return false };
    match client.get(format!("https://{registry}/v2/")).send().await {
        Ok(_) => false,
        Err(e) => {
            tracing::debug!(registry, "HTTPS probe failed: {e:?}");
            use tokio_rustls::rustls::Error as TlsError;
            let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&e);
            while let Some(error) = cause {
                if let Some(tls) = error.downcast_ref::<TlsError>() {
                    return matches!(tls, TlsError::InvalidMessage(_));
                }
                // An io::Error's source() skips the error it wraps (and
                // hyper wraps io::Errors in io::Errors): step into it instead.
                cause = match error.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()) {
                    Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
                    None => error.source(),
                };
            }
            false
        }
    }
}
