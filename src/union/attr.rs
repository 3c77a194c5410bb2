//! Attributes: getattr, setattr (which copies up first) and statfs.

use std::os::fd::AsFd;

use rustix::fs::OFlags;

use super::copy_up::CopyData;
use super::inode::Inode;
use super::{Attr, Errno, Ino, Result, SetAttr, SetTime, StatFs, Union};
use crate::sys::{self, fs::TimeSpec, xattr::Target};

fn time_spec(t: Option<SetTime>) -> TimeSpec {
    match t {
        None => TimeSpec::Omit,
        Some(SetTime::Now) => TimeSpec::Now,
        Some(SetTime::At(t)) => TimeSpec::At {
            sec: t.sec,
            nsec: t.nsec,
        },
    }
}

impl Union {
    /// Flags every open of layer file data gets. The kernel never updates atime on
    /// a FUSE inode; the layer's filesystem does, on the daemon's reads and on
    /// mappings of passthrough files, by the rules of the layer's own mount. On a
    /// `noatime` mount no read may move it, so the data is opened with O_NOATIME
    /// (allowed: the daemon owns the files or holds CAP_FOWNER).
    pub(crate) fn atime_open_flags(&self) -> OFlags {
        if self.opts.noatime {
            OFlags::NOATIME
        } else {
            OFlags::empty()
        }
    }

    pub fn getattr(&self, ino: Ino) -> Result<Attr> {
        let inode = self.inode(ino)?;
        let st = self.stat_inode(&inode)?;
        let mut attr = self.shown_attr(&inode, self.attr_of(&inode, &st));
        if inode.state.read().is_metacopy() {
            // A metadata-only copy occupies what its data does below.
            let (dir, name) = self.data_loc(&inode)?;
            attr.blocks = sys::fs::stat_at(dir.as_fd(), &name)?.st_blocks as u64;
        }
        Ok(attr)
    }

    /// The attributes of `inode` given `st`, a stat of its entry in `layer` made
    /// during this request (by the lookup that just adopted it): what [`getattr`]
    /// would answer, without stat'ing the entry again. When the inode turns out to be
    /// elsewhere (another name of it was copied up, a metadata-only copy takes its
    /// data from below), it is stat'ed where it is.
    ///
    /// [`getattr`]: Self::getattr
    pub(crate) fn attr_from_stat_of(
        &self,
        inode: &Inode,
        layer: crate::layer::LayerIdx,
        st: &sys::fs::Stat,
    ) -> Result<Attr> {
        let same = {
            let state = inode.state.read();
            !state.is_detached() && state.top_layer() == Some(layer) && !state.is_metacopy()
        };
        if same && st.st_mode & libc::S_IFMT == inode.kind {
            Ok(self.shown_attr(inode, self.attr_of(inode, st)))
        } else {
            self.getattr(inode.ino)
        }
    }

    /// Changes attributes; a lower entry is copied up first (without its data when
    /// the change truncates it to zero anyway). `fh` is an open handle on the file,
    /// used for truncation when given.
    pub fn setattr(&self, ino: Ino, set: &SetAttr, fh: Option<u64>) -> Result<Attr> {
        self.check_writable()?;
        let inode = self.inode(ino)?;
        let data = match set.size {
            Some(0) => CopyData::No,
            Some(_) => CopyData::Yes,
            None => CopyData::Meta,
        };
        self.copy_up(&inode, data)?;

        if let Some(size) = set.size {
            let _charge = self.quota_charge(ino, |_| size)?;
            if inode.kind != libc::S_IFREG {
                return Err(if inode.is_dir() {
                    Errno::ISDIR
                } else {
                    Errno::INVAL
                }
                .into());
            }
            match fh.and_then(|fh| self.files.get(&fh).map(|f| f.value().clone())) {
                Some(handle) if handle.writable => sys::fs::ftruncate(&handle.file, size)?,
                _ => sys::fs::ftruncate(&self.open_entry(&inode, OFlags::WRONLY)?, size)?,
            }
        }

        // The writable copy (upper, or the graft's directory), by name or by handle.
        self.object_target(&inode, |t| {
            self.owner.change(t, set.uid, set.gid, set.mode)?;
            if set.atime.is_none() && set.mtime.is_none() {
                return Ok(());
            }
            let (atime, mtime) = (time_spec(set.atime), time_spec(set.mtime));
            Ok(match t {
                Target::Fd(fd) | Target::Open(fd) => sys::fs::utimens_fd(fd, atime, mtime),
                Target::Entry(dir, name) => sys::fs::utimens_at(dir, name, atime, mtime),
            }?)
        })?;
        self.getattr(ino)
    }

    /// Statistics of the filesystem new data goes to: the upper layer's, or the top
    /// lower's on a read-only mount.
    pub fn statfs(&self) -> Result<StatFs> {
        StatFs::of(self.layer(0)?.root_fd())
    }
}

impl StatFs {
    /// The statistics of the filesystem holding `dir`.
    pub(crate) fn of(dir: std::os::fd::BorrowedFd<'_>) -> Result<StatFs> {
        let st = sys::fs::fstatfs(dir)?;
        Ok(StatFs {
            blocks: st.f_blocks,
            bfree: st.f_bfree,
            bavail: st.f_bavail,
            files: st.f_files,
            ffree: st.f_ffree,
            bsize: st.f_bsize as u32,
            namelen: 255,
            frsize: st.f_frsize as u32,
        })
    }
}
