//! The monitor: which backends are checked and when, the probe threads,
//! and each backend's [`Health`]. The main loop calls [`Monitor::poll`]
//! every tick; it never blocks.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use super::ProbeError;
use super::state::{Health, Transition};
use crate::config::{Config, HealthCheck};
use crate::ids::BackendIdentity;

/// Most probe threads (checks beyond this many at once wait their turn;
/// their timeouts start when they run).
pub const MAX_WORKERS: usize = 16;
/// A backend's repeated failures are logged at most this often.
const FAILURE_LOG_EVERY: Duration = Duration::from_secs(60);

/// One checked backend, as its probe needs it and its logs name it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub service: String,
    pub backend: String,
    /// Where the check goes: the backend's address and the check's port.
    pub addr: SocketAddr,
    pub check: HealthCheck,
    /// The service's `on_backend_down`, for the log.
    pub on_down: &'static str,
}

/// A state change (already logged), for the caller to publish.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub ident: BackendIdentity,
    pub transition: Transition,
}

type ProbeFn = dyn Fn(&Target) -> Result<(), ProbeError> + Send + Sync;

struct Job {
    ident: BackendIdentity,
    epoch: u64,
    target: Arc<Target>,
}

struct Outcome {
    ident: BackendIdentity,
    epoch: u64,
    result: Result<(), ProbeError>,
}

struct Entry {
    target: Arc<Target>,
    health: Health,
    /// Distinguishes this check from an earlier one of the same backend
    /// whose result may still be on its way.
    epoch: u64,
    in_flight: bool,
    /// When the last check started, and when the next one is due.
    started: Instant,
    next_due: Instant,
    unlogged_failures: u32,
    last_failure_log: Option<Instant>,
}

/// The health of every checked backend.
pub struct Monitor {
    entries: HashMap<BackendIdentity, Entry>,
    next_epoch: u64,
    jobs: mpsc::Sender<Job>,
    job_queue: Arc<Mutex<mpsc::Receiver<Job>>>,
    results_tx: mpsc::Sender<Outcome>,
    results: mpsc::Receiver<Outcome>,
    probe: Arc<ProbeFn>,
    workers: usize,
    /// Jobs sent whose outcome has not come back.
    outstanding: usize,
}

impl Default for Monitor {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Monitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Monitor")
            .field("checked", &self.entries.len())
            .field("workers", &self.workers)
            .field("outstanding", &self.outstanding)
            .finish()
    }
}

impl Monitor {
    /// A monitor running the real probes ([`super::probe`]).
    pub fn new() -> Self {
        Self::with_probe(super::probe)
    }

    /// A monitor running `probe` on its threads (tests substitute one).
    pub fn with_probe(
        probe: impl Fn(&Target) -> Result<(), ProbeError> + Send + Sync + 'static,
    ) -> Self {
        let (jobs, job_rx) = mpsc::channel();
        let (results_tx, results) = mpsc::channel();
        Monitor {
            entries: HashMap::new(),
            next_epoch: 0,
            jobs,
            job_queue: Arc::new(Mutex::new(job_rx)),
            results_tx,
            results,
            probe: Arc::new(probe),
            workers: 0,
            outstanding: 0,
        }
    }

    /// Follows a (new) configuration: backends with a check are monitored;
    /// one whose identity and check are unchanged keeps its health, a new
    /// or changed one starts UP on probation with a check due at `now`.
    pub fn configure(&mut self, cfg: &Config, now: Instant) {
        let mut next = HashMap::new();
        for s in &cfg.services {
            for b in &s.backends {
                let Some(check) = &b.health else {
                    continue;
                };
                let ident = BackendIdentity::of(s, b);
                let target = Arc::new(Target {
                    service: s.name.clone(),
                    backend: b.name.clone(),
                    addr: SocketAddr::from((b.address, check.port)),
                    check: check.clone(),
                    on_down: s.on_backend_down.as_str(),
                });
                let entry = match self.entries.remove(&ident) {
                    Some(mut e)
                        if e.target.check == target.check && e.target.addr == target.addr =>
                    {
                        e.target = target;
                        e
                    }
                    _ => {
                        self.next_epoch += 1;
                        Entry {
                            health: Health::new(check.rise, check.fall),
                            target,
                            epoch: self.next_epoch,
                            in_flight: false,
                            started: now,
                            next_due: now,
                            unlogged_failures: 0,
                            last_failure_log: None,
                        }
                    }
                };
                next.insert(ident, entry);
            }
        }
        // Results of checks of backends that left are dropped when they come.
        self.entries = next;
    }

    /// Whether `ident` is a checked backend that is DOWN.
    pub fn is_down(&self, ident: &BackendIdentity) -> bool {
        self.entries.get(ident).is_some_and(|e| e.health.is_down())
    }

    /// The health of a checked backend.
    pub fn health(&self, ident: &BackendIdentity) -> Option<Health> {
        self.entries.get(ident).map(|e| e.health)
    }

    /// Checked backends.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Checks started whose result has not been folded in yet.
    pub fn in_flight(&self) -> usize {
        self.entries.values().filter(|e| e.in_flight).count()
    }

    /// Folds in the results that arrived, then starts the checks due at
    /// `now`. Returns the state changes (logged here). Never blocks.
    pub fn poll(&mut self, now: Instant) -> Vec<Change> {
        let mut changes = Vec::new();
        while let Ok(o) = self.results.try_recv() {
            self.outstanding = self.outstanding.saturating_sub(1);
            let Some(e) = self.entries.get_mut(&o.ident) else {
                continue;
            };
            if e.epoch != o.epoch {
                continue;
            }
            e.in_flight = false;
            if let Some(transition) = e.record(o.result, now) {
                changes.push(Change {
                    ident: o.ident,
                    transition,
                });
            }
            let c = &e.target.check;
            let every = if e.health.in_transition() {
                c.fast_interval_ms
            } else {
                c.interval_ms
            };
            e.next_due = e.started + Duration::from_millis(u64::from(every));
        }
        for (ident, e) in &mut self.entries {
            if e.in_flight || e.next_due > now {
                continue;
            }
            let job = Job {
                ident: *ident,
                epoch: e.epoch,
                target: Arc::clone(&e.target),
            };
            if self.jobs.send(job).is_ok() {
                e.in_flight = true;
                e.started = now;
                self.outstanding += 1;
            }
        }
        while self.outstanding > self.workers && self.workers < MAX_WORKERS {
            if !self.spawn_worker() {
                break;
            }
        }
        changes
    }

    fn spawn_worker(&mut self) -> bool {
        let queue = Arc::clone(&self.job_queue);
        let results = self.results_tx.clone();
        let probe = Arc::clone(&self.probe);
        let spawned = std::thread::Builder::new()
            .name(format!("health-{}", self.workers))
            .spawn(move || {
                loop {
                    // One idle worker waits on the channel, the others on the lock.
                    let job = match queue.lock() {
                        Ok(q) => q.recv(),
                        Err(poisoned) => poisoned.into_inner().recv(),
                    };
                    let Ok(job) = job else {
                        return; // the monitor is gone
                    };
                    let result = probe(&job.target);
                    let out = Outcome {
                        ident: job.ident,
                        epoch: job.epoch,
                        result,
                    };
                    if results.send(out).is_err() {
                        return;
                    }
                }
            });
        match spawned {
            Ok(_) => {
                self.workers += 1;
                true
            }
            Err(e) => {
                log::error!("health: cannot start a check thread: {e}");
                false
            }
        }
    }
}

impl Entry {
    /// Folds in one result and logs what an operator needs: every state
    /// change, and failures at most once per [`FAILURE_LOG_EVERY`].
    fn record(&mut self, result: Result<(), ProbeError>, now: Instant) -> Option<Transition> {
        let t = &self.target;
        let who = format!(
            "service {:?} backend {:?} ({} check of {})",
            t.service,
            t.backend,
            t.check.probe.kind(),
            t.addr
        );
        match result {
            Ok(()) => {
                let change = self.health.record(true);
                if change == Some(Transition::WentUp) {
                    log::info!(
                        "{who} is UP: {} checks passed; it takes new connections again",
                        t.check.rise
                    );
                    self.unlogged_failures = 0;
                } else if self.health.is_down() {
                    log::debug!(
                        "{who}: check passed ({}/{} towards UP)",
                        self.health.score(),
                        t.check.rise
                    );
                }
                change
            }
            Err(why) => {
                let change = self.health.record(false);
                if change == Some(Transition::WentDown) {
                    log::warn!(
                        "{who} is DOWN: {why}; no new connections, existing ones: {}",
                        t.on_down
                    );
                    self.unlogged_failures = 0;
                    self.last_failure_log = Some(now);
                } else if self
                    .last_failure_log
                    .is_none_or(|at| now.saturating_duration_since(at) >= FAILURE_LOG_EVERY)
                {
                    let more = match self.unlogged_failures {
                        0 => String::new(),
                        n => format!(" ({n} more failed checks since the last report)"),
                    };
                    let state = if self.health.is_down() {
                        "still DOWN"
                    } else {
                        "still UP"
                    };
                    log::info!("{who}: check failed, {state}: {why}{more}");
                    self.unlogged_failures = 0;
                    self.last_failure_log = Some(now);
                } else {
                    self.unlogged_failures += 1;
                    log::debug!("{who}: check failed: {why}");
                }
                change
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::State;
    use std::collections::VecDeque;
    use std::net::TcpListener;

    /// Checked config: service "web" with backend "web1" at `addr:port`.
    fn config(addr: &str, port: u16, health: &str) -> Config {
        crate::config::parse(&format!(
            "instance = \"t\"\n[[port]]\nname = \"p\"\ndriver = \"vnic\"\nmac = \"02:00:00:00:00:01\"\n\
             [[switch]]\nname = \"s\"\ncpu = 0\nports = [\"p\"]\n\
             [[service]]\nname = \"web\"\nvip = \"198.18.0.10\"\nport = 80\nprotocol = \"tcp\"\n\
             [service.health]\n{health}\n\
             [[service.backend]]\nname = \"web1\"\naddress = \"{addr}\"\nport = {port}\n"
        ))
        .unwrap()
    }

    fn ident(cfg: &Config) -> BackendIdentity {
        let (s, b) = (&cfg.services[0], &cfg.services[0].backends[0]);
        BackendIdentity {
            vip: s.vip,
            vport: s.port,
            proto: 6,
            addr: b.address,
            port: b.port,
        }
    }

    /// Polls at the fixed time `now` until nothing is in flight (bounded).
    fn settle(m: &mut Monitor, now: Instant) -> Vec<Change> {
        let mut changes = m.poll(now);
        let deadline = Instant::now() + Duration::from_secs(10);
        while m.in_flight() > 0 {
            assert!(Instant::now() < deadline, "check results did not arrive");
            std::thread::sleep(Duration::from_millis(1));
            changes.extend(m.poll(now));
        }
        changes
    }

    /// Scripted results still to give, and probe calls so far.
    type Script = Arc<Mutex<(VecDeque<bool>, usize)>>;

    /// A monitor whose probe returns scripted results and counts calls.
    fn scripted(results: &str) -> (Monitor, Script) {
        let script = Arc::new(Mutex::new((
            results.chars().map(|c| c == '+').collect::<VecDeque<_>>(),
            0,
        )));
        let s = Arc::clone(&script);
        let m = Monitor::with_probe(move |_| {
            let mut g = s.lock().unwrap();
            g.1 += 1;
            if g.0.pop_front().expect("script exhausted") {
                Ok(())
            } else {
                Err(ProbeError::Udp {
                    addr: SocketAddr::from(([198, 19, 1, 1], 53)),
                    why: crate::health::IoFailure::Os("scripted failure".into()),
                })
            }
        });
        (m, script)
    }

    #[test]
    fn schedules_at_interval_and_fast_interval_and_reports_changes() {
        let cfg = config(
            "198.19.1.1",
            8080,
            "kind = \"tcp\"\ninterval_ms = 1000\nfast_interval_ms = 100\nrise = 2\nfall = 2",
        );
        let id = ident(&cfg);
        let (mut m, script) = scripted("+++--++");
        let calls = || script.lock().unwrap().1;
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        m.configure(&cfg, t0);
        assert_eq!(m.health(&id).unwrap().state(), State::Up);
        // Probation, then full health: checks every interval.
        assert!(settle(&mut m, at(0)).is_empty());
        assert_eq!(calls(), 1);
        assert!(settle(&mut m, at(999)).is_empty());
        assert_eq!(calls(), 1, "not due before the interval");
        settle(&mut m, at(1000));
        settle(&mut m, at(2000));
        assert_eq!(calls(), 3);
        assert_eq!(m.health(&id).unwrap().score(), 3);
        // A failure puts it in transition: the next check comes at the fast interval.
        assert!(settle(&mut m, at(3000)).is_empty());
        settle(&mut m, at(3099));
        assert_eq!(calls(), 4);
        let changes = settle(&mut m, at(3100));
        assert_eq!(
            changes,
            [Change {
                ident: id,
                transition: Transition::WentDown
            }]
        );
        assert!(m.is_down(&id));
        // DOWN at score 0 is not in transition: the normal interval.
        settle(&mut m, at(4099));
        assert_eq!(calls(), 5);
        assert!(settle(&mut m, at(4100)).is_empty());
        assert!(m.is_down(&id), "one pass of rise 2");
        let changes = settle(&mut m, at(4200));
        assert_eq!(changes[0].transition, Transition::WentUp);
        assert!(!m.is_down(&id));
        assert_eq!(calls(), 7);
    }

    #[test]
    fn reload_keeps_health_of_unchanged_checks_and_resets_changed_ones() {
        let cfg = config("198.19.1.1", 8080, "kind = \"tcp\"\nrise = 3");
        let id = ident(&cfg);
        let (mut m, _script) = scripted("-");
        let t0 = Instant::now();
        m.configure(&cfg, t0);
        settle(&mut m, t0);
        assert!(m.is_down(&id));
        m.configure(&cfg, t0);
        assert!(m.is_down(&id), "same check: state kept");
        m.configure(&config("198.19.1.1", 8080, "kind = \"tcp\"\nrise = 4"), t0);
        assert!(!m.is_down(&id), "changed check: starts over");
        m.configure(&config("198.19.1.1", 8080, "kind = \"none\""), t0);
        assert!(m.is_empty());
    }

    #[test]
    fn real_tcp_checks_take_a_closed_port_down_and_bring_it_back() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let cfg = config(
            "127.0.0.1",
            port,
            "kind = \"tcp\"\ninterval_ms = 10\nrise = 2\nfall = 2\ntimeout_ms = 10",
        );
        let id = ident(&cfg);
        let mut m = Monitor::new();
        let t0 = Instant::now();
        m.configure(&cfg, t0);
        let mut t = t0;
        for _ in 0..3 {
            assert!(settle(&mut m, t).is_empty());
            t += Duration::from_millis(10);
        }
        drop(l);
        let mut changes = Vec::new();
        for _ in 0..2 {
            changes.extend(settle(&mut m, t));
            t += Duration::from_millis(10);
        }
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].transition, Transition::WentDown);
        // Listen again on the same port (bounded retries: TIME_WAIT is not an issue for listeners).
        let l = TcpListener::bind(("127.0.0.1", port)).unwrap();
        let c1 = settle(&mut m, t);
        assert!(c1.is_empty() && m.is_down(&id));
        t += Duration::from_millis(10);
        let c2 = settle(&mut m, t);
        assert_eq!(c2[0].transition, Transition::WentUp);
        drop(l);
    }
}
