//! Rewrite: NAT, direct-routing and tunnel rewrites, TTL, next hop and
//! egress of a packet the decision forwards.

use shm_layout::config_slot::{MODE_NAT, MODE_TUNNEL, PROTO_TCP};
use shm_layout::conntrack::{ClientHop, Conn, Hit};
use shm_layout::routing_slot::NoRoute;
use shm_layout::switch_slot::Counter;

use crate::flowcache;
use wire::{checksum, ipip};

use super::answers::{Fill, answer_too_big, cache_answer};
use super::client_hop;
use super::parse::L4;
use super::{Ctx, Verdict};

/// Client -> backend: rewrite per the connection's mode, then route.
#[inline(always)]
pub(super) fn forward(
    frame: &mut [u8],
    l4: &L4,
    conn: &Conn,
    in_port: u32,
    port_mac: &impl Fn(u32) -> Option<[u8; 6]>,
    fill: Option<Fill>,
    ctx: &mut Ctx<'_>,
) -> Verdict {
    match conn.mode {
        MODE_NAT => {
            let nat = Nat::Dst(conn.backend_ip, conn.backend_port);
            egress(
                frame,
                l4,
                nat,
                conn.backend_ip,
                ClientHop::NONE,
                port_mac,
                fill,
                ctx,
            )
        }
        MODE_TUNNEL => tunnel(frame, l4, conn.backend_ip, in_port, port_mac, ctx),
        // Direct routing: only the MACs change.
        _ => egress(
            frame,
            l4,
            Nat::None,
            conn.backend_ip,
            ClientHop::NONE,
            port_mac,
            fill,
            ctx,
        ),
    }
}

/// Backend -> client: restore the VIP as source, then route.
#[inline(always)]
pub(super) fn reverse(
    frame: &mut [u8],
    l4: &L4,
    hit: &Hit,
    port_mac: &impl Fn(u32) -> Option<[u8; 6]>,
    fill: Option<Fill>,
    ctx: &mut Ctx<'_>,
) -> Verdict {
    let nat = Nat::Src(hit.conn().vip, hit.conn().vip_port);
    let (client, hop) = (hit.conn().client_ip, hit.client_hop);
    egress(frame, l4, nat, client, hop, port_mac, fill, ctx)
}

/// IP-in-IP to the backend: route to it, check that the encapsulated packet
/// fits the egress port's MTU, decrement the inner TTL, prepend the outer
/// header (`[tunnel] source` -> backend). A packet that would not fit is
/// answered with ICMP fragmentation-needed when it carries DF (the client
/// then lowers its path MTU toward the VIP), else dropped.
#[inline(never)]
pub(super) fn tunnel(
    frame: &mut [u8],
    l4: &L4,
    backend_ip: u32,
    in_port: u32,
    port_mac: &impl Fn(u32) -> Option<[u8; 6]>,
    ctx: &mut Ctx<'_>,
) -> Verdict {
    let (port, dst_mac, src_mac) = match next_hop(backend_ip, ClientHop::NONE, port_mac, ctx) {
        Ok(h) => h,
        Err(v) => return v,
    };
    let mtu = ctx.cfg.ports().get(port as usize).map_or(0, |p| p.mtu) as usize;
    let mtu = if mtu == 0 { DEFAULT_MTU } else { mtu };
    if l4.ip_len as usize + ipip::OVERHEAD > mtu {
        return answer_too_big(frame, l4, in_port, mtu - ipip::OVERHEAD, ctx);
    }
    if let Err(v) = decrement_ttl(frame, ctx) {
        return v;
    }
    let src = ctx.cfg.header.tunnel_src.to_be_bytes();
    match ipip::encapsulate_in_place(frame, l4.frame_len as usize, src, backend_ip.to_be_bytes()) {
        Ok(n) => {
            set_macs(frame, dst_mac, src_mac);
            Verdict::Tx { port, len: n }
        }
        Err(_) => ctx.drop(Counter::DropTooBig),
    }
}

/// MTU assumed for a port the configuration gives none.
pub(super) const DEFAULT_MTU: usize = 1500;

/// The address translation a routed packet gets on its way out.
#[derive(Clone, Copy)]
pub(super) enum Nat {
    /// Direct routing: addresses unchanged.
    None,
    /// Destination becomes (address, port): client -> backend.
    Dst(u32, u16),
    /// Source becomes (address, port): backend -> client.
    Src(u32, u16),
}

/// Rewrites the TCP/UDP port and checksum for an address change whose
/// checksum difference is `d_addr` (RFC 1624; the address enters the
/// TCP/UDP checksum through the pseudo-header). `parse_ip` validated the
/// header, so the fixed-size view always exists. Returns the checksum's
/// difference (address and port).
#[inline(always)]
pub(super) fn rewrite_l4(
    frame: &mut [u8],
    l4: &L4,
    port_at: usize,
    old_port: u16,
    port: u16,
    d_addr: u64,
) -> u64 {
    let delta = d_addr + checksum::delta_u16(old_port, port);
    let Some(t) = frame.get_mut(l4.l4_off as usize..) else {
        return delta;
    };
    if l4.key().proto == PROTO_TCP {
        let Some(t) = t.first_chunk_mut::<18>() else {
            return delta;
        };
        t[port_at..port_at + 2].copy_from_slice(&port.to_be_bytes());
        let c = checksum::adjust(u16::from_be_bytes([t[16], t[17]]), delta);
        t[16..18].copy_from_slice(&c.to_be_bytes());
    } else {
        let Some(u) = t.first_chunk_mut::<8>() else {
            return delta;
        };
        u[port_at..port_at + 2].copy_from_slice(&port.to_be_bytes());
        let old = u16::from_be_bytes([u[6], u[7]]);
        let c = checksum::udp_field(old, checksum::adjust(old, delta));
        u[6..8].copy_from_slice(&c.to_be_bytes());
    }
    delta
}

/// Decrements the TTL of the IPv4 header after the Ethernet header
/// (incremental checksum); drops and counts an expiring packet.
#[inline]
pub(super) fn decrement_ttl(frame: &mut [u8], ctx: &mut Ctx<'_>) -> Result<(), Verdict> {
    const ETH: usize = wire::ETHERNET_HEADER_LEN;
    let Some(h) = frame.get_mut(ETH..).and_then(|b| b.first_chunk_mut::<20>()) else {
        return Err(ctx.drop(Counter::DropMalformed));
    };
    let ttl = h[8];
    if ttl <= 1 {
        return Err(ctx.drop(Counter::DropTtl));
    }
    let c = checksum::adjust(u16::from_be_bytes([h[10], h[11]]), checksum::TTL_DECREMENT);
    h[8] = ttl - 1;
    h[10..12].copy_from_slice(&c.to_be_bytes());
    Ok(())
}

/// The egress port toward `route_to`, the next hop's MAC and the port's MAC.
/// `learned`: the client-side hop of the connection (replies only; see
/// [`client_hop`](super::client_hop)), used when the routing table has no
/// neighbour for an on-link `route_to`.
#[inline]
pub(super) fn next_hop(
    route_to: u32,
    learned: ClientHop,
    port_mac: &impl Fn(u32) -> Option<[u8; 6]>,
    ctx: &mut Ctx<'_>,
) -> Result<(u32, [u8; 6], [u8; 6]), Verdict> {
    let hop = match ctx.hops.next_hop(&ctx.rt, route_to) {
        Ok(h) => h,
        Err(NoRoute::NoRoute) => return Err(ctx.drop(Counter::DropNoRoute)),
        Err(NoRoute::NoNeighbour) => match client_hop::learned(&ctx.rt, route_to, learned) {
            Some(h) => {
                ctx.count(Counter::ClientHopUsed);
                h
            }
            None => return Err(ctx.drop(Counter::DropNoNeighbour)),
        },
    };
    let Some(src) = port_mac(hop.port) else {
        return Err(ctx.drop(Counter::DropEgressPort));
    };
    Ok((hop.port, hop.mac, src))
}

#[inline]
pub(super) fn set_macs(frame: &mut [u8], dst: [u8; 6], src: [u8; 6]) {
    let mut eth = wire::EthernetFrame::new_unchecked(&mut frame[..wire::ETHERNET_HEADER_LEN]);
    eth.set_dst_addr(dst);
    eth.set_src_addr(src);
}

/// Routes a TCP/UDP packet toward `route_to`: TTL minus one, the
/// translation `nat`, the next hop's MACs. The IPv4 checksum is adjusted
/// once for the TTL and the address together (RFC 1624 differences add).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) fn egress(
    frame: &mut [u8],
    l4: &L4,
    nat: Nat,
    route_to: u32,
    learned: ClientHop,
    port_mac: &impl Fn(u32) -> Option<[u8; 6]>,
    fill: Option<Fill>,
    ctx: &mut Ctx<'_>,
) -> Verdict {
    const ETH: usize = wire::ETHERNET_HEADER_LEN;
    let Some(&[.., ttl, proto, _, _, _, _, _, _, _, _, _, _]) =
        frame.get(ETH..).and_then(|b| b.first_chunk::<20>())
    else {
        return ctx.drop(Counter::DropMalformed);
    };
    if ttl <= 1 {
        return ctx.drop(Counter::DropTtl);
    }
    let (port, dst, src) = match next_hop(route_to, learned, port_mac, ctx) {
        Ok(h) => h,
        Err(v) => return v,
    };
    // TTL is the high byte of the 16-bit word it shares with protocol:
    // the word drops by 0x100, whose RFC 1624 difference (~m + m - 0x100)
    // is the constant 0xfeff whatever the TTL and protocol.
    let mut d_ip = checksum::TTL_DECREMENT;
    debug_assert_eq!(
        d_ip,
        checksum::delta_u16(
            u16::from_be_bytes([ttl, proto]),
            u16::from_be_bytes([ttl - 1, proto])
        )
    );
    // (the rewrite, the address and port it writes, the ones it replaces)
    let k = l4.key();
    let (kind, new_ip, new_port, old_ip, old_port) = match nat {
        Nat::None => (flowcache::REWRITE_NONE, 0, 0, 0, 0),
        Nat::Dst(ip, p) => (flowcache::REWRITE_DST, ip, p, k.dst_ip, k.dst_port),
        Nat::Src(ip, p) => (flowcache::REWRITE_SRC, ip, p, k.src_ip, k.src_port),
    };
    let offsets = flowcache::rewrite_offsets(kind);
    let mut d_l4 = 0;
    if let Some((_, port_at)) = offsets {
        let d_addr = checksum::delta_u32(old_ip, new_ip);
        d_l4 = rewrite_l4(frame, l4, port_at, old_port, new_port, d_addr);
        d_ip += d_addr;
    }
    if let Some(h) = frame.get_mut(ETH..).and_then(|b| b.first_chunk_mut::<20>()) {
        h[8] = ttl - 1;
        if let Some((addr_at, _)) = offsets {
            h[addr_at..addr_at + 4].copy_from_slice(&new_ip.to_be_bytes());
        }
        let c = checksum::adjust(u16::from_be_bytes([h[10], h[11]]), d_ip);
        h[10..12].copy_from_slice(&c.to_be_bytes());
    }
    set_macs(frame, dst, src);
    if let Some(fill) = fill {
        let rewrite = Rewrite {
            kind,
            new_addr: new_ip,
            new_port,
            d_ip,
            d_l4,
        };
        cache_answer(l4, &fill, &rewrite, port, [dst, src], ctx);
    }
    Verdict::Tx {
        port,
        len: l4.frame_len as usize,
    }
}

/// The translation [`egress`] applied, as the flow cache replays it.
pub(super) struct Rewrite {
    /// A `flowcache::REWRITE_` value.
    pub(super) kind: u8,
    pub(super) new_addr: u32,
    pub(super) new_port: u16,
    pub(super) d_ip: u64,
    pub(super) d_l4: u64,
}
