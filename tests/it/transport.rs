//! Which transport carries the requests: /dev/fuse by default; with `io_uring=1`,
//! FUSE-over-io_uring where the kernel offers it (module parameter
//! fuse.enable_uring), else /dev/fuse. Both serve the same filesystem (scripts/test
//! also runs the mounted modules and pjdfstest with `io_uring=1`).
//!
//! These tests set the module parameter themselves and put it back. It is read by
//! the kernel only when a connection starts, so a mount of another test starting
//! meanwhile may get the other transport; every test passes on both.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::Mutex;

use crate::fixture::{self, FUSE_ENABLE_URING, LayerBuilder, Layers, StrataMount};

/// One test at a time changes the parameter.
static PARAMETER: Mutex<()> = Mutex::new(());

/// Sets fuse.enable_uring for the life of the guard, then restores it.
struct UringParameter {
    before: String,
    _serial: std::sync::MutexGuard<'static, ()>,
}

impl UringParameter {
    fn set(on: bool) -> Self {
        let serial = PARAMETER.lock().unwrap_or_else(|e| e.into_inner());
        let before = fs::read_to_string(FUSE_ENABLE_URING).expect("read fuse.enable_uring");
        fs::write(FUSE_ENABLE_URING, if on { "Y" } else { "N" }).expect("set fuse.enable_uring");
        UringParameter {
            before: before.trim().to_string(),
            _serial: serial,
        }
    }
}

impl Drop for UringParameter {
    fn drop(&mut self) {
        let _ = fs::write(FUSE_ENABLE_URING, &self.before);
    }
}

fn layers() -> Layers {
    Layers::new(&[LayerBuilder::new()
        .file("etc/motd", b"lower motd\n")
        .file("etc/hosts", b"127.0.0.1 localhost\n")
        .dir("var/lib")])
}

/// A little of everything a container does, checked through the mount and in the
/// upper layer: lookups, reads, copy-up by append, creates, renames, a symlink, a
/// whiteout, xattrs, listings and chmod.
fn exercise(m: &StrataMount, upper: &Path) {
    assert_eq!(fs::read(m.join("etc/motd")).unwrap(), b"lower motd\n");
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(m.join("etc/motd"))
        .unwrap();
    std::io::Write::write_all(&mut f, b"appended\n").unwrap();
    drop(f);
    assert_eq!(
        fs::read(m.join("etc/motd")).unwrap(),
        b"lower motd\nappended\n"
    );
    assert_eq!(
        fs::read(upper.join("etc/motd")).unwrap(),
        b"lower motd\nappended\n"
    );
    for i in 0..50 {
        fs::write(m.join(&format!("var/lib/f{i}")), format!("{i}")).unwrap();
    }
    fs::rename(m.join("var/lib/f0"), m.join("var/lib/renamed")).unwrap();
    std::os::unix::fs::symlink("../etc/hosts", m.join("var/hosts")).unwrap();
    assert_eq!(
        fs::read_link(m.join("var/hosts")).unwrap(),
        Path::new("../etc/hosts")
    );
    fs::remove_file(m.join("etc/hosts")).unwrap();
    assert!(!m.join("etc/hosts").exists());
    let whiteout = fs::symlink_metadata(upper.join("etc/hosts")).unwrap();
    assert_eq!(
        (whiteout.mode() & libc::S_IFMT, whiteout.rdev()),
        (libc::S_IFCHR, 0)
    );
    assert_eq!(fs::read_dir(m.join("var/lib")).unwrap().count(), 50);
    fs::set_permissions(m.join("var/lib/f1"), fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(
        fs::metadata(m.join("var/lib/f1")).unwrap().mode() & 0o7777,
        0o600
    );
    fixture::lsetxattr(&m.join("var/lib/f2"), "user.k", b"v", 0).unwrap();
    assert_eq!(
        fixture::lgetxattr(&m.join("var/lib/f2"), "user.k").unwrap(),
        b"v"
    );
}

/// With fuse.enable_uring `offered`, mounts with `extra` options (and info-level
/// logging, which names the transport), runs [`exercise`] and unmounts. Answers
/// the daemon's log and how many `ring-*` threads it had.
fn serve_workload(offered: bool, extra: &str) -> (String, usize) {
    let _param = UringParameter::set(offered);
    let l = layers();
    let mut m = StrataMount::with_env(
        &format!("{}{extra}", l.rw_options()),
        &[],
        &[("STRATAFS_LOG", "info")],
        &l.merged,
        &l.root,
    );
    exercise(&m, &l.upper);
    let rings = fs::read_dir(format!("/proc/{}/task", m.pid()))
        .unwrap()
        .filter_map(|t| fs::read_to_string(t.unwrap().path().join("comm")).ok())
        .filter(|c| c.starts_with("ring-"))
        .count();
    assert!(m.unmount().success(), "{}", m.log_text());
    (m.log_text(), rings)
}

/// `io_uring=1` on a kernel that offers the ring: the ring carries the requests.
/// Once the INIT reply names the ring, the kernel sends no request over
/// /dev/fuse until every queue is registered, and none after, but forgets and
/// interrupts: the workload completing shows that the ring threads served it.
#[test]
fn with_io_uring_1_requests_come_over_the_ring_where_the_kernel_offers_it() {
    if !fixture::require_fuse_uring() {
        return;
    }
    let (log, rings) = serve_workload(true, ",io_uring=1");
    assert!(
        log.contains("requests over io_uring:"),
        "the daemon did not say it serves over io_uring; log:\n{log}"
    );
    assert!(rings >= 1, "no ring-* threads in the daemon; log:\n{log}");
}

/// Without the kernel's offer, `io_uring=1` serves over /dev/fuse, says so at
/// info level only, and behaves the same.
#[test]
fn with_io_uring_1_but_no_offer_requests_come_over_dev_fuse() {
    if !fixture::require_fuse_uring() {
        return;
    }
    let (log, rings) = serve_workload(false, ",io_uring=1");
    assert!(
        log.contains("INFO") && log.contains("does not offer FUSE over io_uring"),
        "the daemon did not say why it serves over /dev/fuse; log:\n{log}"
    );
    assert!(
        !log.contains("WARN"),
        "a fallback is not a warning; log:\n{log}"
    );
    assert_eq!(rings, 0, "log:\n{log}");
}

/// The default keeps requests on /dev/fuse even where the ring is offered, and
/// `io_uring=0` says the same explicitly.
#[test]
fn by_default_requests_stay_on_dev_fuse_even_where_the_ring_is_offered() {
    if !fixture::require_fuse_uring() {
        return;
    }
    for extra in ["", ",io_uring=0"] {
        let (log, rings) = serve_workload(true, extra);
        assert!(log.contains("config: transport /dev/fuse"), "{log}");
        assert_eq!(rings, 0, "log:\n{log}");
    }
}
