//! The SYN proxy of NAT services with `syn_proxy` (docs/ARCHITECTURE.md,
//! "SYN cookies and the SYN proxy"): the switch answers a client's SYN
//! itself with a SYN cookie ([`wire::syncookie`]) and keeps nothing; a
//! client ACK that returns a valid cookie creates the connection's entry
//! (state `STATE_SYNPROXY`, flag `CONN_SYNPROXY`) and the switch sends the
//! backend a SYN with the client's ISN and MSS; the backend's SYN-ACK
//! gives the sequence delta (backend ISN minus cookie), which the switch
//! keeps in the reply slot ([`Splice`]) and acknowledges itself. From then
//! on every segment is translated: backend -> client `seq -= delta`,
//! client -> backend `ack += delta`, checksums adjusted incrementally.
//!
//! Only MSS is offered in the cookie SYN-ACK and in the SYN to the backend
//! (no window scale, SACK or timestamps): both connections run without
//! them, so windows, SACK blocks and timestamps need no translation.
//!
//! The switch keeps no timer: a SYN to the backend that was lost is sent
//! again when the client sends anything while the entry waits (the
//! client's request, or its retransmission).

use core::sync::atomic::Ordering;

use shm_layout::config_slot::{ConfigView, SVC_SYN_PROXY, SVC_SYN_PROXY_AUTO, ServiceRec};
use shm_layout::conntrack::{
    CONN_SYNPROXY, ClientHop, Conn, ConnSlot, Direction, Hit, STATE_ESTABLISHED, STATE_SYNPROXY,
    Splice,
};
use shm_layout::switch_slot::Counter;
use wire::syncookie::{self, MSS_TABLE, Secrets, Tuple};
use wire::{Handshake, TcpSegment, tcp, tcpopt};

use super::answers::{answer_with_rst, refuse};
use super::client_hop;
use super::decide::{self, release_backend, syn_ack_sample};
use super::parse::L4;
use super::rewrite::{forward, next_hop, reverse, set_macs};
use super::state::{Moved, touch};
use super::{Ctx, Verdict};
use crate::sched::Pick;

/// The window of the switch's own segments: the cookie SYN-ACK to the
/// client and the ACK that completes the backend's handshake. The largest
/// unscaled window (no window scale is negotiated on either side); each
/// side's real window reaches the other with its next segment.
pub(super) const WINDOW: u16 = 65535;

/// The MSS the cookie SYN-ACK offers the client when no port's MTU is
/// known: what a 1500-byte Ethernet path carries.
const DEFAULT_MSS: u16 = 1460;

/// The cookie secrets of the published configuration.
#[inline]
fn secrets(cfg: &ConfigView<'_>) -> Secrets {
    let [current, previous] = cfg.header.cookie_secrets;
    Secrets { current, previous }
}

/// Whether a TCP segment to `svc` without a live entry goes through the
/// SYN proxy: the service has `syn_proxy = true`, or `"auto"` while the
/// switch's SYN rate or the table's occupancy is over its threshold (see
/// [`SynAuto`]); and controld published a secret (without one, every
/// service forwards SYNs as plain NAT).
#[inline(always)]
pub(super) fn proxied(svc: &ServiceRec, syn: bool, ctx: &mut Ctx<'_>) -> bool {
    if svc.flags & (SVC_SYN_PROXY | SVC_SYN_PROXY_AUTO) == 0
        || ctx.cfg.header.cookie_secrets[0] == [0, 0]
    {
        return false;
    }
    if svc.flags & SVC_SYN_PROXY != 0 {
        return true;
    }
    auto_on(syn, ctx)
}

/// [`proxied`] for a service with `syn_proxy = "auto"`.
#[cold]
#[inline(never)]
fn auto_on(syn: bool, ctx: &mut Ctx<'_>) -> bool {
    let cfg = ctx.cfg;
    let on = ctx.syn_auto.on(syn, &cfg, &ctx.ct, ctx.now_ms);
    if on && syn {
        ctx.count(Counter::SynproxyAutoBursts);
    }
    on
}

/// `syn_proxy = "auto"`: whether this switch answers SYNs with cookies,
/// from numbers it has. The SYNs to `auto` services are counted in
/// windows of [`SynAuto::WINDOW_MS`]; the proxy is on while the last
/// complete window or the current one is over the rate threshold, or while
/// the table's occupancy, sampled at each window's start over
/// [`SynAuto::SAMPLE`] slots (a moving position, so the whole table is
/// visited in turn), is over the occupancy threshold. An ACK without an
/// entry is judged by the same state as the SYNs (a cookie ACK that comes
/// after the proxy switched off is still validated: see `decide`).
#[derive(Clone, Copy, Debug, Default)]
pub struct SynAuto {
    window_ms: u32,
    syns: u32,
    last_window_over: bool,
    occupancy_over: bool,
    sample_at: u32,
}

impl SynAuto {
    pub const WINDOW_MS: u32 = 100;
    pub const SAMPLE: u32 = 256;

    fn on(
        &mut self,
        syn: bool,
        cfg: &ConfigView<'_>,
        ct: &shm_layout::conntrack::ConnTable<'_>,
        now_ms: u32,
    ) -> bool {
        let h = cfg.header;
        let per_window =
            (u64::from(h.syn_proxy_auto_syn_rate) * u64::from(Self::WINDOW_MS) / 1000).max(1);
        if now_ms.wrapping_sub(self.window_ms) >= Self::WINDOW_MS {
            self.last_window_over = h.syn_proxy_auto_syn_rate > 0
                && u64::from(self.syns) > per_window
                && now_ms.wrapping_sub(self.window_ms) < 2 * Self::WINDOW_MS;
            self.window_ms = now_ms;
            self.syns = 0;
            self.occupancy_over = h.syn_proxy_auto_occupancy_permille > 0
                && self.sample(ct) > h.syn_proxy_auto_occupancy_permille;
        }
        if syn {
            self.syns = self.syns.saturating_add(1);
        }
        self.last_window_over
            || (h.syn_proxy_auto_syn_rate > 0 && u64::from(self.syns) > per_window)
            || self.occupancy_over
    }

    /// Per mille of [`SynAuto::SAMPLE`] consecutive slots (from a position
    /// that moves on each time) holding an entry.
    fn sample(&mut self, ct: &shm_layout::conntrack::ConnTable<'_>) -> u32 {
        let cap = ct.capacity() as u32;
        if cap == 0 {
            return 0;
        }
        let n = Self::SAMPLE.min(cap);
        let mut used = 0;
        for i in 0..n {
            let idx = (self.sample_at.wrapping_add(i)) % cap;
            let w0 = ct.slot(idx).words[0].load(Ordering::Relaxed);
            let kind = (w0 >> 56) as u8;
            used += u32::from(matches!(
                kind,
                shm_layout::conntrack::KIND_FWD | shm_layout::conntrack::KIND_REPLY
            ));
        }
        self.sample_at = self.sample_at.wrapping_add(n) % cap;
        used * 1000 / n
    }
}

/// Whether a client segment without an entry to an `auto` service (not
/// proxied at the moment) returns a valid cookie: the proxy was on when
/// its SYN came.
#[cold]
pub(super) fn returns_cookie(svc: &ServiceRec, frame: &[u8], l4: &L4, ctx: &Ctx<'_>) -> bool {
    if svc.flags & SVC_SYN_PROXY_AUTO == 0
        || l4.flags & tcp::ACK == 0
        || ctx.cfg.header.cookie_secrets[0] == [0, 0]
    {
        return false;
    }
    let Some((seq, ack, _, _, _)) = client_segment(frame, l4) else {
        return false;
    };
    syncookie::check(
        &secrets(&ctx.cfg),
        &tuple(l4),
        syncookie::count(ctx.now_ms),
        seq.wrapping_sub(1),
        ack.wrapping_sub(1),
    )
    .is_some()
}

/// The client's TCP header facts the proxy needs: (seq, ack, window,
/// options, payload length).
fn client_segment(frame: &[u8], l4: &L4) -> Option<(u32, u32, u16, tcpopt::TcpOptions, usize)> {
    let seg =
        TcpSegment::new_checked(frame.get(l4.l4_off as usize..l4.frame_len as usize)?).ok()?;
    let b = frame.get(l4.l4_off as usize..)?;
    let window = u16::from_be_bytes([b[14], b[15]]);
    let opts = tcpopt::parse(&b[20..seg.header_len()]);
    Some((seg.seq(), seg.ack(), window, opts, seg.payload_len()))
}

/// The cookie tuple of a client -> VIP packet.
#[inline]
fn tuple(l4: &L4) -> Tuple {
    let k = l4.key();
    Tuple {
        client_ip: k.src_ip,
        client_port: k.src_port,
        vip: k.dst_ip,
        vip_port: k.dst_port,
    }
}

/// The MSS the cookie SYN-ACK offers: the smallest port MTU of the
/// configuration minus 40 (the backend's own MSS is not known yet), at
/// most [`DEFAULT_MSS`] when no MTU is known.
fn offered_mss(cfg: &ConfigView<'_>) -> u16 {
    cfg.ports()
        .iter()
        .filter(|p| p.mtu > 40)
        .map(|p| p.mtu - 40)
        .min()
        .unwrap_or(DEFAULT_MSS)
}

/// A client's SYN to a proxied service: answered with the cookie SYN-ACK
/// from the VIP, out of the port it came in on. Nothing is stored.
#[inline(never)]
pub(super) fn answer_syn(frame: &mut [u8], l4: &L4, in_port: u32, ctx: &mut Ctx<'_>) -> Verdict {
    let Some((seq, _, _, opts, _)) = client_segment(frame, l4) else {
        return ctx.drop(Counter::DropMalformed);
    };
    let t = tuple(l4);
    let key = secrets(&ctx.cfg).current;
    let idx = syncookie::mss_index(opts.mss);
    let cookie = syncookie::make(key, &t, syncookie::count(ctx.now_ms), seq, idx);
    let seg = Handshake {
        src: t.vip.to_be_bytes(),
        dst: t.client_ip.to_be_bytes(),
        src_port: t.vip_port,
        dst_port: t.client_port,
        seq: cookie,
        ack: seq.wrapping_add(1),
        flags: tcp::SYN | tcp::ACK,
        window: WINDOW,
        mss: Some(offered_mss(&ctx.cfg)),
    };
    swap_macs(frame);
    match wire::tcp_handshake_in_place(frame, &seg) {
        Ok(len) => {
            ctx.count(Counter::SyncookieSent);
            Verdict::Tx { port: in_port, len }
        }
        Err(_) => ctx.drop(Counter::DropMalformed),
    }
}

fn swap_macs(frame: &mut [u8]) {
    if let Some(eth) = frame.first_chunk_mut::<12>() {
        let (d, s) = eth.split_at_mut(6);
        d.swap_with_slice(s);
    }
}

/// A client segment without a live entry to a proxied service (no SYN,
/// no RST: the caller handled those): an ACK that returns a valid cookie
/// creates the connection (scheduled as any new connection: scheduler,
/// `max_conns`, queue) and becomes the SYN to its backend; anything else
/// is answered with a RST within the answer budget.
#[inline(never)]
pub(super) fn accept_ack(
    frame: &mut [u8],
    l4: &L4,
    svc_idx: usize,
    svc: &ServiceRec,
    in_port: u32,
    port_mac: &impl Fn(u32) -> Option<[u8; 6]>,
    ctx: &mut Ctx<'_>,
) -> Verdict {
    let Some((seq, ack, window, _, payload)) = client_segment(frame, l4) else {
        return ctx.drop(Counter::DropMalformed);
    };
    let (client_isn, cookie) = (seq.wrapping_sub(1), ack.wrapping_sub(1));
    let t = tuple(l4);
    let checked = (l4.flags & tcp::ACK != 0)
        .then(|| {
            syncookie::check(
                &secrets(&ctx.cfg),
                &t,
                syncookie::count(ctx.now_ms),
                client_isn,
                cookie,
            )
        })
        .flatten();
    let Some(mss_idx) = checked else {
        return bad_cookie(frame, l4, in_port, ctx);
    };
    let key = l4.key();
    let (backend, _) = match decide::schedule(svc, &key, true, ctx) {
        Ok(b) => b,
        // The engine holds the ACK and runs it again: the cookie still
        // checks (for a minute at least) when a backend has room.
        Err(Pick::Full) if svc.queue_timeout_ms > 0 => {
            return Verdict::Hold {
                timeout_ms: u32::from(svc.queue_timeout_ms),
            };
        }
        Err(Pick::Full) => return refuse(frame, l4.frame_len as usize, in_port, ctx),
        Err(_) => return ctx.drop(Counter::DropNoBackend),
    };
    let conn = Conn {
        proto: key.proto,
        mode: svc.mode,
        flags: CONN_SYNPROXY,
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
    let hop = client_hop::of_frame(frame, in_port);
    let conn = match decide::insert(&conn, hop, STATE_SYNPROXY, true, ctx) {
        Ok((c, _)) => c,
        Err(v) => return v,
    };
    if conn.flags & CONN_SYNPROXY == 0 {
        // Another switch made a plain entry for the flow meanwhile.
        return ctx.drop(Counter::DropTcpNoEntry);
    }
    let Some(splice) = splice_of(ctx, &conn) else {
        return ctx.drop(Counter::DropTableFull);
    };
    // The same ACK gives the same values: a second switch racing on a
    // duplicate writes what the first wrote.
    splice.set_cookie(cookie);
    splice.set_word(client_isn);
    ctx.count(Counter::SyncookieOk);
    ctx.count(Counter::ConnNew);
    if payload > 0 {
        ctx.count(Counter::SyncookieDataDropped);
    }
    syn_to_backend(
        frame,
        &conn,
        client_isn,
        MSS_TABLE[mss_idx as usize],
        window,
        port_mac,
        ctx,
    )
}

/// An ACK whose cookie did not check: counted, answered with a RST from
/// the VIP within the answer budget (shared with ICMP and the RSTs for
/// unserved ports).
fn bad_cookie(frame: &mut [u8], l4: &L4, in_port: u32, ctx: &mut Ctx<'_>) -> Verdict {
    if ctx.icmp_tokens == 0 {
        ctx.count(Counter::SyncookieRstLimited);
        return ctx.drop(Counter::DropSyncookieBad);
    }
    let v = answer_with_rst(frame, l4, in_port, Counter::DropSyncookieBad, ctx);
    if matches!(v, Verdict::Tx { .. }) {
        ctx.icmp_tokens -= 1;
    }
    v
}

/// The splice words of a proxied connection: its reply slot's (found by
/// its reply key, pointing back at the connection's forward entry).
#[inline]
fn splice_of<'a>(ctx: &Ctx<'a>, conn: &Conn) -> Option<Splice<'a>> {
    let hit = ctx.ct.lookup(&conn.reply_key())?;
    (hit.dir == Direction::Reply && hit.conn().forward_key() == conn.forward_key())
        .then(|| Splice(ctx.ct.slot(hit.via)))
}

/// Writes the SYN that opens the backend's side of `conn` (from the
/// client's address and port, as NAT sends it, with the client's ISN and
/// MSS) over `frame` and routes it to the backend.
fn syn_to_backend(
    frame: &mut [u8],
    conn: &Conn,
    client_isn: u32,
    mss: u16,
    window: u16,
    port_mac: &impl Fn(u32) -> Option<[u8; 6]>,
    ctx: &mut Ctx<'_>,
) -> Verdict {
    let seg = Handshake {
        src: conn.client_ip.to_be_bytes(),
        dst: conn.backend_ip.to_be_bytes(),
        src_port: conn.client_port,
        dst_port: conn.backend_port,
        seq: client_isn,
        ack: 0,
        flags: tcp::SYN,
        window,
        mss: Some(mss),
    };
    to_backend(frame, conn, &seg, port_mac, ctx)
}

/// Writes `seg` over `frame` and routes it to `conn`'s backend.
fn to_backend(
    frame: &mut [u8],
    conn: &Conn,
    seg: &Handshake,
    port_mac: &impl Fn(u32) -> Option<[u8; 6]>,
    ctx: &mut Ctx<'_>,
) -> Verdict {
    let (port, dst, src) = match next_hop(conn.backend_ip, ClientHop::NONE, port_mac, ctx) {
        Ok(h) => h,
        Err(v) => return v,
    };
    match wire::tcp_handshake_in_place(frame, seg) {
        Ok(len) => {
            set_macs(frame, dst, src);
            Verdict::Tx { port, len }
        }
        Err(_) => ctx.drop(Counter::DropMalformed),
    }
}

/// Adds `by` to the 32-bit sequence field at `at` (4: seq, 8: ack) of a
/// TCP packet, adjusting its checksum (RFC 1624).
#[inline]
fn shift(frame: &mut [u8], l4: &L4, at: usize, by: u32) {
    let Some(t) = frame
        .get_mut(l4.l4_off as usize..)
        .and_then(|t| t.first_chunk_mut::<18>())
    else {
        return;
    };
    let old = u32::from_be_bytes([t[at], t[at + 1], t[at + 2], t[at + 3]]);
    let new = old.wrapping_add(by);
    t[at..at + 4].copy_from_slice(&new.to_be_bytes());
    let c = wire::checksum::update_u32(u16::from_be_bytes([t[16], t[17]]), old, new);
    t[16..18].copy_from_slice(&c.to_be_bytes());
}

/// Client -> VIP, a live entry of a proxied connection (`hit`, its slot
/// `slot`): a SYN gets the cookie SYN-ACK again; while the backend's
/// SYN-ACK is due the segment is turned into the backend's SYN again;
/// after it, `ack += delta` and NAT as usual.
#[inline(never)]
pub(super) fn forward_hit(
    frame: &mut [u8],
    l4: &L4,
    hit: &Hit,
    slot: &ConnSlot,
    in_port: u32,
    port_mac: &impl Fn(u32) -> Option<[u8; 6]>,
    ctx: &mut Ctx<'_>,
) -> Verdict {
    let (_, syn, rst) = l4.tcp_kind();
    if syn {
        return answer_syn(frame, l4, in_port, ctx);
    }
    ctx.count(Counter::FwdHit);
    let conn = hit.conn();
    let state = slot.tcp_state.load(Ordering::Acquire);
    match touch(ctx, slot, hit, l4) {
        Moved::Closed => release_backend(ctx, conn.backend_id),
        Moved::Confirmed => ctx.count(Counter::ConnConfirmed),
        Moved::Stay | Moved::SynAcked => {}
    }
    let Some(splice) = splice_of(ctx, &conn) else {
        return ctx.drop(Counter::DropNotOurs);
    };
    if state == STATE_SYNPROXY {
        let client_isn = splice.word();
        // Still waiting (the word is the client's ISN only then)?
        if rst || slot.tcp_state.load(Ordering::Acquire) != STATE_SYNPROXY {
            return ctx.drop(Counter::SyncookieDataDropped);
        }
        let Some((_, _, window, _, payload)) = client_segment(frame, l4) else {
            return ctx.drop(Counter::DropMalformed);
        };
        if payload > 0 {
            ctx.count(Counter::SyncookieDataDropped);
        }
        ctx.count(Counter::SynproxySynResent);
        let idx = splice.cookie().wrapping_sub(client_isn) & 7;
        return syn_to_backend(
            frame,
            &conn,
            client_isn,
            MSS_TABLE[idx as usize],
            window,
            port_mac,
            ctx,
        );
    }
    if l4.flags & tcp::ACK != 0 {
        shift(frame, l4, 8, splice.word());
    }
    forward(frame, l4, &conn, in_port, port_mac, None, ctx)
}

/// Backend -> client, a live entry of a proxied connection: the backend's
/// SYN-ACK completes the splice (delta kept, entry established) and is
/// answered by the switch with the ACK of the client's side; any other
/// segment gets `seq -= delta` and NAT as usual.
#[inline(never)]
pub(super) fn reply_hit(
    frame: &mut [u8],
    l4: &L4,
    hit: &Hit,
    slot: &ConnSlot,
    port_mac: &impl Fn(u32) -> Option<[u8; 6]>,
    ctx: &mut Ctx<'_>,
) -> Verdict {
    ctx.count(Counter::ReplyHit);
    let conn = hit.conn();
    let splice = Splice(ctx.ct.slot(hit.via));
    let state = slot.tcp_state.load(Ordering::Acquire);
    if l4.flags & (tcp::SYN | tcp::ACK) == tcp::SYN | tcp::ACK {
        let Some((bseq, back_ack, _, _, _)) = client_segment(frame, l4) else {
            return ctx.drop(Counter::DropMalformed);
        };
        if state == STATE_SYNPROXY {
            // It must acknowledge the SYN the switch sent.
            if back_ack.wrapping_sub(1) != splice.word() {
                return ctx.drop(Counter::DropNotOurs);
            }
            let moved = ctx.ct.update_state(hit, ctx.pid, |st| {
                if st.load(Ordering::Acquire) != STATE_SYNPROXY {
                    return false;
                }
                splice.set_word(bseq.wrapping_sub(splice.cookie()));
                st.store(STATE_ESTABLISHED, Ordering::Release);
                true
            });
            if moved == Some(true) {
                slot.last_seen.store(ctx.now_ms, Ordering::Relaxed);
                syn_ack_sample(&conn, ctx);
            }
        } else if state != STATE_ESTABLISHED || bseq.wrapping_sub(splice.cookie()) != splice.word()
        {
            // A SYN-ACK of another handshake, or after the close.
            return ctx.drop(Counter::DropNotOurs);
        }
        ctx.count(Counter::SynproxySynAck);
        let seg = Handshake {
            src: conn.client_ip.to_be_bytes(),
            dst: conn.backend_ip.to_be_bytes(),
            src_port: conn.client_port,
            dst_port: conn.backend_port,
            seq: back_ack,
            ack: bseq.wrapping_add(1),
            flags: tcp::ACK,
            window: WINDOW,
            mss: None,
        };
        return to_backend(frame, &conn, &seg, port_mac, ctx);
    }
    if state == STATE_SYNPROXY {
        // Nothing but a SYN-ACK comes before the backend's handshake.
        return ctx.drop(Counter::DropNotOurs);
    }
    match touch(ctx, slot, hit, l4) {
        Moved::Closed => release_backend(ctx, conn.backend_id),
        Moved::Stay | Moved::SynAcked | Moved::Confirmed => {}
    }
    shift(frame, l4, 4, splice.word().wrapping_neg());
    reverse(frame, l4, hit, port_mac, None, ctx)
}
