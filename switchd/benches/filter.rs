//! Per-packet cost of the packet filter, without processes or rings:
//! established NAT flows (lookup hit + rewrite + route) and new flows (SYN:
//! service lookup + Maglev + insert of forward and reply slots + rewrite).
//! Run: cargo bench -p switchd --bench filter

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use etherparse::PacketBuilder;
use shm_layout::config_slot::{MODE_NAT, PROTO_TCP};
use shm_layout::routing_slot::NEIGH_VALID;
use shm_layout::switch_slot::N_COUNTERS;
use shm_layout::{Capacities, Mapping, Region, Table, region_name};
use switchd::filter::{self, Ctx, Verdict};

const VIP: u32 = 0xc612_000a;

struct Bench {
    region: Region,
    name: String,
}

impl Drop for Bench {
    fn drop(&mut self) {
        let _ = Mapping::unlink(&self.name);
    }
}

fn setup() -> Bench {
    let inst = format!("bench-filter-{}", std::process::id());
    let caps = Capacities {
        conn_slots: 1 << 20,
        maglev_m: 65537,
        ..Capacities::default()
    };
    let region = Region::create(&inst, caps).unwrap();
    region.publish_config(Duration::from_millis(10), |s| {
        s.header.n_services = 1;
        s.header.n_backends = 3;
        s.header.n_ports = 2;
        s.header.maglev_m = 65537;
        s.header.tcp_syn_ms = 10_000;
        s.header.tcp_established_ms = 900_000;
        s.header.tcp_fin_ms = 30_000;
        s.header.udp_ms = 60_000;
        s.header.ports[0].mac = [2, 0, 0, 0, 0, 1];
        s.header.ports[1].mac = [2, 0, 0, 0, 0, 2];
        let svc = &mut s.services[0];
        svc.vip = VIP;
        svc.port = 80;
        svc.proto = PROTO_TCP;
        svc.mode = MODE_NAT;
        svc.backend_count = 3;
        svc.table_len = 65537;
        for i in 0..3 {
            let b = &mut s.backends[i];
            b.id = i as u32;
            b.ip = 0xc613_0101 + i as u32;
            b.port = 8080;
            b.weight = 1;
        }
        for (i, e) in s.maglev[..65537].iter_mut().enumerate() {
            *e = (i % 3) as u16;
        }
    });
    region.publish_routing(Duration::from_millis(10), |s| {
        s.header.n_routes = 2;
        s.header.n_neighbours = 4;
        s.routes[0] = shm_layout::routing_slot::RouteRec {
            prefix: 0xc613_0100,
            len: 24,
            port: 1,
            via: 0,
            ..Default::default()
        };
        s.routes[1] = shm_layout::routing_slot::RouteRec {
            prefix: 0xc612_6400,
            len: 24,
            port: 0,
            via: 0xc612_0001,
            ..Default::default()
        };
        let mut n = [
            (0xc612_0001u32, 0u32),
            (0xc613_0101, 1),
            (0xc613_0102, 1),
            (0xc613_0103, 1),
        ];
        n.sort();
        for (i, (ip, port)) in n.iter().enumerate() {
            s.neighbours[i] = shm_layout::routing_slot::NeighbourRec {
                ip: *ip,
                port: *port,
                mac: [2, 0, 0, 0, 1, i as u8],
                state: NEIGH_VALID,
                _pad: 0,
            };
        }
    });
    let name = region_name(&inst);
    Bench { region, name }
}

fn frame(client_port: u16, syn: bool, payload: usize) -> Vec<u8> {
    let b = PacketBuilder::ethernet2([2, 0, 0, 0, 2, 1], [2, 0, 0, 0, 0, 1])
        .ipv4([198, 18, 100, 1], VIP.to_be_bytes(), 64)
        .tcp(client_port, 80, 1, 64240);
    let b = if syn { b.syn() } else { b.ack(1) };
    let mut v = Vec::new();
    b.write(&mut v, &vec![0u8; payload]).unwrap();
    v
}

fn run(b: &Bench, c: &mut Criterion) {
    let r = &b.region;
    let mut counters = [0u64; N_COUNTERS];
    let macs = |p: u32| -> Option<[u8; 6]> { Some([2, 0, 0, 0, 0, p as u8 + 1]) };
    let ctx = |counters: &mut [u64; N_COUNTERS]| -> Ctx<'_> {
        let ct = r.begin_read(Table::Config);
        let rt = r.begin_read(Table::Routing);
        let cfg = r.config_view(ct.slot);
        Ctx {
            timeouts: cfg.header.timeouts(),
            cfg,
            rt: r.routing_view(rt.slot),
            ct: r.conntrack(),
            backends: r.backend_counters(),
            events: None,
            now_ms: r.now_ms(),
            pid: std::process::id(),
            counters: scratch_counters(counters),
        }
    };

    // Established: 1024 flows set up by their SYNs, then data packets.
    let flows = 1024u16;
    let mut buf = vec![0u8; 2048];
    for p in 0..flows {
        let f = frame(10_000 + p, true, 0);
        buf[..f.len()].copy_from_slice(&f);
        let mut cx = ctx(&mut counters);
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
        let mut cx = ctx(&mut counters);
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
                let mut cx = ctx(&mut counters);
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

/// A counters array for one Ctx (leaked: a few hundred bytes per bench).
fn scratch_counters(c: &mut [u64; N_COUNTERS]) -> &'static mut [u64; N_COUNTERS] {
    Box::leak(Box::new(*c))
}

fn benches(c: &mut Criterion) {
    let b = setup();
    run(&b, c);
}

criterion_group! {
    name = filter_benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = benches
}
criterion_main!(filter_benches);
