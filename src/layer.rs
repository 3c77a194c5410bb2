//! A layer: one directory tree of the union, reached only through its root fd.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::sys::{self, SysResult};

/// Index of a layer in `Union::layers`; layers are ordered top-down, and the upper
/// layer (when there is one) is index 0.
pub type LayerIdx = usize;

pub struct Layer {
    pub path: PathBuf,
    pub root: Arc<OwnedFd>,
    /// st_dev of the root: entries of this layer are identified by (dev, ino).
    pub dev: u64,
    /// Added to this layer's inode numbers so that two layers on different
    /// filesystems never hand out the same st_ino (the kernel's xino idea): the
    /// index of the layer's filesystem among the distinct filesystems of the mount,
    /// in the top bits.
    pub ino_bits: u64,
}

impl Layer {
    /// A layer reached through its path as given (upper, graft, scaffold): whether
    /// it may be written is the union's to decide, per request.
    pub fn open(path: &Path) -> SysResult<Layer> {
        Layer::with_root(path, sys::fs::open_root(path)?)
    }

    /// A lower layer of the merged tree: its root as a private copy of its own
    /// mount where the process may make one (see `sys::fs::open_layer_root`).
    pub fn open_lower(path: &Path) -> SysResult<Layer> {
        let (root, cloned) = sys::fs::open_layer_root(path)?;
        if !cloned {
            log::debug!(
                "lowerdir {}: not cloned as a private mount; mount points inside it are crossed",
                path.display()
            );
        }
        Layer::with_root(path, root)
    }

    fn with_root(path: &Path, root: OwnedFd) -> SysResult<Layer> {
        let st = sys::fs::fstat(root.as_fd())?;
        Ok(Layer {
            path: path.to_path_buf(),
            root: Arc::new(root),
            dev: st.st_dev,
            ino_bits: 0,
        })
    }

    pub fn root_fd(&self) -> BorrowedFd<'_> {
        self.root.as_fd()
    }
}

/// Number of low bits of st_ino kept from the real inode number; the bits above
/// hold the filesystem index. Real filesystems here stay far below 2^56 inodes.
pub const INO_SHIFT: u32 = 56;

/// Gives each layer the filesystem index bits described at `Layer::ino_bits`.
pub fn assign_ino_bits(layers: &mut [Layer]) {
    let mut devs: Vec<u64> = Vec::new();
    for layer in layers.iter_mut() {
        let idx = match devs.iter().position(|d| *d == layer.dev) {
            Some(i) => i,
            None => {
                devs.push(layer.dev);
                devs.len() - 1
            }
        };
        layer.ino_bits = (idx as u64) << INO_SHIFT;
    }
}
