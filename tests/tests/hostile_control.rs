//! Hostile input to the control plane: corrupted regions, files that are
//! not regular files, admin-socket abuse, forged sequence numbers, switches
//! that never stay up. Every process a test runs is bounded by a timeout,
//! so a hang fails the test instead of blocking it.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use switchyard_tests::{Appliance, Cfg, bin, render, unique};
use tools::appliance::dir_for;

/// What a bounded run of a process gave: its exit code (None when killed
/// by a signal or by the timeout), whether the timeout killed it, its output.
#[derive(Debug)]
struct Outcome {
    code: Option<i32>,
    signal: Option<i32>,
    timed_out: bool,
    stdout: String,
    stderr: String,
}

/// Runs `cmd` for at most `limit`, killing it past that. Its address space
/// is limited to 1 GiB, so a program that reads a file without bound fails
/// fast instead of taking the machine's memory.
fn run_bounded(cmd: &mut Command, limit: Duration) -> Outcome {
    use std::os::unix::process::{CommandExt, ExitStatusExt};
    // SAFETY: setrlimit is async-signal-safe; the closure allocates nothing.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 1 << 30,
                rlim_max: 1 << 30,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    };
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut out_pipe = child.stdout.take().unwrap();
    let mut err_pipe = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out_pipe.read_to_end(&mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err_pipe.read_to_end(&mut s);
        s
    });
    let deadline = Instant::now() + limit;
    let mut timed_out = false;
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        if Instant::now() >= deadline {
            timed_out = true;
            let _ = child.kill();
            break child.wait().expect("wait");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Outcome {
        code: status.code(),
        signal: status.signal(),
        timed_out,
        stdout: String::from_utf8_lossy(&out_t.join().unwrap()).into_owned(),
        stderr: String::from_utf8_lossy(&err_t.join().unwrap()).into_owned(),
    }
}

/// Removes a /dev/shm object on drop.
struct RmShm(String);
impl Drop for RmShm {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(format!("/dev/shm/{}", self.0));
    }
}

fn small_caps() -> shm_layout::Capacities {
    shm_layout::Capacities {
        conn_slots: 1024,
        services: 2,
        backends: 4,
        backend_ids: 16,
        maglev_m: 251,
        switches: 1,
        routes: 4,
        neighbours: 4,
        ..Default::default()
    }
}

/// A region whose published service claims 2^32-1 backends (a corrupted
/// count word): shmdump reports the defect by name and exits, instead of
/// sizing a buffer by the count (it aborted allocating 34 GB).
#[test]
fn shmdump_names_a_corrupted_backend_count_instead_of_aborting() {
    let inst = unique("corrupt");
    let region = shm_layout::Region::create(&inst, small_caps()).unwrap();
    let _rm = RmShm(region.name().to_string());
    region
        .publish_config(
            Duration::from_millis(100),
            &mut shm_layout::publish::cannot_fence,
            |s| {
                s.header.n_services = 1;
                s.header.n_backends = 2;
                s.services[0].vip = 0xc612_000a;
                s.services[0].port = 80;
                s.services[0].proto = shm_layout::config_slot::PROTO_TCP;
                s.services[0].backend_start = 0;
                s.services[0].backend_count = u32::MAX;
                for (i, b) in s.backends[..2].iter_mut().enumerate() {
                    b.id = i as u32;
                    b.ip = 0xc613_0101 + i as u32;
                    b.port = 8080;
                }
            },
        )
        .unwrap();
    for json in [false, true] {
        let mut cmd = Command::new(bin("shmdump"));
        cmd.args(["--instance", &inst]);
        if json {
            cmd.arg("--json");
        }
        let out = run_bounded(&mut cmd, Duration::from_secs(30));
        assert!(!out.timed_out && out.signal.is_none(), "{out:?}");
        assert_eq!(out.code, Some(3), "{out:?}");
        assert!(
            out.stderr.contains(
                "shmdump: region corrupt: config: service 0: backend_count 4294967295 (from backend_start 0) exceeds the slot's 2 backends"
            ),
            "{out:?}"
        );
    }
}

/// A temporary directory, removed on drop.
struct TempDir(std::path::PathBuf);
impl TempDir {
    fn new(tag: &str) -> Self {
        let d = std::env::temp_dir().join(unique(tag));
        std::fs::create_dir_all(&d).unwrap();
        Self(d)
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn mkfifo(path: &std::path::Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path that outlives the call.
    let rc = unsafe { libc::mkfifo(c.as_ptr(), 0o600) };
    assert_eq!(rc, 0, "mkfifo {path:?}");
}

fn check(config: &std::path::Path) -> Outcome {
    run_bounded(
        Command::new(bin("controld"))
            .arg("--config")
            .arg(config)
            .arg("--check"),
        Duration::from_secs(20),
    )
}

/// A configuration or secret file that is a FIFO or a device is refused at
/// once, naming the path and what it is (a FIFO blocked the read forever,
/// /dev/zero was read without bound).
#[test]
fn check_refuses_config_and_secret_files_that_are_not_regular_files() {
    let dir = TempDir::new("fifo");
    let fifo = dir.0.join("fifo.toml");
    mkfifo(&fifo);

    let out = check(&fifo);
    assert!(!out.timed_out, "{out:?}");
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stderr.contains(&format!(
            "{}: is a FIFO, not a regular file",
            fifo.display()
        )),
        "{out:?}"
    );

    let out = check(std::path::Path::new("/dev/zero"));
    assert!(!out.timed_out, "{out:?}");
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stderr
            .contains("/dev/zero: is a character device, not a regular file"),
        "{out:?}"
    );

    let inst = unique("secret");
    let base = render(&inst, &Cfg::default());
    for (secret, found) in [
        (fifo.display().to_string(), "a FIFO"),
        ("/dev/zero".to_string(), "a character device"),
    ] {
        let path = dir.0.join("c.toml");
        std::fs::write(
            &path,
            format!("{base}\n[agents]\nlisten = \"127.0.0.1:7007\"\nsecret_file = \"{secret}\"\n"),
        )
        .unwrap();
        let out = check(&path);
        assert!(!out.timed_out, "{out:?}");
        assert_eq!(out.code, Some(1), "{out:?}");
        assert!(
            out.stderr.contains(&format!(
                "agents: secret_file \"{secret}\": is {found}, not a regular file"
            )),
            "{out:?}"
        );
    }
}

/// A config file replaced by a FIFO: the reload is refused at once and
/// controld keeps serving (it blocked in open(2), so the admin socket and
/// the GC stopped).
#[test]
fn reload_from_a_fifo_is_refused_and_controld_keeps_answering() {
    let inst = unique("rlfifo");
    let sock = dir_for(&inst).join("admin.sock");
    let cfg =
        render(&inst, &Cfg::default()) + &format!("\n[admin]\nsocket = \"{}\"\n", sock.display());
    let app = Appliance::start(&inst, &cfg);
    std::fs::remove_file(&app.config_path).unwrap();
    mkfifo(&app.config_path);
    app.signal(libc::SIGHUP);
    let want = format!(
        "{}: is a FIFO, not a regular file",
        app.config_path.display()
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !app.log().contains(&want) {
        assert!(
            Instant::now() < deadline,
            "no refusal logged:\n{}",
            app.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = run_bounded(
        Command::new(bin("lbctl"))
            .arg("--socket")
            .arg(&sock)
            .args(["--timeout", "10", "show"]),
        Duration::from_secs(20),
    );
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.contains("web1"), "{out:?}");
    // lbctl reload reads the same path: refused with the same words.
    let out = run_bounded(
        Command::new(bin("lbctl"))
            .arg("--socket")
            .arg(&sock)
            .args(["--timeout", "10", "reload"]),
        Duration::from_secs(20),
    );
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stderr.contains(&want) || out.stdout.contains(&want),
        "{out:?}"
    );
}

/// Removes every /dev/shm object of an instance on drop.
struct RmInstance(String);
impl Drop for RmInstance {
    fn drop(&mut self) {
        let prefix = format!("switchyard.{}", self.0);
        if let Ok(rd) = std::fs::read_dir("/dev/shm") {
            for e in rd.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if n == prefix || n.starts_with(&format!("{prefix}.")) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        let _ = std::fs::remove_dir_all(dir_for(&self.0));
    }
}

/// A FIFO planted at the region's path: controld refuses to start and
/// shmdump refuses to read, both at once and naming it (both hung in open).
#[test]
fn fifo_at_the_region_path_is_refused_by_controld_and_shmdump() {
    let inst = unique("shmfifo");
    let _rm = RmInstance(inst.clone());
    let region = std::path::PathBuf::from(format!("/dev/shm/switchyard.{inst}"));
    mkfifo(&region);
    let want = format!("switchyard.{inst}: is a FIFO, not a regular file");

    let out = run_bounded(
        Command::new(bin("shmdump")).args(["--instance", &inst]),
        Duration::from_secs(20),
    );
    assert!(!out.timed_out, "{out:?}");
    assert_eq!(out.code, Some(2), "{out:?}");
    assert!(out.stderr.contains(&want), "{out:?}");

    let dir = TempDir::new("shmfifo-cfg");
    let path = dir.0.join("c.toml");
    std::fs::write(&path, render(&inst, &Cfg::default())).unwrap();
    let out = run_bounded(
        Command::new(bin("controld")).arg("--config").arg(&path),
        Duration::from_secs(20),
    );
    assert!(!out.timed_out, "{out:?}");
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains(&want), "{out:?}");
    assert!(region.exists(), "controld removed what it did not create");
}

/// 40 idle admin clients and 32 that drip a request byte by byte held
/// every one of the 32 client slots (the idle timeout was per read), so
/// lbctl was turned away ("too many admin clients") for as long as they
/// liked. A new client now takes the slot of the longest-idle one; and a
/// request with a repeated key is refused, not run as its last value.
#[test]
fn idle_and_dripping_admin_clients_do_not_lock_lbctl_out() {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixStream;
    let inst = unique("lockout");
    let sock = dir_for(&inst).join("admin.sock");
    let cfg =
        render(&inst, &Cfg::default()) + &format!("\n[admin]\nsocket = \"{}\"\n", sock.display());
    let _app = Appliance::start(&inst, &cfg);
    let mut held = Vec::new();
    for _ in 0..40 {
        held.push(UnixStream::connect(&sock).unwrap());
    }
    for _ in 0..32 {
        let mut s = UnixStream::connect(&sock).unwrap();
        let _ = s.write_all(b"{");
        held.push(s);
    }
    let out = run_bounded(
        Command::new(bin("lbctl"))
            .arg("--socket")
            .arg(&sock)
            .args(["--timeout", "30", "show"]),
        Duration::from_secs(60),
    );
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.contains("web1"), "{out:?}");

    let mut c = UnixStream::connect(&sock).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    c.write_all(b"{\"cmd\":\"show\",\"cmd\":\"reload\"}\n")
        .unwrap();
    let mut line = String::new();
    BufReader::new(&c).read_line(&mut line).unwrap();
    assert_eq!(
        line,
        "{\"error\":\"request has the key \\\"cmd\\\" more than once; give each key once\",\"ok\":false}\n"
    );
    drop(held);
}

/// A controld started by hand (not [`Appliance`]: its switchd is a stand-in),
/// its log kept in a file; SIGTERMed and reaped on drop, bounded.
struct Controld {
    child: std::process::Child,
    log: std::path::PathBuf,
}

impl Controld {
    fn spawn(inst: &str, dir: &std::path::Path, switchd: &std::path::Path) -> Self {
        let sock = dir.join("admin.sock");
        let cfg = render(inst, &Cfg::default())
            + &format!("\n[admin]\nsocket = \"{}\"\n", sock.display());
        let path = dir.join("c.toml");
        std::fs::write(&path, cfg).unwrap();
        let log = dir.join("controld.log");
        let f = std::fs::File::create(&log).unwrap();
        let child = Command::new(bin("controld"))
            .arg("--config")
            .arg(&path)
            .arg("--switchd")
            .arg(switchd)
            .env("RUST_LOG", "info")
            .stdout(Stdio::from(f.try_clone().unwrap()))
            .stderr(Stdio::from(f))
            .spawn()
            .unwrap();
        Self { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (at most `limit`) until the log contains `want`.
    fn wait_log(&mut self, want: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let log = self.log();
            if log.contains(want) {
                return log;
            }
            assert!(
                Instant::now() < deadline,
                "no {want:?} in {limit:?}:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits (at most `limit`) for controld to exit by itself.
    fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Controld {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own unreaped child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        if self.wait_exit(Duration::from_secs(10)).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A switchd that exits at once was restarted for ever (after 5 starts in
/// 10 s, once a second); the documented limit is 5 restarts in 10 s, after
/// which the switch is marked failed, controld says so, and nothing more is
/// started.
#[test]
fn a_switch_that_keeps_exiting_is_marked_failed_after_five_restarts() {
    use std::os::unix::fs::PermissionsExt;
    let inst = unique("crashloop");
    let _rm = RmInstance(inst.clone());
    let dir = TempDir::new("crashloop");
    let fake = dir.0.join("switchd");
    std::fs::write(&fake, "#!/bin/sh\nexit 3\n").unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut c = Controld::spawn(&inst, &dir.0, &fake);
    let failed = "switch 0 (sw0) failed: restarted 5 times within 10s and exited again; not restarting it (fix the cause, then restart controld: the region and its connections are adopted)";
    c.wait_log(failed, Duration::from_secs(60));
    let starts = |log: &str| log.matches("switch 0 (sw0) started").count();
    let log = c.log();
    assert_eq!(starts(&log), 6, "{log}");
    // The old rule started it again every second from here: give it the
    // time for two such starts and count again.
    std::thread::sleep(Duration::from_millis(2500));
    let log = c.log();
    assert_eq!(starts(&log), 6, "{log}");
    let dump = run_bounded(
        Command::new(bin("shmdump")).args(["--instance", &inst, "--json"]),
        Duration::from_secs(20),
    );
    let v: serde_json::Value = serde_json::from_str(&dump.stdout).unwrap();
    assert_eq!(v["switches"][0]["state"], "failed", "{dump:?}");
    assert_eq!(v["switches"][0]["restarts"], 5, "{dump:?}");
}

/// A switchd path that is not executable: controld exits naming the path
/// (it said only "Permission denied (os error 13)").
#[test]
fn a_switchd_that_cannot_be_executed_is_named() {
    use std::os::unix::fs::PermissionsExt;
    let inst = unique("noexec");
    let _rm = RmInstance(inst.clone());
    let dir = TempDir::new("noexec");
    let fake = dir.0.join("switchd");
    std::fs::write(&fake, "#!/bin/sh\nexit 3\n").unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut c = Controld::spawn(&inst, &dir.0, &fake);
    let st = c.wait_exit(Duration::from_secs(30));
    assert_eq!(st.and_then(|s| s.code()), Some(1), "{}", c.log());
    let want = format!(
        "controld: switch 0 (sw0): cannot start {}: Permission denied (os error 13)\n",
        fake.display()
    );
    let log = c.log();
    assert!(log.contains(&want), "{log}");
    assert_eq!(log.matches("Permission denied").count(), 1, "{log}");
}

/// The metrics port is taken: controld exits, saying so once, and removes
/// the admin socket it had bound (it was left behind, and the error text
/// came twice).
#[test]
fn a_taken_metrics_port_leaves_no_admin_socket_and_one_error() {
    let inst = unique("metricsport");
    let _rm = RmInstance(inst.clone());
    let dir = TempDir::new("metricsport");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let sock = dir.0.join("admin.sock");
    let path = dir.0.join("c.toml");
    std::fs::write(
        &path,
        render(&inst, &Cfg::default())
            + &format!(
                "\n[admin]\nsocket = \"{}\"\nmetrics = \"{addr}\"\n",
                sock.display()
            ),
    )
    .unwrap();
    let out = run_bounded(
        Command::new(bin("controld")).arg("--config").arg(&path),
        Duration::from_secs(30),
    );
    assert_eq!(out.code, Some(1), "{out:?}");
    let want = format!("[admin] metrics {addr}: cannot listen: ");
    assert_eq!(out.stderr.matches(&want).count(), 1, "{out:?}");
    assert_eq!(
        out.stderr.matches("Address already in use").count(),
        1,
        "{out:?}"
    );
    assert!(!sock.exists(), "admin socket left behind: {out:?}");
    drop(taken);
}
