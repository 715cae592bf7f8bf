//! The shared-memory ABI of switchyard.
//!
//! One region per instance (`/dev/shm/switchyard.<instance>`), created by
//! controld, mapped by every switchd and by the tools. See
//! docs/ARCHITECTURE.md for the map of sections and the protocols.

pub mod config_slot;
pub mod conntrack;
pub mod fingerprint;
pub mod header;
pub mod inspect;
pub mod l7msg;
pub mod msgring;
pub mod names;
pub mod publish;
pub mod records;
pub mod region;
pub mod ring;
pub mod routing_slot;
pub mod shm;
pub mod switch_slot;
pub mod time;

pub use header::{Capacities, Section};
pub use publish::{PublishReport, ReadToken, Table};
pub use region::{FINGERPRINT, Region, RegionError, region_name};
pub use shm::{Access, Mapping, ShmError};
