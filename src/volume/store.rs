//! The volume store: `STATE/volumes/NAME/` holds `_data` (the volume's content),
//! `meta.json` (name, creation time, size limit, labels, access mode), `lock` (flock:
//! serialises create-time population, claims and removal of this volume), and the
//! claim and quota files of `claims` and `quota`.
//!
//! Invariants:
//! - A volume directory is complete or absent: it is built under a hidden temporary
//!   name and renamed into place with RENAME_NOREPLACE, the commit point, so two
//!   racing creates leave exactly one volume and a reader never sees a half-made one.
//!   Valid names never start with '.', so temporaries never collide with volumes.
//! - `meta.json` is replaced only by rename, never rewritten in place.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::VolumeError;
use super::claims::{self, MountUse};
use super::quota;
use crate::sys::{self, Errno, fs::RenameKind};

const VOLUMES: &str = "volumes";
const DATA: &str = "_data";
const META: &str = "meta.json";
const LOCK: &str = "lock";

/// Longest accepted volume name (one file name component).
pub const MAX_NAME_LEN: usize = 255;

/// Checks a volume name against docker's rule `[A-Za-z0-9][A-Za-z0-9_.-]*`.
pub fn check_name(name: &str) -> Result<(), VolumeError> {
    let bad = |reason| VolumeError::InvalidName {
        name: name.to_string(),
        reason,
    };
    let b = name.as_bytes();
    if b.is_empty() {
        return Err(bad("empty name"));
    }
    if b.len() > MAX_NAME_LEN {
        return Err(bad("longer than 255 bytes"));
    }
    if !b[0].is_ascii_alphanumeric() {
        return Err(bad("must start with a letter or digit"));
    }
    if b.contains(&b'/') {
        return Err(bad("must not contain '/'"));
    }
    if !crate::options::valid_volume_name(name) {
        return Err(bad("only letters, digits, '_', '.' and '-' are allowed"));
    }
    Ok(())
}

/// How many mounts may use a volume at once, and how (Kubernetes' access modes).
/// Enforced by `claims` when a mount takes the volume.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    /// ReadWriteOnce: one read-write mount at a time, plus any read-only ones.
    Rwo,
    /// ReadWriteOncePod: one mount at a time, read-only or not.
    Rwop,
    /// ReadOnlyMany: any number of mounts, all read-only.
    Rox,
    /// ReadWriteMany: any number of mounts of any kind.
    #[default]
    Rwx,
}

impl Access {
    pub const ALL: [Access; 4] = [Access::Rwo, Access::Rwop, Access::Rox, Access::Rwx];

    /// The short name (`rwo`, ...), as `--access` takes it and metadata stores it.
    pub fn as_str(self) -> &'static str {
        match self {
            Access::Rwo => "rwo",
            Access::Rwop => "rwop",
            Access::Rox => "rox",
            Access::Rwx => "rwx",
        }
    }

    /// Kubernetes' name of the mode.
    pub fn kubernetes_name(self) -> &'static str {
        match self {
            Access::Rwo => "ReadWriteOnce",
            Access::Rwop => "ReadWriteOncePod",
            Access::Rox => "ReadOnlyMany",
            Access::Rwx => "ReadWriteMany",
        }
    }

    /// What the mode allows, for messages.
    pub fn rule(self) -> &'static str {
        match self {
            Access::Rwo => "one read-write mount at a time, plus read-only ones",
            Access::Rwop => "one mount of any kind at a time",
            Access::Rox => "read-only mounts only",
            Access::Rwx => "any mounts",
        }
    }

    /// The short or the Kubernetes name, in any case.
    pub fn parse(text: &str) -> Result<Access, String> {
        Access::ALL
            .into_iter()
            .find(|a| {
                text.eq_ignore_ascii_case(a.as_str())
                    || text.eq_ignore_ascii_case(a.kubernetes_name())
            })
            .ok_or_else(|| {
                format!(
                    "access mode {text:?}: expected rwo (ReadWriteOnce), rwop \
                     (ReadWriteOncePod), rox (ReadOnlyMany) or rwx (ReadWriteMany)"
                )
            })
    }
}

impl std::fmt::Display for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What `volume create` records.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CreateSpec {
    pub size_limit: Option<u64>,
    pub labels: BTreeMap<String, String>,
    pub access: Access,
    /// Named by `volume create` itself (no name given): `volume prune` takes such
    /// volumes without `--all`, as docker's prune does anonymous ones.
    pub anonymous: bool,
}

/// The metadata file of a volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    pub name: String,
    /// RFC 3339, UTC.
    pub created: String,
    #[serde(default)]
    pub size_limit: Option<u64>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Absent in metadata written before access modes existed: then `exclusive`
    /// says rwo (true) or rwx. Read through [`Meta::access`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access: Option<Access>,
    /// Still written (true for rwo and rwop) for older readers.
    #[serde(default)]
    pub exclusive: bool,
    #[serde(default)]
    pub anonymous: bool,
}

impl Meta {
    pub fn access(&self) -> Access {
        match (self.access, self.exclusive) {
            (Some(a), _) => a,
            (None, true) => Access::Rwo,
            (None, false) => Access::Rwx,
        }
    }
}

/// What `volume inspect` shows.
#[derive(Debug, Clone, Serialize)]
pub struct VolumeInfo {
    pub name: String,
    /// Host path of the volume's data.
    pub data: PathBuf,
    pub created: String,
    pub size_limit: Option<u64>,
    pub bytes_used: u64,
    pub labels: BTreeMap<String, String>,
    pub access: Access,
    /// Access rwo or rwop (kept for readers of the older JSON).
    pub exclusive: bool,
    pub anonymous: bool,
    /// Mounts using the volume now.
    pub mounts: Vec<MountUse>,
}

#[derive(Debug, Clone)]
pub struct Volume {
    pub name: String,
    /// `STATE/volumes/NAME`.
    pub dir: PathBuf,
    pub meta: Meta,
}

impl Volume {
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join(DATA)
    }

    /// Holds the volume's lock until the returned file is dropped.
    pub fn lock(&self) -> Result<File, VolumeError> {
        let path = self.dir.join(LOCK);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .open(&path)
            .map_err(|e| io_err(&path, e))?;
        sys::lock::lock_exclusive(&file).map_err(|e| errno_err(&path, e))?;
        Ok(file)
    }

    /// Bytes used by the data, counted afresh (see `quota` for what counts).
    pub fn bytes_used(&self) -> Result<u64, VolumeError> {
        let data = self.data_dir();
        let root = sys::fs::open_root(&data).map_err(|e| errno_err(&data, e))?;
        quota::scan_usage(root.as_fd()).map_err(|e| errno_err(&data, e))
    }

    pub fn users(&self) -> Vec<MountUse> {
        claims::users(&self.dir)
    }

    pub fn info(&self) -> Result<VolumeInfo, VolumeError> {
        Ok(VolumeInfo {
            name: self.name.clone(),
            data: self.data_dir(),
            created: self.meta.created.clone(),
            size_limit: self.meta.size_limit,
            bytes_used: self.bytes_used()?,
            labels: self.meta.labels.clone(),
            access: self.meta.access(),
            exclusive: matches!(self.meta.access(), Access::Rwo | Access::Rwop),
            anonymous: self.meta.anonymous,
            mounts: self.users(),
        })
    }
}

#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

fn io_err(path: &Path, err: std::io::Error) -> VolumeError {
    VolumeError::Io {
        path: path.to_path_buf(),
        err,
    }
}

fn errno_err(path: &Path, e: Errno) -> VolumeError {
    io_err(path, std::io::Error::from(e))
}

static NEXT_TEMP: AtomicU64 = AtomicU64::new(0);

/// A hidden name unique to this process and call.
fn temp_name(prefix: &str) -> String {
    format!(
        ".{prefix}-{}-{}",
        std::process::id(),
        NEXT_TEMP.fetch_add(1, Ordering::Relaxed)
    )
}

impl Store {
    /// The built-in state directory: /var/lib/stratafs for root, else
    /// $XDG_DATA_HOME/stratafs, else ~/.local/share/stratafs.
    pub fn default_dir() -> Result<PathBuf, VolumeError> {
        if sys::process::is_root() {
            return Ok(PathBuf::from("/var/lib/stratafs"));
        }
        let absolute = |v: std::ffi::OsString| {
            let p = PathBuf::from(v);
            p.is_absolute().then_some(p)
        };
        if let Some(xdg) = std::env::var_os("XDG_DATA_HOME").and_then(absolute) {
            return Ok(xdg.join("stratafs"));
        }
        match std::env::var_os("HOME").and_then(absolute) {
            Some(home) => Ok(home.join(".local/share/stratafs")),
            None => Err(VolumeError::NoStateDir(
                "neither XDG_DATA_HOME nor HOME is set; use --state-dir".into(),
            )),
        }
    }

    /// The store in `dir` (`--state-dir`), else in $STRATAFS_STATE_DIR, else in the
    /// built-in directory. Nothing is created until a volume is.
    pub fn open(dir: Option<&Path>) -> Result<Store, VolumeError> {
        let root = match dir {
            Some(d) => d.to_path_buf(),
            None => match std::env::var_os("STRATAFS_STATE_DIR").filter(|v| !v.is_empty()) {
                Some(d) => PathBuf::from(d),
                None => Self::default_dir()?,
            },
        };
        if root.as_os_str().is_empty() {
            return Err(VolumeError::NoStateDir("empty --state-dir".into()));
        }
        let root = if root.is_absolute() {
            root
        } else {
            std::env::current_dir()
                .map_err(|e| io_err(&root, e))?
                .join(root)
        };
        Ok(Store { root })
    }

    fn volumes_dir(&self) -> PathBuf {
        self.root.join(VOLUMES)
    }

    /// Creates a new volume; `AlreadyExists` when the name is taken (also when
    /// another process won a race to create it).
    pub fn create(&self, name: &str, spec: &CreateSpec) -> Result<Volume, VolumeError> {
        check_name(name)?;
        let vols = self.volumes_dir();
        fs::create_dir_all(&vols).map_err(|e| io_err(&vols, e))?;
        let staged_name = temp_name("new");
        let staged = vols.join(&staged_name);
        let meta = Meta {
            name: name.to_string(),
            created: rfc3339(SystemTime::now()),
            size_limit: spec.size_limit,
            labels: spec.labels.clone(),
            access: Some(spec.access),
            exclusive: matches!(spec.access, Access::Rwo | Access::Rwop),
            anonymous: spec.anonymous,
        };
        let build = || -> Result<(), VolumeError> {
            // Explicit modes: the daemon runs with umask 0.
            let mut dirs = fs::DirBuilder::new();
            dirs.mode(0o755);
            dirs.create(&staged).map_err(|e| io_err(&staged, e))?;
            let data = staged.join(DATA);
            dirs.create(&data).map_err(|e| io_err(&data, e))?;
            write_meta(&staged, &meta)?;
            let vfd = sys::fs::open_root(&vols).map_err(|e| errno_err(&vols, e))?;
            sys::fs::rename_at(
                vfd.as_fd(),
                staged_name.as_ref(),
                vfd.as_fd(),
                name.as_ref(),
                RenameKind::NoReplace,
            )
            .map_err(|e| match e {
                Errno::EXIST | Errno::NOTEMPTY => VolumeError::AlreadyExists(name.to_string()),
                e => errno_err(&vols.join(name), e),
            })
        };
        if let Err(e) = build() {
            let _ = fs::remove_dir_all(&staged);
            return Err(e);
        }
        self.get(name)
    }

    pub fn get(&self, name: &str) -> Result<Volume, VolumeError> {
        check_name(name)?;
        let dir = self.volumes_dir().join(name);
        let path = dir.join(META);
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(VolumeError::NotFound(name.to_string()));
            }
            Err(e) => return Err(io_err(&path, e)),
        };
        let meta: Meta = serde_json::from_str(&text)
            .map_err(|e| VolumeError::Invalid(format!("{}: {e}", path.display())))?;
        Ok(Volume {
            name: name.to_string(),
            dir,
            meta,
        })
    }

    /// The volume, created with default settings when it does not exist; true when
    /// this call created it.
    pub fn get_or_create(&self, name: &str) -> Result<(Volume, bool), VolumeError> {
        match self.get(name) {
            Err(VolumeError::NotFound(_)) => match self.create(name, &CreateSpec::default()) {
                Err(VolumeError::AlreadyExists(_)) => Ok((self.get(name)?, false)),
                other => Ok((other?, true)),
            },
            other => Ok((other?, false)),
        }
    }

    /// The volume, with its lock held; when it is missing, created (as a mount naming
    /// it does) if `create`, else `NoCreate`. A volume removed between the lookup and
    /// the lock is looked up again, so the lock returned is always the one of the
    /// volume now under that name. The flag says whether this call created it.
    pub fn lock_volume(
        &self,
        name: &str,
        create: bool,
    ) -> Result<(Volume, File, bool), VolumeError> {
        self.locked(name, create).map_err(|e| match e {
            VolumeError::NotFound(n) if !create => VolumeError::NoCreate(n),
            e => e,
        })
    }

    /// `lock_volume`, answering `NotFound` for a missing volume when not `create`.
    fn locked(&self, name: &str, create: bool) -> Result<(Volume, File, bool), VolumeError> {
        loop {
            let (vol, created) = if create {
                self.get_or_create(name)?
            } else {
                (self.get(name)?, false)
            };
            let lock = vol.lock()?;
            let path = vol.dir.join(LOCK);
            let held = lock.metadata().map_err(|e| io_err(&path, e))?;
            match fs::metadata(&path) {
                Ok(now) if (now.dev(), now.ino()) == (held.dev(), held.ino()) => {
                    return Ok((vol, lock, created));
                }
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&path, e)),
            }
        }
    }

    /// Sets the size limit of a volume, also for the mounts using it now; refused
    /// when more than `limit` is in use, or when read-write mounts run without a limit
    /// (they count nothing, so could not enforce one). Returns the old limit and the
    /// bytes in use.
    pub fn resize(&self, name: &str, limit: u64) -> Result<(Option<u64>, u64), VolumeError> {
        let (vol, _lock, _) = self.locked(name, false)?;
        let users = vol.users();
        let old = vol.meta.size_limit;
        let writers: Vec<String> = users
            .iter()
            .filter(|u| !u.read_only)
            .map(|u| u.describe())
            .collect();
        if old.is_none() && !writers.is_empty() {
            return Err(VolumeError::Invalid(format!(
                "volume {name} has no size limit and is mounted read-write by {}, which \
                 would not enforce a new one; unmount those first",
                writers.join(", ")
            )));
        }
        let data = vol.data_dir();
        let root = sys::fs::open_root(&data).map_err(|e| errno_err(&data, e))?;
        let mut meta = vol.meta.clone();
        meta.size_limit = Some(limit);
        let mut commit_err = None;
        let outcome = quota::resize(&vol.dir, root.as_fd(), limit, !users.is_empty(), || {
            write_meta(&vol.dir, &meta).map_err(|e| {
                let text = e.to_string();
                commit_err = Some(e);
                text
            })
        });
        if let Some(e) = commit_err {
            return Err(e);
        }
        match outcome.map_err(VolumeError::Invalid)? {
            quota::Resize::Done { used } => Ok((old, used)),
            quota::Resize::TooSmall { used } => Err(VolumeError::TooSmall {
                name: name.to_string(),
                limit,
                used,
            }),
        }
    }

    /// Every volume, by name.
    pub fn list(&self) -> Result<Vec<Volume>, VolumeError> {
        let vols = self.volumes_dir();
        let entries = match fs::read_dir(&vols) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err(&vols, e)),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| io_err(&vols, e))?;
            let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                continue;
            };
            if check_name(&name).is_err() {
                continue; // temporaries and strangers
            }
            match self.get(&name) {
                Ok(v) => out.push(v),
                Err(VolumeError::NotFound(_)) => {} // removed meanwhile
                Err(e) => return Err(e),
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Removes a volume and its data; refused while mounts use it unless `force`.
    /// Returns the bytes its data used.
    pub fn remove(&self, name: &str, force: bool) -> Result<u64, VolumeError> {
        let vol = self.get(name)?;
        let _lock = vol.lock()?;
        let users = vol.users();
        if !users.is_empty() && !force {
            return Err(VolumeError::InUse {
                name: name.to_string(),
                users: users
                    .iter()
                    .map(|u| u.describe())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        let freed = vol.bytes_used().unwrap_or(0);
        // Renamed out of the namespace first, so the name is gone at once even when
        // deleting a large tree takes a while (or fails half-way).
        let vols = self.volumes_dir();
        let doomed = vols.join(temp_name("rm"));
        fs::rename(&vol.dir, &doomed).map_err(|e| io_err(&vol.dir, e))?;
        fs::remove_dir_all(&doomed).map_err(|e| io_err(&doomed, e))?;
        Ok(freed)
    }

    /// Removes every volume no mount uses among those `selected` answers true for;
    /// returns (name, bytes freed) per volume.
    pub fn prune(
        &self,
        selected: &dyn Fn(&Volume) -> bool,
    ) -> Result<Vec<(String, u64)>, VolumeError> {
        let mut out = Vec::new();
        for vol in self.list()? {
            if !selected(&vol) || !vol.users().is_empty() {
                continue;
            }
            match self.remove(&vol.name, false) {
                Ok(freed) => out.push((vol.name, freed)),
                // Someone started using it (or removed it) since we looked.
                Err(VolumeError::InUse { .. }) | Err(VolumeError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }
}

/// Writes `meta.json` in `dir` atomically (temporary file, fsync, rename).
fn write_meta(dir: &Path, meta: &Meta) -> Result<(), VolumeError> {
    let text = serde_json::to_string_pretty(meta)
        .map_err(|e| VolumeError::Invalid(format!("metadata of {}: {e}", meta.name)))?;
    let temp = dir.join(temp_name("meta"));
    let path = dir.join(META);
    let write = || -> std::io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&temp)?;
        f.write_all(text.as_bytes())?;
        f.write_all(b"\n")?;
        f.sync_all()?;
        fs::rename(&temp, &path)
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&temp);
        io_err(&path, e)
    })
}

/// `t` as an RFC 3339 UTC timestamp with second precision.
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_dates() {
        let at = |s: u64| rfc3339(UNIX_EPOCH + std::time::Duration::from_secs(s));
        assert_eq!(at(0), "1970-01-01T00:00:00Z");
        assert_eq!(at(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(at(1_700_000_000), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn names() {
        for ok in ["a", "A.b-c_9", "0", &"x".repeat(255)] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "..",
            ".",
            "/",
            "a/b",
            "-a",
            "_a",
            ".a",
            "a b",
            "é",
            &"x".repeat(256),
        ] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn create_race_leaves_one() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = Store::open(Some(tmp.path())).expect("store");
        let wins: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| s.spawn(|| store.create("raced", &CreateSpec::default()).is_ok()))
                .collect();
            handles
                .into_iter()
                .map(|h| usize::from(h.join().expect("thread")))
                .sum()
        });
        assert_eq!(wins, 1);
        let names: Vec<String> = store
            .list()
            .expect("list")
            .into_iter()
            .map(|v| v.name)
            .collect();
        assert_eq!(names, ["raced"]);
        let left: Vec<_> = fs::read_dir(tmp.path().join(VOLUMES))
            .expect("readdir")
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(left, ["raced"], "no temporaries left behind");
    }
}
