//! Load agents: `lb-agent` on each backend reports its load every second
//! over UDP (wire format and HMAC: the `agent_proto` crate), and controld
//! turns accepted load into effective weights.
//!
//! # Acceptance
//!
//! A datagram on `[agents] listen` is checked in this order, and dropped
//! and counted under the first rule it breaks ([`verify`]):
//! 1. `malformed`: not exactly a version-1 report (length, magic, version,
//!    unknown flags, reserved bytes, permille above 1000);
//! 2. `unknown_agent`: its source address is no backend's address (an
//!    agent is identified by its address; its report applies to every
//!    backend with that address, in every service);
//! 3. `forged`: the HMAC-SHA256 under the shared secret over the body and
//!    both ends (source address; `listen` address and port) does not
//!    match, compared in constant time;
//! 4. `stale`: the timestamp is more than `max_skew_ms` from controld's
//!    wall clock, either way (keep the clocks in sync with NTP);
//! 5. `replayed`: the sequence number is not above the last one accepted
//!    from that address (kept across reloads while the address remains a
//!    backend's; lost when controld restarts, when a report captured in the
//!    last `max_skew_ms` could be accepted once more).
//!
//! Drops raise an alert in the log ([`alerts`]): the first at once, then
//! at most one line per 5 s gathering the drops since, each line with the
//! totals of every counter.
//!
//! # The weight rule
//!
//! See [`rule`]: an agent's backends get `round(configured × factor)`
//! where the factor is `clamp(1 − cpu, floor, 1)` with hysteresis
//! (`step_percent`); a drain request gives 0; an agent without an
//! accepted report for `silent_ms` is silent, and its backends get their
//! configured weights back ([`tracker`]). Memory, active clients,
//! requests per second and service time are reported, logged and kept in
//! [`Status`], not weighed: memory in use says little about capacity
//! (caches, heaps), and the others mean different things per application.
//!
//! The effective weight is what the master publishes (the record's
//! `weight`, which `shmdump` shows, and the Maglev table); a drained
//! backend is flagged like one with configured weight 0. A health check
//! that takes a backend DOWN overrides everything.
//!
//! # Threads
//!
//! A listener thread ([`listener`]) owns the socket and runs the
//! verifier, and leaves each agent's latest accepted report in an inbox
//! (one slot per agent: bounded however fast reports arrive). The main
//! loop calls [`Monitor::poll`] each tick: it takes the inbox, moves the
//! steering, and says whether the tables must be republished. Nothing
//! blocks the main loop: the lock is held only for a check or a hand-over.

pub mod alerts;
pub mod listener;
mod monitor;
pub mod rule;
pub mod tracker;
pub mod verify;

pub use monitor::{AgentStatus, AgentsError, Monitor, Status, describe};
pub use rule::{Steer, effective_weight};
pub use verify::Counters;
