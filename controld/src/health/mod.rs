//! Active health checks: each checked backend is probed every
//! `interval_ms` (TCP connect, HTTP GET with an expected status, or a UDP
//! request/reply) and a hysteresis decides whether it is UP (in its
//! service's table) or DOWN (out of it, its connections handled by the
//! service's `on_backend_down`).
//!
//! # The rule (hysteresis)
//!
//! Each backend has a score from 0 to `top = rise + fall − 1`. A passed
//! check adds 1 (at most `top`), a failed one subtracts 1 (at least 0).
//! - **Failover threshold**: an UP backend whose score falls below `rise`
//!   goes DOWN, and its score restarts at 0. From full health that takes
//!   `fall` consecutive failures; interleaved passes only delay it (a
//!   backend failing two checks in three still goes DOWN, which counters of
//!   consecutive results would never do).
//! - **Connection threshold**: a DOWN backend whose score climbs back to
//!   `rise` is readmitted at full health (`top`). From the restart at 0
//!   that takes `rise` consecutive passes, never fewer.
//!
//! Because a transition moves the score to the far end, a backend must
//! cross the whole band again to flip back: one that alternates pass and
//! fail never changes state. This is HAProxy's rule for `rise`/`fall`.
//!
//! A backend starts UP on probation (score `rise`): its first failed check
//! takes it DOWN, and a healthy one never waits. A backend keeps its state
//! across reloads while its identity (service VIP, port, protocol; address,
//! port) and its check stay the same; a new or changed check starts over.
//!
//! While a backend is between the extremes (UP with failures counted
//! against it, DOWN with passes counted for it) it is checked every
//! `fast_interval_ms`. So a backend that dies leaves the published tables
//! within `interval + (fall − 1) × fast_interval + fall × timeout` plus one
//! publication (one controld tick and the switches' acknowledgement); with
//! `fall = 1` that is one interval (plus the failing check) and one publish.
//!
//! # Threads
//!
//! Probes block (std sockets with timeouts), so they never run on
//! controld's main loop: [`Monitor`] hands due checks to a small pool of
//! threads (grown on demand, at most [`MAX_WORKERS`]) over a
//! channel and collects their results over another, without blocking. At
//! most one check per backend is in flight. Probes use controld's network
//! namespace and the kernel's stack, not the switches.

mod http;
mod monitor;
mod state;
mod tcp;
mod udp;

use std::net::SocketAddr;
use std::time::Duration;

pub use monitor::{Change, MAX_WORKERS, Monitor, Target};
pub use state::{Health, State, Transition};

use crate::config::Probe;

/// Why an I/O step of a check failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IoFailure {
    #[error("no answer within {ms} ms")]
    Timeout { ms: u128 },
    /// The system's error, as it reads.
    #[error("{0}")]
    Os(String),
}

/// What went wrong in an HTTP check, after its connection was made.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HttpFailure {
    #[error("no {stage} within {ms} ms")]
    Deadline { stage: &'static str, ms: u128 },
    #[error("sending: {0}")]
    Send(IoFailure),
    #[error("{0}")]
    Socket(String),
    #[error("reading: {0}")]
    Read(IoFailure),
    #[error("status {code}, expected {expect}")]
    Status { code: u16, expect: u16 },
    #[error("connection closed without an answer")]
    Closed,
    /// The first line (at most 64 bytes) of what came back.
    #[error("not an HTTP status line: {0:?}")]
    NotStatus(String),
}

/// Why a backend failed one check; the message names the check's target.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    #[error("connect to {addr}: {why}")]
    Connect { addr: SocketAddr, why: IoFailure },
    #[error("UDP {addr}: {why}")]
    Udp { addr: SocketAddr, why: IoFailure },
    #[error("UDP {addr}: port unreachable (ICMP)")]
    UdpUnreachable { addr: SocketAddr },
    /// `reply` (its first 64 bytes) and `expect` as text.
    #[error("UDP {addr}: reply {reply:?} does not start with {expect:?}")]
    UdpReply {
        addr: SocketAddr,
        reply: String,
        expect: String,
    },
    #[error("GET http://{addr}{path}: {why}")]
    Http {
        addr: SocketAddr,
        path: String,
        why: HttpFailure,
    },
}

/// Runs one check of `t` (blocking, at most about its timeout).
pub fn probe(t: &Target) -> Result<(), ProbeError> {
    let timeout = Duration::from_millis(u64::from(t.check.timeout_ms));
    match &t.check.probe {
        Probe::Tcp => tcp::check(t.addr, timeout),
        Probe::Http {
            path,
            host,
            expect_status,
        } => http::check(t.addr, path, host, *expect_status, timeout),
        Probe::Udp {
            payload,
            expect,
            require_reply,
        } => udp::check(t.addr, payload, expect, *require_reply, timeout),
    }
}

/// An I/O error as a check failure: a timeout says how long it waited.
fn io_error(e: &std::io::Error, timeout: Duration) -> IoFailure {
    match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => IoFailure::Timeout {
            ms: timeout.as_millis(),
        },
        _ => IoFailure::Os(e.to_string()),
    }
}
