//! Per-switch slot: identity, heartbeat, acknowledged generations, counters.
//!
//! controld writes `pid`, `cpu` and `state` when it starts a switch and when
//! it reaps one; the switch itself writes everything else, once per poll
//! loop iteration, never per packet.

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
    DropFragment = 17, "drop_fragment", "IPv4 fragments (fragment policy: drop)";
    DropTxFull = 18, "drop_tx_full", "frames dropped because a TX ring was full";
    DropTableFull = 19, "drop_table_full", "new connections dropped because the connection table had no free slot";
    DropNonIp = 20, "drop_non_ip", "non-IPv4, non-ARP frames";
    DropNoConfig = 21, "drop_no_config", "frames received before any configuration was published";
    DropEgressPort = 22, "drop_egress_port", "frames routed to a port this switch does not serve";
    TornBursts = 23, "torn_bursts", "bursts that saw their configuration slot change under them (must stay 0)";
    Loops = 24, "loops", "poll loop iterations";
    IdleSleeps = 25, "idle_sleeps", "times the adaptive idle policy slept";
    DropTcpNoEntry = 26, "drop_tcp_no_entry", "TCP RST or non-SYN packets to a VIP that could not be matched";
    IcmpFragNeeded = 27, "icmp_frag_needed", "ICMP fragmentation-needed sent to a client whose DF packet would exceed the egress MTU once encapsulated";
    DropTooBig = 28, "drop_too_big", "packets that would exceed the egress MTU once encapsulated and may not get an ICMP answer (no DF, or no room)";
    DownMoved = 29, "down_moved", "flows moved off a DOWN backend (UDP flows and TCP SYNs, policies reschedule and reset)";
    DownRst = 30, "down_rst", "RSTs sent to clients of established TCP connections to a DOWN backend (policy reset)";
}

/// Number of counter words per switch (room to grow without a layout change).
pub const N_COUNTERS: usize = 64;

const _: () = assert!((Counter::DownRst as usize) < N_COUNTERS);

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
    pub _pad: [u8; 16],
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
        self.state.load(Ordering::SeqCst) == SW_RUNNING
            && crate::time::pid_alive(self.pid.load(Ordering::Relaxed))
    }
}

/// Active and total connection counts of one backend id, shared by all
/// switches (atomics; incremented on insert, decremented on expiry).
#[repr(C, align(16))]
#[derive(Debug)]
pub struct BackendCounters {
    pub active: AtomicU32,
    pub _pad: u32,
    pub total: AtomicU64,
}

const _: () = assert!(size_of::<BackendCounters>() == 16);

pub(crate) const fn backend_fingerprint(fp: Fingerprint) -> Fingerprint {
    fp_type!(fp, BackendCounters, active, total)
}
