//! SYN cookies: the initial sequence number a SYN proxy answers a SYN
//! with, so that it keeps no state until the client's ACK proves the
//! handshake (after Linux's `net/ipv4/syncookies.c` and DPVS's synproxy).
//!
//! ```text
//! cookie = ((siphash(secret; client ip, vip, client port, vip port, count) & !7) | mss index)
//!          + client ISN                                        (mod 2^32)
//! ```
//!
//! - `count` is a coarse clock: the milliseconds of the region's clock
//!   shifted by [`PERIOD_SHIFT`] (one step every 65.536 s). A cookie is
//!   accepted in the step it was made and the next one: for 65 to 131 s.
//! - The low 3 bits carry the index of the client's MSS in [`MSS_TABLE`]
//!   (the largest entry not above the MSS the client offered).
//! - Adding the client's ISN, as Linux does, makes the cookie depend on
//!   the SYN itself; the client's ACK carries `seq = ISN + 1` and
//!   `ack = cookie + 1`, so [`check`] needs nothing but that ACK.
//! - The secret is 128 bits, published by controld and rotated; a cookie
//!   made under the previous secret is accepted until the next rotation.
//!
//! 29 bits of keyed hash: a blind attacker guesses a valid ACK with
//! probability 2^-29 per try (4 keys-and-steps tried: 2^-27).
//!
//! No options but MSS are encoded (window scale, SACK and timestamps are
//! not offered in the cookie SYN-ACK): see docs/ARCHITECTURE.md.

use crate::siphash::siphash24_words;

/// MSS values a cookie can carry (index in the low 3 bits), ascending.
/// 536 is the default of a SYN without the option (RFC 9293 §3.7.1).
pub const MSS_TABLE: [u16; 8] = [536, 1200, 1300, 1360, 1400, 1440, 1452, 1460];

/// The cookie clock: milliseconds shifted right by this (65.536 s a step).
pub const PERIOD_SHIFT: u32 = 16;

const MSS_BITS: u32 = 0x7;

/// The connection a cookie is made for, as the client's SYN names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tuple {
    pub client_ip: u32,
    pub client_port: u16,
    pub vip: u32,
    pub vip_port: u16,
}

/// The secrets a switch validates with: the current one (cookies are made
/// with it) and the one before the last rotation (`[0, 0]`: none).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Secrets {
    pub current: [u64; 2],
    pub previous: [u64; 2],
}

/// The cookie clock's step at `now_ms`.
#[inline]
pub fn count(now_ms: u32) -> u32 {
    now_ms >> PERIOD_SHIFT
}

/// The index in [`MSS_TABLE`] of the largest MSS not above `mss` (the
/// client's offer; `None`, no option: 536). An offer below 536 gets 536:
/// no smaller value is encodable, and RFC 9293 requires every host to
/// take 536.
#[inline]
pub fn mss_index(mss: Option<u16>) -> u8 {
    let mss = mss.unwrap_or(MSS_TABLE[0]);
    MSS_TABLE.iter().rposition(|&m| m <= mss).unwrap_or(0) as u8
}

#[inline]
fn hash(key: [u64; 2], t: &Tuple, count: u32) -> u32 {
    let w0 = u64::from(t.client_ip) << 32 | u64::from(t.vip);
    let w1 = u64::from(t.client_port) << 48 | u64::from(t.vip_port) << 32 | u64::from(count);
    siphash24_words(key, &[w0, w1]) as u32
}

/// The cookie (the SYN-ACK's sequence number) for a SYN of `t` with
/// sequence number `client_isn`, made at clock step `count` with `key`,
/// carrying MSS index `mss_idx` (`< 8`).
#[inline]
pub fn make(key: [u64; 2], t: &Tuple, count: u32, client_isn: u32, mss_idx: u8) -> u32 {
    ((hash(key, t, count) & !MSS_BITS) | (u32::from(mss_idx) & MSS_BITS)).wrapping_add(client_isn)
}

/// Validates the cookie an ACK of `t` returns (`cookie = ack - 1`, `client_isn
/// = seq - 1`) at clock step `now_count`: made with the current or the
/// previous secret, in this step or the one before. Returns the MSS index
/// it carries, or `None` for a bad or expired cookie.
#[inline]
pub fn check(
    secrets: &Secrets,
    t: &Tuple,
    now_count: u32,
    client_isn: u32,
    cookie: u32,
) -> Option<u8> {
    let v = cookie.wrapping_sub(client_isn);
    let keys = [secrets.current, secrets.previous];
    for key in keys.iter().filter(|k| **k != [0, 0]) {
        for c in [now_count, now_count.wrapping_sub(1)] {
            if hash(*key, t, c) & !MSS_BITS == v & !MSS_BITS {
                return Some((v & MSS_BITS) as u8);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const T: Tuple = Tuple {
        client_ip: 0xc612_0102,
        client_port: 40000,
        vip: 0xc613_0001,
        vip_port: 80,
    };
    const K1: [u64; 2] = [0x0123_4567_89ab_cdef, 0xfedc_ba98_7654_3210];
    const K2: [u64; 2] = [0x1111, 0x2222];

    #[test]
    fn mss_index_is_the_largest_not_above_the_offer() {
        assert_eq!(mss_index(None), 0);
        assert_eq!(mss_index(Some(100)), 0);
        assert_eq!(mss_index(Some(536)), 0);
        assert_eq!(mss_index(Some(1199)), 0);
        assert_eq!(mss_index(Some(1200)), 1);
        assert_eq!(mss_index(Some(1459)), 6);
        assert_eq!(mss_index(Some(1460)), 7);
        assert_eq!(mss_index(Some(9000)), 7);
    }

    #[test]
    fn a_cookie_checks_in_its_step_and_the_next_only() {
        let s = Secrets {
            current: K1,
            previous: [0, 0],
        };
        let c = make(K1, &T, 100, 0xdead_beef, 5);
        assert_eq!(check(&s, &T, 100, 0xdead_beef, c), Some(5));
        assert_eq!(check(&s, &T, 101, 0xdead_beef, c), Some(5));
        // Expired: two steps later.
        assert_eq!(check(&s, &T, 102, 0xdead_beef, c), None);
        // From the future (a step not reached yet).
        assert_eq!(check(&s, &T, 99, 0xdead_beef, c), None);
    }

    #[test]
    fn the_previous_secret_is_accepted_and_a_zero_one_never() {
        let c = make(K2, &T, 7, 1, 3);
        let rotated = Secrets {
            current: K1,
            previous: K2,
        };
        assert_eq!(check(&rotated, &T, 7, 1, c), Some(3));
        let rotated_twice = Secrets {
            current: [5, 6],
            previous: K1,
        };
        assert_eq!(check(&rotated_twice, &T, 7, 1, c), None);
        // A cookie made with the zero key is not accepted through an
        // unset previous secret.
        let z = make([0, 0], &T, 7, 1, 3);
        let s = Secrets {
            current: K1,
            previous: [0, 0],
        };
        assert_eq!(check(&s, &T, 7, 1, z), None);
    }

    #[test]
    fn the_clock_wraps() {
        let s = Secrets {
            current: K1,
            previous: [0, 0],
        };
        let c = make(K1, &T, u32::MAX, 9, 1);
        assert_eq!(check(&s, &T, 0, 9, c), Some(1));
        assert_eq!(count(u32::MAX), 0xffff);
        assert_eq!(count(65_536), 1);
    }

    /// Known answer: the cookie of a fixed input, so that a change of the
    /// hash's input layout (which would break cookies in flight across an
    /// upgrade mixing switches) is seen.
    #[test]
    fn known_answer() {
        let h = siphash24_words(
            K1,
            &[0xc612_0102_c613_0001, 40000u64 << 48 | 80u64 << 32 | 100],
        ) as u32;
        assert_eq!(make(K1, &T, 100, 0, 0), h & !7);
        assert_eq!(make(K1, &T, 100, 10, 6), ((h & !7) | 6).wrapping_add(10));
    }

    proptest! {
        #[test]
        fn round_trip(ip in any::<u32>(), port in any::<u16>(), isn in any::<u32>(),
                      count in any::<u32>(), idx in 0u8..8, k0 in any::<u64>(), k1 in any::<u64>()) {
            let t = Tuple { client_ip: ip, client_port: port, vip: 0x0a00_0001, vip_port: 443 };
            let key = [k0, k1 | 1];
            let s = Secrets { current: key, previous: [0, 0] };
            prop_assert_eq!(check(&s, &t, count, isn, make(key, &t, count, isn, idx)), Some(idx));
        }

        /// Another tuple, another client ISN or a flipped hash bit does not
        /// check (up to the 2^-27 chance of a collision, which a fixed
        /// key and these inputs do not meet).
        #[test]
        fn tampering_fails(port in 1u16.., isn in any::<u32>(), bit in 3u32..32) {
            let s = Secrets { current: K1, previous: K2 };
            let c = make(K1, &T, 50, isn, 2);
            let other = Tuple { client_port: T.client_port ^ port, ..T };
            prop_assert_eq!(check(&s, &other, 50, isn, c), None);
            prop_assert_eq!(check(&s, &T, 50, isn, c ^ (1 << bit)), None);
        }
    }
}
