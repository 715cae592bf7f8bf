//! The runtime overrides on disk, so that a controld that replaces a
//! crashed one (and adopts its region) keeps what the operator changed
//! with lbctl. Written atomically (a temporary file renamed over the
//! old one, mode 0600) after every publication that changed them; read
//! only when a region is adopted; removed on a clean stop and when a
//! fresh region is created (a restart that starts over forgets them, as
//! before).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::overrides::Overrides;

/// Why the saved overrides could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum SavedError {
    #[error("{}: {error}", path.display())]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{}: not a list of overrides: {error}", path.display())]
    Format {
        path: PathBuf,
        error: serde_json::Error,
    },
}

#[derive(Debug, Serialize, Deserialize)]
struct Entry {
    service: String,
    backend: String,
    drained: bool,
    weight: Option<u32>,
}

/// The file beside the admin socket `socket` (`NAME.overrides`).
pub fn path_beside(socket: &Path) -> PathBuf {
    socket.with_extension("overrides")
}

/// Writes `o` to `path` (atomically; the directory must exist).
pub fn save(path: &Path, o: &Overrides) -> Result<(), SavedError> {
    let io = |error| SavedError::Io {
        path: path.to_path_buf(),
        error,
    };
    let entries: Vec<Entry> = o
        .iter()
        .map(|(s, b, x)| Entry {
            service: s.to_string(),
            backend: b.to_string(),
            drained: x.drained,
            weight: x.weight,
        })
        .collect();
    let text = serde_json::to_string(&entries).map_err(|error| SavedError::Format {
        path: path.to_path_buf(),
        error,
    })?;
    let tmp = path.with_extension("overrides.tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// Reads the overrides saved at `path`; none if there is no file.
pub fn load(path: &Path) -> Result<Overrides, SavedError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Overrides::default()),
        Err(error) => {
            return Err(SavedError::Io {
                path: path.to_path_buf(),
                error,
            });
        }
    };
    let entries: Vec<Entry> = serde_json::from_str(&text).map_err(|error| SavedError::Format {
        path: path.to_path_buf(),
        error,
    })?;
    let mut o = Overrides::default();
    for e in entries {
        if e.drained {
            o.drain(&e.service, &e.backend);
        }
        o.set_weight(&e.service, &e.backend, e.weight);
    }
    Ok(o)
}

/// Removes the file at `path`, if any.
pub fn remove(path: &Path) {
    let _ = std::fs::remove_file(path);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_round_trip_and_a_missing_file_is_none() {
        let path = std::env::temp_dir().join(format!("saved-{}.overrides", std::process::id()));
        assert_eq!(load(&path).unwrap(), Overrides::default());
        let mut o = Overrides::default();
        o.drain("web", "web1");
        o.set_weight("web", "web2", Some(7));
        o.drain("dns", "dns1");
        o.set_weight("dns", "dns1", Some(0));
        save(&path, &o).unwrap();
        assert_eq!(load(&path).unwrap(), o);
        std::fs::write(&path, "nope").unwrap();
        let e = load(&path).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("{}: not a list of overrides: ", path.display())),
            "{e}"
        );
        remove(&path);
        assert!(!path.exists());
    }
}
