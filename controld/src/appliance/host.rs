//! What the appliance takes from this machine: its CPUs, the MACs and MTUs
//! of afpacket ports' interfaces, the virtual NICs of vnic switches, and
//! how each switch process is started.

use shm_layout::Mapping;

use crate::config::{self, Config};
use crate::supervisor::SwitchSpec;

/// Why the configuration does not fit this machine, or its virtual NICs
/// could not be made.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("switch {switch:?}: cpu {cpu} does not exist on this machine (CPUs 0..={last})")]
    NoSuchCpu {
        switch: String,
        cpu: usize,
        last: usize,
    },
    #[error("port {port:?}: interface {interface:?} not found in this network namespace ({error})")]
    NoInterface {
        port: String,
        interface: String,
        error: std::io::Error,
    },
    #[error("port {port:?}: interface {interface:?} has no Ethernet address ({text:?})")]
    BadMac {
        port: String,
        interface: String,
        text: String,
    },
    #[error("port {port:?}: interface {interface:?}: MTU {text:?} is not a number")]
    BadMtu {
        port: String,
        interface: String,
        text: String,
    },
    #[error("removing the stale vnic {name}: {error}")]
    StaleVnic {
        name: String,
        error: shm_layout::ShmError,
    },
    #[error("creating vnic {name}: {error}")]
    Vnic {
        name: String,
        error: netdrv::NetdrvError,
    },
}

fn online_cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Checks that only need this machine (not expressible in the file alone).
pub fn check_machine(cfg: &Config) -> Result<(), HostError> {
    let n = online_cpus();
    // SAFETY: sysconf has no memory-safety preconditions.
    let configured = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) }.max(1) as usize;
    let cpus = configured.max(n);
    match cfg.switches.iter().find(|s| s.cpu >= cpus) {
        Some(s) => Err(HostError::NoSuchCpu {
            switch: s.name.clone(),
            cpu: s.cpu,
            last: cpus - 1,
        }),
        None => Ok(()),
    }
}

/// The name of a vnic switch's virtual NIC object.
pub fn vnic_name(instance: &str, switch: &str) -> String {
    format!("switchyard.{instance}.vnic.{switch}")
}

/// Creates the virtual NICs of the vnic switches. One that an adopted
/// switch (`keep`, by switch index) is attached to stays as it is: the
/// switch and the wire side carry on with it.
pub fn create_vnics(cfg: &Config, keep: &[usize]) -> Result<Vec<String>, HostError> {
    let mut made = Vec::new();
    for (i, s) in cfg
        .switches
        .iter()
        .enumerate()
        .filter(|(_, s)| cfg.ports[s.ports[0]].driver == config::Driver::Vnic)
    {
        let name = vnic_name(&cfg.instance, &s.name);
        if keep.contains(&i) && Mapping::exists(&name) {
            made.push(name);
            continue;
        }
        if Mapping::exists(&name) {
            Mapping::unlink(&name).map_err(|error| HostError::StaleVnic {
                name: name.clone(),
                error,
            })?;
        }
        let ports: Vec<netdrv::vnic::PortSpec> = s
            .ports
            .iter()
            .map(|&p| netdrv::vnic::PortSpec {
                name: cfg.ports[p].name.clone(),
                mac: cfg.ports[p].mac,
            })
            .collect();
        let ring = s
            .ports
            .iter()
            .map(|&p| cfg.ports[p].ring_size)
            .max()
            .unwrap_or(1024);
        let frames = ports.len() as u32 * 2 * ring + 256 + 4 * s.burst;
        netdrv::vnic::create(&name, &ports, ring, frames).map_err(|error| HostError::Vnic {
            name: name.clone(),
            error,
        })?;
        made.push(name);
    }
    Ok(made)
}

/// The switchd arguments that name its NIC: a vnic object, or afpacket
/// ports as `name=interface` with a fanout group per interface (so several
/// switches can share one).
fn nic_args(cfg: &Config, s: &config::Switch) -> Vec<String> {
    if cfg.ports[s.ports[0]].driver == config::Driver::Vnic {
        return vec!["--vnic".into(), vnic_name(&cfg.instance, &s.name)];
    }
    let mut v = Vec::new();
    for &p in &s.ports {
        let port = &cfg.ports[p];
        v.push("--afpacket".into());
        v.push(format!(
            "{}={}:{}:{}:{}",
            port.name,
            port.interface.as_deref().unwrap_or(""),
            port.ring_size,
            u8::from(port.promiscuous),
            0x5300 + p
        ));
    }
    v
}

/// How the supervisor starts each `[[switch]]`.
pub fn switch_specs(cfg: &Config) -> Vec<SwitchSpec> {
    cfg.switches
        .iter()
        .enumerate()
        .map(|(i, s)| SwitchSpec {
            index: i,
            name: s.name.clone(),
            cpu: s.cpu,
            idle: match s.idle {
                config::Idle::Busy => "busy",
                config::Idle::Adaptive => "adaptive",
            },
            burst: s.burst as usize,
            nic: nic_args(cfg, s),
            engine: match s.engine {
                config::Engine::Filter => "filter",
                config::Engine::Null => "null",
            },
            syn_queue: s.syn_queue,
            record_batch: cfg.records.batch,
            record_batch_ms: cfg.records.batch_ms,
            flow_cache: s.flow_cache,
        })
        .collect()
}

/// Reads an interface's MAC from sysfs (controld's network namespace).
fn interface_mac(port: &str, ifname: &str) -> Result<[u8; 6], HostError> {
    let text =
        std::fs::read_to_string(format!("/sys/class/net/{ifname}/address")).map_err(|error| {
            HostError::NoInterface {
                port: port.to_string(),
                interface: ifname.to_string(),
                error,
            }
        })?;
    let bad = || HostError::BadMac {
        port: port.to_string(),
        interface: ifname.to_string(),
        text: text.clone(),
    };
    let parts: Vec<&str> = text.trim().split(':').collect();
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut mac = [0u8; 6];
    for (m, p) in mac.iter_mut().zip(parts) {
        *m = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    Ok(mac)
}

/// Reads an interface's MTU from sysfs (controld's network namespace).
fn interface_mtu(port: &str, ifname: &str) -> Result<u32, HostError> {
    let text =
        std::fs::read_to_string(format!("/sys/class/net/{ifname}/mtu")).map_err(|error| {
            HostError::NoInterface {
                port: port.to_string(),
                interface: ifname.to_string(),
                error,
            }
        })?;
    text.trim().parse().map_err(|_| HostError::BadMtu {
        port: port.to_string(),
        interface: ifname.to_string(),
        text: text.clone(),
    })
}

/// Fills in the MACs and MTUs of afpacket ports from their interfaces.
pub fn resolve_interfaces(cfg: &mut Config) -> Result<(), HostError> {
    for p in cfg
        .ports
        .iter_mut()
        .filter(|p| p.driver == config::Driver::Afpacket)
    {
        let ifname = p.interface.clone().unwrap_or_default();
        p.mac = interface_mac(&p.name, &ifname)?;
        p.mtu = interface_mtu(&p.name, &ifname)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_interface_names_port_and_interface() {
        let e = interface_mac("client", "sy-no-such-if0").unwrap_err();
        assert!(
            e.to_string().starts_with(
                "port \"client\": interface \"sy-no-such-if0\" not found in this network namespace ("
            ),
            "{e}"
        );
    }
}
