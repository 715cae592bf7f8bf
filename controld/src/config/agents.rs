//! Load-agent keys: `[agents]`. The raw table, the typed settings and
//! their rules; what controld does with them is `crate::agents`.

use std::net::SocketAddrV4;
use std::path::PathBuf;

use serde::Deserialize;

use super::validate::int;

/// Default of `max_skew_ms`.
pub const DEFAULT_MAX_SKEW_MS: u32 = 5000;
/// Default of `silent_ms` (three of lb-agent's default 1 s intervals).
pub const DEFAULT_SILENT_MS: u32 = 3000;
/// Default of `floor_percent`.
pub const DEFAULT_FLOOR_PERCENT: u32 = 10;
/// Default of `step_percent`.
pub const DEFAULT_STEP_PERCENT: u32 = 10;
pub use agent_proto::{MAX_SECRET_LEN, MIN_SECRET_LEN};

/// `[agents]`: controld listens for `lb-agent` reports and turns the load
/// they carry into effective weights (see `crate::agents`). No table: no
/// listener, every backend keeps its configured weight. A reload may
/// change every key (a new `listen` rebinds the socket).
///
/// An agent is identified by the source address of its reports: a report
/// applies to every backend (of any service) with that address; a report
/// from any other address is dropped as from an unknown agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Agents {
    /// `listen` (required): `"IP:PORT"` where controld receives reports;
    /// a unicast address of controld's namespace, not `0.0.0.0` (the
    /// address is part of what a report's HMAC covers).
    pub listen: SocketAddrV4,
    /// `secret` or `secret_file` (exactly one): the shared secret, 16 to
    /// 1024 bytes. `secret_file` (preferred: keep it mode 0600) is an
    /// absolute path whose content, less one trailing newline, is the
    /// secret; [`super::load`] reads it (also on every reload), [`super::parse`]
    /// leaves [`Agents::secret`] empty.
    pub secret: Secret,
    /// The file `secret` came from, if any.
    pub secret_file: Option<PathBuf>,
    /// `max_skew_ms` (default 5000): a report whose timestamp is further
    /// than this from controld's clock, either way, is stale;
    /// `100..=600000`.
    pub max_skew_ms: u32,
    /// `silent_ms` (default 3000): an agent with no accepted report for
    /// this long is silent, and its backends go back to their configured
    /// weights; `100..=3600000`.
    pub silent_ms: u32,
    /// `floor_percent` (default 10): the smallest share of its configured
    /// weight that load alone leaves a backend, `1..=100`.
    pub floor_percent: u32,
    /// `step_percent` (default 10): a backend's weight factor follows its
    /// load only once it moved this far (in percentage points) from the
    /// published one, or reached 100 % or the floor; `1..=100`.
    pub step_percent: u32,
}

/// A shared secret; never printed.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(pub Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret({} bytes)", self.0.len())
    }
}

/// `[agents]` as serde reads it.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAgents {
    pub listen: Option<String>,
    pub secret: Option<String>,
    pub secret_file: Option<String>,
    pub max_skew_ms: Option<i64>,
    pub silent_ms: Option<i64>,
    pub floor_percent: Option<i64>,
    pub step_percent: Option<i64>,
}

type R<T> = Result<T, String>;

pub(super) fn agents(raw: Option<&RawAgents>) -> R<Option<Agents>> {
    let Some(raw) = raw else {
        return Ok(None);
    };
    let ctx = "agents: ";
    let Some(text) = raw.listen.as_deref() else {
        return Err(format!(
            "{ctx}listen is required (the address and port controld receives reports on, like \"198.19.0.1:7007\")"
        ));
    };
    let listen: SocketAddrV4 = text.parse().map_err(|_| {
        format!("{ctx}listen {text:?} is not an IPv4 address and port (expected like \"198.19.0.1:7007\")")
    })?;
    let ip = *listen.ip();
    if ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() {
        return Err(format!(
            "{ctx}listen {text:?} is not a unicast address (reports are bound to the address they are sent to, so it must be one address of controld)"
        ));
    }
    if listen.port() == 0 {
        return Err(format!("{ctx}listen {text:?}: port 0 is not allowed"));
    }
    let (secret, secret_file) = match (&raw.secret, &raw.secret_file) {
        (Some(_), Some(_)) => {
            return Err(format!(
                "{ctx}secret and secret_file are both set (give exactly one)"
            ));
        }
        (None, None) => {
            return Err(format!(
                "{ctx}secret or secret_file is required (the secret shared with lb-agent)"
            ));
        }
        (Some(s), None) => {
            check_secret(ctx, "secret", s.as_bytes())?;
            (Secret(s.as_bytes().to_vec()), None)
        }
        (None, Some(f)) => {
            let path = PathBuf::from(f);
            if !path.is_absolute() {
                return Err(format!("{ctx}secret_file {f:?} is not an absolute path"));
            }
            (Secret::default(), Some(path))
        }
    };
    Ok(Some(Agents {
        listen,
        secret,
        secret_file,
        max_skew_ms: int(
            ctx,
            "max_skew_ms",
            raw.max_skew_ms,
            DEFAULT_MAX_SKEW_MS,
            100,
            600_000,
        )?,
        silent_ms: int(
            ctx,
            "silent_ms",
            raw.silent_ms,
            DEFAULT_SILENT_MS,
            100,
            3_600_000,
        )?,
        floor_percent: int(
            ctx,
            "floor_percent",
            raw.floor_percent,
            DEFAULT_FLOOR_PERCENT,
            1,
            100,
        )?,
        step_percent: int(
            ctx,
            "step_percent",
            raw.step_percent,
            DEFAULT_STEP_PERCENT,
            1,
            100,
        )?,
    }))
}

/// A secret's length rule; `what` names where it came from.
pub(super) fn check_secret(ctx: &str, what: &str, s: &[u8]) -> R<()> {
    if s.len() < MIN_SECRET_LEN {
        return Err(format!(
            "{ctx}{what} is {} bytes long, shorter than {MIN_SECRET_LEN} (use e.g. 32 random bytes: `head -c 32 /dev/urandom | base64`)",
            s.len()
        ));
    }
    if s.len() > MAX_SECRET_LEN {
        return Err(format!(
            "{ctx}{what} is {} bytes long, longer than {MAX_SECRET_LEN}",
            s.len()
        ));
    }
    Ok(())
}

/// Reads `secret_file` into `secret` (what [`super::load`] does).
pub(super) fn read_secret(a: &mut Agents) -> R<()> {
    let Some(path) = &a.secret_file else {
        return Ok(());
    };
    // One byte past the longest secret (plus a line end) is enough to say
    // it is too long; nothing more is read.
    let mut bytes = match super::file::read_regular(path, MAX_SECRET_LEN as u64 + 2) {
        Ok(b) => b,
        Err(super::file::FileError::NotRegular { found, .. }) => {
            return Err(format!(
                "agents: secret_file {:?}: is {found}, not a regular file",
                path.display()
            ));
        }
        Err(super::file::FileError::TooLarge { .. }) => {
            return Err(format!(
                "agents: secret_file {:?}: is longer than {MAX_SECRET_LEN} bytes",
                path.display()
            ));
        }
        Err(
            super::file::FileError::Open { source: e, .. }
            | super::file::FileError::Read { source: e, .. },
        ) => {
            return Err(format!(
                "agents: secret_file {:?}: cannot read: {e}",
                path.display()
            ));
        }
    };
    if bytes.last() == Some(&b'\n') {
        bytes.pop();
        if bytes.last() == Some(&b'\r') {
            bytes.pop();
        }
    }
    check_secret(
        "agents: ",
        &format!("the secret in secret_file {:?}", path.display()),
        &bytes,
    )?;
    a.secret = Secret(bytes);
    Ok(())
}
