//! What a local user, a layer changing underneath or a stale workdir can make the
//! daemon do (issue 15): nothing outside its own directories. Each case plants its
//! attack, then asserts that a sentinel tree outside upper, work and the volumes is
//! byte-for-byte what it was (contents, modes, xattrs, link counts, empty
//! directories), and that the mount still answers. Mounted calls are bounded (see
//! `hostile::Bounded`): a hang fails the case instead of the whole run.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use libc::{ELOOP, ENXIO};

use crate::fixture::{self, LayerSpec, Layers};
use crate::hostile::{Bounded, must, sane};

/// A tree the daemon has no business touching: files with xattrs, a hard-link pair,
/// a symlink and empty directories (what a sweep of empty directories would take).
pub(crate) struct Sentinel {
    pub root: PathBuf,
    before: fixture::Snapshot,
}

impl Sentinel {
    pub fn new(root: &Path) -> Sentinel {
        fs::create_dir(root).unwrap();
        let file = root.join("file");
        fs::write(&file, b"sentinel data\n").unwrap();
        fs::set_permissions(&file, fs::Permissions::from_mode(0o640)).unwrap();
        fixture::lsetxattr(&file, "user.sentinel", b"keep", 0).unwrap();
        fs::hard_link(&file, root.join("link")).unwrap();
        std::os::unix::fs::symlink("file", root.join("sym")).unwrap();
        for i in 0..8 {
            fs::create_dir_all(root.join(format!("empty/e{i}/inner"))).unwrap();
        }
        Sentinel {
            root: root.to_path_buf(),
            before: fixture::snapshot(root),
        }
    }

    pub fn file(&self) -> PathBuf {
        self.root.join("file")
    }

    pub fn assert_unchanged(&self, case: &str) {
        let now = fixture::snapshot(&self.root);
        let d = fixture::diff("before", &self.before, "after", &now);
        assert!(
            d.is_empty(),
            "{case}: the sentinel tree {} changed:\n  {}",
            self.root.display(),
            d.join("\n  ")
        );
    }
}

/// Opens `p` read-only, non-blocking (a client that never waits for a FIFO's
/// writer) and without following a symlink there (the client's own business), and
/// reads it if it opened.
fn open_nonblocking_and_read(p: &Path) -> Result<Vec<u8>, fixture::Errno> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
        .open(p)
        .map_err(|e| fixture::io_errno(&e))?;
    let mut v = Vec::new();
    match f.read_to_end(&mut v) {
        Ok(_) => Ok(v),
        // A FIFO opened by the kernel itself, with no writer: nothing to read.
        Err(e) if fixture::io_errno(&e) == libc::EAGAIN => Ok(v),
        Err(e) => Err(fixture::io_errno(&e)),
    }
}

/// Appends to `p`, opened non-blocking (a FIFO found there answers ENXIO instead of
/// waiting for a reader) and without following a symlink there.
fn append_nonblocking(p: &Path, data: &[u8]) -> Result<(), fixture::Errno> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    fs::OpenOptions::new()
        .append(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
        .open(p)
        .and_then(|mut f| f.write_all(data))
        .map_err(|e| fixture::io_errno(&e))
}

/// Lower files replaced while mounted, after the kernel looked them up as regular
/// files: by FIFOs (a blocking open by name would park a worker until a writer
/// comes, and enough readers leave none), by a symlink to a file outside the
/// layers, by a hard link to it, and by a char device. Every reopen by name checks
/// that it opened what was looked up: readers and writers get the new object (after
/// the kernel's own lookup again) or ESTALE, never a hang, and the outside file is
/// never written.
#[test]
fn lower_files_replaced_while_mounted_block_nothing_and_leak_nothing() {
    let case = "lower_files_replaced_while_mounted";
    if !fixture::require_fuse() {
        return;
    }
    const FIFOS: usize = 12;
    let mut spec = LayerSpec::new().file("plain", "plain\n");
    for i in 0..FIFOS {
        spec = spec.file(&format!("fifo{i}"), "was a file\n");
    }
    for name in ["symlinked", "hardlinked", "device"] {
        spec = spec.file(name, "was a file\n");
    }
    let l = Layers::new(&[spec]);
    let sentinel = Sentinel::new(&l.root.join("sentinel"));
    let mut m = Bounded::mount(case, &l.rw_options(), &l);
    let mut names: Vec<String> = (0..FIFOS).map(|i| format!("fifo{i}")).collect();
    names.extend(["symlinked", "hardlinked", "device"].map(String::from));
    for n in &names {
        assert!(must(case, "lstat", m.lstat(n)).is_file(), "{case}: {n}");
    }
    let lower = &l.lowers[0];
    for n in &names {
        fs::remove_file(lower.join(n)).unwrap();
    }
    for n in &names[..FIFOS] {
        fixture::mkfifo(&lower.join(n), 0o644).unwrap();
    }
    std::os::unix::fs::symlink(sentinel.file(), lower.join("symlinked")).unwrap();
    fs::hard_link(sentinel.file(), lower.join("hardlinked")).unwrap();
    fixture::mknod(&lower.join("device"), libc::S_IFCHR | 0o666, 1, 3).unwrap();

    // All FIFO readers at once: more than the daemon has workers.
    let paths: Vec<PathBuf> = names[..FIFOS].iter().map(|n| m.join(n)).collect();
    let answers = m.probe("concurrent readers of the swapped names", move || {
        let readers: Vec<_> = paths
            .into_iter()
            .map(|p| std::thread::spawn(move || open_nonblocking_and_read(&p)))
            .collect();
        readers
            .into_iter()
            .map(|t| t.join().expect("reader thread"))
            .collect::<Vec<_>>()
    });
    for (n, r) in names.iter().zip(answers) {
        if let Some(data) = sane(case, &format!("read of {n}"), r, &[ENXIO, ELOOP]) {
            assert!(data.is_empty(), "{case}: {n} read {data:?} from a FIFO");
        }
    }
    for n in &names {
        let p = m.join(n);
        let r = m.probe(&format!("non-blocking read of {n}"), move || {
            open_nonblocking_and_read(&p)
        });
        sane(case, &format!("read of {n}"), r, &[ENXIO, ELOOP]);
        let p = m.join(n);
        let r = m.probe(&format!("non-blocking append to {n}"), move || {
            append_nonblocking(&p, b"appended\n")
        });
        sane(case, &format!("append to {n}"), r, &[ENXIO, ELOOP]);
    }
    assert_eq!(must(case, "read of plain", m.read("plain")), b"plain\n");
    must(case, "append to plain", m.append("plain", b"more\n"));
    m.remount();
    assert_eq!(must(case, "read of plain", m.read("plain")), b"plain\nmore\n");
    // The link the test planted in the lower layer counts in the sentinel's st_nlink.
    fs::remove_file(lower.join("hardlinked")).unwrap();
    sentinel.assert_unchanged(case);
}

