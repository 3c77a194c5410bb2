//! stratafs: a copy-on-write union filesystem in userspace.
//!
//! The crate is layered: [`union`] is the engine (lookup, readdir merge, copy-up,
//! whiteouts, inode table) and knows nothing of FUSE; [`fuse`] is a thin adapter that
//! is the only importer of `fuser`; [`sys`] holds every syscall made on layer contents
//! (fd-relative, never following a symlink out of a layer) and all `unsafe`: the
//! compiler refuses it anywhere else.

#![deny(unsafe_code)]

pub mod cli;
pub mod config;
pub mod fuse;
pub mod layer;
pub mod options;
#[allow(unsafe_code)]
pub mod sys;
#[cfg(feature = "testing")]
pub mod testing;
pub mod union;
pub mod volume;

pub use config::MountConfig;
pub use union::Union;
