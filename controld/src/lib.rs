//! controld: the control processor. Pure parts (config, master, maglev,
//! ids, the health hysteresis) are separate from the parts that touch the
//! region, processes or the network (publisher, supervisor, gc, events,
//! health probes).

pub mod config;
pub mod events;
pub mod gc;
pub mod health;
pub mod ids;
pub mod maglev;
pub mod master;
pub mod publisher;
pub mod supervisor;
