//! The supervisor: starts one switchd per `[[switch]]`, restarts one that
//! dies (the region and its connections survive), kills one whose heartbeat
//! stalls, and stops them all on shutdown.

use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use shm_layout::Region;
use shm_layout::switch_slot::{SW_RUNNING, SW_STARTING, SW_STOPPED};
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
}

#[derive(Debug)]
struct Proc {
    spec: SwitchSpec,
    child: Option<Child>,
    recent_starts: Vec<Instant>,
    not_before: Option<Instant>,
}

/// A switch heartbeat older than this gets the switch killed and restarted.
pub const STALL_LIMIT: Duration = Duration::from_secs(3);
/// More than this many starts within `CRASH_WINDOW` delays the next start.
const CRASH_BURST: usize = 5;
const CRASH_WINDOW: Duration = Duration::from_secs(10);
const CRASH_BACKOFF: Duration = Duration::from_secs(1);

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
                    child: None,
                    recent_starts: Vec::new(),
                    not_before: None,
                })
                .collect(),
        }
    }

    fn start(&mut self, i: usize, region: &Region) -> std::io::Result<()> {
        let p = &mut self.procs[i];
        let s = &p.spec;
        let child = Command::new(&self.switchd)
            .arg("--instance")
            .arg(&self.instance)
            .arg("--switch")
            .arg(s.index.to_string())
            .args(&s.nic)
            .arg("--cpu")
            .arg(s.cpu.to_string())
            .arg("--idle")
            .arg(s.idle)
            .arg("--burst")
            .arg(s.burst.to_string())
            .arg("--engine")
            .arg(s.engine)
            .arg("--syn-queue")
            .arg(s.syn_queue.to_string())
            .arg("--flow-cache")
            .arg(s.flow_cache.to_string())
            .spawn()?;
        let slot = &region.switch_slots()[s.index];
        slot.cpu.store(s.cpu as u32, Ordering::Relaxed);
        slot.pid.store(child.id(), Ordering::Relaxed);
        slot.heartbeat_ns.store(mono_ns(), Ordering::Relaxed);
        slot.state.store(SW_STARTING, Ordering::SeqCst);
        if !p.recent_starts.is_empty() {
            slot.restarts.fetch_add(1, Ordering::Relaxed);
        }
        log::info!(
            "switch {} ({}) started: pid {} on CPU {}",
            s.index,
            s.name,
            child.id(),
            s.cpu
        );
        p.recent_starts.push(Instant::now());
        p.child = Some(child);
        Ok(())
    }

    /// Starts every switch.
    pub fn start_all(&mut self, region: &Region) -> std::io::Result<()> {
        for i in 0..self.procs.len() {
            self.start(i, region)?;
        }
        Ok(())
    }

    /// Reaps exited switches, restarts them, kills stalled ones.
    pub fn poll(&mut self, region: &Region) {
        let now = Instant::now();
        for i in 0..self.procs.len() {
            let idx = self.procs[i].spec.index;
            let slot = &region.switch_slots()[idx];
            if let Some(child) = self.procs[i].child.as_mut() {
                match child.try_wait() {
                    Ok(Some(status)) => {
                        log::warn!(
                            "switch {idx} (pid {}) exited: {status}; restarting",
                            child.id()
                        );
                        slot.state.store(SW_STOPPED, Ordering::SeqCst);
                        self.procs[i].child = None;
                    }
                    Ok(None) => {
                        let hb = slot.heartbeat_ns.load(Ordering::Relaxed);
                        let age = Duration::from_nanos(mono_ns().saturating_sub(hb));
                        let running = slot.state.load(Ordering::SeqCst) == SW_RUNNING;
                        let starting_too_long = !running && age > STALL_LIMIT * 2;
                        if (running && age > STALL_LIMIT) || starting_too_long {
                            log::error!(
                                "switch {idx} (pid {}) heartbeat is {:.1}s old: killing it",
                                child.id(),
                                age.as_secs_f64()
                            );
                            let _ = child.kill();
                        }
                    }
                    Err(e) => log::error!("switch {idx}: waitpid: {e}"),
                }
            }
            let p = &mut self.procs[i];
            if p.child.is_none() {
                if p.not_before.is_some_and(|t| now < t) {
                    continue;
                }
                p.recent_starts
                    .retain(|t| now.duration_since(*t) < CRASH_WINDOW);
                if p.recent_starts.len() >= CRASH_BURST && p.not_before.is_none() {
                    log::error!(
                        "switch {idx} crashed {} times in {:?}: next start in {:?}",
                        p.recent_starts.len(),
                        CRASH_WINDOW,
                        CRASH_BACKOFF
                    );
                    p.not_before = Some(now + CRASH_BACKOFF);
                    continue;
                }
                p.not_before = None;
                if let Err(e) = self.start(i, region) {
                    log::error!("switch {idx}: cannot start {}: {e}", self.switchd.display());
                    self.procs[i].not_before = Some(now + CRASH_BACKOFF);
                }
            }
        }
    }

    /// SIGTERM to every switch, SIGKILL after `grace`, and reap all.
    pub fn stop_all(&mut self, region: &Region, grace: Duration) {
        for p in &self.procs {
            if let Some(c) = &p.child {
                // SAFETY: kill(2) on our own child's pid; no memory is involved.
                unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
            }
        }
        let deadline = Instant::now() + grace;
        for p in &mut self.procs {
            let Some(mut c) = p.child.take() else {
                continue;
            };
            loop {
                match c.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() >= deadline => {
                        log::warn!(
                            "switch {} did not stop in {grace:?}: killing it",
                            p.spec.index
                        );
                        let _ = c.kill();
                        let _ = c.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
            region.switch_slots()[p.spec.index]
                .state
                .store(SW_STOPPED, Ordering::SeqCst);
        }
    }

    /// Current pids, by switch index (`None` while not running).
    pub fn pids(&self) -> Vec<(usize, Option<u32>)> {
        self.procs
            .iter()
            .map(|p| (p.spec.index, p.child.as_ref().map(|c| c.id())))
            .collect()
    }
}
