//! switchd: one switching process, pinned to its CPU, polling its ports.
//! Started by controld; see `switchd --help`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use netdrv::Nic;
use shm_layout::config_slot::MAX_PORTS;
use shm_layout::names;
use shm_layout::switch_slot::SW_STOPPED;
use shm_layout::{Access, Region, RegionError};
use switchd::engine::{self, Idle, PortMap, Settings};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "switchyard switching processor (started by controld)"
)]
struct Args {
    /// Instance name: the region is /dev/shm/switchyard.<instance>.
    #[arg(long)]
    instance: String,
    /// This switch's index (its slot in the region).
    #[arg(long)]
    switch: usize,
    /// Shared-memory name of this switch's virtual NIC.
    #[arg(long, conflicts_with = "afpacket")]
    vnic: Option<String>,
    /// An AF_PACKET port: NAME=INTERFACE:SLOTS:PROMISC(0|1):FANOUT_GROUP (repeatable).
    #[arg(long)]
    afpacket: Vec<String>,
    /// CPU to pin to.
    #[arg(long)]
    cpu: Option<usize>,
    /// Idle policy: busy or adaptive.
    #[arg(long, default_value = "adaptive")]
    idle: String,
    /// Frames per receive burst.
    #[arg(long, default_value_t = 32)]
    burst: usize,
    /// Entries of the queue that holds new connections while every eligible
    /// backend is at its max_conns (0: refuse them at once).
    #[arg(long, default_value_t = switchd::synq::DEFAULT_CAPACITY)]
    syn_queue: usize,
    /// Entries of the flow cache (0: every packet takes the full path).
    #[arg(long, default_value_t = switchd::flowcache::DEFAULT_ENTRIES)]
    flow_cache: usize,
    /// filter (the load balancer) or null (descriptor handover only: a benchmark ceiling).
    #[arg(long, default_value = "filter")]
    engine: String,
    /// Closed-connection records per batch message to controld (1..=900).
    #[arg(long, default_value_t = switchd::closed::DEFAULT_BATCH)]
    record_batch: usize,
    /// The longest a closed-connection record waits for its batch, in ms.
    #[arg(long, default_value_t = switchd::closed::DEFAULT_BATCH_MS)]
    record_batch_ms: u32,
    /// Lock all memory (mlockall).
    #[arg(long)]
    mlock: bool,
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

fn install_signals() {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
}

fn pin(cpu: usize) -> Result<()> {
    // SAFETY: cpu_set_t is plain data; CPU_ZERO/CPU_SET write within it, and
    // sched_setaffinity reads it through a valid pointer of the right size.
    let r = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if r != 0 {
        bail!(
            "cannot pin to CPU {cpu}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

fn attach(instance: &str) -> Result<Region> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match Region::attach(instance, Access::ReadWrite) {
            Err(RegionError::NotReady { .. }) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10))
            }
            r => return r.with_context(|| format!("switchd: attaching to instance {instance:?}")),
        }
    }
}

fn parse_afpacket(a: &str) -> Result<netdrv::afpacket::PortOptions> {
    let bad = || {
        anyhow::anyhow!("--afpacket {a:?}: expected NAME=INTERFACE:SLOTS:PROMISC(0|1):FANOUT_GROUP")
    };
    let (name, rest) = a.split_once('=').ok_or_else(bad)?;
    let f: Vec<&str> = rest.split(':').collect();
    if f.len() != 4 {
        return Err(bad());
    }
    Ok(netdrv::afpacket::PortOptions {
        name: name.to_string(),
        ifname: f[0].to_string(),
        slots: f[1].parse().map_err(|_| bad())?,
        promiscuous: f[2] == "1",
        fanout: Some(f[3].parse().map_err(|_| bad())?),
    })
}

/// Runs the engine over any NIC.
fn serve<N: Nic>(region: &Region, nic: &mut N, settings: Settings) -> Result<(), String> {
    log::info!(
        "switch {} (pid {}) polling {} port(s), idle {:?}, burst {}; interrupts cannot be masked from user space, so this CPU may still take some",
        settings.switch_index,
        std::process::id(),
        nic.port_count(),
        settings.idle,
        settings.burst
    );
    let names: Vec<String> = (0..nic.port_count())
        .map(|p| nic.port_name(p).to_string())
        .collect();
    let macs: Vec<[u8; 6]> = (0..nic.port_count()).map(|p| nic.port_mac(p)).collect();
    let ports = move |r: &Region| -> Result<PortMap, String> {
        let tok = r.begin_read(shm_layout::Table::Config);
        // SAFETY: called by the engine inside a burst, as a switch (see
        // `engine::run`); the slot it reads is its token's or a newer one,
        // which the publisher rewrites only after this switch acknowledges
        // past it.
        let cfg = unsafe { r.config_view(tok.slot) };
        let cfg_ports: Vec<(String, [u8; 6])> = cfg
            .ports()
            .iter()
            .take(MAX_PORTS)
            .map(|p| (names::get(&p.name).to_string(), p.mac))
            .collect();
        PortMap::build(&names, &macs, &cfg_ports)
    };
    engine::run(region, nic, &ports, settings, &STOP)
}

fn main() -> Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = Args::parse();
    let idle = match args.idle.as_str() {
        "busy" => Idle::Busy,
        "adaptive" => Idle::Adaptive,
        other => bail!("--idle {other:?}: expected busy or adaptive"),
    };
    let null = match args.engine.as_str() {
        "filter" => false,
        "null" => true,
        other => bail!("--engine {other:?}: expected filter or null"),
    };
    install_signals();
    let region = attach(&args.instance)?;
    if args.switch >= region.switch_slots().len() {
        bail!(
            "--switch {} is out of range: the region has {} switch slots",
            args.switch,
            region.switch_slots().len()
        );
    }
    if let Some(cpu) = args.cpu {
        pin(cpu)?;
        log::info!("switch {} pinned to CPU {cpu}", args.switch);
    }
    // Idle naps are 10-500 µs: the default 50 µs timer slack would stretch
    // the shortest ones sixfold.
    // SAFETY: prctl(PR_SET_TIMERSLACK) takes a plain integer.
    if unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1000 as libc::c_ulong) } != 0 {
        log::warn!(
            "PR_SET_TIMERSLACK failed: {}",
            std::io::Error::last_os_error()
        );
    }
    if args.mlock {
        // SAFETY: mlockall has no memory-safety preconditions.
        if unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE) } != 0 {
            log::warn!(
                "mlockall failed: {} (continuing unlocked)",
                std::io::Error::last_os_error()
            );
        }
    }
    let settings = Settings {
        switch_index: args.switch,
        burst: args.burst,
        idle,
        null,
        syn_queue: args.syn_queue,
        flow_cache: args.flow_cache,
        record_batch: args.record_batch,
        record_batch_ms: args.record_batch_ms,
    };
    let res = match (&args.vnic, args.afpacket.is_empty()) {
        (Some(name), true) => {
            let mut nic = netdrv::vnic::VnicHost::attach(name)
                .with_context(|| format!("switchd: attaching to vnic {name:?}"))?;
            serve(&region, &mut nic, settings)
        }
        (None, false) => {
            let opts = args
                .afpacket
                .iter()
                .map(|a| parse_afpacket(a))
                .collect::<Result<Vec<_>>>()?;
            let mut nic = netdrv::afpacket::AfPacket::open(&opts)
                .context("switchd: opening AF_PACKET ports")?;
            serve(&region, &mut nic, settings)
        }
        _ => bail!("give either --vnic NAME or one or more --afpacket NAME=IF:SLOTS:PROMISC:GROUP"),
    };
    region.switch_slots()[args.switch]
        .state
        .store(SW_STOPPED, Ordering::SeqCst);
    match res {
        Ok(()) => {
            log::info!("switch {} stopped", args.switch);
            Ok(())
        }
        Err(e) => bail!("switch {}: {e}", args.switch),
    }
}
