//! Layer 7 (in progress): what controld decides for a new l7 connection.
//!
//! A switch that holds a client's handshake and request head sends a
//! [`Bundle`](shm_layout::l7msg::Bundle); controld answers with one
//! [`Decision`](shm_layout::l7msg::Decision) built by [`Decider::decide`]:
//! - [`router`]: parses the head (httparse) and applies the service's
//!   rules in order, giving a pool or an HTTP error;
//! - [`pick`]: picks a backend of the pool with the pool's scheduler,
//!   honouring health, drain and `max_conns` (the master's backend records
//!   and the shared active counts), reserving the connection slot;
//! - [`proxy`]: the PROXY protocol v2 header, for `proxy_protocol = true`;
//! - [`response`]: the HTTP error responses sent to the client;
//! - [`decide`]: the glue from bundle to decision.
//!
//! Pure: no I/O; the live connection counts come in through [`Conns`].
//! The switch side (handshake offload, request buffering, the message
//! rings, the back-end connection and the splice) is not built yet, so
//! controld refuses to run a configuration with an l7 service
//! ([`refuse_to_run`]) while `controld --check` validates it fully.

pub mod decide;
pub mod pick;
pub mod proxy;
pub mod response;
pub mod router;

pub use decide::Decider;
pub use pick::{Conns, Picked};
pub use router::{Route, Router, RouterError};

use crate::config::{Config, Mode};

/// Whether the switches can run l7 services. While false, [`refuse_to_run`]
/// refuses every configuration with an l7 service, at start and on reload.
/// Set it (or delete the check) when the switch side lands.
pub const SWITCH_SIDE_BUILT: bool = false;

/// Why controld will not run a configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "service {service:?}: mode \"l7\" cannot run yet: the switch side of layer 7 (handshake offload, request buffering, splice) is not built; `controld --check` validates the file"
)]
pub struct NotBuilt {
    pub service: String,
}

/// Refuses a configuration with an l7 service while the switch side is
/// not built (see [`SWITCH_SIDE_BUILT`]): controld calls this at start
/// (not with `--check`) and on every reload, before anything is published.
pub fn refuse_to_run(cfg: &Config) -> Result<(), NotBuilt> {
    match cfg.services.iter().find(|s| s.mode == Mode::L7) {
        Some(s) if !SWITCH_SIDE_BUILT => Err(NotBuilt {
            service: s.name.clone(),
        }),
        _ => Ok(()),
    }
}

/// An HTTP error the client gets instead of a backend: its status and a
/// short reason (the body of the response).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpReject {
    pub status: u16,
    pub reason: &'static str,
}

impl HttpReject {
    pub(crate) const fn new(status: u16, reason: &'static str) -> Self {
        HttpReject { status, reason }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_configuration_with_an_l7_service_is_refused() {
        let l4 = crate::l7::router::tests::l7_file().replace("mode = \"l7\"\n", "");
        let l4 = &l4[..l4.find("default_pool").unwrap()];
        let cfg = crate::config::parse(l4).unwrap();
        assert_eq!(refuse_to_run(&cfg), Ok(()));
        let cfg = crate::config::parse(&crate::l7::router::tests::l7_file()).unwrap();
        assert_eq!(
            refuse_to_run(&cfg).unwrap_err().to_string(),
            "service \"web\": mode \"l7\" cannot run yet: the switch side of layer 7 (handshake offload, request buffering, splice) is not built; `controld --check` validates the file"
        );
    }
}
