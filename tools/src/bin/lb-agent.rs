//! lb-agent: runs on a backend and reports its load to controld every
//! interval over UDP, authenticated with HMAC-SHA256 under a shared secret
//! (format: the `agent_proto` crate; what controld does with it:
//! docs/OPERATIONS.md, "Load agents").
//!
//! CPU busy comes from `/proc/stat` (over the last interval, so the first
//! report goes out one interval after the start), memory in use from
//! `/proc/meminfo`, active clients, requests per second and the mean
//! service time from `--stats-url` (see `tools::agent`). Each measured
//! value can be replaced by a fixed one. `--drain` (or an existing
//! `--drain-file`) asks controld for no new connections.
//!
//! Prints one line per report to stdout; exits after `--count` reports,
//! or on SIGTERM/SIGINT.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use agent_proto::{Endpoints, Load, MAX_SECRET_LEN, MIN_SECRET_LEN, Report, seal};
use clap::Parser;
use tools::agent::{self, AppStats, CpuTimes};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "switchyard load agent: reports this backend's load to controld"
)]
struct Args {
    /// controld's `[agents] listen` address.
    #[arg(long)]
    controller: SocketAddrV4,
    /// The shared secret (visible in `ps`: prefer --secret-file).
    #[arg(
        long,
        conflicts_with = "secret_file",
        required_unless_present = "secret_file"
    )]
    secret: Option<String>,
    /// A file holding the shared secret (one trailing newline is ignored).
    #[arg(long)]
    secret_file: Option<PathBuf>,
    /// Source address (default: the one the kernel picks toward controld,
    /// which must be the backend's address in controld's configuration).
    #[arg(long)]
    bind: Option<Ipv4Addr>,
    /// Milliseconds between reports.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(10..=3_600_000))]
    interval_ms: u64,
    /// Stop after this many reports (default: run until killed).
    #[arg(long)]
    count: Option<u64>,
    /// Ask for no new connections (existing ones continue).
    #[arg(long)]
    drain: bool,
    /// Ask to drain while this file exists.
    #[arg(long)]
    drain_file: Option<PathBuf>,
    /// The application's counters: `http://HOST:PORT/PATH` answering
    /// `active_clients N`, `requests_total N`, `service_time_us_total N` lines.
    #[arg(long)]
    stats_url: Option<String>,
    /// Report this CPU busy percentage instead of measuring it.
    #[arg(long, value_parser = clap::value_parser!(u16).range(0..=100))]
    cpu_percent: Option<u16>,
    /// Report this memory-in-use percentage instead of measuring it.
    #[arg(long, value_parser = clap::value_parser!(u16).range(0..=100))]
    mem_percent: Option<u16>,
    /// Report this many active clients.
    #[arg(long)]
    active: Option<u32>,
    /// Report this many requests per second.
    #[arg(long)]
    rps: Option<u32>,
    /// Report this mean service time, microseconds.
    #[arg(long)]
    service_time_us: Option<u32>,
    /// Test only: shift the reports' timestamps by this many milliseconds.
    #[arg(long, hide = true, allow_hyphen_values = true, default_value_t = 0)]
    clock_offset_ms: i64,
    /// Test only: print each datagram in hex (to replay it).
    #[arg(long, hide = true)]
    print_hex: bool,
}

fn read_secret(a: &Args) -> Result<Vec<u8>, String> {
    let s = match (&a.secret, &a.secret_file) {
        (Some(s), _) => s.as_bytes().to_vec(),
        (None, Some(f)) => {
            let mut b =
                std::fs::read(f).map_err(|e| format!("secret file {}: {e}", f.display()))?;
            if b.last() == Some(&b'\n') {
                b.pop();
                if b.last() == Some(&b'\r') {
                    b.pop();
                }
            }
            b
        }
        (None, None) => return Err("give --secret or --secret-file".into()),
    };
    if !(MIN_SECRET_LEN..=MAX_SECRET_LEN).contains(&s.len()) {
        return Err(format!(
            "the secret is {} bytes long; controld accepts {MIN_SECRET_LEN} to {MAX_SECRET_LEN}",
            s.len()
        ));
    }
    Ok(s)
}

fn wall_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

fn cpu_times() -> Option<CpuTimes> {
    agent::parse_proc_stat(&std::fs::read_to_string("/proc/stat").ok()?)
}

fn mem_permille() -> Option<u16> {
    agent::parse_meminfo(&std::fs::read_to_string("/proc/meminfo").ok()?)
}

/// A warning at most once a minute per kind.
struct Warn(Option<Instant>);

impl Warn {
    fn say(&mut self, msg: &str) {
        if self
            .0
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(60))
        {
            eprintln!("lb-agent: {msg}");
            self.0 = Some(Instant::now());
        }
    }
}

fn describe(l: &Load) -> String {
    let p = |v: u16| format!("{}.{}%", v / 10, v % 10);
    let o = |v: Option<u32>| v.map_or("-".to_string(), |n| n.to_string());
    format!(
        "cpu {} mem {} active {} rps {} service_time_us {}{}",
        p(l.cpu_permille),
        p(l.mem_permille),
        o(l.active_clients),
        o(l.requests_per_sec),
        o(l.service_time_us),
        if l.drain { " drain" } else { "" }
    )
}

fn run(a: &Args) -> Result<(), String> {
    let secret = read_secret(a)?;
    let stats_url = a.stats_url.as_deref().map(agent::parse_url).transpose()?;
    let bind = SocketAddr::from((a.bind.unwrap_or(Ipv4Addr::UNSPECIFIED), 0));
    let sock = UdpSocket::bind(bind).map_err(|e| format!("bind {bind}: {e}"))?;
    sock.connect(a.controller)
        .map_err(|e| format!("controller {}: {e}", a.controller))?;
    let agent_ip = match sock.local_addr().map_err(|e| e.to_string())?.ip() {
        IpAddr::V4(ip) => ip,
        IpAddr::V6(ip) => return Err(format!("source address {ip} is not IPv4")),
    };
    let ep = Endpoints {
        agent: agent_ip,
        controller: a.controller,
    };
    let term = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, std::sync::Arc::clone(&term))
            .map_err(|e| e.to_string())?;
    }
    let interval = Duration::from_millis(a.interval_ms);
    // Above every sequence number an earlier run of this agent sent (as
    // long as it sent fewer than a million reports a second).
    let mut seq = wall_us();
    let mut cpu_before = cpu_times();
    let fetch = |w: &mut Warn| -> Option<AppStats> {
        let (host, path) = stats_url.as_ref()?;
        let timeout = (interval / 2).min(Duration::from_secs(1));
        agent::fetch_stats(host, path, timeout)
            .map_err(|e| w.say(&format!("stats url: {e}")))
            .ok()
    };
    let (mut warn_cpu, mut warn_stats, mut warn_send) = (Warn(None), Warn(None), Warn(None));
    let mut stats_before = fetch(&mut warn_stats);
    let mut stats_at = Instant::now();
    let mut next = Instant::now() + interval;
    let mut sent = 0u64;
    println!(
        "lb-agent: reporting from {agent_ip} to {} every {} ms",
        a.controller, a.interval_ms
    );
    while a.count.is_none_or(|c| sent < c) {
        while Instant::now() < next {
            if term.load(std::sync::atomic::Ordering::Relaxed) {
                return Ok(());
            }
            std::thread::sleep((next - Instant::now()).min(Duration::from_millis(50)));
        }
        next += interval;
        let cpu_now = cpu_times();
        let cpu = match (a.cpu_percent, cpu_before, cpu_now) {
            (Some(p), _, _) => p * 10,
            (None, Some(b), Some(n)) => agent::cpu_permille(b, n),
            _ => {
                warn_cpu.say("cannot read /proc/stat: reporting cpu 0");
                0
            }
        };
        cpu_before = cpu_now;
        let stats_now = fetch(&mut warn_stats);
        let secs = stats_at.elapsed().as_secs_f64();
        stats_at = Instant::now();
        let (rps, mean) = match (&stats_before, &stats_now) {
            (Some(b), Some(n)) => agent::rates(b, n, secs),
            _ => (None, None),
        };
        let load = Load {
            cpu_permille: cpu,
            mem_permille: a
                .mem_percent
                .map(|p| p * 10)
                .or_else(mem_permille)
                .unwrap_or(0),
            active_clients: a.active.or(stats_now.and_then(|s| s.active_clients)),
            requests_per_sec: a.rps.or(rps),
            service_time_us: a.service_time_us.or(mean),
            drain: a.drain || a.drain_file.as_ref().is_some_and(|f| f.exists()),
        };
        stats_before = stats_now;
        let now_ms = (wall_us() / 1000) as i64;
        let report = Report {
            timestamp_ms: now_ms.saturating_add(a.clock_offset_ms).max(0) as u64,
            seq,
            load,
        };
        seq += 1;
        let d = seal(&report, &ep, &secret);
        if let Err(e) = sock.send(&d) {
            warn_send.say(&format!("sending to {}: {e}", a.controller));
        }
        sent += 1;
        let hex: String = if a.print_hex {
            format!(
                " hex={}",
                d.iter().map(|b| format!("{b:02x}")).collect::<String>()
            )
        } else {
            String::new()
        };
        println!("report seq={} {}{hex}", report.seq, describe(&load));
    }
    Ok(())
}

fn main() -> ExitCode {
    let a = Args::parse();
    match run(&a) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lb-agent: {e}");
            ExitCode::FAILURE
        }
    }
}
