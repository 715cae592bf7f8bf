//! Stable backend ids.
//!
//! A backend keeps its id across configuration generations for as long as
//! it is configured, and after it leaves, for as long as connections may
//! still reference it (its active count in the region is non-zero). Ids
//! index the shared backend counters, so reusing one early would misattribute
//! connections.

use std::collections::HashMap;
use std::net::Ipv4Addr;

/// What identifies a backend across reloads: its service's (VIP, port,
/// protocol) and its own address and port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BackendIdentity {
    pub vip: Ipv4Addr,
    pub vport: u16,
    pub proto: u8,
    pub addr: Ipv4Addr,
    pub port: u16,
}

impl BackendIdentity {
    /// The identity of backend `b` of service `s`.
    pub fn of(s: &crate::config::Service, b: &crate::config::Backend) -> Self {
        BackendIdentity {
            vip: s.vip,
            vport: s.port,
            proto: s.protocol.number(),
            addr: b.address,
            port: b.port,
        }
    }
}

/// Why backends could not get ids.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("no free backend id: all {capacity} ids are in use or still referenced by connections")]
    Exhausted { capacity: u32 },
}

#[derive(Debug)]
pub struct IdAllocator {
    capacity: u32,
    live: HashMap<BackendIdentity, u32>,
    /// Ids of backends no longer configured, waiting for their connections to end.
    retired: Vec<u32>,
    free: Vec<u32>,
}

impl IdAllocator {
    pub fn new(capacity: u32) -> Self {
        Self {
            capacity,
            live: HashMap::new(),
            retired: Vec::new(),
            free: (0..capacity).rev().collect(),
        }
    }

    /// The allocator of a controld that adopts a live region: the backends
    /// the region's configuration names keep their ids (so its connections
    /// and counters stay theirs), ids that only connections still reference
    /// (`active` non-zero) wait as retired, and the rest are free.
    pub fn adopt(
        capacity: u32,
        published: &[(BackendIdentity, u32)],
        active: impl Fn(u32) -> u32,
    ) -> Self {
        let live: HashMap<BackendIdentity, u32> = published
            .iter()
            .filter(|(_, id)| *id < capacity)
            .copied()
            .collect();
        let named: std::collections::HashSet<u32> = live.values().copied().collect();
        let (retired, free) = (0..capacity)
            .rev()
            .filter(|id| !named.contains(id))
            .partition(|&id| active(id) != 0);
        Self {
            capacity,
            live,
            retired,
            free,
        }
    }

    /// Assigns ids for a new configuration's backends: existing identities
    /// keep theirs, new ones get fresh ids, departed ones are retired.
    pub fn assign(&mut self, wanted: &[BackendIdentity]) -> Result<Vec<u32>, IdError> {
        // Work on a copy so a failed assignment changes nothing.
        let mut free = self.free.clone();
        let mut next: HashMap<BackendIdentity, u32> = HashMap::new();
        let mut out = Vec::with_capacity(wanted.len());
        for w in wanted {
            let id = match self.live.get(w).or_else(|| next.get(w)) {
                Some(&id) => id,
                // A returning backend simply gets a fresh id.
                None => free.pop().ok_or(IdError::Exhausted {
                    capacity: self.capacity,
                })?,
            };
            next.insert(*w, id);
            out.push(id);
        }
        for (ident, id) in self.live.drain() {
            if !next.contains_key(&ident) {
                self.retired.push(id);
            }
        }
        self.live = next;
        self.free = free;
        Ok(out)
    }

    /// Frees retired ids whose active connection count is zero; returns
    /// them (their shared counters should start from zero when reused).
    pub fn release_idle(&mut self, active: impl Fn(u32) -> u32) -> Vec<u32> {
        let (idle, busy): (Vec<u32>, Vec<u32>) =
            self.retired.drain(..).partition(|&id| active(id) == 0);
        self.retired = busy;
        self.free.extend(&idle);
        idle
    }

    /// The id of a configured backend.
    pub fn id_of(&self, b: &BackendIdentity) -> Option<u32> {
        self.live.get(b).copied()
    }

    pub fn retired(&self) -> &[u32] {
        &self.retired
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ident(last: u8) -> BackendIdentity {
        BackendIdentity {
            vip: Ipv4Addr::new(198, 18, 0, 10),
            vport: 80,
            proto: 6,
            addr: Ipv4Addr::new(198, 19, 1, last),
            port: 8080,
        }
    }

    #[test]
    fn an_adopted_allocator_keeps_published_ids_and_waits_for_referenced_ones() {
        let mut a = IdAllocator::adopt(8, &[(ident(1), 5), (ident(2), 0)], |id| {
            u32::from(id == 3 || id == 5)
        });
        assert_eq!(a.id_of(&ident(1)), Some(5));
        assert_eq!(a.retired(), &[3]);
        // The same backends keep their ids; a new one never gets 0, 3 or 5.
        let ids = a.assign(&[ident(2), ident(1), ident(9)]).unwrap();
        assert_eq!(ids[..2], [0, 5]);
        assert!(![0, 3, 5].contains(&ids[2]), "{ids:?}");
        // Once its connections end, 3 is free again.
        assert_eq!(a.release_idle(|_| 0), vec![3]);
    }

    #[test]
    fn ids_are_stable_and_not_reused_while_referenced() {
        let mut a = IdAllocator::new(4);
        let first = a.assign(&[ident(1), ident(2), ident(3)]).unwrap();
        let second = a.assign(&[ident(3), ident(1)]).unwrap();
        assert_eq!(second, vec![first[2], first[0]]);
        assert_eq!(a.retired(), &[first[1]]);
        // ident(2)'s id still has connections: a newcomer must not get it.
        let third = a.assign(&[ident(3), ident(1), ident(4)]).unwrap();
        assert!(!third.contains(&first[1]));
        assert_eq!(
            a.release_idle(|id| if id == first[1] { 1 } else { 0 }),
            Vec::<u32>::new()
        );
        assert_eq!(a.release_idle(|_| 0), [first[1]]);
        assert!(
            a.assign(&[ident(3), ident(1), ident(4), ident(5), ident(6)])
                .is_err()
        );
    }
}
