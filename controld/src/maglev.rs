//! Weighted Maglev lookup tables (Eisenbud et al., "Maglev: A Fast and
//! Reliable Software Network Load Balancer", NSDI 2016, §3.4).
//!
//! A table has a prime number `M` of entries, each the index of a backend.
//! A connection's hash modulo `M` picks its entry. Each backend has its own
//! permutation of `0..M`, derived only from its [`backend_key`]:
//! `offset = h1(key) % M`, `skip = h2(key) % (M − 1) + 1`, and its `j`-th
//! preference is `(offset + j·skip) % M` (a full cycle because `M` is prime).
//! Because the permutation depends on the key alone, a backend prefers the
//! same entries in every configuration generation, so adding, removing or
//! reweighting one backend moves few connections of the others.
//!
//! # Weighted population
//!
//! Let `W` be the largest weight. The table is filled in passes over the
//! backends in slice order; in each pass backend `i` adds `weight_i` to its
//! credit and, while its credit is at least `W`, takes its next preferred
//! entry that is still empty and subtracts `W`. Filling stops as soon as
//! every entry is taken. A backend of weight `W` thus takes one entry per
//! pass, one of weight `W/2` one every other pass, and weight 0 never. With
//! equal weights this is the paper's round robin, which gives every backend
//! `⌊M/N⌋` or `⌈M/N⌉` entries.
//!
//! Instead of visiting every backend in every pass, [`build`] computes for
//! each backend the pass of its next entry (its `k`-th entry falls in pass
//! `⌈k·W / weight⌉`) and takes entries in (pass, index) order from a heap,
//! which is the same order as the passes. With the per-backend cursor into
//! its permutation, the build costs `O(M log N)` plus the walks over taken
//! entries, `O(M log M)` expected.
//!
//! # Order
//!
//! The table holds indexes into the `backends` slice, and when two backends
//! want the same empty entry in the same pass the earlier one wins, so the
//! table depends on the slice order, not only on the set of backends.
//! Callers should keep backends in a stable order (configuration order).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::Ipv4Addr;

/// Largest table size: entries index backends with a `u16`, and 65537 is
/// the largest prime that the configuration allows.
pub const MAX_TABLE_SIZE: usize = 65537;
/// Most backends per table: indexes `0..=65534`; `u16::MAX` is the
/// builder's "empty" mark.
pub const MAX_BACKENDS: usize = 65535;

const EMPTY: u16 = u16::MAX;
const SEED_OFFSET: u64 = 0x9e37_79b9_7f4a_7c15;
const SEED_SKIP: u64 = 0xd1b5_4a32_d192_ed03;

/// Why a table could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MaglevError {
    /// The table size is not a prime number.
    #[error("table size {0} is not prime")]
    NotPrime(usize),
    /// The table size exceeds [`MAX_TABLE_SIZE`].
    #[error("table size {0} exceeds {MAX_TABLE_SIZE}")]
    TooLarge(usize),
    /// More backends than [`MAX_BACKENDS`].
    #[error("{0} backends exceed {MAX_BACKENDS}")]
    TooManyBackends(usize),
}

/// The stable identity of a backend, `address:port` packed into 48 bits
/// (distinct backends have distinct keys). [`build`] hashes it into the
/// backend's permutation, so the same address and port give the same
/// permutation in every configuration generation and every process.
pub fn backend_key(addr: Ipv4Addr, port: u16) -> u64 {
    (u64::from(u32::from(addr)) << 16) | u64::from(port)
}

/// splitmix64's finalizer: a bijective, well-avalanched 64-bit mix.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The first preference and the step of a key's permutation of `0..m`.
fn permutation(key: u64, m: usize) -> (usize, usize) {
    let m64 = m as u64;
    let offset = mix(key ^ SEED_OFFSET) % m64;
    let skip = mix(mix(key) ^ SEED_SKIP) % (m64 - 1).max(1) + 1;
    (offset as usize, skip as usize)
}

/// Whether `n` is prime (trial division; meant for table sizes).
pub fn is_prime(n: usize) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2usize;
    while d.saturating_mul(d) <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

/// Per-backend state during a build.
struct Cursor {
    /// Next preference to try.
    pos: usize,
    skip: usize,
    /// Entries taken so far.
    taken: u64,
    weight: u64,
}

/// Fills `out` with the `m`-entry table for `backends` (`(key, weight)`
/// pairs, key from [`backend_key`]); each entry is an index into `backends`.
/// Backends of weight 0 get no entry; when no backend has a weight above 0,
/// `out` is left empty (no eligible backend). A backend may get no entry if
/// there are more eligible backends than entries (keep `m` ≥ 100·N).
///
/// Refuses `m` that is not prime or exceeds [`MAX_TABLE_SIZE`] and more
/// than [`MAX_BACKENDS`] backends, leaving `out` untouched. Never panics.
pub fn build(backends: &[(u64, u32)], m: usize, out: &mut Vec<u16>) -> Result<(), MaglevError> {
    if m > MAX_TABLE_SIZE {
        return Err(MaglevError::TooLarge(m));
    }
    if !is_prime(m) {
        return Err(MaglevError::NotPrime(m));
    }
    if backends.len() > MAX_BACKENDS {
        return Err(MaglevError::TooManyBackends(backends.len()));
    }
    out.clear();
    let max_weight = backends
        .iter()
        .map(|&(_, w)| u64::from(w))
        .max()
        .unwrap_or(0);
    if max_weight == 0 {
        return Ok(());
    }
    out.resize(m, EMPTY);

    let mut cursors: Vec<Cursor> = Vec::with_capacity(backends.len());
    // (pass of the backend's next entry, backend index), smallest first.
    let mut heap: BinaryHeap<Reverse<(u64, u16)>> = BinaryHeap::with_capacity(backends.len());
    for (i, &(key, weight)) in backends.iter().enumerate() {
        let (pos, skip) = permutation(key, m);
        let weight = u64::from(weight);
        cursors.push(Cursor {
            pos,
            skip,
            taken: 0,
            weight,
        });
        if weight > 0 {
            // i < MAX_BACKENDS, checked above.
            heap.push(Reverse((max_weight.div_ceil(weight), i as u16)));
        }
    }

    let mut filled = 0;
    while filled < m {
        let Some(Reverse((_, i))) = heap.pop() else {
            break; // unreachable: some backend has weight > 0
        };
        let c = &mut cursors[usize::from(i)];
        // The permutation is a full cycle and the table is not full, so
        // this walk ends within m steps.
        while out[c.pos] != EMPTY {
            c.pos += c.skip;
            if c.pos >= m {
                c.pos -= m;
            }
        }
        out[c.pos] = i;
        filled += 1;
        c.taken += 1;
        // k·W ≤ 65537·(2^32 − 1) < 2^49: no overflow.
        heap.push(Reverse((
            ((c.taken + 1) * max_weight).div_ceil(c.weight),
            i,
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const M: usize = 65537;

    fn key(i: u32) -> u64 {
        backend_key(Ipv4Addr::from(0xc613_0100 + i), 8080)
    }

    fn table(backends: &[(u64, u32)], m: usize) -> Vec<u16> {
        let mut out = Vec::new();
        build(backends, m, &mut out).unwrap();
        out
    }

    fn counts(table: &[u16], n: usize) -> Vec<usize> {
        let mut c = vec![0; n];
        for &e in table {
            c[usize::from(e)] += 1;
        }
        c
    }

    /// Fraction of the table whose backend changed when backend `removed`
    /// is taken out, over the entries that did not belong to it.
    fn disruption(n: usize, removed: usize) -> f64 {
        let all: Vec<(u64, u32)> = (0..n as u32).map(|i| (key(i), 1)).collect();
        let before = table(&all, M);
        let rest: Vec<(u64, u32)> = all
            .iter()
            .enumerate()
            .filter(|&(i, _)| i != removed)
            .map(|(_, &b)| b)
            .collect();
        let after = table(&rest, M);
        let moved = before
            .iter()
            .zip(&after)
            .filter(|&(&b, &a)| {
                usize::from(b) != removed && rest[usize::from(a)].0 != all[usize::from(b)].0
            })
            .count();
        moved as f64 / M as f64
    }

    #[test]
    fn backend_key_is_address_and_port() {
        assert_eq!(
            backend_key(Ipv4Addr::new(198, 19, 1, 1), 8080),
            0xc613_0101_1f90
        );
        assert_ne!(
            backend_key(Ipv4Addr::new(198, 19, 1, 1), 8080),
            backend_key(Ipv4Addr::new(198, 19, 1, 1), 8081)
        );
    }

    #[test]
    fn refuses_bad_sizes_and_counts() {
        let b = [(key(0), 1)];
        let mut out = vec![7u16; 3];
        assert_eq!(
            build(&b, 65536, &mut out),
            Err(MaglevError::NotPrime(65536))
        );
        assert_eq!(build(&b, 0, &mut out), Err(MaglevError::NotPrime(0)));
        assert_eq!(build(&b, 1, &mut out), Err(MaglevError::NotPrime(1)));
        assert_eq!(
            build(&b, 65539, &mut out),
            Err(MaglevError::TooLarge(65539))
        );
        assert_eq!(
            build(&b, usize::MAX, &mut out),
            Err(MaglevError::TooLarge(usize::MAX))
        );
        let many = vec![(1u64, 1u32); MAX_BACKENDS + 1];
        assert_eq!(
            build(&many, 251, &mut out),
            Err(MaglevError::TooManyBackends(65536))
        );
        assert_eq!(out, [7, 7, 7], "a refused build leaves out untouched");
        assert_eq!(
            MaglevError::NotPrime(65536).to_string(),
            "table size 65536 is not prime"
        );
    }

    #[test]
    fn no_eligible_backend_gives_an_empty_table() {
        let mut out = vec![1u16; 10];
        build(&[(key(0), 0), (key(1), 0)], 251, &mut out).unwrap();
        assert!(out.is_empty());
        build(&[], 251, &mut out).unwrap();
        assert!(out.is_empty());
    }

    #[test]
    fn max_backends_fit() {
        let all: Vec<(u64, u32)> = (0..MAX_BACKENDS as u32).map(|i| (key(i), 1)).collect();
        let t = table(&all, M);
        let c = counts(&t, all.len());
        assert_eq!(c.iter().filter(|&&n| n == 1).count(), 65533);
        assert_eq!(c.iter().filter(|&&n| n == 2).count(), 2);
        assert_eq!(t.iter().max(), Some(&65534));
    }

    #[test]
    fn golden_small_table() {
        // Pins the hashes: a change here moves connections on upgrade.
        let b: Vec<(u64, u32)> = (1..=3).map(|i| (key(i), i)).collect();
        assert_eq!(table(&b, 13), GOLDEN_13);
    }
    const GOLDEN_13: [u16; 13] = [2, 1, 2, 0, 0, 2, 2, 1, 1, 2, 2, 2, 1];

    #[test]
    fn weighted_shares_1_2_3() {
        let b: Vec<(u64, u32)> = (1..=3).map(|i| (key(i), i)).collect();
        let c = counts(&table(&b, M), 3);
        for (i, &n) in c.iter().enumerate() {
            let share = n as f64 / M as f64;
            let want = (i + 1) as f64 / 6.0;
            assert!(
                (share - want).abs() < 0.005,
                "backend {i}: {share} vs {want}"
            );
        }
    }

    #[test]
    fn equal_weights_balance() {
        // Round robin gives ⌊M/N⌋ or ⌈M/N⌉ entries; the worst ratio over
        // N = 2..=100 is 656/655 (N = 100).
        let mut worst = 1.0f64;
        for n in 2..=100u32 {
            let b: Vec<(u64, u32)> = (0..n).map(|i| (key(i), 5)).collect();
            let c = counts(&table(&b, M), n as usize);
            let (lo, hi) = (*c.iter().min().unwrap(), *c.iter().max().unwrap());
            assert!(hi - lo <= 1, "n={n}: {lo}..{hi}");
            worst = worst.max(hi as f64 / lo as f64);
        }
        assert!(worst <= 1.02, "worst ratio {worst}");
    }

    #[test]
    fn removing_one_backend_moves_few_others() {
        // Measured worst over every removed backend (M = 65537): n=3 0.009%,
        // n=5 0.08%, n=10 0.26%, n=50 0.49%. The design bound is 1/N + 1%;
        // the tighter 1% catches a regression the loose bound would miss.
        for n in [3usize, 5, 10, 50] {
            let worst = (0..n).map(|r| disruption(n, r)).fold(0.0, f64::max);
            let bound = 1.0 / n as f64 + 0.01;
            assert!(worst <= bound, "n={n}: {worst} > {bound}");
            assert!(worst <= 0.01, "n={n}: {worst} > 1%");
        }
    }

    #[test]
    #[ignore = "measurement, run with --ignored --nocapture"]
    fn measure() {
        let mut worst = 1.0f64;
        for n in 2..=100u32 {
            let b: Vec<(u64, u32)> = (0..n).map(|i| (key(i), 1)).collect();
            let c = counts(&table(&b, M), n as usize);
            worst = worst.max(*c.iter().max().unwrap() as f64 / *c.iter().min().unwrap() as f64);
        }
        println!("balance: worst max/min over N=2..=100: {worst:.5}");
        for n in [3usize, 5, 10, 50] {
            let d: Vec<f64> = (0..n).map(|r| disruption(n, r)).collect();
            let max = d.iter().cloned().fold(0.0, f64::max);
            let mean = d.iter().sum::<f64>() / n as f64;
            println!(
                "disruption n={n}: mean {:.4}% max {:.4}% (bound {:.4}%)",
                mean * 100.0,
                max * 100.0,
                (1.0 / n as f64 + 0.01) * 100.0
            );
        }
        let b: Vec<(u64, u32)> = (1..=3).map(|i| (key(i), i)).collect();
        let c = counts(&table(&b, M), 3);
        println!(
            "1:2:3 shares: {:?}",
            c.iter().map(|&x| x as f64 / M as f64).collect::<Vec<_>>()
        );
        println!("golden: {:?}", table(&b, 13));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn entries_point_to_weighted_backends(
            b in proptest::collection::vec((any::<u64>(), 0u32..=4), 0..40),
            m in prop::sample::select(vec![2usize, 3, 7, 13, 251, 1021, 4093]),
        ) {
            let t = table(&b, m);
            if b.iter().all(|&(_, w)| w == 0) {
                prop_assert!(t.is_empty());
            } else {
                prop_assert_eq!(t.len(), m);
                for &e in &t {
                    prop_assert!(b[usize::from(e)].1 > 0);
                }
            }
        }

        #[test]
        fn deterministic(b in proptest::collection::vec((any::<u64>(), 0u32..=100), 1..20)) {
            let t1 = table(&b, 1021);
            let mut t2 = vec![3u16; 5];
            build(&b, 1021, &mut t2).unwrap();
            prop_assert_eq!(t1, t2);
        }

        #[test]
        fn shares_follow_weights(ws in proptest::collection::vec(1u32..=65535, 2..8)) {
            let b: Vec<(u64, u32)> = ws.iter().enumerate().map(|(i, &w)| (key(i as u32), w)).collect();
            let c = counts(&table(&b, M), b.len());
            let total: f64 = ws.iter().map(|&w| f64::from(w)).sum();
            for (i, &n) in c.iter().enumerate() {
                let share = n as f64 / M as f64;
                let want = f64::from(ws[i]) / total;
                prop_assert!((share - want).abs() < 0.005, "backend {}: {} vs {}", i, share, want);
            }
        }

        #[test]
        fn any_weights_never_panic(
            b in proptest::collection::vec((any::<u64>(), any::<u32>()), 0..10),
            m in 0usize..300,
        ) {
            let mut out = Vec::new();
            let r = build(&b, m, &mut out);
            prop_assert_eq!(r.is_ok(), is_prime(m));
        }
    }
}
