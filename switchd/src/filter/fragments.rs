//! Fragments: IPv4 fragments of TCP/UDP datagrams go where their first
//! fragment went, without reassembly (see [`crate::frag`]).
//!
//! The first fragment carries the TCP/UDP header: it takes the full path
//! like a whole packet (a NAT rewrite of its port and checksum covers the
//! whole datagram: the checksum is in the first fragment only, and the
//! pseudo-header's address change is the same difference), and the frame
//! that goes out is remembered as the datagram's [`Decision`]. A later
//! fragment follows that decision (the same egress and MACs; the same
//! destination or source address, or the same tunnel), or waits in the
//! switch's fragment table when it came first; the engine sends it
//! ([`release_fragments`]) once the first fragment passed.

use shm_layout::config_slot::ConfigView;
use shm_layout::switch_slot::{Counter, N_COUNTERS};
use wire::{HeaderChecksum, Ipv4Fragment, checksum, ipip};

use crate::frag::{Decision, Offer, Translation};

use super::rewrite::DEFAULT_MTU;
use super::{Ctx, Verdict, full_path, parse};

const ETH: usize = wire::ETHERNET_HEADER_LEN;
/// IP protocol number of IP-in-IP.
const PROTO_IPIP: u8 = 4;

/// The verdict for a frame the validator called a fragment (`frame` the
/// whole buffer, `frame_len` the frame's bytes in it).
#[cold]
#[inline(never)]
pub(super) fn switch_fragment(
    frame: &mut [u8],
    frame_len: usize,
    in_port: u32,
    port_mac: &impl Fn(u32) -> Option<[u8; 6]>,
    ctx: &mut Ctx<'_>,
) -> Verdict {
    let f = match wire::ipv4_fragment(&frame[ETH..frame_len], HeaderChecksum::Verify) {
        Ok(f) => f,
        Err(_) => return ctx.drop(Counter::DropFragment),
    };
    if let Some(first) = &f.first {
        let mut l4 = parse::facts(first);
        l4.cacheable = false;
        l4.home = ctx.ct.home_of(l4.words) as u32;
        let v = full_path(frame, &l4, in_port, port_mac, ctx);
        if let Verdict::Tx { port, len } = v
            && let Some(d) = decision_of(&frame[..len], &f, port)
        {
            ctx.frags.decide(f.key(), d, f.payload_len(), ctx.now_ms);
            ctx.count(Counter::FragForwarded);
        }
        return v;
    }
    let span = (f.offset, f.payload_len(), f.more);
    if let Some(d) = ctx.frags.follow(f.key(), span, ctx.now_ms) {
        return follow(frame, ETH + f.total_len, &d, &ctx.cfg, ctx.counters);
    }
    if !ours(&f, &ctx.cfg) {
        return ctx.drop(Counter::DropFragment);
    }
    if ctx
        .frags
        .hold(&frame[..ETH + f.total_len], f.key(), ctx.now_ms)
    {
        // The buffer goes back; the table kept a copy.
        ctx.count(Counter::FragHeld);
        Verdict::Drop
    } else {
        ctx.drop(Counter::DropFragOverflow)
    }
}

/// Whether a later fragment without a decision may belong to a flow of
/// ours: to a VIP, or from a backend (a NAT reply).
fn ours(f: &Ipv4Fragment, cfg: &ConfigView<'_>) -> bool {
    let [s0, s1, s2, s3, d0, d1, d2, d3] = f.addrs;
    let (src, dst) = (
        u32::from_be_bytes([s0, s1, s2, s3]),
        u32::from_be_bytes([d0, d1, d2, d3]),
    );
    cfg.is_vip(dst) || cfg.backends().iter().any(|b| b.ip == src)
}

/// The decision the first fragment `f` got, read from the frame that goes
/// out (`out`, on global port `port`): `None` for an answer of the switch
/// (a RST or an ICMP error, not the fragment forwarded).
fn decision_of(out: &[u8], f: &Ipv4Fragment, port: u32) -> Option<Decision> {
    let mut macs = [0; 12];
    macs.copy_from_slice(out.get(..12)?);
    let h = out.get(ETH..ETH + 20)?;
    let addr = |b: &[u8], at: usize| u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    let id = |b: &[u8]| u16::from_be_bytes([b[4], b[5]]);
    let (src, dst) = (addr(h, 12), addr(h, 16));
    let (old_src, old_dst) = (addr(&f.addrs, 0), addr(&f.addrs, 4));
    let translation = if h[9] == PROTO_IPIP && f.protocol != PROTO_IPIP {
        let inner = out.get(ETH + 20..ETH + 40)?;
        if inner[12..20] != f.addrs || id(inner) != f.id {
            return None;
        }
        Translation::Tunnel { src, dst }
    } else if h[9] != f.protocol || id(h) != f.id {
        return None;
    } else if (src, dst) == (old_src, old_dst) {
        Translation::None
    } else if src == old_src {
        Translation::Dst(dst)
    } else if dst == old_dst {
        Translation::Src(src)
    } else {
        return None;
    };
    Some(Decision {
        port,
        macs,
        translation,
    })
}

/// Rewrites a later fragment (`frame` the whole buffer, `len` the
/// fragment's bytes) by its datagram's decision: TTL minus one, the
/// address translation or tunnel, the MACs. Counts it as forwarded, or
/// the reason it was dropped.
fn follow(
    frame: &mut [u8],
    len: usize,
    d: &Decision,
    cfg: &ConfigView<'_>,
    counters: &mut [u64; N_COUNTERS],
) -> Verdict {
    let mut drop = |c: Counter| {
        counters[c as usize] += 1;
        Verdict::Drop
    };
    let Some(h) = frame.get_mut(ETH..).and_then(|b| b.first_chunk_mut::<20>()) else {
        return drop(Counter::DropMalformed);
    };
    let ttl = h[8];
    if ttl <= 1 {
        return drop(Counter::DropTtl);
    }
    let old =
        |h: &[u8; 20], at: usize| u32::from_be_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]]);
    let (at, new) = match d.translation {
        Translation::Dst(a) => (16, a),
        Translation::Src(a) => (12, a),
        Translation::None | Translation::Tunnel { .. } => (0, 0),
    };
    let mut delta = checksum::TTL_DECREMENT;
    if at != 0 {
        delta += checksum::delta_u32(old(h, at), new);
        h[at..at + 4].copy_from_slice(&new.to_be_bytes());
    }
    h[8] = ttl - 1;
    let c = checksum::adjust(u16::from_be_bytes([h[10], h[11]]), delta);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    let mut out_len = len;
    if let Translation::Tunnel { src, dst } = d.translation {
        let mtu = cfg.ports().get(d.port as usize).map_or(0, |p| p.mtu) as usize;
        let mtu = if mtu == 0 { DEFAULT_MTU } else { mtu };
        // Fragments carry no DF: too big once encapsulated, dropped.
        if len - ETH + ipip::OVERHEAD > mtu {
            return drop(Counter::DropTooBig);
        }
        match ipip::encapsulate_in_place(frame, len, src.to_be_bytes(), dst.to_be_bytes()) {
            Ok(n) => out_len = n,
            Err(_) => return drop(Counter::DropTooBig),
        }
    }
    frame[..12].copy_from_slice(&d.macs);
    counters[Counter::FragForwarded as usize] += 1;
    Verdict::Tx {
        port: d.port,
        len: out_len,
    }
}

/// Once per loop: sends the held fragments whose first fragment passed
/// (`send(frame, global port)`, false if it could not), drops those that
/// waited too long (`drop_frag_timeout`). A loop with neither costs one
/// test.
#[inline]
pub fn release_fragments(ctx: &mut Ctx<'_>, mut send: impl FnMut(&[u8], u32)) {
    if !ctx.frags.needs_release(ctx.now_ms) {
        return;
    }
    let (cfg, counters) = (&ctx.cfg, &mut *ctx.counters);
    ctx.frags
        .release(ctx.now_ms, |buf, len, offer| match offer {
            Offer::Release(d) => {
                if let Verdict::Tx { port, len } = follow(buf, len, &d, cfg, counters) {
                    send(&buf[..len], port);
                }
            }
            Offer::Expired => counters[Counter::DropFragTimeout as usize] += 1,
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filter::process;
    use crate::fixture::{CLIENT_GW_MAC, Fixture, VIP, port_mac};
    use crate::frag::{DEFAULT_HELD, FragTable, TIMEOUT_MS};
    use etherparse::{Ipv4HeaderSlice, PacketBuilder, UdpHeader};

    const CLIENT: [u8; 4] = [198, 18, 100, 1];
    const BACKEND_MACS: [[u8; 6]; 3] = [[2, 0, 0, 0, 1, 1], [2, 0, 0, 0, 1, 2], [2, 0, 0, 0, 1, 3]];

    /// A UDP datagram of `len` payload bytes (a pattern) from `src:sport`
    /// to `dst:dport`, IP id `id`, cut into fragments of at most 1480
    /// payload bytes (as a kernel at MTU 1500 cuts it), as Ethernet frames
    /// from `mac`.
    fn fragments(
        src: ([u8; 4], u16),
        dst: ([u8; 4], u16),
        id: u16,
        len: usize,
        mac: [u8; 6],
    ) -> Vec<Vec<u8>> {
        fragments_of(src, dst, id, len, mac, 1480)
    }

    /// [`fragments`] of at most `cut` payload bytes (a multiple of 8).
    fn fragments_of(
        (src, sport): ([u8; 4], u16),
        (dst, dport): ([u8; 4], u16),
        id: u16,
        len: usize,
        mac: [u8; 6],
        cut: usize,
    ) -> Vec<Vec<u8>> {
        let payload: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
        let mut whole = Vec::new();
        // To the receiving port's own MAC (the L2 rules drop a frame to
        // another host's): the client side's from the client gateway, the
        // backend side's from a backend.
        let side = if mac == CLIENT_GW_MAC { 0 } else { 1 };
        PacketBuilder::ethernet2(mac, port_mac(side).expect("fixture port"))
            .ipv4(src, dst, 64)
            .udp(sport, dport)
            .write(&mut whole, &payload)
            .unwrap();
        let (eth_ip, data) = whole.split_at(34);
        data.chunks(cut)
            .enumerate()
            .map(|(i, chunk)| {
                let mut f = eth_ip.to_vec();
                f.extend_from_slice(chunk);
                let more = (i + 1) * cut < data.len();
                let word = (i * cut / 8) as u16 | if more { 0x2000 } else { 0 };
                f[16..18].copy_from_slice(&((20 + chunk.len()) as u16).to_be_bytes());
                f[18..20].copy_from_slice(&id.to_be_bytes());
                f[20..22].copy_from_slice(&word.to_be_bytes());
                f[24..26].copy_from_slice(&[0, 0]);
                let c = checksum::ipv4_header(&f[14..34]);
                f[24..26].copy_from_slice(&c.to_be_bytes());
                f
            })
            .collect()
    }

    /// One frame through the filter with `ctx` (kept across frames: its
    /// fragment table is the switch's).
    fn run(ctx: &mut Ctx<'_>, in_port: u32, frame: &[u8]) -> Option<(u32, Vec<u8>)> {
        let mut buf = vec![0u8; 2048];
        buf[..frame.len()].copy_from_slice(frame);
        match process(&mut buf, frame.len(), in_port, &port_mac, ctx) {
            Verdict::Tx { port, len } => Some((port, buf[..len].to_vec())),
            _ => None,
        }
    }

    fn released(ctx: &mut Ctx<'_>) -> Vec<(u32, Vec<u8>)> {
        let mut out = Vec::new();
        release_fragments(ctx, |f, port| out.push((port, f.to_vec())));
        out
    }

    /// Checks one fragment that went out: a valid IPv4 header with TTL
    /// 63, the given addresses and the input's id and offset, its payload
    /// (past any UDP header) unchanged. Returns (offset, payload).
    fn check(out: &[u8], input: &[u8], src: [u8; 4], dst: [u8; 4]) -> (usize, Vec<u8>) {
        let h = Ipv4HeaderSlice::from_slice(&out[14..]).unwrap().to_header();
        let inh = Ipv4HeaderSlice::from_slice(&input[14..])
            .unwrap()
            .to_header();
        assert_eq!(h.header_checksum, h.calc_header_checksum());
        assert_eq!((h.source, h.destination, h.time_to_live), (src, dst, 63));
        assert_eq!(
            (h.identification, h.more_fragments, h.fragment_offset),
            (inh.identification, inh.more_fragments, inh.fragment_offset)
        );
        assert_eq!(out.len(), input.len());
        let offset = h.fragment_offset.byte_offset() as usize;
        let skip = if offset == 0 { 34 + 8 } else { 34 };
        assert_eq!(out[skip..], input[skip..], "payload");
        (offset, out[34..].to_vec())
    }

    /// The UDP datagram the fragments make up: its ports, its checksum
    /// checked over the whole of it, its payload.
    fn reassembled(
        mut parts: Vec<(usize, Vec<u8>)>,
        src: [u8; 4],
        dst: [u8; 4],
    ) -> (u16, u16, Vec<u8>) {
        parts.sort();
        let mut d = Vec::new();
        for (offset, p) in parts {
            assert_eq!(offset, d.len(), "contiguous");
            d.extend_from_slice(&p);
        }
        let (u, rest) = UdpHeader::from_slice(&d).unwrap();
        assert_eq!(u.length as usize, d.len());
        assert_eq!(
            u.checksum,
            u.calc_checksum_ipv4_raw(src, dst, rest).unwrap(),
            "UDP checksum"
        );
        (u.source_port, u.destination_port, rest.to_vec())
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + 3) as u8).collect()
    }

    /// A 4000-byte datagram to the UDP NAT service (VIP:53) and its
    /// 4000-byte answer from the backend, both in three fragments in
    /// order: every fragment goes to (or comes back from) the backend of
    /// the first, rewritten so that the datagrams check out whole.
    #[test]
    fn later_fragments_follow_the_first_both_ways() {
        let fx = Fixture::new("frag-inorder", 1 << 12);
        let mut c = [0u64; N_COUNTERS];
        let mut ctx = fx.ctx(&mut c);
        ctx.frags = FragTable::default();
        let vip = VIP.to_be_bytes();
        let ask = fragments((CLIENT, 40_000), (vip, 53), 0x4242, 4000, CLIENT_GW_MAC);
        assert_eq!(ask.len(), 3);
        let outs: Vec<_> = ask
            .iter()
            .map(|f| run(&mut ctx, 0, f).expect("sent"))
            .collect();
        let backend = {
            let h = Ipv4HeaderSlice::from_slice(&outs[0].1[14..]).unwrap();
            h.destination()
        };
        assert_eq!(backend[..3], [198, 19, 1]);
        let mac = BACKEND_MACS[backend[3] as usize - 1];
        let mut parts = Vec::new();
        for ((port, out), input) in outs.iter().zip(&ask) {
            assert_eq!(*port, 1);
            assert_eq!(
                (&out[..6], &out[6..12]),
                (&mac[..], &port_mac(1).unwrap()[..])
            );
            parts.push(check(out, input, CLIENT, backend));
        }
        assert_eq!(
            reassembled(parts, CLIENT, backend),
            (40_000, 5353, pattern(4000))
        );
        // The answer, fragmented by the backend's kernel.
        let answer = fragments((backend, 5353), (CLIENT, 40_000), 0x0707, 4000, mac);
        let mut parts = Vec::new();
        for input in &answer {
            let (port, out) = run(&mut ctx, 1, input).expect("sent");
            assert_eq!(port, 0);
            assert_eq!(&out[..6], &CLIENT_GW_MAC[..]);
            parts.push(check(&out, input, vip, CLIENT));
        }
        assert_eq!(reassembled(parts, vip, CLIENT), (53, 40_000, pattern(4000)));
        assert!(released(&mut ctx).is_empty());
        drop(ctx);
        assert_eq!(c[Counter::FragForwarded as usize], 6);
        assert_eq!(
            (c[Counter::ConnNew as usize], c[Counter::ReplyHit as usize]),
            (1, 1)
        );
        assert_eq!(
            c[Counter::FragHeld as usize] + c[Counter::DropFragment as usize],
            0
        );
    }

    /// Fragments in reverse order, both ways: the later ones wait in the
    /// switch's table and go out, rewritten as the first, once it passed.
    #[test]
    fn later_fragments_that_come_first_wait_for_the_first() {
        let fx = Fixture::new("frag-reverse", 1 << 12);
        let mut c = [0u64; N_COUNTERS];
        let mut ctx = fx.ctx(&mut c);
        ctx.frags = FragTable::default();
        let vip = VIP.to_be_bytes();
        let ask = fragments((CLIENT, 40_001), (vip, 53), 0x4243, 4000, CLIENT_GW_MAC);
        assert_eq!(run(&mut ctx, 0, &ask[2]), None);
        assert_eq!(run(&mut ctx, 0, &ask[1]), None);
        assert!(released(&mut ctx).is_empty(), "nothing to release yet");
        let (port, first) = run(&mut ctx, 0, &ask[0]).expect("sent");
        assert_eq!(port, 1);
        let backend = Ipv4HeaderSlice::from_slice(&first[14..])
            .unwrap()
            .destination();
        let later = released(&mut ctx);
        assert_eq!(later.len(), 2);
        let mut parts = vec![check(&first, &ask[0], CLIENT, backend)];
        for ((port, out), input) in later.iter().zip([&ask[2], &ask[1]]) {
            assert_eq!(*port, 1);
            assert_eq!(out[..12], first[..12], "the first's MACs");
            parts.push(check(out, input, CLIENT, backend));
        }
        assert_eq!(
            reassembled(parts, CLIENT, backend),
            (40_001, 5353, pattern(4000))
        );
        let mac: [u8; 6] = first[..6].try_into().unwrap();
        let answer = fragments((backend, 5353), (CLIENT, 40_001), 0x0708, 4000, mac);
        assert_eq!(run(&mut ctx, 1, &answer[1]), None);
        let (_, first) = run(&mut ctx, 1, &answer[0]).expect("sent");
        let (_, last) = run(&mut ctx, 1, &answer[2]).expect("sent");
        let later = released(&mut ctx);
        assert_eq!(later.len(), 1);
        let parts = vec![
            check(&first, &answer[0], vip, CLIENT),
            check(&last, &answer[2], vip, CLIENT),
            check(&later[0].1, &answer[1], vip, CLIENT),
        ];
        assert_eq!(reassembled(parts, vip, CLIENT), (53, 40_001, pattern(4000)));
        drop(ctx);
        assert_eq!(c[Counter::FragHeld as usize], 3);
        assert_eq!(c[Counter::FragForwarded as usize], 6);
        assert_eq!(c[Counter::DropFragTimeout as usize], 0);
    }

    /// A held fragment whose first never comes is dropped after
    /// `TIMEOUT_MS`; a first fragment that comes later has no one waiting.
    #[test]
    fn a_held_fragment_times_out() {
        let fx = Fixture::new("frag-timeout", 1 << 12);
        let mut c = [0u64; N_COUNTERS];
        let mut ctx = fx.ctx(&mut c);
        ctx.frags = FragTable::default();
        let ask = fragments(
            (CLIENT, 40_002),
            (VIP.to_be_bytes(), 53),
            9,
            4000,
            CLIENT_GW_MAC,
        );
        ctx.now_ms = 5_000;
        assert_eq!(run(&mut ctx, 0, &ask[1]), None);
        ctx.now_ms += TIMEOUT_MS - 1;
        assert!(released(&mut ctx).is_empty());
        ctx.now_ms += 1;
        assert!(released(&mut ctx).is_empty());
        assert_eq!(ctx.frags.held(), 0);
        assert!(run(&mut ctx, 0, &ask[0]).is_some());
        assert!(released(&mut ctx).is_empty());
        drop(ctx);
        assert_eq!(c[Counter::FragHeld as usize], 1);
        assert_eq!(c[Counter::DropFragTimeout as usize], 1);
        assert_eq!(c[Counter::FragForwarded as usize], 1);
    }

    /// The holding area is bounded: past its places a later fragment is
    /// dropped (`drop_frag_overflow`); one neither to a VIP nor from a
    /// backend is not held at all (`drop_fragment`).
    #[test]
    fn the_holding_area_overflows_and_holds_only_ours() {
        let fx = Fixture::new("frag-overflow", 1 << 12);
        let mut c = [0u64; N_COUNTERS];
        let mut ctx = fx.ctx(&mut c);
        ctx.frags = FragTable::default();
        for id in 0..=DEFAULT_HELD as u16 {
            let ask = fragments(
                (CLIENT, 40_003),
                (VIP.to_be_bytes(), 53),
                id,
                4000,
                CLIENT_GW_MAC,
            );
            assert_eq!(run(&mut ctx, 0, &ask[1]), None);
        }
        let stray = fragments(
            (CLIENT, 40_003),
            ([198, 18, 7, 7], 53),
            1,
            4000,
            CLIENT_GW_MAC,
        );
        assert_eq!(run(&mut ctx, 0, &stray[1]), None);
        assert_eq!(ctx.frags.held(), DEFAULT_HELD);
        drop(ctx);
        assert_eq!(c[Counter::FragHeld as usize], DEFAULT_HELD as u64);
        assert_eq!(c[Counter::DropFragOverflow as usize], 1);
        assert_eq!(c[Counter::DropFragment as usize], 1);
    }

    /// Direct routing and tunnel: later fragments go to the first's
    /// backend MAC with the VIP kept (DR), or in IP-in-IP from the tunnel
    /// source to the first's backend (tunnel), the inner fragment intact
    /// but for its TTL.
    #[test]
    fn later_fragments_follow_the_first_in_dr_and_tunnel_modes() {
        use crate::fixture::TUNNEL_SRC;
        use shm_layout::config_slot::{MODE_DR, MODE_TUNNEL};
        for mode in [MODE_DR, MODE_TUNNEL] {
            let fx = Fixture::new(&format!("frag-mode{mode}"), 1 << 12);
            fx.configure(|s| s.services[1].mode = mode);
            let mut c = [0u64; N_COUNTERS];
            let mut ctx = fx.ctx(&mut c);
            ctx.frags = FragTable::default();
            let vip = VIP.to_be_bytes();
            // 1000-byte fragments: room for the tunnel header at MTU 1500.
            let ask = fragments_of((CLIENT, 40_004), (vip, 53), 77, 2500, CLIENT_GW_MAC, 1000);
            assert_eq!(ask.len(), 3);
            assert_eq!(run(&mut ctx, 0, &ask[2]), None, "held");
            let mut outs = vec![run(&mut ctx, 0, &ask[0]).expect("sent")];
            outs.push(run(&mut ctx, 0, &ask[1]).expect("sent"));
            outs.extend(released(&mut ctx));
            let mac = &outs[0].1[..6];
            assert!(BACKEND_MACS.iter().any(|m| m == mac), "{mac:x?}");
            let mut parts = Vec::new();
            for ((port, out), input) in outs.iter().zip([&ask[0], &ask[1], &ask[2]]) {
                assert_eq!((*port, &out[..12]), (1, &outs[0].1[..12]));
                if mode == MODE_TUNNEL {
                    let outer = Ipv4HeaderSlice::from_slice(&out[14..]).unwrap().to_header();
                    assert_eq!(outer.header_checksum, outer.calc_header_checksum());
                    assert_eq!(outer.protocol, etherparse::IpNumber::IPV4);
                    assert_eq!(outer.source, TUNNEL_SRC.to_be_bytes());
                    assert_eq!(outer.destination[..3], [198, 19, 1]);
                    assert_eq!(
                        outer.destination[3] as usize,
                        BACKEND_MACS.iter().position(|m| m == mac).unwrap() + 1
                    );
                    let inner = [&out[..14], &out[34..]].concat();
                    parts.push(check(&inner, input, CLIENT, vip));
                } else {
                    parts.push(check(out, input, CLIENT, vip));
                }
            }
            assert_eq!(reassembled(parts, CLIENT, vip), (40_004, 53, pattern(2500)));
            drop(ctx);
            assert_eq!(c[Counter::FragForwarded as usize], 3, "mode {mode}");
        }
    }
}
