//! A reload that changes `instance` or any `[[port]]` (added, removed,
//! changed) is refused as docs/OPERATIONS.md says ("needs a restart": the
//! region and the NICs are shaped by them): lbctl reports the exact
//! reason, the running generation stays, and the running configuration
//! still forwards; the file restored, a reload publishes again.

use std::process::Command;
use std::time::Duration;

use shm_layout::Table;
use switchyard_tests::{Appliance, Cfg, bin, render, unique};
use tools::traffic::{GenConfig, Generator};

/// A port no switch polls: it can be removed or changed by a reload test.
const SPARE: &str =
    "[[port]]\nname = \"spare\"\ndriver = \"vnic\"\nmac = \"02:00:00:00:00:03\"\n\n";

/// `lbctl --instance INST reload`: exit code, stdout, stderr.
fn reload(inst: &str) -> (i32, String, String) {
    let out = Command::new(bin("lbctl"))
        .args(["--instance", inst, "reload"])
        .output()
        .expect("run lbctl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn traffic(inst: &str, flows: u64, seed: u64) {
    let rep = Generator::new(GenConfig {
        instance: inst.to_string(),
        services: vec!["web".into(), "dns".into()],
        flows,
        concurrency: 32,
        data_packets: 2,
        seed,
        time_limit: Duration::from_secs(120),
        ..GenConfig::default()
    })
    .unwrap()
    .run();
    assert!(rep.clean(), "{rep:#?}");
    assert_eq!(rep.flows_completed, flows, "{rep:#?}");
}

#[test]
fn a_reload_changing_instance_or_a_port_is_refused_and_the_running_generation_forwards() {
    let inst = unique("rstonly");
    let base = render(&inst, &Cfg::default());
    // The spare port goes after the two the switches poll.
    let at = base.find("[[switch]]").expect("a switch");
    let good = format!("{}{SPARE}{}", &base[..at], &base[at..]);
    let app = Appliance::start(&inst, &good);
    let region = app.region();
    let generation = region.generation(Table::Config);
    traffic(&inst, 200, 1);

    let other_instance = good.replacen(
        &format!("instance = \"{inst}\""),
        &format!("instance = \"{inst}-b\""),
        1,
    );
    let added = good.replacen(
        SPARE,
        &format!(
            "{SPARE}[[port]]\nname = \"extra\"\ndriver = \"vnic\"\nmac = \"02:00:00:00:00:04\"\n\n"
        ),
        1,
    );
    let removed = good.replacen(SPARE, "", 1);
    let changed_mac = good.replacen("02:00:00:00:00:03", "02:00:00:00:00:05", 1);
    let changed_ring = good.replacen(
        "name = \"client\"\ndriver = \"vnic\"\n",
        "name = \"client\"\ndriver = \"vnic\"\nring_size = 512\n",
        1,
    );
    let both = other_instance.replacen(SPARE, "", 1);
    for (what, text, sections) in [
        ("instance", &other_instance, "[instance]"),
        ("a port added", &added, "[port]"),
        ("a port removed", &removed, "[port]"),
        ("a port's mac", &changed_mac, "[port]"),
        ("a port's ring_size", &changed_ring, "[port]"),
        ("instance and a port", &both, "[instance], [port]"),
    ] {
        assert_ne!(text, &good, "{what}: the edit applies");
        std::fs::write(&app.config_path, text).unwrap();
        let (code, stdout, stderr) = reload(&inst);
        assert_eq!(
            (code, stdout.as_str(), stderr.as_str()),
            (
                1,
                "",
                format!(
                    "lbctl: reload refused, running configuration (generation {generation}) kept: {sections} changed, which needs a restart\n"
                )
                .as_str()
            ),
            "{what}"
        );
        assert_eq!(region.generation(Table::Config), generation, "{what}");
        assert_eq!(region.generation(Table::Routing), generation, "{what}");
    }
    assert_eq!(
        app.log()
            .lines()
            .filter(|l| l.contains("changed, which needs a restart"))
            .count(),
        6,
        "each refusal is logged:\n{}",
        app.log()
    );
    // The running configuration forwards as before.
    traffic(&inst, 200, 2);
    // The file restored, a reload publishes the next generation.
    std::fs::write(&app.config_path, &good).unwrap();
    let (code, stdout, stderr) = reload(&inst);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert_eq!(region.generation(Table::Config), generation + 1);
    traffic(&inst, 200, 3);
    drop(app);
}
