//! The agent report parser over arbitrary datagrams: opening (length, version,
//! signature, fields) never panics, and whatever report a well-formed
//! datagram carries seals into a datagram that opens, and seals again to the
//! same bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::net::{Ipv4Addr, SocketAddrV4};

fuzz_target!(|data: &[u8]| {
    let ep = agent_proto::Endpoints {
        agent: Ipv4Addr::new(198, 18, 0, 2),
        controller: SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 1), 4999),
    };
    let secret = b"fuzz-secret-of-sixteen-bytes";
    let _ = agent_proto::open(data, &ep, secret);
    if let Ok(v) = agent_proto::ReportView::new_checked(data) {
        let sealed = agent_proto::seal(&v.report(), &ep, secret);
        let opened = agent_proto::open(&sealed, &ep, secret).expect("a sealed report opens");
        assert_eq!(agent_proto::seal(&opened, &ep, secret), sealed);
    }
});
