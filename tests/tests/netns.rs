//! Namespace test bed with real programs (curl, wrk, python3 sockets,
//! testbackend, lb-agent, lbctl): the bed itself, the afpacket port, every
//! forwarding mode end to end, the init script, and in submodules the
//! routing mirror, health checks, load agents, lbctl, controlled loading,
//! first contact and L2 hygiene, the SYN proxy, all through switchyard on AF_PACKET
//! ports.

#[path = "netns/admin.rs"]
mod admin;
#[path = "netns/agents.rs"]
mod agents;
#[path = "netns/fanout.rs"]
mod fanout;
#[path = "netns/first_contact.rs"]
mod first_contact;
#[path = "netns/flood.rs"]
mod flood;
#[path = "netns/fragments.rs"]
mod fragments;
#[path = "netns/health.rs"]
mod health;
#[path = "netns/icmp.rs"]
mod icmp;
#[path = "netns/offload.rs"]
mod offload;
#[path = "netns/records.rs"]
mod records;
#[path = "netns/routing.rs"]
mod routing;
#[path = "netns/rx_ring.rs"]
mod rx_ring;
#[path = "netns/sched.rs"]
mod sched;
#[path = "netns/synproxy.rs"]
mod synproxy;

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

/// The afpacket port forwards frames between two real interfaces through
/// its mmap rings: frames sent into veth a0 come out of veth a1 byte for
/// byte, in order.
#[test]
fn afpacket_forwards_between_veths_byte_for_byte() {
    use netdrv::Nic;
    use netdrv::afpacket::{AfPacket, PortOptions};
    use std::process::Command;

    struct Ns(String);
    impl Drop for Ns {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }
    let ns = Ns(format!("syafp{}", std::process::id()));
    let ip = |args: &[&str]| {
        let st = Command::new("ip")
            .args(["netns", "exec", &ns.0])
            .args(args)
            .status()
            .unwrap();
        assert!(st.success(), "{args:?}");
    };
    assert!(
        Command::new("ip")
            .args(["netns", "add", &ns.0])
            .status()
            .unwrap()
            .success()
    );
    ip(&["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"]);
    ip(&["sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"]);
    for k in 0..2 {
        ip(&[
            "ip",
            "link",
            "add",
            &format!("a{k}"),
            "type",
            "veth",
            "peer",
            "name",
            &format!("b{k}"),
        ]);
        ip(&["ip", "link", "set", &format!("a{k}"), "up"]);
        ip(&["ip", "link", "set", &format!("b{k}"), "up"]);
    }
    let path = format!("/var/run/netns/{}", ns.0);
    let moved = std::thread::spawn(move || {
        // Enter the namespace on this thread only.
        let f = std::fs::File::open(&path).unwrap();
        use std::os::fd::AsRawFd;
        // SAFETY: setns with a valid namespace fd affects only this thread.
        assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
        let opts = |n: &str| PortOptions {
            name: n.into(),
            ifname: n.into(),
            slots: 256,
            promiscuous: true,
            fanout: None,
        };
        let mut nic = AfPacket::open(&[opts("a0"), opts("a1")]).unwrap();
        assert_ne!(nic.port_mac(0), [0; 6]);
        assert_ne!(nic.port_mac(0), nic.port_mac(1));
        assert_eq!((nic.port_name(0), nic.port_name(1)), ("a0", "a1"));
        let raw = |ifname: &str| -> i32 {
            // SAFETY: plain socket/bind calls with valid arguments.
            unsafe {
                let fd = libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_RAW,
                    (libc::ETH_P_ALL as u16).to_be() as i32,
                );
                assert!(fd >= 0);
                let mut sll: libc::sockaddr_ll = std::mem::zeroed();
                sll.sll_family = libc::AF_PACKET as u16;
                sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
                let c = std::ffi::CString::new(ifname).unwrap();
                sll.sll_ifindex = libc::if_nametoindex(c.as_ptr()) as i32;
                assert_eq!(
                    libc::bind(
                        fd,
                        (&sll as *const libc::sockaddr_ll).cast(),
                        std::mem::size_of::<libc::sockaddr_ll>() as u32
                    ),
                    0
                );
                let tv = libc::timeval {
                    tv_sec: 0,
                    tv_usec: 200_000,
                };
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&tv as *const libc::timeval).cast(),
                    std::mem::size_of::<libc::timeval>() as u32,
                );
                fd
            }
        };
        let (tx_fd, rx_fd) = (raw("b0"), raw("b1"));
        let frame = |k: u32| -> Vec<u8> {
            let mut f = vec![0x02, 0, 0, 0, 0, 0xb1, 0x02, 0, 0, 0, 0, 0xb0, 0x88, 0xb5];
            f.extend_from_slice(&k.to_be_bytes());
            f.resize(60 + (k as usize % 900), (k % 251) as u8);
            f
        };
        let n = 200u32;
        let mut got = Vec::new();
        let mut frames = [netdrv::Frame { buf: 0, len: 0 }; 32];
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let mut sent = 0u32;
        while got.len() < n as usize && std::time::Instant::now() < deadline {
            if sent < n {
                let f = frame(sent);
                // SAFETY: send of a valid buffer on our raw socket.
                let r = unsafe { libc::send(tx_fd, f.as_ptr().cast(), f.len(), 0) };
                assert_eq!(r as usize, f.len());
                sent += 1;
            }
            let k = nic.rx_burst(0, &mut frames);
            for f in &frames[..k] {
                let is_ours = nic.buf_mut(*f)[12..14] == [0x88, 0xb5];
                if is_ours {
                    nic.tx(1, *f).unwrap();
                } else {
                    nic.free(*f);
                }
            }
            nic.flush(1);
            let mut buf = [0u8; 2048];
            loop {
                // SAFETY: recv into a live buffer; MSG_DONTWAIT never blocks.
                let r = unsafe {
                    libc::recv(
                        rx_fd,
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        libc::MSG_DONTWAIT,
                    )
                };
                if r <= 0 {
                    break;
                }
                if buf[12..14] == [0x88, 0xb5] {
                    got.push(buf[..r as usize].to_vec());
                }
            }
        }
        // SAFETY: closing our fds.
        unsafe {
            libc::close(tx_fd);
            libc::close(rx_fd);
        }
        (0..n).map(frame).collect::<Vec<_>>() == got
    })
    .join()
    .unwrap();
    assert!(moved, "every frame out of a1 identical and in order");
}

/// 300 curl requests to the VIP all succeed and split 1:2:3 within 10
/// percentage points (over 3 standard deviations of a 300-sample binomial);
/// then wrk for 5 s with 64 connections reports no socket error.
fn curl_split_and_wrk(bed: &Bed, inst: &str, app: &switchyard_tests::Appliance, mode: &str) {
    let mut seen = std::collections::BTreeMap::new();
    for _ in 0..300 {
        let out = bed
            .exec(
                "cl",
                &["curl", "-sS", "--max-time", "5", "http://198.18.0.10/"],
            )
            .unwrap_or_else(|e| {
                let c = &switchyard_tests::shmdump_json(inst, &[])["switches"][0]["counters"];
                let nonzero: Vec<_> = c
                    .as_object()
                    .unwrap()
                    .iter()
                    .filter(|(_, v)| **v != 0)
                    .collect();
                panic!("{e}\ncounters: {nonzero:?}\ncontrold log:\n{}", app.log())
            });
        *seen
            .entry(String::from_utf8_lossy(&out.stdout).to_string())
            .or_insert(0u32) += 1;
    }
    assert_eq!(seen.values().sum::<u32>(), 300);
    for (i, w) in [1.0, 2.0, 3.0].iter().enumerate() {
        let n = *seen.get(&format!("backend{}\n", i + 1)).unwrap_or(&0) as f64;
        let share = n / 300.0 * 100.0;
        let want = w / 6.0 * 100.0;
        assert!(
            (share - want).abs() <= 10.0,
            "backend{}: {share:.1}% vs {want:.1}% ({seen:?})",
            i + 1
        );
    }
    let out = bed
        .exec(
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
        )
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(text.contains("Requests/sec"), "{text}");
    assert!(
        !text.contains("Socket errors") && !text.contains("Non-2xx"),
        "{text}"
    );
    eprintln!("wrk through switchyard {mode} (afpacket):\n{text}");
}

/// Everything issue 3 asks of a forwarding mode, with real programs:
/// the weighted split and wrk (above); a VIP port without a service is
/// refused at once (RST); 100 MB downloaded and 20 MB uploaded through the
/// VIP arrive intact; a UDP service round-trips.
fn end_to_end(mode: &str) -> (Bed, String, switchyard_tests::Appliance) {
    let mut bed = Bed::build();
    let port = switchyard_tests::netns::prepare(&mut bed, mode);
    let (inst, app) = switchyard_tests::netns::afpacket_appliance(&bed, mode, port);
    curl_split_and_wrk(&bed, &inst, &app, mode);

    // A VIP port with no service is refused at once (RST), not timed out.
    let t0 = std::time::Instant::now();
    let err = bed
        .exec(
            "cl",
            &["curl", "-sS", "--max-time", "5", "http://198.18.0.10:81/"],
        )
        .unwrap_err();
    assert!(
        err.contains("(7)") || err.to_lowercase().contains("refused"),
        "{err}"
    );
    assert!(
        t0.elapsed() < std::time::Duration::from_secs(4),
        "refused, not timed out: {err}"
    );

    // 100 MB through the VIP arrive intact.
    let dir = std::env::temp_dir().join(format!("switchyard-e2e-{inst}"));
    std::fs::create_dir_all(&dir).unwrap();
    struct Rm(std::path::PathBuf);
    impl Drop for Rm {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _rm = Rm(dir.clone());
    let file = dir.join("download");
    bed.exec(
        "cl",
        &[
            "curl",
            "-sS",
            "--max-time",
            "120",
            "-o",
            file.to_str().unwrap(),
            "http://198.18.0.10/bytes/104857600",
        ],
    )
    .unwrap();
    let body = std::fs::read(&file).unwrap();
    assert_eq!(body.len(), 104_857_600);
    assert!(
        body.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8),
        "download corrupted"
    );
    drop(body);

    // 20 MB uploaded through the VIP arrive intact (full-size segments from
    // the client: in tunnel mode they exceed the MTU once encapsulated).
    let up = dir.join("upload");
    let data: Vec<u8> = (0..20u32 << 20).map(|i| (i % 251) as u8).collect();
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
    assert_eq!(String::from_utf8_lossy(&out.stdout), "20971520 intact\n");

    // UDP round trip through the VIP (python3's socket module as the client).
    let py = "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(5); \
              s.sendto(b'hello', ('198.18.0.10', 53)); d, a = s.recvfrom(100); print(a[0], a[1], d.decode())";
    let out = bed.exec("cl", &["python3", "-c", py]).unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        text.starts_with("198.18.0.10 53 backend") && text.trim_end().ends_with(" hello"),
        "{text}"
    );
    (bed, inst, app)
}

/// NAT end to end on real interfaces: controld and switchd in the
/// appliance namespace on AF_PACKET ports, testbackend servers in the
/// backend namespaces, curl and wrk in the client namespace. The appliance
/// kernel does not forward (ip_forward=0): every answer came through
/// switchyard.
#[test]
fn nat_end_to_end_on_afpacket() {
    let (_bed, inst, app) = end_to_end("nat");
    let dump = switchyard_tests::shmdump_json(&inst, &[]);
    assert!(
        dump["switches"][0]["counters"]["reply_hit"]
            .as_u64()
            .unwrap()
            > 0
    );
    drop(app);
}

/// Direct routing end to end: the switch rewrites only MACs; backends own
/// the VIP on lo (arp_ignore/arp_announce set) and answer the client
/// directly, their replies routed by the appliance namespace's kernel (which
/// blackholes the VIP itself, so it never answers or bounces client->VIP
/// traffic: only switchyard forwards that).
#[test]
fn dr_end_to_end_on_afpacket() {
    let (_bed, inst, app) = end_to_end("dr");
    let dump = switchyard_tests::shmdump_json(&inst, &[]);
    assert_eq!(
        dump["switches"][0]["counters"]["reply_hit"], 0,
        "DR replies bypass the switch"
    );
    drop(app);
}

/// IP-in-IP end to end: the switch encapsulates client->VIP packets toward
/// the backend (outer source: the appliance's br0 address); each backend
/// decapsulates (ipip-decap standing in for the kernel's ipip device) and
/// answers the client directly. The upload's full-size segments do not fit
/// the 1500-byte MTU once encapsulated: the switch answers with ICMP
/// fragmentation-needed, the client lowers its path MTU, and the upload
/// still arrives intact.
#[test]
fn tunnel_end_to_end_on_afpacket() {
    let (_bed, inst, app) = end_to_end("tunnel");
    let dump = switchyard_tests::shmdump_json(&inst, &[]);
    let c = &dump["switches"][0]["counters"];
    assert_eq!(c["reply_hit"], 0, "tunnel replies bypass the switch");
    assert!(
        c["icmp_frag_needed"].as_u64().unwrap() > 0,
        "path MTU discovery was exercised: {c}"
    );
    assert_eq!(c["drop_too_big"], 0, "{c}");
    drop(app);
}

/// The init script, run inside the appliance namespace, starts the
/// AF_PACKET appliance (traffic flows through it), reports status, reloads
/// and stops it, leaving nothing behind.
#[test]
fn init_script_drives_the_afpacket_appliance_in_a_namespace() {
    let mut bed = Bed::build();
    let port = switchyard_tests::netns::prepare(&mut bed, "nat");
    // Build the config the helper would, but run controld through the script.
    let (inst, app) = switchyard_tests::netns::afpacket_appliance(&bed, "nat", port);
    let cfg = std::fs::read_to_string(&app.config_path).unwrap();
    drop(app);
    let dir = std::env::temp_dir().join(format!("switchyard-initns-{inst}"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("switchyard.toml"), &cfg).unwrap();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../packaging/init.d/switchyard"
    );
    let run = |cmd: &str| -> (i32, String) {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &bed.ns("lb"), "sh", script, cmd])
            .env("SWITCHYARD_CONFIG", dir.join("switchyard.toml"))
            .env("SWITCHYARD_PIDFILE", dir.join("switchyard.pid"))
            .env("SWITCHYARD_LOG", dir.join("switchyard.log"))
            .env("SWITCHYARD_BIN", switchyard_tests::bin_dir())
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    struct Stop<'a>(&'a dyn Fn(&str) -> (i32, String));
    impl Drop for Stop<'_> {
        fn drop(&mut self) {
            let _ = (self.0)("stop");
        }
    }
    let _stop = Stop(&run);
    assert_eq!(run("status").0, 3);
    let (code, text) = run("start");
    assert_eq!(code, 0, "{text}");
    assert_eq!(run("status").0, 0);
    let out = bed
        .exec(
            "cl",
            &["curl", "-sS", "--max-time", "5", "http://198.18.0.10/"],
        )
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("backend"));
    let region = shm_layout::Region::attach(&inst, shm_layout::Access::ReadOnly).unwrap();
    let before = region.generation(shm_layout::Table::Config);
    std::fs::write(
        dir.join("switchyard.toml"),
        cfg.replace("weight = 3", "weight = 5"),
    )
    .unwrap();
    let (code, text) = run("reload");
    assert_eq!(code, 0, "{text}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while region.generation(shm_layout::Table::Config) == before {
        assert!(std::time::Instant::now() < deadline, "reload not published");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    drop(region);
    let (code, text) = run("stop");
    assert_eq!(code, 0, "{text}");
    assert_eq!(run("status").0, 3);
    assert!(!std::path::Path::new(&format!("/dev/shm/switchyard.{inst}")).exists());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A control processor that crashes loses no connection: four
/// rate-limited NAT downloads (the server sends, the client only
/// acknowledges, so nothing from the client would re-create a lost entry)
/// run while controld is killed with SIGKILL and a new one started with the
/// same configuration; it adopts the region and the running switch, and
/// every download completes, byte for byte, well inside curl's limit (the
/// old behaviour stalled them for a minute, until curl's keepalive).
#[test]
fn nat_downloads_survive_a_controld_crash_and_its_replacement() {
    use std::time::{Duration, Instant};
    let mut bed = Bed::build();
    let port = switchyard_tests::netns::prepare(&mut bed, "nat");
    let (inst, mut app) = switchyard_tests::netns::afpacket_appliance(&bed, "nat", port);
    let config = std::fs::read_to_string(&app.config_path).unwrap();
    const SIZE: u64 = 12_000_000;
    let mut curls: Vec<std::process::Child> = (0..4)
        .map(|_| {
            std::process::Command::new("ip")
                .args(["netns", "exec", &bed.ns("cl")])
                .args([
                    "curl",
                    "-sS",
                    "--max-time",
                    "40",
                    "--limit-rate",
                    "1500K",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code} %{size_download}",
                    &format!("http://198.18.0.10/bytes/{SIZE}"),
                ])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    struct Reap<'a>(&'a mut Vec<std::process::Child>);
    impl Drop for Reap<'_> {
        fn drop(&mut self) {
            for c in self.0.iter_mut() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
    let curls = Reap(&mut curls);
    // Let the downloads get going (bounded): every one has an entry.
    let region = app.region();
    let deadline = Instant::now() + Duration::from_secs(20);
    while region.switch_slots()[0].counter(shm_layout::switch_slot::Counter::ConnNew) < 4 {
        assert!(
            Instant::now() < deadline,
            "downloads did not start:\n{}",
            app.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_secs(2));
    let switch = switchyard_tests::switch_pids(&region)[0];
    let mut controld = app.controld.take().unwrap();
    controld.kill().unwrap();
    controld.wait().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    app.disarm();
    let app = switchyard_tests::Appliance::start_in(Some(&bed.ns("lb")), &inst, &config);
    assert_eq!(
        switchyard_tests::switch_pids(&app.region())[0],
        switch,
        "the running switch is adopted:\n{}",
        app.log()
    );
    for c in curls.0.iter_mut() {
        let status = c.wait().unwrap();
        let mut text = String::new();
        use std::io::Read;
        c.stdout.take().unwrap().read_to_string(&mut text).unwrap();
        let mut err = String::new();
        c.stderr.take().unwrap().read_to_string(&mut err).unwrap();
        assert!(
            status.success() && text == format!("200 {SIZE}"),
            "download across the takeover: {status} {text:?} {err}\n{}",
            app.log()
        );
    }
    let dump = switchyard_tests::shmdump_json(&inst, &[]);
    assert_eq!(
        switchyard_tests::counter(&dump, 0, "conn_midflow"),
        0,
        "no entry had to be re-created: {:#}",
        dump["switches"][0]["counters"]
    );
    drop(app);
}
