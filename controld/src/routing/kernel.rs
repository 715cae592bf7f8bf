//! rtnetlink messages (as netlink-packet-route decodes them) to the plain
//! records of [`super::table`]. Pure: which kernel entries the mirror
//! considers is decided here.

use std::net::Ipv4Addr;

use netlink_packet_route::link::{LinkAttribute, LinkMessage};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteNextHopFlags, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

use super::table::{KernelLink, KernelNeighbour, KernelRoute, NeighState};

/// An interface: its index and name (`None` without a name).
pub fn link(msg: &LinkMessage) -> Option<KernelLink> {
    let name = msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.clone()),
        _ => None,
    })?;
    Some(KernelLink {
        index: msg.header.index,
        name,
    })
}

/// The routes the mirror considers in one route message: IPv4, main table,
/// unicast, no TOS; one record per next hop (a multipath route gives one
/// per live hop, in the kernel's order, all with the route's metric).
/// Anything else (local, broadcast, blackhole, unreachable and prohibit
/// routes, other tables, IPv6 gateways) gives none.
pub fn routes(msg: &RouteMessage) -> Vec<KernelRoute> {
    let h = &msg.header;
    let table = msg
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(h.table));
    if h.address_family != AddressFamily::Inet
        || table != u32::from(RouteHeader::RT_TABLE_MAIN)
        || h.kind != RouteType::Unicast
        || h.tos != 0
        || h.destination_prefix_length > 32
    {
        return Vec::new();
    }
    let mut prefix = Ipv4Addr::UNSPECIFIED;
    let mut oif = None;
    let mut gateway = None;
    let mut metric = 0;
    let mut hops = Vec::new();
    for a in &msg.attributes {
        match a {
            RouteAttribute::Destination(RouteAddress::Inet(d)) => prefix = *d,
            RouteAttribute::Destination(_) => return Vec::new(),
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Gateway(RouteAddress::Inet(g)) => gateway = Some(*g),
            RouteAttribute::Gateway(_) | RouteAttribute::Via(_) => return Vec::new(),
            RouteAttribute::Priority(p) => metric = *p,
            RouteAttribute::MultiPath(nh) => {
                for hop in nh {
                    if hop.flags.contains(RouteNextHopFlags::Dead) {
                        continue;
                    }
                    let mut gw = None;
                    let mut v4 = true;
                    for a in &hop.attributes {
                        match a {
                            RouteAttribute::Gateway(RouteAddress::Inet(g)) => gw = Some(*g),
                            RouteAttribute::Gateway(_) | RouteAttribute::Via(_) => v4 = false,
                            _ => {}
                        }
                    }
                    if v4 {
                        hops.push((hop.interface_index, gw));
                    }
                }
            }
            _ => {}
        }
    }
    if let Some(oif) = oif {
        hops.insert(0, (oif, gateway));
    }
    hops.into_iter()
        .map(|(oif, gateway)| KernelRoute {
            prefix,
            len: h.destination_prefix_length,
            oif,
            gateway,
            metric,
        })
        .collect()
}

/// An IPv4 neighbour entry (proxy entries and other families give `None`).
pub fn neighbour(msg: &NeighbourMessage) -> Option<KernelNeighbour> {
    let h = &msg.header;
    if h.family != AddressFamily::Inet || h.flags.contains(NeighbourFlags::Proxy) {
        return None;
    }
    let mut address = None;
    let mut mac = None;
    for a in &msg.attributes {
        match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => address = Some(*ip),
            NeighbourAttribute::LinkLayerAddress(l) => mac = <[u8; 6]>::try_from(&l[..]).ok(),
            _ => {}
        }
    }
    Some(KernelNeighbour {
        address: address?,
        ifindex: h.ifindex,
        mac,
        state: match h.state {
            NeighbourState::Incomplete => NeighState::Incomplete,
            NeighbourState::Reachable => NeighState::Reachable,
            NeighbourState::Stale => NeighState::Stale,
            NeighbourState::Delay => NeighState::Delay,
            NeighbourState::Probe => NeighState::Probe,
            NeighbourState::Failed => NeighState::Failed,
            NeighbourState::Noarp => NeighState::Noarp,
            NeighbourState::Permanent => NeighState::Permanent,
            _ => NeighState::None,
        },
    })
}

/// Whether a change notification can change the mirror (links, IPv4
/// routes, IPv4 neighbours); IPv6 churn is ignored.
pub fn relevant(msg: &RouteNetlinkMessage) -> bool {
    match msg {
        RouteNetlinkMessage::NewLink(_) | RouteNetlinkMessage::DelLink(_) => true,
        RouteNetlinkMessage::NewRoute(r) | RouteNetlinkMessage::DelRoute(r) => {
            r.header.address_family == AddressFamily::Inet
        }
        RouteNetlinkMessage::NewNeighbour(n) | RouteNetlinkMessage::DelNeighbour(n) => {
            n.header.family == AddressFamily::Inet
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_route::route::{RouteNextHop, RouteScope};

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn route_msg(len: u8, attrs: Vec<RouteAttribute>) -> RouteMessage {
        let mut m = RouteMessage::default();
        m.header.address_family = AddressFamily::Inet;
        m.header.destination_prefix_length = len;
        m.header.table = RouteHeader::RT_TABLE_MAIN;
        m.header.kind = RouteType::Unicast;
        m.header.scope = RouteScope::Universe;
        m.attributes = attrs;
        m
    }

    fn kr(prefix: &str, len: u8, oif: u32, gw: Option<&str>, metric: u32) -> KernelRoute {
        KernelRoute {
            prefix: ip(prefix),
            len,
            oif,
            gateway: gw.map(ip),
            metric,
        }
    }

    #[test]
    fn connected_gateway_and_default_routes() {
        let connected = route_msg(
            24,
            vec![
                RouteAttribute::Table(254),
                RouteAttribute::Destination(RouteAddress::Inet(ip("198.19.0.0"))),
                RouteAttribute::PrefSource(RouteAddress::Inet(ip("198.19.0.1"))),
                RouteAttribute::Oif(7),
            ],
        );
        assert_eq!(routes(&connected), vec![kr("198.19.0.0", 24, 7, None, 0)]);
        let via = route_msg(
            24,
            vec![
                RouteAttribute::Destination(RouteAddress::Inet(ip("198.18.7.0"))),
                RouteAttribute::Gateway(RouteAddress::Inet(ip("198.19.0.11"))),
                RouteAttribute::Priority(100),
                RouteAttribute::Oif(7),
            ],
        );
        assert_eq!(
            routes(&via),
            vec![kr("198.18.7.0", 24, 7, Some("198.19.0.11"), 100)]
        );
        let default = route_msg(
            0,
            vec![
                RouteAttribute::Gateway(RouteAddress::Inet(ip("198.18.1.2"))),
                RouteAttribute::Oif(5),
            ],
        );
        assert_eq!(
            routes(&default),
            vec![kr("0.0.0.0", 0, 5, Some("198.18.1.2"), 0)]
        );
    }

    #[test]
    fn other_tables_kinds_families_and_tos_are_skipped() {
        let base = || {
            route_msg(
                24,
                vec![
                    RouteAttribute::Destination(RouteAddress::Inet(ip("198.19.0.0"))),
                    RouteAttribute::Oif(7),
                ],
            )
        };
        let mut m = base();
        m.header.table = 255; // local
        assert!(routes(&m).is_empty());
        let mut m = base();
        m.header.table = 252;
        m.attributes.push(RouteAttribute::Table(1000));
        assert!(routes(&m).is_empty());
        for kind in [
            RouteType::Local,
            RouteType::Broadcast,
            RouteType::BlackHole,
            RouteType::Unreachable,
            RouteType::Prohibit,
            RouteType::Multicast,
        ] {
            let mut m = base();
            m.header.kind = kind;
            assert!(routes(&m).is_empty(), "{kind:?}");
        }
        let mut m = base();
        m.header.address_family = AddressFamily::Inet6;
        assert!(routes(&m).is_empty());
        let mut m = base();
        m.header.tos = 0x10;
        assert!(routes(&m).is_empty());
        // A table id above 255 in the attribute that is the main table.
        let mut m = base();
        m.header.table = 252;
        m.attributes.push(RouteAttribute::Table(254));
        assert_eq!(routes(&m), vec![kr("198.19.0.0", 24, 7, None, 0)]);
    }

    #[test]
    fn multipath_gives_each_live_hop() {
        let hop = |ifindex: u32, gw: &str, dead: bool| {
            let mut h = RouteNextHop::default();
            if dead {
                h.flags = RouteNextHopFlags::Dead;
            }
            h.interface_index = ifindex;
            h.attributes = vec![RouteAttribute::Gateway(RouteAddress::Inet(ip(gw)))];
            h
        };
        let m = route_msg(
            16,
            vec![
                RouteAttribute::Destination(RouteAddress::Inet(ip("198.18.0.0"))),
                RouteAttribute::Priority(5),
                RouteAttribute::MultiPath(vec![
                    hop(2, "192.0.2.1", false),
                    hop(7, "198.19.0.12", true),
                    hop(7, "198.19.0.11", false),
                ]),
            ],
        );
        assert_eq!(
            routes(&m),
            vec![
                kr("198.18.0.0", 16, 2, Some("192.0.2.1"), 5),
                kr("198.18.0.0", 16, 7, Some("198.19.0.11"), 5),
            ]
        );
    }

    #[test]
    fn neighbours_links_and_relevance() {
        let mut m = NeighbourMessage::default();
        m.header.family = AddressFamily::Inet;
        m.header.ifindex = 7;
        m.header.state = NeighbourState::Stale;
        m.attributes = vec![
            NeighbourAttribute::Destination(NeighbourAddress::Inet(ip("198.19.0.11"))),
            NeighbourAttribute::LinkLayerAddress(vec![2, 0, 0, 0, 0xb, 1]),
        ];
        assert_eq!(
            neighbour(&m),
            Some(KernelNeighbour {
                address: ip("198.19.0.11"),
                ifindex: 7,
                mac: Some([2, 0, 0, 0, 0xb, 1]),
                state: NeighState::Stale,
            })
        );
        let mut failed = m.clone();
        failed.header.state = NeighbourState::Failed;
        failed.attributes.truncate(1);
        assert_eq!(
            neighbour(&failed).map(|n| (n.mac, n.state)),
            Some((None, NeighState::Failed))
        );
        let mut proxy = m.clone();
        proxy.header.flags = NeighbourFlags::Proxy;
        assert_eq!(neighbour(&proxy), None);
        let mut v6 = m.clone();
        v6.header.family = AddressFamily::Inet6;
        assert_eq!(neighbour(&v6), None);
        assert!(relevant(&RouteNetlinkMessage::NewNeighbour(m)));
        assert!(!relevant(&RouteNetlinkMessage::DelNeighbour(v6)));

        let mut l = LinkMessage::default();
        l.header.index = 7;
        l.attributes = vec![LinkAttribute::IfName("br0".into())];
        assert_eq!(
            link(&l),
            Some(KernelLink {
                index: 7,
                name: "br0".into()
            })
        );
        assert!(relevant(&RouteNetlinkMessage::DelLink(l)));
        let mut r6 = RouteMessage::default();
        r6.header.address_family = AddressFamily::Inet6;
        assert!(!relevant(&RouteNetlinkMessage::NewRoute(r6)));
    }
}
