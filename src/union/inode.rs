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
//!   call that takes another inode's lock, nor the same one again (parking_lot
//!   read locks are not reentrant once a writer waits).

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use dashmap::DashMap;
use parking_lot::{Mutex, RwLock};
use smallvec::SmallVec;

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

/// The layers of a directory, top-down: one for most, so the first is kept inline.
pub type Layers = SmallVec<[LayerRef; 1]>;

/// Where an inode's content is, by kind of inode: each shape holds only what its
/// kind can have.
enum Content {
    /// Every layer merged into the view, top-down (stopping at an opaque one).
    Dir(Layers),
    /// A non-directory: the layer holding it, and for a metadata-only copy
    /// (metacopy.rs) the layer below still holding its data (`top` is then the
    /// upper copy).
    File {
        top: LayerRef,
        data: Option<LayerIdx>,
    },
}

impl Content {
    /// `layers` top-down, as lookup finds them: a non-directory needs one, and a
    /// second is its data layer.
    fn new(dir: bool, layers: impl IntoIterator<Item = LayerRef>) -> Option<Content> {
        let mut layers = layers.into_iter();
        if dir {
            return Some(Content::Dir(layers.collect()));
        }
        let top = layers.next()?;
        let data = layers.next().map(|l| l.layer);
        Some(Content::File { top, data })
    }

    fn upper_file(data: Option<LayerIdx>) -> Content {
        Content::File {
            top: LayerRef {
                layer: super::UPPER,
                fd: None,
            },
            data,
        }
    }

    /// The layers the entry's own name is in, top-down (a file's data layer is not:
    /// the data is reached through the metacopy's redirect).
    fn named_layers(&self) -> &[LayerRef] {
        match self {
            Content::Dir(layers) => layers,
            Content::File { top, .. } => std::slice::from_ref(top),
        }
    }

    fn named_layers_mut(&mut self) -> &mut [LayerRef] {
        match self {
            Content::Dir(layers) => layers,
            Content::File { top, .. } => std::slice::from_mut(top),
        }
    }
}
/// Identity keys (dev, ino) of an inode: usually one, kept inline.
pub type IdentityKeys = SmallVec<[(u64, u64); 1]>;

/// What an inode stands for. The fields that say where its content is (`layers`,
/// `redirect`, `keys`, `nlink_adjust`, `detached`/`pinned`) change only through
/// the methods below, each named for the event it records, so that the invariants
/// stated per field hold wherever the state is written (this file).
pub struct InodeState {
    /// The name through which the entry was last reached: copy-up and name-relative
    /// syscalls use it. Root: (ROOT_INO, "").
    parent: Ino,
    name: Box<OsStr>,
    /// The layers holding the entry; its shape is the inode's kind.
    content: Content,
    /// Identity keys registered for this inode in `InodeTable::identity`.
    keys: IdentityKeys,
    /// Set once the entry's last known name was removed through the mount: the
    /// name no longer leads to it. `pinned` then keeps the object reachable for
    /// fstat-style getattr while the kernel still holds the inode.
    detached: bool,
    pinned: Option<Arc<OwnedFd>>,
    /// Directories moved through the mount (or found so): the absolute path, in the
    /// lower layers, of the content merged under them. Their layers below the top one
    /// sit at this path rather than at `parent/name`.
    redirect: Option<Box<OsStr>>,
    /// Non-directories: the other names (hard links) the kernel reached the entry
    /// by, besides `parent`/`name`. Each led to the entry when recorded and is kept
    /// right by every rename and removal through the mount, so when `parent/name`
    /// goes, one of these takes its place: the kernel may keep reaching the object
    /// through any of its cached names, and name-relative calls must still find it.
    /// At most [`MAX_OTHER_NAMES`]; beyond that the oldest is forgotten (the pinned
    /// handle still reaches the object).
    other_names: OtherNames,
    /// Upper copies of lower hard-link groups: what the st_nlink shown adds to the
    /// copy's own (see origin.rs); written under `IndexedGroups::link_up`.
    nlink_adjust: i64,
}

/// Bound on the names remembered per hard-linked file: a layer or a client may make
/// thousands of links to one file, and every name costs memory on a hot inode.
const MAX_OTHER_NAMES: usize = 64;

/// The other names of a hard-linked file (see `InodeState::other_names`): one word
/// while empty, which it is for nearly every inode.
// The box is the point: `Option<Box<Vec>>` is one word where a `Vec` is three, and
// the list is empty for nearly every inode.
#[allow(clippy::box_collection)]
#[derive(Default)]
struct OtherNames(Option<Box<Vec<NameInParent>>>);

/// A name of an entry: its parent directory's inode and the name in it.
type NameInParent = (Ino, Box<OsStr>);

impl OtherNames {
    fn forget(&mut self, parent: Ino, name: &OsStr) {
        if let Some(v) = &mut self.0 {
            v.retain(|(p, n)| !(*p == parent && **n == *name));
            if v.is_empty() {
                self.0 = None;
            }
        }
    }

    /// Remembers `parent/name`, forgetting the oldest beyond [`MAX_OTHER_NAMES`].
    fn remember(&mut self, parent: Ino, name: Box<OsStr>) {
        let v = self.0.get_or_insert_with(Box::default);
        if v.len() >= MAX_OTHER_NAMES {
            v.remove(0);
        }
        v.push((parent, name));
    }

    /// The most recently remembered name, taken out.
    fn take_latest(&mut self) -> Option<NameInParent> {
        let v = self.0.as_mut()?;
        let latest = v.pop();
        if v.is_empty() {
            self.0 = None;
        }
        latest
    }
}

impl InodeState {
    /// The state of an entry of type `kind` (S_IFMT bits) found in `layers`,
    /// top-down. `None` for a non-directory with no layer: nothing to stand for.
    pub fn new(
        parent: Ino,
        name: OsString,
        kind: u32,
        layers: Vec<LayerRef>,
        keys: Vec<(u64, u64)>,
        redirect: Option<OsString>,
    ) -> Option<InodeState> {
        let content = Content::new(kind == libc::S_IFDIR, layers)?;
        Some(InodeState::with_content(
            parent, name, content, keys, redirect,
        ))
    }

    /// The state of a directory merging `layers`, top-down.
    pub fn new_dir(
        parent: Ino,
        name: OsString,
        layers: Vec<LayerRef>,
        keys: Vec<(u64, u64)>,
        redirect: Option<OsString>,
    ) -> InodeState {
        let content = Content::Dir(layers.into_iter().collect());
        InodeState::with_content(parent, name, content, keys, redirect)
    }

    fn with_content(
        parent: Ino,
        name: OsString,
        content: Content,
        keys: Vec<(u64, u64)>,
        redirect: Option<OsString>,
    ) -> InodeState {
        InodeState {
            parent,
            name: name.into_boxed_os_str(),
            content,
            keys: keys.into_iter().collect(),
            detached: false,
            pinned: None,
            redirect: redirect.map(OsString::into_boxed_os_str),
            other_names: OtherNames::default(),
            nlink_adjust: 0,
        }
    }

    /// A directory merging the content of more than one layer (a copied-up or
    /// redirected one with lower content below, or a lower one over others).
    pub fn merges_layers(&self) -> bool {
        matches!(&self.content, Content::Dir(layers) if layers.len() > 1)
    }

    /// A metadata-only copy (see metacopy.rs): the layer below that holds its data.
    pub fn metacopy_data_layer(&self) -> Option<LayerIdx> {
        match self.content {
            Content::Dir(_) => None,
            Content::File { data, .. } => data,
        }
    }

    pub fn is_metacopy(&self) -> bool {
        self.metacopy_data_layer().is_some()
    }

    /// A directory was copied up: the upper copy (opened as `fd`) is merged above
    /// the layers it had.
    pub fn dir_copied_up(&mut self, fd: Arc<OwnedFd>) {
        if let Content::Dir(layers) = &mut self.content {
            layers.insert(
                0,
                LayerRef {
                    layer: super::UPPER,
                    fd: Some(fd),
                },
            );
        }
    }

    /// A non-directory was copied up (or a metadata-only copy got its data): it
    /// lives in the upper layer; `data_left_in` is the layer still holding its data
    /// after a metadata-only copy-up.
    pub fn file_copied_up(&mut self, data_left_in: Option<LayerIdx>) {
        if let Content::File { .. } = self.content {
            self.content = Content::upper_file(data_left_in);
        }
    }

    /// The group's copy got or lost a link not matched by a name shown (see
    /// origin.rs).
    pub fn set_nlink_adjust(&mut self, adjust: i64) {
        self.nlink_adjust = adjust;
    }

    /// A lookup found a non-directory at `layers` again (a copy-up or a change in a
    /// layer may have moved it).
    pub fn refound_file(&mut self, layers: impl IntoIterator<Item = LayerRef>) {
        if let Content::File { .. } = self.content {
            if let Some(found) = Content::new(false, layers) {
                self.content = found;
            }
        }
    }

    /// A lookup found the directory's lower content at `path` (its redirect).
    pub fn refound_redirect(&mut self, path: OsString) {
        self.redirect = Some(path.into_boxed_os_str());
    }

    pub fn with_nlink_adjust(mut self, adjust: i64) -> InodeState {
        self.nlink_adjust = adjust;
        self
    }

    /// The directory the entry was last reached in (see `name`).
    pub fn parent(&self) -> Ino {
        self.parent
    }

    /// The name the entry was last reached by, in `parent()`.
    pub fn name(&self) -> &OsStr {
        &self.name
    }

    /// The layers the entry's name is in, top-down: a directory's merged layers, a
    /// file's one (its metacopy data layer is [`Self::metacopy_data_layer`]).
    pub fn layers(&self) -> &[LayerRef] {
        self.content.named_layers()
    }

    /// The indexes of `layers()`, top-down.
    pub fn layer_indexes(&self) -> Vec<LayerIdx> {
        self.layers().iter().map(|l| l.layer).collect()
    }

    pub fn in_layer(&self, idx: LayerIdx) -> bool {
        self.layers().iter().any(|l| l.layer == idx)
    }

    /// Keeps `fd` as the handle of this directory in layer `idx`, unless one is
    /// kept already; true when kept (the caller then tells the fd budget,
    /// `InodeTable::note_cached_fd`).
    pub fn cache_fd(&mut self, idx: LayerIdx, fd: &Arc<OwnedFd>) -> bool {
        match self
            .content
            .named_layers_mut()
            .iter_mut()
            .find(|l| l.layer == idx)
        {
            Some(r) if r.fd.is_none() => {
                r.fd = Some(fd.clone());
                true
            }
            _ => false,
        }
    }

    /// The fd budget took back the handle in layer `idx`; it is reopened on use.
    fn drop_cached_fd(&mut self, idx: LayerIdx) {
        if let Some(r) = self
            .content
            .named_layers_mut()
            .iter_mut()
            .find(|l| l.layer == idx)
        {
            r.fd = None;
        }
    }

    pub fn redirect(&self) -> Option<&OsStr> {
        self.redirect.as_deref()
    }

    pub fn nlink_adjust(&self) -> i64 {
        self.nlink_adjust
    }

    pub fn has_key(&self, key: (u64, u64)) -> bool {
        self.keys.contains(&key)
    }

    /// The entry's last known name was removed through the mount.
    pub fn is_detached(&self) -> bool {
        self.detached
    }

    fn is_named(&self, parent: Ino, name: &std::ffi::OsStr) -> bool {
        !self.detached && self.parent == parent && *self.name == *name
    }

    /// `parent/name` was just found to lead to the entry: it becomes the name used
    /// from now on, and a non-directory keeps the one it had as another name.
    fn reached_by(&mut self, is_dir: bool, parent: Ino, name: &std::ffi::OsStr) {
        if self.is_named(parent, name) {
            return;
        }
        self.other_names.forget(parent, name);
        if !is_dir && !self.detached {
            let old = std::mem::replace(&mut self.name, name.into());
            self.other_names.remember(self.parent, old);
        } else {
            self.name = name.into();
        }
        self.parent = parent;
        self.detached = false;
    }

    /// `parent/name` no longer leads to the entry. Returns true when no known name
    /// is left (the entry is then detached).
    fn name_gone(&mut self, parent: Ino, name: &std::ffi::OsStr) -> bool {
        if !self.is_named(parent, name) {
            self.other_names.forget(parent, name);
            return false;
        }
        match self.other_names.take_latest() {
            Some((p, n)) => {
                self.parent = p;
                self.name = n;
                false
            }
            None => {
                self.detached = true;
                true
            }
        }
    }

    /// The handle on a detached entry's object, if it was pinned.
    pub fn pinned_if_detached(&self) -> Option<Arc<OwnedFd>> {
        if self.detached {
            self.pinned.clone()
        } else {
            None
        }
    }

    pub fn top_layer(&self) -> Option<LayerIdx> {
        self.layers().first().map(|l| l.layer)
    }
}

pub struct Inode {
    pub ino: Ino,
    /// S_IFMT bits; an inode never changes type.
    pub kind: u32,
    lookups: AtomicU64,
    pub state: RwLock<InodeState>,
    /// Serialises copy-up of this entry.
    pub copy_up: Mutex<()>,
}

impl Inode {
    pub fn is_dir(&self) -> bool {
        self.kind == libc::S_IFDIR
    }

    /// Records that `parent/name` was found to lead to this inode.
    pub fn reached_by(&self, parent: Ino, name: &std::ffi::OsStr) {
        self.state.write().reached_by(self.is_dir(), parent, name);
    }

    /// Records that `parent/name` was removed or replaced. When it was the inode's
    /// last known name, `pinned` keeps the object reachable for fstat-style calls
    /// and links while the kernel still holds the inode.
    pub fn detach_if_named(
        &self,
        parent: Ino,
        name: &std::ffi::OsStr,
        pinned: Option<Arc<OwnedFd>>,
    ) {
        let mut st = self.state.write();
        if st.name_gone(parent, name) {
            st.pinned = pinned;
        }
    }

    /// Records a rename of `from` (a name of this inode) to `to`; a directory moved
    /// by redirect also keeps where its lower content is.
    pub fn moved(
        &self,
        from: (Ino, &std::ffi::OsStr),
        to: (Ino, &std::ffi::OsStr),
        redirect: Option<OsString>,
    ) {
        let mut st = self.state.write();
        if st.is_named(from.0, from.1) {
            st.other_names.forget(to.0, to.1);
            st.parent = to.0;
            st.name = to.1.into();
        } else {
            st.name_gone(from.0, from.1);
            st.reached_by(self.is_dir(), to.0, to.1);
        }
        if let Some(r) = redirect {
            st.redirect = Some(r.into_boxed_os_str());
        }
    }
}

pub struct InodeTable {
    inodes: DashMap<Ino, Arc<Inode>>,
    identity: DashMap<(u64, u64), Ino>,
    next_reserved: AtomicU64,
    /// Directory handles cached in inode states, oldest first (see
    /// [`InodeTable::note_cached_fd`]); at most `fd_budget` entries.
    fd_cache: Mutex<VecDeque<(Weak<Inode>, LayerIdx)>>,
    fd_budget: usize,
}

impl InodeTable {
    /// A table whose inodes cache at most `fd_budget` directory handles.
    pub fn new(fd_budget: u64) -> InodeTable {
        InodeTable {
            inodes: DashMap::new(),
            identity: DashMap::new(),
            next_reserved: AtomicU64::new(0),
            fd_cache: Mutex::new(VecDeque::new()),
            fd_budget: usize::try_from(fd_budget).unwrap_or(usize::MAX).max(1),
        }
    }

    /// Records that `inode` now caches its directory handle in layer `idx`. Beyond
    /// the budget the oldest cached handle is dropped from its inode, which reopens
    /// it from its parent on next use: recently used directories keep theirs, so a
    /// lookup deep in a tree reopens at most the few levels above it that lost
    /// theirs, whatever the tree's depth. Locking: called with no inode state lock
    /// held (it takes the evicted inode's); the queue's own lock is never held
    /// while taking one.
    pub fn note_cached_fd(&self, inode: &Arc<Inode>, idx: LayerIdx) {
        let evicted = {
            let mut queue = self.fd_cache.lock();
            queue.push_back((Arc::downgrade(inode), idx));
            if queue.len() > self.fd_budget {
                queue.pop_front()
            } else {
                None
            }
        };
        let Some((weak, idx)) = evicted else { return };
        if let Some(old) = weak.upgrade() {
            old.state.write().drop_cached_fd(idx);
        }
    }
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
    ///
    /// `preferred` comes from data a layer controls (a real inode number, an origin
    /// marker), so it is only a hint: it is taken when it is a derivable number
    /// (not 0, not the root's unless this is the root, below the reserved range)
    /// and free; otherwise the next reserved number is. Reserved numbers are handed
    /// out once each and no derived number reaches their range, so the loop ends at
    /// the latest on its second turn.
    pub fn insert(&self, preferred: Ino, kind: u32, state: InodeState) -> Arc<Inode> {
        let keys = state.keys.clone();
        let root_free = !self.inodes.contains_key(&ROOT_INO);
        let usable = |ino: Ino| {
            if ino == ROOT_INO {
                root_free
            } else {
                ino != 0 && ino < RESERVED_BASE
            }
        };
        let mut candidate = Some(preferred).filter(|ino| usable(*ino));
        loop {
            let ino = candidate.take().unwrap_or_else(|| {
                RESERVED_BASE + self.next_reserved.fetch_add(1, Ordering::Relaxed)
            });
            if let dashmap::Entry::Vacant(slot) = self.inodes.entry(ino) {
                let inode = Arc::new(Inode {
                    ino,
                    kind,
                    lookups: AtomicU64::new(1),
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
        }
    }

    pub fn len(&self) -> usize {
        self.inodes.len()
    }

    /// Gives back the maps' room for inodes that are gone: a hash map keeps its
    /// capacity after removals, so after the kernel forgot a big tree the slots would
    /// stay allocated. Each shard is locked while it is rebuilt.
    pub fn shrink(&self) {
        self.inodes.shrink_to_fit();
        self.identity.shrink_to_fit();
        self.fd_cache.lock().shrink_to_fit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(kind: u32) -> InodeState {
        let top = LayerRef { layer: 0, fd: None };
        InodeState::new(ROOT_INO, "x".into(), kind, vec![top], Vec::new(), None)
            .expect("an entry with a layer")
    }

    /// Numbers a layer can hand us (origin markers, real inode numbers) that cannot
    /// be used as they are still give an inode, each its own.
    #[test]
    fn unusable_or_taken_preferred_numbers_get_distinct_reserved_ones() {
        let table = InodeTable::new(16);
        let root = table.insert(ROOT_INO, libc::S_IFDIR, state(libc::S_IFDIR));
        assert_eq!(root.ino, ROOT_INO);
        let mut seen = std::collections::BTreeSet::from([ROOT_INO]);
        for preferred in [
            0,
            ROOT_INO,
            u64::MAX,
            RESERVED_BASE,
            RESERVED_BASE + 1,
            7,
            7,
            7,
        ] {
            let inode = table.insert(preferred, libc::S_IFREG, state(libc::S_IFREG));
            assert!(seen.insert(inode.ino), "{preferred} gave a taken number");
            if preferred == 7 && inode.ino != 7 {
                assert!(inode.ino >= RESERVED_BASE);
            }
        }
        assert!(seen.contains(&7));
    }
}
