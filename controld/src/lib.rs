//! controld: the control processor. Pure parts (config, master, maglev,
//! ids) are separate from the parts that touch the region or processes
//! (publisher, supervisor, gc, events).

pub mod config;
pub mod events;
pub mod gc;
pub mod ids;
pub mod maglev;
pub mod master;
pub mod publisher;
pub mod supervisor;
