//! testbackend answers real clients (curl, raw sockets) on loopback.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpStream, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use switchyard_tests::bin;

struct Backend {
    child: Child,
    http: String,
    udp: String,
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(name: &str) -> Backend {
    start_with(name, &[])
}

fn start_with(name: &str, extra: &[&str]) -> Backend {
    let mut child = Command::new(bin("testbackend"))
        .args([
            "--name",
            name,
            "--http",
            "127.0.0.1:0",
            "--udp",
            "127.0.0.1:0",
        ])
        .args(extra)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let field = |k: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .unwrap_or_else(|| panic!("no {k} in {line:?}"))
            .to_string()
    };
    Backend {
        http: field("http="),
        udp: field("udp="),
        child,
    }
}

fn curl(url: &str) -> Vec<u8> {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "20", url])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "curl {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

#[test]
fn answers_curl_with_its_name_and_exact_bytes() {
    let b = start("web7");
    assert_eq!(curl(&format!("http://{}/", b.http)), b"web7\n");
    assert_eq!(curl(&format!("http://{}/health", b.http)), b"ok\n");
    let body = curl(&format!("http://{}/bytes/1000000", b.http));
    assert_eq!(body.len(), 1_000_000);
    assert!(body.iter().enumerate().all(|(i, &x)| x == (i % 251) as u8));
}

#[test]
fn keeps_connections_alive_and_echoes_udp() {
    let b = start("web8");
    let mut s = TcpStream::connect(&b.http).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut all = String::new();
    s.read_to_string(&mut all).unwrap();
    assert_eq!(all.matches("HTTP/1.1 200 OK").count(), 2, "{all}");
    assert!(all.contains("Connection: keep-alive") && all.contains("Connection: close"));
    assert!(all.ends_with("\r\n\r\nok\n"), "{all}");

    let u = UdpSocket::bind("127.0.0.1:0").unwrap();
    u.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    u.send_to(b"ping", &b.udp).unwrap();
    let mut buf = [0u8; 64];
    let n = u.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"web8 ping");
}

/// With --health-file, /health follows the file (200 while it exists, 503
/// otherwise) while / keeps answering; /stats counts the /health answers.
#[test]
fn health_file_switches_health_and_stats_count_answers() {
    let file = std::env::temp_dir().join(format!("switchyard-tb-health-{}", std::process::id()));
    let _ = std::fs::remove_file(&file);
    let b = start_with("web9", &["--health-file", file.to_str().unwrap()]);
    let status = |path: &str| {
        let out = Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "20",
            ])
            .arg(format!("http://{}{path}", b.http))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    assert_eq!(status("/health"), "503");
    assert_eq!(curl(&format!("http://{}/", b.http)), b"web9\n");
    std::fs::write(&file, b"").unwrap();
    assert_eq!(status("/health"), "200");
    assert_eq!(status("/health"), "200");
    std::fs::remove_file(&file).unwrap();
    assert_eq!(
        curl(&format!("http://{}/stats", b.http)),
        b"health_ok 2\nhealth_fail 1\nconnections 4\ndatagrams 0\n",
        "three /health and one / (each its own connection; /stats not counted)"
    );
}

#[test]
fn checks_uploads_byte_for_byte() {
    let b = start("web9");
    let dir = std::env::temp_dir().join(format!("switchyard-upload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("body");
    let mut body: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&file, &body).unwrap();
    let post = |path: &std::path::Path| {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "20", "--data-binary"])
            .arg(format!("@{}", path.display()))
            .arg(format!("http://{}/upload", b.http))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    assert_eq!(post(&file), "300000 intact\n");
    body[123_457] ^= 1;
    std::fs::write(&file, &body).unwrap();
    assert_eq!(post(&file), "300000 corrupt at 123457\n");
    let _ = std::fs::remove_dir_all(&dir);
}
