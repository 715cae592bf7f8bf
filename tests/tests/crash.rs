//! kill -9 a switchd while traffic flows: controld restarts it, the region
//! and its connections survive, established connections keep their backends.

use std::time::{Duration, Instant};

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
    let generator = Generator::new(GenConfig {
        instance: inst.clone(),
        services: vec!["web".into()],
        flows: 4000,
        concurrency: 200,
        data_packets: 30,
        retransmit: Duration::from_millis(200),
        max_retries: 50,
        time_limit: Duration::from_secs(300),
        ..GenConfig::default()
    })
    .unwrap();
    let traffic = std::thread::spawn(move || generator.run());
    // Let connections establish, then kill switch 0 mid-traffic.
    std::thread::sleep(Duration::from_millis(1500));
    assert!(!traffic.is_finished(), "traffic still flowing when the switch is killed");
    // SAFETY: kill(2) on a switchd pid we read from the region.
    assert_eq!(unsafe { libc::kill(before[0] as i32, libc::SIGKILL) }, 0);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let pids = switch_pids(&region);
        if pids[0] != before[0] && shm_layout::time::pid_alive(pids[0]) {
            break;
        }
        assert!(Instant::now() < deadline, "switch 0 not restarted:\n{}", app.log());
        std::thread::sleep(Duration::from_millis(10));
    }
    let rep = traffic.join().unwrap();
    assert!(rep.clean(), "{rep:#?}");
    assert_eq!(rep.flows_completed, 4000);
    assert_eq!(rep.affinity_violations, 0, "every connection kept its backend");
    let dump = shmdump_json(&inst, &[]);
    let sw0 = &dump["switches"][0];
    assert_ne!(sw0["pid"].as_u64().unwrap() as u32, before[0], "shmdump shows the new pid");
    assert_eq!(sw0["alive"], true);
    assert_eq!(sw0["restarts"], 1);
    assert_eq!(dump["switches"][1]["pid"].as_u64().unwrap() as u32, before[1], "switch 1 untouched");
    assert_eq!(dump["connections"]["busy_slots"], 0, "no slot left held by the dead switch");
    drop(app);
}
