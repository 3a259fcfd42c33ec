//! The state placement works on: hosts with what is reserved on them,
//! services with where their replicas are, the group of hosts each set of
//! placement labels admits, and each group's partition into the domains of a
//! spread label. It owns what it holds, so it can outlive a pass:
//! [`crate::reconcile()`] builds one from a snapshot and drops it, while
//! [`crate::PlacementIndex`] keeps one between passes and updates it from
//! changes (hosts joining, leaving or changing; replicas committed or
//! released), so that no pass rebuilds the view of the whole cluster.

use crate::hash::{FixedMap, IntMap, hash_display};
use crate::placement::in_flight_load;
use crate::snapshot::{HostInfo, Snapshot, Workload, WorkloadId};
use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::sync::Arc;
use wharf_proto::{Capacity, Digest, HostId, ServiceSpec};

/// The label whose values are zones. A service without `placement.spread`
/// prefers, among hosts holding equally few of its replicas, the zone with
/// the fewest; a service with `spread: zone` is spread over zones exactly.
pub const ZONE_LABEL: &str = "zone";

/// The zone of hosts without a [`ZONE_LABEL`]: they count as one zone together.
const NO_ZONE: u32 = 0;

/// In [`Service::host_of`], a replica without a host.
pub(crate) const NO_HOST: u32 = u32::MAX;

/// A host and what is reserved on it.
///
/// The fields placement reads for every candidate come first and are
/// copied out of `info`, so scoring a host touches one cache line: with a
/// million hosts, each pointer followed is a likely cache miss. `repr(C)`
/// keeps them first (Rust would reorder them), and the alignment starts
/// every host on a line of its own, so they never straddle two.
#[repr(C, align(64))]
pub(crate) struct Host {
    /// `info.capacity`.
    pub(crate) capacity: Capacity,
    /// The memory replicas may reserve here: `capacity.memory` times
    /// `info.memory_overcommit`.
    pub(crate) memory: u64,
    /// What `info.in_flight` adds to the host's load score, computed when
    /// it changes (see [`crate::placement::in_flight_load`]).
    pub(crate) in_flight_load: i64,
    /// Sum of the memory the replicas assigned here are placed by: each
    /// the larger of its request and its service's learned peak
    /// ([`Service::memory`]). New replicas must fit in what this leaves.
    pub(crate) reserved_memory: u64,
    /// Sum of the memory requests of the replicas assigned here
    /// ([`Service::request`]); a replica kept where it runs must fit in
    /// what this leaves, so learning a peak never moves what runs.
    pub(crate) reserved_requests: u64,
    /// Sum of the instance requests of the replicas assigned here.
    pub(crate) reserved_instances: u64,
    /// The index of the host's zone.
    pub(crate) zone: u32,
    /// The host is known (not removed) and its `info.ready` holds: only
    /// such hosts are in groups, and replicas are placed and kept only on them.
    pub(crate) ready: bool,
    /// The replicas assigned here, as (service index, replica index).
    pub(crate) replicas: Vec<(u32, u32)>,
    pub(crate) info: Box<HostInfo>,
}

impl Host {
    pub(crate) fn free_memory(&self) -> u64 {
        self.memory.saturating_sub(self.reserved_memory)
    }

    /// Memory left after the replicas' requests only (see `reserved_requests`).
    pub(crate) fn free_for_requests(&self) -> u64 {
        self.memory.saturating_sub(self.reserved_requests)
    }

    pub(crate) fn free_instances(&self) -> u64 {
        u64::from(self.capacity.instances).saturating_sub(self.reserved_instances)
    }
}

/// A desired service and where its replicas are.
pub(crate) struct Service {
    pub(crate) spec: Arc<ServiceSpec>,
    pub(crate) id: WorkloadId,
    /// Hosts each replica should avoid (see [`Workload::avoid`]).
    pub(crate) avoid: BTreeMap<u32, BTreeSet<HostId>>,
    /// The learned peak the workload was given, to tell a change.
    pub(crate) memory_peak: Option<wharf_proto::ByteSize>,
    /// A fixed hash of the id, from which each replica's candidate order is drawn.
    pub(crate) hash: u64,
    /// The memory each replica is placed by, in bytes: the larger of the
    /// spec's memory request and the peak learned (see
    /// [`Workload::memory_peak`]).
    pub(crate) memory: u64,
    /// The spec's memory request: what a replica kept where it runs must fit by.
    pub(crate) request: u64,
    /// The instance slots one replica reserves.
    pub(crate) instances: u64,
    /// The index of the group of hosts this service may run on.
    pub(crate) group: usize,
    /// The index of the spec's component (see [`Cluster::cached_on`]).
    pub(crate) component: u32,
    /// Per replica index (below the workload's `replicas`), the index of
    /// its host, or [`NO_HOST`].
    pub(crate) host_of: Vec<u32>,
    /// Replicas of this service per host index; absent means none.
    per_host: IntMap<u32, u32>,
    /// Replicas of this service per zone index; absent means none.
    per_zone: IntMap<u32, u32>,
    /// How many hosts of the group hold how many replicas of this service.
    pub(crate) hosts: Levels,
    /// Where the replicas are over the domains of `placement.spread`, for a
    /// service that has one.
    pub(crate) spread: Option<Spread>,
    /// Why no host of the group can take a replica, once a full scan has
    /// found none in this pass; every later replica gets the same answer
    /// without a scan.
    pub(crate) exhausted: Option<String>,
}

/// How many members (hosts or domains) hold how many replicas of a service,
/// so that the emptiest is known without a scan. The members holding none
/// are not counted but derived from the number of members, which the
/// caller passes: a group or partition that gains a host changes no
/// service's levels.
#[derive(Default)]
pub(crate) struct Levels {
    /// `counts[k]`, for `k >= 1`, is how many members hold exactly `k`
    /// replicas; `counts[0]` is unused.
    counts: Vec<u32>,
    /// How many members hold at least one replica.
    held: u32,
    /// The lowest `k >= 1` with `counts[k] > 0` (meaningless while `held` is 0).
    min_held: u32,
    /// No member holding fewer than `floor` replicas can take another: a
    /// full scan found them all too full in this pass, and capacity only
    /// shrinks during a pass.
    pub(crate) floor: u32,
}

impl Levels {
    /// The fewest replicas on any of `members` members that could still
    /// take one: a member holding that many is as spread as it gets.
    pub(crate) fn level(&self, members: usize) -> u32 {
        let min = if members > self.held as usize { 0 } else { self.min_held };
        min.max(self.floor)
    }

    /// Whether some member holds `level` replicas or more.
    pub(crate) fn reaches(&self, level: u32) -> bool {
        level == 0 || (level as usize) < self.counts.len()
    }

    /// One member went from `before` replicas to `before + 1`.
    fn raise(&mut self, before: u32) {
        let (before, after) = (before as usize, before as usize + 1);
        if self.counts.len() <= after {
            self.counts.resize(after + 1, 0);
        }
        self.counts[after] += 1;
        if before == 0 {
            self.held += 1;
            self.min_held = 1;
        } else {
            self.counts[before] = self.counts[before].saturating_sub(1);
            self.advance();
        }
    }

    /// One member went from `before` replicas (at least one) to `before - 1`.
    fn lower(&mut self, before: u32) {
        let before = before as usize;
        if before == 0 || before >= self.counts.len() {
            return;
        }
        self.counts[before] = self.counts[before].saturating_sub(1);
        if before == 1 {
            self.held = self.held.saturating_sub(1);
        } else {
            self.counts[before - 1] += 1;
            self.min_held = self.min_held.min(before as u32 - 1);
        }
        while self.counts.len() > 1 && self.counts.last() == Some(&0) {
            self.counts.pop();
        }
        self.advance();
    }

    /// Moves `min_held` up past levels nobody holds.
    fn advance(&mut self) {
        while (self.min_held as usize) < self.counts.len()
            && self.counts[self.min_held as usize] == 0
        {
            self.min_held += 1;
        }
    }
}

/// Where a service with `placement.spread` has its replicas, over the
/// domains of its [`Partition`].
pub(crate) struct Spread {
    /// The index of the partition of the service's group by its spread label.
    pub(crate) partition: usize,
    /// How many domains hold how many replicas of the service.
    pub(crate) domains: Levels,
    /// Each domain the service has a replica in, or that was found full;
    /// absent means no replica, not known to be full.
    states: IntMap<u32, Domain>,
}

/// One domain as one service sees it.
#[derive(Default)]
pub(crate) struct Domain {
    /// Replicas of the service in the domain.
    pub(crate) count: u32,
    /// How many hosts of the domain hold how many replicas of the service.
    pub(crate) hosts: Levels,
    /// No host of the domain can take a replica of the service: a full scan
    /// found none in this pass, and capacity only shrinks during a pass.
    pub(crate) full: bool,
}

impl Spread {
    /// The service's state in domain `domain`.
    pub(crate) fn domain(&mut self, domain: u32) -> &mut Domain {
        self.states.entry(domain).or_default()
    }

    /// Replicas of the service in domain `domain`, and whether it is known full.
    pub(crate) fn peek(&self, domain: u32) -> (u32, bool) {
        self.states
            .get(&domain)
            .map_or((0, false), |state| (state.count, state.full))
    }

    /// The spread level of the `members` hosts of domain `domain`.
    pub(crate) fn host_level(&self, domain: u32, members: usize) -> u32 {
        self.states
            .get(&domain)
            .map_or(0, |state| state.hosts.level(members))
    }
}

impl Service {
    /// Replicas of this service on host `host`.
    pub(crate) fn on_host(&self, host: u32) -> u32 {
        self.per_host.get(&host).copied().unwrap_or(0)
    }

    /// Replicas of this service in zone `zone`.
    pub(crate) fn in_zone(&self, zone: u32) -> u32 {
        self.per_zone.get(&zone).copied().unwrap_or(0)
    }

    /// Forgets what placement learnt in an earlier pass (floors, full
    /// domains, exhaustion): capacity may have grown since.
    pub(crate) fn forget_pass(&mut self) {
        self.exhausted = None;
        self.hosts.floor = 0;
        if let Some(spread) = &mut self.spread {
            spread.domains.floor = 0;
            for state in spread.states.values_mut() {
                state.hosts.floor = 0;
                state.full = false;
            }
        }
    }
}

/// Whether `host` has `digest` cached, from the sorted list of the hosts that have.
pub(crate) fn is_cached_on(cached_on: &[u32], host: u32) -> bool {
    cached_on.binary_search(&host).is_ok()
}

/// Up to `limit` of `cached_on`, starting from one chosen by `key`, so
/// that different replicas try different ones.
pub(crate) fn cached_hosts(cached_on: &[u32], key: u64, limit: usize) -> impl Iterator<Item = u32> + '_ {
    let count = cached_on.len();
    let start = key as usize % count.max(1);
    (0..count.min(limit)).map(move |i| {
        // Both are below `count`: a subtraction, not a division, wraps it.
        let at = start + i;
        cached_on[if at >= count { at - count } else { at }]
    })
}

/// The ready hosts that carry every label a placement asks for, by host index.
pub(crate) struct Group {
    pub(crate) labels: BTreeMap<String, String>,
    /// In index order.
    pub(crate) hosts: Vec<u32>,
    /// One bit per host index: whether it is in `hosts` (a test that costs
    /// no search, for the cached hosts placement tries first).
    member: Vec<u64>,
    /// The partitions of this group (indices into [`Cluster::partitions`]).
    partitions: Vec<usize>,
}

impl Group {
    pub(crate) fn contains(&self, host: u32) -> bool {
        self.member
            .get(host as usize / 64)
            .is_some_and(|word| word & (1 << (host % 64)) != 0)
    }

    fn set_member(&mut self, host: u32, member: bool) {
        let word = host as usize / 64;
        if self.member.len() <= word {
            self.member.resize(word + 1, 0);
        }
        if member {
            self.member[word] |= 1 << (host % 64);
        } else {
            self.member[word] &= !(1 << (host % 64));
        }
    }
}

/// A label used for spreading, and each host's value of it.
struct SpreadLabel {
    name: String,
    /// Per host index, the index of the host's value; [`NO_VALUE`] for a
    /// host without the label (or with an empty value).
    value_of: Vec<u32>,
    /// Value indices by value, from 1.
    values: FixedMap<String, u32>,
}

impl SpreadLabel {
    fn value_index(&mut self, labels: &BTreeMap<String, String>) -> u32 {
        match labels.get(&self.name) {
            Some(value) if !value.is_empty() => {
                let next = self.values.len() as u32 + 1;
                *self.values.entry(value.clone()).or_insert(next)
            }
            _ => NO_VALUE,
        }
    }
}

/// The value index of hosts without the spread label: they share one domain.
const NO_VALUE: u32 = 0;

/// A group's hosts split into domains by their value of a spread label.
pub(crate) struct Partition {
    /// The index of the spread label.
    label: usize,
    /// The group's hosts, domain by domain, each domain's in index order.
    pub(crate) hosts: Vec<u32>,
    /// Domain `d` holds `hosts[starts[d]..starts[d + 1]]`.
    starts: Vec<u32>,
    /// Per value index, the domain of hosts with that value; `u32::MAX` for
    /// values no host of the group had when the partition was built or since.
    domain_of_value: Vec<u32>,
}

impl Partition {
    /// How many domains the group has: distinct values among its hosts
    /// (a domain whose hosts all left stays, empty, and is walked as full).
    pub(crate) fn domains(&self) -> usize {
        self.starts.len() - 1
    }

    /// The hosts of domain `domain`.
    pub(crate) fn hosts_of(&self, domain: u32) -> &[u32] {
        let domain = domain as usize;
        &self.hosts[self.starts[domain] as usize..self.starts[domain + 1] as usize]
    }

    /// Adds `host`, whose value index is `value`, to its domain (a new
    /// domain, last, for a value new to the group).
    fn insert(&mut self, host: u32, value: u32) {
        let value = value as usize;
        if self.domain_of_value.len() <= value {
            self.domain_of_value.resize(value + 1, u32::MAX);
        }
        if self.domain_of_value[value] == u32::MAX {
            self.domain_of_value[value] = self.domains() as u32;
            self.starts.push(self.hosts.len() as u32);
        }
        let domain = self.domain_of_value[value] as usize;
        let (start, end) = (self.starts[domain] as usize, self.starts[domain + 1] as usize);
        let at = start + self.hosts[start..end].partition_point(|&h| h < host);
        self.hosts.insert(at, host);
        for start in &mut self.starts[domain + 1..] {
            *start += 1;
        }
    }

    /// Removes `host`, whose value index is `value`, from its domain.
    fn remove(&mut self, host: u32, value: u32) {
        let Some(&domain) = self.domain_of_value.get(value as usize) else {
            return;
        };
        if domain == u32::MAX {
            return;
        }
        let domain = domain as usize;
        let (start, end) = (self.starts[domain] as usize, self.starts[domain + 1] as usize);
        if let Ok(at) = self.hosts[start..end].binary_search(&host) {
            self.hosts.remove(start + at);
            for start in &mut self.starts[domain + 1..] {
                *start -= 1;
            }
        }
    }
}

fn insert_sorted(list: &mut Vec<u32>, item: u32) {
    if let Err(at) = list.binary_search(&item) {
        list.insert(at, item);
    }
}

fn remove_sorted(list: &mut Vec<u32>, item: u32) {
    if let Ok(at) = list.binary_search(&item) {
        list.remove(at);
    }
}

/// Hosts, services and groups, indexed densely. Built from a snapshot,
/// hosts and services are in id order, so an index comparison is an id
/// comparison; added later, they take the next index (a host that leaves
/// keeps its index for when it comes back; a removed service's index is
/// reused).
#[derive(Default)]
pub(crate) struct Cluster {
    pub(crate) hosts: Vec<Host>,
    pub(crate) services: Vec<Service>,
    pub(crate) groups: Vec<Group>,
    /// The partitions the services with a spread label use.
    pub(crate) partitions: Vec<Partition>,
    spread_labels: Vec<SpreadLabel>,
    /// The ready hosts, in index order.
    ready: Vec<u32>,
    /// The ready hosts carrying each label, in index order: where a new
    /// group's members are found.
    by_label: FixedMap<(String, String), Vec<u32>>,
    by_labels: FixedMap<BTreeMap<String, String>, usize>,
    spread_label_index: FixedMap<String, usize>,
    zones: FixedMap<String, u32>,
    /// Per component (by its index in `components`), the hosts that have
    /// it cached, in index order.
    pub(crate) cached: Vec<Vec<u32>>,
    /// Every component a host cached or a service ran, numbered as first
    /// seen, so that a replica finds its component's cached hosts by index
    /// ([`Service::component`]), not by hashing a digest. Kept while the
    /// cluster lives: one entry per component version seen.
    components: FixedMap<Digest, u32>,
    /// Replica sizes, as (group, memory, instances), that no host of the
    /// group could take in this pass, with the reason. Capacity only
    /// shrinks during a pass, so a later service of the same size in the
    /// same group is refused without a walk; its reason describes the group
    /// as it was when the first was refused.
    pub(crate) no_room: IntMap<(usize, u64, u64), String>,
    host_index: FixedMap<HostId, u32>,
    service_index: FixedMap<WorkloadId, u32>,
    /// Indices of removed services, for reuse.
    free_services: Vec<u32>,
}

impl Cluster {
    /// The cluster of `snapshot` with nothing assigned yet.
    pub(crate) fn new(snapshot: &Snapshot) -> Self {
        let mut infos: Vec<&HostInfo> = snapshot.hosts.iter().collect();
        // A stable sort keeps the first of equal ids first, and dedup keeps it.
        infos.sort_by(|a, b| a.id.cmp(&b.id));
        infos.dedup_by(|later, first| later.id == first.id);
        let mut cluster = Cluster::default();
        for info in infos {
            cluster.add_host(info.clone());
        }
        let mut workloads: Vec<&Workload> = snapshot.services.iter().collect();
        workloads.sort_by(|a, b| a.id.cmp(&b.id));
        workloads.dedup_by(|later, first| later.id == first.id);
        for workload in workloads {
            cluster.add_service(workload.clone());
        }
        cluster
    }

    /// How many hosts are ready, for telling "no ready host" from "none with these labels".
    pub(crate) fn ready_hosts(&self) -> usize {
        self.ready.len()
    }

    /// The index of the host with id `id` (one that left included).
    pub(crate) fn host(&self, id: &HostId) -> Option<u32> {
        self.host_index.get(id).copied()
    }

    /// The index of the service with id `id`.
    pub(crate) fn service(&self, id: &WorkloadId) -> Option<u32> {
        self.service_index.get(id).copied()
    }

    /// The hosts that have `digest` cached, in index order.
    pub(crate) fn cached_on(&self, component: u32) -> &[u32] {
        &self.cached[component as usize]
    }

    /// The index of component `digest`, numbered now if new.
    fn component(&mut self, digest: &Digest) -> u32 {
        if let Some(&index) = self.components.get(digest) {
            return index;
        }
        let index = self.cached.len() as u32;
        self.cached.push(Vec::new());
        self.components.insert(digest.clone(), index);
        index
    }

    /// Records that host `index` has every component of `digests` cached.
    fn add_cached(&mut self, index: u32, digests: &BTreeSet<Digest>) {
        for digest in digests {
            let component = self.component(digest);
            insert_sorted(&mut self.cached[component as usize], index);
        }
    }

    /// The domain of host `host` in partition `partition`; the host must be
    /// in the partition's group.
    pub(crate) fn domain_of(&self, partition: usize, host: u32) -> u32 {
        domain_of(&self.partitions, &self.spread_labels, partition, host)
    }

    /// Adds a host not known yet, at the next index.
    pub(crate) fn add_host(&mut self, info: HostInfo) -> u32 {
        let index = self.hosts.len() as u32;
        self.host_index.insert(info.id.clone(), index);
        self.add_cached(index, &info.cached);
        for label in &mut self.spread_labels {
            let value = label.value_index(&info.labels);
            label.value_of.push(value);
        }
        let zone = self.zone_of(&info);
        let ready = info.ready;
        self.hosts.push(Host {
            capacity: info.capacity,
            memory: info.capacity.memory.scaled(info.memory_overcommit).bytes(),
            in_flight_load: in_flight_load(info.in_flight, info.capacity.instances),
            reserved_memory: 0,
            reserved_requests: 0,
            reserved_instances: 0,
            zone,
            ready: false,
            replicas: Vec::new(),
            info: Box::new(info),
        });
        if ready {
            self.enter(index);
        }
        index
    }

    /// Gives host `index`, which holds no replica, what `info` says (it may
    /// have left: it comes back).
    pub(crate) fn update_host(&mut self, index: u32, info: HostInfo) {
        if self.hosts[index as usize].ready {
            self.leave(index);
        }
        self.forget_cached(index);
        self.add_cached(index, &info.cached);
        for label in &mut self.spread_labels {
            let value = label.value_index(&info.labels);
            label.value_of[index as usize] = value;
        }
        let zone = self.zone_of(&info);
        let ready = info.ready;
        let host = &mut self.hosts[index as usize];
        host.capacity = info.capacity;
        host.memory = info.capacity.memory.scaled(info.memory_overcommit).bytes();
        host.in_flight_load = in_flight_load(info.in_flight, info.capacity.instances);
        host.zone = zone;
        *host.info = info;
        if ready {
            self.enter(index);
        }
    }

    /// Updates what placement only scores by (requests in flight,
    /// components cached) of host `index`, from `info`, which differs from
    /// what the host had in nothing else.
    pub(crate) fn refresh_host(&mut self, index: u32, info: HostInfo) {
        if info.cached != self.hosts[index as usize].info.cached {
            self.forget_cached(index);
            self.add_cached(index, &info.cached);
        }
        let host = &mut self.hosts[index as usize];
        host.in_flight_load = in_flight_load(info.in_flight, info.capacity.instances);
        *host.info = info;
    }

    /// Takes host `index`, which holds no replica, out of every group: it
    /// left. Its index stays, for when it comes back.
    pub(crate) fn remove_host(&mut self, index: u32) {
        if self.hosts[index as usize].ready {
            self.leave(index);
        }
        self.forget_cached(index);
    }

    fn forget_cached(&mut self, index: u32) {
        let Cluster { hosts, cached, components, .. } = self;
        for digest in &hosts[index as usize].info.cached {
            if let Some(&component) = components.get(digest) {
                remove_sorted(&mut cached[component as usize], index);
            }
        }
    }

    fn zone_of(&mut self, info: &HostInfo) -> u32 {
        info.labels.get(ZONE_LABEL).map_or(NO_ZONE, |zone| {
            let next = self.zones.len() as u32 + 1;
            *self.zones.entry(zone.clone()).or_insert(next)
        })
    }

    /// Host `index` becomes ready: it joins the indexes of ready hosts and
    /// every group (and its partitions) whose labels it carries.
    fn enter(&mut self, index: u32) {
        let Cluster { hosts, groups, partitions, spread_labels, ready, by_label, .. } = self;
        let host = &mut hosts[index as usize];
        host.ready = true;
        insert_sorted(ready, index);
        for (key, value) in &host.info.labels {
            insert_sorted(by_label.entry((key.clone(), value.clone())).or_default(), index);
        }
        for group in groups.iter_mut() {
            if !carries(&host.info.labels, &group.labels) {
                continue;
            }
            insert_sorted(&mut group.hosts, index);
            group.set_member(index, true);
            for &partition in &group.partitions {
                let partition = &mut partitions[partition];
                let value = spread_labels[partition.label].value_of[index as usize];
                partition.insert(index, value);
            }
        }
    }

    /// Host `index` is no longer ready: it leaves every index [`Cluster::enter`] put it in.
    fn leave(&mut self, index: u32) {
        let Cluster { hosts, groups, partitions, spread_labels, ready, by_label, .. } = self;
        let host = &mut hosts[index as usize];
        host.ready = false;
        remove_sorted(ready, index);
        for (key, value) in &host.info.labels {
            if let Some(list) = by_label.get_mut(&(key.clone(), value.clone())) {
                remove_sorted(list, index);
            }
        }
        for group in groups.iter_mut() {
            if !group.contains(index) {
                continue;
            }
            remove_sorted(&mut group.hosts, index);
            group.set_member(index, false);
            for &partition in &group.partitions {
                let partition = &mut partitions[partition];
                let value = spread_labels[partition.label].value_of[index as usize];
                partition.remove(index, value);
            }
        }
    }

    /// Adds a service not known yet, with no replica assigned, and returns its index.
    pub(crate) fn add_service(&mut self, workload: Workload) -> u32 {
        let spec = workload.spec.clone();
        let request = spec.memory_request().bytes();
        let group = self.group_of(&spec.placement.labels);
        let spread = spec.placement.spread.as_deref().map(|label| Spread {
            partition: self.partition_of(group, label),
            domains: Levels::default(),
            states: IntMap::default(),
        });
        let service = Service {
            // The service, not the revision: every revision of a service
            // walks the hosts in the same order.
            hash: hash_display(&workload.id.service),
            memory: workload.memory_peak.map_or(0, |peak| peak.bytes()).max(request),
            request,
            instances: u64::from(spec.instances_request()),
            group,
            component: self.component(&spec.component),
            host_of: vec![NO_HOST; workload.replicas as usize],
            per_host: IntMap::default(),
            per_zone: IntMap::default(),
            hosts: Levels::default(),
            spread,
            exhausted: None,
            id: workload.id,
            spec,
            avoid: workload.avoid,
            memory_peak: workload.memory_peak,
        };
        let index = match self.free_services.pop() {
            Some(index) => {
                self.services[index as usize] = service;
                index
            }
            None => {
                self.services.push(service);
                self.services.len() as u32 - 1
            }
        };
        self.service_index.insert(self.services[index as usize].id.clone(), index);
        index
    }

    /// Forgets service `index`, which holds no replica; its index may be reused.
    pub(crate) fn remove_service(&mut self, index: u32) {
        let service = &mut self.services[index as usize];
        self.service_index.remove(&service.id);
        service.host_of.clear();
        self.free_services.push(index);
    }

    /// Whether `index` is a known service's index (not a removed one's).
    pub(crate) fn is_service(&self, index: u32) -> bool {
        self.services
            .get(index as usize)
            .is_some_and(|service| self.service_index.get(&service.id) == Some(&index))
    }

    /// The index of the group of hosts carrying every one of `labels`, built
    /// on first use: the hosts carrying its rarest label, narrowed to those
    /// carrying all, by merging the lists of the ready hosts carrying each
    /// (all in index order: no host's labels are read).
    fn group_of(&mut self, labels: &BTreeMap<String, String>) -> usize {
        if let Some(&group) = self.by_labels.get(labels) {
            return group;
        }
        let mut lists: Vec<&[u32]> = labels
            .iter()
            .map(|(key, value)| {
                self.by_label
                    .get(&(key.clone(), value.clone()))
                    .map_or(&[][..], Vec::as_slice)
            })
            .collect();
        lists.sort_by_key(|hosts| hosts.len());
        let members: Vec<u32> = match lists.split_first_mut() {
            None => self.ready.clone(),
            Some((rarest, others)) => rarest
                .iter()
                .copied()
                .filter(|&host| {
                    others.iter_mut().all(|list| {
                        // Each list is in index order: skip past the hosts
                        // below this one, a few by steps, the rest by search.
                        let mut below = 0;
                        while below < 8 && list.get(below).is_some_and(|&other| other < host) {
                            below += 1;
                        }
                        if below == 8 {
                            below += list[below..].partition_point(|&other| other < host);
                        }
                        *list = &list[below..];
                        list.first() == Some(&host)
                    })
                })
                .collect(),
        };
        let mut group = Group {
            labels: labels.clone(),
            hosts: Vec::new(),
            member: Vec::new(),
            partitions: Vec::new(),
        };
        for &host in &members {
            group.set_member(host, true);
        }
        group.hosts = members;
        self.groups.push(group);
        self.by_labels.insert(labels.clone(), self.groups.len() - 1);
        self.groups.len() - 1
    }

    /// The index of the partition of group `group` by the values of label
    /// `label`, built on first use. Domains are numbered in the order their
    /// first host (by index) appears in the group.
    fn partition_of(&mut self, group: usize, label: &str) -> usize {
        // A group has a partition per spread label its services use: a few.
        let built = self.groups[group]
            .partitions
            .iter()
            .find(|&&partition| self.spread_labels[self.partitions[partition].label].name == label);
        if let Some(&partition) = built {
            return partition;
        }
        let label_index = match self.spread_label_index.get(label) {
            Some(&index) => index,
            None => {
                let mut spread_label = SpreadLabel {
                    name: label.to_string(),
                    value_of: vec![NO_VALUE; self.hosts.len()],
                    values: FixedMap::default(),
                };
                // The ready hosts' values come from the lists of ready hosts
                // by label, without reading each host's labels; values are
                // numbered by their first ready host (numbers only name
                // values: domains are numbered by their first host in the group).
                let mut lists: Vec<(&String, &Vec<u32>)> = self
                    .by_label
                    .iter()
                    .filter(|((key, value), hosts)| key == label && !value.is_empty() && !hosts.is_empty())
                    .map(|((_, value), hosts)| (value, hosts))
                    .collect();
                lists.sort_by_key(|(_, hosts)| hosts[0]);
                for (value, hosts) in lists {
                    let index = spread_label.values.len() as u32 + 1;
                    spread_label.values.insert(value.clone(), index);
                    for &host in hosts {
                        spread_label.value_of[host as usize] = index;
                    }
                }
                for (index, host) in self.hosts.iter().enumerate() {
                    if !host.ready {
                        spread_label.value_of[index] = spread_label.value_index(&host.info.labels);
                    }
                }
                self.spread_labels.push(spread_label);
                self.spread_label_index
                    .insert(label.to_string(), self.spread_labels.len() - 1);
                self.spread_labels.len() - 1
            }
        };
        let spread_label = &self.spread_labels[label_index];
        let members = &self.groups[group].hosts;
        let mut domain_of_value = vec![u32::MAX; spread_label.values.len() + 1];
        let mut sizes: Vec<u32> = Vec::new();
        for &host in members {
            let value = spread_label.value_of[host as usize] as usize;
            if domain_of_value[value] == u32::MAX {
                domain_of_value[value] = sizes.len() as u32;
                sizes.push(0);
            }
            sizes[domain_of_value[value] as usize] += 1;
        }
        let mut starts = Vec::with_capacity(sizes.len() + 1);
        starts.push(0);
        for size in &sizes {
            starts.push(starts.last().copied().unwrap_or(0) + size);
        }
        // Counting sort: members are in index order, and stay so per domain.
        let mut next: Vec<u32> = starts[..sizes.len()].to_vec();
        let mut sorted = vec![0; members.len()];
        for &host in members {
            let value = spread_label.value_of[host as usize] as usize;
            let slot = &mut next[domain_of_value[value] as usize];
            sorted[*slot as usize] = host;
            *slot += 1;
        }
        self.partitions.push(Partition {
            label: label_index,
            hosts: sorted,
            starts,
            domain_of_value,
        });
        let partition = self.partitions.len() - 1;
        self.groups[group].partitions.push(partition);
        partition
    }

    /// Assigns replica `replica` of service `service` to host `host`, which
    /// must be in the service's group, and reserves its share of the host.
    pub(crate) fn commit(&mut self, host: u32, service: u32, replica: u32) {
        let to = &mut self.hosts[host as usize];
        let of = &mut self.services[service as usize];
        to.reserved_memory += of.memory;
        to.reserved_requests += of.request;
        to.reserved_instances += of.instances;
        to.replicas.push((service, replica));
        of.host_of[replica as usize] = host;
        *of.per_zone.entry(to.zone).or_insert(0) += 1;
        let on_host = of.per_host.entry(host).or_insert(0);
        let before = *on_host;
        *on_host += 1;
        of.hosts.raise(before);
        if let Some(spread) = &mut of.spread {
            let domain = domain_of(&self.partitions, &self.spread_labels, spread.partition, host);
            let state = spread.domain(domain);
            let in_domain = state.count;
            state.count += 1;
            state.hosts.raise(before);
            spread.domains.raise(in_domain);
        }
    }

    /// Undoes [`Cluster::commit`]: replica `replica` of service `service`
    /// no longer runs on host `host`, which must still be in the groups and
    /// domains it was in when the replica was committed.
    pub(crate) fn release(&mut self, host: u32, service: u32, replica: u32) {
        let from = &mut self.hosts[host as usize];
        let of = &mut self.services[service as usize];
        from.reserved_memory = from.reserved_memory.saturating_sub(of.memory);
        from.reserved_requests = from.reserved_requests.saturating_sub(of.request);
        from.reserved_instances = from.reserved_instances.saturating_sub(of.instances);
        if let Some(at) = from.replicas.iter().position(|&r| r == (service, replica)) {
            from.replicas.swap_remove(at);
        }
        if let Some(slot) = of.host_of.get_mut(replica as usize) {
            *slot = NO_HOST;
        }
        if let Some(in_zone) = of.per_zone.get_mut(&from.zone) {
            *in_zone -= 1;
            if *in_zone == 0 {
                of.per_zone.remove(&from.zone);
            }
        }
        let Some(on_host) = of.per_host.get_mut(&host) else {
            return;
        };
        let before = *on_host;
        *on_host -= 1;
        if *on_host == 0 {
            of.per_host.remove(&host);
        }
        of.hosts.lower(before);
        if let Some(spread) = &mut of.spread {
            let domain = domain_of(&self.partitions, &self.spread_labels, spread.partition, host);
            let state = spread.domain(domain);
            let in_domain = state.count;
            state.count = state.count.saturating_sub(1);
            state.hosts.lower(before);
            spread.domains.lower(in_domain);
        }
    }
}

/// Whether `host` carries every one of `wanted`.
fn carries(host: &BTreeMap<String, String>, wanted: &BTreeMap<String, String>) -> bool {
    wanted.iter().all(|(key, value)| host.get(key) == Some(value))
}

/// The domain of host `host` in partition `partition` (see [`Cluster::domain_of`]).
fn domain_of(partitions: &[Partition], labels: &[SpreadLabel], partition: usize, host: u32) -> u32 {
    let partition = &partitions[partition];
    let value = labels[partition.label].value_of[host as usize];
    partition.domain_of_value[value as usize]
}
