//! Parse: the one validation of an IPv4 TCP/UDP frame every pass shares
//! ([`wire::ipv4_l4`]) and the facts the later stages read.

use shm_layout::config_slot::PROTO_TCP;
use shm_layout::conntrack::FlowKey;
use shm_layout::switch_slot::Counter;
use wire::{HeaderChecksum, Ipv4L4, WireError, tcp};

use super::{Ctx, Verdict};

/// Parsed facts about an IPv4 TCP/UDP packet that the decision needs.
#[derive(Clone, Copy, Debug)]
pub(super) struct L4 {
    /// TCP flags (0 for UDP).
    pub(super) flags: u8,
    /// Offset of the L4 header in the frame.
    pub(super) l4_off: u8,
    /// Frame length as the IP header says (Ethernet padding excluded).
    pub(super) frame_len: u16,
    pub(super) ip_len: u16,
    /// See [`L4::cacheable`] (decided once, read on every pass).
    pub(super) cacheable: bool,
    /// The connection table's home slot for `key` (filled in once the
    /// frame is known to be TCP/UDP over IPv4).
    pub(super) home: u32,
    /// The packet's key as the table's hash mixes it ([`FlowKey::words`]);
    /// the flow cache's key too. [`L4::key`] decodes it.
    pub(super) words: (u64, u64),
}

impl L4 {
    /// The 5-tuple.
    #[inline(always)]
    pub(super) fn key(&self) -> FlowKey {
        FlowKey::from_words(self.words)
    }

    /// A packet the flow cache may answer: no SYN, FIN or RST (those open
    /// or close a connection, or may change its state), and an IPv4 header
    /// without options.
    #[inline(always)]
    pub(super) fn cacheable(&self) -> bool {
        self.cacheable
    }

    /// The facts of a parsed packet, its home slot not yet known.
    #[inline(always)]
    pub(super) fn new(words: (u64, u64), flags: u8, l4_off: usize, ip_len: usize) -> Self {
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
    pub(super) fn tcp_kind(&self) -> (bool, bool, bool) {
        let is_tcp = self.words.1 as u8 == PROTO_TCP;
        let syn = is_tcp && self.flags & tcp::SYN != 0 && self.flags & tcp::ACK == 0;
        let rst = is_tcp && self.flags & tcp::RST != 0;
        (is_tcp, syn, rst)
    }
}

/// The 5-tuple of a frame that [`wire::ipv4_l4`] accepts as IPv4 TCP/UDP
/// (the same validation as every pass of the filter), `None` for any
/// other frame. The engine keys the queue of held connections with it.
#[inline]
pub fn flow_key(frame: &[u8]) -> Option<FlowKey> {
    if frame.get(12..14) != Some(&[0x08, 0x00]) {
        return None;
    }
    let p = wire::ipv4_l4(&frame[wire::ETHERNET_HEADER_LEN..], HeaderChecksum::Verify).ok()?;
    Some(FlowKey {
        proto: p.protocol,
        src_ip: p.src_addr(),
        dst_ip: p.dst_addr(),
        src_port: p.src_port(),
        dst_port: p.dst_port(),
    })
}

/// Validates an Ethernet/IPv4 TCP/UDP frame (`frame` is its bytes, the
/// Ethernet header already checked by the caller) with the one validator,
/// [`wire::ipv4_l4`], and returns the facts the decision needs, or
/// `Err(rule)`: the rule the frame broke (see [`dropped_as`]). The common
/// case is built apart from the rest ([`wire::ipv4_l4_common`]), so its
/// facts stay constants where they are.
#[inline(always)]
pub(super) fn parse_ip(frame: &[u8]) -> Result<L4, WireError> {
    match parse_ip_common(frame) {
        Some(l4) => Ok(l4),
        None => parse_ip_uncommon(frame.get(wire::ETHERNET_HEADER_LEN..).unwrap_or(&[])),
    }
}

/// [`parse_ip`]'s common case alone ([`wire::ipv4_l4_common`]: a 20-byte
/// IPv4 header, TCP or UDP): `None` for anything else, valid or not. The
/// first pass takes only this (its facts stay in registers, no merge with
/// the out-of-line path) and leaves the rest to [`super::process`].
#[inline(always)]
pub(super) fn parse_ip_common(frame: &[u8]) -> Option<L4> {
    let ip = frame.get(wire::ETHERNET_HEADER_LEN..)?;
    let p = wire::ipv4_l4_common(ip, HeaderChecksum::Verify)?;
    // A packet the filter refuses is left to the full parse, which counts it.
    refused(&p).is_none().then(|| facts(&p))
}

/// Why the filter refuses a packet the validator accepts (well formed, but
/// nothing a real stack sends): TCP with an impossible flag set
/// ([`tcp::flags_impossible`]), or UDP whose length is not the IP
/// payload's (bytes the IP header carries that the datagram disowns: a
/// receiver's stack would take its own view of them; the appliance
/// forwards neither).
#[inline(always)]
fn refused(p: &Ipv4L4) -> Option<WireError> {
    if p.protocol == wire::PROTO_TCP {
        tcp::flags_impossible(p.tcp_flags).then_some(WireError::ImpossibleTcpFlags)
    } else {
        (p.l4_len != p.total_len - p.header_len).then_some(WireError::UdpLengthMismatch)
    }
}

/// [`parse_ip`] of everything but the common case: IPv4 options, short
/// frames, and the rule a frame broke.
#[cold]
#[inline(never)]
fn parse_ip_uncommon(ip: &[u8]) -> Result<L4, WireError> {
    let p = wire::ipv4_l4(ip, HeaderChecksum::Verify)?;
    match refused(&p) {
        None => Ok(facts(&p)),
        Some(e) => Err(e),
    }
}

/// The facts of a valid packet.
#[inline(always)]
pub(super) fn facts(p: &Ipv4L4) -> L4 {
    // FlowKey::words straight from the bytes: both addresses, then both
    // ports and the protocol.
    let words = (
        u64::from_be_bytes(p.addrs),
        u64::from(u32::from_be_bytes(p.ports)) << 16 | u64::from(p.protocol),
    );
    L4::new(
        words,
        p.tcp_flags,
        wire::ETHERNET_HEADER_LEN + p.header_len,
        p.total_len,
    )
}

/// The counted verdict of a frame [`parse_ip`] refused: a packet neither
/// TCP nor UDP is not ours, impossible TCP flags and a UDP length other
/// than the payload's have their own counters, anything else is malformed.
/// (Fragments go to `fragments::switch_fragment` before this; one that
/// comes here anyway is counted apart.)
#[cold]
pub(super) fn dropped_as(rule: WireError, ctx: &mut Ctx<'_>) -> Verdict {
    ctx.drop(match rule {
        WireError::Fragment => Counter::DropFragment,
        WireError::NotTcpUdp => Counter::DropNotOurs,
        WireError::ImpossibleTcpFlags => Counter::DropBadFlags,
        WireError::UdpLengthMismatch => Counter::DropUdpLength,
        _ => Counter::DropMalformed,
    })
}
