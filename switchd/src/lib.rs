//! switchd: the switching processor. The packet filter is pure functions over
//! byte slices and table views; the engine moves bursts between ports and it.

pub mod closed;
pub mod engine;
pub mod filter;
pub mod fixture;
pub mod flowcache;
pub mod frag;
pub mod hash;
pub mod hops;
pub mod sched;
pub mod synq;
