//! Provisional entries, half-open entries, martians and impossible
//! packets (issue 22 items 1 and 5).

use super::super::parse::parse_ip_common;
use super::*;
use shm_layout::conntrack::{STATE_ESTABLISHED, STATE_PROVISIONAL, STATE_SYN_ACKED};

// ---- Provisional entries, half-open entries, martians (issue 22) ----

/// [`run_on`] at the time `now_ms` (the filter's clock) and with
/// `tokens` answer tokens.
fn run_at(
    fx: &Fixture,
    c: &mut [u64; N_COUNTERS],
    port: u32,
    frame: &[u8],
    now_ms: u32,
    tokens: u32,
) -> (Verdict, Vec<u8>) {
    let mut buf = vec![0u8; 2048];
    buf[..frame.len()].copy_from_slice(frame);
    let mut ctx = fx.ctx(c);
    ctx.now_ms = now_ms;
    ctx.icmp_tokens = tokens;
    let v = process(&mut buf, frame.len(), port, &port_mac, &mut ctx);
    (v, buf)
}

/// The state of the entry of a client-to-VIP frame.
fn state_of(fx: &Fixture, frame: &[u8]) -> u32 {
    let ct = fx.region.conntrack();
    let hit = ct.lookup(&parse_ip_common(frame).unwrap().key()).unwrap();
    ct.slot(hit.idx).tcp_state.load(Ordering::Relaxed)
}

/// A client segment to the tunnel service (port 443).
fn tunnel_seg(client_port: u16, flags: &str) -> Vec<u8> {
    let mut f = tcp_seg(client_port, flags);
    f[36..38].copy_from_slice(&443u16.to_be_bytes());
    let ip = etherparse::Ipv4HeaderSlice::from_slice(&f[14..34])
        .unwrap()
        .to_header();
    let tcp = etherparse::TcpHeaderSlice::from_slice(&f[34..54])
        .unwrap()
        .to_header();
    let sum = tcp.calc_checksum_ipv4(&ip, &f[54..]).unwrap();
    f[50..52].copy_from_slice(&sum.to_be_bytes());
    f
}

/// A lone ACK with no entry is forwarded (mid-flow pickup) and creates
/// a provisional entry: no backend reservation, and the short timeout.
#[test]
fn a_lone_ack_creates_a_provisional_entry_that_expires_after_the_short_timeout() {
    let fx = Fixture::new("unit-prov", 1 << 12);
    let mut c = [0u64; N_COUNTERS];
    let ack = tcp_seg(46_000, "A");
    let (v, buf) = run_at(&fx, &mut c, 0, &ack, 1_000, 0);
    sent_to(v, &buf);
    assert_eq!(c[Counter::ConnMidflow as usize], 1);
    assert_eq!(state_of(&fx, &ack), STATE_PROVISIONAL);
    assert_eq!(
        active(&fx),
        [0, 0, 0],
        "a provisional entry reserves nothing"
    );
    let ct = fx.region.conntrack();
    let idx = ct
        .lookup(&parse_ip_common(&ack).unwrap().key())
        .unwrap()
        .idx;
    let t = fx.ctx(&mut c).timeouts;
    assert_eq!(t.tcp_provisional_ms, 3_000);
    assert!(!ct.slot(idx).expired(1_000 + 3_000, &t));
    assert!(ct.slot(idx).expired(1_000 + 3_001, &t));
    // Expired, the GC's retire releases nothing.
    let snap = ct.snapshot(idx).unwrap();
    assert_eq!(ct.retire(idx, &snap, 1), Some(false));
}

/// NAT: the backend's SYN-ACK does not establish a connection; the
/// client's ACK after it does. A provisional entry is confirmed by a
/// reply from its backend, and only then reserves a backend slot.
#[test]
fn a_backend_syn_ack_alone_does_not_establish_and_a_reply_confirms_a_pickup() {
    let fx = Fixture::new("unit-synack", 1 << 12);
    let mut c = [0u64; N_COUNTERS];
    let (v, buf) = run_at(&fx, &mut c, 0, &tcp_seg(46_001, "S"), 1_000, 0);
    let backend = sent_to(v, &buf).1;
    let syn = tcp_seg(46_001, "S");
    assert_eq!(state_of(&fx, &syn), STATE_SYN);
    let (v, _) = run_at(&fx, &mut c, 1, &reply(backend, 46_001, true), 1_001, 0);
    assert!(matches!(v, Verdict::Tx { port: 0, .. }), "{v:?}");
    assert_eq!(
        state_of(&fx, &syn),
        STATE_SYN_ACKED,
        "not established by the backend"
    );
    let id = tcp_id(backend) as usize;
    assert_eq!(
        fx.region.backend_counters()[id]
            .syn_ack_count
            .load(Ordering::Relaxed),
        1
    );
    run_at(&fx, &mut c, 0, &tcp_seg(46_001, "A"), 1_002, 0);
    assert_eq!(state_of(&fx, &syn), STATE_ESTABLISHED, "the client's ACK");
    assert_eq!(active(&fx).iter().sum::<u32>(), 1);

    // A pickup: provisional until the backend answers.
    let ack = tcp_seg(46_002, "A");
    let (v, buf) = run_at(&fx, &mut c, 0, &ack, 2_000, 0);
    let backend = sent_to(v, &buf).1;
    assert_eq!(state_of(&fx, &ack), STATE_PROVISIONAL);
    run_at(&fx, &mut c, 0, &ack, 3_500, 0);
    assert_eq!(
        state_of(&fx, &ack),
        STATE_PROVISIONAL,
        "NAT waits for the reply"
    );
    run_at(&fx, &mut c, 1, &reply(backend, 46_002, false), 3_600, 0);
    assert_eq!(state_of(&fx, &ack), STATE_ESTABLISHED);
    assert_eq!(c[Counter::ConnConfirmed as usize], 1);
    assert_eq!(active(&fx).iter().sum::<u32>(), 2, "confirmed: it reserves");
}

/// NAT: a pickup the backend answers with a RST (it knows no such
/// connection: a spoofed segment) is not confirmed, releases nothing,
/// and stays provisional (its short timeout, not `tcp_fin`'s, ends it).
#[test]
fn a_pickup_the_backend_resets_stays_provisional_and_releases_nothing() {
    let fx = Fixture::new("unit-prov-rst", 1 << 12);
    let mut c = [0u64; N_COUNTERS];
    let ack = tcp_seg(46_003, "A");
    let (v, buf) = run_at(&fx, &mut c, 0, &ack, 1_000, 0);
    let backend = sent_to(v, &buf).1;
    let mut rst = Vec::new();
    PacketBuilder::ethernet2([2, 0, 0, 0, 1, backend[3]], [2, 0, 0, 0, 0, 2])
        .ipv4(backend, [198, 18, 100, 1], 64)
        .tcp(8080, 46_003, 2, 0)
        .rst()
        .write(&mut rst, &[])
        .unwrap();
    let (v, _) = run_at(&fx, &mut c, 1, &rst, 1_001, 0);
    assert!(
        matches!(v, Verdict::Tx { port: 0, .. }),
        "the RST reaches the client"
    );
    assert_eq!(state_of(&fx, &ack), STATE_PROVISIONAL);
    assert_eq!(c[Counter::ConnConfirmed as usize], 0);
    let b = &fx.region.backend_counters()[tcp_id(backend) as usize];
    assert_eq!(b.active.load(Ordering::Relaxed), 0);
    assert_eq!(b.released.load(Ordering::Relaxed), 0, "nothing to release");
}

/// A pickup whose backend is DOWN under policy reset is answered with
/// a RST and gives back no backend slot: it never held one (here the
/// backend's one slot belongs to another connection and stays taken).
#[test]
fn a_provisional_entry_reset_for_a_down_backend_releases_nothing() {
    let fx = Fixture::new("unit-prov-down", 1 << 12);
    let mut c = [0u64; N_COUNTERS];
    let ack = tcp_seg(46_005, "A");
    let (v, buf) = run_at(&fx, &mut c, 0, &ack, 1_000, 0);
    let id = tcp_id(sent_to(v, &buf).1);
    let b = &fx.region.backend_counters()[id as usize];
    sched::reserve(b, 0);
    fx.mark_down(&[(id, ON_DOWN_RESET)]);
    let (v, _) = run_at(&fx, &mut c, 0, &ack, 1_001, 0);
    assert!(matches!(v, Verdict::Tx { port: 0, .. }), "{v:?}");
    assert_eq!(c[Counter::DownRst as usize], 1);
    assert_eq!(
        b.active.load(Ordering::Relaxed),
        1,
        "the other connection's slot"
    );
}

/// Tunnel (one-armed, no reply seen): a pickup is confirmed by a
/// further client packet at least 1 s after it, not sooner.
#[test]
fn a_tunnel_pickup_is_confirmed_by_a_client_packet_a_second_later() {
    let fx = Fixture::new("unit-prov-tun", 1 << 12);
    let mut c = [0u64; N_COUNTERS];
    let ack = tunnel_seg(46_004, "A");
    let (v, _) = run_at(&fx, &mut c, 0, &ack, 10_000, 0);
    assert!(matches!(v, Verdict::Tx { port: 1, .. }), "{v:?}");
    assert_eq!(state_of(&fx, &ack), STATE_PROVISIONAL);
    run_at(&fx, &mut c, 0, &ack, 10_999, 0);
    assert_eq!(state_of(&fx, &ack), STATE_PROVISIONAL, "too soon");
    run_at(&fx, &mut c, 0, &ack, 11_000, 0);
    assert_eq!(state_of(&fx, &ack), STATE_ESTABLISHED);
    assert_eq!(c[Counter::ConnConfirmed as usize], 1);
    let reserved: u32 = fx.region.backend_counters()[6..9]
        .iter()
        .map(|b| b.active.load(Ordering::Relaxed))
        .sum();
    assert_eq!(reserved, 1);
}

/// A table filled by a flood of spoofed ACKs and SYNs still takes a
/// new connection's SYN: it evicts a provisional or half-open entry,
/// counted, and the backends' `active` counts stay exact.
#[test]
fn a_flooded_table_still_takes_a_new_syn() {
    let fx = Fixture::new("unit-flood", 64);
    let mut c = [0u64; N_COUNTERS];
    for i in 0..400u16 {
        let mut f = tcp_seg(1_000 + i, if i % 2 == 0 { "A" } else { "S" });
        f[28] = (i >> 8) as u8 + 10;
        f[29] = i as u8;
        fix_ip_checksum(&mut f);
        run_at(&fx, &mut c, 0, &f, 1_000, 0);
    }
    let evicted = c[Counter::EvictedProvisional as usize] + c[Counter::EvictedHalfOpen as usize];
    assert!(evicted > 0, "the flood filled the table");
    let before = c[Counter::DropTableFull as usize];
    let (v, buf) = run_at(&fx, &mut c, 0, &tcp_seg(50_000, "S"), 1_001, 0);
    sent_to(v, &buf);
    assert_eq!(c[Counter::DropTableFull as usize], before);
    // Every reservation is an entry holding one.
    let ct = fx.region.conntrack();
    let mut held = [0u32; 3];
    for idx in 0..ct.capacity() as u32 {
        if let Some(conn) = ct.snapshot(idx).and_then(|s| s.conn())
            && shm_layout::conntrack::holds_reservation(
                ct.slot(idx).tcp_state.load(Ordering::Relaxed),
            )
        {
            held[conn.backend_id as usize] += 1;
        }
    }
    assert_eq!(active(&fx), held);
}

/// Packets that should never pass: martian sources, impossible TCP
/// flag sets, UDP lengths that disagree with the IP length. Each is
/// dropped and counted, and none creates an entry.
#[test]
fn impossible_packets_are_dropped_and_counted() {
    let fx = Fixture::new("unit-martian", 1 << 12);
    let mut c = [0u64; N_COUNTERS];
    let martians: [[u8; 4]; 8] = [
        [0, 0, 0, 0],
        [0, 1, 2, 3],
        [255, 255, 255, 255],
        [127, 0, 0, 1],
        [224, 0, 0, 5],
        [240, 0, 0, 1],
        VIP.to_be_bytes(),
        [198, 19, 1, 2], // a backend, arriving on the client side
    ];
    for (n, src) in martians.iter().enumerate() {
        for flags in ["S", "A"] {
            let mut f = tcp_seg(47_000 + n as u16, flags);
            f[26..30].copy_from_slice(src);
            fix_ip_checksum(&mut f);
            let (v, _) = run_at(&fx, &mut c, 0, &f, 1_000, 0);
            assert_eq!(v, Verdict::Drop, "source {src:?} flags {flags}");
        }
    }
    assert_eq!(c[Counter::DropMartian as usize], 16);
    for (n, flags) in ["SF", "SR", ""].iter().enumerate() {
        let f = tcp_seg(47_100 + n as u16, flags);
        let (v, _) = run_at(&fx, &mut c, 0, &f, 1_000, 0);
        assert_eq!(v, Verdict::Drop, "flags {flags:?}");
    }
    assert_eq!(c[Counter::DropBadFlags as usize], 3);
    // UDP length 8 + 5 in a datagram the IP header says is longer.
    let mut u = udp_dgram(47_200);
    u.extend_from_slice(&[0; 4]);
    let total = (u.len() - 14) as u16;
    u[16..18].copy_from_slice(&total.to_be_bytes());
    fix_ip_checksum(&mut u);
    let (v, _) = run_at(&fx, &mut c, 0, &u, 1_000, 0);
    assert_eq!(v, Verdict::Drop);
    assert_eq!(c[Counter::DropUdpLength as usize], 1);
    assert_eq!(
        c[Counter::ConnNew as usize] + c[Counter::ConnMidflow as usize],
        0
    );
    // The backend's address from the backend side is no martian: a
    // NAT reply without an entry is simply not ours.
    let (v, _) = run_at(
        &fx,
        &mut c,
        1,
        &reply([198, 19, 1, 2], 47_300, false),
        1_000,
        0,
    );
    assert_eq!(v, Verdict::Drop);
    assert_eq!(c[Counter::DropMartian as usize], 16);
}

/// RSTs for a VIP port without a service come out of the answer budget.
#[test]
fn rsts_for_unserved_ports_are_rate_limited() {
    let fx = Fixture::new("unit-rst-rate", 1 << 12);
    let mut c = [0u64; N_COUNTERS];
    let mut f = tcp_seg(48_000, "S");
    f[36..38].copy_from_slice(&81u16.to_be_bytes());
    let ip = etherparse::Ipv4HeaderSlice::from_slice(&f[14..34])
        .unwrap()
        .to_header();
    let tcp = etherparse::TcpHeaderSlice::from_slice(&f[34..54])
        .unwrap()
        .to_header();
    let sum = tcp.calc_checksum_ipv4(&ip, &f[54..]).unwrap();
    f[50..52].copy_from_slice(&sum.to_be_bytes());
    let (v, _) = run_at(&fx, &mut c, 0, &f, 1_000, 1);
    assert!(matches!(v, Verdict::Tx { port: 0, .. }), "{v:?}");
    assert_eq!(c[Counter::RstSent as usize], 1);
    let (v, _) = run_at(&fx, &mut c, 0, &f, 1_000, 0);
    assert_eq!(v, Verdict::Drop);
    assert_eq!(c[Counter::RstRateLimited as usize], 1);
    assert_eq!(c[Counter::RstSent as usize], 1);
}

/// A backend retransmits its SYN-ACK to a client that never answers (a
/// spoofed SYN): the retransmissions must not keep the half-open entry
/// alive, or a flood's entries outlive `tcp_syn` by the backend's whole
/// retry span (about a minute on Linux). The client's own packets do
/// refresh it.
#[test]
fn backend_syn_ack_retransmissions_do_not_keep_a_half_open_entry() {
    let fx = Fixture::new("unit-synack-rexmit", 1 << 12);
    let mut c = [0u64; N_COUNTERS];
    let syn = tcp_seg(46_101, "S");
    let (v, buf) = run_at(&fx, &mut c, 0, &syn, 1_000, 0);
    let backend = sent_to(v, &buf).1;
    let last_seen = |fx: &Fixture| {
        let ct = fx.region.conntrack();
        let hit = ct.lookup(&parse_ip_common(&syn).unwrap().key()).unwrap();
        ct.slot(hit.idx).last_seen.load(Ordering::Relaxed)
    };
    for at in [2_000, 4_000, 8_000] {
        let (v, _) = run_at(&fx, &mut c, 1, &reply(backend, 46_101, true), at, 0);
        assert!(matches!(v, Verdict::Tx { port: 0, .. }), "{v:?}");
        assert_eq!(last_seen(&fx), 1_000, "SYN-ACK at {at} ms refreshed it");
    }
    assert_eq!(state_of(&fx, &syn), STATE_SYN_ACKED);
    // The client's retransmitted SYN does.
    run_at(&fx, &mut c, 0, &syn, 9_000, 0);
    assert_eq!(last_seen(&fx), 9_000);
}
