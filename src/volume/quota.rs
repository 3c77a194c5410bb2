//! `--size` enforcement for a volume.
//!
//! Accounting (decided here, documented in the README):
//! - "Bytes used" is the sum of the apparent sizes (st_size) of the regular files and
//!   symlinks in the volume, each inode counted once however many links it has;
//!   directories and special files count 0. Apparent size, not st_blocks, because the
//!   effect of a write on it is known *before* the write (the new end of file), so a
//!   write can be refused up front instead of undone after; holes count as used, so
//!   the limit errs on the safe side.
//! - The count lives in a ledger file (`usage`) in the volume's directory, updated
//!   under flock by every mount using the volume, so two mounts writing at once share
//!   one budget. It is recomputed from the directory (a scan) at every mount, and again
//!   before any write would be refused, so files the host removed behind our back free
//!   their space; `volume inspect` always scans.
//! - A growing operation first reserves its growth (refused with ENOSPC when the
//!   ledger would pass the limit, leaving the file untouched), then settles the
//!   difference between the reservation and the size change actually observed.
//! - The ledger also holds the limit (second line), written by each mount from the
//!   volume's metadata when it opens the ledger and by `volume update` (`resize`)
//!   together with the metadata, so a limit changed while mounts run applies to them
//!   at their next operation. Both writers hold the volume's lock, so metadata and
//!   ledger agree; a ledger of one line (older) takes the mount's own limit.

use std::collections::HashSet;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::sys::{self, Errno, SysResult};

/// Name of the ledger file in a volume's directory.
pub const LEDGER: &str = "usage";

/// A write that does not fit triggers a rescan, so that space freed behind the
/// ledger's back (by the host) is found. A scan shorter than `CHEAP_SCAN` is always
/// redone; a longer one only once `RESCAN_SPACING` times its duration has passed, so
/// that a writer retrying after ENOSPC on a huge volume spends at most a tenth of its
/// time walking it.
const CHEAP_SCAN: Duration = Duration::from_millis(20);
const RESCAN_SPACING: u32 = 10;

/// Apparent bytes used under `root` (see the module notes), symlinks not followed.
pub fn scan_usage(root: BorrowedFd<'_>) -> SysResult<u64> {
    let mut seen = HashSet::new();
    scan_dir(root, &mut seen)
}

fn scan_dir(dir: BorrowedFd<'_>, seen: &mut HashSet<(u64, u64)>) -> SysResult<u64> {
    let mut total = 0u64;
    // Depth-first with an explicit stack, since a volume's tree may be arbitrarily
    // deep. A pending directory is its parent's handle and its name: the handles
    // kept open are those of the directories on the current path, not one per
    // directory found.
    let mut pending: Vec<(Option<Rc<OwnedFd>>, std::ffi::OsString)> = Vec::new();
    let mut cur: Option<Rc<OwnedFd>> = None;
    loop {
        let cur_fd = cur.as_ref().map_or(dir, |f| f.as_fd());
        for entry in sys::fs::read_dir(cur_fd)? {
            let st = match sys::fs::stat_at(cur_fd, &entry.name) {
                Ok(st) => st,
                // Removed while we were looking: it uses nothing now.
                Err(Errno::NOENT) => continue,
                Err(e) => return Err(e),
            };
            match st.st_mode & libc::S_IFMT {
                libc::S_IFDIR => pending.push((cur.clone(), entry.name)),
                libc::S_IFREG | libc::S_IFLNK
                    if st.st_nlink <= 1 || seen.insert((st.st_dev, st.st_ino)) =>
                {
                    total += st.st_size as u64;
                }
                _ => {}
            }
        }
        loop {
            let Some((parent, name)) = pending.pop() else {
                return Ok(total);
            };
            match sys::fs::open_dir(parent.as_ref().map_or(dir, |f| f.as_fd()), &name) {
                Ok(sub) => {
                    cur = Some(Rc::new(sub));
                    break;
                }
                Err(Errno::NOENT) => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// The size limit of one mounted volume and its shared ledger.
pub struct Quota {
    /// The limit last read from the ledger.
    limit: AtomicU64,
    root: Arc<OwnedFd>,
    ledger: Mutex<File>,
    /// Serialises the growing operations of this daemon on the volume, so that the
    /// size change observed around one is that operation's alone.
    serial: Arc<Mutex<()>>,
    /// When the last scan ended and how long it took.
    last_rescan: Mutex<Option<(Instant, Duration)>>,
}

impl Quota {
    /// Opens (creating) the ledger in `volume_dir` and fills it from a scan of `root`.
    pub fn open(volume_dir: &Path, root: Arc<OwnedFd>, limit: u64) -> Result<Quota, String> {
        let file = open_ledger(volume_dir)?;
        let quota = Quota {
            limit: AtomicU64::new(limit),
            root,
            ledger: Mutex::new(file),
            serial: Arc::new(Mutex::new(())),
            last_rescan: Mutex::new(None),
        };
        // The metadata's limit (read under the volume's lock) replaces whatever the
        // ledger said.
        let start = Instant::now();
        quota
            .update_ledger(Some(limit), |_, _| scan_usage(quota.root.as_fd()))
            .map_err(|e| format!("{}: counting bytes used: {e}", volume_dir.display()))?;
        *quota.last_rescan.lock() = Some((Instant::now(), start.elapsed()));
        Ok(quota)
    }

    /// The limit now in force (read from the ledger: `volume update` may change it).
    pub fn limit(&self) -> u64 {
        let _ = self.update(|used, _| Ok(used));
        self.limit.load(Ordering::Relaxed)
    }

    /// Holds off this daemon's other growing operations on the volume.
    pub fn serialize(&self) -> parking_lot::ArcMutexGuard<parking_lot::RawMutex, ()> {
        self.serial.lock_arc()
    }

    /// Runs `f` on the ledger's bytes used and limit with the ledger locked against
    /// every mount, and stores the bytes used it returns.
    fn update(&self, f: impl FnOnce(u64, u64) -> SysResult<u64>) -> SysResult<u64> {
        self.update_ledger(None, f)
    }

    /// `update`, first setting the ledger's limit to `set_limit` when given.
    fn update_ledger(
        &self,
        set_limit: Option<u64>,
        f: impl FnOnce(u64, u64) -> SysResult<u64>,
    ) -> SysResult<u64> {
        let mut file = self.ledger.lock();
        sys::lock::lock_exclusive(file.as_fd())?;
        let result = (|| {
            let (old, stored) = read_ledger(&mut file)?;
            let limit = set_limit
                .or(stored)
                .unwrap_or_else(|| self.limit.load(Ordering::Relaxed));
            self.limit.store(limit, Ordering::Relaxed);
            let new = f(old, limit)?;
            if new != old || stored != Some(limit) {
                write_ledger(&mut file, new, limit)?;
            }
            Ok(new)
        })();
        let _ = sys::lock::unlock(file.as_fd());
        result
    }

    /// Bytes used according to the ledger.
    pub fn used(&self) -> u64 {
        self.update(|used, _| Ok(used)).unwrap_or(0)
    }

    /// Reserves `grow` bytes, or fails with ENOSPC when that would pass the limit
    /// (after a recount, in case files were removed behind the ledger's back).
    pub fn reserve(&self, grow: u64) -> SysResult<()> {
        if grow == 0 {
            return Ok(());
        }
        let mut taken = false;
        self.update(
            |used, limit| match used.checked_add(grow).filter(|n| *n <= limit) {
                Some(n) => {
                    taken = true;
                    Ok(n)
                }
                None => Ok(used),
            },
        )?;
        if taken {
            return Ok(());
        }
        let due = self
            .last_rescan
            .lock()
            .is_none_or(|(at, took)| took < CHEAP_SCAN || at.elapsed() >= took * RESCAN_SPACING);
        if due {
            let start = Instant::now();
            self.update(|_, limit| {
                let used = scan_usage(self.root.as_fd())?;
                Ok(match used.checked_add(grow).filter(|n| *n <= limit) {
                    Some(n) => {
                        taken = true;
                        n
                    }
                    None => used,
                })
            })?;
            *self.last_rescan.lock() = Some((Instant::now(), start.elapsed()));
        }
        if taken { Ok(()) } else { Err(Errno::NOSPC) }
    }

    /// Counts bytes that appeared (or, negative, vanished) beyond what was reserved:
    /// the difference between a reservation and the change actually observed.
    pub fn adjust(&self, delta: i64) {
        if delta == 0 {
            return;
        }
        let _ = self.update(|used, _| Ok(used.saturating_add_signed(delta)));
    }
}

/// The outcome of [`resize`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resize {
    /// The new limit is in force; `used` bytes are in use.
    Done { used: u64 },
    /// Refused: `used` bytes are in use, more than the new limit.
    TooSmall { used: u64 },
}

/// Sets the size limit of the volume in `volume_dir` (data in `root`) to `limit`, for
/// the mounts using it now (`live`) as well as later ones, unless more than that is
/// in use. `commit` (which records the limit in the metadata) runs with the ledger
/// locked, so no mount grows the volume between the check and the change. The caller
/// holds the volume's lock.
pub fn resize(
    volume_dir: &Path,
    root: BorrowedFd<'_>,
    limit: u64,
    live: bool,
    commit: impl FnOnce() -> Result<(), String>,
) -> Result<Resize, String> {
    let path = volume_dir.join(LEDGER);
    let mut file = open_ledger(volume_dir)?;
    let fail = |e: Errno| format!("{}: {e}", path.display());
    sys::lock::lock_exclusive(file.as_fd()).map_err(fail)?;
    let result = (|| {
        let scanned = scan_usage(root).map_err(fail)?;
        // With mounts running, the ledger also holds their reservations for writes in
        // progress, which the scan cannot see yet.
        let used = if live {
            scanned.max(read_ledger(&mut file).map_err(fail)?.0)
        } else {
            scanned
        };
        if used > limit {
            return Ok(Resize::TooSmall { used });
        }
        commit()?;
        let ledger_used = if live {
            read_ledger(&mut file).map_err(fail)?.0
        } else {
            scanned
        };
        write_ledger(&mut file, ledger_used, limit).map_err(fail)?;
        Ok(Resize::Done { used })
    })();
    let _ = sys::lock::unlock(file.as_fd());
    result
}

fn open_ledger(volume_dir: &Path) -> Result<File, String> {
    let path = volume_dir.join(LEDGER);
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// Bytes used and, when recorded, the limit.
fn read_ledger(file: &mut File) -> SysResult<(u64, Option<u64>)> {
    let mut text = String::new();
    file.seek(SeekFrom::Start(0))
        .map_err(|e| sys::errno_of(&e))?;
    file.read_to_string(&mut text)
        .map_err(|e| sys::errno_of(&e))?;
    let mut lines = text.lines();
    // An unreadable ledger (new, or damaged by hand) counts as empty until a rescan.
    let used = lines
        .next()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or(0);
    let limit = lines.next().and_then(|l| l.trim().parse().ok());
    Ok((used, limit))
}

fn write_ledger(file: &mut File, used: u64, limit: u64) -> SysResult<()> {
    // Fixed width, so a reader (which holds the lock) sees whole lines, and set_len
    // drops what an older, shorter format left behind.
    let text = format!("{used:>20}\n{limit:>20}\n");
    file.seek(SeekFrom::Start(0))
        .map_err(|e| sys::errno_of(&e))?;
    file.write_all(text.as_bytes())
        .map_err(|e| sys::errno_of(&e))?;
    file.set_len(text.len() as u64)
        .map_err(|e| sys::errno_of(&e))
}
