//! Which backend of a pool gets a request: the pool's scheduler over the
//! master's backend records (ids, effective weights, DOWN and drained
//! flags, effective `max_conns`: the same records the switches schedule
//! L4 connections with) and the live active counts.
//!
//! A backend is *eligible* when its effective weight is above 0 (not
//! drained) and it is not DOWN; it can take the request when it is also
//! below its `max_conns` (0: no limit). The pick reserves one connection
//! slot on the chosen backend through [`Conns::reserve`] (in the region: a
//! compare-and-swap on the shared active count, the one the switches use,
//! so a limit holds across L4 and l7); whoever ends the connection (the
//! switch, on close or when it drops a stale decision) releases it.
//! - `wrr`: smooth weighted round robin (nginx's, as the switches' L4
//!   `wrr`): over `W` consecutive picks (the sum of the weights of the
//!   backends that can take a request) each gets exactly its weight,
//!   interleaved.
//! - `wlc`: the fewest active connections per weight
//!   (`active_i · w_j < active_j · w_i`); ties go to the first in file order.
//!
//! When no backend of the pool is eligible, or every eligible one is at
//! its limit, the request gets 503.

use std::net::Ipv4Addr;

use shm_layout::config_slot::{BACKEND_DOWN, BACKEND_DRAINED, BackendRec};
use shm_layout::switch_slot::{self, BackendCounters};

use super::HttpReject;
use crate::config::PoolScheduler;

/// The live connection counts of backends, by backend id.
pub trait Conns {
    /// Active connections of backend `id` (0 for an unknown id).
    fn active(&self, id: u32) -> u32;
    /// Takes one connection slot of backend `id` if it holds fewer than
    /// `max` (0: no limit); false, changing nothing, otherwise.
    fn reserve(&self, id: u32, max: u32) -> bool;
}

/// The region's backend counters, indexed by id.
impl Conns for [BackendCounters] {
    fn active(&self, id: u32) -> u32 {
        self.get(id as usize)
            .map_or(0, |c| c.active.load(std::sync::atomic::Ordering::Relaxed))
    }

    fn reserve(&self, id: u32, max: u32) -> bool {
        self.get(id as usize)
            .is_some_and(|c| switch_slot::reserve(c, max))
    }
}

/// The backend a request goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Picked {
    /// Its stable id (the index of its counters).
    pub id: u32,
    pub ip: Ipv4Addr,
    pub port: u16,
}

/// No backend of the pool is eligible (all DOWN, drained, or none).
pub const NO_BACKEND: HttpReject = HttpReject::new(503, "no backend available");
/// Every eligible backend of the pool is at its `max_conns`.
pub const ALL_FULL: HttpReject = HttpReject::new(503, "every backend is at its connection limit");

/// Re-scans after losing a reservation race this many times at most.
const ATTEMPTS: usize = 4;

/// One pool's scheduler and its state.
#[derive(Debug, Clone)]
pub struct PoolPicker {
    scheduler: PoolScheduler,
    /// Indexes of the pool's backends into the service's records.
    members: Vec<usize>,
    /// `wrr` credits, one per member.
    credit: Vec<i64>,
}

impl PoolPicker {
    pub fn new(scheduler: PoolScheduler, members: Vec<usize>) -> Self {
        let credit = vec![0; members.len()];
        PoolPicker {
            scheduler,
            members,
            credit,
        }
    }

    /// Picks and reserves a backend among `recs[members]`.
    pub fn pick(
        &mut self,
        recs: &[BackendRec],
        conns: &(impl Conns + ?Sized),
    ) -> Result<Picked, HttpReject> {
        for _ in 0..ATTEMPTS {
            let k = match self.scheduler {
                PoolScheduler::Wrr => self.wrr(recs, conns)?,
                PoolScheduler::Wlc => self.wlc(recs, conns)?,
            };
            let b = &recs[self.members[k]];
            if conns.reserve(b.id, b.max_conns) {
                return Ok(Picked {
                    id: b.id,
                    ip: Ipv4Addr::from(b.ip),
                    port: b.port,
                });
            }
            // Another process took its last slot: look again.
        }
        Err(ALL_FULL)
    }

    /// The eligible members, and whether each can take one more.
    fn candidates<'a>(
        &'a self,
        recs: &'a [BackendRec],
        conns: &'a (impl Conns + ?Sized),
    ) -> impl Iterator<Item = (usize, &'a BackendRec, u32)> + 'a {
        self.members.iter().enumerate().filter_map(move |(k, &i)| {
            let b = recs.get(i)?;
            eligible(b).then(|| (k, b, conns.active(b.id)))
        })
    }

    fn wrr(
        &mut self,
        recs: &[BackendRec],
        conns: &(impl Conns + ?Sized),
    ) -> Result<usize, HttpReject> {
        let mut any = false;
        let mut total = 0i64;
        let mut best: Option<usize> = None;
        let open: Vec<(usize, i64)> = self
            .candidates(recs, conns)
            .inspect(|_| any = true)
            .filter(|(_, b, a)| b.max_conns == 0 || *a < b.max_conns)
            .map(|(k, b, _)| (k, i64::from(b.weight)))
            .collect();
        for (k, w) in open {
            self.credit[k] += w;
            total += w;
            if best.is_none_or(|j| self.credit[k] > self.credit[j]) {
                best = Some(k);
            }
        }
        match best {
            None if !any => Err(NO_BACKEND),
            None => Err(ALL_FULL),
            Some(k) => {
                self.credit[k] -= total;
                Ok(k)
            }
        }
    }

    fn wlc(&self, recs: &[BackendRec], conns: &(impl Conns + ?Sized)) -> Result<usize, HttpReject> {
        let mut any = false;
        let mut best: Option<(usize, u64, u64)> = None;
        for (k, b, a) in self.candidates(recs, conns) {
            any = true;
            if b.max_conns != 0 && a >= b.max_conns {
                continue;
            }
            let (a, w) = (u64::from(a), u64::from(b.weight));
            if best.is_none_or(|(_, ba, bw)| a * bw < ba * w) {
                best = Some((k, a, w));
            }
        }
        match best {
            None if !any => Err(NO_BACKEND),
            None => Err(ALL_FULL),
            Some((k, _, _)) => Ok(k),
        }
    }
}

/// Not drained (weight above 0) and not DOWN.
fn eligible(b: &BackendRec) -> bool {
    b.weight > 0 && b.flags & (BACKEND_DOWN | BACKEND_DRAINED) == 0
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::collections::HashMap;

    /// Active counts in a map; `reserve` bumps them, as the region does.
    #[derive(Default)]
    pub(crate) struct FakeConns(pub RefCell<HashMap<u32, u32>>);

    impl Conns for FakeConns {
        fn active(&self, id: u32) -> u32 {
            self.0.borrow().get(&id).copied().unwrap_or(0)
        }
        fn reserve(&self, id: u32, max: u32) -> bool {
            let mut m = self.0.borrow_mut();
            let a = m.entry(id).or_default();
            if max != 0 && *a >= max {
                return false;
            }
            *a += 1;
            true
        }
    }

    /// Records with ids 10, 11, ... and these weights.
    fn recs(weights: &[u32]) -> Vec<BackendRec> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &w)| BackendRec {
                id: 10 + i as u32,
                ip: u32::from(Ipv4Addr::new(198, 19, 1, 1 + i as u8)),
                port: 8080,
                weight: w,
                flags: if w == 0 { BACKEND_DRAINED } else { 0 },
                ..Default::default()
            })
            .collect()
    }

    fn ids(p: &mut PoolPicker, recs: &[BackendRec], conns: &FakeConns, n: usize) -> Vec<u32> {
        (0..n).map(|_| p.pick(recs, conns).unwrap().id).collect()
    }

    #[test]
    fn wrr_gives_each_backend_exactly_its_weight_smoothly() {
        let r = recs(&[5, 1, 1]);
        let mut p = PoolPicker::new(PoolScheduler::Wrr, vec![0, 1, 2]);
        let c = FakeConns::default();
        // nginx's smooth interleave of {5, 1, 1}: a a b a c a a.
        assert_eq!(ids(&mut p, &r, &c, 7), [10, 10, 11, 10, 12, 10, 10]);
        ids(&mut p, &r, &c, 693);
        assert_eq!(c.active(10), 500);
        assert_eq!(c.active(11), 100);
        assert_eq!(c.active(12), 100);
    }

    #[test]
    fn wrr_picks_only_the_pools_members() {
        let r = recs(&[1, 1, 1, 1]);
        let mut p = PoolPicker::new(PoolScheduler::Wrr, vec![1, 3]);
        let c = FakeConns::default();
        assert_eq!(ids(&mut p, &r, &c, 4), [11, 13, 11, 13]);
    }

    #[test]
    fn down_and_drained_backends_are_skipped() {
        let mut r = recs(&[1, 1, 0]);
        r[0].flags |= BACKEND_DOWN;
        for sched in [PoolScheduler::Wrr, PoolScheduler::Wlc] {
            let mut p = PoolPicker::new(sched, vec![0, 1, 2]);
            let c = FakeConns::default();
            assert_eq!(ids(&mut p, &r, &c, 3), [11, 11, 11], "{sched:?}");
        }
        r[1].flags |= BACKEND_DOWN;
        let mut p = PoolPicker::new(PoolScheduler::Wrr, vec![0, 1, 2]);
        assert_eq!(p.pick(&r, &FakeConns::default()), Err(NO_BACKEND));
        let mut empty = PoolPicker::new(PoolScheduler::Wlc, vec![]);
        assert_eq!(empty.pick(&r, &FakeConns::default()), Err(NO_BACKEND));
    }

    #[test]
    fn max_conns_is_respected_then_all_full_is_503() {
        let mut r = recs(&[3, 1]);
        r[0].max_conns = 2;
        r[1].max_conns = 3;
        for sched in [PoolScheduler::Wrr, PoolScheduler::Wlc] {
            let mut p = PoolPicker::new(sched, vec![0, 1]);
            let c = FakeConns::default();
            let got = ids(&mut p, &r, &c, 5);
            assert_eq!(
                (got.iter().filter(|&&i| i == 10).count(), got.len()),
                (2, 5),
                "{sched:?}"
            );
            assert_eq!((c.active(10), c.active(11)), (2, 3));
            assert_eq!(p.pick(&r, &c), Err(ALL_FULL), "{sched:?}");
            assert_eq!(ALL_FULL.status, 503);
            // One closes: it takes the next.
            *c.0.borrow_mut().get_mut(&11).unwrap() -= 1;
            assert_eq!(p.pick(&r, &c).unwrap().id, 11);
        }
    }

    #[test]
    fn wlc_fills_by_active_per_weight_exactly() {
        let r = recs(&[1, 2, 3]);
        let mut p = PoolPicker::new(PoolScheduler::Wlc, vec![0, 1, 2]);
        let c = FakeConns::default();
        c.0.borrow_mut().insert(10, 5);
        // 5 active to start with and 61 picks: 66 = 11 + 22 + 33, the
        // counts in proportion to the weights.
        ids(&mut p, &r, &c, 61);
        assert_eq!((c.active(10), c.active(11), c.active(12)), (11, 22, 33));
    }

    #[test]
    fn a_lost_reservation_race_looks_again() {
        /// Refuses the first reservation of id 10 (another process took
        /// its last slot between the scan and the reservation).
        struct Racy(FakeConns, RefCell<bool>);
        impl Conns for Racy {
            fn active(&self, id: u32) -> u32 {
                self.0.active(id)
            }
            fn reserve(&self, id: u32, max: u32) -> bool {
                if id == 10 && !self.1.replace(true) {
                    self.0.0.borrow_mut().insert(10, 1);
                    return false;
                }
                self.0.reserve(id, max)
            }
        }
        let mut r = recs(&[1, 1]);
        r[0].max_conns = 1;
        let c = Racy(FakeConns::default(), RefCell::new(false));
        let mut p = PoolPicker::new(PoolScheduler::Wlc, vec![0, 1]);
        assert_eq!(p.pick(&r, &c).unwrap().id, 11);
    }

    #[test]
    fn region_counters_reserve_with_the_shared_limit() {
        let counters: Vec<BackendCounters> = (0..12)
            // SAFETY: BackendCounters is atomics and padding, valid
            // all-zero (the region starts zero-filled the same way).
            .map(|_| unsafe { core::mem::zeroed() })
            .collect();
        let mut r = recs(&[1]);
        r[0].max_conns = 2;
        let mut p = PoolPicker::new(PoolScheduler::Wrr, vec![0]);
        assert_eq!(p.pick(&r, counters.as_slice()).unwrap().id, 10);
        assert_eq!(p.pick(&r, counters.as_slice()).unwrap().id, 10);
        assert_eq!(p.pick(&r, counters.as_slice()), Err(ALL_FULL));
        assert_eq!(counters.as_slice().active(10), 2);
        assert!(
            !counters.as_slice().reserve(99, 0),
            "an id past the counters"
        );
    }
}
