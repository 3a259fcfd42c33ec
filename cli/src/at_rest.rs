//! What a Wharf process keeps on disk, kept from other users of the
//! machine: the data directory 0700 and its files (the redb store, the
//! admin token, the secret key) 0600, tightened with a log line when found
//! looser; and the key that seals secret values, kept outside the store.

use anyhow::Context;
use std::path::{Path, PathBuf};
use wharf_proto::sealed::SecretKey;

/// Creates `dir` (mode 0700) if missing, and tightens it and the files
/// directly in it to 0700 / 0600 if other users could read them, saying so.
pub fn private_dir(dir: &Path) -> anyhow::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir).with_context(|| format!("cannot create the data directory {}", dir.display()))?;
    tighten(dir, 0o700)?;
    let entries = std::fs::read_dir(dir).with_context(|| format!("cannot read the data directory {}", dir.display()))?;
    for entry in entries.flatten() {
        // Regular files only: subdirectories (compiled code, volumes) sit
        // behind this directory's 0700, and a symlink is not ours to change.
        if entry.file_type().is_ok_and(|t| t.is_file()) {
            tighten(&entry.path(), 0o600)?;
        }
    }
    Ok(())
}

/// Sets `path` to `mode` if its permissions let group or others in.
#[cfg(unix)]
pub fn tighten(path: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let current = std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?.permissions().mode() & 0o777;
    if current & 0o077 != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).with_context(|| format!("cannot restrict {} to mode {mode:o}", path.display()))?;
        tracing::warn!(path = %path.display(), "other users could read this (mode {current:o}); tightened to {mode:o}");
    }
    Ok(())
}

#[cfg(not(unix))]
pub fn tighten(_path: &Path, _mode: u32) -> anyhow::Result<()> {
    Ok(())
}

/// Sets a file this process just made (the redb store, created with the
/// process's umask) to 0600, without a log line: it was never looser
/// behind the 0700 directory.
#[cfg(unix)]
pub fn make_private(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).with_context(|| format!("cannot restrict {} to mode 600", path.display()))
}

#[cfg(not(unix))]
pub fn make_private(_path: &Path) -> anyhow::Result<()> {
    Ok(())
}

/// Where the key that seals secrets is.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct SecretKeyArgs {
    /// The key that seals secret values at rest: a file of 64 hex digits, mode 0600 (default:
    /// <data-dir>/secret.key, made by the control plane on its first start). Hosts do not need
    /// it: each receives the secrets of the replicas assigned to it sealed to its own key
    /// (<data-dir>/host-seal.key, made on its first start). Given to `wharf host`, the host
    /// reads the secrets bucket itself instead (compatibility; the shipped per-host NATS
    /// identities may not read it).
    #[arg(long, env = "WHARF_SECRET_KEY_FILE", value_name = "PATH")]
    pub secret_key_file: Option<PathBuf>,
}

impl SecretKeyArgs {
    /// A control plane's key: the given file, else `<data_dir>/secret.key`,
    /// made (random, 0600) if missing.
    pub fn load_or_create(&self, data_dir: &Path) -> anyhow::Result<SecretKey> {
        if let Some(path) = &self.secret_key_file {
            return read_key(path);
        }
        let path = data_dir.join("secret.key");
        if path.exists() {
            return read_key(&path);
        }
        let key = SecretKey::from_bytes(rand_key());
        write_private(&path, &format!("{}\n", key.to_hex())).with_context(|| format!("cannot write the secret key {}", path.display()))?;
        tracing::info!(path = %path.display(), "made the key that seals secrets at rest (key {}); keep it safe on the control plane's machines (hosts do not need it: each receives secrets sealed to its own key)", key.id());
        Ok(key)
    }

    /// The control plane's key for a host that reads the secrets bucket
    /// itself (`wharf host --secret-key-file`, compatibility): the given
    /// file, else `<data_dir>/secret.key` if there is one; without a key
    /// the host reads only secrets stored before sealing existed.
    pub fn load_for_host(&self, data_dir: &Path) -> anyhow::Result<Option<SecretKey>> {
        if let Some(path) = &self.secret_key_file {
            return read_key(path).map(Some);
        }
        let path = data_dir.join("secret.key");
        if path.exists() { read_key(&path).map(Some) } else { Ok(None) }
    }
}

/// The file, in a host's data directory, of its own sealing key.
pub const HOST_SEAL_KEY_FILE: &str = "host-seal.key";

/// A host's own sealing key: `<data_dir>/host-seal.key`, made (random,
/// 0600) if missing. The control plane seals the secrets of the replicas it
/// assigns to the host to its public half, which the host's heartbeats
/// announce; a new key (the file removed) has them sealed again.
pub fn host_seal_key(data_dir: &Path) -> anyhow::Result<wharf_proto::sealed::HostKey> {
    use wharf_proto::sealed::HostKey;
    let path = data_dir.join(HOST_SEAL_KEY_FILE);
    if path.exists() {
        let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read the host's sealing key {}", path.display()))?;
        let key = HostKey::parse(&text).with_context(|| format!("{} is not a host sealing key (64 hex digits)", path.display()))?;
        tighten(&path, 0o600)?;
        return Ok(key);
    }
    let key = HostKey::from_bytes(rand_key());
    write_private(&path, &format!("{}\n", key.to_hex())).with_context(|| format!("cannot write the host's sealing key {}", path.display()))?;
    tracing::info!(path = %path.display(), public = %key.public(), "made this host's own sealing key: secrets come sealed to it in its assignment");
    Ok(key)
}

fn read_key(path: &Path) -> anyhow::Result<SecretKey> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read the secret key {} (--secret-key-file)", path.display()))?;
    let key = SecretKey::parse(&text).with_context(|| format!("{} is not a secret key", path.display()))?;
    tighten(path, 0o600)?;
    Ok(key)
}

/// 32 random bytes from the operating system's generator (rand's thread
/// generator, seeded from it, as the API tokens are).
fn rand_key() -> [u8; wharf_proto::sealed::KEY_LEN] {
    rand::random()
}

/// Writes a new file only its owner can read (refuses to replace one).
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)?.write_all(text.as_bytes())
}
