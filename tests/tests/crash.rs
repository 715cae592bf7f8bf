//! kill -9 a switchd while traffic flows: controld restarts it, the region
//! and its connections survive, established connections keep their backends.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use shm_layout::switch_slot::Counter;

use switchyard_tests::churn::{
    Traffic, kill_switch, new_conns, wait_new_conns, wait_restarted, web,
};
use switchyard_tests::{Appliance, Cfg, counter, render, shmdump_json, switch_pids, unique};
use tools::traffic::GenConfig;

#[test]
fn killed_switch_restarts_and_connections_keep_their_backends() {
    let inst = unique("crash");
    let cfg = Cfg {
        switches: 2,
        ..Cfg::default()
    };
    let app = Appliance::start(&inst, &render(&inst, &cfg));
    let region = app.region();
    let before = switch_pids(&region);
    let traffic = Traffic::start(GenConfig {
        concurrency: 200,
        data_packets: 30,
        retransmit: Duration::from_millis(200),
        max_retries: 50,
        time_limit: Duration::from_secs(300),
        ..web(&inst)
    });
    // Let connections establish, then kill switch 0 mid-traffic.
    wait_new_conns(&app, &region, &[0, 1], 1000);
    kill_switch(&region, 0);
    wait_restarted(&app, &region, 0, before[0], String::new);
    // Traffic keeps flowing through the restarted switch, then stops.
    wait_new_conns(&app, &region, &[0, 1], new_conns(&region, &[0, 1]) + 2000);
    let rep = traffic.stop();
    assert!(rep.clean(), "{rep:#?}");
    assert!(rep.flows_completed >= 3000);
    assert_eq!(
        rep.affinity_violations, 0,
        "every connection kept its backend"
    );
    let dump = shmdump_json(&inst, &[]);
    let sw0 = &dump["switches"][0];
    assert_ne!(
        sw0["pid"].as_u64().unwrap() as u32,
        before[0],
        "shmdump shows the new pid"
    );
    assert_eq!(sw0["alive"], true);
    assert_eq!(sw0["restarts"], 1);
    assert_eq!(
        dump["switches"][1]["pid"].as_u64().unwrap() as u32,
        before[1],
        "switch 1 untouched"
    );
    // A switch killed inside an insert leaves that slot held; the GC
    // takes it back when its sweep reaches it (a round of this table takes
    // a few seconds of 20 ms ticks), so wait for that, bounded.
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut busy = dump["connections"]["busy_slots"].clone();
    while busy != 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        busy = shmdump_json(&inst, &[])["connections"]["busy_slots"].clone();
    }
    assert_eq!(busy, 0, "no slot left held by the dead switch");
    drop(app);
}

/// controld killed with SIGKILL while connections are open: the switch
/// keeps forwarding on the abandoned region (which shmdump reports as
/// abandoned), and a new controld adopts the region, its connection table
/// and the running switch: the same connections go on through the kill and
/// the takeover, each to the backend it started with.
#[test]
fn killed_controld_is_replaced_by_one_that_adopts_the_region_switch_and_connections() {
    let inst = unique("ctlkill");
    let cfg = render(&inst, &Cfg::default());
    let mut app = Appliance::start(&inst, &cfg);
    let region = app.region();
    let old_switch = switch_pids(&region)[0];
    // Long flows (many data packets each, both directions) that start before
    // the kill and are still open across the takeover.
    let traffic = Traffic::start(GenConfig {
        concurrency: 64,
        data_packets: 400,
        retransmit: Duration::from_millis(200),
        max_retries: 50,
        time_limit: Duration::from_secs(120),
        ..web(&inst)
    });
    let hits = || -> u64 { region.switch_slots()[0].counter(Counter::ReplyHit) };
    let wait_hits = |more: u64, what: &str| {
        let target = hits() + more;
        let deadline = Instant::now() + Duration::from_secs(30);
        while hits() < target {
            assert!(Instant::now() < deadline, "{what}: traffic does not flow");
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    wait_hits(2000, "before the kill");
    let conns_before = region.switch_slots()[0].counter(Counter::ConnNew);
    let mut controld = app.controld.take().unwrap();
    controld.kill().unwrap();
    controld.wait().unwrap();
    let dump = shmdump_json(&inst, &[]);
    assert_eq!(dump["header"]["abandoned"], true);
    assert_eq!(dump["switches"][0]["alive"], true);
    wait_hits(2000, "while no controld runs");
    // A new controld takes over (the new guard cleans up everything).
    app.disarm();
    let app = Appliance::start(&inst, &cfg);
    assert!(
        app.log().contains("adopting switch 0"),
        "the running switch is adopted:\n{}",
        app.log()
    );
    assert_eq!(
        switch_pids(&region)[0],
        old_switch,
        "the same switch process runs on:\n{}",
        app.log()
    );
    wait_hits(2000, "after the takeover");
    let rep = traffic.stop();
    assert!(rep.clean(), "{rep:#?}\n{}", app.log());
    assert_eq!(rep.affinity_violations, 0, "{rep:#?}");
    assert!(rep.flows_completed > 0 && conns_before > 0, "{rep:#?}");
    // No connection had to be picked up again: the table was kept.
    let dump = shmdump_json(&inst, &[]);
    assert_eq!(counter(&dump, 0, "conn_midflow"), 0, "{dump:#}");
    assert_eq!(dump["header"]["abandoned"], false);
    assert_eq!(dump["switches"][0]["restarts"], 0);
    drop(app);
}

/// `lbctl --socket SOCKET --json ARGS`: its result, or what went wrong.
fn try_lbctl(socket: &std::path::Path, args: &[&str]) -> Result<serde_json::Value, String> {
    let out = std::process::Command::new(switchyard_tests::bin("lbctl"))
        .arg("--socket")
        .arg(socket)
        .arg("--json")
        .args(args)
        .output()
        .expect("run lbctl");
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "lbctl {args:?}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let v: serde_json::Value = serde_json::from_str(text.trim()).expect("one JSON line");
    assert_eq!(v["ok"], true, "{v}");
    Ok(v["result"].clone())
}

/// An operator's `lbctl drain` and `weight` outlive a controld killed
/// with SIGKILL: the controld that adopts the region publishes them.
#[test]
fn runtime_overrides_survive_a_killed_controld() {
    let inst = unique("ovkill");
    // Not in the appliance's directory: the test harness empties that when
    // it hands the instance to the next controld.
    struct Dir(std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let dir = Dir(std::env::temp_dir().join(format!("switchyard-admin-{inst}")));
    let socket = dir.0.join("admin.sock");
    let cfg = format!(
        "{}\n[admin]\nsocket = \"{}\"\n",
        render(&inst, &Cfg::default()),
        socket.display()
    );
    let mut app = Appliance::start(&inst, &cfg);
    try_lbctl(&socket, &["drain", "web/web1"]).unwrap();
    try_lbctl(&socket, &["weight", "web/web2", "7"]).unwrap();
    let mut controld = app.controld.take().unwrap();
    controld.kill().unwrap();
    controld.wait().unwrap();
    app.disarm();
    let app = Appliance::start(&inst, &cfg);
    // The adopted switch is ready before the admin socket may be served
    // (the killed controld's socket file stays until then).
    let show =
        switchyard_tests::wait_for(Duration::from_secs(10), || try_lbctl(&socket, &["show"]));
    let web = show["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "web")
        .unwrap();
    let backends: Vec<(String, bool, u64, Option<u64>)> = web["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["name"].as_str().unwrap().to_string(),
                b["admin_drained"].as_bool().unwrap(),
                b["effective_weight"].as_u64().unwrap(),
                b["weight_override"].as_u64(),
            )
        })
        .collect();
    assert_eq!(
        backends,
        [
            ("web1".to_string(), true, 0, None),
            ("web2".to_string(), false, 7, Some(7)),
            ("web3".to_string(), false, 3, None),
        ],
        "{}",
        app.log()
    );
    assert!(
        app.log().contains(
            "runtime override web/web1: drained restored from the controld this one replaces"
        ),
        "{}",
        app.log()
    );
    drop(app);
    assert!(
        !dir.0.join("admin.overrides").exists(),
        "a clean stop removes the saved overrides"
    );
}

/// Builds a region under an instance's name as someone else could: a
/// "switch" slot names `victim` (not a switchd) as a running switch, and
/// the recorded controld is dead.
fn forge_region(inst: &str, config: &str, victim: u32, start: u64) {
    use shm_layout::switch_slot::SW_RUNNING;
    let cfg = controld::config::parse(config).unwrap();
    let r = shm_layout::Region::create(inst, controld::takeover::capacities(&cfg)).unwrap();
    r.header()
        .controld_pid
        .store(u32::MAX / 2 - 3, Ordering::SeqCst);
    let s = &r.switch_slots()[0];
    s.pid.store(victim, Ordering::Relaxed);
    s.proc_start.store(start, Ordering::Relaxed);
    s.state.store(SW_RUNNING, Ordering::SeqCst);
}

struct Victim(std::process::Child);

impl Victim {
    fn spawn() -> Self {
        Victim(
            std::process::Command::new("sleep")
                .arg("60")
                .spawn()
                .unwrap(),
        )
    }

    fn alive(&mut self) -> bool {
        // Give a wrongly sent SIGTERM/SIGKILL time to land.
        std::thread::sleep(Duration::from_millis(300));
        self.0.try_wait().unwrap().is_none()
    }
}

impl Drop for Victim {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A region under the instance's name that another user owns (anyone can
/// write /dev/shm): controld refuses it, says what it found, and signals
/// nobody it names.
#[test]
fn a_region_another_user_owns_is_refused_and_the_process_it_names_survives() {
    let inst = unique("forged");
    let mut victim = Victim::spawn();
    let pid = victim.0.id();
    let cfg = render(&inst, &Cfg::default());
    forge_region(
        &inst,
        &cfg,
        pid,
        shm_layout::time::process_start(pid).unwrap(),
    );
    let path = format!("/dev/shm/{}", shm_layout::region_name(&inst));
    std::os::unix::fs::chown(&path, Some(65534), Some(65534)).unwrap();
    let res = Appliance::try_start(&inst, &cfg);
    let _ = std::fs::remove_file(&path);
    let err = match res {
        Ok(app) => panic!("controld took a foreign region:\n{}", app.log()),
        Err(e) => e,
    };
    assert!(
        err.contains("is not trusted: owned by uid 65534"),
        "controld names the problem: {err}"
    );
    assert!(victim.alive(), "the process the region named was signalled");
}

/// A region of our own whose switch slot names a process that is not this
/// instance's switchd (a pid reused since, or forged by a process of ours):
/// controld adopts the region but leaves the process alone, says so, and
/// starts a switch of its own in that slot.
#[test]
fn a_region_naming_a_foreign_process_as_switch_gets_a_new_switch_and_the_process_survives() {
    let inst = unique("reused");
    let cfg = render(&inst, &Cfg::default());
    for wrong_start in [false, true] {
        let mut victim = Victim::spawn();
        let pid = victim.0.id();
        let start = shm_layout::time::process_start(pid).unwrap();
        forge_region(
            &inst,
            &cfg,
            pid,
            if wrong_start { start - 1 } else { start },
        );
        let app = Appliance::start(&inst, &cfg);
        let log = app.log();
        let why = if wrong_start {
            "the pid was reused"
        } else {
            "is \"sleep\", not \"switchd\""
        };
        assert!(
            log.contains(&format!(
                "switch slot 0 names pid {pid}, which is not this instance's switchd"
            )) && log.contains(why),
            "{log}"
        );
        assert_ne!(switch_pids(&app.region())[0], pid);
        assert!(
            victim.alive(),
            "the process the region named was signalled:\n{log}"
        );
        drop(app);
    }
}
