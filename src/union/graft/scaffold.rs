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
        let layer = Layer::open(dir.path(), false).map_err(|e| fail(&e))?;
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
fn sweep_stale(tmp: &Path) {
    let Ok(entries) = fs::read_dir(tmp) else {
        return;
    };
    for entry in entries.flatten() {
        if !entry
            .file_name()
            .as_encoded_bytes()
            .starts_with(PREFIX.as_bytes())
        {
            continue;
        }
        let path = entry.path();
        let young = entry
            .metadata()
            .ok()
            .and_then(|m| m.modified().ok())
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .is_none_or(|age| age < SETUP_GRACE);
        if young || !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let Ok(dir) = File::open(&path) else {
            continue;
        };
        if sys::lock::try_lock_exclusive(&dir) == Ok(true) {
            remove_empty_tree(&path);
        }
    }
}

/// Removes `path` if it is a tree of empty directories; leaves anything else alone.
fn remove_empty_tree(path: &Path) {
    if let Ok(entries) = fs::read_dir(path) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_empty_tree(&entry.path());
            }
        }
    }
    let _ = fs::remove_dir(path);
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
}
