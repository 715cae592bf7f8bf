//! shmdump: read-only inspection of a live or abandoned switchyard region.

use std::net::Ipv4Addr;
use std::process::ExitCode;
use std::sync::atomic::Ordering;

use clap::Parser;
use serde_json::{Value, json};
use shm_layout::config_slot::{
    BACKEND_CHECKED, BACKEND_DOWN, ON_DOWN_KEEP, ON_DOWN_RESCHEDULE, ON_DOWN_RESET,
};
use shm_layout::inspect::{
    ConnFilter, config_defects, conn_state_name, mode_name, proto_name, region_state_name,
    routing_defects, scan_conns, scheduler_name, switch_state_name,
};
use shm_layout::switch_slot::Counter;
use shm_layout::time::{mono_ns, pid_alive};
use shm_layout::{Access, FINGERPRINT, Region, Table, names};

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

fn ip(x: u32) -> String {
    Ipv4Addr::from(x).to_string()
}

fn mac(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A backend's health from its flags: unchecked backends are always up.
fn health(flags: u16) -> &'static str {
    if flags & BACKEND_CHECKED == 0 {
        "unchecked"
    } else if flags & BACKEND_DOWN != 0 {
        "down"
    } else {
        "up"
    }
}

fn on_down(p: u8) -> &'static str {
    match p {
        ON_DOWN_KEEP => "keep",
        ON_DOWN_RESCHEDULE => "reschedule",
        ON_DOWN_RESET => "reset",
        _ => "?",
    }
}

fn collect(r: &Region, a: &Args) -> Value {
    let h = r.header();
    let now = mono_ns();
    let controld_pid = h.controld_pid.load(Ordering::Relaxed);
    let state = region_state_name(h.state.load(Ordering::Acquire));
    let header = json!({
        "name": r.name(),
        "instance": names::get(&h.instance),
        "layout_version": h.version,
        "fingerprint": format!("{:#018x}", h.fingerprint),
        "bytes": h.total_len,
        "state": state,
        "controld_pid": controld_pid,
        "controld_alive": pid_alive(controld_pid),
        "abandoned": !pid_alive(controld_pid),
        "age_s": (now.saturating_sub(h.created_ns)) / 1_000_000_000,
        "capacities": {
            "services": h.caps.services, "backends": h.caps.backends, "backend_ids": h.caps.backend_ids,
            "connections": h.caps.conn_slots, "routes": h.caps.routes, "neighbours": h.caps.neighbours,
            "switches": h.caps.switches, "maglev_m": h.caps.maglev_m, "ring_slots": h.caps.ring_slots,
        },
    });

    // Private copies (tools acknowledge nothing: the publisher may rewrite
    // a slot while we read it; a copy is checked whole by its stamp).
    let ccopy = r.config_copy();
    let cfg = ccopy.config();
    let cw = r.pub_words(Table::Config);
    let counters = r.backend_counters();
    let services: Vec<Value> = cfg
        .services()
        .iter()
        .map(|s| {
            let table = cfg.service_table(s);
            // Sized by what the slot holds, never by a count read from it.
            let mut share = vec![0usize; cfg.service_backends(s).len()];
            for &e in table {
                if let Some(c) = share.get_mut(e as usize) {
                    *c += 1;
                }
            }
            let backends: Vec<Value> = cfg
                .service_backends(s)
                .iter()
                .enumerate()
                .map(|(i, b)| {
                    let c = counters.get(b.id as usize);
                    json!({
                        "name": names::get(&b.name), "id": b.id, "address": ip(b.ip), "port": b.port,
                        "weight": b.weight,
                        "health": health(b.flags),
                        "table_entries": share[i],
                        "table_share": if table.is_empty() { 0.0 } else { share[i] as f64 / table.len() as f64 },
                        "active_conns": c.map(|c| c.active.load(Ordering::Relaxed)).unwrap_or(0),
                        "total_conns": c.map(|c| c.total.load(Ordering::Relaxed)).unwrap_or(0),
                        "reconciled_down": c.map(|c| c.reconciled_down.load(Ordering::Relaxed)).unwrap_or(0),
                        "reconciled_up": c.map(|c| c.reconciled_up.load(Ordering::Relaxed)).unwrap_or(0),
                        "max_conns": b.max_conns, "max_conns_configured": b.max_conns_cfg,
                        "syn_ack_samples": c.map(|c| c.syn_ack_count.load(Ordering::Relaxed)).unwrap_or(0),
                        "syn_ack_slow": c.map(|c| c.syn_ack_slow.load(Ordering::Relaxed)).unwrap_or(0),
                        "syn_ack_mean_ms": c.map(|c| {
                            let n = c.syn_ack_count.load(Ordering::Relaxed);
                            c.syn_ack_sum_ms.load(Ordering::Relaxed) as f64 / n.max(1) as f64
                        }).unwrap_or(0.0),
                    })
                })
                .collect();
            json!({
                "name": names::get(&s.name), "vip": ip(s.vip), "port": s.port, "protocol": proto_name(s.proto),
                "mode": mode_name(s.mode), "scheduler": scheduler_name(s.scheduler), "table_size": table.len(),
                "on_backend_down": on_down(s.on_down), "queue_timeout_ms": s.queue_timeout_ms,
                "latency_target_ms": s.latency_target_ms, "backends": backends,
            })
        })
        .collect();
    let ports: Vec<Value> = cfg
        .ports()
        .iter()
        .enumerate()
        .map(|(i, p)| json!({"id": i, "name": names::get(&p.name), "mac": mac(p.mac)}))
        .collect();
    let config = json!({
        "generation": cw.generation.load(Ordering::Acquire),
        "active_slot": if ccopy.slot == 0 { "A" } else { "B" },
        "checksum_ok": ccopy.checksum_ok(),
        "excluded_switches_total": cw.excluded.load(Ordering::Relaxed),
        "refused_publications_total": cw.refused.load(Ordering::Relaxed),
        "timeouts_ms": {
            "tcp_syn": cfg.header.tcp_syn_ms, "tcp_established": cfg.header.tcp_established_ms,
            "tcp_fin": cfg.header.tcp_fin_ms, "udp": cfg.header.udp_ms,
        },
        "ports": ports,
        "services": services,
    });

    let rcopy = r.routing_copy();
    let rt = rcopy.routing();
    let rw = r.pub_words(Table::Routing);
    let routing = json!({
        "generation": rw.generation.load(Ordering::Acquire),
        "excluded_switches_total": rw.excluded.load(Ordering::Relaxed),
        "refused_publications_total": rw.refused.load(Ordering::Relaxed),
        "active_slot": if rcopy.slot == 0 { "A" } else { "B" },
        "checksum_ok": rcopy.checksum_ok(),
        "routes": rt.routes().iter().map(|x| json!({
            "prefix": format!("{}/{}", ip(x.prefix), x.len), "port": x.port,
            "via": if x.via == 0 { Value::Null } else { json!(ip(x.via)) },
        })).collect::<Vec<_>>(),
        "neighbours": rt.neighbours().iter().map(|n| json!({
            "address": ip(n.ip), "mac": mac(n.mac), "port": n.port, "valid": n.state == 1,
        })).collect::<Vec<_>>(),
    });

    let switches: Vec<Value> = r
        .switch_slots()
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let pid = s.pid.load(Ordering::Relaxed);
            let st = switch_state_name(s.state.load(Ordering::Acquire));
            let hb = s.heartbeat_ns.load(Ordering::Relaxed);
            let mut counters = serde_json::Map::new();
            for c in Counter::ALL {
                counters.insert(c.name().to_string(), json!(s.counter(*c)));
            }
            json!({
                "index": i, "pid": pid, "alive": pid_alive(pid), "cpu": s.cpu.load(Ordering::Relaxed),
                "state": st, "restarts": s.restarts.load(Ordering::Relaxed),
                "fenced": s.fenced.load(Ordering::Relaxed),
                "heartbeat_age_ms": if hb == 0 { Value::Null } else { json!(now.saturating_sub(hb) / 1_000_000) },
                "seen_config": s.seen_config.load(Ordering::Acquire),
                "seen_routing": s.seen_routing.load(Ordering::Acquire),
                "counters": counters,
            })
        })
        .collect();

    let filter = ConnFilter {
        vip: a.vip.map(u32::from),
        client: a.client.map(u32::from),
        backend_ip: a.backend.map(u32::from),
        backend_id: None,
        limit: if a.conns { a.limit } else { 0 },
    };
    let census = scan_conns(r, &cfg.header.timeouts(), &filter);
    let list: Vec<Value> = census
        .list
        .iter()
        .map(|x| {
            let c = &x.conn;
            json!({
                "slot": x.slot, "protocol": proto_name(c.proto), "mode": mode_name(c.mode),
                "client": format!("{}:{}", ip(c.client_ip), c.client_port),
                "vip": format!("{}:{}", ip(c.vip), c.vip_port),
                "backend": format!("{}:{}", ip(c.backend_ip), c.backend_port),
                "backend_id": c.backend_id,
                "state": conn_state_name(x.state),
                "midflow": x.midflow,
                "idle_ms": x.idle_ms,
                "expired": x.expired,
                "packets": x.packets,
                "bytes": x.bytes,
            })
        })
        .collect();
    let conns = json!({
        "slots": census.slots, "connections": census.connections, "reply_slots": census.reply_slots,
        "tombstones": census.tombstones, "busy_slots": census.busy_slots,
        "expired_not_collected": census.expired_not_collected,
        "provisional": census.provisional, "half_open": census.half_open, "list": list,
    });
    // What the clamped views above hid: counts the slots cannot hold.
    let defects: Vec<String> = config_defects(&cfg)
        .iter()
        .chain(routing_defects(&rt).iter())
        .map(ToString::to_string)
        .collect();
    json!({"header": header, "config": config, "routing": routing, "switches": switches, "connections": conns, "defects": defects})
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
    let v = collect(&r, &a);
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
