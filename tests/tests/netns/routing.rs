//! The routing mirror in a real namespace: controld in the appliance
//! namespace publishes the kernel's routes and neighbours of its switch
//! interfaces (l0 = port 0 "client", br0 = port 1 "backend"), follows
//! `ip route` / `ip neigh` changes, leaves other interfaces out, has the
//! kernel resolve next hops, and lets static config entries win.
//!
//! Waits are bounded (a deadline per condition) and assert outcomes only.

use std::time::{Duration, Instant};

use serde_json::Value;
use switchyard_tests::netns::{BACKEND_ADDRS, Bed};
use switchyard_tests::{Appliance, shmdump_json};

/// Longest wait for one published change.
const WAIT: Duration = Duration::from_secs(15);

/// Published routes as (prefix, port, via) and neighbours as
/// (address, mac, port), sorted.
type Table = (Vec<(String, u64, String)>, Vec<(String, String, u64)>);

fn table(inst: &str) -> Table {
    let v = shmdump_json(inst, &[]);
    let s = |x: &Value| x.as_str().unwrap_or("-").to_string();
    let mut routes: Vec<_> = v["routing"]["routes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (s(&r["prefix"]), r["port"].as_u64().unwrap(), s(&r["via"])))
        .collect();
    let mut neigh: Vec<_> = v["routing"]["neighbours"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| (s(&n["address"]), s(&n["mac"]), n["port"].as_u64().unwrap()))
        .collect();
    routes.sort();
    neigh.sort();
    (routes, neigh)
}

/// Waits until `cond` holds for the published table; returns it.
fn wait_for(app: &Appliance, what: &str, cond: impl Fn(&Table) -> bool) -> Table {
    let deadline = Instant::now() + WAIT;
    loop {
        let t = table(&app.instance);
        if cond(&t) {
            return t;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not published within {WAIT:?}\npublished: {t:?}\ncontrold log:\n{}",
            app.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn route(prefix: &str, port: u64, via: &str) -> (String, u64, String) {
    (prefix.to_string(), port, via.to_string())
}

fn mac_of(bed: &Bed, role: &str, ifname: &str) -> String {
    let out = bed
        .exec(role, &["cat", &format!("/sys/class/net/{ifname}/address")])
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn lb(bed: &Bed, args: &str) {
    let args: Vec<&str> = args.split_whitespace().collect();
    bed.exec("lb", &args).unwrap();
}

#[test]
fn mirror_follows_kernel_routes_and_neighbours_and_resolves_next_hops() {
    let bed = Bed::build();
    let (_inst, app) = switchyard_tests::netns::afpacket_appliance(&bed, "nat", 8080);
    let connected = vec![
        route("198.18.1.0/24", 0, "-"),
        route("198.19.0.0/24", 1, "-"),
    ];

    // The connected routes of l0 and br0, and the backends' MACs, which
    // nothing but controld's resolution request makes the kernel learn
    // (the appliance sends the backends nothing, and they it nothing).
    let mut want: Vec<(String, String, u64)> = BACKEND_ADDRS
        .iter()
        .enumerate()
        .map(|(i, a)| (a.to_string(), mac_of(&bed, &format!("b{}", i + 1), "e0"), 1))
        .collect();
    want.sort();
    let t = wait_for(&app, "connected routes and resolved backends", |t| {
        t.1 == want
    });
    assert_eq!(t.0, connected);

    // A route and a neighbour on a non-switch interface (x0), then a
    // route through br0: once the latter is published, the former were
    // read too, and left out.
    lb(&bed, "ip link add x0 type veth peer name x1");
    lb(&bed, "ip link set x0 up");
    lb(&bed, "ip link set x1 up");
    lb(&bed, "ip addr add 198.18.9.1/24 dev x0");
    lb(
        &bed,
        "ip neigh add 198.18.9.2 lladdr 02:00:00:00:09:02 dev x0 nud permanent",
    );
    lb(&bed, "ip route add 198.18.7.0/24 via 198.19.0.11");
    let t = wait_for(&app, "ip route add 198.18.7.0/24", |t| {
        t.0.contains(&route("198.18.7.0/24", 1, "198.19.0.11"))
    });
    let mut with_route = connected.clone();
    with_route.insert(1, route("198.18.7.0/24", 1, "198.19.0.11"));
    assert_eq!(t.0, with_route, "nothing of x0");
    assert_eq!(t.1, want, "nothing of x0");

    lb(&bed, "ip route del 198.18.7.0/24");
    wait_for(&app, "ip route del 198.18.7.0/24", |t| t.0 == connected);

    // A neighbour added and deleted on br0.
    lb(
        &bed,
        "ip neigh add 198.19.0.50 lladdr 02:00:00:00:00:50 dev br0 nud permanent",
    );
    let learned = (
        "198.19.0.50".to_string(),
        "02:00:00:00:00:50".to_string(),
        1,
    );
    wait_for(&app, "ip neigh add 198.19.0.50", |t| t.1.contains(&learned));
    lb(&bed, "ip neigh del 198.19.0.50 dev br0");
    wait_for(&app, "ip neigh del 198.19.0.50", |t| t.1 == want);

    // A gateway nobody answers for: the route is published at once, and
    // controld asks the kernel to resolve the gateway (an entry appears in
    // the kernel's table though nothing else sends to it); it stays out of
    // the published neighbours.
    lb(&bed, "ip route add 198.18.8.0/24 via 198.19.0.20");
    wait_for(&app, "ip route add 198.18.8.0/24", |t| {
        t.0.contains(&route("198.18.8.0/24", 1, "198.19.0.20"))
    });
    let deadline = Instant::now() + WAIT;
    loop {
        let out = bed
            .exec("lb", &["ip", "neigh", "show", "198.19.0.20", "dev", "br0"])
            .unwrap();
        if !out.stdout.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "controld never asked the kernel to resolve 198.19.0.20:\n{}",
            app.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!table(&app.instance).1.iter().any(|n| n.0 == "198.19.0.20"));
    drop(app);
}

/// Static `[[route]]` and `[[neighbour]]` win over mirrored entries for the
/// same prefix and address, and a reload that removes them brings the
/// kernel's back.
#[test]
fn static_entries_win_over_mirrored_ones_across_reloads() {
    let bed = Bed::build();
    let (_inst, app) = switchyard_tests::netns::afpacket_appliance(&bed, "nat", 8080);
    lb(&bed, "ip route add 198.18.7.0/24 via 198.19.0.11");
    wait_for(&app, "ip route add 198.18.7.0/24", |t| {
        t.0.contains(&route("198.18.7.0/24", 1, "198.19.0.11"))
    });
    let b1 = ("198.19.0.11".to_string(), mac_of(&bed, "b1", "e0"), 1);
    wait_for(&app, "backend1 resolved", |t| t.1.contains(&b1));

    let base = std::fs::read_to_string(&app.config_path).unwrap();
    let with_static = format!(
        "{base}[[route]]\nprefix = \"198.18.7.0/24\"\nport = \"client\"\nvia = \"198.18.1.2\"\n\
         [[neighbour]]\naddress = \"198.19.0.11\"\nmac = \"02:00:00:00:00:11\"\nport = \"backend\"\n"
    );
    app.reload_with(&with_static);
    let t = wait_for(&app, "static route and neighbour", |t| {
        t.0.contains(&route("198.18.7.0/24", 0, "198.18.1.2"))
    });
    assert!(!t.0.contains(&route("198.18.7.0/24", 1, "198.19.0.11")));
    let n: Vec<_> = t.1.iter().filter(|n| n.0 == "198.19.0.11").collect();
    assert_eq!(
        n,
        vec![&(
            "198.19.0.11".to_string(),
            "02:00:00:00:00:11".to_string(),
            1
        )]
    );

    app.reload_with(&base);
    let t = wait_for(&app, "mirrored entries back", |t| {
        t.0.contains(&route("198.18.7.0/24", 1, "198.19.0.11"))
    });
    assert!(t.1.contains(&b1), "{t:?}");
    drop(app);
}

/// More kernel routes on switch interfaces than `[limits] routes`: the
/// longest prefixes are published, the rest left out with a logged error,
/// and controld keeps running and following changes.
#[test]
fn over_capacity_publishes_the_longest_prefixes_and_keeps_running() {
    let bed = Bed::build();
    let (inst, app) = switchyard_tests::netns::afpacket_appliance(&bed, "nat", 8080);
    let cfg = std::fs::read_to_string(&app.config_path).unwrap();
    drop(app);
    let cfg = cfg.replacen(
        "connections = 65536\n",
        "connections = 65536\nroutes = 3\n",
        1,
    );
    let app = Appliance::start_in(Some(&bed.ns("lb")), &inst, &cfg);
    lb(&bed, "ip route add 198.18.0.0/16 via 198.19.0.11");
    lb(&bed, "ip route add 198.18.7.0/25 via 198.19.0.11");
    let t = wait_for(&app, "the /25", |t| {
        t.0.contains(&route("198.18.7.0/25", 1, "198.19.0.11"))
    });
    assert_eq!(
        t.0,
        vec![
            route("198.18.1.0/24", 0, "-"),
            route("198.18.7.0/25", 1, "198.19.0.11"),
            route("198.19.0.0/24", 1, "-"),
        ]
    );
    assert!(
        app.log().contains("1 routes left out (limits.routes 3)"),
        "{}",
        app.log()
    );
    // Room again: the /16 is published.
    lb(&bed, "ip route del 198.18.7.0/25");
    let t = wait_for(&app, "the /16", |t| {
        t.0.contains(&route("198.18.0.0/16", 1, "198.19.0.11"))
    });
    assert_eq!(t.0.len(), 3);
    drop(app);
}
