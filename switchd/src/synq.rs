//! The switch's queue of held new connections.
//!
//! When every eligible backend of a service is at its `max_conns`, the
//! filter answers [`crate::filter::Verdict::Hold`]: the engine copies the
//! frame (a TCP SYN or a first UDP datagram) into this queue and gives the
//! NIC buffer back at once, so a held connection never pins an RX slot (an
//! AF_PACKET ring would stall behind it). Each loop the engine runs every
//! queued frame through the filter again, oldest first: a frame that now
//! gets a backend is sent (`Nic::tx_copy`), one that waited past its
//! service's `queue_timeout_ms` is refused (RST), one still held stays.
//!
//! Bounded: a fixed number of entries and one buffer of [`SLOT_BYTES`] per
//! entry, all allocated at start; nothing allocates afterwards.

use shm_layout::conntrack::FlowKey;

/// Largest frame a queue entry holds (a vnic or AF_PACKET buffer).
pub const SLOT_BYTES: usize = 2048;

/// Default number of entries (`[[switch]] syn_queue`).
pub const DEFAULT_CAPACITY: usize = 256;

#[derive(Clone, Copy, Debug)]
struct Entry {
    key: FlowKey,
    slot: u16,
    len: u16,
    in_port: u32,
    since_ms: u32,
    timeout_ms: u32,
}

/// What the retry callback decided for one queued frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Retry {
    /// Still no room: keep it queued (unchanged).
    Keep,
    /// Sent, refused or dropped: remove it.
    Done,
}

/// A bounded FIFO of held frames.
#[derive(Debug)]
pub struct SynQueue {
    entries: Vec<Entry>,
    bufs: Vec<u8>,
    free: Vec<u16>,
    scratch: Vec<u8>,
}

impl SynQueue {
    /// A queue of `capacity` entries (at most 65535; 0 queues nothing).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.min(u16::MAX as usize);
        Self {
            entries: Vec::with_capacity(capacity),
            bufs: vec![0; capacity * SLOT_BYTES],
            free: (0..capacity as u16).rev().collect(),
            scratch: vec![0; SLOT_BYTES],
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether a frame of this flow is queued (a retransmitted SYN).
    pub fn contains(&self, key: &FlowKey) -> bool {
        self.entries.iter().any(|e| e.key == *key)
    }

    /// Copies a held frame in; false (nothing kept) when the queue is full
    /// or the frame is larger than a slot.
    pub fn push(
        &mut self,
        frame: &[u8],
        key: FlowKey,
        in_port: u32,
        now_ms: u32,
        timeout_ms: u32,
    ) -> bool {
        if frame.len() > SLOT_BYTES {
            return false;
        }
        let Some(slot) = self.free.pop() else {
            return false;
        };
        let at = slot as usize * SLOT_BYTES;
        self.bufs[at..at + frame.len()].copy_from_slice(frame);
        self.entries.push(Entry {
            key,
            slot,
            len: frame.len() as u16,
            in_port,
            since_ms: now_ms,
            timeout_ms,
        });
        true
    }

    /// Offers every queued frame, oldest first, to `f(frame, in_port,
    /// expired)`: a scratch copy of the frame (whole slot; the frame is
    /// `frame[..len]`, `len` given separately), whether it has waited its
    /// timeout out. Entries `f` is done with are removed; the rest keep
    /// their order and their original bytes.
    pub fn retry(&mut self, now_ms: u32, mut f: impl FnMut(&mut [u8], usize, u32, bool) -> Retry) {
        let mut kept = 0;
        for i in 0..self.entries.len() {
            let e = self.entries[i];
            let at = e.slot as usize * SLOT_BYTES;
            let len = e.len as usize;
            self.scratch[..len].copy_from_slice(&self.bufs[at..at + len]);
            let waited = now_ms.wrapping_sub(e.since_ms) as i32;
            let expired = waited >= 0 && waited as u32 >= e.timeout_ms;
            match f(&mut self.scratch, len, e.in_port, expired) {
                Retry::Keep => {
                    self.entries[kept] = e;
                    kept += 1;
                }
                Retry::Done => self.free.push(e.slot),
            }
        }
        self.entries.truncate(kept);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(p: u16) -> FlowKey {
        FlowKey {
            proto: 6,
            src_ip: 1,
            dst_ip: 2,
            src_port: p,
            dst_port: 80,
        }
    }

    #[test]
    fn bounded_fifo_that_keeps_order_bytes_and_ages() {
        let mut q = SynQueue::new(3);
        for p in 0..3u16 {
            assert!(q.push(&[p as u8; 60], key(p), 7, 100, 50));
        }
        assert!(!q.push(&[9; 60], key(9), 7, 100, 50), "full");
        assert!(!SynQueue::new(3).push(&[0; SLOT_BYTES + 1], key(1), 0, 0, 1));
        assert!(q.contains(&key(1)) && !q.contains(&key(9)));
        // Before the timeout: offered in order, not expired; take the middle one.
        let mut seen = Vec::new();
        q.retry(149, |buf, len, port, expired| {
            assert_eq!((len, port, expired), (60, 7, false));
            seen.push(buf[0]);
            buf[0] = 0xee; // scribbling on the scratch copy changes nothing
            if seen.len() == 2 {
                Retry::Done
            } else {
                Retry::Keep
            }
        });
        assert_eq!(seen, [0, 1, 2]);
        assert_eq!(q.len(), 2);
        // The freed slot takes a newcomer, queued behind the others.
        assert!(q.push(&[5; 70], key(5), 8, 149, 50));
        let mut seen = Vec::new();
        q.retry(150, |buf, len, _, expired| {
            seen.push((buf[0], len, expired));
            Retry::Done
        });
        assert_eq!(seen, [(0, 60, true), (2, 60, true), (5, 70, false)]);
        assert!(q.is_empty());
        assert!(SynQueue::new(0).free.is_empty());
    }
}
