//! The connection table, shared by all switches.
//!
//! Open addressing over a power-of-two array of cache-line slots, probed
//! linearly for at most [`MAX_PROBE`] slots. A connection occupies a
//! *forward* slot (found by client -> VIP) holding the whole entry, and in NAT
//! mode a *reply* slot (found by backend -> client) that points at it.
//!
//! Concurrency (any process may be killed at any instruction):
//! - Each slot has a `lock` word: low 32 bits a sequence number, high 32
//!   bits the pid of a writer. An even sequence means stable; odd means a
//!   writer owns the slot. Sequences only grow, so a reader can never be
//!   fooled by a slot that was rewritten back to the same sequence.
//! - Readers are lock-free seqlock readers: load `lock` (Acquire), load the
//!   key words (Relaxed), fence (Acquire), reload `lock`; the snapshot is
//!   valid if both loads are equal and even. A slot that stays busy is
//!   skipped after a few tries: a reader never waits on a writer.
//! - A writer claims a slot by compare-and-swap of the exact even lock word
//!   it read (so nothing changed since its snapshot) to odd with its pid,
//!   writes the key words (Relaxed), then Release-stores the next even value.
//! - A writer killed while owning a slot leaves it odd with a dead pid; the
//!   GC (`reclaim_abandoned`) takes it over and turns it into a tombstone.
//!   Nothing else waits for it, so nothing wedges.
//! - `last_seen`, `tcp_state` and the counters are mutable atomics outside
//!   the seqlock, updated by whichever switch sees the packet.
//!
//! Deleted slots become tombstones (lookups probe past them; inserts reuse
//! them); the GC turns a tombstone followed by an empty slot back into empty.

use core::mem::size_of;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};

use crate::fingerprint::Fingerprint;
use crate::fp_type;

/// Longest probe sequence for any key.
/// With four slots per connection (the table is at most half full), a
/// linear-probing insert needs more than 64 probes with probability about
/// e^-12 at full load, and far less below it.
pub const MAX_PROBE: usize = 64;

pub const KIND_EMPTY: u8 = 0;
pub const KIND_FWD: u8 = 1;
pub const KIND_REPLY: u8 = 2;
pub const KIND_TOMB: u8 = 3;

/// `tcp_state` values (UDP entries stay `STATE_ACTIVE`).
pub const STATE_SYN: u32 = 1;
pub const STATE_ESTABLISHED: u32 = 2;
pub const STATE_CLOSING: u32 = 3;
pub const STATE_ACTIVE: u32 = 4;

/// Idle timeouts per state, in milliseconds (from the configuration slot).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    pub tcp_syn_ms: u32,
    pub tcp_established_ms: u32,
    pub tcp_fin_ms: u32,
    pub udp_ms: u32,
}

impl Timeouts {
    /// The idle timeout of an entry of `proto` in `state`.
    #[inline]
    pub fn for_state(&self, proto: u8, state: u32) -> u32 {
        if proto == crate::config_slot::PROTO_UDP {
            return self.udp_ms;
        }
        match state {
            STATE_SYN => self.tcp_syn_ms,
            STATE_CLOSING => self.tcp_fin_ms,
            _ => self.tcp_established_ms,
        }
    }
}

impl ConnSlot {
    /// Adds to the connection's packet and byte counts. A plain load and
    /// store, no locked read-modify-write on the hot path: approximate
    /// under concurrent updates by two switches.
    #[inline(always)]
    pub fn add_counts(&self, packets: u64, bytes: u64) {
        self.packets.store(
            self.packets.load(Ordering::Relaxed) + packets,
            Ordering::Relaxed,
        );
        self.bytes.store(
            self.bytes.load(Ordering::Relaxed) + bytes,
            Ordering::Relaxed,
        );
    }

    /// Whether a forward slot's connection has been idle past its timeout.
    #[inline]
    pub fn expired(&self, now_ms: u32, t: &Timeouts) -> bool {
        let proto = (self.words[0].load(Ordering::Relaxed) >> 48) as u8;
        let state = self.tcp_state.load(Ordering::Relaxed);
        // Signed age: another switch may have stored a `last_seen` slightly
        // newer than our `now_ms` (each switch reads the clock once per loop).
        let age = now_ms.wrapping_sub(self.last_seen.load(Ordering::Relaxed)) as i32;
        age > 0 && age as u32 > t.for_state(proto, state)
    }
}

/// `Conn::flags`: created from a mid-connection packet (no SYN seen).
pub const CONN_MIDFLOW: u8 = 1;

/// One slot: a cache line.
#[repr(C, align(64))]
#[derive(Debug)]
pub struct ConnSlot {
    pub lock: AtomicU64,
    pub words: [AtomicU64; 4],
    /// Milliseconds since region creation of the last packet (wrapping).
    pub last_seen: AtomicU32,
    pub tcp_state: AtomicU32,
    pub packets: AtomicU64,
    pub bytes: AtomicU64,
}

const _: () = assert!(size_of::<ConnSlot>() == 64);

pub(crate) const fn fingerprint(fp: Fingerprint) -> Fingerprint {
    let fp = fp_type!(
        fp, ConnSlot, lock, words, last_seen, tcp_state, packets, bytes
    );
    fp.mix(MAX_PROBE)
}

/// A directional 5-tuple; addresses in host byte order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey {
    pub proto: u8,
    pub src_ip: u32,
    pub dst_ip: u32,
    pub src_port: u16,
    pub dst_port: u16,
}

impl FlowKey {
    /// Table hash under the region's seed (random per region: resists
    /// crafted collisions).
    #[inline]
    pub fn hash(&self, seed: u64) -> u64 {
        hash_words(self.words(), seed)
    }

    /// The key as the hash mixes it: both addresses, then both ports and
    /// the protocol. (A switch's flow cache keys its entries by these too.)
    #[inline(always)]
    pub fn words(&self) -> (u64, u64) {
        (
            ((self.src_ip as u64) << 32) | self.dst_ip as u64,
            ((self.src_port as u64) << 32) | ((self.dst_port as u64) << 16) | self.proto as u64,
        )
    }

    /// The key of its [`words`](FlowKey::words).
    #[inline(always)]
    pub fn from_words((a, b): (u64, u64)) -> Self {
        Self {
            proto: b as u8,
            src_ip: (a >> 32) as u32,
            dst_ip: a as u32,
            src_port: (b >> 32) as u16,
            dst_port: (b >> 16) as u16,
        }
    }
}

/// [`FlowKey::hash`] of a key's [`words`](FlowKey::words).
#[inline(always)]
pub fn hash_words((a, b): (u64, u64), seed: u64) -> u64 {
    let mut h = (a ^ seed).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    h = (h ^ b ^ (h >> 29)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^ (h >> 32)
}

/// A connection entry as decoded from its forward slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Conn {
    pub proto: u8,
    pub mode: u8,
    pub flags: u8,
    pub backend_id: u32,
    pub client_ip: u32,
    pub client_port: u16,
    pub vip: u32,
    pub vip_port: u16,
    pub backend_ip: u32,
    pub backend_port: u16,
    pub service: u16,
    pub created_ms: u32,
}

impl Conn {
    /// client -> VIP
    #[inline]
    pub fn forward_key(&self) -> FlowKey {
        FlowKey {
            proto: self.proto,
            src_ip: self.client_ip,
            dst_ip: self.vip,
            src_port: self.client_port,
            dst_port: self.vip_port,
        }
    }

    /// backend -> client (after destination NAT)
    #[inline]
    pub fn reply_key(&self) -> FlowKey {
        FlowKey {
            proto: self.proto,
            src_ip: self.backend_ip,
            dst_ip: self.client_ip,
            src_port: self.backend_port,
            dst_port: self.client_port,
        }
    }

    fn encode(&self) -> [u64; 4] {
        [
            ((KIND_FWD as u64) << 56)
                | ((self.proto as u64) << 48)
                | ((self.mode as u64) << 40)
                | ((self.flags as u64) << 32)
                | self.backend_id as u64,
            ((self.client_ip as u64) << 32) | self.vip as u64,
            ((self.client_port as u64) << 48)
                | ((self.vip_port as u64) << 32)
                | self.backend_ip as u64,
            ((self.backend_port as u64) << 48)
                | ((self.service as u64) << 32)
                | self.created_ms as u64,
        ]
    }

    fn decode(w: &[u64; 4]) -> Self {
        Self {
            proto: (w[0] >> 48) as u8,
            mode: (w[0] >> 40) as u8,
            flags: (w[0] >> 32) as u8,
            backend_id: w[0] as u32,
            client_ip: (w[1] >> 32) as u32,
            vip: w[1] as u32,
            client_port: (w[2] >> 48) as u16,
            vip_port: (w[2] >> 32) as u16,
            backend_ip: w[2] as u32,
            backend_port: (w[3] >> 48) as u16,
            service: (w[3] >> 32) as u16,
            created_ms: w[3] as u32,
        }
    }
}

#[inline]
fn kind(w: &[u64; 4]) -> u8 {
    (w[0] >> 56) as u8
}

fn encode_reply(key: &FlowKey, fwd: u32) -> [u64; 4] {
    [
        ((KIND_REPLY as u64) << 56) | ((key.proto as u64) << 48) | fwd as u64,
        ((key.src_ip as u64) << 32) | key.dst_ip as u64,
        ((key.src_port as u64) << 48) | ((key.dst_port as u64) << 32),
        0,
    ]
}

/// The key a slot is found by. Forward and reply slots store their key in
/// the same words (proto in w0, addresses in w1, ports in w2), so one
/// decoder serves both.
fn key_of(w: &[u64; 4]) -> FlowKey {
    FlowKey {
        proto: (w[0] >> 48) as u8,
        src_ip: (w[1] >> 32) as u32,
        dst_ip: w[1] as u32,
        src_port: (w[2] >> 48) as u16,
        dst_port: (w[2] >> 32) as u16,
    }
}

/// The ports' bits of a slot's third word.
const KEY_PORTS: u64 = 0xffff_ffff_0000_0000;

/// A key's second word and the ports' bits of its third, as `key_of` reads them.
#[inline]
fn key_words(key: &FlowKey) -> (u64, u64) {
    (
        ((key.src_ip as u64) << 32) | key.dst_ip as u64,
        ((key.src_port as u64) << 48) | ((key.dst_port as u64) << 32),
    )
}

/// Which key found the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Forward,
    Reply,
}

/// A lookup hit: the forward slot index and the entry's words, decoded on
/// demand (the hot path reads three fields of twelve).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hit {
    pub idx: u32,
    pub dir: Direction,
    /// The forward slot's seqlock word the entry was read under: while the
    /// slot's `lock` still equals it, the entry is unchanged.
    pub lock: u64,
    /// The slot the key was found in and its seqlock word: the forward
    /// slot itself, or (`Direction::Reply`) the reply slot that points to it.
    pub via: u32,
    pub via_lock: u64,
    words: [u64; 4],
}

impl Hit {
    /// The connection entry.
    #[inline(always)]
    pub fn conn(&self) -> Conn {
        Conn::decode(&self.words)
    }
}

/// Why an insert failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InsertError {
    /// No claimable slot within the probe window.
    Full,
    /// A live entry with that forward key exists (returned for reuse).
    Exists(u32),
    /// A live connection already owns the reply key.
    ReplyConflict,
}

/// What an insert displaced: an expired connection whose backend's active
/// count the caller must decrement (only if it was not closed already).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Inserted {
    pub idx: u32,
    pub evicted_backends: [Option<u32>; 2],
}

/// A snapshot of one slot's lock word and key words.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub lock: u64,
    pub words: [u64; 4],
}

impl Snapshot {
    pub fn kind(&self) -> u8 {
        kind(&self.words)
    }

    /// The entry, if this is a forward slot.
    pub fn conn(&self) -> Option<Conn> {
        (self.kind() == KIND_FWD).then(|| Conn::decode(&self.words))
    }

    /// For a reply slot: its key and the forward slot it points to.
    pub fn reply(&self) -> Option<(FlowKey, u32)> {
        (self.kind() == KIND_REPLY).then(|| (key_of(&self.words), self.words[0] as u32))
    }
}

const SEQ_MASK: u64 = 0xffff_ffff;

/// Starts loading the cache line holding `value` (into every cache level).
/// A hint: it never faults and has no other effect.
#[inline(always)]
pub fn prefetch<T>(value: &T) {
    let p = value as *const T as *const i8;
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint with no architectural effect; the
    // address comes from a reference anyway.
    unsafe {
        core::arch::x86_64::_mm_prefetch(p, core::arch::x86_64::_MM_HINT_T0)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

#[inline]
fn busy(lock: u64) -> bool {
    lock & 1 == 1
}

/// A view of the connection table in a mapped region.
#[derive(Clone, Copy, Debug)]
pub struct ConnTable<'a> {
    slots: &'a [ConnSlot],
    mask: usize,
    seed: u64,
}

impl<'a> ConnTable<'a> {
    /// `slots.len()` must be a power of two (the region guarantees it).
    pub fn new(slots: &'a [ConnSlot], seed: u64) -> Self {
        assert!(slots.len().is_power_of_two());
        Self {
            slots,
            mask: slots.len() - 1,
            seed,
        }
    }

    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    #[inline]
    pub fn slot(&self, idx: u32) -> &'a ConnSlot {
        let i = idx as usize & self.mask;
        debug_assert!(i < self.slots.len());
        // SAFETY: `mask` is `slots.len() - 1` of a power-of-two length
        // (checked in `new`), so the masked index is in bounds.
        unsafe { self.slots.get_unchecked(i) }
    }

    /// The slot where `key`'s probe sequence starts.
    #[inline]
    pub fn home(&self, key: &FlowKey) -> usize {
        self.home_of(key.words())
    }

    /// [`home`](Self::home) of a key's [`FlowKey::words`].
    #[inline]
    pub fn home_of(&self, words: (u64, u64)) -> usize {
        hash_words(words, self.seed) as usize & self.mask
    }

    /// Starts loading slot `home` (a key's [`home`](Self::home)) into the
    /// cache, so a lookup a few packets later does not stall on memory.
    /// Never faults.
    #[inline]
    pub fn prefetch(&self, home: usize) {
        prefetch(self.slot(home as u32));
    }

    /// Seqlock snapshot of a slot; `None` if a writer holds it.
    #[inline]
    pub fn snapshot(&self, idx: u32) -> Option<Snapshot> {
        let s = self.slot(idx);
        for _ in 0..4 {
            let l1 = s.lock.load(Ordering::Acquire);
            if busy(l1) {
                core::hint::spin_loop();
                continue;
            }
            let words = [
                s.words[0].load(Ordering::Relaxed),
                s.words[1].load(Ordering::Relaxed),
                s.words[2].load(Ordering::Relaxed),
                s.words[3].load(Ordering::Relaxed),
            ];
            fence(Ordering::Acquire);
            let l2 = s.lock.load(Ordering::Relaxed);
            if l1 == l2 {
                return Some(Snapshot { lock: l1, words });
            }
        }
        None
    }

    /// Finds the connection a packet with this key belongs to, by its
    /// forward key or its reply key. Does not judge expiry.
    #[inline(always)]
    pub fn lookup(&self, key: &FlowKey) -> Option<Hit> {
        self.lookup_at(key, self.home(key))
    }

    /// [`lookup`](Self::lookup) with `key`'s home slot (`home(key)`)
    /// already computed.
    #[inline(always)]
    pub fn lookup_at(&self, key: &FlowKey, home: usize) -> Option<Hit> {
        let home = home & self.mask;
        // The key as a slot stores it (see `key_of`): compared word by word,
        // with no decoding of slots that do not match.
        let (w1, w2) = key_words(key);
        // Most packets find their forward entry in its home slot: that case
        // inline, everything else (probing on, reply slots) out of line.
        if let Some(snap) = self.snapshot(home as u32) {
            let w = &snap.words;
            if w[1] == w1
                && w[2] & KEY_PORTS == w2
                && w[0] >> 48 == (KIND_FWD as u64) << 8 | key.proto as u64
            {
                return Some(Hit {
                    idx: home as u32,
                    dir: Direction::Forward,
                    lock: snap.lock,
                    via: home as u32,
                    via_lock: snap.lock,
                    words: *w,
                });
            }
            if kind(w) == KIND_EMPTY {
                return None;
            }
        }
        self.lookup_probe(key, home, w1, w2)
    }

    /// [`lookup`](Self::lookup) past the home slot's fast answers: the
    /// whole probe sequence (the home slot again included).
    #[inline(never)]
    fn lookup_probe(&self, key: &FlowKey, home: usize, w1: u64, w2: u64) -> Option<Hit> {
        for i in 0..MAX_PROBE {
            let idx = ((home + i) & self.mask) as u32;
            let Some(snap) = self.snapshot(idx) else {
                continue;
            };
            let k = snap.kind();
            if k == KIND_EMPTY {
                return None;
            }
            if snap.words[1] != w1
                || snap.words[2] & KEY_PORTS != w2
                || (snap.words[0] >> 48) as u8 != key.proto
            {
                continue;
            }
            match k {
                KIND_FWD => {
                    return Some(Hit {
                        idx,
                        dir: Direction::Forward,
                        lock: snap.lock,
                        via: idx,
                        via_lock: snap.lock,
                        words: snap.words,
                    });
                }
                KIND_REPLY => {
                    let fwd = snap.words[0] as u32;
                    if let Some(s) = self.snapshot(fwd)
                        && s.conn().is_some_and(|c| c.reply_key() == *key)
                    {
                        return Some(Hit {
                            idx: fwd,
                            dir: Direction::Reply,
                            lock: s.lock,
                            via: idx,
                            via_lock: snap.lock,
                            words: s.words,
                        });
                    }
                }
                _ => {}
            }
        }
        None
    }

    /// Inserts a connection: its forward slot, and a reply slot if
    /// `with_reply`. `expired(slot)` says whether a live-looking forward
    /// slot may be reused. On success the entry is visible to every switch.
    pub fn insert(
        &self,
        conn: &Conn,
        with_reply: bool,
        now_ms: u32,
        tcp_state: u32,
        pid: u32,
        expired: impl Fn(&ConnSlot) -> bool,
    ) -> Result<Inserted, InsertError> {
        let fkey = conn.forward_key();
        let (fidx, flock, evicted_f) = self.claim(&fkey, KIND_FWD, pid, None, &expired)?;
        let mut out = Inserted {
            idx: fidx,
            evicted_backends: [evicted_f, None],
        };
        if with_reply {
            match self.claim(&conn.reply_key(), KIND_REPLY, pid, Some(fidx), &expired) {
                Ok((ridx, rlock, evicted_r)) => {
                    out.evicted_backends[1] = evicted_r;
                    self.publish(ridx, rlock, &encode_reply(&conn.reply_key(), fidx));
                }
                Err(e) => {
                    self.publish(fidx, flock, &[(KIND_TOMB as u64) << 56, 0, 0, 0]);
                    return Err(match e {
                        InsertError::Exists(_) => InsertError::ReplyConflict,
                        e => e,
                    });
                }
            }
        }
        let s = self.slot(fidx);
        s.last_seen.store(now_ms, Ordering::Relaxed);
        s.tcp_state.store(tcp_state, Ordering::Relaxed);
        s.packets.store(0, Ordering::Relaxed);
        s.bytes.store(0, Ordering::Relaxed);
        self.publish(fidx, flock, &conn.encode());
        Ok(out)
    }

    /// Claims a slot for `key`: returns (index, the odd lock word we hold,
    /// backend id of an expired connection we displaced). `own_fwd`: the
    /// forward slot this insert already holds; a reply slot pointing at it
    /// is a leftover of the connection that slot held before (the same
    /// 5-tuple opened again), not a live conflict.
    fn claim(
        &self,
        key: &FlowKey,
        want: u8,
        pid: u32,
        own_fwd: Option<u32>,
        expired: &impl Fn(&ConnSlot) -> bool,
    ) -> Result<(u32, u64, Option<u32>), InsertError> {
        let home = self.home(key);
        for _attempt in 0..4 {
            let mut cand: Option<(u32, u64, Option<u32>)> = None;
            for i in 0..MAX_PROBE {
                let idx = ((home + i) & self.mask) as u32;
                let Some(snap) = self.snapshot(idx) else {
                    continue;
                };
                match snap.kind() {
                    KIND_EMPTY => {
                        cand.get_or_insert((idx, snap.lock, None));
                        break;
                    }
                    KIND_TOMB => {
                        cand.get_or_insert((idx, snap.lock, None));
                    }
                    KIND_FWD => {
                        let c = Conn::decode(&snap.words);
                        let dead = expired(self.slot(idx));
                        if dead {
                            cand.get_or_insert((idx, snap.lock, Some(c.backend_id)));
                        } else if want == KIND_FWD && c.forward_key() == *key {
                            return Err(InsertError::Exists(idx));
                        }
                    }
                    KIND_REPLY => {
                        let (rkey, fwd) = (key_of(&snap.words), snap.words[0] as u32);
                        // A busy target may be an insert in progress (reply
                        // slots are published first): treat it as live.
                        let target_live = match self.snapshot(fwd) {
                            _ if own_fwd == Some(fwd) => false,
                            None => true,
                            Some(t) => t
                                .conn()
                                .is_some_and(|c| c.reply_key() == rkey && !expired(self.slot(fwd))),
                        };
                        if !target_live {
                            cand.get_or_insert((idx, snap.lock, None));
                        } else if want == KIND_REPLY && rkey == *key {
                            return Err(InsertError::Exists(idx));
                        }
                    }
                    _ => {}
                }
            }
            let Some((idx, lock, evicted)) = cand else {
                return Err(InsertError::Full);
            };
            if let Some(held) = self.hold(idx, lock, 1, pid) {
                // The displaced connection's reservation is released by
                // whoever closes it first (see `retire`).
                let evicted = evicted.filter(|_| self.close(idx));
                return Ok((idx, held, evicted));
            }
        }
        Err(InsertError::Full)
    }

    /// Takes a slot whose lock word is exactly `seen` by compare-and-swap,
    /// advancing the sequence by `step` (1 from even to odd; 2 to take over
    /// an odd word) and tagging it with our pid. `None` if the word changed.
    fn hold(&self, idx: u32, seen: u64, step: u64, pid: u32) -> Option<u64> {
        let held = (((seen & SEQ_MASK) + step) & SEQ_MASK) | ((pid as u64) << 32);
        self.slot(idx)
            .lock
            .compare_exchange(seen, held, Ordering::Acquire, Ordering::Relaxed)
            .ok()
            .map(|_| held)
    }

    /// Writes the key words of a slot we hold and releases it.
    fn publish(&self, idx: u32, held: u64, words: &[u64; 4]) {
        let s = self.slot(idx);
        // Order the odd lock (taken by the CAS) before the word stores.
        fence(Ordering::Release);
        for (w, v) in s.words.iter().zip(words) {
            w.store(*v, Ordering::Relaxed);
        }
        // `held` carries an odd sequence; the next one is even (and has no pid).
        s.lock
            .store(((held & SEQ_MASK) + 1) & SEQ_MASK, Ordering::Release);
    }

    /// Moves a forward slot's `tcp_state` to `STATE_CLOSING`; true if this
    /// call made the move (the connection still held its backend's
    /// `active` reservation, which the caller now releases). Atomic, so of
    /// a switch closing the connection on a FIN, the GC expiring it and an
    /// insert reusing its slot, exactly one releases.
    #[inline]
    pub fn close(&self, idx: u32) -> bool {
        self.slot(idx)
            .tcp_state
            .swap(STATE_CLOSING, Ordering::AcqRel)
            != STATE_CLOSING
    }

    /// Deletes a forward slot that still holds exactly `snap`, closing it
    /// while it is held (so no insert can reuse the slot in between).
    /// `None` if the slot changed; else whether the connection still held
    /// its backend reservation (see [`ConnTable::close`]).
    pub fn retire(&self, idx: u32, snap: &Snapshot, pid: u32) -> Option<bool> {
        if busy(snap.lock) {
            return None;
        }
        let held = self.hold(idx, snap.lock, 1, pid)?;
        let reserved = self.close(idx);
        self.publish(idx, held, &[(KIND_TOMB as u64) << 56, 0, 0, 0]);
        Some(reserved)
    }

    /// Deletes the slot if it still holds exactly `snap` (returns whether it
    /// did). Used by the GC and by tests.
    pub fn remove(&self, idx: u32, snap: &Snapshot, pid: u32) -> bool {
        if busy(snap.lock) {
            return false;
        }
        let Some(held) = self.hold(idx, snap.lock, 1, pid) else {
            return false;
        };
        self.publish(idx, held, &[(KIND_TOMB as u64) << 56, 0, 0, 0]);
        true
    }

    /// Turns a tombstone into an empty slot when the next slot is empty (no
    /// probe chain can pass through it then). Returns whether it did.
    pub fn compact(&self, idx: u32, pid: u32) -> bool {
        let (Some(me), Some(next)) = (self.snapshot(idx), self.snapshot(idx.wrapping_add(1)))
        else {
            return false;
        };
        if me.kind() != KIND_TOMB || next.kind() != KIND_EMPTY {
            return false;
        }
        let Some(held) = self.hold(idx, me.lock, 1, pid) else {
            return false;
        };
        // Re-check the successor while holding this slot: an insert may have
        // filled it meanwhile, and then our tombstone must stay.
        let still_empty = self
            .snapshot(idx.wrapping_add(1))
            .is_some_and(|n| n.kind() == KIND_EMPTY);
        let words = if still_empty {
            [0, 0, 0, 0]
        } else {
            [(KIND_TOMB as u64) << 56, 0, 0, 0]
        };
        self.publish(idx, held, &words);
        still_empty
    }

    /// If the slot is held by a writer whose process is dead, takes it over
    /// and makes it a tombstone. Returns whether it did.
    pub fn reclaim_abandoned(&self, idx: u32, pid: u32) -> bool {
        let s = self.slot(idx);
        let lock = s.lock.load(Ordering::Acquire);
        if !busy(lock) {
            return false;
        }
        let owner = (lock >> 32) as u32;
        if crate::time::pid_alive(owner) {
            return false;
        }
        // Keep it odd (held) but with a new sequence and our pid.
        let Some(held) = self.hold(idx, lock, 2, pid) else {
            return false;
        };
        self.publish(idx, held, &[(KIND_TOMB as u64) << 56, 0, 0, 0]);
        true
    }

    /// Whether a writer currently holds the slot, and its pid.
    pub fn holder(&self, idx: u32) -> Option<u32> {
        let lock = self.slot(idx).lock.load(Ordering::Acquire);
        busy(lock).then_some((lock >> 32) as u32)
    }
}

/// The connection table as a read-only mapping may use it: lookups,
/// snapshots and a slot's counters, none of [`ConnTable`]'s writes (a
/// read-only [`Region`](crate::Region) gives only this; see
/// `Region::conntrack_reader`).
#[derive(Clone, Copy, Debug)]
pub struct ConnReader<'a>(ConnTable<'a>);

/// What a slot says besides its key words, read with Relaxed loads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotReading {
    pub tcp_state: u32,
    pub last_seen: u32,
    pub packets: u64,
    pub bytes: u64,
}

impl<'a> ConnReader<'a> {
    /// `slots.len()` must be a power of two (the region guarantees it).
    pub fn new(slots: &'a [ConnSlot], seed: u64) -> Self {
        Self(ConnTable::new(slots, seed))
    }

    pub fn capacity(&self) -> usize {
        self.0.capacity()
    }

    /// See [`ConnTable::snapshot`].
    pub fn snapshot(&self, idx: u32) -> Option<Snapshot> {
        self.0.snapshot(idx)
    }

    /// See [`ConnTable::lookup`].
    pub fn lookup(&self, key: &FlowKey) -> Option<Hit> {
        self.0.lookup(key)
    }

    /// See [`ConnTable::holder`].
    pub fn holder(&self, idx: u32) -> Option<u32> {
        self.0.holder(idx)
    }

    /// The state, last-seen time and counters of slot `idx`.
    pub fn reading(&self, idx: u32) -> SlotReading {
        let s = self.0.slot(idx);
        SlotReading {
            tcp_state: s.tcp_state.load(Ordering::Relaxed),
            last_seen: s.last_seen.load(Ordering::Relaxed),
            packets: s.packets.load(Ordering::Relaxed),
            bytes: s.bytes.load(Ordering::Relaxed),
        }
    }

    /// See [`ConnSlot::expired`].
    pub fn expired(&self, idx: u32, now_ms: u32, t: &Timeouts) -> bool {
        self.0.slot(idx).expired(now_ms, t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::region::tests::temp;

    fn conn(i: u32) -> Conn {
        Conn {
            proto: 6,
            mode: 0,
            flags: 0,
            backend_id: i % 7,
            client_ip: 0xc612_6400 + (i >> 16),
            client_port: (i & 0xffff) as u16,
            vip: 0xc612_000a,
            vip_port: 80,
            backend_ip: 0xc613_0100 + (i % 7),
            backend_port: 8080,
            service: 1,
            created_ms: 5,
        }
    }

    const PID: u32 = 1;

    proptest::proptest! {
        #[test]
        fn a_key_comes_back_from_its_words(proto: u8, src_ip: u32, dst_ip: u32, src_port: u16, dst_port: u16) {
            let k = FlowKey { proto, src_ip, dst_ip, src_port, dst_port };
            proptest::prop_assert_eq!(FlowKey::from_words(k.words()), k);
        }
    }

    #[test]
    fn forward_and_reply_keys_find_the_same_entry() {
        let t = temp("ct1");
        let ct = t.0.conntrack();
        let c = conn(42);
        let ins = ct.insert(&c, true, 10, STATE_SYN, PID, |_| false).unwrap();
        let f = ct.lookup(&c.forward_key()).unwrap();
        assert_eq!((f.idx, f.dir, f.conn()), (ins.idx, Direction::Forward, c));
        let r = ct.lookup(&c.reply_key()).unwrap();
        assert_eq!((r.idx, r.dir, r.conn()), (ins.idx, Direction::Reply, c));
        assert_eq!(
            ct.slot(ins.idx).tcp_state.load(Ordering::Relaxed),
            STATE_SYN
        );
        assert!(ct.lookup(&conn(43).forward_key()).is_none());
        // Duplicate forward key is reported, not inserted twice.
        assert_eq!(
            ct.insert(&c, true, 10, STATE_SYN, PID, |_| false),
            Err(InsertError::Exists(ins.idx))
        );
    }

    #[test]
    fn many_entries_all_found_then_removed() {
        let t = temp("ct2");
        let ct = t.0.conntrack();
        let n = 600; // 1200 slots of 4096
        let mut placed = 0;
        for i in 0..n {
            if ct
                .insert(&conn(i), true, 1, STATE_ESTABLISHED, PID, |_| false)
                .is_ok()
            {
                placed += 1;
            }
        }
        assert_eq!(placed, n, "table at 30% load must place every entry");
        for i in 0..n {
            let c = conn(i);
            assert_eq!(ct.lookup(&c.forward_key()).unwrap().conn(), c);
            assert_eq!(ct.lookup(&c.reply_key()).unwrap().conn(), c);
        }
        // Remove every forward slot: reply slots become orphans, not hits.
        for i in 0..n {
            let h = ct.lookup(&conn(i).forward_key()).unwrap();
            let snap = ct.snapshot(h.idx).unwrap();
            assert!(ct.remove(h.idx, &snap, PID));
        }
        for i in 0..n {
            assert!(ct.lookup(&conn(i).forward_key()).is_none());
            assert!(ct.lookup(&conn(i).reply_key()).is_none());
        }
        // Orphaned reply slots and tombstones are reusable.
        for i in n..2 * n {
            ct.insert(&conn(i), true, 1, STATE_ESTABLISHED, PID, |_| false)
                .unwrap();
        }
    }

    #[test]
    fn expired_entries_are_reused_and_report_their_backend() {
        let t = temp("ct3");
        let ct = t.0.conntrack();
        let a = conn(1);
        let ia = ct.insert(&a, false, 1, STATE_SYN, PID, |_| false).unwrap();
        // Same home slot region: fill the probe window so the next insert must evict.
        let mut b = a;
        b.client_port = 9;
        let ins = ct
            .insert(&b, false, 1, STATE_SYN, PID, |s| {
                core::ptr::eq(s, ct.slot(ia.idx))
            })
            .unwrap();
        // Either it took an empty slot, or it evicted `a` and says so.
        if ins.idx == ia.idx {
            assert_eq!(ins.evicted_backends[0], Some(a.backend_id));
        }
        assert_eq!(ct.lookup(&b.forward_key()).unwrap().conn(), b);
    }

    #[test]
    fn abandoned_slot_is_reclaimed_and_never_blocks_lookups() {
        let t = temp("ct4");
        let ct = t.0.conntrack();
        let c = conn(7);
        let ins = ct.insert(&c, false, 1, STATE_SYN, PID, |_| false).unwrap();
        // Simulate a writer killed mid-write: odd sequence, dead pid.
        let dead = i32::MAX as u32 - 3;
        let s = ct.slot(ins.idx);
        let l = s.lock.load(Ordering::Relaxed);
        s.lock
            .store((l + 1) | ((dead as u64) << 32), Ordering::Relaxed);
        assert_eq!(ct.holder(ins.idx), Some(dead));
        assert!(
            ct.lookup(&c.forward_key()).is_none(),
            "busy slot is skipped, not waited on"
        );
        assert!(ct.reclaim_abandoned(ins.idx, PID));
        assert_eq!(ct.holder(ins.idx), None);
        assert_eq!(ct.snapshot(ins.idx).unwrap().kind(), KIND_TOMB);
        // A live holder is left alone.
        let l = s.lock.load(Ordering::Relaxed);
        s.lock.store(
            (l + 1) | ((std::process::id() as u64) << 32),
            Ordering::Relaxed,
        );
        assert!(!ct.reclaim_abandoned(ins.idx, PID));
    }

    #[test]
    fn tombstones_compact_back_to_empty() {
        let t = temp("ct5");
        let ct = t.0.conntrack();
        let c = conn(3);
        let ins = ct.insert(&c, false, 1, STATE_SYN, PID, |_| false).unwrap();
        let snap = ct.snapshot(ins.idx).unwrap();
        assert!(ct.remove(ins.idx, &snap, PID));
        let next_empty = ct.snapshot(ins.idx + 1).unwrap().kind() == KIND_EMPTY;
        assert_eq!(ct.compact(ins.idx, PID), next_empty);
    }

    /// Concurrent inserters and readers: every reader snapshot of a forward
    /// slot decodes to a connection some writer inserted (no torn entries).
    #[test]
    fn concurrent_inserts_and_lookups_never_tear() {
        let t = temp("ct6");
        let ct = t.0.conntrack();
        let stop = std::sync::atomic::AtomicBool::new(false);
        struct StopOnDrop<'a>(&'a std::sync::atomic::AtomicBool);
        impl Drop for StopOnDrop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        struct PanicStop<'a>(&'a std::sync::atomic::AtomicBool);
        impl Drop for PanicStop<'_> {
            fn drop(&mut self) {
                if std::thread::panicking() {
                    self.0.store(true, Ordering::Relaxed);
                }
            }
        }
        std::thread::scope(|sc| {
            let _stop = StopOnDrop(&stop);
            let reader = sc.spawn(|| {
                let mut seen = 0u64;
                // Scan while the writers run, and once more after they
                // stopped (so a reader scheduled late still checks all).
                loop {
                    let last = stop.load(Ordering::Acquire);
                    for idx in 0..ct.capacity() as u32 {
                        if let Some(c) = ct.snapshot(idx).and_then(|s| s.conn()) {
                            let i = ((c.client_ip - 0xc612_6400) << 16) | c.client_port as u32;
                            assert_eq!(c, conn(i), "torn entry at {idx}");
                            seen += 1;
                        }
                    }
                    if last {
                        break;
                    }
                }
                seen
            });
            let writers: Vec<_> = (0..2u32)
                .map(|w| {
                    let ct = &ct;
                    let stop = &stop;
                    sc.spawn(move || {
                        let _stop = PanicStop(stop);
                        for i in (w..600).step_by(2) {
                            ct.insert(&conn(i), true, 1, STATE_SYN, PID, |_| false)
                                .unwrap();
                        }
                    })
                })
                .collect();
            for w in writers {
                w.join().unwrap();
            }
            stop.store(true, Ordering::Release);
            assert!(
                reader.join().unwrap() >= 600,
                "the last scan sees every entry"
            );
        });
        for i in 0..600 {
            assert_eq!(ct.lookup(&conn(i).reply_key()).unwrap().conn(), conn(i));
        }
    }
}
