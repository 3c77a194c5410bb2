//! Named volumes: persistent directories kept in a state directory (`store`), which
//! mounts use (`claims`) and whose size may be limited (`quota`), and the `stratafs
//! volume` commands (`cli`). Grafting them into a merged view is the engine's
//! business (`union::graft`).

pub mod claims;
pub mod cli;
pub mod quota;
pub mod store;

use std::path::PathBuf;

pub use store::{Store, Volume, VolumeInfo};

/// Why a volume operation failed. Display is one line naming the volume or path.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("invalid volume name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error("no such volume: {0}")]
    NotFound(String),
    #[error("volume {0} already exists")]
    AlreadyExists(String),
    #[error("volume {name} is in use by {users}; stop those mounts or use --force")]
    InUse { name: String, users: String },
    #[error("volume {name} is exclusive and already mounted read-write by {holder}")]
    ExclusiveHeld { name: String, holder: String },
    #[error("no state directory: {0}")]
    NoStateDir(String),
    #[error("{}: {err}", path.display())]
    Io { path: PathBuf, err: std::io::Error },
    #[error("{0}")]
    Invalid(String),
}
