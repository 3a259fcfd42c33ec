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
//!
//! Secrets travel to hosts sealed to each host's own key: every host has an
//! X25519 key pair ([`HostKey`], in its data directory) and announces the
//! public half in its heartbeat; the leader opens a secret with the control
//! plane's key and seals it to the host ([`HostPublicKey::seal`]) inside the
//! host's assignment, so a host needs no access to the secrets bucket and
//! no other host's key opens what it was sent. A value sealed to a host is
//! `wharf:host-sealed:v1:` + the host's public key + an ephemeral public
//! key + a 24-byte nonce + XChaCha20-Poly1305 ciphertext and tag, under a
//! key hashed from the X25519 shared secret and both public keys, with the
//! secret's name as associated data.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use curve25519_dalek::montgomery::MontgomeryPoint;
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
    /// Sealed to another host's key (or to this host's previous key).
    #[error("the value was sealed to host key {sealed_to}, not to this host's key {have}")]
    SealedToAnotherKey { sealed_to: String, have: String },
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

    /// 32 bytes derived from this key and `parts` (SHA-256 under a label),
    /// for values only this key's holder can compute, such as the
    /// ephemeral keys and nonces of [`HostPublicKey::seal`]: deterministic,
    /// so sealing the same value to the same host again gives the same bytes.
    pub fn derive(&self, label: &str, parts: &[&[u8]]) -> [u8; 32] {
        let mut hash = Sha256::new();
        hash.update(b"wharf-derive:");
        hash.update(self.key);
        for part in std::iter::once(label.as_bytes()).chain(parts.iter().copied()) {
            hash.update((part.len() as u64).to_be_bytes());
            hash.update(part);
        }
        hash.finalize().into()
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

/// What every value sealed to a host starts with.
pub const HOST_SEALED_PREFIX: &[u8] = b"wharf:host-sealed:v1:";

/// A host's own sealing key pair (X25519): opens what the control plane
/// sealed to it. Its `Debug` shows only the public key.
#[derive(Clone)]
pub struct HostKey {
    secret: [u8; KEY_LEN],
    public: HostPublicKey,
}

impl std::fmt::Debug for HostKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HostKey({})", self.public)
    }
}

/// The public half of a [`HostKey`], as a heartbeat announces it (64 hex digits).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct HostPublicKey([u8; KEY_LEN]);

impl std::fmt::Display for HostPublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl HostPublicKey {
    /// A public key from its text (64 hex digits).
    pub fn parse(text: &str) -> Result<HostPublicKey, KeyFormatError> {
        let text = text.trim();
        let mut key = [0u8; KEY_LEN];
        hex::decode_to_slice(text, &mut key).map_err(|_| KeyFormatError(text.len()))?;
        Ok(HostPublicKey(key))
    }

    /// Seals `value`, kept under `name`, to this host: only the holder of
    /// the matching [`HostKey`] opens it. `ephemeral` (a secret scalar) and
    /// `nonce` must never be reused with another value; the control plane
    /// derives them from its own key and the value ([`SecretKey::derive`]).
    pub fn seal(&self, name: &str, value: &[u8], ephemeral: [u8; KEY_LEN], nonce: [u8; NONCE_LEN]) -> Vec<u8> {
        let ephemeral_public = MontgomeryPoint::mul_base_clamped(ephemeral).to_bytes();
        let shared = MontgomeryPoint(self.0).mul_clamped(ephemeral).to_bytes();
        let key = host_seal_key(&shared, &ephemeral_public, &self.0);
        let cipher = XChaCha20Poly1305::new(chacha20poly1305::Key::from_slice(&key));
        // Encryption with a valid key and nonce fails only past ~256 GiB.
        let sealed = cipher.encrypt(XNonce::from_slice(&nonce), Payload { msg: value, aad: name.as_bytes() }).unwrap_or_default();
        [HOST_SEALED_PREFIX, &self.0, &ephemeral_public, &nonce, &sealed].concat()
    }
}

impl HostKey {
    /// A key pair from its secret's 32 bytes (random, from the operating system).
    pub fn from_bytes(secret: [u8; KEY_LEN]) -> HostKey {
        HostKey { secret, public: HostPublicKey(MontgomeryPoint::mul_base_clamped(secret).to_bytes()) }
    }

    /// A key pair from a key file's text: 64 hex digits, surrounding whitespace ignored.
    pub fn parse(text: &str) -> Result<HostKey, KeyFormatError> {
        let text = text.trim();
        let mut key = [0u8; KEY_LEN];
        hex::decode_to_slice(text, &mut key).map_err(|_| KeyFormatError(text.len()))?;
        Ok(HostKey::from_bytes(key))
    }

    /// The secret as a key file holds it (64 hex digits).
    pub fn to_hex(&self) -> String {
        hex::encode(self.secret)
    }

    /// The public key, which the host announces.
    pub fn public(&self) -> HostPublicKey {
        self.public
    }

    /// Opens `sealed`, a value kept under `name` and sealed to this host.
    pub fn open(&self, name: &str, sealed: &[u8]) -> Result<Vec<u8>, OpenError> {
        let Some(rest) = sealed.strip_prefix(HOST_SEALED_PREFIX) else {
            return Err(OpenError::Damaged);
        };
        if rest.len() < 2 * KEY_LEN + NONCE_LEN {
            return Err(OpenError::Truncated);
        }
        let (to, rest) = rest.split_at(KEY_LEN);
        let (ephemeral_public, rest) = rest.split_at(KEY_LEN);
        let (nonce, ciphertext) = rest.split_at(NONCE_LEN);
        if to != self.public.0 {
            return Err(OpenError::SealedToAnotherKey { sealed_to: hex::encode(to), have: self.public.to_string() });
        }
        let mut ephemeral = [0u8; KEY_LEN];
        ephemeral.copy_from_slice(ephemeral_public);
        let shared = MontgomeryPoint(ephemeral).mul_clamped(self.secret).to_bytes();
        // A low-order point gives an all-zero secret anyone can compute: refused.
        if shared == [0u8; KEY_LEN] {
            return Err(OpenError::Damaged);
        }
        let key = host_seal_key(&shared, &ephemeral, &self.public.0);
        let cipher = XChaCha20Poly1305::new(chacha20poly1305::Key::from_slice(&key));
        cipher.decrypt(XNonce::from_slice(nonce), Payload { msg: ciphertext, aad: name.as_bytes() }).map_err(|_| OpenError::Damaged)
    }
}

/// The symmetric key of a value sealed to a host: SHA-256 of a label, the
/// X25519 shared secret and both public keys.
fn host_seal_key(shared: &[u8; KEY_LEN], ephemeral_public: &[u8; KEY_LEN], recipient: &[u8; KEY_LEN]) -> [u8; KEY_LEN] {
    Sha256::new().chain_update(b"wharf-host-seal-v1").chain_update(shared).chain_update(ephemeral_public).chain_update(recipient).finalize().into()
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
    fn values_sealed_to_a_host_open_only_with_that_hosts_key_and_name() {
        let host = HostKey::from_bytes([3; KEY_LEN]);
        let other = HostKey::from_bytes([4; KEY_LEN]);
        let value = b"hunter2-very-secret";
        let sealed = host.public().seal("shop.db", value, [5; KEY_LEN], [6; NONCE_LEN]);
        assert!(!sealed.windows(value.len()).any(|w| w == value), "the plain text is not in the sealed value");
        assert_eq!(host.open("shop.db", &sealed), Ok(value.to_vec()));
        // Another host's key (or this host's previous one) is refused, naming both keys.
        assert_eq!(
            other.open("shop.db", &sealed),
            Err(OpenError::SealedToAnotherKey { sealed_to: host.public().to_string(), have: other.public().to_string() })
        );
        // Relabelled as sealed to the other host, it still does not open: the key binds the recipient.
        let mut relabelled = sealed.clone();
        relabelled[HOST_SEALED_PREFIX.len()..HOST_SEALED_PREFIX.len() + KEY_LEN].copy_from_slice(&other.public().0);
        assert_eq!(other.open("shop.db", &relabelled), Err(OpenError::Damaged));
        // Moved under another name, tampered with, or cut short: refused.
        assert_eq!(host.open("other.db", &sealed), Err(OpenError::Damaged));
        for at in [HOST_SEALED_PREFIX.len() + KEY_LEN + 1, HOST_SEALED_PREFIX.len() + 2 * KEY_LEN + 1, sealed.len() - 1] {
            let mut tampered = sealed.clone();
            tampered[at] ^= 1;
            assert!(host.open("shop.db", &tampered).is_err(), "a flipped byte at {at} was not noticed");
        }
        assert_eq!(host.open("shop.db", &sealed[..40]), Err(OpenError::Truncated));
        assert_eq!(host.open("shop.db", b"plain"), Err(OpenError::Damaged));
        // A low-order ephemeral point (all-zero shared secret) is refused.
        let mut low_order = sealed.clone();
        low_order[HOST_SEALED_PREFIX.len() + KEY_LEN..HOST_SEALED_PREFIX.len() + 2 * KEY_LEN].fill(0);
        assert_eq!(host.open("shop.db", &low_order), Err(OpenError::Damaged));
        // Sealing is deterministic in its inputs, and different ephemeral keys give different bytes.
        assert_eq!(sealed, host.public().seal("shop.db", value, [5; KEY_LEN], [6; NONCE_LEN]));
        assert_ne!(sealed, host.public().seal("shop.db", value, [7; KEY_LEN], [6; NONCE_LEN]));
    }

    #[test]
    fn host_keys_read_back_and_derivations_depend_on_the_key() {
        let host = HostKey::from_bytes([8; KEY_LEN]);
        let read = HostKey::parse(&format!("{}\n", host.to_hex())).expect("a key file");
        assert_eq!(read.public(), host.public());
        assert_eq!(HostPublicKey::parse(&host.public().to_string()), Ok(host.public()));
        assert!(HostPublicKey::parse("xyz").is_err());
        assert!(!format!("{host:?}").contains(&host.to_hex()), "Debug never shows the secret");
        assert_eq!(key(1).derive("a", &[b"x"]), key(1).derive("a", &[b"x"]));
        assert_ne!(key(1).derive("a", &[b"x"]), key(2).derive("a", &[b"x"]));
        assert_ne!(key(1).derive("a", &[b"x", b"y"]), key(1).derive("a", &[b"xy"]));
    }

    #[test]
    fn key_files_are_64_hex_digits() {
        let k = key(9);
        assert_eq!(SecretKey::parse(&format!("  {}\n", k.to_hex())).map(|p| p.id()), Ok(k.id()));
        assert_eq!(SecretKey::parse("abc").map(|p| p.id()), Err(KeyFormatError(3)));
        assert!(!format!("{k:?}").contains(&k.to_hex()), "Debug never shows the key");
    }
}
