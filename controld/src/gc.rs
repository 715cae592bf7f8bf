//! Connection-table GC: ages entries out, takes back slots abandoned by a
//! killed writer, removes orphaned reply slots, compacts tombstones.
//! Incremental: each step visits a bounded window, so the switches never
//! see a stop-the-world sweep.

use shm_layout::Region;
use shm_layout::conntrack::{KIND_FWD, KIND_REPLY, KIND_TOMB, Timeouts};
use shm_layout::switch_slot::release;

/// What one GC step did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GcStats {
    pub visited: u64,
    pub expired: u64,
    pub orphans: u64,
    pub abandoned: u64,
    pub compacted: u64,
}

#[derive(Debug, Default)]
pub struct Gc {
    cursor: u32,
    pub totals: GcStats,
}

impl Gc {
    /// Visits `n` slots starting where the last step stopped.
    pub fn step(&mut self, region: &Region, timeouts: &Timeouts, n: u32) -> GcStats {
        let ct = region.conntrack();
        let pid = std::process::id();
        let now = region.now_ms();
        let cap = ct.capacity() as u32;
        let counters = region.backend_counters();
        let mut st = GcStats::default();
        for _ in 0..n.min(cap) {
            let idx = self.cursor;
            self.cursor = (self.cursor + 1) % cap;
            st.visited += 1;
            if ct.holder(idx).is_some() {
                if let Some(r) = ct.reclaim_abandoned(idx, pid) {
                    st.abandoned += 1;
                    if let Some(b) = r.release.and_then(|id| counters.get(id as usize)) {
                        release(b);
                    }
                }
                continue;
            }
            let Some(snap) = ct.snapshot(idx) else {
                continue;
            };
            match snap.kind() {
                KIND_FWD if ct.slot(idx).expired(now, timeouts) => {
                    let Some(reserved) = ct.retire(idx, &snap, pid) else {
                        continue;
                    };
                    st.expired += 1;
                    let id = snap.conn().map(|c| c.backend_id).unwrap_or(u32::MAX);
                    if let Some(b) = counters.get(id as usize)
                        && reserved
                    {
                        release(b);
                    }
                }
                KIND_REPLY => {
                    let (rkey, fwd) = snap.reply().expect("reply slot");
                    // A busy target may be an insert in progress (the reply slot
                    // is published first): leave it for the next sweep.
                    let live = match ct.snapshot(fwd) {
                        None => true,
                        Some(s) => s.conn().is_some_and(|c| {
                            c.reply_key() == rkey && !ct.slot(fwd).expired(now, timeouts)
                        }),
                    };
                    if !live && ct.remove(idx, &snap, pid) {
                        st.orphans += 1;
                    }
                }
                KIND_TOMB if ct.compact(idx, pid) => st.compacted += 1,
                _ => {}
            }
        }
        self.totals.visited += st.visited;
        self.totals.expired += st.expired;
        self.totals.orphans += st.orphans;
        self.totals.abandoned += st.abandoned;
        self.totals.compacted += st.compacted;
        st
    }
}
