//! The filter's tests: one frame in, the verdict and the bytes out.

use core::sync::atomic::Ordering;

use shm_layout::config_slot::{ON_DOWN_KEEP, ON_DOWN_RESET, PROTO_TCP};
use shm_layout::conntrack::{Conn, Direction, FlowKey, STATE_CLOSING, STATE_SYN};
use wire::checksum;

use super::decide::existing;
use super::parse::parse_ip;
use super::state::{Moved, touch};
use super::*;
use crate::fixture::{CLIENT_GW_MAC, Fixture, TUNNEL_SRC, VIP, port_mac};
use crate::sched;
use etherparse::PacketBuilder;
use proptest::prelude::*;
use shm_layout::config_slot::ON_DOWN_RESCHEDULE;

mod provisional;
mod synproxy;

fn syn(client_port: u16) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ethernet2(CLIENT_GW_MAC, [2, 0, 0, 0, 0, 1])
        .ipv4([198, 18, 100, 1], VIP.to_be_bytes(), 64)
        .tcp(client_port, 80, 1, 1000)
        .syn()
        .write(&mut v, &[])
        .unwrap();
    v
}

fn run(fx: &Fixture, counters: &mut [u64; N_COUNTERS], frame: &[u8]) -> (Verdict, Vec<u8>) {
    run_on(fx, counters, 0, frame)
}

/// The IPv4 and TCP headers of an IP packet, both checksums checked.
fn checked_tcp(ip_packet: &[u8]) -> (etherparse::Ipv4Header, etherparse::TcpHeader) {
    let p = etherparse::SlicedPacket::from_ip(ip_packet).unwrap();
    let Some(etherparse::NetSlice::Ipv4(ip)) = p.net else {
        panic!("not IPv4")
    };
    let Some(etherparse::TransportSlice::Tcp(t)) = p.transport else {
        panic!("not TCP")
    };
    let (iph, th) = (ip.header().to_header(), t.to_header());
    assert_eq!(iph.header_checksum, iph.calc_header_checksum());
    assert_eq!(
        th.checksum,
        th.calc_checksum_ipv4(&iph, t.payload()).unwrap()
    );
    (iph, th)
}

#[test]
fn syn_is_natted_to_a_backend_with_valid_checksums() {
    let fx = Fixture::new("unit-syn", 1 << 12);
    let mut c = [0u64; N_COUNTERS];
    let (v, buf) = run(&fx, &mut c, &syn(40_000));
    let Verdict::Tx { port: 1, len } = v else {
        panic!("{v:?}")
    };
    let (iph, t) = checked_tcp(&buf[14..len]);
    assert_eq!(iph.time_to_live, 63);
    assert_eq!(&iph.destination[..3], &[198, 19, 1]);
    assert_eq!(t.destination_port, 8080);
    assert_eq!(c[Counter::ConnNew as usize], 1);
}

/// A TCP segment to the tunnel service (VIP:443) with `payload` bytes.
fn to_tunnel(client_port: u16, syn: bool, df: bool, payload: usize) -> Vec<u8> {
    let mut b = PacketBuilder::ethernet2(CLIENT_GW_MAC, [2, 0, 0, 0, 0, 1])
        .ipv4([198, 18, 100, 1], VIP.to_be_bytes(), 64)
        .tcp(client_port, 443, 1, 1000);
    b = if syn { b.syn() } else { b.ack(7) };
    let mut v = Vec::new();
    b.write(&mut v, &vec![0x5a; payload]).unwrap();
    if !df {
        v[14 + 6] &= !0x40;
        let c = {
            let h = etherparse::Ipv4HeaderSlice::from_slice(&v[14..]).unwrap();
            h.to_header().calc_header_checksum()
        };
        v[14 + 10..14 + 12].copy_from_slice(&c.to_be_bytes());
    }
    v
}

#[test]
fn tunnel_encapsulates_the_unchanged_packet_toward_its_backend() {
    let fx = Fixture::new("unit-tun", 1 << 12);
    let mut c = [0u64; N_COUNTERS];
    let frame = to_tunnel(40_001, true, true, 0);
    let (v, buf) = run(&fx, &mut c, &frame);
    let Verdict::Tx { port: 1, len } = v else {
        panic!("{v:?}")
    };
    assert_eq!(len, frame.len() + 20);
    let outer = etherparse::Ipv4HeaderSlice::from_slice(&buf[14..len]).unwrap();
    let o = outer.to_header();
    assert_eq!(o.header_checksum, o.calc_header_checksum());
    assert_eq!(o.protocol, etherparse::IpNumber::IPV4);
    assert_eq!(o.source, TUNNEL_SRC.to_be_bytes());
    assert_eq!(&o.destination[..3], &[198, 19, 1]);
    let backend_mac = [2, 0, 0, 0, 1, o.destination[3]];
    assert_eq!(&buf[..12], &[backend_mac, [2, 0, 0, 0, 0, 2]].concat()[..]);
    // Inner: VIP and port unchanged, TTL decremented, checksums valid.
    let (iph, t) = checked_tcp(&buf[34..len]);
    assert_eq!(iph.destination, VIP.to_be_bytes());
    assert_eq!(iph.time_to_live, 63);
    assert_eq!(t.destination_port, 443);
    assert_eq!(&buf[34 + 20..len], &frame[14 + 20..]);
    assert_eq!(c[Counter::ConnNew as usize], 1);
    // The connection has no reply slot (replies bypass the switch) and
    // its next packet goes to the same backend.
    let (v2, buf2) = run(&fx, &mut c, &to_tunnel(40_001, false, true, 10));
    assert!(matches!(v2, Verdict::Tx { port: 1, .. }));
    assert_eq!(buf2[30..34], o.destination);
    assert_eq!(c[Counter::FwdHit as usize], 1);
}

#[test]
fn icmp_budget_refills_at_its_rate_up_to_its_burst() {
    let mut b = IcmpBudget::new(0);
    assert_eq!(b.take(0), IcmpBudget::BURST);
    b.put_back(3);
    assert_eq!(b.take(0), 3, "unused tokens come back");
    assert_eq!(b.take(999_999), 0, "less than a token's time");
    assert_eq!(b.take(5_000_000), 5, "one per millisecond");
    assert_eq!(b.take(10_000_000_000), IcmpBudget::BURST, "capped");
}

#[test]
fn frag_needed_answers_stop_when_the_budget_is_spent() {
    let fx = Fixture::new("unit-icmpbudget", 1 << 12);
    let mut c = [0u64; N_COUNTERS];
    let mut ctx = fx.ctx(&mut c);
    ctx.icmp_tokens = 2;
    let mut verdicts = Vec::new();
    for port in 41_000..41_004 {
        let f = to_tunnel(port, false, true, 1460);
        let mut buf = vec![0u8; 2048];
        buf[..f.len()].copy_from_slice(&f);
        verdicts.push(process(&mut buf, f.len(), 0, &port_mac, &mut ctx));
    }
    assert_eq!(ctx.icmp_tokens, 0);
    drop(ctx);
    assert!(matches!(
        verdicts[..2],
        [Verdict::Tx { port: 0, .. }, Verdict::Tx { port: 0, .. }]
    ));
    assert_eq!(verdicts[2..], [Verdict::Drop, Verdict::Drop]);
    assert_eq!(c[Counter::IcmpFragNeeded as usize], 2);
    assert_eq!(c[Counter::IcmpRateLimited as usize], 2);
}

#[test]
fn tunnel_answers_an_oversized_df_packet_with_frag_needed() {
    let fx = Fixture::new("unit-tunmtu", 1 << 12);
    let mut c = [0u64; N_COUNTERS];
    // 1500-byte IP packet: 1520 once encapsulated, over the MTU.
    let frame = to_tunnel(40_002, false, true, 1460);
    assert_eq!(frame.len(), 14 + 1500);
    let (v, buf) = run(&fx, &mut c, &frame);
    let Verdict::Tx { port: 0, len } = v else {
        panic!("{v:?}")
    };
    let p = etherparse::SlicedPacket::from_ethernet(&buf[..len]).unwrap();
    let Some(etherparse::TransportSlice::Icmpv4(icmp)) = p.transport else {
        panic!("{:?}", p.transport)
    };
    assert_eq!(
        icmp.icmp_type(),
        etherparse::Icmpv4Type::DestinationUnreachable(
            etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1480 }
        )
    );
    assert_eq!(&buf[..6], &CLIENT_GW_MAC);
    assert_eq!(c[Counter::IcmpFragNeeded as usize], 1);
    // Exactly at the limit passes; without DF an oversized one is dropped.
    let (v, _) = run(&fx, &mut c, &to_tunnel(40_003, false, true, 1440));
    assert!(matches!(v, Verdict::Tx { port: 1, len } if len == 14 + 1500));
    let (v, _) = run(&fx, &mut c, &to_tunnel(40_004, false, false, 1460));
    assert_eq!(v, Verdict::Drop);
    assert_eq!(c[Counter::DropTooBig as usize], 1);
    assert_eq!(c[Counter::IcmpFragNeeded as usize], 1);
}

/// A client TCP segment to the VIP with the given flags.
/// Recomputes the IPv4 header checksum of an Ethernet frame.
fn fix_ip_checksum(f: &mut [u8]) {
    f[24] = 0;
    f[25] = 0;
    let c = checksum::ipv4_header(&f[14..34]);
    f[24..26].copy_from_slice(&c.to_be_bytes());
}

fn tcp_seg(client_port: u16, flags: &str) -> Vec<u8> {
    let mut v = Vec::new();
    let mut b = PacketBuilder::ethernet2(CLIENT_GW_MAC, [2, 0, 0, 0, 0, 1])
        .ipv4([198, 18, 100, 1], VIP.to_be_bytes(), 64)
        .tcp(client_port, 80, 1, 1000);
    for f in flags.chars() {
        b = match f {
            'S' => b.syn(),
            'A' => b.ack(2),
            'R' => b.rst(),
            'F' => b.fin(),
            _ => panic!("flag {f}"),
        };
    }
    b.write(&mut v, b"data").unwrap();
    v
}

fn udp_dgram(client_port: u16) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ethernet2(CLIENT_GW_MAC, [2, 0, 0, 0, 0, 1])
        .ipv4([198, 18, 100, 1], VIP.to_be_bytes(), 64)
        .udp(client_port, 53)
        .write(&mut v, b"query")
        .unwrap();
    v
}

/// The verdict's port and the IPv4 destination of the frame sent.
fn sent_to(v: Verdict, buf: &[u8]) -> (u32, [u8; 4]) {
    let Verdict::Tx { port, len } = v else {
        panic!("{v:?}")
    };
    let p = etherparse::SlicedPacket::from_ethernet(&buf[..len]).unwrap();
    let Some(etherparse::NetSlice::Ipv4(ip)) = p.net else {
        panic!()
    };
    (port, ip.header().destination())
}

/// Fixture backend id (TCP service) for a backend address.
fn tcp_id(dst: [u8; 4]) -> u32 {
    u32::from(dst[3]) - 1
}

#[test]
fn down_backend_keep_forwards_its_connections_and_gets_no_new_ones() {
    let fx = Fixture::new("unit-keep", 1 << 12);
    let mut c = [0u64; N_COUNTERS];
    let (v, buf) = run(&fx, &mut c, &tcp_seg(41_000, "S"));
    let (_, first) = sent_to(v, &buf);
    fx.mark_down(&[(tcp_id(first), ON_DOWN_KEEP)]);
    for flags in ["A", "S"] {
        let (v, buf) = run(&fx, &mut c, &tcp_seg(41_000, flags));
        assert_eq!(sent_to(v, &buf), (1, first), "{flags}");
    }
    for port in 42_000..42_100 {
        let (v, buf) = run(&fx, &mut c, &tcp_seg(port, "S"));
        assert_ne!(
            sent_to(v, &buf).1,
            first,
            "new connection to a DOWN backend"
        );
    }
    assert_eq!(
        c[Counter::DownMoved as usize] + c[Counter::DownRst as usize],
        0
    );
}

#[test]
fn down_backend_reset_answers_established_tcp_with_rst_from_the_vip() {
    let fx = Fixture::new("unit-reset", 1 << 12);
    let mut c = [0u64; N_COUNTERS];
    let (v, buf) = run(&fx, &mut c, &tcp_seg(41_000, "S"));
    let (_, first) = sent_to(v, &buf);
    run(&fx, &mut c, &tcp_seg(41_000, "A"));
    fx.mark_down(&[(tcp_id(first), ON_DOWN_RESET)]);
    let (v, buf) = run(&fx, &mut c, &tcp_seg(41_000, "A"));
    let Verdict::Tx { port: 0, len } = v else {
        panic!("{v:?}")
    };
    let p = etherparse::SlicedPacket::from_ethernet(&buf[..len]).unwrap();
    let (Some(etherparse::NetSlice::Ipv4(ip)), Some(etherparse::TransportSlice::Tcp(t))) =
        (p.net, p.transport)
    else {
        panic!()
    };
    assert_eq!(ip.header().source(), VIP.to_be_bytes());
    assert_eq!(ip.header().destination(), [198, 18, 100, 1]);
    assert!(t.rst() && t.source_port() == 80 && t.destination_port() == 41_000);
    assert_eq!(c[Counter::DownRst as usize], 1);
    // The entry is closing; the client's own RST still reaches the backend.
    let hit = fx.region.conntrack().lookup(&FlowKey {
        proto: PROTO_TCP,
        src_ip: 0xc612_6401,
        dst_ip: VIP,
        src_port: 41_000,
        dst_port: 80,
    });
    let slot = fx.region.conntrack().slot(hit.unwrap().idx);
    assert_eq!(slot.tcp_state.load(Ordering::Relaxed), STATE_CLOSING);
    let (v, buf) = run(&fx, &mut c, &tcp_seg(41_000, "R"));
    assert_eq!(sent_to(v, &buf), (1, first));
    assert_eq!(c[Counter::DownRst as usize], 1);
}

#[test]
fn down_backend_reschedule_moves_syns_and_keeps_established_tcp() {
    let fx = Fixture::new("unit-resched", 1 << 12);
    let mut c = [0u64; N_COUNTERS];
    // Two connections to the same backend: one established, one whose
    // SYN is retransmitted after the backend went DOWN.
    let (v, buf) = run(&fx, &mut c, &tcp_seg(41_000, "S"));
    let (_, first) = sent_to(v, &buf);
    run(&fx, &mut c, &tcp_seg(41_000, "A"));
    let other = (41_001..42_000)
        .find(|&p| sent_to_fresh(&fx, &mut c, p) == first)
        .expect("a second flow to the same backend");
    let id = tcp_id(first) as usize;
    let active_before = fx.region.backend_counters()[id]
        .active
        .load(Ordering::Relaxed);
    fx.mark_down(&[(id as u32, ON_DOWN_RESCHEDULE)]);
    let (v, buf) = run(&fx, &mut c, &tcp_seg(41_000, "A"));
    assert_eq!(sent_to(v, &buf), (1, first), "established TCP cannot move");
    let (v, buf) = run(&fx, &mut c, &tcp_seg(other, "S"));
    let (port, moved) = sent_to(v, &buf);
    assert_eq!(port, 1);
    assert_ne!(moved, first, "the SYN moved off the DOWN backend");
    assert_eq!(c[Counter::DownMoved as usize], 1);
    let counters = fx.region.backend_counters();
    assert_eq!(
        counters[id].active.load(Ordering::Relaxed),
        active_before - 1
    );
    assert_eq!(
        counters[tcp_id(moved) as usize]
            .active
            .load(Ordering::Relaxed),
        1
    );
    // It stays on its new backend.
    let (v, buf) = run(&fx, &mut c, &tcp_seg(other, "A"));
    assert_eq!(sent_to(v, &buf), (1, moved));
    assert_eq!(c[Counter::DownMoved as usize], 1);
}

/// Opens a flow from `port` with a SYN; returns where it went.
fn sent_to_fresh(fx: &Fixture, c: &mut [u64; N_COUNTERS], port: u16) -> [u8; 4] {
    let (v, buf) = run(fx, c, &tcp_seg(port, "S"));
    sent_to(v, &buf).1
}

#[test]
fn down_backend_udp_flow_moves_under_reschedule_and_reset() {
    for (tag, action) in [
        ("unit-udp-res", ON_DOWN_RESCHEDULE),
        ("unit-udp-rst", ON_DOWN_RESET),
    ] {
        let fx = Fixture::new(tag, 1 << 12);
        let mut c = [0u64; N_COUNTERS];
        let (v, buf) = run(&fx, &mut c, &udp_dgram(5000));
        let (_, first) = sent_to(v, &buf);
        let id = 3 + tcp_id(first);
        fx.mark_down(&[(id, action)]);
        let (v, buf) = run(&fx, &mut c, &udp_dgram(5000));
        let (port, moved) = sent_to(v, &buf);
        assert_eq!(port, 1);
        assert_ne!(moved, first);
        assert_eq!(c[Counter::DownMoved as usize], 1);
        assert_eq!(c[Counter::DownRst as usize], 0);
        let (v, buf) = run(&fx, &mut c, &udp_dgram(5000));
        assert_eq!(sent_to(v, &buf).1, moved);
        assert_eq!(c[Counter::ConnNew as usize], 2);
    }
}

/// The backend's SYN-ACK (or another reply) for a client port, as it
/// arrives on the backend port.
fn reply(backend: [u8; 4], client_port: u16, synack: bool) -> Vec<u8> {
    let mut v = Vec::new();
    let b = PacketBuilder::ethernet2([2, 0, 0, 0, 1, backend[3]], [2, 0, 0, 0, 0, 2])
        .ipv4(backend, [198, 18, 100, 1], 64)
        .tcp(8080, client_port, 77, 1000);
    let b = if synack { b.syn().ack(2) } else { b.ack(2) };
    b.write(&mut v, &[]).unwrap();
    v
}

fn run_on(fx: &Fixture, c: &mut [u64; N_COUNTERS], port: u32, frame: &[u8]) -> (Verdict, Vec<u8>) {
    let mut buf = vec![0u8; 2048];
    buf[..frame.len()].copy_from_slice(frame);
    let mut ctx = fx.ctx(c);
    // The engine's way: the first pass, then the second.
    let mut p = Parsed::default();
    parse_and_prefetch(&buf[..frame.len()], &ctx.ct, &ctx.flows, &mut p);
    let v = switch_parsed(&mut buf, frame.len(), &p, port, &port_mac, &mut ctx);
    (v, buf)
}

fn active(fx: &Fixture) -> Vec<u32> {
    fx.region.backend_counters()[..3]
        .iter()
        .map(|b| b.active.load(Ordering::Relaxed))
        .collect()
}

/// The TCP service's backends get `max_conns` and the service a queue timeout.
fn limit(fx: &Fixture, max: [u32; 3], queue_ms: u16) {
    fx.configure(|s| {
        s.services[0].queue_timeout_ms = queue_ms;
        for (b, m) in s.backends[..3].iter_mut().zip(max) {
            b.max_conns = m;
        }
    });
}

#[test]
fn max_conns_holds_new_connections_and_a_fin_makes_room() {
    let fx = Fixture::new("unit-max", 1 << 12);
    limit(&fx, [1, 1, 1], 250);
    let mut c = [0u64; N_COUNTERS];
    let mut got = Vec::new();
    for port in 43_000..43_003 {
        let (v, buf) = run(&fx, &mut c, &tcp_seg(port, "S"));
        got.push(sent_to(v, &buf).1);
    }
    got.sort();
    assert_eq!(got, [[198, 19, 1, 1], [198, 19, 1, 2], [198, 19, 1, 3]]);
    assert_eq!(active(&fx), [1, 1, 1]);
    // Every backend full: held, nothing counted or changed.
    let held = tcp_seg(43_010, "S");
    let before = c;
    assert_eq!(run(&fx, &mut c, &held).0, Verdict::Hold { timeout_ms: 250 });
    assert_eq!(c, before);
    assert_eq!(active(&fx), [1, 1, 1]);
    // A retransmitted SYN of an admitted connection still gets through.
    let (v, buf) = run(&fx, &mut c, &tcp_seg(43_000, "S"));
    assert_eq!(sent_to(v, &buf).1, got_for(&fx, 43_000));
    // The client of 43_001 closes: its backend has room at once (the
    // entry stays, closing), the held SYN goes there.
    let freed = got_for(&fx, 43_001);
    run(&fx, &mut c, &tcp_seg(43_001, "AF"));
    assert_eq!(active(&fx).iter().sum::<u32>(), 2);
    // A second FIN (the other direction, any switch) gives back nothing.
    run(&fx, &mut c, &tcp_seg(43_001, "AF"));
    assert_eq!(active(&fx).iter().sum::<u32>(), 2);
    let (v, buf) = run(&fx, &mut c, &held);
    assert_eq!(sent_to(v, &buf).1, freed);
    assert_eq!(active(&fx), [1, 1, 1]);
    // Refusing a held SYN answers the client with a RST from the VIP.
    let mut buf = vec![0u8; 2048];
    let f = tcp_seg(43_011, "S");
    buf[..f.len()].copy_from_slice(&f);
    let v = refuse(&mut buf, f.len(), 0, &mut fx.ctx(&mut c));
    let Verdict::Tx { port: 0, len } = v else {
        panic!("{v:?}")
    };
    let p = etherparse::SlicedPacket::from_ethernet(&buf[..len]).unwrap();
    let Some(etherparse::TransportSlice::Tcp(t)) = p.transport else {
        panic!()
    };
    assert!(t.rst() && t.source_port() == 80 && t.destination_port() == 43_011);
    assert_eq!(c[Counter::ConnRefused as usize], 1);
    // Without a queue timeout a full service refuses at once.
    limit(&fx, [1, 1, 1], 0);
    let (v, _) = run(&fx, &mut c, &tcp_seg(43_012, "S"));
    assert!(matches!(v, Verdict::Tx { port: 0, .. }), "{v:?}");
    assert_eq!(c[Counter::ConnRefused as usize], 2);
    assert_eq!(active(&fx), [1, 1, 1]);
}

/// Where the connection from client port `p` went.
fn got_for(fx: &Fixture, p: u16) -> [u8; 4] {
    let hit = fx.region.conntrack().lookup(&FlowKey {
        proto: PROTO_TCP,
        src_ip: 0xc612_6401,
        dst_ip: VIP,
        src_port: p,
        dst_port: 80,
    });
    hit.unwrap().conn().backend_ip.to_be_bytes()
}

/// A packet looked up before its connection's slot was reused (here
/// by a new connection of the same 5-tuple: the old one was retired
/// by another switch or the GC in between) changes nothing of the new
/// connection: an old FIN closing it would give the backend slot back
/// a second time and leave the new connection holding one nobody
/// releases; an old SYN-ACK would mark it established.
#[test]
fn a_stale_hit_changes_no_state_of_the_connection_that_reused_its_slot() {
    let fx = Fixture::new("unit-stalehit", 1 << 12);
    let mut c = [0u64; N_COUNTERS];
    let (v, buf) = run(&fx, &mut c, &tcp_seg(45_000, "S"));
    let backend = sent_to(v, &buf).1;
    let ct = fx.region.conntrack();
    let fin = tcp_seg(45_000, "AF");
    let fin_l4 = parse_ip(&fin).unwrap();
    let synack = reply(backend, 45_000, true);
    let synack_l4 = parse_ip(&synack).unwrap();
    let stale_fin = ct.lookup(&fin_l4.key()).unwrap();
    let stale_synack = ct.lookup(&synack_l4.key()).unwrap();
    assert_eq!(stale_synack.dir, Direction::Reply);
    // Between those lookups and their touches: the connection is
    // retired, its backend slot given back, and a new SYN of the same
    // 5-tuple takes the slot.
    let snap = ct.snapshot(stale_fin.idx).unwrap();
    assert_eq!(ct.retire(stale_fin.idx, &snap, 1), Some(true));
    let id = stale_fin.conn().backend_id as usize;
    sched::release(&fx.region.backend_counters()[id]);
    assert_eq!(active(&fx).iter().sum::<u32>(), 0);
    run(&fx, &mut c, &tcp_seg(45_000, "S"));
    let fresh = ct.lookup(&fin_l4.key()).unwrap();
    assert_eq!(fresh.idx, stale_fin.idx, "the slot was reused");
    assert_eq!(active(&fx)[id], 1);
    let state = || ct.slot(fresh.idx).tcp_state.load(Ordering::Relaxed);
    assert_eq!(state(), STATE_SYN);
    let ctx = fx.ctx(&mut c);
    assert_eq!(
        touch(&ctx, ct.slot(stale_fin.idx), &stale_fin, &fin_l4),
        Moved::Stay
    );
    assert_eq!(state(), STATE_SYN, "the old FIN closed the new connection");
    assert_eq!(
        touch(&ctx, ct.slot(stale_synack.idx), &stale_synack, &synack_l4),
        Moved::Stay
    );
    assert_eq!(state(), STATE_SYN, "the old SYN-ACK established it");
    // The new connection's own FIN closes it and gives its slot back.
    let fresh_fin = ct.lookup(&fin_l4.key()).unwrap();
    assert_eq!(
        touch(&ctx, ct.slot(fresh_fin.idx), &fresh_fin, &fin_l4),
        Moved::Closed
    );
    assert_eq!(state(), STATE_CLOSING);
}

/// An insert that found the flow's entry ([`InsertError::Exists`])
/// takes that entry only if the slot still holds it: here another
/// switch replaced it (retired, then reused by another connection)
/// before the entry was read back.
#[test]
fn an_existing_entry_is_taken_only_while_its_slot_still_holds_it() {
    let fx = Fixture::new("unit-exists", 1 << 12);
    let mut c = [0u64; N_COUNTERS];
    run(&fx, &mut c, &tcp_seg(46_000, "S"));
    let ct = fx.region.conntrack();
    let key = parse_ip(&tcp_seg(46_000, "S")).unwrap().key();
    let mine = ct.lookup(&key).unwrap();
    assert_eq!(existing(&ct, mine.idx, &mine.conn()), Some(mine.conn()));
    // The slot now holds another connection: a client port whose key
    // starts its probe in the same slot.
    let snap = ct.snapshot(mine.idx).unwrap();
    assert!(ct.retire(mine.idx, &snap, 1).is_some());
    let other = (1..=u16::MAX)
        .map(|p| Conn {
            client_port: p,
            ..mine.conn()
        })
        .find(|o| o.client_port != 46_000 && ct.home(&o.forward_key()) == mine.idx as usize)
        .expect("a port with the same home slot");
    let ins = ct
        .insert(&other, false, fx.region.now_ms(), STATE_SYN, 1, |_| false)
        .unwrap();
    assert_eq!(ins.idx, mine.idx, "the other connection took the slot");
    assert_eq!(existing(&ct, mine.idx, &mine.conn()), None);
    // A slot left a tombstone holds no entry either.
    let snap = ct.snapshot(mine.idx).unwrap();
    assert!(ct.retire(mine.idx, &snap, 1).is_some());
    assert_eq!(existing(&ct, mine.idx, &mine.conn()), None);
}

#[test]
fn a_syn_reusing_a_closed_connections_tuple_is_scheduled_afresh() {
    let fx = Fixture::new("unit-reuse", 1 << 12);
    limit(&fx, [1, 1, 1], 100);
    let mut c = [0u64; N_COUNTERS];
    run(&fx, &mut c, &tcp_seg(44_000, "S"));
    run(&fx, &mut c, &tcp_seg(44_000, "R"));
    assert_eq!(active(&fx).iter().sum::<u32>(), 0);
    let (v, _) = run(&fx, &mut c, &tcp_seg(44_000, "S"));
    assert!(matches!(v, Verdict::Tx { port: 1, .. }), "{v:?} {c:?}");
    assert_eq!(active(&fx).iter().sum::<u32>(), 1, "counted again");
    assert_eq!(c[Counter::ConnNew as usize], 2);
}

#[test]
fn the_syn_ack_folds_one_latency_sample_into_its_backend() {
    let fx = Fixture::new("unit-synack", 1 << 12);
    fx.configure(|s| s.services[0].latency_target_ms = 5);
    let mut c = [0u64; N_COUNTERS];
    let (v, buf) = run(&fx, &mut c, &tcp_seg(45_000, "S"));
    let to = sent_to(v, &buf).1;
    let id = tcp_id(to) as usize;
    // Let the SYN be old: 20 ms before now (over the 5 ms target).
    let mut ctx_c = [0u64; N_COUNTERS];
    let mut buf = vec![0u8; 2048];
    let f = reply(to, 45_000, true);
    buf[..f.len()].copy_from_slice(&f);
    let mut ctx = fx.ctx(&mut ctx_c);
    ctx.now_ms = ctx.now_ms.wrapping_add(20);
    assert!(matches!(
        process(&mut buf, f.len(), 1, &port_mac, &mut ctx),
        Verdict::Tx { port: 0, .. }
    ));
    let b = &fx.region.backend_counters()[id];
    let (n, sum, slow) = (
        b.syn_ack_count.load(Ordering::Relaxed),
        b.syn_ack_sum_ms.load(Ordering::Relaxed),
        b.syn_ack_slow.load(Ordering::Relaxed),
    );
    assert_eq!((n, slow), (1, 1));
    assert!((20..=22).contains(&sum), "{sum}");
    // A retransmitted SYN-ACK or data adds nothing.
    run_on(&fx, &mut c, 1, &reply(to, 45_000, true));
    run_on(&fx, &mut c, 1, &reply(to, 45_000, false));
    assert_eq!(b.syn_ack_count.load(Ordering::Relaxed), 1);
}

#[test]
fn weight_zero_drains_under_every_scheduler() {
    use shm_layout::config_slot::{BACKEND_DRAINED, SCHED_MAGLEV, SCHED_SH, SCHED_WLC, SCHED_WRR};
    for sched in [SCHED_MAGLEV, SCHED_WRR, SCHED_WLC, SCHED_SH] {
        let fx = Fixture::new(&format!("unit-drain{sched}"), 1 << 12);
        fx.configure(|s| s.services[0].scheduler = sched);
        let mut c = [0u64; N_COUNTERS];
        // Connections to every backend, from several clients.
        let mut open = Vec::new();
        for port in 46_000..46_030 {
            let (v, buf) = run(&fx, &mut c, &tcp_seg(port, "S"));
            open.push((port, sent_to(v, &buf).1));
        }
        let drained = open[0].1;
        let did = tcp_id(drained) as usize;
        // Drain it as the master does: weight 0, flagged, out of the table.
        fx.configure(|s| {
            s.services[0].scheduler = sched;
            let b = &mut s.backends[did];
            b.weight = 0;
            b.flags = BACKEND_DRAINED;
            let keep: Vec<u16> = (0..3u16).filter(|&i| i as usize != did).collect();
            let m = s.services[0].table_len as usize;
            for (i, e) in s.maglev[..m].iter_mut().enumerate() {
                *e = keep[i % 2];
            }
        });
        for &(port, to) in &open {
            let (v, buf) = run(&fx, &mut c, &tcp_seg(port, "A"));
            assert_eq!(
                sent_to(v, &buf).1,
                to,
                "scheduler {sched}: existing continue"
            );
        }
        for port in 47_000..47_060 {
            let (v, buf) = run(&fx, &mut c, &tcp_seg(port, "S"));
            assert_ne!(sent_to(v, &buf).1, drained, "scheduler {sched}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]
    /// Any bytes, any claimed length: runts, and frames other than IPv4
    /// from or to a MAC the port refuses, are dropped for exactly that; anything else gets a verdict that keeps
    /// the filter's promises (see [`check_verdict`]).
    #[test]
    fn random_frames_get_a_sound_verdict(bytes in proptest::collection::vec(any::<u8>(), 0..200), extra in 0usize..64) {
        thread_local!(static FX: Fixture = Fixture::new(&format!("unit-fuzz-{:?}", std::thread::current().id()).replace(|c: char| !c.is_ascii_alphanumeric(), ""), 1 << 12));
        FX.with(|fx| {
            let mut c = [0u64; N_COUNTERS];
            let mut buf = vec![0u8; 2048];
            buf[..bytes.len()].copy_from_slice(&bytes);
            let len = bytes.len() + extra;
            let v = process(&mut buf, len, 0, &port_mac, &mut fx.ctx(&mut c));
            let moved = check_verdict(v, &buf, &c)?;
            let own = [2, 0, 0, 0, 0, 1];
            let (dst, src) = (&buf[..6], &buf[6..12]);
            if len < 14 {
                prop_assert_eq!(moved, vec![Counter::DropMalformed.name()]);
            } else if buf[12..14] == [8, 0] {
                // IPv4 meets the L2 rules where each pass applies them
                // (a malformed header may be refused first).
            } else if [[0x81, 0], [0x88, 0xa8], [0x91, 0]].contains(&[buf[12], buf[13]]) {
                prop_assert_eq!(moved, vec![Counter::DropVlan.name()]);
            } else if src[0] & 1 == 1 || src == [0; 6] || src == own {
                prop_assert_eq!(moved, vec![Counter::DropL2Src.name()]);
            } else if dst != own && !(buf[12..14] == [8, 6] && dst == [0xff; 6]) {
                prop_assert_eq!(moved, vec![Counter::DropL2Dest.name()]);
            }
            Ok(())
        })?;
    }

    /// A well-formed Ethernet header to the port's MAC over arbitrary IPv4
    /// bytes: the same promises, and a bad header checksum is malformed.
    #[test]
    fn random_ipv4_packets_get_a_sound_verdict(ip in proptest::collection::vec(any::<u8>(), 20..200), fix_sum: bool) {
        thread_local!(static FX: Fixture = Fixture::new(&format!("unit-fuzz4-{:?}", std::thread::current().id()).replace(|c: char| !c.is_ascii_alphanumeric(), ""), 1 << 12));
        FX.with(|fx| {
            let mut c = [0u64; N_COUNTERS];
            let mut buf = vec![0u8; 2048];
            buf[..6].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
            buf[6..12].copy_from_slice(&CLIENT_GW_MAC);
            buf[12..14].copy_from_slice(&[0x08, 0x00]);
            buf[14..14 + ip.len()].copy_from_slice(&ip);
            buf[14] = 0x45;
            if fix_sum {
                buf[24..26].copy_from_slice(&[0, 0]);
                let s = checksum::ipv4_header(&buf[14..34]);
                buf[24..26].copy_from_slice(&s.to_be_bytes());
            }
            let hdr: [u8; 20] = buf[14..34].try_into().unwrap();
            let sum_ok = checksum::ipv4_header_ok(&hdr);
            let len = 14 + ip.len();
            let v = process(&mut buf, len, 0, &port_mac, &mut fx.ctx(&mut c));
            let moved = check_verdict(v, &buf, &c)?;
            if !sum_ok {
                prop_assert_eq!(moved, vec![Counter::DropMalformed.name()]);
            }
            Ok(())
        })?;
    }
}

/// The filter's promises for any input: a drop counts its reason (exactly
/// one counter that names a drop, a limit or a held fragment moves, and no
/// forwarding counter); a transmitted frame goes out of a real port, fits
/// the buffer, and is a frame with an Ethernet header, and when it is IPv4,
/// a valid header checksum. Returns the names of the counters that moved.
fn check_verdict(
    v: Verdict,
    buf: &[u8],
    c: &[u64; N_COUNTERS],
) -> Result<Vec<&'static str>, TestCaseError> {
    let moved: Vec<&'static str> = Counter::ALL
        .iter()
        .filter(|k| c[**k as usize] != 0)
        .map(|k| k.name())
        .collect();
    match v {
        Verdict::Drop => {
            let reasons: Vec<_> = moved
                .iter()
                .filter(|n| {
                    n.starts_with("drop_") || n.ends_with("_rate_limited") || **n == "frag_held"
                })
                .collect();
            prop_assert_eq!(reasons.len(), 1, "one reason for a drop: {:?}", moved);
        }
        Verdict::Tx { port, len } => {
            prop_assert!(port < 2, "port {}", port);
            prop_assert!((14..=buf.len()).contains(&len), "length {}", len);
            prop_assert!(
                !moved.iter().any(|n| n.starts_with("drop_")),
                "transmitted yet counted a drop: {:?}",
                moved
            );
            if buf[12..14] == [0x08, 0x00] {
                prop_assert!(len >= 34, "IPv4 frame of {} bytes", len);
                let hdr: [u8; 20] = buf[14..34].try_into().unwrap();
                prop_assert!(checksum::ipv4_header_ok(&hdr), "IPv4 header checksum");
            }
        }
        Verdict::Hold { .. } => prop_assert!(false, "held, with no backend limit configured"),
    }
    Ok(moved)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    /// Header errors the common-case parse must catch: each is dropped
    /// and counted as malformed (or a fragment), whichever pass sees it.
    #[test]
    fn bad_headers_are_dropped_by_both_paths(port in 1024u16..65000, two_pass in any::<bool>()) {
        thread_local!(static FX: Fixture = Fixture::new(&format!("unit-badhdr-{:?}", std::thread::current().id()).replace(|c: char| !c.is_ascii_alphanumeric(), ""), 1 << 12));
        FX.with(|fx| {
            type Damage = fn(&mut [u8]);
            let cases: [(&str, Damage, Counter); 6] = [
                ("IPv4 checksum", |f| f[24] ^= 0x40, Counter::DropMalformed),
                ("total length past the frame", |f| f[17] = 200, Counter::DropMalformed),
                ("TCP data offset below 5", |f| f[46] = 0x40, Counter::DropMalformed),
                ("TCP data offset past the packet", |f| f[46] = 0xf0, Counter::DropMalformed),
                ("version 6", |f| f[14] = 0x65, Counter::DropMalformed),
                ("a fragment", |f| { f[20] = 0x20; fix_ip_checksum(f) }, Counter::DropFragment),
            ];
            for (what, damage, counter) in cases {
                let mut f = syn(port);
                damage(&mut f);
                let mut c = [0u64; N_COUNTERS];
                let mut buf = vec![0u8; 2048];
                buf[..f.len()].copy_from_slice(&f);
                let mut ctx = fx.ctx(&mut c);
                let v = if two_pass {
                    let mut p = Parsed::default();
                    parse_and_prefetch(&buf[..f.len()], &ctx.ct, &ctx.flows, &mut p);
                    switch_parsed(&mut buf, f.len(), &p, 0, &port_mac, &mut ctx)
                } else {
                    process(&mut buf, f.len(), 0, &port_mac, &mut ctx)
                };
                prop_assert_eq!(v, Verdict::Drop, "{}", what);
                prop_assert_eq!(c[counter as usize], 1, "{}", what);
            }
            Ok(())
        })?;
    }

    /// The engine's two passes (`parse_and_prefetch`, then `switch_parsed`) give the
    /// same verdict and the same bytes out as `process` alone, for
    /// valid frames of every kind with any byte of their headers
    /// changed. (A connection the first run creates is found by the
    /// second, which then forwards it the same way.)
    #[test]
    fn the_two_pass_path_matches_process(
        kind in 0usize..4,
        at in 0usize..60,
        val in any::<u8>(),
        port in 1024u16..65000,
        extra in 0usize..8,
    ) {
        thread_local!(static FX: Fixture = Fixture::new(&format!("unit-twopass-{:?}", std::thread::current().id()).replace(|c: char| !c.is_ascii_alphanumeric(), ""), 1 << 14));
        FX.with(|fx| {
            let mut f = match kind {
                0 => syn(port),
                1 => tcp_seg(port, "A"),
                2 => udp_dgram(port),
                _ => reply([198, 19, 1, 2], port, false),
            };
            if at < f.len() {
                f[at] = val;
            }
            let len = f.len() + extra;
            let mut c = [0u64; N_COUNTERS];
            let mut one = vec![0u8; 2048];
            one[..f.len()].copy_from_slice(&f);
            let mut two = one.clone();
            let mut ctx = fx.ctx(&mut c);
            let v1 = process(&mut one, len, 0, &port_mac, &mut ctx);
            let mut p = Parsed::default();
            parse_and_prefetch(&two[..len], &ctx.ct, &ctx.flows, &mut p);
            let v2 = switch_parsed(&mut two, len, &p, 0, &port_mac, &mut ctx);
            prop_assert_eq!(v1, v2);
            prop_assert!(one == two, "different bytes out");
            Ok(())
        })?;
    }

    /// Valid SYNs with corrupted bytes anywhere past the Ethernet header:
    /// dropped (and counted) or forwarded, never a panic; counts add up.
    #[test]
    fn corrupted_syns_are_counted(at in 14usize..54, val in any::<u8>(), port in 1024u16..65000) {
        thread_local!(static FX: Fixture = Fixture::new(&format!("unit-corrupt-{:?}", std::thread::current().id()).replace(|c: char| !c.is_ascii_alphanumeric(), ""), 1 << 14));
        FX.with(|fx| {
            let mut f = syn(port);
            f[at] = val;
            let mut c = [0u64; N_COUNTERS];
            let (v, _) = run(fx, &mut c, &f);
            let drops: u64 = Counter::ALL.iter().filter(|k| k.name().starts_with("drop_")).map(|k| c[*k as usize]).sum();
            match v {
                Verdict::Drop => prop_assert!(drops >= 1),
                Verdict::Tx { .. } => prop_assert_eq!(drops, c[Counter::DropTcpNoEntry as usize]),
                Verdict::Hold { .. } => prop_assert!(false, "held without a limit"),
            }
            Ok(())
        })?;
    }
}
