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
//!   GC (`reclaim_abandoned`) takes it over and turns it into a tombstone
//!   (giving back the backend reservation of a forward entry it held).
//!   Nothing else waits for it, so nothing wedges.
//! - `last_seen`, `tcp_state` and the counters are mutable atomics outside
//!   the seqlock, updated by whichever switch sees the packet.
//!
//! Deleted slots become tombstones (lookups probe past them; inserts reuse
//! them); the GC turns a tombstone followed by an empty slot back into empty.
//!
//! Reachability: a lookup stops at the first empty slot, so no key may sit
//! behind an empty slot of its probe sequence. An insert decides where to
//! put its key from snapshots that may be stale by the time it holds its
//! slot (it skipped a busy slot, or a slot it probed past was deleted and
//! compacted since). So only compaction ever publishes an empty slot, and
//! it holds the slot with the [`COMPACTING`] mark meanwhile; an insert,
//! once it holds its slot, reads back the slots between its key's home and
//! that slot (`reachable`, nearest first) and gives the slot back and
//! probes again if one is empty or marked. Both sides take their slot with
//! a sequentially consistent compare-and-swap and then read the other's
//! slot sequentially consistently, so at least one of them sees the other;
//! docs/ARCHITECTURE.md has the argument.

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
/// Half-open, NAT: the backend answered the client's SYN with a SYN-ACK;
/// the client's ACK is still due. Only that ACK establishes the
/// connection (a backend answers a spoofed SYN as readily as a real one).
pub const STATE_SYN_ACKED: u32 = 5;
/// Provisional: picked up from a mid-connection packet (no SYN seen), not
/// yet confirmed (see docs/ARCHITECTURE.md, "Provisional entries"). Holds
/// no reservation of its backend's `active` count; short timeout.
pub const STATE_PROVISIONAL: u32 = 6;
/// SYN proxy (NAT): the client completed the handshake with the switch's
/// SYN cookie; the switch sent the backend its SYN and waits for its
/// SYN-ACK. Half-open (timeout `tcp_syn`, evictable), holds a reservation.
/// The connection's `Conn::flags` carry [`CONN_SYNPROXY`].
pub const STATE_SYNPROXY: u32 = 7;

/// Idle timeouts per state, in milliseconds (from the configuration slot).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    pub tcp_syn_ms: u32,
    pub tcp_established_ms: u32,
    pub tcp_fin_ms: u32,
    pub udp_ms: u32,
    /// A provisional entry (picked up mid-flow, not yet confirmed).
    pub tcp_provisional_ms: u32,
}

/// Whether a forward entry in `state` holds a reservation of its
/// backend's `active` count: every state but `STATE_CLOSING` (released on
/// the way there) and `STATE_PROVISIONAL` (takes one only when confirmed).
#[inline]
pub fn holds_reservation(state: u32) -> bool {
    state != STATE_CLOSING && state != STATE_PROVISIONAL
}

/// A live entry a full probe window may give up for a new connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Evicted {
    /// `STATE_PROVISIONAL`.
    Provisional,
    /// `STATE_SYN` or `STATE_SYN_ACKED`.
    HalfOpen,
}

impl Evicted {
    /// Which kind of evictable entry a TCP forward entry in `state` is, if any.
    #[inline]
    pub fn of_state(state: u32) -> Option<Evicted> {
        match state {
            STATE_PROVISIONAL => Some(Evicted::Provisional),
            STATE_SYN | STATE_SYN_ACKED | STATE_SYNPROXY => Some(Evicted::HalfOpen),
            _ => None,
        }
    }
}

impl Timeouts {
    /// The idle timeout of an entry of `proto` in `state`.
    #[inline]
    pub fn for_state(&self, proto: u8, state: u32) -> u32 {
        if proto == crate::config_slot::PROTO_UDP {
            return self.udp_ms;
        }
        match state {
            STATE_SYN | STATE_SYN_ACKED | STATE_SYNPROXY => self.tcp_syn_ms,
            STATE_PROVISIONAL => self.tcp_provisional_ms,
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
/// `Conn::flags`: a SYN-proxied connection (see the filter's `synproxy`):
/// the client's handshake was with the switch's SYN cookie, the backend's
/// with the switch, and every segment is translated by the sequence delta
/// kept in the reply slot ([`Splice`]).
pub const CONN_SYNPROXY: u8 = 2;

/// The splice state of a SYN-proxied connection, in its reply slot's
/// words outside the seqlock (which a reply slot does not otherwise use):
/// `last_seen` holds the cookie (the ISN the switch gave the client), set
/// once after the insert; `tcp_state` holds the client's ISN while the
/// forward entry is `STATE_SYNPROXY`, then the delta (backend ISN minus
/// cookie), stored before the forward entry leaves `STATE_SYNPROXY`.
#[derive(Clone, Copy, Debug)]
pub struct Splice<'a>(pub &'a ConnSlot);

impl Splice<'_> {
    #[inline]
    pub fn cookie(&self) -> u32 {
        self.0.last_seen.load(Ordering::Relaxed)
    }
    #[inline]
    pub fn set_cookie(&self, cookie: u32) {
        self.0.last_seen.store(cookie, Ordering::Relaxed);
    }
    /// The client's ISN (while `STATE_SYNPROXY`) or the delta (after).
    #[inline]
    pub fn word(&self) -> u32 {
        self.0.tcp_state.load(Ordering::Acquire)
    }
    #[inline]
    pub fn set_word(&self, v: u32) {
        self.0.tcp_state.store(v, Ordering::Release);
    }
}

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

fn encode_reply(key: &FlowKey, fwd: u32, hop: ClientHop) -> [u64; 4] {
    [
        ((KIND_REPLY as u64) << 56) | ((key.proto as u64) << 48) | fwd as u64,
        ((key.src_ip as u64) << 32) | key.dst_ip as u64,
        ((key.src_port as u64) << 48) | ((key.dst_port as u64) << 32),
        hop.0,
    ]
}

/// The client-side next hop a NAT connection learned from the frame that
/// opened it: that frame's source MAC and the port it came in on. It lives
/// in the reply slot's last word, which holds nothing else (so the layout
/// is unchanged), and reaches the reply path in [`Hit::client_hop`]: a
/// reply to a client the routing table has no neighbour for yet can still
/// go out (see the filter's `client_hop`). Bits 0..48 the MAC, 48..64 the
/// port; zero is "none" (a zero MAC is never learned).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClientHop(u64);

impl ClientHop {
    pub const NONE: ClientHop = ClientHop(0);

    /// The hop of a frame from `mac` received on `port`; [`NONE`](Self::NONE)
    /// for a MAC no host can have (broadcast, multicast, zero) or a port
    /// number that does not fit.
    #[inline]
    pub fn new(mac: [u8; 6], port: u32) -> Self {
        if mac[0] & 1 != 0 || mac == [0; 6] || port > u32::from(u16::MAX) {
            return Self::NONE;
        }
        let mut w = [0u8; 8];
        w[2..].copy_from_slice(&mac);
        Self(u64::from(port) << 48 | u64::from_be_bytes(w))
    }

    /// The learned MAC, if any.
    #[inline]
    pub fn mac(&self) -> Option<[u8; 6]> {
        let b = self.0.to_be_bytes();
        let mac = [b[2], b[3], b[4], b[5], b[6], b[7]];
        (mac != [0; 6]).then_some(mac)
    }

    /// The port the frame came in on.
    #[inline]
    pub fn port(&self) -> u32 {
        (self.0 >> 48) as u32
    }
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
    /// For a reply hit: the client-side next hop the connection learned
    /// when it was created (NAT); [`ClientHop::NONE`] otherwise.
    pub client_hop: ClientHop,
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
    /// The reply claim failed (`conflict`: as [`InsertError::ReplyConflict`],
    /// else as [`InsertError::Full`]) after the forward claim had evicted a
    /// live connection whole (through its reply slot), whose forward entry
    /// is already retired and cannot be put back: the caller gives back
    /// `backend` (if it held a reservation) and records `gone`, as for an
    /// eviction of a successful insert. `live`: the kind it was.
    ReplyFailedAfterEviction {
        conflict: bool,
        backend: Option<u32>,
        gone: Option<Gone>,
        live: Option<Evicted>,
    },
}

/// What an insert displaced: an expired connection, or a live provisional
/// or half-open one, whose backend's active count the caller must
/// decrement (only if it still held a reservation), and which live
/// entries it evicted (for the caller's counters).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Inserted {
    pub idx: u32,
    pub evicted_backends: [Option<u32>; 2],
    /// Per claimed slot (forward, reply): the live entry it evicted.
    pub evicted_live: [Option<Evicted>; 2],
    /// Per `evicted_backends` entry: the connection this insert closed
    /// (for its closed-connection record).
    pub evicted_conns: [Option<Gone>; 2],
}

/// A connection an insert closed when it displaced it: its entry, its
/// forward slot then and that slot's counts (the client's direction).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gone {
    pub conn: Conn,
    pub idx: u32,
    pub packets: u64,
    pub bytes: u64,
}

/// A slot [`ConnTable::reclaim_abandoned`] took back from a dead writer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reclaimed {
    /// The backend whose `active` count the caller releases: the slot held
    /// a forward entry that still had its reservation. (If the dead writer
    /// was inserting a mid-flow connection, which reserves only after the
    /// insert, this gives back one slot too many; the GC's reconciliation
    /// of `active` against the table repairs either error.)
    pub release: Option<u32>,
}

/// The pid half of a lock word a writer holds.
#[inline]
fn tag(pid: u32) -> u64 {
    (pid as u64) << 32
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

/// The top bit of a held lock word (above the holder's pid, which Linux
/// keeps below 2^22): the holder is compacting the slot and may publish it
/// empty. Every other writer publishes a non-empty slot.
pub const COMPACTING: u64 = 1 << 63;

/// The pid half of a lock word, without the [`COMPACTING`] mark.
#[inline]
fn holder_pid(lock: u64) -> u32 {
    ((lock & !COMPACTING) >> 32) as u32
}

/// A slot an insert holds: its index, the odd lock word it holds, what the
/// slot held before and, if that was an expired forward entry, its backend.
struct Claim {
    idx: u32,
    held: u64,
    was: [u64; 4],
    evicts: Option<u32>,
    /// A live provisional or half-open entry this claim gives up.
    live: Option<Evicted>,
    /// The backend of a live connection whose forward entry this claim
    /// already retired (a reply claim evicting a connection whole), if
    /// that entry held a reservation.
    retired: Option<u32>,
    /// That retired connection, with its forward slot's counts.
    retired_conn: Option<Gone>,
}

/// A live entry a claim may evict when its window has no free or expired
/// slot: the oldest (by `last_seen`) provisional or half-open connection
/// with a slot in the window. A forward slot is evicted like an expired
/// one (closed when the insert publishes, its reply slot left to the GC);
/// a reply slot's connection is evicted whole (`target`: its forward
/// slot, retired before the claim returns).
#[derive(Clone, Copy, Debug)]
struct Victim {
    idx: u32,
    snap: Snapshot,
    /// Milliseconds since the connection was last seen (signed: another
    /// switch may have stored a slightly newer time than ours).
    age: i32,
    kind: Evicted,
    backend: u32,
    target: Option<(u32, Snapshot)>,
}

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
    #[inline(always)]
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
                    client_hop: ClientHop::NONE,
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
                        client_hop: ClientHop::NONE,
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
                            client_hop: ClientHop(snap.words[3]),
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
        self.insert_with_hop(
            conn,
            with_reply,
            ClientHop::NONE,
            now_ms,
            tcp_state,
            pid,
            expired,
        )
    }

    /// [`insert`](Self::insert), keeping `hop` in the reply slot (if there
    /// is one) for the reply path.
    #[allow(clippy::too_many_arguments)]
    pub fn insert_with_hop(
        &self,
        conn: &Conn,
        with_reply: bool,
        hop: ClientHop,
        now_ms: u32,
        tcp_state: u32,
        pid: u32,
        expired: impl Fn(&ConnSlot) -> bool,
    ) -> Result<Inserted, InsertError> {
        let fkey = conn.forward_key();
        let fwd = self.claim(&fkey, KIND_FWD, pid, None, now_ms, &expired)?;
        let fidx = fwd.idx;
        let mut out = Inserted {
            idx: fidx,
            evicted_backends: [None, None],
            evicted_live: [fwd.live, None],
            evicted_conns: [None, None],
        };
        if with_reply {
            let rkey = conn.reply_key();
            match self.claim(&rkey, KIND_REPLY, pid, Some(fidx), now_ms, &expired) {
                Ok(r) => {
                    let gone = self.gone(&r);
                    out.evicted_backends[1] = self.evict(&r).or(r.retired);
                    out.evicted_conns[1] = out.evicted_backends[1].and(gone.or(r.retired_conn));
                    out.evicted_live[1] = r.live;
                    // The reply direction's counts of the new connection.
                    let rs = self.slot(r.idx);
                    rs.packets.store(0, Ordering::Relaxed);
                    rs.bytes.store(0, Ordering::Relaxed);
                    self.publish(r.idx, r.held, &encode_reply(&conn.reply_key(), fidx, hop));
                }
                Err(e) => {
                    // The forward slot goes back as it was: an expired
                    // entry in it keeps its reservation (for the GC). A
                    // connection the forward claim evicted whole is closed
                    // already: the caller must close it.
                    self.give_back(&fwd);
                    let conflict = matches!(e, InsertError::Exists(_) | InsertError::ReplyConflict);
                    if fwd.retired.is_some() || fwd.retired_conn.is_some() {
                        return Err(InsertError::ReplyFailedAfterEviction {
                            conflict,
                            backend: fwd.retired,
                            gone: fwd.retired.and(fwd.retired_conn),
                            live: fwd.live,
                        });
                    }
                    return Err(if conflict {
                        InsertError::ReplyConflict
                    } else {
                        e
                    });
                }
            }
        }
        // Only now, when nothing can fail, is a displaced entry closed.
        let gone = self.gone(&fwd);
        out.evicted_backends[0] = self.evict(&fwd).or(fwd.retired);
        out.evicted_conns[0] = out.evicted_backends[0].and(gone.or(fwd.retired_conn));
        let s = self.slot(fidx);
        s.last_seen.store(now_ms, Ordering::Relaxed);
        s.tcp_state.store(tcp_state, Ordering::Relaxed);
        s.packets.store(0, Ordering::Relaxed);
        s.bytes.store(0, Ordering::Relaxed);
        self.publish(fidx, fwd.held, &conn.encode());
        Ok(out)
    }

    /// Claims a slot for `key`, from which the key will be reachable (see
    /// the module's doc): the first free or expired slot of its window,
    /// else the slot of the oldest live provisional or half-open
    /// connection (see [`Victim`]); `Full` if there is none. An expired
    /// (or evicted forward) entry in it is not closed yet (see
    /// [`evict`](Self::evict)); the claim is published or given back
    /// ([`give_back`](Self::give_back)). `own_fwd`: the
    /// forward slot this insert already holds; a reply slot pointing at it
    /// is a leftover of the connection that slot held before (the same
    /// 5-tuple opened again), not a live conflict.
    fn claim(
        &self,
        key: &FlowKey,
        want: u8,
        pid: u32,
        own_fwd: Option<u32>,
        now_ms: u32,
        expired: &impl Fn(&ConnSlot) -> bool,
    ) -> Result<Claim, InsertError> {
        let home = self.home(key);
        for _attempt in 0..4 {
            let mut cand: Option<(u32, Snapshot, Option<u32>)> = None;
            // The oldest live entry the window may give up if it has no
            // free slot (see `Victim`).
            let mut victim: Option<Victim> = None;
            let mut consider = |v: Victim| {
                if victim.is_none_or(|o| v.age > o.age) {
                    victim = Some(v);
                }
            };
            for i in 0..MAX_PROBE {
                let idx = ((home + i) & self.mask) as u32;
                let Some(snap) = self.snapshot(idx) else {
                    continue;
                };
                match snap.kind() {
                    KIND_EMPTY => {
                        cand.get_or_insert((idx, snap, None));
                        break;
                    }
                    KIND_TOMB => {
                        cand.get_or_insert((idx, snap, None));
                    }
                    KIND_FWD => {
                        let c = Conn::decode(&snap.words);
                        let dead = expired(self.slot(idx));
                        if dead {
                            cand.get_or_insert((idx, snap, Some(c.backend_id)));
                        } else if want == KIND_FWD && c.forward_key() == *key {
                            return Err(InsertError::Exists(idx));
                        } else if let Some(v) = self.victim(idx, snap, &c, None, now_ms) {
                            consider(v);
                        }
                    }
                    KIND_REPLY => {
                        let (rkey, fwd) = (key_of(&snap.words), snap.words[0] as u32);
                        // A busy target may be an insert in progress (reply
                        // slots are published first): treat it as live.
                        let target = self.snapshot(fwd);
                        let target_live = match target {
                            _ if own_fwd == Some(fwd) => false,
                            None => true,
                            Some(t) => t
                                .conn()
                                .is_some_and(|c| c.reply_key() == rkey && !expired(self.slot(fwd))),
                        };
                        if !target_live {
                            cand.get_or_insert((idx, snap, None));
                        } else if want == KIND_REPLY && rkey == *key {
                            return Err(InsertError::Exists(idx));
                        } else if let Some(t) = target
                            && let Some(c) = t.conn()
                            && let Some(v) = self.victim(idx, snap, &c, Some((fwd, t)), now_ms)
                        {
                            consider(v);
                        }
                    }
                    _ => {}
                }
            }
            let (idx, snap, evicts, live) = match (cand, victim) {
                (Some((idx, snap, evicts)), _) => (idx, snap, evicts, None),
                // No free or expired slot: give up the oldest provisional
                // or half-open entry (a forward slot's own, or the whole
                // connection a reply slot belongs to).
                (None, Some(v)) => (
                    v.idx,
                    v.snap,
                    v.target.is_none().then_some(v.backend),
                    Some(v),
                ),
                (None, None) => return Err(InsertError::Full),
            };
            let Some(held) = self.hold(idx, snap.lock, 1, tag(pid)) else {
                continue;
            };
            let mut claim = Claim {
                idx,
                held,
                was: snap.words,
                evicts,
                live: live.map(|v| v.kind),
                retired: None,
                retired_conn: None,
            };
            if !self.reachable(home, idx) {
                // A slot before ours is empty, or may become so: probe again.
                self.give_back(&claim);
                continue;
            }
            let Some(v) = live else {
                return Ok(claim);
            };
            // A live victim: it must still be evictable now that no state
            // change can reach it (`update_state` needs the slot's lock,
            // which the claim or the retire below holds).
            match v.target {
                None if self.evictable(idx) == Some(v.kind) => return Ok(claim),
                None => {}
                Some((fwd, t)) => {
                    if let Some(reserved) = self.retire_evictable(fwd, &t, v.kind, pid) {
                        claim.retired = reserved.then_some(v.backend);
                        claim.retired_conn = t.conn().map(|conn| self.gone_at(conn, fwd));
                        return Ok(claim);
                    }
                }
            }
            self.give_back(&claim);
        }
        Err(InsertError::Full)
    }

    /// The kind of evictable entry a forward slot holds (a TCP entry in a
    /// provisional or half-open state), if it does.
    #[inline]
    fn evictable(&self, idx: u32) -> Option<Evicted> {
        let s = self.slot(idx);
        let proto = (s.words[0].load(Ordering::Relaxed) >> 48) as u8;
        if proto != crate::config_slot::PROTO_TCP {
            return None;
        }
        Evicted::of_state(s.tcp_state.load(Ordering::Acquire))
    }

    /// Slot `idx` (as `snap`) as a victim for a full window, if the
    /// connection `c` it belongs to (whose forward entry is `target`, for
    /// a reply slot; else `idx` itself) is live and evictable.
    fn victim(
        &self,
        idx: u32,
        snap: Snapshot,
        c: &Conn,
        target: Option<(u32, Snapshot)>,
        now_ms: u32,
    ) -> Option<Victim> {
        let fwd = target.map_or(idx, |(f, _)| f);
        let kind = self.evictable(fwd)?;
        let seen = self.slot(fwd).last_seen.load(Ordering::Relaxed);
        Some(Victim {
            idx,
            snap,
            age: now_ms.wrapping_sub(seen) as i32,
            kind,
            backend: c.backend_id,
            target,
        })
    }

    /// Retires the forward entry of a connection a reply claim evicts
    /// whole: if slot `fwd` still holds exactly `t` and is still an
    /// evictable entry of `kind`, it is closed and made a tombstone;
    /// returns whether it held a reservation. `None` if it changed.
    fn retire_evictable(&self, fwd: u32, t: &Snapshot, kind: Evicted, pid: u32) -> Option<bool> {
        if busy(t.lock) {
            return None;
        }
        let held = self.hold(fwd, t.lock, 1, tag(pid))?;
        if self.evictable(fwd) != Some(kind) {
            self.publish(fwd, held, &t.words);
            return None;
        }
        let reserved = self.close(fwd);
        self.publish(fwd, held, &[(KIND_TOMB as u64) << 56, 0, 0, 0]);
        Some(reserved)
    }

    /// The forward entry a claim displaces (if it holds one), with its
    /// slot's counts as they are before the insert resets them.
    fn gone(&self, c: &Claim) -> Option<Gone> {
        c.evicts?;
        (kind(&c.was) == KIND_FWD).then(|| self.gone_at(Conn::decode(&c.was), c.idx))
    }

    fn gone_at(&self, conn: Conn, idx: u32) -> Gone {
        let s = self.slot(idx);
        Gone {
            conn,
            idx,
            packets: s.packets.load(Ordering::Relaxed),
            bytes: s.bytes.load(Ordering::Relaxed),
        }
    }

    /// The reply slot of connection `conn` whose forward entry is (or was)
    /// in slot `fwd`: a reply slot with `conn`'s reply key pointing at
    /// `fwd`, found by probing from the key's home. Unlike
    /// [`lookup`](Self::lookup), it does not need the forward slot to
    /// still hold the connection (it is read for a closed connection's
    /// reply-direction counts, also after its entry was retired).
    pub fn reply_slot(&self, conn: &Conn, fwd: u32) -> Option<u32> {
        let key = conn.reply_key();
        let home = self.home(&key);
        for i in 0..MAX_PROBE {
            let idx = ((home + i) & self.mask) as u32;
            let Some(snap) = self.snapshot(idx) else {
                continue;
            };
            match snap.reply() {
                Some((k, f)) if k == key && f == fwd => return Some(idx),
                _ if snap.kind() == KIND_EMPTY => return None,
                _ => {}
            }
        }
        None
    }

    /// The reply-direction counts of connection `conn` whose forward entry
    /// is (or was) in slot `fwd` (see [`reply_slot`](Self::reply_slot)):
    /// (packets, bytes), zero if it has no reply slot.
    pub fn reply_counts(&self, conn: &Conn, fwd: u32) -> (u64, u64) {
        self.reply_slot(conn, fwd).map_or((0, 0), |r| {
            let s = self.slot(r);
            (
                s.packets.load(Ordering::Relaxed),
                s.bytes.load(Ordering::Relaxed),
            )
        })
    }

    /// Closes the expired entry a claim displaces, if it still held its
    /// reservation: returns its backend, whose `active` count the caller
    /// releases. Whoever closes it first releases (see `close`).
    fn evict(&self, c: &Claim) -> Option<u32> {
        c.evicts.filter(|_| self.close(c.idx))
    }

    /// Releases a claimed slot unchanged, except that an empty slot becomes
    /// a tombstone: another insert may have probed past it while we held it.
    fn give_back(&self, c: &Claim) {
        let words = if kind(&c.was) == KIND_EMPTY {
            [(KIND_TOMB as u64) << 56, 0, 0, 0]
        } else {
            c.was
        };
        self.publish(c.idx, c.held, &words);
    }

    /// Whether a key held in slot `at` is reachable from its `home`: no slot
    /// from `home` up to `at` is empty or held by a compaction. Called with
    /// `at` held; reads nearest first (the order the argument in
    /// docs/ARCHITECTURE.md needs), sequentially consistent.
    fn reachable(&self, home: usize, at: u32) -> bool {
        let dist = (at as usize).wrapping_sub(home) & self.mask;
        for d in (0..dist).rev() {
            let s = self.slot(((home + d) & self.mask) as u32);
            let l1 = s.lock.load(Ordering::SeqCst);
            if busy(l1) {
                // Any other writer publishes a non-empty slot.
                if l1 & COMPACTING != 0 {
                    return false;
                }
                continue;
            }
            let w0 = s.words[0].load(Ordering::Relaxed);
            fence(Ordering::Acquire);
            if s.lock.load(Ordering::Relaxed) != l1 || (w0 >> 56) as u8 == KIND_EMPTY {
                return false;
            }
        }
        true
    }

    /// Takes a slot whose lock word is exactly `seen` by compare-and-swap,
    /// advancing the sequence by `step` (1 from even to odd; 2 to take over
    /// an odd word) and tagging it with `tag` (see [`tag`]). `None` if the
    /// word changed. Sequentially consistent: see `reachable`.
    fn hold(&self, idx: u32, seen: u64, step: u64, tag: u64) -> Option<u64> {
        let held = (((seen & SEQ_MASK) + step) & SEQ_MASK) | tag;
        self.slot(idx)
            .lock
            .compare_exchange(seen, held, Ordering::SeqCst, Ordering::Relaxed)
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
    /// call made the move and the connection still held its backend's
    /// `active` reservation (see [`holds_reservation`]: a provisional
    /// entry never took one), which the caller now releases. Atomic, so of
    /// a switch closing the connection on a FIN, the GC expiring it and an
    /// insert reusing its slot, exactly one releases.
    #[inline]
    pub fn close(&self, idx: u32) -> bool {
        holds_reservation(
            self.slot(idx)
                .tcp_state
                .swap(STATE_CLOSING, Ordering::AcqRel),
        )
    }

    /// Runs `f` on the `tcp_state` of the connection `hit` found, holding
    /// its forward slot's seqlock from exactly the word the lookup read
    /// (`hit.lock`) until `f` returns: no insert can reuse the slot in
    /// between, so a state change (and the reservation release a move to
    /// `STATE_CLOSING` implies) applies to that connection and no later
    /// one. `None`, with nothing done, if the slot changed since the
    /// lookup (the connection was removed or replaced) or stayed held by
    /// another writer through a few tries.
    ///
    /// The lock word goes back to `hit.lock` itself, not to the next even
    /// sequence: the key words did not change, so a reader's snapshot
    /// under that word stays true, and other switches' hits of the same
    /// entry stay valid for their own state changes.
    pub fn update_state<R>(
        &self,
        hit: &Hit,
        pid: u32,
        f: impl FnOnce(&AtomicU32) -> R,
    ) -> Option<R> {
        if busy(hit.lock) {
            return None;
        }
        let s = self.slot(hit.idx);
        for _ in 0..4 {
            if self.hold(hit.idx, hit.lock, 1, tag(pid)).is_some() {
                let r = f(&s.tcp_state);
                // The state change is ordered before the release of the slot.
                s.lock.store(hit.lock, Ordering::Release);
                return Some(r);
            }
            if !busy(s.lock.load(Ordering::Relaxed)) {
                return None;
            }
            core::hint::spin_loop();
        }
        None
    }

    /// Deletes a forward slot that still holds exactly `snap`, closing it
    /// while it is held (so no insert can reuse the slot in between).
    /// `None` if the slot changed; else whether the connection still held
    /// its backend reservation (see [`ConnTable::close`]).
    pub fn retire(&self, idx: u32, snap: &Snapshot, pid: u32) -> Option<bool> {
        if busy(snap.lock) {
            return None;
        }
        let held = self.hold(idx, snap.lock, 1, tag(pid))?;
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
        let Some(held) = self.hold(idx, snap.lock, 1, tag(pid)) else {
            return false;
        };
        self.publish(idx, held, &[(KIND_TOMB as u64) << 56, 0, 0, 0]);
        true
    }

    /// Turns a tombstone into an empty slot when the next slot is empty (no
    /// probe chain can pass through it then). Returns whether it did. The
    /// slot is held with the [`COMPACTING`] mark meanwhile, and the next
    /// slot read after taking it, sequentially consistent: an insert that
    /// skipped this slot either sees the mark or the empty slot when it
    /// checks its key's reachability, or holds the next slot already (and
    /// then this tombstone stays).
    pub fn compact(&self, idx: u32, pid: u32) -> bool {
        let next = idx.wrapping_add(1);
        let (Some(me), Some(n)) = (self.snapshot(idx), self.snapshot(next)) else {
            return false;
        };
        if me.kind() != KIND_TOMB || n.kind() != KIND_EMPTY {
            return false;
        }
        let Some(held) = self.hold(idx, me.lock, 1, tag(pid) | COMPACTING) else {
            return false;
        };
        let s = self.slot(next);
        let l1 = s.lock.load(Ordering::SeqCst);
        let w0 = s.words[0].load(Ordering::Relaxed);
        fence(Ordering::Acquire);
        let still_empty =
            !busy(l1) && s.lock.load(Ordering::Relaxed) == l1 && (w0 >> 56) as u8 == KIND_EMPTY;
        let words = if still_empty {
            [0, 0, 0, 0]
        } else {
            [(KIND_TOMB as u64) << 56, 0, 0, 0]
        };
        self.publish(idx, held, &words);
        still_empty
    }

    /// If the slot is held by a writer whose process is dead, takes it over
    /// and makes it a tombstone; `None` if it did not. A forward entry the
    /// dead writer held (an entry it was retiring, or one it was writing)
    /// is closed, and its backend returned for the caller to release.
    ///
    /// `writer_alive` says whether the pid holding the slot is a live
    /// writer of this region (controld, or a switch whose slot names that
    /// pid with its start time): a pid that merely exists may have been
    /// reused by another process since the writer died.
    pub fn reclaim_abandoned(
        &self,
        idx: u32,
        pid: u32,
        writer_alive: impl Fn(u32) -> bool,
    ) -> Option<Reclaimed> {
        let s = self.slot(idx);
        let lock = s.lock.load(Ordering::Acquire);
        if !busy(lock) || writer_alive(holder_pid(lock)) {
            return None;
        }
        // Keep it odd (held) but with a new sequence and our pid.
        let held = self.hold(idx, lock, 2, tag(pid))?;
        // The dead writer stores nothing more: the words are stable.
        let w0 = s.words[0].load(Ordering::Relaxed);
        let release = ((w0 >> 56) as u8 == KIND_FWD && self.close(idx)).then_some(w0 as u32);
        self.publish(idx, held, &[(KIND_TOMB as u64) << 56, 0, 0, 0]);
        Some(Reclaimed { release })
    }

    /// Whether a writer currently holds the slot, and its pid.
    pub fn holder(&self, idx: u32) -> Option<u32> {
        let lock = self.slot(idx).lock.load(Ordering::Acquire);
        busy(lock).then_some(holder_pid(lock))
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

    /// The client hop an insert was given comes back with a reply hit
    /// (and only with it), and a reply slot without one reads as none.
    #[test]
    fn a_reply_hit_carries_the_client_hop_its_insert_kept() {
        let t = temp("cthop");
        let ct = t.0.conntrack();
        let hop = ClientHop::new([2, 0, 0, 0, 3, 2], 5);
        let c = conn(43);
        ct.insert_with_hop(&c, true, hop, 10, STATE_SYN, PID, |_| false)
            .unwrap();
        assert_eq!(ct.lookup(&c.reply_key()).unwrap().client_hop, hop);
        assert_eq!(
            ct.lookup(&c.forward_key()).unwrap().client_hop,
            ClientHop::NONE
        );
        let d = conn(44);
        ct.insert(&d, true, 10, STATE_SYN, PID, |_| false).unwrap();
        assert_eq!(
            ct.lookup(&d.reply_key()).unwrap().client_hop,
            ClientHop::NONE
        );
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

    /// Connections whose forward key has the home slot `home`, numbered
    /// from `from` (a search over client ports: about one key in 4,096).
    fn homed_at(ct: &ConnTable<'_>, home: usize, from: u32, n: usize) -> Vec<Conn> {
        (from..)
            .map(conn)
            .filter(|c| ct.home(&c.forward_key()) == home)
            .take(n)
            .collect()
    }

    /// Inserts live connections homed at `home` until every slot of its
    /// probe window holds one (`first` included, inserted first).
    fn fill_window(ct: &ConnTable<'_>, first: &Conn, backend: u32) -> u32 {
        let home = ct.home(&first.forward_key());
        let first_idx = ct
            .insert(first, false, 1, STATE_ESTABLISHED, PID, |_| false)
            .unwrap()
            .idx;
        assert_eq!(first_idx as usize, home);
        for mut c in homed_at(ct, home, 100_000, MAX_PROBE - 1) {
            c.backend_id = backend;
            ct.insert(&c, false, 1, STATE_ESTABLISHED, PID, |_| false)
                .unwrap();
        }
        for i in 0..MAX_PROBE {
            let k = ct.snapshot((home + i) as u32).unwrap().kind();
            assert_eq!(k, KIND_FWD, "window slot {i} is filled");
        }
        first_idx
    }

    #[test]
    fn expired_entries_are_reused_and_report_their_backend() {
        let t = temp("ct3");
        let ct = t.0.conntrack();
        // `a` and 63 live connections fill `a`'s probe window; `b` shares
        // its home, so its only claimable slot is `a`'s, once `a` expired.
        let mut a = conn(1);
        a.backend_id = 5;
        let home = ct.home(&a.forward_key());
        let ia = fill_window(&ct, &a, 6);
        let b = homed_at(&ct, home, 2_000_000, 1)[0];
        assert_eq!(
            ct.insert(&b, false, 1, STATE_SYN, PID, |_| false),
            Err(InsertError::Full),
            "nothing expired: no room"
        );
        let ins = ct
            .insert(&b, false, 1, STATE_SYN, PID, |s| {
                core::ptr::eq(s, ct.slot(ia))
            })
            .unwrap();
        assert_eq!(ins.idx, ia, "the expired entry's slot is reused");
        assert_eq!(ins.evicted_backends, [Some(5), None]);
        assert_eq!(ct.lookup(&b.forward_key()).unwrap().conn(), b);
        assert!(ct.lookup(&a.forward_key()).is_none());
    }

    /// Fills `home`'s probe window with live connections in `state`,
    /// the one in slot `home + i` last seen at `10 + i` (so the one in
    /// `home + oldest` is made the oldest: last seen at 1), backend 4 for
    /// every entry but the oldest (backend 5). Returns the oldest's slot.
    /// An insert that reuses an expired entry's slot hands back the
    /// closed connection with its counts as they were (for its record),
    /// and the new connection starts from zero in both directions, its
    /// reply slot's counts included (a reused reply slot kept the old ones).
    #[test]
    fn an_evicting_insert_reports_the_closed_connection_and_counts_start_at_zero() {
        let t = temp("ct-gone");
        let ct = t.0.conntrack();
        let mut a = conn(1);
        a.backend_id = 5;
        let home = ct.home(&a.forward_key());
        let ia = fill_window(&ct, &a, 6);
        ct.slot(ia).add_counts(3, 300);
        let b = homed_at(&ct, home, 2_000_000, 1)[0];
        let ins = ct
            .insert(&b, false, 1, STATE_SYN, PID, |s| {
                core::ptr::eq(s, ct.slot(ia))
            })
            .unwrap();
        assert_eq!(
            ins.evicted_conns,
            [
                Some(Gone {
                    conn: a,
                    idx: ia,
                    packets: 3,
                    bytes: 300
                }),
                None
            ]
        );
        assert_eq!(ct.slot(ia).packets.load(Ordering::Relaxed), 0);
        // A NAT connection: its reply slot is found by `reply_slot`, also
        // after its forward entry is retired; a new connection reusing
        // that reply slot starts its reply counts at zero.
        let c = conn(77);
        let ic = ct.insert(&c, true, 1, STATE_SYN, PID, |_| false).unwrap();
        let r = ct.lookup(&c.reply_key()).unwrap().via;
        assert_eq!(ct.reply_slot(&c, ic.idx), Some(r));
        ct.slot(r).add_counts(4, 400);
        assert_eq!(ct.reply_counts(&c, ic.idx), (4, 400));
        let snap = ct.snapshot(ic.idx).unwrap();
        assert_eq!(ct.retire(ic.idx, &snap, PID), Some(true));
        assert_eq!(ct.reply_counts(&c, ic.idx), (4, 400));
        let ic2 = ct.insert(&c, true, 2, STATE_SYN, PID, |_| false).unwrap();
        assert_eq!(ct.reply_counts(&c, ic2.idx), (0, 0));
    }

    fn fill_window_in(ct: &ConnTable<'_>, home: usize, state: u32, oldest: usize) -> u32 {
        for (i, mut c) in homed_at(ct, home, 100_000, MAX_PROBE)
            .into_iter()
            .enumerate()
        {
            let seen = if i == oldest { 1 } else { 10 + i as u32 };
            c.backend_id = if i == oldest { 5 } else { 4 };
            let ins = ct.insert(&c, false, seen, state, PID, |_| false).unwrap();
            // The window wraps at the table's end (homes are seeded per
            // region: a home near the end came up in the suite).
            assert_eq!(ins.idx as usize, (home + i) % ct.capacity());
        }
        ((home + oldest) % ct.capacity()) as u32
    }

    /// A window full of provisional entries (picked up mid-flow, no
    /// reservation) does not refuse a new connection: the oldest one is
    /// evicted, and it reports no backend to release (it held none).
    #[test]
    fn a_full_window_of_provisional_entries_evicts_the_oldest() {
        let t = temp("ct-evict-prov");
        let ct = t.0.conntrack();
        let home = ct.home(&conn(1).forward_key());
        let victim = fill_window_in(&ct, home, STATE_PROVISIONAL, 17);
        let old = ct.snapshot(victim).unwrap().conn().unwrap();
        let b = homed_at(&ct, home, 2_000_000, 1)[0];
        let ins = ct
            .insert(&b, false, 100, STATE_SYN, PID, |_| false)
            .expect("a provisional entry makes room");
        assert_eq!(ins.idx, victim, "the oldest provisional entry's slot");
        assert_eq!(ins.evicted_backends, [None, None], "it held no reservation");
        assert_eq!(ins.evicted_live, [Some(Evicted::Provisional), None]);
        assert_eq!(ct.lookup(&b.forward_key()).unwrap().conn(), b);
        assert!(ct.lookup(&old.forward_key()).is_none());
    }

    /// A window full of half-open entries (SYN seen, or SYN-ACK too):
    /// the oldest is evicted, and its backend reported so the caller gives
    /// its reservation back (counts stay exact).
    #[test]
    fn a_full_window_of_half_open_entries_evicts_the_oldest_and_reports_its_backend() {
        for state in [STATE_SYN, STATE_SYN_ACKED] {
            let t = temp("ct-evict-half");
            let ct = t.0.conntrack();
            let home = ct.home(&conn(1).forward_key());
            let victim = fill_window_in(&ct, home, state, 40);
            let b = homed_at(&ct, home, 2_000_000, 1)[0];
            let ins = ct
                .insert(&b, false, 100, STATE_SYN, PID, |_| false)
                .expect("a half-open entry makes room");
            assert_eq!(ins.idx, victim, "state {state}: the oldest entry's slot");
            assert_eq!(ins.evicted_backends, [Some(5), None], "state {state}");
            assert_eq!(ins.evicted_live, [Some(Evicted::HalfOpen), None]);
        }
    }

    /// Established entries are never evicted: with no expired, provisional
    /// or half-open entry in the window, the insert is refused.
    #[test]
    fn a_full_window_of_established_entries_refuses() {
        let t = temp("ct-evict-est");
        let ct = t.0.conntrack();
        let home = ct.home(&conn(1).forward_key());
        fill_window_in(&ct, home, STATE_ESTABLISHED, 3);
        let b = homed_at(&ct, home, 2_000_000, 1)[0];
        assert_eq!(
            ct.insert(&b, false, 100, STATE_PROVISIONAL, PID, |_| false),
            Err(InsertError::Full)
        );
    }

    /// NAT: a new connection's reply key whose window is full of reply
    /// slots of live half-open connections evicts the oldest of those
    /// connections whole (its forward entry too), and reports its backend.
    #[test]
    fn a_full_reply_window_evicts_the_oldest_half_open_connection() {
        let t = temp("ct-evict-reply");
        let ct = t.0.conntrack();
        // 64 half-open NAT connections whose reply keys share one home;
        // the one at reply window position 9 is the oldest.
        let rhome = ct.home(&conn(1).reply_key());
        let mut n = 0;
        let mut oldest_fwd = None;
        for i in 100_000u32.. {
            let mut c = conn(i);
            c.backend_ip = 0xc613_0100;
            if ct.home(&c.reply_key()) != rhome {
                continue;
            }
            let seen = if n == 9 { 1 } else { 10 + n };
            c.backend_id = if n == 9 { 5 } else { 4 };
            // Forward slots of these connections may land in the window
            // too: stop once every slot of it is taken.
            let full = (0..MAX_PROBE).all(|i| {
                let k = ct.snapshot((rhome + i) as u32).unwrap().kind();
                k == KIND_REPLY || k == KIND_FWD
            });
            if full {
                break;
            }
            let ins = ct
                .insert(&c, true, seen, STATE_SYN, PID, |_| false)
                .unwrap();
            if n == 9 {
                oldest_fwd = Some((ins.idx, c));
            }
            n += 1;
        }
        let (old_idx, old) = oldest_fwd.unwrap();
        for i in 0..MAX_PROBE {
            let s = ct.snapshot((rhome + i) as u32).unwrap();
            assert!(
                matches!(s.kind(), KIND_REPLY | KIND_FWD),
                "reply window slot {i} is filled"
            );
        }
        // A new connection with that reply home; its forward slot is free.
        let b = (2_000_000u32..)
            .map(|i| {
                let mut c = conn(i);
                c.backend_ip = 0xc613_0100;
                c.backend_id = 6;
                c
            })
            .find(|c| ct.home(&c.reply_key()) == rhome)
            .unwrap();
        let ins = ct
            .insert(&b, true, 100, STATE_SYN, PID, |_| false)
            .expect("a half-open connection makes room");
        assert_eq!(ins.evicted_backends, [None, Some(5)]);
        assert_eq!(ins.evicted_live[1], Some(Evicted::HalfOpen));
        assert_eq!(ct.lookup(&b.reply_key()).unwrap().conn(), b);
        assert!(ct.lookup(&old.forward_key()).is_none());
        assert!(ct.lookup(&old.reply_key()).is_none());
        assert_ne!(
            ct.snapshot(old_idx).unwrap().kind(),
            KIND_FWD,
            "the evicted connection's forward entry is gone too"
        );
    }

    /// Per backend, the forward entries that hold a reservation (not
    /// closed): what the backends' `active` counts must add up to.
    fn reservations(ct: &ConnTable<'_>) -> std::collections::BTreeMap<u32, u32> {
        let mut m = std::collections::BTreeMap::new();
        for idx in 0..ct.capacity() as u32 {
            if let Some(c) = ct.snapshot(idx).and_then(|s| s.conn())
                && ct.slot(idx).tcp_state.load(Ordering::Relaxed) != STATE_CLOSING
            {
                *m.entry(c.backend_id).or_insert(0) += 1;
            }
        }
        m
    }

    /// An insert that evicts an expired entry for its forward slot, then
    /// fails on its reply slot, must not lose the evicted entry's
    /// reservation: counted as a switch and the GC count (reserve per
    /// insert, release what an insert reports evicted, release what a
    /// retire closes), `active` ends equal to the table's reservations.
    #[test]
    fn a_failed_reply_claim_keeps_the_evicted_entrys_reservation() {
        let t = temp("ct-evict-fail");
        let ct = t.0.conntrack();
        let mut active = std::collections::BTreeMap::<u32, u32>::new();
        let mut a = conn(1);
        a.backend_id = 5;
        let home = ct.home(&a.forward_key());
        let ia = fill_window(&ct, &a, 6);
        *active.entry(5).or_insert(0) += 1;
        *active.entry(6).or_insert(0) += (MAX_PROBE - 1) as u32;
        // `b` evicts `a` for its forward slot, but a live connection `c`
        // already owns `b`'s reply key (same client and backend, other VIP).
        let mut b = homed_at(&ct, home, 2_000_000, 1)[0];
        b.backend_id = 3;
        let mut c = b;
        c.vip += 1;
        c.backend_id = 3;
        ct.insert(&c, true, 1, STATE_ESTABLISHED, PID, |_| false)
            .unwrap();
        *active.entry(3).or_insert(0) += 1;
        // The switch reserved a slot of backend 3 for `b`...
        *active.entry(3).or_insert(0) += 1;
        let expired = |s: &ConnSlot| core::ptr::eq(s, ct.slot(ia));
        let res = ct.insert(&b, true, 1, STATE_SYN, PID, expired);
        assert_eq!(res, Err(InsertError::ReplyConflict));
        // ...and gives it back: the insert failed.
        *active.get_mut(&3).unwrap() -= 1;
        // The GC retires what expired, releasing what it closes.
        for idx in 0..ct.capacity() as u32 {
            if let Some(snap) = ct.snapshot(idx)
                && let Some(conn) = snap.conn()
                && expired(ct.slot(idx))
                && ct.retire(idx, &snap, PID) == Some(true)
            {
                *active.get_mut(&conn.backend_id).unwrap() -= 1;
            }
        }
        active.retain(|_, n| *n > 0);
        assert_eq!(active, reservations(&ct));
        assert_eq!(active.get(&5), None, "a's reservation was released");
    }

    /// A key placed past a slot that another process empties meanwhile
    /// would be unreachable: here the slot the insert just probed past (a
    /// live entry) is retired and compacted while the insert decides (the
    /// `expired` callback runs inside the probe), and the insert must not
    /// put its key behind the now empty slot.
    #[test]
    fn an_insert_never_lands_behind_a_slot_compacted_while_it_probes() {
        let t = temp("ct-compact-race");
        let ct = t.0.conntrack();
        let a = conn(1);
        let home = ct.home(&a.forward_key());
        let ia = ct.insert(&a, false, 1, STATE_SYN, PID, |_| false).unwrap();
        assert_eq!(ia.idx as usize, home);
        let k = homed_at(&ct, home, 2_000_000, 1)[0];
        let fired = std::cell::Cell::new(false);
        let ins = ct
            .insert(&k, false, 1, STATE_SYN, PID, |s| {
                if core::ptr::eq(s, ct.slot(ia.idx)) && !fired.replace(true) {
                    // Another switch retires `a`, and the GC compacts its
                    // tombstone (the next slot is empty).
                    let snap = ct.snapshot(ia.idx).unwrap();
                    assert_eq!(ct.retire(ia.idx, &snap, 2), Some(true));
                    assert!(ct.compact(ia.idx, 3));
                }
                false
            })
            .unwrap();
        assert!(fired.get());
        assert_eq!(
            ct.lookup(&k.forward_key()).map(|h| h.idx),
            Some(ins.idx),
            "the key is reachable from its home"
        );
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
        // It held a live forward entry: its reservation comes back once.
        assert_eq!(
            ct.reclaim_abandoned(ins.idx, PID, crate::time::pid_alive),
            Some(Reclaimed {
                release: Some(c.backend_id)
            })
        );
        assert_eq!(
            ct.slot(ins.idx).tcp_state.load(Ordering::Relaxed),
            STATE_CLOSING
        );
        assert_eq!(ct.holder(ins.idx), None);
        assert_eq!(ct.snapshot(ins.idx).unwrap().kind(), KIND_TOMB);
        // A live holder is left alone.
        let l = s.lock.load(Ordering::Relaxed);
        s.lock.store(
            (l + 1) | ((std::process::id() as u64) << 32),
            Ordering::Relaxed,
        );
        assert_eq!(
            ct.reclaim_abandoned(ins.idx, PID, crate::time::pid_alive),
            None
        );
        // A dead writer's tombstone gives nothing back.
        s.lock
            .store((l + 3) | ((dead as u64) << 32), Ordering::Relaxed);
        assert_eq!(
            ct.reclaim_abandoned(ins.idx, PID, crate::time::pid_alive),
            Some(Reclaimed { release: None })
        );
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

    /// Compaction concurrent with inserts and removals on a small table:
    /// every key an insert placed is found by its lookup, exactly once,
    /// until its own thread removes it. Keys crowd a few home slots, so
    /// probes pass tombstones the compactor is turning back into empty
    /// slots (a key placed behind one would be unreachable, and inserted
    /// again: a duplicate).
    #[test]
    fn compaction_concurrent_with_inserts_never_hides_a_key() {
        const SLOTS: usize = 64;
        const ROUNDS: u32 = 16_000_000;
        let slots: Vec<ConnSlot> = (0..SLOTS)
            .map(|_| ConnSlot {
                lock: AtomicU64::new(0),
                words: [const { AtomicU64::new(0) }; 4],
                last_seen: AtomicU32::new(0),
                tcp_state: AtomicU32::new(0),
                packets: AtomicU64::new(0),
                bytes: AtomicU64::new(0),
            })
            .collect();
        let ct = ConnTable::new(&slots, 0x5eed);
        // Per inserter, keys homed at slots 8..12: chains of a few slots.
        let keys = |w: u32| -> Vec<Conn> {
            (0..)
                .map(|i| conn(w << 20 | i))
                .filter(|c| (8..12).contains(&ct.home(&c.forward_key())))
                .take(64)
                .collect()
        };
        let stop = std::sync::atomic::AtomicBool::new(false);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(8);
        let (hidden, copies) = std::thread::scope(|sc| {
            let compactor = sc.spawn(|| {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    for idx in 0..SLOTS as u32 {
                        n += u64::from(ct.compact(idx, 3));
                    }
                }
                n
            });
            let inserters: Vec<_> = (0..2u32)
                .map(|w| {
                    let ct = &ct;
                    let keys = keys(w + 1);
                    sc.spawn(move || {
                        let pid = 10 + w;
                        // Three live keys at a time, the oldest removed first.
                        let mut live = std::collections::VecDeque::new();
                        let (mut hidden, mut copies) = (0u32, 0u32);
                        for r in 0..ROUNDS {
                            if r % 1024 == 0 && std::time::Instant::now() > deadline {
                                break;
                            }
                            let c = keys[r as usize % keys.len()];
                            if live.len() == 3 {
                                let old: Conn = live.pop_front().unwrap();
                                match ct.lookup(&old.forward_key()) {
                                    Some(h) => {
                                        let snap = ct.snapshot(h.idx).unwrap();
                                        assert!(ct.remove(h.idx, &snap, pid));
                                    }
                                    None => hidden += 1,
                                }
                            }
                            if ct.insert(&c, false, 1, STATE_SYN, pid, |_| false).is_err() {
                                continue;
                            }
                            live.push_back(c);
                            if ct.lookup(&c.forward_key()).is_none() {
                                hidden += 1;
                                // As a switch would on its next packet.
                                if ct.insert(&c, false, 1, STATE_SYN, pid, |_| false).is_ok() {
                                    copies += 1;
                                }
                            }
                        }
                        (hidden, copies)
                    })
                })
                .collect();
            let mut sum = (0, 0);
            for i in inserters {
                let (h, c) = i.join().unwrap();
                sum = (sum.0 + h, sum.1 + c);
            }
            stop.store(true, Ordering::Relaxed);
            assert!(compactor.join().unwrap() > 0, "the compactor compacted");
            sum
        });
        assert_eq!((hidden, copies), (0, 0), "keys hidden, then inserted twice");
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
