//! testbackend: a tiny HTTP/1.1 and UDP echo server that says which backend
//! answered, for tests and demos.
//!
//! HTTP: `GET /` answers `<name>\n`; `GET /bytes/N` answers N bytes of a
//! fixed pattern (byte i is `i % 251`), for integrity-checked downloads;
//! `GET /health` answers `200 ok\n` (with `--health-file F`: only while F
//! exists, else `503 unhealthy\n`, so a test can fail its health checks
//! while it keeps serving); `GET /stats` answers
//! `health_ok <n>\nhealth_fail <n>\n`, the /health answers so far;
//! `POST /upload` reads a body of Content-Length bytes of the `/bytes`
//! pattern and answers `<n> intact\n` or `<n> corrupt at <offset>\n`, for
//! integrity-checked uploads. Keep-alive unless the client says close.
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
}

/// What every connection shares: the name, the download pattern, the
/// health switch and the /health answers counted.
struct Shared {
    name: String,
    chunk: Vec<u8>,
    health_file: Option<std::path::PathBuf>,
    health_ok: AtomicU64,
    health_fail: AtomicU64,
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
                "/stats" => (
                    "200 OK",
                    format!(
                        "health_ok {}\nhealth_fail {}\n",
                        sh.health_ok.load(Ordering::Relaxed),
                        sh.health_fail.load(Ordering::Relaxed)
                    ),
                ),
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

fn main() -> ExitCode {
    let a = Args::parse();
    if a.http.is_none() && a.udp.is_none() {
        eprintln!("testbackend: give --http ADDR, --udp ADDR or both");
        return ExitCode::from(2);
    }
    let name = Arc::new(a.name.clone());
    let mut line = format!("testbackend {name}");
    let http = match a.http.map(TcpListener::bind).transpose() {
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
    if let Some(u) = udp {
        let name = Arc::clone(&name);
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
                let _ = u.send_to(&reply, from);
            }
        });
    }
    let shared = Arc::new(Shared {
        name: a.name,
        chunk: pattern_chunk(),
        health_file: a.health_file,
        health_ok: AtomicU64::new(0),
        health_fail: AtomicU64::new(0),
    });
    match http {
        Some(l) => {
            for s in l.incoming().flatten() {
                let sh = Arc::clone(&shared);
                std::thread::spawn(move || {
                    let _ = serve(s, sh);
                });
            }
        }
        None => loop {
            std::thread::park();
        },
    }
    ExitCode::SUCCESS
}
