//! The scaffold: a private directory holding just the graft targets as empty
//! directories, used as the bottom-most lower layer so that every graft point and
//! the directories leading to it exist in the merged view, with no upper layer
//! needed and nothing written to one.
//!
//! It lives in the temporary directory for as long as the daemon runs, locked
//! (flock) by it. A daemon killed with -9 cannot remove its scaffold; the next one
//! removes every scaffold whose lock is free and that is not brand new (one being
//! set up is not locked yet), and only ever removes empty directories.

use std::fs::{self, File};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;
use std::time::{Duration, SystemTime};

use crate::config::MountConfig;
use crate::layer::Layer;
use crate::sys;

const PREFIX: &str = "stratafs-grafts-";

/// A scaffold older than this with a free lock belongs to a dead daemon.
const SETUP_GRACE: Duration = Duration::from_secs(60);

/// The scaffold directory; removed when dropped, locked while it lives.
pub(crate) struct Scaffold {
    _dir: tempfile::TempDir,
    _lock: File,
}

impl Scaffold {
    /// Builds the scaffold for the grafts of `config`; returns it as a layer.
    pub fn build(config: &MountConfig) -> Result<(Layer, Scaffold), String> {
        let fail = |e: &dyn std::fmt::Display| format!("graft scaffold: {e}");
        sweep_stale(&std::env::temp_dir());
        let dir = tempfile::Builder::new()
            .prefix(PREFIX)
            .tempdir()
            .map_err(|e| fail(&e))?;
        let lock = File::open(dir.path()).map_err(|e| fail(&e))?;
        sys::lock::lock_exclusive(&lock).map_err(|e| fail(&e))?;
        for spec in &config.grafts {
            let rel = spec.target.strip_prefix("/").unwrap_or(&spec.target);
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(dir.path().join(rel))
                .map_err(|e| format!("graft scaffold for {}: {e}", spec.target.display()))?;
        }
        let layer = Layer::open(dir.path()).map_err(|e| fail(&e))?;
        Ok((
            layer,
            Scaffold {
                _dir: dir,
                _lock: lock,
            },
        ))
    }
}

/// Removes the scaffolds of dead daemons from `tmp` (best effort).
///
/// `tmp` is usually world-writable, so whatever is in it may be planted or change
/// while it is swept: only directories this uid owns are considered (another user
/// cannot write inside those, nor, in a sticky directory, rename them), and every
/// step is fd-relative without following symlinks (see `remove_empty_tree`).
fn sweep_stale(tmp: &Path) {
    let Ok(tmp_fd) = sys::fs::open_root(tmp) else {
        return;
    };
    let Ok(entries) = sys::fs::read_dir(tmp_fd.as_fd()) else {
        return;
    };
    let (uid, _) = sys::process::ids();
    for entry in entries {
        if !entry.name.as_bytes().starts_with(PREFIX.as_bytes()) {
            continue;
        }
        // O_NOFOLLOW: a symlink named like a scaffold is not one.
        let Ok(dir) = sys::fs::open_dir(tmp_fd.as_fd(), &entry.name) else {
            continue;
        };
        let Ok(st) = sys::fs::fstat(dir.as_fd()) else {
            continue;
        };
        let modified = SystemTime::UNIX_EPOCH
            + Duration::new(st.st_mtime.max(0) as u64, st.st_mtime_nsec as u32);
        let young = SystemTime::now()
            .duration_since(modified)
            .ok()
            .is_none_or(|age| age < SETUP_GRACE);
        if st.st_uid != uid || young {
            continue;
        }
        let Ok(lock) = sys::fs::open_dir_for_listing(dir.as_fd()) else {
            continue;
        };
        if sys::lock::try_lock_exclusive(&lock) == Ok(true) {
            remove_empty_tree(dir.as_fd(), 0);
            let _ = sys::fs::rmdir_at(tmp_fd.as_fd(), &entry.name);
        }
    }
}

/// Scaffolds are as deep as graft targets; nothing deeper is one.
const MAX_DEPTH: usize = 64;

/// Removes every empty directory under `dir` (an O_PATH handle), depth first; leaves
/// anything else alone. Each directory is opened relative to its parent with
/// O_NOFOLLOW and removed by name relative to it, so a directory swapped for a
/// symlink meanwhile is neither entered nor followed (rmdir of a symlink fails).
fn remove_empty_tree(dir: BorrowedFd<'_>, depth: usize) {
    if depth >= MAX_DEPTH {
        return;
    }
    let Ok(entries) = sys::fs::read_dir(dir) else {
        return;
    };
    for entry in entries {
        if let Ok(sub) = sys::fs::open_dir(dir, &entry.name) {
            remove_empty_tree(sub.as_fd(), depth + 1);
            let _ = sys::fs::rmdir_at(dir, &entry.name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    fn old_scaffold(tmp: &Path, tag: &str) -> std::path::PathBuf {
        let d = tmp.join(format!("{PREFIX}{tag}"));
        fs::create_dir_all(d.join("a/b")).expect("mkdir");
        File::open(&d)
            .and_then(|f| f.set_modified(UNIX_EPOCH))
            .expect("set mtime");
        d
    }

    #[test]
    fn sweeps_dead_scaffolds_only() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dead = old_scaffold(tmp.path(), "dead");
        let live = old_scaffold(tmp.path(), "live");
        let holder = File::open(&live).expect("open");
        sys::lock::lock_exclusive(&holder).expect("lock");
        let full = old_scaffold(tmp.path(), "full");
        fs::write(full.join("a/keep"), "x").expect("write");
        let young = tmp.path().join(format!("{PREFIX}young"));
        fs::create_dir(&young).expect("mkdir");
        let stranger = tmp.path().join("other");
        fs::create_dir(&stranger).expect("mkdir");
        File::open(&stranger)
            .and_then(|f| f.set_modified(UNIX_EPOCH))
            .expect("set mtime");

        sweep_stale(tmp.path());
        assert!(!dead.exists(), "a dead daemon's scaffold stayed");
        assert!(live.join("a/b").is_dir(), "a live scaffold was touched");
        assert!(
            full.join("a/keep").is_file(),
            "a non-empty tree was touched"
        );
        assert!(young.is_dir(), "a scaffold being set up was removed");
        assert!(stranger.is_dir(), "a foreign directory was removed");
    }

    #[test]
    fn never_follows_a_symlink_out_of_a_scaffold() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let outside = tempfile::tempdir().expect("tempdir");
        fs::create_dir_all(outside.path().join("x/empty")).expect("mkdir");
        let dead = old_scaffold(tmp.path(), "dead");
        std::os::unix::fs::symlink(outside.path().join("x"), dead.join("a/link")).expect("symlink");
        let named = tmp.path().join(format!("{PREFIX}named"));
        std::os::unix::fs::symlink(outside.path().join("x"), &named).expect("symlink");

        sweep_stale(tmp.path());
        assert!(
            outside.path().join("x/empty").is_dir(),
            "an empty directory outside the scaffold was removed"
        );
        assert!(dead.join("a/link").is_symlink(), "the symlink itself went");
    }

    #[test]
    fn leaves_the_scaffolds_of_other_users_alone() {
        if !sys::process::is_root() {
            return;
        }
        let tmp = tempfile::tempdir().expect("tempdir");
        let foreign = old_scaffold(tmp.path(), "foreign");
        std::os::unix::fs::chown(&foreign, Some(65534), Some(65534)).expect("chown");
        File::open(&foreign)
            .and_then(|f| f.set_modified(UNIX_EPOCH))
            .expect("set mtime");
        sweep_stale(tmp.path());
        assert!(
            foreign.join("a/b").is_dir(),
            "another user's tree was swept"
        );
    }
}
