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

#[cfg(test)]
mod tests {
    //! The capacity checks at their boundaries (cargo-mutants found them
    //! untested by controld's unit tests: docs/TESTING.md).
    use super::*;
    use shm_layout::Capacities;
    use shm_layout::config_slot::{BackendRec, PortRec, ServiceRec};
    use shm_layout::shm::Mapping;

    struct Temp(Region, String);
    impl Drop for Temp {
        fn drop(&mut self) {
            let _ = Mapping::unlink(&self.1);
        }
    }

    fn temp(tag: &str) -> Temp {
        let inst = format!("pub-{tag}-{}", std::process::id());
        let caps = Capacities {
            services: 4,
            backends: 8,
            backend_ids: 8,
            routes: 3,
            neighbours: 2,
            conn_slots: 1 << 10,
            maglev_m: 251,
            ..Capacities::default()
        };
        Temp(
            Region::create(&inst, caps).unwrap(),
            shm_layout::region_name(&inst),
        )
    }

    fn snap(services: usize, backends: usize, ports: usize, m: u32) -> ConfigSnapshot {
        ConfigSnapshot {
            services: vec![ServiceRec::default(); services],
            backends: vec![BackendRec::default(); backends],
            ports: vec![PortRec::default(); ports],
            maglev_m: m,
            ..ConfigSnapshot::default()
        }
    }

    #[test]
    fn a_snapshot_fits_up_to_each_capacity_and_not_one_past_it() {
        let t = temp("fits");
        let r = &t.0;
        assert!(check_fits(r, &snap(4, 8, MAX_PORTS, 251)).is_ok());
        assert_eq!(
            check_fits(r, &snap(5, 8, 1, 251)).unwrap_err().to_string(),
            "5 services exceed the region's capacity of 4"
        );
        assert_eq!(
            check_fits(r, &snap(4, 9, 1, 251)).unwrap_err().to_string(),
            "9 backends exceed the region's capacity of 8"
        );
        assert_eq!(
            check_fits(r, &snap(1, 1, MAX_PORTS + 1, 251))
                .unwrap_err()
                .to_string(),
            format!("{} ports exceed the maximum of {MAX_PORTS}", MAX_PORTS + 1)
        );
        assert_eq!(
            check_fits(r, &snap(1, 1, 1, 257)).unwrap_err().to_string(),
            "maglev_table_size 257 differs from the region's 251 (changing it needs a restart)"
        );
    }

    #[test]
    fn routing_past_either_capacity_is_refused_and_at_it_published() {
        let t = temp("routes");
        let r = &t.0;
        let rs = |routes: usize, neighbours: usize| RoutingSnapshot {
            routes: vec![Default::default(); routes],
            neighbours: vec![Default::default(); neighbours],
        };
        let mut no_fence = |_: usize, _: u32| true;
        let wait = Duration::from_millis(10);
        assert!(publish_routing(r, &rs(3, 2), wait, &mut no_fence).is_ok());
        for (routes, neighbours) in [(4, 2), (3, 3)] {
            assert_eq!(
                publish_routing(r, &rs(routes, neighbours), wait, &mut no_fence)
                    .unwrap_err()
                    .to_string(),
                format!(
                    "{routes} routes / {neighbours} neighbours exceed the region's capacity of 3 / 2"
                )
            );
        }
    }
}
