//! shmdump's reading of a region: everything it shows, collected as JSON
//! from a read-only [`Region`] (the binary parses arguments and prints).
//! A region is input from another process, possibly corrupted or hostile:
//! nothing here trusts a count read from it (see [`collect`]), and the
//! `shmdump_region` fuzz target drives [`collect`] over corrupted regions.

use std::net::Ipv4Addr;
use std::sync::atomic::Ordering;

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
use shm_layout::{Region, Table, names};

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

/// What to list besides the summary: `shmdump --conns --vip ... --limit N`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Query {
    /// List connections (otherwise only counted).
    pub conns: bool,
    /// Only connections to this VIP.
    pub vip: Option<Ipv4Addr>,
    /// Only connections from this client address.
    pub client: Option<Ipv4Addr>,
    /// Only connections to this backend address.
    pub backend: Option<Ipv4Addr>,
    /// At most this many connections listed.
    pub limit: usize,
}

/// Everything shmdump shows of region `r`, as JSON: header, active
/// configuration and routing slots (private copies), switch slots and a
/// census of the connection table. Every list is sized by what the
/// region's sections hold, never by a count read from the region; a count
/// or range the sections cannot hold is named in `"defects"` instead.
pub fn collect(r: &Region, a: &Query) -> Value {
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use shm_layout::shm::Mapping;
    use shm_layout::{Capacities, config_slot::PROTO_TCP, publish::cannot_fence};

    use super::*;

    /// A small region, unlinked from /dev/shm at once (the mapping stays).
    fn region(tag: &str) -> Region {
        let inst = format!("shmdump-{tag}-{}", std::process::id());
        let caps = Capacities {
            conn_slots: 1024,
            services: 2,
            backends: 4,
            backend_ids: 16,
            maglev_m: 251,
            switches: 1,
            routes: 4,
            neighbours: 4,
            ..Default::default()
        };
        let r = Region::create(&inst, caps).unwrap();
        Mapping::unlink(r.name()).unwrap();
        r
    }

    /// A published service claiming 2^32-1 backends (one corrupted count
    /// word): collect lists what the slot holds and names the defect; it
    /// once sized a buffer by the count and aborted allocating 34 GB.
    #[test]
    fn a_corrupted_backend_count_gives_bounded_output_and_a_defect() {
        let r = region("count");
        r.publish_config(Duration::from_millis(100), &mut cannot_fence, |s| {
            s.header.n_services = 1;
            s.header.n_backends = 2;
            s.services[0].vip = 0xc612_000a;
            s.services[0].port = 80;
            s.services[0].proto = PROTO_TCP;
            s.services[0].backend_start = 0;
            s.services[0].backend_count = u32::MAX;
            for (i, b) in s.backends[..2].iter_mut().enumerate() {
                b.id = i as u32;
                b.ip = 0xc613_0101 + i as u32;
                b.port = 8080;
            }
        })
        .unwrap();
        let v = collect(&r, &Query::default());
        let services = v["config"]["services"].as_array().unwrap();
        assert_eq!(services.len(), 1);
        assert_eq!(services[0]["vip"], "198.18.0.10");
        assert_eq!(services[0]["backends"], json!([]));
        assert_eq!(
            v["defects"],
            json!([
                "config: service 0: backend_count 4294967295 (from backend_start 0) exceeds the slot's 2 backends"
            ])
        );
        assert!(v.to_string().len() < 64 << 10, "{}", v.to_string().len());
    }
}
