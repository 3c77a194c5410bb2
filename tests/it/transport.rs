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

use crate::fixture::{self, LayerBuilder, Layers, StrataMount};

const ENABLE_URING: &str = "/sys/module/fuse/parameters/enable_uring";

/// One test at a time changes the parameter.
static PARAMETER: Mutex<()> = Mutex::new(());

/// Sets fuse.enable_uring for the life of the guard, then restores it.
struct UringParameter {
    before: String,
    _serial: std::sync::MutexGuard<'static, ()>,
}

impl UringParameter {
    /// None (the test then passes vacuously, saying why) on a kernel without FUSE
    /// over io_uring (before 6.14, or built without CONFIG_FUSE_IO_URING).
    fn set(on: bool) -> Option<Self> {
        let serial = PARAMETER.lock().unwrap_or_else(|e| e.into_inner());
        let Ok(before) = fs::read_to_string(ENABLE_URING) else {
            eprintln!("skipped: {ENABLE_URING} missing (no FUSE over io_uring in this kernel)");
            return None;
        };
        fs::write(ENABLE_URING, if on { "Y" } else { "N" }).expect("set fuse.enable_uring");
        Some(UringParameter {
            before: before.trim().to_string(),
            _serial: serial,
        })
    }
}

impl Drop for UringParameter {
    fn drop(&mut self) {
        let _ = fs::write(ENABLE_URING, &self.before);
    }
}

fn layers() -> Layers {
    Layers::new(&[LayerBuilder::new()
        .file("etc/motd", b"lower motd\n")
        .file("etc/hosts", b"127.0.0.1 localhost\n")
        .dir("var/lib")])
}

/// The daemon with `extra` options and info-level logging, which names the
/// transport it got.
fn mount(l: &Layers, extra: &str) -> StrataMount {
    StrataMount::with_env(
        &format!("{}{extra}", l.rw_options()),
        &[],
        &[("STRATAFS_LOG", "info")],
        &l.merged,
        &l.root,
    )
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

/// Names of the daemon's threads.
fn thread_names(pid: u32) -> Vec<String> {
    fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| fs::read_to_string(t.unwrap().path().join("comm")).ok())
        .map(|c| c.trim().to_string())
        .collect()
}

/// `io_uring=1` on a kernel that offers the ring: the ring carries the requests.
/// Once the INIT reply names the ring, the kernel sends no request over
/// /dev/fuse until every queue is registered, and none after, but forgets and
/// interrupts: the workload completing shows that the ring threads served it.
#[test]
fn with_io_uring_1_requests_come_over_the_ring_where_the_kernel_offers_it() {
    if !fixture::require_fuse() {
        return;
    }
    let Some(_param) = UringParameter::set(true) else {
        return;
    };
    let l = layers();
    let mut m = mount(&l, ",io_uring=1");
    exercise(&m, &l.upper);
    let log = m.log_text();
    assert!(
        log.contains("requests over io_uring:"),
        "the daemon did not say it serves over io_uring; log:\n{log}"
    );
    let rings = thread_names(m.pid())
        .into_iter()
        .filter(|n| n.starts_with("ring-"))
        .count();
    assert!(rings >= 1, "no ring-* threads in the daemon");
    assert!(m.unmount().success(), "{}", m.log_text());
}

/// Without the kernel's offer, `io_uring=1` serves over /dev/fuse, says so at
/// info level only, and behaves the same.
#[test]
fn with_io_uring_1_but_no_offer_requests_come_over_dev_fuse() {
    if !fixture::require_fuse() {
        return;
    }
    let Some(_param) = UringParameter::set(false) else {
        return;
    };
    let l = layers();
    let mut m = mount(&l, ",io_uring=1");
    exercise(&m, &l.upper);
    let log = m.log_text();
    assert!(
        log.contains("INFO") && log.contains("does not offer FUSE over io_uring"),
        "the daemon did not say why it serves over /dev/fuse; log:\n{log}"
    );
    assert!(
        !log.contains("WARN"),
        "a fallback is not a warning; log:\n{log}"
    );
    assert!(!thread_names(m.pid()).iter().any(|n| n.starts_with("ring-")));
    assert!(m.unmount().success(), "{}", m.log_text());
}

/// The default keeps requests on /dev/fuse even where the ring is offered, and
/// `io_uring=0` says the same explicitly.
#[test]
fn by_default_requests_stay_on_dev_fuse_even_where_the_ring_is_offered() {
    if !fixture::require_fuse() {
        return;
    }
    let Some(_param) = UringParameter::set(true) else {
        return;
    };
    for extra in ["", ",io_uring=0"] {
        let l = layers();
        let mut m = mount(&l, extra);
        exercise(&m, &l.upper);
        assert!(
            m.log_text().contains("config: transport /dev/fuse"),
            "{}",
            m.log_text()
        );
        assert!(!thread_names(m.pid()).iter().any(|n| n.starts_with("ring-")));
        assert!(m.unmount().success(), "{}", m.log_text());
    }
}
