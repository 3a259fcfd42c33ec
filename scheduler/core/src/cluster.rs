//! The working state of one reconcile: hosts with what is reserved on them,
//! services with where their replicas are, and the group of hosts each
//! placement admits. Built from a snapshot; changed only by [`Cluster::commit`].

use crate::hash::{FixedMap, hash_text};
use crate::snapshot::{HostInfo, Snapshot};
use std::rc::Rc;
use wharf_proto::{Capacity, Digest, HostId, Placement, ServiceId, ServiceSpec};

/// The label whose values are zones, across which replicas are spread.
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
    /// `info.in_flight`.
    pub(crate) in_flight: u64,
    /// The index of the host's zone.
    pub(crate) zone: u32,
    /// Sum of the memory reservations of the replicas assigned here.
    pub(crate) reserved_memory: u64,
    /// Sum of the concurrency of the replicas assigned here.
    pub(crate) reserved_instances: u64,
    /// The replicas assigned here, as (service index, replica index).
    pub(crate) replicas: Vec<(u32, u32)>,
}

impl Host<'_> {
    pub(crate) fn free_memory(&self) -> u64 {
        self.capacity
            .memory
            .bytes()
            .saturating_sub(self.reserved_memory)
    }

    pub(crate) fn free_instances(&self) -> u64 {
        u64::from(self.capacity.instances).saturating_sub(self.reserved_instances)
    }
}

/// A desired service and where its replicas are so far.
pub(crate) struct Service<'a> {
    pub(crate) spec: &'a ServiceSpec,
    pub(crate) id: ServiceId,
    /// A fixed hash of the id, from which each replica's candidate order is drawn.
    pub(crate) hash: u64,
    /// The memory one replica reserves, in bytes.
    pub(crate) memory: u64,
    /// The instance slots one replica reserves.
    pub(crate) instances: u64,
    /// The index of the group of hosts this service may run on.
    pub(crate) group: usize,
    /// The hosts that have the component cached, by index, in order; shared
    /// by the services that run the same component.
    cached_on: Rc<[u32]>,
    /// Which replica indices (below `spec.replicas`) have a host.
    pub(crate) assigned: Vec<bool>,
    /// Replicas of this service per host index; absent means none.
    per_host: FixedMap<u32, u32>,
    /// Replicas of this service per zone index; absent means none.
    per_zone: FixedMap<u32, u32>,
    /// `levels[k]` is how many hosts of the group hold exactly `k` replicas
    /// of this service, so the emptiest level is known without a scan.
    levels: Vec<u32>,
    /// The lowest `k` with `levels[k] > 0`.
    min_level: u32,
    /// No host of the group holding fewer than `floor` replicas of this
    /// service can take another: a full scan found them all too full, and
    /// capacity only shrinks during a reconcile.
    pub(crate) floor: u32,
    /// Why no host of the group can take a replica, once a full scan has
    /// found none; every later replica gets the same answer without a scan.
    pub(crate) exhausted: Option<String>,
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

    /// The fewest replicas of this service on any host of its group that
    /// could still take one: a host holding that many is as spread as it gets.
    pub(crate) fn spread_level(&self) -> u32 {
        self.min_level.max(self.floor)
    }
}

/// The ready hosts that carry every label a placement asks for, by host index.
pub(crate) struct Group<'a> {
    pub(crate) placement: &'a Placement,
    pub(crate) hosts: Vec<u32>,
}

/// Hosts, services and groups, indexed densely: hosts in id order, services
/// in id order, so an index comparison is an id comparison.
pub(crate) struct Cluster<'a> {
    pub(crate) hosts: Vec<Host<'a>>,
    pub(crate) services: Vec<Service<'a>>,
    pub(crate) groups: Vec<Group<'a>>,
    /// How many hosts are ready, for telling "no ready host" from "none with these labels".
    pub(crate) ready_hosts: usize,
    /// Replica sizes, as (group, memory, instances), that no host of the
    /// group could take, with the reason. Capacity only shrinks during a
    /// reconcile, so a later service of the same size in the same group is
    /// refused without a walk; its reason describes the group as it was when
    /// the first was refused.
    pub(crate) no_room: FixedMap<(usize, u64, u64), String>,
    host_index: FixedMap<&'a HostId, u32>,
    service_index: FixedMap<ServiceId, u32>,
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
                    in_flight: info.in_flight,
                    zone,
                    reserved_memory: 0,
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

        let mut specs: Vec<(ServiceId, &ServiceSpec)> = snapshot
            .services
            .iter()
            .map(|spec| (spec.id(), spec))
            .collect();
        specs.sort_by(|a, b| a.0.cmp(&b.0));
        specs.dedup_by(|later, first| later.0 == first.0);
        let mut groups = GroupIndex::new(&hosts);
        let services: Vec<Service> = specs
            .into_iter()
            .map(|(id, spec)| {
                let group = groups.group_of(&spec.placement, &hosts);
                Service {
                    hash: hash_text(&id.to_string()),
                    id,
                    spec,
                    memory: spec.reservation().bytes(),
                    instances: u64::from(spec.limits.concurrency),
                    group,
                    cached_on: cached_on
                        .get(&spec.component)
                        .cloned()
                        .unwrap_or_else(|| Rc::from([])),
                    assigned: vec![false; spec.replicas as usize],
                    per_host: FixedMap::default(),
                    per_zone: FixedMap::default(),
                    levels: vec![groups.groups[group].hosts.len() as u32],
                    min_level: 0,
                    floor: 0,
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
            host_index,
            service_index,
        }
    }

    /// The index of the host with id `id`.
    pub(crate) fn host(&self, id: &HostId) -> Option<u32> {
        self.host_index.get(id).copied()
    }

    /// The index of the service with id `id`.
    pub(crate) fn service(&self, id: &ServiceId) -> Option<u32> {
        self.service_index.get(id).copied()
    }

    /// Assigns replica `replica` of service `service` to host `host`, which
    /// must be in the service's group, and reserves its share of the host.
    pub(crate) fn commit(&mut self, host: u32, service: u32, replica: u32) {
        let to = &mut self.hosts[host as usize];
        let of = &mut self.services[service as usize];
        to.reserved_memory += of.memory;
        to.reserved_instances += of.instances;
        to.replicas.push((service, replica));
        of.assigned[replica as usize] = true;
        *of.per_zone.entry(to.zone).or_insert(0) += 1;
        let on_host = of.per_host.entry(host).or_insert(0);
        let before = *on_host as usize;
        *on_host += 1;
        if of.levels.len() == before + 1 {
            of.levels.push(0);
        }
        of.levels[before] = of.levels[before].saturating_sub(1);
        of.levels[before + 1] += 1;
        while of.levels[of.min_level as usize] == 0 && (of.min_level as usize) + 1 < of.levels.len()
        {
            of.min_level += 1;
        }
    }
}

/// Builds the group of each distinct placement once, from an index of the
/// ready hosts by label.
struct GroupIndex<'a> {
    ready: Vec<u32>,
    by_label: FixedMap<(&'a str, &'a str), Vec<u32>>,
    by_placement: FixedMap<&'a Placement, usize>,
    groups: Vec<Group<'a>>,
}

impl<'a> GroupIndex<'a> {
    fn new(hosts: &[Host<'a>]) -> Self {
        let mut index = GroupIndex {
            ready: Vec::new(),
            by_label: FixedMap::default(),
            by_placement: FixedMap::default(),
            groups: Vec::new(),
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

    /// The index of the group of `placement`, built on first use: the hosts
    /// carrying its rarest label, narrowed to those carrying all.
    fn group_of(&mut self, placement: &'a Placement, hosts: &[Host<'a>]) -> usize {
        if let Some(&group) = self.by_placement.get(placement) {
            return group;
        }
        let rarest = placement
            .labels
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
                .filter(|&h| placement.matches(&hosts[h as usize].info.labels))
                .collect(),
        };
        self.groups.push(Group {
            placement,
            hosts: members,
        });
        self.by_placement.insert(placement, self.groups.len() - 1);
        self.groups.len() - 1
    }
}
