//! The autoscaler's decision: how many replicas a service should run, given
//! the load it has seen and its [`Autoscale`] policy, in the manner of
//! Knative's KPA. Pure: time comes in as `now_ms`, load as samples the
//! caller records, and the answer is a [`Decision`] the caller applies.
//!
//! # How it decides
//!
//! The caller records the service's total load (summed over its ready
//! replicas, plus requests the activator holds for a service with none)
//! with [`Autoscaler::observe`], and asks [`Autoscaler::decide`] for a
//! count, typically every controller pass.
//!
//! - **Two windows.** The load (in flight or per second, whichever target
//!   the policy names) is averaged over the *stable window* (default 30s)
//!   and over the *panic window*, a tenth of it. Each average divided by the
//!   target, rounded up, is a wanted count.
//! - **Panic.** When the panic window wants at least twice the replicas
//!   running (counting zero as one), the service is *panicking*: it follows
//!   the panic window, which reacts to a burst within seconds, and never
//!   scales down. Panic ends once a whole stable window passes without
//!   that condition.
//! - **Up at once, down slowly.** A higher count is returned at once. A
//!   lower one only once counts below the current one have been wanted
//!   without a break for `scale_down_delay`, and then the highest count
//!   wanted during that delay (a moving maximum, as Knative's scale-down
//!   delay). Any wanted count at or above the current one resets the wait.
//! - **Zero.** With `min: 0`, the last replica stops once the load has been
//!   exactly zero (nothing in flight, no requests per second) in every
//!   sample for `scale_to_zero_after`; that idle time is its own hysteresis,
//!   so the scale-down delay does not add to it. Until then one replica
//!   stays. From zero, any load (such as requests held by the activator)
//!   wants at least one replica at once.
//! - The result is clamped to `min..=max`; a count above a lowered `max`
//!   drops at once, since that is the policy's doing, not the load's. With
//!   no sample in the stable window, the current count is kept (clamped).
//!
//! # Trade-offs
//!
//! Averages make the count follow load smoothly and ignore flapping input
//! (load alternating between samples), at the price of lag: a step up that
//! is less than twice the current count is reached only as the stable
//! average catches up (half a window for the midpoint), while larger steps
//! trip the panic window and are reached within it. Samples are weighted
//! equally, so they should come at a steady pace. A host that vanishes
//! takes its share of the load out of the samples; the averages and the
//! scale-down delay keep that from removing replicas at once, and if the
//! host comes back within the window nothing changes. Scaling down late
//! costs idle replicas; scaling down early costs cold starts and queued
//! requests, which is why the asymmetry.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;
use wharf_proto::ServiceId;
use wharf_proto::spec::{Autoscale, AutoscaleTarget, MAX_AUTOSCALE_WINDOW};
use wharf_proto::units::format_duration;

/// The autoscaler's memory: per service, the recent load samples and the
/// state of its panic and scale-down windows. Decisions are pure functions
/// of what was observed and `now_ms`.
#[derive(Debug, Default)]
pub struct Autoscaler {
    services: BTreeMap<ServiceId, History>,
}

/// What [`Autoscaler::decide`] recommends, and why.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    /// The replica count the service should run.
    pub replicas: u32,
    /// Why, in a sentence for status output and logs.
    pub reason: String,
    /// The load averaged over the stable window (in flight or per second,
    /// after the policy's target); 0 with no samples.
    pub stable_load: f64,
    /// The load averaged over the panic window; 0 with no samples.
    pub panic_load: f64,
    /// Whether the service is in panic mode (see the module docs).
    pub panicking: bool,
}

/// One service's recent history.
#[derive(Debug)]
struct History {
    /// Load samples, oldest first, no older than `keep_ms`.
    samples: VecDeque<Sample>,
    /// How long samples are kept: the stable window of the last policy
    /// decided with, the longest allowed before the first decision.
    keep_ms: u64,
    /// Since when every sample has shown no load at all.
    idle_since: Option<u64>,
    /// While panicking: the last time the panic condition held, and the
    /// highest count decided since panic began (panic never scales down).
    panic: Option<Panic>,
    /// Since when every wanted count has been below the current one.
    lower_since: Option<u64>,
    /// The counts wanted (clamped, before the delay) in the last
    /// `scale_down_delay`, oldest first.
    wanted: VecDeque<(u64, u32)>,
}

#[derive(Clone, Copy, Debug)]
struct Sample {
    at_ms: u64,
    in_flight: f64,
    rps: f64,
}

#[derive(Clone, Copy, Debug)]
struct Panic {
    last_burst_ms: u64,
    replicas: u32,
}

impl History {
    fn new() -> Self {
        History {
            samples: VecDeque::new(),
            keep_ms: millis(MAX_AUTOSCALE_WINDOW),
            idle_since: None,
            panic: None,
            lower_since: None,
            wanted: VecDeque::new(),
        }
    }

    fn trim(&mut self, now_ms: u64) {
        while let Some(oldest) = self.samples.front()
            && now_ms.saturating_sub(oldest.at_ms) >= self.keep_ms
        {
            self.samples.pop_front();
        }
    }

    /// The mean of `metric` over the samples younger than `window_ms`, if any.
    fn average(&self, now_ms: u64, window_ms: u64, metric: fn(&Sample) -> f64) -> Option<f64> {
        let (sum, count) = self
            .samples
            .iter()
            .rev()
            .take_while(|s| now_ms.saturating_sub(s.at_ms) < window_ms)
            .fold((0.0, 0u32), |(sum, count), s| (sum + metric(s), count + 1));
        (count > 0).then(|| sum / f64::from(count))
    }
}

impl Autoscaler {
    /// An autoscaler that has seen nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records the service's total load (summed over ready replicas/hosts)
    /// at `now_ms`: requests in flight, including any the activator holds
    /// while the service has no ready replica, and requests per second.
    /// Negative or NaN values count as 0. Samples should come in time order
    /// and at a steady pace, since each weighs the same in the averages.
    pub fn observe(&mut self, service: &ServiceId, now_ms: u64, in_flight: f64, rps: f64) {
        let history = self
            .services
            .entry(service.clone())
            .or_insert_with(History::new);
        // `f64::max` returns the other operand for NaN.
        let sample = Sample {
            at_ms: now_ms,
            in_flight: in_flight.max(0.0),
            rps: rps.max(0.0),
        };
        if sample.in_flight == 0.0 && sample.rps == 0.0 {
            history.idle_since.get_or_insert(now_ms);
        } else {
            history.idle_since = None;
        }
        history.samples.push_back(sample);
        history.trim(now_ms);
    }

    /// The replica count `service` should run at `now_ms` under `policy`,
    /// given that `current` replicas run (or are asked for) now. Requests
    /// held by the activator for a service with no ready replica count as
    /// in-flight demand: the caller includes them in [`Autoscaler::observe`].
    pub fn decide(
        &mut self,
        service: &ServiceId,
        policy: &Autoscale,
        now_ms: u64,
        current: u32,
    ) -> Decision {
        let history = self
            .services
            .entry(service.clone())
            .or_insert_with(History::new);
        let stable_ms = millis(policy.stable_window);
        let panic_ms = millis(policy.panic_window()).max(1);
        history.keep_ms = stable_ms;
        history.trim(now_ms);
        let (metric, unit): (fn(&Sample) -> f64, _) = match policy.target() {
            AutoscaleTarget::Concurrency(_) => (|s| s.in_flight, "in flight"),
            AutoscaleTarget::Rps(_) => (|s| s.rps, "requests/s"),
        };
        let clamp = |n: u32| n.clamp(policy.min, policy.max);

        let Some(stable_load) = history.average(now_ms, stable_ms, metric) else {
            let replicas = clamp(current);
            return Decision {
                replicas,
                reason: format!(
                    "no load seen in the last {}: keeping {replicas}",
                    format_duration(policy.stable_window)
                ),
                stable_load: 0.0,
                panic_load: 0.0,
                panicking: history.panic.is_some(),
            };
        };
        let panic_load = history
            .average(now_ms, panic_ms, metric)
            .unwrap_or(stable_load);
        let target = f64::from(policy.target().value());
        let stable_want = replicas_for(stable_load, target);
        let panic_want = replicas_for(panic_load, target);

        // Zero replicas count as one here, so that a burst from zero panics
        // too and is met within the panic window.
        let burst = u64::from(panic_want) >= 2 * u64::from(current.max(1));
        if burst {
            let panic = history.panic.get_or_insert(Panic {
                last_burst_ms: now_ms,
                replicas: 0,
            });
            panic.last_burst_ms = now_ms;
        } else if history
            .panic
            .is_some_and(|p| now_ms.saturating_sub(p.last_burst_ms) >= stable_ms)
        {
            history.panic = None;
        }

        let target_text = format!("target {target} {unit} per replica");
        let (want, mut reason) = match &mut history.panic {
            Some(panic) => {
                let want = panic_want.max(current).max(panic.replicas);
                let reason = format!(
                    "panicking: {panic_load:.1} {unit} over the last {} wants {panic_want} at \
                     {target_text}; not scaling down until {} pass without a burst",
                    format_duration(policy.panic_window()),
                    format_duration(policy.stable_window),
                );
                (want, reason)
            }
            None => {
                let reason = format!(
                    "{stable_load:.1} {unit} over the last {} wants {stable_want} at {target_text}",
                    format_duration(policy.stable_window),
                );
                (stable_want, reason)
            }
        };

        let idle_ms = history.idle_since.map(|since| now_ms.saturating_sub(since));
        let to_zero = policy.min == 0
            && history.panic.is_none()
            && idle_ms.is_some_and(|idle| idle >= millis(policy.scale_to_zero_after));
        let want = if to_zero {
            reason = format!(
                "no load for {}: scaling to zero",
                format_duration(Duration::from_millis(idle_ms.unwrap_or_default()))
            );
            0
        } else if want == 0 && current > 0 {
            reason.push_str(&format!(
                "; keeping one replica until idle for {}",
                format_duration(policy.scale_to_zero_after)
            ));
            1
        } else {
            want
        };
        let clamped = clamp(want);
        if let Some(panic) = &mut history.panic {
            panic.replicas = clamped;
        }
        if clamped != want {
            reason.push_str(&format!("; clamped to {}..={}", policy.min, policy.max));
        }

        let delay_ms = millis(policy.scale_down_delay);
        history.wanted.push_back((now_ms, clamped));
        while let Some(&(at, _)) = history.wanted.front()
            && now_ms.saturating_sub(at) > delay_ms
        {
            history.wanted.pop_front();
        }
        let replicas = if to_zero || clamped >= current || current > policy.max {
            history.lower_since = None;
            clamped
        } else {
            let since = *history.lower_since.get_or_insert(now_ms);
            if now_ms.saturating_sub(since) >= delay_ms {
                // Every count wanted since `since` was below `current`, so
                // the highest of the last delay is too.
                let highest = history.wanted.iter().map(|&(_, n)| n).max();
                highest.unwrap_or(clamped)
            } else {
                reason.push_str(&format!(
                    "; keeping {current} until a lower count has been wanted for {}",
                    format_duration(policy.scale_down_delay)
                ));
                current
            }
        };

        Decision {
            replicas,
            reason,
            stable_load,
            panic_load,
            panicking: history.panic.is_some(),
        }
    }

    /// Drops everything known about `service`, e.g. once it is deleted.
    pub fn forget(&mut self, service: &ServiceId) {
        self.services.remove(service);
    }
}

/// The replicas `load` needs at `target` per replica, rounded up. A hair
/// is taken off first so that an average such as 20.000000000000004 over a
/// target of 10 wants 2, not 3.
fn replicas_for(load: f64, target: f64) -> u32 {
    // `as` saturates, which is what a huge load should do before clamping.
    (load / target - 1e-9).ceil().max(0.0) as u32
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
