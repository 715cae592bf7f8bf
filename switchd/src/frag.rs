//! The switch's fragment table: where the later fragments of a datagram
//! learn where its first fragment went, and where they wait when they
//! arrive before it.
//!
//! The switch does not reassemble (as IPVS and Katran do not): the first
//! fragment (offset 0) carries the TCP/UDP header, so the filter switches
//! it like a whole packet (connection lookup or a new connection,
//! scheduling, rewrite) and remembers its [`Decision`] here, keyed by the
//! datagram's (source, destination, protocol, IP identification). A later
//! fragment with a remembered decision is rewritten the same way (same
//! egress port and MACs, the same address translation or tunnel). A
//! remembered decision lasts [`TIMEOUT_MS`], or until every byte of the
//! datagram passed (the last fragment says how long it is).
//!
//! A later fragment whose first one has not passed yet is held: copied
//! into the table (the NIC buffer goes back at once, as the SYN queue of
//! [`crate::synq`] does) and offered again once a decision for its datagram
//! arrives, or dropped when it waited [`TIMEOUT_MS`].
//!
//! Bounded: a fixed number of decisions (the oldest is overwritten) and of
//! held fragments, one buffer of [`SLOT_BYTES`] each, all allocated at
//! start; nothing allocates afterwards.

use crate::synq::{Retry, SLOT_BYTES};

/// The key the fragments of one datagram share: (source and destination
/// address, protocol << 16 | IP identification), as
/// [`wire::Ipv4Fragment::key`] gives it.
pub type FragKey = (u64, u32);

/// How long a decision is remembered and a fragment held.
pub const TIMEOUT_MS: u32 = 2_000;
/// Default number of remembered decisions (datagrams).
pub const DEFAULT_DECISIONS: usize = 256;
/// Default number of held fragments.
pub const DEFAULT_HELD: usize = 64;
/// Room a held fragment's scratch copy has past [`SLOT_BYTES`] (a tunnel
/// header prepended on release).
const SCRATCH_EXTRA: usize = 64;

/// The address translation the first fragment got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Translation {
    /// Direct routing: addresses unchanged.
    None,
    /// Destination becomes this address (NAT, client -> backend).
    Dst(u32),
    /// Source becomes this address (NAT, backend -> client).
    Src(u32),
    /// IP-in-IP from `src` to `dst` (tunnel mode).
    Tunnel { src: u32, dst: u32 },
}

/// What happened to a datagram's first fragment, for its later ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    /// Global egress port.
    pub port: u32,
    /// Destination then source MAC of the frame that went out.
    pub macs: [u8; 12],
    pub translation: Translation,
}

#[derive(Clone, Copy, Debug)]
struct Remembered {
    key: FragKey,
    decision: Decision,
    since_ms: u32,
    /// Payload bytes of the datagram that passed.
    seen: u32,
    /// The datagram's payload length, once its last fragment passed (0:
    /// not yet known).
    total: u32,
}

#[derive(Clone, Copy, Debug)]
struct Held {
    key: FragKey,
    slot: u16,
    len: u16,
    since_ms: u32,
}

/// What a held fragment is offered for (see [`FragTable::release`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Offer {
    /// Its first fragment passed: rewrite and send it by this decision.
    Release(Decision),
    /// It waited [`TIMEOUT_MS`] for its first fragment: drop it.
    Expired,
}

/// Remembered decisions and held fragments, per switch.
#[derive(Debug)]
pub struct FragTable {
    /// A ring: the next decision overwrites `decisions[next]`.
    decisions: Vec<Option<Remembered>>,
    next: usize,
    held: Vec<Held>,
    bufs: Vec<u8>,
    free: Vec<u16>,
    scratch: Vec<u8>,
    /// A decision arrived for a datagram with held fragments.
    ready: bool,
    /// The earliest time a held fragment expires (meaningless when none).
    next_deadline: u32,
}

impl Default for FragTable {
    fn default() -> Self {
        Self::new(DEFAULT_DECISIONS, DEFAULT_HELD)
    }
}

impl FragTable {
    /// A table of `decisions` datagrams and `held` fragments (at most
    /// 65535). `new(0, 0)` allocates nothing (and remembers and holds
    /// nothing: every later fragment is dropped, counted).
    pub fn new(decisions: usize, held: usize) -> Self {
        let held = held.min(u16::MAX as usize);
        Self {
            decisions: vec![None; decisions],
            next: 0,
            held: Vec::with_capacity(held),
            bufs: vec![0; held * SLOT_BYTES],
            free: (0..held as u16).rev().collect(),
            scratch: vec![
                0;
                if held > 0 {
                    SLOT_BYTES + SCRATCH_EXTRA
                } else {
                    0
                }
            ],
            ready: false,
            next_deadline: 0,
        }
    }

    /// Fragments held now.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Remembers the decision for a datagram whose first fragment (of
    /// `payload` bytes) just went out. Replaces one of the same key, else
    /// takes the oldest place.
    pub fn decide(&mut self, key: FragKey, decision: Decision, payload: usize, now_ms: u32) {
        let r = Remembered {
            key,
            decision,
            since_ms: now_ms,
            seen: payload as u32,
            total: 0,
        };
        match self.find(key) {
            Some(i) => self.decisions[i] = Some(r),
            None if !self.decisions.is_empty() => {
                self.decisions[self.next] = Some(r);
                self.next = (self.next + 1) % self.decisions.len();
            }
            None => return,
        }
        self.ready |= self.held.iter().any(|h| h.key == key);
    }

    /// The decision a later fragment of datagram `key` follows (at byte
    /// `offset` of its payload, `payload` bytes, `more` fragments after
    /// it), if its first fragment passed less than [`TIMEOUT_MS`] ago.
    /// Counts its bytes: once the whole datagram passed, it is forgotten.
    pub fn follow(
        &mut self,
        key: FragKey,
        (offset, payload, more): (usize, usize, bool),
        now_ms: u32,
    ) -> Option<Decision> {
        let i = self.find(key)?;
        let r = self.decisions[i].as_mut().expect("found");
        if expired(r.since_ms, now_ms) {
            self.decisions[i] = None;
            return None;
        }
        let decision = r.decision;
        r.seen = r.seen.saturating_add(payload as u32);
        if !more {
            r.total = (offset + payload) as u32;
        }
        if r.total != 0 && r.seen >= r.total {
            self.decisions[i] = None;
        }
        Some(decision)
    }

    fn find(&self, key: FragKey) -> Option<usize> {
        self.decisions
            .iter()
            .position(|d| d.is_some_and(|d| d.key == key))
    }

    /// Copies a fragment that arrived before its first one in; false
    /// (nothing kept) when every place is taken or the frame is larger
    /// than a place.
    pub fn hold(&mut self, frame: &[u8], key: FragKey, now_ms: u32) -> bool {
        if frame.len() > SLOT_BYTES {
            return false;
        }
        let Some(slot) = self.free.pop() else {
            return false;
        };
        let at = slot as usize * SLOT_BYTES;
        self.bufs[at..at + frame.len()].copy_from_slice(frame);
        if self.held.is_empty() || (now_ms.wrapping_sub(self.next_deadline) as i32) < 0 {
            self.next_deadline = now_ms.wrapping_add(TIMEOUT_MS);
        }
        self.held.push(Held {
            key,
            slot,
            len: frame.len() as u16,
            since_ms: now_ms,
        });
        true
    }

    /// Whether [`release`](Self::release) has something to do: a decision
    /// arrived for a held fragment, or a held fragment waited its time.
    #[inline]
    pub fn needs_release(&self, now_ms: u32) -> bool {
        !self.held.is_empty() && (self.ready || now_ms.wrapping_sub(self.next_deadline) as i32 >= 0)
    }

    /// Offers every held fragment whose datagram has a decision now
    /// ([`Offer::Release`], its bytes counted as [`follow`](Self::follow)
    /// counts them) or that waited [`TIMEOUT_MS`] ([`Offer::Expired`]) to
    /// `f(frame, len, offer)`, oldest first: a scratch copy of the frame
    /// (`frame[..len]`; the buffer has room for a tunnel header). Each
    /// offered fragment leaves the table; the rest keep their order.
    pub fn release(&mut self, now_ms: u32, mut f: impl FnMut(&mut [u8], usize, Offer)) {
        self.ready = false;
        let mut kept = 0;
        for i in 0..self.held.len() {
            let h = self.held[i];
            let at = h.slot as usize * SLOT_BYTES;
            let len = h.len as usize;
            let frame = &self.bufs[at..at + len];
            let offer = match self.follow(h.key, span(frame), now_ms) {
                Some(d) => Some(Offer::Release(d)),
                None if expired(h.since_ms, now_ms) => Some(Offer::Expired),
                None => None,
            };
            let done = match offer {
                Some(offer) => {
                    self.scratch[..len].copy_from_slice(&self.bufs[at..at + len]);
                    f(&mut self.scratch, len, offer);
                    Retry::Done
                }
                None => Retry::Keep,
            };
            match done {
                Retry::Keep => {
                    let deadline = h.since_ms.wrapping_add(TIMEOUT_MS);
                    if kept == 0 || (deadline.wrapping_sub(self.next_deadline) as i32) < 0 {
                        self.next_deadline = deadline;
                    }
                    self.held[kept] = h;
                    kept += 1;
                }
                Retry::Done => self.free.push(h.slot),
            }
        }
        self.held.truncate(kept);
    }
}

/// Whether something stamped `since_ms` is past [`TIMEOUT_MS`] at `now_ms`.
#[inline]
fn expired(since_ms: u32, now_ms: u32) -> bool {
    let waited = now_ms.wrapping_sub(since_ms) as i32;
    waited >= 0 && waited as u32 >= TIMEOUT_MS
}

/// (offset, payload, more) of a held Ethernet/IPv4 fragment (validated
/// when it was held).
fn span(frame: &[u8]) -> (usize, usize, bool) {
    const ETH: usize = wire::ETHERNET_HEADER_LEN;
    let Some(h) = frame.get(ETH..).and_then(|b| b.first_chunk::<20>()) else {
        return (0, 0, true);
    };
    let word = u16::from_be_bytes([h[6], h[7]]);
    let hl = (h[0] & 0xf) as usize * 4;
    let total = u16::from_be_bytes([h[2], h[3]]) as usize;
    (
        usize::from(word & 0x1fff) * 8,
        total.saturating_sub(hl),
        word & 0x2000 != 0,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(port: u32) -> Decision {
        Decision {
            port,
            macs: [port as u8; 12],
            translation: Translation::Dst(7),
        }
    }

    /// An Ethernet/IPv4 fragment header (no payload bytes needed).
    fn frag(offset: usize, payload: usize, more: bool) -> Vec<u8> {
        let mut f = vec![0u8; 34];
        f[14] = 0x45;
        f[16..18].copy_from_slice(&((20 + payload) as u16).to_be_bytes());
        let word = (offset / 8) as u16 | if more { 0x2000 } else { 0 };
        f[20..22].copy_from_slice(&word.to_be_bytes());
        f
    }

    #[test]
    fn a_decision_lasts_its_timeout_or_until_the_datagram_passed() {
        let mut t = FragTable::new(4, 4);
        let k = (1, 2);
        assert_eq!(t.follow(k, (1480, 1480, true), 0), None);
        t.decide(k, d(1), 1480, 100);
        assert_eq!(t.follow(k, (1480, 1480, true), 100), Some(d(1)));
        // The last fragment completes it (1480 + 1480 + 1048).
        assert_eq!(t.follow(k, (2960, 1048, false), 100), Some(d(1)));
        assert_eq!(t.follow(k, (2960, 1048, false), 100), None, "forgotten");
        t.decide(k, d(2), 1480, 100);
        assert_eq!(
            t.follow(k, (2960, 8, true), 100 + TIMEOUT_MS - 1),
            Some(d(2))
        );
        assert_eq!(
            t.follow(k, (2968, 8, true), 100 + TIMEOUT_MS),
            None,
            "timed out"
        );
        // The oldest place is overwritten.
        for i in 0..5u32 {
            t.decide((9, i), d(i), 8, 200);
        }
        assert_eq!(t.follow((9, 0), (8, 8, true), 200), None);
        assert_eq!(t.follow((9, 4), (8, 8, true), 200), Some(d(4)));
    }

    #[test]
    fn held_fragments_are_released_by_a_decision_or_expire_and_stay_bounded() {
        let mut t = FragTable::new(4, 2);
        assert!(t.hold(&frag(1480, 1480, true), (1, 1), 1_000));
        assert!(t.hold(&frag(8, 8, false), (2, 2), 1_500));
        assert!(!t.hold(&frag(8, 8, false), (3, 3), 1_500), "full");
        assert!(!FragTable::new(1, 1).hold(&[0; SLOT_BYTES + 1], (1, 1), 0));
        assert!(!t.needs_release(2_999));
        t.decide((2, 2), d(5), 8, 1_600);
        assert!(t.needs_release(1_600));
        let mut seen = Vec::new();
        t.release(1_600, |b, len, o| seen.push((b[16..18].to_vec(), len, o)));
        assert_eq!(seen, [(vec![0, 28], 34, Offer::Release(d(5)))]);
        assert_eq!(t.held(), 1);
        assert!(!t.needs_release(2_999) && t.needs_release(3_000));
        let mut seen = Vec::new();
        t.release(3_000, |_, _, o| seen.push(o));
        assert_eq!(seen, [Offer::Expired]);
        assert_eq!(t.held(), 0);
        // Its place is free again; the released datagram was completed.
        assert!(t.hold(&frag(8, 8, false), (3, 3), 3_000));
        assert_eq!(t.follow((2, 2), (8, 8, false), 3_000), None);
    }
}
