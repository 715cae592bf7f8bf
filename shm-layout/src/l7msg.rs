//! Layer-7 messages between a switch and controld: the *bundle* a switch
//! sends once it holds a client's handshake and request head, and the
//! *decision* controld answers with. Two messages per l7 connection; they
//! travel as plain bytes (the message ring knows nothing of them).
//!
//! Both are fixed little-endian headers followed by a byte string, with a
//! version byte first. [`Bundle::decode`] and [`Decision::decode`] check
//! every field and length against the bytes they are given: a truncated,
//! extended or corrupted message is an error, never a panic, and never
//! reads past the message. The layouts (offsets are the constants below):
//!
//! Bundle, 52 bytes then the head:
//! ```text
//!  0 version u8 (1)   1 kind u8 (1)   2 flags u8   3 wscale u8
//!  4 switch u16       6 mss u16       8 slot u32   12 slot_lock u64
//! 20 client ip u32   24 client port u16   26 vip port u16   28 vip ip u32
//! 32 service u32     36 client isn u32    40 tsval u32      44 tsecr u32
//! 48 head length u32 52 head
//! ```
//! Decision, 48 bytes then the bytes to send:
//! ```text
//!  0 version u8 (1)   1 kind u8 (2)   2 verdict u8   3 zero u8
//!  4 switch u16       6 status u16    8 slot u32    12 slot_lock u64
//! 20 client ip u32   24 client port u16   26 vip port u16   28 vip ip u32
//! 32 backend id u32  36 backend ip u32    40 backend port u16 42 zero u16
//! 44 bytes length u32 48 bytes
//! ```

use std::net::Ipv4Addr;

/// The version byte of both messages.
pub const VERSION: u8 = 1;
/// `kind` of a bundle.
pub const KIND_BUNDLE: u8 = 1;
/// `kind` of a decision.
pub const KIND_DECISION: u8 = 2;
/// The longest request head a bundle carries (`[l7] head_limit` at most).
pub const MAX_HEAD: usize = 65536;
/// The longest byte string a decision carries: a head and a PROXY v2
/// header, or an error response.
pub const MAX_DECISION_BYTES: usize = MAX_HEAD + 256;
/// The largest TCP window scale (RFC 7323).
pub const MAX_WSCALE: u8 = 14;

/// Bundle `flags`: the client offered a window scale (`wscale` is its shift).
pub const FLAG_WSCALE: u8 = 1;
/// Bundle `flags`: the client offered SACK.
pub const FLAG_SACK: u8 = 2;
/// Bundle `flags`: the client sent timestamps (`tsval`, `tsecr`).
pub const FLAG_TIMESTAMPS: u8 = 4;
const FLAGS_KNOWN: u8 = FLAG_WSCALE | FLAG_SACK | FLAG_TIMESTAMPS;

/// Decision `verdict`: forward to a backend.
pub const VERDICT_FORWARD: u8 = 1;
/// Decision `verdict`: answer the client with an HTTP error and close.
pub const VERDICT_REJECT: u8 = 2;

// Offsets shared by both messages.
const VERSION_AT: usize = 0;
const KIND_AT: usize = 1;
const SWITCH_AT: usize = 4;
const SLOT_AT: usize = 8;
const SLOT_LOCK_AT: usize = 12;
const CLIENT_IP_AT: usize = 20;
const CLIENT_PORT_AT: usize = 24;
const VIP_PORT_AT: usize = 26;
const VIP_IP_AT: usize = 28;
// Bundle.
const FLAGS_AT: usize = 2;
const WSCALE_AT: usize = 3;
const MSS_AT: usize = 6;
const SERVICE_AT: usize = 32;
const ISN_AT: usize = 36;
const TSVAL_AT: usize = 40;
const TSECR_AT: usize = 44;
const HEAD_LEN_AT: usize = 48;
/// Bytes of a bundle before its head.
pub const BUNDLE_HEADER: usize = 52;
// Decision.
const VERDICT_AT: usize = 2;
const ZERO8_AT: usize = 3;
const STATUS_AT: usize = 6;
const BACKEND_ID_AT: usize = 32;
const BACKEND_IP_AT: usize = 36;
const BACKEND_PORT_AT: usize = 40;
const ZERO16_AT: usize = 42;
const BYTES_LEN_AT: usize = 44;
/// Bytes of a decision before its byte string.
pub const DECISION_HEADER: usize = 48;

/// Why a message could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MsgError {
    #[error("message of {got} bytes is shorter than its {need}-byte header")]
    Short { need: usize, got: usize },
    #[error("message version {0} is not supported (this build speaks version {VERSION})")]
    Version(u8),
    #[error("message kind {got} is not the expected kind {want}")]
    Kind { want: u8, got: u8 },
    #[error("{what} of {len} bytes exceeds {max}")]
    TooLong {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error("message is {got} bytes, its lengths say {want}")]
    Length { want: usize, got: usize },
    #[error("buffer of {got} bytes cannot hold the {need}-byte message")]
    Buffer { need: usize, got: usize },
    #[error("field {field} has invalid value {value}")]
    Field { field: &'static str, value: u64 },
}

/// Which connection a message is about: the switch, the forward slot of
/// the connection table that holds it, and the slot's lock word when the
/// bundle was sent. A decision whose slot no longer holds that lock word
/// (the slot was freed or reused) is stale and is dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ConnRef {
    pub switch: u16,
    pub slot: u32,
    pub slot_lock: u64,
}

/// The client's and the VIP's addresses of the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoints {
    pub client: Ipv4Addr,
    pub client_port: u16,
    pub vip: Ipv4Addr,
    pub vip_port: u16,
}

/// What a switch sends controld for a new l7 connection: the handshake
/// facts it needs to open and splice the back-end side, and the head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    pub conn: ConnRef,
    pub ends: Endpoints,
    /// The service's index in the configuration slot.
    pub service: u32,
    /// The client's initial sequence number.
    pub client_isn: u32,
    /// The MSS the client offered (536 when it offered none).
    pub mss: u16,
    /// The client's window scale shift, `0..=14`; `None` if not offered.
    pub wscale: Option<u8>,
    /// Whether the client offered SACK.
    pub sack_permitted: bool,
    /// The client's last `(tsval, tsecr)`; `None` without timestamps.
    pub timestamps: Option<(u32, u32)>,
    /// The request head, at most [`MAX_HEAD`] bytes.
    pub head: Vec<u8>,
}

/// What controld decided for one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Open a connection to this backend and send it `bytes`.
    Forward {
        backend_id: u32,
        ip: Ipv4Addr,
        port: u16,
    },
    /// Send the client `bytes` (an HTTP response with this status) and close.
    Reject { status: u16 },
}

/// controld's answer to a [`Bundle`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub conn: ConnRef,
    pub ends: Endpoints,
    pub verdict: Verdict,
    /// Forward: what to send the backend first (an optional PROXY v2
    /// header, then the head). Reject: the whole HTTP response for the
    /// client. At most [`MAX_DECISION_BYTES`].
    pub bytes: Vec<u8>,
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// Checks the fixed header (length, version, kind) and the total length
/// that the header's byte-string length gives; returns that string.
fn frame(b: &[u8], header: usize, kind: u8, len_at: usize, max: usize) -> Result<&[u8], MsgError> {
    if b.len() < header {
        return Err(MsgError::Short {
            need: header,
            got: b.len(),
        });
    }
    if b[VERSION_AT] != VERSION {
        return Err(MsgError::Version(b[VERSION_AT]));
    }
    if b[KIND_AT] != kind {
        return Err(MsgError::Kind {
            want: kind,
            got: b[KIND_AT],
        });
    }
    let len = u32_at(b, len_at) as usize;
    if len > max {
        return Err(MsgError::TooLong {
            what: "byte string",
            len,
            max,
        });
    }
    if b.len() != header + len {
        return Err(MsgError::Length {
            want: header + len,
            got: b.len(),
        });
    }
    Ok(&b[header..])
}

fn put_common(b: &mut [u8], kind: u8, conn: &ConnRef, ends: &Endpoints) {
    b[VERSION_AT] = VERSION;
    b[KIND_AT] = kind;
    put16(b, SWITCH_AT, conn.switch);
    put32(b, SLOT_AT, conn.slot);
    put64(b, SLOT_LOCK_AT, conn.slot_lock);
    put32(b, CLIENT_IP_AT, u32::from(ends.client));
    put16(b, CLIENT_PORT_AT, ends.client_port);
    put16(b, VIP_PORT_AT, ends.vip_port);
    put32(b, VIP_IP_AT, u32::from(ends.vip));
}

fn get_common(b: &[u8]) -> (ConnRef, Endpoints) {
    (
        ConnRef {
            switch: u16_at(b, SWITCH_AT),
            slot: u32_at(b, SLOT_AT),
            slot_lock: u64_at(b, SLOT_LOCK_AT),
        },
        Endpoints {
            client: Ipv4Addr::from(u32_at(b, CLIENT_IP_AT)),
            client_port: u16_at(b, CLIENT_PORT_AT),
            vip: Ipv4Addr::from(u32_at(b, VIP_IP_AT)),
            vip_port: u16_at(b, VIP_PORT_AT),
        },
    )
}

fn room(buf: &[u8], need: usize) -> Result<(), MsgError> {
    if buf.len() < need {
        return Err(MsgError::Buffer {
            need,
            got: buf.len(),
        });
    }
    Ok(())
}

impl Bundle {
    /// The encoded length.
    pub fn len(&self) -> usize {
        BUNDLE_HEADER + self.head.len()
    }

    /// Whether the head is empty (a bundle always has its header).
    pub fn is_empty(&self) -> bool {
        self.head.is_empty()
    }

    /// Writes the bundle at the start of `buf`; returns its length.
    pub fn encode(&self, buf: &mut [u8]) -> Result<usize, MsgError> {
        if self.head.len() > MAX_HEAD {
            return Err(MsgError::TooLong {
                what: "request head",
                len: self.head.len(),
                max: MAX_HEAD,
            });
        }
        if let Some(w) = self.wscale
            && w > MAX_WSCALE
        {
            return Err(MsgError::Field {
                field: "wscale",
                value: w.into(),
            });
        }
        let n = self.len();
        room(buf, n)?;
        let b = &mut buf[..n];
        b[..BUNDLE_HEADER].fill(0);
        put_common(b, KIND_BUNDLE, &self.conn, &self.ends);
        let mut flags = 0;
        if let Some(w) = self.wscale {
            flags |= FLAG_WSCALE;
            b[WSCALE_AT] = w;
        }
        if self.sack_permitted {
            flags |= FLAG_SACK;
        }
        if let Some((v, e)) = self.timestamps {
            flags |= FLAG_TIMESTAMPS;
            put32(b, TSVAL_AT, v);
            put32(b, TSECR_AT, e);
        }
        b[FLAGS_AT] = flags;
        put16(b, MSS_AT, self.mss);
        put32(b, SERVICE_AT, self.service);
        put32(b, ISN_AT, self.client_isn);
        put32(b, HEAD_LEN_AT, self.head.len() as u32);
        b[BUNDLE_HEADER..].copy_from_slice(&self.head);
        Ok(n)
    }

    /// Reads a bundle that is exactly `b`.
    pub fn decode(b: &[u8]) -> Result<Self, MsgError> {
        let head = frame(b, BUNDLE_HEADER, KIND_BUNDLE, HEAD_LEN_AT, MAX_HEAD)?;
        let flags = b[FLAGS_AT];
        if flags & !FLAGS_KNOWN != 0 {
            return Err(MsgError::Field {
                field: "flags",
                value: flags.into(),
            });
        }
        let w = b[WSCALE_AT];
        let wscale = if flags & FLAG_WSCALE != 0 {
            if w > MAX_WSCALE {
                return Err(MsgError::Field {
                    field: "wscale",
                    value: w.into(),
                });
            }
            Some(w)
        } else if w != 0 {
            return Err(MsgError::Field {
                field: "wscale",
                value: w.into(),
            });
        } else {
            None
        };
        let (tsval, tsecr) = (u32_at(b, TSVAL_AT), u32_at(b, TSECR_AT));
        let timestamps = if flags & FLAG_TIMESTAMPS != 0 {
            Some((tsval, tsecr))
        } else if (tsval, tsecr) != (0, 0) {
            return Err(MsgError::Field {
                field: "timestamps",
                value: (u64::from(tsval) << 32) | u64::from(tsecr),
            });
        } else {
            None
        };
        let (conn, ends) = get_common(b);
        Ok(Bundle {
            conn,
            ends,
            service: u32_at(b, SERVICE_AT),
            client_isn: u32_at(b, ISN_AT),
            mss: u16_at(b, MSS_AT),
            wscale,
            sack_permitted: flags & FLAG_SACK != 0,
            timestamps,
            head: head.to_vec(),
        })
    }
}

impl Decision {
    /// The encoded length.
    pub fn len(&self) -> usize {
        DECISION_HEADER + self.bytes.len()
    }

    /// Whether the byte string is empty (a decision always has its header).
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Writes the decision at the start of `buf`; returns its length.
    pub fn encode(&self, buf: &mut [u8]) -> Result<usize, MsgError> {
        if self.bytes.len() > MAX_DECISION_BYTES {
            return Err(MsgError::TooLong {
                what: "decision bytes",
                len: self.bytes.len(),
                max: MAX_DECISION_BYTES,
            });
        }
        if let Verdict::Reject { status } = self.verdict
            && !(100..=599).contains(&status)
        {
            return Err(MsgError::Field {
                field: "status",
                value: status.into(),
            });
        }
        let n = self.len();
        room(buf, n)?;
        let b = &mut buf[..n];
        b[..DECISION_HEADER].fill(0);
        put_common(b, KIND_DECISION, &self.conn, &self.ends);
        match self.verdict {
            Verdict::Forward {
                backend_id,
                ip,
                port,
            } => {
                b[VERDICT_AT] = VERDICT_FORWARD;
                put32(b, BACKEND_ID_AT, backend_id);
                put32(b, BACKEND_IP_AT, u32::from(ip));
                put16(b, BACKEND_PORT_AT, port);
            }
            Verdict::Reject { status } => {
                b[VERDICT_AT] = VERDICT_REJECT;
                put16(b, STATUS_AT, status);
            }
        }
        put32(b, BYTES_LEN_AT, self.bytes.len() as u32);
        b[DECISION_HEADER..].copy_from_slice(&self.bytes);
        Ok(n)
    }

    /// Reads a decision that is exactly `b`.
    pub fn decode(b: &[u8]) -> Result<Self, MsgError> {
        let bytes = frame(
            b,
            DECISION_HEADER,
            KIND_DECISION,
            BYTES_LEN_AT,
            MAX_DECISION_BYTES,
        )?;
        // `len` is at most 8: the value must fit the error's u64.
        let zero = |field, at: usize, len: usize| {
            let v = b[at..at + len]
                .iter()
                .fold(0u64, |a, &x| (a << 8) | u64::from(x));
            if v == 0 {
                Ok(())
            } else {
                Err(MsgError::Field { field, value: v })
            }
        };
        zero("reserved", ZERO8_AT, 1)?;
        zero("reserved", ZERO16_AT, 2)?;
        let verdict = match b[VERDICT_AT] {
            VERDICT_FORWARD => {
                zero("status", STATUS_AT, 2)?;
                Verdict::Forward {
                    backend_id: u32_at(b, BACKEND_ID_AT),
                    ip: Ipv4Addr::from(u32_at(b, BACKEND_IP_AT)),
                    port: u16_at(b, BACKEND_PORT_AT),
                }
            }
            VERDICT_REJECT => {
                let status = u16_at(b, STATUS_AT);
                if !(100..=599).contains(&status) {
                    return Err(MsgError::Field {
                        field: "status",
                        value: status.into(),
                    });
                }
                zero("backend id", BACKEND_ID_AT, 4)?;
                zero("backend ip", BACKEND_IP_AT, 4)?;
                zero("backend port", BACKEND_PORT_AT, 2)?;
                Verdict::Reject { status }
            }
            v => {
                return Err(MsgError::Field {
                    field: "verdict",
                    value: v.into(),
                });
            }
        };
        let (conn, ends) = get_common(b);
        Ok(Decision {
            conn,
            ends,
            verdict,
            bytes: bytes.to_vec(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn bundle() -> Bundle {
        Bundle {
            conn: ConnRef {
                switch: 2,
                slot: 0x0102_0304,
                slot_lock: 0x1122_3344_5566_7788,
            },
            ends: Endpoints {
                client: Ipv4Addr::new(198, 18, 100, 7),
                client_port: 40000,
                vip: Ipv4Addr::new(198, 18, 0, 10),
                vip_port: 80,
            },
            service: 3,
            client_isn: 0xdead_beef,
            mss: 1460,
            wscale: Some(7),
            sack_permitted: true,
            timestamps: Some((1000, 0)),
            head: b"GET / HTTP/1.1\r\nHost: a\r\n\r\n".to_vec(),
        }
    }

    fn decision() -> Decision {
        let b = bundle();
        Decision {
            conn: b.conn,
            ends: b.ends,
            verdict: Verdict::Forward {
                backend_id: 9,
                ip: Ipv4Addr::new(198, 19, 1, 1),
                port: 8080,
            },
            bytes: b.head,
        }
    }

    fn encoded_bundle(b: &Bundle) -> Vec<u8> {
        let mut buf = vec![0u8; b.len()];
        assert_eq!(b.encode(&mut buf), Ok(b.len()));
        buf
    }

    fn encoded_decision(d: &Decision) -> Vec<u8> {
        let mut buf = vec![0u8; d.len()];
        assert_eq!(d.encode(&mut buf), Ok(d.len()));
        buf
    }

    #[test]
    fn bundle_bytes_are_the_documented_layout() {
        let e = encoded_bundle(&bundle());
        let mut want = vec![
            1, 1, 7, 7, // version, kind, flags (wscale|sack|ts), wscale
            2, 0, 0xb4, 0x05, // switch 2, mss 1460
            4, 3, 2, 1, // slot
            0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11, // slot lock
            7, 100, 18, 198, // client ip (LE of host order)
            0x40, 0x9c, 80, 0, // client port 40000, vip port 80
            10, 0, 18, 198, // vip
            3, 0, 0, 0, // service
            0xef, 0xbe, 0xad, 0xde, // isn
            0xe8, 3, 0, 0, 0, 0, 0, 0, // tsval 1000, tsecr 0
            27, 0, 0, 0, // head length
        ];
        want.extend_from_slice(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(e, want);
    }

    #[test]
    fn decision_bytes_are_the_documented_layout() {
        let mut d = decision();
        d.verdict = Verdict::Reject { status: 503 };
        d.bytes = b"x".to_vec();
        let e = encoded_decision(&d);
        let want = vec![
            1, 2, 2, 0, // version, kind, reject, zero
            2, 0, 0xf7, 0x01, // switch, status 503
            4, 3, 2, 1, 0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11, //
            7, 100, 18, 198, 0x40, 0x9c, 80, 0, 10, 0, 18, 198, //
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, // no backend
            1, 0, 0, 0, b'x',
        ];
        assert_eq!(e, want);
    }

    #[test]
    fn every_truncation_and_extension_is_an_error() {
        let b = encoded_bundle(&bundle());
        for n in 0..b.len() {
            assert!(Bundle::decode(&b[..n]).is_err(), "bundle cut at {n}");
        }
        let mut longer = b.clone();
        longer.push(0);
        assert_eq!(
            Bundle::decode(&longer),
            Err(MsgError::Length {
                want: b.len(),
                got: b.len() + 1
            })
        );
        let d = encoded_decision(&decision());
        for n in 0..d.len() {
            assert!(Decision::decode(&d[..n]).is_err(), "decision cut at {n}");
        }
        assert_eq!(
            Bundle::decode(&b[..10]),
            Err(MsgError::Short { need: 52, got: 10 })
        );
    }

    #[test]
    fn corrupt_fields_are_named() {
        let good = encoded_bundle(&bundle());
        let bad = |at: usize, v: u8| {
            let mut b = good.clone();
            b[at] = v;
            Bundle::decode(&b)
        };
        assert_eq!(bad(0, 2), Err(MsgError::Version(2)));
        assert_eq!(bad(1, 2), Err(MsgError::Kind { want: 1, got: 2 }));
        assert_eq!(
            bad(2, 8 | 7),
            Err(MsgError::Field {
                field: "flags",
                value: 15
            })
        );
        assert_eq!(
            bad(3, 15),
            Err(MsgError::Field {
                field: "wscale",
                value: 15
            })
        );
        // A head length past the limit is refused before any length match.
        let mut b = good.clone();
        b[48..52].copy_from_slice(&(MAX_HEAD as u32 + 1).to_le_bytes());
        assert_eq!(
            Bundle::decode(&b),
            Err(MsgError::TooLong {
                what: "byte string",
                len: MAX_HEAD + 1,
                max: MAX_HEAD
            })
        );
        let mut nows = bundle();
        nows.wscale = None;
        nows.timestamps = None;
        let mut b = encoded_bundle(&nows);
        assert_eq!(Bundle::decode(&b), Ok(nows));
        b[3] = 1;
        assert_eq!(
            Bundle::decode(&b),
            Err(MsgError::Field {
                field: "wscale",
                value: 1
            })
        );

        let good = encoded_decision(&decision());
        let bad = |at: usize, v: u8| {
            let mut b = good.clone();
            b[at] = v;
            Decision::decode(&b)
        };
        assert_eq!(
            bad(2, 3),
            Err(MsgError::Field {
                field: "verdict",
                value: 3
            })
        );
        assert_eq!(
            bad(6, 1),
            Err(MsgError::Field {
                field: "status",
                value: 256
            })
        );
        assert_eq!(
            bad(42, 1),
            Err(MsgError::Field {
                field: "reserved",
                value: 256
            })
        );
        assert_eq!(bad(1, 1), Err(MsgError::Kind { want: 2, got: 1 }));
        // A reject carries no backend: every byte of it is checked (the
        // second byte of the id once slipped through a 10-byte fold).
        let mut r = decision();
        r.verdict = Verdict::Reject { status: 503 };
        let good = encoded_decision(&r);
        for at in BACKEND_ID_AT..ZERO16_AT {
            let mut b = good.clone();
            b[at] = 1;
            assert!(Decision::decode(&b).is_err(), "byte {at} accepted");
        }
        for (at, field) in [
            (32, "backend id"),
            (33, "backend id"),
            (36, "backend ip"),
            (40, "backend port"),
            (41, "backend port"),
        ] {
            let mut b = good.clone();
            b[at] = 1;
            assert!(
                matches!(Decision::decode(&b), Err(MsgError::Field { field: f, .. }) if f == field),
                "byte {at}"
            );
        }
    }

    #[test]
    fn encode_refuses_what_decode_would() {
        let mut b = bundle();
        b.wscale = Some(15);
        assert_eq!(
            b.encode(&mut [0u8; 200]),
            Err(MsgError::Field {
                field: "wscale",
                value: 15
            })
        );
        b.wscale = None;
        b.head = vec![b'a'; MAX_HEAD + 1];
        assert_eq!(
            b.encode(&mut vec![0u8; MAX_HEAD + 100]),
            Err(MsgError::TooLong {
                what: "request head",
                len: MAX_HEAD + 1,
                max: MAX_HEAD
            })
        );
        let b = bundle();
        assert_eq!(
            b.encode(&mut [0u8; 60]),
            Err(MsgError::Buffer { need: 79, got: 60 })
        );
        let mut d = decision();
        d.verdict = Verdict::Reject { status: 99 };
        assert_eq!(
            d.encode(&mut [0u8; 200]),
            Err(MsgError::Field {
                field: "status",
                value: 99
            })
        );
    }

    fn arb_bundle() -> impl Strategy<Value = Bundle> {
        (
            (any::<u16>(), any::<u32>(), any::<u64>()),
            (any::<u32>(), any::<u16>(), any::<u32>(), any::<u16>()),
            (any::<u32>(), any::<u32>(), any::<u16>()),
            (
                proptest::option::of(0u8..=MAX_WSCALE),
                any::<bool>(),
                proptest::option::of((any::<u32>(), any::<u32>())),
            ),
            proptest::collection::vec(any::<u8>(), 0..600),
        )
            .prop_map(
                |((sw, slot, lock), (cip, cp, vip, vp), (svc, isn, mss), (ws, sack, ts), head)| {
                    Bundle {
                        conn: ConnRef {
                            switch: sw,
                            slot,
                            slot_lock: lock,
                        },
                        ends: Endpoints {
                            client: Ipv4Addr::from(cip),
                            client_port: cp,
                            vip: Ipv4Addr::from(vip),
                            vip_port: vp,
                        },
                        service: svc,
                        client_isn: isn,
                        mss,
                        wscale: ws,
                        sack_permitted: sack,
                        timestamps: ts,
                        head,
                    }
                },
            )
    }

    fn arb_decision() -> impl Strategy<Value = Decision> {
        (
            arb_bundle(),
            prop_oneof![
                (any::<u32>(), any::<u32>(), any::<u16>()).prop_map(|(id, ip, port)| {
                    Verdict::Forward {
                        backend_id: id,
                        ip: Ipv4Addr::from(ip),
                        port,
                    }
                }),
                (100u16..=599).prop_map(|status| Verdict::Reject { status }),
            ],
            proptest::collection::vec(any::<u8>(), 0..600),
        )
            .prop_map(|(b, verdict, bytes)| Decision {
                conn: b.conn,
                ends: b.ends,
                verdict,
                bytes,
            })
    }

    proptest! {
        #[test]
        fn bundles_round_trip(b in arb_bundle()) {
            let e = encoded_bundle(&b);
            prop_assert_eq!(Bundle::decode(&e), Ok(b));
        }

        #[test]
        fn decisions_round_trip(d in arb_decision()) {
            let e = encoded_decision(&d);
            prop_assert_eq!(Decision::decode(&e), Ok(d));
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Bundle::decode(&bytes);
            let _ = Decision::decode(&bytes);
        }

        /// A valid message with one byte changed decodes to an error or to a
        /// message that encodes back to exactly those bytes (never a panic,
        /// never a lossy read).
        #[test]
        fn corrupted_messages_decode_exactly_or_fail(
            b in arb_bundle(), d in arb_decision(), at in any::<usize>(), x in 1u8..=255,
        ) {
            let mut e = encoded_bundle(&b);
            let i = at % e.len();
            e[i] ^= x;
            if let Ok(c) = Bundle::decode(&e) {
                prop_assert_eq!(encoded_bundle(&c), e);
            }
            let mut e = encoded_decision(&d);
            let i = at % e.len();
            e[i] ^= x;
            if let Ok(c) = Decision::decode(&e) {
                prop_assert_eq!(encoded_decision(&c), e);
            }
        }
    }
}
