//! lbctl's library side: talking to controld's admin socket and rendering
//! its replies as aligned tables (in the spirit of `ipvsadm -Ln --stats`).
//! The protocol types are the `admin-proto` crate's, shared with controld.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use admin_proto::{
    BackendView, ChangeReply, ConnsReply, CounterSet, FlowsReply, ReloadReply, Request, ShowReply,
    StatsReply,
};

/// Why a call failed before controld could answer.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("cannot connect to {}: {source} (is controld running, and is this its [admin] socket?)", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {what}: {source}", path.display())]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: controld closed the connection without an answer", .0.display())]
    NoAnswer(PathBuf),
}

/// Sends one request and returns controld's reply line (without the newline).
pub fn call(path: &Path, req: &Request, timeout: Duration) -> Result<String, CallError> {
    let mut s = UnixStream::connect(path).map_err(|source| CallError::Connect {
        path: path.to_path_buf(),
        source,
    })?;
    let io = |what| {
        move |source| CallError::Io {
            path: path.to_path_buf(),
            what,
            source,
        }
    };
    s.set_read_timeout(Some(timeout))
        .map_err(io("setting the timeout"))?;
    writeln!(s, "{}", req.to_json()).map_err(io("sending the request"))?;
    let mut line = String::new();
    let n = BufReader::new(&s)
        .read_line(&mut line)
        .map_err(io("reading the answer"))?;
    if n == 0 {
        return Err(CallError::NoAnswer(path.to_path_buf()));
    }
    Ok(line.trim_end().to_string())
}

/// Column alignment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Align {
    Left,
    Right,
}

/// A table whose columns are as wide as their widest cell, two spaces apart.
#[derive(Debug)]
pub struct Table {
    head: Vec<(String, Align)>,
    rows: Vec<Vec<String>>,
}

fn cell(r: &[String], i: usize) -> &str {
    r.get(i).map(String::as_str).unwrap_or("")
}

impl Table {
    pub fn new(head: &[(&str, Align)]) -> Self {
        Self {
            head: head.iter().map(|(h, a)| (h.to_string(), *a)).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row (missing cells are empty, extra cells are dropped).
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let n = self.head.len();
        let widths: Vec<usize> = (0..n)
            .map(|i| {
                self.rows
                    .iter()
                    .map(|r| cell(r, i).chars().count())
                    .chain([self.head[i].0.chars().count()])
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut out = String::new();
        let heads: Vec<String> = self.head.iter().map(|(h, _)| h.clone()).collect();
        for r in std::iter::once(&heads).chain(&self.rows) {
            let mut line = String::new();
            for (i, (&width, (_, align))) in widths.iter().zip(&self.head).enumerate() {
                let c = cell(r, i);
                let pad = width - c.chars().count();
                if i > 0 {
                    line.push_str("  ");
                }
                match align {
                    Align::Left => {
                        line.push_str(c);
                        line.extend(std::iter::repeat_n(' ', pad));
                    }
                    Align::Right => {
                        line.extend(std::iter::repeat_n(' ', pad));
                        line.push_str(c);
                    }
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

use Align::{Left as L, Right as R};

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_string(), |v| v.to_string())
}

fn rate(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("{v:.0}"))
}

/// What an operator changed on a backend, as one cell.
fn override_cell(b: &BackendView) -> String {
    match (b.admin_drained, b.weight_override) {
        (true, Some(w)) => format!("drain,weight={w}"),
        (true, None) => "drain".into(),
        (false, Some(w)) => format!("weight={w}"),
        (false, None) => "-".into(),
    }
}

/// `show`: one line per service, one `->` line per backend.
pub fn render_show(v: &ShowReply) -> String {
    let mut t = Table::new(&[
        ("Prot", L),
        ("VIP:Port / Backend", L),
        ("Name", L),
        ("Mode", L),
        ("Sched", L),
        ("State", L),
        ("Weight", R),
        ("EffWeight", R),
        ("Share", R),
        ("ActiveConn", R),
        ("TotalConn", R),
        ("MaxConn", R),
        ("Health", L),
        ("Override", L),
    ]);
    for s in &v.services {
        t.row(vec![
            s.protocol.to_uppercase(),
            format!("{}:{}", s.vip, s.port),
            s.name.clone(),
            s.mode.clone(),
            s.scheduler.clone(),
            String::new(),
            String::new(),
            String::new(),
            String::new(),
            s.active_conns.to_string(),
            s.total_conns.to_string(),
        ]);
        for b in &s.backends {
            t.row(vec![
                String::new(),
                format!("  -> {}", b.address),
                format!("{}/{}", s.name, b.name),
                String::new(),
                String::new(),
                b.state.as_str().to_string(),
                b.configured_weight.to_string(),
                b.effective_weight.to_string(),
                format!("{:.1}%", b.table_share * 100.0),
                b.active_conns.to_string(),
                b.total_conns.to_string(),
                opt(b.max_conns),
                b.health
                    .map_or("-", |h| match h {
                        admin_proto::Health::Up => "up",
                        admin_proto::Health::Down => "down",
                    })
                    .to_string(),
                override_cell(b),
            ]);
        }
    }
    format!(
        "instance {}  configuration generation {}  routing generation {}\n{}",
        v.instance,
        v.generation,
        v.routing_generation,
        t.render()
    )
}

fn count(set: &CounterSet, name: &str) -> u64 {
    set.counters.get(name).copied().unwrap_or(0)
}

fn drops(set: &CounterSet) -> u64 {
    set.counters
        .iter()
        .filter(|(k, _)| k.starts_with("drop_"))
        .map(|(_, v)| v)
        .sum()
}

fn rate_of(set: &CounterSet, name: &str) -> Option<f64> {
    set.rates
        .as_ref()
        .map(|r| r.get(name).copied().unwrap_or(0.0))
}

/// Share of the last interval a switch spent in loops that moved frames
/// (its `busy_ns` per second, as a percentage).
fn busy(set: &CounterSet) -> String {
    rate_of(set, "busy_ns").map_or_else(|| "-".to_string(), |ns| format!("{:.0}%", ns / 1e7))
}

/// Share of the last interval's connection hits (`fwd_hit` + `reply_hit`)
/// that the flow cache answered; `-` before two samples or without hits.
fn cached(set: &CounterSet) -> String {
    let (Some(c), Some(f), Some(r)) = (
        rate_of(set, "flow_cache_hit"),
        rate_of(set, "fwd_hit"),
        rate_of(set, "reply_hit"),
    ) else {
        return "-".to_string();
    };
    if f + r <= 0.0 {
        return "-".to_string();
    }
    format!("{:.0}%", 100.0 * c / (f + r))
}

fn drop_rate(set: &CounterSet) -> Option<f64> {
    set.rates.as_ref().map(|r| {
        r.iter()
            .filter(|(k, _)| k.starts_with("drop_"))
            .map(|(_, v)| v)
            .sum()
    })
}

/// `stats`: per switch and total counters and rates, drops by reason, and
/// per backend connections.
pub fn render_stats(v: &StatsReply) -> String {
    let mut t = Table::new(&[
        ("Switch", L),
        ("PID", R),
        ("State", L),
        ("CPU", R),
        ("Restarts", R),
        ("Busy", R),
        ("Cached", R),
        ("Conns", R),
        ("InPkts", R),
        ("OutPkts", R),
        ("InBytes", R),
        ("OutBytes", R),
        ("Drops", R),
        ("CPS", R),
        ("InPPS", R),
        ("OutPPS", R),
        ("InBPS", R),
        ("OutBPS", R),
        ("DropPS", R),
    ]);
    let numbers = |set: &CounterSet| {
        vec![
            cached(set),
            count(set, "conn_new").to_string(),
            count(set, "rx_packets").to_string(),
            count(set, "tx_packets").to_string(),
            count(set, "rx_bytes").to_string(),
            count(set, "tx_bytes").to_string(),
            drops(set).to_string(),
            rate(rate_of(set, "conn_new")),
            rate(rate_of(set, "rx_packets")),
            rate(rate_of(set, "tx_packets")),
            rate(rate_of(set, "rx_bytes")),
            rate(rate_of(set, "tx_bytes")),
            rate(drop_rate(set)),
        ]
    };
    for s in &v.switches {
        let mut row = vec![
            s.name.clone(),
            s.pid.to_string(),
            if s.alive {
                s.state.clone()
            } else {
                format!("{} (dead)", s.state)
            },
            s.cpu.to_string(),
            s.restarts.to_string(),
            busy(&s.set),
        ];
        row.extend(numbers(&s.set));
        t.row(row);
    }
    // Busy is per switch (a sum over switches would read as one CPU).
    let mut row = vec![
        "total".to_string(),
        String::new(),
        String::new(),
        String::new(),
        String::new(),
        String::new(),
    ];
    row.extend(numbers(&v.total));
    t.row(row);
    let mut out = match v.interval_s {
        Some(i) => format!("rates per second over the last {i:.1} s\n"),
        None => "rates: not yet sampled twice\n".to_string(),
    };
    out += &t.render();
    let reasons: Vec<String> = v
        .total
        .counters
        .iter()
        .filter(|(k, n)| k.starts_with("drop_") && **n > 0)
        .map(|(k, n)| format!("{}={n}", &k[5..]))
        .collect();
    if !reasons.is_empty() {
        let _ = writeln!(out, "drops: {}", reasons.join(" "));
    }
    let mut b = Table::new(&[
        ("Backend", L),
        ("Address", L),
        ("ActiveConn", R),
        ("TotalConn", R),
        ("CPS", R),
    ]);
    for x in &v.backends {
        b.row(vec![
            format!("{}/{}", x.service, x.backend),
            x.address.clone(),
            x.active_conns.to_string(),
            x.total_conns.to_string(),
            rate(x.conns_per_s),
        ]);
    }
    out.push('\n');
    out += &b.render();
    out
}

/// `conns`.
pub fn render_conns(v: &ConnsReply) -> String {
    let mut t = Table::new(&[
        ("Prot", L),
        ("Client", L),
        ("VIP", L),
        ("Backend", L),
        ("BackendAddress", L),
        ("State", L),
        ("IdleMs", R),
        ("Packets", R),
        ("Bytes", R),
        ("Flags", L),
    ]);
    for c in &v.list {
        let mut flags = Vec::new();
        if c.midflow {
            flags.push("midflow");
        }
        if c.expired {
            flags.push("expired");
        }
        t.row(vec![
            c.protocol.clone(),
            c.client.clone(),
            c.vip.clone(),
            c.backend.clone().unwrap_or_else(|| "(removed)".into()),
            c.backend_address.clone(),
            c.state.clone(),
            c.idle_ms.to_string(),
            c.packets.to_string(),
            c.bytes.to_string(),
            if flags.is_empty() {
                "-".into()
            } else {
                flags.join(",")
            },
        ]);
    }
    format!(
        "{} connections in {} slots; {} match, {} listed\n{}",
        v.connections,
        v.slots,
        v.matched,
        v.list.len(),
        t.render()
    )
}

/// `flows`.
pub fn render_flows(v: &FlowsReply) -> String {
    let mut t = Table::new(&[
        ("Prot", L),
        ("Client", L),
        ("VIP", L),
        ("Backend", L),
        ("BackendAddress", L),
        ("Reason", L),
        ("DurMs", R),
        ("PktsIn", R),
        ("BytesIn", R),
        ("PktsOut", R),
        ("BytesOut", R),
    ]);
    for f in &v.list {
        t.row(vec![
            f.protocol.clone(),
            f.client.clone(),
            f.vip.clone(),
            f.backend.clone().unwrap_or_else(|| "(removed)".into()),
            f.backend_address.clone(),
            f.reason.clone(),
            f.duration_ms.to_string(),
            f.to_backend_packets.to_string(),
            f.to_backend_bytes.to_string(),
            f.to_client_packets.to_string(),
            f.to_client_bytes.to_string(),
        ]);
    }
    format!(
        "{} closed connections recorded, {} kept; {} match, {} listed (In: client to backend, Out: backend to client; IP bytes)\n{}",
        v.records,
        v.kept,
        v.matched,
        v.list.len(),
        t.render()
    )
}

/// `drain`, `enable`, `weight`.
pub fn render_change(v: &ChangeReply) -> String {
    let b = &v.backend;
    format!(
        "{}/{} ({}): {}, weight {} (file {}), override {}; configuration generation {}\n",
        v.service,
        b.name,
        b.address,
        b.state.as_str(),
        b.effective_weight,
        b.configured_weight,
        override_cell(b),
        v.generation
    )
}

/// `reload`.
pub fn render_reload(v: &ReloadReply) -> String {
    let mut out = format!(
        "reloaded: configuration generation {}, routing generation {}\n",
        v.generation, v.routing_generation
    );
    for k in &v.overrides_kept {
        let _ = writeln!(out, "kept override {k}");
    }
    for d in &v.overrides_dropped {
        let _ = writeln!(out, "dropped override {d} (backend no longer configured)");
    }
    for w in &v.warnings {
        let _ = writeln!(out, "warning: {w}");
    }
    out
}

#[cfg(test)]
mod tests {
    use admin_proto::{BackendState, ServiceView, SwitchStats};

    use super::*;

    /// The `n`th whitespace-separated field of a rendered line (empty past
    /// its end).
    fn field(line: &str, n: usize) -> String {
        line.split_whitespace().nth(n).unwrap_or("").to_string()
    }

    /// A running switch's stats row with counters `set`.
    fn running_switch(name: &str, set: CounterSet) -> SwitchStats {
        SwitchStats {
            index: 0,
            name: name.into(),
            pid: 1,
            alive: true,
            state: "running".into(),
            cpu: 1,
            restarts: 0,
            heartbeat_age_ms: Some(1),
            seen_generation: 1,
            set,
        }
    }

    #[test]
    fn reload_shows_the_new_files_warnings() {
        let r = ReloadReply {
            generation: 3,
            routing_generation: 2,
            overrides_kept: vec![],
            overrides_dropped: vec![],
            warnings: vec!["service \"web\": has no backends".into()],
        };
        assert_eq!(
            render_reload(&r),
            "reloaded: configuration generation 3, routing generation 2\nwarning: service \"web\": has no backends\n"
        );
    }

    #[test]
    fn stats_show_each_switch_busy_share_of_the_interval() {
        let set = |busy_ns_per_s: Option<f64>| CounterSet {
            counters: [("busy_ns".to_string(), 5), ("rx_packets".to_string(), 7)].into(),
            rates: busy_ns_per_s.map(|r| [("busy_ns".to_string(), r)].into()),
        };
        let sw = |name: &str, r| running_switch(name, set(r));
        let v = StatsReply {
            interval_s: Some(1.0),
            switches: vec![sw("sw0", Some(375_000_000.0)), sw("sw1", Some(0.0))],
            total: set(Some(375_000_000.0)),
            backends: vec![],
        };
        let out = render_stats(&v);
        let lines: Vec<&str> = out.lines().collect();
        let col = |line: &str| field(line, 5);
        assert_eq!(col(lines[1]), "Busy", "{out}");
        assert_eq!(col(lines[2]), "38%", "{out}");
        assert_eq!(col(lines[3]), "0%", "{out}");
        assert!(lines[4].starts_with("total"), "{out}");
        let unsampled = StatsReply {
            interval_s: None,
            switches: vec![sw("sw0", None)],
            ..v
        };
        let out = render_stats(&unsampled);
        assert_eq!(col(out.lines().nth(2).unwrap()), "-", "{out}");
    }

    #[test]
    fn stats_show_the_share_of_hits_the_flow_cache_answered() {
        let set = |rates: &[(&str, f64)]| CounterSet {
            counters: [("fwd_hit".to_string(), 9)].into(),
            rates: Some(rates.iter().map(|(k, v)| (k.to_string(), *v)).collect()),
        };
        let sw = running_switch;
        let hits = [
            ("flow_cache_hit", 900.0),
            ("fwd_hit", 600.0),
            ("reply_hit", 400.0),
        ];
        let v = StatsReply {
            interval_s: Some(1.0),
            switches: vec![sw("sw0", set(&hits)), sw("sw1", set(&[("fwd_hit", 0.0)]))],
            total: set(&hits),
            backends: vec![],
        };
        let out = render_stats(&v);
        let lines: Vec<&str> = out.lines().collect();
        let col = |line: &str| field(line, 6);
        assert_eq!(col(lines[1]), "Cached", "{out}");
        assert_eq!(col(lines[2]), "90%", "{out}");
        assert_eq!(col(lines[3]), "-", "no hits, no share: {out}");
        assert!(
            lines[4].starts_with("total") && lines[4].contains(" 90% "),
            "{out}"
        );
    }

    #[test]
    fn table_columns_align_to_their_widest_cell() {
        let mut t = Table::new(&[("A", L), ("Num", R), ("C", L)]);
        t.row(vec!["xx".into(), "1".into(), "end".into()]);
        t.row(vec!["y".into(), "12345".into()]);
        assert_eq!(t.render(), "A     Num  C\nxx      1  end\ny   12345\n");
    }

    #[test]
    fn show_renders_services_then_backends() {
        let v = ShowReply {
            instance: "demo".into(),
            generation: 4,
            routing_generation: 2,
            services: vec![ServiceView {
                name: "web".into(),
                vip: "198.18.0.10".into(),
                port: 80,
                protocol: "tcp".into(),
                mode: "nat".into(),
                scheduler: "maglev".into(),
                active_conns: 3,
                total_conns: 10,
                backends: vec![BackendView {
                    name: "web1".into(),
                    address: "198.19.1.1:8080".into(),
                    state: BackendState::Drained,
                    health: None,
                    configured_weight: 1,
                    effective_weight: 0,
                    weight_override: Some(4),
                    admin_drained: true,
                    active_conns: 3,
                    total_conns: 10,
                    max_conns: None,
                    table_share: 0.0,
                }],
            }],
        };
        let want = "\
instance demo  configuration generation 4  routing generation 2
Prot  VIP:Port / Backend    Name      Mode  Sched   State    Weight  EffWeight  Share  ActiveConn  TotalConn  MaxConn  Health  Override
TCP   198.18.0.10:80        web       nat   maglev                                              3         10
        -> 198.19.1.1:8080  web/web1                drained       1          0   0.0%           3         10        -  -       drain,weight=4
";
        assert_eq!(render_show(&v), want);
    }
}
