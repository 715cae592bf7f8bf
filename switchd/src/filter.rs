//! The packet filter: one frame in, one verdict out.
//!
//! Pure over the frame bytes and the table views in [`Ctx`]; it performs no
//! I/O, no allocation and no system call. The engine calls it per frame and
//! acts on the [`Verdict`]. See DESIGN.md §3 for the decision list; the
//! code below follows it step by step.

use core::sync::atomic::Ordering;

use shm_layout::config_slot::{
    ConfigView, MODE_NAT, MODE_TUNNEL, ON_DOWN_KEEP, ON_DOWN_RESET, PROTO_TCP, PROTO_UDP,
    ServiceRec,
};
use shm_layout::conntrack::{
    CONN_MIDFLOW, Conn, ConnSlot, ConnTable, Direction, Evicted, FlowKey, Hit, InsertError,
    STATE_ACTIVE, STATE_CLOSING, STATE_ESTABLISHED, STATE_PROVISIONAL, STATE_SYN, STATE_SYN_ACKED,
    Timeouts, holds_reservation,
};
use shm_layout::ring::{Ring, midflow_event};
use shm_layout::routing_slot::{NoRoute, RoutingView};
use shm_layout::switch_slot::{BackendCounters, Counter, N_COUNTERS};

use crate::flowcache::{self, FlowCache};
use crate::hops::HopCache;
use crate::sched::{self, Pick, SchedState};
use crate::wire::{self, checksum, ipip, tcp};

/// What to do with a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Transmit `len` bytes on global port `port`.
    Tx { port: u32, len: usize },
    /// Drop it; the reason was counted.
    Drop,
    /// A new connection whose eligible backends are all at their
    /// `max_conns`: the engine may hold the frame (a copy) for up to
    /// `timeout_ms` and run it through the filter again, or refuse it
    /// with [`refuse`]. Nothing was counted or changed.
    Hold { timeout_ms: u32 },
}

/// Everything the filter reads and writes besides the frame.
pub struct Ctx<'a> {
    pub cfg: ConfigView<'a>,
    pub rt: RoutingView<'a>,
    pub ct: ConnTable<'a>,
    pub backends: &'a [BackendCounters],
    pub events: Option<Ring<'a>>,
    pub timeouts: Timeouts,
    pub now_ms: u32,
    pub pid: u32,
    /// Local counters, published by the engine (every 100 µs under load,
    /// and on the first loop that finds no frame).
    pub counters: &'a mut [u64; N_COUNTERS],
    /// This switch's scheduler state (`wrr` credits); it lives as long as
    /// the engine's loop (no allocation per packet).
    pub sched: SchedState,
    /// Next hops already looked up in `rt` (synced with `rt`'s stamp).
    pub hops: HopCache,
    /// Answers of the full path for known connections (synced with the
    /// stamps of `cfg` and `rt`; see [`crate::flowcache`]).
    pub flows: FlowCache,
    /// ICMP answers this switch may still send (a token bucket the engine
    /// refills between loops; see [`IcmpBudget`]).
    pub icmp_tokens: u32,
}

/// The rate limit of ICMP answers (and of RSTs for VIP ports without a
/// service) per switch: a token bucket of [`IcmpBudget::BURST`] refilled
/// at [`IcmpBudget::PER_SECOND`]. An oversized packet costs one ICMP
/// answer, smaller than itself, but a flood of them must not turn the
/// switch into an ICMP (or RST) generator.
#[derive(Clone, Copy, Debug)]
pub struct IcmpBudget {
    tokens: u32,
    last_ns: u64,
}

impl IcmpBudget {
    pub const PER_SECOND: u64 = 1000;
    pub const BURST: u32 = 100;

    pub fn new(now_ns: u64) -> Self {
        Self {
            tokens: Self::BURST,
            last_ns: now_ns,
        }
    }

    /// Tokens available at `now_ns` (refilled since the last call).
    #[inline]
    pub fn take(&mut self, now_ns: u64) -> u32 {
        let per_token = 1_000_000_000 / Self::PER_SECOND;
        let earned = now_ns.saturating_sub(self.last_ns) / per_token;
        if earned > 0 {
            self.tokens = (self.tokens as u64 + earned).min(Self::BURST as u64) as u32;
            self.last_ns += earned * per_token;
        }
        core::mem::take(&mut self.tokens)
    }

    /// Returns the tokens a loop did not use.
    #[inline]
    pub fn put_back(&mut self, unused: u32) {
        self.tokens = (self.tokens + unused).min(Self::BURST);
    }
}

impl core::fmt::Debug for Ctx<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Ctx")
            .field("now_ms", &self.now_ms)
            .finish_non_exhaustive()
    }
}

impl Ctx<'_> {
    #[inline]
    fn count(&mut self, c: Counter) {
        self.counters[c as usize] += 1;
    }

    #[inline]
    fn drop(&mut self, c: Counter) -> Verdict {
        self.count(c);
        Verdict::Drop
    }

    #[inline]
    fn expired(&self, slot: &ConnSlot) -> bool {
        slot.expired(self.now_ms, &self.timeouts)
    }
}

/// Parsed facts about an IPv4 TCP/UDP packet that the decision needs.
#[derive(Clone, Copy, Debug)]
struct L4 {
    /// TCP flags (0 for UDP).
    flags: u8,
    /// Offset of the L4 header in the frame.
    l4_off: u8,
    /// Frame length as the IP header says (Ethernet padding excluded).
    frame_len: u16,
    ip_len: u16,
    /// See [`L4::cacheable`] (decided once, read on every pass).
    cacheable: bool,
    /// The connection table's home slot for `key` (filled in once the
    /// frame is known to be TCP/UDP over IPv4).
    home: u32,
    /// The packet's key as the table's hash mixes it ([`FlowKey::words`]);
    /// the flow cache's key too. [`L4::key`] decodes it.
    words: (u64, u64),
}

impl L4 {
    /// The 5-tuple.
    #[inline(always)]
    fn key(&self) -> FlowKey {
        FlowKey::from_words(self.words)
    }

    /// A packet the flow cache may answer: no SYN, FIN or RST (those open
    /// or close a connection, or may change its state), and an IPv4 header
    /// without options.
    #[inline(always)]
    fn cacheable(&self) -> bool {
        self.cacheable
    }

    /// The facts of a parsed packet, its home slot not yet known.
    #[inline(always)]
    fn new(words: (u64, u64), flags: u8, l4_off: usize, ip_len: usize) -> Self {
        Self {
            words,
            flags,
            l4_off: l4_off as u8,
            frame_len: (wire::ETHERNET_HEADER_LEN + ip_len) as u16,
            ip_len: ip_len as u16,
            cacheable: flags & (tcp::SYN | tcp::FIN | tcp::RST) == 0
                && l4_off == wire::ETHERNET_HEADER_LEN + 20,
            home: 0,
        }
    }

    /// (TCP at all, a connection-opening SYN (no ACK), a RST).
    #[inline(always)]
    fn tcp_kind(&self) -> (bool, bool, bool) {
        let is_tcp = self.words.1 as u8 == PROTO_TCP;
        let syn = is_tcp && self.flags & tcp::SYN != 0 && self.flags & tcp::ACK == 0;
        let rst = is_tcp && self.flags & tcp::RST != 0;
        (is_tcp, syn, rst)
    }
}

/// What the engine's first pass over a burst learned of one frame (see
/// [`pre`]): the common-case parse and its table slot, already being
/// fetched, or nothing (the frame goes the whole way through [`process`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct Pre(Option<L4>);

/// First pass over a burst: parses a common-case IPv4 TCP/UDP frame
/// (`frame` is its `len` bytes) and starts loading its connection slot
/// (and its flow-cache set's first way), so the second pass
/// ([`answer_pre`], then [`process_missed`]) finds them in cache and parses
/// nothing again. Writes its facts into `out` (the engine's per-burst array), or
/// nothing for frames it leaves to [`process`]; reads only what it
/// bounds-checks.
#[inline(always)]
pub fn pre(frame: &[u8], ct: &ConnTable<'_>, flows: &FlowCache, out: &mut Pre) {
    out.0 = None;
    if frame.get(12..14) != Some(&[0x08, 0x00]) {
        return;
    }
    let Some(mut l4) = parse_ip_common(frame) else {
        return;
    };
    let home = ct.home_of(l4.words);
    // The flow cache answers neither a SYN, FIN or RST nor a header with
    // options (see `cached`): their sets are not loaded (a new
    // connection's would be a miss for nothing), their slots are. For
    // the rest, [`look`] decides which slot to load once the set is in.
    if l4.cacheable() {
        flows.prefetch(home as u32);
        if flows.slots_ahead() {
            ct.prefetch(home);
        }
    } else {
        ct.prefetch(home);
    }
    l4.home = home as u32;
    out.0 = Some(l4);
}

/// Between the engine's two passes over a burst, with the burst's
/// flow-cache lines on their way: starts loading the table slots the
/// second pass will read for a frame [`pre`] left to it. An entry checked
/// in this millisecond needs none (see [`crate::flowcache`]); one due for
/// its check needs its connection's slot and the slot the key was found
/// in; a miss needs the key's home slot for the full path. Changes
/// nothing.
#[inline(always)]
pub fn look(pre: &Pre, ct: &ConnTable<'_>, flows: &FlowCache, now_ms: u32) {
    let Some(l4) = &pre.0 else {
        return;
    };
    if !l4.cacheable() || flows.first_way_checked_at(l4.home) == now_ms {
        // The set's first way, checked in this millisecond, is almost
        // always this flow's entry (a guess: this only loads lines).
        return;
    }
    match flows.get(l4.home, l4.words.0, l4.words.1) {
        Some(e) if e.checked_ms == now_ms => {}
        Some(e) => {
            ct.prefetch(e.idx as usize);
            if e.via != e.idx {
                ct.prefetch(e.via as usize);
            }
        }
        None => ct.prefetch(l4.home as usize),
    }
}

/// [`process`] for a frame that went through [`pre`] (same frame, same
/// length; `frame` the whole buffer, as for [`process`]): the same
/// verdict, without parsing it again. The engine calls its two halves,
/// [`answer_pre`] then [`process_missed`], itself (so that a cached
/// answer's port and length stay in registers); keep the two in step.
#[inline]
pub fn process_pre(
    frame: &mut [u8],
    len: usize,
    pre: &Pre,
    in_port: u32,
    port_mac: &impl Fn(u32) -> Option<[u8; 6]>,
    ctx: &mut Ctx<'_>,
) -> Verdict {
    match answer_pre(frame, pre, ctx) {
        Some((port, len)) => Verdict::Tx { port, len },
        None => process_missed(frame, len, pre, in_port, port_mac, ctx),
    }
}

/// The flow cache's answer for a frame that went through [`pre`]: its
/// egress port and length (`Verdict::Tx`'s fields; the frame is rewritten
/// and everything counted), or `None`: [`process_missed`] decides.
#[inline(always)]
pub fn answer_pre(frame: &mut [u8], pre: &Pre, ctx: &mut Ctx<'_>) -> Option<(u32, usize)> {
    cached(frame, pre.0.as_ref()?, ctx)
}

/// [`process_pre`] for a frame [`answer_pre`] did not answer.
#[inline]
pub fn process_missed(
    frame: &mut [u8],
    len: usize,
    pre: &Pre,
    in_port: u32,
    port_mac: &impl Fn(u32) -> Option<[u8; 6]>,
    ctx: &mut Ctx<'_>,
) -> Verdict {
    match &pre.0 {
        Some(l4) => decide(frame, l4, in_port, port_mac, ctx),
        None => process(frame, len, in_port, port_mac, ctx),
    }
}

/// The full path of an IPv4 TCP/UDP packet (the flow cache did not answer).
#[inline(always)]
fn decide(
    frame: &mut [u8],
    l4: &L4,
    in_port: u32,
    port_mac: &impl Fn(u32) -> Option<[u8; 6]>,
    ctx: &mut Ctx<'_>,
) -> Verdict {
    if is_vip(&ctx.cfg, l4.key().dst_ip) {
        to_vip(frame, l4, in_port, port_mac, ctx)
    } else {
        from_backend(frame, l4, port_mac, ctx)
    }
}

/// Runs the filter on one frame received on global port `in_port`.
/// `port_mac(p)` gives the MAC of global port `p` (`None` if this switch
/// does not serve it). `frame` is the frame's whole buffer (the NIC's, at
/// least 2048 bytes; `len` of them are the frame), as for [`process_pre`]:
/// a rewrite may grow the frame (tunnel), and the flow cache writes its
/// answers through fixed-size header arrays (a shorter slice only makes
/// it miss).
#[inline]
pub fn process(
    frame: &mut [u8],
    len: usize,
    in_port: u32,
    port_mac: &impl Fn(u32) -> Option<[u8; 6]>,
    ctx: &mut Ctx<'_>,
) -> Verdict {
    let frame_len = len.min(frame.len());
    let Ok(eth) = wire::EthernetFrame::new_checked(&frame[..frame_len]) else {
        return ctx.drop(Counter::DropMalformed);
    };
    match eth.ethertype() {
        wire::ETHERTYPE_IPV4 => {}
        wire::ETHERTYPE_ARP => return arp(frame, frame_len, in_port, port_mac, ctx),
        _ => return ctx.drop(Counter::DropNonIp),
    }
    let mut l4 = match parse_ip(&frame[..frame_len], ctx) {
        Ok(l4) => l4,
        Err(v) => return v,
    };
    l4.home = ctx.ct.home_of(l4.words) as u32;
    match cached(frame, &l4, ctx) {
        Some((port, len)) => Verdict::Tx { port, len },
        None => decide(frame, &l4, in_port, port_mac, ctx),
    }
}

/// The 5-tuple of an IPv4 TCP/UDP frame, read without validation (for
/// prefetching and for recognising a queued flow); `None` if the bytes it
/// needs are missing or it is not IPv4 TCP/UDP.
#[inline]
pub fn peek_key(frame: &[u8]) -> Option<FlowKey> {
    const ETH: usize = wire::ETHERNET_HEADER_LEN;
    if frame.len() < ETH + 24 || frame[12..14] != [0x08, 0x00] || frame[ETH] >> 4 != 4 {
        return None;
    }
    let hl = (frame[ETH] & 0xf) as usize * 4;
    let proto = frame[ETH + 9];
    if (proto != PROTO_TCP && proto != PROTO_UDP) || frame.len() < ETH + hl + 4 {
        return None;
    }
    let ip =
        |at: usize| u32::from_be_bytes([frame[at], frame[at + 1], frame[at + 2], frame[at + 3]]);
    let port = |at: usize| u16::from_be_bytes([frame[at], frame[at + 1]]);
    Some(FlowKey {
        proto,
        src_ip: ip(ETH + 12),
        dst_ip: ip(ETH + 16),
        src_port: port(ETH + hl),
        dst_port: port(ETH + hl + 2),
    })
}

/// Validates the IPv4 and TCP/UDP headers (the same rules as the `wire`
/// views' checked constructors, read straight from fixed-size header
/// arrays so the compiler drops every bounds check after the first) and
/// returns the facts the decision needs.
#[inline]
fn parse_ip(frame: &[u8], ctx: &mut Ctx<'_>) -> Result<L4, Verdict> {
    match parse_ip_common(frame) {
        Some(l4) => Ok(l4),
        None => parse_ip_any(frame, ctx),
    }
}

/// The common case of [`parse_ip`], read from one fixed-size array: a
/// 20-byte IPv4 header (no options) and a TCP header or UDP datagram that
/// pass every check of [`parse_ip_any`]. `None` leaves the frame to it
/// (options, fragments, other protocols, short or bad frames).
#[inline(always)]
fn parse_ip_common(frame: &[u8]) -> Option<L4> {
    const ETH: usize = wire::ETHERNET_HEADER_LEN;
    const L4_OFF: usize = ETH + 20;
    let f = frame.first_chunk::<{ L4_OFF + 20 }>()?;
    let be16 = |at: usize| u16::from_be_bytes([f[at], f[at + 1]]);
    let total = be16(ETH + 2) as usize;
    // Version 4, 20-byte header, not a fragment, length within the frame.
    if f[ETH] != 0x45 || be16(ETH + 6) & 0x3fff != 0 || total < 20 || ETH + total > frame.len() {
        return None;
    }
    let h: &[u8; 20] = f[ETH..L4_OFF].try_into().ok()?;
    if !checksum::ipv4_header_ok(h) {
        return None;
    }
    let proto = f[ETH + 9];
    let l4_len = total - 20;
    let flags = match proto {
        PROTO_TCP => {
            let doff = (f[L4_OFF + 12] >> 4) as usize * 4;
            // An impossible flag set is left to `parse_ip_any`, which
            // counts it.
            if doff < 20 || doff > l4_len || tcp_flags_impossible(f[L4_OFF + 13]) {
                return None;
            }
            f[L4_OFF + 13]
        }
        PROTO_UDP => {
            // Exactly the IP payload (see `parse_ip_any`).
            if be16(L4_OFF + 4) as usize != l4_len {
                return None;
            }
            0
        }
        _ => return None,
    };
    // FlowKey::words straight from the bytes: both addresses, then both
    // ports and the protocol.
    let ports = u32::from_be_bytes([f[L4_OFF], f[L4_OFF + 1], f[L4_OFF + 2], f[L4_OFF + 3]]);
    let words = (
        u64::from_be_bytes([f[26], f[27], f[28], f[29], f[30], f[31], f[32], f[33]]),
        (ports as u64) << 16 | proto as u64,
    );
    Some(L4::new(words, flags, L4_OFF, total))
}

/// [`parse_ip`] for every frame: options, short frames, and the verdict
/// (counted) of a frame that fails.
#[cold]
fn parse_ip_any(frame: &[u8], ctx: &mut Ctx<'_>) -> Result<L4, Verdict> {
    const ETH: usize = wire::ETHERNET_HEADER_LEN;
    let be16 = |b: &[u8], at: usize| u16::from_be_bytes([b[at], b[at + 1]]);
    let Some(h) = frame.get(ETH..).and_then(|b| b.first_chunk::<20>()) else {
        return Err(ctx.drop(Counter::DropMalformed));
    };
    let hl = (h[0] & 0xf) as usize * 4;
    let total = be16(h, 2) as usize;
    if h[0] >> 4 != 4 || hl < 20 || total < hl || ETH + total > frame.len() {
        return Err(ctx.drop(Counter::DropMalformed));
    }
    let sum = if hl == 20 {
        checksum::sum(h, 0)
    } else {
        checksum::sum(&frame[ETH..ETH + hl], 0)
    };
    if checksum::fold(sum) != 0xffff {
        return Err(ctx.drop(Counter::DropMalformed));
    }
    if be16(h, 6) & 0x3fff != 0 {
        return Err(ctx.drop(Counter::DropFragment));
    }
    let proto = h[9];
    let l4_off = ETH + hl;
    let l4 = &frame[l4_off..ETH + total];
    let (src_port, dst_port, flags) = match proto {
        PROTO_TCP => match l4.first_chunk::<20>() {
            Some(t) if tcp_flags_impossible(t[13]) => return Err(ctx.drop(Counter::DropBadFlags)),
            Some(t) if (t[12] >> 4) as usize * 4 >= 20 && (t[12] >> 4) as usize * 4 <= l4.len() => {
                (be16(t, 0), be16(t, 2), t[13])
            }
            _ => return Err(ctx.drop(Counter::DropMalformed)),
        },
        // A UDP length other than the IP payload's: either bytes the IP
        // header carries that the datagram disowns, or a datagram longer
        // than its packet. A receiver's stack would take either its own
        // way; the appliance forwards neither (issue 22 item 5).
        PROTO_UDP => match l4.first_chunk::<8>() {
            Some(u) if be16(u, 4) as usize >= 8 && be16(u, 4) as usize == l4.len() => {
                (be16(u, 0), be16(u, 2), 0)
            }
            Some(_) => return Err(ctx.drop(Counter::DropUdpLength)),
            _ => return Err(ctx.drop(Counter::DropMalformed)),
        },
        _ => return Err(ctx.drop(Counter::DropNotOurs)),
    };
    let key = FlowKey {
        proto,
        src_ip: u32::from_be_bytes([h[12], h[13], h[14], h[15]]),
        dst_ip: u32::from_be_bytes([h[16], h[17], h[18], h[19]]),
        src_port,
        dst_port,
    };
    Ok(L4::new(key.words(), flags, l4_off, total))
}

/// A TCP flag set no real stack sends: SYN with FIN or RST, or none of
/// FIN, SYN, RST, PSH, ACK and URG (a "null" segment). Dropped and counted
/// in `drop_bad_flags` wherever it comes from.
#[inline(always)]
fn tcp_flags_impossible(flags: u8) -> bool {
    const SYN_FIN: u8 = tcp::SYN | tcp::FIN;
    const SYN_RST: u8 = tcp::SYN | tcp::RST;
    flags & SYN_FIN == SYN_FIN || flags & SYN_RST == SYN_RST || flags & 0x3f == 0
}

/// A source address no client of a VIP can have (RFC 1122 3.2.1.3, RFC
/// 5735): "this network" 0.0.0.0/8, loopback 127.0.0.0/8, multicast
/// 224.0.0.0/4, reserved 240.0.0.0/4 (with the limited broadcast
/// 255.255.255.255), and any VIP of this appliance. A backend's address
/// from the client side is judged in [`new_flow`], where the service is known.
#[inline]
fn martian_source(cfg: &ConfigView<'_>, src: u32) -> bool {
    let top = src >> 24;
    top == 0 || top == 127 || top >= 224 || is_vip(cfg, src)
}

/// Whether a packet from `src` received on port `in_port` claims the
/// address of one of `svc`'s backends while arriving from another side
/// than the one routes to that backend lead to (a spoofed backend source,
/// which would make the backend talk to itself through the VIP).
fn backend_spoofed(ctx: &mut Ctx<'_>, svc: &ServiceRec, src: u32, in_port: u32) -> bool {
    if !ctx.cfg.service_backends(svc).iter().any(|b| b.ip == src) {
        return false;
    }
    // Without a next hop for it the side is unknown: not judged here
    // (the flow is refused for its own reasons, or forwarded).
    matches!(ctx.hops.next_hop(&ctx.rt, src), Ok(hop) if hop.port != in_port)
}

#[inline]
fn is_vip(cfg: &ConfigView<'_>, ip: u32) -> bool {
    cfg.is_vip(ip)
}

#[inline]
fn find_service<'a>(cfg: &ConfigView<'a>, k: &FlowKey) -> Option<(usize, &'a ServiceRec)> {
    cfg.find_service(k.dst_ip, k.dst_port, k.proto)
}

fn arp(
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

/// Client -> VIP. A packet of a known connection is handled here, inline;
/// a new connection in [`new_flow`].
#[inline(always)]
fn to_vip(
    frame: &mut [u8],
    l4: &L4,
    in_port: u32,
    port_mac: &impl Fn(u32) -> Option<[u8; 6]>,
    ctx: &mut Ctx<'_>,
) -> Verdict {
    let (is_tcp, syn, rst) = l4.tcp_kind();
    let found = ctx.ct.lookup_at(&l4.key(), l4.home as usize);
    if let Some(hit) = &found
        && hit.dir == Direction::Forward
    {
        let slot = ctx.ct.slot(hit.idx);
        if !ctx.expired(slot) {
            // One byte per forward hit: what to do if its backend is DOWN.
            let down = ctx.cfg.down_action(hit.conn().backend_id);
            if down != ON_DOWN_KEEP && !rst && (syn || !is_tcp) {
                // The flow can move (a UDP flow, or a TCP SYN: nothing was
                // exchanged yet): schedule it afresh below.
                stale_answers(l4, hit, ctx);
                move_off_down(hit, ctx);
            } else if down == ON_DOWN_RESET && !rst {
                return reset_down(frame, l4, hit, in_port, ctx);
            } else if syn
                && matches!(
                    slot.tcp_state.load(Ordering::Relaxed),
                    STATE_CLOSING | STATE_PROVISIONAL
                )
            {
                // A new connection on the 5-tuple of a closed one (which
                // gave its slot back), or of an unconfirmed pickup (which
                // never took one): it is scheduled afresh.
                stale_answers(l4, hit, ctx);
                retire(hit, ctx);
            } else {
                ctx.count(Counter::FwdHit);
                match touch(ctx, slot, hit, l4) {
                    Moved::Closed => release_backend(ctx, hit.conn().backend_id),
                    Moved::Confirmed => ctx.count(Counter::ConnConfirmed),
                    Moved::Stay | Moved::SynAcked => {}
                }
                let fill = Fill::of(hit, slot, l4, &ctx.flows);
                return forward(frame, l4, &hit.conn(), in_port, port_mac, fill, ctx);
            }
        }
    }
    new_flow(frame, l4, in_port, port_mac, ctx)
}

/// Client -> VIP with no live entry to follow: schedule, insert, forward
/// (or refuse, hold, drop).
#[inline(never)]
fn new_flow(
    frame: &mut [u8],
    l4: &L4,
    in_port: u32,
    port_mac: &impl Fn(u32) -> Option<[u8; 6]>,
    ctx: &mut Ctx<'_>,
) -> Verdict {
    let (is_tcp, syn, rst) = l4.tcp_kind();
    let key = l4.key();
    // Issue 22 item 5: no entry, no answer, nothing forwarded for a source
    // no client can have (checked here, where entries are made: a martian
    // never gets one, so the hit path needs no check).
    if martian_source(&ctx.cfg, key.src_ip) {
        return ctx.drop(Counter::DropMartian);
    }
    let Some((svc_idx, svc)) = find_service(&ctx.cfg, &key) else {
        if !is_tcp {
            return ctx.drop(Counter::DropNoServiceUdp);
        }
        if rst {
            return ctx.drop(Counter::DropTcpNoEntry);
        }
        // RSTs come out of the answer budget the ICMP answers use: a flood
        // to unserved ports must not make the switch a RST generator.
        if ctx.icmp_tokens == 0 {
            return ctx.drop(Counter::RstRateLimited);
        }
        return match wire::tcp_rst_in_place(frame, l4.frame_len as usize) {
            Ok(n) => {
                ctx.icmp_tokens -= 1;
                ctx.count(Counter::RstSent);
                Verdict::Tx {
                    port: in_port,
                    len: n,
                }
            }
            Err(_) => ctx.drop(Counter::DropMalformed),
        };
    };
    if backend_spoofed(ctx, svc, key.src_ip, in_port) {
        return ctx.drop(Counter::DropMartian);
    }
    let (backend, reserved) = match schedule(svc, &key, syn || !is_tcp, ctx) {
        Ok(b) => b,
        Err(Pick::Full) if svc.queue_timeout_ms > 0 => {
            return Verdict::Hold {
                timeout_ms: u32::from(svc.queue_timeout_ms),
            };
        }
        // Full, and this service does not queue: refused at once.
        Err(Pick::Full) => return refuse(frame, l4.frame_len as usize, in_port, ctx),
        Err(_) => return ctx.drop(Counter::DropNoBackend),
    };
    let conn = Conn {
        proto: key.proto,
        mode: svc.mode,
        flags: if is_tcp && !syn { CONN_MIDFLOW } else { 0 },
        backend_id: backend.id,
        client_ip: key.src_ip,
        client_port: key.src_port,
        vip: key.dst_ip,
        vip_port: key.dst_port,
        backend_ip: backend.ip,
        backend_port: backend.port,
        service: svc_idx as u16,
        created_ms: ctx.now_ms,
    };
    if rst {
        // Never create state for a RST; send it where the connection lives.
        ctx.count(Counter::DropTcpNoEntry);
        return forward(frame, l4, &conn, in_port, port_mac, None, ctx);
    }
    // Only a SYN or a UDP datagram got a reservation (see `schedule`).
    debug_assert_eq!(reserved, syn || !is_tcp);
    // A mid-flow pickup is provisional (short timeout, no reservation)
    // until the flow proves itself (see `touch`): a spoofed segment must
    // not hold a slot of the table or of its backend for long.
    let state = match (is_tcp, syn) {
        (false, _) => STATE_ACTIVE,
        (true, true) => STATE_SYN,
        (true, false) => STATE_PROVISIONAL,
    };
    let conn = match insert(&conn, state, reserved, ctx) {
        Ok(c) => c,
        Err(v) => return v,
    };
    if conn.flags & CONN_MIDFLOW != 0 {
        ctx.count(Counter::ConnMidflow);
        if let Some(r) = &ctx.events {
            r.push(midflow_event(&conn, ctx.now_ms));
        }
    } else {
        ctx.count(Counter::ConnNew);
    }
    forward(frame, l4, &conn, in_port, port_mac, None, ctx)
}

/// Makes the flow cache check the slot again before it answers for
/// either direction of a connection this switch is about to retire (its
/// answers may be from this very millisecond, which no check would
/// catch: see `flowcache`).
#[cold]
fn stale_answers(l4: &L4, hit: &Hit, ctx: &mut Ctx<'_>) {
    ctx.flows.stale(l4.home, l4.words, ctx.now_ms);
    let reply = hit.conn().reply_key().words();
    let home = ctx.ct.home_of(reply) as u32;
    ctx.flows.stale(home, reply, ctx.now_ms);
}

/// Removes the entry of a flow leaving its DOWN backend (the scheduler,
/// which no longer lists that backend, then picks the flow's new one). The
/// NAT reply slot is left to the GC; late replies from the old backend no
/// longer match. If another switch changed the entry first, nothing is done.
fn move_off_down(hit: &Hit, ctx: &mut Ctx<'_>) {
    if retire(hit, ctx) {
        ctx.count(Counter::DownMoved);
    }
}

/// Removes a connection's entry (if no other switch changed it first) and
/// gives back its backend slot if it still held one. Returns whether it
/// removed the entry.
fn retire(hit: &Hit, ctx: &mut Ctx<'_>) -> bool {
    // Only the entry the lookup read: its lock word unchanged.
    let res = ctx
        .ct
        .snapshot(hit.idx)
        .filter(|s| s.lock == hit.lock)
        .and_then(|s| ctx.ct.retire(hit.idx, &s, ctx.pid));
    if res == Some(true) {
        release_backend(ctx, hit.conn().backend_id);
    }
    res.is_some()
}

/// Gives back one connection slot of backend `id`.
#[inline]
fn release_backend(ctx: &Ctx<'_>, id: u32) {
    if let Some(b) = ctx.backends.get(id as usize) {
        sched::release(b);
    }
}

/// Policy reset: an established TCP connection to a DOWN backend is
/// answered with a RST from the VIP, so the client fails fast and
/// reconnects; the entry closes (it expires after `tcp_fin`).
fn reset_down(frame: &mut [u8], l4: &L4, hit: &Hit, in_port: u32, ctx: &mut Ctx<'_>) -> Verdict {
    // Closed under the lock the lookup read (see `touch`).
    if ctx.ct.slot(hit.idx).tcp_state.load(Ordering::Relaxed) != STATE_CLOSING
        && ctx.ct.update_state(hit, ctx.pid, |state| {
            // A provisional entry held no reservation to give back.
            holds_reservation(state.swap(STATE_CLOSING, Ordering::AcqRel))
        }) == Some(true)
    {
        release_backend(ctx, hit.conn().backend_id);
    }
    match wire::tcp_rst_in_place(frame, l4.frame_len as usize) {
        Ok(n) => {
            ctx.count(Counter::DownRst);
            Verdict::Tx {
                port: in_port,
                len: n,
            }
        }
        Err(_) => ctx.drop(Counter::DropMalformed),
    }
}

/// Inserts a new connection; on a race with another switch inserting the
/// same flow, uses the winner's entry. `reserved`: the scheduler already
/// took the backend slot (given back if the insert does not happen);
/// otherwise (mid-flow recovery: the connection exists at the backend
/// already) one is taken here, whatever the limit.
///
/// An entry the insert found ([`InsertError::Exists`]) but that was gone
/// or being rewritten by the time it was read back (see [`existing`])
/// sends the insert round again, [`INSERT_TRIES`] times in all; a flow
/// whose slot keeps changing that long is dropped (counted in
/// `drop_table_full`), never sent with an entry that is not its own.
fn insert(conn: &Conn, state: u32, reserved: bool, ctx: &mut Ctx<'_>) -> Result<Conn, Verdict> {
    insert_tries(conn, state, reserved, INSERT_TRIES, ctx)
}

/// [`insert`] with `tries` left.
fn insert_tries(
    conn: &Conn,
    state: u32,
    reserved: bool,
    tries: usize,
    ctx: &mut Ctx<'_>,
) -> Result<Conn, Verdict> {
    let with_reply = conn.mode == MODE_NAT;
    let res = {
        let c = &*ctx;
        c.ct.insert(conn, with_reply, c.now_ms, state, c.pid, |s| c.expired(s))
    };
    let b = ctx.backends.get(conn.backend_id as usize);
    match res {
        Ok(ins) => {
            if let Some(b) = b {
                // A provisional entry takes its reservation when it is
                // confirmed (see `change_state`), not here.
                if !reserved && holds_reservation(state) {
                    sched::reserve(b, 0);
                }
                b.total.fetch_add(1, Ordering::Relaxed);
            }
            for id in ins.evicted_backends.into_iter().flatten() {
                release_backend(ctx, id);
            }
            for kind in ins.evicted_live.into_iter().flatten() {
                ctx.count(match kind {
                    Evicted::Provisional => Counter::EvictedProvisional,
                    Evicted::HalfOpen => Counter::EvictedHalfOpen,
                });
            }
            Ok(*conn)
        }
        Err(InsertError::Exists(idx)) => match existing(&ctx.ct, idx, conn) {
            Some(c) => {
                if let (Some(b), true) = (b, reserved) {
                    sched::release(b);
                }
                Ok(c)
            }
            // Gone or changing: the insert goes round again, keeping
            // the reservation.
            None if tries > 1 => insert_tries(conn, state, reserved, tries - 1, ctx),
            None => {
                if let (Some(b), true) = (b, reserved) {
                    sched::release(b);
                }
                Err(ctx.drop(Counter::DropTableFull))
            }
        },
        Err(InsertError::Full | InsertError::ReplyConflict) => {
            if let (Some(b), true) = (b, reserved) {
                sched::release(b);
            }
            Err(ctx.drop(Counter::DropTableFull))
        }
    }
}

/// How many times [`insert`] tries a flow whose found entry vanished.
const INSERT_TRIES: usize = 3;

/// The entry an insert of `conn` found in slot `idx`
/// ([`InsertError::Exists`]), read back: `None` unless the slot still
/// holds a forward entry of `conn`'s flow (another switch may have
/// retired it and a new connection, of any flow, taken the slot; or a
/// writer holds it right now).
fn existing(ct: &ConnTable<'_>, idx: u32, conn: &Conn) -> Option<Conn> {
    let found = ct.snapshot(idx)?.conn()?;
    (found.forward_key() == conn.forward_key()).then_some(found)
}

/// The backend of a packet to a VIP without an entry. A new connection
/// (`new`: a TCP SYN or a UDP datagram) goes to its service's scheduler,
/// which reserves a slot on the backend (`(backend, true)`), or says that
/// every eligible backend is full (`Err(Pick::Full)`: the caller holds or
/// refuses it). Anything else (mid-flow recovery, a RST) goes to the table
/// choice without a reservation (`(backend, false)`).
#[inline]
fn schedule<'a>(
    svc: &ServiceRec,
    key: &FlowKey,
    new: bool,
    ctx: &mut Ctx<'a>,
) -> Result<(&'a shm_layout::config_slot::BackendRec, bool), Pick<'a>> {
    if !new {
        return sched::table_choice(&ctx.cfg, svc, key)
            .map(|b| (b, false))
            .ok_or(Pick::NoBackend);
    }
    let cfg = ctx.cfg;
    match sched::pick(&cfg, svc, key, ctx.backends, &mut ctx.sched) {
        Pick::Reserved(b) => Ok((b, true)),
        other => Err(other),
    }
}

/// Refuses a held new connection (queue full or waited too long): a TCP
/// SYN is answered with a RST from the VIP, a UDP datagram is dropped.
/// Counted in `conn_refused`.
pub fn refuse(frame: &mut [u8], len: usize, in_port: u32, ctx: &mut Ctx<'_>) -> Verdict {
    let frame_len = len.min(frame.len());
    let l4 = match parse_ip(&frame[..frame_len], ctx) {
        Ok(l4) => l4,
        Err(v) => return v,
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

/// Backend -> client (NAT replies).
fn from_backend(
    frame: &mut [u8],
    l4: &L4,
    port_mac: &impl Fn(u32) -> Option<[u8; 6]>,
    ctx: &mut Ctx<'_>,
) -> Verdict {
    let found = ctx.ct.lookup_at(&l4.key(), l4.home as usize);
    let Some(hit) = &found else {
        return ctx.drop(Counter::DropNotOurs);
    };
    if hit.dir != Direction::Reply {
        return ctx.drop(Counter::DropNotOurs);
    }
    let slot = ctx.ct.slot(hit.idx);
    if ctx.expired(slot) {
        return ctx.drop(Counter::DropNotOurs);
    }
    ctx.count(Counter::ReplyHit);
    match touch(ctx, slot, hit, l4) {
        Moved::Stay => {}
        Moved::Closed => release_backend(ctx, hit.conn().backend_id),
        Moved::SynAcked => syn_ack_sample(&hit.conn(), ctx),
        Moved::Confirmed => ctx.count(Counter::ConnConfirmed),
    }
    let fill = Fill::of(hit, slot, l4, &ctx.flows);
    reverse(frame, l4, hit, port_mac, fill, ctx)
}

/// Folds the time from a NAT connection's SYN (its entry's creation) to
/// the backend's SYN-ACK into the backend's shared latency counters. The
/// only shared writes of the reply path, once per connection.
#[cold]
fn syn_ack_sample(conn: &Conn, ctx: &Ctx<'_>) {
    let Some(b) = ctx.backends.get(conn.backend_id as usize) else {
        return;
    };
    let ms = (ctx.now_ms.wrapping_sub(conn.created_ms) as i32).max(0) as u64;
    b.syn_ack_count.fetch_add(1, Ordering::Relaxed);
    b.syn_ack_sum_ms.fetch_add(ms, Ordering::Relaxed);
    // The service index may be stale across a reload that renumbered
    // services: one sample judged against another target, at worst.
    let target = ctx
        .cfg
        .services()
        .get(conn.service as usize)
        .map_or(0, |s| s.latency_target_ms);
    if target > 0 && ms > u64::from(target) {
        b.syn_ack_slow.fetch_add(1, Ordering::Relaxed);
    }
}

/// Which TCP state change a packet made (see [`touch`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Moved {
    Stay,
    /// SYN to SYN_ACKED by the backend's SYN-ACK (NAT reply direction).
    SynAcked,
    /// PROVISIONAL to ESTABLISHED: the pickup proved itself, and took its
    /// backend reservation.
    Confirmed,
    /// To CLOSING by this packet, first of all switches: the caller gives
    /// the backend slot back.
    Closed,
}

/// Refreshes the time, TCP state and counters of the entry `hit` found
/// (in `slot`, `ctx.ct.slot(hit.idx)`) for a packet (`hit.dir` is the
/// packet's direction); says which state change it made. Changes are
/// atomic read-modify-writes, so of several switches seeing the same
/// change only one reports it.
#[inline]
fn touch(ctx: &Ctx<'_>, slot: &ConnSlot, hit: &Hit, l4: &L4) -> Moved {
    let (dir, now_ms) = (hit.dir, ctx.now_ms);
    if slot.last_seen.load(Ordering::Relaxed) != now_ms {
        slot.last_seen.store(now_ms, Ordering::Relaxed);
    }
    let mut moved = Moved::Stay;
    if l4.key().proto == PROTO_TCP {
        let cur = slot.tcp_state.load(Ordering::Relaxed);
        let next = next_state(cur, dir, l4.flags, hit, now_ms);
        if next != cur {
            moved = change_state(ctx, hit, cur, next);
        }
    }
    slot.add_counts(1, u64::from(l4.ip_len));
    moved
}

/// How long a provisional DR or tunnel entry must live before a further
/// client packet confirms it (see [`next_state`]).
pub const CONFIRM_AFTER_MS: u32 = 1_000;

/// The TCP state a packet with `flags` moves the connection `hit` found
/// from `cur` to (`cur` if none). The rules (docs/ARCHITECTURE.md,
/// "Provisional entries"):
/// - FIN or RST, either direction: CLOSING (a provisional entry stays
///   provisional and expires).
/// - SYN (half-open): the backend's SYN-ACK (NAT) makes it SYN_ACKED,
///   still half-open: a backend answers a spoofed SYN as readily as a
///   real one. Only the client's ACK establishes. (Whether the SYN-ACK
///   passed first is not required: without sequence numbers in the entry
///   that would stop no blind spoofer, and in DR and tunnel mode the
///   SYN-ACK never passes.)
/// - PROVISIONAL (a pickup): in NAT, any packet of the backend (the other
///   direction) confirms it; in DR and tunnel mode (one-armed), a client
///   packet at least [`CONFIRM_AFTER_MS`] after the pickup: a spoofed
///   flood sends one segment per 5-tuple, a live connection keeps sending.
#[inline]
fn next_state(cur: u32, dir: Direction, flags: u8, hit: &Hit, now_ms: u32) -> u32 {
    if flags & (tcp::FIN | tcp::RST) != 0 {
        // An unconfirmed pickup stays provisional: it holds nothing to
        // release, and its short timeout ends it sooner than `tcp_fin`
        // would (a backend answers each spoofed ACK with a RST).
        return if cur == STATE_PROVISIONAL {
            cur
        } else {
            STATE_CLOSING
        };
    }
    let client_ack = dir == Direction::Forward && flags & tcp::ACK != 0 && flags & tcp::SYN == 0;
    match cur {
        STATE_SYN
            if dir == Direction::Reply && flags & (tcp::SYN | tcp::ACK) == tcp::SYN | tcp::ACK =>
        {
            STATE_SYN_ACKED
        }
        STATE_SYN | STATE_SYN_ACKED if client_ack => STATE_ESTABLISHED,
        STATE_PROVISIONAL if dir == Direction::Reply => STATE_ESTABLISHED,
        STATE_PROVISIONAL
            if hit.conn().mode != MODE_NAT
                && now_ms.wrapping_sub(hit.conn().created_ms) as i32 >= CONFIRM_AFTER_MS as i32 =>
        {
            STATE_ESTABLISHED
        }
        _ => cur,
    }
}

/// [`touch`]'s state change from `cur` to `next`, once per connection
/// and direction at most: under the slot's lock as the lookup read it, so
/// a packet of a connection whose slot was reused meanwhile changes
/// nothing (see `ConnTable::update_state`).
#[cold]
#[inline(never)]
fn change_state(ctx: &Ctx<'_>, hit: &Hit, cur: u32, next: u32) -> Moved {
    let closing = next == STATE_CLOSING;
    let confirming = cur == STATE_PROVISIONAL;
    let backend = ctx.backends.get(hit.conn().backend_id as usize);
    ctx.ct
        .update_state(hit, ctx.pid, |state| {
            if closing {
                // Released only if it held a reservation (a provisional
                // entry never took one).
                holds_reservation(state.swap(STATE_CLOSING, Ordering::AcqRel))
            } else if confirming {
                // A confirmed pickup takes its backend reservation (over
                // any limit: the connection exists at the backend already)
                // before it becomes ESTABLISHED, so whoever closes it later
                // releases one that was taken.
                if let Some(b) = backend {
                    sched::reserve(b, 0);
                }
                let ok = state
                    .compare_exchange(cur, next, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok();
                if let (false, Some(b)) = (ok, backend) {
                    b.active.fetch_sub(1, Ordering::Relaxed);
                }
                ok
            } else {
                state
                    .compare_exchange(cur, next, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
            }
        })
        .map_or(Moved::Stay, |changed| match (changed, closing) {
            (false, _) => Moved::Stay,
            (true, true) => Moved::Closed,
            (true, false) if confirming => Moved::Confirmed,
            (true, false) if next == STATE_SYN_ACKED => Moved::SynAcked,
            _ => Moved::Stay,
        })
}

/// Client -> backend: rewrite per the connection's mode, then route.
#[inline(always)]
fn forward(
    frame: &mut [u8],
    l4: &L4,
    conn: &Conn,
    in_port: u32,
    port_mac: &impl Fn(u32) -> Option<[u8; 6]>,
    fill: Option<Fill>,
    ctx: &mut Ctx<'_>,
) -> Verdict {
    match conn.mode {
        MODE_NAT => {
            let nat = Nat::Dst(conn.backend_ip, conn.backend_port);
            egress(frame, l4, nat, conn.backend_ip, port_mac, fill, ctx)
        }
        MODE_TUNNEL => tunnel(frame, l4, conn.backend_ip, in_port, port_mac, ctx),
        // Direct routing: only the MACs change.
        _ => egress(frame, l4, Nat::None, conn.backend_ip, port_mac, fill, ctx),
    }
}

/// Backend -> client: restore the VIP as source, then route.
#[inline(always)]
fn reverse(
    frame: &mut [u8],
    l4: &L4,
    hit: &Hit,
    port_mac: &impl Fn(u32) -> Option<[u8; 6]>,
    fill: Option<Fill>,
    ctx: &mut Ctx<'_>,
) -> Verdict {
    let nat = Nat::Src(hit.conn().vip, hit.conn().vip_port);
    egress(frame, l4, nat, hit.conn().client_ip, port_mac, fill, ctx)
}

/// IP-in-IP to the backend: route to it, check that the encapsulated packet
/// fits the egress port's MTU, decrement the inner TTL, prepend the outer
/// header (`[tunnel] source` -> backend). A packet that would not fit is
/// answered with ICMP fragmentation-needed when it carries DF (the client
/// then lowers its path MTU toward the VIP), else dropped.
#[inline(never)]
fn tunnel(
    frame: &mut [u8],
    l4: &L4,
    backend_ip: u32,
    in_port: u32,
    port_mac: &impl Fn(u32) -> Option<[u8; 6]>,
    ctx: &mut Ctx<'_>,
) -> Verdict {
    const ETH: usize = wire::ETHERNET_HEADER_LEN;
    let (port, dst_mac, src_mac) = match next_hop(backend_ip, port_mac, ctx) {
        Ok(h) => h,
        Err(v) => return v,
    };
    let mtu = ctx.cfg.ports().get(port as usize).map_or(0, |p| p.mtu) as usize;
    let mtu = if mtu == 0 { DEFAULT_MTU } else { mtu };
    if l4.ip_len as usize + ipip::OVERHEAD > mtu {
        let df =
            wire::Ipv4Packet::new_unchecked(&frame[ETH..l4.frame_len as usize]).dont_fragment();
        if !df {
            return ctx.drop(Counter::DropTooBig);
        }
        if ctx.icmp_tokens == 0 {
            return ctx.drop(Counter::IcmpRateLimited);
        }
        let inner_mtu = (mtu - ipip::OVERHEAD) as u16;
        return match wire::icmp_frag_needed_in_place(frame, l4.frame_len as usize, inner_mtu) {
            Ok(n) => {
                ctx.icmp_tokens -= 1;
                ctx.count(Counter::IcmpFragNeeded);
                Verdict::Tx {
                    port: in_port,
                    len: n,
                }
            }
            Err(_) => ctx.drop(Counter::DropTooBig),
        };
    }
    if let Err(v) = decrement_ttl(frame, ctx) {
        return v;
    }
    let src = ctx.cfg.header.tunnel_src.to_be_bytes();
    match ipip::encapsulate_in_place(frame, l4.frame_len as usize, src, backend_ip.to_be_bytes()) {
        Ok(n) => {
            set_macs(frame, dst_mac, src_mac);
            Verdict::Tx { port, len: n }
        }
        Err(_) => ctx.drop(Counter::DropTooBig),
    }
}

/// MTU assumed for a port the configuration gives none.
const DEFAULT_MTU: usize = 1500;

/// The address translation a routed packet gets on its way out.
#[derive(Clone, Copy)]
enum Nat {
    /// Direct routing: addresses unchanged.
    None,
    /// Destination becomes (address, port): client -> backend.
    Dst(u32, u16),
    /// Source becomes (address, port): backend -> client.
    Src(u32, u16),
}

/// Rewrites the TCP/UDP port and checksum for an address change whose
/// checksum difference is `d_addr` (RFC 1624; the address enters the
/// TCP/UDP checksum through the pseudo-header). `parse_ip` validated the
/// header, so the fixed-size view always exists. Returns the checksum's
/// difference (address and port).
#[inline(always)]
fn rewrite_l4(
    frame: &mut [u8],
    l4: &L4,
    port_at: usize,
    old_port: u16,
    port: u16,
    d_addr: u64,
) -> u64 {
    let delta = d_addr + checksum::delta_u16(old_port, port);
    let Some(t) = frame.get_mut(l4.l4_off as usize..) else {
        return delta;
    };
    if l4.key().proto == PROTO_TCP {
        let Some(t) = t.first_chunk_mut::<18>() else {
            return delta;
        };
        t[port_at..port_at + 2].copy_from_slice(&port.to_be_bytes());
        let c = checksum::adjust(u16::from_be_bytes([t[16], t[17]]), delta);
        t[16..18].copy_from_slice(&c.to_be_bytes());
    } else {
        let Some(u) = t.first_chunk_mut::<8>() else {
            return delta;
        };
        u[port_at..port_at + 2].copy_from_slice(&port.to_be_bytes());
        let old = u16::from_be_bytes([u[6], u[7]]);
        let c = checksum::udp_field(old, checksum::adjust(old, delta));
        u[6..8].copy_from_slice(&c.to_be_bytes());
    }
    delta
}

/// Decrements the TTL of the IPv4 header after the Ethernet header
/// (incremental checksum); drops and counts an expiring packet.
#[inline]
fn decrement_ttl(frame: &mut [u8], ctx: &mut Ctx<'_>) -> Result<(), Verdict> {
    const ETH: usize = wire::ETHERNET_HEADER_LEN;
    let Some(h) = frame.get_mut(ETH..).and_then(|b| b.first_chunk_mut::<20>()) else {
        return Err(ctx.drop(Counter::DropMalformed));
    };
    let ttl = h[8];
    if ttl <= 1 {
        return Err(ctx.drop(Counter::DropTtl));
    }
    let c = checksum::adjust(u16::from_be_bytes([h[10], h[11]]), checksum::TTL_DECREMENT);
    h[8] = ttl - 1;
    h[10..12].copy_from_slice(&c.to_be_bytes());
    Ok(())
}

/// The egress port toward `route_to`, the next hop's MAC and the port's MAC.
#[inline]
fn next_hop(
    route_to: u32,
    port_mac: &impl Fn(u32) -> Option<[u8; 6]>,
    ctx: &mut Ctx<'_>,
) -> Result<(u32, [u8; 6], [u8; 6]), Verdict> {
    let hop = match ctx.hops.next_hop(&ctx.rt, route_to) {
        Ok(h) => h,
        Err(NoRoute::NoRoute) => return Err(ctx.drop(Counter::DropNoRoute)),
        Err(NoRoute::NoNeighbour) => return Err(ctx.drop(Counter::DropNoNeighbour)),
    };
    let Some(src) = port_mac(hop.port) else {
        return Err(ctx.drop(Counter::DropEgressPort));
    };
    Ok((hop.port, hop.mac, src))
}

#[inline]
fn set_macs(frame: &mut [u8], dst: [u8; 6], src: [u8; 6]) {
    let mut eth = wire::EthernetFrame::new_unchecked(&mut frame[..wire::ETHERNET_HEADER_LEN]);
    eth.set_dst_addr(dst);
    eth.set_src_addr(src);
}

/// Routes a TCP/UDP packet toward `route_to`: TTL minus one, the
/// translation `nat`, the next hop's MACs. The IPv4 checksum is adjusted
/// once for the TTL and the address together (RFC 1624 differences add).
#[inline(always)]
fn egress(
    frame: &mut [u8],
    l4: &L4,
    nat: Nat,
    route_to: u32,
    port_mac: &impl Fn(u32) -> Option<[u8; 6]>,
    fill: Option<Fill>,
    ctx: &mut Ctx<'_>,
) -> Verdict {
    const ETH: usize = wire::ETHERNET_HEADER_LEN;
    let Some(&[.., ttl, proto, _, _, _, _, _, _, _, _, _, _]) =
        frame.get(ETH..).and_then(|b| b.first_chunk::<20>())
    else {
        return ctx.drop(Counter::DropMalformed);
    };
    if ttl <= 1 {
        return ctx.drop(Counter::DropTtl);
    }
    let (port, dst, src) = match next_hop(route_to, port_mac, ctx) {
        Ok(h) => h,
        Err(v) => return v,
    };
    // TTL is the high byte of the 16-bit word it shares with protocol:
    // the word drops by 0x100, whose RFC 1624 difference (~m + m - 0x100)
    // is the constant 0xfeff whatever the TTL and protocol.
    let mut d_ip = checksum::TTL_DECREMENT;
    debug_assert_eq!(
        d_ip,
        checksum::delta_u16(
            u16::from_be_bytes([ttl, proto]),
            u16::from_be_bytes([ttl - 1, proto])
        )
    );
    // (the rewrite, the address and port it writes, the ones it replaces)
    let k = l4.key();
    let (kind, new_ip, new_port, old_ip, old_port) = match nat {
        Nat::None => (flowcache::REWRITE_NONE, 0, 0, 0, 0),
        Nat::Dst(ip, p) => (flowcache::REWRITE_DST, ip, p, k.dst_ip, k.dst_port),
        Nat::Src(ip, p) => (flowcache::REWRITE_SRC, ip, p, k.src_ip, k.src_port),
    };
    let offsets = flowcache::rewrite_offsets(kind);
    let mut d_l4 = 0;
    if let Some((_, port_at)) = offsets {
        let d_addr = checksum::delta_u32(old_ip, new_ip);
        d_l4 = rewrite_l4(frame, l4, port_at, old_port, new_port, d_addr);
        d_ip += d_addr;
    }
    if let Some(h) = frame.get_mut(ETH..).and_then(|b| b.first_chunk_mut::<20>()) {
        h[8] = ttl - 1;
        if let Some((addr_at, _)) = offsets {
            h[addr_at..addr_at + 4].copy_from_slice(&new_ip.to_be_bytes());
        }
        let c = checksum::adjust(u16::from_be_bytes([h[10], h[11]]), d_ip);
        h[10..12].copy_from_slice(&c.to_be_bytes());
    }
    set_macs(frame, dst, src);
    if let Some(fill) = fill {
        let rewrite = Rewrite {
            kind,
            new_addr: new_ip,
            new_port,
            d_ip,
            d_l4,
        };
        cache_answer(l4, &fill, &rewrite, port, [dst, src], ctx);
    }
    Verdict::Tx {
        port,
        len: l4.frame_len as usize,
    }
}

/// The translation [`egress`] applied, as the flow cache replays it.
struct Rewrite {
    /// A `flowcache::REWRITE_` value.
    kind: u8,
    new_addr: u32,
    new_port: u16,
    d_ip: u64,
    d_l4: u64,
}

/// Caches the full path's answer for a connection's next packets.
#[inline(never)]
fn cache_answer(
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
struct Fill {
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
    fn of(hit: &Hit, slot: &ConnSlot, l4: &L4, flows: &FlowCache) -> Option<Fill> {
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
        // packets may change their state (see `next_state`).
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
fn cached(frame: &mut [u8], l4: &L4, ctx: &mut Ctx<'_>) -> Option<(u32, usize)> {
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
        slot.add_counts(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixture::{CLIENT_GW_MAC, Fixture, TUNNEL_SRC, VIP, port_mac};
    use etherparse::PacketBuilder;
    use proptest::prelude::*;
    use shm_layout::config_slot::ON_DOWN_RESCHEDULE;
    use shm_layout::conntrack::{STATE_PROVISIONAL, STATE_SYN_ACKED};

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
                etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded {
                    next_hop_mtu: 1480
                }
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

    fn run_on(
        fx: &Fixture,
        c: &mut [u64; N_COUNTERS],
        port: u32,
        frame: &[u8],
    ) -> (Verdict, Vec<u8>) {
        let mut buf = vec![0u8; 2048];
        buf[..frame.len()].copy_from_slice(frame);
        let mut ctx = fx.ctx(c);
        // The engine's way: the first pass, then the second.
        let mut p = Pre::default();
        pre(&buf[..frame.len()], &ctx.ct, &ctx.flows, &mut p);
        let v = process_pre(&mut buf, frame.len(), &p, port, &port_mac, &mut ctx);
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
        let fin_l4 = parse_ip_common(&fin).unwrap();
        let synack = reply(backend, 45_000, true);
        let synack_l4 = parse_ip_common(&synack).unwrap();
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
        let key = parse_ip_common(&tcp_seg(46_000, "S")).unwrap().key();
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
        use shm_layout::config_slot::{
            BACKEND_DRAINED, SCHED_MAGLEV, SCHED_SH, SCHED_WLC, SCHED_WRR,
        };
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
        /// Any bytes, any claimed length: a verdict, never a panic.
        #[test]
        fn random_frames_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200), extra in 0usize..64) {
            thread_local!(static FX: Fixture = Fixture::new(&format!("unit-fuzz-{:?}", std::thread::current().id()).replace(|c: char| !c.is_ascii_alphanumeric(), ""), 1 << 12));
            FX.with(|fx| {
                let mut c = [0u64; N_COUNTERS];
                let mut buf = vec![0u8; 2048];
                buf[..bytes.len()].copy_from_slice(&bytes);
                let mut ctx = fx.ctx(&mut c);
                let _ = process(&mut buf, bytes.len() + extra, 0, &port_mac, &mut ctx);
            });
        }

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
                        let mut p = Pre::default();
                        pre(&buf[..f.len()], &ctx.ct, &ctx.flows, &mut p);
                        process_pre(&mut buf, f.len(), &p, 0, &port_mac, &mut ctx)
                    } else {
                        process(&mut buf, f.len(), 0, &port_mac, &mut ctx)
                    };
                    prop_assert_eq!(v, Verdict::Drop, "{}", what);
                    prop_assert_eq!(c[counter as usize], 1, "{}", what);
                }
                Ok(())
            })?;
        }

        /// The engine's two passes (`pre`, then `process_pre`) give the
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
                let mut p = Pre::default();
                pre(&two[..len], &ctx.ct, &ctx.flows, &mut p);
                let v2 = process_pre(&mut two, len, &p, 0, &port_mac, &mut ctx);
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
        let evicted =
            c[Counter::EvictedProvisional as usize] + c[Counter::EvictedHalfOpen as usize];
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
}
