//! First contact and L2 hygiene on AF_PACKET ports (issue 22, items 4 and
//! 6): a client the appliance's kernel has not resolved gets its first
//! connection without a retransmission, whether the VIP is off its subnet
//! or on it; a poisoned kernel neighbour (an ARP request with a broadcast
//! sender MAC) does not cut the client off; tagged frames open no
//! connection; ARP with a broadcast sender MAC is not answered.
//!
//! Waits are bounded (a deadline per condition) and assert outcomes only.

use std::time::Duration;

use switchyard_tests::netns::{
    self, BACKEND_ADDRS, Bed, CLIENT_ADDR, mac_of, send_raw_frame, tcp_retransmits,
};
use switchyard_tests::{counter, shmdump_json};

/// Longest wait for one published change.
const WAIT: Duration = Duration::from_secs(15);

/// Waits until the mirror published every backend's neighbour (the
/// client-side first contact is what these tests look at, not the
/// backends').
fn backends_resolved(inst: &str) {
    netns::wait_neighbours(inst, WAIT, "the backends' neighbours", |n| {
        BACKEND_ADDRS.iter().all(|b| n.iter().any(|(a, _)| a == b))
    });
}

/// One curl from the client to `url`; its body, or the error with the
/// switch's non-zero counters.
fn curl(bed: &Bed, inst: &str, url: &str) -> Result<String, String> {
    bed.exec("cl", &["curl", "-sS", "--max-time", "5", url])
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .map_err(|e| {
            let c = &shmdump_json(inst, &[])["switches"][0]["counters"];
            let nonzero: Vec<_> = c
                .as_object()
                .unwrap()
                .iter()
                .filter(|(_, v)| **v != 0)
                .collect();
            format!("{e}\ncounters: {nonzero:?}")
        })
}

/// A fresh client's first request: it completes, the client retransmits
/// nothing, and no reply was dropped for want of a neighbour.
fn first_request_without_retransmit(vip: &str) {
    let mut bed = Bed::build();
    let port = netns::prepare(&mut bed, "nat");
    assert_eq!(port, 8080);
    let (inst, app) = netns::afpacket_appliance_vip(&bed, vip);
    backends_resolved(&inst);
    assert_eq!(tcp_retransmits(&bed, "cl"), 0, "a fresh client");
    let body = curl(&bed, &inst, &format!("http://{vip}/"))
        .unwrap_or_else(|e| panic!("first request to {vip}: {e}\n{}", app.log()));
    assert!(body.starts_with("backend"), "{body}");
    let dump = shmdump_json(&inst, &[]);
    assert_eq!(
        (
            tcp_retransmits(&bed, "cl"),
            counter(&dump, 0, "drop_no_neighbour")
        ),
        (0, 0),
        "the first request to {vip} took a retransmission: {:#}",
        dump["switches"][0]["counters"]
    );
    // And the next ones too (still unresolved by the kernel when the VIP
    // is on the client's subnet).
    for _ in 0..5 {
        curl(&bed, &inst, &format!("http://{vip}/")).unwrap();
    }
    let dump = shmdump_json(&inst, &[]);
    assert_eq!(tcp_retransmits(&bed, "cl"), 0);
    assert_eq!(counter(&dump, 0, "drop_no_neighbour"), 0);
    drop(app);
}

/// The VIP off the client's subnet (the client reaches it through the
/// appliance's address as its gateway).
#[test]
fn first_contact_off_subnet_takes_no_retransmit() {
    first_request_without_retransmit(netns::VIP);
}

/// The VIP on the client's own subnet: the appliance's kernel never talks
/// to the client and never resolves it.
#[test]
fn first_contact_on_subnet_takes_no_retransmit() {
    first_request_without_retransmit("198.18.1.10");
}

/// A MAC "aa:bb:cc:dd:ee:ff" as hex without separators.
fn hex(mac: &str) -> String {
    mac.replace(':', "")
}

fn ip_hex(ip: &str) -> String {
    ip.split('.')
        .map(|o| format!("{:02x}", o.parse::<u8>().unwrap()))
        .collect()
}

/// An ARP request (Ethernet to broadcast from `src_mac`) asking for
/// `target`, from sender `sha`/`spa`.
fn arp_request(src_mac: &str, sha: &str, spa: &str, target: &str) -> String {
    format!(
        "ffffffffffff{}0806000108000604{}{}{}000000000000{}{}",
        hex(src_mac),
        "0001",
        hex(sha),
        ip_hex(spa),
        ip_hex(target),
        "00".repeat(18)
    )
}

/// One ARP request with a broadcast sender MAC for the client's address
/// makes the appliance's kernel hold ff:ff:ff:ff:ff:ff for the client.
/// The mirror must not publish it, and the client's requests must keep
/// working (they were dropped for want of a neighbour until the kernel
/// re-resolved the client, half a minute later).
#[test]
fn arp_with_a_broadcast_sender_mac_does_not_cut_a_client_off() {
    let mut bed = Bed::build();
    netns::prepare(&mut bed, "nat");
    let (inst, app) = netns::afpacket_appliance_vip(&bed, netns::VIP);
    backends_resolved(&inst);
    let client_mac = mac_of(&bed, "cl", "c0");
    curl(&bed, &inst, "http://198.18.0.10/").unwrap();
    netns::wait_neighbours(&inst, WAIT, "the client's neighbour", |n| {
        n.iter().any(|(a, m)| a == CLIENT_ADDR && *m == client_mac)
    });
    let poison = arp_request(
        &client_mac,
        "ff:ff:ff:ff:ff:ff",
        CLIENT_ADDR,
        netns::APPLIANCE_CLIENT_ADDR,
    );
    send_raw_frame(&bed, "cl", "c0", &poison);
    // The kernel took it (bounded wait)...
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let out = bed
            .exec("lb", &["ip", "neigh", "show", CLIENT_ADDR, "dev", "l0"])
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        if text.contains("ff:ff:ff:ff:ff:ff") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "kernel: {text}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // ...the mirror dropped the client's old MAC, and never publishes the
    // broadcast one.
    netns::wait_neighbours(&inst, WAIT, "the client's neighbour withdrawn", |n| {
        !n.iter().any(|(a, _)| a == CLIENT_ADDR)
    });
    let before = counter(&shmdump_json(&inst, &[]), 0, "drop_no_neighbour");
    for _ in 0..3 {
        let body = curl(&bed, &inst, "http://198.18.0.10/")
            .unwrap_or_else(|e| panic!("after the poisoning: {e}\n{}", app.log()));
        assert!(body.starts_with("backend"), "{body}");
    }
    let dump = shmdump_json(&inst, &[]);
    assert_eq!(counter(&dump, 0, "drop_no_neighbour"), before);
    assert!(
        !netns::published_neighbours(&inst)
            .iter()
            .any(|(_, m)| m == "ff:ff:ff:ff:ff:ff"),
        "a broadcast MAC was published"
    );
    drop(app);
}

/// An 802.1Q-tagged SYN to the VIP (sent raw from the client; the
/// appliance's kernel strips the tag into the AF_PACKET ring's header)
/// opens no connection and is counted in `drop_vlan`; an ARP request for
/// the VIP with a broadcast sender MAC is not answered (`drop_l2_src`).
#[test]
fn tagged_frames_and_arp_from_a_broadcast_sender_are_refused() {
    let mut bed = Bed::build();
    netns::prepare(&mut bed, "nat");
    let (inst, app) = netns::afpacket_appliance_vip(&bed, netns::VIP);
    backends_resolved(&inst);
    let (cmac, lmac) = (mac_of(&bed, "cl", "c0"), mac_of(&bed, "lb", "l0"));
    // An untagged SYN made the same way opens a connection (the frame is
    // right; only the tag differs).
    let syn = |tag: &str, sport: u16| {
        let py = format!(
            "import struct\n\
             def csum(b):\n\
             \x20   if len(b) % 2: b += b'\\0'\n\
             \x20   s = sum(struct.unpack('!%dH' % (len(b) // 2), b))\n\
             \x20   while s >> 16: s = (s & 0xffff) + (s >> 16)\n\
             \x20   return (~s) & 0xffff\n\
             src, dst = bytes([198,18,1,2]), bytes([198,18,0,10])\n\
             tcp = struct.pack('!HHIIBBHHH', {sport}, 80, 1, 0, 5 << 4, 2, 8192, 0, 0)\n\
             c = csum(src + dst + struct.pack('!BBH', 0, 6, len(tcp)) + tcp)\n\
             tcp = tcp[:16] + struct.pack('!H', c) + tcp[18:]\n\
             ip = struct.pack('!BBHHHBBH4s4s', 0x45, 0, 40, 1, 0x4000, 64, 6, 0, src, dst)\n\
             ip = ip[:10] + struct.pack('!H', csum(ip)) + ip[12:]\n\
             print((bytes.fromhex('{}{}{tag}0800') + ip + tcp).hex())\n",
            hex(&lmac),
            hex(&cmac)
        );
        let out = bed.exec("cl", &["python3", "-c", &py]).unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    // The client's own kernel would answer the backend's SYN-ACK to a SYN
    // it did not send with a RST; that changes nothing counted here.
    let conns = |inst: &str| counter(&shmdump_json(inst, &[]), 0, "conn_new");
    let wait_for = |what: &str, cond: &dyn Fn() -> bool| {
        let deadline = std::time::Instant::now() + WAIT;
        while !cond() {
            assert!(std::time::Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    send_raw_frame(&bed, "cl", "c0", &syn("", 41_000));
    wait_for("the untagged SYN opens a connection", &|| conns(&inst) == 1);
    for (tpid, sport) in [("8100", 41_001), ("88a8", 41_002)] {
        send_raw_frame(&bed, "cl", "c0", &syn(&format!("{tpid}0007"), sport));
    }
    // A frame sent after them, to know they were all seen.
    send_raw_frame(&bed, "cl", "c0", &syn("", 41_003));
    wait_for("the last untagged SYN", &|| conns(&inst) >= 2);
    let dump = shmdump_json(&inst, &[]);
    assert_eq!(
        counter(&dump, 0, "conn_new"),
        2,
        "a tagged SYN opened a connection: {:#}",
        dump["switches"][0]["counters"]
    );
    assert_eq!(counter(&dump, 0, "drop_vlan"), 2);

    // ARP for the VIP: answered from the client's MAC, not from a
    // broadcast sender MAC.
    let replies = |inst: &str| counter(&shmdump_json(inst, &[]), 0, "arp_replies");
    let r0 = replies(&inst);
    let bad = arp_request(&cmac, "ff:ff:ff:ff:ff:ff", CLIENT_ADDR, netns::VIP);
    send_raw_frame(&bed, "cl", "c0", &bad);
    let good = arp_request(&cmac, &cmac, CLIENT_ADDR, netns::VIP);
    send_raw_frame(&bed, "cl", "c0", &good);
    wait_for("the good ARP request answered", &|| replies(&inst) > r0);
    let dump = shmdump_json(&inst, &[]);
    assert_eq!(
        counter(&dump, 0, "arp_replies"),
        r0 + 1,
        "the broadcast sender was answered: {:#}",
        dump["switches"][0]["counters"]
    );
    assert_eq!(counter(&dump, 0, "drop_l2_src"), 1);
    drop(app);
}
