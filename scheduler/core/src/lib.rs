//! Wharf's scheduling decisions as pure functions: given a [`Snapshot`] of
//! the hosts, the desired services and the current assignments,
//! [`reconcile()`] returns a [`Plan`]: every host's full assignment, the start
//! and stop actions that lead there, and the replicas no host can take, each
//! with a reason. The [`Autoscaler`] decides how many replicas a service
//! with an autoscale policy should run, from the load observed and a `now`
//! passed in (see its module for the Knative-style rules).
//!
//! **Architecture invariant:** this crate knows nothing of NATS, tokio,
//! axum, wasmtime or clocks, and draws no unseeded randomness. Its only
//! dependency is `wharf-proto`. The controller around it reads the stores,
//! calls [`reconcile()`] on the whole snapshot each pass and writes the
//! assignments; a [`PlacementIndex`], told what changed, places only that
//! (the controller keeps one between passes, starting it from a
//! [`PlacementIndex::reconcile`]). The
//! only clock reads are [`bench_placement`] and [`bench_index`], the
//! benchmark entry points, which nothing else calls.
//!
//! # Reconcile
//!
//! Level-triggered and idempotent: the same snapshot gives the same plan,
//! and a plan whose assignments became current gives no actions next time.
//! Current replicas stay where they are while their host is ready, matches
//! the service's labels and has room; replicas of deleted services, above
//! the desired count, on hosts that are down or gone, or that no longer fit
//! are stopped; then every missing replica is placed. See [`reconcile()`].
//!
//! # Placement
//!
//! Placement is filter → score → pick:
//!
//! - Filters: the host is ready and carries the placement's labels (applied
//!   once per distinct set of labels, which yields the service's *group* of
//!   hosts), then memory and instance slots after the replicas already
//!   reserved there. A replica reserves its memory request (by default a
//!   small figure, not its cap: see [`wharf_proto::ServiceSpec::memory_request`])
//!   or, placed now, the larger of that and the peak its service's instances
//!   were seen using ([`Workload::memory_peak`]), out of the host's memory
//!   times its overcommit ratio ([`HostInfo::memory_overcommit`]); and
//!   its instance request of the host's instance slots
//!   ([`wharf_proto::ServiceSpec::instances_request`], 1 by default).
//! - Score, compared in order: for a service with `placement.spread`, fewest
//!   replicas of the service in the host's domain (see below); fewest
//!   replicas of the service on the host (spread), fewest in the host's
//!   `zone` (zone spread), lowest share of the host reserved after placing
//!   plus a little for requests in flight, less a bonus when the component
//!   is cached there; then the host id.
//! - Pick: the best score among the candidates scored.
//!
//! ## Spread labels
//!
//! `placement.spread: zone` (any label key) splits the service's group into
//! *domains*, one per distinct value of the label among the group's hosts;
//! hosts without the label (or with an empty value) together form one more
//! domain, so a label only some hosts carry still spreads, with the
//! unlabelled hosts as one failure domain. Each replica goes to a domain
//! holding the fewest of the service's replicas among those where some host
//! has room, and within it to a host holding the fewest (then the rest of
//! the score). So, while capacity allows, replicas per domain differ by at
//! most one, and per host within a domain by at most one; domains come
//! first, so a domain of one host takes its share even while larger domains
//! have empty hosts. A domain with no room is skipped, and its share goes to
//! the others. Values no qualifying host has are not domains: `disk=ssd`
//! with `spread: zone` spreads over the zones that have ssd hosts. Hosts
//! that are not ready are in no domain, so a replica on a host that went
//! down is placed again in the domain now holding the fewest, which is its
//! old domain when another host there qualifies.
//!
//! Spread is honoured when placing, like every score: replicas that still
//! fit are never moved to even domains out (scaling up fills the emptiest
//! domains first). Without `spread`, a service spreads over hosts, and the
//! `zone` label ([`ZONE_LABEL`]) only breaks ties between equally spread
//! hosts, as a preference within the sample scored.
//!
//! ## Why a sample, and the trade-off
//!
//! Scoring every host for every replica costs O(hosts) each: 10⁹ host
//! visits for 100,000 replicas on 10,000 hosts. Instead each replica scores
//! a sample, as Nomad does: candidates come from the group in a
//! pseudo-random order fixed by a hash of the service id and replica index
//! (a start and a stride coprime with the group's size, so the order
//! covers every host once and costs nothing to set up), and the walk stops
//! after `k ≈ log₂(group size)` admissible candidates, at most 10 (from
//! groups of 1,024 hosts; 7 for 100). Sampling `k` and keeping the best balances load almost as well
//! as a full scan (the power of `k` choices). The hosts that have the
//! component cached are few and known, and a sample would rarely meet
//! them, so up to `k` of them are scored before the walk. Candidates are
//! fetched eight at a time (their hosts' lines loaded together, which the
//! processor overlaps), as among a million hosts each is a cache miss.
//!
//! What sampling could lose, and how it is kept:
//!
//! - *Even spread is exact.* Each service counts how many hosts of its
//!   group hold 0, 1, 2, … of its replicas, so it knows the lowest count
//!   (its *spread level*) without a scan. Only candidates at that level
//!   count towards `k`; while fewer than `k` remain, the walk covers the
//!   whole group. So a replica always lands on a host with the fewest
//!   replicas of its service that has room: with equal, unconstrained hosts
//!   the replicas of a service on any two hosts differ by at most one.
//! - *Full hosts.* When no host at the spread level has room, the full walk
//!   learns the lowest level that does (the service's floor; capacity only
//!   shrinks during a pass, so it stays true) or, finding no room
//!   anywhere, the reason, which every later replica of the service reuses.
//!   A full cluster thus costs one walk per service, not per replica, and
//!   services of the same size in the same group share that walk too.
//! - *Spread labels are exact too.* A service with `placement.spread`
//!   keeps the same counts per domain (how many domains hold 0, 1, 2, … of
//!   its replicas) and, per domain, per host. Each replica walks only the
//!   domains at the lowest count, in an order fixed by the service and
//!   replica, and within each of them its hosts as above, until about `k`
//!   admissible hosts at their domain's host level are found (at least two
//!   per domain). A domain walked to the end without room is remembered as
//!   full; when every domain at the lowest count is full, the next count is
//!   tried. Group and domains are index ranges built once per distinct
//!   (labels, spread label), so a replica costs about the same as without
//!   a spread label.
//! - *What stays approximate:* the zone, load, cache and in-flight terms
//!   pick the best of `k` candidates, not of all (exact in groups of at most
//!   `k` hosts). The walk is longer than `k` when many hosts are full or
//!   only a few remain at the spread level: the worst case per replica is
//!   one pass over its group.
//!
//! # Keeping the view between passes
//!
//! [`reconcile()`] builds its view of the cluster (hosts by index, the
//! ready hosts by label, each placement's group, each spread label's
//! domains, the hosts caching each component, what is reserved where) from
//! the snapshot, every time: at a million hosts that costs seconds before
//! anything is placed. A [`PlacementIndex`] keeps that view and is told what
//! changed: hosts joining, leaving or changing (readiness, labels, capacity,
//! overcommit; requests in flight and cached components only rescore) and
//! workloads added, scaled, changed or removed. Each change updates the
//! indexes it touches (a host joining is inserted into the groups and
//! domains whose labels it carries; the counts of replicas per host and per
//! domain are kept as replicas are committed and released, and the members
//! holding none are derived from the group's size, so a host joining a
//! group touches no service). A pass ([`PlacementIndex::place`]) places only
//! the replicas those changes left without a host, and those waiting for
//! room when room may have appeared, with the same filters, scores and
//! sampling, and returns what it decided as a [`Pass`]: a view of the index
//! that names hosts and workloads by the index's own ids, so a pass placing
//! a million replicas copies no id ([`Pass::changes`] makes the owned
//! actions and hosts). A group is built on first use by merging the sorted
//! lists of the ready hosts carrying each of its labels, and a spread label's
//! values from the same lists, so neither reads every host's labels; the
//! per-service maps placement reads for every candidate (replicas per host,
//! zone and domain) hash by a multiply, their keys being the crate's own indices.
//! So adding a service of 10 replicas to a full cluster of 1,000,000 hosts
//! costs its 10 placements: about 0.2 ms. The walk caches of a pass
//! (floors, full domains, sizes with no room) are forgotten at the next,
//! since capacity may have grown in between.
//!
//! `cargo run --workspace --release --example placement [HOSTS] [REPLICAS]
//! [ADDED]` times [`bench_placement`] (one `reconcile` of a snapshot, from
//! empty) and [`bench_index`] (the hosts join an index; one pass places
//! every replica; then services of 10 are added one at a time, one pass
//! each); `wharf-bench placement` prints the same figures and writes them as
//! JSON (figures in `bench/RESULTS.md`). With 10,000 hosts and 100,000
//! replicas (10,000 services of 10, about 40% of them with a spread label)
//! the development machine, idle, placed 230,000–460,000 replicas per second
//! in one reconcile, with a spread imbalance of 1 over hosts and 1 over
//! domains.

mod autoscale;
mod cluster;
mod hash;
mod health;
mod index;
pub mod jobs;
mod placement;
mod reconcile;
mod rollout;
mod simulate;
mod snapshot;

pub use autoscale::{Autoscaler, Decision};
pub use cluster::ZONE_LABEL;
pub use index::{Changes, Pass, PlacementIndex};
pub use health::{FailedReplica, ReplicaTraffic, RetryAction, RetryPolicy, outliers, retry};
pub use reconcile::reconcile;
pub use rollout::{ObservedReplica, ObservedState, RolloutInput, RolloutPlan, StepTraffic, plan_rollout};
pub use simulate::{
    BenchResult, IndexBenchResult, bench_index, bench_placement, max_domain_imbalance, max_spread_imbalance, simulate,
};
pub use snapshot::{Action, HostInfo, Plan, ReplicaRef, Snapshot, Unplaceable, Workload, WorkloadId};
