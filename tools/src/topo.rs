//! What a wire-side tool needs to know about a running instance: services,
//! ports, routes and neighbours (read from the region), and the virtual NIC
//! queues it can drive (found under /dev/shm).

use std::net::Ipv4Addr;

use anyhow::{Context, Result, bail};
use shm_layout::config_slot::MODE_DR;
use shm_layout::routing_slot::{NeighbourRec, RouteRec, mask};
use shm_layout::{Access, Region, names};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceInfo {
    pub name: String,
    pub vip: [u8; 4],
    pub port: u16,
    pub proto: u8,
    pub dr: bool,
    pub backends: Vec<([u8; 4], u16)>,
}

#[derive(Clone, Debug)]
pub struct Topology {
    pub services: Vec<ServiceInfo>,
    /// Global ports: (name, MAC).
    pub ports: Vec<(String, [u8; 6])>,
    pub routes: Vec<RouteRec>,
    pub neighbours: Vec<NeighbourRec>,
    pub config_generation: u64,
}

impl Topology {
    /// Reads the currently published configuration and routing.
    pub fn read(r: &Region) -> Self {
        let copy = r.config_copy();
        let cfg = copy.config();
        let services = cfg
            .services()
            .iter()
            .map(|s| ServiceInfo {
                name: names::get(&s.name).to_string(),
                vip: s.vip.to_be_bytes(),
                port: s.port,
                proto: s.proto,
                dr: s.mode == MODE_DR,
                backends: cfg
                    .service_backends(s)
                    .iter()
                    .map(|b| (b.ip.to_be_bytes(), b.port))
                    .collect(),
            })
            .collect();
        let ports = cfg
            .ports()
            .iter()
            .map(|p| (names::get(&p.name).to_string(), p.mac))
            .collect();
        let rcopy = r.routing_copy();
        let rt = rcopy.routing();
        Self {
            services,
            ports,
            routes: rt.routes().to_vec(),
            neighbours: rt.neighbours().to_vec(),
            config_generation: copy.stamp,
        }
    }

    /// (egress port id, next-hop MAC) toward `ip`, as the appliance routes it.
    pub fn next_hop(&self, ip: [u8; 4]) -> Option<(u32, [u8; 6])> {
        let dst = u32::from_be_bytes(ip);
        let r = self.routes.iter().find(|r| dst & mask(r.len) == r.prefix)?;
        let hop = if r.via != 0 { r.via } else { dst };
        let n = self.neighbours.iter().find(|n| n.ip == hop)?;
        Some((r.port, n.mac))
    }

    pub fn service(&self, name: &str) -> Option<&ServiceInfo> {
        self.services.iter().find(|s| s.name == name)
    }

    /// Backend whose neighbour MAC is `mac` (DR identifies backends by MAC).
    pub fn backend_by_mac(&self, svc: &ServiceInfo, mac: [u8; 6]) -> Option<([u8; 4], u16)> {
        svc.backends
            .iter()
            .copied()
            .find(|(ip, _)| self.next_hop(*ip).is_some_and(|(_, m)| m == mac))
    }
}

/// Shared-memory names of an instance's virtual NICs, sorted.
pub fn vnic_names(instance: &str) -> Result<Vec<String>> {
    let prefix = format!("switchyard.{instance}.vnic.");
    let mut v: Vec<String> = std::fs::read_dir("/dev/shm")
        .context("listing /dev/shm")?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(&prefix))
        .collect();
    v.sort();
    if v.is_empty() {
        bail!(
            "instance {instance:?} has no virtual NICs (/dev/shm/{prefix}*): is controld running?"
        );
    }
    Ok(v)
}

/// Attaches read-only to an instance's region.
pub fn attach(instance: &str) -> Result<Region> {
    Region::attach(instance, Access::ReadOnly)
        .with_context(|| format!("attaching to instance {instance:?}"))
}

/// Parses "a.b.c.d/len".
pub fn parse_prefix(s: &str) -> Result<([u8; 4], u8)> {
    let (a, l) = s
        .split_once('/')
        .context("prefix must look like 198.18.100.0/24")?;
    let a: Ipv4Addr = a.parse().context("prefix address")?;
    let l: u8 = l.parse().context("prefix length")?;
    if l > 32 {
        bail!("prefix length {l} exceeds 32");
    }
    Ok((a.octets(), l))
}
