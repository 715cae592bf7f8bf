//! The SYN cookie secrets controld publishes in the configuration slot
//! (`ConfigHeader::cookie_secrets`): 128-bit SipHash keys, made from the
//! kernel's random source when controld starts and rotated every
//! [`ROTATION`] (the current one becomes the previous one, which switches
//! still accept, so a cookie in flight survives one rotation). A controld
//! that adopts a region keeps the secret it finds published there as its
//! previous one, for the same reason. No secret is ever stored anywhere
//! else (not in the connection table, not on disk).

use std::io::Read;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use shm_layout::Region;

/// How often the secret changes.
pub const ROTATION: Duration = Duration::from_secs(3600);

/// The secrets and when they last changed.
#[derive(Debug)]
pub struct CookieSecrets {
    current: [u64; 2],
    previous: [u64; 2],
    changed: Instant,
}

/// A fresh 128-bit key from the kernel's random source (never `[0, 0]`,
/// which the switches read as "no secret").
fn random_key() -> std::io::Result<[u64; 2]> {
    let mut b = [0u8; 16];
    loop {
        std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
        let k = [
            u64::from_le_bytes(b[..8].try_into().expect("8 bytes")),
            u64::from_le_bytes(b[8..].try_into().expect("8 bytes")),
        ];
        if k != [0, 0] {
            return Ok(k);
        }
    }
}

impl CookieSecrets {
    /// New secrets: a random current one; the previous one is `adopted`
    /// (the current secret of the region's published configuration, if
    /// any), else none.
    pub fn new(adopted: Option<[u64; 2]>, now: Instant) -> std::io::Result<Self> {
        Ok(Self {
            current: random_key()?,
            previous: adopted.unwrap_or([0, 0]),
            changed: now,
        })
    }

    /// Secrets without a current one (`[0, 0]`), for a controld whose
    /// random source failed: the switches treat every service as without
    /// `syn_proxy` until [`rotate`](Self::rotate) succeeds (it is due at once).
    pub fn none(adopted: Option<[u64; 2]>, now: Instant) -> Self {
        Self {
            current: [0, 0],
            previous: adopted.unwrap_or([0, 0]),
            changed: now.checked_sub(ROTATION).unwrap_or(now),
        }
    }

    /// `[current, previous]`, as the configuration slot holds them.
    pub fn pair(&self) -> [[u64; 2]; 2] {
        [self.current, self.previous]
    }

    /// Whether the secret is due for rotation at `now`.
    pub fn due(&self, now: Instant) -> bool {
        now.duration_since(self.changed) >= ROTATION
    }

    /// Makes a new current secret; the current one becomes the previous one.
    pub fn rotate(&mut self, now: Instant) -> std::io::Result<()> {
        let next = random_key()?;
        if self.current != [0, 0] {
            self.previous = self.current;
        }
        self.current = next;
        self.changed = now;
        Ok(())
    }
}

/// The current cookie secret of `region`'s published configuration, if
/// one was published (a region controld adopts).
pub fn published_secret(region: &Region) -> Option<[u64; 2]> {
    let words = region.pub_words(shm_layout::Table::Config);
    if words.generation.load(Ordering::SeqCst) == 0 {
        return None;
    }
    let active = words.active.load(Ordering::SeqCst) as usize & 1;
    // SAFETY: controld is the only writer of configuration slots, and it
    // is us (a region is adopted only once the previous controld is proven
    // gone, see `crate::takeover`): nothing writes the active slot while we
    // read it.
    let view = unsafe { region.config_view(active) };
    let k = view.header.cookie_secrets[0];
    (k != [0, 0]).then_some(k)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_keeps_the_last_secret_as_previous() {
        let t0 = Instant::now();
        let mut s = CookieSecrets::new(Some([7, 8]), t0).unwrap();
        let [cur, prev] = s.pair();
        assert_eq!(prev, [7, 8]);
        assert_ne!(cur, [0, 0]);
        assert!(!s.due(t0 + ROTATION - Duration::from_secs(1)));
        assert!(s.due(t0 + ROTATION));
        s.rotate(t0 + ROTATION).unwrap();
        let [cur2, prev2] = s.pair();
        assert_eq!(prev2, cur);
        assert_ne!(cur2, cur);
        assert!(!s.due(t0 + ROTATION + Duration::from_secs(1)));
        assert_eq!(CookieSecrets::new(None, t0).unwrap().pair()[1], [0, 0]);
    }
}
