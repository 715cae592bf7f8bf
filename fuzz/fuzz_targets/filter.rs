//! switchd's packet filter over arbitrary bursts of frames against a live
//! connection table (the fixture's region: NAT TCP and UDP services and a
//! tunnel service), driven the engine's way: the first pass over the whole
//! burst, then the second, then the third per frame. The table, flow cache
//! and scheduler state persist across inputs, so a later input meets what
//! an earlier one created.
//!
//! Input: records of `[port, advance_ms, len_hi, len_lo, frame...]`, at
//! most 32 per burst. Checked for every frame the filter transmits:
//! - the verdict's length fits the buffer and its port is one the switch serves;
//! - an IPv4 frame's header checksum is valid (the filter only passes
//!   headers it verified, and rewrites them incrementally), and so is the
//!   inner header of an IP-in-IP frame;
//! - a TCP or UDP segment whose checksum was valid on the way in is valid
//!   on the way out (NAT's incremental updates).
#![no_main]
use std::cell::RefCell;

use libfuzzer_sys::fuzz_target;
use shm_layout::switch_slot::N_COUNTERS;
use switchd::filter::{self, Ctx, Parsed, Verdict};
use switchd::fixture::{Fixture, port_mac};

const BUF: usize = 2048;
const BURST: usize = 32;

struct Harness {
    ctx: Ctx<'static>,
}

thread_local! {
    static H: RefCell<Harness> = RefCell::new({
        let fx: &'static Fixture = Box::leak(Box::new(Fixture::new("fuzz", 1 << 12)));
        // The mapping outlives its name: nothing is left in /dev/shm when
        // the fuzzer stops, however it stops.
        let _ = shm_layout::Mapping::unlink(&shm_layout::region_name(&format!(
            "fixture-fuzz-{}",
            std::process::id()
        )));
        let counters: &'static mut [u64; N_COUNTERS] = Box::leak(Box::new([0; N_COUNTERS]));
        Harness { ctx: fx.ctx(counters) }
    });
}

fn sum(data: &[u8], mut acc: u32) -> u32 {
    let mut c = data.chunks_exact(2);
    for w in &mut c {
        acc += u16::from_be_bytes([w[0], w[1]]) as u32;
    }
    if let [b] = c.remainder() {
        acc += (*b as u32) << 8;
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The IPv4 packet at `ip` (header checksum checked), or `None` if it is not
/// a plausible IPv4 header.
fn ip_ok(ip: &[u8]) -> Option<bool> {
    if ip.len() < 20 || ip[0] >> 4 != 4 {
        return None;
    }
    let hl = ((ip[0] & 15) as usize) * 4;
    if hl < 20 || ip.len() < hl {
        return None;
    }
    Some(fold(sum(&ip[..hl], 0)) == 0xffff)
}

/// Whether the TCP/UDP checksum of the IPv4 packet `ip` is valid (`None`:
/// not a whole unfragmented TCP/UDP packet, or UDP without a checksum).
fn l4_ok(ip: &[u8]) -> Option<bool> {
    if ip.len() < 20 || ip[0] >> 4 != 4 {
        return None;
    }
    let hl = ((ip[0] & 15) as usize) * 4;
    let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    let frag = u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff;
    if hl < 20 || total < hl || total > ip.len() || frag != 0 {
        return None;
    }
    let proto = ip[9];
    let seg = &ip[hl..total];
    let len = match proto {
        6 if seg.len() >= 20 => seg.len(),
        17 if seg.len() >= 8 => {
            let ul = u16::from_be_bytes([seg[4], seg[5]]) as usize;
            if ul < 8 || ul > seg.len() || seg[6..8] == [0, 0] {
                return None;
            }
            ul
        }
        _ => return None,
    };
    let mut acc = sum(&ip[12..20], 0);
    acc += proto as u32 + len as u32;
    Some(fold(sum(&seg[..len], acc)) == 0xffff)
}

fuzz_target!(|data: &[u8]| {
    H.with(|h| {
        let ctx = &mut h.borrow_mut().ctx;
        let mut frames: Vec<(u32, usize, Vec<u8>)> = Vec::new();
        let mut rest = data;
        while rest.len() >= 4 && frames.len() < BURST {
            let (port, adv) = (rest[0] as u32 % 2, rest[1]);
            let len = (u16::from_be_bytes([rest[2], rest[3]]) as usize).min(rest.len() - 4);
            let mut buf = vec![0u8; BUF];
            let len = len.min(1600);
            buf[..len].copy_from_slice(&rest[4..4 + len]);
            ctx.now_ms = ctx.now_ms.wrapping_add(adv as u32 * 37);
            frames.push((port, len, buf));
            rest = &rest[4 + len..];
        }
        let mut parsed = vec![Parsed::default(); frames.len()];
        for ((_, len, buf), p) in frames.iter().zip(parsed.iter_mut()) {
            filter::parse_and_prefetch(&buf[..*len], &ctx.ct, &ctx.flows, p);
        }
        for p in &parsed {
            filter::prefetch_table_slots(p, &ctx.ct, &ctx.flows, ctx.now_ms);
        }
        for ((port, len, buf), p) in frames.iter_mut().zip(&parsed) {
            let l4_in = buf.get(14..*len).and_then(l4_ok);
            match filter::switch_parsed(buf, *len, p, *port, &port_mac, ctx) {
                Verdict::Tx { port: out, len: n } => {
                    assert!(n <= BUF && n >= 14, "transmit length {n}");
                    assert!(port_mac(out).is_some(), "transmit on port {out}");
                    if buf[12..14] == [0x08, 0x00] {
                        let ip = &buf[14..n];
                        assert_eq!(ip_ok(ip), Some(true), "IPv4 header checksum out");
                        let hl = ((ip[0] & 15) as usize) * 4;
                        let inner = if ip[9] == 4 { &ip[hl..] } else { ip };
                        if ip[9] == 4 {
                            assert_eq!(ip_ok(inner), Some(true), "inner IPv4 header checksum");
                        }
                        if l4_in == Some(true) && matches!(inner[9], 6 | 17) {
                            assert_eq!(l4_ok(inner), Some(true), "TCP/UDP checksum out");
                        }
                    }
                }
                Verdict::Drop | Verdict::Hold { .. } => {}
            }
        }
    });
});
