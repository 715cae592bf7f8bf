//! The SYN proxy (issue 15 item 2): cookies, the backend's handshake, the
//! sequence translation, exact bytes and numbers.

use super::*;
use etherparse::TcpOptionElement;
use shm_layout::config_slot::{SVC_SYN_PROXY, SVC_SYN_PROXY_AUTO};
use shm_layout::conntrack::{CONN_SYNPROXY, STATE_ESTABLISHED, STATE_SYNPROXY, Splice};
use wire::syncookie::{self, Tuple};

const K1: [u64; 2] = [0x0123_4567_89ab_cdef, 0x0fed_cba9_8765_4321];
const K2: [u64; 2] = [0x1111_2222_3333_4444, 0x5555_6666_7777_8888];
const CLIENT: [u8; 4] = [198, 18, 100, 1];
const ISN: u32 = 0x1000_0000;
/// The backend's ISN in these tests.
const BISN: u32 = 0xabcd_0000;
/// The filter's clock in these tests (cookie step 3).
const NOW: u32 = 3 * 65_536 + 1234;

/// The fixture with service 0 (VIP:80 TCP NAT) proxied with `flags`
/// and the secrets `[current, previous]`.
fn proxied(tag: &str, flags: u8, secrets: [[u64; 2]; 2]) -> Fixture {
    let fx = Fixture::new(tag, 1 << 12);
    fx.configure(move |s| {
        s.services[0].flags = flags;
        s.header.cookie_secrets = secrets;
    });
    fx
}

/// A client segment to VIP:80 from CLIENT:`cport`.
fn client_seg(
    cport: u16,
    seq: u32,
    ack: Option<u32>,
    syn: bool,
    opts: &[TcpOptionElement],
    payload: &[u8],
) -> Vec<u8> {
    let mut b = PacketBuilder::ethernet2(CLIENT_GW_MAC, [2, 0, 0, 0, 0, 1])
        .ipv4(CLIENT, VIP.to_be_bytes(), 64)
        .tcp(cport, 80, seq, 5000);
    if syn {
        b = b.syn();
    }
    if let Some(a) = ack {
        b = b.ack(a);
    }
    let b = b.options(opts).unwrap();
    let mut v = Vec::new();
    b.write(&mut v, payload).unwrap();
    v
}

/// A backend (`bip`) segment to CLIENT:`cport` from port 8080.
fn backend_seg(
    bip: [u8; 4],
    cport: u16,
    seq: u32,
    ack: u32,
    flags: &str,
    payload: &[u8],
) -> Vec<u8> {
    let mut b = PacketBuilder::ethernet2([2, 0, 0, 0, 1, bip[3]], [2, 0, 0, 0, 0, 2])
        .ipv4(bip, CLIENT, 64)
        .tcp(8080, cport, seq, 7000)
        .ack(ack);
    for f in flags.chars() {
        b = match f {
            'S' => b.syn(),
            'F' => b.fin(),
            'R' => b.rst(),
            _ => b,
        };
    }
    let mut v = Vec::new();
    b.write(&mut v, payload).unwrap();
    v
}

/// Runs `frame` through the filter at `now_ms` with `tokens` answer tokens.
fn go(
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
    let mut p = Parsed::default();
    parse_and_prefetch(&buf[..frame.len()], &ctx.ct, &ctx.flows, &mut p);
    let v = switch_parsed(&mut buf, frame.len(), &p, port, &port_mac, &mut ctx);
    (v, buf)
}

fn tuple(cport: u16) -> Tuple {
    Tuple {
        client_ip: u32::from_be_bytes(CLIENT),
        client_port: cport,
        vip: VIP,
        vip_port: 80,
    }
}

fn mss_of(t: &etherparse::TcpHeader) -> Option<u16> {
    t.options.elements_iter().find_map(|o| match o {
        Ok(TcpOptionElement::MaximumSegmentSize(m)) => Some(m),
        _ => None,
    })
}

fn forward_key(cport: u16) -> FlowKey {
    FlowKey {
        proto: PROTO_TCP,
        src_ip: u32::from_be_bytes(CLIENT),
        dst_ip: VIP,
        src_port: cport,
        dst_port: 80,
    }
}

/// The SYN, the cookie SYN-ACK: its exact fields; returns the cookie.
fn cookie_handshake(fx: &Fixture, c: &mut [u64; N_COUNTERS], cport: u16, mss: Option<u16>) -> u32 {
    let opts: Vec<_> = mss
        .map(TcpOptionElement::MaximumSegmentSize)
        .into_iter()
        .collect();
    let (v, out) = go(
        fx,
        c,
        0,
        &client_seg(cport, ISN, None, true, &opts, &[]),
        NOW,
        100,
    );
    let Verdict::Tx { port: 0, len: 58 } = v else {
        panic!("SYN: {v:?}")
    };
    let (ip, t) = checked_tcp(&out[14..58]);
    assert_eq!((ip.source, ip.destination), (VIP.to_be_bytes(), CLIENT));
    assert_eq!((t.source_port, t.destination_port), (80, cport));
    assert!(t.syn && t.ack && !t.rst && !t.fin);
    assert_eq!(t.acknowledgment_number, ISN + 1);
    assert_eq!(t.window_size, 65535);
    // The MSS offered: the fixture's ports have an MTU of 1500.
    assert_eq!(mss_of(&t), Some(1460));
    // MACs swapped: back to the client's gateway from port 0's MAC.
    assert_eq!(
        &out[..12],
        &[CLIENT_GW_MAC, [2, 0, 0, 0, 0, 1]].concat()[..]
    );
    let want = syncookie::make(K1, &tuple(cport), 3, ISN, syncookie::mss_index(mss));
    assert_eq!(t.sequence_number, want);
    t.sequence_number
}

/// The client's ACK of the cookie: the SYN to the backend; returns the
/// backend's address.
fn cookie_ack(
    fx: &Fixture,
    c: &mut [u64; N_COUNTERS],
    cport: u16,
    cookie: u32,
    want_mss: u16,
) -> [u8; 4] {
    let (v, out) = go(
        fx,
        c,
        0,
        &client_seg(cport, ISN + 1, Some(cookie + 1), false, &[], &[]),
        NOW + 10,
        100,
    );
    let Verdict::Tx { port: 1, len: 58 } = v else {
        panic!("ACK: {v:?}")
    };
    let (ip, t) = checked_tcp(&out[14..58]);
    assert_eq!(ip.source, CLIENT);
    assert_eq!(&ip.destination[..3], &[198, 19, 1]);
    assert_eq!((t.source_port, t.destination_port), (cport, 8080));
    assert!(t.syn && !t.ack && !t.rst);
    assert_eq!(t.sequence_number, ISN);
    assert_eq!(t.window_size, 5000);
    assert_eq!(mss_of(&t), Some(want_mss));
    assert_eq!(&out[..6], &[2, 0, 0, 0, 1, ip.destination[3]]);
    ip.destination
}

#[test]
fn syn_gets_a_cookie_and_no_entry() {
    let fx = proxied("sp-syn", SVC_SYN_PROXY, [K1, [0, 0]]);
    let mut c = [0u64; N_COUNTERS];
    cookie_handshake(&fx, &mut c, 40_000, Some(1400));
    assert_eq!(fx.region.conntrack().lookup(&forward_key(40_000)), None);
    assert_eq!(active(&fx), vec![0, 0, 0]);
    assert_eq!(c[Counter::SyncookieSent as usize], 1);
    assert_eq!(c[Counter::ConnNew as usize], 0);
}

#[test]
fn the_whole_splice_with_exact_numbers() {
    let fx = proxied("sp-splice", SVC_SYN_PROXY, [K1, [0, 0]]);
    let mut c = [0u64; N_COUNTERS];
    let cookie = cookie_handshake(&fx, &mut c, 40_001, Some(1400));
    // MSS 1400 is index 4 of the table: the backend's SYN carries 1400.
    let bip = cookie_ack(&fx, &mut c, 40_001, cookie, 1400);
    let ct = fx.region.conntrack();
    let hit = ct.lookup(&forward_key(40_001)).unwrap();
    assert_eq!(hit.conn().flags, CONN_SYNPROXY);
    assert_eq!(
        ct.slot(hit.idx).tcp_state.load(Ordering::Relaxed),
        STATE_SYNPROXY
    );
    assert_eq!(active(&fx).iter().sum::<u32>(), 1);
    assert_eq!(c[Counter::SyncookieOk as usize], 1);
    assert_eq!(c[Counter::ConnNew as usize], 1);

    // The backend's SYN-ACK: answered with the ACK of its handshake, not
    // forwarded to the client.
    let (v, out) = go(
        &fx,
        &mut c,
        1,
        &backend_seg(bip, 40_001, BISN, ISN + 1, "S", &[]),
        NOW + 20,
        100,
    );
    let Verdict::Tx { port: 1, len: 54 } = v else {
        panic!("SYN-ACK: {v:?}")
    };
    let (ip, t) = checked_tcp(&out[14..54]);
    assert_eq!((ip.source, ip.destination), (CLIENT, bip));
    assert_eq!((t.source_port, t.destination_port), (40_001, 8080));
    assert!(t.ack && !t.syn);
    assert_eq!(
        (t.sequence_number, t.acknowledgment_number),
        (ISN + 1, BISN + 1)
    );
    assert_eq!(
        ct.slot(hit.idx).tcp_state.load(Ordering::Relaxed),
        STATE_ESTABLISHED
    );
    let rkey = hit.conn().reply_key();
    let rhit = ct.lookup(&rkey).unwrap();
    let splice = Splice(ct.slot(rhit.via));
    assert_eq!(
        (splice.cookie(), splice.word()),
        (cookie, BISN.wrapping_sub(cookie))
    );
    assert_eq!(c[Counter::SynproxySynAck as usize], 1);

    // The client's request: ack += delta, NAT to the backend.
    let req = b"GET / HTTP/1.0\r\n\r\n";
    let (v, out) = go(
        &fx,
        &mut c,
        0,
        &client_seg(40_001, ISN + 1, Some(cookie + 1), false, &[], req),
        NOW + 30,
        100,
    );
    let Verdict::Tx { port: 1, len } = v else {
        panic!("request: {v:?}")
    };
    let (ip, t) = checked_tcp(&out[14..len]);
    assert_eq!((ip.source, ip.destination), (CLIENT, bip));
    assert_eq!(
        (t.sequence_number, t.acknowledgment_number),
        (ISN + 1, BISN + 1)
    );
    assert_eq!(&out[len - req.len()..len], req);

    // The backend's answer: seq -= delta, source back to the VIP.
    let resp = b"HTTP/1.0 200 OK\r\n\r\nhello";
    let n = req.len() as u32;
    let (v, out) = go(
        &fx,
        &mut c,
        1,
        &backend_seg(bip, 40_001, BISN + 1, ISN + 1 + n, "", resp),
        NOW + 40,
        100,
    );
    let Verdict::Tx { port: 0, len } = v else {
        panic!("response: {v:?}")
    };
    let (ip, t) = checked_tcp(&out[14..len]);
    assert_eq!((ip.source, ip.destination), (VIP.to_be_bytes(), CLIENT));
    assert_eq!((t.source_port, t.destination_port), (80, 40_001));
    assert_eq!(
        (t.sequence_number, t.acknowledgment_number),
        (cookie + 1, ISN + 1 + n)
    );

    // A RST from the backend is translated too, and closes the entry.
    let (v, out) = go(
        &fx,
        &mut c,
        1,
        &backend_seg(bip, 40_001, BISN + 1 + 25, ISN + 1 + n, "R", &[]),
        NOW + 50,
        100,
    );
    let Verdict::Tx { port: 0, len } = v else {
        panic!("RST: {v:?}")
    };
    let (_, t) = checked_tcp(&out[14..len]);
    assert!(t.rst);
    assert_eq!(t.sequence_number, cookie + 1 + 25);
    assert_eq!(
        ct.slot(hit.idx).tcp_state.load(Ordering::Relaxed),
        STATE_CLOSING
    );
    assert_eq!(active(&fx).iter().sum::<u32>(), 0);
    // Never cached: every packet above took the full path.
    assert_eq!(c[Counter::FlowCacheHit as usize], 0);
}

#[test]
fn a_retransmitted_syn_ack_is_acked_again_and_a_foreign_one_dropped() {
    let fx = proxied("sp-retx", SVC_SYN_PROXY, [K1, [0, 0]]);
    let mut c = [0u64; N_COUNTERS];
    let cookie = cookie_handshake(&fx, &mut c, 40_002, None);
    // No MSS option: 536.
    let bip = cookie_ack(&fx, &mut c, 40_002, cookie, 536);
    // A SYN-ACK that does not acknowledge our SYN.
    let (v, _) = go(
        &fx,
        &mut c,
        1,
        &backend_seg(bip, 40_002, BISN, ISN + 7, "S", &[]),
        NOW + 20,
        100,
    );
    assert_eq!(v, Verdict::Drop);
    for _ in 0..2 {
        let (v, out) = go(
            &fx,
            &mut c,
            1,
            &backend_seg(bip, 40_002, BISN, ISN + 1, "S", &[]),
            NOW + 20,
            100,
        );
        let Verdict::Tx { port: 1, len: 54 } = v else {
            panic!("{v:?}")
        };
        let (_, t) = checked_tcp(&out[14..54]);
        assert_eq!(
            (t.sequence_number, t.acknowledgment_number),
            (ISN + 1, BISN + 1)
        );
    }
    // Another ISN after the splice: not this connection's handshake.
    let (v, _) = go(
        &fx,
        &mut c,
        1,
        &backend_seg(bip, 40_002, BISN + 9, ISN + 1, "S", &[]),
        NOW + 20,
        100,
    );
    assert_eq!(v, Verdict::Drop);
    assert_eq!(c[Counter::SynproxySynAck as usize], 2);
}

#[test]
fn client_data_before_the_backend_answered_resends_the_syn() {
    let fx = proxied("sp-wait", SVC_SYN_PROXY, [K1, [0, 0]]);
    let mut c = [0u64; N_COUNTERS];
    let cookie = cookie_handshake(&fx, &mut c, 40_003, Some(1300));
    cookie_ack(&fx, &mut c, 40_003, cookie, 1300);
    let (v, out) = go(
        &fx,
        &mut c,
        0,
        &client_seg(40_003, ISN + 1, Some(cookie + 1), false, &[], b"GET"),
        NOW + 500,
        100,
    );
    let Verdict::Tx { port: 1, len: 58 } = v else {
        panic!("{v:?}")
    };
    let (_, t) = checked_tcp(&out[14..58]);
    assert!(t.syn && !t.ack);
    assert_eq!((t.sequence_number, mss_of(&t)), (ISN, Some(1300)));
    assert_eq!(c[Counter::SynproxySynResent as usize], 1);
    assert_eq!(c[Counter::SyncookieDataDropped as usize], 1);
}

#[test]
fn a_cookie_ack_with_data_makes_the_entry_and_counts_the_data_dropped() {
    let fx = proxied("sp-data", SVC_SYN_PROXY, [K1, [0, 0]]);
    let mut c = [0u64; N_COUNTERS];
    let cookie = cookie_handshake(&fx, &mut c, 40_004, Some(1460));
    let (v, out) = go(
        &fx,
        &mut c,
        0,
        &client_seg(
            40_004,
            ISN + 1,
            Some(cookie + 1),
            false,
            &[],
            b"GET / HTTP/1.0\r\n\r\n",
        ),
        NOW + 10,
        100,
    );
    let Verdict::Tx { port: 1, len: 58 } = v else {
        panic!("{v:?}")
    };
    let (_, t) = checked_tcp(&out[14..58]);
    assert!(t.syn);
    assert_eq!((t.sequence_number, mss_of(&t)), (ISN, Some(1460)));
    assert_eq!(c[Counter::SyncookieOk as usize], 1);
    assert_eq!(c[Counter::SyncookieDataDropped as usize], 1);
}

#[test]
fn bad_expired_and_rate_limited_cookies_get_no_entry() {
    let fx = proxied("sp-bad", SVC_SYN_PROXY, [K1, [0, 0]]);
    let mut c = [0u64; N_COUNTERS];
    let cookie = cookie_handshake(&fx, &mut c, 40_005, Some(1460));
    // A hash bit flipped: RST from the VIP, seq = the ACK's ack.
    let bad = cookie ^ 0x100;
    let (v, out) = go(
        &fx,
        &mut c,
        0,
        &client_seg(40_005, ISN + 1, Some(bad + 1), false, &[], &[]),
        NOW + 10,
        100,
    );
    let Verdict::Tx { port: 0, len: 54 } = v else {
        panic!("{v:?}")
    };
    let (ip, t) = checked_tcp(&out[14..54]);
    assert_eq!(ip.source, VIP.to_be_bytes());
    assert!(t.rst && !t.ack);
    assert_eq!(t.sequence_number, bad + 1);
    assert_eq!(c[Counter::DropSyncookieBad as usize], 1);
    // Expired: two cookie steps (131 s) later.
    let later = NOW + 2 * 65_536;
    let (v, _) = go(
        &fx,
        &mut c,
        0,
        &client_seg(40_005, ISN + 1, Some(cookie + 1), false, &[], &[]),
        later,
        100,
    );
    assert!(matches!(v, Verdict::Tx { port: 0, len: 54 }), "{v:?}");
    assert_eq!(c[Counter::DropSyncookieBad as usize], 2);
    // Another client ISN (the cookie adds it; a change below 8 only
    // moves the MSS index, as in Linux, which costs an attacker who saw
    // the cookie nothing he did not have).
    let (v, _) = go(
        &fx,
        &mut c,
        0,
        &client_seg(40_005, ISN + 9, Some(cookie + 1), false, &[], &[]),
        NOW,
        100,
    );
    assert!(matches!(v, Verdict::Tx { port: 0, len: 54 }), "{v:?}");
    // No budget left: dropped, counted both ways.
    let (v, _) = go(
        &fx,
        &mut c,
        0,
        &client_seg(40_005, ISN + 1, Some(bad + 1), false, &[], &[]),
        NOW,
        0,
    );
    assert_eq!(v, Verdict::Drop);
    assert_eq!(c[Counter::DropSyncookieBad as usize], 4);
    assert_eq!(c[Counter::SyncookieRstLimited as usize], 1);
    // A RST without an entry is dropped, never answered.
    let mut rst = client_seg(40_005, ISN + 1, Some(bad + 1), false, &[], &[]);
    rst[14 + 20 + 13] |= 0x04;
    let rst = refill_tcp_checksum(rst);
    let (v, _) = go(&fx, &mut c, 0, &rst, NOW, 100);
    assert_eq!(v, Verdict::Drop);
    assert_eq!(fx.region.conntrack().lookup(&forward_key(40_005)), None);
    // One step later the cookie still checks.
    let (v, _) = go(
        &fx,
        &mut c,
        0,
        &client_seg(40_005, ISN + 1, Some(cookie + 1), false, &[], &[]),
        NOW + 65_536,
        100,
    );
    assert!(matches!(v, Verdict::Tx { port: 1, len: 58 }), "{v:?}");
}

/// The TCP checksum of an Ethernet/IPv4/TCP frame recomputed.
fn refill_tcp_checksum(mut f: Vec<u8>) -> Vec<u8> {
    f[14 + 20 + 16..14 + 20 + 18].copy_from_slice(&[0, 0]);
    let c = wire::checksum::tcp_udp_ipv4(
        f[26..30].try_into().unwrap(),
        f[30..34].try_into().unwrap(),
        6,
        &f[34..],
    );
    f[50..52].copy_from_slice(&c.to_be_bytes());
    f
}

#[test]
fn a_cookie_of_the_previous_secret_checks_after_a_rotation() {
    let fx = proxied("sp-rot", SVC_SYN_PROXY, [K1, [0, 0]]);
    let mut c = [0u64; N_COUNTERS];
    let cookie = cookie_handshake(&fx, &mut c, 40_006, Some(1460));
    let cookie2 = cookie_handshake(&fx, &mut c, 40_007, Some(1460));
    // Rotated: K2 current, K1 previous.
    fx.configure(|s| {
        s.services[0].flags = SVC_SYN_PROXY;
        s.header.cookie_secrets = [K2, K1];
    });
    cookie_ack(&fx, &mut c, 40_006, cookie, 1460);
    // Rotated again: K1 is gone.
    fx.configure(|s| {
        s.services[0].flags = SVC_SYN_PROXY;
        s.header.cookie_secrets = [[9, 9], K2];
    });
    let (v, _) = go(
        &fx,
        &mut c,
        0,
        &client_seg(40_007, ISN + 1, Some(cookie2 + 1), false, &[], &[]),
        NOW + 10,
        100,
    );
    assert!(matches!(v, Verdict::Tx { port: 0, len: 54 }), "{v:?}");
    assert_eq!(c[Counter::DropSyncookieBad as usize], 1);
}

#[test]
fn no_secret_means_plain_nat() {
    let fx = proxied("sp-nosecret", SVC_SYN_PROXY, [[0, 0], [0, 0]]);
    let mut c = [0u64; N_COUNTERS];
    let (v, _) = go(
        &fx,
        &mut c,
        0,
        &client_seg(40_008, ISN, None, true, &[], &[]),
        NOW,
        100,
    );
    assert!(matches!(v, Verdict::Tx { port: 1, .. }), "{v:?}");
    assert_eq!(
        (
            c[Counter::ConnNew as usize],
            c[Counter::SyncookieSent as usize]
        ),
        (1, 0)
    );
}

/// `auto` by rate: a fixture threshold of 20 SYNs/s is 2 SYNs per 100 ms
/// window; the third SYN of a window gets a cookie, and so does every SYN
/// of the next window; a window later under the threshold, plain NAT.
#[test]
fn auto_proxies_over_the_syn_rate() {
    let fx = Fixture::new("sp-auto", 1 << 12);
    fx.configure(|s| {
        s.services[0].flags = SVC_SYN_PROXY_AUTO;
        s.header.cookie_secrets = [K1, [0, 0]];
        s.header.syn_proxy_auto_syn_rate = 20;
    });
    let mut c = [0u64; N_COUNTERS];
    let mut ctx = fx.ctx(&mut c);
    let send = |ctx: &mut Ctx<'_>, cport: u16, now: u32| {
        let f = client_seg(cport, ISN, None, true, &[], &[]);
        let mut buf = vec![0u8; 2048];
        buf[..f.len()].copy_from_slice(&f);
        ctx.now_ms = now;
        match process(&mut buf, f.len(), 0, &port_mac, ctx) {
            Verdict::Tx { port, .. } => port,
            v => panic!("{v:?}"),
        }
    };
    let t0 = 1_000_000;
    // Ports 0: cookie (to the client), 1: NAT (to a backend).
    assert_eq!(
        [
            send(&mut ctx, 41_000, t0),
            send(&mut ctx, 41_001, t0 + 1),
            send(&mut ctx, 41_002, t0 + 2),
            send(&mut ctx, 41_003, t0 + 100),
            send(&mut ctx, 41_004, t0 + 200),
        ],
        [1, 1, 0, 0, 1]
    );
    drop(ctx);
    assert_eq!(c[Counter::SynproxyAutoBursts as usize], 2);
    assert_eq!(c[Counter::SyncookieSent as usize], 2);
}

/// `auto` switched off since the cookie went out: the ACK still completes
/// through the proxy, not as a mid-flow pickup.
#[test]
fn auto_accepts_a_cookie_after_switching_off() {
    let fx = Fixture::new("sp-auto-off", 1 << 12);
    fx.configure(|s| {
        s.services[0].flags = SVC_SYN_PROXY_AUTO;
        s.header.cookie_secrets = [K1, [0, 0]];
        s.header.syn_proxy_auto_syn_rate = 0;
        s.header.syn_proxy_auto_occupancy_permille = 0;
    });
    let mut c = [0u64; N_COUNTERS];
    let cookie = syncookie::make(K1, &tuple(40_009), 3, ISN, 7);
    cookie_ack(&fx, &mut c, 40_009, cookie, 1460);
    assert_eq!(c[Counter::SyncookieOk as usize], 1);
    assert_eq!(c[Counter::ConnMidflow as usize], 0);
}

/// `auto` by occupancy: a table whose sampled slots are all taken.
#[test]
fn auto_proxies_over_the_occupancy() {
    let fx = Fixture::new("sp-auto-occ", 1 << 10);
    fx.configure(|s| {
        s.services[0].flags = SVC_SYN_PROXY_AUTO;
        s.header.cookie_secrets = [K1, [0, 0]];
        s.header.syn_proxy_auto_syn_rate = 0;
        s.header.syn_proxy_auto_occupancy_permille = 250;
    });
    let mut c = [0u64; N_COUNTERS];
    // Under the threshold: plain NAT.
    let (v, _) = go(
        &fx,
        &mut c,
        0,
        &client_seg(42_000, ISN, None, true, &[], &[]),
        NOW,
        100,
    );
    assert!(matches!(v, Verdict::Tx { port: 1, .. }), "{v:?}");
    // 300 connections (600 slots of 1024): over 250 per mille.
    for p in 0..300u16 {
        let (v, _) = go(
            &fx,
            &mut c,
            0,
            &client_seg(43_000 + p, ISN, Some(1), false, &[], &[]),
            NOW,
            100,
        );
        let _ = v;
    }
    let (v, _) = go(
        &fx,
        &mut c,
        0,
        &client_seg(42_001, ISN, None, true, &[], &[]),
        NOW,
        100,
    );
    assert!(matches!(v, Verdict::Tx { port: 0, len: 58 }), "{v:?}");
}
