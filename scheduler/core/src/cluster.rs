//! The working state of one reconcile: hosts with what is reserved on them,
//! services with where their replicas are, the group of hosts each set of
//! placement labels admits, and each group's partition into the domains of a
//! spread label. Built from a snapshot; changed only by [`Cluster::commit`].

use crate::hash::{FixedMap, hash_text};
use crate::snapshot::{HostInfo, Snapshot};
use std::collections::BTreeMap;
use std::rc::Rc;
use crate::snapshot::{Workload, WorkloadId};
use std::collections::BTreeSet;
use wharf_proto::{Capacity, Digest, HostId, ServiceSpec};

/// The label whose values are zones. A service without `placement.spread`
/// prefers, among hosts holding equally few of its replicas, the zone with
/// the fewest; a service with `spread: zone` is spread over zones exactly.
pub const ZONE_LABEL: &str = "zone";

/// The zone of hosts without a [`ZONE_LABEL`]: they count as one zone together.
const NO_ZONE: u32 = 0;

/// A host and what this reconcile has reserved on it so far.
///
/// The fields placement reads for every candidate are copied out of `info`,
/// so scoring a host touches this struct only: with thousands of hosts,
/// each pointer followed is a likely cache miss.
pub(crate) struct Host<'a> {
    pub(crate) info: &'a HostInfo,
    /// `info.capacity`.
    pub(crate) capacity: Capacity,
    /// The memory replicas may reserve here: `capacity.memory` times
    /// `info.memory_overcommit`.
    pub(crate) memory: u64,
    /// `info.in_flight`.
    pub(crate) in_flight: u64,
    /// The index of the host's zone.
    pub(crate) zone: u32,
    /// Sum of the memory the replicas assigned here are placed by: each
    /// the larger of its request and its service's learned peak
    /// ([`Service::memory`]). New replicas must fit in what this leaves.
    pub(crate) reserved_memory: u64,
    /// Sum of the memory requests of the replicas assigned here
    /// ([`Service::request`]); a replica kept where it runs must fit in
    /// what this leaves, so learning a peak never moves what runs.
    pub(crate) reserved_requests: u64,
    /// Sum of the concurrency of the replicas assigned here.
    pub(crate) reserved_instances: u64,
    /// The replicas assigned here, as (service index, replica index).
    pub(crate) replicas: Vec<(u32, u32)>,
}

impl Host<'_> {
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

/// A desired service and where its replicas are so far.
pub(crate) struct Service<'a> {
    pub(crate) spec: &'a ServiceSpec,
    pub(crate) id: WorkloadId,
    /// Hosts each replica should avoid (see [`Workload::avoid`]).
    pub(crate) avoid: &'a BTreeMap<u32, BTreeSet<HostId>>,
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
    /// The hosts that have the component cached, by index, in order; shared
    /// by the services that run the same component.
    cached_on: Rc<[u32]>,
    /// Which replica indices (below the workload's `replicas`) have a host.
    pub(crate) assigned: Vec<bool>,
    /// Replicas of this service per host index; absent means none.
    per_host: FixedMap<u32, u32>,
    /// Replicas of this service per zone index; absent means none.
    per_zone: FixedMap<u32, u32>,
    /// How many hosts of the group hold how many replicas of this service.
    pub(crate) hosts: Levels,
    /// Where the replicas are over the domains of `placement.spread`, for a
    /// service that has one.
    pub(crate) spread: Option<Spread>,
    /// Why no host of the group can take a replica, once a full scan has
    /// found none; every later replica gets the same answer without a scan.
    pub(crate) exhausted: Option<String>,
}

/// How many members (hosts or domains) hold how many replicas of a service,
/// so that the emptiest is known without a scan.
pub(crate) struct Levels {
    /// `counts[k]` is how many members hold exactly `k` replicas.
    counts: Vec<u32>,
    /// The lowest `k` with `counts[k] > 0`.
    min: u32,
    /// No member holding fewer than `floor` replicas can take another: a
    /// full scan found them all too full, and capacity only shrinks during a
    /// reconcile.
    pub(crate) floor: u32,
}

impl Levels {
    /// `members` members, none holding a replica.
    fn new(members: usize) -> Self {
        Levels {
            counts: vec![members as u32],
            min: 0,
            floor: 0,
        }
    }

    /// The fewest replicas on any member that could still take one: a member
    /// holding that many is as spread as it gets.
    pub(crate) fn level(&self) -> u32 {
        self.min.max(self.floor)
    }

    /// Whether some member holds `level` replicas or more.
    pub(crate) fn reaches(&self, level: u32) -> bool {
        (level as usize) < self.counts.len()
    }

    /// One member went from `before` replicas to `before + 1`.
    fn raise(&mut self, before: u32) {
        let before = before as usize;
        if self.counts.len() == before + 1 {
            self.counts.push(0);
        }
        self.counts[before] = self.counts[before].saturating_sub(1);
        self.counts[before + 1] += 1;
        while self.counts[self.min as usize] == 0 && (self.min as usize) + 1 < self.counts.len() {
            self.min += 1;
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
    states: FixedMap<u32, Domain>,
}

/// One domain as one service sees it.
pub(crate) struct Domain {
    /// Replicas of the service in the domain.
    pub(crate) count: u32,
    /// How many hosts of the domain hold how many replicas of the service.
    pub(crate) hosts: Levels,
    /// No host of the domain can take a replica of the service: a full scan
    /// found none, and capacity only shrinks during a reconcile.
    pub(crate) full: bool,
}

impl Spread {
    /// The service's state in domain `domain`, which holds `size` hosts.
    pub(crate) fn domain(&mut self, domain: u32, size: usize) -> &mut Domain {
        self.states.entry(domain).or_insert_with(|| Domain {
            count: 0,
            hosts: Levels::new(size),
            full: false,
        })
    }

    /// Replicas of the service in domain `domain`, and whether it is known full.
    pub(crate) fn peek(&self, domain: u32) -> (u32, bool) {
        self.states
            .get(&domain)
            .map_or((0, false), |state| (state.count, state.full))
    }

    /// The spread level of the hosts of domain `domain`.
    pub(crate) fn host_level(&self, domain: u32) -> u32 {
        self.states
            .get(&domain)
            .map_or(0, |state| state.hosts.level())
    }
}

impl Service<'_> {
    /// Replicas of this service on host `host`.
    pub(crate) fn on_host(&self, host: u32) -> u32 {
        self.per_host.get(&host).copied().unwrap_or(0)
    }

    /// Whether host `host` has the component cached.
    pub(crate) fn is_cached_on(&self, host: u32) -> bool {
        self.cached_on.binary_search(&host).is_ok()
    }

    /// Up to `limit` of the hosts with the component cached, starting from
    /// one chosen by `key`, so that different replicas try different ones.
    pub(crate) fn cached_hosts(&self, key: u64, limit: usize) -> impl Iterator<Item = u32> {
        let count = self.cached_on.len();
        let start = key as usize % count.max(1);
        (0..count.min(limit)).map(move |i| self.cached_on[(start + i) % count])
    }

    /// Replicas of this service in zone `zone`.
    pub(crate) fn in_zone(&self, zone: u32) -> u32 {
        self.per_zone.get(&zone).copied().unwrap_or(0)
    }
}

/// The ready hosts that carry every label a placement asks for, by host index.
pub(crate) struct Group<'a> {
    pub(crate) labels: &'a BTreeMap<String, String>,
    pub(crate) hosts: Vec<u32>,
}

/// A label used for spreading, and each host's value of it.
struct SpreadLabel {
    /// Per host index, the index of the host's value; [`NO_VALUE`] for a
    /// host without the label (or with an empty value).
    value_of: Vec<u32>,
    /// How many value indices there are, [`NO_VALUE`] included.
    values: usize,
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
    /// values no host of the group has.
    domain_of_value: Vec<u32>,
}

impl Partition {
    /// How many domains the group has: distinct values among its hosts.
    pub(crate) fn domains(&self) -> usize {
        self.starts.len() - 1
    }

    /// The hosts of domain `domain`.
    pub(crate) fn hosts_of(&self, domain: u32) -> &[u32] {
        let domain = domain as usize;
        &self.hosts[self.starts[domain] as usize..self.starts[domain + 1] as usize]
    }
}

/// Hosts, services and groups, indexed densely: hosts in id order, services
/// in id order, so an index comparison is an id comparison.
pub(crate) struct Cluster<'a> {
    pub(crate) hosts: Vec<Host<'a>>,
    pub(crate) services: Vec<Service<'a>>,
    pub(crate) groups: Vec<Group<'a>>,
    /// The partitions the services with a spread label use.
    pub(crate) partitions: Vec<Partition>,
    spread_labels: Vec<SpreadLabel>,
    /// How many hosts are ready, for telling "no ready host" from "none with these labels".
    pub(crate) ready_hosts: usize,
    /// Replica sizes, as (group, memory, instances), that no host of the
    /// group could take, with the reason. Capacity only shrinks during a
    /// reconcile, so a later service of the same size in the same group is
    /// refused without a walk; its reason describes the group as it was when
    /// the first was refused.
    pub(crate) no_room: FixedMap<(usize, u64, u64), String>,
    host_index: FixedMap<&'a HostId, u32>,
    service_index: FixedMap<WorkloadId, u32>,
}

impl<'a> Cluster<'a> {
    /// The cluster of `snapshot` with nothing assigned yet.
    pub(crate) fn new(snapshot: &'a Snapshot) -> Self {
        let mut infos: Vec<&HostInfo> = snapshot.hosts.iter().collect();
        // A stable sort keeps the first of equal ids first, and dedup keeps it.
        infos.sort_by(|a, b| a.id.cmp(&b.id));
        infos.dedup_by(|later, first| later.id == first.id);
        let mut zones: FixedMap<&str, u32> = FixedMap::default();
        let hosts: Vec<Host> = infos
            .into_iter()
            .map(|info| {
                let zone = info.labels.get(ZONE_LABEL).map_or(NO_ZONE, |zone| {
                    let next = zones.len() as u32 + 1;
                    *zones.entry(zone.as_str()).or_insert(next)
                });
                Host {
                    info,
                    capacity: info.capacity,
                    memory: info.capacity.memory.scaled(info.memory_overcommit).bytes(),
                    in_flight: info.in_flight,
                    zone,
                    reserved_memory: 0,
                    reserved_requests: 0,
                    reserved_instances: 0,
                    replicas: Vec::new(),
                }
            })
            .collect();
        let host_index = hosts
            .iter()
            .enumerate()
            .map(|(i, host)| (&host.info.id, i as u32))
            .collect();
        let mut cached_on: FixedMap<&Digest, Vec<u32>> = FixedMap::default();
        for (i, host) in hosts.iter().enumerate() {
            for digest in &host.info.cached {
                cached_on.entry(digest).or_default().push(i as u32);
            }
        }
        let cached_on: FixedMap<&Digest, Rc<[u32]>> = cached_on
            .into_iter()
            .map(|(digest, hosts)| (digest, hosts.into()))
            .collect();

        let mut specs: Vec<(WorkloadId, &Workload)> = snapshot
            .services
            .iter()
            .map(|workload| (workload.id.clone(), workload))
            .collect();
        specs.sort_by(|a, b| a.0.cmp(&b.0));
        specs.dedup_by(|later, first| later.0 == first.0);
        let mut groups = GroupIndex::new(&hosts);
        let services: Vec<Service> = specs
            .into_iter()
            .map(|(id, workload)| {
                let spec: &ServiceSpec = &workload.spec;
                let request = spec.memory_request().bytes();
                let group = groups.group_of(&spec.placement.labels, &hosts);
                let spread = spec.placement.spread.as_deref().map(|label| {
                    let partition = groups.partition_of(group, label, &hosts);
                    Spread {
                        partition,
                        domains: Levels::new(groups.partitions[partition].domains()),
                        states: FixedMap::default(),
                    }
                });
                Service {
                    // The service, not the revision: every revision of a
                    // service walks the hosts in the same order.
                    hash: hash_text(&id.service.to_string()),
                    id,
                    spec,
                    avoid: &workload.avoid,
                    memory: workload.memory_peak.map_or(0, |peak| peak.bytes()).max(request),
                    request,
                    instances: u64::from(spec.limits.concurrency),
                    group,
                    cached_on: cached_on
                        .get(&spec.component)
                        .cloned()
                        .unwrap_or_else(|| Rc::from([])),
                    assigned: vec![false; workload.replicas as usize],
                    per_host: FixedMap::default(),
                    per_zone: FixedMap::default(),
                    hosts: Levels::new(groups.groups[group].hosts.len()),
                    spread,
                    exhausted: None,
                }
            })
            .collect();
        let service_index = services
            .iter()
            .enumerate()
            .map(|(i, service)| (service.id.clone(), i as u32))
            .collect();
        Cluster {
            ready_hosts: groups.ready.len(),
            no_room: FixedMap::default(),
            hosts,
            services,
            groups: groups.groups,
            partitions: groups.partitions,
            spread_labels: groups.spread_labels,
            host_index,
            service_index,
        }
    }

    /// The index of the host with id `id`.
    pub(crate) fn host(&self, id: &HostId) -> Option<u32> {
        self.host_index.get(id).copied()
    }

    /// The index of the service with id `id`.
    pub(crate) fn service(&self, id: &WorkloadId) -> Option<u32> {
        self.service_index.get(id).copied()
    }

    /// The domain of host `host` in partition `partition`; the host must be
    /// in the partition's group.
    pub(crate) fn domain_of(&self, partition: usize, host: u32) -> u32 {
        domain_of(&self.partitions, &self.spread_labels, partition, host)
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
        of.assigned[replica as usize] = true;
        *of.per_zone.entry(to.zone).or_insert(0) += 1;
        let on_host = of.per_host.entry(host).or_insert(0);
        let before = *on_host;
        *on_host += 1;
        of.hosts.raise(before);
        if let Some(spread) = &mut of.spread {
            let partition = &self.partitions[spread.partition];
            let domain = domain_of(
                &self.partitions,
                &self.spread_labels,
                spread.partition,
                host,
            );
            let state = spread.domain(domain, partition.hosts_of(domain).len());
            let in_domain = state.count;
            state.count += 1;
            state.hosts.raise(before);
            spread.domains.raise(in_domain);
        }
    }
}

/// The domain of host `host` in partition `partition` (see [`Cluster::domain_of`]).
fn domain_of(partitions: &[Partition], labels: &[SpreadLabel], partition: usize, host: u32) -> u32 {
    let partition = &partitions[partition];
    let value = labels[partition.label].value_of[host as usize];
    partition.domain_of_value[value as usize]
}

/// Builds the group of each distinct set of placement labels once, from an
/// index of the ready hosts by label, and each group's partition by each
/// spread label asked for.
struct GroupIndex<'a> {
    ready: Vec<u32>,
    by_label: FixedMap<(&'a str, &'a str), Vec<u32>>,
    by_labels: FixedMap<&'a BTreeMap<String, String>, usize>,
    groups: Vec<Group<'a>>,
    spread_labels: Vec<SpreadLabel>,
    spread_label_index: FixedMap<&'a str, usize>,
    partitions: Vec<Partition>,
    partition_index: FixedMap<(usize, &'a str), usize>,
}

impl<'a> GroupIndex<'a> {
    fn new(hosts: &[Host<'a>]) -> Self {
        let mut index = GroupIndex {
            ready: Vec::new(),
            by_label: FixedMap::default(),
            by_labels: FixedMap::default(),
            groups: Vec::new(),
            spread_labels: Vec::new(),
            spread_label_index: FixedMap::default(),
            partitions: Vec::new(),
            partition_index: FixedMap::default(),
        };
        for (i, host) in hosts.iter().enumerate().filter(|(_, host)| host.info.ready) {
            index.ready.push(i as u32);
            for (key, value) in &host.info.labels {
                index
                    .by_label
                    .entry((key.as_str(), value.as_str()))
                    .or_default()
                    .push(i as u32);
            }
        }
        index
    }

    /// The index of the group of hosts carrying every one of `labels`, built
    /// on first use: the hosts carrying its rarest label, narrowed to those
    /// carrying all.
    fn group_of(&mut self, labels: &'a BTreeMap<String, String>, hosts: &[Host<'a>]) -> usize {
        if let Some(&group) = self.by_labels.get(labels) {
            return group;
        }
        let rarest = labels
            .iter()
            .map(|(key, value)| {
                self.by_label
                    .get(&(key.as_str(), value.as_str()))
                    .map_or(&[][..], Vec::as_slice)
            })
            .min_by_key(|hosts| hosts.len());
        let members = match rarest {
            None => self.ready.clone(),
            Some(candidates) => candidates
                .iter()
                .copied()
                .filter(|&h| {
                    let host = &hosts[h as usize].info.labels;
                    labels
                        .iter()
                        .all(|(key, value)| host.get(key) == Some(value))
                })
                .collect(),
        };
        self.groups.push(Group {
            labels,
            hosts: members,
        });
        self.by_labels.insert(labels, self.groups.len() - 1);
        self.groups.len() - 1
    }

    /// The index of the partition of group `group` by the values of label
    /// `label`, built on first use. Domains are numbered in the order their
    /// first host (by index) appears in the group.
    fn partition_of(&mut self, group: usize, label: &'a str, hosts: &[Host<'a>]) -> usize {
        if let Some(&partition) = self.partition_index.get(&(group, label)) {
            return partition;
        }
        let label_index = *self.spread_label_index.entry(label).or_insert_with(|| {
            let mut values: FixedMap<&str, u32> = FixedMap::default();
            let value_of = hosts
                .iter()
                .map(|host| match host.info.labels.get(label) {
                    Some(value) if !value.is_empty() => {
                        let next = values.len() as u32 + 1;
                        *values.entry(value.as_str()).or_insert(next)
                    }
                    _ => NO_VALUE,
                })
                .collect();
            self.spread_labels.push(SpreadLabel {
                value_of,
                values: values.len() + 1,
            });
            self.spread_labels.len() - 1
        });
        let spread_label = &self.spread_labels[label_index];
        let members = &self.groups[group].hosts;
        let mut domain_of_value = vec![u32::MAX; spread_label.values];
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
        self.partition_index
            .insert((group, label), self.partitions.len() - 1);
        self.partitions.len() - 1
    }
}
