//! Prometheus metrics: the text exposition format, version 0.0.4, rendered
//! from the same views `show` and `stats` answer with. Pure.
//!
//! Naming: every metric starts with `switchyard_`. Each per-switch counter
//! is its own family, `switchyard_switch_<counter>_total{switch="sw0"}`
//! (counters of different units, packets and bytes, never share a family,
//! so `sum`/`rate` over a family is always meaningful). Backends are labelled
//! `{service, backend, address}`, services `{service}`. Every family has
//! HELP and TYPE lines and its samples follow them without interruption.

use std::fmt::{Display, Write};

use shm_layout::switch_slot::Counter;

use super::proto::{BackendState, BackendView, Health, ServiceView, ShowReply, StatsReply};

/// `Content-Type` of the exposition.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What the metrics need beyond `show` and `stats`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Extra {
    pub reloads_ok: u64,
    pub reloads_refused: u64,
    /// Switches the publisher excluded from acknowledgement (and fenced),
    /// configuration and routing publications together, in total.
    pub excluded_switches: u64,
    /// Publications refused because an excluded switch could not be
    /// fenced (nothing was written), configuration and routing together.
    pub refused_publications: u64,
    /// Times each switch was fenced, by switch index (the region's slots).
    pub fenced: Vec<u64>,
    /// The connection-table GC's totals since this controld started.
    pub gc: crate::gc::GcStats,
    /// Backends with a runtime override.
    pub overrides: usize,
    /// Load-agent reports by outcome (`None` without `[agents]`).
    pub agents: Option<crate::agents::Counters>,
}

/// A label value with `\`, `"` and newline escaped.
pub fn escape_label(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

/// HELP text with `\` and newline escaped.
fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

struct Out(String);

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl Display) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let _ = write!(self.0, "{k}=\"{}\"", escape_label(v));
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
    }

    /// One family with one sample per backend.
    fn per_backend(
        &mut self,
        show: &ShowReply,
        name: &str,
        kind: &str,
        help: &str,
        value: impl Fn(&BackendView) -> Option<f64>,
    ) {
        self.family(name, kind, help);
        for s in &show.services {
            for b in &s.backends {
                if let Some(v) = value(b) {
                    self.sample(
                        name,
                        &[
                            ("service", &s.name),
                            ("backend", &b.name),
                            ("address", &b.address),
                        ],
                        v,
                    );
                }
            }
        }
    }
}

/// The whole exposition.
pub fn render(show: &ShowReply, stats: &StatsReply, extra: &Extra) -> String {
    let mut o = Out(String::with_capacity(16 * 1024));
    o.family(
        "switchyard_up",
        "gauge",
        "1 while controld answers (its switches are reported separately)",
    );
    o.sample("switchyard_up", &[], 1);
    o.family(
        "switchyard_config_generation",
        "gauge",
        "Generation of the published configuration",
    );
    o.sample("switchyard_config_generation", &[], show.generation);
    o.family(
        "switchyard_routing_generation",
        "gauge",
        "Generation of the published routing table",
    );
    o.sample(
        "switchyard_routing_generation",
        &[],
        show.routing_generation,
    );
    o.family(
        "switchyard_reloads_total",
        "counter",
        "Reloads of the configuration file (SIGHUP or lbctl reload) by result: ok, or refused (the running configuration stayed)",
    );
    o.sample(
        "switchyard_reloads_total",
        &[("result", "ok")],
        extra.reloads_ok,
    );
    o.sample(
        "switchyard_reloads_total",
        &[("result", "refused")],
        extra.reloads_refused,
    );
    o.family(
        "switchyard_publish_excluded_switches_total",
        "counter",
        "Switches a publication excluded because they did not acknowledge the previous generation in time",
    );
    o.sample(
        "switchyard_publish_excluded_switches_total",
        &[],
        extra.excluded_switches,
    );
    o.family(
        "switchyard_publish_refused_total",
        "counter",
        "Publications refused because a switch that did not acknowledge could not be fenced (nothing was written; retried)",
    );
    o.sample(
        "switchyard_publish_refused_total",
        &[],
        extra.refused_publications,
    );
    o.family(
        "switchyard_gc_rounds_total",
        "counter",
        "Full sweeps of the connection table by controld's GC since controld started",
    );
    o.sample("switchyard_gc_rounds_total", &[], extra.gc.rounds);
    o.family(
        "switchyard_gc_reclaimed_total",
        "counter",
        "Connection-table entries the GC removed since controld started, by reason: expired (idle past its timeout), orphan (reply entry without its forward entry), abandoned (slot a killed writer held)",
    );
    for (reason, n) in [
        ("expired", extra.gc.expired),
        ("orphan", extra.gc.orphans),
        ("abandoned", extra.gc.abandoned),
    ] {
        o.sample("switchyard_gc_reclaimed_total", &[("reason", reason)], n);
    }
    o.family(
        "switchyard_gc_reconciled_total",
        "counter",
        "Corrections of backends' active connection counts by the GC since controld started, summed over backends: down (leaked reservations taken back), up (reservations added back)",
    );
    for (direction, n) in [
        ("down", extra.gc.reconciled_down),
        ("up", extra.gc.reconciled_up),
    ] {
        o.sample(
            "switchyard_gc_reconciled_total",
            &[("direction", direction)],
            n,
        );
    }
    o.family(
        "switchyard_runtime_overrides",
        "gauge",
        "Backends with a runtime override (lbctl drain or weight)",
    );
    o.sample("switchyard_runtime_overrides", &[], extra.overrides);
    if let Some(a) = &extra.agents {
        o.family(
            "switchyard_agent_reports_total",
            "counter",
            "Load-agent reports by outcome: accepted, or dropped as forged, stale, replayed, unknown_agent or malformed",
        );
        o.sample(
            "switchyard_agent_reports_total",
            &[("outcome", "accepted")],
            a.accepted,
        );
        for (reason, n) in crate::agents::verify::REASONS.iter().zip(a.dropped()) {
            o.sample("switchyard_agent_reports_total", &[("outcome", reason)], n);
        }
    }

    o.family(
        "switchyard_switch_up",
        "gauge",
        "1 if the switch process is alive and polling",
    );
    for s in &stats.switches {
        let up = s.alive && s.state == "running";
        o.sample("switchyard_switch_up", &[("switch", &s.name)], u8::from(up));
    }
    o.family(
        "switchyard_switch_restarts_total",
        "counter",
        "Times controld restarted the switch after it exited or stalled",
    );
    for s in &stats.switches {
        o.sample(
            "switchyard_switch_restarts_total",
            &[("switch", &s.name)],
            s.restarts,
        );
    }
    o.family(
        "switchyard_switch_fenced_total",
        "counter",
        "Times the switch was fenced (killed before a publication rewrote the slot it may still read) because it did not acknowledge in time",
    );
    for s in &stats.switches {
        o.sample(
            "switchyard_switch_fenced_total",
            &[("switch", &s.name)],
            extra.fenced.get(s.index).copied().unwrap_or(0),
        );
    }
    for &c in Counter::ALL {
        let name = format!("switchyard_switch_{}_total", c.name());
        o.family(&name, "counter", &capitalised(c.help()));
        for s in &stats.switches {
            let v = s.set.counters.get(c.name()).copied().unwrap_or(0);
            o.sample(&name, &[("switch", &s.name)], v);
        }
    }

    type PerService = (
        &'static str,
        &'static str,
        &'static str,
        fn(&ServiceView) -> u64,
    );
    let per_service: [PerService; 3] = [
        (
            "switchyard_service_backends",
            "gauge",
            "Backends configured",
            |s| s.backends.len() as u64,
        ),
        (
            "switchyard_service_backends_up",
            "gauge",
            "Backends that get new connections (state up)",
            |s| {
                s.backends
                    .iter()
                    .filter(|b| b.state == BackendState::Up)
                    .count() as u64
            },
        ),
        (
            "switchyard_service_active_connections",
            "gauge",
            "Connections in the table for the service's backends",
            |s| s.active_conns,
        ),
    ];
    for (name, kind, help, value) in per_service {
        o.family(name, kind, help);
        for s in &show.services {
            o.sample(name, &[("service", &s.name)], value(s));
        }
    }

    o.per_backend(
        show,
        "switchyard_backend_active_connections",
        "gauge",
        "Connections in the table for the backend",
        |b| Some(b.active_conns as f64),
    );
    o.per_backend(
        show,
        "switchyard_backend_connections_total",
        "counter",
        "Connections created for the backend",
        |b| Some(b.total_conns as f64),
    );
    o.per_backend(
        show,
        "switchyard_backend_weight_configured",
        "gauge",
        "The backend's weight in the configuration file",
        |b| Some(b.configured_weight as f64),
    );
    o.per_backend(
        show,
        "switchyard_backend_weight_effective",
        "gauge",
        "The weight the backend's service table is built with (runtime override, drain and health applied; 0: no new connections)",
        |b| Some(b.effective_weight as f64),
    );
    o.per_backend(
        show,
        "switchyard_backend_table_share",
        "gauge",
        "Share of its service's Maglev table the backend holds (0 to 1)",
        |b| Some(b.table_share),
    );
    o.per_backend(
        show,
        "switchyard_backend_max_connections",
        "gauge",
        "The backend's connection limit (only backends that have one)",
        |b| b.max_conns.map(f64::from),
    );
    o.per_backend(
        show,
        "switchyard_backend_health_up",
        "gauge",
        "1 if the backend passes its health checks, 0 if not (only checked backends)",
        |b| b.health.map(|h| f64::from(u8::from(h == Health::Up))),
    );
    let name = "switchyard_backend_state";
    o.family(
        name,
        "gauge",
        "1 for the backend's current state: up (gets new connections), drained (weight 0 or lbctl drain), down (fails its health checks)",
    );
    for s in &show.services {
        for b in &s.backends {
            for st in BackendState::ALL {
                o.sample(
                    name,
                    &[
                        ("service", &s.name),
                        ("backend", &b.name),
                        ("address", &b.address),
                        ("state", st.as_str()),
                    ],
                    u8::from(b.state == st),
                );
            }
        }
    }
    o.0
}

fn capitalised(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;
    use crate::admin::proto::{CounterSet, SwitchStats};

    fn views() -> (ShowReply, StatsReply) {
        let b = |name: &str, state, health| BackendView {
            name: name.into(),
            address: "198.19.1.1:80".into(),
            state,
            health,
            configured_weight: 2,
            effective_weight: 3,
            weight_override: Some(3),
            admin_drained: false,
            active_conns: 4,
            total_conns: 5,
            max_conns: None,
            table_share: 0.25,
        };
        let show = ShowReply {
            instance: "t".into(),
            generation: 7,
            routing_generation: 2,
            services: vec![ServiceView {
                name: "we\"b".into(),
                vip: "198.18.0.10".into(),
                port: 80,
                protocol: "tcp".into(),
                mode: "nat".into(),
                scheduler: "maglev".into(),
                active_conns: 8,
                total_conns: 10,
                backends: vec![
                    b("a\\1", BackendState::Up, None),
                    b("b\n2", BackendState::Down, Some(Health::Down)),
                ],
            }],
        };
        let stats = StatsReply {
            interval_s: None,
            switches: vec![SwitchStats {
                index: 0,
                name: "sw0".into(),
                pid: 1,
                alive: true,
                state: "running".into(),
                cpu: 1,
                restarts: 2,
                heartbeat_age_ms: Some(0),
                seen_generation: 7,
                set: CounterSet {
                    counters: BTreeMap::from([("rx_packets".to_string(), 42)]),
                    rates: None,
                },
            }],
            total: CounterSet::default(),
            backends: vec![],
        };
        (show, stats)
    }

    #[test]
    fn label_values_and_help_are_escaped() {
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        assert_eq!(escape_help("a\\b\nc \"q\""), "a\\\\b\\nc \"q\"");
        let (show, stats) = views();
        let text = render(&show, &stats, &Extra::default());
        assert!(text.contains(
            "switchyard_backend_active_connections{service=\"we\\\"b\",backend=\"a\\\\1\",address=\"198.19.1.1:80\"} 4\n"
        ));
        assert!(text.contains(
            "switchyard_backend_state{service=\"we\\\"b\",backend=\"b\\n2\",address=\"198.19.1.1:80\",state=\"down\"} 1\n"
        ));
    }

    #[test]
    fn every_family_has_help_and_type_and_its_samples_follow_them() {
        let (show, stats) = views();
        let text = render(
            &show,
            &stats,
            &Extra {
                reloads_ok: 3,
                reloads_refused: 1,
                excluded_switches: 2,
                refused_publications: 1,
                fenced: vec![2],
                gc: crate::gc::GcStats {
                    rounds: 5,
                    expired: 6,
                    orphans: 7,
                    abandoned: 8,
                    reconciled_down: 9,
                    reconciled_up: 10,
                    ..Default::default()
                },
                overrides: 1,
                agents: Some(crate::agents::Counters {
                    accepted: 7,
                    forged: 2,
                    ..Default::default()
                }),
            },
        );
        assert!(text.contains("switchyard_agent_reports_total{outcome=\"accepted\"} 7\n"));
        assert!(text.contains("switchyard_agent_reports_total{outcome=\"forged\"} 2\n"));
        assert!(text.contains("switchyard_agent_reports_total{outcome=\"malformed\"} 0\n"));
        let mut done = BTreeSet::new();
        let mut current: Option<String> = None;
        let mut typed = false;
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let name = rest.split(' ').next().unwrap().to_string();
                assert!(done.insert(name.clone()), "family {name} appears twice");
                current = Some(name);
                typed = false;
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut it = rest.split(' ');
                assert_eq!(it.next(), current.as_deref(), "TYPE follows its HELP");
                let kind = it.next().unwrap();
                assert!(kind == "counter" || kind == "gauge", "{line}");
                let name = current.as_deref().unwrap();
                assert_eq!(kind == "counter", name.ends_with("_total"), "{name}");
                typed = true;
            } else {
                let name = line.split(['{', ' ']).next().unwrap();
                assert_eq!(
                    Some(name),
                    current.as_deref(),
                    "sample {line} outside its family"
                );
                assert!(typed, "{line}");
                let value = line.rsplit(' ').next().unwrap();
                assert!(value.parse::<f64>().is_ok(), "{line}");
            }
        }
        assert!(text.contains("switchyard_reloads_total{result=\"refused\"} 1\n"));
        for line in [
            "switchyard_publish_excluded_switches_total 2",
            "switchyard_publish_refused_total 1",
            "switchyard_switch_fenced_total{switch=\"sw0\"} 2",
            "switchyard_gc_rounds_total 5",
            "switchyard_gc_reclaimed_total{reason=\"expired\"} 6",
            "switchyard_gc_reclaimed_total{reason=\"orphan\"} 7",
            "switchyard_gc_reclaimed_total{reason=\"abandoned\"} 8",
            "switchyard_gc_reconciled_total{direction=\"down\"} 9",
            "switchyard_gc_reconciled_total{direction=\"up\"} 10",
        ] {
            assert!(text.contains(&format!("\n{line}\n")), "{line}");
        }
        assert!(text.contains("switchyard_switch_rx_packets_total{switch=\"sw0\"} 42\n"));
        assert!(text.contains("switchyard_switch_restarts_total{switch=\"sw0\"} 2\n"));
        assert!(text.contains("switchyard_config_generation 7\n"));
        assert!(text.contains("switchyard_service_backends_up{service=\"we\\\"b\"} 1\n"));
        assert!(text.contains(
            "switchyard_backend_health_up{service=\"we\\\"b\",backend=\"b\\n2\",address=\"198.19.1.1:80\"} 0\n"
        ));
        // Unchecked backends have no health sample, and nobody has max_conns.
        assert_eq!(text.matches("switchyard_backend_health_up{").count(), 1);
        assert_eq!(
            text.matches("switchyard_backend_max_connections{").count(),
            0
        );
        assert_eq!(
            text.matches("switchyard_backend_state{").count(),
            2 * BackendState::ALL.len()
        );
        assert!(text.contains("switchyard_backend_table_share{service=\"we\\\"b\",backend=\"a\\\\1\",address=\"198.19.1.1:80\"} 0.25\n"));
        // Each switch counter has its own family.
        for c in Counter::ALL {
            assert!(done.contains(&format!("switchyard_switch_{}_total", c.name())));
        }
    }
}
