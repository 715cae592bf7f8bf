//! testbackend: a tiny HTTP/1.1 and UDP echo server that says which backend
//! answered, for tests and demos.
//!
//! HTTP: `GET /` answers `<name>\n`; `GET /bytes/N` answers N bytes of a
//! fixed pattern (byte i is `i % 251`), for integrity-checked downloads;
//! `GET /health` answers `200 ok\n` (with `--health-file F`: only while F
//! exists, else `503 unhealthy\n`, so a test can fail its health checks
//! while it keeps serving); `GET /stats` answers
//! `health_ok <n>\nhealth_fail <n>\nconnections <n>\ndatagrams <n>\n`,
//! the /health answers, the TCP connections accepted (not counting /stats
//! requests) and the UDP datagrams answered so far;
//! `POST /upload` reads a body of Content-Length bytes of the `/bytes`
//! pattern and answers `<n> intact\n` or `<n> corrupt at <offset>\n`, for
//! integrity-checked uploads. Keep-alive unless the client says close.
//! With `--slow-above K` the server overloads like a real one past K
//! requests in progress: each further request is answered `--slow-ms` late,
//! and it accepts no connection while more than K are in progress, so its
//! listen queue (`--backlog`) overflows and the kernel drops new SYNs
//! (clients retransmit them a second later); `--work-ms` gives every
//! request a service time. `/stats` then also says
//! `requests <n>\nslow <n>\nbusy_max <n>`.
//! UDP: every datagram is answered with `<name> <datagram>`.
//! On start it prints one line: `testbackend <name> http=<addr> udp=<addr>`.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use clap::Parser;

#[derive(Parser, Debug)]
#[command(version, about = "HTTP/1.1 and UDP echo server that names itself")]
struct Args {
    /// The name it answers with.
    #[arg(long)]
    name: String,
    /// HTTP listen address (port 0 picks one).
    #[arg(long)]
    http: Option<SocketAddr>,
    /// UDP listen address (port 0 picks one).
    #[arg(long)]
    udp: Option<SocketAddr>,
    /// `GET /health` answers 200 only while this file exists (503 otherwise).
    #[arg(long)]
    health_file: Option<std::path::PathBuf>,
    /// Overloaded past this many requests in progress (see above).
    #[arg(long)]
    slow_above: Option<u64>,
    /// How late an overloaded request is answered.
    #[arg(long, default_value_t = 200)]
    slow_ms: u64,
    /// Time every request (but /stats) takes, loaded or not.
    #[arg(long, default_value_t = 0)]
    work_ms: u64,
    /// Listen backlog of the HTTP socket.
    #[arg(long, default_value_t = 128)]
    backlog: i32,
}

/// What every connection shares: the name, the download pattern, the
/// health switch and the /health answers counted.
struct Shared {
    name: String,
    chunk: Vec<u8>,
    health_file: Option<std::path::PathBuf>,
    health_ok: AtomicU64,
    health_fail: AtomicU64,
    slow_above: Option<u64>,
    slow_ms: u64,
    work_ms: u64,
    /// Requests in progress, served, served late, most at once.
    busy: AtomicU64,
    requests: AtomicU64,
    slow: AtomicU64,
    busy_max: AtomicU64,
    /// TCP connections accepted, /stats requests among them, UDP
    /// datagrams answered: what a TCP or UDP health check leaves behind.
    accepted: AtomicU64,
    stats_requests: AtomicU64,
    datagrams: AtomicU64,
}

/// One request in progress (counted in `busy` until dropped).
struct Busy<'a>(&'a Shared);

impl<'a> Busy<'a> {
    /// Counts the request in and, if the server is overloaded, waits.
    fn enter(sh: &'a Shared) -> Self {
        let n = sh.busy.fetch_add(1, Ordering::SeqCst) + 1;
        sh.requests.fetch_add(1, Ordering::Relaxed);
        sh.busy_max.fetch_max(n, Ordering::Relaxed);
        let mut ms = sh.work_ms;
        if sh.slow_above.is_some_and(|k| n > k) {
            sh.slow.fetch_add(1, Ordering::Relaxed);
            ms += sh.slow_ms;
        }
        if ms > 0 {
            std::thread::sleep(std::time::Duration::from_millis(ms));
        }
        Busy(sh)
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Largest `/bytes/N` served (1 GiB).
const MAX_BYTES: u64 = 1 << 30;

fn pattern_chunk() -> Vec<u8> {
    // 251 is prime, so the pattern never lines up with power-of-two chunks.
    (0..64 * 251).map(|i| (i % 251) as u8).collect()
}

fn respond(out: &mut TcpStream, status: &str, body_len: u64, close: bool) -> std::io::Result<()> {
    write!(
        out,
        "HTTP/1.1 {status}\r\nContent-Length: {body_len}\r\nContent-Type: text/plain\r\nConnection: {}\r\n\r\n",
        if close { "close" } else { "keep-alive" }
    )
}

fn serve(stream: TcpStream, sh: Arc<Shared>) -> std::io::Result<()> {
    let (name, chunk) = (&sh.name, &sh.chunk);
    let _ = stream.set_nodelay(true);
    let mut out = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let mut parts = line.split_whitespace();
        let (method, path, version) = (
            parts.next().unwrap_or(""),
            parts.next().unwrap_or(""),
            parts.next().unwrap_or(""),
        );
        let mut close = version == "HTTP/1.0";
        let mut content_length = 0u64;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h)? == 0 {
                return Ok(());
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                if k.trim().eq_ignore_ascii_case("connection") {
                    close = v.trim().eq_ignore_ascii_case("close");
                } else if k.trim().eq_ignore_ascii_case("content-length") {
                    content_length = v.trim().parse().unwrap_or(0);
                }
            }
        }
        if method == "POST" && path == "/upload" && content_length <= MAX_BYTES {
            let body = format!(
                "{content_length} {}\n",
                check_upload(&mut reader, content_length)?
            );
            respond(&mut out, "200 OK", body.len() as u64, close)?;
            out.write_all(body.as_bytes())?;
            out.flush()?;
            if close {
                return Ok(());
            }
            continue;
        }
        if method != "GET" && method != "HEAD" {
            let body = b"only GET and HEAD\n";
            respond(&mut out, "405 Method Not Allowed", body.len() as u64, true)?;
            out.write_all(body)?;
            return Ok(());
        }
        let head = method == "HEAD";
        let _busy = (path != "/stats").then(|| Busy::enter(&sh));
        if let Some(n) = path.strip_prefix("/bytes/") {
            match n.parse::<u64>() {
                Ok(n) if n <= MAX_BYTES => {
                    respond(&mut out, "200 OK", n, close)?;
                    let mut left = if head { 0 } else { n };
                    while left > 0 {
                        let k = left.min(chunk.len() as u64) as usize;
                        out.write_all(&chunk[..k])?;
                        left -= k as u64;
                    }
                }
                _ => {
                    let body = format!("bad size {n:?} (0..={MAX_BYTES})\n");
                    respond(&mut out, "400 Bad Request", body.len() as u64, close)?;
                    out.write_all(body.as_bytes())?;
                }
            }
        } else {
            let (status, body) = match path {
                "/health" if sh.health_file.as_ref().is_none_or(|f| f.exists()) => {
                    sh.health_ok.fetch_add(1, Ordering::Relaxed);
                    ("200 OK", "ok\n".to_string())
                }
                "/health" => {
                    sh.health_fail.fetch_add(1, Ordering::Relaxed);
                    ("503 Service Unavailable", "unhealthy\n".to_string())
                }
                "/stats" => {
                    let stats = sh.stats_requests.fetch_add(1, Ordering::Relaxed) + 1;
                    let mut body = format!(
                        "health_ok {}\nhealth_fail {}\nconnections {}\ndatagrams {}\n",
                        sh.health_ok.load(Ordering::Relaxed),
                        sh.health_fail.load(Ordering::Relaxed),
                        sh.accepted.load(Ordering::Relaxed).saturating_sub(stats),
                        sh.datagrams.load(Ordering::Relaxed),
                    );
                    if sh.slow_above.is_some() {
                        body += &format!(
                            "requests {}\nslow {}\nbusy_max {}\n",
                            sh.requests.load(Ordering::Relaxed),
                            sh.slow.load(Ordering::Relaxed),
                            sh.busy_max.load(Ordering::Relaxed),
                        );
                    }
                    ("200 OK", body)
                }
                _ => ("200 OK", format!("{name}\n")),
            };
            respond(&mut out, status, body.len() as u64, close)?;
            if !head {
                out.write_all(body.as_bytes())?;
            }
        }
        out.flush()?;
        if close {
            return Ok(());
        }
    }
}

/// Reads `n` body bytes and checks them against the pattern (byte i is
/// `i % 251`): "intact" or "corrupt at <first bad offset>".
fn check_upload(reader: &mut impl std::io::Read, n: u64) -> std::io::Result<String> {
    let mut buf = vec![0u8; 64 * 1024];
    let (mut at, mut bad) = (0u64, None);
    while at < n {
        let want = (n - at).min(buf.len() as u64) as usize;
        reader.read_exact(&mut buf[..want])?;
        if bad.is_none() {
            bad = buf[..want]
                .iter()
                .enumerate()
                .find(|(i, b)| **b != ((at + *i as u64) % 251) as u8)
                .map(|(i, _)| at + i as u64);
        }
        at += want as u64;
    }
    Ok(bad.map_or("intact".to_string(), |i| format!("corrupt at {i}")))
}

/// A listening TCP socket with the given backlog (std's is fixed at 128).
fn listen(addr: SocketAddr, backlog: i32) -> std::io::Result<TcpListener> {
    use std::os::fd::FromRawFd;
    let SocketAddr::V4(v4) = addr else {
        return Err(std::io::Error::other("IPv4 addresses only"));
    };
    // SAFETY: plain socket(2); the result is checked.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a socket we own; the listener closes it on drop.
    let listener = unsafe { TcpListener::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    let sa = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: v4.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*v4.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: setsockopt, bind and listen on our socket with valid,
    // correctly sized arguments; results checked.
    let ok = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&one as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        ) == 0
            && libc::bind(
                fd,
                (&sa as *const libc::sockaddr_in).cast(),
                size_of::<libc::sockaddr_in>() as libc::socklen_t,
            ) == 0
            && libc::listen(fd, backlog) == 0
    };
    if !ok {
        return Err(std::io::Error::last_os_error());
    }
    Ok(listener)
}

fn main() -> ExitCode {
    let a = Args::parse();
    if a.http.is_none() && a.udp.is_none() {
        eprintln!("testbackend: give --http ADDR, --udp ADDR or both");
        return ExitCode::from(2);
    }
    let name = Arc::new(a.name.clone());
    let mut line = format!("testbackend {name}");
    let http = match a.http.map(|addr| listen(addr, a.backlog)).transpose() {
        Ok(l) => l,
        Err(e) => {
            eprintln!("testbackend: --http {:?}: {e}", a.http);
            return ExitCode::from(1);
        }
    };
    let udp = match a.udp.map(UdpSocket::bind).transpose() {
        Ok(u) => u,
        Err(e) => {
            eprintln!("testbackend: --udp {:?}: {e}", a.udp);
            return ExitCode::from(1);
        }
    };
    if let Some(l) = &http {
        line += &format!(" http={}", l.local_addr().expect("bound"));
    }
    if let Some(u) = &udp {
        line += &format!(" udp={}", u.local_addr().expect("bound"));
    }
    println!("{line}");
    let _ = std::io::stdout().flush();
    let shared = Arc::new(Shared {
        name: a.name,
        chunk: pattern_chunk(),
        health_file: a.health_file,
        health_ok: AtomicU64::new(0),
        health_fail: AtomicU64::new(0),
        slow_above: a.slow_above,
        slow_ms: a.slow_ms,
        work_ms: a.work_ms,
        busy: AtomicU64::new(0),
        requests: AtomicU64::new(0),
        slow: AtomicU64::new(0),
        busy_max: AtomicU64::new(0),
        accepted: AtomicU64::new(0),
        stats_requests: AtomicU64::new(0),
        datagrams: AtomicU64::new(0),
    });
    if let Some(u) = udp {
        let name = Arc::clone(&name);
        let sh = Arc::clone(&shared);
        std::thread::spawn(move || {
            let mut buf = [0u8; 65536];
            let prefix = format!("{name} ");
            loop {
                let Ok((n, from)) = u.recv_from(&mut buf) else {
                    continue;
                };
                let mut reply = Vec::with_capacity(prefix.len() + n);
                reply.extend_from_slice(prefix.as_bytes());
                reply.extend_from_slice(&buf[..n]);
                if u.send_to(&reply, from).is_ok() {
                    sh.datagrams.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    let Some(l) = http else {
        loop {
            std::thread::park();
        }
    };
    loop {
        // Overloaded: accept nothing until back at or below the knee.
        if let Some(k) = shared.slow_above {
            while shared.busy.load(Ordering::SeqCst) > k {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
        let Ok((s, _)) = l.accept() else { continue };
        shared.accepted.fetch_add(1, Ordering::Relaxed);
        let sh = Arc::clone(&shared);
        std::thread::spawn(move || {
            let _ = serve(s, sh);
        });
    }
}
