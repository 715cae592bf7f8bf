//! Closed-connection records with real clients: N curl requests through
//! the AF_PACKET appliance's NAT service give exactly N records, each
//! matched to its curl by the client port. What is compared, exactly:
//! - the record's packets and IP bytes each way with what a packet
//!   capture in the client's namespace saw of that connection (an
//!   AF_PACKET socket on the client's interface, offloads off: every
//!   packet as the switch forwarded it; NAT changes addresses, not sizes);
//! - the TCP payload of those packets with curl's own counts: client to
//!   server `size_request + size_upload`, server to client `size_header +
//!   size_download`.
//!
//! Records count IP bytes (headers and TCP options included): curl alone
//! cannot give them, the capture can. The connection log gets N lines and
//! is rotated by `lbctl reopen`. Every wait is bounded.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use switchyard_tests::netns::{Bed, afpacket_appliance_with, prepare};
use switchyard_tests::{bin, wait_for};
use tools::appliance::dir_for;

/// Counts, per client port, the packets, IP bytes and TCP payload bytes
/// of the client's TCP connections to the VIP's port 80, each way, until
/// a line arrives on stdin; then prints them as JSON
/// `{port: [out_pkts, out_ip, out_payload, in_pkts, in_ip, in_payload]}`.
const SNIFFER: &str = r#"
import json, select, socket, struct, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(3))
s.bind(('c0', 0))
vip = socket.inet_aton('198.18.0.10')
stats = {}
def handle(f):
    if len(f) < 34 or f[12:14] != b'\x08\x00':
        return
    ip = f[14:]
    if ip[9] != 6:
        return
    ihl = (ip[0] & 15) * 4
    tot = struct.unpack('!H', ip[2:4])[0]
    tcp = ip[ihl:]
    sport, dport = struct.unpack('!HH', tcp[:4])
    payload = tot - ihl - (tcp[12] >> 4) * 4
    if ip[16:20] == vip and dport == 80:
        port, at = sport, 0
    elif ip[12:16] == vip and sport == 80:
        port, at = dport, 3
    else:
        return
    c = stats.setdefault(port, [0] * 6)
    c[at] += 1
    c[at + 1] += tot
    c[at + 2] += payload
print('ready', flush=True)
while True:
    r, _, _ = select.select([s, sys.stdin], [], [], 120)
    if not r:
        break
    if s in r:
        handle(s.recv(65535))
    if sys.stdin in r:
        s.setblocking(False)
        try:
            while True:
                handle(s.recv(65535))
        except BlockingIOError:
            pass
        break
print(json.dumps(stats), flush=True)
"#;

fn lbctl(inst: &str, args: &[&str]) -> Value {
    let out = Command::new(bin("lbctl"))
        .args(["--instance", inst, "--json"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "lbctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["result"].clone()
}

/// curl's counts of one request: (local port, request, upload, header, download).
fn curl(bed: &Bed) -> (u64, u64, u64, u64, u64) {
    let out = bed
        .exec(
            "cl",
            &[
                "curl",
                "-sS",
                "--max-time",
                "5",
                "-o",
                "/dev/null",
                "-w",
                "%{local_port} %{size_request} %{size_upload} %{size_header} %{size_download}",
                "http://198.18.0.10/",
            ],
        )
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let v: Vec<u64> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(|x| x.parse().unwrap())
        .collect();
    assert_eq!(v.len(), 5, "{out:?}");
    (v[0], v[1], v[2], v[3], v[4])
}

fn log_lines(p: &std::path::Path) -> usize {
    std::fs::read_to_string(p)
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

#[test]
fn curl_requests_give_one_record_each_with_the_bytes_the_client_saw() {
    const N: usize = 30;
    let mut bed = Bed::build();
    let port = prepare(&mut bed, "nat");
    let (inst, app) = afpacket_appliance_with(&bed, "nat", port, 65536, |inst| {
        format!(
            "[records]\nbatch = 8\nlog = \"{}\"\n",
            dir_for(inst).join("flows.jsonl").display()
        )
    });
    let log = dir_for(&inst).join("flows.jsonl");

    let mut sniffer = Command::new("ip")
        .args(["netns", "exec", &bed.ns("cl"), "python3", "-c", SNIFFER])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(sniffer.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready");

    let curls: Vec<_> = (0..N).map(|_| curl(&bed)).collect();
    let flows = wait_for(Duration::from_secs(20), || {
        let v = lbctl(&inst, &["flows", "--limit", "1000"]);
        match v["records"].as_u64() {
            Some(r) if r == N as u64 => Ok(v["list"].as_array().unwrap().clone()),
            Some(r) if r > N as u64 => panic!("{r} records for {N} requests: {v}"),
            other => Err(format!("records {other:?} of {N}\n{}", app.log())),
        }
    });
    sniffer.stdin.take().unwrap().write_all(b"stop\n").unwrap();
    line.clear();
    out.read_line(&mut line).unwrap();
    assert!(sniffer.wait().unwrap().success());
    let seen: BTreeMap<String, [u64; 6]> = serde_json::from_str(line.trim()).unwrap();
    assert_eq!(seen.len(), N, "the capture saw {N} connections: {seen:?}");

    for (port, request, upload, header, download) in curls {
        let f = flows
            .iter()
            .find(|f| f["client"].as_str().unwrap().ends_with(&format!(":{port}")))
            .unwrap_or_else(|| panic!("no record of client port {port}"));
        let c = seen[&port.to_string()];
        assert!(f["reason"].as_str().unwrap().starts_with("fin_"), "{f}");
        assert_eq!(f["service"], "web", "{f}");
        assert_eq!(
            (
                f["to_backend_packets"].as_u64().unwrap(),
                f["to_backend_bytes"].as_u64().unwrap(),
                f["to_client_packets"].as_u64().unwrap(),
                f["to_client_bytes"].as_u64().unwrap(),
            ),
            (c[0], c[1], c[3], c[4]),
            "record {f} against the capture {c:?}"
        );
        assert_eq!(c[2], request + upload, "client payload against curl");
        assert_eq!(c[5], header + download, "server payload against curl");
    }

    // The log: one line per request; a rotation and `lbctl reopen` start
    // a new file.
    wait_for(Duration::from_secs(10), || match log_lines(&log) {
        n if n == N => Ok(()),
        n => Err(format!("{n} log lines of {N}")),
    });
    let rotated = log.with_extension("jsonl.1");
    std::fs::rename(&log, &rotated).unwrap();
    let r = lbctl(&inst, &["reopen"]);
    assert_eq!(r["log"], log.display().to_string());
    for _ in 0..3 {
        curl(&bed);
    }
    wait_for(Duration::from_secs(10), || {
        match (log_lines(&rotated), log_lines(&log)) {
            (old, 3) if old == N => Ok(()),
            other => Err(format!("(rotated, new) lines {other:?}")),
        }
    });
    drop(app);
}
