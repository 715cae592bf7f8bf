//! Processes of an instance, named so that a pid the kernel hands out again
//! is never mistaken for one of ours.
//!
//! A region records each process as a pid and its start time
//! ([`shm_layout::time::process_start`]). Before controld signals or adopts
//! a process named there, [`verify`] proves it is the one recorded and one
//! of this instance's: same start time, same owner as controld, the right
//! program (`comm`) and, for a switch, `--instance NAME --switch N` on its
//! command line. The proof is made through a pidfd opened first, so it is
//! about the process the pidfd names; every signal then goes through that
//! pidfd and cannot reach a process that took the pid over since.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

/// Why a recorded process is not (or no longer) the one we may act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotOurs {
    #[error("pid {pid} has exited")]
    Gone { pid: u32 },
    #[error("pid {pid}: no start time recorded, so the process cannot be identified")]
    NoStartTime { pid: u32 },
    #[error(
        "pid {pid} started at tick {found}, not at tick {recorded} as recorded: the pid was reused"
    )]
    Reused { pid: u32, recorded: u64, found: u64 },
    #[error("pid {pid} belongs to uid {found}, not to uid {expected}")]
    Owner { pid: u32, found: u32, expected: u32 },
    #[error("pid {pid} is {found:?}, not {expected:?}")]
    Program {
        pid: u32,
        found: String,
        expected: &'static str,
    },
    #[error("pid {pid} is not {what} (its command line is {cmdline:?})")]
    Role {
        pid: u32,
        what: String,
        cmdline: String,
    },
    #[error("pid {pid}: {op}: {err}")]
    Os {
        pid: u32,
        op: &'static str,
        err: String,
    },
}

/// A process held through a pidfd: signals reach that process or none.
#[derive(Debug)]
pub struct Pidfd {
    fd: OwnedFd,
    pid: u32,
}

impl Pidfd {
    /// Opens a pidfd for `pid` (the process that has the pid now).
    pub fn open(pid: u32) -> Result<Self, NotOurs> {
        if pid == 0 || pid > i32::MAX as u32 {
            return Err(NotOurs::Gone { pid });
        }
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        if fd < 0 {
            let e = std::io::Error::last_os_error();
            return Err(if e.raw_os_error() == Some(libc::ESRCH) {
                NotOurs::Gone { pid }
            } else {
                NotOurs::Os {
                    pid,
                    op: "pidfd_open",
                    err: e.to_string(),
                }
            });
        }
        // SAFETY: the syscall returned a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        Ok(Self { fd, pid })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Sends `sig` to the process (an error once it has exited).
    pub fn signal(&self, sig: i32) -> std::io::Result<()> {
        // SAFETY: pidfd_send_signal with a valid pidfd, a null siginfo and no flags.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.fd.as_raw_fd(),
                sig,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    /// Whether the process has exited (its memory is gone: it can no
    /// longer touch the region). Waits up to `timeout`.
    pub fn wait_exit(&self, timeout: Duration) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let ms = left.as_millis().min(i32::MAX as u128) as i32;
            // SAFETY: poll on one valid pollfd we own for the call's duration.
            let r = unsafe { libc::poll(&mut pfd, 1, ms) };
            if r > 0 {
                return pfd.revents != 0;
            }
            // A signal handler (SIGHUP, SIGTERM) interrupts poll: wait on.
            let interrupted =
                r < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted;
            if !interrupted || Instant::now() >= deadline {
                return false;
            }
        }
    }

    pub fn exited(&self) -> bool {
        self.wait_exit(Duration::ZERO)
    }

    /// SIGTERM, then SIGKILL after `grace`; true once the process has exited.
    pub fn terminate(&self, grace: Duration) -> bool {
        let _ = self.signal(libc::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if self.wait_exit(Duration::from_millis(10)) {
                return true;
            }
        }
        let _ = self.signal(libc::SIGKILL);
        self.wait_exit(Duration::from_secs(5))
    }
}

/// What a process must be for us to act on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expected<'a> {
    /// The program (`/proc/<pid>/comm`).
    pub program: &'static str,
    /// Arguments that must follow each other on its command line.
    pub args: Vec<(&'a str, String)>,
}

impl Expected<'_> {
    /// A switchd of `instance` serving switch slot `index`.
    pub fn switchd(instance: &str, index: usize) -> Expected<'static> {
        Expected {
            program: "switchd",
            args: vec![
                ("--instance", instance.to_string()),
                ("--switch", index.to_string()),
            ],
        }
    }

    /// controld (any instance: the region it wrote names the instance).
    pub fn controld() -> Expected<'static> {
        Expected {
            program: "controld",
            args: Vec::new(),
        }
    }

    fn describe(&self) -> String {
        let mut s = self.program.to_string();
        for (k, v) in &self.args {
            s.push_str(&format!(" {k} {v}"));
        }
        s
    }
}

/// The facts about a live process that [`check`] judges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Facts {
    pub start: u64,
    pub uid: u32,
    pub comm: String,
    pub argv: Vec<String>,
}

impl Facts {
    /// Reads them from /proc (`None`: the process has gone).
    pub fn read(pid: u32) -> Option<Facts> {
        use std::os::unix::fs::MetadataExt;
        let start = shm_layout::time::process_start(pid)?;
        let uid = std::fs::metadata(format!("/proc/{pid}")).ok()?.uid();
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let argv = cmdline
            .split(|&b| b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        Some(Facts {
            start,
            uid,
            comm: comm.trim_end().to_string(),
            argv,
        })
    }
}

/// Judges `facts` of `pid` against what was recorded and is expected.
pub fn check(
    pid: u32,
    recorded_start: u64,
    my_uid: u32,
    expected: &Expected<'_>,
    facts: &Facts,
) -> Result<(), NotOurs> {
    if recorded_start == 0 {
        return Err(NotOurs::NoStartTime { pid });
    }
    if facts.start != recorded_start {
        return Err(NotOurs::Reused {
            pid,
            recorded: recorded_start,
            found: facts.start,
        });
    }
    if facts.uid != my_uid {
        return Err(NotOurs::Owner {
            pid,
            found: facts.uid,
            expected: my_uid,
        });
    }
    if facts.comm != expected.program {
        return Err(NotOurs::Program {
            pid,
            found: facts.comm.clone(),
            expected: expected.program,
        });
    }
    let has = |k: &str, v: &str| facts.argv.windows(2).any(|w| w[0] == k && w[1] == v);
    if !expected.args.iter().all(|(k, v)| has(k, v)) {
        return Err(NotOurs::Role {
            pid,
            what: expected.describe(),
            cmdline: facts.argv.join(" "),
        });
    }
    Ok(())
}

/// Proves that `pid` is still the process recorded with `start` and is what
/// `expected` says, and returns a pidfd to act on it (with its command line).
pub fn verify(
    pid: u32,
    start: u64,
    expected: &Expected<'_>,
) -> Result<(Pidfd, Vec<String>), NotOurs> {
    if start == 0 {
        return Err(NotOurs::NoStartTime { pid });
    }
    // Open first, check after: if the facts still match once the pidfd is
    // open, the pidfd names the recorded process (a reused pid would carry
    // another start time).
    let fd = Pidfd::open(pid)?;
    let facts = Facts::read(pid).ok_or(NotOurs::Gone { pid })?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    check(pid, start, me, expected, &facts)?;
    if fd.exited() {
        return Err(NotOurs::Gone { pid });
    }
    Ok((fd, facts.argv))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn switchd_facts() -> Facts {
        Facts {
            start: 500,
            uid: 0,
            comm: "switchd".into(),
            argv: "/usr/sbin/switchd --instance edge --switch 1 --vnic x"
                .split(' ')
                .map(String::from)
                .collect(),
        }
    }

    #[test]
    fn a_switchd_of_this_instance_and_slot_is_ours() {
        let e = Expected::switchd("edge", 1);
        assert_eq!(check(7, 500, 0, &e, &switchd_facts()), Ok(()));
    }

    #[test]
    fn each_mismatch_is_named() {
        let e = Expected::switchd("edge", 1);
        let f = switchd_facts();
        assert_eq!(check(7, 0, 0, &e, &f), Err(NotOurs::NoStartTime { pid: 7 }));
        assert_eq!(
            check(7, 499, 0, &e, &f),
            Err(NotOurs::Reused {
                pid: 7,
                recorded: 499,
                found: 500
            })
        );
        assert_eq!(
            check(7, 500, 1000, &e, &f),
            Err(NotOurs::Owner {
                pid: 7,
                found: 0,
                expected: 1000
            })
        );
        let sleeper = Facts {
            comm: "sleep".into(),
            ..f.clone()
        };
        assert!(matches!(
            check(7, 500, 0, &e, &sleeper),
            Err(NotOurs::Program { .. })
        ));
        for other in [Expected::switchd("edge", 0), Expected::switchd("core", 1)] {
            let err = check(7, 500, 0, &other, &f).unwrap_err();
            assert!(matches!(err, NotOurs::Role { .. }), "{err}");
        }
        // "--switch" and "1" apart do not make slot 1.
        let apart = Facts {
            argv: ["switchd", "--switch", "0", "--instance", "edge", "1"]
                .map(String::from)
                .to_vec(),
            ..f
        };
        assert!(check(7, 500, 0, &e, &apart).is_err());
    }

    #[test]
    fn a_live_process_is_verified_through_its_pidfd_and_a_reused_pid_is_not() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id();
        let start = shm_layout::time::process_start(pid).unwrap();
        // Until it has exec'd, the child is a copy of this test (bounded wait).
        for _ in 0..500 {
            if Facts::read(pid).is_some_and(|f| f.comm == "sleep" && f.argv.len() == 2) {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let sleep = Expected {
            program: "sleep",
            args: Vec::new(),
        };
        let (fd, argv) = verify(pid, start, &sleep).unwrap();
        assert_eq!(argv, ["sleep", "30"]);
        assert!(matches!(
            verify(pid, start - 1, &sleep),
            Err(NotOurs::Reused { .. })
        ));
        assert!(!fd.exited());
        assert!(fd.terminate(Duration::from_secs(5)));
        child.wait().unwrap();
        assert!(matches!(
            verify(pid, start, &sleep),
            Err(NotOurs::Gone { .. })
        ));
    }
}
