//! The configuration file (TOML): schema, parsing and validation. Pure: only
//! [`load`] touches the file system.
//!
//! [`parse`] reads the text with serde into raw tables that deny unknown
//! keys (toml's message then names the key and its line), and `validate`
//! turns them into a typed [`Config`] or the first rule broken. Every error
//! names the thing, the value and the rule, e.g.
//! `service "web": backend "web3": weight 70000 exceeds 65535`.
//!
//! The keys, their defaults and their rules are documented on the typed
//! fields below; `packaging/examples/demo.toml` is a complete file.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

mod agents;
pub mod file;
mod health;
mod l7;
mod raw;
mod validate;
mod warnings;

pub use agents::{
    Agents, DEFAULT_FLOOR_PERCENT, DEFAULT_MAX_SKEW_MS, DEFAULT_SILENT_MS, DEFAULT_STEP_PERCENT,
    Secret,
};
pub use health::{HealthCheck, OnDown, Probe};
pub use l7::{
    DEFAULT_HEAD_LIMIT, DEFAULT_HEAD_TIMEOUT_MS, DEFAULT_POOL, HeaderMatch, HostMatch, L7,
    L7Service, MAX_HEAD_LIMIT, MIN_HEAD_LIMIT, Pool, PoolScheduler, REFUSED_METHODS, Rule,
};
pub use warnings::Warning;

#[cfg(test)]
mod l7_tests;
#[cfg(test)]
mod tests;

/// Default of `limits.services`.
pub const DEFAULT_SERVICES: u32 = 16;
/// Default of `limits.backends`.
pub const DEFAULT_BACKENDS: u32 = 1024;
/// Default of `limits.connections`.
pub const DEFAULT_CONNECTIONS: u32 = 1 << 20;
/// Default of `limits.routes`.
pub const DEFAULT_ROUTES: u32 = 256;
/// Default of `limits.neighbours`.
pub const DEFAULT_NEIGHBOURS: u32 = 256;
/// Default and largest `limits.maglev_table_size`.
pub const DEFAULT_MAGLEV_TABLE_SIZE: u32 = 65537;
/// Smallest `limits.maglev_table_size`.
pub const MIN_MAGLEV_TABLE_SIZE: u32 = 251;
/// Largest timeout in seconds (a week; the region keeps milliseconds in a `u32`).
pub const MAX_TIMEOUT: u32 = 7 * 24 * 3600;
/// Default of `[[port]] ring_size`.
pub const DEFAULT_RING_SIZE: u32 = 1024;
/// Default of `[[switch]] burst`.
pub const DEFAULT_BURST: u32 = 32;
/// Default of `[[service.backend]] weight`.
pub const DEFAULT_WEIGHT: u32 = 1;
/// Largest backend weight.
pub const MAX_WEIGHT: u32 = 65535;
const _: () = assert!(MAX_WEIGHT == admin_proto::MAX_WEIGHT);
/// Largest `[[service.backend]] max_conns`.
pub const MAX_MAX_CONNS: u32 = 1 << 30;
/// Default of `[[service]] queue_timeout_ms`.
pub const DEFAULT_QUEUE_TIMEOUT_MS: u32 = 1000;
/// Default of `[[service]] adjust_interval_ms`.
pub const DEFAULT_ADJUST_INTERVAL_MS: u32 = 1000;
/// Default of `[[switch]] syn_queue`.
pub const DEFAULT_SYN_QUEUE: u32 = 256;
/// Default of `[[switch]] flow_cache` (entries of 64 bytes: 4 MiB).
pub const DEFAULT_FLOW_CACHE: u32 = 1 << 16;
/// Largest `[[switch]] flow_cache` (256 MiB).
pub const MAX_FLOW_CACHE: u32 = 1 << 22;
/// Ports a configuration may define (the size of the region's port table).
pub const MAX_PORTS: usize = shm_layout::config_slot::MAX_PORTS;

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read: missing, not a regular file (a FIFO, a
    /// device), or larger than [`file::MAX_CONFIG_BYTES`].
    #[error(transparent)]
    Read(#[from] file::FileError),
    /// The file is not UTF-8 text.
    #[error("{}: is not UTF-8 text (byte {valid_up_to})", path.display())]
    NotText { path: PathBuf, valid_up_to: usize },
    /// The text is not TOML or does not fit the schema (unknown key, missing
    /// key, wrong type). toml's message names the key and its line.
    #[error("{}", .0.to_string().trim_end())]
    Syntax(#[from] toml::de::Error),
    /// A key of more dotted parts than the TOML parser allows (toml says
    /// only "recursion limit", without a line).
    #[error(
        "line {line}: key of {parts} dotted parts is nested too deep (the TOML parser allows at most {})",
        raw::MAX_KEY_PARTS
    )]
    TooDeep { line: usize, parts: usize },
    /// A value breaks a rule; the message names the thing, the value and the rule.
    #[error("{0}")]
    Invalid(String),
    /// An error in the file `path` (what [`load`] returns).
    #[error("{}: {source}", path.display())]
    File {
        path: PathBuf,
        #[source]
        source: Box<ConfigError>,
    },
}

/// A validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// `instance` (required): names this appliance instance, 1 to 32
    /// characters from `A-Z a-z 0-9 _ -`. Its region is
    /// `/dev/shm/switchyard.<instance>`.
    pub instance: String,
    /// `[limits]`.
    pub limits: Limits,
    /// `[timeouts]`.
    pub timeouts: Timeouts,
    /// `[publish]`.
    pub publish: Publish,
    /// `[tunnel]`.
    pub tunnel: Tunnel,
    /// `[routing]`.
    pub routing: Routing,
    /// `[admin]`.
    pub admin: Admin,
    /// `[agents]`; `None` (no table): no load agents.
    pub agents: Option<Agents>,
    /// `[records]`.
    pub records: Records,
    /// `[[port]]`, in file order; other items refer to a port by its index here.
    /// At least one, at most [`MAX_PORTS`].
    pub ports: Vec<Port>,
    /// `[[switch]]`, in file order; at least one.
    pub switches: Vec<Switch>,
    /// `[[service]]`, in file order; at least one, at most `limits.services`.
    pub services: Vec<Service>,
    /// `[[route]]`, in file order; at most `limits.routes`.
    pub routes: Vec<Route>,
    /// `[[neighbour]]`, in file order; at most `limits.neighbours`.
    pub neighbours: Vec<Neighbour>,
    /// `[l7]`.
    pub l7: L7,
}

/// `[limits]`: capacities fixed when the region is created; a reload may
/// not change them. Every key is optional.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// `services` (default 16): most services, `1..=4096`.
    pub services: u32,
    /// `backends` (default 1024): most backends over all services, `1..=65535`.
    pub backends: u32,
    /// `connections` (default 1048576): connections the table is sized
    /// for, a power of two in `1024..=2^26`. The region gets four 64-byte
    /// slots per connection (a NAT connection uses two, at most half full).
    pub connections: u32,
    /// `routes` (default 256): most routes, `1..=65535`.
    pub routes: u32,
    /// `neighbours` (default 256): most neighbours, `1..=65535`.
    pub neighbours: u32,
    /// `maglev_table_size` (default 65537): entries of each service's Maglev
    /// table; a prime in `251..=65537`. A service may have at most this many
    /// backends (for an even spread it should be at least 100 times the
    /// number of backends of the largest service).
    pub maglev_table_size: u32,
    /// `syn_proxy_auto_syn_rate` (default 20000, `0..=100000000`): a
    /// service with `syn_proxy = "auto"` is SYN-proxied while a switch sees
    /// more SYNs per second than this to such services; 0: never by rate.
    pub syn_proxy_auto_syn_rate: u32,
    /// `syn_proxy_auto_occupancy` (default 50, `0..=100`): ... or while the
    /// connection table holds more than this percent of
    /// `connections` (as a switch samples it); 0: never by occupancy.
    pub syn_proxy_auto_occupancy: u32,
}

/// Default of `limits.syn_proxy_auto_syn_rate`.
pub const DEFAULT_SYN_PROXY_AUTO_SYN_RATE: u32 = 20_000;
/// Default of `limits.syn_proxy_auto_occupancy`.
pub const DEFAULT_SYN_PROXY_AUTO_OCCUPANCY: u32 = 50;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            services: DEFAULT_SERVICES,
            backends: DEFAULT_BACKENDS,
            connections: DEFAULT_CONNECTIONS,
            routes: DEFAULT_ROUTES,
            neighbours: DEFAULT_NEIGHBOURS,
            maglev_table_size: DEFAULT_MAGLEV_TABLE_SIZE,
            syn_proxy_auto_syn_rate: DEFAULT_SYN_PROXY_AUTO_SYN_RATE,
            syn_proxy_auto_occupancy: DEFAULT_SYN_PROXY_AUTO_OCCUPANCY,
        }
    }
}

/// `[timeouts]`: idle timeouts of connection-table entries, in seconds,
/// each in `1..=604800` (a week). Every key is optional.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timeouts {
    /// `tcp_syn` (default 10): a TCP connection whose handshake has not completed.
    pub tcp_syn: u32,
    /// `tcp_established` (default 900): an established TCP connection.
    pub tcp_established: u32,
    /// `tcp_fin` (default 30): a TCP connection after a FIN or RST.
    pub tcp_fin: u32,
    /// `udp` (default 60): a UDP flow.
    pub udp: u32,
    /// `tcp_provisional` (default 3, at least 2): a TCP connection picked
    /// up from a mid-connection packet and not yet confirmed (a reply from
    /// the backend in NAT; a client packet at least 1 s later in DR and
    /// tunnel mode). Short, so a flood of spoofed segments cannot hold the
    /// table; at least 2 s, so a DR/tunnel flow can confirm itself.
    pub tcp_provisional: u32,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            tcp_syn: 10,
            tcp_established: 900,
            tcp_fin: 30,
            udp: 60,
            tcp_provisional: 3,
        }
    }
}

/// `[publish]`: how configuration generations are handed to the switches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    /// `ack_timeout_ms` (default 500): how long the publisher waits for the
    /// switches to acknowledge a generation before it excludes a stalled
    /// one, `10..=60000`.
    pub ack_timeout_ms: u32,
}

impl Default for Publish {
    fn default() -> Self {
        Publish {
            ack_timeout_ms: 500,
        }
    }
}

/// `[tunnel]`: IP-in-IP encapsulation (services with mode `"tunnel"`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tunnel {
    /// `source` (required when a service uses mode `"tunnel"`): the outer
    /// source address of encapsulated packets, a unicast IPv4 address of the
    /// appliance that the backends accept tunnelled packets from; not a VIP.
    pub source: Option<Ipv4Addr>,
}

/// Longest `[admin] socket` path (a Unix socket address holds 107 bytes and a NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// `[admin]`: the operator's interfaces (lbctl's socket, Prometheus
/// metrics). Fixed at start: a reload may not change them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Admin {
    /// `socket` (default: `/run/switchyard/<instance>.sock` for root, see
    /// [`crate::admin::default_socket_path`]): the Unix socket lbctl talks
    /// to; an absolute path of at most 107 bytes. controld creates it with
    /// mode 0600 (its directory, if missing, with 0700), replaces a stale
    /// one and removes it on exit.
    pub socket: Option<PathBuf>,
    /// `metrics` (default: off): `"IP:PORT"` where controld serves the
    /// Prometheus text format at `/metrics` over HTTP; port 1..=65535.
    pub metrics: Option<SocketAddr>,
}

/// Largest `[records] batch`.
pub const MAX_RECORD_BATCH: u32 = shm_layout::records::MAX_BATCH as u32;
/// Largest `[records] batch_ms`.
pub const MAX_RECORD_BATCH_MS: u32 = 60_000;

/// `[records]`: closed-connection records (docs/OPERATIONS.md, "Closed
/// connections"). Fixed at start: a reload may not change them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Records {
    /// `batch` (default 64, `1..=900`): records per message a switch sends
    /// controld.
    pub batch: u32,
    /// `batch_ms` (default 100, `1..=60000`): the longest a record waits
    /// in its switch for its batch to fill.
    pub batch_ms: u32,
    /// `log` (default: none): an absolute file path; controld appends one
    /// JSON line per closed connection, and reopens it on SIGHUP and
    /// `lbctl reopen` (log rotation).
    pub log: Option<PathBuf>,
}

impl Default for Records {
    fn default() -> Self {
        Self {
            batch: 64,
            batch_ms: 100,
            log: None,
        }
    }
}

/// Default of `[[port]] mtu` for vnic ports.
pub const DEFAULT_MTU: u32 = 1500;

/// `[routing]`: where the routing slot's routes and neighbours come from
/// besides `[[route]]` and `[[neighbour]]` (which always apply and take
/// precedence). Every key is optional; a reload may change them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routing {
    /// `mirror` (default: true when any port uses driver `"afpacket"`,
    /// else false): mirror the kernel's IPv4 routes (main table) and
    /// neighbours of controld's network namespace that leave through an
    /// afpacket port's interface, and keep them current. Requires an
    /// afpacket port.
    pub mirror: bool,
    /// `resolve` (default: the value of `mirror`): ask the kernel to
    /// resolve (ARP) next hops that have no known MAC (route gateways and
    /// backends reached through an afpacket port), retrying with back-off,
    /// and refresh stale ones. Requires `mirror`.
    pub resolve: bool,
}

/// `[[port]]`: a NIC port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Port {
    /// `name` (required): unique, 1 to 15 characters from `A-Z a-z 0-9 _ -`.
    pub name: String,
    /// `driver` (required): `"vnic"` or `"afpacket"`.
    pub driver: Driver,
    /// `mac` (required for vnic): the port's address, `"02:00:00:00:00:01"`
    /// style; unique among ports, unicast and not all-zero.
    pub mac: [u8; 6],
    /// `ring_size` (default 1024): descriptors (vnic) or slots (afpacket)
    /// per ring, a power of two in `64..=32768`.
    pub ring_size: u32,
    /// `interface` (required for afpacket, refused for vnic): the Linux
    /// interface, in controld's network namespace. Its own MAC is used.
    pub interface: Option<String>,
    /// `promiscuous` (default true, afpacket): receive frames for any MAC.
    pub promiscuous: bool,
    /// `mtu` (vnic, default 1500, `576..=9000`): the largest IPv4 packet the
    /// port sends; refused for afpacket, whose interface's MTU is used.
    /// Only tunnel mode grows packets, so only it consults the MTU.
    pub mtu: u32,
}

/// `[[port]] driver`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driver {
    /// `"vnic"`: a shared-memory virtual NIC (test bed and benchmarks).
    Vnic,
    /// `"afpacket"`: PACKET_MMAP rings on a real interface.
    Afpacket,
}

/// `[[switch]]`: one switchd process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Switch {
    /// `name` (required): unique, 1 to 32 characters from `A-Z a-z 0-9 _ -`.
    pub name: String,
    /// `cpu` (required): the CPU the switch is pinned to, `0..=1023`; two
    /// switches may not share a CPU.
    pub cpu: usize,
    /// `ports` (required): the ports this switch serves, as indexes into
    /// [`Config::ports`]; at least one, each a defined port, no duplicates.
    pub ports: Vec<usize>,
    /// The same ports by name, as written in the file.
    pub port_names: Vec<String>,
    /// `idle` (default `"adaptive"`): what the switch does when no frame arrives.
    pub idle: Idle,
    /// `burst` (default 32): frames per receive burst, `1..=256`.
    pub burst: u32,
    /// `engine` (default `"filter"`): what the switch does with a frame.
    pub engine: Engine,
    /// `syn_queue` (default 256, `0..=4096`): new connections this switch
    /// holds while every eligible backend of their service is at its
    /// `max_conns` (0: refuse them at once). Each entry keeps a 2 KiB copy.
    pub syn_queue: u32,
    /// `flow_cache` (default 65536; 0 or a power of two up to 4194304):
    /// entries of the switch's private cache of rewrites for packets of
    /// established connections, 64 bytes each (0: every packet takes the
    /// full path).
    pub flow_cache: u32,
}

/// `[[switch]] engine`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// `"filter"`: the load balancer (the packet filter).
    Filter,
    /// `"null"`: hand every received descriptor to the next port's TX ring
    /// untouched; a benchmark ceiling, never for production.
    Null,
}

/// `[[switch]] idle`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Idle {
    /// `"busy"`: poll without pause (lowest latency, a full CPU).
    Busy,
    /// `"adaptive"`: back off to short sleeps while idle.
    Adaptive,
}

/// `[[service]]`: a virtual service (VIP, port, protocol).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    /// `name` (required): unique, 1 to 32 characters from `A-Z a-z 0-9 _ -`.
    pub name: String,
    /// `vip` (required): the virtual IPv4 address; unicast, and not the
    /// address of any backend. `(vip, port, protocol)` is unique over services.
    pub vip: Ipv4Addr,
    /// `port` (required): `1..=65535`.
    pub port: u16,
    /// `protocol` (required): `"tcp"` or `"udp"`.
    pub protocol: Protocol,
    /// `mode` (default `"nat"`): how packets reach a backend.
    pub mode: Mode,
    /// `scheduler` (default `"maglev"`): how a backend is chosen.
    pub scheduler: Scheduler,
    /// `on_backend_down` (default `"reschedule"`): what happens to the
    /// existing connections of a backend its health checks take DOWN.
    pub on_backend_down: OnDown,
    /// `queue_timeout_ms` (default 1000, `0..=60000`): how long a new
    /// connection may wait in a switch's queue while every eligible backend
    /// is at its `max_conns`, before it is refused (TCP: RST); 0 refuses
    /// at once.
    pub queue_timeout_ms: u32,
    /// Controlled server loading (`latency_target_ms` and friends); `None`
    /// without `latency_target_ms`: `max_conns` stay as configured.
    pub loading: Option<Loading>,
    /// `syn_proxy` (default `false`; `true`, `false` or `"auto"`; TCP
    /// services in mode `"nat"` only): the switch answers SYNs with SYN
    /// cookies and opens the backend connection itself once the client's
    /// ACK proves the handshake (docs/ARCHITECTURE.md, "SYN cookies and
    /// the SYN proxy").
    pub syn_proxy: SynProxy,
    /// `[[service.backend]]`, in file order; may be empty (the service then
    /// drops new connections). At most `limits.maglev_table_size`.
    pub backends: Vec<Backend>,
    /// Pools and rules of mode `"l7"` (`None` for every other mode).
    pub l7: Option<L7Service>,
}

/// `[[service]] protocol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// `"tcp"`.
    Tcp,
    /// `"udp"`.
    Udp,
}

impl Protocol {
    /// The IP protocol number (6 or 17).
    pub fn number(&self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
        }
    }

    /// The name used in the file.
    pub fn as_str(&self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// `[[service]] syn_proxy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SynProxy {
    /// `false`: SYNs go to the backend.
    #[default]
    Off,
    /// `true`: every SYN is answered with a cookie.
    On,
    /// `"auto"`: answered with a cookie while the SYN rate or the table's
    /// occupancy is over `[limits]`' thresholds.
    Auto,
}

/// `[[service]] mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `"nat"`: destination address and port are rewritten; replies return
    /// through the switch.
    Nat,
    /// `"dr"`: direct routing, only the MAC changes; backends own the VIP and
    /// reply directly, so a backend cannot listen on another port.
    Dr,
    /// `"tunnel"`: IP-in-IP to the backend, which decapsulates and replies
    /// directly; the inner packet is unchanged, so neither can it change ports.
    Tunnel,
    /// `"l7"`: HTTP/1.x over TCP; the switch completes the client's
    /// handshake, controld routes the request head to a pool by the
    /// service's rules, the switch connects to the backend from
    /// `[l7] source` and splices the two connections. Validated by
    /// `--check`; not run yet (see [`crate::l7`]).
    L7,
}

impl Mode {
    /// The name used in the file.
    pub fn as_str(&self) -> &'static str {
        match self {
            Mode::Nat => "nat",
            Mode::Dr => "dr",
            Mode::Tunnel => "tunnel",
            Mode::L7 => "l7",
        }
    }
}

/// `[[service]] scheduler`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheduler {
    /// `"maglev"`: weighted Maglev consistent hashing (see [`crate::maglev`]).
    Maglev,
    /// `"wrr"`: smooth weighted round robin, per switch.
    Wrr,
    /// `"wlc"`: weighted least connections (shared active counts).
    Wlc,
    /// `"sh"`: source-address hash over the weighted Maglev table.
    Sh,
}

impl Scheduler {
    /// The name used in the file.
    pub fn as_str(&self) -> &'static str {
        match self {
            Scheduler::Maglev => "maglev",
            Scheduler::Wrr => "wrr",
            Scheduler::Wlc => "wlc",
            Scheduler::Sh => "sh",
        }
    }
}

/// Controlled server loading of a service: controld lowers each backend's
/// effective `max_conns` while the SYN to SYN-ACK latency the switches
/// measure exceeds a target, and raises it back while it does not (see
/// [`crate::loading`]). Only for mode `"nat"` (the switches see the
/// SYN-ACKs) and backends with `max_conns` (the ceiling).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Loading {
    /// `latency_target_ms` (`1..=60000`): an interval whose p99 SYN to
    /// SYN-ACK time exceeds this lowers the limit.
    pub latency_target_ms: u32,
    /// `adjust_interval_ms` (default 1000, `100..=60000`): how often each
    /// limit is judged.
    pub interval_ms: u32,
    /// `min_conns` (default 1, `1..=max`): the lowest effective limit (a
    /// backend whose `max_conns` is lower keeps its `max_conns`).
    pub min_conns: u32,
}

/// `[[service.backend]]`: a real server of a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    /// `name` (required): unique within its service, 1 to 32 characters from
    /// `A-Z a-z 0-9 _ -`.
    pub name: String,
    /// `address` (required): unicast IPv4 address, not a VIP. `(address,
    /// port)` is unique within the service.
    pub address: Ipv4Addr,
    /// `port` (default: the service's port): `1..=65535`; with mode `"dr"`
    /// or `"tunnel"` it must equal the service's port (`"nat"` and `"l7"`
    /// may change it).
    pub port: u16,
    /// `weight` (default 1): share of new connections, `0..=65535`; 0 drains
    /// the backend (no new connections, existing ones continue).
    pub weight: u32,
    /// `max_conns` (default 0: unlimited, `0..=2^30`): the most open
    /// connections over all switches; new ones beyond wait in a switch's
    /// queue (or go to another backend, per scheduler).
    pub max_conns: u32,
    /// Its health check (`[service.health]` overridden key by key by
    /// `[service.backend.health]`); `None` (no table, or `kind = "none"`):
    /// never checked, always up.
    pub health: Option<HealthCheck>,
}

/// `[[route]]`: a static route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// `prefix` (required), the address part of a CIDR `"a.b.c.d/len"`; the
    /// host bits must be zero. `(prefix, prefix_len)` is unique over routes.
    pub prefix: Ipv4Addr,
    /// The length part of `prefix`, `0..=32`.
    pub prefix_len: u8,
    /// `port` (required): the egress port, as an index into [`Config::ports`].
    pub port: usize,
    /// The egress port by name, as written in the file.
    pub port_name: String,
    /// `via` (optional): the gateway; absent means the destination is on the link.
    pub via: Option<Ipv4Addr>,
}

/// `[[neighbour]]`: a static neighbour (ARP) entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Neighbour {
    /// `address` (required): IPv4 address, unique over neighbours.
    pub address: Ipv4Addr,
    /// `mac` (required): its MAC address, unicast and not all-zero.
    pub mac: [u8; 6],
    /// `port` (required): the port it is reached on, as an index into [`Config::ports`].
    pub port: usize,
    /// The port by name, as written in the file.
    pub port_name: String,
}

/// A valid configuration and what it probably does not mean (see [`Warning`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Checked {
    pub config: Config,
    pub warnings: Vec<Warning>,
}

/// Parses and validates a configuration text.
pub fn parse(text: &str) -> Result<Config, ConfigError> {
    parse_checked(text).map(|c| c.config)
}

/// Parses and validates a configuration text, and says what in it is
/// valid but probably not meant.
pub fn parse_checked(text: &str) -> Result<Checked, ConfigError> {
    let raw: raw::RawConfig = toml::from_str(text).map_err(|e| raw::locate_too_deep(text, e))?;
    let config = validate::validate(raw).map_err(ConfigError::Invalid)?;
    warnings::check_addresses(&config).map_err(ConfigError::Invalid)?;
    let warnings = warnings::warnings(&config);
    Ok(Checked { config, warnings })
}

/// Reads, parses and validates the file `path`, and reads the files it
/// names (`[agents] secret_file`); the error names the file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    load_checked(path).map(|c| c.config)
}

/// [`load`], with the warnings of [`parse_checked`].
pub fn load_checked(path: &Path) -> Result<Checked, ConfigError> {
    let bytes = file::read_regular(path, file::MAX_CONFIG_BYTES)?;
    let text = String::from_utf8(bytes).map_err(|e| ConfigError::NotText {
        path: path.to_path_buf(),
        valid_up_to: e.utf8_error().valid_up_to(),
    })?;
    let in_file = |e| ConfigError::File {
        path: path.to_path_buf(),
        source: Box::new(e),
    };
    let mut checked = parse_checked(&text).map_err(in_file)?;
    if let Some(a) = checked.config.agents.as_mut() {
        agents::read_secret(a).map_err(|e| in_file(ConfigError::Invalid(e)))?;
    }
    Ok(checked)
}

/// Formats a MAC address as `02:00:00:00:00:01`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    let [a, b, c, d, e, f] = *mac;
    format!("{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{f:02x}")
}
