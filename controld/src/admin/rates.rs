//! Rates for `stats`: controld samples the switches' counters and the
//! backends' connection totals once a second (from its main loop); a rate
//! is the difference between the last two samples over the time between
//! them. Pure: samples come in as numbers.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// How often the main loop takes a sample.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// Counters at one instant.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub at: Instant,
    /// Per switch index, every counter word.
    pub switches: Vec<Vec<u64>>,
    /// Total connections per backend id.
    pub backends: HashMap<u32, u64>,
}

/// The last two samples.
#[derive(Clone, Debug, Default)]
pub struct Rates {
    prev: Option<Sample>,
    last: Option<Sample>,
}

/// Per-second rate of a counter that went from `a` to `b` in `secs`
/// (a counter that went back, as after a reset, counts as 0).
pub fn per_second(a: u64, b: u64, secs: f64) -> f64 {
    if secs <= 0.0 {
        return 0.0;
    }
    b.saturating_sub(a) as f64 / secs
}

impl Rates {
    /// Whether the next sample is due at `now`.
    pub fn due(&self, now: Instant) -> bool {
        self.last
            .as_ref()
            .is_none_or(|s| now.duration_since(s.at) >= SAMPLE_EVERY)
    }

    pub fn push(&mut self, s: Sample) {
        self.prev = self.last.take();
        self.last = Some(s);
    }

    /// Seconds between the two samples, once there are two.
    pub fn interval(&self) -> Option<f64> {
        match (&self.prev, &self.last) {
            (Some(p), Some(l)) => Some(l.at.duration_since(p.at).as_secs_f64()),
            _ => None,
        }
    }

    /// Rate of counter word `counter` of switch `switch`.
    pub fn switch_rate(&self, switch: usize, counter: usize) -> Option<f64> {
        let (p, l, dt) = self.pair()?;
        let a = *p.switches.get(switch)?.get(counter)?;
        let b = *l.switches.get(switch)?.get(counter)?;
        Some(per_second(a, b, dt))
    }

    /// New connections per second of a backend id.
    pub fn backend_rate(&self, id: u32) -> Option<f64> {
        let (p, l, dt) = self.pair()?;
        Some(per_second(*p.backends.get(&id)?, *l.backends.get(&id)?, dt))
    }

    fn pair(&self) -> Option<(&Sample, &Sample, f64)> {
        let (p, l) = (self.prev.as_ref()?, self.last.as_ref()?);
        Some((p, l, l.at.duration_since(p.at).as_secs_f64()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_come_from_the_last_two_samples() {
        let t0 = Instant::now();
        let sample = |dt_ms: u64, rx: u64, conns: u64| Sample {
            at: t0 + Duration::from_millis(dt_ms),
            switches: vec![vec![rx, 7]],
            backends: HashMap::from([(3, conns)]),
        };
        let mut r = Rates::default();
        assert!(r.due(t0));
        assert_eq!(r.interval(), None);
        r.push(sample(0, 100, 10));
        assert_eq!(r.switch_rate(0, 0), None, "one sample gives no rate");
        assert!(!r.due(t0 + Duration::from_millis(999)));
        assert!(r.due(t0 + Duration::from_millis(1000)));
        r.push(sample(2000, 700, 30));
        assert_eq!(r.interval(), Some(2.0));
        assert_eq!(r.switch_rate(0, 0), Some(300.0));
        assert_eq!(r.switch_rate(0, 1), Some(0.0));
        assert_eq!(r.backend_rate(3), Some(10.0));
        assert_eq!(r.switch_rate(1, 0), None, "no such switch");
        assert_eq!(r.backend_rate(4), None, "no such backend");
        // The oldest sample goes; a counter that went back is a rate of 0.
        r.push(sample(2500, 600, 31));
        assert_eq!(r.interval(), Some(0.5));
        assert_eq!(r.switch_rate(0, 0), Some(0.0));
        assert_eq!(r.backend_rate(3), Some(2.0));
    }
}
