//! The traffic model shared by lbgen and the integration tests.
//!
//! lbgen plays both ends of every connection: the clients on the client
//! side and the backends on the backend side, through the wire end of the
//! appliance's virtual NICs. A flow is a scripted exchange (SYN, SYN-ACK,
//! data both ways, FIN for TCP; request/response for UDP). Each step sends
//! one frame and expects exactly one frame back out of the appliance, which
//! is parsed by etherparse and checked: MACs, addresses, ports, TTL, IPv4
//! and TCP/UDP checksums, and that every packet of a flow reaches the
//! backend its first packet reached. The step number travels in the IPv4
//! identification field, so retransmitted and late frames are recognised.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use netdrv::vnic::VnicWire;
use serde::Serialize;
use shm_layout::Region;
use shm_layout::config_slot::PROTO_TCP;

use crate::frames::{self, Spec, TcpFlags};
use crate::topo::{self, ServiceInfo, Topology};

/// What to generate.
#[derive(Clone, Debug)]
pub struct GenConfig {
    pub instance: String,
    /// Services by name; empty means all.
    pub services: Vec<String>,
    /// Flows to run in total.
    pub flows: u64,
    /// Stop starting flows after this long (flows in flight still finish).
    pub duration: Option<Duration>,
    /// Flows in flight at once.
    pub concurrency: usize,
    /// Data exchanges per flow.
    pub data_packets: u32,
    /// Payload bytes of data packets.
    pub payload: usize,
    /// Client addresses are drawn from this prefix.
    pub client_net: ([u8; 4], u8),
    /// Offsets client addresses and ports so repeated runs use new flows.
    pub seed: u64,
    /// Resend a step's frame when its answer has not come back after this long.
    pub retransmit: Duration,
    /// Give up on a flow after this many resends of one step.
    pub max_retries: u32,
    /// Hard bound on the whole run.
    pub time_limit: Duration,
    /// Stop starting flows once this is set (flows in flight still finish).
    pub stop: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

impl Default for GenConfig {
    fn default() -> Self {
        Self {
            instance: "demo".into(),
            services: Vec::new(),
            flows: 1000,
            duration: None,
            concurrency: 64,
            data_packets: 2,
            payload: 64,
            client_net: ([198, 18, 100, 0], 24),
            seed: 0,
            retransmit: Duration::from_millis(200),
            max_retries: 15,
            time_limit: Duration::from_secs(120),
            stop: None,
        }
    }
}

/// An address and port.
type Endpoint = ([u8; 4], u16);

/// What happened.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    pub flows_started: u64,
    pub flows_completed: u64,
    pub flows_failed: u64,
    pub packets_sent: u64,
    pub packets_received: u64,
    pub retransmits: u64,
    /// Frames that failed a check (checksum, address, MAC, TTL).
    pub bad_frames: u64,
    /// Frames that matched no flow.
    pub unexpected_frames: u64,
    /// Late copies of frames already accounted for (after a resend).
    pub duplicate_frames: u64,
    /// Packets of a flow that reached a different backend than its first packet.
    pub affinity_violations: u64,
    pub rst_received: u64,
    pub ring_full: u64,
    /// Completed flows per backend "ip:port", per service.
    pub per_backend: BTreeMap<String, BTreeMap<String, u64>>,
    pub elapsed_s: f64,
    /// Frames sent plus received per second.
    pub pps: f64,
    /// The first few problems, verbatim.
    pub errors: Vec<String>,
}

impl Report {
    fn error(&mut self, e: String) {
        if self.errors.len() < 20 {
            self.errors.push(e);
        }
    }

    /// Whether every flow completed with no bad, unexpected or misrouted frame.
    pub fn clean(&self) -> bool {
        self.flows_failed == 0
            && self.bad_frames == 0
            && self.unexpected_frames == 0
            && self.affinity_violations == 0
            && self.flows_completed == self.flows_started
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dir {
    ToVip,
    ToClient,
}

#[derive(Debug)]
struct Flow {
    svc: usize,
    client: ([u8; 4], u16),
    queue: usize,
    backend: Option<([u8; 4], u16)>,
    step: u16,
    steps: u16,
    sent_at: Instant,
    retries: u32,
    pending_send: bool,
    /// The configuration generation published when the flow started.
    config_gen: u64,
    /// Whether any of its frames was sent again (a late copy may follow
    /// the flow's end).
    resent: bool,
}

/// The wire ends of every queue, with each NIC's local ports mapped to global ids.
struct Wires {
    nics: Vec<VnicWire>,
    /// per nic: local port -> global id
    global: Vec<Vec<u32>>,
}

impl Wires {
    fn attach(instance: &str, topo: &Topology) -> Result<Self> {
        let mut nics = Vec::new();
        let mut global = Vec::new();
        for name in topo::vnic_names(instance)? {
            let w = VnicWire::attach(&name)
                .with_context(|| format!("attaching to {name} as the wire"))?;
            let mut g = Vec::new();
            for p in 0..w.port_count() {
                let pname = w.port_name(p).to_string();
                let id = topo
                    .ports
                    .iter()
                    .position(|(n, _)| *n == pname)
                    .with_context(|| {
                        format!("{name}: port {pname:?} is not in the configuration")
                    })?;
                g.push(id as u32);
            }
            nics.push(w);
            global.push(g);
        }
        Ok(Self { nics, global })
    }

    fn local(&self, nic: usize, global: u32) -> Option<usize> {
        self.global[nic].iter().position(|&g| g == global)
    }

    /// Queues (NICs) that serve a global port.
    fn queues_for(&self, global: u32) -> Vec<usize> {
        (0..self.nics.len())
            .filter(|&n| self.local(n, global).is_some())
            .collect()
    }
}

/// The traffic generator.
pub struct Generator {
    cfg: GenConfig,
    region: Region,
    topo: Topology,
    wires: Wires,
    services: Vec<usize>,
    flows: Vec<Flow>,
    by_client: HashMap<([u8; 4], u16), usize>,
    /// Clients of completed flows that resent a frame: their late copies
    /// are duplicates, not frames for no flow.
    finished_resent: HashSet<Endpoint>,
    /// Every configuration generation seen, oldest first, with each
    /// service's backends in it: a new flow may only reach a backend of the
    /// generation in force when it started or a later one.
    backend_history: Vec<(u64, Vec<Vec<Endpoint>>)>,
    client_queues: Vec<usize>,
    client_port: u32,
    client_gw_mac: [u8; 6],
    report: Report,
    buf: Vec<u8>,
    rx: Vec<(u32, Vec<u8>)>,
}

impl Generator {
    pub fn new(cfg: GenConfig) -> Result<Self> {
        let region = topo::attach(&cfg.instance)?;
        let topo = Topology::read(&region);
        if topo.config_generation == 0 {
            bail!(
                "instance {:?} has no published configuration yet",
                cfg.instance
            );
        }
        let wires = Wires::attach(&cfg.instance, &topo)?;
        let services: Vec<usize> = if cfg.services.is_empty() {
            (0..topo.services.len()).collect()
        } else {
            cfg.services
                .iter()
                .map(|n| {
                    topo.services
                        .iter()
                        .position(|s| &s.name == n)
                        .with_context(|| {
                            format!(
                                "service {n:?} is not configured (services: {})",
                                topo.services
                                    .iter()
                                    .map(|s| s.name.as_str())
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            )
                        })
                })
                .collect::<Result<_>>()?
        };
        if services.is_empty() {
            bail!("no service to send to");
        }
        let probe = client_addr(&cfg, 0).0;
        let (client_port, client_gw_mac) = topo.next_hop(probe).with_context(|| {
            format!("the appliance has no route/neighbour toward clients like {probe:?}")
        })?;
        let client_queues = wires.queues_for(client_port);
        if client_queues.is_empty() {
            bail!("no virtual NIC serves the client-side port {client_port}");
        }
        let backend_history = vec![(
            topo.config_generation,
            topo.services.iter().map(|s| s.backends.clone()).collect(),
        )];
        Ok(Self {
            cfg,
            region,
            topo,
            wires,
            services,
            flows: Vec::new(),
            by_client: HashMap::new(),
            finished_resent: HashSet::new(),
            backend_history,
            client_queues,
            client_port,
            client_gw_mac,
            report: Report::default(),
            buf: Vec::with_capacity(2048),
            rx: Vec::new(),
        })
    }

    fn svc(&self, f: &Flow) -> &ServiceInfo {
        &self.topo.services[f.svc]
    }

    fn steps_for(svc: &ServiceInfo, data: u32) -> u16 {
        let d = data as u16;
        match (svc.proto == PROTO_TCP, svc.dr) {
            (true, false) => 2 + 2 * d + 1,
            (true, true) => 1 + d + 1,
            (false, false) => 2 * d.max(1),
            (false, true) => d.max(1),
        }
    }

    /// Direction and TCP flags of a step.
    fn step_kind(svc: &ServiceInfo, step: u16, steps: u16) -> (Dir, Option<TcpFlags>, bool) {
        let tcp = svc.proto == PROTO_TCP;
        if !tcp {
            let dir = if svc.dr || step.is_multiple_of(2) {
                Dir::ToVip
            } else {
                Dir::ToClient
            };
            return (dir, None, true);
        }
        let last = step + 1 == steps;
        let f = |syn, ack, fin, psh| {
            Some(TcpFlags {
                syn,
                ack,
                fin,
                psh,
                seq: 1000 + step as u32,
                ack_no: 1,
                rst: false,
            })
        };
        if step == 0 {
            return (Dir::ToVip, f(true, false, false, false), false);
        }
        if last {
            return (Dir::ToVip, f(false, true, true, false), false);
        }
        if svc.dr {
            return (Dir::ToVip, f(false, true, false, true), true);
        }
        if step == 1 {
            return (Dir::ToClient, f(true, true, false, false), false);
        }
        let dir = if step.is_multiple_of(2) {
            Dir::ToVip
        } else {
            Dir::ToClient
        };
        (dir, f(false, true, false, true), true)
    }

    fn send_step(&mut self, fi: usize) {
        let f = &self.flows[fi];
        let svc = &self.topo.services[f.svc];
        let (dir, tcp, data) = Self::step_kind(svc, f.step, f.steps);
        let payload_len = if data { self.cfg.payload } else { 0 };
        let (global, spec) = match dir {
            Dir::ToVip => {
                let mac = self.topo.ports[self.client_port as usize].1;
                (
                    self.client_port,
                    Spec {
                        src_mac: self.client_gw_mac,
                        dst_mac: mac,
                        src: f.client,
                        dst: (svc.vip, svc.port),
                        tcp,
                        ttl: 64,
                        ident: f.step,
                        payload_len,
                    },
                )
            }
            Dir::ToClient => {
                let backend = f.backend.expect("backend known after the first step");
                let Some((port, bmac)) = self.topo.next_hop(backend.0) else {
                    return;
                };
                (
                    port,
                    Spec {
                        src_mac: bmac,
                        dst_mac: self.topo.ports[port as usize].1,
                        src: backend,
                        dst: f.client,
                        tcp,
                        ttl: 64,
                        ident: f.step,
                        payload_len,
                    },
                )
            }
        };
        frames::build(&spec, &mut self.buf);
        let queue = f.queue;
        let Some(local) = self.wires.local(queue, global) else {
            // This queue's switch does not serve that port: use any that does.
            let qs = self.wires.queues_for(global);
            let Some(&q) = qs.first() else { return };
            let local = self.wires.local(q, global).expect("serves it");
            self.inject(fi, q, local);
            return;
        };
        self.inject(fi, queue, local);
    }

    fn inject(&mut self, fi: usize, q: usize, local: usize) {
        let ok = self.wires.nics[q].inject(local, &self.buf);
        let f = &mut self.flows[fi];
        if ok {
            self.report.packets_sent += 1;
            f.pending_send = false;
            f.sent_at = Instant::now();
        } else {
            self.report.ring_full += 1;
            f.pending_send = true;
        }
    }

    fn start_flow(&mut self, n: u64) {
        let svc = self.services[(n % self.services.len() as u64) as usize];
        let client = client_addr(&self.cfg, n);
        let steps = Self::steps_for(&self.topo.services[svc], self.cfg.data_packets);
        let queue = self.client_queues[(hash2(client) % self.client_queues.len() as u64) as usize];
        self.refresh_topology();
        let config_gen = self.topo.config_generation;
        let fi = self.flows.len();
        self.flows.push(Flow {
            svc,
            client,
            queue,
            backend: None,
            step: 0,
            steps,
            sent_at: Instant::now(),
            retries: 0,
            pending_send: true,
            config_gen,
            resent: false,
        });
        self.by_client.insert(client, fi);
        self.report.flows_started += 1;
        self.send_step(fi);
    }

    fn refresh_topology(&mut self) {
        let g = self.region.generation(shm_layout::Table::Config);
        if g != self.topo.config_generation {
            let t = Topology::read(&self.region);
            self.backend_history.push((
                t.config_generation,
                t.services.iter().map(|s| s.backends.clone()).collect(),
            ));
            // Keep service indexes stable: only refresh routes/neighbours and backends.
            self.topo.routes = t.routes;
            self.topo.neighbours = t.neighbours;
            self.topo.config_generation = t.config_generation;
        }
    }

    /// Whether a flow of service `svc` started under configuration
    /// generation `since` may open on backend `b`: `b` belongs to the
    /// generation before `since` (a switch may finish a burst it began on
    /// it), to `since`, or to any later one.
    fn backend_allowed(&self, svc: usize, since: u64, b: Endpoint) -> bool {
        let floor = since.saturating_sub(1);
        let first = self
            .backend_history
            .iter()
            .rposition(|(g, _)| *g <= floor)
            .unwrap_or(0);
        self.backend_history[first..]
            .iter()
            .any(|(_, s)| s.get(svc).is_some_and(|v| v.contains(&b)))
    }

    /// Checks one frame that came out of global port `port`.
    fn on_frame(&mut self, port: u32, frame: &[u8]) {
        self.report.packets_received += 1;
        let p = match frames::parse_checked(frame) {
            Ok(p) => p,
            Err(e) => {
                self.report.bad_frames += 1;
                self.report
                    .error(format!("bad frame out of port {port}: {e}"));
                return;
            }
        };
        if p.tcp.is_some_and(|t| t.rst) {
            self.report.rst_received += 1;
        }
        let (dir, client) = if in_prefix(p.dst.0, self.cfg.client_net) {
            (Dir::ToClient, p.dst)
        } else {
            (Dir::ToVip, p.src)
        };
        let Some(&fi) = self.by_client.get(&client) else {
            if self.finished_resent.contains(&client) {
                // A late copy of a resent frame of a flow that completed.
                self.report.duplicate_frames += 1;
                return;
            }
            self.report.unexpected_frames += 1;
            self.report.error(format!(
                "frame for no flow: {:?} -> {:?} out of port {port}",
                p.src, p.dst
            ));
            return;
        };
        let step = self.flows[fi].step;
        if p.ident < step || self.flows[fi].step >= self.flows[fi].steps {
            self.report.duplicate_frames += 1;
            return;
        }
        if p.ident > step {
            self.report.bad_frames += 1;
            self.report.error(format!(
                "flow {client:?}: frame of step {} while at step {step}",
                p.ident
            ));
            return;
        }
        let svc = self.svc(&self.flows[fi]).clone();
        let (want_dir, _, _) = Self::step_kind(&svc, step, self.flows[fi].steps);
        if let Err(e) = self.check(fi, &svc, port, &p, dir, want_dir) {
            self.report.bad_frames += 1;
            self.report
                .error(format!("flow {client:?} step {step}: {e}"));
            return;
        }
        let f = &mut self.flows[fi];
        f.step += 1;
        f.retries = 0;
        if f.step == f.steps {
            self.report.flows_completed += 1;
            let b = f.backend.expect("known");
            *self
                .report
                .per_backend
                .entry(svc.name.clone())
                .or_default()
                .entry(format!("{}:{}", ip(b.0), b.1))
                .or_default() += 1;
            if f.resent {
                self.finished_resent.insert(client);
            }
            self.by_client.remove(&client);
        } else {
            self.send_step(fi);
        }
    }

    fn check(
        &mut self,
        fi: usize,
        svc: &ServiceInfo,
        port: u32,
        p: &frames::Parsed,
        dir: Dir,
        want: Dir,
    ) -> Result<(), String> {
        if dir != want {
            return Err(format!("expected a frame {want:?}, got one {dir:?}"));
        }
        if p.ttl != 63 {
            return Err(format!("ttl {} (sent 64, one hop expected)", p.ttl));
        }
        match dir {
            Dir::ToVip => {
                let f = &self.flows[fi];
                let (bip, bport) = if svc.dr {
                    if p.dst != (svc.vip, svc.port) {
                        return Err(format!("DR frame to {:?}, expected the VIP", p.dst));
                    }
                    self.topo
                        .backend_by_mac(svc, p.dst_mac)
                        .or(f.backend)
                        .ok_or_else(|| {
                            format!("DR frame to MAC {:02x?}, which is no backend's", p.dst_mac)
                        })?
                } else {
                    p.dst
                };
                match f.backend {
                    None => {
                        let (fsvc, since) = (f.svc, f.config_gen);
                        if !self.backend_allowed(fsvc, since, (bip, bport)) {
                            // A reload may have added it since our last look.
                            self.refresh_topology();
                        }
                        if !self.backend_allowed(fsvc, since, (bip, bport)) {
                            return Err(format!(
                                "new flow sent to {bip:?}:{bport}, which is not a backend of {} \
                                 in configuration generation {} or later",
                                svc.name,
                                since.saturating_sub(1)
                            ));
                        }
                        self.flows[fi].backend = Some((bip, bport));
                    }
                    Some(b) if b != (bip, bport) => {
                        self.report.affinity_violations += 1;
                        return Err(format!(
                            "affinity: flow was on {b:?}, this packet went to {:?}",
                            (bip, bport)
                        ));
                    }
                    Some(_) => {}
                }
                let (eport, emac) = self
                    .topo
                    .next_hop(bip)
                    .ok_or("no next hop for the backend")?;
                if port != eport
                    || p.dst_mac != emac
                    || p.src_mac != self.topo.ports[eport as usize].1
                {
                    return Err(format!(
                        "left through port {port} dst MAC {:02x?} src MAC {:02x?}; expected port {eport} dst {emac:02x?} src {:02x?}",
                        p.dst_mac, p.src_mac, self.topo.ports[eport as usize].1
                    ));
                }
                if p.src != self.flows[fi].client {
                    return Err(format!(
                        "source {:?} is not the client {:?}",
                        p.src, self.flows[fi].client
                    ));
                }
            }
            Dir::ToClient => {
                if p.src != (svc.vip, svc.port) {
                    return Err(format!(
                        "reply from {:?}, expected the VIP {:?}",
                        p.src,
                        (svc.vip, svc.port)
                    ));
                }
                if port != self.client_port || p.dst_mac != self.client_gw_mac {
                    return Err(format!(
                        "reply left through port {port} to MAC {:02x?}",
                        p.dst_mac
                    ));
                }
            }
        }
        Ok(())
    }

    fn collect(&mut self) -> usize {
        self.rx.clear();
        let mut n = 0;
        for q in 0..self.wires.nics.len() {
            for local in 0..self.wires.nics[q].port_count() {
                let g = self.wires.global[q][local];
                let rx = &mut self.rx;
                n += self.wires.nics[q].collect(local, 256, |fr| rx.push((g, fr.to_vec())));
            }
        }
        let rx = std::mem::take(&mut self.rx);
        for (g, fr) in &rx {
            self.on_frame(*g, fr);
        }
        self.rx = rx;
        n
    }

    fn check_timeouts(&mut self) {
        let now = Instant::now();
        for fi in 0..self.flows.len() {
            let f = &self.flows[fi];
            if f.step >= f.steps || !self.by_client.contains_key(&f.client) {
                continue;
            }
            if f.pending_send {
                self.send_step(fi);
                continue;
            }
            if now.duration_since(f.sent_at) < self.cfg.retransmit {
                continue;
            }
            if f.retries >= self.cfg.max_retries {
                self.report.flows_failed += 1;
                let client = f.client;
                self.report.error(format!(
                    "flow {client:?} to {} failed at step {} of {} after {} resends",
                    self.topo.services[f.svc].name, f.step, f.steps, f.retries
                ));
                self.by_client.remove(&client);
                continue;
            }
            self.flows[fi].retries += 1;
            self.flows[fi].resent = true;
            self.report.retransmits += 1;
            self.send_step(fi);
        }
    }

    fn may_start(&self, next: u64, elapsed: Duration) -> bool {
        next < self.cfg.flows
            && self.cfg.duration.is_none_or(|d| elapsed < d)
            && !self
                .cfg
                .stop
                .as_ref()
                .is_some_and(|s| s.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Runs the configured traffic to completion (or the time limit).
    pub fn run(mut self) -> Report {
        let start = Instant::now();
        let mut next = 0u64;
        let mut last_scan = Instant::now();
        loop {
            let elapsed = start.elapsed();
            let may_start = self.may_start(next, elapsed);
            while may_start && self.by_client.len() < self.cfg.concurrency && next < self.cfg.flows
            {
                self.start_flow(next);
                next += 1;
            }
            let got = self.collect();
            if last_scan.elapsed() > Duration::from_millis(20) {
                self.refresh_topology();
                self.check_timeouts();
                last_scan = Instant::now();
            }
            let done_starting = !self.may_start(next, start.elapsed());
            if done_starting && self.by_client.is_empty() {
                break;
            }
            if elapsed > self.cfg.time_limit {
                let left = self.by_client.len() as u64;
                self.report.flows_failed += left;
                self.report.error(format!(
                    "time limit {:?} reached with {left} flows unfinished",
                    self.cfg.time_limit
                ));
                break;
            }
            if got == 0 {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
        let el = start.elapsed().as_secs_f64();
        self.report.elapsed_s = el;
        self.report.pps =
            (self.report.packets_sent + self.report.packets_received) as f64 / el.max(1e-9);
        self.report
    }
}

fn ip(a: [u8; 4]) -> String {
    std::net::Ipv4Addr::from(a).to_string()
}

fn in_prefix(a: [u8; 4], (p, len): ([u8; 4], u8)) -> bool {
    let m = shm_layout::routing_slot::mask(len);
    u32::from_be_bytes(a) & m == u32::from_be_bytes(p) & m
}

fn hash2(c: ([u8; 4], u16)) -> u64 {
    let x = ((u32::from_be_bytes(c.0) as u64) << 16) | c.1 as u64;
    x.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 17
}

/// The client address and port of flow `n`: hosts .1 to .250 of the client
/// prefix, ports from 1024 up, shifted by the seed.
pub fn client_addr(cfg: &GenConfig, n: u64) -> ([u8; 4], u16) {
    let hosts = ((1u64 << (32 - cfg.client_net.1.min(30) as u32)) - 6).clamp(1, 250);
    let k = n.wrapping_add(cfg.seed.wrapping_mul(1_000_003));
    let host = 1 + (k % hosts) as u32;
    let port = 1024 + ((k / hosts) % 64_000) as u16;
    let base =
        u32::from_be_bytes(cfg.client_net.0) & shm_layout::routing_slot::mask(cfg.client_net.1);
    ((base + host).to_be_bytes(), port)
}
