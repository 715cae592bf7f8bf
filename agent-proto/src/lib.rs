//! The load report that `lb-agent` sends to controld over UDP, and its
//! authentication. Shared by the agent (tools) and controld, so neither
//! depends on the other; no I/O.
//!
//! # Wire format (version 1)
//!
//! One UDP datagram of exactly [`REPORT_LEN`] (72) bytes, integers
//! big-endian:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `"SYLA"` |
//! | 4 | 1 | version, 1 |
//! | 5 | 1 | flags: bit 0 = drain request; the other bits must be 0 |
//! | 6 | 2 | reserved, 0 |
//! | 8 | 8 | timestamp: the agent's wall clock, milliseconds since the Unix epoch |
//! | 16 | 8 | sequence number, strictly increasing per agent (lb-agent starts at its start time in microseconds since the Unix epoch, so a restarted agent continues above its predecessor) |
//! | 24 | 2 | CPU busy, permille of all CPUs over the last interval, `0..=1000` |
//! | 26 | 2 | memory in use (`MemTotal − MemAvailable`), permille, `0..=1000` |
//! | 28 | 4 | active clients (`0xffffffff`: not reported) |
//! | 32 | 4 | requests per second (`0xffffffff`: not reported) |
//! | 36 | 4 | mean service time, microseconds (`0xffffffff`: not reported) |
//! | 40 | 32 | HMAC-SHA256 tag |
//!
//! # Authentication
//!
//! The tag is HMAC-SHA256 under the shared secret over
//! `"switchyard-agent-report-v1" ‖ agent IPv4 (4) ‖ controld IPv4 (4) ‖
//! controld port (2) ‖ bytes 0..40 of the datagram`: the body (with the
//! drain flag, the timestamp and the sequence number) and both ends. The
//! agent's address is the datagram's source address as controld sees it,
//! so a report replayed from another host, or to another controld, fails
//! the check. The agent's port is left out: it is ephemeral and says
//! nothing about who sent the report. Tags are compared in constant time
//! (`hmac`'s `verify_slice`).
//!
//! Freshness (the timestamp within a window of the receiver's clock) and
//! replay (the sequence number above the last accepted one) are the
//! receiver's rules, not this crate's: see controld's `agents` module.

use std::net::{Ipv4Addr, SocketAddrV4};

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// Length of a report datagram.
pub const REPORT_LEN: usize = 72;
/// Length of the authenticated body (everything before the tag).
pub const BODY_LEN: usize = 40;
/// `magic` field.
pub const MAGIC: [u8; 4] = *b"SYLA";
/// `version` field.
pub const VERSION: u8 = 1;
/// `flags` bit: the agent asks for no new connections.
pub const FLAG_DRAIN: u8 = 1;
/// A `u32` field's value for "not reported".
pub const NOT_REPORTED: u32 = u32::MAX;
/// Shortest shared secret controld and lb-agent accept, in bytes.
pub const MIN_SECRET_LEN: usize = 16;
/// Longest shared secret, in bytes.
pub const MAX_SECRET_LEN: usize = 1024;
/// Domain separation: a tag for this protocol is never valid for another.
const CONTEXT: &[u8] = b"switchyard-agent-report-v1";

/// Field offsets (byte ranges) of the report.
mod field {
    use std::ops::Range;
    pub const MAGIC: Range<usize> = 0..4;
    pub const VERSION: usize = 4;
    pub const FLAGS: usize = 5;
    pub const RESERVED: Range<usize> = 6..8;
    pub const TIMESTAMP: Range<usize> = 8..16;
    pub const SEQ: Range<usize> = 16..24;
    pub const CPU: Range<usize> = 24..26;
    pub const MEM: Range<usize> = 26..28;
    pub const ACTIVE: Range<usize> = 28..32;
    pub const RPS: Range<usize> = 32..36;
    pub const SERVICE_TIME: Range<usize> = 36..40;
    pub const TAG: Range<usize> = 40..72;
}

/// What an agent measured.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Load {
    /// CPU busy, permille of all CPUs, `0..=1000`.
    pub cpu_permille: u16,
    /// Memory in use, permille, `0..=1000`.
    pub mem_permille: u16,
    /// Clients being served now.
    pub active_clients: Option<u32>,
    /// Requests completed per second.
    pub requests_per_sec: Option<u32>,
    /// Mean service time of those requests, microseconds.
    pub service_time_us: Option<u32>,
    /// The agent asks for no new connections (existing ones continue).
    pub drain: bool,
}

/// A whole report: load, timestamp and sequence number.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Agent's wall clock, milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
    /// Strictly increasing per agent.
    pub seq: u64,
    pub load: Load,
}

/// The two ends a report is bound to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoints {
    /// The agent's address (the datagram's source address).
    pub agent: Ipv4Addr,
    /// controld's listening address and port (the datagram's destination).
    pub controller: SocketAddrV4,
}

/// Why a datagram is not a well-formed report.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("length {0} is not {REPORT_LEN}")]
    Length(usize),
    #[error("magic {0:02x?} is not \"SYLA\"")]
    Magic([u8; 4]),
    #[error("version {0} is not {VERSION}")]
    Version(u8),
    #[error("flags {0:#04x} set unknown bits (only {FLAG_DRAIN:#04x} is defined)")]
    Flags(u8),
    #[error("reserved bytes {0:#06x} are not zero")]
    Reserved(u16),
    #[error("{field} {value} exceeds 1000 permille")]
    Permille { field: &'static str, value: u16 },
}

/// Why a datagram was not accepted as a report of its sender.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// Not a report at all.
    #[error("malformed: {0}")]
    Malformed(#[from] WireError),
    /// A well-formed report whose tag does not match: another secret, or a
    /// changed field, source or destination.
    #[error(
        "forged: the HMAC does not match (wrong secret, altered report, or sent from or to another address)"
    )]
    Forged,
}

/// A read-only view of a report datagram.
///
/// [`ReportView::new_checked`] validates the length, magic, version, flags,
/// reserved bytes and permille ranges once; after it succeeds no accessor
/// can panic. It does not check the tag: [`open`] does.
#[derive(Clone, Copy, Debug)]
pub struct ReportView<T: AsRef<[u8]>> {
    buf: T,
}

impl<T: AsRef<[u8]>> ReportView<T> {
    pub fn new_checked(buf: T) -> Result<Self, WireError> {
        let b = buf.as_ref();
        if b.len() != REPORT_LEN {
            return Err(WireError::Length(b.len()));
        }
        let v = ReportView { buf };
        let b = v.buf.as_ref();
        let magic = [b[0], b[1], b[2], b[3]];
        if magic != MAGIC {
            return Err(WireError::Magic(magic));
        }
        if b[field::VERSION] != VERSION {
            return Err(WireError::Version(b[field::VERSION]));
        }
        if b[field::FLAGS] & !FLAG_DRAIN != 0 {
            return Err(WireError::Flags(b[field::FLAGS]));
        }
        let reserved = v.u16_at(field::RESERVED);
        if reserved != 0 {
            return Err(WireError::Reserved(reserved));
        }
        for (name, value) in [("cpu", v.cpu_permille()), ("memory", v.mem_permille())] {
            if value > 1000 {
                return Err(WireError::Permille { field: name, value });
            }
        }
        Ok(v)
    }

    fn bytes<const N: usize>(&self, r: std::ops::Range<usize>) -> [u8; N] {
        let mut a = [0u8; N];
        a.copy_from_slice(&self.buf.as_ref()[r]);
        a
    }

    fn u16_at(&self, r: std::ops::Range<usize>) -> u16 {
        u16::from_be_bytes(self.bytes(r))
    }

    fn u32_at(&self, r: std::ops::Range<usize>) -> u32 {
        u32::from_be_bytes(self.bytes(r))
    }

    fn optional(&self, r: std::ops::Range<usize>) -> Option<u32> {
        Some(self.u32_at(r)).filter(|&v| v != NOT_REPORTED)
    }

    pub fn drain(&self) -> bool {
        self.buf.as_ref()[field::FLAGS] & FLAG_DRAIN != 0
    }

    pub fn timestamp_ms(&self) -> u64 {
        u64::from_be_bytes(self.bytes(field::TIMESTAMP))
    }

    pub fn seq(&self) -> u64 {
        u64::from_be_bytes(self.bytes(field::SEQ))
    }

    pub fn cpu_permille(&self) -> u16 {
        self.u16_at(field::CPU)
    }

    pub fn mem_permille(&self) -> u16 {
        self.u16_at(field::MEM)
    }

    pub fn active_clients(&self) -> Option<u32> {
        self.optional(field::ACTIVE)
    }

    pub fn requests_per_sec(&self) -> Option<u32> {
        self.optional(field::RPS)
    }

    pub fn service_time_us(&self) -> Option<u32> {
        self.optional(field::SERVICE_TIME)
    }

    /// The authenticated part.
    pub fn body(&self) -> &[u8] {
        &self.buf.as_ref()[..BODY_LEN]
    }

    pub fn tag(&self) -> &[u8] {
        &self.buf.as_ref()[field::TAG]
    }

    /// The fields as a [`Report`].
    pub fn report(&self) -> Report {
        Report {
            timestamp_ms: self.timestamp_ms(),
            seq: self.seq(),
            load: Load {
                cpu_permille: self.cpu_permille(),
                mem_permille: self.mem_permille(),
                active_clients: self.active_clients(),
                requests_per_sec: self.requests_per_sec(),
                service_time_us: self.service_time_us(),
                drain: self.drain(),
            },
        }
    }
}

fn mac(secret: &[u8], ep: &Endpoints, body: &[u8]) -> Hmac<Sha256> {
    let mut m =
        <Hmac<Sha256> as KeyInit>::new_from_slice(secret).expect("HMAC accepts keys of any length");
    m.update(CONTEXT);
    m.update(&ep.agent.octets());
    m.update(&ep.controller.ip().octets());
    m.update(&ep.controller.port().to_be_bytes());
    m.update(body);
    m
}

/// Encodes and authenticates a report. Permille values above 1000 are
/// sent as 1000.
pub fn seal(report: &Report, ep: &Endpoints, secret: &[u8]) -> [u8; REPORT_LEN] {
    let mut b = [0u8; REPORT_LEN];
    let l = &report.load;
    let opt = |v: Option<u32>| v.unwrap_or(NOT_REPORTED).to_be_bytes();
    b[field::MAGIC].copy_from_slice(&MAGIC);
    b[field::VERSION] = VERSION;
    b[field::FLAGS] = if l.drain { FLAG_DRAIN } else { 0 };
    b[field::TIMESTAMP].copy_from_slice(&report.timestamp_ms.to_be_bytes());
    b[field::SEQ].copy_from_slice(&report.seq.to_be_bytes());
    b[field::CPU].copy_from_slice(&l.cpu_permille.min(1000).to_be_bytes());
    b[field::MEM].copy_from_slice(&l.mem_permille.min(1000).to_be_bytes());
    b[field::ACTIVE].copy_from_slice(&opt(l.active_clients));
    b[field::RPS].copy_from_slice(&opt(l.requests_per_sec));
    b[field::SERVICE_TIME].copy_from_slice(&opt(l.service_time_us));
    let tag = mac(secret, ep, &b[..BODY_LEN]).finalize().into_bytes();
    b[field::TAG].copy_from_slice(&tag);
    b
}

/// Checks a datagram's form and tag (constant-time comparison) and returns
/// its report. Freshness and replay are the caller's to check.
pub fn open(datagram: &[u8], ep: &Endpoints, secret: &[u8]) -> Result<Report, OpenError> {
    let v = ReportView::new_checked(datagram)?;
    mac(secret, ep, v.body())
        .verify_slice(v.tag())
        .map_err(|_| OpenError::Forged)?;
    Ok(v.report())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SECRET: &[u8] = b"0123456789abcdef-test-secret";

    fn ep() -> Endpoints {
        Endpoints {
            agent: Ipv4Addr::new(198, 19, 0, 11),
            controller: SocketAddrV4::new(Ipv4Addr::new(198, 19, 0, 1), 7007),
        }
    }

    fn report() -> Report {
        Report {
            timestamp_ms: 1_700_000_000_123,
            seq: 1_700_000_000_123_456,
            load: Load {
                cpu_permille: 875,
                mem_permille: 402,
                active_clients: Some(17),
                requests_per_sec: Some(350),
                service_time_us: None,
                drain: true,
            },
        }
    }

    #[test]
    fn seal_then_open_round_trips_with_the_documented_layout() {
        let d = seal(&report(), &ep(), SECRET);
        assert_eq!(&d[..8], b"SYLA\x01\x01\x00\x00");
        assert_eq!(d[8..16], 1_700_000_000_123u64.to_be_bytes());
        assert_eq!(d[16..24], 1_700_000_000_123_456u64.to_be_bytes());
        assert_eq!(d[24..28], [0x03, 0x6b, 0x01, 0x92]);
        assert_eq!(
            d[28..40],
            [0, 0, 0, 17, 0, 0, 1, 94, 0xff, 0xff, 0xff, 0xff]
        );
        assert_eq!(open(&d, &ep(), SECRET), Ok(report()));
    }

    #[test]
    fn the_tag_is_hmac_sha256_over_context_addresses_and_body() {
        // An independent computation of the documented input.
        let d = seal(&report(), &ep(), SECRET);
        let mut input = b"switchyard-agent-report-v1".to_vec();
        input.extend_from_slice(&[198, 19, 0, 11, 198, 19, 0, 1, 0x1b, 0x5f]);
        input.extend_from_slice(&d[..40]);
        let mut m = <Hmac<Sha256> as KeyInit>::new_from_slice(SECRET).unwrap();
        m.update(&input);
        assert_eq!(&d[40..], m.finalize().into_bytes().as_slice());
    }

    #[test]
    fn flipping_any_bit_of_the_body_or_tag_is_forged_or_malformed() {
        let d = seal(&report(), &ep(), SECRET);
        for i in 0..REPORT_LEN {
            for bit in 0..8 {
                let mut e = d;
                e[i] ^= 1 << bit;
                let r = open(&e, &ep(), SECRET);
                // Structural fields fail the form check first; every other
                // byte (timestamp, sequence, load, drain flag, tag) fails the MAC.
                let structural = i < 8 && !(i == 5 && bit == 0) || (24..28).contains(&i);
                match r {
                    Err(OpenError::Forged) => {}
                    Err(OpenError::Malformed(_)) if structural => {}
                    other => panic!("byte {i} bit {bit}: {other:?}"),
                }
            }
        }
    }

    #[test]
    fn the_drain_flag_timestamp_and_sequence_are_covered() {
        let d = seal(&report(), &ep(), SECRET);
        for (i, what) in [(5, "drain"), (15, "timestamp"), (23, "seq")] {
            let mut e = d;
            e[i] ^= 1;
            assert_eq!(open(&e, &ep(), SECRET), Err(OpenError::Forged), "{what}");
        }
    }

    #[test]
    fn another_agent_address_controller_address_port_or_secret_is_forged() {
        let d = seal(&report(), &ep(), SECRET);
        let mut other = ep();
        other.agent = Ipv4Addr::new(198, 19, 0, 12);
        assert_eq!(open(&d, &other, SECRET), Err(OpenError::Forged));
        let mut other = ep();
        other.controller.set_ip(Ipv4Addr::new(198, 19, 0, 2));
        assert_eq!(open(&d, &other, SECRET), Err(OpenError::Forged));
        let mut other = ep();
        other.controller.set_port(7008);
        assert_eq!(open(&d, &other, SECRET), Err(OpenError::Forged));
        assert_eq!(
            open(&d, &ep(), b"0123456789abcdef-test-secreT"),
            Err(OpenError::Forged)
        );
        assert_eq!(
            open(&d, &ep(), b"0123456789abcdef-test-secre"),
            Err(OpenError::Forged)
        );
    }

    #[test]
    fn malformed_datagrams_name_their_fault() {
        let d = seal(&report(), &ep(), SECRET);
        let err = |e: &[u8]| match open(e, &ep(), SECRET) {
            Err(OpenError::Malformed(w)) => w.to_string(),
            other => panic!("{other:?}"),
        };
        assert_eq!(err(&d[..71]), "length 71 is not 72");
        assert_eq!(err(&[d.as_slice(), &[0]].concat()), "length 73 is not 72");
        assert_eq!(err(b""), "length 0 is not 72");
        let mut e = d;
        e[0] = b'X';
        assert_eq!(err(&e), "magic [58, 59, 4c, 41] is not \"SYLA\"");
        let mut e = d;
        e[4] = 2;
        assert_eq!(err(&e), "version 2 is not 1");
        let mut e = d;
        e[5] = 0x81;
        assert_eq!(
            err(&e),
            "flags 0x81 set unknown bits (only 0x01 is defined)"
        );
        let mut e = d;
        e[7] = 1;
        assert_eq!(err(&e), "reserved bytes 0x0001 are not zero");
        let mut e = d;
        e[24..26].copy_from_slice(&1001u16.to_be_bytes());
        assert_eq!(err(&e), "cpu 1001 exceeds 1000 permille");
        let mut e = d;
        e[26..28].copy_from_slice(&u16::MAX.to_be_bytes());
        assert_eq!(err(&e), "memory 65535 exceeds 1000 permille");
    }

    #[test]
    fn seal_clamps_permille() {
        let mut r = report();
        r.load.cpu_permille = 5000;
        r.load.mem_permille = 1001;
        let got = open(&seal(&r, &ep(), SECRET), &ep(), SECRET).unwrap();
        assert_eq!((got.load.cpu_permille, got.load.mem_permille), (1000, 1000));
    }

    proptest! {
        #[test]
        fn any_report_round_trips(
            ts: u64, seq: u64, cpu in 0u16..=1000, mem in 0u16..=1000,
            active: Option<u32>, rps: Option<u32>, st: Option<u32>, drain: bool,
        ) {
            let fix = |v: Option<u32>| v.filter(|&x| x != NOT_REPORTED);
            let r = Report {
                timestamp_ms: ts,
                seq,
                load: Load {
                    cpu_permille: cpu,
                    mem_permille: mem,
                    active_clients: fix(active),
                    requests_per_sec: fix(rps),
                    service_time_us: fix(st),
                    drain,
                },
            };
            prop_assert_eq!(open(&seal(&r, &ep(), SECRET), &ep(), SECRET), Ok(r));
        }

        /// Any other length is refused for its length, before anything else.
        #[test]
        fn a_datagram_of_another_length_is_malformed_by_length(
            d in proptest::collection::vec(any::<u8>(), 0..200),
        ) {
            prop_assume!(d.len() != REPORT_LEN);
            prop_assert_eq!(
                open(&d, &ep(), SECRET),
                Err(OpenError::Malformed(WireError::Length(d.len())))
            );
        }

        /// Arbitrary bytes of the right length with the right magic and
        /// version: refused by the field check that fails, and when every
        /// field is valid, as forged (nobody guesses the tag).
        #[test]
        fn arbitrary_reports_are_refused_by_their_fields_or_as_forged(
            mut d in proptest::collection::vec(any::<u8>(), REPORT_LEN),
        ) {
            d[0..4].copy_from_slice(&MAGIC);
            d[4] = VERSION;
            let got = open(&d, &ep(), SECRET);
            match ReportView::new_checked(&d) {
                Err(e) => prop_assert_eq!(got, Err(OpenError::Malformed(e))),
                Ok(_) => prop_assert_eq!(got, Err(OpenError::Forged)),
            }
        }

        /// A genuine report with any one byte changed is never accepted.
        #[test]
        fn a_changed_byte_is_never_accepted(at in 0..REPORT_LEN, x in 1u8..=255) {
            let mut d = seal(&report(), &ep(), SECRET);
            d[at] ^= x;
            let got = open(&d, &ep(), SECRET);
            match ReportView::new_checked(&d) {
                Err(e) => prop_assert_eq!(got, Err(OpenError::Malformed(e))),
                Ok(_) => prop_assert_eq!(got, Err(OpenError::Forged)),
            }
        }
    }
}
