//! Extended attributes through the mount. Private overlay xattrs are invisible:
//! never listed, never read, never written.

use std::ffi::{OsStr, OsString};

use super::copy_up::CopyData;
use super::whiteout::is_private_xattr;
use super::{Errno, Ino, Result, Union};
use crate::sys::{self, xattr::Target};

impl Union {
    /// Runs `f` on the xattr target of `ino` in its top-most layer.
    fn with_xattr_target<T>(
        &self,
        ino: Ino,
        f: impl FnOnce(Target<'_>) -> sys::SysResult<T>,
    ) -> Result<T> {
        if !self.opts.xattrs {
            return Err(Errno::OPNOTSUPP.into());
        }
        let inode = self.inode(ino)?;
        self.object_target(&inode, |t| Ok(f(t)?))
    }

    pub fn getxattr(&self, ino: Ino, name: &OsStr) -> Result<Vec<u8>> {
        if is_private_xattr(name) {
            return Err(Errno::NODATA.into());
        }
        self.with_xattr_target(ino, |t| sys::xattr::get(t, name))
    }

    pub fn listxattr(&self, ino: Ino) -> Result<Vec<OsString>> {
        let names = self.with_xattr_target(ino, sys::xattr::list)?;
        Ok(names.into_iter().filter(|n| !is_private_xattr(n)).collect())
    }

    pub fn setxattr(&self, ino: Ino, name: &OsStr, value: &[u8], flags: i32) -> Result<()> {
        if is_private_xattr(name) {
            return Err(Errno::OPNOTSUPP.into());
        }
        self.check_writable()?;
        self.copy_up(&*self.inode(ino)?, CopyData::Meta)?;
        self.with_xattr_target(ino, |t| sys::xattr::set(t, name, value, flags))
    }

    pub fn removexattr(&self, ino: Ino, name: &OsStr) -> Result<()> {
        if is_private_xattr(name) {
            return Err(Errno::OPNOTSUPP.into());
        }
        self.check_writable()?;
        let inode = self.inode(ino)?;
        // Removing an attribute that is not there must not copy the file up.
        if !self.is_in_upper(&inode) {
            self.getxattr(ino, name)?;
        }
        self.copy_up(&inode, CopyData::Meta)?;
        self.with_xattr_target(ino, |t| sys::xattr::remove(t, name))
    }
}
