//! Drains the switches' event rings (mid-connection recoveries today).
//!
//! Each switch is the single producer of its ring (`shm_layout::ring`):
//! it pushes a record once and, when the ring is full, drops it and counts
//! it in the ring's `dropped`. The drain takes every record published in
//! every switch's ring, in each ring's order, so nothing a switch pushed
//! is lost however often the ring wraps, as long as controld drains before
//! a ring fills (64 ticks a second against `ring_slots` records).

use shm_layout::Region;
use shm_layout::ring::EVENT_MIDFLOW;

/// Counts events and logs them at a bounded rate.
#[derive(Debug, Default)]
pub struct EventDrain {
    pub midflow: u64,
    logged_at: Option<std::time::Instant>,
}

impl EventDrain {
    pub fn drain(&mut self, region: &Region) {
        self.drain_each(region, |_, _| {});
    }

    /// [`drain`](Self::drain), also handing each record to `f` with the
    /// index of the switch whose ring it came from, in ring order.
    pub fn drain_each(&mut self, region: &Region, mut f: impl FnMut(usize, [u64; 4])) {
        let mut new = 0;
        for s in 0..region.caps().switches as usize {
            let ring = region.ring(s);
            while let Some(rec) = ring.pop() {
                if rec[0] & 0xffff_ffff == EVENT_MIDFLOW {
                    new += 1;
                }
                f(s, rec);
            }
        }
        self.midflow += new;
        if new > 0 && self.logged_at.is_none_or(|t| t.elapsed().as_secs() >= 10) {
            log::info!(
                "{new} connection(s) recovered from mid-connection packets ({} since start)",
                self.midflow
            );
            self.logged_at = Some(std::time::Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shm_layout::Capacities;
    use shm_layout::conntrack::Conn;
    use shm_layout::ring::midflow_event;
    use shm_layout::shm::Mapping;
    use std::sync::atomic::Ordering;

    struct Temp(Region, String);

    impl Drop for Temp {
        fn drop(&mut self) {
            let _ = Mapping::unlink(&self.1);
        }
    }

    const SLOTS: u64 = 64;

    fn temp(tag: &str) -> Temp {
        let inst = format!("events-{tag}-{}", std::process::id());
        let caps = Capacities {
            backends: 16,
            backend_ids: 16,
            conn_slots: 1 << 10,
            maglev_m: 251,
            switches: 3,
            ring_slots: SLOTS as u32,
            ..Capacities::default()
        };
        Temp(
            Region::create(&inst, caps).unwrap(),
            shm_layout::region_name(&inst),
        )
    }

    /// Event `i` of switch `s`: a mid-flow recovery, except every fifth,
    /// which is of a kind the drain does not know (taken off, not counted).
    fn event(s: usize, i: u64) -> [u64; 4] {
        if i % 5 == 4 {
            return [7 | (i << 32), s as u64, i, !i];
        }
        let c = Conn {
            backend_id: i as u32,
            client_ip: s as u32,
            client_port: (i % 60_000) as u16,
            ..Conn::default()
        };
        midflow_event(&c, i as u32)
    }

    fn dropped(r: &Region, s: usize) -> u64 {
        r.ring(s).header.dropped.load(Ordering::Relaxed)
    }

    /// Two switches push 50 rings' worth of events each, from their own
    /// threads, while controld's drain runs: every event arrives, in each
    /// switch's order, none dropped (a producer waits for room rather than
    /// dropping, so a loss could only be the drain's), and the mid-flow
    /// count is exact.
    #[test]
    fn every_event_is_drained_in_order_across_wraps() {
        let t = temp("order");
        let r = &t.0;
        let n = 50 * SLOTS;
        let mut drain = EventDrain::default();
        let mut got: [Vec<[u64; 4]>; 3] = Default::default();
        std::thread::scope(|sc| {
            for s in [0usize, 2] {
                sc.spawn(move || {
                    let ring = r.ring(s);
                    for i in 0..n {
                        // Bounded: the drain below empties the rings.
                        for _ in 0..10_000_000u64 {
                            if ring.len() < SLOTS {
                                break;
                            }
                            std::thread::yield_now();
                        }
                        assert!(ring.push(event(s, i)));
                    }
                });
            }
            for _ in 0..10_000_000u64 {
                drain.drain_each(r, |s, rec| got[s].push(rec));
                if got[0].len() as u64 == n && got[2].len() as u64 == n {
                    break;
                }
                std::thread::yield_now();
            }
        });
        for s in [0usize, 2] {
            let want: Vec<_> = (0..n).map(|i| event(s, i)).collect();
            assert_eq!(got[s], want, "switch {s}");
            assert_eq!(dropped(r, s), 0);
            assert!(
                r.ring(s).header.tail.load(Ordering::Relaxed) > SLOTS,
                "wrapped"
            );
        }
        assert!(got[1].is_empty());
        assert_eq!(drain.midflow, 2 * (n - n / 5));
        // Nothing more comes.
        drain.drain_each(r, |_, _| panic!("drained twice"));
        assert_eq!(drain.midflow, 2 * (n - n / 5));
    }

    /// A ring left undrained fills: the switch's pushes past its capacity
    /// fail and count in `dropped`; the drain then takes the oldest
    /// `ring_slots` events in order, and the ring takes events again.
    #[test]
    fn a_full_ring_counts_what_it_drops_and_keeps_the_oldest() {
        let t = temp("full");
        let r = &t.0;
        let ring = r.ring(1);
        let pushed: Vec<bool> = (0..SLOTS + 7).map(|i| ring.push(event(1, i))).collect();
        assert!(pushed[..SLOTS as usize].iter().all(|&p| p));
        assert!(pushed[SLOTS as usize..].iter().all(|&p| !p));
        assert_eq!(dropped(r, 1), 7);
        let mut drain = EventDrain::default();
        let mut got = Vec::new();
        drain.drain_each(r, |s, rec| got.push((s, rec)));
        let want: Vec<_> = (0..SLOTS).map(|i| (1, event(1, i))).collect();
        assert_eq!(got, want);
        assert_eq!(drain.midflow, SLOTS - SLOTS / 5);
        assert!(ring.push(event(1, 1000)));
        assert_eq!(dropped(r, 1), 7);
        got.clear();
        drain.drain_each(r, |s, rec| got.push((s, rec)));
        assert_eq!(got, vec![(1, event(1, 1000))]);
    }
}
