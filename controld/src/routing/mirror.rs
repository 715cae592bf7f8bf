//! The mirror: keeps a copy of the kernel's tables current and decides
//! when the routing slot must be republished and which next hops the
//! kernel must be asked to resolve. The kernel is behind [`Kernel`], so
//! this logic runs against a fake in tests.
//!
//! Per main-loop tick ([`Mirror::poll`]): drain change notifications; once
//! a burst has settled (a tick without new ones, or 200 ms after it began)
//! re-read every table — simple, and correct whatever was missed, which is
//! also how an overflow of the notification queue is handled; rebuild the
//! snapshot and hand it out only when it differs from the last one. Then
//! ask the kernel to resolve next hops without a MAC (back-off 1 s doubling
//! to 16 s per address) and to re-confirm stale ones (at most every 30 s).

use std::collections::HashMap;
use std::io;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use super::table::{Built, HopState, KernelTables, build};
use crate::config::Config;
use crate::master::RoutingSnapshot;

/// Longest a burst of notifications may postpone a re-read.
pub const SETTLE_MAX: Duration = Duration::from_millis(200);
/// Wait after a failed re-read before the next try.
pub const DUMP_RETRY: Duration = Duration::from_millis(500);
/// First wait between resolution attempts of one address.
pub const RESOLVE_RETRY_MIN: Duration = Duration::from_secs(1);
/// Longest wait between resolution attempts of one address.
pub const RESOLVE_RETRY_MAX: Duration = Duration::from_secs(16);
/// Shortest interval between re-confirmations of one stale next hop.
pub const REFRESH_EVERY: Duration = Duration::from_secs(30);
/// Shortest interval between two log lines of one kind.
const LOG_EVERY: Duration = Duration::from_secs(60);

/// What changed since the last call of [`Kernel::changes`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Notifications about links, IPv4 routes or IPv4 neighbours.
    pub relevant: usize,
    /// Notifications were lost: the tables must be re-read.
    pub overflow: bool,
}

/// The kernel, as the mirror uses it.
pub trait Kernel {
    /// Reads the links, IPv4 main-table routes and IPv4 neighbours.
    fn dump(&mut self) -> io::Result<KernelTables>;
    /// Drains pending change notifications without blocking.
    fn changes(&mut self) -> io::Result<Changes>;
    /// Asks the kernel to resolve (or re-confirm) `address` on `ifindex`.
    fn resolve(&mut self, address: Ipv4Addr, ifindex: u32) -> io::Result<()>;
}

/// At most one log line per [`LOG_EVERY`].
#[derive(Debug, Default)]
struct Quiet(Option<Instant>);

impl Quiet {
    fn ready(&mut self, now: Instant) -> bool {
        match self.0 {
            Some(t) if now.duration_since(t) < LOG_EVERY => false,
            _ => {
                self.0 = Some(now);
                true
            }
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Attempt {
    next: Instant,
    wait: Duration,
}

/// See the module documentation.
pub struct Mirror<K> {
    kernel: K,
    tables: KernelTables,
    /// When the first unapplied notification arrived.
    dirty_since: Option<Instant>,
    next_dump: Option<Instant>,
    last: Built,
    missing: HashMap<Ipv4Addr, Attempt>,
    stale: HashMap<Ipv4Addr, Instant>,
    log_capacity: Quiet,
    log_dump: Quiet,
    log_notify: Quiet,
    log_resolve: Quiet,
}

impl<K: Kernel> Mirror<K> {
    /// Reads the kernel's tables once (retrying a dump the kernel
    /// interrupted, a few times).
    pub fn new(mut kernel: K) -> io::Result<Self> {
        let mut tries = 0;
        let tables = loop {
            match kernel.dump() {
                Err(e) if e.kind() == io::ErrorKind::Interrupted && tries < 5 => tries += 1,
                r => break r?,
            }
        };
        Ok(Mirror {
            kernel,
            tables,
            dirty_since: None,
            next_dump: None,
            last: Built::default(),
            missing: HashMap::new(),
            stale: HashMap::new(),
            log_capacity: Quiet::default(),
            log_dump: Quiet::default(),
            log_notify: Quiet::default(),
            log_resolve: Quiet::default(),
        })
    }

    pub fn kernel(&self) -> &K {
        &self.kernel
    }

    pub fn kernel_mut(&mut self) -> &mut K {
        &mut self.kernel
    }

    /// The snapshot for `cfg` from the last read of the kernel (at start and
    /// on reload, when it is published whether or not it changed).
    pub fn snapshot(&mut self, cfg: &Config, now: Instant) -> RoutingSnapshot {
        self.rebuild(cfg, now);
        self.last.snapshot.clone()
    }

    /// One main-loop step; returns a snapshot to publish when it changed.
    pub fn poll(&mut self, cfg: &Config, now: Instant) -> Option<RoutingSnapshot> {
        let ch = self.kernel.changes().unwrap_or_else(|e| {
            if self.log_notify.ready(now) {
                log::warn!(
                    "routing: reading kernel notifications failed ({e}): re-reading the tables"
                );
            }
            Changes {
                relevant: 0,
                overflow: true,
            }
        });
        if ch.overflow && self.log_notify.ready(now) {
            log::warn!(
                "routing: kernel notifications were lost (queue overflow): re-reading the tables"
            );
        }
        let fresh = ch.relevant > 0 || ch.overflow;
        if fresh && self.dirty_since.is_none() {
            self.dirty_since = Some(now);
        }
        let mut out = None;
        if let Some(since) = self.dirty_since {
            let settled = !fresh || now.duration_since(since) >= SETTLE_MAX;
            let may = self.next_dump.is_none_or(|t| now >= t);
            if settled && may {
                match self.kernel.dump() {
                    Ok(t) => {
                        self.tables = t;
                        self.dirty_since = None;
                        self.next_dump = None;
                        let before = self.last.snapshot.clone();
                        self.rebuild(cfg, now);
                        if self.last.snapshot != before {
                            out = Some(self.last.snapshot.clone());
                        }
                    }
                    Err(e) => {
                        if self.log_dump.ready(now) {
                            log::warn!(
                                "routing: reading the kernel's tables failed ({e}): retrying"
                            );
                        }
                        self.next_dump = Some(now + DUMP_RETRY);
                    }
                }
            }
        }
        if cfg.routing.resolve {
            self.resolve_due(now);
        }
        out
    }

    fn rebuild(&mut self, cfg: &Config, now: Instant) {
        let b = build(cfg, &self.tables);
        let changed = (b.routes_dropped, b.neighbours_dropped)
            != (self.last.routes_dropped, self.last.neighbours_dropped);
        if (b.routes_dropped > 0 || b.neighbours_dropped > 0)
            && (changed || self.log_capacity.ready(now))
        {
            log::error!(
                "routing: the kernel has more entries on switch ports than fit: {} routes left out (limits.routes {}), {} neighbours left out (limits.neighbours {}); the longest prefixes and next hops are published",
                b.routes_dropped,
                cfg.limits.routes,
                b.neighbours_dropped,
                cfg.limits.neighbours
            );
        }
        if !b.neighbours_refused.is_empty() && b.neighbours_refused != self.last.neighbours_refused
        {
            // Once per change of the set, not per rebuild.
            let list: Vec<String> = b
                .neighbours_refused
                .iter()
                .map(|(ip, m)| {
                    format!(
                        "{ip} at {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
                        m[0], m[1], m[2], m[3], m[4], m[5]
                    )
                })
                .collect();
            log::warn!(
                "routing: kernel neighbours with a MAC no host can have (broadcast, multicast or zero; a forged ARP?) not published: {}",
                list.join(", ")
            );
        }
        self.last = b;
    }

    /// Asks the kernel about next hops whose turn it is.
    fn resolve_due(&mut self, now: Instant) {
        let mut ask = Vec::new();
        let (mut missing, mut stale) = (HashMap::new(), HashMap::new());
        for h in &self.last.hops {
            let Some(ifindex) = h.ifindex else { continue };
            match h.state {
                HopState::Missing => {
                    let mut a = self.missing.get(&h.address).copied().unwrap_or(Attempt {
                        next: now,
                        wait: RESOLVE_RETRY_MIN,
                    });
                    if now >= a.next {
                        ask.push((h.address, ifindex));
                        a.next = now + a.wait;
                        a.wait = (a.wait * 2).min(RESOLVE_RETRY_MAX);
                    }
                    missing.insert(h.address, a);
                }
                HopState::Stale => {
                    let mut next = self.stale.get(&h.address).copied().unwrap_or(now);
                    if now >= next {
                        ask.push((h.address, ifindex));
                        next = now + REFRESH_EVERY;
                    }
                    stale.insert(h.address, next);
                }
                HopState::Known => {}
            }
        }
        self.missing = missing;
        self.stale = stale;
        for (address, ifindex) in ask {
            log::debug!("routing: asking the kernel to resolve {address} (ifindex {ifindex})");
            if let Err(e) = self.kernel.resolve(address, ifindex)
                && self.log_resolve.ready(now)
            {
                log::warn!(
                    "routing: asking the kernel to resolve {address} (ifindex {ifindex}) failed: {e}"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;
    use crate::routing::table::{KernelLink, KernelNeighbour, KernelRoute, NeighState};

    #[derive(Default)]
    struct Fake {
        tables: KernelTables,
        pending: Vec<Changes>,
        dumps: usize,
        fail_dumps: usize,
        asked: Vec<(Ipv4Addr, u32)>,
    }

    impl Kernel for Fake {
        fn dump(&mut self) -> io::Result<KernelTables> {
            self.dumps += 1;
            if self.fail_dumps > 0 {
                self.fail_dumps -= 1;
                return Err(io::Error::new(io::ErrorKind::Interrupted, "busy"));
            }
            Ok(self.tables.clone())
        }
        fn changes(&mut self) -> io::Result<Changes> {
            Ok(if self.pending.is_empty() {
                Changes::default()
            } else {
                self.pending.remove(0)
            })
        }
        fn resolve(&mut self, address: Ipv4Addr, ifindex: u32) -> io::Result<()> {
            self.asked.push((address, ifindex));
            Ok(())
        }
    }

    fn cfg(resolve: bool) -> Config {
        parse(&format!(
            r#"
instance = "t"
[routing]
resolve = {resolve}
[[port]]
name = "backend"
driver = "afpacket"
interface = "br0"
[[switch]]
name = "sw0"
cpu = 1
ports = ["backend"]
[[service]]
name = "web"
vip = "198.18.0.10"
port = 80
protocol = "tcp"
  [[service.backend]]
  name = "b1"
  address = "198.19.0.11"
"#
        ))
        .unwrap()
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn kernel() -> Fake {
        Fake {
            tables: KernelTables {
                links: vec![KernelLink {
                    index: 7,
                    name: "br0".into(),
                }],
                routes: vec![KernelRoute {
                    prefix: ip("198.19.0.0"),
                    len: 24,
                    oif: 7,
                    gateway: None,
                    metric: 0,
                }],
                neighbours: vec![],
            },
            ..Default::default()
        }
    }

    fn neighbour(state: NeighState) -> KernelNeighbour {
        KernelNeighbour {
            address: ip("198.19.0.11"),
            ifindex: 7,
            mac: Some([2, 0, 0, 0, 0xb, 1]),
            state,
        }
    }

    const TICK: Duration = Duration::from_millis(20);

    fn relevant(n: usize) -> Changes {
        Changes {
            relevant: n,
            overflow: false,
        }
    }

    #[test]
    fn republishes_after_a_burst_settles_and_only_on_change() {
        let c = cfg(false);
        let t0 = Instant::now();
        let mut m = Mirror::new(kernel()).unwrap();
        let first = m.snapshot(&c, t0);
        assert_eq!(first.routes.len(), 1);
        assert_eq!(m.kernel().dumps, 1);
        // Quiet: nothing read, nothing published.
        assert_eq!(m.poll(&c, t0 + TICK), None);
        assert_eq!(m.kernel().dumps, 1);
        // A burst over two ticks, then a quiet tick: one re-read.
        m.kernel_mut()
            .tables
            .neighbours
            .push(neighbour(NeighState::Reachable));
        m.kernel_mut().pending = vec![relevant(3), relevant(1)];
        assert_eq!(m.poll(&c, t0 + 2 * TICK), None);
        assert_eq!(m.poll(&c, t0 + 3 * TICK), None);
        assert_eq!(m.kernel().dumps, 1);
        let snap = m.poll(&c, t0 + 4 * TICK).expect("changed");
        assert_eq!(m.kernel().dumps, 2);
        assert_eq!(snap.neighbours.len(), 1);
        // A notification that changes nothing the switches see: re-read,
        // nothing to publish (REACHABLE -> STALE keeps the MAC).
        m.kernel_mut().tables.neighbours[0].state = NeighState::Stale;
        m.kernel_mut().pending = vec![relevant(1)];
        assert_eq!(m.poll(&c, t0 + 5 * TICK), None);
        assert_eq!(m.poll(&c, t0 + 6 * TICK), None);
        assert_eq!(m.kernel().dumps, 3);
    }

    #[test]
    fn a_long_burst_is_read_after_settle_max_and_overflow_forces_a_read() {
        let c = cfg(false);
        let t0 = Instant::now();
        let mut m = Mirror::new(kernel()).unwrap();
        m.snapshot(&c, t0);
        let ticks = (SETTLE_MAX.as_millis() / TICK.as_millis()) as u32;
        m.kernel_mut().pending = vec![relevant(1); ticks as usize + 5];
        for i in 1..=ticks {
            m.poll(&c, t0 + i * TICK);
        }
        assert_eq!(m.kernel().dumps, 1, "still within SETTLE_MAX");
        m.poll(&c, t0 + (ticks + 1) * TICK);
        assert_eq!(m.kernel().dumps, 2, "read at SETTLE_MAX despite the burst");

        let mut m = Mirror::new(kernel()).unwrap();
        m.snapshot(&c, t0);
        m.kernel_mut().tables.routes.clear();
        m.kernel_mut().pending = vec![Changes {
            relevant: 0,
            overflow: true,
        }];
        assert_eq!(m.poll(&c, t0 + TICK), None);
        let snap = m.poll(&c, t0 + 2 * TICK).expect("re-read after overflow");
        assert!(snap.routes.is_empty());
    }

    #[test]
    fn a_failed_read_is_retried_later() {
        let c = cfg(false);
        let t0 = Instant::now();
        let mut m = Mirror::new(kernel()).unwrap();
        m.snapshot(&c, t0);
        m.kernel_mut().tables.routes.clear();
        m.kernel_mut().fail_dumps = 1;
        m.kernel_mut().pending = vec![relevant(1)];
        m.poll(&c, t0 + TICK);
        assert_eq!(m.poll(&c, t0 + 2 * TICK), None);
        assert_eq!(m.kernel().dumps, 2);
        assert_eq!(m.poll(&c, t0 + 3 * TICK), None, "waits DUMP_RETRY");
        assert_eq!(m.kernel().dumps, 2);
        let snap = m.poll(&c, t0 + 2 * TICK + DUMP_RETRY).expect("retried");
        assert!(snap.routes.is_empty());
        assert_eq!(m.kernel().dumps, 3);
    }

    #[test]
    fn missing_next_hops_are_resolved_with_back_off_until_known() {
        let c = cfg(true);
        let t0 = Instant::now();
        let mut m = Mirror::new(kernel()).unwrap();
        m.snapshot(&c, t0);
        let want = (ip("198.19.0.11"), 7);
        let s = Duration::from_secs(1);
        // Asked at once, then after 1 s, 2 s, 4 s, 8 s, 16 s, 16 s.
        let mut asked_at = Vec::new();
        for ms in (0..=60_000).step_by(100) {
            let now = t0 + Duration::from_millis(ms);
            let before = m.kernel().asked.len();
            m.poll(&c, now);
            if m.kernel().asked.len() > before {
                asked_at.push(Duration::from_millis(ms));
            }
        }
        assert!(m.kernel().asked.iter().all(|a| *a == want));
        assert_eq!(asked_at, [0, 1, 3, 7, 15, 31, 47].map(|n| n * s).to_vec());
        // Learned: published, and no more asking.
        m.kernel_mut()
            .tables
            .neighbours
            .push(neighbour(NeighState::Reachable));
        m.kernel_mut().pending = vec![relevant(1)];
        let t1 = t0 + Duration::from_secs(61);
        m.poll(&c, t1);
        let snap = m.poll(&c, t1 + TICK).expect("neighbour published");
        assert_eq!(snap.neighbours.len(), 1);
        let n = m.kernel().asked.len();
        m.poll(&c, t1 + Duration::from_secs(100));
        assert_eq!(m.kernel().asked.len(), n);
    }

    #[test]
    fn stale_next_hops_are_reconfirmed_at_most_every_refresh_interval() {
        let c = cfg(true);
        let t0 = Instant::now();
        let mut k = kernel();
        k.tables.neighbours.push(neighbour(NeighState::Stale));
        let mut m = Mirror::new(k).unwrap();
        m.snapshot(&c, t0);
        m.poll(&c, t0);
        m.poll(&c, t0 + REFRESH_EVERY - TICK);
        assert_eq!(m.kernel().asked.len(), 1);
        m.poll(&c, t0 + REFRESH_EVERY);
        assert_eq!(m.kernel().asked.len(), 2);
    }

    #[test]
    fn resolve_false_never_asks() {
        let c = cfg(false);
        let t0 = Instant::now();
        let mut m = Mirror::new(kernel()).unwrap();
        m.snapshot(&c, t0);
        for i in 0..100 {
            m.poll(&c, t0 + i * Duration::from_secs(1));
        }
        assert!(m.kernel().asked.is_empty());
    }
}
