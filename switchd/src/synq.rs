//! The switch's queue of held new connections.
//!
//! When every eligible backend of a service is at its `max_conns`, the
//! filter answers [`crate::filter::Verdict::Hold`]: the engine copies the
//! frame (a TCP SYN or a first UDP datagram) into this queue and gives the
//! NIC buffer back at once, so a held connection never pins an RX slot (an
//! AF_PACKET ring would stall behind it).
//!
//! The engine runs the queued frames through the filter again, oldest
//! first, only when one of them may get a backend now: a backend of a
//! service with queued frames gave a connection slot back (the sum of its
//! backends' `BackendCounters::released`, the service's *mark*, moved
//! since the queue last read it), a new configuration was published
//! (limits, weights, health), or a service was found with room when its
//! first frame was queued (its slot given back between the filter's
//! decision and the first read of its mark). A frame that then gets a
//! backend is sent (`Nic::tx_copy`), one still held stays. Separately, a
//! frame that waited past its service's `queue_timeout_ms` is refused
//! (RST) when its time is up, without a run through the filter. A loop
//! with none of these reads one `released` word per backend of the queued
//! services and leaves the queue alone, so a saturated service costs the
//! rest of the traffic next to nothing.
//!
//! Bounded: a fixed number of entries and one buffer of [`SLOT_BYTES`] per
//! entry, all allocated at start; nothing allocates afterwards.

use shm_layout::conntrack::FlowKey;

/// Largest frame a queue entry holds (a vnic or AF_PACKET buffer).
pub const SLOT_BYTES: usize = 2048;

/// Default number of entries (`[[switch]] syn_queue`).
pub const DEFAULT_CAPACITY: usize = 256;

/// [`SynQueue::push`]'s service index for a frame whose service is gone.
pub const NO_SERVICE: u16 = u16::MAX;

#[derive(Clone, Copy, Debug)]
struct Entry {
    key: FlowKey,
    slot: u16,
    len: u16,
    /// Index of its service in the configuration it was held or last
    /// re-indexed under ([`NO_SERVICE`]: none).
    service: u16,
    in_port: u32,
    since_ms: u32,
    timeout_ms: u32,
}

impl Entry {
    /// Whether it has waited its timeout out at `now_ms`.
    #[inline]
    fn expired(&self, now_ms: u32) -> bool {
        let waited = now_ms.wrapping_sub(self.since_ms) as i32;
        waited >= 0 && waited as u32 >= self.timeout_ms
    }

    /// The millisecond its timeout ends.
    #[inline]
    fn deadline(&self) -> u32 {
        self.since_ms.wrapping_add(self.timeout_ms)
    }
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
    /// The distinct services of the queued frames (at most one per
    /// entry: no allocation after `new`).
    services: Vec<Watch>,
    /// The earliest deadline of a queued frame (meaningless when empty).
    next_deadline: u32,
    /// The configuration stamp the queue last looked at its services under.
    stamp: u64,
    /// A service had room when its first frame was queued: run the queue.
    wake: bool,
    /// Frames offered to the retry callback before their timeout.
    replays: u64,
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
            services: Vec::with_capacity(capacity),
            next_deadline: 0,
            stamp: 0,
            wake: false,
            replays: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// How many times a queued frame was offered again before its timeout
    /// (what the engine runs through the filter), since the queue was made.
    pub fn replays(&self) -> u64 {
        self.replays
    }

    /// The configuration stamp of the last [`needs_retry`](Self::needs_retry).
    pub fn stamp(&self) -> u64 {
        self.stamp
    }

    /// Whether the queued frames must run through the filter again: the
    /// configuration's `stamp` differs from the last call's, a service's
    /// mark (`mark_of(service)`, read now, before the run) moved since it
    /// was last read, or a service had room when its first frame was
    /// queued. Remembers what it read: the caller runs the queue
    /// ([`retry`](Self::retry)) when this says so. A slot given back after
    /// a mark was read moves the next read, so none is missed.
    pub fn needs_retry(&mut self, stamp: u64, mut mark_of: impl FnMut(u16) -> u64) -> bool {
        let mut moved = core::mem::take(&mut self.wake) || stamp != self.stamp;
        self.stamp = stamp;
        for w in &mut self.services {
            let now = mark_of(w.service);
            moved |= now != w.mark;
            w.mark = now;
        }
        moved
    }

    /// Whether a queued frame has waited its timeout out at `now_ms`.
    #[inline]
    pub fn due(&self, now_ms: u32) -> bool {
        !self.entries.is_empty() && now_ms.wrapping_sub(self.next_deadline) as i32 >= 0
    }

    /// Gives every queued frame its service index under a new
    /// configuration (`service_of(key)`, [`NO_SERVICE`] if none). The
    /// marks are read again by the next [`needs_retry`](Self::needs_retry),
    /// which the new stamp makes say yes.
    pub fn reindex(&mut self, mut service_of: impl FnMut(&FlowKey) -> u16) {
        self.services.clear();
        for i in 0..self.entries.len() {
            let s = service_of(&self.entries[i].key);
            self.entries[i].service = s;
            watch(&mut self.services, s, || Some(0));
        }
    }

    /// Whether a frame of this flow is queued (a retransmitted SYN).
    pub fn contains(&self, key: &FlowKey) -> bool {
        self.entries.iter().any(|e| e.key == *key)
    }

    /// Copies a held frame in; false (nothing kept) when the queue is full
    /// or the frame is larger than a slot. `service`: its service's index
    /// in the configuration of stamp `stamp` ([`NO_SERVICE`] if none). If no other
    /// queued frame has that service, `mark()` gives its mark, read now
    /// (after the filter found it full), or `None` if it has room by now
    /// (then the next [`needs_retry`](Self::needs_retry) says yes).
    #[allow(clippy::too_many_arguments)]
    pub fn push(
        &mut self,
        frame: &[u8],
        key: FlowKey,
        (stamp, service): (u64, u16),
        mark: impl FnOnce() -> Option<u64>,
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
        let e = Entry {
            key,
            slot,
            len: frame.len() as u16,
            service,
            in_port,
            since_ms: now_ms,
            timeout_ms,
        };
        if self.entries.is_empty() || (e.deadline().wrapping_sub(self.next_deadline) as i32) < 0 {
            self.next_deadline = e.deadline();
        }
        if self.entries.is_empty() {
            // (Otherwise a different stamp makes the next `needs_retry`
            // say yes, after a `reindex`.)
            self.stamp = stamp;
        }
        self.entries.push(e);
        self.wake |= watch(&mut self.services, service, mark);
        true
    }

    /// Offers every queued frame, oldest first, to `f(frame, in_port,
    /// expired)`: a scratch copy of the frame (whole slot; the frame is
    /// `frame[..len]`, `len` given separately), whether it has waited its
    /// timeout out. Entries `f` is done with are removed; the rest keep
    /// their order and their original bytes.
    pub fn retry(&mut self, now_ms: u32, f: impl FnMut(&mut [u8], usize, u32, bool) -> Retry) {
        self.offer(now_ms, false, f);
    }

    /// [`retry`](Self::retry) for the frames that have waited their
    /// timeout out only (`expired` is always true); the others are not
    /// offered.
    pub fn expire(&mut self, now_ms: u32, f: impl FnMut(&mut [u8], usize, u32, bool) -> Retry) {
        self.offer(now_ms, true, f);
    }

    fn offer(
        &mut self,
        now_ms: u32,
        expired_only: bool,
        mut f: impl FnMut(&mut [u8], usize, u32, bool) -> Retry,
    ) {
        let mut kept = 0;
        for i in 0..self.entries.len() {
            let e = self.entries[i];
            let expired = e.expired(now_ms);
            let decision = if expired_only && !expired {
                Retry::Keep
            } else {
                let at = e.slot as usize * SLOT_BYTES;
                let len = e.len as usize;
                self.scratch[..len].copy_from_slice(&self.bufs[at..at + len]);
                self.replays += u64::from(!expired);
                f(&mut self.scratch, len, e.in_port, expired)
            };
            match decision {
                Retry::Keep => {
                    if kept == 0 || (e.deadline().wrapping_sub(self.next_deadline) as i32) < 0 {
                        self.next_deadline = e.deadline();
                    }
                    self.entries[kept] = e;
                    kept += 1;
                }
                Retry::Done => {
                    self.free.push(e.slot);
                    unwatch(&mut self.services, e.service);
                }
            }
        }
        self.entries.truncate(kept);
    }
}

/// A service with queued frames.
#[derive(Clone, Copy, Debug)]
struct Watch {
    service: u16,
    /// Its queued frames.
    frames: u16,
    /// Its mark when last read.
    mark: u64,
}

/// Counts one more queued frame of service `s`; a service new to the list
/// gets its mark from `mark()`. Returns whether that said it has room.
fn watch(services: &mut Vec<Watch>, s: u16, mark: impl FnOnce() -> Option<u64>) -> bool {
    if let Some(w) = services.iter_mut().find(|w| w.service == s) {
        w.frames += 1;
        return false;
    }
    let m = mark();
    services.push(Watch {
        service: s,
        frames: 1,
        mark: m.unwrap_or(0),
    });
    m.is_none()
}

/// Counts one queued frame of service `s` fewer.
fn unwatch(services: &mut Vec<Watch>, s: u16) {
    if let Some(i) = services.iter().position(|w| w.service == s) {
        services[i].frames -= 1;
        if services[i].frames == 0 {
            services.swap_remove(i);
        }
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
            assert!(q.push(&[p as u8; 60], key(p), (1, 0), || Some(0), 7, 100, 50));
        }
        assert!(
            !q.push(&[9; 60], key(9), (1, 0), || Some(0), 7, 100, 50),
            "full"
        );
        assert!(!SynQueue::new(3).push(&[0; SLOT_BYTES + 1], key(1), (1, 0), || Some(0), 0, 0, 1));
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
        assert!(q.push(&[5; 70], key(5), (1, 0), || Some(0), 8, 149, 50));
        let mut seen = Vec::new();
        q.retry(150, |buf, len, _, expired| {
            seen.push((buf[0], len, expired));
            Retry::Done
        });
        assert_eq!(seen, [(0, 60, true), (2, 60, true), (5, 70, false)]);
        assert!(q.is_empty());
        assert!(SynQueue::new(0).free.is_empty());
    }

    #[test]
    fn deadlines_services_and_expiry_without_the_others() {
        let mut q = SynQueue::new(4);
        assert!(!q.due(0), "empty");
        // Services 3 (two frames, 100 ms) and 5 (one frame, 20 ms).
        assert!(q.push(&[1; 60], key(1), (1, 3), || Some(0), 0, 1_000, 100));
        assert!(q.push(&[2; 60], key(2), (1, 5), || Some(0), 0, 1_010, 20));
        assert!(q.push(
            &[3; 60],
            key(3),
            (1, 3),
            || panic!("service 3 is watched"),
            0,
            1_020,
            100
        ));
        let mut svcs: Vec<u16> = q.services.iter().map(|w| w.service).collect();
        svcs.sort();
        assert_eq!(svcs, [3, 5]);
        assert!(!q.due(1_029) && q.due(1_030), "the second frame's deadline");
        // Expiry offers only what is due, as expired, and counts no replay.
        let mut seen = Vec::new();
        q.expire(1_030, |buf, _, _, expired| {
            seen.push((buf[0], expired));
            Retry::Done
        });
        assert_eq!(seen, [(2, true)]);
        assert_eq!((q.len(), q.replays()), (2, 0));
        assert_eq!(
            q.services.iter().map(|w| w.service).collect::<Vec<_>>(),
            [3]
        );
        assert!(!q.due(1_099) && q.due(1_100));
        // A retry offers every frame; those not expired count as replays.
        q.retry(
            1_100,
            |_, _, _, expired| {
                if expired { Retry::Done } else { Retry::Keep }
            },
        );
        assert_eq!((q.len(), q.replays()), (1, 1));
        assert!(!q.due(1_119) && q.due(1_120));
        // A new configuration re-indexes the services.
        q.reindex(|k| if k.src_port == 3 { 7 } else { NO_SERVICE });
        assert_eq!(
            q.services.iter().map(|w| w.service).collect::<Vec<_>>(),
            [7]
        );
        // Deadlines across the wrap of the millisecond clock.
        let mut w = SynQueue::new(2);
        assert!(w.push(&[0; 60], key(1), (1, 0), || Some(0), 0, u32::MAX - 5, 10));
        assert!(!w.due(u32::MAX) && !w.due(3) && w.due(4));
    }

    #[test]
    fn a_retry_is_needed_when_the_stamp_a_mark_or_a_service_with_room_says_so() {
        let mut q = SynQueue::new(4);
        // Services 0 and 1's marks; others' are 0.
        let marks = core::cell::Cell::new([10u64, 20]);
        let mark_of = |s: u16| marks.get().get(s as usize).copied().unwrap_or(0);
        assert!(q.push(&[0; 60], key(1), (1, 0), || Some(10), 0, 0, 100));
        assert!(!q.needs_retry(1, mark_of), "nothing moved since the push");
        marks.set([11, 20]);
        assert!(q.needs_retry(1, mark_of), "a release of service 0");
        assert!(!q.needs_retry(1, mark_of));
        // Service 1 joins; its mark is read at the push.
        assert!(q.push(&[0; 60], key(2), (1, 1), || Some(20), 0, 0, 100));
        assert!(!q.needs_retry(1, mark_of));
        marks.set([11, 21]);
        assert!(q.needs_retry(1, mark_of), "a release of service 1");
        assert!(!q.needs_retry(1, mark_of));
        assert!(q.needs_retry(2, mark_of), "a new configuration");
        assert!(!q.needs_retry(2, mark_of));
        // A service that has room by the time its first frame is queued.
        assert!(q.push(&[0; 60], key(3), (1, 7), || None, 0, 0, 100));
        assert!(q.needs_retry(2, mark_of), "room at the push");
        assert!(!q.needs_retry(2, mark_of));
        // Leaving services take their marks along: no retry for that.
        q.expire(100, |_, _, _, _| Retry::Done);
        assert!(q.is_empty() && q.services.is_empty());
    }
}
