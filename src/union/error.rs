//! The engine's error: the errno a request is answered with, and, where the engine
//! knows it, what it was doing on which entry of which layer when it failed.
//!
//! Invariants: the errno is the one the caller gets; context never changes it. An
//! error is two words (errno and an optional box) so the `Result`s of the hot paths
//! stay small, and the box is only allocated on failure. Context is added where the
//! failing step is known (copy-up, whiteouts, redirects, reading a layer's markers);
//! the FUSE adapter adds the operation and the merged path when it logs, at exactly
//! one place (`fuse::adapter::Adapter::fail`), with the level `Error::is_expected`
//! chooses.

use std::ffi::OsStr;
use std::fmt;

use super::Union;
use crate::layer::LayerIdx;
use crate::sys::Errno;

pub type Result<T> = std::result::Result<T, Error>;

pub struct Error {
    errno: Errno,
    context: Option<Box<Context>>,
}

struct Context {
    /// What the engine was doing, as a gerund phrase: "copying up", "writing a whiteout".
    doing: &'static str,
    /// The entry concerned, relative to the layer's root (or a bare name).
    path: Option<Box<OsStr>>,
    /// The layer the entry concerned comes from (a copy-up's source, the lower layer
    /// whose markers were being read), with its directory.
    layer: Option<(LayerIdx, Box<std::path::Path>)>,
}

impl Error {
    pub fn errno(&self) -> Errno {
        self.errno
    }

    /// The errno a client sees for a request that failed for a reason it cannot act
    /// on differently (ENOENT, EEXIST, EACCES...), as opposed to a fault of a layer or
    /// of the host (EIO, ENOSPC, ELOOP...): logged at debug level rather than warn.
    pub fn is_expected(&self) -> bool {
        matches!(
            self.errno,
            Errno::NOENT
                | Errno::EXIST
                | Errno::NOTEMPTY
                | Errno::NODATA
                | Errno::ROFS
                | Errno::XDEV
                | Errno::PERM
                | Errno::ACCESS
                | Errno::NOTDIR
                | Errno::ISDIR
                | Errno::INVAL
                | Errno::NAMETOOLONG
                | Errno::RANGE
                | Errno::OPNOTSUPP
                | Errno::NOTTY
                | Errno::TXTBSY
        )
    }

    /// Says what was being done, unless an inner step already did: the innermost
    /// context is the most precise one.
    pub fn doing(mut self, doing: &'static str) -> Error {
        let ctx = self.context_mut();
        if ctx.doing.is_empty() {
            ctx.doing = doing;
        }
        self
    }

    /// Names the entry concerned, unless an inner step already did.
    pub fn on(mut self, path: &OsStr) -> Error {
        let ctx = self.context_mut();
        if ctx.path.is_none() {
            ctx.path = Some(path.into());
        }
        self
    }

    /// Names the layer the entry comes from, unless an inner step already did.
    pub fn in_layer(mut self, idx: LayerIdx, dir: &std::path::Path) -> Error {
        let ctx = self.context_mut();
        if ctx.layer.is_none() {
            ctx.layer = Some((idx, dir.into()));
        }
        self
    }

    /// The context, made empty on first use (allocated only on this failure path).
    fn context_mut(&mut self) -> &mut Context {
        self.context.get_or_insert_with(|| {
            Box::new(Context {
                doing: "",
                path: None,
                layer: None,
            })
        })
    }
}

/// Context on a failing result of the engine or of a syscall.
pub trait WithContext<T> {
    fn doing(self, doing: &'static str) -> Result<T>;
    fn on(self, path: &OsStr) -> Result<T>;
    /// Names layer `idx` of `union` as the one the entry comes from.
    fn in_layer_of(self, union: &Union, idx: LayerIdx) -> Result<T>;
}

impl<T, E: Into<Error>> WithContext<T> for std::result::Result<T, E> {
    fn doing(self, doing: &'static str) -> Result<T> {
        self.map_err(|e| e.into().doing(doing))
    }
    fn on(self, path: &OsStr) -> Result<T> {
        self.map_err(|e| e.into().on(path))
    }
    fn in_layer_of(self, union: &Union, idx: LayerIdx) -> Result<T> {
        self.map_err(|e| union.error_from_layer(e.into(), idx))
    }
}

impl From<Errno> for Error {
    fn from(errno: Errno) -> Error {
        Error {
            errno,
            context: None,
        }
    }
}

impl From<Error> for Errno {
    fn from(e: Error) -> Errno {
        e.errno
    }
}

impl PartialEq for Error {
    /// Errors are equal when a client could not tell them apart: by errno.
    fn eq(&self, other: &Error) -> bool {
        self.errno == other.errno
    }
}

impl Eq for Error {}

impl PartialEq<Errno> for Error {
    fn eq(&self, other: &Errno) -> bool {
        self.errno == *other
    }
}

impl fmt::Display for Error {
    /// `Input/output error (os error 5) while copying up "/a/b" from layer 2 (/l/2)`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", std::io::Error::from(self.errno))?;
        if let Some(ctx) = &self.context {
            if !ctx.doing.is_empty() {
                write!(f, " while {}", ctx.doing)?;
            }
            if let Some(p) = &ctx.path {
                write!(f, " {p:?}")?;
            }
            if let Some((idx, dir)) = &ctx.layer {
                write!(f, " from layer {idx} ({})", dir.display())?;
            }
        }
        Ok(())
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.errno)?;
        if self.context.is_some() {
            write!(f, " ({self})")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {}

impl From<Error> for std::io::Error {
    fn from(e: Error) -> std::io::Error {
        std::io::Error::from(e.errno)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_innermost_context_wins_and_the_errno_never_changes() {
        let e = Error::from(Errno::IO)
            .doing("reading a redirect")
            .on(OsStr::new("a/b"))
            .in_layer(2, std::path::Path::new("/l2"))
            .doing("looking up")
            .on(OsStr::new("b"));
        assert_eq!(e, Errno::IO);
        let text = e.to_string();
        assert!(
            text.ends_with("while reading a redirect \"a/b\" from layer 2 (/l2)"),
            "{text}"
        );
        assert!(!e.is_expected());
        assert!(Error::from(Errno::NOENT).is_expected());
    }

    #[test]
    fn an_error_stays_two_words() {
        assert!(std::mem::size_of::<Error>() <= 2 * std::mem::size_of::<usize>());
    }
}
