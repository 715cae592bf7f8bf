//! Tests of parsing and validation: every rule has a test asserting the
//! exact message.

use super::*;

/// A small valid file; tests append to it or replace parts of it.
const BASE: &str = r#"
instance = "t"

[[port]]
name = "client"
driver = "vnic"
mac = "02:00:00:00:00:01"

[[port]]
name = "backend"
driver = "vnic"
mac = "02:00:00:00:00:02"

[[switch]]
name = "sw0"
cpu = 1
ports = ["client", "backend"]

[[service]]
name = "web"
vip = "198.18.0.10"
port = 80
protocol = "tcp"

  [[service.backend]]
  name = "web1"
  address = "198.19.1.1"
  port = 8080
"#;

fn err(text: &str) -> String {
    match parse(text) {
        Ok(c) => panic!("accepted: {c:?}"),
        Err(e) => e.to_string(),
    }
}

/// `BASE` with `from` replaced by `to` (which must occur exactly once).
fn with(from: &str, to: &str) -> String {
    assert_eq!(BASE.matches(from).count(), 1, "{from:?}");
    BASE.replacen(from, to, 1)
}

/// `BASE` followed by `more`.
fn plus(more: &str) -> String {
    format!("{BASE}\n{more}")
}

/// `BASE` with `table` (e.g. `[limits]` lines) inserted before the ports.
fn head(table: &str) -> String {
    with(
        "\n[[port]]\nname = \"client\"",
        &format!("\n{table}\n[[port]]\nname = \"client\""),
    )
}

fn example(name: &str) -> Config {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../packaging/examples")
        .join(name);
    load(&path).unwrap_or_else(|e| panic!("{e}"))
}

fn ip(a: u8, b: u8, c: u8, d: u8) -> Ipv4Addr {
    Ipv4Addr::new(a, b, c, d)
}

#[test]
fn demo_example_parses_with_all_fields() {
    let c = example("demo.toml");
    let want = Config {
        instance: "demo".into(),
        limits: Limits {
            services: 16,
            backends: 1024,
            connections: 1 << 20,
            routes: 256,
            neighbours: 256,
            maglev_table_size: 65537,
            syn_proxy_auto_syn_rate: 20_000,
            syn_proxy_auto_occupancy: 50,
        },
        timeouts: Timeouts {
            tcp_syn: 10,
            tcp_established: 900,
            tcp_fin: 30,
            udp: 60,
            tcp_provisional: 3,
        },
        publish: Publish {
            ack_timeout_ms: 500,
        },
        tunnel: Tunnel::default(),
        routing: Routing {
            mirror: false,
            resolve: false,
        },
        admin: Admin::default(),
        records: Records::default(),
        agents: None,
        ports: vec![
            Port {
                name: "client".into(),
                driver: Driver::Vnic,
                mac: [2, 0, 0, 0, 0, 1],
                ring_size: 1024,
                interface: None,
                promiscuous: true,
                mtu: 1500,
            },
            Port {
                name: "backend".into(),
                driver: Driver::Vnic,
                mac: [2, 0, 0, 0, 0, 2],
                ring_size: 1024,
                interface: None,
                promiscuous: true,
                mtu: 1500,
            },
        ],
        switches: vec![Switch {
            name: "sw0".into(),
            cpu: 1,
            ports: vec![0, 1],
            port_names: vec!["client".into(), "backend".into()],
            idle: Idle::Adaptive,
            burst: 32,
            engine: Engine::Filter,
            syn_queue: 256,
            flow_cache: 65536,
        }],
        services: vec![
            Service {
                name: "web".into(),
                vip: ip(198, 18, 0, 10),
                port: 80,
                protocol: Protocol::Tcp,
                mode: Mode::Nat,
                scheduler: Scheduler::Maglev,
                on_backend_down: OnDown::Reschedule,
                queue_timeout_ms: 1000,
                loading: None,
                syn_proxy: SynProxy::Off,
                backends: (1..=3)
                    .map(|i| Backend {
                        name: format!("web{i}"),
                        address: ip(198, 19, 1, i),
                        port: 8080,
                        weight: u32::from(i),
                        max_conns: 0,
                        health: None,
                    })
                    .collect(),
                l7: None,
            },
            Service {
                name: "dns".into(),
                vip: ip(198, 18, 0, 10),
                port: 53,
                protocol: Protocol::Udp,
                mode: Mode::Nat,
                scheduler: Scheduler::Maglev,
                on_backend_down: OnDown::Reschedule,
                queue_timeout_ms: 1000,
                loading: None,
                syn_proxy: SynProxy::Off,
                backends: (1..=2)
                    .map(|i| Backend {
                        name: format!("dns{i}"),
                        address: ip(198, 19, 1, i),
                        port: 5353,
                        weight: 1,
                        max_conns: 0,
                        health: None,
                    })
                    .collect(),
                l7: None,
            },
        ],
        routes: vec![
            Route {
                prefix: ip(198, 19, 1, 0),
                prefix_len: 24,
                port: 1,
                port_name: "backend".into(),
                via: None,
            },
            Route {
                prefix: ip(198, 18, 100, 0),
                prefix_len: 24,
                port: 0,
                port_name: "client".into(),
                via: Some(ip(198, 18, 0, 1)),
            },
        ],
        neighbours: vec![
            Neighbour {
                address: ip(198, 19, 1, 1),
                mac: [2, 0, 0, 0, 1, 1],
                port: 1,
                port_name: "backend".into(),
            },
            Neighbour {
                address: ip(198, 19, 1, 2),
                mac: [2, 0, 0, 0, 1, 2],
                port: 1,
                port_name: "backend".into(),
            },
            Neighbour {
                address: ip(198, 19, 1, 3),
                mac: [2, 0, 0, 0, 1, 3],
                port: 1,
                port_name: "backend".into(),
            },
            Neighbour {
                address: ip(198, 18, 0, 1),
                mac: [2, 0, 0, 0, 2, 1],
                port: 0,
                port_name: "client".into(),
            },
        ],
        l7: L7::default(),
    };
    assert_eq!(c, want);
    assert_eq!(c.services[1].protocol.number(), 17);
    assert_eq!(c.services[0].protocol.number(), 6);
}

#[test]
fn two_switches_example_parses() {
    let c = example("two-switches.toml");
    let demo = example("demo.toml");
    assert_eq!(c.instance, "two-switches");
    let cpus: Vec<usize> = c.switches.iter().map(|s| s.cpu).collect();
    assert_eq!(cpus, [0, 1]);
    assert!(c.switches.iter().all(|s| s.ports == [0, 1]));
    assert_eq!(
        (&c.services, &c.routes, &c.neighbours),
        (&demo.services, &demo.routes, &demo.neighbours)
    );
}

#[test]
fn defaults_apply() {
    let c = parse(BASE).unwrap();
    assert_eq!(c.limits, Limits::default());
    assert_eq!(c.limits.connections, 1_048_576);
    assert_eq!(c.limits.maglev_table_size, 65537);
    assert_eq!(c.timeouts, Timeouts::default());
    assert_eq!(c.timeouts.tcp_established, 900);
    assert_eq!(c.publish.ack_timeout_ms, 500);
    assert_eq!(c.ports[0].ring_size, 1024);
    assert_eq!(c.switches[0].idle, Idle::Adaptive);
    assert_eq!(c.switches[0].burst, 32);
    let s = &c.services[0];
    assert_eq!((s.mode, s.scheduler), (Mode::Nat, Scheduler::Maglev));
    assert_eq!(s.backends[0].weight, 1);
    assert!(c.routes.is_empty() && c.neighbours.is_empty());
    assert_eq!(
        c.routing,
        Routing {
            mirror: false,
            resolve: false
        }
    );
    // Backend port defaults to the service port.
    let c = parse(&with("  port = 8080\n", "")).unwrap();
    assert_eq!(c.services[0].backends[0].port, 80);
}

#[test]
fn accepted_edge_values() {
    let c = parse(&head(
        "[limits]\nconnections = 67108864\nmaglev_table_size = 251\n[timeouts]\nudp = 604800\n[publish]\nack_timeout_ms = 10",
    ))
    .unwrap();
    assert_eq!(c.limits.connections, 1 << 26);
    assert_eq!(c.limits.maglev_table_size, 251);
    assert_eq!(c.timeouts.udp, 604_800);
    assert_eq!(c.publish.ack_timeout_ms, 10);
    let c = parse(&with("port = 8080", "port = 8080\n  weight = 0")).unwrap();
    assert_eq!(c.services[0].backends[0].weight, 0);
    let c = parse(&with("cpu = 1", "cpu = 1023\nidle = \"busy\"\nburst = 256")).unwrap();
    assert_eq!(
        (c.switches[0].cpu, c.switches[0].idle, c.switches[0].burst),
        (1023, Idle::Busy, 256)
    );
    let c = parse(&plus(
        "[[route]]\nprefix = \"0.0.0.0/0\"\nport = \"client\"\nvia = \"198.18.0.1\"",
    ))
    .unwrap();
    assert_eq!(
        (c.routes[0].prefix, c.routes[0].prefix_len),
        (ip(0, 0, 0, 0), 0)
    );
    let c = parse(&plus(
        "[[route]]\nprefix = \"198.19.1.1/32\"\nport = \"backend\"",
    ))
    .unwrap();
    assert_eq!((c.routes[0].prefix_len, c.routes[0].port), (32, 1));
    let c = parse(&with(
        "mac = \"02:00:00:00:00:02\"",
        "mac = \"0A:bC:00:00:00:02\"",
    ))
    .unwrap();
    assert_eq!(c.ports[1].mac, [0x0a, 0xbc, 0, 0, 0, 2]);
    // A service without backends is valid (it has no eligible backend).
    let c = parse(BASE.split("  [[service.backend]]").next().unwrap()).unwrap();
    assert!(c.services[0].backends.is_empty());
    // Tunnel and dr services keep the service port.
    let tunnel = with(
        "protocol = \"tcp\"",
        "protocol = \"tcp\"\nmode = \"tunnel\"",
    )
    .replace("port = 8080", "port = 80")
    .replacen(
        "[[port]]",
        "[tunnel]\nsource = \"198.19.0.1\"\n\n[[port]]",
        1,
    );
    let c = parse(&tunnel).unwrap();
    assert_eq!(c.services[0].mode, Mode::Tunnel);
    assert_eq!(c.tunnel.source, Some(ip(198, 19, 0, 1)));
    // A vnic port's MTU.
    let c = parse(&with(
        "mac = \"02:00:00:00:00:02\"",
        "mac = \"02:00:00:00:00:02\"\nmtu = 9000",
    ))
    .unwrap();
    assert_eq!((c.ports[0].mtu, c.ports[1].mtu), (1500, 9000));
}

#[test]
fn tunnel_needs_a_source_that_is_not_a_vip() {
    let tunnel = with(
        "protocol = \"tcp\"",
        "protocol = \"tcp\"\nmode = \"tunnel\"",
    )
    .replace("port = 8080", "port = 80");
    assert_eq!(
        err(&tunnel),
        "service \"web\": mode \"tunnel\" needs [tunnel] source (the outer source address of IP-in-IP packets)"
    );
    let src = |a: &str| {
        tunnel.replacen(
            "[[port]]",
            &format!("[tunnel]\nsource = \"{a}\"\n\n[[port]]"),
            1,
        )
    };
    assert_eq!(
        err(&src("198.18.0.10")),
        "tunnel: source 198.18.0.10 is the VIP of service \"web\" (use an address of the appliance)"
    );
    assert_eq!(
        err(&src("224.0.0.1")),
        "tunnel: source 224.0.0.1 is not a unicast address (0.0.0.0, 255.255.255.255 and 224.0.0.0/4 are not allowed)"
    );
    assert!(
        err(&tunnel.replacen("[[port]]", "[tunnel]\nsorce = \"1.2.3.4\"\n\n[[port]]", 1))
            .contains("unknown field `sorce`")
    );
}

#[test]
fn port_mtu_is_bounded_and_vnic_only() {
    assert_eq!(
        err(&with(
            "mac = \"02:00:00:00:00:02\"",
            "mac = \"02:00:00:00:00:02\"\nmtu = 100",
        )),
        "port \"backend\": mtu 100 is less than 576"
    );
    assert_eq!(
        err(&with(
            "mac = \"02:00:00:00:00:02\"",
            "mac = \"02:00:00:00:00:02\"\nmtu = 65000",
        )),
        "port \"backend\": mtu 65000 exceeds 9000"
    );
    let af = "[[port]]\nname = \"wire\"\ndriver = \"afpacket\"\ninterface = \"eth9\"\nmtu = 1500\n";
    assert_eq!(
        err(&plus(af)),
        "port \"wire\": mtu is not set for driver \"afpacket\" (the interface's own MTU is used)"
    );
}

#[test]
fn load_names_the_file() {
    let dir = std::env::temp_dir().join(format!("switchyard-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.toml");
    std::fs::write(
        &path,
        BASE.replace("port = 8080", "port = 8080\n  weight = 70000"),
    )
    .unwrap();
    let e = load(&path).unwrap_err().to_string();
    assert_eq!(
        e,
        format!(
            "{}: service \"web\": backend \"web1\": weight 70000 exceeds 65535",
            path.display()
        )
    );
    let missing = dir.join("missing.toml");
    let e = load(&missing).unwrap_err().to_string();
    assert_eq!(
        e,
        format!(
            "{}: cannot read: No such file or directory (os error 2)",
            missing.display()
        )
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

// ---- the schema (toml's messages) ----

#[test]
fn records_section_defaults_values_and_errors() {
    let c = parse(BASE).unwrap();
    assert_eq!(c.records, Records::default());
    assert_eq!(
        (c.records.batch, c.records.batch_ms, c.records.log),
        (64, 100, None)
    );
    let c = parse(&format!(
        "{BASE}\n[records]\nbatch = 900\nbatch_ms = 5\nlog = \"/var/log/flows.jsonl\"\n"
    ))
    .unwrap();
    assert_eq!(
        c.records,
        Records {
            batch: 900,
            batch_ms: 5,
            log: Some("/var/log/flows.jsonl".into())
        }
    );
    assert_eq!(
        err(&format!("{BASE}\n[records]\nbatch = 0\n")),
        "records: batch 0 is not between 1 and 900"
    );
    assert_eq!(
        err(&format!("{BASE}\n[records]\nbatch_ms = 60001\n")),
        "records: batch_ms 60001 is not between 1 and 60000"
    );
    assert_eq!(
        err(&format!("{BASE}\n[records]\nlog = \"flows.jsonl\"\n")),
        "records: log \"flows.jsonl\" is not an absolute file path (expected like /var/log/switchyard/flows.jsonl)"
    );
}

#[test]
fn unknown_key_at_top_level() {
    assert_eq!(
        err(&format!("colour = 1\n{BASE}")),
        "TOML parse error at line 1, column 1\n  |\n1 | colour = 1\n  | ^^^^^^\n\
         unknown field `colour`, expected one of `instance`, `limits`, `timeouts`, `publish`, `tunnel`, \
         `routing`, `admin`, `agents`, `records`, `port`, `switch`, `service`, `route`, `neighbour`, `l7`"
    );
}

#[test]
fn unknown_key_in_backend() {
    assert_eq!(
        err(&with("  port = 8080\n", "  port = 8080\n  wieght = 2\n")),
        "TOML parse error at line 29, column 3\n   |\n29 |   wieght = 2\n   |   ^^^^^^\n\
         unknown field `wieght`, expected one of `name`, `address`, `port`, `weight`, `max_conns`, `health`, `pool`"
    );
}

#[test]
fn unknown_key_in_limits() {
    assert_eq!(
        err(&head("[limits]\nconnection = 1024")),
        "TOML parse error at line 5, column 1\n  |\n5 | connection = 1024\n  | ^^^^^^^^^^\n\
         unknown field `connection`, expected one of `services`, `backends`, `connections`, \
         `routes`, `neighbours`, `maglev_table_size`, `syn_proxy_auto_syn_rate`, \
         `syn_proxy_auto_occupancy`"
    );
}

#[test]
fn missing_instance() {
    assert_eq!(
        err(&with("instance = \"t\"\n", "")),
        "TOML parse error at line 1, column 1\n  |\n1 | \n  | ^\nmissing field `instance`"
    );
}

#[test]
fn wrong_type() {
    assert_eq!(
        err(&with("port = 80\n", "port = \"80\"\n")),
        "TOML parse error at line 22, column 8\n   |\n22 | port = \"80\"\n   |        ^^^^\n\
         invalid type: string \"80\", expected i64"
    );
}

// ---- instance and sections ----

#[test]
fn instance_name_rule() {
    assert_eq!(
        err(&with("instance = \"t\"", "instance = \"a/b\"")),
        "instance name \"a/b\" is not valid (expected 1 to 32 characters from A-Z a-z 0-9 _ -)"
    );
    assert_eq!(
        err(&with(
            "instance = \"t\"",
            &format!("instance = \"{}\"", "x".repeat(33))
        )),
        format!(
            "instance name \"{}\" is not valid (expected 1 to 32 characters from A-Z a-z 0-9 _ -)",
            "x".repeat(33)
        )
    );
}

#[test]
fn at_least_one_port_switch_service() {
    assert_eq!(
        err("instance = \"t\""),
        "no [[port]] is defined (at least one is required)"
    );
    let ports_only = BASE.split("[[switch]]").next().unwrap();
    assert_eq!(
        err(ports_only),
        "no [[switch]] is defined (at least one is required)"
    );
    let no_service = BASE.split("[[service]]").next().unwrap();
    assert_eq!(
        err(no_service),
        "no [[service]] is defined (at least one is required)"
    );
}

// ---- limits, timeouts, publish ----

#[test]
fn limits_ranges() {
    assert_eq!(
        err(&head("[limits]\nservices = 0")),
        "limits: services 0 is less than 1"
    );
    assert_eq!(
        err(&head("[limits]\nservices = 4097")),
        "limits: services 4097 exceeds 4096"
    );
    assert_eq!(
        err(&head("[limits]\nbackends = 65536")),
        "limits: backends 65536 exceeds 65535"
    );
    assert_eq!(
        err(&head("[limits]\nconnections = 512")),
        "limits: connections 512 is less than 1024"
    );
    assert_eq!(
        err(&head("[limits]\nconnections = 134217728")),
        "limits: connections 134217728 exceeds 67108864"
    );
    assert_eq!(
        err(&head("[limits]\nroutes = -1")),
        "limits: routes -1 is less than 1"
    );
    assert_eq!(
        err(&head("[limits]\nneighbours = 70000")),
        "limits: neighbours 70000 exceeds 65535"
    );
}

#[test]
fn connections_power_of_two() {
    assert_eq!(
        err(&head("[limits]\nconnections = 1000000")),
        "limits: connections 1000000 is not a power of two (e.g. 1048576)"
    );
}

#[test]
fn maglev_table_size_prime_and_range() {
    assert_eq!(
        err(&head("[limits]\nmaglev_table_size = 65536")),
        "limits: maglev_table_size 65536 is not prime (nearest primes: 65521, 65537)"
    );
    assert_eq!(
        err(&head("[limits]\nmaglev_table_size = 252")),
        "limits: maglev_table_size 252 is not prime (nearest primes: 251, 257)"
    );
    assert_eq!(
        err(&head("[limits]\nmaglev_table_size = 65539")),
        "limits: maglev_table_size 65539 exceeds 65537"
    );
    assert_eq!(
        err(&head("[limits]\nmaglev_table_size = 241")),
        "limits: maglev_table_size 241 is less than 251"
    );
}

#[test]
fn timeouts_and_publish_ranges() {
    assert_eq!(
        err(&head("[timeouts]\ntcp_provisional = 1")),
        "timeouts: tcp_provisional 1 is less than 2"
    );
    assert_eq!(
        err(&head("[timeouts]\ntcp_syn = 0")),
        "timeouts: tcp_syn 0 is less than 1"
    );
    assert_eq!(
        err(&head("[timeouts]\ntcp_established = 604801")),
        "timeouts: tcp_established 604801 exceeds 604800"
    );
    assert_eq!(
        err(&head("[publish]\nack_timeout_ms = 9")),
        "publish: ack_timeout_ms 9 is less than 10"
    );
    assert_eq!(
        err(&head("[publish]\nack_timeout_ms = 60001")),
        "publish: ack_timeout_ms 60001 exceeds 60000"
    );
}

#[test]
fn admin_keys() {
    let c = parse(&head(
        "[admin]\nsocket = \"/run/sy/t.sock\"\nmetrics = \"127.0.0.1:9100\"",
    ))
    .unwrap();
    assert_eq!(c.admin.socket, Some(PathBuf::from("/run/sy/t.sock")));
    assert_eq!(c.admin.metrics, Some("127.0.0.1:9100".parse().unwrap()));
    let c = parse(&head("[admin]\nmetrics = \"[::1]:9100\"")).unwrap();
    assert_eq!(c.admin.metrics, Some("[::1]:9100".parse().unwrap()));
    assert_eq!(parse(BASE).unwrap().admin, Admin::default());
    assert_eq!(
        err(&head("[admin]\nsocket = \"run/t.sock\"")),
        "admin: socket \"run/t.sock\" is not an absolute file path (expected like /run/switchyard/NAME.sock)"
    );
    assert_eq!(
        err(&head("[admin]\nsocket = \"/run/\"")),
        "admin: socket \"/run/\" is not an absolute file path (expected like /run/switchyard/NAME.sock)"
    );
    let long = format!("/{}", "x".repeat(107));
    assert_eq!(
        err(&head(&format!("[admin]\nsocket = \"{long}\""))),
        format!("admin: socket \"{long}\" is 108 bytes long, a Unix socket path holds at most 107")
    );
    assert_eq!(
        err(&head("[admin]\nmetrics = \"localhost:9100\"")),
        "admin: metrics \"localhost:9100\" is not an address and port (expected like 127.0.0.1:9100 or [::1]:9100)"
    );
    assert_eq!(
        err(&head("[admin]\nmetrics = \"127.0.0.1:0\"")),
        "admin: metrics \"127.0.0.1:0\" has port 0 (a fixed port 1..=65535 is required)"
    );
    assert!(err(&head("[admin]\nsockett = \"/x\"")).contains("unknown field `sockett`"));
}

#[test]
fn too_many_services_for_limits() {
    let text = head("[limits]\nservices = 1")
        + "\n[[service]]\nname = \"web2\"\nvip = \"198.18.0.11\"\nport = 80\nprotocol = \"tcp\"\n";
    assert_eq!(
        err(&text),
        "too many services: 2 are defined, limits.services is 1"
    );
}

#[test]
fn too_many_backends_for_limits() {
    let text = head("[limits]\nbackends = 1")
        + "\n  [[service.backend]]\n  name = \"web2\"\n  address = \"198.19.1.2\"\n";
    assert_eq!(
        err(&text),
        "too many backends: 2 are defined over all services, limits.backends is 1"
    );
}

#[test]
fn too_many_routes_and_neighbours_for_limits() {
    let routes = "[[route]]\nprefix = \"10.0.0.0/8\"\nport = \"backend\"\n[[route]]\nprefix = \"10.0.0.0/16\"\nport = \"backend\"\n";
    let text = head("[limits]\nroutes = 1") + "\n" + routes;
    assert_eq!(
        err(&text),
        "too many routes: 2 are defined, limits.routes is 1"
    );
    let neighbours = "[[neighbour]]\naddress = \"10.0.0.1\"\nmac = \"02:00:00:00:01:01\"\nport = \"backend\"\n\
                      [[neighbour]]\naddress = \"10.0.0.2\"\nmac = \"02:00:00:00:01:02\"\nport = \"backend\"\n";
    let text = head("[limits]\nneighbours = 1") + "\n" + neighbours;
    assert_eq!(
        err(&text),
        "too many neighbours: 2 are defined, limits.neighbours is 1"
    );
}

// ---- ports ----

#[test]
fn port_name_rule_and_duplicates() {
    assert_eq!(
        err(&with("name = \"client\"", "name = \"client-port-0123\"")),
        "port name \"client-port-0123\" is not valid (expected 1 to 15 characters from A-Z a-z 0-9 _ -)"
    );
    assert_eq!(
        err(&with("name = \"backend\"", "name = \"client\"")),
        "port \"client\" is defined twice"
    );
}

#[test]
fn bad_mac() {
    let e = err(&with(
        "mac = \"02:00:00:00:00:01\"",
        "mac = \"02:00:zz:00:00:01\"",
    ));
    assert_eq!(
        e,
        "port \"client\": mac \"02:00:zz:00:00:01\" is not a MAC address (expected six hex octets like 02:00:00:00:00:01)"
    );
    for bad in [
        "02:00:00:00:00",
        "02:00:00:00:00:01:03",
        "02-00-00-00-00-01",
        "2:0:0:0:0:1",
        "+2:00:00:00:00:01",
        "",
    ] {
        assert_eq!(
            err(&with(
                "mac = \"02:00:00:00:00:01\"",
                &format!("mac = \"{bad}\"")
            )),
            format!(
                "port \"client\": mac \"{bad}\" is not a MAC address (expected six hex octets like 02:00:00:00:00:01)"
            )
        );
    }
}

#[test]
fn multicast_and_zero_mac() {
    assert_eq!(
        err(&with(
            "mac = \"02:00:00:00:00:01\"",
            "mac = \"01:00:5e:00:00:01\""
        )),
        "port \"client\": mac \"01:00:5e:00:00:01\" is a multicast address (the low bit of the first octet is set; a unicast MAC is required)"
    );
    assert_eq!(
        err(&with(
            "mac = \"02:00:00:00:00:01\"",
            "mac = \"00:00:00:00:00:00\""
        )),
        "port \"client\": mac \"00:00:00:00:00:00\" is the all-zero address (a unicast MAC is required)"
    );
}

#[test]
fn duplicate_mac() {
    assert_eq!(
        err(&with(
            "mac = \"02:00:00:00:00:02\"",
            "mac = \"02:00:00:00:00:01\""
        )),
        "port \"backend\": mac 02:00:00:00:00:01 is already used by port \"client\""
    );
}

#[test]
fn port_driver_and_mac_required() {
    let first = "driver = \"vnic\"\nmac = \"02:00:00:00:00:01\"";
    assert_eq!(
        err(&with(first, "driver = \"afpacket\"")),
        "port \"client\": interface is required for driver \"afpacket\""
    );
    assert_eq!(
        err(&with(
            first,
            "driver = \"dpdk\"\nmac = \"02:00:00:00:00:01\""
        )),
        "port \"client\": driver \"dpdk\" is unknown (supported: vnic, afpacket)"
    );
    assert_eq!(
        err(&with(first, "driver = \"vnic\"")),
        "port \"client\": mac is required for driver \"vnic\""
    );
}

#[test]
fn ring_size_rule() {
    let m = "mac = \"02:00:00:00:00:01\"";
    assert_eq!(
        err(&with(m, &format!("{m}\nring_size = 1000"))),
        "port \"client\": ring_size 1000 is not a power of two (e.g. 1024)"
    );
    assert_eq!(
        err(&with(m, &format!("{m}\nring_size = 32"))),
        "port \"client\": ring_size 32 is less than 64"
    );
    assert_eq!(
        err(&with(m, &format!("{m}\nring_size = 65536"))),
        "port \"client\": ring_size 65536 exceeds 32768"
    );
}

#[test]
fn too_many_ports() {
    let mut text = String::from(BASE);
    for i in 3..=17 {
        text += &format!(
            "[[port]]\nname = \"p{i}\"\ndriver = \"vnic\"\nmac = \"02:00:00:00:10:{i:02x}\"\n"
        );
    }
    assert_eq!(
        err(&text),
        "too many ports: 17 are defined, at most 16 are supported"
    );
}

// ---- switches ----

#[test]
fn undefined_port_in_switch() {
    let text = plus("[[switch]]\nname = \"sw1\"\ncpu = 2\nports = [\"foo\"]");
    assert_eq!(
        err(&text),
        "switch \"sw1\": port \"foo\" is not defined (defined ports: client, backend)"
    );
}

#[test]
fn shared_cpu() {
    let text = plus("[[switch]]\nname = \"sw1\"\ncpu = 1\nports = [\"client\"]");
    assert_eq!(
        err(&text),
        "switch \"sw1\": cpu 1 is already used by switch \"sw0\" (two switches may not share a CPU)"
    );
}

#[test]
fn switch_rules() {
    assert_eq!(
        err(&plus(
            "[[switch]]\nname = \"sw0\"\ncpu = 2\nports = [\"client\"]"
        )),
        "switch \"sw0\" is defined twice"
    );
    assert_eq!(
        err(&with("ports = [\"client\", \"backend\"]", "ports = []")),
        "switch \"sw0\": ports is empty (at least one port is required)"
    );
    assert_eq!(
        err(&with(
            "ports = [\"client\", \"backend\"]",
            "ports = [\"client\", \"client\"]"
        )),
        "switch \"sw0\": port \"client\" is listed twice"
    );
    assert_eq!(
        err(&with("cpu = 1", "cpu = 1024")),
        "switch \"sw0\": cpu 1024 exceeds 1023"
    );
    assert_eq!(
        err(&with("cpu = 1", "cpu = -1")),
        "switch \"sw0\": cpu -1 is less than 0"
    );
    assert_eq!(
        err(&with("cpu = 1", "cpu = 1\nburst = 0")),
        "switch \"sw0\": burst 0 is less than 1"
    );
    assert_eq!(
        err(&with("cpu = 1", "cpu = 1\nburst = 257")),
        "switch \"sw0\": burst 257 exceeds 256"
    );
    assert_eq!(
        err(&with("cpu = 1", "cpu = 1\nidle = \"sleepy\"")),
        "switch \"sw0\": idle \"sleepy\" is not supported (supported: busy, adaptive)"
    );
    assert_eq!(
        err(&with("name = \"sw0\"", "name = \"sw 0\"")),
        "switch name \"sw 0\" is not valid (expected 1 to 32 characters from A-Z a-z 0-9 _ -)"
    );
}

// ---- services and backends ----

const WEB2: &str =
    "\n[[service]]\nname = \"web2\"\nvip = \"198.18.0.10\"\nport = 80\nprotocol = \"tcp\"\n";

#[test]
fn duplicate_service_name() {
    assert_eq!(
        err(&plus(&WEB2.replace("web2", "web"))),
        "service \"web\" is defined twice"
    );
}

#[test]
fn duplicate_vip_port_protocol() {
    assert_eq!(
        err(&plus(WEB2)),
        "service \"web2\": 198.18.0.10:80 tcp is already served by service \"web\""
    );
    // Another protocol or port is a different service.
    parse(&plus(&WEB2.replace("tcp", "udp"))).unwrap();
    parse(&plus(&WEB2.replace("port = 80", "port = 81"))).unwrap();
}

#[test]
fn service_rules() {
    assert_eq!(
        err(&with("vip = \"198.18.0.10\"", "vip = \"198.18.0\"")),
        "service \"web\": vip \"198.18.0\" is not an IPv4 address (expected like 198.18.0.10)"
    );
    assert_eq!(
        err(&with("vip = \"198.18.0.10\"", "vip = \"224.0.0.1\"")),
        "service \"web\": vip 224.0.0.1 is not a unicast address (0.0.0.0, 255.255.255.255 and 224.0.0.0/4 are not allowed)"
    );
    assert_eq!(
        err(&with("port = 80\n", "port = 0\n")),
        "service \"web\": port 0 is less than 1"
    );
    assert_eq!(
        err(&with("port = 80\n", "port = 65536\n")),
        "service \"web\": port 65536 exceeds 65535"
    );
    assert_eq!(
        err(&with("protocol = \"tcp\"", "protocol = \"sctp\"")),
        "service \"web\": protocol \"sctp\" is not supported (supported: tcp, udp)"
    );
    assert_eq!(
        err(&with(
            "protocol = \"tcp\"",
            "protocol = \"tcp\"\nmode = \"fullnat\""
        )),
        "service \"web\": mode \"fullnat\" is not supported (supported: nat, dr, tunnel, l7)"
    );
    assert_eq!(
        err(&with(
            "protocol = \"tcp\"",
            "protocol = \"tcp\"\nscheduler = \"lc\""
        )),
        "service \"web\": scheduler \"lc\" is not supported (supported: maglev, wrr, wlc, sh)"
    );
}

#[test]
fn schedulers_queue_and_max_conns_parse_with_defaults() {
    let c = parse(BASE).unwrap();
    let s = &c.services[0];
    assert_eq!((s.queue_timeout_ms, s.loading), (1000, None));
    assert_eq!(s.backends[0].max_conns, 0);
    assert_eq!(c.switches[0].syn_queue, 256);
    for (name, want) in [
        ("maglev", Scheduler::Maglev),
        ("wrr", Scheduler::Wrr),
        ("wlc", Scheduler::Wlc),
        ("sh", Scheduler::Sh),
    ] {
        let c = parse(&with(
            "protocol = \"tcp\"",
            &format!("protocol = \"tcp\"\nscheduler = \"{name}\""),
        ))
        .unwrap();
        assert_eq!(c.services[0].scheduler, want);
        assert_eq!(want.as_str(), name);
    }
    let c = parse(
        &with(
            "protocol = \"tcp\"",
            "protocol = \"tcp\"\nqueue_timeout_ms = 0\nlatency_target_ms = 80\nmin_conns = 3",
        )
        .replace("  port = 8080\n", "  port = 8080\n  max_conns = 40\n"),
    )
    .unwrap();
    let s = &c.services[0];
    assert_eq!(s.queue_timeout_ms, 0);
    assert_eq!(s.backends[0].max_conns, 40);
    assert_eq!(
        s.loading,
        Some(Loading {
            latency_target_ms: 80,
            interval_ms: 1000,
            min_conns: 3
        })
    );
    let c = parse(&with(
        "ports = [\"client\", \"backend\"]",
        "ports = [\"client\", \"backend\"]\nsyn_queue = 0",
    ))
    .unwrap();
    assert_eq!(c.switches[0].syn_queue, 0);
}

#[test]
fn queue_and_loading_rules_name_the_value() {
    let limited = |svc: &str| {
        with("protocol = \"tcp\"", &format!("protocol = \"tcp\"\n{svc}"))
            .replace("  port = 8080\n", "  port = 8080\n  max_conns = 40\n")
    };
    assert_eq!(
        err(&limited("queue_timeout_ms = 60001")),
        "service \"web\": queue_timeout_ms 60001 exceeds 60000"
    );
    assert_eq!(
        err(&with(
            "  port = 8080\n",
            "  port = 8080\n  max_conns = -1\n"
        )),
        "service \"web\": backend \"web1\": max_conns -1 is less than 0"
    );
    assert_eq!(
        err(&limited("latency_target_ms = 0")),
        "service \"web\": latency_target_ms 0 is less than 1"
    );
    assert_eq!(
        err(&limited("min_conns = 2")),
        "service \"web\": min_conns needs latency_target_ms (it tunes controlled server loading)"
    );
    assert_eq!(
        err(&limited("latency_target_ms = 50\nadjust_interval_ms = 99")),
        "service \"web\": adjust_interval_ms 99 is less than 100"
    );
    assert_eq!(
        err(&with(
            "protocol = \"tcp\"",
            "protocol = \"tcp\"\nlatency_target_ms = 50"
        )),
        "service \"web\": latency_target_ms needs max_conns on at least one backend (the adaptive limit lies between min_conns and max_conns)"
    );
    assert_eq!(
        err(&limited("latency_target_ms = 50\nmode = \"dr\"").replace("  port = 8080\n", "")),
        "service \"web\": latency_target_ms needs mode \"nat\" (mode \"dr\": backends reply around the switches, which then never see the SYN-ACKs they measure)"
    );
    assert_eq!(
        err(&with(
            "ports = [\"client\", \"backend\"]",
            "ports = [\"client\", \"backend\"]\nsyn_queue = 4097"
        )),
        "switch \"sw0\": syn_queue 4097 exceeds 4096"
    );
}

#[test]
fn flow_cache_is_zero_or_a_power_of_two_within_its_limit() {
    let sw = |v: &str| {
        with(
            "ports = [\"client\", \"backend\"]",
            &format!("ports = [\"client\", \"backend\"]\nflow_cache = {v}"),
        )
    };
    assert_eq!(parse(&sw("0")).unwrap().switches[0].flow_cache, 0);
    assert_eq!(parse(&sw("1024")).unwrap().switches[0].flow_cache, 1024);
    assert_eq!(
        err(&sw("100000")),
        "switch \"sw0\": flow_cache 100000 is not a power of two (0 disables the cache)"
    );
    assert_eq!(
        err(&sw("8388608")),
        "switch \"sw0\": flow_cache 8388608 exceeds 4194304"
    );
    assert_eq!(
        err(&sw("-1")),
        "switch \"sw0\": flow_cache -1 is less than 0"
    );
}

#[test]
fn weight_too_large() {
    let text = plus(
        "  [[service.backend]]\n  name = \"web2\"\n  address = \"198.19.1.2\"\n\
         \n  [[service.backend]]\n  name = \"web3\"\n  address = \"198.19.1.3\"\n  weight = 70000\n",
    );
    assert_eq!(
        err(&text),
        "service \"web\": backend \"web3\": weight 70000 exceeds 65535"
    );
    assert_eq!(
        err(&with("port = 8080", "port = 8080\n  weight = -1")),
        "service \"web\": backend \"web1\": weight -1 is less than 0"
    );
}

#[test]
fn dr_cannot_change_ports() {
    assert_eq!(
        err(&with(
            "protocol = \"tcp\"",
            "protocol = \"tcp\"\nmode = \"dr\""
        )),
        "service \"web\": backend \"web1\": port 8080 differs from the service port 80 (mode \"dr\" cannot change ports)"
    );
    assert_eq!(
        err(&with(
            "protocol = \"tcp\"",
            "protocol = \"tcp\"\nmode = \"tunnel\""
        )),
        "service \"web\": backend \"web1\": port 8080 differs from the service port 80 (mode \"tunnel\" cannot change ports)"
    );
    let c = parse(
        &with("protocol = \"tcp\"", "protocol = \"tcp\"\nmode = \"dr\"")
            .replace("  port = 8080\n", ""),
    )
    .unwrap();
    assert_eq!(
        (c.services[0].mode, c.services[0].backends[0].port),
        (Mode::Dr, 80)
    );
}

#[test]
fn backend_duplicates() {
    let same_name = "  [[service.backend]]\n  name = \"web1\"\n  address = \"198.19.1.2\"\n";
    assert_eq!(
        err(&plus(same_name)),
        "service \"web\": backend \"web1\" is defined twice"
    );
    let same_addr =
        "  [[service.backend]]\n  name = \"web2\"\n  address = \"198.19.1.1\"\n  port = 8080\n";
    assert_eq!(
        err(&plus(same_addr)),
        "service \"web\": backend \"web2\": 198.19.1.1:8080 is already used by backend \"web1\""
    );
    // Same address on another port is another backend.
    parse(&plus(&same_addr.replace("8080", "8081"))).unwrap();
}

#[test]
fn backend_rules() {
    assert_eq!(
        err(&with(
            "address = \"198.19.1.1\"",
            "address = \"198.19.1.256\""
        )),
        "service \"web\": backend \"web1\": address \"198.19.1.256\" is not an IPv4 address (expected like 198.18.0.10)"
    );
    assert_eq!(
        err(&with("address = \"198.19.1.1\"", "address = \"0.0.0.0\"")),
        "service \"web\": backend \"web1\": address 0.0.0.0 is not a unicast address (0.0.0.0, 255.255.255.255 and 224.0.0.0/4 are not allowed)"
    );
    assert_eq!(
        err(&with("name = \"web1\"", "name = \"\"")),
        "service \"web\": backend name \"\" is not valid (expected 1 to 32 characters from A-Z a-z 0-9 _ -)"
    );
}

#[test]
fn vip_is_not_a_backend() {
    let other =
        "\n[[service]]\nname = \"dns\"\nvip = \"198.19.1.1\"\nport = 53\nprotocol = \"udp\"\n";
    assert_eq!(
        err(&plus(other)),
        "service \"web\": backend \"web1\": address 198.19.1.1 is the VIP of service \"dns\" (a backend cannot be a VIP)"
    );
}

#[test]
fn more_backends_than_table_entries() {
    let mut text = head("[limits]\nmaglev_table_size = 251");
    for i in 2..=252 {
        text += &format!(
            "  [[service.backend]]\n  name = \"b{i}\"\n  address = \"10.1.{}.{}\"\n",
            i / 256,
            i % 256
        );
    }
    assert_eq!(
        err(&text),
        "service \"web\": 252 backends exceed limits.maglev_table_size 251 (each backend needs table entries)"
    );
}

// ---- routes and neighbours ----

#[test]
fn prefix_with_host_bits() {
    assert_eq!(
        err(&plus(
            "[[route]]\nprefix = \"198.19.1.0/16\"\nport = \"backend\""
        )),
        "route \"198.19.1.0/16\": host bits are set (the prefix of 198.19.1.0 with length 16 is 198.19.0.0/16)"
    );
}

#[test]
fn bad_prefix() {
    for bad in [
        "198.19.0.0",
        "198.19.0.0/33",
        "198.19.0.0/",
        "198.19.0.0/+8",
        "198.19.0/16",
        "198.19.0.0/016",
    ] {
        assert_eq!(
            err(&plus(&format!(
                "[[route]]\nprefix = \"{bad}\"\nport = \"backend\""
            ))),
            format!(
                "route \"{bad}\": prefix \"{bad}\" is not an IPv4 prefix (expected an address and a length 0..=32 like 198.19.0.0/16)"
            )
        );
    }
}

#[test]
fn route_rules() {
    assert_eq!(
        err(&plus("[[route]]\nprefix = \"10.0.0.0/8\"\nport = \"wan\"")),
        "route \"10.0.0.0/8\": port \"wan\" is not defined (defined ports: client, backend)"
    );
    assert_eq!(
        err(&plus(
            "[[route]]\nprefix = \"10.0.0.0/8\"\nport = \"client\"\nvia = \"10.0.0.300\""
        )),
        "route \"10.0.0.0/8\": via \"10.0.0.300\" is not an IPv4 address (expected like 198.18.0.10)"
    );
    assert_eq!(
        err(&plus(
            "[[route]]\nprefix = \"10.0.0.0/8\"\nport = \"client\"\n[[route]]\nprefix = \"10.0.0.0/8\"\nport = \"backend\""
        )),
        "route \"10.0.0.0/8\" is defined twice"
    );
}

#[test]
fn neighbour_rules() {
    let n = |addr: &str, mac: &str, port: &str| {
        format!("[[neighbour]]\naddress = \"{addr}\"\nmac = \"{mac}\"\nport = \"{port}\"\n")
    };
    assert_eq!(
        err(&plus(
            &(n("198.19.1.1", "02:00:00:00:01:01", "backend")
                + &n("198.19.1.1", "02:00:00:00:01:02", "backend"))
        )),
        "neighbour \"198.19.1.1\" is defined twice"
    );
    assert_eq!(
        err(&plus(&n("198.19.1.1", "02:00:00:00:01:01", "lan"))),
        "neighbour \"198.19.1.1\": port \"lan\" is not defined (defined ports: client, backend)"
    );
    assert_eq!(
        err(&plus(&n("198.19.1.1", "ff:ff:ff:ff:ff:ff", "backend"))),
        "neighbour \"198.19.1.1\": mac \"ff:ff:ff:ff:ff:ff\" is a multicast address (the low bit of the first octet is set; a unicast MAC is required)"
    );
    assert_eq!(
        err(&plus(&n("198.19.1", "02:00:00:00:01:01", "backend"))),
        "neighbour \"198.19.1\": address \"198.19.1\" is not an IPv4 address (expected like 198.18.0.10)"
    );
}

#[test]
fn switch_engine_null_and_unknown() {
    let base = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../packaging/examples/demo.toml"
    ))
    .unwrap();
    let null = base.replace("burst = 32", "burst = 32\nengine = \"null\"");
    assert_eq!(parse(&null).unwrap().switches[0].engine, Engine::Null);
    let bad = base.replace("burst = 32", "burst = 32\nengine = \"turbo\"");
    assert_eq!(
        parse(&bad).unwrap_err().to_string(),
        "switch \"sw0\": engine \"turbo\" is not supported (supported: filter, null)"
    );
}

// ---- [routing] ----

/// `BASE` with both ports on AF_PACKET (interfaces l0 and l1).
fn afpacket_base() -> String {
    with(
        "driver = \"vnic\"\nmac = \"02:00:00:00:00:01\"",
        "driver = \"afpacket\"\ninterface = \"l0\"",
    )
    .replace(
        "driver = \"vnic\"\nmac = \"02:00:00:00:00:02\"",
        "driver = \"afpacket\"\ninterface = \"l1\"",
    )
}

#[test]
fn routing_defaults_follow_the_drivers() {
    let c = parse(&afpacket_base()).unwrap();
    assert_eq!(
        c.routing,
        Routing {
            mirror: true,
            resolve: true
        }
    );
    let c = parse(&afpacket_base().replace(
        "\n[[port]]\nname = \"client\"",
        "\n[routing]\nresolve = false\n[[port]]\nname = \"client\"",
    ))
    .unwrap();
    assert_eq!(
        c.routing,
        Routing {
            mirror: true,
            resolve: false
        }
    );
    let c = parse(&afpacket_base().replace(
        "\n[[port]]\nname = \"client\"",
        "\n[routing]\nmirror = false\n[[port]]\nname = \"client\"",
    ))
    .unwrap();
    assert_eq!(
        c.routing,
        Routing {
            mirror: false,
            resolve: false
        }
    );
}

#[test]
fn routing_rules() {
    assert_eq!(
        err(&head("[routing]\nmirror = true")),
        "routing: mirror true needs a [[port]] with driver \"afpacket\" (the mirror reads the kernel's routes and neighbours of afpacket interfaces; vnic ports use [[route]] and [[neighbour]])"
    );
    assert_eq!(
        err(&head("[routing]\nresolve = true")),
        "routing: resolve true needs mirror true (resolved neighbours reach the switches through the mirror)"
    );
    let text = afpacket_base().replace(
        "\n[[port]]\nname = \"client\"",
        "\n[routing]\nmirror = false\nresolve = true\n[[port]]\nname = \"client\"",
    );
    assert_eq!(
        err(&text),
        "routing: resolve true needs mirror true (resolved neighbours reach the switches through the mirror)"
    );
}

#[test]
fn routing_unknown_key_and_wrong_type() {
    assert_eq!(
        err(&head("[routing]\nmirrors = true")),
        "TOML parse error at line 5, column 1\n  |\n5 | mirrors = true\n  | ^^^^^^^\n\
         unknown field `mirrors`, expected `mirror` or `resolve`"
    );
    assert_eq!(
        err(&head("[routing]\nmirror = \"yes\"")),
        "TOML parse error at line 5, column 10\n  |\n5 | mirror = \"yes\"\n  |          ^^^^^\n\
         invalid type: string \"yes\", expected a boolean"
    );
}

// ---- health checks ----

/// `BASE` with `table` (e.g. `[service.health]` lines) inserted in the
/// service "web" before its backends.
fn svc(table: &str) -> String {
    with(
        "protocol = \"tcp\"\n",
        &format!("protocol = \"tcp\"\n{table}\n"),
    )
}

/// `BASE` with `table` (`[service.backend.health]` lines) after backend web1.
fn be(table: &str) -> String {
    plus(table)
}

#[test]
fn no_health_table_means_unchecked_and_reschedule() {
    let c = parse(BASE).unwrap();
    assert_eq!(c.services[0].backends[0].health, None);
    assert_eq!(c.services[0].on_backend_down, OnDown::Reschedule);
}

#[test]
fn health_defaults() {
    let c = parse(&svc("[service.health]\nkind = \"tcp\"")).unwrap();
    assert_eq!(
        c.services[0].backends[0].health,
        Some(HealthCheck {
            probe: Probe::Tcp,
            port: 8080,
            interval_ms: 2000,
            fast_interval_ms: 500,
            timeout_ms: 1000,
            rise: 2,
            fall: 3,
        })
    );
    // A short interval caps the fast interval and the timeout.
    let c = parse(&svc("[service.health]\nkind = \"tcp\"\ninterval_ms = 300")).unwrap();
    let h = c.services[0].backends[0].health.clone().unwrap();
    assert_eq!(
        (h.interval_ms, h.fast_interval_ms, h.timeout_ms),
        (300, 300, 300)
    );
    // HTTP: path "/", status 200, Host is the backend's address and port.
    let c = parse(&svc("[service.health]\nkind = \"http\"")).unwrap();
    assert_eq!(
        c.services[0].backends[0].health.as_ref().unwrap().probe,
        Probe::Http {
            path: "/".into(),
            host: "198.19.1.1:8080".into(),
            expect_status: 200
        }
    );
    let c = parse(&svc("[service.health]\nkind = \"http\"\nport = 80")).unwrap();
    let Probe::Http { host, .. } = &c.services[0].backends[0].health.as_ref().unwrap().probe else {
        panic!()
    };
    assert_eq!(host, "198.19.1.1");
    // UDP: an empty datagram, any reply.
    let c = parse(&svc("[service.health]\nkind = \"udp\"")).unwrap();
    assert_eq!(
        c.services[0].backends[0].health.as_ref().unwrap().probe,
        Probe::Udp {
            payload: vec![],
            expect: vec![],
            require_reply: true
        }
    );
}

#[test]
fn health_all_keys_and_backend_overrides() {
    let text = svc(concat!(
        "on_backend_down = \"reset\"\n",
        "[service.health]\nkind = \"http\"\nport = 9000\ninterval_ms = 5000\n",
        "fast_interval_ms = 1000\ntimeout_ms = 4000\nrise = 4\nfall = 1\n",
        "path = \"/healthz?full=1\"\nhost = \"web.example\"\nexpect_status = 204",
    )) + concat!(
        "[service.backend.health]\nkind = \"udp\"\nrise = 7\npayload_hex = \"00ff0A\"\nexpect = \"pong\"\n",
        "  [[service.backend]]\n  name = \"web2\"\n  address = \"198.19.1.2\"\n",
        "  [service.backend.health]\n  timeout_ms = 10\n  path = \"/\"\n",
        "  [[service.backend]]\n  name = \"web3\"\n  address = \"198.19.1.3\"\n",
        "  [service.backend.health]\n  kind = \"none\"\n",
        "  [[service.backend]]\n  name = \"web4\"\n  address = \"198.19.1.4\"\n",
        "  [service.backend.health]\n  kind = \"udp\"\n  require_reply = false\n  payload = \"hi\"\n",
    );
    let c = parse(&text).unwrap();
    let s = &c.services[0];
    assert_eq!(s.on_backend_down, OnDown::Reset);
    let common = HealthCheck {
        probe: Probe::Tcp,
        port: 9000,
        interval_ms: 5000,
        fast_interval_ms: 1000,
        timeout_ms: 4000,
        rise: 4,
        fall: 1,
    };
    assert_eq!(
        s.backends[0].health,
        Some(HealthCheck {
            probe: Probe::Udp {
                payload: vec![0, 0xff, 0x0a],
                expect: b"pong".to_vec(),
                require_reply: true
            },
            rise: 7,
            ..common.clone()
        })
    );
    assert_eq!(
        s.backends[1].health,
        Some(HealthCheck {
            probe: Probe::Http {
                path: "/".into(),
                host: "web.example".into(),
                expect_status: 204
            },
            timeout_ms: 10,
            ..common.clone()
        })
    );
    assert_eq!(s.backends[2].health, None);
    assert_eq!(
        s.backends[3].health,
        Some(HealthCheck {
            probe: Probe::Udp {
                payload: b"hi".to_vec(),
                expect: vec![],
                require_reply: false
            },
            ..common
        })
    );
    for (v, want) in [("keep", OnDown::Keep), ("reschedule", OnDown::Reschedule)] {
        let c = parse(&svc(&format!("on_backend_down = \"{v}\""))).unwrap();
        assert_eq!(c.services[0].on_backend_down, want);
    }
    // A backend may have a check when its service has none.
    let c = parse(&be("[service.backend.health]\nkind = \"tcp\"\nport = 22")).unwrap();
    assert_eq!(c.services[0].backends[0].health.as_ref().unwrap().port, 22);
}

#[test]
fn unknown_key_in_health() {
    assert_eq!(
        err(&svc("[service.health]\nkind = \"tcp\"\nintervall_ms = 5")),
        "TOML parse error at line 26, column 1\n   |\n26 | intervall_ms = 5\n   | ^^^^^^^^^^^^\n\
         unknown field `intervall_ms`, expected one of `kind`, `port`, `interval_ms`, \
         `fast_interval_ms`, `timeout_ms`, `rise`, `fall`, `path`, `host`, `expect_status`, \
         `payload`, `payload_hex`, `expect`, `expect_hex`, `require_reply`"
    );
}

#[test]
fn health_rules() {
    let h = |t: &str| err(&svc(&format!("[service.health]\n{t}")));
    let web = "service \"web\": health: ";
    for (table, msg) in [
        (
            "port = 1",
            "kind is required (supported: tcp, http, udp, none)",
        ),
        (
            "kind = \"icmp\"",
            "kind \"icmp\" is not supported (supported: tcp, http, udp, none)",
        ),
        (
            "kind = \"none\"\nrise = 2",
            "rise is set but kind is \"none\" (no check: remove the key or choose a kind)",
        ),
        (
            "kind = \"tcp\"\npath = \"/\"",
            "path is only for kind \"http\" (kind is \"tcp\")",
        ),
        (
            "kind = \"http\"\npayload = \"x\"",
            "payload is only for kind \"udp\" (kind is \"http\")",
        ),
        ("kind = \"tcp\"\nport = 0", "port 0 is less than 1"),
        (
            "kind = \"tcp\"\ninterval_ms = 9",
            "interval_ms 9 is less than 10",
        ),
        (
            "kind = \"tcp\"\ninterval_ms = 3600001",
            "interval_ms 3600001 exceeds 3600000",
        ),
        (
            "kind = \"tcp\"\ntimeout_ms = 0",
            "timeout_ms 0 is less than 1",
        ),
        (
            "kind = \"tcp\"\ntimeout_ms = 2001",
            "timeout_ms 2001 exceeds interval_ms 2000 (a check must end before the next one is due)",
        ),
        (
            "kind = \"tcp\"\nfast_interval_ms = 2001",
            "fast_interval_ms 2001 exceeds interval_ms 2000 (the fast interval is the shorter one)",
        ),
        ("kind = \"tcp\"\nrise = 0", "rise 0 is less than 1"),
        ("kind = \"tcp\"\nfall = 101", "fall 101 exceeds 100"),
        (
            "kind = \"http\"\nexpect_status = 600",
            "expect_status 600 exceeds 599",
        ),
        (
            "kind = \"http\"\npath = \"health\"",
            "path \"health\" is not a URL path (expected / then at most 1023 visible ASCII characters, no spaces)",
        ),
        (
            "kind = \"http\"\npath = \"/a b\"",
            "path \"/a b\" is not a URL path (expected / then at most 1023 visible ASCII characters, no spaces)",
        ),
        (
            "kind = \"http\"\nhost = \"\"",
            "host \"\" is not a host name (1 to 255 visible ASCII characters, no spaces)",
        ),
        (
            "kind = \"http\"\nhost = \"a\\r\\nX: y\"",
            "host \"a\\r\\nX: y\" is not a host name (1 to 255 visible ASCII characters, no spaces)",
        ),
        (
            "kind = \"udp\"\npayload = \"a\"\npayload_hex = \"61\"",
            "payload and payload_hex are both set (set at most one)",
        ),
        (
            "kind = \"udp\"\nexpect_hex = \"abc\"",
            "expect_hex \"abc\" is not hex bytes (expected pairs of hex digits like \"0a1b\")",
        ),
        (
            "kind = \"udp\"\npayload_hex = \"zz\"",
            "payload_hex \"zz\" is not hex bytes (expected pairs of hex digits like \"0a1b\")",
        ),
        (
            "kind = \"udp\"\nexpect = \"x\"\nrequire_reply = false",
            "expect is set but require_reply is false (a reply can only be matched if one is required)",
        ),
    ] {
        assert_eq!(h(table), format!("{web}{msg}"), "{table}");
    }
    let long = "x".repeat(1473);
    assert_eq!(
        h(&format!("kind = \"udp\"\npayload = \"{long}\"")),
        format!("{web}payload of 1473 bytes exceeds 1472 (one Ethernet frame)")
    );
    assert_eq!(
        err(&svc("on_backend_down = \"drop\"")),
        "service \"web\": on_backend_down \"drop\" is not supported (supported: keep, reschedule, reset)"
    );
    // A backend's table is checked with the effective kind; errors name the backend.
    let b = "service \"web\": backend \"web1\": health: ";
    assert_eq!(
        err(&be("[service.backend.health]\nport = 22")),
        format!("{b}kind is required (supported: tcp, http, udp, none)")
    );
    assert_eq!(
        err(&(svc("[service.health]\nkind = \"tcp\"")
            + "[service.backend.health]\nexpect_status = 204\n")),
        format!("{b}expect_status is only for kind \"http\" (kind is \"tcp\")")
    );
    assert_eq!(
        err(&(svc("[service.health]\nkind = \"tcp\"\ninterval_ms = 500")
            + "[service.backend.health]\ntimeout_ms = 600\n")),
        format!(
            "{b}timeout_ms 600 exceeds interval_ms 500 (a check must end before the next one is due)"
        )
    );
    // An inherited key that does not suit the backend's own kind is ignored.
    let c = parse(
        &(svc("[service.health]\nkind = \"http\"\npath = \"/h\"")
            + "[service.backend.health]\nkind = \"tcp\"\n"),
    )
    .unwrap();
    assert_eq!(
        c.services[0].backends[0].health.as_ref().unwrap().probe,
        Probe::Tcp
    );
}

// ---- load agents ----

const SECRET: &str = "0123456789abcdef";

fn agents_of(table: &str) -> Result<Option<Agents>, String> {
    parse(&head(table))
        .map(|c| c.agents)
        .map_err(|e| e.to_string())
}

#[test]
fn no_agents_table_means_no_agents() {
    assert_eq!(parse(BASE).unwrap().agents, None);
}

#[test]
fn agents_defaults_and_all_keys() {
    let a = agents_of(&format!(
        "[agents]\nlisten = \"198.19.0.1:7007\"\nsecret = \"{SECRET}\""
    ))
    .unwrap()
    .unwrap();
    assert_eq!(
        a,
        Agents {
            listen: "198.19.0.1:7007".parse().unwrap(),
            secret: Secret(SECRET.as_bytes().to_vec()),
            secret_file: None,
            max_skew_ms: 5000,
            silent_ms: 3000,
            floor_percent: 10,
            step_percent: 10,
        }
    );
    assert_eq!(format!("{:?}", a.secret), "Secret(16 bytes)");
    let a = agents_of(
        "[agents]\nlisten = \"10.0.0.1:9\"\nsecret_file = \"/etc/switchyard/agent.key\"\n\
         max_skew_ms = 100\nsilent_ms = 3600000\nfloor_percent = 100\nstep_percent = 1",
    )
    .unwrap()
    .unwrap();
    assert_eq!(
        (
            a.secret.0.len(),
            a.secret_file.as_deref(),
            a.max_skew_ms,
            a.silent_ms,
            a.floor_percent,
            a.step_percent
        ),
        (
            0,
            Some(Path::new("/etc/switchyard/agent.key")),
            100,
            3_600_000,
            100,
            1
        )
    );
}

#[test]
fn agents_rules() {
    let s = format!("secret = \"{SECRET}\"");
    let cases = [
        (
            format!("[agents]\n{s}"),
            "agents: listen is required (the address and port controld receives reports on, like \"198.19.0.1:7007\")",
        ),
        (
            format!("[agents]\nlisten = \"198.19.0.1\"\n{s}"),
            "agents: listen \"198.19.0.1\" is not an IPv4 address and port (expected like \"198.19.0.1:7007\")",
        ),
        (
            format!("[agents]\nlisten = \"0.0.0.0:7007\"\n{s}"),
            "agents: listen \"0.0.0.0:7007\" is not a unicast address (reports are bound to the address they are sent to, so it must be one address of controld)",
        ),
        (
            format!("[agents]\nlisten = \"198.19.0.1:0\"\n{s}"),
            "agents: listen \"198.19.0.1:0\": port 0 is not allowed",
        ),
        (
            "[agents]\nlisten = \"198.19.0.1:7007\"".to_string(),
            "agents: secret or secret_file is required (the secret shared with lb-agent)",
        ),
        (
            format!("[agents]\nlisten = \"198.19.0.1:7007\"\n{s}\nsecret_file = \"/k\""),
            "agents: secret and secret_file are both set (give exactly one)",
        ),
        (
            "[agents]\nlisten = \"198.19.0.1:7007\"\nsecret = \"short\"".to_string(),
            "agents: secret is 5 bytes long, shorter than 16 (use e.g. 32 random bytes: `head -c 32 /dev/urandom | base64`)",
        ),
        (
            format!(
                "[agents]\nlisten = \"198.19.0.1:7007\"\nsecret = \"{}\"",
                "x".repeat(1025)
            ),
            "agents: secret is 1025 bytes long, longer than 1024",
        ),
        (
            "[agents]\nlisten = \"198.19.0.1:7007\"\nsecret_file = \"agent.key\"".to_string(),
            "agents: secret_file \"agent.key\" is not an absolute path",
        ),
        (
            format!("[agents]\nlisten = \"198.19.0.1:7007\"\n{s}\nmax_skew_ms = 99"),
            "agents: max_skew_ms 99 is less than 100",
        ),
        (
            format!("[agents]\nlisten = \"198.19.0.1:7007\"\n{s}\nmax_skew_ms = 600001"),
            "agents: max_skew_ms 600001 exceeds 600000",
        ),
        (
            format!("[agents]\nlisten = \"198.19.0.1:7007\"\n{s}\nsilent_ms = 3600001"),
            "agents: silent_ms 3600001 exceeds 3600000",
        ),
        (
            format!("[agents]\nlisten = \"198.19.0.1:7007\"\n{s}\nfloor_percent = 0"),
            "agents: floor_percent 0 is less than 1",
        ),
        (
            format!("[agents]\nlisten = \"198.19.0.1:7007\"\n{s}\nstep_percent = 101"),
            "agents: step_percent 101 exceeds 100",
        ),
    ];
    for (table, want) in cases {
        assert_eq!(agents_of(&table).unwrap_err(), want, "{table}");
    }
}

#[test]
fn unknown_key_in_agents() {
    let e = agents_of(&format!(
        "[agents]\nlisten = \"198.19.0.1:7007\"\nsecret = \"{SECRET}\"\nsecrte_file = \"/k\""
    ))
    .unwrap_err();
    assert!(
        e.contains(
            "unknown field `secrte_file`, expected one of `listen`, `secret`, `secret_file`, \
             `max_skew_ms`, `silent_ms`, `floor_percent`, `step_percent`"
        ),
        "{e}"
    );
}

#[test]
fn load_reads_the_secret_file_and_checks_it() {
    let dir = std::env::temp_dir().join(format!("switchyard-agents-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key = dir.join("agent.key");
    let cfg = dir.join("a.toml");
    std::fs::write(
        &cfg,
        head(&format!(
            "[agents]\nlisten = \"198.19.0.1:7007\"\nsecret_file = \"{}\"",
            key.display()
        )),
    )
    .unwrap();
    // One trailing newline is not part of the secret.
    std::fs::write(&key, format!("{SECRET}-from-file\n")).unwrap();
    let a = load(&cfg).unwrap().agents.unwrap();
    assert_eq!(a.secret.0, format!("{SECRET}-from-file").as_bytes());
    std::fs::write(&key, "tooshort\n").unwrap();
    assert_eq!(
        load(&cfg).unwrap_err().to_string(),
        format!(
            "{}: agents: the secret in secret_file {:?} is 8 bytes long, shorter than 16 (use e.g. 32 random bytes: `head -c 32 /dev/urandom | base64`)",
            cfg.display(),
            key.display().to_string()
        )
    );
    std::fs::remove_file(&key).unwrap();
    assert_eq!(
        load(&cfg).unwrap_err().to_string(),
        format!(
            "{}: agents: secret_file {:?}: cannot read: No such file or directory (os error 2)",
            cfg.display(),
            key.display().to_string()
        )
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn afpacket_example_parses_with_every_mode_and_feature() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/examples/afpacket.toml");
    let text = std::fs::read_to_string(path).unwrap();
    let c = parse(&text).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.instance, "edge");
    assert!(c.ports.iter().all(|p| p.driver == Driver::Afpacket));
    assert_eq!(
        c.routing,
        Routing {
            mirror: true,
            resolve: true
        }
    );
    assert_eq!(c.tunnel.source, Some(ip(198, 19, 0, 1)));
    let modes: Vec<Mode> = c.services.iter().map(|s| s.mode).collect();
    assert_eq!(modes, [Mode::Nat, Mode::Dr, Mode::Tunnel, Mode::Nat]);
    assert!(
        c.services
            .iter()
            .all(|s| s.backends.iter().all(|b| b.health.is_some()))
    );
    assert!(c.agents.is_some());
    assert!(c.admin.metrics.is_some());
}

/// Two ports on one interface would each see every frame of it; an
/// AF_PACKET port on a loopback interface has no MAC (00:00:00:00:00:00)
/// and no wire. Both were accepted.
#[test]
fn afpacket_ports_need_distinct_interfaces_that_are_not_loopback() {
    assert_eq!(
        err(&afpacket_base().replace("interface = \"l1\"", "interface = \"l0\"")),
        "port \"backend\": interface \"l0\" is already used by port \"client\" (one port per interface)"
    );
    assert_eq!(
        err(&afpacket_base().replace("interface = \"l0\"", "interface = \"lo\"")),
        "port \"client\": interface \"lo\" is the loopback interface: it has no MAC and no wire (use a real or veth interface, or driver \"vnic\")"
    );
}

/// A tunnel source that is a backend's address (the backend would get
/// packets from itself) and a static neighbour that is a VIP (frames for
/// the VIP sent to that MAC) were accepted.
#[test]
fn tunnel_source_and_neighbours_are_not_backends_or_vips() {
    let tunnel = with(
        "protocol = \"tcp\"",
        "protocol = \"tcp\"\nmode = \"tunnel\"",
    )
    .replace("port = 8080", "port = 80")
    .replacen(
        "[[port]]",
        "[tunnel]\nsource = \"198.19.1.1\"\n\n[[port]]",
        1,
    );
    assert_eq!(
        err(&tunnel),
        "tunnel: source 198.19.1.1 is the address of backend \"web1\" of service \"web\" (use an address of the appliance)"
    );
    assert_eq!(
        err(&plus(
            "[[neighbour]]\naddress = \"198.18.0.10\"\nmac = \"02:00:00:00:09:01\"\nport = \"client\""
        )),
        "neighbour \"198.18.0.10\" is the VIP of service \"web\" (switchd answers ARP for VIPs; a neighbour entry would send the VIP's traffic away)"
    );
}

// ---- warnings and address rules ----

/// The warnings `parse_checked` returns for `text`, as the operator reads them.
fn warnings_of(text: &str) -> Vec<String> {
    parse_checked(text)
        .unwrap_or_else(|e| panic!("{e}"))
        .warnings
        .iter()
        .map(|w| w.to_string())
        .collect()
}

const WEB1: &str =
    "\n  [[service.backend]]\n  name = \"web1\"\n  address = \"198.19.1.1\"\n  port = 8080\n";

/// A service being staged (no backends yet) and a service whose every
/// backend is drained (weight 0) are legitimate, but can take no new
/// connection: both were accepted without a word.
#[test]
fn a_service_that_can_take_no_connection_is_accepted_with_a_warning() {
    assert_eq!(warnings_of(BASE), Vec::<String>::new());
    let c = parse_checked(&with(WEB1, "")).unwrap();
    assert!(c.config.services[0].backends.is_empty());
    assert_eq!(
        c.warnings,
        vec![Warning::NoBackends {
            service: "web".into()
        }]
    );
    assert_eq!(
        warnings_of(&with(WEB1, "")),
        ["service \"web\": has no backends (it refuses every new connection until one is added)"]
    );
    let zero = with("port = 8080", "port = 8080\n  weight = 0")
        + "\n  [[service.backend]]\n  name = \"web2\"\n  address = \"198.19.1.2\"\n  weight = 0\n";
    assert_eq!(
        warnings_of(&zero),
        [
            "service \"web\": every backend has weight 0 (it refuses every new connection; existing ones continue)"
        ]
    );
    // One backend with a weight is enough.
    let one = with("port = 8080", "port = 8080\n  weight = 0")
        + "\n  [[service.backend]]\n  name = \"web2\"\n  address = \"198.19.1.2\"\n";
    assert_eq!(warnings_of(&one), Vec::<String>::new());
}

/// 127.0.0.0/8 never arrives from a wire and no host on one answers for
/// it: on an appliance with AF_PACKET ports a loopback VIP or backend is
/// refused; on vnic ports (whose "wire" is a program) it is a warning.
#[test]
fn loopback_vips_and_backends_are_refused_on_afpacket_and_warned_on_vnic() {
    let vip = |t: &str| t.replace("vip = \"198.18.0.10\"", "vip = \"127.0.0.5\"");
    let backend = |t: &str| t.replace("address = \"198.19.1.1\"", "address = \"127.0.0.1\"");
    assert_eq!(
        err(&vip(&afpacket_base())),
        "service \"web\": vip 127.0.0.5 is a loopback address (127.0.0.0/8 never arrives from or leaves through an afpacket port)"
    );
    assert_eq!(
        err(&backend(&afpacket_base())),
        "service \"web\": backend \"web1\": address 127.0.0.1 is a loopback address (127.0.0.0/8 never arrives from or leaves through an afpacket port)"
    );
    assert_eq!(
        warnings_of(&vip(BASE)),
        [
            "service \"web\": vip 127.0.0.5 is a loopback address (no real network delivers 127.0.0.0/8; only a vnic wire can)"
        ]
    );
    assert_eq!(
        warnings_of(&backend(BASE)),
        [
            "service \"web\": backend \"web1\": address 127.0.0.1 is a loopback address (no real network delivers 127.0.0.0/8; only a vnic wire can)"
        ]
    );
}

/// A route to a VIP, or through a VIP, sends the appliance's traffic to
/// itself: both were accepted.
#[test]
fn routes_to_or_through_a_vip_are_refused() {
    assert_eq!(
        err(&plus(
            "[[route]]\nprefix = \"198.18.0.10/32\"\nport = \"client\""
        )),
        "route \"198.18.0.10/32\": prefix is the VIP of service \"web\" (the VIP is the appliance's own address; nothing is routed to it)"
    );
    assert_eq!(
        err(&plus(
            "[[route]]\nprefix = \"0.0.0.0/0\"\nport = \"client\"\nvia = \"198.18.0.10\""
        )),
        "route \"0.0.0.0/0\": via 198.18.0.10 is the VIP of service \"web\" (a gateway must be another host; the appliance would send packets to itself)"
    );
    // A route that merely covers a VIP is ordinary.
    parse(&plus(
        "[[route]]\nprefix = \"198.18.0.0/24\"\nport = \"client\"",
    ))
    .unwrap();
}

/// A key of hundreds of dotted parts made toml fail with "recursion limit"
/// and no line; nested inline arrays already name theirs.
#[test]
fn a_key_nested_too_deep_is_refused_with_its_line() {
    let deep = vec!["a"; 300].join(".");
    assert_eq!(
        err(&format!("{BASE}\n[{deep}]\nx = 1\n")),
        "line 30: key of 300 dotted parts is nested too deep (the TOML parser allows at most 80)"
    );
    assert_eq!(
        err(&format!("{BASE}\n{deep} = 1\n")),
        "line 30: key of 300 dotted parts is nested too deep (the TOML parser allows at most 80)"
    );
    // The limit is exact: 80 parts reach the schema (an unknown key), 81 do not.
    let at = |n: usize| err(&format!("{BASE}\n[{}]\n", vec!["a"; n].join(" . ")));
    assert!(at(80).contains("unknown field `a`"), "{}", at(80));
    assert!(
        at(81).starts_with("line 30: key of 81 dotted parts"),
        "{}",
        at(81)
    );
    let arrays = format!("{BASE}\nx = {}{}\n", "[".repeat(300), "]".repeat(300));
    let e = err(&arrays);
    assert!(e.starts_with("TOML parse error at line 30, column"), "{e}");
}

/// `syn_proxy`: true, false or "auto"; TCP NAT services only. The
/// thresholds of "auto" in `[limits]`.
#[test]
fn syn_proxy_rules() {
    let sp = |v: &str| {
        with(
            "protocol = \"tcp\"",
            &format!("protocol = \"tcp\"\nsyn_proxy = {v}"),
        )
    };
    assert_eq!(
        parse(&sp("true")).unwrap().services[0].syn_proxy,
        SynProxy::On
    );
    assert_eq!(
        parse(&sp("false")).unwrap().services[0].syn_proxy,
        SynProxy::Off
    );
    assert_eq!(
        parse(&sp("\"auto\"")).unwrap().services[0].syn_proxy,
        SynProxy::Auto
    );
    assert_eq!(parse(BASE).unwrap().services[0].syn_proxy, SynProxy::Off);
    assert_eq!(
        err(&sp("\"on\"")),
        "service \"web\": syn_proxy \"on\" is not supported (supported: true, false, \"auto\")"
    );
    assert_eq!(
        err(&with(
            "protocol = \"tcp\"",
            "protocol = \"udp\"\nsyn_proxy = true"
        )),
        "service \"web\": syn_proxy needs protocol \"tcp\" (SYN cookies answer TCP handshakes; this service is \"udp\")"
    );
    for mode in ["dr", "tunnel"] {
        let text = head("[tunnel]\nsource = \"198.18.0.2\"")
            .replacen(
                "protocol = \"tcp\"",
                &format!("protocol = \"tcp\"\nmode = \"{mode}\"\nsyn_proxy = \"auto\""),
                1,
            )
            .replace("port = 8080", "port = 80");
        assert_eq!(
            err(&text),
            format!(
                "service \"web\": syn_proxy needs mode \"nat\" (the switch must see the backend's replies to splice the two connections; mode \"{mode}\" sends them past it)"
            )
        );
    }
    let l = parse(&head(
        "[limits]\nsyn_proxy_auto_syn_rate = 0\nsyn_proxy_auto_occupancy = 100",
    ))
    .unwrap()
    .limits;
    assert_eq!(
        (l.syn_proxy_auto_syn_rate, l.syn_proxy_auto_occupancy),
        (0, 100)
    );
    assert_eq!(
        err(&head("[limits]\nsyn_proxy_auto_occupancy = 101")),
        "limits: syn_proxy_auto_occupancy 101 exceeds 100"
    );
    assert_eq!(
        err(&head("[limits]\nsyn_proxy_auto_syn_rate = -1")),
        "limits: syn_proxy_auto_syn_rate -1 is less than 0"
    );
}
