//! Library side of the switchyard tools: the traffic model that lbgen and
//! the integration tests share (the wire end of the virtual NICs), and
//! lbctl's client and tables, and what lb-agent measures.

pub mod agent;
pub mod appliance;
pub mod bench;
pub mod frames;
pub mod lbctl;
pub mod topo;
pub mod traffic;
