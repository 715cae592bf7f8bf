//! The packet engine: the poll loop. Moves bursts between the NIC and the
//! filter; updates heartbeat and acknowledgements once per loop, counters
//! every `PUBLISH_EVERY_NS` while frames keep coming, every 64th loop, and
//! on the first loop that finds no frame.

use core::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use netdrv::{Frame, Nic};
use shm_layout::config_slot::{ConfigView, MAX_PORTS};
use shm_layout::conntrack::FlowKey;
use shm_layout::publish::{SlotCheck, Table};
use shm_layout::region::{Region, ms_since};
use shm_layout::switch_slot::{Counter, N_COUNTERS, SW_RUNNING, SwitchSlot};
use shm_layout::time::mono_ns;

use crate::closed::ClosedLog;
use crate::filter::{self, Ctx, IcmpBudget, Verdict};
use crate::flowcache::FlowCache;
use crate::frag::FragTable;
use crate::hops::HopCache;
use crate::sched;
use crate::sched::SchedState;
use crate::synq::{NO_SERVICE, Retry, SynQueue};
use shm_layout::msgring::RING_RECORDS;

/// How the loop waits when there is no traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Idle {
    /// Spin forever: lowest latency, owns the CPU.
    Busy,
    /// Spin for a while, then sleep with growing naps (10 µs .. 500 µs);
    /// a NIC that the kernel can signal (afpacket) ends the nap as soon as
    /// a frame arrives.
    Adaptive,
}

/// Engine settings.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    pub switch_index: usize,
    pub burst: usize,
    pub idle: Idle,
    /// Null forwarder: every received frame goes out the next port untouched.
    pub null: bool,
    /// Entries of the queue of held new connections (0: none are held).
    pub syn_queue: usize,
    /// Entries of the flow cache (0: every packet takes the full path).
    pub flow_cache: usize,
    /// Closed-connection records per batch message to controld, and the
    /// longest a record waits for its batch (see [`crate::closed`]).
    pub record_batch: usize,
    pub record_batch_ms: u32,
}

/// Which global port each of the NIC's local ports is, and back.
#[derive(Clone, Debug, Default)]
pub struct PortMap {
    /// local -> global id
    pub global: Vec<u32>,
    /// global id -> local
    pub local: [Option<u8>; MAX_PORTS],
    /// global id -> MAC (only for ports this switch serves)
    pub mac: [Option<[u8; 6]>; MAX_PORTS],
}

impl PortMap {
    /// Matches the NIC's port names against the configuration's ports.
    pub fn build(
        names: &[String],
        macs: &[[u8; 6]],
        cfg_ports: &[(String, [u8; 6])],
    ) -> Result<Self, String> {
        let mut m = PortMap::default();
        for (local, name) in names.iter().enumerate() {
            let Some(g) = cfg_ports.iter().position(|(n, _)| n == name) else {
                return Err(format!(
                    "NIC port {name:?} is not in the published configuration (ports: {})",
                    cfg_ports
                        .iter()
                        .map(|(n, _)| n.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            };
            m.global.push(g as u32);
            m.local[g] = Some(local as u8);
            m.mac[g] = Some(macs[local]);
        }
        Ok(m)
    }
}

const SPINS_BEFORE_SLEEP: u32 = 256;
/// The largest receive burst (`[[switch]] burst` is clamped to it).
const MAX_BURST: usize = 256;
/// How stale a busy switch's published counters may get (a reader sees
/// them within this; storing all of them every loop cost ~80 instructions
/// a loop).
const PUBLISH_EVERY_NS: u64 = 100_000;
/// Flow-cache entries [`FlowCache::sweep`] visits per loop that moved
/// frames, and per loop that found none: a round of the default 65,536
/// entries takes ~65,536 busy loops (tens of ms under full load) or 256
/// idle ones. An idle loop's share (16 KiB read in order, about a
/// microsecond) is what a frame arriving meanwhile may wait.
const SWEEP_BUSY: usize = 1;
const SWEEP_IDLE: usize = 256;

const MIN_NAP: Duration = Duration::from_micros(10);
const MAX_NAP: Duration = Duration::from_micros(500);

/// Runs the poll loop until `stop` is set.
pub fn run<N: Nic>(
    region: &Region,
    nic: &mut N,
    ports: &dyn Fn(&Region) -> Result<PortMap, String>,
    settings: Settings,
    stop: &AtomicBool,
) -> Result<(), String> {
    let me: &SwitchSlot = &region.switch_slots()[settings.switch_index];
    let pid = std::process::id();
    let epoch = region.header().created_ns;
    let mut counters = [0u64; N_COUNTERS];
    for (c, w) in counters.iter_mut().zip(&me.counters) {
        *c = w.load(Ordering::Relaxed);
    }
    let burst = settings.burst.clamp(1, MAX_BURST);
    let mut frames = [Frame { buf: 0, len: 0 }; MAX_BURST];
    let mut parsed = [filter::Parsed::default(); MAX_BURST];
    // The port map of a configuration stamp, and its answer fingerprint.
    let mut port_map: Option<(u64, PortMap, u64)> = None;
    let mut empty_loops = 0u32;
    let mut nap = MIN_NAP;
    let mut icmp = IcmpBudget::new(mono_ns());
    let mut synq = SynQueue::new(settings.syn_queue);
    let mut tx = TxBatch::default();
    // The views of both A/B slots: fixed places in the region, built once.
    // SAFETY: this loop is a switch under the A/B protocol: it stores
    // RUNNING before its first `begin_read`, reads a slot only through the
    // view of its burst's token (non-zero stamp) between `begin_read` and
    // `end_read`, and acknowledges each burst; the publisher rewrites a slot
    // only after every running switch acknowledged past it or was fenced
    // (killed, gone). Views of the slot being written are held, not read.
    let (cfg_views, rt_views) = unsafe {
        (
            [region.config_view(0), region.config_view(1)],
            [region.routing_view(0), region.routing_view(1)],
        )
    };
    // Each slot generation is checked (stamp, checksum) once, when first seen.
    let (mut cfg_check, mut rt_check) = (SlotCheck::default(), SlotCheck::default());
    let bad = Counter::BadChecksum as usize;
    // The filter's context lives as long as the loop; each loop sets what
    // changes (the slots read, the time, the ICMP budget).
    let mut ctx = Ctx {
        timeouts: cfg_views[0].header.timeouts(),
        cfg: cfg_views[0],
        rt: rt_views[0],
        ct: region.conntrack(),
        backends: region.backend_counters(),
        events: Some(region.ring(settings.switch_index)),
        now_ms: 0,
        pid,
        counters: &mut counters,
        sched: SchedState::new(region.caps().backends as usize),
        hops: HopCache::default(),
        flows: FlowCache::new(settings.flow_cache)?,
        icmp_tokens: 0,
        frags: FragTable::default(),
        closed: ClosedLog::new(
            settings.switch_index as u16,
            settings.record_batch,
            settings.record_batch_ms,
        ),
        syn_auto: filter::SynAuto::default(),
    };
    let records_ring = region.msg_ring(settings.switch_index, RING_RECORDS);

    me.pid.store(pid, Ordering::Relaxed);
    if let Some(start) = shm_layout::time::process_start(pid) {
        me.proc_start.store(start, Ordering::Relaxed);
    }
    me.started_ns.store(mono_ns(), Ordering::Relaxed);
    // Before the first read of `active` (see publish.rs).
    me.state.store(SW_RUNNING, Ordering::SeqCst);

    // When the previous loop began, and whether it moved frames (its
    // whole length then counts as busy time).
    let (mut prev_start, mut prev_moved) = (mono_ns(), false);
    // When the counters were last published, and whether frames moved since.
    let (mut published_ns, mut unpublished) = (0u64, false);
    while !stop.load(Ordering::Relaxed) {
        let now = mono_ns();
        if prev_moved {
            ctx.counters[Counter::BusyNs as usize] += now.saturating_sub(prev_start);
        }
        me.heartbeat_ns.store(now, Ordering::Relaxed);
        let ctok = region.begin_read(Table::Config);
        let rtok = region.begin_read(Table::Routing);
        let mut moved = 0usize;

        // SAFETY: inside this burst's tokens, as a switch (see the views).
        let usable = unsafe {
            cfg_check.usable(region, Table::Config, ctok, &mut ctx.counters[bad])
                && rt_check.usable(region, Table::Routing, rtok, &mut ctx.counters[bad])
        };

        if settings.null {
            moved += null_forward(nic, &mut frames[..burst], ctx.counters);
        } else if !usable {
            // Nothing published yet (or a slot with a wrong checksum, never
            // used): receive and drop, so rings keep moving.
            for local in 0..nic.port_count() {
                let n = nic.rx_burst(local, &mut frames[..burst]);
                for f in &frames[..n] {
                    nic.free(*f);
                }
                ctx.counters[Counter::DropNoConfig as usize] += n as u64;
                moved += n;
            }
        } else {
            ctx.cfg = cfg_views[ctok.slot];
            ctx.rt = rt_views[rtok.slot];
            if port_map.as_ref().is_none_or(|(g, _, _)| *g != ctok.stamp) {
                let map = match ports(region) {
                    Ok(m) => m,
                    Err(e) => {
                        ctx.flows.flush_all(&ctx.ct);
                        publish_counters(nic, me, ctx.counters);
                        return Err(e);
                    }
                };
                let answers = filter::answer_fingerprint(&ctx.cfg, &map.mac, &map.local);
                port_map = Some((ctok.stamp, map, answers));
            }
            let (_, map, answers) = port_map.as_ref().expect("set above");
            let port_mac = |g: u32| map.mac.get(g as usize).copied().flatten();
            ctx.sched.sync(ctok.stamp);
            ctx.hops.sync(rtok.stamp);
            ctx.flows.sync(*answers, rtok.stamp);
            ctx.timeouts = ctx.cfg.header.timeouts();
            ctx.now_ms = ms_since(epoch, now);
            ctx.icmp_tokens = icmp.take(now);
            for local in 0..nic.port_count() {
                let n = nic.rx_burst(local, &mut frames[..burst]);
                if n == 0 {
                    continue;
                }
                moved += n;
                let in_port = map.global[local];
                burst_in(
                    nic,
                    &frames[..n],
                    &mut parsed[..n],
                    in_port,
                    map,
                    &port_mac,
                    &mut synq,
                    &mut tx,
                    &mut ctx,
                );
            }
            serve_queue(nic, &mut synq, map, &port_mac, ctok.stamp, &mut ctx);
            serve_fragments(nic, map, &mut ctx);
            // Counts that wait in the flow cache reach their slots.
            let sweep = if moved > 0 { SWEEP_BUSY } else { SWEEP_IDLE };
            ctx.flows.sweep(sweep, &ctx.ct, ctx.now_ms);
            // Closed connections go to controld in batches.
            if !ctx.closed.is_empty() {
                let ct = ctx.ct;
                ctx.closed.tick(
                    &ct,
                    &mut ctx.flows,
                    Some(&records_ring),
                    ctx.now_ms,
                    false,
                    ctx.counters,
                );
            }
            icmp.put_back(core::mem::take(&mut ctx.icmp_tokens));
        }
        nic.reclaim();
        // Non-short-circuit: both acknowledge.
        if !region.end_read(Table::Config, ctok, me) | !region.end_read(Table::Routing, rtok, me) {
            // A slot was rewritten under the burst: the protocol failed
            // (a switch stalled past the deadline is fenced, never
            // resumed). Counted; answers filled from it are forgotten.
            ctx.counters[Counter::TornBursts as usize] += 1;
            ctx.flows.invalidate();
            ctx.hops = HopCache::default();
        }
        ctx.counters[Counter::Loops as usize] += 1;
        (prev_start, prev_moved) = (now, moved > 0);

        if moved == 0 && settings.idle == Idle::Adaptive {
            empty_loops += 1;
            if empty_loops > SPINS_BEFORE_SLEEP {
                ctx.counters[Counter::IdleSleeps as usize] += 1;
                publish_counters(nic, me, ctx.counters);
                (published_ns, unpublished) = (now, false);
                nic.idle_wait(nap);
                nap = (nap * 2).min(MAX_NAP);
                continue;
            }
        } else {
            empty_loops = 0;
            nap = MIN_NAP;
        }
        // Counters go out at most every PUBLISH_EVERY_NS while frames
        // keep coming (and with every 64th loop), and on the first loop
        // that finds none.
        unpublished |= moved > 0;
        if (unpublished && (moved == 0 || now.saturating_sub(published_ns) >= PUBLISH_EVERY_NS))
            || ctx.counters[Counter::Loops as usize].is_multiple_of(64)
        {
            publish_counters(nic, me, ctx.counters);
            (published_ns, unpublished) = (now, false);
        }
    }
    // What waits goes out now (the counts as they are).
    let ct = ctx.ct;
    let now_ms = ms_since(epoch, mono_ns());
    ctx.closed.tick(
        &ct,
        &mut ctx.flows,
        Some(&records_ring),
        now_ms,
        true,
        ctx.counters,
    );
    ctx.flows.flush_all(&ctx.ct);
    drop(ctx);
    publish_counters(nic, me, &mut counters);
    Ok(())
}

/// One received burst of `in_port`: the filter's passes over every frame
/// (see [`crate::filter`]), then the transmissions and flushes. Kept out
/// of line so the poll loop stays short to read (docs/PERFORMANCE.md).
#[inline(never)]
#[allow(clippy::too_many_arguments)]
fn burst_in<N: Nic>(
    nic: &mut N,
    frames: &[Frame],
    parsed: &mut [filter::Parsed],
    in_port: u32,
    map: &PortMap,
    port_mac: &impl Fn(u32) -> Option<[u8; 6]>,
    synq: &mut SynQueue,
    tx: &mut TxBatch,
    ctx: &mut Ctx<'_>,
) {
    // Read every frame's first byte before parsing any: the generator's CPU
    // wrote those lines, so each read waits for a transfer between caches;
    // independent loads in a short loop all wait together, where the parse
    // would wait for them one or two at a time. (Prefetch hints did not do
    // this; demand loads do: docs/PERFORMANCE.md.)
    let mut first_bytes = 0u8;
    for f in frames {
        first_bytes ^= nic.buf_mut(*f)[0];
    }
    core::hint::black_box(first_bytes);
    // First pass: parse the burst and start its connection-slot
    // loads, so the second pass finds them in cache.
    let mut rx_bytes = 0u64;
    for (f, p) in frames.iter().zip(parsed.iter_mut()) {
        rx_bytes += f.len as u64;
        let len = (f.len as usize).min(nic.frame_capacity());
        filter::parse_and_prefetch(&nic.buf_mut(*f)[..len], &ctx.ct, &ctx.flows, p);
    }
    // With the flow-cache lines on their way: the slots the second pass
    // will read (none for a flow already checked in this millisecond),
    // unless the first pass loaded every home slot already.
    if !ctx.flows.slots_ahead() {
        for p in parsed.iter().take(frames.len()) {
            filter::prefetch_table_slots(p, &ctx.ct, &ctx.flows, ctx.now_ms);
        }
    }
    ctx.counters[Counter::RxPackets as usize] += frames.len() as u64;
    ctx.counters[Counter::RxBytes as usize] += rx_bytes;
    for (f, p) in frames.iter().zip(parsed.iter()) {
        let buf = nic.buf_mut(*f);
        // The flow cache's answers go straight out (the common case of an
        // established flow, kept apart so its port and length stay in
        // registers); the rest takes the filter's full path.
        let (port, len) = match filter::answer_from_flow_cache(buf, p, ctx) {
            Some(tx) => tx,
            None => {
                let mut verdict = filter::switch_after_cache_miss(
                    buf,
                    f.len as usize,
                    p,
                    in_port,
                    &port_mac,
                    ctx,
                );
                if let Verdict::Hold { timeout_ms } = verdict {
                    verdict = hold(synq, buf, f.len as usize, in_port, timeout_ms, ctx);
                }
                match verdict {
                    Verdict::Tx { port, len } => (port, len),
                    // Held: the queue kept a copy.
                    Verdict::Drop | Verdict::Hold { .. } => {
                        nic.free(*f);
                        continue;
                    }
                }
            }
        };
        let Some(out) = map.local.get(port as usize).copied().flatten() else {
            ctx.counters[Counter::DropEgressPort as usize] += 1;
            nic.free(*f);
            continue;
        };
        let out_frame = Frame {
            buf: f.buf,
            len: len as u16,
        };
        if let Err(back) = tx.queue(out, out_frame) {
            ctx.counters[Counter::DropTxFull as usize] += 1;
            nic.free(back);
        }
    }
    ctx.flows.end_burst(frames.len());
    tx.send(nic, ctx.counters);
}

/// The frames of a burst on their way out, in arrival order, each with its
/// local port: `send` gives each port its share in one
/// [`Nic::tx_burst`] (when all go out one port, the whole list as it is).
#[derive(Debug)]
pub struct TxBatch {
    frames: Box<[Frame; MAX_BURST]>,
    ports: Box<[u8; MAX_BURST]>,
    /// One port's share when the frames go out several ports.
    share: Box<[Frame; MAX_BURST]>,
    /// Frames queued.
    n: usize,
    /// Bit `p`: local port `p` has frames queued.
    dirty: u32,
    /// Bytes of the frames queued.
    bytes: u64,
}

impl Default for TxBatch {
    fn default() -> Self {
        Self {
            frames: Box::new([Frame { buf: 0, len: 0 }; MAX_BURST]),
            ports: Box::new([0; MAX_BURST]),
            share: Box::new([Frame { buf: 0, len: 0 }; MAX_BURST]),
            n: 0,
            dirty: 0,
            bytes: 0,
        }
    }
}

impl TxBatch {
    /// Queues `f` for local port `port`; gives it back (the caller frees
    /// and counts it) if the batch is full (a burst has at most
    /// `MAX_BURST` frames, and `send` empties the batch after each) or the
    /// port is beyond the 32 a batch tracks (ports come from a `PortMap`
    /// of at most `MAX_PORTS`).
    #[inline]
    fn queue(&mut self, port: u8, f: Frame) -> Result<(), Frame> {
        let (Some(slot), Some(p), true) = (
            self.frames.get_mut(self.n),
            self.ports.get_mut(self.n),
            port < 32,
        ) else {
            return Err(f);
        };
        (*slot, *p) = (f, port);
        self.n += 1;
        self.dirty |= 1 << port;
        self.bytes += f.len as u64;
        Ok(())
    }

    /// Transmits and flushes every queued frame, counting what went out
    /// and freeing (counted as `drop_tx_full`) what its ring had no room for.
    fn send<N: Nic>(&mut self, nic: &mut N, counters: &mut [u64; N_COUNTERS]) {
        counters[Counter::TxBytes as usize] += core::mem::take(&mut self.bytes);
        let n = core::mem::take(&mut self.n);
        let (queued, ports) = (&self.frames[..n], &self.ports[..n]);
        let single = self.dirty.count_ones() == 1;
        while self.dirty != 0 {
            let port = self.dirty.trailing_zeros() as u8;
            self.dirty &= self.dirty - 1;
            let share: &[Frame] = if single {
                queued
            } else {
                let mut k = 0;
                for (f, _) in queued.iter().zip(ports).filter(|(_, p)| **p == port) {
                    self.share[k] = *f;
                    k += 1;
                }
                &self.share[..k]
            };
            let sent = transmit(nic, port as usize, share, counters);
            for f in &share[sent..] {
                counters[Counter::TxBytes as usize] -= f.len as u64;
            }
        }
    }
}

/// Queues `frames` on `port` in one [`Nic::tx_burst`], frees (counted as
/// `drop_tx_full`) what its ring had no room for, counts `tx_packets` and
/// flushes; returns how many went (a prefix of `frames`).
fn transmit<N: Nic>(
    nic: &mut N,
    port: usize,
    frames: &[Frame],
    counters: &mut [u64; N_COUNTERS],
) -> usize {
    let sent = nic.tx_burst(port, frames);
    counters[Counter::TxPackets as usize] += sent as u64;
    counters[Counter::DropTxFull as usize] += (frames.len() - sent) as u64;
    for f in &frames[sent..] {
        nic.free(*f);
    }
    if sent > 0 {
        nic.flush(port);
    }
    sent
}

/// A frame the filter held: queued (a copy; the caller frees the buffer and
/// gets `Hold` back), dropped as a duplicate of a queued flow (`Drop`), or,
/// with the queue full, refused in place (the RST to send, or `Drop`).
fn hold(
    synq: &mut SynQueue,
    buf: &mut [u8],
    len: usize,
    in_port: u32,
    timeout_ms: u32,
    ctx: &mut Ctx<'_>,
) -> Verdict {
    let frame = &buf[..len.min(buf.len())];
    let Some(key) = filter::flow_key(frame) else {
        return filter::refuse(buf, len, in_port, ctx);
    };
    if synq.contains(&key) {
        ctx.counters[Counter::DropQueueDup as usize] += 1;
        return Verdict::Drop;
    }
    let (cfg, backends) = (ctx.cfg, ctx.backends);
    let service = service_index(&cfg, &key);
    // The service's mark, read after the filter found it full; then
    // whether a slot came free before that read (it would not move the
    // mark again).
    let mark = || {
        let svc = cfg.services().get(service as usize)?;
        let mark = sched::released(&cfg, svc, backends);
        (!sched::has_room(&cfg, svc, backends)).then_some(mark)
    };
    let stamp = cfg.header.stamp.load(Ordering::Relaxed);
    if synq.push(
        frame,
        key,
        (stamp, service),
        mark,
        in_port,
        ctx.now_ms,
        timeout_ms,
    ) {
        ctx.counters[Counter::ConnQueued as usize] += 1;
        return Verdict::Hold { timeout_ms };
    }
    filter::refuse(buf, len, in_port, ctx)
}

/// Once per loop: the queue of held new connections, under the
/// configuration of stamp `cfg_stamp`. The queued frames run through the
/// filter again only when one of them may get a backend now: a backend of
/// their services gave a connection slot back, or the configuration
/// changed (see [`crate::synq`]); otherwise only those whose time is up
/// are taken out (refused), and a loop with neither leaves the queue be.
fn serve_queue<N: Nic>(
    nic: &mut N,
    synq: &mut SynQueue,
    map: &PortMap,
    port_mac: &impl Fn(u32) -> Option<[u8; 6]>,
    cfg_stamp: u64,
    ctx: &mut Ctx<'_>,
) {
    if synq.is_empty() {
        return;
    }
    let (cfg, backends) = (ctx.cfg, ctx.backends);
    if synq.stamp() != cfg_stamp {
        // Service indexes are per configuration.
        synq.reindex(|k| service_index(&cfg, k));
    }
    let mark_of = |s: u16| {
        cfg.services()
            .get(s as usize)
            .map_or(0, |svc| sched::released(&cfg, svc, backends))
    };
    if synq.needs_retry(cfg_stamp, mark_of) {
        run_queue(nic, synq, map, port_mac, false, ctx);
    } else if synq.due(ctx.now_ms) {
        run_queue(nic, synq, map, port_mac, true, ctx);
    }
}

/// Once per loop: the held fragments whose first fragment passed go out
/// (copies, as the queue's frames), those that waited too long are
/// dropped (see [`filter::release_fragments`]).
fn serve_fragments<N: Nic>(nic: &mut N, map: &PortMap, ctx: &mut Ctx<'_>) {
    let mut tx_dirty = [false; MAX_PORTS];
    let mut sent = [0u64; 4];
    const PACKETS: usize = 0;
    const BYTES: usize = 1;
    const FULL: usize = 2;
    const EGRESS: usize = 3;
    filter::release_fragments(ctx, |frame, port| {
        match map.local.get(port as usize).copied().flatten() {
            Some(out) if nic.tx_copy(out as usize, frame) => {
                sent[PACKETS] += 1;
                sent[BYTES] += frame.len() as u64;
                tx_dirty[out as usize] = true;
            }
            Some(_) => sent[FULL] += 1,
            None => sent[EGRESS] += 1,
        }
    });
    for (c, n) in [
        Counter::TxPackets,
        Counter::TxBytes,
        Counter::DropTxFull,
        Counter::DropEgressPort,
    ]
    .into_iter()
    .zip(sent)
    {
        ctx.counters[c as usize] += n;
    }
    for (p, dirty) in tx_dirty.iter().enumerate() {
        if *dirty {
            nic.flush(p);
        }
    }
}

/// The index of the service of a held frame's flow in `cfg`
/// ([`NO_SERVICE`] if it has none).
fn service_index(cfg: &ConfigView<'_>, key: &FlowKey) -> u16 {
    cfg.find_service(key.dst_ip, key.dst_port, key.proto)
        .map_or(NO_SERVICE, |(i, _)| i as u16)
}

/// Runs the held frames through the filter again (oldest first): sends
/// those that now get a backend, refuses those that waited too long. With
/// `expired_only`, refuses those that waited too long and leaves the rest.
fn run_queue<N: Nic>(
    nic: &mut N,
    synq: &mut SynQueue,
    map: &PortMap,
    port_mac: &impl Fn(u32) -> Option<[u8; 6]>,
    expired_only: bool,
    ctx: &mut Ctx<'_>,
) {
    let mut tx_dirty = [false; MAX_PORTS];
    let now_ms = ctx.now_ms;
    let mut each = |buf: &mut [u8], len: usize, in_port: u32, expired: bool| {
        let verdict = if expired {
            filter::refuse(buf, len, in_port, ctx)
        } else {
            match filter::process(buf, len, in_port, port_mac, ctx) {
                Verdict::Hold { .. } => return Retry::Keep,
                v => {
                    if matches!(v, Verdict::Tx { .. }) {
                        ctx.counters[Counter::ConnDequeued as usize] += 1;
                    }
                    v
                }
            }
        };
        if let Verdict::Tx { port, len } = verdict {
            let out = map.local.get(port as usize).copied().flatten();
            match out {
                Some(out) if nic.tx_copy(out as usize, &buf[..len]) => {
                    ctx.counters[Counter::TxPackets as usize] += 1;
                    ctx.counters[Counter::TxBytes as usize] += len as u64;
                    tx_dirty[out as usize] = true;
                }
                Some(_) => ctx.counters[Counter::DropTxFull as usize] += 1,
                None => ctx.counters[Counter::DropEgressPort as usize] += 1,
            }
        }
        Retry::Done
    };
    if expired_only {
        synq.expire(now_ms, &mut each);
    } else {
        synq.retry(now_ms, &mut each);
    }
    for (p, dirty) in tx_dirty.iter().enumerate() {
        if *dirty {
            nic.flush(p);
        }
    }
}

/// Descriptor handover only: RX of port p to TX of port p+1 (mod n).
fn null_forward<N: Nic>(
    nic: &mut N,
    frames: &mut [Frame],
    counters: &mut [u64; N_COUNTERS],
) -> usize {
    let ports = nic.port_count();
    let mut moved = 0;
    for local in 0..ports {
        let n = nic.rx_burst(local, frames);
        transmit(nic, (local + 1) % ports, &frames[..n], counters);
        counters[Counter::RxPackets as usize] += n as u64;
        moved += n;
    }
    moved
}

#[inline]
/// Stores the counters in the switch's slot, with the NIC's receive-ring
/// drops and oversized frames since the last publication added first (a system call per port
/// for afpacket: here, not per burst).
fn publish_counters<N: Nic>(nic: &mut N, me: &SwitchSlot, counters: &mut [u64; N_COUNTERS]) {
    counters[Counter::DropRxRing as usize] += nic.take_rx_ring_drops();
    counters[Counter::DropRxTruncated as usize] += nic.take_rx_truncated();
    for (w, c) in me.counters.iter().zip(counters) {
        w.store(*c, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netdrv::vnic::{self, PortSpec, VnicHost, VnicWire};

    /// Unlinks the vnic on every exit path.
    struct Tmp(String);
    impl Drop for Tmp {
        fn drop(&mut self) {
            let _ = shm_layout::shm::Mapping::unlink(&self.0);
        }
    }

    /// The engine's second pass (the flow cache's answer, else the full
    /// path) sends what `filter::switch_parsed` decides, frame by frame:
    /// one burst through `burst_in` on a real vnic, against a second
    /// appliance's filter called the way the property tests call it.
    #[test]
    fn a_burst_leaves_as_switch_parsed_decides_each_frame() {
        use crate::fixture::{CLIENT_GW_MAC, Fixture, VIP, port_mac};
        use etherparse::PacketBuilder;

        let client = |port: u16, tcp: Option<(bool, bool, bool)>, payload: &[u8]| {
            let b = PacketBuilder::ethernet2(CLIENT_GW_MAC, [2, 0, 0, 0, 0, 1]).ipv4(
                [198, 18, 100, 1],
                VIP.to_be_bytes(),
                64,
            );
            let mut v = Vec::new();
            match tcp {
                Some((syn, fin, ack)) => {
                    let mut t = b.tcp(port, 80, 1, 1000);
                    if syn {
                        t = t.syn();
                    }
                    if fin {
                        t = t.fin();
                    }
                    if ack {
                        t = t.ack(2);
                    }
                    t.write(&mut v, payload).unwrap();
                }
                None => b.udp(port, 53).write(&mut v, payload).unwrap(),
            }
            v
        };
        let (syn, ack, fin) = (
            Some((true, false, false)),
            Some((false, false, true)),
            Some((false, true, true)),
        );
        let mut burst = vec![
            client(40_000, syn, b""),
            // Ends the handshake and fills the cache; the next are hits.
            client(40_000, ack, b""),
            client(40_000, ack, b"data"),
            client(40_000, ack, b"more"),
            client(41_000, syn, b""),
            client(5353, None, b"query"),
            client(5353, None, b"again"),
            client(5353, None, b"and again"),
            client(40_000, fin, b""),
            client(40_000, ack, b"after the FIN"),
            // Not IPv4; too short to be anything.
            [
                &[2, 0, 0, 0, 0, 1][..],
                &CLIENT_GW_MAC,
                &[0x86, 0xdd],
                &[0; 40],
            ]
            .concat(),
            vec![0u8; 10],
        ];
        // A bad IPv4 header checksum: dropped and counted on both sides.
        let mut bad = client(42_000, syn, b"");
        bad[24] ^= 0xff;
        burst.push(bad);

        let name = format!("switchyard-test-burst-{}", std::process::id());
        let ports: Vec<PortSpec> = (0..2u8)
            .map(|p| PortSpec {
                name: format!("p{p}"),
                mac: port_mac(p as u32).unwrap(),
            })
            .collect();
        vnic::create(&name, &ports, 64, 2 * 2 * 64 + 256).unwrap();
        let _tmp = Tmp(name.clone());
        let mut wire = VnicWire::attach(&name).unwrap();
        let mut host = VnicHost::attach(&name).unwrap();
        let mut map = PortMap {
            global: vec![0, 1],
            ..PortMap::default()
        };
        for p in 0..2 {
            map.local[p] = Some(p as u8);
            map.mac[p] = port_mac(p as u32);
        }
        // A filter context with a flow cache, synced as the loop syncs it.
        fn fresh<'a>(
            fx: &'a Fixture,
            counters: &'a mut [u64; N_COUNTERS],
            map: &PortMap,
        ) -> Ctx<'a> {
            let mut ctx = fx.ctx(counters);
            // One millisecond for both, whatever the clock does: within
            // it, cached answers are not checked against their slots.
            ctx.now_ms = 1_000;
            ctx.flows = FlowCache::new(1024).unwrap();
            let answers = filter::answer_fingerprint(&ctx.cfg, &map.mac, &map.local);
            ctx.flows.sync(answers, fx.stamps().1);
            ctx
        }

        // The reference: switch_parsed on each frame, in order.
        let reference = Fixture::new("burst-ref", 1 << 12);
        let mut want_counters = [0u64; N_COUNTERS];
        let mut want: [Vec<Vec<u8>>; 2] = Default::default();
        {
            let mut ctx = fresh(&reference, &mut want_counters, &map);
            for f in &burst {
                let mut buf = vec![0u8; 2048];
                buf[..f.len()].copy_from_slice(f);
                let mut p = filter::Parsed::default();
                filter::parse_and_prefetch(&buf[..f.len()], &ctx.ct, &ctx.flows, &mut p);
                let v = filter::switch_parsed(&mut buf, f.len(), &p, 0, &port_mac, &mut ctx);
                if let Verdict::Tx { port, len } = v {
                    want[port as usize].push(buf[..len].to_vec());
                }
            }
        }

        // The engine: the same frames as one burst received on port 0,
        // with the first pass loading every home slot (a cold cache's
        // way), then with the slot-prefetch pass deciding (as after bursts
        // answered from the cache).
        for ahead in [true, false] {
            let fx = Fixture::new(&format!("burst-engine-{ahead}"), 1 << 12);
            let mut counters = [0u64; N_COUNTERS];
            {
                let mut ctx = fresh(&fx, &mut counters, &map);
                if !ahead {
                    ctx.flows.end_burst(0);
                }
                assert_eq!(ctx.flows.slots_ahead(), ahead);
                for f in &burst {
                    assert!(wire.inject(0, f));
                }
                let mut frames = [Frame { buf: 0, len: 0 }; 64];
                let n = host.rx_burst(0, &mut frames);
                assert_eq!(n, burst.len());
                let mut parsed = [filter::Parsed::default(); 64];
                let (mut synq, mut tx) = (SynQueue::new(16), TxBatch::default());
                burst_in(
                    &mut host,
                    &frames[..n],
                    &mut parsed[..n],
                    0,
                    &map,
                    &port_mac,
                    &mut synq,
                    &mut tx,
                    &mut ctx,
                );
            }
            for (port, want) in want.iter().enumerate() {
                let mut got = Vec::new();
                wire.collect(port, 64, |f| got.push(f.to_vec()));
                assert!(
                    &got == want,
                    "ahead {ahead}, port {port}: {got:02x?}\nwant {want:02x?}"
                );
            }
            assert_eq!(
                counters[Counter::FlowCacheHit as usize],
                4,
                "three TCP (the FIN changed no answer), one UDP"
            );
            assert_eq!(counters[Counter::RxPackets as usize], burst.len() as u64);
            assert_eq!(
                counters[Counter::TxPackets as usize],
                (want[0].len() + want[1].len()) as u64
            );
            // Counted by the engine only: what it received and sent.
            for c in [
                Counter::RxPackets,
                Counter::RxBytes,
                Counter::TxPackets,
                Counter::TxBytes,
            ] {
                counters[c as usize] = 0;
            }
            assert_eq!(counters, want_counters, "every other counter the same");
        }
        host.audit().unwrap();
    }

    /// Frames injected on port 0 of `wire`, received by `host` and run as
    /// one burst through `burst_in`.
    #[allow(clippy::too_many_arguments)]
    fn one_burst(
        wire: &mut VnicWire,
        host: &mut VnicHost,
        map: &PortMap,
        synq: &mut SynQueue,
        tx: &mut TxBatch,
        ctx: &mut Ctx<'_>,
        burst: &[Vec<u8>],
    ) {
        for f in burst {
            assert!(wire.inject(0, f));
        }
        let mut frames = [Frame { buf: 0, len: 0 }; 64];
        let n = host.rx_burst(0, &mut frames);
        assert_eq!(n, burst.len());
        let mut parsed = [filter::Parsed::default(); 64];
        let port_mac = crate::fixture::port_mac;
        burst_in(
            host,
            &frames[..n],
            &mut parsed[..n],
            0,
            map,
            &port_mac,
            synq,
            tx,
            ctx,
        );
    }

    /// The queue of held SYNs is run through the filter again only when a
    /// backend may have room: one of the queued services' backends gave a
    /// connection slot back (its `released` count moved), or a new
    /// configuration was published. A SYN whose time is up is refused
    /// without being run through the filter. Loops with none of these do
    /// not touch the queue.
    #[test]
    fn held_syns_are_retried_only_after_a_release_or_a_new_configuration() {
        use crate::fixture::{CLIENT_GW_MAC, Fixture, VIP, port_mac};
        use etherparse::PacketBuilder;

        let seg = |port: u16, flags: &str| {
            let mut b = PacketBuilder::ethernet2(CLIENT_GW_MAC, [2, 0, 0, 0, 0, 1])
                .ipv4([198, 18, 100, 1], VIP.to_be_bytes(), 64)
                .tcp(port, 80, 1, 1000);
            for f in flags.chars() {
                b = match f {
                    'S' => b.syn(),
                    'A' => b.ack(2),
                    'F' => b.fin(),
                    _ => panic!("flag {f}"),
                };
            }
            let mut v = Vec::new();
            b.write(&mut v, &[]).unwrap();
            v
        };
        let limit = |fx: &Fixture, max: u32| {
            fx.configure(|s| {
                s.services[0].queue_timeout_ms = 250;
                for b in &mut s.backends[..3] {
                    b.max_conns = max;
                }
            })
        };
        let fx = Fixture::new("engine-synq", 1 << 12);
        limit(&fx, 1);
        let name = format!("switchyard-test-synq-{}", std::process::id());
        let ports: Vec<PortSpec> = (0..2u8)
            .map(|p| PortSpec {
                name: format!("p{p}"),
                mac: port_mac(p as u32).unwrap(),
            })
            .collect();
        vnic::create(&name, &ports, 64, 2 * 2 * 64 + 256).unwrap();
        let _tmp = Tmp(name.clone());
        let mut wire = VnicWire::attach(&name).unwrap();
        let mut host = VnicHost::attach(&name).unwrap();
        let mut map = PortMap {
            global: vec![0, 1],
            ..PortMap::default()
        };
        for p in 0..2 {
            map.local[p] = Some(p as u8);
            map.mac[p] = port_mac(p as u32);
        }
        // The client ports of the frames sent out `port` (port 1: toward
        // the backends, from the client; port 0: back to the client).
        let sent = |wire: &mut VnicWire, port: usize| {
            let at = if port == 1 { 34 } else { 36 };
            let mut ports = Vec::new();
            wire.collect(port, 64, |f| {
                ports.push(u16::from_be_bytes([f[at], f[at + 1]]));
            });
            ports
        };

        let mut counters = [0u64; N_COUNTERS];
        let mut ctx = fx.ctx(&mut counters);
        ctx.now_ms = 1_000;
        let mut stamp = fx.stamps().0;
        let (mut synq, mut tx) = (SynQueue::new(16), TxBatch::default());
        // Three connections fill the three backends; two more are held.
        let syns: Vec<_> = (50_000..50_005).map(|p| seg(p, "S")).collect();
        one_burst(
            &mut wire, &mut host, &map, &mut synq, &mut tx, &mut ctx, &syns,
        );
        assert_eq!(sent(&mut wire, 1), [50_000, 50_001, 50_002]);
        assert_eq!(synq.len(), 2);
        // Loops in which nothing was given back leave the queue alone.
        for _ in 0..10 {
            ctx.now_ms += 1;
            serve_queue(&mut host, &mut synq, &map, &port_mac, stamp, &mut ctx);
        }
        assert_eq!(synq.replays(), 0, "held SYNs run through the filter");
        assert_eq!(synq.len(), 2);
        // A FIN gives a slot back: the next loop runs the queue once and
        // the oldest held SYN gets it.
        one_burst(
            &mut wire,
            &mut host,
            &map,
            &mut synq,
            &mut tx,
            &mut ctx,
            &[seg(50_000, "AF")],
        );
        for _ in 0..10 {
            ctx.now_ms += 1;
            serve_queue(&mut host, &mut synq, &map, &port_mac, stamp, &mut ctx);
        }
        assert_eq!(sent(&mut wire, 1), [50_000, 50_003]);
        assert_eq!(synq.replays(), 2, "both held SYNs, once");
        assert_eq!(synq.len(), 1);
        // Its time up (250 ms after it was held), the last is refused
        // (a RST to the client) without another run through the filter.
        while ctx.now_ms < 1_000 + 250 {
            ctx.now_ms += 1;
            serve_queue(&mut host, &mut synq, &map, &port_mac, stamp, &mut ctx);
        }
        assert!(synq.is_empty());
        assert_eq!(synq.replays(), 2);
        assert_eq!(sent(&mut wire, 0), [50_004], "its RST");
        // A new configuration (more room) runs the queue too.
        one_burst(
            &mut wire,
            &mut host,
            &map,
            &mut synq,
            &mut tx,
            &mut ctx,
            &[seg(50_005, "S")],
        );
        assert_eq!(synq.len(), 1);
        ctx.now_ms += 1;
        serve_queue(&mut host, &mut synq, &map, &port_mac, stamp, &mut ctx);
        assert_eq!(synq.replays(), 2);
        limit(&fx, 2);
        let r = &fx.region;
        // SAFETY: this test is the region's only publisher and publishes
        // nothing more while the view is in use.
        ctx.cfg = unsafe { r.config_view(r.begin_read(shm_layout::publish::Table::Config).slot) };
        stamp = fx.stamps().0;
        serve_queue(&mut host, &mut synq, &map, &port_mac, stamp, &mut ctx);
        assert_eq!(synq.replays(), 3);
        assert!(synq.is_empty());
        assert_eq!(sent(&mut wire, 1), [50_005]);
        drop(ctx);
        assert_eq!(counters[Counter::ConnQueued as usize], 3);
        assert_eq!(counters[Counter::ConnDequeued as usize], 2);
        assert_eq!(counters[Counter::ConnRefused as usize], 1);
        host.audit().unwrap();
    }

    #[test]
    fn a_full_batch_or_a_port_beyond_its_mask_gives_the_frame_back() {
        let mut batch = TxBatch::default();
        let f = |buf| Frame { buf, len: 60 };
        for b in 0..MAX_BURST as u32 {
            assert_eq!(batch.queue(1, f(b)), Ok(()));
        }
        assert_eq!(batch.queue(1, f(999)), Err(f(999)), "full");
        let mut empty = TxBatch::default();
        assert_eq!(empty.queue(32, f(7)), Err(f(7)), "port 32");
        assert_eq!(empty.queue(31, f(7)), Ok(()));
    }

    #[test]
    fn a_batch_gives_each_port_its_frames_in_order_and_counts_what_had_no_room() {
        let name = format!("switchyard-test-txbatch-{}", std::process::id());
        let ports: Vec<PortSpec> = (0..3u8)
            .map(|p| PortSpec {
                name: format!("p{p}"),
                mac: [2, 0, 0, 0, 0, p],
            })
            .collect();
        vnic::create(&name, &ports, 64, 3 * 2 * 64 + 256).unwrap();
        let _tmp = Tmp(name.clone());
        let mut wire = VnicWire::attach(&name).unwrap();
        let mut host = VnicHost::attach(&name).unwrap();
        let mut counters = [0u64; N_COUNTERS];
        let mut batch = TxBatch::default();
        let mut send = |host: &mut VnicHost,
                        wire: &mut VnicWire,
                        counters: &mut [u64; N_COUNTERS],
                        outs: &[u8]| {
            for (i, _) in outs.iter().enumerate() {
                assert!(wire.inject(0, &[i as u8; 60]));
            }
            let mut got = [Frame { buf: 0, len: 0 }; 64];
            assert_eq!(host.rx_burst(0, &mut got[..outs.len()]), outs.len());
            for (f, &out) in got.iter().zip(outs) {
                batch.queue(out, *f).unwrap();
            }
            batch.send(host, counters);
        };
        let collect = |wire: &mut VnicWire, port: usize| {
            let mut firsts = Vec::new();
            wire.collect(port, 100, |f| firsts.push(f[0]));
            firsts
        };
        // Several ports: each gets its own frames, in order.
        send(&mut host, &mut wire, &mut counters, &[1, 2, 1, 0, 2, 2]);
        assert_eq!(collect(&mut wire, 0), [3]);
        assert_eq!(collect(&mut wire, 1), [0, 2]);
        assert_eq!(collect(&mut wire, 2), [1, 4, 5]);
        assert_eq!(counters[Counter::TxPackets as usize], 6);
        assert_eq!(counters[Counter::TxBytes as usize], 6 * 60);
        // One port, more frames than its 64-slot ring holds uncollected:
        // what fits goes, the rest is freed and counted.
        send(&mut host, &mut wire, &mut counters, &[1; 40]);
        send(&mut host, &mut wire, &mut counters, &[1; 40]);
        let want: Vec<u8> = (0..40).chain(0..24).collect();
        assert_eq!(collect(&mut wire, 1), want);
        assert_eq!(counters[Counter::TxPackets as usize], 6 + 64);
        assert_eq!(counters[Counter::DropTxFull as usize], 16);
        assert_eq!(counters[Counter::TxBytes as usize], 70 * 60);
        host.audit().unwrap();
    }
}
