//! controld: the control processor of a switchyard instance.
//!
//! `controld --config FILE --check` validates a configuration and exits.
//! `controld --config FILE` creates the region and the virtual NICs,
//! publishes the configuration and routing tables, starts and supervises one
//! switchd per `[[switch]]`, serves lbctl's admin socket and the Prometheus
//! metrics, re-reads the file on SIGHUP (or `lbctl reload`), and on SIGTERM
//! stops the switches and removes everything it created.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use controld::admin;
use controld::admin::scan::Scanner;
use controld::admin::server::Server;
use controld::appliance::{Appliance, host, saved};
use controld::config;
use controld::ids::IdAllocator;
use controld::master;
use controld::supervisor::Supervisor;
use controld::takeover::{self, Start};
use shm_layout::header::REGION_STOPPING;
use shm_layout::{Mapping, Region};

#[derive(Parser, Debug)]
#[command(version, about = "switchyard control processor")]
struct Args {
    /// Configuration file (TOML).
    #[arg(long, short = 'c', default_value = "/etc/switchyard/switchyard.toml")]
    config: PathBuf,
    /// Validate the configuration and exit (0 = valid). Warnings (valid,
    /// but probably not meant) are printed on stderr as `warning: ...`.
    #[arg(long)]
    check: bool,
    /// With --check: a configuration with warnings is refused too (exit 1).
    #[arg(long, requires = "check")]
    strict: bool,
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

fn run(args: &Args) -> Result<()> {
    // The error names the file already (and its cause: no chain to add).
    let config::Checked {
        config: mut cfg,
        warnings,
    } = config::load_checked(&args.config).map_err(|e| anyhow::anyhow!("{e}"))?;
    host::resolve_interfaces(&mut cfg).with_context(|| format!("{}", args.config.display()))?;
    host::check_machine(&cfg).with_context(|| format!("{}", args.config.display()))?;
    if args.check {
        // Build the snapshot too: it catches what only the master knows.
        let mut ids = IdAllocator::new(cfg.limits.backends.saturating_mul(4));
        master::file_snapshot(&cfg, &mut ids)
            .with_context(|| format!("{}", args.config.display()))?;
        for w in &warnings {
            eprintln!("warning: {}: {w}", args.config.display());
        }
        if args.strict && !warnings.is_empty() {
            bail!(
                "{}: refused: {} warning(s) and --strict",
                args.config.display(),
                warnings.len()
            );
        }
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
    for w in &warnings {
        log::warn!("{}: {w}", args.config.display());
    }
    controld::l7::refuse_to_run(&cfg).with_context(|| format!("{}", args.config.display()))?;
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
    let (region, adopted, was_adopted) = match start {
        Start::Created(r) => (r, Vec::new(), false),
        Start::Adopted {
            region, switches, ..
        } => (region, switches, true),
    };
    log_page_size(&region);
    let mut cleanup = Cleanup {
        names: vec![region.name().to_string()],
    };
    let mut sup = Supervisor::new(switchd, &cfg.instance, host::switch_specs(&cfg));
    let scanner = Scanner::start(&cfg.instance)?;
    // Adopted switches run on: their vnics stay.
    let kept = sup.adopt(&region, adopted);
    cleanup.names.extend(host::create_vnics(&cfg, &kept)?);
    let mut app = Appliance::new(region, cfg.clone(), args.config.clone());
    // Beside the socket, in the directory the admin server makes (0700);
    // over an adopted region it is there already.
    let socket = admin::socket_path(&cfg);
    app.save_overrides_at(saved::path_beside(&socket), was_adopted);
    app.open_connection_log()?;
    let (cg, rg) = app.publish_initial()?;
    if app.health_checked() > 0 {
        log::info!(
            "health: checking {} backends (each starts UP until a check fails)",
            app.health_checked()
        );
    }
    log::info!(
        "instance {:?}: region /dev/shm/{} ({} MiB), configuration generation {cg}, routing generation {rg}",
        cfg.instance,
        app.region().name(),
        app.region().header().total_len >> 20
    );

    if app.mirroring() {
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
    let server = Server::start(&socket, cfg.admin.metrics)?;
    log::info!("admin socket {}", server.socket_path().display());
    if let Some(a) = server.metrics_addr() {
        log::info!("metrics at http://{a}/metrics");
    }
    sup.start_all(app.region())?;
    if let Some(p) = &args.pidfile {
        // Written once the configuration is published and the switches are
        // started, atomically, so a reader never sees a partial pid.
        let tmp = p.with_extension("tmp");
        std::fs::write(&tmp, format!("{}\n", std::process::id()))
            .and_then(|()| std::fs::rename(&tmp, p))
            .with_context(|| format!("writing pid file {}", p.display()))?;
    }

    let mut next_tick = Instant::now();
    while !term.load(Ordering::Relaxed) {
        if hup.swap(false, Ordering::Relaxed) {
            let _ = app.reload(&args.config);
            // SIGHUP also rotates the connection log.
            app.reopen_connection_log();
        }
        sup.poll(app.region());
        app.tick();
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
            app.serve(job, &scanner, &mut metrics_text);
            if term.load(Ordering::Relaxed) {
                break;
            }
        }
    }
    log::info!("stopping: terminating switches");
    let region = app.region();
    region
        .header()
        .state
        .store(REGION_STOPPING, Ordering::SeqCst);
    drop(server);
    sup.stop_all(region, Duration::from_secs(3));
    if let Some(p) = &args.pidfile {
        let _ = std::fs::remove_file(p);
    }
    app.forget_saved_overrides();
    drop(app);
    drop(cleanup);
    log::info!("stopped; region and virtual NICs removed");
    Ok(())
}
