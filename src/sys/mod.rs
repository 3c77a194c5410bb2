//! Every syscall stratafs makes on layer contents, and every `unsafe` block.
//!
//! Invariants the rest of the crate relies on:
//! - Operations on layer entries take a directory fd plus ONE path component. A
//!   component containing `/`, or equal to `.`/`..`, or empty, is refused with EINVAL,
//!   so no call here can walk out of the directory it was given.
//! - The final component is never followed if it is a symlink (O_NOFOLLOW,
//!   AT_SYMLINK_NOFOLLOW, l*xattr); a hostile layer's `etc -> /` is only ever read
//!   as a link, never traversed by the daemon.
//! - File descriptors are close-on-exec.

pub mod at_calls;
pub mod fs;
pub mod fuse_dev;
pub mod fuse_ring;
pub mod lock;
pub mod mount;
pub mod process;
mod uring;
pub mod xattr;

pub use rustix::io::Errno;

pub type SysResult<T> = Result<T, Errno>;

/// Converts a std io error (from std::fs calls on config paths) into an errno.
pub fn errno_of(err: &std::io::Error) -> Errno {
    Errno::from_io_error(err).unwrap_or(Errno::IO)
}
