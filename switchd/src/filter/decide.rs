//! Decide: connection-table lookup, new flows (sources no client can
//! have, scheduling, insert), the reply direction of NAT. TCP state
//! changes are in [`super::state`].

use core::sync::atomic::Ordering;

use shm_layout::config_slot::{ConfigView, MODE_NAT, ON_DOWN_KEEP, ON_DOWN_RESET, ServiceRec};
use shm_layout::conntrack::{
    CONN_MIDFLOW, CONN_SYNPROXY, ClientHop, Conn, ConnTable, Direction, Evicted, FlowKey, Hit,
    InsertError, STATE_ACTIVE, STATE_CLOSING, STATE_PROVISIONAL, STATE_SYN, holds_reservation,
};
use shm_layout::records::CloseReason;
use shm_layout::ring::midflow_event;
use shm_layout::switch_slot::Counter;

use crate::sched::{self, Pick};

use super::answers::{Fill, answer_with_rst, refuse};
use super::client_hop;
use super::parse::L4;
use super::rewrite::{forward, reverse};
use super::state::{Moved, touch};
use super::synproxy;
use super::{Ctx, Verdict};

#[inline]
pub(super) fn is_vip(cfg: &ConfigView<'_>, ip: u32) -> bool {
    cfg.is_vip(ip)
}

#[inline]
pub(super) fn find_service<'a>(
    cfg: &ConfigView<'a>,
    k: &FlowKey,
) -> Option<(usize, &'a ServiceRec)> {
    cfg.find_service(k.dst_ip, k.dst_port, k.proto)
}

/// A source address no client of a VIP can have (RFC 1122 3.2.1.3, RFC
/// 5735): "this network" 0.0.0.0/8, loopback 127.0.0.0/8, multicast
/// 224.0.0.0/4, reserved 240.0.0.0/4 (with the limited broadcast
/// 255.255.255.255), and any VIP of this appliance. A backend's address
/// from the client side is judged in [`new_flow`], where the service is known.
#[inline]
pub(super) fn martian_source(cfg: &ConfigView<'_>, src: u32) -> bool {
    let top = src >> 24;
    top == 0 || top == 127 || top >= 224 || is_vip(cfg, src)
}

/// Whether a packet from `src` received on port `in_port` claims the
/// address of one of `svc`'s backends while arriving from another side
/// than the one routes to that backend lead to (a spoofed backend source,
/// which would make the backend talk to itself through the VIP).
fn backend_spoofed(ctx: &mut Ctx<'_>, svc: &ServiceRec, src: u32, in_port: u32) -> bool {
    if !ctx.cfg.service_backends(svc).iter().any(|b| b.ip == src) {
        return false;
    }
    // Without a next hop for it the side is unknown: not judged here
    // (the flow is refused for its own reasons, or forwarded).
    matches!(ctx.hops.next_hop(&ctx.rt, src), Ok(hop) if hop.port != in_port)
}

/// Client -> VIP. A packet of a known connection is handled here, inline;
/// a new connection in [`new_flow`].
#[inline(always)]
pub(super) fn to_vip(
    frame: &mut [u8],
    l4: &L4,
    in_port: u32,
    port_mac: &impl Fn(u32) -> Option<[u8; 6]>,
    ctx: &mut Ctx<'_>,
) -> Verdict {
    let (is_tcp, syn, rst) = l4.tcp_kind();
    let found = ctx.ct.lookup_at(&l4.key(), l4.home as usize);
    if let Some(hit) = &found
        && hit.dir == Direction::Forward
    {
        let slot = ctx.ct.slot(hit.idx);
        if !ctx.expired(slot) {
            // One byte per forward hit: what to do if its backend is DOWN.
            let down = ctx.cfg.down_action(hit.conn().backend_id);
            if down != ON_DOWN_KEEP && !rst && (syn || !is_tcp) {
                // The flow can move (a UDP flow, or a TCP SYN: nothing was
                // exchanged yet): schedule it afresh below.
                stale_answers(l4, hit, ctx);
                move_off_down(hit, ctx);
            } else if down == ON_DOWN_RESET && !rst {
                return reset_down(frame, l4, hit, in_port, ctx);
            } else if syn
                && matches!(
                    slot.tcp_state.load(Ordering::Relaxed),
                    STATE_CLOSING | STATE_PROVISIONAL
                )
            {
                // A new connection on the 5-tuple of a closed one (which
                // gave its slot back), or of an unconfirmed pickup (which
                // never took one): it is scheduled afresh.
                stale_answers(l4, hit, ctx);
                // Either held no backend slot (closed already, or never
                // confirmed): no close happens here, so no record.
                retire(hit, CloseReason::IdleTimeout, ctx);
            } else if hit.conn().flags & CONN_SYNPROXY != 0 {
                return synproxy::forward_hit(frame, l4, hit, slot, in_port, port_mac, ctx);
            } else {
                ctx.count(Counter::FwdHit);
                match touch(ctx, slot, hit, l4) {
                    Moved::Closed => {
                        release_backend(ctx, hit.conn().backend_id);
                        record_close(hit, l4, ctx);
                    }
                    Moved::Confirmed => ctx.count(Counter::ConnConfirmed),
                    Moved::Stay | Moved::SynAcked => {}
                }
                let fill = Fill::of(hit, slot, l4, &ctx.flows);
                return forward(frame, l4, &hit.conn(), in_port, port_mac, fill, ctx);
            }
        }
    }
    new_flow(frame, l4, in_port, port_mac, ctx)
}

/// Client -> VIP with no live entry to follow: schedule, insert, forward
/// (or refuse, hold, drop).
#[inline(never)]
pub(super) fn new_flow(
    frame: &mut [u8],
    l4: &L4,
    in_port: u32,
    port_mac: &impl Fn(u32) -> Option<[u8; 6]>,
    ctx: &mut Ctx<'_>,
) -> Verdict {
    let (is_tcp, syn, rst) = l4.tcp_kind();
    let key = l4.key();
    // No entry, no answer, nothing forwarded for a source no client can
    // have (checked here, where entries are made: a martian never gets
    // one, so the hit path needs no check).
    if martian_source(&ctx.cfg, key.src_ip) {
        return ctx.drop(Counter::DropMartian);
    }
    let Some((svc_idx, svc)) = find_service(&ctx.cfg, &key) else {
        if !is_tcp {
            return ctx.drop(Counter::DropNoServiceUdp);
        }
        if rst {
            return ctx.drop(Counter::DropTcpNoEntry);
        }
        // RSTs come out of the answer budget the ICMP answers use: a flood
        // to unserved ports must not make the switch a RST generator.
        if ctx.icmp_tokens == 0 {
            return ctx.drop(Counter::RstRateLimited);
        }
        let v = answer_with_rst(frame, l4, in_port, Counter::RstSent, ctx);
        if matches!(v, Verdict::Tx { .. }) {
            ctx.icmp_tokens -= 1;
        }
        return v;
    };
    if backend_spoofed(ctx, svc, key.src_ip, in_port) {
        return ctx.drop(Counter::DropMartian);
    }
    if is_tcp && synproxy::proxied(svc, syn, ctx) {
        if syn {
            return synproxy::answer_syn(frame, l4, in_port, ctx);
        }
        if rst {
            // No connection exists anywhere to send it to.
            return ctx.drop(Counter::DropTcpNoEntry);
        }
        return synproxy::accept_ack(frame, l4, svc_idx, svc, in_port, port_mac, ctx);
    }
    if is_tcp && !syn && !rst && synproxy::returns_cookie(svc, frame, l4, ctx) {
        // `auto`, switched off since the cookie was sent: the ACK still
        // completes its handshake through the proxy.
        return synproxy::accept_ack(frame, l4, svc_idx, svc, in_port, port_mac, ctx);
    }
    let (backend, reserved) = match schedule(svc, &key, syn || !is_tcp, ctx) {
        Ok(b) => b,
        Err(Pick::Full) if svc.queue_timeout_ms > 0 => {
            return Verdict::Hold {
                timeout_ms: u32::from(svc.queue_timeout_ms),
            };
        }
        // Full, and this service does not queue: refused at once.
        Err(Pick::Full) => return refuse(frame, l4.frame_len as usize, in_port, ctx),
        Err(_) => return ctx.drop(Counter::DropNoBackend),
    };
    let conn = Conn {
        proto: key.proto,
        mode: svc.mode,
        flags: if is_tcp && !syn { CONN_MIDFLOW } else { 0 },
        backend_id: backend.id,
        client_ip: key.src_ip,
        client_port: key.src_port,
        vip: key.dst_ip,
        vip_port: key.dst_port,
        backend_ip: backend.ip,
        backend_port: backend.port,
        service: svc_idx as u16,
        created_ms: ctx.now_ms,
    };
    if rst {
        // Never create state for a RST; send it where the connection lives.
        ctx.count(Counter::DropTcpNoEntry);
        return forward(frame, l4, &conn, in_port, port_mac, None, ctx);
    }
    // Only a SYN or a UDP datagram got a reservation (see `schedule`).
    debug_assert_eq!(reserved, syn || !is_tcp);
    // A mid-flow pickup is provisional (short timeout, no reservation)
    // until the flow proves itself (see `state::next_state`): a spoofed
    // segment must not hold a slot of the table or of its backend for long.
    let state = match (is_tcp, syn) {
        (false, _) => STATE_ACTIVE,
        (true, true) => STATE_SYN,
        (true, false) => STATE_PROVISIONAL,
    };
    // A NAT connection keeps the client-side hop of the frame that opened
    // it, for replies to a client not resolved yet (see `client_hop`).
    let hop = if svc.mode == MODE_NAT {
        client_hop::of_frame(frame, in_port)
    } else {
        ClientHop::NONE
    };
    let conn = match insert(&conn, hop, state, reserved, ctx) {
        Ok((c, idx)) => {
            // The opening packet is the connection's first (its record
            // counts it).
            ctx.ct.slot(idx).add_counts(1, u64::from(l4.ip_len));
            c
        }
        Err(v) => return v,
    };
    if conn.flags & CONN_MIDFLOW != 0 {
        ctx.count(Counter::ConnMidflow);
        if let Some(r) = &ctx.events {
            r.push(midflow_event(&conn, ctx.now_ms));
        }
    } else {
        ctx.count(Counter::ConnNew);
    }
    forward(frame, l4, &conn, in_port, port_mac, None, ctx)
}

/// Makes the flow cache check the slot again before it answers for
/// either direction of a connection this switch is about to retire (its
/// answers may be from this very millisecond, which no check would
/// catch: see `flowcache`).
#[cold]
pub(super) fn stale_answers(l4: &L4, hit: &Hit, ctx: &mut Ctx<'_>) {
    ctx.flows.stale(l4.home, l4.words, ctx.now_ms);
    let reply = hit.conn().reply_key().words();
    let home = ctx.ct.home_of(reply) as u32;
    ctx.flows.stale(home, reply, ctx.now_ms);
}

/// Removes the entry of a flow leaving its DOWN backend (the scheduler,
/// which no longer lists that backend, then picks the flow's new one). The
/// NAT reply slot is left to the GC; late replies from the old backend no
/// longer match. If another switch changed the entry first, nothing is done.
pub(super) fn move_off_down(hit: &Hit, ctx: &mut Ctx<'_>) {
    if retire(hit, CloseReason::BackendDown, ctx) {
        ctx.count(Counter::DownMoved);
    }
}

/// Removes a connection's entry (if no other switch changed it first) and
/// gives back its backend slot if it still held one (then the retire is
/// its close, recorded with `reason`). Returns whether it removed the entry.
pub(super) fn retire(hit: &Hit, reason: CloseReason, ctx: &mut Ctx<'_>) -> bool {
    // Only the entry the lookup read: its lock word unchanged.
    let res = ctx
        .ct
        .snapshot(hit.idx)
        .filter(|s| s.lock == hit.lock)
        .and_then(|s| ctx.ct.retire(hit.idx, &s, ctx.pid));
    if res == Some(true) {
        release_backend(ctx, hit.conn().backend_id);
        let (ct, now) = (ctx.ct, ctx.now_ms);
        ctx.closed
            .closed(&ct, hit.conn(), hit.idx, None, reason, now, ctx.counters);
    }
    res.is_some()
}

/// Records the close this switch just made of the connection `hit` found,
/// in place, by `l4`'s FIN or RST (see [`crate::closed`]).
#[cold]
#[inline(never)]
pub(super) fn record_close(hit: &Hit, l4: &L4, ctx: &mut Ctx<'_>) {
    let rst = l4.flags & wire::tcp::RST != 0;
    let reason = match (hit.dir, rst) {
        (Direction::Forward, false) => CloseReason::FinClient,
        (Direction::Forward, true) => CloseReason::RstClient,
        (Direction::Reply, false) => CloseReason::FinBackend,
        (Direction::Reply, true) => CloseReason::RstBackend,
    };
    let (ct, now) = (ctx.ct, ctx.now_ms);
    ctx.closed.closed(
        &ct,
        hit.conn(),
        hit.idx,
        Some(hit.lock),
        reason,
        now,
        ctx.counters,
    );
}

/// Gives back one connection slot of backend `id`.
#[inline]
pub(super) fn release_backend(ctx: &Ctx<'_>, id: u32) {
    if let Some(b) = ctx.backends.get(id as usize) {
        sched::release(b);
    }
}

/// Policy reset: an established TCP connection to a DOWN backend is
/// answered with a RST from the VIP, so the client fails fast and
/// reconnects; the entry closes (it expires after `tcp_fin`).
pub(super) fn reset_down(
    frame: &mut [u8],
    l4: &L4,
    hit: &Hit,
    in_port: u32,
    ctx: &mut Ctx<'_>,
) -> Verdict {
    // Closed under the lock the lookup read (see `touch`).
    if ctx.ct.slot(hit.idx).tcp_state.load(Ordering::Relaxed) != STATE_CLOSING
        && ctx.ct.update_state(hit, ctx.pid, |state| {
            // A provisional entry held no reservation to give back.
            holds_reservation(state.swap(STATE_CLOSING, Ordering::AcqRel))
        }) == Some(true)
    {
        release_backend(ctx, hit.conn().backend_id);
        let (ct, now) = (ctx.ct, ctx.now_ms);
        ctx.closed.closed(
            &ct,
            hit.conn(),
            hit.idx,
            Some(hit.lock),
            CloseReason::BackendDown,
            now,
            ctx.counters,
        );
    }
    answer_with_rst(frame, l4, in_port, Counter::DownRst, ctx)
}

/// Inserts a new connection; on a race with another switch inserting the
/// same flow, uses the winner's entry. `reserved`: the scheduler already
/// took the backend slot (given back if the insert does not happen);
/// otherwise (mid-flow recovery: the connection exists at the backend
/// already) one is taken here, whatever the limit.
///
/// An entry the insert found ([`InsertError::Exists`]) but that was gone
/// or being rewritten by the time it was read back (see [`existing`])
/// sends the insert round again, [`INSERT_TRIES`] times in all; a flow
/// whose slot keeps changing that long is dropped (counted in
/// `drop_table_full`), never sent with an entry that is not its own.
pub(super) fn insert(
    conn: &Conn,
    hop: ClientHop,
    state: u32,
    reserved: bool,
    ctx: &mut Ctx<'_>,
) -> Result<(Conn, u32), Verdict> {
    insert_tries(conn, hop, state, reserved, INSERT_TRIES, ctx)
}

/// [`insert`] with `tries` left.
pub(super) fn insert_tries(
    conn: &Conn,
    hop: ClientHop,
    state: u32,
    reserved: bool,
    tries: usize,
    ctx: &mut Ctx<'_>,
) -> Result<(Conn, u32), Verdict> {
    let with_reply = conn.mode == MODE_NAT;
    let res = {
        let c = &*ctx;
        c.ct.insert_with_hop(conn, with_reply, hop, c.now_ms, state, c.pid, |s| {
            c.expired(s)
        })
    };
    let b = ctx.backends.get(conn.backend_id as usize);
    match res {
        Ok(ins) => {
            if let Some(b) = b {
                // A provisional entry takes its reservation when it is
                // confirmed (see `state::change_state`), not here.
                if !reserved && holds_reservation(state) {
                    sched::reserve(b, 0);
                }
                b.total.fetch_add(1, Ordering::Relaxed);
            }
            for id in ins.evicted_backends.into_iter().flatten() {
                release_backend(ctx, id);
            }
            // Each connection the insert closed gets its record.
            for (gone, live) in ins.evicted_conns.iter().zip(ins.evicted_live) {
                if let Some(g) = gone {
                    let reason = match live {
                        Some(_) => CloseReason::Evicted,
                        None => CloseReason::IdleTimeout,
                    };
                    let (ct, now) = (ctx.ct, ctx.now_ms);
                    ctx.closed.gone(&ct, g, reason, now, ctx.counters);
                }
            }
            for kind in ins.evicted_live.into_iter().flatten() {
                ctx.count(match kind {
                    Evicted::Provisional => Counter::EvictedProvisional,
                    Evicted::HalfOpen => Counter::EvictedHalfOpen,
                });
            }
            Ok((*conn, ins.idx))
        }
        Err(InsertError::Exists(idx)) => match existing(&ctx.ct, idx, conn) {
            Some(c) => {
                if let (Some(b), true) = (b, reserved) {
                    sched::release(b);
                }
                Ok((c, idx))
            }
            // Gone or changing: the insert goes round again, keeping
            // the reservation.
            None if tries > 1 => insert_tries(conn, hop, state, reserved, tries - 1, ctx),
            None => {
                if let (Some(b), true) = (b, reserved) {
                    sched::release(b);
                }
                Err(ctx.drop(Counter::DropTableFull))
            }
        },
        Err(e) => {
            if let InsertError::ReplyFailedAfterEviction {
                backend,
                gone,
                live,
                ..
            } = e
            {
                // The insert failed, but a connection it evicted is
                // closed: its slot back and its record, as above.
                if let Some(id) = backend {
                    release_backend(ctx, id);
                }
                if let Some(g) = gone {
                    let (ct, now) = (ctx.ct, ctx.now_ms);
                    ctx.closed
                        .gone(&ct, &g, CloseReason::Evicted, now, ctx.counters);
                }
                if let Some(kind) = live {
                    ctx.count(match kind {
                        Evicted::Provisional => Counter::EvictedProvisional,
                        Evicted::HalfOpen => Counter::EvictedHalfOpen,
                    });
                }
            }
            if let (Some(b), true) = (b, reserved) {
                sched::release(b);
            }
            Err(ctx.drop(Counter::DropTableFull))
        }
    }
}

/// How many times [`insert`] tries a flow whose found entry vanished.
pub(super) const INSERT_TRIES: usize = 3;

/// The entry an insert of `conn` found in slot `idx`
/// ([`InsertError::Exists`]), read back: `None` unless the slot still
/// holds a forward entry of `conn`'s flow (another switch may have
/// retired it and a new connection, of any flow, taken the slot; or a
/// writer holds it right now).
pub(super) fn existing(ct: &ConnTable<'_>, idx: u32, conn: &Conn) -> Option<Conn> {
    let found = ct.snapshot(idx)?.conn()?;
    (found.forward_key() == conn.forward_key()).then_some(found)
}

/// The backend of a packet to a VIP without an entry. A new connection
/// (`new`: a TCP SYN or a UDP datagram) goes to its service's scheduler,
/// which reserves a slot on the backend (`(backend, true)`), or says that
/// every eligible backend is full (`Err(Pick::Full)`: the caller holds or
/// refuses it). Anything else (mid-flow recovery, a RST) goes to the table
/// choice without a reservation (`(backend, false)`).
#[inline]
pub(super) fn schedule<'a>(
    svc: &ServiceRec,
    key: &FlowKey,
    new: bool,
    ctx: &mut Ctx<'a>,
) -> Result<(&'a shm_layout::config_slot::BackendRec, bool), Pick<'a>> {
    if !new {
        return sched::table_choice(&ctx.cfg, svc, key)
            .map(|b| (b, false))
            .ok_or(Pick::NoBackend);
    }
    let cfg = ctx.cfg;
    match sched::pick(&cfg, svc, key, ctx.backends, &mut ctx.sched) {
        Pick::Reserved(b) => Ok((b, true)),
        other => Err(other),
    }
}

/// Backend -> client (NAT replies).
pub(super) fn from_backend(
    frame: &mut [u8],
    l4: &L4,
    port_mac: &impl Fn(u32) -> Option<[u8; 6]>,
    ctx: &mut Ctx<'_>,
) -> Verdict {
    let found = ctx.ct.lookup_at(&l4.key(), l4.home as usize);
    let Some(hit) = &found else {
        return ctx.drop(Counter::DropNotOurs);
    };
    if hit.dir != Direction::Reply {
        return ctx.drop(Counter::DropNotOurs);
    }
    let slot = ctx.ct.slot(hit.idx);
    if ctx.expired(slot) {
        return ctx.drop(Counter::DropNotOurs);
    }
    if hit.conn().flags & CONN_SYNPROXY != 0 {
        return synproxy::reply_hit(frame, l4, hit, slot, port_mac, ctx);
    }
    ctx.count(Counter::ReplyHit);
    match touch(ctx, slot, hit, l4) {
        Moved::Stay => {}
        Moved::Closed => {
            release_backend(ctx, hit.conn().backend_id);
            record_close(hit, l4, ctx);
        }
        Moved::SynAcked => syn_ack_sample(&hit.conn(), ctx),
        Moved::Confirmed => ctx.count(Counter::ConnConfirmed),
    }
    let fill = Fill::of(hit, slot, l4, &ctx.flows);
    reverse(frame, l4, hit, port_mac, fill, ctx)
}

/// Folds the time from a NAT connection's SYN (its entry's creation) to
/// the backend's SYN-ACK into the backend's shared latency counters. The
/// only shared writes of the reply path, once per connection.
#[cold]
pub(super) fn syn_ack_sample(conn: &Conn, ctx: &Ctx<'_>) {
    let Some(b) = ctx.backends.get(conn.backend_id as usize) else {
        return;
    };
    let ms = (ctx.now_ms.wrapping_sub(conn.created_ms) as i32).max(0) as u64;
    b.syn_ack_count.fetch_add(1, Ordering::Relaxed);
    b.syn_ack_sum_ms.fetch_add(ms, Ordering::Relaxed);
    // The service index may be stale across a reload that renumbered
    // services: one sample judged against another target, at worst.
    let target = ctx
        .cfg
        .services()
        .get(conn.service as usize)
        .map_or(0, |s| s.latency_target_ms);
    if target > 0 && ms > u64::from(target) {
        b.syn_ack_slow.fetch_add(1, Ordering::Relaxed);
    }
}
