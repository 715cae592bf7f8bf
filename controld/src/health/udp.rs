//! UDP check: sends a payload from a connected socket (so an ICMP port
//! unreachable comes back as an error) and waits for a reply that starts
//! with the expected prefix, or, when no reply is required, for the
//! timeout to pass without an ICMP error.

use std::io::ErrorKind;
use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use super::{ProbeError, io_error};

/// Runs one check against `addr` within `timeout`.
pub fn check(
    addr: SocketAddr,
    payload: &[u8],
    expect: &[u8],
    require_reply: bool,
    timeout: Duration,
) -> Result<(), ProbeError> {
    let fail = |e: std::io::Error| ProbeError::Udp {
        addr,
        why: io_error(&e, timeout),
    };
    let s = UdpSocket::bind(("0.0.0.0", 0)).map_err(fail)?;
    s.connect(addr).map_err(fail)?;
    s.send(payload).map_err(fail)?;
    s.set_read_timeout(Some(timeout.max(Duration::from_millis(1))))
        .map_err(fail)?;
    let mut buf = [0u8; 2048];
    match s.recv(&mut buf) {
        Ok(n) if !require_reply || buf[..n].starts_with(expect) => Ok(()),
        Ok(n) => Err(ProbeError::UdpReply {
            addr,
            reply: String::from_utf8_lossy(&buf[..n.min(64)]).into_owned(),
            expect: String::from_utf8_lossy(expect).into_owned(),
        }),
        Err(e)
            if !require_reply
                && matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
        {
            Ok(())
        }
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
            Err(ProbeError::UdpUnreachable { addr })
        }
        Err(e) => Err(fail(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(5);

    /// An echo server that prefixes `name `; answers `n` datagrams.
    fn echo(name: &'static str, n: usize) -> (SocketAddr, std::thread::JoinHandle<()>) {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = s.local_addr().unwrap();
        let h = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            for _ in 0..n {
                let (k, from) = s.recv_from(&mut buf).unwrap();
                let mut reply = format!("{name} ").into_bytes();
                reply.extend_from_slice(&buf[..k]);
                s.send_to(&reply, from).unwrap();
            }
        });
        (addr, h)
    }

    #[test]
    fn reply_with_prefix_passes_other_reply_fails() {
        let (addr, h) = echo("backend1", 2);
        check(addr, b"ping", b"backend1 ping", true, T).unwrap();
        assert_eq!(
            check(addr, b"ping", b"backend2", true, T)
                .unwrap_err()
                .to_string(),
            format!("UDP {addr}: reply \"backend1 ping\" does not start with \"backend2\"")
        );
        h.join().unwrap();
    }

    #[test]
    fn closed_port_fails_and_silence_passes_only_without_required_reply() {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = s.local_addr().unwrap();
        // Bound but silent.
        let e = check(addr, b"x", b"", true, Duration::from_millis(100))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(&format!("UDP {addr}: ")) && e.contains("within 100 ms"),
            "{e}"
        );
        check(addr, b"x", b"", false, Duration::from_millis(100)).unwrap();
        drop(s);
        // Closed: the kernel answers with ICMP port unreachable.
        for require in [true, false] {
            assert_eq!(
                check(addr, b"x", b"", require, T).unwrap_err().to_string(),
                format!("UDP {addr}: port unreachable (ICMP)")
            );
        }
    }
}
