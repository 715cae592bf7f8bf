//! Answers: frames the switch answers itself (ARP for VIPs, TCP RSTs,
//! ICMP fragmentation-needed) and the flow cache's answers for known
//! connections (filled by the full path, replayed by the third pass).

use core::sync::atomic::Ordering;

use shm_layout::config_slot::{ConfigView, PROTO_TCP};
use shm_layout::conntrack::{ConnSlot, Hit, STATE_ACTIVE, STATE_CLOSING, STATE_ESTABLISHED};
use shm_layout::switch_slot::Counter;

use crate::flowcache::{self, FlowCache};
use wire::{checksum, tcp};

use super::decide::is_vip;
use super::parse::{L4, dropped_as, parse_ip};
use super::rewrite::Rewrite;
use super::{Ctx, Verdict};

/// An ARP request for a VIP, answered on the port it came in on with the
/// port's MAC; any other ARP frame is dropped (counted).
pub(super) fn arp(
    frame: &mut [u8],
    len: usize,
    in_port: u32,
    port_mac: &impl Fn(u32) -> Option<[u8; 6]>,
    ctx: &mut Ctx<'_>,
) -> Verdict {
    const ETH: usize = wire::ETHERNET_HEADER_LEN;
    let Ok(arp) = wire::ArpPacket::new_checked(&frame[ETH..len]) else {
        return ctx.drop(Counter::DropMalformed);
    };
    if let Some(c) = super::l2::bad_arp_sender(arp.sender_hardware_addr()) {
        return ctx.drop(c);
    }
    if arp.operation() != wire::ARP_REQUEST
        || !is_vip(&ctx.cfg, u32::from_be_bytes(arp.target_protocol_addr()))
    {
        return ctx.drop(Counter::DropNotOurs);
    }
    let Some(mac) = port_mac(in_port) else {
        return ctx.drop(Counter::DropEgressPort);
    };
    match wire::arp_reply_in_place(&mut frame[..len], mac) {
        Ok(n) => {
            ctx.count(Counter::ArpReplies);
            Verdict::Tx {
                port: in_port,
                len: n,
            }
        }
        Err(_) => ctx.drop(Counter::DropMalformed),
    }
}

/// A TCP segment to a VIP answered with a RST from the VIP (counted in
/// `counter`), sent back out of `in_port`. The caller has ruled out a RST.
pub(super) fn answer_with_rst(
    frame: &mut [u8],
    l4: &L4,
    in_port: u32,
    counter: Counter,
    ctx: &mut Ctx<'_>,
) -> Verdict {
    match wire::tcp_rst_in_place(frame, l4.frame_len as usize) {
        Ok(n) => {
            ctx.count(counter);
            Verdict::Tx {
                port: in_port,
                len: n,
            }
        }
        Err(_) => ctx.drop(Counter::DropMalformed),
    }
}

/// A packet too big for the path ahead (`inner_mtu`: what fits): with DF
/// it is answered with ICMP fragmentation-needed (the client then lowers
/// its path MTU toward the VIP), within the switch's ICMP budget; without
/// DF it is dropped. Counted either way.
#[cold]
pub(super) fn answer_too_big(
    frame: &mut [u8],
    l4: &L4,
    in_port: u32,
    inner_mtu: usize,
    ctx: &mut Ctx<'_>,
) -> Verdict {
    const ETH: usize = wire::ETHERNET_HEADER_LEN;
    let df = wire::Ipv4Packet::new_unchecked(&frame[ETH..l4.frame_len as usize]).dont_fragment();
    if !df {
        return ctx.drop(Counter::DropTooBig);
    }
    if ctx.icmp_tokens == 0 {
        return ctx.drop(Counter::IcmpRateLimited);
    }
    match wire::icmp_frag_needed_in_place(frame, l4.frame_len as usize, inner_mtu as u16) {
        Ok(n) => {
            ctx.icmp_tokens -= 1;
            ctx.count(Counter::IcmpFragNeeded);
            Verdict::Tx {
                port: in_port,
                len: n,
            }
        }
        Err(_) => ctx.drop(Counter::DropTooBig),
    }
}

/// Refuses a held new connection (queue full or waited too long): a TCP
/// SYN is answered with a RST from the VIP, a UDP datagram is dropped.
/// Counted in `conn_refused`.
pub fn refuse(frame: &mut [u8], len: usize, in_port: u32, ctx: &mut Ctx<'_>) -> Verdict {
    let frame_len = len.min(frame.len());
    let l4 = match parse_ip(&frame[..frame_len]) {
        Ok(l4) => l4,
        Err(rule) => return dropped_as(rule, ctx),
    };
    ctx.count(Counter::ConnRefused);
    if l4.key().proto != PROTO_TCP || l4.flags & tcp::RST != 0 {
        return Verdict::Drop;
    }
    match wire::tcp_rst_in_place(frame, l4.frame_len as usize) {
        Ok(n) => Verdict::Tx {
            port: in_port,
            len: n,
        },
        Err(_) => Verdict::Drop,
    }
}

/// Caches the full path's answer for a connection's next packets.
#[inline(never)]
pub(super) fn cache_answer(
    l4: &L4,
    fill: &Fill,
    rw: &Rewrite,
    port: u32,
    [dst, src]: [[u8; 6]; 2],
    ctx: &mut Ctx<'_>,
) {
    let (addrs, ports_proto) = l4.words;
    let entry = flowcache::Entry {
        addrs,
        ports_proto,
        lock: fill.lock,
        idx: fill.idx,
        via_lock: fill.via_lock,
        via: fill.via,
        // Set by `put`.
        epoch: 0,
        // The full path just touched the slot.
        checked_ms: ctx.now_ms,
        new_addr: rw.new_addr.to_be_bytes(),
        pend_bytes: 0,
        new_port: rw.new_port.to_be_bytes(),
        d_ip: checksum::to_ne(checksum::fold(rw.d_ip)),
        d_l4: checksum::to_ne(checksum::fold(rw.d_l4)),
        pend_pkts: 0,
        dst_mac: dst,
        port: port as u8,
        kind: fill.state as u8 | rw.kind << 4,
    };
    ctx.flows.put(l4.home, entry, src, &ctx.ct);
}

/// A hash of everything in a configuration that an answer of the flow
/// cache depends on: which addresses are VIPs (a packet's direction), each
/// backend id's down action, the idle timeouts, and this switch's ports
/// (global ids and MACs, `port_macs` and `local` as the engine's port map
/// holds them). A publication that leaves it unchanged (new weights, new
/// limits, new Maglev tables: what agents, health of other backends and
/// controlled loading change every second) keeps the cache; routing has its
/// own stamp. Anything not hashed here must not be read by the path that
/// fills the cache (`to_vip`/`from_backend` hits through `egress`).
pub fn answer_fingerprint(
    cfg: &ConfigView<'_>,
    port_macs: &[Option<[u8; 6]>],
    local: &[Option<u8>],
) -> u64 {
    let mut h = 0u64;
    let mut mix = |w: u64| h = (h.rotate_left(5) ^ w).wrapping_mul(0x517c_c1b7_2722_0a95);
    let t = cfg.header.timeouts();
    mix(u64::from(t.tcp_syn_ms) << 32 | u64::from(t.tcp_established_ms));
    mix(u64::from(t.tcp_fin_ms) << 32 | u64::from(t.udp_ms));
    mix(cfg.services().len() as u64);
    for s in cfg.services() {
        mix(u64::from(s.vip));
    }
    mix(cfg.down_action.len() as u64);
    for chunk in cfg.down_action.chunks(8) {
        let mut w = [0u8; 8];
        w[..chunk.len()].copy_from_slice(chunk);
        mix(u64::from_le_bytes(w));
    }
    for (mac, l) in port_macs.iter().zip(local) {
        let m = mac.map_or(0, |m| {
            u64::from_le_bytes([m[0], m[1], m[2], m[3], m[4], m[5], 1, 0])
        });
        mix(m ^ u64::from(l.map_or(0xff, u16::from)) << 56);
    }
    h
}

/// What the full path hands [`egress`] to cache its answer for the next
/// packets of a connection (see [`crate::flowcache`]).
#[derive(Clone, Copy, Debug)]
pub(super) struct Fill {
    idx: u32,
    lock: u32,
    via: u32,
    via_lock: u32,
    state: u32,
}

impl Fill {
    /// The fill for a hit just handled (touched), if the next packets of
    /// the connection may reuse its answer: a plain packet (no SYN, FIN or
    /// RST), an IPv4 header without options, a connection past its
    /// handshake; and a switch with a cache.
    #[inline(always)]
    pub(super) fn of(hit: &Hit, slot: &ConnSlot, l4: &L4, flows: &FlowCache) -> Option<Fill> {
        if !l4.cacheable() || flows.capacity() == 0 {
            return None;
        }
        let state = slot.tcp_state.load(Ordering::Relaxed);
        // Stable lock words are bare sequence numbers (see conntrack).
        let (Ok(lock), Ok(via_lock)) = (u32::try_from(hit.lock), u32::try_from(hit.via_lock))
        else {
            return None;
        };
        // Half-open and provisional entries are not cached: their next
        // packets may change their state (see `state::next_state`).
        matches!(state, STATE_ESTABLISHED | STATE_CLOSING | STATE_ACTIVE).then_some(Fill {
            idx: hit.idx,
            lock,
            via: hit.via,
            via_lock,
            state,
        })
    }
}

/// A known connection's packet answered from the flow cache: the rewrite
/// and updates the full path would make (see [`crate::flowcache`] for
/// when an entry may answer) and its `Verdict::Tx` (egress port, length),
/// or `None` to take the full path. Changes nothing before it knows it
/// answers.
#[inline(always)]
pub(super) fn cached(frame: &mut [u8], l4: &L4, ctx: &mut Ctx<'_>) -> Option<(u32, usize)> {
    const ETH: usize = wire::ETHERNET_HEADER_LEN;
    if !l4.cacheable() {
        return None;
    }
    let (eth, rest) = frame.split_first_chunk_mut::<ETH>()?;
    let (ip, l4h) = rest.split_first_chunk_mut::<20>()?;
    // 18 bytes whatever the protocol (`frame` is the whole buffer): a UDP
    // rewrite writes only within its 8-byte header, and the fixed size
    // lets the compiler drop the bounds checks.
    let l4h = l4h.first_chunk_mut::<18>()?;
    let ttl = ip[8];
    if ttl <= 1 {
        return None;
    }
    let now = ctx.now_ms;
    let e = ctx.flows.get_mut(l4.home, l4.words.0, l4.words.1)?;
    let fresh = e.checked_ms == now && e.pend_pkts < u16::MAX;
    if fresh {
        // Checked in this millisecond: the slot is not read (see
        // `flowcache`); the counts wait in the entry.
        e.pend_pkts += 1;
        // At most 65,535 packets of at most 65,535 bytes.
        e.pend_bytes += u32::from(l4.ip_len);
    } else {
        let slot = ctx.ct.slot(e.idx);
        let lock = e.lock as u64;
        let via = ctx.ct.slot(e.via);
        if slot.lock.load(Ordering::Acquire) != lock
            || (e.via != e.idx && via.lock.load(Ordering::Acquire) != e.via_lock as u64)
            // The slot the key was found in still holds the key's
            // addresses: guards against a 32-bit sequence coming round to
            // the same value (2^31 rewrites of one slot within one epoch).
            || via.words[1].load(Ordering::Relaxed) != e.addrs
        {
            return None;
        }
        let state = slot.tcp_state.load(Ordering::Relaxed);
        let last = slot.last_seen.load(Ordering::Relaxed);
        // The state and time read above belong to the entry only if no
        // insert claimed the slot meanwhile (it writes them while holding
        // the lock).
        core::sync::atomic::fence(Ordering::Acquire);
        if slot.lock.load(Ordering::Relaxed) != lock || state != e.state() as u32 {
            return None;
        }
        let timeout = ctx.timeouts.for_state(l4.key().proto, state);
        let age = now.wrapping_sub(last) as i32;
        if age > 0 && (age as u32).saturating_add(flowcache::EXPIRY_MARGIN_MS) > timeout {
            return None;
        }
        // Known to answer: the full path's touch of a plain packet (no
        // state change), with the counts that waited in the entry.
        if last != now {
            slot.last_seen.store(now, Ordering::Relaxed);
        }
        // A reply's counts go to its reply slot (see `state::touch`).
        let counted = if e.via != e.idx { via } else { slot };
        counted.add_counts(
            1 + u64::from(e.pend_pkts),
            u64::from(l4.ip_len) + u64::from(e.pend_bytes),
        );
        (e.pend_pkts, e.pend_bytes, e.checked_ms) = (0, 0, now);
    }
    let (port, rewrite, head) = (e.port, e.rewrite(), e.dst_mac_head());
    let (new_addr, new_port, d_ip, d_l4) = (e.new_addr, e.new_port, e.d_ip, e.d_l4);
    ctx.flows.note_fresh(u32::from(fresh));
    // Checksums adjusted in the machine's byte order (see `Entry::d_ip`).
    ip[8] = ttl - 1;
    let c = checksum::adjust_ne(u16::from_ne_bytes([ip[10], ip[11]]), d_ip);
    ip[10..12].copy_from_slice(&c.to_ne_bytes());
    if let Some((at, pat)) = flowcache::rewrite_offsets(rewrite) {
        let tcp = l4.words.1 as u8 == PROTO_TCP;
        let csum_at = if tcp { 16 } else { 6 };
        ip[at..at + 4].copy_from_slice(&new_addr);
        l4h[pat..pat + 2].copy_from_slice(&new_port);
        let old = u16::from_ne_bytes([l4h[csum_at], l4h[csum_at + 1]]);
        let c = checksum::adjust_ne(old, d_l4);
        let c = if tcp { c } else { checksum::udp_field(old, c) };
        l4h[csum_at..csum_at + 2].copy_from_slice(&c.to_ne_bytes());
    }
    // Two 8-byte stores: the destination MAC (and two bytes the second
    // overwrites), then the source MAC and the ethertype (IPv4 already).
    eth[..8].copy_from_slice(&head);
    eth[6..].copy_from_slice(ctx.flows.src_mac_type(port));
    let hit = if rewrite == flowcache::REWRITE_SRC {
        Counter::ReplyHit
    } else {
        Counter::FwdHit
    };
    ctx.counters[hit as usize] += 1;
    ctx.counters[Counter::FlowCacheHit as usize] += 1;
    Some((port as u32, l4.frame_len as usize))
}
