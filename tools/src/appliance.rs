//! A running appliance for tests and benchmarks: a real controld (which
//! starts real switchd processes) on virtual NICs, stopped and cleaned up —
//! processes, region, NICs — when dropped, even on a panic.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use shm_layout::switch_slot::SW_RUNNING;
use shm_layout::{Access, Region, Table};

/// Directory holding the workspace's built binaries.
pub fn bin_dir() -> PathBuf {
    if let Ok(d) = std::env::var("SWITCHYARD_BIN_DIR") {
        return PathBuf::from(d);
    }
    // Next to the running program (lbgen), or target/<profile> for a test
    // binary in target/<profile>/deps.
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().expect("exe dir");
    if dir.join("controld").exists() {
        return dir.to_path_buf();
    }
    dir.parent().unwrap_or(dir).to_path_buf()
}

pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is not built: run `cargo build --workspace --bins` with the same profile first (or set SWITCHYARD_BIN_DIR)",
        p.display()
    );
    p
}

/// The directory a test appliance of `instance` keeps its config and log in.
pub fn dir_for(instance: &str) -> PathBuf {
    std::env::temp_dir().join(format!("switchyard-test-{instance}"))
}

/// A running appliance: controld and its switches. Stopped and cleaned on drop.
pub struct Appliance {
    pub instance: String,
    pub config_path: PathBuf,
    pub controld: Option<Child>,
    pub log_path: PathBuf,
    dir: PathBuf,
    armed: bool,
}

impl Appliance {
    /// Writes the config and starts controld; waits until every switch runs
    /// and acknowledged the first generation.
    pub fn start(instance: &str, config: &str) -> Self {
        Self::start_in(None, instance, config)
    }

    /// Like [`Appliance::start`], with controld (and so its switches) in a
    /// network namespace (`ip netns exec NS controld ...`: same pid).
    pub fn start_in(netns: Option<&str>, instance: &str, config: &str) -> Self {
        Self::start_with_args(netns, instance, config, &[])
    }

    /// Like [`Appliance::start_in`], with more arguments for controld
    /// (`--switchd PATH`).
    pub fn start_with_args(
        netns: Option<&str>,
        instance: &str,
        config: &str,
        args: &[&std::ffi::OsStr],
    ) -> Self {
        let mut a = Self::spawn(netns, instance, config, args).unwrap_or_else(|e| panic!("{e}"));
        a.wait_ready(Duration::from_secs(20));
        a
    }

    /// Like [`Appliance::start`], for programs (lbgen) rather than tests:
    /// an appliance that does not come up is stopped and cleaned here (by
    /// its drop, which a `panic = "abort"` build would never run) and the
    /// reason is returned.
    pub fn try_start(instance: &str, config: &str) -> Result<Self, String> {
        let mut a = Self::spawn(None, instance, config, &[])?;
        if let Err(e) = a.poll_ready(Duration::from_secs(20)) {
            // It did not come up: the reason is the error; clean up
            // without judging its shutdown.
            a.stop();
            a.clean_up();
            a.armed = false;
            return Err(e);
        }
        Ok(a)
    }

    /// Writes the configuration and starts controld (not waiting for it).
    fn spawn(
        netns: Option<&str>,
        instance: &str,
        config: &str,
        args: &[&std::ffi::OsStr],
    ) -> Result<Self, String> {
        let controld = bin_dir().join("controld");
        if !controld.exists() {
            return Err(format!(
                "{} is not built: run `cargo build --workspace --bins` with the same profile first (or set SWITCHYARD_BIN_DIR)",
                controld.display()
            ));
        }
        let dir = dir_for(instance);
        let io = |what: &std::path::Path, e: std::io::Error| format!("{}: {e}", what.display());
        std::fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
        let config_path = dir.join("switchyard.toml");
        std::fs::write(&config_path, config).map_err(|e| io(&config_path, e))?;
        let log_path = dir.join("controld.log");
        let log = std::fs::File::create(&log_path).map_err(|e| io(&log_path, e))?;
        let log2 = log.try_clone().map_err(|e| io(&log_path, e))?;
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&controld);
                c
            }
            None => Command::new(&controld),
        };
        let child = cmd
            .arg("--config")
            .arg(&config_path)
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::from(log2))
            .stderr(Stdio::from(log))
            .spawn()
            .map_err(|e| format!("spawning controld: {e}"))?;
        Ok(Appliance {
            instance: instance.to_string(),
            config_path,
            controld: Some(child),
            log_path,
            dir,
            armed: true,
        })
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn region(&self) -> Region {
        Region::attach(&self.instance, Access::ReadOnly).expect("attach region")
    }

    /// Waits until the region exists, has a configuration, and every
    /// configured switch is RUNNING and acknowledged it.
    pub fn wait_ready(&mut self, limit: Duration) {
        if let Err(e) = self.poll_ready(limit) {
            panic!("{e}");
        }
    }

    /// [`Appliance::wait_ready`], returning why it is not ready instead.
    pub fn poll_ready(&mut self, limit: Duration) -> Result<(), String> {
        let deadline = Instant::now() + limit;
        let mut last_error = String::from("attached");
        loop {
            if let Some(c) = self.controld.as_mut()
                && let Ok(Some(st)) = c.try_wait()
            {
                return Err(format!("controld exited early ({st}):\n{}", self.log()));
            }
            let me = self.controld.as_ref().map(|c| c.id()).unwrap_or(0);
            // Only our controld's region counts (a stale one may still exist).
            let region = Region::attach(&self.instance, Access::ReadOnly);
            if let Err(e) = &region {
                last_error = e.to_string();
            }
            if let Ok(r) = region
                && r.header().controld_pid.load(Ordering::Relaxed) == me
            {
                let g = r.generation(Table::Config);
                let n = r.caps().switches as usize;
                let ready = g > 0
                    && r.switch_slots()[..n].iter().all(|s| {
                        s.state.load(Ordering::SeqCst) == SW_RUNNING
                            && s.seen_config.load(Ordering::Acquire) == g
                    });
                if ready {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "appliance not ready after {limit:?} (region: {last_error}):\n{}",
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn controld_pid(&self) -> u32 {
        self.controld.as_ref().expect("running").id()
    }

    /// Sends a signal to controld.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.controld_pid() as i32, sig) };
    }

    /// Replaces the config file and sends SIGHUP; returns the generation
    /// before the reload.
    pub fn reload_with(&self, config: &str) -> u64 {
        let before = self.region().generation(Table::Config);
        std::fs::write(&self.config_path, config).unwrap();
        self.signal(libc::SIGHUP);
        before
    }

    /// [`Self::reload_with`], then waits (at most 20 s) until the reload is
    /// published; returns the new generation.
    pub fn reload_and_wait(&self, config: &str) -> u64 {
        let before = self.reload_with(config);
        self.wait_generation_above(before, Duration::from_secs(20))
    }

    /// Waits until the configuration generation exceeds `gen`.
    pub fn wait_generation_above(&self, above: u64, limit: Duration) -> u64 {
        let deadline = Instant::now() + limit;
        let r = self.region();
        loop {
            let g = r.generation(Table::Config);
            if g > above {
                return g;
            }
            assert!(
                Instant::now() < deadline,
                "generation stayed at {g} for {limit:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Stops controld with SIGTERM and waits for it (bounded).
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.controld.take()?;
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return Some(st);
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                return c.wait().ok();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Appliance {
    /// Gives up ownership of the instance without stopping anything (for
    /// tests that leave processes behind on purpose and clean up otherwise).
    pub fn disarm(mut self) {
        self.armed = false;
    }

    /// The admin socket controld said it serves (its log names it), or the
    /// instance's default.
    fn admin_socket(&self) -> PathBuf {
        self.log()
            .lines()
            .filter_map(|l| l.split_once("] admin socket ").map(|(_, p)| p.trim()))
            .next_back()
            .map(PathBuf::from)
            .unwrap_or_else(|| admin_proto::default_socket_path(&self.instance))
    }

    /// Pids of processes (other than this one) started with `--instance
    /// INSTANCE`: the instance's switches.
    fn instance_pids(&self) -> Vec<u32> {
        let me = std::process::id();
        let Ok(rd) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        rd.flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|&pid| pid != me)
            .filter(|pid| {
                let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                    return false;
                };
                let args: Vec<&[u8]> = cmd.split(|&b| b == 0).collect();
                args.windows(2)
                    .any(|w| w[0] == b"--instance" && w[1] == self.instance.as_bytes())
            })
            .collect()
    }

    /// The instance's files in /dev/shm: the region and its virtual NICs.
    fn shm_files(&self) -> Vec<PathBuf> {
        let prefix = format!("switchyard.{}", self.instance);
        let Ok(rd) = std::fs::read_dir("/dev/shm") else {
            return Vec::new();
        };
        rd.flatten()
            .filter(|e| {
                let n = e.file_name().to_string_lossy().to_string();
                n == prefix || n.starts_with(&format!("{prefix}."))
            })
            .map(|e| e.path())
            .collect()
    }

    /// What of the instance is left: its switch processes, its region and
    /// vnic files, its admin socket and the overrides saved beside it. A
    /// controld stopped by SIGTERM leaves none of them.
    pub fn leftovers(&self) -> Vec<String> {
        let mut left: Vec<String> = self
            .instance_pids()
            .into_iter()
            .map(|pid| {
                let cmd = std::fs::read(format!("/proc/{pid}/cmdline"))
                    .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
                    .unwrap_or_default();
                format!("process {pid}: {}", cmd.trim_end())
            })
            .collect();
        left.extend(
            self.shm_files()
                .into_iter()
                .map(|p| format!("file {}", p.display())),
        );
        let socket = self.admin_socket();
        for p in [socket.clone(), socket.with_extension("overrides")] {
            if std::fs::symlink_metadata(&p).is_ok() {
                left.push(format!("file {}", p.display()));
            }
        }
        left
    }

    /// Kills what is left of the instance and removes its files, asking
    /// nothing of controld (which is stopped, or killed here).
    fn clean_up(&mut self) {
        if let Some(mut c) = self.controld.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for pid in self.instance_pids() {
            // SAFETY: kill(2) on a process started with `--instance
            // INSTANCE` (this test's unique instance name).
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        let socket = self.admin_socket();
        let _ = std::fs::remove_file(socket.with_extension("overrides"));
        let _ = std::fs::remove_file(socket);
        for p in self.shm_files() {
            let _ = std::fs::remove_file(p);
        }
    }

    /// Stops controld with SIGTERM (bounded) and checks that it stopped
    /// cleanly (exit 0) and left nothing of the instance; then removes
    /// whatever is left either way. The problems found, if any.
    pub fn shut_down(&mut self) -> Result<(), String> {
        let mut problems = Vec::new();
        // What a controld taken away by its test (to kill it) never stopped.
        let ours = self.controld.is_some();
        let pid = self.controld.as_ref().map(|c| c.id());
        match self.stop() {
            Some(st) if st.success() => {}
            Some(st) => problems.push(format!(
                "controld (pid {}) did not exit cleanly within 10 s of SIGTERM: {st}",
                pid.unwrap_or(0)
            )),
            None if ours => problems.push("controld: status unknown".into()),
            None => {}
        }
        if ours {
            problems.extend(self.leftovers());
        }
        self.clean_up();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "controld's SIGTERM shutdown of instance {} left: {}",
                self.instance,
                problems.join("; ")
            ))
        }
    }
}

impl Drop for Appliance {
    /// Stops the appliance. Outside a panic, a controld that did not stop
    /// cleanly or left anything behind fails the test (after everything
    /// is cleaned up); during a panic, it only cleans up.
    fn drop(&mut self) {
        if !self.armed {
            let _ = std::fs::remove_dir_all(&self.dir);
            return;
        }
        if std::thread::panicking() {
            self.stop();
            self.clean_up();
            eprintln!("controld log kept in {}", self.log_path.display());
            return;
        }
        if let Err(e) = self.shut_down() {
            panic!(
                "{e}\ncontrold log kept in {}:\n{}",
                self.log_path.display(),
                self.log()
            );
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
