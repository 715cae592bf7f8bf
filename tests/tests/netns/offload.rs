//! Checksum offload left on at the client (issue 23: afpacket's checksum
//! completion of offloaded frames was tested on byte arrays only): the
//! client's kernel hands its veth TCP segments with the checksum not yet
//! filled in (CHECKSUM_PARTIAL), AF_PACKET marks them TP_STATUS_CSUMNOTREADY,
//! and the switch must complete the checksum before rewriting and sending
//! them on, or the backend's kernel drops every one.

use switchyard_tests::netns::{Bed, afpacket_appliance, prepare};

#[test]
fn segments_with_offloaded_checksums_are_completed_and_arrive_intact() {
    let mut bed = Bed::build();
    let port = prepare(&mut bed, "nat");
    // Transmit checksumming back on at the client; segmentation stays off
    // (frames stay wire-sized).
    bed.exec(
        "cl",
        &[
            "ethtool", "-K", "c0", "tx", "on", "tso", "off", "gso", "off",
        ],
    )
    .unwrap();
    let (_inst, app) = afpacket_appliance(&bed, "nat", port);
    for i in 0..50 {
        let out = bed
            .exec(
                "cl",
                &["curl", "-sS", "--max-time", "5", "http://198.18.0.10/"],
            )
            .unwrap_or_else(|e| panic!("request {i}: {e}\n{}", app.log()));
        let body = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(body.starts_with("backend"), "request {i}: {body:?}");
    }
    // 5 MB of full-size client segments, each completed on the way.
    let dir = std::env::temp_dir().join(format!("switchyard-offload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    struct Rm(std::path::PathBuf);
    impl Drop for Rm {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _rm = Rm(dir.clone());
    let up = dir.join("upload");
    let data: Vec<u8> = (0..5u32 << 20).map(|i| (i % 251) as u8).collect();
    std::fs::write(&up, &data).unwrap();
    let out = bed
        .exec(
            "cl",
            &[
                "curl",
                "-sS",
                "--max-time",
                "60",
                "--data-binary",
                &format!("@{}", up.display()),
                "http://198.18.0.10/upload",
            ],
        )
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "5242880 intact\n");
    drop(app);
}
