//! The routing mirror: the kernel's IPv4 routes and neighbours of
//! controld's network namespace, on the interfaces of afpacket ports,
//! merged with the static `[[route]]`/`[[neighbour]]` config into the
//! routing slot, kept current, with missing next hops resolved by the
//! kernel on request.
//!
//! - [`table`]: kernel records + config -> snapshot, next hops (pure).
//! - [`kernel`]: rtnetlink messages -> kernel records (pure).
//! - [`mirror`]: when to re-read, republish and resolve (pure logic over
//!   the [`mirror::Kernel`] trait).
//! - [`netlink`]: the rtnetlink sockets implementing it (I/O only).

pub mod kernel;
pub mod mirror;
pub mod netlink;
pub mod table;

pub use mirror::Mirror;
pub use netlink::Netlink;
