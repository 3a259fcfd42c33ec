//! Jobs over a real nats-server with real scheduler and host processes:
//! `wharf run` prints a job's output and exits with its exit code; a job
//! that exits non-zero is retried with backoff and reported with its exit
//! code; looping, trapping and hogging jobs are stopped by their limits and
//! reported; an attempt on a killed host is counted lost and retried on
//! another; a component that is not a command, a bad cron expression and
//! a bad time zone are refused with nothing stored; scheduled jobs run on
//! schedule with `forbid` respected (a run longer than the period is never
//! started twice at once, and `replace` stops the running one), and a
//! leader's takeover neither fires a schedule time twice nor stops the
//! schedule.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use wharf_proto::job::{JobHistory, JobRun, RunCause, RunState};
use wharf_testkit::cluster::{Host, Scheduler};
use wharf_testkit::nats::NatsServer;
use wharf_testkit::samples;

const WHARF: &str = env!("CARGO_BIN_EXE_wharf");

/// Small buckets: JetStream reserves every bucket's limit from its store
/// up front, and test machines' disks are small.
const SMALL_BUCKETS: [&str; 6] = ["--kv-max-bytes", "16MiB", "--data-kv-max-bytes", "16MiB", "--objects-max-bytes", "256MiB"];

/// A `wharf` client command against `scheduler`: exit code, stdout, stderr.
fn wharf(scheduler: &Scheduler, args: &[&str]) -> (i32, String, String) {
    wharf_at(&scheduler.api, &scheduler.token, args)
}

/// A `wharf` client command against the API at `api`.
fn wharf_at(api: &str, token: &str, args: &[&str]) -> (i32, String, String) {
    let output = Command::new(WHARF)
        .args(args)
        .env("WHARF_API", api)
        .env("WHARF_TOKEN", token)
        .stdin(Stdio::null())
        .output()
        .expect("wharf runs");
    (output.status.code().unwrap_or(-1), String::from_utf8_lossy(&output.stdout).into_owned(), String::from_utf8_lossy(&output.stderr).into_owned())
}

/// The job's history, as `wharf get jobs NAME -o json` shows it.
fn history(scheduler: &Scheduler, name: &str) -> JobHistory {
    let (code, out, err) = wharf(scheduler, &["get", "jobs", name, "-o", "json"]);
    assert_eq!(code, 0, "get jobs {name}: {err}");
    let views: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    serde_json::from_value(views[0]["history"].clone()).expect("a history")
}

/// Waits until `check` holds for the job's history.
async fn until(scheduler: &Scheduler, name: &str, within: Duration, check: impl Fn(&JobHistory) -> bool) -> JobHistory {
    let started = Instant::now();
    loop {
        let history = history(scheduler, name);
        if check(&history) {
            return history;
        }
        assert!(started.elapsed() < within, "{name}: not reached within {within:?}: {history:#?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A nats-server, a scheduler and two hosts (zones a and b), and the directory they keep their data in.
fn cluster() -> (NatsServer, tempfile::TempDir, Scheduler, Vec<Host>) {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let wharf = Path::new(WHARF);
    let scheduler = Scheduler::start(wharf, &nats.url(), &dir.path().join("scheduler"), &SMALL_BUCKETS);
    let hosts = [("host-a", "a"), ("host-b", "b")].iter().map(|(n, z)| Host::start(wharf, &nats.url(), n, z, dir.path(), &[])).collect();
    (nats, dir, scheduler, hosts)
}

fn only_run(history: &JobHistory) -> &JobRun {
    assert_eq!(history.runs.len(), 1, "{history:#?}");
    &history.runs[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jobs_run_to_completion_with_exit_codes_retries_and_limits() {
    let (_nats, dir, scheduler, _hosts) = cluster();
    let job = samples::path("job");
    let job = job.to_str().expect("utf-8");
    let hello = samples::path("hello");

    // Not a command: refused by the export's name, nothing stored.
    let (code, _, err) = wharf(&scheduler, &["run", hello.to_str().expect("utf-8"), "--name", "not-a-job"]);
    assert_ne!(code, 0);
    assert!(err.contains("does not export `wasi:cli/run`") && err.contains("wasi:http/incoming-handler"), "{err}");
    let (code, _, err) = wharf(&scheduler, &["get", "jobs", "not-a-job"]);
    assert!(code != 0 && err.contains("not found"), "nothing stored: {err}");
    // A bad cron expression and a bad time zone: refused, nothing stored.
    let (code, _, err) = wharf(&scheduler, &["run", job, "--name", "bad-cron", "--schedule", "*/5 * * *"]);
    assert!(code != 0 && err.contains("schedule: \"*/5 * * *\" is not a cron schedule") && err.contains("five fields"), "{err}");
    let (code, _, err) = wharf(&scheduler, &["run", job, "--name", "bad-zone", "--schedule", "0 3 * * *", "--time-zone", "Mars/Olympus"]);
    assert!(code != 0 && err.contains("time_zone: \"Mars/Olympus\" is not a time zone"), "{err}");
    // A manifest with a bad schedule is refused by the CLI before anything is uploaded...
    let manifest = dir.path().join("bad.yaml");
    std::fs::write(&manifest, format!("name: bad-manifest\ncomponent: {{ file: {job} }}\nschedule: \"61 * * * *\"\n")).expect("write");
    let (code, _, err) = wharf(&scheduler, &["run", "-f", manifest.to_str().expect("utf-8")]);
    assert!(code != 0 && err.contains("schedule: \"61 * * * *\" is not a cron schedule"), "{err}");
    // ... and by the API, whoever the client is.
    let digest = wharf_proto::Digest::of(&std::fs::read(job).expect("read the sample"));
    let client = reqwest::Client::new();
    for (body, expected) in [
        (serde_json::json!({"component": digest, "schedule": "*/5 * * *"}), "schedule: \"*/5 * * *\" is not a cron schedule"),
        (serde_json::json!({"component": digest, "schedule": "0 3 * * *", "time_zone": "Mars/Olympus"}), "time_zone: \"Mars/Olympus\" is not a time zone"),
        (serde_json::json!({"component": digest, "every": "2s", "concurrency_policy": "sometimes"}), "concurrency_policy"),
    ] {
        let response = client.put(format!("{}/v1/namespaces/default/jobs/bad-api", scheduler.api)).bearer_auth(&scheduler.token).json(&body).send().await.expect("answered");
        assert_eq!(response.status(), 400, "{body}");
        let error: serde_json::Value = response.json().await.expect("a JSON error");
        let message = error["error"]["message"].as_str().unwrap_or_default();
        assert!(error["error"]["code"] == "invalid_spec" && message.contains(expected), "{error}");
    }
    let (_, out, _) = wharf(&scheduler, &["get", "jobs", "-o", "json"]);
    assert_eq!(out.trim(), "[]", "no job was stored");

    // Success: the output is printed (stdout and stderr apart), exit code 0.
    let started = Instant::now();
    let (code, out, err) = wharf(&scheduler, &["run", job, "--name", "greet", "--", "print", "hello from a job", "warn", "a line on stderr"]);
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    assert!(out.contains("hello from a job") && !out.contains("a line on stderr"), "{out}");
    assert!(err.contains("a line on stderr"), "{err}");
    eprintln!("a one-off job ran in {:?} (upload, placement, compile, run, report)", started.elapsed());
    let run = only_run(&history(&scheduler, "greet")).clone();
    assert_eq!((run.state, run.exit_code(), run.attempts.len()), (RunState::Succeeded, Some(0), 1));
    let host = run.attempts[0].host.clone().expect("a host");
    assert!(["host-a", "host-b"].contains(&host.as_str()), "{host}");
    let table = wharf(&scheduler, &["get", "jobs"]).1;
    assert!(table.contains("default/greet") && table.contains("succeeded") && table.contains(host.as_str()), "{table}");
    let (_, logs, _) = wharf(&scheduler, &["logs", "greet"]);
    assert!(logs.contains("hello from a job") && logs.contains("rev1"), "wharf logs reads a job's output: {logs}");

    // A job may use its namespace's wasi:keyvalue buckets and wasi:config, as a service does.
    for expected in ["job: runs is 1", "job: runs is 2"] {
        let (code, out, err) = wharf(&scheduler, &["run", job, "--name", "counting", "--keyvalue", "tally", "--config", "mode=test", "--", "count", "tally", "runs", "config", "mode"]);
        assert!(code == 0 && out.contains(expected) && out.contains("mode=test"), "{out}{err}");
    }
    let (_, stored, _) = wharf(&scheduler, &["kv", "get", "tally", "runs"]);
    assert_eq!(stored.trim(), "2");
    let (code, _, err) = wharf(&scheduler, &["run", job, "--name", "undeclared", "--", "count", "tally", "runs"]);
    assert!(code == 1 && err.contains("cannot count runs in tally"), "a bucket the job does not declare is refused: {err}");

    // A job that exits non-zero is retried with backoff, then reported with its exit code.
    let (code, out, err) = wharf(&scheduler, &["run", job, "--name", "failing", "--retries", "2", "--backoff", "300ms", "--", "print", "trying", "exit", "3"]);
    assert_eq!(code, 1, "WASI 0.2 reports failure as exit code 1: {out}{err}");
    assert!(out.contains("trying"), "{out}");
    assert!(err.contains("exited with code 1 after 3 attempt(s)"), "{err}");
    let run = only_run(&history(&scheduler, "failing")).clone();
    assert_eq!((run.state, run.exit_code(), run.attempts.len()), (RunState::Failed, Some(1), 3));
    for pair in run.attempts.windows(2) {
        let waited = pair[1].started_ms - pair[0].finished_ms.expect("finished");
        assert!(waited >= 250, "the backoff is kept: {waited} ms between attempts {pair:#?}");
    }
    let doubled = run.attempts[2].started_ms - run.attempts[1].finished_ms.expect("finished");
    assert!(doubled >= 550, "the backoff doubles: {doubled} ms");
    // What the leader decided is in the namespace's events.
    let (_, events, _) = wharf(&scheduler, &["events", "--service", "failing"]);
    assert!(events.contains("Started") && events.contains("run 1 after 3 attempt(s)") && events.contains("Failed"), "{events}");
    // One that fails once is retried and succeeds.
    let (code, out, err) = wharf(&scheduler, &["run", job, "--name", "flaky", "--retries", "2", "--backoff", "100ms", "--", "fail-before-attempt", "2"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("job: attempt 2 succeeds") && err.contains("attempt 1 of run 1 failed"), "{out}{err}");
    let run = only_run(&history(&scheduler, "flaky")).clone();
    assert_eq!((run.state, run.attempts.len(), run.attempts[0].exit_code), (RunState::Succeeded, 2, Some(1)));

    // Limits stop what would not end, and say which limit.
    for (name, flags, outcome) in [
        ("looping", vec!["--timeout", "1s", "--", "spin"], "deadline"),
        ("burning", vec!["--fuel", "50000000", "--", "spin"], "fuel_exhausted"),
        ("trapping", vec!["--", "trap"], "trap"),
        ("hogging", vec!["--memory", "16MiB", "--", "hog", "64"], "memory_limit"),
    ] {
        let started = Instant::now();
        let mut args = vec!["run", job, "--name", name];
        args.extend(flags);
        let (code, out, err) = wharf(&scheduler, &args);
        assert_eq!(code, 1, "{name}: {out}{err}");
        let run = only_run(&history(&scheduler, name)).clone();
        let attempt = &run.attempts[0];
        assert_eq!((run.state, attempt.outcome.as_deref(), attempt.exit_code), (RunState::Failed, Some(outcome), None), "{name}: {run:#?}");
        assert!(err.contains(attempt.error.as_deref().unwrap_or("?")), "{name}: the error is printed: {err}");
        assert!(started.elapsed() < Duration::from_secs(30), "{name} took {:?}", started.elapsed());
    }
    let (_, table, _) = wharf(&scheduler, &["get", "jobs", "looping"]);
    assert!(table.contains("ran past its deadline of 1s"), "{table}");

    // --detach returns at once; the run happens anyway.
    let (code, out, _) = wharf(&scheduler, &["run", job, "--name", "later", "--detach", "--", "sleep", "500", "print", "done later"]);
    assert_eq!(code, 0);
    assert!(out.contains("job default/later: run requested (#1)"), "{out}");
    let later = until(&scheduler, "later", Duration::from_secs(20), |h| h.runs.iter().any(|r| r.state.is_finished())).await;
    assert_eq!(only_run(&later).state, RunState::Succeeded);
    // Running an existing job again is a second run.
    let (code, out, _) = wharf(&scheduler, &["run", job, "--name", "later", "--", "print", "again"]);
    assert_eq!(code, 0);
    assert!(out.contains("again") && !out.contains("done later"), "only this run's output: {out}");
    assert_eq!(history_len(&scheduler, "later"), 2);

    // No host fits: the run waits, saying why; deleting the job drops it.
    let (code, out, err) = wharf(&scheduler, &["run", job, "--name", "nowhere", "--on", "zone=nowhere", "--detach"]);
    assert_eq!(code, 0, "{out}{err}");
    let waiting = until(&scheduler, "nowhere", Duration::from_secs(10), |h| h.runs.iter().any(|r| r.pending.is_some())).await;
    let reason = only_run(&waiting).pending.clone().unwrap_or_default();
    assert_eq!(only_run(&waiting).state, RunState::Pending);
    assert!(reason.contains("none of 2 ready host(s) has the labels zone=nowhere"), "{reason}");
    let (code, out, _) = wharf(&scheduler, &["delete", "nowhere"]);
    assert!(code == 0 && out.contains("job default/nowhere deleted"), "{out}");
    let (code, _, err) = wharf(&scheduler, &["get", "jobs", "nowhere"]);
    assert!(code != 0 && err.contains("not found"), "{err}");

    // Tokens: a namespace token sees and runs only its namespace's jobs.
    let (_, shop, _) = wharf(&scheduler, &["token", "create", "-n", "shop", "--write"]);
    let shop = shop.trim().to_string();
    let (_, listed, _) = wharf_at(&scheduler.api, &shop, &["get", "jobs", "-o", "json"]);
    assert_eq!(listed.trim(), "[]", "a shop token sees no default job");
    let (code, _, err) = wharf_at(&scheduler.api, &shop, &["get", "jobs", "greet"]);
    assert!(code != 0 && err.contains("may act only in namespace(s) shop, not default"), "{err}");
    let (code, out, err) = wharf_at(&scheduler.api, &shop, &["run", job, "-n", "shop", "--name", "tally", "--", "print", "in shop"]);
    assert!(code == 0 && out.contains("in shop"), "{out}{err}");
    let (_, listed, _) = wharf_at(&scheduler.api, &shop, &["get", "jobs"]);
    assert!(listed.contains("shop/tally") && !listed.contains("default/"), "{listed}");

    // `wharf apply` reads jobs beside services; applying again runs nothing again.
    let manifest = dir.path().join("app.yaml");
    std::fs::write(
        &manifest,
        format!(
            "services:\n  - name: web\n    component: {{ file: {} }}\njobs:\n  - name: migrate\n    component: {{ file: {job} }}\n    args: [print, migrated]\n  - name: nightly\n    component: {{ file: {job} }}\n    schedule: \"0 3 * * *\"\n    time_zone: America/New_York\n",
            hello.display()
        ),
    )
    .expect("write");
    let manifest = manifest.to_str().expect("utf-8");
    let (code, out, err) = wharf(&scheduler, &["apply", "-f", manifest, "--no-wait"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("job default/migrate created, run requested (#1)") && out.contains("job default/nightly created\n"), "{out}");
    let migrated = until(&scheduler, "migrate", Duration::from_secs(20), |h| h.runs.iter().any(|r| r.state.is_finished())).await;
    assert_eq!(only_run(&migrated).state, RunState::Succeeded);
    let (code, out, _) = wharf(&scheduler, &["apply", "-f", manifest, "--no-wait"]);
    assert_eq!(code, 0);
    assert!(out.contains("job default/migrate unchanged") && !out.contains("run requested"), "{out}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(history_len(&scheduler, "migrate"), 1, "an unchanged one-off job is not run again");
    let nightly = history(&scheduler, "nightly");
    assert!(nightly.runs.is_empty(), "not due yet: {nightly:?}");
    let (_, table, _) = wharf(&scheduler, &["get", "jobs", "nightly"]);
    assert!(table.contains("0 3 * * * America/New_York") && table.contains("T0") , "the next run is shown: {table}");
    // A service may not take a job's name, nor a job a service's.
    let (code, _, err) = wharf(&scheduler, &["deploy", hello.to_str().expect("utf-8"), "--name", "migrate", "--no-wait"]);
    assert!(code != 0 && err.contains("default/migrate is a job"), "{err}");
    let (code, _, err) = wharf(&scheduler, &["run", job, "--name", "web"]);
    assert!(code != 0 && err.contains("default/web is a service"), "{err}");
}

fn history_len(scheduler: &Scheduler, name: &str) -> usize {
    history(scheduler, name).runs.len()
}

/// The runs' attempts as (start, end) intervals, in start order.
fn intervals(history: &JobHistory) -> Vec<(u64, u64)> {
    let mut spans: Vec<(u64, u64)> = history
        .runs
        .iter()
        .flat_map(|r| r.attempts.iter().map(|a| (a.started_ms, a.finished_ms.unwrap_or(u64::MAX))))
        .collect();
    spans.sort_unstable();
    spans
}

fn fired_at(history: &JobHistory) -> Vec<u64> {
    history
        .runs
        .iter()
        .map(|r| match r.cause {
            RunCause::Schedule { at_ms } => at_ms,
            RunCause::Request { number } => panic!("a scheduled job ran on request {number}"),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scheduled_jobs_run_on_schedule_with_forbid_across_a_leader_takeover() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let wharf_path = Path::new(WHARF);
    let mut first = Scheduler::start(wharf_path, &nats.url(), &dir.path().join("s1"), &[&["--name", "s1"][..], &SMALL_BUCKETS].concat());
    let second = Scheduler::start(wharf_path, &nats.url(), &dir.path().join("s2"), &[&["--name", "s2"][..], &SMALL_BUCKETS].concat());
    let _hosts: Vec<Host> = [("host-a", "a"), ("host-b", "b")].iter().map(|(n, z)| Host::start(wharf_path, &nats.url(), n, z, dir.path(), &[])).collect();
    let job = samples::path("job");
    let job = job.to_str().expect("utf-8");

    // Every second, each run taking 2.5 s: `forbid` skips the times due
    // while one runs, so runs never overlap.
    let (code, out, err) = wharf(&first, &["run", job, "--name", "slow", "--every", "1s", "--", "print", "tick", "sleep", "2500"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("job default/slow: scheduled (every 1s), next run"), "{out}");
    // A six-field cron schedule (seconds first), in a time zone, quick runs.
    let (code, out, err) = wharf(&first, &["run", job, "--name", "quick", "--schedule", "*/2 * * * * *", "--time-zone", "Europe/Berlin", "--", "print", "quick"]);
    assert_eq!(code, 0, "{out}{err}");
    let slow = until(&first, "slow", Duration::from_secs(30), |h| h.runs.iter().filter(|r| r.state == RunState::Succeeded).count() >= 2).await;
    let spans = intervals(&slow);
    for pair in spans.windows(2) {
        assert!(pair[1].0 >= pair[0].1, "forbid: a run started while another ran: {spans:?}");
    }
    assert!(slow.skipped >= 2, "times due during a run were skipped: {slow:#?}");
    for run in &slow.runs {
        let RunCause::Schedule { at_ms } = run.cause else { panic!("{run:?}") };
        assert_eq!(at_ms % 1000, 0, "every 1s fires on whole seconds");
        let started = run.attempts.first().map_or(at_ms, |a| a.started_ms);
        // Slack for a loaded test machine; the time it was due is exact.
        assert!(started - at_ms < 3000, "run {} started {} ms after it was due", run.run, started - at_ms);
    }
    // `replace`: a run still running when the next is due is stopped on its host.
    let (code, out, err) = wharf(&first, &["run", job, "--name", "replaced", "--every", "2s", "--concurrency-policy", "replace", "--", "print", "begun", "sleep", "5000", "print", "finished"]);
    assert_eq!(code, 0, "{out}{err}");
    let replaced = until(&first, "replaced", Duration::from_secs(30), |h| h.runs.iter().filter(|r| r.state == RunState::Cancelled).count() >= 2).await;
    for run in replaced.runs.iter().filter(|r| r.state == RunState::Cancelled) {
        assert_eq!(run.attempts[0].outcome.as_deref(), Some("cancelled"), "{run:#?}");
        assert!(run.attempts[0].error.as_deref().unwrap_or("").contains("replaced by a newer run"), "{run:#?}");
    }
    let running = replaced.runs.iter().filter(|r| r.state == RunState::Running).count();
    assert!(running <= 1, "replace keeps one run at a time: {replaced:#?}");
    let (_, logs, _) = wharf(&first, &["logs", "replaced"]);
    assert!(logs.contains("begun") && !logs.contains("finished"), "a replaced run is stopped before it ends: {logs}");
    wharf(&first, &["delete", "replaced"]);
    let quick = until(&first, "quick", Duration::from_secs(20), |h| h.runs.iter().filter(|r| r.state == RunState::Succeeded).count() >= 2).await;
    assert!(fired_at(&quick).iter().all(|at| at % 2000 == 0), "*/2 seconds: {:?}", fired_at(&quick));
    let (_, logs, _) = wharf(&first, &["logs", "quick"]);
    assert!(logs.contains("quick"), "{logs}");

    // kill -9 the leader: the other takes over the schedules; no time fires twice, and runs go on.
    let healthz = |api: String| async move {
        let body: serde_json::Value = reqwest::get(format!("{api}/healthz")).await.expect("answered").json().await.expect("JSON");
        body["leadership"]["leader"] == true
    };
    assert!(healthz(first.api.clone()).await && !healthz(second.api.clone()).await, "the first scheduler leads");
    let before = history(&first, "quick").last_run;
    first.process.kill();
    let after = until(&second, "quick", Duration::from_secs(20), |h| h.last_run >= before + 3).await;
    let fired = fired_at(&after);
    let mut unique = fired.clone();
    unique.dedup();
    assert_eq!(fired, unique, "no schedule time fired twice across the takeover");
    assert!(fired.windows(2).all(|w| w[1] > w[0]), "{fired:?}");
    let slow = until(&second, "slow", Duration::from_secs(20), |h| h.runs.iter().filter(|r| r.state == RunState::Succeeded).count() >= 3).await;
    let spans = intervals(&slow);
    for pair in spans.windows(2) {
        assert!(pair[1].0 >= pair[0].1, "forbid across the takeover: {spans:?}");
    }
    let (_, table, _) = wharf(&second, &["get", "jobs"]);
    assert!(table.contains("default/slow") && table.contains("every 1s") && table.contains("forbid") && table.contains("*/2 * * * * * Europe/Berlin"), "{table}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_runs_under_wharf_up_and_counts_in_the_hosts_metrics() {
    let dir = tempfile::tempdir().expect("tempdir");
    let up = wharf_testkit::wharf::Up::start(Path::new(WHARF), dir.path(), &[]);
    let job = samples::path("job");
    let (code, out, err) = wharf_at(&up.api, &up.token, &["run", job.to_str().expect("utf-8"), "--name", "local", "--", "print", "one node", "exit", "1"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("one node") && err.contains("exited with code 1"), "{out}{err}");
    let metrics = reqwest::get(format!("{}/metrics", up.admin)).await.expect("metrics").text().await.expect("text");
    assert!(
        metrics.lines().any(|l| l.starts_with("wharf_requests_total{") && l.contains("service=\"default/local\"") && l.contains("outcome=\"exited_nonzero\"") && l.ends_with(" 1")),
        "the run counts in wharf_requests_total: {}",
        metrics.lines().filter(|l| l.contains("default/local")).collect::<Vec<_>>().join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_on_a_killed_host_is_counted_lost_and_retried_on_another() {
    let (_nats, _dir, scheduler, mut hosts) = cluster();
    let job = samples::path("job");
    let (code, out, err) = wharf(
        &scheduler,
        &["run", job.to_str().expect("utf-8"), "--name", "survivor", "--timeout", "4s", "--retries", "1", "--backoff", "100ms", "--detach", "--", "sleep", "2500", "print", "survived"],
    );
    assert_eq!(code, 0, "{out}{err}");
    let running = until(&scheduler, "survivor", Duration::from_secs(20), |h| h.runs.iter().any(|r| r.state == RunState::Running)).await;
    let first = only_run(&running).attempts[0].host.clone().expect("a host");
    let victim = hosts.iter().position(|h| h.name == first.as_str()).expect("one of ours");
    hosts[victim].process.kill();
    // No result comes: after the deadline and the grace, the attempt is lost and retried elsewhere.
    let done = until(&scheduler, "survivor", Duration::from_secs(60), |h| h.runs.iter().any(|r| r.state.is_finished())).await;
    let run = only_run(&done);
    assert_eq!(run.state, RunState::Succeeded, "{run:#?}");
    assert_eq!(run.attempts.len(), 2, "{run:#?}");
    assert_eq!(run.attempts[0].outcome.as_deref(), Some("lost"), "{run:#?}");
    assert!(run.attempts[0].error.as_deref().unwrap_or("").contains(first.as_str()), "the error names the host: {run:#?}");
    assert_ne!(run.attempts[1].host.as_ref(), Some(&first), "the retry ran elsewhere");
    let (_, logs, _) = wharf(&scheduler, &["logs", "survivor"]);
    assert!(logs.contains("survived"), "{logs}");
}
