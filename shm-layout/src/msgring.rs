//! Single-producer single-consumer rings of variable-length byte messages.
//!
//! One ring per switch and direction (today: switch -> controld, carrying
//! batches of closed-connection records; layer-7 bundles will use a second
//! one). The ring knows nothing of what it carries: a message is a byte
//! string of at most [`MsgRing::max_len`] bytes.
//!
//! Layout: a header ([`MsgRingHeader`]) and a power-of-two array of 64-bit
//! words. `tail` (words published) is written only by the producer,
//! `head` (words consumed) only by the consumer; both are free-running
//! word counters (position = counter % capacity). A message is one header
//! word (low 32 bits its length in bytes, high 32 bits [`MSG_MARK`])
//! followed by its bytes in little-endian words, the last one zero-padded.
//! A message never wraps: when it does not fit before the end of the array
//! the producer writes one [`PAD_MARK`] word and places the message at the
//! start (the consumer skips from a pad word to the end).
//!
//! Ordering and crashes (after `ring.rs`):
//! - the producer writes a message's words (Relaxed) and only then
//!   Release-stores `tail` past it; the consumer Acquire-loads `tail`
//!   before reading words. A producer killed at any instruction leaves
//!   `tail` before its half-written message: nothing half-written is ever
//!   published, and its successor (the restarted switch) writes over it.
//! - the consumer reads a message ([`MsgRing::peek`]) and Release-stores
//!   `head` past it only when it is done with it ([`MsgRing::advance`]);
//!   the producer Acquire-loads `head` before reusing words. A consumer
//!   killed in between leaves the message in the ring, and its successor
//!   (controld restarted, taking over the region) reads it again from
//!   `head`: nothing published is lost (a message may be handled twice if
//!   the consumer dies after handling it and before advancing).
//! - a message the ring has no room for is not written: the producer counts
//!   it in `dropped` (its own word) and goes on.
//! - the consumer trusts nothing it reads: a header word that is neither
//!   mark, a length over the maximum, or a message running past `tail` or
//!   the array's end (a bug or a stray write) makes it skip everything
//!   published so far and count it in `corrupt`; it never panics.

use core::mem::size_of;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::fingerprint::Fingerprint;
use crate::fp_type;

/// Bytes of each message ring's word array (a power of two).
pub const MSG_RING_BYTES: u64 = 1 << 18;

/// Message rings per switch (0: switch -> controld, closed-connection
/// records). Layer-7 bundles will add one.
pub const MSG_RINGS_PER_SWITCH: usize = 1;

/// The ring of a switch that carries its closed-connection records.
pub const RING_RECORDS: usize = 0;

/// High half of a message's header word.
pub const MSG_MARK: u64 = 0x4d53_4731; // "MSG1"
/// High half of a padding word: the rest of the array up to its end is unused.
pub const PAD_MARK: u64 = 0x5041_4431; // "PAD1"

#[repr(C, align(64))]
#[derive(Debug)]
pub struct MsgRingHeader {
    /// Words published (producer only).
    pub tail: AtomicU64,
    /// Messages the producer could not place (ring full, or too long).
    pub dropped: AtomicU64,
    /// Messages published, total (producer only).
    pub sent: AtomicU64,
    pub _pad0: [u8; 40],
    /// Words consumed (consumer only).
    pub head: AtomicU64,
    /// Times the consumer found a malformed message and skipped to `tail`.
    pub corrupt: AtomicU64,
    pub _pad1: [u8; 48],
}

const _: () = assert!(size_of::<MsgRingHeader>() == 128);
const _: () = assert!(MSG_RING_BYTES.is_power_of_two() && MSG_RING_BYTES >= 64);

pub(crate) const fn fingerprint(fp: Fingerprint) -> Fingerprint {
    let fp = fp_type!(fp, MsgRingHeader, tail, dropped, sent, head, corrupt);
    fp.mix(MSG_RING_BYTES as usize).mix(MSG_RINGS_PER_SWITCH)
}

/// Bytes of one ring in the region: its header and its words.
pub const fn ring_bytes() -> u64 {
    size_of::<MsgRingHeader>() as u64 + MSG_RING_BYTES
}

/// A message ring in a mapped region (or, in tests, in plain memory).
#[derive(Clone, Copy, Debug)]
pub struct MsgRing<'a> {
    header: &'a MsgRingHeader,
    words: &'a [AtomicU64],
}

/// A message [`MsgRing::peek`] read: [`MsgRing::advance`] consumes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub struct Peeked {
    next: u64,
}

#[inline]
fn words_for(len: usize) -> u64 {
    1 + len.div_ceil(8) as u64
}

impl<'a> MsgRing<'a> {
    /// `words.len()` must be a power of two of at least 8.
    pub fn new(header: &'a MsgRingHeader, words: &'a [AtomicU64]) -> Self {
        assert!(words.len().is_power_of_two() && words.len() >= 8);
        Self { header, words }
    }

    pub fn header(&self) -> &'a MsgRingHeader {
        self.header
    }

    /// The longest message the ring takes: one whose words (with its
    /// header) fill at most half the array, so that it always fits, pad
    /// and all, once the consumer has caught up.
    pub fn max_len(&self) -> usize {
        (self.words.len() / 2 - 1) * 8
    }

    /// Producer side: publishes `msg` whole, or returns false (and counts
    /// it in `dropped`) if it is too long or the ring has no room.
    pub fn push(&self, msg: &[u8]) -> bool {
        let cap = self.words.len() as u64;
        let tail = self.header.tail.load(Ordering::Relaxed);
        let head = self.header.head.load(Ordering::Acquire);
        let need = words_for(msg.len());
        let pos = tail % cap;
        let to_end = cap - pos;
        let pad = if need > to_end { to_end } else { 0 };
        let used = tail.wrapping_sub(head);
        if msg.len() > self.max_len() || used > cap || used + pad + need > cap {
            self.header.dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        if pad > 0 {
            self.words[pos as usize].store(PAD_MARK << 32, Ordering::Relaxed);
        }
        let start = ((tail + pad) % cap) as usize;
        self.words[start].store(MSG_MARK << 32 | msg.len() as u64, Ordering::Relaxed);
        for (i, chunk) in msg.chunks(8).enumerate() {
            let mut w = [0u8; 8];
            w[..chunk.len()].copy_from_slice(chunk);
            self.words[start + 1 + i].store(u64::from_le_bytes(w), Ordering::Relaxed);
        }
        self.header
            .tail
            .store(tail.wrapping_add(pad + need), Ordering::Release);
        self.header.sent.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Consumer side: copies the oldest published message into `out`
    /// (replacing its contents) without consuming it; `None` if there is
    /// none. A malformed ring is skipped up to `tail` and counted in
    /// `corrupt` (see the module doc).
    pub fn peek(&self, out: &mut Vec<u8>) -> Option<Peeked> {
        let cap = self.words.len() as u64;
        let mut head = self.header.head.load(Ordering::Relaxed);
        let tail = self.header.tail.load(Ordering::Acquire);
        loop {
            let avail = tail.wrapping_sub(head);
            if avail == 0 {
                return None;
            }
            let pos = head % cap;
            let w = self.words[pos as usize].load(Ordering::Relaxed);
            if avail > cap {
                return self.skip_corrupt(tail);
            }
            match w >> 32 {
                PAD_MARK => {
                    let to_end = cap - pos;
                    if to_end > avail {
                        return self.skip_corrupt(tail);
                    }
                    head = head.wrapping_add(to_end);
                    // The pad is consumed at once: nothing is lost if we die.
                    self.header.head.store(head, Ordering::Release);
                }
                MSG_MARK => {
                    let len = (w & 0xffff_ffff) as usize;
                    let need = words_for(len);
                    if len > self.max_len() || need > avail || pos + need > cap {
                        return self.skip_corrupt(tail);
                    }
                    out.clear();
                    out.reserve(len);
                    let mut left = len;
                    for i in 0..need - 1 {
                        let v = self.words[(pos + 1 + i) as usize].load(Ordering::Relaxed);
                        let n = left.min(8);
                        out.extend_from_slice(&v.to_le_bytes()[..n]);
                        left -= n;
                    }
                    return Some(Peeked {
                        next: head.wrapping_add(need),
                    });
                }
                _ => return self.skip_corrupt(tail),
            }
        }
    }

    #[cold]
    fn skip_corrupt(&self, tail: u64) -> Option<Peeked> {
        self.header.corrupt.fetch_add(1, Ordering::Relaxed);
        self.header.head.store(tail, Ordering::Release);
        None
    }

    /// Consumer side: consumes the message `p` read.
    pub fn advance(&self, p: Peeked) {
        self.header.head.store(p.next, Ordering::Release);
    }

    /// [`peek`](Self::peek) and [`advance`](Self::advance) at once.
    pub fn pop(&self, out: &mut Vec<u8>) -> bool {
        match self.peek(out) {
            Some(p) => {
                self.advance(p);
                true
            }
            None => false,
        }
    }

    /// Words published and not consumed.
    pub fn used_words(&self) -> u64 {
        let tail = self.header.tail.load(Ordering::Acquire);
        tail.wrapping_sub(self.header.head.load(Ordering::Acquire))
    }

    pub fn is_empty(&self) -> bool {
        self.used_words() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Mem {
        header: Box<MsgRingHeader>,
        words: Vec<AtomicU64>,
    }

    fn mem(words: usize) -> Mem {
        Mem {
            header: Box::new(MsgRingHeader {
                tail: AtomicU64::new(0),
                dropped: AtomicU64::new(0),
                sent: AtomicU64::new(0),
                _pad0: [0; 40],
                head: AtomicU64::new(0),
                corrupt: AtomicU64::new(0),
                _pad1: [0; 48],
            }),
            words: (0..words).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    impl Mem {
        fn ring(&self) -> MsgRing<'_> {
            MsgRing::new(&self.header, &self.words)
        }
    }

    fn msg(i: u32, len: usize) -> Vec<u8> {
        (0..len).map(|j| (i as usize * 31 + j) as u8).collect()
    }

    #[test]
    fn messages_of_every_length_come_back_whole_in_order() {
        let m = mem(64);
        let r = m.ring();
        let mut out = Vec::new();
        for len in 0..=r.max_len() {
            assert!(r.push(&msg(len as u32, len)), "len {len}");
            assert!(r.pop(&mut out));
            assert_eq!(out, msg(len as u32, len));
        }
        assert!(!r.pop(&mut out));
        assert_eq!(m.header.dropped.load(Ordering::Relaxed), 0);
        assert_eq!(m.header.corrupt.load(Ordering::Relaxed), 0);
    }

    /// A message that does not fit before the array's end goes to its
    /// start behind a pad word; room is judged with the pad counted.
    #[test]
    fn a_message_wraps_with_a_pad_word_and_full_is_counted() {
        let m = mem(16);
        let r = m.ring();
        let mut out = Vec::new();
        // 6 + 5 words, consumed: tail at 11, five words to the end.
        assert!(r.push(&msg(1, 40)));
        assert!(r.push(&msg(1, 32)));
        assert!(r.pop(&mut out) && r.pop(&mut out));
        // 1 + 6 = 7 words do not fit in the last five: pad + wrap.
        assert!(r.push(&msg(2, 41)));
        assert_eq!(m.header.tail.load(Ordering::Relaxed), 16 + 7);
        assert_eq!(m.words[11].load(Ordering::Relaxed) >> 32, PAD_MARK);
        // Used: 12 words (pad 5 + 7); 4 left; a 6-word message is dropped.
        assert!(!r.push(&msg(3, 40)));
        assert_eq!(m.header.dropped.load(Ordering::Relaxed), 1);
        // Too long for this ring, whatever the room.
        assert_eq!(r.max_len(), 56);
        assert!(!r.push(&msg(3, 57)));
        assert_eq!(m.header.dropped.load(Ordering::Relaxed), 2);
        // Exactly the four words left.
        assert!(r.push(&msg(4, 24)));
        assert!(r.pop(&mut out));
        assert_eq!(out, msg(2, 41));
        assert!(r.pop(&mut out));
        assert_eq!(out, msg(4, 24));
        assert!(r.is_empty());
        assert_eq!(m.header.sent.load(Ordering::Relaxed), 4);
    }

    /// A producer killed while writing a message (its words written, `tail`
    /// not yet stored) published nothing; a consumer killed after reading a
    /// message and before advancing finds it again from `head`.
    #[test]
    fn killed_producer_publishes_nothing_and_killed_consumer_loses_nothing() {
        let m = mem(64);
        let r = m.ring();
        assert!(r.push(&msg(1, 20)));
        // The half-written second message: words stored, tail not.
        let tail = m.header.tail.load(Ordering::Relaxed);
        m.words[tail as usize].store(MSG_MARK << 32 | 16, Ordering::Relaxed);
        m.words[tail as usize + 1].store(0xdead, Ordering::Relaxed);
        let mut out = Vec::new();
        let p = r.peek(&mut out).unwrap();
        assert_eq!(out, msg(1, 20));
        // The consumer dies here; its successor maps the same memory.
        let again = MsgRing::new(&m.header, &m.words);
        let p2 = again.peek(&mut out).unwrap();
        assert_eq!((p, out.clone()), (p2, msg(1, 20)));
        again.advance(p2);
        assert!(again.peek(&mut out).is_none(), "nothing half-written");
        // The restarted producer writes over the abandoned words.
        assert!(again.push(&msg(2, 9)));
        assert!(again.pop(&mut out));
        assert_eq!(out, msg(2, 9));
    }

    /// Whatever the words hold, the consumer never panics and never reads
    /// past `tail`: malformed contents are skipped and counted.
    #[test]
    fn malformed_words_are_skipped_and_counted() {
        let m = mem(16);
        let r = m.ring();
        let mut out = Vec::new();
        for bad in [
            0u64,
            MSG_MARK << 32 | 1000,
            MSG_MARK << 32 | 20,
            PAD_MARK << 32,
        ] {
            let tail = m.header.tail.load(Ordering::Relaxed);
            m.words[(tail % 16) as usize].store(bad, Ordering::Relaxed);
            m.header.tail.store(tail + 2, Ordering::Release);
            assert!(r.peek(&mut out).is_none(), "{bad:#x}");
            assert_eq!(m.header.head.load(Ordering::Relaxed), tail + 2);
        }
        assert_eq!(m.header.corrupt.load(Ordering::Relaxed), 4);
        // A tail too far ahead of head.
        m.header.tail.store(1000, Ordering::Release);
        assert!(r.peek(&mut out).is_none());
        assert_eq!(m.header.corrupt.load(Ordering::Relaxed), 5);
        assert!(r.push(&msg(7, 7)));
        assert!(r.pop(&mut out));
        assert_eq!(out, msg(7, 7));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]
        /// A producer and a consumer on two threads: every message arrives
        /// whole and in order, and every message the producer gave up on
        /// is counted in `dropped` (none lost silently).
        #[test]
        fn two_threads_deliver_in_order_or_count_drops(
            lens in proptest::collection::vec(0usize..=128, 1..2000),
        ) {
            let m = mem(128);
            let r = m.ring();
            let (got, pushed) = std::thread::scope(|sc| {
                let producer = sc.spawn(|| {
                    let mut pushed = Vec::new();
                    for (i, &len) in lens.iter().enumerate() {
                        if r.push(&msg(i as u32, len)) {
                            pushed.push(i);
                        }
                        if i % 7 == 0 {
                            std::thread::yield_now();
                        }
                    }
                    pushed
                });
                let mut got = Vec::new();
                let mut out = Vec::new();
                loop {
                    let done = producer.is_finished();
                    while r.pop(&mut out) {
                        got.push(out.clone());
                    }
                    if done {
                        break;
                    }
                }
                (got, producer.join().unwrap())
            });
            let want: Vec<Vec<u8>> = pushed.iter().map(|&i| msg(i as u32, lens[i])).collect();
            proptest::prop_assert_eq!(&got, &want);
            let dropped = m.header.dropped.load(Ordering::Relaxed) as usize;
            proptest::prop_assert_eq!(dropped + pushed.len(), lens.len());
            proptest::prop_assert_eq!(m.header.corrupt.load(Ordering::Relaxed), 0);
        }
    }
}
