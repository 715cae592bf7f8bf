//! Bad input is refused clearly and loses nothing: malformed configurations
//! (at --check and on reload), regions from another build, malformed frames.

use std::process::Command;
use std::time::Duration;

use shm_layout::Table;
use switchyard_tests::{
    Appliance, Cfg, Wire, bin, counter_sum, render, shmdump_json, switch_pids, unique,
};
use tools::frames::{self, Spec, TcpFlags};
use tools::traffic::{GenConfig, Generator};

fn check(config: &str) -> (bool, String) {
    let dir = std::env::temp_dir().join(unique("check"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("c.toml");
    std::fs::write(&path, config).unwrap();
    let out = Command::new(bin("controld"))
        .arg("--config")
        .arg(&path)
        .arg("--check")
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn check_accepts_valid_and_names_the_problem_in_invalid_configs() {
    let inst = unique("chk");
    let good = render(&inst, &Cfg::default());
    let (ok, text) = check(&good);
    assert!(ok, "{text}");
    assert!(text.contains("OK"), "{text}");

    let (ok, text) = check(&good.replace("weight = 3", "weight = 70000"));
    assert!(!ok);
    assert!(
        text.contains("web3") && text.contains("70000") && text.contains("65535"),
        "{text}"
    );

    let (ok, text) = check(&good.replace("[[route]]", "[[route]]\ncolour = \"blue\""));
    assert!(!ok);
    assert!(text.contains("colour"), "{text}");

    let (ok, text) =
        check(&good.replace("mac = \"02:00:00:00:00:02\"", "mac = \"02:00:zz:00:00:02\""));
    assert!(!ok);
    assert!(text.contains("02:00:zz:00:00:02"), "{text}");

    let (ok, text) = check(&good.replace("cpu = 0", "cpu = 4096"));
    assert!(!ok);
    assert!(text.contains("cpu") && text.contains("4096"), "{text}");
}

#[test]
fn invalid_reload_keeps_the_running_configuration() {
    let inst = unique("badrl");
    let good = render(&inst, &Cfg::default());
    let app = Appliance::start(&inst, &good);
    let region = app.region();
    let before = region.generation(Table::Config);
    app.reload_with(&good.replace("weight = 2", "weight = -2"));
    // controld handles SIGHUP within one loop tick; give it many.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !app.log().contains("reload refused") {
        assert!(
            std::time::Instant::now() < deadline,
            "no refusal logged:\n{}",
            app.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        region.generation(Table::Config),
        before,
        "invalid file never replaces the running config"
    );
    assert!(app.log().contains("weight"), "{}", app.log());
    // A restart-only change is refused too.
    app.reload_with(&good.replace("connections = 262144", "connections = 524288"));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while app.log().matches("reload refused").count() < 2 {
        assert!(std::time::Instant::now() < deadline, "{}", app.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(region.generation(Table::Config), before);
    // The appliance still forwards.
    let rep = Generator::new(GenConfig {
        instance: inst.clone(),
        services: vec!["web".into()],
        flows: 300,
        ..GenConfig::default()
    })
    .unwrap()
    .run();
    assert!(rep.clean(), "{rep:#?}");
    drop(app);
}

#[test]
fn region_with_another_fingerprint_is_refused_by_switchd_and_shmdump() {
    let inst = unique("fp");
    let caps = shm_layout::Capacities {
        conn_slots: 1024,
        services: 2,
        backends: 4,
        backend_ids: 16,
        maglev_m: 251,
        switches: 1,
        ..Default::default()
    };
    let region = shm_layout::Region::create(&inst, caps).unwrap();
    let path = format!("/dev/shm/{}", region.name());
    struct Rm(String);
    impl Drop for Rm {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let _rm = Rm(path.clone());
    // Rewrite the fingerprint (bytes 16..24 of the header) as another build would have.
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[16..24].copy_from_slice(&0xdead_beef_0000_0001u64.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let ours = format!("{:#018x}", shm_layout::FINGERPRINT);

    let out = Command::new(bin("switchd"))
        .args(["--instance", &inst, "--switch", "0", "--vnic", "none"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("0xdeadbeef00000001") && err.contains(&ours),
        "{err}"
    );

    let out = Command::new(bin("shmdump"))
        .args(["--instance", &inst])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        err.contains("0xdeadbeef00000001") && err.contains(&ours),
        "{err}"
    );
}

const GW: [u8; 6] = [2, 0, 0, 0, 2, 1];
const PORT: [u8; 6] = [2, 0, 0, 0, 0, 1];

fn good_syn(port: u16) -> Vec<u8> {
    let mut v = Vec::new();
    frames::build(
        &Spec {
            src_mac: GW,
            dst_mac: PORT,
            src: ([198, 18, 100, 3], port),
            dst: ([198, 18, 0, 10], 80),
            tcp: Some(TcpFlags {
                syn: true,
                seq: 9,
                ..Default::default()
            }),
            ttl: 64,
            ident: 0,
            payload_len: 0,
        },
        &mut v,
    );
    v
}

fn fix_ip_checksum(f: &mut [u8]) {
    let ihl = ((f[14] & 0xf) as usize * 4).min(f.len() - 14);
    f[24] = 0;
    f[25] = 0;
    let mut sum = 0u32;
    for c in f[14..14 + ihl].chunks(2) {
        sum += u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let c = !(sum as u16);
    f[24..26].copy_from_slice(&c.to_be_bytes());
}

#[test]
fn malformed_frames_are_dropped_and_counted_never_a_crash() {
    let inst = unique("malf");
    let app = Appliance::start(&inst, &render(&inst, &Cfg::default()));
    let pids = switch_pids(&app.region());
    let mut wire = Wire::attach(&inst);
    let base = good_syn(41_000);
    let mut bad: Vec<(&str, Vec<u8>)> = Vec::new();
    bad.push(("truncated ethernet", base[..10].to_vec()));
    bad.push(("truncated ipv4", base[..14 + 12].to_vec()));
    let mut f = base.clone();
    f[14] = 0x44; // IHL 4
    fix_ip_checksum(&mut f);
    bad.push(("ihl 4", f));
    let mut f = base.clone();
    f[14] = 0x4f; // IHL 15 > packet
    bad.push(("ihl 15", f));
    let mut f = base.clone();
    f[16..18].copy_from_slice(&1500u16.to_be_bytes()); // total length lies (too long)
    fix_ip_checksum(&mut f);
    bad.push(("total length too long", f));
    let mut f = base.clone();
    f[16..18].copy_from_slice(&10u16.to_be_bytes()); // shorter than the header
    fix_ip_checksum(&mut f);
    bad.push(("total length too short", f));
    let mut f = base.clone();
    f[14] = 0x65; // version 6 under the IPv4 ethertype
    fix_ip_checksum(&mut f);
    bad.push(("version 6", f));
    let mut f = base.clone();
    f[24] ^= 0xff; // bad header checksum
    bad.push(("bad checksum", f));
    let mut f = base.clone();
    f[14 + 20 + 12] = 0x40; // TCP data offset 4
    bad.push(("tcp data offset 4", f));
    let mut f = base.clone();
    f[14 + 20 + 12] = 0xf0; // TCP data offset 15 beyond the segment
    bad.push(("tcp data offset 15", f));
    let malformed = bad.len() as u64;
    let mut f = base.clone();
    f[20] = 0x20; // MF set: a fragment
    fix_ip_checksum(&mut f);
    bad.push(("fragment", f));
    for (_, f) in &bad {
        wire.send("client", f);
    }
    let other = wire.settle(0);
    assert!(other.is_empty(), "nothing forwarded: {other:?}");
    let dump = shmdump_json(&inst, &[]);
    assert_eq!(counter_sum(&dump, "drop_malformed"), malformed);
    assert_eq!(counter_sum(&dump, "drop_fragment"), 1);
    assert_eq!(switch_pids(&app.region()), pids, "no switch crashed");
    assert_eq!(dump["switches"][0]["restarts"], 0);
    // And the switch still forwards a good frame.
    wire.send("client", &good_syn(41_001));
    let got = wire.recv(1, Duration::from_secs(5));
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0, "backend");
    drop(app);
}
