//! ipip-decap: the test bed's stand-in for a backend's kernel `ipip`
//! device, which this machine's kernel lacks. It reads IP-in-IP packets
//! (protocol 4) addressed to this namespace from a raw socket, strips the
//! outer header, and writes the inner packet into a TUN device, where the
//! kernel receives it as if it had arrived on a tunnel interface.
//!
//! A production backend uses the kernel instead:
//! `ip link add tunl0 type ipip remote any local any` (or `modprobe ipip`
//! and `ip link set tunl0 up`), the VIP on `lo`, and `rp_filter` loose on
//! tunl0.
//!
//! Usage: `ipip-decap [--tun NAME] [--lifetime SECONDS]`. Prints
//! `ipip-decap ready on NAME` once it receives, then runs until killed or
//! until its lifetime (default 900 s) ends, so a leaked helper never runs
//! for long.

use std::io::Write;
use std::process::Command;
use std::time::{Duration, Instant};

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| default.to_string())
}

fn sh(args: &[&str]) -> anyhow::Result<()> {
    let st = Command::new(args[0]).args(&args[1..]).status()?;
    anyhow::ensure!(st.success(), "`{}` failed", args.join(" "));
    Ok(())
}

/// A raw IPv4 socket for protocol 4 with a receive timeout.
fn raw_ipip_socket() -> anyhow::Result<i32> {
    // SAFETY: plain socket/setsockopt calls with valid arguments.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_IPIP);
        anyhow::ensure!(
            fd >= 0,
            "raw IPPROTO_IPIP socket: {}",
            std::io::Error::last_os_error()
        );
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 200_000,
        };
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            size_of::<libc::timeval>() as u32,
        );
        Ok(fd)
    }
}

/// The inner packet of an IPv4 packet carrying IP-in-IP, if it is one.
fn inner(pkt: &[u8]) -> Option<&[u8]> {
    if pkt.len() < 20 || pkt[0] >> 4 != 4 || pkt[9] != 4 {
        return None;
    }
    let hl = (pkt[0] & 0xf) as usize * 4;
    let total = (u16::from_be_bytes([pkt[2], pkt[3]]) as usize).min(pkt.len());
    (hl >= 20 && total >= hl + 20).then(|| &pkt[hl..total])
}

fn main() -> anyhow::Result<()> {
    let name = arg("--tun", "ipip0");
    let lifetime = Duration::from_secs(arg("--lifetime", "900").parse()?);
    let dev = tun_rs::DeviceBuilder::new()
        .name(&name)
        .mtu(1500)
        .build_sync()?;
    sh(&["ip", "link", "set", &name, "up"])?;
    // The inner packet's source (the client) is not routed via the TUN
    // device: reverse-path filtering must not drop it.
    for conf in ["all", name.as_str()] {
        sh(&[
            "sysctl",
            "-qw",
            &format!("net.ipv4.conf.{conf}.rp_filter=0"),
        ])?;
    }
    let fd = raw_ipip_socket()?;
    println!("ipip-decap ready on {name}");
    std::io::stdout().flush()?;
    let start = Instant::now();
    let mut buf = vec![0u8; 65536];
    while start.elapsed() < lifetime {
        // SAFETY: recv into a live buffer of the given length.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n <= 0 {
            continue;
        }
        if let Some(p) = inner(&buf[..n as usize]) {
            let _ = dev.send(p);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::inner;

    #[test]
    fn strips_exactly_the_outer_header() {
        let mut p = vec![0x45, 0, 0, 48, 0, 0, 0x40, 0, 64, 4, 0, 0];
        p.extend_from_slice(&[198, 19, 0, 1, 198, 19, 0, 11]);
        let mut i = vec![0x45, 0, 0, 28, 0, 0, 0x40, 0, 63, 17, 0, 0];
        i.extend_from_slice(&[198, 18, 1, 2, 198, 18, 0, 10]);
        i.extend_from_slice(&[0; 8]);
        p.extend_from_slice(&i);
        assert_eq!(inner(&p), Some(&i[..]));
        p[9] = 17;
        assert_eq!(inner(&p), None, "not IP-in-IP");
        assert_eq!(inner(&p[..10]), None, "truncated");
    }
}
