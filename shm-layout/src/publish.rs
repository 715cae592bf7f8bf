//! A/B publication of the configuration and routing tables (DESIGN.md §2).
//!
//! Writer (controld, the single writer of both tables):
//! 1. wait until every live switch acknowledges the current generation
//!    (`seen_* == generation`), so no switch still reads the inactive slot;
//!    a switch that does not within the deadline is excluded, and **fenced**
//!    before anything is written: the writer's fencing callback returns
//!    true only once that process can no longer touch the region (controld
//!    kills it and waits until it is gone). If any excluded switch cannot
//!    be fenced, nothing is written and the publication fails
//!    ([`PublishError::Unfenced`]): a stalled switch may still be inside a
//!    burst that reads the inactive slot, and a rewrite under it would
//!    hand that burst half-written tables when it resumes;
//! 2. write the inactive slot: stamp 0 first, then contents and checksum,
//!    then the new generation as its stamp (Release);
//! 3. store `active` = that slot, then `generation` (both SeqCst).
//!
//! Reader (switchd), per burst: [`Region::begin_read`] loads `active` (SeqCst)
//! and the slot's stamp (Acquire); it uses the slot only if the stamp is not
//! 0 (0: never published, or being written) and, once per generation, the
//! checksum matches ([`SlotCheck`]). At the end [`Region::end_read`] re-checks
//! the stamp after an Acquire fence (a seqlock: a changed stamp means the
//! burst saw a slot being rewritten, which acknowledgement plus fencing
//! prevents: a switch either acknowledges in time or is gone before the
//! rewrite) and stores the stamp as its acknowledgement (Release).
//!
//! A switch marks itself RUNNING (SeqCst) before its first `begin_read`, so a
//! writer that did not see it RUNNING published before the switch's first
//! load of `active`, and the switch reads the newest slot.

use core::sync::atomic::{Ordering, fence};
use std::time::{Duration, Instant};

use crate::config_slot::ConfigSlotMut;
use crate::header::{PubWords, Section};
use crate::region::Region;
use crate::routing_slot::RoutingSlotMut;
use crate::switch_slot::{SW_RUNNING, SW_STOPPED, SwitchSlot};

/// Which published table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Table {
    Config,
    Routing,
}

impl Table {
    /// "configuration" or "routing", for messages.
    pub fn name(self) -> &'static str {
        match self {
            Table::Config => "configuration",
            Table::Routing => "routing",
        }
    }

    fn seen(self, s: &SwitchSlot) -> u64 {
        match self {
            Table::Config => s.seen_config.load(Ordering::Acquire),
            Table::Routing => s.seen_routing.load(Ordering::Acquire),
        }
    }

    fn section(self, ab: usize) -> Section {
        match (self, ab & 1) {
            (Table::Config, 0) => Section::ConfigA,
            (Table::Config, _) => Section::ConfigB,
            (Table::Routing, 0) => Section::RoutingA,
            (Table::Routing, _) => Section::RoutingB,
        }
    }
}

/// A switch the writer stopped waiting for, and fenced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Excluded {
    pub switch: usize,
    pub pid: u32,
    /// The generation it had acknowledged last.
    pub seen: u64,
}

/// What a publication did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublishReport {
    pub generation: u64,
    pub slot: usize,
    pub waited: Duration,
    /// Switches excluded for not acknowledging in time; every one was
    /// fenced before the slot was written.
    pub excluded: Vec<Excluded>,
}

/// Why a publication wrote nothing.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    #[error(
        "switch {switch} (pid {pid}) did not acknowledge {} generation {generation} within {timeout:?} \
         and could not be fenced: generation {} not written, since the slot it may still read would be rewritten{}",
        table.name(),
        generation + 1,
        if fenced.is_empty() { String::new() } else {
            format!(" (fenced meanwhile: {})", fenced.iter()
                .map(|e| format!("switch {} pid {}", e.switch, e.pid))
                .collect::<Vec<_>>().join(", "))
        }
    )]
    Unfenced {
        table: Table,
        /// The generation every switch was to acknowledge (still current).
        generation: u64,
        timeout: Duration,
        switch: usize,
        pid: u32,
        /// Switches of the same wait that were fenced before this one.
        fenced: Vec<Excluded>,
    },
}

/// A fencing callback for a writer that can stop no process (tests,
/// fixtures, tools): an excluded switch makes the publication fail.
pub fn cannot_fence(_switch: usize, _pid: u32) -> bool {
    false
}

/// A reader's verdict on the slots it uses, kept across bursts so the
/// checksum of a slot is computed once per generation it sees (a pass over
/// the whole slot, about a millisecond for a few MiB: far too slow for
/// every burst), not per burst.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotCheck {
    stamp: u64,
    ok: bool,
}

impl SlotCheck {
    /// Whether the slot of `tok` may be used: published (stamp not 0: 0 is
    /// a slot never published or being written) and its checksum matching
    /// its contents. Verifies when the stamp differs from the last one
    /// checked, and then adds one to `bad` if the checksum is wrong.
    ///
    /// # Safety
    /// Verifying reads the slot: call it only as a switch, between
    /// `begin_read` (which gave `tok`) and `end_read`, under the rule of
    /// [`Region::config_view`].
    #[inline]
    pub unsafe fn usable(
        &mut self,
        region: &Region,
        t: Table,
        tok: ReadToken,
        bad: &mut u64,
    ) -> bool {
        if tok.stamp != self.stamp {
            // SAFETY: the caller's contract.
            *self = unsafe { Self::verify(region, t, tok) };
            *bad += (tok.stamp != 0 && !self.ok) as u64;
        }
        self.ok
    }

    /// # Safety
    /// As for [`SlotCheck::usable`].
    #[cold]
    #[inline(never)]
    unsafe fn verify(region: &Region, t: Table, tok: ReadToken) -> Self {
        Self {
            stamp: tok.stamp,
            // SAFETY: the caller's contract.
            ok: tok.stamp != 0 && unsafe { region.verify_slot(t, tok.slot) },
        }
    }
}

/// A reader's hold on one slot for one burst.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadToken {
    pub slot: usize,
    pub stamp: u64,
}

impl Region {
    pub fn pub_words(&self, t: Table) -> &PubWords {
        match t {
            Table::Config => &self.header().config,
            Table::Routing => &self.header().routing,
        }
    }

    /// Current generation of a table (0 = never published).
    pub fn generation(&self, t: Table) -> u64 {
        self.pub_words(t).generation.load(Ordering::Acquire)
    }

    /// The stamp (seqlock word) of slot `ab` of a table: 0 while the slot
    /// is written, its generation once complete.
    #[inline]
    pub fn slot_stamp(&self, t: Table, ab: usize) -> &core::sync::atomic::AtomicU64 {
        // Only the header: a whole view would bounds-check every array of
        // the slot, twice per table per poll loop.
        match t {
            Table::Config => &self.config_header(ab).stamp,
            Table::Routing => &self.routing_header(ab).stamp,
        }
    }

    /// Reader: start of a burst.
    #[inline]
    pub fn begin_read(&self, t: Table) -> ReadToken {
        let slot = self.pub_words(t).active.load(Ordering::SeqCst) as usize & 1;
        let stamp = self.slot_stamp(t, slot).load(Ordering::Acquire);
        ReadToken { slot, stamp }
    }

    /// Reader: end of a burst. Returns false if the slot changed under the
    /// burst (torn). Acknowledges the generation read into `me`.
    #[inline]
    pub fn end_read(&self, t: Table, tok: ReadToken, me: &SwitchSlot) -> bool {
        fence(Ordering::Acquire);
        let now = self.slot_stamp(t, tok.slot).load(Ordering::Relaxed);
        // Stamp 0 means nothing was published when the burst began, so the
        // reader used no slot content (the first publication may fill the
        // slot it pointed at meanwhile): nothing to tear.
        let ok = tok.stamp == 0 || now == tok.stamp;
        let seen = match t {
            Table::Config => &me.seen_config,
            Table::Routing => &me.seen_routing,
        };
        seen.store(tok.stamp, Ordering::Release);
        ok
    }

    /// Writer: waits for acknowledgements (at most `ack_timeout`), fences
    /// every switch that did not acknowledge (see the module doc; `fence`
    /// gets the switch's index and pid and must return true only once that
    /// process can no longer touch the region), fills the inactive
    /// configuration slot with `fill`, and makes it active. Writes nothing
    /// if a switch could not be fenced.
    pub fn publish_config(
        &self,
        ack_timeout: Duration,
        fence: &mut dyn FnMut(usize, u32) -> bool,
        fill: impl FnOnce(&mut ConfigSlotMut<'_>),
    ) -> Result<PublishReport, PublishError> {
        self.publish(Table::Config, ack_timeout, fence, |ab| {
            // SAFETY: we are the single publisher (controld holds the only
            // writable Region that publishes), and `publish` calls us only for
            // the inactive slot after every live switch acknowledged or was
            // fenced; no other reference into the slot is alive meanwhile.
            let mut slot = unsafe { self.config_slot_mut(ab) };
            fill(&mut slot);
            // Derived from the services just written, whoever wrote them.
            slot.build_indexes();
        })
    }

    /// Writer: as [`Region::publish_config`] for the routing table.
    pub fn publish_routing(
        &self,
        ack_timeout: Duration,
        fence: &mut dyn FnMut(usize, u32) -> bool,
        fill: impl FnOnce(&mut RoutingSlotMut<'_>),
    ) -> Result<PublishReport, PublishError> {
        self.publish(Table::Routing, ack_timeout, fence, |ab| {
            // SAFETY: as in `publish_config`.
            let mut slot = unsafe { self.routing_slot_mut(ab) };
            fill(&mut slot);
        })
    }

    /// Switches that are live and have not acknowledged `g`.
    pub fn pending_acks(&self, t: Table, g: u64) -> Vec<usize> {
        self.switch_slots()
            .iter()
            .enumerate()
            .filter(|(_, s)| s.is_live() && t.seen(s) != g)
            .map(|(i, _)| i)
            .collect()
    }

    fn publish(
        &self,
        t: Table,
        ack_timeout: Duration,
        fence_switch: &mut dyn FnMut(usize, u32) -> bool,
        write: impl FnOnce(usize),
    ) -> Result<PublishReport, PublishError> {
        let words = self.pub_words(t);
        let g = words.generation.load(Ordering::SeqCst);
        let start = Instant::now();
        let mut excluded = Vec::new();
        let mut nap = Duration::from_micros(20);
        loop {
            let pending = self.pending_acks(t, g);
            if pending.is_empty() {
                break;
            }
            if start.elapsed() >= ack_timeout {
                for i in pending {
                    let s = &self.switch_slots()[i];
                    let pid = s.pid.load(Ordering::Relaxed);
                    let seen = t.seen(s);
                    if !fence_switch(i, pid) {
                        words.refused.fetch_add(1, Ordering::Relaxed);
                        return Err(PublishError::Unfenced {
                            table: t,
                            generation: g,
                            timeout: ack_timeout,
                            switch: i,
                            pid,
                            fenced: excluded,
                        });
                    }
                    // Gone: not waited for again (the supervisor, which
                    // reaps and restarts it, stores STOPPED as well).
                    let _ = s.state.compare_exchange(
                        SW_RUNNING,
                        SW_STOPPED,
                        Ordering::SeqCst,
                        Ordering::SeqCst,
                    );
                    s.fenced.fetch_add(1, Ordering::Relaxed);
                    words.excluded.fetch_add(1, Ordering::Relaxed);
                    excluded.push(Excluded {
                        switch: i,
                        pid,
                        seen,
                    });
                }
                break;
            }
            std::thread::sleep(nap);
            nap = (nap * 2).min(Duration::from_millis(1));
        }
        let waited = start.elapsed();
        let active = words.active.load(Ordering::SeqCst) as usize & 1;
        let slot = if g == 0 { 0 } else { active ^ 1 };
        // Each access to the stamp borrows it anew: no reference into the
        // slot's header may live across the `&mut` views `write` and
        // `write_checksum` make of the whole slot, header included.
        self.slot_stamp(t, slot).store(0, Ordering::Relaxed);
        // Make the zero stamp visible before any content store.
        fence(Ordering::Release);
        write(slot);
        let sum = self.slot_checksum(t.section(slot));
        self.write_checksum(t, slot, sum);
        self.slot_stamp(t, slot).store(g + 1, Ordering::Release);
        words.active.store(slot as u32, Ordering::SeqCst);
        words.generation.store(g + 1, Ordering::SeqCst);
        Ok(PublishReport {
            generation: g + 1,
            slot,
            waited,
            excluded,
        })
    }

    fn write_checksum(&self, t: Table, ab: usize, sum: u64) {
        match t {
            // SAFETY: still inside `publish`, which owns the inactive slot
            // and holds no other reference into it.
            Table::Config => unsafe { self.config_slot_mut(ab) }.header.checksum = sum,
            // SAFETY: as above.
            Table::Routing => unsafe { self.routing_slot_mut(ab) }.header.checksum = sum,
        }
    }

    /// Whether a slot's stored checksum matches its contents.
    ///
    /// # Safety
    /// Reads the slot in place: the rule of [`Region::config_view`] applies
    /// (tools: [`SlotCopy::checksum_ok`](crate::region::SlotCopy::checksum_ok)).
    pub unsafe fn verify_slot(&self, t: Table, ab: usize) -> bool {
        let stored = match t {
            Table::Config => self.config_header(ab).checksum,
            Table::Routing => self.routing_header(ab).checksum,
        };
        stored == self.slot_checksum(t.section(ab))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::region::tests::temp;
    use crate::switch_slot::SW_RUNNING;
    use std::sync::atomic::AtomicBool;

    #[test]
    fn first_publication_is_generation_one() {
        let t = temp("pub1");
        let r = &t.0;
        assert_eq!(r.generation(Table::Config), 0);
        let rep = r
            .publish_config(Duration::from_millis(100), &mut cannot_fence, |s| {
                s.header.n_services = 3;
            })
            .unwrap();
        assert_eq!(rep.generation, 1);
        assert!(rep.excluded.is_empty());
        let tok = r.begin_read(Table::Config);
        assert_eq!(tok.stamp, 1);
        let copy = r.config_copy();
        assert_eq!((copy.slot, copy.stamp), (tok.slot, 1));
        assert_eq!(copy.config().header.n_services, 3);
        assert!(copy.checksum_ok());
        // SAFETY: this thread is the only publisher, between publications.
        assert!(unsafe { r.verify_slot(Table::Config, tok.slot) });
    }

    /// The VIP and service indexes answer as a scan of the services would,
    /// for every published service and for near misses, and forget the
    /// services a later publication dropped.
    #[test]
    fn indexes_answer_as_a_scan_of_the_services_does() {
        use crate::config_slot::ServiceRec;
        use crate::header::Capacities;
        let inst = format!("t-index-{}", std::process::id());
        let caps = Capacities {
            services: 300,
            ..crate::region::tests::small_caps()
        };
        let t = crate::region::tests::TempRegion(
            Region::create(&inst, caps).unwrap(),
            crate::region::region_name(&inst),
        );
        let r = &t.0;
        // 300 services over 100 VIPs, 3 ports each, TCP and UDP mixed; the
        // last one repeats an earlier key (the earlier one must win).
        let svc = |i: u32| ServiceRec {
            vip: 0xc612_0800 + i / 3,
            port: 80 + (i % 3) as u16,
            proto: if i.is_multiple_of(2) { 6 } else { 17 },
            ..Default::default()
        };
        let publish = |n: u32| {
            r.publish_config(Duration::from_millis(100), &mut cannot_fence, |s| {
                s.header.n_services = n;
                for i in 0..n {
                    s.services[i as usize] = svc(i);
                }
                if n == 300 {
                    s.services[299] = svc(5);
                }
            })
            .unwrap();
            r.config_copy()
        };
        let scan_vip = |v: &crate::config_slot::ConfigView<'_>, ip: u32| {
            v.services().iter().any(|s| s.vip == ip)
        };
        let scan = |v: &crate::config_slot::ConfigView<'_>, ip: u32, port: u16, proto: u8| {
            v.services()
                .iter()
                .position(|s| s.vip == ip && s.port == port && s.proto == proto)
        };
        for n in [300, 40] {
            let copy = publish(n);
            let v = copy.config();
            let mut found = 0;
            for ip in 0xc612_07f0..0xc612_0900u32 {
                assert_eq!(v.is_vip(ip), scan_vip(&v, ip), "n {n} vip {ip:#x}");
                for port in 79..84 {
                    for proto in [6, 17, 1] {
                        let got = v.find_service(ip, port, proto).map(|(i, _)| i);
                        assert_eq!(
                            got,
                            scan(&v, ip, port, proto),
                            "n {n} {ip:#x}:{port}/{proto}"
                        );
                        found += got.is_some() as u32;
                    }
                }
            }
            assert_eq!(found, if n == 300 { 299 } else { 40 }, "n {n}");
        }
    }

    /// A reader thread that acknowledges like a switch, checking each burst
    /// sees a consistent slot (every word equals the generation stamp).
    #[test]
    fn readers_never_see_a_torn_slot() {
        let t = temp("pubtorn");
        let r = &t.0;
        let me = &r.switch_slots()[0];
        me.pid.store(std::process::id(), Ordering::Relaxed);
        me.proc_start.store(
            crate::time::process_start(std::process::id()).unwrap(),
            Ordering::Relaxed,
        );
        me.state.store(SW_RUNNING, Ordering::SeqCst);
        let stop = AtomicBool::new(false);
        let torn = std::sync::atomic::AtomicU64::new(0);
        let bursts = std::sync::atomic::AtomicU64::new(0);
        std::thread::scope(|sc| {
            sc.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    let tok = r.begin_read(Table::Config);
                    // SAFETY: this thread is a switch: RUNNING before its
                    // first begin_read, reads between begin_read and
                    // end_read, acknowledges; the publisher waits for it.
                    let v = unsafe { r.config_view(tok.slot) };
                    if tok.stamp != 0 {
                        let want = tok.stamp as u32;
                        let bad =
                            v.services.iter().any(|s| s.vip != want) || v.header.n_backends != want;
                        if bad {
                            torn.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    if !r.end_read(Table::Config, tok, me) {
                        torn.fetch_add(1, Ordering::Relaxed);
                    }
                    bursts.fetch_add(1, Ordering::Relaxed);
                }
            });
            for _ in 0..300 {
                let g = r.generation(Table::Config) + 1;
                let rep = r
                    .publish_config(Duration::from_secs(5), &mut cannot_fence, |s| {
                        for svc in s.services.iter_mut() {
                            svc.vip = g as u32;
                        }
                        s.header.n_backends = g as u32;
                    })
                    .unwrap();
                assert!(rep.excluded.is_empty());
            }
            stop.store(true, Ordering::Relaxed);
        });
        assert_eq!(torn.load(Ordering::Relaxed), 0);
        assert!(bursts.load(Ordering::Relaxed) > 0);
        assert_eq!(r.generation(Table::Config), 300);
    }

    /// A reader outside the protocol (a tool: nobody waits for it) copies
    /// the active slot while the publisher rewrites slots as fast as it
    /// can: every copy it gets is whole (every word of the generation its
    /// stamp names, checksum matching), or empty.
    #[test]
    fn copies_are_whole_however_the_publisher_runs() {
        let t = temp("pubcopy");
        let r = &t.0;
        let stop = AtomicBool::new(false);
        let (whole, empty) = (
            std::sync::atomic::AtomicU64::new(0),
            std::sync::atomic::AtomicU64::new(0),
        );
        std::thread::scope(|sc| {
            sc.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    let copy = r.config_copy();
                    if copy.stamp == 0 {
                        empty.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    let v = copy.config();
                    let want = copy.stamp as u32;
                    assert!(v.services.iter().all(|s| s.vip == want));
                    assert_eq!(v.header.n_backends, want);
                    assert!(copy.checksum_ok());
                    whole.fetch_add(1, Ordering::Relaxed);
                }
            });
            // Until the reader has its copies (bounded in count).
            while whole.load(Ordering::Relaxed) < 100 && r.generation(Table::Config) < 1_000_000 {
                let g = r.generation(Table::Config) + 1;
                r.publish_config(Duration::from_secs(5), &mut cannot_fence, |s| {
                    for svc in s.services.iter_mut() {
                        svc.vip = g as u32;
                    }
                    s.header.n_backends = g as u32;
                })
                .unwrap();
            }
            stop.store(true, Ordering::Relaxed);
        });
        assert!(whole.load(Ordering::Relaxed) >= 100);
        let copy = r.config_copy();
        assert_eq!(copy.stamp, r.generation(Table::Config));
        assert!(copy.checksum_ok());
    }

    /// A switch that never acknowledges is fenced before the slot is
    /// written (the slot is as it was when the fence runs), then marked
    /// stopped and counted; the next publication does not wait for it.
    #[test]
    fn stalled_switch_is_fenced_before_the_slot_is_written() {
        let t = temp("pubstall");
        let r = &t.0;
        r.publish_config(Duration::from_millis(10), &mut cannot_fence, |s| {
            s.header.n_services = 1;
        })
        .unwrap();
        r.publish_config(Duration::from_millis(10), &mut cannot_fence, |s| {
            s.header.n_services = 2;
        })
        .unwrap();
        let s = &r.switch_slots()[2];
        let pid = std::process::id();
        s.pid.store(pid, Ordering::Relaxed);
        s.proc_start
            .store(crate::time::process_start(pid).unwrap(), Ordering::Relaxed);
        s.state.store(SW_RUNNING, Ordering::SeqCst);
        // Acknowledged generation 1, read slot A ever since: generation 3
        // would rewrite it.
        s.seen_config.store(1, Ordering::Release);
        let mut calls = Vec::new();
        let rep = r
            .publish_config(
                Duration::from_millis(30),
                &mut |i, p| {
                    // Nothing of the slot the switch reads is touched yet.
                    assert_eq!(r.begin_read(Table::Config).stamp, 2);
                    assert_eq!(r.config_header(0).stamp.load(Ordering::Relaxed), 1);
                    assert_eq!(r.config_header(0).n_services, 1);
                    calls.push((i, p));
                    true
                },
                |s| s.header.n_services = 3,
            )
            .unwrap();
        assert_eq!(calls, [(2, pid)]);
        assert_eq!((rep.generation, rep.slot), (3, 0));
        assert_eq!(
            rep.excluded,
            [Excluded {
                switch: 2,
                pid,
                seen: 1
            }]
        );
        assert_eq!(s.state.load(Ordering::SeqCst), SW_STOPPED);
        assert_eq!(s.fenced.load(Ordering::Relaxed), 1);
        let words = r.pub_words(Table::Config);
        assert_eq!(words.excluded.load(Ordering::Relaxed), 1);
        assert_eq!(words.refused.load(Ordering::Relaxed), 0);
        // Fenced: not waited for, not fenced again.
        let rep = r
            .publish_config(
                Duration::from_millis(30),
                &mut |i, p| panic!("switch {i} pid {p} fenced twice"),
                |_| {},
            )
            .unwrap();
        assert!(rep.excluded.is_empty());
        assert_eq!(rep.generation, 4);
    }

    /// A stalled switch that cannot be fenced blocks the publication:
    /// nothing is written, the generation stays, and the error names it.
    #[test]
    fn unfenceable_switch_blocks_the_publication() {
        let t = temp("pubunfenced");
        let r = &t.0;
        for n in [1, 2] {
            r.publish_config(Duration::from_millis(10), &mut cannot_fence, |s| {
                s.header.n_services = n;
            })
            .unwrap();
        }
        let s = &r.switch_slots()[1];
        let pid = std::process::id();
        s.pid.store(pid, Ordering::Relaxed);
        s.proc_start
            .store(crate::time::process_start(pid).unwrap(), Ordering::Relaxed);
        s.state.store(SW_RUNNING, Ordering::SeqCst);
        s.seen_config.store(1, Ordering::Release);
        let sum = r.config_header(0).checksum;
        let e = r
            .publish_config(Duration::from_millis(30), &mut cannot_fence, |s| {
                s.header.n_services = 3;
            })
            .unwrap_err();
        assert_eq!(
            e,
            PublishError::Unfenced {
                table: Table::Config,
                generation: 2,
                timeout: Duration::from_millis(30),
                switch: 1,
                pid,
                fenced: Vec::new(),
            }
        );
        assert_eq!(
            e.to_string(),
            format!(
                "switch 1 (pid {pid}) did not acknowledge configuration generation 2 within 30ms \
                 and could not be fenced: generation 3 not written, since the slot it may still read would be rewritten"
            )
        );
        assert_eq!(r.generation(Table::Config), 2);
        let a = r.config_header(0);
        assert_eq!(
            (a.stamp.load(Ordering::Relaxed), a.n_services, a.checksum),
            (1, 1, sum)
        );
        // SAFETY: this thread is the only publisher, between publications.
        assert!(unsafe { r.verify_slot(Table::Config, 0) });
        assert_eq!(s.state.load(Ordering::SeqCst), SW_RUNNING);
        assert_eq!(s.fenced.load(Ordering::Relaxed), 0);
        let words = r.pub_words(Table::Config);
        assert_eq!(words.refused.load(Ordering::Relaxed), 1);
        assert_eq!(words.excluded.load(Ordering::Relaxed), 0);
    }

    /// A dead pid is not waited for at all.
    #[test]
    fn dead_switch_is_not_waited_for() {
        let t = temp("pubdead");
        let r = &t.0;
        r.publish_config(Duration::from_millis(10), &mut cannot_fence, |_| {})
            .unwrap();
        let s = &r.switch_slots()[2];
        s.pid.store(u32::MAX / 2 - 7, Ordering::Relaxed);
        s.state.store(SW_RUNNING, Ordering::SeqCst);
        let rep = r
            .publish_config(Duration::from_millis(30), &mut cannot_fence, |_| {})
            .unwrap();
        assert!(rep.excluded.is_empty());
    }
}
