//! Secret values sealed at rest: XChaCha20-Poly1305 under a key kept
//! outside the store (`<data-dir>/secret.key` or `--secret-key-file`).
//!
//! A sealed value is `wharf:sealed:v1:` + the key's 8-byte id + a 24-byte
//! nonce + the ciphertext and tag. The associated data is the secret's key
//! in the bucket (`<namespace>.<name>`), so a sealed value copied under
//! another namespace's name does not open. A value without the prefix is a
//! secret written before sealing existed: it is read as plain text (and
//! sealed when next written). Pure computation: the caller reads the key
//! and brings the nonce.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use sha2::{Digest as _, Sha256};

/// What every sealed value starts with.
pub const SEALED_PREFIX: &[u8] = b"wharf:sealed:v1:";

/// Bytes of a key.
pub const KEY_LEN: usize = 32;

/// Bytes of a nonce (XChaCha20: random nonces are safe at this size).
pub const NONCE_LEN: usize = 24;

const KEY_ID_LEN: usize = 8;

/// A key that seals and opens secret values. Its `Debug` shows only its id.
#[derive(Clone)]
pub struct SecretKey {
    key: [u8; KEY_LEN],
    id: [u8; KEY_ID_LEN],
}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretKey({})", self.id())
    }
}

/// Why a key file's text is not a key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a secret key is 64 hex digits (32 bytes); this text is {0} characters that are not that")]
pub struct KeyFormatError(pub usize);

/// Why a sealed value did not open.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// The value is sealed, and no key was given to this process.
    #[error("the value is sealed (encrypted at rest) and this process has no secret key; give it the control plane's key (--secret-key-file)")]
    NoKey,
    /// Sealed with another key (the ids differ).
    #[error("the value was sealed with key {sealed_with}, not with this process's key {have}; give it the control plane's key (--secret-key-file)")]
    WrongKey { sealed_with: String, have: String },
    /// Right key id, but the ciphertext or its name does not check out.
    #[error("the sealed value is damaged or was moved from another name (authentication failed)")]
    Damaged,
    /// Shorter than a sealed value can be.
    #[error("the sealed value is truncated")]
    Truncated,
}

impl SecretKey {
    /// A key from its 32 bytes.
    pub fn from_bytes(key: [u8; KEY_LEN]) -> SecretKey {
        let digest = Sha256::digest([b"wharf-secret-key-id:".as_slice(), &key].concat());
        let mut id = [0u8; KEY_ID_LEN];
        id.copy_from_slice(&digest[..KEY_ID_LEN]);
        SecretKey { key, id }
    }

    /// A key from a key file's text: 64 hex digits, surrounding whitespace ignored.
    pub fn parse(text: &str) -> Result<SecretKey, KeyFormatError> {
        let text = text.trim();
        let mut key = [0u8; KEY_LEN];
        hex::decode_to_slice(text, &mut key).map_err(|_| KeyFormatError(text.len()))?;
        Ok(SecretKey::from_bytes(key))
    }

    /// The key as a key file holds it (64 hex digits).
    pub fn to_hex(&self) -> String {
        hex::encode(self.key)
    }

    /// A short name of the key (not secret): 16 hex digits of a hash of it.
    pub fn id(&self) -> String {
        hex::encode(self.id)
    }

    /// Seals `value`, stored under `name`, with `nonce` (random, never reused).
    pub fn seal(&self, name: &str, value: &[u8], nonce: [u8; NONCE_LEN]) -> Vec<u8> {
        let cipher = XChaCha20Poly1305::new(chacha20poly1305::Key::from_slice(&self.key));
        // Encryption with a valid key and nonce fails only past ~256 GiB.
        let sealed = cipher.encrypt(XNonce::from_slice(&nonce), Payload { msg: value, aad: name.as_bytes() }).unwrap_or_default();
        [SEALED_PREFIX, &self.id, &nonce, &sealed].concat()
    }
}

/// Whether `stored` is a sealed value (else it is plain text from before sealing).
pub fn is_sealed(stored: &[u8]) -> bool {
    stored.starts_with(SEALED_PREFIX)
}

/// The id of the key a sealed value was sealed with (`None`: not sealed, or truncated).
pub fn sealed_with(stored: &[u8]) -> Option<String> {
    stored.strip_prefix(SEALED_PREFIX).and_then(|rest| rest.get(..KEY_ID_LEN)).map(hex::encode)
}

/// The plain value of `stored` (kept under `name`): opened with `key` if
/// sealed, as it is if not.
pub fn open(key: Option<&SecretKey>, name: &str, stored: &[u8]) -> Result<Vec<u8>, OpenError> {
    let Some(rest) = stored.strip_prefix(SEALED_PREFIX) else {
        return Ok(stored.to_vec());
    };
    let key = key.ok_or(OpenError::NoKey)?;
    if rest.len() < KEY_ID_LEN + NONCE_LEN {
        return Err(OpenError::Truncated);
    }
    let (id, rest) = rest.split_at(KEY_ID_LEN);
    let (nonce, sealed) = rest.split_at(NONCE_LEN);
    if id != key.id {
        return Err(OpenError::WrongKey { sealed_with: hex::encode(id), have: key.id() });
    }
    let cipher = XChaCha20Poly1305::new(chacha20poly1305::Key::from_slice(&key.key));
    cipher.decrypt(XNonce::from_slice(nonce), Payload { msg: sealed, aad: name.as_bytes() }).map_err(|_| OpenError::Damaged)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> SecretKey {
        SecretKey::from_bytes([byte; KEY_LEN])
    }

    #[test]
    fn sealed_values_open_only_with_their_key_and_name() {
        let value = b"hunter2-very-secret";
        let sealed = key(1).seal("shop.db", value, [7; NONCE_LEN]);
        assert!(is_sealed(&sealed));
        assert_eq!(sealed_with(&sealed), Some(key(1).id()));
        assert_eq!(sealed_with(b"plain"), None);
        assert!(!sealed.windows(value.len()).any(|w| w == value), "the plain text is not in the sealed value");
        assert_eq!(open(Some(&key(1)), "shop.db", &sealed), Ok(value.to_vec()));
        assert!(matches!(open(Some(&key(2)), "shop.db", &sealed), Err(OpenError::WrongKey { .. })));
        assert_eq!(open(Some(&key(1)), "other.db", &sealed), Err(OpenError::Damaged));
        assert_eq!(open(None, "shop.db", &sealed), Err(OpenError::NoKey));
        assert_eq!(open(Some(&key(1)), "shop.db", &sealed[..20]), Err(OpenError::Truncated));
        let mut flipped = sealed.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert_eq!(open(Some(&key(1)), "shop.db", &flipped), Err(OpenError::Damaged));
    }

    #[test]
    fn plain_values_from_before_sealing_read_as_they_are() {
        assert_eq!(open(Some(&key(1)), "shop.db", b"plain"), Ok(b"plain".to_vec()));
        assert_eq!(open(None, "shop.db", b"plain"), Ok(b"plain".to_vec()));
    }

    #[test]
    fn key_files_are_64_hex_digits() {
        let k = key(9);
        assert_eq!(SecretKey::parse(&format!("  {}\n", k.to_hex())).map(|p| p.id()), Ok(k.id()));
        assert_eq!(SecretKey::parse("abc").map(|p| p.id()), Err(KeyFormatError(3)));
        assert!(!format!("{k:?}").contains(&k.to_hex()), "Debug never shows the key");
    }
}
