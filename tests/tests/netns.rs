//! Namespace test bed with real programs. Today: the bed itself (topology,
//! addressing, cleanup) with the kernel routing between client and
//! backends; issue 3 puts switchyard on the appliance's interfaces.

use std::io::{BufRead, BufReader};

use switchyard_tests::bin;
use switchyard_tests::netns::{BACKEND_ADDRS, Bed};

#[test]
fn bed_routes_curl_from_client_to_each_backend_and_cleans_up() {
    let id;
    {
        let mut bed = Bed::build();
        id = bed.id.clone();
        bed.exec("lb", &["sysctl", "-qw", "net.ipv4.ip_forward=1"])
            .unwrap();
        let tb = bin("testbackend");
        for (i, addr) in BACKEND_ADDRS.iter().enumerate() {
            let role = format!("b{}", i + 1);
            let name = format!("backend{}", i + 1);
            let child = bed.spawn(
                &role,
                &[
                    tb.to_str().unwrap(),
                    "--name",
                    &name,
                    "--http",
                    &format!("{addr}:8080"),
                ],
            );
            let mut line = String::new();
            BufReader::new(child.stdout.take().unwrap())
                .read_line(&mut line)
                .unwrap();
            assert!(line.starts_with(&format!("testbackend {name}")), "{line}");
        }
        for (i, addr) in BACKEND_ADDRS.iter().enumerate() {
            let out = bed
                .exec(
                    "cl",
                    &[
                        "curl",
                        "-sS",
                        "--max-time",
                        "10",
                        &format!("http://{addr}:8080/"),
                    ],
                )
                .unwrap();
            assert_eq!(
                String::from_utf8_lossy(&out.stdout),
                format!("backend{}\n", i + 1)
            );
        }
        assert_eq!(Bed::existing(&id).len(), 5);
    }
    assert!(Bed::existing(&id).is_empty(), "namespaces removed on drop");
}
