//! Shared fixtures for the tests that mount something: prerequisite guards, a declarative
//! layer builder, mount guards for stratafs (foreground and daemon mode) and for kernel
//! overlayfs, thin libc wrappers answering errno values, and a tree snapshot with a
//! readable diff.
//!
//! Every guard unmounts in `Drop`, so a panicking test never leaves a mount behind, and
//! every process a guard ends is one the guard started, ended by its PID.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::ffi::{CString, OsStr};
use std::fmt;
use std::fs::{self, File};
use std::hash::{DefaultHasher, Hasher};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use stratafs::testing::is_private_xattr;

pub const FUSE_SUPER_MAGIC: i64 = 0x6573_5546;
pub const OVERLAYFS_SUPER_MAGIC: i64 = 0x794c_7630;

/// The mtime (seconds) every entry of a built layer gets unless its spec says otherwise.
/// Anything older than [`FRESH_AFTER`] was set on purpose by a fixture or a test.
pub const FIXED_MTIME: i64 = 1_000_000_000;
/// Timestamps at or after this (2017-07-14) are "now-ish": made by the filesystem itself.
pub const FRESH_AFTER: i64 = 1_500_000_000;

/// How long a mount may take to go live, and a daemon to exit after its unmount.
pub const MOUNT_TIMEOUT: Duration = Duration::from_secs(10);
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(10);

pub fn stratafs_bin() -> &'static str {
    env!("CARGO_BIN_EXE_stratafs")
}

// ---------------------------------------------------------------------------------------
// Prerequisite guards
// ---------------------------------------------------------------------------------------

fn test_name() -> String {
    std::thread::current()
        .name()
        .unwrap_or("<unnamed test>")
        .to_string()
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn env_is_one(name: &str) -> bool {
    std::env::var_os(name).is_some_and(|v| v == "1")
}

fn skip_or_fail(missing: &[&str], env: &str, what: &str) -> bool {
    if missing.is_empty() {
        return true;
    }
    let why = missing.join("; ");
    if env_is_one(env) {
        // Straight to fd 2: the test harness captures eprintln! output of passing tests.
        let line = format!(
            "skipped: {}: {what} unavailable: {why} ({env}=1)\n",
            test_name()
        );
        let _ = io::stderr().write_all(line.as_bytes());
        return false;
    }
    panic!(
        "{}: this test needs {what}, but {why}. Run as root on a machine with {what}, \
         or set {env}=1 to skip such tests explicitly.",
        test_name()
    );
}

/// True when a FUSE mount can be made. Panics when it cannot, unless
/// `STRATAFS_SKIP_FUSE_TESTS=1`, in which case it prints a "skipped:" line and answers
/// false (the caller returns early).
pub fn require_fuse() -> bool {
    let mut missing = Vec::new();
    if !Path::new("/dev/fuse").exists() {
        missing.push("/dev/fuse is missing");
    }
    if !is_root() {
        missing.push("the tests do not run as root");
    }
    skip_or_fail(
        &missing,
        "STRATAFS_SKIP_FUSE_TESTS",
        "FUSE (/dev/fuse, root)",
    )
}

fn overlay_in_proc_filesystems() -> bool {
    fs::read_to_string("/proc/filesystems")
        .map(|s| {
            s.lines()
                .any(|l| l.split_whitespace().last() == Some("overlay"))
        })
        .unwrap_or(false)
}

/// Like [`require_fuse`] for kernel overlayfs (`STRATAFS_SKIP_OVERLAY_TESTS=1`).
/// Both sides of a differential test: FUSE for stratafs and kernel overlayfs to
/// compare with (each fails loudly when missing, as its own check does).
pub fn require_fuse_and_kernel_overlay() -> bool {
    require_fuse() && require_kernel_overlay()
}

pub fn require_kernel_overlay() -> bool {
    let mut missing = Vec::new();
    if !is_root() {
        missing.push("the tests do not run as root");
    } else if !overlay_in_proc_filesystems() {
        let _ = Command::new("modprobe")
            .arg("overlay")
            .stderr(Stdio::null())
            .status();
        if !overlay_in_proc_filesystems() {
            missing.push("the kernel has no overlay filesystem (not in /proc/filesystems)");
        }
    }
    skip_or_fail(
        &missing,
        "STRATAFS_SKIP_OVERLAY_TESTS",
        "kernel overlayfs (root)",
    )
}

// ---------------------------------------------------------------------------------------
// libc wrappers answering errno values
// ---------------------------------------------------------------------------------------

pub type Errno = i32;

pub fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("path with NUL")
}

pub fn errno() -> Errno {
    io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

pub fn io_errno(e: &io::Error) -> Errno {
    e.raw_os_error()
        .unwrap_or_else(|| panic!("io error without errno: {e}"))
}

/// "ENOENT (No such file or directory)".
pub fn errno_name(e: Errno) -> String {
    let name = match e {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EIO => "EIO",
        libc::ENXIO => "ENXIO",
        libc::EBADF => "EBADF",
        libc::EACCES => "EACCES",
        libc::EEXIST => "EEXIST",
        libc::EXDEV => "EXDEV",
        libc::ENOTDIR => "ENOTDIR",
        libc::EISDIR => "EISDIR",
        libc::EINVAL => "EINVAL",
        libc::ENOSPC => "ENOSPC",
        libc::EROFS => "EROFS",
        libc::EMLINK => "EMLINK",
        libc::ERANGE => "ERANGE",
        libc::ENOSYS => "ENOSYS",
        libc::ENOTEMPTY => "ENOTEMPTY",
        libc::ELOOP => "ELOOP",
        libc::ENODATA => "ENODATA",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::ENOTCONN => "ENOTCONN",
        libc::EBUSY => "EBUSY",
        libc::E2BIG => "E2BIG",
        libc::ETXTBSY => "ETXTBSY",
        _ => "E?",
    };
    format!("{name}({e}: {})", io::Error::from_raw_os_error(e))
}

fn check(ret: libc::c_int) -> Result<(), Errno> {
    if ret < 0 { Err(errno()) } else { Ok(()) }
}

pub fn lstat(p: &Path) -> Result<fs::Metadata, Errno> {
    fs::symlink_metadata(p).map_err(|e| io_errno(&e))
}

pub fn statfs(p: &Path) -> Result<libc::statfs, Errno> {
    let c = cpath(p);
    // SAFETY: zeroed statfs is a valid out-buffer; c is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    check(unsafe { libc::statfs(c.as_ptr(), &mut st) })?;
    Ok(st)
}

/// statfs that gives up after `limit` (a hung FUSE daemon would block it forever).
/// `None` on timeout; the helper thread is left behind and ends once the mount is torn down.
pub fn statfs_bounded(p: &Path, limit: Duration) -> Option<Result<libc::statfs, Errno>> {
    let (tx, rx) = mpsc::channel();
    let p = p.to_path_buf();
    std::thread::spawn(move || {
        let _ = tx.send(statfs(&p));
    });
    rx.recv_timeout(limit).ok()
}

pub fn mknod(p: &Path, mode: u32, major: u32, minor: u32) -> Result<(), Errno> {
    let c = cpath(p);
    check(unsafe {
        libc::mknod(
            c.as_ptr(),
            mode as libc::mode_t,
            libc::makedev(major, minor),
        )
    })
}

pub fn mkfifo(p: &Path, mode: u32) -> Result<(), Errno> {
    let c = cpath(p);
    check(unsafe { libc::mkfifo(c.as_ptr(), mode as libc::mode_t) })
}

pub fn lchown(p: &Path, uid: u32, gid: u32) -> Result<(), Errno> {
    let c = cpath(p);
    check(unsafe { libc::lchown(c.as_ptr(), uid, gid) })
}

pub fn chmod(p: &Path, mode: u32) -> Result<(), Errno> {
    let c = cpath(p);
    check(unsafe { libc::chmod(c.as_ptr(), mode as libc::mode_t) })
}

/// utimensat with AT_SYMLINK_NOFOLLOW: sets atime and mtime (whole seconds) of `p` itself.
pub fn lutimes(p: &Path, atime: i64, mtime: i64) -> Result<(), Errno> {
    let c = cpath(p);
    let ts = [
        libc::timespec {
            tv_sec: atime as libc::time_t,
            tv_nsec: 0,
        },
        libc::timespec {
            tv_sec: mtime as libc::time_t,
            tv_nsec: 0,
        },
    ];
    check(unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            ts.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
}

pub fn rename2(from: &Path, to: &Path, flags: u32) -> Result<(), Errno> {
    let (a, b) = (cpath(from), cpath(to));
    check(unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            flags,
        )
    })
}

pub fn lsetxattr(p: &Path, name: &str, value: &[u8], flags: i32) -> Result<(), Errno> {
    let c = cpath(p);
    let n = CString::new(name).unwrap();
    check(unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    })
}

pub fn lgetxattr(p: &Path, name: &str) -> Result<Vec<u8>, Errno> {
    let c = cpath(p);
    let n = CString::new(name).unwrap();
    loop {
        let size = unsafe { libc::lgetxattr(c.as_ptr(), n.as_ptr(), std::ptr::null_mut(), 0) };
        if size < 0 {
            return Err(errno());
        }
        let mut buf = vec![0u8; size as usize + 1];
        let got =
            unsafe { libc::lgetxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if got < 0 {
            if errno() == libc::ERANGE {
                continue;
            }
            return Err(errno());
        }
        buf.truncate(got as usize);
        return Ok(buf);
    }
}

/// llistxattr, names in the order the filesystem gave them.
pub fn llistxattr(p: &Path) -> Result<Vec<String>, Errno> {
    let c = cpath(p);
    loop {
        let size = unsafe { libc::llistxattr(c.as_ptr(), std::ptr::null_mut(), 0) };
        if size < 0 {
            return Err(errno());
        }
        let mut buf = vec![0u8; size as usize + 1];
        let got = unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if got < 0 {
            if errno() == libc::ERANGE {
                continue;
            }
            return Err(errno());
        }
        buf.truncate(got as usize);
        return Ok(buf
            .split(|b| *b == 0)
            .filter(|s| !s.is_empty())
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect());
    }
}

pub fn lremovexattr(p: &Path, name: &str) -> Result<(), Errno> {
    let c = cpath(p);
    let n = CString::new(name).unwrap();
    check(unsafe { libc::lremovexattr(c.as_ptr(), n.as_ptr()) })
}

/// Names of a directory (without `.`/`..`), sorted.
pub fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

// ---------------------------------------------------------------------------------------
// Mount table
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct MountEntry {
    pub mount_point: PathBuf,
    pub fstype: String,
    pub source: String,
    pub dev: (u32, u32),
    pub options: String,
}

fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn mount_table() -> Vec<MountEntry> {
    let text = fs::read_to_string("/proc/self/mountinfo").expect("read /proc/self/mountinfo");
    let mut out = Vec::new();
    for line in text.lines() {
        let Some((pre, post)) = line.split_once(" - ") else {
            continue;
        };
        let pre: Vec<&str> = pre.split(' ').collect();
        let post: Vec<&str> = post.split(' ').collect();
        if pre.len() < 6 || post.len() < 2 {
            continue;
        }
        let (maj, min) = pre[2].split_once(':').unwrap_or(("0", "0"));
        out.push(MountEntry {
            mount_point: PathBuf::from(unescape_mountinfo(pre[4])),
            fstype: post[0].to_string(),
            source: unescape_mountinfo(post[1]),
            dev: (maj.parse().unwrap_or(0), min.parse().unwrap_or(0)),
            options: pre[5].to_string(),
        });
    }
    out
}

/// The top-most mount at exactly `mp`, if any.
pub fn mount_at(mp: &Path) -> Option<MountEntry> {
    mount_table()
        .into_iter()
        .rev()
        .find(|e| e.mount_point == mp)
}

pub fn fuse_mounted_at(mp: &Path) -> bool {
    mount_at(mp).is_some_and(|e| e.fstype == "fuse" || e.fstype.starts_with("fuse."))
}

/// Runs a short helper command, answering whether it succeeded (its stderr is kept).
fn run_cmd(prog: &str, args: &[&OsStr]) -> Result<(), String> {
    match Command::new(prog).args(args).stdin(Stdio::null()).output() {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(format!(
            "{prog} {:?}: {}: {}",
            args,
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Err(format!("{prog}: cannot run: {e}")),
    }
}

/// Last resort for a FUSE mount whose daemon hangs: abort its connection.
fn abort_fuse_connection(mp: &Path) {
    if let Some(e) = mount_at(mp) {
        if e.fstype.starts_with("fuse") {
            let dev = (e.dev.0 << 20) | e.dev.1;
            let _ = fs::write(format!("/sys/fs/fuse/connections/{dev}/abort"), "1");
        }
    }
}

/// "pid (comm)" of every process whose /proc directory `holds` accepts.
fn processes_where(mut holds: impl FnMut(&Path) -> bool) -> Vec<String> {
    let Ok(rd) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| {
            let pid = e.file_name().to_str()?.parse::<u32>().ok()?;
            let proc = e.path();
            holds(&proc).then(|| {
                let comm = fs::read_to_string(proc.join("comm")).unwrap_or_default();
                format!("{pid} ({})", comm.trim())
            })
        })
        .collect()
}

/// "pid (comm)" of every process whose cwd, root or an open file is under `mp`.
fn users_of(mp: &Path) -> Vec<String> {
    processes_where(|proc| {
        let mut links: Vec<PathBuf> = vec![proc.join("cwd"), proc.join("root")];
        if let Ok(fds) = fs::read_dir(proc.join("fd")) {
            links.extend(fds.flatten().map(|f| f.path()));
        }
        links
            .iter()
            .filter_map(|l| fs::read_link(l).ok())
            .any(|t| t.starts_with(mp))
    })
}

/// "pid (comm)" of processes in another mount namespace than ours that see a FUSE
/// mount of connection `conn` (the device number of the mount); one per namespace.
fn namespace_copies_of(conn: u32) -> Vec<String> {
    let ours = fs::read_link("/proc/self/ns/mnt").ok();
    let dev = format!(" 0:{conn} ");
    let mut seen = std::collections::BTreeSet::new();
    processes_where(|proc| {
        let Ok(ns) = fs::read_link(proc.join("ns/mnt")) else {
            return false;
        };
        if Some(&ns) == ours.as_ref() || !seen.insert(ns) {
            return false;
        }
        fs::read_to_string(proc.join("mountinfo"))
            .is_ok_and(|m| m.lines().any(|l| l.contains(&dev) && l.contains(" - fuse")))
    })
}

/// Detaches the copies of an unmounted mount (device `dev`, type `fstype`) that
/// other mount namespaces took (`unshare --mount` copies every mount: the rootless
/// tests run beside this one). A kernel overlay with index=on stays alive in such a
/// copy and keeps its upper and work dirs "in use", so mounting them again fails with
/// EBUSY until that namespace ends. The copies are ours, and unused where they are.
fn release_namespace_copies(dev: (u32, u32), fstype: &str) {
    let ours = fs::read_link("/proc/self/ns/mnt").ok();
    let dev = format!(" {}:{} ", dev.0, dev.1);
    let kind = format!(" - {fstype} ");
    let mut seen = std::collections::BTreeSet::new();
    let Ok(rd) = fs::read_dir("/proc") else {
        return;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(ns) = fs::read_link(e.path().join("ns/mnt")) else {
            continue;
        };
        if Some(&ns) == ours.as_ref() || !seen.insert(ns) {
            continue;
        }
        let Ok(info) = fs::read_to_string(e.path().join("mountinfo")) else {
            continue;
        };
        for line in info
            .lines()
            .filter(|l| l.contains(&dev) && l.contains(&kind))
        {
            let Some(mp) = line.split(' ').nth(4) else {
                continue;
            };
            let mp = unescape_mountinfo(mp);
            if let Err(e) = run_cmd(
                "nsenter",
                &[
                    OsStr::new("-t"),
                    OsStr::new(&pid.to_string()),
                    OsStr::new("-m"),
                    OsStr::new("umount"),
                    OsStr::new("-l"),
                    OsStr::new(&mp),
                ],
            ) {
                eprintln!("detaching the copy of {mp} in the mount namespace of {pid}: {e}");
            }
        }
    }
}

/// Unmounts a FUSE mount: `fusermount3 -u`, falling back to `umount -l`. Notes what failed.
fn unmount_fuse(mp: &Path, problems: &mut Vec<String>) {
    if mount_at(mp).is_none() {
        return;
    }
    // EBUSY can be fleeting: a process another test thread forks holds copies of this
    // process's descriptors (some maybe on this mount) until it execs. A holder that
    // stays is named in the problem.
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut result = run_cmd("fusermount3", &[OsStr::new("-u"), mp.as_os_str()]);
    while result.as_ref().is_err_and(|e| e.contains("busy")) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        result = run_cmd("fusermount3", &[OsStr::new("-u"), mp.as_os_str()]);
    }
    if let Err(e) = result {
        problems.push(format!(
            "fusermount3 -u failed: {e} (processes using the mount: {:?})",
            users_of(mp)
        ));
        if let Err(e) = run_cmd("umount", &[OsStr::new("-l"), mp.as_os_str()]) {
            problems.push(format!("umount -l failed too: {e}"));
            abort_fuse_connection(mp);
            let _ = run_cmd("umount", &[OsStr::new("-l"), mp.as_os_str()]);
        }
    }
}

pub fn wait_bounded(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(st)) => return Some(st),
            Ok(None) => {}
            Err(e) => panic!("waiting for pid {}: {e}", child.id()),
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn read_log(p: &Path) -> String {
    let s = fs::read_to_string(p).unwrap_or_default();
    if s.len() > 20_000 {
        format!("...{}", &s[s.len() - 20_000..])
    } else {
        s
    }
}

// ---------------------------------------------------------------------------------------
// Layer builder
// ---------------------------------------------------------------------------------------

/// Mode, owner, xattrs and mtime of one entry; `None` keeps the builder's default.
#[derive(Clone, Debug, Default)]
pub struct Meta {
    pub mode: Option<u32>,
    pub owner: Option<(u32, u32)>,
    pub xattrs: Vec<(String, Vec<u8>)>,
    pub mtime: Option<i64>,
}

impl Meta {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn mode(mut self, mode: u32) -> Self {
        self.mode = Some(mode);
        self
    }
    pub fn owner(mut self, uid: u32, gid: u32) -> Self {
        self.owner = Some((uid, gid));
        self
    }
    pub fn xattr(mut self, name: &str, value: impl AsRef<[u8]>) -> Self {
        self.xattrs
            .push((name.to_string(), value.as_ref().to_vec()));
        self
    }
    pub fn mtime(mut self, secs: i64) -> Self {
        self.mtime = Some(secs);
        self
    }
}

#[derive(Clone, Debug)]
enum Node {
    File {
        path: String,
        data: Vec<u8>,
        meta: Meta,
    },
    Sparse {
        path: String,
        size: u64,
        chunks: Vec<(u64, Vec<u8>)>,
        meta: Meta,
    },
    Dir {
        path: String,
        meta: Meta,
    },
    OpaqueDir {
        path: String,
        meta: Meta,
    },
    Symlink {
        path: String,
        target: String,
        meta: Meta,
    },
    HardLink {
        path: String,
        existing: String,
    },
    Fifo {
        path: String,
        meta: Meta,
    },
    Socket {
        path: String,
        meta: Meta,
    },
    CharDev {
        path: String,
        major: u32,
        minor: u32,
        meta: Meta,
    },
    Whiteout {
        path: String,
    },
}

/// How whiteouts in lower layers are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WhiteoutFormat {
    /// A character device 0/0 at the name (kernel overlayfs).
    CharDev,
    /// An empty regular file `.wh.NAME` beside the name (AUFS / OCI layers).
    Aufs,
}

/// How opaque directories in lower layers are marked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpaqueFormat {
    /// `trusted.overlay.opaque=y` (kernel overlayfs).
    TrustedXattr,
    /// `user.overlay.opaque=y` (kernel overlayfs `userxattr`).
    UserXattr,
    /// A `.wh..wh..opq` entry inside the directory (AUFS / OCI layers).
    AufsMarker,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Format {
    pub whiteout: WhiteoutFormat,
    pub opaque: OpaqueFormat,
}

impl Format {
    /// The format kernel overlayfs itself reads and writes as root.
    pub const NATIVE: Format = Format {
        whiteout: WhiteoutFormat::CharDev,
        opaque: OpaqueFormat::TrustedXattr,
    };
    pub const AUFS: Format = Format {
        whiteout: WhiteoutFormat::Aufs,
        opaque: OpaqueFormat::AufsMarker,
    };
    pub const USER_XATTR: Format = Format {
        whiteout: WhiteoutFormat::CharDev,
        opaque: OpaqueFormat::UserXattr,
    };
}

/// A declarative description of one layer's content. Parent directories are created as
/// needed (mode 0755, root-owned); every entry ends with mtime [`FIXED_MTIME`] unless its
/// [`Meta`] says otherwise.
#[derive(Clone, Debug, Default)]
pub struct LayerSpec {
    nodes: Vec<Node>,
}

impl LayerSpec {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn file(self, path: &str, data: impl AsRef<[u8]>) -> Self {
        self.file_with(path, data, Meta::new())
    }
    pub fn file_with(mut self, path: &str, data: impl AsRef<[u8]>, meta: Meta) -> Self {
        self.nodes.push(Node::File {
            path: path.into(),
            data: data.as_ref().to_vec(),
            meta,
        });
        self
    }
    /// A sparse file of `size` bytes holding only `chunks` (offset, data).
    pub fn sparse(mut self, path: &str, size: u64, chunks: &[(u64, &[u8])], meta: Meta) -> Self {
        let chunks = chunks.iter().map(|(o, d)| (*o, d.to_vec())).collect();
        self.nodes.push(Node::Sparse {
            path: path.into(),
            size,
            chunks,
            meta,
        });
        self
    }
    pub fn dir(self, path: &str) -> Self {
        self.dir_with(path, Meta::new())
    }
    pub fn dir_with(mut self, path: &str, meta: Meta) -> Self {
        self.nodes.push(Node::Dir {
            path: path.into(),
            meta,
        });
        self
    }
    /// A directory marked opaque (in the layer's [`OpaqueFormat`]).
    pub fn opaque_dir(mut self, path: &str) -> Self {
        self.nodes.push(Node::OpaqueDir {
            path: path.into(),
            meta: Meta::new(),
        });
        self
    }
    pub fn symlink(self, path: &str, target: &str) -> Self {
        self.symlink_with(path, target, Meta::new())
    }
    pub fn symlink_with(mut self, path: &str, target: &str, meta: Meta) -> Self {
        self.nodes.push(Node::Symlink {
            path: path.into(),
            target: target.into(),
            meta,
        });
        self
    }
    /// A hard link at `path` to the entry `existing` of the same layer (made earlier).
    pub fn hardlink(mut self, path: &str, existing: &str) -> Self {
        self.nodes.push(Node::HardLink {
            path: path.into(),
            existing: existing.into(),
        });
        self
    }
    pub fn fifo(mut self, path: &str) -> Self {
        self.nodes.push(Node::Fifo {
            path: path.into(),
            meta: Meta::new(),
        });
        self
    }
    pub fn socket(mut self, path: &str) -> Self {
        self.nodes.push(Node::Socket {
            path: path.into(),
            meta: Meta::new(),
        });
        self
    }
    pub fn chardev(mut self, path: &str, major: u32, minor: u32) -> Self {
        self.nodes.push(Node::CharDev {
            path: path.into(),
            major,
            minor,
            meta: Meta::new(),
        });
        self
    }
    /// A whiteout hiding `path` of the layers below (in the layer's [`WhiteoutFormat`]).
    pub fn whiteout(mut self, path: &str) -> Self {
        self.nodes.push(Node::Whiteout { path: path.into() });
        self
    }

    /// Creates the layer's content under `root` (which must exist).
    pub fn build(&self, root: &Path, fmt: Format) {
        let mut mtimes: BTreeMap<PathBuf, i64> = BTreeMap::new();
        let mut metas: Vec<(PathBuf, Meta, bool)> = Vec::new(); // (path, meta, is_symlink)
        for node in &self.nodes {
            let (path, meta, is_link) = match node {
                Node::File { path, data, meta } => {
                    let p = prepare(root, path);
                    fs::write(&p, data).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
                    set_mode(&p, 0o644);
                    (p, meta.clone(), false)
                }
                Node::Sparse {
                    path,
                    size,
                    chunks,
                    meta,
                } => {
                    let p = prepare(root, path);
                    let f = File::create(&p).unwrap();
                    f.set_len(*size).unwrap();
                    for (off, data) in chunks {
                        f.write_all_at(data, *off).unwrap();
                    }
                    set_mode(&p, 0o644);
                    (p, meta.clone(), false)
                }
                Node::Dir { path, meta } => {
                    let p = prepare(root, path);
                    if !p.is_dir() {
                        fs::create_dir(&p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
                    }
                    set_mode(&p, 0o755);
                    (p, meta.clone(), false)
                }
                Node::OpaqueDir { path, meta } => {
                    let p = prepare(root, path);
                    if !p.is_dir() {
                        fs::create_dir(&p).unwrap();
                    }
                    set_mode(&p, 0o755);
                    match fmt.opaque {
                        OpaqueFormat::TrustedXattr => {
                            lsetxattr(&p, "trusted.overlay.opaque", b"y", 0).unwrap()
                        }
                        OpaqueFormat::UserXattr => {
                            lsetxattr(&p, "user.overlay.opaque", b"y", 0).unwrap()
                        }
                        OpaqueFormat::AufsMarker => {
                            fs::write(p.join(".wh..wh..opq"), b"").unwrap();
                        }
                    }
                    (p, meta.clone(), false)
                }
                Node::Symlink { path, target, meta } => {
                    let p = prepare(root, path);
                    symlink(target, &p).unwrap_or_else(|e| panic!("symlink {}: {e}", p.display()));
                    (p, meta.clone(), true)
                }
                Node::HardLink { path, existing } => {
                    let p = prepare(root, path);
                    fs::hard_link(root.join(existing), &p)
                        .unwrap_or_else(|e| panic!("link {}: {e}", p.display()));
                    continue;
                }
                Node::Fifo { path, meta } => {
                    let p = prepare(root, path);
                    mkfifo(&p, 0o644).unwrap();
                    set_mode(&p, 0o644);
                    (p, meta.clone(), false)
                }
                Node::Socket { path, meta } => {
                    let p = prepare(root, path);
                    mknod(&p, libc::S_IFSOCK | 0o755, 0, 0).unwrap();
                    (p, meta.clone(), false)
                }
                Node::CharDev {
                    path,
                    major,
                    minor,
                    meta,
                } => {
                    let p = prepare(root, path);
                    mknod(&p, libc::S_IFCHR | 0o644, *major, *minor).unwrap();
                    set_mode(&p, 0o644);
                    (p, meta.clone(), false)
                }
                Node::Whiteout { path } => {
                    let p = prepare(root, path);
                    match fmt.whiteout {
                        WhiteoutFormat::CharDev => mknod(&p, libc::S_IFCHR, 0, 0).unwrap(),
                        WhiteoutFormat::Aufs => {
                            let name = p.file_name().unwrap().to_string_lossy().into_owned();
                            fs::write(p.with_file_name(format!(".wh.{name}")), b"").unwrap();
                        }
                    }
                    continue;
                }
            };
            metas.push((path, meta, is_link));
        }
        for (p, meta, is_link) in metas {
            // chown before chmod: chown clears setuid/setgid bits.
            if let Some((u, g)) = meta.owner {
                lchown(&p, u, g).unwrap();
            }
            if let Some(m) = meta.mode {
                assert!(!is_link, "a symlink has no mode of its own");
                set_mode(&p, m);
            }
            for (n, v) in &meta.xattrs {
                lsetxattr(&p, n, v, 0).unwrap_or_else(|e| {
                    panic!("setxattr {n} on {}: {}", p.display(), errno_name(e))
                });
            }
            if let Some(t) = meta.mtime {
                mtimes.insert(p, t);
            }
        }
        set_times_post_order(root, &mtimes);
    }
}

fn prepare(root: &Path, rel: &str) -> PathBuf {
    let p = root.join(rel);
    let parent = p.parent().unwrap();
    if !parent.exists() {
        fs::create_dir_all(parent).unwrap();
        // create_dir_all obeys the umask; make every parent 0755 explicitly.
        let mut d = parent;
        while d != root {
            set_mode(d, 0o755);
            d = d.parent().unwrap();
        }
    }
    p
}

fn set_mode(p: &Path, mode: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", p.display()));
}

fn set_times_post_order(dir: &Path, mtimes: &BTreeMap<PathBuf, i64>) {
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let md = fs::symlink_metadata(&p).unwrap();
        if md.is_dir() {
            set_times_post_order(&p, mtimes);
        }
        let t = mtimes.get(&p).copied().unwrap_or(FIXED_MTIME);
        lutimes(&p, t, t).unwrap();
    }
    let t = mtimes.get(dir).copied().unwrap_or(FIXED_MTIME);
    lutimes(dir, t, t).unwrap();
}

/// A scratch directory holding lower layers, an upper, a workdir and a mountpoint.
/// Declared after the mount guards in a test so that it is removed after they unmount.
pub struct Layers {
    pub root: PathBuf,
    /// Top-most first.
    pub lowers: Vec<PathBuf>,
    pub upper: PathBuf,
    pub work: PathBuf,
    pub merged: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Layers {
    /// Lowers from `specs` (top-most first) in the kernel's native format; empty upper.
    pub fn new(specs: &[LayerSpec]) -> Self {
        Self::build(specs, None, Format::NATIVE)
    }

    pub fn build(specs: &[LayerSpec], upper: Option<&LayerSpec>, fmt: Format) -> Self {
        let tmp = tempfile::Builder::new()
            .prefix("stratafs-it-")
            .tempdir()
            .unwrap();
        let root = tmp.path().canonicalize().unwrap();
        let lowers: Vec<PathBuf> = (0..specs.len())
            .map(|i| root.join(format!("lower{i}")))
            .collect();
        for (spec, dir) in specs.iter().zip(&lowers) {
            fs::create_dir(dir).unwrap();
            spec.build(dir, fmt);
        }
        let (upper_dir, work, merged) =
            (root.join("upper"), root.join("work"), root.join("merged"));
        for d in [&upper_dir, &work, &merged] {
            fs::create_dir(d).unwrap();
        }
        if let Some(spec) = upper {
            spec.build(&upper_dir, fmt);
        }
        Layers {
            root,
            lowers,
            upper: upper_dir,
            work,
            merged,
            _tmp: tmp,
        }
    }

    /// `L1:L2:...` (top-most first).
    pub fn lowerdir(&self) -> String {
        let v: Vec<String> = self
            .lowers
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        v.join(":")
    }

    /// The `-o` value of a writable mount.
    pub fn rw_options(&self) -> String {
        format!(
            "lowerdir={},upperdir={},workdir={}",
            self.lowerdir(),
            self.upper.display(),
            self.work.display()
        )
    }

    pub fn ro_options(&self) -> String {
        format!("lowerdir={}", self.lowerdir())
    }
}

// ---------------------------------------------------------------------------------------
// stratafs in the foreground
// ---------------------------------------------------------------------------------------

/// A stratafs mount run with `-f`; unmounts and reaps the daemon on drop.
pub struct StrataMount {
    mountpoint: PathBuf,
    options: String,
    extra_args: Vec<String>,
    log_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    spawned: u32,
    /// Extra environment of the daemon.
    env: Vec<(String, String)>,
    /// The test provokes watchdog reports on purpose: they do not fail it.
    watchdog_expected: bool,
}

/// What every daemon log line of a watchdog report contains (src/fuse/watchdog.rs).
pub const WATCHDOG_MARK: &str = "watchdog: ";

impl StrataMount {
    /// lowerdir+upperdir+workdir of `l`, mounted on `l.merged`.
    pub fn new(l: &Layers) -> Self {
        Self::with_options(&l.rw_options(), &l.merged, &l.root)
    }

    /// Only lowerdir: a read-only mount on `l.merged`.
    pub fn read_only(l: &Layers) -> Self {
        Self::with_options(&l.ro_options(), &l.merged, &l.root)
    }

    /// `stratafs -f -o OPTIONS MOUNTPOINT`, its stderr kept in `log_dir`.
    pub fn with_options(options: &str, mountpoint: &Path, log_dir: &Path) -> Self {
        Self::with_args(options, &[], mountpoint, log_dir)
    }

    pub fn with_args(options: &str, extra: &[&str], mountpoint: &Path, log_dir: &Path) -> Self {
        Self::with_env(options, extra, &[], mountpoint, log_dir)
    }

    /// As [`with_args`](Self::with_args), the daemon getting `env` on top of ours.
    pub fn with_env(
        options: &str,
        extra: &[&str],
        env: &[(&str, &str)],
        mountpoint: &Path,
        log_dir: &Path,
    ) -> Self {
        let mut m = StrataMount {
            mountpoint: mountpoint.to_path_buf(),
            options: options.to_string(),
            extra_args: extra.iter().map(|s| s.to_string()).collect(),
            log_dir: log_dir.to_path_buf(),
            log: PathBuf::new(),
            child: None,
            spawned: 0,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            watchdog_expected: false,
        };
        m.start();
        m
    }

    fn start(&mut self) {
        assert!(self.child.is_none());
        assert!(
            mount_at(&self.mountpoint).is_none(),
            "{} is already a mount point",
            self.mountpoint.display()
        );
        self.spawned += 1;
        self.log = self.log_dir.join(format!("stratafs-{}.log", self.spawned));
        let log = File::create(&self.log).unwrap();
        let child = Command::new(stratafs_bin())
            .arg("-f")
            .args(&self.extra_args)
            .arg("-o")
            .arg(&self.options)
            .arg(&self.mountpoint)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", stratafs_bin()));
        self.child = Some(child);
        // From here on a panic drops `self`, which tears down whatever came up.
        self.wait_live();
    }

    fn wait_live(&mut self) {
        let deadline = Instant::now() + MOUNT_TIMEOUT;
        loop {
            let child = self.child.as_mut().unwrap();
            if let Some(st) = child.try_wait().unwrap() {
                self.child = None;
                panic!(
                    "stratafs -f -o {} {} exited ({st}) before its mount went live; output:\n{}",
                    self.options,
                    self.mountpoint.display(),
                    read_log(&self.log)
                );
            }
            if fuse_mounted_at(&self.mountpoint) {
                match statfs_bounded(&self.mountpoint, Duration::from_secs(5)) {
                    Some(Ok(st)) if st.f_type == FUSE_SUPER_MAGIC => return,
                    Some(_) => {}
                    None => panic!(
                        "statfs on the stratafs mount {} hangs (>5 s); output:\n{}",
                        self.mountpoint.display(),
                        read_log(&self.log)
                    ),
                }
            }
            if Instant::now() >= deadline {
                panic!(
                    "stratafs mount {} not live after {:?}; output:\n{}",
                    self.mountpoint.display(),
                    MOUNT_TIMEOUT,
                    read_log(&self.log)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn path(&self) -> &Path {
        &self.mountpoint
    }

    pub fn join(&self, rel: &str) -> PathBuf {
        self.mountpoint.join(rel)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("stratafs is not running").id()
    }

    /// What the daemon wrote to stdout/stderr so far.
    pub fn output(&self) -> String {
        read_log(&self.log)
    }

    /// The daemon's exit status if it has exited (without an unmount asking it to, that
    /// is a crash), `None` while it runs.
    pub fn daemon_exited(&mut self) -> Option<ExitStatus> {
        match self.child.as_mut() {
            Some(c) => c.try_wait().unwrap_or(None),
            None => panic!("no stratafs daemon was started"),
        }
    }

    /// Watchdog reports of this mount's daemon are expected (the test provokes them and
    /// checks them itself) rather than a failure.
    pub fn expect_watchdog_reports(&mut self) {
        self.watchdog_expected = true;
    }

    /// The watchdog lines of the current daemon's output, unless they are expected. A
    /// request that ran for the watchdog's threshold (10 s) is a hang or a pathological
    /// slowdown, which fails the test even when everything else it checks passed.
    fn unexpected_watchdog_reports(&self) -> Option<String> {
        if self.watchdog_expected || self.log.as_os_str().is_empty() {
            return None;
        }
        let out = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = out.lines().filter(|l| l.contains(WATCHDOG_MARK)).collect();
        (!lines.is_empty()).then(|| {
            format!(
                "the daemon's watchdog reported requests running too long:\n{}",
                lines.join("\n")
            )
        })
    }

    /// Unmounts, requires the daemon to exit by itself, returns its exit status.
    pub fn unmount(&mut self) -> ExitStatus {
        let mut problems = Vec::new();
        let st = self.teardown(&mut problems);
        problems.extend(self.unexpected_watchdog_reports());
        if !problems.is_empty() {
            panic!(
                "unmounting stratafs at {}: {}\noutput:\n{}",
                self.mountpoint.display(),
                problems.join("\n"),
                read_log(&self.log)
            );
        }
        st.expect("the daemon was running")
    }

    /// Unmount and mount the same directories again with a fresh daemon.
    /// (If the daemon already exited, e.g. after a signal, just mounts again.)
    pub fn remount(&mut self) {
        if self.child.is_some() {
            self.unmount();
        }
        self.start();
    }

    /// Sends `sig` to the daemon and waits (bounded) for it to exit by itself.
    /// Panics if it does not; the mount state afterwards is the caller's to check.
    /// What the daemon logged so far (stderr, at the level the mount runs with).
    pub fn log_text(&self) -> String {
        read_log(&self.log)
    }

    pub fn signal_and_wait(&mut self, sig: i32) -> ExitStatus {
        let pid = self.pid() as libc::pid_t;
        // SAFETY: pid is our own child, not yet reaped (so not recycled).
        assert_eq!(
            unsafe { libc::kill(pid, sig) },
            0,
            "kill({pid}, {sig}): {}",
            errno()
        );
        let child = self.child.as_mut().unwrap();
        match wait_bounded(child, EXIT_TIMEOUT) {
            Some(st) => {
                self.child = None;
                if let Some(msg) = self.unexpected_watchdog_reports() {
                    panic!("{msg}");
                }
                st
            }
            None => panic!(
                "stratafs (pid {pid}) did not exit within {:?} of signal {sig}; output:\n{}",
                EXIT_TIMEOUT,
                read_log(&self.log)
            ),
        }
    }

    fn teardown(&mut self, problems: &mut Vec<String>) -> Option<ExitStatus> {
        if let Some(child) = self.child.as_mut() {
            if let Ok(Some(st)) = child.try_wait() {
                problems.push(format!(
                    "the daemon had already exited ({st}) before the unmount"
                ));
            }
        }
        let conn = mount_at(&self.mountpoint)
            .filter(|e| e.fstype.starts_with("fuse"))
            .map(|e| (e.dev.0 << 20) | e.dev.1);
        unmount_fuse(&self.mountpoint, problems);
        let mut status = None;
        if let Some(mut child) = self.child.take() {
            let mut exited = wait_bounded(&mut child, EXIT_TIMEOUT);
            if let (None, Some(conn)) = (exited, conn) {
                // The connection outlives our unmount while a copy of the mount lives in
                // another mount namespace (`unshare --mount` anywhere on the machine
                // copies every mount, e.g. the rootless tests): the daemon rightly goes
                // on serving it. Ending the connection is ours to do, not a daemon fault.
                let holders = namespace_copies_of(conn);
                if !holders.is_empty() {
                    let line = format!(
                        "{}: the unmounted connection {conn} is still mounted in the mount \
                         namespace of {holders:?}; aborting it\n",
                        self.mountpoint.display()
                    );
                    let _ = io::stderr().write_all(line.as_bytes());
                    let _ = fs::write(format!("/sys/fs/fuse/connections/{conn}/abort"), "1");
                    exited = wait_bounded(&mut child, EXIT_TIMEOUT);
                }
            }
            match exited {
                Some(st) => status = Some(st),
                None => {
                    problems.push(format!(
                        "the daemon (pid {}) did not exit within {:?} of the unmount; killed it",
                        child.id(),
                        EXIT_TIMEOUT
                    ));
                    let _ = child.kill();
                    status = child.wait().ok();
                }
            }
        }
        if mount_at(&self.mountpoint).is_some() {
            problems.push("still mounted after the daemon exited".into());
            abort_fuse_connection(&self.mountpoint);
            let _ = run_cmd("umount", &[OsStr::new("-l"), self.mountpoint.as_os_str()]);
        }
        status
    }
}

impl Drop for StrataMount {
    fn drop(&mut self) {
        let mut problems = Vec::new();
        self.teardown(&mut problems);
        if !problems.is_empty() {
            eprintln!(
                "StrataMount drop ({}): {}\noutput:\n{}",
                self.mountpoint.display(),
                problems.join("\n"),
                read_log(&self.log)
            );
        }
        // A watchdog report fails the test that owned the mount. Not while already
        // unwinding: a panic inside a panic aborts the whole test binary, and the
        // first failure is the one worth reading.
        if !std::thread::panicking() {
            if let Some(msg) = self.unexpected_watchdog_reports() {
                panic!("StrataMount drop ({}): {msg}", self.mountpoint.display());
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// stratafs in daemon mode
// ---------------------------------------------------------------------------------------

/// PIDs of live (non-zombie) stratafs processes whose command line names `mp`.
pub fn stratafs_pids_for(mp: &Path) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(rd) = fs::read_dir("/proc") else {
        return out;
    };
    let needle = mp.as_os_str().as_bytes();
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let is_stratafs = args.first().is_some_and(|a0| a0.ends_with(b"stratafs"))
            || fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "stratafs");
        if !is_stratafs || !args.contains(&needle) {
            continue;
        }
        let zombie = fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')
                    .map(|(_, rest)| rest.trim_start().starts_with('Z'))
            })
            .unwrap_or(true);
        if !zombie {
            out.push(pid);
        }
    }
    out
}

/// A stratafs mount made without `-f`: the command must exit 0 with the mount live and a
/// detached daemon serving it. On drop: unmount, wait for the daemon, kill it by PID if
/// it lingers.
pub struct StrataDaemon {
    mountpoint: PathBuf,
    log: PathBuf,
    /// Exit status of the command that was run (the daemon is its descendant).
    pub launcher_status: ExitStatus,
    /// The daemon(s) found serving the mount right after the launcher exited.
    pub daemon_pids: Vec<i32>,
}

impl StrataDaemon {
    pub fn mount(l: &Layers) -> Self {
        Self::with_options(l, &l.rw_options())
    }

    /// `stratafs -o OPTIONS l.merged` (daemon mode).
    pub fn with_options(l: &Layers, options: &str) -> Self {
        let mp = l.merged.clone();
        let log = l.root.join("stratafs-daemon.log");
        let logf = File::create(&log).unwrap();
        let mut child = Command::new(stratafs_bin())
            .arg("-o")
            .arg(options)
            .arg(&mp)
            .stdin(Stdio::null())
            .stdout(Stdio::from(logf.try_clone().unwrap()))
            .stderr(Stdio::from(logf))
            .spawn()
            .unwrap();
        let mut d = StrataDaemon {
            mountpoint: mp.clone(),
            log,
            launcher_status: ExitStatus::default(),
            daemon_pids: Vec::new(),
        };
        let Some(st) = wait_bounded(&mut child, Duration::from_secs(30)) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "`stratafs -o ... {}` (daemon mode) did not return within 30 s; output:\n{}",
                mp.display(),
                read_log(&d.log)
            );
        };
        d.launcher_status = st;
        if !st.success() {
            panic!(
                "daemon-mode stratafs exited {st}; output:\n{}",
                read_log(&d.log)
            );
        }
        d.daemon_pids = stratafs_pids_for(&mp);
        d
    }

    pub fn path(&self) -> &Path {
        &self.mountpoint
    }

    pub fn output(&self) -> String {
        read_log(&self.log)
    }

    /// `fusermount3 -u`, then waits (bounded) until the mount is gone from the mount table
    /// and no stratafs process for this mountpoint is left. Err describes what lingered.
    pub fn unmount_and_wait(&mut self) -> Result<(), String> {
        run_cmd(
            "fusermount3",
            &[OsStr::new("-u"), self.mountpoint.as_os_str()],
        )?;
        let deadline = Instant::now() + EXIT_TIMEOUT;
        loop {
            let mounted = mount_at(&self.mountpoint).is_some();
            let pids = stratafs_pids_for(&self.mountpoint);
            if !mounted && pids.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "{:?} after fusermount3 -u: still mounted: {mounted}; stratafs processes \
                     for the mountpoint: {pids:?}",
                    EXIT_TIMEOUT
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for StrataDaemon {
    fn drop(&mut self) {
        let mut problems = Vec::new();
        unmount_fuse(&self.mountpoint, &mut problems);
        let deadline = Instant::now() + EXIT_TIMEOUT;
        while !stratafs_pids_for(&self.mountpoint).is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        for pid in stratafs_pids_for(&self.mountpoint) {
            problems.push(format!(
                "daemon pid {pid} lingered after the unmount; killed it"
            ));
            // SAFETY: a stratafs process serving our own unique mountpoint: ours.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        if mount_at(&self.mountpoint).is_some() {
            abort_fuse_connection(&self.mountpoint);
            let _ = run_cmd("umount", &[OsStr::new("-l"), self.mountpoint.as_os_str()]);
        }
        if !problems.is_empty() {
            eprintln!(
                "StrataDaemon drop ({}): {}",
                self.mountpoint.display(),
                problems.join("\n")
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// Kernel overlayfs
// ---------------------------------------------------------------------------------------

/// A kernel overlayfs mount of the same layout, for differential tests. Mounted with
/// `redirect_dir=on,index=on` (directories with lower content can be renamed, lower
/// hard links stay linked after copy-up), the behaviour stratafs follows.
pub struct KernelOverlay {
    mountpoint: PathBuf,
    options: String,
    mounted: bool,
}

impl KernelOverlay {
    pub fn new(l: &Layers) -> Self {
        Self::with_metacopy(l, false)
    }

    /// The same, with `metacopy=on` when asked (metadata-only copy-up).
    pub fn with_metacopy(l: &Layers, metacopy: bool) -> Self {
        let metacopy = if metacopy { "on" } else { "off" };
        Self::with_extra_options(l, &format!("metacopy={metacopy}"))
    }

    /// The usual options (redirect_dir, index) plus `extra` (e.g. "noatime").
    pub fn with_extra_options(l: &Layers, extra: &str) -> Self {
        let mut k = KernelOverlay {
            mountpoint: l.merged.clone(),
            options: format!("{},redirect_dir=on,index=on,{extra}", l.rw_options()),
            mounted: false,
        };
        k.mount();
        k
    }

    fn mount(&mut self) {
        let out = Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o"])
            .arg(&self.options)
            .arg(&self.mountpoint)
            .stdin(Stdio::null())
            .output()
            .expect("run mount");
        if !out.status.success() {
            panic!(
                "mount -t overlay -o {} {}: {}: {}",
                self.options,
                self.mountpoint.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        self.mounted = true;
        let st = statfs(&self.mountpoint).unwrap();
        assert_eq!(
            st.f_type, OVERLAYFS_SUPER_MAGIC,
            "kernel overlay not mounted"
        );
    }

    pub fn path(&self) -> &Path {
        &self.mountpoint
    }

    pub fn join(&self, rel: &str) -> PathBuf {
        self.mountpoint.join(rel)
    }

    pub fn unmount(&mut self) {
        if self.mounted {
            let dev = mount_at(&self.mountpoint).map(|e| e.dev);
            run_cmd("umount", &[self.mountpoint.as_os_str()])
                .unwrap_or_else(|e| panic!("unmounting the kernel overlay: {e}"));
            self.mounted = false;
            if let Some(dev) = dev {
                release_namespace_copies(dev, "overlay");
            }
        }
    }

    pub fn remount(&mut self) {
        self.unmount();
        self.mount();
    }
}

impl Drop for KernelOverlay {
    fn drop(&mut self) {
        if self.mounted && mount_at(&self.mountpoint).is_some() {
            if let Err(e) = run_cmd("umount", &[self.mountpoint.as_os_str()]) {
                eprintln!("KernelOverlay drop: {e}; trying umount -l");
                let _ = run_cmd("umount", &[OsStr::new("-l"), self.mountpoint.as_os_str()]);
            }
        }
    }
}

/// A small tmpfs, for an upper layer on its own filesystem.
pub struct Tmpfs {
    pub path: PathBuf,
}

impl Tmpfs {
    pub fn new(path: &Path, size: &str) -> Self {
        fs::create_dir_all(path).unwrap();
        run_cmd(
            "mount",
            &[
                OsStr::new("-t"),
                OsStr::new("tmpfs"),
                OsStr::new("-o"),
                OsStr::new(&format!("size={size},mode=0755")),
                OsStr::new("tmpfs"),
                path.as_os_str(),
            ],
        )
        .unwrap_or_else(|e| panic!("mounting a tmpfs: {e}"));
        Tmpfs {
            path: path.to_path_buf(),
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        if mount_at(&self.path).is_some() && run_cmd("umount", &[self.path.as_os_str()]).is_err() {
            let _ = run_cmd("umount", &[OsStr::new("-l"), self.path.as_os_str()]);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Tree snapshot and diff
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDev,
    BlockDev,
    /// lstat of a name listed by readdir failed (see `Entry::errors`).
    Unreadable,
}

pub fn kind_of(md: &fs::Metadata) -> Kind {
    match md.mode() & libc::S_IFMT {
        libc::S_IFREG => Kind::File,
        libc::S_IFDIR => Kind::Dir,
        libc::S_IFLNK => Kind::Symlink,
        libc::S_IFIFO => Kind::Fifo,
        libc::S_IFSOCK => Kind::Socket,
        libc::S_IFCHR => Kind::CharDev,
        libc::S_IFBLK => Kind::BlockDev,
        m => panic!("unknown file type {m:o}"),
    }
}

/// A regular file's content: length, a hash, and its first bytes for the reader.
#[derive(Clone, PartialEq, Eq)]
pub struct Content {
    pub len: u64,
    pub hash: u64,
    pub head: Vec<u8>,
}

impl fmt::Debug for Content {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} bytes, hash {:016x}, starting {:?}",
            self.len,
            self.hash,
            String::from_utf8_lossy(&self.head)
        )
    }
}

pub fn hash_bytes(data: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    h.write(data);
    h.finish()
}

pub fn content_of(p: &Path) -> io::Result<Content> {
    let mut f = File::open(p)?;
    let mut h = DefaultHasher::new();
    let mut head = Vec::new();
    let mut len = 0u64;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.write(&buf[..n]);
        if head.len() < 48 {
            let take = (48 - head.len()).min(n);
            head.extend_from_slice(&buf[..take]);
        }
        len += n as u64;
    }
    Ok(Content {
        len,
        hash: h.finish(),
        head,
    })
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub kind: Kind,
    /// Permission bits incl. setuid/setgid/sticky.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: Option<u64>,
    pub content: Option<Content>,
    pub target: Option<String>,
    pub rdev: Option<(u32, u32)>,
    /// None where not comparable (whiteouts in a raw upper: the kernel shares one inode).
    pub nlink: Option<u64>,
    pub xattrs: BTreeMap<String, Vec<u8>>,
    /// (secs, nsecs) of non-directories.
    pub mtime: Option<(i64, i64)>,
    /// Raw-layer snapshots: whether the directory is marked opaque (any format).
    pub opaque: Option<bool>,
    /// Calls that failed while recording this entry (listxattr, read, readdir...).
    pub errors: Vec<String>,
}

#[derive(Clone, Debug)]
pub struct Snapshot {
    pub root: PathBuf,
    /// Keyed by path relative to the root ("." for the root itself).
    pub entries: BTreeMap<String, Entry>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum SnapMode {
    Merged,
    RawLayer,
}

/// Snapshot of a merged view. Records every `user.*` xattr, private ones included: a union
/// filesystem must never show those, so one showing up is a difference worth reporting.
pub fn snapshot(root: &Path) -> Snapshot {
    take_snapshot(root, SnapMode::Merged)
}

/// Snapshot of a layer directory as stored (e.g. an upper dir): opaque markers in any
/// format become `opaque: Some(true)` on the directory (the `.wh..wh..opq` entry itself is
/// not listed), private xattrs are left out, and whiteouts' link counts are ignored.
pub fn snapshot_layer(root: &Path) -> Snapshot {
    take_snapshot(root, SnapMode::RawLayer)
}

fn take_snapshot(root: &Path, mode: SnapMode) -> Snapshot {
    let mut entries = BTreeMap::new();
    walk(root, ".", mode, &mut entries);
    Snapshot {
        root: root.to_path_buf(),
        entries,
    }
}

fn walk(p: &Path, rel: &str, mode: SnapMode, out: &mut BTreeMap<String, Entry>) {
    let md = match fs::symlink_metadata(p) {
        Ok(md) => md,
        Err(e) => {
            out.insert(
                rel.to_string(),
                Entry {
                    kind: Kind::Unreadable,
                    mode: 0,
                    uid: 0,
                    gid: 0,
                    size: None,
                    content: None,
                    target: None,
                    rdev: None,
                    nlink: None,
                    xattrs: BTreeMap::new(),
                    mtime: None,
                    opaque: None,
                    errors: vec![format!("lstat: {e}")],
                },
            );
            return;
        }
    };
    let kind = kind_of(&md);
    let mut xattrs = BTreeMap::new();
    let mut errors = Vec::new();
    let mut opaque = false;
    if kind != Kind::Symlink {
        let names = llistxattr(p).unwrap_or_else(|e| {
            errors.push(format!("listxattr: {}", errno_name(e)));
            Vec::new()
        });
        for n in names {
            let private = is_private_xattr(OsStr::new(&n));
            if mode == SnapMode::RawLayer && private {
                if n.ends_with(".opaque") {
                    opaque |= lgetxattr(p, &n).is_ok_and(|v| v == b"y");
                }
                continue;
            }
            if !n.starts_with("user.") {
                continue;
            }
            match lgetxattr(p, &n) {
                Ok(v) => {
                    xattrs.insert(n, v);
                }
                Err(e) => errors.push(format!("getxattr {n} (listed): {}", errno_name(e))),
            }
        }
    }
    let is_whiteout = kind == Kind::CharDev && md.rdev() == 0;
    let mut e = Entry {
        kind,
        mode: md.mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        size: (kind == Kind::File).then(|| md.size()),
        content: None,
        target: None,
        rdev: matches!(kind, Kind::CharDev | Kind::BlockDev)
            .then(|| (libc::major(md.rdev()), libc::minor(md.rdev()))),
        nlink: if mode == SnapMode::RawLayer && is_whiteout {
            None
        } else {
            Some(md.nlink())
        },
        xattrs,
        mtime: (kind != Kind::Dir).then(|| (md.mtime(), md.mtime_nsec())),
        opaque: None,
        errors,
    };
    match kind {
        Kind::File => match content_of(p) {
            Ok(c) => e.content = Some(c),
            Err(err) => e.errors.push(format!("read: {err}")),
        },
        Kind::Symlink => match fs::read_link(p) {
            Ok(t) => e.target = Some(t.to_string_lossy().into_owned()),
            Err(err) => e.errors.push(format!("readlink: {err}")),
        },
        Kind::Dir => {
            let mut children = Vec::new();
            match fs::read_dir(p) {
                Ok(rd) => {
                    for d in rd {
                        match d {
                            Ok(d) => children.push(d.file_name().to_string_lossy().into_owned()),
                            Err(err) => {
                                e.errors.push(format!("readdir: {err}"));
                                break;
                            }
                        }
                    }
                }
                Err(err) => e.errors.push(format!("opendir: {err}")),
            }
            children.sort();
            let mut seen = std::collections::BTreeSet::new();
            for c in &children {
                if !seen.insert(c) {
                    e.errors.push(format!("readdir lists {c:?} more than once"));
                }
            }
            children.dedup();
            if mode == SnapMode::RawLayer {
                if children.iter().any(|c| c == ".wh..wh..opq") {
                    opaque = true;
                }
                children.retain(|c| c != ".wh..wh..opq");
                e.opaque = Some(opaque);
            }
            out.insert(rel.to_string(), e);
            for c in children {
                let crel = if rel == "." {
                    c.clone()
                } else {
                    format!("{rel}/{c}")
                };
                walk(&p.join(&c), &crel, mode, out);
            }
            return;
        }
        _ => {}
    }
    out.insert(rel.to_string(), e);
}

fn show_xattrs(x: &BTreeMap<String, Vec<u8>>) -> String {
    let v: Vec<String> = x
        .iter()
        .map(|(k, v)| format!("{k}={:?}", String::from_utf8_lossy(v)))
        .collect();
    format!("{{{}}}", v.join(", "))
}

/// Every difference between two snapshots, one readable line each.
pub fn diff(la: &str, a: &Snapshot, lb: &str, b: &Snapshot) -> Vec<String> {
    let mut out = Vec::new();
    for (path, ea) in &a.entries {
        let Some(eb) = b.entries.get(path) else {
            out.push(format!("{path}: only in {la} ({:?})", ea.kind));
            continue;
        };
        let mut field = |name: &str, va: String, vb: String| {
            if va != vb {
                out.push(format!("{path}: {name}: {la} {va} vs {lb} {vb}"));
            }
        };
        field("type", format!("{:?}", ea.kind), format!("{:?}", eb.kind));
        if ea.kind != eb.kind {
            continue;
        }
        field(
            "mode",
            format!("{:04o}", ea.mode),
            format!("{:04o}", eb.mode),
        );
        field(
            "owner",
            format!("{}:{}", ea.uid, ea.gid),
            format!("{}:{}", eb.uid, eb.gid),
        );
        field("size", format!("{:?}", ea.size), format!("{:?}", eb.size));
        field(
            "content",
            format!("{:?}", ea.content),
            format!("{:?}", eb.content),
        );
        field(
            "symlink target",
            format!("{:?}", ea.target),
            format!("{:?}", eb.target),
        );
        field("rdev", format!("{:?}", ea.rdev), format!("{:?}", eb.rdev));
        if let (Some(na), Some(nb)) = (ea.nlink, eb.nlink) {
            field("st_nlink", na.to_string(), nb.to_string());
        }
        field("xattrs", show_xattrs(&ea.xattrs), show_xattrs(&eb.xattrs));
        field(
            "opaque",
            format!("{:?}", ea.opaque),
            format!("{:?}", eb.opaque),
        );
        field(
            "errors",
            format!("{:?}", ea.errors),
            format!("{:?}", eb.errors),
        );
        if let (Some(ta), Some(tb)) = (ea.mtime, eb.mtime) {
            // Times made by the filesystem itself ("now") differ between two runs;
            // times set by the fixture or a test must be kept exactly.
            let both_fresh = ta.0 >= FRESH_AFTER && tb.0 >= FRESH_AFTER;
            if !both_fresh {
                field(
                    "mtime",
                    format!("{}.{:09}", ta.0, ta.1),
                    format!("{}.{:09}", tb.0, tb.1),
                );
            }
        }
    }
    for (path, eb) in &b.entries {
        if !a.entries.contains_key(path) {
            out.push(format!("{path}: only in {lb} ({:?})", eb.kind));
        }
    }
    out
}

/// Panics listing every difference, if there is any.
pub fn assert_same_tree(la: &str, a: &Snapshot, lb: &str, b: &Snapshot) {
    let d = diff(la, a, lb, b);
    if !d.is_empty() {
        panic!(
            "trees differ ({la} = {}, {lb} = {}):\n  {}",
            a.root.display(),
            b.root.display(),
            d.join("\n  ")
        );
    }
}

// ---------------------------------------------------------------------------------------
// Misc helpers
// ---------------------------------------------------------------------------------------

/// A deterministic pseudo-random byte pattern.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407)
        | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

pub fn write_file(p: &Path, data: &[u8]) {
    let mut f = File::create(p).unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
    f.write_all(data).unwrap();
}
