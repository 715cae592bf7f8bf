//! Helpers for the multi-process integration tests: start a real controld
//! (which starts real switchd processes) on virtual NICs under a unique
//! instance name, and always clean up — processes, region and NICs — even
//! when a test fails.

pub mod churn;
pub mod netns;

pub use tools::appliance::{Appliance, bin, bin_dir};

use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use shm_layout::Region;

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

    /// Injects a frame into `port` of the `nic`-th NIC (one per switch).
    pub fn send_on(&mut self, nic: usize, port: &str, frame: &[u8]) {
        let (w, names) = &mut self.nics[nic];
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

/// The client-side router of [`render`]'s appliance: its address and MAC.
pub const CLIENT_GW_IP: [u8; 4] = [198, 18, 0, 1];
pub const CLIENT_GW_MAC: [u8; 6] = [2, 0, 0, 0, 2, 1];
/// [`render`]'s VIP.
pub const VIP: [u8; 4] = [198, 18, 0, 10];

impl Wire {
    /// Proves that the switch serving `nic` has handled every frame
    /// injected into it before: asks for [`VIP`]'s MAC on the client port
    /// as [`CLIENT_GW_IP`] and waits for the answer, twice (the second
    /// answer leaves in a later burst than anything the first one's burst
    /// transmitted, on any port). Returns every other frame that arrived
    /// meanwhile, for the caller to check that nothing (else) came out.
    /// The switch counts two `arp_replies`.
    pub fn settle(&mut self, nic: usize) -> Vec<(String, Vec<u8>)> {
        let mut req = vec![0xff; 6];
        req.extend_from_slice(&CLIENT_GW_MAC);
        req.extend_from_slice(&[0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 1]);
        req.extend_from_slice(&CLIENT_GW_MAC);
        req.extend_from_slice(&CLIENT_GW_IP);
        req.extend_from_slice(&[0; 6]);
        req.extend_from_slice(&VIP);
        let is_answer = |(port, f): &(String, Vec<u8>)| {
            port == "client"
                && f.len() >= 42
                && f[12..14] == [8, 6]
                && f[20..22] == [0, 2]
                && f[28..32] == VIP
        };
        let mut other = Vec::new();
        for _ in 0..2 {
            self.send_on(nic, "client", &req);
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                assert!(Instant::now() < deadline, "no ARP answer from switch {nic}");
                let got = self.recv(1, Duration::from_millis(50));
                let (answers, rest): (Vec<_>, Vec<_>) = got.into_iter().partition(is_answer);
                other.extend(rest);
                if !answers.is_empty() {
                    break;
                }
            }
        }
        other
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

/// `shmdump --json` (with `extra` arguments) once the switches' counters
/// have reached `want` (name, total over the switches), polled for up to
/// 10 s. A switch publishes its counters on the loop after its last frame,
/// so on a busy machine a test can see that frame's answer first. Counters
/// only grow: one past its wanted value fails at once.
pub fn dump_with_counters(
    instance: &str,
    extra: &[&str],
    want: &[(&str, u64)],
) -> serde_json::Value {
    wait_for(Duration::from_secs(10), || {
        let dump = shmdump_json(instance, extra);
        let got: Vec<(&str, u64, u64)> = want
            .iter()
            .map(|&(name, w)| (name, counter_sum(&dump, name), w))
            .collect();
        if let Some((name, g, w)) = got.iter().find(|(_, g, w)| g > w) {
            panic!("counter {name} is {g}, past the {w} wanted");
        }
        if got.iter().all(|(_, g, w)| g == w) {
            Ok(dump)
        } else {
            Err(format!("counters (name, seen, wanted): {got:?}"))
        }
    })
}

/// Polls `check` every 20 ms until it returns `Ok`, for at most `limit`,
/// and returns its value; past the limit, panics with the last `Err` (what
/// was seen instead of what was awaited).
pub fn wait_for<T>(limit: Duration, mut check: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        match check() {
            Ok(v) => return v,
            Err(e) if Instant::now() >= deadline => panic!("gave up after {limit:?}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// The published record of service `name` in a `shmdump --json` dump.
pub fn dump_service(dump: &serde_json::Value, name: &str) -> serde_json::Value {
    dump["config"]["services"]
        .as_array()
        .expect("services")
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no service {name} in the dump"))
        .clone()
}
