//! The compiled-code cache in memory: least recently used entries go first
//! once the code held passes a byte budget, and concurrent loads of one
//! digest share a single load (single-flight).
//!
//! It is generic over the value so the bookkeeping can be tested without
//! compiling anything; the runtime keeps `wasmtime::component::Component`s
//! in it and backs it with the disk cache (see [`crate::runtime`]).

use lru::LruCache;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use wharf_proto::Digest;

/// Where a value handed out by [`CodeCache::get_or_load`] came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// Already in memory, or loaded by a concurrent caller that this one waited for.
    Memory,
    /// Deserialized from the disk cache.
    Disk,
    /// Compiled from the component's bytes.
    Compiled,
}

/// What a loader produced: the value, its size in memory, and where it came from.
pub struct Loaded<V> {
    pub value: V,
    pub bytes: u64,
    pub source: Source,
}

/// Counters and gauges of the cache, shared with the host's `/metrics`
/// (prometheus-client metrics are atomics behind an `Arc`, so clones share them).
#[derive(Clone, Debug, Default)]
pub struct CodeCacheMetrics {
    /// Lookups answered from memory.
    pub hits: Counter,
    /// Lookups that were not in memory (then loaded from disk, compiled, or not found).
    pub misses: Counter,
    /// Compiled code deserialized from the disk cache.
    pub disk_loads: Counter,
    /// Components compiled.
    pub compiles: Counter,
    /// Entries dropped to stay within the budget.
    pub evictions: Counter,
    /// Bytes of compiled code held in memory by the cache.
    pub bytes: Gauge,
    /// Components held in memory by the cache.
    pub entries: Gauge,
}

/// A snapshot of [`CodeCacheMetrics`], for tests and benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CodeCacheStats {
    pub hits: u64,
    pub misses: u64,
    pub disk_loads: u64,
    pub compiles: u64,
    pub evictions: u64,
    pub bytes: u64,
    pub entries: u64,
}

struct Entry<V> {
    value: V,
    bytes: u64,
}

struct Held<V> {
    lru: LruCache<Digest, Entry<V>>,
    bytes: u64,
}

/// One load in progress. Waiters sleep on `done` until the leader sets `state`.
struct Flight<V> {
    state: Mutex<FlightState<V>>,
    done: Condvar,
}

enum FlightState<V> {
    Running,
    /// The leader's value and its size, or `None` when it failed or found
    /// nothing; a waiter then loads by itself (errors are not shared: they
    /// are not `Clone`, and a retry may succeed).
    Finished(Option<(V, u64)>),
}

/// The in-memory compiled-code cache. See the module docs.
pub struct CodeCache<V: Clone> {
    budget: u64,
    /// The LRU and the bytes it holds. Locked only for lookups, inserts and
    /// evictions, never across a load.
    held: Mutex<Held<V>>,
    /// Loads in progress by digest. Locked only to join or end a flight.
    flights: Mutex<HashMap<Digest, Arc<Flight<V>>>>,
    metrics: CodeCacheMetrics,
}

/// A poisoned lock only means another thread panicked while holding it;
/// the cache's state is updated in single steps, so it stays usable.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<V: Clone> CodeCache<V> {
    /// An empty cache that keeps at most `budget` bytes of code, except that
    /// the most recently used entry always stays (a budget smaller than one
    /// component would otherwise reload it on every use).
    pub fn new(budget: u64) -> Self {
        CodeCache {
            budget,
            held: Mutex::new(Held { lru: LruCache::unbounded(), bytes: 0 }),
            flights: Mutex::new(HashMap::new()),
            metrics: CodeCacheMetrics::default(),
        }
    }

    /// The cache's metrics (clones share the values).
    pub fn metrics(&self) -> &CodeCacheMetrics {
        &self.metrics
    }

    /// The current values of the metrics.
    pub fn stats(&self) -> CodeCacheStats {
        let m = &self.metrics;
        CodeCacheStats {
            hits: m.hits.get(),
            misses: m.misses.get(),
            disk_loads: m.disk_loads.get(),
            compiles: m.compiles.get(),
            evictions: m.evictions.get(),
            bytes: u64::try_from(m.bytes.get()).unwrap_or(0),
            entries: u64::try_from(m.entries.get()).unwrap_or(0),
        }
    }

    /// Whether `digest` is held in memory (does not count as a use).
    pub fn contains(&self, digest: &Digest) -> bool {
        lock(&self.held).lru.contains(digest)
    }

    /// The digests held in memory, most recently used first.
    pub fn digests(&self) -> Vec<Digest> {
        lock(&self.held).lru.iter().map(|(digest, _)| digest.clone()).collect()
    }

    /// Drops `digest` from memory.
    pub fn remove(&self, digest: &Digest) {
        let mut held = lock(&self.held);
        if let Some(entry) = held.lru.pop(digest) {
            held.bytes -= entry.bytes;
            self.publish(&held);
        }
    }

    /// The value for `digest`: from memory, else from `load`, which runs
    /// once however many callers ask for the same digest at the same time
    /// (the others wait for it and share its value). `load` returning
    /// `Ok(None)` means "not available" (e.g. not on disk and no bytes to
    /// compile), and so does this. With `keep`, a loaded value is held in
    /// memory; without (precompiling into the disk cache only), it is not.
    pub fn get_or_load<E>(
        &self,
        digest: &Digest,
        keep: bool,
        load: impl FnOnce() -> Result<Option<Loaded<V>>, E>,
    ) -> Result<Option<(V, Source)>, E> {
        if let Some(value) = self.lookup(digest) {
            self.metrics.hits.inc();
            return Ok(Some((value, Source::Memory)));
        }
        let (flight, leader) = {
            let mut flights = lock(&self.flights);
            match flights.get(digest) {
                Some(flight) => (flight.clone(), false),
                None => {
                    let flight = Arc::new(Flight { state: Mutex::new(FlightState::Running), done: Condvar::new() });
                    flights.insert(digest.clone(), flight.clone());
                    (flight, true)
                }
            }
        };
        if !leader {
            let mut state = lock(&flight.state);
            while matches!(*state, FlightState::Running) {
                state = flight.done.wait(state).unwrap_or_else(PoisonError::into_inner);
            }
            if let FlightState::Finished(Some((value, bytes))) = &*state {
                let (value, bytes) = (value.clone(), *bytes);
                drop(state);
                if keep {
                    self.touch_or_keep(digest, &value, bytes);
                }
                self.metrics.hits.inc();
                return Ok(Some((value, Source::Memory)));
            }
            drop(state);
            // The leader failed or found nothing: try by ourselves.
            self.metrics.misses.inc();
            return self.finish_load(digest, keep, load).map(|loaded| loaded.map(|(value, source, _)| (value, source)));
        }
        // Ends the flight even if `load` panics, so waiters never hang.
        let mut ending = EndFlight { cache: self, digest, flight: &flight, value: None };
        // A flight that just ended may have filled memory between our
        // lookup and joining.
        if let Some((value, bytes)) = self.lookup_sized(digest) {
            self.metrics.hits.inc();
            ending.value = Some((value.clone(), bytes));
            return Ok(Some((value, Source::Memory)));
        }
        self.metrics.misses.inc();
        let (value, source, bytes) = match self.finish_load(digest, keep, load)? {
            Some(loaded) => loaded,
            None => return Ok(None),
        };
        ending.value = Some((value.clone(), bytes));
        Ok(Some((value, source)))
    }

    /// Runs `load`, counts where the value came from and keeps it if asked.
    fn finish_load<E>(
        &self,
        digest: &Digest,
        keep: bool,
        load: impl FnOnce() -> Result<Option<Loaded<V>>, E>,
    ) -> Result<Option<(V, Source, u64)>, E> {
        let Some(loaded) = load()? else { return Ok(None) };
        let counter = match loaded.source {
            Source::Disk => Some(&self.metrics.disk_loads),
            Source::Compiled => Some(&self.metrics.compiles),
            Source::Memory => None,
        };
        if let Some(counter) = counter {
            counter.inc();
        }
        if keep {
            self.insert(digest, loaded.value.clone(), loaded.bytes);
        }
        Ok(Some((loaded.value, loaded.source, loaded.bytes)))
    }

    /// The value held for `digest`, marked as most recently used.
    fn lookup(&self, digest: &Digest) -> Option<V> {
        self.lookup_sized(digest).map(|(value, _)| value)
    }

    fn lookup_sized(&self, digest: &Digest) -> Option<(V, u64)> {
        lock(&self.held).lru.get(digest).map(|entry| (entry.value.clone(), entry.bytes))
    }

    /// A waiter got its value from the leader, which may not have kept it
    /// (a precompile does not): keep it now.
    fn touch_or_keep(&self, digest: &Digest, value: &V, bytes: u64) {
        if self.lookup(digest).is_none() {
            self.insert(digest, value.clone(), bytes);
        }
    }

    /// Holds `value` as the most recently used entry, then evicts the least
    /// recently used ones until the budget is met (the new entry stays).
    pub fn insert(&self, digest: &Digest, value: V, bytes: u64) {
        let mut held = lock(&self.held);
        if let Some(old) = held.lru.put(digest.clone(), Entry { value, bytes }) {
            held.bytes -= old.bytes;
        }
        held.bytes += bytes;
        while held.bytes > self.budget && held.lru.len() > 1 {
            let Some((_, evicted)) = held.lru.pop_lru() else { break };
            held.bytes -= evicted.bytes;
            self.metrics.evictions.inc();
        }
        self.publish(&held);
    }

    fn publish(&self, held: &Held<V>) {
        self.metrics.bytes.set(i64::try_from(held.bytes).unwrap_or(i64::MAX));
        self.metrics.entries.set(i64::try_from(held.lru.len()).unwrap_or(i64::MAX));
    }
}

/// Ends a flight when dropped: records the leader's value (or `None`),
/// removes the flight so later callers start afresh, and wakes the waiters.
struct EndFlight<'a, V: Clone> {
    cache: &'a CodeCache<V>,
    digest: &'a Digest,
    flight: &'a Arc<Flight<V>>,
    value: Option<(V, u64)>,
}

impl<V: Clone> Drop for EndFlight<'_, V> {
    fn drop(&mut self) {
        lock(&self.cache.flights).remove(self.digest);
        *lock(&self.flight.state) = FlightState::Finished(self.value.take());
        self.flight.done.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Duration;

    fn digest(n: u8) -> Digest {
        Digest::of(&[n])
    }

    fn compiled(value: u32, bytes: u64) -> impl FnOnce() -> Result<Option<Loaded<u32>>, String> {
        move || Ok(Some(Loaded { value, bytes, source: Source::Compiled }))
    }

    #[test]
    fn least_recently_used_entries_go_first_once_over_budget() {
        let cache = CodeCache::new(100);
        cache.insert(&digest(1), 1, 40);
        cache.insert(&digest(2), 2, 40);
        // Using 1 makes 2 the least recently used.
        assert_eq!(cache.get_or_load(&digest(1), true, compiled(0, 0)), Ok(Some((1, Source::Memory))));
        cache.insert(&digest(3), 3, 40);
        assert!(cache.contains(&digest(1)) && cache.contains(&digest(3)));
        assert!(!cache.contains(&digest(2)));
        let stats = cache.stats();
        assert_eq!((stats.evictions, stats.bytes, stats.entries, stats.hits), (1, 80, 2, 1));
        assert_eq!(cache.digests(), vec![digest(3), digest(1)]);
    }

    #[test]
    fn an_entry_larger_than_the_budget_stays_alone() {
        let cache = CodeCache::new(10);
        cache.insert(&digest(1), 1, 5);
        cache.insert(&digest(2), 2, 50);
        assert_eq!(cache.digests(), vec![digest(2)]);
        assert_eq!(cache.stats().bytes, 50);
        cache.remove(&digest(2));
        assert_eq!((cache.stats().bytes, cache.stats().entries), (0, 0));
    }

    #[test]
    fn misses_count_where_the_value_came_from_and_unavailable_is_none() {
        let cache: CodeCache<u32> = CodeCache::new(100);
        let none = cache.get_or_load(&digest(1), true, || Ok::<_, String>(None));
        assert_eq!(none, Ok(None));
        let disk = cache.get_or_load(&digest(1), true, || Ok::<_, String>(Some(Loaded { value: 7, bytes: 1, source: Source::Disk })));
        assert_eq!(disk, Ok(Some((7, Source::Disk))));
        let failed = cache.get_or_load(&digest(2), true, || Err::<Option<Loaded<u32>>, _>("broken".to_string()));
        assert_eq!(failed, Err("broken".to_string()));
        let stats = cache.stats();
        assert_eq!((stats.misses, stats.disk_loads, stats.compiles, stats.hits), (3, 1, 0, 0));
    }

    #[test]
    fn without_keep_the_value_is_not_held() {
        let cache = CodeCache::new(100);
        assert_eq!(cache.get_or_load(&digest(1), false, compiled(1, 10)), Ok(Some((1, Source::Compiled))));
        assert!(!cache.contains(&digest(1)));
    }

    #[test]
    fn concurrent_loads_of_one_digest_run_the_loader_once() {
        let cache = Arc::new(CodeCache::new(1000));
        let loads = Arc::new(AtomicU32::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (cache, loads) = (cache.clone(), loads.clone());
                std::thread::spawn(move || {
                    cache.get_or_load(&digest(1), true, || {
                        loads.fetch_add(1, Ordering::SeqCst);
                        // Long enough that every thread arrives while it runs.
                        std::thread::sleep(Duration::from_millis(300));
                        Ok::<_, String>(Some(Loaded { value: 42, bytes: 10, source: Source::Compiled }))
                    })
                })
            })
            .collect();
        for thread in threads {
            let result = thread.join().expect("no panic");
            assert_eq!(result.map(|r| r.map(|(v, _)| v)), Ok(Some(42)));
        }
        assert_eq!(loads.load(Ordering::SeqCst), 1);
        let stats = cache.stats();
        assert_eq!((stats.compiles, stats.hits + stats.misses), (1, 8));
    }

    #[test]
    fn waiters_load_by_themselves_when_the_leader_fails() {
        let cache = Arc::new(CodeCache::new(1000));
        let leader = {
            let cache = cache.clone();
            std::thread::spawn(move || {
                cache.get_or_load(&digest(1), true, || {
                    std::thread::sleep(Duration::from_millis(300));
                    Err::<Option<Loaded<u32>>, _>("leader failed".to_string())
                })
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        let waiter = cache.get_or_load(&digest(1), true, compiled(5, 1));
        assert_eq!(leader.join().expect("no panic"), Err("leader failed".to_string()));
        assert_eq!(waiter, Ok(Some((5, Source::Compiled))));
        assert!(cache.contains(&digest(1)));
    }
}
