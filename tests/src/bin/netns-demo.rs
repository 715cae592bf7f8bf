//! The namespace demo: real clients and servers through switchyard on
//! AF_PACKET ports, in namespaces it creates and removes.
//! `netns-demo [nat|dr|tunnel|compare]` (root; needs iproute2, ethtool, curl, wrk).
//! `compare` runs wrk directly to one backend (kernel routing, no
//! switchyard), through NAT and through DR, in one run, and prints a table.

use switchyard_tests::netns::{BACKEND_ADDRS, Bed, afpacket_appliance, prepare};

/// Runs wrk in the client namespace; returns (requests/s, mean latency, text).
fn wrk(bed: &Bed, url: &str) -> (f64, String, String) {
    let text = match bed.exec("cl", &["wrk", "-t", "2", "-c", "64", "-d", "5s", url]) {
        Ok(o) => String::from_utf8_lossy(&o.stdout).to_string(),
        Err(e) => return (0.0, "-".into(), e),
    };
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    let lat = text
        .lines()
        .find(|l| l.trim_start().starts_with("Latency"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("-")
        .to_string();
    (rps, lat, text)
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
    print!("{}", wrk(&bed, "http://198.18.0.10/").2);
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

fn compare() {
    let mut rows = Vec::new();
    {
        let mut bed = Bed::build();
        bed.exec("lb", &["sysctl", "-qw", "net.ipv4.ip_forward=1"])
            .unwrap();
        switchyard_tests::netns::start_backends(
            &mut bed,
            |a| format!("{a}:8080"),
            |a| format!("{a}:5353"),
        );
        let (rps, lat, _) = wrk(&bed, &format!("http://{}:8080/", BACKEND_ADDRS[0]));
        rows.push(("direct to one backend (kernel routing)", rps, lat));
    }
    for mode in ["nat", "dr"] {
        let mut bed = Bed::build();
        let port = prepare(&mut bed, mode);
        let (_inst, app) = afpacket_appliance(&bed, mode, port);
        let (rps, lat, _) = wrk(&bed, "http://198.18.0.10/");
        rows.push((
            if mode == "nat" {
                "switchyard nat (afpacket)"
            } else {
                "switchyard dr (afpacket)"
            },
            rps,
            lat,
        ));
        drop(app);
    }
    let base = rows[0].1.max(1.0);
    println!("| path | requests/s | mean latency | ratio to direct |");
    println!("|---|---|---|---|");
    for (name, rps, lat) in &rows {
        println!("| {name} | {rps:.0} | {lat} | {:.2} |", rps / base);
    }
}

fn main() {
    let mode = std::env::args().nth(1).unwrap_or_else(|| "nat".into());
    match mode.as_str() {
        "nat" | "dr" | "tunnel" => demo(&mode),
        "compare" => compare(),
        _ => {
            eprintln!("usage: netns-demo [nat|dr|tunnel|compare]");
            std::process::exit(2);
        }
    }
}
