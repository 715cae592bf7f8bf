//! Each agent's latest accepted report and the steering published for its
//! backends, over time: accepted reports move it by [`super::rule`], and
//! an agent silent for `silent` goes back to the configured weights. Pure:
//! the caller passes the clock.

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use agent_proto::Report;

use super::rule::{self, Params, Steer};

/// One agent as the tracker knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AgentState {
    /// Its latest accepted report, and when it arrived.
    pub report: Report,
    pub received: Instant,
    /// What its backends' weights follow now.
    pub steer: Steer,
    /// No accepted report for `silent` (its steer is then `Configured`).
    pub silent: bool,
}

/// Why an agent's steering changed, for the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cause {
    /// An accepted report (its first, or the first after a silence, when
    /// `first`).
    Report { first: bool },
    /// No accepted report for this long.
    Silent(Duration),
}

/// A change of the weights an agent's backends get.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Change {
    pub agent: Ipv4Addr,
    pub from: Steer,
    pub to: Steer,
    pub cause: Cause,
}

#[derive(Debug)]
pub struct Tracker {
    params: Params,
    silent: Duration,
    agents: HashMap<Ipv4Addr, AgentState>,
}

impl Tracker {
    pub fn new(params: Params, silent: Duration) -> Self {
        Tracker {
            params,
            silent,
            agents: HashMap::new(),
        }
    }

    /// New parameters (a reload): agents no longer known are forgotten
    /// (their backends are gone); the others keep their steering until
    /// their next report or silence.
    pub fn configure(&mut self, params: Params, silent: Duration, known: &HashSet<Ipv4Addr>) {
        self.params = params;
        self.silent = silent;
        self.agents.retain(|a, _| known.contains(a));
    }

    /// Folds in an accepted report that arrived at `at`; returns the
    /// change of weights it causes, if any. Reports are taken in the order
    /// the verifier accepted them (rising sequence numbers).
    pub fn accept(&mut self, agent: Ipv4Addr, report: Report, at: Instant) -> Option<Change> {
        let (from, first) = match self.agents.get(&agent) {
            Some(s) if !s.silent => (s.steer, false),
            _ => (Steer::Configured, true),
        };
        let to = rule::next(from, &report.load, &self.params);
        self.agents.insert(
            agent,
            AgentState {
                report,
                received: at,
                steer: to,
                silent: false,
            },
        );
        (to.permille() != from.permille()).then_some(Change {
            agent,
            from,
            to,
            cause: Cause::Report { first },
        })
    }

    /// Agents silent at `now` go back to the configured weights; returns
    /// those whose weights change.
    pub fn expire(&mut self, now: Instant) -> Vec<Change> {
        let mut changes = Vec::new();
        for (&agent, s) in &mut self.agents {
            let quiet = now.saturating_duration_since(s.received);
            if s.silent || quiet < self.silent {
                continue;
            }
            s.silent = true;
            let from = std::mem::replace(&mut s.steer, Steer::Configured);
            if from.permille() != 1000 {
                changes.push(Change {
                    agent,
                    from,
                    to: Steer::Configured,
                    cause: Cause::Silent(quiet),
                });
            }
        }
        changes.sort_by_key(|c| c.agent);
        changes
    }

    /// What the backends at `agent` follow now.
    pub fn steer(&self, agent: Ipv4Addr) -> Steer {
        self.agents
            .get(&agent)
            .map_or(Steer::Configured, |s| s.steer)
    }

    pub fn get(&self, agent: Ipv4Addr) -> Option<&AgentState> {
        self.agents.get(&agent)
    }

    /// Every agent that reported since it became known, by address.
    pub fn agents(&self) -> Vec<(Ipv4Addr, AgentState)> {
        let mut v: Vec<_> = self.agents.iter().map(|(a, s)| (*a, *s)).collect();
        v.sort_by_key(|(a, _)| *a);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_proto::Load;

    const A: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 11);
    const B: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 12);
    const P: Params = Params {
        floor: 100,
        step: 100,
    };
    const SILENT: Duration = Duration::from_secs(3);

    fn rep(seq: u64, cpu: u16, drain: bool) -> Report {
        Report {
            timestamp_ms: 0,
            seq,
            load: Load {
                cpu_permille: cpu,
                drain,
                ..Default::default()
            },
        }
    }

    #[test]
    fn reports_steer_and_only_real_changes_are_reported() {
        let t0 = Instant::now();
        let mut t = Tracker::new(P, SILENT);
        assert_eq!(t.steer(A), Steer::Configured);
        // An idle first report changes no weight.
        assert_eq!(t.accept(A, rep(1, 0, false), t0), None);
        assert_eq!(t.steer(A), Steer::Factor(1000));
        let c = t.accept(A, rep(2, 800, false), t0).unwrap();
        assert_eq!(
            c,
            Change {
                agent: A,
                from: Steer::Factor(1000),
                to: Steer::Factor(200),
                cause: Cause::Report { first: false }
            }
        );
        // Within the step: no change.
        assert_eq!(t.accept(A, rep(3, 750, false), t0), None);
        assert_eq!(t.steer(A), Steer::Factor(200));
        assert_eq!(t.steer(B), Steer::Configured, "per agent");
        let c = t.accept(A, rep(4, 750, true), t0).unwrap();
        assert_eq!((c.from, c.to), (Steer::Factor(200), Steer::Drain));
        let c = t.accept(A, rep(5, 0, false), t0).unwrap();
        assert_eq!((c.from, c.to), (Steer::Drain, Steer::Factor(1000)));
    }

    #[test]
    fn a_silent_agent_goes_back_to_configured_weights_once() {
        let t0 = Instant::now();
        let mut t = Tracker::new(P, SILENT);
        t.accept(A, rep(1, 900, false), t0);
        t.accept(B, rep(1, 0, false), t0);
        assert!(t.expire(t0 + SILENT - Duration::from_millis(1)).is_empty());
        // B was at full weight: silent, but no weight changes.
        let c = t.expire(t0 + SILENT);
        assert_eq!(
            c,
            [Change {
                agent: A,
                from: Steer::Factor(100),
                to: Steer::Configured,
                cause: Cause::Silent(SILENT)
            }]
        );
        assert!(t.get(B).unwrap().silent);
        assert!(t.expire(t0 + 2 * SILENT).is_empty(), "once");
        // Back again: its first report after the silence follows at once.
        let c = t.accept(A, rep(2, 500, false), t0 + 3 * SILENT).unwrap();
        assert_eq!(
            (c.from, c.to, c.cause),
            (
                Steer::Configured,
                Steer::Factor(500),
                Cause::Report { first: true }
            )
        );
    }

    #[test]
    fn a_drained_agent_that_falls_silent_is_undrained() {
        let t0 = Instant::now();
        let mut t = Tracker::new(P, SILENT);
        t.accept(A, rep(1, 0, true), t0);
        assert_eq!(t.steer(A), Steer::Drain);
        let c = t.expire(t0 + SILENT);
        assert_eq!((c[0].from, c[0].to), (Steer::Drain, Steer::Configured));
    }

    #[test]
    fn reconfigure_forgets_unknown_agents_and_applies_new_silence() {
        let t0 = Instant::now();
        let mut t = Tracker::new(P, SILENT);
        t.accept(A, rep(1, 900, false), t0);
        t.accept(B, rep(1, 900, false), t0);
        t.configure(P, Duration::from_secs(1), &[A].into_iter().collect());
        assert_eq!(t.steer(B), Steer::Configured);
        assert_eq!(t.agents().len(), 1);
        assert_eq!(t.expire(t0 + Duration::from_secs(1)).len(), 1);
    }
}
