//! Which mounts use a volume now, and the claims of its access mode.
//!
//! Every mount that grafts a volume keeps `mounts/PID` in the volume's directory
//! open with an exclusive flock for as long as it runs; the file says which mount it
//! is. A lock ends with its holder (unmount, crash or kill -9), so a file whose lock
//! can be taken by someone else belongs to a dead mount and is swept away by whoever
//! notices. A mount that the access mode limits to one at a time (read-write mounts
//! of an rwo volume, every mount of an rwop one) additionally has the `exclusive`
//! file locked: a second such mount finds the lock taken and fails before mounting,
//! naming the holder recorded in that file. A read-write mount of an rox volume is
//! refused outright.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::VolumeError;
use super::store::{Access, Store};
use crate::sys;

const MOUNTS_DIR: &str = "mounts";
const EXCLUSIVE_FILE: &str = "exclusive";

/// One live use of a volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountUse {
    pub pid: u32,
    pub mountpoint: PathBuf,
    /// Where in the merged view the volume is grafted.
    pub target: PathBuf,
    pub read_only: bool,
}

impl MountUse {
    pub fn describe(&self) -> String {
        format!(
            "pid {} at {} ({}{})",
            self.pid,
            self.mountpoint.display(),
            self.target.display(),
            if self.read_only { ", read-only" } else { "" }
        )
    }
}

/// A mount's hold on a volume; dropping it (or the process dying) ends the claim.
pub struct Claim {
    volume: String,
    record: PathBuf,
    _record_lock: File,
    _exclusive_lock: Option<File>,
    /// `:delete` on a volume this mount created: removed when the claim ends.
    reclaim: Option<Store>,
}

impl Claim {
    /// Makes the end of this claim remove the volume from `store` (the `:delete`
    /// reclaim policy), unless other mounts use it by then. Only for a volume the
    /// mount created itself.
    pub fn remove_volume_on_drop(&mut self, store: Store) {
        self.reclaim = Some(store);
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        // Remove before the lock goes with the file: a reader never sees a record of
        // ours that is unlocked while we live.
        let _ = fs::remove_file(&self.record);
        // Our record is gone, so `remove` counts only the other users; it takes the
        // volume's lock, so a mount taking the volume meanwhile either finds it gone
        // (and creates a new one) or is seen as a user and keeps it.
        if let Some(store) = self.reclaim.take() {
            match store.remove(&self.volume, false) {
                Ok(_) => log::info!("volume {} removed (:delete)", self.volume),
                Err(VolumeError::InUse { users, .. }) => log::warn!(
                    "volume {} kept despite :delete: still in use by {users}",
                    self.volume
                ),
                Err(VolumeError::NotFound(_)) => {}
                Err(e) => log::warn!("volume {} (:delete) not removed: {e}", self.volume),
            }
        }
    }
}

fn io_err(path: &Path, e: std::io::Error) -> VolumeError {
    VolumeError::Io {
        path: path.to_path_buf(),
        err: e,
    }
}

fn open_rw(path: &Path) -> Result<File, VolumeError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .open(path)
        .map_err(|e| io_err(path, e))
}

fn write_record(file: &mut File, path: &Path, who: &MountUse) -> Result<(), VolumeError> {
    let text = serde_json::to_string(who).map_err(|e| VolumeError::Invalid(e.to_string()))?;
    file.set_len(0).map_err(|e| io_err(path, e))?;
    file.write_all(text.as_bytes()).map_err(|e| io_err(path, e))
}

fn read_record(path: &Path) -> Option<MountUse> {
    let mut text = String::new();
    File::open(path).ok()?.read_to_string(&mut text).ok()?;
    serde_json::from_str(&text).ok()
}

/// Records `who` as a user of the volume in `volume_dir`, after checking it against
/// the volume's `access` mode: a read-write use of an rox volume is refused, and a use
/// that the mode allows once at a time takes the volume's exclusive claim, failing
/// when another live mount has it.
pub fn claim(
    volume: &str,
    volume_dir: &Path,
    who: &MountUse,
    access: Access,
) -> Result<Claim, VolumeError> {
    let once = match access {
        Access::Rwo => !who.read_only,
        Access::Rwop => true,
        Access::Rox if !who.read_only => {
            return Err(VolumeError::ReadOnlyMany {
                name: volume.to_string(),
            });
        }
        Access::Rox | Access::Rwx => false,
    };
    let exclusive_lock = if once {
        let path = volume_dir.join(EXCLUSIVE_FILE);
        let mut file = open_rw(&path)?;
        let got = sys::lock::try_lock_exclusive(&file)
            .map_err(|e| io_err(&path, std::io::Error::from(e)))?;
        if !got {
            let holder = read_record(&path)
                .map(|h| h.describe())
                .unwrap_or_else(|| "another mount".to_string());
            return Err(VolumeError::ExclusiveHeld {
                name: volume.to_string(),
                access,
                holder,
            });
        }
        write_record(&mut file, &path, who)?;
        Some(file)
    } else {
        None
    };
    let dir = volume_dir.join(MOUNTS_DIR);
    match fs::create_dir(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io_err(&dir, e)),
    }
    // Built under a temporary name and renamed into place already locked, so that a
    // reader never finds a record of a live mount without its lock.
    let record = dir.join(who.pid.to_string());
    let staged = dir.join(format!(".{}.new", who.pid));
    let mut file = open_rw(&staged)?;
    sys::lock::lock_exclusive(&file).map_err(|e| io_err(&staged, std::io::Error::from(e)))?;
    write_record(&mut file, &staged, who)?;
    fs::rename(&staged, &record).map_err(|e| io_err(&record, e))?;
    Ok(Claim {
        volume: volume.to_string(),
        record,
        _record_lock: file,
        _exclusive_lock: exclusive_lock,
        reclaim: None,
    })
}

/// The daemons of the mount at `mountpoint` that hold volumes of `store` (none when
/// it uses no volume of it, or the store cannot be read).
pub fn daemons_at(store: &Store, mountpoint: &Path) -> Vec<u32> {
    let Ok(at) = fs::canonicalize(mountpoint) else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = store
        .list()
        .unwrap_or_default()
        .iter()
        .flat_map(|v| v.users())
        .filter(|u| fs::canonicalize(&u.mountpoint).is_ok_and(|p| p == at))
        .map(|u| u.pid)
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// Waits, at most `limit`, until the processes `pids` have ended: a daemon ends its
/// claims (and removes its `:delete` volumes) on its way out, after the kernel
/// already let `umount` return. Whether they all ended.
pub fn wait_for_exit(pids: &[u32], limit: std::time::Duration) -> bool {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let alive = pids.iter().any(|pid| is_running(*pid));
        if !alive {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Whether process `pid` exists and has not exited (a zombie has: a daemon started
/// in the foreground stays one until its parent reaps it).
fn is_running(pid: u32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // `pid (comm) S ...`: comm may hold spaces and parentheses, the state follows the last `)`.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next())
        .is_some_and(|state| !matches!(state, 'Z' | 'X'))
}

/// The live mounts using the volume in `volume_dir`. Records of dead mounts are
/// removed on the way.
pub fn users(volume_dir: &Path) -> Vec<MountUse> {
    let dir = volume_dir.join(MOUNTS_DIR);
    let Ok(entries) = fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if entry.file_name().as_encoded_bytes().starts_with(b".") {
            continue;
        }
        let Ok(file) = File::open(&path) else {
            continue;
        };
        match sys::lock::try_lock_shared(&file) {
            // Nobody holds it: the mount that wrote it is gone.
            Ok(true) => {
                let _ = fs::remove_file(&path);
            }
            Ok(false) => {
                if let Some(u) = read_record(&path) {
                    out.push(u);
                }
            }
            Err(_) => {}
        }
    }
    out.sort_by_key(|u| u.pid);
    out
}
