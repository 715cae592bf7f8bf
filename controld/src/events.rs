//! Drains the switches' event rings (mid-connection recoveries today).

use shm_layout::Region;
use shm_layout::ring::EVENT_MIDFLOW;

/// Counts events and logs them at a bounded rate.
#[derive(Debug, Default)]
pub struct EventDrain {
    pub midflow: u64,
    logged_at: Option<std::time::Instant>,
}

impl EventDrain {
    pub fn drain(&mut self, region: &Region) {
        let mut new = 0;
        for s in 0..region.caps().switches as usize {
            let ring = region.ring(s);
            while let Some(rec) = ring.pop() {
                if rec[0] & 0xffff_ffff == EVENT_MIDFLOW {
                    new += 1;
                }
            }
        }
        self.midflow += new;
        if new > 0 && self.logged_at.is_none_or(|t| t.elapsed().as_secs() >= 10) {
            log::info!(
                "{new} connection(s) recovered from mid-connection packets ({} since start)",
                self.midflow
            );
            self.logged_at = Some(std::time::Instant::now());
        }
    }
}
