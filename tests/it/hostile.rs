//! Hostile and foreign metadata in the layers: origin markers, redirects, metacopy,
//! override_stat and opaque markers with values stratafs never writes, lowers whose
//! inode numbers use the top bits (kernel overlayfs `xino=on`, another union mount),
//! layers written by kernel overlayfs itself (its redirects and metadata-only copies),
//! and shapes a plain image never has but a host easily does (a file hard-linked
//! into two layers, nested layers, mount points inside a layer, a very deep chain).
//! The origin cases run as root (`trusted.stratafs.origin`) and rootless, in a user
//! namespace (`user.stratafs.origin`).
//!
//! What every case asserts, because a user depends on it:
//! - the mount answers every probe: nothing hangs, the daemon stays alive, statfs
//!   answers, and a failing call answers a sane errno (ENOENT, EIO or ESTALE for the
//!   entries carrying garbage; never ENOTCONN, which means the daemon is gone);
//! - entries the garbage does not touch show exactly what the layers hold, writes
//!   through the mount are visible (also after a remount);
//! - two distinct objects never share an st_ino, and one file shows one st_ino on all
//!   of its names;
//! - shapes without hostile intent give what kernel overlayfs gives on the same
//!   layers (data, listing and errno of the affected paths).
//!
//! Every mounted call runs on a helper thread and is given [`PROBE_TIMEOUT`]: a
//! lookup stuck in the daemon (e.g. an inode-number allocation that never ends) fails
//! the test naming the case and the call, after a lazy unmount and a SIGKILL of the
//! daemon this test started, so that the stuck thread is released and nothing is
//! left mounted. The report lists the daemon's thread states (a spinning thread shows
//! as R with many ticks); `STRATAFS_HOSTILE_GDB=1` adds every thread's stack.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{CString, OsStr};
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use libc::{EIO, ENOENT, ESTALE};
use stratafs::testing::is_private_xattr;

use crate::fixture::{
    self, Answer, Errno, Format, LayerBuilder, Layers, Meta, StrataMount, Syscall, Tmpfs, errno,
    errno_name, io_errno, statfs_bounded,
};

/// How long one mounted call may take. Every call here is small: a healthy mount
/// answers in milliseconds, so 10 s only ever expires on a hang.
pub(crate) const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// The deep-chain probes walk 9,000 levels one FUSE lookup at a time.
const DEEP_TIMEOUT: Duration = Duration::from_secs(60);

const ROOT_ORIGIN: &str = "trusted.stratafs.origin";
const USER_ORIGIN: &str = "user.stratafs.origin";

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else {
        "panic without a message".into()
    }
}

/// Whether `pid` (our own, unreaped child) is still running: a dead child stays a
/// zombie until it is reaped.
fn pid_alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// What the daemon's threads are doing, for a hang report: a thread spinning in a
/// loop is running (R) with a large CPU time; a deadlock leaves every thread asleep.
fn daemon_threads(pid: u32) -> String {
    let Ok(rd) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return "unknown (no /proc entry)".into();
    };
    let mut out = Vec::new();
    for t in rd.flatten() {
        let stat = fs::read_to_string(t.path().join("stat")).unwrap_or_default();
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        // Fields after the command: state is the 1st, utime the 12th, stime the 13th.
        if f.len() > 12 {
            let ticks: u64 = f[11].parse::<u64>().unwrap_or(0) + f[12].parse::<u64>().unwrap_or(0);
            out.push(format!(
                "{}:{} ({} ticks)",
                t.file_name().to_string_lossy(),
                f[0],
                ticks
            ));
        }
    }
    out.join(", ")
}

/// The attributes the checks compare.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct St {
    pub(crate) kind: u32,
    ino: u64,
    nlink: u64,
    size: u64,
    mode: u32,
}

impl St {
    fn of(md: &fs::Metadata) -> St {
        St {
            kind: md.mode() & libc::S_IFMT,
            ino: md.ino(),
            nlink: md.nlink(),
            size: md.size(),
            mode: md.mode() & 0o7777,
        }
    }
    fn is_dir(&self) -> bool {
        self.kind == libc::S_IFDIR
    }
    pub(crate) fn is_file(&self) -> bool {
        self.kind == libc::S_IFREG
    }
}

fn lstat_st(p: &Path) -> Result<St, Errno> {
    fixture::lstat(p).map(|md| St::of(&md))
}

fn read_all(p: &Path) -> Result<Vec<u8>, Errno> {
    fs::read(p).map_err(|e| io_errno(&e))
}

/// Names of a directory without `.`/`..`, in readdir order (duplicates kept).
fn list_raw(p: &Path) -> Result<Vec<String>, Errno> {
    let rd = fs::read_dir(p).map_err(|e| io_errno(&e))?;
    let mut v = Vec::new();
    for e in rd {
        let e = e.map_err(|e| io_errno(&e))?;
        v.push(e.file_name().to_string_lossy().into_owned());
    }
    Ok(v)
}

fn append_to(p: &Path, data: &[u8]) -> Result<(), Errno> {
    let mut f = OpenOptions::new()
        .append(true)
        .open(p)
        .map_err(|e| io_errno(&e))?;
    f.write_all(data).map_err(|e| io_errno(&e))
}

fn create_with(p: &Path, data: &[u8]) -> Result<(), Errno> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(p)
        .map_err(|e| io_errno(&e))?;
    f.write_all(data).map_err(|e| io_errno(&e))
}

/// Accepts success or an errno a union filesystem may answer for an entry whose
/// metadata is garbage; anything else (ENOTCONN above all) fails the case.
pub(crate) fn sane<T>(case: &str, what: &str, r: Result<T, Errno>, also: &[Errno]) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(e) if [ENOENT, EIO, ESTALE].contains(&e) || also.contains(&e) => None,
        Err(e) => panic!(
            "{case}: {what} answers {}: not a sane answer (ENOENT, EIO or ESTALE{} expected \
             for garbage metadata)",
            errno_name(e),
            if also.is_empty() {
                String::new()
            } else {
                format!(
                    ", {}",
                    also.iter()
                        .map(|e| errno_name(*e))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
        ),
    }
}

pub(crate) fn must<T>(case: &str, what: &str, r: Result<T, Errno>) -> T {
    r.unwrap_or_else(|e| panic!("{case}: {what} answers {}", errno_name(e)))
}

fn show(data: &[u8]) -> String {
    if data.len() > 64 {
        format!(
            "{} bytes starting {:?}",
            data.len(),
            String::from_utf8_lossy(&data[..64])
        )
    } else {
        format!("{:?}", String::from_utf8_lossy(data))
    }
}

// ---------------------------------------------------------------------------------------
// A stratafs mount whose every call is bounded
// ---------------------------------------------------------------------------------------

/// Mounts stratafs, naming the case if the mount does not come up.
fn try_strata(options: &str, mp: &Path, log_dir: &Path) -> Result<StrataMount, String> {
    catch_unwind(AssertUnwindSafe(|| {
        StrataMount::with_options(options, mp, log_dir)
    }))
    .map_err(|p| panic_text(&*p))
}

pub(crate) struct Bounded {
    case: String,
    mp: PathBuf,
    mount: Option<StrataMount>,
    timeout: Duration,
}

impl Bounded {
    pub(crate) fn mount(case: &str, options: &str, l: &Layers) -> Bounded {
        let m = try_strata(options, &l.merged, &l.root)
            .unwrap_or_else(|e| panic!("{case}: stratafs does not mount: {e}"));
        Bounded::new(case, m)
    }

    pub(crate) fn new(case: &str, m: StrataMount) -> Bounded {
        Bounded {
            case: case.to_string(),
            mp: m.path().to_path_buf(),
            mount: Some(m),
            timeout: PROBE_TIMEOUT,
        }
    }

    pub(crate) fn join(&self, rel: &str) -> PathBuf {
        if rel.is_empty() || rel == "." {
            self.mp.clone()
        } else {
            self.mp.join(rel)
        }
    }

    fn output(&self) -> String {
        self.mount.as_ref().map(|m| m.output()).unwrap_or_default()
    }

    /// Runs `f` on a helper thread and waits at most `self.timeout` for it. On a
    /// timeout the mount is torn down (so the helper thread is released) and the
    /// case fails naming `what`.
    pub(crate) fn probe<T: Send + 'static>(
        &mut self,
        what: &str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> T {
        let Some(pid) = self.mount.as_ref().map(|m| m.pid()) else {
            panic!("{}: {what}: the mount was already torn down", self.case);
        };
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name(format!("probe: {what}"))
            .spawn(move || {
                let r = catch_unwind(AssertUnwindSafe(f)).map_err(|p| panic_text(&*p));
                let _ = tx.send(r);
            })
            .expect("spawn a probe thread");
        let started = std::time::Instant::now();
        let answer = rx.recv_timeout(self.timeout);
        if started.elapsed() > Duration::from_secs(2) {
            eprintln!("{}: {what} took {:?}", self.case, started.elapsed());
        }
        match answer {
            Ok(Ok(v)) => {
                self.check_alive(what);
                v
            }
            Ok(Err(msg)) => panic!("{}: {what}: {msg}", self.case),
            Err(_) => {
                let out = self.output();
                let mut threads = daemon_threads(pid);
                if std::env::var_os("STRATAFS_HOSTILE_GDB").is_some_and(|v| v == "1") {
                    // Opt-in: the stacks of the daemon's threads, for whoever fixes it.
                    if let Ok(o) = Command::new("gdb")
                        .args([
                            "-p",
                            &pid.to_string(),
                            "-batch",
                            "-ex",
                            "thread apply all bt 25",
                        ])
                        .stdin(Stdio::null())
                        .output()
                    {
                        threads.push('\n');
                        threads.push_str(&String::from_utf8_lossy(&o.stdout));
                    }
                }
                self.abandon();
                panic!(
                    "{}: {what} hung: no answer within {:?} (daemon pid {pid} was alive, \
                     lazily unmounted and killed); daemon threads: {threads}; daemon \
                     output:\n{out}",
                    self.case, self.timeout
                )
            }
        }
    }

    /// The daemon must survive every call, and the mount must keep answering.
    pub(crate) fn check_alive(&mut self, after: &str) {
        let pid = self.mount.as_ref().expect("mounted").pid();
        if !pid_alive(pid) {
            let out = self.output();
            self.abandon();
            panic!(
                "{}: the daemon (pid {pid}) died during {after}; its output:\n{out}",
                self.case
            );
        }
        match statfs_bounded(&self.mp, PROBE_TIMEOUT) {
            Some(Ok(_)) => {}
            Some(Err(e)) => panic!(
                "{}: statfs after {after} answers {}",
                self.case,
                errno_name(e)
            ),
            None => {
                self.abandon();
                panic!("{}: statfs after {after} hung", self.case)
            }
        }
    }

    /// Tears the mount down without waiting for the daemon: a lazy unmount (a
    /// plain one would be refused while a call is stuck), then SIGKILL of the
    /// daemon the fixture started, which aborts the FUSE connection and releases
    /// any thread stuck in it.
    fn abandon(&mut self) {
        let Some(m) = self.mount.take() else { return };
        let pid = m.pid();
        let _ = Command::new("fusermount3")
            .args(["-u", "-z"])
            .arg(&self.mp)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        // SAFETY: pid is the daemon this fixture spawned and has not reaped yet, so
        // the number cannot have been reused by another process.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        // StrataMount's drop reaps the daemon and finds nothing left mounted.
        drop(m);
    }

    pub(crate) fn remount(&mut self) {
        let case = self.case.clone();
        let m = self.mount.as_mut().expect("mounted");
        if let Err(p) = catch_unwind(AssertUnwindSafe(|| m.remount())) {
            let msg = panic_text(&*p);
            self.abandon();
            panic!("{case}: remount failed: {msg}");
        }
        self.check_alive("remount");
    }

    pub(crate) fn lstat(&mut self, rel: &str) -> Result<St, Errno> {
        let p = self.join(rel);
        self.probe(&format!("lookup (lstat) of {rel:?}"), move || lstat_st(&p))
    }

    pub(crate) fn read(&mut self, rel: &str) -> Result<Vec<u8>, Errno> {
        let p = self.join(rel);
        self.probe(&format!("read of {rel:?}"), move || read_all(&p))
    }

    pub(crate) fn list(&mut self, rel: &str) -> Result<Vec<String>, Errno> {
        let p = self.join(rel);
        self.probe(&format!("readdir of {rel:?}"), move || list_raw(&p))
    }

    pub(crate) fn append(&mut self, rel: &str, data: &[u8]) -> Result<(), Errno> {
        let p = self.join(rel);
        let data = data.to_vec();
        self.probe(&format!("append to {rel:?}"), move || append_to(&p, &data))
    }

    fn create(&mut self, rel: &str, data: &[u8]) -> Result<(), Errno> {
        let p = self.join(rel);
        let data = data.to_vec();
        self.probe(&format!("create of {rel:?}"), move || {
            create_with(&p, &data)
        })
    }

    fn chmod(&mut self, rel: &str, mode: u32) -> Result<(), Errno> {
        let p = self.join(rel);
        self.probe(&format!("chmod of {rel:?}"), move || {
            fixture::chmod(&p, mode)
        })
    }

    fn rename(&mut self, from: &str, to: &str) -> Result<(), Errno> {
        let (a, b) = (self.join(from), self.join(to));
        self.probe(&format!("rename of {from:?} to {to:?}"), move || {
            fs::rename(&a, &b).map_err(|e| io_errno(&e))
        })
    }

    fn xattr_names(&mut self, rel: &str) -> Result<Vec<String>, Errno> {
        let p = self.join(rel);
        self.probe(&format!("listxattr of {rel:?}"), move || {
            fixture::llistxattr(&p)
        })
    }
}

// ---------------------------------------------------------------------------------------
// The probes every case runs
// ---------------------------------------------------------------------------------------

/// The content every case has in its bottom lower layer, untouched by the garbage.
fn base(spec: LayerBuilder) -> LayerBuilder {
    spec.file("plain", "plain\n")
        .file("pdir/inner", "inner\n")
        .file("linked", "linked\n")
        .hardlink("pdir/linked2", "linked")
}

/// Names of `base` that are one object.
const BASE_LINKS: &[&str] = &["linked", "pdir/linked2"];

fn is_under(rel: &str, roots: &[&str]) -> bool {
    roots
        .iter()
        .any(|h| rel == *h || rel.strip_prefix(h).is_some_and(|r| r.starts_with('/')))
}

fn join_rel(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

/// Walks the merged tree (depth-bounded): every name readdir lists once and can be
/// looked up, except under `hostile`, where sane errors are accepted.
fn walk(m: &mut Bounded, hostile: &[&str], max_depth: usize) -> BTreeMap<String, St> {
    let case = m.case.clone();
    let mut out = BTreeMap::new();
    out.insert(
        ".".to_string(),
        must(&case, "lstat of the root", m.lstat(".")),
    );
    let mut queue = vec![(String::new(), 0usize)];
    while let Some((dir, depth)) = queue.pop() {
        let what = format!("readdir of {dir:?}");
        let names = if is_under(&dir, hostile) {
            match sane(&case, &what, m.list(&dir), &[]) {
                Some(n) => n,
                None => continue,
            }
        } else {
            must(&case, &what, m.list(&dir))
        };
        let mut seen = BTreeSet::new();
        for n in &names {
            assert!(seen.insert(n), "{case}: {what} lists {n:?} more than once");
            assert!(
                !n.starts_with(".wh."),
                "{case}: {what} shows the whiteout-format name {n:?}"
            );
        }
        for n in names {
            let rel = join_rel(&dir, &n);
            let what = format!("lookup of {rel:?} (listed by readdir)");
            let st = if is_under(&rel, hostile) {
                match sane(&case, &what, m.lstat(&rel), &[]) {
                    Some(st) => st,
                    None => continue,
                }
            } else {
                must(&case, &what, m.lstat(&rel))
            };
            if st.is_dir() && depth + 1 < max_depth {
                queue.push((rel.clone(), depth + 1));
            }
            out.insert(rel, st);
        }
    }
    out
}

/// Distinct objects show distinct st_ino; the names of one object (`links`, each a
/// group of hard links) show one st_ino.
fn check_inos(case: &str, tree: &BTreeMap<String, St>, links: &[&[&str]]) {
    let mut by_ino: BTreeMap<u64, Vec<&str>> = BTreeMap::new();
    for (p, st) in tree {
        by_ino.entry(st.ino).or_default().push(p);
    }
    for (ino, paths) in &by_ino {
        if paths.len() < 2 {
            continue;
        }
        let one_object = links
            .iter()
            .any(|g| paths.iter().all(|p| g.contains(p)) && !tree[paths[0]].is_dir());
        assert!(
            one_object,
            "{case}: distinct objects share st_ino {ino}: {paths:?}"
        );
    }
    for group in links {
        let inos: BTreeSet<u64> = group
            .iter()
            .filter_map(|p| tree.get(*p).map(|s| s.ino))
            .collect();
        assert!(
            inos.len() <= 1,
            "{case}: the hard links {group:?} of one file show different st_ino {inos:?}"
        );
    }
}

/// The entries of [`base`] show what the layer holds.
fn check_base(m: &mut Bounded, plain: &[u8]) {
    let case = m.case.clone();
    for (rel, want) in [
        ("plain", plain),
        ("pdir/inner", b"inner\n".as_slice()),
        ("linked", b"linked\n"),
        ("pdir/linked2", b"linked\n"),
    ] {
        let got = must(&case, &format!("read of {rel:?}"), m.read(rel));
        assert_eq!(
            got,
            want,
            "{case}: {rel:?} holds {} instead of {}",
            show(&got),
            show(want)
        );
    }
    let st = must(&case, "lstat of \"linked\"", m.lstat("linked"));
    assert_eq!(
        st.nlink, 2,
        "{case}: st_nlink of the hard-linked \"linked\""
    );
}

/// Probes one entry carrying garbage: lookup, read or readdir, append, chmod. Each
/// may fail with a sane errno; what succeeds must have worked.
fn probe_hostile(m: &mut Bounded, rel: &str) {
    let case = m.case.clone();
    let Some(st) = sane(&case, &format!("lookup of {rel:?}"), m.lstat(rel), &[]) else {
        return;
    };
    if st.is_file() {
        let before = sane(&case, &format!("read of {rel:?}"), m.read(rel), &[]);
        if let Some(b) = &before {
            assert_eq!(
                b.len() as u64,
                st.size,
                "{case}: read of {rel:?} gives {} bytes but st_size is {}",
                b.len(),
                st.size
            );
        }
        let tail = b"+appended through the mount\n";
        let what = format!("append to {rel:?}");
        if sane(&case, &what, m.append(rel, tail), &[]).is_some() {
            let after = must(
                &case,
                &format!("read of {rel:?} after the append"),
                m.read(rel),
            );
            assert!(
                after.ends_with(tail),
                "{case}: the append to {rel:?} is not visible: it holds {}",
                show(&after)
            );
            if let Some(b) = before {
                assert_eq!(
                    after.len(),
                    b.len() + tail.len(),
                    "{case}: size of {rel:?} after appending {} bytes to {}",
                    tail.len(),
                    b.len()
                );
            }
        }
    } else if st.is_dir() {
        sane(&case, &format!("readdir of {rel:?}"), m.list(rel), &[]);
    }
    if st.kind != libc::S_IFLNK
        && sane(
            &case,
            &format!("chmod of {rel:?}"),
            m.chmod(rel, 0o750),
            &[],
        )
        .is_some()
    {
        let after = must(
            &case,
            &format!("lstat of {rel:?} after chmod"),
            m.lstat(rel),
        );
        assert_eq!(
            after.mode, 0o750,
            "{case}: chmod 0750 of {rel:?} not visible"
        );
    }
    if let Some(names) = sane(
        &case,
        &format!("listxattr of {rel:?}"),
        m.xattr_names(rel),
        &[],
    ) {
        let private: Vec<_> = names
            .iter()
            .filter(|n| is_private_xattr(OsStr::new(n)) || n.ends_with("override_stat"))
            .collect();
        assert!(
            private.is_empty(),
            "{case}: {rel:?} shows private xattrs through the mount: {private:?}"
        );
    }
}

/// Everything a case checks besides its own assertions: the walk, st_ino, the base
/// entries, the hostile entries, writes, a rename, a remount, and all of it again.
fn exercise(m: &mut Bounded, hostile: &[&str], links: &[&[&str]]) {
    let case = m.case.clone();
    let mut all_links: Vec<&[&str]> = vec![BASE_LINKS];
    all_links.extend_from_slice(links);
    let tree = walk(m, hostile, 8);
    check_inos(&case, &tree, &all_links);
    check_base(m, b"plain\n");
    for h in hostile {
        probe_hostile(m, h);
    }
    // Writes through the mount: a copy-up of a lower file, a new file, a rename.
    must(&case, "append to \"plain\"", m.append("plain", b"more\n"));
    check_base(m, b"plain\nmore\n");
    must(&case, "create of \"new\"", m.create("new", b"new\n"));
    assert_eq!(must(&case, "read of \"new\"", m.read("new")), b"new\n");
    must(
        &case,
        "rename of \"pdir/inner\"",
        m.rename("pdir/inner", "moved"),
    );
    assert_eq!(
        must(&case, "read of \"moved\"", m.read("moved")),
        b"inner\n"
    );
    for h in hostile {
        if !h.contains('/') {
            let to = format!("{h}.renamed");
            let what = format!("rename of {h:?}");
            if sane(&case, &what, m.rename(h, &to), &[libc::EXDEV]).is_some() {
                must(&case, &format!("lookup of {to:?}"), m.lstat(&to));
                sane(
                    &case,
                    &format!("rename back of {to:?}"),
                    m.rename(&to, h),
                    &[],
                );
            }
        }
    }
    let tree = walk(m, hostile, 8);
    check_inos(&case, &tree, &all_links);

    m.remount();
    for (rel, want) in [
        ("plain", b"plain\nmore\n".as_slice()),
        ("new", b"new\n"),
        ("moved", b"inner\n"),
        ("linked", b"linked\n"),
    ] {
        let got = must(
            &case,
            &format!("read of {rel:?} after the remount"),
            m.read(rel),
        );
        assert_eq!(
            got,
            want,
            "{case}: after the remount {rel:?} holds {} instead of {}",
            show(&got),
            show(want)
        );
    }
    for h in hostile {
        sane(
            &case,
            &format!("lookup of {h:?} after the remount"),
            m.lstat(h),
            &[],
        );
    }
    let tree = walk(m, hostile, 8);
    check_inos(&case, &tree, &all_links);
}

// ---------------------------------------------------------------------------------------
// Origin markers on upper entries
// ---------------------------------------------------------------------------------------

/// An upper file and an upper directory both carry origin `value` in both
/// namespaces (a root mount reads the trusted one, a rootless mount the user one).
fn origin_case(case: &str, value: &[u8]) {
    if !fixture::require_fuse() {
        return;
    }
    let marks = || {
        Meta::new()
            .xattr(ROOT_ORIGIN, value)
            .xattr(USER_ORIGIN, value)
    };
    let upper = LayerBuilder::new()
        .file_with("victim", "victim\n", marks())
        .dir_with("vdir", marks())
        .file("vdir/x", "x\n");
    let l = Layers::build(&[base(LayerBuilder::new())], Some(&upper), Format::NATIVE);
    let mut m = Bounded::mount(case, &l.rw_options(), &l);
    let root = must(case, "lstat of the root", m.lstat("."));
    for rel in ["victim", "vdir"] {
        if let Some(st) = sane(case, &format!("lookup of {rel:?}"), m.lstat(rel), &[]) {
            // The origin only suggests a number: a value naming the root (or any
            // taken number) must not make an entry look like the root.
            assert_ne!(
                st.ino, root.ino,
                "{case}: {rel:?} shows the root's st_ino {}",
                root.ino
            );
        }
    }
    if let Some(d) = sane(case, "read of \"victim\"", m.read("victim"), &[]) {
        assert_eq!(d, b"victim\n", "{case}: data of \"victim\"");
    }
    exercise(&mut m, &["victim", "vdir"], &[]);
}

#[test]
fn origin_zero() {
    origin_case("origin_zero", b"0");
}

#[test]
fn origin_root_number() {
    origin_case("origin_root_number", b"1");
}

#[test]
fn origin_u64_max() {
    origin_case("origin_u64_max", u64::MAX.to_string().as_bytes());
}

#[test]
fn origin_reserved_range() {
    origin_case(
        "origin_reserved_range",
        ((1u64 << 63) + 7).to_string().as_bytes(),
    );
}

#[test]
fn origin_garbage_bytes() {
    origin_case("origin_garbage_bytes", b"\xff\xfe\x00garbage\x01");
}

#[test]
fn origin_wrong_length() {
    // The number as 8 binary bytes instead of decimal text (what a careless
    // tool or another union filesystem might write).
    origin_case("origin_wrong_length", &12345u64.to_le_bytes());
}

#[test]
fn origin_overflowing_decimal() {
    origin_case("origin_overflowing_decimal", b"18446744073709551616");
}

/// `cp -a` of a copied-up file copies its origin marker too: two upper files then
/// carry the same origin. They are two objects and must show two st_ino.
#[test]
fn origin_shared_by_cp_a_copy() {
    let case = "origin_shared_by_cp_a_copy";
    if !fixture::require_fuse() {
        return;
    }
    let l = Layers::new(&[base(LayerBuilder::new()).file("orig", "orig\n")]);
    let shown = {
        let mut m = Bounded::mount(case, &l.rw_options(), &l);
        let st = must(case, "lookup of \"orig\"", m.lstat("orig"));
        must(case, "chmod of \"orig\"", m.chmod("orig", 0o600));
        st.ino
    };
    let up = l.upper.join("orig");
    let marker = fixture::lgetxattr(&up, ROOT_ORIGIN).unwrap_or_else(|e| {
        panic!(
            "{case}: the copy-up left no {ROOT_ORIGIN} on {}: {}",
            up.display(),
            errno_name(e)
        )
    });
    let out = Command::new("cp")
        .arg("-a")
        .arg(&up)
        .arg(l.upper.join("copy"))
        .output()
        .expect("run cp");
    assert!(out.status.success(), "cp -a: {out:?}");
    assert_eq!(
        fixture::lgetxattr(&l.upper.join("copy"), ROOT_ORIGIN).ok(),
        Some(marker),
        "cp -a did not copy the origin marker; the case would test nothing"
    );
    let mut m = Bounded::mount(case, &l.rw_options(), &l);
    let orig = must(case, "lookup of \"orig\"", m.lstat("orig"));
    assert_eq!(
        orig.ino, shown,
        "{case}: the copied-up \"orig\" lost the st_ino it had before its copy-up"
    );
    let copy = must(case, "lookup of \"copy\"", m.lstat("copy"));
    assert_ne!(
        orig.ino, copy.ino,
        "{case}: \"orig\" and its cp -a copy share st_ino"
    );
    must(case, "append to \"copy\"", m.append("copy", b"copy\n"));
    assert_eq!(
        must(case, "read of \"copy\"", m.read("copy")),
        b"orig\ncopy\n"
    );
    assert_eq!(must(case, "read of \"orig\"", m.read("orig")), b"orig\n");
    exercise(&mut m, &[], &[]);
}

// ---------------------------------------------------------------------------------------
// Redirects on upper and lower directories
// ---------------------------------------------------------------------------------------

const REDIRECT_NAMES: [&str; 2] = ["trusted.overlay.redirect", "user.overlay.redirect"];

fn redirect_meta(value: &[u8]) -> Meta {
    REDIRECT_NAMES
        .iter()
        .fold(Meta::new(), |m, n| m.xattr(n, value))
}

/// A layer on its own tmpfs (ext4 cannot hold a 4 KiB xattr value), with an upper
/// and a workdir, under the case's scratch directory.
struct TmpLayer {
    tmpfs: Tmpfs,
}

impl TmpLayer {
    fn new(l: &Layers, name: &str) -> TmpLayer {
        let t = Tmpfs::new(&l.root.join(name), "64m");
        for d in ["layer", "work"] {
            fs::create_dir(t.path.join(d)).unwrap();
        }
        TmpLayer { tmpfs: t }
    }
    fn layer(&self) -> PathBuf {
        self.tmpfs.path.join("layer")
    }
    fn work(&self) -> PathBuf {
        self.tmpfs.path.join("work")
    }
}

/// Where the garbage redirect sits.
#[derive(Clone, Copy, PartialEq, Eq)]
enum On {
    Upper,
    Lower,
}

/// Directory `d` of the layer `on` carries redirect `value`; the bottom layer has
/// `d/keep`, a symlink `esc` to the host's /etc, and the base entries. The merged
/// `d` may answer a sane errno, but what it lists must come from the layers.
fn redirect_case(case: &str, value: &[u8], on: On) {
    if !fixture::require_fuse() {
        return;
    }
    let bottom = base(LayerBuilder::new())
        .file("d/keep", "keep\n")
        .file("other/o", "o\n")
        .symlink("esc", "/etc");
    let l = Layers::build(&[bottom], None, Format::NATIVE);
    let t = TmpLayer::new(&l, "hostile-layer");
    LayerBuilder::new()
        .dir_with("d", redirect_meta(value))
        .file("d/mine", "mine\n")
        .build(&t.layer(), Format::NATIVE);
    let options = match on {
        On::Upper => format!(
            "lowerdir={},upperdir={},workdir={}",
            l.lowerdir(),
            t.layer().display(),
            t.work().display()
        ),
        On::Lower => format!(
            "lowerdir={}:{},upperdir={},workdir={}",
            t.layer().display(),
            l.lowerdir(),
            l.upper.display(),
            l.work.display()
        ),
    };
    let mut m = Bounded::mount(case, &options, &l);
    if let Some(names) = sane(case, "readdir of \"d\"", m.list("d"), &[]) {
        let allowed = ["keep", "mine", "o"];
        let foreign: Vec<_> = names
            .iter()
            .filter(|n| !allowed.contains(&n.as_str()))
            .collect();
        assert!(
            foreign.is_empty(),
            "{case}: the redirected \"d\" lists names from outside the layers: {foreign:?}"
        );
        assert!(
            names.iter().any(|n| n == "mine"),
            "{case}: \"d\" lost its own entry \"mine\": {names:?}"
        );
    }
    exercise(&mut m, &["d"], &[]);
    drop(m);
    drop(t);
}

#[test]
fn redirect_dotdot_on_upper() {
    redirect_case("redirect_dotdot_on_upper", b"/../../../../etc", On::Upper);
}

#[test]
fn redirect_dotdot_on_lower() {
    redirect_case("redirect_dotdot_on_lower", b"../../../etc", On::Lower);
}

#[test]
fn redirect_double_slash_on_upper() {
    redirect_case("redirect_double_slash_on_upper", b"//", On::Upper);
}

#[test]
fn redirect_double_slash_on_lower() {
    redirect_case("redirect_double_slash_on_lower", b"/other//o", On::Lower);
}

#[test]
fn redirect_nul_on_upper() {
    redirect_case("redirect_nul_on_upper", b"/oth\0er", On::Upper);
}

#[test]
fn redirect_nul_on_lower() {
    redirect_case("redirect_nul_on_lower", b"/oth\0er", On::Lower);
}

#[test]
fn redirect_outside_the_layer_on_upper() {
    // "/etc" is absent from the layers; "/esc" is a symlink to the host's /etc,
    // which a redirect must never follow.
    redirect_case("redirect_outside_the_layer_on_upper", b"/esc", On::Upper);
}

#[test]
fn redirect_outside_the_layer_on_lower() {
    redirect_case("redirect_outside_the_layer_on_lower", b"/etc", On::Lower);
}

#[test]
fn redirect_4k_value_on_upper() {
    let mut v = b"/".to_vec();
    v.extend(std::iter::repeat_n(b'y', 4095));
    redirect_case("redirect_4k_value_on_upper", &v, On::Upper);
}

#[test]
fn redirect_4k_value_on_lower() {
    // A value of real components, 4 KiB long in total.
    let mut v = Vec::new();
    while v.len() < 4096 - 201 {
        v.push(b'/');
        v.extend(std::iter::repeat_n(b'z', 200));
    }
    v.push(b'/');
    v.extend(std::iter::repeat_n(b'z', 4096 - v.len()));
    assert_eq!(v.len(), 4096);
    redirect_case("redirect_4k_value_on_lower", &v, On::Lower);
}

/// `a` redirects to `/b` and `b` to `/a`, in the upper layer and again in a middle
/// lower layer: no lookup may loop, and each name lists something of the layers.
#[test]
fn redirect_cycle() {
    let case = "redirect_cycle";
    if !fixture::require_fuse() {
        return;
    }
    let cyc = || {
        LayerBuilder::new()
            .dir_with("a", redirect_meta(b"/b"))
            .dir_with("b", redirect_meta(b"/a"))
            .dir_with("c", redirect_meta(b"c"))
    };
    let bottom = base(LayerBuilder::new())
        .file("a/fa", "a\n")
        .file("b/fb", "b\n")
        .file("c/fc", "c\n");
    let l = Layers::build(&[cyc(), bottom], Some(&cyc()), Format::NATIVE);
    let mut m = Bounded::mount(case, &l.rw_options(), &l);
    for d in ["a", "b", "c"] {
        if let Some(names) = sane(case, &format!("readdir of {d:?}"), m.list(d), &[]) {
            assert!(
                names
                    .iter()
                    .all(|n| ["fa", "fb", "fc"].contains(&n.as_str())),
                "{case}: {d:?} lists {names:?}"
            );
        }
    }
    exercise(&mut m, &["a", "b", "c"], &[]);
}

// ---------------------------------------------------------------------------------------
// metacopy, override_stat and opaque markers with garbage
// ---------------------------------------------------------------------------------------

const MIB: u64 = 1 << 20;

fn metacopy_meta() -> Meta {
    Meta::new()
        .xattr("trusted.overlay.metacopy", b"\xde\xad\xbe\xef garbage")
        .xattr("user.overlay.metacopy", b"\x00\x01\x02")
}

#[test]
fn metacopy_garbage_on_a_small_file() {
    let case = "metacopy_garbage_on_a_small_file";
    if !fixture::require_fuse() {
        return;
    }
    let lower = base(LayerBuilder::new())
        .file("mc", "lower data\n")
        .file_with("mc_lower", "in a lower\n", metacopy_meta());
    let upper = LayerBuilder::new().file_with("mc", "upper\n", metacopy_meta());
    let l = Layers::build(&[lower], Some(&upper), Format::NATIVE);
    let mut m = Bounded::mount(case, &l.rw_options(), &l);
    // A small file cannot be a stand-in: its own data is what the upper holds.
    if let Some(d) = sane(case, "read of \"mc\"", m.read("mc"), &[]) {
        assert_eq!(d, b"upper\n", "{case}: data of the upper \"mc\"");
    }
    if let Some(d) = sane(case, "read of \"mc_lower\"", m.read("mc_lower"), &[]) {
        assert_eq!(d, b"in a lower\n", "{case}: data of \"mc_lower\"");
    }
    exercise(&mut m, &["mc", "mc_lower"], &[]);
}

#[test]
fn metacopy_garbage_on_a_large_file() {
    let case = "metacopy_garbage_on_a_large_file";
    if !fixture::require_fuse() {
        return;
    }
    let data = fixture::pattern(2 * MIB as usize, 7);
    let lower = base(LayerBuilder::new()).file("mc", &data);
    let upper = LayerBuilder::new()
        .sparse("mc", 2 * MIB, &[(0, b"upper")], metacopy_meta())
        .sparse("mc_alone", 2 * MIB, &[(0, b"alone")], metacopy_meta());
    let l = Layers::build(&[lower], Some(&upper), Format::NATIVE);
    let mut m = Bounded::mount(case, &l.rw_options(), &l);
    for rel in ["mc", "mc_alone"] {
        if let Some(d) = sane(case, &format!("read of {rel:?}"), m.read(rel), &[]) {
            assert_eq!(d.len() as u64, 2 * MIB, "{case}: size of {rel:?}");
            let upper_data = d.starts_with(b"upper") || d.starts_with(b"alone");
            assert!(
                upper_data || d == data,
                "{case}: {rel:?} holds neither its upper nor its lower data: {}",
                show(&d)
            );
        }
    }
    // Completing a stand-in replaces its inode by the full copy's and frees it;
    // files created right after get numbers from the filesystem that may equal a
    // live st_ino, and must still get an st_ino of their own. (No pause here: on the
    // current code the creates collide reliably only when they follow at once.)
    for rel in ["mc", "mc_alone"] {
        sane(
            case,
            &format!("append to {rel:?}"),
            m.append(rel, b"tail"),
            &[],
        );
    }
    for i in 0..32 {
        let rel = format!("n{i}");
        must(case, &format!("create of {rel:?}"), m.create(&rel, b"n\n"));
        must(case, &format!("lookup of {rel:?}"), m.lstat(&rel));
    }
    exercise(&mut m, &["mc", "mc_alone"], &[]);
}

#[test]
fn override_stat_garbage() {
    let case = "override_stat_garbage";
    if !fixture::require_fuse() {
        return;
    }
    let bad: &[&[u8]] = &[
        b"",
        b"x:y:z",
        b"0:0:99999999",
        b"\xff\xfe:0:0644",
        b"0:0:0644:door",
        b"1:2",
        b"0:0:0644:char-x-y",
        &[b'9'; 4000],
    ];
    let ov = |v: &[u8]| Meta::new().xattr("user.containers.override_stat", v);
    let mut lower = base(LayerBuilder::new());
    let mut upper = LayerBuilder::new();
    let mut hostile = Vec::new();
    for (i, v) in bad.iter().enumerate() {
        lower = lower.file_with(&format!("os{i}"), format!("os{i}\n"), ov(v));
        upper = upper.file_with(&format!("osu{i}"), format!("osu{i}\n"), ov(v));
        hostile.push(format!("os{i}"));
        hostile.push(format!("osu{i}"));
    }
    lower = lower
        .dir_with("osd", ov(b"0:0:garbage:dir"))
        .file("osd/f", "f\n");
    hostile.push("osd".into());
    let l = Layers::build(&[lower], Some(&upper), Format::NATIVE);
    let opts = format!("{},xattr_permissions=2", l.rw_options());
    let mut m = Bounded::mount(case, &opts, &l);
    let hostile: Vec<&str> = hostile.iter().map(|s| s.as_str()).collect();
    exercise(&mut m, &hostile, &[]);
}

/// Opaque markers where no directory is: on an upper file over a lower directory,
/// on a middle-layer file, and a `.wh..wh..opq` that is a directory.
#[test]
fn opaque_markers_on_files() {
    let case = "opaque_markers_on_files";
    if !fixture::require_fuse() {
        return;
    }
    let opq = || {
        Meta::new()
            .xattr("trusted.overlay.opaque", b"y")
            .xattr("user.overlay.opaque", b"y")
    };
    let bottom = base(LayerBuilder::new())
        .file("of/x", "x\n")
        .file("of2/y", "y\n")
        .file("odir/keep", "keep\n");
    let middle = LayerBuilder::new().file_with("of2", "middle-of2\n", opq());
    let upper = LayerBuilder::new()
        .file_with("of", "upper-of\n", opq())
        .dir("odir/.wh..wh..opq");
    let l = Layers::build(&[middle, bottom], Some(&upper), Format::NATIVE);
    let mut m = Bounded::mount(case, &l.rw_options(), &l);
    // A non-directory hides everything below it, marker or not.
    for (rel, want) in [("of", b"upper-of\n".as_slice()), ("of2", b"middle-of2\n")] {
        if let Some(d) = sane(case, &format!("read of {rel:?}"), m.read(rel), &[]) {
            assert_eq!(d, want, "{case}: data of {rel:?}");
        }
    }
    if let Some(names) = sane(case, "readdir of \"odir\"", m.list("odir"), &[]) {
        assert!(
            names.iter().all(|n| n == "keep"),
            "{case}: \"odir\" lists {names:?}"
        );
    }
    exercise(&mut m, &["of", "of2", "odir"], &[]);
}

// ---------------------------------------------------------------------------------------
// Lower layers that are union mounts themselves
// ---------------------------------------------------------------------------------------

/// A mount this test made (kernel overlayfs), unmounted on drop.
struct KMount {
    path: PathBuf,
}

impl KMount {
    fn mount(options: &str, mp: &Path) -> Result<KMount, String> {
        fs::create_dir_all(mp).unwrap();
        let out = Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o"])
            .arg(options)
            .arg(mp)
            .stdin(Stdio::null())
            .output()
            .expect("run mount");
        if out.status.success() {
            Ok(KMount {
                path: mp.to_path_buf(),
            })
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
        }
    }
}

impl Drop for KMount {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.path)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        }
    }
}

/// Reads `rels` from `under` directly and through the mount; they must agree.
fn same_data_as(m: &mut Bounded, under: &Path, rels: &[&str]) {
    let case = m.case.clone();
    for rel in rels {
        let want = read_all(&under.join(rel))
            .unwrap_or_else(|e| panic!("{case}: read of {rel:?} in the lower: {}", errno_name(e)));
        let got = must(&case, &format!("read of {rel:?}"), m.read(rel));
        assert_eq!(
            got,
            want,
            "{case}: {rel:?} holds {} through stratafs, {} in its lower mount",
            show(&got),
            show(&want)
        );
    }
}

/// The lower is a read-only kernel overlay with `xino=on` over an ext4 directory
/// and a tmpfs: entries from the tmpfs have st_ino with the top bit set.
#[test]
fn lower_is_a_kernel_overlay_with_xino() {
    let case = "lower_is_a_kernel_overlay_with_xino";
    if !fixture::require_fuse() || !fixture::require_kernel_overlay() {
        return;
    }
    let l = Layers::new(&[base(LayerBuilder::new())]);
    let ext = l.root.join("xa");
    fs::create_dir(&ext).unwrap();
    LayerBuilder::new()
        .file("fa", "fa\n")
        .file("shared/from_ext", "e\n")
        .build(&ext, Format::NATIVE);
    let t = Tmpfs::new(&l.root.join("xt"), "16m");
    LayerBuilder::new()
        .file("ft", "ft\n")
        .file("dt/x", "x\n")
        .file("shared/from_tmpfs", "t\n")
        .build(&t.path, Format::NATIVE);
    let xm = l.root.join("xm");
    let k = KMount::mount(
        &format!("lowerdir={}:{},xino=on", ext.display(), t.path.display()),
        &xm,
    )
    .unwrap_or_else(|e| panic!("{case}: mount -t overlay with xino=on: {e}"));
    let top = lstat_st(&xm.join("ft")).unwrap();
    assert!(
        top.ino >= 1 << 63,
        "{case}: the kernel overlay did not set the top bit (st_ino {:#x}); the case \
         would test nothing",
        top.ino
    );
    let opts = format!(
        "lowerdir={}:{},upperdir={},workdir={}",
        xm.display(),
        l.lowerdir(),
        l.upper.display(),
        l.work.display()
    );
    let mut m = Bounded::mount(case, &opts, &l);
    same_data_as(
        &mut m,
        &xm,
        &["fa", "ft", "dt/x", "shared/from_ext", "shared/from_tmpfs"],
    );
    exercise(&mut m, &[], &[]);
    must(case, "append to \"ft\"", m.append("ft", b"more\n"));
    assert_eq!(must(case, "read of \"ft\"", m.read("ft")), b"ft\nmore\n");
    drop(m);
    drop(k);
}

/// The lower is another stratafs mount (read-only) over two layers.
#[test]
fn lower_is_a_stratafs_mount() {
    let case = "lower_is_a_stratafs_mount";
    if !fixture::require_fuse() {
        return;
    }
    let l = Layers::new(&[base(LayerBuilder::new())]);
    let inner = Layers::new(&[
        LayerBuilder::new()
            .file("i_top", "top\n")
            .file("idir/a", "a\n"),
        LayerBuilder::new()
            .file("i_bottom", "bottom\n")
            .file("idir/b", "b\n"),
    ]);
    let im = try_strata(&inner.ro_options(), &inner.merged, &inner.root)
        .unwrap_or_else(|e| panic!("{case}: the inner stratafs does not mount: {e}"));
    let opts = format!(
        "lowerdir={}:{},upperdir={},workdir={}",
        inner.merged.display(),
        l.lowerdir(),
        l.upper.display(),
        l.work.display()
    );
    let mut m = Bounded::mount(case, &opts, &l);
    same_data_as(
        &mut m,
        &inner.merged,
        &["i_top", "i_bottom", "idir/a", "idir/b"],
    );
    exercise(&mut m, &[], &[]);
    must(case, "append to \"idir/a\"", m.append("idir/a", b"more\n"));
    assert_eq!(
        must(case, "read of \"idir/a\"", m.read("idir/a")),
        b"a\nmore\n"
    );
    drop(m);
    drop(im);
}

/// The lower is a read-only kernel overlay on one filesystem (no xino).
#[test]
fn lower_is_a_kernel_overlay() {
    let case = "lower_is_a_kernel_overlay";
    if !fixture::require_fuse() || !fixture::require_kernel_overlay() {
        return;
    }
    let l = Layers::new(&[base(LayerBuilder::new())]);
    let inner = Layers::new(&[
        LayerBuilder::new()
            .file("k_top", "top\n")
            .file("kdir/a", "a\n"),
        LayerBuilder::new()
            .file("k_bottom", "bottom\n")
            .file("kdir/b", "b\n"),
    ]);
    let km = l.root.join("km");
    let k = KMount::mount(&inner.ro_options(), &km)
        .unwrap_or_else(|e| panic!("{case}: mount -t overlay: {e}"));
    let opts = format!(
        "lowerdir={}:{},upperdir={},workdir={}",
        km.display(),
        l.lowerdir(),
        l.upper.display(),
        l.work.display()
    );
    let mut m = Bounded::mount(case, &opts, &l);
    same_data_as(&mut m, &km, &["k_top", "k_bottom", "kdir/a", "kdir/b"]);
    exercise(&mut m, &[], &[]);
    drop(m);
    drop(k);
}

// ---------------------------------------------------------------------------------------
// Shapes without hostile intent, compared with kernel overlayfs
// ---------------------------------------------------------------------------------------

/// One step of a script run on kernel overlayfs and on stratafs over the same lowers.
#[derive(Clone, Debug)]
enum ScriptStep {
    Lstat(&'static str),
    Read(&'static str),
    List(&'static str),
    Append(&'static str, &'static [u8]),
    /// Which of these names show one st_ino (as a partition of the names).
    Inos(&'static [&'static str]),
    /// The file `f` at the bottom of a chain of `d` directories this deep.
    DeepRead(usize),
    DeepAppend(usize, &'static [u8]),
}

fn errstr(e: Errno) -> String {
    format!("error {}", errno_name(e))
}

fn st_line(st: &St) -> String {
    match st.kind {
        libc::S_IFDIR => "dir".into(),
        libc::S_IFREG => format!("file size={} nlink={}", st.size, st.nlink),
        k => format!("type {k:o}"),
    }
}

/// O_PATH handle on the directory `depth` levels of `d` below `root`, walked one
/// component at a time (the path is far longer than PATH_MAX). Every descriptor
/// here is O_CLOEXEC: one inherited by a process another test spawns meanwhile
/// would keep this test's mount busy at its unmount.
fn open_deep(root: &Path, depth: usize) -> Result<OwnedFd, Errno> {
    let c = fixture::cpath(root);
    // SAFETY: c is NUL-terminated; the fd returned is owned below.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(errno());
    }
    // SAFETY: fd was just opened and is owned by nobody else.
    let mut cur = unsafe { OwnedFd::from_raw_fd(fd) };
    let d = CString::new("d").unwrap();
    for _ in 0..depth {
        // SAFETY: cur is a valid fd, d NUL-terminated.
        let fd = unsafe {
            libc::openat(
                cur.as_raw_fd(),
                d.as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(errno());
        }
        // SAFETY: as above.
        cur = unsafe { OwnedFd::from_raw_fd(fd) };
    }
    Ok(cur)
}

fn deep_file(root: &Path, depth: usize, flags: i32) -> Result<fs::File, Errno> {
    let dir = open_deep(root, depth)?;
    let f = CString::new("f").unwrap();
    // SAFETY: dir is valid, f NUL-terminated.
    let fd = unsafe { libc::openat(dir.as_raw_fd(), f.as_ptr(), flags | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(errno());
    }
    // SAFETY: fd was just opened.
    Ok(unsafe { fs::File::from_raw_fd(fd) })
}

fn run_op(root: &Path, op: &ScriptStep) -> String {
    use std::io::Read;
    // The path calls go through the one path executor, rendered as this script shows them.
    let call = |c: Syscall| fixture::apply(root, &c);
    match op {
        ScriptStep::Lstat(p) => {
            call(Syscall::Stat(p.to_string())).map_or_else(errstr, |a| match a {
                Answer::Stat(md) => st_line(&St::of(&md)),
                _ => unreachable!("lstat answers a stat"),
            })
        }
        ScriptStep::Read(p) => {
            call(Syscall::Read(p.to_string())).map_or_else(errstr, |a| match a {
                Answer::Data(d) => show(&d),
                _ => unreachable!("read answers data"),
            })
        }
        ScriptStep::List(p) => {
            call(Syscall::ReadDir(p.to_string())).map_or_else(errstr, |a| match a {
                Answer::Listing(entries) => format!("{:?}", fixture::sorted_names(&entries)),
                _ => unreachable!("readdir answers a listing"),
            })
        }
        ScriptStep::Append(p, data) => {
            call(Syscall::Append(p.to_string(), data.to_vec())).map_or_else(errstr, |_| "ok".into())
        }
        ScriptStep::Inos(names) => {
            let mut groups: BTreeMap<u64, Vec<&str>> = BTreeMap::new();
            let mut errors = Vec::new();
            for n in *names {
                match lstat_st(&root.join(n)) {
                    Ok(st) => groups.entry(st.ino).or_default().push(n),
                    Err(e) => errors.push(format!("{n}: {}", errstr(e))),
                }
            }
            let mut parts: Vec<String> = groups.values().map(|g| format!("{g:?}")).collect();
            parts.sort();
            format!("{} {}", parts.join(" "), errors.join(" "))
        }
        ScriptStep::DeepRead(depth) => deep_file(root, *depth, libc::O_RDONLY)
            .and_then(|mut f| {
                let mut v = Vec::new();
                f.read_to_end(&mut v).map_err(|e| io_errno(&e))?;
                Ok(v)
            })
            .map_or_else(errstr, |d| show(&d)),
        ScriptStep::DeepAppend(depth, data) => {
            deep_file(root, *depth, libc::O_WRONLY | libc::O_APPEND)
                .and_then(|mut f| f.write_all(data).map_err(|e| io_errno(&e)))
                .map_or_else(errstr, |_| "ok".into())
        }
    }
}

/// Directories for a kernel overlay beside the stratafs one.
struct KernelDirs {
    upper: PathBuf,
    work: PathBuf,
    merged: PathBuf,
}

impl KernelDirs {
    fn new(l: &Layers) -> KernelDirs {
        let k = KernelDirs {
            upper: l.root.join("kupper"),
            work: l.root.join("kwork"),
            merged: l.root.join("kmerged"),
        };
        for d in [&k.upper, &k.work, &k.merged] {
            fs::create_dir(d).unwrap();
        }
        k
    }
    fn options(&self, lowerdir: &str, index: bool) -> String {
        format!(
            "lowerdir={lowerdir},upperdir={},workdir={},redirect_dir=on,index={}",
            self.upper.display(),
            self.work.display(),
            if index { "on" } else { "off" }
        )
    }
}

/// Runs `script` on kernel overlayfs (index=on, or index=off where index=on
/// refuses the layers) and on stratafs over `lowerdir`. Answers the stratafs mount
/// (still up) with one line per outcome that differs, or `None` when kernel
/// overlayfs refuses the layers and stratafs does too (the same answer). When only
/// kernel overlayfs refuses them, nothing is compared.
fn versus_kernel(
    case: &str,
    l: &Layers,
    lowerdir: &str,
    script: &[ScriptStep],
    timeout: Duration,
) -> Option<(Bounded, Vec<String>)> {
    let kd = KernelDirs::new(l);
    let kernel = KMount::mount(&kd.options(lowerdir, true), &kd.merged)
        .or_else(|_| KMount::mount(&kd.options(lowerdir, false), &kd.merged));
    let opts = format!(
        "lowerdir={lowerdir},upperdir={},workdir={}",
        l.upper.display(),
        l.work.display()
    );
    let want: Vec<String> = match &kernel {
        Ok(_) => script.iter().map(|op| run_op(&kd.merged, op)).collect(),
        Err(refusal) => {
            let m = match try_strata(&opts, &l.merged, &l.root) {
                Ok(m) => m,
                // Both refuse the layers: the same answer.
                Err(_) => return None,
            };
            eprintln!("{case}: kernel overlayfs refuses the layers ({refusal}); stratafs mounts");
            return Some((Bounded::new(case, m), Vec::new()));
        }
    };
    drop(kernel);
    let mut m = Bounded::mount(case, &opts, l);
    m.timeout = timeout;
    let mut diffs = Vec::new();
    for (op, want) in script.iter().zip(&want) {
        let root = m.mp.clone();
        let o = op.clone();
        let got = m.probe(&format!("{op:?}"), move || run_op(&root, &o));
        if &got != want {
            diffs.push(format!("{op:?}: kernel overlayfs {want}; stratafs {got}"));
        }
    }
    m.timeout = PROBE_TIMEOUT;
    if !diffs.is_empty() {
        // Shown now: a later probe of the case may hang and end it first.
        eprintln!(
            "{case}: differences from kernel overlayfs so far:\n  {}",
            diffs.join("\n  ")
        );
    }
    Some((m, diffs))
}

/// Fails the case listing every difference from kernel overlayfs.
fn assert_like_kernel(case: &str, diffs: &[String]) {
    assert!(
        diffs.is_empty(),
        "{case}: stratafs differs from kernel overlayfs:\n  {}",
        diffs.join("\n  ")
    );
}

/// One file hard-linked into two lower layers (one filesystem, so one inode): the
/// names `f` (top lower) and `g` (bottom lower) are one object.
#[test]
fn hardlink_across_two_lower_layers() {
    let case = "hardlink_across_two_lower_layers";
    if !fixture::require_fuse() || !fixture::require_kernel_overlay() {
        return;
    }
    let l = Layers::new(&[
        LayerBuilder::new().file("f", "shared\n"),
        base(LayerBuilder::new()),
    ]);
    fs::hard_link(l.lowers[0].join("f"), l.lowers[1].join("g")).unwrap();
    let script = [
        ScriptStep::Lstat("f"),
        ScriptStep::Lstat("g"),
        ScriptStep::Inos(&["f", "g", "plain"]),
        ScriptStep::Read("g"),
        ScriptStep::Append("f", b"app\n"),
        ScriptStep::Read("f"),
        ScriptStep::Read("g"),
        ScriptStep::Lstat("f"),
        ScriptStep::Lstat("g"),
        ScriptStep::Inos(&["f", "g", "plain"]),
        ScriptStep::List(""),
    ];
    let (mut m, mut diffs) = versus_kernel(case, &l, &l.lowerdir(), &script, PROBE_TIMEOUT)
        .expect("kernel overlayfs mounts these layers");
    // Kernel overlayfs (index=on) keeps both names on the one copy across a remount.
    m.remount();
    for rel in ["f", "g"] {
        let got = m.read(rel);
        if got.as_deref() != Ok(b"shared\napp\n".as_slice()) {
            diffs.push(format!(
                "read of {rel:?} after a remount: kernel overlayfs {}; stratafs {}",
                show(b"shared\napp\n"),
                got.map_or_else(errstr, |d| show(&d))
            ));
        }
    }
    assert_like_kernel(case, &diffs);
    exercise(&mut m, &[], &[&["f", "g"]]);
}

/// A lower file whose other name lies outside the layer (st_nlink 2, one name
/// visible): a write copies it up and leaves the outside name alone.
#[test]
fn lower_hardlink_names_outside_the_layer() {
    let case = "lower_hardlink_names_outside_the_layer";
    if !fixture::require_fuse() || !fixture::require_kernel_overlay() {
        return;
    }
    let l = Layers::new(&[base(LayerBuilder::new()).file("f", "outside-linked\n")]);
    let outside = l.root.join("outside_name");
    fs::hard_link(l.lowers[0].join("f"), &outside).unwrap();
    let script = [
        ScriptStep::Lstat("f"),
        ScriptStep::Read("f"),
        ScriptStep::Inos(&["f", "plain", "linked"]),
        ScriptStep::Append("f", b"more\n"),
        ScriptStep::Read("f"),
        ScriptStep::Lstat("f"),
        ScriptStep::Inos(&["f", "plain", "linked"]),
    ];
    let (mut m, diffs) = versus_kernel(case, &l, &l.lowerdir(), &script, PROBE_TIMEOUT)
        .expect("kernel overlayfs mounts these layers");
    assert_eq!(
        fs::read(&outside).unwrap(),
        b"outside-linked\n",
        "{case}: the name outside the layer changed"
    );
    assert_like_kernel(case, &diffs);
    exercise(&mut m, &[], &[]);
}

/// lowerdir=L/sub:L: one layer nested in another. Kernel overlayfs refuses such
/// layers (ELOOP, "overlapping lowerdir path"); stratafs may refuse them too, and
/// if it mounts them, `/sub` must not be the root again.
#[test]
fn nested_layers() {
    let case = "nested_layers";
    if !fixture::require_fuse() || !fixture::require_kernel_overlay() {
        return;
    }
    let l = Layers::new(&[base(LayerBuilder::new())
        .file("sub/s", "s\n")
        .file("sub/inner/i", "i\n")]);
    let lowerdir = format!("{}/sub:{}", l.lowers[0].display(), l.lowers[0].display());
    let script = [
        ScriptStep::List(""),
        ScriptStep::List("sub"),
        ScriptStep::Read("s"),
        ScriptStep::Read("sub/s"),
        ScriptStep::Inos(&["", "sub", "inner", "sub/inner"]),
    ];
    let Some((mut m, diffs)) = versus_kernel(case, &l, &lowerdir, &script, PROBE_TIMEOUT) else {
        return;
    };
    assert_like_kernel(case, &diffs);
    let root = must(case, "lstat of the root", m.lstat("."));
    let sub = must(case, "lookup of \"sub\"", m.lstat("sub"));
    assert_ne!(
        root.ino, sub.ino,
        "{case}: \"sub\" shows the root's st_ino: the tree would contain itself"
    );
    let names = must(case, "readdir of \"sub\"", m.list("sub"));
    let mut names: Vec<_> = names.into_iter().collect();
    names.sort();
    assert_eq!(names, ["inner", "s"], "{case}: listing of \"sub\"");
    assert_eq!(must(case, "read of \"s\"", m.read("s")), b"s\n");
    exercise(&mut m, &[], &[&["s", "sub/s"], &["inner/i", "sub/inner/i"]]);
}

/// Two tmpfs mounted inside one lower layer (both roots have inode 1, and their
/// files the same small numbers). Kernel overlayfs does not cross mount points in a
/// layer: it shows the directories underneath.
#[test]
fn two_tmpfs_mount_points_in_a_lower() {
    let case = "two_tmpfs_mount_points_in_a_lower";
    if !fixture::require_fuse() || !fixture::require_kernel_overlay() {
        return;
    }
    let l = Layers::new(&[base(LayerBuilder::new())
        .file("m1/under", "under\n")
        .dir("m2")]);
    let t1 = Tmpfs::new(&l.lowers[0].join("m1"), "4m");
    let t2 = Tmpfs::new(&l.lowers[0].join("m2"), "4m");
    fs::write(t1.path.join("f"), "f1\n").unwrap();
    fs::write(t2.path.join("f"), "f2\n").unwrap();
    let script = [
        ScriptStep::List(""),
        ScriptStep::Lstat("m1"),
        ScriptStep::Lstat("m2"),
        ScriptStep::Inos(&["", "m1", "m2", "plain"]),
        ScriptStep::List("m1"),
        ScriptStep::List("m2"),
        ScriptStep::Read("m1/under"),
        ScriptStep::Read("m1/f"),
        ScriptStep::Read("m2/f"),
        ScriptStep::Append("m2/f", b"more\n"),
        ScriptStep::Read("m2/f"),
    ];
    let (mut m, diffs) = versus_kernel(case, &l, &l.lowerdir(), &script, PROBE_TIMEOUT)
        .expect("kernel overlayfs mounts these layers");
    assert_like_kernel(case, &diffs);
    exercise(&mut m, &[], &[]);
    drop(m);
    drop(t2);
    drop(t1);
}

/// Removes everything under `root` without recursion and with two directories open
/// at a time, so that a 9,000-deep chain neither overflows a stack nor exhausts fds
/// (std's remove_dir_all recurses with one fd per level). Stays on `root`'s
/// filesystem and gives up on what it cannot remove.
fn remove_contents_iteratively(root: &Path) {
    let Ok(dev) = fixture::lstat(root).map(|m| m.dev()) else {
        return;
    };
    let open_dir = |at: Option<&OwnedFd>, name: &CString| -> Option<OwnedFd> {
        let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
        // SAFETY: name is NUL-terminated; `at` (when given) is a valid fd.
        let fd = unsafe {
            match at {
                Some(d) => libc::openat(d.as_raw_fd(), name.as_ptr(), flags),
                None => libc::open(name.as_ptr(), flags),
            }
        };
        // SAFETY: a fresh fd, owned by nobody else.
        (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
    };
    let Some(mut cur) = open_dir(None, &fixture::cpath(root)) else {
        return;
    };
    // Names from `root` down to `cur`.
    let mut names: Vec<CString> = Vec::new();
    loop {
        let here = PathBuf::from(format!("/proc/self/fd/{}", cur.as_raw_fd()));
        let mut sub = None;
        if let Ok(rd) = fs::read_dir(&here) {
            for e in rd.flatten() {
                let p = here.join(e.file_name());
                match fs::symlink_metadata(&p) {
                    Ok(md) if md.is_dir() => {
                        if md.dev() == dev {
                            sub = Some(fixture::cpath(Path::new(&e.file_name())));
                            break;
                        }
                    }
                    _ => {
                        let _ = fs::remove_file(&p);
                    }
                }
            }
        }
        if let Some(name) = sub {
            let Some(next) = open_dir(Some(&cur), &name) else {
                return;
            };
            cur = next;
            names.push(name);
            continue;
        }
        // `cur` holds nothing more we can remove: climb and remove it.
        let Some(name) = names.pop() else { return };
        let Some(parent) = open_dir(Some(&cur), &CString::new("..").unwrap()) else {
            return;
        };
        drop(cur);
        // SAFETY: parent is valid, name NUL-terminated.
        if unsafe { libc::unlinkat(parent.as_raw_fd(), name.as_ptr(), libc::AT_REMOVEDIR) } < 0 {
            return;
        }
        cur = parent;
    }
}

/// Removes the deep trees under a scratch root before its TempDir does (declared
/// after `Layers`, dropped before it, after the mounts).
struct DeepCleanup(PathBuf);

impl Drop for DeepCleanup {
    fn drop(&mut self) {
        remove_contents_iteratively(&self.0);
    }
}

const CHAIN_DEPTH: usize = 9000;

/// Makes `d/d/.../d/f` (`depth` directories) under `root`, walking with fds.
fn make_chain(root: &Path, depth: usize, data: &[u8]) {
    let d = CString::new("d").unwrap();
    let c = fixture::cpath(root);
    // SAFETY: c NUL-terminated; every fd below is owned by an OwnedFd.
    let mut cur = unsafe {
        OwnedFd::from_raw_fd(libc::open(
            c.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        ))
    };
    for i in 0..depth {
        unsafe {
            assert_eq!(
                libc::mkdirat(cur.as_raw_fd(), d.as_ptr(), 0o755),
                0,
                "mkdirat at level {i}: {}",
                errno_name(errno())
            );
            let fd = libc::openat(
                cur.as_raw_fd(),
                d.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            );
            assert!(fd >= 0, "openat at level {i}: {}", errno_name(errno()));
            cur = OwnedFd::from_raw_fd(fd);
        }
    }
    let f = CString::new("f").unwrap();
    // SAFETY: as above.
    let fd = unsafe {
        libc::openat(
            cur.as_raw_fd(),
            f.as_ptr(),
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC,
            0o644,
        )
    };
    assert!(fd >= 0, "create the bottom file: {}", errno_name(errno()));
    // SAFETY: just opened.
    let mut file = unsafe { fs::File::from_raw_fd(fd) };
    file.write_all(data).unwrap();
}

/// A chain 9,000 directories deep in a lower layer, its bottom file appended to
/// through the mount: kernel overlayfs copies the whole chain up.
#[test]
fn deep_chain_9000_directories() {
    let case = "deep_chain_9000_directories";
    if !fixture::require_fuse() || !fixture::require_kernel_overlay() {
        return;
    }
    let l = Layers::new(&[base(LayerBuilder::new())]);
    let _cleanup = DeepCleanup(l.root.clone());
    make_chain(&l.lowers[0], CHAIN_DEPTH, b"bottom\n");
    let script = [
        ScriptStep::DeepRead(CHAIN_DEPTH),
        ScriptStep::DeepAppend(CHAIN_DEPTH, b"appended\n"),
        ScriptStep::DeepRead(CHAIN_DEPTH),
        ScriptStep::Read("plain"),
    ];
    let (mut m, diffs) = versus_kernel(case, &l, &l.lowerdir(), &script, DEEP_TIMEOUT)
        .expect("kernel overlayfs mounts these layers");
    assert_like_kernel(case, &diffs);
    m.timeout = DEEP_TIMEOUT;
    m.remount();
    let root = m.mp.clone();
    let got = m.probe("read of the bottom file after the remount", move || {
        run_op(&root, &ScriptStep::DeepRead(CHAIN_DEPTH))
    });
    assert_eq!(
        got,
        show(b"bottom\nappended\n"),
        "{case}: the bottom file after the remount"
    );
    m.timeout = PROBE_TIMEOUT;
    check_base(&mut m, b"plain\n");
}

/// An upper layer left by kernel overlayfs with `metacopy=on`: a metadata-only copy
/// carrying the kernel's markers (not stratafs's origin). Completing its data
/// through stratafs replaces the stand-in by a full copy; the stand-in's inode is
/// freed and the filesystem may hand its number to the next new file, which must
/// still get an st_ino of its own.
#[test]
fn kernel_metacopy_upper_completed_then_new_files() {
    let case = "kernel_metacopy_upper_completed_then_new_files";
    if !fixture::require_fuse() || !fixture::require_kernel_overlay() {
        return;
    }
    let data = fixture::pattern(2 * MIB as usize, 11);
    let l = Layers::new(&[base(LayerBuilder::new()).file("big", &data)]);
    {
        let _k = fixture::KernelOverlay::with_metacopy(&l, true);
        fixture::chmod(&l.merged.join("big"), 0o600).unwrap();
    }
    let up = l.upper.join("big");
    assert!(
        fixture::lgetxattr(&up, "trusted.overlay.metacopy").is_ok(),
        "{case}: kernel overlayfs made no metadata-only copy; the case would test nothing"
    );
    let mut m = Bounded::mount(case, &format!("{},metacopy=on", l.rw_options()), &l);
    let st = must(case, "lookup of \"big\"", m.lstat("big"));
    assert_eq!(st.mode, 0o600, "{case}: mode of the metadata-only copy");
    must(case, "append to \"big\"", m.append("big", b"tail"));
    let got = must(case, "read of \"big\"", m.read("big"));
    assert!(
        got.len() == data.len() + 4 && got.starts_with(&data) && got.ends_with(b"tail"),
        "{case}: \"big\" after the append holds {}",
        show(&got)
    );
    for i in 0..32 {
        let rel = format!("n{i}");
        must(case, &format!("create of {rel:?}"), m.create(&rel, b"n\n"));
        must(case, &format!("lookup of {rel:?}"), m.lstat(&rel));
    }
    exercise(&mut m, &[], &[]);
}

/// Swaps directories `a` and `b` and moves the new `a` into a new `c`, through a
/// kernel overlayfs mount of `lowerdir` with `upper`: the kernel records its own
/// redirects (relative "b", absolute "/b") and binary origin handles there.
fn kernel_swap(
    case: &str,
    lowerdir: &str,
    upper: &Path,
    work: &Path,
    mp: &Path,
    move_into_c: bool,
) {
    let k = KMount::mount(
        &format!(
            "lowerdir={lowerdir},upperdir={},workdir={},redirect_dir=on,index=on",
            upper.display(),
            work.display()
        ),
        mp,
    )
    .unwrap_or_else(|e| panic!("{case}: mount -t overlay: {e}"));
    for (from, to) in [("a", "t"), ("b", "a"), ("t", "b")] {
        fs::rename(mp.join(from), mp.join(to))
            .unwrap_or_else(|e| panic!("{case}: mv {from} {to} on kernel overlayfs: {e}"));
    }
    if move_into_c {
        fs::create_dir(mp.join("c")).unwrap();
        fs::rename(mp.join("a"), mp.join("c/a")).unwrap();
    }
    drop(k);
}

/// Layers written by kernel overlayfs itself after directory renames (as a
/// container engine commits them): redirects in every layer, the lower ones
/// chained (a lower directory's redirect applies to the layers below it). Read as
/// the lowers of a mount, and with the last one as its upper, stratafs must show
/// what kernel overlayfs shows.
#[test]
fn kernel_made_redirects_in_lowers_and_upper() {
    let case = "kernel_made_redirects_in_lowers_and_upper";
    if !fixture::require_fuse() || !fixture::require_kernel_overlay() {
        return;
    }
    let l = Layers::new(&[base(LayerBuilder::new())
        .file("a/fa", "fa\n")
        .file("b/fb", "fb\n")]);
    let dirs: Vec<PathBuf> = ["u1", "w1", "u2", "w2", "km"]
        .iter()
        .map(|d| {
            let p = l.root.join(d);
            fs::create_dir(&p).unwrap();
            p
        })
        .collect();
    let (u1, w1, u2, w2, km) = (&dirs[0], &dirs[1], &dirs[2], &dirs[3], &dirs[4]);
    let bottom = l.lowers[0].display().to_string();
    kernel_swap(case, &bottom, u1, w1, km, false);
    let two = format!("{}:{bottom}", u1.display());
    kernel_swap(case, &two, u2, w2, km, true);
    assert_eq!(
        fixture::lgetxattr(&u2.join("c/a"), "trusted.overlay.redirect").ok(),
        Some(b"/b".to_vec()),
        "{case}: kernel overlayfs wrote no absolute redirect; the case would test nothing"
    );
    let script = [
        ScriptStep::List(""),
        ScriptStep::List("b"),
        ScriptStep::List("c"),
        ScriptStep::List("c/a"),
        ScriptStep::Read("b/fb"),
        ScriptStep::Read("c/a/fa"),
        ScriptStep::Read("b/fa"),
        ScriptStep::Inos(&["b", "c/a", "c", "plain"]),
    ];
    // The kernel-made upper as the upper of both mounts, read-only probes only
    // (kernel first, then stratafs, so neither sees the other's changes).
    let mut diffs = Vec::new();
    let kopts = format!(
        "lowerdir={two},upperdir={},workdir={},redirect_dir=on,index=on",
        u2.display(),
        w2.display()
    );
    let want: Vec<String> = {
        let _k = KMount::mount(&kopts, km).unwrap_or_else(|e| panic!("{case}: {e}"));
        script.iter().map(|op| run_op(km, op)).collect()
    };
    {
        let sopts = format!(
            "lowerdir={two},upperdir={},workdir={}",
            u2.display(),
            w2.display()
        );
        let mut m = Bounded::mount(case, &sopts, &l);
        for (op, want) in script.iter().zip(&want) {
            let root = m.mp.clone();
            let o = op.clone();
            let got = m.probe(&format!("{op:?}"), move || run_op(&root, &o));
            if &got != want {
                diffs.push(format!(
                    "with the kernel-made upper: {op:?}: kernel overlayfs {want}; stratafs {got}"
                ));
            }
        }
    }
    // All three as lowers, each mount with a fresh upper of its own.
    let three = format!("{}:{two}", u2.display());
    let (m, more) = versus_kernel(case, &l, &three, &script, PROBE_TIMEOUT)
        .expect("kernel overlayfs mounts these layers");
    diffs.extend(more.into_iter().map(|d| format!("as lowers: {d}")));
    drop(m);
    assert_like_kernel(case, &diffs);
}

// ---------------------------------------------------------------------------------------
// Rootless: origin markers in the user namespace
// ---------------------------------------------------------------------------------------

/// A rootless mount (inside `unshare --user --map-root-user --mount`, where trusted.*
/// cannot be written, so stratafs reads `user.stratafs.origin`) over an upper file and
/// directory carrying origin `value`.
///
/// Bounding works as for [`Bounded`], inside the namespace: a FUSE request already
/// sent to the daemon cannot be interrupted (not even by SIGKILL of the caller), so
/// `timeout` would wait forever; instead a watchdog records the probe as hung and
/// SIGKILLs the daemon the script started, which aborts the connection and releases
/// the probe. From outside, the daemon (same PID namespace) is killed by PID if the
/// script still does not end.
fn rootless_origin_case(case: &str, value: &[u8]) {
    if !fixture::require_fuse() {
        return;
    }
    let upper = LayerBuilder::new()
        .file_with("victim", "victim\n", Meta::new().xattr(USER_ORIGIN, value))
        .dir_with("vdir", Meta::new().xattr(USER_ORIGIN, value))
        .file("vdir/x", "x\n");
    let l = Layers::build(&[base(LayerBuilder::new())], Some(&upper), Format::AUFS);
    let out_dir = l.root.join("out");
    fs::create_dir(&out_dir).unwrap();
    let log = l.root.join("userns-daemon.log");
    let script = r#"
"$BIN" -f -o "$OPTS" "$MNT" 2>"$LOG" &
DPID=$!
echo $DPID > "$OUT/daemon.pid"
trap 'st=$?; set +e; umount -l "$MNT" 2>/dev/null; kill -9 $DPID 2>/dev/null; wait $DPID; exit $st' EXIT
i=0
until grep -q " $MNT fuse" /proc/self/mounts; do
  i=$((i + 1)); [ $i -lt 500 ] || { echo "mount not live"; exit 1; }
  sleep 0.02
done
probe() {
  what=$1; shift
  "$@" > "$OUT/$what" 2>"$OUT/$what.err" &
  P=$!
  ( sleep 10; echo "$what" > "$OUT/HUNG"; kill -9 $DPID ) &
  W=$!
  wait $P || echo "rc=$?" >> "$OUT/$what.err"
  kill $W 2>/dev/null; wait $W 2>/dev/null
  if [ -e "$OUT/HUNG" ]; then echo "HUNG: $(cat "$OUT/HUNG")"; exit 3; fi
  kill -0 $DPID 2>/dev/null || { echo "DAEMON DIED during $what"; exit 4; }
}
probe root_ino stat -c %i "$MNT"
probe victim_ino stat -c %i "$MNT/victim"
probe vdir_ino stat -c %i "$MNT/vdir"
probe plain_ino stat -c %i "$MNT/plain"
probe victim_data cat "$MNT/victim"
probe listing ls -a "$MNT"
probe append sh -c 'echo more >> "$MNT/victim"'
probe victim_after cat "$MNT/victim"
probe plain_data cat "$MNT/plain"
"#;
    let mut child = Command::new("unshare")
        .args(["--user", "--map-root-user", "--mount", "sh", "-uc", script])
        .env("BIN", fixture::stratafs_bin())
        .env("MNT", &l.merged)
        .env("OPTS", l.rw_options())
        .env("LOG", &log)
        .env("OUT", &out_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("unshare");
    let status = fixture::wait_bounded(&mut child, Duration::from_secs(60));
    // Whatever happened, no daemon of this case outlives it.
    let daemon_pid: Option<i32> = fs::read_to_string(out_dir.join("daemon.pid"))
        .ok()
        .and_then(|s| s.trim().parse().ok());
    let lingering: Vec<i32> = fixture::stratafs_pids_for(&l.merged)
        .into_iter()
        .filter(|p| Some(*p) == daemon_pid)
        .collect();
    for pid in &lingering {
        // SAFETY: the daemon this case's script started (its PID, recorded by the
        // script, serving this case's own mountpoint).
        unsafe { libc::kill(*pid, libc::SIGKILL) };
    }
    let Some(status) = status else {
        // SAFETY: our own unreaped child (the shell unshare became).
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGKILL) };
        let _ = child.wait();
        panic!(
            "{case}: rootless: the script did not end within 60 s (daemon killed: {lingering:?})"
        );
    };
    assert!(
        lingering.is_empty(),
        "{case}: rootless: the daemon {lingering:?} outlived the script"
    );
    let mut said = String::new();
    if let Some(mut o) = child.stdout.take() {
        use std::io::Read;
        let _ = o.read_to_string(&mut said);
    }
    let daemon_log = fs::read_to_string(&log).unwrap_or_default();
    if let Some(what) = said.lines().find_map(|l| l.strip_prefix("HUNG: ")) {
        panic!(
            "{case}: rootless: probe {what} hung (> 10 s); the daemon was killed. Daemon \
             output:\n{daemon_log}"
        );
    }
    assert!(
        status.success(),
        "{case}: rootless: the script failed ({status}): {said}\ndaemon:\n{daemon_log}"
    );
    let get = |what: &str| fs::read_to_string(out_dir.join(what)).unwrap_or_default();
    let errs =
        |what: &str| fs::read_to_string(out_dir.join(format!("{what}.err"))).unwrap_or_default();
    for what in [
        "root_ino",
        "plain_ino",
        "plain_data",
        "listing",
        "append",
        "victim_after",
    ] {
        assert!(
            errs(what).is_empty(),
            "{case}: rootless: {what} failed: {}",
            errs(what)
        );
    }
    assert_eq!(
        get("plain_data"),
        "plain\n",
        "{case}: rootless: data of \"plain\""
    );
    assert!(
        get("victim_after").ends_with("more\n"),
        "{case}: rootless: the append to \"victim\" is not visible: {:?}",
        get("victim_after")
    );
    let mut inos = BTreeMap::new();
    for what in ["root_ino", "victim_ino", "vdir_ino", "plain_ino"] {
        let v = get(what).trim().to_string();
        if v.is_empty() {
            continue; // a sane failure of a hostile entry's lookup is allowed
        }
        if let Some(other) = inos.insert(v.clone(), what) {
            panic!("{case}: rootless: {other} and {what} share st_ino {v}");
        }
    }
}

#[test]
fn rootless_origin_zero() {
    rootless_origin_case("rootless_origin_zero", b"0");
}

#[test]
fn rootless_origin_root_number() {
    rootless_origin_case("rootless_origin_root_number", b"1");
}

#[test]
fn rootless_origin_u64_max() {
    rootless_origin_case("rootless_origin_u64_max", u64::MAX.to_string().as_bytes());
}

#[test]
fn rootless_origin_reserved_range() {
    rootless_origin_case(
        "rootless_origin_reserved_range",
        ((1u64 << 63) + 7).to_string().as_bytes(),
    );
}

#[test]
fn rootless_origin_garbage_bytes() {
    rootless_origin_case("rootless_origin_garbage_bytes", b"\xff\xfe\x00garbage\x01");
}
