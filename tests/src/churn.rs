//! What the crash, fence and reconcile tests share: endless web traffic
//! on its own thread until stopped, the switches' new-connection counts,
//! and killing a switch and waiting, bounded, until the supervisor has
//! restarted it. Every wait has a limit; none asserts a duration.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use shm_layout::Region;
use shm_layout::switch_slot::Counter;
use tools::traffic::{GenConfig, Generator, Report};

use crate::{Appliance, switch_pids};

/// Endless flows to the "web" service of `instance` (until
/// [`Traffic::stop`]); the caller sets their shape.
pub fn web(instance: &str) -> GenConfig {
    GenConfig {
        instance: instance.to_string(),
        services: vec!["web".into()],
        flows: u64::MAX,
        ..GenConfig::default()
    }
}

/// lbgen's generator running on a thread until stopped.
pub struct Traffic {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Report>,
}

impl Traffic {
    /// Starts `cfg` (its `stop` flag is this handle's).
    pub fn start(cfg: GenConfig) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let generator = Generator::new(GenConfig {
            stop: Some(stop.clone()),
            ..cfg
        })
        .expect("traffic generator");
        Self {
            stop,
            thread: std::thread::spawn(move || generator.run()),
        }
    }

    /// Stops starting flows, lets the open ones finish, and reports.
    pub fn stop(self) -> Report {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("traffic thread")
    }
}

/// New connections of switches `switches` (counters restart at 0 with a
/// restarted switch).
pub fn new_conns(region: &Region, switches: &[usize]) -> u64 {
    switches
        .iter()
        .map(|&i| region.switch_slots()[i].counter(Counter::ConnNew))
        .sum()
}

/// Waits (at most 30 s) until switches `switches` have made `at_least`
/// new connections; past that, fails with controld's log.
pub fn wait_new_conns(app: &Appliance, region: &Region, switches: &[usize], at_least: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let n = new_conns(region, switches);
        if n >= at_least {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "traffic does not flow: switches {switches:?} made {n} of {at_least} new connections\n{}",
            app.log()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// SIGKILLs switch `i`: its pid, as the region names it.
pub fn kill_switch(region: &Region, i: usize) -> u32 {
    let pid = switch_pids(region)[i];
    // SAFETY: kill(2) on a switchd pid we read from the region.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    pid
}

/// Waits (at most 20 s) until switch `i`, which was `old`, runs as a new
/// process: its pid; past that, fails with `what` and controld's log.
pub fn wait_restarted(
    app: &Appliance,
    region: &Region,
    i: usize,
    old: u32,
    what: impl Fn() -> String,
) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let pid = switch_pids(region)[i];
        if pid != old && shm_layout::time::pid_alive(pid) {
            return pid;
        }
        assert!(
            Instant::now() < deadline,
            "switch {i} (pid {old}) not restarted: pid {pid}, {}\n{}",
            what(),
            app.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}
