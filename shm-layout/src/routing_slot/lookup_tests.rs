//! Lookup through a routing view: longest prefix first, neighbour
//! resolution of the next hop, and the header counts clipping the arrays.
//! (Written against the mutants cargo-mutants left alive; see docs/TESTING.md.)

use core::sync::atomic::AtomicU64;

use super::*;

const fn ip(a: u8, b: u8, c: u8, d: u8) -> u32 {
    u32::from_be_bytes([a, b, c, d])
}

fn header(n_routes: u32, n_neighbours: u32) -> RoutingHeader {
    RoutingHeader {
        stamp: AtomicU64::new(1),
        checksum: 0,
        n_routes,
        n_neighbours,
        _pad: [0; 40],
    }
}

fn route(prefix: u32, len: u8, port: u32, via: u32) -> RouteRec {
    RouteRec {
        prefix,
        len,
        _pad: [0; 3],
        port,
        via,
    }
}

fn neighbour(ip: u32, port: u32, last: u8, state: u8) -> NeighbourRec {
    NeighbourRec {
        ip,
        port,
        mac: [2, 0, 0, 0, 0, last],
        state,
        _pad: 0,
    }
}

/// Longest first: 198.18.1.0/24 on port 1 (connected), 198.18.0.0/16 on
/// port 2 via 198.18.9.1, default on port 3 via 198.18.9.2.
fn routes() -> [RouteRec; 3] {
    [
        route(ip(198, 18, 1, 0), 24, 1, 0),
        route(ip(198, 18, 0, 0), 16, 2, ip(198, 18, 9, 1)),
        route(0, 0, 3, ip(198, 18, 9, 2)),
    ]
}

/// Sorted by address; 198.18.1.7 is present but not valid.
fn neighbours() -> [NeighbourRec; 4] {
    [
        neighbour(ip(198, 18, 1, 5), 1, 0x15, NEIGH_VALID),
        neighbour(ip(198, 18, 1, 7), 1, 0x17, 0),
        neighbour(ip(198, 18, 9, 1), 2, 0x91, NEIGH_VALID),
        neighbour(ip(198, 18, 9, 2), 3, 0x92, NEIGH_VALID),
    ]
}

#[test]
fn next_hop_of_a_connected_destination_is_the_destination_itself() {
    let (h, r, n) = (header(3, 4), routes(), neighbours());
    let v = RoutingView {
        header: &h,
        routes: &r,
        neighbours: &n,
    };
    assert_eq!(
        v.next_hop(ip(198, 18, 1, 5)),
        Ok(NextHop {
            port: 1,
            mac: [2, 0, 0, 0, 0, 0x15]
        })
    );
}

#[test]
fn next_hop_through_a_gateway_uses_the_gateway_mac_and_the_route_port() {
    let (h, r, n) = (header(3, 4), routes(), neighbours());
    let v = RoutingView {
        header: &h,
        routes: &r,
        neighbours: &n,
    };
    // 198.18.2.3 matches only the /16: via 198.18.9.1 on port 2.
    assert_eq!(
        v.next_hop(ip(198, 18, 2, 3)),
        Ok(NextHop {
            port: 2,
            mac: [2, 0, 0, 0, 0, 0x91]
        })
    );
    // Anything else takes the default route.
    assert_eq!(
        v.next_hop(ip(203, 0, 113, 1)),
        Ok(NextHop {
            port: 3,
            mac: [2, 0, 0, 0, 0, 0x92]
        })
    );
}

#[test]
fn the_longest_matching_prefix_wins() {
    let (h, r, n) = (header(3, 4), routes(), neighbours());
    let v = RoutingView {
        header: &h,
        routes: &r,
        neighbours: &n,
    };
    assert_eq!(v.route(ip(198, 18, 1, 200)), Some(&r[0]));
    assert_eq!(v.route(ip(198, 18, 200, 1)), Some(&r[1]));
    assert_eq!(v.route(ip(10, 0, 0, 1)), Some(&r[2]));
}

#[test]
fn missing_or_invalid_neighbour_is_no_neighbour() {
    let (h, r, n) = (header(3, 4), routes(), neighbours());
    let v = RoutingView {
        header: &h,
        routes: &r,
        neighbours: &n,
    };
    // Connected, but nobody at .6.
    assert_eq!(v.next_hop(ip(198, 18, 1, 6)), Err(NoRoute::NoNeighbour));
    // Present in the table, but not valid.
    assert_eq!(v.neighbour(ip(198, 18, 1, 7)), None);
    assert_eq!(v.next_hop(ip(198, 18, 1, 7)), Err(NoRoute::NoNeighbour));
    assert_eq!(v.neighbour(ip(198, 18, 9, 2)), Some(&n[3]));
}

#[test]
fn no_matching_route_is_no_route() {
    let (h, r, n) = (header(2, 4), routes(), neighbours());
    // The header publishes only the two specific routes: no default.
    let v = RoutingView {
        header: &h,
        routes: &r,
        neighbours: &n,
    };
    assert_eq!(v.routes().len(), 2);
    assert_eq!(v.route(ip(10, 0, 0, 1)), None);
    assert_eq!(v.next_hop(ip(10, 0, 0, 1)), Err(NoRoute::NoRoute));
}

#[test]
fn header_counts_clip_the_arrays_and_never_reach_past_them() {
    let (r, n) = (routes(), neighbours());
    let h = header(1, 2);
    let v = RoutingView {
        header: &h,
        routes: &r,
        neighbours: &n,
    };
    assert_eq!(v.routes(), &r[..1]);
    assert_eq!(v.neighbours(), &n[..2]);
    // 198.18.9.1 is beyond the published neighbour count.
    assert_eq!(v.neighbour(ip(198, 18, 9, 1)), None);
    // Counts larger than the arrays are clipped to the arrays.
    let h = header(99, 99);
    let v = RoutingView {
        header: &h,
        routes: &r,
        neighbours: &n,
    };
    assert_eq!(v.routes().len(), 3);
    assert_eq!(v.neighbours().len(), 4);
}
