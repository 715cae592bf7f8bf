//! A spoofed flood does not exhaust the connection table (issue 22 item 1).
//!
//! The NAT appliance on AF_PACKET ports with a small table
//! (`[limits] connections = 4096`: 16,384 slots), and from the client
//! namespace two hping3 floods with random source addresses for a bounded
//! time: SYNs (the backends answer each with a SYN-ACK) and bare ACKs
//! (mid-flow pickups; the backends answer each with a RST). Meanwhile
//! curl makes 200 requests: at least 99% must succeed. The table's
//! provisional and half-open entries are sampled through shmdump while the
//! floods run, and must be gone (expired) a few seconds after they stop.
//!
//! The random sources never leave the test's namespaces: the bed's
//! namespaces are joined only by veth pairs and a bridge among themselves
//! (checked below: no other link than lo, veths and the bridge exists in
//! any of them), the appliance's kernel does not forward (NAT mode), and
//! the switch has no route for the random destinations of the backends'
//! answers (they are dropped and counted in `drop_no_route`).

use std::time::{Duration, Instant};

use switchyard_tests::netns::{Bed, afpacket_appliance_sized, prepare};
use switchyard_tests::{counter_sum, shmdump_json};

const REQUESTS: usize = 200;
/// The floods' bound in time if the test dies before it stops them (it
/// stops them once the requests are done, so every request runs inside).
const FLOOD_LIMIT_S: u64 = 300;
/// One packet per 100 µs per flood (10,000/s each): the table (16,384
/// slots, two per NAT connection) fills within a second, as it did with
/// `--flood`, without the two hping3 processes taking both CPUs of a
/// small machine from the switch and curl.
const INTERVAL: &str = "u100";

/// The links of a namespace of the bed, as `ip -o link` names their kinds.
fn only_local_links(bed: &Bed, role: &str) {
    let out = bed.exec(role, &["ip", "-o", "-d", "link", "show"]).unwrap();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let local = line.contains(": lo:")
            || line.contains(" veth ")
            || line.contains(" bridge ")
            || line.contains(" bridge_slave ");
        assert!(local, "{role}: a link that may lead out: {line}");
    }
}

#[test]
fn a_spoofed_flood_of_syns_and_acks_does_not_exhaust_the_table() {
    if std::process::Command::new("hping3")
        .arg("--version")
        .output()
        .is_err()
    {
        panic!("hping3 is not installed (scripts/test.sh installs it)");
    }
    let mut bed = Bed::build();
    for role in ["cl", "lb", "b1", "b2", "b3"] {
        only_local_links(&bed, role);
    }
    let port = prepare(&mut bed, "nat");
    let (inst, app) = afpacket_appliance_sized(&bed, "nat", port, 4096);
    let curl = |bed: &Bed| {
        bed.exec(
            "cl",
            &["curl", "-sS", "--max-time", "5", "http://198.18.0.10/"],
        )
    };
    curl(&bed).expect("the appliance serves before the flood");

    let secs = FLOOD_LIMIT_S.to_string();
    let mut floods = Vec::new();
    for flags in ["-S", "-A"] {
        let child = bed.spawn(
            "cl",
            &[
                "timeout",
                &secs,
                "hping3",
                "-q",
                flags,
                "-p",
                "80",
                "-i",
                INTERVAL,
                "--rand-source",
                "198.18.0.10",
            ],
        );
        // `ip netns exec` execs `timeout`, which passes a SIGTERM on.
        floods.push(child.id() as i32);
    }
    let started = Instant::now();
    // Let the floods fill the table first.
    std::thread::sleep(Duration::from_secs(3));
    let (mut ok, mut failures) = (0usize, Vec::new());
    let (mut max_provisional, mut max_half_open, mut max_both) = (0u64, 0u64, 0u64);
    let mut attempted = 0;
    for i in 0..REQUESTS {
        // Twenty failures fail the test whatever follows: stop there (each
        // may take curl's whole 5 s).
        if failures.len() >= 20 {
            break;
        }
        attempted += 1;
        match curl(&bed) {
            Ok(out) if String::from_utf8_lossy(&out.stdout).starts_with("backend") => ok += 1,
            Ok(out) => failures.push(format!("answer {:?}", out.stdout)),
            Err(e) => failures.push(e),
        }
        if i % 20 == 0 {
            let c = &shmdump_json(&inst, &[])["connections"];
            let p = c["provisional"].as_u64().unwrap_or(0);
            let h = c["half_open"].as_u64().unwrap_or(0);
            max_provisional = max_provisional.max(p);
            max_half_open = max_half_open.max(h);
            max_both = max_both.max(p + h);
        }
    }
    let curl_time = started.elapsed();
    for pid in floods {
        // SAFETY: kill(2) on the pid of a child of this process that has
        // not been reaped (the bed reaps on drop), so not a reused pid.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    let stopped = Instant::now();
    eprintln!(
        "flood: {ok}/{attempted} curl requests succeeded in {curl_time:?}; failures: {failures:?}"
    );
    let dump = shmdump_json(&inst, &[]);
    let counters = [
        "conn_new",
        "conn_midflow",
        "evicted_provisional",
        "evicted_half_open",
        "drop_table_full",
        "drop_martian",
        "rx_packets",
        "drop_rx_ring",
    ]
    .map(|n| (n, counter_sum(&dump, n)));
    eprintln!(
        "flood: at most {max_provisional} provisional and {max_half_open} half-open entries \
         live; {counters:?}"
    );
    assert!(
        ok * 100 >= REQUESTS * 99,
        "{ok}/{attempted} succeeded: {failures:?}\ncontrold log:\n{}",
        app.log()
    );
    // Both floods filled the table: the new connections came in by
    // evicting what they left.
    assert!(
        counter_sum(&dump, "evicted_provisional") > 0,
        "{counters:?}"
    );
    assert!(counter_sum(&dump, "evicted_half_open") > 0, "{counters:?}");
    // Bounded by the table: a live NAT connection has its own forward and
    // reply slot of 16,384 (a connection is evicted whole through its
    // reply slot), however fast the floods come.
    assert!(max_both <= 8192, "{max_both}");

    // Once the floods end, what they left expires: provisional entries
    // after tcp_provisional (3 s), half-open ones after tcp_syn (10 s)
    // from the client's last packet (the backends' SYN-ACK retransmissions
    // do not refresh them). Waited for, bounded well past both.
    let gone = |kind: &str, limit: Duration| {
        let deadline = stopped + limit;
        loop {
            let c = shmdump_json(&inst, &[])["connections"].clone();
            if c[kind].as_u64() == Some(0) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{kind} entries left {limit:?} after the flood: {c}"
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    };
    gone("provisional", Duration::from_secs(8));
    gone("half_open", Duration::from_secs(16));
    curl(&bed).expect("the appliance serves after the flood");
    drop(app);
}
