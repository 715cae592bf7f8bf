//! Internet checksum (RFC 1071) and incremental update (RFC 1624).

/// Adds `data` as big-endian 16-bit words to `acc` (an odd trailing byte is
/// padded with zero). Reads four bytes at a time: a sum of big-endian
/// 32-bit words is congruent to the sum of their 16-bit halves modulo
/// 0xffff, which is all a ones' complement sum keeps.
#[inline]
pub fn sum(data: &[u8], mut acc: u64) -> u64 {
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        acc += u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as u64;
    }
    match *chunks.remainder() {
        [a, b, c] => acc += u16::from_be_bytes([a, b]) as u64 + ((c as u64) << 8),
        [a, b] => acc += u16::from_be_bytes([a, b]) as u64,
        [a] => acc += (a as u64) << 8,
        _ => {}
    }
    acc
}

/// Folds a wide sum to 16 bits (ones' complement), not inverted. Branch
/// free: two folds take any u64 below 2^32 + 2^32, two more to 16 bits.
#[inline]
pub fn fold(acc: u64) -> u16 {
    let acc = (acc & 0xffff_ffff) + (acc >> 32);
    let acc = (acc & 0xffff_ffff) + (acc >> 32);
    let acc = (acc & 0xffff) + (acc >> 16);
    let acc = (acc & 0xffff) + (acc >> 16);
    acc as u16
}

/// Whether a 20-byte IPv4 header's checksum is right: its ones' complement
/// sum folds to 0xffff. The words are added in the machine's byte order:
/// a ones' complement sum of byte-swapped words is the byte-swapped sum
/// (RFC 1071, 2.B), and 0xffff is its own swap, so no byte swap is needed.
/// And no fold either: folding keeps a sum's value modulo 0xffff (2^16 is
/// 1 modulo 0xffff) and ends at 0xffff exactly when a non-zero sum is 0
/// modulo 0xffff; one multiply-and-shift tells that.
#[inline(always)]
pub fn ipv4_header_ok(h: &[u8; 20]) -> bool {
    let w = |at: usize| u32::from_ne_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]]) as u64;
    let sum = w(0) + w(4) + w(8) + w(12) + w(16);
    sum != 0 && sum % 0xffff == 0
}

/// The IPv4 header checksum of `hdr` (with its checksum field as given).
#[inline]
pub fn ipv4_header(hdr: &[u8]) -> u16 {
    !fold(sum(hdr, 0))
}

/// Full TCP/UDP checksum over the IPv4 pseudo-header and `l4` (whose own
/// checksum field must be zero).
#[inline]
pub fn tcp_udp_ipv4(src: [u8; 4], dst: [u8; 4], proto: u8, l4: &[u8]) -> u16 {
    let mut acc = sum(&src, 0);
    acc = sum(&dst, acc);
    acc += proto as u64;
    acc += l4.len() as u64;
    !fold(sum(l4, acc))
}

/// The RFC 1624 difference of a 16-bit field going from `old` to `new`
/// (~m + m'), to be applied with [`adjust`]. Differences add up, so one
/// fold serves several changed fields.
#[inline]
pub fn delta_u16(old: u16, new: u16) -> u64 {
    (!old) as u64 + new as u64
}

/// As [`delta_u16`] for a 32-bit field (two words), e.g. an IPv4 address.
#[inline]
pub fn delta_u32(old: u32, new: u32) -> u64 {
    delta_u16((old >> 16) as u16, (new >> 16) as u16) + delta_u16(old as u16, new as u16)
}

/// RFC 1624 eqn. 3: HC' = ~(~HC + delta), `delta` a sum of field deltas.
/// A sum of up to 65535 deltas stays below 2^32, where two 16-bit folds
/// are exact; larger ones take the general fold.
#[inline]
pub fn adjust(csum: u16, delta: u64) -> u16 {
    let acc = (!csum) as u64 + delta;
    if acc >> 32 != 0 {
        return !fold(acc);
    }
    let acc = (acc & 0xffff) + (acc >> 16);
    let acc = (acc & 0xffff) + (acc >> 16);
    !(acc as u16)
}

/// [`adjust`] of a checksum read in the machine's byte order
/// (`u16::from_ne_bytes` of the field) by a folded difference converted
/// with [`to_ne`]; the result is written back with `to_ne_bytes`. A ones'
/// complement sum of byte-swapped words is the swapped sum (RFC 1071,
/// 2.B), so this is [`adjust`] without the swaps; and two 16-bit addends
/// need only one fold.
#[inline(always)]
pub fn adjust_ne(csum: u16, delta: u16) -> u16 {
    let acc = (!csum) as u32 + delta as u32;
    !(((acc & 0xffff) + (acc >> 16)) as u16)
}

/// A UDP checksum field after a rewrite, given the field before (`old`)
/// and its adjusted value: a datagram sent without a checksum (0) stays
/// without, and a computed 0 is sent as 0xffff (RFC 768). Either byte
/// order: 0 and 0xffff read the same both ways.
#[inline(always)]
pub fn udp_field(old: u16, adjusted: u16) -> u16 {
    match (old, adjusted) {
        (0, _) => 0,
        (_, 0) => 0xffff,
        (_, c) => c,
    }
}

/// A folded (big-endian valued) difference as [`adjust_ne`] takes it.
#[inline]
pub fn to_ne(delta: u16) -> u16 {
    u16::from_ne_bytes(delta.to_be_bytes())
}

/// The difference [`delta_u16`] gives for any 16-bit word that drops by
/// 0x100, as the IPv4 TTL/protocol word does when the TTL is decremented.
pub const TTL_DECREMENT: u64 = 0xfeff;

/// One 32-bit field changed: `adjust(csum, delta_u32(old, new))`.
#[inline]
pub fn update_u32(csum: u16, old: u32, new: u32) -> u16 {
    adjust(csum, delta_u32(old, new))
}

#[cfg(test)]
mod tests {
    #[test]
    fn ttl_decrement_difference_is_one_constant() {
        for ttl in 1..=255u8 {
            for proto in 0..=255u8 {
                let old = u16::from_be_bytes([ttl, proto]);
                let new = u16::from_be_bytes([ttl - 1, proto]);
                assert_eq!(super::delta_u16(old, new), super::TTL_DECREMENT);
            }
        }
    }

    use super::*;
    use proptest::prelude::*;

    #[test]
    fn header_check_edges_agree_with_the_fold() {
        for h in [[0u8; 20], [0xff; 20], {
            let mut h = [0u8; 20];
            h[10] = 0xff;
            h[11] = 0xff;
            h
        }] {
            assert_eq!(ipv4_header_ok(&h), fold(sum(&h, 0)) == 0xffff, "{h:?}");
        }
    }

    /// The RFC 1071 definition, 16 bits at a time with end-around carry.
    fn reference(data: &[u8]) -> u16 {
        let mut acc: u32 = 0;
        for c in data.chunks(2) {
            let w = u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32;
            acc += w;
            acc = (acc & 0xffff) + (acc >> 16);
        }
        acc as u16
    }

    proptest! {
        #[test]
        fn adjusting_in_machine_order_writes_the_same_bytes(csum in any::<u16>(), delta in any::<u64>()) {
            let delta = delta >> (delta % 48);
            let want = adjust(csum, delta).to_be_bytes();
            let ne = u16::from_ne_bytes(csum.to_be_bytes());
            let got = adjust_ne(ne, to_ne(fold(delta))).to_ne_bytes();
            prop_assert_eq!(got, want);
        }

        #[test]
        fn header_check_in_machine_order_agrees_with_the_sum(h in any::<[u8; 20]>(), fix in any::<bool>()) {
            let mut h = h;
            if fix {
                h[10..12].copy_from_slice(&[0, 0]);
                let c = ipv4_header(&h);
                h[10..12].copy_from_slice(&c.to_be_bytes());
            }
            prop_assert_eq!(ipv4_header_ok(&h), fold(sum(&h, 0)) == 0xffff);
            if fix {
                prop_assert!(ipv4_header_ok(&h));
            }
        }

        #[test]
        fn wide_sum_folds_to_the_rfc_1071_sum(data in proptest::collection::vec(any::<u8>(), 0..1600), start in any::<u32>()) {
            let mut with_start = start.to_be_bytes().to_vec();
            with_start.extend_from_slice(&data);
            prop_assert_eq!(fold(sum(&data, start as u64)), reference(&with_start));
            prop_assert_eq!(fold(sum(&data, 0)), reference(&data));
        }

        #[test]
        fn incremental_equals_full(words in proptest::collection::vec(any::<u16>(), 4..40), idx in 0usize..4, new in any::<u32>()) {
            // A buffer with a checksum word at 0, a 32-bit field at 2..6.
            let mut b: Vec<u8> = words.iter().flat_map(|w| w.to_be_bytes()).collect();
            b[0] = 0; b[1] = 0;
            let c = !fold(sum(&b, 0));
            let at = 2 + (idx % 2) * 2;
            let old = u32::from_be_bytes([b[at], b[at+1], b[at+2], b[at+3]]);
            b[at..at+4].copy_from_slice(&new.to_be_bytes());
            let full = !fold(sum(&b, 0));
            let inc = update_u32(c, old, new);
            // 0x0000 and 0xffff are the same value in ones' complement.
            prop_assert!(inc == full || (inc == 0xffff && full == 0) || (inc == 0 && full == 0xffff), "inc {inc:#x} full {full:#x}");
        }
    }
}
