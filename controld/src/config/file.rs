//! Reading the files a configuration comes from: regular files only, read
//! with a bound. A path anyone can point elsewhere (a FIFO, a device such as
//! /dev/zero, a directory) is refused at once, naming what it is, instead of
//! blocking controld's main loop in open(2) or reading without end.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Largest configuration file read (a real one is a few KiB).
pub const MAX_CONFIG_BYTES: u64 = 16 << 20;

/// Why a file was not read.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{}: cannot read: {source}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: is {found}, not a regular file", path.display())]
    NotRegular { path: PathBuf, found: &'static str },
    #[error("{}: is larger than {limit} bytes", path.display())]
    TooLarge { path: PathBuf, limit: u64 },
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Opens `path` without blocking (O_NONBLOCK: opening a FIFO waits for a
/// writer otherwise) and checks on the open descriptor (fstat, so the file
/// checked is the file read) that it is a regular file. Symbolic links are
/// followed: a configuration kept elsewhere and linked is ordinary.
pub fn open_regular(path: &Path) -> Result<File, FileError> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|source| FileError::Open {
            path: path.to_path_buf(),
            source,
        })?;
    let meta = file.metadata().map_err(|source| FileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    if !meta.file_type().is_file() {
        return Err(FileError::NotRegular {
            path: path.to_path_buf(),
            found: shm_layout::shm::file_kind(meta.file_type()),
        });
    }
    Ok(file)
}

/// The contents of the regular file `path`, at most `limit` bytes.
pub fn read_regular(path: &Path, limit: u64) -> Result<Vec<u8>, FileError> {
    let file = open_regular(path)?;
    let mut bytes = Vec::new();
    file.take(limit.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|source| FileError::Read {
            path: path.to_path_buf(),
            source,
        })?;
    if bytes.len() as u64 > limit {
        return Err(FileError::TooLarge {
            path: path.to_path_buf(),
            limit,
        });
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_directories_and_oversized_files_are_refused_by_name() {
        let e = read_regular(Path::new("/dev/zero"), 16).unwrap_err();
        assert_eq!(
            e.to_string(),
            "/dev/zero: is a character device, not a regular file"
        );
        let e = read_regular(Path::new("/"), 16).unwrap_err();
        assert_eq!(e.to_string(), "/: is a directory, not a regular file");
        let dir = std::env::temp_dir().join(format!("cfgfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("big");
        std::fs::write(&p, [b'x'; 17]).unwrap();
        let e = read_regular(&p, 16).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("{}: is larger than 16 bytes", p.display())
        );
        assert_eq!(read_regular(&p, 17).unwrap().len(), 17);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
