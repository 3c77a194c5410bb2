//! Named volumes: persistent directories kept in a state directory (`store`), which
//! mounts use (`claims`) and whose size may be limited (`quota`), and the `stratafs
//! volume` commands (`cli`). Attaching them to a mount (`attach`) opens their
//! directories for the engine, which grafts them into the merged view (`union::graft`).

pub(crate) mod attach;
pub mod claims;
pub mod cli;
pub mod quota;
pub mod store;

use std::path::PathBuf;

pub use store::{Access, Store, Volume, VolumeInfo};

/// Why a volume operation failed. Display is one line naming the volume or path.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("invalid volume name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error("no such volume: {0}")]
    NotFound(String),
    /// Missing, and the mount said `:nocreate`.
    #[error("volume {0} does not exist (:nocreate); create it with 'stratafs volume create {0}'")]
    NoCreate(String),
    #[error("volume {0} already exists")]
    AlreadyExists(String),
    #[error("volume {name} is in use by {users}; stop those mounts or use --force")]
    InUse { name: String, users: String },
    #[error(
        "volume {name} is exclusive (access {access}, {}: {}) and already mounted by {holder}",
        access.kubernetes_name(),
        access.rule()
    )]
    ExclusiveHeld {
        name: String,
        access: Access,
        holder: String,
    },
    #[error(
        "volume {name} is read-only (access rox, ReadOnlyMany): graft it with :ro \
         (volume={name}:/PATH:ro) or mount without an upper layer"
    )]
    ReadOnlyMany { name: String },
    #[error(
        "volume {name} uses {} ({used} bytes), more than the new size limit {} ({limit} \
         bytes); free space first or pick a larger size",
        cli::human_bytes(*used),
        cli::human_bytes(*limit)
    )]
    TooSmall { name: String, limit: u64, used: u64 },
    #[error("no state directory: {0}")]
    NoStateDir(String),
    #[error("{}: {err}", path.display())]
    Io { path: PathBuf, err: std::io::Error },
    #[error("{0}")]
    Invalid(String),
}
