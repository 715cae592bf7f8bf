//! The kernel's tables and the static config, merged into one routing
//! snapshot. Pure: the kernel's records come in as plain values.
//!
//! Rules:
//! - A kernel interface is a switch port when an afpacket `[[port]]` names
//!   it as its `interface` (the first such port). Routes and neighbours on
//!   other interfaces are left out.
//! - `[[route]]` and `[[neighbour]]` always apply and win over a mirrored
//!   route of the same prefix or a mirrored neighbour of the same address.
//! - Of several kernel routes for one prefix, the lowest metric wins.
//! - A neighbour counts when the kernel holds a unicast MAC for it in state
//!   REACHABLE, STALE, DELAY, PROBE, PERMANENT or NOARP.
//! - Capacity (`[limits] routes / neighbours`): static entries first; then
//!   mirrored routes longest prefix first; then mirrored neighbours that are
//!   next hops (route gateways, backends on a link), then the others by
//!   address. What does not fit is counted, never an error.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;

use shm_layout::routing_slot::{NEIGH_VALID, NeighbourRec, RouteRec, mask};

use crate::config::{Config, Driver};
use crate::master::RoutingSnapshot;

/// A kernel network interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelLink {
    pub index: u32,
    pub name: String,
}

/// An IPv4 unicast route of the kernel's main table, with one next hop.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelRoute {
    pub prefix: Ipv4Addr,
    pub len: u8,
    /// Output interface index.
    pub oif: u32,
    /// The gateway; `None` for a route to the link itself.
    pub gateway: Option<Ipv4Addr>,
    /// The route's metric (RTA_PRIORITY); lower wins.
    pub metric: u32,
}

/// A kernel neighbour (ARP) entry's state (NUD_*).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NeighState {
    Incomplete,
    Reachable,
    Stale,
    Delay,
    Probe,
    Failed,
    Noarp,
    Permanent,
    None,
}

impl NeighState {
    /// Whether an entry in this state holds a usable MAC.
    pub fn usable(self) -> bool {
        matches!(
            self,
            NeighState::Reachable
                | NeighState::Stale
                | NeighState::Delay
                | NeighState::Probe
                | NeighState::Permanent
                | NeighState::Noarp
        )
    }

    /// Preference among usable states when one address has several entries.
    fn rank(self) -> u8 {
        match self {
            NeighState::Permanent | NeighState::Noarp => 0,
            NeighState::Reachable => 1,
            NeighState::Delay | NeighState::Probe => 2,
            _ => 3,
        }
    }
}

/// A kernel IPv4 neighbour entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelNeighbour {
    pub address: Ipv4Addr,
    pub ifindex: u32,
    pub mac: Option<[u8; 6]>,
    pub state: NeighState,
}

/// One read of the kernel's links, IPv4 main-table routes and IPv4 neighbours.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelTables {
    pub links: Vec<KernelLink>,
    pub routes: Vec<KernelRoute>,
    pub neighbours: Vec<KernelNeighbour>,
}

/// How a next hop stands in the kernel's neighbour table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HopState {
    /// No usable MAC: resolution is needed.
    Missing,
    /// Usable but STALE: the kernel has not confirmed it lately (switchd's
    /// traffic bypasses the kernel, so it never will on its own).
    Stale,
    /// Confirmed, permanent, or a static `[[neighbour]]`.
    Known,
}

/// A next hop the switches need: a published route's gateway, or a backend
/// on a link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hop {
    pub address: Ipv4Addr,
    /// The kernel interface it is reached through (`None` on a vnic port,
    /// where the kernel cannot help).
    pub ifindex: Option<u32>,
    pub state: HopState,
}

/// The merged snapshot and what it left out.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Built {
    pub snapshot: RoutingSnapshot,
    /// Mirrored routes that did not fit `limits.routes`.
    pub routes_dropped: usize,
    /// Mirrored neighbours that did not fit `limits.neighbours`.
    pub neighbours_dropped: usize,
    /// Kernel neighbours on switch ports, learned (reachable, stale,
    /// delay, probe), whose MAC no host can have (broadcast, multicast,
    /// zero: what one forged ARP request teaches the kernel), with that
    /// MAC. Like every neighbour without a unicast MAC, never published.
    pub neighbours_refused: Vec<(Ipv4Addr, [u8; 6])>,
    /// Next hops, by address.
    pub hops: Vec<Hop>,
}

/// Kernel interface index -> switch port index, for the afpacket ports.
pub fn port_of_ifindex(cfg: &Config, links: &[KernelLink]) -> HashMap<u32, usize> {
    links
        .iter()
        .filter_map(|l| {
            cfg.ports
                .iter()
                .position(|p| {
                    p.driver == Driver::Afpacket && p.interface.as_deref() == Some(l.name.as_str())
                })
                .map(|p| (l.index, p))
        })
        .collect()
}

fn unicast_mac(mac: &[u8; 6]) -> bool {
    *mac != [0; 6] && mac[0] & 1 == 0
}

/// Merges the static config with the kernel's tables (empty tables give the
/// static snapshot alone).
pub fn build(cfg: &Config, kernel: &KernelTables) -> Built {
    let ports = port_of_ifindex(cfg, &kernel.links);
    let ifindex_of_port: HashMap<usize, u32> = ports.iter().map(|(&i, &p)| (p, i)).collect();

    // Routes: static ones, then the kernel's best per prefix.
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
    let taken: BTreeSet<(u32, u8)> = routes.iter().map(|r| (r.prefix, r.len)).collect();
    let mut best: BTreeMap<(u32, u8), (u32, RouteRec)> = BTreeMap::new();
    for k in &kernel.routes {
        let Some(&port) = ports.get(&k.oif) else {
            continue;
        };
        let prefix = u32::from(k.prefix) & mask(k.len);
        if taken.contains(&(prefix, k.len)) {
            continue;
        }
        let rec = RouteRec {
            prefix,
            len: k.len,
            port: port as u32,
            via: k.gateway.map(u32::from).unwrap_or(0),
            ..Default::default()
        };
        match best.get(&(prefix, k.len)) {
            Some((metric, _)) if *metric <= k.metric => {}
            _ => {
                best.insert((prefix, k.len), (k.metric, rec));
            }
        }
    }
    let mut mirrored: Vec<RouteRec> = best.into_values().map(|(_, r)| r).collect();
    sort_routes(&mut mirrored);
    let room = (cfg.limits.routes as usize).saturating_sub(routes.len());
    let routes_dropped = mirrored.len().saturating_sub(room);
    mirrored.truncate(room);
    routes.extend(mirrored);
    sort_routes(&mut routes);

    // Neighbours: static ones, then the kernel's usable ones.
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
    let statics: BTreeSet<u32> = neighbours.iter().map(|n| n.ip).collect();
    let mut learned: BTreeMap<u32, (u8, NeighbourRec)> = BTreeMap::new();
    let mut stale: BTreeSet<u32> = BTreeSet::new();
    let mut neighbours_refused = Vec::new();
    for k in &kernel.neighbours {
        let (Some(&port), Some(mac)) = (ports.get(&k.ifindex), k.mac) else {
            continue;
        };
        let ip = u32::from(k.address);
        // The kernel's own NOARP entries of broadcast and multicast
        // addresses hold group MACs by right; a learned one never does.
        let learned_state =
            k.state.usable() && !matches!(k.state, NeighState::Noarp | NeighState::Permanent);
        if learned_state && !unicast_mac(&mac) {
            neighbours_refused.push((k.address, mac));
        }
        if !k.state.usable() || !unicast_mac(&mac) || statics.contains(&ip) {
            continue;
        }
        let rec = NeighbourRec {
            ip,
            port: port as u32,
            mac,
            state: NEIGH_VALID,
            ..Default::default()
        };
        let rank = k.state.rank();
        match learned.get(&ip) {
            Some((r, old)) if (*r, old.port) <= (rank, rec.port) => {}
            _ => {
                learned.insert(ip, (rank, rec));
                if k.state == NeighState::Stale {
                    stale.insert(ip);
                } else {
                    stale.remove(&ip);
                }
            }
        }
    }

    // Next hops: gateways of the published routes, and backends on a link.
    let view_routes = routes.clone();
    let lookup = |dst: u32| view_routes.iter().find(|r| dst & mask(r.len) == r.prefix);
    let mut hop_ports: BTreeMap<u32, u32> = BTreeMap::new();
    for r in &routes {
        if r.via != 0 {
            // The gateway must itself be on the route's link.
            hop_ports.entry(r.via).or_insert(r.port);
        }
    }
    for s in &cfg.services {
        for b in &s.backends {
            let dst = u32::from(b.address);
            if let Some(r) = lookup(dst)
                && r.via == 0
            {
                hop_ports.entry(dst).or_insert(r.port);
            }
        }
    }

    let room = (cfg.limits.neighbours as usize).saturating_sub(neighbours.len());
    let (mut first, rest): (Vec<_>, Vec<_>) = learned
        .into_values()
        .map(|(_, n)| n)
        .partition(|n| hop_ports.contains_key(&n.ip));
    first.extend(rest);
    let neighbours_dropped = first.len().saturating_sub(room);
    first.truncate(room);
    neighbours.extend(first);
    neighbours.sort_by_key(|n| n.ip);

    let known: BTreeSet<u32> = neighbours.iter().map(|n| n.ip).collect();
    let hops = hop_ports
        .into_iter()
        .map(|(ip, port)| Hop {
            address: Ipv4Addr::from(ip),
            ifindex: ifindex_of_port.get(&(port as usize)).copied(),
            state: if !known.contains(&ip) {
                HopState::Missing
            } else if stale.contains(&ip) {
                HopState::Stale
            } else {
                HopState::Known
            },
        })
        .collect();

    Built {
        snapshot: RoutingSnapshot { routes, neighbours },
        routes_dropped,
        neighbours_dropped,
        neighbours_refused,
        hops,
    }
}

/// Longest prefix first, then by address (the order the switches match in).
fn sort_routes(routes: &mut [RouteRec]) {
    routes.sort_by(|a, b| b.len.cmp(&a.len).then(a.prefix.cmp(&b.prefix)));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;

    const MAC_C: [u8; 6] = [2, 0, 0, 0, 0xc, 1];
    const MAC_B1: [u8; 6] = [2, 0, 0, 0, 0xb, 1];
    const MAC_GW: [u8; 6] = [2, 0, 0, 0, 0x9, 1];

    /// Ports: client (l0, ifindex 5), backend (br0, ifindex 7); eth0
    /// (ifindex 2) is the management interface, not a port. Backends
    /// 198.19.0.11 and 198.19.0.12.
    fn cfg(extra: &str) -> Config {
        parse(&format!(
            r#"
instance = "t"
{extra}
[[port]]
name = "client"
driver = "afpacket"
interface = "l0"
[[port]]
name = "backend"
driver = "afpacket"
interface = "br0"
[[switch]]
name = "sw0"
cpu = 1
ports = ["client", "backend"]
[[service]]
name = "web"
vip = "198.18.0.10"
port = 80
protocol = "tcp"
  [[service.backend]]
  name = "b1"
  address = "198.19.0.11"
  [[service.backend]]
  name = "b2"
  address = "198.19.0.12"
"#
        ))
        .unwrap()
    }

    fn links() -> Vec<KernelLink> {
        [(1, "lo"), (2, "eth0"), (5, "l0"), (7, "br0")]
            .into_iter()
            .map(|(index, name)| KernelLink {
                index,
                name: name.into(),
            })
            .collect()
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn route(prefix: &str, len: u8, oif: u32, gw: Option<&str>, metric: u32) -> KernelRoute {
        KernelRoute {
            prefix: ip(prefix),
            len,
            oif,
            gateway: gw.map(ip),
            metric,
        }
    }

    fn neigh(addr: &str, ifindex: u32, mac: Option<[u8; 6]>, state: NeighState) -> KernelNeighbour {
        KernelNeighbour {
            address: ip(addr),
            ifindex,
            mac,
            state,
        }
    }

    fn rr(prefix: &str, len: u8, port: u32, via: Option<&str>) -> RouteRec {
        RouteRec {
            prefix: u32::from(ip(prefix)),
            len,
            port,
            via: via.map(|v| u32::from(ip(v))).unwrap_or(0),
            ..Default::default()
        }
    }

    fn nr(addr: &str, port: u32, mac: [u8; 6]) -> NeighbourRec {
        NeighbourRec {
            ip: u32::from(ip(addr)),
            port,
            mac,
            state: NEIGH_VALID,
            ..Default::default()
        }
    }

    /// The appliance namespace of the netns test bed, plus a management
    /// interface with a default route.
    fn bed() -> KernelTables {
        KernelTables {
            links: links(),
            routes: vec![
                route("0.0.0.0", 0, 2, Some("192.0.2.1"), 0),
                route("198.18.1.0", 24, 5, None, 0),
                route("198.19.0.0", 24, 7, None, 0),
                route("198.18.7.0", 24, 7, Some("198.19.0.11"), 0),
            ],
            neighbours: vec![
                neigh(
                    "192.0.2.1",
                    2,
                    Some([2, 0, 0, 0, 0, 0x99]),
                    NeighState::Reachable,
                ),
                neigh("198.18.1.2", 5, Some(MAC_C), NeighState::Stale),
                neigh("198.19.0.11", 7, Some(MAC_B1), NeighState::Reachable),
                neigh("198.19.0.12", 7, None, NeighState::Failed),
            ],
        }
    }

    #[test]
    fn mirrors_switch_port_routes_and_neighbours_only() {
        let b = build(&cfg(""), &bed());
        assert_eq!(
            b.snapshot.routes,
            vec![
                rr("198.18.1.0", 24, 0, None),
                rr("198.18.7.0", 24, 1, Some("198.19.0.11")),
                rr("198.19.0.0", 24, 1, None),
            ]
        );
        assert_eq!(
            b.snapshot.neighbours,
            vec![nr("198.18.1.2", 0, MAC_C), nr("198.19.0.11", 1, MAC_B1)]
        );
        assert_eq!((b.routes_dropped, b.neighbours_dropped), (0, 0));
        // The gateway (198.19.0.11, also a backend) and both backends are
        // next hops; .12 has failed and needs resolution on br0.
        assert_eq!(
            b.hops,
            vec![
                Hop {
                    address: ip("198.19.0.11"),
                    ifindex: Some(7),
                    state: HopState::Known
                },
                Hop {
                    address: ip("198.19.0.12"),
                    ifindex: Some(7),
                    state: HopState::Missing
                },
            ]
        );
    }

    #[test]
    fn empty_kernel_gives_the_static_snapshot() {
        let c = cfg("");
        let b = build(&c, &KernelTables::default());
        assert_eq!(b, Built::default());
        let c = parse(
            &std::fs::read_to_string(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../packaging/examples/demo.toml"
            ))
            .unwrap(),
        )
        .unwrap();
        let b = build(&c, &KernelTables::default());
        assert_eq!(b.snapshot.routes.len(), c.routes.len());
        assert_eq!(b.snapshot.neighbours.len(), c.neighbours.len());
        // Static hops on vnic ports are listed without an interface.
        assert!(b.hops.iter().all(|h| h.ifindex.is_none()));
        assert!(b.hops.iter().all(|h| h.state != HopState::Missing));
    }

    #[test]
    fn static_entries_win_over_mirrored_ones() {
        let c = cfg(
            "[[route]]\nprefix = \"198.19.0.0/24\"\nport = \"client\"\nvia = \"198.18.1.2\"\n\
             [[neighbour]]\naddress = \"198.19.0.11\"\nmac = \"02:00:00:00:00:42\"\nport = \"backend\"\n",
        );
        let b = build(&c, &bed());
        assert_eq!(
            b.snapshot.routes,
            vec![
                rr("198.18.1.0", 24, 0, None),
                rr("198.18.7.0", 24, 1, Some("198.19.0.11")),
                rr("198.19.0.0", 24, 0, Some("198.18.1.2")),
            ]
        );
        assert_eq!(
            b.snapshot.neighbours,
            vec![
                nr("198.18.1.2", 0, MAC_C),
                nr("198.19.0.11", 1, [2, 0, 0, 0, 0, 0x42])
            ]
        );
        // Backends are now behind a gateway: only gateways are hops; the
        // client is one (stale in the kernel).
        assert_eq!(
            b.hops
                .iter()
                .map(|h| (h.address, h.state))
                .collect::<Vec<_>>(),
            vec![
                (ip("198.18.1.2"), HopState::Stale),
                (ip("198.19.0.11"), HopState::Known)
            ]
        );
    }

    #[test]
    fn lowest_metric_wins_and_host_bits_are_masked() {
        let mut k = bed();
        k.routes = vec![
            route("198.18.9.0", 24, 7, Some("198.19.0.12"), 200),
            route("198.18.9.0", 24, 5, Some("198.18.1.2"), 100),
            route("198.18.9.0", 24, 7, Some("198.19.0.11"), 300),
            route("10.1.2.3", 8, 7, None, 0),
        ];
        let b = build(&cfg(""), &k);
        assert_eq!(
            b.snapshot.routes,
            vec![
                rr("198.18.9.0", 24, 0, Some("198.18.1.2")),
                rr("10.0.0.0", 8, 1, None),
            ]
        );
    }

    #[test]
    fn neighbour_states_and_macs() {
        let states = [
            (NeighState::Incomplete, false),
            (NeighState::Reachable, true),
            (NeighState::Stale, true),
            (NeighState::Delay, true),
            (NeighState::Probe, true),
            (NeighState::Failed, false),
            (NeighState::Noarp, true),
            (NeighState::Permanent, true),
            (NeighState::None, false),
        ];
        for (state, usable) in states {
            let mut k = bed();
            k.neighbours = vec![neigh("198.19.0.50", 7, Some(MAC_GW), state)];
            let got = build(&cfg(""), &k).snapshot.neighbours;
            assert_eq!(got.len(), usize::from(usable), "{state:?}");
        }
        let mut k = bed();
        k.neighbours = vec![
            neigh("198.19.0.51", 7, None, NeighState::Reachable),
            neigh("198.19.0.52", 7, Some([0; 6]), NeighState::Noarp),
            neigh("198.19.0.255", 7, Some([0xff; 6]), NeighState::Noarp),
            neigh("198.19.0.53", 2, Some(MAC_GW), NeighState::Reachable),
        ];
        assert_eq!(build(&cfg(""), &k).snapshot.neighbours, vec![]);
    }

    /// A client's address the kernel learned with a group MAC (one forged
    /// ARP request does it) is not published and is reported; the
    /// kernel's own NOARP entries of broadcast addresses are not reported.
    #[test]
    fn learned_group_macs_are_refused_and_reported() {
        let mut k = bed();
        let mcast = [0x01, 0, 0x5e, 0, 0, 1];
        k.neighbours = vec![
            neigh("198.19.0.50", 7, Some([0xff; 6]), NeighState::Stale),
            neigh("198.19.0.51", 7, Some(mcast), NeighState::Reachable),
            neigh("198.19.0.52", 7, Some(MAC_GW), NeighState::Reachable),
            neigh("198.19.0.255", 7, Some([0xff; 6]), NeighState::Noarp),
        ];
        let b = build(&cfg(""), &k);
        let published: Vec<u32> = b.snapshot.neighbours.iter().map(|n| n.ip).collect();
        assert_eq!(published, vec![u32::from(Ipv4Addr::new(198, 19, 0, 52))]);
        assert_eq!(
            b.neighbours_refused,
            vec![
                (Ipv4Addr::new(198, 19, 0, 50), [0xff; 6]),
                (Ipv4Addr::new(198, 19, 0, 51), mcast)
            ]
        );
    }

    #[test]
    fn one_address_on_two_ports_keeps_the_better_state() {
        let mut k = bed();
        k.neighbours = vec![
            neigh("198.19.0.11", 5, Some(MAC_C), NeighState::Stale),
            neigh("198.19.0.11", 7, Some(MAC_B1), NeighState::Reachable),
        ];
        let b = build(&cfg(""), &k);
        assert_eq!(b.snapshot.neighbours, vec![nr("198.19.0.11", 1, MAC_B1)]);
        assert_eq!(b.hops[0].state, HopState::Known);
    }

    #[test]
    fn over_capacity_keeps_longest_prefixes_and_next_hops() {
        let c = cfg("[limits]\nroutes = 3\nneighbours = 2\n\
             [[route]]\nprefix = \"0.0.0.0/0\"\nport = \"client\"\nvia = \"198.18.1.2\"\n");
        let mut k = bed();
        k.routes.push(route("198.19.0.0", 16, 7, None, 0));
        k.neighbours = vec![
            neigh("198.18.1.2", 5, Some(MAC_C), NeighState::Reachable),
            neigh("198.19.0.3", 7, Some(MAC_GW), NeighState::Reachable),
            neigh(
                "198.19.0.12",
                7,
                Some([2, 0, 0, 0, 0xb, 2]),
                NeighState::Reachable,
            ),
            neigh("198.19.0.11", 7, Some(MAC_B1), NeighState::Reachable),
        ];
        let b = build(&c, &k);
        // The static default route stays; of four mirrored routes the two
        // /24s that sort first fit.
        assert_eq!(
            b.snapshot.routes,
            vec![
                rr("198.18.1.0", 24, 0, None),
                rr("198.18.7.0", 24, 1, Some("198.19.0.11")),
                rr("0.0.0.0", 0, 0, Some("198.18.1.2")),
            ]
        );
        assert_eq!(b.routes_dropped, 2);
        // Hops now: 198.18.1.2 (gateway of the default) and 198.19.0.11
        // (gateway of 198.18.7.0/24); the backends have no route of their
        // own but the default via the client side, so they are not hops.
        assert_eq!(
            b.snapshot.neighbours,
            vec![nr("198.18.1.2", 0, MAC_C), nr("198.19.0.11", 1, MAC_B1)]
        );
        assert_eq!(b.neighbours_dropped, 2);
    }
}
