//! POSIX shared-memory objects: create, open, map, unlink.
//!
//! This is the only place that turns a name under `/dev/shm` into a mapping.
//! Everything above it works on a [`Mapping`], a fixed-size byte region whose
//! base address is stable for the life of the value.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::OwnedFd;

use memmap2::{Advice, MmapOptions, MmapRaw};
use nix::fcntl::OFlag;
use nix::sys::mman::{shm_open, shm_unlink};
use nix::sys::stat::Mode;

/// Errors from creating, opening or mapping a shared-memory object.
#[derive(Debug, thiserror::Error)]
pub enum ShmError {
    #[error("shared-memory name {0:?} is invalid: it must be 1..=200 characters of [A-Za-z0-9._-]")]
    BadName(String),
    #[error(
        "shared-memory object /dev/shm/{name} already exists (is another instance running? remove it with `rm /dev/shm/{name}` if not)"
    )]
    Exists { name: String },
    #[error("shared-memory object /dev/shm/{name} does not exist")]
    NotFound { name: String },
    #[error("shared-memory object /dev/shm/{name}: {op}: {source}")]
    Os {
        name: String,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "shared-memory object /dev/shm/{name} is not trusted: owned by uid {uid} with mode {mode:04o}, but only an object of uid {expected_uid} with mode 0600 (no access for group or others) is used; anyone could have written it: remove it if it is not yours"
    )]
    Untrusted {
        name: String,
        uid: u32,
        mode: u32,
        expected_uid: u32,
    },
    #[error(
        "shared-memory object /dev/shm/{name}: is {found}, not a regular file; anyone could have placed it: remove it if it is not yours"
    )]
    NotRegular { name: String, found: &'static str },
    #[error("shared-memory object /dev/shm/{name} is {actual} bytes, expected at least {expected}")]
    TooSmall {
        name: String,
        actual: u64,
        expected: u64,
    },
}

/// A shared-memory mapping. Read-write unless opened with [`Access::ReadOnly`].
///
/// The mapping is `MAP_SHARED`; its base address never moves while the value
/// lives. Raw access goes through [`Mapping::as_ptr`]; typed access is built on
/// top of it by the region and vnic modules.
pub struct Mapping {
    raw: MmapRaw,
    name: String,
    writable: bool,
}

impl std::fmt::Debug for Mapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mapping")
            .field("name", &self.name)
            .field("len", &self.raw.len())
            .field("writable", &self.writable)
            .finish()
    }
}

/// How a mapping may be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    ReadWrite,
    ReadOnly,
}

fn check_name(name: &str) -> Result<CString, ShmError> {
    let ok = !name.is_empty()
        && name.len() <= 200
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if !ok {
        return Err(ShmError::BadName(name.to_string()));
    }
    CString::new(format!("/{name}")).map_err(|_| ShmError::BadName(name.to_string()))
}

fn os(name: &str, op: &'static str, e: impl Into<std::io::Error>) -> ShmError {
    ShmError::Os {
        name: name.to_string(),
        op,
        source: e.into(),
    }
}

/// Asks for transparent huge pages behind the mapping (before any page is
/// faulted in). Where the tmpfs under /dev/shm allows them (mount option
/// `huge=advise`, `within_size` or `always`), a table of hundreds of MiB
/// then takes a few hundred TLB entries instead of tens of thousands: the
/// per-packet lookups of a large connection table stop paying page walks.
/// Elsewhere it changes nothing, and a refusal is ignored.
fn prefer_huge_pages(raw: &MmapRaw) {
    let _ = raw.advise(Advice::HugePage);
}

/// Faults every page of a writable mapping in now (MADV_POPULATE_WRITE;
/// on kernels before 5.14, which refuse it with EINVAL, by reading each
/// page). Any other refusal (no memory left under /dev/shm, for one) is an
/// error: touching the pages would only die of SIGBUS later.
fn populate(name: &str, raw: &MmapRaw) -> Result<(), ShmError> {
    match raw.advise(Advice::PopulateWrite) {
        Ok(()) => return Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
        Err(e) => {
            return Err(os(
                name,
                "faulting its pages in (is /dev/shm out of space?)",
                e,
            ));
        }
    }
    let p = raw.as_ptr();
    for off in (0..raw.len()).step_by(4096) {
        // SAFETY: `off` is inside the mapping; a volatile read changes
        // nothing (other processes may be writing the region: no write
        // here, not even of a byte's own value).
        unsafe { p.add(off).read_volatile() };
    }
    Ok(())
}

/// The lines of /proc/self/smaps that describe the mapping starting at
/// `base`: its header line, then its fields up to the next mapping.
fn smaps_block(base: *mut u8) -> Option<Vec<String>> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
    let start = format!("{:x}-", base as usize);
    let mut lines = smaps.lines().skip_while(|l| !l.starts_with(&start));
    let head = lines.next()?;
    // Field lines are `Name:   value`; the next mapping's header is not.
    let fields = lines.take_while(|l| {
        l.split_whitespace()
            .next()
            .is_some_and(|w| w.ends_with(':'))
    });
    Some(
        std::iter::once(head)
            .chain(fields)
            .map(str::to_string)
            .collect(),
    )
}

/// Only an object that this user created for itself is trusted: /dev/shm is
/// world-writable, so anyone can place a file under an instance's name, and
/// what a region says (pids to signal, addresses to route to) must come
/// from the appliance. Checked on the open descriptor (fstat), so the object
/// checked is the object mapped.
fn check_owner(name: &str, meta: &std::fs::Metadata) -> Result<(), ShmError> {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    let mode = meta.mode() & 0o7777;
    if meta.uid() != me || mode & 0o077 != 0 {
        return Err(ShmError::Untrusted {
            name: name.to_string(),
            uid: meta.uid(),
            mode,
            expected_uid: me,
        });
    }
    Ok(())
}

/// What a file that is not a regular file is, in words (for errors that
/// refuse it: a region here, a configuration or secret file in controld).
pub fn file_kind(t: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_dir() {
        "a directory"
    } else {
        "not a file"
    }
}

/// Only a regular file is a region (checked on the open descriptor).
fn check_regular(name: &str, meta: &std::fs::Metadata) -> Result<(), ShmError> {
    let t = meta.file_type();
    if t.is_file() {
        return Ok(());
    }
    let found = file_kind(t);
    Err(ShmError::NotRegular {
        name: name.to_string(),
        found,
    })
}

impl Mapping {
    /// Creates a new object of `len` bytes with mode 0600, zero-filled, and maps it
    /// read-write. Fails with [`ShmError::Exists`] if the name is taken.
    pub fn create(name: &str, len: usize) -> Result<Self, ShmError> {
        let cname = check_name(name)?;
        let fd: OwnedFd = shm_open(
            cname.as_c_str(),
            OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_RDWR,
            Mode::S_IRUSR | Mode::S_IWUSR,
        )
        .map_err(|e| match e {
            nix::errno::Errno::EEXIST => ShmError::Exists {
                name: name.to_string(),
            },
            e => os(name, "shm_open(O_CREAT|O_EXCL)", e),
        })?;
        let file = File::from(fd);
        let mapped = file
            .set_len(len as u64)
            .map_err(|e| os(name, "ftruncate", e))
            .and_then(|()| {
                let raw = MmapOptions::new()
                    .len(len)
                    .map_raw(&file)
                    .map_err(|e| os(name, "mmap", e))?;
                prefer_huge_pages(&raw);
                // Pre-fault every page: the data path must not take page
                // faults on its first touch of a connection slot.
                populate(name, &raw)?;
                Ok(raw)
            });
        match mapped {
            Ok(raw) => Ok(Self {
                raw,
                name: name.to_string(),
                writable: true,
            }),
            Err(e) => {
                let _ = shm_unlink(cname.as_c_str());
                Err(e)
            }
        }
    }

    /// Opens an existing object and maps all of it. The object must belong
    /// to this process's effective user and give no access to anyone else
    /// ([`ShmError::Untrusted`] otherwise); `min_len` guards against a
    /// truncated or foreign object before any byte is interpreted.
    pub fn open(name: &str, access: Access, min_len: usize) -> Result<Self, ShmError> {
        let cname = check_name(name)?;
        // O_NONBLOCK: a FIFO planted under the name (/dev/shm is world
        // writable) would block open(2) until a writer came; it is refused
        // below by its type instead. (glibc's shm_open adds O_NOFOLLOW.)
        let flags = OFlag::O_NONBLOCK
            | OFlag::O_NOFOLLOW
            | match access {
                Access::ReadWrite => OFlag::O_RDWR,
                Access::ReadOnly => OFlag::O_RDONLY,
            };
        let fd: OwnedFd =
            shm_open(cname.as_c_str(), flags, Mode::empty()).map_err(|e| match e {
                nix::errno::Errno::ENOENT => ShmError::NotFound {
                    name: name.to_string(),
                },
                e => os(name, "shm_open", e),
            })?;
        let file = File::from(fd);
        let meta = file.metadata().map_err(|e| os(name, "fstat", e))?;
        check_regular(name, &meta)?;
        check_owner(name, &meta)?;
        let actual = meta.len();
        if actual < min_len as u64 || actual == 0 {
            return Err(ShmError::TooSmall {
                name: name.to_string(),
                actual,
                expected: min_len.max(1) as u64,
            });
        }
        let len = usize::try_from(actual).map_err(|_| ShmError::TooSmall {
            name: name.to_string(),
            actual,
            expected: min_len as u64,
        })?;
        let raw = match access {
            Access::ReadWrite => MmapOptions::new().len(len).map_raw(&file),
            Access::ReadOnly => MmapOptions::new().len(len).map_raw_read_only(&file),
        }
        .map_err(|e| os(name, "mmap", e))?;
        prefer_huge_pages(&raw);
        if access == Access::ReadWrite {
            // Writers (switchd, the wire side) build their page tables at
            // attach, not on the data path.
            populate(name, &raw)?;
        }
        Ok(Self {
            raw,
            name: name.to_string(),
            writable: access == Access::ReadWrite,
        })
    }

    /// Removes the name; existing mappings stay valid until dropped.
    pub fn unlink(name: &str) -> Result<(), ShmError> {
        let cname = check_name(name)?;
        shm_unlink(cname.as_c_str()).map_err(|e| match e {
            nix::errno::Errno::ENOENT => ShmError::NotFound {
                name: name.to_string(),
            },
            e => os(name, "shm_unlink", e),
        })
    }

    /// Whether an object of that name exists.
    pub fn exists(name: &str) -> bool {
        std::path::Path::new("/dev/shm").join(name).exists()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn len(&self) -> usize {
        self.raw.len()
    }

    pub fn is_empty(&self) -> bool {
        self.raw.len() == 0
    }

    pub fn is_writable(&self) -> bool {
        self.writable
    }

    /// Base address of the mapping. Page aligned. Writing through it is only
    /// allowed when [`Mapping::is_writable`]; the typed layers check that.
    pub fn as_ptr(&self) -> *mut u8 {
        self.raw.as_mut_ptr()
    }

    /// Bytes of this mapping that the kernel maps with huge pages (2 MiB
    /// page-table entries), from /proc/self/smaps; `None` if that cannot
    /// be read.
    pub fn huge_page_bytes(&self) -> Option<u64> {
        let block = smaps_block(self.as_ptr())?;
        let kib: u64 = block
            .iter()
            .filter_map(|l| {
                let v = l
                    .strip_prefix("ShmemPmdMapped:")
                    .or_else(|| l.strip_prefix("FilePmdMapped:"))?;
                v.trim().trim_end_matches("kB").trim().parse::<u64>().ok()
            })
            .sum();
        Some(kib * 1024)
    }

    /// Locks the mapping in memory (best effort for the data path).
    pub fn lock(&self) -> std::io::Result<()> {
        self.raw.lock()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unique(tag: &str) -> String {
        format!("switchyard-test-{tag}-{}", std::process::id())
    }

    #[test]
    fn an_object_others_could_write_or_another_user_owns_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let name = unique("shmtrust");
        let path = std::path::Path::new("/dev/shm").join(&name);
        drop(Mapping::create(&name, 8192).unwrap());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        let err = Mapping::open(&name, Access::ReadOnly, 1).unwrap_err();
        assert!(
            matches!(err, ShmError::Untrusted { mode: 0o666, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("mode 0666"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        Mapping::open(&name, Access::ReadOnly, 1).unwrap();
        // Another owner (as root, the test can hand the file to nobody).
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            std::os::unix::fs::chown(&path, Some(65534), None).unwrap();
            let err = Mapping::open(&name, Access::ReadWrite, 1).unwrap_err();
            assert!(
                matches!(err, ShmError::Untrusted { uid: 65534, .. }),
                "{err}"
            );
        }
        Mapping::unlink(&name).unwrap();
    }

    #[test]
    fn create_open_unlink() {
        let name = unique("shm");
        let m = Mapping::create(&name, 8192).unwrap();
        // SAFETY: fresh 8 KiB mapping, in bounds.
        unsafe { m.as_ptr().add(100).write(7) };
        assert!(matches!(
            Mapping::create(&name, 8192),
            Err(ShmError::Exists { .. })
        ));
        let r = Mapping::open(&name, Access::ReadOnly, 8192).unwrap();
        // SAFETY: same object, in bounds.
        assert_eq!(unsafe { r.as_ptr().add(100).read() }, 7);
        assert!(matches!(
            Mapping::open(&name, Access::ReadOnly, 16384),
            Err(ShmError::TooSmall { .. })
        ));
        Mapping::unlink(&name).unwrap();
        assert!(matches!(
            Mapping::open(&name, Access::ReadOnly, 1),
            Err(ShmError::NotFound { .. })
        ));
    }

    /// The VmFlags of the mapping that starts at `base`.
    fn vm_flags(base: *mut u8) -> String {
        smaps_block(base)
            .expect("the mapping in /proc/self/smaps")
            .iter()
            .find_map(|l| l.strip_prefix("VmFlags:").map(str::to_string))
            .expect("a VmFlags line")
    }

    /// Every mapping of an object asks for huge pages (smaps flag `hg`),
    /// the creator's and an attacher's, read-write or read-only: whether
    /// it gets them is the tmpfs mount's choice (`huge=`), not ours.
    #[test]
    fn mappings_ask_for_huge_pages() {
        let name = unique("huge");
        let m = Mapping::create(&name, 4 << 20).unwrap();
        let rw = Mapping::open(&name, Access::ReadWrite, 1).unwrap();
        let ro = Mapping::open(&name, Access::ReadOnly, 1).unwrap();
        for (what, p) in [
            ("created", m.as_ptr()),
            ("read-write", rw.as_ptr()),
            ("read-only", ro.as_ptr()),
        ] {
            let flags = vm_flags(p);
            assert!(
                flags.split_whitespace().any(|f| f == "hg"),
                "{what}: VmFlags:{flags}"
            );
        }
        // Huge pages or not is the mount's choice; the count is readable
        // and never more than the mapping.
        assert!(m.huge_page_bytes().is_some_and(|b| b <= 4 << 20));
        Mapping::unlink(&name).unwrap();
    }

    #[test]
    fn bad_names_are_refused() {
        assert!(matches!(
            Mapping::create("a/b", 10),
            Err(ShmError::BadName(_))
        ));
        assert!(matches!(Mapping::create("", 10), Err(ShmError::BadName(_))));
    }
}
