//! Starts real OCI registries for tests: Debian's `docker-registry` (the
//! CNCF distribution registry), on a loopback port it picks itself, with its
//! storage in a temp dir of its own. Optionally behind HTTP basic auth (an
//! htpasswd file made here) and TLS (certificates from [`crate::tls`]).

use crate::process::Process;
use crate::tls::TestCerts;
use std::path::PathBuf;
use std::time::Duration;
use tempfile::TempDir;

/// Environment variable naming the registry binary, bypassing the search.
const BINARY_VAR: &str = "WHARF_DOCKER_REGISTRY";

/// How a test registry is set up.
#[derive(Debug, Default, Clone)]
pub struct RegistryOptions {
    /// Require HTTP basic auth with this user and password.
    pub basic_auth: Option<(String, String)>,
    /// Serve HTTPS with certificates made for `127.0.0.1` and `localhost`.
    pub tls: bool,
}

/// A running registry, killed when dropped.
pub struct Registry {
    /// `127.0.0.1:PORT`, as a reference's registry part.
    pub addr: String,
    /// The CA that signed the server's certificate, with `tls`.
    pub certs: Option<TestCerts>,
    _process: Process,
    _dir: TempDir,
}

impl Registry {
    /// A plain-HTTP registry without auth.
    ///
    /// # Panics
    ///
    /// As [`Registry::start_with`].
    pub fn start() -> Registry {
        Registry::start_with(RegistryOptions::default())
    }

    /// Starts a registry with `options` and waits until it listens.
    ///
    /// # Panics
    ///
    /// If `docker-registry` is not installed (`apt-get install
    /// docker-registry`; `scripts/env.sh` does it) or does not start.
    pub fn start_with(options: RegistryOptions) -> Registry {
        let dir = tempfile::Builder::new().prefix("wharf-registry-").tempdir().unwrap_or_else(|e| panic!("cannot create a temp dir for the registry: {e}"));
        let mut config = format!(
            "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:0\n",
            dir.path().join("data").display()
        );
        let certs = options.tls.then(|| crate::tls::write(dir.path()));
        if let Some(certs) = &certs {
            config.push_str(&format!("  tls:\n    certificate: {}\n    key: {}\n", certs.cert.display(), certs.key.display()));
        }
        if let Some((user, password)) = &options.basic_auth {
            let hash = bcrypt::hash(password, 4).unwrap_or_else(|e| panic!("cannot hash the registry password: {e}"));
            let htpasswd = dir.path().join("htpasswd");
            std::fs::write(&htpasswd, format!("{user}:{hash}\n")).unwrap_or_else(|e| panic!("cannot write {}: {e}", htpasswd.display()));
            config.push_str(&format!("auth:\n  htpasswd:\n    realm: wharf-test\n    path: {}\n", htpasswd.display()));
        }
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config).unwrap_or_else(|e| panic!("cannot write {}: {e}", config_path.display()));
        let binary = binary();
        let mut process = Process::spawn_with(std::process::Command::new(&binary).arg("serve").arg(&config_path));
        // It logs the address it bound, with the port the kernel chose.
        let line = process.wait_for_line("listening on ", Duration::from_secs(30));
        let addr = line
            .split("listening on ")
            .nth(1)
            .and_then(|rest| rest.split(|c: char| c == '"' || c == ',' || c.is_whitespace()).next())
            .unwrap_or_else(|| panic!("no address in the registry's line: {line}"))
            .to_string();
        Registry { addr, certs, _process: process, _dir: dir }
    }
}

/// The registry binary: `$WHARF_DOCKER_REGISTRY`, else `docker-registry` on PATH.
fn binary() -> PathBuf {
    if let Some(path) = std::env::var_os(BINARY_VAR) {
        return PathBuf::from(path);
    }
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join("docker-registry"))
        .find(|candidate| candidate.is_file());
    found.unwrap_or_else(|| panic!("docker-registry not found: install it (`apt-get install docker-registry`; ./test does) or set {BINARY_VAR}"))
}
