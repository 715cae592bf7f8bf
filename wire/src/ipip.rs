//! IP-in-IP encapsulation (RFC 2003): an outer IPv4 header in front of the
//! packet, built in place in the frame's buffer.

use super::ethernet::ETHERNET_HEADER_LEN as ETH;
use super::ipv4::MIN_HEADER_LEN;
use super::{WireError, checksum, put16};

/// IP protocol number of IPv4-in-IPv4.
pub const PROTO_IPIP: u8 = 4;
/// Bytes encapsulation adds.
pub const OVERHEAD: usize = MIN_HEADER_LEN;
/// TTL of the outer header.
pub const OUTER_TTL: u8 = 64;

/// Wraps the IPv4 packet of an Ethernet frame (`frame[..len]`, a valid IPv4
/// header at byte 14) in an outer IPv4 header from `src` to `dst`; the
/// Ethernet header stays where it is. The outer header copies the inner
/// TOS (DSCP and ECN, RFC 6040's normal mode), sets DF (the caller has
/// checked the path MTU) and carries ident 0. Returns the new frame length.
///
/// `frame` is the whole buffer: it must have room for `len + 20` bytes.
pub fn encapsulate_in_place(
    frame: &mut [u8],
    len: usize,
    src: [u8; 4],
    dst: [u8; 4],
) -> Result<usize, WireError> {
    if len < ETH + MIN_HEADER_LEN || len > frame.len() {
        return Err(WireError::Truncated);
    }
    let out_len = len + OVERHEAD;
    if out_len > frame.len() {
        return Err(WireError::NoRoom);
    }
    let ip_len = len - ETH;
    let tos = frame[ETH + 1];
    frame.copy_within(ETH..len, ETH + OVERHEAD);
    let o = &mut frame[ETH..ETH + OVERHEAD];
    o[0] = 0x45;
    o[1] = tos;
    put16(o, 2, (ip_len + OVERHEAD) as u16);
    put16(o, 4, 0);
    put16(o, 6, 0x4000); // DF
    o[8] = OUTER_TTL;
    o[9] = PROTO_IPIP;
    put16(o, 10, 0);
    o[12..16].copy_from_slice(&src);
    o[16..20].copy_from_slice(&dst);
    let c = checksum::ipv4_header(o);
    put16(o, 10, c);
    Ok(out_len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{PacketBuilder, SlicedPacket};

    fn udp_frame(payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        PacketBuilder::ethernet2([2, 0, 0, 0, 0, 9], [2, 0, 0, 0, 0, 1])
            .ipv4([198, 18, 1, 2], [198, 18, 0, 10], 63)
            .udp(40000, 53)
            .write(&mut v, payload)
            .unwrap();
        v
    }

    #[test]
    fn outer_header_wraps_the_inner_packet_unchanged() {
        let inner = udp_frame(b"hello");
        let mut buf = inner.clone();
        buf[ETH + 1] = 0xb9; // DSCP 46, ECN 1
        let mut want_inner = buf[ETH..].to_vec();
        buf.resize(2048, 0xee);
        let n =
            encapsulate_in_place(&mut buf, inner.len(), [198, 19, 0, 1], [198, 19, 0, 11]).unwrap();
        assert_eq!(n, inner.len() + 20);
        assert_eq!(&buf[..ETH], &inner[..ETH]);
        let outer = etherparse::Ipv4HeaderSlice::from_slice(&buf[ETH..n]).unwrap();
        let h = outer.to_header();
        assert_eq!(h.header_checksum, h.calc_header_checksum());
        assert_eq!(h.protocol, etherparse::IpNumber::IPV4);
        assert_eq!(
            (h.source, h.destination),
            ([198, 19, 0, 1], [198, 19, 0, 11])
        );
        assert_eq!(h.total_len as usize, n - ETH);
        assert_eq!(h.time_to_live, 64);
        assert!(h.dont_fragment);
        assert_eq!(outer.dcp().value(), 46);
        assert_eq!(outer.ecn().value(), 1);
        // The inner packet follows byte for byte and still parses.
        want_inner.truncate(inner.len() - ETH);
        assert_eq!(&buf[ETH + 20..n], &want_inner[..]);
        let p = SlicedPacket::from_ip(&buf[ETH + 20..n]).unwrap();
        assert!(matches!(
            p.transport,
            Some(etherparse::TransportSlice::Udp(_))
        ));
    }

    #[test]
    fn refuses_without_room() {
        let inner = udp_frame(b"x");
        let mut buf = inner.clone();
        let len = buf.len();
        assert_eq!(
            encapsulate_in_place(&mut buf, len, [1; 4], [2; 4]),
            Err(WireError::NoRoom)
        );
        assert_eq!(buf, inner, "untouched on refusal");
        assert_eq!(
            encapsulate_in_place(&mut buf, 20, [1; 4], [2; 4]),
            Err(WireError::Truncated)
        );
    }
}
