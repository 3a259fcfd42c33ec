//! A real `wharf up` process for tests and benchmarks, with the addresses it
//! printed and a way to run client commands against it.

use crate::process::Process;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// A running `wharf up` (killed when dropped).
pub struct Up {
    /// The process, for its output or to stop it.
    pub process: Process,
    /// The REST API's base URL, e.g. `http://127.0.0.1:7700` (`https://` when
    /// started with `--api-tls-cert`).
    pub api: String,
    /// The ingress's base URL.
    pub ingress: String,
    /// The admin listener's base URL (`/metrics`), on a free loopback port.
    pub admin: String,
    /// The admin token `wharf up` created in its data directory.
    pub token: String,
    wharf: std::path::PathBuf,
}

impl Up {
    /// Starts `wharf up` on free loopback ports with `data_dir`, plus `extra`
    /// arguments, and waits until it is serving.
    ///
    /// # Panics
    ///
    /// If it does not start within a minute.
    pub fn start(wharf: &Path, data_dir: &Path, extra: &[&str]) -> Up {
        let mut command = Command::new(wharf);
        command.arg("up").arg("--data-dir").arg(data_dir).args(["--api", "127.0.0.1:0", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"]).args(extra);
        if std::env::var_os("WHARF_LOG").is_none() {
            command.env("WHARF_LOG", "warn");
        }
        let mut process = Process::spawn_with(&mut command);
        let line = process.wait_for_line("Wharf is up", Duration::from_secs(60));
        let urls: Vec<String> = line.split_whitespace().filter(|w| w.starts_with("http://") || w.starts_with("https://")).map(str::to_string).collect();
        assert_eq!(urls.len(), 2, "expected the API and ingress URLs in: {line}");
        let admin_line = process.wait_for_line("admin endpoints", Duration::from_secs(60));
        let admin = admin_line.split_whitespace().find(|w| w.starts_with("http://")).map(|url| url.trim_end_matches("/metrics").to_string());
        let admin = admin.unwrap_or_else(|| panic!("expected the admin URL in: {admin_line}"));
        process.wait_for_line("Ctrl-C stops", Duration::from_secs(60));
        let token = std::fs::read_to_string(data_dir.join("admin-token")).map(|t| t.trim().to_string()).unwrap_or_default();
        Up { process, api: urls[0].clone(), ingress: urls[1].clone(), admin, token, wharf: wharf.to_path_buf() }
    }

    /// Runs a client command against this cluster: (success, stdout + stderr).
    pub fn wharf(&self, args: &[&str]) -> (bool, String) {
        crate::cluster::run(&self.wharf, &self.api, &self.token, args)
    }

    /// Runs a client command that must succeed and returns its output.
    ///
    /// # Panics
    ///
    /// If the command fails; the message holds its output and the cluster's.
    pub fn ok(&self, args: &[&str]) -> String {
        let (ok, text) = self.wharf(args);
        assert!(ok, "wharf {args:?} failed:\n{text}\n--- wharf up output:\n{}", self.process.output());
        text
    }

    /// `wharf get services NAME -o json`, parsed; `Null` if it fails.
    pub fn service(&self, name: &str) -> serde_json::Value {
        let (ok, text) = self.wharf(&["get", "services", name, "-o", "json"]);
        if ok { serde_json::from_str(&text).unwrap_or(serde_json::Value::Null) } else { serde_json::Value::Null }
    }
}
