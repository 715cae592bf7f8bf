//! The admin protocol: one JSON request object per line, one JSON reply
//! object per line. Shared by controld (which parses requests and builds
//! replies) and lbctl (which builds requests and reads replies). Pure.
//!
//! Requests (`cmd` selects; other keys as listed, nothing else allowed):
//!
//! ```text
//! {"cmd":"show"}
//! {"cmd":"stats"}
//! {"cmd":"conns", "vip":"IP", "client":"IP", "backend":"IP"|"SVC/BACKEND", "limit":N}   (all optional)
//! {"cmd":"drain",  "backend":"SVC/BACKEND"}
//! {"cmd":"enable", "backend":"SVC/BACKEND"}
//! {"cmd":"weight", "backend":"SVC/BACKEND", "weight":N|null}   (null: back to the file's weight)
//! {"cmd":"reload"}
//! {"cmd":"flows", "service":"SVC", "backend":"IP"|"SVC/BACKEND", "client":"IP", "limit":N}   (all optional)
//! {"cmd":"reopen"}
//! ```
//!
//! Replies: `{"ok":true,"result":{...}}` with the command's result type
//! below, or `{"ok":false,"error":"..."}` naming the problem.

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::path::PathBuf;

/// Where an instance's socket is when `[admin] socket` is not set:
/// `/run/switchyard/<instance>.sock` for root; for another user
/// `$XDG_RUNTIME_DIR/switchyard/<instance>.sock`, or without that variable
/// `/tmp/switchyard-<uid>/<instance>.sock`. lbctl derives the same path
/// from `--instance`, so both must run as the same user.
pub fn default_socket_path(instance: &str) -> PathBuf {
    // SAFETY: geteuid(2) cannot fail and touches no memory.
    let uid = unsafe { libc::geteuid() };
    let dir = if uid == 0 {
        PathBuf::from("/run/switchyard")
    } else {
        match std::env::var_os("XDG_RUNTIME_DIR") {
            Some(d) if !d.is_empty() => PathBuf::from(d).join("switchyard"),
            _ => PathBuf::from(format!("/tmp/switchyard-{uid}")),
        }
    };
    dir.join(format!("{instance}.sock"))
}

/// Longest request line controld reads (longer ones are refused).
pub const MAX_REQUEST: usize = 64 * 1024;
/// Connections `conns` lists when no `limit` is given.
pub const DEFAULT_CONNS_LIMIT: usize = 100;
/// Largest `conns` `limit`.
pub const MAX_CONNS_LIMIT: usize = 100_000;
/// Largest weight (as in the file: controld's config asserts it is the same).
pub const MAX_WEIGHT: u32 = 65535;

/// The commands, for error messages and lbctl's help.
pub const COMMANDS: &[&str] = &[
    "show", "stats", "conns", "drain", "enable", "weight", "reload", "flows", "reopen",
];

/// Closed connections `flows` lists when no `limit` is given.
pub const DEFAULT_FLOWS_LIMIT: usize = 100;

/// `flows`: which recent closed connections, how many (newest first).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlowsQuery {
    pub service: Option<String>,
    pub backend: Option<BackendSel>,
    pub client: Option<Ipv4Addr>,
    pub limit: usize,
}

impl Default for FlowsQuery {
    fn default() -> Self {
        Self {
            service: None,
            backend: None,
            client: None,
            limit: DEFAULT_FLOWS_LIMIT,
        }
    }
}

/// A backend named `service/backend`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendRef {
    pub service: String,
    pub backend: String,
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 32
        && n.bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-')
}

/// A backend argument that names nothing valid.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error(
        "backend {0:?} is not SERVICE/BACKEND (two names of 1 to 32 characters from A-Z a-z 0-9 _ -, like web/web1)"
    )]
    NotBackend(String),
    #[error("backend {0:?} is neither an IPv4 address nor SERVICE/BACKEND (like web/web1)")]
    NotBackendOrAddress(String),
}

/// Why a request line was refused; the message names the problem and
/// what is accepted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("request is not JSON ({0}); send one object per line, like {{\"cmd\":\"show\"}}")]
    NotJson(String),
    #[error(
        "request {0} is not a JSON object; send one object per line, like {{\"cmd\":\"show\"}}"
    )]
    NotObject(String),
    #[error("cmd {0} is not a string (one of: {commands})", commands = COMMANDS.join(", "))]
    CmdNotString(String),
    #[error("request has the key {0:?} more than once; give each key once")]
    RepeatedKey(String),
    #[error("request has no \"cmd\" (one of: {commands})", commands = COMMANDS.join(", "))]
    NoCmd,
    #[error("unknown command {0:?} (one of: {commands})", commands = COMMANDS.join(", "))]
    UnknownCommand(String),
    #[error("{cmd}: unknown key {key:?} ({})", if allowed.is_empty() {
        format!("{cmd} takes no arguments")
    } else {
        format!("accepted: {}", allowed.join(", "))
    })]
    UnknownKey {
        cmd: String,
        key: String,
        allowed: &'static [&'static str],
    },
    #[error("{cmd}: {key} {value} is not a string")]
    NotString {
        cmd: String,
        key: &'static str,
        value: String,
    },
    #[error("{cmd}: {key} {value:?} is not an IPv4 address (like 198.18.0.10)")]
    NotIpv4 {
        cmd: String,
        key: &'static str,
        value: String,
    },
    #[error("{cmd}: {error}")]
    Name { cmd: String, error: NameError },
    #[error("{cmd}: missing \"backend\" (SERVICE/BACKEND, like web/web1)")]
    NoBackend { cmd: String },
    #[error("{cmd}: limit {value} is not a number 1..={MAX_CONNS_LIMIT}")]
    Limit { cmd: String, value: String },
    #[error("{cmd}: missing \"weight\" (a number 0..={MAX_WEIGHT}, or null for the file's weight)")]
    NoWeight { cmd: String },
    #[error(
        "{cmd}: weight {value} is not a number 0..={MAX_WEIGHT} (or null for the file's weight)"
    )]
    Weight { cmd: String, value: String },
}

impl FromStr for BackendRef {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, NameError> {
        match s.split_once('/') {
            Some((svc, b)) if valid_name(svc) && valid_name(b) => Ok(BackendRef {
                service: svc.to_string(),
                backend: b.to_string(),
            }),
            _ => Err(NameError::NotBackend(s.to_string())),
        }
    }
}

impl fmt::Display for BackendRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.service, self.backend)
    }
}

/// `conns`' backend filter: an address or a configured backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackendSel {
    Address(Ipv4Addr),
    Name(BackendRef),
}

impl FromStr for BackendSel {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, NameError> {
        if let Ok(a) = s.parse() {
            return Ok(BackendSel::Address(a));
        }
        s.parse()
            .map(BackendSel::Name)
            .map_err(|_| NameError::NotBackendOrAddress(s.to_string()))
    }
}

impl fmt::Display for BackendSel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendSel::Address(a) => write!(f, "{a}"),
            BackendSel::Name(n) => write!(f, "{n}"),
        }
    }
}

/// `conns`: which connections, how many.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnsQuery {
    pub vip: Option<Ipv4Addr>,
    pub client: Option<Ipv4Addr>,
    pub backend: Option<BackendSel>,
    pub limit: usize,
}

impl Default for ConnsQuery {
    fn default() -> Self {
        Self {
            vip: None,
            client: None,
            backend: None,
            limit: DEFAULT_CONNS_LIMIT,
        }
    }
}

/// One request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    Show,
    Stats,
    Conns(ConnsQuery),
    Drain(BackendRef),
    Enable(BackendRef),
    /// `None`: back to the file's weight.
    Weight(BackendRef, Option<u32>),
    Reload,
    /// Recent closed connections.
    Flows(FlowsQuery),
    /// Reopen the connection log (after rotation).
    Reopen,
}

impl Request {
    /// Parses one request line; the error names the problem and what is accepted.
    pub fn parse(line: &str) -> Result<Request, RequestError> {
        let v: Value =
            serde_json::from_str(line).map_err(|e| RequestError::NotJson(e.to_string()))?;
        let Value::Object(obj) = v else {
            return Err(RequestError::NotObject(short(&v)));
        };
        // A JSON object may repeat a key and serde_json keeps the last: the
        // line is read again for that alone (it is JSON, so this succeeds).
        if let Ok(RepeatedKey(Some(k))) = serde_json::from_str::<RepeatedKey>(line) {
            return Err(RequestError::RepeatedKey(k));
        }
        let cmd = match obj.get("cmd") {
            Some(Value::String(c)) => c.as_str(),
            Some(other) => return Err(RequestError::CmdNotString(short(other))),
            None => return Err(RequestError::NoCmd),
        };
        let allowed: &'static [&'static str] = match cmd {
            "show" | "stats" | "reload" | "reopen" => &[],
            "flows" => &["service", "backend", "client", "limit"],
            "conns" => &["vip", "client", "backend", "limit"],
            "drain" | "enable" => &["backend"],
            "weight" => &["backend", "weight"],
            other => return Err(RequestError::UnknownCommand(other.to_string())),
        };
        if let Some(k) = obj
            .keys()
            .find(|k| *k != "cmd" && !allowed.contains(&k.as_str()))
        {
            return Err(RequestError::UnknownKey {
                cmd: cmd.to_string(),
                key: k.clone(),
                allowed,
            });
        }
        Ok(match cmd {
            "show" => Request::Show,
            "stats" => Request::Stats,
            "reload" => Request::Reload,
            "reopen" => Request::Reopen,
            "flows" => Request::Flows(FlowsQuery {
                service: opt_str(&obj, cmd, "service")?.map(str::to_string),
                backend: opt_str(&obj, cmd, "backend")?
                    .map(|s| {
                        s.parse().map_err(|error| RequestError::Name {
                            cmd: cmd.to_string(),
                            error,
                        })
                    })
                    .transpose()?,
                client: opt_str(&obj, cmd, "client")?
                    .map(|s| ipv4(cmd, "client", s))
                    .transpose()?,
                limit: limit(&obj, cmd, DEFAULT_FLOWS_LIMIT)?,
            }),
            "conns" => Request::Conns(ConnsQuery {
                vip: opt_str(&obj, cmd, "vip")?
                    .map(|s| ipv4(cmd, "vip", s))
                    .transpose()?,
                client: opt_str(&obj, cmd, "client")?
                    .map(|s| ipv4(cmd, "client", s))
                    .transpose()?,
                backend: opt_str(&obj, cmd, "backend")?
                    .map(|s| {
                        s.parse().map_err(|error| RequestError::Name {
                            cmd: cmd.to_string(),
                            error,
                        })
                    })
                    .transpose()?,
                limit: limit(&obj, cmd, DEFAULT_CONNS_LIMIT)?,
            }),
            "drain" => Request::Drain(backend(&obj, cmd)?),
            "enable" => Request::Enable(backend(&obj, cmd)?),
            "weight" => {
                let b = backend(&obj, cmd)?;
                let w = match obj.get("weight") {
                    None => {
                        return Err(RequestError::NoWeight {
                            cmd: cmd.to_string(),
                        });
                    }
                    Some(Value::Null) => None,
                    Some(w) => match w.as_u64() {
                        Some(n) if n <= MAX_WEIGHT as u64 => Some(n as u32),
                        _ => {
                            return Err(RequestError::Weight {
                                cmd: cmd.to_string(),
                                value: short(w),
                            });
                        }
                    },
                };
                Request::Weight(b, w)
            }
            _ => unreachable!("commands are matched above"),
        })
    }

    /// The request as one JSON line (without the newline).
    pub fn to_json(&self) -> String {
        let mut m = Map::new();
        let cmd = match self {
            Request::Show => "show",
            Request::Stats => "stats",
            Request::Reload => "reload",
            Request::Reopen => "reopen",
            Request::Flows(q) => {
                if let Some(v) = &q.service {
                    m.insert("service".into(), v.clone().into());
                }
                if let Some(v) = &q.backend {
                    m.insert("backend".into(), v.to_string().into());
                }
                if let Some(v) = q.client {
                    m.insert("client".into(), v.to_string().into());
                }
                m.insert("limit".into(), q.limit.into());
                "flows"
            }
            Request::Conns(q) => {
                if let Some(v) = q.vip {
                    m.insert("vip".into(), v.to_string().into());
                }
                if let Some(v) = q.client {
                    m.insert("client".into(), v.to_string().into());
                }
                if let Some(v) = &q.backend {
                    m.insert("backend".into(), v.to_string().into());
                }
                m.insert("limit".into(), q.limit.into());
                "conns"
            }
            Request::Drain(b) => {
                m.insert("backend".into(), b.to_string().into());
                "drain"
            }
            Request::Enable(b) => {
                m.insert("backend".into(), b.to_string().into());
                "enable"
            }
            Request::Weight(b, w) => {
                m.insert("backend".into(), b.to_string().into());
                m.insert("weight".into(), w.map_or(Value::Null, Value::from));
                "weight"
            }
        };
        m.insert("cmd".into(), cmd.into());
        Value::Object(m).to_string()
    }
}

/// A value as it appears in an error message (cut if long).
/// The first key a JSON object repeats (`None`: every key once).
struct RepeatedKey(Option<String>);

impl<'de> Deserialize<'de> for RepeatedKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = RepeatedKey;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut m: A,
            ) -> Result<RepeatedKey, A::Error> {
                let mut seen: Vec<String> = Vec::new();
                let mut repeated = None;
                // Every entry is consumed (the deserializer wants the whole map).
                while let Some(k) = m.next_key::<String>()? {
                    m.next_value::<serde::de::IgnoredAny>()?;
                    if repeated.is_none() && seen.contains(&k) {
                        repeated = Some(k);
                    } else {
                        seen.push(k);
                    }
                }
                Ok(RepeatedKey(repeated))
            }
        }
        d.deserialize_map(V)
    }
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 40 {
        let mut end = 40;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}...", &s[..end])
    } else {
        s
    }
}

fn opt_str<'a>(
    obj: &'a Map<String, Value>,
    cmd: &str,
    key: &'static str,
) -> Result<Option<&'a str>, RequestError> {
    match obj.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(RequestError::NotString {
            cmd: cmd.to_string(),
            key,
            value: short(other),
        }),
    }
}

fn ipv4(cmd: &str, key: &'static str, s: &str) -> Result<Ipv4Addr, RequestError> {
    s.parse().map_err(|_| RequestError::NotIpv4 {
        cmd: cmd.to_string(),
        key,
        value: s.to_string(),
    })
}

/// A `limit` (1..=[`MAX_CONNS_LIMIT`]), `default` if absent.
fn limit(obj: &Map<String, Value>, cmd: &str, default: usize) -> Result<usize, RequestError> {
    match obj.get("limit") {
        None => Ok(default),
        Some(l) => match l.as_u64() {
            Some(n) if (1..=MAX_CONNS_LIMIT as u64).contains(&n) => Ok(n as usize),
            _ => Err(RequestError::Limit {
                cmd: cmd.to_string(),
                value: short(l),
            }),
        },
    }
}

fn backend(obj: &Map<String, Value>, cmd: &str) -> Result<BackendRef, RequestError> {
    let s = opt_str(obj, cmd, "backend")?.ok_or_else(|| RequestError::NoBackend {
        cmd: cmd.to_string(),
    })?;
    s.parse().map_err(|error| RequestError::Name {
        cmd: cmd.to_string(),
        error,
    })
}

/// A reply line: `{"ok":true,"result":...}`.
pub fn ok_line<T: Serialize>(result: &T) -> String {
    serde_json::json!({"ok": true, "result": result}).to_string()
}

/// A reply line: `{"ok":false,"error":...}`.
pub fn error_line(error: &str) -> String {
    serde_json::json!({"ok": false, "error": error}).to_string()
}

/// A reply as lbctl reads it.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(default)]
    pub result: Option<Value>,
    #[serde(default)]
    pub error: Option<String>,
}

/// A backend's state: what it gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendState {
    /// Gets new connections.
    Up,
    /// No new connections by the operator's or the file's choice (drained,
    /// or weight 0); existing ones continue.
    Drained,
    /// No new connections because its health checks fail.
    Down,
}

impl BackendState {
    /// Health comes first, then the weight.
    pub fn of(health: Option<Health>, effective_weight: u32) -> Self {
        if health == Some(Health::Down) {
            BackendState::Down
        } else if effective_weight == 0 {
            BackendState::Drained
        } else {
            BackendState::Up
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            BackendState::Up => "up",
            BackendState::Drained => "drained",
            BackendState::Down => "down",
        }
    }

    pub const ALL: [BackendState; 3] =
        [BackendState::Up, BackendState::Drained, BackendState::Down];
}

/// What the health checks say of a backend (absent: not checked).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    Up,
    Down,
}

/// `show`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShowReply {
    pub instance: String,
    pub generation: u64,
    pub routing_generation: u64,
    pub services: Vec<ServiceView>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServiceView {
    pub name: String,
    pub vip: String,
    pub port: u16,
    pub protocol: String,
    pub mode: String,
    pub scheduler: String,
    pub active_conns: u64,
    pub total_conns: u64,
    pub backends: Vec<BackendView>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackendView {
    pub name: String,
    /// `ip:port`.
    pub address: String,
    pub state: BackendState,
    /// `None`: not health checked.
    pub health: Option<Health>,
    /// The file's weight.
    pub configured_weight: u32,
    /// The weight its service's table is built with.
    pub effective_weight: u32,
    /// `weight N` in force.
    pub weight_override: Option<u32>,
    /// `drain` in force.
    pub admin_drained: bool,
    pub active_conns: u32,
    pub total_conns: u64,
    /// `None`: no limit.
    pub max_conns: Option<u32>,
    /// Share of its service's Maglev table, 0..=1.
    pub table_share: f64,
}

/// `stats`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatsReply {
    /// Seconds between the two samples the rates come from (`None` until
    /// controld has two).
    pub interval_s: Option<f64>,
    pub switches: Vec<SwitchStats>,
    pub total: CounterSet,
    pub backends: Vec<BackendStats>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SwitchStats {
    pub index: usize,
    pub name: String,
    pub pid: u32,
    pub alive: bool,
    pub state: String,
    pub cpu: u32,
    pub restarts: u32,
    pub heartbeat_age_ms: Option<u64>,
    pub seen_generation: u64,
    #[serde(flatten)]
    pub set: CounterSet,
}

/// Counters now, and their rates per second over the last sample interval.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CounterSet {
    pub counters: BTreeMap<String, u64>,
    pub rates: Option<BTreeMap<String, f64>>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackendStats {
    pub service: String,
    pub backend: String,
    pub address: String,
    pub active_conns: u32,
    pub total_conns: u64,
    /// New connections per second over the last sample interval.
    pub conns_per_s: Option<f64>,
}

/// One closed connection: a line of `flows` and of the connection log.
/// Bytes are IP bytes (headers included) as the switch forwarded them;
/// `to_client_*` is zero in DR and tunnel mode (replies bypass the switch).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowView {
    /// Wall-clock milliseconds since 1970 of the connection's first packet
    /// and of its close.
    pub created_unix_ms: u64,
    pub closed_unix_ms: u64,
    pub duration_ms: u64,
    pub protocol: String,
    /// The service's name (`None`: not in the running configuration).
    pub service: Option<String>,
    /// `SERVICE/BACKEND` (`None`: not in the running configuration).
    pub backend: Option<String>,
    pub backend_id: u32,
    /// `ip:port` each.
    pub client: String,
    pub vip: String,
    pub backend_address: String,
    /// fin_client, fin_backend, rst_client, rst_backend, idle_timeout,
    /// evicted, backend_down.
    pub reason: String,
    pub to_backend_packets: u64,
    pub to_backend_bytes: u64,
    pub to_client_packets: u64,
    pub to_client_bytes: u64,
}

/// `flows`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowsReply {
    /// Records controld has received since it started.
    pub records: u64,
    /// Recent records it keeps, and how many of them the filter kept.
    pub kept: u64,
    pub matched: u64,
    /// Newest first, at most `limit`.
    pub list: Vec<FlowView>,
}

/// `reopen`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReopenReply {
    /// The connection log's path (`None`: `[records] log` is not set).
    pub log: Option<String>,
}

/// `conns`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConnsReply {
    pub slots: u64,
    pub connections: u64,
    /// Connections the filter kept (all of them, listed or not).
    pub matched: u64,
    pub list: Vec<ConnView>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConnView {
    pub protocol: String,
    pub client: String,
    pub vip: String,
    /// `service/backend` (`None` if its backend is no longer configured).
    pub backend: Option<String>,
    pub backend_address: String,
    pub state: String,
    pub idle_ms: u32,
    pub expired: bool,
    pub midflow: bool,
    /// Packets and IP bytes from the client (the forward slot's counts;
    /// NAT replies count in the reply slot: see `lbctl flows`).
    pub packets: u64,
    pub bytes: u64,
}

/// `drain`, `enable`, `weight`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChangeReply {
    /// The configuration generation that carries the change.
    pub generation: u64,
    pub service: String,
    pub backend: BackendView,
}

/// `reload`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReloadReply {
    pub generation: u64,
    pub routing_generation: u64,
    /// `service/backend: override` kept by the reload rule.
    pub overrides_kept: Vec<String>,
    /// `service/backend: override` dropped (backend no longer configured).
    pub overrides_dropped: Vec<String>,
    /// What the new file probably does not mean (the configuration was
    /// published anyway), as `controld --check` prints it. Absent from a
    /// controld that predates it.
    #[serde(default)]
    pub warnings: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> BackendRef {
        s.parse().unwrap()
    }

    #[test]
    fn every_command_parses_and_round_trips() {
        let all = [
            Request::Show,
            Request::Stats,
            Request::Reload,
            Request::Conns(ConnsQuery::default()),
            Request::Conns(ConnsQuery {
                vip: Some(Ipv4Addr::new(198, 18, 0, 10)),
                client: Some(Ipv4Addr::new(198, 18, 100, 1)),
                backend: Some(BackendSel::Address(Ipv4Addr::new(198, 19, 1, 1))),
                limit: 5,
            }),
            Request::Conns(ConnsQuery {
                backend: Some(BackendSel::Name(b("web/web-1_a"))),
                ..Default::default()
            }),
            Request::Drain(b("web/web1")),
            Request::Enable(b("web/web1")),
            Request::Weight(b("web/web1"), Some(0)),
            Request::Weight(b("web/web1"), Some(65535)),
            Request::Weight(b("web/web1"), None),
            Request::Reopen,
            Request::Flows(FlowsQuery::default()),
            Request::Flows(FlowsQuery {
                service: Some("web".into()),
                backend: Some(BackendSel::Name(b("web/web1"))),
                client: Some(Ipv4Addr::new(198, 18, 100, 1)),
                limit: 7,
            }),
        ];
        for r in all {
            assert_eq!(
                Request::parse(&r.to_json()),
                Ok(r.clone()),
                "{}",
                r.to_json()
            );
        }
        assert_eq!(Request::parse(r#" {"cmd":"show"} "#), Ok(Request::Show));
        assert_eq!(
            Request::parse(r#"{"cmd":"conns"}"#),
            Ok(Request::Conns(ConnsQuery {
                limit: 100,
                ..Default::default()
            }))
        );
        assert_eq!(
            Request::parse(r#"{"cmd":"weight","backend":"a/b","weight":7}"#),
            Ok(Request::Weight(b("a/b"), Some(7)))
        );
    }

    /// JSON leaves a repeated key to the reader (serde_json keeps the last):
    /// `{"cmd":"show","cmd":"reload"}` ran a reload. Refused instead.
    #[test]
    fn a_repeated_key_is_refused_by_name() {
        assert_eq!(
            Request::parse(r#"{"cmd":"show","cmd":"reload"}"#).map_err(|e| e.to_string()),
            Err("request has the key \"cmd\" more than once; give each key once".to_string())
        );
        assert_eq!(
            Request::parse(r#"{"cmd":"weight","backend":"a/b","weight":1,"weight":2}"#)
                .map_err(|e| e.to_string()),
            Err("request has the key \"weight\" more than once; give each key once".to_string())
        );
    }

    #[test]
    fn bad_requests_name_the_problem() {
        let cases = [
            (
                "show",
                "request is not JSON (expected value at line 1 column 1); send one object per line, like {\"cmd\":\"show\"}",
            ),
            (
                "[1]",
                "request [1] is not a JSON object; send one object per line, like {\"cmd\":\"show\"}",
            ),
            (
                "{}",
                "request has no \"cmd\" (one of: show, stats, conns, drain, enable, weight, reload, flows, reopen)",
            ),
            (
                r#"{"cmd":3}"#,
                "cmd 3 is not a string (one of: show, stats, conns, drain, enable, weight, reload, flows, reopen)",
            ),
            (
                r#"{"cmd":"frob"}"#,
                "unknown command \"frob\" (one of: show, stats, conns, drain, enable, weight, reload, flows, reopen)",
            ),
            (
                r#"{"cmd":"show","x":1}"#,
                "show: unknown key \"x\" (show takes no arguments)",
            ),
            (
                r#"{"cmd":"drain"}"#,
                "drain: missing \"backend\" (SERVICE/BACKEND, like web/web1)",
            ),
            (
                r#"{"cmd":"drain","backend":"web1"}"#,
                "drain: backend \"web1\" is not SERVICE/BACKEND (two names of 1 to 32 characters from A-Z a-z 0-9 _ -, like web/web1)",
            ),
            (
                r#"{"cmd":"drain","backend":"web/a/b"}"#,
                "drain: backend \"web/a/b\" is not SERVICE/BACKEND (two names of 1 to 32 characters from A-Z a-z 0-9 _ -, like web/web1)",
            ),
            (
                r#"{"cmd":"enable","backend":5}"#,
                "enable: backend 5 is not a string",
            ),
            (
                r#"{"cmd":"enable","backend":"a/b","weight":1}"#,
                "enable: unknown key \"weight\" (accepted: backend)",
            ),
            (
                r#"{"cmd":"weight","backend":"a/b"}"#,
                "weight: missing \"weight\" (a number 0..=65535, or null for the file's weight)",
            ),
            (
                r#"{"cmd":"weight","backend":"a/b","weight":65536}"#,
                "weight: weight 65536 is not a number 0..=65535 (or null for the file's weight)",
            ),
            (
                r#"{"cmd":"weight","backend":"a/b","weight":-1}"#,
                "weight: weight -1 is not a number 0..=65535 (or null for the file's weight)",
            ),
            (
                r#"{"cmd":"weight","backend":"a/b","weight":"5"}"#,
                "weight: weight \"5\" is not a number 0..=65535 (or null for the file's weight)",
            ),
            (
                r#"{"cmd":"conns","vip":"198.18.0"}"#,
                "conns: vip \"198.18.0\" is not an IPv4 address (like 198.18.0.10)",
            ),
            (
                r#"{"cmd":"conns","client":"x"}"#,
                "conns: client \"x\" is not an IPv4 address (like 198.18.0.10)",
            ),
            (
                r#"{"cmd":"conns","backend":"nope"}"#,
                "conns: backend \"nope\" is neither an IPv4 address nor SERVICE/BACKEND (like web/web1)",
            ),
            (
                r#"{"cmd":"conns","limit":0}"#,
                "conns: limit 0 is not a number 1..=100000",
            ),
            (
                r#"{"cmd":"conns","limit":100001}"#,
                "conns: limit 100001 is not a number 1..=100000",
            ),
            (
                r#"{"cmd":"conns","port":1}"#,
                "conns: unknown key \"port\" (accepted: vip, client, backend, limit)",
            ),
        ];
        for (line, want) in cases {
            assert_eq!(
                Request::parse(line).map_err(|e| e.to_string()),
                Err(want.to_string()),
                "{line}"
            );
        }
    }

    #[test]
    fn backend_state_puts_health_first() {
        assert_eq!(BackendState::of(None, 1), BackendState::Up);
        assert_eq!(BackendState::of(Some(Health::Up), 1), BackendState::Up);
        assert_eq!(BackendState::of(None, 0), BackendState::Drained);
        assert_eq!(BackendState::of(Some(Health::Down), 0), BackendState::Down);
        assert_eq!(BackendState::of(Some(Health::Down), 5), BackendState::Down);
        assert_eq!(
            serde_json::to_string(&BackendState::Drained).unwrap(),
            "\"drained\""
        );
    }

    #[test]
    fn reply_lines() {
        assert_eq!(error_line("no \"x\""), r#"{"error":"no \"x\"","ok":false}"#);
        let r: Reply = serde_json::from_str(&ok_line(&7)).unwrap();
        assert!(r.ok);
        assert_eq!(r.result, Some(Value::from(7)));
    }
}
