//! ICMP for VIP flows: errors about a VIP flow's packets go where the
//! flow lives, and echo requests to a VIP are answered.
//!
//! - An error sent to a VIP (by a router on the client's path, about a
//!   packet from the VIP to a client: a NAT reply after its rewrite, or a
//!   DR/tunnel backend's own reply) quotes VIP:port -> client:port; the
//!   connection whose forward key is client:port -> VIP:port owns it, and
//!   the error goes to its backend like the flow's data: NAT rewrites the
//!   outer destination and the quoted source to the backend's address and
//!   port, DR changes only the MACs, tunnel encapsulates.
//! - An error from the backend side (the backend or a router before it,
//!   about a packet the switch forwarded to a NAT backend) quotes
//!   client:port -> backend:port, which is the reverse of the connection's
//!   reply key; it goes to the client with the quoted destination and the
//!   outer source rewritten to the VIP.
//! - An echo request to a VIP is answered by the switch, within the
//!   switch's ICMP budget.
//!
//! The connection table is only read: ICMP never creates, refreshes or
//! closes an entry. An ICMP error is never answered with ICMP (an error too
//! big to encapsulate is dropped, not answered with fragmentation-needed).

use shm_layout::config_slot::{MODE_NAT, MODE_TUNNEL};
use shm_layout::conntrack::{ClientHop, Conn, Direction, FlowKey};
use shm_layout::switch_slot::Counter;
use wire::icmp::{self, End, Quote};
use wire::{checksum, ipip};

use super::decide::is_vip;
use super::rewrite::{DEFAULT_MTU, decrement_ttl, next_hop, set_macs};
use super::{Ctx, Verdict};

const ETH: usize = wire::ETHERNET_HEADER_LEN;

/// Whether `frame` (an Ethernet frame whose IPv4 header the one validator
/// accepted up to its protocol) carries ICMP.
#[inline]
pub(super) fn is_icmp(frame: &[u8]) -> bool {
    frame.get(ETH + 9) == Some(&icmp::PROTO_ICMP)
}

/// The verdict for an ICMP packet: `frame[..len]` holds a valid,
/// unfragmented IPv4 header (checksum verified) with protocol ICMP.
#[cold]
#[inline(never)]
pub(super) fn switch_icmp(
    frame: &mut [u8],
    len: usize,
    in_port: u32,
    port_mac: &impl Fn(u32) -> Option<[u8; 6]>,
    ctx: &mut Ctx<'_>,
) -> Verdict {
    let Ok(ip) = wire::Ipv4Packet::new_checked(&frame[ETH.min(len)..len]) else {
        return ctx.drop(Counter::DropMalformed);
    };
    let (hl, total) = (ip.header_len(), ip.total_len() as usize);
    let dst = u32::from_be_bytes(ip.dst_addr());
    let msg_at = ETH + hl;
    let msg_end = ETH + total;
    let to_vip = is_vip(&ctx.cfg, dst);
    let msg = &frame[msg_at..msg_end];
    let Some(&icmp_type) = msg.first() else {
        return ctx.drop(if to_vip {
            Counter::DropIcmpMalformed
        } else {
            Counter::DropNotOurs
        });
    };
    match icmp_type {
        icmp::ECHO_REQUEST if to_vip => echo(frame, msg_at, msg_end, in_port, ctx),
        icmp::DEST_UNREACHABLE | icmp::TIME_EXCEEDED => {
            let q = match icmp::error_quote(msg) {
                Ok(q) => q,
                // Malformed: ours to count if it was sent to a VIP.
                Err(_) if to_vip => return ctx.drop(Counter::DropIcmpMalformed),
                Err(_) => return ctx.drop(Counter::DropNotOurs),
            };
            let at = Msg {
                start: msg_at,
                end: msg_end,
            };
            if to_vip {
                error_to_vip(frame, at, &q, dst, port_mac, ctx)
            } else {
                error_to_client(frame, at, &q, dst, port_mac, ctx)
            }
        }
        _ if to_vip => ctx.drop(Counter::DropIcmpType),
        _ => ctx.drop(Counter::DropNotOurs),
    }
}

/// Where the ICMP message lies in the frame.
#[derive(Clone, Copy)]
struct Msg {
    start: usize,
    end: usize,
}

/// An echo request to a VIP: answered out of the port it came in on.
fn echo(frame: &mut [u8], msg_at: usize, len: usize, in_port: u32, ctx: &mut Ctx<'_>) -> Verdict {
    if !icmp::checksum_ok(&frame[msg_at..len]) {
        return ctx.drop(Counter::DropIcmpMalformed);
    }
    if ctx.icmp_tokens == 0 {
        return ctx.drop(Counter::IcmpRateLimited);
    }
    match icmp::echo_reply_in_place(frame, len) {
        Ok(n) => {
            ctx.icmp_tokens -= 1;
            ctx.count(Counter::IcmpEchoAnswered);
            Verdict::Tx {
                port: in_port,
                len: n,
            }
        }
        Err(_) => ctx.drop(Counter::DropIcmpMalformed),
    }
}

/// An error sent to VIP `vip` about a packet from it (VIP:port ->
/// client:port): to the backend of the connection client -> VIP.
fn error_to_vip(
    frame: &mut [u8],
    at: Msg,
    q: &Quote,
    vip: u32,
    port_mac: &impl Fn(u32) -> Option<[u8; 6]>,
    ctx: &mut Ctx<'_>,
) -> Verdict {
    // A router sends an error to the source of the packet it quotes.
    if q.src_addr != vip {
        return ctx.drop(Counter::DropIcmpMalformed);
    }
    let key = reversed(q);
    let Some(conn) = live_conn(&key, Direction::Forward, ctx) else {
        return ctx.drop(Counter::DropIcmpNoFlow);
    };
    match conn.mode {
        MODE_NAT => {
            icmp::rewrite_quote(
                &mut frame[at.start..at.end],
                q,
                End::Src,
                conn.backend_ip,
                conn.backend_port,
            );
            let sent = route(
                frame,
                at,
                Outer::Dst(conn.backend_ip),
                conn.backend_ip,
                port_mac,
                ctx,
            );
            counted(sent, Counter::IcmpForwarded, ctx)
        }
        MODE_TUNNEL => tunnel(frame, at, conn.backend_ip, port_mac, ctx),
        // Direct routing: the backend owns the VIP; only the MACs change.
        _ => {
            let sent = route(frame, at, Outer::Keep, conn.backend_ip, port_mac, ctx);
            counted(sent, Counter::IcmpForwarded, ctx)
        }
    }
}

/// An error from the backend side about a packet the switch forwarded to
/// a NAT backend (client:port -> backend:port), sent to `dst`: to the
/// client, as if from the VIP. Anything else is not ours.
fn error_to_client(
    frame: &mut [u8],
    at: Msg,
    q: &Quote,
    dst: u32,
    port_mac: &impl Fn(u32) -> Option<[u8; 6]>,
    ctx: &mut Ctx<'_>,
) -> Verdict {
    // The quoted packet reversed is the connection's reply key.
    let key = reversed(q);
    let Some(conn) = live_conn(&key, Direction::Reply, ctx) else {
        return ctx.drop(Counter::DropNotOurs);
    };
    if dst != conn.client_ip {
        return ctx.drop(Counter::DropIcmpMalformed);
    }
    icmp::rewrite_quote(
        &mut frame[at.start..at.end],
        q,
        End::Dst,
        conn.vip,
        conn.vip_port,
    );
    let sent = route(
        frame,
        at,
        Outer::Src(conn.vip),
        conn.client_ip,
        port_mac,
        ctx,
    );
    counted(sent, Counter::IcmpToClient, ctx)
}

/// `sent`'s verdict, counted in `c` if it transmits (a drop was counted
/// by its reason).
fn counted(sent: Result<Verdict, Verdict>, c: Counter, ctx: &mut Ctx<'_>) -> Verdict {
    match sent {
        Ok(v) => {
            ctx.count(c);
            v
        }
        Err(v) => v,
    }
}

/// The connection `key` finds in the direction `dir`, if its entry is
/// live. Read only: nothing in the table changes.
fn live_conn(key: &FlowKey, dir: Direction, ctx: &Ctx<'_>) -> Option<Conn> {
    let hit = ctx.ct.lookup(key)?;
    if hit.dir != dir || ctx.expired(ctx.ct.slot(hit.idx)) {
        return None;
    }
    let conn = hit.conn();
    // A reply entry exists only for NAT; a forward hit of any mode.
    (dir == Direction::Forward || conn.mode == MODE_NAT).then_some(conn)
}

/// The outer address an error gets on its way out.
#[derive(Clone, Copy)]
enum Outer {
    Keep,
    Dst(u32),
    Src(u32),
}

/// Routes the error toward `route_to`: TTL minus one, the outer address
/// change, the next hop's MACs (incremental header checksum).
fn route(
    frame: &mut [u8],
    at: Msg,
    outer: Outer,
    route_to: u32,
    port_mac: &impl Fn(u32) -> Option<[u8; 6]>,
    ctx: &mut Ctx<'_>,
) -> Result<Verdict, Verdict> {
    let (port, dst_mac, src_mac) = next_hop(route_to, ClientHop::NONE, port_mac, ctx)?;
    decrement_ttl(frame, ctx)?;
    let (addr_at, new) = match outer {
        Outer::Keep => (None, 0),
        Outer::Dst(a) => (Some(ETH + 16), a),
        Outer::Src(a) => (Some(ETH + 12), a),
    };
    if let Some(addr_at) = addr_at {
        let old = u32::from_be_bytes([
            frame[addr_at],
            frame[addr_at + 1],
            frame[addr_at + 2],
            frame[addr_at + 3],
        ]);
        frame[addr_at..addr_at + 4].copy_from_slice(&new.to_be_bytes());
        let c = checksum::update_u32(
            u16::from_be_bytes([frame[ETH + 10], frame[ETH + 11]]),
            old,
            new,
        );
        frame[ETH + 10..ETH + 12].copy_from_slice(&c.to_be_bytes());
    }
    set_macs(frame, dst_mac, src_mac);
    Ok(Verdict::Tx { port, len: at.end })
}

/// IP-in-IP to a tunnel backend, like the flow's data; an error that would
/// not fit the egress MTU once encapsulated is dropped (an ICMP error is
/// never answered with ICMP).
fn tunnel(
    frame: &mut [u8],
    at: Msg,
    backend_ip: u32,
    port_mac: &impl Fn(u32) -> Option<[u8; 6]>,
    ctx: &mut Ctx<'_>,
) -> Verdict {
    let (port, dst_mac, src_mac) = match next_hop(backend_ip, ClientHop::NONE, port_mac, ctx) {
        Ok(h) => h,
        Err(v) => return v,
    };
    let mtu = ctx.cfg.ports().get(port as usize).map_or(0, |p| p.mtu) as usize;
    let mtu = if mtu == 0 { DEFAULT_MTU } else { mtu };
    if at.end - ETH + ipip::OVERHEAD > mtu {
        return ctx.drop(Counter::DropTooBig);
    }
    if let Err(v) = decrement_ttl(frame, ctx) {
        return v;
    }
    let src = ctx.cfg.header.tunnel_src.to_be_bytes();
    match ipip::encapsulate_in_place(frame, at.end, src, backend_ip.to_be_bytes()) {
        Ok(n) => {
            set_macs(frame, dst_mac, src_mac);
            ctx.count(Counter::IcmpForwarded);
            Verdict::Tx { port, len: n }
        }
        Err(_) => ctx.drop(Counter::DropTooBig),
    }
}

/// The flow key of the quoted packet's other direction (the quote's ends
/// swapped): the forward key for an error about a packet from a VIP, the
/// reply key for an error about a packet to a NAT backend.
#[inline]
fn reversed(q: &Quote) -> FlowKey {
    FlowKey {
        proto: q.protocol,
        src_ip: q.dst_addr,
        dst_ip: q.src_addr,
        src_port: q.dst_port,
        dst_port: q.src_port,
    }
}

#[cfg(test)]
#[path = "icmp_tests.rs"]
mod tests;
