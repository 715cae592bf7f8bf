//! controld: the control processor. Pure parts (config, master, maglev,
//! ids, overrides, routing's table and mirror logic, the health hysteresis,
//! the agents' rule, the loading rule, the l7 router and decision) are
//! separate from the parts that touch the region, processes or sockets
//! (publisher, supervisor, fence, gc, events, routing::netlink, health
//! probes, admin's and the agents' listeners).

pub mod admin;
pub mod agents;
pub mod appliance;
pub mod config;
pub mod events;
pub mod fence;
pub mod gc;
pub mod health;
pub mod ids;
pub mod l7;
pub mod loading;
pub mod maglev;
pub mod master;
pub mod overrides;
pub mod procs;
pub mod publisher;
pub mod records;
pub mod routing;
pub mod supervisor;
pub mod takeover;
