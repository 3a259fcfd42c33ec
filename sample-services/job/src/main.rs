//! `job`: a `wasi:cli/run` command for Wharf's jobs. Its arguments are
//! steps, run left to right; without any it prints `job: done`.
//!
//! - `print TEXT`: TEXT on stdout;
//! - `warn TEXT`: TEXT on stderr;
//! - `sleep MS`: waits MS milliseconds (a host timer, not a busy loop);
//! - `exit N`: exits with code N (WASI 0.2 tells a host only success or failure);
//! - `fail-before-attempt N`: exits 1 while env `WHARF_ATTEMPT` is below N
//!   (so a job retried N-1 times then succeeds);
//! - `spin`: loops forever (until fuel or the deadline stops it);
//! - `hog MB`: allocates MB MiB and touches every page;
//! - `trap`: panics;
//! - `count BUCKET KEY`: adds 1 to KEY in the `wasi:keyvalue` bucket BUCKET;
//! - `config KEY`: prints `KEY=VALUE` from `wasi:config` (`KEY unset` if none).

use std::io::Write;

/// Bindings for the `wasi:config` imports (see the `settings` sample).
mod config {
    wit_bindgen::generate!({
        path: "../../wit/deps/config",
        world: "wasi:config/imports",
    });
}

/// Bindings for the `wasi:keyvalue` imports (see the `counter` sample).
mod keyvalue {
    wit_bindgen::generate!({
        path: "../../wit/deps/keyvalue",
        world: "wasi:keyvalue/imports",
    });
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.is_empty() {
        println!("job: done");
        return;
    }
    let mut steps = args.iter();
    while let Some(step) = steps.next() {
        let mut value = || steps.next().cloned().unwrap_or_default();
        match step.as_str() {
            "print" => println!("{}", value()),
            "warn" => eprintln!("{}", value()),
            "sleep" => std::thread::sleep(std::time::Duration::from_millis(number(&value()))),
            "exit" => {
                let _ = std::io::stdout().flush();
                std::process::exit(i32::try_from(number(&value())).unwrap_or(1));
            }
            "fail-before-attempt" => {
                let wanted = number(&value());
                let attempt = std::env::var("WHARF_ATTEMPT").map(|a| number(&a)).unwrap_or(0);
                if attempt < wanted {
                    eprintln!("job: attempt {attempt} fails (succeeds from attempt {wanted})");
                    std::process::exit(1);
                }
                println!("job: attempt {attempt} succeeds");
            }
            "spin" => {
                let mut n: u64 = 0;
                loop {
                    n = std::hint::black_box(n.wrapping_add(1));
                }
            }
            "hog" => {
                let mib = usize::try_from(number(&value())).unwrap_or(usize::MAX);
                let mut memory: Vec<u8> = Vec::with_capacity(mib.saturating_mul(1 << 20));
                memory.resize(mib.saturating_mul(1 << 20), 1);
                // Kept observable, so the allocation is not optimised away.
                let memory = std::hint::black_box(memory);
                println!("job: allocated {} MiB", memory.iter().step_by(4096).filter(|b| **b == 1).count() >> 8);
            }
            "trap" => panic!("job: deliberate panic"),
            "config" => {
                let key = value();
                match config::wasi::config::store::get(&key) {
                    Ok(Some(found)) => println!("{key}={found}"),
                    Ok(None) => println!("{key} unset"),
                    Err(e) => {
                        eprintln!("job: cannot read config {key}: {e:?}");
                        std::process::exit(1);
                    }
                }
            }
            "count" => {
                let (bucket, key) = (value(), value());
                let opened = keyvalue::wasi::keyvalue::store::open(&bucket);
                match opened.and_then(|bucket| keyvalue::wasi::keyvalue::atomics::increment(&bucket, &key, 1)) {
                    Ok(count) => println!("job: {key} is {count}"),
                    Err(e) => {
                        eprintln!("job: cannot count {key} in {bucket}: {e:?}");
                        std::process::exit(1);
                    }
                }
            }
            other => {
                eprintln!("job: unknown step {other:?}");
                std::process::exit(2);
            }
        }
    }
}

fn number(text: &str) -> u64 {
    text.trim().parse().unwrap_or(0)
}
