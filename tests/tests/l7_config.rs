//! Layer 7 before its switch side exists: `controld --check` accepts a
//! file with an l7 service, and controld refuses to run it, with an
//! exact error, before it creates anything.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use switchyard_tests::{Cfg, bin, render, unique};

/// The test bed's configuration with service "web" in mode "l7" (two
/// pools, rules) and an `[l7]` table.
fn l7_config(instance: &str) -> String {
    let cfg = Cfg {
        dns: Vec::new(),
        ..Cfg::default()
    };
    render(instance, &cfg)
        .replace(
            "protocol = \"tcp\"\nmode = \"nat\"\nscheduler = \"maglev\"\n",
            "protocol = \"tcp\"\nmode = \"l7\"\ndefault_pool = \"rest\"\n  [[service.pool]]\n  name = \"api\"\n  [[service.pool]]\n  name = \"rest\"\n  scheduler = \"wlc\"\n  [[service.rule]]\n  host = \"*.example.com\"\n  path_prefix = \"/api/\"\n  pool = \"api\"\n",
        )
        .replace("  weight = 1\n", "  weight = 1\n  pool = \"api\"\n")
        .replace("  weight = 2\n", "  weight = 2\n  pool = \"rest\"\n")
        .replace("  weight = 3\n", "  weight = 3\n  pool = \"rest\"\n")
        .replace("[publish]", "[l7]\nsource = \"198.18.0.200\"\n\n[publish]")
}

#[test]
fn check_accepts_an_l7_service_and_a_start_refuses_it() {
    let inst = unique("l7");
    let dir = std::env::temp_dir().join(&inst);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("c.toml");
    let text = l7_config(&inst);
    assert!(text.contains("mode = \"l7\""), "{text}");
    assert_eq!(text.matches("  pool = \"").count(), 4, "{text}");
    std::fs::write(&path, &text).unwrap();
    let run = |check: bool| {
        let mut c = Command::new(bin("controld"));
        c.arg("--config").arg(&path).env("RUST_LOG", "error");
        if check {
            c.arg("--check");
        } else {
            c.arg("--switchd").arg(bin("switchd"));
        }
        // A controld that does not refuse runs until stopped: wait 20 s
        // at most, then stop it (SIGTERM: it removes what it created).
        let mut child = c
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let start = Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if start.elapsed() > Duration::from_secs(20) {
                // SAFETY: kill(2) has no memory-safety preconditions; the pid is
                // our own child, not yet reaped.
                unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
                break child.wait().unwrap();
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut text = String::new();
        child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut text)
            .unwrap();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut text)
            .unwrap();
        (status.code(), text)
    };
    let (code, out) = run(true);
    assert_eq!(
        (code, out),
        (
            Some(0),
            format!(
                "{}: OK (1 services, 3 backends, 1 switches, 2 ports)\n",
                path.display()
            )
        )
    );
    let (code, out) = run(false);
    let region = std::path::Path::new("/dev/shm").join(format!("switchyard.{inst}"));
    let left = region.exists();
    let _ = std::fs::remove_file(&region);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(
        (code, out),
        (
            Some(1),
            format!(
                "controld: {}: service \"web\": mode \"l7\" cannot run yet: the switch side of layer 7 (handshake offload, request buffering, splice) is not built; `controld --check` validates the file\n",
                path.display()
            )
        )
    );
    assert!(!left, "a refused start created the region");
}
