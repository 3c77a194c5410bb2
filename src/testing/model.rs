//! The reference model: the merged view as plain in-memory maps, and what each
//! operation must do to it and answer, in the order the kernel's VFS and an overlay
//! filesystem check things. It knows nothing of layers beyond building the initial
//! view ([`Model::from_scenario`]) and remembering which entries came from a lower
//! layer (for copy-up identity and directory renames).
//!
//! Where stratafs deliberately differs from plain POSIX, one function below says so:
//! [`lower_dir_rename_errno`].

use std::collections::BTreeMap;

use super::layers::{GeneratedLayer, LowerEntry, Scenario, file_data};
use super::ops::{self, Op, RelPath, RenameFlag};
use crate::union::Errno;

/// The answer of an operation in the model (and, converted, of the system under test).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Done,
    Data(Vec<u8>),
    Names(Vec<String>),
    Stat(StatView),
    Target(String),
}

impl Outcome {
    /// Whether `got` is an acceptable answer where the model expects `self`.
    pub fn accepts(expected: &OpResult, got: &OpResult) -> bool {
        expected == got
    }
}

pub type OpResult = Result<Outcome, Errno>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    File,
    Dir,
    Symlink,
}

/// The parts of lstat(2) the model knows exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatView {
    pub kind: Kind,
    /// Permission bits (0o7777), except for symlinks, whose mode is not compared.
    pub perm: Option<u32>,
    /// Files and symlinks; a directory's size is the filesystem's business.
    pub size: Option<u64>,
    /// Non-directories (a merged directory's link count is not defined by overlayfs).
    pub nlink: Option<u32>,
}

/// The error renaming a directory with content from a lower layer gives: none, as
/// on a plain filesystem (stratafs records a redirect, like kernel overlayfs with
/// `redirect_dir=on`). With `redirect_dir=off` this would be EXDEV (`mv` then copies).
pub fn lower_dir_rename_errno() -> Option<Errno> {
    None
}

pub type ObjId = usize;

/// Index of the upper layer among the layers [`Model::from_scenario`] merges.
const UPPER_LAYER: usize = 0;

/// A non-directory: what any of its names shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Obj {
    pub content: Content,
    pub mode: u32,
    pub xattrs: BTreeMap<String, Vec<u8>>,
    pub nlink: u32,
    /// Still the lower layer's object, showing the lower layer's link count. The
    /// first change through any of its names copies it up as one object: its names
    /// stay linked (kernel overlayfs `index=on`), and it counts its visible names.
    pub lower: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    File(Vec<u8>),
    Symlink(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dir {
    pub children: BTreeMap<String, Node>,
    pub mode: u32,
    pub xattrs: BTreeMap<String, Vec<u8>>,
    /// Merged or lower-only: some layer below the upper contributes to it.
    pub has_lower: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Dir(Dir),
    Obj(ObjId),
}

#[derive(Debug, Clone)]
pub struct Model {
    pub root: Dir,
    pub objs: Vec<Obj>,
    /// Open descriptors by slot.
    pub fds: [Option<Fd>; ops::FD_SLOTS],
}

/// An open descriptor: on an object (whatever names it has by now) or a directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fd {
    pub target: FdTarget,
    pub write: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FdTarget {
    Obj(ObjId),
    Dir,
}

/// One entry of a whole-tree snapshot: everything a user can read about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapEntry {
    pub kind: Kind,
    pub perm: Option<u32>,
    pub data: Vec<u8>,
    pub xattrs: BTreeMap<String, Vec<u8>>,
}

/// A whole merged tree by path, plus which non-directory paths are one object
/// (model: object id; system under test: st_ino).
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub entries: BTreeMap<String, SnapEntry>,
    pub identity: BTreeMap<String, u64>,
}

impl Model {
    /// The merged view of the scenario's layers. `root_mode` is the upper root's
    /// permission bits (the merged root shows the upper's).
    pub fn from_scenario(scenario: &Scenario, root_mode: u32) -> Model {
        let mut model = Model {
            root: Dir {
                children: BTreeMap::new(),
                mode: root_mode,
                xattrs: BTreeMap::new(),
                has_lower: true,
            },
            objs: Vec::new(),
            fds: [None; ops::FD_SLOTS],
        };
        // Layer 0 is the upper layer, the lowers follow.
        let layers: Vec<GeneratedLayer> = scenario.layers_top_down().into_iter().cloned().collect();
        let all: Vec<usize> = (0..layers.len()).collect();
        let mut ids: BTreeMap<(usize, Vec<&'static str>), ObjId> = BTreeMap::new();
        let children = model.merge_dir(&layers, &all, &[], &mut ids);
        model.root.children = children;
        model
    }

    /// Children of the directory at `at`, merged from `layers` (indices into
    /// `lowers`, top-down, each holding `at` as a directory; already cut at the
    /// first opaque one).
    fn merge_dir(
        &mut self,
        lowers: &[GeneratedLayer],
        layers: &[usize],
        at: &[&'static str],
        ids: &mut BTreeMap<(usize, Vec<&'static str>), ObjId>,
    ) -> BTreeMap<String, Node> {
        let mut names: Vec<&'static str> = Vec::new();
        for &l in layers {
            for path in lowers[l].entries.keys() {
                let comps: Vec<&'static str> = path.components().collect();
                if comps.len() == at.len() + 1 && comps[..at.len()] == *at {
                    names.push(path.name());
                }
            }
        }
        names.sort_unstable();
        names.dedup();
        let mut out = BTreeMap::new();
        for name in names {
            let mut here: Vec<&'static str> = at.to_vec();
            here.push(name);
            let mut dir_layers = Vec::new();
            let mut top_dir: Option<(u32, Option<u8>)> = None;
            let mut object: Option<(usize, &LowerEntry)> = None;
            for &l in layers {
                let Some(entry) = lowers[l].entries.get(&rel(&here)) else {
                    continue;
                };
                match entry {
                    LowerEntry::Whiteout(_) => break,
                    LowerEntry::Dir {
                        mode,
                        opaque,
                        xattr,
                    } => {
                        if top_dir.is_none() {
                            top_dir = Some((ops::mode_of(*mode), *xattr));
                        }
                        dir_layers.push(l);
                        if opaque.is_some() {
                            break;
                        }
                    }
                    _ => {
                        // A non-directory shows only when nothing above it did; below
                        // a directory it is hidden, and it hides what is below it.
                        if dir_layers.is_empty() {
                            object = Some((l, entry));
                        }
                        break;
                    }
                }
            }
            if let Some((mode, xattr)) = top_dir {
                let children = self.merge_dir(lowers, &dir_layers, &here, ids);
                out.insert(
                    name.to_string(),
                    Node::Dir(Dir {
                        children,
                        mode,
                        xattrs: xattr_map(xattr),
                        has_lower: dir_layers.iter().any(|l| *l != UPPER_LAYER),
                    }),
                );
            } else if let Some((l, entry)) = object {
                let id = self.lower_object(lowers, l, &here, entry, ids);
                out.insert(name.to_string(), Node::Obj(id));
            }
        }
        out
    }

    /// The model object of a lower non-directory; hard links of one layer share it.
    fn lower_object(
        &mut self,
        lowers: &[GeneratedLayer],
        layer: usize,
        at: &[&'static str],
        entry: &LowerEntry,
        ids: &mut BTreeMap<(usize, Vec<&'static str>), ObjId>,
    ) -> ObjId {
        let (canonical, entry) = match entry {
            LowerEntry::HardLink { to } => {
                let target = lowers[layer].entries.get(to).unwrap_or(entry);
                (to.components().collect::<Vec<_>>(), target)
            }
            _ => (at.to_vec(), entry),
        };
        if let Some(id) = ids.get(&(layer, canonical.clone())) {
            return *id;
        }
        let links = 1 + lowers[layer]
            .entries
            .values()
            .filter(|e| matches!(e, LowerEntry::HardLink { to } if to.components().eq(canonical.iter().copied())))
            .count() as u32;
        let obj = match entry {
            LowerEntry::File {
                len,
                byte,
                mode,
                xattr,
            } => Obj {
                content: Content::File(file_data(*len, *byte)),
                mode: ops::file_mode_of(*mode),
                xattrs: xattr_map(*xattr),
                nlink: links,
                lower: true,
            },
            LowerEntry::Symlink { target } => Obj {
                content: Content::Symlink(ops::symlink_target_of(*target).to_string()),
                mode: 0o777,
                xattrs: BTreeMap::new(),
                nlink: 1,
                lower: true,
            },
            // Normalized scenarios have no other non-directories.
            _ => Obj {
                content: Content::File(Vec::new()),
                mode: 0,
                xattrs: BTreeMap::new(),
                nlink: 1,
                lower: true,
            },
        };
        self.objs.push(obj);
        let id = self.objs.len() - 1;
        if layer == UPPER_LAYER {
            self.objs[id].lower = false;
        }
        ids.insert((layer, canonical), id);
        id
    }

    // ---- path walks (the VFS's part) ----

    /// The directory `comps` names, walking as path resolution does: a missing
    /// component is ENOENT, a file ENOTDIR, a symlink is followed (it dangles: ENOENT).
    fn dir(&self, comps: &[&str]) -> Result<&Dir, Errno> {
        let mut d = &self.root;
        for c in comps {
            d = match d.children.get(*c) {
                None => return Err(Errno::NOENT),
                Some(Node::Dir(sub)) => sub,
                Some(Node::Obj(id)) => match self.objs[*id].content {
                    Content::Symlink(_) => return Err(Errno::NOENT),
                    Content::File(_) => return Err(Errno::NOTDIR),
                },
            };
        }
        Ok(d)
    }

    fn dir_mut(&mut self, comps: &[&str]) -> Option<&mut Dir> {
        let mut d = &mut self.root;
        for c in comps {
            d = match d.children.get_mut(*c) {
                Some(Node::Dir(sub)) => sub,
                _ => return None,
            };
        }
        Some(d)
    }

    /// The entry at `path`, not following a final symlink (lstat).
    fn node(&self, path: &RelPath) -> Result<&Node, Errno> {
        self.dir(&path.parent())?
            .children
            .get(path.name())
            .ok_or(Errno::NOENT)
    }

    /// The entry at `path`, following a final symlink (open, truncate, chmod).
    fn node_follow(&self, path: &RelPath) -> Result<&Node, Errno> {
        match self.node(path)? {
            Node::Obj(id) if matches!(self.objs[*id].content, Content::Symlink(_)) => {
                Err(Errno::NOENT)
            }
            n => Ok(n),
        }
    }

    fn node_mut(&mut self, path: &RelPath) -> Option<&mut Node> {
        self.dir_mut(&path.parent())?.children.get_mut(path.name())
    }

    /// Copies up the object at `path` when it is still the lower one (what the first
    /// change through a name does). Directories need nothing: their identity never
    /// changes.
    fn copy_up(&mut self, path: &RelPath) {
        if let Some(Node::Obj(id)) = self.node_mut(path).map(|n| n.clone()) {
            self.link_up(id);
        }
    }

    /// A lower object becomes the upper one: the same object under all its names,
    /// wherever they are now, with the link count it showed (kernel overlayfs'
    /// index keeps it the same way). Descriptors opened before keep reading it (as
    /// with kernel overlayfs since 4.19).
    fn link_up(&mut self, id: ObjId) {
        self.objs[id].lower = false;
    }

    fn insert(&mut self, path: &RelPath, node: Node) {
        if let Some(d) = self.dir_mut(&path.parent()) {
            d.children.insert(path.name().to_string(), node);
        }
    }

    fn new_obj(&mut self, content: Content, mode: u32) -> ObjId {
        self.objs.push(Obj {
            content,
            mode,
            xattrs: BTreeMap::new(),
            nlink: 1,
            lower: false,
        });
        self.objs.len() - 1
    }

    /// Drops one name of a node that was just unlinked or replaced. Its other names
    /// count one less; a lower object stays lower (nothing is copied up by it), so a
    /// name hidden from the start still counts until a change copies the group up.
    fn unlinked(&mut self, node: &Node) {
        if let Node::Obj(id) = node {
            let o = &mut self.objs[*id];
            // A lower count is never shown below one while a name shows it.
            let least = u32::from(o.lower);
            o.nlink = o.nlink.saturating_sub(1).max(least);
        }
    }

    /// Checks that `path` is free for a new entry in an existing directory.
    fn new_name(&self, path: &RelPath) -> Result<(), Errno> {
        match self.dir(&path.parent())?.children.get(path.name()) {
            Some(_) => Err(Errno::EXIST),
            None => Ok(()),
        }
    }

    // ---- operations ----

    pub fn apply(&mut self, op: &Op) -> OpResult {
        match op {
            Op::Create { path, mode } => {
                self.new_name(path)?;
                let id = self.new_obj(Content::File(Vec::new()), ops::file_mode_of(*mode));
                self.insert(path, Node::Obj(id));
                Ok(Outcome::Done)
            }
            Op::Mkdir { path, mode } => {
                self.new_name(path)?;
                self.insert(
                    path,
                    Node::Dir(Dir {
                        children: BTreeMap::new(),
                        mode: ops::mode_of(*mode),
                        xattrs: BTreeMap::new(),
                        has_lower: false,
                    }),
                );
                Ok(Outcome::Done)
            }
            Op::Symlink { path, target } => {
                self.new_name(path)?;
                let t = ops::symlink_target_of(*target).to_string();
                let id = self.new_obj(Content::Symlink(t), 0o777);
                self.insert(path, Node::Obj(id));
                Ok(Outcome::Done)
            }
            Op::Link { from, to } => {
                let src = self.node(from)?.clone();
                self.new_name(to)?;
                if let Node::Dir(_) = src {
                    return Err(Errno::PERM);
                }
                self.copy_up(from);
                let Ok(Node::Obj(id)) = self.node(from).cloned() else {
                    return Err(Errno::IO);
                };
                self.objs[id].nlink += 1;
                self.insert(to, Node::Obj(id));
                Ok(Outcome::Done)
            }
            Op::Write {
                path,
                offset,
                len,
                byte,
            } => {
                self.regular_file(path)?;
                self.copy_up(path);
                let data = Op::write_data(*len, *byte);
                let off = ops::write_offset(*offset) as usize;
                self.with_file(path, |f| write_at(f, off, &data));
                Ok(Outcome::Done)
            }
            Op::Truncate { path, size } => {
                self.regular_file(path)?;
                self.copy_up(path);
                let size = ops::truncate_size(*size) as usize;
                self.with_file(path, |f| f.resize(size, 0));
                Ok(Outcome::Done)
            }
            Op::Read { path } => {
                let id = self.regular_file(path)?;
                match &self.objs[id].content {
                    Content::File(d) => Ok(Outcome::Data(d.clone())),
                    Content::Symlink(_) => Err(Errno::NOENT),
                }
            }
            Op::Stat { path } => Ok(Outcome::Stat(self.stat_of(self.node(path)?))),
            Op::Readlink { path } => match self.node(path)? {
                Node::Obj(id) => match &self.objs[*id].content {
                    Content::Symlink(t) => Ok(Outcome::Target(t.clone())),
                    Content::File(_) => Err(Errno::INVAL),
                },
                Node::Dir(_) => Err(Errno::INVAL),
            },
            Op::Readdir { path } => {
                let d = match path {
                    None => &self.root,
                    Some(path) => match self.node_follow(path)? {
                        Node::Dir(d) => d,
                        Node::Obj(_) => return Err(Errno::NOTDIR),
                    },
                };
                Ok(Outcome::Names(d.children.keys().cloned().collect()))
            }
            Op::Unlink { path } => {
                match self.node(path)? {
                    Node::Dir(_) => return Err(Errno::ISDIR),
                    Node::Obj(_) => {}
                }
                let removed = self.remove(path);
                self.unlinked(&removed);
                Ok(Outcome::Done)
            }
            Op::Rmdir { path } => {
                match self.node(path)? {
                    Node::Obj(_) => return Err(Errno::NOTDIR),
                    Node::Dir(d) if !d.children.is_empty() => return Err(Errno::NOTEMPTY),
                    Node::Dir(_) => {}
                }
                self.remove(path);
                Ok(Outcome::Done)
            }
            Op::Rename { from, to, flag } => self.rename(from, to, *flag),
            Op::Chmod { path, mode } => {
                self.node_follow(path)?;
                self.copy_up(path);
                let mode = ops::mode_of(*mode);
                match self.node_mut(path) {
                    Some(Node::Dir(d)) => d.mode = mode,
                    Some(Node::Obj(id)) => {
                        let id = *id;
                        self.objs[id].mode = mode;
                    }
                    None => return Err(Errno::IO),
                }
                Ok(Outcome::Done)
            }
            Op::SetXattr { path, name, value } => {
                self.xattr_target(path)?;
                self.copy_up(path);
                let (name, value) = (ops::xattr_name_of(*name), ops::xattr_value_of(*value));
                if let Some(x) = self.xattrs_mut(path) {
                    x.insert(name.to_string(), value.to_vec());
                }
                Ok(Outcome::Done)
            }
            Op::RemoveXattr { path, name } => {
                let name = ops::xattr_name_of(*name);
                if !self.xattr_target(path)?.contains_key(name) {
                    return Err(Errno::NODATA);
                }
                self.copy_up(path);
                if let Some(x) = self.xattrs_mut(path) {
                    x.remove(name);
                }
                Ok(Outcome::Done)
            }
            Op::Open { slot, path, write } => {
                let slot = ops::slot_of(*slot);
                self.fds[slot] = None;
                let target = match self.node_follow(path)? {
                    Node::Dir(_) if *write => return Err(Errno::ISDIR),
                    Node::Dir(_) => FdTarget::Dir,
                    Node::Obj(_) => {
                        if *write {
                            self.copy_up(path);
                        }
                        match self.node_follow(path)? {
                            Node::Obj(id) => FdTarget::Obj(*id),
                            Node::Dir(_) => FdTarget::Dir,
                        }
                    }
                };
                self.fds[slot] = Some(Fd {
                    target,
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
                let fd = self.fds[ops::slot_of(*slot)].ok_or(Errno::BADF)?;
                let FdTarget::Obj(id) = fd.target else {
                    return Err(Errno::BADF);
                };
                if !fd.write {
                    return Err(Errno::BADF);
                }
                let data = Op::write_data(*len, *byte);
                let off = ops::write_offset(*offset) as usize;
                if let Content::File(f) = &mut self.objs[id].content {
                    write_at(f, off, &data);
                }
                Ok(Outcome::Done)
            }
            Op::FdRead { slot } => {
                let fd = self.fds[ops::slot_of(*slot)].ok_or(Errno::BADF)?;
                if fd.write {
                    return Err(Errno::BADF);
                }
                match fd.target {
                    FdTarget::Dir => Err(Errno::ISDIR),
                    FdTarget::Obj(id) => match &self.objs[id].content {
                        Content::File(d) => Ok(Outcome::Data(d.clone())),
                        Content::Symlink(_) => Err(Errno::IO),
                    },
                }
            }
            Op::Close { slot } => self.fds[ops::slot_of(*slot)]
                .take()
                .map(|_| Outcome::Done)
                .ok_or(Errno::BADF),
            Op::Remount => {
                self.fds = [None; ops::FD_SLOTS];
                Ok(Outcome::Done)
            }
        }
    }

    /// The regular file at `path` (following a final symlink) for open(2) and
    /// truncate(2): a directory is EISDIR.
    fn regular_file(&self, path: &RelPath) -> Result<ObjId, Errno> {
        match self.node_follow(path)? {
            Node::Dir(_) => Err(Errno::ISDIR),
            Node::Obj(id) => Ok(*id),
        }
    }

    fn with_file(&mut self, path: &RelPath, f: impl FnOnce(&mut Vec<u8>)) {
        if let Some(Node::Obj(id)) = self.node(path).ok().cloned() {
            if let Content::File(data) = &mut self.objs[id].content {
                f(data);
            }
        }
    }

    /// The xattrs of the entry at `path` for l*xattr(2): user.* xattrs exist only on
    /// regular files and directories, elsewhere changing one is EPERM.
    fn xattr_target(&self, path: &RelPath) -> Result<&BTreeMap<String, Vec<u8>>, Errno> {
        match self.node(path)? {
            Node::Dir(d) => Ok(&d.xattrs),
            Node::Obj(id) => match self.objs[*id].content {
                Content::File(_) => Ok(&self.objs[*id].xattrs),
                Content::Symlink(_) => Err(Errno::PERM),
            },
        }
    }

    fn xattrs_mut(&mut self, path: &RelPath) -> Option<&mut BTreeMap<String, Vec<u8>>> {
        if let Ok(Node::Obj(id)) = self.node(path) {
            let id = *id;
            return Some(&mut self.objs[id].xattrs);
        }
        match self.node_mut(path)? {
            Node::Dir(d) => Some(&mut d.xattrs),
            Node::Obj(_) => None,
        }
    }

    fn remove(&mut self, path: &RelPath) -> Node {
        self.dir_mut(&path.parent())
            .and_then(|d| d.children.remove(path.name()))
            .unwrap_or(Node::Obj(usize::MAX))
    }

    fn stat_of(&self, node: &Node) -> StatView {
        match node {
            Node::Dir(d) => StatView {
                kind: Kind::Dir,
                perm: Some(d.mode),
                size: None,
                nlink: None,
            },
            Node::Obj(id) => {
                let o = &self.objs[*id];
                match &o.content {
                    Content::File(data) => StatView {
                        kind: Kind::File,
                        perm: Some(o.mode),
                        size: Some(data.len() as u64),
                        nlink: Some(o.nlink),
                    },
                    Content::Symlink(t) => StatView {
                        kind: Kind::Symlink,
                        perm: None,
                        size: Some(t.len() as u64),
                        nlink: Some(o.nlink),
                    },
                }
            }
        }
    }

    /// rename(2) and renameat2(2), checks in the kernel's order: both parents, the
    /// source, the flags, the ancestry traps, same-object no-op, type mismatch, then
    /// the filesystem's own answers (directory move policy, ENOTEMPTY).
    fn rename(&mut self, from: &RelPath, to: &RelPath, flag: RenameFlag) -> OpResult {
        self.dir(&from.parent())?;
        self.dir(&to.parent())?;
        let src = self.node(from)?.clone();
        let dst = self.node(to).ok().cloned();
        ops::rename_vfs_checks(from, to, flag, dst.is_some())?;
        let same_object = match (&src, &dst) {
            (Node::Obj(a), Some(Node::Obj(b))) => a == b,
            _ => from == to,
        };
        if same_object {
            return Ok(Outcome::Done);
        }
        if let (Some(d), true) = (&dst, flag != RenameFlag::Exchange) {
            match (&src, d) {
                (Node::Dir(_), Node::Obj(_)) => return Err(Errno::NOTDIR),
                (Node::Obj(_), Node::Dir(_)) => return Err(Errno::ISDIR),
                _ => {}
            }
        }
        let blocked = |n: &Node| matches!(n, Node::Dir(d) if d.has_lower);
        if blocked(&src) || (flag == RenameFlag::Exchange && dst.as_ref().is_some_and(blocked)) {
            if let Some(e) = lower_dir_rename_errno() {
                return Err(e);
            }
        }
        if let (Some(Node::Dir(d)), true) = (&dst, flag != RenameFlag::Exchange) {
            if !d.children.is_empty() {
                return Err(Errno::NOTEMPTY);
            }
        }
        self.copy_up(from);
        if flag == RenameFlag::Exchange {
            self.copy_up(to);
            let a = self.remove(from);
            let b = self.remove(to);
            self.insert(from, b);
            self.insert(to, a);
        } else {
            let moved = self.remove(from);
            if dst.is_some() {
                let replaced = self.remove(to);
                self.unlinked(&replaced);
            }
            self.insert(to, moved);
        }
        Ok(Outcome::Done)
    }

    // ---- whole-tree view ----

    pub fn snapshot(&self) -> Snapshot {
        let mut snap = Snapshot::default();
        snap.entries.insert(
            String::new(),
            SnapEntry {
                kind: Kind::Dir,
                perm: Some(self.root.mode),
                data: Vec::new(),
                xattrs: self.root.xattrs.clone(),
            },
        );
        self.snap_dir(&self.root, "", &mut snap);
        snap
    }

    fn snap_dir(&self, d: &Dir, at: &str, snap: &mut Snapshot) {
        for (name, node) in &d.children {
            let path = if at.is_empty() {
                name.clone()
            } else {
                format!("{at}/{name}")
            };
            match node {
                Node::Dir(sub) => {
                    snap.entries.insert(
                        path.clone(),
                        SnapEntry {
                            kind: Kind::Dir,
                            perm: Some(sub.mode),
                            data: Vec::new(),
                            xattrs: sub.xattrs.clone(),
                        },
                    );
                    self.snap_dir(sub, &path, snap);
                }
                Node::Obj(id) => {
                    let o = &self.objs[*id];
                    let entry = match &o.content {
                        Content::File(data) => SnapEntry {
                            kind: Kind::File,
                            perm: Some(o.mode),
                            data: data.clone(),
                            xattrs: o.xattrs.clone(),
                        },
                        Content::Symlink(t) => SnapEntry {
                            kind: Kind::Symlink,
                            perm: None,
                            data: t.as_bytes().to_vec(),
                            xattrs: BTreeMap::new(),
                        },
                    };
                    snap.entries.insert(path.clone(), entry);
                    snap.identity.insert(path, *id as u64);
                }
            }
        }
    }
}

/// pwrite(2) on file content: extends with zeros as needed; writing nothing changes
/// nothing.
fn write_at(f: &mut Vec<u8>, off: usize, data: &[u8]) {
    if data.is_empty() {
        return;
    }
    if f.len() < off + data.len() {
        f.resize(off + data.len(), 0);
    }
    f[off..off + data.len()].copy_from_slice(data);
}

fn rel(comps: &[&str]) -> RelPath {
    ops::p(&comps.join("/"))
}

fn xattr_map(xattr: Option<u8>) -> BTreeMap<String, Vec<u8>> {
    xattr
        .map(|v| {
            (
                ops::xattr_name_of(v).to_string(),
                ops::xattr_value_of(v).to_vec(),
            )
        })
        .into_iter()
        .collect()
}

/// Differences between two snapshots, one line each (empty when they agree).
/// Identity is compared as a partition: two paths are one object in `a` exactly
/// when they are in `b`.
pub fn diff_snapshots(expected: &Snapshot, got: &Snapshot) -> Vec<String> {
    let mut out = Vec::new();
    for (path, e) in &expected.entries {
        match got.entries.get(path) {
            None => out.push(format!("/{path}: missing (expected {e:?})")),
            Some(g) if g != e => out.push(format!("/{path}: expected {e:?}, got {g:?}")),
            _ => {}
        }
    }
    for (path, g) in &got.entries {
        if !expected.entries.contains_key(path) {
            out.push(format!("/{path}: unexpected {g:?}"));
        }
    }
    let paths: Vec<&String> = expected
        .identity
        .keys()
        .filter(|p| got.identity.contains_key(*p))
        .collect();
    for (i, a) in paths.iter().enumerate() {
        for b in &paths[i + 1..] {
            let want = expected.identity[*a] == expected.identity[*b];
            let have = got.identity[*a] == got.identity[*b];
            if want != have {
                out.push(format!(
                    "/{a} and /{b}: expected {} object, got {}",
                    if want { "one" } else { "two different" },
                    if have {
                        "one (same st_ino)"
                    } else {
                        "two (st_ino differ)"
                    }
                ));
            }
        }
    }
    out
}
