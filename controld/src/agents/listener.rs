//! The listener thread: receives datagrams on `[agents] listen`, has the
//! verifier judge them, leaves each agent's latest accepted report in the
//! inbox for the main loop, and logs the (rate-limited) alerts. It never
//! touches the region; the main loop never waits for it.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use agent_proto::Report;

use super::alerts::Alerts;
use super::verify::Verifier;

/// How often the thread looks at its stop flag and the alerts when no
/// datagram arrives.
const WAKE_EVERY: Duration = Duration::from_millis(100);

/// What the listener thread and the main loop share. Held only for a
/// check or a hand-over, never across I/O.
#[derive(Debug)]
pub struct Shared {
    pub verifier: Verifier,
    pub alerts: Alerts,
    /// Each agent's latest accepted report and when it arrived: bounded by
    /// the number of backend addresses, however fast agents send.
    pub inbox: HashMap<Ipv4Addr, (Report, Instant)>,
}

/// Locks `shared`; a panic elsewhere (impossible with `panic = "abort"`)
/// would not make the data invalid.
pub fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(|p| p.into_inner())
}

/// The running listener; dropping it stops and joins the thread (within
/// [`WAKE_EVERY`]) and closes the socket.
#[derive(Debug)]
pub struct Listener {
    addr: SocketAddrV4,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Listener {
    /// Binds `addr` and starts the thread.
    pub fn start(addr: SocketAddrV4, shared: Arc<Mutex<Shared>>) -> std::io::Result<Self> {
        let sock = UdpSocket::bind(addr)?;
        sock.set_read_timeout(Some(WAKE_EVERY))?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("agents".into())
            .spawn(move || run(&sock, &shared, &flag))?;
        Ok(Listener {
            addr,
            stop,
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddrV4 {
        self.addr
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn run(sock: &UdpSocket, shared: &Mutex<Shared>, stop: &AtomicBool) {
    // Larger than any report, so an oversized datagram shows its length.
    let mut buf = [0u8; 2048];
    let mut last_error_log: Option<Instant> = None;
    while !stop.load(Ordering::Relaxed) {
        match sock.recv_from(&mut buf) {
            Ok((n, SocketAddr::V4(src))) => {
                let now_ms = wall_ms();
                let at = Instant::now();
                let mut sh = lock(shared);
                match sh.verifier.check(&buf[..n], *src.ip(), now_ms) {
                    Ok(report) => {
                        sh.inbox.insert(*src.ip(), (report, at));
                    }
                    Err(why) => {
                        log::debug!("agents: dropped a report from {src}: {why}");
                        sh.alerts.record(*src.ip(), &why);
                    }
                }
            }
            Ok((_, SocketAddr::V6(_))) => {} // an IPv4 socket
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) => {}
            Err(e) => {
                if last_error_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                    log::error!("agents: receiving on {:?}: {e}", sock.local_addr());
                    last_error_log = Some(Instant::now());
                }
                std::thread::sleep(WAKE_EVERY);
            }
        }
        let mut sh = lock(shared);
        let totals = sh.verifier.counters();
        if let Some(line) = sh.alerts.due(Instant::now(), &totals) {
            drop(sh);
            log::warn!("{line}");
        }
    }
}
