//! Library side of the switchyard tools: the traffic model that lbgen and
//! the integration tests share (the wire end of the virtual NICs).

pub mod appliance;
pub mod bench;
pub mod frames;
pub mod topo;
pub mod traffic;
