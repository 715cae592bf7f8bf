//! Two switches on one pair of interfaces (issue 23: "two switches on one
//! interface through fanout" had no test): controld puts each interface's
//! sockets of both switches in one PACKET_FANOUT group (hash mode), so the
//! kernel spreads flows over the switches, and the shared connection table
//! lets either switch carry any packet of any connection.

use switchyard_tests::netns::{Bed, afpacket_appliance_with, prepare};
use switchyard_tests::{counter, shmdump_json};

#[test]
fn two_switches_share_one_interface_through_fanout() {
    let mut bed = Bed::build();
    let port = prepare(&mut bed, "nat");
    // A second switch on the other CPU, on the same two ports.
    let (inst, app) = afpacket_appliance_with(&bed, "nat", port, 65536, |_| {
        "[[switch]]\nname = \"sw1\"\ncpu = 0\nports = [\"client\", \"backend\"]\nidle = \"adaptive\"\n"
            .to_string()
    });
    const N: usize = 200;
    for i in 0..N {
        let out = bed
            .exec(
                "cl",
                &["curl", "-sS", "--max-time", "5", "http://198.18.0.10/"],
            )
            .unwrap_or_else(|e| panic!("request {i}: {e}\n{}", app.log()));
        let body = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(body.starts_with("backend"), "request {i}: {body:?}");
    }
    // One long connection through both directions' switches intact.
    let out = bed
        .exec(
            "cl",
            &[
                "sh",
                "-c",
                "curl -sS --max-time 60 http://198.18.0.10/bytes/20971520 | sha256sum",
            ],
        )
        .unwrap();
    let want = {
        use std::fmt::Write;
        let data: Vec<u8> = (0..20u32 << 20).map(|i| (i % 251) as u8).collect();
        let out = std::process::Command::new("sha256sum")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write as _;
                c.stdin.take().unwrap().write_all(&data)?;
                c.wait_with_output()
            })
            .unwrap();
        let mut s = String::new();
        write!(s, "{}", String::from_utf8_lossy(&out.stdout)).unwrap();
        s
    };
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        want,
        "download intact"
    );
    let dump = shmdump_json(&inst, &[]);
    let (rx0, rx1) = (
        counter(&dump, 0, "rx_packets"),
        counter(&dump, 1, "rx_packets"),
    );
    // 201 connections hashed over two switches: both took some (all on
    // one has odds of 2^-200).
    assert!(rx0 > 0 && rx1 > 0, "rx per switch: {rx0}, {rx1}");
    // Each frame went to one switch: together they received no more than
    // the appliance's interfaces did (without the group, every socket gets
    // a copy of every frame).
    let kernel_rx: u64 = ["l0", "br0"]
        .iter()
        .map(|dev| {
            let out = bed
                .exec(
                    "lb",
                    &[
                        "cat",
                        &format!("/sys/class/net/{dev}/statistics/rx_packets"),
                    ],
                )
                .unwrap();
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse::<u64>()
                .unwrap()
        })
        .sum();
    assert!(
        rx0 + rx1 <= kernel_rx,
        "switches received {rx0} + {rx1}, the interfaces {kernel_rx}"
    );
    // Each connection was made once, by whichever switch saw its SYN.
    let conns = counter(&dump, 0, "conn_new") + counter(&dump, 1, "conn_new");
    assert_eq!(conns, N as u64 + 1, "{:#}", dump["switches"]);
    drop(app);
}
