//! Hostile input to the control plane: corrupted regions, files that are
//! not regular files, admin-socket abuse, forged sequence numbers, switches
//! that never stay up. Every process a test runs is bounded by a timeout,
//! so a hang fails the test instead of blocking it.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use switchyard_tests::{bin, unique};

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

/// Runs `cmd` for at most `limit`, killing it past that.
fn run_bounded(cmd: &mut Command, limit: Duration) -> Outcome {
    use std::os::unix::process::ExitStatusExt;
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
