//! Compile-time layout fingerprint.
//!
//! Every shared type feeds its size, alignment and field offsets into one
//! FNV-1a hash. Two binaries built from different layouts get different
//! fingerprints, and a process refuses to attach to a region whose
//! fingerprint differs from its own.

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// An FNV-1a accumulator usable in `const` context.
#[derive(Clone, Copy, Debug)]
pub struct Fingerprint(u64);

impl Fingerprint {
    pub const fn new() -> Self {
        Self(FNV_OFFSET)
    }

    /// Mixes one number (a size, an alignment or an offset) into the hash.
    pub const fn mix(self, x: usize) -> Self {
        let bytes = (x as u64).to_le_bytes();
        let mut h = self.0;
        let mut i = 0;
        while i < 8 {
            h ^= bytes[i] as u64;
            h = h.wrapping_mul(FNV_PRIME);
            i += 1;
        }
        Self(h)
    }

    pub const fn value(self) -> u64 {
        self.0
    }
}

impl Default for Fingerprint {
    fn default() -> Self {
        Self::new()
    }
}

/// Mixes a type's size and alignment and the given field offsets.
#[macro_export]
macro_rules! fp_type {
    ($fp:expr, $t:ty $(, $field:ident)*) => {{
        let fp = $fp
            .mix(::core::mem::size_of::<$t>())
            .mix(::core::mem::align_of::<$t>());
        $( let fp = fp.mix(::core::mem::offset_of!($t, $field)); )*
        fp
    }};
}

/// A word-wise 64-bit hash for checksumming published slots. Not
/// cryptographic; it detects torn or stale slot contents.
pub fn checksum(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        let w = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        h = (h ^ w).wrapping_mul(0xff51_afd7_ed55_8ccd).rotate_left(29);
    }
    for &b in chunks.remainder() {
        h = (h ^ b as u64).wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    }
    h ^ (bytes.len() as u64)
}
