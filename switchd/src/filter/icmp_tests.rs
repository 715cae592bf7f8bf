//! ICMP for VIP flows: one frame in, the verdict and the bytes out, every
//! checksum checked with etherparse.

use etherparse::{
    IcmpEchoHeader, Icmpv4Slice, Icmpv4Type, Ipv4Header, NetSlice, PacketBuilder, SlicedPacket,
    TransportSlice, icmpv4,
};
use shm_layout::config_slot::MODE_DR;
use shm_layout::conntrack::FlowKey;
use shm_layout::switch_slot::{Counter, N_COUNTERS};

use super::super::{Parsed, Verdict, parse_and_prefetch, switch_parsed};
use crate::fixture::{CLIENT_GW_MAC, Fixture, TUNNEL_SRC, VIP, port_mac};

const CLIENT: [u8; 4] = [198, 18, 100, 1];
/// A router on the client's path.
const ROUTER: [u8; 4] = [198, 18, 0, 1];

fn run(fx: &Fixture, c: &mut [u64; N_COUNTERS], port: u32, frame: &[u8]) -> (Verdict, Vec<u8>) {
    let mut buf = vec![0u8; 2048];
    buf[..frame.len()].copy_from_slice(frame);
    let mut ctx = fx.ctx(c);
    let mut p = Parsed::default();
    parse_and_prefetch(&buf[..frame.len()], &ctx.ct, &ctx.flows, &mut p);
    let v = switch_parsed(&mut buf, frame.len(), &p, port, &port_mac, &mut ctx);
    (v, buf)
}

/// A client's packet to VIP:`vport` (TCP SYN, or a UDP datagram).
fn to_vip(udp: bool, cport: u16, vport: u16) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(CLIENT_GW_MAC, [2, 0, 0, 0, 0, 1]).ipv4(
        CLIENT,
        VIP.to_be_bytes(),
        64,
    );
    let mut v = Vec::new();
    if udp {
        b.udp(cport, vport).write(&mut v, b"query").unwrap();
    } else {
        b.tcp(cport, vport, 1, 1000)
            .syn()
            .write(&mut v, &[])
            .unwrap();
    }
    v
}

/// Opens a connection and returns the (address, port) the switch sent its
/// first packet to (DR: the VIP itself).
fn open(
    fx: &Fixture,
    c: &mut [u64; N_COUNTERS],
    udp: bool,
    cport: u16,
    vport: u16,
) -> ([u8; 4], u16) {
    let (dst, port, _) = open_with_mac(fx, c, udp, cport, vport);
    (dst, port)
}

/// [`open`], and the destination MAC of the first packet.
fn open_with_mac(
    fx: &Fixture,
    c: &mut [u64; N_COUNTERS],
    udp: bool,
    cport: u16,
    vport: u16,
) -> ([u8; 4], u16, [u8; 6]) {
    let (v, buf) = run(fx, c, 0, &to_vip(udp, cport, vport));
    let Verdict::Tx { port: 1, len } = v else {
        panic!("{v:?}")
    };
    let p = SlicedPacket::from_ethernet(&buf[..len]).unwrap();
    let Some(NetSlice::Ipv4(ip)) = &p.net else {
        panic!()
    };
    // A tunnel's outer header: the backend is its destination, the inner
    // port unchanged.
    let dst = ip.header().destination();
    let port = match p.transport {
        Some(TransportSlice::Tcp(t)) => t.destination_port(),
        Some(TransportSlice::Udp(u)) => u.destination_port(),
        _ => vport,
    };
    (dst, port, buf[..6].try_into().unwrap())
}

/// The packet as a sender emits it: IPv4 + TCP (or UDP) with `payload`.
fn ip_packet(udp: bool, src: ([u8; 4], u16), dst: ([u8; 4], u16), payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ipv4(src.0, dst.0, 63);
    let mut v = Vec::new();
    if udp {
        b.udp(src.1, dst.1).write(&mut v, payload).unwrap();
    } else {
        b.tcp(src.1, dst.1, 77, 1000)
            .ack(5)
            .write(&mut v, payload)
            .unwrap();
    }
    v
}

/// An ICMP error from `from` to `to` quoting `quote`, in an Ethernet frame
/// arriving from `mac`.
fn icmp_frame(mac: [u8; 6], from: [u8; 4], to: [u8; 4], t: Icmpv4Type, quote: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ethernet2(mac, [2, 0, 0, 0, 0, 1])
        .ipv4(from, to, 64)
        .icmpv4(t)
        .write(&mut v, quote)
        .unwrap();
    v
}

fn frag_needed() -> Icmpv4Type {
    Icmpv4Type::DestinationUnreachable(icmpv4::DestUnreachableHeader::FragmentationNeeded {
        next_hop_mtu: 1280,
    })
}

/// The outer IPv4 header and ICMP message of an IP packet, the header's
/// and the ICMP checksum checked.
fn checked_icmp(ip_packet: &[u8]) -> (Ipv4Header, Icmpv4Slice<'_>) {
    let p = SlicedPacket::from_ip(ip_packet).unwrap();
    let Some(NetSlice::Ipv4(ip)) = p.net else {
        panic!("not IPv4")
    };
    let iph = ip.header().to_header();
    assert_eq!(
        iph.header_checksum,
        iph.calc_header_checksum(),
        "outer header"
    );
    let Some(TransportSlice::Icmpv4(icmp)) = p.transport else {
        panic!("not ICMP: {:?}", p.transport)
    };
    let want = etherparse::Icmpv4Header::with_checksum(icmp.icmp_type(), icmp.payload());
    assert_eq!(icmp.checksum(), want.checksum, "ICMP checksum");
    (iph, icmp)
}

/// The quoted packet's IPv4 header (checksum checked) and its first 8
/// bytes after it.
fn quoted(icmp: &Icmpv4Slice<'_>) -> (Ipv4Header, [u8; 8]) {
    let q = icmp.payload();
    let (h, rest) = Ipv4Header::from_slice(q).unwrap();
    assert_eq!(h.header_checksum, h.calc_header_checksum(), "quoted header");
    (h, rest[..8].try_into().unwrap())
}

fn table_len(fx: &Fixture) -> usize {
    let ct = fx.region.conntrack();
    (0..ct.capacity())
        .filter(|&i| ct.snapshot(i as u32).is_some_and(|s| s.conn().is_some()))
        .count()
}

#[test]
fn frag_needed_about_a_nat_reply_goes_to_its_backend_rewritten() {
    let fx = Fixture::new("icmp-nat", 1 << 12);
    let mut c = [0u64; N_COUNTERS];
    let (backend, bport) = open(&fx, &mut c, false, 40_000, 80);
    assert_eq!(bport, 8080);
    // The NAT reply as the switch sent it toward the client: VIP:80 ->
    // client:40000, whole (so the quoted TCP checksum can be checked).
    let reply = ip_packet(
        false,
        (VIP.to_be_bytes(), 80),
        (CLIENT, 40_000),
        &[0x44; 1400],
    );
    for (i, t) in [
        frag_needed(),
        Icmpv4Type::TimeExceeded(icmpv4::TimeExceededCode::TtlExceededInTransit),
    ]
    .into_iter()
    .enumerate()
    {
        let frame = icmp_frame(
            CLIENT_GW_MAC,
            ROUTER,
            VIP.to_be_bytes(),
            t.clone(),
            &reply[..548],
        );
        let (v, buf) = run(&fx, &mut c, 0, &frame);
        let Verdict::Tx { port: 1, len } = v else {
            panic!("{v:?}")
        };
        assert_eq!(len, frame.len());
        assert_eq!(
            &buf[..6],
            &[2, 0, 0, 0, 1, backend[3]],
            "to the backend's MAC"
        );
        assert_eq!(&buf[6..12], &[2, 0, 0, 0, 0, 2]);
        let (iph, icmp) = checked_icmp(&buf[14..len]);
        assert_eq!((iph.source, iph.destination), (ROUTER, backend));
        assert_eq!(iph.time_to_live, 63);
        assert_eq!(icmp.icmp_type(), t);
        let (qh, _) = quoted(&icmp);
        assert_eq!((qh.source, qh.destination), (backend, CLIENT));
        let (th, payload) = etherparse::TcpHeader::from_slice(&icmp.payload()[20..]).unwrap();
        assert_eq!((th.source_port, th.destination_port), (8080, 40_000));
        assert_eq!(payload, &reply[40..548]);
        // Everything but the rewritten words is unchanged: the quoted
        // segment from its sequence number to its checksum, and after it.
        let seg = 14 + 20 + 8 + 20;
        assert_eq!(&buf[seg + 4..seg + 16], &frame[seg + 4..seg + 16]);
        assert_eq!(&buf[seg + 18..len], &frame[seg + 18..]);
        assert_eq!(c[Counter::IcmpForwarded as usize], i as u64 + 1);
    }
    assert_eq!(c[Counter::DropNotOurs as usize], 0);
    assert_eq!(c[Counter::ConnNew as usize], 1);
    assert_eq!(table_len(&fx), 1, "ICMP changed nothing in the table");
}

#[test]
fn quoted_tcp_checksum_is_rewritten_incrementally_and_right() {
    // The quote holds the whole TCP segment (no payload): its checksum can
    // be checked from scratch after the rewrite.
    let fx = Fixture::new("icmp-csum", 1 << 12);
    let mut c = [0u64; N_COUNTERS];
    let (backend, _) = open(&fx, &mut c, false, 40_010, 80);
    let reply = ip_packet(false, (VIP.to_be_bytes(), 80), (CLIENT, 40_010), &[]);
    let frame = icmp_frame(
        CLIENT_GW_MAC,
        ROUTER,
        VIP.to_be_bytes(),
        frag_needed(),
        &reply,
    );
    let (v, buf) = run(&fx, &mut c, 0, &frame);
    let Verdict::Tx { port: 1, len } = v else {
        panic!("{v:?}")
    };
    let (_, icmp) = checked_icmp(&buf[14..len]);
    let q = SlicedPacket::from_ip(icmp.payload()).unwrap();
    let Some(NetSlice::Ipv4(qip)) = q.net else {
        panic!()
    };
    let qh = qip.header().to_header();
    assert_eq!(qh.source, backend);
    let Some(TransportSlice::Tcp(t)) = q.transport else {
        panic!()
    };
    let th = t.to_header();
    assert_eq!(th.source_port, 8080);
    assert_eq!(th.checksum, th.calc_checksum_ipv4(&qh, &[]).unwrap());
}

#[test]
fn port_unreachable_from_a_nat_backend_goes_to_the_client_as_from_the_vip() {
    let fx = Fixture::new("icmp-back", 1 << 12);
    let mut c = [0u64; N_COUNTERS];
    let (backend, bport) = open(&fx, &mut c, true, 40_001, 53);
    assert_eq!(bport, 5353);
    // The datagram as the switch forwarded it, quoted whole by the backend.
    let fwd = ip_packet(true, (CLIENT, 40_001), (backend, 5353), b"query");
    let unreachable = Icmpv4Type::DestinationUnreachable(icmpv4::DestUnreachableHeader::Port);
    let frame = icmp_frame(
        [2, 0, 0, 0, 1, backend[3]],
        backend,
        CLIENT,
        unreachable.clone(),
        &fwd,
    );
    // Sent to the backend-side port's own MAC (the L2 rules drop a frame
    // to another host's).
    let mut frame = frame;
    frame[..6].copy_from_slice(&port_mac(1).unwrap());
    let (v, buf) = run(&fx, &mut c, 1, &frame);
    let Verdict::Tx { port: 0, len } = v else {
        panic!("{v:?}")
    };
    assert_eq!(
        &buf[..12],
        &[CLIENT_GW_MAC, [2, 0, 0, 0, 0, 1]].concat()[..]
    );
    let (iph, icmp) = checked_icmp(&buf[14..len]);
    assert_eq!((iph.source, iph.destination), (VIP.to_be_bytes(), CLIENT));
    assert_eq!(iph.time_to_live, 63);
    assert_eq!(icmp.icmp_type(), unreachable);
    let q = SlicedPacket::from_ip(icmp.payload()).unwrap();
    let Some(NetSlice::Ipv4(qip)) = q.net else {
        panic!()
    };
    let qh = qip.header().to_header();
    assert_eq!(qh.header_checksum, qh.calc_header_checksum());
    assert_eq!((qh.source, qh.destination), (CLIENT, VIP.to_be_bytes()));
    let Some(TransportSlice::Udp(u)) = q.transport else {
        panic!()
    };
    let uh = u.to_header();
    assert_eq!((uh.source_port, uh.destination_port), (40_001, 53));
    assert_eq!(
        uh.checksum,
        uh.calc_checksum_ipv4(&qh, u.payload()).unwrap()
    );
    assert_eq!(c[Counter::IcmpToClient as usize], 1);
    assert_eq!(c[Counter::DropNotOurs as usize], 0);
}

#[test]
fn error_about_a_tunnel_flow_is_encapsulated_toward_its_backend() {
    let fx = Fixture::new("icmp-tun", 1 << 12);
    let mut c = [0u64; N_COUNTERS];
    let (backend, _) = open(&fx, &mut c, false, 40_002, 443);
    // The backend's reply went to the client directly, from VIP:443.
    let reply = ip_packet(
        false,
        (VIP.to_be_bytes(), 443),
        (CLIENT, 40_002),
        &[1; 1400],
    );
    let frame = icmp_frame(
        CLIENT_GW_MAC,
        ROUTER,
        VIP.to_be_bytes(),
        frag_needed(),
        &reply[..28],
    );
    let (v, buf) = run(&fx, &mut c, 0, &frame);
    let Verdict::Tx { port: 1, len } = v else {
        panic!("{v:?}")
    };
    assert_eq!(len, frame.len() + 20);
    let outer = Ipv4Header::from_slice(&buf[14..len]).unwrap().0;
    assert_eq!(outer.header_checksum, outer.calc_header_checksum());
    assert_eq!(outer.protocol, etherparse::IpNumber::IPV4);
    assert_eq!(
        (outer.source, outer.destination),
        (TUNNEL_SRC.to_be_bytes(), backend)
    );
    assert_eq!(&buf[..6], &[2, 0, 0, 0, 1, backend[3]]);
    // Inner: the error unchanged but its TTL.
    let (iph, icmp) = checked_icmp(&buf[34..len]);
    assert_eq!((iph.source, iph.destination), (ROUTER, VIP.to_be_bytes()));
    assert_eq!(iph.time_to_live, 63);
    assert_eq!(icmp.slice(), &frame[34..]);
    assert_eq!(c[Counter::IcmpForwarded as usize], 1);
}

#[test]
fn error_about_a_dr_flow_goes_to_its_backend_with_only_the_macs_changed() {
    let fx = Fixture::new("icmp-dr", 1 << 12);
    fx.configure(|s| s.services[0].mode = MODE_DR);
    let mut c = [0u64; N_COUNTERS];
    let (dst, _, backend_mac) = open_with_mac(&fx, &mut c, false, 40_003, 80);
    assert_eq!(dst, VIP.to_be_bytes(), "DR leaves the VIP as destination");
    let reply = ip_packet(false, (VIP.to_be_bytes(), 80), (CLIENT, 40_003), &[1; 1400]);
    let frame = icmp_frame(
        CLIENT_GW_MAC,
        ROUTER,
        VIP.to_be_bytes(),
        frag_needed(),
        &reply[..28],
    );
    let (v, buf) = run(&fx, &mut c, 0, &frame);
    let Verdict::Tx { port: 1, len } = v else {
        panic!("{v:?}")
    };
    assert_eq!(len, frame.len());
    assert_eq!(&buf[..12], &[backend_mac, [2, 0, 0, 0, 0, 2]].concat()[..]);
    let (iph, icmp) = checked_icmp(&buf[14..len]);
    assert_eq!((iph.source, iph.destination), (ROUTER, VIP.to_be_bytes()));
    assert_eq!(iph.time_to_live, 63);
    assert_eq!(icmp.slice(), &frame[34..]);
    assert_eq!(c[Counter::IcmpForwarded as usize], 1);
}

#[test]
fn errors_quoting_no_known_flow_or_malformed_are_dropped_and_create_nothing() {
    let fx = Fixture::new("icmp-bad", 1 << 12);
    let mut c = [0u64; N_COUNTERS];
    open(&fx, &mut c, false, 40_004, 80);
    let to_vip = |quote: &[u8]| {
        icmp_frame(
            CLIENT_GW_MAC,
            ROUTER,
            VIP.to_be_bytes(),
            frag_needed(),
            quote,
        )
    };
    // Unknown flow (another client port): dropped, nothing created.
    let unknown = ip_packet(false, (VIP.to_be_bytes(), 80), (CLIENT, 40_999), &[]);
    let (v, _) = run(&fx, &mut c, 0, &to_vip(&unknown));
    assert_eq!(v, Verdict::Drop);
    assert_eq!(c[Counter::DropIcmpNoFlow as usize], 1);
    let key = FlowKey {
        proto: 6,
        src_ip: u32::from_be_bytes(CLIENT),
        dst_ip: VIP,
        src_port: 40_999,
        dst_port: 80,
    };
    assert!(fx.region.conntrack().lookup(&key).is_none());
    // A quote of the IP header and 7 bytes: malformed.
    let known = ip_packet(false, (VIP.to_be_bytes(), 80), (CLIENT, 40_004), &[]);
    let (v, _) = run(&fx, &mut c, 0, &to_vip(&known[..27]));
    assert_eq!(v, Verdict::Drop);
    // A wrong ICMP checksum: malformed.
    let mut bad = to_vip(&known[..28]);
    bad[14 + 20 + 2] ^= 0x10;
    let (v, _) = run(&fx, &mut c, 0, &bad);
    assert_eq!(v, Verdict::Drop);
    // A quote whose source is not the VIP the error was sent to.
    let other = ip_packet(false, ([198, 18, 0, 11], 80), (CLIENT, 40_004), &[]);
    let (v, _) = run(&fx, &mut c, 0, &to_vip(&other[..28]));
    assert_eq!(v, Verdict::Drop);
    assert_eq!(c[Counter::DropIcmpMalformed as usize], 3);
    // The well-formed error about the known flow still goes through.
    let (v, _) = run(&fx, &mut c, 0, &to_vip(&known[..28]));
    assert!(matches!(v, Verdict::Tx { port: 1, .. }), "{v:?}");
    assert_eq!(c[Counter::DropNotOurs as usize], 0);
    assert_eq!(table_len(&fx), 1);
}

fn echo(to: [u8; 4], seq: u16) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ethernet2(CLIENT_GW_MAC, [2, 0, 0, 0, 0, 1])
        .ipv4(CLIENT, to, 64)
        .icmpv4_echo_request(0x77, seq)
        .write(&mut v, b"are you there")
        .unwrap();
    v
}

#[test]
fn echo_to_a_vip_is_answered_within_the_budget_and_to_others_not_ours() {
    let fx = Fixture::new("icmp-echo", 1 << 12);
    let mut c = [0u64; N_COUNTERS];
    let (v, buf) = run(&fx, &mut c, 0, &echo(VIP.to_be_bytes(), 1));
    let Verdict::Tx { port: 0, len } = v else {
        panic!("{v:?}")
    };
    assert_eq!(
        &buf[..12],
        &[CLIENT_GW_MAC, [2, 0, 0, 0, 0, 1]].concat()[..]
    );
    let (iph, icmp) = checked_icmp(&buf[14..len]);
    assert_eq!((iph.source, iph.destination), (VIP.to_be_bytes(), CLIENT));
    assert_eq!(
        icmp.icmp_type(),
        Icmpv4Type::EchoReply(IcmpEchoHeader { id: 0x77, seq: 1 })
    );
    assert_eq!(icmp.payload(), b"are you there");
    assert_eq!(c[Counter::IcmpEchoAnswered as usize], 1);
    // Not to a VIP: not ours.
    let (v, _) = run(&fx, &mut c, 0, &echo([198, 18, 0, 99], 2));
    assert_eq!(v, Verdict::Drop);
    assert_eq!(c[Counter::DropNotOurs as usize], 1);
    // The budget spent: dropped, counted.
    let mut ctx = fx.ctx(&mut c);
    ctx.icmp_tokens = 0;
    let f = echo(VIP.to_be_bytes(), 3);
    let mut b = vec![0u8; 2048];
    b[..f.len()].copy_from_slice(&f);
    let v = super::super::process(&mut b, f.len(), 0, &port_mac, &mut ctx);
    assert_eq!(v, Verdict::Drop);
    assert_eq!(c[Counter::IcmpRateLimited as usize], 1);
    assert_eq!(c[Counter::IcmpEchoAnswered as usize], 1);
}

proptest::proptest! {
    /// Arbitrary quotes (the ICMP checksum made right, so they get past
    /// it) in errors to the VIP and from the backend side: never a panic,
    /// never a transmission without a flow, one drop counted each, and
    /// nothing created in the table.
    #[test]
    fn arbitrary_quotes_without_a_flow_are_dropped_and_counted_once(
        quote in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..80),
        head in proptest::prelude::any::<[u8; 20]>(),
        ipv4_tcp in proptest::prelude::any::<bool>(),
        time_exceeded in proptest::prelude::any::<bool>(),
        from_backend in proptest::prelude::any::<bool>(),
    ) {
        let fx = Fixture::new("icmp-prop", 1 << 8);
        let mut c = [0u64; N_COUNTERS];
        let mut q = quote;
        if ipv4_tcp {
            // A plausible quoted header: version 4, IHL 5, TCP, random rest.
            let mut h = head;
            h[0] = 0x45;
            h[6] &= 0x40;
            h[7] = 0;
            h[9] = 6;
            h[12..16].copy_from_slice(&VIP.to_be_bytes());
            let mut v = h.to_vec();
            v.extend_from_slice(&q);
            q = v;
        }
        let t = if time_exceeded {
            Icmpv4Type::TimeExceeded(icmpv4::TimeExceededCode::TtlExceededInTransit)
        } else {
            frag_needed()
        };
        let frame = if from_backend {
            icmp_frame([2, 0, 0, 0, 1, 1], [198, 19, 1, 1], CLIENT, t, &q)
        } else {
            icmp_frame(CLIENT_GW_MAC, ROUTER, VIP.to_be_bytes(), t, &q)
        };
        let port = u32::from(from_backend);
        let (v, _) = run(&fx, &mut c, port, &frame);
        proptest::prop_assert_eq!(v, Verdict::Drop);
        let drops: u64 = Counter::ALL
            .iter()
            .filter(|k| k.name().starts_with("drop_"))
            .map(|k| c[*k as usize])
            .sum();
        proptest::prop_assert_eq!(drops, 1);
        proptest::prop_assert_eq!(table_len(&fx), 0);
    }
}
