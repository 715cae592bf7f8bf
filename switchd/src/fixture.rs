//! A region with published services, for the filter's unit tests and
//! benchmarks (no controld needed): VIP 198.18.0.10:80/tcp (NAT) with
//! backends 198.19.1.1-3:8080 (ids 0-2), VIP:53/udp (NAT) with backends
//! 198.19.1.1-3:5353 (ids 3-5), and VIP:443/tcp in tunnel mode (from
//! 198.19.1.254) to 198.19.1.1-3:443 (ids 6-8); clients in 198.18.100.0/24
//! via 198.18.0.1 on port 0, backends on port 1; both ports' MTU 1500.

use std::time::Duration;

use shm_layout::config_slot::{
    BACKEND_DOWN, ConfigSlotMut, MODE_NAT, MODE_TUNNEL, PROTO_TCP, PROTO_UDP,
};
use shm_layout::publish::cannot_fence;
use shm_layout::routing_slot::{NEIGH_VALID, NeighbourRec, RouteRec};
use shm_layout::switch_slot::N_COUNTERS;
use shm_layout::{Capacities, Mapping, Region, Table, region_name};

use crate::filter::Ctx;
use crate::sched::SchedState;

pub const VIP: u32 = 0xc612_000a;
/// Outer source address of the tunnel service.
pub const TUNNEL_SRC: u32 = 0xc613_01fe;
pub const CLIENT_GW_MAC: [u8; 6] = [2, 0, 0, 0, 2, 1];
/// An on-link client subnet (198.18.1.0/24), published only by
/// [`Fixture::with_onlink_clients`].
pub const ONLINK_CLIENTS: u32 = 0xc612_0100;

/// Port MACs of the fixture: port p has 02:00:00:00:00:(p+1).
pub fn port_mac(p: u32) -> Option<[u8; 6]> {
    (p < 2).then_some([2, 0, 0, 0, 0, p as u8 + 1])
}

/// The region; removed on drop.
#[derive(Debug)]
pub struct Fixture {
    pub region: Region,
    name: String,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = Mapping::unlink(&self.name);
    }
}

impl Fixture {
    pub fn new(tag: &str, conn_slots: u32) -> Self {
        let inst = format!("fixture-{tag}-{}", std::process::id());
        let caps = Capacities {
            conn_slots,
            maglev_m: 65537,
            ..Capacities::default()
        };
        let region = Region::create(&inst, caps).expect("create fixture region");
        publish(&region, &[], &|_| {});
        let fence = &mut cannot_fence;
        let routing = region.publish_routing(Duration::from_millis(10), fence, |s| {
            s.header.n_routes = 2;
            s.header.n_neighbours = 4;
            s.routes[0] = RouteRec {
                prefix: 0xc613_0100,
                len: 24,
                port: 1,
                ..Default::default()
            };
            s.routes[1] = RouteRec {
                prefix: 0xc612_6400,
                len: 24,
                port: 0,
                via: 0xc612_0001,
                ..Default::default()
            };
            let n = [
                (0xc612_0001u32, 0u32, CLIENT_GW_MAC),
                (0xc613_0101, 1, [2, 0, 0, 0, 1, 1]),
                (0xc613_0102, 1, [2, 0, 0, 0, 1, 2]),
                (0xc613_0103, 1, [2, 0, 0, 0, 1, 3]),
            ];
            for (i, (ip, port, mac)) in n.iter().enumerate() {
                s.neighbours[i] = NeighbourRec {
                    ip: *ip,
                    port: *port,
                    mac: *mac,
                    state: NEIGH_VALID,
                    _pad: 0,
                };
            }
        });
        routing.expect("no switch runs on a fixture");
        Self {
            region,
            name: region_name(&inst),
        }
    }

    /// Republishes the configuration with backends `(id, on_down action)`
    /// DOWN: flagged, out of their service's table, their action set.
    pub fn mark_down(&self, down: &[(u32, u8)]) {
        publish(&self.region, down, &|_| {});
    }

    /// Republishes the configuration (every backend up) with `edit` applied
    /// to the slot after the fixture's own values.
    pub fn configure(&self, edit: impl Fn(&mut ConfigSlotMut<'_>)) {
        publish(&self.region, &[], &edit);
    }

    /// [`mark_down`](Self::mark_down) and [`configure`](Self::configure)
    /// in one publication.
    pub fn publish(&self, down: &[(u32, u8)], edit: impl Fn(&mut ConfigSlotMut<'_>)) {
        publish(&self.region, down, &edit);
    }

    /// Republishes the routing slot: the fixture's routes and neighbours
    /// with `edit` applied (routes must stay longest prefix first).
    pub fn edit_routing(&self, edit: impl Fn(&mut shm_layout::routing_slot::RoutingSlotMut<'_>)) {
        let copy = self.region.routing_copy();
        let cur = copy.routing();
        let fence = &mut cannot_fence;
        self.region
            .publish_routing(Duration::from_millis(10), fence, |s| {
                s.header.n_routes = cur.header.n_routes;
                s.header.n_neighbours = cur.header.n_neighbours;
                s.routes.copy_from_slice(cur.routes);
                s.neighbours.copy_from_slice(cur.neighbours);
                edit(s);
            })
            .expect("no switch runs on a fixture");
    }

    /// [`edit_routing`](Self::edit_routing): adds the on-link client
    /// subnet [`ONLINK_CLIENTS`]/24 on port 0, with no neighbour (clients
    /// the kernel has not resolved).
    pub fn with_onlink_clients(&self) {
        self.edit_routing(|s| {
            let n = s.header.n_routes as usize;
            s.routes[n] = RouteRec {
                prefix: ONLINK_CLIENTS,
                len: 24,
                port: 0,
                ..Default::default()
            };
            s.header.n_routes += 1;
        });
    }

    /// The stamps of the active configuration and routing slots (what the
    /// engine syncs its caches with each loop).
    pub fn stamps(&self) -> (u64, u64) {
        let r = &self.region;
        (
            r.begin_read(Table::Config).stamp,
            r.begin_read(Table::Routing).stamp,
        )
    }

    /// A filter context over the active slots (fresh scheduler state).
    pub fn ctx<'a>(&'a self, counters: &'a mut [u64; N_COUNTERS]) -> Ctx<'a> {
        let r = &self.region;
        // SAFETY: a fixture's region has no switch and no other publisher
        // than the test's own thread, which publishes between uses of a
        // context; a test that keeps a context across two publications
        // (the second rewrites the slot it views) must not use it again.
        let (cfg, rt) = unsafe {
            (
                r.config_view(r.begin_read(Table::Config).slot),
                r.routing_view(r.begin_read(Table::Routing).slot),
            )
        };
        Ctx {
            timeouts: cfg.header.timeouts(),
            cfg,
            rt,
            ct: r.conntrack(),
            backends: r.backend_counters(),
            events: None,
            now_ms: r.now_ms(),
            pid: std::process::id(),
            counters,
            hops: Default::default(),
            flows: Default::default(),
            icmp_tokens: crate::filter::IcmpBudget::BURST,
            sched: SchedState::new(cfg.backends.len()),
            // Allocates nothing (a context per frame stays cheap); tests of
            // fragments give it a table.
            frags: crate::frag::FragTable::new(0, 0),
            closed: Default::default(),
            syn_auto: Default::default(),
        }
    }
}

/// Publishes the fixture's configuration with the backends in `down` DOWN,
/// then applies `edit`.
fn publish(region: &Region, down: &[(u32, u8)], edit: &dyn Fn(&mut ConfigSlotMut<'_>)) {
    const M: usize = 65537;
    let fence = &mut cannot_fence;
    let published = region.publish_config(Duration::from_millis(10), fence, |s| {
        let h = &mut *s.header;
        h.n_services = 3;
        h.n_backends = 9;
        h.n_ports = 2;
        h.maglev_m = M as u32;
        h.tcp_syn_ms = 10_000;
        h.tcp_established_ms = 900_000;
        h.tcp_fin_ms = 30_000;
        h.udp_ms = 60_000;
        h.tcp_provisional_ms = 3_000;
        h.ports[0].mac = [2, 0, 0, 0, 0, 1];
        h.ports[1].mac = [2, 0, 0, 0, 0, 2];
        h.ports[0].mtu = 1500;
        h.ports[1].mtu = 1500;
        h.tunnel_src = TUNNEL_SRC;
        s.down_action.fill(0);
        for (si, (port, proto, bport, mode)) in [
            (80, PROTO_TCP, 8080, MODE_NAT),
            (53, PROTO_UDP, 5353, MODE_NAT),
            (443, PROTO_TCP, 443, MODE_TUNNEL),
        ]
        .into_iter()
        .enumerate()
        {
            let svc = &mut s.services[si];
            svc.vip = VIP;
            svc.port = port;
            svc.proto = proto;
            svc.mode = mode;
            svc.backend_start = 3 * si as u32;
            svc.backend_count = 3;
            svc.table_start = (si * M) as u32;
            svc.table_len = M as u32;
            svc.scheduler = 0;
            svc.queue_timeout_ms = 0;
            svc.latency_target_ms = 0;
            let mut live = Vec::new();
            for (i, b) in s.backends[3 * si..3 * si + 3].iter_mut().enumerate() {
                b.id = (3 * si + i) as u32;
                b.ip = 0xc613_0101 + i as u32;
                b.port = bport;
                b.weight = 1;
                b.service = si as u32;
                b.flags = 0;
                b.max_conns = 0;
                match down.iter().find(|(id, _)| *id == b.id) {
                    Some(&(id, action)) => {
                        b.flags = BACKEND_DOWN;
                        s.down_action[id as usize] = action;
                    }
                    None => live.push(i as u16),
                }
            }
            if live.is_empty() {
                s.services[si].table_len = 0;
            }
            for (i, e) in s.maglev[si * M..(si + 1) * M].iter_mut().enumerate() {
                *e = live.get(i % live.len().max(1)).copied().unwrap_or(0);
            }
        }
        edit(s);
    });
    published.expect("no switch runs on a fixture");
}
