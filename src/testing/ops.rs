//! The operations the model test and the `ops` fuzz target apply, over a tiny name
//! alphabet and a shallow tree so that names collide often: most interesting bugs
//! need an operation to meet an entry some earlier operation or a lower layer made.
//!
//! Every field is a small index interpreted modulo its table, so any value that
//! `arbitrary` or proptest produces is a valid operation, and a shrunk failure reads
//! as plain Rust (`Debug` of a path is `p("a/b")`, see [`p`]).

use std::fmt;

use crate::union::Errno;
use arbitrary::{Arbitrary, Unstructured};
use proptest::prelude::*;

/// File names an operation may use. Three names at three depths give 39 paths.
pub const NAMES: [&str; 3] = ["a", "b", "c"];
pub const MAX_DEPTH: usize = 3;
/// Symlink targets: plain names never in [`NAMES`], so every symlink dangles and a
/// path walk through one answers ENOENT, the same on the engine and on any mount.
pub const SYMLINK_TARGETS: [&str; 2] = ["t0", "t1"];
/// Permission bits an operation may set: all keep the owner's rwx (a non-root runner
/// must still be able to enter and change what it made) and no group/other write
/// bit (so a umask of 022 on a real mount changes nothing).
pub const MODES: [u32; 4] = [0o755, 0o700, 0o711, 0o750];
/// Permission bits of new files.
pub const FILE_MODES: [u32; 3] = [0o644, 0o600, 0o755];
pub const XATTR_NAMES: [&str; 2] = ["user.x", "user.y"];
pub const XATTR_VALUES: [&[u8]; 3] = [b"v0", b"value-1", b""];
/// Bounds of write offsets/lengths and truncate sizes: small, so that writes overlap,
/// extend and punch past each other and past truncations.
pub const MAX_OFFSET: u8 = 24;
pub const MAX_WRITE: u8 = 8;
pub const MAX_SIZE: u8 = 32;
/// Descriptors an operation sequence may hold open at once.
pub const FD_SLOTS: usize = 2;

pub fn slot_of(slot: u8) -> usize {
    slot as usize % FD_SLOTS
}

/// A relative path of 1..=MAX_DEPTH components, each an index into [`NAMES`].
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RelPath(Vec<u8>);

/// The checks the VFS makes on rename(2)/renameat2(2) once both names are resolved,
/// before the filesystem is asked: the flags against the destination, then moving a
/// directory into itself (EINVAL) or over its own ancestor (ENOTEMPTY; EINVAL for an
/// exchange). Shared by the model and by the runner, which stands in for the VFS.
pub fn rename_vfs_checks(
    from: &RelPath,
    to: &RelPath,
    flag: RenameFlag,
    dst_exists: bool,
) -> Result<(), Errno> {
    match (flag, dst_exists) {
        (RenameFlag::NoReplace, true) => return Err(Errno::EXIST),
        (RenameFlag::Exchange, false) => return Err(Errno::NOENT),
        _ => {}
    }
    if from.is_ancestor_of(to) {
        return Err(Errno::INVAL);
    }
    if to.is_ancestor_of(from) {
        return Err(if flag == RenameFlag::Exchange {
            Errno::INVAL
        } else {
            Errno::NOTEMPTY
        });
    }
    Ok(())
}

/// The path "a/b/c" (components must be in [`NAMES`]): how regression tests spell
/// paths. Test code only: a name outside [`NAMES`] is a bug in the test and panics.
pub fn p(s: &str) -> RelPath {
    RelPath(
        s.split('/')
            .map(|c| {
                NAMES
                    .iter()
                    .position(|n| *n == c)
                    .unwrap_or_else(|| panic!("{c:?} is not in NAMES")) as u8
            })
            .collect(),
    )
}

impl RelPath {
    pub fn from_indices(idx: &[u8]) -> Option<RelPath> {
        if idx.is_empty() || idx.len() > MAX_DEPTH {
            return None;
        }
        Some(RelPath(idx.iter().map(|i| i % NAMES.len() as u8).collect()))
    }

    pub fn components(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.0.iter().map(|i| NAMES[*i as usize % NAMES.len()])
    }

    pub fn name(&self) -> &'static str {
        NAMES[*self.0.last().unwrap_or(&0) as usize % NAMES.len()]
    }

    /// Components of the parent directory (empty for a name in the root).
    pub fn parent(&self) -> Vec<&'static str> {
        let mut c: Vec<_> = self.components().collect();
        c.pop();
        c
    }

    pub fn depth(&self) -> usize {
        self.0.len()
    }

    /// Whether `self` is a proper ancestor of `other`.
    pub fn is_ancestor_of(&self, other: &RelPath) -> bool {
        other.0.len() > self.0.len() && other.0.starts_with(&self.0)
    }

    pub fn with_child(&self, idx: u8) -> Option<RelPath> {
        let mut v = self.0.clone();
        v.push(idx);
        RelPath::from_indices(&v)
    }

    pub fn to_path_string(&self) -> String {
        self.components().collect::<Vec<_>>().join("/")
    }
}

impl fmt::Debug for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "p({:?})", self.to_path_string())
    }
}

impl<'a> Arbitrary<'a> for RelPath {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        let depth = u.int_in_range(1..=MAX_DEPTH as u8)? as usize;
        let mut v = Vec::with_capacity(depth);
        for _ in 0..depth {
            v.push(u.int_in_range(0..=NAMES.len() as u8 - 1)?);
        }
        Ok(RelPath(v))
    }
}

/// rename(2) flavours.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Arbitrary)]
pub enum RenameFlag {
    Replace,
    NoReplace,
    Exchange,
}

/// One system call as a user of the mount makes it (path-based, like the shell).
/// `u8` fields index the tables above (modulo their length).
#[derive(Debug, Clone, PartialEq, Eq, Arbitrary)]
pub enum Op {
    /// open(O_CREAT|O_EXCL|O_WRONLY) and close.
    Create {
        path: RelPath,
        mode: u8,
    },
    Mkdir {
        path: RelPath,
        mode: u8,
    },
    Symlink {
        path: RelPath,
        target: u8,
    },
    /// link(2) (does not follow a symlink `from`).
    Link {
        from: RelPath,
        to: RelPath,
    },
    /// open(O_WRONLY), pwrite of `len` copies of `byte` at `offset`, close.
    Write {
        path: RelPath,
        offset: u8,
        len: u8,
        byte: u8,
    },
    Truncate {
        path: RelPath,
        size: u8,
    },
    /// open(O_RDONLY), read to the end, close.
    Read {
        path: RelPath,
    },
    /// lstat(2).
    Stat {
        path: RelPath,
    },
    Readlink {
        path: RelPath,
    },
    /// opendir + readdir; `None` is the root.
    Readdir {
        path: Option<RelPath>,
    },
    Unlink {
        path: RelPath,
    },
    Rmdir {
        path: RelPath,
    },
    Rename {
        from: RelPath,
        to: RelPath,
        flag: RenameFlag,
    },
    Chmod {
        path: RelPath,
        mode: u8,
    },
    /// lsetxattr(2).
    SetXattr {
        path: RelPath,
        name: u8,
        value: u8,
    },
    /// lremovexattr(2).
    RemoveXattr {
        path: RelPath,
        name: u8,
    },
    /// open(2) into descriptor slot `slot` (closing what it held): O_WRONLY when
    /// `write`, else O_RDONLY (which a directory accepts too).
    Open {
        slot: u8,
        path: RelPath,
        write: bool,
    },
    /// pwrite through a slot.
    FdWrite {
        slot: u8,
        offset: u8,
        len: u8,
        byte: u8,
    },
    /// Read a slot's file to the end with pread.
    FdRead {
        slot: u8,
    },
    Close {
        slot: u8,
    },
    /// Close every descriptor, unmount and mount the same directories again.
    Remount,
}

impl Op {
    pub fn write_data(len: u8, byte: u8) -> Vec<u8> {
        vec![byte; (len % (MAX_WRITE + 1)) as usize]
    }
}

pub fn write_offset(offset: u8) -> u64 {
    (offset % (MAX_OFFSET + 1)) as u64
}

pub fn truncate_size(size: u8) -> u64 {
    (size % (MAX_SIZE + 1)) as u64
}

pub fn mode_of(idx: u8) -> u32 {
    MODES[idx as usize % MODES.len()]
}

pub fn file_mode_of(idx: u8) -> u32 {
    FILE_MODES[idx as usize % FILE_MODES.len()]
}

pub fn symlink_target_of(idx: u8) -> &'static str {
    SYMLINK_TARGETS[idx as usize % SYMLINK_TARGETS.len()]
}

pub fn xattr_name_of(idx: u8) -> &'static str {
    XATTR_NAMES[idx as usize % XATTR_NAMES.len()]
}

pub fn xattr_value_of(idx: u8) -> &'static [u8] {
    XATTR_VALUES[idx as usize % XATTR_VALUES.len()]
}

/// Paths, shallow ones more often (they are where layers and operations meet).
pub fn rel_path() -> impl Strategy<Value = RelPath> {
    let comp = 0..NAMES.len() as u8;
    prop_oneof![
        3 => prop::collection::vec(comp.clone(), 1..=1),
        3 => prop::collection::vec(comp.clone(), 2..=2),
        1 => prop::collection::vec(comp, 3..=MAX_DEPTH),
    ]
    .prop_map(RelPath)
}

fn rename_flag() -> impl Strategy<Value = RenameFlag> {
    prop_oneof![
        4 => Just(RenameFlag::Replace),
        1 => Just(RenameFlag::NoReplace),
        1 => Just(RenameFlag::Exchange),
    ]
}

/// One operation, weighted towards the namespace changes that need the most care.
pub fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (rel_path(), any::<u8>()).prop_map(|(path, mode)| Op::Create { path, mode }),
        3 => (rel_path(), any::<u8>()).prop_map(|(path, mode)| Op::Mkdir { path, mode }),
        1 => (rel_path(), any::<u8>()).prop_map(|(path, target)| Op::Symlink { path, target }),
        2 => (rel_path(), rel_path()).prop_map(|(from, to)| Op::Link { from, to }),
        3 => (rel_path(), 0..=MAX_OFFSET, 0..=MAX_WRITE, any::<u8>())
            .prop_map(|(path, offset, len, byte)| Op::Write { path, offset, len, byte }),
        2 => (rel_path(), 0..=MAX_SIZE).prop_map(|(path, size)| Op::Truncate { path, size }),
        2 => rel_path().prop_map(|path| Op::Read { path }),
        2 => rel_path().prop_map(|path| Op::Stat { path }),
        1 => rel_path().prop_map(|path| Op::Readlink { path }),
        2 => prop::option::weighted(0.7, rel_path()).prop_map(|path| Op::Readdir { path }),
        3 => rel_path().prop_map(|path| Op::Unlink { path }),
        3 => rel_path().prop_map(|path| Op::Rmdir { path }),
        4 => (rel_path(), rel_path(), rename_flag())
            .prop_map(|(from, to, flag)| Op::Rename { from, to, flag }),
        1 => (rel_path(), any::<u8>()).prop_map(|(path, mode)| Op::Chmod { path, mode }),
        1 => (rel_path(), any::<u8>(), any::<u8>())
            .prop_map(|(path, name, value)| Op::SetXattr { path, name, value }),
        1 => (rel_path(), any::<u8>()).prop_map(|(path, name)| Op::RemoveXattr { path, name }),
        2 => (any::<u8>(), rel_path(), any::<bool>())
            .prop_map(|(slot, path, write)| Op::Open { slot, path, write }),
        2 => (any::<u8>(), 0..=MAX_OFFSET, 0..=MAX_WRITE, any::<u8>())
            .prop_map(|(slot, offset, len, byte)| Op::FdWrite { slot, offset, len, byte }),
        2 => any::<u8>().prop_map(|slot| Op::FdRead { slot }),
        1 => any::<u8>().prop_map(|slot| Op::Close { slot }),
        1 => Just(Op::Remount),
    ]
}
