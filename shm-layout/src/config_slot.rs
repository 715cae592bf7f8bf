//! The configuration slot: what controld publishes for the switches.
//!
//! A slot is written by the publisher only while no switch reads it (see
//! `publish.rs`); switches read it without locks for the length of a burst.
//! Records are plain `#[repr(C)]` data with explicit padding. Addresses are
//! IPv4 in host byte order (`u32::from(Ipv4Addr)`).

use core::mem::{align_of, offset_of, size_of};
use core::sync::atomic::AtomicU64;

use crate::fingerprint::Fingerprint;
use crate::fp_type;

/// Ports a configuration can describe.
pub const MAX_PORTS: usize = 16;
/// Switch names a configuration can describe (switch slots are sized by capacity).
pub const NAME_LEN: usize = 32;

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// Forwarding modes (`ServiceRec::mode`).
pub const MODE_NAT: u8 = 0;
pub const MODE_DR: u8 = 1;
pub const MODE_TUNNEL: u8 = 2;
/// Layer 7 (HTTP/1.x, handshake offload and splice). No switch handles it
/// yet: controld refuses to run a configuration with an l7 service, so no
/// published slot holds this value until the switch side exists.
pub const MODE_L7: u8 = 3;

/// Schedulers (`ServiceRec::scheduler`).
/// Weighted Maglev over the 5-tuple (the service's table).
pub const SCHED_MAGLEV: u8 = 0;
/// Smooth weighted round robin, state per switch.
pub const SCHED_WRR: u8 = 1;
/// Weighted least connections (the shared `BackendCounters::active`).
pub const SCHED_WLC: u8 = 2;
/// Source-address hash: the service's table indexed by the client address alone.
pub const SCHED_SH: u8 = 3;

/// What the data path does with an existing connection whose backend is
/// DOWN (`ServiceRec::on_down`, and the per-id `ConfigView::down_action`).
/// Keep: forward it to the backend as before.
pub const ON_DOWN_KEEP: u8 = 0;
/// Reschedule: move it where the protocol allows (a UDP flow, or a TCP
/// connection whose client is still sending its SYN) to the flow's current
/// choice; an established TCP connection is kept.
pub const ON_DOWN_RESCHEDULE: u8 = 1;
/// Reset: as reschedule, but an established TCP connection is answered
/// with a RST to the client, so it fails fast and reconnects.
pub const ON_DOWN_RESET: u8 = 2;

/// Slot header. `stamp` is the seqlock word of the slot: 0 while the
/// publisher writes, the slot's generation once complete.
#[repr(C, align(64))]
#[derive(Debug)]
pub struct ConfigHeader {
    pub stamp: AtomicU64,
    pub checksum: u64,
    pub n_services: u32,
    pub n_backends: u32,
    pub n_ports: u32,
    /// Maglev table size (prime) used by every service table in this slot.
    pub maglev_m: u32,
    pub tcp_syn_ms: u32,
    pub tcp_established_ms: u32,
    pub tcp_fin_ms: u32,
    pub udp_ms: u32,
    /// Outer source address of IP-in-IP packets (`[tunnel] source`; 0 = none).
    pub tunnel_src: u32,
    /// Idle timeout of a provisional connection entry (see
    /// `conntrack::STATE_PROVISIONAL`).
    pub tcp_provisional_ms: u32,
    pub ports: [PortRec; MAX_PORTS],
    /// `syn_proxy = "auto"`: a switch answers a service's SYNs with cookies
    /// while it sees more than this many SYNs per second to the service's
    /// VIPs (all services with `auto` together, per switch; 0: never by rate).
    pub syn_proxy_auto_syn_rate: u32,
    /// ... or while the connection table's occupancy, as the insert that
    /// found no room first sees it, is over this many per mille (0: never
    /// by occupancy). See `SynAuto` in switchd.
    pub syn_proxy_auto_occupancy_permille: u32,
    /// SYN cookie secrets (128-bit SipHash keys): `[current, previous]`;
    /// `[0, 0]` is none. controld makes them at start and rotates them.
    pub cookie_secrets: [[u64; 2]; 2],
    pub _pad_cookies: [u8; 32],
}

/// One NIC port as the configuration knows it. Its index in
/// `ConfigHeader::ports` is the port id used by routes and switches.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct PortRec {
    pub mac: [u8; 6],
    pub driver: u8,
    pub _pad: u8,
    /// Largest IPv4 packet the port may send (its interface MTU).
    pub mtu: u16,
    pub _pad1: [u8; 6],
    pub name: [u8; 16],
}

/// One service (VIP, port, protocol).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ServiceRec {
    pub vip: u32,
    pub port: u16,
    pub proto: u8,
    pub mode: u8,
    pub scheduler: u8,
    pub flags: u8,
    /// `ON_DOWN_*`: the policy for connections to a DOWN backend.
    pub on_down: u8,
    pub _pad: u8,
    /// This service's backends are `backends[backend_start..backend_start+backend_count]`.
    pub backend_start: u32,
    pub backend_count: u32,
    /// Lookup table entries are `maglev[table_start..table_start+table_len]`;
    /// each entry is an index relative to `backend_start`. `table_len == 0`
    /// means no backend is eligible.
    pub table_start: u32,
    pub table_len: u32,
    /// How long a new connection may wait in a switch's queue for a backend
    /// below its `max_conns` before it is refused (0: refused at once).
    pub queue_timeout_ms: u16,
    /// SYN to SYN-ACK samples above this count as slow (0: not judged).
    pub latency_target_ms: u16,
    pub name: [u8; NAME_LEN],
}

/// One backend of a service.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct BackendRec {
    /// Stable identity: index into the backend counters; never reused while
    /// a connection may reference it.
    pub id: u32,
    pub ip: u32,
    pub port: u16,
    pub flags: u16,
    pub weight: u32,
    pub service: u32,
    /// Effective connection limit over all switches (0: unlimited): the
    /// configured `max_conns`, lowered by controlled loading.
    pub max_conns: u32,
    /// The configured `max_conns` (0: unlimited), for inspection.
    pub max_conns_cfg: u32,
    pub _pad: u32,
    pub name: [u8; NAME_LEN],
}

/// `ServiceRec::flags`: `syn_proxy = true`: every SYN is answered with a
/// SYN cookie (NAT TCP services only).
pub const SVC_SYN_PROXY: u8 = 1;
/// `ServiceRec::flags`: `syn_proxy = "auto"`: SYNs are answered with a
/// cookie while the switch's SYN rate or the table's occupancy is over
/// the configured threshold.
pub const SVC_SYN_PROXY_AUTO: u8 = 2;

/// `BackendRec::flags`: weight 0 — no new connections.
pub const BACKEND_DRAINED: u16 = 1;
/// `BackendRec::flags`: failed its health checks — left out of its
/// service's table (no new connections); existing ones follow `on_down`.
pub const BACKEND_DOWN: u16 = 2;
/// `BackendRec::flags`: health checks are configured for it (without this
/// flag a backend is never DOWN).
pub const BACKEND_CHECKED: u16 = 4;

const _: () = {
    assert!(size_of::<PortRec>() == 32);
    assert!(size_of::<ServiceRec>() == 64);
    assert!(size_of::<BackendRec>() == 64);
    assert!(offset_of!(ConfigHeader, ports) == 56);
    assert!(size_of::<ConfigHeader>() == 640);
    assert!(offset_of!(ConfigHeader, cookie_secrets) == 576);
    assert!(align_of::<ConfigHeader>() == 64);
    assert!(offset_of!(ServiceRec, name) == 32);
    assert!(offset_of!(BackendRec, name) == 32);
    assert!(offset_of!(BackendRec, max_conns) == 20);
    assert!(offset_of!(ServiceRec, queue_timeout_ms) == 28);
    assert!(offset_of!(ServiceRec, on_down) == 10);
};

/// Arrays of a configuration slot after its header: services, backends,
/// Maglev tables, per-id down actions, the service index and the VIP index.
/// Mixed into the fingerprint, since the slot's layout
/// (`region::config_layout`) depends on it.
const CONFIG_ARRAYS: usize = 6;

/// Entries of each of a slot's two hash indexes (services by VIP, port and
/// protocol; VIPs): a power of two at least twice the service capacity, so
/// an index is at most half full and a probe sequence ends at an empty
/// entry within a few steps.
pub const fn index_len(services: u32) -> usize {
    let n = (services as usize * 2).next_power_of_two();
    if n < 16 { 16 } else { n }
}

/// Home entry of a service key in an index of `len` (a power of two) entries.
#[inline]
fn service_home(vip: u32, port: u16, proto: u8, len: usize) -> usize {
    let k = ((vip as u64) << 32) | ((port as u64) << 8) | proto as u64;
    (k.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32) as usize & (len - 1)
}

/// Home entry of a VIP in an index of `len` (a power of two) entries.
#[inline]
fn vip_home(vip: u32, len: usize) -> usize {
    ((vip as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32) as usize & (len - 1)
}

pub(crate) const fn fingerprint(fp: Fingerprint) -> Fingerprint {
    let fp = fp_type!(
        fp,
        ConfigHeader,
        stamp,
        checksum,
        n_services,
        n_backends,
        n_ports,
        maglev_m,
        tcp_syn_ms,
        tcp_established_ms,
        tcp_fin_ms,
        udp_ms,
        tunnel_src,
        tcp_provisional_ms,
        ports,
        syn_proxy_auto_syn_rate,
        syn_proxy_auto_occupancy_permille,
        cookie_secrets
    );
    let fp = fp_type!(fp, PortRec, mac, driver, mtu, name);
    let fp = fp_type!(
        fp,
        ServiceRec,
        vip,
        port,
        proto,
        mode,
        scheduler,
        flags,
        on_down,
        backend_start,
        backend_count,
        table_start,
        table_len,
        queue_timeout_ms,
        latency_target_ms,
        name
    );
    let fp = fp_type!(
        fp,
        BackendRec,
        id,
        ip,
        port,
        flags,
        weight,
        service,
        max_conns,
        max_conns_cfg,
        name
    );
    fp.mix(CONFIG_ARRAYS)
}

impl ConfigHeader {
    pub fn timeouts(&self) -> crate::conntrack::Timeouts {
        crate::conntrack::Timeouts {
            tcp_syn_ms: self.tcp_syn_ms,
            tcp_established_ms: self.tcp_established_ms,
            tcp_fin_ms: self.tcp_fin_ms,
            udp_ms: self.udp_ms,
            tcp_provisional_ms: self.tcp_provisional_ms,
        }
    }
}

/// A read view of one configuration slot.
#[derive(Clone, Copy, Debug)]
pub struct ConfigView<'a> {
    pub header: &'a ConfigHeader,
    pub services: &'a [ServiceRec],
    pub backends: &'a [BackendRec],
    /// The whole Maglev area of the slot; index with a service's table range.
    pub maglev: &'a [u16],
    /// Per backend id (capacity `backend_ids`): `ON_DOWN_KEEP` for a backend
    /// that is up (or whose service keeps connections to DOWN backends),
    /// else the `ON_DOWN_*` action for its existing connections. Ids are
    /// stable, so the data path can judge a connection with one byte load.
    pub down_action: &'a [u8],
    /// Services by (VIP, port, protocol): open addressing, linear probing;
    /// an entry is a service's index plus one, 0 is empty. Built by
    /// [`ConfigSlotMut::build_indexes`] at every publication.
    pub service_index: &'a [u16],
    /// The services' VIPs (each once; 0 is empty), for the per-packet
    /// "is this a VIP" question.
    pub vip_index: &'a [u32],
}

impl<'a> ConfigView<'a> {
    /// Whether `ip` is a service's VIP. Reads the VIP index (a few probes
    /// whatever the number of services); a view without one (or the
    /// address 0) is answered by scanning the services.
    #[inline]
    pub fn is_vip(&self, ip: u32) -> bool {
        let len = self.vip_index.len();
        if ip == 0 || !len.is_power_of_two() {
            return self.services().iter().any(|s| s.vip == ip);
        }
        let mut i = vip_home(ip, len);
        for _ in 0..len {
            match self.vip_index[i] {
                v if v == ip => return true,
                0 => return false,
                _ => i = (i + 1) & (len - 1),
            }
        }
        false
    }

    /// The first service listening on (VIP, port, protocol), with its index.
    /// An index entry is trusted only if the service it names matches, so a
    /// damaged index can hide a service but never substitute another.
    #[inline]
    pub fn find_service(&self, vip: u32, port: u16, proto: u8) -> Option<(usize, &'a ServiceRec)> {
        let services = self.services();
        let matches = |s: &ServiceRec| s.vip == vip && s.port == port && s.proto == proto;
        let len = self.service_index.len();
        if !len.is_power_of_two() {
            return services.iter().enumerate().find(|(_, s)| matches(s));
        }
        let mut i = service_home(vip, port, proto, len);
        for _ in 0..len {
            let e = self.service_index[i] as usize;
            if e == 0 {
                return None;
            }
            if let Some(s) = services.get(e - 1)
                && matches(s)
            {
                return Some((e - 1, s));
            }
            i = (i + 1) & (len - 1);
        }
        None
    }
    /// Services actually published (bounded by capacity even if the count lies).
    #[inline]
    pub fn services(&self) -> &'a [ServiceRec] {
        let n = (self.header.n_services as usize).min(self.services.len());
        &self.services[..n]
    }

    #[inline]
    pub fn backends(&self) -> &'a [BackendRec] {
        let n = (self.header.n_backends as usize).min(self.backends.len());
        &self.backends[..n]
    }

    #[inline]
    pub fn ports(&self) -> &'a [PortRec] {
        let n = (self.header.n_ports as usize).min(MAX_PORTS);
        &self.header.ports[..n]
    }

    /// The backends of a service, empty if its range is out of bounds.
    #[inline]
    pub fn service_backends(&self, s: &ServiceRec) -> &'a [BackendRec] {
        let start = s.backend_start as usize;
        let end = start.saturating_add(s.backend_count as usize);
        self.backends().get(start..end).unwrap_or(&[])
    }

    /// The `ON_DOWN_*` action for connections to backend `id`
    /// (`ON_DOWN_KEEP` for an unknown id).
    #[inline]
    pub fn down_action(&self, id: u32) -> u8 {
        self.down_action
            .get(id as usize)
            .copied()
            .unwrap_or(ON_DOWN_KEEP)
    }

    /// The Maglev table of a service, empty if none or out of bounds.
    #[inline]
    pub fn service_table(&self, s: &ServiceRec) -> &'a [u16] {
        let start = s.table_start as usize;
        let end = start.saturating_add(s.table_len as usize);
        self.maglev.get(start..end).unwrap_or(&[])
    }
}

/// A write view of one configuration slot (publisher only).
#[derive(Debug)]
pub struct ConfigSlotMut<'a> {
    pub header: &'a mut ConfigHeader,
    pub services: &'a mut [ServiceRec],
    pub backends: &'a mut [BackendRec],
    pub maglev: &'a mut [u16],
    pub down_action: &'a mut [u8],
    pub service_index: &'a mut [u16],
    pub vip_index: &'a mut [u32],
}

impl ConfigSlotMut<'_> {
    /// Rebuilds the service and VIP indexes from the slot's published
    /// services (`header.n_services` of them). The first service of a
    /// (VIP, port, protocol) wins, as a scan in list order would find.
    pub fn build_indexes(&mut self) {
        let n = (self.header.n_services as usize).min(self.services.len());
        self.service_index.fill(0);
        self.vip_index.fill(0);
        let (slen, vlen) = (self.service_index.len(), self.vip_index.len());
        for (idx, s) in self.services[..n].iter().enumerate() {
            // At most half full (`index_len`): every probe ends.
            if slen.is_power_of_two() {
                let mut i = service_home(s.vip, s.port, s.proto, slen);
                loop {
                    let e = self.service_index[i] as usize;
                    if e == 0 {
                        self.service_index[i] = idx as u16 + 1;
                        break;
                    }
                    let o = &self.services[e - 1];
                    if (o.vip, o.port, o.proto) == (s.vip, s.port, s.proto) {
                        break;
                    }
                    i = (i + 1) & (slen - 1);
                }
            }
            if s.vip != 0 && vlen.is_power_of_two() {
                let mut i = vip_home(s.vip, vlen);
                while self.vip_index[i] != 0 && self.vip_index[i] != s.vip {
                    i = (i + 1) & (vlen - 1);
                }
                self.vip_index[i] = s.vip;
            }
        }
    }
}

#[cfg(test)]
mod view_tests;
