//! Single-producer single-consumer rings of fixed-size records.
//!
//! `tail` is written only by the producer, `head` only by the consumer; both
//! are free-running counters (index = counter % capacity). The producer
//! writes a record's words (Relaxed) and then Release-stores `tail`; the
//! consumer Acquire-loads `tail` before reading words and Release-stores
//! `head` after, so the producer never overwrites an unread record. A killed
//! producer leaves at most one half-written record that was never published.

use core::mem::size_of;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::fingerprint::Fingerprint;
use crate::fp_type;

#[repr(C, align(64))]
#[derive(Debug)]
pub struct RingHeader {
    pub tail: AtomicU64,
    pub _pad0: [u8; 56],
    pub head: AtomicU64,
    /// Records the producer could not push because the ring was full.
    pub dropped: AtomicU64,
    pub _pad1: [u8; 48],
}

/// One record: four words.
#[repr(C)]
#[derive(Debug)]
pub struct RingSlot {
    pub words: [AtomicU64; 4],
}

const _: () = assert!(size_of::<RingHeader>() == 128 && size_of::<RingSlot>() == 32);

pub(crate) const fn fingerprint(fp: Fingerprint) -> Fingerprint {
    let fp = fp_type!(fp, RingHeader, tail, head, dropped);
    fp_type!(fp, RingSlot, words)
}

/// A ring in a mapped region.
#[derive(Clone, Copy, Debug)]
pub struct Ring<'a> {
    pub header: &'a RingHeader,
    pub slots: &'a [RingSlot],
}

impl Ring<'_> {
    /// Producer side. Returns false (and counts) when full.
    pub fn push(&self, rec: [u64; 4]) -> bool {
        let tail = self.header.tail.load(Ordering::Relaxed);
        let head = self.header.head.load(Ordering::Acquire);
        let cap = self.slots.len() as u64;
        if cap == 0 || tail.wrapping_sub(head) >= cap {
            self.header.dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        let slot = &self.slots[(tail % cap) as usize];
        for (w, v) in slot.words.iter().zip(rec) {
            w.store(v, Ordering::Relaxed);
        }
        self.header
            .tail
            .store(tail.wrapping_add(1), Ordering::Release);
        true
    }

    /// Consumer side.
    pub fn pop(&self) -> Option<[u64; 4]> {
        let head = self.header.head.load(Ordering::Relaxed);
        let tail = self.header.tail.load(Ordering::Acquire);
        let cap = self.slots.len() as u64;
        if head == tail || cap == 0 {
            return None;
        }
        let slot = &self.slots[(head % cap) as usize];
        let rec = core::array::from_fn(|i| slot.words[i].load(Ordering::Relaxed));
        self.header
            .head
            .store(head.wrapping_add(1), Ordering::Release);
        Some(rec)
    }

    pub fn len(&self) -> u64 {
        let tail = self.header.tail.load(Ordering::Acquire);
        tail.wrapping_sub(self.header.head.load(Ordering::Acquire))
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Event record kinds carried by a switch's event ring.
pub const EVENT_MIDFLOW: u64 = 1;

/// A connection recovered from a mid-connection packet, as an event record:
/// `[kind | backend_id << 32, client_ip << 32 | vip, client_port << 16 | vip_port, time_ms]`.
pub fn midflow_event(conn: &crate::conntrack::Conn, now_ms: u32) -> [u64; 4] {
    [
        EVENT_MIDFLOW | ((conn.backend_id as u64) << 32),
        ((conn.client_ip as u64) << 32) | conn.vip as u64,
        ((conn.client_port as u64) << 16) | conn.vip_port as u64,
        now_ms as u64,
    ]
}

#[cfg(test)]
mod tests {
    use crate::region::tests::temp;

    #[test]
    fn spsc_in_order_across_threads_and_full_is_counted() {
        let t = temp("ring");
        let ring = t.0.ring(1);
        let n = 100_000u64;
        std::thread::scope(|sc| {
            sc.spawn(|| {
                let mut i = 0;
                while i < n {
                    if ring.push([i, i * 2, i * 3, !i]) {
                        i += 1;
                    }
                }
            });
            let mut next = 0;
            while next < n {
                if let Some(r) = ring.pop() {
                    assert_eq!(r, [next, next * 2, next * 3, !next]);
                    next += 1;
                }
            }
        });
        assert!(ring.is_empty());
        for i in 0..64 {
            assert!(ring.push([i; 4]));
        }
        let before = ring
            .header
            .dropped
            .load(core::sync::atomic::Ordering::Relaxed);
        assert!(!ring.push([0; 4]));
        assert_eq!(
            ring.header
                .dropped
                .load(core::sync::atomic::Ordering::Relaxed),
            before + 1
        );
    }
}
