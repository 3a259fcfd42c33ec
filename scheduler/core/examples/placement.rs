//! Times placement on a synthetic cluster: `cargo run --workspace --release
//! --example placement [HOSTS] [REPLICAS] [ADDED]` (default 10,000 hosts,
//! 100,000 replicas, 100 services added): one reconcile of a snapshot, then
//! a persistent `PlacementIndex` (bulk pass, then services of 10 added one
//! at a time to the full cluster). `wharf-bench placement` prints the same
//! figures and writes them as JSON. A fourth argument `index` skips the
//! reconcile figure.

fn main() {
    let mut args = std::env::args().skip(1).map(|arg| arg.parse::<usize>());
    let hosts = args.next().and_then(Result::ok).unwrap_or(10_000);
    let replicas = args.next().and_then(Result::ok).unwrap_or(100_000);
    let added = args.next().and_then(Result::ok).unwrap_or(100);
    if std::env::args().nth(4).as_deref() != Some("index") {
        reconcile(hosts, replicas);
    }
    index(hosts, replicas, added);
}

fn reconcile(hosts: usize, replicas: usize) {
    let result = wharf_scheduler_core::bench_placement(hosts, replicas);
    println!(
        "reconcile: placed {} replicas on {hosts} hosts in {:.3} s: {:.0} placements/s, \
         max spread imbalance {} (hosts) {} (spread-label domains)",
        result.placements,
        result.seconds,
        result.per_second,
        result.max_spread_imbalance,
        result.max_domain_imbalance
    );
}

fn index(hosts: usize, replicas: usize, added: usize) {
    let index = wharf_scheduler_core::bench_index(hosts, replicas, added);
    println!(
        "index: {hosts} hosts joined in {:.3} s; bulk pass placed {} replicas in {:.3} s: \
         {:.0} placements/s (owned actions {:.3} s more), max spread imbalance {} (hosts) {} (domains); decisions {:016x}",
        index.join_seconds,
        index.placements,
        index.seconds,
        index.per_second,
        index.owned_seconds,
        index.max_spread_imbalance,
        index.max_domain_imbalance,
        index.decisions
    );
    println!(
        "index: {} services of 10 added one at a time: p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms; \
         {} replicas placed; max spread imbalance {} (hosts) {} (domains); decisions {:016x}",
        index.added,
        index.added_quantile(0.5),
        index.added_quantile(0.99),
        index.added_quantile(1.0),
        index.added_placements,
        index.added_max_spread_imbalance,
        index.added_max_domain_imbalance,
        index.added_decisions
    );
}
