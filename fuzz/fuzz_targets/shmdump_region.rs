//! shmdump's reading of a corrupted region: a small region with published
//! services, backends, lookup tables, ports, routes and neighbours, a
//! running switch slot and a few connections, with fuzzer bytes
//! laid over chosen places of its header, switch slots, backend counters,
//! configuration and routing slots and connection table, then read the
//! way shmdump reads it (`tools::shmdump::collect`, connections listed).
//! It must never panic, and never allocate by a count read from the
//! region (libFuzzer's malloc limit turns a huge allocation into a crash).
//!
//! Input: records of `[section, offset (3 bytes, big-endian), len, bytes...]`;
//! the section is taken modulo the sections read, the offset modulo the
//! section's length. Every write is undone after the input, so each input
//! starts from the same pristine region.
#![no_main]
use std::cell::RefCell;

use std::sync::atomic::Ordering;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use shm_layout::config_slot::{MODE_DR, MODE_NAT, PROTO_TCP, PROTO_UDP};
use shm_layout::conntrack::{Conn, STATE_ESTABLISHED, STATE_PROVISIONAL, STATE_SYN};
use shm_layout::publish::cannot_fence;
use shm_layout::routing_slot::{NEIGH_VALID, NeighbourRec, RouteRec};
use shm_layout::switch_slot::SW_RUNNING;
use shm_layout::{Access, Capacities, Mapping, Region, Section, region_name};
use tools::shmdump::{Query, collect};

/// The sections shmdump reads (the packet rings are not).
const SECTIONS: [Section; 8] = [
    Section::Header,
    Section::Switches,
    Section::BackendCounters,
    Section::ConfigA,
    Section::ConfigB,
    Section::RoutingA,
    Section::RoutingB,
    Section::ConnTable,
];

struct Harness {
    /// Read-only, as shmdump attaches.
    region: Region,
    /// Writable view of the same object, for the corruption.
    raw: Mapping,
    /// The region's bytes before any input.
    pristine: Vec<u8>,
}

/// Lookup-table entries per service (the smallest prime allowed).
const M: usize = 251;

/// Creates and fills the region the fuzzer corrupts: two services (NAT TCP
/// with three backends, DR UDP with two), two ports, two routes, two
/// neighbours, switch 0 running, and connections in the table.
fn build(instance: &str) -> Region {
    let caps = Capacities {
        conn_slots: 1024,
        services: 4,
        backends: 8,
        backend_ids: 32,
        maglev_m: M as u32,
        switches: 2,
        routes: 4,
        neighbours: 4,
        ..Default::default()
    };
    let r = Region::create(instance, caps).expect("create region");
    let fence = &mut cannot_fence;
    r.publish_config(Duration::from_millis(10), fence, |s| {
        let h = &mut *s.header;
        h.n_services = 2;
        h.n_backends = 5;
        h.n_ports = 2;
        h.maglev_m = M as u32;
        h.tcp_syn_ms = 10_000;
        h.tcp_established_ms = 900_000;
        h.tcp_fin_ms = 30_000;
        h.udp_ms = 60_000;
        h.tcp_provisional_ms = 3_000;
        for (i, p) in h.ports[..2].iter_mut().enumerate() {
            p.mac = [2, 0, 0, 0, 0, i as u8 + 1];
            p.mtu = 1500;
            p.name[..2].copy_from_slice(if i == 0 { b"p0" } else { b"p1" });
        }
        for (si, (start, count, proto, mode)) in [
            (0u32, 3u32, PROTO_TCP, MODE_NAT),
            (3, 2, PROTO_UDP, MODE_DR),
        ]
        .into_iter()
        .enumerate()
        {
            let svc = &mut s.services[si];
            svc.vip = 0xc612_000a + si as u32;
            svc.port = 80;
            svc.proto = proto;
            svc.mode = mode;
            svc.backend_start = start;
            svc.backend_count = count;
            svc.table_start = (si * M) as u32;
            svc.table_len = M as u32;
            for (i, e) in s.maglev[si * M..(si + 1) * M].iter_mut().enumerate() {
                *e = (i % count as usize) as u16;
            }
        }
        for (i, b) in s.backends[..5].iter_mut().enumerate() {
            b.id = i as u32;
            b.ip = 0xc613_0101 + i as u32;
            b.port = 8080;
            b.weight = 1 + i as u32;
            b.service = u32::from(i >= 3);
            b.name[..2].copy_from_slice(&[b'b', b'0' + i as u8]);
        }
    })
    .expect("no switch runs");
    r.publish_routing(Duration::from_millis(10), fence, |s| {
        s.header.n_routes = 2;
        s.header.n_neighbours = 2;
        s.routes[0] = RouteRec {
            prefix: 0xc613_0100,
            len: 24,
            port: 1,
            ..Default::default()
        };
        s.routes[1] = RouteRec {
            prefix: 0,
            len: 0,
            port: 0,
            via: 0xc612_0001,
            ..Default::default()
        };
        for (i, n) in s.neighbours[..2].iter_mut().enumerate() {
            *n = NeighbourRec {
                ip: 0xc612_0001 + i as u32,
                port: i as u32,
                mac: [2, 0, 0, 0, 1, i as u8],
                state: NEIGH_VALID,
                _pad: 0,
            };
        }
    })
    .expect("no switch runs");
    let me = &r.switch_slots()[0];
    me.pid.store(std::process::id(), Ordering::Relaxed);
    me.state.store(SW_RUNNING, Ordering::Relaxed);
    let ct = r.conntrack();
    for i in 0..8u32 {
        let conn = Conn {
            proto: PROTO_TCP,
            mode: MODE_NAT,
            backend_id: i % 3,
            client_ip: 0xc612_6401 + i,
            client_port: 40_000 + i as u16,
            vip: 0xc612_000a,
            vip_port: 80,
            backend_ip: 0xc613_0101 + i % 3,
            backend_port: 8080,
            ..Default::default()
        };
        let state = [STATE_SYN, STATE_ESTABLISHED, STATE_PROVISIONAL][i as usize % 3];
        ct.insert(&conn, true, 1000, state, std::process::id(), |_| false)
            .expect("room in the table");
    }
    r
}

thread_local! {
    static H: RefCell<Harness> = RefCell::new({
        let inst = format!("fuzz-shmdump-{}", std::process::id());
        let name = region_name(&inst);
        let _built = build(&inst);
        let region = Region::attach_name(&name, Access::ReadOnly).expect("attach");
        let raw = Mapping::open(&name, Access::ReadWrite, region.len()).expect("open");
        // The mappings outlive the name: nothing is left in /dev/shm when
        // the fuzzer stops, however it stops.
        let _ = Mapping::unlink(&name);
        // SAFETY: `raw` maps `region.len()` readable bytes; nothing writes
        // them while this copy is taken (the fuzzer is single-threaded and
        // the fixture has no switch).
        let pristine = unsafe { std::slice::from_raw_parts(raw.as_ptr(), region.len()) }.to_vec();
        Harness { region, raw, pristine }
    });
}

fuzz_target!(|data: &[u8]| {
    H.with(|h| {
        let h = h.borrow_mut();
        let mut touched: Vec<(usize, usize)> = Vec::new();
        let mut rest = data;
        while let [sel, o0, o1, o2, len, tail @ ..] = rest {
            let sec = h.region.section(SECTIONS[*sel as usize % SECTIONS.len()]);
            let len = (*len as usize).min(tail.len());
            let (bytes, next) = tail.split_at(len);
            rest = next;
            if sec.len == 0 || len == 0 {
                continue;
            }
            let off = u32::from_be_bytes([0, *o0, *o1, *o2]) as u64 % sec.len;
            let n = (len as u64).min(sec.len - off) as usize;
            let at = (sec.offset + off) as usize;
            // SAFETY: `at..at + n` lies inside the section, which lies inside
            // the mapping (the region's own section table); the region is
            // only read on this thread, after the write.
            unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), h.raw.as_ptr().add(at), n) };
            touched.push((at, n));
        }
        let q = Query {
            conns: true,
            limit: 64,
            ..Query::default()
        };
        let v = collect(&h.region, &q);
        // The output is bounded by the sections, whatever the counts say.
        assert!(v["connections"]["list"].as_array().map_or(0, Vec::len) <= 64);
        let _ = v.to_string();
        for (at, n) in touched {
            // SAFETY: as above; the pristine copy holds every byte of the mapping.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    h.pristine.as_ptr().add(at),
                    h.raw.as_ptr().add(at),
                    n,
                )
            };
        }
    });
});
