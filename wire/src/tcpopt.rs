//! TCP options (RFC 9293 §3.2, RFC 7323, RFC 2018): the ones a handshake
//! negotiates, read from a segment's option bytes. Parsing stops at the
//! end-of-list option or at the first malformed option (a length below 2
//! or past the end), keeping what it read before: a stack answers what it
//! understood, and an option list is never trusted past a broken length.

/// Option kinds.
pub const KIND_END: u8 = 0;
pub const KIND_NOP: u8 = 1;
pub const KIND_MSS: u8 = 2;
pub const KIND_WINDOW_SCALE: u8 = 3;
pub const KIND_SACK_PERMITTED: u8 = 4;
pub const KIND_TIMESTAMPS: u8 = 8;

/// The handshake options of a segment (`None`/`false`: absent).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpOptions {
    pub mss: Option<u16>,
    pub window_scale: Option<u8>,
    pub sack_permitted: bool,
    /// (TSval, TSecr).
    pub timestamps: Option<(u32, u32)>,
}

/// The handshake options in `opts` (the bytes between the fixed 20-byte
/// header and the data offset). Never panics.
pub fn parse(opts: &[u8]) -> TcpOptions {
    let mut out = TcpOptions::default();
    let mut i = 0;
    while i < opts.len() {
        match opts[i] {
            KIND_END => break,
            KIND_NOP => {
                i += 1;
                continue;
            }
            kind => {
                let Some(&len) = opts.get(i + 1) else { break };
                let len = len as usize;
                if len < 2 || i + len > opts.len() {
                    break;
                }
                let body = &opts[i + 2..i + len];
                match (kind, body.len()) {
                    (KIND_MSS, 2) => out.mss = Some(u16::from_be_bytes([body[0], body[1]])),
                    (KIND_WINDOW_SCALE, 1) => out.window_scale = Some(body[0]),
                    (KIND_SACK_PERMITTED, 0) => out.sack_permitted = true,
                    (KIND_TIMESTAMPS, 8) => {
                        out.timestamps = Some((
                            u32::from_be_bytes([body[0], body[1], body[2], body[3]]),
                            u32::from_be_bytes([body[4], body[5], body[6], body[7]]),
                        ))
                    }
                    // Unknown kinds, and known kinds of a wrong length, are skipped.
                    _ => {}
                }
                i += len;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn linux_syn_options() {
        // What a Linux SYN carries: MSS 1460, SACK permitted, timestamps,
        // NOP, window scale 7.
        let o = [
            2, 4, 0x05, 0xb4, 4, 2, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0, 1, 3, 3, 7,
        ];
        assert_eq!(
            parse(&o),
            TcpOptions {
                mss: Some(1460),
                window_scale: Some(7),
                sack_permitted: true,
                timestamps: Some((1, 0)),
            }
        );
    }

    #[test]
    fn stops_at_end_and_at_bad_lengths() {
        assert_eq!(parse(&[0, 2, 4, 5, 0xb4]).mss, None);
        // MSS read, then a zero length: the rest is not read.
        let o = parse(&[2, 4, 1, 0, 3, 0, 4, 2]);
        assert_eq!((o.mss, o.sack_permitted), (Some(256), false));
        // A length past the end.
        assert_eq!(parse(&[2, 5, 1, 0]).mss, None);
        // MSS of the wrong length is skipped, the next option read.
        let o = parse(&[2, 3, 9, 4, 2]);
        assert_eq!((o.mss, o.sack_permitted), (None, true));
        assert_eq!(parse(&[1, 1, 2]), TcpOptions::default());
    }

    proptest! {
        #[test]
        fn never_panics(o in proptest::collection::vec(any::<u8>(), 0..40)) {
            let _ = parse(&o);
        }

        #[test]
        fn mss_alone_round_trips(mss in any::<u16>(), nops in 0usize..4) {
            let mut o = vec![1u8; nops];
            o.extend_from_slice(&[2, 4]);
            o.extend_from_slice(&mss.to_be_bytes());
            prop_assert_eq!(parse(&o).mss, Some(mss));
        }
    }
}
