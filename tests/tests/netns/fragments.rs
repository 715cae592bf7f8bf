//! IP fragments through the VIP (issue 22, item 3): UDP datagrams of 4000
//! bytes to the NAT service's VIP:53, echoed by a testbackend. The client's
//! kernel cuts each into three fragments at MTU 1500, the backend's kernel
//! cuts its 4009-byte answer the same way: every fragment of a datagram
//! must reach the backend of its first fragment (and every fragment of the
//! answer must come back from the VIP), or the receiving kernel never
//! completes the datagram. Then the same with each request's fragments
//! sent in reverse order from a raw socket (the switch holds the later
//! ones until the first one has passed).

use switchyard_tests::netns::{Bed, afpacket_appliance, prepare};
use switchyard_tests::{counter_sum, shmdump_json};

/// The client: `count` datagrams of 4000 bytes (a pattern per datagram)
/// to VIP:53 from one UDP socket (after a small one has been answered),
/// each sent whole (`inorder`: the
/// kernel fragments it) or as fragments built here and sent last first
/// from a raw socket (`reversed`); waits up to 3 s for each answer and
/// compares it byte for byte. Prints `intact <ok>/<count> <backend
/// names>` and the first errors.
const CLIENT: &str = r#"
import socket, struct, sys
VIP, CL = '198.18.0.10', '198.18.1.2'
def csum(b):
    if len(b) % 2:
        b += b'\0'
    s = sum(struct.unpack('!%dH' % (len(b) // 2), b))
    while s >> 16:
        s = (s & 0xffff) + (s >> 16)
    return ~s & 0xffff
def payload(i, n):
    return bytes((j * 7 + i * 13 + 3) & 0xff for j in range(n))
mode, count = sys.argv[1], int(sys.argv[2])
rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
rx.bind((CL, 0))
rx.settimeout(3)
port = rx.getsockname()[1]
raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
# A small datagram first, until answered: the appliance learns the
# client's address (first contact is issue 22's item 4, not this test's).
rx.settimeout(1)
for _ in range(10):
    rx.sendto(b'warm', (VIP, 53))
    try:
        if rx.recvfrom(100)[1] == (VIP, 53):
            break
    except socket.timeout:
        pass
else:
    sys.exit('no answer to a small datagram')
rx.settimeout(3)
ok, names, errs = 0, set(), []
for i in range(count):
    data = payload(i, 4000)
    if mode == 'inorder':
        rx.sendto(data, (VIP, 53))
    else:
        udp = struct.pack('!HHHH', port, 53, 8 + len(data), 0) + data
        pseudo = socket.inet_aton(CL) + socket.inet_aton(VIP) + struct.pack('!BBH', 0, 17, len(udp))
        udp = udp[:6] + struct.pack('!H', csum(pseudo + udp) or 0xffff) + udp[8:]
        frags = []
        for off in range(0, len(udp), 1480):
            chunk = udp[off:off + 1480]
            word = off // 8 | (0x2000 if off + 1480 < len(udp) else 0)
            h = struct.pack('!BBHHHBBH4s4s', 0x45, 0, 20 + len(chunk), 0x5000 + i, word, 64, 17, 0,
                            socket.inet_aton(CL), socket.inet_aton(VIP))
            frags.append(h[:10] + struct.pack('!H', csum(h)) + h[12:] + chunk)
        for f in reversed(frags):
            raw.sendto(f, (VIP, 0))
    try:
        d, a = rx.recvfrom(65536)
    except socket.timeout:
        errs.append('%d: no answer' % i)
        continue
    name, _, echo = d.partition(b' ')
    if a != (VIP, 53) or echo != data:
        errs.append('%d: from %s, %d bytes, %s' % (i, a, len(echo), 'intact' if echo == data else 'corrupt'))
        continue
    ok += 1
    names.add(name.decode())
print('intact %d/%d %s' % (ok, count, ' '.join(sorted(names))), '; '.join(errs[:5]))
"#;

const DATAGRAMS: usize = 20;

fn client(bed: &Bed, mode: &str) -> String {
    let out = bed
        .exec(
            "cl",
            &["python3", "-c", CLIENT, mode, &DATAGRAMS.to_string()],
        )
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn fragmented_udp_datagrams_reach_one_backend_and_come_back_intact() {
    let mut bed = Bed::build();
    let port = prepare(&mut bed, "nat");
    let (inst, app) = afpacket_appliance(&bed, "nat", port);

    let inorder = client(&bed, "inorder");
    assert!(
        inorder.starts_with(&format!("intact {DATAGRAMS}/{DATAGRAMS} backend")),
        "in order: {inorder}"
    );
    let reversed = client(&bed, "reversed");
    assert!(
        reversed.starts_with(&format!("intact {DATAGRAMS}/{DATAGRAMS} backend")),
        "reversed: {reversed}"
    );

    let dump = shmdump_json(&inst, &[]);
    let c = |name: &str| counter_sum(&dump, name);
    // Each request and each answer is three fragments, every one forwarded;
    // the reversed requests' two later fragments waited for the first.
    assert!(
        c("frag_forwarded") >= (4 * 3 * DATAGRAMS) as u64,
        "frag_forwarded {}",
        c("frag_forwarded")
    );
    assert!(
        c("frag_held") >= (2 * DATAGRAMS) as u64,
        "frag_held {}",
        c("frag_held")
    );
    assert_eq!(c("drop_frag_timeout"), 0);
    assert_eq!(c("drop_frag_overflow"), 0);
    drop(app);
}
