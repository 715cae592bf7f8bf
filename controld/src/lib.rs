//! controld: the control processor. Pure parts (config, master, maglev,
//! ids, overrides) are separate from the parts that touch the region or
//! processes (publisher, supervisor, gc, events, admin's listeners).

pub mod admin;
pub mod config;
pub mod events;
pub mod gc;
pub mod ids;
pub mod maglev;
pub mod master;
pub mod overrides;
pub mod publisher;
pub mod supervisor;
