//! Re-reading the configuration file (SIGHUP or `lbctl reload`): a file
//! that is invalid, or that changes what needs a restart, is refused and
//! the running configuration stays; runtime overrides follow the reload
//! rule ([`crate::overrides`]).

use std::path::Path;

use shm_layout::Table;

use super::Appliance;
use super::host::{HostError, resolve_interfaces};
use super::publish::PublishError;
use crate::admin::proto::ReloadReply;
use crate::config::{self, Config, ConfigError};
use crate::overrides::Override;

/// Why a reload was refused. The running configuration (generation
/// `generation`) stays in every case.
#[derive(Debug, thiserror::Error)]
#[error("reload refused, running configuration (generation {generation}) kept: {cause}")]
pub struct ReloadError {
    pub generation: u64,
    pub cause: Refusal,
}

/// What was wrong with the new file.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error(transparent)]
    Invalid(#[from] ConfigError),
    #[error(transparent)]
    Host(#[from] HostError),
    /// Settings that shape the region or the processes changed.
    #[error("[{}] changed, which needs a restart", .0.join("], ["))]
    RestartOnly(Vec<&'static str>),
    /// A service the switches cannot run yet (see [`crate::l7::refuse_to_run`]).
    #[error(transparent)]
    NotBuilt(#[from] crate::l7::NotBuilt),
    #[error(transparent)]
    Publish(#[from] PublishError),
}

/// Settings that shape the region or the processes: a reload may not
/// change them. Their names, as the file's tables say them.
pub fn restart_only_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut v = Vec::new();
    if old.instance != new.instance {
        v.push("instance");
    }
    if old.limits != new.limits {
        v.push("limits");
    }
    if old.ports != new.ports {
        v.push("port");
    }
    if old.switches != new.switches {
        v.push("switch");
    }
    if old.admin != new.admin {
        v.push("admin");
    }
    if old.records != new.records {
        v.push("records");
    }
    v
}

impl Appliance {
    /// Re-reads `path`. An invalid file, or one that changes what needs a
    /// restart, is refused and the running configuration stays; runtime
    /// overrides follow the reload rule. Counts and logs the outcome.
    pub fn reload(&mut self, path: &Path) -> Result<ReloadReply, ReloadError> {
        let result = self.try_reload(path).map_err(|cause| ReloadError {
            generation: self.region.generation(Table::Config),
            cause,
        });
        match &result {
            Ok(r) => {
                self.reloads_ok += 1;
                for w in &r.warnings {
                    log::warn!("{}: {w}", path.display());
                }
                for k in &r.overrides_kept {
                    log::info!("reload keeps runtime override {k}");
                }
                for d in &r.overrides_dropped {
                    log::warn!("reload drops runtime override {d}: backend no longer configured");
                }
                log::info!(
                    "reloaded {}: configuration generation {}, routing generation {}, {} backends health-checked",
                    path.display(),
                    r.generation,
                    r.routing_generation,
                    self.health.len()
                );
            }
            Err(e) => {
                self.reloads_refused += 1;
                log::error!("{e}");
            }
        }
        result
    }

    fn try_reload(&mut self, path: &Path) -> Result<ReloadReply, Refusal> {
        let config::Checked {
            config: mut new,
            warnings,
        } = config::load_checked(path)?;
        crate::l7::refuse_to_run(&new)?;
        resolve_interfaces(&mut new)?;
        let changed = restart_only_changes(&self.cfg, &new);
        if !changed.is_empty() {
            return Err(Refusal::RestartOnly(changed));
        }
        let mut overrides = self.overrides.clone();
        let carried = overrides.carry_over(&new);
        let (generation, routing_generation) = self.publish_all(new, overrides)?;
        let fmt =
            |v: Vec<(String, Override)>| v.into_iter().map(|(n, o)| format!("{n}: {o}")).collect();
        Ok(ReloadReply {
            generation,
            routing_generation,
            overrides_kept: fmt(carried.kept),
            overrides_dropped: fmt(carried.dropped),
            warnings: warnings.iter().map(|w| w.to_string()).collect(),
        })
    }
}
