//! Library side of the switchyard tools: the traffic model that lbgen and
//! the integration tests share (the wire end of the virtual NICs), and
//! lbctl's client and tables, what lb-agent measures, and shmdump's
//! reading of a region.

pub mod agent;
pub mod appliance;
pub mod bench;
pub mod frames;
pub mod lbctl;
pub mod shmdump;
pub mod topo;
pub mod traffic;
