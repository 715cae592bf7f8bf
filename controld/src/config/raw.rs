//! The file as serde reads it: every table denies unknown keys, so a
//! misspelt key is an error naming the key and its line. Integers are read
//! as `i64` and enumerations as strings so that `validate` can report a bad
//! value together with the thing it belongs to and the rule it breaks.
//! The meaning, default and rule of each key are documented on the typed
//! field of the same name in [`super`].

use serde::Deserialize;

use super::agents::RawAgents;
use super::health::RawHealth;

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    /// `instance`: see [`super::Config::instance`].
    pub instance: String,
    /// `[limits]`: see [`super::Limits`].
    #[serde(default)]
    pub limits: RawLimits,
    /// `[timeouts]`: see [`super::Timeouts`].
    #[serde(default)]
    pub timeouts: RawTimeouts,
    /// `[publish]`: see [`super::Publish`].
    #[serde(default)]
    pub publish: RawPublish,
    /// `[tunnel]`: see [`super::Tunnel`].
    #[serde(default)]
    pub tunnel: RawTunnel,
    /// `[routing]`: see [`super::Routing`].
    #[serde(default)]
    pub routing: RawRouting,
    /// `[admin]`: see [`super::Admin`].
    #[serde(default)]
    pub admin: RawAdmin,
    /// `[agents]`: see [`super::Agents`].
    pub agents: Option<RawAgents>,
    /// `[records]`: see [`super::Records`].
    #[serde(default)]
    pub records: RawRecords,
    /// `[[port]]`: see [`super::Port`].
    #[serde(default)]
    pub port: Vec<RawPort>,
    /// `[[switch]]`: see [`super::Switch`].
    #[serde(default)]
    pub switch: Vec<RawSwitch>,
    /// `[[service]]`: see [`super::Service`].
    #[serde(default)]
    pub service: Vec<RawService>,
    /// `[[route]]`: see [`super::Route`].
    #[serde(default)]
    pub route: Vec<RawRoute>,
    /// `[[neighbour]]`: see [`super::Neighbour`].
    #[serde(default)]
    pub neighbour: Vec<RawNeighbour>,
    /// `[l7]`: see [`super::L7`].
    #[serde(default)]
    pub l7: RawL7,
}

/// `[limits]`; every key optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimits {
    /// `services`: see [`super::Limits::services`].
    pub services: Option<i64>,
    /// `backends`: see [`super::Limits::backends`].
    pub backends: Option<i64>,
    /// `connections`: see [`super::Limits::connections`].
    pub connections: Option<i64>,
    /// `routes`: see [`super::Limits::routes`].
    pub routes: Option<i64>,
    /// `neighbours`: see [`super::Limits::neighbours`].
    pub neighbours: Option<i64>,
    /// `maglev_table_size`: see [`super::Limits::maglev_table_size`].
    pub maglev_table_size: Option<i64>,
    /// `syn_proxy_auto_syn_rate`: see [`super::Limits::syn_proxy_auto_syn_rate`].
    pub syn_proxy_auto_syn_rate: Option<i64>,
    /// `syn_proxy_auto_occupancy`: see [`super::Limits::syn_proxy_auto_occupancy`].
    pub syn_proxy_auto_occupancy: Option<i64>,
}

/// `[timeouts]`; every key optional, in seconds.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTimeouts {
    /// `tcp_syn`: see [`super::Timeouts::tcp_syn`].
    pub tcp_syn: Option<i64>,
    /// `tcp_established`: see [`super::Timeouts::tcp_established`].
    pub tcp_established: Option<i64>,
    /// `tcp_fin`: see [`super::Timeouts::tcp_fin`].
    pub tcp_fin: Option<i64>,
    /// `udp`: see [`super::Timeouts::udp`].
    pub udp: Option<i64>,
    /// `tcp_provisional`: see [`super::Timeouts::tcp_provisional`].
    pub tcp_provisional: Option<i64>,
}

/// `[publish]`; every key optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPublish {
    /// `ack_timeout_ms`: see [`super::Publish::ack_timeout_ms`].
    pub ack_timeout_ms: Option<i64>,
}

/// `[tunnel]`; every key optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTunnel {
    /// `source`: see [`super::Tunnel::source`].
    pub source: Option<String>,
}

/// `[routing]`; every key optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRouting {
    /// `mirror`: see [`super::Routing::mirror`].
    pub mirror: Option<bool>,
    /// `resolve`: see [`super::Routing::resolve`].
    pub resolve: Option<bool>,
}

/// `[admin]`; every key optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmin {
    /// `socket`: see [`super::Admin::socket`].
    pub socket: Option<String>,
    /// `metrics`: see [`super::Admin::metrics`].
    pub metrics: Option<String>,
}

/// `[records]`; every key optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRecords {
    /// `batch`: see [`super::Records::batch`].
    pub batch: Option<i64>,
    /// `batch_ms`: see [`super::Records::batch_ms`].
    pub batch_ms: Option<i64>,
    /// `log`: see [`super::Records::log`].
    pub log: Option<String>,
}

/// One `[[port]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPort {
    /// `name` (required): see [`super::Port::name`].
    pub name: String,
    /// `driver` (required): see [`super::Port::driver`].
    pub driver: String,
    /// `mac` (required for vnic): see [`super::Port::mac`].
    pub mac: Option<String>,
    /// `ring_size`: see [`super::Port::ring_size`].
    pub ring_size: Option<i64>,
    /// `interface`: see [`super::Port::interface`].
    pub interface: Option<String>,
    /// `promiscuous`: see [`super::Port::promiscuous`].
    pub promiscuous: Option<bool>,
    /// `mtu`: see [`super::Port::mtu`].
    pub mtu: Option<i64>,
}

/// One `[[switch]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSwitch {
    /// `name` (required): see [`super::Switch::name`].
    pub name: String,
    /// `cpu` (required): see [`super::Switch::cpu`].
    pub cpu: i64,
    /// `ports` (required): see [`super::Switch::ports`].
    pub ports: Vec<String>,
    /// `idle`: see [`super::Switch::idle`].
    pub idle: Option<String>,
    /// `burst`: see [`super::Switch::burst`].
    pub burst: Option<i64>,
    /// `engine`: see [`super::Switch::engine`].
    pub engine: Option<String>,
    /// `syn_queue`: see [`super::Switch::syn_queue`].
    pub syn_queue: Option<i64>,
    /// `flow_cache`: see [`super::Switch::flow_cache`].
    pub flow_cache: Option<i64>,
}

/// One `[[service]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawService {
    /// `name` (required): see [`super::Service::name`].
    pub name: String,
    /// `vip` (required): see [`super::Service::vip`].
    pub vip: String,
    /// `port` (required): see [`super::Service::port`].
    pub port: i64,
    /// `protocol` (required): see [`super::Service::protocol`].
    pub protocol: String,
    /// `mode`: see [`super::Service::mode`].
    pub mode: Option<String>,
    /// `scheduler`: see [`super::Service::scheduler`].
    pub scheduler: Option<String>,
    /// `on_backend_down`: see [`super::Service::on_backend_down`].
    pub on_backend_down: Option<String>,
    /// `queue_timeout_ms`: see [`super::Service::queue_timeout_ms`].
    pub queue_timeout_ms: Option<i64>,
    /// `latency_target_ms`: see [`super::Loading::latency_target_ms`].
    pub latency_target_ms: Option<i64>,
    /// `adjust_interval_ms`: see [`super::Loading::interval_ms`].
    pub adjust_interval_ms: Option<i64>,
    /// `min_conns`: see [`super::Loading::min_conns`].
    pub min_conns: Option<i64>,
    /// `[service.health]`: see [`super::HealthCheck`].
    pub health: Option<RawHealth>,
    /// `syn_proxy`: see [`super::Service::syn_proxy`].
    pub syn_proxy: Option<RawSynProxy>,
    /// `[[service.backend]]`: see [`super::Backend`].
    #[serde(default)]
    pub backend: Vec<RawBackend>,
    /// `[[service.pool]]` (mode `"l7"`): see [`super::Pool`].
    #[serde(default)]
    pub pool: Vec<RawPool>,
    /// `[[service.rule]]` (mode `"l7"`): see [`super::Rule`].
    #[serde(default)]
    pub rule: Vec<RawRule>,
    /// `default_pool` (mode `"l7"`): see [`super::L7Service::default_pool`].
    pub default_pool: Option<String>,
    /// `proxy_protocol` (mode `"l7"`): see [`super::L7Service::proxy_protocol`].
    pub proxy_protocol: Option<bool>,
}

/// `[[service]] syn_proxy`: `true`, `false` or a word (`"auto"`).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum RawSynProxy {
    Bool(bool),
    Word(String),
}

/// One `[[service.backend]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBackend {
    /// `name` (required): see [`super::Backend::name`].
    pub name: String,
    /// `address` (required): see [`super::Backend::address`].
    pub address: String,
    /// `port`: see [`super::Backend::port`].
    pub port: Option<i64>,
    /// `weight`: see [`super::Backend::weight`].
    pub weight: Option<i64>,
    /// `max_conns`: see [`super::Backend::max_conns`].
    pub max_conns: Option<i64>,
    /// `[service.backend.health]`: see [`super::Backend::health`].
    pub health: Option<RawHealth>,
    /// `pool` (mode `"l7"`): see [`super::Pool::backends`].
    pub pool: Option<String>,
}

/// One `[[route]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRoute {
    /// `prefix` (required): see [`super::Route::prefix`].
    pub prefix: String,
    /// `port` (required): see [`super::Route::port`].
    pub port: String,
    /// `via`: see [`super::Route::via`].
    pub via: Option<String>,
}

/// One `[[neighbour]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawNeighbour {
    /// `address` (required): see [`super::Neighbour::address`].
    pub address: String,
    /// `mac` (required): see [`super::Neighbour::mac`].
    pub mac: String,
    /// `port` (required): see [`super::Neighbour::port`].
    pub port: String,
}

/// The most dotted parts toml accepts in one key (its recursion limit
/// counts the parts before the last, and stops at 80).
pub(super) const MAX_KEY_PARTS: usize = 80;

/// toml reports a key of too many dotted parts as "recursion limit" with
/// no position; this finds the first line holding such a key (a key never
/// spans lines) and names it. Any other error is returned as it is.
pub(super) fn locate_too_deep(text: &str, e: toml::de::Error) -> super::ConfigError {
    if e.span().is_some() || e.message() != "recursion limit" {
        return super::ConfigError::Syntax(e);
    }
    text.lines()
        .enumerate()
        .map(|(i, line)| (i + 1, longest_dotted_run(line)))
        .find(|&(_, parts)| parts > MAX_KEY_PARTS)
        .map_or(super::ConfigError::Syntax(e), |(line, parts)| {
            super::ConfigError::TooDeep { line, parts }
        })
}

/// The most parts of a dotted run on one line (`a.b."c".d` has 4),
/// outside comments; a quoted part counts as one.
fn longest_dotted_run(line: &str) -> usize {
    let bytes = line.as_bytes();
    let (mut i, mut run, mut longest, mut after_dot) = (0, 0usize, 0usize, false);
    while i < bytes.len() {
        let c = bytes[i];
        let part_end = match c {
            b'"' | b'\'' => {
                // A quoted part: up to its closing quote (escapes skipped in "").
                let mut j = i + 1;
                while j < bytes.len() && bytes[j] != c {
                    j += if c == b'"' && bytes[j] == b'\\' { 2 } else { 1 };
                }
                Some(j + 1)
            }
            c if c.is_ascii_alphanumeric() || c == b'_' || c == b'-' => {
                let n = bytes[i..]
                    .iter()
                    .take_while(|c| c.is_ascii_alphanumeric() || **c == b'_' || **c == b'-')
                    .count();
                Some(i + n)
            }
            _ => None,
        };
        match (part_end, c) {
            (Some(end), _) => {
                run = if after_dot { run + 1 } else { 1 };
                longest = longest.max(run);
                after_dot = false;
                i = end;
                continue;
            }
            (None, b'.') => after_dot = run > 0,
            (None, b' ' | b'\t') => {}
            (None, b'#') => break,
            (None, _) => {
                run = 0;
                after_dot = false;
            }
        }
        i += 1;
    }
    longest
}

#[cfg(test)]
mod tests {
    use super::longest_dotted_run;

    #[test]
    fn dotted_runs_count_quoted_parts_and_stop_at_comments() {
        assert_eq!(longest_dotted_run("[service.backend.health]"), 3);
        assert_eq!(longest_dotted_run("a . \"b.c\" . 'd' = 1"), 3);
        assert_eq!(
            longest_dotted_run("address = \"198.19.1.1\"  # a.b.c.d.e"),
            1
        );
        assert_eq!(longest_dotted_run("x = 1.5"), 2);
        // Unterminated quotes and a trailing escape end the line, no panic.
        assert_eq!(longest_dotted_run("a.\"b\\"), 2);
        assert_eq!(longest_dotted_run("a.'b"), 2);
        assert_eq!(longest_dotted_run(""), 0);
        assert_eq!(longest_dotted_run(".."), 0);
    }
}

/// `[l7]`; every key optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawL7 {
    /// `source`: see [`super::L7::source`].
    pub source: Option<String>,
    /// `head_limit`: see [`super::L7::head_limit`].
    pub head_limit: Option<i64>,
    /// `head_timeout_ms`: see [`super::L7::head_timeout_ms`].
    pub head_timeout_ms: Option<i64>,
}

/// One `[[service.pool]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPool {
    /// `name` (required): see [`super::Pool::name`].
    pub name: String,
    /// `scheduler`: see [`super::Pool::scheduler`].
    pub scheduler: Option<String>,
}

/// One `[[service.rule]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRule {
    /// `pool` (required): see [`super::Rule::pool`].
    pub pool: String,
    /// `host`: see [`super::Rule::host`].
    pub host: Option<String>,
    /// `path_prefix`: see [`super::Rule::path_prefix`].
    pub path_prefix: Option<String>,
    /// `method`: see [`super::Rule::method`].
    pub method: Option<String>,
    /// `header`: see [`super::Rule::header`].
    pub header: Option<RawHeaderMatch>,
}

/// `header = { name = "...", value = "..." }` of a `[[service.rule]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHeaderMatch {
    /// `name` (required): see [`super::HeaderMatch::name`].
    pub name: String,
    /// `value` (required): see [`super::HeaderMatch::value`].
    pub value: String,
}
