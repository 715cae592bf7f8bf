//! Tests of the layer-7 keys: every rule has a test asserting the exact
//! message; L4 files are covered by `tests.rs` and stay unchanged.

use super::*;

/// A valid file with one l7 service (two pools, three rules) and one L4 service.
const L7BASE: &str = r#"
instance = "t"

[l7]
source = "198.18.0.200"

[[port]]
name = "p0"
driver = "vnic"
mac = "02:00:00:00:00:01"

[[switch]]
name = "sw0"
cpu = 1
ports = ["p0"]

[[service]]
name = "web"
vip = "198.18.0.10"
port = 80
protocol = "tcp"
mode = "l7"
default_pool = "static"
proxy_protocol = true

  [[service.pool]]
  name = "api"
  scheduler = "wlc"

  [[service.pool]]
  name = "static"

  [[service.rule]]
  host = "*.Example.COM"
  path_prefix = "/api/"
  pool = "api"

  [[service.rule]]
  header = { name = "X-Tenant", value = "blue" }
  method = "POST"
  pool = "api"

  [[service.rule]]
  host = "static.example.net"
  pool = "static"

  [[service.backend]]
  name = "a1"
  address = "198.19.1.1"
  port = 8080
  pool = "api"
  max_conns = 10

  [[service.backend]]
  name = "s1"
  address = "198.19.1.2"
  pool = "static"

  [[service.backend]]
  name = "a2"
  address = "198.19.1.3"
  pool = "api"
  weight = 3

[[service]]
name = "dns"
vip = "198.18.0.10"
port = 53
protocol = "udp"

  [[service.backend]]
  name = "d1"
  address = "198.19.2.1"
"#;

fn err(text: &str) -> String {
    match parse(text) {
        Ok(c) => panic!("accepted: {c:?}"),
        Err(e) => e.to_string(),
    }
}

/// `L7BASE` with `from` replaced by `to` (which must occur exactly once).
fn with(from: &str, to: &str) -> String {
    assert_eq!(L7BASE.matches(from).count(), 1, "{from:?}");
    L7BASE.replacen(from, to, 1)
}

/// A file with `[l7] source` and one service made of `service` (its keys
/// and sub-tables, after name/vip/port).
fn one(service: &str) -> String {
    format!(
        r#"
instance = "t"
[l7]
source = "198.18.0.200"
[[port]]
name = "p0"
driver = "vnic"
mac = "02:00:00:00:00:01"
[[switch]]
name = "sw0"
cpu = 1
ports = ["p0"]
[[service]]
name = "web"
vip = "198.18.0.10"
port = 80
{service}
"#
    )
}

#[test]
fn l7_service_parses_with_pools_rules_and_defaults() {
    let c = parse(L7BASE).unwrap();
    assert_eq!(
        c.l7,
        L7 {
            source: Some(Ipv4Addr::new(198, 18, 0, 200)),
            head_limit: 8192,
            head_timeout_ms: 5000,
        }
    );
    let s = &c.services[0];
    assert_eq!(s.mode, Mode::L7);
    assert_eq!(s.backends[0].port, 8080);
    assert_eq!(s.backends[1].port, 80);
    let want = L7Service {
        pools: vec![
            Pool {
                name: "api".into(),
                scheduler: PoolScheduler::Wlc,
                backends: vec![0, 2],
            },
            Pool {
                name: "static".into(),
                scheduler: PoolScheduler::Wrr,
                backends: vec![1],
            },
        ],
        rules: vec![
            Rule {
                host: Some(HostMatch::Suffix(".example.com".into())),
                path_prefix: Some("/api/".into()),
                method: None,
                header: None,
                pool: 0,
            },
            Rule {
                host: None,
                path_prefix: None,
                method: Some("POST".into()),
                header: Some(HeaderMatch {
                    name: "x-tenant".into(),
                    value: "blue".into(),
                }),
                pool: 0,
            },
            Rule {
                host: Some(HostMatch::Exact("static.example.net".into())),
                path_prefix: None,
                method: None,
                header: None,
                pool: 1,
            },
        ],
        default_pool: 1,
        proxy_protocol: true,
    };
    assert_eq!(s.l7.as_ref(), Some(&want));
    assert_eq!(c.services[1].l7, None);
}

#[test]
fn without_pools_every_backend_is_in_the_implicit_default_pool() {
    let c = parse(&one(r#"protocol = "tcp"
mode = "l7"
  [[service.backend]]
  name = "b1"
  address = "198.19.1.1"
  [[service.backend]]
  name = "b2"
  address = "198.19.1.2"
  pool = "default"
  [[service.rule]]
  path_prefix = "/"
  pool = "default""#))
    .unwrap();
    let l7 = c.services[0].l7.as_ref().unwrap();
    assert_eq!(
        l7.pools,
        vec![Pool {
            name: "default".into(),
            scheduler: PoolScheduler::Wrr,
            backends: vec![0, 1],
        }]
    );
    assert_eq!((l7.default_pool, l7.proxy_protocol), (0, false));
    assert_eq!(l7.rules[0].pool, 0);
}

#[test]
fn l7_table_keys_have_ranges() {
    let c = parse(&with(
        "source = \"198.18.0.200\"",
        "source = \"198.18.0.200\"\nhead_limit = 65536\nhead_timeout_ms = 100",
    ))
    .unwrap();
    assert_eq!((c.l7.head_limit, c.l7.head_timeout_ms), (65536, 100));
    assert_eq!(
        err(&with(
            "source = \"198.18.0.200\"",
            "source = \"198.18.0.200\"\nhead_limit = 65537"
        )),
        "l7: head_limit 65537 exceeds 65536"
    );
    assert_eq!(
        err(&with(
            "source = \"198.18.0.200\"",
            "source = \"198.18.0.200\"\nhead_limit = 1023"
        )),
        "l7: head_limit 1023 is less than 1024"
    );
    assert_eq!(
        err(&with(
            "source = \"198.18.0.200\"",
            "source = \"198.18.0.200\"\nhead_timeout_ms = 99"
        )),
        "l7: head_timeout_ms 99 is less than 100"
    );
    assert_eq!(
        err(&with("source = \"198.18.0.200\"", "source = \"nope\"")),
        "l7: source \"nope\" is not an IPv4 address (expected like 198.18.0.10)"
    );
    assert!(
        err(&with("source = \"198.18.0.200\"", "sauce = 1")).contains(
            "unknown field `sauce`, expected one of `source`, `head_limit`, `head_timeout_ms`"
        ),
    );
}

#[test]
fn l7_needs_a_source_of_its_own() {
    assert_eq!(
        err(&with("[l7]\nsource = \"198.18.0.200\"\n", "")),
        "service \"web\": mode \"l7\" needs [l7] source (the address the switches connect to backends from)"
    );
    assert_eq!(
        err(&with(
            "source = \"198.18.0.200\"",
            "source = \"198.18.0.10\""
        )),
        "l7: source 198.18.0.10 is the VIP of service \"web\" (use an address of its own for back-end connections)"
    );
    assert_eq!(
        err(&with(
            "source = \"198.18.0.200\"",
            "source = \"198.19.2.1\""
        )),
        "l7: source 198.19.2.1 is the address of backend \"d1\" of service \"dns\" (use an address of its own for back-end connections)"
    );
    assert_eq!(
        err(&with(
            "source = \"198.18.0.200\"",
            "source = \"198.18.0.200\"\n[tunnel]\nsource = \"198.18.0.200\""
        )),
        "l7: source 198.18.0.200 is also [tunnel] source (use an address of its own for back-end connections)"
    );
    // A source without any l7 service is fine.
    let l4 = with("mode = \"l7\"\n", "")
        .replace("default_pool = \"static\"\nproxy_protocol = true\n", "");
    let l4 = l4[..l4.find("  [[service.pool]]").unwrap()].to_string()
        + &l4[l4.find("[[service]]\nname = \"dns\"").unwrap()..];
    assert_eq!(
        parse(&l4).unwrap().l7.source,
        Some(Ipv4Addr::new(198, 18, 0, 200))
    );
}

#[test]
fn l7_needs_tcp_and_no_service_scheduler() {
    assert_eq!(
        err(&one("protocol = \"udp\"\nmode = \"l7\"")),
        "service \"web\": mode \"l7\" needs protocol \"tcp\" (it serves HTTP/1.x), not \"udp\""
    );
    assert_eq!(
        err(&one(
            "protocol = \"tcp\"\nmode = \"l7\"\nscheduler = \"wrr\""
        )),
        "service \"web\": scheduler is not set for mode \"l7\" (each [[service.pool]] has its own scheduler)"
    );
    assert_eq!(
        err(&one(
            "protocol = \"tcp\"\nmode = \"l7\"\nlatency_target_ms = 50"
        )),
        "service \"web\": latency_target_ms is not supported for mode \"l7\" yet (controlled loading adjusts L4 NAT services)"
    );
    assert_eq!(
        err(&one("protocol = \"tcp\"\nmode = \"l8\"")),
        "service \"web\": mode \"l8\" is not supported (supported: nat, dr, tunnel, l7)"
    );
}

#[test]
fn l4_services_refuse_every_l7_key() {
    let l4 = |extra: &str| {
        one(&format!(
            "protocol = \"tcp\"\n{extra}\n  [[service.backend]]\n  name = \"b1\"\n  address = \"198.19.1.1\""
        ))
    };
    assert_eq!(
        err(&l4("default_pool = \"x\"")),
        "service \"web\": default_pool is only for mode \"l7\""
    );
    assert_eq!(
        err(&l4("proxy_protocol = false")),
        "service \"web\": proxy_protocol is only for mode \"l7\""
    );
    assert_eq!(
        err(&l4("  [[service.pool]]\n  name = \"api\"")),
        "service \"web\": [[service.pool]] is only for mode \"l7\""
    );
    assert_eq!(
        err(&l4(
            "  [[service.rule]]\n  method = \"GET\"\n  pool = \"api\""
        )),
        "service \"web\": [[service.rule]] is only for mode \"l7\""
    );
    assert_eq!(
        err(&one(
            "protocol = \"tcp\"\nmode = \"dr\"\n  [[service.backend]]\n  name = \"b1\"\n  address = \"198.19.1.1\"\n  pool = \"default\""
        )),
        "service \"web\": backend \"b1\": pool is only for mode \"l7\""
    );
}

#[test]
fn pool_rules() {
    assert_eq!(
        err(&with("  name = \"static\"\n", "  name = \"api\"\n")),
        "service \"web\": pool \"api\" is defined twice"
    );
    assert_eq!(
        err(&with("  name = \"static\"\n", "  name = \"st atic\"\n")),
        "service \"web\": pool name \"st atic\" is not valid (expected 1 to 32 characters from A-Z a-z 0-9 _ -)"
    );
    assert_eq!(
        err(&with("scheduler = \"wlc\"", "scheduler = \"maglev\"")),
        "service \"web\": pool \"api\": scheduler \"maglev\" is not supported (supported: wrr, wlc)"
    );
    assert_eq!(
        err(&with(
            "address = \"198.19.1.2\"\n  pool = \"static\"",
            "address = \"198.19.1.2\"\n  pool = \"statik\""
        )),
        "service \"web\": backend \"s1\": pool \"statik\" is not defined (defined pools: api, static)"
    );
    assert_eq!(
        err(&with(
            "  address = \"198.19.1.2\"\n  pool = \"static\"\n",
            "  address = \"198.19.1.2\"\n"
        )),
        "service \"web\": backend \"s1\": pool is required (the service defines [[service.pool]]; defined pools: api, static)"
    );
    assert_eq!(
        err(&with(
            "default_pool = \"static\"",
            "default_pool = \"dynamic\""
        )),
        "service \"web\": default_pool: pool \"dynamic\" is not defined (defined pools: api, static)"
    );
    assert_eq!(
        err(&one(
            "protocol = \"tcp\"\nmode = \"l7\"\n  [[service.backend]]\n  name = \"b1\"\n  address = \"198.19.1.1\"\n  pool = \"api\""
        )),
        "service \"web\": backend \"b1\": pool \"api\" is not defined (defined pools: default)"
    );
    let many: String = (0..65)
        .map(|i| format!("  [[service.pool]]\n  name = \"p{i}\"\n"))
        .collect();
    assert_eq!(
        err(&one(&format!("protocol = \"tcp\"\nmode = \"l7\"\n{many}"))),
        "service \"web\": 65 pools are defined, at most 64 are supported"
    );
}

#[test]
fn rule_needs_a_condition_and_a_defined_pool() {
    assert_eq!(
        err(&with("  host = \"static.example.net\"\n", "")),
        "service \"web\": rule 3: has no condition (give host, path_prefix, method or header; unmatched requests go to default_pool)"
    );
    assert_eq!(
        err(&with(
            "  host = \"static.example.net\"\n  pool = \"static\"",
            "  host = \"static.example.net\"\n  pool = \"nope\""
        )),
        "service \"web\": rule 3: pool \"nope\" is not defined (defined pools: api, static)"
    );
    assert!(
        err(&with(
            "  host = \"static.example.net\"\n  pool = \"static\"",
            "  host = \"static.example.net\""
        ))
        .contains("missing field `pool`")
    );
    let many: String = (0..257)
        .map(|_| "  [[service.rule]]\n  method = \"GET\"\n  pool = \"default\"\n".to_string())
        .collect();
    assert_eq!(
        err(&one(&format!("protocol = \"tcp\"\nmode = \"l7\"\n{many}"))),
        "service \"web\": 257 rules are defined, at most 256 are supported"
    );
}

#[test]
fn host_patterns() {
    let host = |h: &str| with("host = \"static.example.net\"", &format!("host = \"{h}\""));
    let ok = |h: &str| {
        parse(&host(h)).unwrap().services[0]
            .l7
            .as_ref()
            .unwrap()
            .rules[2]
            .host
            .clone()
            .unwrap()
    };
    assert_eq!(
        ok("Static.Example.NET"),
        HostMatch::Exact("static.example.net".into())
    );
    assert_eq!(ok("*.com"), HostMatch::Suffix(".com".into()));
    assert_eq!(ok("198.19.0.1"), HostMatch::Exact("198.19.0.1".into()));
    for bad in [
        "",
        "*",
        "*.",
        "*.*.example.com",
        "*example.com",
        "a.*.com",
        "example.com:80",
        "exa mple.com",
        ".example.com",
        "example..com",
        "-a.com",
        "a-.com",
        "*.a_b.com",
    ] {
        assert_eq!(
            err(&host(bad)),
            format!(
                "service \"web\": rule 3: host {bad:?} is not a host name or pattern (expected like example.com or *.example.com: labels of A-Z a-z 0-9 -, a '*' only as the whole first label, no port)"
            ),
            "{bad:?}"
        );
    }
}

#[test]
fn path_method_and_header_conditions() {
    let rule = |cond: &str| with("host = \"static.example.net\"", cond);
    for bad in ["api/", "", "/a b", "/\u{e9}"] {
        assert_eq!(
            err(&rule(&format!("path_prefix = {bad:?}"))),
            format!(
                "service \"web\": rule 3: path_prefix {bad:?} is not a path prefix (expected '/' then visible characters, at most 256, like \"/api/\")"
            )
        );
    }
    for bad in ["get", "", "GE T", "GET1"] {
        assert_eq!(
            err(&rule(&format!("method = {bad:?}"))),
            format!(
                "service \"web\": rule 3: method {bad:?} is not a method (expected 1 to 32 characters A-Z, like \"GET\"; methods are case-sensitive)"
            )
        );
    }
    assert_eq!(
        err(&rule("method = \"CONNECT\"")),
        "service \"web\": rule 3: method \"CONNECT\" is refused by l7 services (answered 501), a rule cannot route it"
    );
    assert_eq!(
        err(&rule("header = { name = \"X Tenant\", value = \"blue\" }")),
        "service \"web\": rule 3: header name \"X Tenant\" is not a header name (expected 1 to 256 characters A-Z a-z 0-9 and !#$%&'*+-.^_`|~)"
    );
    for bad in [" blue", "blue ", "bl\nue", "bl\tue"] {
        assert_eq!(
            err(&rule(&format!(
                "header = {{ name = \"X-T\", value = {bad:?} }}"
            ))),
            format!(
                "service \"web\": rule 3: header value {bad:?} is not a header value (expected at most 256 visible characters and inner spaces)"
            )
        );
    }
    assert!(err(&rule("header = { name = \"X-T\" }")).contains("missing field `value`"));
    // An empty value is a value (the header is present and empty).
    let c = parse(&rule("header = { name = \"X-T\", value = \"\" }")).unwrap();
    assert_eq!(
        c.services[0].l7.as_ref().unwrap().rules[2].header,
        Some(HeaderMatch {
            name: "x-t".into(),
            value: "".into()
        })
    );
}

#[test]
fn host_match_ignores_case_and_needs_a_label_before_the_suffix() {
    let s = HostMatch::Suffix(".example.com".into());
    assert!(s.matches(b"a.example.com"));
    assert!(s.matches(b"A.B.EXAMPLE.Com"));
    assert!(!s.matches(b"example.com"));
    assert!(!s.matches(b".example.com"));
    assert!(!s.matches(b"aexample.com"));
    let e = HostMatch::Exact("example.com".into());
    assert!(e.matches(b"EXAMPLE.com"));
    assert!(!e.matches(b"www.example.com"));
}
