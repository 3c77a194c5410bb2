//! The library API: a merged view of layers opened in this process, addressed by
//! path, with handles that give back what they hold when dropped. It adds paths and
//! lifetimes on top of the union engine the FUSE adapter serves (`union::Union`),
//! and no union logic of its own: every answer is the engine's.
//!
//! ```no_run
//! let engine = stratafs::Engine::builder(["/layers/app", "/layers/base"])
//!     .upper("/data/upper", "/data/work")
//!     .open()?;
//! engine.write("/etc/motd", b"hello\n")?;
//! for entry in engine.read_dir("/etc")? {
//!     println!("{}", entry.name.to_string_lossy());
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::ffi::{OsStr, OsString};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use crate::config::MountConfig;
use crate::sys;
use crate::union::{Caller, Ino, ROOT_INO, RenameMode, Setup, StaleWork, Union};
use crate::volume::attach::GraftSources;

pub use crate::union::{Attr, Errno, Error, SetupError, Time};

/// How a union is opened. Nothing is touched until [`EngineBuilder::open`]: the
/// process's limits never, the upper and work directories only as the engine needs
/// (see [`EngineBuilder::clear_stale_work`]).
#[derive(Debug, Clone)]
pub struct EngineBuilder {
    config: MountConfig,
    setup: Setup,
}

impl EngineBuilder {
    /// Lower layers, top-most first. Without [`EngineBuilder::upper`] the view is
    /// read-only: every change answers EROFS.
    pub fn new<I, P>(lowers: I) -> EngineBuilder
    where
        I: IntoIterator<Item = P>,
        P: Into<PathBuf>,
    {
        // A mount's configuration with no mountpoint: the engine never reads it
        // unless volumes are attached, which this API does not offer.
        let lowers = lowers.into_iter().map(Into::into).collect();
        EngineBuilder {
            config: MountConfig::new(lowers, PathBuf::new()),
            setup: Setup::unintrusive(),
        }
    }

    /// The writable layer and its work directory (same filesystem, as for kernel
    /// overlayfs); the engine creates `work/` and `index/` in `work`.
    pub fn upper(mut self, upper: impl Into<PathBuf>, work: impl Into<PathBuf>) -> Self {
        self.config.upperdir = Some(upper.into());
        self.config.workdir = Some(work.into());
        self
    }

    /// Removes what an earlier union left staged in `work/work` (it only ever holds
    /// copies being built, never data the layers show). Without it, such leftovers
    /// make [`EngineBuilder::open`] fail with [`SetupError::StaleWork`].
    pub fn clear_stale_work(mut self) -> Self {
        self.setup.stale_work = StaleWork::Clear;
        self
    }

    /// How many directory fds the engine may keep open (default: half the process's
    /// current open-file limit, which is not raised).
    pub fn fd_budget(mut self, fds: u64) -> Self {
        self.setup.fd_budget = fds;
        self
    }

    pub fn open(self) -> Result<Engine, SetupError> {
        let union = Union::new(&self.config, &self.setup, GraftSources::none())?;
        let (uid, gid) = sys::process::ids();
        Ok(Engine {
            union,
            caller: Caller {
                uid,
                gid,
                pid: std::process::id(),
            },
        })
    }
}

/// An open union. Changes are made with this process's effective uid and gid.
pub struct Engine {
    pub(crate) union: Union,
    caller: Caller,
}

/// One name of a directory listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub name: OsString,
    /// The entry's type: `S_IFMT` bits of its mode, as in [`Attr::kind`].
    pub kind: u32,
}

impl Engine {
    pub fn builder<I, P>(lowers: I) -> EngineBuilder
    where
        I: IntoIterator<Item = P>,
        P: Into<PathBuf>,
    {
        EngineBuilder::new(lowers)
    }

    /// The merged root directory.
    pub fn root(&self) -> Node<'_> {
        Node::new(self, ROOT_INO, None)
    }

    /// The entry at `path` (absolute, or relative to the root). `..` is refused
    /// (EINVAL): the engine resolves names, not paths, and a caller that wants `..`
    /// resolved knows which directory it came from.
    pub fn lookup(&self, path: impl AsRef<Path>) -> Result<Node<'_>, Error> {
        let mut node = self.root();
        for comp in path.as_ref().components() {
            match comp {
                Component::RootDir | Component::CurDir => {}
                Component::Normal(name) => node = node.lookup(name)?,
                Component::ParentDir | Component::Prefix(_) => return Err(Errno::INVAL.into()),
            }
        }
        Ok(node)
    }

    pub fn stat(&self, path: impl AsRef<Path>) -> Result<Attr, Error> {
        self.lookup(path)?.attr()
    }

    /// The names in the directory at `path`, without `.` and `..`, in the order the
    /// engine lists them.
    pub fn read_dir(&self, path: impl AsRef<Path>) -> Result<Vec<DirEntry>, Error> {
        self.lookup(path)?.read_dir()
    }

    /// The whole content of the file at `path`.
    pub fn read(&self, path: impl AsRef<Path>) -> Result<Vec<u8>, Error> {
        let node = self.lookup(path)?;
        let size = node.attr()?.size;
        let file = node.open(libc::O_RDONLY)?;
        let mut data = Vec::new();
        // Bounded by the size seen at the start: a file growing meanwhile is read up
        // to that size, as a single read(2) of a snapshot would be.
        while (data.len() as u64) < size {
            let want = (size - data.len() as u64).min(READ_CHUNK as u64) as u32;
            let chunk = file.read_at(data.len() as u64, want)?;
            if chunk.is_empty() {
                break;
            }
            data.extend_from_slice(&chunk);
        }
        Ok(data)
    }

    /// Makes the file at `path` hold `data`: created with mode 0644 if missing,
    /// truncated first if not (copied up, as any write to a lower file is).
    pub fn write(&self, path: impl AsRef<Path>, data: &[u8]) -> Result<(), Error> {
        let (parent, name) = self.parent_of(path.as_ref())?;
        let flags = libc::O_WRONLY | libc::O_TRUNC;
        let file = match parent.lookup(name) {
            Ok(node) => node.open(flags)?,
            Err(e) if e == Errno::NOENT => parent.create(name, 0o644, flags)?,
            Err(e) => return Err(e),
        };
        let mut done = 0;
        while done < data.len() {
            let n = file.write_at(done as u64, &data[done..])?;
            if n == 0 {
                return Err(Errno::IO.into());
            }
            done += n;
        }
        Ok(())
    }

    pub fn create_dir(&self, path: impl AsRef<Path>, mode: u32) -> Result<(), Error> {
        let (parent, name) = self.parent_of(path.as_ref())?;
        let entry = self.union.mkdir(self.caller, parent.ino(), name, mode)?;
        self.union.forget(entry.attr.ino, 1);
        Ok(())
    }

    pub fn remove_file(&self, path: impl AsRef<Path>) -> Result<(), Error> {
        let (parent, name) = self.parent_of(path.as_ref())?;
        self.union.unlink(parent.ino(), name)
    }

    pub fn remove_dir(&self, path: impl AsRef<Path>) -> Result<(), Error> {
        let (parent, name) = self.parent_of(path.as_ref())?;
        self.union.rmdir(parent.ino(), name)
    }

    /// rename(2): replaces an existing `to` as rename(2) does.
    pub fn rename(&self, from: impl AsRef<Path>, to: impl AsRef<Path>) -> Result<(), Error> {
        let (from_dir, from_name) = self.parent_of(from.as_ref())?;
        let (to_dir, to_name) = self.parent_of(to.as_ref())?;
        self.union.rename(
            from_dir.ino(),
            from_name,
            to_dir.ino(),
            to_name,
            RenameMode::Replace,
        )
    }

    pub fn symlink(&self, target: impl AsRef<Path>, path: impl AsRef<Path>) -> Result<(), Error> {
        let (parent, name) = self.parent_of(path.as_ref())?;
        let entry =
            self.union
                .symlink(self.caller, parent.ino(), name, target.as_ref().as_os_str())?;
        self.union.forget(entry.attr.ino, 1);
        Ok(())
    }

    pub fn read_link(&self, path: impl AsRef<Path>) -> Result<PathBuf, Error> {
        let node = self.lookup(path)?;
        Ok(self.union.readlink(node.ino())?.into())
    }

    /// The directory holding `path` and the last name of `path`.
    fn parent_of<'p>(&self, path: &'p Path) -> Result<(Node<'_>, &'p OsStr), Error> {
        let name = match path.components().next_back() {
            Some(Component::Normal(name)) => name,
            _ => return Err(Errno::INVAL.into()),
        };
        let parent = self.lookup(path.parent().unwrap_or(Path::new("/")))?;
        Ok((parent, name))
    }
}

/// Largest read asked of the engine at once.
const READ_CHUNK: usize = 1 << 20;

/// An entry of the merged view, held: the engine keeps its inode while a clone of
/// the node lives, and its parent's, as the kernel keeps a dentry's parent. The last
/// clone dropped gives the reference back.
#[derive(Clone)]
pub struct Node<'e>(Arc<Held<'e>>);

struct Held<'e> {
    engine: &'e Engine,
    /// One engine reference (a lookup's), given back in `drop`; none for the root,
    /// which the engine never forgets.
    ino: Ino,
    /// The directory it was found in, held for as long as this entry is; `None`
    /// only for the root.
    _parent: Option<Node<'e>>,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        // The parent (a field) is dropped after this: children go first, as in the
        // kernel's dentry cache.
        self.engine.union.forget(self.ino, 1);
    }
}

impl<'e> Node<'e> {
    fn new(engine: &'e Engine, ino: Ino, parent: Option<Node<'e>>) -> Node<'e> {
        Node(Arc::new(Held {
            engine,
            ino,
            _parent: parent,
        }))
    }

    fn engine(&self) -> &'e Engine {
        self.0.engine
    }

    fn ino(&self) -> Ino {
        self.0.ino
    }

    pub fn attr(&self) -> Result<Attr, Error> {
        self.engine().union.getattr(self.ino())
    }

    /// The entry `name` of this directory.
    pub fn lookup(&self, name: impl AsRef<OsStr>) -> Result<Node<'e>, Error> {
        let entry = self.engine().union.lookup(self.ino(), name.as_ref())?;
        Ok(Node::new(self.engine(), entry.attr.ino, Some(self.clone())))
    }

    /// The names of this directory, without `.` and `..`, in the engine's order.
    pub fn read_dir(&self) -> Result<Vec<DirEntry>, Error> {
        let union = &self.engine().union;
        let fh = union.opendir(self.ino())?;
        let listed = union.readdir(fh, 0);
        union.releasedir(fh);
        Ok(listed?
            .iter()
            .filter(|e| e.name != "." && e.name != "..")
            .map(|e| DirEntry {
                name: e.name.clone(),
                kind: e.kind,
            })
            .collect())
    }

    /// Opens the file with `open(2)` flags (`O_CREAT` aside: see [`Engine::write`]).
    pub fn open(&self, flags: i32) -> Result<File<'e>, Error> {
        let (fh, _) = self.engine().union.open(self.ino(), flags)?;
        Ok(File {
            fh,
            node: self.clone(),
        })
    }

    fn create(&self, name: &OsStr, mode: u32, flags: i32) -> Result<File<'e>, Error> {
        let engine = self.engine();
        let (entry, fh, _) = engine
            .union
            .create(engine.caller, self.ino(), name, mode, flags)?;
        Ok(File {
            fh,
            node: Node::new(engine, entry.attr.ino, Some(self.clone())),
        })
    }
}

/// An open file; closed when dropped.
pub struct File<'e> {
    fh: u64,
    /// Keeps the inode while the file is open.
    node: Node<'e>,
}

impl File<'_> {
    /// Up to `len` bytes at `offset`; fewer only at the end of the file.
    pub fn read_at(&self, offset: u64, len: u32) -> Result<Vec<u8>, Error> {
        self.node.engine().union.read(self.fh, offset, len)
    }

    /// Bytes written at `offset` (the file must have been opened for writing).
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<usize, Error> {
        self.node.engine().union.write(self.fh, offset, data)
    }

    /// fsync(2) of the data and metadata.
    pub fn sync(&self) -> Result<(), Error> {
        self.node.engine().union.fsync(self.fh, false)
    }
}

impl Drop for File<'_> {
    fn drop(&mut self) {
        self.node.engine().union.release(self.fh);
    }
}
