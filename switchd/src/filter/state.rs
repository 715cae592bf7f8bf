//! TCP state: how a packet moves its connection's entry (half-open,
//! provisional, established, closing) and what the move obliges the caller
//! to do (give a backend slot back, count a confirmation, sample the
//! SYN-ACK). The rules are in docs/ARCHITECTURE.md, "Provisional entries".

use core::sync::atomic::Ordering;

use shm_layout::config_slot::{MODE_NAT, PROTO_TCP};
use shm_layout::conntrack::{
    ConnSlot, Direction, Hit, STATE_CLOSING, STATE_ESTABLISHED, STATE_PROVISIONAL, STATE_SYN,
    STATE_SYN_ACKED, holds_reservation,
};

use crate::sched;
use wire::tcp;

use super::Ctx;
use super::parse::L4;

/// Which TCP state change a packet made (see [`touch`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Moved {
    Stay,
    /// SYN to SYN_ACKED by the backend's SYN-ACK (NAT reply direction).
    SynAcked,
    /// PROVISIONAL to ESTABLISHED: the pickup proved itself, and took its
    /// backend reservation.
    Confirmed,
    /// To CLOSING by this packet, first of all switches: the caller gives
    /// the backend slot back.
    Closed,
}

/// Refreshes the time, TCP state and counters of the entry `hit` found
/// (in `slot`, `ctx.ct.slot(hit.idx)`) for a packet (`hit.dir` is the
/// packet's direction); says which state change it made. Changes are
/// atomic read-modify-writes, so of several switches seeing the same
/// change only one reports it.
#[inline]
pub(super) fn touch(ctx: &Ctx<'_>, slot: &ConnSlot, hit: &Hit, l4: &L4) -> Moved {
    let (dir, now_ms) = (hit.dir, ctx.now_ms);
    let tcp = l4.key().proto == PROTO_TCP;
    let cur = if tcp {
        slot.tcp_state.load(Ordering::Relaxed)
    } else {
        0
    };
    // A half-open entry's `tcp_syn` runs from the client's last packet:
    // the backend's retransmitted SYN-ACKs (to a spoofed client that never
    // answers) do not keep it alive.
    let refresh = dir == Direction::Forward || !(tcp && matches!(cur, STATE_SYN | STATE_SYN_ACKED));
    if refresh && slot.last_seen.load(Ordering::Relaxed) != now_ms {
        slot.last_seen.store(now_ms, Ordering::Relaxed);
    }
    let mut moved = Moved::Stay;
    if tcp {
        let next = next_state(cur, dir, l4.flags, hit, now_ms);
        if next != cur {
            moved = change_state(ctx, hit, cur, next);
        }
    }
    // Each direction has its own counts: a reply's go to the reply slot it
    // was found through (NAT), the client's to the forward slot.
    let counted = if dir == Direction::Reply {
        ctx.ct.slot(hit.via)
    } else {
        slot
    };
    counted.add_counts(1, u64::from(l4.ip_len));
    moved
}

/// How long a provisional DR or tunnel entry must live before a further
/// client packet confirms it (see [`next_state`]).
pub const CONFIRM_AFTER_MS: u32 = 1_000;

/// The TCP state a packet with `flags` moves the connection `hit` found
/// from `cur` to (`cur` if none). The rules (docs/ARCHITECTURE.md,
/// "Provisional entries"):
/// - FIN or RST, either direction: CLOSING (a provisional entry stays
///   provisional and expires).
/// - SYN (half-open): the backend's SYN-ACK (NAT) makes it SYN_ACKED,
///   still half-open: a backend answers a spoofed SYN as readily as a
///   real one. Only the client's ACK establishes. (Whether the SYN-ACK
///   passed first is not required: without sequence numbers in the entry
///   that would stop no blind spoofer, and in DR and tunnel mode the
///   SYN-ACK never passes.)
/// - PROVISIONAL (a pickup): in NAT, any packet of the backend (the other
///   direction) confirms it; in DR and tunnel mode (one-armed), a client
///   packet at least [`CONFIRM_AFTER_MS`] after the pickup: a spoofed
///   flood sends one segment per 5-tuple, a live connection keeps sending.
#[inline]
fn next_state(cur: u32, dir: Direction, flags: u8, hit: &Hit, now_ms: u32) -> u32 {
    if flags & (tcp::FIN | tcp::RST) != 0 {
        // An unconfirmed pickup stays provisional: it holds nothing to
        // release, and its short timeout ends it sooner than `tcp_fin`
        // would (a backend answers each spoofed ACK with a RST).
        return if cur == STATE_PROVISIONAL {
            cur
        } else {
            STATE_CLOSING
        };
    }
    let client_ack = dir == Direction::Forward && flags & tcp::ACK != 0 && flags & tcp::SYN == 0;
    match cur {
        STATE_SYN
            if dir == Direction::Reply && flags & (tcp::SYN | tcp::ACK) == tcp::SYN | tcp::ACK =>
        {
            STATE_SYN_ACKED
        }
        STATE_SYN | STATE_SYN_ACKED if client_ack => STATE_ESTABLISHED,
        STATE_PROVISIONAL if dir == Direction::Reply => STATE_ESTABLISHED,
        STATE_PROVISIONAL
            if hit.conn().mode != MODE_NAT
                && now_ms.wrapping_sub(hit.conn().created_ms) as i32 >= CONFIRM_AFTER_MS as i32 =>
        {
            STATE_ESTABLISHED
        }
        _ => cur,
    }
}

/// [`touch`]'s state change from `cur` to `next`, once per connection
/// and direction at most: under the slot's lock as the lookup read it, so
/// a packet of a connection whose slot was reused meanwhile changes
/// nothing (see `ConnTable::update_state`).
#[cold]
#[inline(never)]
fn change_state(ctx: &Ctx<'_>, hit: &Hit, cur: u32, next: u32) -> Moved {
    let closing = next == STATE_CLOSING;
    let confirming = cur == STATE_PROVISIONAL;
    let backend = ctx.backends.get(hit.conn().backend_id as usize);
    ctx.ct
        .update_state(hit, ctx.pid, |state| {
            if closing {
                // Released only if it held a reservation (a provisional
                // entry never took one).
                holds_reservation(state.swap(STATE_CLOSING, Ordering::AcqRel))
            } else if confirming {
                // A confirmed pickup takes its backend reservation (over
                // any limit: the connection exists at the backend already)
                // before it becomes ESTABLISHED, so whoever closes it later
                // releases one that was taken.
                if let Some(b) = backend {
                    sched::reserve(b, 0);
                }
                let ok = state
                    .compare_exchange(cur, next, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok();
                if let (false, Some(b)) = (ok, backend) {
                    b.active.fetch_sub(1, Ordering::Relaxed);
                }
                ok
            } else {
                state
                    .compare_exchange(cur, next, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
            }
        })
        .map_or(Moved::Stay, |changed| match (changed, closing) {
            (false, _) => Moved::Stay,
            (true, true) => Moved::Closed,
            (true, false) if confirming => Moved::Confirmed,
            (true, false) if next == STATE_SYN_ACKED => Moved::SynAcked,
            _ => Moved::Stay,
        })
}
