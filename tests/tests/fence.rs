//! A switch stopped (SIGSTOP) across two publications: the publisher
//! excludes it after `ack_timeout_ms` and, before it rewrites the slot the
//! stopped burst may still read, fences it (controld kills it and waits
//! until it is gone); the supervisor restarts it, and the shared table
//! carries its connections on. When the stopped process would have been
//! continued (SIGCONT), there is nothing left to continue: no burst ends
//! torn, no connection keeps a wrong backend.

use std::time::Duration;

use controld::procs::Pidfd;
use switchyard_tests::churn::{Traffic, new_conns, wait_new_conns, wait_restarted, web};
use switchyard_tests::{Appliance, B, Cfg, counter_sum, render, shmdump_json, switch_pids, unique};
use tools::traffic::GenConfig;

/// The default web service with weights `w` (each publication moves flows).
fn weights(w: [u32; 3]) -> Cfg {
    let names = ["web1", "web2", "web3"];
    Cfg {
        switches: 2,
        web: (0..3)
            .map(|i| B {
                name: names[i],
                last_octet: i as u8 + 1,
                weight: w[i],
            })
            .collect(),
        ..Cfg::default()
    }
}

/// The rendered configuration with a short acknowledgement deadline (well
/// below the supervisor's 3 s heartbeat limit, so the publisher, not the
/// heartbeat watch, is what deals with the stopped switch).
fn config(inst: &str, w: [u32; 3]) -> String {
    let text = render(inst, &weights(w));
    assert!(text.contains("ack_timeout_ms = 2000"));
    text.replace("ack_timeout_ms = 2000", "ack_timeout_ms = 150")
}

#[test]
fn stalled_switch_is_fenced_before_its_slot_is_rewritten() {
    let inst = unique("fence");
    let app = Appliance::start(&inst, &config(&inst, [1, 2, 3]));
    let region = app.region();
    let before = switch_pids(&region);
    let stalled = Pidfd::open(before[0]).unwrap();
    let traffic = Traffic::start(GenConfig {
        concurrency: 100,
        data_packets: 20,
        retransmit: Duration::from_millis(500),
        max_retries: 20,
        time_limit: Duration::from_secs(120),
        ..web(&inst)
    });
    wait_new_conns(&app, &region, &[0], 300);
    wait_new_conns(&app, &region, &[1], 300);

    // Switch 0 stops, busy with traffic: most likely inside a burst.
    stalled.signal(libc::SIGSTOP).unwrap();
    let g0 = region.generation(shm_layout::Table::Config);
    // Two publications: the second needs the slot switch 0 read last.
    for w in [[3, 2, 1], [2, 3, 1]] {
        let before = app.reload_with(&config(&inst, w));
        app.wait_generation_above(before, Duration::from_secs(20));
    }
    assert_eq!(region.generation(shm_layout::Table::Config), g0 + 2);
    // What a stopped process would do next: carry on with its burst.
    let continued = stalled.signal(libc::SIGCONT).is_ok();

    // The supervisor restarts switch 0 and traffic flows through it again.
    let restarted = wait_restarted(&app, &region, 0, before[0], || {
        let torn = counter_sum(&shmdump_json(&inst, &[]), "torn_bursts");
        format!("torn bursts {torn}")
    });
    wait_new_conns(&app, &region, &[0], new_conns(&region, &[0]) + 300);
    let rep = traffic.stop();
    // Frames queued at switch 0 while it was stopped are answered after its
    // restart next to their retransmissions: late duplicates may then meet
    // a flow that has finished (unexpected frames), nothing worse.
    assert_eq!(
        (rep.flows_failed, rep.bad_frames, rep.flows_completed),
        (0, 0, rep.flows_started),
        "{rep:#?}"
    );
    assert_eq!(
        rep.affinity_violations, 0,
        "every connection kept its backend: {rep:#?}"
    );

    assert!(
        !continued,
        "the stopped switch was still there to continue:\n{}",
        app.log()
    );
    let dump = shmdump_json(&inst, &[]);
    assert_eq!(counter_sum(&dump, "torn_bursts"), 0);
    let sw0 = &dump["switches"][0];
    assert_eq!(sw0["fenced"], 1, "{sw0:#}");
    assert_eq!(sw0["restarts"], 1, "{sw0:#}");
    assert_eq!(sw0["pid"].as_u64().unwrap() as u32, restarted);
    assert_eq!(dump["switches"][1]["fenced"], 0);
    assert_eq!(
        dump["switches"][1]["pid"].as_u64().unwrap() as u32,
        before[1]
    );
    let excluded = |t: &str| dump[t]["excluded_switches_total"].as_u64().unwrap();
    assert_eq!(excluded("config") + excluded("routing"), 1, "{dump:#}");
    assert_eq!(dump["config"]["refused_publications_total"], 0);
    let log = app.log();
    let line = format!(
        "switch 0 (pid {}) did not acknowledge configuration generation",
        before[0]
    );
    let fenced = log
        .lines()
        .find(|l| l.contains(&line))
        .unwrap_or_else(|| panic!("no line {line:?} in\n{log}"));
    assert!(fenced.ends_with("excluded and fenced"), "{fenced}");
    let killed = format!("switch 0 (pid {}) fenced: killed, gone after", before[0]);
    assert!(log.contains(&killed), "no line {killed:?} in\n{log}");
    drop(app);
}
