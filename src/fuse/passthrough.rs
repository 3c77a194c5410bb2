//! How each open inode does its I/O: through a kernel backing file (FUSE
//! passthrough) or served by the daemon.
//!
//! Invariants (the kernel's rules, fs/fuse/passthrough.c and iomode.c):
//! - every open of one inode agrees while any is open: all passthrough with one
//!   backing file, or all served. So an inode's `backing` is set exactly while
//!   `passthrough_opens > 0`, and then `served_opens == 0`;
//!   `passthrough_writers <= passthrough_opens`.
//! - once a backing file is refused, passthrough stays off for the mount (`lost`):
//!   data written through backing files may then be missing from the page cache of
//!   the served opens that follow.
//!
//! The state is generic over the backing id so that it can be tested without a
//! kernel; the adapter uses fuser's `BackingId`.

use std::collections::HashMap;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use dashmap::DashMap;
use parking_lot::Mutex;

/// What an open should be answered with.
pub(super) enum IoChoice<B> {
    Passthrough(Arc<B>),
    Served,
}

/// The opens of one inode; see the module's invariants.
struct InodeIo<B> {
    backing: Option<Arc<B>>,
    passthrough_opens: usize,
    /// Passthrough opens that may write, through write(2) or a shared mapping.
    passthrough_writers: usize,
    served_opens: usize,
}

impl<B> Default for InodeIo<B> {
    fn default() -> Self {
        InodeIo {
            backing: None,
            passthrough_opens: 0,
            passthrough_writers: 0,
            served_opens: 0,
        }
    }
}

#[derive(Clone, Copy)]
struct HandleIo {
    ino: u64,
    passthrough: bool,
    writable: bool,
}

/// What an open asks of [`IoModes::choose`].
pub(super) struct OpenIo {
    pub fh: u64,
    pub ino: u64,
    pub writable: bool,
    /// The file's data stays in the real file it is in now (see the adapter's
    /// `choose_io`), so a backing file may be bound to it.
    pub fixed_data: bool,
}

pub(super) struct IoModes<B> {
    /// Passthrough was asked for by the configuration.
    wanted: bool,
    /// The kernel agreed to passthrough at init, and no backing file was refused.
    enabled: AtomicBool,
    /// Passthrough was on and then refused.
    lost: AtomicBool,
    /// Inode -> how its opens do I/O.
    inodes: Mutex<HashMap<u64, InodeIo<B>>>,
    /// File handle -> the inode and how the open does I/O.
    handles: DashMap<u64, HandleIo>,
}

impl<B> IoModes<B> {
    pub(super) fn new(wanted: bool) -> Self {
        IoModes {
            wanted,
            enabled: AtomicBool::new(false),
            lost: AtomicBool::new(false),
            inodes: Mutex::new(HashMap::new()),
            handles: DashMap::new(),
        }
    }

    pub(super) fn wanted(&self) -> bool {
        self.wanted
    }

    /// The kernel agreed to passthrough at init.
    pub(super) fn enable(&self) {
        self.enabled.store(true, Ordering::Relaxed);
    }

    /// Passthrough was refused after it had been on.
    pub(super) fn lost(&self) -> bool {
        self.lost.load(Ordering::Relaxed)
    }

    /// Chooses how the open `o` does its I/O and records it under its handle.
    /// `open_backing` makes the backing file; it is called only for the first
    /// passthrough open of an inode. Returns the choice and whether this open is
    /// the inode's first passthrough writer.
    pub(super) fn choose(
        &self,
        o: &OpenIo,
        open_backing: impl FnOnce() -> io::Result<B>,
    ) -> (IoChoice<B>, bool) {
        let mut inodes = self.inodes.lock();
        let state = inodes.entry(o.ino).or_default();
        let choice =
            if !o.fixed_data || !self.enabled.load(Ordering::Relaxed) || state.served_opens > 0 {
                IoChoice::Served
            } else if let Some(b) = &state.backing {
                IoChoice::Passthrough(b.clone())
            } else {
                match open_backing() {
                    Ok(id) => {
                        let id = Arc::new(id);
                        state.backing = Some(id.clone());
                        IoChoice::Passthrough(id)
                    }
                    Err(e) => {
                        log::info!("passthrough unavailable ({e}); serving I/O in the daemon");
                        self.enabled.store(false, Ordering::Relaxed);
                        self.lost.store(true, Ordering::Relaxed);
                        IoChoice::Served
                    }
                }
            };
        let mut first_writer = false;
        let passthrough = match choice {
            IoChoice::Passthrough(_) => {
                state.passthrough_opens += 1;
                if o.writable {
                    state.passthrough_writers += 1;
                    first_writer = state.passthrough_writers == 1;
                }
                true
            }
            IoChoice::Served => {
                state.served_opens += 1;
                false
            }
        };
        self.handles.insert(
            o.fh,
            HandleIo {
                ino: o.ino,
                passthrough,
                writable: o.writable,
            },
        );
        (choice, first_writer)
    }

    /// Whether `ino` has an open that writes through a backing file.
    pub(super) fn has_passthrough_writer(&self, ino: u64) -> bool {
        self.inodes
            .lock()
            .get(&ino)
            .is_some_and(|s| s.passthrough_writers > 0)
    }

    /// The open `fh` was released.
    pub(super) fn end(&self, fh: u64) {
        let Some((
            _,
            HandleIo {
                ino,
                passthrough,
                writable,
            },
        )) = self.handles.remove(&fh)
        else {
            return;
        };
        let mut inodes = self.inodes.lock();
        if let Some(state) = inodes.get_mut(&ino) {
            if passthrough {
                state.passthrough_opens = state.passthrough_opens.saturating_sub(1);
                if writable {
                    state.passthrough_writers = state.passthrough_writers.saturating_sub(1);
                }
            } else {
                state.served_opens = state.served_opens.saturating_sub(1);
            }
            if state.passthrough_opens == 0 && state.served_opens == 0 {
                inodes.remove(&ino);
            }
        }
    }
}
