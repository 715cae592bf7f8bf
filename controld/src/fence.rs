//! Fencing a switch the publisher stopped waiting for.
//!
//! The A/B protocol (`shm_layout::publish`) rewrites a slot only after
//! every running switch acknowledged that it no longer reads it; a switch
//! that does not within `ack_timeout` (stopped, descheduled, stuck in a
//! page fault) may still be inside a burst over that slot. Before the
//! rewrite, [`fence_child`] makes sure it never resumes: it kills the
//! process and returns once the process has exited (all its threads gone,
//! so its mapping of the region is gone too). It does not reap: the
//! supervisor does that on its next poll, logs the exit and restarts the
//! switch; the shared connection table carries its connections on.

use crate::procs::{NotOurs, Pidfd};
use std::io;
use std::time::{Duration, Instant};

/// How long a killed switch may take to be gone before fencing fails (and
/// the publication with it, to be retried): SIGKILL ends a process within
/// microseconds unless it sits in an uninterruptible kernel wait.
pub const FENCE_WAIT: Duration = Duration::from_secs(2);

/// Why a switch could not be fenced.
#[derive(Debug, thiserror::Error)]
pub enum FenceError {
    #[error("no pid recorded")]
    NoPid,
    #[error("pid {pid} is not a child of this controld (its parent is {parent}): not killed")]
    NotOurChild { pid: u32, parent: u32 },
    #[error("{op}: {source}")]
    Os {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("still running {FENCE_WAIT:?} after SIGKILL")]
    Timeout,
}

/// How a switch was fenced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fenced {
    /// Killed, and gone after this long.
    Killed(Duration),
    /// No process had that pid any more.
    AlreadyGone,
}

/// The publisher's fencing callback for any switch of this instance, our
/// child or one adopted from a previous controld: the process is proved to
/// be this instance's switchd for slot `switch` (pid and recorded start
/// time, owner, program, arguments; see [`crate::procs::verify`]), killed
/// through its pidfd and waited for (at most [`FENCE_WAIT`]). A process
/// that has gone is fenced already; one that cannot be proved ours falls
/// back to [`fence_child`] (which kills only an unreaped child).
pub fn fence_switch(region: &shm_layout::Region, switch: usize, pid: u32) -> bool {
    use crate::procs::{self, Expected, NotOurs};
    let Some(slot) = region.switch_slots().get(switch) else {
        return false;
    };
    let start = slot.proc_start.load(std::sync::atomic::Ordering::Relaxed);
    let instance = shm_layout::names::get(&region.header().instance).to_string();
    match procs::verify(pid, start, &Expected::switchd(&instance, switch)) {
        Ok((fd, _)) => {
            let t0 = Instant::now();
            let _ = fd.signal(libc::SIGKILL);
            if fd.wait_exit(FENCE_WAIT) {
                log::error!(
                    "switch {switch} (pid {pid}) fenced: killed, gone after {:.1} ms; the supervisor restarts it",
                    t0.elapsed().as_secs_f64() * 1e3
                );
                true
            } else {
                log::error!(
                    "switch {switch} (pid {pid}) cannot be fenced: still running {FENCE_WAIT:?} after SIGKILL"
                );
                false
            }
        }
        Err(NotOurs::Gone { .. }) => {
            log::warn!("switch {switch} (pid {pid}) fenced: already gone");
            true
        }
        Err(e) => {
            log::warn!("switch {switch} (pid {pid}): {e}; trying it as our child");
            fence_child(switch, pid)
        }
    }
}

/// The publisher's fencing callback for switches that are children of
/// this controld: true once switch `switch` (pid `pid`) can no longer
/// touch the region. Logs the outcome either way.
pub fn fence_child(switch: usize, pid: u32) -> bool {
    match kill_child_and_wait(pid) {
        Ok(Fenced::Killed(took)) => {
            log::error!(
                "switch {switch} (pid {pid}) fenced: killed, gone after {:.1} ms; the supervisor restarts it",
                took.as_secs_f64() * 1e3
            );
            true
        }
        Ok(Fenced::AlreadyGone) => {
            log::warn!("switch {switch} (pid {pid}) fenced: already gone");
            true
        }
        Err(e) => {
            log::error!("switch {switch} (pid {pid}) cannot be fenced: {e}");
            false
        }
    }
}

/// Kills `pid` if it is an unreaped child of ours and waits (at most
/// [`FENCE_WAIT`]) until it has exited. The process is held by a pidfd
/// from before the parent check on, so nothing else can be signalled even
/// if the pid is reused; an unreaped child's pid is not reused anyway, and
/// only we reap our children (on this thread, in the supervisor).
pub fn kill_child_and_wait(pid: u32) -> Result<Fenced, FenceError> {
    if pid == 0 {
        return Err(FenceError::NoPid);
    }
    let fd = match Pidfd::open(pid) {
        Ok(fd) => fd,
        Err(NotOurs::Gone { .. }) => return Ok(Fenced::AlreadyGone),
        Err(e) => {
            return Err(FenceError::Os {
                op: "pidfd_open",
                source: io::Error::other(e.to_string()),
            });
        }
    };
    let parent = match parent_of(pid) {
        Ok(p) => p,
        // Exited and reaped since pidfd_open (by a parent that is not us).
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Fenced::AlreadyGone),
        Err(source) => {
            return Err(FenceError::Os {
                op: "reading /proc/PID/stat",
                source,
            });
        }
    };
    if parent != std::process::id() {
        return Err(FenceError::NotOurChild { pid, parent });
    }
    let start = Instant::now();
    if let Err(e) = fd.signal(libc::SIGKILL) {
        // ESRCH: it has exited already; the wait below returns at once.
        if e.raw_os_error() != Some(libc::ESRCH) {
            return Err(FenceError::Os {
                op: "pidfd_send_signal",
                source: e,
            });
        }
    }
    // A pidfd becomes readable once the whole thread group has exited.
    if fd.wait_exit(FENCE_WAIT) {
        Ok(Fenced::Killed(start.elapsed()))
    } else {
        Err(FenceError::Timeout)
    }
}

/// The parent pid of `pid`, from /proc/PID/stat (field 4, after the
/// command name, which may itself hold spaces and parentheses).
fn parent_of(pid: u32) -> io::Result<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(1))
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("{stat:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;
    use std::process::{Command, Stdio};

    /// A stopped child is killed and gone when fencing returns; it stays
    /// for the caller to reap.
    #[test]
    fn stopped_child_is_killed_and_gone_before_fencing_returns() {
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let pid = child.id();
        // SAFETY: kill(2) on our own unreaped child.
        assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGSTOP) }, 0);
        assert!(matches!(kill_child_and_wait(pid), Ok(Fenced::Killed(_))));
        // Exited (a zombie until reaped): reaping does not wait.
        let status = child.try_wait().unwrap().expect("exited");
        assert_eq!(status.signal(), Some(libc::SIGKILL));
        // Reaped: nothing is left to fence.
        assert!(matches!(kill_child_and_wait(pid), Ok(Fenced::AlreadyGone)));
    }

    /// A process that is not our child is not signalled.
    #[test]
    fn grandchild_is_not_killed() {
        let mut sh = Command::new("sh")
            .args(["-c", "sleep 30 & echo $!; wait"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        use std::io::BufRead;
        io::BufReader::new(sh.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let pid: u32 = line.trim().parse().unwrap();
        let e = kill_child_and_wait(pid).unwrap_err();
        assert!(
            matches!(e, FenceError::NotOurChild { pid: p, parent } if p == pid && parent == sh.id()),
            "{e}"
        );
        assert!(shm_layout::time::pid_alive(pid));
        // SAFETY: kill(2) on the sleep we started through sh, then on sh.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        let _ = sh.kill();
        let _ = sh.wait();
        assert!(!fence_child(0, 0));
    }
}
