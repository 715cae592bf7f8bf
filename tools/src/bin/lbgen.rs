//! lbgen: drives an instance's virtual NICs from the wire side with many
//! concurrent TCP and UDP flows, checks every frame that comes back, and
//! reports throughput and the per-backend split.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use tools::topo::parse_prefix;
use tools::traffic::{GenConfig, Generator, Report};

#[derive(Parser, Debug)]
#[command(version, about = "switchyard traffic generator (vnic wire side)")]
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

fn main() -> ExitCode {
    let a = Args::parse();
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
