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
