//! Publishing the running state: the configuration snapshot (file,
//! overrides, health, agents' steering, loading limits) and the routing
//! tables (static, or the kernel mirror's), with fencing of stalled
//! switches; and the periodic sources that republish (mirror, loading).

use std::time::{Duration, Instant};

use shm_layout::{PublishReport, Region};

use super::Appliance;
use crate::agents::AgentsError;
use crate::config::Config;
use crate::fence::fence_switch;
use crate::master::{self, SnapshotError};
use crate::overrides::Overrides;
use crate::publisher;
use crate::routing::{Mirror, Netlink};

/// Why a configuration or routing table was not published (the running
/// one stays).
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error(transparent)]
    Publisher(#[from] publisher::PublishError),
    #[error(transparent)]
    Agents(#[from] AgentsError),
    #[error("routing mirror: {what}: {error}")]
    Mirror {
        what: &'static str,
        error: std::io::Error,
    },
}

fn open_mirror() -> Result<Mirror<Netlink>, PublishError> {
    let nl = Netlink::open().map_err(|error| PublishError::Mirror {
        what: "opening rtnetlink sockets",
        error,
    })?;
    Mirror::new(nl).map_err(|error| PublishError::Mirror {
        what: "reading the kernel's routes and neighbours",
        error,
    })
}

fn ack_timeout(cfg: &Config) -> Duration {
    Duration::from_millis(cfg.publish.ack_timeout_ms as u64)
}

fn log_excluded(rep: &PublishReport, table: &str, ack: Duration) {
    for e in &rep.excluded {
        log::error!(
            "switch {} (pid {}) did not acknowledge {table} generation {} within {ack:?}: excluded and fenced",
            e.switch,
            e.pid,
            rep.generation - 1
        );
    }
}

impl Appliance {
    /// Builds and publishes the configuration snapshot of `cfg` under
    /// `overrides`, the backends' current health and the agents' steering; on
    /// success records all three as running (together, so the admin views
    /// always see a snapshot built from the running configuration).
    pub fn publish_config(
        &mut self,
        cfg: &Config,
        overrides: &Overrides,
    ) -> Result<u64, PublishError> {
        let (health, agents, loading) = (&self.health, &self.agents, &self.loading);
        let mut snap = master::config_snapshot(
            cfg,
            &mut self.ids,
            overrides,
            |b| health.is_down(b),
            |a| agents.steer(a),
            |b| loading.limit(b),
        )?;
        snap.cookie_secrets = self.cookies.pair();
        let region = &self.region;
        let ack = ack_timeout(cfg);
        let rep =
            publisher::publish_config(region, &snap, ack, &mut |i, p| fence_switch(region, i, p))?;
        log_excluded(&rep, "configuration", ack);
        self.health_dirty = false;
        self.agents_dirty = false;
        self.timeouts = shm_layout::conntrack::Timeouts {
            tcp_syn_ms: snap.tcp_syn_ms,
            tcp_established_ms: snap.tcp_established_ms,
            tcp_fin_ms: snap.tcp_fin_ms,
            udp_ms: snap.udp_ms,
            tcp_provisional_ms: snap.tcp_provisional_ms,
        };
        self.snap = snap;
        if *overrides != self.overrides
            && let Some(path) = &self.saved
            && let Err(e) = super::saved::save(path, overrides)
        {
            log::error!(
                "runtime overrides not saved (a controld that replaces this one would not have them): {e}"
            );
        }
        self.overrides = overrides.clone();
        self.cfg = cfg.clone();
        Ok(rep.generation)
    }

    /// Publishes the routing of `cfg`: the kernel mirror's snapshot (opening
    /// or closing the mirror as `[routing] mirror` says) or the static tables.
    pub fn publish_routing(&mut self, cfg: &Config) -> Result<u64, PublishError> {
        if cfg.routing.mirror && self.mirror.is_none() {
            self.mirror = Some(open_mirror()?);
        } else if !cfg.routing.mirror {
            self.mirror = None;
        }
        let rsnap = match &mut self.mirror {
            Some(m) => m.snapshot(cfg, Instant::now()),
            None => master::routing_snapshot(cfg),
        };
        let region = &self.region;
        let ack = ack_timeout(cfg);
        let rep = publisher::publish_routing(region, &rsnap, ack, &mut |i, p| {
            fence_switch(region, i, p)
        })?;
        log_excluded(&rep, "routing", ack);
        Ok(rep.generation)
    }

    /// Publishes configuration and routing of `cfg` under `overrides` and
    /// makes them the running ones; on failure the running configuration
    /// (and its health checks and agents' listener) stay.
    pub fn publish_all(
        &mut self,
        cfg: Config,
        overrides: Overrides,
    ) -> Result<(u64, u64), PublishError> {
        self.agents.configure(&cfg)?;
        self.health.configure(&cfg, Instant::now());
        self.loading.configure(&cfg, Instant::now());
        let res = self
            .publish_config(&cfg, &overrides)
            .and_then(|g| Ok((g, self.publish_routing(&cfg)?)));
        if res.is_err() {
            let running = self.cfg.clone();
            self.health.configure(&running, Instant::now());
            self.loading.configure(&running, Instant::now());
            if let Err(e) = self.agents.configure(&running) {
                log::error!("{e}: the running configuration's agents are not restored");
            }
        }
        res
    }

    /// Publishes the mirror's snapshot when the kernel's tables changed it.
    pub(super) fn poll_mirror(&mut self) {
        let Some(m) = self.mirror.as_mut() else {
            return;
        };
        let Some(snap) = m.poll(&self.cfg, Instant::now()) else {
            return;
        };
        let region: &Region = &self.region;
        let ack = ack_timeout(&self.cfg);
        match publisher::publish_routing(region, &snap, ack, &mut |i, p| fence_switch(region, i, p))
        {
            Ok(rep) => {
                log_excluded(&rep, "routing", ack);
                log::info!(
                    "routing generation {}: {} routes, {} neighbours (kernel tables changed)",
                    rep.generation,
                    snap.routes.len(),
                    snap.neighbours.len()
                );
            }
            Err(e) => log::error!("routing: publishing the mirrored tables failed: {e}"),
        }
    }

    /// Judges the adaptive `max_conns` limits whose interval ended; true when
    /// one changed (the configuration is then republished this tick).
    pub(super) fn poll_loading(&mut self) -> bool {
        let counters = self.region.backend_counters();
        let ids = &self.ids;
        let changes = self.loading.tick(Instant::now(), |b| {
            ids.id_of(b).and_then(|id| counters.get(id as usize))
        });
        for c in &changes {
            log::debug!(
                "loading: backend {}:{} of {}:{}: max_conns {} -> {} ({} SYN-ACKs, {} over target, mean {} ms)",
                c.backend.addr,
                c.backend.port,
                c.backend.vip,
                c.backend.vport,
                c.from,
                c.to,
                c.samples,
                c.slow,
                c.mean_ms
            );
        }
        !changes.is_empty()
    }
}
