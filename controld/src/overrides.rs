//! Runtime overrides: what an operator changed with lbctl (`drain`,
//! `enable`, `weight`) on top of the configuration file. Pure: no I/O.
//!
//! The rule:
//! - An override belongs to a backend named `service/backend`. `drain`
//!   stops new connections to it (its existing ones continue), `enable`
//!   undoes `drain`, `weight N` replaces the file's weight, `weight reset`
//!   returns to the file's weight. An override that no longer changes
//!   anything is forgotten.
//! - The master applies the overrides when it builds a snapshot: a drained
//!   backend's effective weight is 0, otherwise its weight is the override's
//!   or the file's. Health (when checked) comes on top: a DOWN backend gets
//!   no new connections whatever its overrides say.
//! - A reload keeps the override of every backend that is still configured
//!   under the same service and backend names (even if its address, port or
//!   file weight changed: the operator's decision outlives an edit of the
//!   file) and drops the others; both are logged. To let the file decide
//!   again, `enable` and `weight reset` the backend.
//! - A controld that adopts the region of a crashed one restores them
//!   (saved beside the admin socket, `crate::appliance::saved`) under the
//!   reload rule; a clean stop or a fresh region forgets them.

use std::collections::BTreeMap;

use crate::config::Config;

/// What an operator changed on one backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Override {
    /// `drain`: no new connections.
    pub drained: bool,
    /// `weight N`: replaces the file's weight.
    pub weight: Option<u32>,
}

impl Override {
    fn is_noop(&self) -> bool {
        !self.drained && self.weight.is_none()
    }
}

impl std::fmt::Display for Override {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.drained, self.weight) {
            (true, Some(w)) => write!(f, "drained, weight {w}"),
            (true, None) => write!(f, "drained"),
            (false, Some(w)) => write!(f, "weight {w}"),
            (false, None) => write!(f, "none"),
        }
    }
}

/// A backend's weight as the master uses it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Effective {
    /// The weight its service's table is built with (0: no new connections).
    pub weight: u32,
    /// Drained by an operator.
    pub drained: bool,
}

/// The overrides of one controld, keyed by (service, backend) name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Overrides {
    map: BTreeMap<(String, String), Override>,
}

/// What a reload did to the overrides (for the log and the reply).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Carried {
    /// `service/backend` and its override, still configured: kept.
    pub kept: Vec<(String, Override)>,
    /// `service/backend` and its override, no longer configured: dropped.
    pub dropped: Vec<(String, Override)>,
}

impl Overrides {
    /// The override of a backend, if any.
    pub fn get(&self, service: &str, backend: &str) -> Option<Override> {
        self.map
            .get(&(service.to_string(), backend.to_string()))
            .copied()
    }

    /// All overrides as `(service, backend, override)`, sorted by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str, Override)> {
        self.map
            .iter()
            .map(|((s, b), o)| (s.as_str(), b.as_str(), *o))
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    fn update(&mut self, service: &str, backend: &str, f: impl FnOnce(&mut Override)) {
        let key = (service.to_string(), backend.to_string());
        let mut o = self.map.get(&key).copied().unwrap_or_default();
        f(&mut o);
        if o.is_noop() {
            self.map.remove(&key);
        } else {
            self.map.insert(key, o);
        }
    }

    /// `drain`: no new connections for this backend.
    pub fn drain(&mut self, service: &str, backend: &str) {
        self.update(service, backend, |o| o.drained = true);
    }

    /// `enable`: undoes `drain` (a weight override stays).
    pub fn enable(&mut self, service: &str, backend: &str) {
        self.update(service, backend, |o| o.drained = false);
    }

    /// `weight N` (`Some`) or `weight reset` (`None`).
    pub fn set_weight(&mut self, service: &str, backend: &str, weight: Option<u32>) {
        self.update(service, backend, |o| o.weight = weight);
    }

    /// The weight the master builds the table with, given the file's.
    pub fn effective(&self, service: &str, backend: &str, file_weight: u32) -> Effective {
        let o = self.get(service, backend).unwrap_or_default();
        Effective {
            weight: if o.drained {
                0
            } else {
                o.weight.unwrap_or(file_weight)
            },
            drained: o.drained,
        }
    }

    /// Applies the reload rule for a new configuration: keeps the overrides
    /// of backends it still has (by service and backend name), drops the rest.
    pub fn carry_over(&mut self, new: &Config) -> Carried {
        let mut out = Carried::default();
        self.map.retain(|(s, b), o| {
            let exists = new
                .services
                .iter()
                .any(|svc| svc.name == *s && svc.backends.iter().any(|be| be.name == *b));
            let entry = (format!("{s}/{b}"), *o);
            if exists {
                out.kept.push(entry);
            } else {
                out.dropped.push(entry);
            }
            exists
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(backends: &[(&str, &[&str])]) -> Config {
        let mut text = String::from(
            "instance = \"t\"\n[[port]]\nname = \"p\"\ndriver = \"vnic\"\nmac = \"02:00:00:00:00:01\"\n\
             [[switch]]\nname = \"s\"\ncpu = 0\nports = [\"p\"]\n",
        );
        for (i, (svc, names)) in backends.iter().enumerate() {
            text += &format!(
                "[[service]]\nname = \"{svc}\"\nvip = \"198.18.0.10\"\nport = {}\nprotocol = \"tcp\"\n",
                80 + i
            );
            for (j, b) in names.iter().enumerate() {
                text += &format!(
                    "[[service.backend]]\nname = \"{b}\"\naddress = \"198.19.1.{}\"\n",
                    j + 1
                );
            }
        }
        crate::config::parse(&text).unwrap()
    }

    #[test]
    fn drain_enable_and_weight_combine_and_noops_are_forgotten() {
        let mut o = Overrides::default();
        assert_eq!(
            o.effective("web", "a", 3),
            Effective {
                weight: 3,
                drained: false
            }
        );
        o.set_weight("web", "a", Some(7));
        assert_eq!(o.effective("web", "a", 3).weight, 7);
        o.drain("web", "a");
        assert_eq!(
            o.effective("web", "a", 3),
            Effective {
                weight: 0,
                drained: true
            }
        );
        assert_eq!(
            o.get("web", "a"),
            Some(Override {
                drained: true,
                weight: Some(7)
            })
        );
        // enable keeps the weight override.
        o.enable("web", "a");
        assert_eq!(o.effective("web", "a", 3).weight, 7);
        o.set_weight("web", "a", None);
        assert!(
            o.is_empty(),
            "an override that changes nothing is forgotten"
        );
        assert_eq!(o.effective("web", "a", 3).weight, 3);
        // Weight 0 by override: no new connections, but not "drained".
        o.set_weight("web", "b", Some(0));
        assert_eq!(
            o.effective("web", "b", 3),
            Effective {
                weight: 0,
                drained: false
            }
        );
        // Other backends are untouched.
        assert_eq!(o.effective("web", "c", 2).weight, 2);
        assert_eq!(o.effective("dns", "b", 2).weight, 2);
        o.enable("web", "z");
        assert_eq!(o.get("web", "z"), None);
    }

    #[test]
    fn reload_keeps_overrides_of_backends_still_named_and_drops_the_rest() {
        let mut o = Overrides::default();
        o.drain("web", "a");
        o.set_weight("web", "b", Some(5));
        o.drain("dns", "a");
        o.set_weight("old", "x", Some(2));
        // web/b left its service; dns/a now lives in another service only.
        let carried = o.carry_over(&config(&[("web", &["a", "c"]), ("dns2", &["a"])]));
        assert_eq!(
            carried.kept,
            vec![(
                "web/a".to_string(),
                Override {
                    drained: true,
                    weight: None
                }
            )]
        );
        let dropped: Vec<&str> = carried.dropped.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(dropped, ["dns/a", "old/x", "web/b"]);
        assert_eq!(o.iter().count(), 1);
        assert!(o.get("web", "a").unwrap().drained);
        // A backend that comes back later starts from the file.
        o.carry_over(&config(&[("web", &["a", "b"])]));
        assert_eq!(o.effective("web", "b", 1).weight, 1);
    }
}
