//! ICMP for IPv4 (RFC 792): the checked view of an error message that
//! quotes a TCP/UDP packet, the in-place rewrite of its quote (NAT), and
//! the echo reply built in place from an echo request.

use super::ethernet::{ETHERNET_HEADER_LEN as ETH, EthernetFrame};
use super::ipv4::{self, Ipv4Packet};
use super::ipv4_l4::{PROTO_TCP, PROTO_UDP};
use super::{WireError, be16, checksum, put16, put32};

/// IP protocol number of ICMP.
pub const PROTO_ICMP: u8 = 1;
/// Echo reply.
pub const ECHO_REPLY: u8 = 0;
/// Destination unreachable (its code 4, fragmentation needed, carries the
/// next-hop MTU: RFC 1191).
pub const DEST_UNREACHABLE: u8 = 3;
/// Echo request.
pub const ECHO_REQUEST: u8 = 8;
/// Time exceeded (in transit, or in reassembly).
pub const TIME_EXCEEDED: u8 = 11;
/// The ICMP header: type, code, checksum, four bytes that depend on type.
pub const HEADER_LEN: usize = 8;
/// Of the quoted packet, an error must carry at least its IP header and
/// these first bytes of its payload (RFC 792): the ports of TCP or UDP.
pub const QUOTED_PAYLOAD_MIN: usize = 8;

mod field {
    pub const TYPE: usize = 0;
    pub const CODE: usize = 1;
    pub const CHECKSUM: usize = 2;
}

/// Whether the ICMP message `msg` (the whole IP payload) has a correct
/// checksum (over the whole message).
#[inline]
pub fn checksum_ok(msg: &[u8]) -> bool {
    msg.len() >= HEADER_LEN && checksum::fold(checksum::sum(msg, 0)) == 0xffff
}

/// Recomputes the checksum of the ICMP message `msg` from scratch.
#[inline]
pub fn fill_checksum(msg: &mut [u8]) {
    put16(msg, field::CHECKSUM, 0);
    let c = !checksum::fold(checksum::sum(msg, 0));
    put16(msg, field::CHECKSUM, c);
}

/// An ICMP error that quotes a TCP/UDP packet, as [`error_quote`] found
/// it. Offsets are within the ICMP message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quote {
    pub icmp_type: u8,
    pub code: u8,
    /// Length of the quoted IPv4 header (20..=60); it starts at
    /// [`HEADER_LEN`], its TCP/UDP header at `HEADER_LEN + header_len`.
    pub header_len: usize,
    /// [`PROTO_TCP`] or [`PROTO_UDP`].
    pub protocol: u8,
    /// Quoted source and destination address and port.
    pub src_addr: u32,
    pub dst_addr: u32,
    pub src_port: u16,
    pub dst_port: u16,
}

/// Which end of the quoted packet [`rewrite_quote`] changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    Src,
    Dst,
}

/// Validates an ICMP error message `msg` (the whole IP payload of a valid,
/// unfragmented IPv4 packet with protocol [`PROTO_ICMP`]) and reads the
/// packet it quotes. The rules, in order:
///
/// 1. type [`DEST_UNREACHABLE`] (codes 0..=15) or [`TIME_EXCEEDED`]
///    (codes 0..=1), else [`WireError::NotIcmpError`];
/// 2. the ICMP checksum over the whole message ([`WireError::BadChecksum`]);
/// 3. the quote holds an IPv4 header (version 4, header length 20..=60)
///    and [`QUOTED_PAYLOAD_MIN`] bytes after it ([`WireError::BadQuote`]);
/// 4. the quoted packet is TCP or UDP ([`WireError::NotTcpUdp`]) and not a
///    fragment other than the first ([`WireError::Fragment`]: no ports).
///
/// After it succeeds, [`rewrite_quote`] on the same message cannot fail.
pub fn error_quote(msg: &[u8]) -> Result<Quote, WireError> {
    let Some(h) = msg.first_chunk::<HEADER_LEN>() else {
        return Err(WireError::Truncated);
    };
    let (icmp_type, code) = (h[field::TYPE], h[field::CODE]);
    match (icmp_type, code) {
        (DEST_UNREACHABLE, 0..=15) | (TIME_EXCEEDED, 0..=1) => {}
        _ => return Err(WireError::NotIcmpError),
    }
    if !checksum_ok(msg) {
        return Err(WireError::BadChecksum);
    }
    let q = &msg[HEADER_LEN..];
    let Some(qh) = q.first_chunk::<{ ipv4::MIN_HEADER_LEN }>() else {
        return Err(WireError::BadQuote);
    };
    let hl = (qh[0] & 0xf) as usize * 4;
    if qh[0] >> 4 != 4 || hl < ipv4::MIN_HEADER_LEN || q.len() < hl + QUOTED_PAYLOAD_MIN {
        return Err(WireError::BadQuote);
    }
    let protocol = qh[9];
    if protocol != PROTO_TCP && protocol != PROTO_UDP {
        return Err(WireError::NotTcpUdp);
    }
    if be16(qh, 6) & 0x1fff != 0 {
        return Err(WireError::Fragment);
    }
    Ok(Quote {
        icmp_type,
        code,
        header_len: hl,
        protocol,
        src_addr: u32::from_be_bytes([qh[12], qh[13], qh[14], qh[15]]),
        dst_addr: u32::from_be_bytes([qh[16], qh[17], qh[18], qh[19]]),
        src_port: be16(q, hl),
        dst_port: be16(q, hl + 2),
    })
}

/// Rewrites one end of the packet quoted by the error `msg` (as
/// [`error_quote`] returned `q` for it) to `addr`:`port`: the quoted IPv4
/// header's address and checksum (RFC 1624), the quoted port, the quoted
/// TCP/UDP checksum when the quote holds it (a UDP datagram's always, a
/// TCP segment's when 18 of its bytes are quoted; a UDP datagram sent
/// without checksum keeps none), then the ICMP checksum from scratch.
pub fn rewrite_quote(msg: &mut [u8], q: &Quote, end: End, addr: u32, port: u16) {
    let ip_at = HEADER_LEN;
    let l4_at = HEADER_LEN + q.header_len;
    let (addr_at, port_at, old_addr, old_port) = match end {
        End::Src => (ip_at + 12, l4_at, q.src_addr, q.src_port),
        End::Dst => (ip_at + 16, l4_at + 2, q.dst_addr, q.dst_port),
    };
    let d_addr = checksum::delta_u32(old_addr, addr);
    let ip_csum = be16(msg, ip_at + 10);
    put16(msg, ip_at + 10, checksum::adjust(ip_csum, d_addr));
    put32(msg, addr_at, addr);
    put16(msg, port_at, port);
    let d_l4 = d_addr + checksum::delta_u16(old_port, port);
    let l4_csum_at = match q.protocol {
        PROTO_UDP => Some(l4_at + 6),
        _ => Some(l4_at + 16).filter(|&at| at + 2 <= msg.len()),
    };
    if let Some(at) = l4_csum_at {
        let old = be16(msg, at);
        let new = checksum::adjust(old, d_l4);
        let new = if q.protocol == PROTO_UDP {
            checksum::udp_field(old, new)
        } else {
            new
        };
        put16(msg, at, new);
    }
    fill_checksum(msg);
}

/// Turns a received Ethernet/IPv4 ICMP echo request (`len` bytes; a valid
/// IPv4 header, checked by the caller) into its echo reply in place: MACs
/// swapped, a fresh 20-byte IPv4 header (IP options are not echoed) from
/// the request's destination to its source, type [`ECHO_REPLY`], the
/// identifier, sequence number and data unchanged, the ICMP checksum
/// adjusted. Refuses anything but a well-formed echo request
/// ([`WireError::NotEchoRequest`], [`WireError::BadChecksum`]). Returns
/// the reply's length.
pub fn echo_reply_in_place(frame: &mut [u8], len: usize) -> Result<usize, WireError> {
    let len = len.min(frame.len());
    let (src, dst, hl, total, tos) = {
        let ip = Ipv4Packet::new_checked(&frame[ETH.min(len)..len])?;
        if ip.protocol() != PROTO_ICMP {
            return Err(WireError::NotEchoRequest);
        }
        let msg = ip.payload();
        if msg.len() < HEADER_LEN || msg[field::TYPE] != ECHO_REQUEST || msg[field::CODE] != 0 {
            return Err(WireError::NotEchoRequest);
        }
        if !checksum_ok(msg) {
            return Err(WireError::BadChecksum);
        }
        let tos = frame[ETH + 1];
        (
            ip.src_addr(),
            ip.dst_addr(),
            ip.header_len(),
            ip.total_len() as usize,
            tos,
        )
    };
    let msg_len = total - hl;
    if hl != ipv4::MIN_HEADER_LEN {
        frame.copy_within(ETH + hl..ETH + total, ETH + ipv4::MIN_HEADER_LEN);
    }
    {
        let mut eth = EthernetFrame::new_unchecked(&mut frame[..ETH]);
        let (d, s) = (eth.dst_addr(), eth.src_addr());
        eth.set_dst_addr(s);
        eth.set_src_addr(d);
    }
    let ip = &mut frame[ETH..ETH + ipv4::MIN_HEADER_LEN];
    ip[0] = 0x45;
    ip[1] = tos;
    put16(ip, 2, (ipv4::MIN_HEADER_LEN + msg_len) as u16);
    put16(ip, 4, 0);
    put16(ip, 6, 0);
    ip[8] = 64;
    ip[9] = PROTO_ICMP;
    put16(ip, 10, 0);
    ip[12..16].copy_from_slice(&dst);
    ip[16..20].copy_from_slice(&src);
    let c = checksum::ipv4_header(ip);
    put16(ip, 10, c);
    let at = ETH + ipv4::MIN_HEADER_LEN;
    let msg = &mut frame[at..at + msg_len];
    msg[field::TYPE] = ECHO_REPLY;
    let old = be16(msg, field::CHECKSUM);
    let d = checksum::delta_u16(u16::from(ECHO_REQUEST) << 8, u16::from(ECHO_REPLY) << 8);
    put16(msg, field::CHECKSUM, checksum::adjust(old, d));
    Ok(at + msg_len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{Icmpv4Type, PacketBuilder, SlicedPacket, TransportSlice, icmpv4};

    /// An IPv4/TCP packet from 198.18.0.10:80 to 198.18.100.1:40000 with
    /// `payload` bytes.
    fn tcp_packet(payload: usize) -> Vec<u8> {
        let mut v = Vec::new();
        PacketBuilder::ipv4([198, 18, 0, 10], [198, 18, 100, 1], 63)
            .tcp(80, 40_000, 7, 1000)
            .ack(9)
            .write(&mut v, &vec![0x33; payload])
            .unwrap();
        v
    }

    fn error(t: Icmpv4Type, quote: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        PacketBuilder::ipv4([198, 18, 1, 2], [198, 18, 0, 10], 64)
            .icmpv4(t)
            .write(&mut v, quote)
            .unwrap();
        v[20..].to_vec()
    }

    fn frag_needed() -> Icmpv4Type {
        Icmpv4Type::DestinationUnreachable(icmpv4::DestUnreachableHeader::FragmentationNeeded {
            next_hop_mtu: 1280,
        })
    }

    #[test]
    fn a_frag_needed_quote_is_read() {
        let msg = error(frag_needed(), &tcp_packet(1400)[..28]);
        let q = error_quote(&msg).unwrap();
        assert_eq!(
            q,
            Quote {
                icmp_type: 3,
                code: 4,
                header_len: 20,
                protocol: PROTO_TCP,
                src_addr: 0xc612_000a,
                dst_addr: 0xc612_6401,
                src_port: 80,
                dst_port: 40_000,
            }
        );
    }

    #[test]
    fn rule_breakers_are_refused_by_rule() {
        let ok = error(frag_needed(), &tcp_packet(0)[..28]);
        assert!(error_quote(&ok).is_ok());
        let mut bad_sum = ok.clone();
        bad_sum[9] ^= 1;
        assert_eq!(error_quote(&bad_sum), Err(WireError::BadChecksum));
        let short = error(frag_needed(), &tcp_packet(0)[..27]);
        assert_eq!(error_quote(&short), Err(WireError::BadQuote));
        let echo = error(
            Icmpv4Type::EchoRequest(etherparse::IcmpEchoHeader { id: 1, seq: 1 }),
            &[0; 28],
        );
        assert_eq!(error_quote(&echo), Err(WireError::NotIcmpError));
        let mut v6 = tcp_packet(0);
        v6[0] = 0x65;
        assert_eq!(
            error_quote(&error(frag_needed(), &v6[..28])),
            Err(WireError::BadQuote)
        );
        assert_eq!(error_quote(&ok[..7]), Err(WireError::Truncated));
    }

    #[test]
    fn rewriting_the_quote_keeps_every_checksum_right() {
        let quoted = tcp_packet(0);
        let mut msg = error(frag_needed(), &quoted);
        let q = error_quote(&msg).unwrap();
        rewrite_quote(&mut msg, &q, End::Src, 0xc613_0102, 8080);
        assert!(checksum_ok(&msg));
        let p = SlicedPacket::from_ip(&msg[8..]).unwrap();
        let Some(etherparse::NetSlice::Ipv4(ip)) = p.net else {
            panic!()
        };
        let iph = ip.header().to_header();
        assert_eq!(iph.header_checksum, iph.calc_header_checksum());
        assert_eq!(iph.source, [198, 19, 1, 2]);
        let Some(TransportSlice::Tcp(t)) = p.transport else {
            panic!()
        };
        let th = t.to_header();
        assert_eq!(th.source_port, 8080);
        assert_eq!(th.checksum, th.calc_checksum_ipv4(&iph, &[]).unwrap());
    }

    #[test]
    fn echo_request_becomes_its_reply() {
        let mut f = Vec::new();
        PacketBuilder::ethernet2([2, 0, 0, 0, 0, 9], [2, 0, 0, 0, 0, 1])
            .ipv4([198, 18, 100, 1], [198, 18, 0, 10], 64)
            .icmpv4_echo_request(7, 3)
            .write(&mut f, b"ping data")
            .unwrap();
        let len = f.len();
        let n = echo_reply_in_place(&mut f, len).unwrap();
        assert_eq!(n, len);
        let p = SlicedPacket::from_ethernet(&f[..n]).unwrap();
        let Some(etherparse::NetSlice::Ipv4(ip)) = p.net else {
            panic!()
        };
        let iph = ip.header().to_header();
        assert_eq!(iph.header_checksum, iph.calc_header_checksum());
        assert_eq!(
            (iph.source, iph.destination),
            ([198, 18, 0, 10], [198, 18, 100, 1])
        );
        let Some(TransportSlice::Icmpv4(icmp)) = p.transport else {
            panic!()
        };
        assert_eq!(
            icmp.icmp_type(),
            Icmpv4Type::EchoReply(etherparse::IcmpEchoHeader { id: 7, seq: 3 })
        );
        let want = etherparse::Icmpv4Header::with_checksum(icmp.icmp_type(), icmp.payload());
        assert_eq!(icmp.checksum(), want.checksum);
        assert_eq!(icmp.payload(), b"ping data");
        // Back to the sender (the builder takes the source MAC first).
        assert_eq!(&f[..12], &[2, 0, 0, 0, 0, 9, 2, 0, 0, 0, 0, 1]);
    }

    #[test]
    fn echo_request_with_ip_options_gets_a_reply_without_them() {
        let mut h = etherparse::Ipv4Header::new(
            0,
            64,
            etherparse::IpNumber::ICMP,
            [198, 18, 100, 1],
            [198, 18, 0, 10],
        )
        .unwrap();
        h.options = [1, 1, 1, 0].into(); // NOP NOP NOP EOL
        let icmp = etherparse::Icmpv4Header::with_checksum(
            Icmpv4Type::EchoRequest(etherparse::IcmpEchoHeader { id: 9, seq: 4 }),
            b"opts",
        );
        h.set_payload_len(icmp.header_len() + 4).unwrap();
        let mut f = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 9, 8, 0];
        h.write(&mut f).unwrap();
        icmp.write(&mut f).unwrap();
        f.extend_from_slice(b"opts");
        let len = f.len();
        let n = echo_reply_in_place(&mut f, len).unwrap();
        assert_eq!(n, len - 4);
        let p = SlicedPacket::from_ethernet(&f[..n]).unwrap();
        let Some(etherparse::NetSlice::Ipv4(ip)) = p.net else {
            panic!()
        };
        let iph = ip.header().to_header();
        assert_eq!(iph.header_checksum, iph.calc_header_checksum());
        assert_eq!(iph.header_len(), 20);
        let Some(TransportSlice::Icmpv4(r)) = p.transport else {
            panic!()
        };
        assert_eq!(
            r.icmp_type(),
            Icmpv4Type::EchoReply(etherparse::IcmpEchoHeader { id: 9, seq: 4 })
        );
        let want = etherparse::Icmpv4Header::with_checksum(r.icmp_type(), r.payload());
        assert_eq!(r.checksum(), want.checksum);
        assert_eq!(r.payload(), b"opts");
    }
}
