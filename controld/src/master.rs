//! The master: turns a validated configuration and the operator's runtime
//! overrides into a snapshot of what the switches need (service and backend
//! records with stable ids and effective weights, Maglev tables, ports,
//! timeouts, routes and neighbours). Pure: no I/O.

use shm_layout::config_slot::{
    BACKEND_DRAINED, BackendRec, MODE_DR, MODE_NAT, MODE_TUNNEL, PortRec, SCHED_MAGLEV, ServiceRec,
};
use shm_layout::names;
use shm_layout::routing_slot::{NEIGH_VALID, NeighbourRec, RouteRec};

use crate::config::{Config, Mode, Scheduler};
use crate::ids::{BackendIdentity, IdAllocator};
use crate::maglev;
use crate::overrides::Overrides;

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
/// Each backend's record carries its effective weight (the file's, or the
/// override's; 0 and `BACKEND_DRAINED` when drained), and its service's
/// table is built with those weights (see [`crate::overrides`]).
pub fn config_snapshot(
    cfg: &Config,
    ids: &mut IdAllocator,
    overrides: &Overrides,
) -> Result<ConfigSnapshot, String> {
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
            let eff = overrides.effective(&s.name, &b.name, b.weight);
            let mut rec = BackendRec {
                id: next_id.next().expect("one id per backend"),
                ip: u32::from(b.address),
                port: b.port,
                flags: if eff.weight == 0 { BACKEND_DRAINED } else { 0 },
                weight: eff.weight,
                service: si as u32,
                ..Default::default()
            };
            names::set(&mut rec.name, &b.name);
            snap.backends.push(rec);
            weighted.push((maglev::backend_key(b.address, b.port), eff.weight));
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

/// Builds the routing snapshot from static routes and neighbours.
pub fn routing_snapshot(cfg: &Config) -> RoutingSnapshot {
    let mut routes: Vec<RouteRec> = cfg
        .routes
        .iter()
        .map(|r| RouteRec {
            prefix: u32::from(r.prefix),
            len: r.prefix_len,
            port: r.port as u32,
            via: r.via.map(u32::from).unwrap_or(0),
            ..Default::default()
        })
        .collect();
    routes.sort_by(|a, b| b.len.cmp(&a.len).then(a.prefix.cmp(&b.prefix)));
    let mut neighbours: Vec<NeighbourRec> = cfg
        .neighbours
        .iter()
        .map(|n| NeighbourRec {
            ip: u32::from(n.address),
            port: n.port as u32,
            mac: n.mac,
            state: NEIGH_VALID,
            ..Default::default()
        })
        .collect();
    neighbours.sort_by_key(|n| n.ip);
    RoutingSnapshot { routes, neighbours }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        let mut text = String::from(
            "instance = \"t\"\n[limits]\nmaglev_table_size = 251\n\
             [[port]]\nname = \"p\"\ndriver = \"vnic\"\nmac = \"02:00:00:00:00:01\"\n\
             [[switch]]\nname = \"s\"\ncpu = 0\nports = [\"p\"]\n\
             [[service]]\nname = \"web\"\nvip = \"198.18.0.10\"\nport = 80\nprotocol = \"tcp\"\n",
        );
        for (i, w) in [1, 2, 3].iter().enumerate() {
            text += &format!(
                "[[service.backend]]\nname = \"web{}\"\naddress = \"198.19.1.{}\"\nweight = {w}\n",
                i + 1,
                i + 1
            );
        }
        crate::config::parse(&text).unwrap()
    }

    fn entries(snap: &ConfigSnapshot) -> Vec<usize> {
        let mut n = vec![0; snap.backends.len()];
        for &e in &snap.tables[0] {
            n[e as usize] += 1;
        }
        n
    }

    fn table_for(weights: &[u32]) -> Vec<u16> {
        let keys: Vec<(u64, u32)> = weights
            .iter()
            .enumerate()
            .map(|(i, &w)| {
                let a = std::net::Ipv4Addr::new(198, 19, 1, i as u8 + 1);
                (maglev::backend_key(a, 80), w)
            })
            .collect();
        let mut t = Vec::new();
        maglev::build(&keys, 251, &mut t).unwrap();
        t
    }

    #[test]
    fn overrides_set_effective_weights_flags_and_the_table() {
        let cfg = config();
        let mut ids = IdAllocator::new(64);
        let plain = config_snapshot(&cfg, &mut ids, &Overrides::default()).unwrap();
        assert_eq!(plain.tables[0], table_for(&[1, 2, 3]));
        let w: Vec<u32> = plain.backends.iter().map(|b| b.weight).collect();
        assert_eq!(w, [1, 2, 3]);

        let mut o = Overrides::default();
        o.drain("web", "web1");
        o.set_weight("web", "web3", Some(9));
        let snap = config_snapshot(&cfg, &mut ids, &o).unwrap();
        assert_eq!(snap.tables[0], table_for(&[0, 2, 9]));
        assert_eq!(entries(&snap)[0], 0, "a drained backend leaves the table");
        let recs: Vec<(u32, u16)> = snap.backends.iter().map(|b| (b.weight, b.flags)).collect();
        assert_eq!(recs, [(0, BACKEND_DRAINED), (2, 0), (9, 0)]);
        // Ids are stable whatever the overrides.
        let id = |s: &ConfigSnapshot| s.backends.iter().map(|b| b.id).collect::<Vec<_>>();
        assert_eq!(id(&snap), id(&plain));
        // Overrides of unknown backends change nothing.
        let mut other = Overrides::default();
        other.drain("dns", "web1");
        let snap = config_snapshot(&cfg, &mut ids, &other).unwrap();
        assert_eq!(snap.tables[0], plain.tables[0]);
    }
}
