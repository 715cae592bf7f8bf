//! `lbgen bench --quick` still works: it starts its appliances, moves
//! frames in every scenario and reports the documented JSON keys. (Rates are
//! not asserted: timing belongs to the benchmark, not to tests.)

use switchyard_tests::bin;

/// Runs a benchmark command to its end and parses its JSON lines.
fn bench_rows(program: &str, args: &[&str]) -> Vec<serde_json::Value> {
    let out = std::process::Command::new(program)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn lbgen_bench_quick_reports_every_scenario() {
    // The host's /dev/shm, where a leftover would show.
    let rows = bench_rows(
        &bin("lbgen").to_string_lossy(),
        &["bench", "--quick", "--json", "--pages", "host"],
    );
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["frame_bytes"], 64);
    assert_eq!(rows[1]["frame_bytes"], 1500);
    for r in &rows {
        for k in [
            "ceiling_mpps",
            "established_mpps",
            "new_flow_mpps",
            "mix_mpps",
            "full_queue_mpps",
            "ratio_to_ceiling",
            "full_queue_to_established",
        ] {
            assert!(r[k].as_f64().unwrap() > 0.0, "{k} moved no frame: {r}");
        }
        assert_eq!(r["runs"], 1);
        assert_eq!(r["flows"], 512, "--quick's flows");
        assert!(r["region_huge_pages"].is_boolean(), "{r}");
    }
    let left: Vec<String> = std::fs::read_dir("/dev/shm")
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("switchyard.bench-"))
        .collect();
    assert!(left.is_empty(), "bench left {left:?}");
}

/// By default `lbgen bench` runs in a private mount namespace whose
/// /dev/shm grants huge pages to mappings that ask (as production mounts
/// it): every measurement's region is on them (the mappings' advice works
/// end to end), and the host's mounts are left as they were.
#[test]
fn bench_on_huge_pages_gets_them_without_touching_the_host() {
    let mounts = || std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let before = mounts();
    let rows = bench_rows(
        &bin("lbgen").to_string_lossy(),
        &[
            "bench", "--quick", "--json", "--frames", "64", "--flows", "100",
        ],
    );
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["flows"], 100);
    assert_eq!(rows[0]["region_huge_pages"], true, "{}", rows[0]);
    assert!(rows[0]["established_mpps"].as_f64().unwrap() > 0.0);
    assert_eq!(mounts(), before, "the host's mounts changed");
}
