//! The one validator of an IPv4 TCP/UDP packet. Every pass of switchd's
//! filter and afpacket's checksum completion read a packet only after it
//! said yes, so they cannot disagree on what a valid packet is.

use super::{WireError, be16, checksum, ipv4, tcp, udp};

/// IP protocol number of TCP.
pub const PROTO_TCP: u8 = 6;
/// IP protocol number of UDP.
pub const PROTO_UDP: u8 = 17;

/// Whether [`ipv4_l4`] checks the IPv4 header checksum.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderChecksum {
    /// A wrong header checksum makes the packet invalid
    /// ([`WireError::BadChecksum`]).
    Verify,
    /// The checksum is not read (afpacket completing the checksums of a
    /// frame a local stack left to offload).
    Ignore,
}

/// A valid IPv4 TCP or UDP packet, as [`ipv4_l4`] found it: everything a
/// pass needs to key, rewrite or checksum it without reading it again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4L4 {
    /// IPv4 header length: 20..=60, within `total_len`.
    pub header_len: usize,
    /// IPv4 total length: at most the buffer's length (the buffer may be
    /// longer: Ethernet padding).
    pub total_len: usize,
    /// [`PROTO_TCP`] or [`PROTO_UDP`].
    pub protocol: u8,
    /// TCP flags (0 for UDP).
    pub tcp_flags: u8,
    /// Source then destination address, as on the wire (see
    /// [`Ipv4L4::src_addr`]; kept as bytes so a caller that wants them as
    /// one word reads them as one).
    pub addrs: [u8; 8],
    /// Source then destination port, as on the wire.
    pub ports: [u8; 4],
    /// The length the TCP/UDP checksum covers: the IP payload for TCP,
    /// the UDP length field for UDP.
    pub l4_len: usize,
}

impl Ipv4L4 {
    #[inline(always)]
    pub fn src_addr(&self) -> u32 {
        u32::from_be_bytes([self.addrs[0], self.addrs[1], self.addrs[2], self.addrs[3]])
    }

    #[inline(always)]
    pub fn dst_addr(&self) -> u32 {
        u32::from_be_bytes([self.addrs[4], self.addrs[5], self.addrs[6], self.addrs[7]])
    }

    #[inline(always)]
    pub fn src_port(&self) -> u16 {
        u16::from_be_bytes([self.ports[0], self.ports[1]])
    }

    #[inline(always)]
    pub fn dst_port(&self) -> u16 {
        u16::from_be_bytes([self.ports[2], self.ports[3]])
    }
}

/// Validates an IPv4 TCP/UDP packet in `ip` (the bytes from the IPv4
/// header to the end of the frame). The rules, checked in this order (the
/// first that fails is the error):
///
/// 1. at least 20 bytes ([`WireError::Truncated`]), version 4
///    ([`WireError::BadVersion`]), header length 20..=60 within the
///    buffer ([`WireError::BadIhl`]), total length between the header
///    length and the buffer length ([`WireError::BadTotalLength`]);
/// 2. with [`HeaderChecksum::Verify`], the header checksum
///    ([`WireError::BadChecksum`]);
/// 3. not a fragment: neither more-fragments nor an offset
///    ([`WireError::Fragment`]);
/// 4. TCP or UDP ([`WireError::NotTcpUdp`]);
/// 5. TCP: a 20-byte header within the IP payload ([`WireError::Truncated`])
///    and a data offset of 5 words or more within it
///    ([`WireError::BadDataOffset`]); UDP: an 8-byte header within the IP
///    payload ([`WireError::Truncated`]) and a length field of 8 or more
///    within it ([`WireError::BadUdpLength`]).
///
/// The common case (a 20-byte header) is checked by
/// [`ipv4_l4_common`], inline; anything else takes an out-of-line path with
/// the same rules.
#[inline(always)]
pub fn ipv4_l4(ip: &[u8], csum: HeaderChecksum) -> Result<Ipv4L4, WireError> {
    match ipv4_l4_common(ip, csum) {
        Some(p) => Ok(p),
        None => ipv4_l4_any(ip, csum),
    }
}

/// [`ipv4_l4`]'s common case alone: a valid packet with a 20-byte IPv4
/// header and the TCP header or UDP datagram within the first 40 bytes of
/// `ip`, read from one fixed-size array (no bounds check past the first).
/// `None` says nothing more: the packet may be valid (options, a short
/// UDP datagram) or not; [`ipv4_l4`] tells. For a caller that keeps the
/// common case's facts apart (its header length is a constant there).
#[inline(always)]
pub fn ipv4_l4_common(ip: &[u8], csum: HeaderChecksum) -> Option<Ipv4L4> {
    const L4: usize = ipv4::MIN_HEADER_LEN;
    let f = ip.first_chunk::<{ L4 + tcp::MIN_HEADER_LEN }>()?;
    let total = be16(f, 2) as usize;
    // Version 4, 20-byte header, not a fragment, length within the buffer.
    if f[0] != 0x45 || be16(f, 6) & 0x3fff != 0 || total < L4 || total > ip.len() {
        return None;
    }
    if csum == HeaderChecksum::Verify {
        let h: &[u8; 20] = f.first_chunk::<20>().expect("40 bytes hold 20");
        if !checksum::ipv4_header_ok(h) {
            return None;
        }
    }
    let protocol = f[9];
    let payload = total - L4;
    let (tcp_flags, l4_len) = match protocol {
        PROTO_TCP => {
            let doff = (f[L4 + 12] >> 4) as usize * 4;
            if doff < tcp::MIN_HEADER_LEN || doff > payload {
                return None;
            }
            (f[L4 + 13], payload)
        }
        PROTO_UDP => {
            let ulen = be16(f, L4 + 4) as usize;
            if ulen < udp::HEADER_LEN || ulen > payload {
                return None;
            }
            (0, ulen)
        }
        _ => return None,
    };
    Some(Ipv4L4 {
        header_len: L4,
        total_len: total,
        protocol,
        tcp_flags,
        addrs: [f[12], f[13], f[14], f[15], f[16], f[17], f[18], f[19]],
        ports: [f[L4], f[L4 + 1], f[L4 + 2], f[L4 + 3]],
        l4_len,
    })
}

/// [`ipv4_l4`] for every packet: options, short buffers, and the error of
/// a packet that fails.
#[cold]
#[inline(never)]
fn ipv4_l4_any(ip: &[u8], csum: HeaderChecksum) -> Result<Ipv4L4, WireError> {
    let (hl, total) = ipv4_header(ip, csum)?;
    if be16(ip, 6) & 0x3fff != 0 {
        return Err(WireError::Fragment);
    }
    let protocol = ip[9];
    let (ports, tcp_flags, l4_len) = l4_header(protocol, &ip[hl..total], true)?;
    Ok(Ipv4L4 {
        header_len: hl,
        total_len: total,
        protocol,
        tcp_flags,
        addrs: addrs(ip),
        ports,
        l4_len,
    })
}

/// Rules 1 and 2 of [`ipv4_l4`] (the IPv4 header alone): the header
/// length and total length, both within `ip`.
#[inline]
pub(crate) fn ipv4_header(ip: &[u8], csum: HeaderChecksum) -> Result<(usize, usize), WireError> {
    let Some(h) = ip.first_chunk::<{ ipv4::MIN_HEADER_LEN }>() else {
        return Err(WireError::Truncated);
    };
    if h[0] >> 4 != 4 {
        return Err(WireError::BadVersion);
    }
    let hl = (h[0] & 0xf) as usize * 4;
    if hl < ipv4::MIN_HEADER_LEN || hl > ip.len() {
        return Err(WireError::BadIhl);
    }
    let total = be16(h, 2) as usize;
    if total < hl || total > ip.len() {
        return Err(WireError::BadTotalLength);
    }
    if csum == HeaderChecksum::Verify && checksum::fold(checksum::sum(&ip[..hl], 0)) != 0xffff {
        return Err(WireError::BadChecksum);
    }
    Ok((hl, total))
}

/// Source then destination address of a header [`ipv4_header`] accepted.
#[inline]
pub(crate) fn addrs(ip: &[u8]) -> [u8; 8] {
    let mut a = [0; 8];
    a.copy_from_slice(&ip[12..20]);
    a
}

/// Rules 4 and 5 of [`ipv4_l4`]: the TCP or UDP header at the start of
/// `l4` (the IP payload), as (ports, TCP flags, the length the checksum
/// covers). `whole`: `l4` is the whole datagram; otherwise it is a first
/// fragment's payload, which must hold the whole TCP header, and a UDP
/// length that reaches past it (the rest follows in later fragments).
#[inline]
pub(crate) fn l4_header(
    protocol: u8,
    l4: &[u8],
    whole: bool,
) -> Result<([u8; 4], u8, usize), WireError> {
    match protocol {
        PROTO_TCP => {
            let t = l4
                .first_chunk::<{ tcp::MIN_HEADER_LEN }>()
                .ok_or(WireError::Truncated)?;
            let doff = (t[12] >> 4) as usize * 4;
            if doff < tcp::MIN_HEADER_LEN || doff > l4.len() {
                return Err(WireError::BadDataOffset);
            }
            Ok(([t[0], t[1], t[2], t[3]], t[13], l4.len()))
        }
        PROTO_UDP => {
            let u = l4
                .first_chunk::<{ udp::HEADER_LEN }>()
                .ok_or(WireError::Truncated)?;
            let ulen = be16(u, 4) as usize;
            let fits = if whole {
                ulen <= l4.len()
            } else {
                ulen > l4.len()
            };
            if ulen < udp::HEADER_LEN || !fits {
                return Err(WireError::BadUdpLength);
            }
            Ok(([u[0], u[1], u[2], u[3]], 0, ulen))
        }
        _ => Err(WireError::NotTcpUdp),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::PacketBuilder;
    use proptest::prelude::*;

    fn ip_of(frame: Vec<u8>) -> Vec<u8> {
        frame[14..].to_vec()
    }

    fn tcp_packet(payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        PacketBuilder::ethernet2([2; 6], [4; 6])
            .ipv4([198, 18, 0, 1], [198, 18, 0, 2], 64)
            .tcp(1000, 80, 7, 100)
            .ack(1)
            .write(&mut v, payload)
            .unwrap();
        ip_of(v)
    }

    fn udp_packet(payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        PacketBuilder::ethernet2([2; 6], [4; 6])
            .ipv4([198, 18, 0, 1], [198, 18, 0, 2], 64)
            .udp(1000, 53)
            .write(&mut v, payload)
            .unwrap();
        ip_of(v)
    }

    fn fix_header_checksum(ip: &mut [u8]) {
        let hl = (ip[0] & 0xf) as usize * 4;
        ip[10..12].copy_from_slice(&[0, 0]);
        let c = checksum::ipv4_header(&ip[..hl]);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
    }

    #[test]
    fn a_tcp_segment_gives_its_tuple_flags_and_lengths() {
        let ip = tcp_packet(b"hello");
        let v = ipv4_l4(&ip, HeaderChecksum::Verify).unwrap();
        assert_eq!(
            v,
            Ipv4L4 {
                header_len: 20,
                total_len: 45,
                protocol: PROTO_TCP,
                tcp_flags: tcp::ACK,
                addrs: [198, 18, 0, 1, 198, 18, 0, 2],
                ports: [0x03, 0xe8, 0, 80],
                l4_len: 25,
            }
        );
    }

    #[test]
    fn a_short_udp_datagram_takes_the_general_path_to_the_same_answer() {
        // 28 bytes of IP: shorter than the fast path's fixed array.
        let ip = udp_packet(b"");
        let v = ipv4_l4(&ip, HeaderChecksum::Verify).unwrap();
        assert_eq!((v.protocol, v.l4_len, v.total_len), (PROTO_UDP, 8, 28));
        assert_eq!((v.src_port(), v.dst_port(), v.tcp_flags), (1000, 53, 0));
    }

    #[test]
    fn each_rule_gives_its_error() {
        let ok = tcp_packet(b"");
        let with = |f: &dyn Fn(&mut Vec<u8>), fix: bool| {
            let mut p = ok.clone();
            f(&mut p);
            if fix {
                fix_header_checksum(&mut p);
            }
            ipv4_l4(&p, HeaderChecksum::Verify)
        };
        assert_eq!(with(&|p| p.truncate(19), false), Err(WireError::Truncated));
        assert_eq!(with(&|p| p[0] = 0x65, false), Err(WireError::BadVersion));
        assert_eq!(with(&|p| p[0] = 0x44, false), Err(WireError::BadIhl));
        assert_eq!(
            with(&|p| p[2..4].copy_from_slice(&[0, 41]), true),
            Err(WireError::BadTotalLength)
        );
        assert_eq!(with(&|p| p[10] ^= 1, false), Err(WireError::BadChecksum));
        assert_eq!(with(&|p| p[6] = 0x20, true), Err(WireError::Fragment));
        assert_eq!(with(&|p| p[7] = 1, true), Err(WireError::Fragment));
        assert_eq!(with(&|p| p[9] = 1, true), Err(WireError::NotTcpUdp));
        assert_eq!(
            with(&|p| p[32] = 0x40, false),
            Err(WireError::BadDataOffset)
        );
        assert_eq!(
            with(&|p| p[32] = 0x60, false),
            Err(WireError::BadDataOffset)
        );
        // A TCP header cut short by the total length.
        assert_eq!(
            with(&|p| p[2..4].copy_from_slice(&[0, 39]), true),
            Err(WireError::Truncated)
        );
        let udp = udp_packet(b"abcd");
        let mut u = udp.clone();
        u[24..26].copy_from_slice(&[0, 7]);
        assert_eq!(
            ipv4_l4(&u, HeaderChecksum::Verify),
            Err(WireError::BadUdpLength)
        );
        u[24..26].copy_from_slice(&[0, 13]);
        assert_eq!(
            ipv4_l4(&u, HeaderChecksum::Verify),
            Err(WireError::BadUdpLength)
        );
        // Ignore reads no checksum.
        let mut p = ok.clone();
        p[10] ^= 1;
        assert!(ipv4_l4(&p, HeaderChecksum::Ignore).is_ok());
    }

    #[test]
    fn a_udp_length_short_of_the_payload_is_what_the_checksum_covers() {
        let mut u = udp_packet(b"abcd");
        u[24..26].copy_from_slice(&[0, 10]);
        let v = ipv4_l4(&u, HeaderChecksum::Verify).unwrap();
        assert_eq!((v.total_len, v.l4_len), (32, 10));
    }

    proptest! {
        /// The fast path and the general path are one validator: on any
        /// bytes (a real header now and then) they agree.
        #[test]
        fn the_fast_path_agrees_with_the_general_one(
            mut b in proptest::collection::vec(any::<u8>(), 0..80),
            shape in any::<bool>(),
            fix in any::<bool>(),
            verify in any::<bool>(),
        ) {
            if shape && b.len() >= 40 {
                b[0] = 0x45;
                b[6] &= 0xc0;
                b[7] = 0;
                b[9] = if b[9] & 1 == 0 { PROTO_TCP } else { PROTO_UDP };
                let total = 20 + (b[3] as usize % (b.len() - 19));
                b[2..4].copy_from_slice(&(total as u16).to_be_bytes());
                b[32] = 0x50;
            }
            if fix && b.len() >= 20 && b[0] >> 4 == 4 && (b[0] & 0xf) as usize * 4 <= b.len() && b[0] & 0xf >= 5 {
                fix_header_checksum(&mut b);
            }
            let csum = if verify { HeaderChecksum::Verify } else { HeaderChecksum::Ignore };
            if let Some(p) = ipv4_l4_common(&b, csum) {
                prop_assert_eq!(Ok(p), ipv4_l4_any(&b, csum));
            }
            prop_assert_eq!(ipv4_l4(&b, csum), ipv4_l4_any(&b, csum));
        }
    }
}
