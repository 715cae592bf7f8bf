//! The appliance end to end on virtual NICs: real controld and switchd
//! processes, traffic from the wire side, every returned frame checked by
//! an independent parser (etherparse).

use std::time::Duration;

use etherparse::{Ethernet2Header, Ipv4Header, TcpHeader};
use shm_layout::Table;
use switchyard_tests::{
    Appliance, Cfg, Wire, counter, counter_sum, dump_with_counters, render, shmdump_json, unique,
    wait_for,
};
use tools::frames::{self, Spec, TcpFlags};
use tools::traffic::{GenConfig, Generator};

const CLIENT_GW: [u8; 6] = [2, 0, 0, 0, 2, 1];
const CLIENT_PORT_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
const VIP: [u8; 4] = [198, 18, 0, 10];

fn traffic(instance: &str, service: &str, flows: u64, data: u32) -> GenConfig {
    GenConfig {
        instance: instance.to_string(),
        services: vec![service.to_string()],
        flows,
        concurrency: 256,
        data_packets: data,
        time_limit: Duration::from_secs(240),
        ..GenConfig::default()
    }
}

/// 30,000 TCP flows over weights 1:2:3: every frame rewritten correctly
/// (MACs, addresses, ports, TTL, checksums), every packet of a flow on one
/// backend, replies rewritten to the VIP, and each backend's share of flows
/// within 2 percentage points of its weight share.
#[test]
fn nat_rewrite_affinity_and_weighted_distribution() {
    let inst = unique("dist");
    let app = Appliance::start(&inst, &render(&inst, &Cfg::default()));
    let rep = Generator::new(traffic(&inst, "web", 30_000, 1))
        .unwrap()
        .run();
    assert!(rep.clean(), "{rep:#?}");
    assert_eq!(rep.flows_completed, 30_000);
    assert_eq!(
        (
            rep.bad_frames,
            rep.affinity_violations,
            rep.unexpected_frames
        ),
        (0, 0, 0)
    );
    // SYN, SYN-ACK, data, data reply, FIN: five checked frames per flow.
    assert_eq!(rep.packets_received - rep.duplicate_frames, 5 * 30_000);
    let split = &rep.per_backend["web"];
    let total: u64 = split.values().sum();
    for (backend, weight) in [
        ("198.19.1.1:8080", 1.0),
        ("198.19.1.2:8080", 2.0),
        ("198.19.1.3:8080", 3.0),
    ] {
        let share = split[backend] as f64 / total as f64 * 100.0;
        let want = weight / 6.0 * 100.0;
        assert!(
            (share - want).abs() <= 2.0,
            "{backend}: {share:.2}% vs {want:.2}% ({split:?})"
        );
    }
    let dump = dump_with_counters(&inst, &[], &[("conn_new", 30_000)]);
    assert_eq!(counter_sum(&dump, "drop_malformed"), 0);
    assert_eq!(dump["connections"]["connections"].as_u64().unwrap(), 30_000);
    drop(app);
}

/// UDP request/response through NAT, and the lbgen binary itself.
#[test]
fn udp_service_round_trips_via_lbgen_binary() {
    let inst = unique("udp");
    let app = Appliance::start(&inst, &render(&inst, &Cfg::default()));
    let out = std::process::Command::new(switchyard_tests::bin("lbgen"))
        .args([
            "--instance",
            &inst,
            "--service",
            "dns",
            "--flows",
            "2000",
            "--data-packets",
            "3",
            "--json",
        ])
        .output()
        .unwrap();
    let rep: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(out.status.success(), "{rep:#}");
    assert_eq!(rep["flows_completed"], 2000);
    assert_eq!(rep["bad_frames"], 0);
    assert_eq!(rep["affinity_violations"], 0);
    let split = rep["per_backend"]["dns"].as_object().unwrap();
    assert_eq!(split.len(), 2, "both dns backends used: {split:?}");
    drop(app);
}

fn syn_to(port: u16, rst: bool) -> Vec<u8> {
    let mut v = Vec::new();
    frames::build(
        &Spec {
            src_mac: CLIENT_GW,
            dst_mac: CLIENT_PORT_MAC,
            src: ([198, 18, 100, 7], 40_001),
            dst: (VIP, port),
            tcp: Some(TcpFlags {
                syn: !rst,
                rst,
                seq: 5000,
                ..Default::default()
            }),
            ttl: 64,
            ident: 1,
            payload_len: 0,
        },
        &mut v,
    );
    v
}

/// A SYN to a VIP port without a service is answered at once with a RST
/// (to the client, from the VIP); a RST is never answered; UDP is dropped.
#[test]
fn vip_port_without_service_gets_rst_never_for_rst_udp_dropped() {
    let inst = unique("rst");
    let app = Appliance::start(&inst, &render(&inst, &Cfg::default()));
    let mut wire = Wire::attach(&inst);
    wire.send("client", &syn_to(81, false));
    let got = wire.recv(1, Duration::from_secs(5));
    assert_eq!(got.len(), 1, "one RST expected");
    let (port, f) = &got[0];
    assert_eq!(port, "client");
    let (eth, rest) = Ethernet2Header::from_slice(f).unwrap();
    let (ip, rest) = Ipv4Header::from_slice(rest).unwrap();
    let (tcp, _) = TcpHeader::from_slice(rest).unwrap();
    assert_eq!((eth.destination, eth.source), (CLIENT_GW, CLIENT_PORT_MAC));
    assert_eq!((ip.source, ip.destination), (VIP, [198, 18, 100, 7]));
    assert_eq!((tcp.source_port, tcp.destination_port), (81, 40_001));
    assert!(tcp.rst && tcp.ack && !tcp.syn);
    assert_eq!(tcp.acknowledgment_number, 5001);
    assert_eq!(ip.header_checksum, ip.calc_header_checksum());
    assert_eq!(tcp.checksum, tcp.calc_checksum_ipv4(&ip, &[]).unwrap());

    wire.send("client", &syn_to(81, true));
    let mut udp = Vec::new();
    frames::build(
        &Spec {
            src_mac: CLIENT_GW,
            dst_mac: CLIENT_PORT_MAC,
            src: ([198, 18, 100, 7], 40_002),
            dst: (VIP, 54),
            tcp: None,
            ttl: 64,
            ident: 1,
            payload_len: 8,
        },
        &mut udp,
    );
    wire.send("client", &udp);
    let other = wire.settle(0);
    assert!(other.is_empty(), "no answer to RST or UDP: {other:?}");
    let dump = shmdump_json(&inst, &[]);
    assert_eq!(counter_sum(&dump, "rst_sent"), 1);
    assert_eq!(counter_sum(&dump, "drop_tcp_no_entry"), 1);
    assert_eq!(counter_sum(&dump, "drop_no_service_udp"), 1);
    drop(app);
}

/// ARP requests for the VIP are answered with the port's MAC.
#[test]
fn arp_request_for_vip_is_answered() {
    let inst = unique("arp");
    let app = Appliance::start(&inst, &render(&inst, &Cfg::default()));
    let mut wire = Wire::attach(&inst);
    let mut req = vec![0xff; 6];
    req.extend_from_slice(&CLIENT_GW);
    req.extend_from_slice(&[0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 1]);
    req.extend_from_slice(&CLIENT_GW);
    req.extend_from_slice(&[198, 18, 0, 1]);
    req.extend_from_slice(&[0; 6]);
    req.extend_from_slice(&VIP);
    wire.send("client", &req);
    let got = wire.recv(1, Duration::from_secs(5));
    assert_eq!(got.len(), 1);
    let f = &got[0].1;
    let arp = etherparse::ArpPacket::from_slice(&f[14..]).unwrap();
    assert_eq!(arp.operation, etherparse::ArpOperation::REPLY);
    assert_eq!(arp.sender_hw_addr(), &CLIENT_PORT_MAC);
    assert_eq!(arp.sender_protocol_addr(), &VIP);
    assert_eq!(arp.target_hw_addr(), &CLIENT_GW);
    assert_eq!(&f[0..6], &CLIENT_GW);
    // ARP for an address that is not a VIP is not answered.
    req[38..42].copy_from_slice(&[198, 18, 0, 99]);
    wire.send("client", &req);
    let other = wire.settle(0);
    assert!(other.is_empty(), "{other:?}");
    // One answer above and settle's two.
    assert_eq!(counter_sum(&shmdump_json(&inst, &[]), "arp_replies"), 3);
    drop(app);
}

/// A mid-connection TCP packet with no table entry (as after a lost table or
/// on a second appliance) goes to the backend Maglev chose for its SYN, and
/// the recovered connection is recorded.
#[test]
fn midflow_packet_without_entry_follows_maglev() {
    let inst = unique("mid1");
    let cfg = render(&inst, &Cfg::default());
    let mut first = Vec::new();
    {
        let app = Appliance::start(&inst, &cfg);
        let mut wire = Wire::attach(&inst);
        for i in 0..20u16 {
            let mut f = Vec::new();
            frames::build(&client_tcp(50_000 + i, true), &mut f);
            wire.send("client", &f);
        }
        for (_, f) in wire.recv(20, Duration::from_secs(5)) {
            let p = frames::parse_checked(&f).unwrap();
            first.push((p.src.1, p.dst));
        }
        drop(app);
    }
    assert_eq!(first.len(), 20);
    // A fresh appliance (empty table) sees only the mid-connection ACKs.
    let app = Appliance::start(&inst, &cfg);
    let mut wire = Wire::attach(&inst);
    for i in 0..20u16 {
        let mut f = Vec::new();
        frames::build(&client_tcp(50_000 + i, false), &mut f);
        wire.send("client", &f);
    }
    let mut second: Vec<_> = wire
        .recv(20, Duration::from_secs(5))
        .into_iter()
        .map(|(_, f)| {
            let p = frames::parse_checked(&f).unwrap();
            (p.src.1, p.dst)
        })
        .collect();
    first.sort();
    second.sort();
    assert_eq!(
        first, second,
        "every mid-connection packet went where its SYN went"
    );
    let dump = dump_with_counters(&inst, &["--conns"], &[("conn_midflow", 20)]);
    let list = dump["connections"]["list"].as_array().unwrap();
    assert_eq!(list.len(), 20);
    assert!(list.iter().all(|c| c["midflow"] == true));
    drop(app);
}

fn client_tcp(port: u16, syn: bool) -> Spec {
    Spec {
        src_mac: CLIENT_GW,
        dst_mac: CLIENT_PORT_MAC,
        src: ([198, 18, 100, 9], port),
        dst: (VIP, 80),
        tcp: Some(TcpFlags {
            syn,
            ack: !syn,
            seq: 1,
            ack_no: if syn { 0 } else { 1 },
            ..Default::default()
        }),
        ttl: 64,
        ident: 0,
        payload_len: if syn { 0 } else { 10 },
    }
}

/// Switches keep next hops cached across poll loops, and each connection's
/// rewrite in their flow cache; a routing publication must end both. A
/// backend's neighbour changes MAC by reload: the same established
/// connection's next packet leaves with the new MAC, from the full path,
/// and the one after is answered from the cache again.
#[test]
fn a_neighbour_that_changes_mac_is_followed_by_the_next_packet() {
    let inst = unique("nbmac");
    let cfg = Cfg {
        web: Cfg::default().web.into_iter().take(1).collect(),
        ..Cfg::default()
    };
    let before = render(&inst, &cfg);
    let old_mac = "address = \"198.19.1.1\"\nmac = \"02:00:00:00:01:01\"";
    assert!(before.contains(old_mac), "the rendered neighbour of web1");
    let after = before.replace(
        old_mac,
        "address = \"198.19.1.1\"\nmac = \"02:00:00:00:01:aa\"",
    );
    let app = Appliance::start(&inst, &before);
    let mut wire = Wire::attach(&inst);
    let mut send = |syn: bool| {
        let mut f = Vec::new();
        frames::build(&client_tcp(51_000, syn), &mut f);
        wire.send("client", &f);
        let got = wire.recv(1, Duration::from_secs(5));
        assert_eq!(got.len(), 1, "one frame out");
        frames::parse_checked(&got[0].1).unwrap()
    };
    let r = app.region();
    let cache_hits = || {
        r.switch_slots()[0].counters[shm_layout::switch_slot::Counter::FlowCacheHit as usize]
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    // The SYN; a data packet (its next hop cached, the connection's
    // rewrite filled into the flow cache); one answered from the flow cache.
    assert_eq!(send(true).dst_mac, [2, 0, 0, 0, 1, 1]);
    assert_eq!(send(false).dst_mac, [2, 0, 0, 0, 1, 1]);
    let hits = cache_hits();
    assert_eq!(send(false).dst_mac, [2, 0, 0, 0, 1, 1]);
    assert_eq!(cache_hits(), hits + 1, "answered from the flow cache");
    let routing_before = r.generation(Table::Routing);
    app.reload_and_wait(&after);
    // Wait (bounded) until the switch acknowledged the new routing table.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let g = r.generation(Table::Routing);
        let seen = r.switch_slots()[0]
            .seen_routing
            .load(std::sync::atomic::Ordering::Acquire);
        if g > routing_before && seen == g {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "routing generation {g}, seen {seen}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let p = send(false);
    assert_eq!(
        p.dst_mac,
        [2, 0, 0, 0, 1, 0xaa],
        "the new MAC, not the cached one"
    );
    assert_eq!(p.dst, ([198, 19, 1, 1], 8080));
    assert_eq!(
        cache_hits(),
        hits + 1,
        "the full path after the publication"
    );
    let p = send(false);
    assert_eq!(
        (p.dst_mac, p.dst),
        ([2, 0, 0, 0, 1, 0xaa], ([198, 19, 1, 1], 8080))
    );
    assert_eq!(cache_hits(), hits + 2, "then the flow cache again");
    drop(app);
}

/// `busy_ns` (the switch's utilisation) counts only loops that moved
/// frames: zero before any traffic, grown by traffic, and unchanged while
/// the switch idles afterwards.
#[test]
fn busy_time_counts_only_loops_that_moved_frames() {
    let inst = unique("busy");
    let app = Appliance::start(&inst, &render(&inst, &Cfg::default()));
    let one = |name: &str| counter(&shmdump_json(&inst, &[]), 0, name);
    // Idle since it started: the adaptive policy has slept, and every
    // loop so far was empty.
    wait_for(Duration::from_secs(10), || match one("idle_sleeps") {
        0 => Err("no idle sleep yet".into()),
        _ => Ok(()),
    });
    assert_eq!(one("busy_ns"), 0, "no frame, no busy time");
    let mut wire = Wire::attach(&inst);
    for syn in [true, false] {
        let mut f = Vec::new();
        frames::build(&client_tcp(52_000, syn), &mut f);
        wire.send("client", &f);
        assert_eq!(wire.recv(1, Duration::from_secs(5)).len(), 1);
    }
    // Published when the switch next sleeps: the loop after the last
    // busy one closes the busy interval.
    let sleeps = one("idle_sleeps");
    let busy = wait_for(Duration::from_secs(10), || {
        let d = shmdump_json(&inst, &[]);
        match (counter(&d, 0, "idle_sleeps"), counter(&d, 0, "rx_packets")) {
            (s, 2) if s > sleeps => Ok(counter(&d, 0, "busy_ns")),
            (s, rx) => Err(format!("{rx} frames received, {s} idle sleeps")),
        }
    });
    assert!(busy > 0, "two frames moved: busy time counted");
    // Ten more idle sleeps (the switch had the chance to add busy time),
    // and none was added.
    let later = one("idle_sleeps") + 10;
    wait_for(Duration::from_secs(10), || match one("idle_sleeps") {
        s if s >= later => Ok(()),
        s => Err(format!("{s} idle sleeps")),
    });
    assert_eq!(one("busy_ns"), busy, "idle loops add no busy time");
    drop(app);
}
