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
//! Locking: each inode's state has a mutex of its own, held while the open is
//! decided and counted, including across the backing-file ioctl
//! (FUSE_DEV_IOC_BACKING_OPEN) and the engine's `open_upper_rdwr` in the first
//! passthrough open. The invariants above are per inode, so this is all they need:
//! first opens of different files do not queue behind each other. The map of
//! inodes (dashmap shards) is never held while an inode's mutex is taken; `end`
//! takes the map's shard while holding the mutex to remove the emptied state,
//! which is marked `retired` first so that an open that fetched it just before
//! fetches a fresh one. `enabled` and `lost` are atomics: a refusal on one inode
//! turns passthrough off for the opens that come after it, as if the other opens
//! racing with it had come first. The mutex ranks after no engine lock (the
//! engine never calls the adapter) and before every engine lock.
//!
//! The state is generic over the backing id so that it can be tested without a
//! kernel; the adapter uses fuser's `BackingId`.

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
    /// No open is left and the state is being taken out of the map: an open that
    /// finds it so fetches the inode's state again.
    retired: bool,
}

impl<B> Default for InodeIo<B> {
    fn default() -> Self {
        InodeIo {
            backing: None,
            passthrough_opens: 0,
            passthrough_writers: 0,
            served_opens: 0,
            retired: false,
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
    inodes: DashMap<u64, Arc<Mutex<InodeIo<B>>>>,
    /// File handle -> the inode and how the open does I/O.
    handles: DashMap<u64, HandleIo>,
}

impl<B> IoModes<B> {
    pub(super) fn new(wanted: bool) -> Self {
        IoModes {
            wanted,
            enabled: AtomicBool::new(false),
            lost: AtomicBool::new(false),
            inodes: DashMap::new(),
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
        let mut state = loop {
            // The shard guard ends with the statement, before the mutex is taken.
            let slot = self.inodes.entry(o.ino).or_default().clone();
            let state = slot.lock_arc();
            if !state.retired {
                break state;
            }
        };
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
        let Some(slot) = self.inodes.get(&ino).map(|s| s.clone()) else {
            return false;
        };
        slot.lock().passthrough_writers > 0
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
        let Some(slot) = self.inodes.get(&ino).map(|s| s.clone()) else {
            return;
        };
        let mut state = slot.lock();
        if passthrough {
            state.passthrough_opens = state.passthrough_opens.saturating_sub(1);
            if writable {
                state.passthrough_writers = state.passthrough_writers.saturating_sub(1);
            }
        } else {
            state.served_opens = state.served_opens.saturating_sub(1);
        }
        if state.passthrough_opens == 0 && state.served_opens == 0 {
            state.retired = true;
            state.backing = None;
            self.inodes.remove_if(&ino, |_, v| Arc::ptr_eq(v, &slot));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::sync::mpsc;
    use std::thread;
    use std::time::Duration;

    use super::*;

    fn modes() -> Arc<IoModes<u64>> {
        let m = Arc::new(IoModes::new(true));
        m.enable();
        m
    }

    fn open(fh: u64, ino: u64, writable: bool) -> OpenIo {
        OpenIo {
            fh,
            ino,
            writable,
            fixed_data: true,
        }
    }

    #[test]
    fn first_opens_of_different_inodes_do_not_wait_for_each_others_backing_file() {
        let m = modes();
        let (entered_tx, entered_rx) = mpsc::channel();
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let slow = {
            let m = m.clone();
            thread::spawn(move || {
                m.choose(&open(1, 10, false), || {
                    entered_tx.send(()).unwrap();
                    // Bounded, so that a regression fails the test instead of hanging it.
                    let _ = release_rx.recv_timeout(Duration::from_secs(10));
                    Ok(10)
                });
            })
        };
        entered_rx.recv().unwrap();
        let (done_tx, done_rx) = mpsc::channel();
        let other = {
            let m = m.clone();
            thread::spawn(move || {
                let (choice, _) = m.choose(&open(2, 20, false), || Ok(20));
                done_tx
                    .send(matches!(choice, IoChoice::Passthrough(b) if *b == 20))
                    .unwrap();
            })
        };
        let finished = done_rx.recv_timeout(Duration::from_secs(3));
        release_tx.send(()).unwrap();
        slow.join().unwrap();
        other.join().unwrap();
        assert_eq!(
            finished,
            Ok(true),
            "the open of inode 20 waited for the backing file of inode 10"
        );
    }

    #[test]
    fn concurrent_first_opens_of_one_inode_share_one_backing_file() {
        let m = modes();
        let made = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..8)
            .map(|fh| {
                let (m, made) = (m.clone(), made.clone());
                thread::spawn(move || {
                    let (choice, _) = m.choose(&open(fh, 7, fh % 2 == 0), || {
                        thread::sleep(Duration::from_millis(20));
                        Ok(100 + made.fetch_add(1, Ordering::SeqCst) as u64)
                    });
                    match choice {
                        IoChoice::Passthrough(b) => *b,
                        IoChoice::Served => 0,
                    }
                })
            })
            .collect();
        let ids: Vec<u64> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        assert_eq!(made.load(Ordering::SeqCst), 1);
        assert!(ids.iter().all(|&id| id == 100), "{ids:?}");
        assert!(m.has_passthrough_writer(7));
    }

    #[test]
    fn an_inode_served_while_open_is_served_until_its_last_close_then_may_pass_through() {
        let m = modes();
        let served = OpenIo {
            fixed_data: false,
            ..open(1, 5, false)
        };
        assert!(matches!(m.choose(&served, || Ok(1)).0, IoChoice::Served));
        // fixed now, but a served open lasts: the kernel forbids mixing modes
        assert!(matches!(
            m.choose(&open(2, 5, true), || Ok(2)).0,
            IoChoice::Served
        ));
        assert!(!m.has_passthrough_writer(5));
        m.end(1);
        m.end(2);
        let (choice, first_writer) = m.choose(&open(3, 5, true), || Ok(3));
        assert!(matches!(choice, IoChoice::Passthrough(b) if *b == 3));
        assert!(first_writer);
        m.end(3);
        assert!(!m.has_passthrough_writer(5));
        // the backing file went with the last open: the next one makes a new one
        assert!(matches!(
            m.choose(&open(4, 5, false), || Ok(4)).0,
            IoChoice::Passthrough(b) if *b == 4
        ));
    }

    #[test]
    fn a_refused_backing_file_turns_passthrough_off_for_later_opens() {
        let m = modes();
        let (choice, _) = m.choose(&open(1, 5, false), || {
            Err(io::Error::from_raw_os_error(libc::EPERM))
        });
        assert!(matches!(choice, IoChoice::Served));
        assert!(m.lost());
        assert!(matches!(
            m.choose(&open(2, 6, false), || Ok(6)).0,
            IoChoice::Served
        ));
    }
}
