//! Per-packet cost of the packet filter, without processes or rings:
//! established NAT flows (lookup hit + rewrite + route) and new flows (SYN:
//! service lookup + Maglev + insert of forward and reply slots + rewrite).
//! Run: cargo bench -p switchd --bench filter

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use etherparse::PacketBuilder;
use shm_layout::Region;
use shm_layout::switch_slot::N_COUNTERS;
use switchd::filter::{self, Verdict};

use switchd::fixture::{Fixture, VIP};

fn frame(client_port: u16, syn: bool, payload: usize) -> Vec<u8> {
    let b = PacketBuilder::ethernet2([2, 0, 0, 0, 2, 1], [2, 0, 0, 0, 0, 1])
        .ipv4([198, 18, 100, 1], VIP.to_be_bytes(), 64)
        .tcp(client_port, 80, 1, 64240);
    let b = if syn { b.syn() } else { b.ack(1) };
    let mut v = Vec::new();
    b.write(&mut v, &vec![0u8; payload]).unwrap();
    v
}

fn run(fx: &Fixture, c: &mut Criterion) {
    let r = &fx.region;
    let macs = switchd::fixture::port_mac;
    let mut counters = [0u64; N_COUNTERS];
    let mut counters2 = [0u64; N_COUNTERS];
    let mut counters3 = [0u64; N_COUNTERS];

    // Established: 1024 flows set up by their SYNs, then data packets.
    let flows = 1024u16;
    let mut buf = vec![0u8; 2048];
    for p in 0..flows {
        let f = frame(10_000 + p, true, 0);
        buf[..f.len()].copy_from_slice(&f);
        let mut cx = fx.ctx(&mut counters);
        assert!(matches!(
            filter::process(&mut buf, f.len(), 0, &macs, &mut cx),
            Verdict::Tx { port: 1, .. }
        ));
    }
    let templates: Vec<Vec<u8>> = (0..flows).map(|p| frame(10_000 + p, false, 10)).collect();
    let mut g = c.benchmark_group("filter");
    g.bench_function("copy_template_only (baseline)", |bch| {
        let mut i = 0usize;
        bch.iter(|| {
            let t = &templates[i % templates.len()];
            buf[..t.len()].copy_from_slice(t);
            i += 1;
            black_box(&buf);
        })
    });
    g.bench_function("established_nat_64B", |bch| {
        let mut cx = fx.ctx(&mut counters2);
        let mut i = 0usize;
        bch.iter(|| {
            let t = &templates[i % templates.len()];
            buf[..t.len()].copy_from_slice(t);
            i += 1;
            black_box(filter::process(&mut buf, t.len(), 0, &macs, &mut cx))
        })
    });
    // New flows: distinct SYNs; the table is emptied between timed chunks.
    g.bench_function("new_flow_syn_insert", |bch| {
        let mut next: u32 = 0;
        bch.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                let chunk = left.min(100_000);
                let syns: Vec<Vec<u8>> = (0..chunk as u32)
                    .map(|k| {
                        let n = next.wrapping_add(k);
                        let mut f = frame(1024 + (n % 60_000) as u16, true, 0);
                        // Vary the client address too (bytes 26..30 of the frame).
                        let host = 1 + (n / 60_000) % 250;
                        f[29] = host as u8;
                        fix_ip(&mut f);
                        f
                    })
                    .collect();
                next = next.wrapping_add(chunk as u32);
                let mut cx = fx.ctx(&mut counters3);
                let t0 = Instant::now();
                for s in &syns {
                    buf[..s.len()].copy_from_slice(s);
                    black_box(filter::process(&mut buf, s.len(), 0, &macs, &mut cx));
                }
                total += t0.elapsed();
                clear_table(r);
                left -= chunk;
            }
            total
        })
    });
    g.finish();
}

fn fix_ip(f: &mut [u8]) {
    f[24] = 0;
    f[25] = 0;
    let mut s = 0u32;
    for c in f[14..34].chunks(2) {
        s += u16::from_be_bytes([c[0], c[1]]) as u32;
    }
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    f[24..26].copy_from_slice(&(!(s as u16)).to_be_bytes());
}

/// Removes every entry (outside the timed region), then compacts.
fn clear_table(r: &Region) {
    let ct = r.conntrack();
    for idx in 0..ct.capacity() as u32 {
        if let Some(s) = ct.snapshot(idx)
            && s.kind() != shm_layout::conntrack::KIND_EMPTY
            && s.kind() != shm_layout::conntrack::KIND_TOMB
        {
            ct.remove(idx, &s, 1);
        }
    }
    for idx in (0..ct.capacity() as u32).rev() {
        ct.compact(idx, 1);
    }
}

/// A client segment from port `cport` with `seq`, `ack` (None: a SYN).
fn client_seg(cport: u16, seq: u32, ack: Option<u32>, payload: usize) -> Vec<u8> {
    let b = PacketBuilder::ethernet2([2, 0, 0, 0, 2, 1], [2, 0, 0, 0, 0, 1])
        .ipv4([198, 18, 100, 1], VIP.to_be_bytes(), 64)
        .tcp(cport, 80, seq, 64240);
    let b = match ack {
        None => b.syn(),
        Some(a) => b.ack(a),
    };
    let mut v = Vec::new();
    b.write(&mut v, &vec![0u8; payload]).unwrap();
    v
}

/// The SYN proxy (service 0 with `syn_proxy = true`) beside plain NAT:
/// a SYN answered with a cookie, and established spliced flows (client
/// data: lookup, the reply slot's delta, `ack += delta`, NAT) set up by
/// the whole handshake.
fn run_synproxy(c: &mut Criterion) {
    use shm_layout::config_slot::SVC_SYN_PROXY;
    let fx = Fixture::new("bench-sp", 1 << 20);
    fx.configure(|s| {
        s.services[0].flags = SVC_SYN_PROXY;
        s.header.cookie_secrets = [[1, 2], [0, 0]];
    });
    let macs = switchd::fixture::port_mac;
    let mut counters = [0u64; N_COUNTERS];
    let mut buf = vec![0u8; 2048];
    let flows = 1024u16;
    let mut cookies = Vec::new();
    {
        let mut cx = fx.ctx(&mut counters);
        for p in 0..flows {
            let cport = 10_000 + p;
            let f = client_seg(cport, 1, None, 0);
            buf[..f.len()].copy_from_slice(&f);
            assert!(matches!(
                filter::process(&mut buf, f.len(), 0, &macs, &mut cx),
                Verdict::Tx { port: 0, .. }
            ));
            let cookie = u32::from_be_bytes(buf[38..42].try_into().unwrap());
            let f = client_seg(cport, 2, Some(cookie.wrapping_add(1)), 0);
            buf[..f.len()].copy_from_slice(&f);
            assert!(matches!(
                filter::process(&mut buf, f.len(), 0, &macs, &mut cx),
                Verdict::Tx { port: 1, .. }
            ));
            let bip: [u8; 4] = buf[30..34].try_into().unwrap();
            let mut v = Vec::new();
            PacketBuilder::ethernet2([2, 0, 0, 0, 1, bip[3]], [2, 0, 0, 0, 0, 2])
                .ipv4(bip, [198, 18, 100, 1], 64)
                .tcp(8080, cport, 0x5000_0000, 64240)
                .syn()
                .ack(2)
                .write(&mut v, &[])
                .unwrap();
            buf[..v.len()].copy_from_slice(&v);
            assert!(matches!(
                filter::process(&mut buf, v.len(), 1, &macs, &mut cx),
                Verdict::Tx { port: 1, .. }
            ));
            cookies.push(cookie);
        }
    }
    let templates: Vec<Vec<u8>> = (0..flows)
        .map(|p| client_seg(10_000 + p, 2, Some(cookies[p as usize].wrapping_add(1)), 10))
        .collect();
    let syns: Vec<Vec<u8>> = (0..4096u32)
        .map(|k| {
            let mut f = client_seg(20_000 + k as u16, k, None, 0);
            f[29] = 1 + (k % 200) as u8;
            fix_ip(&mut f);
            f
        })
        .collect();
    let mut g = c.benchmark_group("synproxy");
    let mut counters2 = [0u64; N_COUNTERS];
    g.bench_function("syncookie_syn_ack", |bch| {
        let mut cx = fx.ctx(&mut counters2);
        let mut i = 0usize;
        bch.iter(|| {
            let t = &syns[i % syns.len()];
            buf[..t.len()].copy_from_slice(t);
            i += 1;
            black_box(filter::process(&mut buf, t.len(), 0, &macs, &mut cx))
        })
    });
    let mut counters3 = [0u64; N_COUNTERS];
    g.bench_function("established_synproxy_64B", |bch| {
        let mut cx = fx.ctx(&mut counters3);
        let mut i = 0usize;
        bch.iter(|| {
            let t = &templates[i % templates.len()];
            buf[..t.len()].copy_from_slice(t);
            i += 1;
            black_box(filter::process(&mut buf, t.len(), 0, &macs, &mut cx))
        })
    });
    g.finish();
}

fn benches(c: &mut Criterion) {
    let fx = Fixture::new("bench", 1 << 20);
    run(&fx, c);
    drop(fx);
    run_synproxy(c);
}

criterion_group! {
    name = filter_benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = benches
}
criterion_main!(filter_benches);
