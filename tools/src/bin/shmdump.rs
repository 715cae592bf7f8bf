//! shmdump: read-only inspection of a live or abandoned switchyard region.

use std::net::Ipv4Addr;
use std::process::ExitCode;

use clap::Parser;
use serde_json::Value;
use shm_layout::{Access, FINGERPRINT, Region};
use tools::shmdump::{Query, collect};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Inspect a switchyard shared-memory region (read-only)"
)]
struct Args {
    /// Instance name (region /dev/shm/switchyard.<instance>).
    #[arg(long, short = 'i', default_value = "demo")]
    instance: String,
    /// Print JSON instead of tables.
    #[arg(long)]
    json: bool,
    /// List connections (otherwise only counted).
    #[arg(long)]
    conns: bool,
    /// Only connections to this VIP.
    #[arg(long)]
    vip: Option<Ipv4Addr>,
    /// Only connections from this client address.
    #[arg(long)]
    client: Option<Ipv4Addr>,
    /// Only connections to this backend address.
    #[arg(long)]
    backend: Option<Ipv4Addr>,
    /// At most this many connections listed.
    #[arg(long, default_value_t = 100)]
    limit: usize,
}

/// A JSON value as plain text (strings unquoted, null as "-").
fn t(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() => format!("{f:.2}"),
            _ => n.to_string(),
        },
        other => other.to_string(),
    }
}

fn print_text(v: &Value, a: &Args) {
    let h = &v["header"];
    println!(
        "region {}  instance {}  layout v{} fingerprint {}  {} MiB  state {}  controld pid {} ({})",
        h["name"].as_str().unwrap_or(""),
        h["instance"].as_str().unwrap_or(""),
        h["layout_version"],
        h["fingerprint"].as_str().unwrap_or(""),
        h["bytes"].as_u64().unwrap_or(0) >> 20,
        h["state"].as_str().unwrap_or(""),
        h["controld_pid"],
        if h["controld_alive"].as_bool() == Some(true) {
            "alive"
        } else {
            "ABANDONED"
        },
    );
    let c = &v["config"];
    println!(
        "config generation {} (slot {}, checksum {})  routing generation {} (slot {}, checksum {})  excluded and fenced switches {}  publications refused {}",
        c["generation"],
        c["active_slot"].as_str().unwrap_or(""),
        if c["checksum_ok"].as_bool() == Some(true) {
            "ok"
        } else {
            "MISMATCH"
        },
        v["routing"]["generation"],
        v["routing"]["active_slot"].as_str().unwrap_or(""),
        if v["routing"]["checksum_ok"].as_bool() == Some(true) {
            "ok"
        } else {
            "MISMATCH"
        },
        c["excluded_switches_total"].as_u64().unwrap_or(0)
            + v["routing"]["excluded_switches_total"]
                .as_u64()
                .unwrap_or(0),
        c["refused_publications_total"].as_u64().unwrap_or(0)
            + v["routing"]["refused_publications_total"]
                .as_u64()
                .unwrap_or(0),
    );
    println!();
    println!(
        "{:<14} {:<22} {:<5} {:<6}  {:<12} {:<22} {:>6} {:<9} {:>8} {:>9} {:>10} {:>9} {:>9}",
        "SERVICE",
        "VIP",
        "PROTO",
        "MODE",
        "BACKEND",
        "ADDRESS",
        "WEIGHT",
        "HEALTH",
        "SHARE%",
        "ACTIVE",
        "TOTAL",
        "MAXCONN",
        "SYNACK_MS"
    );
    for s in c["services"].as_array().into_iter().flatten() {
        println!(
            "{:<14} {:<22} {:<5} {:<6}  scheduler={} on_backend_down={} queue_timeout_ms={} latency_target_ms={}",
            s["name"].as_str().unwrap_or(""),
            format!("{}:{}", s["vip"].as_str().unwrap_or(""), s["port"]),
            s["protocol"].as_str().unwrap_or(""),
            s["mode"].as_str().unwrap_or(""),
            s["scheduler"].as_str().unwrap_or(""),
            s["on_backend_down"].as_str().unwrap_or(""),
            s["queue_timeout_ms"],
            s["latency_target_ms"],
        );
        for b in s["backends"].as_array().into_iter().flatten() {
            println!(
                "{:<50} {:<12} {:<22} {:>6} {:<9} {:>8.2} {:>9} {:>10} {:>9} {:>9.1}",
                "",
                b["name"].as_str().unwrap_or(""),
                format!("{}:{}", b["address"].as_str().unwrap_or(""), b["port"]),
                t(&b["weight"]),
                b["health"].as_str().unwrap_or("").to_uppercase(),
                b["table_share"].as_f64().unwrap_or(0.0) * 100.0,
                t(&b["active_conns"]),
                t(&b["total_conns"]),
                format!("{}/{}", t(&b["max_conns"]), t(&b["max_conns_configured"])),
                b["syn_ack_mean_ms"].as_f64().unwrap_or(0.0),
            );
        }
    }
    println!();
    println!("ROUTES");
    for rt in v["routing"]["routes"].as_array().into_iter().flatten() {
        println!(
            "  {:<20} port {} via {}",
            rt["prefix"].as_str().unwrap_or(""),
            t(&rt["port"]),
            t(&rt["via"])
        );
    }
    println!("NEIGHBOURS");
    for n in v["routing"]["neighbours"].as_array().into_iter().flatten() {
        println!(
            "  {:<16} {} port {}",
            n["address"].as_str().unwrap_or(""),
            n["mac"].as_str().unwrap_or(""),
            t(&n["port"])
        );
    }
    println!();
    println!(
        "{:<3} {:>8} {:<6} {:>3} {:<9} {:>8} {:>6} {:>6} {:>12} {:>12} {:>10} {:>10} {:>8} {:>6}",
        "SW",
        "PID",
        "ALIVE",
        "CPU",
        "STATE",
        "HB_MS",
        "CFG",
        "RT",
        "RX",
        "TX",
        "NEW",
        "DROPS",
        "RESTARTS",
        "FENCED"
    );
    for s in v["switches"].as_array().into_iter().flatten() {
        if s["state"] == "empty" {
            continue;
        }
        let k = &s["counters"];
        let drops: u64 = k
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(n, _)| n.starts_with("drop_"))
            .map(|(_, v)| v.as_u64().unwrap_or(0))
            .sum();
        println!(
            "{:<3} {:>8} {:<6} {:>3} {:<9} {:>8} {:>6} {:>6} {:>12} {:>12} {:>10} {:>10} {:>8} {:>6}",
            t(&s["index"]),
            t(&s["pid"]),
            t(&s["alive"]),
            t(&s["cpu"]),
            s["state"].as_str().unwrap_or(""),
            t(&s["heartbeat_age_ms"]),
            t(&s["seen_config"]),
            t(&s["seen_routing"]),
            t(&k["rx_packets"]),
            t(&k["tx_packets"]),
            t(&k["conn_new"]),
            drops,
            t(&s["restarts"]),
            t(&s["fenced"]),
        );
        let nonzero: Vec<String> = k
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(n, _)| {
                n.starts_with("drop_")
                    || *n == "rst_sent"
                    || *n == "arp_replies"
                    || *n == "conn_midflow"
                    || *n == "torn_bursts"
                    || n.starts_with("down_")
            })
            .filter(|(_, v)| v.as_u64().unwrap_or(0) > 0)
            .map(|(n, v)| format!("{n}={v}"))
            .collect();
        if !nonzero.is_empty() {
            println!("    {}", nonzero.join(" "));
        }
    }
    let ct = &v["connections"];
    println!();
    println!(
        "CONNECTIONS {} in {} slots (reply slots {}, tombstones {}, busy {}, expired awaiting GC {})",
        ct["connections"],
        ct["slots"],
        ct["reply_slots"],
        ct["tombstones"],
        ct["busy_slots"],
        ct["expired_not_collected"]
    );
    if a.conns {
        println!(
            "{:<5} {:<22} {:<22} {:<22} {:<12} {:>8} {:>10}",
            "PROTO", "CLIENT", "VIP", "BACKEND", "STATE", "IDLE_MS", "PACKETS"
        );
        for c in ct["list"].as_array().into_iter().flatten() {
            println!(
                "{:<5} {:<22} {:<22} {:<22} {:<12} {:>8} {:>10}",
                c["protocol"].as_str().unwrap_or(""),
                c["client"].as_str().unwrap_or(""),
                c["vip"].as_str().unwrap_or(""),
                c["backend"].as_str().unwrap_or(""),
                c["state"].as_str().unwrap_or(""),
                t(&c["idle_ms"]),
                t(&c["packets"]),
            );
        }
    }
}

fn main() -> ExitCode {
    let a = Args::parse();
    let r = match Region::attach(&a.instance, Access::ReadOnly) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("shmdump: {e}");
            if matches!(e, shm_layout::RegionError::Fingerprint { .. }) {
                eprintln!("shmdump: this shmdump's fingerprint is {FINGERPRINT:#018x}");
            }
            return ExitCode::from(2);
        }
    };
    let query = Query {
        conns: a.conns,
        vip: a.vip,
        client: a.client,
        backend: a.backend,
        limit: a.limit,
    };
    let v = collect(&r, &query);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v).expect("json"));
    } else {
        print_text(&v, &a);
    }
    // The output above is clamped to the slots' capacities; a corrupted
    // count is named here and makes the exit status say so.
    let defects = v["defects"].as_array().map_or(&[][..], |d| d.as_slice());
    for d in defects {
        eprintln!("shmdump: region corrupt: {}", d.as_str().unwrap_or(""));
    }
    if defects.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(3)
    }
}
