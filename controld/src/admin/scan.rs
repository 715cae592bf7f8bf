//! Reads of the whole connection table (`lbctl conns`) off the main loop.
//!
//! A table of millions of slots takes tens of milliseconds to read; on the
//! main loop a few clients asking in turn would stop supervision, the GC
//! and health publication. The main loop only plans a scan
//! ([`super::view::conns_plan`]); one thread with its own read-only mapping
//! of the region runs the plans, one at a time, and answers the client. At
//! most [`QUEUE`] plans wait; past that a client is told to try again.

use std::sync::mpsc::{self, Sender, SyncSender, TrySendError};

use shm_layout::{Access, Region, RegionError};

use super::proto;
use super::view::ConnsPlan;

/// Scans that may wait behind the running one.
pub const QUEUE: usize = 4;

struct Job {
    plan: ConnsPlan,
    reply: Sender<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error("admin scans: {0}")]
    Region(#[from] RegionError),
    #[error("admin scans: cannot start the scanning thread: {0}")]
    Thread(#[from] std::io::Error),
}

/// The scanning thread's queue.
#[derive(Debug)]
pub struct Scanner {
    jobs: SyncSender<Job>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("scan job")
    }
}

impl Scanner {
    /// Maps `instance`'s region read-only and starts the thread.
    pub fn start(instance: &str) -> Result<Scanner, ScanError> {
        let region = Region::attach(instance, Access::ReadOnly)?;
        let (tx, rx) = mpsc::sync_channel::<Job>(QUEUE);
        std::thread::Builder::new()
            .name("admin-scan".into())
            .spawn(move || {
                for job in rx {
                    let reply = job.plan.run(&region);
                    let _ = job.reply.send(proto::ok_line(&reply));
                }
            })?;
        Ok(Scanner { jobs: tx })
    }

    /// Queues a scan; the client is answered from the scanning thread, or
    /// at once with an error when the queue is full.
    pub fn submit(&self, plan: ConnsPlan, reply: Sender<String>) {
        match self.jobs.try_send(Job { plan, reply }) {
            Ok(()) => {}
            Err(TrySendError::Full(j)) => {
                let _ = j.reply.send(proto::error_line(&format!(
                    "conns: {} scans of the connection table are already waiting; try again",
                    QUEUE + 1
                )));
            }
            Err(TrySendError::Disconnected(j)) => {
                let _ = j
                    .reply
                    .send(proto::error_line("conns: the scanning thread has stopped"));
            }
        }
    }
}
