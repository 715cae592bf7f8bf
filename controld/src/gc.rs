//! Connection-table GC: ages entries out, takes back slots abandoned by a
//! killed writer, removes orphaned reply slots, compacts tombstones, and
//! reconciles each backend's `active` count with the table once per sweep
//! round. Incremental: each step visits a bounded window, so the switches
//! never see a stop-the-world sweep.
//!
//! Reconciliation. A backend's reservations are its forward entries that
//! are not closed, plus those in flight (a switch between `reserve` and
//! its insert, or between closing an entry and releasing it). A switch
//! killed in flight loses its reservation for good: `active` stays too
//! high (a leak). The sweep counts, per backend, the entries it finds
//! holding a reservation; at the round's end `excess = active - counted`.
//! The count is spread over the round, so it alone proves nothing while
//! connections come and go; [`correction`] acts only on two consecutive
//! rounds that are *quiet* for the backend (no insert completed: its
//! `total` did not move; and the sweep read every slot), when:
//! - both excesses are positive: `active` drops by the smaller. With no
//!   insert, every entry alive at a round's end was alive and not closed
//!   when the sweep passed it, so `counted` is at least the entries left
//!   and the excess at most the leak plus what was in flight at that
//!   instant; taking the smaller of two rounds' excesses, a reservation
//!   in flight at one round's end does not count.
//! - both are negative and `active` did not change between the two round
//!   ends: `active` rises by the smaller deficit. An entry counted and
//!   closed after its visit would have released its reservation, and
//!   `active` would have dropped.
//!
//! Corrections are read-modify-writes (never a store), so concurrent
//! reserves and releases are kept; after one, two fresh rounds are needed
//! for the next. What remains: a reservation of the backend in flight at
//! both round ends (two failing inserts at those very instants, or one
//! switch stalled mid-packet for a whole round) is taken as a leak; the
//! deficit that leaves shows in later quiet rounds and is added back.

use shm_layout::Region;
use shm_layout::conntrack::{KIND_FWD, KIND_REPLY, KIND_TOMB, Timeouts, holds_reservation};
use shm_layout::records::{CloseReason, ClosedRecord, Counts};
use shm_layout::switch_slot::{BackendCounters, release};
use std::sync::atomic::Ordering;

/// What one GC step did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GcStats {
    pub visited: u64,
    pub expired: u64,
    pub orphans: u64,
    pub abandoned: u64,
    pub compacted: u64,
    /// Sweep rounds completed.
    pub rounds: u64,
    /// Leaked reservations taken back from backends' `active` counts.
    pub reconciled_down: u64,
    /// Reservations added back to backends' `active` counts.
    pub reconciled_up: u64,
}

/// One backend over one sweep round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RoundObs {
    /// `active` at the round's end minus the reservations counted.
    pub excess: i64,
    /// `active` at the round's end.
    pub active: u32,
    /// The backend's `total` at the round's start and at its end.
    pub total: (u64, u64),
    /// The sweep read every slot of the round.
    pub complete: bool,
}

/// The change to make to a backend's `active` after two consecutive
/// rounds (see the module's doc): negative takes back leaked reservations.
pub fn correction(prev: &RoundObs, cur: &RoundObs) -> i64 {
    let quiet = prev.complete
        && cur.complete
        && prev.total.0 == prev.total.1
        && prev.total.1 == cur.total.0
        && cur.total.0 == cur.total.1;
    if !quiet {
        return 0;
    }
    if prev.excess > 0 && cur.excess > 0 {
        -prev.excess.min(cur.excess)
    } else if prev.excess < 0 && cur.excess < 0 && prev.active == cur.active {
        -prev.excess.max(cur.excess)
    } else {
        0
    }
}

/// The reconciliation's state: this round's counts, the last round's
/// observations.
#[derive(Debug, Default)]
struct Round {
    /// Whether the current round was seen from its first slot.
    began: bool,
    counted: Vec<u32>,
    total_start: Vec<u64>,
    skipped: u64,
    prev: Vec<Option<RoundObs>>,
}

impl Round {
    fn begin(&mut self, counters: &[BackendCounters]) {
        let n = counters.len();
        self.counted.clear();
        self.counted.resize(n, 0);
        self.total_start.clear();
        self.total_start
            .extend(counters.iter().map(|c| c.total.load(Ordering::Relaxed)));
        self.prev.resize(n, None);
        self.skipped = 0;
        self.began = true;
    }

    fn count(&mut self, backend: u32) {
        if let Some(c) = self.counted.get_mut(backend as usize) {
            *c += 1;
        }
    }

    /// Closes the round: compares and corrects every backend.
    fn end(&mut self, counters: &[BackendCounters], st: &mut GcStats) {
        if !self.began {
            return;
        }
        self.began = false;
        st.rounds += 1;
        let n = counters.len().min(self.counted.len());
        for (b, c) in counters.iter().enumerate().take(n) {
            let active = c.active.load(Ordering::Relaxed);
            let obs = RoundObs {
                excess: i64::from(active) - i64::from(self.counted[b]),
                active,
                total: (self.total_start[b], c.total.load(Ordering::Relaxed)),
                complete: self.skipped == 0,
            };
            let corr = self.prev[b].map_or(0, |p| correction(&p, &obs));
            self.prev[b] = (corr == 0).then_some(obs);
            if corr < 0 {
                let want = corr.unsigned_abs().min(u64::from(u32::MAX)) as u32;
                let old = c
                    .active
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                        Some(v.saturating_sub(want))
                    })
                    .unwrap_or_else(|v| v);
                let taken = u64::from(old.min(want));
                c.reconciled_down.fetch_add(taken, Ordering::Relaxed);
                st.reconciled_down += taken;
            } else if corr > 0 {
                let add = corr.min(i64::from(u32::MAX)) as u32;
                c.active.fetch_add(add, Ordering::Relaxed);
                c.reconciled_up.fetch_add(u64::from(add), Ordering::Relaxed);
                st.reconciled_up += u64::from(add);
            }
        }
    }
}

#[derive(Debug, Default)]
pub struct Gc {
    cursor: u32,
    pub totals: GcStats,
    round: Round,
    /// Records of the connections this GC closed (expired while holding
    /// their backend slot), for the caller to take (`crate::records`).
    pub closed: Vec<ClosedRecord>,
}

impl Gc {
    /// Visits `n` slots starting where the last step stopped.
    pub fn step(&mut self, region: &Region, timeouts: &Timeouts, n: u32) -> GcStats {
        self.step_at(region, timeouts, n, region.now_ms())
    }

    /// [`step`](Self::step) judging expiry at `now` (milliseconds since
    /// the region's creation, as `Region::now_ms`): tests drive the clock.
    pub fn step_at(&mut self, region: &Region, timeouts: &Timeouts, n: u32, now: u32) -> GcStats {
        let ct = region.conntrack();
        let pid = std::process::id();
        let cap = ct.capacity() as u32;
        let counters = region.backend_counters();
        let mut st = GcStats::default();
        for _ in 0..n.min(cap) {
            let idx = self.cursor;
            if idx == 0 {
                self.round.begin(counters);
            }
            self.cursor = (self.cursor + 1) % cap;
            st.visited += 1;
            self.visit(region, timeouts, idx, pid, now, &mut st);
            if self.cursor == 0 {
                self.round.end(counters, &mut st);
            }
        }
        self.totals.visited += st.visited;
        self.totals.expired += st.expired;
        self.totals.orphans += st.orphans;
        self.totals.abandoned += st.abandoned;
        self.totals.compacted += st.compacted;
        self.totals.rounds += st.rounds;
        self.totals.reconciled_down += st.reconciled_down;
        self.totals.reconciled_up += st.reconciled_up;
        st
    }

    /// One slot: acts on it, then counts a reservation it still holds.
    fn visit(
        &mut self,
        region: &Region,
        timeouts: &Timeouts,
        idx: u32,
        pid: u32,
        now: u32,
        st: &mut GcStats,
    ) {
        let ct = region.conntrack();
        let counters = region.backend_counters();
        if ct.holder(idx).is_some() {
            match ct.reclaim_abandoned(idx, pid, |owner| writer_alive(region, owner)) {
                Some(r) => {
                    st.abandoned += 1;
                    if let Some(b) = r.release.and_then(|id| counters.get(id as usize)) {
                        release(b);
                    }
                }
                // A live writer's slot: unread this round.
                None => self.round.skipped += 1,
            }
            return;
        }
        let Some(snap) = ct.snapshot(idx) else {
            self.round.skipped += 1;
            return;
        };
        match snap.kind() {
            KIND_FWD if ct.slot(idx).expired(now, timeouts) => {
                let Some(reserved) = ct.retire(idx, &snap, pid) else {
                    self.round.skipped += 1;
                    return;
                };
                st.expired += 1;
                let id = snap.conn().map(|c| c.backend_id).unwrap_or(u32::MAX);
                if let Some(b) = counters.get(id as usize)
                    && reserved
                {
                    release(b);
                }
                // The retire closed it (it still held its backend slot):
                // its record. (Closed earlier, by a FIN or RST, it was
                // recorded by the switch that closed it.) The counts stay
                // in the slots after the retire.
                if reserved && let Some(conn) = snap.conn() {
                    let s = ct.slot(idx);
                    let (packets, bytes) = ct.reply_counts(&conn, idx);
                    self.closed.push(ClosedRecord {
                        conn,
                        reason: CloseReason::IdleTimeout,
                        closed_ms: now,
                        forward: Counts {
                            packets: s.packets.load(Ordering::Relaxed),
                            bytes: s.bytes.load(Ordering::Relaxed),
                        },
                        reply: Counts { packets, bytes },
                    });
                }
            }
            KIND_FWD => {
                if holds_reservation(ct.slot(idx).tcp_state.load(Ordering::Relaxed))
                    && let Some(c) = snap.conn()
                {
                    self.round.count(c.backend_id);
                }
            }
            KIND_REPLY => {
                let (rkey, fwd) = snap.reply().expect("reply slot");
                // A busy target may be an insert in progress (the reply slot
                // is published first): leave it for the next sweep.
                // An expired connection that still holds its backend slot
                // keeps its reply slot until its forward entry is retired:
                // the record of that close reads the reply direction's
                // counts there.
                let live = match ct.snapshot(fwd) {
                    None => true,
                    Some(s) => s.conn().is_some_and(|c| {
                        c.reply_key() == rkey
                            && (!ct.slot(fwd).expired(now, timeouts)
                                || holds_reservation(
                                    ct.slot(fwd).tcp_state.load(Ordering::Relaxed),
                                ))
                    }),
                };
                if !live && ct.remove(idx, &snap, pid) {
                    st.orphans += 1;
                }
            }
            KIND_TOMB if ct.compact(idx, pid) => st.compacted += 1,
            _ => {}
        }
    }
}

/// Whether `owner` (the pid in a held slot's lock word) is a live writer of
/// the region: this controld, or a switch whose slot names that pid with a
/// matching start time. Any other process with that pid took it over after
/// the writer died.
fn writer_alive(region: &Region, owner: u32) -> bool {
    owner == std::process::id()
        || region
            .switch_slots()
            .iter()
            .any(|s| s.pid.load(Ordering::Relaxed) == owner && s.process_alive())
}

#[cfg(test)]
mod tests {
    use super::*;
    use shm_layout::Capacities;
    use shm_layout::config_slot::PROTO_UDP;
    use shm_layout::conntrack::STATE_ESTABLISHED;
    use shm_layout::conntrack::{
        Conn, KIND_EMPTY, STATE_ACTIVE, STATE_CLOSING, STATE_PROVISIONAL, STATE_SYN,
        STATE_SYN_ACKED,
    };
    use shm_layout::shm::Mapping;
    use shm_layout::switch_slot::reserve;
    use std::collections::BTreeSet;

    const T: Timeouts = Timeouts {
        tcp_syn_ms: 60_000,
        tcp_established_ms: 60_000,
        tcp_fin_ms: 60_000,
        udp_ms: 60_000,
        tcp_provisional_ms: 60_000,
    };

    struct Temp(Region, String);

    impl Drop for Temp {
        fn drop(&mut self) {
            let _ = Mapping::unlink(&self.1);
        }
    }

    fn temp(tag: &str) -> Temp {
        let inst = format!("gc-{tag}-{}", std::process::id());
        let caps = Capacities {
            backends: 16,
            backend_ids: 16,
            conn_slots: 1 << 10,
            maglev_m: 251,
            ..Capacities::default()
        };
        Temp(
            Region::create(&inst, caps).unwrap(),
            shm_layout::region_name(&inst),
        )
    }

    fn conn(i: u32, backend: u32) -> Conn {
        Conn {
            proto: 6,
            backend_id: backend,
            client_ip: 0xc612_6400,
            client_port: i as u16,
            vip: 0xc612_000a,
            vip_port: 80,
            backend_ip: 0xc613_0100 + backend,
            backend_port: 8080,
            service: 1,
            created_ms: 1,
            ..Conn::default()
        }
    }

    /// Opens `n` connections on `backend` as a switch does: reserve, insert.
    fn open(r: &Region, backend: u32, from: u32, n: u32) {
        let now = r.now_ms();
        for i in from..from + n {
            assert!(reserve(&r.backend_counters()[backend as usize], 0));
            r.conntrack()
                .insert(&conn(i, backend), true, now, STATE_ESTABLISHED, 7, |_| {
                    false
                })
                .unwrap();
            r.backend_counters()[backend as usize]
                .total
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    fn active(r: &Region, b: usize) -> u32 {
        r.backend_counters()[b].active.load(Ordering::Relaxed)
    }

    fn obs(excess: i64, active: u32, total: u64) -> RoundObs {
        RoundObs {
            excess,
            active,
            total: (total, total),
            complete: true,
        }
    }

    #[test]
    fn corrections_need_two_quiet_rounds_of_one_sign_and_take_the_smaller() {
        assert_eq!(correction(&obs(3, 10, 5), &obs(2, 9, 5)), -2);
        assert_eq!(correction(&obs(2, 9, 5), &obs(3, 10, 5)), -2);
        assert_eq!(correction(&obs(3, 10, 5), &obs(0, 7, 5)), 0);
        assert_eq!(correction(&obs(3, 10, 5), &obs(-1, 7, 5)), 0);
        // A connection inserted during either round: no judgement.
        assert_eq!(correction(&obs(3, 10, 5), &obs(3, 10, 6)), 0);
        let mut grew = obs(3, 10, 5);
        grew.total = (4, 5);
        assert_eq!(correction(&grew, &obs(3, 10, 5)), 0);
        // A slot the sweep could not read: no judgement.
        let mut partial = obs(3, 10, 5);
        partial.complete = false;
        assert_eq!(correction(&obs(3, 10, 5), &partial), 0);
        // Too low: added back only if `active` held still.
        assert_eq!(correction(&obs(-2, 4, 5), &obs(-3, 4, 5)), 2);
        assert_eq!(correction(&obs(-2, 4, 5), &obs(-3, 3, 5)), 0);
    }

    /// Reservations lost by killed switches (taken, never inserted, never
    /// released) and one released twice: after quiet rounds each backend's
    /// `active` equals its open connections, and the corrections are
    /// counted where shmdump shows them.
    /// Connections the GC expires while they hold their backend slot get
    /// one record each, with both directions' counts (the reply slot is
    /// kept until the forward entry is retired, whichever the sweep meets
    /// first); one closed earlier by a FIN (recorded by its switch) gets none.
    #[test]
    fn expired_connections_holding_their_slot_are_recorded_once() {
        let t = temp("records");
        let r = &t.0;
        open(r, 1, 0, 3);
        let ct = r.conntrack();
        let now = r.now_ms();
        let mut want = Vec::new();
        for i in 0..3u32 {
            let c = conn(i, 1);
            let h = ct.lookup(&c.forward_key()).unwrap();
            let s = ct.slot(h.idx);
            s.add_counts(u64::from(i) + 2, 100 * u64::from(i) + 80);
            let rs = ct.slot(ct.reply_slot(&c, h.idx).unwrap());
            rs.add_counts(u64::from(i) + 1, 1000 * u64::from(i) + 40);
            s.last_seen.store(now.wrapping_sub(5), Ordering::Relaxed);
            if i == 2 {
                // Closed by a FIN: its switch released and recorded it.
                assert!(ct.close(h.idx));
                release(&r.backend_counters()[1]);
            } else {
                want.push((
                    c.client_port,
                    u64::from(i) + 2,
                    u64::from(i) + 1,
                    1000 * u64::from(i) + 40,
                ));
            }
        }
        let zero = Timeouts {
            tcp_syn_ms: 0,
            tcp_established_ms: 0,
            tcp_fin_ms: 0,
            udp_ms: 0,
            tcp_provisional_ms: 0,
        };
        let mut gc = Gc::default();
        let cap = ct.capacity() as u32;
        gc.step(r, &zero, cap);
        gc.step(r, &zero, cap);
        let mut got: Vec<_> = gc
            .closed
            .iter()
            .map(|x| {
                assert_eq!(x.reason, CloseReason::IdleTimeout);
                (
                    x.conn.client_port,
                    x.forward.packets,
                    x.reply.packets,
                    x.reply.bytes,
                )
            })
            .collect();
        got.sort();
        assert_eq!(got, want);
        assert_eq!(active(r, 1), 0);
        assert_eq!(gc.totals.expired, 3);
    }

    #[test]
    fn leaked_and_double_released_reservations_are_reconciled() {
        let t = temp("leak");
        let r = &t.0;
        open(r, 1, 0, 5);
        open(r, 2, 100, 4);
        let c = r.backend_counters();
        for _ in 0..3 {
            assert!(reserve(&c[1], 0));
        }
        release(&c[2]);
        assert_eq!((active(r, 1), active(r, 2)), (8, 3));
        let mut gc = Gc::default();
        let cap = r.conntrack().capacity() as u32;
        for _ in 0..3 {
            gc.step(r, &T, cap);
        }
        assert_eq!((active(r, 1), active(r, 2)), (5, 4));
        assert_eq!(gc.totals.rounds, 3);
        assert_eq!((gc.totals.reconciled_down, gc.totals.reconciled_up), (3, 1));
        assert_eq!(c[1].reconciled_down.load(Ordering::Relaxed), 3);
        assert_eq!(c[2].reconciled_up.load(Ordering::Relaxed), 1);
        // Balanced counts stay as they are.
        for _ in 0..3 {
            gc.step(r, &T, cap);
        }
        assert_eq!((active(r, 1), active(r, 2)), (5, 4));
        assert_eq!((gc.totals.reconciled_down, gc.totals.reconciled_up), (3, 1));
    }

    /// Connections opened while the sweep runs (a steady ramp, each
    /// behind the cursor) look like a leak to a naive count; they are not
    /// taken back.
    #[test]
    fn connections_opened_during_the_sweep_are_not_taken_for_leaks() {
        let t = temp("ramp");
        let r = &t.0;
        let mut gc = Gc::default();
        let cap = r.conntrack().capacity() as u32;
        for step in 0..32u32 {
            open(r, 1, step * 8, 8);
            gc.step(r, &T, cap / 4);
        }
        assert_eq!(active(r, 1), 256);
        assert_eq!((gc.totals.reconciled_down, gc.totals.reconciled_up), (0, 0));
    }

    /// A slot held by a dead writer is taken back and the forward entry's
    /// reservation released.
    #[test]
    fn a_slot_held_by_a_pid_reused_since_its_writer_died_is_taken_back() {
        let t = temp("reused");
        let r = &t.0;
        open(r, 3, 0, 1);
        // A live process that is no writer of this region holds the slot's
        // pid (as if the kernel had handed the dead switch's pid out again).
        let mut other = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let ct = r.conntrack();
        let idx = ct.lookup(&conn(0, 3).forward_key()).unwrap().idx;
        let s = ct.slot(idx);
        let l = s.lock.load(Ordering::Relaxed);
        s.lock
            .store((l + 1) | (u64::from(other.id()) << 32), Ordering::Relaxed);
        let mut gc = Gc::default();
        gc.step(r, &T, ct.capacity() as u32);
        let _ = other.kill();
        let _ = other.wait();
        assert_eq!(gc.totals.abandoned, 1);
        assert_eq!(active(r, 3), 0);
    }

    #[test]
    fn an_abandoned_forward_slot_gives_its_reservation_back() {
        let t = temp("abandoned");
        let r = &t.0;
        open(r, 3, 0, 1);
        let ct = r.conntrack();
        let idx = ct.lookup(&conn(0, 3).forward_key()).unwrap().idx;
        let s = ct.slot(idx);
        let l = s.lock.load(Ordering::Relaxed);
        s.lock.store(
            (l + 1) | (u64::from(i32::MAX as u32 - 3) << 32),
            Ordering::Relaxed,
        );
        let mut gc = Gc::default();
        gc.step(r, &T, ct.capacity() as u32);
        assert_eq!(gc.totals.abandoned, 1);
        assert_eq!(active(r, 3), 0);
        assert_eq!(gc.totals.reconciled_down, 0, "released, not reconciled");
    }

    /// Every timeout differs, so a state judged by another's shows.
    const BY_STATE: Timeouts = Timeouts {
        tcp_syn_ms: 100,
        tcp_established_ms: 1000,
        tcp_fin_ms: 50,
        udp_ms: 300,
        tcp_provisional_ms: 30,
    };

    /// Inserts `c` as a switch would (reserving first if `state` holds a
    /// reservation), last seen at `seen`; returns its forward slot.
    fn put(r: &Region, c: &Conn, nat: bool, state: u32, seen: u32) -> u32 {
        let b = &r.backend_counters()[c.backend_id as usize];
        if holds_reservation(state) {
            assert!(reserve(b, 0));
        }
        let ins = r
            .conntrack()
            .insert(c, nat, seen, state, 7, |_| false)
            .unwrap();
        assert_eq!(ins.evicted_backends, [None, None]);
        ins.idx
    }

    /// Slots whose entry is gone (a tombstone, or compacted back to empty).
    fn freed(r: &Region) -> BTreeSet<u32> {
        let ct = r.conntrack();
        (0..ct.capacity() as u32)
            .filter(|&i| matches!(ct.snapshot(i).unwrap().kind(), KIND_TOMB | KIND_EMPTY))
            .collect()
    }

    fn released(r: &Region, b: usize) -> u64 {
        r.backend_counters()[b].released.load(Ordering::Relaxed)
    }

    /// Moves every backend's `total`, so no sweep round is quiet and the
    /// reconciliation stays out of a test about expiry.
    fn not_quiet(r: &Region) {
        for c in r.backend_counters() {
            c.total.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// One connection per state and age: idle exactly its state's timeout
    /// (stays) and one millisecond more (expires). Each state's entries
    /// are on their own backend, which also holds 10 reservations of
    /// connections in flight, so a release that should not happen shows
    /// in `active` (it never goes below 0). Only the expired entries that
    /// held their backend slot give it back, once, with one record each;
    /// further sweeps at the same time change nothing, and once every
    /// entry is past its timeout the rest go, CLOSING and PROVISIONAL
    /// again without a release or a record.
    #[test]
    fn each_state_expires_past_its_own_timeout_and_gives_back_its_slot_once() {
        let t = temp("bystate");
        let r = &t.0;
        let now = 50_000u32;
        // (state, proto, timeout, backend)
        let cases = [
            (STATE_SYN, 6, 100, 1u32),
            (STATE_SYN_ACKED, 6, 100, 2),
            (STATE_PROVISIONAL, 6, 30, 3),
            (STATE_ESTABLISHED, 6, 1000, 4),
            (STATE_CLOSING, 6, 50, 5),
            (STATE_ACTIVE, PROTO_UDP, 300, 6),
        ];
        let mut stays = BTreeSet::new();
        let mut goes = BTreeSet::new();
        let mut goes_recorded = BTreeSet::new();
        for (n, &(state, proto, timeout, b)) in cases.iter().enumerate() {
            for _ in 0..10 {
                assert!(reserve(&r.backend_counters()[b as usize], 0));
            }
            for extra in [0u32, 1] {
                let c = Conn {
                    proto,
                    ..conn(n as u32 * 2 + extra, b)
                };
                let idx = put(r, &c, false, state, now - timeout - extra);
                if extra == 0 {
                    stays.insert(idx);
                } else {
                    goes.insert(idx);
                    if holds_reservation(state) {
                        goes_recorded.insert(c.client_port);
                    }
                }
            }
        }
        let cap = r.conntrack().capacity() as u32;
        let mut gc = Gc::default();
        for sweep in 0..3 {
            not_quiet(r);
            let st = gc.step_at(r, &BY_STATE, cap, now);
            assert_eq!(st.visited, u64::from(cap));
            assert_eq!(st.expired, if sweep == 0 { 6 } else { 0 }, "sweep {sweep}");
            assert_eq!(freed(r), (0..cap).filter(|i| !stays.contains(i)).collect());
            assert!(goes.iter().all(|i| freed(r).contains(i)));
            for &(state, _, _, b) in &cases {
                let (want_active, want_released) = if holds_reservation(state) {
                    (11, 1)
                } else {
                    (10, 0)
                };
                assert_eq!(
                    (active(r, b as usize), released(r, b as usize)),
                    (want_active, want_released),
                    "state {state}, sweep {sweep}"
                );
            }
            let got: BTreeSet<u16> = gc.closed.iter().map(|x| x.conn.client_port).collect();
            assert_eq!(got, goes_recorded);
            assert_eq!(gc.closed.len(), 4);
            assert!(
                gc.closed
                    .iter()
                    .all(|x| x.reason == CloseReason::IdleTimeout && x.closed_ms == now)
            );
        }
        // Later: every entry is past its timeout.
        not_quiet(r);
        let st = gc.step_at(r, &BY_STATE, cap, now + 1001);
        assert_eq!(st.expired, 6);
        assert_eq!(freed(r).len(), cap as usize);
        for &(state, _, _, b) in &cases {
            let want = if holds_reservation(state) { 2 } else { 0 };
            assert_eq!(
                (active(r, b as usize), released(r, b as usize)),
                (10, want),
                "state {state}"
            );
        }
        assert_eq!(gc.closed.len(), 8);
        assert_eq!(gc.totals.expired, 12);
        assert_eq!((gc.totals.reconciled_down, gc.totals.reconciled_up), (0, 0));
    }

    /// A connection whose client port makes its forward key's home `home`.
    fn conn_at_home(r: &Region, home: u32, backend: u32) -> Conn {
        let ct = r.conntrack();
        (0..=u16::MAX)
            .map(|p| Conn {
                client_ip: 0xc612_6500,
                ..conn(u32::from(p), backend)
            })
            .find(|c| ct.home(&c.forward_key()) == home as usize)
            .expect("some port hashes there")
    }

    /// Reply slots (NAT) whose connection is gone are removed: the forward
    /// entry retired by a switch, its slot reused by another connection,
    /// or closed by a FIN and expired. A live connection's reply slot
    /// stays, and so does an expired one's that still holds its backend
    /// slot, until its forward entry is retired (its record reads the
    /// reply direction's counts there).
    #[test]
    fn orphaned_reply_slots_are_removed_and_live_ones_kept() {
        let t = temp("orphans");
        let r = &t.0;
        let ct = r.conntrack();
        let pid = std::process::id();
        let now = 50_000u32;
        let est = STATE_ESTABLISHED;
        let reply_of = |c: &Conn| {
            let h = ct.lookup(&c.forward_key()).unwrap();
            ct.reply_slot(c, h.idx).unwrap()
        };
        let live = conn(1, 1);
        put(r, &live, true, est, now);
        let live_reply = reply_of(&live);
        // Retired by a switch (a RST, say): its reply slot is an orphan.
        let retired = conn(2, 2);
        let f = put(r, &retired, true, est, now);
        let retired_reply = reply_of(&retired);
        assert_eq!(ct.retire(f, &ct.snapshot(f).unwrap(), pid), Some(true));
        release(&r.backend_counters()[2]);
        // Its forward slot retired and taken by another connection.
        let reused = conn(3, 3);
        let f = put(r, &reused, true, est, now);
        let reused_reply = reply_of(&reused);
        assert_eq!(ct.retire(f, &ct.snapshot(f).unwrap(), pid), Some(true));
        release(&r.backend_counters()[3]);
        let taker = conn_at_home(r, f, 4);
        assert_eq!(
            put(r, &taker, false, est, now),
            f,
            "the taker reuses the slot"
        );
        let reused_fwd = f;
        // Closed by a FIN and idle past tcp_fin.
        let fin = conn(5, 5);
        let f = put(r, &fin, true, est, now - 60);
        let fin_reply = reply_of(&fin);
        assert!(ct.close(f));
        release(&r.backend_counters()[5]);
        // Expired while holding its backend slot.
        let idle = conn(6, 6);
        let idle_fwd = put(r, &idle, true, est, now - 1001);
        let idle_reply = reply_of(&idle);
        ct.slot(idle_reply).add_counts(3, 300);

        let cap = ct.capacity() as u32;
        // The idle connection's reply slot alone: kept, its forward entry
        // still holds the backend slot.
        let mut gc = Gc {
            cursor: idle_reply,
            ..Gc::default()
        };
        let st = gc.step_at(r, &BY_STATE, 1, now);
        assert_eq!((st.visited, st.orphans, st.expired), (1, 0, 0));
        assert_eq!(ct.snapshot(idle_reply).unwrap().kind(), KIND_REPLY);
        // Two sweeps: whichever the sweep meets first, every orphan goes.
        gc.step_at(r, &BY_STATE, cap, now);
        gc.step_at(r, &BY_STATE, cap, now);
        let gone: BTreeSet<u32> = [retired_reply, reused_reply, fin_reply, idle_reply]
            .into_iter()
            .collect();
        assert!(gone.is_subset(&freed(r)), "{gone:?}");
        assert_eq!(gc.totals.orphans, 4);
        assert_eq!(ct.snapshot(live_reply).unwrap().kind(), KIND_REPLY);
        assert_eq!(
            ct.lookup(&live.reply_key()).map(|h| h.conn()),
            Some(live),
            "the live connection is still found by its reply key"
        );
        assert_eq!(
            ct.lookup(&taker.forward_key()).map(|h| (h.idx, h.conn())),
            Some((reused_fwd, taker))
        );
        // The idle connection's record carries its reply counts.
        assert_eq!(gc.closed.len(), 1);
        assert_eq!(gc.closed[0].conn, idle);
        assert_eq!(
            (gc.closed[0].reply.packets, gc.closed[0].reply.bytes),
            (3, 300)
        );
        assert!(freed(r).contains(&idle_fwd));
        // Only the live connection and the taker remain.
        assert_eq!(freed(r).len(), cap as usize - 3);
    }

    /// A step of `n` slots resumes where the last one stopped: after each
    /// step exactly the expired entries before the cursor are gone; steps
    /// adding up to the capacity visit every slot once (one round), and a
    /// step larger than the table visits each slot once, not more.
    #[test]
    fn bounded_steps_resume_where_they_stopped() {
        let t = temp("resume");
        let r = &t.0;
        let ct = r.conntrack();
        let now = 50_000u32;
        let mut expired = BTreeSet::new();
        let mut occupied = BTreeSet::new();
        for i in 0..120u32 {
            let old = i % 2 == 0;
            let seen = if old { now - 1001 } else { now };
            let idx = put(r, &conn(i, 1), false, STATE_ESTABLISHED, seen);
            occupied.insert(idx);
            if old {
                expired.insert(idx);
            }
        }
        let cap = ct.capacity() as u32;
        assert!(
            expired.iter().any(|&i| i >= 900),
            "entries all over the table"
        );
        let mut gc = Gc::default();
        let mut at = 0u32;
        while at < cap {
            let n = 100.min(cap - at);
            let st = gc.step_at(r, &BY_STATE, n, now);
            at += n;
            assert_eq!(st.visited, u64::from(n));
            let want: BTreeSet<u32> = expired.iter().copied().filter(|&i| i < at).collect();
            let got: BTreeSet<u32> = freed(r).intersection(&occupied).copied().collect();
            assert_eq!(got, want, "after {at} slots");
            assert_eq!(st.rounds, u64::from(at == cap));
        }
        assert_eq!(gc.totals.visited, u64::from(cap));
        assert_eq!(gc.totals.expired, 60);
        assert_eq!(gc.totals.rounds, 1);
        // Larger than the table: one slot each, one round.
        let st = gc.step_at(r, &BY_STATE, 5 * cap, now);
        assert_eq!((st.visited, st.rounds, st.expired), (u64::from(cap), 1, 0));
    }
}
