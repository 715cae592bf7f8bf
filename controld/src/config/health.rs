//! Health-check keys: `[service.health]`, `[service.backend.health]` and
//! `[[service]] on_backend_down`. The raw table, the typed check and their
//! rules; what the checks do with them is `crate::health`.

use std::net::Ipv4Addr;

use serde::Deserialize;

use super::validate::int;

/// Default of `interval_ms`.
pub const DEFAULT_INTERVAL_MS: u32 = 2000;
/// Default of `fast_interval_ms` (or `interval_ms` if smaller).
pub const DEFAULT_FAST_INTERVAL_MS: u32 = 500;
/// Default of `timeout_ms` (or `interval_ms` if smaller).
pub const DEFAULT_TIMEOUT_MS: u32 = 1000;
/// Default of `rise`.
pub const DEFAULT_RISE: u32 = 2;
/// Default of `fall`.
pub const DEFAULT_FALL: u32 = 3;
/// Default of `expect_status`.
pub const DEFAULT_EXPECT_STATUS: u16 = 200;
/// Largest UDP payload or expected reply prefix: one Ethernet frame.
pub const MAX_UDP_BYTES: usize = 1472;

/// A backend's health check: the keys of `[service.health]`, overridden
/// key by key by the backend's own `[service.backend.health]` table (a
/// backend may also have a table when its service has none). `kind =
/// "none"` or no table at all means no check: the backend is always up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    /// `kind` (required in `[service.health]`; a backend table inherits it):
    /// `"tcp"`, `"http"`, `"udp"` or `"none"`, with the kind's keys.
    pub probe: Probe,
    /// `port` (default: the backend's port): where the check goes, `1..=65535`.
    pub port: u16,
    /// `interval_ms` (default 2000): from one check's start to the next
    /// one's, `10..=3600000`.
    pub interval_ms: u32,
    /// `fast_interval_ms` (default 500, or `interval_ms` if smaller): the
    /// interval while the backend is in transition (UP with failures
    /// counted against it, or DOWN with passes counted for it), so a dying
    /// backend leaves sooner; `10..=interval_ms`.
    pub fast_interval_ms: u32,
    /// `timeout_ms` (default 1000, or `interval_ms` if smaller): a check
    /// that has not passed by then failed, `1..=interval_ms`.
    pub timeout_ms: u32,
    /// `rise` (default 2): net passed checks that readmit a DOWN backend,
    /// `1..=100` (see `crate::health` for the rule).
    pub rise: u32,
    /// `fall` (default 3): net failed checks that take a fully healthy
    /// backend DOWN, `1..=100`.
    pub fall: u32,
}

/// `kind` and its keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// `"tcp"`: the check passes when a TCP connection is accepted.
    Tcp,
    /// `"http"`: `GET path` over HTTP/1.1 (`Connection: close`); passes
    /// when the status line carries `expect_status`.
    Http {
        /// `path` (default `"/"`): `/` then visible ASCII, at most 1024 bytes.
        path: String,
        /// `host` (default: the backend's address, with `:port` unless the
        /// check's port is 80): the `Host` header, 1 to 255 visible ASCII
        /// characters.
        host: String,
        /// `expect_status` (default 200): `100..=599`.
        expect_status: u16,
    },
    /// `"udp"`: sends `payload` from a connected socket; passes when a
    /// reply starting with `expect` arrives (with `require_reply`, the
    /// default), or, with `require_reply = false`, when no ICMP error
    /// (port unreachable) arrives within the timeout.
    Udp {
        /// `payload` (text) or `payload_hex` (bytes as hex digits), at most
        /// one of them (default: an empty datagram); at most 1472 bytes.
        payload: Vec<u8>,
        /// `expect` (text) or `expect_hex`, at most one (default: any
        /// reply): the prefix the reply must start with; at most 1472 bytes.
        expect: Vec<u8>,
        /// `require_reply` (default true): whether a reply is needed at all.
        /// `false` is for services that never answer; it cannot tell a
        /// dead host from a silent one. `expect` needs it true.
        require_reply: bool,
    },
}

impl Probe {
    /// The kind's name in the file.
    pub fn kind(&self) -> &'static str {
        match self {
            Probe::Tcp => "tcp",
            Probe::Http { .. } => "http",
            Probe::Udp { .. } => "udp",
        }
    }
}

/// `[[service]] on_backend_down` (default `"reschedule"`): what happens to
/// the existing connections of a backend that goes DOWN.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnDown {
    /// `"keep"`: they continue to the DOWN backend (until they end or time out).
    Keep,
    /// `"reschedule"`: they move where the protocol allows: a UDP flow's
    /// next datagram, and a TCP connection's retransmitted SYN, go to the
    /// flow's choice among the live backends; an established TCP
    /// connection cannot move and continues.
    #[default]
    Reschedule,
    /// `"reset"`: as `reschedule`, and the switch answers the next client
    /// packet of an established TCP connection with a RST, so the client
    /// fails fast and reconnects (to a live backend).
    Reset,
}

impl OnDown {
    /// The name used in the file.
    pub fn as_str(&self) -> &'static str {
        match self {
            OnDown::Keep => "keep",
            OnDown::Reschedule => "reschedule",
            OnDown::Reset => "reset",
        }
    }
}

/// `[service.health]` or `[service.backend.health]` as serde reads it.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHealth {
    pub kind: Option<String>,
    pub port: Option<i64>,
    pub interval_ms: Option<i64>,
    pub fast_interval_ms: Option<i64>,
    pub timeout_ms: Option<i64>,
    pub rise: Option<i64>,
    pub fall: Option<i64>,
    pub path: Option<String>,
    pub host: Option<String>,
    pub expect_status: Option<i64>,
    pub payload: Option<String>,
    pub payload_hex: Option<String>,
    pub expect: Option<String>,
    pub expect_hex: Option<String>,
    pub require_reply: Option<bool>,
}

impl RawHealth {
    /// `self` with the keys `over` sets replaced by `over`'s values.
    fn overridden_by(&self, over: &RawHealth) -> RawHealth {
        RawHealth {
            kind: over.kind.clone().or_else(|| self.kind.clone()),
            port: over.port.or(self.port),
            interval_ms: over.interval_ms.or(self.interval_ms),
            fast_interval_ms: over.fast_interval_ms.or(self.fast_interval_ms),
            timeout_ms: over.timeout_ms.or(self.timeout_ms),
            rise: over.rise.or(self.rise),
            fall: over.fall.or(self.fall),
            path: over.path.clone().or_else(|| self.path.clone()),
            host: over.host.clone().or_else(|| self.host.clone()),
            expect_status: over.expect_status.or(self.expect_status),
            payload: over.payload.clone().or_else(|| self.payload.clone()),
            payload_hex: over
                .payload_hex
                .clone()
                .or_else(|| self.payload_hex.clone()),
            expect: over.expect.clone().or_else(|| self.expect.clone()),
            expect_hex: over.expect_hex.clone().or_else(|| self.expect_hex.clone()),
            require_reply: over.require_reply.or(self.require_reply),
        }
    }

    /// The keys set in this table (for "only for kind ..." errors).
    fn keys(&self) -> Vec<&'static str> {
        let set = [
            ("port", self.port.is_some()),
            ("interval_ms", self.interval_ms.is_some()),
            ("fast_interval_ms", self.fast_interval_ms.is_some()),
            ("timeout_ms", self.timeout_ms.is_some()),
            ("rise", self.rise.is_some()),
            ("fall", self.fall.is_some()),
            ("path", self.path.is_some()),
            ("host", self.host.is_some()),
            ("expect_status", self.expect_status.is_some()),
            ("payload", self.payload.is_some()),
            ("payload_hex", self.payload_hex.is_some()),
            ("expect", self.expect.is_some()),
            ("expect_hex", self.expect_hex.is_some()),
            ("require_reply", self.require_reply.is_some()),
        ];
        set.into_iter()
            .filter(|(_, s)| *s)
            .map(|(k, _)| k)
            .collect()
    }
}

type R<T> = Result<T, String>;

/// `on_backend_down`.
pub(super) fn on_down(ctx: &str, raw: Option<&str>) -> R<OnDown> {
    match raw {
        None => Ok(OnDown::default()),
        Some("keep") => Ok(OnDown::Keep),
        Some("reschedule") => Ok(OnDown::Reschedule),
        Some("reset") => Ok(OnDown::Reset),
        Some(other) => Err(format!(
            "{ctx}on_backend_down {other:?} is not supported (supported: keep, reschedule, reset)"
        )),
    }
}

/// Validates a service's `[service.health]` on its own (so its errors name
/// the service, not the first backend).
pub(super) fn check_service(service_ctx: &str, raw: Option<&RawHealth>) -> R<()> {
    if let Some(h) = raw {
        let ctx = format!("{service_ctx}health: ");
        if h.kind.is_none() {
            return Err(format!(
                "{ctx}kind is required (supported: tcp, http, udp, none)"
            ));
        }
        check(&ctx, h, h, Ipv4Addr::UNSPECIFIED, 1)?;
    }
    Ok(())
}

/// The effective check of one backend: its service's table overridden by
/// its own. `None` when neither has one or the kind is `"none"`.
pub(super) fn backend_check(
    backend_ctx: &str,
    service: Option<&RawHealth>,
    own: Option<&RawHealth>,
    address: Ipv4Addr,
    port: u16,
) -> R<Option<HealthCheck>> {
    let ctx = format!("{backend_ctx}health: ");
    match (service, own) {
        (None, None) => Ok(None),
        (Some(s), None) => check(&ctx, s, s, address, port),
        (s, Some(o)) => {
            let merged = s.map(|s| s.overridden_by(o)).unwrap_or_else(|| o.clone());
            if merged.kind.is_none() {
                return Err(format!(
                    "{ctx}kind is required (supported: tcp, http, udp, none)"
                ));
            }
            check(&ctx, &merged, o, address, port)
        }
    }
}

/// Validates `raw` (the effective keys); `own` is the table as written,
/// whose keys must suit the kind.
fn check(
    ctx: &str,
    raw: &RawHealth,
    own: &RawHealth,
    address: Ipv4Addr,
    backend_port: u16,
) -> R<Option<HealthCheck>> {
    let kind = raw.kind.as_deref().unwrap_or("none");
    let allowed: &[&str] = match kind {
        "none" => &[],
        "tcp" => &[],
        "http" => &["path", "host", "expect_status"],
        "udp" => &[
            "payload",
            "payload_hex",
            "expect",
            "expect_hex",
            "require_reply",
        ],
        other => {
            return Err(format!(
                "{ctx}kind {other:?} is not supported (supported: tcp, http, udp, none)"
            ));
        }
    };
    const COMMON: [&str; 6] = [
        "port",
        "interval_ms",
        "fast_interval_ms",
        "timeout_ms",
        "rise",
        "fall",
    ];
    for key in own.keys() {
        if kind == "none" {
            return Err(format!(
                "{ctx}{key} is set but kind is \"none\" (no check: remove the key or choose a kind)"
            ));
        }
        if !COMMON.contains(&key) && !allowed.contains(&key) {
            let owner = if ["path", "host", "expect_status"].contains(&key) {
                "http"
            } else {
                "udp"
            };
            return Err(format!(
                "{ctx}{key} is only for kind {owner:?} (kind is {kind:?})"
            ));
        }
    }
    if kind == "none" {
        return Ok(None);
    }

    let port: u16 = int(ctx, "port", raw.port, backend_port, 1, 65535)?;
    let interval_ms: u32 = int(
        ctx,
        "interval_ms",
        raw.interval_ms,
        DEFAULT_INTERVAL_MS,
        10,
        3_600_000,
    )?;
    let fast_interval_ms: u32 = int(
        ctx,
        "fast_interval_ms",
        raw.fast_interval_ms,
        DEFAULT_FAST_INTERVAL_MS.min(interval_ms),
        10,
        3_600_000,
    )?;
    if fast_interval_ms > interval_ms {
        return Err(format!(
            "{ctx}fast_interval_ms {fast_interval_ms} exceeds interval_ms {interval_ms} (the fast interval is the shorter one)"
        ));
    }
    let timeout_ms: u32 = int(
        ctx,
        "timeout_ms",
        raw.timeout_ms,
        DEFAULT_TIMEOUT_MS.min(interval_ms),
        1,
        3_600_000,
    )?;
    if timeout_ms > interval_ms {
        return Err(format!(
            "{ctx}timeout_ms {timeout_ms} exceeds interval_ms {interval_ms} (a check must end before the next one is due)"
        ));
    }
    let rise: u32 = int(ctx, "rise", raw.rise, DEFAULT_RISE, 1, 100)?;
    let fall: u32 = int(ctx, "fall", raw.fall, DEFAULT_FALL, 1, 100)?;

    let probe = match kind {
        "tcp" => Probe::Tcp,
        "http" => {
            let path = raw.path.clone().unwrap_or_else(|| "/".into());
            if !path.starts_with('/') || path.len() > 1024 || !visible_ascii(&path) {
                return Err(format!(
                    "{ctx}path {path:?} is not a URL path (expected / then at most 1023 visible ASCII characters, no spaces)"
                ));
            }
            let host = match &raw.host {
                Some(h) => {
                    if h.is_empty() || h.len() > 255 || !visible_ascii(h) {
                        return Err(format!(
                            "{ctx}host {h:?} is not a host name (1 to 255 visible ASCII characters, no spaces)"
                        ));
                    }
                    h.clone()
                }
                None if port == 80 => address.to_string(),
                None => format!("{address}:{port}"),
            };
            Probe::Http {
                path,
                host,
                expect_status: int(
                    ctx,
                    "expect_status",
                    raw.expect_status,
                    DEFAULT_EXPECT_STATUS,
                    100,
                    599,
                )?,
            }
        }
        _ => {
            let payload = bytes(ctx, "payload", &raw.payload, &raw.payload_hex)?;
            let expect = bytes(ctx, "expect", &raw.expect, &raw.expect_hex)?;
            let require_reply = raw.require_reply.unwrap_or(true);
            if !require_reply && (raw.expect.is_some() || raw.expect_hex.is_some()) {
                return Err(format!(
                    "{ctx}expect is set but require_reply is false (a reply can only be matched if one is required)"
                ));
            }
            Probe::Udp {
                payload,
                expect,
                require_reply,
            }
        }
    };
    Ok(Some(HealthCheck {
        probe,
        port,
        interval_ms,
        fast_interval_ms,
        timeout_ms,
        rise,
        fall,
    }))
}

fn visible_ascii(s: &str) -> bool {
    s.bytes().all(|c| c.is_ascii_graphic())
}

/// `key` as text or `key_hex` as hex digits (at most one), at most
/// [`MAX_UDP_BYTES`]; empty when neither is set.
fn bytes(ctx: &str, key: &str, text: &Option<String>, hex: &Option<String>) -> R<Vec<u8>> {
    let v = match (text, hex) {
        (Some(_), Some(_)) => {
            return Err(format!(
                "{ctx}{key} and {key}_hex are both set (set at most one)"
            ));
        }
        (Some(t), None) => t.as_bytes().to_vec(),
        (None, Some(h)) => {
            let bad = || {
                format!(
                    "{ctx}{key}_hex {h:?} is not hex bytes (expected pairs of hex digits like \"0a1b\")"
                )
            };
            if h.len() % 2 != 0 || !h.bytes().all(|c| c.is_ascii_hexdigit()) {
                return Err(bad());
            }
            (0..h.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&h[i..i + 2], 16).map_err(|_| bad()))
                .collect::<R<Vec<u8>>>()?
        }
        (None, None) => Vec::new(),
    };
    if v.len() > MAX_UDP_BYTES {
        return Err(format!(
            "{ctx}{key} of {} bytes exceeds {MAX_UDP_BYTES} (one Ethernet frame)",
            v.len()
        ));
    }
    Ok(v)
}
