//! NIC ports behind one trait. `vnic` is a virtual NIC in shared memory
//! (the embedded default); `afpacket` and `afxdp` come later.

pub mod afpacket;
pub mod vnic;

/// A received or to-be-sent frame: a buffer handle owned by the host side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame {
    pub buf: u32,
    pub len: u16,
}

/// The ports one switch serves, sharing one buffer space: forwarding a frame
/// from one port to another of the same Nic moves the handle, never the bytes.
pub trait Nic {
    fn port_count(&self) -> usize;
    fn port_mac(&self, port: usize) -> [u8; 6];
    fn port_name(&self, port: usize) -> &str;
    /// Bytes per buffer.
    fn frame_capacity(&self) -> usize;
    /// Takes up to `out.len()` received frames from `port`; they become host-owned.
    fn rx_burst(&mut self, port: usize, out: &mut [Frame]) -> usize;
    /// The whole buffer of a host-owned frame; bytes `0..len` are the frame.
    fn buf_mut(&mut self, f: Frame) -> &mut [u8];
    /// Queues a host-owned frame for transmission on `port`; `Err(f)` when the
    /// TX ring is full (the caller then frees it).
    fn tx(&mut self, port: usize, f: Frame) -> Result<(), Frame>;
    /// Queues host-owned frames for transmission on `port`, in order, and
    /// returns how many it took: a prefix of `frames`, shorter when the TX
    /// ring fills (the caller then frees the rest).
    #[inline]
    fn tx_burst(&mut self, port: usize, frames: &[Frame]) -> usize {
        for (n, f) in frames.iter().enumerate() {
            if self.tx(port, *f).is_err() {
                return n;
            }
        }
        frames.len()
    }
    /// Transmits a copy of `bytes` (a frame the host kept outside the
    /// NIC's buffers) on `port`; false, sending nothing, when no buffer or
    /// TX slot is free or the frame does not fit one.
    fn tx_copy(&mut self, port: usize, bytes: &[u8]) -> bool;
    /// Makes queued transmissions visible to the other side.
    fn flush(&mut self, port: usize);
    /// Returns a host-owned frame's buffer to the pool.
    fn free(&mut self, f: Frame);
    /// Reclaims buffers of completed transmissions.
    fn reclaim(&mut self);
    /// Waits at most `max` for a frame to arrive on any port (the idle
    /// policy's nap). Returns early when the backend can be woken by the
    /// kernel (afpacket polls its sockets); a shared-memory ring cannot
    /// signal, so the default just sleeps.
    fn idle_wait(&mut self, max: core::time::Duration) {
        std::thread::sleep(max);
    }
    /// Frames the ports dropped on receive since the last call because a
    /// receive ring was full (the switch fell behind), over all ports. May
    /// cost a system call per port: call it when counters are published,
    /// not per burst. A NIC whose other end sees a full ring itself (vnic:
    /// the wire end counts what it could not queue) answers 0.
    fn take_rx_ring_drops(&mut self) -> u64 {
        0
    }

    /// Frames received but dropped by the driver itself since the last
    /// call because they did not fit a buffer (or could not be restored
    /// whole): never forwarded. Call it where
    /// [`Nic::take_rx_ring_drops`] is called.
    fn take_rx_truncated(&mut self) -> u64 {
        0
    }
}

/// Errors of the port backends.
#[derive(Debug, thiserror::Error)]
pub enum NetdrvError {
    #[error(transparent)]
    Shm(#[from] shm_layout::ShmError),
    #[error("{name}: not a vnic (magic {found:#018x})")]
    BadMagic { name: String, found: u64 },
    #[error("{name}: vnic layout fingerprint {found:#018x}, this program expects {expected:#018x}")]
    Fingerprint {
        name: String,
        expected: u64,
        found: u64,
    },
    #[error("{name}: {what}")]
    Invalid { name: String, what: String },
    #[error("{name}: the {side} side is already attached by live pid {pid}")]
    Busy {
        name: String,
        side: &'static str,
        pid: u32,
    },
}
