//! The master: turns a validated configuration, the operator's runtime
//! overrides, the backends' health and the load agents' steering into a
//! snapshot of what the switches need (service and backend records with
//! stable ids and effective weights,
//! Maglev tables over the eligible backends, the policy for DOWN backends'
//! connections, ports, timeouts, routes and neighbours). Pure: no I/O.

use shm_layout::config_slot::{
    BACKEND_CHECKED, BACKEND_DOWN, BACKEND_DRAINED, BackendRec, MODE_DR, MODE_L7, MODE_NAT,
    MODE_TUNNEL, ON_DOWN_KEEP, ON_DOWN_RESCHEDULE, ON_DOWN_RESET, PortRec, SCHED_MAGLEV, SCHED_SH,
    SCHED_WLC, SCHED_WRR, SVC_SYN_PROXY, SVC_SYN_PROXY_AUTO, ServiceRec,
};
use shm_layout::names;
use shm_layout::routing_slot::{NeighbourRec, RouteRec};

use std::net::Ipv4Addr;

use crate::agents::{Steer, effective_weight};
use crate::config::{Config, Mode, OnDown, Scheduler, SynProxy};
use crate::ids::{BackendIdentity, IdAllocator, IdError};
use crate::maglev;
use crate::overrides::Overrides;

/// Everything published in one configuration generation.
/// Why a configuration snapshot could not be built.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(transparent)]
    Ids(#[from] IdError),
    #[error("service {service:?}: maglev table: {error}")]
    Maglev {
        service: String,
        error: maglev::MaglevError,
    },
}

#[derive(Clone, Debug, Default)]
pub struct ConfigSnapshot {
    pub services: Vec<ServiceRec>,
    pub backends: Vec<BackendRec>,
    /// One table per service (empty when no backend is eligible).
    pub tables: Vec<Vec<u16>>,
    /// `(backend id, ON_DOWN_* action)` of DOWN backends whose service does
    /// not keep their connections (every other id's action is keep).
    pub down_actions: Vec<(u32, u8)>,
    pub ports: Vec<PortRec>,
    pub maglev_m: u32,
    pub tcp_syn_ms: u32,
    pub tcp_provisional_ms: u32,
    pub tcp_established_ms: u32,
    pub tcp_fin_ms: u32,
    pub udp_ms: u32,
    /// Outer source of IP-in-IP packets (0: no tunnel service).
    pub tunnel_src: u32,
    /// `[limits] syn_proxy_auto_syn_rate`.
    pub syn_proxy_auto_syn_rate: u32,
    /// `[limits] syn_proxy_auto_occupancy`, in per mille of the table's
    /// slots (see `ConfigHeader::syn_proxy_auto_occupancy_permille`).
    pub syn_proxy_auto_occupancy_permille: u32,
    /// SYN cookie secrets `[current, previous]`: not from the file; the
    /// appliance sets them (see `crate::appliance::cookies`).
    pub cookie_secrets: [[u64; 2]; 2],
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
/// `is_down` says which checked backends failed their health checks: they
/// keep their records (flagged DOWN) but leave their service's table, like
/// a drained backend, and their connections get the service's policy.
/// `steer` says how the load agent at a backend's address steers its
/// weight (see [`crate::agents::rule`]): the record carries the effective
/// weight, flagged drained when it is 0, and the table is built with it.
/// `limit` gives a backend's effective `max_conns` under controlled loading
/// (`None`: its configured one).
pub fn config_snapshot(
    cfg: &Config,
    ids: &mut IdAllocator,
    overrides: &Overrides,
    is_down: impl Fn(&BackendIdentity) -> bool,
    steer: impl Fn(Ipv4Addr) -> Steer,
    limit: impl Fn(&BackendIdentity) -> Option<u32>,
) -> Result<ConfigSnapshot, SnapshotError> {
    let m = cfg.limits.maglev_table_size;
    let mut identities = Vec::new();
    for s in &cfg.services {
        for b in &s.backends {
            identities.push(BackendIdentity::of(s, b));
        }
    }
    let assigned = ids.assign(&identities)?;
    let mut snap = ConfigSnapshot {
        maglev_m: m,
        tcp_syn_ms: cfg.timeouts.tcp_syn.saturating_mul(1000),
        tcp_provisional_ms: cfg.timeouts.tcp_provisional.saturating_mul(1000),
        tcp_established_ms: cfg.timeouts.tcp_established.saturating_mul(1000),
        tcp_fin_ms: cfg.timeouts.tcp_fin.saturating_mul(1000),
        udp_ms: cfg.timeouts.udp.saturating_mul(1000),
        tunnel_src: cfg.tunnel.source.map_or(0, u32::from),
        syn_proxy_auto_syn_rate: cfg.limits.syn_proxy_auto_syn_rate,
        // The percent of `connections` as a share of the table's slots:
        // four slots per connection, two used by a NAT connection.
        syn_proxy_auto_occupancy_permille: cfg.limits.syn_proxy_auto_occupancy * 5,
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
    let mut next = assigned.into_iter().zip(&identities);
    for (si, s) in cfg.services.iter().enumerate() {
        let start = snap.backends.len() as u32;
        let on_down = match s.on_backend_down {
            OnDown::Keep => ON_DOWN_KEEP,
            OnDown::Reschedule => ON_DOWN_RESCHEDULE,
            OnDown::Reset => ON_DOWN_RESET,
        };
        let mut weighted = Vec::with_capacity(s.backends.len());
        for b in &s.backends {
            let (id, ident) = next.next().expect("one id per backend");
            let checked = b.health.is_some();
            let down = checked && is_down(ident);
            // The operator's override sets the base (0 when drained); the
            // load agent at the backend's address steers it.
            let eff = overrides.effective(&s.name, &b.name, b.weight);
            let weight = effective_weight(eff.weight, steer(b.address));
            let mut flags = 0;
            if weight == 0 {
                flags |= BACKEND_DRAINED;
            }
            if checked {
                flags |= BACKEND_CHECKED;
            }
            if down {
                flags |= BACKEND_DOWN;
                if on_down != ON_DOWN_KEEP {
                    snap.down_actions.push((id, on_down));
                }
            }
            let mut rec = BackendRec {
                id,
                ip: u32::from(b.address),
                port: b.port,
                flags,
                weight,
                service: si as u32,
                max_conns: limit(ident).unwrap_or(b.max_conns),
                max_conns_cfg: b.max_conns,
                ..Default::default()
            };
            names::set(&mut rec.name, &b.name);
            snap.backends.push(rec);
            let eligible = if down { 0 } else { weight };
            weighted.push((maglev::backend_key(b.address, b.port), eligible));
        }
        let mut table = Vec::new();
        maglev::build(&weighted, m as usize, &mut table).map_err(|error| {
            SnapshotError::Maglev {
                service: s.name.clone(),
                error,
            }
        })?;
        let mut rec = ServiceRec {
            vip: u32::from(s.vip),
            port: s.port,
            proto: s.protocol.number(),
            mode: match s.mode {
                Mode::Nat => MODE_NAT,
                Mode::Dr => MODE_DR,
                Mode::Tunnel => MODE_TUNNEL,
                Mode::L7 => MODE_L7,
            },
            scheduler: match s.scheduler {
                Scheduler::Maglev => SCHED_MAGLEV,
                Scheduler::Wrr => SCHED_WRR,
                Scheduler::Wlc => SCHED_WLC,
                Scheduler::Sh => SCHED_SH,
            },
            queue_timeout_ms: s.queue_timeout_ms.min(u16::MAX as u32) as u16,
            latency_target_ms: s
                .loading
                .map_or(0, |l| l.latency_target_ms.min(u16::MAX as u32) as u16),
            on_down,
            flags: match s.syn_proxy {
                SynProxy::Off => 0,
                SynProxy::On => SVC_SYN_PROXY,
                SynProxy::Auto => SVC_SYN_PROXY_AUTO,
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

/// The snapshot of the file alone: no runtime overrides, every backend up,
/// no agent steering, the configured limits (`controld --check`, tests).
pub fn file_snapshot(cfg: &Config, ids: &mut IdAllocator) -> Result<ConfigSnapshot, SnapshotError> {
    config_snapshot(
        cfg,
        ids,
        &Overrides::default(),
        |_| false,
        |_| Steer::Configured,
        |_| None,
    )
}

/// Builds the routing snapshot from static routes and neighbours alone
/// (see [`crate::routing::table::build`] for the merge with the kernel's).
pub fn routing_snapshot(cfg: &Config) -> RoutingSnapshot {
    crate::routing::table::build(cfg, &Default::default()).snapshot
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `config_snapshot` with no overrides and the configured limits: what
    /// health (`is_down`) and the agents (`steer`) make of the file.
    fn judged(
        cfg: &Config,
        ids: &mut IdAllocator,
        is_down: impl Fn(&BackendIdentity) -> bool,
        steer: impl Fn(Ipv4Addr) -> Steer,
    ) -> ConfigSnapshot {
        config_snapshot(cfg, ids, &Overrides::default(), is_down, steer, |_| None).unwrap()
    }

    /// Service "web" (policy `on_down`) with three backends, web1 and web2
    /// checked, web3 not; service "dns" keeps connections, one checked backend.
    fn config(on_down: &str) -> Config {
        let mut text = format!(
            "instance = \"t\"\n[limits]\nmaglev_table_size = 251\n\
             [[port]]\nname = \"p\"\ndriver = \"vnic\"\nmac = \"02:00:00:00:00:01\"\n\
             [[switch]]\nname = \"s\"\ncpu = 0\nports = [\"p\"]\n\
             [[service]]\nname = \"web\"\nvip = \"198.18.0.10\"\nport = 80\nprotocol = \"tcp\"\n\
             on_backend_down = \"{on_down}\"\n"
        );
        for i in 1..=3 {
            text +=
                &format!("[[service.backend]]\nname = \"web{i}\"\naddress = \"198.19.1.{i}\"\n");
            if i < 3 {
                text += "[service.backend.health]\nkind = \"tcp\"\n";
            }
        }
        text += "[[service]]\nname = \"dns\"\nvip = \"198.18.0.10\"\nport = 53\nprotocol = \"udp\"\n\
                 on_backend_down = \"keep\"\n[service.health]\nkind = \"udp\"\n\
                 [[service.backend]]\nname = \"dns1\"\naddress = \"198.19.1.1\"\n";
        crate::config::parse(&text).unwrap()
    }

    #[test]
    fn down_backends_leave_the_table_keep_their_record_and_get_the_policy() {
        let cfg = config("reset");
        let mut ids = IdAllocator::new(64);
        let all_up = file_snapshot(&cfg, &mut ids).unwrap();
        // Everything "down" by the health view: only checked backends are.
        let snap = judged(&cfg, &mut ids, |_| true, |_| Steer::Configured);
        let flags: Vec<u16> = snap.backends.iter().map(|b| b.flags).collect();
        assert_eq!(
            flags,
            [
                BACKEND_CHECKED | BACKEND_DOWN,
                BACKEND_CHECKED | BACKEND_DOWN,
                0,
                BACKEND_CHECKED | BACKEND_DOWN
            ]
        );
        let ids_of: Vec<u32> = snap.backends.iter().map(|b| b.id).collect();
        assert_eq!(
            ids_of,
            all_up.backends.iter().map(|b| b.id).collect::<Vec<_>>(),
            "ids are stable across health changes"
        );
        // web: only web3 (index 2) is eligible; dns: no eligible backend.
        assert_eq!(snap.tables[0].len(), 251);
        assert!(snap.tables[0].iter().all(|&e| e == 2));
        assert!(snap.tables[1].is_empty());
        assert_eq!(
            (snap.services[0].on_down, snap.services[1].on_down),
            (ON_DOWN_RESET, ON_DOWN_KEEP)
        );
        // dns keeps its connections: no action for its id.
        assert_eq!(
            snap.down_actions,
            [(ids_of[0], ON_DOWN_RESET), (ids_of[1], ON_DOWN_RESET)]
        );
        assert!(all_up.down_actions.is_empty());
        assert!(all_up.tables[0].contains(&0) && all_up.tables[0].contains(&1));
    }

    #[test]
    fn scheduler_queue_and_limits_reach_the_records() {
        let text = "instance = \"t\"\n[limits]\nmaglev_table_size = 251\n\
             [[port]]\nname = \"p\"\ndriver = \"vnic\"\nmac = \"02:00:00:00:00:01\"\n\
             [[switch]]\nname = \"s\"\ncpu = 0\nports = [\"p\"]\n\
             [[service]]\nname = \"web\"\nvip = \"198.18.0.10\"\nport = 80\nprotocol = \"tcp\"\n\
             scheduler = \"sh\"\nqueue_timeout_ms = 300\nlatency_target_ms = 70\n\
             [[service.backend]]\nname = \"a\"\naddress = \"198.19.1.1\"\nmax_conns = 9\n\
             [[service.backend]]\nname = \"b\"\naddress = \"198.19.1.2\"\nweight = 0\n";
        let cfg = crate::config::parse(text).unwrap();
        let mut ids = IdAllocator::new(64);
        let snap = config_snapshot(
            &cfg,
            &mut ids,
            &Overrides::default(),
            |_| false,
            |_| Steer::Configured,
            |b| (b.addr == std::net::Ipv4Addr::new(198, 19, 1, 1)).then_some(4),
        )
        .unwrap();
        let s = &snap.services[0];
        assert_eq!(
            (s.scheduler, s.queue_timeout_ms, s.latency_target_ms),
            (SCHED_SH, 300, 70)
        );
        let b: Vec<(u32, u32, u16)> = snap
            .backends
            .iter()
            .map(|b| (b.max_conns, b.max_conns_cfg, b.flags))
            .collect();
        assert_eq!(b, [(4, 9, 0), (0, 0, BACKEND_DRAINED)]);
        // Weight 0: no table entry, whatever the scheduler reads the table with.
        assert!(snap.tables[0].iter().all(|&e| e == 0));
    }

    #[test]
    fn a_down_backend_gets_no_table_entry_and_its_peers_take_them() {
        let cfg = config("reschedule");
        let mut ids = IdAllocator::new(64);
        let before = file_snapshot(&cfg, &mut ids).unwrap();
        let web2 = BackendIdentity {
            vip: "198.18.0.10".parse().unwrap(),
            vport: 80,
            proto: 6,
            addr: "198.19.1.2".parse().unwrap(),
            port: 80,
        };
        let after = judged(&cfg, &mut ids, |b| *b == web2, |_| Steer::Configured);
        assert_eq!(
            after.down_actions,
            [(before.backends[1].id, ON_DOWN_RESCHEDULE)]
        );
        assert_eq!(after.tables[0].len(), 251);
        assert!(!after.tables[0].contains(&1));
        assert!(after.tables[0].contains(&0) && after.tables[0].contains(&2));
        assert_eq!(
            after.tables[1], before.tables[1],
            "other services unchanged"
        );
    }

    #[test]
    fn agent_steering_scales_weights_drains_and_yields_to_health() {
        let cfg = config("reschedule");
        let mut ids = IdAllocator::new(64);
        let at = |last: u8| Ipv4Addr::new(198, 19, 1, last);
        // web1 (198.19.1.1, also dns1's address) drains; web2 at 30 %.
        let steer = |a: Ipv4Addr| match a {
            a if a == at(1) => Steer::Drain,
            a if a == at(2) => Steer::Factor(300),
            _ => Steer::Configured,
        };
        let snap = judged(&cfg, &mut ids, |_| false, steer);
        let w: Vec<(u32, u16)> = snap.backends.iter().map(|b| (b.weight, b.flags)).collect();
        assert_eq!(
            w,
            [
                (0, BACKEND_CHECKED | BACKEND_DRAINED),
                (1, BACKEND_CHECKED), // weight 1 × 30 % rounds up to 1
                (1, 0),
                (0, BACKEND_CHECKED | BACKEND_DRAINED), // dns1 shares the address
            ]
        );
        assert!(!snap.tables[0].contains(&0));
        assert!(snap.tables[1].is_empty());
        assert!(snap.down_actions.is_empty(), "drained is not DOWN");

        // Weights 100: web2 at 30 % gets 30, and about 30/130 of the table.
        let text = format!(
            "instance = \"t\"\n[limits]\nmaglev_table_size = 1009\n\
             [[port]]\nname = \"p\"\ndriver = \"vnic\"\nmac = \"02:00:00:00:00:01\"\n\
             [[switch]]\nname = \"s\"\ncpu = 0\nports = [\"p\"]\n\
             [[service]]\nname = \"web\"\nvip = \"198.18.0.10\"\nport = 80\nprotocol = \"tcp\"\n\
             [[service.backend]]\nname = \"a\"\naddress = \"{}\"\nweight = 100\n\
             [[service.backend]]\nname = \"b\"\naddress = \"{}\"\nweight = 100\n\
             [service.backend.health]\nkind = \"tcp\"\n",
            at(1),
            at(2)
        );
        let cfg = crate::config::parse(&text).unwrap();
        let snap = judged(&cfg, &mut ids, |_| false, steer);
        assert_eq!(snap.backends[0].weight, 0);
        let steer30 = |a: Ipv4Addr| {
            if a == at(2) {
                Steer::Factor(300)
            } else {
                Steer::Configured
            }
        };
        let snap = judged(&cfg, &mut ids, |_| false, steer30);
        assert_eq!(
            (snap.backends[0].weight, snap.backends[1].weight),
            (100, 30)
        );
        let b = snap.tables[0].iter().filter(|&&e| e == 1).count();
        assert!((200..=260).contains(&b), "{b} of 1009 entries");
        // A DOWN backend leaves the table whatever its agent says.
        let snap = judged(&cfg, &mut ids, |_| true, steer30);
        assert_eq!(snap.backends[1].flags, BACKEND_CHECKED | BACKEND_DOWN);
        assert!(!snap.tables[0].contains(&1));
    }
}

#[cfg(test)]
mod override_tests {
    use super::*;

    /// `config_snapshot` with runtime overrides alone (all up, no agents).
    fn overridden(cfg: &Config, ids: &mut IdAllocator, o: &Overrides) -> ConfigSnapshot {
        config_snapshot(cfg, ids, o, |_| false, |_| Steer::Configured, |_| None).unwrap()
    }

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
        let plain = file_snapshot(&cfg, &mut ids).unwrap();
        assert_eq!(plain.tables[0], table_for(&[1, 2, 3]));
        let w: Vec<u32> = plain.backends.iter().map(|b| b.weight).collect();
        assert_eq!(w, [1, 2, 3]);

        let mut o = Overrides::default();
        o.drain("web", "web1");
        o.set_weight("web", "web3", Some(9));
        let snap = overridden(&cfg, &mut ids, &o);
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
        let snap = overridden(&cfg, &mut ids, &other);
        assert_eq!(snap.tables[0], plain.tables[0]);
    }
}
