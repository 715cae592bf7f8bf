//! The admin protocol's request parser over arbitrary lines: every input is
//! a request or an error that names the problem, and a parsed request
//! survives its own JSON form unchanged.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(line) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(req) = admin_proto::Request::parse(line) {
        let again = admin_proto::Request::parse(&req.to_json()).expect("its own JSON parses");
        assert_eq!(again, req);
    }
});
