//! The namespace demo: real clients and servers through switchyard on
//! AF_PACKET ports, in namespaces it creates and removes.
//! `netns-demo [nat|dr|tunnel|compare]` (root; needs iproute2, ethtool,
//! curl, wrk; `compare` also haproxy).
//!
//! `compare` measures, in one run on one machine, wrk from the client
//! namespace directly to one backend (kernel routing, no load balancer),
//! through switchyard in nat, dr and tunnel mode, and through HAProxy
//! (`mode tcp`, roundrobin with the same 1:2:3 weights) running in the
//! appliance namespace; each for keep-alive connections and for short
//! connections (one request each), and prints requests/s, p50 and p99 and
//! the ratio to direct as a Markdown table.

use switchyard_tests::netns::{
    APPLIANCE_CLIENT_ADDR, BACKEND_ADDRS, Bed, afpacket_appliance, prepare,
};

/// One wrk measurement.
#[derive(Clone, Debug, Default)]
struct Wrk {
    rps: f64,
    p50: String,
    p99: String,
    errors: bool,
    text: String,
}

/// Runs wrk (2 threads, 64 connections, `secs` seconds, latency
/// distribution) in the client namespace.
fn wrk(bed: &Bed, url: &str, close: bool, secs: u32) -> Wrk {
    let d = format!("{secs}s");
    let mut args = vec!["wrk", "-t", "2", "-c", "64", "-d", &d, "--latency"];
    if close {
        args.extend(["-H", "Connection: close"]);
    }
    args.push(url);
    let text = match bed.exec("cl", &args) {
        Ok(o) => String::from_utf8_lossy(&o.stdout).to_string(),
        Err(e) => {
            return Wrk {
                errors: true,
                text: e,
                ..Default::default()
            };
        }
    };
    let field = |prefix: &str| {
        text.lines()
            .find_map(|l| l.trim_start().strip_prefix(prefix))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| "-".into())
    };
    Wrk {
        rps: field("Requests/sec:").parse().unwrap_or(0.0),
        p50: field("50%"),
        p99: field("99%"),
        errors: text.contains("Socket errors") || text.contains("Non-2xx"),
        text,
    }
}

/// HAProxy in the appliance namespace: `mode tcp` on the appliance's
/// client-side address, roundrobin over the backends' :8080 with weights
/// 1:2:3 (the switchyard services' weights).
fn haproxy(bed: &mut Bed, dir: &std::path::Path) -> String {
    let mut cfg = format!(
        "global\n  maxconn 4096\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
         frontend web\n  bind {APPLIANCE_CLIENT_ADDR}:80\n  default_backend pool\nbackend pool\n  balance roundrobin\n"
    );
    for (i, addr) in BACKEND_ADDRS.iter().enumerate() {
        cfg += &format!("  server backend{} {addr}:8080 weight {}\n", i + 1, i + 1);
    }
    let path = dir.join("haproxy.cfg");
    std::fs::write(&path, cfg).expect("writing haproxy.cfg");
    bed.spawn("lb", &["haproxy", "-db", "-f", path.to_str().unwrap()]);
    // Wait (bounded) until it accepts.
    for _ in 0..50 {
        let ok = bed.exec(
            "cl",
            &[
                "curl",
                "-sS",
                "--max-time",
                "1",
                &format!("http://{APPLIANCE_CLIENT_ADDR}/"),
            ],
        );
        if ok.is_ok() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    format!("http://{APPLIANCE_CLIENT_ADDR}/")
}

fn demo(mode: &str) {
    println!("== building namespaces: client, appliance (l0 + bridge br0), backends b1..b3");
    let mut bed = Bed::build();
    let port = prepare(&mut bed, mode);
    let (inst, app) = afpacket_appliance(&bed, mode, port);
    println!(
        "== switchyard ({mode}) running in {} on AF_PACKET ports l0 and br0",
        bed.ns("lb")
    );
    println!("== 12 requests from the client namespace to http://198.18.0.10/ (weights 1:2:3):");
    for _ in 0..12 {
        match bed.exec(
            "cl",
            &["curl", "-sS", "--max-time", "5", "http://198.18.0.10/"],
        ) {
            Ok(o) => print!("  {}", String::from_utf8_lossy(&o.stdout)),
            Err(e) => println!("  error: {e}"),
        }
    }
    println!("== wrk -t2 -c64 -d5s through the VIP:");
    print!("{}", wrk(&bed, "http://198.18.0.10/", false, 5).text);
    println!("== shmdump");
    let out = std::process::Command::new(switchyard_tests::bin("shmdump"))
        .args(["--instance", &inst])
        .output();
    if let Ok(o) = out {
        print!("{}", String::from_utf8_lossy(&o.stdout));
    }
    drop(app);
    drop(bed);
    println!("== stopped; namespaces, processes and shared memory removed");
}

fn compare(secs: u32) {
    let dir = std::env::temp_dir().join(format!("switchyard-compare-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let paths = [
        ("direct to one backend (kernel routing)", "direct"),
        ("switchyard nat (afpacket)", "nat"),
        ("switchyard dr (afpacket)", "dr"),
        ("switchyard tunnel (afpacket)", "tunnel"),
        ("HAProxy 2.x mode tcp (same namespace)", "haproxy"),
    ];
    let mut rows: Vec<(&str, Wrk, Wrk)> = Vec::new();
    for (label, path) in paths {
        eprintln!("== {label}");
        let mut bed = Bed::build();
        let mut app = None;
        let url = match path {
            "direct" => {
                bed.exec("lb", &["sysctl", "-qw", "net.ipv4.ip_forward=1"])
                    .unwrap();
                switchyard_tests::netns::start_backends(
                    &mut bed,
                    |a| format!("{a}:8080"),
                    |a| format!("{a}:5353"),
                );
                format!("http://{}:8080/", BACKEND_ADDRS[0])
            }
            "haproxy" => {
                prepare(&mut bed, "nat");
                haproxy(&mut bed, &dir)
            }
            mode => {
                let port = prepare(&mut bed, mode);
                app = Some(afpacket_appliance(&bed, mode, port).1);
                "http://198.18.0.10/".to_string()
            }
        };
        let keep = wrk(&bed, &url, false, secs);
        let short = wrk(&bed, &url, true, secs);
        for w in [&keep, &short] {
            if w.errors {
                eprintln!("{}", w.text);
            }
        }
        rows.push((label, keep, short));
        drop(app);
    }
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "wrk -t2 -c64 -d{secs}s --latency from the client namespace; short = one request per connection\n"
    );
    println!(
        "| path | keep-alive req/s | p50 | p99 | ratio | short req/s | p50 | p99 | ratio | errors |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let (k0, s0) = (rows[0].1.rps.max(1.0), rows[0].2.rps.max(1.0));
    for (label, k, s) in &rows {
        println!(
            "| {label} | {:.0} | {} | {} | {:.2} | {:.0} | {} | {} | {:.2} | {} |",
            k.rps,
            k.p50,
            k.p99,
            k.rps / k0,
            s.rps,
            s.p50,
            s.p99,
            s.rps / s0,
            if k.errors || s.errors { "yes" } else { "none" }
        );
    }
}

fn main() {
    let mode = std::env::args().nth(1).unwrap_or_else(|| "nat".into());
    match mode.as_str() {
        "nat" | "dr" | "tunnel" => demo(&mode),
        "compare" => compare(
            std::env::args()
                .nth(2)
                .and_then(|v| v.parse().ok())
                .unwrap_or(5),
        ),
        _ => {
            eprintln!("usage: netns-demo [nat|dr|tunnel|compare [SECONDS]]");
            std::process::exit(2);
        }
    }
}
