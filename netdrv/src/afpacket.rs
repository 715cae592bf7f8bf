//! afpacket: NIC ports on real Linux interfaces through PACKET_MMAP
//! (TPACKET_V2) RX and TX rings, with qdisc bypass, optional promiscuous
//! mode and an optional fanout group so several switches share one
//! interface.
//!
//! Buffer model: a received frame stays in its RX ring slot while the
//! switch works on it (no copy); transmitting it copies it into a TX ring
//! slot of the egress port and returns the RX slot to the kernel. The
//! kernel still sees its own copy of every frame (management, health
//! checks); the switch forwards only what its filter claims.
//!
//! `Frame::buf` encodes `port << 24 | rx slot`.

use core::sync::atomic::{AtomicU32, Ordering, fence};
use std::ffi::CString;

use crate::{Frame, NetdrvError, Nic};

/// Slot size of both rings.
pub const FRAME_SIZE: usize = 2048;
const BLOCK_SIZE: usize = 4096;
/// Offset of frame data in a TX slot: TPACKET_ALIGN(sizeof(tpacket2_hdr)).
const TX_DATA: usize = 32;

/// Options for one port.
#[derive(Clone, Debug)]
pub struct PortOptions {
    /// The port's name in the configuration (what `port_name` answers).
    pub name: String,
    pub ifname: String,
    /// Slots per ring (each ring is `slots * 2 KiB`).
    pub slots: usize,
    pub promiscuous: bool,
    /// PACKET_FANOUT group id (hash mode) shared by the switches of one interface.
    pub fanout: Option<u16>,
}

#[derive(Debug)]
struct Port {
    fd: libc::c_int,
    map: *mut u8,
    map_len: usize,
    slots: usize,
    rx_next: usize,
    tx_next: usize,
    tx_dirty: bool,
    mac: [u8; 6],
    name: String,
}

/// The AF_PACKET ports one switch serves.
#[derive(Debug)]
pub struct AfPacket {
    ports: Vec<Port>,
    /// Frames dropped on receive because they exceeded a ring slot (GRO/GSO
    /// super-frames: turn those offloads off on switchyard's interfaces) or
    /// carried a VLAN tag that could not be restored, since the last
    /// [`Nic::take_rx_truncated`].
    pub truncated: u64,
}

fn os(ifname: &str, what: &str) -> NetdrvError {
    NetdrvError::Invalid {
        name: ifname.to_string(),
        what: format!("{what}: {}", std::io::Error::last_os_error()),
    }
}

fn setopt<T>(fd: libc::c_int, level: libc::c_int, opt: libc::c_int, v: &T) -> libc::c_int {
    // SAFETY: `v` points to a live T of the size we pass.
    unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            (v as *const T).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    }
}

impl Port {
    fn open(o: &PortOptions) -> Result<Self, NetdrvError> {
        let name = &o.ifname;
        if !o.slots.is_power_of_two() || o.slots < 64 {
            return Err(NetdrvError::Invalid {
                name: name.clone(),
                what: format!("{} ring slots: need a power of two >= 64", o.slots),
            });
        }
        let cname = CString::new(name.as_str()).map_err(|_| NetdrvError::Invalid {
            name: o.name.clone(),
            what: "bad interface name".into(),
        })?;
        // SAFETY: plain libc call with a valid C string.
        let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
        if ifindex == 0 {
            return Err(os(name, "no such interface"));
        }
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket(2).
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, proto as libc::c_int) };
        if fd < 0 {
            return Err(os(name, "socket(AF_PACKET)"));
        }
        let mut port = Port {
            fd,
            map: core::ptr::null_mut(),
            map_len: 0,
            slots: o.slots,
            rx_next: 0,
            tx_next: 0,
            tx_dirty: false,
            mac: [0; 6],
            name: o.name.clone(),
        };
        let version: libc::c_int = libc::tpacket_versions::TPACKET_V2 as libc::c_int;
        if setopt(fd, libc::SOL_PACKET, libc::PACKET_VERSION, &version) != 0 {
            return Err(os(name, "PACKET_VERSION TPACKET_V2"));
        }
        let one: libc::c_int = 1;
        if setopt(fd, libc::SOL_PACKET, libc::PACKET_QDISC_BYPASS, &one) != 0 {
            return Err(os(name, "PACKET_QDISC_BYPASS"));
        }
        // Our own transmissions (and the kernel's) need not come back up the
        // RX ring (Linux >= 4.20; older kernels just show them, harmlessly).
        let _ = setopt(fd, libc::SOL_PACKET, libc::PACKET_IGNORE_OUTGOING, &one);
        let req = libc::tpacket_req {
            tp_block_size: BLOCK_SIZE as u32,
            tp_block_nr: (o.slots * FRAME_SIZE / BLOCK_SIZE) as u32,
            tp_frame_size: FRAME_SIZE as u32,
            tp_frame_nr: o.slots as u32,
        };
        if setopt(fd, libc::SOL_PACKET, libc::PACKET_RX_RING, &req) != 0 {
            return Err(os(name, "PACKET_RX_RING"));
        }
        if setopt(fd, libc::SOL_PACKET, libc::PACKET_TX_RING, &req) != 0 {
            return Err(os(name, "PACKET_TX_RING"));
        }
        port.map_len = 2 * o.slots * FRAME_SIZE;
        // SAFETY: mmap of the socket's rings, length as configured above.
        let map = unsafe {
            libc::mmap(
                core::ptr::null_mut(),
                port.map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                fd,
                0,
            )
        };
        if map == libc::MAP_FAILED {
            return Err(os(name, "mmap of the packet rings"));
        }
        port.map = map.cast();
        // SAFETY: sockaddr_ll is plain data; zeroed is valid.
        let mut sll: libc::sockaddr_ll = unsafe { core::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = ifindex as i32;
        // SAFETY: bind with a valid sockaddr_ll of the stated size.
        if unsafe {
            libc::bind(
                fd,
                (&sll as *const libc::sockaddr_ll).cast(),
                size_of::<libc::sockaddr_ll>() as u32,
            )
        } != 0
        {
            return Err(os(name, "bind"));
        }
        if o.promiscuous {
            // SAFETY: packet_mreq is plain data; zeroed is valid.
            let mut mr: libc::packet_mreq = unsafe { core::mem::zeroed() };
            mr.mr_ifindex = ifindex as i32;
            mr.mr_type = libc::PACKET_MR_PROMISC as u16;
            if setopt(fd, libc::SOL_PACKET, libc::PACKET_ADD_MEMBERSHIP, &mr) != 0 {
                return Err(os(name, "PACKET_ADD_MEMBERSHIP promiscuous"));
            }
        }
        if let Some(g) = o.fanout {
            // A socket in a fanout group receives through the group's
            // hook, which ignores PACKET_IGNORE_OUTGOING above: the group
            // needs the flag itself, or every frame the kernel sends on the
            // interface comes back to the switch (kernels before 4.20
            // refuse the flag: then without it).
            let fanout = |flags: u32| -> libc::c_int {
                (g as libc::c_int) | (((libc::PACKET_FANOUT_HASH | flags) as libc::c_int) << 16)
            };
            let with = fanout(libc::PACKET_FANOUT_FLAG_IGNORE_OUTGOING);
            if setopt(fd, libc::SOL_PACKET, libc::PACKET_FANOUT, &with) != 0
                && setopt(fd, libc::SOL_PACKET, libc::PACKET_FANOUT, &fanout(0)) != 0
            {
                return Err(os(name, "PACKET_FANOUT"));
            }
        }
        port.mac = mac_of(fd, name)?;
        Ok(port)
    }

    /// The socket's receive statistics since the last read (TPACKET_V2:
    /// `struct tpacket_stats`; the kernel zeroes them on each read). Zero
    /// if the read fails (a closed socket: never while the port exists).
    fn take_stats(&self) -> libc::tpacket_stats {
        let mut st = libc::tpacket_stats {
            tp_packets: 0,
            tp_drops: 0,
        };
        let mut len = size_of::<libc::tpacket_stats>() as libc::socklen_t;
        // SAFETY: `st` is a live tpacket_stats and `len` its size; the
        // kernel writes at most `len` bytes and stores the length it wrote.
        let rc = unsafe {
            libc::getsockopt(
                self.fd,
                libc::SOL_PACKET,
                libc::PACKET_STATISTICS,
                (&mut st as *mut libc::tpacket_stats).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return libc::tpacket_stats {
                tp_packets: 0,
                tp_drops: 0,
            };
        }
        st
    }

    fn slot(&self, tx: bool, i: usize) -> *mut u8 {
        let base = if tx { self.slots * FRAME_SIZE } else { 0 };
        // SAFETY: i < slots (callers mask), inside the mapping.
        unsafe { self.map.add(base + (i & (self.slots - 1)) * FRAME_SIZE) }
    }

    fn status(&self, tx: bool, i: usize) -> &AtomicU32 {
        // SAFETY: tp_status is the first, 4-byte-aligned word of every slot;
        // the kernel and we hand slots over through it.
        unsafe { &*(self.slot(tx, i) as *const AtomicU32) }
    }

    /// Copies `len` bytes at `src` into the next TX slot and marks it for
    /// sending; false if the slot is busy or the frame does not fit.
    ///
    /// # Safety
    /// `src..src + len` must be readable and must not overlap this port's
    /// TX ring.
    unsafe fn tx_from(&mut self, src: *const u8, len: usize) -> bool {
        let i = self.tx_next & (self.slots - 1);
        let st = self.status(true, i).load(Ordering::Acquire);
        if st != libc::TP_STATUS_AVAILABLE && st != libc::TP_STATUS_WRONG_FORMAT {
            return false;
        }
        if len > FRAME_SIZE - TX_DATA {
            return false;
        }
        let dst = self.slot(true, i);
        // SAFETY: the TX slot is ours (AVAILABLE); the caller vouches for the
        // source; lengths are bounded by the slot size.
        unsafe {
            core::ptr::copy_nonoverlapping(src, dst.add(TX_DATA), len);
            let h = &mut *(dst as *mut libc::tpacket2_hdr);
            h.tp_len = len as u32;
        }
        fence(Ordering::Release);
        self.status(true, i)
            .store(libc::TP_STATUS_SEND_REQUEST, Ordering::Release);
        self.tx_next = self.tx_next.wrapping_add(1);
        self.tx_dirty = true;
        true
    }

    /// Puts the VLAN tag the kernel took out of a received frame
    /// (`TP_STATUS_VLAN_VALID`: the TCI, and the TPID if
    /// `TP_STATUS_VLAN_TPID_VALID`, else 802.1Q) back in front of the
    /// frame's ethertype, as it was on the wire, so the filter sees a
    /// tagged frame for what it is (ports are untagged: it drops it,
    /// counted in `drop_vlan`). The MACs move 4 bytes toward the slot's
    /// header, into the gap the kernel leaves before `tp_mac`; `tp_mac`,
    /// `tp_snaplen` and `tp_len` follow. `false` (nothing changed) if the
    /// gap is too small. The slot must be user-owned.
    fn restore_vlan_tag(&self, i: usize) -> bool {
        // Where the frame may start at the earliest: after the tpacket2
        // header and the sockaddr_ll the kernel writes behind it.
        const FIRST_FREE: usize = TX_DATA + core::mem::size_of::<libc::sockaddr_ll>();
        let p = self.slot(false, i);
        let h = p as *mut libc::tpacket2_hdr;
        // SAFETY: a user-owned RX slot starts with a tpacket2_hdr that only
        // this process touches until it gives the slot back; fields are
        // read and written through raw pointers (tp_status is also read
        // as an atomic elsewhere, never written here).
        let (status, mac, snap, tci, tpid) = unsafe {
            (
                (*h).tp_status,
                (*h).tp_mac as usize,
                (*h).tp_snaplen as usize,
                (*h).tp_vlan_tci,
                (*h).tp_vlan_tpid,
            )
        };
        if mac < FIRST_FREE + 4 || snap < 12 || mac + snap > FRAME_SIZE {
            return false;
        }
        let tpid = if status & libc::TP_STATUS_VLAN_TPID_VALID != 0 && tpid != 0 {
            tpid
        } else {
            0x8100
        };
        let mut tag = [0u8; 4];
        tag[..2].copy_from_slice(&tpid.to_be_bytes());
        tag[2..].copy_from_slice(&tci.to_be_bytes());
        // SAFETY: mac - 4 .. mac + snap lies inside the slot (checked
        // above) and after the header and its sockaddr_ll; `copy` allows
        // the overlap of the MACs' old and new places.
        unsafe {
            core::ptr::copy(p.add(mac), p.add(mac - 4), 12);
            core::ptr::copy_nonoverlapping(tag.as_ptr(), p.add(mac + 8), 4);
            core::ptr::addr_of_mut!((*h).tp_mac).write((mac - 4) as u16);
            core::ptr::addr_of_mut!((*h).tp_snaplen).write((snap + 4) as u32);
            let len = core::ptr::addr_of!((*h).tp_len).read();
            core::ptr::addr_of_mut!((*h).tp_len).write(len + 4);
        }
        true
    }

    fn rx_hdr(&self, i: usize) -> (usize, usize) {
        let p = self.slot(false, i);
        // SAFETY: a user-owned RX slot starts with a tpacket2_hdr.
        let h = unsafe { &*(p as *const libc::tpacket2_hdr) };
        (h.tp_mac as usize, h.tp_snaplen as usize)
    }
}

impl Drop for Port {
    fn drop(&mut self) {
        if !self.map.is_null() {
            // SAFETY: unmapping exactly what we mapped.
            unsafe { libc::munmap(self.map.cast(), self.map_len) };
        }
        // SAFETY: closing our own fd.
        unsafe { libc::close(self.fd) };
    }
}

/// Completes the TCP/UDP checksum of an IPv4 frame whose checksum was left
/// to offload (TP_STATUS_CSUMNOTREADY: sent by a local stack over a veth or
/// similar, the field holds only the pseudo-header sum). The NIC would have
/// filled it in; we do it here, so the rest of the data path sees complete
/// frames and can update checksums incrementally. Only a frame that
/// [`wire::ipv4_l4`] (the filter's validator) accepts is touched; the
/// checksum covers the TCP segment, or the UDP datagram its length field
/// gives (RFC 768).
fn complete_checksum(f: &mut [u8]) {
    const ETH: usize = wire::ETHERNET_HEADER_LEN;
    if f.get(12..14) != Some(&[0x08, 0x00]) {
        return;
    }
    let Ok(p) = wire::ipv4_l4(&f[ETH..], wire::HeaderChecksum::Ignore) else {
        return;
    };
    let (udp, at) = match p.protocol {
        wire::PROTO_UDP => (true, 6),
        _ => (false, 16),
    };
    let l4 = &mut f[ETH + p.header_len..ETH + p.header_len + p.l4_len];
    l4[at..at + 2].copy_from_slice(&[0, 0]);
    let mut c = wire::checksum::tcp_udp_ipv4(
        p.src_addr().to_be_bytes(),
        p.dst_addr().to_be_bytes(),
        p.protocol,
        l4,
    );
    if udp && c == 0 {
        c = 0xffff;
    }
    l4[at..at + 2].copy_from_slice(&c.to_be_bytes());
}

/// The interface's MAC, asked through the socket (so it answers for the
/// socket's network namespace, unlike /sys of the caller's mount).
fn mac_of(fd: libc::c_int, ifname: &str) -> Result<[u8; 6], NetdrvError> {
    // SAFETY: ifreq is plain data; zeroed is valid. The name fits (checked).
    let mut ifr: libc::ifreq = unsafe { core::mem::zeroed() };
    if ifname.len() >= ifr.ifr_name.len() {
        return Err(NetdrvError::Invalid {
            name: ifname.into(),
            what: "interface name too long".into(),
        });
    }
    for (d, s) in ifr.ifr_name.iter_mut().zip(ifname.bytes()) {
        *d = s as libc::c_char;
    }
    // SAFETY: SIOCGIFHWADDR fills ifr.ifr_ifru with a sockaddr.
    if unsafe { libc::ioctl(fd, libc::SIOCGIFHWADDR, &mut ifr) } != 0 {
        return Err(os(ifname, "SIOCGIFHWADDR"));
    }
    // SAFETY: the ioctl wrote a sockaddr into the union.
    let sa = unsafe { ifr.ifr_ifru.ifru_hwaddr };
    let mut mac = [0u8; 6];
    for (m, b) in mac.iter_mut().zip(sa.sa_data.iter()) {
        *m = *b as u8;
    }
    Ok(mac)
}

impl AfPacket {
    pub fn open(ports: &[PortOptions]) -> Result<Self, NetdrvError> {
        let ports = ports
            .iter()
            .map(Port::open)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            ports,
            truncated: 0,
        })
    }

    fn decode(f: Frame) -> (usize, usize) {
        ((f.buf >> 24) as usize, (f.buf & 0xff_ffff) as usize)
    }
}

impl Nic for AfPacket {
    fn port_count(&self) -> usize {
        self.ports.len()
    }

    fn port_mac(&self, port: usize) -> [u8; 6] {
        self.ports[port].mac
    }

    fn port_name(&self, port: usize) -> &str {
        &self.ports[port].name
    }

    fn frame_capacity(&self) -> usize {
        FRAME_SIZE - 64
    }

    fn rx_burst(&mut self, port: usize, out: &mut [Frame]) -> usize {
        let p = &mut self.ports[port];
        let mut n = 0;
        while n < out.len() {
            let i = p.rx_next & (p.slots - 1);
            if p.status(false, i).load(Ordering::Acquire) & libc::TP_STATUS_USER == 0 {
                break;
            }
            if p.status(false, i).load(Ordering::Relaxed) & libc::TP_STATUS_VLAN_VALID != 0
                && !p.restore_vlan_tag(i)
            {
                // A tagged frame must not pass for an untagged one.
                p.status(false, i)
                    .store(libc::TP_STATUS_KERNEL, Ordering::Release);
                p.rx_next = p.rx_next.wrapping_add(1);
                self.truncated += 1;
                continue;
            }
            let (mac_off, snap) = p.rx_hdr(i);
            // SAFETY: user-owned slot, starts with a tpacket2_hdr.
            let wire_len =
                unsafe { (*(p.slot(false, i) as *const libc::tpacket2_hdr)).tp_len } as usize;
            if wire_len > snap {
                // Never forward a truncated frame: give the slot back.
                p.status(false, i)
                    .store(libc::TP_STATUS_KERNEL, Ordering::Release);
                p.rx_next = p.rx_next.wrapping_add(1);
                self.truncated += 1;
                continue;
            }
            if p.status(false, i).load(Ordering::Relaxed) & libc::TP_STATUS_CSUMNOTREADY != 0 {
                let off = mac_off.min(FRAME_SIZE);
                let end = (off + snap).min(FRAME_SIZE);
                // SAFETY: the slot is user-owned (TP_STATUS_USER seen above);
                // off..end lies inside it.
                let data = unsafe {
                    core::slice::from_raw_parts_mut(p.slot(false, i).add(off), end - off)
                };
                complete_checksum(data);
            }
            out[n] = Frame {
                buf: ((port as u32) << 24) | i as u32,
                len: snap.min(FRAME_SIZE) as u16,
            };
            p.rx_next = p.rx_next.wrapping_add(1);
            n += 1;
        }
        n
    }

    fn buf_mut(&mut self, f: Frame) -> &mut [u8] {
        let (port, i) = Self::decode(f);
        let p = &self.ports[port];
        let (mac_off, _) = p.rx_hdr(i);
        let off = mac_off.min(FRAME_SIZE);
        // SAFETY: the slot is user-owned until we release it; its data area
        // runs from tp_mac to the end of the slot.
        unsafe { core::slice::from_raw_parts_mut(p.slot(false, i).add(off), FRAME_SIZE - off) }
    }

    fn tx(&mut self, port: usize, f: Frame) -> Result<(), Frame> {
        let (src_port, src_i) = Self::decode(f);
        let len = f.len as usize;
        let (mac_off, _) = self.ports[src_port].rx_hdr(src_i);
        let src = self.ports[src_port].slot(false, src_i);
        // SAFETY: `src` is a user-owned RX slot (the frame is host-owned);
        // the frame's bytes lie inside it. A different ring from any TX slot.
        if !unsafe { self.ports[port].tx_from(src.add(mac_off), len) } {
            return Err(f);
        }
        self.free(f);
        Ok(())
    }

    fn tx_copy(&mut self, port: usize, bytes: &[u8]) -> bool {
        // SAFETY: `bytes` is a live slice of host memory, not a TX slot.
        unsafe { self.ports[port].tx_from(bytes.as_ptr(), bytes.len()) }
    }

    fn flush(&mut self, port: usize) {
        let p = &mut self.ports[port];
        if p.tx_dirty {
            // SAFETY: a zero-length send kicks the TX ring; no buffer is read.
            unsafe { libc::send(p.fd, core::ptr::null(), 0, libc::MSG_DONTWAIT) };
            p.tx_dirty = false;
        }
    }

    fn free(&mut self, f: Frame) {
        let (port, i) = Self::decode(f);
        self.ports[port]
            .status(false, i)
            .store(libc::TP_STATUS_KERNEL, Ordering::Release);
    }

    fn reclaim(&mut self) {}

    /// The kernel's count of frames it dropped because a port's RX ring
    /// had no free slot (`PACKET_STATISTICS`, `tp_drops`), summed over the
    /// ports. Reading the statistics resets them, so each call returns the
    /// drops since the previous one. A port whose read fails adds nothing.
    fn take_rx_truncated(&mut self) -> u64 {
        core::mem::take(&mut self.truncated)
    }

    fn take_rx_ring_drops(&mut self) -> u64 {
        self.ports
            .iter()
            .map(|p| p.take_stats().tp_drops as u64)
            .sum()
    }

    /// Sleeps in ppoll(2) on every port's socket: the first frame to arrive
    /// wakes the switch at once instead of at the end of its nap.
    fn idle_wait(&mut self, max: core::time::Duration) {
        let mut fds = [libc::pollfd {
            fd: -1,
            events: 0,
            revents: 0,
        }; 16];
        let n = self.ports.len().min(fds.len());
        for (f, p) in fds.iter_mut().zip(&self.ports) {
            f.fd = p.fd;
            f.events = libc::POLLIN;
        }
        let ts = libc::timespec {
            tv_sec: max.as_secs() as libc::time_t,
            tv_nsec: max.subsec_nanos() as libc::c_long,
        };
        // SAFETY: `fds[..n]` are initialised pollfds of our open sockets;
        // ppoll only writes their `revents`.
        unsafe { libc::ppoll(fds.as_mut_ptr(), n as libc::nfds_t, &ts, core::ptr::null()) };
    }
}

#[cfg(test)]
mod tests {
    use super::complete_checksum;
    use wire::checksum;

    /// An Ethernet/IPv4 frame of protocol `proto` carrying `l4` (its
    /// checksum field left as the offload left it), `trailer` bytes of IP
    /// payload after it, and Ethernet padding to 60 bytes.
    fn frame(proto: u8, l4: &[u8], trailer: usize) -> Vec<u8> {
        let total = 20 + l4.len() + trailer;
        let mut f = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x08, 0x00];
        f.extend_from_slice(&[0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, proto, 0, 0]);
        f[16..18].copy_from_slice(&(total as u16).to_be_bytes());
        f.extend_from_slice(&[198, 18, 0, 1, 198, 18, 0, 2]);
        let c = checksum::ipv4_header(&f[14..34]);
        f[24..26].copy_from_slice(&c.to_be_bytes());
        f.extend_from_slice(l4);
        f.resize(14 + total, 0xee);
        f.resize(f.len().max(60), 0);
        f
    }

    fn udp(payload: &[u8]) -> Vec<u8> {
        let mut u = vec![0x03, 0xe8, 0x00, 0x35, 0, 0, 0x12, 0x34];
        u[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        u.extend_from_slice(payload);
        u
    }

    fn want(l4: &[u8], at: usize, proto: u8) -> u16 {
        let mut z = l4.to_vec();
        z[at..at + 2].copy_from_slice(&[0, 0]);
        checksum::tcp_udp_ipv4([198, 18, 0, 1], [198, 18, 0, 2], proto, &z)
    }

    #[test]
    fn a_tcp_segment_gets_its_full_checksum() {
        let mut t = vec![
            0x03, 0xe8, 0, 80, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x18, 1, 0, 0xab, 0xcd, 0, 0,
        ];
        t.extend_from_slice(b"hello, world");
        let mut f = frame(6, &t, 0);
        complete_checksum(&mut f);
        assert_eq!(u16::from_be_bytes([f[50], f[51]]), want(&t, 16, 6));
    }

    #[test]
    fn a_udp_datagram_gets_its_full_checksum() {
        let u = udp(b"ping");
        let mut f = frame(17, &u, 0);
        complete_checksum(&mut f);
        assert_eq!(u16::from_be_bytes([f[40], f[41]]), want(&u, 6, 17));
    }

    /// The UDP checksum covers the datagram its length field gives (RFC
    /// 768), not IP payload beyond it: the receiver checks it that way.
    #[test]
    fn a_udp_checksum_covers_the_udp_length_not_the_ip_payload() {
        let u = udp(b"ping");
        let mut f = frame(17, &u, 6);
        complete_checksum(&mut f);
        assert_eq!(u16::from_be_bytes([f[40], f[41]]), want(&u, 6, 17));
    }

    /// A frame the one validator refuses is left as it came.
    #[test]
    fn frames_that_are_not_valid_ipv4_tcp_udp_are_left_alone() {
        let u = udp(b"ping");
        let good = frame(17, &u, 0);
        for (at, v) in [
            (12, 0x86),
            (14, 0x65),
            (14, 0x44),
            (16, 0xff),
            (20, 0x20),
            (23, 1),
            (38, 0xff),
        ] {
            let mut f = good.clone();
            f[at] = v;
            let before = f.clone();
            complete_checksum(&mut f);
            assert_eq!(f, before, "byte {at} = {v:#x}");
        }
    }
}
