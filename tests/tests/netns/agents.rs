//! Load agents end to end: real `lb-agent` processes in the backend
//! namespaces report to controld (AF_PACKET NAT appliance) in the
//! appliance namespace. Genuine reports change the published weights and
//! Maglev shares, and a drain request empties a backend's share; forged
//! (wrong secret, or another host's report), stale (clock off by an hour),
//! replayed (a captured datagram sent again), unknown-sender and malformed
//! datagrams are dropped, counted (the alert lines carry the totals) and
//! change nothing; a silent agent's backends get their configured weights
//! back. Every wait is bounded.

use std::time::{Duration, Instant};

use switchyard_tests::netns::{Bed, afpacket_appliance, prepare};
use switchyard_tests::{Appliance, bin, shmdump_json};

const SECRET: &str = "netns-agents-test-secret-0123456789";
const LISTEN_IP: &str = "198.19.0.1";
const LISTEN_PORT: u16 = 7007;

/// `[agents]` for the test: a wide skew window (so a report captured
/// during the test is still fresh when it is replayed, and counts as a
/// replay, not as stale) and a long silence (steering holds while the
/// test works) unless `silent_ms` says otherwise.
fn agents_table(silent_ms: u32) -> String {
    format!(
        "\n[agents]\nlisten = \"{LISTEN_IP}:{LISTEN_PORT}\"\nsecret = \"{SECRET}\"\n\
         max_skew_ms = 300000\nsilent_ms = {silent_ms}\n"
    )
}

/// `(weight, table entries)` of each backend of `service`, in order.
fn weights(inst: &str, service: &str) -> Vec<(u64, u64)> {
    let d = shmdump_json(inst, &[]);
    let svc = switchyard_tests::dump_service(&d, service);
    svc["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["weight"].as_u64().unwrap(),
                b["table_entries"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn only_weights(inst: &str, service: &str) -> Vec<u64> {
    weights(inst, service).into_iter().map(|w| w.0).collect()
}

/// Waits (at most 20 s) until `service`'s weights are `want`.
fn wait_weights(app: &Appliance, service: &str, want: &[u64]) {
    switchyard_tests::wait_for(Duration::from_secs(20), || {
        let got = only_weights(&app.instance, service);
        if got == want {
            Ok(())
        } else {
            Err(format!(
                "{service} weights stayed {got:?}, expected {want:?}:\n{}",
                app.log()
            ))
        }
    })
}

/// Waits (at most 20 s) until controld's log contains `needle`.
fn wait_log(app: &Appliance, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !app.log().contains(needle) {
        assert!(
            Instant::now() < deadline,
            "no {needle:?} in the log:\n{}",
            app.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `lb-agent` to completion in a namespace (its `--count` bounds
/// it); returns its stdout.
fn lb_agent(bed: &Bed, role: &str, secret: &str, args: &[&str]) -> String {
    let agent = bin("lb-agent");
    let controller = format!("{LISTEN_IP}:{LISTEN_PORT}");
    let mut all = vec![
        agent.to_str().unwrap(),
        "--controller",
        &controller,
        "--secret",
        secret,
        "--interval-ms",
        "50",
        "--mem-percent",
        "40",
    ];
    all.extend_from_slice(args);
    let out = bed.exec(role, &all).unwrap();
    String::from_utf8(out.stdout).unwrap()
}

/// Sends one UDP datagram (hex) to controld's listener from a namespace.
fn send_hex(bed: &Bed, role: &str, hex: &str) {
    let script = format!(
        "import socket, sys\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.sendto(bytes.fromhex(sys.argv[1]), ('{LISTEN_IP}', {LISTEN_PORT}))\n"
    );
    bed.exec(role, &["python3", "-c", &script, hex]).unwrap();
}

/// The alert lines carry the totals of the drop counters.
fn totals(forged: u64, stale: u64, replayed: u64, unknown: u64, malformed: u64) -> String {
    format!(
        "totals: forged {forged}, stale {stale}, replayed {replayed}, unknown_agent {unknown}, malformed {malformed}, "
    )
}

#[test]
fn genuine_reports_steer_weights_and_forged_stale_replayed_ones_are_counted_and_ignored() {
    let mut bed = Bed::build();
    let port = prepare(&mut bed, "nat");
    let (inst, app) = afpacket_appliance(&bed, "nat", port);
    let mut cfg = std::fs::read_to_string(&app.config_path).unwrap();
    for w in 1..=3 {
        let from = format!("  weight = {w}\n");
        assert_eq!(cfg.matches(&from).count(), 1, "{from:?} in\n{cfg}");
        cfg = cfg.replacen(&from, "  weight = 100\n", 1);
    }
    app.reload_and_wait(&format!("{cfg}{}", agents_table(600_000)));
    wait_log(
        &app,
        &format!("agents: listening for lb-agent reports on {LISTEN_IP}:{LISTEN_PORT}"),
    );
    assert_eq!(only_weights(&inst, "web"), [100, 100, 100]);
    assert_eq!(only_weights(&inst, "dns"), [1, 1, 1]);
    let region = app.region();
    let gen_of = || region.generation(shm_layout::Table::Config);

    // An idle first report is accepted (logged) and changes no weight;
    // its datagram is kept for the replay below.
    let g0 = gen_of();
    let out = lb_agent(
        &bed,
        "b1",
        SECRET,
        &["--count", "1", "--cpu-percent", "0", "--print-hex"],
    );
    let idle_hex = out
        .lines()
        .find_map(|l| l.split_once(" hex=").map(|(_, h)| h.to_string()))
        .unwrap_or_else(|| panic!("no datagram printed: {out:?}"));
    wait_log(
        &app,
        "agents: 198.19.0.11 (web/backend1, dns/dns1) reports cpu 0%, memory 40%: configured weights",
    );
    assert_eq!(
        gen_of(),
        g0,
        "an idle first report republished:\n{}",
        app.log()
    );

    // 80 % CPU: backend1 gets 20 % of its weight, and about 20/220 of the
    // table; dns1's weight 1 cannot go lower.
    lb_agent(
        &bed,
        "b1",
        SECRET,
        &["--count", "1", "--cpu-percent", "80", "--active", "12"],
    );
    wait_weights(&app, "web", &[20, 100, 100]);
    assert_eq!(only_weights(&inst, "dns"), [1, 1, 1]);
    let web = weights(&inst, "web");
    let m: u64 = web.iter().map(|w| w.1).sum();
    assert_eq!(m, 65537);
    let share = web[0].1 as f64 / m as f64;
    assert!(
        (0.07..=0.11).contains(&share),
        "backend1 share {share}: {web:?}"
    );
    assert!(
        web[1].1 > 4 * web[0].1 && web[2].1 > 4 * web[0].1,
        "{web:?}"
    );
    wait_log(
        &app,
        "agents: 198.19.0.11 (web/backend1, dns/dns1) reports cpu 80%, memory 40%, 12 active clients: \
         weights at 20% of configured (was weights at 100% of configured)",
    );
    let g1 = gen_of();

    // Replayed: the idle report again from b1 would restore backend1's
    // weight; from b2 it is forged (the MAC binds the sender's address).
    send_hex(&bed, "b1", &idle_hex);
    send_hex(&bed, "b2", &idle_hex);
    wait_log(&app, &totals(1, 0, 1, 0, 0));

    // Forged: the wrong secret asking to drain backend2, three times.
    lb_agent(
        &bed,
        "b2",
        "the-wrong-secret-0123456789",
        &["--count", "3", "--drain"],
    );
    // Stale: the right secret, clocks an hour behind and an hour ahead.
    lb_agent(
        &bed,
        "b2",
        SECRET,
        &["--count", "2", "--drain", "--clock-offset-ms", "-3600000"],
    );
    lb_agent(
        &bed,
        "b2",
        SECRET,
        &["--count", "1", "--drain", "--clock-offset-ms", "3600000"],
    );
    // Unknown agent: the client is no backend. Malformed: not a report.
    lb_agent(&bed, "cl", SECRET, &["--count", "1", "--drain"]);
    send_hex(&bed, "b3", "68656c6c6f");
    wait_log(&app, &totals(4, 3, 1, 1, 1));
    assert!(
        app.log()
            .contains(&format!("{}accepted 2", totals(4, 3, 1, 1, 1))),
        "{}",
        app.log()
    );
    assert!(
        app.log()
            .contains("forged (last from 198.19.0.12: the HMAC does not match"),
        "{}",
        app.log()
    );
    assert!(
        app.log()
            .contains("replayed (last from 198.19.0.11: sequence number"),
        "{}",
        app.log()
    );
    assert_eq!(only_weights(&inst, "web"), [20, 100, 100]);
    assert_eq!(only_weights(&inst, "dns"), [1, 1, 1]);
    assert_eq!(
        gen_of(),
        g1,
        "a dropped report changed the configuration:\n{}",
        app.log()
    );

    // Drain: backend3 and dns3 (same address) leave their tables; a
    // report without the request brings them back.
    lb_agent(
        &bed,
        "b3",
        SECRET,
        &["--count", "1", "--drain", "--cpu-percent", "0"],
    );
    wait_weights(&app, "web", &[20, 100, 0]);
    assert_eq!(only_weights(&inst, "dns"), [1, 1, 0]);
    assert_eq!(weights(&inst, "web")[2].1, 0);
    assert_eq!(weights(&inst, "dns")[2].1, 0);
    wait_log(
        &app,
        "agents: 198.19.0.13 (web/backend3, dns/dns3) asks to drain",
    );
    lb_agent(&bed, "b3", SECRET, &["--count", "1", "--cpu-percent", "0"]);
    wait_weights(&app, "web", &[20, 100, 100]);
    assert_eq!(only_weights(&inst, "dns"), [1, 1, 1]);

    // Silence: a reload that makes 200 ms silent brings backend1's
    // configured weight back; the replay mark survived the reload.
    app.reload_and_wait(&format!("{cfg}{}", agents_table(200)));
    wait_weights(&app, "web", &[100, 100, 100]);
    wait_log(
        &app,
        "agents: 198.19.0.11 (web/backend1, dns/dns1) silent for",
    );
    send_hex(&bed, "b1", &idle_hex);
    wait_log(&app, &totals(4, 3, 2, 1, 1));
    drop(app);
}
