//! Answers built in place in the received frame's buffer: ARP replies for
//! VIPs, TCP RSTs for VIP ports without a service, and ICMP
//! fragmentation-needed for packets too big to encapsulate.

use super::arp::{ARP_LEN, ARP_REPLY, ARP_REQUEST, ArpPacket};
use super::ethernet::{ETHERNET_HEADER_LEN as ETH, ETHERTYPE_ARP, ETHERTYPE_IPV4, EthernetFrame};
use super::ipv4::Ipv4Packet;
use super::tcp::{self, TcpSegment};
use super::{WireError, checksum, put16, put32};

/// Turns a received ARP request into its reply: we (`our_mac`) own the
/// requested address. Returns the reply's length (42 bytes; trailing
/// padding of the request is dropped).
pub fn arp_reply_in_place(frame: &mut [u8], our_mac: [u8; 6]) -> Result<usize, WireError> {
    if frame.len() < ETH + ARP_LEN {
        return Err(WireError::Truncated);
    }
    let (requester_mac, requester_ip, wanted_ip) = {
        let a = ArpPacket::new_checked(&frame[ETH..])?;
        if a.operation() != ARP_REQUEST {
            return Err(WireError::BadArp);
        }
        (
            a.sender_hardware_addr(),
            a.sender_protocol_addr(),
            a.target_protocol_addr(),
        )
    };
    let mut eth = EthernetFrame::new_unchecked(&mut frame[..ETH]);
    eth.set_dst_addr(requester_mac);
    eth.set_src_addr(our_mac);
    eth.set_ethertype(ETHERTYPE_ARP);
    let mut a = ArpPacket::new_checked(&mut frame[ETH..ETH + ARP_LEN])?;
    a.set_operation(ARP_REPLY);
    a.set_sender(our_mac, wanted_ip);
    a.set_target(requester_mac, requester_ip);
    Ok(ETH + ARP_LEN)
}

/// Turns a received Ethernet/IPv4/TCP segment (`len` bytes) into the RST
/// that answers it (RFC 9293 §3.10.7.1): addresses and ports swapped; if it
/// carried ACK, seq = its ack and only RST is set; otherwise seq = 0 and
/// ack = its seq + payload + SYN + FIN, with RST|ACK. No options, no
/// payload, fresh checksums. Refuses to answer a RST. Returns 54.
pub fn tcp_rst_in_place(frame: &mut [u8], len: usize) -> Result<usize, WireError> {
    let len = len.min(frame.len());
    let (src, dst, sport, dport, seq, ack, flags, payload) = {
        let ip = Ipv4Packet::new_checked(&frame[ETH.min(len)..len])?;
        let seg = TcpSegment::new_checked(ip.payload())?;
        (
            ip.src_addr(),
            ip.dst_addr(),
            seg.src_port(),
            seg.dst_port(),
            seg.seq(),
            seg.ack(),
            seg.flags(),
            seg.payload_len() as u32,
        )
    };
    if flags & tcp::RST != 0 {
        return Err(WireError::WouldAnswerRst);
    }
    if frame.len() < ETH + 40 {
        return Err(WireError::Truncated);
    }
    let (out_seq, out_ack, out_flags) = if flags & tcp::ACK != 0 {
        (ack, 0, tcp::RST)
    } else {
        let n = payload + (flags & tcp::SYN != 0) as u32 + (flags & tcp::FIN != 0) as u32;
        (0, seq.wrapping_add(n), tcp::RST | tcp::ACK)
    };
    answer_headers(frame, 0, 0x4000, 6, 40, dst, src);
    let t = &mut frame[ETH + 20..ETH + 40];
    put16(t, 0, dport);
    put16(t, 2, sport);
    put32(t, 4, out_seq);
    put32(t, 8, out_ack);
    t[12] = 5 << 4;
    t[13] = out_flags;
    put16(t, 14, 0); // window
    put16(t, 16, 0); // checksum
    put16(t, 18, 0); // urgent
    let c = checksum::tcp_udp_ipv4(dst, src, 6, t);
    put16(t, 16, c);
    Ok(ETH + 40)
}

/// Makes `frame` an answer to the frame it held: MACs swapped, and a fresh
/// 20-byte IPv4 header (TTL 64, ident 0, the given TOS, flags, protocol and
/// total length) from `src` to `dst`. `frame` must hold at least 34 bytes.
fn answer_headers(
    frame: &mut [u8],
    tos: u8,
    flags: u16,
    proto: u8,
    total_len: u16,
    src: [u8; 4],
    dst: [u8; 4],
) {
    {
        let mut eth = EthernetFrame::new_unchecked(&mut frame[..ETH]);
        let (d, s) = (eth.dst_addr(), eth.src_addr());
        eth.set_dst_addr(s);
        eth.set_src_addr(d);
        eth.set_ethertype(ETHERTYPE_IPV4);
    }
    let ip = &mut frame[ETH..ETH + 20];
    ip[0] = 0x45;
    ip[1] = tos;
    put16(ip, 2, total_len);
    put16(ip, 4, 0);
    put16(ip, 6, flags);
    ip[8] = 64;
    ip[9] = proto;
    put16(ip, 10, 0);
    ip[12..16].copy_from_slice(&src);
    ip[16..20].copy_from_slice(&dst);
    let c = checksum::ipv4_header(ip);
    put16(ip, 10, c);
}

/// A TCP segment without payload the switch writes itself (a SYN
/// proxy's SYN-ACK to a client, SYN and ACK to a backend): addresses,
/// ports, numbers, flags, window and at most the MSS option.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Handshake {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub src_port: u16,
    pub dst_port: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub window: u16,
    pub mss: Option<u16>,
}

/// Writes `seg` over the IPv4 packet after the Ethernet header of `frame`
/// (the Ethernet header is left to the caller): a fresh 20-byte IPv4
/// header (TTL 64, DF, ident 0) and a TCP header of 20 bytes, or 24 with
/// the MSS option; full checksums. Returns the frame's length (54 or 58).
pub fn tcp_handshake_in_place(frame: &mut [u8], seg: &Handshake) -> Result<usize, WireError> {
    let tcp_len = if seg.mss.is_some() { 24 } else { 20 };
    let out_len = ETH + 20 + tcp_len;
    if frame.len() < out_len {
        return Err(WireError::NoRoom);
    }
    EthernetFrame::new_unchecked(&mut frame[..ETH]).set_ethertype(ETHERTYPE_IPV4);
    let ip = &mut frame[ETH..ETH + 20];
    ip[0] = 0x45;
    ip[1] = 0;
    put16(ip, 2, (20 + tcp_len) as u16);
    put16(ip, 4, 0);
    put16(ip, 6, 0x4000);
    ip[8] = 64;
    ip[9] = 6;
    put16(ip, 10, 0);
    ip[12..16].copy_from_slice(&seg.src);
    ip[16..20].copy_from_slice(&seg.dst);
    let c = checksum::ipv4_header(ip);
    put16(ip, 10, c);
    let t = &mut frame[ETH + 20..out_len];
    put16(t, 0, seg.src_port);
    put16(t, 2, seg.dst_port);
    put32(t, 4, seg.seq);
    put32(t, 8, seg.ack);
    t[12] = ((tcp_len / 4) as u8) << 4;
    t[13] = seg.flags;
    put16(t, 14, seg.window);
    put16(t, 16, 0);
    put16(t, 18, 0);
    if let Some(mss) = seg.mss {
        t[20] = 2;
        t[21] = 4;
        put16(t, 22, mss);
    }
    let c = checksum::tcp_udp_ipv4(seg.src, seg.dst, 6, t);
    put16(t, 16, c);
    Ok(out_len)
}

/// ICMP type "destination unreachable" and its code "fragmentation needed
/// and DF set" (RFC 792, RFC 1191).
pub const ICMP_UNREACHABLE: u8 = 3;
pub const ICMP_FRAG_NEEDED: u8 = 4;

/// Turns a received Ethernet/IPv4 packet (`len` bytes) into the ICMP
/// fragmentation-needed message that answers it (RFC 1191): from its
/// destination (the VIP) to its source, quoting its IP header and the first
/// 8 bytes of its payload, announcing `mtu` as the next-hop MTU. MACs are
/// swapped; the caller routes the answer. Returns the answer's length.
pub fn icmp_frag_needed_in_place(
    frame: &mut [u8],
    len: usize,
    mtu: u16,
) -> Result<usize, WireError> {
    let len = len.min(frame.len());
    let (src, dst, hl, total) = {
        let ip = Ipv4Packet::new_checked(&frame[ETH.min(len)..len])?;
        (
            ip.src_addr(),
            ip.dst_addr(),
            ip.header_len(),
            ip.total_len() as usize,
        )
    };
    let quote = (hl + 8).min(total);
    let out_len = ETH + 28 + quote;
    if out_len > frame.len() {
        return Err(WireError::NoRoom);
    }
    frame.copy_within(ETH..ETH + quote, ETH + 28);
    // TOS: internetwork control; no DF on an ICMP error.
    answer_headers(frame, 0xc0, 0, 1, (28 + quote) as u16, dst, src);
    let icmp = &mut frame[ETH + 20..out_len];
    icmp[0] = ICMP_UNREACHABLE;
    icmp[1] = ICMP_FRAG_NEEDED;
    put16(icmp, 2, 0);
    put16(icmp, 4, 0);
    put16(icmp, 6, mtu);
    let c = !checksum::fold(checksum::sum(icmp, 0));
    put16(icmp, 2, c);
    Ok(out_len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{PacketBuilder, SlicedPacket, TransportSlice};

    fn segment(syn: bool, ack: Option<u32>, fin: bool, payload: &[u8]) -> Vec<u8> {
        let mut b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 9], [2, 0, 0, 0, 0, 1])
            .ipv4([198, 18, 100, 1], [198, 18, 0, 10], 64)
            .tcp(40000, 81, 1000, 1000);
        if syn {
            b = b.syn();
        }
        if fin {
            b = b.fin();
        }
        if let Some(a) = ack {
            b = b.ack(a);
        }
        let mut v = Vec::new();
        b.write(&mut v, payload).unwrap();
        v
    }

    fn parse(f: &[u8]) -> (etherparse::Ipv4Header, etherparse::TcpHeader) {
        let p = SlicedPacket::from_ethernet(f).unwrap();
        let Some(etherparse::NetSlice::Ipv4(ip)) = p.net else {
            panic!()
        };
        let Some(TransportSlice::Tcp(t)) = p.transport else {
            panic!()
        };
        let iph = ip.header().to_header();
        let th = t.to_header();
        assert_eq!(iph.header_checksum, iph.calc_header_checksum());
        assert_eq!(th.checksum, th.calc_checksum_ipv4(&iph, &[]).unwrap());
        (iph, th)
    }

    #[test]
    fn rst_for_syn_acks_seq_plus_one() {
        let mut f = segment(true, None, false, &[]);
        let len = f.len();
        assert_eq!(tcp_rst_in_place(&mut f, len), Ok(54));
        let (ip, t) = parse(&f[..54]);
        assert_eq!(
            (ip.source, ip.destination),
            ([198, 18, 0, 10], [198, 18, 100, 1])
        );
        assert_eq!((t.source_port, t.destination_port), (81, 40000));
        assert!(t.rst && t.ack && !t.syn);
        assert_eq!((t.sequence_number, t.acknowledgment_number), (0, 1001));
        assert_eq!(&f[0..6], &[2, 0, 0, 0, 0, 9]);
    }

    #[test]
    fn rst_for_data_with_ack_uses_its_ack() {
        let mut f = segment(false, Some(777), true, b"hello");
        let len = f.len();
        tcp_rst_in_place(&mut f, len).unwrap();
        let (_, t) = parse(&f[..54]);
        assert!(t.rst && !t.ack);
        assert_eq!(t.sequence_number, 777);
    }

    #[test]
    fn rst_is_never_answered() {
        let mut v = Vec::new();
        PacketBuilder::ethernet2([2; 6], [3; 6])
            .ipv4([1, 1, 1, 1], [2, 2, 2, 2], 64)
            .tcp(1, 2, 3, 4)
            .rst()
            .write(&mut v, &[])
            .unwrap();
        let len = v.len();
        assert_eq!(
            tcp_rst_in_place(&mut v, len),
            Err(WireError::WouldAnswerRst)
        );
    }

    #[test]
    fn frag_needed_quotes_the_packet_and_names_the_mtu() {
        let mut f = segment(false, Some(5), false, &[0xab; 1400]);
        let orig = f.clone();
        let len = f.len();
        let n = icmp_frag_needed_in_place(&mut f, len, 1480).unwrap();
        assert_eq!(n, 14 + 20 + 8 + 20 + 8);
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
        let want = etherparse::Icmpv4Header::with_checksum(icmp.icmp_type(), icmp.payload());
        assert_eq!(icmp.checksum(), want.checksum);
        assert_eq!(icmp.payload(), &orig[14..14 + 28]);
        assert_eq!(&f[0..6], &orig[6..12]);
    }

    #[test]
    fn handshake_segment_fields_and_checksums() {
        let mut f = segment(false, Some(5), false, &[0xab; 100]);
        let seg = Handshake {
            src: [198, 18, 0, 10],
            dst: [198, 18, 100, 1],
            src_port: 81,
            dst_port: 40000,
            seq: 0x8000_0001,
            ack: 1001,
            flags: tcp::SYN | tcp::ACK,
            window: 65535,
            mss: Some(1460),
        };
        assert_eq!(tcp_handshake_in_place(&mut f, &seg), Ok(58));
        let (ip, t) = parse(&f[..58]);
        assert_eq!(
            (ip.source, ip.destination, ip.time_to_live),
            (seg.src, seg.dst, 64)
        );
        assert!(ip.dont_fragment);
        assert_eq!((t.source_port, t.destination_port), (81, 40000));
        assert_eq!(
            (t.sequence_number, t.acknowledgment_number),
            (0x8000_0001, 1001)
        );
        assert!(t.syn && t.ack && !t.rst && !t.fin && !t.psh);
        assert_eq!(t.window_size, 65535);
        assert_eq!(
            t.options.elements_iter().collect::<Vec<_>>(),
            vec![Ok(etherparse::TcpOptionElement::MaximumSegmentSize(1460))]
        );
        let no_mss = Handshake {
            mss: None,
            flags: tcp::ACK,
            ..seg
        };
        assert_eq!(tcp_handshake_in_place(&mut f, &no_mss), Ok(54));
        let (_, t) = parse(&f[..54]);
        assert!(t.ack && !t.syn);
        assert_eq!(t.options.elements_iter().count(), 0);
        assert_eq!(
            tcp_handshake_in_place(&mut [0u8; 57], &seg),
            Err(WireError::NoRoom)
        );
    }

    #[test]
    fn arp_reply_fields() {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&[2, 0, 0, 0, 0, 9, 0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 1]);
        f.extend_from_slice(&[2, 0, 0, 0, 0, 9, 198, 18, 0, 1]);
        f.extend_from_slice(&[0, 0, 0, 0, 0, 0, 198, 18, 0, 10]);
        f.resize(60, 0);
        assert_eq!(arp_reply_in_place(&mut f, [2, 0, 0, 0, 0, 1]), Ok(42));
        let a = etherparse::ArpPacket::from_slice(&f[14..42]).unwrap();
        assert_eq!(a.operation, etherparse::ArpOperation::REPLY);
        assert_eq!(a.sender_hw_addr(), &[2, 0, 0, 0, 0, 1]);
        assert_eq!(a.sender_protocol_addr(), &[198, 18, 0, 10]);
        assert_eq!(a.target_hw_addr(), &[2, 0, 0, 0, 0, 9]);
        assert_eq!(a.target_protocol_addr(), &[198, 18, 0, 1]);
        assert_eq!(&f[0..12], &[2, 0, 0, 0, 0, 9, 2, 0, 0, 0, 0, 1]);
    }
}
