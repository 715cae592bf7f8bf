//! Schedulers and controlled loading end to end on virtual NICs: real
//! controld and switchd processes, hand-made frames from the wire side,
//! every frame that comes back parsed and checked by etherparse. Every
//! wait is bounded; nothing asserts a duration.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use switchyard_tests::{
    Appliance, B, Cfg, Wire, counter_sum, dump_with_counters, render, shmdump_json, unique,
};
use tools::frames::{self, Spec, TcpFlags};

const CLIENT_GW: [u8; 6] = [2, 0, 0, 0, 2, 1];
const CLIENT_PORT_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
const VIP: [u8; 4] = [198, 18, 0, 10];

type Client = ([u8; 4], u16);

/// A vnic appliance with service "web" (VIP:80 -> :8080) over `backends`
/// (`(weight, max_conns)`), the scheduler, queue timeout and switch queue.
fn config(
    inst: &str,
    switches: usize,
    sched: &str,
    backends: &[(u32, u32)],
    queue_ms: u32,
    syn_queue: u32,
) -> String {
    const NAMES: [&str; 3] = ["web1", "web2", "web3"];
    let web = backends
        .iter()
        .enumerate()
        .map(|(i, &(w, _))| B {
            name: NAMES[i],
            last_octet: i as u8 + 1,
            weight: w,
        })
        .collect();
    let mut s = render(
        inst,
        &Cfg {
            switches,
            web,
            dns: vec![],
            ..Cfg::default()
        },
    );
    s = s.replace(
        "scheduler = \"maglev\"\n",
        &format!("scheduler = \"{sched}\"\nqueue_timeout_ms = {queue_ms}\n"),
    );
    for (i, &(_, max)) in backends.iter().enumerate() {
        let at = format!("  name = \"{}\"\n", NAMES[i]);
        s = s.replacen(&at, &format!("{at}  max_conns = {max}\n"), 1);
    }
    s.replace(
        "idle = \"adaptive\"\n",
        &format!("idle = \"adaptive\"\nsyn_queue = {syn_queue}\n"),
    )
}

fn tcp(client: Client, syn: bool, rst: bool, payload: usize) -> Vec<u8> {
    let mut v = Vec::new();
    frames::build(
        &Spec {
            src_mac: CLIENT_GW,
            dst_mac: CLIENT_PORT_MAC,
            src: client,
            dst: (VIP, 80),
            tcp: Some(TcpFlags {
                syn,
                ack: !syn,
                rst,
                seq: 1,
                ack_no: if syn { 0 } else { 1 },
                ..Default::default()
            }),
            ttl: 64,
            ident: 0,
            payload_len: payload,
        },
        &mut v,
    );
    v
}

fn client(host: u8, port: u16) -> Client {
    ([198, 18, 100, host], port)
}

/// What came back, parsed: (port name, source, destination, syn, rst).
fn collect(
    wire: &mut Wire,
    want: usize,
    wait: Duration,
) -> Vec<(String, Client, Client, bool, bool)> {
    wire.recv(want, wait)
        .into_iter()
        .map(|(port, f)| {
            let p = frames::parse_checked(&f).unwrap_or_else(|e| panic!("bad frame: {e}"));
            let t = p.tcp.expect("tcp");
            (port, p.src, p.dst, t.syn && !t.ack, t.rst)
        })
        .collect()
}

fn active(dump: &serde_json::Value) -> Vec<u64> {
    dump["config"]["services"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["active_conns"].as_u64().unwrap())
        .collect()
}

/// Two switches on two CPUs take SYNs at once: the backends' max_conns
/// (2 each) hold over both, the rest wait in the switches' queues; each
/// connection that closes lets exactly one queued SYN through; a
/// retransmitted SYN of a queued flow is dropped as a duplicate.
#[test]
fn max_conns_holds_across_two_switches_and_queued_syns_get_freed_slots() {
    let inst = unique("maxc");
    let cfg = config(&inst, 2, "maglev", &[(1, 2), (1, 2), (1, 2)], 20_000, 64);
    let app = Appliance::start(&inst, &cfg);
    let mut wire = Wire::attach(&inst);
    for i in 0..12u16 {
        wire.send_on(0, "client", &tcp(client(1, 20_000 + i), true, false, 0));
        wire.send_on(1, "client", &tcp(client(2, 20_000 + i), true, false, 0));
    }
    let first = collect(&mut wire, 6, Duration::from_secs(5));
    let extra = [wire.settle(0), wire.settle(1)].concat();
    assert!(extra.is_empty(), "more than 6 admitted: {extra:?}");
    assert_eq!(first.len(), 6, "{first:?}\n{}", app.log());
    assert!(
        first
            .iter()
            .all(|f| f.0 == "backend" && f.3 && f.2.1 == 8080)
    );
    let dump = dump_with_counters(&inst, &[], &[("conn_queued", 18), ("conn_new", 6)]);
    assert_eq!(active(&dump), [2, 2, 2]);
    assert_eq!(counter_sum(&dump, "conn_refused"), 0);
    // Both switches admitted some (the race was real): each saw its SYNs queued.
    assert!((0..2).all(|s| switchyard_tests::counter(&dump, s, "conn_queued") > 0));

    // A queued flow's retransmitted SYN: a duplicate, dropped.
    let admitted: BTreeSet<Client> = first.iter().map(|f| f.1).collect();
    let waiting = (0..12u16)
        .map(|i| client(1, 20_000 + i))
        .find(|c| !admitted.contains(c))
        .expect("a queued flow of switch 0");
    wire.send_on(0, "client", &tcp(waiting, true, false, 0));
    // Switch 0 must judge the retransmit while every slot is still taken:
    // the RSTs below go through switch 1 and would otherwise race it (a
    // slot freed first admits the retransmit itself, and the queued
    // original then follows it as a second SYN of the same flow).
    switchyard_tests::wait_for(Duration::from_secs(5), || {
        match counter_sum(&shmdump_json(&inst, &[]), "drop_queue_dup") {
            1 => Ok(()),
            n => Err(format!("drop_queue_dup is {n}")),
        }
    });

    // Two admitted clients reset their connections: their RSTs reach the
    // backends and exactly two queued SYNs follow.
    let closing: Vec<Client> = admitted.iter().copied().take(2).collect();
    for c in &closing {
        let nic = if c.0[3] == 1 { 0 } else { 1 };
        wire.send_on(nic, "client", &tcp(*c, false, true, 0));
    }
    let next = collect(&mut wire, 4, Duration::from_secs(5));
    let extra = [wire.settle(0), wire.settle(1)].concat();
    assert!(extra.is_empty(), "{extra:?}");
    let rsts: BTreeSet<Client> = next.iter().filter(|f| f.4).map(|f| f.1).collect();
    assert_eq!(rsts, closing.iter().copied().collect());
    let syns: Vec<Client> = next.iter().filter(|f| f.3).map(|f| f.1).collect();
    assert_eq!(syns.len(), 2, "{next:?}");
    assert!(syns.iter().all(|c| !admitted.contains(c)));
    let dump = dump_with_counters(&inst, &[], &[("conn_dequeued", 2), ("drop_queue_dup", 1)]);
    assert_eq!(active(&dump).iter().sum::<u64>(), 6);
    assert!(active(&dump).iter().all(|&a| a <= 2));
    assert_eq!(counter_sum(&dump, "conn_refused"), 0);
    drop(app);
}

/// Past the thresholds the client gets a RST from the VIP: at once when the
/// switch's queue is full; a queued SYN waits (a slot freed meanwhile
/// admits the oldest) and is refused after `queue_timeout_ms`.
#[test]
fn held_syns_are_refused_with_rst_when_the_queue_is_full_or_they_waited_too_long() {
    let inst = unique("qrst");
    // One slot, three queue places, 5 s of patience (long beside the
    // test's own steps, so the freed slot below finds client 1 waiting).
    let cfg = config(&inst, 1, "wlc", &[(1, 1)], 5000, 3);
    let app = Appliance::start(&inst, &cfg);
    let mut wire = Wire::attach(&inst);
    let c = |i: u16| client(3, 30_000 + i);
    for i in 0..6u16 {
        wire.send("client", &tcp(c(i), true, false, 0));
    }
    // Client 0 is admitted, 1-3 wait, 4 and 5 find the queue full.
    let got = collect(&mut wire, 3, Duration::from_secs(10));
    assert_eq!(got.len(), 3, "{got:?}\n{}", app.log());
    let to_backend: Vec<_> = got.iter().filter(|f| f.0 == "backend").collect();
    assert_eq!(to_backend.len(), 1, "{got:?}");
    assert!(to_backend[0].3 && to_backend[0].1 == c(0), "{got:?}");
    let refused: BTreeSet<Client> = got
        .iter()
        .filter(|f| f.0 == "client")
        .map(|f| f.2)
        .collect();
    assert_eq!(refused, BTreeSet::from([c(4), c(5)]));
    for r in got.iter().filter(|f| f.0 == "client") {
        assert!(r.4 && r.1 == (VIP, 80), "a RST from the VIP: {r:?}");
    }

    // Client 0 resets: its slot goes to the oldest waiting SYN, client 1's.
    wire.send("client", &tcp(c(0), false, true, 0));
    let got = collect(&mut wire, 2, Duration::from_secs(10));
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(got.iter().all(|f| f.0 == "backend"), "{got:?}");
    assert!(
        got.iter().any(|f| f.4 && f.1 == c(0)),
        "client 0's RST: {got:?}"
    );
    assert!(
        got.iter().any(|f| f.3 && f.1 == c(1)),
        "client 1's SYN: {got:?}"
    );

    // Clients 2 and 3 wait out their 5 s and are refused.
    let got = collect(&mut wire, 2, Duration::from_secs(15));
    let refused: BTreeSet<Client> = got
        .iter()
        .filter(|f| f.0 == "client" && f.4 && f.1 == (VIP, 80))
        .map(|f| f.2)
        .collect();
    assert_eq!(refused, BTreeSet::from([c(2), c(3)]), "{got:?}");
    let dump = dump_with_counters(
        &inst,
        &[],
        &[
            ("conn_queued", 3),
            ("conn_dequeued", 1),
            ("conn_refused", 4),
        ],
    );
    assert_eq!(counter_sum(&dump, "rst_sent"), 0);
    assert_eq!(active(&dump), [1]);
    drop(app);
}

/// wrr and wlc split 60 new connections exactly by weight (1:2:3), sh keeps
/// every connection of a client on one backend; then weight 0 drains a
/// backend under each: its connections continue, new ones avoid it.
#[test]
fn each_scheduler_end_to_end_and_weight_zero_drains() {
    for sched in ["wrr", "wlc", "sh"] {
        let inst = unique(sched);
        let cfg = config(&inst, 1, sched, &[(1, 0), (2, 0), (3, 0)], 1000, 64);
        let app = Appliance::start(&inst, &cfg);
        let mut wire = Wire::attach(&inst);
        let clients: Vec<Client> = (0..60u16)
            .map(|i| {
                if sched == "sh" {
                    client(10 + (i / 6) as u8, 40_000 + i)
                } else {
                    client(4, 40_000 + i)
                }
            })
            .collect();
        for c in &clients {
            wire.send("client", &tcp(*c, true, false, 0));
        }
        let got = collect(&mut wire, 60, Duration::from_secs(10));
        assert_eq!(got.len(), 60, "{sched}: {}", app.log());
        let to: BTreeMap<Client, [u8; 4]> = got.iter().map(|f| (f.1, f.2.0)).collect();
        let mut per = BTreeMap::new();
        for b in to.values() {
            *per.entry(b[3]).or_insert(0) += 1;
        }
        if sched == "sh" {
            for host in 10..20u8 {
                let bs: BTreeSet<_> = to
                    .iter()
                    .filter(|(c, _)| c.0[3] == host)
                    .map(|x| x.1)
                    .collect();
                assert_eq!(bs.len(), 1, "sh: client {host} spread over {bs:?}");
            }
            assert!(per.len() >= 2, "sh: {per:?}");
        } else {
            assert_eq!(per, BTreeMap::from([(1, 10), (2, 20), (3, 30)]), "{sched}");
        }
        // Drain web1 (weight 0): existing connections continue there.
        app.reload_and_wait(&cfg.replacen("  weight = 1\n", "  weight = 0\n", 1));
        let on_web1: Vec<Client> = to
            .iter()
            .filter(|(_, b)| b[3] == 1)
            .map(|(c, _)| *c)
            .collect();
        for c in &on_web1 {
            wire.send("client", &tcp(*c, false, false, 10));
        }
        let got = collect(&mut wire, on_web1.len(), Duration::from_secs(10));
        assert_eq!(got.len(), on_web1.len(), "{sched}");
        assert!(
            got.iter().all(|f| f.2.0 == [198, 19, 1, 1]),
            "{sched}: {got:?}"
        );
        for i in 0..60u16 {
            wire.send(
                "client",
                &tcp(client(30 + (i / 6) as u8, 50_000 + i), true, false, 0),
            );
        }
        let got = collect(&mut wire, 60, Duration::from_secs(10));
        assert_eq!(got.len(), 60, "{sched}");
        assert!(
            got.iter().all(|f| f.2.0 != [198, 19, 1, 1]),
            "{sched}: drained backend got new connections"
        );
        drop(app);
    }
}
