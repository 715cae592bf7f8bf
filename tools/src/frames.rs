//! Building and checking test frames with etherparse, an independent parser:
//! nothing here shares code with switchd's own packet views.

use etherparse::{EtherType, Ethernet2Header, IpNumber, Ipv4Header, TcpHeader, UdpHeader};

/// A frame to build.
#[derive(Clone, Debug)]
pub struct Spec {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: ([u8; 4], u16),
    pub dst: ([u8; 4], u16),
    pub tcp: Option<TcpFlags>,
    pub ttl: u8,
    /// IPv4 identification: lbgen stores the flow step here.
    pub ident: u16,
    pub payload_len: usize,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpFlags {
    pub syn: bool,
    pub ack: bool,
    pub fin: bool,
    pub rst: bool,
    pub psh: bool,
    pub seq: u32,
    pub ack_no: u32,
}

/// Writes the frame into `out` (cleared first).
pub fn build(s: &Spec, out: &mut Vec<u8>) {
    out.clear();
    let payload: Vec<u8> = (0..s.payload_len)
        .map(|i| (i as u8) ^ (s.ident as u8))
        .collect();
    let eth = Ethernet2Header {
        source: s.src_mac,
        destination: s.dst_mac,
        ether_type: EtherType::IPV4,
    };
    let l4_len = match s.tcp {
        Some(_) => TcpHeader::MIN_LEN,
        None => UdpHeader::LEN,
    } + payload.len();
    let proto = if s.tcp.is_some() {
        IpNumber::TCP
    } else {
        IpNumber::UDP
    };
    let mut ip =
        Ipv4Header::new(l4_len as u16, s.ttl, proto, s.src.0, s.dst.0).expect("ipv4 header");
    ip.identification = s.ident;
    ip.dont_fragment = true;
    eth.write(out).expect("vec write");
    ip.write(out).expect("vec write");
    match s.tcp {
        Some(f) => {
            let mut t = TcpHeader::new(s.src.1, s.dst.1, f.seq, 64240);
            t.syn = f.syn;
            t.ack = f.ack;
            t.fin = f.fin;
            t.rst = f.rst;
            t.psh = f.psh;
            t.acknowledgment_number = f.ack_no;
            t.checksum = t.calc_checksum_ipv4(&ip, &payload).expect("tcp checksum");
            t.write(out).expect("vec write");
        }
        None => {
            let u =
                UdpHeader::with_ipv4_checksum(s.src.1, s.dst.1, &ip, &payload).expect("udp header");
            u.write(out).expect("vec write");
        }
    }
    out.extend_from_slice(&payload);
}

/// A received frame, parsed and checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parsed {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: ([u8; 4], u16),
    pub dst: ([u8; 4], u16),
    pub proto: u8,
    pub ttl: u8,
    pub ident: u16,
    pub tcp: Option<TcpFlags>,
    pub payload_len: usize,
}

/// Parses an Ethernet/IPv4/TCP-or-UDP frame and verifies the IPv4 header
/// checksum and the TCP/UDP checksum. Errors say what is wrong.
pub fn parse_checked(frame: &[u8]) -> Result<Parsed, String> {
    let (eth, rest) = Ethernet2Header::from_slice(frame).map_err(|e| format!("ethernet: {e}"))?;
    if eth.ether_type != EtherType::IPV4 {
        return Err(format!("ethertype {:?} is not IPv4", eth.ether_type));
    }
    let (ip, rest) = Ipv4Header::from_slice(rest).map_err(|e| format!("ipv4: {e}"))?;
    if ip.header_checksum != ip.calc_header_checksum() {
        return Err(format!(
            "ipv4 header checksum {:#06x}, correct is {:#06x}",
            ip.header_checksum,
            ip.calc_header_checksum()
        ));
    }
    let l4_len = ip.payload_len().map_err(|e| format!("ipv4 length: {e}"))? as usize;
    if rest.len() < l4_len {
        return Err(format!(
            "ipv4 says {l4_len} payload bytes, frame has {}",
            rest.len()
        ));
    }
    let l4 = &rest[..l4_len];
    let base = Parsed {
        src_mac: eth.source,
        dst_mac: eth.destination,
        src: (ip.source, 0),
        dst: (ip.destination, 0),
        proto: ip.protocol.0,
        ttl: ip.time_to_live,
        ident: ip.identification,
        tcp: None,
        payload_len: 0,
    };
    match ip.protocol {
        IpNumber::TCP => {
            let (t, payload) = TcpHeader::from_slice(l4).map_err(|e| format!("tcp: {e}"))?;
            let want = t
                .calc_checksum_ipv4(&ip, payload)
                .map_err(|e| format!("tcp: {e}"))?;
            if t.checksum != want {
                return Err(format!(
                    "tcp checksum {:#06x}, correct is {want:#06x}",
                    t.checksum
                ));
            }
            Ok(Parsed {
                src: (ip.source, t.source_port),
                dst: (ip.destination, t.destination_port),
                tcp: Some(TcpFlags {
                    syn: t.syn,
                    ack: t.ack,
                    fin: t.fin,
                    rst: t.rst,
                    psh: t.psh,
                    seq: t.sequence_number,
                    ack_no: t.acknowledgment_number,
                }),
                payload_len: payload.len(),
                ..base
            })
        }
        IpNumber::UDP => {
            let (u, payload) = UdpHeader::from_slice(l4).map_err(|e| format!("udp: {e}"))?;
            if u.checksum != 0 {
                let want = u
                    .calc_checksum_ipv4(&ip, payload)
                    .map_err(|e| format!("udp: {e}"))?;
                if u.checksum != want {
                    return Err(format!(
                        "udp checksum {:#06x}, correct is {want:#06x}",
                        u.checksum
                    ));
                }
            }
            Ok(Parsed {
                src: (ip.source, u.source_port),
                dst: (ip.destination, u.destination_port),
                payload_len: payload.len(),
                ..base
            })
        }
        p => Err(format!("ip protocol {} is not TCP or UDP", p.0)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_then_parse_round_trips() {
        let s = Spec {
            src_mac: [2, 0, 0, 0, 0, 1],
            dst_mac: [2, 0, 0, 0, 0, 2],
            src: ([198, 18, 100, 1], 40000),
            dst: ([198, 18, 0, 10], 80),
            tcp: Some(TcpFlags {
                syn: true,
                seq: 77,
                ..Default::default()
            }),
            ttl: 64,
            ident: 3,
            payload_len: 10,
        };
        let mut v = Vec::new();
        build(&s, &mut v);
        let p = parse_checked(&v).unwrap();
        assert_eq!(
            (p.src, p.dst, p.ttl, p.ident, p.payload_len),
            (s.src, s.dst, 64, 3, 10)
        );
        assert!(p.tcp.unwrap().syn);
        v[30] ^= 1; // corrupt the destination address
        assert!(parse_checked(&v).unwrap_err().contains("checksum"));
    }
}
