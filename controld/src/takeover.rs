//! Starting on an instance's region: create it, or adopt the live one a
//! crashed controld left, or refuse.
//!
//! The rule (docs/ARCHITECTURE.md, "Takeover"):
//! - no region: create one;
//! - a region this user did not create for itself (other owner, or group or
//!   others may access it): refuse, touch nothing ([`shm_layout::ShmError::Untrusted`]);
//! - a region a controld of ours never finished creating: remove, create;
//! - a region of another build (magic, version, fingerprint, section
//!   table): refuse: its switches cannot be identified, so they can be
//!   neither adopted nor stopped safely;
//! - a region of another instance, or of other capacities (`[limits]`,
//!   number of switches): refuse, naming the difference;
//! - a region whose controld still runs (pid and start time, owner, program):
//!   refuse, the instance is running;
//! - otherwise adopt it: its connection table, backend counters, generations
//!   and every switch that [`crate::procs::verify`] proves is this
//!   instance's switchd for its slot. A pid that is anything else is left
//!   alone, and its slot gets a new switch.

use std::sync::atomic::Ordering;

use shm_layout::header::{REGION_READY, REGION_STOPPING};
use shm_layout::switch_slot::{SW_RUNNING, SW_STARTING};
use shm_layout::{Access, Capacities, Mapping, Region, RegionError, ShmError, region_name};

use crate::config::Config;
use crate::ids::BackendIdentity;
use crate::procs::{self, Expected, Pidfd};

#[derive(Debug, thiserror::Error)]
pub enum TakeoverError {
    #[error("instance {instance:?} is already running (controld pid {pid})")]
    Running { instance: String, pid: u32 },
    #[error("refusing the region: {0}")]
    Untrusted(ShmError),
    #[error(
        "/dev/shm/{name} was left by another build of switchyard ({why}): its switches cannot be identified, so they are neither adopted nor stopped; stop them (`switchd --instance {instance}` processes) and remove /dev/shm/{name}"
    )]
    OtherBuild {
        name: String,
        instance: String,
        why: String,
    },
    #[error("/dev/shm/{name} belongs to instance {found:?}, not {instance:?}: refusing it")]
    OtherInstance {
        name: String,
        instance: String,
        found: String,
    },
    #[error(
        "/dev/shm/{name} is the live region of a controld that stopped without cleaning up, made for other capacities ({diff}): it cannot be adopted with this configuration. Start controld with the configuration it was made with (its connections survive), or stop its switches and remove /dev/shm/{name} (its connections are lost)"
    )]
    Capacities { name: String, diff: String },
    #[error("{0}")]
    Region(RegionError),
}

/// What a region's controld is now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Controld {
    /// The recorded controld runs (proved by pid and start time).
    Running(u32),
    /// It has exited, or its pid now names another process.
    Gone,
}

/// Judges an intact region of this build: adopt it (`Ok`) or refuse.
pub fn judge(
    name: &str,
    want_instance: &str,
    want: &Capacities,
    found_instance: &str,
    found: &Capacities,
    controld: &Controld,
) -> Result<(), TakeoverError> {
    if found_instance != want_instance {
        return Err(TakeoverError::OtherInstance {
            name: name.to_string(),
            instance: want_instance.to_string(),
            found: found_instance.to_string(),
        });
    }
    if let Controld::Running(pid) = *controld {
        return Err(TakeoverError::Running {
            instance: want_instance.to_string(),
            pid,
        });
    }
    let diff = caps_diff(found, want);
    if !diff.is_empty() {
        return Err(TakeoverError::Capacities {
            name: name.to_string(),
            diff: diff.join(", "),
        });
    }
    Ok(())
}

/// The capacities that differ, as `name region -> configuration`.
fn caps_diff(found: &Capacities, want: &Capacities) -> Vec<String> {
    let pairs = [
        ("services", found.services, want.services),
        ("backends", found.backends, want.backends),
        ("backend ids", found.backend_ids, want.backend_ids),
        ("connection slots", found.conn_slots, want.conn_slots),
        ("routes", found.routes, want.routes),
        ("neighbours", found.neighbours, want.neighbours),
        ("switches", found.switches, want.switches),
        ("maglev table size", found.maglev_m, want.maglev_m),
        ("ring slots", found.ring_slots, want.ring_slots),
    ];
    pairs
        .iter()
        .filter(|(_, f, w)| f != w)
        .map(|(n, f, w)| format!("{n} {f} in the region, {w} configured"))
        .collect()
}

/// A switch of the previous controld, proved to be this instance's switchd
/// for its slot.
#[derive(Debug)]
pub struct AdoptedSwitch {
    pub index: usize,
    pub pidfd: Pidfd,
    /// Its command line (argv[1..]): the supervisor compares it with the
    /// arguments the configuration asks for.
    pub args: Vec<String>,
}

/// How controld came to its region.
#[derive(Debug)]
pub enum Start {
    /// A new, empty region.
    Created(Region),
    /// The region of a controld that died, with its table and switches.
    Adopted {
        region: Region,
        previous_controld: u32,
        switches: Vec<AdoptedSwitch>,
    },
}

impl Start {
    pub fn region(&self) -> &Region {
        match self {
            Start::Created(r) | Start::Adopted { region: r, .. } => r,
        }
    }
}

/// The region's capacities for a configuration (`[limits]` and the switches).
pub fn capacities(cfg: &Config) -> Capacities {
    Capacities {
        services: cfg.limits.services,
        backends: cfg.limits.backends,
        backend_ids: cfg.limits.backends.saturating_mul(4),
        // Two slots per NAT connection (forward and reply) at no more than half
        // load keeps every probe sequence short: four slots per connection.
        conn_slots: cfg.limits.connections.saturating_mul(4).next_power_of_two(),
        routes: cfg.limits.routes,
        neighbours: cfg.limits.neighbours,
        switches: cfg.switches.len() as u32,
        maglev_m: cfg.limits.maglev_table_size,
        ring_slots: 4096,
        _pad: 0,
    }
}

/// Records this process as the region's controld (pid and start time).
fn claim(region: &Region) {
    let me = std::process::id();
    let h = region.header();
    h.controld_start.store(
        shm_layout::time::process_start(me).unwrap_or(0),
        Ordering::Relaxed,
    );
    h.controld_pid.store(me, Ordering::SeqCst);
}

fn controld_of(region: &Region) -> Controld {
    let h = region.header();
    let pid = h.controld_pid.load(Ordering::SeqCst);
    let start = h.controld_start.load(Ordering::Relaxed);
    if pid == std::process::id() {
        return Controld::Gone;
    }
    match procs::verify(pid, start, &Expected::controld()) {
        Ok(_) => Controld::Running(pid),
        Err(e) => {
            if shm_layout::time::pid_alive(pid) {
                log::warn!("region names controld pid {pid}, which is not it: {e}");
            }
            Controld::Gone
        }
    }
}

/// Creates the region of `instance`, or adopts or refuses the one there
/// (see the module's rule).
pub fn start(instance: &str, caps: Capacities) -> Result<Start, TakeoverError> {
    let name = region_name(instance);
    if Mapping::exists(&name) {
        match Region::attach_name(&name, Access::ReadWrite) {
            Ok(region) => return adopt(region, &name, instance, &caps),
            Err(RegionError::Shm(e @ ShmError::Untrusted { .. })) => {
                return Err(TakeoverError::Untrusted(e));
            }
            Err(RegionError::Shm(ShmError::NotFound { .. })) => {}
            Err(RegionError::NotReady { .. }) => {
                // Its controld died before any switch could attach.
                log::warn!("removing /dev/shm/{name}: its controld died while creating it");
                Mapping::unlink(&name).map_err(|e| TakeoverError::Region(e.into()))?;
            }
            Err(
                e @ (RegionError::BadMagic { .. }
                | RegionError::Version { .. }
                | RegionError::Fingerprint { .. }
                | RegionError::Corrupt { .. }),
            ) => {
                return Err(TakeoverError::OtherBuild {
                    name,
                    instance: instance.to_string(),
                    why: e.to_string(),
                });
            }
            Err(e) => return Err(TakeoverError::Region(e)),
        }
    }
    let region = Region::create(instance, caps).map_err(TakeoverError::Region)?;
    claim(&region);
    Ok(Start::Created(region))
}

fn adopt(
    region: Region,
    name: &str,
    instance: &str,
    caps: &Capacities,
) -> Result<Start, TakeoverError> {
    let h = region.header();
    let found_instance = shm_layout::names::get(&h.instance).to_string();
    judge(
        name,
        instance,
        caps,
        &found_instance,
        &h.caps,
        &controld_of(&region),
    )?;
    let previous_controld = h.controld_pid.load(Ordering::SeqCst);
    claim(&region);
    // A controld killed while stopping left STOPPING: the instance runs again.
    let _ = h.state.compare_exchange(
        REGION_STOPPING,
        REGION_READY,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    let mut switches = Vec::new();
    for (index, slot) in region.switch_slots().iter().enumerate() {
        let state = slot.state.load(Ordering::SeqCst);
        let pid = slot.pid.load(Ordering::Relaxed);
        if pid == 0 || (state != SW_RUNNING && state != SW_STARTING) {
            continue;
        }
        let start = slot.proc_start.load(Ordering::Relaxed);
        match procs::verify(pid, start, &Expected::switchd(instance, index)) {
            Ok((pidfd, argv)) => {
                log::info!("adopting switch {index} (pid {pid}) of the previous controld");
                switches.push(AdoptedSwitch {
                    index,
                    pidfd,
                    args: argv.into_iter().skip(1).collect(),
                });
            }
            Err(procs::NotOurs::Gone { .. }) => {
                log::warn!("switch {index} (pid {pid}) of the previous controld has exited")
            }
            Err(e) => log::warn!(
                "switch slot {index} names pid {pid}, which is not this instance's switchd: {e}; left alone, the slot gets a new switch"
            ),
        }
    }
    log::warn!(
        "adopted /dev/shm/{name} of controld pid {previous_controld}, which is gone: {} switches and the connection table carry on",
        switches.len()
    );
    Ok(Start::Adopted {
        region,
        previous_controld,
        switches,
    })
}

/// The backends of the region's active configuration with their ids: an
/// adopting controld gives them the same ids, so the connections that
/// reference them stay theirs.
pub fn published_ids(region: &Region) -> Vec<(BackendIdentity, u32)> {
    let words = region.pub_words(shm_layout::Table::Config);
    if words.generation.load(Ordering::SeqCst) == 0 {
        return Vec::new();
    }
    let active = words.active.load(Ordering::SeqCst) as usize & 1;
    // SAFETY: controld is the only writer of configuration slots, and it is
    // us (the previous controld is proven gone): nothing writes the active
    // slot while we read it.
    let view = unsafe { region.config_view(active) };
    let n = view.header.n_backends as usize;
    view.backends[..n.min(view.backends.len())]
        .iter()
        .filter_map(|b| {
            let s = view.services.get(b.service as usize)?;
            Some((
                BackendIdentity {
                    vip: s.vip.into(),
                    vport: s.port,
                    proto: s.proto,
                    addr: b.ip.into(),
                    port: b.port,
                },
                b.id,
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps() -> Capacities {
        Capacities::default()
    }

    #[test]
    fn a_dead_controlds_region_of_this_instance_and_capacities_is_adopted() {
        assert!(judge("r", "edge", &caps(), "edge", &caps(), &Controld::Gone).is_ok());
    }

    #[test]
    fn a_running_instance_another_instance_or_other_capacities_are_refused() {
        let e = judge(
            "r",
            "edge",
            &caps(),
            "edge",
            &caps(),
            &Controld::Running(42),
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "instance \"edge\" is already running (controld pid 42)"
        );
        let e = judge("r", "edge", &caps(), "core", &caps(), &Controld::Gone).unwrap_err();
        assert!(matches!(e, TakeoverError::OtherInstance { .. }), "{e}");
        let small = Capacities {
            conn_slots: 1 << 16,
            switches: 2,
            ..caps()
        };
        let e = judge("r", "edge", &caps(), "edge", &small, &Controld::Gone).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("connection slots 65536 in the region, 1048576 configured")
                && msg.contains("switches 2 in the region, 8 configured")
                && !msg.contains("services"),
            "{msg}"
        );
    }
}
