//! The admin API: lbctl's Unix socket (JSON lines, [`proto`]) and the
//! Prometheus endpoint ([`metrics`]), served by threads ([`server`]) that
//! hand each request to controld's main loop, which answers from its own
//! state and the region ([`view`], [`rates`]).

use std::path::PathBuf;

use crate::config::Config;

pub mod metrics;
/// The protocol is its own crate (lbctl speaks it without controld).
pub use admin_proto as proto;
pub use admin_proto::default_socket_path;
pub mod rates;
pub mod scan;
pub mod server;
pub mod view;

/// The socket a configuration asks for.
pub fn socket_path(cfg: &Config) -> PathBuf {
    cfg.admin
        .socket
        .clone()
        .unwrap_or_else(|| default_socket_path(&cfg.instance))
}
