//! The supervisor: starts one switchd per `[[switch]]` (or adopts the ones a
//! previous controld left running), restarts one that dies (the region and
//! its connections survive), kills one whose heartbeat stalls, fences one
//! the publisher excluded, and stops them all on shutdown.

use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use shm_layout::Region;

use crate::procs::Pidfd;
use crate::takeover::AdoptedSwitch;
use shm_layout::switch_slot::{SW_FAILED, SW_RUNNING, SW_STARTING, SW_STOPPED};
use shm_layout::time::mono_ns;

/// How one switch is started.
#[derive(Clone, Debug)]
pub struct SwitchSpec {
    pub index: usize,
    pub name: String,
    pub cpu: usize,
    pub idle: &'static str,
    pub burst: usize,
    /// Arguments naming the switch's NIC (`--vnic NAME` or `--afpacket ...`).
    pub nic: Vec<String>,
    /// "filter" or "null".
    pub engine: &'static str,
    /// Entries of the switch's queue of held new connections.
    pub syn_queue: u32,
    /// Entries of the switch's flow cache.
    pub flow_cache: u32,
    /// `[records] batch` and `batch_ms`.
    pub record_batch: u32,
    pub record_batch_ms: u32,
}

/// A running switch process: our child, or a switch of a previous controld
/// that [`crate::takeover`] proved ours and handed over (not our child: it
/// is watched and signalled through its pidfd).
#[derive(Debug)]
enum Handle {
    Child(Child),
    Adopted(Pidfd),
}

impl Handle {
    fn pid(&self) -> u32 {
        match self {
            Handle::Child(c) => c.id(),
            Handle::Adopted(p) => p.pid(),
        }
    }

    /// `Some(description)` once the process has exited (a child is reaped).
    fn exited(&mut self) -> std::io::Result<Option<String>> {
        match self {
            Handle::Child(c) => Ok(c.try_wait()?.map(|s| s.to_string())),
            Handle::Adopted(p) => Ok(p
                .exited()
                .then(|| "exited (adopted, status unknown)".into())),
        }
    }

    fn kill(&mut self) {
        match self {
            Handle::Child(c) => {
                let _ = c.kill();
            }
            Handle::Adopted(p) => {
                let _ = p.signal(libc::SIGKILL);
            }
        }
    }

    fn terminate(&self) {
        let r = match self {
            // SAFETY: kill(2) on our own child's pid, which is not reaped
            // (so not reused) while we hold the Child.
            Handle::Child(c) => unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) },
            Handle::Adopted(p) => p.signal(libc::SIGTERM).map_or(-1, |()| 0),
        };
        let _ = r;
    }

    /// Waits until the process has exited (a child is reaped); false if it
    /// has not within `timeout`.
    fn wait(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if matches!(self.exited(), Ok(Some(_)) | Err(_)) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// A switch that could not be started: the program, and why.
#[derive(Debug, thiserror::Error)]
#[error("switch {index} ({name}): cannot start {}: {error}", path.display())]
pub struct StartError {
    pub index: usize,
    pub name: String,
    pub path: PathBuf,
    // In the message already: not a source (thiserror takes a field named
    // `source` as one), or a chain printer (anyhow's `{:#}`) says it twice.
    pub error: std::io::Error,
}

#[derive(Debug)]
struct Proc {
    spec: SwitchSpec,
    handle: Option<Handle>,
    starts: StartHistory,
    not_before: Option<Instant>,
    /// Restarted `RESTART_LIMIT` times within `RESTART_WINDOW` and down
    /// again: not started any more.
    failed: bool,
}

/// When one switch was started: says whether a start is a restart, and
/// whether it was restarted too often to be restarted again.
#[derive(Debug, Default)]
pub struct StartHistory {
    /// Whether it was ever started (by this controld or the one before).
    started: bool,
    /// Restarts (and attempts that could not start it) within the window.
    recent: Vec<Instant>,
}

impl StartHistory {
    /// A switch adopted from a previous controld: its next start is a restart.
    pub fn adopted() -> Self {
        Self {
            started: true,
            recent: Vec::new(),
        }
    }

    /// Records a start at `now`; true when it is a restart.
    pub fn record(&mut self, now: Instant) -> bool {
        let restart = self.started;
        self.started = true;
        if restart {
            self.recent.push(now);
        }
        restart
    }

    /// Records an attempt that could not start the process (it counts
    /// against the limit like a restart).
    pub fn record_failure(&mut self, now: Instant) {
        self.recent.push(now);
    }

    /// Whether the switch, down again, may not be restarted: it was
    /// restarted `RESTART_LIMIT` times within `RESTART_WINDOW` already.
    pub fn exhausted(&mut self, now: Instant) -> bool {
        self.recent
            .retain(|t| now.duration_since(*t) < RESTART_WINDOW);
        self.recent.len() >= RESTART_LIMIT
    }
}

/// A switch heartbeat older than this gets the switch killed and restarted.
pub const STALL_LIMIT: Duration = Duration::from_secs(3);
/// A switch is restarted at most this many times within `RESTART_WINDOW`;
/// down once more, it is marked failed and left alone.
pub const RESTART_LIMIT: usize = 5;
pub const RESTART_WINDOW: Duration = Duration::from_secs(10);
/// The wait before another attempt after a start that failed (fork/exec).
pub const START_RETRY: Duration = Duration::from_secs(1);

/// Whether a live switch whose heartbeat is `age` old is stalled (to be
/// killed): a running one past [`STALL_LIMIT`]; one not yet running (its
/// start takes longer: mapping, pinning, opening ports) past twice that.
pub fn stalled(running: bool, age: Duration) -> bool {
    if running {
        age > STALL_LIMIT
    } else {
        age > STALL_LIMIT * 2
    }
}

#[derive(Debug)]
pub struct Supervisor {
    switchd: PathBuf,
    instance: String,
    procs: Vec<Proc>,
}

impl Supervisor {
    pub fn new(switchd: PathBuf, instance: &str, specs: Vec<SwitchSpec>) -> Self {
        Self {
            switchd,
            instance: instance.to_string(),
            procs: specs
                .into_iter()
                .map(|spec| Proc {
                    spec,
                    handle: None,
                    starts: StartHistory::default(),
                    not_before: None,
                    failed: false,
                })
                .collect(),
        }
    }

    /// The arguments switchd gets for `s` (after the program name).
    pub fn args(&self, s: &SwitchSpec) -> Vec<String> {
        let mut v: Vec<String> = vec![
            "--instance".into(),
            self.instance.clone(),
            "--switch".into(),
            s.index.to_string(),
        ];
        v.extend(s.nic.iter().cloned());
        for (k, val) in [
            ("--cpu", s.cpu.to_string()),
            ("--idle", s.idle.to_string()),
            ("--burst", s.burst.to_string()),
            ("--engine", s.engine.to_string()),
            ("--syn-queue", s.syn_queue.to_string()),
            ("--flow-cache", s.flow_cache.to_string()),
            ("--record-batch", s.record_batch.to_string()),
            ("--record-batch-ms", s.record_batch_ms.to_string()),
        ] {
            v.push(k.into());
            v.push(val);
        }
        v
    }

    /// Takes over the switches a previous controld left running. A switch
    /// started with the arguments this configuration gives it is supervised
    /// as it runs; one started with others is stopped (its connections live
    /// in the shared table) and started anew by the next [`Supervisor::poll`].
    /// Returns the indexes adopted as they run.
    pub fn adopt(&mut self, region: &Region, switches: Vec<AdoptedSwitch>) -> Vec<usize> {
        let mut kept = Vec::new();
        for a in switches {
            let Some(i) = self.procs.iter().position(|p| p.spec.index == a.index) else {
                continue;
            };
            let want = self.args(&self.procs[i].spec);
            let p = &mut self.procs[i];
            p.starts = StartHistory::adopted();
            if a.args == want {
                log::info!(
                    "switch {} ({}) adopted: pid {}",
                    a.index,
                    p.spec.name,
                    a.pidfd.pid()
                );
                p.handle = Some(Handle::Adopted(a.pidfd));
                kept.push(a.index);
            } else {
                log::warn!(
                    "switch {} (pid {}) runs with other arguments than this configuration gives it: replacing it",
                    a.index,
                    a.pidfd.pid()
                );
                if !a.pidfd.terminate(Duration::from_secs(3)) {
                    log::error!("switch {} (pid {}) did not exit", a.index, a.pidfd.pid());
                }
                region.switch_slots()[a.index]
                    .state
                    .store(SW_STOPPED, Ordering::SeqCst);
            }
        }
        kept
    }

    fn start(&mut self, i: usize, region: &Region) -> Result<(), StartError> {
        let args = self.args(&self.procs[i].spec);
        let p = &mut self.procs[i];
        let s = &p.spec;
        let slot = &region.switch_slots()[s.index];
        // The slot says STARTING before the child exists: the child's own
        // RUNNING is never overwritten.
        slot.pid.store(0, Ordering::Relaxed);
        slot.proc_start.store(0, Ordering::Relaxed);
        slot.cpu.store(s.cpu as u32, Ordering::Relaxed);
        slot.heartbeat_ns.store(mono_ns(), Ordering::Relaxed);
        slot.state.store(SW_STARTING, Ordering::SeqCst);
        let child = match Command::new(&self.switchd).args(&args).spawn() {
            Ok(c) => c,
            Err(error) => {
                slot.state.store(SW_STOPPED, Ordering::SeqCst);
                return Err(StartError {
                    index: s.index,
                    name: s.name.clone(),
                    path: self.switchd.clone(),
                    error,
                });
            }
        };
        // The start time is fixed at fork: read now, it names this child
        // (not yet reaped, so its pid is not reused).
        slot.proc_start.store(
            shm_layout::time::process_start(child.id()).unwrap_or(0),
            Ordering::Relaxed,
        );
        slot.pid.store(child.id(), Ordering::Relaxed);
        if p.starts.record(Instant::now()) {
            slot.restarts.fetch_add(1, Ordering::Relaxed);
        }
        log::info!(
            "switch {} ({}) started: pid {} on CPU {}",
            s.index,
            s.name,
            child.id(),
            s.cpu
        );
        p.handle = Some(Handle::Child(child));
        Ok(())
    }

    /// Starts every switch that is not running (all of them, unless some
    /// were adopted).
    pub fn start_all(&mut self, region: &Region) -> Result<(), StartError> {
        for i in 0..self.procs.len() {
            if self.procs[i].handle.is_none() {
                self.start(i, region)?;
            }
        }
        Ok(())
    }

    /// Fences switch `index`: kills it and returns once it has exited, so
    /// it can no longer read or write the region (the supervisor restarts
    /// it on its next poll). False if it could not be made to exit.
    pub fn fence(&mut self, region: &Region, index: usize, grace: Duration) -> bool {
        let Some(p) = self.procs.iter_mut().find(|p| p.spec.index == index) else {
            return false;
        };
        let Some(h) = p.handle.as_mut() else {
            return true;
        };
        h.kill();
        if !h.wait(grace) {
            return false;
        }
        log::warn!("switch {index} (pid {}) fenced: killed and reaped", h.pid());
        p.handle = None;
        region.switch_slots()[index]
            .state
            .store(SW_STOPPED, Ordering::SeqCst);
        true
    }

    /// Reaps exited switches, restarts them, kills stalled ones.
    pub fn poll(&mut self, region: &Region) {
        let now = Instant::now();
        for i in 0..self.procs.len() {
            let idx = self.procs[i].spec.index;
            let slot = &region.switch_slots()[idx];
            if let Some(h) = self.procs[i].handle.as_mut() {
                match h.exited() {
                    Ok(Some(status)) => {
                        log::warn!("switch {idx} (pid {}) exited: {status}", h.pid());
                        slot.state.store(SW_STOPPED, Ordering::SeqCst);
                        self.procs[i].handle = None;
                    }
                    Ok(None) => {
                        let hb = slot.heartbeat_ns.load(Ordering::Relaxed);
                        let age = Duration::from_nanos(mono_ns().saturating_sub(hb));
                        let running = slot.state.load(Ordering::SeqCst) == SW_RUNNING;
                        if stalled(running, age) {
                            log::error!(
                                "switch {idx} (pid {}) heartbeat is {:.1}s old: killing it",
                                h.pid(),
                                age.as_secs_f64()
                            );
                            h.kill();
                        }
                    }
                    Err(e) => log::error!("switch {idx}: waitpid: {e}"),
                }
            }
            let p = &mut self.procs[i];
            if p.handle.is_none() && !p.failed {
                if p.not_before.is_some_and(|t| now < t) {
                    continue;
                }
                p.not_before = None;
                if p.starts.exhausted(now) {
                    p.failed = true;
                    slot.state.store(SW_FAILED, Ordering::SeqCst);
                    log::error!(
                        "switch {idx} ({}) failed: restarted {RESTART_LIMIT} times within {RESTART_WINDOW:?} and exited again; not restarting it (fix the cause, then restart controld: the region and its connections are adopted)",
                        p.spec.name
                    );
                    continue;
                }
                if let Err(e) = self.start(i, region) {
                    log::error!("{e}");
                    let p = &mut self.procs[i];
                    p.starts.record_failure(now);
                    p.not_before = Some(now + START_RETRY);
                }
            }
        }
    }

    /// SIGTERM to every switch, SIGKILL after `grace`, and reap all.
    pub fn stop_all(&mut self, region: &Region, grace: Duration) {
        for index in self.stop_processes(grace) {
            region.switch_slots()[index]
                .state
                .store(SW_STOPPED, Ordering::SeqCst);
        }
    }

    /// SIGTERM to every switch, SIGKILL after `grace`, and reap all: the
    /// indexes of those it stopped.
    fn stop_processes(&mut self, grace: Duration) -> Vec<usize> {
        for p in &self.procs {
            if let Some(h) = &p.handle {
                h.terminate();
            }
        }
        let deadline = Instant::now() + grace;
        let mut stopped = Vec::new();
        for p in &mut self.procs {
            let Some(mut h) = p.handle.take() else {
                continue;
            };
            if !h.wait(deadline.saturating_duration_since(Instant::now())) {
                log::warn!(
                    "switch {} did not stop in {grace:?}: killing it",
                    p.spec.index
                );
                h.kill();
                h.wait(Duration::from_secs(5));
            }
            stopped.push(p.spec.index);
        }
        stopped
    }

    /// Current pids, by switch index (`None` while not running).
    pub fn pids(&self) -> Vec<(usize, Option<u32>)> {
        self.procs
            .iter()
            .map(|p| (p.spec.index, p.handle.as_ref().map(Handle::pid)))
            .collect()
    }
}

/// The grace a switch gets between SIGTERM and SIGKILL when controld stops.
pub const STOP_GRACE: Duration = Duration::from_secs(3);

impl Drop for Supervisor {
    /// A controld that leaves on an error after starting switches (not on
    /// SIGTERM, which stops them first; not when killed, which runs no
    /// drop and leaves them for the next controld) stops them: it removes
    /// the region they work on as it goes.
    fn drop(&mut self) {
        if self.procs.iter().any(|p| p.handle.is_some()) {
            log::warn!("leaving with switches running: stopping them");
            self.stop_processes(STOP_GRACE);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restart_counts_however_long_the_switch_ran() {
        let t0 = Instant::now();
        let mut h = StartHistory::default();
        assert!(!h.record(t0), "the first start is no restart");
        let later = t0 + RESTART_WINDOW * 3;
        assert!(!h.exhausted(later));
        assert!(h.record(later), "a start after a long run is a restart");
        assert!(
            StartHistory::adopted().record(t0),
            "an adopted switch was started before"
        );
    }

    #[test]
    fn a_running_switch_stalls_past_three_seconds_a_starting_one_past_six() {
        let ms = Duration::from_millis;
        assert_eq!(STALL_LIMIT, ms(3000));
        for (running, age, want) in [
            (true, ms(0), false),
            (true, ms(3000), false),
            (true, ms(3001), true),
            (true, ms(6001), true),
            (false, ms(3001), false),
            (false, ms(6000), false),
            (false, ms(6001), true),
        ] {
            assert_eq!(
                stalled(running, age),
                want,
                "running {running}, age {age:?}"
            );
        }
        assert!(!stalled(true, STALL_LIMIT));
        assert!(stalled(true, STALL_LIMIT + Duration::from_nanos(1)));
    }

    #[test]
    fn the_window_is_ten_seconds_and_a_restart_leaves_it_after_exactly_that() {
        assert_eq!(
            (RESTART_LIMIT, RESTART_WINDOW),
            (5, Duration::from_secs(10))
        );
        assert_eq!(START_RETRY, Duration::from_secs(1));
        let t0 = Instant::now();
        let mut h = StartHistory::default();
        h.record(t0);
        for _ in 0..RESTART_LIMIT {
            h.record(t0);
        }
        let ns = Duration::from_nanos(1);
        assert!(h.exhausted(t0 + RESTART_WINDOW - ns), "inside the window");
        assert!(
            !h.exhausted(t0 + RESTART_WINDOW),
            "restarts exactly RESTART_WINDOW old are out of it"
        );
        // Four within the window are one short of the limit.
        let mut h = StartHistory::default();
        h.record(t0);
        for _ in 0..RESTART_LIMIT - 1 {
            h.record(t0);
        }
        assert!(!h.exhausted(t0));
        h.record_failure(t0);
        assert!(h.exhausted(t0), "a failed start completes the limit");
    }

    #[test]
    fn the_limit_is_five_restarts_within_the_window() {
        let t0 = Instant::now();
        let ms = |k: u64| t0 + Duration::from_millis(k);
        let mut h = StartHistory::default();
        assert!(!h.record(ms(0)), "the first start is no restart");
        for k in 1..=RESTART_LIMIT as u64 {
            assert!(!h.exhausted(ms(k)));
            assert!(h.record(ms(k)));
        }
        assert!(h.exhausted(ms(10)));
        // Restarts spread wider than the window never exhaust it.
        let mut h = StartHistory::default();
        h.record(t0);
        for k in 1..=20u32 {
            let t = t0 + RESTART_WINDOW / 4 * k;
            assert!(!h.exhausted(t), "restart {k}");
            h.record(t);
        }
        // Attempts that could not start it count too.
        let mut h = StartHistory::default();
        for k in 0..RESTART_LIMIT as u64 {
            assert!(!h.exhausted(ms(k)));
            h.record_failure(ms(k));
        }
        assert!(h.exhausted(ms(10)));
    }
}
