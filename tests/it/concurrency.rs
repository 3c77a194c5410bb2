//! Concurrency: several workers run a random mix of file and directory operations in
//! overlapping directories of one default-configuration mount (passthrough on) over
//! lower layers with merged directories, whiteouts, an opaque directory and a lower
//! hard-link group. Races may answer ENOENT, EEXIST, ENOTEMPTY and the like; an error
//! that a plain filesystem would never give (EIO, ESTALE, ENOTCONN, ...), a syscall that
//! does not return within [`STUCK_AFTER`], a watchdog report or a dead daemon fails the
//! test. Whenever the workers pause, and at the end, the tree must be coherent: every
//! name listed once and lstat-able, every name lstat finds listed, d_ino = st_ino,
//! d_type = the lstat type, all names of one inode showing the same data with st_nlink =
//! the number of names; after a remount, the same tree again.
//!
//! `STRATAFS_CONC_SECS` (default 60) is the test's time budget, `STRATAFS_CONC_SEED`
//! the seed of the operation mix; the figures go to stderr.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirEntryExt, FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::fixture::{self, Errno, LayerBuilder, Layers, StrataMount, errno_name, hash_bytes};

const WORKERS: usize = 5;
/// A syscall of a worker that takes longer than this is a hang.
const STUCK_AFTER: Duration = Duration::from_secs(30);
/// Of the time budget, what the invariant checks and the remount are given.
const CHECK_RESERVE: Duration = Duration::from_secs(10);
/// Checks of the quiesced tree during the run (besides the one at its end).
const PAUSES: u32 = 3;

/// Directories the workers pick from: merged (`m`, `d1`), lower-only (`d0`, `hl`),
/// opaque (`op`), and new ones (`n0`, `n1`), nested ones to move and remove.
const DIRS: &[&str] = &[
    "", "m", "m/deep", "d0", "d1", "hl", "op", "n0", "n1", "n0/s",
];
/// Entry names: lower files, hidden ones (`gone` is whited out), hard-link group
/// members and fresh names.
const NAMES: &[&str] = &[
    "a", "b", "c", "x", "y", "gone", "h1", "h2", "h3", "f0", "f1",
];
/// The names of the lower hard-link groups, picked more often than chance would: the
/// first copy-up of a group links every name of it, which races with everything else
/// done to those names.
const HOT: &[&str] = &[
    "hl/h1", "hl/h2", "d0/h3", "m/f0", "d1/f0", "hl/f1", "m/a", "d1/a", "m/deep/a",
];

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Err(_) => default,
        Ok(v) => {
            let v = v.trim();
            let parsed = match v.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => v.parse(),
            };
            parsed.unwrap_or_else(|_| panic!("{name}={v:?} is not a number"))
        }
    }
}

/// splitmix64: small, seedable, good enough to pick operations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a>(&mut self, v: &[&'a str]) -> &'a str {
        v[self.below(v.len())]
    }
}

fn layers() -> Layers {
    let kib = |n: usize, seed: u64| fixture::pattern(n * 1024, seed);
    let mut bottom = LayerBuilder::new()
        .file("m/a", kib(8, 1))
        .hardlink("d1/a", "m/a")
        .hardlink("m/deep/a", "m/a")
        .file("m/b", kib(4, 2))
        .file("m/deep/c", kib(4, 3))
        .file("d0/a", kib(16, 4))
        .file("d0/x", b"d0x\n")
        .file("d1/x", kib(2, 5))
        .file("d1/y", b"d1y\n")
        .file("d1/gone", b"hidden by the layer above\n")
        .file("op/a", b"hidden by the opaque directory above\n")
        .file("op/x", b"hidden too\n")
        // Lower hard-link groups across directories (and one in the layer above).
        .file("hl/h1", kib(12, 6))
        .hardlink("hl/h2", "hl/h1")
        .hardlink("d0/h3", "hl/h1");
    for w in 0..WORKERS {
        bottom = bottom.file(&format!("m/w{w}"), kib(8, 100 + w as u64));
    }
    let top = LayerBuilder::new()
        .file("m/c", kib(4, 7))
        .file("m/f0", b"m f0\n")
        .hardlink("d1/f0", "m/f0")
        .hardlink("hl/f1", "m/f0")
        .whiteout("m/b")
        .whiteout("d1/gone")
        .file("d1/f1", kib(3, 8))
        .opaque_dir("op")
        .file("op/b", b"op b\n");
    Layers::new(&[top, bottom])
}

#[derive(Default)]
struct Stats {
    ok: BTreeMap<&'static str, u64>,
    errors: BTreeMap<(&'static str, Errno), u64>,
    /// Errors a plain filesystem would not give, with the operation.
    failures: Vec<String>,
}

/// What a worker is doing, for the hang check of the main thread.
type Current = Arc<Mutex<Option<(String, Instant)>>>;

/// The user-space stacks of the daemon's threads, if gdb is there to take them.
fn user_stacks(pid: u32) -> String {
    let pid = pid.to_string();
    match std::process::Command::new("timeout")
        .args([
            "60",
            "gdb",
            "-p",
            &pid,
            "-batch",
            "-ex",
            "thread apply all bt",
        ])
        .stdin(std::process::Stdio::null())
        .output()
    {
        Ok(o) => String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter(|l| l.starts_with('#') || l.starts_with("Thread "))
            .collect::<Vec<_>>()
            .join("\n"),
        Err(e) => format!("(no gdb: {e})"),
    }
}

/// The kernel stacks of the threads of `pid` (`self` or a number), for a hang report.
fn kernel_stacks(pid: &str, only_tid: Option<i32>) -> String {
    let mut out = String::new();
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        let tid = t.file_name().to_string_lossy().to_string();
        if only_tid.is_some_and(|o| o.to_string() != tid) {
            continue;
        }
        let comm = fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        let stack = fs::read_to_string(t.path().join("stack")).unwrap_or_default();
        out += &format!("--- {pid}/{tid} {}\n{stack}", comm.trim());
    }
    out
}

struct Worker {
    id: usize,
    root: PathBuf,
    rng: Rng,
    current: Current,
    stats: Stats,
    buf: Vec<u8>,
    /// read_while_write rounds done.
    rw_rounds: u64,
}

/// Errors a race between workers explains. Everything else is a failure.
fn expected(op: &str, e: Errno) -> bool {
    match e {
        libc::ENOENT | libc::EEXIST | libc::ENOTEMPTY | libc::ENOTDIR | libc::EISDIR => true,
        // A directory renamed into its own subtree.
        libc::EINVAL => op.starts_with("rename"),
        // link(2) of a name that a race turned into a directory.
        libc::EPERM => op == "link",
        _ => false,
    }
}

impl Worker {
    fn file_path(&mut self) -> PathBuf {
        if self.rng.below(5) == 0 {
            let p = self.rng.pick(HOT);
            return self.root.join(p);
        }
        let d = self.rng.pick(DIRS);
        let n = self.rng.pick(NAMES);
        self.root.join(d).join(n)
    }

    fn dir_path(&mut self) -> PathBuf {
        if self.rng.below(2) == 0 {
            let d = self.rng.pick(&DIRS[1..]);
            self.root.join(d)
        } else {
            self.file_path()
        }
    }

    fn rel(&self, p: &Path) -> String {
        p.strip_prefix(&self.root).unwrap().display().to_string()
    }

    /// Names the step of a multi-syscall operation, for the hang report.
    fn note(&self, step: &str) {
        if let Some((what, _)) = self.current.lock().unwrap().as_mut() {
            let base = what.split(" | ").next().unwrap_or_default().to_string();
            *what = format!("{base} | {step}");
        }
    }

    /// Runs one operation, recorded as `what` for the hang check.
    fn run(&mut self, op: &'static str, what: String, f: impl FnOnce(&mut Self) -> io::Result<()>) {
        *self.current.lock().unwrap() = Some((format!("{op} {what}"), Instant::now()));
        let r = f(self);
        *self.current.lock().unwrap() = None;
        match r {
            Ok(()) => *self.stats.ok.entry(op).or_default() += 1,
            Err(e) => {
                let code = e.raw_os_error().unwrap_or(0);
                *self.stats.errors.entry((op, code)).or_default() += 1;
                if !expected(op, code) {
                    self.stats
                        .failures
                        .push(format!("worker {}: {op} {what}: {e}", self.id));
                }
            }
        }
    }

    fn step(&mut self) {
        let seed = self.rng.next();
        let len = 1 + self.rng.below(24 * 1024);
        self.buf = fixture::pattern(len, seed);
        match self.rng.below(17) {
            0 => {
                let p = self.file_path();
                self.run("create", self.rel(&p), |w| {
                    let mut f = OpenOptions::new()
                        .write(true)
                        .create(true)
                        .truncate(true)
                        .open(&p)?;
                    f.write_all(&w.buf)
                });
            }
            1 | 2 => {
                let p = self.file_path();
                let off = self.rng.below(32 * 1024) as u64;
                self.run("write", self.rel(&p), |w| {
                    let f = OpenOptions::new().write(true).open(&p)?;
                    f.write_all_at(&w.buf, off)
                });
            }
            3 => {
                let p = self.file_path();
                self.run("append", self.rel(&p), |w| {
                    let mut f = OpenOptions::new().append(true).open(&p)?;
                    f.write_all(&w.buf)
                });
            }
            4 | 5 => {
                let p = self.file_path();
                self.run("read", self.rel(&p), |_| fs::read(&p).map(drop));
            }
            6 => {
                let p = self.file_path();
                let size = self.rng.below(20 * 1024) as u64;
                self.run("truncate", self.rel(&p), |_| {
                    OpenOptions::new().write(true).open(&p)?.set_len(size)
                });
            }
            7 => {
                let (a, b) = (self.file_path(), self.file_path());
                let what = format!("{} -> {}", self.rel(&a), self.rel(&b));
                self.run("link", what, |_| fs::hard_link(&a, &b));
            }
            8 => {
                let p = self.file_path();
                self.run("unlink", self.rel(&p), |_| fs::remove_file(&p));
            }
            9 => {
                let (a, b) = (self.file_path(), self.file_path());
                let what = format!("{} -> {}", self.rel(&a), self.rel(&b));
                self.run("rename", what, |_| fs::rename(&a, &b));
            }
            10 => {
                let (a, b) = (self.dir_path(), self.dir_path());
                let what = format!("{} -> {}", self.rel(&a), self.rel(&b));
                self.run("rename_dir", what, |_| fs::rename(&a, &b));
            }
            11 => {
                // Mostly the named directories, which renames and rmdirs take away:
                // operations on names in them keep finding a parent.
                let p = if self.rng.below(3) == 0 {
                    self.dir_path()
                } else {
                    self.root.join(self.rng.pick(&DIRS[1..]))
                };
                self.run("mkdir", self.rel(&p), |_| fs::create_dir(&p));
            }
            15 => {
                let p = self.dir_path();
                self.run("rmdir", self.rel(&p), |_| fs::remove_dir(&p));
            }
            12 => {
                let p = self.file_path();
                let mode = [0o600, 0o644, 0o640, 0o755][self.rng.below(4)];
                self.run("chmod", self.rel(&p), |_| {
                    fs::set_permissions(&p, fs::Permissions::from_mode(mode))
                });
            }
            13 => {
                let d = self.root.join(self.rng.pick(DIRS));
                self.run("readdir", self.rel(&d), |_| {
                    for e in fs::read_dir(&d)? {
                        let e = e?;
                        match fs::symlink_metadata(e.path()) {
                            // Gone since the listing: a race, not an error.
                            Err(err) if err.raw_os_error() == Some(libc::ENOENT) => {}
                            Err(err) => return Err(err),
                            Ok(_) => {}
                        }
                    }
                    Ok(())
                });
            }
            14 => self.read_while_writing(),
            16 => {
                // rm -r, racing with everything else: also keeps the tree from growing
                // without bound (renamed-away directories are out of the namespace).
                // Not the directories of the lower layers themselves: their content is
                // what the other operations are meant to race on.
                let p = if self.rng.below(2) == 0 {
                    self.root.join(self.rng.pick(&["n0", "n1", "n0/s"]))
                } else {
                    let d = self.rng.pick(DIRS);
                    self.root.join(d).join(self.rng.pick(NAMES))
                };
                if self.rng.below(3) == 0 {
                    self.run("remove_tree", self.rel(&p), |_| fs::remove_dir_all(&p));
                } else {
                    let d = self.root.join(self.rng.pick(&DIRS[1..]));
                    self.run("mkdir", self.rel(&d), |_| fs::create_dir(&d));
                }
            }
            _ => unreachable!(),
        }
    }

    /// A reader opens the worker's own file (a lower file until something copies it
    /// up); every other round the file is truncated by path; then a writer opens it and
    /// writes. Once the truncate or the write returned, the reader's fd must see it.
    /// Only this worker changes its own file, so the checks are exact.
    fn read_while_writing(&mut self) {
        let p = self.root.join(format!("m/w{}", self.id));
        let what = self.rel(&p);
        let mut stale = None;
        self.run("read_while_write", what.clone(), |w| {
            w.note("open for reading");
            let r = match fs::File::open(&p) {
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                    // `m` was renamed or removed by a race: make the file again.
                    fs::write(&p, b"again")?;
                    fs::File::open(&p)?
                }
                x => x?,
            };
            w.rw_rounds += 1;
            if w.rw_rounds % 2 == 1 {
                // Every other round (the first one included, while the file is still
                // the lower one): truncate(2) by path, as another process would, while
                // the reader is open. The reader must then find end-of-file at the new
                // size, as on kernel overlayfs and any plain filesystem.
                let size = r.metadata()?.len();
                let cut = size / 2;
                w.note("truncate(2) by path");
                truncate_path(&p, cut)?;
                w.note("read past the new end");
                if size > cut && fs::metadata(&p)?.ino() == r.metadata()?.ino() {
                    let mut past = [0u8; 64];
                    let n = r.read_at(&mut past, cut)?;
                    if n != 0 {
                        stale = Some(format!(
                            "worker {}: read_while_write {what}: after truncate(2) of the \
                             {size}-byte file to {cut} bytes, a reader opened before it \
                             still reads {n} bytes at offset {cut}",
                            w.id
                        ));
                        return Ok(());
                    }
                }
            }
            w.note("open for writing");
            let wr = OpenOptions::new().write(true).open(&p)?;
            if r.metadata()?.ino() != wr.metadata()?.ino() {
                // Replaced between the two opens (a rename over `m`): nothing to compare.
                return Ok(());
            }
            w.note("write");
            wr.write_all_at(&w.buf, 0)?;
            let mut back = vec![0; w.buf.len()];
            w.note("read back through the reader");
            r.read_exact_at(&mut back, 0)?;
            if back != w.buf {
                let at = back.iter().zip(&w.buf).position(|(a, b)| a != b);
                stale = Some(format!(
                    "worker {}: read_while_write {what}: the reader saw other bytes than \
                     the {} just written (first difference at {at:?})",
                    w.id,
                    w.buf.len()
                ));
            }
            Ok(())
        });
        if let Some(s) = stale {
            self.stats.failures.push(s);
        }
    }
}

/// truncate(2): by path, without opening the file (no open for writing, so no copy-up
/// through an open).
fn truncate_path(p: &Path, size: u64) -> io::Result<()> {
    let c = fixture::cpath(p);
    // SAFETY: c is a NUL-terminated path that outlives the call.
    if unsafe { libc::truncate(c.as_ptr(), size as libc::off_t) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// One name seen by the tree walk.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Seen {
    dir: bool,
    ino: u64,
    mode: u32,
    nlink: u64,
    size: u64,
    data: Option<u64>,
}

/// Walks the quiesced mount: every name once per directory, lstat on every name,
/// d_ino = st_ino and d_type = the lstat type, names of one inode agree on data and st_nlink = their number.
fn check_tree(root: &Path, problems: &mut Vec<String>) -> BTreeMap<String, Seen> {
    let mut seen = BTreeMap::new();
    let mut todo = vec![PathBuf::new()];
    while let Some(rel) = todo.pop() {
        let dir = root.join(&rel);
        let rd = match fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) => {
                problems.push(format!("readdir /{}: {e}", rel.display()));
                continue;
            }
        };
        let mut names = HashSet::new();
        for e in rd {
            let e = match e {
                Ok(e) => e,
                Err(err) => {
                    problems.push(format!("readdir /{}: {err}", rel.display()));
                    break;
                }
            };
            let name = e.file_name();
            if !names.insert(name.clone()) {
                problems.push(format!("/{} listed twice", rel.join(&name).display()));
                continue;
            }
            let child = rel.join(&name);
            let md = match fs::symlink_metadata(root.join(&child)) {
                Ok(md) => md,
                Err(err) => {
                    problems.push(format!("lstat /{} (listed): {err}", child.display()));
                    continue;
                }
            };
            // d_type, which find(1) and ls(1) act on without a stat.
            match e.file_type() {
                Ok(t) if t == md.file_type() => {}
                t => problems.push(format!(
                    "/{}: d_type {t:?} but lstat says {:?}",
                    child.display(),
                    md.file_type()
                )),
            }
            if e.ino() != md.ino() {
                problems.push(format!(
                    "/{}: d_ino {} but st_ino {}",
                    child.display(),
                    e.ino(),
                    md.ino()
                ));
            }
            let data = if md.is_file() {
                match fs::read(root.join(&child)) {
                    Ok(d) => Some(hash_bytes(&d)),
                    Err(err) => {
                        problems.push(format!("read /{}: {err}", child.display()));
                        None
                    }
                }
            } else {
                None
            };
            if md.is_dir() {
                todo.push(child.clone());
            }
            seen.insert(
                child.display().to_string(),
                Seen {
                    dir: md.is_dir(),
                    ino: md.ino(),
                    mode: md.mode(),
                    nlink: md.nlink(),
                    size: if md.is_dir() { 0 } else { md.len() },
                    data,
                },
            );
        }
    }
    let mut by_ino: HashMap<u64, Vec<(&String, &Seen)>> = HashMap::new();
    for (p, s) in &seen {
        by_ino.entry(s.ino).or_default().push((p, s));
    }
    for (ino, names) in by_ino {
        let (first, s0) = names[0];
        if names.len() > 1 && names.iter().any(|(_, s)| s.dir) {
            let paths: Vec<&String> = names.iter().map(|(p, _)| *p).collect();
            problems.push(format!("st_ino {ino} shared by a directory: {paths:?}"));
            continue;
        }
        if s0.dir {
            continue;
        }
        // The mount is the whole tree: every name of the inode is among `names`.
        let paths: Vec<&String> = names.iter().map(|(p, _)| *p).collect();
        for (p, s) in &names {
            if s.nlink != names.len() as u64 {
                problems.push(format!(
                    "/{p}: st_nlink {} but {} names share st_ino {ino}: {paths:?}",
                    s.nlink,
                    names.len()
                ));
            }
            if (s.data, s.size, s.mode) != (s0.data, s0.size, s0.mode) {
                problems.push(format!(
                    "/{p} and /{first} share st_ino {ino} but differ: {s:?} vs {s0:?}"
                ));
            }
        }
    }
    seen
}

/// The other direction: every name of the workers' namespace that lstat finds is in
/// its directory's listing (a stale cached listing would leave it out).
fn check_listed(root: &Path, seen: &BTreeMap<String, Seen>, problems: &mut Vec<String>) {
    let own: Vec<String> = (0..WORKERS).map(|w| format!("w{w}")).collect();
    for d in DIRS {
        for n in NAMES.iter().copied().chain(own.iter().map(String::as_str)) {
            let rel = Path::new(d).join(n);
            if fs::symlink_metadata(root.join(&rel)).is_ok()
                && !seen.contains_key(&rel.display().to_string())
            {
                problems.push(format!(
                    "/{}: lstat finds it, readdir of /{d} does not list it",
                    rel.display()
                ));
            }
        }
    }
}

fn daemon_check(m: &mut StrataMount, when: &str) {
    if let Some(st) = m.daemon_exited() {
        panic!(
            "{when}: the stratafs daemon died ({st}); output:\n{}",
            m.output()
        );
    }
}

/// "ENOENT" out of fixture's "ENOENT (No such file or directory)".
fn short_errno(e: Errno) -> String {
    let long = errno_name(e);
    long.split('(').next().unwrap_or(&long).trim().to_string()
}

fn print_figures(seed: u64, elapsed: Duration, stats: &Stats, tree: &BTreeMap<String, Seen>) {
    let mut names_of: HashMap<u64, usize> = HashMap::new();
    for s in tree.values().filter(|s| !s.dir) {
        *names_of.entry(s.ino).or_default() += 1;
    }
    let linked = names_of.values().filter(|n| **n > 1).count();
    let total: u64 = stats.ok.values().sum::<u64>() + stats.errors.values().sum::<u64>();
    let mut out = format!(
        "concurrency: seed {seed:#x}, {WORKERS} workers, {:.1} s of operations, {total} \
         operations ({:.0}/s); at the end {} names, {linked} files with several names\n",
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64().max(0.001),
        tree.len()
    );
    let mut kinds: Vec<&str> = stats
        .ok
        .keys()
        .chain(stats.errors.keys().map(|(k, _)| k))
        .copied()
        .collect();
    kinds.sort();
    kinds.dedup();
    for k in kinds {
        let errs: Vec<String> = stats
            .errors
            .iter()
            .filter(|((op, _), _)| *op == k)
            .map(|((_, e), n)| format!("{} {n}", short_errno(*e)))
            .collect();
        out += &format!(
            "  {k:<17} ok {:>6}  errors: {}\n",
            stats.ok.get(k).copied().unwrap_or(0),
            if errs.is_empty() {
                "-".into()
            } else {
                errs.join(", ")
            }
        );
    }
    let mut per_errno: BTreeMap<Errno, u64> = BTreeMap::new();
    for ((_, e), n) in &stats.errors {
        *per_errno.entry(*e).or_default() += n;
    }
    let per: Vec<String> = per_errno
        .iter()
        .map(|(e, n)| format!("{} {n}", short_errno(*e)))
        .collect();
    out += &format!("  errors by errno: {}\n", per.join(", "));
    // Straight to fd 2: the harness captures eprintln! of passing tests.
    let _ = io::stderr().write_all(out.as_bytes());
}

#[test]
fn random_operations_of_several_workers_leave_a_coherent_tree_across_a_remount() {
    if !fixture::require_fuse() {
        return;
    }
    let budget = Duration::from_secs(env_u64("STRATAFS_CONC_SECS", 60));
    let seed = env_u64("STRATAFS_CONC_SEED", 0x5EED_C0C0);
    let began = Instant::now();
    let l = layers();
    let mut m = StrataMount::new(&l);
    let work_for = budget
        .saturating_sub(CHECK_RESERVE)
        .max(Duration::from_secs(3));

    let stop = Arc::new(AtomicBool::new(false));
    // Pauses: the workers stop between operations for a check of the quiesced tree
    // in the middle of the run, while it still holds much of the lower content.
    let pause = Arc::new(AtomicBool::new(false));
    let paused = Arc::new(AtomicUsize::new(0));
    let mut currents = Vec::new();
    let tids: Arc<Mutex<Vec<i32>>> = Arc::new(Mutex::new(vec![0; WORKERS]));
    let mut handles = Vec::new();
    for id in 0..WORKERS {
        let current: Current = Arc::new(Mutex::new(None));
        currents.push(current.clone());
        let (stop, pause, paused) = (stop.clone(), pause.clone(), paused.clone());
        let tids = tids.clone();
        let mut w = Worker {
            id,
            root: m.path().to_path_buf(),
            rng: Rng(seed ^ (id as u64).wrapping_mul(0xA24B_AED4_963E_E407)),
            current,
            stats: Stats::default(),
            buf: Vec::new(),
            rw_rounds: 0,
        };
        handles.push(Some(
            std::thread::Builder::new()
                .name(format!("conc-worker-{id}"))
                .spawn(move || {
                    // SAFETY: gettid has no preconditions.
                    tids.lock().unwrap()[id] = unsafe { libc::gettid() };
                    // First, while the worker's own file is surely still the lower one.
                    w.read_while_writing();
                    while !stop.load(Ordering::SeqCst) {
                        if pause.load(Ordering::SeqCst) {
                            paused.fetch_add(1, Ordering::SeqCst);
                            while pause.load(Ordering::SeqCst) && !stop.load(Ordering::SeqCst) {
                                std::thread::sleep(Duration::from_millis(5));
                            }
                            paused.fetch_sub(1, Ordering::SeqCst);
                            continue;
                        }
                        w.step();
                    }
                    w.stats
                })
                .unwrap(),
        ));
    }

    // The main thread only watches: the deadline, stuck syscalls, the daemon.
    let work_began = Instant::now();
    let mut stats = Stats::default();
    let mut problems = Vec::new();
    let mut quiesced_checks = 0;
    let mut next_check = work_for / (PAUSES + 1);
    while handles.iter().any(Option::is_some) {
        std::thread::sleep(Duration::from_millis(100));
        if work_began.elapsed() >= next_check && quiesced_checks < PAUSES {
            pause.store(true, Ordering::SeqCst);
        }
        if pause.load(Ordering::SeqCst) && paused.load(Ordering::SeqCst) == WORKERS {
            quiesced_checks += 1;
            let mut found = Vec::new();
            let seen = check_tree(m.path(), &mut found);
            check_listed(m.path(), &seen, &mut found);
            problems.extend(
                found
                    .into_iter()
                    .map(|p| format!("quiesced check {quiesced_checks}: {p}")),
            );
            next_check = work_for * (quiesced_checks + 1) / (PAUSES + 1);
            pause.store(false, Ordering::SeqCst);
        }
        if work_began.elapsed() >= work_for {
            stop.store(true, Ordering::SeqCst);
        }
        for (i, c) in currents.iter().enumerate() {
            // Copied out: no lock may be held by a panic (the worker would find it
            // poisoned).
            let doing = c.lock().unwrap().clone();
            if let Some((what, since)) = doing {
                if since.elapsed() > STUCK_AFTER {
                    let tid = tids.lock().unwrap()[i];
                    // Dropping the mount on the way out aborts the connection, which
                    // lets the stuck thread go.
                    panic!(
                        "worker {i} stuck for {:?} in `{what}`; its kernel stack:\n{}\n\
                         daemon's kernel stacks:\n{}\ndaemon's stacks:\n{}\n\
                         daemon output:\n{}",
                        since.elapsed(),
                        kernel_stacks("self", Some(tid)),
                        kernel_stacks(&m.pid().to_string(), None),
                        user_stacks(m.pid()),
                        m.output()
                    );
                }
            }
        }
        daemon_check(&mut m, "during the run");
        for h in handles.iter_mut() {
            if h.as_ref().is_some_and(|h| h.is_finished()) {
                let s = h.take().unwrap().join().expect("a worker panicked");
                for (k, n) in s.ok {
                    *stats.ok.entry(k).or_default() += n;
                }
                for (k, n) in s.errors {
                    *stats.errors.entry(k).or_default() += n;
                }
                stats.failures.extend(s.failures);
            }
        }
    }
    let worked = work_began.elapsed();

    let t = Instant::now();
    let before = check_tree(m.path(), &mut problems);
    check_listed(m.path(), &before, &mut problems);
    let walk1 = t.elapsed();
    daemon_check(&mut m, "after the run");
    print_figures(seed, worked, &stats, &before);
    let first_output = m.output();
    let t = Instant::now();
    m.remount();
    let remount = t.elapsed();
    let t = Instant::now();
    let mut after_problems = Vec::new();
    let after = check_tree(m.path(), &mut after_problems);
    check_listed(m.path(), &after, &mut after_problems);
    let walk2 = t.elapsed();
    daemon_check(&mut m, "after the remount");
    let _ = io::stderr().write_all(
        format!(
            "concurrency: {quiesced_checks} quiesced tree checks during the run; at its end \
             tree check {:.1} s, remount {:.1} s, tree check after it {:.1} s\n",
            walk1.as_secs_f64(),
            remount.as_secs_f64(),
            walk2.as_secs_f64()
        )
        .as_bytes(),
    );
    problems.extend(
        after_problems
            .into_iter()
            .map(|p| format!("after remount: {p}")),
    );
    for (p, s) in &before {
        match after.get(p) {
            None => problems.push(format!("/{p} gone after the remount")),
            Some(a) if a != s => {
                problems.push(format!("/{p} changed across the remount: {s:?} -> {a:?}"))
            }
            Some(_) => {}
        }
    }
    for p in after.keys().filter(|p| !before.contains_key(*p)) {
        problems.push(format!("/{p} appeared with the remount"));
    }
    let failures: Vec<String> = stats.failures.iter().take(30).cloned().collect();
    assert!(
        failures.is_empty() && problems.is_empty(),
        "seed {seed:#x}: {} failed operations, {} tree problems\n{}\n{}\ndaemon output (run):\n{first_output}\ndaemon output (after the remount):\n{}",
        stats.failures.len(),
        problems.len(),
        failures.join("\n"),
        problems
            .iter()
            .take(30)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n"),
        m.output()
    );
    // Unmounting checks the daemon's output for watchdog reports.
    m.unmount();
    drop(l);
    let _ = io::stderr().write_all(
        format!(
            "concurrency: whole test {:.1} s (with the checks, the remount and the clean-up)\n",
            began.elapsed().as_secs_f64()
        )
        .as_bytes(),
    );
}

/// Sends SIGCONT to a stopped daemon when dropped, so that a failing assertion never
/// leaves it stopped (its mount could then not be torn down).
struct Stopped(u32);

impl Stopped {
    fn stop(pid: u32) -> Stopped {
        // SAFETY: pid is a child of this process, not yet reaped.
        assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGSTOP) }, 0);
        let stopped = Stopped(pid);
        // The signal is asynchronous: a thread may still serve a request before it
        // stops. Wait until every thread is in state T.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !all_threads_stopped(pid) {
            assert!(
                Instant::now() < deadline,
                "pid {pid} not stopped after 10 s"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        stopped
    }
}

fn all_threads_stopped(pid: u32) -> bool {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().all(|t| {
        // The state follows the parenthesised command name, which may contain spaces.
        fs::read_to_string(t.path().join("stat")).is_ok_and(|st| {
            st.rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with(['T', 't']))
        })
    })
}

impl Drop for Stopped {
    fn drop(&mut self) {
        // SAFETY: as in `stop`.
        unsafe { libc::kill(self.0 as libc::pid_t, libc::SIGCONT) };
    }
}

/// End to end, without any test hook in the daemon: the lower layer of the mount under
/// test is itself a stratafs mount, whose daemon is stopped. A lookup on the outer mount
/// then blocks inside the outer daemon (in its lookup on the layer), and the outer
/// daemon's watchdog must say so, once, naming the operation, the directory's inode and
/// the name; once the inner daemon runs again the lookup completes normally.
#[test]
fn a_request_stuck_in_a_layer_is_reported_once_by_the_watchdog() {
    if !fixture::require_fuse() {
        return;
    }
    let inner_l = Layers::new(&[LayerBuilder::new().file("present", b"here\n")]);
    let inner = StrataMount::read_only(&inner_l);
    let outer_l = Layers::new(&[]);
    let options = format!(
        "lowerdir={},upperdir={},workdir={}",
        inner.path().display(),
        outer_l.upper.display(),
        outer_l.work.display()
    );
    let mut outer = StrataMount::with_env(
        &options,
        &[],
        &[("STRATAFS_WATCHDOG_SECS", "1")],
        &outer_l.merged,
        &outer_l.root,
    );
    outer.expect_watchdog_reports();
    assert_eq!(fs::read(outer.join("present")).unwrap(), b"here\n");

    let stopped = Stopped::stop(inner.pid());
    let p = outer.join("never-looked-up");
    let lookup = std::thread::spawn(move || fs::symlink_metadata(&p).map(drop));
    let want = "watchdog: lookup of inode 1 name \"never-looked-up\" still running after ";
    let deadline = Instant::now() + Duration::from_secs(15);
    while !outer.output().contains(want) {
        assert!(
            Instant::now() < deadline,
            "no watchdog report within 15 s of a lookup blocked in a stopped layer; \
             outer daemon output:\n{}",
            outer.output()
        );
        assert!(
            !lookup.is_finished(),
            "the lookup returned while the layer's daemon was stopped"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Several more scans: the same request must not be reported again.
    std::thread::sleep(Duration::from_millis(2500));
    drop(stopped);
    let r = lookup.join().unwrap();
    assert_eq!(
        r.map_err(|e| e.raw_os_error()),
        Err(Some(libc::ENOENT)),
        "the lookup, once the layer answers"
    );
    let out = outer.output();
    // Other requests may be stuck on the stopped layer too (the release of `present`,
    // which the kernel sends after close(2) returned, closes a file on it); the lookup
    // is reported once.
    let reports: Vec<&str> = out.lines().filter(|l| l.contains(want)).collect();
    assert_eq!(reports.len(), 1, "one report per stuck request:\n{out}");
    assert!(
        reports[0].contains("WARN"),
        "a warning line: {}",
        reports[0]
    );
}

/// The smallest form of what `read_while_write` checks: a process holds a lower file
/// open for reading, another truncates it by path (which copies it up). The reader must
/// see the new size and data, as it does on kernel overlayfs (and on any filesystem).
#[test]
fn a_reader_open_on_a_lower_file_sees_a_truncate_by_path() {
    if !fixture::require_fuse() {
        return;
    }
    let l = Layers::new(&[LayerBuilder::new().file("f", b"lower data here\n")]);
    let m = StrataMount::new(&l);
    let p = m.join("f");
    let r = fs::File::open(&p).unwrap();
    truncate_path(&p, 5).unwrap();
    assert_eq!(fs::metadata(&p).unwrap().len(), 5);
    let mut buf = [0u8; 64];
    let n = r.read_at(&mut buf, 0).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&buf[..n]),
        "lower",
        "read(2) through a reader opened before truncate(2) by path to 5 bytes"
    );
}
