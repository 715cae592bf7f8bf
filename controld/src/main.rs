//! controld: the control processor of a switchyard instance.
//!
//! `controld --config FILE --check` validates a configuration and exits.
//! `controld --config FILE` creates the region and the virtual NICs,
//! publishes the configuration and routing tables, starts and supervises one
//! switchd per `[[switch]]`, serves lbctl's admin socket and the Prometheus
//! metrics, re-reads the file on SIGHUP (or `lbctl reload`), and on SIGTERM
//! stops the switches and removes everything it created.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use controld::admin::proto::{self, BackendRef, ChangeReply, ReloadReply, Request, StatsReply};
use controld::admin::rates::Rates;
use controld::admin::scan::Scanner;
use controld::admin::server::{Job, Server};
use controld::admin::{self, metrics, view};
use controld::agents;
use controld::config::{self, Config};
use controld::fence::fence_switch;
use controld::gc::Gc;
use controld::health::Monitor;
use controld::ids::{BackendIdentity, IdAllocator};
use controld::loading::Loading;
use controld::master::ConfigSnapshot;
use controld::overrides::Overrides;
use controld::routing::{Mirror, Netlink};
use controld::supervisor::{Supervisor, SwitchSpec};
use controld::takeover::{self, Start};
use controld::{events, master, publisher};
use shm_layout::header::REGION_STOPPING;
use shm_layout::{Mapping, Region, Table};

#[derive(Parser, Debug)]
#[command(version, about = "switchyard control processor")]
struct Args {
    /// Configuration file (TOML).
    #[arg(long, short = 'c', default_value = "/etc/switchyard/switchyard.toml")]
    config: PathBuf,
    /// Validate the configuration and exit (0 = valid).
    #[arg(long)]
    check: bool,
    /// Path of the switchd binary (default: next to controld).
    #[arg(long)]
    switchd: Option<PathBuf>,
    /// Write controld's pid to this file.
    #[arg(long)]
    pidfile: Option<PathBuf>,
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = Args::parse();
    let code = match run(&args) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("controld: {e:#}");
            1
        }
    };
    std::process::exit(code);
}

/// The main loop's period.
const TICK: Duration = Duration::from_millis(20);

fn online_cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Checks that only need this machine (not expressible in the file alone).
fn check_machine(cfg: &Config) -> Result<()> {
    let n = online_cpus();
    // SAFETY: sysconf has no memory-safety preconditions.
    let configured = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) }.max(1) as usize;
    for s in &cfg.switches {
        if s.cpu >= configured.max(n) {
            bail!(
                "switch {:?}: cpu {} does not exist on this machine (CPUs 0..={})",
                s.name,
                s.cpu,
                configured.max(n) - 1
            );
        }
    }
    Ok(())
}

fn vnic_name(instance: &str, switch: &str) -> String {
    format!("switchyard.{instance}.vnic.{switch}")
}

/// Settings that shape the region or the processes: a reload may not change them.
fn restart_only_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut v = Vec::new();
    if old.instance != new.instance {
        v.push("instance");
    }
    if old.limits != new.limits {
        v.push("limits");
    }
    if old.ports != new.ports {
        v.push("port");
    }
    if old.switches != new.switches {
        v.push("switch");
    }
    if old.admin != new.admin {
        v.push("admin");
    }
    v
}

/// Says whether the region got huge pages: on 4 KiB pages, a large
/// connection table costs switches a page walk on most lookups.
fn log_page_size(region: &Region) {
    let len = region.len() as u64;
    match region.huge_page_bytes() {
        Some(h) if h > 0 => log::info!("region: {} of {} MiB on huge pages", h >> 20, len >> 20),
        Some(_) if len >= 64 << 20 => log::warn!(
            "region: {} MiB on 4 KiB pages; mount /dev/shm with huge=advise for faster connection lookups (docs/OPERATIONS.md, Sizing a switch)",
            len >> 20
        ),
        _ => {}
    }
}

/// Creates the virtual NICs of the vnic switches. One that an adopted
/// switch (`keep`, by switch index) is attached to stays as it is: the
/// switch and the wire side carry on with it.
fn create_vnics(cfg: &Config, keep: &[usize]) -> Result<Vec<String>> {
    let mut made = Vec::new();
    for (i, s) in cfg
        .switches
        .iter()
        .enumerate()
        .filter(|(_, s)| cfg.ports[s.ports[0]].driver == config::Driver::Vnic)
    {
        let name = vnic_name(&cfg.instance, &s.name);
        if keep.contains(&i) && Mapping::exists(&name) {
            made.push(name);
            continue;
        }
        if Mapping::exists(&name) {
            Mapping::unlink(&name)?;
        }
        let ports: Vec<netdrv::vnic::PortSpec> = s
            .ports
            .iter()
            .map(|&p| netdrv::vnic::PortSpec {
                name: cfg.ports[p].name.clone(),
                mac: cfg.ports[p].mac,
            })
            .collect();
        let ring = s
            .ports
            .iter()
            .map(|&p| cfg.ports[p].ring_size)
            .max()
            .unwrap_or(1024);
        let frames = ports.len() as u32 * 2 * ring + 256 + 4 * s.burst;
        netdrv::vnic::create(&name, &ports, ring, frames)
            .with_context(|| format!("creating vnic {name}"))?;
        made.push(name);
    }
    Ok(made)
}

/// The switchd arguments that name its NIC: a vnic object, or afpacket
/// ports as `name=interface` with a fanout group per interface (so several
/// switches can share one).
fn nic_args(cfg: &Config, s: &config::Switch) -> Vec<String> {
    if cfg.ports[s.ports[0]].driver == config::Driver::Vnic {
        return vec!["--vnic".into(), vnic_name(&cfg.instance, &s.name)];
    }
    let mut v = Vec::new();
    for &p in &s.ports {
        let port = &cfg.ports[p];
        v.push("--afpacket".into());
        v.push(format!(
            "{}={}:{}:{}:{}",
            port.name,
            port.interface.as_deref().unwrap_or(""),
            port.ring_size,
            u8::from(port.promiscuous),
            0x5300 + p
        ));
    }
    v
}

/// Reads an interface's MAC from sysfs (controld's network namespace).
fn interface_mac(ifname: &str) -> Result<[u8; 6]> {
    let text = std::fs::read_to_string(format!("/sys/class/net/{ifname}/address"))
        .with_context(|| format!("interface {ifname:?} not found in this network namespace"))?;
    let mut mac = [0u8; 6];
    let parts: Vec<&str> = text.trim().split(':').collect();
    if parts.len() != 6 {
        bail!("interface {ifname:?} has no Ethernet address ({text:?})");
    }
    for (m, p) in mac.iter_mut().zip(parts) {
        *m = u8::from_str_radix(p, 16)
            .with_context(|| format!("interface {ifname:?}: MAC {text:?}"))?;
    }
    Ok(mac)
}

/// Reads an interface's MTU from sysfs (controld's network namespace).
fn interface_mtu(ifname: &str) -> Result<u32> {
    let text = std::fs::read_to_string(format!("/sys/class/net/{ifname}/mtu"))
        .with_context(|| format!("interface {ifname:?} not found in this network namespace"))?;
    text.trim()
        .parse()
        .with_context(|| format!("interface {ifname:?}: MTU {text:?}"))
}

/// Fills in the MACs and MTUs of afpacket ports from their interfaces.
fn resolve_interfaces(cfg: &mut Config) -> Result<()> {
    for p in cfg
        .ports
        .iter_mut()
        .filter(|p| p.driver == config::Driver::Afpacket)
    {
        let ifname = p.interface.clone().unwrap_or_default();
        p.mac = interface_mac(&ifname).with_context(|| format!("port {:?}", p.name))?;
        p.mtu = interface_mtu(&ifname).with_context(|| format!("port {:?}", p.name))?;
    }
    Ok(())
}

/// Removes what this controld created, on every exit path.
struct Cleanup {
    names: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = Mapping::unlink(n);
        }
    }
}

struct State {
    /// The running configuration (the file's values).
    cfg: Config,
    /// The operator's runtime changes on top of it (see `controld::overrides`).
    overrides: Overrides,
    /// The configuration snapshot last published (built from both).
    snap: ConfigSnapshot,
    ids: IdAllocator,
    timeouts: shm_layout::conntrack::Timeouts,
    /// The kernel routing mirror, while `[routing] mirror` is on.
    mirror: Option<Mirror<Netlink>>,
    health: Monitor,
    /// A health or limit change is not published yet (a failed publication
    /// is retried).
    health_dirty: bool,
    /// Effective `max_conns` under controlled loading.
    loading: Loading,
    /// The load agents' listener and the steering of their backends.
    agents: agents::Monitor,
    /// An agent's steering change is not published yet (retried likewise).
    agents_dirty: bool,
    reloads_ok: u64,
    reloads_refused: u64,
    rates: Rates,
}

impl State {
    /// The health checks' verdict on a backend (`None`: not checked).
    fn health(&self, service: &str, backend: &str) -> Option<proto::Health> {
        let s = self.cfg.services.iter().find(|s| s.name == service)?;
        let b = s.backends.iter().find(|b| b.name == backend)?;
        let ident = BackendIdentity::of(s, b);
        self.health.health(&ident).map(|h| {
            if h.is_down() {
                proto::Health::Down
            } else {
                proto::Health::Up
            }
        })
    }
}

fn open_mirror() -> Result<Mirror<Netlink>> {
    let nl = Netlink::open().context("routing mirror: opening rtnetlink sockets")?;
    Mirror::new(nl).context("routing mirror: reading the kernel's routes and neighbours")
}

/// Builds and publishes the configuration snapshot of `cfg` under
/// `overrides`, the backends' current health and the agents' steering; on
/// success records all three as running (together, so the admin views
/// always see a snapshot built from the running configuration).
fn publish_config(
    region: &Region,
    st: &mut State,
    cfg: &Config,
    overrides: &Overrides,
) -> Result<u64> {
    let (health, agents, loading) = (&st.health, &st.agents, &st.loading);
    let snap = master::config_snapshot(
        cfg,
        &mut st.ids,
        overrides,
        |b| health.is_down(b),
        |a| agents.steer(a),
        |b| loading.limit(b),
    )
    .map_err(anyhow::Error::msg)?;
    publisher::check_fits(region, &snap).map_err(anyhow::Error::msg)?;
    let ack = Duration::from_millis(cfg.publish.ack_timeout_ms as u64);
    let rep = publisher::publish_config(region, &snap, ack, &mut |i, p| fence_switch(region, i, p))
        .map_err(anyhow::Error::msg)?;
    log_excluded(&rep, "configuration", ack);
    st.health_dirty = false;
    st.agents_dirty = false;
    st.timeouts = shm_layout::conntrack::Timeouts {
        tcp_syn_ms: snap.tcp_syn_ms,
        tcp_established_ms: snap.tcp_established_ms,
        tcp_fin_ms: snap.tcp_fin_ms,
        udp_ms: snap.udp_ms,
        tcp_provisional_ms: snap.tcp_provisional_ms,
    };
    st.snap = snap;
    st.overrides = overrides.clone();
    st.cfg = cfg.clone();
    Ok(rep.generation)
}

/// Publishes the routing of `cfg`: the kernel mirror's snapshot (opening
/// or closing the mirror as `[routing] mirror` says) or the static tables.
fn publish_routing(region: &Region, st: &mut State, cfg: &Config) -> Result<u64> {
    if cfg.routing.mirror && st.mirror.is_none() {
        st.mirror = Some(open_mirror()?);
    } else if !cfg.routing.mirror {
        st.mirror = None;
    }
    let rsnap = match &mut st.mirror {
        Some(m) => m.snapshot(cfg, Instant::now()),
        None => master::routing_snapshot(cfg),
    };
    let ack = Duration::from_millis(cfg.publish.ack_timeout_ms as u64);
    let rrep =
        publisher::publish_routing(region, &rsnap, ack, &mut |i, p| fence_switch(region, i, p))
            .map_err(anyhow::Error::msg)?;
    log_excluded(&rrep, "routing", ack);
    Ok(rrep.generation)
}

/// Publishes configuration and routing of `cfg` under `overrides` and makes
/// them the running ones; on failure the running configuration (and its
/// health checks and agents' listener) stay.
fn publish_all(
    region: &Region,
    st: &mut State,
    cfg: Config,
    overrides: Overrides,
) -> Result<(u64, u64)> {
    st.agents.configure(&cfg).map_err(anyhow::Error::msg)?;
    st.health.configure(&cfg, Instant::now());
    st.loading.configure(&cfg, Instant::now());
    let res = publish_config(region, st, &cfg, &overrides)
        .and_then(|g| Ok((g, publish_routing(region, st, &cfg)?)));
    if res.is_err() {
        let running = st.cfg.clone();
        st.health.configure(&running, Instant::now());
        st.loading.configure(&running, Instant::now());
        if let Err(e) = st.agents.configure(&running) {
            log::error!("{e}: the running configuration's agents are not restored");
        }
    }
    res
}

fn log_excluded(rep: &shm_layout::PublishReport, table: &str, ack: Duration) {
    for e in &rep.excluded {
        log::error!(
            "switch {} (pid {}) did not acknowledge {table} generation {} within {ack:?}: excluded and fenced",
            e.switch,
            e.pid,
            rep.generation - 1
        );
    }
}

/// Publishes the mirror's snapshot when the kernel's tables changed it.
fn poll_mirror(region: &Region, st: &mut State) {
    let Some(m) = st.mirror.as_mut() else {
        return;
    };
    let Some(snap) = m.poll(&st.cfg, Instant::now()) else {
        return;
    };
    let ack = Duration::from_millis(st.cfg.publish.ack_timeout_ms as u64);
    match publisher::publish_routing(region, &snap, ack, &mut |i, p| fence_switch(region, i, p)) {
        Ok(rep) => {
            log_excluded(&rep, "routing", ack);
            log::info!(
                "routing generation {}: {} routes, {} neighbours (kernel tables changed)",
                rep.generation,
                snap.routes.len(),
                snap.neighbours.len()
            );
        }
        Err(e) => log::error!("routing: publishing the mirrored tables failed: {e}"),
    }
}

/// Judges the adaptive `max_conns` limits whose interval ended; true when
/// one changed (the configuration is then republished this tick).
fn poll_loading(region: &Region, st: &mut State) -> bool {
    let counters = region.backend_counters();
    let ids = &st.ids;
    let changes = st.loading.tick(Instant::now(), |b| {
        ids.id_of(b).and_then(|id| counters.get(id as usize))
    });
    for c in &changes {
        log::debug!(
            "loading: backend {}:{} of {}:{}: max_conns {} -> {} ({} SYN-ACKs, {} over target, mean {} ms)",
            c.backend.addr,
            c.backend.port,
            c.backend.vip,
            c.backend.vport,
            c.from,
            c.to,
            c.samples,
            c.slow,
            c.mean_ms
        );
    }
    !changes.is_empty()
}

/// Re-reads the file (SIGHUP or `lbctl reload`). An invalid file, or one
/// that changes what needs a restart, is refused and the running
/// configuration stays; runtime overrides follow the reload rule.
fn reload(region: &Region, st: &mut State, path: &Path) -> Result<ReloadReply, String> {
    let result = try_reload(region, st, path);
    match &result {
        Ok(r) => {
            st.reloads_ok += 1;
            for k in &r.overrides_kept {
                log::info!("reload keeps runtime override {k}");
            }
            for d in &r.overrides_dropped {
                log::warn!("reload drops runtime override {d}: backend no longer configured");
            }
            log::info!(
                "reloaded {}: configuration generation {}, routing generation {}, {} backends health-checked",
                path.display(),
                r.generation,
                r.routing_generation,
                st.health.len()
            );
        }
        Err(e) => {
            st.reloads_refused += 1;
            log::error!("{e}");
        }
    }
    result
}

fn try_reload(region: &Region, st: &mut State, path: &Path) -> Result<ReloadReply, String> {
    let refused = |region: &Region, e: String| {
        format!(
            "reload refused, running configuration (generation {}) kept: {e}",
            region.generation(Table::Config)
        )
    };
    let mut new = config::load(path).map_err(|e| refused(region, e.to_string()))?;
    resolve_interfaces(&mut new).map_err(|e| refused(region, format!("{e:#}")))?;
    let changed = restart_only_changes(&st.cfg, &new);
    if !changed.is_empty() {
        return Err(refused(
            region,
            format!("[{}] changed, which needs a restart", changed.join("], [")),
        ));
    }
    let mut overrides = st.overrides.clone();
    let carried = overrides.carry_over(&new);
    let (generation, routing_generation) =
        publish_all(region, st, new, overrides).map_err(|e| refused(region, format!("{e:#}")))?;
    let fmt = |v: Vec<(String, controld::overrides::Override)>| {
        v.into_iter().map(|(n, o)| format!("{n}: {o}")).collect()
    };
    Ok(ReloadReply {
        generation,
        routing_generation,
        overrides_kept: fmt(carried.kept),
        overrides_dropped: fmt(carried.dropped),
    })
}

/// `drain`, `enable`, `weight`: changes the overrides and republishes at once.
fn change(
    region: &Region,
    st: &mut State,
    b: &BackendRef,
    what: &str,
    f: impl FnOnce(&mut Overrides),
) -> Result<ChangeReply, String> {
    let (si, bi) = view::find_backend(&st.cfg, b)?;
    let mut overrides = st.overrides.clone();
    f(&mut overrides);
    let generation = if overrides == st.overrides {
        region.generation(Table::Config)
    } else {
        let cfg = st.cfg.clone();
        let g = publish_config(region, st, &cfg, &overrides)
            .map_err(|e| format!("{what} {b}: not published, nothing changed: {e:#}"))?;
        log::info!("{what} {b}: configuration generation {g}");
        g
    };
    let ctx = ctx(region, st);
    Ok(ChangeReply {
        generation,
        service: b.service.clone(),
        backend: view::backend_view(&ctx, si, bi),
    })
}

fn ctx<'a>(region: &'a Region, st: &'a State) -> view::Ctx<'a> {
    view::Ctx {
        cfg: &st.cfg,
        overrides: &st.overrides,
        snap: &st.snap,
        counters: region.backend_counters(),
        health: Box::new(|s, b| st.health(s, b)),
    }
}

fn stats(region: &Region, st: &State) -> StatsReply {
    view::stats(region, &ctx(region, st), &st.rates)
}

/// Answers one admin request (on the main loop, which owns the state).
fn handle(region: &Region, st: &mut State, path: &Path, req: Request) -> String {
    let gens = |r: &Region| (r.generation(Table::Config), r.generation(Table::Routing));
    let reply = match req {
        Request::Show => {
            let (g, rg) = gens(region);
            Ok(proto::ok_line(&view::show(&ctx(region, st), g, rg)))
        }
        Request::Stats => Ok(proto::ok_line(&stats(region, st))),
        // Planned and run off the loop by the caller (`Scanner`); here
        // only if one reaches this function another way.
        Request::Conns(q) => {
            view::conns(region, &ctx(region, st), &st.timeouts, &q).map(|r| proto::ok_line(&r))
        }
        Request::Drain(b) => change(region, st, &b, "drain", |o| o.drain(&b.service, &b.backend))
            .map(|r| proto::ok_line(&r)),
        Request::Enable(b) => change(region, st, &b, "enable", |o| {
            o.enable(&b.service, &b.backend)
        })
        .map(|r| proto::ok_line(&r)),
        Request::Weight(b, w) => {
            let what = match w {
                Some(w) => format!("weight {w}"),
                None => "weight reset".to_string(),
            };
            change(region, st, &b, &what, |o| {
                o.set_weight(&b.service, &b.backend, w)
            })
            .map(|r| proto::ok_line(&r))
        }
        Request::Reload => reload(region, st, path).map(|r| proto::ok_line(&r)),
    };
    reply.unwrap_or_else(|e| proto::error_line(&e))
}

fn render_metrics(region: &Region, st: &State) -> String {
    let (g, rg) = (
        region.generation(Table::Config),
        region.generation(Table::Routing),
    );
    let show = view::show(&ctx(region, st), g, rg);
    let extra = metrics::Extra {
        reloads_ok: st.reloads_ok,
        reloads_refused: st.reloads_refused,
        excluded_switches: region
            .pub_words(Table::Config)
            .excluded
            .load(Ordering::Relaxed),
        overrides: st.overrides.iter().count(),
        agents: st
            .cfg
            .agents
            .is_some()
            .then(|| st.agents.status(Instant::now()).counters),
    };
    metrics::render(&show, &stats(region, st), &extra)
}

/// How the supervisor starts each `[[switch]]`.
fn switch_specs(cfg: &Config) -> Vec<SwitchSpec> {
    cfg.switches
        .iter()
        .enumerate()
        .map(|(i, s)| SwitchSpec {
            index: i,
            name: s.name.clone(),
            cpu: s.cpu,
            idle: match s.idle {
                config::Idle::Busy => "busy",
                config::Idle::Adaptive => "adaptive",
            },
            burst: s.burst as usize,
            nic: nic_args(cfg, s),
            engine: match s.engine {
                config::Engine::Filter => "filter",
                config::Engine::Null => "null",
            },
            syn_queue: s.syn_queue,
            flow_cache: s.flow_cache,
        })
        .collect()
}

fn run(args: &Args) -> Result<()> {
    let mut cfg = config::load(&args.config).map_err(|e| anyhow::anyhow!("{e}"))?;
    resolve_interfaces(&mut cfg).with_context(|| format!("{}", args.config.display()))?;
    check_machine(&cfg).with_context(|| format!("{}", args.config.display()))?;
    if args.check {
        // Build the snapshot too: it catches what only the master knows.
        let mut ids = IdAllocator::new(cfg.limits.backends.saturating_mul(4));
        master::file_snapshot(&cfg, &mut ids)
            .map_err(|e| anyhow::anyhow!("{}: {e}", args.config.display()))?;
        let backends: usize = cfg.services.iter().map(|s| s.backends.len()).sum();
        println!(
            "{}: OK ({} services, {} backends, {} switches, {} ports)",
            args.config.display(),
            cfg.services.len(),
            backends,
            cfg.switches.len(),
            cfg.ports.len()
        );
        return Ok(());
    }
    let switchd = match &args.switchd {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.with_file_name("switchd"),
    };
    if !switchd.exists() {
        bail!(
            "switchd binary not found at {} (use --switchd PATH)",
            switchd.display()
        );
    }

    let term = Arc::new(AtomicBool::new(false));
    let hup = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, Arc::clone(&term))?;
    }
    signal_hook::flag::register(signal_hook::consts::SIGHUP, Arc::clone(&hup))?;

    let start = takeover::start(&cfg.instance, takeover::capacities(&cfg))?;
    let (region, adopted) = match start {
        Start::Created(r) => (r, Vec::new()),
        Start::Adopted {
            region, switches, ..
        } => (region, switches),
    };
    log_page_size(&region);
    let mut cleanup = Cleanup {
        names: vec![region.name().to_string()],
    };
    let specs: Vec<SwitchSpec> = switch_specs(&cfg);
    let mut sup = Supervisor::new(switchd, &cfg.instance, specs);
    let scanner = Scanner::start(&cfg.instance)?;
    // Adopted switches run on: their vnics stay.
    let kept = sup.adopt(&region, adopted);
    cleanup.names.extend(create_vnics(&cfg, &kept)?);
    let ids = {
        let counters = region.backend_counters();
        IdAllocator::adopt(
            region.caps().backend_ids,
            &takeover::published_ids(&region),
            |id| {
                counters
                    .get(id as usize)
                    .map_or(0, |c| c.active.load(Ordering::Relaxed))
            },
        )
    };
    let mut st = State {
        ids,
        cfg: cfg.clone(),
        overrides: Overrides::default(),
        snap: ConfigSnapshot::default(),
        timeouts: shm_layout::conntrack::Timeouts {
            tcp_syn_ms: 0,
            tcp_established_ms: 0,
            tcp_fin_ms: 0,
            udp_ms: 0,
            tcp_provisional_ms: 0,
        },
        mirror: None,
        health: Monitor::new(),
        health_dirty: false,
        reloads_ok: 0,
        reloads_refused: 0,
        rates: Rates::default(),
        agents: agents::Monitor::new(),
        agents_dirty: false,
        loading: Loading::new(),
    };
    let (cg, rg) = publish_all(&region, &mut st, cfg.clone(), Overrides::default())?;
    if !st.health.is_empty() {
        log::info!(
            "health: checking {} backends (each starts UP until a check fails)",
            st.health.len()
        );
    }
    log::info!(
        "instance {:?}: region /dev/shm/{} ({} MiB), configuration generation {cg}, routing generation {rg}",
        cfg.instance,
        region.name(),
        region.header().total_len >> 20
    );

    if st.mirror.is_some() {
        let ifs: Vec<&str> = cfg
            .ports
            .iter()
            .filter_map(|p| p.interface.as_deref())
            .collect();
        log::info!(
            "routing: mirroring the kernel's IPv4 routes and neighbours on {}{}",
            ifs.join(", "),
            if cfg.routing.resolve {
                "; missing next hops are resolved"
            } else {
                ""
            }
        );
    }
    // Before any thread exists (the socket is bound under a narrowed umask).
    let server = Server::start(&admin::socket_path(&cfg), cfg.admin.metrics)?;
    log::info!("admin socket {}", server.socket_path().display());
    if let Some(a) = server.metrics_addr() {
        log::info!("metrics at http://{a}/metrics");
    }
    sup.start_all(&region)?;
    if let Some(p) = &args.pidfile {
        // Written once the configuration is published and the switches are
        // started, atomically, so a reader never sees a partial pid.
        let tmp = p.with_extension("tmp");
        std::fs::write(&tmp, format!("{}\n", std::process::id()))
            .and_then(|()| std::fs::rename(&tmp, p))
            .with_context(|| format!("writing pid file {}", p.display()))?;
    }

    let mut gc = Gc::default();
    let mut ev = events::EventDrain::default();
    // A full sweep every ~128 ticks (2.5 s): expiry to the second, little CPU.
    let gc_per_tick = (region.caps().conn_slots / 128).clamp(1024, 1 << 15);
    let mut last_release = Instant::now();
    let mut last_publish_error = None;
    let mut next_tick = Instant::now();
    while !term.load(Ordering::Relaxed) {
        if hup.swap(false, Ordering::Relaxed) {
            let _ = reload(&region, &mut st, &args.config);
        }
        sup.poll(&region);
        poll_mirror(&region, &mut st);
        if !st.health.poll(Instant::now()).is_empty() {
            st.health_dirty = true;
        }
        if st.agents.poll(Instant::now()) {
            st.agents_dirty = true;
        }
        if poll_loading(&region, &mut st) {
            st.health_dirty = true;
        }
        if st.health_dirty || st.agents_dirty {
            // Within this tick of the deciding result: out of (or back in)
            // the tables one publication later.
            let what = if st.health_dirty {
                "health or limit"
            } else {
                "agent"
            };
            let (cfg, overrides) = (st.cfg.clone(), st.overrides.clone());
            if let Err(e) = publish_config(&region, &mut st, &cfg, &overrides)
                && last_publish_error
                    .is_none_or(|t: Instant| t.elapsed() >= Duration::from_secs(10))
            {
                log::error!("publishing a {what} change failed (retried every tick): {e:#}");
                last_publish_error = Some(Instant::now());
            }
        }
        gc.step(&region, &st.timeouts, gc_per_tick);
        ev.drain(&region);
        if last_release.elapsed() > Duration::from_secs(1) {
            let counters = region.backend_counters();
            let released = st.ids.release_idle(|id| {
                counters
                    .get(id as usize)
                    .map(|c| c.active.load(Ordering::Relaxed))
                    .unwrap_or(0)
            });
            // No configuration names a released id and none will until it is
            // assigned again: its totals restart at zero for the next owner.
            for c in released.iter().filter_map(|&id| counters.get(id as usize)) {
                c.reset_totals();
            }
            last_release = Instant::now();
        }
        if st.rates.due(Instant::now()) {
            let s = view::sample(&region, &st.snap);
            st.rates.push(s);
        }
        // Until the next tick, answer admin requests as they come, and no
        // longer: a queue that never empties waits for the next tick rather
        // than stopping supervision, the GC and health publication.
        next_tick = (next_tick + TICK).max(Instant::now());
        // One rendering of the metrics serves every scrape until the state
        // changes (an admin request) or the tick ends.
        let mut metrics_text: Option<Arc<String>> = None;
        while Instant::now() < next_tick
            && let Some(job) = server.next_job(next_tick)
        {
            match job {
                Job::Request {
                    req: Request::Conns(q),
                    reply,
                } => match view::conns_plan(&ctx(&region, &st), &st.timeouts, &q) {
                    Ok(plan) => scanner.submit(plan, reply),
                    Err(e) => {
                        let _ = reply.send(proto::error_line(&e));
                    }
                },
                Job::Request { req, reply } => {
                    metrics_text = None;
                    let _ = reply.send(handle(&region, &mut st, &args.config, req));
                }
                Job::Metrics { reply } => {
                    let text =
                        metrics_text.get_or_insert_with(|| Arc::new(render_metrics(&region, &st)));
                    let _ = reply.send(String::clone(text));
                }
            }
            if term.load(Ordering::Relaxed) {
                break;
            }
        }
    }
    log::info!("stopping: terminating switches");
    region
        .header()
        .state
        .store(REGION_STOPPING, Ordering::SeqCst);
    drop(server);
    sup.stop_all(&region, Duration::from_secs(3));
    if let Some(p) = &args.pidfile {
        let _ = std::fs::remove_file(p);
    }
    drop(cleanup);
    log::info!("stopped; region and virtual NICs removed");
    Ok(())
}
