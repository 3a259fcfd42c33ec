//! The README is executable documentation: its `sh` command blocks run in
//! order, as written, on a fresh home directory, inside a network
//! namespace of their own (so the README's fixed loopback ports, 7700,
//! 8080 and 4222, are free whatever else the machine runs).
//!
//! How each line runs:
//! - `wharf up`, `wharf scheduler`, `wharf host`, `wharf serve` and
//!   `nats-server` start in the background, and the next line waits until
//!   the process says it is ready; they stop at the end, or at a block
//!   marked `<!-- readme-test: fresh -->`, which also starts a new home
//!   directory;
//! - `wharf logs ... -f`, `wharf events ... -f` and `wharf top` follow:
//!   each must still be running (or have succeeded) after 3 s;
//! - any other line must exit 0, unless its comment says `# refused`,
//!   when it must fail; `curl` runs with `--fail-with-body`, so an HTTP
//!   error fails the line as well.
//!
//! Shell state carries from line to line: variables (each one set is
//! exported, `set -a`, so that it can be saved) and `export`s. The files a
//! line names (`hello.wasm`, ...) are made from the samples in the working
//! directory first; `app.yaml` is the README's manifest (the `yaml` block
//! that starts with `services:`); `deploy/` is a copy of the repository's. The first
//! block (`./run`, `./test`) is not run: CI runs `./test`, which runs this.
//!
//! A block that cannot run here (it needs the internet or names machines
//! that do not exist) is marked `<!-- readme-test: skip: REASON -->`; the
//! test requires a reason and prints every block it skipped.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use wharf_testkit::process::Process;
use wharf_testkit::samples;

const WHARF: &str = env!("CARGO_BIN_EXE_wharf");

/// One `sh` block of the README.
struct Block {
    /// The README line its fence is on.
    line: usize,
    /// Its command lines (continuations joined).
    commands: Vec<String>,
    /// `fresh`, `skip: ...`, or nothing.
    directive: Option<String>,
}

/// The `sh` blocks of `text`, each with the directive in the HTML comment
/// just above its fence (blank lines between allowed).
fn blocks(text: &str) -> Vec<Block> {
    let lines: Vec<&str> = text.lines().collect();
    let mut blocks = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let fence = lines[i].trim_start();
        let Some(info) = fence.strip_prefix("```") else {
            i += 1;
            continue;
        };
        let start = i;
        let mut body = Vec::new();
        i += 1;
        while i < lines.len() && !lines[i].trim_start().starts_with("```") {
            body.push(lines[i]);
            i += 1;
        }
        i += 1;
        if info.trim() != "sh" {
            continue;
        }
        let directive = lines[..start]
            .iter()
            .rev()
            .find(|l| !l.trim().is_empty())
            .and_then(|l| l.trim().strip_prefix("<!-- readme-test:"))
            .and_then(|l| l.strip_suffix("-->"))
            .map(|d| d.trim().to_string());
        let mut commands = Vec::new();
        let mut pending = String::new();
        for line in body {
            match line.strip_suffix('\\') {
                Some(head) => pending.push_str(head),
                None => {
                    pending.push_str(line);
                    if !pending.trim().is_empty() {
                        commands.push(std::mem::take(&mut pending));
                    }
                    pending.clear();
                }
            }
        }
        blocks.push(Block { line: start + 1, commands, directive });
    }
    blocks
}

/// How a line runs (see the module docs).
#[derive(Debug, PartialEq)]
enum Kind {
    /// A server, ready once it prints this.
    Background(&'static str),
    Follow,
    MustFail,
    MustSucceed,
}

fn kind(command: &str) -> Kind {
    let (code, comment) = command.split_once(" #").unwrap_or((command, ""));
    // The program, after any leading `VAR=value` assignments.
    let words: Vec<&str> = code.split_whitespace().skip_while(|w| w.contains('=') && !w.starts_with('-')).collect();
    let program = words.first().copied().unwrap_or_default();
    let sub = words.get(1).copied().unwrap_or_default();
    match (program, sub) {
        // Printed once the samples (with --samples) are ready.
        ("wharf", "up") => Kind::Background("Ctrl-C stops"),
        ("wharf", "scheduler") => Kind::Background("Wharf scheduler: API"),
        ("wharf", "host") => Kind::Background("Wharf host"),
        ("wharf", "serve") => Kind::Background("serving "),
        ("nats-server", _) => Kind::Background("Server is ready"),
        ("wharf", "top") => Kind::Follow,
        ("wharf", "logs" | "events") if words.contains(&"-f") => Kind::Follow,
        _ if comment.trim_start().starts_with("refused") => Kind::MustFail,
        _ => Kind::MustSucceed,
    }
}

/// Sends `signal` to the process group led by `leader` (procps' `kill`
/// wants `--` before a negative id).
fn signal_group(leader: u32, signal: &str) {
    let _ = Command::new("kill").args(["-s", signal, "--", &format!("-{leader}")]).status();
}

/// A network namespace with its loopback up, deleted when dropped.
struct Netns(String);

impl Netns {
    fn create() -> Netns {
        let name = format!("wharf-readme-{}", std::process::id());
        // One left by a run that was killed (its name is this process id).
        let _ = Command::new("ip").args(["netns", "delete", &name]).stderr(std::process::Stdio::null()).status();
        let added = Command::new("ip").args(["netns", "add", &name]).status().expect("`ip` (iproute2) runs");
        assert!(added.success(), "cannot create network namespace {name}: the README test runs as root (as CI does)");
        let up = Command::new("ip").args(["netns", "exec", &name, "ip", "link", "set", "lo", "up"]).status().expect("ip runs");
        assert!(up.success(), "cannot bring up the loopback of {name}");
        Netns(name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "delete", &self.0]).status();
    }
}

/// Where the README's lines run: the namespace, the working directory, a
/// home directory, the shell state, and the servers started so far.
struct Session {
    netns: Netns,
    work: PathBuf,
    home: PathBuf,
    state: PathBuf,
    path: String,
    servers: Vec<Process>,
    homes: usize,
}

impl Session {
    fn new(root: &Path) -> Session {
        let work = root.join("work");
        std::fs::create_dir_all(&work).expect("work dir");
        let wharf_dir = Path::new(WHARF).parent().expect("wharf's directory");
        // `wharf` and a nats-server 2.10+ on PATH, as the README assumes.
        let nats = wharf_testkit::nats::server_binary();
        let nats_dir = nats.parent().expect("nats-server's directory");
        let path = format!("{}:{}:{}", wharf_dir.display(), nats_dir.display(), std::env::var("PATH").unwrap_or_default());
        let mut session =
            Session { netns: Netns::create(), home: PathBuf::new(), state: root.join("shell-state"), work, path, servers: Vec::new(), homes: 0 };
        session.fresh();
        session
    }

    /// Stops every server and starts a new home directory and shell state.
    fn fresh(&mut self) {
        for mut server in self.servers.drain(..) {
            // Its process group: the shell and what it started.
            signal_group(server.id(), "TERM");
            // A server that does not stop on SIGTERM fails the test here.
            server.wait(Duration::from_secs(20));
        }
        self.homes += 1;
        self.home = self.work.parent().expect("root").join(format!("home-{}", self.homes));
        std::fs::create_dir_all(&self.home).expect("home dir");
        std::fs::write(&self.state, "").expect("shell state");
    }

    /// A shell in the namespace running `script` in the working directory
    /// with the session's state; a process group of its own.
    fn shell(&self, script: &str) -> Command {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.netns.0, "bash", "-c", script])
            .current_dir(&self.work)
            .env_clear()
            .env("PATH", &self.path)
            .env("HOME", &self.home)
            .env("LANG", "C.UTF-8")
            .env("RUST_BACKTRACE", "0")
            .env("WHARF_SAMPLES_DIR", samples::dir())
            .process_group(0);
        command
    }

    fn run(&mut self, at: usize, command: &str) {
        let state = self.state.display();
        eprintln!("README:{at}: $ {command}");
        match kind(command) {
            Kind::Background(ready) => {
                let mut server = Process::spawn_with(&mut self.shell(&format!("set -a; source {state}; set +a\n{command}")));
                server.wait_for_line(ready, Duration::from_secs(120));
                self.servers.push(server);
            }
            Kind::Follow => {
                let mut follower = Process::spawn_with(&mut self.shell(&format!("set -a; source {state}; set +a\n{command}")));
                std::thread::sleep(Duration::from_secs(3));
                // SIGTERM, not SIGINT: a test run from a background job
                // inherits SIGINT ignored.
                signal_group(follower.id(), "TERM");
                let status = follower.wait(Duration::from_secs(10));
                // Stopped while following (by the signal, or 143 from the shell), or done.
                let ok = status.success() || status.code() == Some(143) || status.code().is_none();
                assert!(ok, "README:{at}: `{command}` ended with {status} before it was interrupted:\n{}", follower.output());
                eprintln!("{}", follower.output());
            }
            kind => {
                let line = match command.strip_prefix("curl ") {
                    Some(rest) => format!("curl --fail-with-body -sS {rest}"),
                    None => command.to_string(),
                };
                // `set -a` stays on: `X=$(...)` is exported, and so saved.
                let script = format!("set -a; source {state}\n{line}\nrc=$?\nexport -p > {state}\nexit $rc");
                let mut process = Process::spawn_with(&mut self.shell(&script));
                let status = process.wait(Duration::from_secs(300));
                let output = process.output();
                eprintln!("{output}");
                match kind {
                    Kind::MustFail => assert!(!status.success(), "README:{at}: `{command}` says it is refused, but it succeeded:\n{output}"),
                    _ => assert!(status.success(), "README:{at}: `{command}` failed ({status}):\n{output}"),
                }
            }
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        for server in &self.servers {
            signal_group(server.id(), "KILL");
        }
    }
}

/// The files the README's lines name, made from the samples and the README.
fn files(work: &Path, readme: &str) {
    let manifest = readme.split("```yaml\n").skip(1).find(|b| b.starts_with("services:")).and_then(|b| b.split("```").next());
    std::fs::write(work.join("app.yaml"), manifest.expect("the README shows a manifest with `services:`")).expect("app.yaml");
    let copies = [
        ("hello", &["hello.wasm", "web.wasm", "api.wasm", "client.wasm"][..]),
        ("counter", &["counter.wasm"]),
        ("settings", &["app.wasm"]),
        ("notes", &["notes.wasm"]),
        ("job", &["report.wasm", "flaky.wasm", "cleanup.wasm", "tick.wasm"]),
    ];
    for (sample, names) in copies {
        for name in names {
            std::fs::copy(samples::path(sample), work.join(name)).expect("sample copied");
        }
    }
    // New versions of hello: the same code under another digest (a custom
    // section appended, which a component may carry).
    let hello = std::fs::read(samples::path("hello")).expect("hello");
    for version in ["v2", "v3"] {
        let mut bytes = hello.clone();
        bytes.extend_from_slice(&[0, 1 + version.len() as u8, version.len() as u8]);
        bytes.extend_from_slice(version.as_bytes());
        std::fs::write(work.join(format!("hello-{version}.wasm")), bytes).expect("hello version");
    }
    // A copy: `wharf nats add-host` writes into it.
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("repository");
    let copied = Command::new("cp").arg("-r").arg(repo.join("deploy")).arg(work).status().expect("cp runs");
    assert!(copied.success(), "deploy/ copied");
}

#[test]
fn the_readme_parses_into_blocks_with_their_directives() {
    let text = "intro\n```sh\nwharf up   # starts\ncurl a \\\n  b\n```\n\n<!-- readme-test: skip: needs the internet -->\n\n```sh\nwharf push x\n```\n```yaml\nname: x\n```\n";
    let found = blocks(text);
    assert_eq!(found.len(), 2, "the yaml block is not a command block");
    assert_eq!(found[0].commands, ["wharf up   # starts", "curl a   b"]);
    assert_eq!(found[0].directive, None);
    assert_eq!(found[1].directive.as_deref(), Some("skip: needs the internet"));
    assert_eq!(kind("wharf up --samples   # API"), Kind::Background("Ctrl-C stops"));
    assert_eq!(kind("WHARF_NATS_PASSWORD=$P wharf host --nats x"), Kind::Background("Wharf host"));
    assert_eq!(kind("wharf logs web -f     # follows"), Kind::Follow);
    assert_eq!(kind("wharf artifact rm sha256:x   # refused (409) while used"), Kind::MustFail);
    assert_eq!(kind("wharf get services"), Kind::MustSucceed);
}

#[test]
fn the_readme_command_blocks_run_as_written() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("repository");
    let text = std::fs::read_to_string(repo.join("README.md")).expect("README.md");
    let root = tempfile::tempdir().expect("tempdir");
    let mut session = Session::new(root.path());
    files(&session.work, &text);
    let mut skipped = Vec::new();
    let mut ran = 0;
    // While fixing the README: README_TEST_FROM=LINE starts at the first
    // block at or after that line (one that starts `fresh`, to mean anything).
    let from: usize = std::env::var("README_TEST_FROM").ok().and_then(|l| l.parse().ok()).unwrap_or(0);
    for block in blocks(&text).into_iter().skip(1).filter(|b| b.line >= from) {
        match block.directive.as_deref() {
            Some(d) if d.starts_with("skip") => {
                let reason = d.trim_start_matches("skip").trim_start_matches(':').trim();
                assert!(!reason.is_empty(), "README:{}: a skipped block must say why", block.line);
                skipped.push(format!("README:{}: {reason}", block.line));
                continue;
            }
            Some("fresh") => session.fresh(),
            Some(other) => panic!("README:{}: unknown readme-test directive {other:?}", block.line),
            None => {}
        }
        for command in &block.commands {
            session.run(block.line, command);
        }
        ran += 1;
    }
    eprintln!("ran {ran} blocks; skipped:\n{}", skipped.join("\n"));
    assert!(ran >= 10, "only {ran} of the README's blocks ran");
}
