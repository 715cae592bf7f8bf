//! Layer-7 keys: `[l7]`, and a service's `mode = "l7"` with its
//! `[[service.pool]]`, `[[service.rule]]`, `default_pool`,
//! `proxy_protocol` and each backend's `pool`. The typed settings and
//! their rules; what controld does with them is `crate::l7`.

use std::net::Ipv4Addr;

use super::raw::{RawL7, RawRule, RawService};
use super::validate::int;
use super::{Backend, Mode, Protocol, Service, Tunnel};

type R<T> = Result<T, String>;

/// Default of `[l7] head_limit`.
pub const DEFAULT_HEAD_LIMIT: u32 = 8192;
/// Smallest `[l7] head_limit`.
pub const MIN_HEAD_LIMIT: u32 = 1024;
/// Largest `[l7] head_limit`.
pub const MAX_HEAD_LIMIT: u32 = 65536;
/// Default of `[l7] head_timeout_ms`.
pub const DEFAULT_HEAD_TIMEOUT_MS: u32 = 5000;
/// The pool of a service that defines no `[[service.pool]]`.
pub const DEFAULT_POOL: &str = "default";
/// Most `[[service.pool]]` of a service.
pub const MAX_POOLS: usize = 64;
/// Most `[[service.rule]]` of a service.
pub const MAX_RULES: usize = 256;
/// Longest `path_prefix`, header name and header value of a rule.
pub const MAX_MATCH_LEN: usize = 256;
/// Request methods an l7 service refuses (501): a tunnel is not a request
/// the switch can route and splice.
pub const REFUSED_METHODS: &[&str] = &["CONNECT"];

/// `[l7]`: settings shared by every service with mode `"l7"`. Every key
/// is optional; the table may be given without any l7 service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct L7 {
    /// `source` (required when a service uses mode `"l7"`): the source
    /// address of the switches' connections to backends. The switches own
    /// it as they own a VIP (they answer ARP for it; the kernel must not
    /// hold it). Unicast; not a VIP, a backend or `[tunnel] source`.
    pub source: Option<Ipv4Addr>,
    /// `head_limit` (default 8192, `1024..=65536`): the most bytes of a
    /// request head (request line and headers, up to the empty line); a
    /// longer head gets 431.
    pub head_limit: u32,
    /// `head_timeout_ms` (default 5000, `100..=60000`): how long a client
    /// may take to send the whole head after its handshake; a slower one
    /// gets 408.
    pub head_timeout_ms: u32,
}

impl Default for L7 {
    fn default() -> Self {
        L7 {
            source: None,
            head_limit: DEFAULT_HEAD_LIMIT,
            head_timeout_ms: DEFAULT_HEAD_TIMEOUT_MS,
        }
    }
}

/// What a service with mode `"l7"` adds: pools of its backends and the
/// rules that route a request to one of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct L7Service {
    /// `[[service.pool]]`, in file order; without any, one pool
    /// `"default"` (scheduler `"wrr"`) holding every backend. At most 64.
    pub pools: Vec<Pool>,
    /// `[[service.rule]]`, in file order; the first rule whose every
    /// condition matches routes the request. At most 256.
    pub rules: Vec<Rule>,
    /// `default_pool` (default: the first pool): where a request that no
    /// rule matches goes, as an index into `pools`.
    pub default_pool: usize,
    /// `proxy_protocol` (default false): send a PROXY protocol v2 header
    /// (the client's address and port) before the request head.
    pub proxy_protocol: bool,
}

/// `[[service.pool]]`: a named group of a service's backends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    /// `name` (required): unique within the service, 1 to 32 characters
    /// from `A-Z a-z 0-9 _ -`.
    pub name: String,
    /// `scheduler` (default `"wrr"`): how a backend of the pool is chosen.
    pub scheduler: PoolScheduler,
    /// The backends whose `pool` names this pool, as indexes into the
    /// service's backends, in file order. A backend's `pool` is required
    /// when the service defines pools, and may only be `"default"` when it
    /// does not. A pool may be empty (its requests get 503).
    pub backends: Vec<usize>,
}

/// `[[service.pool]] scheduler`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolScheduler {
    /// `"wrr"`: smooth weighted round robin (as the L4 `wrr`).
    Wrr,
    /// `"wlc"`: weighted least connections over the backends' active
    /// connections (as the L4 `wlc`).
    Wlc,
}

impl PoolScheduler {
    /// The name used in the file.
    pub fn as_str(&self) -> &'static str {
        match self {
            PoolScheduler::Wrr => "wrr",
            PoolScheduler::Wlc => "wlc",
        }
    }
}

/// `[[service.rule]]`: conditions on a request and the pool it goes to.
/// At least one condition; all given conditions must match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// `host`: the request's host (the `Host` header, or the authority of
    /// an absolute request target), without its port, compared without
    /// regard to case: `"example.com"` matches that name exactly,
    /// `"*.example.com"` any name ending in `.example.com` (not
    /// `example.com` itself).
    pub host: Option<HostMatch>,
    /// `path_prefix`: the request target's path starts with these bytes
    /// (case-sensitive); starts with `/`, at most 256 visible characters.
    pub path_prefix: Option<String>,
    /// `method`: the request's method, exactly (methods are case-sensitive):
    /// 1 to 32 characters `A-Z`; not a refused method (`CONNECT`).
    pub method: Option<String>,
    /// `header = { name = "X-Tenant", value = "blue" }`: the request has a
    /// header of that name (any case) whose value is exactly `value`.
    pub header: Option<HeaderMatch>,
    /// `pool` (required): the pool, as an index into [`L7Service::pools`].
    pub pool: usize,
}

/// A rule's `host`, lower-cased.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostMatch {
    /// `"example.com"`: this name.
    Exact(String),
    /// `"*.example.com"`, kept as the suffix `".example.com"`.
    Suffix(String),
}

impl HostMatch {
    /// Whether `host` (without port) matches, ignoring ASCII case.
    pub fn matches(&self, host: &[u8]) -> bool {
        match self {
            HostMatch::Exact(h) => host.eq_ignore_ascii_case(h.as_bytes()),
            HostMatch::Suffix(s) => {
                host.len() > s.len()
                    && host[host.len() - s.len()..].eq_ignore_ascii_case(s.as_bytes())
            }
        }
    }
}

/// A rule's `header`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderMatch {
    /// `name` (required): a header name (an HTTP token, at most 256
    /// characters), kept lower-cased; compared without regard to case.
    pub name: String,
    /// `value` (required): the exact value, visible characters and inner
    /// spaces, at most 256.
    pub value: String,
}

/// `[l7]`.
pub(super) fn l7(raw: &RawL7) -> R<L7> {
    let ctx = "l7: ";
    let d = L7::default();
    Ok(L7 {
        source: raw
            .source
            .as_deref()
            .map(|s| super::validate::unicast(ctx, "source", s))
            .transpose()?,
        head_limit: int(
            ctx,
            "head_limit",
            raw.head_limit,
            d.head_limit,
            MIN_HEAD_LIMIT as i64,
            MAX_HEAD_LIMIT as i64,
        )?,
        head_timeout_ms: int(
            ctx,
            "head_timeout_ms",
            raw.head_timeout_ms,
            d.head_timeout_ms,
            100,
            60000,
        )?,
    })
}

/// The l7 part of a service: `None` for an L4 service (which may not use
/// any l7 key), the pools and rules of a service with mode `"l7"`.
pub(super) fn service(
    ctx: &str,
    raw: &RawService,
    mode: Mode,
    protocol: Protocol,
    backends: &[Backend],
) -> R<Option<L7Service>> {
    if mode != Mode::L7 {
        refuse_l7_keys(ctx, raw)?;
        return Ok(None);
    }
    if protocol != Protocol::Tcp {
        return Err(format!(
            "{ctx}mode \"l7\" needs protocol \"tcp\" (it serves HTTP/1.x), not {:?}",
            protocol.as_str()
        ));
    }
    if raw.scheduler.is_some() {
        return Err(format!(
            "{ctx}scheduler is not set for mode \"l7\" (each [[service.pool]] has its own scheduler)"
        ));
    }
    if raw.latency_target_ms.is_some() {
        return Err(format!(
            "{ctx}latency_target_ms is not supported for mode \"l7\" yet (controlled loading adjusts L4 NAT services)"
        ));
    }
    if raw.pool.len() > MAX_POOLS {
        return Err(format!(
            "{ctx}{} pools are defined, at most {MAX_POOLS} are supported",
            raw.pool.len()
        ));
    }
    if raw.rule.len() > MAX_RULES {
        return Err(format!(
            "{ctx}{} rules are defined, at most {MAX_RULES} are supported",
            raw.rule.len()
        ));
    }
    let mut pools: Vec<Pool> = Vec::with_capacity(raw.pool.len().max(1));
    for p in &raw.pool {
        super::validate::check_name(&format!("{ctx}pool"), &p.name, 32)?;
        if pools.iter().any(|q| q.name == p.name) {
            return Err(format!("{ctx}pool {:?} is defined twice", p.name));
        }
        let scheduler = match p.scheduler.as_deref() {
            None | Some("wrr") => PoolScheduler::Wrr,
            Some("wlc") => PoolScheduler::Wlc,
            Some(other) => {
                return Err(format!(
                    "{ctx}pool {:?}: scheduler {other:?} is not supported (supported: wrr, wlc)",
                    p.name
                ));
            }
        };
        pools.push(Pool {
            name: p.name.clone(),
            scheduler,
            backends: Vec::new(),
        });
    }
    let implicit = pools.is_empty();
    if implicit {
        pools.push(Pool {
            name: DEFAULT_POOL.into(),
            scheduler: PoolScheduler::Wrr,
            backends: Vec::new(),
        });
    }
    for (i, (rb, b)) in raw.backend.iter().zip(backends).enumerate() {
        let bctx = format!("{ctx}backend {:?}: ", b.name);
        let p = match &rb.pool {
            Some(name) => pool_ref(&bctx, name, &pools)?,
            None if implicit => 0,
            None => {
                return Err(format!(
                    "{bctx}pool is required (the service defines [[service.pool]]; defined pools: {})",
                    pool_names(&pools)
                ));
            }
        };
        pools[p].backends.push(i);
    }
    let mut rules = Vec::with_capacity(raw.rule.len());
    for (i, r) in raw.rule.iter().enumerate() {
        rules.push(rule(&format!("{ctx}rule {}: ", i + 1), r, &pools)?);
    }
    let default_pool = match &raw.default_pool {
        None => 0,
        Some(name) => pool_ref(&format!("{ctx}default_pool: "), name, &pools)?,
    };
    Ok(Some(L7Service {
        pools,
        rules,
        default_pool,
        proxy_protocol: raw.proxy_protocol.unwrap_or(false),
    }))
}

/// An L4 service names no l7 key.
fn refuse_l7_keys(ctx: &str, raw: &RawService) -> R<()> {
    let only = |key: &str| format!("{ctx}{key} is only for mode \"l7\"");
    if !raw.pool.is_empty() {
        return Err(only("[[service.pool]]"));
    }
    if !raw.rule.is_empty() {
        return Err(only("[[service.rule]]"));
    }
    if raw.default_pool.is_some() {
        return Err(only("default_pool"));
    }
    if raw.proxy_protocol.is_some() {
        return Err(only("proxy_protocol"));
    }
    if let Some(b) = raw.backend.iter().find(|b| b.pool.is_some()) {
        return Err(only(&format!("backend {:?}: pool", b.name)));
    }
    Ok(())
}

fn pool_names(pools: &[Pool]) -> String {
    pools
        .iter()
        .map(|p| p.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// A reference to a pool by name, resolved to its index.
fn pool_ref(ctx: &str, name: &str, pools: &[Pool]) -> R<usize> {
    pools.iter().position(|p| p.name == name).ok_or_else(|| {
        format!(
            "{ctx}pool {name:?} is not defined (defined pools: {})",
            pool_names(pools)
        )
    })
}

fn rule(ctx: &str, raw: &RawRule, pools: &[Pool]) -> R<Rule> {
    if raw.host.is_none()
        && raw.path_prefix.is_none()
        && raw.method.is_none()
        && raw.header.is_none()
    {
        return Err(format!(
            "{ctx}has no condition (give host, path_prefix, method or header; unmatched requests go to default_pool)"
        ));
    }
    let pool = pool_ref(ctx, &raw.pool, pools)?;
    let host = raw.host.as_deref().map(|h| host(ctx, h)).transpose()?;
    let path_prefix = match &raw.path_prefix {
        None => None,
        Some(p) => {
            let ok = p.starts_with('/')
                && p.len() <= MAX_MATCH_LEN
                && p.bytes().all(|c| c.is_ascii_graphic());
            if !ok {
                return Err(format!(
                    "{ctx}path_prefix {p:?} is not a path prefix (expected '/' then visible characters, at most {MAX_MATCH_LEN}, like \"/api/\")"
                ));
            }
            Some(p.clone())
        }
    };
    let method = match &raw.method {
        None => None,
        Some(m) => {
            if m.is_empty() || m.len() > 32 || !m.bytes().all(|c| c.is_ascii_uppercase()) {
                return Err(format!(
                    "{ctx}method {m:?} is not a method (expected 1 to 32 characters A-Z, like \"GET\"; methods are case-sensitive)"
                ));
            }
            if REFUSED_METHODS.contains(&m.as_str()) {
                return Err(format!(
                    "{ctx}method {m:?} is refused by l7 services (answered 501), a rule cannot route it"
                ));
            }
            Some(m.clone())
        }
    };
    let header = match &raw.header {
        None => None,
        Some(h) => {
            if h.name.is_empty() || h.name.len() > MAX_MATCH_LEN || !h.name.bytes().all(is_tchar) {
                return Err(format!(
                    "{ctx}header name {:?} is not a header name (expected 1 to {MAX_MATCH_LEN} characters A-Z a-z 0-9 and !#$%&'*+-.^_`|~)",
                    h.name
                ));
            }
            let v = h.value.as_bytes();
            let ok = v.len() <= MAX_MATCH_LEN
                && v.iter().all(|&c| c.is_ascii_graphic() || c == b' ')
                && v.first() != Some(&b' ')
                && v.last() != Some(&b' ');
            if !ok {
                return Err(format!(
                    "{ctx}header value {:?} is not a header value (expected at most {MAX_MATCH_LEN} visible characters and inner spaces)",
                    h.value
                ));
            }
            Some(HeaderMatch {
                name: h.name.to_ascii_lowercase(),
                value: h.value.clone(),
            })
        }
    };
    Ok(Rule {
        host,
        path_prefix,
        method,
        header,
        pool,
    })
}

/// A token character of RFC 9110 (header names, methods).
pub(crate) fn is_tchar(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c)
}

/// A rule's `host`: a host name (labels of `a-z 0-9 -` joined by dots), or
/// `*.` and a host name.
fn host(ctx: &str, text: &str) -> R<HostMatch> {
    let bad = || {
        format!(
            "{ctx}host {text:?} is not a host name or pattern (expected like example.com or *.example.com: labels of A-Z a-z 0-9 -, a '*' only as the whole first label, no port)"
        )
    };
    let lower = text.to_ascii_lowercase();
    let (name, wildcard) = match lower.strip_prefix("*.") {
        Some(rest) => (rest, true),
        None => (lower.as_str(), false),
    };
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) {
        return Err(bad());
    }
    Ok(if wildcard {
        HostMatch::Suffix(format!(".{name}"))
    } else {
        HostMatch::Exact(name.to_string())
    })
}

/// Rules over the whole file: an l7 service needs `[l7] source`, and the
/// source is an address of its own.
pub(super) fn check_source(l7: &L7, services: &[Service], tunnel: &Tunnel) -> R<()> {
    let Some(src) = l7.source else {
        if let Some(s) = services.iter().find(|s| s.mode == Mode::L7) {
            return Err(format!(
                "service {:?}: mode \"l7\" needs [l7] source (the address the switches connect to backends from)",
                s.name
            ));
        }
        return Ok(());
    };
    if let Some(s) = services.iter().find(|s| s.vip == src) {
        return Err(format!(
            "l7: source {src} is the VIP of service {:?} (use an address of its own for back-end connections)",
            s.name
        ));
    }
    for s in services {
        if let Some(b) = s.backends.iter().find(|b| b.address == src) {
            return Err(format!(
                "l7: source {src} is the address of backend {:?} of service {:?} (use an address of its own for back-end connections)",
                b.name, s.name
            ));
        }
    }
    if tunnel.source == Some(src) {
        return Err(format!(
            "l7: source {src} is also [tunnel] source (use an address of its own for back-end connections)"
        ));
    }
    Ok(())
}
