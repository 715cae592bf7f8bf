//! lbctl against the AF_PACKET appliance in a namespace, with real
//! clients: `drain` takes a backend out of new connections while a
//! connection opened before keeps working, `enable` brings it back, and
//! `show` reports what happened. Every wait is bounded.

use std::io::{BufRead, Write};
use std::process::Command;

use switchyard_tests::bin;
use switchyard_tests::netns::{Bed, afpacket_appliance, prepare};

fn lbctl(inst: &str, args: &[&str]) -> serde_json::Value {
    let out = Command::new(bin("lbctl"))
        .args(["--instance", inst, "--json"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "lbctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Which backends answer `n` fresh curl requests to the VIP.
fn answers(bed: &Bed, n: usize) -> std::collections::BTreeMap<String, usize> {
    let mut seen = std::collections::BTreeMap::new();
    for _ in 0..n {
        let out = bed
            .exec(
                "cl",
                &["curl", "-sS", "--max-time", "5", "http://198.18.0.10/"],
            )
            .unwrap();
        *seen
            .entry(String::from_utf8_lossy(&out.stdout).trim().to_string())
            .or_insert(0) += 1;
    }
    seen
}

#[test]
fn lbctl_drains_and_enables_a_backend_of_the_afpacket_appliance() {
    let mut bed = Bed::build();
    let port = prepare(&mut bed, "nat");
    let (inst, app) = afpacket_appliance(&bed, "nat", port);

    // A keep-alive connection opened before the drain, from the client
    // namespace (python3 holds it open across the drain).
    // Each answer is read whole: headers, then Content-Length bytes.
    let script = r#"
import socket, sys
s = socket.create_connection(('198.18.0.10', 80), timeout=10)
f = s.makefile('rb')
def get():
    s.sendall(b'GET / HTTP/1.1\r\nHost: x\r\n\r\n')
    n = 0
    while True:
        line = f.readline()
        if line in (b'\r\n', b''):
            break
        k, _, v = line.decode().partition(':')
        if k.lower() == 'content-length':
            n = int(v)
    return f.read(n).decode().strip()
print(get(), flush=True)
sys.stdin.readline()
print(get(), flush=True)
"#;
    let mut held = Command::new("ip")
        .args(["netns", "exec", &bed.ns("cl"), "python3", "-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Lines, not fixed sizes: a python that fails ends them with EOF (its
    // socket has a 10 s timeout), so no read here can hang.
    let mut out = std::io::BufReader::new(held.stdout.take().unwrap());
    let mut first = String::new();
    out.read_line(&mut first).unwrap();
    let first = first.trim().to_string();
    assert!(first.starts_with("backend"), "{first:?}");

    // Drain the backend that connection went to.
    let target = format!("web/{first}");
    let r = lbctl(&inst, &["drain", &target]);
    assert_eq!(r["ok"], true, "{r}");
    let seen = answers(&bed, 60);
    assert_eq!(
        seen.get(&first),
        None,
        "drained {first} got new connections: {seen:?}"
    );
    assert_eq!(seen.values().sum::<usize>(), 60);

    // The connection opened before the drain still works.
    held.stdin.take().unwrap().write_all(b"\n").unwrap();
    let mut second = String::new();
    out.read_line(&mut second).unwrap();
    assert_eq!(second.trim(), first, "existing connection kept its backend");
    assert!(held.wait().unwrap().success());

    let show = lbctl(&inst, &["show"]);
    let web = &show["result"]["services"][0];
    let b = web["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == first.as_str())
        .unwrap();
    assert_eq!(
        (&b["state"], &b["admin_drained"]),
        (&"drained".into(), &true.into())
    );
    assert_eq!(b["effective_weight"], 0);

    // Enable: it takes new connections again.
    let r = lbctl(&inst, &["enable", &target]);
    assert_eq!(r["ok"], true, "{r}");
    let seen = answers(&bed, 90);
    assert!(seen.get(&first).copied().unwrap_or(0) > 0, "{seen:?}");
    drop(app);
}
