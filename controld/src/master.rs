//! The master: turns a validated configuration into a snapshot of what the
//! switches need (service and backend records with stable ids, Maglev
//! tables, ports, timeouts, routes and neighbours). Pure: no I/O.

use shm_layout::config_slot::{
    BACKEND_DRAINED, BackendRec, MODE_DR, MODE_NAT, MODE_TUNNEL, PortRec, SCHED_MAGLEV, ServiceRec,
};
use shm_layout::names;
use shm_layout::routing_slot::{NeighbourRec, RouteRec};

use crate::config::{Config, Mode, Scheduler};
use crate::ids::{BackendIdentity, IdAllocator};
use crate::maglev;

/// Everything published in one configuration generation.
#[derive(Clone, Debug, Default)]
pub struct ConfigSnapshot {
    pub services: Vec<ServiceRec>,
    pub backends: Vec<BackendRec>,
    /// One table per service (empty when no backend is eligible).
    pub tables: Vec<Vec<u16>>,
    pub ports: Vec<PortRec>,
    pub maglev_m: u32,
    pub tcp_syn_ms: u32,
    pub tcp_established_ms: u32,
    pub tcp_fin_ms: u32,
    pub udp_ms: u32,
    /// Outer source of IP-in-IP packets (0: no tunnel service).
    pub tunnel_src: u32,
}

/// Everything published in one routing generation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RoutingSnapshot {
    /// Longest prefix first.
    pub routes: Vec<RouteRec>,
    /// Sorted by address.
    pub neighbours: Vec<NeighbourRec>,
}

/// Builds the configuration snapshot, assigning backend ids with `ids`.
pub fn config_snapshot(cfg: &Config, ids: &mut IdAllocator) -> Result<ConfigSnapshot, String> {
    let m = cfg.limits.maglev_table_size;
    let mut identities = Vec::new();
    for s in &cfg.services {
        for b in &s.backends {
            identities.push(BackendIdentity {
                vip: s.vip,
                vport: s.port,
                proto: s.protocol.number(),
                addr: b.address,
                port: b.port,
            });
        }
    }
    let assigned = ids.assign(&identities)?;
    let mut snap = ConfigSnapshot {
        maglev_m: m,
        tcp_syn_ms: cfg.timeouts.tcp_syn.saturating_mul(1000),
        tcp_established_ms: cfg.timeouts.tcp_established.saturating_mul(1000),
        tcp_fin_ms: cfg.timeouts.tcp_fin.saturating_mul(1000),
        udp_ms: cfg.timeouts.udp.saturating_mul(1000),
        tunnel_src: cfg.tunnel.source.map_or(0, u32::from),
        ..Default::default()
    };
    for p in &cfg.ports {
        let mut rec = PortRec {
            mac: p.mac,
            mtu: p.mtu.min(u16::MAX as u32) as u16,
            ..Default::default()
        };
        names::set(&mut rec.name, &p.name);
        snap.ports.push(rec);
    }
    let mut next_id = assigned.into_iter();
    for (si, s) in cfg.services.iter().enumerate() {
        let start = snap.backends.len() as u32;
        let mut weighted = Vec::with_capacity(s.backends.len());
        for b in &s.backends {
            let mut rec = BackendRec {
                id: next_id.next().expect("one id per backend"),
                ip: u32::from(b.address),
                port: b.port,
                flags: if b.weight == 0 { BACKEND_DRAINED } else { 0 },
                weight: b.weight,
                service: si as u32,
                ..Default::default()
            };
            names::set(&mut rec.name, &b.name);
            snap.backends.push(rec);
            weighted.push((maglev::backend_key(b.address, b.port), b.weight));
        }
        let mut table = Vec::new();
        maglev::build(&weighted, m as usize, &mut table)
            .map_err(|e| format!("service {:?}: maglev table: {e}", s.name))?;
        let mut rec = ServiceRec {
            vip: u32::from(s.vip),
            port: s.port,
            proto: s.protocol.number(),
            mode: match s.mode {
                Mode::Nat => MODE_NAT,
                Mode::Dr => MODE_DR,
                Mode::Tunnel => MODE_TUNNEL,
            },
            scheduler: match s.scheduler {
                Scheduler::Maglev => SCHED_MAGLEV,
            },
            backend_start: start,
            backend_count: s.backends.len() as u32,
            table_start: si as u32 * m,
            table_len: table.len() as u32,
            ..Default::default()
        };
        names::set(&mut rec.name, &s.name);
        snap.services.push(rec);
        snap.tables.push(table);
    }
    Ok(snap)
}

/// Builds the routing snapshot from static routes and neighbours alone
/// (see [`crate::routing::table::build`] for the merge with the kernel's).
pub fn routing_snapshot(cfg: &Config) -> RoutingSnapshot {
    crate::routing::table::build(cfg, &Default::default()).snapshot
}
