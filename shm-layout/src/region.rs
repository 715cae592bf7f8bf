//! The region: layout from capacities, creation, attachment, typed views.
//!
//! This module and `shm.rs` hold the raw-pointer work of the crate: every
//! view it hands out is a slice of `#[repr(C)]` plain data or atomics inside
//! the mapping, bounds-checked against the section table at attach time.

use core::mem::size_of;
use core::sync::atomic::{AtomicU64, Ordering, fence};

use crate::config_slot::{
    BackendRec, ConfigHeader, ConfigSlotMut, ConfigView, ServiceRec, index_len,
};
use crate::conntrack::{ConnReader, ConnSlot, ConnTable};
use crate::fingerprint::{Fingerprint, checksum};
use crate::header::*;
use crate::msgring::{self, MSG_RING_BYTES, MSG_RINGS_PER_SWITCH, MsgRing, MsgRingHeader};
use crate::publish::Table;
use crate::ring::{Ring, RingHeader, RingSlot};
use crate::routing_slot::{NeighbourRec, RouteRec, RoutingHeader, RoutingSlotMut, RoutingView};
use crate::shm::{Access, Mapping, ShmError};
use crate::switch_slot::{BackendCounters, SwitchSlot};

/// The layout fingerprint of this build: sizes, alignments and field
/// offsets of every shared type.
pub const FINGERPRINT: u64 = {
    let fp = Fingerprint::new().mix(LAYOUT_VERSION as usize);
    let fp = crate::header::fingerprint(fp);
    let fp = crate::config_slot::fingerprint(fp);
    let fp = crate::routing_slot::fingerprint(fp);
    let fp = crate::switch_slot::fingerprint(fp);
    let fp = crate::switch_slot::backend_fingerprint(fp);
    let fp = crate::conntrack::fingerprint(fp);
    let fp = crate::msgring::fingerprint(fp);
    crate::ring::fingerprint(fp).value()
};

/// The shared-memory name of an instance's region.
pub fn region_name(instance: &str) -> String {
    format!("switchyard.{instance}")
}

#[derive(Debug, thiserror::Error)]
pub enum RegionError {
    #[error(transparent)]
    Shm(#[from] ShmError),
    #[error(
        "/dev/shm/{name} is not a switchyard region (magic {found:#018x}, expected {MAGIC:#018x})"
    )]
    BadMagic { name: String, found: u64 },
    #[error(
        "/dev/shm/{name} has layout version {found}, this program speaks version {LAYOUT_VERSION}"
    )]
    Version { name: String, found: u32 },
    #[error(
        "/dev/shm/{name} has layout fingerprint {found:#018x} but this program expects {expected:#018x}: \
         it was created by a different build of switchyard; stop that instance (or remove the region) and run matching binaries"
    )]
    Fingerprint {
        name: String,
        expected: u64,
        found: u64,
    },
    #[error("/dev/shm/{name} is not ready (controld is still creating it)")]
    NotReady { name: String },
    #[error("/dev/shm/{name} is corrupt: {what}")]
    Corrupt { name: String, what: String },
    #[error("invalid capacities: {0}")]
    BadCapacities(String),
}

const PAGE: u64 = 4096;

const fn round_up(x: u64, to: u64) -> u64 {
    x.div_ceil(to) * to
}

/// Offsets inside one configuration slot.
#[derive(Clone, Copy, Debug)]
struct ConfigLayout {
    services: u64,
    backends: u64,
    maglev: u64,
    down_action: u64,
    service_index: u64,
    vip_index: u64,
    len: u64,
}

fn config_layout(c: &Capacities) -> ConfigLayout {
    let services = round_up(size_of::<ConfigHeader>() as u64, 64);
    let backends = round_up(
        services + c.services as u64 * size_of::<ServiceRec>() as u64,
        64,
    );
    let maglev = round_up(
        backends + c.backends as u64 * size_of::<BackendRec>() as u64,
        64,
    );
    let down_action = round_up(maglev + c.services as u64 * c.maglev_m as u64 * 2, 64);
    let index = index_len(c.services) as u64;
    let service_index = round_up(down_action + c.backend_ids as u64, 64);
    let vip_index = round_up(service_index + index * 2, 64);
    let len = round_up(vip_index + index * 4, 64);
    ConfigLayout {
        services,
        backends,
        maglev,
        down_action,
        service_index,
        vip_index,
        len,
    }
}

#[derive(Clone, Copy, Debug)]
struct RoutingLayout {
    routes: u64,
    neighbours: u64,
    len: u64,
}

fn routing_layout(c: &Capacities) -> RoutingLayout {
    let routes = size_of::<RoutingHeader>() as u64;
    let neighbours = round_up(routes + c.routes as u64 * size_of::<RouteRec>() as u64, 64);
    let len = round_up(
        neighbours + c.neighbours as u64 * size_of::<NeighbourRec>() as u64,
        64,
    );
    RoutingLayout {
        routes,
        neighbours,
        len,
    }
}

fn ring_len(c: &Capacities) -> u64 {
    size_of::<RingHeader>() as u64 + c.ring_slots as u64 * size_of::<RingSlot>() as u64
}

/// Validates capacities and computes the section table and total size.
pub fn layout(c: &Capacities) -> Result<([SectionRec; N_SECTIONS], u64), RegionError> {
    let bad = |s: String| Err(RegionError::BadCapacities(s));
    if !c.conn_slots.is_power_of_two() || c.conn_slots < 64 {
        return bad(format!(
            "conn_slots {} must be a power of two >= 64",
            c.conn_slots
        ));
    }
    for (n, v) in [
        ("services", c.services),
        ("backends", c.backends),
        ("routes", c.routes),
        ("neighbours", c.neighbours),
        ("switches", c.switches),
        ("ring_slots", c.ring_slots),
    ] {
        if v == 0 || v > 1 << 20 {
            return bad(format!("{n} {v} must be between 1 and {}", 1 << 20));
        }
    }
    if c.backend_ids < c.backends {
        return bad(format!(
            "backend_ids {} must be >= backends {}",
            c.backend_ids, c.backends
        ));
    }
    if c.maglev_m < 2 || c.maglev_m > 65537 {
        return bad(format!(
            "maglev_m {} must be between 2 and 65537",
            c.maglev_m
        ));
    }
    let sizes: [u64; N_SECTIONS] = [
        size_of::<RegionHeader>() as u64,
        c.switches as u64 * size_of::<SwitchSlot>() as u64,
        c.backend_ids as u64 * size_of::<BackendCounters>() as u64,
        config_layout(c).len,
        config_layout(c).len,
        routing_layout(c).len,
        routing_layout(c).len,
        c.conn_slots as u64 * size_of::<ConnSlot>() as u64,
        c.switches as u64 * ring_len(c),
        c.switches as u64 * MSG_RINGS_PER_SWITCH as u64 * msgring::ring_bytes(),
    ];
    let mut sections = [SectionRec::default(); N_SECTIONS];
    let mut off = 0u64;
    for (s, len) in sections.iter_mut().zip(sizes) {
        *s = SectionRec { offset: off, len };
        off = round_up(off + len, PAGE);
    }
    Ok((sections, off))
}

/// A mapped region.
pub struct Region {
    map: Mapping,
    caps: Capacities,
    sections: [SectionRec; N_SECTIONS],
}

impl core::fmt::Debug for Region {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Region")
            .field("name", &self.map.name())
            .field("len", &self.map.len())
            .field("caps", &self.caps)
            .finish()
    }
}

fn random_seed() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: getrandom writes at most 8 bytes into our 8-byte buffer.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), 8, 0) };
    if n != 8 {
        return crate::time::mono_ns().wrapping_mul(0x9e37_79b9_7f4a_7c15)
            ^ std::process::id() as u64;
    }
    u64::from_le_bytes(b)
}

impl Region {
    /// Creates and initialises a region (mode 0600). The caller (controld)
    /// becomes its only configuration and routing writer.
    pub fn create(instance: &str, caps: Capacities) -> Result<Self, RegionError> {
        let (sections, total) = layout(&caps)?;
        let name = region_name(instance);
        let len = usize::try_from(total).map_err(|_| {
            RegionError::BadCapacities(format!("region of {total} bytes is too large"))
        })?;
        let map = Mapping::create(&name, len)?;
        let region = Self {
            map,
            caps,
            sections,
        };
        // SAFETY: the mapping is fresh, zero-filled, at least header-sized and
        // page aligned; nobody else can use it before `state` becomes READY.
        let h = unsafe { &mut *(region.map.as_ptr() as *mut RegionHeader) };
        h.magic = MAGIC;
        h.version = LAYOUT_VERSION;
        h.fingerprint = FINGERPRINT;
        h.total_len = total;
        h.caps = caps;
        h.sections = sections;
        h.hash_seed = random_seed();
        h.created_ns = crate::time::mono_ns();
        h.created_unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        crate::names::set(&mut h.instance, instance);
        h.controld_pid.store(std::process::id(), Ordering::Relaxed);
        h.state.store(REGION_READY, Ordering::Release);
        Ok(region)
    }

    /// Attaches to an existing region, verifying magic, version, fingerprint
    /// and section table. Read-only attachment is for inspection tools.
    pub fn attach(instance: &str, access: Access) -> Result<Self, RegionError> {
        Self::attach_name(&region_name(instance), access)
    }

    /// Like [`Region::attach`], by shared-memory object name.
    pub fn attach_name(name: &str, access: Access) -> Result<Self, RegionError> {
        let map = Mapping::open(name, access, size_of::<RegionHeader>())?;
        // SAFETY: the mapping is at least header-sized and page aligned; the
        // immutable fields were written before READY was stored (checked below
        // with Acquire before trusting anything beyond magic/version/fingerprint).
        let h = unsafe { &*(map.as_ptr() as *const RegionHeader) };
        let name = name.to_string();
        if h.magic != MAGIC {
            return Err(RegionError::BadMagic {
                name,
                found: h.magic,
            });
        }
        if h.version != LAYOUT_VERSION {
            return Err(RegionError::Version {
                name,
                found: h.version,
            });
        }
        if h.fingerprint != FINGERPRINT {
            return Err(RegionError::Fingerprint {
                name,
                expected: FINGERPRINT,
                found: h.fingerprint,
            });
        }
        if h.state.load(Ordering::Acquire) == REGION_INIT {
            return Err(RegionError::NotReady { name });
        }
        let caps = h.caps;
        let (sections, total) = layout(&caps).map_err(|e| RegionError::Corrupt {
            name: name.clone(),
            what: e.to_string(),
        })?;
        if sections != h.sections || total != h.total_len || total > map.len() as u64 {
            return Err(RegionError::Corrupt {
                name,
                what: format!(
                    "section table does not match its capacities (total {} bytes, mapping {} bytes)",
                    h.total_len,
                    map.len()
                ),
            });
        }
        Ok(Self {
            map,
            caps,
            sections,
        })
    }

    pub fn name(&self) -> &str {
        self.map.name()
    }

    /// Bytes of the region.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Bytes of this process's mapping of the region on huge pages (see
    /// [`Mapping::huge_page_bytes`]).
    pub fn huge_page_bytes(&self) -> Option<u64> {
        self.map.huge_page_bytes()
    }

    pub fn caps(&self) -> &Capacities {
        &self.caps
    }

    pub fn is_writable(&self) -> bool {
        self.map.is_writable()
    }

    pub fn section(&self, s: Section) -> SectionRec {
        self.sections[s as usize]
    }

    /// Locks the region in memory (data path, best effort).
    pub fn lock_memory(&self) -> std::io::Result<()> {
        self.map.lock()
    }

    /// Pointer to `offset` bytes into a section, as `*mut T`, with `count`
    /// elements fitting inside the section.
    fn ptr<T>(&self, s: Section, offset: u64, count: usize) -> *mut T {
        let sec = self.sections[s as usize];
        let end = offset + (count * size_of::<T>()) as u64;
        assert!(end <= sec.len, "view out of section bounds");
        assert!((sec.offset + offset).is_multiple_of(core::mem::align_of::<T>() as u64));
        // SAFETY: offset + len is within the section, which is within the
        // mapping (checked against the mapping length at attach/create).
        unsafe { self.map.as_ptr().add((sec.offset + offset) as usize) as *mut T }
    }

    fn slice<T>(&self, s: Section, offset: u64, count: usize) -> &[T] {
        let p = self.ptr::<T>(s, offset, count);
        // SAFETY: in bounds and aligned (checked in `ptr`); every T stored in
        // the region is plain data or atomics, valid for any bit pattern the
        // protocol can leave, including all-zero.
        unsafe { core::slice::from_raw_parts(p, count) }
    }

    pub fn header(&self) -> &RegionHeader {
        // SAFETY: the header section starts at offset 0 and is header-sized.
        unsafe { &*self.ptr::<RegionHeader>(Section::Header, 0, 1) }
    }

    pub fn switch_slots(&self) -> &[SwitchSlot] {
        self.slice(Section::Switches, 0, self.caps.switches as usize)
    }

    pub fn backend_counters(&self) -> &[BackendCounters] {
        self.slice(Section::BackendCounters, 0, self.caps.backend_ids as usize)
    }

    /// The connection table, writable. Only a read-write mapping has one:
    /// panics on a read-only mapping (whose stores would fault), which
    /// reads the table through [`Region::conntrack_reader`].
    pub fn conntrack(&self) -> ConnTable<'_> {
        assert!(
            self.is_writable(),
            "{}: a read-only mapping has no writable connection table (use conntrack_reader)",
            self.name()
        );
        ConnTable::new(
            self.slice(Section::ConnTable, 0, self.caps.conn_slots as usize),
            self.header().hash_seed,
        )
    }

    /// The connection table, read-only (any mapping: tools).
    pub fn conntrack_reader(&self) -> ConnReader<'_> {
        ConnReader::new(
            self.slice(Section::ConnTable, 0, self.caps.conn_slots as usize),
            self.header().hash_seed,
        )
    }

    /// Milliseconds since the region was created, wrapping (connection time base).
    #[inline]
    pub fn now_ms(&self) -> u32 {
        ms_since(self.header().created_ns, crate::time::mono_ns())
    }

    pub fn ring(&self, switch: usize) -> Ring<'_> {
        let len = ring_len(&self.caps);
        let base = switch as u64 * len;
        assert!(switch < self.caps.switches as usize);
        Ring {
            // SAFETY: in bounds (`ptr` asserts); RingHeader is atomics only.
            header: unsafe { &*self.ptr::<RingHeader>(Section::Rings, base, 1) },
            slots: self.slice(
                Section::Rings,
                base + size_of::<RingHeader>() as u64,
                self.caps.ring_slots as usize,
            ),
        }
    }

    /// Message ring `which` (`msgring::RING_RECORDS`, ...) of switch `switch`.
    pub fn msg_ring(&self, switch: usize, which: usize) -> MsgRing<'_> {
        assert!(switch < self.caps.switches as usize && which < MSG_RINGS_PER_SWITCH);
        let base = (switch * MSG_RINGS_PER_SWITCH + which) as u64 * msgring::ring_bytes();
        MsgRing::new(
            // SAFETY: in bounds (`ptr` asserts); MsgRingHeader is atomics
            // and padding only, valid for any bits.
            unsafe { &*self.ptr::<MsgRingHeader>(Section::MsgRings, base, 1) },
            self.slice(
                Section::MsgRings,
                base + size_of::<MsgRingHeader>() as u64,
                (MSG_RING_BYTES / 8) as usize,
            ),
        )
    }

    fn config_section(ab: usize) -> Section {
        if ab & 1 == 0 {
            Section::ConfigA
        } else {
            Section::ConfigB
        }
    }

    fn routing_section(ab: usize) -> Section {
        if ab & 1 == 0 {
            Section::RoutingA
        } else {
            Section::RoutingB
        }
    }

    /// The header of configuration slot `ab` (0 = A, 1 = B) alone. Its
    /// plain fields are read under the rule of [`Region::config_view`]
    /// (crate-internal: outside, only the stamp is exposed, by
    /// [`Region::slot_stamp`]).
    #[inline]
    pub(crate) fn config_header(&self, ab: usize) -> &ConfigHeader {
        // SAFETY: in bounds (`ptr` asserts); see `slice`.
        unsafe { &*self.ptr::<ConfigHeader>(Self::config_section(ab), 0, 1) }
    }

    /// The header of routing slot `ab` alone (as [`Region::config_header`]).
    #[inline]
    pub(crate) fn routing_header(&self, ab: usize) -> &RoutingHeader {
        // SAFETY: in bounds (`ptr` asserts); see `slice`.
        unsafe { &*self.ptr::<RoutingHeader>(Self::routing_section(ab), 0, 1) }
    }

    /// Read view of configuration slot `ab` (0 = A, 1 = B), in place.
    ///
    /// # Safety
    /// The view reads the slot with plain loads: no write to the slot may
    /// overlap a read through the view (that would be a data race). The
    /// publisher writes a slot only after every RUNNING switch has
    /// acknowledged a generation that no longer uses it, or has been
    /// fenced (killed and gone; `publish.rs`). So the caller must be
    /// either
    /// - a switch that stores RUNNING before its first
    ///   [`Region::begin_read`], reads through the view only between
    ///   `begin_read` and [`Region::end_read`] of a token for this slot
    ///   with a non-zero stamp, and acknowledges with `end_read`; or
    /// - the only publisher of the region, on the same thread, reading
    ///   only between its publications (tests and fixtures).
    ///
    /// Holding a view of a slot while it is rewritten is allowed; reading
    /// through it then is not. Readers that acknowledge nothing (tools)
    /// take a private copy instead: [`Region::config_copy`].
    pub unsafe fn config_view(&self, ab: usize) -> ConfigView<'_> {
        let s = Self::config_section(ab);
        let base = self.ptr::<u8>(s, 0, self.sections[s as usize].len as usize);
        // SAFETY: `base` is the slot, in bounds and page aligned; reads
        // through the view follow the caller's contract above.
        unsafe { config_view_at(base, &self.caps) }
    }

    /// Read view of routing slot `ab`, in place.
    ///
    /// # Safety
    /// As for [`Region::config_view`] (tools: [`Region::routing_copy`]).
    pub unsafe fn routing_view(&self, ab: usize) -> RoutingView<'_> {
        let s = Self::routing_section(ab);
        let base = self.ptr::<u8>(s, 0, self.sections[s as usize].len as usize);
        // SAFETY: as in `config_view`.
        unsafe { routing_view_at(base, &self.caps) }
    }

    /// A private copy of the active configuration slot, consistent however
    /// the publisher runs meanwhile (a seqlock read: the slot's stamp is the
    /// same, and not 0, before and after the copy; retried a bounded number
    /// of times). For readers outside the acknowledgement protocol: tools.
    /// An unpublished slot, or one rewritten under every attempt, gives an
    /// empty copy (stamp 0, all zero).
    pub fn config_copy(&self) -> SlotCopy {
        self.copy_slot(Table::Config)
    }

    /// A private copy of the active routing slot (as [`Region::config_copy`]).
    pub fn routing_copy(&self) -> SlotCopy {
        self.copy_slot(Table::Routing)
    }

    fn copy_slot(&self, t: Table) -> SlotCopy {
        const TRIES: usize = 64;
        let sections = |ab| match (t, ab) {
            (Table::Config, 0) => Section::ConfigA,
            (Table::Config, _) => Section::ConfigB,
            (Table::Routing, 0) => Section::RoutingA,
            (Table::Routing, _) => Section::RoutingB,
        };
        let len = self.sections[sections(0) as usize].len as usize;
        let mut buf = vec![Line([0; 8]); len.div_ceil(64)];
        for _ in 0..TRIES {
            let tok = self.begin_read(t);
            if tok.stamp == 0 {
                break;
            }
            let words = self.slice::<AtomicU64>(sections(tok.slot), 0, len / 8);
            for (i, w) in words.iter().enumerate() {
                // Atomic loads: the publisher may be writing (the stamp
                // check below then discards the copy).
                buf[i / 8].0[i % 8] = w.load(Ordering::Relaxed);
            }
            fence(Ordering::Acquire);
            if self.slot_stamp(t, tok.slot).load(Ordering::Relaxed) == tok.stamp {
                return SlotCopy {
                    table: t,
                    slot: tok.slot,
                    stamp: tok.stamp,
                    caps: self.caps,
                    buf,
                };
            }
        }
        buf.fill(Line([0; 8]));
        SlotCopy {
            table: t,
            slot: 0,
            stamp: 0,
            caps: self.caps,
            buf,
        }
    }

    /// Write view of configuration slot `ab`.
    ///
    /// # Safety
    /// Only the region's single publisher may call this, only for the
    /// inactive slot that no live switch reads (see `publish.rs`), and must
    /// not hold two views of the same slot.
    pub(crate) unsafe fn config_slot_mut(&self, ab: usize) -> ConfigSlotMut<'_> {
        assert!(self.map.is_writable());
        let s = Self::config_section(ab);
        let l = config_layout(&self.caps);
        let ns = self.caps.services as usize;
        let nb = self.caps.backends as usize;
        let ni = self.caps.backend_ids as usize;
        let nx = index_len(self.caps.services);
        // SAFETY: the caller guarantees exclusive access to this slot; the
        // six arrays and the header are disjoint and in bounds (`ptr` asserts).
        unsafe {
            ConfigSlotMut {
                header: &mut *self.ptr::<ConfigHeader>(s, 0, 1),
                services: core::slice::from_raw_parts_mut(self.ptr(s, l.services, ns), ns),
                backends: core::slice::from_raw_parts_mut(self.ptr(s, l.backends, nb), nb),
                maglev: core::slice::from_raw_parts_mut(
                    self.ptr(s, l.maglev, ns * self.caps.maglev_m as usize),
                    ns * self.caps.maglev_m as usize,
                ),
                down_action: core::slice::from_raw_parts_mut(self.ptr(s, l.down_action, ni), ni),
                service_index: core::slice::from_raw_parts_mut(
                    self.ptr(s, l.service_index, nx),
                    nx,
                ),
                vip_index: core::slice::from_raw_parts_mut(self.ptr(s, l.vip_index, nx), nx),
            }
        }
    }

    /// Write view of routing slot `ab`.
    ///
    /// # Safety
    /// As for [`Region::config_slot_mut`].
    pub(crate) unsafe fn routing_slot_mut(&self, ab: usize) -> RoutingSlotMut<'_> {
        assert!(self.map.is_writable());
        let s = Self::routing_section(ab);
        let l = routing_layout(&self.caps);
        let nr = self.caps.routes as usize;
        let nn = self.caps.neighbours as usize;
        // SAFETY: as in `config_slot_mut`.
        unsafe {
            RoutingSlotMut {
                header: &mut *self.ptr::<RoutingHeader>(s, 0, 1),
                routes: core::slice::from_raw_parts_mut(self.ptr(s, l.routes, nr), nr),
                neighbours: core::slice::from_raw_parts_mut(self.ptr(s, l.neighbours, nn), nn),
            }
        }
    }

    /// Bytes of a published slot covered by its checksum (everything after
    /// the stamp and checksum words).
    pub(crate) fn slot_bytes(&self, s: Section) -> &[u8] {
        let sec = self.sections[s as usize];
        self.slice::<u8>(s, 16, (sec.len - 16) as usize)
    }

    /// Checksum of a slot as it is now (plain reads: the caller is the
    /// publisher, or meets the rule of [`Region::config_view`]).
    pub(crate) fn slot_checksum(&self, s: Section) -> u64 {
        checksum(self.slot_bytes(s))
    }
}

/// One cache line of a [`SlotCopy`] (64-byte aligned, as the slot's header).
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u64; 8]);

/// A private copy of a published slot (see [`Region::config_copy`]):
/// nothing else writes it, so its views are plain safe reads.
pub struct SlotCopy {
    table: Table,
    /// The slot it was copied from (0 = A, 1 = B).
    pub slot: usize,
    /// The slot's generation stamp (0: nothing consistent was published).
    pub stamp: u64,
    caps: Capacities,
    buf: Vec<Line>,
}

impl core::fmt::Debug for SlotCopy {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("SlotCopy")
            .field("table", &self.table)
            .field("slot", &self.slot)
            .field("stamp", &self.stamp)
            .finish()
    }
}

impl SlotCopy {
    fn bytes(&self) -> &[u8] {
        // SAFETY: `buf` is plain u64 words, any byte of which is a valid u8.
        unsafe { core::slice::from_raw_parts(self.buf.as_ptr().cast::<u8>(), self.buf.len() * 64) }
    }

    /// The copy as a configuration slot. Panics on a routing copy.
    pub fn config(&self) -> ConfigView<'_> {
        assert_eq!(self.table, Table::Config, "a routing slot copy");
        assert!(self.bytes().len() as u64 >= config_layout(&self.caps).len);
        // SAFETY: the buffer is 64-byte aligned, as long as a slot and
        // private to us: nothing writes it while the view borrows it.
        unsafe { config_view_at(self.bytes().as_ptr(), &self.caps) }
    }

    /// The copy as a routing slot. Panics on a configuration copy.
    pub fn routing(&self) -> RoutingView<'_> {
        assert_eq!(self.table, Table::Routing, "a configuration slot copy");
        assert!(self.bytes().len() as u64 >= routing_layout(&self.caps).len);
        // SAFETY: as in `config`.
        unsafe { routing_view_at(self.bytes().as_ptr(), &self.caps) }
    }

    /// Whether the copy's stored checksum matches its contents (an empty
    /// copy has none).
    pub fn checksum_ok(&self) -> bool {
        let len = match self.table {
            Table::Config => config_layout(&self.caps).len,
            Table::Routing => routing_layout(&self.caps).len,
        } as usize;
        let b = self.bytes();
        let stored = u64::from_le_bytes(b[8..16].try_into().expect("8 bytes"));
        self.stamp != 0 && stored == checksum(&b[16..len])
    }
}

/// A slice of `count` `T` at `off` bytes from `base`.
///
/// # Safety
/// `base + off .. + count * size_of::<T>()` lies inside one live
/// allocation or mapping, aligned for `T`, holding valid `T`s for `'a`.
unsafe fn slice_at<'a, T>(base: *const u8, off: u64, count: usize) -> &'a [T] {
    let p = base.wrapping_add(off as usize).cast::<T>();
    debug_assert!(p.is_aligned());
    // SAFETY: the caller's contract.
    unsafe { core::slice::from_raw_parts(p, count) }
}

/// The views of a configuration slot of capacities `c` starting at `base`.
///
/// # Safety
/// `base` is 64-byte aligned and starts `config_layout(c).len` readable
/// bytes that nothing writes while the view is read through.
unsafe fn config_view_at<'a>(base: *const u8, c: &Capacities) -> ConfigView<'a> {
    let l = config_layout(c);
    let ns = c.services as usize;
    let nx = index_len(c.services);
    // SAFETY: each array lies inside the slot (`config_layout`), aligned
    // (64-byte aligned offsets), of plain data valid for any bits.
    unsafe {
        ConfigView {
            header: &*base.cast::<ConfigHeader>(),
            services: slice_at(base, l.services, ns),
            backends: slice_at(base, l.backends, c.backends as usize),
            maglev: slice_at(base, l.maglev, ns * c.maglev_m as usize),
            down_action: slice_at(base, l.down_action, c.backend_ids as usize),
            service_index: slice_at(base, l.service_index, nx),
            vip_index: slice_at(base, l.vip_index, nx),
        }
    }
}

/// The views of a routing slot of capacities `c` starting at `base`.
///
/// # Safety
/// As for [`config_view_at`], with `routing_layout(c).len` bytes.
unsafe fn routing_view_at<'a>(base: *const u8, c: &Capacities) -> RoutingView<'a> {
    let l = routing_layout(c);
    // SAFETY: as in `config_view_at`.
    unsafe {
        RoutingView {
            header: &*base.cast::<RoutingHeader>(),
            routes: slice_at(base, l.routes, c.routes as usize),
            neighbours: slice_at(base, l.neighbours, c.neighbours as usize),
        }
    }
}

/// Milliseconds between a region epoch and a CLOCK_MONOTONIC reading, wrapping.
#[inline]
pub fn ms_since(epoch_ns: u64, now_ns: u64) -> u32 {
    (now_ns.saturating_sub(epoch_ns) / 1_000_000) as u32
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A region removed on drop.
    pub(crate) struct TempRegion(pub Region, pub String);

    impl Drop for TempRegion {
        fn drop(&mut self) {
            let _ = Mapping::unlink(&self.1);
        }
    }

    pub(crate) fn small_caps() -> Capacities {
        Capacities {
            services: 4,
            backends: 32,
            backend_ids: 64,
            conn_slots: 1 << 12,
            routes: 8,
            neighbours: 8,
            switches: 4,
            maglev_m: 251,
            ring_slots: 64,
            _pad: 0,
        }
    }

    pub(crate) fn temp(tag: &str) -> TempRegion {
        let inst = format!("t-{tag}-{}", std::process::id());
        let r = Region::create(&inst, small_caps()).unwrap();
        TempRegion(r, region_name(&inst))
    }

    #[test]
    fn create_then_attach_sees_same_layout() {
        let t = temp("attach");
        let inst = crate::names::get(&t.0.header().instance).to_string();
        let r = Region::attach(&inst, Access::ReadOnly).unwrap();
        assert_eq!(r.caps(), &small_caps());
        assert_eq!(r.header().hash_seed, t.0.header().hash_seed);
        assert_eq!(r.switch_slots().len(), 4);
        assert_eq!(r.conntrack_reader().capacity(), 4096);
        // Sections do not overlap and are page aligned.
        let mut end = 0;
        for s in r.header().sections {
            assert!(s.offset >= end && s.offset % PAGE == 0);
            end = s.offset + s.len;
        }
    }

    /// A read-only mapping reads the table but gives no writable one: its
    /// write methods are out of reach (their stores would fault).
    #[test]
    #[should_panic(expected = "a read-only mapping has no writable connection table")]
    fn a_read_only_mapping_has_no_writable_table() {
        let t = temp("rotable");
        let r = Region::attach_name(&t.1, Access::ReadOnly).unwrap();
        let reader = r.conntrack_reader();
        assert_eq!(reader.capacity(), 4096);
        assert_eq!(reader.holder(0), None);
        assert_eq!(reader.reading(0).packets, 0);
        let _ = r.conntrack();
    }

    #[test]
    fn mismatched_fingerprint_is_refused_naming_both() {
        let t = temp("fp");
        // SAFETY: test-only write of the fingerprint field of a region we own.
        unsafe { (t.0.map.as_ptr().add(16) as *mut u64).write(0x1234) };
        let e = Region::attach_name(&t.1, Access::ReadOnly).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("0x0000000000001234"), "{msg}");
        assert!(msg.contains(&format!("{FINGERPRINT:#018x}")), "{msg}");
    }

    #[test]
    fn bad_capacities_are_refused() {
        let mut c = small_caps();
        c.conn_slots = 1000;
        let e = layout(&c).unwrap_err().to_string();
        assert_eq!(
            e,
            "invalid capacities: conn_slots 1000 must be a power of two >= 64"
        );
    }

    /// Each switch's message ring is its own: a message pushed to one is
    /// seen there alone, and by another mapping of the region.
    #[test]
    fn message_rings_are_per_switch_and_shared_between_mappings() {
        let t = temp("msgring");
        let other = Region::attach_name(&t.1, Access::ReadWrite).unwrap();
        for sw in 0..4 {
            assert!(t.0.msg_ring(sw, 0).push(&[sw as u8; 13]));
        }
        let mut out = Vec::new();
        for sw in 0..4 {
            let r = other.msg_ring(sw, 0);
            assert!(r.pop(&mut out));
            assert_eq!(out, [sw as u8; 13]);
            assert!(r.is_empty());
        }
    }

    #[test]
    fn second_create_is_refused() {
        let t = temp("dup");
        let inst = crate::names::get(&t.0.header().instance).to_string();
        assert!(matches!(
            Region::create(&inst, small_caps()),
            Err(RegionError::Shm(ShmError::Exists { .. }))
        ));
    }
}
