//! Helpers for the multi-process integration tests: start a real controld
//! (which starts real switchd processes) on virtual NICs under a unique
//! instance name, and always clean up — processes, region and NICs — even
//! when a test fails.

use std::path::{Path, PathBuf};
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
    // target/<profile>/deps/<test-binary> -> target/<profile>
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf()
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

/// A unique instance name for one test.
pub fn unique(tag: &str) -> String {
    use std::sync::atomic::AtomicU32;
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "t{}-{tag}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A backend in a generated config.
#[derive(Clone, Debug)]
pub struct B {
    pub name: &'static str,
    pub last_octet: u8,
    pub weight: u32,
}

/// Parameters of a generated vnic config.
#[derive(Clone, Debug)]
pub struct Cfg {
    pub switches: usize,
    pub web: Vec<B>,
    pub dns: Vec<B>,
    pub connections: u32,
}

impl Default for Cfg {
    fn default() -> Self {
        Self {
            switches: 1,
            web: vec![
                B {
                    name: "web1",
                    last_octet: 1,
                    weight: 1,
                },
                B {
                    name: "web2",
                    last_octet: 2,
                    weight: 2,
                },
                B {
                    name: "web3",
                    last_octet: 3,
                    weight: 3,
                },
            ],
            dns: vec![
                B {
                    name: "dns1",
                    last_octet: 1,
                    weight: 1,
                },
                B {
                    name: "dns2",
                    last_octet: 2,
                    weight: 1,
                },
            ],
            connections: 1 << 18,
        }
    }
}

/// Renders a vnic configuration: client port and backend port, static
/// routes and neighbours for backends 198.19.1.1..=8, switches on CPU 0..n.
pub fn render(instance: &str, c: &Cfg) -> String {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mut s = format!(
        "instance = \"{instance}\"\n\n[limits]\nconnections = {}\nmaglev_table_size = 65537\n\n[timeouts]\ntcp_fin = 2\nudp = 5\n\n[publish]\nack_timeout_ms = 2000\n\n",
        c.connections
    );
    s += "[[port]]\nname = \"client\"\ndriver = \"vnic\"\nmac = \"02:00:00:00:00:01\"\n\n";
    s += "[[port]]\nname = \"backend\"\ndriver = \"vnic\"\nmac = \"02:00:00:00:00:02\"\n\n";
    for i in 0..c.switches {
        s += &format!(
            "[[switch]]\nname = \"sw{i}\"\ncpu = {}\nports = [\"client\", \"backend\"]\nidle = \"adaptive\"\n\n",
            i % cpus
        );
    }
    let svc = |name: &str, port: u16, proto: &str, bport: u16, bs: &[B]| {
        let mut s = format!(
            "[[service]]\nname = \"{name}\"\nvip = \"198.18.0.10\"\nport = {port}\nprotocol = \"{proto}\"\nmode = \"nat\"\nscheduler = \"maglev\"\n"
        );
        for b in bs {
            s += &format!(
                "  [[service.backend]]\n  name = \"{}\"\n  address = \"198.19.1.{}\"\n  port = {bport}\n  weight = {}\n",
                b.name, b.last_octet, b.weight
            );
        }
        s + "\n"
    };
    if !c.web.is_empty() {
        s += &svc("web", 80, "tcp", 8080, &c.web);
    }
    if !c.dns.is_empty() {
        s += &svc("dns", 53, "udp", 5353, &c.dns);
    }
    s += "[[route]]\nprefix = \"198.19.1.0/24\"\nport = \"backend\"\n\n";
    s += "[[route]]\nprefix = \"198.18.100.0/24\"\nport = \"client\"\nvia = \"198.18.0.1\"\n\n";
    s += "[[neighbour]]\naddress = \"198.18.0.1\"\nmac = \"02:00:00:00:02:01\"\nport = \"client\"\n\n";
    for i in 1..=8 {
        s += &format!(
            "[[neighbour]]\naddress = \"198.19.1.{i}\"\nmac = \"02:00:00:00:01:{i:02x}\"\nport = \"backend\"\n\n"
        );
    }
    s
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
        let dir = std::env::temp_dir().join(format!("switchyard-test-{instance}"));
        std::fs::create_dir_all(&dir).unwrap();
        let config_path = dir.join("switchyard.toml");
        std::fs::write(&config_path, config).unwrap();
        let log_path = dir.join("controld.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let child = Command::new(bin("controld"))
            .arg("--config")
            .arg(&config_path)
            .env("RUST_LOG", "info")
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn controld");
        let mut a = Appliance {
            instance: instance.to_string(),
            config_path,
            controld: Some(child),
            log_path,
            dir,
            armed: true,
        };
        a.wait_ready(Duration::from_secs(20));
        a
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
        let deadline = Instant::now() + limit;
        loop {
            if let Some(c) = self.controld.as_mut()
                && let Ok(Some(st)) = c.try_wait()
            {
                panic!("controld exited early ({st}):\n{}", self.log());
            }
            let me = self.controld.as_ref().map(|c| c.id()).unwrap_or(0);
            // Only our controld's region counts (a stale one may still exist).
            if let Ok(r) = Region::attach(&self.instance, Access::ReadOnly)
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
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "appliance not ready after {limit:?}:\n{}",
                self.log()
            );
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
}

impl Drop for Appliance {
    fn drop(&mut self) {
        if !self.armed {
            let _ = std::fs::remove_dir_all(&self.dir);
            return;
        }
        self.stop();
        // Anything left (a switch orphaned by a failure) is killed by instance name.
        let _ = Command::new("pkill")
            .args([
                "-KILL",
                "-f",
                "--",
                &format!("--instance {} ", self.instance),
            ])
            .status();
        if let Ok(rd) = std::fs::read_dir("/dev/shm") {
            let prefix = format!("switchyard.{}", self.instance);
            for e in rd.flatten() {
                let n = e.file_name().to_string_lossy().to_string();
                if n == prefix || n.starts_with(&format!("{prefix}.")) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("controld log kept in {}", self.log_path.display());
        }
    }
}

/// Pids of running switchd processes of an instance, by switch index.
pub fn switch_pids(r: &Region) -> Vec<u32> {
    let n = r.caps().switches as usize;
    r.switch_slots()[..n]
        .iter()
        .map(|s| s.pid.load(Ordering::Relaxed))
        .collect()
}

/// Runs shmdump --json on an instance and parses it.
pub fn shmdump_json(instance: &str, extra: &[&str]) -> serde_json::Value {
    let out = Command::new(bin("shmdump"))
        .args(["--instance", instance, "--json"])
        .args(extra)
        .output()
        .expect("run shmdump");
    assert!(
        out.status.success(),
        "shmdump failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("shmdump json")
}

/// The wire ends of an instance's virtual NICs, for tests that hand-craft frames.
pub struct Wire {
    nics: Vec<(netdrv::vnic::VnicWire, Vec<String>)>,
}

impl Wire {
    pub fn attach(instance: &str) -> Self {
        let nics = tools::topo::vnic_names(instance)
            .expect("vnic names")
            .into_iter()
            .map(|n| {
                let w = netdrv::vnic::VnicWire::attach(&n).expect("attach wire");
                let names = (0..w.port_count())
                    .map(|p| w.port_name(p).to_string())
                    .collect();
                (w, names)
            })
            .collect();
        Self { nics }
    }

    /// Injects a frame into the first NIC's `port`.
    pub fn send(&mut self, port: &str, frame: &[u8]) {
        let (w, names) = &mut self.nics[0];
        let p = names.iter().position(|n| n == port).expect("port");
        assert!(w.inject(p, frame), "RX ring full");
    }

    /// Collects frames for up to `wait` (returns early once `want` arrived).
    pub fn recv(&mut self, want: usize, wait: Duration) -> Vec<(String, Vec<u8>)> {
        let deadline = Instant::now() + wait;
        let mut out = Vec::new();
        while Instant::now() < deadline && out.len() < want {
            for (w, names) in &mut self.nics {
                for (p, name) in names.iter().enumerate() {
                    w.collect(p, 64, |f| out.push((name.clone(), f.to_vec())));
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        out
    }
}

/// Reads one switch counter by name from shmdump's JSON.
pub fn counter(dump: &serde_json::Value, switch: usize, name: &str) -> u64 {
    dump["switches"][switch]["counters"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {name}"))
}

/// Sums a counter over all switches.
pub fn counter_sum(dump: &serde_json::Value, name: &str) -> u64 {
    dump["switches"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["state"] != "empty")
        .map(|s| s["counters"][name].as_u64().unwrap())
        .sum()
}
