//! The SYN proxy of a NAT service (`syn_proxy = true`, issue 15 item 2)
//! on AF_PACKET ports with real programs: curl through it, a 20 MB
//! download intact, a spoofed SYN flood (hping3, random sources) that
//! creates no entry and reaches no backend while a curl loop succeeds,
//! and a switch killed with SIGKILL mid-download whose replacement
//! carries the spliced connection on.
//!
//! What the backends' kernels saw is read from their own TCP counters
//! (`/proc/net/snmp` `PassiveOpens` in each backend namespace: every SYN
//! a listening socket answered). (nftables, which the brief suggested for
//! the count, is not installed on the test machines; the kernel's counter
//! counts the same SYNs.)

use std::time::{Duration, Instant};

use switchyard_tests::netns::{Bed, VIP, prepare};
use switchyard_tests::{counter_sum, shmdump_json, wait_for};

/// The flood's bound in time if the test dies before it stops it.
const FLOOD_LIMIT_S: u64 = 300;
const REQUESTS: usize = 200;
const DOWNLOAD: u64 = 20 << 20;

/// Starts controld and its switch in the appliance namespace (AF_PACKET
/// ports l0 and br0, routing mirrored from the kernel) with one NAT
/// service "web" (VIP:80 to the backends' :8080, weights 1:2:3) and
/// `syn_proxy = true`.
fn proxied_appliance(bed: &Bed) -> (String, switchyard_tests::Appliance) {
    switchyard_tests::netns::afpacket_web_appliance(bed, "afsynp", VIP, 4096, "syn_proxy = true\n")
}

/// SYNs the backends' listening sockets answered, over the three backend
/// namespaces (`Tcp: PassiveOpens`).
fn backend_syns(bed: &Bed) -> u64 {
    (1..=3)
        .map(|i| {
            let out = bed
                .exec(&format!("b{i}"), &["cat", "/proc/net/snmp"])
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            let mut tcp = text.lines().filter(|l| l.starts_with("Tcp:"));
            let (names, values) = (tcp.next().unwrap(), tcp.next().unwrap());
            let at = names
                .split_whitespace()
                .position(|n| n == "PassiveOpens")
                .unwrap();
            values
                .split_whitespace()
                .nth(at)
                .unwrap()
                .parse::<u64>()
                .unwrap()
        })
        .sum()
}

fn curl(bed: &Bed) -> Result<String, String> {
    bed.exec(
        "cl",
        &["curl", "-sS", "--max-time", "5", &format!("http://{VIP}/")],
    )
    .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
}

/// A temporary directory removed on every exit path.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let d = std::env::temp_dir().join(format!("switchyard-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        Self(d)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The testbackend's `/bytes/N` body: byte i is i mod 251.
fn intact(body: &[u8], len: u64) -> bool {
    body.len() as u64 == len && body.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8)
}

#[test]
fn syn_proxy_serves_downloads_and_a_syn_flood_creates_nothing() {
    if std::process::Command::new("hping3")
        .arg("--version")
        .output()
        .is_err()
    {
        panic!("hping3 is not installed (scripts/test.sh installs it)");
    }
    let mut bed = Bed::build();
    prepare(&mut bed, "nat");
    let (inst, app) = proxied_appliance(&bed);

    // curl works, and each request went through the cookie handshake.
    for _ in 0..10 {
        let body = curl(&bed).unwrap_or_else(|e| panic!("{e}\n{}", app.log()));
        assert!(body.starts_with("backend"), "{body:?}");
    }
    let dump = shmdump_json(&inst, &[]);
    assert_eq!(
        counter_sum(&dump, "syncookie_ok"),
        10,
        "{}",
        dump["switches"][0]["counters"]
    );
    assert_eq!(counter_sum(&dump, "syncookie_sent"), 10);
    assert_eq!(counter_sum(&dump, "conn_new"), 10);

    // 20 MB intact.
    let dir = TempDir::new("synproxy");
    let file = dir.0.join("download");
    bed.exec(
        "cl",
        &[
            "curl",
            "-sS",
            "--max-time",
            "60",
            "-o",
            file.to_str().unwrap(),
            &format!("http://{VIP}/bytes/{DOWNLOAD}"),
        ],
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", app.log()));
    assert!(
        intact(&std::fs::read(&file).unwrap(), DOWNLOAD),
        "download corrupted"
    );
    std::fs::remove_file(&file).unwrap();

    // The flood: SYNs from random sources at full speed, bounded in time
    // (stopped once the curl loop is done).
    let before = shmdump_json(&inst, &[]);
    let syns_before = backend_syns(&bed);
    let secs = FLOOD_LIMIT_S.to_string();
    let flood = bed.spawn(
        "cl",
        &[
            "timeout",
            "-s",
            "INT",
            &secs,
            "hping3",
            "-q",
            "-S",
            "-p",
            "80",
            "--flood",
            "--rand-source",
            VIP,
        ],
    );
    let flood_pid = flood.id() as i32;
    let flood_out = flood.stdout.take();
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    let (mut ok, mut failures, mut attempted) = (0usize, Vec::new(), 0usize);
    for _ in 0..REQUESTS {
        if failures.len() >= 20 {
            break;
        }
        attempted += 1;
        match curl(&bed) {
            Ok(body) if body.starts_with("backend") => ok += 1,
            Ok(body) => failures.push(format!("answer {body:?}")),
            Err(e) => failures.push(e),
        }
    }
    let curl_time = started.elapsed();
    // SAFETY: kill(2) on the pid of a child of this process not reaped yet
    // (the bed reaps on drop): `timeout` passes SIGINT on to hping3, which
    // prints its statistics and exits.
    unsafe { libc::kill(flood_pid, libc::SIGINT) };
    let mut flood_text = String::new();
    if let Some(mut out) = flood_out {
        use std::io::Read;
        let _ = out.read_to_string(&mut flood_text);
    }
    // The last counters published (a switch publishes after its last frame).
    std::thread::sleep(Duration::from_millis(500));
    let after = shmdump_json(&inst, &[]);
    let syns_after = backend_syns(&bed);
    let d = |n: &str| counter_sum(&after, n) - counter_sum(&before, n);
    let sent = d("syncookie_sent");
    let rx = d("rx_packets");
    eprintln!(
        "synproxy flood: {ok}/{attempted} curl requests in {curl_time:?}; \
         syncookie_sent {sent}, syncookie_ok {}, rx_packets {rx}, conn_new {}, conn_midflow {}, \
         drop_syncookie_bad {}, backend SYNs {}; hping3: {}; failures: {failures:?}",
        d("syncookie_ok"),
        d("conn_new"),
        d("conn_midflow"),
        d("drop_syncookie_bad"),
        syns_after - syns_before,
        flood_text.trim()
    );
    let deltas: Vec<(String, u64)> = after["switches"][0]["counters"]
        .as_object()
        .unwrap()
        .keys()
        .map(|k| (k.clone(), d(k)))
        .filter(|(_, v)| *v != 0)
        .collect();
    eprintln!("synproxy flood: counters grew by {deltas:?}");
    assert!(
        ok * 100 >= REQUESTS * 99,
        "{ok}/{attempted} succeeded: {failures:?}\ncontrold log:\n{}",
        app.log()
    );
    // No entry from the flood: every connection made during it is one of
    // curl's (each a cookie ACK), none picked up mid-flow.
    assert_eq!(d("conn_new"), ok as u64);
    assert_eq!(d("syncookie_ok"), ok as u64);
    assert_eq!(d("conn_midflow"), 0);
    // No flood SYN reached a backend: the backends answered exactly the
    // SYNs of curl's connections (and the switch's resends of them).
    assert_eq!(
        syns_after - syns_before,
        ok as u64,
        "backend SYNs (resent by the switch: {})",
        d("synproxy_syn_resent")
    );
    // The flood came through, and every frame the switch received is
    // accounted for: a flood SYN got a cookie (or was dropped as a
    // martian: random sources include 0/8, 127/8, 224/3), each of curl's
    // connections made one cookie ACK, and the rest were hits of its
    // connections.
    assert!(sent > 10 * ok as u64, "a flood of {sent} SYNs is no flood");
    // (Frames the kernel or the driver dropped before the switch received
    // them, `drop_rx_ring` and `drop_rx_truncated`, are not in `rx`.)
    let drops: u64 = deltas
        .iter()
        .filter(|(k, _)| k.starts_with("drop_") && !k.starts_with("drop_rx_"))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(
        rx,
        sent + d("syncookie_ok") + d("fwd_hit") + d("reply_hit") + drops,
        "{deltas:?}"
    );
    let dump = shmdump_json(&inst, &[]);
    let live = dump["connections"]["connections"].as_u64().unwrap_or(0);
    assert!(
        live <= (10 + 1 + ok) as u64,
        "{live} entries: {}",
        dump["connections"]
    );
    drop(app);
}

#[test]
fn a_spliced_download_survives_a_switch_killed_with_sigkill() {
    let mut bed = Bed::build();
    prepare(&mut bed, "nat");
    let (inst, app) = proxied_appliance(&bed);
    let dir = TempDir::new("synproxy-kill");
    let file = dir.0.join("download");
    let mut dl = std::process::Command::new("ip")
        .args(["netns", "exec", &bed.ns("cl")])
        .args([
            "curl",
            "-sS",
            "--max-time",
            "60",
            "--limit-rate",
            "2M",
            "-o",
            file.to_str().unwrap(),
            "-w",
            "%{http_code} %{size_download}",
            &format!("http://{VIP}/bytes/{DOWNLOAD}"),
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    struct Reap<'a>(&'a mut std::process::Child);
    impl Drop for Reap<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let dl = Reap(&mut dl);
    let region = app.region();
    wait_for(Duration::from_secs(20), || {
        let s = &region.switch_slots()[0];
        let ok = s.counter(shm_layout::switch_slot::Counter::SyncookieOk);
        let len = std::fs::metadata(&file).map_or(0, |m| m.len());
        if ok >= 1 && len > 2 << 20 {
            Ok(())
        } else {
            Err(format!("syncookie_ok {ok}, {len} bytes so far"))
        }
    });
    let old = switchyard_tests::switch_pids(&region)[0];
    // SAFETY: kill(2) with a pid read from the switch slot of our own
    // appliance, running (checked just above through its counters).
    assert_eq!(unsafe { libc::kill(old as i32, libc::SIGKILL) }, 0);
    wait_for(Duration::from_secs(20), || {
        let now = switchyard_tests::switch_pids(&region)[0];
        let live = region.switch_slots()[0].is_live();
        if now != old && live {
            Ok(())
        } else {
            Err(format!("switch pid {now} (killed {old}), live {live}"))
        }
    });
    let status = dl.0.wait().unwrap();
    let mut text = String::new();
    let mut err = String::new();
    use std::io::Read;
    dl.0.stdout
        .take()
        .unwrap()
        .read_to_string(&mut text)
        .unwrap();
    dl.0.stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(
        status.success() && text == format!("200 {DOWNLOAD}"),
        "download across the switch's restart: {status} {text:?} {err}\n{}",
        app.log()
    );
    assert!(
        intact(&std::fs::read(&file).unwrap(), DOWNLOAD),
        "download corrupted"
    );
    let dump = shmdump_json(&inst, &[]);
    // The new switch carried the spliced entry on: no pickup, no new cookie.
    assert_eq!(
        counter_sum(&dump, "conn_midflow"),
        0,
        "{}",
        dump["switches"][0]["counters"]
    );
    drop(app);
}
