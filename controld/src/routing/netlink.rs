//! The kernel side of the mirror over rtnetlink (netlink-sys sockets,
//! netlink-packet-route messages), used synchronously: no I/O decisions
//! beyond reading and asking.
//!
//! Two sockets: one joined to the link, neighbour and IPv4 route multicast
//! groups and read without blocking (change notifications; a full queue is
//! reported as an overflow, after which the whole state must be re-read),
//! and one for requests — dumps and neighbour resolution — read with a
//! receive timeout and a deadline, so nothing here blocks for long.

use std::io;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_REPLACE, NLM_F_REQUEST,
    NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::link::LinkMessage;
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage,
};
use netlink_packet_route::route::RouteMessage;
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::protocols::NETLINK_ROUTE;
use netlink_sys::{Socket, SocketAddr};

use super::kernel;
use super::mirror::{Changes, Kernel};
use super::table::KernelTables;

/// Longest wait for one datagram of a reply.
const RECV_TIMEOUT: Duration = Duration::from_secs(1);
/// Longest time one request (a dump, a resolution) may take.
const REQUEST_DEADLINE: Duration = Duration::from_secs(5);
/// Notification datagrams read per poll at most (the rest waits a tick).
const MAX_NOTIFICATIONS: usize = 4096;
/// Receive buffer; a dump datagram is at most 32 KiB.
const BUF_LEN: usize = 64 * 1024;
/// Kernel receive queue of the notification socket (it may grant less).
const MONITOR_RCVBUF: usize = 4 << 20;

/// rtnetlink sockets of controld's network namespace.
pub struct Netlink {
    req: Socket,
    mon: Socket,
    seq: u32,
    buf: Vec<u8>,
}

fn other(msg: String) -> io::Error {
    io::Error::other(msg)
}

impl Netlink {
    /// Opens both sockets and joins the notification groups (before the
    /// first dump, so no change between the two is missed).
    pub fn open() -> io::Result<Self> {
        let mut mon = Socket::new(NETLINK_ROUTE)?;
        mon.bind_auto()?;
        for group in [
            libc::RTNLGRP_LINK,
            libc::RTNLGRP_NEIGH,
            libc::RTNLGRP_IPV4_ROUTE,
        ] {
            mon.add_membership(group)?;
        }
        mon.set_non_blocking(true)?;
        // Best effort: the kernel caps it at net.core.rmem_max.
        let _ = mon.set_rx_buf_sz(MONITOR_RCVBUF as libc::c_int);
        let mut req = Socket::new(NETLINK_ROUTE)?;
        req.bind_auto()?;
        req.connect(&SocketAddr::new(0, 0))?;
        nix::sys::socket::setsockopt(
            &req,
            nix::sys::socket::sockopt::ReceiveTimeout,
            &nix::sys::time::TimeVal::new(RECV_TIMEOUT.as_secs() as _, 0),
        )?;
        Ok(Netlink {
            req,
            mon,
            seq: 0,
            buf: vec![0; BUF_LEN],
        })
    }

    /// Sends one request; returns its sequence number.
    fn send(&mut self, msg: RouteNetlinkMessage, flags: u16) -> io::Result<u32> {
        self.seq = self.seq.wrapping_add(1).max(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.seq;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(msg));
        packet.finalize();
        let mut out = vec![0; packet.buffer_len()];
        packet.serialize(&mut out);
        self.req.send(&out, 0)?;
        Ok(self.seq)
    }

    /// Reads the replies to request `seq` until it is answered (Done, an
    /// error, or an acknowledgement), handing each inner message to `each`.
    fn replies(&mut self, seq: u32, mut each: impl FnMut(RouteNetlinkMessage)) -> io::Result<()> {
        let deadline = Instant::now() + REQUEST_DEADLINE;
        let mut interrupted = false;
        loop {
            if Instant::now() > deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no complete answer from the kernel within {REQUEST_DEADLINE:?}"),
                ));
            }
            let n = self
                .req
                .recv(&mut &mut self.buf[..], libc::MSG_TRUNC)
                .map_err(|e| match e.kind() {
                    io::ErrorKind::WouldBlock => io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("no answer from the kernel within {RECV_TIMEOUT:?}"),
                    ),
                    _ => e,
                })?;
            if n > self.buf.len() {
                return Err(other(format!(
                    "a {n}-byte netlink reply exceeds the {}-byte buffer",
                    self.buf.len()
                )));
            }
            let mut done = false;
            for m in messages(&self.buf[..n]) {
                let m = m?;
                if m.header.sequence_number != seq {
                    continue; // a late answer to an earlier request
                }
                interrupted |= m.header.flags & NLM_F_DUMP_INTR != 0;
                match m.payload {
                    NetlinkPayload::InnerMessage(inner) => each(inner),
                    NetlinkPayload::Done(_) => done = true,
                    NetlinkPayload::Error(e) => match e.code {
                        Some(_) => return Err(e.to_io()),
                        None => done = true,
                    },
                    _ => {}
                }
            }
            if done {
                return if interrupted {
                    Err(io::Error::new(
                        io::ErrorKind::Interrupted,
                        "the table changed during the dump",
                    ))
                } else {
                    Ok(())
                };
            }
        }
    }

    fn dump_each(
        &mut self,
        msg: RouteNetlinkMessage,
        each: impl FnMut(RouteNetlinkMessage),
    ) -> io::Result<()> {
        let seq = self.send(msg, NLM_F_DUMP)?;
        self.replies(seq, each)
    }
}

/// The netlink messages of one datagram.
fn messages(
    buf: &[u8],
) -> impl Iterator<Item = io::Result<NetlinkMessage<RouteNetlinkMessage>>> + '_ {
    let mut off = 0;
    std::iter::from_fn(move || {
        if off >= buf.len() {
            return None;
        }
        let rest = &buf[off..];
        let len = match NetlinkBuffer::new_checked(rest) {
            Ok(b) => b.length() as usize,
            Err(e) => {
                off = buf.len();
                return Some(Err(other(format!("malformed netlink header: {e}"))));
            }
        };
        off += (len + 3) & !3;
        Some(
            NetlinkMessage::<RouteNetlinkMessage>::deserialize(&rest[..len])
                .map_err(|e| other(format!("undecodable netlink message: {e}"))),
        )
    })
}

impl Kernel for Netlink {
    fn dump(&mut self) -> io::Result<KernelTables> {
        let mut t = KernelTables::default();
        self.dump_each(RouteNetlinkMessage::GetLink(LinkMessage::default()), |m| {
            if let RouteNetlinkMessage::NewLink(l) = m
                && let Some(l) = kernel::link(&l)
            {
                t.links.push(l);
            }
        })?;
        let mut rq = RouteMessage::default();
        rq.header.address_family = AddressFamily::Inet;
        self.dump_each(RouteNetlinkMessage::GetRoute(rq), |m| {
            if let RouteNetlinkMessage::NewRoute(r) = m {
                t.routes.extend(kernel::routes(&r));
            }
        })?;
        let mut nq = NeighbourMessage::default();
        nq.header.family = AddressFamily::Inet;
        self.dump_each(RouteNetlinkMessage::GetNeighbour(nq), |m| {
            if let RouteNetlinkMessage::NewNeighbour(n) = m
                && let Some(n) = kernel::neighbour(&n)
            {
                t.neighbours.push(n);
            }
        })?;
        Ok(t)
    }

    fn changes(&mut self) -> io::Result<Changes> {
        let mut c = Changes::default();
        for _ in 0..MAX_NOTIFICATIONS {
            match self.mon.recv(&mut &mut self.buf[..], libc::MSG_TRUNC) {
                Ok(n) if n > self.buf.len() => c.overflow = true,
                Ok(n) => {
                    for m in messages(&self.buf[..n]) {
                        match m {
                            Ok(m) => {
                                if let NetlinkPayload::InnerMessage(inner) = &m.payload
                                    && kernel::relevant(inner)
                                {
                                    c.relevant += 1;
                                }
                            }
                            // Unknown to the decoder: re-read to be safe.
                            Err(_) => c.relevant += 1,
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => c.overflow = true,
                Err(e) => return Err(e),
            }
        }
        Ok(c)
    }

    fn resolve(&mut self, address: Ipv4Addr, ifindex: u32) -> io::Result<()> {
        // `ip neigh replace ADDRESS dev IF use`: creates the entry if needed
        // and makes the kernel resolve it as if a packet were waiting.
        let mut m = NeighbourMessage::default();
        m.header.family = AddressFamily::Inet;
        m.header.ifindex = ifindex;
        m.header.flags = NeighbourFlags::Use;
        m.attributes = vec![NeighbourAttribute::Destination(NeighbourAddress::Inet(
            address,
        ))];
        let seq = self.send(
            RouteNetlinkMessage::NewNeighbour(m),
            NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
        )?;
        self.replies(seq, |_| {})
    }
}
