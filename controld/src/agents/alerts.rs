//! The alert for dropped reports, rate-limited: the first drop is logged
//! at once, later ones are gathered and logged together at most once per
//! [`ALERT_EVERY`], each line with the totals since controld started. So
//! a flood of forged reports costs one line per period, and the last
//! line always tells the final counts. Pure: the caller passes the clock.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use super::verify::{Counters, REASONS, Reject};

/// Shortest time between two alert lines.
pub const ALERT_EVERY: Duration = Duration::from_secs(5);

/// Drops not yet logged.
#[derive(Debug, Default)]
pub struct Alerts {
    last_logged: Option<Instant>,
    /// Per reason: drops since the last line, and the latest one's sender
    /// and cause.
    pending: [(u64, Option<(Ipv4Addr, String)>); 5],
}

impl Alerts {
    /// Notes a dropped report from `source`.
    pub fn record(&mut self, source: Ipv4Addr, r: &Reject) {
        let p = &mut self.pending[r.reason()];
        p.0 += 1;
        p.1 = Some((source, r.to_string()));
    }

    /// The alert line due at `now`, if any (the caller logs it).
    pub fn due(&mut self, now: Instant, totals: &Counters) -> Option<String> {
        let n: u64 = self.pending.iter().map(|p| p.0).sum();
        if n == 0
            || self
                .last_logged
                .is_some_and(|t| now.saturating_duration_since(t) < ALERT_EVERY)
        {
            return None;
        }
        let parts: Vec<String> = self
            .pending
            .iter_mut()
            .zip(REASONS)
            .filter(|(p, _)| p.0 > 0)
            .map(|(p, name)| {
                let (count, last) = std::mem::take(p);
                let (src, why) = last.expect("a counted drop has an example");
                format!("{count} {name} (last from {src}: {why})")
            })
            .collect();
        self.last_logged = Some(now);
        Some(format!(
            "agents: ALERT: dropped {n} report{}: {}; totals: {totals}",
            if n == 1 { "" } else { "s" },
            parts.join(", ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 11);
    const B: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 12);

    #[test]
    fn the_first_drop_is_logged_at_once_and_later_ones_gathered() {
        let t0 = Instant::now();
        let mut a = Alerts::default();
        let mut totals = Counters {
            forged: 1,
            accepted: 3,
            ..Default::default()
        };
        assert_eq!(a.due(t0, &totals), None, "nothing to say");
        a.record(B, &Reject::Forged);
        assert_eq!(
            a.due(t0, &totals).unwrap(),
            "agents: ALERT: dropped 1 report: 1 forged (last from 198.19.0.12: the HMAC does not match \
             (wrong secret, altered, or sent from or to another address)); \
             totals: forged 1, stale 0, replayed 0, unknown_agent 0, malformed 0, accepted 3"
        );
        assert_eq!(a.due(t0, &totals), None, "said once");
        a.record(B, &Reject::Forged);
        a.record(A, &Reject::Replayed { seq: 4, last: 9 });
        a.record(A, &Reject::Forged);
        totals.forged = 3;
        totals.replayed = 1;
        assert_eq!(a.due(t0 + Duration::from_millis(4999), &totals), None);
        assert_eq!(
            a.due(t0 + ALERT_EVERY, &totals).unwrap(),
            "agents: ALERT: dropped 3 reports: 2 forged (last from 198.19.0.11: the HMAC does not match \
             (wrong secret, altered, or sent from or to another address)), \
             1 replayed (last from 198.19.0.11: sequence number 4 is not above the last accepted 9); \
             totals: forged 3, stale 0, replayed 1, unknown_agent 0, malformed 0, accepted 3"
        );
        assert_eq!(a.due(t0 + 3 * ALERT_EVERY, &totals), None);
    }
}
