//! L2 hygiene: the Ethernet frames the switch acts on at all.
//!
//! A careful switch acts only on frames that are addressed to it, by a
//! host that can exist, on the untagged network it was configured for:
//!
//! - 802.1Q and 802.1ad tagged frames are dropped (`drop_vlan`): ports are
//!   untagged, and a tagged frame belongs to another network (AF_PACKET
//!   strips the tag into the ring's header; netdrv puts it back so the
//!   filter sees it);
//! - a frame to a broadcast, multicast or zero MAC, or to a unicast MAC
//!   that is not the port's (another host's, seen on a promiscuous port or
//!   a flooding bridge), is dropped (`drop_l2_dest`); ARP is the exception
//!   for broadcast (requests are broadcast);
//! - a frame from a broadcast, multicast or zero MAC, or from the port's
//!   own MAC (a loop, or a spoof), is dropped (`drop_l2_src`), and so is an
//!   ARP frame whose sender MAC is one no host can have (it would have the
//!   switch answer to broadcast, and poison the neighbour tables of
//!   whoever believes it);
//! - an IPv4 TCP/UDP packet with IP options (source routing, record
//!   route, timestamps, router alert...) is dropped (`drop_ip_options`),
//!   as Katran does: clients of a VIP have no use for them, source routing
//!   is an attack, and a NAT that rewrites addresses would have to rewrite
//!   the options too.
//!
//! [`refused`] runs on the full path only (a frame the flow cache did not
//! answer); the first pass leaves every frame from or to a group address
//! to the full path, so only frames between unicast MACs ever reach the
//! flow cache (see `super::parse_and_prefetch`).

use shm_layout::switch_slot::Counter;

/// 802.1Q customer tag.
pub(super) const TPID_8021Q: u16 = 0x8100;
/// 802.1ad service tag (Q-in-Q).
pub(super) const TPID_8021AD: u16 = 0x88a8;
/// The pre-standard Q-in-Q tag some switches still send.
pub(super) const TPID_QINQ_OLD: u16 = 0x9100;

/// The group bit of a MAC read by [`mac48`] (the first byte's lowest).
const GROUP: u64 = 1;
const BROADCAST: u64 = (1 << 48) - 1;

/// A MAC as the low 48 bits of a number, its first byte lowest (little
/// endian: no byte swap; only equality and the group bit are asked of it).
#[inline(always)]
fn mac48(m: &[u8]) -> u64 {
    let (Some(a), Some(b)) = (m.first_chunk::<4>(), m.get(4..6)) else {
        return 0;
    };
    u64::from(u32::from_le_bytes(*a)) | (u64::from(u16::from_le_bytes([b[0], b[1]])) << 32)
}

/// Whether no host can send from `mac`: a group (broadcast or multicast)
/// address or zero.
#[inline]
pub(super) fn not_a_host(mac: [u8; 6]) -> bool {
    let m = mac48(&mac);
    m & GROUP != 0 || m == 0
}

#[inline(always)]
fn is_tag(ethertype: u16) -> bool {
    matches!(ethertype, TPID_8021Q | TPID_8021AD | TPID_QINQ_OLD)
}

/// The counter under which a frame must be dropped for its Ethernet header
/// (`frame` at least its 14 bytes), received on a port whose MAC is
/// `port_mac` (`None`: a port this switch does not serve; its own-MAC
/// rules are then not judged); `None` for a frame the switch may act on.
#[inline(always)]
pub(super) fn refused(frame: &[u8], port_mac: Option<[u8; 6]>) -> Option<Counter> {
    let Some(h) = frame.first_chunk::<14>() else {
        return Some(Counter::DropMalformed);
    };
    let (dst, src) = (mac48(&h[0..6]), mac48(&h[6..12]));
    let ethertype = u16::from_be_bytes([h[12], h[13]]);
    // No 48-bit MAC equals it.
    let own = port_mac.map_or(u64::MAX, |m| mac48(&m));
    // The common case in a few comparisons; the rest out of line.
    if dst == own && src & GROUP == 0 && src != 0 && src != own && !is_tag(ethertype) {
        return None;
    }
    refused_which(dst, src, ethertype, own)
}

/// [`refused`] past its common case: which rule the frame breaks, if any.
#[cold]
#[inline(never)]
fn refused_which(dst: u64, src: u64, ethertype: u16, own: u64) -> Option<Counter> {
    if is_tag(ethertype) {
        return Some(Counter::DropVlan);
    }
    if src & GROUP != 0 || src == 0 || src == own {
        return Some(Counter::DropL2Src);
    }
    let to_us = if own == u64::MAX {
        dst & GROUP == 0 && dst != 0
    } else {
        dst == own
    };
    let arp_broadcast = ethertype == wire::ETHERTYPE_ARP && dst == BROADCAST;
    (!to_us && !arp_broadcast).then_some(Counter::DropL2Dest)
}

/// The counter under which an ARP packet must be dropped for its sender
/// MAC, `None` if no host could not have sent it.
#[inline]
pub(super) fn bad_arp_sender(sender_mac: [u8; 6]) -> Option<Counter> {
    not_a_host(sender_mac).then_some(Counter::DropL2Src)
}

/// Whether an IPv4 header of `header_len` bytes carries options.
#[inline]
pub(super) fn has_ip_options(header_len: usize) -> bool {
    header_len > 20
}

#[cfg(test)]
mod tests {
    use etherparse::PacketBuilder;
    use shm_layout::switch_slot::{Counter, N_COUNTERS};

    use crate::filter::{
        Ctx, Parsed, Verdict, answer_fingerprint, parse_and_prefetch, process, switch_parsed,
    };
    use crate::fixture::{CLIENT_GW_MAC, Fixture, VIP, port_mac};
    use crate::flowcache::FlowCache;

    const PORT0: [u8; 6] = [2, 0, 0, 0, 0, 1];

    /// A SYN from a client behind the fixture's gateway to VIP:80, with
    /// the given MACs.
    fn syn_macs(src: [u8; 6], dst: [u8; 6], cport: u16) -> Vec<u8> {
        let mut v = Vec::new();
        PacketBuilder::ethernet2(src, dst)
            .ipv4([198, 18, 100, 1], VIP.to_be_bytes(), 64)
            .tcp(cport, 80, 1, 1000)
            .syn()
            .write(&mut v, &[])
            .unwrap();
        v
    }

    fn ack(cport: u16) -> Vec<u8> {
        let mut v = Vec::new();
        PacketBuilder::ethernet2(CLIENT_GW_MAC, PORT0)
            .ipv4([198, 18, 100, 1], VIP.to_be_bytes(), 64)
            .tcp(cport, 80, 2, 1000)
            .ack(1)
            .write(&mut v, &[7; 10])
            .unwrap();
        v
    }

    /// An ARP request for `target` from `sha` (Ethernet source `src`).
    fn arp_request(src: [u8; 6], sha: [u8; 6], target: [u8; 4]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&[0xff; 6]);
        v.extend_from_slice(&src);
        v.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
        v.extend_from_slice(&sha);
        v.extend_from_slice(&[198, 18, 100, 1]);
        v.extend_from_slice(&[0; 6]);
        v.extend_from_slice(&target);
        v.resize(60, 0);
        v
    }

    /// `frame` with an 802.1Q (or other) tag `tpid`/VLAN 7 after its MACs.
    fn tagged(frame: &[u8], tpid: u16) -> Vec<u8> {
        let mut v = frame[..12].to_vec();
        v.extend_from_slice(&tpid.to_be_bytes());
        v.extend_from_slice(&[0, 7]);
        v.extend_from_slice(&frame[12..]);
        v
    }

    /// `frame` (Ethernet/IPv4 without options) with IP `options` (a
    /// multiple of 4 bytes) inserted, lengths and header checksum fixed.
    fn with_options(frame: &[u8], options: &[u8]) -> Vec<u8> {
        let mut v = frame[..34].to_vec();
        v.extend_from_slice(options);
        v.extend_from_slice(&frame[34..]);
        v[14] = 0x40 | (5 + options.len() / 4) as u8;
        let total = u16::from_be_bytes([v[16], v[17]]) + options.len() as u16;
        v[16..18].copy_from_slice(&total.to_be_bytes());
        v[24..26].copy_from_slice(&[0, 0]);
        let h = etherparse::Ipv4HeaderSlice::from_slice(&v[14..]).unwrap();
        let c = h.to_header().calc_header_checksum();
        v[24..26].copy_from_slice(&c.to_be_bytes());
        v
    }

    /// Runs `frame` received on port 0 the engine's way (first pass, then
    /// the third) with `ctx`.
    fn passes(ctx: &mut Ctx<'_>, frame: &[u8]) -> Verdict {
        let mut buf = vec![0u8; 2048];
        buf[..frame.len()].copy_from_slice(frame);
        let mut p = Parsed::default();
        parse_and_prefetch(&buf[..frame.len()], &ctx.ct, &ctx.flows, &mut p);
        switch_parsed(&mut buf, frame.len(), &p, 0, &port_mac, ctx)
    }

    /// Runs `frame` both ways (all passes in one call, and the engine's
    /// passes) on fresh fixtures; both verdicts and both counter sets must
    /// agree; returns them.
    fn both(tag: &str, frame: &[u8]) -> (Verdict, [u64; N_COUNTERS]) {
        let fx = Fixture::new(tag, 1 << 10);
        let mut c = [0u64; N_COUNTERS];
        let mut buf = vec![0u8; 2048];
        buf[..frame.len()].copy_from_slice(frame);
        let v = process(&mut buf, frame.len(), 0, &port_mac, &mut fx.ctx(&mut c));
        let fx2 = Fixture::new(&format!("{tag}-p"), 1 << 10);
        let mut c2 = [0u64; N_COUNTERS];
        let v2 = passes(&mut fx2.ctx(&mut c2), frame);
        assert_eq!((v, c), (v2, c2), "process and the passes disagree");
        (v, c)
    }

    fn dropped_as(tag: &str, frame: &[u8], counter: Counter) {
        let (v, c) = both(tag, frame);
        assert_eq!(v, Verdict::Drop, "{tag}");
        assert_eq!(c[counter as usize], 1, "{tag}: {}", counter.name());
        assert_eq!(c[Counter::ConnNew as usize], 0, "{tag}: no connection");
        assert_eq!(c[Counter::ArpReplies as usize], 0, "{tag}: no ARP answer");
        let total: u64 = Counter::ALL
            .iter()
            .filter(|c| c.name().starts_with("drop_"))
            .map(|&k| c[k as usize])
            .sum();
        assert_eq!(total, 1, "{tag}: counted once");
    }

    #[test]
    fn a_plain_syn_and_a_broadcast_arp_request_for_the_vip_still_pass() {
        let (v, c) = both("unit-l2-ok", &syn_macs(CLIENT_GW_MAC, PORT0, 40_000));
        assert!(matches!(v, Verdict::Tx { port: 1, .. }), "{v:?}");
        assert_eq!(c[Counter::ConnNew as usize], 1);
        let (v, c) = both(
            "unit-l2-arp",
            &arp_request(CLIENT_GW_MAC, CLIENT_GW_MAC, VIP.to_be_bytes()),
        );
        assert!(matches!(v, Verdict::Tx { port: 0, .. }), "{v:?}");
        assert_eq!(c[Counter::ArpReplies as usize], 1);
    }

    #[test]
    fn tagged_frames_open_no_connection_and_tagged_arp_is_not_answered() {
        let syn = syn_macs(CLIENT_GW_MAC, PORT0, 40_001);
        dropped_as("unit-l2-q", &tagged(&syn, 0x8100), Counter::DropVlan);
        dropped_as("unit-l2-ad", &tagged(&syn, 0x88a8), Counter::DropVlan);
        dropped_as(
            "unit-l2-qinq",
            &tagged(&tagged(&syn, 0x8100), 0x88a8),
            Counter::DropVlan,
        );
        let arp = arp_request(CLIENT_GW_MAC, CLIENT_GW_MAC, VIP.to_be_bytes());
        dropped_as("unit-l2-qarp", &tagged(&arp, 0x8100), Counter::DropVlan);
    }

    #[test]
    fn frames_to_a_group_zero_or_another_hosts_mac_are_dropped() {
        for (tag, dst) in [
            ("bc", [0xff; 6]),
            ("mc", [0x01, 0, 0x5e, 0, 0, 1]),
            ("zero", [0; 6]),
            ("other", [2, 0, 0, 0, 9, 9]),
            ("port1", [2, 0, 0, 0, 0, 2]),
        ] {
            let f = syn_macs(CLIENT_GW_MAC, dst, 40_002);
            dropped_as(&format!("unit-l2-dst-{tag}"), &f, Counter::DropL2Dest);
        }
        // ARP to a multicast MAC is no request a host sends.
        let mut arp = arp_request(CLIENT_GW_MAC, CLIENT_GW_MAC, VIP.to_be_bytes());
        arp[..6].copy_from_slice(&[0x01, 0, 0x5e, 0, 0, 1]);
        dropped_as("unit-l2-dst-arpmc", &arp, Counter::DropL2Dest);
    }

    #[test]
    fn frames_from_a_group_zero_or_the_ports_own_mac_are_dropped() {
        for (tag, src) in [
            ("bc", [0xff; 6]),
            ("mc", [0x01, 0, 0x5e, 0, 0, 1]),
            ("zero", [0; 6]),
            ("own", PORT0),
        ] {
            let f = syn_macs(src, PORT0, 40_003);
            dropped_as(&format!("unit-l2-src-{tag}"), &f, Counter::DropL2Src);
        }
    }

    /// An ARP request for a VIP whose sender MAC is broadcast, multicast or
    /// zero is not answered (the answer would go to that address).
    #[test]
    fn arp_with_a_sender_mac_no_host_has_is_not_answered() {
        for (tag, sha) in [
            ("bc", [0xff; 6]),
            ("mc", [0x01, 0, 0x5e, 0, 0, 1]),
            ("zero", [0; 6]),
        ] {
            let f = arp_request(CLIENT_GW_MAC, sha, VIP.to_be_bytes());
            dropped_as(&format!("unit-l2-sha-{tag}"), &f, Counter::DropL2Src);
        }
    }

    /// IP options, source routing first among them, are not forwarded.
    #[test]
    fn packets_with_ip_options_are_dropped() {
        let syn = syn_macs(CLIENT_GW_MAC, PORT0, 40_004);
        // Loose and strict source routes (via 198.19.1.1), record route,
        // router alert.
        for (tag, opts) in [
            ("lsrr", vec![0x83, 7, 4, 198, 19, 1, 1, 0]),
            ("ssrr", vec![0x89, 7, 4, 198, 19, 1, 1, 0]),
            ("rr", vec![0x07, 7, 4, 0, 0, 0, 0, 0]),
            ("ra", vec![0x94, 4, 0, 0]),
        ] {
            let f = with_options(&syn, &opts);
            assert!(etherparse::SlicedPacket::from_ethernet(&f).is_ok(), "{tag}");
            dropped_as(&format!("unit-l2-opt-{tag}"), &f, Counter::DropIpOptions);
        }
    }

    /// The flow cache never answers a frame to or from a group MAC: the
    /// first pass leaves it to the full path, which drops it.
    #[test]
    fn an_established_flow_is_not_answered_for_a_frame_to_broadcast() {
        let fx = Fixture::new("unit-l2-cache", 1 << 10);
        let mut c = [0u64; N_COUNTERS];
        let mut ctx = fx.ctx(&mut c);
        let (_, routing) = fx.stamps();
        let answers =
            answer_fingerprint(&ctx.cfg, &[port_mac(0), port_mac(1)], &[Some(0), Some(1)]);
        ctx.flows = FlowCache::new(1024).unwrap();
        ctx.flows.sync(answers, routing);
        let syn = syn_macs(CLIENT_GW_MAC, PORT0, 40_005);
        assert!(matches!(
            passes(&mut ctx, &syn),
            Verdict::Tx { port: 1, .. }
        ));
        // Twice: the second is the flow cache's answer.
        for _ in 0..2 {
            assert!(matches!(
                passes(&mut ctx, &ack(40_005)),
                Verdict::Tx { port: 1, .. }
            ));
        }
        let hits = ctx.counters[Counter::FlowCacheHit as usize];
        assert_eq!(hits, 1);
        let mut bc = ack(40_005);
        bc[..6].copy_from_slice(&[0xff; 6]);
        assert_eq!(passes(&mut ctx, &bc), Verdict::Drop);
        let mut mc_src = ack(40_005);
        mc_src[6..12].copy_from_slice(&[0x01, 0, 0x5e, 0, 0, 1]);
        assert_eq!(passes(&mut ctx, &mc_src), Verdict::Drop);
        assert_eq!(ctx.counters[Counter::FlowCacheHit as usize], hits);
        assert_eq!(ctx.counters[Counter::DropL2Dest as usize], 1);
        assert_eq!(ctx.counters[Counter::DropL2Src as usize], 1);
    }
}
