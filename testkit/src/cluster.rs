//! Real `wharf scheduler` and `wharf host` processes over NATS, for tests
//! and benchmarks of a cluster: started on loopback ports they choose
//! themselves, with the addresses they print, and client commands run
//! against the API with the admin token.

use crate::process::Process;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// The first `http://...` word of a line.
pub fn url_in(line: &str) -> String {
    line.split_whitespace().find(|w| w.starts_with("http://")).unwrap_or_default().to_string()
}

/// A running `wharf scheduler` (killed when dropped).
pub struct Scheduler {
    pub process: Process,
    /// The REST API's base URL.
    pub api: String,
    /// The admin token it wrote in its data directory.
    pub token: String,
    wharf: PathBuf,
}

impl Scheduler {
    /// Starts `wharf scheduler` against `nats` with `dir` as its data
    /// directory, plus `extra` arguments, and waits until it serves.
    ///
    /// # Panics
    ///
    /// If it does not start within a minute.
    pub fn start(wharf: &Path, nats: &str, dir: &Path, extra: &[&str]) -> Scheduler {
        let dir = dir.to_str().expect("a UTF-8 path");
        let mut args = vec!["scheduler", "--nats", nats, "--api", "127.0.0.1:0", "--data-dir", dir];
        args.extend_from_slice(extra);
        let mut process = Process::spawn_with(Command::new(wharf).args(&args).env("WHARF_LOG", std::env::var("WHARF_LOG").unwrap_or_else(|_| "info".into())));
        let line = process.wait_for_line("Wharf scheduler: API", Duration::from_secs(60));
        let token = std::fs::read_to_string(Path::new(dir).join("admin-token")).map(|t| t.trim().to_string()).unwrap_or_default();
        Scheduler { process, api: url_in(&line), token, wharf: wharf.to_path_buf() }
    }

    /// Runs a client command against this scheduler's API: (success, stdout + stderr).
    pub fn wharf(&self, args: &[&str]) -> (bool, String) {
        run(&self.wharf, &self.api, &self.token, args)
    }

    /// Runs a client command that must succeed and returns its output.
    ///
    /// # Panics
    ///
    /// If the command fails.
    pub fn ok(&self, args: &[&str]) -> String {
        let (ok, text) = self.wharf(args);
        assert!(ok, "wharf {args:?} failed:\n{text}");
        text
    }

    /// `wharf get services NAME -o json`, parsed; `Null` if it fails.
    pub fn service(&self, name: &str) -> serde_json::Value {
        let (ok, text) = self.wharf(&["get", "services", name, "-o", "json"]);
        if ok { serde_json::from_str(&text).unwrap_or(serde_json::Value::Null) } else { serde_json::Value::Null }
    }

    /// The hosts running a ready replica of `name`.
    pub fn hosts_of(&self, name: &str) -> Vec<String> {
        let view = self.service(name);
        view["status"]["replicas"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| r["state"] == "ready")
            .filter_map(|r| r["host"].as_str().map(str::to_string))
            .collect()
    }
}

/// A running `wharf host` (killed when dropped).
pub struct Host {
    pub process: Process,
    pub name: String,
    /// The ingress's base URL.
    pub ingress: String,
}

impl Host {
    /// Starts `wharf host` named `name` in zone `zone` against `nats`, its
    /// data under `dir/<name>`, plus `extra` arguments.
    ///
    /// # Panics
    ///
    /// If it does not start within a minute.
    pub fn start(wharf: &Path, nats: &str, name: &str, zone: &str, dir: &Path, extra: &[&str]) -> Host {
        let dir = dir.join(name);
        let labels = format!("zone={zone}");
        let dir = dir.to_str().expect("a UTF-8 path");
        let mut args = vec!["host", "--nats", nats, "--name", name, "--labels", &labels, "--listen", "127.0.0.1:0", "--data-dir", dir];
        // Hosts of one test share the machine: each takes a free admin port unless told one.
        if !extra.contains(&"--admin-listen") {
            args.extend_from_slice(&["--admin-listen", "127.0.0.1:0"]);
        }
        args.extend_from_slice(extra);
        let mut process = Process::spawn_with(Command::new(wharf).args(&args).env("WHARF_LOG", std::env::var("WHARF_LOG").unwrap_or_else(|_| "info".into())));
        let line = process.wait_for_line("ingress http://", Duration::from_secs(60));
        Host { process, name: name.to_string(), ingress: url_in(&line) }
    }
}

/// Runs `wharf` with `args` against `api` with `token`: (success, stdout + stderr).
pub(crate) fn run(wharf: &Path, api: &str, token: &str, args: &[&str]) -> (bool, String) {
    let output = Command::new(wharf).args(args).env("WHARF_API", api).env("WHARF_TOKEN", token).stdin(Stdio::null()).output();
    match output {
        Ok(output) => (output.status.success(), format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))),
        Err(e) => (false, format!("cannot run {}: {e}", wharf.display())),
    }
}
