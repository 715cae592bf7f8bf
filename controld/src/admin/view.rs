//! What the admin commands answer, built from controld's state (the file's
//! configuration, the overrides, the snapshot it last published) and the
//! region's live words (counters, switch slots, connection table).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::atomic::Ordering;

use shm_layout::Region;
use shm_layout::config_slot::BackendRec;
use shm_layout::conntrack::Timeouts;
use shm_layout::inspect::{self, ConnFilter};
use shm_layout::switch_slot::{BackendCounters, Counter};
use shm_layout::time::{mono_ns, pid_alive};

use super::proto::{
    BackendRef, BackendSel, BackendState, BackendStats, BackendView, ConnView, ConnsQuery,
    ConnsReply, CounterSet, Health, ServiceView, ShowReply, StatsReply, SwitchStats,
};
use super::rates::{Rates, Sample};
use crate::config::Config;
use crate::master::ConfigSnapshot;
use crate::overrides::Overrides;

/// The health checks' verdict on `(service, backend)`; `None`: not checked.
pub type HealthOf<'a> = Box<dyn Fn(&str, &str) -> Option<Health> + 'a>;

/// What the views read from controld's state.
pub struct Ctx<'a> {
    /// The running configuration (the file's values).
    pub cfg: &'a Config,
    pub overrides: &'a Overrides,
    /// The snapshot last published, built from `cfg` and `overrides`.
    pub snap: &'a ConfigSnapshot,
    /// The region's backend counters, by backend id.
    pub counters: &'a [BackendCounters],
    /// The health checks' verdict on `(service, backend)`; `None`: not checked.
    pub health: HealthOf<'a>,
}

/// Why an admin request names nothing that runs.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ViewError {
    #[error("no service {service:?} (services: {})", known.join(", "))]
    NoService { service: String, known: Vec<String> },
    #[error(
        "service {service:?} has no backend {backend:?} (backends: {})",
        if known.is_empty() { "none".to_string() } else { known.join(", ") }
    )]
    NoBackend {
        service: String,
        backend: String,
        known: Vec<String>,
    },
    /// `conns` named a backend that does not run.
    #[error("conns: {0}")]
    Conns(Box<ViewError>),
}

/// Finds `service/backend` in the configuration: `(service index, backend index)`.
pub fn find_backend(cfg: &Config, b: &BackendRef) -> Result<(usize, usize), ViewError> {
    let si = cfg
        .services
        .iter()
        .position(|s| s.name == b.service)
        .ok_or_else(|| ViewError::NoService {
            service: b.service.clone(),
            known: cfg.services.iter().map(|s| s.name.clone()).collect(),
        })?;
    let s = &cfg.services[si];
    let bi = s
        .backends
        .iter()
        .position(|x| x.name == b.backend)
        .ok_or_else(|| ViewError::NoBackend {
            service: s.name.clone(),
            backend: b.backend.clone(),
            known: s.backends.iter().map(|x| x.name.clone()).collect(),
        })?;
    Ok((si, bi))
}

/// The published record of backend `bi` of service `si`. The snapshot is
/// built from `ctx.cfg`, so it always exists; a default record (id 0,
/// weight 0) stands in rather than a panic if that ever broke.
/// What names closed-connection records: each published backend id's
/// service and backend, and the services by index.
pub fn record_names(ctx: &Ctx) -> crate::records::Names {
    let mut n = crate::records::Names::default();
    for (si, s) in ctx.cfg.services.iter().enumerate() {
        n.services.push(s.name.clone());
        for (bi, b) in s.backends.iter().enumerate() {
            n.backends
                .insert(rec(ctx, si, bi).id, (s.name.clone(), b.name.clone()));
        }
    }
    n
}

fn rec(ctx: &Ctx, si: usize, bi: usize) -> BackendRec {
    ctx.snap
        .services
        .get(si)
        .and_then(|s| ctx.snap.backends.get(s.backend_start as usize + bi))
        .copied()
        .unwrap_or_default()
}

fn counts(counters: &[BackendCounters], id: u32) -> (u32, u64) {
    counters.get(id as usize).map_or((0, 0), |c| {
        (
            c.active.load(Ordering::Relaxed),
            c.total.load(Ordering::Relaxed),
        )
    })
}

/// One backend of the running configuration as `show` reports it.
pub fn backend_view(ctx: &Ctx, si: usize, bi: usize) -> BackendView {
    let s = &ctx.cfg.services[si];
    let b = &s.backends[bi];
    let rec = rec(ctx, si, bi);
    let health = (ctx.health)(&s.name, &b.name);
    let effective = if health == Some(Health::Down) {
        0
    } else {
        rec.weight
    };
    let table: &[u16] = ctx.snap.tables.get(si).map_or(&[], |t| t);
    let entries = table.iter().filter(|&&e| e as usize == bi).count();
    let o = ctx.overrides.get(&s.name, &b.name).unwrap_or_default();
    let (active, total) = counts(ctx.counters, rec.id);
    BackendView {
        name: b.name.clone(),
        address: format!("{}:{}", b.address, b.port),
        state: BackendState::of(health, effective),
        health,
        configured_weight: b.weight,
        effective_weight: effective,
        weight_override: o.weight,
        admin_drained: o.drained,
        active_conns: active,
        total_conns: total,
        // The effective limit (controlled loading may hold it below the
        // configured one); None when unlimited.
        max_conns: (rec.max_conns != 0).then_some(rec.max_conns),
        table_share: if table.is_empty() {
            0.0
        } else {
            entries as f64 / table.len() as f64
        },
    }
}

/// `show`: every service and backend.
pub fn show(ctx: &Ctx, generation: u64, routing_generation: u64) -> ShowReply {
    let services = ctx
        .cfg
        .services
        .iter()
        .enumerate()
        .map(|(si, s)| {
            let backends: Vec<BackendView> = (0..s.backends.len())
                .map(|bi| backend_view(ctx, si, bi))
                .collect();
            ServiceView {
                name: s.name.clone(),
                vip: s.vip.to_string(),
                port: s.port,
                protocol: s.protocol.as_str().to_string(),
                mode: s.mode.as_str().to_string(),
                scheduler: "maglev".to_string(),
                active_conns: backends.iter().map(|b| b.active_conns as u64).sum(),
                total_conns: backends.iter().map(|b| b.total_conns).sum(),
                backends,
            }
        })
        .collect();
    ShowReply {
        instance: ctx.cfg.instance.clone(),
        generation,
        routing_generation,
        services,
    }
}

/// Reads the counters the rates are computed from.
pub fn sample(region: &Region, snap: &ConfigSnapshot) -> Sample {
    let n = region.caps().switches as usize;
    let counters = region.backend_counters();
    Sample {
        at: std::time::Instant::now(),
        switches: region.switch_slots()[..n]
            .iter()
            .map(|s| {
                s.counters
                    .iter()
                    .map(|c| c.load(Ordering::Relaxed))
                    .collect()
            })
            .collect(),
        backends: snap
            .backends
            .iter()
            .map(|b| (b.id, counts(counters, b.id).1))
            .collect(),
    }
}

/// `stats`: per switch and total counters and rates, per backend connections.
pub fn stats(region: &Region, ctx: &Ctx, rates: &Rates) -> StatsReply {
    let now = mono_ns();
    let interval = rates.interval();
    let mut total = CounterSet {
        counters: BTreeMap::new(),
        rates: interval.map(|_| BTreeMap::new()),
    };
    let mut switches = Vec::new();
    for (i, sw) in ctx.cfg.switches.iter().enumerate() {
        let Some(slot) = region.switch_slots().get(i) else {
            break;
        };
        let mut set = CounterSet {
            counters: BTreeMap::new(),
            rates: interval.map(|_| BTreeMap::new()),
        };
        for &c in Counter::ALL {
            let v = slot.counter(c);
            set.counters.insert(c.name().to_string(), v);
            *total.counters.entry(c.name().to_string()).or_default() += v;
            if let (Some(r), Some(rate)) = (set.rates.as_mut(), rates.switch_rate(i, c as usize)) {
                r.insert(c.name().to_string(), rate);
                if let Some(t) = total.rates.as_mut() {
                    *t.entry(c.name().to_string()).or_default() += rate;
                }
            }
        }
        let pid = slot.pid.load(Ordering::Relaxed);
        let hb = slot.heartbeat_ns.load(Ordering::Relaxed);
        switches.push(SwitchStats {
            index: i,
            name: sw.name.clone(),
            pid,
            alive: pid_alive(pid),
            state: inspect::switch_state_name(slot.state.load(Ordering::Acquire)).to_string(),
            cpu: slot.cpu.load(Ordering::Relaxed),
            restarts: slot.restarts.load(Ordering::Relaxed),
            heartbeat_age_ms: (hb != 0).then(|| now.saturating_sub(hb) / 1_000_000),
            seen_generation: slot.seen_config.load(Ordering::Acquire),
            set,
        });
    }
    let mut backends = Vec::new();
    for (si, s) in ctx.cfg.services.iter().enumerate() {
        for (bi, b) in s.backends.iter().enumerate() {
            let rec = rec(ctx, si, bi);
            let (active, totalc) = counts(ctx.counters, rec.id);
            backends.push(BackendStats {
                service: s.name.clone(),
                backend: b.name.clone(),
                address: format!("{}:{}", b.address, b.port),
                active_conns: active,
                total_conns: totalc,
                conns_per_s: rates.backend_rate(rec.id),
            });
        }
    }
    StatsReply {
        interval_s: interval,
        switches,
        total,
        backends,
    }
}

/// `conns`, as decided on the main loop: the filter and the names of the
/// running configuration's backends. Running it ([`ConnsPlan::run`]) reads
/// the whole connection table, which is done off the main loop
/// ([`super::scan`]).
#[derive(Debug, Clone)]
pub struct ConnsPlan {
    names: BTreeMap<u32, String>,
    filter: ConnFilter,
    timeouts: Timeouts,
}

/// `conns`: plans the scan of the connection table, filtered.
pub fn conns_plan(ctx: &Ctx, timeouts: &Timeouts, q: &ConnsQuery) -> Result<ConnsPlan, ViewError> {
    // Backend ids of the running configuration, to name each connection's backend.
    let mut names: BTreeMap<u32, String> = BTreeMap::new();
    for (si, s) in ctx.cfg.services.iter().enumerate() {
        for (bi, b) in s.backends.iter().enumerate() {
            names.insert(rec(ctx, si, bi).id, format!("{}/{}", s.name, b.name));
        }
    }
    let mut filter = ConnFilter {
        vip: q.vip.map(u32::from),
        client: q.client.map(u32::from),
        backend_ip: None,
        backend_id: None,
        limit: q.limit,
    };
    match &q.backend {
        None => {}
        Some(BackendSel::Address(a)) => filter.backend_ip = Some(u32::from(*a)),
        Some(BackendSel::Name(b)) => {
            let (si, bi) = find_backend(ctx.cfg, b).map_err(|e| ViewError::Conns(Box::new(e)))?;
            filter.backend_id = Some(rec(ctx, si, bi).id);
        }
    }
    Ok(ConnsPlan {
        names,
        filter,
        timeouts: *timeouts,
    })
}

impl ConnsPlan {
    /// Reads the connection table (any mapping of the region will do).
    pub fn run(&self, region: &Region) -> ConnsReply {
        let census = inspect::scan_conns(region, &self.timeouts, &self.filter);
        let ep = |ip: u32, port: u16| format!("{}:{port}", Ipv4Addr::from(ip));
        ConnsReply {
            slots: census.slots,
            connections: census.connections,
            matched: census.matched,
            list: census
                .list
                .iter()
                .map(|x| {
                    let c = &x.conn;
                    ConnView {
                        protocol: inspect::proto_name(c.proto).to_string(),
                        client: ep(c.client_ip, c.client_port),
                        vip: ep(c.vip, c.vip_port),
                        backend: self.names.get(&c.backend_id).cloned(),
                        backend_address: ep(c.backend_ip, c.backend_port),
                        state: inspect::conn_state_name(x.state).to_string(),
                        idle_ms: x.idle_ms,
                        expired: x.expired,
                        midflow: x.midflow,
                        packets: x.packets,
                        bytes: x.bytes,
                    }
                })
                .collect(),
        }
    }
}

/// `conns` at once, on the caller's thread (tests, tools).
pub fn conns(
    region: &Region,
    ctx: &Ctx,
    timeouts: &Timeouts,
    q: &ConnsQuery,
) -> Result<ConnsReply, ViewError> {
    Ok(conns_plan(ctx, timeouts, q)?.run(region))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, AtomicU64};

    use super::*;
    use crate::ids::IdAllocator;

    fn config() -> Config {
        crate::config::parse(
            "instance = \"t\"\n[limits]\nmaglev_table_size = 251\n\
             [[port]]\nname = \"p\"\ndriver = \"vnic\"\nmac = \"02:00:00:00:00:01\"\n\
             [[switch]]\nname = \"s\"\ncpu = 0\nports = [\"p\"]\n\
             [[service]]\nname = \"web\"\nvip = \"198.18.0.10\"\nport = 80\nprotocol = \"tcp\"\n\
             [[service.backend]]\nname = \"a\"\naddress = \"198.19.1.1\"\nport = 8080\nweight = 1\n\
             [[service.backend]]\nname = \"b\"\naddress = \"198.19.1.2\"\nport = 8080\nweight = 3\n\
             [[service]]\nname = \"dns\"\nvip = \"198.18.0.10\"\nport = 53\nprotocol = \"udp\"\n",
        )
        .unwrap()
    }

    fn counters(n: usize) -> Vec<BackendCounters> {
        (0..n)
            .map(|i| BackendCounters {
                active: AtomicU32::new(i as u32),
                _pad: 0,
                total: AtomicU64::new(100 * i as u64),
                syn_ack_count: AtomicU64::new(0),
                syn_ack_sum_ms: AtomicU64::new(0),
                syn_ack_slow: AtomicU64::new(0),
                reconciled_down: AtomicU64::new(0),
                reconciled_up: AtomicU64::new(0),
                released: AtomicU64::new(0),
                _pad1: [],
            })
            .collect()
    }

    #[test]
    fn show_reports_file_override_effective_and_health() {
        let cfg = config();
        let mut ov = Overrides::default();
        ov.drain("web", "a");
        ov.set_weight("web", "b", Some(5));
        let mut ids = IdAllocator::new(8);
        let snap = crate::master::config_snapshot(
            &cfg,
            &mut ids,
            &ov,
            |_| false,
            |_| crate::agents::rule::Steer::Configured,
            |_| None,
        )
        .unwrap();
        let ctr = counters(8);
        let ctx = Ctx {
            cfg: &cfg,
            overrides: &ov,
            snap: &snap,
            counters: &ctr,
            health: Box::new(|_, _| None),
        };
        let v = show(&ctx, 4, 2);
        assert_eq!(
            (v.instance.as_str(), v.generation, v.routing_generation),
            ("t", 4, 2)
        );
        let web = &v.services[0];
        assert_eq!(
            (
                web.vip.as_str(),
                web.port,
                web.protocol.as_str(),
                web.mode.as_str()
            ),
            ("198.18.0.10", 80, "tcp", "nat")
        );
        let [a, b] = &web.backends[..] else {
            panic!("two backends")
        };
        assert_eq!(a.address, "198.19.1.1:8080");
        assert_eq!(a.state, BackendState::Drained);
        assert!(a.admin_drained);
        assert_eq!((a.configured_weight, a.effective_weight), (1, 0));
        assert_eq!(a.table_share, 0.0);
        assert_eq!(b.state, BackendState::Up);
        assert_eq!((b.configured_weight, b.effective_weight), (3, 5));
        assert_eq!(b.weight_override, Some(5));
        assert_eq!(b.table_share, 1.0);
        assert_eq!(b.health, None);
        let (ia, ib) = (snap.backends[0].id, snap.backends[1].id);
        assert_eq!((a.active_conns, a.total_conns), (ia, 100 * ia as u64));
        assert_eq!(web.active_conns, (ia + ib) as u64);
        assert!(v.services[1].backends.is_empty());

        // A backend the checks call down is down whatever its weight.
        let ctx = Ctx {
            health: Box::new(|_, b| Some(if b == "b" { Health::Down } else { Health::Up })),
            ..ctx
        };
        let b = backend_view(&ctx, 0, 1);
        assert_eq!(
            (b.state, b.effective_weight, b.health),
            (BackendState::Down, 0, Some(Health::Down))
        );
        assert_eq!(backend_view(&ctx, 0, 0).state, BackendState::Drained);
    }

    #[test]
    fn backends_are_found_by_name_or_the_error_lists_the_names() {
        let cfg = config();
        let r = |s: &str| find_backend(&cfg, &s.parse().unwrap()).map_err(|e| e.to_string());
        assert_eq!(r("web/b"), Ok((0, 1)));
        assert_eq!(
            r("www/b"),
            Err("no service \"www\" (services: web, dns)".to_string())
        );
        assert_eq!(
            r("web/c"),
            Err("service \"web\" has no backend \"c\" (backends: a, b)".to_string())
        );
        assert_eq!(
            r("dns/a"),
            Err("service \"dns\" has no backend \"a\" (backends: none)".to_string())
        );
    }
}
