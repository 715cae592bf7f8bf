//! Instruction counts per packet of the packet filter, for callgrind (which
//! counts instructions, not seconds: repeatable whatever else the machine
//! does). Runs a fixed number of established NAT packets and of new-flow
//! SYNs through `filter::process`, each in its own never-inlined function
//! (`established_cached`: the established packets again, with a flow cache):
//!
//! ```sh
//! cargo bench -p switchd --bench filter_instructions --no-run
//! valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.out \
//!     --toggle-collect='*established_packets*' target/release/deps/filter_instructions-*
//! callgrind_annotate /tmp/cg.out | head -30     # total / PACKETS = per packet
//! ```
//! Without valgrind it just runs (and prints the packet counts). This is
//! the filter alone, in one pass; `scripts/switchd-instructions.sh` counts
//! a whole switchd (poll loop, vnic, both passes) per frame.

use std::hint::black_box;

use etherparse::PacketBuilder;
use shm_layout::switch_slot::N_COUNTERS;
use switchd::filter::{self, Verdict};
use switchd::fixture::{Fixture, VIP, port_mac};
use switchd::flowcache::{self, FlowCache};

/// Packets per measured function.
const PACKETS: u32 = 100_000;

fn frame(client_port: u16, client_host: u8, syn: bool) -> Vec<u8> {
    let b = PacketBuilder::ethernet2([2, 0, 0, 0, 2, 1], [2, 0, 0, 0, 0, 1])
        .ipv4([198, 18, 100, client_host], VIP.to_be_bytes(), 64)
        .tcp(client_port, 80, 1, 64240);
    let b = if syn { b.syn() } else { b.ack(1) };
    let mut v = Vec::new();
    b.write(&mut v, &[0u8; 10][..if syn { 0 } else { 10 }])
        .unwrap();
    v
}

/// `PACKETS` established packets through `filter::process`, with `flows`
/// as the switch's flow cache.
#[inline(always)]
fn established(fx: &Fixture, templates: &[Vec<u8>], buf: &mut [u8], flows: FlowCache) -> u64 {
    let mut counters = [0u64; N_COUNTERS];
    let mut tx = 0;
    let mut cx = fx.ctx(&mut counters);
    cx.flows = flows;
    for i in 0..PACKETS as usize {
        let t = &templates[i % templates.len()];
        buf[..t.len()].copy_from_slice(t);
        if let Verdict::Tx { .. } = filter::process(buf, t.len(), 0, &port_mac, &mut cx) {
            tx += 1;
        }
    }
    black_box(tx)
}

#[inline(never)]
fn established_packets(fx: &Fixture, templates: &[Vec<u8>], buf: &mut [u8]) -> u64 {
    established(fx, templates, buf, FlowCache::default())
}

/// The same packets with a flow cache (filled by each flow's first packet
/// here, as the engine's would be).
#[inline(never)]
fn established_cached(
    fx: &Fixture,
    templates: &[Vec<u8>],
    buf: &mut [u8],
    flows: FlowCache,
) -> u64 {
    established(fx, templates, buf, flows)
}

#[inline(never)]
fn new_flow_packets(fx: &Fixture, syns: &[Vec<u8>], buf: &mut [u8]) -> u64 {
    let mut counters = [0u64; N_COUNTERS];
    let mut tx = 0;
    let mut cx = fx.ctx(&mut counters);
    for s in syns {
        buf[..s.len()].copy_from_slice(s);
        if let Verdict::Tx { .. } = filter::process(buf, s.len(), 0, &port_mac, &mut cx) {
            tx += 1;
        }
    }
    black_box(tx)
}

fn main() {
    // The fixture's table: 1 Mi slots (64 MiB).
    let fx = Fixture::new("instr", 1 << 20);
    let mut buf = vec![0u8; 2048];
    let mut counters = [0u64; N_COUNTERS];
    let flows = 4096u32;
    for p in 0..flows {
        let f = frame(10_000 + (p % 50_000) as u16, 1 + (p / 50_000) as u8, true);
        buf[..f.len()].copy_from_slice(&f);
        let mut cx = fx.ctx(&mut counters);
        assert!(matches!(
            filter::process(&mut buf, f.len(), 0, &port_mac, &mut cx),
            Verdict::Tx { port: 1, .. }
        ));
    }
    let templates: Vec<Vec<u8>> = (0..flows)
        .map(|p| frame(10_000 + (p % 50_000) as u16, 1 + (p / 50_000) as u8, false))
        .collect();
    let est = established_packets(&fx, &templates, &mut buf);
    let cache = FlowCache::new(flowcache::DEFAULT_ENTRIES).expect("flow cache");
    let cached = established_cached(&fx, &templates, &mut buf, cache);
    let syns: Vec<Vec<u8>> = (0..PACKETS)
        .map(|n| frame(1024 + (n % 60_000) as u16, 100 + (n / 60_000) as u8, true))
        .collect();
    let new = new_flow_packets(&fx, &syns, &mut buf);
    assert_eq!(
        (est, cached, new),
        (PACKETS as u64, PACKETS as u64, PACKETS as u64)
    );
    println!(
        "filter_instructions: {PACKETS} established packets, {PACKETS} new-flow SYNs forwarded"
    );
}
