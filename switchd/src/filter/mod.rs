//! The packet filter: one frame in, one verdict out.
//!
//! Pure over the frame bytes and the table views in [`Ctx`]; it performs no
//! I/O, no allocation and no system call. The engine calls it per frame and
//! acts on the [`Verdict`]. See DESIGN.md §3 for the decision list; the
//! stages follow it step by step:
//!
//! - [`parse`]: the one validation of an IPv4 TCP/UDP frame
//!   ([`wire::ipv4_l4`]) and the facts the later stages read;
//! - [`decide`]: connection-table lookup, new flows, scheduling, TCP state;
//! - [`rewrite`]: NAT, direct routing and tunnel rewrites, TTL, next hop,
//!   egress;
//! - [`answers`]: frames the switch answers itself (ARP, TCP RST,
//!   ICMP fragmentation-needed) and the flow cache's answers;
//! - [`synproxy`]: SYN cookies and the SYN proxy of NAT services with
//!   `syn_proxy` (the handshakes and the sequence translation);
//! - [`icmp`]: ICMP for VIP flows (errors relayed to the flow's backend
//!   or client, echo requests to a VIP answered), off the TCP/UDP path.
//!
//! The engine drives a burst through the passes below: first
//! [`parse_and_prefetch`] on every frame, then [`prefetch_table_slots`] on
//! every frame, then per frame [`answer_from_flow_cache`] and, if it did
//! not answer, [`switch_after_cache_miss`] ([`switch_parsed`] is the two
//! together). [`process`] runs one frame the whole way in one call.

mod answers;
mod client_hop;
mod decide;
mod fragments;
mod icmp;
mod l2;
mod parse;
mod rewrite;
mod state;
mod synproxy;
#[cfg(test)]
mod tests;

pub use answers::{answer_fingerprint, refuse};
pub use fragments::release_fragments;
pub use parse::flow_key;
pub use state::CONFIRM_AFTER_MS;
pub use synproxy::SynAuto;

use shm_layout::config_slot::ConfigView;
use shm_layout::conntrack::{ConnSlot, ConnTable, Timeouts};
use shm_layout::ring::Ring;
use shm_layout::routing_slot::RoutingView;
use shm_layout::switch_slot::{BackendCounters, Counter, N_COUNTERS};

use crate::flowcache::FlowCache;
use crate::frag::FragTable;
use crate::hops::HopCache;
use crate::sched::SchedState;

use parse::L4;

/// What to do with a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Transmit `len` bytes on global port `port`.
    Tx { port: u32, len: usize },
    /// Drop it (the buffer goes back); the reason was counted. (Or a
    /// fragment that came before its first one, of which the filter kept
    /// a copy, counted `frag_held`: see [`release_fragments`].)
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
    /// Where later fragments find their first fragment's decision, or
    /// wait for it (see [`crate::frag`]; fragments only).
    pub frags: FragTable,
    /// Connections this switch closed, waiting to go to controld as
    /// records (see [`crate::closed`]).
    pub closed: crate::closed::ClosedLog,
    /// Whether services with `syn_proxy = "auto"` are proxied now (see
    /// [`SynAuto`]).
    pub syn_auto: SynAuto,
}

/// The rate limit of ICMP answers per switch: a token bucket of
/// [`IcmpBudget::BURST`] refilled at [`IcmpBudget::PER_SECOND`]. An
/// oversized packet costs one ICMP answer, smaller than itself, but a
/// flood of them must not turn the switch into an ICMP generator.
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

/// What [`parse_and_prefetch`] learned of one frame of a burst: its
/// validated facts and table slot (whose lines are on their way), or
/// nothing (anything but a valid IPv4 TCP/UDP frame without IP options:
/// it goes the whole way through [`process`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct Parsed(Option<L4>);

/// First pass over a burst. Contract: validates `frame` (its `len` bytes)
/// as IPv4 TCP/UDP with a 20-byte header (the common case of
/// [`wire::ipv4_l4`]), finds its connection table home
/// slot and starts loading it and its flow-cache set, so the later passes
/// find them in cache and parse nothing again. Writes its facts into `out`
/// (the engine's per-burst array), or `Parsed(None)` for a frame it leaves
/// to [`process`]. Reads only what it bounds-checks; changes nothing.
#[inline(always)]
pub fn parse_and_prefetch(frame: &[u8], ct: &ConnTable<'_>, flows: &FlowCache, out: &mut Parsed) {
    out.0 = None;
    // A frame to or from a group MAC is left to the full path (which
    // drops it, see `l2`): the flow cache only ever answers frames
    // between unicast MACs.
    if frame.get(12..14) != Some(&[0x08, 0x00]) || l2_group_bits(frame) {
        return;
    }
    let Some(mut l4) = parse::parse_ip_common(frame) else {
        return;
    };
    let home = ct.home_of(l4.words);
    // The flow cache answers neither a SYN, FIN or RST nor a header with
    // options (see `answers::cached`): their sets are not loaded (a new
    // connection's would be a miss for nothing), their slots are. For the
    // rest, [`prefetch_table_slots`] decides which slot to load once the
    // set is in.
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

/// Whether the destination or the source MAC of `frame` (at least 14
/// bytes: the caller read its ethertype) has its group bit set.
#[inline(always)]
fn l2_group_bits(frame: &[u8]) -> bool {
    (frame[0] | frame[6]) & 1 != 0
}

/// Second pass over a burst (the engine skips it when the flow cache
/// loads every home slot in the first). Contract: with the burst's
/// flow-cache lines on their way, starts loading the table slots the
/// third pass will read for a frame [`parse_and_prefetch`] parsed: none
/// for an entry checked in this millisecond (see [`crate::flowcache`]);
/// its connection's slot and the slot the key was found in for an entry
/// due for its check; the key's home slot for a miss (the full path).
/// Changes nothing.
#[inline(always)]
pub fn prefetch_table_slots(parsed: &Parsed, ct: &ConnTable<'_>, flows: &FlowCache, now_ms: u32) {
    let Some(l4) = &parsed.0 else {
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

/// [`process`] for a frame that went through [`parse_and_prefetch`] (same
/// frame, same length; `frame` the whole buffer, as for [`process`]):
/// the same verdict, without parsing it again. It is
/// [`answer_from_flow_cache`], then [`switch_after_cache_miss`] if that did
/// not answer; the engine calls the two itself (so that a cached answer's
/// port and length stay in registers).
#[inline]
pub fn switch_parsed(
    frame: &mut [u8],
    len: usize,
    parsed: &Parsed,
    in_port: u32,
    port_mac: &impl Fn(u32) -> Option<[u8; 6]>,
    ctx: &mut Ctx<'_>,
) -> Verdict {
    match answer_from_flow_cache(frame, parsed, ctx) {
        Some((port, len)) => Verdict::Tx { port, len },
        None => switch_after_cache_miss(frame, len, parsed, in_port, port_mac, ctx),
    }
}

/// Third pass, first half. Contract: the flow cache's answer for a frame
/// [`parse_and_prefetch`] parsed: its egress port and length
/// (`Verdict::Tx`'s fields; the frame is rewritten and everything
/// counted), or `None` with nothing changed: [`switch_after_cache_miss`]
/// decides.
#[inline(always)]
pub fn answer_from_flow_cache(
    frame: &mut [u8],
    parsed: &Parsed,
    ctx: &mut Ctx<'_>,
) -> Option<(u32, usize)> {
    answers::cached(frame, parsed.0.as_ref()?, ctx)
}

/// Third pass, second half. Contract: the verdict of [`process`] for a
/// frame [`answer_from_flow_cache`] did not answer: the full path for a
/// parsed frame (its facts reused), [`process`] itself for the rest.
#[inline]
pub fn switch_after_cache_miss(
    frame: &mut [u8],
    len: usize,
    parsed: &Parsed,
    in_port: u32,
    port_mac: &impl Fn(u32) -> Option<[u8; 6]>,
    ctx: &mut Ctx<'_>,
) -> Verdict {
    match &parsed.0 {
        Some(l4) => {
            if let Some(c) = l2::refused(frame, port_mac(in_port)) {
                return ctx.drop(c);
            }
            full_path(frame, l4, in_port, port_mac, ctx)
        }
        None => process(frame, len, in_port, port_mac, ctx),
    }
}

/// The full path of a parsed IPv4 TCP/UDP packet (the flow cache did not
/// answer): to a VIP, or a reply from a backend.
#[inline(always)]
fn full_path(
    frame: &mut [u8],
    l4: &L4,
    in_port: u32,
    port_mac: &impl Fn(u32) -> Option<[u8; 6]>,
    ctx: &mut Ctx<'_>,
) -> Verdict {
    if decide::is_vip(&ctx.cfg, l4.key().dst_ip) {
        decide::to_vip(frame, l4, in_port, port_mac, ctx)
    } else {
        decide::from_backend(frame, l4, port_mac, ctx)
    }
}

/// Runs the filter on one frame received on global port `in_port`, all
/// passes in one call. `port_mac(p)` gives the MAC of global port `p`
/// (`None` if this switch does not serve it). `frame` is the frame's whole
/// buffer (the NIC's, at least 2048 bytes; `len` of them are the frame),
/// as for [`switch_parsed`]: a rewrite may grow the frame (tunnel), and
/// the flow cache writes its answers through fixed-size header arrays (a
/// shorter slice only makes it miss).
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
    // The L2 rules (see `l2`): at once for anything but IPv4; for IPv4
    // as the passes apply them, the flow cache answering only frames
    // between unicast MACs and the full path checking the rest.
    let refused = |frame: &[u8]| l2::refused(&frame[..frame_len], port_mac(in_port));
    match eth.ethertype() {
        wire::ETHERTYPE_IPV4 => {}
        wire::ETHERTYPE_ARP => {
            if let Some(c) = refused(frame) {
                return ctx.drop(c);
            }
            return answers::arp(frame, frame_len, in_port, port_mac, ctx);
        }
        _ => return ctx.drop(refused(frame).unwrap_or(Counter::DropNonIp)),
    }
    let mut l4 = match parse::parse_ip(&frame[..frame_len]) {
        Ok(l4) => l4,
        Err(wire::WireError::NotTcpUdp) if icmp::is_icmp(frame) => {
            if let Some(c) = refused(frame) {
                return ctx.drop(c);
            }
            return icmp::switch_icmp(frame, frame_len, in_port, port_mac, ctx);
        }
        Err(wire::WireError::Fragment) => {
            if let Some(c) = refused(frame) {
                return ctx.drop(c);
            }
            return fragments::switch_fragment(frame, frame_len, in_port, port_mac, ctx);
        }
        Err(rule) => return parse::dropped_as(rule, ctx),
    };
    if l2::has_ip_options(l4.l4_off as usize - wire::ETHERNET_HEADER_LEN) {
        return ctx.drop(Counter::DropIpOptions);
    }
    l4.home = ctx.ct.home_of(l4.words) as u32;
    if !l2_group_bits(frame)
        && let Some((port, len)) = answers::cached(frame, &l4, ctx)
    {
        return Verdict::Tx { port, len };
    }
    if let Some(c) = refused(frame) {
        return ctx.drop(c);
    }
    full_path(frame, &l4, in_port, port_mac, ctx)
}
