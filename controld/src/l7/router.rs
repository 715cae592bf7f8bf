//! From a request head to a pool: the head is parsed with httparse, and
//! the service's rules are tried in order; the first whose every condition
//! matches gives the pool, else the default pool. A head that is not a
//! request the appliance can route is an [`HttpReject`]:
//! - 400: not a complete, well-formed HTTP/1.x request head (httparse's
//!   rules, plus: an HTTP/1.1 request needs exactly one `Host`, a request
//!   may not carry both `Transfer-Encoding` and `Content-Length` nor two
//!   different `Content-Length`s, and the target must be origin-form,
//!   absolute-form or `*` for OPTIONS);
//! - 431: a head longer than `[l7] head_limit`, or more than
//!   [`MAX_HEADERS`] header fields;
//! - 501: a refused method ([`REFUSED_METHODS`](crate::config::REFUSED_METHODS));
//! - 505: a well-formed version other than HTTP/1.0 and HTTP/1.1.
//!
//! The host a rule sees is the authority of an absolute-form target if
//! there is one, else the `Host` header; its port and one trailing dot are
//! dropped. Only the first request of a connection is routed: the switch
//! splices the connection to that backend, so later requests on a
//! keep-alive connection go to it too.

use shm_layout::config_slot::BackendRec;

use super::HttpReject;
use super::pick::{Conns, Picked, PoolPicker};
use crate::config::{self, REFUSED_METHODS, Rule, Service};

/// Most header fields of a request.
pub const MAX_HEADERS: usize = 100;

const MALFORMED: HttpReject = HttpReject::new(400, "malformed request head");
const INCOMPLETE: HttpReject = HttpReject::new(400, "incomplete request head");
const BAD_TARGET: HttpReject = HttpReject::new(400, "malformed request target");
const NO_HOST: HttpReject = HttpReject::new(400, "missing Host header");
const TWO_HOSTS: HttpReject = HttpReject::new(400, "more than one Host header");
const BAD_HOST: HttpReject = HttpReject::new(400, "malformed Host header");
const TE_AND_CL: HttpReject = HttpReject::new(400, "both Transfer-Encoding and Content-Length");
const TWO_CL: HttpReject = HttpReject::new(400, "conflicting Content-Length headers");
const TE_HTTP10: HttpReject = HttpReject::new(400, "Transfer-Encoding in an HTTP/1.0 request");
const TOO_LARGE: HttpReject = HttpReject::new(431, "request head too large");
const TOO_MANY: HttpReject = HttpReject::new(431, "too many header fields");
const REFUSED: HttpReject = HttpReject::new(501, "method not implemented");
const VERSION: HttpReject = HttpReject::new(505, "only HTTP/1.0 and HTTP/1.1 are served");

/// Why a router could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouterError {
    #[error("service {0:?} is not an l7 service")]
    NotL7(String),
    #[error("service {service:?}: {recs} backend records for {backends} backends")]
    Records {
        service: String,
        recs: usize,
        backends: usize,
    },
}

/// Where a request goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// The pool, as an index into the service's pools.
    pub pool: usize,
    /// The rule that matched (index in file order); `None`: the default pool.
    pub rule: Option<usize>,
}

/// One l7 service's routing: its rules, its pools and their schedulers,
/// over the master's records of its backends. Rebuilt from every new
/// configuration snapshot (health, drain and weight changes come that way);
/// the `wrr` interleave then starts over, as the switches' does.
#[derive(Debug, Clone)]
pub struct Router {
    head_limit: usize,
    rules: Vec<Rule>,
    default_pool: usize,
    pool_names: Vec<String>,
    pools: Vec<PoolPicker>,
    recs: Vec<BackendRec>,
    proxy_protocol: bool,
}

impl Router {
    /// The router of `service` (mode `"l7"`), whose backends' records (in
    /// the service's order, as the master publishes them) are `recs`.
    pub fn new(
        service: &Service,
        l7: &config::L7,
        recs: &[BackendRec],
    ) -> Result<Self, RouterError> {
        let Some(s) = &service.l7 else {
            return Err(RouterError::NotL7(service.name.clone()));
        };
        if recs.len() != service.backends.len() {
            return Err(RouterError::Records {
                service: service.name.clone(),
                recs: recs.len(),
                backends: service.backends.len(),
            });
        }
        Ok(Router {
            head_limit: l7.head_limit as usize,
            rules: s.rules.clone(),
            default_pool: s.default_pool,
            pool_names: s.pools.iter().map(|p| p.name.clone()).collect(),
            pools: s
                .pools
                .iter()
                .map(|p| PoolPicker::new(p.scheduler, p.backends.clone()))
                .collect(),
            recs: recs.to_vec(),
            proxy_protocol: s.proxy_protocol,
        })
    }

    /// Whether backends get a PROXY protocol v2 header first.
    pub fn proxy_protocol(&self) -> bool {
        self.proxy_protocol
    }

    /// The name of pool `i`.
    pub fn pool_name(&self, i: usize) -> &str {
        &self.pool_names[i]
    }

    /// Picks and reserves a backend of pool `pool` (from [`Router::route`]).
    pub fn pick(
        &mut self,
        pool: usize,
        conns: &(impl Conns + ?Sized),
    ) -> Result<Picked, HttpReject> {
        self.pools[pool].pick(&self.recs, conns)
    }

    /// Parses the request head at the start of `head` (bytes after the
    /// head, a body's start, are ignored) and applies the rules.
    pub fn route(&self, head: &[u8]) -> Result<Route, HttpReject> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        let len = match req.parse(head) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) if head.len() >= self.head_limit => {
                return Err(TOO_LARGE);
            }
            Ok(httparse::Status::Partial) => return Err(INCOMPLETE),
            Err(httparse::Error::TooManyHeaders) => return Err(TOO_MANY),
            Err(httparse::Error::Version) if other_version(head) => return Err(VERSION),
            Err(_) => return Err(MALFORMED),
        };
        if len > self.head_limit {
            return Err(TOO_LARGE);
        }
        let (Some(method), Some(target), Some(minor)) = (req.method, req.path, req.version) else {
            return Err(MALFORMED);
        };
        if REFUSED_METHODS.contains(&method) {
            return Err(REFUSED);
        }
        let (authority, path) = split_target(method, target.as_bytes())?;
        let mut host_header: Option<&[u8]> = None;
        let mut content_length: Option<&[u8]> = None;
        let mut chunked = false;
        for h in req.headers.iter() {
            if h.name.eq_ignore_ascii_case("host") {
                if host_header.replace(h.value).is_some() {
                    return Err(TWO_HOSTS);
                }
            } else if h.name.eq_ignore_ascii_case("content-length") {
                if content_length
                    .replace(h.value)
                    .is_some_and(|v| v != h.value)
                {
                    return Err(TWO_CL);
                }
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = true;
            }
        }
        if chunked && content_length.is_some() {
            return Err(TE_AND_CL);
        }
        if chunked && minor == 0 {
            return Err(TE_HTTP10);
        }
        if minor == 1 && host_header.is_none() {
            return Err(NO_HOST);
        }
        let host = match authority.or(host_header) {
            Some(a) => host_of(a)?,
            None => &[][..],
        };
        let hit = self.rules.iter().position(|r| {
            r.host.as_ref().is_none_or(|m| m.matches(host))
                && r.path_prefix
                    .as_ref()
                    .is_none_or(|p| path.starts_with(p.as_bytes()))
                && r.method.as_ref().is_none_or(|m| m == method)
                && r.header.as_ref().is_none_or(|hm| {
                    req.headers.iter().any(|h| {
                        h.name.eq_ignore_ascii_case(&hm.name) && h.value == hm.value.as_bytes()
                    })
                })
        });
        Ok(match hit {
            Some(i) => Route {
                pool: self.rules[i].pool,
                rule: Some(i),
            },
            None => Route {
                pool: self.default_pool,
                rule: None,
            },
        })
    }
}

/// Whether the request line ends in a well-formed version `HTTP/d.d` (so a
/// version error from httparse means a version it does not serve).
fn other_version(head: &[u8]) -> bool {
    let line = head.split(|&c| c == b'\n').next().unwrap_or_default();
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let v = line.rsplit(|&c| c == b' ').next().unwrap_or_default();
    matches!(v, [b'H', b'T', b'T', b'P', b'/', a, b'.', b]
        if a.is_ascii_digit() && b.is_ascii_digit() && v != b"HTTP/1.0" && v != b"HTTP/1.1")
}

/// The authority (absolute-form only) and the path of a request target.
fn split_target<'a>(method: &str, t: &'a [u8]) -> Result<(Option<&'a [u8]>, &'a [u8]), HttpReject> {
    if t.starts_with(b"/") {
        return Ok((None, t));
    }
    if t == b"*" {
        return if method == "OPTIONS" {
            Ok((None, t))
        } else {
            Err(BAD_TARGET)
        };
    }
    let rest = strip_prefix_ignore_case(t, b"http://")
        .or_else(|| strip_prefix_ignore_case(t, b"https://"))
        .ok_or(BAD_TARGET)?;
    let end = rest
        .iter()
        .position(|&c| c == b'/' || c == b'?')
        .unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    if authority.is_empty() {
        return Err(BAD_TARGET);
    }
    Ok((Some(authority), if path.is_empty() { b"/" } else { path }))
}

fn strip_prefix_ignore_case<'a>(t: &'a [u8], p: &[u8]) -> Option<&'a [u8]> {
    (t.len() >= p.len() && t[..p.len()].eq_ignore_ascii_case(p)).then(|| &t[p.len()..])
}

/// The host of an authority or `Host` value: without its port and one
/// trailing dot. Refuses what cannot be a host.
fn host_of(a: &[u8]) -> Result<&[u8], HttpReject> {
    if a.iter()
        .any(|&c| !c.is_ascii_graphic() || b"/?#@".contains(&c))
    {
        return Err(BAD_HOST);
    }
    let host = if a.starts_with(b"[") {
        let close = a.iter().position(|&c| c == b']').ok_or(BAD_HOST)?;
        &a[..=close]
    } else {
        a.split(|&c| c == b':').next().unwrap_or_default()
    };
    Ok(host.strip_suffix(b".").unwrap_or(host))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::parse;
    use proptest::prelude::*;

    pub(crate) fn l7_file() -> String {
        FILE.to_string()
    }

    /// An l7 service with four pools and rules of every kind.
    const FILE: &str = r#"
instance = "t"
[l7]
source = "198.18.0.200"
head_limit = 1024
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
  [[service.pool]]
  name = "api"
  [[service.pool]]
  name = "static"
  [[service.pool]]
  name = "blue"
  [[service.pool]]
  name = "admin"
  [[service.rule]]
  header = { name = "X-Tenant", value = "blue" }
  pool = "blue"
  [[service.rule]]
  host = "*.example.com"
  path_prefix = "/api/"
  pool = "api"
  [[service.rule]]
  host = "admin.example.org"
  method = "POST"
  pool = "admin"
  [[service.rule]]
  path_prefix = "/api/"
  pool = "static"
  [[service.rule]]
  method = "DELETE"
  pool = "admin"
"#;

    pub(crate) fn router() -> Router {
        let c = parse(FILE).unwrap();
        Router::new(&c.services[0], &c.l7, &[]).unwrap()
    }

    fn route(head: &str) -> Result<(&'static str, Option<usize>), HttpReject> {
        let r = router();
        let names = ["api", "static", "blue", "admin"];
        r.route(head.as_bytes()).map(|x| (names[x.pool], x.rule))
    }

    fn get(target: &str, headers: &str) -> String {
        format!("GET {target} HTTP/1.1\r\n{headers}\r\n")
    }

    #[test]
    fn each_rule_kind_routes_to_its_pool() {
        // header
        assert_eq!(
            route(&get("/", "Host: x\r\nX-Tenant: blue\r\n")),
            Ok(("blue", Some(0)))
        );
        // host suffix + path prefix (both must match)
        assert_eq!(
            route(&get("/api/v1", "Host: www.example.com\r\n")),
            Ok(("api", Some(1)))
        );
        // host exact + method
        assert_eq!(
            route("POST /x HTTP/1.1\r\nHost: admin.example.org\r\nContent-Length: 0\r\n\r\n"),
            Ok(("admin", Some(2)))
        );
        // method alone
        assert_eq!(
            route("DELETE /x HTTP/1.1\r\nHost: a\r\n\r\n"),
            Ok(("admin", Some(4)))
        );
        // nothing matches: the default pool
        assert_eq!(
            route(&get("/", "Host: www.example.com\r\n")),
            Ok(("static", None))
        );
    }

    #[test]
    fn all_conditions_must_match_and_the_first_match_wins() {
        // Host matches rule 2 but not its path: rule 4 (path alone) takes it.
        assert_eq!(
            route(&get("/api/v1", "Host: example.net\r\n")),
            Ok(("static", Some(3)))
        );
        // Rule 1 (header) comes before rule 2 though both match.
        assert_eq!(
            route(&get("/api/", "Host: a.example.com\r\nX-Tenant: blue\r\n")),
            Ok(("blue", Some(0)))
        );
        // GET to the admin host: rule 3 needs POST.
        assert_eq!(
            route(&get("/", "Host: admin.example.org\r\n")),
            Ok(("static", None))
        );
    }

    #[test]
    fn host_ignores_case_port_and_a_trailing_dot_and_needs_a_label() {
        for h in [
            "WWW.Example.COM",
            "www.example.com:8080",
            "www.example.com.",
            "www.example.com.:80",
            "a.b.example.com",
        ] {
            assert_eq!(
                route(&get("/api/x", &format!("Host: {h}\r\n"))),
                Ok(("api", Some(1))),
                "{h}"
            );
        }
        // `*.example.com` does not match example.com itself, nor a name
        // that merely ends in the same letters.
        for h in [
            "example.com",
            "notexample.com",
            "[::1]:80",
            "198.18.0.10:80",
        ] {
            assert_eq!(
                route(&get("/api/x", &format!("Host: {h}\r\n"))),
                Ok(("static", Some(3))),
                "{h}"
            );
        }
        assert_eq!(
            route("POST /x HTTP/1.1\r\nHost: ADMIN.example.org:443\r\nContent-Length: 0\r\n\r\n"),
            Ok(("admin", Some(2)))
        );
    }

    #[test]
    fn absolute_form_target_gives_host_and_path() {
        assert_eq!(
            route(&get(
                "http://Www.Example.com:80/api/v2?x",
                "Host: other\r\n"
            )),
            Ok(("api", Some(1)))
        );
        assert_eq!(
            route(&get("HTTPS://www.example.com", "Host: www.example.com\r\n")),
            Ok(("static", None))
        );
        assert_eq!(route(&get("ftp://a/b", "Host: a\r\n")), Err(BAD_TARGET));
        assert_eq!(route(&get("http:///b", "Host: a\r\n")), Err(BAD_TARGET));
        assert_eq!(route(&get("*", "Host: a\r\n")), Err(BAD_TARGET));
        assert_eq!(
            route("OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n"),
            Ok(("static", None))
        );
    }

    #[test]
    fn header_match_ignores_name_case_not_value_case() {
        assert_eq!(
            route(&get("/", "Host: x\r\nx-tenant: blue\r\n")),
            Ok(("blue", Some(0)))
        );
        assert_eq!(
            route(&get("/", "Host: x\r\nX-TENANT: blue\r\n")),
            Ok(("blue", Some(0)))
        );
        assert_eq!(
            route(&get("/", "Host: x\r\nX-Tenant: Blue\r\n")),
            Ok(("static", None))
        );
        assert_eq!(
            route(&get("/", "Host: x\r\nX-Tenant: blue2\r\n")),
            Ok(("static", None))
        );
        // Any of several fields of that name may match.
        assert_eq!(
            route(&get("/", "Host: x\r\nX-Tenant: red\r\nX-Tenant: blue\r\n")),
            Ok(("blue", Some(0)))
        );
        // Optional whitespace around the value is not part of it.
        assert_eq!(
            route(&get("/", "Host: x\r\nX-Tenant:   blue  \r\n")),
            Ok(("blue", Some(0)))
        );
    }

    #[test]
    fn path_prefix_is_case_sensitive() {
        assert_eq!(
            route(&get("/API/x", "Host: a.example.com\r\n")),
            Ok(("static", None))
        );
        assert_eq!(
            route(&get("/api", "Host: a.example.com\r\n")),
            Ok(("static", None))
        );
    }

    #[test]
    fn http_1_0_needs_no_host() {
        assert_eq!(
            route("GET /api/x HTTP/1.0\r\n\r\n"),
            Ok(("static", Some(3)))
        );
        assert_eq!(
            route("GET /api/x HTTP/1.0\r\nHost: a.example.com\r\n\r\n"),
            Ok(("api", Some(1)))
        );
    }

    #[test]
    fn malformed_heads_get_their_status() {
        let cases: &[(&str, HttpReject)] = &[
            ("GET / HTTP/1.1\r\nHost: a\r\n", INCOMPLETE),
            ("GET / HTTP/1.1\r\n", INCOMPLETE),
            ("", INCOMPLETE),
            ("GET / HTTP/1.1\r\nHost a\r\n\r\n", MALFORMED),
            ("GET / HTTP/1.1\r\nHo st: a\r\n\r\n", MALFORMED),
            ("GET / HTTP/1.1\r\nHost: a\r\n b\r\n\r\n", MALFORMED),
            ("G(T / HTTP/1.1\r\nHost: a\r\n\r\n", MALFORMED),
            ("GET / HTTP/1.1 x\r\nHost: a\r\n\r\n", MALFORMED),
            ("GET / HTTX/1.1\r\nHost: a\r\n\r\n", MALFORMED),
            ("GET /\r\n\r\n", MALFORMED),
            ("GET / HTTP/2.0\r\nHost: a\r\n\r\n", VERSION),
            ("GET / HTTP/1.2\r\nHost: a\r\n\r\n", VERSION),
            ("GET / HTTP/0.9\r\nHost: a\r\n\r\n", VERSION),
            ("CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n", REFUSED),
            ("GET / HTTP/1.1\r\n\r\n", NO_HOST),
            ("GET / HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n", TWO_HOSTS),
            ("GET / HTTP/1.1\r\nHost: a/b\r\n\r\n", BAD_HOST),
            ("GET / HTTP/1.1\r\nHost: u@a\r\n\r\n", BAD_HOST),
            ("GET / HTTP/1.1\r\nHost: [::1\r\n\r\n", BAD_HOST),
            ("GET x HTTP/1.1\r\nHost: a\r\n\r\n", BAD_TARGET),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
                TE_AND_CL,
            ),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                TWO_CL,
            ),
            (
                "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
                TE_HTTP10,
            ),
        ];
        for (head, want) in cases {
            assert_eq!(route(head), Err(*want), "{head:?}");
        }
        let statuses: Vec<u16> = [INCOMPLETE, MALFORMED, VERSION, REFUSED, TOO_LARGE, TOO_MANY]
            .iter()
            .map(|r| r.status)
            .collect();
        assert_eq!(statuses, [400, 400, 505, 501, 431, 431]);
        // The same Content-Length twice is one length.
        assert_eq!(
            route("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n"),
            Ok(("static", None))
        );
    }

    #[test]
    fn head_limit_and_header_count_give_431() {
        // head_limit is 1024 in FILE.
        let pad = |n: usize| get("/", &format!("Host: a\r\nX-Pad: {}\r\n", "p".repeat(n)));
        let fits = pad(1024 - pad(0).len());
        assert_eq!(fits.len(), 1024);
        assert_eq!(route(&fits), Ok(("static", None)));
        assert_eq!(route(&pad(1025 - pad(0).len())), Err(TOO_LARGE));
        // Incomplete and already at the limit: it can only grow past it.
        let over = pad(1026 - pad(0).len());
        assert_eq!(route(&over[..1024]), Err(TOO_LARGE));
        assert_eq!(route(&over[..1023]), Err(INCOMPLETE));
        let many: String = (0..MAX_HEADERS).map(|i| format!("X{i}: v\r\n")).collect();
        assert_eq!(
            route(&get("/", &format!("Host: a\r\n{many}"))),
            Err(TOO_MANY)
        );
        let most: String = (0..MAX_HEADERS - 1)
            .map(|i| format!("X{i}: v\r\n"))
            .collect();
        assert_eq!(
            route(&get("/", &format!("Host: a\r\n{most}"))),
            Ok(("static", None))
        );
    }

    #[test]
    fn bytes_after_the_head_are_not_parsed() {
        assert_eq!(
            route(
                "POST /api/ HTTP/1.1\r\nHost: a.example.com\r\nContent-Length: 5\r\n\r\n\x00\x01GET"
            ),
            Ok(("api", Some(1)))
        );
    }

    #[test]
    fn a_router_needs_an_l7_service_and_its_records() {
        let c = parse(FILE).unwrap();
        let mut l4 = c.services[0].clone();
        l4.l7 = None;
        assert_eq!(
            Router::new(&l4, &c.l7, &[]).unwrap_err().to_string(),
            "service \"web\" is not an l7 service"
        );
        assert_eq!(
            Router::new(&c.services[0], &c.l7, &[BackendRec::default()])
                .unwrap_err()
                .to_string(),
            "service \"web\": 1 backend records for 0 backends"
        );
    }

    fn valid_head() -> impl Strategy<Value = Vec<u8>> {
        (
            prop_oneof![Just("GET"), Just("POST"), Just("DELETE"), Just("CONNECT")],
            "/[a-z/]{0,12}",
            proptest::collection::vec(("[A-Za-z-]{1,8}", "[ -~]{0,12}"), 0..6),
            any::<bool>(),
        )
            .prop_map(|(m, path, hs, v11)| {
                let mut s = format!("{m} {path} HTTP/1.{}\r\n", u8::from(v11));
                for (n, v) in hs {
                    s.push_str(&format!("{n}: {v}\r\n"));
                }
                s.push_str("\r\n");
                s.into_bytes()
            })
    }

    fn httparse_accepts(b: &[u8]) -> bool {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        matches!(
            httparse::Request::new(&mut headers).parse(b),
            Ok(httparse::Status::Complete(_))
        )
    }

    proptest! {
        #[test]
        fn route_never_panics_and_refuses_what_httparse_refuses(
            bytes in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let r = router();
            let got = r.route(&bytes);
            if !httparse_accepts(&bytes) {
                prop_assert!(got.is_err());
            }
        }

        #[test]
        fn mutated_heads_never_panic(
            head in valid_head(), at in any::<usize>(), x in any::<u8>(), cut in any::<usize>(),
        ) {
            let r = router();
            let mut b = head.clone();
            let i = at % b.len();
            b[i] = x;
            b.truncate(cut % (b.len() + 1));
            let got = r.route(&b);
            if !httparse_accepts(&b) {
                prop_assert!(got.is_err());
            }
            // The unmutated head: a 1.0 head routes (or is refused for its
            // method); a 1.1 head without Host is refused.
            let _ = r.route(&head);
        }
    }
}
