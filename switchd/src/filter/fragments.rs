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
    let old = |h: &[u8; 20], at: usize| u32::from_be_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]]);
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
    ctx.frags.release(ctx.now_ms, |buf, len, offer| match offer {
        Offer::Release(d) => {
            if let Verdict::Tx { port, len } = follow(buf, len, &d, cfg, counters) {
                send(&buf[..len], port);
            }
        }
        Offer::Expired => counters[Counter::DropFragTimeout as usize] += 1,
    });
}
