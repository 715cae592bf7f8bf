//! vnic: a virtual NIC in a POSIX shared-memory object.
//!
//! One object per switch: per port an RX ring and a TX ring of descriptors,
//! and one frame pool shared by all the switch's ports. The *host* side is
//! the switch; the *wire* side (lbgen, tests) plays the network.
//!
//! A descriptor is `{buf, meta}`; bit 31 of `meta` is OWN_NIC (1: the wire
//! owns it, 0: the host owns it), the low 16 bits a length. Both sides walk
//! each ring in order. Whoever owns a descriptor writes `buf`, the frame
//! bytes and the length, then Release-stores `meta` to hand it over; the
//! other side Acquire-loads `meta` before touching anything else.
//!
//! - RX (wire -> host): the host posts empty buffers (OWN_NIC). The wire, at
//!   its `wire_next`, fills the buffer, stores `meta = len` (host-owned) and
//!   advances `wire_next`. The host takes a filled descriptor's buffer,
//!   immediately re-posts a fresh buffer from its free list and advances.
//! - TX (host -> wire): the host writes `buf`, then `meta = OWN_NIC | len`.
//!   The wire reads the frame and stores `meta = len` (completed). The host
//!   takes a completed buffer back when it reuses the descriptor, or
//!   reclaims all of them (sets `buf = NONE`) when its free list runs short.
//!
//! Invariant: each buffer is at any instant referenced by exactly one
//! descriptor (RX: always; TX: while `buf != NONE`) or held privately by the
//! host. So a host killed at any instruction loses only buffers it held
//! privately, and a new host recovers the rest from the rings alone
//! ([`VnicHost::attach`]). The wire keeps its indices in shared memory and
//! nothing private, so it can be restarted too.

use core::mem::{offset_of, size_of};
use core::sync::atomic::{AtomicU32, Ordering};

use shm_layout::fingerprint::Fingerprint;
use shm_layout::shm::{Access, Mapping};
use shm_layout::time::pid_alive;
use shm_layout::{fp_type, names};

use crate::{Frame, NetdrvError, Nic};

pub const MAGIC: u64 = u64::from_le_bytes(*b"SYVNIC01");
pub const VERSION: u32 = 2;
pub const MAX_PORTS: usize = 8;
pub const FRAME_SIZE: usize = 2048;
/// Bytes from one buffer's start to the next: a frame plus one cache line.
/// At a power-of-two stride every frame's first line (the headers the
/// switch reads and rewrites) would fall into the same few sets of a
/// set-associative cache: the L1's always (its index is the address's low
/// 12 bits), the L2's too when the pool sits on huge pages. 33 lines apart,
/// consecutive buffers' first lines walk through every set.
pub const FRAME_STRIDE: usize = FRAME_SIZE + 64;
/// `Desc::buf` of a descriptor holding no buffer.
pub const NONE: u32 = u32::MAX;
const OWN_NIC: u32 = 1 << 31;
const LEN_MASK: u32 = 0xffff;

#[repr(C)]
#[derive(Debug)]
pub struct Desc {
    pub buf: AtomicU32,
    pub meta: AtomicU32,
}

/// Per-ring wire index, alone on its cache line (written only by the wire).
#[repr(C, align(64))]
#[derive(Debug)]
pub struct WireIndex {
    pub next: AtomicU32,
    pub _pad: [u8; 60],
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PortInfo {
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
    pub name: [u8; 16],
}

#[repr(C, align(64))]
#[derive(Debug)]
pub struct VnicHeader {
    pub magic: u64,
    pub version: u32,
    pub n_ports: u32,
    pub fingerprint: u64,
    pub ring_size: u32,
    pub n_frames: u32,
    pub frame_size: u32,
    pub _pad0: u32,
    pub rings_offset: u64,
    pub pool_offset: u64,
    pub ports: [PortInfo; MAX_PORTS],
    pub host_pid: AtomicU32,
    pub wire_pid: AtomicU32,
    pub _pad1: [u8; 56],
}

const _: () = {
    assert!(size_of::<Desc>() == 8);
    assert!(size_of::<WireIndex>() == 64);
    assert!(size_of::<PortInfo>() == 24);
    assert!(offset_of!(VnicHeader, host_pid) == 56 + 24 * MAX_PORTS);
    assert!(size_of::<VnicHeader>().is_multiple_of(64));
};

pub const FINGERPRINT: u64 = {
    let fp = Fingerprint::new()
        .mix(VERSION as usize)
        .mix(FRAME_SIZE)
        .mix(FRAME_STRIDE)
        .mix(MAX_PORTS);
    let fp = fp_type!(fp, Desc, buf, meta);
    let fp = fp_type!(fp, WireIndex, next);
    let fp = fp_type!(fp, PortInfo, mac, name);
    fp_type!(
        fp,
        VnicHeader,
        magic,
        version,
        n_ports,
        fingerprint,
        ring_size,
        n_frames,
        frame_size,
        rings_offset,
        pool_offset,
        ports,
        host_pid,
        wire_pid
    )
    .value()
};

/// A port of a vnic being created.
#[derive(Clone, Debug)]
pub struct PortSpec {
    pub name: String,
    pub mac: [u8; 6],
}

/// Bytes of one ring: its wire index then its descriptors.
fn ring_bytes(ring_size: u32) -> usize {
    size_of::<WireIndex>() + ring_size as usize * size_of::<Desc>()
}

/// Layout: header | per port (RX ring, TX ring) | pool (page aligned).
fn layout(n_ports: usize, ring_size: u32, n_frames: u32) -> (usize, usize, usize) {
    let rings = size_of::<VnicHeader>();
    let pool = (rings + 2 * n_ports * ring_bytes(ring_size)).div_ceil(4096) * 4096;
    let total = pool + n_frames as usize * FRAME_STRIDE;
    (rings, pool, total)
}

/// Creates a vnic. `n_frames` must cover every descriptor plus host slack.
pub fn create(
    name: &str,
    ports: &[PortSpec],
    ring_size: u32,
    n_frames: u32,
) -> Result<(), NetdrvError> {
    let invalid = |what: String| NetdrvError::Invalid {
        name: name.to_string(),
        what,
    };
    if ports.is_empty() || ports.len() > MAX_PORTS {
        return Err(invalid(format!(
            "{} ports; a vnic has 1..={MAX_PORTS}",
            ports.len()
        )));
    }
    if !ring_size.is_power_of_two() || !(64..=32768).contains(&ring_size) {
        return Err(invalid(format!(
            "ring size {ring_size} must be a power of two in 64..=32768"
        )));
    }
    let need = ports.len() as u32 * 2 * ring_size + 256;
    if n_frames < need {
        return Err(invalid(format!(
            "{n_frames} frames are too few for {} ports with {ring_size}-descriptor rings (need at least {need})",
            ports.len()
        )));
    }
    let (rings, pool, total) = layout(ports.len(), ring_size, n_frames);
    let map = Mapping::create(name, total)?;
    // SAFETY: a fresh, zero-filled, page-aligned mapping of `total` bytes that
    // nobody else uses until the header's magic is written (last).
    let h = unsafe { &mut *(map.as_ptr() as *mut VnicHeader) };
    h.version = VERSION;
    h.n_ports = ports.len() as u32;
    h.fingerprint = FINGERPRINT;
    h.ring_size = ring_size;
    h.n_frames = n_frames;
    h.frame_size = FRAME_SIZE as u32;
    h.rings_offset = rings as u64;
    h.pool_offset = pool as u64;
    for (i, p) in ports.iter().enumerate() {
        h.ports[i].mac = p.mac;
        names::set(&mut h.ports[i].name, &p.name);
    }
    let dev = Device { map, rings, pool };
    for port in 0..ports.len() {
        for tx in [false, true] {
            for d in dev.ring(port, tx).descs {
                d.buf.store(NONE, Ordering::Relaxed);
                d.meta.store(0, Ordering::Relaxed);
            }
        }
    }
    core::sync::atomic::fence(Ordering::Release);
    // SAFETY: as above; the magic is written last so a concurrent attacher
    // sees either no magic or a complete header.
    unsafe { core::ptr::write_volatile(&mut h.magic, MAGIC) };
    Ok(())
}

/// Removes a vnic's name (mappings stay valid until dropped).
pub fn unlink(name: &str) -> Result<(), NetdrvError> {
    Ok(Mapping::unlink(name)?)
}

/// One ring's view.
#[derive(Clone, Copy, Debug)]
struct Ring<'a> {
    wire: &'a WireIndex,
    descs: &'a [Desc],
}

/// A mapped vnic object (common to both sides).
#[derive(Debug)]
struct Device {
    map: Mapping,
    rings: usize,
    pool: usize,
}

impl Device {
    fn open(name: &str) -> Result<Self, NetdrvError> {
        let map = Mapping::open(name, Access::ReadWrite, size_of::<VnicHeader>())?;
        // SAFETY: at least header-sized and page aligned.
        let h = unsafe { &*(map.as_ptr() as *const VnicHeader) };
        if h.magic != MAGIC {
            return Err(NetdrvError::BadMagic {
                name: name.into(),
                found: h.magic,
            });
        }
        if h.fingerprint != FINGERPRINT || h.version != VERSION {
            return Err(NetdrvError::Fingerprint {
                name: name.into(),
                expected: FINGERPRINT,
                found: h.fingerprint,
            });
        }
        let (rings, pool, total) = layout(h.n_ports as usize, h.ring_size, h.n_frames);
        let ok = h.n_ports as usize <= MAX_PORTS
            && h.ring_size.is_power_of_two()
            && h.frame_size as usize == FRAME_SIZE
            && rings as u64 == h.rings_offset
            && pool as u64 == h.pool_offset
            && total <= map.len();
        if !ok {
            return Err(NetdrvError::Invalid {
                name: name.into(),
                what: "corrupt header".into(),
            });
        }
        Ok(Self { map, rings, pool })
    }

    fn header(&self) -> &VnicHeader {
        // SAFETY: validated in `open`/`create`.
        unsafe { &*(self.map.as_ptr() as *const VnicHeader) }
    }

    fn ring(&self, port: usize, tx: bool) -> Ring<'_> {
        let h = self.header();
        assert!(port < h.n_ports as usize);
        let off = self.rings + (2 * port + tx as usize) * ring_bytes(h.ring_size);
        // SAFETY: the ring lies inside the mapping (layout checked at open);
        // WireIndex and Desc are atomics, valid for any bit pattern.
        unsafe {
            let base = self.map.as_ptr().add(off);
            Ring {
                wire: &*(base as *const WireIndex),
                descs: core::slice::from_raw_parts(
                    base.add(size_of::<WireIndex>()) as *const Desc,
                    h.ring_size as usize,
                ),
            }
        }
    }

    /// Raw pointer to buffer `b` (checked in range).
    fn buf_ptr(&self, b: u32) -> *mut u8 {
        assert!(b < self.header().n_frames, "buffer index {b} out of range");
        // SAFETY: in range of the pool, which lies inside the mapping.
        unsafe { self.map.as_ptr().add(self.pool + b as usize * FRAME_STRIDE) }
    }

    fn claim(&self, word: &AtomicU32, side: &'static str, name: &str) -> Result<(), NetdrvError> {
        let me = std::process::id();
        loop {
            let cur = word.load(Ordering::Acquire);
            if cur != 0 && cur != me && pid_alive(cur) {
                return Err(NetdrvError::Busy {
                    name: name.into(),
                    side,
                    pid: cur,
                });
            }
            if word
                .compare_exchange(cur, me, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                return Ok(());
            }
        }
    }

    fn port_mac(&self, p: usize) -> [u8; 6] {
        self.header().ports[p].mac
    }

    fn port_name(&self, p: usize) -> &str {
        names::get(&self.header().ports[p].name)
    }
}

/// The host (switch) side of a vnic.
#[derive(Debug)]
pub struct VnicHost {
    dev: Device,
    free: Vec<u32>,
    rx_next: Vec<u32>,
    tx_next: Vec<u32>,
    tx_clean: Vec<u32>,
    mask: u32,
    /// Per port, the first descriptor of its RX and TX ring (each
    /// `mask + 1` long), and the pool's first byte: resolved once at
    /// attach so the per-frame paths read no header.
    rings: Vec<(*const Desc, *const Desc)>,
    pool: *mut u8,
    n_frames: u32,
}

// SAFETY: the raw pointers point into `dev.map`, which the host owns and
// which stays mapped at the same address for the host's whole life; the
// host is used by one thread at a time (`&mut self` on every data path).
unsafe impl Send for VnicHost {}

/// Completed TX buffers are taken back from the TX rings only when the free
/// list runs shorter than this (a receive burst needs one fresh buffer per
/// frame); otherwise [`Nic::tx`] takes each one back as it reuses its slot.
const RECLAIM_BELOW: usize = 256;

impl VnicHost {
    /// Attaches as the host, taking over from a dead previous host and
    /// recovering the rings (see the module docs).
    pub fn attach(name: &str) -> Result<Self, NetdrvError> {
        let dev = Device::open(name)?;
        dev.claim(&dev.header().host_pid, "host", name)?;
        let h = dev.header();
        let n_ports = h.n_ports as usize;
        let size = h.ring_size;
        let mask = size - 1;
        let mut used = vec![false; h.n_frames as usize];
        let mark = |b: u32, used: &mut Vec<bool>| -> bool {
            match used.get_mut(b as usize) {
                Some(u) if !*u => {
                    *u = true;
                    true
                }
                _ => false,
            }
        };
        let rings = (0..n_ports)
            .map(|p| {
                (
                    dev.ring(p, false).descs.as_ptr(),
                    dev.ring(p, true).descs.as_ptr(),
                )
            })
            .collect();
        let pool = dev.buf_ptr(0);
        let n_frames = h.n_frames;
        let mut host = Self {
            free: Vec::with_capacity(n_frames as usize),
            rx_next: vec![0; n_ports],
            tx_next: vec![0; n_ports],
            tx_clean: vec![0; n_ports],
            mask,
            rings,
            pool,
            n_frames,
            dev,
        };
        let mut unposted: Vec<(usize, u32)> = Vec::new();
        for p in 0..n_ports {
            // RX. Read the wire's index first: descriptors before it are
            // stable (only the host, i.e. us, could change them now).
            let rx = host.dev.ring(p, false);
            let w = rx.wire.next.load(Ordering::Acquire);
            // The received-not-processed run ends at w-1: walk back over it.
            let mut start = w;
            for k in 1..=size {
                let i = w.wrapping_sub(k) & mask;
                let d = &rx.descs[i as usize];
                let meta = d.meta.load(Ordering::Acquire);
                if meta & OWN_NIC != 0 || d.buf.load(Ordering::Relaxed) == NONE {
                    break;
                }
                start = w.wrapping_sub(k);
            }
            host.rx_next[p] = start;
            for (i, d) in rx.descs.iter().enumerate() {
                let b = d.buf.load(Ordering::Relaxed);
                if b == NONE || !mark(b, &mut used) {
                    // Never posted (fresh object), or a buffer referenced twice
                    // (impossible by the invariant; repaired defensively): post anew.
                    d.buf.store(NONE, Ordering::Relaxed);
                    unposted.push((p, i as u32));
                }
            }
            // TX: the wire's in-flight run starts at its index.
            let tx = host.dev.ring(p, true);
            let w = tx.wire.next.load(Ordering::Acquire);
            let mut end = w;
            for k in 0..size {
                let d = &tx.descs[(w.wrapping_add(k) & mask) as usize];
                if d.meta.load(Ordering::Acquire) & OWN_NIC == 0 {
                    break;
                }
                end = w.wrapping_add(k + 1);
            }
            host.tx_next[p] = end;
            host.tx_clean[p] = w;
            for d in tx.descs {
                let meta = d.meta.load(Ordering::Acquire);
                let b = d.buf.load(Ordering::Relaxed);
                if meta & OWN_NIC != 0 {
                    // In flight: the wire may be reading it.
                    mark(b, &mut used);
                } else if b != NONE {
                    // Completed, or half-written by the dead host: the wire
                    // will never read it. Reclaim.
                    d.buf.store(NONE, Ordering::Relaxed);
                }
            }
        }
        // Room for every buffer, so the data path never grows it.
        host.free = Vec::with_capacity(used.len());
        host.free
            .extend((0..used.len() as u32).rev().filter(|&b| !used[b as usize]));
        for (p, i) in unposted {
            let Some(b) = host.free.pop() else { break };
            let d = &host.dev.ring(p, false).descs[i as usize];
            d.buf.store(b, Ordering::Relaxed);
            d.meta.store(OWN_NIC, Ordering::Release);
        }
        Ok(host)
    }

    /// Checks the buffer invariant: every buffer referenced once (by a
    /// descriptor or the free list), none lost. For tests and diagnostics;
    /// only meaningful while no frame is in flight inside the host.
    pub fn audit(&self) -> Result<(), String> {
        let h = self.dev.header();
        let mut seen = vec![0u8; h.n_frames as usize];
        let mut note = |b: u32, what: &str| -> Result<(), String> {
            let s = seen
                .get_mut(b as usize)
                .ok_or(format!("{what}: buffer {b} out of range"))?;
            *s += 1;
            if *s > 1 {
                return Err(format!("{what}: buffer {b} referenced twice"));
            }
            Ok(())
        };
        for p in 0..h.n_ports as usize {
            for d in self.dev.ring(p, false).descs {
                let b = d.buf.load(Ordering::Relaxed);
                if b != NONE {
                    note(b, "rx")?;
                }
            }
            for d in self.dev.ring(p, true).descs {
                let b = d.buf.load(Ordering::Relaxed);
                if b != NONE {
                    note(b, "tx")?;
                }
            }
        }
        for &b in &self.free {
            note(b, "free list")?;
        }
        let lost = seen.iter().filter(|&&s| s == 0).count();
        if lost > 0 {
            return Err(format!("{lost} buffers referenced nowhere"));
        }
        Ok(())
    }

    pub fn free_buffers(&self) -> usize {
        self.free.len()
    }

    /// Takes back every completed TX buffer now ([`Nic::reclaim`] does it
    /// only when the free list runs short).
    pub fn reclaim_all(&mut self) {
        for port in 0..self.rings.len() {
            while self.tx_clean[port] != self.tx_next[port] {
                // SAFETY: the host's TX ring of `port` (see `desc_at`).
                let d = unsafe { desc_at(self.rings[port].1, self.mask, self.tx_clean[port]) };
                if d.meta.load(Ordering::Acquire) & OWN_NIC != 0 {
                    break;
                }
                let b = d.buf.load(Ordering::Relaxed);
                if b != NONE {
                    d.buf.store(NONE, Ordering::Relaxed);
                    self.free.push(b);
                }
                self.tx_clean[port] = self.tx_clean[port].wrapping_add(1);
            }
        }
    }
}

/// Descriptor `i` (taken modulo the ring size) of the ring starting at
/// `ring`. A free function over the raw pointer, not a method: the
/// descriptor stores that follow would otherwise make the compiler reload
/// every field of the host per frame, and the host stays free to borrow.
///
/// # Safety
/// `ring` must start a ring of `mask + 1` descriptors inside a mapping that
/// outlives `'a` (the host's rings: see `VnicHost::attach`).
#[inline(always)]
unsafe fn desc_at<'a>(ring: *const Desc, mask: u32, i: u32) -> &'a Desc {
    // SAFETY: the index is masked into the ring (caller's contract).
    unsafe { &*ring.add((i & mask) as usize) }
}

impl Drop for VnicHost {
    fn drop(&mut self) {
        let _ = self.dev.header().host_pid.compare_exchange(
            std::process::id(),
            0,
            Ordering::AcqRel,
            Ordering::Relaxed,
        );
    }
}

impl Nic for VnicHost {
    fn port_count(&self) -> usize {
        self.dev.header().n_ports as usize
    }

    fn port_mac(&self, port: usize) -> [u8; 6] {
        self.dev.port_mac(port)
    }

    fn port_name(&self, port: usize) -> &str {
        self.dev.port_name(port)
    }

    fn frame_capacity(&self) -> usize {
        FRAME_SIZE
    }

    #[inline]
    fn rx_burst(&mut self, port: usize, out: &mut [Frame]) -> usize {
        // Locals, not fields (see `desc_at`).
        let ring = self.rings[port].0;
        let (mask, n_frames) = (self.mask, self.n_frames);
        let free = &mut self.free;
        let mut next = self.rx_next[port];
        let mut n = 0;
        while n < out.len() {
            // SAFETY: the host's RX ring of `port` (see `desc_at`).
            let d = unsafe { desc_at(ring, mask, next) };
            let meta = d.meta.load(Ordering::Acquire);
            if meta & OWN_NIC != 0 {
                break;
            }
            let b = d.buf.load(Ordering::Relaxed);
            // Only the host writes `buf` of an RX descriptor; an index out
            // of range (a corrupted object) stops the ring rather than
            // reaching outside the pool.
            if b >= n_frames {
                break;
            }
            let Some(fresh) = free.pop() else { break };
            out[n] = Frame {
                buf: b,
                len: (meta & LEN_MASK) as u16,
            };
            d.buf.store(fresh, Ordering::Relaxed);
            d.meta.store(OWN_NIC, Ordering::Release);
            next = next.wrapping_add(1);
            n += 1;
        }
        self.rx_next[port] = next;
        n
    }

    #[inline]
    fn buf_mut(&mut self, f: Frame) -> &mut [u8] {
        // Every handle the host holds came from `rx_burst` (checked there)
        // or its free list (built from the pool's range).
        debug_assert!(f.buf < self.n_frames);
        let b = f.buf.min(self.n_frames - 1) as usize;
        // SAFETY: `b` is a buffer of the pool inside the mapping. The host
        // owns it (it came from rx_burst or the free list and is in no
        // descriptor), so no other party touches it; the &mut borrow of self
        // prevents a second live slice from this side.
        unsafe { core::slice::from_raw_parts_mut(self.pool.add(b * FRAME_STRIDE), FRAME_SIZE) }
    }

    #[inline]
    fn tx(&mut self, port: usize, f: Frame) -> Result<(), Frame> {
        if self.tx_burst(port, &[f]) == 1 {
            Ok(())
        } else {
            Err(f)
        }
    }

    #[inline]
    fn tx_burst(&mut self, port: usize, frames: &[Frame]) -> usize {
        // Locals, not fields (see `desc_at`).
        let ring = self.rings[port].1;
        let mask = self.mask;
        let (mut next, mut clean) = (self.tx_next[port], self.tx_clean[port]);
        // Completed buffers taken back (at most one per frame) go into room
        // reserved up front, counted in a register: pushed one by one, the
        // free list's length was reloaded and stored around every
        // descriptor store.
        self.free.reserve(frames.len());
        let had = self.free.len();
        let room = &mut self.free.spare_capacity_mut()[..frames.len()];
        let mut back = 0;
        let mut n = 0;
        for f in frames {
            // SAFETY: the host's TX ring of `port` (see `desc_at`).
            let d = unsafe { desc_at(ring, mask, next) };
            if d.meta.load(Ordering::Acquire) & OWN_NIC != 0 {
                break;
            }
            let old = d.buf.load(Ordering::Relaxed);
            d.buf.store(f.buf, Ordering::Relaxed);
            d.meta.store(OWN_NIC | f.len as u32, Ordering::Release);
            if old != NONE {
                // Completed but not reclaimed yet: take it back now.
                room[back].write(old);
                back += 1;
            }
            // Slots clean..=next are now pending reclaim; keep that run
            // within one ring (the slot just reused was its oldest member).
            if next.wrapping_sub(clean) > mask {
                clean = clean.wrapping_add(1);
            }
            next = next.wrapping_add(1);
            n += 1;
        }
        // SAFETY: the `back` places after the first `had` were written in
        // the loop (`room` starts at `had`; at most one per frame, so
        // `back <= frames.len()`, the room reserved), and a u32 needs no drop.
        unsafe { self.free.set_len(had + back) };
        (self.tx_next[port], self.tx_clean[port]) = (next, clean);
        n
    }

    fn tx_copy(&mut self, port: usize, bytes: &[u8]) -> bool {
        if bytes.len() > FRAME_SIZE {
            return false;
        }
        let Some(buf) = self.free.pop() else {
            return false;
        };
        self.buf_mut(Frame { buf, len: 0 })[..bytes.len()].copy_from_slice(bytes);
        match self.tx(
            port,
            Frame {
                buf,
                len: bytes.len() as u16,
            },
        ) {
            Ok(()) => true,
            Err(f) => {
                self.free.push(f.buf);
                false
            }
        }
    }

    fn flush(&mut self, _port: usize) {}

    #[inline]
    fn free(&mut self, f: Frame) {
        self.free.push(f.buf);
    }

    fn reclaim(&mut self) {
        if self.free.len() >= RECLAIM_BELOW {
            return;
        }
        self.reclaim_all();
    }
}

/// The wire side of a vnic: what the network would do.
#[derive(Debug)]
pub struct VnicWire {
    dev: Device,
    mask: u32,
    pub injected: u64,
    pub ring_full: u64,
    pub collected: u64,
}

impl VnicWire {
    pub fn attach(name: &str) -> Result<Self, NetdrvError> {
        let dev = Device::open(name)?;
        dev.claim(&dev.header().wire_pid, "wire", name)?;
        let mask = dev.header().ring_size - 1;
        Ok(Self {
            dev,
            mask,
            injected: 0,
            ring_full: 0,
            collected: 0,
        })
    }

    pub fn port_count(&self) -> usize {
        self.dev.header().n_ports as usize
    }

    pub fn port_mac(&self, p: usize) -> [u8; 6] {
        self.dev.port_mac(p)
    }

    pub fn port_name(&self, p: usize) -> &str {
        self.dev.port_name(p)
    }

    /// Delivers a frame to the host's RX ring of `port`; false when the ring
    /// is full or the frame does not fit a buffer.
    #[inline]
    pub fn inject(&mut self, port: usize, frame: &[u8]) -> bool {
        self.inject_with(port, frame.len(), |b| {
            b[..frame.len()].copy_from_slice(frame)
        })
    }

    /// Like `inject`, filling the buffer in place.
    #[inline]
    pub fn inject_with(&mut self, port: usize, len: usize, fill: impl FnOnce(&mut [u8])) -> bool {
        if len > FRAME_SIZE || len > LEN_MASK as usize {
            return false;
        }
        let ring = self.dev.ring(port, false);
        let w = ring.wire.next.load(Ordering::Relaxed);
        let d = &ring.descs[(w & self.mask) as usize];
        let meta = d.meta.load(Ordering::Acquire);
        let b = d.buf.load(Ordering::Relaxed);
        if meta & OWN_NIC == 0 || b == NONE {
            self.ring_full += 1;
            return false;
        }
        let p = self.dev.buf_ptr(b);
        // SAFETY: the descriptor is NIC-owned, so its buffer is ours until we
        // hand it back with the Release store below.
        fill(unsafe { core::slice::from_raw_parts_mut(p, FRAME_SIZE) });
        d.meta.store(len as u32, Ordering::Release);
        ring.wire.next.store(w.wrapping_add(1), Ordering::Release);
        self.injected += 1;
        true
    }

    /// Takes up to `max` transmitted frames from `port`, in order.
    #[inline]
    pub fn collect(&mut self, port: usize, max: usize, mut f: impl FnMut(&[u8])) -> usize {
        let ring = self.dev.ring(port, true);
        let mut n = 0;
        while n < max {
            let w = ring.wire.next.load(Ordering::Relaxed);
            let d = &ring.descs[(w & self.mask) as usize];
            let meta = d.meta.load(Ordering::Acquire);
            if meta & OWN_NIC == 0 {
                break;
            }
            let b = d.buf.load(Ordering::Relaxed);
            let len = ((meta & LEN_MASK) as usize).min(FRAME_SIZE);
            if b != NONE && b < self.dev.header().n_frames {
                let p = self.dev.buf_ptr(b);
                // SAFETY: NIC-owned descriptor: the host does not touch the
                // buffer until we store the completion below.
                f(unsafe { core::slice::from_raw_parts(p, len) });
            }
            d.meta.store(len as u32, Ordering::Release);
            ring.wire.next.store(w.wrapping_add(1), Ordering::Release);
            n += 1;
        }
        self.collected += n as u64;
        n
    }
}

impl Drop for VnicWire {
    fn drop(&mut self) {
        let _ = self.dev.header().wire_pid.compare_exchange(
            std::process::id(),
            0,
            Ordering::AcqRel,
            Ordering::Relaxed,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Tmp(String);
    impl Drop for Tmp {
        fn drop(&mut self) {
            let _ = unlink(&self.0);
        }
    }

    fn make(tag: &str, ring: u32) -> Tmp {
        let name = format!("switchyard-test-vnic-{tag}-{}", std::process::id());
        let ports = [
            PortSpec {
                name: "a".into(),
                mac: [2, 0, 0, 0, 0, 1],
            },
            PortSpec {
                name: "b".into(),
                mac: [2, 0, 0, 0, 0, 2],
            },
        ];
        create(&name, &ports, ring, 2 * 2 * ring + 256).unwrap();
        Tmp(name)
    }

    fn frame(seq: u32) -> Vec<u8> {
        let mut f = vec![0u8; 60 + (seq % 7) as usize];
        f[..4].copy_from_slice(&seq.to_be_bytes());
        f
    }

    #[test]
    fn bad_parameters_are_refused_with_the_numbers() {
        let name = format!("switchyard-test-vnic-bad-{}", std::process::id());
        let p = [PortSpec {
            name: "a".into(),
            mac: [2; 6],
        }];
        let e = create(&name, &p, 100, 10_000).unwrap_err().to_string();
        assert!(e.contains("ring size 100"), "{e}");
        let e = create(&name, &p, 64, 100).unwrap_err().to_string();
        assert!(e.contains("100 frames") && e.contains("384"), "{e}");
        assert!(VnicHost::attach(&name).is_err());
    }

    #[test]
    fn round_trip_moves_handles_not_bytes_and_keeps_order() {
        let t = make("rt", 64);
        let mut wire = VnicWire::attach(&t.0).unwrap();
        let mut host = VnicHost::attach(&t.0).unwrap();
        assert_eq!(
            (host.port_name(1), host.port_mac(1)),
            ("b", [2, 0, 0, 0, 0, 2])
        );
        host.audit().unwrap();
        for s in 0..40 {
            assert!(wire.inject(0, &frame(s)));
        }
        let mut out = [Frame { buf: 0, len: 0 }; 64];
        let n = host.rx_burst(0, &mut out);
        assert_eq!(n, 40);
        for (i, f) in out[..n].iter().enumerate() {
            assert_eq!(&host.buf_mut(*f)[..4], &(i as u32).to_be_bytes());
            host.tx(1, *f).unwrap();
        }
        let mut got = Vec::new();
        assert_eq!(wire.collect(1, 100, |f| got.push(f.to_vec())), 40);
        for (i, g) in got.iter().enumerate() {
            assert_eq!(g, &frame(i as u32));
        }
        host.reclaim();
        host.audit().unwrap();
    }

    /// A host that never calls `reclaim` keeps forwarding far more frames
    /// than its pool holds: each TX slot's completed buffer comes back when
    /// the slot is reused, and no buffer is lost or referenced twice.
    #[test]
    fn transmit_alone_recycles_buffers_without_reclaim() {
        let t = make("lazy", 64);
        let mut wire = VnicWire::attach(&t.0).unwrap();
        let mut host = VnicHost::attach(&t.0).unwrap();
        let pool = 2 * 2 * 64 + 256;
        let mut out = [Frame { buf: 0, len: 0 }; 16];
        let mut moved = 0u32;
        for s in 0..(10 * pool as u32) {
            assert!(wire.inject(0, &frame(s)), "frame {s}: RX ring full");
            let k = host.rx_burst(0, &mut out);
            assert_eq!(k, 1, "frame {s}: nothing received");
            host.tx(1, out[0]).unwrap();
            let mut got = Vec::new();
            assert_eq!(wire.collect(1, 4, |f| got.push(f.to_vec())), 1);
            assert_eq!(got[0], frame(s));
            moved += 1;
        }
        assert_eq!(moved, 10 * pool as u32);
        host.audit().unwrap();
        host.reclaim_all();
        host.audit().unwrap();
        assert_eq!(
            host.free_buffers(),
            pool - 2 * 64,
            "all but the posted RX buffers"
        );
    }

    #[test]
    fn full_rings_push_back_instead_of_overwriting() {
        let t = make("full", 64);
        let mut wire = VnicWire::attach(&t.0).unwrap();
        let mut host = VnicHost::attach(&t.0).unwrap();
        let sent = (0..100).filter(|s| wire.inject(0, &frame(*s))).count();
        assert_eq!(sent, 64);
        assert_eq!(wire.ring_full, 36);
        let mut out = [Frame { buf: 0, len: 0 }; 64];
        assert_eq!(host.rx_burst(0, &mut out), 64);
        for f in &out {
            host.tx(1, *f).unwrap();
        }
        assert!(wire.inject(0, &frame(1000)));
        assert_eq!(host.rx_burst(0, &mut out[..1]), 1);
        assert_eq!(host.tx(1, out[0]), Err(out[0]), "TX ring full");
        host.free(out[0]);
        host.audit().unwrap();
    }

    #[test]
    fn a_burst_transmit_takes_what_fits_in_order() {
        let t = make("txburst", 64);
        let mut wire = VnicWire::attach(&t.0).unwrap();
        let mut host = VnicHost::attach(&t.0).unwrap();
        let mut out = [Frame { buf: 0, len: 0 }; 64];
        // 40 frames out, then a burst of 40 more into the 24 free slots.
        for round in 0..2u32 {
            for s in 0..40 {
                assert!(wire.inject(0, &frame(round * 40 + s)));
            }
            assert_eq!(host.rx_burst(0, &mut out[..40]), 40);
            let took = host.tx_burst(1, &out[..40]);
            assert_eq!(took, if round == 0 { 40 } else { 24 });
            for f in &out[took..40] {
                host.free(*f);
            }
        }
        let mut got = Vec::new();
        assert_eq!(wire.collect(1, 100, |f| got.push(f.to_vec())), 64);
        let want: Vec<_> = (0..64).map(frame).collect();
        assert_eq!(got, want, "the prefix that fitted, in order");
        host.audit().unwrap();
    }

    #[test]
    fn host_and_wire_threads_move_a_million_frames_in_order() {
        let t = make("threads", 256);
        let n = 1_000_000u32;
        let mut wire = VnicWire::attach(&t.0).unwrap();
        let mut host = VnicHost::attach(&t.0).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        std::thread::scope(|s| {
            s.spawn(move || {
                let mut out = [Frame { buf: 0, len: 0 }; 32];
                let mut moved = 0;
                while moved < n && std::time::Instant::now() < deadline {
                    let k = host.rx_burst(0, &mut out);
                    for f in &out[..k] {
                        while host.tx(1, *f).is_err() {
                            host.reclaim();
                        }
                    }
                    host.reclaim();
                    moved += k as u32;
                }
            });
            let (mut next_in, mut next_out) = (0u32, 0u32);
            while next_out < n {
                assert!(
                    std::time::Instant::now() < deadline,
                    "stalled at {next_out}"
                );
                while next_in < n
                    && next_in - next_out < 400
                    && wire.inject(0, &next_in.to_be_bytes())
                {
                    next_in += 1;
                }
                wire.collect(1, 64, |f| {
                    assert_eq!(f, &next_out.to_be_bytes(), "lost, duplicated or reordered");
                    next_out += 1;
                });
            }
        });
    }

    use std::time::Duration;

    /// A host that vanishes at arbitrary points (holding frames privately,
    /// mid-burst) is replaced; every buffer is accounted for and traffic
    /// keeps flowing.
    #[test]
    fn restarted_host_recovers_every_buffer() {
        let t = make("restart", 64);
        let mut wire = VnicWire::attach(&t.0).unwrap();
        let mut seed = 0x1234_5678u64;
        let mut rnd = move |m: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % m
        };
        let mut out = [Frame { buf: 0, len: 0 }; 32];
        let mut collected = 0u64;
        for round in 0..300 {
            let mut host = VnicHost::attach(&t.0).unwrap();
            host.audit()
                .unwrap_or_else(|e| panic!("round {round}: {e}"));
            for _ in 0..rnd(50) {
                wire.inject(rnd(2) as usize, &frame(round));
            }
            let k = host.rx_burst(rnd(2) as usize, &mut out[..rnd(32) as usize + 1]);
            let keep = rnd(k as u64 + 1) as usize;
            for f in &out[..keep] {
                if rnd(3) == 0 {
                    host.free(*f);
                } else {
                    let _ = host.tx(rnd(2) as usize, *f);
                }
            }
            if rnd(2) == 0 {
                host.reclaim();
            }
            collected += wire.collect(rnd(2) as usize, rnd(64) as usize, |_| {}) as u64;
            // Vanish without cleanup: frames out[keep..k] die with the host.
            std::mem::forget(host);
        }
        let mut host = VnicHost::attach(&t.0).unwrap();
        host.audit().unwrap();
        // Traffic still flows end to end after all that.
        let mut moved = 0;
        for _ in 0..200 {
            wire.inject(0, &frame(7));
            let k = host.rx_burst(0, &mut out);
            for f in &out[..k] {
                if host.tx(1, *f).is_err() {
                    host.free(*f);
                }
            }
            host.reclaim();
            moved += wire.collect(1, 64, |_| {});
        }
        assert!(moved >= 150, "only {moved} frames flowed after recovery");
        assert!(collected > 0);
    }
}
