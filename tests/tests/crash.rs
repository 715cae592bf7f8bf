//! kill -9 a switchd while traffic flows: controld restarts it, the region
//! and its connections survive, established connections keep their backends.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use shm_layout::switch_slot::Counter;

use switchyard_tests::{Appliance, Cfg, render, shmdump_json, switch_pids, unique};
use tools::traffic::{GenConfig, Generator};

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
    let stop = Arc::new(AtomicBool::new(false));
    let generator = Generator::new(GenConfig {
        instance: inst.clone(),
        services: vec!["web".into()],
        flows: u64::MAX,
        stop: Some(stop.clone()),
        concurrency: 200,
        data_packets: 30,
        retransmit: Duration::from_millis(200),
        max_retries: 50,
        time_limit: Duration::from_secs(300),
        ..GenConfig::default()
    })
    .unwrap();
    let traffic = std::thread::spawn(move || generator.run());
    let new_conns = || -> u64 {
        region.switch_slots()[..2]
            .iter()
            .map(|s| s.counter(Counter::ConnNew))
            .sum()
    };
    let wait_conns = |at_least: u64| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while new_conns() < at_least {
            assert!(
                Instant::now() < deadline,
                "traffic does not flow:\n{}",
                app.log()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    // Let connections establish, then kill switch 0 mid-traffic.
    wait_conns(1000);
    // SAFETY: kill(2) on a switchd pid we read from the region.
    assert_eq!(unsafe { libc::kill(before[0] as i32, libc::SIGKILL) }, 0);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let pids = switch_pids(&region);
        if pids[0] != before[0] && shm_layout::time::pid_alive(pids[0]) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "switch 0 not restarted:\n{}",
            app.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // Traffic keeps flowing through the restarted switch, then stops.
    wait_conns(new_conns() + 2000);
    stop.store(true, Ordering::Relaxed);
    let rep = traffic.join().unwrap();
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

/// controld killed with SIGKILL: the switches keep forwarding on the
/// abandoned region (which shmdump reports as abandoned), and a new controld
/// takes the instance over, stopping the orphans and starting fresh switches.
#[test]
fn killed_controld_leaves_a_working_data_path_and_a_clean_takeover() {
    let inst = unique("ctlkill");
    let cfg = render(&inst, &Cfg::default());
    let mut app = Appliance::start(&inst, &cfg);
    let old_switch = switch_pids(&app.region())[0];
    let mut controld = app.controld.take().unwrap();
    controld.kill().unwrap();
    controld.wait().unwrap();
    let dump = shmdump_json(&inst, &[]);
    assert_eq!(dump["header"]["abandoned"], true);
    assert_eq!(dump["switches"][0]["alive"], true);
    let run = |seed| {
        Generator::new(GenConfig {
            instance: inst.clone(),
            services: vec!["web".into()],
            flows: 500,
            seed,
            time_limit: Duration::from_secs(20),
            ..GenConfig::default()
        })
        .unwrap()
        .run()
    };
    let rep = run(1);
    assert!(rep.clean(), "orphaned switch still forwards: {rep:#?}");
    // A new controld takes over (the new guard cleans up everything).
    app.disarm();
    let app = Appliance::start(&inst, &cfg);
    // It exits on the SIGTERM the new controld sent (allow it to finish dying).
    let deadline = Instant::now() + Duration::from_secs(10);
    while shm_layout::time::pid_alive(old_switch) {
        assert!(
            Instant::now() < deadline,
            "orphaned switch {old_switch} still alive"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(app.log().contains("orphaned switchd"), "{}", app.log());
    let rep = run(2);
    assert!(
        rep.clean(),
        "{rep:#?}\n{:#}",
        shmdump_json(&inst, &[])["switches"][0]
    );
    drop(app);
}
