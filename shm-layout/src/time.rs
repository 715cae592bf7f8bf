//! The clock every process of an instance shares: CLOCK_MONOTONIC.

/// Nanoseconds on CLOCK_MONOTONIC (shared by all processes on the machine).
#[inline]
pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid pointer; the
    // vDSO makes this a few nanoseconds, no syscall.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Whether a process with this pid exists (signal 0 probe). Pid 0 is never alive.
pub fn pid_alive(pid: u32) -> bool {
    if pid == 0 || pid > i32::MAX as u32 {
        return false;
    }
    // SAFETY: kill with signal 0 performs only the existence and permission check.
    let r = unsafe { libc::kill(pid as libc::pid_t, 0) };
    let exists = r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
    // A zombie (exited, not yet reaped, e.g. an orphan under a PID 1 that does
    // not reap) still answers signal 0 but will never act again.
    exists && !is_zombie(pid)
}

fn is_zombie(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    stat_fields(&stat)
        .and_then(|mut f| f.next())
        .is_some_and(|s| s == "Z" || s == "X")
}

/// The fields of a `/proc/<pid>/stat` line after `pid (comm)`, starting
/// with the state (field 3). The command name may hold spaces and
/// parentheses, so the fields start after the last ')'.
fn stat_fields(stat: &str) -> Option<std::str::SplitWhitespace<'_>> {
    stat.rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace())
}

/// A process's start time (clock ticks after boot, field 22 of
/// `/proc/<pid>/stat`), or `None` if there is no such process. A pid and
/// its start time name one process for the life of the machine: a pid the
/// kernel hands out again comes with a later start time.
pub fn process_start(pid: u32) -> Option<u64> {
    if pid == 0 || pid > i32::MAX as u32 {
        return None;
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_start(&stat)
}

fn parse_start(stat: &str) -> Option<u64> {
    // Field 3 is the first after the command name; field 22 is 19 later.
    stat_fields(stat)?.nth(19)?.parse().ok()
}

/// Whether the process that had `pid` and started at `start` (see
/// [`process_start`]) is still alive: the pid exists, is not a zombie, and
/// has not been reused by a process started since.
pub fn process_alive(pid: u32, start: u64) -> bool {
    start != 0 && pid_alive(pid) && process_start(pid) == Some(start)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_is_field_22_even_with_parentheses_in_the_name() {
        let line = "4242 (we(ir)d name) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(parse_start(line), Some(987654));
        assert_eq!(parse_start("4242 (x) S 1"), None);
    }

    #[test]
    fn own_process_is_alive_under_its_start_time_only() {
        let me = std::process::id();
        let start = process_start(me).expect("own start time");
        assert!(process_alive(me, start));
        assert!(
            !process_alive(me, start + 1),
            "a later start is another process"
        );
        assert!(!process_alive(me, 0), "no recorded start proves nothing");
    }
}
