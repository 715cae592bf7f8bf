//! The admin API: lbctl's Unix socket (JSON lines, [`proto`]) and the
//! Prometheus endpoint ([`metrics`]), served by threads ([`server`]) that
//! hand each request to controld's main loop, which answers from its own
//! state and the region ([`view`], [`rates`]).

use std::path::PathBuf;

use crate::config::Config;

pub mod metrics;
pub mod proto;
pub mod rates;
pub mod scan;
pub mod server;
pub mod view;

/// Where an instance's socket is when `[admin] socket` is not set:
/// `/run/switchyard/<instance>.sock` for root; for another user
/// `$XDG_RUNTIME_DIR/switchyard/<instance>.sock`, or without that variable
/// `/tmp/switchyard-<uid>/<instance>.sock`. lbctl derives the same path
/// from `--instance`, so both must run as the same user.
pub fn default_socket_path(instance: &str) -> PathBuf {
    // SAFETY: geteuid(2) cannot fail and touches no memory.
    let uid = unsafe { libc::geteuid() };
    let dir = if uid == 0 {
        PathBuf::from("/run/switchyard")
    } else {
        match std::env::var_os("XDG_RUNTIME_DIR") {
            Some(d) if !d.is_empty() => PathBuf::from(d).join("switchyard"),
            _ => PathBuf::from(format!("/tmp/switchyard-{uid}")),
        }
    };
    dir.join(format!("{instance}.sock"))
}

/// The socket a configuration asks for.
pub fn socket_path(cfg: &Config) -> PathBuf {
    cfg.admin
        .socket
        .clone()
        .unwrap_or_else(|| default_socket_path(&cfg.instance))
}
