//! Closed-connection records end to end on virtual NICs: real controld
//! and switchd processes, lbgen's traffic model and hand-made frames from
//! the wire side. Every record is checked field by field against the
//! packets the test sent; every wait is bounded; nothing asserts a duration.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use switchyard_tests::{
    Appliance, Cfg, Wire, bin, counter_sum, render, shmdump_json, unique, wait_for,
};
use tools::appliance::dir_for;
use tools::frames::{self, Spec, TcpFlags};
use tools::traffic::{GenConfig, Generator};

const CLIENT_GW: [u8; 6] = [2, 0, 0, 0, 2, 1];
const CLIENT_PORT_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
const BACKEND_PORT_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];
const VIP: [u8; 4] = [198, 18, 0, 10];
/// IPv4 and TCP headers without options: the IP bytes of an empty segment.
const HDRS: u64 = 40;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Bed {
    app: Appliance,
    socket: PathBuf,
    log: PathBuf,
    metrics: u16,
}

/// A vnic appliance (one switch) with `[records] batch` and `batch_ms`, a connection log
/// in the appliance's directory, the admin socket and metrics, and
/// `timeouts` lines replacing the test bed's.
fn start(tag: &str, batch: u32, batch_ms: u32, timeouts: &str) -> Bed {
    let inst = unique(tag);
    let dir = dir_for(&inst);
    let (socket, log, metrics) = (dir.join("admin.sock"), dir.join("flows.jsonl"), free_port());
    let text = render(&inst, &Cfg::default());
    let from = "[timeouts]\ntcp_fin = 2\nudp = 5\n";
    assert!(text.contains(from));
    let text = text.replace(from, &format!("[timeouts]\n{timeouts}\n"))
        + &format!(
            "\n[admin]\nsocket = \"{}\"\nmetrics = \"127.0.0.1:{metrics}\"\n\n[records]\nbatch = {batch}\nbatch_ms = {batch_ms}\nlog = \"{}\"\n",
            socket.display(),
            log.display()
        );
    let app = Appliance::start(&inst, &text);
    Bed {
        app,
        socket,
        log,
        metrics,
    }
}

fn lbctl(socket: &Path, args: &[&str]) -> Value {
    let out = Command::new(bin("lbctl"))
        .arg("--socket")
        .arg(socket)
        .args(args)
        .arg("--json")
        .output()
        .expect("run lbctl");
    assert!(
        out.status.success(),
        "lbctl {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("one JSON line");
    v["result"].clone()
}

/// `lbctl flows --limit 100000` once controld has received `n` records.
fn flows(bed: &Bed, n: u64) -> Vec<Value> {
    wait_for(Duration::from_secs(20), || {
        let v = lbctl(&bed.socket, &["flows", "--limit", "100000"]);
        match v["records"].as_u64() {
            Some(r) if r == n => Ok(v["list"].as_array().unwrap().clone()),
            Some(r) if r > n => panic!("{r} records, more than the {n} connections"),
            other => Err(format!("records {other:?} of {n}")),
        }
    })
}

/// A metric's value (no labels) from controld's /metrics.
fn metric(port: u16, name: &str) -> u64 {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let prefix = format!("{name} ");
    raw.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no metric {name}"))
        .parse()
        .unwrap()
}

fn log_lines(p: &Path) -> Vec<Value> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

/// lbgen's TCP flows through the NAT service (SYN, SYN-ACK, `data` data
/// exchanges of `payload` bytes each way, the client's FIN) over `flows`
/// connections: exactly one record each, reason fin_client, with the
/// exact packets and IP bytes each way; the switch sent them in batches
/// and controld handled at most flows/batch + 1 messages; the connection
/// log holds one line per record, and after a rotation and `lbctl
/// reopen` the next records go to the new file.
#[test]
fn fin_closes_give_one_record_each_in_batches_with_exact_counts() {
    const N: u64 = 200;
    const BATCH: u64 = 64;
    const DATA: u64 = 2;
    const PAYLOAD: u64 = 100;
    // A batch leaves when full, or 5 s after its oldest record: the
    // connections close well within that, so the bound below holds
    // however slowly the machine runs them.
    let bed = start("rec-fin", BATCH as u32, 5000, "tcp_fin = 2\nudp = 5");
    let run = |flows: u64, seed: u64| {
        let report = Generator::new(GenConfig {
            instance: bed.app.instance.clone(),
            services: vec!["web".into()],
            flows,
            concurrency: 16,
            data_packets: DATA as u32,
            payload: PAYLOAD as usize,
            seed,
            // Long enough that no step is sent twice (a resent frame
            // would count in its record, as it should).
            retransmit: Duration::from_secs(5),
            time_limit: Duration::from_secs(60),
            ..GenConfig::default()
        })
        .expect("generator")
        .run();
        assert!(report.clean(), "{report:?}\n{}", bed.app.log());
        assert_eq!(report.retransmits, 0, "{report:?}");
        assert_eq!(report.flows_completed, flows);
    };
    run(N, 1000);
    let list = flows(&bed, N);
    assert_eq!(list.len(), N as usize);
    let mut clients: Vec<&str> = list.iter().map(|f| f["client"].as_str().unwrap()).collect();
    clients.sort();
    clients.dedup();
    assert_eq!(clients.len(), N as usize, "one record per connection");
    for f in &list {
        assert_eq!(f["reason"], "fin_client", "{f}");
        assert_eq!(f["service"], "web", "{f}");
        assert_eq!(f["vip"], "198.18.0.10:80", "{f}");
        assert!(f["backend"].as_str().unwrap().starts_with("web/web"), "{f}");
        // Client: SYN, the data packets, FIN. Backend: SYN-ACK, data.
        assert_eq!(f["to_backend_packets"], DATA + 2, "{f}");
        assert_eq!(
            f["to_backend_bytes"],
            (DATA + 2) * HDRS + DATA * PAYLOAD,
            "{f}"
        );
        assert_eq!(f["to_client_packets"], DATA + 1, "{f}");
        assert_eq!(
            f["to_client_bytes"],
            (DATA + 1) * HDRS + DATA * PAYLOAD,
            "{f}"
        );
    }
    let dump = shmdump_json(&bed.app.instance, &[]);
    let batches = counter_sum(&dump, "records_batches");
    assert_eq!(counter_sum(&dump, "records_sent"), N);
    assert_eq!(counter_sum(&dump, "drop_records_ring_full"), 0);
    assert_eq!(counter_sum(&dump, "drop_records_pending"), 0);
    let messages = metric(bed.metrics, "switchyard_controld_record_messages_total");
    assert_eq!(messages, batches, "every batch the switch sent was handled");
    assert!(
        messages <= N / BATCH + 1,
        "{messages} messages for {N} records in batches of {BATCH}"
    );
    assert_eq!(metric(bed.metrics, "switchyard_controld_records_total"), N);
    // The log: one line per record, the same records.
    let lines = wait_for(Duration::from_secs(10), || {
        let l = log_lines(&bed.log);
        if l.len() as u64 == N {
            Ok(l)
        } else {
            Err(format!("{} log lines of {N}", l.len()))
        }
    });
    let mut logged: Vec<&str> = lines
        .iter()
        .map(|f| f["client"].as_str().unwrap())
        .collect();
    logged.sort();
    assert_eq!(logged, clients);
    // Rotation: move the file away, reopen, more connections.
    let rotated = bed.log.with_extension("jsonl.1");
    std::fs::rename(&bed.log, &rotated).unwrap();
    let r = lbctl(&bed.socket, &["reopen"]);
    assert_eq!(r["log"], bed.log.display().to_string());
    run(10, 5000);
    flows(&bed, N + 10);
    wait_for(Duration::from_secs(10), || {
        let (old, new) = (log_lines(&rotated).len(), log_lines(&bed.log).len());
        if (old, new) == (N as usize, 10) {
            Ok(())
        } else {
            Err(format!(
                "{old} lines in the rotated file, {new} in the new one"
            ))
        }
    });
}

fn tcp(src: ([u8; 4], u16), dst: ([u8; 4], u16), to_vip: bool, syn: bool, rst: bool) -> Vec<u8> {
    let mut v = Vec::new();
    let (src_mac, dst_mac) = if to_vip {
        (CLIENT_GW, CLIENT_PORT_MAC)
    } else {
        ([2, 0, 0, 0, 1, src.0[3]], BACKEND_PORT_MAC)
    };
    frames::build(
        &Spec {
            src_mac,
            dst_mac,
            src,
            dst,
            tcp: Some(TcpFlags {
                syn,
                ack: !syn,
                rst,
                seq: 1,
                ack_no: 1,
                ..Default::default()
            }),
            ttl: 64,
            ident: 0,
            payload_len: 0,
        },
        &mut v,
    );
    v
}

/// A client's SYN; the backend it was sent to (from the forwarded frame).
fn open(wire: &mut Wire, client: ([u8; 4], u16)) -> ([u8; 4], u16) {
    wire.send("client", &tcp(client, (VIP, 80), true, true, false));
    let got = wire.recv(1, Duration::from_secs(5));
    assert_eq!(got.len(), 1, "the SYN was forwarded");
    let p = frames::parse_checked(&got[0].1).unwrap();
    p.dst
}

/// A RST from the backend and one from the client close their
/// connections at once (reasons rst_backend, rst_client); a UDP flow and a
/// half-open TCP connection left idle are closed by controld's GC at
/// their timeouts (reason idle_timeout). One record each, exact counts.
#[test]
fn rst_and_idle_closes_are_recorded_with_their_reason() {
    let bed = start("rec-rst", 64, 100, "tcp_syn = 1\ntcp_fin = 60\nudp = 1");
    let mut wire = Wire::attach(&bed.app.instance);
    let c1 = ([198, 18, 100, 251], 41_001);
    let b1 = open(&mut wire, c1);
    wire.send("backend", &tcp(b1, c1, false, false, true));
    assert_eq!(
        wire.recv(1, Duration::from_secs(5)).len(),
        1,
        "RST forwarded"
    );
    let c2 = ([198, 18, 100, 251], 41_002);
    open(&mut wire, c2);
    wire.send("client", &tcp(c2, (VIP, 80), true, false, true));
    assert_eq!(
        wire.recv(1, Duration::from_secs(5)).len(),
        1,
        "RST forwarded"
    );
    // Left half-open: its SYN timeout (1 s) ends it.
    let c3 = ([198, 18, 100, 251], 41_003);
    open(&mut wire, c3);
    // One UDP datagram; its timeout (1 s) ends the flow.
    let c4 = ([198, 18, 100, 251], 41_004);
    let mut d = Vec::new();
    frames::build(
        &Spec {
            src_mac: CLIENT_GW,
            dst_mac: CLIENT_PORT_MAC,
            src: c4,
            dst: (VIP, 53),
            tcp: None,
            ttl: 64,
            ident: 0,
            payload_len: 12,
        },
        &mut d,
    );
    wire.send("client", &d);
    assert_eq!(
        wire.recv(1, Duration::from_secs(5)).len(),
        1,
        "datagram forwarded"
    );
    let list = flows(&bed, 4);
    let of = |c: ([u8; 4], u16)| {
        let ep = format!("{}.{}.{}.{}:{}", c.0[0], c.0[1], c.0[2], c.0[3], c.1);
        list.iter()
            .find(|f| f["client"] == ep.as_str())
            .unwrap_or_else(|| panic!("no record of {ep}: {list:?}"))
            .clone()
    };
    let summary = |f: Value| {
        (
            f["reason"].as_str().unwrap().to_string(),
            f["protocol"].as_str().unwrap().to_string(),
            f["to_backend_packets"].as_u64().unwrap(),
            f["to_backend_bytes"].as_u64().unwrap(),
            f["to_client_packets"].as_u64().unwrap(),
            f["to_client_bytes"].as_u64().unwrap(),
        )
    };
    let s = |r: &str, p: &str, a, b, c, d| (r.to_string(), p.to_string(), a, b, c, d);
    assert_eq!(summary(of(c1)), s("rst_backend", "tcp", 1, HDRS, 1, HDRS));
    assert_eq!(summary(of(c2)), s("rst_client", "tcp", 2, 2 * HDRS, 0, 0));
    assert_eq!(summary(of(c3)), s("idle_timeout", "tcp", 1, HDRS, 0, 0));
    // UDP: 20 + 8 header bytes and the payload.
    assert_eq!(summary(of(c4)), s("idle_timeout", "udp", 1, 28 + 12, 0, 0));
    let dump = shmdump_json(&bed.app.instance, &[]);
    assert_eq!(
        counter_sum(&dump, "records_sent"),
        2,
        "the switch closed two"
    );
    assert_eq!(metric(bed.metrics, "switchyard_controld_records_total"), 4);
}
