//! Controlled server loading end to end: the AF_PACKET NAT appliance in a
//! namespace in front of a real testbackend that overloads past `K`
//! requests in progress (late answers, stops accepting, its listen queue
//! overflows, its kernel drops SYNs). Many clients with one connection per
//! request drive it far past `K` (each request takes 5 ms of work). With `latency_target_ms` the switches'
//! SYN to SYN-ACK samples make controld bring `max_conns` down to near `K`
//! and every request completes (SYNs wait in the switch, not in the
//! server's kernel: the server's kernel drops at least four times fewer
//! SYNs per completed request than without the limit). p99 latency is
//! measured with and without the limit and printed, never asserted. Every
//! wait is bounded.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use switchyard_tests::netns::{Bed, afpacket_appliance};
use switchyard_tests::{Appliance, bin, counter_sum, shmdump_json};

/// The server's knee: more requests than this in progress overload it.
const K: u32 = 8;
/// Clients, each one request (one connection) at a time.
const CLIENTS: usize = 32;
const CONFIGURED_MAX: u32 = 64;

/// The web service: the slow backend alone, with or without loading.
fn web_service(limited: bool) -> String {
    let mut s = String::from(
        "[[service]]\nname = \"web\"\nvip = \"198.18.0.10\"\nport = 80\nprotocol = \"tcp\"\n\
         mode = \"nat\"\nscheduler = \"wlc\"\nqueue_timeout_ms = 30000\n",
    );
    if limited {
        s += "latency_target_ms = 100\nadjust_interval_ms = 500\nmin_conns = 1\n";
    }
    s += "  [[service.backend]]\n  name = \"backend1\"\n  address = \"198.19.0.11\"\n  port = 9090\n";
    if limited {
        s += &format!("  max_conns = {CONFIGURED_MAX}\n");
    }
    s
}

/// Reloads with the web service replaced and waits for the generation.
fn set_web(app: &Appliance, limited: bool) {
    let cfg = std::fs::read_to_string(&app.config_path).unwrap();
    let start = cfg
        .find("[[service]]\nname = \"web\"")
        .expect("web service");
    let end = cfg
        .find("[[service]]\nname = \"dns\"")
        .expect("dns service");
    let new = format!("{}{}{}", &cfg[..start], web_service(limited), &cfg[end..]);
    app.reload_and_wait(&new);
}

/// Enters the client namespace on this thread.
fn enter(bed: &Bed) {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(format!("/var/run/netns/{}", bed.ns("cl"))).unwrap();
    // SAFETY: setns with a valid namespace fd affects only this thread.
    assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
}

/// One HTTP request on its own connection; the answer must be backend1's.
fn request() -> Result<Duration, String> {
    let t = Instant::now();
    let vip: SocketAddr = "198.18.0.10:80".parse().unwrap();
    let mut s = TcpStream::connect_timeout(&vip, Duration::from_secs(60))
        .map_err(|e| format!("connect: {e}"))?;
    // Generous: a server past its knee may drop the handshake's last ACK
    // (listen queue full) and the client's data then backs off for long.
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: vip\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut body = String::new();
    s.read_to_string(&mut body)
        .map_err(|e| format!("read: {e}"))?;
    if !body.ends_with("\r\n\r\nbackend1\n") {
        return Err(format!("answer {body:?}"));
    }
    Ok(t.elapsed())
}

/// What one load phase saw.
#[derive(Debug)]
struct Phase {
    completed: usize,
    failed: Vec<String>,
    p50_ms: f64,
    p99_ms: f64,
}

/// `CLIENTS` threads send requests for `run` (then finish the one in flight).
fn load(bed: &Bed, run: Duration, during: impl FnOnce()) -> Phase {
    let stop = AtomicBool::new(false);
    let (mut lat, failed) = std::thread::scope(|s| {
        let workers: Vec<_> = (0..CLIENTS)
            .map(|_| {
                let stop = &stop;
                s.spawn(move || {
                    enter(bed);
                    let (mut ok, mut bad) = (Vec::new(), Vec::new());
                    while !stop.load(Ordering::Relaxed) {
                        match request() {
                            Ok(d) => ok.push(d),
                            Err(e) => bad.push(e),
                        }
                    }
                    (ok, bad)
                })
            })
            .collect();
        let t = Instant::now();
        during();
        std::thread::sleep(run.saturating_sub(t.elapsed()));
        stop.store(true, Ordering::Relaxed);
        let mut lat = Vec::new();
        let mut failed = Vec::new();
        for w in workers {
            let (ok, bad) = w.join().unwrap();
            lat.extend(ok);
            failed.extend(bad);
        }
        (lat, failed)
    });
    lat.sort();
    let q = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    Phase {
        completed: lat.len(),
        failed,
        p50_ms: q(0.50),
        p99_ms: q(0.99),
    }
}

/// The published limit and SYN-ACK counters of backend1.
fn backend1(inst: &str) -> serde_json::Value {
    let d = shmdump_json(inst, &[]);
    switchyard_tests::dump_service(&d, "web")["backends"][0].clone()
}

#[test]
fn latency_brings_max_conns_down_to_the_servers_knee_and_every_request_completes() {
    let mut bed = Bed::build();
    bed.exec("lb", &["sysctl", "-qw", "net.ipv4.ip_forward=0"])
        .unwrap();
    // Without SYN cookies an overloaded server drops SYNs (the signal) and
    // never completes a handshake it has no room for (with cookies a
    // dropped final ACK leaves the client "connected" to nothing, its
    // request backing off for tens of seconds while it holds a slot).
    bed.exec("b1", &["sysctl", "-qw", "net.ipv4.tcp_syncookies=0"])
        .unwrap();
    let tb = bin("testbackend");
    let k = K.to_string();
    let child = bed.spawn(
        "b1",
        &[
            tb.to_str().unwrap(),
            "--name",
            "backend1",
            "--http",
            "198.19.0.11:9090",
            "--slow-above",
            &k,
            "--slow-ms",
            "200",
            "--work-ms",
            "5",
            "--backlog",
            "4",
        ],
    );
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert!(line.starts_with("testbackend backend1"), "{line}");
    let (inst, app) = afpacket_appliance(&bed, "nat", 9090);

    // With controlled loading: the limit starts at 64 and must come down.
    set_web(&app, true);
    assert_eq!(backend1(&inst)["max_conns"], CONFIGURED_MAX);
    let mut limits = Vec::new();
    let drops_before = listen_drops(&bed);
    let limited = load(&bed, Duration::from_secs(10), || {
        // Sample once the limit has come down to the knee's region (the
        // positive event that proves controld saw the overload and acted),
        // for 10 s from then.
        let t = Instant::now();
        while backend1(&inst)["max_conns"].as_u64().unwrap() as u32 > K + 7 {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "max_conns never came down from {CONFIGURED_MAX} to {}",
                K + 7
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(10) {
            limits.push(backend1(&inst)["max_conns"].as_u64().unwrap() as u32);
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    let limited_drops = listen_drops(&bed) - drops_before;
    let b = backend1(&inst);
    let dump = shmdump_json(&inst, &[]);
    println!(
        "limited: {} completed, {} failed, p50 {:.1} ms, p99 {:.1} ms\n  max_conns over the last 10 s: {limits:?}\n  backend: {b}\n  queued {} dequeued {} refused {}",
        limited.completed,
        limited.failed.len(),
        limited.p50_ms,
        limited.p99_ms,
        counter_sum(&dump, "conn_queued"),
        counter_sum(&dump, "conn_dequeued"),
        counter_sum(&dump, "conn_refused"),
    );
    assert!(limited.failed.is_empty(), "{:?}", limited.failed);
    assert!(limited.completed > 0);
    assert!(b["syn_ack_samples"].as_u64().unwrap() > 0);
    assert!(
        b["syn_ack_slow"].as_u64().unwrap() > 0,
        "the overload was seen"
    );
    assert_eq!(counter_sum(&dump, "conn_refused"), 0);
    // The limit comes down from 64 and saws below the knee the switch can
    // see: the server's listen queue overflows past K + 1 in progress and
    // 5 queued (backlog 4), so SYNs drop from about K + 7 on, and AIMD
    // saws between 0.7x and that. Tolerance: every sample of the last
    // 10 s in [1, half the configured 64] (it came down and stays down),
    // the median at most K + 7, and the limit rising at least once
    // (additive increase works; it is not pinned at the floor or at a
    // cut). No tighter upper bound on single samples: when the load
    // generator lulls (the machine is shared), SYN-ACKs stay fast above
    // the knee and additive increase rightly climbs for a while (a
    // fresh-clone run once reached 18 with K = 8). No lower bound on the median: on a loaded
    // machine (CI runs tests side by side on two CPUs) SYN-ACKs exceed
    // the target at any concurrency now and then, and each such interval
    // rightly cuts the limit again (a fresh-clone run once sawed around 2).
    let mut sorted = limits.clone();
    sorted.sort();
    let median = sorted[sorted.len() / 2];
    let rises = limits.windows(2).filter(|w| w[1] > w[0]).count();
    assert!(
        median <= K + 7
            && rises > 0
            && sorted
                .iter()
                .all(|&l| (1..=CONFIGURED_MAX / 2).contains(&l)),
        "median {median}, {rises} rises, samples {limits:?}"
    );

    // Without a limit: the same load straight at the server.
    set_web(&app, false);
    let drops_before = listen_drops(&bed);
    let unlimited = load(&bed, Duration::from_secs(12), || {});
    let unlimited_drops = listen_drops(&bed) - drops_before;
    println!(
        "unlimited: {} completed, {} failed, p50 {:.1} ms, p99 {:.1} ms",
        unlimited.completed,
        unlimited.failed.len(),
        unlimited.p50_ms,
        unlimited.p99_ms
    );
    println!(
        "p99 latency: {:.1} ms with the adaptive limit, {:.1} ms without (p50 {:.1} / {:.1} ms; {} / {} requests; {} requests of the unlimited run failed)",
        limited.p99_ms,
        unlimited.p99_ms,
        limited.p50_ms,
        unlimited.p50_ms,
        limited.completed,
        unlimited.completed,
        unlimited.failed.len()
    );
    println!(
        "server kernel's dropped SYNs: {limited_drops} with the limit, {unlimited_drops} without"
    );
    // What the limit is for: SYNs wait in the switch, not in the server's
    // kernel. Without it the server drops SYNs (the load is real); with it
    // at least four times fewer per completed request (one run here: 1.5%
    // against 39%).
    assert!(unlimited_drops > 0, "the unlimited load overloaded nothing");
    assert!(
        limited_drops * unlimited.completed as u64 * 4 < unlimited_drops * limited.completed as u64,
        "dropped SYNs per request: {limited_drops}/{} with the limit, {unlimited_drops}/{} without",
        limited.completed,
        unlimited.completed
    );
    drop(app);
}

/// The SYNs backend1's kernel dropped so far (TcpExt ListenDrops in its
/// namespace: listen queue overflows and SYNs it had no room for).
fn listen_drops(bed: &Bed) -> u64 {
    let out = bed.exec("b1", &["cat", "/proc/net/netstat"]).unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (names, values) = (lines.next().unwrap(), lines.next().unwrap());
    let i = names
        .split_whitespace()
        .position(|n| n == "ListenDrops")
        .expect("ListenDrops in /proc/net/netstat");
    values.split_whitespace().nth(i).unwrap().parse().unwrap()
}
