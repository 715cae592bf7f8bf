//! Schedulers: which backend a new connection goes to.
//!
//! Pure over the configuration view and the shared backend counters, plus a
//! little per-switch state ([`SchedState`], for `wrr`). No allocation, no
//! lock; the only shared write is the reservation of a connection slot on
//! the chosen backend ([`reserve`]: a compare-and-swap bounded by the
//! backend's effective `max_conns`, so a limit holds across switches).
//!
//! Every scheduler picks among the service's *eligible* backends (weight
//! above 0, not DOWN) that are below their limit:
//! - `maglev`: the flow's entry in the service's Maglev table (5-tuple
//!   hash). If that backend is full the connection spills to the eligible
//!   backend with the fewest active connections per weight (as `wlc`).
//! - `sh`: the same table indexed by the client address alone, so every
//!   connection of a client goes to one backend (persistence). If that
//!   backend is full the connection waits for it (persistence wins).
//! - `wrr`: smooth weighted round robin (nginx's: each pick adds every
//!   candidate's weight to its credit, takes the largest credit and takes
//!   the candidates' total weight off it). The credits are per switch, so
//!   the exact interleave is per switch; over `W` (the sum of weights)
//!   consecutive picks of one switch each backend gets exactly its weight.
//! - `wlc`: the fewest active connections per weight (`active_i / w_i`,
//!   compared as `active_i · w_j < active_j · w_i`), read from the shared
//!   counters; ties go to the first in a scan that starts at an offset
//!   given by the flow hash, so ties are spread but deterministic.
//!
//! `wrr` and `wlc` cost a scan of the service's backends per new
//! connection; `maglev` and `sh` one table load unless the choice is full.
//! Packets of connections that have no entry (mid-flow recovery) and RSTs
//! go to the table choice without a reservation: for `maglev` and `sh`
//! that is where their SYN went; for `wrr` and `wlc` it is the Maglev
//! choice, which is where the SYN went only by chance.

use shm_layout::config_slot::{
    BACKEND_DOWN, BACKEND_DRAINED, BackendRec, ConfigView, SCHED_SH, SCHED_WLC, SCHED_WRR,
    ServiceRec,
};
use shm_layout::conntrack::FlowKey;
use shm_layout::switch_slot::BackendCounters;
pub use shm_layout::switch_slot::{release, reserve};

use crate::hash::{flow_hash, source_index, table_index};

/// Per-switch scheduler state: the `wrr` credits, one per backend record
/// of the configuration slot. Allocated once at start; reset whenever the
/// configuration generation changes (weights or membership may have).
#[derive(Debug, Default)]
pub struct SchedState {
    credit: Vec<i64>,
    generation: u64,
}

impl SchedState {
    /// State for a slot of `backends` backend records.
    pub fn new(backends: usize) -> Self {
        Self {
            credit: vec![0; backends],
            generation: 0,
        }
    }

    /// Forgets the credits if `generation` is not the one they belong to.
    #[inline]
    pub fn sync(&mut self, generation: u64) {
        if generation != self.generation {
            self.credit.fill(0);
            self.generation = generation;
        }
    }
}

/// What [`pick`] found for a new connection.
#[derive(Clone, Copy, Debug)]
pub enum Pick<'a> {
    /// A backend, with one of its connection slots reserved for the caller.
    Reserved(&'a BackendRec),
    /// Every eligible backend is at its limit: the connection may wait.
    Full,
    /// No eligible backend at all.
    NoBackend,
}

/// Whether a backend may get new connections at all.
#[inline]
pub fn eligible(b: &BackendRec) -> bool {
    b.weight > 0 && b.flags & (BACKEND_DOWN | BACKEND_DRAINED) == 0
}

#[inline]
fn active(counters: &[BackendCounters], b: &BackendRec) -> u32 {
    counters
        .get(b.id as usize)
        .map_or(0, |c| c.active.load(core::sync::atomic::Ordering::Relaxed))
}

#[inline]
fn full(counters: &[BackendCounters], b: &BackendRec) -> bool {
    b.max_conns != 0 && active(counters, b) >= b.max_conns
}

#[inline]
fn try_reserve(counters: &[BackendCounters], b: &BackendRec) -> bool {
    counters
        .get(b.id as usize)
        .is_none_or(|c| reserve(c, b.max_conns))
}

/// The sum of the `released` counts of a service's backends (wrapping):
/// it moves whenever one of them gives a connection slot back, so a
/// switch holding new connections for the service knows when to try them
/// again (see `crate::synq`). Acquire: whoever sees the new sum then sees
/// the backend's `active` without that slot.
pub fn released(cfg: &ConfigView<'_>, svc: &ServiceRec, counters: &[BackendCounters]) -> u64 {
    cfg.service_backends(svc).iter().fold(0u64, |sum, b| {
        let n = counters.get(b.id as usize).map_or(0, |c| {
            c.released.load(core::sync::atomic::Ordering::Acquire)
        });
        sum.wrapping_add(n)
    })
}

/// Whether an eligible backend of the service is below its limit.
pub fn has_room(cfg: &ConfigView<'_>, svc: &ServiceRec, counters: &[BackendCounters]) -> bool {
    cfg.service_backends(svc)
        .iter()
        .any(|b| eligible(b) && !full(counters, b))
}

/// The backend the service's table gives a flow (`sh`: by client address;
/// otherwise by 5-tuple), without a reservation. Used for new connections
/// of `maglev` and `sh`, and for every scheduler's mid-flow recovery.
#[inline]
pub fn table_choice<'a>(
    cfg: &ConfigView<'a>,
    svc: &ServiceRec,
    key: &FlowKey,
) -> Option<&'a BackendRec> {
    let table = cfg.service_table(svc);
    if table.is_empty() {
        return None;
    }
    let i = if svc.scheduler == SCHED_SH {
        source_index(key.src_ip, table.len())
    } else {
        table_index(key, table.len())
    };
    cfg.service_backends(svc).get(table[i] as usize)
}

/// Picks a backend for a new connection and reserves one of its slots.
#[inline]
pub fn pick<'a>(
    cfg: &ConfigView<'a>,
    svc: &ServiceRec,
    key: &FlowKey,
    counters: &[BackendCounters],
    st: &mut SchedState,
) -> Pick<'a> {
    match svc.scheduler {
        SCHED_WRR => wrr(cfg, svc, counters, st),
        SCHED_WLC => wlc(cfg.service_backends(svc), key, counters),
        SCHED_SH => match table_choice(cfg, svc, key) {
            None => Pick::NoBackend,
            Some(b) if try_reserve(counters, b) => Pick::Reserved(b),
            Some(_) => Pick::Full,
        },
        // maglev, and any value this build does not know.
        _ => match table_choice(cfg, svc, key) {
            None => Pick::NoBackend,
            Some(b) if try_reserve(counters, b) => Pick::Reserved(b),
            Some(_) => wlc(cfg.service_backends(svc), key, counters),
        },
    }
}

/// Re-scans after losing a reservation race this many times at most.
const ATTEMPTS: usize = 4;

/// Weighted least connections over `bs`.
fn wlc<'a>(bs: &'a [BackendRec], key: &FlowKey, counters: &[BackendCounters]) -> Pick<'a> {
    let n = bs.len();
    if n == 0 {
        return Pick::NoBackend;
    }
    let start = ((flow_hash(key) as u128 * n as u128) >> 64) as usize;
    for _ in 0..ATTEMPTS {
        let mut any = false;
        let mut best: Option<(&BackendRec, u64)> = None;
        for j in 0..n {
            let i = if start + j >= n {
                start + j - n
            } else {
                start + j
            };
            let b = &bs[i];
            if !eligible(b) {
                continue;
            }
            any = true;
            if full(counters, b) {
                continue;
            }
            let a = active(counters, b);
            let better = match best {
                None => true,
                Some((c, ca)) => u64::from(a) * u64::from(c.weight) < ca * u64::from(b.weight),
            };
            if better {
                best = Some((b, u64::from(a)));
            }
        }
        match best {
            None if !any => return Pick::NoBackend,
            None => return Pick::Full,
            Some((b, _)) if try_reserve(counters, b) => return Pick::Reserved(b),
            // Another switch took its last slot: look again.
            Some(_) => {}
        }
    }
    Pick::Full
}

/// Smooth weighted round robin over the service's backends that are
/// eligible and below their limit.
fn wrr<'a>(
    cfg: &ConfigView<'a>,
    svc: &ServiceRec,
    counters: &[BackendCounters],
    st: &mut SchedState,
) -> Pick<'a> {
    let bs = cfg.service_backends(svc);
    let base = svc.backend_start as usize;
    let Some(credit) = st.credit.get_mut(base..base + bs.len()) else {
        return Pick::NoBackend;
    };
    for _ in 0..ATTEMPTS {
        let mut any = false;
        let mut total = 0i64;
        let mut best: Option<usize> = None;
        for (i, b) in bs.iter().enumerate() {
            if !eligible(b) {
                continue;
            }
            any = true;
            if full(counters, b) {
                continue;
            }
            credit[i] += i64::from(b.weight);
            total += i64::from(b.weight);
            if best.is_none_or(|k| credit[i] > credit[k]) {
                best = Some(i);
            }
        }
        match best {
            None if !any => return Pick::NoBackend,
            None => return Pick::Full,
            Some(k) => {
                credit[k] -= total;
                if try_reserve(counters, &bs[k]) {
                    return Pick::Reserved(&bs[k]);
                }
            }
        }
    }
    Pick::Full
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::sync::atomic::Ordering;
    use shm_layout::config_slot::{ConfigHeader, SCHED_MAGLEV};

    /// A hand-made configuration view: one service over `weights`.
    struct View {
        header: Box<ConfigHeader>,
        services: Vec<ServiceRec>,
        backends: Vec<BackendRec>,
        table: Vec<u16>,
    }

    // SAFETY of the zeroed header: ConfigHeader is plain data and atomics,
    // valid all-zero (the region starts zero-filled the same way).
    fn header(n_backends: usize) -> Box<ConfigHeader> {
        // SAFETY: see above.
        let mut h: Box<ConfigHeader> = Box::new(unsafe { core::mem::zeroed() });
        h.n_services = 1;
        h.n_backends = n_backends as u32;
        h
    }

    impl View {
        fn new(sched: u8, weights: &[u32], max: &[u32], table: Vec<u16>) -> Self {
            let backends = weights
                .iter()
                .enumerate()
                .map(|(i, &w)| BackendRec {
                    id: i as u32,
                    ip: 0xc613_0101 + i as u32,
                    port: 8080,
                    weight: w,
                    flags: if w == 0 { BACKEND_DRAINED } else { 0 },
                    max_conns: max.get(i).copied().unwrap_or(0),
                    ..Default::default()
                })
                .collect::<Vec<_>>();
            let services = vec![ServiceRec {
                scheduler: sched,
                backend_count: backends.len() as u32,
                table_len: table.len() as u32,
                ..Default::default()
            }];
            Self {
                header: header(backends.len()),
                services,
                backends,
                table,
            }
        }

        fn view(&self) -> ConfigView<'_> {
            ConfigView {
                header: &self.header,
                services: &self.services,
                backends: &self.backends,
                maglev: &self.table,
                down_action: &[],
                service_index: &[],
                vip_index: &[],
            }
        }
    }

    fn counters(n: usize) -> Vec<BackendCounters> {
        // SAFETY: BackendCounters is atomics and padding, valid all-zero.
        (0..n).map(|_| unsafe { core::mem::zeroed() }).collect()
    }

    fn key(i: u32) -> FlowKey {
        FlowKey {
            proto: 6,
            src_ip: 0xc612_6400 + (i >> 10),
            dst_ip: 0xc612_000a,
            src_port: 1024 + (i & 0x3ff) as u16,
            dst_port: 80,
        }
    }

    fn picked(p: Pick<'_>) -> usize {
        match p {
            Pick::Reserved(b) => b.id as usize,
            other => panic!("{other:?}"),
        }
    }

    fn close(c: &[BackendCounters], id: usize) {
        release(&c[id]);
    }

    #[test]
    fn wrr_is_exact_and_smooth_over_each_round() {
        let v = View::new(SCHED_WRR, &[5, 1, 1], &[], vec![]);
        let c = counters(3);
        let mut st = SchedState::new(3);
        let order: Vec<usize> = (0..14)
            .map(|i| picked(pick(&v.view(), &v.services[0], &key(i), &c, &mut st)))
            .collect();
        // nginx's smooth interleave of {5, 1, 1}: a a b a c a a, twice.
        assert_eq!(order, [0, 0, 1, 0, 2, 0, 0, 0, 0, 1, 0, 2, 0, 0]);
        let v = View::new(SCHED_WRR, &[1, 2, 3], &[], vec![]);
        let mut st = SchedState::new(3);
        let mut n = [0; 3];
        for i in 0..600 {
            n[picked(pick(&v.view(), &v.services[0], &key(i), &c, &mut st))] += 1;
        }
        assert_eq!(n, [100, 200, 300]);
    }

    #[test]
    fn wrr_skips_full_and_drained_backends_and_resets_on_a_new_generation() {
        let v = View::new(SCHED_WRR, &[1, 0, 1], &[2, 0, 0], vec![]);
        let c = counters(3);
        let mut st = SchedState::new(3);
        st.sync(7);
        let order: Vec<usize> = (0..6)
            .map(|i| picked(pick(&v.view(), &v.services[0], &key(i), &c, &mut st)))
            .collect();
        // Backend 0 alternates with 2 until it holds its 2 connections.
        assert_eq!(order, [0, 2, 0, 2, 2, 2]);
        assert_eq!(c[0].active.load(Ordering::Relaxed), 2);
        assert_eq!(c[1].active.load(Ordering::Relaxed), 0, "weight 0 drains");
        st.credit[2] = 99;
        st.sync(7);
        assert_eq!(st.credit[2], 99);
        st.sync(8);
        assert_eq!(st.credit, [0, 0, 0]);
    }

    #[test]
    fn wlc_fills_by_active_per_weight_exactly() {
        let v = View::new(SCHED_WLC, &[1, 2, 3, 0], &[], vec![]);
        let c = counters(4);
        let mut st = SchedState::default();
        for i in 0..60 {
            pick(&v.view(), &v.services[0], &key(i), &c, &mut st);
        }
        let act: Vec<u32> = c.iter().map(|c| c.active.load(Ordering::Relaxed)).collect();
        assert_eq!(act, [10, 20, 30, 0]);
        // Closing three connections of backend 2 sends the next three there.
        for _ in 0..3 {
            close(&c, 2);
        }
        for i in 60..63 {
            assert_eq!(
                picked(pick(&v.view(), &v.services[0], &key(i), &c, &mut st)),
                2
            );
        }
    }

    #[test]
    fn wlc_breaks_ties_by_flow_hash_deterministically() {
        let v = View::new(SCHED_WLC, &[1, 1, 1, 1], &[], vec![]);
        let mut firsts = [0; 4];
        // A fresh switch (no counts, no credits) picks for flow i.
        let fresh = |i: u32| {
            picked(pick(
                &v.view(),
                &v.services[0],
                &key(i),
                &counters(4),
                &mut Default::default(),
            ))
        };
        for i in 0..400 {
            let (a, b) = (fresh(i), fresh(i));
            assert_eq!(a, b, "same flow, same state: same backend");
            firsts[a] += 1;
        }
        assert!(firsts.iter().all(|&n| n > 50), "{firsts:?}");
    }

    #[test]
    fn full_everywhere_says_full_and_no_eligible_says_no_backend() {
        for sched in [SCHED_MAGLEV, SCHED_WRR, SCHED_WLC, SCHED_SH] {
            let v = View::new(sched, &[1, 1], &[1, 1], vec![0, 1, 0, 1, 1]);
            let c = counters(2);
            let mut st = SchedState::new(2);
            let mut got = Vec::new();
            for i in 0..4 {
                got.push(pick(&v.view(), &v.services[0], &key(i), &c, &mut st));
            }
            let reserved = got
                .iter()
                .filter(|p| matches!(p, Pick::Reserved(_)))
                .count();
            if sched == SCHED_SH {
                // One client address: its backend only (persistence).
                assert_eq!(reserved, 1, "sh");
            } else {
                assert_eq!(reserved, 2, "scheduler {sched}");
            }
            assert!(matches!(got[3], Pick::Full), "scheduler {sched}");
            let act: u32 = c.iter().map(|c| c.active.load(Ordering::Relaxed)).sum();
            assert_eq!(act as usize, reserved, "no reservation leaked");
            let v = View::new(sched, &[0, 0], &[], vec![]);
            assert!(matches!(
                pick(&v.view(), &v.services[0], &key(0), &c, &mut st),
                Pick::NoBackend
            ));
        }
    }

    #[test]
    fn maglev_spills_a_full_choice_to_the_least_loaded() {
        // Table: every entry is backend 0.
        let v = View::new(SCHED_MAGLEV, &[1, 1, 2], &[1, 0, 0], vec![0; 7]);
        let c = counters(3);
        let mut st = SchedState::default();
        let seq: Vec<usize> = (0..4)
            .map(|i| picked(pick(&v.view(), &v.services[0], &key(i), &c, &mut st)))
            .collect();
        assert_eq!(seq[0], 0);
        let act: Vec<u32> = c.iter().map(|c| c.active.load(Ordering::Relaxed)).collect();
        // After the first, spills follow active/weight: 1 of 1, 2 of 2.
        assert_eq!(act, [1, 1, 2]);
    }

    #[test]
    fn sh_keeps_each_client_on_one_backend() {
        let table: Vec<u16> = (0..251).map(|i| (i % 3) as u16).collect();
        let v = View::new(SCHED_SH, &[1, 1, 1], &[], table);
        let c = counters(3);
        let mut st = SchedState::default();
        let mut used = [false; 3];
        for client in 0..30u32 {
            let first = table_choice(&v.view(), &v.services[0], &key(client << 10))
                .unwrap()
                .id;
            for port in 0..20 {
                let k = key((client << 10) | port);
                let b = picked(pick(&v.view(), &v.services[0], &k, &c, &mut st));
                assert_eq!(b as u32, first, "client {client} port {port}");
            }
            used[first as usize] = true;
        }
        assert_eq!(used, [true; 3]);
    }

    /// Threads racing for the slots of one limited backend (as switches
    /// do): exactly `max` reservations succeed; releases make room again.
    #[test]
    fn max_conns_holds_across_concurrent_reservers() {
        const MAX: u32 = 37;
        for sched in [SCHED_MAGLEV, SCHED_WRR, SCHED_WLC] {
            let v = View::new(sched, &[1, 1], &[MAX, 5], vec![0; 7]);
            let c = counters(2);
            let won = std::sync::atomic::AtomicU32::new(0);
            std::thread::scope(|s| {
                for t in 0..4u32 {
                    let (v, c, won) = (&v, &c, &won);
                    s.spawn(move || {
                        let mut st = SchedState::new(2);
                        for i in 0..1000 {
                            if let Pick::Reserved(_) =
                                pick(&v.view(), &v.services[0], &key(t * 1000 + i), c, &mut st)
                            {
                                won.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    });
                }
            });
            assert_eq!(won.load(Ordering::Relaxed), MAX + 5, "scheduler {sched}");
            assert_eq!(c[0].active.load(Ordering::Relaxed), MAX);
            assert_eq!(c[1].active.load(Ordering::Relaxed), 5);
            close(&c, 1);
            assert_eq!(
                picked(pick(
                    &v.view(),
                    &v.services[0],
                    &key(9),
                    &c,
                    &mut SchedState::new(2)
                )),
                1
            );
        }
    }
}
