//! controld's own shutdown: SIGTERM stops the switches and removes the
//! region, the vnics and the admin socket (the test harness checks that
//! after every test; here it is shown to see what is left), and a controld
//! that gives up after starting its switches stops them too.

use std::process::Command;
use switchyard_tests::{Appliance, Cfg, bin, render, unique};

/// A stopped appliance leaves nothing; the harness's check names what is
/// left when something is (a file under the instance's name).
#[test]
fn sigterm_leaves_nothing_and_the_harness_names_a_leftover() {
    let inst = unique("sigterm");
    let cfg = Cfg {
        switches: 2,
        ..Cfg::default()
    };
    let mut app = Appliance::start(&inst, &render(&inst, &cfg));
    // Running, the check sees the instance: its switches and its region.
    let running = app.leftovers();
    assert_eq!(
        running.iter().filter(|l| l.starts_with("process ")).count(),
        2,
        "{running:?}"
    );
    assert!(
        running.contains(&format!("file /dev/shm/switchyard.{inst}")),
        "{running:?}"
    );
    assert_eq!(app.shut_down(), Ok(()));
    assert_eq!(app.leftovers(), Vec::<String>::new());

    let inst = unique("sigterm");
    let mut app = Appliance::start(&inst, &render(&inst, &cfg));
    let stray = format!("/dev/shm/switchyard.{inst}.stray");
    std::fs::write(&stray, b"").unwrap();
    let e = app.shut_down().unwrap_err();
    assert_eq!(
        e,
        format!("controld's SIGTERM shutdown of instance {inst} left: file {stray}")
    );
    assert!(
        !std::path::Path::new(&stray).exists(),
        "cleaned up after the check"
    );
}

/// A controld that fails after it started its switches (here: its pid file
/// cannot be written) exits 1 and stops them: no switch of the instance
/// runs on, and nothing of the instance is left.
#[test]
fn controld_that_gives_up_after_starting_its_switches_stops_them() {
    let inst = unique("giveup");
    let dir = std::env::temp_dir().join(format!("switchyard-giveup-{inst}"));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("switchyard.toml");
    std::fs::write(
        &config,
        render(
            &inst,
            &Cfg {
                switches: 2,
                ..Cfg::default()
            },
        ),
    )
    .unwrap();
    // A "switchd" that runs until killed, whatever becomes of the region
    // (a real one may not have attached yet when controld gives up, and
    // exit on its own); its output goes nowhere, so no pipe waits on it.
    let switchd = dir.join("switchd");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(
            &switchd,
            "#!/bin/sh\nexec >/dev/null 2>&1\nwhile :; do sleep 1; done\n",
        )
        .unwrap();
        std::fs::set_permissions(&switchd, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let out = Command::new(bin("controld"))
        .arg("--config")
        .arg(&config)
        .arg("--switchd")
        .arg(&switchd)
        .arg("--pidfile")
        .arg(dir.join("no-such-dir/controld.pid"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    // Whatever is left, found now and removed before any assertion.
    let switches = instance_processes(&inst);
    for &pid in &switches {
        // SAFETY: kill(2) on a process started with this test's instance.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
    let files: Vec<String> = std::fs::read_dir("/dev/shm")
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with(&format!("switchyard.{inst}")))
        .collect();
    for f in &files {
        let _ = std::fs::remove_file(format!("/dev/shm/{f}"));
    }
    let socket = stderr
        .lines()
        .find_map(|l| {
            l.split_once("] admin socket ")
                .map(|(_, p)| p.trim().to_string())
        })
        .expect("controld names its admin socket");
    let socket_left = std::path::Path::new(&socket).exists();
    let _ = std::fs::remove_file(&socket);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("switch 0 (sw0) started") && stderr.contains("writing pid file"),
        "{stderr}"
    );
    assert_eq!(
        switches,
        Vec::<u32>::new(),
        "switches left running:\n{stderr}"
    );
    assert_eq!(files, Vec::<String>::new(), "{stderr}");
    assert!(!socket_left, "{stderr}");
}

/// Pids of processes started with `--instance INST`.
fn instance_processes(inst: &str) -> Vec<u32> {
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmd.split(|&b| b == 0).collect();
        if args
            .windows(2)
            .any(|w| w[0] == b"--instance" && w[1] == inst.as_bytes())
        {
            v.push(pid);
        }
    }
    v
}
