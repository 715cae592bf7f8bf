//! The connection log: one JSON line per closed connection
//! (`[records] log`), appended by a writer thread so that the main loop
//! never waits for the disk.
//!
//! The main loop hands each line to the writer over a bounded queue
//! ([`QUEUE_LINES`]) without blocking; if the queue is full (the disk is
//! slower than the closes) the line is dropped and counted, never waited
//! for. The writer buffers its writes and flushes at least every
//! [`FLUSH_EVERY`]; a write error drops the line (counted) and the file is
//! reopened on the next reopen request. [`ConnLog::reopen`] (SIGHUP,
//! `lbctl reopen`) makes the writer flush and open the path again, so a
//! rotation (`mv flows.jsonl flows.jsonl.1`, then reopen) starts a new file
//! with no line lost or split.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::thread::JoinHandle;
use std::time::Duration;

use admin_proto::FlowView;

/// Lines the queue to the writer holds.
pub const QUEUE_LINES: usize = 65_536;
/// The longest a written line stays in the writer's buffer.
pub const FLUSH_EVERY: Duration = Duration::from_millis(200);

/// The log's counters (see the metrics).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogStats {
    pub written: u64,
    pub dropped: u64,
    pub reopens: u64,
}

#[derive(Debug, Default)]
struct Shared {
    reopen: AtomicBool,
    written: AtomicU64,
    dropped: AtomicU64,
    reopens: AtomicU64,
}

#[derive(Debug)]
pub struct ConnLog {
    path: PathBuf,
    tx: Option<SyncSender<String>>,
    shared: Arc<Shared>,
    writer: Option<JoinHandle<()>>,
}

fn open(path: &Path) -> std::io::Result<BufWriter<File>> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path)
        .map(|f| BufWriter::with_capacity(64 * 1024, f))
}

impl ConnLog {
    /// Opens (creates, appends to) `path` and starts the writer thread.
    pub fn open(path: PathBuf) -> std::io::Result<Self> {
        let file = open(&path).map_err(|e| {
            std::io::Error::new(e.kind(), format!("connection log {}: {e}", path.display()))
        })?;
        let (tx, rx) = sync_channel(QUEUE_LINES);
        let shared = Arc::new(Shared::default());
        let writer = {
            let (shared, path) = (shared.clone(), path.clone());
            std::thread::Builder::new()
                .name("conn-log".into())
                .spawn(move || write_lines(&path, Some(file), &rx, &shared))?
        };
        Ok(Self {
            path,
            tx: Some(tx),
            shared,
            writer: Some(writer),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Queues one record's line; never blocks (a full queue drops it, counted).
    pub fn write(&self, v: &FlowView) {
        let Some(tx) = &self.tx else { return };
        let line = match serde_json::to_string(v) {
            Ok(l) => l,
            Err(_) => {
                self.shared.dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = tx.try_send(line) {
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Makes the writer reopen the path after the lines queued so far.
    pub fn reopen(&self) {
        self.shared.reopen.store(true, Ordering::Release);
        // Wakes the writer if it waits (an empty line is not written).
        if let Some(tx) = &self.tx {
            let _ = tx.try_send(String::new());
        }
    }

    pub fn stats(&self) -> LogStats {
        LogStats {
            written: self.shared.written.load(Ordering::Relaxed),
            dropped: self.shared.dropped.load(Ordering::Relaxed),
            reopens: self.shared.reopens.load(Ordering::Relaxed),
        }
    }
}

impl Drop for ConnLog {
    /// Writes what is queued and stops the writer.
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

fn write_lines(path: &Path, mut file: Option<BufWriter<File>>, rx: &Receiver<String>, s: &Shared) {
    let mut warned = false;
    loop {
        let msg = rx.recv_timeout(FLUSH_EVERY);
        if s.reopen.swap(false, Ordering::Acquire) {
            // Lines queued before the request go to the old file.
            if let Ok(line) = &msg {
                put(&mut file, line, s);
            }
            while let Ok(line) = rx.try_recv() {
                put(&mut file, &line, s);
            }
            if let Some(mut f) = file.take() {
                let _ = f.flush();
            }
            file = match open(path) {
                Ok(f) => {
                    s.reopens.fetch_add(1, Ordering::Relaxed);
                    warned = false;
                    Some(f)
                }
                Err(e) => {
                    log::error!("connection log {}: reopen failed: {e}", path.display());
                    None
                }
            };
            continue;
        }
        match msg {
            Ok(line) => put(&mut file, &line, s),
            Err(RecvTimeoutError::Timeout) => {
                if let Some(f) = &mut file
                    && let Err(e) = f.flush()
                    && !warned
                {
                    log::error!("connection log {}: {e}", path.display());
                    warned = true;
                }
            }
            Err(RecvTimeoutError::Disconnected) => {
                if let Some(f) = &mut file {
                    let _ = f.flush();
                }
                return;
            }
        }
    }
}

fn put(file: &mut Option<BufWriter<File>>, line: &str, s: &Shared) {
    if line.is_empty() {
        return;
    }
    let ok = file.as_mut().is_some_and(|f| {
        f.write_all(line.as_bytes())
            .and_then(|_| f.write_all(b"\n"))
            .is_ok()
    });
    if ok {
        s.written.fetch_add(1, Ordering::Relaxed);
    } else {
        s.dropped.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(i: u64) -> FlowView {
        FlowView {
            created_unix_ms: i,
            closed_unix_ms: i + 1,
            duration_ms: 1,
            protocol: "tcp".into(),
            service: Some("web".into()),
            backend: Some("web/web1".into()),
            backend_id: 1,
            client: "198.18.100.1:40000".into(),
            vip: "198.18.0.10:80".into(),
            backend_address: "198.19.1.1:8080".into(),
            reason: "fin_client".into(),
            to_backend_packets: 1,
            to_backend_bytes: 2,
            to_client_packets: 3,
            to_client_bytes: 4,
        }
    }

    fn lines(p: &Path) -> Vec<FlowView> {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Lines before a reopen go to the rotated file, lines after to the
    /// new one; none is lost or split.
    #[test]
    fn a_rotation_and_reopen_splits_the_lines_between_the_files() {
        let dir = std::env::temp_dir().join(format!("connlog-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("flows.jsonl");
        let rotated = dir.join("flows.jsonl.1");
        let log = ConnLog::open(p.clone()).unwrap();
        for i in 0..10 {
            log.write(&flow(i));
        }
        std::fs::rename(&p, &rotated).unwrap();
        log.reopen();
        // The reopen is done once the writer created the new file.
        let t = std::time::Instant::now();
        while !p.exists() && t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(5));
        }
        for i in 10..15 {
            log.write(&flow(i));
        }
        drop(log);
        let old: Vec<u64> = lines(&rotated).iter().map(|f| f.created_unix_ms).collect();
        let new: Vec<u64> = lines(&p).iter().map(|f| f.created_unix_ms).collect();
        assert_eq!(old, (0..10).collect::<Vec<_>>());
        assert_eq!(new, (10..15).collect::<Vec<_>>());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
