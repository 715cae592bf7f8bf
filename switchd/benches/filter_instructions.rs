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

/// SYNs to a service with `syn_proxy = true`: each answered with a cookie
/// SYN-ACK (back out of port 0), nothing stored.
#[inline(never)]
fn cookie_syns(fx: &Fixture, syns: &[Vec<u8>], buf: &mut [u8]) -> u64 {
    let mut counters = [0u64; N_COUNTERS];
    let mut tx = 0;
    let mut cx = fx.ctx(&mut counters);
    for s in syns {
        buf[..s.len()].copy_from_slice(s);
        if let Verdict::Tx { port: 0, .. } = filter::process(buf, s.len(), 0, &port_mac, &mut cx) {
            tx += 1;
        }
    }
    black_box(tx)
}

/// Client data of spliced (SYN-proxied, established) connections: the
/// full path with `ack += delta` (never in the flow cache).
#[inline(never)]
fn established_spliced_packets(fx: &Fixture, templates: &[Vec<u8>], buf: &mut [u8]) -> u64 {
    // Not the same machine code as `established_packets` (which the
    // linker would fold into one function, and callgrind count together).
    let n = established(fx, templates, buf, FlowCache::default());
    black_box(n + u64::from(black_box(0u8)))
}

/// Sets up `flows` spliced connections through the whole handshake
/// (cookie, cookie ACK, the backend's SYN-ACK); returns their client data
/// segments.
fn spliced(fx: &Fixture, flows: u32, buf: &mut [u8]) -> Vec<Vec<u8>> {
    let mut counters = [0u64; N_COUNTERS];
    let mut cx = fx.ctx(&mut counters);
    let seg = |cport: u16, ack: Option<u32>, payload: usize| {
        let b = PacketBuilder::ethernet2([2, 0, 0, 0, 2, 1], [2, 0, 0, 0, 0, 1])
            .ipv4([198, 18, 100, 7], VIP.to_be_bytes(), 64)
            .tcp(cport, 80, if ack.is_some() { 2 } else { 1 }, 64240);
        let b = match ack {
            None => b.syn(),
            Some(a) => b.ack(a),
        };
        let mut v = Vec::new();
        b.write(&mut v, &vec![0u8; payload]).unwrap();
        v
    };
    let mut out = Vec::new();
    for p in 0..flows {
        let cport = 20_000 + p as u16;
        let run = |f: &[u8], port: u32, buf: &mut [u8], cx: &mut filter::Ctx<'_>| {
            buf[..f.len()].copy_from_slice(f);
            filter::process(buf, f.len(), port, &port_mac, cx)
        };
        assert!(matches!(
            run(&seg(cport, None, 0), 0, buf, &mut cx),
            Verdict::Tx { port: 0, .. }
        ));
        let cookie = u32::from_be_bytes(buf[38..42].try_into().unwrap());
        let ack = Some(cookie.wrapping_add(1));
        assert!(matches!(
            run(&seg(cport, ack, 0), 0, buf, &mut cx),
            Verdict::Tx { port: 1, .. }
        ));
        let bip: [u8; 4] = buf[30..34].try_into().unwrap();
        let mut v = Vec::new();
        PacketBuilder::ethernet2([2, 0, 0, 0, 1, bip[3]], [2, 0, 0, 0, 0, 2])
            .ipv4(bip, [198, 18, 100, 7], 64)
            .tcp(8080, cport, 0x5000_0000, 64240)
            .syn()
            .ack(2)
            .write(&mut v, &[])
            .unwrap();
        assert!(matches!(
            run(&v, 1, buf, &mut cx),
            Verdict::Tx { port: 1, .. }
        ));
        out.push(seg(cport, ack, 10));
    }
    out
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
    // The same SYNs to the service with `syn_proxy = true`, and spliced
    // connections' client data.
    fx.configure(|s| {
        s.services[0].flags = shm_layout::config_slot::SVC_SYN_PROXY;
        s.header.cookie_secrets = [[1, 2], [0, 0]];
    });
    // Other clients than the new flows' (whose entries are live).
    let syns: Vec<Vec<u8>> = (0..PACKETS)
        .map(|n| frame(1024 + (n % 60_000) as u16, 150 + (n / 60_000) as u8, true))
        .collect();
    assert_eq!(cookie_syns(&fx, &syns, &mut buf), PACKETS as u64);
    let templates = spliced(&fx, flows, &mut buf);
    assert_eq!(
        established_spliced_packets(&fx, &templates, &mut buf),
        PACKETS as u64
    );
    println!(
        "filter_instructions: {PACKETS} established packets, {PACKETS} new-flow SYNs forwarded"
    );
}
