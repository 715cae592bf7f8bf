//! The flow hash that picks a Maglev table entry for a new connection.
//!
//! Fixed (not seeded per region) on purpose: a mid-connection packet with no
//! table entry is sent where Maglev would have sent its SYN, which only works
//! if every switch, every restart and every appliance hashes alike.

use shm_layout::conntrack::FlowKey;

/// 64-bit hash of a client -> VIP 5-tuple.
#[inline]
pub fn flow_hash(k: &FlowKey) -> u64 {
    let a = ((k.src_ip as u64) << 32) | k.dst_ip as u64;
    let b = ((k.src_port as u64) << 32) | ((k.dst_port as u64) << 16) | k.proto as u64;
    finish(a.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ b)
}

/// The mixing rounds both hashes end with.
#[inline]
fn finish(mut h: u64) -> u64 {
    h ^= h >> 31;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 29;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 32)
}

/// Table index for a flow in a table of `m` entries (`m > 0`).
#[inline]
pub fn table_index(k: &FlowKey, m: usize) -> usize {
    ((flow_hash(k) as u128 * m as u128) >> 64) as usize
}

/// 64-bit hash of a client address alone (the `sh` scheduler). Fixed, like
/// [`flow_hash`], so every switch and restart maps a client alike.
#[inline]
pub fn source_hash(ip: u32) -> u64 {
    finish((ip as u64 ^ 0x5348_5f73_7263_6970).wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

/// Table index for a client address in a table of `m` entries (`m > 0`).
#[inline]
pub fn source_index(ip: u32, m: usize) -> usize {
    ((source_hash(ip) as u128 * m as u128) >> 64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_is_in_range_and_spreads() {
        let m = 65537;
        let mut buckets = [0u32; 16];
        for i in 0..160_000u32 {
            let k = FlowKey {
                proto: 6,
                src_ip: 0xc612_6400 + (i >> 12),
                dst_ip: 0xc612_000a,
                src_port: (i & 0xfff) as u16 + 1024,
                dst_port: 80,
            };
            let ix = table_index(&k, m);
            assert!(ix < m);
            buckets[ix * 16 / m] += 1;
        }
        // 10,000 expected per bucket; a uniform hash stays within 5%.
        for b in buckets {
            assert!((9_500..=10_500).contains(&b), "{buckets:?}");
        }
    }
}
