//! Open files and their data operations. A handle owns a real fd on the layer file:
//! upper for writers (copied up at open), the top-most layer's for readers.

use std::fs::File;
use std::os::fd::AsFd;
use std::sync::Arc;

use rustix::fs::OFlags;

use super::copy_up::CopyData;
use super::inode::Inode;
use super::inode_flags::Change;
use super::{Errno, Ino, Result, Union};
use crate::layer::LayerIdx;
use crate::sys::{self, fs::Stat};

pub struct OpenFile {
    pub ino: Ino,
    /// The real file; handed to the kernel for passthrough by the adapter.
    pub file: File,
    /// `file`'s st_mode when it was opened, where the open stat it anyway.
    pub mode_at_open: Option<u32>,
    pub writable: bool,
    /// The file is the upper layer's copy (the one all writers share).
    pub in_upper: bool,
    /// `file` was opened read-write and with no other status flag, so it can serve
    /// as the shared passthrough backing file as it is.
    pub plain_rdwr: bool,
    /// For a reader opened on a lower file that was copied up since: the upper copy,
    /// opened on first use, so that the reader sees what writers wrote since (as
    /// with kernel overlayfs). Set once, never replaced.
    upper_copy: std::sync::OnceLock<File>,
}

/// Access flags the daemon passes on to the real open. O_APPEND is dropped: the
/// kernel sends explicit offsets for every write, and an O_APPEND fd would ignore
/// them. O_DIRECT is dropped too: the kernel's FUSE client already keeps such I/O
/// out of its page cache, and the daemon reads and writes through buffers of its
/// own, which O_DIRECT on the layer's filesystem would refuse (EINVAL) for want of
/// the caller's alignment. Passthrough backing files are opened by the kernel with
/// the caller's own flags, O_DIRECT included. O_CREAT/O_EXCL/O_TRUNC are handled
/// by the engine itself.
fn real_open_flags(flags: i32) -> OFlags {
    let keep = libc::O_ACCMODE | libc::O_SYNC | libc::O_DSYNC | libc::O_NOATIME;
    OFlags::from_bits_retain((flags & keep) as u32)
}

fn wants_write(flags: i32) -> bool {
    let acc = flags & libc::O_ACCMODE;
    acc == libc::O_WRONLY || acc == libc::O_RDWR || flags & libc::O_TRUNC != 0
}

impl Union {
    /// Opens `ino` with open(2) `flags`; writers get a copied-up file.
    pub fn open(&self, ino: Ino, flags: i32) -> Result<(u64, Arc<OpenFile>)> {
        let inode = self.inode(ino)?;
        if inode.is_dir() {
            return Err(Errno::ISDIR.into());
        }
        let write = wants_write(flags);
        if write {
            self.check_writable()?;
            let data = if flags & libc::O_TRUNC != 0 {
                CopyData::No
            } else {
                CopyData::Yes
            };
            let change = if flags & (libc::O_APPEND | libc::O_TRUNC) == libc::O_APPEND {
                Change::Append
            } else {
                Change::Modify
            };
            self.copy_up_for(&inode, data, change)?;
        }
        let _charge = if flags & libc::O_TRUNC != 0 {
            self.quota_charge(ino, |_| 0)?
        } else {
            None
        };
        let mut oflags = real_open_flags(flags) | self.atime_open_flags();
        if flags & libc::O_TRUNC != 0 {
            oflags |= OFlags::TRUNC;
        }
        let (file, mode) = match self.data_loc(&inode) {
            Ok((pfd, name)) => match inode.kind {
                // A write-only open of an upper file is made read-write where the
                // daemon may read it: the handle's own file then serves as the shared
                // passthrough backing file (`plain_rdwr`), saving a second open. Any
                // failure takes the open as asked, with its own errors.
                libc::S_IFREG => {
                    let read_write = if oflags == OFlags::WRONLY && self.has_upper_data(&inode) {
                        self.open_data(&inode, OFlags::RDWR).ok()
                    } else {
                        None
                    };
                    let (f, mode) = match read_write {
                        Some(opened) => {
                            oflags = OFlags::RDWR;
                            opened
                        }
                        None => match self.open_data(&inode, oflags) {
                            // An append-only file opens for writing only with
                            // O_APPEND, which the real open otherwise leaves out (see
                            // `real_open_flags`); on it every write appends anyway.
                            Err(e) if e == Errno::PERM && write && flags & libc::O_APPEND != 0 => {
                                oflags |= OFlags::APPEND;
                                self.open_data(&inode, oflags)?
                            }
                            r => r?,
                        },
                    };
                    (f, Some(mode))
                }
                // Special files are served by the kernel (FUSE never sees their I/O);
                // an O_PATH handle is enough to answer fstat-style requests.
                _ => (sys::fs::open_at(pfd.as_fd(), &name, OFlags::PATH, 0)?, None),
            },
            // The name the inode was last reached by is gone, yet the kernel still
            // reaches the object: by another hard link whose entry it has cached, or
            // by reopening a descriptor of it. The pinned handle is that object.
            Err(e) if e == Errno::NOENT && inode.kind == libc::S_IFREG => {
                let pinned = inode.state.read().pinned_if_detached();
                (
                    sys::fs::reopen(pinned.ok_or(Errno::NOENT)?.as_fd(), oflags)?,
                    None,
                )
            }
            Err(e) => return Err(e),
        };
        let in_upper = self.has_upper_data(&inode);
        let plain_rdwr = oflags == OFlags::RDWR;
        Ok(self.register_file(ino, file, mode, write, in_upper, plain_rdwr))
    }

    /// Whether the data of `ino` may still move to another real file while it is
    /// open: a lower regular file of a writable mount (a copy-up) or a metadata-only
    /// copy (its completion). Volume files and upper copies stay where they are.
    pub fn data_may_move(&self, ino: Ino) -> bool {
        let Some(inode) = self.inodes.get(ino) else {
            return true;
        };
        inode.kind == libc::S_IFREG
            && !self.is_grafted(ino)
            && self.check_writable().is_ok()
            && !self.has_upper_data(&inode)
    }

    /// A read-write fd on the upper copy of `ino`, for use as a passthrough backing
    /// file that every later open of the inode can share.
    pub fn open_upper_rdwr(&self, ino: Ino) -> Result<File> {
        let inode = self.inode(ino)?;
        if !self.has_upper_data(&inode) || inode.kind != libc::S_IFREG {
            return Err(Errno::INVAL.into());
        }
        self.open_entry(&inode, OFlags::RDWR | self.atime_open_flags())
    }

    /// Opens the regular file `inode` stands for at its name, for I/O: ESTALE when
    /// what is there now is not that very object (see `sys::fs::open_regular_at`).
    pub(crate) fn open_entry(&self, inode: &Inode, flags: OFlags) -> Result<File> {
        let (pfd, name, layer) = self.entry_loc(inode)?;
        let (file, st) = sys::fs::open_regular_at(pfd.as_fd(), &name, flags)?;
        self.check_identity(inode, layer, &st)?;
        Ok(file)
    }

    /// ESTALE unless `st` (of an object opened in `layer`) is one of the real
    /// objects `inode` stands for. Every path that gives an inode a new real object
    /// records its identity before pointing the inode's layers at it.
    pub(crate) fn check_identity(&self, inode: &Inode, layer: LayerIdx, st: &Stat) -> Result<()> {
        let key = self.identity_key(layer, st);
        if inode.state.read().has_key(key) {
            Ok(())
        } else {
            Err(Errno::STALE.into())
        }
    }

    pub(crate) fn register_file(
        &self,
        ino: Ino,
        file: File,
        mode_at_open: Option<u32>,
        writable: bool,
        in_upper: bool,
        plain_rdwr: bool,
    ) -> (u64, Arc<OpenFile>) {
        let fh = self.new_handle();
        let handle = Arc::new(OpenFile {
            ino,
            file,
            mode_at_open,
            writable,
            in_upper,
            plain_rdwr,
            upper_copy: std::sync::OnceLock::new(),
        });
        self.files.insert(fh, handle.clone());
        (fh, handle)
    }

    pub fn file(&self, fh: u64) -> Result<Arc<OpenFile>> {
        self.files
            .get(&fh)
            .map(|f| f.value().clone())
            .ok_or(Errno::BADF.into())
    }

    /// The file a handle reads: its own, or the upper copy once a lower file it was
    /// opened on has been copied up (then only the copy has the current data).
    fn readable<'a>(&self, handle: &'a OpenFile) -> Result<&'a File> {
        if handle.in_upper || handle.writable {
            return Ok(&handle.file);
        }
        if let Some(copy) = handle.upper_copy.get() {
            return Ok(copy);
        }
        let Some(inode) = self.inodes.get(handle.ino) else {
            return Ok(&handle.file);
        };
        if inode.kind != libc::S_IFREG || !self.has_upper_data(&inode) {
            return Ok(&handle.file);
        }
        let pinned = inode.state.read().pinned_if_detached();
        let copy = match pinned {
            Some(fd) => sys::fs::reopen(fd.as_fd(), OFlags::RDONLY)?,
            None => self.open_entry(&inode, OFlags::RDONLY)?,
        };
        Ok(handle.upper_copy.get_or_init(|| copy))
    }

    pub fn read(&self, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; size as usize];
        let done = self.read_into(fh, offset, &mut buf)?;
        buf.truncate(done);
        Ok(buf)
    }

    /// Reads into `buf` from `offset`, as many bytes as it holds unless the file ends
    /// first; returns how many were read.
    pub fn read_into(&self, fh: u64, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let handle = self.file(fh)?;
        let file = self.readable(&handle)?;
        let mut done = 0;
        while done < buf.len() {
            match sys::fs::pread(file, &mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(done)
    }

    pub fn write(&self, fh: u64, offset: u64, data: &[u8]) -> Result<usize> {
        let handle = self.file(fh)?;
        if !handle.writable {
            return Err(Errno::BADF.into());
        }
        let end = offset.saturating_add(data.len() as u64);
        let _charge = self.quota_charge(handle.ino, |old| old.max(end))?;
        let mut done = 0;
        while done < data.len() {
            match sys::fs::pwrite(&handle.file, &data[done..], offset + done as u64) {
                Ok(0) => return Err(Errno::IO.into()),
                Ok(n) => done += n,
                Err(Errno::INTR) => continue,
                Err(e) if done == 0 => return Err(e.into()),
                Err(_) => break,
            }
        }
        Ok(done)
    }

    pub fn fsync(&self, fh: u64, data_only: bool) -> Result<()> {
        let handle = self.file(fh)?;
        if !self.opts.syncs || !handle.writable {
            return Ok(());
        }
        Ok(sys::fs::fsync(&handle.file, data_only)?)
    }

    pub fn release(&self, fh: u64) {
        self.files.remove(&fh);
    }

    pub fn fallocate(&self, fh: u64, offset: u64, length: u64, mode: i32) -> Result<()> {
        let handle = self.file(fh)?;
        if !handle.writable {
            return Err(Errno::BADF.into());
        }
        let _charge = self.quota_fallocate(handle.ino, offset, length, mode)?;
        Ok(sys::fs::fallocate(&handle.file, mode, offset, length)?)
    }

    pub fn lseek(&self, fh: u64, offset: i64, whence: i32) -> Result<u64> {
        let handle = self.file(fh)?;
        Ok(sys::fs::lseek(self.readable(&handle)?, offset, whence)?)
    }

    pub fn copy_file_range(
        &self,
        fh_in: u64,
        off_in: u64,
        fh_out: u64,
        off_out: u64,
        len: u64,
    ) -> Result<usize> {
        let src = self.file(fh_in)?;
        let dst = self.file(fh_out)?;
        if !dst.writable {
            return Err(Errno::BADF.into());
        }
        let len = len.min(1 << 30) as usize;
        let copied = {
            let end = off_out.saturating_add(len as u64);
            let _charge = self.quota_charge(dst.ino, |old| old.max(end))?;
            sys::fs::copy_file_range(self.readable(&src)?, off_in, &dst.file, off_out, len)
        };
        match copied {
            // Layers on different filesystems: copy through the daemon.
            Err(Errno::XDEV) => {
                let data = self.read(fh_in, off_in, len.min(1 << 24) as u32)?;
                self.write(fh_out, off_out, &data)
            }
            other => Ok(other?),
        }
    }
}
