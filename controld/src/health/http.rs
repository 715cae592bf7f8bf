//! HTTP check: `GET path` with a `Host` header over a fresh connection
//! (`Connection: close`); passes when the status line carries the expected
//! status. Only the status line is read; the connection is then closed.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::{HttpFailure, ProbeError, io_error};

/// Longest status line read.
const MAX_STATUS_LINE: usize = 512;

/// Runs one check against `addr`, all of it within `timeout`.
pub fn check(
    addr: SocketAddr,
    path: &str,
    host: &str,
    expect_status: u16,
    timeout: Duration,
) -> Result<(), ProbeError> {
    let deadline = Instant::now() + timeout;
    let fail = |why: HttpFailure| ProbeError::Http {
        addr,
        path: path.to_string(),
        why,
    };
    let left = |stage: &'static str| {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| {
                fail(HttpFailure::Deadline {
                    stage,
                    ms: timeout.as_millis(),
                })
            })
    };
    let mut s = super::tcp::connect(addr, timeout)?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: switchyard-health\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    );
    s.set_write_timeout(Some(left("request sent")?))
        .and_then(|()| s.write_all(request.as_bytes()))
        .map_err(|e| fail(HttpFailure::Send(io_error(&e, timeout))))?;
    let mut buf = [0u8; MAX_STATUS_LINE];
    let mut n = 0;
    while !buf[..n].contains(&b'\n') && n < buf.len() {
        s.set_read_timeout(Some(left("answer")?))
            .map_err(|e| fail(HttpFailure::Socket(e.to_string())))?;
        match s.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(fail(HttpFailure::Read(io_error(&e, timeout)))),
        }
    }
    let line = buf[..n].split(|&b| b == b'\n').next().unwrap_or(&[]);
    match status(line) {
        Some(code) if code == expect_status => Ok(()),
        Some(code) => Err(fail(HttpFailure::Status {
            code,
            expect: expect_status,
        })),
        None if n == 0 => Err(fail(HttpFailure::Closed)),
        None => Err(fail(HttpFailure::NotStatus(
            String::from_utf8_lossy(&line[..line.len().min(64)]).into_owned(),
        ))),
    }
}

/// The status code of `HTTP/1.x NNN ...`.
fn status(line: &[u8]) -> Option<u16> {
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.split_ascii_whitespace();
    if !parts.next()?.starts_with("HTTP/") {
        return None;
    }
    let code = parts.next()?;
    if code.len() != 3 || !code.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    code.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::net::TcpListener;

    /// A one-connection server answering `reply`; returns its address and
    /// a handle yielding the request head it read.
    fn serve_once(reply: &'static [u8]) -> (SocketAddr, std::thread::JoinHandle<String>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let h = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut head = String::new();
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap() == 0 || line == "\r\n" {
                    break;
                }
                head += &line;
            }
            (&s).write_all(reply).unwrap();
            head
        });
        (addr, h)
    }

    const T: Duration = Duration::from_secs(5);

    #[test]
    fn passes_on_expected_status_and_sends_path_and_host() {
        let (addr, h) = serve_once(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n");
        check(addr, "/healthz?x=1", "web.example", 204, T).unwrap();
        let head = h.join().unwrap();
        assert!(head.starts_with("GET /healthz?x=1 HTTP/1.1\r\n"), "{head}");
        assert!(head.contains("\r\nHost: web.example\r\n"), "{head}");
        assert!(head.contains("\r\nConnection: close\r\n"), "{head}");
    }

    #[test]
    fn fails_on_other_status_garbage_and_silence() {
        let (addr, h) = serve_once(b"HTTP/1.0 503 Service Unavailable\r\n\r\n");
        assert_eq!(
            check(addr, "/", "h", 200, T).unwrap_err().to_string(),
            format!("GET http://{addr}/: status 503, expected 200")
        );
        h.join().unwrap();
        let (addr, h) = serve_once(b"SSH-2.0-OpenSSH\r\n");
        assert_eq!(
            check(addr, "/", "h", 200, T).unwrap_err().to_string(),
            format!("GET http://{addr}/: not an HTTP status line: \"SSH-2.0-OpenSSH\\r\"")
        );
        h.join().unwrap();
        let (addr, h) = serve_once(b"");
        assert_eq!(
            check(addr, "/", "h", 200, T).unwrap_err().to_string(),
            format!("GET http://{addr}/: connection closed without an answer")
        );
        h.join().unwrap();
        // Accepted but never answered: the check ends at its timeout.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let e = check(addr, "/", "h", 200, Duration::from_millis(100))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(&format!("GET http://{addr}/: ")) && e.contains("within 100 ms"),
            "{e}"
        );
    }

    #[test]
    fn status_line_parsing() {
        assert_eq!(status(b"HTTP/1.1 200 OK\r"), Some(200));
        assert_eq!(status(b"HTTP/1.0 404"), Some(404));
        assert_eq!(status(b"HTTP/1.1 20 OK"), None);
        assert_eq!(status(b"HTTX/1.1 200 OK"), None);
        assert_eq!(status(b""), None);
    }
}
