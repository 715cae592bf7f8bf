//! Exactly-once close under real concurrency: switch threads (opening
//! connections, closing them on FINs from either direction, confirming
//! provisional pickups, reusing expired slots) and the GC race over one
//! region for the same connections. Every connection that took a backend
//! slot must give it back exactly once and get exactly one
//! closed-connection record, whoever closed it; one that never took one
//! (a provisional pickup never confirmed) gives nothing back and gets no
//! record.
//!
//! The switch side is written against the table's API as switchd's filter
//! uses it (`filter::decide::insert`, `filter::state::change_state`);
//! controld does not depend on switchd.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use controld::gc::Gc;
use shm_layout::conntrack::{
    Conn, Direction, InsertError, STATE_CLOSING, STATE_ESTABLISHED, STATE_PROVISIONAL, STATE_SYN,
    Timeouts, holds_reservation,
};
use shm_layout::shm::Mapping;
use shm_layout::switch_slot::{release, reserve};
use shm_layout::{Capacities, Region};

struct Temp(Region, String);

impl Drop for Temp {
    fn drop(&mut self) {
        let _ = Mapping::unlink(&self.1);
    }
}

const BACKENDS: u32 = 4;
const SWITCHES: u32 = 2;
/// Connections each switch thread opens.
const PER_SWITCH: u32 = 40_000;

/// Milliseconds of the test's clock, which the GC thread advances by one
/// per step of 64 slots: connections expire within a few sweeps.
const T: Timeouts = Timeouts {
    tcp_syn_ms: 3,
    tcp_established_ms: 4,
    tcp_fin_ms: 2,
    udp_ms: 4,
    tcp_provisional_ms: 2,
};

/// What one switch thread did.
#[derive(Default)]
struct Switch {
    /// Ids (`created_ms`) of the connections that took a backend slot.
    reserved: Vec<u32>,
    /// Ids of the connections this switch closed (its records).
    records: Vec<u32>,
    fin_closes: u64,
    insert_closes: u64,
    /// Releases an insert reported with no connection to record.
    unrecorded: u64,
    /// Reservations given back because their insert failed.
    given_back: u64,
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn run_switch(r: &Region, clock: &AtomicU32, t: u32) -> Switch {
    let ct = r.conntrack();
    let counters = r.backend_counters();
    let pid = std::process::id();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ u64::from(t + 1));
    let mut me = Switch::default();
    let mut open: Vec<Conn> = Vec::new();
    for i in 0..PER_SWITCH {
        let now = clock.load(Ordering::Relaxed);
        let backend = i % BACKENDS;
        let b = &counters[backend as usize];
        let c = Conn {
            proto: 6,
            backend_id: backend,
            client_ip: 0xc612_6400 + t,
            // 5-tuples come back: a port is reused every 1024 connections.
            client_port: (i % 1024) as u16,
            vip: 0xc612_000a,
            vip_port: 80,
            backend_ip: 0xc613_0100 + backend,
            backend_port: 8080,
            service: 1,
            // The connection's identity in the records.
            created_ms: (t << 24) | i,
            ..Conn::default()
        };
        let state = match rng.next() % 8 {
            0 => STATE_PROVISIONAL,
            1 | 2 => STATE_SYN,
            _ => STATE_ESTABLISHED,
        };
        // A provisional pickup takes no slot until it is confirmed.
        let reserves = holds_reservation(state);
        if reserves {
            assert!(reserve(b, 0));
        }
        match ct.insert(&c, true, now, state, pid, |s| s.expired(now, &T)) {
            Ok(ins) => {
                if reserves {
                    me.reserved.push(c.created_ms);
                }
                b.total.fetch_add(1, Ordering::Relaxed);
                for (id, gone) in ins.evicted_backends.iter().zip(ins.evicted_conns) {
                    if let Some(id) = id {
                        release(&counters[*id as usize]);
                        match gone {
                            Some(g) => {
                                me.records.push(g.conn.created_ms);
                                me.insert_closes += 1;
                            }
                            None => me.unrecorded += 1,
                        }
                    }
                }
                open.push(c);
            }
            // The insert failed after evicting a connection whole: that
            // one is closed all the same.
            Err(InsertError::ReplyFailedAfterEviction { backend, gone, .. }) => {
                if let Some(id) = backend {
                    release(&counters[id as usize]);
                    match gone {
                        Some(g) => {
                            me.records.push(g.conn.created_ms);
                            me.insert_closes += 1;
                        }
                        None => me.unrecorded += 1,
                    }
                }
                if reserves {
                    release(b);
                    me.given_back += 1;
                }
            }
            // Its 5-tuple's previous entry is still there, or no room.
            Err(_) => {
                if reserves {
                    release(b);
                    me.given_back += 1;
                }
            }
        }
        // A packet of one of this switch's connections: half the time a
        // FIN (from the client or the backend), else a confirmation of a
        // provisional pickup or a refresh.
        if open.is_empty() {
            continue;
        }
        let k = (rng.next() % open.len() as u64) as usize;
        let c = open[k];
        let dir = if rng.next().is_multiple_of(2) {
            Direction::Forward
        } else {
            Direction::Reply
        };
        let key = match dir {
            Direction::Forward => c.forward_key(),
            Direction::Reply => c.reply_key(),
        };
        let Some(hit) = ct.lookup(&key) else {
            open.swap_remove(k);
            continue;
        };
        if hit.conn().created_ms != c.created_ms {
            open.swap_remove(k);
            continue;
        }
        let now = clock.load(Ordering::Relaxed);
        if rng.next().is_multiple_of(2) {
            let closed = ct.update_state(&hit, pid, |s| {
                holds_reservation(s.swap(STATE_CLOSING, Ordering::AcqRel))
            });
            if closed == Some(true) {
                release(b_of(r, &c));
                me.records.push(c.created_ms);
                me.fin_closes += 1;
            }
            open.swap_remove(k);
        } else if ct.slot(hit.idx).tcp_state.load(Ordering::Relaxed) == STATE_PROVISIONAL {
            // As `state::change_state` confirms a pickup.
            let b = b_of(r, &c);
            let ok = ct.update_state(&hit, pid, |s| {
                reserve(b, 0);
                let ok = s
                    .compare_exchange(
                        STATE_PROVISIONAL,
                        STATE_ESTABLISHED,
                        Ordering::AcqRel,
                        Ordering::Relaxed,
                    )
                    .is_ok();
                if !ok {
                    b.active.fetch_sub(1, Ordering::Relaxed);
                }
                ok
            });
            if ok == Some(true) {
                me.reserved.push(c.created_ms);
                ct.slot(hit.idx).last_seen.store(now, Ordering::Relaxed);
            }
        } else {
            ct.slot(hit.idx).last_seen.store(now, Ordering::Relaxed);
        }
    }
    me
}

fn b_of<'a>(r: &'a Region, c: &Conn) -> &'a shm_layout::switch_slot::BackendCounters {
    &r.backend_counters()[c.backend_id as usize]
}

/// Each connection that took a backend slot is closed exactly once, by a
/// FIN, the GC or an insert that displaced it, whatever the interleaving.
/// (It failed on every run before `InsertError::ReplyFailedAfterEviction`:
/// "never closed: 1..3" of ~50k connections, `reconciled_down` hiding the
/// leak in `active`. A forward claim with no free slot evicted a live
/// half-open connection whole through its reply slot, then the insert's
/// own reply claim failed and the victim, already retired, was dropped:
/// its reservation never released, no record.)
#[test]
fn a_fin_the_gc_and_a_reusing_insert_close_each_connection_exactly_once() {
    let inst = format!("close-race-{}", std::process::id());
    let caps = Capacities {
        backends: 16,
        backend_ids: 16,
        conn_slots: 1 << 11,
        maglev_m: 251,
        ..Capacities::default()
    };
    let t = Temp(
        Region::create(&inst, caps).unwrap(),
        shm_layout::region_name(&inst),
    );
    let r = &t.0;
    let cap = r.conntrack().capacity() as u32;
    let clock = AtomicU32::new(1000);
    let done = AtomicBool::new(false);
    let mut gc = Gc::default();
    let (switches, gc_closes_racing) = std::thread::scope(|s| {
        let gc_thread = s.spawn(|| {
            // Bounded: the switches finish in a bounded number of
            // iterations, and so does this loop (at most 10^8 steps).
            for _ in 0..100_000_000u64 {
                if done.load(Ordering::Acquire) {
                    break;
                }
                let now = clock.fetch_add(1, Ordering::Relaxed) + 1;
                gc.step_at(r, &T, 64, now);
            }
            gc.closed.len()
        });
        let workers: Vec<_> = (0..SWITCHES)
            .map(|i| {
                let clock = &clock;
                s.spawn(move || run_switch(r, clock, i))
            })
            .collect();
        let switches: Vec<Switch> = workers.into_iter().map(|w| w.join().unwrap()).collect();
        done.store(true, Ordering::Release);
        (switches, gc_thread.join().unwrap())
    });
    // Everything left expires now.
    let end = clock.load(Ordering::Relaxed) + 10_000;
    for _ in 0..3 {
        gc.step_at(r, &T, cap, end);
    }

    let opened: u64 = switches.iter().map(|s| s.reserved.len() as u64).sum();
    let c = r.backend_counters();
    let sum = |f: &dyn Fn(&shm_layout::switch_slot::BackendCounters) -> u64| -> u64 {
        c.iter().map(f).sum()
    };
    let active = sum(&|b| u64::from(b.active.load(Ordering::Relaxed)));
    let released = sum(&|b| b.released.load(Ordering::Relaxed));
    let down = sum(&|b| b.reconciled_down.load(Ordering::Relaxed));
    let up = sum(&|b| b.reconciled_up.load(Ordering::Relaxed));
    let fins: u64 = switches.iter().map(|s| s.fin_closes).sum();
    let inserts: u64 = switches.iter().map(|s| s.insert_closes).sum();
    eprintln!(
        "opened {opened}, closed by a FIN {fins}, by a reusing insert {inserts}, by the GC \
         {} ({gc_closes_racing} while the switches ran); reconciled down {down}, up {up}",
        gc.closed.len()
    );
    let mut want: BTreeMap<u32, u32> = BTreeMap::new();
    let mut got: BTreeMap<u32, u32> = BTreeMap::new();
    for s in &switches {
        for id in &s.reserved {
            *want.entry(*id).or_default() += 1;
        }
        for id in &s.records {
            *got.entry(*id).or_default() += 1;
        }
        assert_eq!(s.unrecorded, 0, "an insert released a slot with no record");
    }
    for rec in &gc.closed {
        *got.entry(rec.conn.created_ms).or_default() += 1;
    }
    assert!(want.values().all(|&n| n == 1));
    let twice: Vec<_> = got.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "closed more than once: {twice:?}");
    let missing: Vec<_> = want.keys().filter(|id| !got.contains_key(id)).collect();
    let extra: Vec<_> = got.keys().filter(|id| !want.contains_key(id)).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "never closed: {} (first {:?}); closed without a slot: {} (first {:?}); \
         active {active}, released {released} of {opened}",
        missing.len(),
        missing.first(),
        extra.len(),
        extra.first()
    );

    assert_eq!(active, 0);
    // Over-releases are what `reconciled_up` repairs: none may happen. A
    // reservation in flight while a switch thread was descheduled for two
    // whole sweep rounds may be taken for a leak (`reconciled_down`, see
    // controld::gc); its release then finds nothing to give back.
    assert_eq!(up, 0);
    let given_back: u64 = switches.iter().map(|s| s.given_back).sum();
    assert_eq!(released + down, opened + given_back);
    // The race was run: each of the three closers won some connections
    // while the others were running.
    assert!(fins > 0 && inserts > 0 && gc_closes_racing > 0);
    // Nothing is left in the table.
    let ct = r.conntrack();
    assert!(
        (0..cap).all(|i| ct.snapshot(i).unwrap().conn().is_none()
            && ct.snapshot(i).unwrap().reply().is_none())
    );
}
