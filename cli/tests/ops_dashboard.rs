//! The dashboard at `/ui`, loaded in headless Chromium (Debian's
//! `chromium`) as a person's browser would: it shows the deployed services
//! and hosts with the token it is given, changes after a scale, shows a
//! namespace token only its namespace, and without a token asks for one.
//! The rendered DOM is asserted on; a screenshot is saved as
//! `<target>/tmp/dashboard.png`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use wharf_testkit::samples;
use wharf_testkit::wharf::Up;

const WHARF: &str = env!("CARGO_BIN_EXE_wharf");

fn chromium() -> PathBuf {
    let path = std::env::var_os("WHARF_CHROMIUM").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("chromium"));
    let found = Command::new(&path).arg("--version").output().is_ok_and(|o| o.status.success());
    assert!(found, "headless Chromium is needed: apt-get install chromium (./test installs it), or set WHARF_CHROMIUM");
    path
}

/// Loads `url` in a fresh browser profile and returns the DOM once its
/// scripts have run (and, with `screenshot`, saves a picture of the page).
fn render(url: &str, screenshot: Option<&Path>) -> String {
    let profile = tempfile::tempdir().expect("tempdir");
    let mut command = Command::new(chromium());
    command
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions", "--virtual-time-budget=4000", "--window-size=1400,1100"])
        .arg(format!("--user-data-dir={}", profile.path().display()));
    match screenshot {
        Some(path) => command.arg(format!("--screenshot={}", path.display())),
        None => command.arg("--dump-dom"),
    };
    let output = command.arg(url).output().expect("chromium runs");
    assert!(output.status.success(), "chromium failed: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

async fn wait_ready(up: &Up, name: &str, replicas: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while up.service(name)["status"]["ready"].as_u64() != Some(replicas) {
        assert!(Instant::now() < deadline, "{name} never had {replicas} ready: {}", up.service(name));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_services_and_hosts_changes_after_a_scale_and_keeps_to_the_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    let up = Up::start(Path::new(WHARF), &dir.path().join("data"), &["--name", "dash-host", "--labels", "zone=a"]);
    let hello = samples::path("hello");
    let hello = hello.to_str().expect("utf-8");
    up.ok(&["deploy", hello, "--name", "web", "--route", "/web"]);
    up.ok(&["deploy", hello, "--name", "cart", "--namespace", "shop", "--route", "/cart"]);
    let page = format!("{}/ui", up.api);

    let dom = render(&format!("{page}#token={}", up.token), None);
    assert!(dom.contains(r#"data-host="dash-host""#) && dom.contains("zone=a"), "the host and its labels:\n{dom}");
    assert!(dom.contains(r#"data-service="default/web" data-ready="1" data-desired="1""#), "web, 1 of 1 ready:\n{dom}");
    assert!(dom.contains(r#"data-service="shop/cart""#), "every namespace for an admin:\n{dom}");
    assert!(dom.contains("Placed") && dom.contains("placed on host dash-host"), "recent events:\n{dom}");
    assert!(dom.contains("refreshes every 2 s"), "it loaded without an error:\n{dom}");

    up.ok(&["scale", "web", "3"]);
    wait_ready(&up, "web", 3).await;
    let dom = render(&format!("{page}#token={}", up.token), None);
    assert!(dom.contains(r#"data-service="default/web" data-ready="3" data-desired="3""#), "after the scale, 3 of 3:\n{dom}");
    let events = up.ok(&["events", "--service", "web"]);
    assert!(events.contains("Scaled") && events.contains("scaled 1 → 3 by its spec"), "a scale by hand is an event too:\n{events}");
    let picture = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    let _ = std::fs::remove_file(&picture);
    render(&format!("{page}#token={}", up.token), Some(&picture));
    let png = std::fs::read(&picture).expect("a screenshot was saved");
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "a real picture of the page ({} bytes)", png.len());
    eprintln!("screenshot: {}", picture.display());

    // A namespace token sees its namespace only.
    let shop = up.ok(&["token", "create", "-n", "shop"]).trim().to_string();
    let dom = render(&format!("{page}#token={shop}"), None);
    assert!(dom.contains(r#"data-service="shop/cart""#) && !dom.contains(r#"data-service="default/web""#), "{dom}");

    // Without a token: the page asks for one and shows no data.
    let dom = render(&page, None);
    assert!(dom.contains("no token") && dom.contains(r#"id="token-form" style="display: block;""#), "{dom}");
    assert!(!dom.contains("data-service="), "{dom}");
}
