//! The inode table: numbers handed to the kernel and what each one stands for.
//!
//! Invariants:
//! - An inode number is also the st_ino users see. It is derived from the real
//!   object's (filesystem index, ino) so that it is stable across remounts; when that
//!   number is taken by a live inode of another identity, one from the reserved high
//!   range is used instead.
//! - A number stays in the table until the kernel forgets it (lookup count 0), so the
//!   kernel never sees a number reused for a different object while it holds it.
//! - `identity` maps every real object an inode stands for ((dev, ino) of its lower
//!   origin and of its upper copy) to the inode, so hard links and copied-up files
//!   resolve to one inode.
//! - Lock order: an inode's `copy_up` mutex may be held while taking its parent's
//!   (always towards the root, so no cycle); `state` locks are never held across a
//!   call that takes another inode's lock.

use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use dashmap::DashMap;
use parking_lot::{Mutex, RwLock};

use crate::layer::LayerIdx;

pub type Ino = u64;
pub const ROOT_INO: Ino = 1;

/// Numbers at or above this are allocated sequentially when a derived number collides.
const RESERVED_BASE: Ino = 1 << 63;

/// One layer in which an entry is present.
#[derive(Clone)]
pub struct LayerRef {
    pub layer: LayerIdx,
    /// Directories only: an O_PATH handle on this layer's directory. `None` when the
    /// fd budget was exhausted; it is then re-opened from the parent on use.
    pub fd: Option<Arc<OwnedFd>>,
}

pub struct InodeState {
    /// The name through which the entry was last reached: copy-up and name-relative
    /// syscalls use it. Root: (ROOT_INO, "").
    pub parent: Ino,
    pub name: OsString,
    /// Layers holding the entry, top-down. Directories: every layer merged into the
    /// view (stopping at an opaque one). Non-directories: exactly one.
    pub layers: Vec<LayerRef>,
    /// Identity keys registered for this inode in `InodeTable::identity`.
    pub keys: Vec<(u64, u64)>,
    /// Set once the entry's last known name was removed through the mount: the
    /// name no longer leads to it. `pinned` then keeps the object reachable for
    /// fstat-style getattr while the kernel still holds the inode.
    pub detached: bool,
    pub pinned: Option<Arc<OwnedFd>>,
    /// Directories moved through the mount (or found so): the absolute path, in the
    /// lower layers, of the content merged under them. Their layers below the top one
    /// sit at this path rather than at `parent/name`.
    pub redirect: Option<OsString>,
}

impl InodeState {
    /// The handle on a detached entry's object, if it was pinned.
    pub fn pinned_if_detached(&self) -> Option<Arc<OwnedFd>> {
        if self.detached {
            self.pinned.clone()
        } else {
            None
        }
    }

    pub fn top_layer(&self) -> Option<LayerIdx> {
        self.layers.first().map(|l| l.layer)
    }
}

pub struct Inode {
    pub ino: Ino,
    /// S_IFMT bits; an inode never changes type.
    pub kind: u32,
    lookups: AtomicU64,
    pub open_count: AtomicU32,
    pub state: RwLock<InodeState>,
    /// Serialises copy-up of this entry.
    pub copy_up: Mutex<()>,
}

impl Inode {
    pub fn is_dir(&self) -> bool {
        self.kind == libc::S_IFDIR
    }

    /// Records that `parent/name` was removed, if that is the name this inode was
    /// last reached by; `pinned` keeps the object reachable for fstat-style getattr.
    pub fn detach_if_named(
        &self,
        parent: Ino,
        name: &std::ffi::OsStr,
        pinned: Option<Arc<OwnedFd>>,
    ) {
        let mut st = self.state.write();
        if st.parent == parent && st.name == name {
            st.detached = true;
            st.pinned = pinned;
        }
    }
}

#[derive(Default)]
pub struct InodeTable {
    inodes: DashMap<Ino, Arc<Inode>>,
    identity: DashMap<(u64, u64), Ino>,
    next_reserved: AtomicU64,
    /// Directory O_PATH handles currently cached in inode states.
    pub dir_fds: AtomicU64,
}

impl InodeTable {
    pub fn get(&self, ino: Ino) -> Option<Arc<Inode>> {
        self.inodes.get(&ino).map(|e| e.value().clone())
    }

    pub fn by_identity(&self, key: (u64, u64)) -> Option<Arc<Inode>> {
        let ino = *self.identity.get(&key)?;
        self.get(ino)
    }

    pub fn add_identity(&self, inode: &Inode, key: (u64, u64)) {
        self.identity.insert(key, inode.ino);
        let mut st = inode.state.write();
        if !st.keys.contains(&key) {
            st.keys.push(key);
        }
    }

    pub fn remove_identity(&self, inode: &Inode, key: (u64, u64)) {
        self.identity.remove_if(&key, |_, v| *v == inode.ino);
        inode.state.write().keys.retain(|k| *k != key);
    }

    /// Inserts a new inode, preferring `preferred` as its number. The new inode
    /// starts with one lookup (the one that created it).
    pub fn insert(&self, preferred: Ino, kind: u32, state: InodeState) -> Arc<Inode> {
        let keys = state.keys.clone();
        let mut ino = preferred;
        // A derived number is used only below RESERVED_BASE; after a collision every
        // allocated (reserved) number is usable, or the loop would never end.
        let mut usable = ino != 0 && ino < RESERVED_BASE || ino == ROOT_INO;
        loop {
            if usable {
                if let dashmap::Entry::Vacant(slot) = self.inodes.entry(ino) {
                    let inode = Arc::new(Inode {
                        ino,
                        kind,
                        lookups: AtomicU64::new(1),
                        open_count: AtomicU32::new(0),
                        state: RwLock::new(state),
                        copy_up: Mutex::new(()),
                    });
                    slot.insert(inode.clone());
                    for key in keys {
                        self.identity.insert(key, ino);
                    }
                    return inode;
                }
            }
            ino = RESERVED_BASE + self.next_reserved.fetch_add(1, Ordering::Relaxed);
            usable = true;
        }
    }

    pub fn add_lookup(&self, inode: &Inode) {
        inode.lookups.fetch_add(1, Ordering::AcqRel);
    }

    /// Finds the inode standing for `key` and takes a kernel reference on it. The
    /// count is raised while the table's shard guard is held, so a concurrent
    /// `forget` either sees the new reference or has already removed the inode
    /// (and then `None` is returned and the caller makes a fresh one).
    pub fn reference_by_identity(&self, key: (u64, u64)) -> Option<Arc<Inode>> {
        let ino = *self.identity.get(&key)?;
        let guard = self.inodes.get(&ino)?;
        guard.value().lookups.fetch_add(1, Ordering::AcqRel);
        Some(guard.value().clone())
    }

    /// Drops `n` kernel references; removes the inode when none remain.
    pub fn forget(&self, ino: Ino, n: u64) {
        if ino == ROOT_INO {
            return;
        }
        let Some(inode) = self.get(ino) else { return };
        let prev = inode
            .lookups
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                Some(v.saturating_sub(n))
            })
            .unwrap_or(0);
        if prev > n {
            return;
        }
        // Removal re-checks the count under the map's shard lock: a lookup that
        // raced with this forget and found the inode keeps it alive.
        let removed = self
            .inodes
            .remove_if(&ino, |_, i| i.lookups.load(Ordering::Acquire) == 0);
        if let Some((_, inode)) = removed {
            let st = inode.state.read();
            for key in &st.keys {
                self.identity.remove_if(key, |_, v| *v == ino);
            }
            let cached = st.layers.iter().filter(|l| l.fd.is_some()).count() as u64;
            self.dir_fds.fetch_sub(cached, Ordering::Relaxed);
        }
    }

    pub fn len(&self) -> usize {
        self.inodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.inodes.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> InodeState {
        InodeState {
            parent: ROOT_INO,
            name: "f".into(),
            layers: Vec::new(),
            keys: Vec::new(),
            detached: false,
            pinned: None,
            redirect: None,
        }
    }

    /// Two live entries deriving the same number (an upper inode number reused while
    /// the kernel still holds the old entry): the second gets an allocated number.
    /// This used to spin forever inside a lookup.
    #[test]
    fn a_taken_or_unusable_number_falls_back_to_an_allocated_one() {
        let t = InodeTable::default();
        let a = t.insert(42, libc::S_IFREG, state());
        let b = t.insert(42, libc::S_IFREG, state());
        let c = t.insert(RESERVED_BASE + 7, libc::S_IFREG, state());
        let d = t.insert(0, libc::S_IFREG, state());
        assert_eq!(a.ino, 42);
        let fallback = [b.ino, c.ino, d.ino];
        assert!(fallback.iter().all(|i| *i >= RESERVED_BASE), "{fallback:?}");
        assert!(b.ino != c.ino && c.ino != d.ino && b.ino != d.ino);
        assert_eq!(t.get(b.ino).unwrap().ino, b.ino);
    }
}
