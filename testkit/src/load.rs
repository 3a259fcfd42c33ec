//! Steady HTTP load for tests: a few workers send GET requests in a loop
//! to one or more URLs and count every answer, so a test can say how many
//! requests failed while something changed (and show which, and when).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What a load run saw.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    /// Requests answered 2xx.
    pub ok: u64,
    /// Requests that failed: not 2xx, or no answer. Each with when (since
    /// the start) and what, for the failure message.
    pub failures: Vec<(Duration, String)>,
    /// 2xx answers counted by body (trimmed), e.g. a greeting per revision.
    pub bodies: BTreeMap<String, u64>,
    /// How long the load ran.
    pub elapsed: Duration,
    /// When it started, in milliseconds since the Unix epoch (to line
    /// failures up with times other processes report).
    pub started_at_ms: u64,
}

impl Tally {
    /// Requests sent.
    pub fn total(&self) -> u64 {
        self.ok + self.failures.len() as u64
    }

    /// Requests per second over the run.
    pub fn rate(&self) -> f64 {
        self.total() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// The first few failures, for a message.
    pub fn describe_failures(&self) -> String {
        let shown: Vec<String> = self.failures.iter().take(10).map(|(at, what)| format!("at {at:.2?}: {what}")).collect();
        format!("{} failed of {}: {}", self.failures.len(), self.total(), shown.join("; "))
    }
}

/// A running load; [`Load::stop`] ends it and returns the tally.
pub struct Load {
    stop: Arc<AtomicBool>,
    tally: Arc<Mutex<Tally>>,
    workers: Vec<tokio::task::JoinHandle<()>>,
    started: Instant,
    started_at_ms: u64,
}

impl Load {
    /// Starts `workers` workers per URL, each sending one request at a time
    /// (closed loop), with a 10 s timeout per request.
    ///
    /// # Panics
    ///
    /// If the HTTP client cannot be built.
    pub fn start(urls: &[String], workers: usize) -> Load {
        let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).pool_max_idle_per_host(workers * 2).build().expect("an HTTP client");
        let stop = Arc::new(AtomicBool::new(false));
        let tally = Arc::new(Mutex::new(Tally::default()));
        let started = Instant::now();
        let mut handles = Vec::new();
        for url in urls {
            for _ in 0..workers {
                let (client, stop, tally, url) = (client.clone(), stop.clone(), tally.clone(), url.clone());
                handles.push(tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        let outcome = match client.get(&url).send().await {
                            Ok(response) => {
                                let status = response.status();
                                let error = response.headers().get("x-wharf-error").and_then(|v| v.to_str().ok()).map(str::to_string);
                                let body = response.text().await.unwrap_or_default();
                                if status.is_success() {
                                    Ok(body.trim().to_string())
                                } else {
                                    Err(format!("{url}: {status} {} {}", error.unwrap_or_default(), body.trim()))
                                }
                            }
                            Err(e) => Err(format!("{url}: {e}")),
                        };
                        let Ok(mut tally) = tally.lock() else { return };
                        match outcome {
                            Ok(body) => {
                                tally.ok += 1;
                                *tally.bodies.entry(body).or_default() += 1;
                            }
                            Err(what) => tally.failures.push((started.elapsed(), what)),
                        }
                    }
                }));
            }
        }
        let started_at_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0)
            .saturating_sub(u64::try_from(started.elapsed().as_millis()).unwrap_or(0));
        Load { stop, tally, workers: handles, started, started_at_ms }
    }

    /// What was seen so far.
    pub fn snapshot(&self) -> Tally {
        let mut tally = self.tally.lock().map(|t| t.clone()).unwrap_or_default();
        tally.elapsed = self.started.elapsed();
        tally.started_at_ms = self.started_at_ms;
        tally
    }

    /// Stops the workers (each finishes its request) and returns the tally.
    pub async fn stop(self) -> Tally {
        self.stop.store(true, Ordering::Relaxed);
        for worker in self.workers {
            let _ = worker.await;
        }
        let mut tally = self.tally.lock().map(|t| t.clone()).unwrap_or_default();
        tally.elapsed = self.started.elapsed();
        tally.started_at_ms = self.started_at_ms;
        tally
    }
}
