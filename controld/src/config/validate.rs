//! Raw tables to a typed [`Config`]: every rule of the schema, checked in
//! file order; the first rule broken is returned as a message that names
//! the thing, the value and the rule.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use super::health::{self, RawHealth};
use super::raw::{
    RawAdmin, RawBackend, RawConfig, RawLimits, RawNeighbour, RawPort, RawPublish, RawRoute,
    RawRouting, RawService, RawSwitch, RawSynProxy, RawTimeouts,
};
use super::*;

type R<T> = Result<T, String>;

pub(super) fn validate(raw: RawConfig) -> R<Config> {
    check_name("instance", &raw.instance, 32)?;
    let limits = limits(&raw.limits)?;
    let timeouts = timeouts(&raw.timeouts)?;
    let publish = publish(&raw.publish)?;
    let tunnel = Tunnel {
        source: raw
            .tunnel
            .source
            .as_deref()
            .map(|t| unicast("tunnel: ", "source", t))
            .transpose()?,
    };

    let admin = admin(&raw.admin)?;
    let l7 = super::l7::l7(&raw.l7)?;
    let records = records(&raw.records)?;

    if raw.port.is_empty() {
        return Err("no [[port]] is defined (at least one is required)".into());
    }
    if raw.port.len() > MAX_PORTS {
        return Err(format!(
            "too many ports: {} are defined, at most {MAX_PORTS} are supported",
            raw.port.len()
        ));
    }
    let mut ports: Vec<Port> = Vec::with_capacity(raw.port.len());
    for p in &raw.port {
        let port = port(p)?;
        if ports.iter().any(|q| q.name == port.name) {
            return Err(format!("port {:?} is defined twice", port.name));
        }
        if let Some(q) = ports
            .iter()
            .find(|q| q.driver == Driver::Vnic && q.mac == port.mac)
        {
            return Err(format!(
                "port {:?}: mac {} is already used by port {:?}",
                port.name,
                format_mac(&port.mac),
                q.name
            ));
        }
        // Two ports on one interface would each take every frame of it.
        if let Some(i) = &port.interface
            && let Some(q) = ports.iter().find(|q| q.interface.as_ref() == Some(i))
        {
            return Err(format!(
                "port {:?}: interface {i:?} is already used by port {:?} (one port per interface)",
                port.name, q.name
            ));
        }
        ports.push(port);
    }

    let routing = routing(&raw.routing, &ports)?;
    let agents = super::agents::agents(raw.agents.as_ref())?;

    if raw.switch.is_empty() {
        return Err("no [[switch]] is defined (at least one is required)".into());
    }
    let mut switches: Vec<Switch> = Vec::with_capacity(raw.switch.len());
    for s in &raw.switch {
        let sw = switch(s, &ports)?;
        if switches.iter().any(|t| t.name == sw.name) {
            return Err(format!("switch {:?} is defined twice", sw.name));
        }
        if let Some(t) = switches.iter().find(|t| t.cpu == sw.cpu) {
            return Err(format!(
                "switch {:?}: cpu {} is already used by switch {:?} (two switches may not share a CPU)",
                sw.name, sw.cpu, t.name
            ));
        }
        switches.push(sw);
    }

    if raw.service.is_empty() {
        return Err("no [[service]] is defined (at least one is required)".into());
    }
    if raw.service.len() > limits.services as usize {
        return Err(format!(
            "too many services: {} are defined, limits.services is {}",
            raw.service.len(),
            limits.services
        ));
    }
    let mut services: Vec<Service> = Vec::with_capacity(raw.service.len());
    for s in &raw.service {
        let svc = service(s, &limits)?;
        if services.iter().any(|t| t.name == svc.name) {
            return Err(format!("service {:?} is defined twice", svc.name));
        }
        if let Some(t) = services
            .iter()
            .find(|t| (t.vip, t.port, t.protocol) == (svc.vip, svc.port, svc.protocol))
        {
            return Err(format!(
                "service {:?}: {}:{} {} is already served by service {:?}",
                svc.name,
                svc.vip,
                svc.port,
                svc.protocol.as_str(),
                t.name
            ));
        }
        services.push(svc);
    }
    if let Some(s) = services.iter().find(|s| s.mode == Mode::Tunnel)
        && tunnel.source.is_none()
    {
        return Err(format!(
            "service {:?}: mode \"tunnel\" needs [tunnel] source (the outer source address of IP-in-IP packets)",
            s.name
        ));
    }
    if let Some(s) = services.iter().find(|s| Some(s.vip) == tunnel.source) {
        return Err(format!(
            "tunnel: source {} is the VIP of service {:?} (use an address of the appliance)",
            s.vip, s.name
        ));
    }
    if let Some(src) = tunnel.source {
        for s in &services {
            if let Some(b) = s.backends.iter().find(|b| b.address == src) {
                return Err(format!(
                    "tunnel: source {src} is the address of backend {:?} of service {:?} (use an address of the appliance)",
                    b.name, s.name
                ));
            }
        }
    }
    super::l7::check_source(&l7, &services, &tunnel)?;
    let total: usize = services.iter().map(|s| s.backends.len()).sum();
    if total > limits.backends as usize {
        return Err(format!(
            "too many backends: {total} are defined over all services, limits.backends is {}",
            limits.backends
        ));
    }
    let vips: HashMap<Ipv4Addr, &str> = services
        .iter()
        .rev()
        .map(|s| (s.vip, s.name.as_str()))
        .collect();
    for s in &services {
        for b in &s.backends {
            if let Some(owner) = vips.get(&b.address) {
                return Err(format!(
                    "service {:?}: backend {:?}: address {} is the VIP of service {:?} (a backend cannot be a VIP)",
                    s.name, b.name, b.address, owner
                ));
            }
        }
    }

    if raw.route.len() > limits.routes as usize {
        return Err(format!(
            "too many routes: {} are defined, limits.routes is {}",
            raw.route.len(),
            limits.routes
        ));
    }
    let mut routes: Vec<Route> = Vec::with_capacity(raw.route.len());
    for r in &raw.route {
        let route = route(r, &ports)?;
        if routes
            .iter()
            .any(|q| (q.prefix, q.prefix_len) == (route.prefix, route.prefix_len))
        {
            return Err(format!(
                "route \"{}/{}\" is defined twice",
                route.prefix, route.prefix_len
            ));
        }
        routes.push(route);
    }

    if raw.neighbour.len() > limits.neighbours as usize {
        return Err(format!(
            "too many neighbours: {} are defined, limits.neighbours is {}",
            raw.neighbour.len(),
            limits.neighbours
        ));
    }
    let mut neighbours: Vec<Neighbour> = Vec::with_capacity(raw.neighbour.len());
    for n in &raw.neighbour {
        let neigh = neighbour(n, &ports)?;
        if neighbours.iter().any(|m| m.address == neigh.address) {
            return Err(format!("neighbour {:?} is defined twice", n.address));
        }
        if let Some(owner) = vips.get(&neigh.address) {
            return Err(format!(
                "neighbour {:?} is the VIP of service {owner:?} (switchd answers ARP for VIPs; a neighbour entry would send the VIP's traffic away)",
                n.address
            ));
        }
        neighbours.push(neigh);
    }

    Ok(Config {
        instance: raw.instance,
        limits,
        timeouts,
        publish,
        tunnel,
        routing,
        admin,
        agents,
        records,
        ports,
        switches,
        services,
        routes,
        neighbours,
        l7,
    })
}

fn limits(raw: &RawLimits) -> R<Limits> {
    let d = Limits::default();
    let ctx = "limits: ";
    let services = int(ctx, "services", raw.services, d.services, 1, 4096)?;
    let backends = int(ctx, "backends", raw.backends, d.backends, 1, 65535)?;
    let connections = int(
        ctx,
        "connections",
        raw.connections,
        d.connections,
        1024,
        1 << 26,
    )?;
    if !connections.is_power_of_two() {
        return Err(format!(
            "{ctx}connections {connections} is not a power of two (e.g. {})",
            connections.next_power_of_two()
        ));
    }
    let routes = int(ctx, "routes", raw.routes, d.routes, 1, 65535)?;
    let neighbours = int(ctx, "neighbours", raw.neighbours, d.neighbours, 1, 65535)?;
    let maglev_table_size = int(
        ctx,
        "maglev_table_size",
        raw.maglev_table_size,
        d.maglev_table_size,
        MIN_MAGLEV_TABLE_SIZE as i64,
        DEFAULT_MAGLEV_TABLE_SIZE as i64,
    )?;
    if !is_prime(maglev_table_size) {
        let below = (MIN_MAGLEV_TABLE_SIZE..maglev_table_size)
            .rev()
            .find(|&n| is_prime(n));
        let above = (maglev_table_size..=DEFAULT_MAGLEV_TABLE_SIZE).find(|&n| is_prime(n));
        let near: Vec<String> = below
            .into_iter()
            .chain(above)
            .map(|n| n.to_string())
            .collect();
        return Err(format!(
            "{ctx}maglev_table_size {maglev_table_size} is not prime (nearest primes: {})",
            near.join(", ")
        ));
    }
    let (syn_proxy_auto_syn_rate, syn_proxy_auto_occupancy) = syn_proxy_limits(raw)?;
    Ok(Limits {
        services,
        backends,
        connections,
        routes,
        neighbours,
        maglev_table_size,
        syn_proxy_auto_syn_rate,
        syn_proxy_auto_occupancy,
    })
}

/// `[limits]`' thresholds of `syn_proxy = "auto"`.
fn syn_proxy_limits(raw: &RawLimits) -> R<(u32, u32)> {
    let ctx = "limits: ";
    let rate = int(
        ctx,
        "syn_proxy_auto_syn_rate",
        raw.syn_proxy_auto_syn_rate,
        super::DEFAULT_SYN_PROXY_AUTO_SYN_RATE,
        0,
        100_000_000,
    )?;
    let occupancy = int(
        ctx,
        "syn_proxy_auto_occupancy",
        raw.syn_proxy_auto_occupancy,
        super::DEFAULT_SYN_PROXY_AUTO_OCCUPANCY,
        0,
        100,
    )?;
    Ok((rate, occupancy))
}

/// A service's `syn_proxy`: only for TCP services in mode `"nat"` (the
/// proxy splices two connections whose every segment passes the switch).
fn syn_proxy(ctx: &str, raw: Option<&RawSynProxy>, protocol: Protocol, mode: Mode) -> R<SynProxy> {
    let v = match raw {
        None | Some(RawSynProxy::Bool(false)) => return Ok(SynProxy::Off),
        Some(RawSynProxy::Bool(true)) => SynProxy::On,
        Some(RawSynProxy::Word(w)) if w == "auto" => SynProxy::Auto,
        Some(RawSynProxy::Word(w)) => {
            return Err(format!(
                "{ctx}syn_proxy {w:?} is not supported (supported: true, false, \"auto\")"
            ));
        }
    };
    if protocol != Protocol::Tcp {
        return Err(format!(
            "{ctx}syn_proxy needs protocol \"tcp\" (SYN cookies answer TCP handshakes; this service is {:?})",
            protocol.as_str()
        ));
    }
    if mode != Mode::Nat {
        return Err(format!(
            "{ctx}syn_proxy needs mode \"nat\" (the switch must see the backend's replies to splice the two connections; mode {:?} sends them past it)",
            mode.as_str()
        ));
    }
    Ok(v)
}

fn timeouts(raw: &RawTimeouts) -> R<Timeouts> {
    let d = Timeouts::default();
    let ctx = "timeouts: ";
    let max = MAX_TIMEOUT as i64;
    Ok(Timeouts {
        tcp_syn: int(ctx, "tcp_syn", raw.tcp_syn, d.tcp_syn, 1, max)?,
        tcp_established: int(
            ctx,
            "tcp_established",
            raw.tcp_established,
            d.tcp_established,
            1,
            max,
        )?,
        tcp_fin: int(ctx, "tcp_fin", raw.tcp_fin, d.tcp_fin, 1, max)?,
        udp: int(ctx, "udp", raw.udp, d.udp, 1, max)?,
        tcp_provisional: int(
            ctx,
            "tcp_provisional",
            raw.tcp_provisional,
            d.tcp_provisional,
            2,
            max,
        )?,
    })
}

fn publish(raw: &RawPublish) -> R<Publish> {
    let d = Publish::default();
    Ok(Publish {
        ack_timeout_ms: int(
            "publish: ",
            "ack_timeout_ms",
            raw.ack_timeout_ms,
            d.ack_timeout_ms,
            10,
            60000,
        )?,
    })
}

fn routing(raw: &RawRouting, ports: &[Port]) -> R<Routing> {
    let afpacket = ports.iter().any(|p| p.driver == Driver::Afpacket);
    let mirror = raw.mirror.unwrap_or(afpacket);
    if mirror && !afpacket {
        return Err(
            "routing: mirror true needs a [[port]] with driver \"afpacket\" (the mirror reads the kernel's routes and neighbours of afpacket interfaces; vnic ports use [[route]] and [[neighbour]])"
                .into(),
        );
    }
    let resolve = raw.resolve.unwrap_or(mirror);
    if resolve && !mirror {
        return Err(
            "routing: resolve true needs mirror true (resolved neighbours reach the switches through the mirror)"
                .into(),
        );
    }
    Ok(Routing { mirror, resolve })
}

fn records(raw: &super::raw::RawRecords) -> R<Records> {
    let ctx = "records: ";
    let d = Records::default();
    let range = |key: &str, v: Option<i64>, default: u32, max: u32| -> R<u32> {
        match v {
            None => Ok(default),
            Some(v) if (1..=i64::from(max)).contains(&v) => Ok(v as u32),
            Some(v) => Err(format!("{ctx}{key} {v} is not between 1 and {max}")),
        }
    };
    let log = match &raw.log {
        None => None,
        Some(p) if p.starts_with('/') && !p.ends_with('/') && !p.contains('\0') => {
            Some(PathBuf::from(p))
        }
        Some(p) => {
            return Err(format!(
                "{ctx}log {p:?} is not an absolute file path (expected like /var/log/switchyard/flows.jsonl)"
            ));
        }
    };
    Ok(Records {
        batch: range("batch", raw.batch, d.batch, MAX_RECORD_BATCH)?,
        batch_ms: range("batch_ms", raw.batch_ms, d.batch_ms, MAX_RECORD_BATCH_MS)?,
        log,
    })
}

fn admin(raw: &RawAdmin) -> R<Admin> {
    let ctx = "admin: ";
    let socket = match &raw.socket {
        None => None,
        Some(p) => {
            if !p.starts_with('/') || p.ends_with('/') || p.contains('\0') {
                return Err(format!(
                    "{ctx}socket {p:?} is not an absolute file path (expected like /run/switchyard/NAME.sock)"
                ));
            }
            if p.len() > MAX_SOCKET_PATH {
                return Err(format!(
                    "{ctx}socket {p:?} is {} bytes long, a Unix socket path holds at most {MAX_SOCKET_PATH}",
                    p.len()
                ));
            }
            Some(PathBuf::from(p))
        }
    };
    let metrics = match &raw.metrics {
        None => None,
        Some(m) => {
            let a: SocketAddr = m.parse().map_err(|_| {
                format!(
                    "{ctx}metrics {m:?} is not an address and port (expected like 127.0.0.1:9100 or [::1]:9100)"
                )
            })?;
            if a.port() == 0 {
                return Err(format!(
                    "{ctx}metrics {m:?} has port 0 (a fixed port 1..=65535 is required)"
                ));
            }
            Some(a)
        }
    };
    Ok(Admin { socket, metrics })
}

fn port(raw: &RawPort) -> R<Port> {
    check_name("port", &raw.name, 15)?;
    let ctx = format!("port {:?}: ", raw.name);
    let driver = match raw.driver.as_str() {
        "vnic" => Driver::Vnic,
        "afpacket" => Driver::Afpacket,
        other => {
            return Err(format!(
                "{ctx}driver {other:?} is unknown (supported: vnic, afpacket)"
            ));
        }
    };
    let mac = match (&raw.mac, driver) {
        (Some(_), Driver::Afpacket) => {
            return Err(format!(
                "{ctx}mac is not set for driver \"afpacket\" (the interface's own MAC is used)"
            ));
        }
        (Some(m), _) => mac(&ctx, m)?,
        (None, Driver::Vnic) => return Err(format!("{ctx}mac is required for driver \"vnic\"")),
        (None, Driver::Afpacket) => [0; 6],
    };
    let interface = match (&raw.interface, driver) {
        (Some(i), Driver::Afpacket) => {
            if i.is_empty() || i.len() > 15 || i.contains('/') || i.contains(char::is_whitespace) {
                return Err(format!(
                    "{ctx}interface {i:?} is not an interface name (1 to 15 characters, no '/' or spaces)"
                ));
            }
            if i == "lo" {
                return Err(format!(
                    "{ctx}interface \"lo\" is the loopback interface: it has no MAC and no wire (use a real or veth interface, or driver \"vnic\")"
                ));
            }
            Some(i.clone())
        }
        (None, Driver::Afpacket) => {
            return Err(format!(
                "{ctx}interface is required for driver \"afpacket\""
            ));
        }
        (Some(_), Driver::Vnic) => {
            return Err(format!("{ctx}interface is only for driver \"afpacket\""));
        }
        (None, Driver::Vnic) => None,
    };
    let ring_size = int(
        &ctx,
        "ring_size",
        raw.ring_size,
        DEFAULT_RING_SIZE,
        64,
        32768,
    )?;
    if !ring_size.is_power_of_two() {
        return Err(format!(
            "{ctx}ring_size {ring_size} is not a power of two (e.g. {})",
            ring_size.next_power_of_two()
        ));
    }
    let mtu = match (raw.mtu, driver) {
        (Some(_), Driver::Afpacket) => {
            return Err(format!(
                "{ctx}mtu is not set for driver \"afpacket\" (the interface's own MTU is used)"
            ));
        }
        (m, _) => int(&ctx, "mtu", m, DEFAULT_MTU, 576, 9000)?,
    };
    Ok(Port {
        name: raw.name.clone(),
        driver,
        mac,
        ring_size,
        interface,
        promiscuous: raw.promiscuous.unwrap_or(true),
        mtu,
    })
}

fn switch(raw: &RawSwitch, ports: &[Port]) -> R<Switch> {
    check_name("switch", &raw.name, 32)?;
    let ctx = format!("switch {:?}: ", raw.name);
    let cpu = int(&ctx, "cpu", Some(raw.cpu), 0, 0, 1023)?;
    if raw.ports.is_empty() {
        return Err(format!(
            "{ctx}ports is empty (at least one port is required)"
        ));
    }
    let mut indexes = Vec::with_capacity(raw.ports.len());
    for (i, name) in raw.ports.iter().enumerate() {
        if raw.ports[..i].contains(name) {
            return Err(format!("{ctx}port {name:?} is listed twice"));
        }
        indexes.push(port_ref(&ctx, name, ports)?);
    }
    if let Some(&first) = indexes.first()
        && let Some(&other) = indexes
            .iter()
            .find(|&&i| ports[i].driver != ports[first].driver)
    {
        return Err(format!(
            "{ctx}ports {:?} and {:?} use different drivers (one switch drives one kind of NIC)",
            ports[first].name, ports[other].name
        ));
    }
    let idle = match raw.idle.as_deref() {
        None | Some("adaptive") => Idle::Adaptive,
        Some("busy") => Idle::Busy,
        Some(other) => {
            return Err(format!(
                "{ctx}idle {other:?} is not supported (supported: busy, adaptive)"
            ));
        }
    };
    let engine = match raw.engine.as_deref() {
        None | Some("filter") => Engine::Filter,
        Some("null") => Engine::Null,
        Some(other) => {
            return Err(format!(
                "{ctx}engine {other:?} is not supported (supported: filter, null)"
            ));
        }
    };
    let flow_cache: u32 = int(
        &ctx,
        "flow_cache",
        raw.flow_cache,
        DEFAULT_FLOW_CACHE,
        0,
        MAX_FLOW_CACHE as i64,
    )?;
    if flow_cache != 0 && !flow_cache.is_power_of_two() {
        return Err(format!(
            "{ctx}flow_cache {flow_cache} is not a power of two (0 disables the cache)"
        ));
    }
    Ok(Switch {
        name: raw.name.clone(),
        cpu,
        ports: indexes,
        port_names: raw.ports.clone(),
        idle,
        burst: int(&ctx, "burst", raw.burst, DEFAULT_BURST, 1, 256)?,
        engine,
        syn_queue: int(&ctx, "syn_queue", raw.syn_queue, DEFAULT_SYN_QUEUE, 0, 4096)?,
        flow_cache,
    })
}

fn service(raw: &RawService, limits: &Limits) -> R<Service> {
    check_name("service", &raw.name, 32)?;
    let ctx = format!("service {:?}: ", raw.name);
    let vip = unicast(&ctx, "vip", &raw.vip)?;
    let port: u16 = int(&ctx, "port", Some(raw.port), 0, 1, 65535)?;
    let protocol = match raw.protocol.as_str() {
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        other => {
            return Err(format!(
                "{ctx}protocol {other:?} is not supported (supported: tcp, udp)"
            ));
        }
    };
    let mode = match raw.mode.as_deref() {
        None | Some("nat") => Mode::Nat,
        Some("dr") => Mode::Dr,
        Some("tunnel") => Mode::Tunnel,
        Some("l7") => Mode::L7,
        Some(other) => {
            return Err(format!(
                "{ctx}mode {other:?} is not supported (supported: nat, dr, tunnel, l7)"
            ));
        }
    };
    let scheduler = match raw.scheduler.as_deref() {
        None | Some("maglev") => Scheduler::Maglev,
        Some("wrr") => Scheduler::Wrr,
        Some("wlc") => Scheduler::Wlc,
        Some("sh") => Scheduler::Sh,
        Some(other) => {
            return Err(format!(
                "{ctx}scheduler {other:?} is not supported (supported: maglev, wrr, wlc, sh)"
            ));
        }
    };
    let queue_timeout_ms = int(
        &ctx,
        "queue_timeout_ms",
        raw.queue_timeout_ms,
        DEFAULT_QUEUE_TIMEOUT_MS,
        0,
        60000,
    )?;
    if raw.backend.len() > limits.maglev_table_size as usize {
        return Err(format!(
            "{ctx}{} backends exceed limits.maglev_table_size {} (each backend needs table entries)",
            raw.backend.len(),
            limits.maglev_table_size
        ));
    }
    health::check_service(&ctx, raw.health.as_ref())?;
    let on_backend_down = health::on_down(&ctx, raw.on_backend_down.as_deref())?;
    let mut backends: Vec<Backend> = Vec::with_capacity(raw.backend.len());
    for b in &raw.backend {
        let be = backend(&ctx, b, port, mode, raw.health.as_ref())?;
        if backends.iter().any(|c| c.name == be.name) {
            return Err(format!("{ctx}backend {:?} is defined twice", be.name));
        }
        if let Some(c) = backends
            .iter()
            .find(|c| (c.address, c.port) == (be.address, be.port))
        {
            return Err(format!(
                "{ctx}backend {:?}: {}:{} is already used by backend {:?}",
                be.name, be.address, be.port, c.name
            ));
        }
        backends.push(be);
    }
    let l7 = super::l7::service(&ctx, raw, mode, protocol, &backends)?;
    let loading = loading(&ctx, raw, mode, &backends)?;
    let syn_proxy = syn_proxy(&ctx, raw.syn_proxy.as_ref(), protocol, mode)?;
    Ok(Service {
        syn_proxy,
        name: raw.name.clone(),
        vip,
        port,
        protocol,
        mode,
        scheduler,
        on_backend_down,
        queue_timeout_ms,
        loading,
        backends,
        l7,
    })
}

/// `latency_target_ms`, `adjust_interval_ms` and `min_conns` of a service.
fn loading(ctx: &str, raw: &RawService, mode: Mode, backends: &[Backend]) -> R<Option<Loading>> {
    let Some(target) = raw.latency_target_ms else {
        for (key, v) in [
            ("adjust_interval_ms", raw.adjust_interval_ms),
            ("min_conns", raw.min_conns),
        ] {
            if v.is_some() {
                return Err(format!(
                    "{ctx}{key} needs latency_target_ms (it tunes controlled server loading)"
                ));
            }
        }
        return Ok(None);
    };
    let latency_target_ms = int(ctx, "latency_target_ms", Some(target), 0, 1, 60000)?;
    if mode != Mode::Nat {
        return Err(format!(
            "{ctx}latency_target_ms needs mode \"nat\" (mode {:?}: backends reply around the switches, which then never see the SYN-ACKs they measure)",
            mode.as_str()
        ));
    }
    if !backends.iter().any(|b| b.max_conns > 0) {
        return Err(format!(
            "{ctx}latency_target_ms needs max_conns on at least one backend (the adaptive limit lies between min_conns and max_conns)"
        ));
    }
    Ok(Some(Loading {
        latency_target_ms,
        interval_ms: int(
            ctx,
            "adjust_interval_ms",
            raw.adjust_interval_ms,
            DEFAULT_ADJUST_INTERVAL_MS,
            100,
            60000,
        )?,
        min_conns: int(ctx, "min_conns", raw.min_conns, 1, 1, MAX_MAX_CONNS as i64)?,
    }))
}

fn backend(
    service_ctx: &str,
    raw: &RawBackend,
    service_port: u16,
    mode: Mode,
    service_health: Option<&RawHealth>,
) -> R<Backend> {
    check_name(&format!("{service_ctx}backend"), &raw.name, 32)?;
    let ctx = format!("{service_ctx}backend {:?}: ", raw.name);
    let address = unicast(&ctx, "address", &raw.address)?;
    let port: u16 = int(&ctx, "port", raw.port, service_port, 1, 65535)?;
    if port != service_port && !matches!(mode, Mode::Nat | Mode::L7) {
        return Err(format!(
            "{ctx}port {port} differs from the service port {service_port} (mode {:?} cannot change ports)",
            mode.as_str()
        ));
    }
    Ok(Backend {
        name: raw.name.clone(),
        address,
        port,
        weight: int(
            &ctx,
            "weight",
            raw.weight,
            DEFAULT_WEIGHT,
            0,
            MAX_WEIGHT as i64,
        )?,
        max_conns: int(&ctx, "max_conns", raw.max_conns, 0, 0, MAX_MAX_CONNS as i64)?,
        health: health::backend_check(&ctx, service_health, raw.health.as_ref(), address, port)?,
    })
}

fn route(raw: &RawRoute, ports: &[Port]) -> R<Route> {
    let ctx = format!("route {:?}: ", raw.prefix);
    let bad = || {
        format!(
            "{ctx}prefix {:?} is not an IPv4 prefix (expected an address and a length 0..=32 like 198.19.0.0/16)",
            raw.prefix
        )
    };
    let (addr, len) = raw.prefix.split_once('/').ok_or_else(bad)?;
    let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
    if len.is_empty() || len.len() > 2 || !len.bytes().all(|c| c.is_ascii_digit()) {
        return Err(bad());
    }
    let prefix_len: u8 = len.parse().map_err(|_| bad())?;
    if prefix_len > 32 {
        return Err(bad());
    }
    let mask = u32::MAX
        .checked_shl(32 - u32::from(prefix_len))
        .unwrap_or(0);
    let network = Ipv4Addr::from(u32::from(addr) & mask);
    if network != addr {
        return Err(format!(
            "{ctx}host bits are set (the prefix of {addr} with length {prefix_len} is {network}/{prefix_len})"
        ));
    }
    let port = port_ref(&ctx, &raw.port, ports)?;
    let via = match &raw.via {
        None => None,
        Some(v) => Some(unicast(&ctx, "via", v)?),
    };
    Ok(Route {
        prefix: addr,
        prefix_len,
        port,
        port_name: raw.port.clone(),
        via,
    })
}

fn neighbour(raw: &RawNeighbour, ports: &[Port]) -> R<Neighbour> {
    let ctx = format!("neighbour {:?}: ", raw.address);
    Ok(Neighbour {
        address: unicast(&ctx, "address", &raw.address)?,
        mac: mac(&ctx, &raw.mac)?,
        port: port_ref(&ctx, &raw.port, ports)?,
        port_name: raw.port.clone(),
    })
}

/// An integer key: `value` (or `default` when absent) must lie in `lo..=hi`.
pub(super) fn int<T>(ctx: &str, key: &str, value: Option<i64>, default: T, lo: i64, hi: i64) -> R<T>
where
    T: TryFrom<i64>,
{
    let Some(v) = value else {
        return Ok(default);
    };
    if v < lo {
        return Err(format!("{ctx}{key} {v} is less than {lo}"));
    }
    if v > hi {
        return Err(format!("{ctx}{key} {v} exceeds {hi}"));
    }
    T::try_from(v).map_err(|_| format!("{ctx}{key} {v} is out of range"))
}

/// A name: 1 to `max` characters from `A-Z a-z 0-9 _ -`.
pub(super) fn check_name(what: &str, name: &str, max: usize) -> R<()> {
    let ok = !name.is_empty()
        && name.len() <= max
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{what} name {name:?} is not valid (expected 1 to {max} characters from A-Z a-z 0-9 _ -)"
        ))
    }
}

/// A reference to a port by name, resolved to its index.
fn port_ref(ctx: &str, name: &str, ports: &[Port]) -> R<usize> {
    ports.iter().position(|p| p.name == name).ok_or_else(|| {
        let defined: Vec<&str> = ports.iter().map(|p| p.name.as_str()).collect();
        format!(
            "{ctx}port {name:?} is not defined (defined ports: {})",
            defined.join(", ")
        )
    })
}

/// A unicast IPv4 host address.
pub(super) fn unicast(ctx: &str, key: &str, text: &str) -> R<Ipv4Addr> {
    let a: Ipv4Addr = text.parse().map_err(|_| {
        format!("{ctx}{key} {text:?} is not an IPv4 address (expected like 198.18.0.10)")
    })?;
    if a.is_unspecified() || a.is_broadcast() || a.is_multicast() {
        return Err(format!(
            "{ctx}{key} {a} is not a unicast address (0.0.0.0, 255.255.255.255 and 224.0.0.0/4 are not allowed)"
        ));
    }
    Ok(a)
}

/// A unicast, non-zero MAC address written as six `:`-separated hex octets.
fn mac(ctx: &str, text: &str) -> R<[u8; 6]> {
    let bad = || {
        format!(
            "{ctx}mac {text:?} is not a MAC address (expected six hex octets like 02:00:00:00:00:01)"
        )
    };
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in mac.iter_mut() {
        let p = parts.next().ok_or_else(bad)?;
        if p.len() != 2 || !p.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(bad());
        }
        *byte = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() {
        return Err(bad());
    }
    if mac == [0; 6] {
        return Err(format!(
            "{ctx}mac {text:?} is the all-zero address (a unicast MAC is required)"
        ));
    }
    if mac[0] & 1 != 0 {
        return Err(format!(
            "{ctx}mac {text:?} is a multicast address (the low bit of the first octet is set; a unicast MAC is required)"
        ));
    }
    Ok(mac)
}

fn is_prime(n: u32) -> bool {
    crate::maglev::is_prime(n as usize)
}
