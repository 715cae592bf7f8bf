//! shmdump's reading of a corrupted region: the switch fixture's region
//! (published services, backends, routes and neighbours) with fuzzer bytes
//! laid over chosen places of its header, switch slots, backend counters,
//! configuration and routing slots and connection table, then read the
//! way shmdump reads it (`tools::shmdump::collect`, connections listed).
//! It must never panic, and never allocate by a count read from the
//! region (libFuzzer's malloc limit turns a huge allocation into a crash).
//!
//! Input: records of `[section, offset (3 bytes, big-endian), len, bytes...]`;
//! the section is taken modulo the sections read, the offset modulo the
//! section's length. Every write is undone after the input, so each input
//! starts from the same pristine region.
#![no_main]
use std::cell::RefCell;

use libfuzzer_sys::fuzz_target;
use shm_layout::{Access, Mapping, Region, Section, region_name};
use switchd::fixture::Fixture;
use tools::shmdump::{Query, collect};

/// The sections shmdump reads (the packet rings are not).
const SECTIONS: [Section; 8] = [
    Section::Header,
    Section::Switches,
    Section::BackendCounters,
    Section::ConfigA,
    Section::ConfigB,
    Section::RoutingA,
    Section::RoutingB,
    Section::ConnTable,
];

struct Harness {
    /// Read-only, as shmdump attaches.
    region: Region,
    /// Writable view of the same object, for the corruption.
    raw: Mapping,
    /// The region's bytes before any input.
    pristine: Vec<u8>,
}

thread_local! {
    static H: RefCell<Harness> = RefCell::new({
        let fx: &'static Fixture = Box::leak(Box::new(Fixture::new("shmdump", 1 << 10)));
        let name = region_name(&format!("fixture-shmdump-{}", std::process::id()));
        let region = Region::attach_name(&name, Access::ReadOnly).expect("attach");
        let raw = Mapping::open(&name, Access::ReadWrite, region.len()).expect("open");
        // The mappings outlive the name: nothing is left in /dev/shm when
        // the fuzzer stops, however it stops.
        let _ = Mapping::unlink(&name);
        let _ = &fx.region;
        // SAFETY: `raw` maps `region.len()` readable bytes; nothing writes
        // them while this copy is taken (the fuzzer is single-threaded and
        // the fixture has no switch).
        let pristine = unsafe { std::slice::from_raw_parts(raw.as_ptr(), region.len()) }.to_vec();
        Harness { region, raw, pristine }
    });
}

fuzz_target!(|data: &[u8]| {
    H.with(|h| {
        let h = h.borrow_mut();
        let mut touched: Vec<(usize, usize)> = Vec::new();
        let mut rest = data;
        while let [sel, o0, o1, o2, len, tail @ ..] = rest {
            let sec = h.region.section(SECTIONS[*sel as usize % SECTIONS.len()]);
            let len = (*len as usize).min(tail.len());
            let (bytes, next) = tail.split_at(len);
            rest = next;
            if sec.len == 0 || len == 0 {
                continue;
            }
            let off = u32::from_be_bytes([0, *o0, *o1, *o2]) as u64 % sec.len;
            let n = (len as u64).min(sec.len - off) as usize;
            let at = (sec.offset + off) as usize;
            // SAFETY: `at..at + n` lies inside the section, which lies inside
            // the mapping (the region's own section table); the region is
            // only read on this thread, after the write.
            unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), h.raw.as_ptr().add(at), n) };
            touched.push((at, n));
        }
        let q = Query {
            conns: true,
            limit: 64,
            ..Query::default()
        };
        let v = collect(&h.region, &q);
        // The output is bounded by the sections, whatever the counts say.
        assert!(v["connections"]["list"].as_array().map_or(0, Vec::len) <= 64);
        let _ = v.to_string();
        for (at, n) in touched {
            // SAFETY: as above; the pristine copy holds every byte of the mapping.
            unsafe {
                std::ptr::copy_nonoverlapping(h.pristine.as_ptr().add(at), h.raw.as_ptr().add(at), n)
            };
        }
    });
});
