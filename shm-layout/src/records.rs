//! Closed-connection records and the batch message that carries them from
//! a switch to controld over its records message ring
//! ([`crate::msgring::RING_RECORDS`]).
//!
//! A batch is a plain byte string: an 8-byte header (version, kind, record
//! count, switch index) and `count` records of [`RECORD_LEN`] bytes, every
//! field little-endian at a named offset. Decoding validates the version,
//! the kind, the length against the count and every reason byte: a
//! corrupted message is an error, never a panic.

use crate::conntrack::Conn;

/// Version byte of a batch.
pub const BATCH_VERSION: u8 = 1;
/// Kind byte of a batch of closed-connection records.
pub const KIND_CLOSED: u8 = 1;
pub const BATCH_HEADER_LEN: usize = 8;
pub const RECORD_LEN: usize = 72;
/// Most records in one batch (a batch must fit a message ring's maximum
/// message: 64 KiB of records is far below it).
pub const MAX_BATCH: usize = 900;

/// How a connection's entry ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum CloseReason {
    /// A FIN from the client closed it.
    FinClient = 1,
    /// A FIN from the backend (NAT: the only mode whose replies pass).
    FinBackend = 2,
    RstClient = 3,
    RstBackend = 4,
    /// Idle past its timeout: expired by the GC, or its slot reused by an insert.
    IdleTimeout = 5,
    /// A live half-open entry given up for a new connection (full probe window).
    Evicted = 6,
    /// Its backend went down: moved off it, or reset (`on_down`).
    BackendDown = 7,
}

impl CloseReason {
    pub const ALL: [CloseReason; 7] = [
        Self::FinClient,
        Self::FinBackend,
        Self::RstClient,
        Self::RstBackend,
        Self::IdleTimeout,
        Self::Evicted,
        Self::BackendDown,
    ];

    pub fn from_u8(v: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|r| *r as u8 == v)
    }

    /// The name operators see (JSON, metrics labels, `lbctl flows`).
    pub fn name(self) -> &'static str {
        match self {
            Self::FinClient => "fin_client",
            Self::FinBackend => "fin_backend",
            Self::RstClient => "rst_client",
            Self::RstBackend => "rst_backend",
            Self::IdleTimeout => "idle_timeout",
            Self::Evicted => "evicted",
            Self::BackendDown => "backend_down",
        }
    }
}

/// Packets and IP bytes of one direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub packets: u64,
    pub bytes: u64,
}

/// One closed connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClosedRecord {
    pub conn: Conn,
    pub reason: CloseReason,
    /// Region milliseconds (see `Region::now_ms`) of the close.
    pub closed_ms: u32,
    /// Client -> VIP.
    pub forward: Counts,
    /// Backend -> client (NAT only; zero in DR and tunnel mode, whose
    /// replies bypass the appliance).
    pub reply: Counts,
}

mod off {
    pub const VERSION: usize = 0;
    pub const KIND: usize = 1;
    pub const COUNT: usize = 2;
    pub const SWITCH: usize = 4;

    pub const REASON: usize = 0;
    pub const PROTO: usize = 1;
    pub const MODE: usize = 2;
    pub const FLAGS: usize = 3;
    pub const SERVICE: usize = 4;
    pub const CLIENT_PORT: usize = 6;
    pub const BACKEND_ID: usize = 8;
    pub const CLIENT_IP: usize = 12;
    pub const VIP: usize = 16;
    pub const BACKEND_IP: usize = 20;
    pub const VIP_PORT: usize = 24;
    pub const BACKEND_PORT: usize = 26;
    pub const CREATED: usize = 28;
    pub const CLOSED: usize = 32;
    // 36..40 reserved (zero)
    pub const FWD_PACKETS: usize = 40;
    pub const FWD_BYTES: usize = 48;
    pub const REPLY_PACKETS: usize = 56;
    pub const REPLY_BYTES: usize = 64;
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    #[error("batch of {0} bytes is shorter than its {BATCH_HEADER_LEN}-byte header")]
    Short(usize),
    #[error("batch version {0}, expected {BATCH_VERSION}")]
    Version(u8),
    #[error("batch kind {0}, expected {KIND_CLOSED}")]
    Kind(u8),
    #[error("batch says {count} records but holds {len} bytes (expected {expected})")]
    Length {
        count: usize,
        len: usize,
        expected: usize,
    },
    #[error("record {index}: close reason {value} is not one of 1..=7")]
    Reason { index: usize, value: u8 },
}

fn put<const N: usize>(b: &mut [u8], at: usize, v: [u8; N]) {
    b[at..at + N].copy_from_slice(&v);
}

fn get<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    b[at..at + N].try_into().expect("in bounds")
}

impl ClosedRecord {
    /// Appends the record's [`RECORD_LEN`] bytes to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.resize(start + RECORD_LEN, 0);
        let b = &mut out[start..];
        let c = &self.conn;
        b[off::REASON] = self.reason as u8;
        b[off::PROTO] = c.proto;
        b[off::MODE] = c.mode;
        b[off::FLAGS] = c.flags;
        put(b, off::SERVICE, c.service.to_le_bytes());
        put(b, off::CLIENT_PORT, c.client_port.to_le_bytes());
        put(b, off::BACKEND_ID, c.backend_id.to_le_bytes());
        put(b, off::CLIENT_IP, c.client_ip.to_le_bytes());
        put(b, off::VIP, c.vip.to_le_bytes());
        put(b, off::BACKEND_IP, c.backend_ip.to_le_bytes());
        put(b, off::VIP_PORT, c.vip_port.to_le_bytes());
        put(b, off::BACKEND_PORT, c.backend_port.to_le_bytes());
        put(b, off::CREATED, c.created_ms.to_le_bytes());
        put(b, off::CLOSED, self.closed_ms.to_le_bytes());
        put(b, off::FWD_PACKETS, self.forward.packets.to_le_bytes());
        put(b, off::FWD_BYTES, self.forward.bytes.to_le_bytes());
        put(b, off::REPLY_PACKETS, self.reply.packets.to_le_bytes());
        put(b, off::REPLY_BYTES, self.reply.bytes.to_le_bytes());
    }

    /// Decodes one record of exactly [`RECORD_LEN`] bytes (`index`: its
    /// place in the batch, for the error).
    fn decode(b: &[u8; RECORD_LEN], index: usize) -> Result<Self, RecordError> {
        let reason = CloseReason::from_u8(b[off::REASON]).ok_or(RecordError::Reason {
            index,
            value: b[off::REASON],
        })?;
        let u16_at = |at| u16::from_le_bytes(get(b, at));
        let u32_at = |at| u32::from_le_bytes(get(b, at));
        let u64_at = |at| u64::from_le_bytes(get(b, at));
        Ok(Self {
            conn: Conn {
                proto: b[off::PROTO],
                mode: b[off::MODE],
                flags: b[off::FLAGS],
                backend_id: u32_at(off::BACKEND_ID),
                client_ip: u32_at(off::CLIENT_IP),
                client_port: u16_at(off::CLIENT_PORT),
                vip: u32_at(off::VIP),
                vip_port: u16_at(off::VIP_PORT),
                backend_ip: u32_at(off::BACKEND_IP),
                backend_port: u16_at(off::BACKEND_PORT),
                service: u16_at(off::SERVICE),
                created_ms: u32_at(off::CREATED),
            },
            reason,
            closed_ms: u32_at(off::CLOSED),
            forward: Counts {
                packets: u64_at(off::FWD_PACKETS),
                bytes: u64_at(off::FWD_BYTES),
            },
            reply: Counts {
                packets: u64_at(off::REPLY_PACKETS),
                bytes: u64_at(off::REPLY_BYTES),
            },
        })
    }
}

/// Encodes a batch of at most [`MAX_BATCH`] records from switch `switch`
/// into `out` (replacing its contents).
pub fn encode_batch(switch: u16, records: &[ClosedRecord], out: &mut Vec<u8>) {
    assert!(
        records.len() <= MAX_BATCH,
        "a batch holds at most {MAX_BATCH}"
    );
    out.clear();
    out.resize(BATCH_HEADER_LEN, 0);
    out[off::VERSION] = BATCH_VERSION;
    out[off::KIND] = KIND_CLOSED;
    put(out, off::COUNT, (records.len() as u16).to_le_bytes());
    put(out, off::SWITCH, switch.to_le_bytes());
    for r in records {
        r.encode(out);
    }
}

/// A decoded batch: the sending switch and its records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    pub switch: u16,
    pub records: Vec<ClosedRecord>,
}

/// Decodes and validates a batch.
pub fn decode_batch(b: &[u8]) -> Result<Batch, RecordError> {
    if b.len() < BATCH_HEADER_LEN {
        return Err(RecordError::Short(b.len()));
    }
    if b[off::VERSION] != BATCH_VERSION {
        return Err(RecordError::Version(b[off::VERSION]));
    }
    if b[off::KIND] != KIND_CLOSED {
        return Err(RecordError::Kind(b[off::KIND]));
    }
    let count = u16::from_le_bytes(get(b, off::COUNT)) as usize;
    let expected = BATCH_HEADER_LEN + count * RECORD_LEN;
    if b.len() != expected {
        return Err(RecordError::Length {
            count,
            len: b.len(),
            expected,
        });
    }
    let records = b[BATCH_HEADER_LEN..]
        .chunks_exact(RECORD_LEN)
        .enumerate()
        .map(|(i, r)| ClosedRecord::decode(r.try_into().expect("exact chunk"), i))
        .collect::<Result<_, _>>()?;
    Ok(Batch {
        switch: u16::from_le_bytes(get(b, off::SWITCH)),
        records,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(i: u32) -> ClosedRecord {
        ClosedRecord {
            conn: Conn {
                proto: 6,
                mode: 0,
                flags: 1,
                backend_id: 40 + i,
                client_ip: 0xc612_0001 + i,
                client_port: 40_000 + i as u16,
                vip: 0xc612_000a,
                vip_port: 80,
                backend_ip: 0xc613_0101,
                backend_port: 8080,
                service: 3,
                created_ms: 1000 + i,
            },
            reason: CloseReason::ALL[i as usize % 7],
            closed_ms: 5000 + i,
            forward: Counts {
                packets: 7 + u64::from(i),
                bytes: 1 << 40 | u64::from(i),
            },
            reply: Counts {
                packets: 9,
                bytes: 12_345,
            },
        }
    }

    #[test]
    fn a_batch_comes_back_field_for_field() {
        let recs: Vec<_> = (0..20).map(rec).collect();
        let mut b = Vec::new();
        encode_batch(3, &recs, &mut b);
        assert_eq!(b.len(), BATCH_HEADER_LEN + 20 * RECORD_LEN);
        assert_eq!(
            decode_batch(&b),
            Ok(Batch {
                switch: 3,
                records: recs
            })
        );
        encode_batch(0, &[], &mut b);
        assert_eq!(decode_batch(&b).unwrap().records, vec![]);
    }

    #[test]
    fn corrupt_batches_are_errors_naming_the_value() {
        let mut b = Vec::new();
        encode_batch(1, &[rec(0), rec(1)], &mut b);
        let bad = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut c = b.clone();
            f(&mut c);
            decode_batch(&c).unwrap_err().to_string()
        };
        assert_eq!(
            bad(&|c| c.truncate(5)),
            "batch of 5 bytes is shorter than its 8-byte header"
        );
        assert_eq!(bad(&|c| c[0] = 9), "batch version 9, expected 1");
        assert_eq!(bad(&|c| c[1] = 2), "batch kind 2, expected 1");
        assert_eq!(
            bad(&|c| c[2] = 3),
            "batch says 3 records but holds 152 bytes (expected 224)"
        );
        assert_eq!(
            bad(&|c| c.pop().map(drop).unwrap_or(())),
            "batch says 2 records but holds 151 bytes (expected 152)"
        );
        assert_eq!(
            bad(&|c| c[BATCH_HEADER_LEN + RECORD_LEN] = 0),
            "record 1: close reason 0 is not one of 1..=7"
        );
    }

    proptest::proptest! {
        /// Any bytes decode to a batch or an error, never a panic.
        #[test]
        fn any_bytes_decode_without_panic(b in proptest::collection::vec(proptest::num::u8::ANY, 0..400)) {
            let _ = decode_batch(&b);
        }
    }
}
