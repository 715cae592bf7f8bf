//! Which reports are accepted: the form and HMAC (`agent_proto::open`),
//! the sender, freshness and replay, with a counter per outcome. Pure: the
//! caller passes the datagram, its source and the wall clock.

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddrV4};

use agent_proto::{Endpoints, OpenError, Report, WireError};

/// What the verifier needs from the configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// controld's address, as the agents send to it (part of the MAC).
    pub listen: SocketAddrV4,
    pub secret: Vec<u8>,
    /// Largest accepted distance between a report's timestamp and the clock.
    pub max_skew_ms: u64,
    /// Agents whose reports are accepted: the backends' addresses.
    pub known: HashSet<Ipv4Addr>,
}

/// Why a report was dropped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reject {
    /// Not a report (length, magic, version, flags, ranges).
    Malformed(WireError),
    /// From an address that is no backend's.
    UnknownAgent,
    /// The HMAC does not match.
    Forged,
    /// The timestamp is `skew_ms` from controld's clock (positive: ahead),
    /// further than `max_skew_ms`.
    Stale { skew_ms: i64, max_skew_ms: u64 },
    /// The sequence number is not above the last accepted one.
    Replayed { seq: u64, last: u64 },
    /// The sequence number is above `limit`, controld's clock plus
    /// `max_skew_ms` in µs since the Unix epoch: sequence numbers count up
    /// from the agent's start in µs, so no agent sent it yet, and accepting
    /// it would make every genuine report after it look replayed. Counted
    /// as `stale`.
    SeqAhead { seq: u64, limit: u64 },
}

/// The counters' names, in the order they are reported.
pub const REASONS: [&str; 5] = ["forged", "stale", "replayed", "unknown_agent", "malformed"];

impl Reject {
    /// Index into [`REASONS`].
    pub fn reason(&self) -> usize {
        match self {
            Reject::Forged => 0,
            Reject::Stale { .. } | Reject::SeqAhead { .. } => 1,
            Reject::Replayed { .. } => 2,
            Reject::UnknownAgent => 3,
            Reject::Malformed(_) => 4,
        }
    }
}

impl std::fmt::Display for Reject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reject::Malformed(w) => write!(f, "not a report: {w}"),
            Reject::UnknownAgent => write!(f, "not the address of any backend"),
            Reject::Forged => write!(
                f,
                "the HMAC does not match (wrong secret, altered, or sent from or to another address)"
            ),
            Reject::Stale {
                skew_ms,
                max_skew_ms,
            } => write!(
                f,
                "timestamp {} ms {} controld's clock (max_skew_ms {max_skew_ms})",
                skew_ms.unsigned_abs(),
                if *skew_ms > 0 { "ahead of" } else { "behind" }
            ),
            Reject::Replayed { seq, last } => write!(
                f,
                "sequence number {seq} is not above the last accepted {last}"
            ),
            Reject::SeqAhead { seq, limit } => write!(
                f,
                "sequence number {seq} is ahead of controld's clock: above {limit} (the clock plus max_skew_ms, in µs since the Unix epoch)"
            ),
        }
    }
}

/// Reports accepted and dropped, by reason, since controld started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub accepted: u64,
    pub forged: u64,
    pub stale: u64,
    pub replayed: u64,
    pub unknown_agent: u64,
    pub malformed: u64,
}

impl Counters {
    /// The drop counters in [`REASONS`] order.
    pub fn dropped(&self) -> [u64; 5] {
        [
            self.forged,
            self.stale,
            self.replayed,
            self.unknown_agent,
            self.malformed,
        ]
    }

    fn count(&mut self, r: &Reject) {
        match r {
            Reject::Forged => self.forged += 1,
            Reject::Stale { .. } | Reject::SeqAhead { .. } => self.stale += 1,
            Reject::Replayed { .. } => self.replayed += 1,
            Reject::UnknownAgent => self.unknown_agent += 1,
            Reject::Malformed(_) => self.malformed += 1,
        }
    }
}

impl std::fmt::Display for Counters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (name, n) in REASONS.iter().zip(self.dropped()) {
            write!(f, "{name} {n}, ")?;
        }
        write!(f, "accepted {}", self.accepted)
    }
}

/// The acceptance rules and their state: the last accepted sequence
/// number of each agent.
#[derive(Debug)]
pub struct Verifier {
    settings: Settings,
    last_seq: HashMap<Ipv4Addr, u64>,
    counters: Counters,
}

impl Verifier {
    pub fn new(settings: Settings) -> Self {
        Verifier {
            settings,
            last_seq: HashMap::new(),
            counters: Counters::default(),
        }
    }

    /// New settings (a reload). Agents that are still known keep their
    /// last sequence numbers, so a reload opens no window for replays.
    pub fn configure(&mut self, settings: Settings) {
        self.last_seq.retain(|a, _| settings.known.contains(a));
        self.settings = settings;
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// Checks a datagram from `source` received at `now_ms` (controld's
    /// wall clock, ms since the Unix epoch), in this order: form, sender,
    /// HMAC, freshness, replay. Accepting records its sequence number.
    pub fn check(
        &mut self,
        datagram: &[u8],
        source: Ipv4Addr,
        now_ms: u64,
    ) -> Result<Report, Reject> {
        let r = self.check_inner(datagram, source, now_ms);
        match &r {
            Ok(rep) => {
                self.counters.accepted += 1;
                self.last_seq.insert(source, rep.seq);
            }
            Err(e) => self.counters.count(e),
        }
        r
    }

    fn check_inner(
        &self,
        datagram: &[u8],
        source: Ipv4Addr,
        now_ms: u64,
    ) -> Result<Report, Reject> {
        // The cheap form check first: junk costs no HMAC.
        agent_proto::ReportView::new_checked(datagram).map_err(Reject::Malformed)?;
        if !self.settings.known.contains(&source) {
            return Err(Reject::UnknownAgent);
        }
        let ep = Endpoints {
            agent: source,
            controller: self.settings.listen,
        };
        let report =
            agent_proto::open(datagram, &ep, &self.settings.secret).map_err(|e| match e {
                OpenError::Malformed(w) => Reject::Malformed(w),
                OpenError::Forged => Reject::Forged,
            })?;
        let skew_ms = report.timestamp_ms as i128 - now_ms as i128;
        if skew_ms.unsigned_abs() > u128::from(self.settings.max_skew_ms) {
            return Err(Reject::Stale {
                skew_ms: skew_ms.clamp(i64::MIN as i128, i64::MAX as i128) as i64,
                max_skew_ms: self.settings.max_skew_ms,
            });
        }
        // Checked before the replay rule and never recorded: one report
        // from the future must not move the agent's mark out of reach.
        let limit = now_ms
            .saturating_add(self.settings.max_skew_ms)
            .saturating_mul(1000)
            .saturating_add(999);
        if report.seq > limit {
            return Err(Reject::SeqAhead {
                seq: report.seq,
                limit,
            });
        }
        if let Some(&last) = self.last_seq.get(&source)
            && report.seq <= last
        {
            return Err(Reject::Replayed {
                seq: report.seq,
                last,
            });
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_proto::{Load, seal};

    const SECRET: &[u8] = b"0123456789abcdef";
    const NOW: u64 = 1_700_000_000_000;
    const A: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 11);
    const B: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 12);

    fn listen() -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::new(198, 19, 0, 1), 7007)
    }

    fn settings() -> Settings {
        Settings {
            listen: listen(),
            secret: SECRET.to_vec(),
            max_skew_ms: 5000,
            known: [A, B].into_iter().collect(),
        }
    }

    fn datagram(from: Ipv4Addr, ts: u64, seq: u64) -> [u8; agent_proto::REPORT_LEN] {
        let r = Report {
            timestamp_ms: ts,
            seq,
            load: Load {
                cpu_permille: 500,
                ..Default::default()
            },
        };
        seal(
            &r,
            &Endpoints {
                agent: from,
                controller: listen(),
            },
            SECRET,
        )
    }

    #[test]
    fn a_genuine_report_is_accepted_and_counted() {
        let mut v = Verifier::new(settings());
        let r = v.check(&datagram(A, NOW, 10), A, NOW).unwrap();
        assert_eq!((r.seq, r.load.cpu_permille), (10, 500));
        assert_eq!(
            v.counters(),
            Counters {
                accepted: 1,
                ..Default::default()
            }
        );
    }

    #[test]
    fn each_rejection_is_counted_under_its_reason() {
        let mut v = Verifier::new(settings());
        assert!(matches!(
            v.check(b"junk", A, NOW),
            Err(Reject::Malformed(WireError::Length(4)))
        ));
        let c = Ipv4Addr::new(198, 19, 0, 99);
        assert_eq!(
            v.check(&datagram(c, NOW, 1), c, NOW),
            Err(Reject::UnknownAgent)
        );
        // A's report sent from B, and a report under another secret.
        assert_eq!(v.check(&datagram(A, NOW, 1), B, NOW), Err(Reject::Forged));
        let forged = {
            let r = Report {
                timestamp_ms: NOW,
                seq: 1,
                load: Load::default(),
            };
            seal(
                &r,
                &Endpoints {
                    agent: A,
                    controller: listen(),
                },
                b"another-secret-of-16",
            )
        };
        assert_eq!(v.check(&forged, A, NOW), Err(Reject::Forged));
        // Sent to another controld address.
        let mut moved = settings();
        moved.listen.set_port(7008);
        let mut v2 = Verifier::new(moved);
        assert_eq!(v2.check(&datagram(A, NOW, 1), A, NOW), Err(Reject::Forged));

        assert!(v.check(&datagram(A, NOW, 5), A, NOW).is_ok());
        assert_eq!(
            v.check(&datagram(A, NOW, 5), A, NOW),
            Err(Reject::Replayed { seq: 5, last: 5 })
        );
        assert_eq!(
            v.check(&datagram(A, NOW - 5001, 6), A, NOW),
            Err(Reject::Stale {
                skew_ms: -5001,
                max_skew_ms: 5000
            })
        );
        assert_eq!(
            v.counters(),
            Counters {
                accepted: 1,
                forged: 2,
                stale: 1,
                replayed: 1,
                unknown_agent: 1,
                malformed: 1,
            }
        );
        assert_eq!(
            v.counters().to_string(),
            "forged 2, stale 1, replayed 1, unknown_agent 1, malformed 1, accepted 1"
        );
    }

    #[test]
    fn the_staleness_window_is_inclusive_and_symmetric() {
        let mut v = Verifier::new(settings());
        assert!(v.check(&datagram(A, NOW - 5000, 1), A, NOW).is_ok());
        assert!(v.check(&datagram(A, NOW + 5000, 2), A, NOW).is_ok());
        assert_eq!(
            v.check(&datagram(A, NOW + 5001, 3), A, NOW),
            Err(Reject::Stale {
                skew_ms: 5001,
                max_skew_ms: 5000
            })
        );
        // Extremes do not overflow.
        assert!(matches!(
            v.check(&datagram(A, u64::MAX, 4), A, 0),
            Err(Reject::Stale {
                skew_ms: i64::MAX,
                ..
            })
        ));
        assert_eq!(
            Reject::Stale {
                skew_ms: -60000,
                max_skew_ms: 5000
            }
            .to_string(),
            "timestamp 60000 ms behind controld's clock (max_skew_ms 5000)"
        );
    }

    #[test]
    fn sequence_numbers_must_rise_per_agent_and_rejected_ones_leave_no_trace() {
        let mut v = Verifier::new(settings());
        assert!(v.check(&datagram(A, NOW, 100), A, NOW).is_ok());
        // Another agent has its own sequence.
        assert!(v.check(&datagram(B, NOW, 1), B, NOW).is_ok());
        assert_eq!(
            v.check(&datagram(A, NOW, 99), A, NOW),
            Err(Reject::Replayed { seq: 99, last: 100 })
        );
        // A stale report with a high sequence number does not move A's mark.
        assert!(v.check(&datagram(A, NOW - 9000, 1000), A, NOW).is_err());
        assert!(v.check(&datagram(A, NOW, 101), A, NOW).is_ok());
        // Gaps are fine (lost datagrams).
        assert!(v.check(&datagram(A, NOW, 500), A, NOW).is_ok());
        assert_eq!(
            v.check(&datagram(A, NOW, 101), A, NOW),
            Err(Reject::Replayed {
                seq: 101,
                last: 500
            })
        );
    }

    /// A correctly signed report numbered 2^64-1 was accepted and made
    /// every later genuine report "replayed" until controld restarted.
    /// Sequence numbers count from the agent's start in µs since the epoch,
    /// so one ahead of controld's clock (plus the skew allowed) is refused
    /// and leaves no mark.
    #[test]
    fn a_sequence_number_ahead_of_the_clock_is_refused_and_leaves_no_trace() {
        let mut v = Verifier::new(settings());
        let genuine = NOW * 1000 + 17;
        assert!(v.check(&datagram(A, NOW, genuine), A, NOW).is_ok());
        let limit = (NOW + 5000) * 1000 + 999;
        assert_eq!(
            v.check(&datagram(A, NOW, u64::MAX), A, NOW),
            Err(Reject::SeqAhead {
                seq: u64::MAX,
                limit
            })
        );
        assert_eq!(
            v.check(&datagram(A, NOW, limit + 1), A, NOW),
            Err(Reject::SeqAhead {
                seq: limit + 1,
                limit
            })
        );
        assert!(v.check(&datagram(A, NOW, genuine + 1), A, NOW).is_ok());
        assert!(
            v.check(&datagram(A, NOW + 10, genuine + 2), A, NOW + 10)
                .is_ok()
        );
        // The bound itself is accepted (the skew allowed, in µs).
        assert!(v.check(&datagram(A, NOW, limit), A, NOW).is_ok());
        assert_eq!(v.counters().stale, 2);
        assert_eq!(
            Reject::SeqAhead {
                seq: u64::MAX,
                limit
            }
            .to_string(),
            format!(
                "sequence number {} is ahead of controld's clock: above {limit} (the clock plus max_skew_ms, in µs since the Unix epoch)",
                u64::MAX
            )
        );
    }

    #[test]
    fn a_reload_keeps_the_marks_of_agents_still_known_and_forgets_the_others() {
        let mut v = Verifier::new(settings());
        assert!(v.check(&datagram(A, NOW, 7), A, NOW).is_ok());
        assert!(v.check(&datagram(B, NOW, 7), B, NOW).is_ok());
        let mut s = settings();
        s.known.remove(&B);
        v.configure(s);
        assert_eq!(
            v.check(&datagram(A, NOW, 7), A, NOW),
            Err(Reject::Replayed { seq: 7, last: 7 })
        );
        assert_eq!(
            v.check(&datagram(B, NOW, 8), B, NOW),
            Err(Reject::UnknownAgent)
        );
        v.configure(settings());
        assert!(v.check(&datagram(B, NOW, 1), B, NOW).is_ok());
    }
}
