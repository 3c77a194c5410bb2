//! The same operations made with ordinary system calls on a mounted directory: a
//! stratafs FUSE mount, or kernel overlayfs as a second oracle. Mounting and
//! remounting belong to the caller (the test fixtures), passed in as a closure.

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::{RenameFlags, XattrFlags};

use super::model::{Kind, OpResult, Outcome, SnapEntry, Snapshot};
use super::ops::{self, Op, RelPath, RenameFlag};
use super::runner::{Subject, stat_view_of, upper_problems};
use crate::union::Errno;

pub type Remount = Box<dyn FnMut() -> Result<(), String>>;

pub struct MountedSubject {
    root: PathBuf,
    upper: PathBuf,
    workdir: PathBuf,
    remount: Remount,
    kernel_overlay: bool,
    fds: [Option<fs::File>; ops::FD_SLOTS],
}

impl MountedSubject {
    /// `root` is the mountpoint; `upper` and `workdir` are the mount's directories,
    /// checked between operations.
    pub fn new(root: &Path, upper: &Path, workdir: &Path, remount: Remount) -> MountedSubject {
        MountedSubject {
            root: root.to_path_buf(),
            upper: upper.to_path_buf(),
            workdir: workdir.to_path_buf(),
            remount,
            kernel_overlay: false,
            fds: [const { None }; ops::FD_SLOTS],
        }
    }

    /// The mount is kernel overlayfs (which keeps a shared whiteout in `workdir/work`).
    pub fn kernel_overlay(mut self) -> MountedSubject {
        self.kernel_overlay = true;
        self
    }

    fn at(&self, p: &RelPath) -> PathBuf {
        self.root.join(p.to_path_string())
    }
}

fn errno(e: io::Error) -> Errno {
    e.raw_os_error()
        .map(Errno::from_raw_os_error)
        .unwrap_or(Errno::IO)
}

fn done(r: io::Result<()>) -> OpResult {
    r.map(|_| Outcome::Done).map_err(errno)
}

/// One pwrite(2), even of nothing (`write_all_at` skips the call for an empty buffer,
/// and with it the kernel's descriptor checks).
fn pwrite(f: &fs::File, data: &[u8], offset: u64) -> OpResult {
    match f.write_at(data, offset) {
        Ok(n) if n == data.len() => Ok(Outcome::Done),
        Ok(_) => Err(Errno::IO),
        Err(e) => Err(errno(e)),
    }
}

fn xattrs_at(p: &Path) -> io::Result<BTreeMap<String, Vec<u8>>> {
    let mut buf = vec![0u8; 4096];
    let n = rustix::fs::llistxattr(p, &mut buf)?;
    let mut out = BTreeMap::new();
    for name in buf[..n].split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let name = String::from_utf8_lossy(name).into_owned();
        if name.starts_with("security.") {
            continue;
        }
        let mut val = vec![0u8; 4096];
        let len = rustix::fs::lgetxattr(p, name.as_str(), &mut val)?;
        val.truncate(len);
        out.insert(name, val);
    }
    Ok(out)
}

impl Subject for MountedSubject {
    fn apply(&mut self, op: &Op) -> OpResult {
        match op {
            Op::Create { path, mode } => done(
                OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(ops::file_mode_of(*mode))
                    .open(self.at(path))
                    .map(drop),
            ),
            Op::Mkdir { path, mode } => done(
                fs::DirBuilder::new()
                    .mode(ops::mode_of(*mode))
                    .create(self.at(path)),
            ),
            Op::Symlink { path, target } => done(std::os::unix::fs::symlink(
                ops::symlink_target_of(*target),
                self.at(path),
            )),
            Op::Link { from, to } => done(fs::hard_link(self.at(from), self.at(to))),
            Op::Write {
                path,
                offset,
                len,
                byte,
            } => OpenOptions::new()
                .write(true)
                .open(self.at(path))
                .map_err(errno)
                .and_then(|f| pwrite(&f, &Op::write_data(*len, *byte), ops::write_offset(*offset))),
            // truncate(2) has no std wrapper; open+ftruncate answers the same errnos.
            Op::Truncate { path, size } => done(
                OpenOptions::new()
                    .write(true)
                    .open(self.at(path))
                    .and_then(|f| f.set_len(ops::truncate_size(*size))),
            ),
            Op::Read { path } => fs::read(self.at(path)).map(Outcome::Data).map_err(errno),
            Op::Stat { path } => {
                let md = fs::symlink_metadata(self.at(path)).map_err(errno)?;
                Ok(Outcome::Stat(stat_view_of(
                    md.mode(),
                    md.size(),
                    md.nlink() as u32,
                )?))
            }
            Op::Readlink { path } => fs::read_link(self.at(path))
                .map(|t| Outcome::Target(t.to_string_lossy().into_owned()))
                .map_err(errno),
            Op::Readdir { path } => {
                let dir = match path {
                    None => self.root.clone(),
                    Some(p) => self.at(p),
                };
                let mut names: Vec<String> = fs::read_dir(dir)
                    .map_err(errno)?
                    .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
                    .collect::<io::Result<_>>()
                    .map_err(errno)?;
                names.sort();
                Ok(Outcome::Names(names))
            }
            Op::Unlink { path } => done(fs::remove_file(self.at(path))),
            Op::Rmdir { path } => done(fs::remove_dir(self.at(path))),
            Op::Rename { from, to, flag } => {
                let flags = match flag {
                    RenameFlag::Replace => RenameFlags::empty(),
                    RenameFlag::NoReplace => RenameFlags::NOREPLACE,
                    RenameFlag::Exchange => RenameFlags::EXCHANGE,
                };
                done(
                    rustix::fs::renameat_with(
                        rustix::fs::CWD,
                        self.at(from),
                        rustix::fs::CWD,
                        self.at(to),
                        flags,
                    )
                    .map_err(io::Error::from),
                )
            }
            Op::Chmod { path, mode } => done(fs::set_permissions(
                self.at(path),
                fs::Permissions::from_mode(ops::mode_of(*mode)),
            )),
            Op::SetXattr { path, name, value } => done(
                rustix::fs::lsetxattr(
                    self.at(path),
                    ops::xattr_name_of(*name),
                    ops::xattr_value_of(*value),
                    XattrFlags::empty(),
                )
                .map_err(io::Error::from),
            ),
            Op::RemoveXattr { path, name } => done(
                rustix::fs::lremovexattr(self.at(path), ops::xattr_name_of(*name))
                    .map_err(io::Error::from),
            ),
            Op::Open { slot, path, write } => {
                let slot = ops::slot_of(*slot);
                self.fds[slot] = None;
                let f = OpenOptions::new()
                    .read(!*write)
                    .write(*write)
                    .open(self.at(path))
                    .map_err(errno)?;
                self.fds[slot] = Some(f);
                Ok(Outcome::Done)
            }
            Op::FdWrite {
                slot,
                offset,
                len,
                byte,
            } => {
                let f = self.fds[ops::slot_of(*slot)].as_ref().ok_or(Errno::BADF)?;
                pwrite(f, &Op::write_data(*len, *byte), ops::write_offset(*offset))
            }
            Op::FdRead { slot } => {
                let f = self.fds[ops::slot_of(*slot)].as_ref().ok_or(Errno::BADF)?;
                let mut data = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    let n = f.read_at(&mut buf, data.len() as u64).map_err(errno)?;
                    if n == 0 {
                        return Ok(Outcome::Data(data));
                    }
                    data.extend_from_slice(&buf[..n]);
                }
            }
            Op::Close { slot } => self.fds[ops::slot_of(*slot)]
                .take()
                .map(|_| Outcome::Done)
                .ok_or(Errno::BADF),
            Op::Remount => {
                self.fds = [const { None }; ops::FD_SLOTS];
                (self.remount)()
                    .map(|_| Outcome::Done)
                    .map_err(|_| Errno::IO)
            }
        }
    }

    fn snapshot(&mut self) -> Result<(Snapshot, BTreeMap<String, u64>), String> {
        let mut snap = Snapshot::default();
        let mut inos = BTreeMap::new();
        let root = self.root.clone();
        let md = fs::symlink_metadata(&root).map_err(|e| format!("/: {e}"))?;
        snap.entries.insert(
            String::new(),
            SnapEntry {
                kind: Kind::Dir,
                perm: Some(md.mode() & 0o7777),
                data: Vec::new(),
                xattrs: xattrs_at(&root).map_err(|e| format!("/: {e}"))?,
            },
        );
        snap_dir(&root, "", &mut snap, &mut inos)?;
        Ok((snap, inos))
    }

    fn upper_problems(&mut self) -> Vec<String> {
        upper_problems(&self.upper, &self.workdir, self.kernel_overlay)
    }
}

fn snap_dir(
    dir: &Path,
    at: &str,
    snap: &mut Snapshot,
    inos: &mut BTreeMap<String, u64>,
) -> Result<(), String> {
    let ctx = |p: &str, e: io::Error| format!("/{p}: {e}");
    let mut names: Vec<String> = fs::read_dir(dir)
        .map_err(|e| ctx(at, e))?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<io::Result<_>>()
        .map_err(|e| ctx(at, e))?;
    names.sort();
    for name in names {
        let path = if at.is_empty() {
            name.clone()
        } else {
            format!("{at}/{name}")
        };
        let full = dir.join(&name);
        let md = fs::symlink_metadata(&full).map_err(|e| ctx(&path, e))?;
        let ft = md.file_type();
        let entry = if ft.is_file() {
            SnapEntry {
                kind: Kind::File,
                perm: Some(md.mode() & 0o7777),
                data: fs::read(&full).map_err(|e| ctx(&path, e))?,
                xattrs: xattrs_at(&full).map_err(|e| ctx(&path, e))?,
            }
        } else if ft.is_symlink() {
            SnapEntry {
                kind: Kind::Symlink,
                perm: None,
                data: fs::read_link(&full)
                    .map_err(|e| ctx(&path, e))?
                    .into_os_string()
                    .into_encoded_bytes(),
                xattrs: BTreeMap::new(),
            }
        } else if ft.is_dir() {
            SnapEntry {
                kind: Kind::Dir,
                perm: Some(md.mode() & 0o7777),
                data: Vec::new(),
                xattrs: xattrs_at(&full).map_err(|e| ctx(&path, e))?,
            }
        } else {
            return Err(format!("/{path}: unexpected file type {:o}", md.mode()));
        };
        let is_dir = entry.kind == Kind::Dir;
        snap.entries.insert(path.clone(), entry);
        inos.insert(path.clone(), md.ino());
        if is_dir {
            snap_dir(&full, &path, snap, inos)?;
        } else {
            snap.identity.insert(path, md.ino());
        }
    }
    Ok(())
}
