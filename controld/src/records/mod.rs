//! Closed-connection records: controld's side.
//!
//! Each loop tick drains every switch's records ring (one message = one
//! batch of records, `shm_layout::records`), and takes the records the GC
//! made itself (connections it expired). Every record is folded into
//! per-backend totals and two histograms (duration, bytes) for /metrics,
//! kept in a bounded ring of recent records for `lbctl flows`, and
//! written to the optional connection log ([`log`]).
//!
//! The pure part ([`Records::add`], [`Records::flows`], the metrics) is
//! tested without a region; [`Records::drain`] is the I/O edge.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use admin_proto::{BackendSel, FlowView, FlowsQuery, FlowsReply};
use shm_layout::Region;
use shm_layout::inspect::proto_name;
use shm_layout::msgring::RING_RECORDS;
use shm_layout::records::{ClosedRecord, decode_batch};

use crate::admin::metrics::escape_label;

pub mod log;

/// Recent records kept for `lbctl flows`.
pub const RECENT: usize = 10_000;
/// Messages read from one switch's ring per tick (the rest wait for the
/// next tick: a flood of closes never stalls the loop for long).
pub const MESSAGES_PER_TICK: usize = 256;

/// Upper bounds of the duration histogram's buckets, in seconds.
pub const DURATION_BUCKETS_S: [f64; 9] = [0.001, 0.01, 0.1, 0.5, 1.0, 10.0, 60.0, 600.0, 3600.0];
/// Upper bounds of the bytes histogram's buckets (both directions' IP bytes).
pub const BYTES_BUCKETS: [f64; 8] = [1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10];

/// What names a record's backend and service: the running configuration's
/// backend ids and service indexes.
#[derive(Clone, Debug, Default)]
pub struct Names {
    /// Backend id -> (service, backend).
    pub backends: BTreeMap<u32, (String, String)>,
    /// Service index (as in the configuration slot) -> name.
    pub services: Vec<String>,
}

/// A fixed-bucket histogram (Prometheus `_bucket`, `_sum`, `_count`).
#[derive(Clone, Debug, PartialEq)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Observations at or below each bound (not cumulative).
    counts: Vec<u64>,
    over: u64,
    sum: f64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: vec![0; bounds.len()],
            over: 0,
            sum: 0.0,
        }
    }

    pub fn observe(&mut self, v: f64) {
        self.sum += v;
        match self.bounds.iter().position(|b| v <= *b) {
            Some(i) => self.counts[i] += 1,
            None => self.over += 1,
        }
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().sum::<u64>() + self.over
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        let mut cum = 0;
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            cum += c;
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cum}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count());
        let _ = writeln!(out, "{name}_sum {}", self.sum);
        let _ = writeln!(out, "{name}_count {}", self.count());
    }
}

/// One backend's closed connections.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendTotals {
    pub closed: u64,
    pub to_backend_bytes: u64,
    pub to_client_bytes: u64,
}

/// controld's closed-connection state.
#[derive(Debug)]
pub struct Records {
    /// Ring messages handled (batches from switches), total.
    pub messages: u64,
    /// Ring messages that did not decode (counted, skipped).
    pub bad_messages: u64,
    /// Records handled (from switches and from the GC), total.
    pub records: u64,
    /// By (service, backend); a backend no longer configured by `id N`.
    pub backends: BTreeMap<(String, String), BackendTotals>,
    pub duration: Histogram,
    pub bytes: Histogram,
    recent: VecDeque<FlowView>,
    log: Option<log::ConnLog>,
    buf: Vec<u8>,
}

impl Default for Records {
    fn default() -> Self {
        Self {
            messages: 0,
            bad_messages: 0,
            records: 0,
            backends: BTreeMap::new(),
            duration: Histogram::new(&DURATION_BUCKETS_S),
            bytes: Histogram::new(&BYTES_BUCKETS),
            recent: VecDeque::new(),
            log: None,
            buf: Vec::new(),
        }
    }
}

/// Milliseconds since 1970 now.
pub fn unix_ms_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A record as operators see it. `offset_ms`: wall-clock milliseconds at
/// region millisecond 0 (region times are milliseconds since its creation).
pub fn view(r: &ClosedRecord, names: &Names, offset_ms: i64) -> FlowView {
    let c = &r.conn;
    let ep = |ip: u32, port: u16| format!("{}:{port}", Ipv4Addr::from(ip));
    let unix = |ms: u32| (offset_ms + i64::from(ms)).max(0) as u64;
    let named = names.backends.get(&c.backend_id);
    FlowView {
        created_unix_ms: unix(c.created_ms),
        closed_unix_ms: unix(r.closed_ms),
        duration_ms: u64::from(r.closed_ms.wrapping_sub(c.created_ms)),
        protocol: proto_name(c.proto).to_string(),
        service: named
            .map(|(s, _)| s.clone())
            .or_else(|| names.services.get(c.service as usize).cloned()),
        backend: named.map(|(s, b)| format!("{s}/{b}")),
        backend_id: c.backend_id,
        client: ep(c.client_ip, c.client_port),
        vip: ep(c.vip, c.vip_port),
        backend_address: ep(c.backend_ip, c.backend_port),
        reason: r.reason.name().to_string(),
        to_backend_packets: r.forward.packets,
        to_backend_bytes: r.forward.bytes,
        to_client_packets: r.reply.packets,
        to_client_bytes: r.reply.bytes,
    }
}

impl Records {
    /// Opens the connection log at `path` (see [`log::ConnLog`]).
    pub fn open_log(&mut self, path: Option<PathBuf>) -> std::io::Result<()> {
        self.log = path.map(log::ConnLog::open).transpose()?;
        Ok(())
    }

    /// The connection log, if one is configured.
    pub fn log(&self) -> Option<&log::ConnLog> {
        self.log.as_ref()
    }

    /// Asks the log writer to reopen its file (log rotation).
    pub fn reopen_log(&self) -> Option<PathBuf> {
        self.log.as_ref().map(|l| {
            l.reopen();
            l.path().to_path_buf()
        })
    }

    /// Folds one record in.
    pub fn add(&mut self, r: &ClosedRecord, names: &Names, offset_ms: i64) {
        let v = view(r, names, offset_ms);
        self.records += 1;
        let key = match names.backends.get(&r.conn.backend_id) {
            Some((s, b)) => (s.clone(), b.clone()),
            None => (
                v.service.clone().unwrap_or_default(),
                format!("id {}", r.conn.backend_id),
            ),
        };
        let t = self.backends.entry(key).or_default();
        t.closed += 1;
        t.to_backend_bytes += r.forward.bytes;
        t.to_client_bytes += r.reply.bytes;
        self.duration.observe(v.duration_ms as f64 / 1000.0);
        self.bytes.observe((r.forward.bytes + r.reply.bytes) as f64);
        if let Some(l) = &self.log {
            l.write(&v);
        }
        if self.recent.len() == RECENT {
            self.recent.pop_front();
        }
        self.recent.push_back(v);
    }

    /// One batch message from a switch; a malformed one is counted and skipped.
    pub fn add_message(&mut self, msg: &[u8], names: &Names, offset_ms: i64) {
        self.messages += 1;
        match decode_batch(msg) {
            Ok(b) => {
                for r in &b.records {
                    self.add(r, names, offset_ms);
                }
            }
            Err(e) => {
                self.bad_messages += 1;
                if self.bad_messages.is_power_of_two() {
                    ::log::warn!(
                        "closed-connection batch skipped ({} so far): {e}",
                        self.bad_messages
                    );
                }
            }
        }
    }

    /// Drains every switch's records ring (at most [`MESSAGES_PER_TICK`]
    /// messages each). A message is consumed only after it was handled:
    /// a controld killed in between finds it again (see `msgring`).
    pub fn drain(&mut self, region: &Region, names: &dyn Fn() -> Names) {
        let offset = unix_ms_now() as i64 - i64::from(region.now_ms());
        let mut names_now: Option<Names> = None;
        let mut buf = std::mem::take(&mut self.buf);
        for sw in 0..region.caps().switches as usize {
            let ring = region.msg_ring(sw, RING_RECORDS);
            for _ in 0..MESSAGES_PER_TICK {
                let Some(p) = ring.peek(&mut buf) else {
                    break;
                };
                let n = names_now.get_or_insert_with(names);
                self.add_message(&buf, n, offset);
                ring.advance(p);
            }
        }
        self.buf = buf;
    }

    /// Records the GC made (connections it expired).
    pub fn add_all(&mut self, recs: &[ClosedRecord], region: &Region, names: &dyn Fn() -> Names) {
        if recs.is_empty() {
            return;
        }
        let offset = unix_ms_now() as i64 - i64::from(region.now_ms());
        let n = names();
        for r in recs {
            self.add(r, &n, offset);
        }
    }

    /// `lbctl flows`: recent records, newest first. `backend` by name
    /// (`SERVICE/BACKEND`) or address.
    pub fn flows(&self, q: &FlowsQuery) -> FlowsReply {
        let keep = |v: &&FlowView| {
            q.service
                .as_ref()
                .is_none_or(|s| v.service.as_ref() == Some(s))
                && q.client
                    .is_none_or(|c| v.client.split(':').next() == Some(&c.to_string()))
                && match &q.backend {
                    None => true,
                    Some(BackendSel::Name(b)) => v.backend.as_ref() == Some(&b.to_string()),
                    Some(BackendSel::Address(a)) => {
                        v.backend_address.split(':').next() == Some(&a.to_string())
                    }
                }
        };
        let matched: Vec<&FlowView> = self.recent.iter().rev().filter(keep).collect();
        FlowsReply {
            records: self.records,
            kept: self.recent.len() as u64,
            matched: matched.len() as u64,
            list: matched.into_iter().take(q.limit).cloned().collect(),
        }
    }

    /// The records' Prometheus families.
    pub fn render_metrics(&self) -> String {
        let mut o = String::new();
        let family = |o: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(o, "# HELP {name} {help}");
            let _ = writeln!(o, "# TYPE {name} {kind}");
        };
        family(
            &mut o,
            "switchyard_controld_record_messages_total",
            "counter",
            "closed-connection batch messages controld handled from the switches' records rings",
        );
        let _ = writeln!(
            o,
            "switchyard_controld_record_messages_total {}",
            self.messages
        );
        family(
            &mut o,
            "switchyard_controld_record_bad_messages_total",
            "counter",
            "closed-connection batch messages that did not decode (skipped)",
        );
        let _ = writeln!(
            o,
            "switchyard_controld_record_bad_messages_total {}",
            self.bad_messages
        );
        family(
            &mut o,
            "switchyard_controld_records_total",
            "counter",
            "closed-connection records controld handled (from switches and from its GC)",
        );
        let _ = writeln!(o, "switchyard_controld_records_total {}", self.records);
        family(
            &mut o,
            "switchyard_backend_closed_connections_total",
            "counter",
            "connections of the backend that closed (each has one record)",
        );
        for ((s, b), t) in &self.backends {
            let _ = writeln!(
                o,
                "switchyard_backend_closed_connections_total{{service=\"{}\",backend=\"{}\"}} {}",
                escape_label(s),
                escape_label(b),
                t.closed
            );
        }
        family(
            &mut o,
            "switchyard_backend_closed_bytes_total",
            "counter",
            "IP bytes of the backend's closed connections, by direction (to_backend: client to VIP; to_client: backend to client, NAT only)",
        );
        for ((s, b), t) in &self.backends {
            for (dir, v) in [
                ("to_backend", t.to_backend_bytes),
                ("to_client", t.to_client_bytes),
            ] {
                let _ = writeln!(
                    o,
                    "switchyard_backend_closed_bytes_total{{service=\"{}\",backend=\"{}\",direction=\"{dir}\"}} {v}",
                    escape_label(s),
                    escape_label(b),
                );
            }
        }
        self.duration.render(
            &mut o,
            "switchyard_connection_duration_seconds",
            "durations of closed connections, first packet to close",
        );
        self.bytes.render(
            &mut o,
            "switchyard_connection_bytes",
            "IP bytes of closed connections, both directions",
        );
        if let Some(l) = &self.log {
            let s = l.stats();
            for (name, help, v) in [
                (
                    "switchyard_connection_log_lines_total",
                    "lines written to the connection log",
                    s.written,
                ),
                (
                    "switchyard_connection_log_dropped_total",
                    "connection log lines dropped because the writer fell behind (slow disk) or could not write",
                    s.dropped,
                ),
                (
                    "switchyard_connection_log_reopens_total",
                    "times the connection log was reopened (SIGHUP, lbctl reopen)",
                    s.reopens,
                ),
            ] {
                family(&mut o, name, "counter", help);
                let _ = writeln!(o, "{name} {v}");
            }
        }
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shm_layout::conntrack::Conn;
    use shm_layout::records::{CloseReason, Counts, encode_batch};

    fn rec(i: u32, backend: u32, dur_ms: u32, bytes: u64) -> ClosedRecord {
        ClosedRecord {
            conn: Conn {
                proto: 6,
                mode: 0,
                flags: 0,
                backend_id: backend,
                client_ip: 0xc612_6400 + i,
                client_port: 40_000,
                vip: 0xc612_000a,
                vip_port: 80,
                backend_ip: 0xc613_0100 + backend,
                backend_port: 8080,
                service: 0,
                created_ms: 1000,
            },
            reason: CloseReason::FinClient,
            closed_ms: 1000 + dur_ms,
            forward: Counts {
                packets: 5,
                bytes: 300,
            },
            reply: Counts { packets: 4, bytes },
        }
    }

    fn names() -> Names {
        Names {
            backends: [(1, ("web".into(), "web1".into()))].into(),
            services: vec!["web".into()],
        }
    }

    #[test]
    fn records_fold_into_totals_histograms_and_recent_newest_first() {
        let mut r = Records::default();
        let mut msg = Vec::new();
        encode_batch(
            0,
            &[rec(1, 1, 5, 700), rec(2, 1, 2000, 1_000_000)],
            &mut msg,
        );
        r.add_message(&msg, &names(), 1_700_000_000_000);
        r.add_message(b"junk", &names(), 0);
        r.add(&rec(3, 9, 0, 0), &names(), 0);
        assert_eq!((r.messages, r.bad_messages, r.records), (2, 1, 3));
        assert_eq!(
            r.backends[&("web".into(), "web1".into())],
            BackendTotals {
                closed: 2,
                to_backend_bytes: 600,
                to_client_bytes: 1_000_700
            }
        );
        assert!(r.backends.contains_key(&("web".into(), "id 9".into())));
        assert_eq!(r.duration.count(), 3);
        let all = r.flows(&FlowsQuery::default());
        assert_eq!((all.records, all.kept, all.matched), (3, 3, 3));
        assert_eq!(all.list[0].client, "198.18.100.3:40000");
        assert_eq!(all.list[2].created_unix_ms, 1_700_000_001_000);
        assert_eq!(all.list[2].duration_ms, 5);
        assert_eq!(all.list[2].backend.as_deref(), Some("web/web1"));
        assert_eq!(all.list[2].reason, "fin_client");
        let by = |q: FlowsQuery| r.flows(&q).matched;
        assert_eq!(
            by(FlowsQuery {
                backend: Some("web/web1".parse().unwrap()),
                ..Default::default()
            }),
            2
        );
        assert_eq!(
            by(FlowsQuery {
                backend: Some("198.19.1.9".parse().unwrap()),
                ..Default::default()
            }),
            1
        );
        assert_eq!(
            by(FlowsQuery {
                client: Some("198.18.100.2".parse().unwrap()),
                ..Default::default()
            }),
            1
        );
        assert_eq!(
            by(FlowsQuery {
                service: Some("api".into()),
                ..Default::default()
            }),
            0
        );
        assert_eq!(
            r.flows(&FlowsQuery {
                limit: 1,
                ..Default::default()
            })
            .list
            .len(),
            1
        );
        let m = r.render_metrics();
        assert!(
            m.contains("switchyard_controld_record_messages_total 2\n"),
            "{m}"
        );
        assert!(
            m.contains(
                "switchyard_backend_closed_connections_total{service=\"web\",backend=\"web1\"} 2\n"
            ),
            "{m}"
        );
        // 5 ms and 0 ms under 10 ms; 2 s under 10 s.
        assert!(
            m.contains("switchyard_connection_duration_seconds_bucket{le=\"0.01\"} 2\n"),
            "{m}"
        );
        assert!(
            m.contains("switchyard_connection_duration_seconds_bucket{le=\"10\"} 3\n"),
            "{m}"
        );
        assert!(
            m.contains("switchyard_connection_bytes_bucket{le=\"1000\"} 2\n"),
            "{m}"
        );
    }

    #[test]
    fn recent_records_are_bounded() {
        let mut r = Records::default();
        for i in 0..RECENT as u32 + 5 {
            r.add(&rec(i, 1, 1, 1), &names(), 0);
        }
        let f = r.flows(&FlowsQuery::default());
        assert_eq!((f.records, f.kept), (RECENT as u64 + 5, RECENT as u64));
    }
}
