//! What `lb-agent` measures: CPU from `/proc/stat`, memory from
//! `/proc/meminfo`, and an application's counters from a stats URL. The
//! parsers are pure; [`fetch_stats`] does one HTTP/1.0 GET.
//!
//! # Stats URL format
//!
//! `--stats-url http://HOST:PORT/PATH` answers `200` with a text body of
//! `name value` lines (other lines are ignored):
//! - `active_clients N`: clients being served now (a gauge);
//! - `requests_total N`: requests completed since the server started;
//! - `service_time_us_total N`: the sum of their service times, µs.
//!
//! Requests per second and the mean service time come from the
//! difference of the two counters between reports.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

/// The CPU time counters of `/proc/stat`'s `cpu` line, in ticks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuTimes {
    pub busy: u64,
    pub total: u64,
}

/// Parses the aggregate `cpu` line of `/proc/stat`: `user nice system
/// idle iowait irq softirq steal` (guest time is already in user); idle
/// and iowait are not busy.
pub fn parse_proc_stat(text: &str) -> Option<CpuTimes> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    if v.len() < 4 {
        return None;
    }
    let total: u64 = v.iter().sum();
    let idle = v[3] + v.get(4).copied().unwrap_or(0);
    Some(CpuTimes {
        busy: total - idle,
        total,
    })
}

/// CPU busy between two samples, permille (0 when no time passed).
pub fn cpu_permille(before: CpuTimes, after: CpuTimes) -> u16 {
    let total = after.total.saturating_sub(before.total);
    let busy = after.busy.saturating_sub(before.busy).min(total);
    if total == 0 {
        return 0;
    }
    (busy * 1000 / total) as u16
}

/// Memory in use, `(MemTotal − MemAvailable) / MemTotal`, permille.
pub fn parse_meminfo(text: &str) -> Option<u16> {
    let field = |name: &str| -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse().ok())
    };
    let total = field("MemTotal:")?;
    let avail = field("MemAvailable:")?.min(total);
    if total == 0 {
        return None;
    }
    Some(((total - avail) * 1000 / total) as u16)
}

/// An application's counters (see the module doc).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AppStats {
    pub active_clients: Option<u32>,
    pub requests_total: Option<u64>,
    pub service_time_us_total: Option<u64>,
}

/// Parses a stats body.
pub fn parse_stats(body: &str) -> AppStats {
    let mut s = AppStats::default();
    for l in body.lines() {
        let mut it = l.split_whitespace();
        let (Some(k), Some(v), None) = (it.next(), it.next(), it.next()) else {
            continue;
        };
        match k {
            "active_clients" => s.active_clients = v.parse().ok(),
            "requests_total" => s.requests_total = v.parse().ok(),
            "service_time_us_total" => s.service_time_us_total = v.parse().ok(),
            _ => {}
        }
    }
    s
}

/// Requests per second and mean service time (µs) between two samples
/// `secs` apart; `None` where a counter is missing or went backwards (a
/// restarted server). No request: no mean.
pub fn rates(before: &AppStats, after: &AppStats, secs: f64) -> (Option<u32>, Option<u32>) {
    let dreq = match (before.requests_total, after.requests_total) {
        (Some(a), Some(b)) if b >= a => Some(b - a),
        _ => None,
    };
    let rps = dreq
        .filter(|_| secs > 0.0)
        .map(|d| (d as f64 / secs).round().min(f64::from(u32::MAX - 1)) as u32);
    let mean = match (
        dreq,
        before.service_time_us_total,
        after.service_time_us_total,
    ) {
        (Some(n), Some(a), Some(b)) if n > 0 && b >= a => {
            Some(((b - a) / n).min(u64::from(u32::MAX - 1)) as u32)
        }
        _ => None,
    };
    (rps, mean)
}

/// `http://HOST:PORT/PATH` split into an address and a path.
pub fn parse_url(url: &str) -> Result<(String, String), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("stats url {url:?} does not start with http://"))?;
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if host.is_empty() {
        return Err(format!("stats url {url:?} has no host"));
    }
    let host = if host.contains(':') {
        host.to_string()
    } else {
        format!("{host}:80")
    };
    Ok((host, path.to_string()))
}

/// GETs `path` from `host` (HTTP/1.0, whole exchange within `timeout`)
/// and parses the body.
pub fn fetch_stats(host: &str, path: &str, timeout: Duration) -> Result<AppStats, String> {
    let addr: SocketAddr = host
        .to_socket_addrs()
        .map_err(|e| format!("{host}: {e}"))?
        .next()
        .ok_or_else(|| format!("{host}: no address"))?;
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("{host}: {e}"))?;
    s.set_read_timeout(Some(timeout)).ok();
    s.set_write_timeout(Some(timeout)).ok();
    // One write: some servers read the request line from the first segment.
    let req = format!("GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n");
    s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    let mut resp = Vec::new();
    s.take(1 << 20)
        .read_to_end(&mut resp)
        .map_err(|e| format!("{host}: {e}"))?;
    let text = String::from_utf8_lossy(&resp);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("{host}{path}: not an HTTP response"))?;
    let status = head.lines().next().unwrap_or("");
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(format!("{host}{path}: {status}"));
    }
    Ok(parse_stats(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_and_cpu_share() {
        let a = parse_proc_stat(
            "cpu  100 0 100 700 100 0 0 0 0 0\ncpu0 50 0 50 350 50 0 0 0 0 0\nintr 1\n",
        )
        .unwrap();
        assert_eq!(
            a,
            CpuTimes {
                busy: 200,
                total: 1000
            }
        );
        let b = parse_proc_stat("cpu  400 0 200 800 200 0 0 0 0 0\n").unwrap();
        // 300 + 100 busy of 600 ticks.
        assert_eq!(cpu_permille(a, b), 666);
        assert_eq!(cpu_permille(a, a), 0);
        assert_eq!(parse_proc_stat("cpu0 1 2 3 4\n"), None);
        assert_eq!(parse_proc_stat("cpu  1 x 3 4\n"), None);
    }

    #[test]
    fn meminfo_in_use() {
        let m = "MemTotal:       16000000 kB\nMemFree:  100 kB\nMemAvailable:   12000000 kB\n";
        assert_eq!(parse_meminfo(m), Some(250));
        assert_eq!(parse_meminfo("MemTotal: 10 kB\n"), None);
    }

    #[test]
    fn stats_body_and_rates() {
        let a = parse_stats(
            "active_clients 7\nrequests_total 1000\nservice_time_us_total 500000\n# x\nbad line here\n",
        );
        assert_eq!(
            a,
            AppStats {
                active_clients: Some(7),
                requests_total: Some(1000),
                service_time_us_total: Some(500_000)
            }
        );
        let b = parse_stats("requests_total 1600\nservice_time_us_total 1700000\n");
        assert_eq!(rates(&a, &b, 2.0), (Some(300), Some(2000)));
        assert_eq!(rates(&a, &a, 2.0), (Some(0), None));
        assert_eq!(rates(&b, &a, 2.0), (None, None), "restarted server");
    }

    #[test]
    fn urls() {
        assert_eq!(
            parse_url("http://127.0.0.1:8080/stats"),
            Ok(("127.0.0.1:8080".into(), "/stats".into()))
        );
        assert_eq!(
            parse_url("http://localhost"),
            Ok(("localhost:80".into(), "/".into()))
        );
        assert!(parse_url("https://x/").is_err());
    }

    #[test]
    fn fetch_from_a_local_server() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let host = l.local_addr().unwrap().to_string();
        let t = std::thread::spawn(move || {
            for body in ["active_clients 3\nrequests_total 10\n", ""] {
                let (mut c, _) = l.accept().unwrap();
                let mut req = [0u8; 1024];
                let n = c.read(&mut req).unwrap();
                assert!(req[..n].starts_with(b"GET /stats HTTP/1.0\r\n"));
                let status = if body.is_empty() {
                    "503 Busy"
                } else {
                    "200 OK"
                };
                write!(
                    c,
                    "HTTP/1.0 {status}\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )
                .unwrap();
            }
        });
        let s = fetch_stats(&host, "/stats", Duration::from_secs(5)).unwrap();
        assert_eq!((s.active_clients, s.requests_total), (Some(3), Some(10)));
        let e = fetch_stats(&host, "/stats", Duration::from_secs(5)).unwrap_err();
        assert!(e.ends_with("/stats: HTTP/1.0 503 Busy"), "{e}");
        t.join().unwrap();
    }
}
