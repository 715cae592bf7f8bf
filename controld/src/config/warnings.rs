//! What a valid configuration may still get wrong: warnings (the file is
//! accepted, `--check` prints them, controld logs them at start and on
//! reload) and the address rules that look at the whole file at once.
//!
//! A warning is for something legitimate while an operator stages a change
//! but useless in the end (a service without backends, every backend
//! drained, a loopback address on vnic ports, whose wire is a program). An
//! error is for what can never work (a loopback address on an AF_PACKET
//! appliance, a route to or through a VIP).

use std::fmt;
use std::net::Ipv4Addr;

use super::{Config, Driver};

/// Something a valid configuration does that is probably not meant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Warning {
    /// A service without `[[service.backend]]`: it refuses every new connection.
    NoBackends { service: String },
    /// Every backend of a service has weight 0: it refuses every new connection.
    AllWeightsZero { service: String },
    /// A VIP in 127.0.0.0/8 on an appliance whose ports are all vnic.
    LoopbackVip { service: String, vip: Ipv4Addr },
    /// A backend address in 127.0.0.0/8 on an appliance whose ports are all vnic.
    LoopbackBackend {
        service: String,
        backend: String,
        address: Ipv4Addr,
    },
}

/// Why 127.0.0.0/8 is only a warning on vnic ports.
const LOOPBACK_VNIC: &str =
    "is a loopback address (no real network delivers 127.0.0.0/8; only a vnic wire can)";
/// Why it is an error once a port is AF_PACKET.
const LOOPBACK_AFPACKET: &str =
    "is a loopback address (127.0.0.0/8 never arrives from or leaves through an afpacket port)";

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Warning::NoBackends { service } => write!(
                f,
                "service {service:?}: has no backends (it refuses every new connection until one is added)"
            ),
            Warning::AllWeightsZero { service } => write!(
                f,
                "service {service:?}: every backend has weight 0 (it refuses every new connection; existing ones continue)"
            ),
            Warning::LoopbackVip { service, vip } => {
                write!(f, "service {service:?}: vip {vip} {LOOPBACK_VNIC}")
            }
            Warning::LoopbackBackend {
                service,
                backend,
                address,
            } => write!(
                f,
                "service {service:?}: backend {backend:?}: address {address} {LOOPBACK_VNIC}"
            ),
        }
    }
}

/// The warnings of a validated configuration, in file order.
pub(super) fn warnings(cfg: &Config) -> Vec<Warning> {
    let vnic_only = !has_afpacket(cfg);
    let mut w = Vec::new();
    for s in &cfg.services {
        let service = || s.name.clone();
        if vnic_only && s.vip.is_loopback() {
            w.push(Warning::LoopbackVip {
                service: service(),
                vip: s.vip,
            });
        }
        if s.backends.is_empty() {
            w.push(Warning::NoBackends { service: service() });
        } else if s.backends.iter().all(|b| b.weight == 0) {
            w.push(Warning::AllWeightsZero { service: service() });
        }
        for b in s
            .backends
            .iter()
            .filter(|b| vnic_only && b.address.is_loopback())
        {
            w.push(Warning::LoopbackBackend {
                service: service(),
                backend: b.name.clone(),
                address: b.address,
            });
        }
    }
    w
}

fn has_afpacket(cfg: &Config) -> bool {
    cfg.ports.iter().any(|p| p.driver == Driver::Afpacket)
}

/// The rules over addresses of different tables: loopback VIPs and
/// backends on an AF_PACKET appliance, routes to or through a VIP. (A
/// neighbour that is a VIP is refused where neighbours are read.)
pub(super) fn check_addresses(cfg: &Config) -> Result<(), String> {
    if has_afpacket(cfg) {
        for s in &cfg.services {
            if s.vip.is_loopback() {
                return Err(format!(
                    "service {:?}: vip {} {LOOPBACK_AFPACKET}",
                    s.name, s.vip
                ));
            }
            if let Some(b) = s.backends.iter().find(|b| b.address.is_loopback()) {
                return Err(format!(
                    "service {:?}: backend {:?}: address {} {LOOPBACK_AFPACKET}",
                    s.name, b.name, b.address
                ));
            }
        }
    }
    let vip_owner = |a: Ipv4Addr| cfg.services.iter().find(|s| s.vip == a);
    for r in &cfg.routes {
        let ctx = format!("route \"{}/{}\": ", r.prefix, r.prefix_len);
        if r.prefix_len == 32
            && let Some(s) = vip_owner(r.prefix)
        {
            return Err(format!(
                "{ctx}prefix is the VIP of service {:?} (the VIP is the appliance's own address; nothing is routed to it)",
                s.name
            ));
        }
        if let Some(via) = r.via
            && let Some(s) = vip_owner(via)
        {
            return Err(format!(
                "{ctx}via {via} is the VIP of service {:?} (a gateway must be another host; the appliance would send packets to itself)",
                s.name
            ));
        }
    }
    Ok(())
}
