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
