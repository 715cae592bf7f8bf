//! The publisher: the single writer of the configuration and routing slots.
//! It only copies a snapshot into the inactive slot; the protocol lives in
//! `shm_layout::publish`.

use std::time::Duration;

use shm_layout::config_slot::MAX_PORTS;
use shm_layout::{PublishReport, Region};

use crate::master::{ConfigSnapshot, RoutingSnapshot};

/// Why a snapshot was not published.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("{n} services exceed the region's capacity of {cap}")]
    Services { n: usize, cap: u32 },
    #[error("{n} backends exceed the region's capacity of {cap}")]
    Backends { n: usize, cap: u32 },
    #[error("{n} ports exceed the maximum of {MAX_PORTS}")]
    Ports { n: usize },
    #[error(
        "maglev_table_size {snap} differs from the region's {region} (changing it needs a restart)"
    )]
    MaglevSize { snap: u32, region: u32 },
    #[error(
        "{routes} routes / {neighbours} neighbours exceed the region's capacity of {cap_routes} / {cap_neighbours}"
    )]
    Routing {
        routes: usize,
        neighbours: usize,
        cap_routes: u32,
        cap_neighbours: u32,
    },
    /// The A/B protocol wrote nothing (a stalled switch could not be fenced).
    #[error(transparent)]
    Protocol(#[from] shm_layout::publish::PublishError),
}

/// Whether a snapshot fits the region's capacities (checked before publishing,
/// so a too-large configuration is refused, never truncated).
pub fn check_fits(region: &Region, snap: &ConfigSnapshot) -> Result<(), PublishError> {
    let caps = region.caps();
    if snap.services.len() > caps.services as usize {
        return Err(PublishError::Services {
            n: snap.services.len(),
            cap: caps.services,
        });
    }
    if snap.backends.len() > caps.backends as usize {
        return Err(PublishError::Backends {
            n: snap.backends.len(),
            cap: caps.backends,
        });
    }
    if snap.ports.len() > MAX_PORTS {
        return Err(PublishError::Ports {
            n: snap.ports.len(),
        });
    }
    if snap.maglev_m != caps.maglev_m {
        return Err(PublishError::MaglevSize {
            snap: snap.maglev_m,
            region: caps.maglev_m,
        });
    }
    Ok(())
}

/// Publishes a configuration snapshot. `fence` stops a switch that does
/// not acknowledge within `ack_timeout` (see `shm_layout::publish`;
/// [`crate::fence::fence_child`] for controld's own switches).
pub fn publish_config(
    region: &Region,
    snap: &ConfigSnapshot,
    ack_timeout: Duration,
    fence: &mut dyn FnMut(usize, u32) -> bool,
) -> Result<PublishReport, PublishError> {
    check_fits(region, snap)?;
    let m = snap.maglev_m as usize;
    region
        .publish_config(ack_timeout, fence, |slot| {
            let h = &mut *slot.header;
            h.n_services = snap.services.len() as u32;
            h.n_backends = snap.backends.len() as u32;
            h.n_ports = snap.ports.len() as u32;
            h.maglev_m = snap.maglev_m;
            h.tcp_syn_ms = snap.tcp_syn_ms;
            h.tcp_provisional_ms = snap.tcp_provisional_ms;
            h.tcp_established_ms = snap.tcp_established_ms;
            h.tcp_fin_ms = snap.tcp_fin_ms;
            h.udp_ms = snap.udp_ms;
            h.tunnel_src = snap.tunnel_src;
            h.syn_proxy_auto_syn_rate = snap.syn_proxy_auto_syn_rate;
            h.syn_proxy_auto_occupancy_permille = snap.syn_proxy_auto_occupancy_permille;
            h.cookie_secrets = snap.cookie_secrets;
            h.ports = Default::default();
            h.ports[..snap.ports.len()].copy_from_slice(&snap.ports);
            slot.services.fill(Default::default());
            slot.services[..snap.services.len()].copy_from_slice(&snap.services);
            slot.backends.fill(Default::default());
            slot.backends[..snap.backends.len()].copy_from_slice(&snap.backends);
            slot.down_action.fill(0);
            for &(id, action) in &snap.down_actions {
                if let Some(a) = slot.down_action.get_mut(id as usize) {
                    *a = action;
                }
            }
            for (i, t) in snap.tables.iter().enumerate() {
                let area = &mut slot.maglev[i * m..(i + 1) * m];
                area[..t.len()].copy_from_slice(t);
                area[t.len()..].fill(0);
            }
        })
        .map_err(PublishError::from)
}

/// Publishes a routing snapshot; `fence` as for [`publish_config`].
pub fn publish_routing(
    region: &Region,
    snap: &RoutingSnapshot,
    ack_timeout: Duration,
    fence: &mut dyn FnMut(usize, u32) -> bool,
) -> Result<PublishReport, PublishError> {
    let caps = region.caps();
    if snap.routes.len() > caps.routes as usize || snap.neighbours.len() > caps.neighbours as usize
    {
        return Err(PublishError::Routing {
            routes: snap.routes.len(),
            neighbours: snap.neighbours.len(),
            cap_routes: caps.routes,
            cap_neighbours: caps.neighbours,
        });
    }
    region
        .publish_routing(ack_timeout, fence, |slot| {
            slot.header.n_routes = snap.routes.len() as u32;
            slot.header.n_neighbours = snap.neighbours.len() as u32;
            slot.routes.fill(Default::default());
            slot.routes[..snap.routes.len()].copy_from_slice(&snap.routes);
            slot.neighbours.fill(Default::default());
            slot.neighbours[..snap.neighbours.len()].copy_from_slice(&snap.neighbours);
        })
        .map_err(PublishError::from)
}
