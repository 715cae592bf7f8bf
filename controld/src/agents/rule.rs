//! The weight rule: from an agent's accepted load to the factor applied to
//! its backends' configured weights, with hysteresis. Pure.
//!
//! - The **factor** of a report is `clamp(1 − cpu, floor, 1)` (in permille:
//!   `clamp(1000 − cpu_permille, floor, 1000)`): an idle server keeps its
//!   whole configured weight, one at 70 % CPU gets 30 % of it, and load
//!   alone never takes a server below `floor` (it stays in rotation).
//! - **Hysteresis**: the published factor moves to a new report's factor
//!   only when they differ by at least `step`, or the new one is at a bound
//!   (100 % or the floor), so noise of a few percent does not republish
//!   the tables every second, and the bounds are reached exactly.
//! - A **drain** request gives weight 0 at once (no new connections;
//!   existing ones continue); the next report without it follows its load
//!   at once. A **silent** agent's backends have their configured weight.
//! - The **effective weight** is `round(configured × factor)`, at least 1
//!   while the configured weight is above 0; 0 when configured 0 or
//!   drained. Small configured weights therefore move in coarse steps (a
//!   weight of 1 never changes with load): give weights of 100 or so to
//!   services steered by agents.

use agent_proto::Load;

/// How an agent steers its backends' weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Steer {
    /// No (fresh) report: the configured weights.
    Configured,
    /// This share of the configured weights, permille, `floor..=1000`.
    Factor(u16),
    /// The agent asks for no new connections: weight 0.
    Drain,
}

impl Steer {
    /// The share of the configured weight, permille (`Configured` is 1000).
    pub fn permille(self) -> u16 {
        match self {
            Steer::Configured => 1000,
            Steer::Factor(f) => f,
            Steer::Drain => 0,
        }
    }
}

impl std::fmt::Display for Steer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Steer::Configured => write!(f, "configured weights"),
            Steer::Factor(p) => write!(f, "weights at {} of configured", percent(*p)),
            Steer::Drain => write!(f, "drained (weight 0: no new connections)"),
        }
    }
}

/// `permille` as a percentage with one decimal when needed ("37.5%").
pub fn percent(permille: u16) -> String {
    if permille.is_multiple_of(10) {
        format!("{}%", permille / 10)
    } else {
        format!("{}.{}%", permille / 10, permille % 10)
    }
}

/// The rule's parameters (from `[agents]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Params {
    /// Smallest factor load alone gives, permille, `10..=1000`.
    pub floor: u16,
    /// Hysteresis, permille, `10..=1000`.
    pub step: u16,
}

impl Params {
    pub fn from_config(a: &crate::config::Agents) -> Self {
        Params {
            floor: (a.floor_percent.clamp(1, 100) * 10) as u16,
            step: (a.step_percent.clamp(1, 100) * 10) as u16,
        }
    }
}

/// A report's own factor: `clamp(1000 − cpu, floor, 1000)` permille.
pub fn factor(load: &Load, p: &Params) -> u16 {
    1000u16
        .saturating_sub(load.cpu_permille)
        .clamp(p.floor.min(1000), 1000)
}

/// The steering after accepting `load`, given the current one.
pub fn next(current: Steer, load: &Load, p: &Params) -> Steer {
    if load.drain {
        return Steer::Drain;
    }
    let f = factor(load, p);
    match current {
        Steer::Factor(cur) => {
            let at_bound = f == 1000 || f == p.floor;
            if f != cur && (at_bound || f.abs_diff(cur) >= p.step) {
                Steer::Factor(f)
            } else {
                current
            }
        }
        // From configured weights or a drain: follow the load at once.
        Steer::Configured | Steer::Drain => Steer::Factor(f),
    }
}

/// The weight published for a backend of configured weight `configured`.
pub fn effective_weight(configured: u32, steer: Steer) -> u32 {
    match steer {
        _ if configured == 0 => 0,
        Steer::Configured => configured,
        Steer::Drain => 0,
        Steer::Factor(f) => {
            let w = (u64::from(configured) * u64::from(f) + 500) / 1000;
            (w as u32).max(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const P: Params = Params {
        floor: 100,
        step: 100,
    };

    fn cpu(permille: u16) -> Load {
        Load {
            cpu_permille: permille,
            ..Default::default()
        }
    }

    #[test]
    fn factor_is_the_idle_share_bounded_by_the_floor() {
        let f = |c| factor(&cpu(c), &P);
        assert_eq!(
            [f(0), f(200), f(700), f(899), f(900), f(1000)],
            [1000, 800, 300, 101, 100, 100]
        );
        // Memory, clients, rate and service time do not enter the rule.
        let busy = Load {
            mem_permille: 1000,
            active_clients: Some(10_000),
            requests_per_sec: Some(1),
            service_time_us: Some(10_000_000),
            ..cpu(200)
        };
        assert_eq!(factor(&busy, &P), 800);
    }

    #[test]
    fn the_documented_example() {
        // docs/OPERATIONS.md: weights 100, 100, 100; the first server at
        // 80 % CPU, the second at 35 %, the third idle.
        let w = |c| effective_weight(100, next(Steer::Configured, &cpu(c), &P));
        assert_eq!([w(800), w(350), w(0)], [20, 65, 100]);
        // Weight 1 never moves with load; weight 0 stays 0.
        assert_eq!(effective_weight(1, Steer::Factor(100)), 1);
        assert_eq!(effective_weight(0, Steer::Factor(1000)), 0);
        assert_eq!(effective_weight(0, Steer::Configured), 0);
        assert_eq!(effective_weight(65535, Steer::Factor(1000)), 65535);
        assert_eq!(effective_weight(65535, Steer::Configured), 65535);
        assert_eq!(effective_weight(7, Steer::Drain), 0);
    }

    #[test]
    fn hysteresis_follows_only_steps_of_at_least_step_or_the_bounds() {
        let mut s = next(Steer::Configured, &cpu(300), &P);
        assert_eq!(s, Steer::Factor(700));
        for (c, want) in [
            (350, 700), // 650: 50 away, kept
            (399, 700), // 601: 99 away, kept
            (400, 600), // 600: 100 away, follows
            (310, 600), // 690: 90 away, kept
            (0, 1000),  // the top bound, reached exactly
            (50, 1000), // 950: kept
            (860, 140), // far: follows
            (920, 100), // the floor, reached exactly though only 40 away
            (880, 100), // 120: kept
        ] {
            s = next(s, &cpu(c), &P);
            assert_eq!(s, Steer::Factor(want), "cpu {c}");
        }
    }

    #[test]
    fn drain_is_immediate_and_ends_with_the_next_report_without_it() {
        let drain = Load {
            drain: true,
            ..cpu(0)
        };
        assert_eq!(next(Steer::Factor(500), &drain, &P), Steer::Drain);
        assert_eq!(next(Steer::Configured, &drain, &P), Steer::Drain);
        assert_eq!(next(Steer::Drain, &cpu(450), &P), Steer::Factor(550));
    }

    #[test]
    fn display() {
        assert_eq!(
            Steer::Factor(375).to_string(),
            "weights at 37.5% of configured"
        );
        assert_eq!(
            Steer::Factor(200).to_string(),
            "weights at 20% of configured"
        );
        assert_eq!(Steer::Configured.to_string(), "configured weights");
    }

    proptest! {
        /// Monotonic (more CPU never raises the weight) and bounded (never
        /// 0 from load alone, never above the configured weight).
        #[test]
        fn weight_is_monotonic_and_bounded(
            configured in 1u32..=65535, a in 0u16..=1000, b in 0u16..=1000,
            floor in 1u16..=100, step in 1u16..=100,
        ) {
            let p = Params { floor: floor * 10, step: step * 10 };
            let (lo, hi) = (a.min(b), a.max(b));
            let w = |c| effective_weight(configured, Steer::Factor(factor(&cpu(c), &p)));
            prop_assert!(w(lo) >= w(hi));
            prop_assert!(w(hi) >= 1 && w(lo) <= configured);
            let s = next(Steer::Factor(factor(&cpu(lo), &p)), &cpu(hi), &p);
            prop_assert!(s.permille() >= p.floor && s.permille() <= 1000);
        }
    }
}
