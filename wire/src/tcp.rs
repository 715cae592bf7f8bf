//! TCP segments.

use super::{WireError, be16, be32, put16};

pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const PSH: u8 = 0x08;
pub const ACK: u8 = 0x10;
pub const URG: u8 = 0x20;

/// A flag set no real stack sends: SYN with FIN or RST, or none of FIN,
/// SYN, RST, PSH, ACK and URG (a "null" segment).
#[inline(always)]
pub fn flags_impossible(flags: u8) -> bool {
    const SYN_FIN: u8 = SYN | FIN;
    const SYN_RST: u8 = SYN | RST;
    flags & SYN_FIN == SYN_FIN || flags & SYN_RST == SYN_RST || flags & 0x3f == 0
}

mod field {
    pub const SRC_PORT: usize = 0;
    pub const DST_PORT: usize = 2;
    pub const SEQ: usize = 4;
    pub const ACK: usize = 8;
    pub const OFFSET: usize = 12;
    pub const FLAGS: usize = 13;
    pub const CHECKSUM: usize = 16;
}

pub const MIN_HEADER_LEN: usize = 20;

/// A TCP segment (header and payload). After `new_checked`: at least 20
/// bytes and a data offset of 5..=15 words within the buffer.
#[derive(Debug, Clone)]
pub struct TcpSegment<T: AsRef<[u8]>> {
    buf: T,
}

impl<T: AsRef<[u8]>> TcpSegment<T> {
    #[inline]
    pub fn new_unchecked(buf: T) -> Self {
        Self { buf }
    }

    #[inline]
    pub fn new_checked(buf: T) -> Result<Self, WireError> {
        let b = buf.as_ref();
        if b.len() < MIN_HEADER_LEN {
            return Err(WireError::Truncated);
        }
        let off = (b[field::OFFSET] >> 4) as usize * 4;
        if off < MIN_HEADER_LEN || off > b.len() {
            return Err(WireError::BadDataOffset);
        }
        Ok(Self { buf })
    }

    #[inline]
    pub fn src_port(&self) -> u16 {
        be16(self.buf.as_ref(), field::SRC_PORT)
    }

    #[inline]
    pub fn dst_port(&self) -> u16 {
        be16(self.buf.as_ref(), field::DST_PORT)
    }

    #[inline]
    pub fn seq(&self) -> u32 {
        be32(self.buf.as_ref(), field::SEQ)
    }

    #[inline]
    pub fn ack(&self) -> u32 {
        be32(self.buf.as_ref(), field::ACK)
    }

    #[inline]
    pub fn header_len(&self) -> usize {
        (self.buf.as_ref()[field::OFFSET] >> 4) as usize * 4
    }

    #[inline]
    pub fn flags(&self) -> u8 {
        self.buf.as_ref()[field::FLAGS]
    }

    #[inline]
    pub fn checksum(&self) -> u16 {
        be16(self.buf.as_ref(), field::CHECKSUM)
    }

    #[inline]
    pub fn payload_len(&self) -> usize {
        self.buf.as_ref().len().saturating_sub(self.header_len())
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> TcpSegment<T> {
    #[inline]
    pub fn set_src_port(&mut self, p: u16) {
        put16(self.buf.as_mut(), field::SRC_PORT, p);
    }

    #[inline]
    pub fn set_dst_port(&mut self, p: u16) {
        put16(self.buf.as_mut(), field::DST_PORT, p);
    }

    #[inline]
    pub fn set_checksum(&mut self, c: u16) {
        put16(self.buf.as_mut(), field::CHECKSUM, c);
    }
}
