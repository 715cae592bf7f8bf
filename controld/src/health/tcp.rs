//! TCP connect check: passes when the backend accepts a connection.

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use super::{ProbeError, io_error};

/// Connects to `addr` within `timeout`, then closes.
pub fn check(addr: SocketAddr, timeout: Duration) -> Result<(), ProbeError> {
    connect(addr, timeout).map(drop)
}

/// A connection to `addr` within `timeout`, or why not.
pub(super) fn connect(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, ProbeError> {
    TcpStream::connect_timeout(&addr, timeout).map_err(|e| ProbeError::Connect {
        addr,
        why: io_error(&e, timeout),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn passes_on_a_listener_and_fails_on_a_closed_port() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        check(addr, Duration::from_secs(5)).unwrap();
        drop(l);
        let e = check(addr, Duration::from_secs(5)).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("connect to {addr}: Connection refused (os error 111)")
        );
    }
}
