//! The validator of an IPv4 fragment of a TCP or UDP datagram: what a
//! distributor that does not reassemble needs to send every fragment of a
//! datagram where its first one went.

use super::ipv4_l4::{HeaderChecksum, Ipv4L4, PROTO_TCP, PROTO_UDP, addrs, ipv4_header, l4_header};
use super::{WireError, be16};

/// More-fragments flag of the IPv4 flags and offset word.
const FLAG_MF: u16 = 0x2000;
/// Fragment offset (in 8-byte units) of the same word.
const OFFSET_MASK: u16 = 0x1fff;
/// The largest IPv4 datagram (header and payload).
const MAX_DATAGRAM: usize = 65535;

/// A valid fragment, as [`ipv4_fragment`] found it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4Fragment {
    /// IPv4 header length: 20..=60, within `total_len`.
    pub header_len: usize,
    /// IPv4 total length of this fragment: at most the buffer's length.
    pub total_len: usize,
    /// [`PROTO_TCP`] or [`PROTO_UDP`].
    pub protocol: u8,
    /// Source then destination address, as on the wire.
    pub addrs: [u8; 8],
    /// The IP identification: with the addresses and protocol, what the
    /// fragments of one datagram share.
    pub id: u16,
    /// Where this fragment's payload lies in the datagram's, in bytes.
    pub offset: usize,
    /// More fragments follow (not the last one).
    pub more: bool,
    /// The first fragment's (offset 0) TCP or UDP header, checked as
    /// [`crate::ipv4_l4`] checks a whole packet's, except that a UDP
    /// length covers the whole datagram (it reaches past this fragment)
    /// and `l4_len` is that length (TCP: this fragment's payload). `None`
    /// for a later fragment (no L4 header).
    pub first: Option<Ipv4L4>,
}

impl Ipv4Fragment {
    /// The key the fragments of one datagram share (RFC 791): source,
    /// destination, protocol and identification.
    #[inline]
    pub fn key(&self) -> (u64, u32) {
        (
            u64::from_be_bytes(self.addrs),
            u32::from(self.protocol) << 16 | u32::from(self.id),
        )
    }

    /// Bytes of the datagram's payload this fragment carries.
    #[inline]
    pub fn payload_len(&self) -> usize {
        self.total_len - self.header_len
    }
}

/// Validates an IPv4 fragment of a TCP or UDP datagram in `ip` (the bytes
/// from the IPv4 header to the end of the frame). The rules, in this order:
///
/// 1. the IPv4 header as [`crate::ipv4_l4`]'s rules 1 and 2 (the same
///    errors);
/// 2. a fragment (more-fragments or an offset) with a payload, whose
///    payload is a multiple of 8 bytes unless it is the last, and ends
///    within the 65,535 bytes of a datagram ([`WireError::BadFragment`]);
/// 3. TCP or UDP ([`WireError::NotTcpUdp`]);
/// 4. TCP: not at offset 8 (RFC 1858: it would overwrite the flags of the
///    header the first fragment carried; [`WireError::BadFragment`]);
/// 5. the first fragment (offset 0): its TCP header whole within it, or
///    its UDP header with a length reaching past it (the errors of
///    [`crate::ipv4_l4`]'s rule 5).
pub fn ipv4_fragment(ip: &[u8], csum: HeaderChecksum) -> Result<Ipv4Fragment, WireError> {
    let (hl, total) = ipv4_header(ip, csum)?;
    let word = be16(ip, 6);
    let more = word & FLAG_MF != 0;
    let offset = usize::from(word & OFFSET_MASK) * 8;
    let payload = total - hl;
    if (!more && offset == 0)
        || payload == 0
        || (more && payload % 8 != 0)
        || hl + offset + payload > MAX_DATAGRAM
    {
        return Err(WireError::BadFragment);
    }
    let protocol = ip[9];
    if protocol != PROTO_TCP && protocol != PROTO_UDP {
        return Err(WireError::NotTcpUdp);
    }
    if protocol == PROTO_TCP && offset == 8 {
        return Err(WireError::BadFragment);
    }
    let first = if offset == 0 {
        let (ports, tcp_flags, l4_len) = l4_header(protocol, &ip[hl..total], false)?;
        Some(Ipv4L4 {
            header_len: hl,
            total_len: total,
            protocol,
            tcp_flags,
            addrs: addrs(ip),
            ports,
            l4_len,
        })
    } else {
        None
    };
    Ok(Ipv4Fragment {
        header_len: hl,
        total_len: total,
        protocol,
        addrs: addrs(ip),
        id: be16(ip, 4),
        offset,
        more,
        first,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checksum;
    use crate::ipv4_l4::ipv4_l4;

    /// An IPv4 packet of `payload` bytes (pattern) with the given flags
    /// word, protocol and, for offset 0, a UDP or TCP header in front.
    fn fragment(proto: u8, word: u16, payload: usize, ulen: u16) -> Vec<u8> {
        let mut p = vec![0u8; 20 + payload];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&((20 + payload) as u16).to_be_bytes());
        p[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
        p[6..8].copy_from_slice(&word.to_be_bytes());
        p[8] = 64;
        p[9] = proto;
        p[12..20].copy_from_slice(&[198, 18, 100, 1, 198, 18, 0, 10]);
        for (i, b) in p[20..].iter_mut().enumerate() {
            *b = i as u8;
        }
        if word & OFFSET_MASK == 0 && payload >= 20 {
            p[20..24].copy_from_slice(&[0x9c, 0x40, 0, 53]);
            if proto == PROTO_UDP {
                p[24..26].copy_from_slice(&ulen.to_be_bytes());
            } else {
                p[32] = 0x50;
                p[33] = 0x10;
            }
        }
        let c = checksum::ipv4_header(&p[..20]);
        p[10..12].copy_from_slice(&c.to_be_bytes());
        p
    }

    #[test]
    fn a_first_fragment_gives_its_header_and_a_later_one_its_place() {
        let first = fragment(PROTO_UDP, FLAG_MF, 1480, 4008);
        assert_eq!(
            ipv4_l4(&first, HeaderChecksum::Verify),
            Err(WireError::Fragment)
        );
        let f = ipv4_fragment(&first, HeaderChecksum::Verify).unwrap();
        assert_eq!(
            (f.id, f.offset, f.more, f.payload_len()),
            (0x1234, 0, true, 1480)
        );
        let l4 = f.first.unwrap();
        assert_eq!((l4.src_port(), l4.dst_port(), l4.l4_len), (40000, 53, 4008));
        assert_eq!(f.key(), (0xc612_6401_c612_000a, 17 << 16 | 0x1234));
        let last = fragment(PROTO_UDP, 2960 / 8, 1048, 0);
        let f = ipv4_fragment(&last, HeaderChecksum::Verify).unwrap();
        assert_eq!((f.offset, f.more, f.first), (2960, false, None));
        assert_eq!(f.key().0, 0xc612_6401_c612_000a);
        let tcp = fragment(PROTO_TCP, FLAG_MF, 40, 0);
        let t = ipv4_fragment(&tcp, HeaderChecksum::Verify)
            .unwrap()
            .first
            .unwrap();
        assert_eq!((t.tcp_flags, t.l4_len), (0x10, 40));
    }

    #[test]
    fn each_rule_gives_its_error() {
        let check = |p: &[u8]| ipv4_fragment(p, HeaderChecksum::Verify);
        let mut bad = fragment(PROTO_UDP, FLAG_MF, 1480, 4008);
        bad[10] ^= 1;
        assert_eq!(check(&bad), Err(WireError::BadChecksum));
        assert_eq!(
            check(&fragment(PROTO_UDP, 0, 16, 16)),
            Err(WireError::BadFragment),
            "not a fragment"
        );
        assert_eq!(
            check(&fragment(PROTO_UDP, FLAG_MF | 1, 0, 0)),
            Err(WireError::BadFragment),
            "empty"
        );
        assert_eq!(
            check(&fragment(PROTO_UDP, FLAG_MF | 1, 12, 0)),
            Err(WireError::BadFragment),
            "not 8-aligned"
        );
        assert_eq!(
            check(&fragment(PROTO_UDP, 8189, 4, 0)),
            Err(WireError::BadFragment),
            "past 65535"
        );
        assert!(
            check(&fragment(PROTO_UDP, 8189, 3, 0)).is_ok(),
            "up to 65535"
        );
        assert_eq!(
            check(&fragment(1, FLAG_MF, 16, 0)),
            Err(WireError::NotTcpUdp)
        );
        assert_eq!(
            check(&fragment(PROTO_TCP, 1, 16, 0)),
            Err(WireError::BadFragment),
            "TCP at 8"
        );
        assert!(check(&fragment(PROTO_UDP, 1, 16, 0)).is_ok(), "UDP at 8");
        assert_eq!(
            check(&fragment(PROTO_TCP, FLAG_MF, 16, 0)),
            Err(WireError::Truncated),
            "TCP header cut"
        );
        assert_eq!(
            check(&fragment(PROTO_UDP, FLAG_MF, 1480, 1480)),
            Err(WireError::BadUdpLength),
            "all in one"
        );
        assert_eq!(
            check(&fragment(PROTO_UDP, FLAG_MF, 1480, 4)),
            Err(WireError::BadUdpLength)
        );
    }
}
