//! The region header: identity, capacities, section table, publication words.

use core::mem::{offset_of, size_of};
use core::sync::atomic::{AtomicU32, AtomicU64};

use crate::fingerprint::Fingerprint;
use crate::fp_type;

/// `b"SWYARD\0\x01"` read as little-endian.
pub const MAGIC: u64 = u64::from_le_bytes(*b"SWYARD\0\x01");
/// Bumped on any incompatible change of meaning (the fingerprint catches layout).
pub const LAYOUT_VERSION: u32 = 1;

/// Region states (`RegionHeader::state`).
pub const REGION_INIT: u32 = 0;
pub const REGION_READY: u32 = 1;
pub const REGION_STOPPING: u32 = 2;

/// Sizes chosen at creation (from config `[limits]` and the switch count).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacities {
    pub services: u32,
    pub backends: u32,
    /// Size of the backend id space (ids outlive a configuration while
    /// connections reference them).
    pub backend_ids: u32,
    /// Connection-table slots; a power of two.
    pub conn_slots: u32,
    pub routes: u32,
    pub neighbours: u32,
    pub switches: u32,
    /// Maglev table size (prime).
    pub maglev_m: u32,
    /// Records per event ring.
    pub ring_slots: u32,
    pub _pad: u32,
}

impl Default for Capacities {
    fn default() -> Self {
        Self {
            services: 16,
            backends: 1024,
            backend_ids: 4096,
            conn_slots: 1 << 20,
            routes: 256,
            neighbours: 256,
            switches: 8,
            maglev_m: 65537,
            ring_slots: 4096,
            _pad: 0,
        }
    }
}

/// Section indexes in `RegionHeader::sections`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub enum Section {
    Header = 0,
    Switches = 1,
    BackendCounters = 2,
    ConfigA = 3,
    ConfigB = 4,
    RoutingA = 5,
    RoutingB = 6,
    ConnTable = 7,
    Rings = 8,
    /// Message rings ([`crate::msgring`]), `MSG_RINGS_PER_SWITCH` per switch.
    MsgRings = 9,
}

pub const N_SECTIONS: usize = 10;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SectionRec {
    pub offset: u64,
    pub len: u64,
}

/// The A/B words of one published table (configuration or routing).
#[repr(C, align(64))]
#[derive(Debug)]
pub struct PubWords {
    /// Which slot (0 = A, 1 = B) the switches read.
    pub active: AtomicU32,
    pub _pad: u32,
    /// Generation of the active slot; 0 = nothing published yet.
    pub generation: AtomicU64,
    /// Switches excluded from acknowledgement (stalled past the deadline),
    /// total; each was fenced before the publication went on.
    pub excluded: AtomicU64,
    /// Publications refused because an excluded switch could not be
    /// fenced (nothing was written; the writer retries), total.
    pub refused: AtomicU64,
    pub _pad1: [u8; 32],
}

/// The region header. Immutable fields are written before `state` becomes
/// READY (Release) and never again.
#[repr(C, align(64))]
#[derive(Debug)]
pub struct RegionHeader {
    pub magic: u64,
    pub version: u32,
    pub _pad0: u32,
    pub fingerprint: u64,
    pub total_len: u64,
    pub caps: Capacities,
    pub sections: [SectionRec; N_SECTIONS],
    /// Seed of the connection-table hash, random per region.
    pub hash_seed: u64,
    /// CLOCK_MONOTONIC ns at creation: the epoch of connection times.
    pub created_ns: u64,
    /// Wall-clock seconds at creation (for humans).
    pub created_unix: u64,
    pub instance: [u8; 32],
    pub _pad1: [u8; 32],
    // --- mutable words ---
    pub state: AtomicU32,
    pub controld_pid: AtomicU32,
    /// Start time of `controld_pid` ([`crate::time::process_start`]): with
    /// it, a pid the kernel reused is not mistaken for a running controld.
    pub controld_start: AtomicU64,
    pub _pad2: [u8; 48],
    pub config: PubWords,
    pub routing: PubWords,
}

const _: () = {
    assert!(offset_of!(RegionHeader, fingerprint) == 16);
    assert!(size_of::<Capacities>() == 40);
    assert!(offset_of!(RegionHeader, state) % 64 == 0);
    assert!(offset_of!(RegionHeader, config) % 64 == 0);
    assert!(size_of::<PubWords>() == 64);
};

pub(crate) const fn fingerprint(fp: Fingerprint) -> Fingerprint {
    let fp = fp_type!(
        fp,
        RegionHeader,
        magic,
        version,
        fingerprint,
        total_len,
        caps,
        sections,
        hash_seed,
        created_ns,
        created_unix,
        instance,
        state,
        controld_pid,
        controld_start,
        config,
        routing
    );
    let fp = fp_type!(
        fp,
        Capacities,
        services,
        backends,
        backend_ids,
        conn_slots,
        routes,
        neighbours,
        switches,
        maglev_m,
        ring_slots
    );
    let fp = fp_type!(fp, SectionRec, offset, len);
    fp_type!(fp, PubWords, active, generation, excluded, refused).mix(N_SECTIONS)
}
