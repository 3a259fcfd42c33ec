//! Real `wharf` processes for tests: spawned with arguments, their output
//! collected, killed (and reaped) when dropped.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A running child process whose stdout and stderr are collected line by line.
pub struct Process {
    child: Child,
    lines: Receiver<String>,
    seen: Arc<Mutex<Vec<String>>>,
    name: String,
}

impl Process {
    /// Spawns `program` with `args`, collecting both output streams.
    ///
    /// # Panics
    ///
    /// If the program cannot be started.
    pub fn spawn(program: impl AsRef<Path>, args: &[&str]) -> Process {
        Self::spawn_with(Command::new(program.as_ref()).args(args))
    }

    /// Spawns a prepared command, collecting both output streams.
    ///
    /// # Panics
    ///
    /// If the program cannot be started.
    pub fn spawn_with(command: &mut Command) -> Process {
        let name = format!("{command:?}");
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let (tx, lines) = channel();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().map(|s| Box::new(s) as Box<dyn std::io::Read + Send>);
        let stderr = child.stderr.take().map(|s| Box::new(s) as Box<dyn std::io::Read + Send>);
        for stream in [stdout, stderr].into_iter().flatten() {
            let tx = tx.clone();
            let seen = seen.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if let Ok(mut seen) = seen.lock() {
                        seen.push(line.clone());
                    }
                    let _ = tx.send(line);
                }
            });
        }
        Process { child, lines, seen, name }
    }

    /// Waits up to `timeout` for an output line containing `needle` and returns it.
    ///
    /// # Panics
    ///
    /// If no such line appears in time or the process's output ends first;
    /// the message includes everything the process printed.
    pub fn wait_for_line(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => {
                    panic!("{} printed no line containing {needle:?} within {timeout:?}; output:\n{}", self.name, self.output())
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait().map(|s| s.to_string()).unwrap_or_default();
                    panic!("{} exited ({status}) before printing {needle:?}; output:\n{}", self.name, self.output())
                }
            }
        }
    }

    /// Everything printed so far, stdout and stderr interleaved by arrival.
    pub fn output(&self) -> String {
        self.seen.lock().map(|s| s.join("\n")).unwrap_or_default()
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM and waits up to `timeout` for the process to exit.
    ///
    /// # Panics
    ///
    /// If it does not exit in time.
    pub fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        // std has no SIGTERM; `kill` is on every machine the tests run on.
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        self.wait(timeout)
    }

    /// Kills the process with SIGKILL (`kill -9`) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits up to `timeout` for the process to exit by itself.
    ///
    /// # Panics
    ///
    /// If it does not exit in time.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                // Give the reader threads a moment to drain the pipes.
                std::thread::sleep(Duration::from_millis(50));
                return status;
            }
            if Instant::now() > deadline {
                self.kill();
                panic!("{} did not exit within {timeout:?}; output:\n{}", self.name, self.output());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}
