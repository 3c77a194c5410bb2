//! Runs one scenario and one operation sequence against the model and a system under
//! test, comparing every answer, the upper layer's invariants after every operation,
//! and the whole merged tree at the end (and after every remount).
//!
//! [`EngineSubject`] drives the engine directly on temporary directories, playing
//! the kernel's part: it walks paths with lookups, makes the VFS's own checks (which
//! come before any filesystem sees a call) and forgets every inode after each
//! operation, as a kernel under memory pressure does. No FUSE, no root needed.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use super::layers::Scenario;
use super::model::{Kind, Model, OpResult, Outcome, SnapEntry, Snapshot, StatView, diff_snapshots};
use super::ops::{self, Op, RelPath, RenameFlag};
use crate::MountConfig;
use crate::union::whiteout::{OPAQUE_MARKER, is_whiteout_stat, whiteout_target};
use crate::union::{Attr, Caller, Errno, Ino, ROOT_INO, RenameMode, SetAttr, Setup, Union};
use crate::volume::attach::GraftSources;

/// A system the model is compared with: the engine, or a mounted filesystem.
pub trait Subject {
    fn apply(&mut self, op: &Op) -> OpResult;
    /// The whole merged tree; `identity` holds the st_ino of every non-directory,
    /// `inos` that of every entry.
    fn snapshot(&mut self) -> Result<(Snapshot, BTreeMap<String, u64>), String>;
    /// Violations of the upper layer's invariants, one line each.
    fn upper_problems(&mut self) -> Vec<String>;
}

/// Whether this process can write the kernel's marker formats (char 0/0 whiteouts,
/// trusted.* xattrs). Probed once in a scratch directory.
pub fn can_write_native_markers() -> bool {
    static PROBE: OnceLock<bool> = OnceLock::new();
    *PROBE.get_or_init(|| {
        let Ok(dir) = tempfile::Builder::new()
            .prefix("stratafs-probe-")
            .tempdir_in(scratch_base())
        else {
            return false;
        };
        let dev = dir.path().join("c");
        let mknod = rustix::fs::mknodat(
            rustix::fs::CWD,
            &dev,
            rustix::fs::FileType::CharacterDevice,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        );
        let xattr = rustix::fs::lsetxattr(
            dir.path(),
            "trusted.overlay.probe",
            b"y",
            rustix::fs::XattrFlags::empty(),
        );
        mknod.is_ok() && xattr.is_ok()
    })
}

/// Where scratch layers go: `STRATAFS_MODEL_TMP`, else /dev/shm (tmpfs: fast, and it
/// holds user and trusted xattrs), else the system temp dir.
pub fn scratch_base() -> PathBuf {
    if let Some(p) = std::env::var_os("STRATAFS_MODEL_TMP") {
        return PathBuf::from(p);
    }
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        return shm.to_path_buf();
    }
    std::env::temp_dir()
}

/// A scratch directory with `lower{i}`, `upper` and `work`, built from a scenario.
pub struct Workspace {
    pub lowers: Vec<PathBuf>,
    pub upper: PathBuf,
    pub work: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Workspace {
    /// Builds `scenario` (normalized for what this process may write).
    pub fn new(scenario: &Scenario) -> Result<Workspace, String> {
        let tmp = tempfile::Builder::new()
            .prefix("stratafs-model-")
            .tempdir_in(scratch_base())
            .map_err(|e| format!("scratch dir in {}: {e}", scratch_base().display()))?;
        let root = tmp.path();
        let mut lowers = Vec::new();
        for i in 0..scenario.lowers.len() {
            let dir = root.join(format!("lower{i}"));
            fs::create_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            scenario
                .build_layer(i, &dir)
                .map_err(|e| format!("building lower {i}: {e}"))?;
            lowers.push(dir);
        }
        let (upper, work) = (root.join("upper"), root.join("work"));
        for d in [&upper, &work] {
            fs::create_dir(d).map_err(|e| format!("{}: {e}", d.display()))?;
            fs::set_permissions(d, fs::Permissions::from_mode(0o755))
                .map_err(|e| format!("{}: {e}", d.display()))?;
        }
        scenario
            .build_upper(&upper)
            .map_err(|e| format!("building the upper layer: {e}"))?;
        Ok(Workspace {
            lowers,
            upper,
            work,
            _tmp: tmp,
        })
    }

    pub fn config(&self) -> MountConfig {
        let mut c = MountConfig::new(self.lowers.clone(), PathBuf::from("/nonexistent"));
        c.upperdir = Some(self.upper.clone());
        c.workdir = Some(self.work.clone());
        // Durability is not what is tested here; skipping fsync keeps runs fast.
        c.volatile = true;
        c
    }
}

/// The engine on a [`Workspace`], driven as the kernel drives it.
pub struct EngineSubject {
    ws: Workspace,
    union: Option<Union>,
    held: Vec<Ino>,
    /// Open descriptors by slot. While any is open nothing is forgotten: the
    /// kernel's dentry of an open file pins its parents, also the new ones after a
    /// rename, and keeping every reference is the simplest faithful stand-in.
    fds: [Option<OpenHandle>; ops::FD_SLOTS],
}

#[derive(Debug, Clone, Copy)]
struct OpenHandle {
    fh: u64,
    dir: bool,
    write: bool,
}

impl EngineSubject {
    pub fn new(scenario: &Scenario) -> Result<EngineSubject, String> {
        let ws = Workspace::new(scenario)?;
        let union = Union::new(&ws.config(), &Setup::for_mount(), GraftSources::none())
            .map_err(|e| e.to_string())?;
        Ok(EngineSubject {
            ws,
            union: Some(union),
            held: Vec::new(),
            fds: [None; ops::FD_SLOTS],
        })
    }

    pub fn workspace(&self) -> &Workspace {
        &self.ws
    }

    fn union(&self) -> Result<&Union, Errno> {
        self.union.as_ref().ok_or(Errno::IO)
    }

    fn forget_all(&mut self) {
        if self.fds.iter().any(|f| f.is_some()) {
            return;
        }
        if let Some(u) = &self.union {
            for ino in self.held.drain(..) {
                u.forget(ino, 1);
            }
        }
    }

    /// release(2)/releasedir of a slot, and the kernel's forget of its inode.
    fn close(&mut self, slot: usize) -> Result<(), Errno> {
        let h = self.fds[slot].take().ok_or(Errno::BADF)?;
        let u = self.union()?;
        if h.dir {
            u.releasedir(h.fh);
        } else {
            u.release(h.fh);
        }
        Ok(())
    }

    fn lookup(&mut self, parent: Ino, name: &str) -> Result<Attr, Errno> {
        let e = self.union()?.lookup(parent, OsStr::new(name))?;
        self.held.push(e.attr.ino);
        Ok(e.attr)
    }

    /// Follows the symlink `link` found in `parent`. Generated targets are single
    /// names, so one lookup in the link's directory resolves them.
    fn follow(&mut self, parent: Ino, link: Ino) -> Result<Attr, Errno> {
        let target = self.union()?.readlink(link)?;
        let name = target.to_str().ok_or(Errno::INVAL)?.to_string();
        if name.is_empty() || name.contains('/') {
            return Err(Errno::INVAL);
        }
        let attr = self.lookup(parent, &name)?;
        if attr.kind() == libc::S_IFLNK {
            return Err(Errno::LOOP);
        }
        Ok(attr)
    }

    /// The directory `comps` names (path resolution of all but the last component).
    fn walk_dir(&mut self, comps: &[&str]) -> Result<Ino, Errno> {
        let mut ino = ROOT_INO;
        for c in comps {
            let mut attr = self.lookup(ino, c)?;
            if attr.kind() == libc::S_IFLNK {
                attr = self.follow(ino, attr.ino)?;
            }
            if attr.kind() != libc::S_IFDIR {
                return Err(Errno::NOTDIR);
            }
            ino = attr.ino;
        }
        Ok(ino)
    }

    /// The parent's inode and the entry at `path` (following a final symlink when asked).
    fn walk(&mut self, path: &RelPath, follow: bool) -> Result<(Ino, Attr), Errno> {
        let parent = self.walk_dir(&path.parent())?;
        let mut attr = self.lookup(parent, path.name())?;
        if follow && attr.kind() == libc::S_IFLNK {
            attr = self.follow(parent, attr.ino)?;
        }
        Ok((parent, attr))
    }

    /// The parent of a name about to be made; EEXIST when the name is taken.
    fn free_name(&mut self, path: &RelPath) -> Result<Ino, Errno> {
        let parent = self.walk_dir(&path.parent())?;
        match self.lookup(parent, path.name()) {
            Ok(_) => Err(Errno::EXIST),
            Err(Errno::NOENT) => Ok(parent),
            Err(e) => Err(e),
        }
    }

    fn apply_op(&mut self, op: &Op) -> OpResult {
        let name = |p: &RelPath| OsStr::new(p.name());
        match op {
            Op::Create { path, mode } => {
                let parent = self.free_name(path)?;
                let (entry, fh, _) = self.union()?.create(
                    Caller::ROOT,
                    parent,
                    name(path),
                    libc::S_IFREG | ops::file_mode_of(*mode),
                    libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY,
                )?;
                self.held.push(entry.attr.ino);
                self.union()?.release(fh);
                Ok(Outcome::Done)
            }
            Op::Mkdir { path, mode } => {
                let parent = self.free_name(path)?;
                let e =
                    self.union()?
                        .mkdir(Caller::ROOT, parent, name(path), ops::mode_of(*mode))?;
                self.held.push(e.attr.ino);
                Ok(Outcome::Done)
            }
            Op::Symlink { path, target } => {
                let parent = self.free_name(path)?;
                let t = OsStr::new(ops::symlink_target_of(*target));
                let e = self.union()?.symlink(Caller::ROOT, parent, name(path), t)?;
                self.held.push(e.attr.ino);
                Ok(Outcome::Done)
            }
            Op::Link { from, to } => {
                let (_, src) = self.walk(from, false)?;
                let parent = self.free_name(to)?;
                if src.kind() == libc::S_IFDIR {
                    return Err(Errno::PERM);
                }
                let e = self.union()?.link(src.ino, parent, name(to))?;
                self.held.push(e.attr.ino);
                Ok(Outcome::Done)
            }
            Op::Write {
                path,
                offset,
                len,
                byte,
            } => {
                let (_, attr) = self.walk(path, true)?;
                if attr.kind() == libc::S_IFDIR {
                    return Err(Errno::ISDIR);
                }
                let u = self.union()?;
                let (fh, _) = u.open(attr.ino, libc::O_WRONLY)?;
                let data = Op::write_data(*len, *byte);
                let res = if data.is_empty() {
                    Ok(0)
                } else {
                    u.write(fh, ops::write_offset(*offset), &data)
                };
                u.release(fh);
                match res {
                    Ok(n) if n == data.len() => Ok(Outcome::Done),
                    Ok(_) => Err(Errno::IO),
                    Err(e) => Err(e.into()),
                }
            }
            Op::Truncate { path, size } => {
                let (_, attr) = self.walk(path, true)?;
                if attr.kind() == libc::S_IFDIR {
                    return Err(Errno::ISDIR);
                }
                let set = SetAttr {
                    size: Some(ops::truncate_size(*size)),
                    ..SetAttr::default()
                };
                self.union()?.setattr(attr.ino, &set, None)?;
                Ok(Outcome::Done)
            }
            Op::Read { path } => {
                let (_, attr) = self.walk(path, true)?;
                if attr.kind() == libc::S_IFDIR {
                    return Err(Errno::ISDIR);
                }
                Ok(Outcome::Data(read_file(self.union()?, attr.ino)?))
            }
            Op::Stat { path } => {
                let (_, attr) = self.walk(path, false)?;
                Ok(Outcome::Stat(stat_view(&attr)))
            }
            Op::Readlink { path } => {
                let (_, attr) = self.walk(path, false)?;
                if attr.kind() != libc::S_IFLNK {
                    return Err(Errno::INVAL);
                }
                let t = self.union()?.readlink(attr.ino)?;
                Ok(Outcome::Target(t.to_string_lossy().into_owned()))
            }
            Op::Readdir { path } => {
                let ino = match path {
                    None => ROOT_INO,
                    Some(path) => self.walk(path, true)?.1.ino,
                };
                let mut problems = Vec::new();
                let entries = list_dir(self.union()?, ino, "", &mut problems)?;
                if let Some(p) = problems.first() {
                    return Ok(Outcome::Names(vec![format!("<{p}>")]));
                }
                Ok(Outcome::Names(
                    entries.into_iter().map(|(n, _)| n).collect(),
                ))
            }
            Op::Unlink { path } => {
                let (parent, attr) = self.walk(path, false)?;
                if attr.kind() == libc::S_IFDIR {
                    return Err(Errno::ISDIR);
                }
                self.union()?.unlink(parent, name(path))?;
                Ok(Outcome::Done)
            }
            Op::Rmdir { path } => {
                let (parent, attr) = self.walk(path, false)?;
                if attr.kind() != libc::S_IFDIR {
                    return Err(Errno::NOTDIR);
                }
                self.union()?.rmdir(parent, name(path))?;
                Ok(Outcome::Done)
            }
            Op::Rename { from, to, flag } => self.rename(from, to, *flag),
            Op::Chmod { path, mode } => {
                let (_, attr) = self.walk(path, true)?;
                let set = SetAttr {
                    mode: Some(attr.kind() | ops::mode_of(*mode)),
                    ..SetAttr::default()
                };
                self.union()?.setattr(attr.ino, &set, None)?;
                Ok(Outcome::Done)
            }
            Op::SetXattr { path, name, value } => {
                let (_, attr) = self.walk(path, false)?;
                xattr_allowed(&attr)?;
                self.union()?.setxattr(
                    attr.ino,
                    OsStr::new(ops::xattr_name_of(*name)),
                    ops::xattr_value_of(*value),
                    0,
                )?;
                Ok(Outcome::Done)
            }
            Op::RemoveXattr { path, name } => {
                let (_, attr) = self.walk(path, false)?;
                xattr_allowed(&attr)?;
                self.union()?
                    .removexattr(attr.ino, OsStr::new(ops::xattr_name_of(*name)))?;
                Ok(Outcome::Done)
            }
            Op::Open { slot, path, write } => {
                let slot = ops::slot_of(*slot);
                if self.fds[slot].is_some() {
                    self.close(slot)?;
                }
                let (_, attr) = self.walk(path, true)?;
                let dir = attr.kind() == libc::S_IFDIR;
                if dir && *write {
                    return Err(Errno::ISDIR);
                }
                let u = self.union()?;
                let fh = if dir {
                    u.opendir(attr.ino)?
                } else {
                    let flags = if *write {
                        libc::O_WRONLY
                    } else {
                        libc::O_RDONLY
                    };
                    u.open(attr.ino, flags)?.0
                };
                self.fds[slot] = Some(OpenHandle {
                    fh,
                    dir,
                    write: *write,
                });
                Ok(Outcome::Done)
            }
            Op::FdWrite {
                slot,
                offset,
                len,
                byte,
            } => {
                let h = self.fds[ops::slot_of(*slot)].ok_or(Errno::BADF)?;
                if h.dir || !h.write {
                    return Err(Errno::BADF);
                }
                let data = Op::write_data(*len, *byte);
                if !data.is_empty() {
                    let n = self
                        .union()?
                        .write(h.fh, ops::write_offset(*offset), &data)?;
                    if n != data.len() {
                        return Err(Errno::IO);
                    }
                }
                Ok(Outcome::Done)
            }
            Op::FdRead { slot } => {
                let h = self.fds[ops::slot_of(*slot)].ok_or(Errno::BADF)?;
                if h.write {
                    return Err(Errno::BADF);
                }
                if h.dir {
                    return Err(Errno::ISDIR);
                }
                Ok(Outcome::Data(read_handle(self.union()?, h.fh)?))
            }
            Op::Close { slot } => {
                self.close(ops::slot_of(*slot))?;
                Ok(Outcome::Done)
            }
            Op::Remount => {
                for slot in 0..ops::FD_SLOTS {
                    if self.fds[slot].is_some() {
                        self.close(slot)?;
                    }
                }
                self.forget_all();
                self.union = None;
                self.union = Some(
                    Union::new(&self.ws.config(), &Setup::for_mount(), GraftSources::none())
                        .map_err(|_| Errno::IO)?,
                );
                Ok(Outcome::Done)
            }
        }
    }

    /// The VFS's part of rename(2) (see `Model::rename` for the order), then the engine.
    fn rename(&mut self, from: &RelPath, to: &RelPath, flag: RenameFlag) -> OpResult {
        let p = self.walk_dir(&from.parent())?;
        let q = self.walk_dir(&to.parent())?;
        let src = self.lookup(p, from.name())?;
        let dst = match self.lookup(q, to.name()) {
            Ok(a) => Some(a),
            Err(Errno::NOENT) => None,
            Err(e) => return Err(e),
        };
        ops::rename_vfs_checks(from, to, flag, dst.is_some())?;
        if let Some(d) = &dst {
            if d.ino == src.ino {
                return Ok(Outcome::Done);
            }
            let (s_dir, d_dir) = (src.kind() == libc::S_IFDIR, d.kind() == libc::S_IFDIR);
            if flag != RenameFlag::Exchange && s_dir && !d_dir {
                return Err(Errno::NOTDIR);
            }
            if flag != RenameFlag::Exchange && !s_dir && d_dir {
                return Err(Errno::ISDIR);
            }
        }
        let mode = match flag {
            RenameFlag::Replace => RenameMode::Replace,
            RenameFlag::NoReplace => RenameMode::NoReplace,
            RenameFlag::Exchange => RenameMode::Exchange,
        };
        self.union()?
            .rename(p, OsStr::new(from.name()), q, OsStr::new(to.name()), mode)?;
        Ok(Outcome::Done)
    }
}

/// user.* xattrs exist only on regular files and directories; the VFS answers EPERM
/// for a change elsewhere before any filesystem is asked.
fn xattr_allowed(attr: &Attr) -> Result<(), Errno> {
    match attr.kind() {
        libc::S_IFREG | libc::S_IFDIR => Ok(()),
        _ => Err(Errno::PERM),
    }
}

fn kind_of(mode: u32) -> Option<Kind> {
    match mode & libc::S_IFMT {
        libc::S_IFREG => Some(Kind::File),
        libc::S_IFDIR => Some(Kind::Dir),
        libc::S_IFLNK => Some(Kind::Symlink),
        _ => None,
    }
}

/// What lstat shows of `mode`, `size` and `nlink`, cut to what the model knows.
pub fn stat_view_of(mode: u32, size: u64, nlink: u32) -> Result<StatView, Errno> {
    let kind = kind_of(mode).ok_or(Errno::IO)?;
    Ok(StatView {
        kind,
        perm: (kind != Kind::Symlink).then_some(mode & 0o7777),
        size: (kind != Kind::Dir).then_some(size),
        nlink: (kind != Kind::Dir).then_some(nlink),
    })
}

fn stat_view(attr: &Attr) -> StatView {
    stat_view_of(attr.mode, attr.size, attr.nlink).unwrap_or(StatView {
        kind: Kind::File,
        perm: Some(attr.mode),
        size: None,
        nlink: None,
    })
}

fn read_file(u: &Union, ino: Ino) -> Result<Vec<u8>, Errno> {
    let (fh, _) = u.open(ino, libc::O_RDONLY)?;
    let res = read_handle(u, fh);
    u.release(fh);
    res
}

/// Reads an open file from offset 0 to its end.
fn read_handle(u: &Union, fh: u64) -> Result<Vec<u8>, Errno> {
    let mut data = Vec::new();
    loop {
        let chunk = u.read(fh, data.len() as u64, 4096)?;
        if chunk.is_empty() {
            return Ok(data);
        }
        data.extend_from_slice(&chunk);
    }
}

/// The names of directory `ino` (sorted) with their readdir type. A name that must
/// never be shown (a `.wh.` name, the opaque marker) or one listed twice is
/// reported in `problems`.
fn list_dir(
    u: &Union,
    ino: Ino,
    at: &str,
    problems: &mut Vec<String>,
) -> Result<Vec<(String, u32)>, Errno> {
    let fh = u.opendir(ino)?;
    let entries = u.readdir(fh, 0);
    u.releasedir(fh);
    let mut out = Vec::new();
    for e in entries?.iter() {
        let name = e.name.to_string_lossy().into_owned();
        if name == "." || name == ".." {
            continue;
        }
        if name == OPAQUE_MARKER || whiteout_target(&e.name).is_some() || name.starts_with(".wh.") {
            problems.push(format!("/{at}: readdir shows the marker {name:?}"));
        }
        out.push((name, e.kind));
    }
    out.sort();
    let before = out.len();
    out.dedup_by(|a, b| a.0 == b.0);
    if out.len() != before {
        problems.push(format!("/{at}: readdir lists a name twice"));
    }
    Ok(out)
}

fn xattrs_of(u: &Union, ino: Ino) -> Result<BTreeMap<String, Vec<u8>>, Errno> {
    let mut out = BTreeMap::new();
    for name in u.listxattr(ino)? {
        let n = name.to_string_lossy().into_owned();
        if n.starts_with("security.") {
            continue;
        }
        out.insert(n, u.getxattr(ino, &name)?);
    }
    Ok(out)
}

impl EngineSubject {
    fn snap_dir(
        &mut self,
        ino: Ino,
        at: &str,
        snap: &mut Snapshot,
        inos: &mut BTreeMap<String, u64>,
        problems: &mut Vec<String>,
    ) -> Result<(), Errno> {
        let names = list_dir(self.union()?, ino, at, problems)?;
        for (name, dkind) in names {
            let path = if at.is_empty() {
                name.clone()
            } else {
                format!("{at}/{name}")
            };
            let attr = match self.lookup(ino, &name) {
                Ok(a) => a,
                Err(e) => {
                    problems.push(format!("/{path}: listed but lookup answers {e:?}"));
                    continue;
                }
            };
            if is_whiteout_stat(attr.mode, attr.rdev) {
                problems.push(format!("/{path}: a whiteout is shown"));
                continue;
            }
            if dkind != attr.kind() {
                problems.push(format!(
                    "/{path}: readdir type {dkind:o} but lookup type {:o}",
                    attr.kind()
                ));
            }
            let Some(kind) = kind_of(attr.mode) else {
                problems.push(format!("/{path}: unexpected file type {:o}", attr.mode));
                continue;
            };
            let u = self.union()?;
            let entry = match kind {
                Kind::File => SnapEntry {
                    kind,
                    perm: Some(attr.mode & 0o7777),
                    data: read_file(u, attr.ino)?,
                    xattrs: xattrs_of(u, attr.ino)?,
                },
                Kind::Symlink => SnapEntry {
                    kind,
                    perm: None,
                    data: u.readlink(attr.ino)?.into_encoded_bytes(),
                    xattrs: BTreeMap::new(),
                },
                Kind::Dir => SnapEntry {
                    kind,
                    perm: Some(attr.mode & 0o7777),
                    data: Vec::new(),
                    xattrs: xattrs_of(u, attr.ino)?,
                },
            };
            snap.entries.insert(path.clone(), entry);
            inos.insert(path.clone(), attr.ino);
            if kind == Kind::Dir {
                self.snap_dir(attr.ino, &path, snap, inos, problems)?;
            } else {
                snap.identity.insert(path, attr.ino);
            }
        }
        Ok(())
    }
}

impl Subject for EngineSubject {
    fn apply(&mut self, op: &Op) -> OpResult {
        let res = self.apply_op(op);
        self.forget_all();
        res
    }

    fn snapshot(&mut self) -> Result<(Snapshot, BTreeMap<String, u64>), String> {
        let mut snap = Snapshot::default();
        let mut inos = BTreeMap::new();
        let mut problems = Vec::new();
        let root = self
            .union()
            .and_then(|u| u.getattr(ROOT_INO).map_err(Into::into));
        let res = root.and_then(|attr| {
            snap.entries.insert(
                String::new(),
                SnapEntry {
                    kind: Kind::Dir,
                    perm: Some(attr.mode & 0o7777),
                    data: Vec::new(),
                    xattrs: xattrs_of(self.union()?, ROOT_INO)?,
                },
            );
            self.snap_dir(ROOT_INO, "", &mut snap, &mut inos, &mut problems)
        });
        self.forget_all();
        if let Err(e) = res {
            problems.push(format!("walking the merged tree: {e:?}"));
        }
        if !problems.is_empty() {
            return Err(problems.join("\n"));
        }
        let all_closed = self.fds.iter().all(|f| f.is_none());
        if let (Some(u), true) = (&self.union, all_closed) {
            if u.inode_count() != 1 {
                return Err(format!(
                    "{} inodes remain after every lookup was forgotten (only the root may)",
                    u.inode_count()
                ));
            }
        }
        Ok((snap, inos))
    }

    fn upper_problems(&mut self) -> Vec<String> {
        upper_problems(&self.ws.upper, &self.ws.work, false)
    }
}

/// Invariants of an upper layer between operations: the staging area
/// (`workdir/work`) is empty, so nothing half-copied or half-made is left; and no
/// directory holds a name together with a whiteout of that name.
/// `shared_whiteout_ok`: kernel overlayfs keeps one whiteout in `work` to hard-link
/// new whiteouts from; that one is allowed.
pub fn upper_problems(upper: &Path, workdir: &Path, shared_whiteout_ok: bool) -> Vec<String> {
    let mut out = Vec::new();
    match fs::read_dir(workdir.join("work")) {
        Ok(rd) => {
            let left: Vec<String> = rd
                .filter_map(|e| e.ok())
                .filter(|e| {
                    !(shared_whiteout_ok
                        && e.metadata().is_ok_and(|m| {
                            use std::os::unix::fs::MetadataExt;
                            is_whiteout_stat(m.mode(), m.rdev())
                        }))
                })
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            if !left.is_empty() {
                out.push(format!("workdir/work is not empty: {left:?}"));
            }
        }
        Err(e) => out.push(format!("workdir/work: {e}")),
    }
    check_upper_dir(upper, "", &mut out);
    out
}

fn check_upper_dir(dir: &Path, at: &str, out: &mut Vec<String>) {
    let Ok(rd) = fs::read_dir(dir) else {
        out.push(format!("upper/{at}: unreadable"));
        return;
    };
    let names: Vec<(String, fs::FileType)> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            Some((
                e.file_name().to_string_lossy().into_owned(),
                e.file_type().ok()?,
            ))
        })
        .collect();
    for (name, ft) in &names {
        if let Some(hidden) = whiteout_target(OsStr::new(name)) {
            let hidden = hidden.to_string_lossy();
            if names.iter().any(|(n, _)| *n == hidden) {
                out.push(format!(
                    "upper/{at}: both {hidden:?} and its whiteout {name:?}"
                ));
            }
        }
        if ft.is_dir() {
            let sub = if at.is_empty() {
                name.clone()
            } else {
                format!("{at}/{name}")
            };
            check_upper_dir(&dir.join(name), &sub, out);
        }
    }
}

/// Why a run failed: the operation (index into the sequence, `None` for the checks
/// after the last one) and what differed.
#[derive(Debug, Clone)]
pub struct Failure {
    pub step: Option<usize>,
    pub what: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.step {
            Some(i) => write!(f, "after operation #{i}: {}", self.what),
            None => write!(f, "at the end: {}", self.what),
        }
    }
}

/// How much checking each operation gets.
#[derive(Debug, Clone, Copy)]
pub struct Checks {
    /// Compare the whole merged tree after every operation, not only at the end and
    /// after each remount.
    pub tree_every_op: bool,
    /// A remount must keep the st_ino of every entry (copy-ups record their
    /// origin's number, see union/origin.rs).
    pub stable_ino_across_remount: bool,
    /// Compare st_nlink of non-directories. Off only for kernel overlayfs as an
    /// oracle: it counts the links of a partly copied-up lower hard-link group
    /// through its index, not by the names visible in the view.
    pub link_counts: bool,
}

impl Default for Checks {
    fn default() -> Self {
        Checks {
            tree_every_op: true,
            stable_ino_across_remount: true,
            link_counts: true,
        }
    }
}

fn compare_tree(model: &Model, subject: &mut dyn Subject) -> Result<BTreeMap<String, u64>, String> {
    let (got, inos) = subject.snapshot()?;
    let diffs = diff_snapshots(&model.snapshot(), &got);
    if diffs.is_empty() {
        Ok(inos)
    } else {
        Err(format!("merged tree differs:\n  {}", diffs.join("\n  ")))
    }
}

/// Applies `ops` to the model and to `subject`, checking as described in the module
/// docs. A remount must keep every st_ino.
pub fn check_sequence(
    model: &mut Model,
    subject: &mut dyn Subject,
    ops: &[Op],
    checks: Checks,
) -> Result<(), Failure> {
    let fail = |step, what: String| Failure { step, what };
    compare_tree(model, subject).map_err(|w| fail(None, format!("before any operation: {w}")))?;
    for (i, op) in ops.iter().enumerate() {
        let before = if *op == Op::Remount {
            Some(compare_tree(model, subject).map_err(|w| fail(Some(i), w))?)
        } else {
            None
        };
        let mut expected = model.apply(op);
        let mut got = subject.apply(op);
        if !checks.link_counts {
            for outcome in [&mut expected, &mut got] {
                if let Ok(Outcome::Stat(view)) = outcome {
                    view.nlink = None;
                }
            }
        }
        if !Outcome::accepts(&expected, &got) {
            return Err(fail(
                Some(i),
                format!("{op:?}: the model answers {expected:?}, the subject {got:?}"),
            ));
        }
        let problems = subject.upper_problems();
        if !problems.is_empty() {
            return Err(fail(Some(i), format!("{op:?}: {}", problems.join("; "))));
        }
        if checks.tree_every_op || before.is_some() {
            let after =
                compare_tree(model, subject).map_err(|w| fail(Some(i), format!("{op:?}: {w}")))?;
            if let (Some(before), true) = (before, checks.stable_ino_across_remount) {
                let changed: Vec<String> = before
                    .iter()
                    .filter(|(p, ino)| after.get(*p).is_some_and(|a| a != *ino))
                    .map(|(p, ino)| format!("/{p}: {ino:#x} -> {:#x}", after[p]))
                    .collect();
                if !changed.is_empty() {
                    return Err(fail(
                        Some(i),
                        format!("st_ino changed across the remount: {}", changed.join(", ")),
                    ));
                }
            }
        }
    }
    subject
        .apply(&Op::Remount)
        .map_err(|e| fail(None, format!("final remount: {e:?}")))?;
    compare_tree(model, subject)
        .map_err(|w| fail(None, format!("after the final remount: {w}")))?;
    Ok(())
}

/// One whole run on the engine: builds the layers, starts the model from the same
/// scenario, applies `ops`. The scenario is normalized for what this process can
/// write (rootless: AUFS-format markers only).
pub fn run_engine(scenario: &Scenario, ops: &[Op], checks: Checks) -> Result<(), String> {
    let scenario = scenario.normalized(false, !can_write_native_markers());
    let mut subject = EngineSubject::new(&scenario)?;
    let mut model = Model::from_scenario(&scenario, 0o755);
    check_sequence(&mut model, &mut subject, ops, checks)
        .map_err(|f| format!("{f}\nscenario: {scenario:?}\nops: {ops:#?}",))
}
