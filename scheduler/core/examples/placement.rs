//! Times placement on a synthetic cluster: `cargo run --release -p
//! wharf-scheduler-core --example placement [HOSTS] [REPLICAS]` (default
//! 10,000 hosts and 100,000 replicas).

fn main() {
    let mut args = std::env::args().skip(1).map(|arg| arg.parse::<usize>());
    let hosts = args.next().and_then(Result::ok).unwrap_or(10_000);
    let replicas = args.next().and_then(Result::ok).unwrap_or(100_000);
    let result = wharf_scheduler_core::bench_placement(hosts, replicas);
    println!(
        "placed {} replicas on {hosts} hosts in {:.3} s: {:.0} placements/s, \
         max spread imbalance {} (hosts) {} (spread-label domains)",
        result.placements,
        result.seconds,
        result.per_second,
        result.max_spread_imbalance,
        result.max_domain_imbalance
    );
}
