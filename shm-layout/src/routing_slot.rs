//! The routing slot: routes (longest prefix match) and neighbours.
//!
//! Published with the same A/B protocol as the configuration, but with its
//! own generation, so a neighbour change does not rebuild Maglev tables.
//! Routes are stored longest prefix first, so the first match is the longest;
//! neighbours are sorted by address for binary search.

use core::mem::{offset_of, size_of};
use core::sync::atomic::AtomicU64;

use crate::fingerprint::Fingerprint;
use crate::fp_type;

#[repr(C, align(64))]
#[derive(Debug)]
pub struct RoutingHeader {
    /// Seqlock word of the slot: 0 while written, the generation when complete.
    pub stamp: AtomicU64,
    pub checksum: u64,
    pub n_routes: u32,
    pub n_neighbours: u32,
    pub _pad: [u8; 40],
}

/// A route: `prefix/len` leaves through port `port`, to `via` if non-zero,
/// else to the destination itself (directly connected).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RouteRec {
    pub prefix: u32,
    pub len: u8,
    pub _pad: [u8; 3],
    pub port: u32,
    pub via: u32,
}

/// A neighbour: the MAC of an on-link address, on a port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NeighbourRec {
    pub ip: u32,
    pub port: u32,
    pub mac: [u8; 6],
    pub state: u8,
    pub _pad: u8,
}

/// `NeighbourRec::state`: MAC known and usable.
pub const NEIGH_VALID: u8 = 1;

const _: () = {
    assert!(size_of::<RoutingHeader>() == 64);
    assert!(size_of::<RouteRec>() == 16);
    assert!(size_of::<NeighbourRec>() == 16);
    assert!(offset_of!(NeighbourRec, mac) == 8);
};

pub(crate) const fn fingerprint(fp: Fingerprint) -> Fingerprint {
    let fp = fp_type!(fp, RoutingHeader, stamp, checksum, n_routes, n_neighbours);
    let fp = fp_type!(fp, RouteRec, prefix, len, port, via);
    fp_type!(fp, NeighbourRec, ip, port, mac, state)
}

/// Network mask for a prefix length (0..=32; longer counts as 32).
/// Branch free: the shift happens in 64 bits, where 32 is a legal amount.
#[inline]
pub const fn mask(len: u8) -> u32 {
    let len = if len > 32 { 32 } else { len };
    (u64::MAX << (32 - len as u32)) as u32
}

/// A read view of one routing slot.
#[derive(Clone, Copy, Debug)]
pub struct RoutingView<'a> {
    pub header: &'a RoutingHeader,
    pub routes: &'a [RouteRec],
    pub neighbours: &'a [NeighbourRec],
}

/// Where a packet to some destination leaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NextHop {
    pub port: u32,
    pub mac: [u8; 6],
}

/// Why a destination has no next hop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoRoute {
    NoRoute,
    NoNeighbour,
}

impl<'a> RoutingView<'a> {
    #[inline]
    pub fn routes(&self) -> &'a [RouteRec] {
        let n = (self.header.n_routes as usize).min(self.routes.len());
        &self.routes[..n]
    }

    #[inline]
    pub fn neighbours(&self) -> &'a [NeighbourRec] {
        let n = (self.header.n_neighbours as usize).min(self.neighbours.len());
        &self.neighbours[..n]
    }

    /// Longest-prefix match (routes are stored longest first).
    #[inline]
    pub fn route(&self, dst: u32) -> Option<&'a RouteRec> {
        self.routes().iter().find(|r| dst & mask(r.len) == r.prefix)
    }

    #[inline]
    pub fn neighbour(&self, ip: u32) -> Option<&'a NeighbourRec> {
        let n = self.neighbours();
        n.binary_search_by_key(&ip, |r| r.ip)
            .ok()
            .map(|i| &n[i])
            .filter(|r| r.state == NEIGH_VALID)
    }

    /// Route lookup then neighbour resolution of the next hop.
    #[inline]
    pub fn next_hop(&self, dst: u32) -> Result<NextHop, NoRoute> {
        let r = self.route(dst).ok_or(NoRoute::NoRoute)?;
        let hop = if r.via != 0 { r.via } else { dst };
        let n = self.neighbour(hop).ok_or(NoRoute::NoNeighbour)?;
        Ok(NextHop {
            port: r.port,
            mac: n.mac,
        })
    }
}

/// A write view of one routing slot (publisher only).
#[derive(Debug)]
pub struct RoutingSlotMut<'a> {
    pub header: &'a mut RoutingHeader,
    pub routes: &'a mut [RouteRec],
    pub neighbours: &'a mut [NeighbourRec],
}

#[cfg(test)]
mod tests {
    use super::mask;

    #[test]
    fn masks_of_every_length() {
        assert_eq!(mask(0), 0);
        assert_eq!(mask(1), 0x8000_0000);
        assert_eq!(mask(24), 0xffff_ff00);
        assert_eq!(mask(31), 0xffff_fffe);
        assert_eq!(mask(32), u32::MAX);
        assert_eq!(mask(200), u32::MAX);
        for len in 0..=32u8 {
            assert_eq!(mask(len).count_ones(), len as u32);
            assert_eq!(mask(len).leading_ones(), len as u32);
        }
    }
}

#[cfg(test)]
mod lookup_tests;
