//! The network-namespace test bed: a client, an appliance and three
//! backends, joined by veth links (the backends behind a bridge in the
//! appliance namespace), addressed from 198.18.0.0/15. Names are unique per
//! test so tests may run in parallel; everything is removed on drop,
//! including on a panic.
//!
//! ```text
//!  client (cl)                 appliance (lb)                   backends (b1..b3)
//!  c0 198.18.1.2/24 ----- l0 198.18.1.1/24
//!                              br0 198.19.0.1/24 --+-- veth -- e0 198.19.0.11/24
//!                                                  +-- veth -- e0 198.19.0.12/24
//!                                                  +-- veth -- e0 198.19.0.13/24
//! ```
//! The client routes 198.18.0.0/16 (the VIPs) and the backend net via the
//! appliance; backends default-route via 198.19.0.1.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

pub const CLIENT_ADDR: &str = "198.18.1.2";
pub const APPLIANCE_CLIENT_ADDR: &str = "198.18.1.1";
pub const APPLIANCE_BACKEND_ADDR: &str = "198.19.0.1";
pub const BACKEND_ADDRS: [&str; 3] = ["198.19.0.11", "198.19.0.12", "198.19.0.13"];

/// A built topology. Dropping it kills what was spawned in it and deletes
/// the namespaces (which deletes their interfaces).
pub struct Bed {
    pub id: String,
    children: Vec<Child>,
}

fn run(args: &[&str]) -> Result<Output, String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{}: {e}", args.join(" ")))?;
    if !out.status.success() {
        return Err(format!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(out)
}

impl Bed {
    /// Namespace name of a role: "cl", "lb", "b1".."b3".
    pub fn ns(&self, role: &str) -> String {
        format!("sy{}-{role}", self.id)
    }

    /// Builds the topology; panics with the failing command if it cannot.
    pub fn build() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let id = format!(
            "{:x}{:x}",
            std::process::id() % 0xfffff,
            N.fetch_add(1, Ordering::Relaxed)
        );
        let bed = Bed {
            id,
            children: Vec::new(),
        };
        if let Err(e) = bed.setup() {
            panic!("building the namespace test bed (needs root and iproute2): {e}");
        }
        bed
    }

    fn setup(&self) -> Result<(), String> {
        let id = &self.id;
        for role in ["cl", "lb", "b1", "b2", "b3"] {
            run(&["ip", "netns", "add", &self.ns(role)])?;
            self.exec(role, &["ip", "link", "set", "lo", "up"])?;
        }
        let (cl, lb) = (self.ns("cl"), self.ns("lb"));
        // client <-> appliance
        run(&[
            "ip",
            "link",
            "add",
            &format!("c{id}"),
            "netns",
            &cl,
            "type",
            "veth",
            "peer",
            "name",
            &format!("l{id}"),
            "netns",
            &lb,
        ])?;
        self.exec(
            "cl",
            &["ip", "link", "set", &format!("c{id}"), "name", "c0"],
        )?;
        self.exec(
            "lb",
            &["ip", "link", "set", &format!("l{id}"), "name", "l0"],
        )?;
        self.exec(
            "cl",
            &[
                "ip",
                "addr",
                "add",
                &format!("{CLIENT_ADDR}/24"),
                "dev",
                "c0",
            ],
        )?;
        self.exec("cl", &["ip", "link", "set", "c0", "up"])?;
        self.exec(
            "lb",
            &[
                "ip",
                "addr",
                "add",
                &format!("{APPLIANCE_CLIENT_ADDR}/24"),
                "dev",
                "l0",
            ],
        )?;
        self.exec("lb", &["ip", "link", "set", "l0", "up"])?;
        self.exec(
            "cl",
            &[
                "ip",
                "route",
                "add",
                "198.18.0.0/16",
                "via",
                APPLIANCE_CLIENT_ADDR,
            ],
        )?;
        self.exec(
            "cl",
            &[
                "ip",
                "route",
                "add",
                "198.19.0.0/16",
                "via",
                APPLIANCE_CLIENT_ADDR,
            ],
        )?;
        // appliance bridge <-> backends
        self.exec("lb", &["ip", "link", "add", "br0", "type", "bridge"])?;
        self.exec(
            "lb",
            &[
                "ip",
                "addr",
                "add",
                &format!("{APPLIANCE_BACKEND_ADDR}/24"),
                "dev",
                "br0",
            ],
        )?;
        self.exec("lb", &["ip", "link", "set", "br0", "up"])?;
        for (i, addr) in BACKEND_ADDRS.iter().enumerate() {
            let role = format!("b{}", i + 1);
            let (outer, inner) = (format!("p{i}{id}"), format!("e{i}{id}"));
            run(&[
                "ip",
                "link",
                "add",
                &outer,
                "netns",
                &lb,
                "type",
                "veth",
                "peer",
                "name",
                &inner,
                "netns",
                &self.ns(&role),
            ])?;
            self.exec("lb", &["ip", "link", "set", &outer, "master", "br0"])?;
            self.exec("lb", &["ip", "link", "set", &outer, "up"])?;
            self.exec(&role, &["ip", "link", "set", &inner, "name", "e0"])?;
            self.exec(
                &role,
                &["ip", "addr", "add", &format!("{addr}/24"), "dev", "e0"],
            )?;
            self.exec(&role, &["ip", "link", "set", "e0", "up"])?;
            self.exec(
                &role,
                &[
                    "ip",
                    "route",
                    "add",
                    "default",
                    "via",
                    APPLIANCE_BACKEND_ADDR,
                ],
            )?;
            self.offloads_off(&role, "e0")?;
            self.offloads_off("lb", &outer)?;
        }
        self.offloads_off("cl", "c0")?;
        self.offloads_off("lb", "l0")?;
        self.offloads_off("lb", "br0")?;
        Ok(())
    }

    /// Segmentation and receive offloads off: a packet switch sees wire-sized
    /// frames (GRO/GSO would hand AF_PACKET 64 KiB super-frames), and
    /// checksums are complete on the wire, as with a physical NIC.
    fn offloads_off(&self, role: &str, dev: &str) -> Result<(), String> {
        self.exec(
            role,
            &[
                "ethtool", "-K", dev, "tso", "off", "gso", "off", "gro", "off", "tx", "off",
            ],
        )
        .map(|_| ())
    }

    /// Runs a command in a namespace and waits for it.
    pub fn exec(&self, role: &str, args: &[&str]) -> Result<Output, String> {
        let ns = self.ns(role);
        let mut full = vec!["ip", "netns", "exec", &ns];
        full.extend_from_slice(args);
        run(&full)
    }

    /// Starts a long-running program in a namespace; it is killed on drop.
    pub fn spawn(&mut self, role: &str, args: &[&str]) -> &mut Child {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns(role)])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {args:?} in {role}: {e}"));
        self.children.push(child);
        self.children.last_mut().expect("just pushed")
    }

    /// Namespaces of this bed that currently exist.
    pub fn existing(id: &str) -> Vec<String> {
        let out = Command::new("ip")
            .args(["netns", "list"])
            .output()
            .map(|o| o.stdout)
            .unwrap_or_default();
        String::from_utf8_lossy(&out)
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|n| n.starts_with(&format!("sy{id}-")))
            .map(str::to_string)
            .collect()
    }
}

/// The VIP of the test services.
pub const VIP: &str = "198.18.0.10";

/// Prepares the bed for a forwarding mode and starts the backends; returns
/// the backend port the web service must use.
/// - `nat`: the appliance kernel does not forward; backends listen on
///   :8080 (HTTP) and :5353 (UDP) of their own address.
/// - `dr`: backends own the VIP on lo (arp_ignore/arp_announce) and listen
///   on VIP:80 and VIP:53; the appliance kernel routes their replies to the
///   client and blackholes the VIP, so only switchyard forwards client->VIP
///   traffic.
/// - `tunnel`: as `dr`, and each backend runs `ipip-decap` (this kernel has
///   no ipip device) to take the inner packet out of IP-in-IP.
pub fn prepare(bed: &mut Bed, mode: &str) -> u16 {
    match mode {
        "dr" | "tunnel" => {
            bed.exec("lb", &["sysctl", "-qw", "net.ipv4.ip_forward=1"])
                .unwrap();
            bed.exec("lb", &["ip", "route", "add", "blackhole", "198.18.0.0/24"])
                .unwrap();
            for i in 1..=3 {
                let role = format!("b{i}");
                bed.exec(
                    &role,
                    &["ip", "addr", "add", &format!("{VIP}/32"), "dev", "lo"],
                )
                .unwrap();
                bed.exec(&role, &["sysctl", "-qw", "net.ipv4.conf.all.arp_ignore=1"])
                    .unwrap();
                bed.exec(
                    &role,
                    &["sysctl", "-qw", "net.ipv4.conf.all.arp_announce=2"],
                )
                .unwrap();
                if mode == "tunnel" {
                    start_decap(bed, &role);
                }
            }
            start_backends(bed, |_| format!("{VIP}:80"), |_| format!("{VIP}:53"));
            80
        }
        _ => {
            bed.exec("lb", &["sysctl", "-qw", "net.ipv4.ip_forward=0"])
                .unwrap();
            start_backends(
                bed,
                |addr| format!("{addr}:8080"),
                |addr| format!("{addr}:5353"),
            );
            8080
        }
    }
}

/// Starts `ipip-decap` in a backend namespace and waits until it receives.
fn start_decap(bed: &mut Bed, role: &str) {
    let decap = crate::bin("ipip-decap");
    let child = bed.spawn(role, &[decap.to_str().unwrap(), "--lifetime", "600"]);
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(
        line.starts_with("ipip-decap ready"),
        "ipip-decap in {role}: {line:?}"
    );
}

/// Starts testbackend servers ("backend1".."backend3") in the backend
/// namespaces: HTTP on `http_bind(addr)` and UDP echo on `udp_bind(addr)`.
pub fn start_backends(
    bed: &mut Bed,
    http_bind: impl Fn(&str) -> String,
    udp_bind: impl Fn(&str) -> String,
) {
    let tb = crate::bin("testbackend");
    for (i, addr) in BACKEND_ADDRS.iter().enumerate() {
        let name = format!("backend{}", i + 1);
        let http = http_bind(addr);
        let udp = udp_bind(addr);
        let args = [
            tb.to_str().unwrap(),
            "--name",
            &name,
            "--http",
            &http,
            "--udp",
            &udp,
        ];
        let child = bed.spawn(&format!("b{}", i + 1), &args);
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.starts_with(&format!("testbackend {name}")), "{line}");
    }
}

/// Starts controld (and its switch) in the appliance namespace on AF_PACKET
/// ports l0 (client side) and br0 (backend side), with service "web"
/// (VIP 198.18.0.10:80, weights 1:2:3 to backends on `backend_port`) and a
/// UDP service "dns" (VIP:53 to backends on :5353 for NAT, :53 otherwise),
/// both in `mode`; tunnels start at the appliance's br0 address. Routing
/// comes from the kernel mirror alone.
pub fn afpacket_appliance(bed: &Bed, mode: &str, backend_port: u16) -> (String, crate::Appliance) {
    afpacket_appliance_sized(bed, mode, backend_port, 65536)
}

/// [`afpacket_appliance`] with `[limits] connections` set.
pub fn afpacket_appliance_sized(
    bed: &Bed,
    mode: &str,
    backend_port: u16,
    connections: u32,
) -> (String, crate::Appliance) {
    afpacket_appliance_with(bed, mode, backend_port, connections, |_| String::new())
}

/// [`afpacket_appliance_sized`] with `extra(instance)` appended to the
/// configuration (tables of its own, like `[records]`).
pub fn afpacket_appliance_with(
    bed: &Bed,
    mode: &str,
    backend_port: u16,
    connections: u32,
    extra: impl Fn(&str) -> String,
) -> (String, crate::Appliance) {
    let inst = crate::unique(&format!("af{mode}"));
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mut cfg = format!(
        "instance = \"{inst}\"\n[limits]\nconnections = {connections}\n\n\
         [[port]]\nname = \"client\"\ndriver = \"afpacket\"\ninterface = \"l0\"\n\n\
         [[port]]\nname = \"backend\"\ndriver = \"afpacket\"\ninterface = \"br0\"\n\n\
         [[switch]]\nname = \"sw0\"\ncpu = {}\nports = [\"client\", \"backend\"]\nidle = \"adaptive\"\n\n\
         [[service]]\nname = \"web\"\nvip = \"198.18.0.10\"\nport = 80\nprotocol = \"tcp\"\nmode = \"{mode}\"\n",
        cpus - 1
    );
    for (i, addr) in BACKEND_ADDRS.iter().enumerate() {
        cfg += &format!(
            "  [[service.backend]]\n  name = \"backend{}\"\n  address = \"{addr}\"\n  port = {backend_port}\n  weight = {}\n",
            i + 1,
            i + 1
        );
    }
    let udp_port = if mode == "nat" { 5353 } else { 53 };
    cfg += &format!(
        "[[service]]\nname = \"dns\"\nvip = \"{VIP}\"\nport = 53\nprotocol = \"udp\"\nmode = \"{mode}\"\n"
    );
    for (i, addr) in BACKEND_ADDRS.iter().enumerate() {
        cfg += &format!(
            "  [[service.backend]]\n  name = \"dns{}\"\n  address = \"{addr}\"\n  port = {udp_port}\n",
            i + 1
        );
    }
    if mode == "tunnel" {
        cfg += &format!("[tunnel]\nsource = \"{APPLIANCE_BACKEND_ADDR}\"\n");
    }
    cfg += &extra(&inst);
    // No [[route]] or [[neighbour]]: controld mirrors the namespace's
    // routes and neighbours (on by default with afpacket ports) and has the
    // kernel resolve the backends.
    let app = crate::Appliance::start_in(Some(&bed.ns("lb")), &inst, &cfg);
    (inst, app)
}

/// Starts controld (and its switch) in the appliance namespace on
/// AF_PACKET ports l0 and br0 with one NAT service "web" (`vip`:80 to the
/// backends' :8080, weights 1:2:3), routing mirrored from the kernel, as
/// [`afpacket_appliance`] does; `vip` may be on the clients' own subnet
/// (198.18.1.0/24).
pub fn afpacket_appliance_vip(bed: &Bed, vip: &str) -> (String, crate::Appliance) {
    afpacket_web_appliance(bed, "afvip", vip, 65536, "")
}

/// [`afpacket_appliance_vip`]'s appliance with `connections` table slots
/// and `service_extra` (lines of the "web" service, such as
/// `syn_proxy = true\n`); the instance name starts with `tag`.
pub fn afpacket_web_appliance(
    bed: &Bed,
    tag: &str,
    vip: &str,
    connections: u32,
    service_extra: &str,
) -> (String, crate::Appliance) {
    let inst = crate::unique(tag);
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mut cfg = format!(
        "instance = \"{inst}\"\n[limits]\nconnections = {connections}\n\n\
         [[port]]\nname = \"client\"\ndriver = \"afpacket\"\ninterface = \"l0\"\n\n\
         [[port]]\nname = \"backend\"\ndriver = \"afpacket\"\ninterface = \"br0\"\n\n\
         [[switch]]\nname = \"sw0\"\ncpu = {}\nports = [\"client\", \"backend\"]\nidle = \"adaptive\"\n\n\
         [[service]]\nname = \"web\"\nvip = \"{vip}\"\nport = 80\nprotocol = \"tcp\"\nmode = \"nat\"\n{service_extra}",
        cpus - 1
    );
    for (i, addr) in BACKEND_ADDRS.iter().enumerate() {
        cfg += &format!(
            "  [[service.backend]]\n  name = \"backend{}\"\n  address = \"{addr}\"\n  port = 8080\n  weight = {}\n",
            i + 1,
            i + 1
        );
    }
    let app = crate::Appliance::start_in(Some(&bed.ns("lb")), &inst, &cfg);
    (inst, app)
}

/// The MAC of interface `ifname` in namespace `role`, as "aa:bb:..".
pub fn mac_of(bed: &Bed, role: &str, ifname: &str) -> String {
    let out = bed
        .exec(role, &["cat", &format!("/sys/class/net/{ifname}/address")])
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Sends one raw Ethernet frame (`frame`, given in hex) out of `ifname`
/// in namespace `role` (python3's AF_PACKET socket).
pub fn send_raw_frame(bed: &Bed, role: &str, ifname: &str, frame_hex: &str) {
    let py = format!(
        "import socket; s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW); \
         s.bind(('{ifname}', 0)); s.send(bytes.fromhex('{frame_hex}'))"
    );
    bed.exec(role, &["python3", "-c", &py]).unwrap();
}

/// The TCP segments the kernel of namespace `role` retransmitted
/// (`RetransSegs` of its /proc/net/snmp; SYN retransmissions included).
pub fn tcp_retransmits(bed: &Bed, role: &str) -> u64 {
    let out = bed.exec(role, &["cat", "/proc/net/snmp"]).unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let tcp: Vec<&str> = text.lines().filter(|l| l.starts_with("Tcp:")).collect();
    let (names, values) = (tcp[0].split_whitespace(), tcp[1].split_whitespace());
    names
        .zip(values)
        .find(|(n, _)| *n == "RetransSegs")
        .and_then(|(_, v)| v.parse().ok())
        .expect("RetransSegs in /proc/net/snmp")
}

/// The neighbours published in the routing slot of `inst`, as
/// (address, mac) pairs.
pub fn published_neighbours(inst: &str) -> Vec<(String, String)> {
    let v = crate::shmdump_json(inst, &[]);
    v["routing"]["neighbours"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|n| {
                    (
                        n["address"].as_str().unwrap_or("-").to_string(),
                        n["mac"].as_str().unwrap_or("-").to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Waits (bounded by `limit`) until `cond` holds of the neighbours
/// published for `inst`; panics with them if it does not.
pub fn wait_neighbours(
    inst: &str,
    limit: std::time::Duration,
    what: &str,
    cond: impl Fn(&[(String, String)]) -> bool,
) {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let n = published_neighbours(inst);
        if cond(&n) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not published within {limit:?}: {n:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for role in ["cl", "lb", "b1", "b2", "b3"] {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.ns(role)])
                .status();
        }
    }
}
