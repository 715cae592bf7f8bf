//! A small cache of next hops, valid for one routing slot.
//!
//! Route lookup (longest prefix) and neighbour resolution cost about a
//! hundred instructions per packet, while a burst usually goes to a handful
//! of destinations (a service's backends, a client-side gateway). The
//! engine keeps one cache across loop iterations and [`HopCache::sync`]s it
//! with the stamp of the routing slot each iteration reads: a publication
//! (a new stamp) empties it, and while the stamp stays the slot's answers
//! cannot change. Only found next hops are kept; a failed lookup is
//! retried (and counted) each time.

use shm_layout::routing_slot::{NextHop, NoRoute, RoutingView};

/// Entries, direct mapped by destination address.
const WAYS: usize = 8;

#[derive(Clone, Copy, Debug, Default)]
pub struct HopCache {
    dst: [u32; WAYS],
    port: [u32; WAYS],
    mac: [[u8; 6]; WAYS],
    valid: u8,
    /// The routing slot stamp the entries were looked up in.
    stamp: u64,
}

impl HopCache {
    /// Empties the cache if `stamp` is not the routing publication its
    /// entries came from.
    #[inline]
    pub fn sync(&mut self, stamp: u64) {
        if stamp != self.stamp {
            self.valid = 0;
            self.stamp = stamp;
        }
    }

    /// `rt.next_hop(dst)`, answered from the cache when it can be.
    #[inline(always)]
    pub fn next_hop(&mut self, rt: &RoutingView<'_>, dst: u32) -> Result<NextHop, NoRoute> {
        let i = (dst.wrapping_mul(0x9e37_79b1) >> 29) as usize;
        if self.valid & (1 << i) != 0 && self.dst[i] == dst {
            return Ok(NextHop {
                port: self.port[i],
                mac: self.mac[i],
            });
        }
        self.miss(rt, dst, i)
    }

    #[inline(never)]
    fn miss(&mut self, rt: &RoutingView<'_>, dst: u32, i: usize) -> Result<NextHop, NoRoute> {
        let h = rt.next_hop(dst)?;
        self.dst[i] = dst;
        self.port[i] = h.port;
        self.mac[i] = h.mac;
        self.valid |= 1 << i;
        Ok(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixture::Fixture;
    use shm_layout::Table;

    #[test]
    fn answers_as_the_routing_slot_does_whether_cached_or_not() {
        let fx = Fixture::new("unit-hops", 1 << 10);
        let r = &fx.region;
        let copy = r.routing_copy();
        let rt = copy.routing();
        let mut cache = HopCache::default();
        // Backends, clients behind the gateway, an unrouted address, and
        // enough distinct destinations to evict entries.
        let dsts: Vec<u32> = (0..3)
            .map(|i| 0xc613_0101 + i)
            .chain((1..40).map(|h| 0xc612_6400 + h))
            .chain([0x0a00_0001, 0xc613_01fe])
            .collect();
        for round in 0..3 {
            for &d in &dsts {
                assert_eq!(
                    cache.next_hop(&rt, d),
                    rt.next_hop(d),
                    "{d:#x} round {round}"
                );
            }
        }
    }

    /// A routing publication (a new stamp) empties the cache: an answer
    /// cached from the old slot is never given for the new one.
    #[test]
    fn a_new_routing_stamp_forgets_cached_next_hops() {
        let fx = Fixture::new("unit-hops-stamp", 1 << 10);
        let r = &fx.region;
        let backend = 0xc613_0101;
        let mut cache = HopCache::default();
        let tok = r.begin_read(Table::Routing);
        cache.sync(tok.stamp);
        let copy = r.routing_copy();
        assert_eq!(copy.slot, tok.slot);
        let cur = copy.routing();
        let old = cache.next_hop(&cur, backend).unwrap();
        assert_eq!(old.mac, [2, 0, 0, 0, 1, 1]);
        // The same table, but the backend's neighbour has another MAC.
        let fence = &mut shm_layout::publish::cannot_fence;
        r.publish_routing(std::time::Duration::from_millis(10), fence, |s| {
            s.header.n_routes = cur.header.n_routes;
            s.header.n_neighbours = cur.header.n_neighbours;
            s.routes.copy_from_slice(cur.routes);
            s.neighbours.copy_from_slice(cur.neighbours);
            let n = s.neighbours.iter_mut().find(|n| n.ip == backend).unwrap();
            n.mac = [2, 0, 0, 0, 9, 9];
        })
        .unwrap();
        let tok2 = r.begin_read(Table::Routing);
        assert_ne!(tok2.stamp, tok.stamp);
        let copy2 = r.routing_copy();
        assert_eq!(copy2.slot, tok2.slot);
        let rt2 = copy2.routing();
        // Without a sync the cache still answers from the old slot...
        assert_eq!(cache.next_hop(&rt2, backend).unwrap().mac, old.mac);
        // ...which is why the engine syncs it with every loop's stamp.
        cache.sync(tok2.stamp);
        assert_eq!(cache.next_hop(&rt2, backend), rt2.next_hop(backend));
        assert_eq!(
            cache.next_hop(&rt2, backend).unwrap().mac,
            [2, 0, 0, 0, 9, 9]
        );
    }
}
