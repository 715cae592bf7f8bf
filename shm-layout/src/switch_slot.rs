//! Per-switch slot: identity, heartbeat, acknowledged generations, counters.
//!
//! controld writes `pid`, `cpu` and `state` when it starts a switch and when
//! it reaps or fences one (and `restarts`, `fenced`); the switch itself
//! writes everything else, once per poll loop iteration, never per packet.

use core::mem::{offset_of, size_of};
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::fingerprint::Fingerprint;
use crate::fp_type;

/// `SwitchSlot::state` values.
pub const SW_EMPTY: u32 = 0;
/// Started by controld, not yet polling.
pub const SW_STARTING: u32 = 1;
/// Polling; acknowledges generations.
pub const SW_RUNNING: u32 = 2;
/// Exited or reaped.
pub const SW_STOPPED: u32 = 3;
/// Exited too often in too short a time: controld no longer restarts it.
pub const SW_FAILED: u32 = 4;

macro_rules! counters {
    ($($name:ident = $idx:expr, $snake:literal, $doc:expr;)*) => {
        /// Per-switch counters. Indexes into `SwitchSlot::counters`.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        #[repr(usize)]
        pub enum Counter { $(#[doc = $doc] $name = $idx,)* }

        impl Counter {
            pub const ALL: &'static [Counter] = &[$(Counter::$name,)*];
            /// snake_case name for tools and metrics.
            pub fn name(self) -> &'static str {
                match self { $(Counter::$name => $snake,)* }
            }
            /// One line saying what the counter counts (metrics' HELP text).
            pub fn help(self) -> &'static str {
                match self { $(Counter::$name => $doc,)* }
            }
        }
    };
}

counters! {
    RxPackets = 0, "rx_packets", "frames received";
    RxBytes = 1, "rx_bytes", "bytes received";
    TxPackets = 2, "tx_packets", "frames transmitted";
    TxBytes = 3, "tx_bytes", "bytes transmitted";
    ConnNew = 4, "conn_new", "connections created from a SYN or a first UDP datagram";
    ConnMidflow = 5, "conn_midflow", "connections recovered from a mid-connection TCP packet with no entry";
    FwdHit = 6, "fwd_hit", "client-to-VIP packets that hit a connection entry";
    ReplyHit = 7, "reply_hit", "backend-to-client packets that hit a connection entry (NAT)";
    ArpReplies = 8, "arp_replies", "ARP requests for a VIP answered";
    RstSent = 9, "rst_sent", "TCP RSTs sent for a VIP port without a service";
    DropMalformed = 10, "drop_malformed", "frames dropped as malformed (truncated, bad IHL, lying lengths, bad version, bad checksum)";
    DropNotOurs = 11, "drop_not_ours", "frames neither to a VIP nor a NAT reply";
    DropNoServiceUdp = 12, "drop_no_service_udp", "UDP datagrams to a VIP port without a service";
    DropNoBackend = 13, "drop_no_backend", "new connections for a service with no eligible backend";
    DropNoRoute = 14, "drop_no_route", "frames without a route to their destination";
    DropNoNeighbour = 15, "drop_no_neighbour", "frames whose next hop has no known MAC";
    DropTtl = 16, "drop_ttl", "frames whose TTL expired";
    DropFragment = 17, "drop_fragment", "IPv4 fragments dropped: malformed, not TCP/UDP, or a later fragment neither to a VIP nor from a backend with no first fragment seen";
    DropTxFull = 18, "drop_tx_full", "frames dropped because a TX ring was full";
    DropTableFull = 19, "drop_table_full", "new connections dropped because the connection table had no free slot";
    DropNonIp = 20, "drop_non_ip", "non-IPv4, non-ARP frames";
    DropNoConfig = 21, "drop_no_config", "frames received while no usable configuration and routing were published (none yet, or a slot whose checksum does not match its contents)";
    DropEgressPort = 22, "drop_egress_port", "frames routed to a port this switch does not serve";
    TornBursts = 23, "torn_bursts", "bursts that saw their configuration or routing slot change under them (must stay 0)";
    Loops = 24, "loops", "poll loop iterations";
    IdleSleeps = 25, "idle_sleeps", "times the adaptive idle policy slept";
    DropTcpNoEntry = 26, "drop_tcp_no_entry", "TCP RST or non-SYN packets to a VIP that could not be matched";
    IcmpFragNeeded = 27, "icmp_frag_needed", "ICMP fragmentation-needed sent to a client whose DF packet would exceed the egress MTU once encapsulated";
    DropTooBig = 28, "drop_too_big", "packets that would exceed the egress MTU once encapsulated and may not get an ICMP answer (no DF, or no room)";
    DownMoved = 29, "down_moved", "flows moved off a DOWN backend (UDP flows and TCP SYNs, policies reschedule and reset)";
    DownRst = 30, "down_rst", "RSTs sent to clients of established TCP connections to a DOWN backend (policy reset)";
    ConnQueued = 31, "conn_queued", "new connections held in the switch's queue because every eligible backend was at its max_conns";
    ConnDequeued = 32, "conn_dequeued", "queued new connections sent to a backend once one had room";
    ConnRefused = 33, "conn_refused", "new connections refused (TCP: RST to the client; UDP: dropped) because every eligible backend stayed full: queue full, queue timeout, or no queueing";
    IcmpRateLimited = 35, "icmp_rate_limited", "ICMP answers (fragmentation-needed, echo replies to a VIP) not sent because the switch's ICMP budget (1000/s, bursts of 100) was spent; the packet was dropped";
    DropQueueDup = 34, "drop_queue_dup", "retransmitted SYNs (or datagrams) of a flow already waiting in the queue";
    BusyNs = 36, "busy_ns", "nanoseconds the switch spent in poll loops that moved frames (its utilisation is the growth of busy_ns over wall time; while it is saturated, busy_ns over rx_packets is its cost per frame)";
    FlowCacheHit = 37, "flow_cache_hit", "packets of known connections answered from the switch's flow cache (the full path's cached rewrite; counted in fwd_hit or reply_hit as well)";
    BadChecksum = 38, "bad_checksum", "published configuration or routing generations the switch refused because the slot's checksum did not match its contents (must stay 0; its frames count in drop_no_config)";
    EvictedProvisional = 39, "evicted_provisional", "provisional connection entries (picked up mid-flow, not yet confirmed) evicted to make room for a new connection in a full table";
    EvictedHalfOpen = 40, "evicted_half_open", "half-open TCP connection entries (handshake not completed) evicted to make room for a new connection in a full table";
    ConnConfirmed = 41, "conn_confirmed", "provisional connection entries confirmed (NAT: a reply from the backend; DR/tunnel: a client packet at least 1 s after the pickup) and made established";
    RstRateLimited = 42, "rst_rate_limited", "TCP RSTs for a VIP port without a service not sent because the switch's answer budget (1000/s, bursts of 100, shared with ICMP) was spent; the packet was dropped";
    DropMartian = 43, "drop_martian", "packets to a VIP from an impossible source: 0.0.0.0/8, 127.0.0.0/8, 224.0.0.0/4 (multicast), 240.0.0.0/4 (reserved, broadcast), a VIP, or a backend of the service arriving from the client side";
    DropBadFlags = 44, "drop_bad_flags", "TCP segments to a VIP with an impossible flag set: SYN with FIN or RST, or no flag at all";
    DropUdpLength = 45, "drop_udp_length", "UDP datagrams to a VIP whose UDP length disagrees with the IP length";
    IcmpForwarded = 46, "icmp_forwarded", "ICMP errors (destination unreachable, time exceeded) sent to the VIP about a packet of a VIP flow, forwarded to that flow's backend (NAT: outer destination and quoted header rewritten to the backend; DR: MACs only; tunnel: encapsulated)";
    IcmpToClient = 47, "icmp_to_client", "ICMP errors from the backend side quoting a packet the switch forwarded to a NAT backend, sent on to the client with the quoted header and outer source rewritten to the VIP";
    IcmpEchoAnswered = 48, "icmp_echo_answered", "ICMP echo requests to a VIP answered by the switch (within the ICMP budget; spent budget counts in icmp_rate_limited)";
    DropIcmpMalformed = 49, "drop_icmp_malformed", "ICMP to a VIP or quoting a VIP flow dropped as malformed: bad ICMP checksum, a quote shorter than an IP header and 8 bytes, a quote not TCP/UDP, an outer destination that is not the quoted source";
    DropIcmpNoFlow = 50, "drop_icmp_no_flow", "ICMP errors quoting a packet from a VIP whose connection is unknown or expired (the table is only read: ICMP never creates an entry)";
    DropIcmpType = 51, "drop_icmp_type", "ICMP to a VIP of a type the switch neither answers nor relays (anything but echo request, destination unreachable, time exceeded)";
    DropVlan = 52, "drop_vlan", "802.1Q/802.1ad tagged frames (tagged ports are not supported; tagged ARP is not answered)";
    DropL2Dest = 53, "drop_l2_dest", "frames to a broadcast, multicast or zero MAC or to another host's MAC (ARP requests excepted: they are broadcast)";
    DropL2Src = 54, "drop_l2_src", "frames from a broadcast, multicast or zero MAC or from the port's own MAC, and ARP whose sender MAC is one of those";
    DropIpOptions = 55, "drop_ip_options", "IPv4 TCP/UDP packets with IP options (source routing included), dropped as Katran does";
    ClientHopUsed = 56, "client_hop_used", "NAT replies sent to the client MAC learned from the frame that opened the connection (on-link client the routing table has no neighbour for)";
    FragForwarded = 57, "frag_forwarded", "IPv4 fragments of TCP/UDP datagrams forwarded (first fragments switched like whole packets, later ones by their first fragment's decision)";
    FragHeld = 58, "frag_held", "later fragments held because they arrived before their datagram's first fragment";
    DropFragTimeout = 59, "drop_frag_timeout", "held fragments dropped because their first fragment did not pass within 2 s";
    DropFragOverflow = 60, "drop_frag_overflow", "later fragments dropped because the switch's holding area was full";
    DropRxRing = 61, "drop_rx_ring", "frames the kernel dropped on receive because an AF_PACKET port's RX ring was full (the switch fell behind)";
    DropRxTruncated = 62, "drop_rx_truncated", "frames an AF_PACKET port received larger than a ring slot (GRO/GSO super-frames: turn those offloads off) or with a VLAN tag it could not restore; never forwarded";
    SyncookieSent = 64, "syncookie_sent", "SYNs to a SYN-proxied service answered with a SYN cookie (no table entry made)";
    SyncookieOk = 65, "syncookie_ok", "ACKs with a valid SYN cookie: connection entry made and SYN sent to the backend";
    DropSyncookieBad = 66, "drop_syncookie_bad", "ACKs without an entry to a SYN-proxied service whose cookie did not check (bad, expired or of an older secret); answered with a RST within the answer budget";
    SyncookieDataDropped = 67, "syncookie_data_dropped", "client segments with payload dropped while their SYN-proxied connection waited for the backend's SYN-ACK (the cookie ACK itself, or data before the splice; the client retransmits)";
    SynproxySynAck = 68, "synproxy_syn_ack", "backend SYN-ACKs of SYN-proxied connections answered by the switch with the ACK that completes the backend's handshake (first or retransmitted)";
    SynproxySynResent = 69, "synproxy_syn_resent", "SYNs sent to the backend again because the client sent a segment while its SYN-proxied connection still waited for the backend's SYN-ACK";
    SyncookieRstLimited = 70, "syncookie_rst_limited", "RSTs for bad SYN cookies not sent because the answer budget (shared with ICMP and unserved-port RSTs) was spent";
    SynproxyAutoBursts = 71, "synproxy_auto_bursts", "SYNs to a service with syn_proxy = \"auto\" answered with a cookie because the SYN rate or table occupancy was over its threshold";
    RecordsSent = 72, "records_sent", "closed-connection records sent to controld (in batches over the switch's records ring)";
    RecordsBatches = 73, "records_batches", "batches of closed-connection records sent to controld (one ring message each)";
    DropRecordsRingFull = 74, "drop_records_ring_full", "closed-connection records lost because the records ring to controld was full (controld not draining it)";
    DropRecordsPending = 75, "drop_records_pending", "closed-connection records lost because more connections closed within the batching delay than the switch holds (4096)";
}

/// Number of counter words per switch (room to grow without a layout change).
pub const N_COUNTERS: usize = 128;

const _: () = {
    let mut i = 0;
    while i < Counter::ALL.len() {
        assert!((Counter::ALL[i] as usize) < N_COUNTERS);
        i += 1;
    }
};

/// One switch's slot. Two cache lines of identity and liveness, then counters.
#[repr(C, align(64))]
#[derive(Debug)]
pub struct SwitchSlot {
    pub pid: AtomicU32,
    pub cpu: AtomicU32,
    pub state: AtomicU32,
    pub restarts: AtomicU32,
    /// CLOCK_MONOTONIC ns of the switch's last loop iteration.
    pub heartbeat_ns: AtomicU64,
    /// Configuration generation the switch used in its last burst.
    pub seen_config: AtomicU64,
    /// Routing generation the switch used in its last burst.
    pub seen_routing: AtomicU64,
    pub started_ns: AtomicU64,
    /// Start time of `pid` ([`crate::time::process_start`]), written by
    /// controld with the pid: together they name one process, so a reused
    /// pid is never taken for this switch (not signalled, not trusted as a
    /// connection-slot writer).
    pub proc_start: AtomicU64,
    /// Times the publisher fenced this switch (excluded it for not
    /// acknowledging in time, and had it stopped before rewriting the slot
    /// it may still read). Written by controld only.
    pub fenced: AtomicU32,
    pub _pad: [u8; 4],
    pub counters: [AtomicU64; N_COUNTERS],
}

const _: () = {
    assert!(size_of::<SwitchSlot>() == 64 + 8 * N_COUNTERS);
    assert!(offset_of!(SwitchSlot, counters) == 64);
};

pub(crate) const fn fingerprint(fp: Fingerprint) -> Fingerprint {
    let fp = fp_type!(
        fp,
        SwitchSlot,
        pid,
        cpu,
        state,
        restarts,
        heartbeat_ns,
        seen_config,
        seen_routing,
        started_ns,
        proc_start,
        fenced,
        counters
    );
    fp.mix(N_COUNTERS)
}

impl SwitchSlot {
    #[inline]
    pub fn counter(&self, c: Counter) -> u64 {
        self.counters[c as usize].load(Ordering::Relaxed)
    }

    /// Whether the switch is running and its process exists.
    pub fn is_live(&self) -> bool {
        self.state.load(Ordering::SeqCst) == SW_RUNNING && self.process_alive()
    }

    /// Whether the process this slot names (pid and start time) still
    /// runs. A slot written before start times were recorded (0) names no
    /// process that can be proven alive.
    pub fn process_alive(&self) -> bool {
        crate::time::process_alive(
            self.pid.load(Ordering::Relaxed),
            self.proc_start.load(Ordering::Relaxed),
        )
    }
}

/// Runtime counters of one backend id, shared by all switches (atomics,
/// Relaxed: each word is a count on its own). One cache line per backend,
/// so switches busy with different backends do not share lines.
///
/// `active` is the backend's open connections: a switch reserves one before
/// it inserts a connection (bounded by `BackendRec::max_conns` with a
/// compare-and-swap loop, so the limit holds across switches) and gives it
/// back if the insert fails; the reservation is released exactly once, by
/// whoever moves the entry's `tcp_state` to `STATE_CLOSING` with an atomic
/// read-modify-write (a switch on a FIN or RST, the GC or an insert that
/// reuses an expired entry). `total` counts connections ever inserted.
/// A reservation a killed switch held in flight is lost to that protocol;
/// the GC reconciles `active` against the table once per sweep round and
/// counts what it took back in `reconciled_down` (leaked reservations) and
/// what it added in `reconciled_up` (over-releases). See controld's `gc`.
/// `released` counts the reservations given back ([`release`]): a switch
/// holding new connections for a full backend runs them through its
/// filter again only once this count (of one of their service's
/// backends) has moved, not every loop.
///
/// `syn_ack_*` are written once per NAT connection, on the SYN-ACK that
/// establishes it: the sample is the time from the connection's SYN
/// (its entry's `created_ms`) to that SYN-ACK, in milliseconds; `slow`
/// counts samples above the service's `latency_target_ms`. Monotonic:
/// readers (controld) work on differences.
#[repr(C, align(64))]
#[derive(Debug)]
pub struct BackendCounters {
    pub active: AtomicU32,
    pub _pad: u32,
    pub total: AtomicU64,
    pub syn_ack_count: AtomicU64,
    pub syn_ack_sum_ms: AtomicU64,
    pub syn_ack_slow: AtomicU64,
    pub reconciled_down: AtomicU64,
    pub reconciled_up: AtomicU64,
    pub released: AtomicU64,
    pub _pad1: [u64; 0],
}

impl BackendCounters {
    /// Zeroes the totals and latency samples of an id no configuration
    /// names any more (controld, when it frees the id), so its next owner
    /// does not inherit them. `active` is left to the switches and the GC.
    pub fn reset_totals(&self) {
        self.total.store(0, Ordering::Relaxed);
        self.syn_ack_count.store(0, Ordering::Relaxed);
        self.syn_ack_sum_ms.store(0, Ordering::Relaxed);
        self.syn_ack_slow.store(0, Ordering::Relaxed);
        self.reconciled_down.store(0, Ordering::Relaxed);
        self.reconciled_up.store(0, Ordering::Relaxed);
    }
}

const _: () = assert!(size_of::<BackendCounters>() == 64);

pub(crate) const fn backend_fingerprint(fp: Fingerprint) -> Fingerprint {
    fp_type!(
        fp,
        BackendCounters,
        active,
        total,
        syn_ack_count,
        syn_ack_sum_ms,
        syn_ack_slow,
        reconciled_down,
        reconciled_up,
        released
    )
}

/// Takes one connection slot of a backend whose limit is `max` (0: no
/// limit). Returns false, changing nothing, when the backend is full. The
/// compare-and-swap makes the limit hold however many switches race.
#[inline]
pub fn reserve(c: &BackendCounters, max: u32) -> bool {
    if max == 0 {
        c.active.fetch_add(1, Ordering::Relaxed);
        return true;
    }
    c.active
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
            (v < max).then_some(v + 1)
        })
        .is_ok()
}

/// Gives back one connection slot (never below zero) and counts it in
/// `released` (Release: whoever reads the new count with Acquire then
/// sees `active` without this slot).
#[inline]
pub fn release(c: &BackendCounters) {
    if c.active
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| v.checked_sub(1))
        .is_ok()
    {
        c.released.fetch_add(1, Ordering::Release);
    }
}
