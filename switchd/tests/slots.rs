//! The poll loop uses a published slot only when it is whole: not a slot
//! whose stamp is 0 (never published, or being written), not one whose
//! checksum does not match its contents; and a burst whose routing slot
//! was rewritten under it is counted torn, as one whose configuration
//! slot was. Each test runs the real loop over a vnic on a fixture region.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use etherparse::PacketBuilder;
use netdrv::vnic::{self, PortSpec, VnicHost, VnicWire};
use shm_layout::shm::Mapping;
use shm_layout::switch_slot::{Counter, N_COUNTERS};
use shm_layout::{Access, Region, Section, Table};
use switchd::engine::{self, Idle, PortMap, Settings};
use switchd::fixture::{CLIENT_GW_MAC, Fixture, VIP, port_mac};

/// Unlinks the vnic on every exit path.
struct Tmp(String);
impl Drop for Tmp {
    fn drop(&mut self) {
        let _ = Mapping::unlink(&self.0);
    }
}

/// A client's SYN to the fixture's web service.
fn syn(client_port: u16) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ethernet2(CLIENT_GW_MAC, [2, 0, 0, 0, 0, 1])
        .ipv4([198, 18, 100, 1], VIP.to_be_bytes(), 64)
        .tcp(client_port, 80, 1, 1000)
        .syn()
        .write(&mut v, b"")
        .unwrap();
    v
}

/// Runs the poll loop of switch 0 on `fx` over a fresh vnic (ports p0,
/// p1 = the fixture's ports 0, 1), injects `frames` on port 0 one at a
/// time (each once the switch has received the one before), stops the
/// loop, and returns the frames sent on each port and the counters.
/// `on_ports` runs where the loop asks for its port map: inside its first
/// burst over a usable configuration.
fn run(
    fx: &Fixture,
    tag: &str,
    frames: &[Vec<u8>],
    on_ports: &dyn Fn(&Region),
) -> ([Vec<Vec<u8>>; 2], [u64; N_COUNTERS]) {
    let name = format!("switchyard-test-slots-{tag}-{}", std::process::id());
    let ports: Vec<PortSpec> = (0..2u8)
        .map(|p| PortSpec {
            name: format!("p{p}"),
            mac: port_mac(p as u32).unwrap(),
        })
        .collect();
    vnic::create(&name, &ports, 64, 2 * 2 * 64 + 256).unwrap();
    let _tmp = Tmp(name.clone());
    let mut wire = VnicWire::attach(&name).unwrap();
    let mut host = VnicHost::attach(&name).unwrap();
    let mut map = PortMap {
        global: vec![0, 1],
        ..PortMap::default()
    };
    for p in 0..2 {
        map.local[p] = Some(p as u8);
        map.mac[p] = port_mac(p as u32);
    }
    let settings = Settings {
        switch_index: 0,
        burst: 32,
        idle: Idle::Adaptive,
        null: false,
        syn_queue: 0,
        flow_cache: 0,
        record_batch: 64,
        record_batch_ms: 100,
    };
    let stop = AtomicBool::new(false);
    let me = &fx.region.switch_slots()[0];
    let ports = |r: &Region| {
        on_ports(r);
        Ok(map.clone())
    };
    // The loop runs here (the port-map callback need not be Sync); the
    // wire is driven from a second thread.
    std::thread::scope(|s| {
        let driver = s.spawn(|| {
            for (i, f) in frames.iter().enumerate() {
                assert!(wire.inject(0, f));
                // Counters reach the slot on the first loop without frames
                // (a frame dropped for want of a usable slot is counted in
                // drop_no_config alone).
                let deadline = Instant::now() + Duration::from_secs(10);
                let seen = || me.counter(Counter::RxPackets) + me.counter(Counter::DropNoConfig);
                while seen() < i as u64 + 1 {
                    if Instant::now() >= deadline {
                        stop.store(true, Ordering::Relaxed);
                        panic!("frame {i} not received");
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            stop.store(true, Ordering::Relaxed);
        });
        engine::run(&fx.region, &mut host, &ports, settings, &stop).unwrap();
        driver.join().unwrap();
    });
    let mut out: [Vec<Vec<u8>>; 2] = Default::default();
    for (p, o) in out.iter_mut().enumerate() {
        wire.collect(p, 64, |f| o.push(f.to_vec()));
    }
    let mut counters = [0u64; N_COUNTERS];
    for (c, w) in counters.iter_mut().zip(&me.counters) {
        *c = w.load(Ordering::Relaxed);
    }
    (out, counters)
}

/// The fixture as it is: the SYN leaves toward a backend (the reference
/// for the tests below).
#[test]
fn a_whole_slot_is_used() {
    let fx = Fixture::new("slots-whole", 1 << 10);
    let (out, c) = run(&fx, "whole", &[syn(40_000)], &|_| {});
    assert_eq!((out[0].len(), out[1].len()), (0, 1));
    assert_eq!(c[Counter::ConnNew as usize], 1);
    assert_eq!(c[Counter::DropNoConfig as usize], 0);
    assert_eq!(c[Counter::BadChecksum as usize], 0);
}

/// A routing slot whose stamp is 0 is being written (here: as the first
/// publication leaves it before its last store): nothing of it is used.
#[test]
fn a_routing_slot_with_stamp_zero_is_not_used() {
    let fx = Fixture::new("slots-zero", 1 << 10);
    let r = &fx.region;
    let active = r.begin_read(Table::Routing).slot;
    r.slot_stamp(Table::Routing, active)
        .store(0, Ordering::Relaxed);
    let (out, c) = run(&fx, "zero", &[syn(40_000)], &|_| {});
    assert_eq!((out[0].len(), out[1].len()), (0, 0), "{out:02x?}");
    assert_eq!(c[Counter::DropNoConfig as usize], 1);
    assert_eq!(c[Counter::ConnNew as usize], 0);
    assert_eq!(c[Counter::BadChecksum as usize], 0);
}

/// A slot whose contents do not match its checksum (one byte changed
/// behind the publisher's back) is refused, and counted once for its
/// generation however many frames meet it.
#[test]
fn a_slot_whose_checksum_does_not_match_is_not_used() {
    let fx = Fixture::new("slots-sum", 1 << 10);
    let r = &fx.region;
    let active = r.begin_read(Table::Routing).slot;
    let sec = r.section(if active == 0 {
        Section::RoutingA
    } else {
        Section::RoutingB
    });
    let m = Mapping::open(r.name(), Access::ReadWrite, r.len()).unwrap();
    // SAFETY: the last byte of the active routing slot, inside the
    // mapping; no reference into it is alive in this process.
    unsafe { *m.as_ptr().add((sec.offset + sec.len - 1) as usize) ^= 0x5a };
    assert!(!r.routing_copy().checksum_ok());
    let (out, c) = run(&fx, "sum", &[syn(40_000), syn(40_001)], &|_| {});
    assert_eq!((out[0].len(), out[1].len()), (0, 0), "{out:02x?}");
    assert_eq!(c[Counter::DropNoConfig as usize], 2);
    assert_eq!(c[Counter::BadChecksum as usize], 1);
    assert_eq!(c[Counter::ConnNew as usize], 0);
}

/// A routing slot rewritten while a burst reads it (two publications
/// inside the burst, with a fence that claims a switch gone when it is
/// not: the protocol broken on purpose) ends that burst torn.
#[test]
fn a_routing_slot_rewritten_under_a_burst_is_counted_torn() {
    let fx = Fixture::new("slots-torn", 1 << 10);
    let done = Cell::new(false);
    let rewrite = |r: &Region| {
        if done.replace(true) {
            return;
        }
        let before = r.generation(Table::Routing);
        for _ in 0..2 {
            let copy = r.routing_copy();
            let cur = copy.routing();
            let (routes, neighbours) = (cur.routes().to_vec(), cur.neighbours().to_vec());
            r.publish_routing(Duration::from_millis(1), &mut |_, _| true, |s| {
                s.header.n_routes = routes.len() as u32;
                s.header.n_neighbours = neighbours.len() as u32;
                s.routes[..routes.len()].copy_from_slice(&routes);
                s.neighbours[..neighbours.len()].copy_from_slice(&neighbours);
            })
            .unwrap();
        }
        assert_eq!(r.generation(Table::Routing), before + 2);
    };
    let (_, c) = run(&fx, "torn", &[syn(40_000)], &rewrite);
    assert!(done.get());
    assert_eq!(c[Counter::TornBursts as usize], 1);
}
