//! The namespace demo: real clients and servers through switchyard on
//! AF_PACKET ports, in namespaces it creates and removes.
//! `netns-demo [nat|dr]` (root; needs iproute2, ethtool, curl, wrk).

use switchyard_tests::netns::{Bed, afpacket_appliance, prepare};

fn main() {
    let mode = std::env::args().nth(1).unwrap_or_else(|| "nat".into());
    if mode != "nat" && mode != "dr" {
        eprintln!("usage: netns-demo [nat|dr]");
        std::process::exit(2);
    }
    println!("== building namespaces: client, appliance (l0 + bridge br0), backends b1..b3");
    let mut bed = Bed::build();
    let port = prepare(&mut bed, &mode);
    let (inst, app) = afpacket_appliance(&bed, &mode, port);
    println!(
        "== switchyard ({mode}) running in {} on AF_PACKET ports l0 and br0",
        bed.ns("lb")
    );
    println!("== 12 requests from the client namespace to http://198.18.0.10/ (weights 1:2:3):");
    for _ in 0..12 {
        match bed.exec(
            "cl",
            &["curl", "-sS", "--max-time", "5", "http://198.18.0.10/"],
        ) {
            Ok(o) => print!("  {}", String::from_utf8_lossy(&o.stdout)),
            Err(e) => println!("  error: {e}"),
        }
    }
    println!("== wrk -t2 -c64 -d5s through the VIP:");
    match bed.exec(
        "cl",
        &[
            "wrk",
            "-t",
            "2",
            "-c",
            "64",
            "-d",
            "5s",
            "http://198.18.0.10/",
        ],
    ) {
        Ok(o) => print!("{}", String::from_utf8_lossy(&o.stdout)),
        Err(e) => println!("  error: {e}"),
    }
    println!("== shmdump");
    let out = std::process::Command::new(switchyard_tests::bin("shmdump"))
        .args(["--instance", &inst])
        .output();
    if let Ok(o) = out {
        print!("{}", String::from_utf8_lossy(&o.stdout));
    }
    drop(app);
    drop(bed);
    println!("== stopped; namespaces, processes and shared memory removed");
}
