//! 100 reloads while traffic flows: weights change, backends come and go;
//! no frame of an established connection is dropped or misrouted, every
//! switch acknowledges every generation, and no switch sees a torn slot.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use shm_layout::Table;
use switchyard_tests::{Appliance, B, Cfg, counter_sum, render, shmdump_json, unique};
use tools::traffic::{GenConfig, Generator};

fn variant(i: usize) -> Cfg {
    let all = [
        B {
            name: "web1",
            last_octet: 1,
            weight: 1,
        },
        B {
            name: "web2",
            last_octet: 2,
            weight: 2,
        },
        B {
            name: "web3",
            last_octet: 3,
            weight: 3,
        },
        B {
            name: "web4",
            last_octet: 4,
            weight: 1,
        },
        B {
            name: "web5",
            last_octet: 5,
            weight: 5,
        },
    ];
    // Rotate which backends are present and their weights.
    let mut web: Vec<B> = all
        .iter()
        .enumerate()
        .filter(|(k, _)| !(i + k).is_multiple_of(5))
        .map(|(k, b)| B {
            weight: 1 + ((i + k) % 4) as u32,
            ..b.clone()
        })
        .collect();
    if i % 7 == 3 {
        web.truncate(2);
    }
    Cfg {
        switches: 2,
        web,
        dns: vec![
            B {
                name: "dns1",
                last_octet: 1,
                weight: 1 + (i % 3) as u32,
            },
            B {
                name: "dns2",
                last_octet: 2,
                weight: 1,
            },
        ],
        ..Cfg::default()
    }
}

#[test]
fn hundred_reloads_under_traffic_lose_and_misroute_nothing() {
    let inst = unique("reload");
    let app = Appliance::start(&inst, &render(&inst, &variant(0)));
    let stop = Arc::new(AtomicBool::new(false));
    let gen_cfg = GenConfig {
        instance: inst.clone(),
        services: vec!["web".into(), "dns".into()],
        // Bounded below the table's 262144 connections even on a fast machine.
        flows: 150_000,
        concurrency: 128,
        data_packets: 8,
        retransmit: Duration::from_secs(1),
        max_retries: 5,
        time_limit: Duration::from_secs(300),
        stop: Some(stop.clone()),
        ..GenConfig::default()
    };
    let generator = Generator::new(gen_cfg).unwrap();
    let traffic = std::thread::spawn(move || generator.run());
    let region = app.region();
    let n_switches = region.caps().switches as usize;
    for i in 1..=100 {
        let before = app.reload_with(&render(&inst, &variant(i)));
        let g = app.wait_generation_above(before, Duration::from_secs(20));
        assert_eq!(g, before + 1, "reload {i} published exactly one generation");
        // Every switch acknowledges this generation.
        let deadline = Instant::now() + Duration::from_secs(20);
        while !region.switch_slots()[..n_switches]
            .iter()
            .all(|s| s.seen_config.load(Ordering::Acquire) >= g)
        {
            assert!(
                Instant::now() < deadline,
                "generation {g} not acknowledged by every switch"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    stop.store(true, Ordering::Relaxed);
    let rep = traffic.join().unwrap();
    assert!(
        rep.flows_completed > 1000,
        "traffic flowed during the reloads: {rep:#?}"
    );
    assert!(rep.clean(), "{rep:#?}");
    assert_eq!(rep.retransmits, 0, "no frame was dropped: {rep:#?}");
    assert_eq!(rep.affinity_violations, 0);
    assert_eq!(region.generation(Table::Config), 101);
    let dump = shmdump_json(&inst, &[]);
    assert_eq!(counter_sum(&dump, "torn_bursts"), 0);
    assert_eq!(dump["config"]["excluded_switches_total"], 0);
    assert_eq!(dump["config"]["checksum_ok"], true);
    for c in [
        "drop_malformed",
        "drop_no_route",
        "drop_no_neighbour",
        "drop_tx_full",
        "drop_table_full",
        "drop_not_ours",
    ] {
        assert_eq!(counter_sum(&dump, c), 0, "{c}");
    }
    // The last reload took effect: new flows follow its weights, and the
    // backend it removed gets none.
    final_config_decides_new_flows(&inst, &variant(100));
    drop(app);
}

/// Runs 20,000 fresh flows per service and checks each backend's share of
/// them against `cfg`'s weights (Maglev: within 2 points), and that no
/// flow reached a backend `cfg` does not list.
fn final_config_decides_new_flows(inst: &str, cfg: &Cfg) {
    for (svc, backends, port) in [("web", &cfg.web, 8080), ("dns", &cfg.dns, 5353)] {
        let rep = Generator::new(GenConfig {
            instance: inst.to_string(),
            services: vec![svc.into()],
            flows: 20_000,
            concurrency: 128,
            // Clients unlike the reload phase's, so no old entry is reused.
            seed: 7,
            ..GenConfig::default()
        })
        .unwrap()
        .run();
        assert!(rep.clean(), "{svc}: {rep:#?}");
        let split = &rep.per_backend[svc];
        let total: u64 = split.values().sum();
        assert_eq!(total, 20_000, "{svc}: {split:?}");
        let wsum: u32 = backends.iter().map(|b| b.weight).sum();
        let mut listed = 0;
        for b in backends.iter() {
            let key = format!("198.19.1.{}:{port}", b.last_octet);
            let share = split.get(&key).copied().unwrap_or(0) as f64 / total as f64 * 100.0;
            let want = f64::from(b.weight) / f64::from(wsum) * 100.0;
            assert!(
                (share - want).abs() <= 2.0,
                "{svc} {key} ({}): {share:.2}% vs weight's {want:.2}% ({split:?})",
                b.name
            );
            listed += split.get(&key).copied().unwrap_or(0);
        }
        assert_eq!(
            listed, total,
            "{svc}: a flow reached an unlisted backend: {split:?}"
        );
    }
}
