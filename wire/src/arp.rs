//! ARP for IPv4 over Ethernet.

use super::{WireError, be16, put16};

pub const ARP_REQUEST: u16 = 1;
pub const ARP_REPLY: u16 = 2;
/// Length of an Ethernet/IPv4 ARP packet.
pub const ARP_LEN: usize = 28;

mod field {
    pub const HTYPE: usize = 0;
    pub const PTYPE: usize = 2;
    pub const HLEN: usize = 4;
    pub const PLEN: usize = 5;
    pub const OPER: usize = 6;
    pub const SHA: core::ops::Range<usize> = 8..14;
    pub const SPA: core::ops::Range<usize> = 14..18;
    pub const THA: core::ops::Range<usize> = 18..24;
    pub const TPA: core::ops::Range<usize> = 24..28;
}

/// An Ethernet/IPv4 ARP packet (the bytes after the Ethernet header).
/// After `new_checked`, 28 bytes are present and the hardware/protocol
/// types and lengths are Ethernet (1, 6) and IPv4 (0x0800, 4).
#[derive(Debug, Clone)]
pub struct ArpPacket<T: AsRef<[u8]>> {
    buf: T,
}

fn arr<const N: usize>(b: &[u8]) -> [u8; N] {
    let mut a = [0; N];
    a.copy_from_slice(&b[..N]);
    a
}

impl<T: AsRef<[u8]>> ArpPacket<T> {
    #[inline]
    pub fn new_checked(buf: T) -> Result<Self, WireError> {
        let b = buf.as_ref();
        if b.len() < ARP_LEN {
            return Err(WireError::Truncated);
        }
        if be16(b, field::HTYPE) != 1
            || be16(b, field::PTYPE) != 0x0800
            || b[field::HLEN] != 6
            || b[field::PLEN] != 4
        {
            return Err(WireError::BadArp);
        }
        Ok(Self { buf })
    }

    #[inline]
    pub fn operation(&self) -> u16 {
        be16(self.buf.as_ref(), field::OPER)
    }

    #[inline]
    pub fn sender_hardware_addr(&self) -> [u8; 6] {
        arr(&self.buf.as_ref()[field::SHA])
    }

    #[inline]
    pub fn sender_protocol_addr(&self) -> [u8; 4] {
        arr(&self.buf.as_ref()[field::SPA])
    }

    #[inline]
    pub fn target_hardware_addr(&self) -> [u8; 6] {
        arr(&self.buf.as_ref()[field::THA])
    }

    #[inline]
    pub fn target_protocol_addr(&self) -> [u8; 4] {
        arr(&self.buf.as_ref()[field::TPA])
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> ArpPacket<T> {
    #[inline]
    pub fn set_operation(&mut self, op: u16) {
        put16(self.buf.as_mut(), field::OPER, op);
    }

    #[inline]
    pub fn set_sender(&mut self, mac: [u8; 6], ip: [u8; 4]) {
        self.buf.as_mut()[field::SHA].copy_from_slice(&mac);
        self.buf.as_mut()[field::SPA].copy_from_slice(&ip);
    }

    #[inline]
    pub fn set_target(&mut self, mac: [u8; 6], ip: [u8; 4]) {
        self.buf.as_mut()[field::THA].copy_from_slice(&mac);
        self.buf.as_mut()[field::TPA].copy_from_slice(&ip);
    }
}
