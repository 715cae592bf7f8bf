//! lbgen: drives an instance's virtual NICs from the wire side with many
//! concurrent TCP and UDP flows, checks every frame that comes back, and
//! reports throughput and the per-backend split.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use tools::bench::BenchConfig;
use tools::topo::parse_prefix;
use tools::traffic::{GenConfig, Generator, Report};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "switchyard traffic generator (vnic wire side)",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    run: Args,
}

#[derive(clap::Subcommand, Debug)]
enum Cmd {
    /// Per-core forwarding rate against its own ceiling: starts its own
    /// appliances (null forwarder, then the filter), pins itself and the
    /// switch to two CPUs, and reports medians.
    Bench(BenchArgs),
}

#[derive(clap::Args, Debug)]
struct BenchArgs {
    /// A short smoke run (one repetition, 0.2 s per measurement).
    #[arg(long)]
    quick: bool,
    /// Repetitions (medians are reported).
    #[arg(long)]
    runs: Option<usize>,
    /// Seconds per measurement.
    #[arg(long)]
    seconds: Option<f64>,
    /// CPU for lbgen.
    #[arg(long, default_value_t = 0)]
    gen_cpu: usize,
    /// CPU for the switch.
    #[arg(long, default_value_t = 1)]
    switch_cpu: usize,
    /// One JSON object per frame size.
    #[arg(long)]
    json: bool,
    /// Frame sizes in bytes (comma-separated; 60..=2048).
    #[arg(long, value_delimiter = ',', default_values_t = [64usize, 1500])]
    frames: Vec<usize>,
    /// The appliance's `[limits] connections` (its table has 4 slots each).
    #[arg(long, default_value_t = 1_048_576)]
    connections: usize,
    /// Established flows the established and mix loads cycle through
    /// (1..=1048576, at most `--connections`; default 4096, 512 with
    /// `--quick`). Each flow's table slot and flow-cache entry stay in the
    /// switch's caches only while there are few: the rate falls as they grow
    /// (docs/PERFORMANCE.md).
    #[arg(long)]
    flows: Option<usize>,
    /// Print every measurement, with the frames the switch received, to stderr.
    #[arg(long)]
    verbose: bool,
    /// Services in the appliance's configuration (1..=4096); traffic goes
    /// to the last one.
    #[arg(long, default_value_t = 1)]
    services: usize,
    /// Where the appliances' shared memory lives: `huge`, a huge-page
    /// /dev/shm as docs/OPERATIONS.md deploys it, mounted in a private
    /// mount namespace (root; the host's mounts are untouched); `host`, the
    /// host's /dev/shm as it is.
    #[arg(long, value_enum, default_value_t = tools::bench::Pages::Huge)]
    pages: tools::bench::Pages,
}

#[derive(clap::Args, Debug)]
struct Args {
    /// Instance to drive.
    #[arg(long, short = 'i', default_value = "demo")]
    instance: String,
    /// Services to send to, by name (repeatable; default all).
    #[arg(long = "service")]
    services: Vec<String>,
    /// Total flows.
    #[arg(long, default_value_t = 10_000)]
    flows: u64,
    /// Stop starting new flows after this many seconds.
    #[arg(long)]
    duration: Option<f64>,
    /// Flows in flight at once.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// Data exchanges per flow.
    #[arg(long, default_value_t = 2)]
    data_packets: u32,
    /// Payload bytes per data packet.
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// Client prefix.
    #[arg(long, default_value = "198.18.100.0/24")]
    clients: String,
    /// Shifts client addresses/ports so repeated runs make new flows.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Hard limit on the run, seconds.
    #[arg(long, default_value_t = 120.0)]
    time_limit: f64,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

fn print(r: &Report) {
    println!(
        "flows: {} started, {} completed, {} failed   frames: {} sent, {} received, {} resent",
        r.flows_started,
        r.flows_completed,
        r.flows_failed,
        r.packets_sent,
        r.packets_received,
        r.retransmits
    );
    println!(
        "checks: {} bad, {} unexpected, {} duplicate, {} affinity violations, {} RST   ring full: {}",
        r.bad_frames,
        r.unexpected_frames,
        r.duplicate_frames,
        r.affinity_violations,
        r.rst_received,
        r.ring_full
    );
    println!(
        "throughput: {:.0} frames/s over {:.2} s (sent + received)",
        r.pps, r.elapsed_s
    );
    for (svc, backends) in &r.per_backend {
        let total: u64 = backends.values().sum();
        println!("service {svc}: {total} flows");
        for (b, n) in backends {
            println!(
                "  {b:<22} {n:>8}  {:>6.2}%",
                *n as f64 * 100.0 / total.max(1) as f64
            );
        }
    }
    for e in &r.errors {
        println!("error: {e}");
    }
}

fn bench(b: BenchArgs) -> ExitCode {
    let mut cfg = if b.quick {
        BenchConfig::quick()
    } else {
        BenchConfig::full()
    };
    if let Some(r) = b.runs {
        cfg.runs = r.max(1);
    }
    if let Some(s) = b.seconds {
        cfg.duration = Duration::from_secs_f64(s.max(0.05));
    }
    cfg.gen_cpu = b.gen_cpu;
    cfg.switch_cpu = b.switch_cpu;
    if let Some(bad) = b.frames.iter().find(|&&f| !(60..=2048).contains(&f)) {
        eprintln!("lbgen bench: frame size {bad} is outside 60..=2048 bytes");
        return ExitCode::from(2);
    }
    cfg.frame_sizes = b.frames;
    cfg.connections = b.connections;
    cfg.flows = b.flows.unwrap_or(cfg.flows);
    if !(1..=1 << 20).contains(&cfg.flows) || cfg.flows > b.connections {
        eprintln!(
            "lbgen bench: {} flows is outside 1..=1048576 or above --connections {} (set --flows)",
            cfg.flows, b.connections
        );
        return ExitCode::from(2);
    }
    cfg.verbose = b.verbose;
    if !(1..=4096).contains(&b.services) {
        eprintln!("lbgen bench: --services {} is outside 1..=4096", b.services);
        return ExitCode::from(2);
    }
    cfg.services = b.services;
    cfg.pages = b.pages;
    let res = match tools::bench::run(&cfg) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("lbgen bench: {e:#}");
            return ExitCode::from(2);
        }
    };
    for r in &res {
        if b.json {
            println!("{}", serde_json::to_string(r).expect("json"));
        } else {
            println!(
                "{:>5} B frames: ceiling {:>6.2} Mpps | established NAT {:>6.2} Mpps ({:>4.0}% of ceiling) | new flows {:>6.2} Mpps | mix 9:1 {:>6.2} Mpps   (medians of {})",
                r.frame_bytes,
                r.ceiling_mpps,
                r.established_mpps,
                r.ratio_to_ceiling * 100.0,
                r.new_flow_mpps,
                r.mix_mpps,
                r.runs
            );
            println!(
                "{:>5}   established with the SYN queue full (another service at its max_conns) {:>6.2} Mpps ({:>4.0}% of established, median of the runs' ratios)",
                "",
                r.full_queue_mpps,
                r.full_queue_to_established * 100.0
            );
            let ns = &r.switch_ns_per_frame;
            println!(
                "{:>5}   the switch's own cost (busy ns per frame): null {:.1} | established {:.1} | new flows {:.1} | mix {:.1} | queue full {:.1}",
                "", ns.ceiling, ns.established, ns.new_flow, ns.mix, ns.full_queue
            );
            if !r.region_huge_pages {
                println!(
                    "{:>5}   the region was on 4 KiB pages (/dev/shm without huge=); production mounts it huge=advise (docs/OPERATIONS.md), as --pages huge (the default, as root) does privately",
                    ""
                );
            }
        }
    }
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Cmd::Bench(b)) = cli.cmd {
        return bench(b);
    }
    let a = cli.run;
    let client_net = match parse_prefix(&a.clients) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("lbgen: --clients {:?}: {e:#}", a.clients);
            return ExitCode::from(2);
        }
    };
    let cfg = GenConfig {
        instance: a.instance,
        services: a.services,
        flows: a.flows,
        duration: a.duration.map(Duration::from_secs_f64),
        concurrency: a.concurrency.max(1),
        data_packets: a.data_packets,
        payload: a.payload.min(1400),
        client_net,
        seed: a.seed,
        time_limit: Duration::from_secs_f64(a.time_limit),
        ..GenConfig::default()
    };
    let g = match Generator::new(cfg) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("lbgen: {e:#}");
            return ExitCode::from(2);
        }
    };
    let r = g.run();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r).expect("json"));
    } else {
        print(&r);
    }
    if r.clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
