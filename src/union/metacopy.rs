//! Metadata-only copy-up (kernel overlayfs `metacopy=on`, opt-in here): chmod, chown,
//! utimes or an xattr change of a lower regular file copies up only its metadata. The
//! upper copy is a sparse stand-in of the right size marked `<ns>.overlay.metacopy`,
//! the kernel's format; reads keep going to the lower file until the first writer,
//! which copies the data in.
//!
//! Invariants:
//! - Only a regular file of at least 1 MiB with one name is copied this way (a
//!   hard-link group is copied up whole, see hardlink.rs).
//! - The data layer of a metadata-only copy is the lower entry at the same name of
//!   the same parent: such a copy is never renamed or linked (both complete it
//!   first), and a directory move keeps a parent's lower content through its redirect.
//! - Completing the data builds a full copy in the work directory (data from below,
//!   metadata from the stand-in) and renames it over the stand-in: readers never see
//!   a half-filled file.
//! - Off by default: tools that read the upper directory directly (fuse-overlayfs,
//!   image diff/commit of container engines) would take the stand-in for the data.

use std::fs::File;
use std::os::fd::AsFd;

use rustix::fs::OFlags;

use super::copy_up::CopyData;
use super::inode::Inode;
use super::{Errno, Result, UPPER, Union};
use crate::sys::{self, fs::RenameKind, fs::Stat, xattr::Target};

/// Smaller files are copied whole: it costs little, and a stand-in is recognised by
/// holding far fewer blocks than its size (an xattr block may be all it has).
const METACOPY_MIN_SIZE: i64 = 1 << 20;

/// Whether an upper regular file could be a stand-in, judged from its stat alone.
fn could_be_stand_in(st: &Stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFREG
        && st.st_size >= METACOPY_MIN_SIZE
        && st.st_blocks * 512 < st.st_size / 2
}

impl Union {
    /// Whether a lower file may be copied up without its data.
    pub(crate) fn metacopy_allowed(&self, src: &Stat) -> bool {
        self.opts.metacopy
            && src.st_mode & libc::S_IFMT == libc::S_IFREG
            && src.st_nlink == 1
            && src.st_size >= METACOPY_MIN_SIZE
    }

    /// Makes the staged `dst` a stand-in for `size` bytes that live below.
    pub(crate) fn stage_metacopy(&self, dst: &File, size: u64) -> sys::SysResult<()> {
        sys::fs::ftruncate(dst, size)?;
        sys::xattr::set(
            Target::Open(dst.as_fd()),
            &self.xattr_ns.overlay("metacopy"),
            b"",
            0,
        )
    }

    /// Whether an upper regular file is a metadata-only stand-in. Only a large file
    /// with few blocks can be, so others cost no xattr read.
    pub(crate) fn is_metacopy(&self, target: Target<'_>, st: &Stat) -> bool {
        if !could_be_stand_in(st) {
            return false;
        }
        [self.xattr_ns, super::whiteout::XattrNs::User]
            .iter()
            .any(|ns| {
                matches!(
                    sys::xattr::exists(target, &ns.overlay("metacopy")),
                    Ok(true)
                )
            })
    }

    /// Copies the data into a metadata-only copy. Called with `inode.copy_up` held.
    pub(crate) fn finish_metacopy(&self, inode: &Inode, data: CopyData) -> Result<()> {
        let (parent_ino, name, data_layer) = {
            let st = inode.state.read();
            if st.is_detached() {
                return Err(Errno::NOENT.into());
            }
            let data_layer = st.metacopy_data_layer().ok_or(Errno::STALE)?;
            (
                st.parent(),
                Box::<std::ffi::OsStr>::from(st.name()),
                data_layer,
            )
        };
        let parent = self.inode(parent_ino)?;
        let upper = self.dir_fd(&parent, UPPER)?;
        let lower = self.dir_fd(&parent, data_layer)?;
        let (source, _) = sys::fs::open_regular_at(lower.as_fd(), &name, OFlags::RDONLY)?;
        let stand_in = sys::fs::stat_at(upper.as_fd(), &name)?;
        let data = if data == CopyData::No {
            data
        } else {
            CopyData::Yes
        };
        self.publish_from_work(
            |work, temp| {
                // The stand-in's flags were given it at the metadata copy-up.
                self.stage_copy(inode, upper.as_fd(), &name, work, temp, data, Some(&source))?;
                Ok(())
            },
            upper.as_fd(),
            &name,
            RenameKind::Replace,
        )?;
        let full = sys::fs::stat_at(upper.as_fd(), &name)?;
        // The new identity is recorded before the layers point at it: an open racing
        // with this one checks what it opened against the identities (see open_data).
        self.inodes.add_identity(inode, (full.st_dev, full.st_ino));
        inode.state.write().file_copied_up(None);
        self.inodes
            .remove_identity(inode, (stand_in.st_dev, stand_in.st_ino));
        Ok(())
    }

    /// Opens a regular file's data for I/O (from where `data_loc` says), checked to
    /// be what was looked up: a regular file and, where it is the entry itself, the
    /// very object the inode stands for. A layer changed underneath answers ESTALE.
    /// Returns the file and its st_mode.
    pub(crate) fn open_data(&self, inode: &Inode, flags: OFlags) -> Result<(File, u32)> {
        let (meta_only, layer) = {
            let st = inode.state.read();
            (st.is_metacopy(), st.top_layer().ok_or(Errno::NOENT)?)
        };
        let (pfd, name) = self.data_loc(inode)?;
        let (file, st) = sys::fs::open_regular_at(pfd.as_fd(), &name, flags)?;
        // A metadata-only copy's data file is recorded by no identity of the inode
        // after a remount (only the stand-in is): its type is what can be checked.
        if !meta_only {
            self.check_identity(inode, layer, &st)?;
        }
        Ok((file, st.st_mode))
    }

    /// Where a file's data is read from: the data layer of a metadata-only copy,
    /// else the entry itself.
    pub(crate) fn data_loc(
        &self,
        inode: &Inode,
    ) -> Result<(std::sync::Arc<std::os::fd::OwnedFd>, std::ffi::OsString)> {
        let data_layer = inode.state.read().metacopy_data_layer();
        let (pfd, name, _) = self.entry_loc(inode)?;
        match data_layer {
            Some(layer) if !inode.is_dir() => {
                let parent = self.inode(inode.state.read().parent())?;
                Ok((self.dir_fd(&parent, layer)?, name))
            }
            _ => Ok((pfd, name)),
        }
    }
}
