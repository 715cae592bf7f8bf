//! Backends' `active` counts against the connection table when switches
//! are killed with SIGKILL under max_conns-limited traffic: whatever a
//! killed switch held in flight, once traffic stops and the table empties
//! every backend's `active` is back to 0 (the GC releases what it retires
//! and reclaims, and its reconciliation takes back reservations no entry
//! holds). Every wait is bounded; nothing asserts a duration.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use controld::supervisor::{RESTART_LIMIT, RESTART_WINDOW};
use shm_layout::Region;
use shm_layout::conntrack::STATE_CLOSING;

use switchyard_tests::churn::{
    Traffic, kill_switch, new_conns, wait_new_conns, wait_restarted, web,
};
use switchyard_tests::{Appliance, Cfg, render, shmdump_json, unique};
use tools::traffic::GenConfig;

/// Per backend id, its `active` count and its open forward entries.
fn counts(region: &Region, ids: &[u32]) -> BTreeMap<u32, (u32, u32)> {
    // The slots' TCP states are read through the writable table's API.
    let rw = Region::attach_name(region.name(), shm_layout::Access::ReadWrite).unwrap();
    let ct = rw.conntrack();
    let mut table = BTreeMap::<u32, u32>::new();
    for idx in 0..ct.capacity() as u32 {
        if let Some(c) = ct.snapshot(idx).and_then(|s| s.conn())
            && ct.slot(idx).tcp_state.load(Ordering::Relaxed) != STATE_CLOSING
        {
            *table.entry(c.backend_id).or_insert(0) += 1;
        }
    }
    ids.iter()
        .map(|&id| {
            let active = region.backend_counters()[id as usize]
                .active
                .load(Ordering::Relaxed);
            (id, (active, table.get(&id).copied().unwrap_or(0)))
        })
        .collect()
}

#[test]
fn killed_switches_leave_no_reservation_behind() {
    let inst = unique("reconcile");
    // A small table: a GC sweep round is a fraction of a second.
    let cfg = Cfg {
        switches: 2,
        dns: vec![],
        connections: 1 << 12,
        ..Cfg::default()
    };
    // Connections a killed switch's flows left open idle out in seconds,
    // so stuck entries do not keep the backends full.
    let mut text = render(&inst, &cfg)
        .replace(
            "tcp_fin = 2\n",
            "tcp_fin = 2\ntcp_syn = 3\ntcp_established = 4\n",
        )
        .replace(
            "scheduler = \"maglev\"\n",
            "scheduler = \"wlc\"\nqueue_timeout_ms = 0\n",
        );
    for name in ["web1", "web2", "web3"] {
        let at = format!("  name = \"{name}\"\n");
        text = text.replacen(&at, &format!("{at}  max_conns = 8\n"), 1);
    }
    let app = Appliance::start(&inst, &text);
    let region = app.region();
    let dump = shmdump_json(&inst, &[]);
    let ids: Vec<u32> = dump["config"]["services"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_u64().unwrap() as u32)
        .collect();
    assert_eq!(ids.len(), 3);
    let traffic = Traffic::start(GenConfig {
        // Three times what the backends take: SYNs keep meeting full
        // backends, and every switch is always inside a new connection.
        concurrency: 72,
        data_packets: 3,
        retransmit: Duration::from_millis(100),
        max_retries: 5,
        time_limit: Duration::from_secs(120),
        ..web(&inst)
    });
    // Each switch is killed at most once per `spacing`: more often, and
    // the supervisor's crash-loop limit (RESTART_LIMIT restarts within
    // RESTART_WINDOW) would rightly give up on it.
    let spacing = RESTART_WINDOW / RESTART_LIMIT as u32 + Duration::from_millis(500);
    let mut last_kill = [None::<Instant>; 2];
    for kill in 0..20usize {
        // Let connections come and go (a fresh switch counts from 0).
        wait_new_conns(&app, &region, &[0, 1], new_conns(&region, &[0, 1]) + 300);
        let sw = kill % 2;
        if let Some(t) = last_kill[sw] {
            std::thread::sleep((t + spacing).saturating_duration_since(Instant::now()));
        }
        last_kill[sw] = Some(Instant::now());
        let before = kill_switch(&region, sw);
        wait_restarted(&app, &region, sw, before, String::new);
    }
    let rep = traffic.stop();
    assert!(rep.flows_completed > 0, "{rep:#?}");
    // Traffic has stopped: the entries idle out (seconds) and the GC
    // retires them; a reservation nothing in the table holds any more is
    // taken back within a few sweep rounds. Then every count is 0.
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut seen = counts(&region, &ids);
    while seen.values().any(|&c| c != (0, 0)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        seen = counts(&region, &ids);
    }
    let reconciled: Vec<(u64, u64)> = ids
        .iter()
        .map(|&id| {
            let c = &region.backend_counters()[id as usize];
            (
                c.reconciled_down.load(Ordering::Relaxed),
                c.reconciled_up.load(Ordering::Relaxed),
            )
        })
        .collect();
    eprintln!(
        "per backend (active, open entries): {seen:?}; reconciled (down, up): {reconciled:?}"
    );
    for (id, (active, table)) in &seen {
        assert_eq!(
            active,
            table,
            "backend {id}: active count vs open entries in the table ({seen:?})\n{}",
            app.log()
        );
    }
    drop(app);
}
