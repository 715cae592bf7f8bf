//! Closed-connection records: what a switch knows of the connections it
//! closes, batched for controld.
//!
//! A connection is recorded by whoever makes its exactly-once close: the
//! move of its forward entry to `STATE_CLOSING` that gives its backend
//! slot back (`ConnTable::close`, `update_state`, `retire`, an insert
//! displacing it). The filter reports each close it makes here
//! ([`ClosedLog::closed`], [`ClosedLog::gone`]); the GC in controld
//! records the closes it makes itself (idle timeouts), so every
//! connection that held a backend slot gets exactly one record. (A
//! provisional entry, picked up mid-flow and never confirmed, held none
//! and gets no record.)
//!
//! A close on a FIN or RST comes before the rest of the closing exchange
//! (the other side's FIN, the last ACKs), so a record's counts are read
//! [`LINGER_MS`] after the close, from the forward slot and the reply
//! slot, if the forward slot still holds the connection (its seqlock word
//! unchanged); this switch's flow-cache counts of the connection are
//! flushed first. If the slot changed meanwhile (the GC removed it, a new
//! connection took it) the counts read at the close stand.
//!
//! Records wait in a batch; the batch goes to controld as one message on
//! the switch's records ring when it holds `batch` records or its oldest
//! record closed `batch_ms` ago ([`ClosedLog::tick`], once per loop).
//! Nothing here runs per packet except on a close.

use std::collections::VecDeque;
use std::sync::atomic::{Ordering, fence};

use shm_layout::conntrack::{Conn, ConnTable, Gone};
use shm_layout::msgring::MsgRing;
use shm_layout::records::{CloseReason, ClosedRecord, Counts, MAX_BATCH, encode_batch};
use shm_layout::switch_slot::{Counter, N_COUNTERS};

use crate::flowcache::FlowCache;

/// Records a switch holds before they are batched; closes beyond it
/// within [`LINGER_MS`] are lost and counted (`drop_records_pending`).
pub const PENDING_CAP: usize = 4096;
/// How long after its close a record's counts are read (see the module doc).
pub const LINGER_MS: u32 = 10;
/// Defaults of `[records] batch` and `batch_ms`.
pub const DEFAULT_BATCH: usize = 64;
pub const DEFAULT_BATCH_MS: u32 = 100;

#[derive(Clone, Copy, Debug)]
struct Pending {
    rec: ClosedRecord,
    idx: u32,
    /// The forward slot's seqlock word while it held the connection, if
    /// it still does at the close.
    lock: Option<u64>,
}

#[derive(Debug)]
pub struct ClosedLog {
    switch: u16,
    batch_max: usize,
    batch_ms: u32,
    pending: VecDeque<Pending>,
    batch: Vec<ClosedRecord>,
    msg: Vec<u8>,
}

impl Default for ClosedLog {
    /// An empty log that allocates nothing until a close (for fixtures).
    fn default() -> Self {
        Self {
            switch: 0,
            batch_max: DEFAULT_BATCH,
            batch_ms: DEFAULT_BATCH_MS,
            pending: VecDeque::new(),
            batch: Vec::new(),
            msg: Vec::new(),
        }
    }
}

fn counts_of(s: &shm_layout::conntrack::ConnSlot) -> Counts {
    Counts {
        packets: s.packets.load(Ordering::Relaxed),
        bytes: s.bytes.load(Ordering::Relaxed),
    }
}

fn reply_counts(ct: &ConnTable<'_>, conn: &Conn, idx: u32) -> Counts {
    let (packets, bytes) = ct.reply_counts(conn, idx);
    Counts { packets, bytes }
}

impl ClosedLog {
    /// A log of switch `switch` sending batches of `batch` records (at most
    /// [`MAX_BATCH`]) or every `batch_ms`.
    pub fn new(switch: u16, batch: usize, batch_ms: u32) -> Self {
        let batch_max = batch.clamp(1, MAX_BATCH);
        Self {
            switch,
            batch_max,
            batch_ms,
            pending: VecDeque::with_capacity(PENDING_CAP),
            batch: Vec::with_capacity(batch_max),
            msg: Vec::with_capacity(
                shm_layout::records::BATCH_HEADER_LEN + batch_max * shm_layout::records::RECORD_LEN,
            ),
        }
    }

    fn push(&mut self, p: Pending, counters: &mut [u64; N_COUNTERS]) {
        if self.pending.len() >= PENDING_CAP {
            counters[Counter::DropRecordsPending as usize] += 1;
            return;
        }
        self.pending.push_back(p);
    }

    /// The connection `conn`, whose forward entry is slot `idx`, was just
    /// closed by this switch for `reason`. `lock`: the slot's seqlock word
    /// if the slot still holds it (closed in place, as a FIN or RST
    /// does), `None` if it was removed (retired).
    #[cold]
    #[allow(clippy::too_many_arguments)]
    pub fn closed(
        &mut self,
        ct: &ConnTable<'_>,
        conn: Conn,
        idx: u32,
        lock: Option<u64>,
        reason: CloseReason,
        now_ms: u32,
        counters: &mut [u64; N_COUNTERS],
    ) {
        let rec = ClosedRecord {
            conn,
            reason,
            closed_ms: now_ms,
            forward: counts_of(ct.slot(idx)),
            reply: reply_counts(ct, &conn, idx),
        };
        self.push(Pending { rec, idx, lock }, counters);
    }

    /// A connection an insert of this switch displaced (see
    /// `ConnTable::insert`'s `evicted_conns`): its forward slot is another
    /// connection's now, so its counts are final as reported.
    #[cold]
    pub fn gone(
        &mut self,
        ct: &ConnTable<'_>,
        g: &Gone,
        reason: CloseReason,
        now_ms: u32,
        counters: &mut [u64; N_COUNTERS],
    ) {
        let rec = ClosedRecord {
            conn: g.conn,
            reason,
            closed_ms: now_ms,
            forward: Counts {
                packets: g.packets,
                bytes: g.bytes,
            },
            reply: reply_counts(ct, &g.conn, g.idx),
        };
        self.push(
            Pending {
                rec,
                idx: g.idx,
                lock: None,
            },
            counters,
        );
    }

    /// Records waiting (pending or batched).
    pub fn len(&self) -> usize {
        self.pending.len() + self.batch.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Once per loop: reads the counts of the records closed at least
    /// [`LINGER_MS`] ago (all of them if `all`, at exit), moves them to
    /// the batch, and sends the batch on `ring` when it is full or its
    /// oldest record closed `batch_ms` ago (or `all`).
    pub fn tick(
        &mut self,
        ct: &ConnTable<'_>,
        flows: &mut FlowCache,
        ring: Option<&MsgRing<'_>>,
        now_ms: u32,
        all: bool,
        counters: &mut [u64; N_COUNTERS],
    ) {
        while let Some(p) = self.pending.front() {
            if !all && (now_ms.wrapping_sub(p.rec.closed_ms) as i32) < LINGER_MS as i32 {
                break;
            }
            let p = self.pending.pop_front().expect("front");
            let rec = final_counts(ct, flows, p);
            self.batch.push(rec);
            if self.batch.len() >= self.batch_max {
                self.send(ring, counters);
            }
        }
        if let Some(first) = self.batch.first()
            && (all || now_ms.wrapping_sub(first.closed_ms) as i32 >= self.batch_ms as i32)
        {
            self.send(ring, counters);
        }
    }

    fn send(&mut self, ring: Option<&MsgRing<'_>>, counters: &mut [u64; N_COUNTERS]) {
        let n = self.batch.len() as u64;
        encode_batch(self.switch, &self.batch, &mut self.msg);
        self.batch.clear();
        if ring.is_some_and(|r| r.push(&self.msg)) {
            counters[Counter::RecordsSent as usize] += n;
            counters[Counter::RecordsBatches as usize] += 1;
        } else {
            counters[Counter::DropRecordsRingFull as usize] += n;
        }
    }
}

/// The record of `p` with its final counts (see the module doc).
fn final_counts(ct: &ConnTable<'_>, flows: &mut FlowCache, p: Pending) -> ClosedRecord {
    let mut rec = p.rec;
    let Some(lock) = p.lock else {
        return rec;
    };
    let s = ct.slot(p.idx);
    if s.lock.load(Ordering::Acquire) != lock {
        return rec;
    }
    // This switch's cached packets of either direction reach their slots.
    for words in [rec.conn.forward_key().words(), rec.conn.reply_key().words()] {
        let home = ct.home_of(words) as u32;
        if let Some(e) = flows.get_mut(home, words.0, words.1) {
            FlowCache::flush(e, ct);
        }
    }
    let forward = counts_of(s);
    let reply = reply_counts(ct, &rec.conn, p.idx);
    fence(Ordering::Acquire);
    if s.lock.load(Ordering::Relaxed) == lock {
        (rec.forward, rec.reply) = (forward, reply);
    }
    rec
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filter::{Parsed, Verdict, parse_and_prefetch, switch_parsed};
    use crate::fixture::{CLIENT_GW_MAC, Fixture, VIP, port_mac};
    use shm_layout::records::decode_batch;
    use wire::tcp::{ACK, FIN, RST, SYN};

    const CLIENT: [u8; 4] = [198, 18, 100, 1];

    fn seg(from_client: bool, backend: ([u8; 4], u16), flags: u8, payload: usize) -> Vec<u8> {
        let (src_mac, src, dst, sport, dport) = if from_client {
            (CLIENT_GW_MAC, CLIENT, VIP.to_be_bytes(), 40_000, 80)
        } else {
            (
                [2, 0, 0, 0, 1, backend.0[3]],
                backend.0,
                CLIENT,
                backend.1,
                40_000,
            )
        };
        let dst_mac = if from_client {
            [2, 0, 0, 0, 0, 1]
        } else {
            [2, 0, 0, 0, 0, 2]
        };
        let mut b = etherparse::PacketBuilder::ethernet2(src_mac, dst_mac)
            .ipv4(src, dst, 64)
            .tcp(sport, dport, 1, 1000);
        if flags & SYN != 0 {
            b = b.syn();
        }
        if flags & ACK != 0 {
            b = b.ack(1);
        }
        if flags & FIN != 0 {
            b = b.fin();
        }
        if flags & RST != 0 {
            b = b.rst();
        }
        let mut v = Vec::new();
        b.write(&mut v, &vec![7; payload]).unwrap();
        v
    }

    fn send(ctx: &mut crate::filter::Ctx<'_>, port: u32, frame: &[u8]) -> (Verdict, Vec<u8>) {
        let mut buf = vec![0u8; 2048];
        buf[..frame.len()].copy_from_slice(frame);
        let mut p = Parsed::default();
        parse_and_prefetch(&buf[..frame.len()], &ctx.ct, &ctx.flows, &mut p);
        let v = switch_parsed(&mut buf, frame.len(), &p, port, &port_mac, ctx);
        (v, buf)
    }

    /// One NAT connection's whole life through the filter: the client's
    /// FIN closes it (one record, reason fin_client), the rest of the
    /// FIN exchange is counted because the counts are read after the
    /// linger, and the batch goes out on the records ring after
    /// `batch_ms`, with exact packets and IP bytes each way.
    #[test]
    fn a_fin_close_gives_one_record_with_both_directions_counted() {
        let fx = Fixture::new("closed-fin", 1 << 12);
        let mut c = [0u64; N_COUNTERS];
        let ring = fx.region.msg_ring(0, shm_layout::msgring::RING_RECORDS);
        let mut ctx = fx.ctx(&mut c);
        ctx.closed = ClosedLog::new(0, 64, 100);
        let t0 = ctx.now_ms;
        let (v, buf) = send(&mut ctx, 0, &seg(true, ([0; 4], 0), SYN, 0));
        assert!(matches!(v, Verdict::Tx { port: 1, .. }), "{v:?}");
        let backend = (
            <[u8; 4]>::try_from(&buf[30..34]).unwrap(),
            u16::from_be_bytes([buf[36], buf[37]]),
        );
        let frames = [
            (false, SYN | ACK, 0),
            (true, ACK, 0),
            (true, ACK, 100),
            (false, ACK, 300),
            (true, FIN | ACK, 0),
            (false, FIN | ACK, 0),
            (true, ACK, 0),
        ];
        for (i, (from_client, flags, len)) in frames.into_iter().enumerate() {
            let port = if from_client { 0 } else { 1 };
            let (v, _) = send(&mut ctx, port, &seg(from_client, backend, flags, len));
            assert!(matches!(v, Verdict::Tx { .. }), "frame {i}: {v:?}");
            if i == 4 {
                assert_eq!(ctx.closed.len(), 1, "the client's FIN closed it");
            }
        }
        assert_eq!(ctx.closed.len(), 1, "closed once");
        let ct = ctx.ct;
        let mut flows = FlowCache::default();
        let mut counters = [0u64; N_COUNTERS];
        let mut tick = |log: &mut ClosedLog, now| {
            log.tick(&ct, &mut flows, Some(&ring), now, false, &mut counters)
        };
        tick(&mut ctx.closed, t0 + LINGER_MS - 1);
        tick(&mut ctx.closed, t0 + 99);
        assert!(ring.is_empty(), "the batch waits for batch_ms");
        tick(&mut ctx.closed, t0 + 100);
        assert!(ctx.closed.is_empty());
        let mut msg = Vec::new();
        assert!(ring.pop(&mut msg));
        let batch = decode_batch(&msg).unwrap();
        assert_eq!(batch.records.len(), 1);
        let r = batch.records[0];
        assert_eq!(r.reason, CloseReason::FinClient);
        assert_eq!(r.closed_ms, t0);
        assert_eq!(
            (
                r.conn.client_port,
                r.conn.vip,
                r.conn.backend_ip.to_be_bytes()
            ),
            (40_000, VIP, backend.0)
        );
        // SYN, ACK, 100 bytes, FIN, ACK; SYN-ACK, 300 bytes, FIN.
        assert_eq!(
            (r.forward, r.reply),
            (
                Counts {
                    packets: 5,
                    bytes: 5 * 40 + 100
                },
                Counts {
                    packets: 3,
                    bytes: 3 * 40 + 300
                }
            )
        );
        assert_eq!(counters[Counter::RecordsSent as usize], 1);
        assert_eq!(counters[Counter::RecordsBatches as usize], 1);
    }

    /// A backend's RST closes the connection (reason rst_backend); closes
    /// beyond a batch go out in full batches at once, the rest after
    /// `batch_ms`.
    #[test]
    fn rst_closes_are_recorded_and_full_batches_leave_at_once() {
        let fx = Fixture::new("closed-rst", 1 << 12);
        let mut c = [0u64; N_COUNTERS];
        let ring = fx.region.msg_ring(0, shm_layout::msgring::RING_RECORDS);
        let mut ctx = fx.ctx(&mut c);
        ctx.closed = ClosedLog::new(0, 2, 100);
        let t0 = ctx.now_ms;
        let (_, buf) = send(&mut ctx, 0, &seg(true, ([0; 4], 0), SYN, 0));
        let backend = (
            <[u8; 4]>::try_from(&buf[30..34]).unwrap(),
            u16::from_be_bytes([buf[36], buf[37]]),
        );
        send(&mut ctx, 1, &seg(false, backend, RST, 0));
        assert_eq!(ctx.closed.len(), 1);
        // Two more closes, made up (as the filter reports them).
        let conn = ctx.ct.lookup(&shm_layout::conntrack::FlowKey {
            proto: 6,
            src_ip: u32::from_be_bytes(CLIENT),
            dst_ip: VIP,
            src_port: 40_000,
            dst_port: 80,
        });
        let idx = conn.unwrap().idx;
        let the = ctx.ct.snapshot(idx).unwrap().conn().unwrap();
        let ct = ctx.ct;
        let mut counters = [0u64; N_COUNTERS];
        for _ in 0..2 {
            ctx.closed.closed(
                &ct,
                the,
                idx,
                None,
                CloseReason::IdleTimeout,
                t0,
                &mut counters,
            );
        }
        let mut flows = FlowCache::default();
        ctx.closed.tick(
            &ct,
            &mut flows,
            Some(&ring),
            t0 + LINGER_MS,
            false,
            &mut counters,
        );
        assert_eq!(ctx.closed.len(), 1, "a full batch of two left");
        ctx.closed
            .tick(&ct, &mut flows, Some(&ring), t0 + 100, false, &mut counters);
        let mut msg = Vec::new();
        let mut sizes = Vec::new();
        let mut reasons = Vec::new();
        while ring.pop(&mut msg) {
            let b = decode_batch(&msg).unwrap();
            sizes.push(b.records.len());
            reasons.extend(b.records.iter().map(|r| r.reason));
        }
        assert_eq!(sizes, [2, 1]);
        assert_eq!(
            reasons,
            [
                CloseReason::RstBackend,
                CloseReason::IdleTimeout,
                CloseReason::IdleTimeout
            ]
        );
        assert_eq!(counters[Counter::RecordsBatches as usize], 2);
    }
}
