//! Timestamps as kernel overlayfs keeps them: a write through a shared mapping moves
//! mtime and ctime (also while attributes are cached and with passthrough, the
//! default), and atime follows the mount's noatime (reads and exec).

use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use crate::fixture::{self, KernelOverlay, LayerBuilder, Layers, StrataMount, lutimes};

const OLD: i64 = 1_000_000_000;

/// A MAP_SHARED read-write mapping of the first page of a file.
struct SharedMapping {
    addr: *mut libc::c_void,
}

const PAGE: usize = 4096;

impl SharedMapping {
    fn new(f: &File) -> Self {
        // SAFETY: a fresh shared mapping of an fd open read-write, of a file at least
        // a page long; only `write` touches it, within bounds, until Drop unmaps it.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        assert_ne!(
            addr,
            libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        SharedMapping { addr }
    }

    /// Stores `byte` at offset 0 and msyncs the page.
    fn write(&self, byte: u8) {
        // SAFETY: offset 0 of a live PAGE-long writable mapping.
        unsafe {
            *(self.addr as *mut u8) = byte;
            assert_eq!(libc::msync(self.addr, PAGE, libc::MS_SYNC), 0, "msync");
        }
    }
}

impl Drop for SharedMapping {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.addr, PAGE) };
    }
}

/// mtime and ctime in nanoseconds, by stat(2): unlike Rust's metadata (statx asking
/// for every field, birth time included, which FUSE always fetches afresh), it
/// gets what the kernel has cached, as ls and most tools do.
fn times_ns(p: &Path) -> (i128, i128) {
    let c = fixture::cpath(p);
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a properly sized out-parameter.
    let r = unsafe { libc::stat(c.as_ptr(), &mut st) };
    assert_eq!(
        r,
        0,
        "stat {}: {}",
        p.display(),
        std::io::Error::last_os_error()
    );
    let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
    (
        ns(st.st_mtime, st.st_mtime_nsec),
        ns(st.st_ctime, st.st_ctime_nsec),
    )
}

/// For each of a new file and a lower one (copied up by the open): times set to
/// OLD, then written through one shared mapping three times, each write followed by msync
/// and a stat (so the mount may cache what it shows). After each write the mount
/// must show the times of the upper file (the real one the mapping wrote to).
fn mapped_writes(root: &Path, upper: &Path) -> Vec<String> {
    let mut seen = Vec::new();
    fs::write(root.join("new"), vec![b'n'; 8192]).unwrap();
    for name in ["new", "lower"] {
        let p = root.join(name);
        lutimes(&p, OLD, OLD).unwrap();
        let f = OpenOptions::new().read(true).write(true).open(&p).unwrap();
        let map = SharedMapping::new(&f);
        for round in 0..3u8 {
            // Lets the clock move on, so that a stale cached time can be told from
            // the real one; nothing here depends on how long it takes.
            std::thread::sleep(std::time::Duration::from_millis(20));
            map.write(b'a' + round);
            let (shown, real) = (times_ns(&p), times_ns(&upper.join(name)));
            seen.push(format!(
                "{name} write {round}: mtime moved {}, shown = upper {}",
                shown.0 > i128::from(OLD) * 1_000_000_000,
                shown == real
            ));
        }
        drop(map);
        drop(f);
        let (shown, real) = (times_ns(&p), times_ns(&upper.join(name)));
        seen.push(format!(
            "{name} after close: shown = upper {}",
            shown == real
        ));
    }
    seen
}

fn layers() -> Layers {
    let prog = fs::read("/bin/true").expect("read /bin/true");
    let l = Layers::new(&[LayerBuilder::new()
        .file("lower", vec![b'l'; 8192])
        .file("prog", prog)]);
    fs::set_permissions(&l.root, fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(l.lowers[0].join("prog"), fs::Permissions::from_mode(0o755)).unwrap();
    l
}

#[test]
fn a_write_through_a_shared_mapping_moves_mtime_and_ctime_as_on_kernel_overlayfs() {
    if !fixture::require_fuse() || !fixture::require_kernel_overlay() {
        return;
    }
    let lk = layers();
    let mut k = KernelOverlay::new(&lk);
    let on_kernel = mapped_writes(k.path(), &lk.upper);
    k.unmount();
    assert!(
        on_kernel.iter().all(|s| !s.contains("false")),
        "kernel overlayfs: {on_kernel:#?}"
    );
    let ls = layers();
    let mut s = StrataMount::new(&ls);
    let on_strata = mapped_writes(s.path(), &ls.upper);
    s.unmount();
    assert_eq!(on_strata, on_kernel);
}

/// Sets atime to OLD, then reads `name` whole, or runs it if it is "prog" (twice:
/// the second time may be served from the page cache); returns whether atime moved.
fn atime_moves_on_read(root: &Path, name: &str) -> bool {
    let p = root.join(name);
    let md = fs::metadata(&p).unwrap();
    lutimes(&p, OLD, md.mtime()).unwrap();
    for _ in 0..2 {
        if name == "prog" {
            let st = std::process::Command::new(&p).status().unwrap();
            assert!(st.success(), "{}: {st}", p.display());
        } else {
            let mut s = Vec::new();
            File::open(&p).unwrap().read_to_end(&mut s).unwrap();
        }
    }
    fs::metadata(&p).unwrap().atime() != OLD
}

#[test]
fn atime_follows_noatime_and_relatime_as_on_kernel_overlayfs() {
    if !fixture::require_fuse() || !fixture::require_kernel_overlay() {
        return;
    }
    for (fuse_opt, expect) in [("noatime", false), ("relatime", true)] {
        let ls = layers();
        let opts = format!("{},{fuse_opt}", ls.rw_options());
        let s = StrataMount::with_options(&opts, &ls.merged, &ls.root);
        fs::write(s.join("new"), "made here").unwrap();
        for name in ["lower", "new", "prog"] {
            assert_eq!(
                atime_moves_on_read(s.path(), name),
                expect,
                "{fuse_opt}: atime of {name} after reads"
            );
        }
        drop(s);
        let lk = layers();
        let mut k = KernelOverlay::with_extra_options(&lk, fuse_opt);
        fs::write(k.join("new"), "made here").unwrap();
        let on_kernel: Vec<bool> = ["lower", "new", "prog"]
            .iter()
            .map(|n| atime_moves_on_read(k.path(), n))
            .collect();
        k.unmount();
        assert_eq!(
            on_kernel,
            vec![expect; 3],
            "kernel overlayfs with {fuse_opt}"
        );
    }
}
