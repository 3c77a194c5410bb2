//! Reference-model testing (feature `testing`): random operation sequences applied
//! to the engine (or to a mount) and to a model of the merged view simple enough to
//! be obviously right, compared after every operation. Used by the integration
//! tests (tests/it/model.rs) and the cargo-fuzz targets (fuzz/).
//!
//! - [`ops`]: the operations, over a tiny name alphabet so that they collide.
//! - [`layers`]: generated lower layers, with both whiteout and opaque formats.
//! - [`model`]: the model and the errno each operation must give.
//! - [`runner`]: the engine as the system under test, and the comparison loop.
//!
//! The same operations on a mounted directory (FUSE or kernel overlayfs) are made by
//! the integration tests' fixture (tests/it/fixture/mounted_subject.rs), through the
//! one executor of path system calls the differential tests use too: some of those
//! calls have no safe wrapper, and this crate admits `unsafe` only in `sys`.

pub mod layers;
pub mod model;
pub mod ops;
pub mod runner;

/// The errno type of [`model::OpResult`], for subjects outside this crate.
pub use crate::union::Errno;
/// The product's own list of the xattr namespaces a union filesystem keeps to itself,
/// so that tests checking "never shown" check exactly what the engine hides.
pub use crate::union::whiteout::is_private_xattr;
pub use layers::Scenario;
pub use model::Model;
pub use ops::{Op, RelPath, RenameFlag, p};
pub use runner::{Checks, EngineSubject, Subject, check_sequence, run_engine};

/// The engine's request API, as the FUSE adapter drives it, for the tests that call
/// it directly (tests/it/engine.rs, graft_engine.rs). Not the library's public API
/// ([`crate::Engine`] is), which is why it is only here.
pub mod engine {
    /// What a mount does to open its union: grafts attached (volumes created and
    /// claimed), then the engine built on them.
    pub use crate::fuse::open_engine as open_as_mount;
    pub use crate::union::{
        Caller, DEFAULT_TTL, Errno, GRAFT_TTL, Ino, ROOT_INO, RenameMode, SetAttr, Setup, Union,
    };
    pub use crate::volume::attach::GraftSources;
}

/// The on-disk codecs, for the fuzz target that feeds them hostile bytes.
pub mod codecs {
    pub use crate::union::{override_stat, whiteout};
}

/// Inodes the engine behind `engine` holds (the root included): what dropped
/// [`crate::Node`] and [`crate::File`] handles must have given back.
pub fn held_inodes(engine: &crate::Engine) -> usize {
    engine.union.inode_count()
}
