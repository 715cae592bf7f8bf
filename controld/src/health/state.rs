//! The hysteresis of one backend's health: check results in, state out.
//! Pure (no I/O, no clock); the rule is described in [`super`].

/// Whether a backend takes new connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// In its service's table.
    Up,
    /// Out of its service's table; its connections follow `on_backend_down`.
    Down,
}

/// A state change caused by one result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    /// The score fell below the failover threshold.
    WentDown,
    /// The score reached the connection threshold.
    WentUp,
}

/// One backend's health: its state and its score in `0..=rise+fall-1`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Health {
    state: State,
    score: u32,
    rise: u32,
    fall: u32,
}

impl Health {
    /// The start state: UP on probation, with the score at the failover
    /// threshold (`rise`), so a backend that is dead when checking starts
    /// leaves at its first failed check, and a healthy one never waits.
    /// `rise` and `fall` are at least 1 (the configuration guarantees it).
    pub fn new(rise: u32, fall: u32) -> Self {
        let (rise, fall) = (rise.max(1), fall.max(1));
        Health {
            state: State::Up,
            score: rise,
            rise,
            fall,
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    pub fn is_down(&self) -> bool {
        self.state == State::Down
    }

    pub fn score(&self) -> u32 {
        self.score
    }

    /// Full health: the score an UP backend climbs to and a readmitted one
    /// starts at.
    pub fn top(&self) -> u32 {
        self.rise + self.fall - 1
    }

    /// Between the extremes: UP with failures counted against it, or DOWN
    /// with passes counted for it (checks then run at the fast interval).
    pub fn in_transition(&self) -> bool {
        match self.state {
            State::Up => self.score < self.top(),
            State::Down => self.score > 0,
        }
    }

    /// Folds in one check result.
    pub fn record(&mut self, passed: bool) -> Option<Transition> {
        match (self.state, passed) {
            (State::Up, true) => {
                self.score = (self.score + 1).min(self.top());
                None
            }
            (State::Up, false) => {
                // UP implies score >= rise >= 1.
                self.score -= 1;
                if self.score >= self.rise {
                    return None;
                }
                self.state = State::Down;
                self.score = 0;
                Some(Transition::WentDown)
            }
            (State::Down, false) => {
                self.score = self.score.saturating_sub(1);
                None
            }
            (State::Down, true) => {
                self.score += 1;
                if self.score < self.rise {
                    return None;
                }
                self.state = State::Up;
                self.score = self.top();
                Some(Transition::WentUp)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn feed(h: &mut Health, results: &str) -> Vec<Option<Transition>> {
        results.chars().map(|c| h.record(c == '+')).collect()
    }

    #[test]
    fn starts_up_on_probation_and_one_failure_takes_it_down() {
        let mut h = Health::new(2, 3);
        assert_eq!((h.state(), h.score(), h.top()), (State::Up, 2, 4));
        assert!(h.in_transition());
        assert_eq!(h.record(false), Some(Transition::WentDown));
        assert_eq!((h.state(), h.score()), (State::Down, 0));
        let mut h = Health::new(2, 3);
        feed(&mut h, "++");
        assert_eq!(
            (h.state(), h.score(), h.in_transition()),
            (State::Up, 4, false)
        );
    }

    #[test]
    fn fall_failures_from_full_health_take_it_down() {
        let mut h = Health::new(2, 3);
        feed(&mut h, "+++");
        assert_eq!(feed(&mut h, "--"), [None, None]);
        assert_eq!(h.state(), State::Up);
        assert_eq!(h.record(false), Some(Transition::WentDown));
    }

    #[test]
    fn rise_passes_from_down_bring_it_back_at_full_health() {
        let mut h = Health::new(3, 2);
        feed(&mut h, "-");
        assert_eq!(feed(&mut h, "++"), [None, None]);
        assert!(h.is_down() && h.in_transition());
        assert_eq!(h.record(true), Some(Transition::WentUp));
        assert_eq!((h.state(), h.score()), (State::Up, 4));
        // Freshly readmitted at full health: it takes `fall` failures again.
        assert_eq!(feed(&mut h, "--"), [None, Some(Transition::WentDown)]);
    }

    #[test]
    fn flapping_never_changes_state() {
        let mut up = Health::new(2, 3);
        feed(&mut up, "++");
        let mut down = Health::new(2, 3);
        feed(&mut down, "-");
        for _ in 0..50 {
            assert_eq!(feed(&mut up, "-+"), [None, None]);
            assert_eq!(feed(&mut down, "+-"), [None, None]);
        }
        assert_eq!((up.state(), down.state()), (State::Up, State::Down));
    }

    #[test]
    fn mostly_failing_goes_down_where_consecutive_counters_would_not() {
        // fall = 3 consecutive failures never happen in "--+", yet the
        // backend fails two checks in three: the score takes it down.
        let mut h = Health::new(2, 3);
        feed(&mut h, "++");
        let t = feed(&mut h, "--+--+--+");
        assert!(t.contains(&Some(Transition::WentDown)), "{t:?}");
    }

    #[test]
    fn rise_and_fall_of_one_follow_every_result() {
        let mut h = Health::new(1, 1);
        assert_eq!(
            feed(&mut h, "-+-+"),
            [
                Some(Transition::WentDown),
                Some(Transition::WentUp),
                Some(Transition::WentDown),
                Some(Transition::WentUp)
            ]
        );
    }

    proptest! {
        /// Any result sequence: the score stays in range, the state agrees
        /// with the thresholds, a readmission needs at least `rise` passes
        /// since the backend went DOWN and a failure needs at least `fall`
        /// failures since it came back UP.
        #[test]
        fn thresholds_hold(rise in 1u32..6, fall in 1u32..6, results in proptest::collection::vec(any::<bool>(), 0..200)) {
            let mut h = Health::new(rise, fall);
            let (mut passes, mut fails) = (0u32, 0u32);
            let mut readmitted = false;
            for r in results {
                if r { passes += 1 } else { fails += 1 }
                match h.record(r) {
                    Some(Transition::WentUp) => {
                        prop_assert!(passes >= rise);
                        (passes, fails, readmitted) = (0, 0, true);
                    }
                    Some(Transition::WentDown) => {
                        if readmitted {
                            prop_assert!(fails >= fall);
                        }
                        (passes, fails) = (0, 0);
                    }
                    None => {}
                }
                prop_assert!(h.score() <= h.top());
                if h.state() == State::Up {
                    prop_assert!(h.score() >= rise);
                } else {
                    prop_assert!(h.score() < rise);
                }
            }
        }
    }
}
