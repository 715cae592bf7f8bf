//! The admin API against a running appliance: every lbctl command, the
//! socket's rules, and the Prometheus metrics read with an exposition-format
//! parser, each checked against the region (shmdump) and real traffic.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::Value;
use shm_layout::Table;
use switchyard_tests::{
    Appliance, B, Cfg, Wire, bin, counter_sum, dump_with_counters, render, shmdump_json, unique,
};
use tools::appliance::dir_for;
use tools::frames::{self, Spec, TcpFlags};
use tools::traffic::{GenConfig, Generator, Report};

const CLIENT_GW: [u8; 6] = [2, 0, 0, 0, 2, 1];
const CLIENT_PORT_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
const BACKEND_PORT_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];
const VIP: [u8; 4] = [198, 18, 0, 10];
/// A client lbgen never uses (it takes hosts .1 to .250 of 198.18.100.0/24).
const CLIENT: [u8; 4] = [198, 18, 100, 253];

/// The test bed's vnic config with timeouts long enough that no connection
/// expires during a test (so counts read at different moments agree), plus
/// `[admin]` lines.
fn config_with(inst: &str, cfg: &Cfg, admin: &str) -> String {
    let text = render(inst, cfg);
    let from = "[timeouts]\ntcp_fin = 2\nudp = 5\n";
    assert!(text.contains(from));
    text.replace(
        from,
        "[timeouts]\ntcp_syn = 600\ntcp_fin = 600\nudp = 600\n",
    ) + &format!("\n[admin]\n{admin}\n")
}

/// The socket inside the appliance's own directory (removed with it).
fn socket_in_dir(inst: &str) -> PathBuf {
    dir_for(inst).join("admin.sock")
}

fn config(inst: &str, cfg: &Cfg) -> String {
    config_with(
        inst,
        cfg,
        &format!("socket = \"{}\"", socket_in_dir(inst).display()),
    )
}

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

fn lbctl(socket: &Path, args: &[&str]) -> Out {
    let out = Command::new(bin("lbctl"))
        .arg("--socket")
        .arg(socket)
        .args(args)
        .output()
        .expect("run lbctl");
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into(),
        stderr: String::from_utf8_lossy(&out.stderr).into(),
    }
}

/// `lbctl --json ARGS`, which must succeed: the reply's result.
fn lbctl_json(socket: &Path, args: &[&str]) -> Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let o = lbctl(socket, &all);
    assert_eq!(o.code, 0, "lbctl {args:?}: {}{}", o.stdout, o.stderr);
    let v: Value = serde_json::from_str(o.stdout.trim()).expect("one JSON line");
    assert_eq!(v["ok"], true, "{v}");
    v["result"].clone()
}

/// Waits until every switch uses configuration generation `g`.
fn wait_acked(app: &Appliance, g: u64) {
    let r = app.region();
    let n = r.caps().switches as usize;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !r.switch_slots()[..n]
        .iter()
        .all(|s| s.seen_config.load(Ordering::Acquire) >= g)
    {
        assert!(
            Instant::now() < deadline,
            "generation {g} not acknowledged:\n{}",
            app.log()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn run_traffic(inst: &str, service: &str, flows: u64, seed: u64) -> Report {
    let rep = Generator::new(GenConfig {
        instance: inst.to_string(),
        services: vec![service.to_string()],
        flows,
        concurrency: 128,
        data_packets: 2,
        seed,
        time_limit: Duration::from_secs(120),
        ..GenConfig::default()
    })
    .unwrap()
    .run();
    assert!(rep.clean(), "{rep:#?}");
    assert_eq!(rep.flows_completed, flows);
    rep
}

/// shmdump's backends by "service/backend".
fn dump_backends(dump: &Value) -> BTreeMap<String, Value> {
    let mut m = BTreeMap::new();
    for s in dump["config"]["services"].as_array().unwrap() {
        for b in s["backends"].as_array().unwrap() {
            m.insert(
                format!(
                    "{}/{}",
                    s["name"].as_str().unwrap(),
                    b["name"].as_str().unwrap()
                ),
                b.clone(),
            );
        }
    }
    m
}

/// show's backends by "service/backend".
fn show_backends(show: &Value) -> BTreeMap<String, Value> {
    let mut m = BTreeMap::new();
    for s in show["services"].as_array().unwrap() {
        for b in s["backends"].as_array().unwrap() {
            m.insert(
                format!(
                    "{}/{}",
                    s["name"].as_str().unwrap(),
                    b["name"].as_str().unwrap()
                ),
                b.clone(),
            );
        }
    }
    m
}

/// Counters that move while the appliance is idle.
/// Counters that move while no frame does: the loop's, and the
/// closed-connection records a switch sends up to `[records] batch_ms`
/// after the last close.
const MOVING: [&str; 4] = ["loops", "idle_sleeps", "records_sent", "records_batches"];

/// show, stats and conns (each filter) report what the region holds after
/// real traffic; the default socket derived from --instance works; the
/// human tables print.
#[test]
fn show_stats_and_conns_agree_with_the_region() {
    let inst = unique("adm-show");
    // No `socket` key: the default path for the instance.
    let app = Appliance::start(&inst, &config_with(&inst, &Cfg::default(), ""));
    let sock = controld::admin::default_socket_path(&inst);
    let meta = std::fs::symlink_metadata(&sock).expect("default socket exists");
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);

    run_traffic(&inst, "web", 2000, 1);
    run_traffic(&inst, "dns", 1000, 2);

    // `--instance` finds the same socket.
    let o = Command::new(bin("lbctl"))
        .args(["--instance", &inst, "--json", "show"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let show: Value = serde_json::from_slice(&o.stdout).unwrap();
    let show = &show["result"];
    // Published by the switch once idle (see `dump_with_counters`).
    let dump = dump_with_counters(
        &inst,
        &["--conns", "--limit", "100000"],
        &[("conn_new", 3000)],
    );
    assert_eq!(show["instance"], inst.as_str());
    assert_eq!(show["generation"], dump["config"]["generation"]);
    assert_eq!(show["routing_generation"], dump["routing"]["generation"]);
    let (sb, db) = (show_backends(show), dump_backends(&dump));
    assert_eq!(
        sb.keys().collect::<Vec<_>>(),
        ["dns/dns1", "dns/dns2", "web/web1", "web/web2", "web/web3"]
    );
    let mut web_total = 0;
    for (name, b) in &sb {
        let d = &db[name];
        assert_eq!(b["state"], "up", "{name}");
        assert_eq!(b["health"], Value::Null);
        assert_eq!(b["configured_weight"], d["weight"], "{name}");
        assert_eq!(b["effective_weight"], d["weight"], "{name}");
        assert_eq!(b["weight_override"], Value::Null);
        assert_eq!(b["admin_drained"], false);
        assert_eq!(b["max_conns"], Value::Null);
        assert_eq!(b["active_conns"], d["active_conns"], "{name}");
        assert_eq!(b["total_conns"], d["total_conns"], "{name}");
        assert_eq!(b["table_share"], d["table_share"], "{name}");
        assert_eq!(
            b["address"].as_str().unwrap(),
            format!("{}:{}", d["address"].as_str().unwrap(), d["port"])
        );
        if name.starts_with("web/") {
            web_total += b["total_conns"].as_u64().unwrap();
        }
    }
    assert_eq!(web_total, 2000, "every web flow counted once");
    let web = &show["services"][0];
    assert_eq!(
        (
            &web["name"],
            &web["vip"],
            &web["port"],
            &web["protocol"],
            &web["mode"]
        ),
        (
            &Value::from("web"),
            &Value::from("198.18.0.10"),
            &Value::from(80),
            &Value::from("tcp"),
            &Value::from("nat")
        )
    );
    assert_eq!(web["total_conns"], 2000);

    // stats: every counter equals the region's (idle now, so they hold still).
    let stats = lbctl_json(&sock, &["stats"]);
    let sw = &stats["switches"][0];
    assert_eq!(sw["name"], "sw0");
    assert_eq!(sw["alive"], true);
    assert_eq!(sw["state"], "running");
    assert_eq!(sw["pid"], dump["switches"][0]["pid"]);
    let counters = dump["switches"][0]["counters"].as_object().unwrap();
    assert_eq!(sw["counters"].as_object().unwrap().len(), counters.len());
    for (name, v) in counters {
        if MOVING.contains(&name.as_str()) {
            continue;
        }
        assert_eq!(&sw["counters"][name], v, "{name}");
        assert_eq!(&stats["total"]["counters"][name], v, "{name}");
    }
    assert_eq!(stats["total"]["counters"]["conn_new"], 3000);
    for b in stats["backends"].as_array().unwrap() {
        let name = format!(
            "{}/{}",
            b["service"].as_str().unwrap(),
            b["backend"].as_str().unwrap()
        );
        assert_eq!(b["total_conns"], db[&name]["total_conns"], "{name}");
    }
    // Rates come from two samples a second apart: idle, the traffic
    // counters' rates are exactly zero once both samples follow the traffic.
    let deadline = Instant::now() + Duration::from_secs(10);
    let stats = loop {
        let s = lbctl_json(&sock, &["stats"]);
        if s["interval_s"].is_number() && s["total"]["rates"]["rx_packets"] == 0.0 {
            break s;
        }
        assert!(Instant::now() < deadline, "rates never settled: {s}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(stats["interval_s"].as_f64().unwrap() >= 1.0);
    assert_eq!(stats["total"]["rates"]["conn_new"], 0.0);
    assert_eq!(stats["backends"][0]["conns_per_s"], 0.0);

    // conns: the same connections as the region's table, filters apply.
    let key = |c: &Value| {
        (
            c["client"].as_str().unwrap().to_string(),
            c["vip"].as_str().unwrap().to_string(),
            c["backend"].as_str().unwrap().to_string(),
        )
    };
    let want: BTreeSet<_> = dump["connections"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(key)
        .collect();
    assert_eq!(want.len(), 3000);
    let all = lbctl_json(&sock, &["conns", "--limit", "100000"]);
    assert_eq!(all["connections"], 3000);
    assert_eq!(all["matched"], 3000);
    let got: BTreeSet<_> = all["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["client"].as_str().unwrap().to_string(),
                c["vip"].as_str().unwrap().to_string(),
                c["backend_address"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(got, want);
    let names: BTreeSet<&str> = all["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["backend"].as_str().unwrap())
        .collect();
    assert_eq!(names, sb.keys().map(String::as_str).collect());

    let five = lbctl_json(&sock, &["conns", "--limit", "5"]);
    assert_eq!(
        (
            five["matched"].as_u64(),
            five["list"].as_array().unwrap().len()
        ),
        (Some(3000), 5)
    );

    let web1 = lbctl_json(
        &sock,
        &["conns", "--backend", "web/web1", "--limit", "100000"],
    );
    // Entries, not `active_conns`: a closed TCP connection leaves the
    // active count at its FIN but stays in the table until `tcp_fin`.
    let in_all = |f: &dyn Fn(&Value) -> bool| {
        all["list"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| f(c))
            .count() as u64
    };
    assert_eq!(
        web1["matched"].as_u64().unwrap(),
        in_all(&|c| c["backend"] == "web/web1")
    );
    assert!(
        web1["list"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["backend"] == "web/web1"
                && c["backend_address"] == "198.19.1.1:8080"
                && c["protocol"] == "tcp")
    );
    let by_ip = lbctl_json(
        &sock,
        &["conns", "--backend", "198.19.1.1", "--limit", "100000"],
    );
    assert_eq!(
        by_ip["matched"].as_u64().unwrap(),
        in_all(&|c| c["backend_address"]
            .as_str()
            .unwrap()
            .starts_with("198.19.1.1:"))
    );
    assert!(by_ip["matched"].as_u64().unwrap() > web1["matched"].as_u64().unwrap());
    let first = &all["list"][0];
    let client_ip = first["client"]
        .as_str()
        .unwrap()
        .split(':')
        .next()
        .unwrap()
        .to_string();
    let by_client = lbctl_json(
        &sock,
        &["conns", "--client", &client_ip, "--limit", "100000"],
    );
    let dump_client = shmdump_json(
        &inst,
        &["--conns", "--client", &client_ip, "--limit", "100000"],
    );
    assert_eq!(
        by_client["matched"].as_u64().unwrap() as usize,
        dump_client["connections"]["list"].as_array().unwrap().len()
    );
    assert!(by_client["matched"].as_u64().unwrap() >= 1);
    let none = lbctl_json(&sock, &["conns", "--vip", "198.18.0.99"]);
    assert_eq!(
        (none["matched"].as_u64(), none["connections"].as_u64()),
        (Some(0), Some(3000))
    );

    // Human tables.
    let o = lbctl(&sock, &["show"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stdout.contains("VIP:Port / Backend"), "{}", o.stdout);
    assert!(
        o.stdout
            .lines()
            .any(|l| l.starts_with("TCP   198.18.0.10:80")),
        "{}",
        o.stdout
    );
    assert!(
        o.stdout.contains("-> 198.19.1.3:8080  web/web3"),
        "{}",
        o.stdout
    );
    let o = lbctl(&sock, &["stats"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(
        o.stdout.lines().any(|l| l.starts_with("total")),
        "{}",
        o.stdout
    );
    let o = lbctl(&sock, &["conns", "--limit", "3"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stdout.starts_with("3000 connections in "), "{}", o.stdout);
    assert_eq!(o.stdout.lines().count(), 2 + 3, "{}", o.stdout);
    drop(app);
    assert!(!sock.exists(), "controld removes its socket on exit");
}

fn tcp(src: ([u8; 4], u16), syn: bool, seq: u32) -> Vec<u8> {
    let mut f = Vec::new();
    frames::build(
        &Spec {
            src_mac: CLIENT_GW,
            dst_mac: CLIENT_PORT_MAC,
            src,
            dst: (VIP, 80),
            tcp: Some(TcpFlags {
                syn,
                ack: !syn,
                seq,
                ack_no: if syn { 0 } else { 1 },
                ..Default::default()
            }),
            ttl: 64,
            ident: 0,
            payload_len: if syn { 0 } else { 20 },
        },
        &mut f,
    );
    f
}

/// A backend's reply to `client_port` (NAT: the switch restores the VIP).
fn reply_from(backend: [u8; 4], client_port: u16) -> Vec<u8> {
    let mut f = Vec::new();
    frames::build(
        &Spec {
            src_mac: [2, 0, 0, 0, 1, backend[3]],
            dst_mac: BACKEND_PORT_MAC,
            src: (backend, 8080),
            dst: (CLIENT, client_port),
            tcp: Some(TcpFlags {
                ack: true,
                seq: 9,
                ack_no: 2,
                ..Default::default()
            }),
            ttl: 64,
            ident: 0,
            payload_len: 30,
        },
        &mut f,
    );
    f
}

/// drain: a backend gets no new connection while its existing ones carry
/// on in both directions; enable gives it new connections again.
#[test]
fn drain_stops_new_connections_and_keeps_existing_ones() {
    let inst = unique("adm-drain");
    let app = Appliance::start(&inst, &config(&inst, &Cfg::default()));
    let sock = socket_in_dir(&inst);
    let mut wire = Wire::attach(&inst);

    // 60 connections from one client; Maglev spreads them 1:2:3.
    let ports: Vec<u16> = (50_000..50_060).collect();
    for &p in &ports {
        wire.send("client", &tcp((CLIENT, p), true, 1));
    }
    let mut backend_of: BTreeMap<u16, [u8; 4]> = BTreeMap::new();
    for (port, f) in wire.recv(ports.len(), Duration::from_secs(10)) {
        assert_eq!(port, "backend");
        let p = frames::parse_checked(&f).unwrap();
        backend_of.insert(p.src.1, p.dst.0);
    }
    assert_eq!(backend_of.len(), ports.len());
    let on_web1: Vec<u16> = backend_of
        .iter()
        .filter(|(_, b)| **b == [198, 19, 1, 1])
        .map(|(p, _)| *p)
        .collect();
    assert!(!on_web1.is_empty(), "{backend_of:?}");
    let before = show_backends(&lbctl_json(&sock, &["show"]));
    assert_eq!(before["web/web1"]["total_conns"], on_web1.len());
    assert_eq!(before["web/web1"]["active_conns"], on_web1.len());

    let r = lbctl_json(&sock, &["drain", "web/web1"]);
    let g = r["generation"].as_u64().unwrap();
    assert_eq!(g, 2, "drain publishes one generation");
    assert_eq!(app.region().generation(Table::Config), g);
    assert_eq!(r["service"], "web");
    assert_eq!(r["backend"]["state"], "drained");
    assert_eq!(r["backend"]["admin_drained"], true);
    assert_eq!(r["backend"]["effective_weight"], 0);
    assert_eq!(r["backend"]["configured_weight"], 1);
    assert_eq!(r["backend"]["table_share"], 0.0);
    wait_acked(&app, g);
    let dump = shmdump_json(&inst, &[]);
    let db = dump_backends(&dump);
    assert_eq!(db["web/web1"]["table_entries"], 0);
    assert_eq!(db["web/web1"]["weight"], 0);
    // Draining again changes nothing and publishes nothing.
    assert_eq!(lbctl_json(&sock, &["drain", "web/web1"])["generation"], g);

    // Existing connections continue: client data reaches web1, web1's
    // replies reach the client from the VIP.
    for &p in &on_web1 {
        wire.send("client", &tcp((CLIENT, p), false, 2));
        wire.send("backend", &reply_from([198, 19, 1, 1], p));
    }
    let got = wire.recv(2 * on_web1.len(), Duration::from_secs(10));
    assert_eq!(got.len(), 2 * on_web1.len());
    let (mut fwd, mut back) = (BTreeSet::new(), BTreeSet::new());
    for (port, f) in got {
        let p = frames::parse_checked(&f).unwrap();
        match port.as_str() {
            "backend" => {
                assert_eq!(p.dst, ([198, 19, 1, 1], 8080));
                assert_eq!(p.src.0, CLIENT);
                fwd.insert(p.src.1);
            }
            "client" => {
                assert_eq!(p.src, (VIP, 80));
                assert_eq!(p.dst.0, CLIENT);
                back.insert(p.dst.1);
            }
            other => panic!("frame out of {other}"),
        }
    }
    let want: BTreeSet<u16> = on_web1.iter().copied().collect();
    assert_eq!((&fwd, &back), (&want, &want));

    // New connections avoid web1.
    let rep = run_traffic(&inst, "web", 3000, 11);
    let split = &rep.per_backend["web"];
    assert!(!split.contains_key("198.19.1.1:8080"), "{split:?}");
    assert_eq!(split.values().sum::<u64>(), 3000);
    let after = show_backends(&lbctl_json(&sock, &["show"]));
    assert_eq!(
        after["web/web1"]["total_conns"],
        on_web1.len(),
        "no new connection"
    );
    assert_eq!(
        after["web/web1"]["active_conns"],
        on_web1.len(),
        "old ones live"
    );
    assert_eq!(after["web/web1"]["state"], "drained");

    let r = lbctl_json(&sock, &["enable", "web/web1"]);
    assert_eq!(r["generation"], g + 1);
    assert_eq!(r["backend"]["state"], "up");
    assert_eq!(r["backend"]["effective_weight"], 1);
    wait_acked(&app, g + 1);
    let rep = run_traffic(&inst, "web", 3000, 12);
    let n1 = rep.per_backend["web"]["198.19.1.1:8080"];
    assert!(n1 > 0, "{:?}", rep.per_backend);
    let last = show_backends(&lbctl_json(&sock, &["show"]));
    assert_eq!(last["web/web1"]["total_conns"], on_web1.len() as u64 + n1);

    // Human output of a change.
    let o = lbctl(&sock, &["drain", "web/web2"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(
        o.stdout,
        format!(
            "web/web2 (198.19.1.2:8080): drained, weight 0 (file 2), override drain; configuration generation {}\n",
            g + 2
        )
    );
    drop(wire);
    drop(app);
}

/// Entries per backend of a Maglev table built the way controld builds it.
fn maglev_entries(weights: &[(u8, u32)]) -> Vec<u64> {
    let keys: Vec<(u64, u32)> = weights
        .iter()
        .map(|&(last, w)| {
            (
                controld::maglev::backend_key(Ipv4Addr::new(198, 19, 1, last), 8080),
                w,
            )
        })
        .collect();
    let mut t = Vec::new();
    controld::maglev::build(&keys, 65537, &mut t).unwrap();
    let mut n = vec![0u64; weights.len()];
    for e in t {
        n[e as usize] += 1;
    }
    n
}

fn web_entries(inst: &str) -> Vec<u64> {
    let dump = shmdump_json(inst, &[]);
    dump["config"]["services"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["table_entries"].as_u64().unwrap())
        .collect()
}

fn web(weights: &[(&'static str, u8, u32)]) -> Cfg {
    Cfg {
        web: weights
            .iter()
            .map(|&(name, last_octet, weight)| B {
                name,
                last_octet,
                weight,
            })
            .collect(),
        ..Cfg::default()
    }
}

/// weight: the published Maglev table is the one the new weight gives; a
/// reload keeps the override of a backend still named in the file, drops
/// it when the backend leaves; `weight reset` returns to the file.
#[test]
fn weight_override_sets_the_maglev_share_and_follows_the_reload_rule() {
    let inst = unique("adm-weight");
    let file = |w: &[(&'static str, u8, u32)]| config(&inst, &web(w));
    let app = Appliance::start(
        &inst,
        &file(&[("web1", 1, 1), ("web2", 2, 2), ("web3", 3, 3)]),
    );
    let sock = socket_in_dir(&inst);
    assert_eq!(
        web_entries(&inst),
        maglev_entries(&[(1, 1), (2, 2), (3, 3)])
    );

    let r = lbctl_json(&sock, &["weight", "web/web1", "5"]);
    assert_eq!(r["generation"], 2);
    assert_eq!(
        (
            &r["backend"]["configured_weight"],
            &r["backend"]["effective_weight"],
            &r["backend"]["weight_override"]
        ),
        (&Value::from(1), &Value::from(5), &Value::from(5))
    );
    let want = maglev_entries(&[(1, 5), (2, 2), (3, 3)]);
    assert_eq!(web_entries(&inst), want);
    assert_eq!(r["backend"]["table_share"], want[0] as f64 / 65537.0);
    // Traffic follows the published table.
    wait_acked(&app, 2);
    let rep = run_traffic(&inst, "web", 3000, 21);
    let share = rep.per_backend["web"]["198.19.1.1:8080"] as f64 / 3000.0;
    assert!((share - 0.5).abs() < 0.05, "web1 share {share}");

    // Reload: web2's file weight changes, web1 keeps its override.
    std::fs::write(
        &app.config_path,
        file(&[("web1", 1, 1), ("web2", 2, 4), ("web3", 3, 3)]),
    )
    .unwrap();
    let r = lbctl_json(&sock, &["reload"]);
    assert_eq!(r["generation"], 3);
    assert_eq!(
        r["overrides_kept"],
        serde_json::json!(["web/web1: weight 5"])
    );
    assert_eq!(r["overrides_dropped"], serde_json::json!([]));
    assert_eq!(
        web_entries(&inst),
        maglev_entries(&[(1, 5), (2, 4), (3, 3)])
    );
    assert!(
        app.log()
            .contains("reload keeps runtime override web/web1: weight 5")
    );

    // web1 leaves the file: its override goes.
    std::fs::write(&app.config_path, file(&[("web2", 2, 4), ("web3", 3, 3)])).unwrap();
    let r = lbctl_json(&sock, &["reload"]);
    assert_eq!(r["overrides_kept"], serde_json::json!([]));
    assert_eq!(
        r["overrides_dropped"],
        serde_json::json!(["web/web1: weight 5"])
    );
    assert!(app.log().contains(
        "reload drops runtime override web/web1: weight 5: backend no longer configured"
    ));
    // ... and comes back with the file's weight.
    std::fs::write(
        &app.config_path,
        file(&[("web1", 1, 1), ("web2", 2, 4), ("web3", 3, 3)]),
    )
    .unwrap();
    lbctl_json(&sock, &["reload"]);
    assert_eq!(
        web_entries(&inst),
        maglev_entries(&[(1, 1), (2, 4), (3, 3)])
    );

    // weight reset returns to the file's weight; weight 0 drains.
    lbctl_json(&sock, &["weight", "web/web3", "0"]);
    assert_eq!(
        web_entries(&inst),
        maglev_entries(&[(1, 1), (2, 4), (3, 0)])
    );
    let show = show_backends(&lbctl_json(&sock, &["show"]));
    assert_eq!(show["web/web3"]["state"], "drained");
    assert_eq!(show["web/web3"]["admin_drained"], false);
    let r = lbctl_json(&sock, &["weight", "web/web3", "reset"]);
    assert_eq!(r["backend"]["weight_override"], Value::Null);
    assert_eq!(r["backend"]["state"], "up");
    assert_eq!(
        web_entries(&inst),
        maglev_entries(&[(1, 1), (2, 4), (3, 3)])
    );
    // drain and a weight override combine; enable keeps the weight.
    lbctl_json(&sock, &["weight", "web/web2", "7"]);
    lbctl_json(&sock, &["drain", "web/web2"]);
    assert_eq!(
        web_entries(&inst),
        maglev_entries(&[(1, 1), (2, 0), (3, 3)])
    );
    let r = lbctl_json(&sock, &["enable", "web/web2"]);
    assert_eq!(r["backend"]["effective_weight"], 7);
    assert_eq!(
        web_entries(&inst),
        maglev_entries(&[(1, 1), (2, 7), (3, 3)])
    );
    drop(app);
}

/// reload answers with the new generation, or with the error that kept the
/// running configuration (whose generation stays).
#[test]
fn reload_answers_the_result_and_a_broken_file_keeps_the_running_generation() {
    let inst = unique("adm-reload");
    let good = config(&inst, &Cfg::default());
    let app = Appliance::start(&inst, &good);
    let sock = socket_in_dir(&inst);
    let r = lbctl_json(&sock, &["reload"]);
    assert_eq!(
        (r["generation"].as_u64(), r["routing_generation"].as_u64()),
        (Some(2), Some(2))
    );
    let o = lbctl(&sock, &["reload"]);
    assert_eq!(o.code, 0);
    assert_eq!(
        o.stdout,
        "reloaded: configuration generation 3, routing generation 3\n"
    );
    assert_eq!(app.region().generation(Table::Config), 3);

    let broken = good.replacen("weight = 3", "weight = 70000", 1);
    assert_ne!(broken, good);
    std::fs::write(&app.config_path, &broken).unwrap();
    let o = lbctl(&sock, &["reload"]);
    assert_eq!(o.code, 1, "{}", o.stdout);
    assert_eq!(o.stdout, "");
    assert_eq!(
        o.stderr,
        format!(
            "lbctl: reload refused, running configuration (generation 3) kept: {}: service \"web\": backend \"web3\": weight 70000 exceeds 65535\n",
            app.config_path.display()
        )
    );
    let o = lbctl(&sock, &["--json", "reload"]);
    assert_eq!(o.code, 1);
    let v: Value = serde_json::from_str(o.stdout.trim()).unwrap();
    assert_eq!(v["ok"], false);
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("weight 70000 exceeds 65535")
    );
    assert_eq!(app.region().generation(Table::Config), 3);

    // A change that needs a restart is refused the same way.
    let two = config(
        &inst,
        &Cfg {
            switches: 2,
            ..Cfg::default()
        },
    );
    std::fs::write(&app.config_path, two).unwrap();
    let o = lbctl(&sock, &["reload"]);
    assert_eq!(o.code, 1);
    assert!(
        o.stderr
            .ends_with("kept: [switch] changed, which needs a restart\n"),
        "{}",
        o.stderr
    );
    // So is a changed [admin].
    std::fs::write(
        &app.config_path,
        config_with(&inst, &Cfg::default(), "socket = \"/tmp/elsewhere.sock\""),
    )
    .unwrap();
    let o = lbctl(&sock, &["reload"]);
    assert_eq!(o.code, 1);
    assert!(
        o.stderr
            .ends_with("kept: [admin] changed, which needs a restart\n"),
        "{}",
        o.stderr
    );
    assert_eq!(app.region().generation(Table::Config), 3);
    // The running configuration still serves.
    std::fs::write(&app.config_path, &good).unwrap();
    assert_eq!(lbctl_json(&sock, &["reload"])["generation"], 4);
    run_traffic(&inst, "web", 500, 31);
    drop(app);
}

fn exchange(stream: &mut UnixStream, reader: &mut BufReader<UnixStream>, line: &str) -> Value {
    writeln!(stream, "{line}").unwrap();
    let mut answer = String::new();
    reader.read_line(&mut answer).unwrap();
    serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{answer:?}: {e}"))
}

/// The socket: a stale one is replaced, mode 0600, a second controld cannot
/// take it; bad requests get errors that name the problem; lbctl's exit codes.
#[test]
fn socket_rules_bad_requests_and_exit_codes() {
    let inst = unique("adm-sock");
    let sock = socket_in_dir(&inst);
    std::fs::create_dir_all(sock.parent().unwrap()).unwrap();
    drop(UnixListener::bind(&sock).unwrap()); // stale: nobody listens
    let app = Appliance::start(&inst, &config(&inst, &Cfg::default()));
    assert!(
        app.log()
            .contains(&format!("replacing stale admin socket {}", sock.display()))
    );
    assert_eq!(
        std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777,
        0o600
    );

    let mut s = UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let errors = [
        (
            "hello",
            "request is not JSON (expected value at line 1 column 1); send one object per line, like {\"cmd\":\"show\"}",
        ),
        (
            r#"{"cmd":"restart"}"#,
            "unknown command \"restart\" (one of: show, stats, conns, drain, enable, weight, reload, flows, reopen)",
        ),
        (
            r#"{"cmd":"drain","backend":"web/web9"}"#,
            "service \"web\" has no backend \"web9\" (backends: web1, web2, web3)",
        ),
        (
            r#"{"cmd":"drain","backend":"www/web1"}"#,
            "no service \"www\" (services: web, dns)",
        ),
        (
            r#"{"cmd":"weight","backend":"web/web1","weight":70000}"#,
            "weight: weight 70000 is not a number 0..=65535 (or null for the file's weight)",
        ),
        (
            r#"{"cmd":"conns","backend":"web/nope"}"#,
            "conns: service \"web\" has no backend \"nope\" (backends: web1, web2, web3)",
        ),
        (
            r#"{"cmd":"show","verbose":true}"#,
            "show: unknown key \"verbose\" (show takes no arguments)",
        ),
    ];
    for (line, want) in errors {
        let v = exchange(&mut s, &mut r, line);
        assert_eq!(v, serde_json::json!({"ok": false, "error": want}), "{line}");
    }
    // The same connection still serves good requests, and nothing changed.
    let v = exchange(&mut s, &mut r, r#"{"cmd":"show"}"#);
    assert_eq!(v["ok"], true);
    assert_eq!(v["result"]["generation"], 1);
    let v = exchange(
        &mut s,
        &mut r,
        r#"{"cmd":"weight","backend":"web/web1","weight":null}"#,
    );
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["result"]["generation"], 1, "a no-op publishes nothing");
    drop(r);
    drop(s);

    // Exit codes: 1 error from controld, 2 usage, 3 cannot connect.
    let o = lbctl(&sock, &["drain", "web/web9"]);
    assert_eq!(o.code, 1);
    assert_eq!(
        o.stderr,
        "lbctl: service \"web\" has no backend \"web9\" (backends: web1, web2, web3)\n"
    );
    for bad in [
        &["drain", "web1"][..],
        &["weight", "web/web1", "heavy"],
        &["frobnicate"],
        &["conns", "--limit", "0"],
    ] {
        let o = lbctl(&sock, bad);
        assert_eq!(o.code, 2, "{bad:?}: {}", o.stderr);
    }
    let missing = dir_for(&inst).join("missing.sock");
    let o = lbctl(&missing, &["show"]);
    assert_eq!(o.code, 3);
    assert!(
        o.stderr
            .contains(&format!("cannot connect to {}", missing.display())),
        "{}",
        o.stderr
    );

    // A second controld (another instance) configured with the same socket refuses to start.
    let other = unique("adm-sock2");
    let dir = dir_for(&other);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("c.toml");
    std::fs::write(
        &path,
        config_with(
            &other,
            &Cfg::default(),
            &format!("socket = \"{}\"", sock.display()),
        ),
    )
    .unwrap();
    let out = Command::new(bin("controld"))
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "admin socket {}: another process is serving it",
            sock.display()
        )),
        "{err}"
    );
    assert!(
        !Path::new(&format!("/dev/shm/switchyard.{other}")).exists(),
        "it cleaned up"
    );
    std::fs::remove_dir_all(&dir).unwrap();
    // The first one still serves.
    assert_eq!(lbctl(&sock, &["show"]).code, 0);
    drop(app);
    assert!(!sock.exists());
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `GET path`: (status line, content type, body).
fn http_get(port: u16, path: &str) -> (String, String, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("HTTP head");
    let status = head.lines().next().unwrap().to_string();
    let ctype = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Type: "))
        .unwrap_or("")
        .to_string();
    (status, ctype, body.to_string())
}

struct Scrape {
    scrape: prometheus_parse::Scrape,
}

impl Scrape {
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let hits: Vec<&prometheus_parse::Sample> = self
            .scrape
            .samples
            .iter()
            .filter(|s| {
                s.metric == name
                    && s.labels.len() == labels.len()
                    && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
            })
            .collect();
        assert_eq!(hits.len(), 1, "{name}{labels:?}: {} samples", hits.len());
        match hits[0].value {
            prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Gauge(v) => v,
            ref other => panic!("{name}: {other:?} is neither counter nor gauge"),
        }
    }
}

fn scrape(port: u16) -> Scrape {
    let (status, ctype, body) = http_get(port, "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(ctype, "text/plain; version=0.0.4; charset=utf-8");
    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).unwrap();
    // Histogram families: the parser gathers each one's `_bucket` lines
    // into one sample (and reads `_sum` and `_count` as their own).
    let histograms: BTreeSet<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" histogram"))
        .collect();
    let of_histogram = |m: &str| {
        histograms.iter().any(|h| {
            m.strip_prefix(h)
                .is_some_and(|rest| ["", "_sum", "_count"].contains(&rest))
        })
    };
    // The parser skips what it cannot read: every sample line must be there.
    let sample_lines = body
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter(|l| {
            !histograms
                .iter()
                .any(|h| l.starts_with(&format!("{h}_bucket{{")))
        })
        .count()
        + histograms.len();
    assert_eq!(scrape.samples.len(), sample_lines);
    // Every family has its HELP, and a TYPE (the parser types its samples).
    for s in &scrape.samples {
        if of_histogram(&s.metric) {
            continue;
        }
        assert!(
            scrape.docs.contains_key(&s.metric),
            "{} has no HELP",
            s.metric
        );
        assert!(
            matches!(
                s.value,
                prometheus_parse::Value::Counter(_) | prometheus_parse::Value::Gauge(_)
            ),
            "{} has no TYPE",
            s.metric
        );
    }
    for h in &histograms {
        assert!(scrape.docs.contains_key(*h), "{h} has no HELP");
        assert!(
            scrape.samples.iter().any(|s| s.metric == *h
                && matches!(s.value, prometheus_parse::Value::Histogram(_))),
            "{h} is not read as a histogram"
        );
    }
    Scrape { scrape }
}

/// /metrics parsed by an exposition-format parser, every value checked
/// against shmdump and the admin socket.
#[test]
fn metrics_match_the_region() {
    let inst = unique("adm-metrics");
    let port = free_port();
    let cfg = Cfg {
        switches: 2,
        ..Cfg::default()
    };
    let admin = format!(
        "socket = \"{}\"\nmetrics = \"127.0.0.1:{port}\"",
        socket_in_dir(&inst).display()
    );
    let good = config_with(&inst, &cfg, &admin);
    let app = Appliance::start(&inst, &good);
    let sock = socket_in_dir(&inst);
    run_traffic(&inst, "web", 2000, 41);
    run_traffic(&inst, "dns", 500, 42);
    lbctl_json(&sock, &["drain", "web/web2"]);
    lbctl_json(&sock, &["weight", "web/web3", "6"]);
    // One reload that works, one refused (by SIGHUP: counted the same way).
    lbctl_json(&sock, &["reload"]);
    let before = app.reload_with(&good.replacen("weight = 3", "weight = -1", 1));
    let deadline = Instant::now() + Duration::from_secs(20);
    while !app.log().contains("weight -1 is less than 0") {
        assert!(
            Instant::now() < deadline,
            "SIGHUP not handled:\n{}",
            app.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(app.region().generation(Table::Config), before);

    let m = scrape(port);
    let dump = shmdump_json(&inst, &[]);
    assert_eq!(m.get("switchyard_up", &[]), 1.0);
    assert_eq!(
        m.get("switchyard_config_generation", &[]),
        dump["config"]["generation"].as_f64().unwrap()
    );
    assert_eq!(m.get("switchyard_config_generation", &[]), 4.0);
    assert_eq!(
        m.get("switchyard_routing_generation", &[]),
        dump["routing"]["generation"].as_f64().unwrap()
    );
    assert_eq!(m.get("switchyard_reloads_total", &[("result", "ok")]), 1.0);
    assert_eq!(
        m.get("switchyard_reloads_total", &[("result", "refused")]),
        1.0
    );
    assert_eq!(m.get("switchyard_runtime_overrides", &[]), 2.0);
    assert_eq!(
        m.get("switchyard_publish_excluded_switches_total", &[]),
        0.0
    );
    for (i, sw) in ["sw0", "sw1"].iter().enumerate() {
        let s = &dump["switches"][i];
        assert_eq!(m.get("switchyard_switch_up", &[("switch", sw)]), 1.0);
        assert_eq!(
            m.get("switchyard_switch_restarts_total", &[("switch", sw)]),
            s["restarts"].as_f64().unwrap()
        );
        for (name, v) in s["counters"].as_object().unwrap() {
            if MOVING.contains(&name.as_str()) {
                continue;
            }
            assert_eq!(
                m.get(
                    &format!("switchyard_switch_{name}_total"),
                    &[("switch", sw)]
                ),
                v.as_f64().unwrap(),
                "{sw} {name}"
            );
        }
    }
    assert_eq!(counter_sum(&dump, "conn_new"), 2500);
    let show = lbctl_json(&sock, &["show"]);
    for s in show["services"].as_array().unwrap() {
        let svc = s["name"].as_str().unwrap();
        let l = [("service", svc)];
        let bs = s["backends"].as_array().unwrap();
        assert_eq!(m.get("switchyard_service_backends", &l), bs.len() as f64);
        let up = bs.iter().filter(|b| b["state"] == "up").count();
        assert_eq!(m.get("switchyard_service_backends_up", &l), up as f64);
        assert_eq!(
            m.get("switchyard_service_active_connections", &l),
            s["active_conns"].as_f64().unwrap()
        );
    }
    let db = dump_backends(&dump);
    for (name, b) in show_backends(&show) {
        let (svc, be) = name.split_once('/').unwrap();
        let addr = b["address"].as_str().unwrap();
        let l = [("service", svc), ("backend", be), ("address", addr)];
        let d = &db[&name];
        assert_eq!(
            m.get("switchyard_backend_active_connections", &l),
            d["active_conns"].as_f64().unwrap(),
            "{name}"
        );
        assert_eq!(
            m.get("switchyard_backend_connections_total", &l),
            d["total_conns"].as_f64().unwrap(),
            "{name}"
        );
        assert_eq!(
            m.get("switchyard_backend_weight_effective", &l),
            d["weight"].as_f64().unwrap(),
            "{name}"
        );
        assert_eq!(
            m.get("switchyard_backend_weight_configured", &l),
            b["configured_weight"].as_f64().unwrap(),
            "{name}"
        );
        assert_eq!(
            m.get("switchyard_backend_table_share", &l),
            d["table_share"].as_f64().unwrap(),
            "{name}"
        );
        for st in ["up", "drained", "down"] {
            let mut ls = l.to_vec();
            ls.push(("state", st));
            let want = if b["state"] == st { 1.0 } else { 0.0 };
            assert_eq!(m.get("switchyard_backend_state", &ls), want, "{name} {st}");
        }
    }
    let web2 = [
        ("service", "web"),
        ("backend", "web2"),
        ("address", "198.19.1.2:8080"),
    ];
    assert_eq!(
        m.get(
            "switchyard_backend_state",
            &[web2[0], web2[1], web2[2], ("state", "drained")]
        ),
        1.0
    );
    assert_eq!(m.get("switchyard_backend_weight_effective", &web2), 0.0);
    assert_eq!(m.get("switchyard_backend_weight_configured", &web2), 2.0);
    let web3 = [
        ("service", "web"),
        ("backend", "web3"),
        ("address", "198.19.1.3:8080"),
    ];
    assert_eq!(m.get("switchyard_backend_weight_effective", &web3), 6.0);
    let web_total: f64 = ["web1", "web2", "web3"]
        .iter()
        .map(|b| db[&format!("web/{b}")]["total_conns"].as_f64().unwrap())
        .sum();
    assert_eq!(web_total, 2000.0);

    let (status, _, _) = http_get(port, "/");
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    drop(app);
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "the listener goes with controld"
    );
}

/// A backend removed by a reload gives its id back once its connections
/// are gone; the backend that gets the id next starts from zero counts
/// (not the departed backend's totals).
#[test]
fn a_reused_backend_id_starts_from_zero_totals() {
    let inst = unique("adm-reuse");
    let mut cfg = Cfg::default();
    let app = Appliance::start(&inst, &render(&inst, &cfg));
    run_traffic(&inst, "web", 600, 7);
    let before = dump_backends(&shmdump_json(&inst, &[]));
    let web3 = &before["web/web3"];
    assert!(web3["total_conns"].as_u64().unwrap() > 0, "{web3}");
    assert_eq!(web3["active_conns"], 0, "traffic closed every connection");

    // web3 leaves; controld frees its id on its next once-a-second pass.
    cfg.web.truncate(2);
    app.reload_and_wait(&render(&inst, &cfg));
    let freed = format!("backend id {} freed", web3["id"]);
    switchyard_tests::wait_for(Duration::from_secs(10), || {
        if app.log().contains(&freed) {
            Ok(())
        } else {
            Err(format!("no {freed:?} in the log"))
        }
    });

    // A new backend comes: it gets the freed id, with zero totals.
    cfg.web.push(B {
        name: "web4",
        last_octet: 4,
        weight: 1,
    });
    app.reload_and_wait(&render(&inst, &cfg));
    let after = dump_backends(&shmdump_json(&inst, &[]));
    let web4 = &after["web/web4"];
    assert_eq!(web4["id"], web3["id"], "the freed id was reused: {web4}");
    assert_eq!(web4["total_conns"], 0, "{web4}");
    assert_eq!(
        after["web/web1"]["total_conns"], before["web/web1"]["total_conns"],
        "others keep theirs"
    );
}

/// 32 clients hammer /metrics and the admin socket (stats, and `conns`,
/// which reads the whole connection table) while a switch is killed with
/// SIGKILL: controld's main loop still supervises, and the switch is
/// restarted within the deadline crash.rs allows without the load.
#[test]
fn admin_and_metrics_floods_do_not_starve_supervision() {
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;
    let inst = unique("adm-flood");
    let port = free_port();
    let cfg = Cfg {
        connections: 1 << 20,
        ..Cfg::default()
    };
    let admin = format!(
        "socket = \"{}\"\nmetrics = \"127.0.0.1:{port}\"",
        socket_in_dir(&inst).display()
    );
    let app = Appliance::start(&inst, &config_with(&inst, &cfg, &admin));
    let sock = socket_in_dir(&inst);
    let stop = Arc::new(AtomicBool::new(false));
    let give_up = Instant::now() + Duration::from_secs(60);
    let mut threads = Vec::new();
    for i in 0..16 {
        let stop = stop.clone();
        threads.push(std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) && Instant::now() < give_up {
                if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
                    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
                    let _ = write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
                    let mut sink = Vec::new();
                    let _ = s.read_to_end(&mut sink);
                    n += 1;
                }
                let _ = i;
            }
            n
        }));
    }
    for i in 0..16 {
        let (stop, sock) = (stop.clone(), sock.clone());
        threads.push(std::thread::spawn(move || {
            let mut n = 0u64;
            let Ok(s) = UnixStream::connect(&sock) else {
                return 0;
            };
            let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut w = s;
            let req = if i % 2 == 0 {
                "{\"cmd\":\"conns\"}\n"
            } else {
                "{\"cmd\":\"stats\"}\n"
            };
            let mut line = String::new();
            while !stop.load(Ordering::Relaxed) && Instant::now() < give_up {
                line.clear();
                if w.write_all(req.as_bytes()).is_err() || r.read_line(&mut line).unwrap_or(0) == 0
                {
                    break;
                }
                n += 1;
            }
            n
        }));
    }
    std::thread::sleep(Duration::from_secs(1));
    let region = app.region();
    let before = region.switch_slots()[0].pid.load(Ordering::Relaxed);
    // SAFETY: kill(2) on the switchd pid the region names.
    assert_eq!(unsafe { libc::kill(before as i32, libc::SIGKILL) }, 0);
    let deadline = Instant::now() + Duration::from_secs(20);
    let restarted = loop {
        let s = &region.switch_slots()[0];
        let pid = s.pid.load(Ordering::Relaxed);
        if pid != before && pid != 0 && s.is_live() {
            break true;
        }
        if Instant::now() >= deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    stop.store(true, Ordering::Relaxed);
    let served: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert!(
        restarted,
        "switch 0 not restarted in 20 s under admin load ({served} requests served):\n{}",
        app.log()
    );
    assert!(served > 32, "the clients were served too ({served})");
    drop(app);
}
