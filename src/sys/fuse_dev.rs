//! Passthrough backing files registered on a FUSE connection, for replies sent over
//! the ring (see [`super::fuse_ring`]), where fuser's `BackingId` (tied to its own
//! session) cannot be had.
//!
//! The kernel hands out a backing id for an open file (FUSE_DEV_IOC_BACKING_OPEN) that
//! an OPEN/CREATE reply names with FOPEN_PASSTHROUGH; it keeps its own reference to
//! the file for as long as some FUSE file uses it, so closing the id
//! (FUSE_DEV_IOC_BACKING_CLOSE) once the reply is sent only ends the id. Both ioctls
//! need CAP_SYS_ADMIN and a connection that negotiated FUSE_PASSTHROUGH.

#![cfg_attr(not(test), allow(dead_code))]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

/// `struct fuse_backing_map` (include/uapi/linux/fuse.h): the file's fd, flags (none
/// defined: 0), padding.
#[repr(C)]
struct BackingMap {
    fd: i32,
    flags: u32,
    padding: u64,
}

/// `_IOW(229, 1, struct fuse_backing_map)`.
const FUSE_DEV_IOC_BACKING_OPEN: u32 = 0x4010_e501;
/// `_IOW(229, 2, uint32_t)`.
const FUSE_DEV_IOC_BACKING_CLOSE: u32 = 0x4004_e502;

/// A backing id on one FUSE connection, closed on drop. Holds the connection's device
/// fd, which the close needs (an `Arc`, not a dup: one fd per open file would double
/// the daemon's fd use).
#[derive(Debug)]
pub struct RingBacking {
    dev: Arc<OwnedFd>,
    id: u32,
}

impl RingBacking {
    /// Registers `file` as a backing file on the connection of `dev` (/dev/fuse).
    pub fn open(dev: &Arc<OwnedFd>, file: BorrowedFd<'_>) -> io::Result<RingBacking> {
        let map = BackingMap {
            fd: file.as_raw_fd(),
            flags: 0,
            padding: 0,
        };
        // SAFETY: BACKING_OPEN reads one struct fuse_backing_map from the pointer,
        // which points at one that outlives the call.
        let r = unsafe {
            libc::ioctl(
                dev.as_raw_fd(),
                FUSE_DEV_IOC_BACKING_OPEN as libc::Ioctl,
                &raw const map,
            )
        };
        if r < 0 {
            let os = io::Error::last_os_error();
            let hint = match os.raw_os_error() {
                Some(libc::EPERM) => {
                    "needs CAP_SYS_ADMIN, a mounted connection and FUSE_PASSTHROUGH \
                     negotiated at INIT"
                }
                Some(libc::ELOOP) => "the file is too deep in stacked filesystems",
                Some(libc::EOPNOTSUPP) => "the kernel lacks CONFIG_FUSE_PASSTHROUGH",
                _ => "",
            };
            return Err(io::Error::new(
                os.kind(),
                format!("FUSE_DEV_IOC_BACKING_OPEN: {os}; {hint}"),
            ));
        }
        Ok(RingBacking {
            dev: dev.clone(),
            id: r as u32,
        })
    }

    /// The id an OPEN reply carries in `fuse_open_out.backing_id`.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Closes the id now, with its error (Drop does the same, logging it).
    pub fn close(self) -> io::Result<()> {
        let r = self.close_id();
        std::mem::forget(self);
        r
    }

    fn close_id(&self) -> io::Result<()> {
        // SAFETY: BACKING_CLOSE reads one u32 from the pointer, which points at our id.
        let r = unsafe {
            libc::ioctl(
                self.dev.as_raw_fd(),
                FUSE_DEV_IOC_BACKING_CLOSE as libc::Ioctl,
                &raw const self.id,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for RingBacking {
    fn drop(&mut self) {
        if let Err(e) = self.close_id() {
            log::debug!("FUSE_DEV_IOC_BACKING_CLOSE of backing id {}: {e}", self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_are_the_kernels() {
        // _IOW(type, nr, size) = 1 << 30 | size << 16 | type << 8 | nr.
        let iow = |nr: u32, size: usize| (1 << 30) | ((size as u32) << 16) | (229 << 8) | nr;
        assert_eq!(size_of::<BackingMap>(), 16);
        assert_eq!(FUSE_DEV_IOC_BACKING_OPEN, iow(1, size_of::<BackingMap>()));
        assert_eq!(FUSE_DEV_IOC_BACKING_CLOSE, iow(2, size_of::<u32>()));
    }

    #[test]
    fn backing_open_on_an_unmounted_device_is_refused_clearly() {
        if !crate::sys::fuse_ring::tests::fuse_available() {
            return;
        }
        let dev = crate::sys::mount::open_fuse_device().unwrap();
        let file = tempfile::tempfile().unwrap();
        use std::os::fd::AsFd;
        let err = RingBacking::open(&Arc::new(dev), file.as_fd()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied, "{err}");
        assert!(
            err.to_string().contains("FUSE_DEV_IOC_BACKING_OPEN"),
            "{err}"
        );
    }
}
