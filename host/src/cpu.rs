//! Sharing a host's CPU between requests and between tenants.
//!
//! Two levels, like an operating system's feedback queue:
//!
//! - A request starts in the *foreground*: guest code runs on the task that
//!   accepted the request, at normal OS priority, yielding every epoch tick.
//!   Nearly all requests finish here within a millisecond.
//! - It moves to the *background* when its guest has run for more than
//!   [`FOREGROUND_TICKS`] epoch ticks, or starts there when its namespace
//!   has recently used more CPU than the average of the active namespaces
//!   ([`Usage`]). The background is a pool of threads at a low OS priority
//!   ([`BackgroundPriority`], by default `SCHED_IDLE`): the kernel gives a
//!   core to any foreground thread the moment it wakes.
//!
//! In both levels guest code runs only while holding a slot of that level's
//! [`FairGate`] (one slot per core), taken afresh for every poll of the
//! guest: when a slot frees, the namespace that has held that level's slots
//! the least goes next. A guest waiting in a host call (a timer, an outbound
//! request, a key-value read) holds no slot.
//!
//! So a tenant flooding a host with requests, or spinning at full
//! concurrency, runs on the CPU the others leave: another tenant's short
//! requests go ahead of it, and tenants with long requests split the
//! background evenly however many requests each has in flight. The price is
//! paid by the greedy tenant: while others keep the host busy, its
//! background requests wait, up to their deadline.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

/// Epoch ticks a request's guest runs in the foreground before it is demoted
/// (at 2 ms a tick: 4 to 6 ms of running).
pub(crate) const FOREGROUND_TICKS: u32 = 2;

/// The OS scheduling priority of the background pool's threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackgroundPriority {
    /// Linux `SCHED_IDLE`: they run only on CPU nothing else wants, and the
    /// kernel treats a core running them as free when it places a thread
    /// that wakes up. Long requests can wait a long time on a busy host.
    #[default]
    Idle,
    /// A `nice` value, 0 (as the foreground) to 19 (lowest): they keep a
    /// share of a busy host's CPU, and short requests wait for cores more.
    Nice(i32),
}

impl std::str::FromStr for BackgroundPriority {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "idle" => Ok(BackgroundPriority::Idle),
            other => match other.parse::<i32>() {
                Ok(nice) if (0..=19).contains(&nice) => Ok(BackgroundPriority::Nice(nice)),
                _ => Err(format!("`{s}` is not a background priority: use `idle` or a nice value from 0 to 19")),
            },
        }
    }
}

impl std::fmt::Display for BackgroundPriority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BackgroundPriority::Idle => f.write_str("idle"),
            BackgroundPriority::Nice(nice) => write!(f, "{nice}"),
        }
    }
}

/// A guest future scheduled by [`CpuScheduler::run`].
pub(crate) type GuestFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Set by a request's epoch callback when the request has run long enough
/// to be demoted; read by the scheduler between polls.
#[derive(Debug, Default)]
pub(crate) struct Demotion(AtomicBool);

impl Demotion {
    pub(crate) fn demote(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    fn is_set(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// The two levels' gates and the background pool. One per [`crate::Runtime`].
pub(crate) struct CpuScheduler {
    /// `None` only while dropping.
    pool: Option<tokio::runtime::Runtime>,
    foreground: Arc<FairGate>,
    background: Arc<FairGate>,
    usage: Arc<Usage>,
    demoted: AtomicU64,
}

impl std::fmt::Debug for CpuScheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuScheduler").field("slots", &self.foreground.slots).finish()
    }
}

impl Drop for CpuScheduler {
    fn drop(&mut self) {
        // Dropping a runtime blocks until its threads stop, which is not
        // allowed inside async code; background requests are cancelled.
        if let Some(pool) = self.pool.take() {
            pool.shutdown_background();
        }
    }
}

impl CpuScheduler {
    /// A background pool of one thread (and one slot) per core, its threads
    /// at `priority`; `preempt` ends running guests' slices early.
    pub(crate) fn new(priority: BackgroundPriority, preempt: Option<Preempt>) -> std::io::Result<Self> {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let pool = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(cores)
            .thread_name("wharf-background")
            .on_thread_start(move || lower_thread_priority(priority))
            .enable_all()
            .build()?;
        let usage = Arc::new(Usage::default());
        Ok(CpuScheduler {
            pool: Some(pool),
            foreground: FairGate::new(cores, preempt, Some(usage.clone())),
            background: FairGate::new(cores, None, Some(usage.clone())),
            usage,
            demoted: AtomicU64::new(0),
        })
    }

    /// Requests that ran in the background since the host started.
    pub(crate) fn demoted(&self) -> u64 {
        self.demoted.load(Ordering::Relaxed)
    }

    /// Runs a guest future for `namespace`: in the caller's task until
    /// `demotion` is set, then in the background pool (there from the start
    /// if the namespace is over its share); says whether it went there.
    /// The value is `None` if `deadline` passes while the request is in the
    /// background (it may be waiting for CPU); the guest is then cancelled.
    pub(crate) async fn run<T: Send + 'static>(
        &self,
        namespace: &Arc<str>,
        demotion: &Demotion,
        deadline: Instant,
        guest: GuestFuture<T>,
    ) -> (Option<T>, bool) {
        match self.foreground_then_background(namespace, demotion, deadline, guest).await {
            Ok(value) => (Some(value), false),
            Err(value) => (value, true),
        }
    }

    /// `Ok` if the guest finished in the foreground, else what the
    /// background made of it.
    async fn foreground_then_background<T: Send + 'static>(
        &self,
        namespace: &Arc<str>,
        demotion: &Demotion,
        deadline: Instant,
        mut guest: GuestFuture<T>,
    ) -> Result<T, Option<T>> {
        // A namespace that has recently used more CPU than the average of
        // the active ones starts its requests in the background.
        self.usage.charge(namespace, REQUEST_OVERHEAD_MICROS);
        if !self.usage.over_share(namespace)
            && let Some(value) = gated(&self.foreground, namespace, &mut guest, Some(demotion)).await
        {
            return Ok(value);
        }
        let Some(pool) = &self.pool else { return Err(None) };
        self.demoted.fetch_add(1, Ordering::Relaxed);
        let (gate, namespace) = (self.background.clone(), namespace.clone());
        let mut task = pool.spawn(async move { gated(&gate, &namespace, &mut guest, None).await });
        Err(match tokio::time::timeout_at(deadline.into(), &mut task).await {
            Ok(Ok(value)) => value,
            // The guest panicked the host code polling it (a bug) or the pool is shutting down.
            Ok(Err(join)) => {
                if join.is_panic() {
                    std::panic::resume_unwind(join.into_panic());
                }
                None
            }
            Err(_elapsed) => {
                task.abort();
                None
            }
        })
    }
}

/// Polls `guest` each time it has been woken, holding a slot of `gate`
/// during each poll, so a guest waiting in a host call holds no slot.
/// Returns `None` if `demotion` is set after a poll.
async fn gated<T>(gate: &Arc<FairGate>, namespace: &Arc<str>, guest: &mut GuestFuture<T>, demotion: Option<&Demotion>) -> Option<T> {
    let wakeup = Arc::new(Wakeup { woken: AtomicBool::new(true), task: futures::task::AtomicWaker::new() });
    let waker = Waker::from(wakeup.clone());
    loop {
        std::future::poll_fn(|cx| wakeup.ready(cx)).await;
        let slot = gate.acquire(namespace).await;
        if let Poll::Ready(value) = guest.as_mut().poll(&mut Context::from_waker(&waker)) {
            return Some(value);
        }
        drop(slot);
        if demotion.is_some_and(Demotion::is_set) {
            return None;
        }
    }
}

/// Remembers that the guest was woken, and wakes the task polling it.
struct Wakeup {
    woken: AtomicBool,
    task: futures::task::AtomicWaker,
}

impl Wakeup {
    fn ready(&self, cx: &mut Context<'_>) -> Poll<()> {
        self.task.register(cx.waker());
        if self.woken.swap(false, Ordering::AcqRel) { Poll::Ready(()) } else { Poll::Pending }
    }
}

impl Wake for Wakeup {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

/// Lowers the calling thread's scheduling priority (on Linux priorities
/// are per thread). Lowering is always allowed; a failure is logged.
fn lower_thread_priority(priority: BackgroundPriority) {
    let result = match priority {
        BackgroundPriority::Idle => idle_policy(),
        #[cfg(target_os = "linux")]
        BackgroundPriority::Nice(nice) => rustix::process::setpriority_process(Some(rustix::thread::gettid()), nice).map_err(std::io::Error::from),
        #[cfg(not(target_os = "linux"))]
        BackgroundPriority::Nice(_) => Ok(()),
    };
    if let Err(e) = result {
        tracing::warn!("could not lower the background threads' priority to {priority}: {e}");
    }
}

/// Puts the calling thread under `SCHED_IDLE`.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn idle_policy() -> std::io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid, initialised struct that outlives the call,
    // which only reads it; pid 0 names the calling thread.
    let result = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
    if result == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

#[cfg(not(target_os = "linux"))]
fn idle_policy() -> std::io::Result<()> {
    Ok(())
}

/// A fixed number of slots, granted to waiting namespaces in order of the
/// time they have held slots so far (least first), so each namespace with
/// work waiting gets an even share however many waiters it queues.
pub(crate) struct FairGate {
    slots: usize,
    state: Mutex<GateState>,
    /// Called when a namespace holding no slot has to wait: ends the running
    /// guests' slices early so that it waits microseconds, not a slice.
    preempt: Option<Preempt>,
    /// Where slot time is also charged.
    usage: Option<Arc<Usage>>,
}

/// Ends every running guest's current slice (by advancing the epoch).
pub(crate) type Preempt = Box<dyn Fn() + Send + Sync>;

#[derive(Default)]
struct GateState {
    free: usize,
    /// The usage of the namespace granted last: a namespace that was idle
    /// starts from here, so idling banks no credit.
    clock: u64,
    tenants: HashMap<Arc<str>, Tenant>,
}

#[derive(Default)]
struct Tenant {
    /// Microseconds of slot time used.
    used: u64,
    holding: usize,
    waiting: VecDeque<tokio::sync::oneshot::Sender<Slot>>,
}

/// How long a namespace counts as active after it last used the CPU.
const ACTIVE_WINDOW: Duration = Duration::from_millis(250);

/// What a request costs the host besides its guest's slices (reading and
/// writing HTTP, creating and dropping the instance's store), charged to
/// its namespace up front: a flood of tiny requests is not free.
const REQUEST_OVERHEAD_MICROS: u64 = 30;

/// Recent use halves every this long.
const USAGE_HALF_LIFE: Duration = Duration::from_millis(100);

/// Recent use (in microseconds) below which a namespace always starts in
/// the foreground, whatever others use.
const USAGE_FLOOR: f64 = 2_000.0;

/// Each namespace's recent CPU use in both levels, decaying with
/// [`USAGE_HALF_LIFE`].
#[derive(Default)]
pub(crate) struct Usage {
    state: Mutex<HashMap<Arc<str>, Recent>>,
}

#[derive(Clone, Copy)]
struct Recent {
    micros: f64,
    at: Instant,
}

impl Recent {
    fn now(self, now: Instant) -> f64 {
        let halvings = now.saturating_duration_since(self.at).as_secs_f64() / USAGE_HALF_LIFE.as_secs_f64();
        self.micros * (-halvings).exp2()
    }
}

impl Usage {
    fn lock(&self) -> MutexGuard<'_, HashMap<Arc<str>, Recent>> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn charge(&self, namespace: &Arc<str>, micros: u64) {
        let now = Instant::now();
        let mut state = self.lock();
        let recent = state.entry(namespace.clone()).or_insert(Recent { micros: 0.0, at: now });
        *recent = Recent { micros: recent.now(now) + micros as f64, at: now };
        // Forget namespaces idle for a while (their use has decayed to nothing).
        if state.len() > 16 {
            state.retain(|_, r| now.saturating_duration_since(r.at) < 20 * USAGE_HALF_LIFE);
        }
    }

    /// Whether `namespace` has recently used more CPU than the average of
    /// the namespaces active now, while at least one other is active.
    pub(crate) fn over_share(&self, namespace: &str) -> bool {
        let now = Instant::now();
        let state = self.lock();
        let Some(mine) = state.get(namespace).map(|r| r.now(now)) else { return false };
        if mine < USAGE_FLOOR {
            return false;
        }
        let (mut total, mut active) = (0.0, 0usize);
        for recent in state.values().filter(|r| now.saturating_duration_since(r.at) < ACTIVE_WINDOW) {
            total += recent.now(now);
            active += 1;
        }
        active >= 2 && mine > total / active as f64
    }
}

/// One slot; given back (to the next namespace in line) when dropped.
pub(crate) struct Slot {
    /// `None` once disarmed (never granted after all).
    gate: Option<Arc<FairGate>>,
    namespace: Arc<str>,
    granted: Instant,
}

impl FairGate {
    pub(crate) fn new(slots: usize, preempt: Option<Preempt>, usage: Option<Arc<Usage>>) -> Arc<Self> {
        let slots = slots.max(1);
        Arc::new(FairGate { slots, state: Mutex::new(GateState { free: slots, ..GateState::default() }), preempt, usage })
    }

    fn lock(&self) -> MutexGuard<'_, GateState> {
        // Nothing panics while holding the lock; recover the state if something did.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Waits for a slot for `namespace`.
    pub(crate) async fn acquire(self: &Arc<Self>, namespace: &Arc<str>) -> Slot {
        let receiver = {
            let mut state = self.lock();
            let clock = state.clock;
            let tenant = state.tenants.entry(namespace.clone()).or_default();
            if tenant.holding == 0 && tenant.waiting.is_empty() {
                tenant.used = tenant.used.max(clock);
            }
            if state.free > 0 {
                state.free -= 1;
                return self.grant(&mut state, namespace.clone());
            }
            let (sender, receiver) = tokio::sync::oneshot::channel();
            let tenant = tenant_mut(&mut state, namespace);
            let shut_out = tenant.holding == 0;
            tenant.waiting.push_back(sender);
            if shut_out && let Some(preempt) = &self.preempt {
                preempt();
            }
            receiver
        };
        match receiver.await {
            Ok(slot) => slot,
            // Senders are only dropped after a send; a closed gate would land here.
            Err(_) => Slot { gate: None, namespace: namespace.clone(), granted: Instant::now() },
        }
    }

    fn grant(self: &Arc<Self>, state: &mut GateState, namespace: Arc<str>) -> Slot {
        let tenant = tenant_mut(state, &namespace);
        tenant.holding += 1;
        // Grants go to the least-used waiter, so this tracks the low end of
        // the namespaces with work: where a newcomer starts.
        state.clock = tenant.used;
        Slot { gate: Some(self.clone()), namespace, granted: Instant::now() }
    }

    fn release(self: &Arc<Self>, namespace: &Arc<str>, used: u64) {
        if let Some(usage) = &self.usage {
            usage.charge(namespace, used);
        }
        let mut state = self.lock();
        let tenant = tenant_mut(&mut state, namespace);
        tenant.used = tenant.used.saturating_add(used);
        tenant.holding = tenant.holding.saturating_sub(1);
        loop {
            let next = state
                .tenants
                .iter()
                .filter(|(_, t)| !t.waiting.is_empty())
                .min_by_key(|(_, t)| t.used)
                .map(|(name, _)| name.clone());
            let Some(next) = next else {
                state.free += 1;
                break;
            };
            let Some(sender) = tenant_mut(&mut state, &next).waiting.pop_front() else { continue };
            let slot = self.grant(&mut state, next.clone());
            match sender.send(slot) {
                Ok(()) => break,
                // The waiter gave up; the slot was never used: disarm it and try the next.
                Err(mut slot) => {
                    slot.gate = None;
                    let tenant = tenant_mut(&mut state, &next);
                    tenant.holding = tenant.holding.saturating_sub(1);
                }
            }
        }
        // An idle namespace at or below the clock would start from the clock
        // anyway: forget it, now and then rather than on every release.
        if state.tenants.len() > 16 {
            let clock = state.clock;
            state.tenants.retain(|_, t| t.holding > 0 || !t.waiting.is_empty() || t.used > clock);
        }
    }

    /// Slots free right now (for tests and metrics).
    #[cfg(test)]
    fn free(&self) -> usize {
        self.lock().free
    }
}

fn tenant_mut<'a>(state: &'a mut GateState, namespace: &Arc<str>) -> &'a mut Tenant {
    state.tenants.entry(namespace.clone()).or_default()
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(gate) = self.gate.take() {
            let used = u64::try_from(self.granted.elapsed().as_micros()).unwrap_or(u64::MAX).max(1);
            gate.release(&self.namespace, used);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns(name: &str) -> Arc<str> {
        name.into()
    }

    /// Polls `future` once; `Some` if it finished.
    fn poll_once<F: Future + Unpin>(future: &mut F) -> Option<F::Output> {
        let mut cx = Context::from_waker(Waker::noop());
        match Pin::new(future).poll(&mut cx) {
            Poll::Ready(value) => Some(value),
            Poll::Pending => None,
        }
    }

    #[tokio::test]
    async fn a_namespace_with_less_use_goes_before_queued_waiters_of_a_busy_one() {
        let gate = FairGate::new(1, None, None);
        let (a, b) = (ns("a"), ns("b"));
        let held = gate.acquire(&a).await;
        std::thread::sleep(Duration::from_millis(3));
        // a queues three more, then b arrives last.
        let mut a_waiters: Vec<_> = (0..3).map(|_| Box::pin(gate.acquire(&a))).collect();
        for waiter in &mut a_waiters {
            assert!(poll_once(waiter).is_none(), "no slot is free");
        }
        let mut b_waiter = Box::pin(gate.acquire(&b));
        assert!(poll_once(&mut b_waiter).is_none());
        drop(held);
        let b_slot = poll_once(&mut b_waiter).expect("b has used nothing, so it is next");
        for waiter in &mut a_waiters {
            assert!(poll_once(waiter).is_none(), "a waits while b holds the only slot");
        }
        drop(b_slot);
        assert!(poll_once(&mut a_waiters[0]).is_some(), "then a's first waiter");
    }

    #[tokio::test]
    async fn two_busy_namespaces_alternate_however_many_waiters_each_queues() {
        let gate = FairGate::new(1, None, None);
        let (a, b) = (ns("a"), ns("b"));
        let first = gate.acquire(&a).await;
        type Waiter<'a> = Pin<Box<dyn Future<Output = Slot> + 'a>>;
        let mut queue: Vec<(char, Waiter)> = Vec::new();
        for _ in 0..6 {
            queue.push(('a', Box::pin(gate.acquire(&a))));
        }
        for _ in 0..2 {
            queue.push(('b', Box::pin(gate.acquire(&b))));
        }
        for (_, waiter) in &mut queue {
            assert!(poll_once(waiter).is_none());
        }
        let mut order = String::new();
        let mut holding = first;
        std::thread::sleep(Duration::from_millis(2));
        while !queue.is_empty() {
            drop(holding);
            let mut granted = None;
            for (i, (_, waiter)) in queue.iter_mut().enumerate() {
                if let Some(slot) = poll_once(waiter) {
                    assert!(granted.is_none(), "one slot, one grant at a time");
                    granted = Some((i, slot));
                }
            }
            let (i, slot) = granted.expect("a waiter got the freed slot");
            order.push(queue.remove(i).0);
            // Equal slices: each grant holds the slot for 2 ms.
            holding = slot;
            std::thread::sleep(Duration::from_millis(2));
        }
        drop(holding);
        assert_eq!(order[..4].matches('b').count(), 2, "b's two are served among the first four grants, not after a's six: {order}");
    }

    #[tokio::test]
    async fn a_waiter_that_gives_up_does_not_lose_the_slot() {
        let gate = FairGate::new(1, None, None);
        let a = ns("a");
        let held = gate.acquire(&a).await;
        let mut abandoned = Box::pin(gate.acquire(&a));
        assert!(poll_once(&mut abandoned).is_none());
        drop(abandoned);
        drop(held);
        assert_eq!(gate.free(), 1, "the slot came back although its waiter left");
        let _again = gate.acquire(&a).await;
        assert_eq!(gate.free(), 0);
    }

    #[tokio::test]
    async fn a_granted_slot_dropped_unreceived_is_returned() {
        let gate = FairGate::new(1, None, None);
        let a = ns("a");
        let held = gate.acquire(&a).await;
        let mut waiter = Box::pin(gate.acquire(&a));
        assert!(poll_once(&mut waiter).is_none());
        drop(held); // granted to the waiter, which never looks again
        drop(waiter);
        assert_eq!(gate.free(), 1);
    }

    #[tokio::test]
    async fn an_idle_namespace_banks_no_credit() {
        let gate = FairGate::new(1, None, None);
        let (a, b) = (ns("a"), ns("b"));
        // a runs alone for a while and accumulates use.
        for _ in 0..3 {
            let slot = gate.acquire(&a).await;
            std::thread::sleep(Duration::from_millis(2));
            drop(slot);
        }
        // b arrives: it starts from a's use, so they alternate rather than b taking several turns.
        let held = gate.acquire(&a).await;
        let mut b1 = Box::pin(gate.acquire(&b));
        let mut a1 = Box::pin(gate.acquire(&a));
        assert!(poll_once(&mut b1).is_none() && poll_once(&mut a1).is_none());
        drop(held);
        let b_slot = poll_once(&mut b1).expect("b first: it used less");
        std::thread::sleep(Duration::from_millis(8));
        let mut b2 = Box::pin(gate.acquire(&b));
        assert!(poll_once(&mut b2).is_none());
        drop(b_slot);
        let _a_slot = poll_once(&mut a1).expect("a next: b's one long slice put it past a");
        assert!(poll_once(&mut b2).is_none());
    }

    #[test]
    fn a_namespace_over_the_average_of_the_active_ones_is_over_its_share() {
        let usage = Usage::default();
        let (a, b) = (ns("a"), ns("b"));
        usage.charge(&a, 50_000);
        assert!(!usage.over_share("a"), "alone, a namespace may use the whole host");
        usage.charge(&b, 100);
        assert!(usage.over_share("a"), "a used 50 ms, b 0.1 ms");
        assert!(!usage.over_share("b"));
        assert!(!usage.over_share("c"), "a namespace never seen has used nothing");
        usage.charge(&b, 200_000);
        assert!(usage.over_share("b") && !usage.over_share("a"), "now b has used more");
        let small = Usage::default();
        small.charge(&a, 1_500);
        small.charge(&b, 10);
        assert!(!small.over_share("a"), "below the floor a namespace is never held back");
    }

    #[test]
    fn recent_use_halves_every_half_life() {
        let start = Instant::now();
        let recent = Recent { micros: 8_000.0, at: start };
        let later = recent.now(start + 2 * USAGE_HALF_LIFE);
        assert!((later - 2_000.0).abs() < 1.0, "{later}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_guest_waiting_in_a_host_call_holds_no_slot() {
        let gate = FairGate::new(1, None, None);
        let mut sleeper: GuestFuture<()> = Box::pin(tokio::time::sleep(Duration::from_millis(300)));
        let sleeping = gate.clone();
        let task = tokio::spawn(async move { gated(&sleeping, &ns("a"), &mut sleeper, None).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(gate.free(), 1, "the sleeping guest gave its slot back");
        let slot = gate.acquire(&ns("b")).await;
        drop(slot);
        assert_eq!(task.await.expect("the sleeper finishes"), Some(()));
        assert_eq!(gate.free(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_demoted_guest_finishes_in_the_background_and_a_late_one_is_cancelled() {
        let scheduler = CpuScheduler::new(BackgroundPriority::Idle, None).expect("background pool");
        let demotion = Demotion::default();
        demotion.demote();
        let steps: GuestFuture<u32> = Box::pin(async {
            let mut n = 0;
            for _ in 0..10 {
                tokio::task::yield_now().await;
                n += 1;
            }
            n
        });
        let far = Instant::now() + Duration::from_secs(30);
        assert_eq!(scheduler.run(&ns("a"), &demotion, far, steps).await, (Some(10), true));
        assert_eq!(scheduler.demoted(), 1);
        let never: GuestFuture<u32> = Box::pin(async {
            tokio::task::yield_now().await;
            std::future::pending::<u32>().await
        });
        let soon = Instant::now() + Duration::from_millis(100);
        assert!(matches!("idle".parse(), Ok(BackgroundPriority::Idle)));
        assert!(matches!("10".parse(), Ok(BackgroundPriority::Nice(10))));
        assert!("20".parse::<BackgroundPriority>().is_err_and(|e| e.contains("0 to 19")));
        assert_eq!(scheduler.run(&ns("a"), &demotion, soon, never).await, (None, true), "past its deadline the guest is abandoned");
        // A guest that finishes in the foreground never reaches the pool.
        let quick: GuestFuture<u32> = Box::pin(async { 7 });
        assert_eq!(scheduler.run(&ns("a"), &Demotion::default(), far, quick).await, (Some(7), false));
        assert_eq!(scheduler.demoted(), 2);
    }
}
