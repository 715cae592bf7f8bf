//! ICMP for VIP flows end to end: a client behind a router whose
//! client-facing link has a smaller MTU than the rest of the path.
//!
//! ```text
//!  far client (cx)            router (cl)                    appliance (lb)
//!  x0 198.18.2.2/24 ---- r0 198.18.2.1/24 (MTU 1280)
//!     (MTU 1500)              c0 198.18.1.2/24 ------------- l0 198.18.1.1/24 ...
//! ```
//! The far client's SYN announces an MSS for 1500-byte packets, so a NAT
//! backend sends 1500-byte DF segments: backend -> appliance (source
//! rewritten to the VIP) -> router, which cannot send them on its
//! 1280-byte link and answers "fragmentation needed" to their source, the
//! VIP. Only if the appliance hands that error on to the backend (outer
//! destination and quoted header rewritten back to the backend's address
//! and port) does the backend's TCP lower its path MTU; otherwise the
//! transfer stalls (Linux does no black-hole probing by default). The
//! same holds for DR and tunnel backends, whose replies leave with the VIP
//! as source through the appliance's kernel: the error, sent to the VIP,
//! reaches them only through the switch (MACs only; encapsulated).

use std::process::Command;

use switchyard_tests::netns::{Bed, afpacket_appliance, prepare};
use switchyard_tests::{counter_sum, shmdump_json};

const FAR_CLIENT: &str = "198.18.2.2";
const ROUTER_FAR: &str = "198.18.2.1";
const ROUTER_NEAR: &str = "198.18.1.2";
const SIZE: u64 = 20_000_000;

/// The far client's namespace; removed on drop (before the bed's own).
struct FarClient {
    ns: String,
}

impl Drop for FarClient {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

/// Adds the far client `cx` behind the client namespace, which becomes a
/// router whose link to `cx` has MTU `mtu` (the far client's own side
/// keeps 1500), and routes the far client's net from the appliance via the
/// router. Must run before the appliance starts (its routing mirror reads
/// the route).
fn far_client_behind_router(bed: &Bed, mtu: u32) -> FarClient {
    let id = &bed.id;
    let guard = FarClient { ns: bed.ns("cx") };
    let run = |args: &[&str]| {
        let st = Command::new(args[0]).args(&args[1..]).output().unwrap();
        assert!(
            st.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&st.stderr)
        );
    };
    run(&["ip", "netns", "add", &guard.ns]);
    bed.exec("cx", &["ip", "link", "set", "lo", "up"]).unwrap();
    run(&[
        "ip",
        "link",
        "add",
        &format!("r{id}"),
        "netns",
        &bed.ns("cl"),
        "type",
        "veth",
        "peer",
        "name",
        &format!("x{id}"),
        "netns",
        &guard.ns,
    ]);
    let mtu = mtu.to_string();
    for cmd in [
        vec!["ip", "link", "set", &format!("r{id}"), "name", "r0"],
        vec!["ip", "link", "set", "r0", "mtu", &mtu],
        vec![
            "ip",
            "addr",
            "add",
            &format!("{ROUTER_FAR}/24"),
            "dev",
            "r0",
        ],
        vec!["ip", "link", "set", "r0", "up"],
        vec!["sysctl", "-qw", "net.ipv4.ip_forward=1"],
        vec![
            "ethtool", "-K", "r0", "tso", "off", "gso", "off", "gro", "off", "tx", "off",
        ],
    ] {
        bed.exec("cl", &cmd).unwrap();
    }
    for cmd in [
        vec!["ip", "link", "set", &format!("x{id}"), "name", "x0"],
        vec![
            "ip",
            "addr",
            "add",
            &format!("{FAR_CLIENT}/24"),
            "dev",
            "x0",
        ],
        vec!["ip", "link", "set", "x0", "up"],
        vec!["ip", "route", "add", "default", "via", ROUTER_FAR],
        vec![
            "ethtool", "-K", "x0", "tso", "off", "gso", "off", "gro", "off", "tx", "off",
        ],
    ] {
        bed.exec("cx", &cmd).unwrap();
    }
    bed.exec(
        "lb",
        &["ip", "route", "add", "198.18.2.0/24", "via", ROUTER_NEAR],
    )
    .unwrap();
    // The appliance's kernel resolves the router now (the first contact
    // of a fresh next hop is another issue's item).
    bed.exec("lb", &["ping", "-c", "1", "-W", "2", ROUTER_NEAR])
        .unwrap();
    guard
}

/// A 20 MB NAT download by a client behind a 1280-byte link completes
/// because the router's fragmentation-needed, sent to the VIP, reaches the
/// backend; and the far client's pings to the VIP are answered by the
/// switch. Before ICMP for VIP flows, the error was dropped as
/// `drop_not_ours` and the download stalled until curl's limit.
#[test]
fn frag_needed_from_a_client_side_router_reaches_the_nat_backend() {
    download_behind_a_small_mtu("nat");
}

/// As for NAT, with direct routing: the backend's replies leave through
/// the appliance's kernel with the VIP as source, the router's error goes
/// to the VIP, and the switch hands it to the backend (MACs only), which
/// owns the VIP.
#[test]
fn frag_needed_from_a_client_side_router_reaches_the_dr_backend() {
    download_behind_a_small_mtu("dr");
}

/// As for DR, with IP-in-IP: the error is encapsulated toward the backend
/// like the flow's data.
#[test]
fn frag_needed_from_a_client_side_router_reaches_the_tunnel_backend() {
    download_behind_a_small_mtu("tunnel");
}

fn download_behind_a_small_mtu(mode: &str) {
    let mut bed = Bed::build();
    let _far = far_client_behind_router(&bed, 1280);
    let port = prepare(&mut bed, mode);
    let (inst, app) = afpacket_appliance(&bed, mode, port);
    let url = format!("http://198.18.0.10/bytes/{SIZE}");
    let out = bed
        .exec(
            "cx",
            &[
                "curl",
                "-sS",
                "--max-time",
                "20",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code} %{size_download}",
                &url,
            ],
        )
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
    let dump = shmdump_json(&inst, &[]);
    let c = &dump["switches"][0]["counters"];
    assert_eq!(
        out,
        Ok(format!("200 {SIZE}")),
        "{mode}: the download through the 1280-byte link: {c}\n{}",
        app.log()
    );
    assert!(
        counter_sum(&dump, "icmp_forwarded") >= 1,
        "{mode}: the router's frag-needed went to the backend: {c}"
    );
    assert_eq!(counter_sum(&dump, "drop_icmp_no_flow"), 0, "{c}");
    assert_eq!(counter_sum(&dump, "drop_icmp_malformed"), 0, "{c}");

    // Echo to the VIP: answered by the switch, one reply per request.
    let before = counter_sum(&dump, "icmp_echo_answered");
    let ping = bed.exec(
        "cx",
        &[
            "ping",
            "-n",
            "-c",
            "3",
            "-i",
            "0.2",
            "-W",
            "2",
            "198.18.0.10",
        ],
    );
    assert!(ping.is_ok(), "{mode}: ping the VIP: {ping:?}");
    let dump =
        switchyard_tests::dump_with_counters(&inst, &[], &[("icmp_echo_answered", before + 3)]);
    assert_eq!(counter_sum(&dump, "icmp_echo_answered"), before + 3);
    drop(app);
}
