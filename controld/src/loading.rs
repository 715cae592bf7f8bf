//! Controlled server loading: each backend's effective `max_conns` follows
//! the back-end latency the switches measure, so a server is kept below the
//! concurrency at which its response time collapses.
//!
//! **What is measured.** In NAT mode a switch sees a connection's SYN and
//! the backend's SYN-ACK; the time between them (ms) is folded into the
//! backend's shared counters, and counted *slow* when it exceeds the
//! service's `latency_target_ms` (see `shm_layout::switch_slot::BackendCounters`).
//! A server that keeps up answers a SYN at once (its kernel does); one that
//! falls behind stops accepting, its listen queue overflows, its kernel
//! drops SYNs and the client retransmits them a second or more later.
//!
//! **The rule** ([`adjust`]), per backend with `max_conns` in a service with
//! `latency_target_ms`, once per `adjust_interval_ms`, over the samples of
//! that interval:
//! - no sample: the limit stays;
//! - any sample slow (the interval's slowest SYN-ACK took longer than the
//!   target): multiplicative decrease, `limit ← max(floor, min(limit − 1,
//!   ⌊0.7 · limit⌋))`. Any, not a share: a server past its knee answers
//!   most SYNs at once and drops a few (those that find its listen queue
//!   full), so a late SYN-ACK is the signal however many fast ones there
//!   are;
//! - otherwise, if the backend's open connections reached the limit during
//!   the interval (the limit was what held it back): additive increase,
//!   `limit ← min(max_conns, limit + 1)`; if they did not, the limit stays
//!   (no evidence that more would be fine).
//!
//! `floor` is the service's `min_conns` (at most the backend's `max_conns`).
//! A backend starts at its configured `max_conns`; a reload keeps its
//! limit (clamped to a changed `max_conns`). Pure but for the clock the
//! caller passes in; [`Loading::tick`] reads the region's counters.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use core::sync::atomic::Ordering;
use shm_layout::switch_slot::BackendCounters;

use crate::config::Config;
use crate::ids::BackendIdentity;

/// Multiplicative decrease factor, in tenths.
pub const DECREASE_TENTHS: u64 = 7;

/// One judgement of a limit (see the module docs): `samples` and `slow`
/// are the interval's SYN-ACK samples and those above the target,
/// `peak_active` the most open connections seen in it.
pub fn adjust(limit: u32, max_conns: u32, floor: u32, samples: u64, slow: u64, peak: u32) -> u32 {
    let floor = floor.min(max_conns).max(1);
    if samples == 0 {
        return limit.clamp(floor, max_conns);
    }
    if slow > 0 {
        let down = (u64::from(limit) * DECREASE_TENTHS / 10) as u32;
        return down.min(limit.saturating_sub(1)).max(floor);
    }
    if peak >= limit {
        return limit.saturating_add(1).min(max_conns);
    }
    limit.clamp(floor, max_conns)
}

/// Cumulative SYN-ACK counters of a backend as last read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Seen {
    count: u64,
    slow: u64,
    sum_ms: u64,
}

#[derive(Debug)]
struct Tracked {
    limit: u32,
    max_conns: u32,
    floor: u32,
    interval: Duration,
    due: Instant,
    /// Counters at the start of the interval (`None` until first read).
    seen: Option<Seen>,
    peak: u32,
}

/// A limit change, for logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub backend: BackendIdentity,
    pub from: u32,
    pub to: u32,
    pub samples: u64,
    pub slow: u64,
    pub mean_ms: u64,
}

/// The adaptive limits of every backend under controlled loading.
#[derive(Debug, Default)]
pub struct Loading {
    tracked: HashMap<BackendIdentity, Tracked>,
}

impl Loading {
    pub fn new() -> Self {
        Self::default()
    }

    /// Follows a (re)loaded configuration: starts tracking new backends at
    /// their `max_conns`, keeps the limits of known ones (clamped to a
    /// changed `max_conns` and floor), forgets departed ones.
    pub fn configure(&mut self, cfg: &Config, now: Instant) {
        let mut next = HashMap::new();
        for s in &cfg.services {
            let Some(l) = s.loading else { continue };
            for b in s.backends.iter().filter(|b| b.max_conns > 0) {
                let ident = BackendIdentity::of(s, b);
                let interval = Duration::from_millis(u64::from(l.interval_ms));
                let floor = l.min_conns.min(b.max_conns);
                let t = match self.tracked.remove(&ident) {
                    Some(mut t) => {
                        t.limit = t.limit.clamp(floor, b.max_conns);
                        t.max_conns = b.max_conns;
                        t.floor = floor;
                        t.interval = interval;
                        t
                    }
                    None => Tracked {
                        limit: b.max_conns,
                        max_conns: b.max_conns,
                        floor,
                        interval,
                        due: now + interval,
                        seen: None,
                        peak: 0,
                    },
                };
                next.insert(ident, t);
            }
        }
        self.tracked = next;
    }

    /// The effective limit of a backend, if it is under controlled loading.
    pub fn limit(&self, b: &BackendIdentity) -> Option<u32> {
        self.tracked.get(b).map(|t| t.limit)
    }

    /// Reads each tracked backend's counters (`counters(identity)`; `None`
    /// for a backend without an id yet), notes its peak of open
    /// connections, and judges the backends whose interval ended. Returns
    /// the limits that changed (republish when not empty).
    pub fn tick<'a>(
        &mut self,
        now: Instant,
        counters: impl Fn(&BackendIdentity) -> Option<&'a BackendCounters>,
    ) -> Vec<Change> {
        let mut changes = Vec::new();
        for (ident, t) in &mut self.tracked {
            let Some(c) = counters(ident) else { continue };
            let cur = Seen {
                count: c.syn_ack_count.load(Ordering::Relaxed),
                slow: c.syn_ack_slow.load(Ordering::Relaxed),
                sum_ms: c.syn_ack_sum_ms.load(Ordering::Relaxed),
            };
            t.peak = t.peak.max(c.active.load(Ordering::Relaxed));
            let Some(seen) = t.seen else {
                t.seen = Some(cur);
                t.due = now + t.interval;
                continue;
            };
            if now < t.due {
                continue;
            }
            let samples = cur.count.wrapping_sub(seen.count);
            let slow = cur.slow.wrapping_sub(seen.slow);
            let next = adjust(t.limit, t.max_conns, t.floor, samples, slow, t.peak);
            if next != t.limit {
                changes.push(Change {
                    backend: *ident,
                    from: t.limit,
                    to: next,
                    samples,
                    slow,
                    mean_ms: cur.sum_ms.wrapping_sub(seen.sum_ms) / samples.max(1),
                });
                t.limit = next;
            }
            t.seen = Some(cur);
            t.peak = 0;
            t.due = now + t.interval;
        }
        changes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rule_decreases_multiplicatively_and_increases_additively() {
        // No samples: no evidence, no change.
        assert_eq!(adjust(10, 64, 1, 0, 0, 64), 10);
        // A sample above the target: x0.7, at least one less, never below the floor.
        assert_eq!(adjust(64, 64, 1, 1000, 1, 64), 44);
        assert_eq!(adjust(3, 64, 1, 10, 1, 3), 2);
        assert_eq!(adjust(2, 64, 1, 10, 1, 3), 1);
        assert_eq!(adjust(1, 64, 1, 10, 10, 3), 1);
        assert_eq!(adjust(10, 64, 8, 10, 10, 10), 8);
        // Fine and the limit was reached: +1, never above max_conns.
        assert_eq!(adjust(10, 64, 1, 50, 0, 10), 11);
        assert_eq!(adjust(64, 64, 1, 50, 0, 64), 64);
        // Fine but the limit was not reached: stays.
        assert_eq!(adjust(10, 64, 1, 50, 0, 9), 10);
        // A floor above max_conns yields to max_conns.
        assert_eq!(adjust(4, 4, 8, 10, 10, 4), 4);
    }

    /// A server that answers SYNs late once more than `k` connections are
    /// open: AIMD climbs to just above `k`, backs off, and stays within
    /// [0.7·(k+1), k+1] once it got there.
    #[test]
    fn the_rule_settles_around_the_knee_of_a_server() {
        let k = 12u32;
        let mut limit = 64;
        let mut seen = Vec::new();
        for _ in 0..200 {
            // Demand always exceeds the limit: the limit is reached; the
            // server's SYN-ACKs are late iff more than k are open.
            let slow = if limit > k { 5 } else { 0 };
            limit = adjust(limit, 64, 1, 100, slow, limit);
            seen.push(limit);
        }
        let tail = &seen[20..];
        assert!(tail.iter().all(|&l| (9..=13).contains(&l)), "{tail:?}");
        assert!(tail.contains(&13) && tail.contains(&9));
    }

    #[test]
    fn tracking_follows_intervals_reloads_and_counters() {
        let text = "instance = \"t\"\n\
            [[port]]\nname = \"p\"\ndriver = \"vnic\"\nmac = \"02:00:00:00:00:01\"\n\
            [[switch]]\nname = \"s\"\ncpu = 0\nports = [\"p\"]\n\
            [[service]]\nname = \"web\"\nvip = \"198.18.0.10\"\nport = 80\nprotocol = \"tcp\"\n\
            latency_target_ms = 50\nadjust_interval_ms = 100\nmin_conns = 2\n\
            [[service.backend]]\nname = \"a\"\naddress = \"198.19.1.1\"\nmax_conns = 10\n\
            [[service.backend]]\nname = \"b\"\naddress = \"198.19.1.2\"\n";
        let cfg = crate::config::parse(text).unwrap();
        let t0 = Instant::now();
        let mut l = Loading::new();
        l.configure(&cfg, t0);
        let a = BackendIdentity {
            vip: "198.18.0.10".parse().unwrap(),
            vport: 80,
            proto: 6,
            addr: "198.19.1.1".parse().unwrap(),
            port: 80,
        };
        let b = BackendIdentity {
            addr: "198.19.1.2".parse().unwrap(),
            ..a
        };
        assert_eq!((l.limit(&a), l.limit(&b)), (Some(10), None));
        // SAFETY: BackendCounters is atomics and padding, valid all-zero.
        let c: BackendCounters = unsafe { core::mem::zeroed() };
        let at = |ms| t0 + Duration::from_millis(ms);
        assert!(l.tick(at(0), |_| Some(&c)).is_empty(), "first read");
        c.active.store(10, Ordering::Relaxed);
        c.syn_ack_count.store(20, Ordering::Relaxed);
        c.syn_ack_slow.store(3, Ordering::Relaxed);
        c.syn_ack_sum_ms.store(3100, Ordering::Relaxed);
        assert!(l.tick(at(50), |_| Some(&c)).is_empty(), "interval not over");
        let ch = l.tick(at(100), |_| Some(&c));
        assert_eq!(
            ch,
            [Change {
                backend: a,
                from: 10,
                to: 7,
                samples: 20,
                slow: 3,
                mean_ms: 155
            }]
        );
        // A quiet interval changes nothing; then fast samples at the limit: +1.
        assert!(l.tick(at(200), |_| Some(&c)).is_empty());
        c.active.store(7, Ordering::Relaxed);
        c.syn_ack_count.store(40, Ordering::Relaxed);
        assert_eq!(l.tick(at(300), |_| Some(&c))[0].to, 8);
        // A reload lowering max_conns clamps the limit; the floor holds.
        let cfg = crate::config::parse(&text.replace("max_conns = 10", "max_conns = 5")).unwrap();
        l.configure(&cfg, at(300));
        assert_eq!(l.limit(&a), Some(5));
        c.syn_ack_count.store(140, Ordering::Relaxed);
        c.syn_ack_slow.store(100, Ordering::Relaxed);
        assert_eq!(l.tick(at(400), |_| Some(&c))[0].to, 3);
        c.syn_ack_count.store(240, Ordering::Relaxed);
        c.syn_ack_slow.store(200, Ordering::Relaxed);
        assert_eq!(l.tick(at(500), |_| Some(&c))[0].to, 2);
        c.syn_ack_count.store(340, Ordering::Relaxed);
        c.syn_ack_slow.store(300, Ordering::Relaxed);
        assert!(l.tick(at(600), |_| Some(&c)).is_empty(), "at min_conns");
        // Without latency_target_ms nothing is tracked.
        let cfg = crate::config::parse(
            &text
                .replace("latency_target_ms = 50\n", "")
                .replace("adjust_interval_ms = 100\nmin_conns = 2\n", ""),
        )
        .unwrap();
        l.configure(&cfg, at(600));
        assert_eq!(l.limit(&a), None);
    }
}
