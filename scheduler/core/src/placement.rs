//! Choosing a host for one replica: filter → score → pick, over a
//! deterministic sample of the replica's group (see the crate docs for why
//! a sample, and why it still spreads exactly).

use crate::cluster::{Cluster, Host, Service, Spread, cached_hosts, is_cached_on};
use crate::hash::{mix, walk};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use wharf_proto::ByteSize;

/// Why a host cannot take a replica.
#[derive(Clone, Copy)]
pub(crate) enum Rejection {
    /// Less memory is free than the replica reserves.
    Memory { free: u64 },
    /// Fewer instance slots are free than the replica's instance request.
    Instances { free: u64 },
}

type Filter = fn(&Host, &Service) -> Result<(), Rejection>;

/// The filters a candidate host must pass, in order. Two more come first and
/// are not in this list: the host is ready, and it carries the labels the
/// placement asks for. Neither changes during a reconcile, so they are applied
/// once per distinct placement when the cluster's groups are built, and every
/// candidate comes from its service's group. The two here change with every
/// replica placed; memory is checked first because it is what runs out first
/// on real hosts, so its reason is the one reported for a host short of both.
const FILTERS: [Filter; 2] = [memory_fits, instances_fit];

fn memory_fits(host: &Host, service: &Service) -> Result<(), Rejection> {
    let free = host.free_memory();
    if service.memory <= free {
        Ok(())
    } else {
        Err(Rejection::Memory { free })
    }
}

fn instances_fit(host: &Host, service: &Service) -> Result<(), Rejection> {
    let free = host.free_instances();
    if service.instances <= free {
        Ok(())
    } else {
        Err(Rejection::Instances { free })
    }
}

/// Whether `host` has room for a replica of `service`, or the first filter that says no.
pub(crate) fn admits(host: &Host, service: &Service) -> Result<(), Rejection> {
    FILTERS.iter().try_for_each(|filter| filter(host, service))
}

/// How much a host with the replica's component cached is preferred, in the
/// per-mille units of [`Score::load`]: over a host up to a quarter less full.
const CACHED_BONUS: i64 = 250;

/// In-flight requests weigh a quarter as much as reservations: they are a
/// moment's load, where reservations stay.
const IN_FLIGHT_DIVISOR: i64 = 4;

/// How many hosts of a walk are fetched together: their indices, then the
/// line of each that scoring reads, as independent loads the processor
/// overlaps. With a million hosts nearly every host a walk meets is a cache
/// miss, and taken one at a time the misses (the group's entry, then the
/// host) are waited out one after another. Fetching ahead reads at most
/// this many hosts past where a walk stops, and changes no decision.
const FETCH_AHEAD: usize = 8;

/// `candidates` (a host's index, with anything the caller carries along),
/// their hosts fetched [`FETCH_AHEAD`] at a time (see there).
fn fetched<'a, T: Copy + 'a>(hosts: &'a [Host], candidates: impl Iterator<Item = (u32, T)> + 'a) -> impl Iterator<Item = (u32, T)> + 'a {
    fetched_with(candidates, move |index| hosts[index as usize].reserved_memory)
}

/// [`fetched`], where `touch` loads what the caller reads of each
/// candidate (its host's scoring line, and anything else it reads).
fn fetched_with<'a, T: Copy + 'a>(
    mut candidates: impl Iterator<Item = (u32, T)> + 'a,
    touch: impl Fn(u32) -> u64 + 'a,
) -> impl Iterator<Item = (u32, T)> + 'a {
    let mut batch: [Option<(u32, T)>; FETCH_AHEAD] = [None; FETCH_AHEAD];
    let (mut at, mut len) = (0, 0);
    std::iter::from_fn(move || {
        if at == len {
            len = 0;
            while len < FETCH_AHEAD {
                let Some(candidate) = candidates.next() else { break };
                batch[len] = Some(candidate);
                len += 1;
            }
            // Touch what is read of each; the sum only keeps the loads.
            let touched = batch[..len].iter().flatten().fold(0u64, |sum, &(index, _)| sum ^ touch(index));
            std::hint::black_box(touched);
            at = 0;
        }
        (at < len).then(|| {
            at += 1;
            batch[at - 1]
        })?
    })
}

/// How good a host is for a replica; lower is better. The derived order
/// compares the fields in the order written, so each breaks the ties of the
/// one before:
/// 1. `domain_spread`: for a service with `placement.spread`, replicas of
///    the service already in the host's domain (its value of the spread
///    label); fewest wins. 0 for other services.
/// 2. `host_spread`: replicas of the service already on the host; fewest
///    wins, so a service spreads evenly over its hosts.
/// 3. `zone_spread`: replicas of the service already in the host's zone;
///    fewest wins, so among equally spread hosts the emptiest zone is chosen.
/// 4. `load`: the host's reserved share after placing, in per mille (the
///    larger of memory and instances), plus in-flight requests per instance
///    slot, less [`CACHED_BONUS`] if the component is cached there. Lowest
///    wins: spread policy.
/// 5. `host`: the host's index, which orders as its id, so ties are broken
///    the same way every time.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Score {
    domain_spread: u32,
    host_spread: u32,
    zone_spread: u32,
    load: i64,
    host: u32,
}

fn score(index: u32, host: &Host, service: &Service, cached_on: &[u32], domain_spread: u32) -> Score {
    let instance_slots = u64::from(host.capacity.instances);
    let reserved = per_mille(host.reserved_memory + service.memory, host.memory)
    .max(per_mille(
        host.reserved_instances + service.instances,
        instance_slots,
    ));
    let cached = if is_cached_on(cached_on, index) {
        CACHED_BONUS
    } else {
        0
    };
    Score {
        domain_spread,
        host_spread: service.on_host(index),
        zone_spread: service.in_zone(host.zone),
        load: reserved + host.in_flight_load - cached,
        host: index,
    }
}

/// What `in_flight` requests add to the load score of a host with
/// `instance_slots` slots (see [`Score::load`]).
pub(crate) fn in_flight_load(in_flight: u64, instance_slots: u32) -> i64 {
    per_mille(in_flight, u64::from(instance_slots)) / IN_FLIGHT_DIVISOR
}

/// `part / whole` in thousandths, at most 1000.
fn per_mille(part: u64, whole: u64) -> i64 {
    // In 64 bits unless the product overflows them (16 PB): a 128-bit
    // division is a library call, and this runs for every candidate.
    let per_mille = match part.checked_mul(1000) {
        Some(product) => u128::from(product / whole.max(1)),
        None => u128::from(part) * 1000 / u128::from(whole.max(1)),
    };
    per_mille.min(1000) as i64
}

/// The most admissible hosts a replica scores however large its group:
/// with d random candidates the fullest host exceeds the average by about
/// log log n / log d (the power of d choices), so past some ten the extra
/// candidates buy little balance, while each is a cache miss among a
/// million hosts (Kubernetes likewise scores a shrinking share of a large
/// cluster's nodes). It binds from groups of 1,024 hosts.
const MOST_CANDIDATES: usize = 10;

/// How many admissible hosts at the spread level to score before picking:
/// about log₂ of the group's size, as Nomad limits its candidates, never
/// fewer than two (the power of two choices) nor more than
/// [`MOST_CANDIDATES`].
fn candidates_to_score(group_size: usize) -> usize {
    ((usize::BITS - group_size.leading_zeros()) as usize).clamp(2, MOST_CANDIDATES)
}

/// Places replica `replica` of service `service` and returns the host's
/// index, or says why no host can take it.
///
/// Candidates are the hosts of the service's group that have its component
/// cached, then the whole group in an order fixed by the service and
/// replica ([`walk`]). Each must pass [`FILTERS`]; the walk stops
/// once it has scored [`candidates_to_score`] admissible hosts at the
/// service's spread level (none with fewer of its replicas could take one),
/// and the best [`Score`] seen wins. Only when fewer such hosts exist does
/// the walk cover the whole group, which also teaches the service's `floor`
/// or, finding no host, marks it exhausted.
///
/// A service with `placement.spread` goes to [`place_spread`] instead.
pub(crate) fn place(cluster: &mut Cluster, service: u32, replica: u32) -> Result<u32, String> {
    let wanted = &cluster.services[service as usize];
    if let Some(reason) = &wanted.exhausted {
        return Err(reason.clone());
    }
    let group = &cluster.groups[wanted.group];
    if group.hosts.is_empty() {
        let reason = no_host_reason(&group.labels, cluster.ready_hosts());
        return Err(exhaust(&mut cluster.services[service as usize], reason));
    }
    let size = (wanted.group, wanted.memory, wanted.instances);
    if let Some(reason) = cluster.no_room.get(&size) {
        let reason = reason.clone();
        return Err(exhaust(&mut cluster.services[service as usize], reason));
    }
    let placed = if wanted.spread.is_some() {
        place_spread(cluster, service, replica)
    } else {
        place_over_group(cluster, service, replica)
    };
    match placed {
        Some(host) => {
            cluster.commit(host, service, replica);
            Ok(host)
        }
        None => {
            let reason = rejections_in_group(cluster, service);
            cluster.no_room.insert(size, reason.clone());
            Err(exhaust(&mut cluster.services[service as usize], reason))
        }
    }
}

/// Places replica `replica` of `service` on a host it is not asked to
/// avoid, if it is asked to avoid any and some other host of its group has
/// room: the best [`Score`] over the whole group (a replica that failed on
/// a host is rare enough to afford the full scan). `None` when it avoids no
/// host or no other host has room; then it is placed as any replica, back
/// on an avoided host if that is the only one with room.
///
/// It only reads the service's placement caches (floors, exhausted) and
/// never sets them: an answer about one replica's hosts says nothing of
/// the service's others.
pub(crate) fn place_avoiding(cluster: &mut Cluster, service: u32, replica: u32) -> Option<u32> {
    let wanted = &cluster.services[service as usize];
    let avoid = wanted.avoid.get(&replica).filter(|avoid| !avoid.is_empty())?;
    let group = &cluster.groups[wanted.group];
    let cached_on = cluster.cached_on(wanted.component);
    let mut best: Option<Score> = None;
    for &index in &group.hosts {
        let host = &cluster.hosts[index as usize];
        if avoid.contains(&host.info.id) || admits(host, wanted).is_err() {
            continue;
        }
        let in_domain = wanted.spread.as_ref().map_or(0, |spread| spread.peek(cluster.domain_of(spread.partition, index)).0);
        let candidate = score(index, host, wanted, cached_on, in_domain);
        if best.is_none_or(|best| candidate < best) {
            best = Some(candidate);
        }
    }
    let host = best?.host;
    cluster.commit(host, service, replica);
    Some(host)
}

/// The host for a replica of a service without a spread label (see
/// [`place`]), or `None` when no host of its group has room.
fn place_over_group(cluster: &mut Cluster, service: u32, replica: u32) -> Option<u32> {
    let Cluster {
        hosts,
        services,
        groups,
        cached,
        ..
    } = &mut *cluster;
    let wanted = &mut services[service as usize];
    let group = &groups[wanted.group];
    let cached_on = cached[wanted.component as usize].as_slice();
    let level = wanted.hosts.level(group.hosts.len());
    let enough = candidates_to_score(group.hosts.len());
    let mut best: Option<Score> = None;
    let mut at_level = 0;
    let mut walked_all = true;
    let key = mix(wanted.hash ^ u64::from(replica));
    // The hosts with the component cached are few and known, and a sample
    // would rarely meet them, so up to `enough` of them go first, as extra
    // candidates: the walk may meet them again, so only the walk counts
    // towards `enough`.
    let cached = cached_hosts(cached_on, key, enough).filter(|&host| group.contains(host));
    // A group of every host (no labels asked, every host ready) lists the
    // hosts in index order, so its position is the host's index: one load
    // saved per candidate, the same walk.
    let every_host = group.hosts.len() == hosts.len();
    let walked = walk(group.hosts.len(), key).map(|position| {
        let host = if every_host { position as u32 } else { group.hosts[position] };
        (host, true)
    });
    for (index, in_walk) in fetched(hosts, cached.map(|host| (host, false)).chain(walked)) {
        let host = &hosts[index as usize];
        if admits(host, wanted).is_err() {
            continue;
        }
        let candidate = score(index, host, wanted, cached_on, 0);
        if best.is_none_or(|best| candidate < best) {
            best = Some(candidate);
        }
        at_level += usize::from(in_walk && candidate.host_spread <= level);
        if at_level >= enough {
            walked_all = false;
            break;
        }
    }
    let best = best?;
    if walked_all {
        wanted.hosts.floor = best.host_spread;
    }
    Some(best.host)
}

/// The host for a replica of a service with `placement.spread` (see the
/// crate docs, *Spread labels*), or `None` when no host of its group has room.
///
/// The domains holding the fewest of the service's replicas, among those
/// not known to be full, are walked in an order fixed by the service and
/// replica; within each, its hosts are walked the same way, as
/// [`place_over_group`] walks a group, until a share of
/// [`candidates_to_score`] admissible hosts at the domain's host spread level
/// is found. The walk over domains stops once that many are found in all.
/// A domain walked to the end learns its host floor, or that it is full. When
/// every domain at the level turns out full, the domain floor rises and the
/// next level is tried; past the fullest domain, no host has room.
fn place_spread(cluster: &mut Cluster, service: u32, replica: u32) -> Option<u32> {
    let wanted = &mut cluster.services[service as usize];
    // Taken out while the walk reads the service, put back before returning.
    let mut spread = wanted.spread.take()?;
    let wanted = &cluster.services[service as usize];
    let placed = walk_domains(cluster, wanted, &mut spread, replica);
    cluster.services[service as usize].spread = Some(spread);
    placed
}

/// The walk of [`place_spread`], for `wanted`, whose spread state is `spread`.
fn walk_domains(
    cluster: &Cluster,
    wanted: &Service,
    spread: &mut Spread,
    replica: u32,
) -> Option<u32> {
    let group = &cluster.groups[wanted.group];
    let partition = &cluster.partitions[spread.partition];
    let domains = partition.domains();
    let cached_on = cluster.cached_on(wanted.component);
    let enough = candidates_to_score(group.hosts.len());
    let per_domain = enough.div_ceil(domains).max(2);
    let key = mix(wanted.hash ^ u64::from(replica));
    loop {
        let level = spread.domains.level(domains);
        if !spread.domains.reaches(level) {
            // Every domain holds fewer than `level` replicas, so every one is full.
            return None;
        }
        let mut best: Option<Score> = None;
        // Cached hosts go first as extra candidates, as in
        // `place_over_group`, but only where the replica may go: in a domain
        // at the level, on a host at its domain's host spread level.
        let cached = cached_hosts(cached_on, key, enough).filter(|&host| group.contains(host));
        let partition_index = spread.partition;
        let touch = |index: u32| cluster.hosts[index as usize].reserved_memory ^ u64::from(cluster.domain_of(partition_index, index));
        for (index, ()) in fetched_with(cached.map(|host| (host, ())), touch) {
            let domain = cluster.domain_of(spread.partition, index);
            let (count, full) = spread.peek(domain);
            let members = partition.hosts_of(domain).len();
            if full || count != level || wanted.on_host(index) > spread.host_level(domain, members) {
                continue;
            }
            let host = &cluster.hosts[index as usize];
            if admits(host, wanted).is_ok() {
                let candidate = score(index, host, wanted, cached_on, count);
                if best.is_none_or(|best| candidate < best) {
                    best = Some(candidate);
                }
            }
        }
        let mut found = 0;
        for domain in walk(domains, key).map(|domain| domain as u32) {
            let (count, full) = spread.peek(domain);
            // A domain holding fewer than `level` replicas is full: `level`
            // only rises past a count once every domain at it proved full.
            if full || count != level {
                continue;
            }
            let members = partition.hosts_of(domain);
            let host_level = spread.host_level(domain, members.len());
            let mut best_here: Option<Score> = None;
            let mut at_level = 0;
            let mut walked_all = true;
            let walked = walk(members.len(), mix(key ^ u64::from(domain))).map(|position| (members[position], ()));
            for (index, ()) in fetched(&cluster.hosts, walked) {
                let host = &cluster.hosts[index as usize];
                if admits(host, wanted).is_err() {
                    continue;
                }
                let candidate = score(index, host, wanted, cached_on, count);
                if best_here.is_none_or(|best| candidate < best) {
                    best_here = Some(candidate);
                }
                at_level += usize::from(candidate.host_spread <= host_level);
                if at_level >= per_domain {
                    walked_all = false;
                    break;
                }
            }
            // A whole domain walked teaches its host floor, or that it is
            // full; a floor no higher than the domain's level teaches nothing.
            match best_here {
                Some(best) if walked_all && best.host_spread > host_level => {
                    spread.domain(domain).hosts.floor = best.host_spread;
                }
                None if walked_all => spread.domain(domain).full = true,
                _ => {}
            }
            if let Some(candidate) = best_here
                && best.is_none_or(|best| candidate < best)
            {
                best = Some(candidate);
            }
            found += at_level;
            if found >= enough {
                break;
            }
        }
        match best {
            Some(best) => return Some(best.host),
            // Every domain at the level proved full.
            None => spread.domains.floor = level + 1,
        }
    }
}

/// Why no host of `service`'s group can take a replica, from a scan of the
/// group: every host fails a filter.
fn rejections_in_group(cluster: &Cluster, service: u32) -> String {
    let wanted = &cluster.services[service as usize];
    let group = &cluster.groups[wanted.group];
    let mut rejections = Rejections::default();
    for &index in &group.hosts {
        if let Err(rejection) = admits(&cluster.hosts[index as usize], wanted) {
            rejections.count(rejection);
        }
    }
    rejections.describe(wanted, group.hosts.len(), &group.labels)
}

/// Remembers that no host can take a replica of `service`, and why.
fn exhaust(service: &mut Service, reason: String) -> String {
    service.exhausted = Some(reason.clone());
    reason
}

fn no_host_reason(labels: &BTreeMap<String, String>, ready_hosts: usize) -> String {
    if ready_hosts == 0 || labels.is_empty() {
        "no ready host".to_string()
    } else {
        format!("no ready host has labels {}", describe_labels(labels))
    }
}

fn describe_labels(labels: &BTreeMap<String, String>) -> String {
    let pairs: Vec<String> = labels
        .iter()
        .map(|(key, value)| format!("{key}={value}"))
        .collect();
    pairs.join(",")
}

/// What the filters said about the hosts of a group, for the reason a
/// replica is unplaceable.
#[derive(Default)]
struct Rejections {
    memory: usize,
    most_free_memory: u64,
    instances: usize,
    most_free_instances: u64,
}

impl Rejections {
    fn count(&mut self, rejection: Rejection) {
        match rejection {
            Rejection::Memory { free } => {
                self.memory += 1;
                self.most_free_memory = self.most_free_memory.max(free);
            }
            Rejection::Instances { free } => {
                self.instances += 1;
                self.most_free_instances = self.most_free_instances.max(free);
            }
        }
    }

    /// E.g. `insufficient memory on 3 of 3 ready hosts (needs 1GiB, most free 512MiB)`.
    fn describe(
        &self,
        service: &Service,
        group_size: usize,
        labels: &BTreeMap<String, String>,
    ) -> String {
        let hosts = if labels.is_empty() {
            "ready hosts".to_string()
        } else {
            format!("ready hosts with labels {}", describe_labels(labels))
        };
        let mut reason = String::new();
        if self.memory > 0 {
            let (needs, most_free) = (ByteSize(service.memory).human(), ByteSize(self.most_free_memory).human());
            _ = write!(
                reason,
                "insufficient memory on {} of {group_size} {hosts} (needs {needs}, most free {most_free})",
                self.memory
            );
        }
        if self.instances > 0 {
            if !reason.is_empty() {
                reason.push_str("; ");
            }
            _ = write!(
                reason,
                "insufficient instance slots on {} of {group_size} {hosts} (needs {}, most free {})",
                self.instances, service.instances, self.most_free_instances
            );
        }
        reason
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_grow_with_log2_of_the_group_up_to_the_cap() {
        let counts: Vec<usize> = [0, 1, 3, 100, 1000, 1024, 1_000_000].into_iter().map(candidates_to_score).collect();
        assert_eq!(counts, [2, 2, 2, 7, 10, 10, 10]);
    }

    #[test]
    fn per_mille_is_exact_in_64_bits_and_past_them() {
        assert_eq!(per_mille(1, 3), 333);
        assert_eq!(per_mille(5, 0), 1000, "nothing offered is full");
        assert_eq!(per_mille(1 << 62, 1 << 63), 500, "a product past 64 bits");
        assert_eq!(per_mille(7, 2), 1000, "at most full");
    }
}
