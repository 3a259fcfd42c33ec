//! Content digests: every artifact is addressed and pinned by the sha256 of its bytes.

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use std::fmt;
use std::str::FromStr;

/// The sha256 of an artifact's bytes, written `sha256:<64 lowercase hex digits>`.
///
/// The bare hex form is accepted when parsing so users can paste the output
/// of `sha256sum`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Digest([u8; 32]);

/// Why a string is not a digest.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DigestError {
    /// The algorithm prefix is not `sha256:`.
    #[error("unsupported digest algorithm {0:?}: Wharf digests are written sha256:<64 hex digits>")]
    Algorithm(String),
    /// The hex part has the wrong length or a non-hex character.
    #[error("malformed sha256 digest {0:?}: expected 64 lowercase hex digits")]
    Malformed(String),
}

impl Digest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Digest(Sha256::digest(bytes).into())
    }

    /// The 64 hex digits without the algorithm prefix, as used in file and object names.
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }

    /// A short form for tables and logs (the first 12 hex digits).
    pub fn short(&self) -> String {
        self.hex()[..12].to_string()
    }
}

impl FromStr for Digest {
    type Err = DigestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let hex_part = match s.split_once(':') {
            Some(("sha256", rest)) => rest,
            Some((algorithm, _)) => return Err(DigestError::Algorithm(algorithm.to_string())),
            None => s,
        };
        if hex_part.len() != 64 || !hex_part.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()) {
            return Err(DigestError::Malformed(s.to_string()));
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(hex_part, &mut out).map_err(|_| DigestError::Malformed(s.to_string()))?;
        Ok(Digest(out))
    }
}

impl TryFrom<String> for Digest {
    type Error = DigestError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        value.parse()
    }
}

impl From<Digest> for String {
    fn from(value: Digest) -> Self {
        value.to_string()
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_round_trips_and_accepts_bare_hex() {
        let d = Digest::of(b"hello");
        let text = d.to_string();
        assert_eq!(text, "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824");
        assert_eq!(text.parse::<Digest>(), Ok(d.clone()));
        assert_eq!(d.hex().parse::<Digest>(), Ok(d));
    }

    #[test]
    fn digest_rejects_bad_input_with_reason() {
        assert!(matches!("md5:abcd".parse::<Digest>(), Err(DigestError::Algorithm(a)) if a == "md5"));
        assert!(matches!("sha256:abc".parse::<Digest>(), Err(DigestError::Malformed(_))));
        let upper = "A".repeat(64);
        assert!(matches!(upper.parse::<Digest>(), Err(DigestError::Malformed(_))));
    }
}
