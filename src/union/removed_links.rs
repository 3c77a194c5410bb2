//! Link counts of lower hard-link groups some of whose names were removed through
//! the mount.
//!
//! A removed lower name becomes a whiteout, and the group's other names keep showing
//! the lower file, whose own st_nlink still counts the removed name. Copying the
//! group up so that its count is right (what the first write through any of its
//! names does, see hardlink.rs) would cost a copy of the data on every `rm -rf` of
//! a hard-link dedup checkout. So a removal is recorded
//! instead, and the count shown is the lower one minus the recorded removals: kernel
//! overlayfs counts the same way through its index (an nlink relative to the lower).
//!
//! Invariants:
//! - A record is keyed by the removed name's layer (counted from the bottom, as index
//!   entries are) and the lower st_ino, and holds the lower object's ctime at the
//!   removal. A lower file whose own links changed since (offline, in the layer) has
//!   another ctime, and the record no longer applies to it.
//! - Records count only for inodes whose top layer is a lower one: once the group is
//!   copied up, the upper copy's count is the truth, and its records are dropped.
//! - Records persist in `workdir/#stratafs-removed-links`: a removal appends one
//!   line before its whiteout is made (with the name's path) and one after. A
//!   removal begun and not reported done counts at the next mount only if its name
//!   no longer shows the lower object, so a crash anywhere leaves the count exact.
//!   The log is compacted at mount; reading it is bounded by [`MAX_LOG_BYTES`].
//!
//! Locking: `records` is held across each change to it and the append that goes
//! with it, so that the log's order is the map's; `log` is taken under it, and
//! alone for a removal's first line (written before its whiteout).

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;
use rustix::fs::OFlags;

use super::hardlink::{index_key, parse_index_key};
use super::inode::Inode;
use super::{Errno, Result, UPPER, Union, WithContext};
use crate::layer::LayerIdx;
use crate::sys::{self, fs::RenameKind};

/// The log's name in the work directory (beside `work`, the index and the shared
/// whiteout; kernel overlayfs looks at none of them).
pub(crate) const REMOVED_LINKS_LOG: &str = "#stratafs-removed-links";

/// The most of the log read at mount: 16 MiB is some 400,000 removals, far more
/// than compaction ever leaves; what lies beyond is ignored with a warning.
const MAX_LOG_BYTES: u64 = 16 << 20;

/// (layer counted from the bottom, lower st_ino).
type Key = (usize, u64);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Record {
    ctime: (i64, u64),
    count: u32,
}

#[derive(Default)]
pub(crate) struct RemovedLinks {
    records: Mutex<HashMap<Key, Record>>,
    /// Whether any record was ever made or loaded, read without the lock: every stat
    /// of a multiply-linked lower file asks, and nearly all mounts have none.
    any: AtomicBool,
    /// The log, opened for appending at the first line this mount writes (a mount
    /// that removes no such name leaves the work directory as it found it).
    log: Mutex<Option<File>>,
}

/// One line of the log. A removal is written twice, around its whiteout, so that a
/// crash between the two is resolved at the next mount by looking at the name.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Line {
    /// `<key> <ctime> ? <path>`: the name at `path` of the merged view is about to go.
    Removing(Key, Ctime, OsString),
    /// `<key> <ctime> + <path>`: it went.
    Removed(Key, Ctime, OsString),
    /// `<key> <ctime> +<count>`: removals counted (what compaction writes).
    Counted(Key, Record),
    /// `<key> copied`: the group was copied up; its record is dropped.
    Copied(Key),
}

type Ctime = (i64, u64);

/// A key as the log writes it: the name of the index entry its group's copy would
/// have (see hardlink.rs).
fn key_text((layer, ino): Key) -> String {
    index_key(layer, ino).to_string_lossy().into_owned()
}

fn ctime_of(st: &sys::fs::Stat) -> Ctime {
    (st.st_ctime, st.st_ctime_nsec)
}

/// A path as one field: bytes other than printable ASCII, and `%`, as `%XX`.
fn encode_path(path: &OsStr) -> String {
    let mut out = String::with_capacity(path.len());
    for b in path.as_bytes() {
        match b {
            b'!'..=b'~' if *b != b'%' => out.push(char::from(*b)),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

fn decode_path(text: &str) -> Option<OsString> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Some(OsString::from_vec(out))
}

fn parse_ctime(text: &str) -> Option<Ctime> {
    let (s, ns) = text.split_once('.')?;
    Some((s.parse().ok()?, ns.parse().ok()?))
}

impl Line {
    fn parse(line: &str) -> Option<Line> {
        let mut fields = line.split(' ');
        let key = parse_index_key(OsStr::new(fields.next()?))?;
        let line = match fields.next()? {
            "copied" => Line::Copied(key),
            ctime => {
                let ctime = parse_ctime(ctime)?;
                match fields.next()? {
                    "?" => Line::Removing(key, ctime, decode_path(fields.next()?)?),
                    "+" => Line::Removed(key, ctime, decode_path(fields.next()?)?),
                    count => {
                        let count = count.strip_prefix('+')?.parse().ok()?;
                        Line::Counted(key, Record { ctime, count })
                    }
                }
            }
        };
        fields.next().is_none().then_some(line)
    }

    fn render(&self) -> String {
        let ctime = |(s, ns): Ctime| format!("{s}.{ns:09}");
        match self {
            Line::Removing(key, c, path) | Line::Removed(key, c, path) => {
                let mark = if matches!(self, Line::Removing(..)) {
                    '?'
                } else {
                    '+'
                };
                let (key, path) = (key_text(*key), encode_path(path));
                format!("{key} {} {mark} {path}\n", ctime(*c))
            }
            Line::Counted(key, r) => {
                format!("{} {} +{}\n", key_text(*key), ctime(r.ctime), r.count)
            }
            Line::Copied(key) => format!("{} copied\n", key_text(*key)),
        }
    }
}

/// Adds `count` removals of lower object `key` with `ctime`; a record of another
/// ctime starts afresh (the lower file changed between them).
fn add(records: &mut HashMap<Key, Record>, key: Key, ctime: Ctime, count: u32) {
    let slot = records.entry(key).or_insert(Record { ctime, count: 0 });
    if slot.ctime != ctime {
        *slot = Record { ctime, count: 0 };
    }
    slot.count = slot.count.saturating_add(count);
}

/// Replays log text into records. A removal begun and not reported done (a crash
/// came in between) counts when `still_shown(key, path)` says its name is gone. A
/// torn last line, as a crash leaves, is no line.
fn replay(text: &str, mut still_shown: impl FnMut(Key, &OsStr) -> bool) -> HashMap<Key, Record> {
    let mut records: HashMap<Key, Record> = HashMap::new();
    let mut begun: HashMap<(Key, OsString), (Ctime, u32)> = HashMap::new();
    for line in text.lines().filter_map(Line::parse) {
        match line {
            Line::Removing(key, ctime, path) => {
                begun.entry((key, path)).or_insert((ctime, 0)).1 += 1;
            }
            Line::Removed(key, ctime, path) => {
                if let Some(b) = begun.get_mut(&(key, path)) {
                    b.1 = b.1.saturating_sub(1);
                }
                add(&mut records, key, ctime, 1);
            }
            Line::Counted(key, r) => add(&mut records, key, r.ctime, r.count),
            Line::Copied(key) => {
                records.remove(&key);
                begun.retain(|(k, _), _| *k != key);
            }
        }
    }
    for ((key, path), (ctime, n)) in begun {
        if n > 0 && !still_shown(key, &path) {
            add(&mut records, key, ctime, 1);
        }
    }
    records
}

impl RemovedLinks {
    /// Appends `line` to the log in work directory `root`. Best effort: a line not
    /// written leaves the count shown after a remount one too high at worst.
    fn append(&self, root: BorrowedFd<'_>, line: &Line) {
        let mut log = self.log.lock();
        if log.is_none() {
            let flags = OFlags::WRONLY | OFlags::APPEND | OFlags::CREATE;
            match sys::fs::open_at(root, OsStr::new(REMOVED_LINKS_LOG), flags, 0o600) {
                Ok(f) => *log = Some(f),
                Err(e) => {
                    log::warn!("opening {REMOVED_LINKS_LOG} to record a removed hard link: {e}");
                    return;
                }
            }
        }
        if let Some(mut f) = log.as_ref() {
            if let Err(e) = f.write_all(line.render().as_bytes()) {
                log::warn!("recording a removed hard link in {REMOVED_LINKS_LOG}: {e}");
            }
        }
    }
}

/// A removal of a name of a lower hard-link group under way (see
/// [`Union::removing_link`]).
pub(crate) struct LinkRemoval {
    key: Key,
    ctime: Ctime,
    path: OsString,
}

impl Union {
    /// Reads and compacts the log of earlier mounts, and opens it for this one's
    /// removals (run at mount, before anything is served).
    pub(crate) fn load_removed_links(&self) -> Result<()> {
        let Some(root) = self.workdir_root.as_ref() else {
            return Ok(());
        };
        let name = OsStr::new(REMOVED_LINKS_LOG);
        let text = match sys::fs::open_regular_at(root.as_fd(), name, OFlags::RDONLY) {
            Ok((file, st)) => {
                if st.st_size as u64 > MAX_LOG_BYTES {
                    log::warn!(
                        "{REMOVED_LINKS_LOG}: only the first {MAX_LOG_BYTES} bytes read; \
                         link counts of later removals are shown as the lower layer's"
                    );
                }
                let mut bytes = Vec::new();
                file.take(MAX_LOG_BYTES)
                    .read_to_end(&mut bytes)
                    .map_err(|e| sys::errno_of(&e))
                    .doing("reading the removed hard links")?;
                String::from_utf8_lossy(&bytes).into_owned()
            }
            Err(Errno::NOENT) => String::new(),
            Err(e) => return Err(e).doing("opening the removed hard links"),
        };
        let records = replay(&text, |key, path| self.still_shows(key, path));
        // Compacted: one line per record, staged and renamed over the old log.
        let compact: String = records
            .iter()
            .map(|(k, r)| Line::Counted(*k, *r).render())
            .collect();
        if compact.is_empty() && !text.is_empty() {
            sys::fs::unlink_at(root.as_fd(), name).doing("removing the removed hard links")?;
        } else if compact != text {
            self.publish_from_work(
                |work, temp| {
                    let mut f = sys::fs::open_at(
                        work,
                        temp,
                        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL,
                        0o600,
                    )?;
                    f.write_all(compact.as_bytes())
                        .map_err(|e| sys::errno_of(&e))?;
                    Ok(())
                },
                root.as_fd(),
                name,
                RenameKind::Replace,
            )
            .doing("compacting the removed hard links")?;
        }
        let mut held = self.removed_links.records.lock();
        *held = records;
        self.removed_links
            .any
            .store(!held.is_empty(), Ordering::Release);
        Ok(())
    }

    /// Whether `path` of the merged view still shows the lower object `key` stands
    /// for (a removal of it was begun, and a crash may have come before its whiteout).
    fn still_shows(&self, (from_bottom, ino): Key, path: &OsStr) -> bool {
        let Some(layer) = self.bottom_layer().checked_sub(from_bottom) else {
            return false;
        };
        let Ok(dev) = self.layer(layer).map(|l| l.dev) else {
            return false;
        };
        let mut shown = false;
        let walked = self.at_lower_alias(path, (dev, ino), layer, |_, _, _| {
            shown = true;
            Ok(())
        });
        // A walk that fails says nothing: the removal is taken as not done (the
        // count shown is then the higher one).
        walked.is_err() || shown
    }

    fn removed_link_key(&self, layer: LayerIdx, ino: u64) -> Key {
        (self.bottom_layer() - layer, ino)
    }

    /// Begins the removal (or replacement) of `name` under `parent`, found as `st` in
    /// `layer`: for a name of a lower hard-link group, logs it and returns what
    /// [`Union::removed_link`] needs once the whiteout exists.
    pub(crate) fn removing_link(
        &self,
        parent: &Inode,
        name: &OsStr,
        layer: LayerIdx,
        st: &sys::fs::Stat,
    ) -> Result<Option<LinkRemoval>> {
        let lower = layer != UPPER || !self.upper;
        if st.st_nlink <= 1 || !lower || st.st_mode & libc::S_IFMT == libc::S_IFDIR {
            return Ok(None);
        }
        let Some(root) = self.workdir_root.as_ref() else {
            return Ok(None);
        };
        let removal = LinkRemoval {
            key: self.removed_link_key(layer, st.st_ino),
            ctime: ctime_of(st),
            path: super::redirect::join(&self.view_path(parent)?, name),
        };
        let line = Line::Removing(removal.key, removal.ctime, removal.path.clone());
        self.removed_links.append(root.as_fd(), &line);
        Ok(Some(removal))
    }

    /// Counts a removal begun with [`Union::removing_link`] whose whiteout now
    /// exists: the group's other names show one link less.
    pub(crate) fn removed_link(&self, removal: Option<LinkRemoval>) {
        let (Some(r), Some(root)) = (removal, self.workdir_root.as_ref()) else {
            return;
        };
        let links = &self.removed_links;
        let mut records = links.records.lock();
        add(&mut records, r.key, r.ctime, 1);
        links.any.store(true, Ordering::Release);
        links.append(root.as_fd(), &Line::Removed(r.key, r.ctime, r.path));
    }

    /// Drops the records of lower object (`dev`, `ino`): its group was copied up.
    pub(crate) fn forget_removed_links(&self, dev: u64, ino: u64) {
        let links = &self.removed_links;
        let mut records = links.records.lock();
        let Some(root) = self.workdir_root.as_ref().filter(|_| !records.is_empty()) else {
            return;
        };
        for layer in self.lower_layers_on(dev) {
            let key = self.removed_link_key(layer, ino);
            if records.remove(&key).is_some() {
                links.append(root.as_fd(), &Line::Copied(key));
            }
        }
    }

    /// The link count shown for a lower non-directory with real stat `st`: its own,
    /// less the names of its group removed through the mount, and at least one (a
    /// name shows it).
    pub(crate) fn shown_lower_nlink(&self, st: &sys::fs::Stat) -> u64 {
        let nlink = st.st_nlink;
        if nlink <= 1 {
            return nlink;
        }
        if !self.removed_links.any.load(Ordering::Acquire) {
            return nlink;
        }
        let records = self.removed_links.records.lock();
        if records.is_empty() {
            return nlink;
        }
        let ctime = ctime_of(st);
        let removed: u64 = self
            .lower_layers_on(st.st_dev)
            .filter_map(|layer| records.get(&self.removed_link_key(layer, st.st_ino)))
            .filter(|r| r.ctime == ctime)
            .map(|r| u64::from(r.count))
            .sum();
        nlink.saturating_sub(removed).max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counted(layer: usize, ino: u64, ctime: Ctime, count: u32) -> Line {
        Line::Counted((layer, ino), Record { ctime, count })
    }

    #[test]
    fn log_lines_round_trip_and_garbage_is_no_line() {
        let odd = OsString::from_vec(b"/a b/%\n\xff/x".to_vec());
        for line in [
            counted(0, 0x1f3a, (1_764_770_000, 5), 1),
            counted(12, u64::MAX, (-3, 999_999_999), 40),
            Line::Removing((1, 2), (7, 8), "/dir/name".into()),
            Line::Removed((1, 2), (7, 8), odd.clone()),
            Line::Copied((3, 7)),
        ] {
            let text = line.render();
            assert!(text.ends_with('\n') && text.matches('\n').count() == 1);
            assert_eq!(Line::parse(text.trim_end()), Some(line), "{text:?}");
        }
        for bad in [
            "",
            "L0-1f3a",
            "L0-1f3a 5.1",
            "L0-1f3a 5.1 1",
            "L0-1f3a 5 +1",
            "X0-1f3a copied",
            "L0-zz copied",
            "L0-1f3a copied extra",
            "L0-1f3a 5.1 +1 extra",
            "L0-1f3a 5.1 +99999999999",
            "L0-1f3a 5.1 ?",
            "L0-1f3a 5.1 + /a%2",
            "L0-1f3a 5.1 + /a%zz",
        ] {
            assert_eq!(Line::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn replay_sums_removals_restarts_on_a_new_ctime_and_drops_copied_groups() {
        let log: String = [
            counted(0, 1, (10, 0), 1),
            counted(0, 1, (10, 0), 2),
            Line::Removing((1, 1), (10, 0), "/x".into()),
            Line::Removed((1, 1), (10, 0), "/x".into()),
            counted(0, 2, (10, 0), 1),
            // The lower file of (0, 2) changed: earlier removals no longer count.
            counted(0, 2, (11, 0), 1),
            counted(0, 3, (10, 0), 1),
            Line::Copied((0, 3)),
        ]
        .iter()
        .map(Line::render)
        .collect();
        // A crash mid-append leaves a torn line at the end.
        let records = replay(&format!("{log}L0-4 10.000"), |_, _| panic!("nothing begun"));
        let count = |k| records.get(&k).map(|r| r.count);
        assert_eq!(count((0, 1)), Some(3));
        assert_eq!(count((1, 1)), Some(1));
        assert_eq!(
            records.get(&(0, 2)),
            Some(&Record {
                ctime: (11, 0),
                count: 1
            })
        );
        assert_eq!(count((0, 3)), None);
        assert_eq!(count((0, 4)), None);
        assert_eq!(records.len(), 3);
    }

    #[test]
    fn a_removal_cut_short_counts_only_if_its_name_is_gone() {
        let log: String = [
            Line::Removing((0, 1), (10, 0), "/gone".into()),
            Line::Removing((0, 1), (10, 0), "/still".into()),
            Line::Removing((0, 2), (10, 0), "/done".into()),
            Line::Removed((0, 2), (10, 0), "/done".into()),
        ]
        .iter()
        .map(Line::render)
        .collect();
        let mut asked = Vec::new();
        let records = replay(&log, |key, path| {
            asked.push((key, path.to_os_string()));
            path == "/still"
        });
        asked.sort();
        assert_eq!(
            asked,
            [((0, 1), "/gone".into()), ((0, 1), "/still".into())],
            "only removals not reported done are looked at"
        );
        assert_eq!(records.get(&(0, 1)).map(|r| r.count), Some(1));
        assert_eq!(records.get(&(0, 2)).map(|r| r.count), Some(1));
    }
}
