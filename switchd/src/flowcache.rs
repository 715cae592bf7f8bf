//! A switch's private cache of what it did to recent packets of known
//! connections: the rewrite, the egress port and the MACs, ready to apply.
//!
//! The connection table in shared memory stays the only truth; this cache
//! remembers how the filter's full path ended for a packet of an
//! established connection so that the next packet of the same 5-tuple
//! skips the decision and the arithmetic that cannot have changed. An
//! entry is used only while everything its answer depends on is provably
//! the same:
//! - what it was computed from in the configuration and routing tables:
//!   the engine [`sync`](FlowCache::sync)s the cache every loop with a
//!   fingerprint of the configuration's parts an answer depends on
//!   (`filter::answer_fingerprint`: VIPs, down actions, timeouts, ports)
//!   and with the routing stamp; a change of either invalidates every
//!   entry at once, while a publication that only changes weights, limits
//!   or tables keeps them;
//! - the connection's slot, checked by the first packet of each
//!   millisecond (of the switch's `now_ms`, read once per loop): its
//!   seqlock word must still be the one the full path read (the sequence
//!   only grows, so an equal word means the same entry, not replaced,
//!   retired or removed), before and after the TCP state and last-seen
//!   time are read (an insert reusing the slot writes them under the
//!   lock), its TCP state the same, and the connection not within
//!   [`EXPIRY_MARGIN_MS`] of its idle timeout; for a reply, the reply slot
//!   the full path found it through unchanged too; and the slot the key
//!   was found in still holding the key's addresses (against a 32-bit
//!   sequence coming round within one epoch);
//! - the packet: no SYN, FIN or RST (those change state or decisions), a
//!   TTL that survives the decrement, an IPv4 header without options.
//!
//! The later packets of a flow in the millisecond of its check (or of its
//! fill) are answered without reading the slot at all: with many flows a
//! packet's rate is bound by the cache lines it needs, and the slot is a
//! line at a random place in a table of hundreds of MiB
//! (docs/PERFORMANCE.md). What that costs, and why it is safe:
//! - a change another process makes to a connection (the GC, another
//!   switch) is seen by this switch's cached answers from the next
//!   millisecond, not the next packet. The GC removes only connections
//!   idle for their timeout, and a checked entry is at least
//!   `EXPIRY_MARGIN_MS` from it; a state change by another switch (the
//!   other direction's FIN) changes no answer, only a timeout. A change
//!   this switch's full path makes to a connection it may have cached (a
//!   SYN retiring a closed one) marks the entries of both its directions
//!   for a check at once ([`FlowCache::stale`]);
//! - the slot's packet and byte counts of those packets wait in the
//!   entry (`pend_pkts`, `pend_bytes`) and are added at the next check,
//!   when the entry is overwritten, or by the engine's
//!   [`sweep`](FlowCache::sweep) within one round of the cache (a few entries
//!   per busy loop, many per idle one), and at exit; the slot's last-seen
//!   time is the check's, in the same millisecond.
//!
//! Everything else (the switch counters) is updated exactly as the full
//! path would.
//!
//! Two-way set associative, sets chosen by the connection table's home
//! slot of the key: two flows that share a set both stay (a direct-mapped
//! cache made such pairs evict each other on every packet: 6% of 4096
//! flows in 65,536 entries). A fill takes the first way, and the entry it
//! displaces moves to the second, so the less recently filled one leaves.
//! The first way says whether the second may hold an entry of the current
//! epoch ([`KIND_SECOND`]): most sets hold one flow, and their lookups
//! read (and the first pass loads) one cache line, not two. With many
//! flows the switch's rate on established flows is bound by the lines each
//! packet needs (its entry, and its table slot once a millisecond;
//! docs/PERFORMANCE.md).
//! A miss costs only the full path.

use core::sync::atomic::Ordering;
use shm_layout::conntrack::ConnTable;

/// Entries per switch (4 MiB; only the lines of live flows are touched).
pub const DEFAULT_ENTRIES: usize = 1 << 16;

/// Entries per set.
const WAYS: usize = 2;

/// One cached answer: a cache line.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, Default)]
pub struct Entry {
    /// The packet's key as the connection table hashes it
    /// (`FlowKey::words`): source and destination address (the word a
    /// slot stores too), then ports and protocol.
    pub addrs: u64,
    pub ports_proto: u64,
    /// The connection's forward slot and the seqlock word it had (a
    /// stable word is a bare sequence number: it fits 32 bits).
    pub lock: u32,
    pub idx: u32,
    /// The slot the key was found in and its seqlock word: the forward
    /// slot again, or the reply slot that points to it (which must still
    /// be there: the full path finds the connection through it).
    pub via_lock: u32,
    pub via: u32,
    /// The cache epoch it was filled in (0: never valid).
    pub epoch: u32,
    /// The millisecond (the switch's `now_ms`) in which the full path
    /// filled the entry or a packet last checked it against the
    /// connection's slot: within it, packets are answered without reading
    /// the slot (see the module doc).
    pub checked_ms: u32,
    /// The address the rewrite writes (network order), and the port.
    pub new_addr: [u8; 4],
    /// IP bytes of the packets answered without the slot since the last
    /// check, not yet added to the slot's counts ([`FlowCache::flush`]).
    pub pend_bytes: u32,
    pub new_port: [u8; 2],
    /// RFC 1624 checksum differences, folded to 16 bits: the IPv4 header's
    /// (TTL and address) and the TCP/UDP checksum's (address and port), in
    /// the machine's byte order (`checksum::to_ne`): the hit path adjusts
    /// checksum fields as read, without swapping bytes.
    pub d_ip: u16,
    pub d_l4: u16,
    /// Packets answered without the slot since the last check (see
    /// `pend_bytes`); at `u16::MAX` the next packet checks.
    pub pend_pkts: u16,
    /// Destination MAC (the source is the egress port's:
    /// [`FlowCache::src_mac_type`]).
    pub dst_mac: [u8; 6],
    /// Global egress port.
    pub port: u8,
    /// The slot's `tcp_state` when filled (low four bits; it must not have
    /// changed), the rewrite (bits 4-6, a `REWRITE_` value) and, in a
    /// set's first way, [`KIND_SECOND`].
    pub kind: u8,
}

/// [`Entry::kind`]'s bit that says, in a set's first way, that the second
/// way may hold an entry of this epoch (one was moved there since the
/// first way was last invalid): a key the first way does not hold is
/// looked for there too. Without it, a lookup reads one line, not two.
pub const KIND_SECOND: u8 = 0x80;

impl Entry {
    /// The slot's TCP state when the entry was filled.
    #[inline(always)]
    pub fn state(&self) -> u8 {
        self.kind & 0xf
    }

    /// The rewrite (a `REWRITE_` value).
    #[inline(always)]
    pub fn rewrite(&self) -> u8 {
        (self.kind >> 4) & 0x7
    }

    /// The frame's first 8 bytes as the answer writes them before
    /// [`FlowCache::src_mac_type`] overwrites the last two: the
    /// destination MAC, then `port` and `kind` (adjacent fields: one load).
    #[inline(always)]
    pub fn dst_mac_head(&self) -> [u8; 8] {
        const AT: usize = core::mem::offset_of!(Entry, dst_mac);
        // SAFETY: bytes AT..AT + 8 of the entry are `dst_mac`, `port` and
        // `kind` (asserted below), all initialised integers; the pointer
        // comes from the whole entry.
        unsafe {
            (self as *const Entry)
                .cast::<u8>()
                .add(AT)
                .cast::<[u8; 8]>()
                .read_unaligned()
        }
    }

    /// See [`KIND_SECOND`].
    #[inline(always)]
    fn second(&self) -> bool {
        self.kind & KIND_SECOND != 0
    }
}

/// [`Entry::kind`]'s rewrite: direct routing (no translation).
pub const REWRITE_NONE: u8 = 0;
/// Destination address and port (client -> backend, NAT).
pub const REWRITE_DST: u8 = 1;
/// Source address and port (backend -> client, NAT).
pub const REWRITE_SRC: u8 = 2;

/// Where a rewrite writes its address in the IPv4 header and its port in
/// the TCP/UDP header; `None` for [`REWRITE_NONE`]. The full path and the
/// cache's replay both place them by this.
#[inline(always)]
pub fn rewrite_offsets(kind: u8) -> Option<(usize, usize)> {
    match kind {
        REWRITE_DST => Some((16, 2)),
        REWRITE_SRC => Some((12, 0)),
        _ => None,
    }
}

/// How old (in ms, 12.4 days) a check time [`FlowCache::sweep`] lets
/// get before it moves it forward (see there).
const STALE_AFTER_MS: u32 = 1 << 30;

/// How long before its idle timeout an entry stops answering: each
/// process judges expiry with its own clock (read once per loop or tick),
/// so near the timeout another switch or the GC may already count the
/// connection as gone; the full path then decides, as it always did.
pub const EXPIRY_MARGIN_MS: u32 = 10;

const _: () = assert!(core::mem::size_of::<Entry>() == 64);
// `Entry::dst_mac_head` reads the three together.
const _: () = assert!(
    core::mem::offset_of!(Entry, port) == core::mem::offset_of!(Entry, dst_mac) + 6
        && core::mem::offset_of!(Entry, kind) == core::mem::offset_of!(Entry, dst_mac) + 7
);

/// The entries: anonymous memory that asks for transparent huge pages
/// (a cache of 65,536 entries then takes two TLB entries, not a thousand)
/// and is faulted in before the first packet.
#[derive(Debug)]
struct Entries {
    map: Option<memmap2::MmapMut>,
    len: usize,
    /// The first entry: the mapping's, or [`NO_SET`]'s for a disabled
    /// cache. A set is found without a check for either (see
    /// [`FlowCache::set`]).
    first: *const Entry,
}

/// The one set of a disabled cache: never valid (epoch 0), never written.
static NO_SET: [Entry; WAYS] = [Entry::ZERO; WAYS];

impl Entry {
    const ZERO: Entry = Entry {
        addrs: 0,
        ports_proto: 0,
        lock: 0,
        idx: 0,
        via_lock: 0,
        via: 0,
        epoch: 0,
        checked_ms: 0,
        new_addr: [0; 4],
        pend_bytes: 0,
        new_port: [0; 2],
        d_ip: 0,
        d_l4: 0,
        pend_pkts: 0,
        dst_mac: [0; 6],
        port: 0,
        kind: 0,
    };
}

impl Default for Entries {
    fn default() -> Self {
        Self {
            map: None,
            len: 0,
            first: NO_SET.as_ptr(),
        }
    }
}

impl Entries {
    fn new(len: usize) -> std::io::Result<Self> {
        let mut map = memmap2::MmapMut::map_anon(len * core::mem::size_of::<Entry>())?;
        let _ = map.advise(memmap2::Advice::HugePage);
        let _ = map.advise(memmap2::Advice::PopulateWrite);
        Ok(Self {
            first: map.as_mut_ptr().cast_const().cast(),
            map: Some(map),
            len,
        })
    }

    #[inline(always)]
    fn as_mut_slice(&mut self) -> &mut [Entry] {
        match &mut self.map {
            // SAFETY: the mapping holds `len` entries' bytes, page aligned
            // (Entry needs 64), zero-filled by the kernel or written as
            // entries since; every bit pattern is a valid Entry (integers);
            // `&mut self` makes the borrow unique.
            Some(m) => unsafe { core::slice::from_raw_parts_mut(m.as_mut_ptr().cast(), self.len) },
            None => &mut [],
        }
    }
}

/// The cache. `Default` is an empty cache that never hits (unit tests of
/// the full path).
#[derive(Debug)]
pub struct FlowCache {
    entries: Entries,
    mask: usize,
    /// Entries filled in another epoch are invalid.
    epoch: u32,
    /// The configuration's answer fingerprint and the routing stamp of
    /// this epoch.
    stamps: (u64, u64),
    /// Source MAC of each global egress port, as the full path last filled
    /// an entry for it (the port MACs are in the answer fingerprint: a
    /// change starts a new epoch), followed by the IPv4 ethertype: the
    /// bytes 6-13 of every frame the cache answers.
    src_macs: [[u8; 8]; 256],
    /// Where [`FlowCache::sweep`] goes on.
    cursor: usize,
    /// Packets of the current burst answered without reading their slot.
    fresh: u32,
    /// Whether the first pass loads every frame's home slot, as when most
    /// answers read their slot (see [`FlowCache::end_burst`]).
    slots_ahead: bool,
}

impl Default for FlowCache {
    fn default() -> Self {
        Self {
            entries: Entries::default(),
            mask: 0,
            // Above NO_SET's epoch 0.
            epoch: 1,
            stamps: (0, 0),
            src_macs: [[0, 0, 0, 0, 0, 0, 0x08, 0x00]; 256],
            cursor: 0,
            fresh: 0,
            slots_ahead: true,
        }
    }
}

impl FlowCache {
    /// A cache of `entries` (rounded up to a power of two, at least one
    /// set; 0: disabled). Fails only if the memory cannot be mapped.
    pub fn new(entries: usize) -> Result<Self, String> {
        if entries == 0 {
            return Ok(Self::default());
        }
        let n = entries.next_power_of_two().max(WAYS);
        let mapped = Entries::new(n).map_err(|e| {
            format!(
                "mapping a flow cache of {n} entries ({} MiB): {e}",
                (n * core::mem::size_of::<Entry>()) >> 20
            )
        })?;
        Ok(Self {
            entries: mapped,
            mask: n / WAYS - 1,
            ..Self::default()
        })
    }

    pub fn capacity(&self) -> usize {
        self.entries.len
    }

    /// Starts a new epoch (every entry invalid) unless the configuration's
    /// answer fingerprint (`filter::answer_fingerprint`) and the routing
    /// stamp are the ones the current epoch was filled under.
    #[inline]
    pub fn sync(&mut self, config_answers: u64, routing_stamp: u64) {
        if self.stamps != (config_answers, routing_stamp) {
            self.stamps = (config_answers, routing_stamp);
            self.invalidate();
        }
    }

    /// Every entry invalid.
    pub fn invalidate(&mut self) {
        self.epoch = self.epoch.wrapping_add(1);
        if self.epoch == 0 {
            // Wrapped: entries of the first epoch would look valid again.
            // (Their pending counts stay, for `put` and `sweep` to flush.)
            for e in self.entries.as_mut_slice() {
                e.epoch = 0;
            }
            self.epoch = 1;
        }
    }

    /// The set of a key whose table home is `home` (the home slot is
    /// already the low bits of the key's hash).
    #[inline(always)]
    fn set(&self, home: u32) -> &[Entry; WAYS] {
        let at = (home as usize & self.mask) * WAYS;
        // SAFETY: `first` points to `(mask + 1) * WAYS` entries: a mapped
        // cache's `len` (`new` sizes `mask` so), or NO_SET with mask 0 for
        // a disabled one; `at + WAYS` stays within them. Every bit pattern
        // is a valid Entry (integers), and `&self` excludes `put`'s writes.
        unsafe { &*self.entries.first.add(at).cast::<[Entry; WAYS]>() }
    }

    /// Starts loading the first way of the set for a key whose table home
    /// is `home` (the second is read only when the first says it may hold
    /// an entry: few sets hold two flows).
    #[inline(always)]
    pub fn prefetch(&self, home: u32) {
        shm_layout::conntrack::prefetch(&self.set(home)[0]);
    }

    /// Counts `n` packets answered without reading their slot (0 or 1).
    #[inline(always)]
    pub fn note_fresh(&mut self, n: u32) {
        self.fresh += n;
    }

    /// Whether the first pass should load every frame's home slot along
    /// with its set, as it must when most packets' answers read their
    /// slot: with many flows, each sending less than a packet a
    /// millisecond, a slot loaded only once the entry is in (by
    /// `filter::prefetch_table_slots`) would arrive a whole memory latency later. With
    /// few, busy flows most answers read no slot, and loading them all
    /// would cost the lines the cache saves.
    #[inline(always)]
    pub fn slots_ahead(&self) -> bool {
        self.slots_ahead
    }

    /// Ends a burst of `frames` frames: the next loads slots ahead unless
    /// at least half of these were answered without their slot.
    #[inline(always)]
    pub fn end_burst(&mut self, frames: usize) {
        self.slots_ahead = (self.fresh as usize) * 2 < frames;
        self.fresh = 0;
    }

    /// When the first way of `home`'s set was last checked (whatever key
    /// and epoch it holds).
    #[inline(always)]
    pub fn first_way_checked_at(&self, home: u32) -> u32 {
        self.set(home)[0].checked_ms
    }

    /// Which way of `home`'s set holds this key in the current epoch.
    #[inline(always)]
    fn way(&self, home: u32, addrs: u64, ports_proto: u64) -> Option<usize> {
        let set = self.set(home);
        let holds =
            |e: &Entry| e.addrs == addrs && e.ports_proto == ports_proto && e.epoch == self.epoch;
        if holds(&set[0]) {
            Some(0)
        } else if set[0].second() && holds(&set[1]) {
            Some(1)
        } else {
            None
        }
    }

    /// The valid entry for `home` holding this key, if any.
    #[inline(always)]
    pub fn get(&self, home: u32, addrs: u64, ports_proto: u64) -> Option<&Entry> {
        let w = self.way(home, addrs, ports_proto)?;
        Some(&self.set(home)[w])
    }

    /// [`get`](FlowCache::get), to update the entry (its check time and
    /// pending counts).
    #[inline(always)]
    pub fn get_mut(&mut self, home: u32, addrs: u64, ports_proto: u64) -> Option<&mut Entry> {
        let w = self.way(home, addrs, ports_proto)?;
        let at = (home as usize & self.mask) * WAYS + w;
        // SAFETY: a valid entry (epoch >= 1) is never NO_SET's (epoch 0):
        // `at` is inside the mapping, whose pointer came from a mutable
        // mapping, and `&mut self` makes the borrow unique.
        Some(unsafe { &mut *self.entries.first.add(at).cast_mut() })
    }

    /// Bytes 6-13 of a frame the cache answers out of global port `port`:
    /// the port's MAC as source, the IPv4 ethertype.
    #[inline(always)]
    pub fn src_mac_type(&self, port: u8) -> &[u8; 8] {
        &self.src_macs[port as usize]
    }

    /// Makes the entry of this key (if any) check its slot on its next
    /// packet: the full path changed its connection in this millisecond.
    #[inline]
    pub fn stale(&mut self, home: u32, (addrs, ports_proto): (u64, u64), now_ms: u32) {
        if let Some(e) = self.get_mut(home, addrs, ports_proto) {
            e.checked_ms = now_ms.wrapping_sub(1);
        }
    }

    /// Adds an entry's pending counts to its connection's slot of their
    /// direction (the forward slot for the client's packets, the reply
    /// slot a reply was found through), if the slots still hold the
    /// connection it was filled for (their lock words unchanged: no
    /// insert, retire or removal since); otherwise the connection is gone,
    /// and so are its counts.
    #[inline]
    pub fn flush(e: &mut Entry, ct: &ConnTable<'_>) {
        if e.pend_pkts == 0 {
            return;
        }
        let s = ct.slot(e.idx);
        let via = ct.slot(e.via);
        if s.lock.load(Ordering::Acquire) == e.lock as u64
            && (e.via == e.idx || via.lock.load(Ordering::Acquire) == e.via_lock as u64)
        {
            via.add_counts(u64::from(e.pend_pkts), u64::from(e.pend_bytes));
        }
        (e.pend_pkts, e.pend_bytes) = (0, 0);
    }

    /// Flushes the pending counts of the next `n` entries (round the whole
    /// cache) that no packet checked in this millisecond: counts of a flow
    /// that stopped reach its slot within one round. The engine sweeps a
    /// few entries per busy loop and many per idle one.
    #[inline]
    pub fn sweep(&mut self, n: usize, ct: &ConnTable<'_>, now_ms: u32) {
        let mut cursor = self.cursor;
        let entries = self.entries.as_mut_slice();
        let Some(last) = entries.len().checked_sub(1) else {
            return;
        };
        for _ in 0..n {
            // `len` is a power of two.
            cursor = (cursor + 1) & last;
            let e = &mut entries[cursor];
            if e.pend_pkts != 0 && e.checked_ms != now_ms {
                Self::flush(e, ct);
            }
            // `now_ms` comes round every 2^32 ms (49.7 days): an entry left
            // unused that long must not pass for checked in this
            // millisecond. Rounds take seconds at most, so no check time
            // ever gets near 2^32 ms old.
            if now_ms.wrapping_sub(e.checked_ms) > STALE_AFTER_MS {
                e.checked_ms = now_ms.wrapping_sub(STALE_AFTER_MS);
            }
        }
        // The next call's first line, loaded meanwhile.
        shm_layout::conntrack::prefetch(&entries[(cursor + 1) & last]);
        self.cursor = cursor;
    }

    /// Flushes every entry's pending counts (the switch stopping).
    pub fn flush_all(&mut self, ct: &ConnTable<'_>) {
        for e in self.entries.as_mut_slice() {
            Self::flush(e, ct);
        }
    }

    /// Stores `e` (its key words set; filled or checked in this
    /// millisecond, nothing pending) as the entry for `home`, in the
    /// current epoch, in the first way: over an entry of the same key or an
    /// invalid one; else the entry there moves to the second way (the less
    /// recently filled of the two leaves). The first way's [`KIND_SECOND`] says
    /// whether the second may hold an entry of this epoch: an entry moves
    /// there only from a valid first way, and an epoch's end invalidates
    /// both, so a first way of another epoch has an invalid second too.
    /// The entry overwritten, valid or not, has its pending counts flushed
    /// first. `port_src` is the source MAC of the entry's egress port.
    #[inline]
    pub fn put(&mut self, home: u32, mut e: Entry, port_src: [u8; 6], ct: &ConnTable<'_>) {
        let at = (home as usize & self.mask) * WAYS;
        let epoch = self.epoch;
        e.epoch = epoch;
        self.src_macs[e.port as usize][..6].copy_from_slice(&port_src);
        let Some(set) = self
            .entries
            .as_mut_slice()
            .get_mut(at..at + WAYS)
            .and_then(|s| s.first_chunk_mut::<WAYS>())
        else {
            return;
        };
        // The first way holds the most recently filled entry.
        let valid = set[0].epoch == epoch;
        let same = set[0].addrs == e.addrs && set[0].ports_proto == e.ports_proto;
        let second = if valid && !same {
            Self::flush(&mut set[1], ct);
            set[1] = set[0];
            true
        } else {
            Self::flush(&mut set[0], ct);
            valid && set[0].second()
        };
        e.kind = e.kind & !KIND_SECOND | if second { KIND_SECOND } else { 0 };
        set[0] = e;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filter::{
        Parsed, Verdict, answer_fingerprint, parse_and_prefetch, prefetch_table_slots,
        switch_parsed,
    };
    use crate::fixture::{CLIENT_GW_MAC, Fixture, VIP, port_mac};
    use etherparse::PacketBuilder;
    use proptest::prelude::*;
    use shm_layout::config_slot::{ON_DOWN_KEEP, ON_DOWN_RESCHEDULE, ON_DOWN_RESET};
    use shm_layout::conntrack::FlowKey;
    use shm_layout::switch_slot::{Counter, N_COUNTERS};

    const FIN: u8 = 1;
    const SYN: u8 = 2;
    const RST: u8 = 4;
    const PSH: u8 = 8;
    const ACK: u8 = 16;

    /// One switch's view: a fixture region, its counters, its cache.
    struct Switch {
        fx: Fixture,
        c: [u64; N_COUNTERS],
        flows: FlowCache,
    }

    impl Switch {
        fn new(tag: &str, entries: usize) -> Self {
            let tag = format!("{tag}-{:?}", std::thread::current().id())
                .replace(|c: char| !c.is_ascii_alphanumeric() && c != '-', "");
            Self {
                fx: Fixture::new(&tag, 1 << 12),
                c: [0; N_COUNTERS],
                flows: FlowCache::new(entries).unwrap(),
            }
        }

        /// The engine's way with one frame: sync the cache with the
        /// configuration's answer fingerprint (the fixture's two ports) and
        /// the routing stamp, the first pass, the second.
        fn send(&mut self, now_ms: u32, in_port: u32, frame: &[u8]) -> (Verdict, Vec<u8>) {
            let Switch { fx, c, flows } = self;
            let (_, routing) = fx.stamps();
            let mut buf = vec![0u8; 2048];
            buf[..frame.len()].copy_from_slice(frame);
            let mut ctx = fx.ctx(c);
            ctx.now_ms = now_ms;
            let answers =
                answer_fingerprint(&ctx.cfg, &[port_mac(0), port_mac(1)], &[Some(0), Some(1)]);
            flows.sync(answers, routing);
            ctx.flows = core::mem::take(flows);
            let mut p = Parsed::default();
            parse_and_prefetch(&buf[..frame.len()], &ctx.ct, &ctx.flows, &mut p);
            prefetch_table_slots(&p, &ctx.ct, &ctx.flows, now_ms);
            let v = switch_parsed(&mut buf, frame.len(), &p, in_port, &port_mac, &mut ctx);
            *flows = core::mem::take(&mut ctx.flows);
            (v, buf)
        }

        /// Opens TCP connection `port` (SYN, then the ACK that ends the
        /// handshake and fills the cache); returns its backend.
        fn open(&mut self, now_ms: u32, port: u16) -> ([u8; 4], u16) {
            self.send(now_ms, 0, &client(false, port, SYN, 64));
            let (v, buf) = self.send(now_ms, 0, &client(false, port, ACK, 64));
            backend_of(v, &buf).expect("forwarded to a backend")
        }

        /// Opens TCP connection `port` and sends one data packet, which
        /// the cache answers; returns that packet.
        fn open_cached(&mut self, now_ms: u32, port: u16) -> Vec<u8> {
            self.open(now_ms, port);
            let hits = self.hits();
            let f = client(false, port, ACK, 64);
            self.send(now_ms, 0, &f);
            assert_eq!(self.hits(), hits + 1, "answered from the cache");
            f
        }

        /// The engine's sweep of the whole cache at `now_ms`: the counts
        /// of packets answered in earlier milliseconds reach their slots.
        fn sweep(&mut self, now_ms: u32) {
            let ct = self.fx.region.conntrack();
            self.flows.sweep(self.flows.capacity(), &ct, now_ms);
        }

        /// Another process retires TCP connection `port` (as the GC
        /// does).
        fn retire_elsewhere(&self, port: u16) {
            let ct = self.fx.region.conntrack();
            let idx = ct.lookup(&tcp_key(port)).unwrap().idx;
            let snap = ct.snapshot(idx).unwrap();
            assert!(ct.retire(idx, &snap, std::process::id()).is_some());
        }

        fn hits(&self) -> u64 {
            self.c[Counter::FlowCacheHit as usize]
        }

        /// (TCP state, packets, bytes, last seen) of the live connection
        /// `key` belongs to at `now_ms`. (An expired one is absent: each
        /// region hashes with its own seed, so which expired entries a later
        /// insert reused differs between two regions.)
        fn entry(&mut self, key: &FlowKey, now_ms: u32) -> Option<(u32, u64, u64, u32)> {
            let timeouts = self.fx.ctx(&mut self.c).timeouts;
            let ct = self.fx.region.conntrack();
            let s = ct.slot(ct.lookup(key)?.idx);
            if s.expired(now_ms, &timeouts) {
                return None;
            }
            let ld =
                |a: &core::sync::atomic::AtomicU64| a.load(core::sync::atomic::Ordering::Relaxed);
            let ld32 =
                |a: &core::sync::atomic::AtomicU32| a.load(core::sync::atomic::Ordering::Relaxed);
            Some((
                ld32(&s.tcp_state),
                ld(&s.packets),
                ld(&s.bytes),
                ld32(&s.last_seen),
            ))
        }
    }

    /// Client (198.18.100.1:`port`) -> VIP: TCP to :80 with `flags`, or
    /// UDP to :53; `ttl` as given.
    fn client(udp: bool, port: u16, flags: u8, ttl: u8) -> Vec<u8> {
        let b = PacketBuilder::ethernet2(CLIENT_GW_MAC, [2, 0, 0, 0, 0, 1]).ipv4(
            [198, 18, 100, 1],
            VIP.to_be_bytes(),
            ttl,
        );
        let mut v = Vec::new();
        if udp {
            b.udp(port, 53).write(&mut v, b"query").unwrap();
        } else {
            tcp_flags(b.tcp(port, 80, 1, 1000), flags)
                .write(&mut v, b"data")
                .unwrap();
        }
        v
    }

    /// Backend (`backend`:`bport`) -> client, as the backend answers a
    /// NAT connection.
    fn reply(udp: bool, backend: [u8; 4], bport: u16, port: u16, flags: u8) -> Vec<u8> {
        let b = PacketBuilder::ethernet2([2, 0, 0, 0, 1, backend[3]], [2, 0, 0, 0, 0, 2]).ipv4(
            backend,
            [198, 18, 100, 1],
            64,
        );
        let mut v = Vec::new();
        if udp {
            b.udp(bport, port).write(&mut v, b"answer").unwrap();
        } else {
            tcp_flags(b.tcp(bport, port, 77, 1000), flags)
                .write(&mut v, b"")
                .unwrap();
        }
        v
    }

    fn tcp_flags(
        mut b: etherparse::PacketBuilderStep<etherparse::TcpHeader>,
        flags: u8,
    ) -> etherparse::PacketBuilderStep<etherparse::TcpHeader> {
        if flags & SYN != 0 {
            b = b.syn();
        }
        if flags & ACK != 0 {
            b = b.ack(2);
        }
        if flags & FIN != 0 {
            b = b.fin();
        }
        if flags & RST != 0 {
            b = b.rst();
        }
        if flags & PSH != 0 {
            b = b.psh();
        }
        b
    }

    /// Each direction of a NAT connection has its own counts: the
    /// client's packets in the forward slot, the backend's in the reply
    /// slot, whether the full path or the cache answered them (the
    /// cache's pending counts reach the slot of their direction).
    #[test]
    fn each_direction_counts_in_its_own_slot_full_path_or_cached() {
        let mut sw = Switch::new("dir-counts", 1 << 10);
        let (b, bport) = sw.open(10, 5000);
        let data = client(false, 5000, ACK, 64);
        let ans = reply(false, b, bport, 5000, ACK);
        for ms in [11, 11, 12] {
            sw.send(ms, 0, &data);
        }
        for ms in [11, 11, 11, 12] {
            sw.send(ms, 1, &ans);
        }
        assert!(sw.hits() >= 3, "the cache answered some");
        sw.sweep(20);
        let ct = sw.fx.region.conntrack();
        let hit = ct.lookup(&tcp_key(5000)).unwrap();
        let conn = hit.conn();
        let f = ct.slot(hit.idx);
        let ld = |a: &core::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        // SYN and ACK of the handshake, three data packets.
        assert_eq!(
            (ld(&f.packets), ld(&f.bytes)),
            (5, 5 * (data.len() as u64 - 14))
        );
        assert_eq!(
            ct.reply_counts(&conn, hit.idx),
            (4, 4 * (ans.len() as u64 - 14))
        );
    }

    /// The backend a forwarded frame went to (address, port), from its bytes.
    fn backend_of(v: Verdict, buf: &[u8]) -> Option<([u8; 4], u16)> {
        match v {
            Verdict::Tx { port: 1, .. } => Some((
                buf[30..34].try_into().unwrap(),
                u16::from_be_bytes([buf[36], buf[37]]),
            )),
            _ => None,
        }
    }

    fn tcp_key(port: u16) -> FlowKey {
        FlowKey {
            proto: 6,
            src_ip: 0xc612_6401,
            dst_ip: VIP,
            src_port: port,
            dst_port: 80,
        }
    }

    #[test]
    fn sets_keep_two_flows_and_the_less_recently_filled_leaves() {
        let mut fc = FlowCache::new(4).unwrap();
        let fx = Fixture::new("fc-sets", 1 << 12);
        let ct = fx.region.conntrack();
        let key = |n: u64| (n, n << 32 | 6);
        let put = |fc: &mut FlowCache, n: u64| {
            let (addrs, ports_proto) = key(n);
            let e = Entry {
                addrs,
                ports_proto,
                idx: n as u32,
                ..Entry::default()
            };
            fc.put(1, e, [0; 6], &ct);
        };
        let got = |fc: &FlowCache, n: u64| fc.get(1, key(n).0, key(n).1).map(|e| e.idx);
        // The first way says whether the second may hold an entry.
        let second = |fc: &FlowCache| fc.set(1)[0].second();
        put(&mut fc, 10);
        assert!(!second(&fc), "one flow: the second way is not read");
        put(&mut fc, 11);
        assert!(second(&fc));
        assert_eq!((got(&fc, 10), got(&fc, 11)), (Some(10), Some(11)));
        assert_eq!(
            fc.get(0, key(10).0, key(10).1).map(|e| e.idx),
            None,
            "another set"
        );
        put(&mut fc, 12);
        assert_eq!(
            (got(&fc, 10), got(&fc, 11), got(&fc, 12)),
            (None, Some(11), Some(12))
        );
        // A refill of a present key replaces it, and evicts nothing.
        put(&mut fc, 12);
        assert_eq!((got(&fc, 11), got(&fc, 12)), (Some(11), Some(12)));
        // New stamps: nothing is valid; filling starts over.
        fc.sync(5, 6);
        assert_eq!((got(&fc, 11), got(&fc, 12)), (None, None));
        fc.sync(5, 6);
        put(&mut fc, 13);
        assert_eq!(got(&fc, 13), Some(13));
        assert!(!second(&fc), "over an entry of an ended epoch");
        put(&mut fc, 13);
        assert!(!second(&fc), "a refill keeps the flag");
        put(&mut fc, 14);
        put(&mut fc, 14);
        assert!(second(&fc), "a refill keeps the flag");
        assert_eq!((got(&fc, 13), got(&fc, 14)), (Some(13), Some(14)));
        fc.sync(5, 7);
        assert_eq!(got(&fc, 13), None, "a routing publication invalidates too");
        // A disabled cache holds nothing.
        let mut off = FlowCache::new(0).unwrap();
        put(&mut off, 1);
        assert_eq!(got(&off, 1), None);
    }

    #[test]
    fn established_packets_are_answered_from_the_cache_with_the_full_paths_bytes() {
        let mut cached = Switch::new("fc-hit", DEFAULT_ENTRIES);
        let mut full = Switch::new("fc-full", 0);
        let now = cached.fx.region.now_ms();
        let frames = [
            client(false, 40_000, SYN, 64),
            // Ends the handshake (SYN -> ESTABLISHED) and fills the cache.
            client(false, 40_000, ACK, 64),
            // Answered from it.
            client(false, 40_000, ACK | PSH, 64),
            client(false, 40_000, ACK | PSH, 64),
            client(false, 40_000, ACK, 9),
            // UDP: a new flow, a packet that fills, one answered.
            client(true, 5353, 0, 64),
            client(true, 5353, 0, 64),
            client(true, 5353, 0, 64),
        ];
        let mut to = None;
        for (i, f) in frames.iter().enumerate() {
            let a = cached.send(now, 0, f);
            let b = full.send(now, 0, f);
            assert_eq!(a.0, b.0, "frame {i}");
            assert!(a.1 == b.1, "frame {i}: different bytes out");
            to = to.or(backend_of(a.0, &a.1));
        }
        assert_eq!(
            cached.hits(),
            4,
            "three TCP and one UDP packet from the cache"
        );
        assert_eq!(full.hits(), 0);
        // The TCP backend's replies: the first fills, the second hits.
        let (backend, bport) = to.unwrap();
        for _ in 0..2 {
            let r = reply(false, backend, bport, 40_000, ACK);
            let a = cached.send(now, 1, &r);
            let b = full.send(now, 1, &r);
            assert_eq!(a.0, b.0);
            assert!(a.1 == b.1, "reply: different bytes out");
        }
        assert_eq!(cached.hits(), 5, "and the second reply");
        let mut ca = cached.c;
        ca[Counter::FlowCacheHit as usize] = 0;
        assert_eq!(ca, full.c, "every other counter as the full path counts it");
        // All in one millisecond: the forward slot counted the client's
        // packets the full path handled (the SYN that opened, the ACK that
        // filled; the first reply is in the reply slot); the three TCP
        // hits and the reply's wait in the entries until a sweep in a
        // later millisecond (or the next check).
        let slot = cached.entry(&tcp_key(40_000), now).unwrap();
        assert_eq!((slot.1, slot.2), (2, 88));
        cached.sweep(now);
        assert_eq!(cached.entry(&tcp_key(40_000), now), Some(slot), "not in it");
        cached.sweep(now.wrapping_add(1));
        assert_eq!(
            cached.entry(&tcp_key(40_000), now),
            full.entry(&tcp_key(40_000), now)
        );
        assert_eq!(
            cached.entry(&tcp_key(40_000), now).unwrap().1,
            5,
            "every client packet counted, the SYN that made the entry included (the replies count in the reply slot)"
        );
        assert_eq!(
            cached.entry(&tcp_key(40_000), now).unwrap().0,
            shm_layout::conntrack::STATE_ESTABLISHED
        );
    }

    #[test]
    fn an_epoch_counter_coming_round_brings_no_entry_back() {
        let mut fc = FlowCache::new(4).unwrap();
        let fx = Fixture::new("fc-wrap-epoch", 1 << 12);
        let (addrs, ports_proto) = (7, 7 << 32 | 6);
        // Filled in epoch 1, the first.
        let e = Entry {
            addrs,
            ports_proto,
            idx: 7,
            ..Entry::default()
        };
        fc.put(0, e, [0; 6], &fx.region.conntrack());
        assert!(fc.get(0, addrs, ports_proto).is_some());
        // As after 2^32 - 2 invalidations: the next comes round to 1.
        fc.epoch = u32::MAX;
        assert!(fc.get(0, addrs, ports_proto).is_none());
        fc.invalidate();
        assert_eq!(fc.epoch, 1);
        assert!(fc.get(0, addrs, ports_proto).is_none(), "after the wrap");
    }

    /// UDP's checksum rules, answered from the cache as the full path
    /// answers: a datagram sent without a checksum (0) leaves without one,
    /// and one whose rewritten checksum computes to 0 leaves with 0xffff.
    #[test]
    fn udp_without_a_checksum_or_with_one_that_computes_to_zero_keeps_the_rules() {
        let mut cached = Switch::new("fc-udp0", DEFAULT_ENTRIES);
        let mut full = Switch::new("fc-udp0-full", 0);
        let now = cached.fx.region.now_ms();
        const CSUM: usize = 14 + 20 + 6;
        // Client -> VIP UDP from `port` with a two-byte payload.
        let dgram = |payload: [u8; 2]| {
            let mut v = Vec::new();
            PacketBuilder::ethernet2(CLIENT_GW_MAC, [2, 0, 0, 0, 0, 1])
                .ipv4([198, 18, 100, 1], VIP.to_be_bytes(), 64)
                .udp(5353, 53)
                .write(&mut v, &payload)
                .unwrap();
            v
        };
        // The full path's checksum out for payload 0: adding it as the
        // payload word makes the rewritten datagram's sum 0xffff, so its
        // checksum computes to 0.
        let (v, out) = full.send(now, 0, &dgram([0, 0]));
        assert!(matches!(v, Verdict::Tx { .. }));
        let zero_out = dgram([out[CSUM], out[CSUM + 1]]);
        let mut no_csum = dgram([1, 2]);
        no_csum[CSUM..CSUM + 2].copy_from_slice(&[0, 0]);
        // The cached switch opens and fills the flow, then answers both.
        for _ in 0..2 {
            cached.send(now, 0, &dgram([0, 0]));
        }
        let hits = cached.hits();
        for (f, want) in [(&zero_out, [0xff, 0xff]), (&no_csum, [0, 0])] {
            let a = cached.send(now, 0, f);
            let b = full.send(now, 0, f);
            assert_eq!(a.0, b.0);
            assert_eq!(a.1[CSUM..CSUM + 2], want, "checksum out");
            assert!(a.1 == b.1, "different bytes out");
        }
        assert_eq!(cached.hits(), hits + 2, "both answered from the cache");
    }

    #[test]
    fn a_new_publication_idle_timeout_or_closing_packet_takes_the_full_path() {
        let mut sw = Switch::new("fc-inval", DEFAULT_ENTRIES);
        let now = sw.fx.region.now_ms();
        let (backend, _) = sw.open(now, 40_001);
        sw.send(now, 0, &client(false, 40_001, ACK, 64));
        assert_eq!(sw.hits(), 1, "the handshake's ACK filled the cache");
        // Its backend goes DOWN with policy reset: the next packet is
        // answered with a RST to the client, not forwarded from the cache.
        let id = u32::from(backend[3]) - 1;
        sw.fx.mark_down(&[(id, ON_DOWN_RESET)]);
        let (v, buf) = sw.send(now, 0, &client(false, 40_001, ACK, 64));
        assert!(matches!(v, Verdict::Tx { port: 0, .. }), "{v:?}");
        assert_ne!(buf[47] & RST, 0, "a RST");
        assert_eq!(sw.hits(), 1);
        // Back up (keep): forwarded again, cached after one full pass.
        sw.fx.mark_down(&[(id, ON_DOWN_KEEP)]);
        sw.fx.configure(|_| {});
        for _ in 0..2 {
            let (v, buf) = sw.send(now, 0, &client(false, 40_001, ACK, 64));
            assert_eq!(backend_of(v, &buf).map(|b| b.0), Some(backend));
        }
        assert_eq!(sw.hits(), 2);
        // Idle past the established timeout (900 s): the full path finds it
        // expired (a mid-flow packet then makes a new entry).
        let later = now.wrapping_add(900_001);
        sw.send(later, 0, &client(false, 40_001, ACK, 64));
        assert_eq!(sw.hits(), 2, "an idle entry is not answered from the cache");
        assert_eq!(sw.c[Counter::ConnMidflow as usize], 1);
        // The new entry is provisional (a pickup): not cached until the
        // backend's reply confirms it; then the next packet fills the
        // cache, the one after hits; a FIN takes the full path (it closes
        // the connection).
        sw.send(later, 0, &client(false, 40_001, ACK, 64));
        assert_eq!(
            sw.hits(),
            2,
            "a provisional entry is not answered from the cache"
        );
        sw.send(later, 1, &reply(false, backend, 8080, 40_001, ACK));
        sw.send(later, 0, &client(false, 40_001, ACK, 64));
        sw.send(later, 0, &client(false, 40_001, ACK, 64));
        assert_eq!(sw.hits(), 3);
        sw.send(later, 0, &client(false, 40_001, ACK | FIN, 64));
        assert_eq!(sw.hits(), 3);
        assert_eq!(
            sw.entry(&tcp_key(40_001), later).unwrap().0,
            shm_layout::conntrack::STATE_CLOSING
        );
        // The TTL that would expire is the full path's to count.
        sw.send(later, 0, &client(false, 40_001, ACK, 64));
        let drops = sw.c[Counter::DropTtl as usize];
        let (v, _) = sw.send(later, 0, &client(false, 40_001, ACK, 1));
        assert_eq!(v, Verdict::Drop);
        assert_eq!(sw.c[Counter::DropTtl as usize], drops + 1);
    }

    /// The cache answers only while the full path would: not for a reply
    /// whose reply slot is gone (the GC removes orphans without touching
    /// the forward slot), nor for an entry within `EXPIRY_MARGIN_MS` of its
    /// idle timeout (another process's clock may already count it gone).
    #[test]
    fn a_vanished_reply_slot_or_a_nearly_idle_entry_takes_the_full_path() {
        let mut sw = Switch::new("fc-via", DEFAULT_ENTRIES);
        let now = sw.fx.region.now_ms();
        let (backend, bport) = sw.open(now, 40_002);
        let r = reply(false, backend, bport, 40_002, ACK);
        for _ in 0..2 {
            assert!(matches!(sw.send(now, 1, &r).0, Verdict::Tx { port: 0, .. }));
        }
        assert_eq!(sw.hits(), 1, "the second reply from the cache");
        // The reply slot goes; the forward slot stays as it was.
        let ct = sw.fx.region.conntrack();
        let reply_key = FlowKey {
            proto: 6,
            src_ip: u32::from_be_bytes(backend),
            dst_ip: 0xc612_6401,
            src_port: bport,
            dst_port: 40_002,
        };
        let hit = ct.lookup(&reply_key).unwrap();
        assert_ne!(hit.via, hit.idx, "found through its reply slot");
        let snap = ct.snapshot(hit.via).unwrap();
        assert!(ct.remove(hit.via, &snap, std::process::id()));
        // Another process's change: the cache sees it from the next
        // millisecond (it answered in this one without reading slots).
        assert!(matches!(sw.send(now, 1, &r).0, Verdict::Tx { port: 0, .. }));
        assert_eq!(sw.hits(), 2, "within the millisecond of its check");
        let next = now.wrapping_add(1);
        assert_eq!(sw.send(next, 1, &r).0, Verdict::Drop);
        assert_eq!(sw.c[Counter::DropNotOurs as usize], 1);
        assert_eq!(sw.hits(), 2);
        // Forward: 900 s established timeout; 5 ms short of it the full
        // path still forwards, and the cache leaves it to it.
        let f = client(false, 40_002, ACK, 64);
        sw.send(next, 0, &f);
        let hits = sw.hits();
        let late = now.wrapping_add(900_000 - 5);
        assert!(matches!(
            sw.send(late, 0, &f).0,
            Verdict::Tx { port: 1, .. }
        ));
        assert_eq!(sw.hits(), hits, "within the margin: the full path");
        assert!(matches!(
            sw.send(late, 0, &f).0,
            Verdict::Tx { port: 1, .. }
        ));
        assert_eq!(sw.hits(), hits + 1, "refreshed: from the cache again");
    }

    /// A publication that changes nothing an answer depends on (here a
    /// weight and a limit) keeps the cache; one that makes the VIP another
    /// address empties it, and the old VIP's packets are no longer ours.
    #[test]
    fn only_publications_that_change_answers_empty_the_cache() {
        let mut sw = Switch::new("fc-fp", DEFAULT_ENTRIES);
        let now = sw.fx.region.now_ms();
        let f = sw.open_cached(now, 40_003);
        sw.fx.configure(|s| {
            s.backends[0].weight = 7;
            s.backends[1].max_conns = 100;
        });
        sw.send(now, 0, &f);
        assert_eq!(sw.hits(), 2, "weights and limits keep the cache");
        sw.fx.configure(|s| {
            for svc in &mut s.services[..3] {
                svc.vip += 1;
            }
        });
        assert_eq!(sw.send(now, 0, &f).0, Verdict::Drop);
        assert_eq!(sw.c[Counter::DropNotOurs as usize], 1);
        assert_eq!(sw.hits(), 2, "a VIP change empties it");
    }

    /// The packet and byte counts of packets answered without the slot
    /// wait in their entry and reach the slot when the entry leaves the
    /// cache (here a one-set cache: a third flow evicts the first), with
    /// no sweep.
    #[test]
    fn an_evicted_entry_brings_its_waiting_counts_to_its_slot() {
        let mut sw = Switch::new("fc-evict", 2);
        let now = sw.fx.region.now_ms();
        for port in [40_010, 40_011] {
            sw.open_cached(now, port);
        }
        // The SYN and the ACK that filled (counted by the full path), the
        // hit waiting.
        assert_eq!(sw.entry(&tcp_key(40_010), now).unwrap().1, 2);
        sw.open_cached(now, 40_012);
        assert_eq!(
            sw.entry(&tcp_key(40_010), now).unwrap().1,
            3,
            "flushed as it left"
        );
        assert_eq!(sw.entry(&tcp_key(40_011), now).unwrap().1, 2, "still in");
    }

    /// Waiting counts go to the slot only while it holds the same
    /// connection: once another process retired it, they are dropped.
    #[test]
    fn waiting_counts_of_a_connection_that_is_gone_are_dropped() {
        let mut sw = Switch::new("fc-gone", DEFAULT_ENTRIES);
        let now = sw.fx.region.now_ms();
        let f = sw.open_cached(now, 40_020);
        sw.send(now, 0, &f);
        let ct = sw.fx.region.conntrack();
        let slot = ct.slot(ct.lookup(&tcp_key(40_020)).unwrap().idx);
        let ord = core::sync::atomic::Ordering::Relaxed;
        assert_eq!(slot.packets.load(ord), 2, "two hits waiting");
        sw.retire_elsewhere(40_020);
        sw.flows.sweep(DEFAULT_ENTRIES, &ct, now.wrapping_add(1));
        assert_eq!(slot.packets.load(ord), 2, "not added to a retired slot");
    }

    /// A flow's 65,535th packet waiting in its entry is the last: the
    /// next is checked against the slot (and brings them all), whatever
    /// the millisecond.
    #[test]
    fn at_most_65535_packets_wait_in_an_entry() {
        let mut sw = Switch::new("fc-max", DEFAULT_ENTRIES);
        let now = sw.fx.region.now_ms();
        let f = sw.open_cached(now, 40_030);
        let words = tcp_key(40_030).words();
        let home = sw.fx.region.conntrack().home_of(words) as u32;
        let e = sw.flows.get_mut(home, words.0, words.1).unwrap();
        assert_eq!((e.pend_pkts, e.pend_bytes), (1, 44), "one 44-byte packet");
        // As if 65,533 more had come in this millisecond.
        e.pend_pkts = u16::MAX - 1;
        sw.send(now, 0, &f);
        let e = sw.flows.get_mut(home, words.0, words.1).unwrap();
        assert_eq!((e.pend_pkts, e.pend_bytes), (u16::MAX, 88));
        sw.send(now, 0, &f);
        let e = sw.flows.get_mut(home, words.0, words.1).unwrap();
        assert_eq!((e.pend_pkts, e.pend_bytes), (0, 0), "checked");
        let (_, packets, bytes, _) = sw.entry(&tcp_key(40_030), now).unwrap();
        // SYN, ACK, the waiting ones, the last.
        assert_eq!((packets, bytes), (2 + 65_535 + 1, 44 + 44 + 88 + 44));
        assert_eq!(sw.hits(), 3);
    }

    /// A connection this switch retires (a SYN on a closed one) takes its
    /// cached answers with it at once, in both directions: a reply in the
    /// same millisecond goes the full path's way, and counts where it
    /// counts.
    #[test]
    fn a_connection_this_switch_retires_loses_both_directions_answers_at_once() {
        let mut cached = Switch::new("fc-retire", DEFAULT_ENTRIES);
        let mut full = Switch::new("fc-retire-full", 0);
        let now = cached.fx.region.now_ms();
        let mut to = None;
        for f in [
            client(false, 40_050, SYN, 64),
            client(false, 40_050, ACK, 64),
            client(false, 40_050, ACK, 64),
        ] {
            let a = cached.send(now, 0, &f);
            assert_eq!(a.0, full.send(now, 0, &f).0);
            to = to.or(backend_of(a.0, &a.1));
        }
        let (backend, bport) = to.unwrap();
        let r = reply(false, backend, bport, 40_050, ACK);
        let frames = [
            (1, r.clone()),
            (1, r.clone()),
            (0, client(false, 40_050, ACK | FIN, 64)),
            (0, client(false, 40_050, SYN, 64)),
            (1, r.clone()),
            (0, client(false, 40_050, ACK, 64)),
        ];
        for (i, (port, f)) in frames.iter().enumerate() {
            let a = cached.send(now, *port, f);
            let b = full.send(now, *port, f);
            assert_eq!(a.0, b.0, "frame {i}");
            assert!(a.1 == b.1, "frame {i}: different bytes out");
        }
        let mut ca = cached.c;
        ca[Counter::FlowCacheHit as usize] = 0;
        assert_eq!(ca, full.c);
        cached.sweep(now.wrapping_add(1));
        assert_eq!(
            cached.entry(&tcp_key(40_050), now),
            full.entry(&tcp_key(40_050), now)
        );
    }

    /// The millisecond counter comes round after 2^32 ms: an entry left
    /// unused that long is not taken for one checked in this millisecond
    /// (the sweep moves old check times forward), so its slot is checked.
    #[test]
    fn a_check_time_does_not_come_round() {
        let mut sw = Switch::new("fc-ms-wrap", DEFAULT_ENTRIES);
        let now = sw.fx.region.now_ms();
        let f = sw.open_cached(now, 40_060);
        // Meanwhile another process retired the connection.
        sw.retire_elsewhere(40_060);
        // Sweeps over the next 2^32 ms; then the same `now_ms` again.
        sw.sweep(now.wrapping_add(1 << 31));
        let hits = sw.hits();
        sw.send(now, 0, &f);
        assert_eq!(sw.hits(), hits, "checked, and the slot is gone");
    }

    /// The first pass loads every home slot ahead while most answers read
    /// their slot, and stops once at least half of a burst's were answered
    /// without (a flow's packets within the millisecond of its check).
    #[test]
    fn slots_are_loaded_ahead_until_most_answers_need_none() {
        let mut sw = Switch::new("fc-ahead", DEFAULT_ENTRIES);
        assert!(sw.flows.slots_ahead(), "a cold cache");
        let now = sw.fx.region.now_ms();
        let f = sw.open_cached(now, 40_040);
        sw.flows.end_burst(3);
        assert!(sw.flows.slots_ahead(), "one of three (SYN, ACK, hit)");
        sw.send(now, 0, &f);
        sw.send(now, 0, &f);
        sw.flows.end_burst(4);
        assert!(!sw.flows.slots_ahead(), "two of four");
        // The next millisecond: the first packet checks its slot.
        sw.send(now.wrapping_add(1), 0, &f);
        sw.flows.end_burst(1);
        assert!(sw.flows.slots_ahead());
    }

    /// A slot whose 32-bit sequence came back round to the same value
    /// while it took another connection (simulated: its addresses change,
    /// its lock word does not) is not trusted.
    #[test]
    fn a_slot_holding_other_addresses_under_the_same_lock_word_is_not_trusted() {
        let mut sw = Switch::new("fc-wrap", DEFAULT_ENTRIES);
        let now = sw.fx.region.now_ms();
        let f = sw.open_cached(now, 40_004);
        let ct = sw.fx.region.conntrack();
        let slot = ct.slot(ct.lookup(&tcp_key(40_004)).unwrap().idx);
        let ord = core::sync::atomic::Ordering::Relaxed;
        slot.words[1].store(slot.words[1].load(ord) ^ 1 << 40, ord);
        // Seen from the next millisecond (see the test above).
        sw.send(now.wrapping_add(1), 0, &f);
        assert_eq!(sw.hits(), 1, "not from the cache");
        assert_eq!(
            sw.c[Counter::ConnMidflow as usize],
            1,
            "the full path found no entry"
        );
    }

    /// What a test does next.
    #[derive(Clone, Debug)]
    enum Op {
        /// A client packet of flow `flow` (0-3 TCP, 4-5 UDP) with `flags`
        /// and `ttl`.
        Client { flow: usize, flags: u8, ttl: u8 },
        /// The backend's packet of flow `flow` (once it has one).
        Reply { flow: usize, flags: u8 },
        /// Backend `id` of the TCP service (0-2) or the UDP one (3-5) DOWN
        /// with `action`, every other backend up.
        Down { id: u32, action: u8 },
        /// Every backend up (a new publication).
        Up,
        /// The services' VIP moves to the next address, or back.
        MoveVip,
        /// Established TCP and UDP idle timeouts become short (15 s, 4 s).
        /// One way only: lengthening them would revive entries that
        /// expired, and whether an expired entry was still there to
        /// revive depends on each region's hash seed (an insert near it
        /// may have reused its slot), not on the cache.
        Timeouts,
        /// Time passes.
        Wait { ms: u32 },
    }

    fn op() -> impl Strategy<Value = Op> {
        let flags = prop::sample::select(vec![
            ACK,
            ACK | PSH,
            SYN,
            SYN | ACK,
            ACK | FIN,
            RST,
            RST | ACK,
            0,
        ]);
        prop_oneof![
            6 => (0usize..6, flags.clone(), prop::sample::select(vec![64u8, 64, 64, 2, 1]))
                .prop_map(|(flow, flags, ttl)| Op::Client { flow, flags, ttl }),
            3 => (0usize..6, flags).prop_map(|(flow, flags)| Op::Reply { flow, flags }),
            1 => (0u32..6, prop::sample::select(vec![ON_DOWN_KEEP, ON_DOWN_RESCHEDULE, ON_DOWN_RESET]))
                .prop_map(|(id, action)| Op::Down { id, action }),
            1 => Just(Op::Up),
            1 => Just(Op::MoveVip),
            1 => Just(Op::Timeouts),
            1 => prop::sample::select(vec![1u32, 5_000, 20_000, 70_000, 1_000_000]).prop_map(|ms| Op::Wait { ms }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        /// Any sequence of packets (any flags, either direction, TTLs that
        /// expire), publications and idle time: a switch with a flow cache
        /// (of any size, down to one set, so entries evict each other)
        /// sends the same verdicts and bytes, counts the same, and leaves
        /// every connection entry as a switch without one; with the TCP
        /// service in NAT or in direct-routing mode, with the VIP moving
        /// away and back, and with idle timeouts shortening.
        #[test]
        fn a_switch_with_a_cache_behaves_as_one_without(
            ops in prop::collection::vec(op(), 1..80),
            entries in prop::sample::select(vec![2usize, 8, 4096]),
            dr in any::<bool>(),
        ) {
            let mut cached = Switch::new("fc-prop-c", entries);
            let mut full = Switch::new("fc-prop-f", 0);
            // The fixture's configuration with the TCP service in DR mode
            // or not, and the VIP moved to the next address or not.
            // and the idle timeouts short or not.
            let edit = |(moved, short): (bool, bool)| {
                move |s: &mut shm_layout::config_slot::ConfigSlotMut<'_>| {
                    if dr {
                        s.services[0].mode = shm_layout::config_slot::MODE_DR;
                    }
                    if moved {
                        for svc in &mut s.services[..3] {
                            svc.vip += 1;
                        }
                    }
                    if short {
                        s.header.tcp_established_ms = 15_000;
                        s.header.udp_ms = 4_000;
                    }
                }
            };
            let mut state = (false, false);
            cached.fx.configure(edit(state));
            full.fx.configure(edit(state));
            let mut now = cached.fx.region.now_ms();
            let mut backends: [Option<([u8; 4], u16)>; 6] = [None; 6];
            let port = |flow: usize| 41_000 + flow as u16;
            for (i, op) in ops.iter().enumerate() {
                let (frame, in_port) = match *op {
                    Op::Client { flow, flags, ttl } => (client(flow >= 4, port(flow), flags, ttl), 0),
                    Op::Reply { flow, flags } => match backends[flow] {
                        Some((ip, bport)) => (reply(flow >= 4, ip, bport, port(flow), flags), 1),
                        None => continue,
                    },
                    Op::Down { id, action } => {
                        cached.fx.publish(&[(id, action)], edit(state));
                        full.fx.publish(&[(id, action)], edit(state));
                        continue;
                    }
                    Op::Up => {
                        cached.fx.configure(edit(state));
                        full.fx.configure(edit(state));
                        continue;
                    }
                    Op::MoveVip | Op::Timeouts => {
                        if let Op::MoveVip = op {
                            state.0 = !state.0;
                        } else {
                            state.1 = true;
                        }
                        cached.fx.configure(edit(state));
                        full.fx.configure(edit(state));
                        continue;
                    }
                    Op::Wait { ms } => {
                        now = now.wrapping_add(ms);
                        continue;
                    }
                };
                let a = cached.send(now, in_port, &frame);
                let b = full.send(now, in_port, &frame);
                prop_assert_eq!(a.0, b.0, "op {}: {:?}", i, op);
                prop_assert!(a.1 == b.1, "op {}: {:?}: different bytes out", i, op);
                if let Op::Client { flow, .. } = *op
                    && let Some(to) = backend_of(a.0, &a.1)
                {
                    backends[flow] = Some(to);
                }
            }
            let mut ca = cached.c;
            ca[Counter::FlowCacheHit as usize] = 0;
            prop_assert_eq!(ca, full.c);
            // Counts still waiting in entries reach their slots.
            cached.sweep(now.wrapping_add(1));
            for flow in 0..6 {
                let key = FlowKey {
                    proto: if flow >= 4 { 17 } else { 6 },
                    dst_port: if flow >= 4 { 53 } else { 80 },
                    ..tcp_key(port(flow))
                };
                prop_assert_eq!(cached.entry(&key, now), full.entry(&key, now), "flow {}", flow);
            }
        }
    }
}
