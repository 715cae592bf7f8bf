//! SipHash-2-4 (Aumasson and Bernstein), the keyed PRF of the SYN cookies
//! ([`crate::syncookie`]). Written here rather than taken from a crate: it
//! is 40 lines, no_std, and checked against the reference vectors below.

#[inline(always)]
fn round(v: &mut [u64; 4]) {
    v[0] = v[0].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(13) ^ v[0];
    v[0] = v[0].rotate_left(32);
    v[2] = v[2].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(16) ^ v[2];
    v[0] = v[0].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(21) ^ v[0];
    v[2] = v[2].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(17) ^ v[2];
    v[2] = v[2].rotate_left(32);
}

/// SipHash-2-4 of a message of whole 64-bit little-endian words (`words`,
/// `len` bytes in all: `8 * words.len()`, the reference's padding of the
/// last block included) under the 128-bit key `(k0, k1)`.
#[inline]
pub fn siphash24_words(key: [u64; 2], words: &[u64]) -> u64 {
    let mut v = [
        key[0] ^ 0x736f_6d65_7073_6575,
        key[1] ^ 0x646f_7261_6e64_6f6d,
        key[0] ^ 0x6c79_6765_6e65_7261,
        key[1] ^ 0x7465_6462_7974_6573,
    ];
    for &m in words {
        v[3] ^= m;
        round(&mut v);
        round(&mut v);
        v[0] ^= m;
    }
    let b = ((words.len() as u64 * 8) & 0xff) << 56;
    v[3] ^= b;
    round(&mut v);
    round(&mut v);
    v[0] ^= b;
    v[2] ^= 0xff;
    for _ in 0..4 {
        round(&mut v);
    }
    v[0] ^ v[1] ^ v[2] ^ v[3]
}

/// SipHash-2-4 of any byte string (tests and reference vectors; the
/// cookies hash whole words with [`siphash24_words`]).
pub fn siphash24(key: [u64; 2], msg: &[u8]) -> u64 {
    let mut v = [
        key[0] ^ 0x736f_6d65_7073_6575,
        key[1] ^ 0x646f_7261_6e64_6f6d,
        key[0] ^ 0x6c79_6765_6e65_7261,
        key[1] ^ 0x7465_6462_7974_6573,
    ];
    let mut chunks = msg.chunks_exact(8);
    for c in &mut chunks {
        let m = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        v[3] ^= m;
        round(&mut v);
        round(&mut v);
        v[0] ^= m;
    }
    let mut last = [0u8; 8];
    let rest = chunks.remainder();
    last[..rest.len()].copy_from_slice(rest);
    last[7] = msg.len() as u8;
    let b = u64::from_le_bytes(last);
    v[3] ^= b;
    round(&mut v);
    round(&mut v);
    v[0] ^= b;
    v[2] ^= 0xff;
    for _ in 0..4 {
        round(&mut v);
    }
    v[0] ^ v[1] ^ v[2] ^ v[3]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference key 00 01 .. 0f.
    const KEY: [u64; 2] = [0x0706_0504_0302_0100, 0x0f0e_0d0c_0b0a_0908];

    /// The first vectors of the reference implementation's `vectors.h`
    /// (message 00 01 .. of length 0, 1, 7, 8, 15, 63), as little-endian
    /// 64-bit values.
    #[test]
    fn reference_vectors() {
        let msg: Vec<u8> = (0u8..64).collect();
        let cases: [(usize, [u8; 8]); 6] = [
            (0, [0x31, 0x0e, 0x0e, 0xdd, 0x47, 0xdb, 0x6f, 0x72]),
            (1, [0xfd, 0x67, 0xdc, 0x93, 0xc5, 0x39, 0xf8, 0x74]),
            (7, [0x37, 0xd1, 0x01, 0x8b, 0xf5, 0x00, 0x02, 0xab]),
            (8, [0x62, 0x24, 0x93, 0x9a, 0x79, 0xf5, 0xf5, 0x93]),
            (15, [0xe5, 0x45, 0xbe, 0x49, 0x61, 0xca, 0x29, 0xa1]),
            (63, [0x72, 0x45, 0x06, 0xeb, 0x4c, 0x32, 0x8a, 0x95]),
        ];
        for (len, want) in cases {
            assert_eq!(
                siphash24(KEY, &msg[..len]),
                u64::from_le_bytes(want),
                "length {len}"
            );
        }
    }

    /// The word form equals the byte form of the same 16 bytes.
    #[test]
    fn words_equal_bytes() {
        let msg: Vec<u8> = (0u8..16).collect();
        let w = [
            u64::from_le_bytes(msg[..8].try_into().unwrap()),
            u64::from_le_bytes(msg[8..].try_into().unwrap()),
        ];
        assert_eq!(siphash24_words(KEY, &w), siphash24(KEY, &msg));
    }
}
