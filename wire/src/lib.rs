//! Packet views over byte buffers, after smoltcp's `wire` module: the
//! layer below both the NIC drivers (netdrv) and the packet filter
//! (switchd), so the two check a frame by the same rules.
//!
//! A view wraps a buffer (`T: AsRef<[u8]>` to read, `AsMut<[u8]>` to write).
//! `new_checked` validates lengths once; after it succeeds no accessor
//! panics. Field offsets are named constants in each file. No allocation,
//! no `std` (tests aside).
//!
//! [`ipv4_l4`] is the one validator of an IPv4 TCP/UDP packet: every pass
//! of switchd's filter and afpacket's checksum completion use it.

#![cfg_attr(not(test), no_std)]

pub mod arp;
pub mod checksum;
pub mod ethernet;
pub mod icmp;
pub mod ipip;
pub mod ipv4;
pub mod ipv4_frag;
pub mod ipv4_l4;
pub mod reply;
pub mod siphash;
pub mod syncookie;
pub mod tcp;
pub mod tcpopt;
pub mod udp;

pub use arp::{ARP_REPLY, ARP_REQUEST, ArpPacket};
pub use ethernet::{ETHERNET_HEADER_LEN, ETHERTYPE_ARP, ETHERTYPE_IPV4, EthernetFrame};
pub use ipv4::Ipv4Packet;
pub use ipv4_frag::{Ipv4Fragment, ipv4_fragment};
pub use ipv4_l4::{HeaderChecksum, Ipv4L4, PROTO_TCP, PROTO_UDP, ipv4_l4, ipv4_l4_common};
pub use reply::{
    Handshake, arp_reply_in_place, icmp_frag_needed_in_place, tcp_handshake_in_place,
    tcp_rst_in_place,
};
pub use tcp::TcpSegment;
pub use udp::UdpDatagram;

/// Why a buffer is not a valid packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("buffer too short for the header")]
    Truncated,
    #[error("IP version is not 4")]
    BadVersion,
    #[error("IPv4 header length below 20 bytes or beyond the buffer")]
    BadIhl,
    #[error("IPv4 total length smaller than the header or larger than the buffer")]
    BadTotalLength,
    #[error("IPv4 header checksum wrong")]
    BadChecksum,
    #[error("an IPv4 fragment")]
    Fragment,
    #[error("IPv4 packet neither TCP nor UDP")]
    NotTcpUdp,
    #[error("TCP data offset below 5 words or beyond the segment")]
    BadDataOffset,
    #[error("UDP length below 8 or beyond the datagram")]
    BadUdpLength,
    #[error("TCP flags no stack sends (SYN with FIN or RST, or none)")]
    ImpossibleTcpFlags,
    #[error("UDP length differs from the IP payload length")]
    UdpLengthMismatch,
    #[error("not an Ethernet/IPv4 ARP packet")]
    BadArp,
    #[error("refusing to answer a RST")]
    WouldAnswerRst,
    #[error("the buffer has no room for the bytes to add")]
    NoRoom,
    #[error(
        "ICMP message is not an error this appliance relays (destination unreachable, time exceeded)"
    )]
    NotIcmpError,
    #[error("ICMP error quotes no IPv4 header and 8 bytes of its payload")]
    BadQuote,
    #[error("ICMP message is not an echo request")]
    NotEchoRequest,
    #[error(
        "an IPv4 fragment without payload, not 8-byte aligned before the last, past 65535 bytes, or TCP at offset 8"
    )]
    BadFragment,
}

#[inline]
pub(crate) fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

#[inline]
pub(crate) fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

#[inline]
pub(crate) fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

#[inline]
pub(crate) fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}
