//! Health checks end to end: the AF_PACKET NAT appliance in a namespace
//! checks real testbackend servers (HTTP, TCP and UDP checks through the
//! appliance namespace's kernel), takes a failing backend out of rotation,
//! applies the service's policy to its existing connections, and readmits
//! it only after `rise` passed checks. Every wait is bounded.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use switchyard_tests::netns::{Bed, afpacket_appliance, prepare};
use switchyard_tests::{Appliance, bin, counter_sum, shmdump_json, wait_for};

/// `text` with `insert` placed before `marker`, which must occur once.
fn before(text: &str, marker: &str, insert: &str) -> String {
    assert_eq!(text.matches(marker).count(), 1, "{marker:?} in\n{text}");
    text.replacen(marker, &format!("{insert}{marker}"), 1)
}

/// `text` with `insert` placed after `marker`, which must occur once.
fn after(text: &str, marker: &str, insert: &str) -> String {
    assert_eq!(text.matches(marker).count(), 1, "{marker:?} in\n{text}");
    text.replacen(marker, &format!("{marker}{insert}"), 1)
}

/// Reloads the running appliance with `edit` applied to its configuration
/// (health tables are reloadable) and waits for the new generation.
fn reload(app: &Appliance, edit: impl FnOnce(String) -> String) {
    let cfg = edit(std::fs::read_to_string(&app.config_path).unwrap());
    app.reload_and_wait(&cfg);
}

/// The published health of a backend ("up", "down" or "unchecked").
fn health(inst: &str, service: &str, backend: &str) -> String {
    let d = shmdump_json(inst, &[]);
    let svc = switchyard_tests::dump_service(&d, service);
    let b = svc["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == backend)
        .unwrap_or_else(|| panic!("no backend {backend}"))
        .clone();
    b["health"].as_str().unwrap().to_string()
}

/// Waits (at most 20 s) until the backend's published health is `want`.
fn wait_health(app: &Appliance, service: &str, backend: &str, want: &str) {
    switchyard_tests::wait_for(Duration::from_secs(20), || {
        let h = health(&app.instance, service, backend);
        if h == want {
            Ok(())
        } else {
            Err(format!(
                "{service}/{backend} stayed {h}, expected {want}:\n{}",
                app.log()
            ))
        }
    })
}

/// `n` curl requests to the VIP from the client: every one must succeed;
/// returns the answering backends' names.
fn curl_vip(bed: &Bed, app: &Appliance, n: usize) -> Vec<String> {
    (0..n)
        .map(|_| {
            let out = bed
                .exec(
                    "cl",
                    &["curl", "-sS", "--max-time", "5", "http://198.18.0.10/"],
                )
                .unwrap_or_else(|e| panic!("{e}\ncontrold log:\n{}", app.log()));
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        })
        .collect()
}

/// Pids of the processes in a bed namespace (ours: the bed is ours).
fn pids_in(bed: &Bed, role: &str) -> Vec<i32> {
    let out = Command::new("ip")
        .args(["netns", "pids", &bed.ns(role)])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect()
}

fn kill(pid: i32) {
    // SAFETY: kill(2) on a process this test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
}

/// Starts a testbackend in a namespace (killed when the bed drops) and
/// waits until it listens; returns its pid.
fn testbackend(bed: &mut Bed, role: &str, args: &[&str]) -> u32 {
    let tb = bin("testbackend");
    let mut all = vec![tb.to_str().unwrap()];
    all.extend_from_slice(args);
    let child = bed.spawn(role, &all);
    let pid = child.id();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("testbackend "), "{line}");
    pid
}

/// A process of this test, killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Removes a file on drop.
struct TempFile(std::path::PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Kill a backend's server: HTTP checks take it DOWN and no new request
/// reaches it; restarted, it stays out while its checks fail, and is
/// readmitted only once `rise` checks have passed; then it answers again.
#[test]
fn http_check_takes_a_dead_backend_out_and_readmits_it_after_rise_passes() {
    // Five passes to readmit at a 100 ms transition interval: the window
    // in which the backend is DOWN with 1..RISE passes is about 400 ms, long
    // beside one poll below, and the test requires seeing it.
    const RISE: u64 = 5;
    let mut bed = Bed::build();
    let port = prepare(&mut bed, "nat");
    let (inst, app) = afpacket_appliance(&bed, "nat", port);
    reload(&app, |cfg| {
        before(
            &cfg,
            "  [[service.backend]]\n  name = \"backend1\"",
            &format!(
                "[service.health]\nkind = \"http\"\npath = \"/health\"\ninterval_ms = 200\n\
                 fast_interval_ms = 100\ntimeout_ms = 200\nrise = {RISE}\nfall = 2\n"
            ),
        )
    });
    for b in ["backend1", "backend2", "backend3"] {
        assert_eq!(health(&inst, "web", b), "up");
    }
    assert_eq!(health(&inst, "dns", "dns2"), "unchecked");
    let seen = curl_vip(&bed, &app, 60);
    assert!(seen.iter().any(|s| s == "backend2"), "{seen:?}");

    // Kill backend2's server (the only process in its namespace).
    let pids = pids_in(&bed, "b2");
    assert_eq!(pids.len(), 1, "{pids:?}");
    kill(pids[0]);
    wait_health(&app, "web", "backend2", "down");
    let seen = curl_vip(&bed, &app, 60);
    assert!(!seen.iter().any(|s| s == "backend2"), "{seen:?}");
    assert!(
        app.log().contains(
            "service \"web\" backend \"backend2\" (http check of 198.19.0.12:8080) is DOWN"
        ),
        "{}",
        app.log()
    );

    // Restart it unhealthy (/health answers 503): it serves, but stays DOWN.
    let file = TempFile(std::env::temp_dir().join(format!("switchyard-health-{inst}")));
    let _ = std::fs::remove_file(&file.0);
    testbackend(
        &mut bed,
        "b2",
        &[
            "--name",
            "backend2",
            "--http",
            "198.19.0.12:8080",
            "--udp",
            "198.19.0.12:5353",
            "--health-file",
            file.0.to_str().unwrap(),
        ],
    );
    let stats = |bed: &Bed| -> (u64, u64) {
        let out = bed
            .exec(
                "lb",
                &[
                    "curl",
                    "-sS",
                    "--max-time",
                    "5",
                    "http://198.19.0.12:8080/stats",
                ],
            )
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let field = |k: &str| -> u64 {
            text.lines()
                .find_map(|l| l.strip_prefix(k))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or_else(|| panic!("{k} in {text:?}"))
        };
        (field("health_ok "), field("health_fail "))
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while stats(&bed).1 < 3 {
        assert!(
            Instant::now() < deadline,
            "no failed checks:\n{}",
            app.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(health(&inst, "web", "backend2"), "down");
    assert_eq!(stats(&bed).0, 0);

    // Healthy again: readmitted, and never before RISE checks passed (the
    // published state is read first, then the checks it has answered).
    std::fs::write(&file.0, b"").unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut down_while_passing = 0;
    loop {
        let h = health(&inst, "web", "backend2");
        let (ok, _) = stats(&bed);
        if h == "up" {
            assert!(ok >= RISE, "readmitted after {ok} passed checks");
            break;
        }
        assert_eq!(h, "down");
        if (1..RISE).contains(&ok) {
            down_while_passing += 1;
        }
        assert!(Instant::now() < deadline, "not readmitted:\n{}", app.log());
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        down_while_passing > 0,
        "never saw backend2 DOWN with 1..{RISE} passed checks: the readmission rule went unobserved"
    );
    let seen = curl_vip(&bed, &app, 60);
    assert!(seen.iter().any(|s| s == "backend2"), "{seen:?}");
    assert!(
        app.log()
            .contains("backend \"backend2\" (http check of 198.19.0.12:8080) is UP"),
        "{}",
        app.log()
    );
    drop(app);
}

/// TCP and UDP checks and the connection policies. backend3's checks go to
/// a separate "probe" server (TCP 8081, UDP 5354), so killing the probe
/// takes backend3 DOWN in both services while its real server keeps
/// serving: an established TCP connection to it is then reset by the
/// switch (web: on_backend_down = "reset"), and a UDP flow to it moves to a
/// live backend (dns: "reschedule"). New connections avoid it.
#[test]
fn tcp_and_udp_checks_reset_tcp_and_move_udp_flows_of_a_down_backend() {
    let mut bed = Bed::build();
    let port = prepare(&mut bed, "nat");
    let probe = testbackend(
        &mut bed,
        "b3",
        &[
            "--name",
            "probe3",
            "--http",
            "198.19.0.13:8081",
            "--udp",
            "198.19.0.13:5354",
        ],
    );
    let (inst, app) = afpacket_appliance(&bed, "nat", port);
    reload(&app, |cfg| {
        let timing =
            "interval_ms = 200\nfast_interval_ms = 100\ntimeout_ms = 200\nrise = 2\nfall = 2\n";
        let cfg = before(
            &cfg,
            "  [[service.backend]]\n  name = \"backend1\"",
            &format!("on_backend_down = \"reset\"\n[service.health]\nkind = \"tcp\"\n{timing}"),
        );
        let cfg = after(
            &cfg,
            "name = \"backend3\"\n  address = \"198.19.0.13\"\n  port = 8080\n  weight = 3\n",
            "  [service.backend.health]\n  port = 8081\n",
        );
        let cfg = before(
            &cfg,
            "  [[service.backend]]\n  name = \"dns1\"",
            &format!(
                "on_backend_down = \"reschedule\"\n[service.health]\nkind = \"udp\"\n\
                 payload = \"health\"\nexpect = \"backend\"\n{timing}"
            ),
        );
        after(
            &cfg,
            "name = \"dns3\"\n  address = \"198.19.0.13\"\n  port = 5353\n",
            "  [service.backend.health]\n  port = 5354\n  expect = \"probe3 health\"\n",
        )
    });
    // Let a few rounds of checks pass: everything stays UP.
    let gen_before = app.region().generation(shm_layout::Table::Config);
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(
        app.region().generation(shm_layout::Table::Config),
        gen_before,
        "a passing check changed the configuration:\n{}",
        app.log()
    );
    for (s, b) in [("web", "backend3"), ("dns", "dns1"), ("dns", "dns3")] {
        assert_eq!(health(&inst, s, b), "up");
    }

    // A client holds a keep-alive TCP connection answered by backend3 and
    // a UDP flow answered by backend3's UDP server (dns3).
    let script = r#"
import socket, sys
VIP = '198.18.0.10'
def get(s):
    s.sendall(b'GET / HTTP/1.1\r\nHost: x\r\n\r\n')
    data = b''
    while b'\r\n\r\n' not in data:
        d = s.recv(4096)
        if not d: raise EOFError('closed')
        data += d
    head, body = data.split(b'\r\n\r\n', 1)
    n = [int(l.split(b':')[1]) for l in head.split(b'\r\n') if l.lower().startswith(b'content-length')][0]
    while len(body) < n:
        d = s.recv(4096)
        if not d: raise EOFError('closed')
        body += d
    return body.decode().strip()
tcp = None
for i in range(40):
    s = socket.create_connection((VIP, 80), timeout=5)
    if get(s) == 'backend3':
        tcp = s
        break
    s.close()
udp = None
for i in range(40):
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.settimeout(5)
    u.sendto(b'hello', (VIP, 53))
    d, a = u.recvfrom(200)
    if d.startswith(b'backend3 '):
        udp = u
        break
    u.close()
print('ready', tcp is not None, udp is not None, flush=True)
sys.stdin.readline()
try:
    print('tcp', get(tcp), flush=True)
except ConnectionResetError:
    print('tcp reset', flush=True)
except Exception as e:
    print('tcp error', type(e).__name__, e, flush=True)
try:
    udp.sendto(b'again', (VIP, 53))
    d, a = udp.recvfrom(200)
    print('udp', d.decode(), flush=True)
except Exception as e:
    print('udp error', type(e).__name__, e, flush=True)
"#;
    let mut client = Proc(
        Command::new("ip")
            .args(["netns", "exec", &bed.ns("cl"), "python3", "-c", script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let (tx, lines) = mpsc::channel();
    let out = client.0.stdout.take().unwrap();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                return;
            }
        }
    });
    let line = |what: &str| {
        lines
            .recv_timeout(Duration::from_secs(120))
            .unwrap_or_else(|_| panic!("client said nothing ({what})"))
    };
    assert_eq!(line("ready"), "ready True True");

    // The probe dies: backend3 (TCP check) and dns3 (UDP check) go DOWN.
    kill(probe as i32);
    wait_health(&app, "web", "backend3", "down");
    wait_health(&app, "dns", "dns3", "down");
    assert_eq!(health(&inst, "web", "backend1"), "up");
    let dump = shmdump_json(&inst, &[]);
    let policy = |i: usize| dump["config"]["services"][i]["on_backend_down"].clone();
    assert_eq!(
        (policy(0), policy(1)),
        ("reset".into(), "reschedule".into())
    );

    let stdin = client.0.stdin.as_mut().unwrap();
    stdin.write_all(b"go\n").unwrap();
    stdin.flush().unwrap();
    assert_eq!(line("tcp"), "tcp reset");
    let udp = line("udp");
    assert!(
        udp == "udp backend1 again" || udp == "udp backend2 again",
        "{udp}"
    );
    // The switch publishes its counters on the loop after the last frame;
    // on a busy machine the client can have its answer first.
    wait_for(Duration::from_secs(10), || {
        let dump = shmdump_json(&inst, &[]);
        let (rst, moved) = (
            counter_sum(&dump, "down_rst"),
            counter_sum(&dump, "down_moved"),
        );
        if rst >= 1 && moved >= 1 {
            Ok(())
        } else {
            Err(format!("down_rst {rst}, down_moved {moved}"))
        }
    });

    let seen = curl_vip(&bed, &app, 30);
    assert!(!seen.iter().any(|s| s == "backend3"), "{seen:?}");
    drop(client);
    drop(app);
}
