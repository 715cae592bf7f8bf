//! First contact: the client-side next hop of a NAT reply when the routing
//! table has no neighbour for the client yet.
//!
//! The appliance's kernel learns a client's MAC only when it talks to the
//! client itself (an ARP request the client sends for one of the kernel's
//! own addresses, a resolution it was asked for), and the routing mirror
//! publishes it some time later. Until then a backend's SYN-ACK to a new
//! client found no neighbour and was dropped (`drop_no_neighbour`), costing
//! the client a SYN retransmission (a second), and a client on the same
//! subnet as the VIP, which the kernel never talks to, was never resolved
//! at all. So the frame that creates a NAT connection leaves its source MAC
//! and in-port in the entry ([`ClientHop`], kept in the reply slot), and the
//! reply path falls back to it, as a router's neighbour table learns from
//! the traffic it sees, but only where that is sound:
//!
//! - only when the routing table has no valid neighbour for the client's
//!   next hop (a published neighbour always wins);
//! - only for a client that is directly connected (an on-link route: the
//!   frame's source MAC is the client's own). Behind a gateway the
//!   gateway's neighbour entry is what counts, and its absence stays a
//!   `drop_no_neighbour`;
//! - only on the port the frame came in on, the route's port;
//! - never a broadcast, multicast or zero MAC ([`ClientHop::new`] refuses
//!   them, and the L2 checks drop such frames before they get here).

use shm_layout::conntrack::ClientHop;
use shm_layout::routing_slot::{NextHop, RoutingView};

/// The next hop toward `client` by the hop its connection learned, if the
/// route to `client` is on-link and leaves through the port the hop was
/// learned on.
#[cold]
#[inline(never)]
pub(super) fn learned(rt: &RoutingView<'_>, client: u32, hop: ClientHop) -> Option<NextHop> {
    let mac = hop.mac()?;
    let r = rt.route(client)?;
    (r.via == 0 && r.port == hop.port()).then_some(NextHop { port: r.port, mac })
}

/// The hop a new connection learns from the frame that creates it
/// (received on `in_port`).
#[inline]
pub(super) fn of_frame(frame: &[u8], in_port: u32) -> ClientHop {
    match frame.get(6..12) {
        Some(&[a, b, c, d, e, f]) => ClientHop::new([a, b, c, d, e, f], in_port),
        _ => ClientHop::NONE,
    }
}

#[cfg(test)]
mod tests {
    use etherparse::PacketBuilder;
    use shm_layout::switch_slot::{Counter, N_COUNTERS};

    use crate::filter::{Verdict, process};
    use crate::fixture::{CLIENT_GW_MAC, Fixture, VIP, port_mac};

    const CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 3, 2];

    /// A TCP segment from `src`:`sport` (`src_mac`) to `dst`:`dport`.
    fn seg(
        src_mac: [u8; 6],
        dst_mac: [u8; 6],
        src: [u8; 4],
        dst: [u8; 4],
        ports: (u16, u16),
        syn_ack: (bool, bool),
    ) -> Vec<u8> {
        let mut b = PacketBuilder::ethernet2(src_mac, dst_mac)
            .ipv4(src, dst, 64)
            .tcp(ports.0, ports.1, 1, 1000);
        b = match syn_ack {
            (true, false) => b.syn(),
            (true, true) => b.syn().ack(2),
            _ => b.ack(2),
        };
        let mut v = Vec::new();
        b.write(&mut v, &[]).unwrap();
        v
    }

    /// Runs `frame` through the filter on `port`; the verdict and the bytes.
    fn run(fx: &Fixture, c: &mut [u64; N_COUNTERS], port: u32, frame: &[u8]) -> (Verdict, Vec<u8>) {
        let mut ctx = fx.ctx(c);
        let mut buf = vec![0u8; 2048];
        buf[..frame.len()].copy_from_slice(frame);
        let v = process(&mut buf, frame.len(), port, &port_mac, &mut ctx);
        (v, buf)
    }

    /// A client SYN to the VIP, then its backend's SYN-ACK: returns the
    /// SYN-ACK's verdict and bytes.
    fn syn_then_syn_ack(
        fx: &Fixture,
        c: &mut [u64; N_COUNTERS],
        client: [u8; 4],
        client_mac: [u8; 6],
        cport: u16,
    ) -> (Verdict, Vec<u8>) {
        let port0 = port_mac(0).unwrap();
        let (v, buf) = run(
            fx,
            c,
            0,
            &seg(
                client_mac,
                port0,
                client,
                VIP.to_be_bytes(),
                (cport, 80),
                (true, false),
            ),
        );
        let Verdict::Tx { port: 1, .. } = v else {
            panic!("SYN: {v:?}")
        };
        let backend: [u8; 4] = buf[30..34].try_into().unwrap();
        let bmac = [2, 0, 0, 0, 1, backend[3]];
        run(
            fx,
            c,
            1,
            &seg(
                bmac,
                port_mac(1).unwrap(),
                backend,
                client,
                (8080, cport),
                (true, true),
            ),
        )
    }

    /// An on-link client the routing table has no neighbour for: the
    /// backend's SYN-ACK goes to the MAC its SYN came from, out of the
    /// port it came in on (it was dropped as `drop_no_neighbour`).
    #[test]
    fn a_reply_to_an_unresolved_on_link_client_goes_to_the_mac_its_syn_came_from() {
        let fx = Fixture::new("unit-firstcontact", 1 << 12);
        fx.with_onlink_clients();
        let mut c = [0u64; N_COUNTERS];
        let (v, buf) = syn_then_syn_ack(&fx, &mut c, [198, 18, 1, 2], CLIENT_MAC, 40_000);
        assert_eq!(c[Counter::DropNoNeighbour as usize], 0);
        let Verdict::Tx { port: 0, len } = v else {
            panic!("SYN-ACK: {v:?}")
        };
        assert_eq!(&buf[..6], &CLIENT_MAC, "to the client's MAC");
        assert_eq!(&buf[6..12], &port_mac(0).unwrap(), "from port 0's");
        assert_eq!(&buf[26..30], &VIP.to_be_bytes(), "from the VIP");
        assert_eq!(len, 54);
        assert_eq!(c[Counter::ClientHopUsed as usize], 1);
        assert_eq!(c[Counter::ReplyHit as usize], 1);
    }

    /// A published neighbour wins over the learned MAC.
    #[test]
    fn a_published_neighbour_wins_over_the_learned_mac() {
        let fx = Fixture::new("unit-firstcontact-nb", 1 << 12);
        fx.with_onlink_clients();
        fx.edit_routing(|s| {
            let n = s.header.n_neighbours as usize;
            s.neighbours[n] = shm_layout::routing_slot::NeighbourRec {
                ip: 0xc612_0102,
                port: 0,
                mac: [2, 0, 0, 0, 7, 7],
                state: shm_layout::routing_slot::NEIGH_VALID,
                _pad: 0,
            };
            s.header.n_neighbours += 1;
            s.neighbours[..=n].sort_by_key(|r| r.ip);
        });
        let mut c = [0u64; N_COUNTERS];
        let (v, buf) = syn_then_syn_ack(&fx, &mut c, [198, 18, 1, 2], CLIENT_MAC, 40_001);
        assert!(matches!(v, Verdict::Tx { port: 0, .. }), "{v:?}");
        assert_eq!(&buf[..6], &[2, 0, 0, 0, 7, 7]);
        assert_eq!(c[Counter::ClientHopUsed as usize], 0);
    }

    /// Behind a gateway the frame's source MAC is the gateway's, and the
    /// gateway's neighbour entry is what counts: without it the reply is
    /// still dropped (`drop_no_neighbour`), never sent to a learned MAC.
    #[test]
    fn a_client_behind_an_unresolved_gateway_is_not_reached_by_a_learned_mac() {
        let fx = Fixture::new("unit-firstcontact-gw", 1 << 12);
        // The fixture's clients (198.18.100.0/24) are via 198.18.0.1: its
        // neighbour removed.
        fx.edit_routing(|s| {
            let n = s.header.n_neighbours as usize;
            let at = s.neighbours[..n]
                .iter()
                .position(|r| r.ip == 0xc612_0001)
                .unwrap();
            s.neighbours.copy_within(at + 1..n, at);
            s.header.n_neighbours -= 1;
        });
        let mut c = [0u64; N_COUNTERS];
        let (v, _) = syn_then_syn_ack(&fx, &mut c, [198, 18, 100, 1], CLIENT_GW_MAC, 40_002);
        assert_eq!(v, Verdict::Drop);
        assert_eq!(c[Counter::DropNoNeighbour as usize], 1);
        assert_eq!(c[Counter::ClientHopUsed as usize], 0);
    }

    #[test]
    fn no_hop_is_learned_from_a_group_or_zero_mac_or_a_wide_port() {
        use shm_layout::conntrack::ClientHop;
        assert_eq!(ClientHop::new([0xff; 6], 0), ClientHop::NONE);
        assert_eq!(ClientHop::new([1, 0, 0x5e, 0, 0, 1], 0), ClientHop::NONE);
        assert_eq!(ClientHop::new([0; 6], 0), ClientHop::NONE);
        assert_eq!(ClientHop::new(CLIENT_MAC, 1 << 16), ClientHop::NONE);
        let h = ClientHop::new(CLIENT_MAC, 3);
        assert_eq!((h.mac(), h.port()), (Some(CLIENT_MAC), 3));
        assert_eq!(ClientHop::NONE.mac(), None);
    }
}
