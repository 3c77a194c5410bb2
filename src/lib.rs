//! stratafs: a copy-on-write union filesystem in userspace.
//!
//! Used as a library, it opens a merged view of layers in-process: [`Engine`] (built
//! with [`Engine::builder`]) answers path-based requests with the same union logic a
//! mount serves, and its [`Node`] and [`File`] handles give back what they hold when
//! dropped. [`options::parse`] reads a mount's `-o` string into a [`MountConfig`];
//! [`cli::command`] is the command line's definition (man page, completions).
//! Everything else is private to the crate (the `testing` feature exposes what the
//! tests and fuzz targets drive).
//!
//! Inside, the crate is layered: `union` is the engine (lookup, readdir merge,
//! copy-up, whiteouts, inode table) and knows nothing of FUSE; `fuse` is a thin
//! adapter that is the only importer of `fuser`; `sys` holds every syscall made on
//! layer contents (fd-relative, never following a symlink out of a layer) and all
//! `unsafe`: the compiler refuses it anywhere else.

#![deny(unsafe_code)]

mod app;
pub mod cli;
pub mod config;
mod demo;
mod engine;
mod fuse;
mod layer;
pub mod options;
#[allow(unsafe_code)]
mod sys;
#[cfg(feature = "testing")]
pub mod testing;
mod union;
mod volume;

pub use app::main;
pub use config::MountConfig;
pub use engine::{
    Attr, DirEntry, Engine, EngineBuilder, Errno, Error, File, Node, SetupError, Time,
};
