//! `lbgen bench`: per-core forwarding rate on vnic rings, measured side by
//! side in one run: a null forwarder (descriptor handover only: the ceiling
//! of these rings on this machine), established NAT flows, new connections
//! (SYN + table insert), a mix (9 established : 1 new), and established
//! flows again while the switch's queue of held SYNs is full (another
//! service's backend at its `max_conns`), for each frame size, repeated;
//! medians reported.
//!
//! lbgen pins itself to one CPU and the appliance's single switch (idle
//! policy `busy`) to another. The generator keeps the switch's RX ring full
//! and counts frames leaving the other port.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use netdrv::vnic::VnicWire;
use serde::Serialize;
use shm_layout::Region;
use shm_layout::switch_slot::Counter;

use crate::appliance::Appliance;
use crate::frames::{self, Spec, TcpFlags};

#[derive(Clone, Debug)]
pub struct BenchConfig {
    pub runs: usize,
    pub duration: Duration,
    pub frame_sizes: Vec<usize>,
    pub gen_cpu: usize,
    pub switch_cpu: usize,
    /// Established flows cycled through.
    pub flows: usize,
    /// The appliance's `[limits] connections`.
    pub connections: usize,
    /// Print each measurement (rate and frames the switch received) to stderr.
    pub verbose: bool,
    /// Services configured; the measured one is the last (the others only
    /// make the configuration bigger).
    pub services: usize,
    /// Where the appliances' shared memory lives.
    pub pages: Pages,
}

/// Where the benchmark's appliances keep their shared memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Pages {
    /// As docs/OPERATIONS.md deploys it: a `/dev/shm` that grants huge
    /// pages to mappings that ask (`huge=advise`). The benchmark mounts
    /// one in a private mount namespace of its own, so the host's mounts
    /// stay as they are.
    Huge,
    /// The host's `/dev/shm` as it is (4 KiB pages on a default host).
    Host,
}

/// Moves this process (and every process it starts from now on) into a
/// private mount namespace whose `/dev/shm` is a fresh tmpfs mounted
/// `huge=advise`; the host's mounts are untouched. Needs root.
fn private_huge_shm() -> Result<()> {
    use nix::mount::{MsFlags, mount};
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
        .context("a private mount namespace (unshare; root?)")?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .context("making the namespace's mounts private")?;
    mount(
        Some("tmpfs"),
        "/dev/shm",
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("huge=advise,mode=1777,size=50%"),
    )
    .context("mounting a huge=advise tmpfs on the namespace's /dev/shm")?;
    Ok(())
}

impl BenchConfig {
    pub fn full() -> Self {
        Self {
            runs: 5,
            duration: Duration::from_secs(1),
            frame_sizes: vec![64, 1500],
            gen_cpu: 0,
            switch_cpu: 1,
            flows: 4096,
            connections: 1 << 20,
            verbose: false,
            services: 1,
            pages: Pages::Huge,
        }
    }

    pub fn quick() -> Self {
        Self {
            runs: 1,
            duration: Duration::from_millis(200),
            flows: 512,
            ..Self::full()
        }
    }
}

/// One frame size's results (rates in millions of frames per second).
#[derive(Clone, Debug, Serialize)]
pub struct SizeResult {
    pub frame_bytes: usize,
    pub ceiling_mpps: f64,
    pub established_mpps: f64,
    pub new_flow_mpps: f64,
    pub mix_mpps: f64,
    /// Established flows while the switch holds a full queue of SYNs for
    /// another service (see [`FULL_QUEUE_VIP`]).
    pub full_queue_mpps: f64,
    /// established over ceiling, same run
    pub ratio_to_ceiling: f64,
    /// Established with a full SYN queue over established, run by run
    /// (the two measured side by side); the median of the runs.
    pub full_queue_to_established: f64,
    pub runs: usize,
    /// Established flows the established and mix loads cycle through.
    pub flows: usize,
    /// Rates of every run (Mpps).
    pub samples: Samples,
    /// The switch's own cost: nanoseconds it spent in poll loops that moved
    /// frames, per frame received (medians; the switch's `busy_ns` counter).
    /// Unlike a rate, this does not fall when the generator falls behind.
    pub switch_ns_per_frame: SwitchCost,
    /// Whether every measurement's region was on huge pages (the `/dev/shm`
    /// mount's choice; see docs/OPERATIONS.md, Sizing a switch).
    pub region_huge_pages: bool,
}

/// Medians of the switch's busy nanoseconds per frame, per scenario.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SwitchCost {
    pub ceiling: f64,
    pub established: f64,
    pub new_flow: f64,
    pub mix: f64,
    pub full_queue: f64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Samples {
    pub ceiling: Vec<f64>,
    pub established: Vec<f64>,
    pub new_flow: Vec<f64>,
    pub mix: Vec<f64>,
    pub full_queue: Vec<f64>,
}

const VIP: [u8; 4] = [198, 18, 0, 10];
/// The VIP of the service whose one backend takes one connection
/// (`max_conns = 1`) and whose new connections wait up to a minute: the
/// full-queue scenario sends it enough SYNs to fill the switch's queue
/// ([`SYN_QUEUE`] entries) before the established flows' data. Every
/// configuration has it; only that scenario sends to it.
pub const FULL_QUEUE_VIP: [u8; 4] = [198, 18, 0, 11];
/// The switch's `syn_queue` (its default).
const SYN_QUEUE: usize = 256;
const GW: [u8; 6] = [2, 0, 0, 0, 2, 1];
const PORT0: [u8; 6] = [2, 0, 0, 0, 0, 1];

fn config(instance: &str, engine: &str, cpu: usize, conns: usize, services: usize) -> String {
    // Many services get smaller Maglev tables (still over 100 entries per
    // backend), so the region stays small.
    let maglev = if services > 16 { 4093 } else { 65537 };
    // One backend per other service and for the full-queue one, three for
    // the measured one.
    let backends = (services + 3).max(1024);
    let mut s = format!(
        "instance = \"{instance}\"\n[limits]\nconnections = {conns}\nservices = {}\nbackends = {backends}\nmaglev_table_size = {maglev}\n[timeouts]\ntcp_syn = 1\ntcp_fin = 1\n\n\
         [[port]]\nname = \"client\"\ndriver = \"vnic\"\nmac = \"02:00:00:00:00:01\"\nring_size = 1024\n\n\
         [[port]]\nname = \"backend\"\ndriver = \"vnic\"\nmac = \"02:00:00:00:00:02\"\nring_size = 1024\n\n\
         [[switch]]\nname = \"sw0\"\ncpu = {cpu}\nports = [\"client\", \"backend\"]\nidle = \"busy\"\nburst = 32\nengine = \"{engine}\"\nsyn_queue = {SYN_QUEUE}\n\n",
        services + 1
    );
    let [a, b, c, d] = FULL_QUEUE_VIP;
    s += &format!(
        "[[service]]\nname = \"full\"\nvip = \"{a}.{b}.{c}.{d}\"\nport = 80\nprotocol = \"tcp\"\nmode = \"nat\"\nqueue_timeout_ms = 60000\n  \
         [[service.backend]]\n  name = \"full1\"\n  address = \"198.19.1.1\"\n  port = 8081\n  max_conns = 1\n"
    );
    // Other services first, so the measured one is the last of the list.
    for i in 1..services {
        s += &format!(
            "[[service]]\nname = \"other{i}\"\nvip = \"198.18.{}.{}\"\nport = 80\nprotocol = \"tcp\"\nmode = \"nat\"\n  \
             [[service.backend]]\n  name = \"o{i}\"\n  address = \"198.19.1.1\"\n  port = 8080\n",
            8 + i / 250,
            1 + i % 250
        );
    }
    s += "[[service]]\nname = \"web\"\nvip = \"198.18.0.10\"\nport = 80\nprotocol = \"tcp\"\nmode = \"nat\"\n";
    for i in 1..=3 {
        s += &format!(
            "  [[service.backend]]\n  name = \"web{i}\"\n  address = \"198.19.1.{i}\"\n  port = 8080\n"
        );
    }
    s += "[[route]]\nprefix = \"198.19.1.0/24\"\nport = \"backend\"\n[[route]]\nprefix = \"198.18.96.0/19\"\nport = \"client\"\nvia = \"198.18.0.1\"\n";
    s +=
        "[[neighbour]]\naddress = \"198.18.0.1\"\nmac = \"02:00:00:00:02:01\"\nport = \"client\"\n";
    for i in 1..=3 {
        s += &format!(
            "[[neighbour]]\naddress = \"198.19.1.{i}\"\nmac = \"02:00:00:00:01:0{i}\"\nport = \"backend\"\n"
        );
    }
    s
}

fn pin(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; sched_setaffinity reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// A client TCP frame of exactly `size` bytes from client (ip, port).
fn client_frame(size: usize, ip: [u8; 4], port: u16, syn: bool) -> Vec<u8> {
    client_frame_to(VIP, size, ip, port, syn)
}

/// [`client_frame`] to `vip`:80.
fn client_frame_to(vip: [u8; 4], size: usize, ip: [u8; 4], port: u16, syn: bool) -> Vec<u8> {
    let mut v = Vec::new();
    frames::build(
        &Spec {
            src_mac: GW,
            dst_mac: PORT0,
            src: (ip, port),
            dst: (vip, 80),
            tcp: Some(TcpFlags {
                syn,
                ack: !syn,
                seq: 1,
                ack_no: u32::from(!syn),
                ..Default::default()
            }),
            ttl: 64,
            ident: 0,
            payload_len: size.saturating_sub(54),
        },
        &mut v,
    );
    v
}

fn client_ip(n: u32) -> [u8; 4] {
    // 198.18.96.0/19: 8190 hosts.
    let host = 1 + (n % 8190);
    (u32::from_be_bytes([198, 18, 96, 0]) + host).to_be_bytes()
}

/// Rewrites a SYN template's source address/port (and IPv4 checksum) in place.
fn patch_new_flow(buf: &mut [u8], n: u32) {
    let ip = client_ip(n / 60_000);
    buf[26..30].copy_from_slice(&ip);
    buf[34..36].copy_from_slice(&(1024 + (n % 60_000) as u16).to_be_bytes());
    buf[24] = 0;
    buf[25] = 0;
    let mut s = 0u32;
    for c in buf[14..34].chunks_exact(2) {
        s += u16::from_be_bytes([c[0], c[1]]) as u32;
    }
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    buf[24..26].copy_from_slice(&(!(s as u16)).to_be_bytes());
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Load {
    Established,
    NewFlows,
    Mix,
    /// Established, with the switch's SYN queue filled first.
    FullQueue,
}

/// Keeps the RX ring full for `dur`; returns frames per second leaving `out`.
/// The frames one measurement sends.
struct Traffic<'a> {
    templates: &'a [Vec<u8>],
    syn: &'a [u8],
    load: Load,
}

fn pump(
    wire: &mut VnicWire,
    inp: usize,
    out: usize,
    dur: Duration,
    tr: &Traffic<'_>,
    next_new: &mut u32,
) -> f64 {
    let mut got = 0u64;
    let mut i = 0usize;
    let start = Instant::now();
    let (templates, syn, load) = (tr.templates, tr.syn, tr.load);
    let len = syn.len();
    loop {
        for _ in 0..64 {
            let new = match load {
                Load::Established | Load::FullQueue => false,
                Load::NewFlows => true,
                Load::Mix => i % 10 == 9,
            };
            let ok = if new {
                let n = *next_new;
                wire.inject_with(inp, len, |b| {
                    b[..len].copy_from_slice(syn);
                    patch_new_flow(b, n);
                })
            } else {
                let t = &templates[i % templates.len()];
                wire.inject_with(inp, t.len(), |b| b[..t.len()].copy_from_slice(t))
            };
            if !ok {
                break;
            }
            if new {
                *next_new = next_new.wrapping_add(1);
            }
            i += 1;
        }
        got += wire.collect(out, 256, |_| {}) as u64;
        if start.elapsed() >= dur {
            break;
        }
    }
    let el = start.elapsed().as_secs_f64();
    // Drain what is still in flight (not counted).
    let t = Instant::now();
    while t.elapsed() < Duration::from_millis(20) {
        wire.collect(out, 256, |_| {});
    }
    got as f64 / el
}

fn scenario_name(engine: &str, load: Load) -> &'static str {
    match (engine, load) {
        ("null", _) => "null",
        (_, Load::Established) => "established",
        (_, Load::NewFlows) => "new_flows",
        (_, Load::Mix) => "mix",
        (_, Load::FullQueue) => "established_full_queue",
    }
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    if s.is_empty() {
        return 0.0;
    }
    if s.len() % 2 == 1 {
        s[s.len() / 2]
    } else {
        (s[s.len() / 2 - 1] + s[s.len() / 2]) / 2.0
    }
}

fn wire_for(app: &Appliance) -> Result<(VnicWire, usize, usize)> {
    let name = format!("switchyard.{}.vnic.sw0", app.instance);
    let w = VnicWire::attach(&name).with_context(|| format!("attaching to {name}"))?;
    let inp = (0..w.port_count())
        .position(|p| w.port_name(p) == "client")
        .context("client port")?;
    let out = (0..w.port_count())
        .position(|p| w.port_name(p) == "backend")
        .context("backend port")?;
    Ok((w, inp, out))
}

/// Opens the established flows with their SYNs (untimed).
fn establish(wire: &mut VnicWire, inp: usize, out: usize, flows: usize) {
    for n in 0..flows as u32 {
        let s = client_frame(64, client_ip(n), 40_000 + (n / 8190) as u16, true);
        while !wire.inject(inp, &s) {
            wire.collect(out, 256, |_| {});
        }
    }
    let t = Instant::now();
    while t.elapsed() < Duration::from_millis(50) {
        wire.collect(out, 256, |_| {});
    }
}

/// Fills the switch's queue of held SYNs: one SYN takes the full service's
/// only connection slot, [`SYN_QUEUE`] more wait in the queue, and a few
/// beyond are refused (their RSTs go back out the client port). Untimed;
/// checks with the switch's counters that the queue is full.
fn fill_queue(wire: &mut VnicWire, inp: usize, out: usize, region: &Region) -> Result<()> {
    let c = &region.switch_slots()[0].counters;
    let read = |k: Counter| c[k as usize].load(Ordering::Relaxed);
    let before = read(Counter::ConnQueued);
    for n in 0..(1 + SYN_QUEUE + 16) as u16 {
        let s = client_frame_to(FULL_QUEUE_VIP, 64, client_ip(0), 1024 + n, true);
        while !wire.inject(inp, &s) {
            wire.collect(out, 256, |_| {});
            wire.collect(inp, 256, |_| {});
        }
    }
    let t = Instant::now();
    while t.elapsed() < Duration::from_millis(50) {
        wire.collect(out, 256, |_| {});
        wire.collect(inp, 256, |_| {});
    }
    let held = read(Counter::ConnQueued) - before;
    if held < SYN_QUEUE as u64 {
        bail!("the full-queue scenario held {held} SYNs, not {SYN_QUEUE}");
    }
    Ok(())
}

/// Runs the whole benchmark.
pub fn run(cfg: &BenchConfig) -> Result<Vec<SizeResult>> {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    if cfg.gen_cpu >= cpus || cfg.switch_cpu >= cpus || cfg.gen_cpu == cfg.switch_cpu {
        bail!(
            "need two distinct CPUs (generator {}, switch {}) among {cpus}",
            cfg.gen_cpu,
            cfg.switch_cpu
        );
    }
    if cfg.pages == Pages::Huge
        && let Err(e) = private_huge_shm()
    {
        // Measured anyway; the report says where the region was.
        eprintln!("lbgen bench: {e:#}; measuring on the host's /dev/shm");
    }
    pin(cfg.gen_cpu);
    let mut samples: Vec<Samples> = vec![Samples::default(); cfg.frame_sizes.len()];
    let mut busy: Vec<Samples> = vec![Samples::default(); cfg.frame_sizes.len()];
    let mut huge = vec![true; cfg.frame_sizes.len()];
    let pid = std::process::id();
    let scenarios = [
        ("null", Load::Established),
        ("filter", Load::Established),
        ("filter", Load::NewFlows),
        ("filter", Load::Mix),
        ("filter", Load::FullQueue),
    ];
    for (si, &size) in cfg.frame_sizes.iter().enumerate() {
        let templates: Vec<Vec<u8>> = (0..cfg.flows as u32)
            .map(|n| client_frame(size, client_ip(n), 40_000 + (n / 8190) as u16, false))
            .collect();
        let syn = client_frame(size, client_ip(0), 1024, true);
        for run in 0..cfg.runs {
            // Every measurement starts from a freshly started appliance, so
            // one scenario's table state never leaks into the next.
            for (k, &(engine, load)) in scenarios.iter().enumerate() {
                let inst = format!("bench-{pid}-{size}-{run}-{k}");
                let app = Appliance::try_start(
                    &inst,
                    &config(&inst, engine, cfg.switch_cpu, cfg.connections, cfg.services),
                )
                .map_err(|e| anyhow::anyhow!("{inst}: {e}"))?;
                huge[si] &= app.region().huge_page_bytes().is_some_and(|b| b > 0);
                let (mut wire, inp, out) = wire_for(&app)?;
                if engine == "filter" {
                    establish(&mut wire, inp, out, cfg.flows);
                }
                if load == Load::FullQueue {
                    fill_queue(&mut wire, inp, out, &app.region())?;
                }
                let tr = Traffic {
                    templates: &templates,
                    syn: &syn,
                    load,
                };
                let mut next_new = 0u32;
                let region = app.region();
                let c = &region.switch_slots()[0].counters;
                let read = |k: Counter| c[k as usize].load(Ordering::Relaxed);
                // The switch is idle after `establish` (its counters
                // published); the measurement is what moves from here.
                let watched = [
                    Counter::RxPackets,
                    Counter::BusyNs,
                    Counter::Loops,
                    Counter::FlowCacheHit,
                ];
                let before = watched.map(read);
                let rate = pump(&mut wire, inp, out, cfg.duration, &tr, &mut next_new) / 1e6;
                let [rx, busy_ns, loops, cached] = watched.map(read);
                let frames = rx - before[0];
                let ns = (busy_ns - before[1]) as f64 / frames.max(1) as f64;
                if cfg.verbose {
                    eprintln!(
                        "run {run} {size} B {}: {rate:.2} Mpps (switch received {rx} frames, {frames} of them measured, in {} loops counting the idle ones of the drain, busy {ns:.1} ns per frame, {:.1}% answered from its flow cache; lbgen found the RX ring full {} times)",
                        scenario_name(engine, load),
                        loops - before[2],
                        100.0 * (cached - before[3]) as f64 / frames.max(1) as f64,
                        wire.ring_full
                    );
                }
                for (s, v) in [(&mut samples[si], rate), (&mut busy[si], ns)] {
                    match (engine, load) {
                        ("null", _) => s.ceiling.push(v),
                        (_, Load::Established) => s.established.push(v),
                        (_, Load::NewFlows) => s.new_flow.push(v),
                        (_, Load::Mix) => s.mix.push(v),
                        (_, Load::FullQueue) => s.full_queue.push(v),
                    }
                }
                drop(wire);
                drop(app);
            }
        }
    }
    Ok(cfg
        .frame_sizes
        .iter()
        .zip(samples.into_iter().zip(busy).zip(huge))
        .map(|(&frame_bytes, ((s, b), region_huge_pages))| {
            let ceiling = median(&s.ceiling);
            let est = median(&s.established);
            let paired: Vec<f64> = s
                .full_queue
                .iter()
                .zip(&s.established)
                .map(|(q, e)| if *e > 0.0 { q / e } else { 0.0 })
                .collect();
            SizeResult {
                frame_bytes,
                ceiling_mpps: ceiling,
                established_mpps: est,
                new_flow_mpps: median(&s.new_flow),
                mix_mpps: median(&s.mix),
                full_queue_mpps: median(&s.full_queue),
                ratio_to_ceiling: if ceiling > 0.0 { est / ceiling } else { 0.0 },
                full_queue_to_established: median(&paired),
                runs: cfg.runs,
                flows: cfg.flows,
                samples: s,
                switch_ns_per_frame: SwitchCost {
                    ceiling: median(&b.ceiling),
                    established: median(&b.established),
                    new_flow: median(&b.new_flow),
                    mix: median(&b.mix),
                    full_queue: median(&b.full_queue),
                },
                region_huge_pages,
            }
        })
        .collect())
}
