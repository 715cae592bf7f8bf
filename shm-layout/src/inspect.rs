//! Read-side inspection of a region, shared by controld's admin API and the
//! tools: the names of the ABI's enumerations, and a census of the
//! connection table with a filtered listing of its connections.
//!
//! Everything here only reads (seqlock snapshots and relaxed loads), so it
//! works on a read-only mapping of a live or abandoned region.

use crate::Region;
use crate::config_slot::{
    ConfigView, MAX_PORTS, MODE_DR, MODE_NAT, MODE_TUNNEL, PROTO_TCP, PROTO_UDP, SCHED_MAGLEV,
    SCHED_SH, SCHED_WLC, SCHED_WRR,
};
use crate::conntrack::{
    CONN_MIDFLOW, Conn, KIND_FWD, KIND_REPLY, KIND_TOMB, STATE_ACTIVE, STATE_CLOSING,
    STATE_ESTABLISHED, STATE_PROVISIONAL, STATE_SYN, STATE_SYN_ACKED, STATE_SYNPROXY, Timeouts,
};
use crate::header::{REGION_INIT, REGION_READY, REGION_STOPPING};
use crate::routing_slot::RoutingView;
use crate::switch_slot::{SW_EMPTY, SW_FAILED, SW_RUNNING, SW_STARTING, SW_STOPPED};

/// `"tcp"`, `"udp"` or `"?"`.
pub fn proto_name(p: u8) -> &'static str {
    match p {
        PROTO_TCP => "tcp",
        PROTO_UDP => "udp",
        _ => "?",
    }
}

/// `"nat"`, `"dr"`, `"tunnel"` or `"?"`.
pub fn mode_name(m: u8) -> &'static str {
    match m {
        MODE_NAT => "nat",
        MODE_DR => "dr",
        MODE_TUNNEL => "tunnel",
        _ => "?",
    }
}

/// `"maglev"`, `"wrr"`, `"wlc"`, `"sh"` or `"?"`.
pub fn scheduler_name(s: u8) -> &'static str {
    match s {
        SCHED_MAGLEV => "maglev",
        SCHED_WRR => "wrr",
        SCHED_WLC => "wlc",
        SCHED_SH => "sh",
        _ => "?",
    }
}

/// A connection entry's `tcp_state` (`"active"` for UDP).
pub fn conn_state_name(s: u32) -> &'static str {
    match s {
        STATE_SYN => "syn",
        STATE_ESTABLISHED => "established",
        STATE_CLOSING => "closing",
        STATE_ACTIVE => "active",
        STATE_SYN_ACKED => "syn_acked",
        STATE_PROVISIONAL => "provisional",
        STATE_SYNPROXY => "synproxy",
        _ => "?",
    }
}

/// A switch slot's `state`.
pub fn switch_state_name(s: u32) -> &'static str {
    match s {
        SW_EMPTY => "empty",
        SW_STARTING => "starting",
        SW_RUNNING => "running",
        SW_STOPPED => "stopped",
        SW_FAILED => "failed",
        _ => "?",
    }
}

/// The region header's `state`.
pub fn region_state_name(s: u32) -> &'static str {
    match s {
        REGION_INIT => "init",
        REGION_READY => "ready",
        REGION_STOPPING => "stopping",
        _ => "?",
    }
}

/// A count or range in a published slot that the slot cannot hold. The
/// views clamp every such count (a reader never indexes past a slot), so a
/// defect means a corrupted region, not a crash; readers report defects so
/// that clamped output is never mistaken for the truth.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SlotDefect {
    #[error("{table}: {field} {found} exceeds the slot's capacity of {capacity}")]
    CountOverCapacity {
        table: &'static str,
        field: &'static str,
        found: u32,
        capacity: usize,
    },
    #[error(
        "config: service {service}: backend_count {count} (from backend_start {start}) exceeds the slot's {available} backends"
    )]
    BackendRange {
        service: usize,
        start: u32,
        count: u32,
        available: usize,
    },
    #[error(
        "config: service {service}: table_len {len} (from table_start {start}) exceeds the slot's {available} table entries"
    )]
    TableRange {
        service: usize,
        start: u32,
        len: u32,
        available: usize,
    },
    #[error(
        "config: service {service}: lookup table entry {index} names backend {entry} of its {backends}"
    )]
    TableEntry {
        service: usize,
        index: usize,
        entry: u16,
        backends: usize,
    },
}

/// Every count and range of a configuration slot that its capacities do not
/// hold (at most one table-entry defect per service).
pub fn config_defects(v: &ConfigView<'_>) -> Vec<SlotDefect> {
    let mut out = Vec::new();
    let h = v.header;
    for (field, found, capacity) in [
        ("n_services", h.n_services, v.services.len()),
        ("n_backends", h.n_backends, v.backends.len()),
        ("n_ports", h.n_ports, MAX_PORTS),
    ] {
        if found as usize > capacity {
            out.push(SlotDefect::CountOverCapacity {
                table: "config",
                field,
                found,
                capacity,
            });
        }
    }
    let available = v.backends().len();
    for (i, s) in v.services().iter().enumerate() {
        let end = (s.backend_start as u64) + s.backend_count as u64;
        if end > available as u64 {
            out.push(SlotDefect::BackendRange {
                service: i,
                start: s.backend_start,
                count: s.backend_count,
                available,
            });
        }
        let tend = (s.table_start as u64) + s.table_len as u64;
        if tend > v.maglev.len() as u64 {
            out.push(SlotDefect::TableRange {
                service: i,
                start: s.table_start,
                len: s.table_len,
                available: v.maglev.len(),
            });
        }
        let backends = v.service_backends(s).len();
        if let Some((index, &entry)) = v
            .service_table(s)
            .iter()
            .enumerate()
            .find(|&(_, &e)| e as usize >= backends)
        {
            out.push(SlotDefect::TableEntry {
                service: i,
                index,
                entry,
                backends,
            });
        }
    }
    out
}

/// Every count of a routing slot that its capacities do not hold.
pub fn routing_defects(v: &RoutingView<'_>) -> Vec<SlotDefect> {
    [
        ("n_routes", v.header.n_routes, v.routes.len()),
        ("n_neighbours", v.header.n_neighbours, v.neighbours.len()),
    ]
    .into_iter()
    .filter(|&(_, found, capacity)| found as usize > capacity)
    .map(|(field, found, capacity)| SlotDefect::CountOverCapacity {
        table: "routing",
        field,
        found,
        capacity,
    })
    .collect()
}

/// Which connections a listing keeps (every `Some` must match) and how many.
/// Addresses are IPv4 in host byte order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnFilter {
    pub vip: Option<u32>,
    pub client: Option<u32>,
    pub backend_ip: Option<u32>,
    pub backend_id: Option<u32>,
    /// At most this many are listed (all matches are still counted).
    pub limit: usize,
}

impl ConnFilter {
    pub fn matches(&self, c: &Conn) -> bool {
        self.vip.is_none_or(|v| v == c.vip)
            && self.client.is_none_or(|v| v == c.client_ip)
            && self.backend_ip.is_none_or(|v| v == c.backend_ip)
            && self.backend_id.is_none_or(|v| v == c.backend_id)
    }
}

/// One connection as listed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnInfo {
    /// Index of its forward slot.
    pub slot: u32,
    pub conn: Conn,
    /// `tcp_state` (see [`conn_state_name`]).
    pub state: u32,
    pub idle_ms: u32,
    /// Idle past its state's timeout, not yet collected.
    pub expired: bool,
    pub midflow: bool,
    pub packets: u64,
    pub bytes: u64,
}

/// What the connection table holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConnCensus {
    pub slots: u64,
    /// Forward slots: one per connection.
    pub connections: u64,
    pub reply_slots: u64,
    pub tombstones: u64,
    /// Slots a writer held during the scan (not counted elsewhere).
    pub busy_slots: u64,
    pub expired_not_collected: u64,
    /// Live (not expired) connections picked up mid-flow and not yet
    /// confirmed (`STATE_PROVISIONAL`).
    pub provisional: u64,
    /// Live TCP connections whose handshake has not completed
    /// (`STATE_SYN`, `STATE_SYN_ACKED`).
    pub half_open: u64,
    /// Connections that matched the filter (listed or not).
    pub matched: u64,
    /// The first `limit` matches, in slot order.
    pub list: Vec<ConnInfo>,
}

/// Scans the whole connection table once: counts every kind of slot and
/// lists the connections `filter` keeps. `timeouts` judge expiry (use the
/// active configuration's).
pub fn scan_conns(r: &Region, timeouts: &Timeouts, filter: &ConnFilter) -> ConnCensus {
    let ct = r.conntrack_reader();
    let now_ms = r.now_ms();
    let mut out = ConnCensus {
        slots: ct.capacity() as u64,
        ..Default::default()
    };
    for idx in 0..ct.capacity() as u32 {
        if ct.holder(idx).is_some() {
            out.busy_slots += 1;
            continue;
        }
        let Some(snap) = ct.snapshot(idx) else {
            continue;
        };
        match snap.kind() {
            KIND_REPLY => out.reply_slots += 1,
            KIND_TOMB => out.tombstones += 1,
            KIND_FWD => {
                out.connections += 1;
                let expired = ct.expired(idx, now_ms, timeouts);
                out.expired_not_collected += expired as u64;
                if !expired {
                    match ct.reading(idx).tcp_state {
                        STATE_PROVISIONAL => out.provisional += 1,
                        STATE_SYN | STATE_SYN_ACKED | STATE_SYNPROXY => out.half_open += 1,
                        _ => {}
                    }
                }
                let Some(conn) = snap.conn() else { continue };
                if !filter.matches(&conn) {
                    continue;
                }
                out.matched += 1;
                if out.list.len() < filter.limit {
                    let slot = ct.reading(idx);
                    out.list.push(ConnInfo {
                        slot: idx,
                        conn,
                        state: slot.tcp_state,
                        idle_ms: now_ms.wrapping_sub(slot.last_seen),
                        expired,
                        midflow: conn.flags & CONN_MIDFLOW != 0,
                        packets: slot.packets,
                        bytes: slot.bytes,
                    });
                }
            }
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_keeps_only_what_every_given_field_matches() {
        let c = Conn {
            vip: 1,
            client_ip: 2,
            backend_ip: 3,
            backend_id: 4,
            ..Default::default()
        };
        assert!(ConnFilter::default().matches(&c));
        let f = ConnFilter {
            vip: Some(1),
            client: Some(2),
            backend_ip: Some(3),
            backend_id: Some(4),
            limit: 0,
        };
        assert!(f.matches(&c));
        for g in [
            ConnFilter { vip: Some(9), ..f },
            ConnFilter {
                client: Some(9),
                ..f
            },
            ConnFilter {
                backend_ip: Some(9),
                ..f
            },
            ConnFilter {
                backend_id: Some(9),
                ..f
            },
        ] {
            assert!(!g.matches(&c), "{g:?}");
        }
    }
}
