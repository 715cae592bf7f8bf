//! The agents' side of controld's main loop: follows the configuration
//! (starting, moving or stopping the listener), takes accepted reports
//! from the inbox each tick, keeps the steering of every agent's backends
//! ([`super::tracker`]) and logs its changes. Never blocks.

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agent_proto::{Load, Report};

use super::listener::{Listener, Shared, lock};
use super::rule::{Params, Steer, percent};
use super::tracker::{Cause, Change, Tracker};
use super::verify::{Counters, Settings, Verifier};
use crate::config::Config;

/// One agent, for an operator (lbctl, metrics).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentStatus {
    pub address: Ipv4Addr,
    /// Its backends as `service/backend`.
    pub backends: Vec<String>,
    /// Its latest accepted report, and how long ago it arrived.
    pub report: Report,
    pub age: Duration,
    /// What its backends' weights follow now.
    pub steer: Steer,
    /// No accepted report for `silent_ms`.
    pub silent: bool,
}

/// The agents as a whole, for an operator (lbctl, metrics).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Status {
    /// Where reports are received; `None` without `[agents]`.
    pub listen: Option<SocketAddrV4>,
    pub counters: Counters,
    /// Agents that reported since their address became a backend's.
    pub agents: Vec<AgentStatus>,
}

/// Why the agents' listener could not follow a configuration.
#[derive(Debug, thiserror::Error)]
pub enum AgentsError {
    #[error("agents: listen {addr}: {error}")]
    Listen {
        addr: SocketAddrV4,
        error: std::io::Error,
    },
}

#[derive(Debug)]
pub struct Monitor {
    shared: Arc<Mutex<Shared>>,
    listener: Option<Listener>,
    tracker: Tracker,
    /// Backends of each agent address, `service/backend`, for logs.
    names: HashMap<Ipv4Addr, Vec<String>>,
}

impl Default for Monitor {
    fn default() -> Self {
        Self::new()
    }
}

impl Monitor {
    /// A monitor without a listener (as with no `[agents]`).
    pub fn new() -> Self {
        let settings = Settings {
            listen: SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0),
            secret: Vec::new(),
            max_skew_ms: 0,
            known: HashSet::new(),
        };
        Monitor {
            shared: Arc::new(Mutex::new(Shared {
                verifier: Verifier::new(settings),
                alerts: Default::default(),
                inbox: HashMap::new(),
            })),
            listener: None,
            tracker: Tracker::new(
                Params {
                    floor: 100,
                    step: 100,
                },
                Duration::from_secs(3),
            ),
            names: HashMap::new(),
        }
    }

    /// Follows a (new) configuration: binds `[agents] listen` when it
    /// changed (an error leaves everything as it was), hands the verifier
    /// the secret, the window and the backends' addresses, and the tracker
    /// its parameters. Without `[agents]` the listener stops and every
    /// backend has its configured weight.
    pub fn configure(&mut self, cfg: &Config) -> Result<(), AgentsError> {
        let Some(a) = &cfg.agents else {
            if let Some(l) = self.listener.take() {
                log::info!("agents: no longer listening on {}", l.addr());
            }
            self.names.clear();
            self.tracker.configure(
                Params {
                    floor: 100,
                    step: 100,
                },
                Duration::from_secs(3),
                &HashSet::new(),
            );
            let mut sh = lock(&self.shared);
            let mut s = sh.verifier.settings().clone();
            s.known.clear();
            sh.verifier.configure(s);
            sh.inbox.clear();
            return Ok(());
        };
        if self.listener.as_ref().map(Listener::addr) != Some(a.listen) {
            let l = Listener::start(a.listen, Arc::clone(&self.shared)).map_err(|error| {
                AgentsError::Listen {
                    addr: a.listen,
                    error,
                }
            })?;
            log::info!("agents: listening for lb-agent reports on {}", a.listen);
            self.listener = Some(l);
        }
        let mut names: HashMap<Ipv4Addr, Vec<String>> = HashMap::new();
        for s in &cfg.services {
            for b in &s.backends {
                names
                    .entry(b.address)
                    .or_default()
                    .push(format!("{}/{}", s.name, b.name));
            }
        }
        let known: HashSet<Ipv4Addr> = names.keys().copied().collect();
        self.tracker.configure(
            Params::from_config(a),
            Duration::from_millis(u64::from(a.silent_ms)),
            &known,
        );
        let mut sh = lock(&self.shared);
        sh.inbox.retain(|addr, _| known.contains(addr));
        sh.verifier.configure(Settings {
            listen: a.listen,
            secret: a.secret.0.clone(),
            max_skew_ms: u64::from(a.max_skew_ms),
            known,
        });
        drop(sh);
        self.names = names;
        Ok(())
    }

    /// Whether reports are received.
    pub fn is_listening(&self) -> bool {
        self.listener.is_some()
    }

    /// Folds in the reports accepted since the last call and the agents
    /// fallen silent by `now`; returns whether any backend's weight
    /// changed (the caller republishes). Logs every change.
    pub fn poll(&mut self, now: Instant) -> bool {
        if self.listener.is_none() {
            return false;
        }
        let mut inbox: Vec<_> = std::mem::take(&mut lock(&self.shared).inbox)
            .into_iter()
            .collect();
        inbox.sort_by_key(|(a, _)| *a);
        let mut changed = false;
        for (agent, (report, at)) in inbox {
            let was_reporting = self.tracker.get(agent).is_some_and(|s| !s.silent);
            match self.tracker.accept(agent, report, at) {
                Some(c) => {
                    self.log_change(&c, &report);
                    changed = true;
                }
                None if !was_reporting => log::info!(
                    "agents: {} reports {}: configured weights",
                    self.who(agent),
                    describe(&report.load)
                ),
                None => {}
            }
        }
        for c in self.tracker.expire(now) {
            self.log_change(&c, &Report::default());
            changed = true;
        }
        changed
    }

    /// What the backends at `addr` follow now.
    pub fn steer(&self, addr: Ipv4Addr) -> Steer {
        self.tracker.steer(addr)
    }

    /// Counters and every agent's latest report and steering.
    pub fn status(&self, now: Instant) -> Status {
        let counters = lock(&self.shared).verifier.counters();
        Status {
            listen: self.listener.as_ref().map(Listener::addr),
            counters,
            agents: self
                .tracker
                .agents()
                .into_iter()
                .map(|(address, s)| AgentStatus {
                    address,
                    backends: self.names.get(&address).cloned().unwrap_or_default(),
                    report: s.report,
                    age: now.saturating_duration_since(s.received),
                    steer: s.steer,
                    silent: s.silent,
                })
                .collect(),
        }
    }

    fn who(&self, agent: Ipv4Addr) -> String {
        match self.names.get(&agent) {
            Some(n) => format!("{agent} ({})", n.join(", ")),
            None => agent.to_string(),
        }
    }

    fn log_change(&self, c: &Change, report: &Report) {
        let who = self.who(c.agent);
        match (c.cause, c.to) {
            (Cause::Silent(quiet), _) => log::warn!(
                "agents: {who} silent for {:.1} s: configured weights (was {})",
                quiet.as_secs_f64(),
                c.from
            ),
            (Cause::Report { .. }, Steer::Drain) => log::warn!(
                "agents: {who} asks to drain: weight 0, no new connections (existing ones continue); {}",
                describe(&report.load)
            ),
            (Cause::Report { first }, to) => log::info!(
                "agents: {who} reports {}: {to} (was {}{})",
                describe(&report.load),
                c.from,
                if first { ", first report" } else { "" }
            ),
        }
    }
}

/// A load for the log: "cpu 80%, memory 40%, 12 active clients, 300
/// requests/s, mean service time 2.5 ms".
pub fn describe(l: &Load) -> String {
    let mut s = format!(
        "cpu {}, memory {}",
        percent(l.cpu_permille),
        percent(l.mem_permille)
    );
    if let Some(n) = l.active_clients {
        s += &format!(", {n} active clients");
    }
    if let Some(n) = l.requests_per_sec {
        s += &format!(", {n} requests/s");
    }
    if let Some(us) = l.service_time_us {
        s += &format!(", mean service time {:.1} ms", f64::from(us) / 1000.0);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_proto::{Endpoints, seal};
    use std::net::UdpSocket;

    fn config(listen: &str, extra: &str) -> Config {
        let text = format!(
            "instance = \"t\"\n[[port]]\nname = \"p\"\ndriver = \"vnic\"\nmac = \"02:00:00:00:00:01\"\n\
             [[switch]]\nname = \"s\"\ncpu = 0\nports = [\"p\"]\n\
             [[service]]\nname = \"web\"\nvip = \"198.18.0.10\"\nport = 80\nprotocol = \"tcp\"\n\
             [[service.backend]]\nname = \"local\"\naddress = \"127.0.0.1\"\nweight = 100\n\
             [[service.backend]]\nname = \"other\"\naddress = \"198.19.0.12\"\nweight = 100\n\
             [agents]\nlisten = \"{listen}\"\nsecret = \"0123456789abcdef\"\n{extra}"
        );
        crate::config::parse(&text).unwrap()
    }

    fn now_ms() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
    }

    /// Polls until `f` holds (at most 5 s).
    fn until(m: &mut Monitor, mut f: impl FnMut(&mut Monitor) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !f(m) {
            assert!(Instant::now() < deadline, "{:?}", m.status(Instant::now()));
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// A real socket on loopback: reports in, steering and counters out;
    /// a reload keeps the replay marks; removing `[agents]` stops it all.
    #[test]
    fn reports_over_loopback_steer_and_are_counted() {
        // Find a free port, then let the monitor bind it.
        let port = UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let listen = format!("127.0.0.1:{port}");
        let mut m = Monitor::new();
        m.configure(&config(&listen, "")).unwrap();
        assert!(m.is_listening());
        let send = UdpSocket::bind("127.0.0.1:0").unwrap();
        let ep = Endpoints {
            agent: Ipv4Addr::LOCALHOST,
            controller: listen.parse().unwrap(),
        };
        let report = |seq, cpu, drain| {
            seal(
                &Report {
                    timestamp_ms: now_ms(),
                    seq,
                    load: Load {
                        cpu_permille: cpu,
                        drain,
                        ..Default::default()
                    },
                },
                &ep,
                b"0123456789abcdef",
            )
        };
        let lo = Ipv4Addr::LOCALHOST;
        send.send_to(&report(10, 700, false), &listen).unwrap();
        let mut changed = false;
        until(&mut m, |m| {
            changed |= m.poll(Instant::now());
            m.steer(lo) != Steer::Configured
        });
        assert!(changed);
        assert_eq!(m.steer(lo), Steer::Factor(300));
        // A replay and a datagram that is no report: dropped and counted.
        send.send_to(&report(10, 0, true), &listen).unwrap();
        send.send_to(b"hello", &listen).unwrap();
        until(&mut m, |m| {
            let c = m.status(Instant::now()).counters;
            c.replayed == 1 && c.malformed == 1
        });
        assert!(!m.poll(Instant::now()));
        assert_eq!(m.steer(lo), Steer::Factor(300));
        // A reload with the same listen address keeps the marks.
        m.configure(&config(&listen, "step_percent = 50")).unwrap();
        send.send_to(&report(10, 0, false), &listen).unwrap();
        until(&mut m, |m| m.status(Instant::now()).counters.replayed == 2);
        send.send_to(&report(11, 0, true), &listen).unwrap();
        until(&mut m, |m| {
            m.poll(Instant::now());
            m.steer(lo) == Steer::Drain
        });
        let st = m.status(Instant::now());
        assert_eq!(st.listen, Some(listen.parse().unwrap()));
        assert_eq!(
            st.counters,
            Counters {
                accepted: 2,
                replayed: 2,
                malformed: 1,
                ..Default::default()
            }
        );
        assert_eq!(st.agents.len(), 1);
        assert_eq!(st.agents[0].backends, ["web/local"]);
        assert_eq!((st.agents[0].report.seq, st.agents[0].silent), (11, false));
        // Silence (a reload shortens it) brings the configured weights back.
        m.configure(&config(&listen, "silent_ms = 100")).unwrap();
        until(&mut m, |m| m.poll(Instant::now()));
        assert_eq!(m.steer(lo), Steer::Configured);
        // No [agents]: the port is free again.
        let mut cfg = config(&listen, "");
        cfg.agents = None;
        m.configure(&cfg).unwrap();
        assert!(!m.is_listening());
        UdpSocket::bind(&listen).expect("the listener closed its socket");
    }

    /// A reload that moves `listen` binds the new address and frees the
    /// old one; a reload whose address cannot be bound is refused and the
    /// old socket keeps receiving, checked against the old address.
    #[test]
    fn a_reload_moves_listen_and_a_bind_error_keeps_the_old_socket() {
        let free = || {
            let s = UdpSocket::bind("127.0.0.1:0").unwrap();
            s.local_addr().unwrap().to_string()
        };
        let (a, b) = (free(), free());
        let sealed = |listen: &str, seq| {
            seal(
                &Report {
                    timestamp_ms: now_ms(),
                    seq,
                    load: Load {
                        cpu_permille: 100,
                        ..Default::default()
                    },
                },
                &Endpoints {
                    agent: Ipv4Addr::LOCALHOST,
                    controller: listen.parse().unwrap(),
                },
                b"0123456789abcdef",
            )
        };
        let accepted = |m: &Monitor| m.status(Instant::now()).counters.accepted;
        let mut m = Monitor::new();
        m.configure(&config(&a, "")).unwrap();
        m.configure(&config(&b, "")).unwrap();
        assert_eq!(m.status(Instant::now()).listen, Some(b.parse().unwrap()));
        drop(UdpSocket::bind(&a).expect("the old address was freed"));
        let send = UdpSocket::bind("127.0.0.1:0").unwrap();
        send.send_to(&sealed(&b, 1), &b).unwrap();
        until(&mut m, |m| accepted(m) == 1);

        let taken = UdpSocket::bind("127.0.0.1:0").unwrap();
        let t = taken.local_addr().unwrap().to_string();
        let e = m.configure(&config(&t, "")).unwrap_err();
        assert!(
            e.to_string().starts_with(&format!("agents: listen {t}: ")),
            "{e}"
        );
        assert_eq!(m.status(Instant::now()).listen, Some(b.parse().unwrap()));
        send.send_to(&sealed(&b, 2), &b).unwrap();
        until(&mut m, |m| accepted(m) == 2);
        assert_eq!(
            m.status(Instant::now()).counters,
            Counters {
                accepted: 2,
                ..Default::default()
            }
        );
    }

    #[test]
    fn a_listen_address_that_cannot_be_bound_is_an_error_and_changes_nothing() {
        let taken = UdpSocket::bind("127.0.0.1:0").unwrap();
        let listen = taken.local_addr().unwrap().to_string();
        let mut m = Monitor::new();
        let e = m.configure(&config(&listen, "")).unwrap_err();
        assert!(
            e.to_string()
                .starts_with(&format!("agents: listen {listen}: ")),
            "{e}"
        );
        assert!(!m.is_listening());
    }

    #[test]
    fn describe_lists_what_was_reported() {
        let l = Load {
            cpu_permille: 805,
            mem_permille: 400,
            active_clients: Some(12),
            requests_per_sec: Some(300),
            service_time_us: Some(2500),
            drain: false,
        };
        assert_eq!(
            describe(&l),
            "cpu 80.5%, memory 40%, 12 active clients, 300 requests/s, mean service time 2.5 ms"
        );
        assert_eq!(describe(&Load::default()), "cpu 0%, memory 0%");
    }
}
