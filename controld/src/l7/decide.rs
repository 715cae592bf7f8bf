//! From a bundle to a decision: route the head, pick a backend of the
//! pool, and give the switch the bytes to send (a PROXY v2 header if the
//! service asks for one, then the head as the client sent it), or the
//! HTTP error response for the client.

use std::net::Ipv4Addr;

use shm_layout::l7msg::{Bundle, Decision, Verdict};

use super::HttpReject;
use super::pick::Conns;
use super::proxy::header_v2;
use super::response::error_response;
use super::router::{Router, RouterError};
use crate::config::Config;
use crate::master::ConfigSnapshot;

/// The bundle names a service that is not (or no longer) an l7 service
/// with the bundle's VIP and port: the configuration changed while the
/// switch held it.
pub const NOT_L7: HttpReject = HttpReject::new(503, "no l7 service at this address");

/// The routers of a configuration generation, by service index (the
/// index a bundle's `service` carries, as in the configuration slot),
/// each with its service's VIP and port.
#[derive(Debug, Clone, Default)]
pub struct Decider {
    routers: Vec<Option<(Ipv4Addr, u16, Router)>>,
}

impl Decider {
    /// The routers of every l7 service of `cfg`, over the records of the
    /// snapshot built from it.
    pub fn new(cfg: &Config, snap: &ConfigSnapshot) -> Result<Self, RouterError> {
        let mut routers = Vec::with_capacity(cfg.services.len());
        for (s, rec) in cfg.services.iter().zip(&snap.services) {
            if s.l7.is_none() {
                routers.push(None);
                continue;
            }
            let start = rec.backend_start as usize;
            let recs = snap
                .backends
                .get(start..start + rec.backend_count as usize)
                .unwrap_or_default();
            routers.push(Some((s.vip, s.port, Router::new(s, &cfg.l7, recs)?)));
        }
        Ok(Decider { routers })
    }

    /// The decision for `b`; a chosen backend has one connection slot
    /// reserved in `conns` (the switch releases it when the connection
    /// ends, or at once if it drops the decision as stale).
    pub fn decide(&mut self, b: &Bundle, conns: &(impl Conns + ?Sized)) -> Decision {
        let verdict = self.verdict(b, conns);
        let (verdict, bytes) = match verdict {
            Ok((v, proxy)) => {
                let mut bytes = Vec::with_capacity(b.head.len() + 28);
                if proxy {
                    bytes.extend_from_slice(&header_v2(
                        b.ends.client,
                        b.ends.client_port,
                        b.ends.vip,
                        b.ends.vip_port,
                    ));
                }
                bytes.extend_from_slice(&b.head);
                (v, bytes)
            }
            Err(r) => (
                Verdict::Reject { status: r.status },
                error_response(r.status, r.reason),
            ),
        };
        Decision {
            conn: b.conn,
            ends: b.ends,
            verdict,
            bytes,
        }
    }

    fn verdict(
        &mut self,
        b: &Bundle,
        conns: &(impl Conns + ?Sized),
    ) -> Result<(Verdict, bool), HttpReject> {
        let router = match self.routers.get_mut(b.service as usize) {
            Some(Some((vip, port, r))) if (*vip, *port) == (b.ends.vip, b.ends.vip_port) => r,
            _ => return Err(NOT_L7),
        };
        let route = router.route(&b.head)?;
        let p = router.pick(route.pool, conns)?;
        Ok((
            Verdict::Forward {
                backend_id: p.id,
                ip: p.ip,
                port: p.port,
            },
            router.proxy_protocol(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;
    use crate::ids::IdAllocator;
    use crate::l7::pick::tests::FakeConns;
    use crate::master::file_snapshot;
    use shm_layout::l7msg::{ConnRef, Endpoints};

    const FILE: &str = r#"
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
name = "dns"
vip = "198.18.0.10"
port = 53
protocol = "udp"
  [[service.backend]]
  name = "d1"
  address = "198.19.2.1"
[[service]]
name = "web"
vip = "198.18.0.10"
port = 80
protocol = "tcp"
mode = "l7"
proxy_protocol = true
  [[service.pool]]
  name = "api"
  [[service.pool]]
  name = "rest"
  [[service.rule]]
  path_prefix = "/api/"
  pool = "api"
  [[service.backend]]
  name = "a1"
  address = "198.19.1.1"
  port = 8080
  pool = "api"
  max_conns = 1
  [[service.backend]]
  name = "r1"
  address = "198.19.1.2"
  pool = "rest"
"#;

    fn decider(text: &str) -> Decider {
        let cfg = parse(text).unwrap();
        let snap = file_snapshot(&cfg, &mut IdAllocator::new(64)).unwrap();
        Decider::new(&cfg, &snap).unwrap()
    }

    fn bundle(service: u32, head: &str) -> Bundle {
        Bundle {
            conn: ConnRef {
                switch: 1,
                slot: 77,
                slot_lock: 5,
            },
            ends: Endpoints {
                client: Ipv4Addr::new(198, 18, 100, 7),
                client_port: 40000,
                vip: Ipv4Addr::new(198, 18, 0, 10),
                vip_port: 80,
            },
            service,
            client_isn: 1,
            mss: 1460,
            wscale: None,
            sack_permitted: false,
            timestamps: None,
            head: head.as_bytes().to_vec(),
        }
    }

    const PROXY: [u8; 28] = [
        0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a, 0x21, 0x11, 0, 12,
        198, 18, 100, 7, 198, 18, 0, 10, 0x9c, 0x40, 0, 80,
    ];

    #[test]
    fn forward_carries_the_proxy_header_then_the_head() {
        let mut d = decider(FILE);
        let c = FakeConns::default();
        let head = "GET /api/x HTTP/1.1\r\nHost: a\r\n\r\n";
        let b = bundle(1, head);
        let got = d.decide(&b, &c);
        let mut bytes = PROXY.to_vec();
        bytes.extend_from_slice(head.as_bytes());
        assert_eq!(
            got,
            Decision {
                conn: b.conn,
                ends: b.ends,
                // Ids: d1 is 0, a1 is 1, r1 is 2.
                verdict: Verdict::Forward {
                    backend_id: 1,
                    ip: Ipv4Addr::new(198, 19, 1, 1),
                    port: 8080
                },
                bytes,
            }
        );
        assert_eq!(c.active(1), 1);
        // No rule matches: the default pool, the first one ("api").
        let got = d.decide(&bundle(1, "GET /x HTTP/1.1\r\nHost: a\r\n\r\n"), &c);
        assert_eq!(
            got.verdict,
            Verdict::Reject { status: 503 },
            "api's only backend is at max_conns 1"
        );
        assert_eq!(
            String::from_utf8(got.bytes).unwrap(),
            "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 66\r\nConnection: close\r\n\r\n503 Service Unavailable: every backend is at its connection limit\n"
        );
    }

    #[test]
    fn without_proxy_protocol_the_bytes_are_the_head() {
        let mut d = decider(&FILE.replace("proxy_protocol = true\n", "default_pool = \"rest\"\n"));
        let head = "GET /x HTTP/1.1\r\nHost: a\r\n\r\nbody";
        let got = d.decide(&bundle(1, head), &FakeConns::default());
        assert_eq!(
            got.verdict,
            Verdict::Forward {
                backend_id: 2,
                ip: Ipv4Addr::new(198, 19, 1, 2),
                port: 80
            }
        );
        assert_eq!(got.bytes, head.as_bytes());
    }

    #[test]
    fn a_bad_head_gets_its_error_response() {
        let mut d = decider(FILE);
        let c = FakeConns::default();
        let got = d.decide(&bundle(1, "GET / HTTP/2.0\r\n\r\n"), &c);
        assert_eq!(got.verdict, Verdict::Reject { status: 505 });
        assert_eq!(
            String::from_utf8(got.bytes).unwrap(),
            "HTTP/1.1 505 HTTP Version Not Supported\r\nContent-Type: text/plain\r\nContent-Length: 70\r\nConnection: close\r\n\r\n505 HTTP Version Not Supported: only HTTP/1.0 and HTTP/1.1 are served\n"
        );
        let got = d.decide(&bundle(1, "CONNECT a:1 HTTP/1.1\r\nHost: a\r\n\r\n"), &c);
        assert_eq!(got.verdict, Verdict::Reject { status: 501 });
        assert_eq!(
            String::from_utf8(got.bytes).unwrap(),
            "HTTP/1.1 501 Not Implemented\r\nContent-Type: text/plain\r\nContent-Length: 44\r\nConnection: close\r\n\r\n501 Not Implemented: method not implemented\n"
        );
        assert!(
            c.0.borrow().is_empty(),
            "no slot reserved for a refused request"
        );
    }

    #[test]
    fn a_bundle_for_a_service_that_is_not_l7_gets_503() {
        let mut d = decider(FILE);
        for service in [0, 2, u32::MAX] {
            let got = d.decide(
                &bundle(service, "GET / HTTP/1.1\r\nHost: a\r\n\r\n"),
                &FakeConns::default(),
            );
            assert_eq!(got.verdict, Verdict::Reject { status: 503 }, "{service}");
            assert!(
                got.bytes
                    .ends_with(b"503 Service Unavailable: no l7 service at this address\n")
            );
        }
    }

    #[test]
    fn a_bundle_whose_vip_is_not_its_services_gets_503() {
        // Service indexes may move on a reload while a switch holds a
        // bundle: the VIP and port must still be the service's.
        let mut d = decider(FILE);
        let c = FakeConns::default();
        for (vip, port) in [
            (Ipv4Addr::new(198, 18, 0, 10), 81),
            (Ipv4Addr::new(198, 18, 0, 11), 80),
        ] {
            let mut b = bundle(1, "GET /api/ HTTP/1.1\r\nHost: a\r\n\r\n");
            b.ends.vip = vip;
            b.ends.vip_port = port;
            let got = d.decide(&b, &c);
            assert_eq!(got.verdict, Verdict::Reject { status: 503 }, "{vip}:{port}");
        }
        assert!(c.0.borrow().is_empty(), "no slot reserved");
    }

    #[test]
    fn decisions_encode_and_decode() {
        let mut d = decider(FILE);
        let got = d.decide(
            &bundle(1, "GET /api/ HTTP/1.1\r\nHost: a\r\n\r\n"),
            &FakeConns::default(),
        );
        let mut buf = vec![0u8; got.len()];
        got.encode(&mut buf).unwrap();
        assert_eq!(Decision::decode(&buf), Ok(got));
    }
}
