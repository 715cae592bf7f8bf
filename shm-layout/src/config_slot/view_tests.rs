//! The read view's accessors: published counts clip the arrays, ranges out
//! of bounds give empty slices, unknown ids keep connections, the header's
//! timeouts reach the connection table, and the index sizes.
//! (Written against the mutants cargo-mutants left alive; see docs/TESTING.md.)

use core::sync::atomic::AtomicU64;

use super::*;

fn header(n_services: u32, n_backends: u32, n_ports: u32) -> ConfigHeader {
    ConfigHeader {
        stamp: AtomicU64::new(1),
        checksum: 0,
        n_services,
        n_backends,
        n_ports,
        maglev_m: 7,
        tcp_syn_ms: 11,
        tcp_established_ms: 22,
        tcp_fin_ms: 33,
        udp_ms: 44,
        tunnel_src: 0,
        tcp_provisional_ms: 55,
        ports: [PortRec::default(); MAX_PORTS],
        syn_proxy_auto_syn_rate: 0,
        syn_proxy_auto_occupancy_permille: 0,
        cookie_secrets: [[0; 2]; 2],
        _pad_cookies: [0; 32],
    }
}

fn service(vip: u32, port: u16, backend_start: u32, backend_count: u32) -> ServiceRec {
    ServiceRec {
        vip,
        port,
        proto: PROTO_TCP,
        backend_start,
        backend_count,
        table_start: backend_start * 7,
        table_len: 7,
        ..ServiceRec::default()
    }
}

fn backend(id: u32) -> BackendRec {
    BackendRec {
        id,
        ip: 0xc612_0000 + id,
        ..BackendRec::default()
    }
}

const VIP: u32 = 0xc612_0101; // 198.18.1.1

#[test]
fn header_timeouts_are_handed_to_the_connection_table_field_by_field() {
    let t = header(0, 0, 0).timeouts();
    assert_eq!(
        (
            t.tcp_syn_ms,
            t.tcp_established_ms,
            t.tcp_fin_ms,
            t.udp_ms,
            t.tcp_provisional_ms
        ),
        (11, 22, 33, 44, 55)
    );
}

#[test]
fn index_length_is_a_power_of_two_at_least_twice_the_services_and_at_least_16() {
    assert_eq!(index_len(0), 16);
    assert_eq!(index_len(8), 16);
    assert_eq!(index_len(9), 32);
    assert_eq!(index_len(16), 32);
    assert_eq!(index_len(17), 64);
    assert_eq!(index_len(1000), 2048);
}

#[test]
fn published_counts_clip_services_backends_and_ports() {
    let mut h = header(2, 3, 2);
    h.ports[1].mtu = 9000;
    let services = [
        service(VIP, 80, 0, 2),
        service(VIP, 443, 2, 1),
        service(VIP, 22, 0, 0),
    ];
    let backends = [backend(1), backend(2), backend(3), backend(4)];
    let v = ConfigView {
        header: &h,
        services: &services,
        backends: &backends,
        maglev: &[],
        down_action: &[],
        service_index: &[],
        vip_index: &[],
    };
    assert_eq!(v.services().len(), 2);
    assert_eq!(
        v.backends().iter().map(|b| b.id).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    assert_eq!(v.ports().len(), 2);
    assert_eq!(v.ports()[1].mtu, 9000);
    // The unpublished third service is not found, even by a scan.
    assert!(v.find_service(VIP, 22, PROTO_TCP).is_none());
    assert_eq!(v.find_service(VIP, 443, PROTO_TCP).map(|(i, _)| i), Some(1));

    // Counts that lie are bounded by the arrays (and MAX_PORTS).
    let h = header(99, 99, 99);
    let v = ConfigView { header: &h, ..v };
    assert_eq!(v.services().len(), 3);
    assert_eq!(v.backends().len(), 4);
    assert_eq!(v.ports().len(), MAX_PORTS);
}

#[test]
fn a_service_sees_exactly_its_backends_and_its_maglev_table() {
    let h = header(2, 3, 0);
    let services = [service(VIP, 80, 0, 2), service(VIP, 443, 2, 1)];
    let backends = [backend(1), backend(2), backend(3)];
    let maglev: Vec<u16> = (0..21).collect();
    let v = ConfigView {
        header: &h,
        services: &services,
        backends: &backends,
        maglev: &maglev,
        down_action: &[],
        service_index: &[],
        vip_index: &[],
    };
    let ids = |s: &ServiceRec| {
        v.service_backends(s)
            .iter()
            .map(|b| b.id)
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(&services[0]), [1, 2]);
    assert_eq!(ids(&services[1]), [3]);
    assert_eq!(v.service_table(&services[0]), &maglev[..7]);
    assert_eq!(v.service_table(&services[1]), &maglev[14..21]); // table_start 2 * 7
}

#[test]
fn ranges_past_the_published_arrays_are_empty() {
    let h = header(1, 2, 0);
    let backends = [backend(1), backend(2), backend(3)];
    let maglev = [0u16; 7];
    // The third backend exists in the array but is not published.
    let s = service(VIP, 80, 1, 2);
    let v = ConfigView {
        header: &h,
        services: core::slice::from_ref(&s),
        backends: &backends,
        maglev: &maglev,
        down_action: &[],
        service_index: &[],
        vip_index: &[],
    };
    assert!(v.service_backends(&s).is_empty());
    assert!(v.service_table(&s).is_empty()); // table 7..14 of 7 entries
    // A range whose end overflows is empty, not a panic.
    let huge = ServiceRec {
        backend_start: u32::MAX,
        backend_count: u32::MAX,
        table_start: u32::MAX,
        table_len: u32::MAX,
        ..s
    };
    assert!(v.service_backends(&huge).is_empty());
    assert!(v.service_table(&huge).is_empty());
}

#[test]
fn down_action_is_read_per_id_and_unknown_ids_keep_their_connections() {
    let h = header(0, 0, 0);
    let actions = [ON_DOWN_KEEP, ON_DOWN_RESET, ON_DOWN_RESCHEDULE];
    let v = ConfigView {
        header: &h,
        services: &[],
        backends: &[],
        maglev: &[],
        down_action: &actions,
        service_index: &[],
        vip_index: &[],
    };
    assert_eq!(v.down_action(1), ON_DOWN_RESET);
    assert_eq!(v.down_action(2), ON_DOWN_RESCHEDULE);
    assert_eq!(v.down_action(3), ON_DOWN_KEEP);
    assert_eq!(v.down_action(u32::MAX), ON_DOWN_KEEP);
}

#[test]
fn without_indexes_vips_and_services_are_found_by_scanning() {
    let h = header(2, 0, 0);
    let services = [service(VIP, 80, 0, 0), service(VIP + 1, 53, 0, 0)];
    let v = ConfigView {
        header: &h,
        services: &services,
        backends: &[],
        maglev: &[],
        down_action: &[],
        service_index: &[],
        vip_index: &[],
    };
    assert!(v.is_vip(VIP));
    assert!(v.is_vip(VIP + 1));
    assert!(!v.is_vip(VIP + 2));
    assert!(!v.is_vip(0));
    assert_eq!(
        v.find_service(VIP + 1, 53, PROTO_TCP).map(|(i, _)| i),
        Some(1)
    );
    assert!(v.find_service(VIP + 1, 53, PROTO_UDP).is_none());
}

/// Builds the indexes of `services` in slot-sized arrays.
fn indexes(services: &mut [ServiceRec]) -> (Vec<u16>, Vec<u32>) {
    let mut h = header(services.len() as u32, 0, 0);
    let len = index_len(services.len() as u32);
    let (mut si, mut vi) = (vec![0u16; len], vec![0u32; len]);
    ConfigSlotMut {
        header: &mut h,
        services,
        backends: &mut [],
        maglev: &mut [],
        down_action: &mut [],
        service_index: &mut si,
        vip_index: &mut vi,
    }
    .build_indexes();
    (si, vi)
}

/// 300 services as a real configuration has them: consecutive VIPs, a few
/// ports each, TCP and UDP.
fn clustered_services() -> Vec<ServiceRec> {
    (0..300u32)
        .map(|i| ServiceRec {
            vip: VIP + i / 6,
            port: [80, 443, 53][(i % 3) as usize],
            proto: if i % 6 < 3 { PROTO_TCP } else { PROTO_UDP },
            ..ServiceRec::default()
        })
        .collect()
}

/// `index_len` promises that "a probe sequence ends at an empty entry
/// within a few steps": that holds only if keys that differ in the VIP, the
/// port or the protocol alone get different home entries. Bound: no entry
/// sits more than 16 places past its home (a hash that ignored a field
/// would pile the services up in runs of hundreds).
#[test]
fn index_probes_stay_short_for_consecutive_vips_ports_and_protocols() {
    let mut services = clustered_services();
    let (si, vi) = indexes(&mut services);
    let len = si.len();
    let mut worst = 0;
    for (pos, &e) in si.iter().enumerate() {
        if e != 0 {
            let s = &services[e as usize - 1];
            let home = service_home(s.vip, s.port, s.proto, len);
            worst = worst.max(pos.wrapping_sub(home) & (len - 1));
        }
    }
    assert!(worst <= 16, "a service sits {worst} entries past its home");
    let mut worst = 0;
    for (pos, &v) in vi.iter().enumerate() {
        if v != 0 {
            worst = worst.max(pos.wrapping_sub(vip_home(v, len)) & (len - 1));
        }
    }
    assert!(worst <= 16, "a VIP sits {worst} entries past its home");
    // And every service and VIP is found through them.
    assert_eq!(si.iter().filter(|&&e| e != 0).count(), 300);
    assert_eq!(vi.iter().filter(|&&v| v != 0).count(), 50);
}

/// As above for one VIP listening on 200 consecutive ports (a port range
/// published as services): ports that differ only in their low byte must
/// not share a home.
#[test]
fn index_probes_stay_short_for_consecutive_ports_of_one_vip() {
    let mut services: Vec<ServiceRec> = (0..200u16)
        .map(|i| ServiceRec {
            vip: VIP,
            port: 8000 + i,
            proto: PROTO_TCP,
            ..ServiceRec::default()
        })
        .collect();
    let (si, _) = indexes(&mut services);
    let len = si.len();
    let mut worst = 0;
    for (pos, &e) in si.iter().enumerate() {
        if e != 0 {
            let s = &services[e as usize - 1];
            let home = service_home(s.vip, s.port, s.proto, len);
            worst = worst.max(pos.wrapping_sub(home) & (len - 1));
        }
    }
    assert!(worst <= 16, "a service sits {worst} entries past its home");
    assert_eq!(si.iter().filter(|&&e| e != 0).count(), 200);
}

/// A VIP whose home entry in an index of `len` is `home`.
fn vip_with_home(home: usize, len: usize, skip: u32) -> u32 {
    (VIP + skip..).find(|&v| vip_home(v, len) == home).unwrap()
}

/// Linear probing, as the index is specified, walked independently of
/// `is_vip`: where `vip` is found from its home, stopping at an empty entry.
fn probe_position(index: &[u32], vip: u32) -> Option<usize> {
    let len = index.len();
    let mut i = vip_home(vip, len);
    for _ in 0..len {
        if index[i] == vip {
            return Some(i);
        }
        if index[i] == 0 {
            return None;
        }
        i = (i + 1) % len;
    }
    None
}

#[test]
fn vip_lookup_probes_past_a_taken_home_and_wraps_at_the_end() {
    let len = 16;
    // `a` and `b` both live at home 15: `b` wraps round to entry 0.
    let a = vip_with_home(15, len, 0);
    let b = vip_with_home(15, len, a - VIP + 1);
    // `c` lives at home 0 and finds it taken by `b`: entry 1.
    let c = vip_with_home(0, len, 0);
    // `d` has home 15 too but is absent: the probe passes a, b, c and stops
    // at the empty entry 2.
    let d = vip_with_home(15, len, b - VIP + 1);
    let mut index = vec![0u32; len];
    index[15] = a;
    index[0] = b;
    index[1] = c;
    let h = header(0, 0, 0);
    let v = ConfigView {
        header: &h,
        services: &[],
        backends: &[],
        maglev: &[],
        down_action: &[],
        service_index: &[],
        vip_index: &index,
    };
    assert!(v.is_vip(a) && v.is_vip(b) && v.is_vip(c));
    assert!(!v.is_vip(d));
    // Address 0 marks empty entries: it is never a VIP.
    assert!(!v.is_vip(0));
}

#[test]
fn built_vip_index_places_colliding_vips_where_linear_probing_finds_them() {
    // In the smallest index (16 entries): three VIPs at home 15 (two wrap
    // round), one at home 0, one at home 7.
    let a = vip_with_home(15, 16, 0);
    let b = vip_with_home(15, 16, a - VIP + 1);
    let c = vip_with_home(15, 16, b - VIP + 1);
    let d = vip_with_home(0, 16, 0);
    let e = vip_with_home(7, 16, 0);
    let mut services: Vec<ServiceRec> = [a, b, c, d, e]
        .iter()
        .map(|&v| service(v, 80, 0, 0))
        .collect();
    let (_, vi) = indexes(&mut services);
    assert_eq!(vi.len(), 16);
    let displaced = services
        .iter()
        .filter(|s| probe_position(&vi, s.vip) != Some(vip_home(s.vip, vi.len())))
        .count();
    assert!(displaced > 0, "the test needs a collision");
    for s in &services {
        assert!(
            probe_position(&vi, s.vip).is_some(),
            "VIP {:#x} not reachable",
            s.vip
        );
    }
    assert_eq!(vi.iter().filter(|&&v| v != 0).count(), 5);
    assert_eq!((vi[15], vi[0], vi[1], vi[2]), (a, b, c, d));
}

#[test]
fn a_slot_without_index_arrays_builds_nothing_and_is_answered_by_scanning() {
    let mut h = header(2, 0, 0);
    let mut services = [service(VIP, 80, 0, 0), service(0, 53, 0, 0)];
    ConfigSlotMut {
        header: &mut h,
        services: &mut services,
        backends: &mut [],
        maglev: &mut [],
        down_action: &mut [],
        service_index: &mut [],
        vip_index: &mut [],
    }
    .build_indexes();
    let v = ConfigView {
        header: &h,
        services: &services,
        backends: &[],
        maglev: &[],
        down_action: &[],
        service_index: &[],
        vip_index: &[],
    };
    assert!(v.is_vip(VIP));
    assert_eq!(v.find_service(VIP, 80, PROTO_TCP).map(|(i, _)| i), Some(0));
}

#[test]
fn built_service_index_places_colliding_services_where_linear_probing_finds_them() {
    // Five services (index of 16 entries), three of them at home 15 (two
    // wrap round to entries 0 and 1).
    let at_home = |home: usize, from: u16| {
        (from..)
            .find(|&p| service_home(VIP, p, PROTO_TCP, 16) == home)
            .unwrap()
    };
    let p1 = at_home(15, 1);
    let p2 = at_home(15, p1 + 1);
    let p3 = at_home(15, p2 + 1);
    let p4 = at_home(7, 1);
    let p5 = at_home(3, 1);
    let mut services: Vec<ServiceRec> = [p1, p2, p3, p4, p5]
        .iter()
        .map(|&p| service(VIP, p, 0, 0))
        .collect();
    let (si, vi) = indexes(&mut services);
    assert_eq!(si.len(), 16);
    assert_eq!((si[15], si[0], si[1]), (1, 2, 3));
    let h = header(5, 0, 0);
    let v = ConfigView {
        header: &h,
        services: &services,
        backends: &[],
        maglev: &[],
        down_action: &[],
        service_index: &si,
        vip_index: &vi,
    };
    for (i, &p) in [p1, p2, p3, p4, p5].iter().enumerate() {
        assert_eq!(v.find_service(VIP, p, PROTO_TCP).map(|(i, _)| i), Some(i));
    }
}
