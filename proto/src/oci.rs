//! References to components in OCI registries: `REGISTRY/REPOSITORY:TAG`,
//! `REGISTRY/REPOSITORY@sha256:...` or both, optionally written with an
//! `oci://` scheme. Parsed and checked here, with errors that say what is
//! wrong; the CLI pulls and pushes them.
//!
//! The grammar is the distribution spec's (the one `docker`, `oras` and
//! `wkg` accept), with two deliberate differences: the registry must be
//! named (no implied Docker Hub, so a reference means the same everywhere),
//! and so must a tag or a digest (no implied `latest`, which names
//! whatever was pushed last).

use crate::Digest;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// The scheme `wharf deploy` recognises and `source` is written with.
pub const OCI_SCHEME: &str = "oci://";

/// The longest reference accepted (the distribution spec caps repository
/// names at 255 characters; a registry, tag and digest add at most ~450).
pub const MAX_REFERENCE_LEN: usize = 1024;

/// A component in an OCI registry, by tag, digest or both.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct OciReference {
    registry: String,
    repository: String,
    tag: Option<String>,
    digest: Option<Digest>,
}

/// Why a string is not an OCI reference. The message quotes the reference
/// and names the part at fault.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{reference:?} is not an OCI reference (REGISTRY/REPOSITORY:TAG or REGISTRY/REPOSITORY@sha256:...): {problem}")]
pub struct OciReferenceError {
    reference: String,
    problem: String,
}

impl OciReference {
    /// The registry's host, with a port if it has one (`ghcr.io`, `127.0.0.1:5000`).
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// The repository inside the registry (`org/app`).
    pub fn repository(&self) -> &str {
        &self.repository
    }

    /// The tag, if the reference has one.
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    /// The manifest digest the reference pins, if it has one.
    pub fn digest(&self) -> Option<&Digest> {
        self.digest.as_ref()
    }

    /// The last segment of the repository, as a default service name.
    pub fn name(&self) -> &str {
        self.repository.rsplit('/').next().unwrap_or(&self.repository)
    }

    /// The registry's host without its port, brackets stripped from an IPv6 address.
    pub fn host(&self) -> &str {
        match self.registry.strip_prefix('[') {
            Some(rest) => rest.split(']').next().unwrap_or(rest),
            None => self.registry.rsplit_once(':').map_or(self.registry.as_str(), |(host, _)| host),
        }
    }

    /// Whether the registry is on this machine (`localhost`, 127.0.0.0/8 or
    /// `::1`), where a plain-HTTP registry is accepted without a flag.
    pub fn is_loopback(&self) -> bool {
        let host = self.host();
        host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
    }

    /// The same repository pinned to `digest` (and still showing its tag).
    pub fn pinned(&self, digest: Digest) -> OciReference {
        OciReference { digest: Some(digest), ..self.clone() }
    }
}

impl FromStr for OciReference {
    type Err = OciReferenceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let fail = |problem: &str| OciReferenceError { reference: s.to_string(), problem: problem.to_string() };
        if s.len() > MAX_REFERENCE_LEN {
            return Err(fail(&format!("it is longer than {MAX_REFERENCE_LEN} characters")));
        }
        let text = s.strip_prefix(OCI_SCHEME).unwrap_or(s);
        if text.is_empty() {
            return Err(fail("it is empty"));
        }
        if text.contains("://") {
            return Err(fail("only the oci:// scheme is understood"));
        }
        let (name_and_tag, digest) = match text.split_once('@') {
            Some((rest, digest)) => {
                if !digest.starts_with("sha256:") {
                    return Err(fail("the digest must be written sha256:<64 hex digits>"));
                }
                (rest, Some(digest.parse::<Digest>().map_err(|e| fail(&e.to_string()))?))
            }
            None => (text, None),
        };
        let Some((registry, path)) = name_and_tag.split_once('/') else {
            return Err(fail("name the registry first, e.g. ghcr.io/org/app:1.0 or 127.0.0.1:5000/app:1.0"));
        };
        if !is_registry(registry) {
            return Err(fail(&format!(
                "{registry:?} is not a registry host (a name with a dot, `localhost`, or an address, with an optional :port); name the registry first, e.g. ghcr.io/{name_and_tag}"
            )));
        }
        // A ':' after the last '/' starts the tag.
        let (repository, tag) = match path.rsplit_once(':') {
            Some((repository, tag)) if !tag.contains('/') => (repository, Some(tag)),
            _ => (path, None),
        };
        if let Some(tag) = tag
            && !is_tag(tag)
        {
            return Err(fail(&format!("the tag {tag:?} must be 1-128 letters, digits, '_', '.' or '-', not starting with '.' or '-'")));
        }
        if let Some(segment) = repository.split('/').find(|segment| !is_path_segment(segment)) {
            return Err(fail(&format!(
                "the repository segment {segment:?} must be lowercase letters and digits, separated by '.', '_', '__' or '-'"
            )));
        }
        if tag.is_none() && digest.is_none() {
            return Err(fail("give a tag (:1.0) or a digest (@sha256:...); Wharf does not assume :latest"));
        }
        Ok(OciReference { registry: registry.to_string(), repository: repository.to_string(), tag: tag.map(str::to_string), digest })
    }
}

/// A registry host: `localhost`, a DNS name with a dot, an IPv4 address or
/// a bracketed IPv6 address, each with an optional port.
fn is_registry(registry: &str) -> bool {
    let (host, port) = if let Some(rest) = registry.strip_prefix('[') {
        match rest.split_once(']') {
            Some((ip, port)) => return ip.parse::<std::net::Ipv6Addr>().is_ok() && (port.is_empty() || port.strip_prefix(':').is_some_and(is_port)),
            None => return false,
        }
    } else {
        match registry.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (registry, None),
        }
    };
    let host_ok = host == "localhost"
        || (host.contains('.')
            && host.split('.').all(|label| {
                !label.is_empty() && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') && !label.starts_with('-') && !label.ends_with('-')
            }));
    host_ok && port.is_none_or(is_port)
}

fn is_port(port: &str) -> bool {
    port.parse::<u16>().is_ok_and(|p| p > 0)
}

fn is_tag(tag: &str) -> bool {
    let bytes = tag.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 128
        && (bytes[0].is_ascii_alphanumeric() || bytes[0] == b'_')
        && bytes.iter().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(b))
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`
fn is_path_segment(segment: &str) -> bool {
    let bytes = segment.as_bytes();
    let alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if bytes.is_empty() || !alnum(&bytes[0]) || !alnum(&bytes[bytes.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < bytes.len() {
        if alnum(&bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && !alnum(&bytes[i]) {
            i += 1;
        }
        let separator = &segment[start..i];
        let dashes = separator.bytes().all(|b| b == b'-');
        if !(separator == "." || separator == "_" || separator == "__" || dashes) {
            return false;
        }
    }
    true
}

impl fmt::Display for OciReference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{OCI_SCHEME}{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for OciReference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl TryFrom<String> for OciReference {
    type Error = OciReferenceError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        value.parse()
    }
}

impl From<OciReference> for String {
    fn from(value: OciReference) -> Self {
        value.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn check(input: &str, expected: Result<(&str, &str, Option<&str>, bool), &str>) {
        let parsed = input.parse::<OciReference>();
        match (parsed, expected) {
            (Ok(r), Ok((registry, repository, tag, has_digest))) => {
                assert_eq!((r.registry(), r.repository(), r.tag(), r.digest().is_some()), (registry, repository, tag, has_digest), "{input}");
                // Display round-trips.
                assert_eq!(r.to_string().parse::<OciReference>().as_ref(), Ok(&r), "{input}");
            }
            (Err(e), Err(fragment)) => assert!(e.to_string().contains(fragment), "{input}: {e}"),
            (got, want) => panic!("{input}: got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn references_parse_or_say_what_is_wrong() {
        check("ghcr.io/org/app:1.0", Ok(("ghcr.io", "org/app", Some("1.0"), false)));
        check("oci://127.0.0.1:5000/hello:v1", Ok(("127.0.0.1:5000", "hello", Some("v1"), false)));
        check("localhost:5000/a/b/c:latest", Ok(("localhost:5000", "a/b/c", Some("latest"), false)));
        check(&format!("ghcr.io/org/app@{DIGEST}"), Ok(("ghcr.io", "org/app", None, true)));
        check(&format!("ghcr.io/org/app:1.0@{DIGEST}"), Ok(("ghcr.io", "org/app", Some("1.0"), true)));
        check("[::1]:5000/app:1", Ok(("[::1]:5000", "app", Some("1"), false)));
        check("registry.example.com/my_org/my-app__x:1", Ok(("registry.example.com", "my_org/my-app__x", Some("1"), false)));

        check("", Err("it is empty"));
        check("oci://", Err("it is empty"));
        check("app:1.0", Err("name the registry first"));
        check("org/app:1.0", Err("\"org\" is not a registry host"));
        check("ghcr.io/org/app", Err("give a tag"));
        check("ghcr.io/Org/app:1", Err("repository segment \"Org\""));
        check("ghcr.io/org//app:1", Err("repository segment \"\""));
        check("ghcr.io/org/app:-1", Err("the tag \"-1\""));
        check("ghcr.io/org/app:1@md5:abc", Err("sha256:<64 hex digits>"));
        check("ghcr.io/org/app@sha256:abc", Err("malformed sha256 digest"));
        check("https://ghcr.io/org/app:1", Err("only the oci:// scheme"));
        check("ghcr.io:99999/app:1", Err("not a registry host"));
        check(&format!("ghcr.io/{}:1", "a".repeat(MAX_REFERENCE_LEN)), Err("longer than"));
    }

    #[test]
    fn loopback_registries_are_recognised() {
        let loopback = |s: &str| s.parse::<OciReference>().expect("valid").is_loopback();
        assert!(loopback("127.0.0.1:5000/a:1"));
        assert!(loopback("127.3.4.5/a:1"));
        assert!(loopback("localhost/a:1"));
        assert!(loopback("[::1]:5000/a:1"));
        assert!(!loopback("ghcr.io/a:1"));
        assert!(!loopback("10.0.0.1:5000/a:1"));
        assert!(!loopback("localhost.example.com/a:1"));
    }

    #[test]
    fn serde_uses_the_oci_scheme_and_accepts_it_without() {
        let r: OciReference = serde_json::from_str("\"ghcr.io/org/app:1.0\"").expect("parses");
        assert_eq!(serde_json::to_string(&r).expect("serialises"), "\"oci://ghcr.io/org/app:1.0\"");
        assert_eq!(r.name(), "app");
        let pinned = r.pinned(DIGEST.parse().expect("digest"));
        assert_eq!(pinned.to_string(), format!("oci://ghcr.io/org/app:1.0@{DIGEST}"));
        assert!(serde_json::from_str::<OciReference>("\"nope\"").is_err());
    }
}
