//! The supervisor as docs/OPERATIONS.md promises it, against real
//! processes: a switch whose heartbeat stalls (SIGSTOP) is killed and
//! restarted; one that keeps dying is restarted `RESTART_LIMIT` times within
//! `RESTART_WINDOW`, then marked failed and left alone; a start that fails
//! (no program) is retried after `START_RETRY` and counts against the same
//! limit. Every wait is bounded and waits on a condition; the only
//! durations asserted are lower bounds the code promises.

use std::path::PathBuf;
use std::time::{Duration, Instant};

// The values docs/OPERATIONS.md promises (not controld's constants: a
// changed constant must fail here too).
const STALL_LIMIT: Duration = Duration::from_secs(3);
const RESTART_LIMIT: usize = 5;
const RESTART_WINDOW: Duration = Duration::from_secs(10);
const START_RETRY: Duration = Duration::from_secs(1);
use serde_json::Value;
use switchyard_tests::churn::{kill_switch, wait_restarted};
use switchyard_tests::{
    Appliance, Cfg, Wire, bin, render, shmdump_json, switch_pids, unique, wait_for,
};

/// A private copy of switchd that a test may replace or remove (controld
/// runs it with `--switchd`); removed on drop.
struct SwitchdCopy {
    dir: PathBuf,
}

impl SwitchdCopy {
    fn new(inst: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("switchyard-sup-{inst}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(bin("switchd"), dir.join("switchd")).unwrap();
        Self { dir }
    }

    fn path(&self) -> PathBuf {
        self.dir.join("switchd")
    }

    /// Replaces the program with a shell script (renamed over it: the
    /// running switches keep the old file).
    fn replace_with_script(&self, body: &str) {
        use std::os::unix::fs::PermissionsExt;
        let tmp = self.dir.join("switchd.new");
        std::fs::write(&tmp, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::rename(&tmp, self.path()).unwrap();
    }
}

impl Drop for SwitchdCopy {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start_with_copy(inst: &str, switches: usize, copy: &SwitchdCopy) -> Appliance {
    let cfg = Cfg {
        switches,
        ..Cfg::default()
    };
    Appliance::start_with_args(
        None,
        inst,
        &render(inst, &cfg),
        &[std::ffi::OsStr::new("--switchd"), copy.path().as_os_str()],
    )
}

fn switch(dump: &Value, i: usize) -> &Value {
    &dump["switches"][i]
}

/// Lines of controld's log that contain `what`.
fn lines_with(log: &str, what: &str) -> usize {
    log.lines().filter(|l| l.contains(what)).count()
}

/// Waits (at most 60 s) until switch `i` is marked failed; the dump then.
fn wait_failed(app: &Appliance, inst: &str, i: usize) -> Value {
    wait_for(Duration::from_secs(60), || {
        let d = shmdump_json(inst, &[]);
        if switch(&d, i)["state"] == "failed" {
            Ok(d)
        } else {
            Err(format!("switch {i}: {:#}\n{}", switch(&d, i), app.log()))
        }
    })
}

/// Proves the supervisor had its chance to act after the switch was marked
/// failed: two reloads are published (the main loop polls the supervisor
/// on every turn, between them).
fn two_reloads(app: &Appliance) {
    let text = std::fs::read_to_string(&app.config_path).unwrap();
    app.reload_and_wait(&text);
    app.reload_and_wait(&text);
}

/// A stopped switch (SIGSTOP: alive, but its heartbeat stands still) is
/// killed once its heartbeat is older than STALL_LIMIT, reaped, and started
/// anew: a new pid forwards, `restarts` is 1, the log names the stall; the
/// other switch is untouched.
#[test]
fn a_stopped_switch_is_killed_for_its_stalled_heartbeat_and_restarted() {
    let inst = unique("stall");
    let cfg = Cfg {
        switches: 2,
        ..Cfg::default()
    };
    let app = Appliance::start(&inst, &render(&inst, &cfg));
    let region = app.region();
    let before = switch_pids(&region);
    // SAFETY: kill(2) on the switchd pid the region names.
    assert_eq!(unsafe { libc::kill(before[0] as i32, libc::SIGSTOP) }, 0);
    let new = wait_restarted(&app, &region, 0, before[0], || {
        "a stopped switch was not replaced".into()
    });
    assert!(
        !shm_layout::time::pid_alive(before[0]),
        "the stopped switch is gone"
    );
    let log = app.log();
    let killing = format!("switch 0 (pid {}) heartbeat is ", before[0]);
    let kills: Vec<&str> = log.lines().filter(|l| l.contains(&killing)).collect();
    assert_eq!(kills.len(), 1, "one kill for the stall:\n{log}");
    // "... heartbeat is 3.1s old: killing it": the age controld measured.
    let age: f64 = kills[0]
        .split_once(&killing)
        .and_then(|(_, rest)| rest.strip_suffix("s old: killing it"))
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("the kill names the heartbeat's age: {}", kills[0]));
    assert!(
        // Printed rounded to 0.1 s: past 3 s prints 3.0 or more.
        age >= STALL_LIMIT.as_secs_f64(),
        "killed only past the limit: {age} s"
    );
    assert_eq!(
        lines_with(
            &log,
            &format!("switch 0 (pid {}) exited: signal: 9 (SIGKILL)", before[0])
        ),
        1,
        "{log}"
    );
    let dump = shmdump_json(&inst, &[]);
    assert_eq!(switch(&dump, 0)["pid"], new);
    assert_eq!(switch(&dump, 0)["restarts"], 1);
    assert_eq!(switch(&dump, 1)["pid"], before[1], "switch 1 untouched");
    assert_eq!(switch(&dump, 1)["restarts"], 0);
    // The new switch runs and forwards: it answers ARP on its port.
    wait_for(Duration::from_secs(20), || {
        let d = shmdump_json(&inst, &[]);
        if switch(&d, 0)["state"] == "running" {
            Ok(())
        } else {
            Err(format!("{:#}", switch(&d, 0)))
        }
    });
    let mut wire = Wire::attach(&inst);
    assert_eq!(wire.settle(0), Vec::new());
    drop(app);
}

/// A switch that dies at once whenever started (its program now exits 1)
/// is restarted RESTART_LIMIT (5) times; down a sixth time within
/// RESTART_WINDOW it is marked failed, logged so, and never started again.
#[test]
fn a_switch_that_keeps_dying_is_restarted_five_times_then_marked_failed() {
    let inst = unique("crashloop");
    let copy = SwitchdCopy::new(&inst);
    let app = start_with_copy(&inst, 2, &copy);
    let region = app.region();
    let other = switch_pids(&region)[1];
    copy.replace_with_script("exit 1");
    let t0 = Instant::now();
    let first = kill_switch(&region, 0);
    let dump = wait_failed(&app, &inst, 0);
    let elapsed = t0.elapsed();
    let restarts = switch(&dump, 0)["restarts"].as_u64().unwrap();
    let log = app.log();
    // Every restart happened after the kill and before the failure was
    // seen: within `elapsed`. Within one window, the limit is exact.
    if elapsed < RESTART_WINDOW {
        assert_eq!(restarts, RESTART_LIMIT as u64, "{log}");
    } else {
        assert!(restarts >= RESTART_LIMIT as u64, "{restarts}\n{log}");
    }
    assert_eq!(
        lines_with(
            &log,
            "switch 0 (sw0) failed: restarted 5 times within 10s and exited again; not restarting it"
        ),
        1,
        "{log}"
    );
    assert_eq!(
        lines_with(
            &log,
            &format!("switch 0 (pid {first}) exited: signal: 9 (SIGKILL)")
        ),
        1,
        "{log}"
    );
    assert_eq!(
        lines_with(&log, "exited: exit status: 1"),
        restarts as usize,
        "each restart exited at once:\n{log}"
    );
    assert_eq!(
        lines_with(&log, "switch 0 (sw0) started: pid "),
        1 + restarts as usize,
        "{log}"
    );
    // It stays failed: controld went on running (two reloads published)
    // and did not start it again.
    two_reloads(&app);
    let log = app.log();
    let dump = shmdump_json(&inst, &[]);
    assert_eq!(switch(&dump, 0)["state"], "failed");
    assert_eq!(switch(&dump, 0)["restarts"], restarts);
    assert_eq!(
        lines_with(&log, "switch 0 (sw0) started: pid "),
        1 + restarts as usize,
        "{log}"
    );
    assert_eq!(switch(&dump, 1)["pid"], other, "switch 1 untouched");
    assert_eq!(switch(&dump, 1)["state"], "running");
    assert_eq!(switch(&dump, 1)["restarts"], 0);
    drop(app);
}

/// A restart that cannot start the program (it is gone) is retried after
/// START_RETRY, and the attempts count against the limit: RESTART_LIMIT
/// failed attempts, then the switch is marked failed. They are attempts,
/// not restarts: `restarts` stays 0. The retries wait: the failure cannot
/// be reached sooner than RESTART_LIMIT retry periods after the kill.
#[test]
fn a_switch_that_cannot_be_started_is_retried_after_a_second_then_marked_failed() {
    let inst = unique("nostart");
    let copy = SwitchdCopy::new(&inst);
    let app = start_with_copy(&inst, 1, &copy);
    let region = app.region();
    std::fs::remove_file(copy.path()).unwrap();
    let t0 = Instant::now();
    kill_switch(&region, 0);
    let dump = wait_failed(&app, &inst, 0);
    let elapsed = t0.elapsed();
    let log = app.log();
    // First attempt at the kill, RESTART_LIMIT - 1 more a retry period
    // apart, and the verdict one period after the last.
    assert!(
        elapsed >= START_RETRY * RESTART_LIMIT as u32,
        "failed after {elapsed:?}: the retries did not wait\n{log}"
    );
    let attempts = lines_with(
        &log,
        &format!(
            "switch 0 (sw0): cannot start {}: No such file or directory (os error 2)",
            copy.path().display()
        ),
    );
    if elapsed < RESTART_WINDOW {
        assert_eq!(attempts, RESTART_LIMIT, "{log}");
    } else {
        assert!(attempts >= RESTART_LIMIT, "{log}");
    }
    assert_eq!(switch(&dump, 0)["restarts"], 0, "{log}");
    assert_eq!(
        lines_with(
            &log,
            "switch 0 (sw0) failed: restarted 5 times within 10s and exited again; not restarting it"
        ),
        1,
        "{log}"
    );
    drop(app);
}

/// A switch that never reports RUNNING (its program sleeps) is killed once
/// its start has taken twice STALL_LIMIT, with the age in the log.
#[test]
fn a_switch_that_never_comes_up_is_killed_after_twice_the_stall_limit() {
    let inst = unique("nevercomes");
    let copy = SwitchdCopy::new(&inst);
    let app = start_with_copy(&inst, 1, &copy);
    let region = app.region();
    copy.replace_with_script("exec sleep 60");
    let old = kill_switch(&region, 0);
    let sleeper = wait_restarted(&app, &region, 0, old, String::new);
    let killing = format!("switch 0 (pid {sleeper}) heartbeat is ");
    let line = wait_for(Duration::from_secs(30), || {
        app.log()
            .lines()
            .find(|l| l.contains(&killing))
            .map(str::to_string)
            .ok_or_else(|| format!("no kill of pid {sleeper} yet:\n{}", app.log()))
    });
    let age: f64 = line
        .split_once(&killing)
        .and_then(|(_, rest)| rest.strip_suffix("s old: killing it"))
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("the kill names the heartbeat's age: {line}"));
    assert!(
        // Printed rounded to 0.1 s: past 6 s prints 6.0 or more.
        age >= (STALL_LIMIT * 2).as_secs_f64(),
        "a starting switch is given twice the limit: killed at {age} s"
    );
    wait_for(Duration::from_secs(10), || {
        if shm_layout::time::pid_alive(sleeper) {
            Err(format!("pid {sleeper} still alive"))
        } else {
            Ok(())
        }
    });
    drop(app);
}
