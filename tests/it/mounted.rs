//! Behaviour of a stratafs mount on its own: read-only mounts, special files, readdir,
//! private xattrs, copy-up fidelity, statfs, sparse files, fallocate, copy_file_range,
//! O_APPEND, daemon mode, signals, concurrency.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{CStr, OsStr};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};

use libc::{EEXIST, ENODATA, ENOENT, ENXIO, EPERM, EROFS};
use stratafs::testing::is_private_xattr;

use crate::fixture::{
    self, Errno, FIXED_MTIME, FUSE_SUPER_MAGIC, Format, LayerBuilder, Layers, Meta, StrataDaemon,
    StrataMount, Tmpfs, assert_errno, cpath, errno, errno_name, io_errno, lgetxattr, llistxattr,
    lsetxattr, lstat, pattern,
};

const MIB: u64 = 1 << 20;

fn open_err(r: std::io::Result<File>) -> Errno {
    match r {
        Ok(_) => 0,
        Err(e) => io_errno(&e),
    }
}

fn io_res<T>(r: std::io::Result<T>) -> Result<(), Errno> {
    r.map(|_| ()).map_err(|e| io_errno(&e))
}

// ---------------------------------------------------------------------------------------
// libc directory streams
// ---------------------------------------------------------------------------------------

struct DirStream(*mut libc::DIR);

#[derive(Debug, Clone, PartialEq, Eq)]
struct DirEnt {
    name: String,
    d_type: u8,
}

impl DirStream {
    fn open(p: &Path) -> DirStream {
        let c = cpath(p);
        let d = unsafe { libc::opendir(c.as_ptr()) };
        assert!(
            !d.is_null(),
            "opendir {}: {}",
            p.display(),
            errno_name(errno())
        );
        DirStream(d)
    }

    fn next(&mut self) -> Option<DirEnt> {
        // SAFETY: errno reset so that end-of-stream and error can be told apart.
        unsafe { *libc::__errno_location() = 0 };
        let e = unsafe { libc::readdir(self.0) };
        if e.is_null() {
            let err = errno();
            assert_eq!(err, 0, "readdir failed: {}", errno_name(err));
            return None;
        }
        // SAFETY: readdir returned a valid entry, valid until the next call.
        let e = unsafe { &*e };
        let name = unsafe { CStr::from_ptr(e.d_name.as_ptr()) }
            .to_string_lossy()
            .into_owned();
        Some(DirEnt {
            name,
            d_type: e.d_type,
        })
    }

    fn tell(&self) -> libc::c_long {
        let pos = unsafe { libc::telldir(self.0) };
        assert!(pos >= 0, "telldir: {}", errno_name(errno()));
        pos
    }

    fn seek(&mut self, pos: libc::c_long) {
        unsafe { libc::seekdir(self.0, pos) };
    }

    fn all(&mut self) -> Vec<DirEnt> {
        let mut v = Vec::new();
        while let Some(e) = self.next() {
            v.push(e);
            assert!(v.len() < 1_000_000, "readdir does not end");
        }
        v
    }
}

impl Drop for DirStream {
    fn drop(&mut self) {
        unsafe { libc::closedir(self.0) };
    }
}

fn dtype_of(md: &fs::Metadata) -> u8 {
    let ft = md.file_type();
    if ft.is_dir() {
        libc::DT_DIR
    } else if ft.is_symlink() {
        libc::DT_LNK
    } else if ft.is_file() {
        libc::DT_REG
    } else if ft.is_fifo() {
        libc::DT_FIFO
    } else if ft.is_socket() {
        libc::DT_SOCK
    } else if ft.is_char_device() {
        libc::DT_CHR
    } else {
        libc::DT_BLK
    }
}

/// Lists `dir` with opendir/readdir; asserts `.` and `..` appear once each, no name twice,
/// and every d_type agrees with lstat. Returns the other names, sorted.
fn list_checked(dir: &Path) -> Vec<String> {
    let ents = DirStream::open(dir).all();
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for e in &ents {
        *counts.entry(&e.name).or_default() += 1;
    }
    let dups: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        dups.is_empty(),
        "{}: readdir lists names more than once: {dups:?}",
        dir.display()
    );
    assert!(
        counts.contains_key("."),
        "{}: readdir does not list `.`",
        dir.display()
    );
    assert!(
        counts.contains_key(".."),
        "{}: readdir does not list `..`",
        dir.display()
    );
    let mut names = Vec::new();
    for e in &ents {
        if e.name == "." || e.name == ".." {
            continue;
        }
        let md = lstat(&dir.join(&e.name)).unwrap_or_else(|err| {
            panic!(
                "{}: readdir lists {:?} but lstat answers {}",
                dir.display(),
                e.name,
                errno_name(err)
            )
        });
        assert!(
            e.d_type == libc::DT_UNKNOWN || e.d_type == dtype_of(&md),
            "{}: d_type of {:?} is {} but lstat says {}",
            dir.display(),
            e.name,
            e.d_type,
            dtype_of(&md)
        );
        names.push(e.name.clone());
    }
    names.sort();
    names
}

fn strs(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

// ---------------------------------------------------------------------------------------
// Read-only mounts and special files
// ---------------------------------------------------------------------------------------

#[test]
fn read_only_mount_reads_work_and_changes_answer_erofs() {
    if !fixture::require_fuse() {
        return;
    }
    let lower = LayerBuilder::new()
        .file_with("f", "content", Meta::new().xattr("user.k", "v"))
        .file("d/g", "g")
        .dir("d/empty")
        .symlink("ln", "f");
    let l = Layers::new(&[lower]);
    let before = fixture::snapshot_layer(&l.lowers[0]);
    let m = StrataMount::read_only(&l);
    let p = |r: &str| m.join(r);

    assert_eq!(fs::read(p("f")).unwrap(), b"content");
    assert_eq!(fs::read(p("ln")).unwrap(), b"content");
    assert_eq!(fs::read_to_string(p("d/g")).unwrap(), "g");
    assert_eq!(list_checked(&p("d")), strs(&["empty", "g"]));
    assert_eq!(lgetxattr(&p("f"), "user.k").unwrap(), b"v");

    let w = |r: &str| OpenOptions::new().write(true).open(p(r));
    assert_eq!(open_err(w("f")), EROFS, "open(O_WRONLY) of a lower file");
    assert_eq!(
        open_err(OpenOptions::new().read(true).write(true).open(p("f"))),
        EROFS,
        "O_RDWR"
    );
    assert_eq!(
        open_err(
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(p("new"))
        ),
        EROFS,
        "create"
    );
    assert_errno("mkdir", io_res(fs::create_dir(p("nd"))), EROFS);
    assert_errno("unlink", io_res(fs::remove_file(p("f"))), EROFS);
    assert_errno("rmdir", io_res(fs::remove_dir(p("d/empty"))), EROFS);
    assert_errno("rename", io_res(fs::rename(p("f"), p("f2"))), EROFS);
    assert_errno("chmod", fixture::chmod(&p("f"), 0o600), EROFS);
    assert_errno("chown", fixture::lchown(&p("f"), 1, 1), EROFS);
    assert_errno("utimes", fixture::lutimes(&p("f"), 5, 5), EROFS);
    assert_errno("setxattr", lsetxattr(&p("f"), "user.x", b"1", 0), EROFS);
    assert_errno(
        "removexattr",
        fixture::lremovexattr(&p("f"), "user.k"),
        EROFS,
    );
    assert_errno(
        "symlink",
        io_res(std::os::unix::fs::symlink("f", p("s"))),
        EROFS,
    );
    assert_errno("link", io_res(fs::hard_link(p("f"), p("h"))), EROFS);
    assert_errno("mkfifo", fixture::mkfifo(&p("fifo"), 0o644), EROFS);
    let c = cpath(&p("f"));
    assert_errno(
        "truncate",
        if unsafe { libc::truncate(c.as_ptr(), 0) } < 0 {
            Err(errno())
        } else {
            Ok(())
        },
        EROFS,
    );

    // Nothing changed, and reads still work after all the refusals.
    assert_eq!(fs::read(p("f")).unwrap(), b"content");
    drop(m);
    fixture::assert_same_tree(
        "lower before",
        &before,
        "lower after",
        &fixture::snapshot_layer(&l.lowers[0]),
    );
}

#[test]
fn mknod_of_a_whiteout_device_is_eperm_other_special_files_work() {
    if !fixture::require_fuse() {
        return;
    }
    let l = Layers::new(&[LayerBuilder::new().file("dev/existing", "e")]);
    let m = StrataMount::new(&l);
    let p = |r: &str| m.join(r);

    assert_errno(
        "mknod char 0/0",
        fixture::mknod(&p("dev/wh"), libc::S_IFCHR | 0o600, 0, 0),
        EPERM,
    );
    assert_eq!(
        lstat(&p("dev/wh")).err(),
        Some(ENOENT),
        "a refused whiteout mknod left a name"
    );
    assert!(
        lstat(&l.upper.join("dev/wh")).is_err(),
        "a refused mknod left something in upper"
    );

    fixture::mkfifo(&p("dev/fifo"), 0o644).expect("mkfifo");
    assert!(lstat(&p("dev/fifo")).unwrap().file_type().is_fifo());
    assert!(
        lstat(&l.upper.join("dev/fifo"))
            .unwrap()
            .file_type()
            .is_fifo()
    );

    for (name, major, minor) in [("null", 1, 3), ("zero_one", 0, 1), ("one_zero", 1, 0)] {
        fixture::mknod(
            &p(&format!("dev/{name}")),
            libc::S_IFCHR | 0o644,
            major,
            minor,
        )
        .unwrap_or_else(|e| panic!("mknod char {major}/{minor}: {}", errno_name(e)));
        for base in [m.path(), l.upper.as_path()] {
            let md = lstat(&base.join("dev").join(name)).unwrap();
            assert!(
                md.file_type().is_char_device(),
                "{name} under {}",
                base.display()
            );
            assert_eq!(
                (libc::major(md.rdev()), libc::minor(md.rdev())),
                (major, minor),
                "rdev of {name} under {}",
                base.display()
            );
        }
    }

    let sock = p("dev/sock");
    let listener = UnixListener::bind(&sock).expect("bind a unix socket on the mount");
    assert!(lstat(&sock).unwrap().file_type().is_socket());
    assert!(
        lstat(&l.upper.join("dev/sock"))
            .unwrap()
            .file_type()
            .is_socket()
    );
    let mut client = UnixStream::connect(&sock).expect("connect to the socket bound on the mount");
    let (mut server, _) = listener.accept().unwrap();
    client.write_all(b"ping").unwrap();
    let mut buf = [0u8; 4];
    server.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");

    assert_errno(
        "mknod over an existing lower name",
        fixture::mknod(&p("dev/existing"), libc::S_IFIFO | 0o644, 0, 0),
        EEXIST,
    );
    assert_eq!(
        list_checked(&p("dev")),
        strs(&["existing", "fifo", "null", "one_zero", "sock", "zero_one"])
    );
}

// ---------------------------------------------------------------------------------------
// readdir
// ---------------------------------------------------------------------------------------

#[test]
fn readdir_hides_whiteouts_and_opaque_markers_and_lists_dot_entries() {
    if !fixture::require_fuse() {
        return;
    }
    let native = LayerBuilder::new()
        .whiteout("wh_char")
        .opaque_dir("opq_x")
        .file("opq_x/visible", "v")
        .dir_with("opq_u", Meta::new().xattr("user.overlay.opaque", "y"))
        .file("opq_u/mine", "m")
        .file("dir/top", "t");
    let aufs = LayerBuilder::new()
        .whiteout("wh_aufs")
        .whiteout("dir/inner_gone")
        .opaque_dir("opq_a")
        .file("opq_a/visible", "v");
    let bottom = LayerBuilder::new()
        .file("wh_char", "hidden")
        .file("wh_aufs", "hidden")
        .file("opq_x/hidden", "hidden")
        .file("opq_u/hidden", "hidden")
        .file("opq_a/hidden", "hidden")
        .file("dir/inner", "i")
        .file("dir/inner_gone", "hidden")
        .file("plain", "p");
    let l = Layers::new(&[native, bottom]);
    // Both formats side by side in the top layer.
    aufs.build(&l.lowers[0], Format::AUFS);
    assert!(
        l.lowers[0].join(".wh.wh_aufs").exists() && l.lowers[0].join("opq_a/.wh..wh..opq").exists()
    );
    let m = StrataMount::new(&l);

    fs::remove_file(m.join("plain")).unwrap();
    fs::remove_file(m.join("dir/inner")).unwrap();
    fs::create_dir(m.join("newdir")).unwrap();

    assert_eq!(
        list_checked(m.path()),
        strs(&["dir", "newdir", "opq_a", "opq_u", "opq_x"])
    );
    assert_eq!(list_checked(&m.join("opq_x")), strs(&["visible"]));
    assert_eq!(list_checked(&m.join("opq_a")), strs(&["visible"]));
    assert_eq!(list_checked(&m.join("opq_u")), strs(&["mine"]));
    assert_eq!(list_checked(&m.join("dir")), strs(&["top"]));
    assert_eq!(list_checked(&m.join("newdir")), Vec::<String>::new());
    for hidden in [
        "wh_char",
        "wh_aufs",
        "plain",
        "dir/inner",
        "dir/inner_gone",
        "opq_a/hidden",
    ] {
        assert_eq!(
            lstat(&m.join(hidden)).err(),
            Some(ENOENT),
            "{hidden} must be hidden"
        );
    }
    // The whiteouts made through the mount are real, and still hidden after a remount.
    assert!(
        lstat(&l.upper.join("plain"))
            .unwrap()
            .file_type()
            .is_char_device()
    );
    drop(m);
    let m = StrataMount::new(&l);
    assert_eq!(
        list_checked(m.path()),
        strs(&["dir", "newdir", "opq_a", "opq_u", "opq_x"])
    );
    assert_eq!(list_checked(&m.join("dir")), strs(&["top"]));
}

/// A directory big enough to need several getdents calls, merged from three layers.
fn big_merged_dir() -> Layers {
    let mut bottom = LayerBuilder::new();
    let mut top = LayerBuilder::new();
    let mut upper = LayerBuilder::new();
    for i in 0..700 {
        bottom = bottom.file(&format!("big/bottom_entry_{i:04}"), "b");
        top = top.file(&format!("big/top_entry_{i:04}"), "t");
        if i < 600 {
            upper = upper.file(&format!("big/upper_entry_{i:04}"), "u");
        }
        if i % 7 == 0 {
            top = top.whiteout(&format!("big/bottom_entry_{i:04}"));
        }
        if i % 5 == 0 {
            // The same name in two layers: listed once.
            bottom = bottom.file(&format!("big/shared_{i:04}"), "b");
            top = top.file(&format!("big/shared_{i:04}"), "t");
        }
    }
    Layers::build(&[top, bottom], Some(&upper), Format::NATIVE)
}

fn expected_big_names() -> BTreeSet<String> {
    let mut s = BTreeSet::new();
    for i in 0..700 {
        if i % 7 != 0 {
            s.insert(format!("bottom_entry_{i:04}"));
        }
        s.insert(format!("top_entry_{i:04}"));
        if i < 600 {
            s.insert(format!("upper_entry_{i:04}"));
        }
        if i % 5 == 0 {
            s.insert(format!("shared_{i:04}"));
        }
    }
    s
}

#[test]
fn readdir_offsets_are_stable_across_telldir_and_seekdir() {
    if !fixture::require_fuse() {
        return;
    }
    let l = big_merged_dir();
    let m = StrataMount::new(&l);
    let dir = m.join("big");
    let expected = expected_big_names();

    let mut ds = DirStream::open(&dir);
    let start = ds.tell();
    let mut seq: Vec<(String, libc::c_long)> = Vec::new();
    while let Some(e) = ds.next() {
        let pos = ds.tell();
        seq.push((e.name, pos));
        assert!(
            seq.len() <= expected.len() + 2,
            "readdir returns more entries than exist"
        );
    }
    let names: Vec<&str> = seq.iter().map(|(n, _)| n.as_str()).collect();
    let set: BTreeSet<String> = names
        .iter()
        .filter(|n| **n != "." && **n != "..")
        .map(|n| n.to_string())
        .collect();
    assert_eq!(
        set.len() + 2,
        names.len(),
        "duplicates or missing dot entries in a full listing"
    );
    assert_eq!(set, expected, "merged listing of big/");

    // Read half, remember, continue; seek back: the same entries follow.
    for frac in [1usize, 3, 5, 7] {
        let cut = seq.len() * frac / 8;
        let pos = seq[cut - 1].1;
        ds.seek(pos);
        let rest: Vec<String> = ds.all().into_iter().map(|e| e.name).collect();
        let want: Vec<String> = seq[cut..].iter().map(|(n, _)| n.clone()).collect();
        assert_eq!(
            rest.len(),
            want.len(),
            "after seekdir to the position after entry {cut}"
        );
        assert!(
            rest == want,
            "after seekdir to the position after entry {cut}: different entries"
        );
    }
    // Back to the very start.
    ds.seek(start);
    let again: Vec<String> = ds.all().into_iter().map(|e| e.name).collect();
    assert!(
        again == names,
        "seekdir to the start position does not replay the listing"
    );

    // A fresh stream: read half, tell, read on, seek back.
    let mut ds2 = DirStream::open(&dir);
    let half = seq.len() / 2;
    for _ in 0..half {
        ds2.next().unwrap();
    }
    let pos = ds2.tell();
    let first: Vec<String> = ds2.all().into_iter().map(|e| e.name).collect();
    ds2.seek(pos);
    let second: Vec<String> = ds2.all().into_iter().map(|e| e.name).collect();
    assert_eq!(first.len(), seq.len() - half);
    assert!(
        first == second,
        "seeking back to a telldir position gives different entries"
    );
}

#[test]
fn readdir_of_a_directory_modified_while_read_does_not_loop() {
    if !fixture::require_fuse() {
        return;
    }
    let mut lower = LayerBuilder::new();
    for i in 0..1000 {
        lower = lower.file(&format!("busy/orig_{i:04}"), "o");
    }
    let l = Layers::new(&[lower]);
    let m = StrataMount::new(&l);
    let dir = m.join("busy");
    let originals: BTreeSet<String> = (0..1000).map(|i| format!("orig_{i:04}")).collect();

    let mut ds = DirStream::open(&dir);
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut created = 0usize;
    let mut reads = 0usize;
    while let Some(e) = ds.next() {
        reads += 1;
        assert!(reads < 20_000, "readdir keeps returning entries: it loops");
        *seen.entry(e.name.clone()).or_default() += 1;
        if originals.contains(&e.name) {
            // Remove what was just read (so no unread entry changes) and add a new one.
            fs::remove_file(dir.join(&e.name)).unwrap();
            File::create(dir.join(format!("new_{created:05}"))).unwrap();
            created += 1;
        }
    }
    let dups: Vec<_> = seen
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(k, _)| k)
        .collect();
    assert!(
        dups.is_empty(),
        "entries returned twice by one pass: {dups:?}"
    );
    let missed: Vec<_> = originals
        .iter()
        .filter(|n| !seen.contains_key(*n))
        .collect();
    assert!(
        missed.is_empty(),
        "{} entries that were never removed nor added were skipped, e.g. {:?}",
        missed.len(),
        &missed[..missed.len().min(5)]
    );
    assert_eq!(created, 1000);
    drop(ds);
    let now = list_checked(&dir);
    assert_eq!(now.len(), 1000);
    assert!(now.iter().all(|n| n.starts_with("new_")));
}

// ---------------------------------------------------------------------------------------
// xattrs
// ---------------------------------------------------------------------------------------

const PRIVATE: [&str; 6] = [
    "trusted.overlay.foo",
    "trusted.overlay.opaque",
    "user.overlay.bar",
    "user.overlay.opaque",
    "user.fuseoverlayfs.baz",
    "user.stratafs.qux",
];

fn assert_no_private_xattrs(p: &Path) {
    let names =
        llistxattr(p).unwrap_or_else(|e| panic!("listxattr {}: {}", p.display(), errno_name(e)));
    let leaked: Vec<_> = names
        .iter()
        .filter(|n| is_private_xattr(OsStr::new(n)))
        .collect();
    assert!(
        leaked.is_empty(),
        "{}: listxattr shows private names {leaked:?}",
        p.display()
    );
    for n in PRIVATE {
        assert_eq!(
            lgetxattr(p, n).err(),
            Some(ENODATA),
            "{}: getxattr {n} must answer ENODATA",
            p.display()
        );
    }
}

#[test]
fn private_xattrs_are_hidden_from_listxattr_and_getxattr() {
    if !fixture::require_fuse() {
        return;
    }
    let mut meta = Meta::new().xattr("user.visible", "1");
    for n in PRIVATE {
        if !n.ends_with("opaque") {
            meta = meta.xattr(n, "x");
        }
    }
    let lower = LayerBuilder::new()
        .file_with("f", "data", meta)
        .opaque_dir("d")
        .dir_with(
            "du",
            Meta::new()
                .xattr("user.overlay.opaque", "y")
                .xattr("user.visible", "d"),
        )
        .file("gone", "g")
        .file("dir_gone/x", "x");
    let l = Layers::new(&[lower]);
    let m = StrataMount::new(&l);
    let f = m.join("f");

    assert_eq!(lgetxattr(&f, "user.visible").unwrap(), b"1");
    assert!(
        llistxattr(&f)
            .unwrap()
            .contains(&"user.visible".to_string())
    );
    assert_no_private_xattrs(&f);
    assert_no_private_xattrs(&m.join("d"));
    assert_no_private_xattrs(&m.join("du"));
    assert_no_private_xattrs(m.path());

    // After copy-up, and on things stratafs itself marks (opaque dirs over whiteouts).
    OpenOptions::new()
        .append(true)
        .open(&f)
        .unwrap()
        .write_all(b"+")
        .unwrap();
    assert!(
        lstat(&l.upper.join("f")).is_ok(),
        "append did not copy f up"
    );
    assert_eq!(lgetxattr(&f, "user.visible").unwrap(), b"1");
    assert_no_private_xattrs(&f);
    fs::remove_file(m.join("gone")).unwrap();
    fs::create_dir(m.join("gone")).unwrap();
    assert_no_private_xattrs(&m.join("gone"));
    fs::remove_file(m.join("dir_gone/x")).unwrap();
    fs::remove_dir(m.join("dir_gone")).unwrap();
    fs::create_dir(m.join("dir_gone")).unwrap();
    assert_no_private_xattrs(&m.join("dir_gone"));
    assert_eq!(list_checked(&m.join("dir_gone")), Vec::<String>::new());
    assert_no_private_xattrs(&m.join("du"));
    fixture::lsetxattr(&m.join("du"), "user.new", b"n", 0).unwrap();
    assert_no_private_xattrs(&m.join("du"));
    let mut listed = llistxattr(&m.join("du")).unwrap();
    listed.sort();
    assert_eq!(listed, strs(&["user.new", "user.visible"]));
}

// ---------------------------------------------------------------------------------------
// copy-up fidelity
// ---------------------------------------------------------------------------------------

#[test]
fn copy_up_keeps_sparse_files_sparse() {
    if !fixture::require_fuse() {
        return;
    }
    let lower = LayerBuilder::new().sparse(
        "sparse",
        100 * MIB,
        &[(50 * MIB, &[0xAB; 4096][..])],
        Meta::new(),
    );
    let l = Layers::new(&[lower]);
    let lower_blocks = lstat(&l.lowers[0].join("sparse")).unwrap().blocks();
    assert!(
        lower_blocks * 512 < MIB,
        "the fixture file is not sparse ({lower_blocks} blocks)"
    );
    let m = StrataMount::new(&l);
    let f = OpenOptions::new()
        .write(true)
        .open(m.join("sparse"))
        .unwrap();
    f.write_all_at(b"X", 0).unwrap();
    drop(f);

    let up = lstat(&l.upper.join("sparse")).expect("the written file is in upper");
    assert_eq!(up.size(), 100 * MIB);
    assert!(
        up.blocks() * 512 <= 2 * MIB,
        "copy-up filled the holes: upper file uses {} KiB for 8 KiB of data",
        up.blocks() / 2
    );
    let merged = lstat(&m.join("sparse")).unwrap();
    assert_eq!(merged.size(), 100 * MIB);
    assert!(
        merged.blocks() * 512 <= 2 * MIB,
        "merged st_blocks {}",
        merged.blocks()
    );

    let r = File::open(m.join("sparse")).unwrap();
    let mut buf = vec![0u8; 4096];
    r.read_exact_at(&mut buf, 50 * MIB).unwrap();
    assert!(
        buf.iter().all(|b| *b == 0xAB),
        "data at 50 MiB lost in copy-up"
    );
    r.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(buf[0], b'X');
    assert!(buf[1..].iter().all(|b| *b == 0));
    r.read_exact_at(&mut buf, 70 * MIB).unwrap();
    assert!(buf.iter().all(|b| *b == 0));
}

#[test]
fn copy_up_keeps_mode_owner_mtime_and_xattrs() {
    if !fixture::require_fuse() {
        return;
    }
    let lower = LayerBuilder::new()
        .dir_with(
            "dir",
            Meta::new()
                .mode(0o750)
                .owner(321, 654)
                .xattr("user.dirx", "D")
                .mtime(1_111_111_111),
        )
        .file_with(
            "dir/file",
            "payload",
            Meta::new()
                .mode(0o741)
                .owner(1234, 4321)
                .xattr("user.a", "alpha")
                .xattr("user.b", vec![0u8, 1, 2, 255])
                .xattr("trusted.custom", "t")
                .mtime(1_234_567_890),
        )
        .file_with(
            "dir/suid",
            "s",
            Meta::new()
                .owner(1000, 1000)
                .mode(0o6755)
                .mtime(1_222_222_222),
        )
        .symlink_with(
            "dir/link",
            "file",
            Meta::new().owner(77, 88).mtime(1_333_333_333),
        );
    let l = Layers::new(&[lower]);
    let m = StrataMount::new(&l);

    // Copy-ups that change neither data nor times: an xattr, a hard link, an open for write.
    lsetxattr(&m.join("dir/file"), "user.trigger", b"1", 0).unwrap();
    fs::hard_link(m.join("dir/suid"), m.join("dir/suid_link")).unwrap();
    drop(
        OpenOptions::new()
            .write(true)
            .open(m.join("dir/suid"))
            .unwrap(),
    );
    fixture::lchown(&m.join("dir/link"), 77, 88).unwrap();

    for base in [l.upper.as_path(), m.path()] {
        let at = |r: &str| {
            lstat(&base.join(r))
                .unwrap_or_else(|e| panic!("{r} under {}: {}", base.display(), errno_name(e)))
        };
        let f = at("dir/file");
        assert_eq!(
            f.mode() & 0o7777,
            0o741,
            "mode of dir/file under {}",
            base.display()
        );
        assert_eq!(
            (f.uid(), f.gid()),
            (1234, 4321),
            "owner of dir/file under {}",
            base.display()
        );
        assert_eq!(
            f.mtime(),
            1_234_567_890,
            "mtime of dir/file under {}",
            base.display()
        );
        assert_eq!(fs::read(base.join("dir/file")).unwrap(), b"payload");
        let x = |n: &str| lgetxattr(&base.join("dir/file"), n);
        assert_eq!(x("user.a").unwrap(), b"alpha", "under {}", base.display());
        assert_eq!(
            x("user.b").unwrap(),
            vec![0u8, 1, 2, 255],
            "under {}",
            base.display()
        );
        assert_eq!(x("user.trigger").unwrap(), b"1", "under {}", base.display());

        let s = at("dir/suid");
        assert_eq!(
            s.mode() & 0o7777,
            0o6755,
            "setuid/setgid lost in copy-up under {}",
            base.display()
        );
        assert_eq!((s.uid(), s.gid()), (1000, 1000));
        assert_eq!(
            s.mtime(),
            1_222_222_222,
            "mtime of dir/suid under {}",
            base.display()
        );
        assert_eq!(s.nlink(), 2, "dir/suid has a second link");

        let ln = at("dir/link");
        assert!(ln.file_type().is_symlink());
        assert_eq!((ln.uid(), ln.gid()), (77, 88));
        assert_eq!(
            fs::read_link(base.join("dir/link")).unwrap(),
            Path::new("file")
        );

        let d = at("dir");
        assert_eq!(
            d.mode() & 0o7777,
            0o750,
            "mode of the copied-up parent under {}",
            base.display()
        );
        assert_eq!(
            (d.uid(), d.gid()),
            (321, 654),
            "owner of the copied-up parent"
        );
        assert_eq!(lgetxattr(&base.join("dir"), "user.dirx").unwrap(), b"D");
    }
    // trusted.* xattrs are copied up too (kernel overlayfs does).
    assert_eq!(
        lgetxattr(&l.upper.join("dir/file"), "trusted.custom").unwrap(),
        b"t"
    );
}

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let md = fs::symlink_metadata(e.path()).unwrap();
        if md.is_dir() {
            files_under(&e.path(), out);
        } else {
            out.push(e.path());
        }
    }
}

#[test]
fn copy_up_leaves_the_file_in_upper_and_nothing_in_workdir() {
    if !fixture::require_fuse() {
        return;
    }
    let big = pattern((8 * MIB) as usize, 8);
    let lower = LayerBuilder::new()
        .file("a/b/c/small", "small")
        .file("a/big", &big)
        .symlink("a/link", "big")
        .file("gone/x", "x")
        .file("mv/src", "src")
        .dir("chm");
    let l = Layers::new(&[lower]);
    let m = StrataMount::new(&l);

    OpenOptions::new()
        .append(true)
        .open(m.join("a/b/c/small"))
        .unwrap()
        .write_all(b"!")
        .unwrap();
    OpenOptions::new()
        .write(true)
        .open(m.join("a/big"))
        .unwrap()
        .write_all_at(b"Z", 4 * MIB)
        .unwrap();
    fixture::lchown(&m.join("a/link"), 5, 5).unwrap();
    fs::remove_file(m.join("gone/x")).unwrap();
    fs::remove_dir(m.join("gone")).unwrap();
    fs::rename(m.join("mv/src"), m.join("mv/dst")).unwrap();
    fixture::chmod(&m.join("chm"), 0o711).unwrap();

    assert_eq!(fs::read(l.upper.join("a/b/c/small")).unwrap(), b"small!");
    let mut want = big.clone();
    want[(4 * MIB) as usize] = b'Z';
    assert!(
        fs::read(l.upper.join("a/big")).unwrap() == want,
        "upper a/big content"
    );
    assert!(
        lstat(&l.upper.join("a/link"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert!(
        lstat(&l.upper.join("gone"))
            .unwrap()
            .file_type()
            .is_char_device()
    );
    assert_eq!(fs::read(l.upper.join("mv/dst")).unwrap(), b"src");
    assert_eq!(lstat(&l.upper.join("chm")).unwrap().mode() & 0o7777, 0o711);

    let left = leftovers_beside_the_shared_whiteout(&l.work, &l.upper.join("gone"));
    assert!(
        left.is_empty(),
        "leftovers in the workdir after copy-ups: {left:?}"
    );
    let work_work = l.work.join("work");
    if work_work.exists() {
        assert!(
            fixture::names(&work_work).is_empty(),
            "workdir/work is not empty"
        );
    }
    drop(m);
    let left = leftovers_beside_the_shared_whiteout(&l.work, &l.upper.join("gone"));
    assert!(
        left.is_empty(),
        "leftovers in the workdir after unmount: {left:?}"
    );
}

/// The files under `workdir` but the whiteout that whiteouts are links of, which
/// stays there as kernel overlayfs's does: it must be a char device 0/0 (no data)
/// and the same inode as the upper whiteout `whiteout`.
fn leftovers_beside_the_shared_whiteout(workdir: &Path, whiteout: &Path) -> Vec<PathBuf> {
    let shared = workdir.join("#stratafs-whiteout");
    let mut left = Vec::new();
    files_under(workdir, &mut left);
    left.retain(|p| *p != shared);
    let (s, w) = (lstat(&shared).unwrap(), lstat(whiteout).unwrap());
    assert!(
        s.file_type().is_char_device() && s.rdev() == 0,
        "{shared:?}"
    );
    assert_eq!(
        (s.dev(), s.ino()),
        (w.dev(), w.ino()),
        "{whiteout:?} is not a link of it"
    );
    left
}

// ---------------------------------------------------------------------------------------
// statfs, sparse files, fallocate, copy_file_range, O_APPEND
// ---------------------------------------------------------------------------------------

fn statvfs(p: &Path) -> libc::statvfs {
    let c = cpath(p);
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(
        unsafe { libc::statvfs(c.as_ptr(), &mut st) },
        0,
        "statvfs {}: {}",
        p.display(),
        errno_name(errno())
    );
    st
}

#[test]
fn statfs_reports_the_upper_filesystem() {
    if !fixture::require_fuse() {
        return;
    }
    let l = Layers::new(&[LayerBuilder::new().file("f", "lower")]);
    // The upper on its own 64 MiB tmpfs, the lower on the disk: the two are told apart.
    let tmpfs = Tmpfs::new(&l.root.join("upperfs"), "64m");
    let (upper, work) = (tmpfs.path.join("upper"), tmpfs.path.join("work"));
    fs::create_dir(&upper).unwrap();
    fs::create_dir(&work).unwrap();
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        l.lowerdir(),
        upper.display(),
        work.display()
    );
    let m = StrataMount::with_options(&opts, &l.merged, &l.root);

    let merged = statvfs(m.path());
    let up = statvfs(&tmpfs.path);
    let low = statvfs(&l.lowers[0]);
    let bytes = |s: &libc::statvfs, n: u64| n as u128 * s.f_frsize as u128;
    assert_ne!(
        bytes(&up, up.f_blocks),
        bytes(&low, low.f_blocks),
        "test bug"
    );
    assert_eq!(
        bytes(&merged, merged.f_blocks as u64),
        bytes(&up, up.f_blocks),
        "total size: merged {} blocks of {} vs upper tmpfs {} blocks of {}",
        merged.f_blocks,
        merged.f_frsize,
        up.f_blocks,
        up.f_frsize
    );
    let st = fixture::statfs(m.path()).unwrap();
    assert_eq!(st.f_type as i64, FUSE_SUPER_MAGIC);

    // Filling the upper shows in the merged free space.
    let data = vec![7u8; (16 * MIB) as usize];
    let mut f = File::create(m.join("fill")).unwrap();
    f.write_all(&data).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let merged = statvfs(m.path());
    let up = statvfs(&tmpfs.path);
    let free_m = bytes(&merged, merged.f_bfree as u64);
    let free_u = bytes(&up, up.f_bfree);
    assert!(
        free_m.abs_diff(free_u) <= MIB as u128,
        "free space: merged {free_m} vs upper {free_u} bytes"
    );
    assert!(
        free_u <= 48 * MIB as u128,
        "the 16 MiB file is not on the upper tmpfs"
    );
    drop(m);
    drop(tmpfs);
}

fn lseek(f: &File, off: u64, whence: i32) -> Result<u64, Errno> {
    let r = unsafe { libc::lseek(f.as_raw_fd(), off as libc::off_t, whence) };
    if r < 0 { Err(errno()) } else { Ok(r as u64) }
}

#[test]
fn seek_data_and_seek_hole_on_sparse_files() {
    if !fixture::require_fuse() {
        return;
    }
    let lower = LayerBuilder::new().sparse(
        "s",
        4 * MIB,
        &[(0, &[1u8; 4096][..]), (MIB, &[2u8; 4096][..])],
        Meta::new(),
    );
    let l = Layers::new(&[lower]);
    let m = StrataMount::new(&l);
    let (d, h) = (libc::SEEK_DATA, libc::SEEK_HOLE);
    let check = |f: &File, what: &str| {
        assert_eq!(lseek(f, 0, d), Ok(0), "{what}: SEEK_DATA 0");
        assert_eq!(lseek(f, 0, h), Ok(4096), "{what}: SEEK_HOLE 0");
        assert_eq!(lseek(f, 4096, d), Ok(MIB), "{what}: SEEK_DATA 4096");
        assert_eq!(
            lseek(f, MIB + 10, h),
            Ok(MIB + 4096),
            "{what}: SEEK_HOLE 1MiB+10"
        );
        assert_eq!(lseek(f, 4 * MIB, d), Err(ENXIO), "{what}: SEEK_DATA at EOF");
    };

    // On the lower file, read-only.
    let f = File::open(m.join("s")).unwrap();
    check(&f, "lower file");
    assert_eq!(
        lseek(&f, MIB + 4096, d),
        Err(ENXIO),
        "lower file: no data after the second chunk"
    );
    assert_eq!(lseek(&f, MIB + 4096, h), Ok(MIB + 4096));
    drop(f);

    // After copy-up (a write at 3 MiB): the holes are still there.
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.join("s"))
        .unwrap();
    f.write_all_at(&[3u8; 4096], 3 * MIB).unwrap();
    check(&f, "copied-up file");
    assert_eq!(
        lseek(&f, MIB + 4096, d),
        Ok(3 * MIB),
        "copied-up file: SEEK_DATA after the 2nd chunk"
    );
    assert_eq!(lseek(&f, 3 * MIB, h), Ok(3 * MIB + 4096));
    drop(f);

    // A file made on the mount.
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(m.join("new"))
        .unwrap();
    f.write_all_at(&[9u8; 4096], 2 * MIB).unwrap();
    f.set_len(4 * MIB).unwrap();
    assert_eq!(lseek(&f, 0, d), Ok(2 * MIB));
    assert_eq!(lseek(&f, 0, h), Ok(0));
    assert_eq!(lseek(&f, 2 * MIB, h), Ok(2 * MIB + 4096));
    assert_eq!(lseek(&f, 2 * MIB + 4096, d), Err(ENXIO));
}

fn fallocate(f: &File, mode: i32, off: u64, len: u64) -> Result<(), Errno> {
    let r = unsafe { libc::fallocate(f.as_raw_fd(), mode, off as libc::off_t, len as libc::off_t) };
    if r < 0 { Err(errno()) } else { Ok(()) }
}

#[test]
fn fallocate_allocates_keeps_size_punches_holes_and_copies_up() {
    if !fixture::require_fuse() {
        return;
    }
    let l = Layers::new(&[LayerBuilder::new().file("lower", "lower data")]);
    let m = StrataMount::new(&l);

    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(m.join("pre"))
        .unwrap();
    fallocate(&f, 0, 0, MIB).unwrap_or_else(|e| panic!("fallocate: {}", errno_name(e)));
    let md = f.metadata().unwrap();
    assert_eq!(md.len(), MIB);
    assert!(
        md.blocks() * 512 >= MIB,
        "fallocate did not allocate: {} blocks",
        md.blocks()
    );
    fallocate(&f, libc::FALLOC_FL_KEEP_SIZE, MIB, MIB).unwrap();
    let md = f.metadata().unwrap();
    assert_eq!(md.len(), MIB, "FALLOC_FL_KEEP_SIZE changed the size");
    assert!(
        md.blocks() * 512 >= 2 * MIB,
        "KEEP_SIZE allocation missing: {} blocks",
        md.blocks()
    );

    let data = vec![0xABu8; MIB as usize];
    f.write_all_at(&data, 0).unwrap();
    fallocate(
        &f,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        256 << 10,
        256 << 10,
    )
    .unwrap_or_else(|e| panic!("punch hole: {}", errno_name(e)));
    let mut back = vec![0u8; MIB as usize];
    f.read_exact_at(&mut back, 0).unwrap();
    assert!(back[..256 << 10].iter().all(|b| *b == 0xAB));
    assert!(
        back[256 << 10..512 << 10].iter().all(|b| *b == 0),
        "punched range not zero"
    );
    assert!(back[512 << 10..].iter().all(|b| *b == 0xAB));
    assert_eq!(
        lseek(&f, 0, libc::SEEK_HOLE),
        Ok(256 << 10),
        "the punched hole is not a hole"
    );
    assert_eq!(f.metadata().unwrap().len(), MIB);
    drop(f);

    // On a lower file: copied up, content kept, size grown.
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.join("lower"))
        .unwrap();
    fallocate(&f, 0, 0, 65536).unwrap();
    drop(f);
    let got = fs::read(m.join("lower")).unwrap();
    assert_eq!(got.len(), 65536);
    assert_eq!(&got[..10], b"lower data");
    assert!(got[10..].iter().all(|b| *b == 0));
    assert_eq!(fs::read(l.upper.join("lower")).unwrap(), got);
    assert_eq!(
        fs::read(l.lowers[0].join("lower")).unwrap(),
        b"lower data",
        "lower layer modified"
    );
}

fn copy_range(src: &File, mut off_in: i64, dst: &File, mut off_out: i64, len: usize) -> usize {
    let mut done = 0;
    while done < len {
        let n = unsafe {
            libc::copy_file_range(
                src.as_raw_fd(),
                &mut off_in,
                dst.as_raw_fd(),
                &mut off_out,
                len - done,
                0,
            )
        };
        assert!(n >= 0, "copy_file_range: {}", errno_name(errno()));
        if n == 0 {
            break;
        }
        done += n as usize;
    }
    done
}

#[test]
fn copy_file_range_between_files_on_the_mount() {
    if !fixture::require_fuse() {
        return;
    }
    let low = pattern(300_000, 11);
    let l = Layers::new(&[LayerBuilder::new().file("lowsrc", &low)]);
    let m = StrataMount::new(&l);
    let data = pattern((3 * MIB) as usize, 12);
    fs::write(m.join("src"), &data).unwrap();

    let src = File::open(m.join("src")).unwrap();
    let dst = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(m.join("dst"))
        .unwrap();
    assert_eq!(copy_range(&src, 0, &dst, 0, data.len()), data.len());
    drop(dst);
    assert!(
        fs::read(m.join("dst")).unwrap() == data,
        "dst differs from src after copy_file_range"
    );

    // From a lower file, into the middle of another file.
    let src = File::open(m.join("lowsrc")).unwrap();
    let dst = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(m.join("dst2"))
        .unwrap();
    assert_eq!(copy_range(&src, 1000, &dst, 100, 200_000), 200_000);
    drop(dst);
    let got = fs::read(m.join("dst2")).unwrap();
    assert_eq!(got.len(), 200_100);
    assert!(got[..100].iter().all(|b| *b == 0));
    assert!(
        got[100..] == low[1000..201_000],
        "dst2 content after copy_file_range"
    );
    assert_eq!(fs::read(l.upper.join("dst2")).unwrap(), got);
    assert!(
        lstat(&l.upper.join("lowsrc")).is_err(),
        "reading a lower file copied it up"
    );
}

#[test]
fn o_append_writes_always_land_at_the_end() {
    if !fixture::require_fuse() {
        return;
    }
    let l = Layers::new(&[LayerBuilder::new().file("log", "abc")]);
    let m = StrataMount::new(&l);
    let mut f = OpenOptions::new().append(true).open(m.join("log")).unwrap();
    f.write_all(b"def").unwrap();
    f.seek(SeekFrom::Start(0)).unwrap();
    f.write_all(b"ghi").unwrap();
    drop(f);
    assert_eq!(fs::read(m.join("log")).unwrap(), b"abcdefghi");

    // Two appenders at once (a log shared by two processes).
    let mut f = OpenOptions::new().append(true).open(m.join("log")).unwrap();
    let mut g = OpenOptions::new()
        .append(true)
        .open(m.join("log"))
        .unwrap_or_else(|e| panic!("a second open of a file already open for append: {e}"));
    for i in 0..10 {
        let w = if i % 2 == 0 { &mut f } else { &mut g };
        w.write_all(format!("<{i}>").as_bytes()).unwrap();
    }
    drop((f, g));
    assert_eq!(
        fs::read_to_string(m.join("log")).unwrap(),
        "abcdefghi<0><1><2><3><4><5><6><7><8><9>"
    );
    assert_eq!(lstat(&m.join("log")).unwrap().size(), 39);
    // O_APPEND on a new file, opened O_RDWR.
    let mut h = OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .open(m.join("new"))
        .unwrap();
    h.write_all(b"12").unwrap();
    h.seek(SeekFrom::Start(0)).unwrap();
    let mut two = [0u8; 2];
    h.read_exact(&mut two).unwrap();
    assert_eq!(&two, b"12");
    h.write_all(b"34").unwrap();
    drop(h);
    assert_eq!(fs::read(m.join("new")).unwrap(), b"1234");
}

#[test]
fn a_file_can_be_open_several_times_at_once() {
    if !fixture::require_fuse() {
        return;
    }
    let l = Layers::new(&[LayerBuilder::new()
        .file("lower", "lower data")
        .file("lower2", "12345678")]);
    let m = StrataMount::new(&l);
    fs::write(m.join("upper"), "upper data").unwrap();

    let second_open = |what: &str, r: std::io::Result<File>| -> File {
        r.unwrap_or_else(|e| panic!("{what}: {e}"))
    };
    for name in ["lower", "upper"] {
        let p = m.join(name);
        let r1 = File::open(&p).unwrap();
        let r2 = second_open(
            &format!("{name}: a 2nd read-only open while one is open"),
            File::open(&p),
        );
        let mut a = String::new();
        let mut b = String::new();
        (&r1).read_to_string(&mut a).unwrap();
        (&r2).read_to_string(&mut b).unwrap();
        assert_eq!(a, b);
        drop((r1, r2));
    }
    // A writer and a reader at once: the reader sees what the writer wrote.
    let w = OpenOptions::new()
        .write(true)
        .open(m.join("lower2"))
        .unwrap();
    let r = second_open(
        "lower2: a read-only open while it is open for writing",
        File::open(m.join("lower2")),
    );
    w.write_all_at(b"AB", 2).unwrap();
    let mut buf = [0u8; 8];
    r.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(
        &buf, b"12AB5678",
        "a reader does not see the concurrent writer's data"
    );
    let w2 = second_open(
        "lower2: a 2nd open for writing",
        OpenOptions::new().write(true).open(m.join("lower2")),
    );
    w2.write_all_at(b"Z", 7).unwrap();
    r.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"12AB567Z");
    drop((w, w2, r));
    assert_eq!(fs::read(l.upper.join("lower2")).unwrap(), b"12AB567Z");
    assert_eq!(
        fs::read(l.lowers[0].join("lower2")).unwrap(),
        b"12345678",
        "lower modified"
    );
}

// ---------------------------------------------------------------------------------------
// Process lifecycle
// ---------------------------------------------------------------------------------------

#[test]
fn daemon_mode_returns_with_the_mount_live_and_exits_after_unmount() {
    if !fixture::require_fuse() {
        return;
    }
    let l = Layers::new(&[LayerBuilder::new().file("f", "lower")]);
    let mut d = StrataDaemon::mount(&l);
    assert!(d.launcher_status.success());
    // Live the moment the command returned: no polling allowed here.
    let st = fixture::statfs(d.path()).unwrap();
    assert_eq!(
        st.f_type, FUSE_SUPER_MAGIC,
        "mount not live when the command returned"
    );
    assert!(fixture::fuse_mounted_at(d.path()));
    assert!(
        !d.daemon_pids.is_empty(),
        "no stratafs process for {} after the command returned; output:\n{}",
        d.path().display(),
        d.output()
    );
    assert_eq!(fs::read(d.path().join("f")).unwrap(), b"lower");
    fs::write(d.path().join("new"), "via daemon").unwrap();
    assert_eq!(fs::read(l.upper.join("new")).unwrap(), b"via daemon");

    d.unmount_and_wait()
        .unwrap_or_else(|e| panic!("{e}; output:\n{}", d.output()));
    assert!(fixture::stratafs_pids_for(&l.merged).is_empty());
    assert_ne!(fixture::statfs(&l.merged).unwrap().f_type, FUSE_SUPER_MAGIC);
}

fn signal_unmounts_cleanly(sig: i32) {
    if !fixture::require_fuse() {
        return;
    }
    let l = Layers::new(&[LayerBuilder::new().file("f", "lower")]);
    let mut m = StrataMount::new(&l);
    fs::write(m.join("written"), "before the signal").unwrap();
    let status = m.signal_and_wait(sig);
    // Handled (an unhandled signal kills the process and leaves a dead mount behind).
    assert!(
        status.signal().is_none(),
        "stratafs was killed by signal {sig} instead of handling it: {status}; output:\n{}",
        m.output()
    );
    assert!(
        fixture::mount_at(&l.merged).is_none(),
        "signal {sig}: the mount is still in the mount table"
    );
    assert_ne!(fixture::statfs(&l.merged).unwrap().f_type, FUSE_SUPER_MAGIC);
    assert_eq!(
        fs::read(l.upper.join("written")).unwrap(),
        b"before the signal"
    );
    // The same directories mount again.
    m.remount();
    assert_eq!(fs::read(m.join("written")).unwrap(), b"before the signal");
    assert_eq!(fs::read(m.join("f")).unwrap(), b"lower");
}

#[test]
fn sigterm_to_a_foreground_daemon_unmounts_cleanly() {
    signal_unmounts_cleanly(libc::SIGTERM);
}

#[test]
fn sigint_to_a_foreground_daemon_unmounts_cleanly() {
    signal_unmounts_cleanly(libc::SIGINT);
}

#[test]
fn changes_survive_a_remount() {
    if !fixture::require_fuse() {
        return;
    }
    let lower = LayerBuilder::new()
        .file("keep", "k")
        .file("edit", "old")
        .file("del", "d")
        .file("dir/a", "a")
        .file("dir/b", "b")
        .file("mv", "moved");
    let l = Layers::new(&[lower]);
    let mut m = StrataMount::new(&l);
    fs::write(m.join("edit"), "new").unwrap();
    fs::remove_file(m.join("del")).unwrap();
    fs::remove_file(m.join("dir/a")).unwrap();
    fs::remove_file(m.join("dir/b")).unwrap();
    fs::remove_dir(m.join("dir")).unwrap();
    fs::create_dir(m.join("dir")).unwrap();
    fs::write(m.join("dir/c"), "c").unwrap();
    fs::rename(m.join("mv"), m.join("moved")).unwrap();
    let before = fixture::snapshot(m.path());
    m.remount();
    let after = fixture::snapshot(m.path());
    fixture::assert_same_tree("before remount", &before, "after remount", &after);
    assert_eq!(
        list_checked(m.path()),
        strs(&["dir", "edit", "keep", "moved"])
    );
    assert_eq!(list_checked(&m.join("dir")), strs(&["c"]));
    assert_eq!(fs::read(m.join("edit")).unwrap(), b"new");
    assert_eq!(fs::read(m.join("moved")).unwrap(), b"moved");
    assert_eq!(lstat(&m.join("del")).err(), Some(ENOENT));
    assert_eq!(
        fixture::lstat(&l.lowers[0].join("edit")).unwrap().mtime(),
        FIXED_MTIME,
        "lower touched"
    );
}

// ---------------------------------------------------------------------------------------
// Concurrency
// ---------------------------------------------------------------------------------------

#[test]
fn concurrent_threads_create_write_read_in_different_directories() {
    if !fixture::require_fuse() {
        return;
    }
    const THREADS: usize = 6;
    const FILES: usize = 40;
    let mut lower = LayerBuilder::new();
    for t in 0..4 {
        for i in 0..10 {
            lower = lower.file(&format!("top/t{t}/lower{i}"), format!("lower {t} {i}"));
        }
    }
    let l = Layers::new(&[lower]);
    let m = StrataMount::new(&l);
    let dir_of = |t: usize| {
        if t < 4 {
            format!("top/t{t}")
        } else {
            format!("n{t}")
        }
    };
    let content = |t: usize, i: usize| pattern(4096 + i * 37, (t * 1000 + i) as u64);

    std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let dir = m.join(&dir_of(t));
                s.spawn(move || {
                    if t >= 4 {
                        fs::create_dir(&dir).unwrap();
                    }
                    for i in 0..FILES {
                        let p = dir.join(format!("f{i}"));
                        fs::write(&p, content(t, i)).unwrap();
                        assert!(
                            fs::read(&p).unwrap() == content(t, i),
                            "thread {t}: f{i} reads back wrong"
                        );
                    }
                    if t < 4 {
                        for i in 0..10 {
                            let p = dir.join(format!("lower{i}"));
                            OpenOptions::new()
                                .append(true)
                                .open(&p)
                                .unwrap()
                                .write_all(b" +")
                                .unwrap();
                            assert_eq!(fs::read_to_string(&p).unwrap(), format!("lower {t} {i} +"));
                        }
                    }
                    for i in 0..FILES {
                        let p = dir.join(format!("f{i}"));
                        match i % 3 {
                            0 => fs::rename(&p, dir.join(format!("r{i}"))).unwrap(),
                            1 => fs::remove_file(&p).unwrap(),
                            _ => {}
                        }
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().expect("a worker thread panicked");
        }
    });

    let check = |m: &StrataMount| {
        for t in 0..THREADS {
            let dir = m.join(&dir_of(t));
            let mut want = BTreeSet::new();
            for i in 0..FILES {
                match i % 3 {
                    0 => {
                        want.insert(format!("r{i}"));
                    }
                    1 => {}
                    _ => {
                        want.insert(format!("f{i}"));
                    }
                }
                let name = if i % 3 == 0 {
                    format!("r{i}")
                } else {
                    format!("f{i}")
                };
                if i % 3 != 1 {
                    assert!(
                        fs::read(dir.join(&name)).unwrap() == content(t, i),
                        "{}/{name}",
                        dir.display()
                    );
                }
            }
            if t < 4 {
                for i in 0..10 {
                    want.insert(format!("lower{i}"));
                    assert_eq!(
                        fs::read_to_string(dir.join(format!("lower{i}"))).unwrap(),
                        format!("lower {t} {i} +")
                    );
                }
            }
            let got: BTreeSet<String> = list_checked(&dir).into_iter().collect();
            assert_eq!(got, want, "listing of {}", dir.display());
        }
        assert_eq!(
            list_checked(&m.join("top")),
            strs(&["t0", "t1", "t2", "t3"])
        );
    };
    check(&m);
    let mut m = m;
    m.remount();
    check(&m);
}

/// `STRATAFS_STATS=FILE`: SIGUSR1 writes the per-opcode request counts there, and
/// the end of the session writes them once more; the counts follow the workload.
#[test]
fn request_stats_are_dumped_on_sigusr1_and_at_unmount() {
    if !fixture::require_fuse() {
        return;
    }
    let l = Layers::new(&[LayerBuilder::new().file("a", b"a")]);
    let (mut m, stats) = mount_counting_requests(&l);
    for i in 0..5 {
        fs::create_dir(m.join(&format!("d{i}"))).unwrap();
    }
    // A request is counted when its handler returns, just after its reply: the
    // last mkdir may still be finishing when the first dump is written, so signal
    // until the dump shows it (each SIGUSR1 writes the counters of that moment).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let table = loop {
        // kill(2) on the daemon this test started.
        assert_eq!(unsafe { libc::kill(m.pid() as i32, libc::SIGUSR1) }, 0);
        std::thread::sleep(std::time::Duration::from_millis(20));
        if let Ok(t) = fs::read_to_string(&stats) {
            if request_count(&t, "mkdir") == 5 {
                break t;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no stats file with 5 mkdirs after SIGUSR1: {:?}",
            fs::read_to_string(&stats)
        );
    };
    assert!(table.starts_with("requests: "), "{table}");
    assert!(m.daemon_exited().is_none(), "SIGUSR1 ended the daemon");
    fs::remove_dir(m.join("d0")).unwrap();
    m.unmount();
    let table = fs::read_to_string(&stats).unwrap();
    assert_eq!(request_count(&table, "mkdir"), 5, "{table}");
    assert_eq!(request_count(&table, "rmdir"), 1, "{table}");
}

/// A close costs no request: the daemon has nothing to do at FLUSH, so it answers
/// the first one ENOSYS and the kernel sends no more (untar, `npm ci` and copy-ups
/// close every file they write). What was written before each close is there
/// after it, through the mount and in the upper layer.
#[test]
fn closing_files_sends_no_flush_after_the_first() {
    if !fixture::require_fuse() {
        return;
    }
    let l = Layers::new(&[LayerBuilder::new().file("lower", b"lower")]);
    let (mut m, stats) = mount_counting_requests(&l);
    for i in 0..20 {
        fs::write(m.join(&format!("f{i}")), format!("data {i}")).unwrap();
    }
    // A lower file opened for writing is copied up; its close is a close too.
    fs::OpenOptions::new()
        .append(true)
        .open(m.join("lower"))
        .unwrap()
        .write_all(b"+")
        .unwrap();
    for i in 0..20 {
        assert_eq!(
            fs::read(m.join(&format!("f{i}"))).unwrap(),
            format!("data {i}").as_bytes()
        );
    }
    m.unmount();
    for i in 0..20 {
        assert_eq!(
            fs::read(l.upper.join(format!("f{i}"))).unwrap(),
            format!("data {i}").as_bytes()
        );
    }
    assert_eq!(fs::read(l.upper.join("lower")).unwrap(), b"lower+");
    let table = fs::read_to_string(&stats).unwrap();
    assert!(
        request_count(&table, "release") >= 41,
        "every close is released:\n{table}"
    );
    assert!(
        request_count(&table, "flush") <= 1,
        "closes after the first sent FLUSH:\n{table}"
    );
}

/// A read-write mount of `l` whose daemon counts its requests (`STRATAFS_STATS`)
/// into the returned file.
fn mount_counting_requests(l: &Layers) -> (StrataMount, PathBuf) {
    let stats = l.root.join("stats");
    let m = StrataMount::with_env(
        &l.rw_options(),
        &[],
        &[("STRATAFS_STATS", stats.to_str().unwrap())],
        &l.merged,
        &l.root,
    );
    (m, stats)
}

/// The count of requests of opcode `op` in a `STRATAFS_STATS` table.
fn request_count(table: &str, op: &str) -> u64 {
    table
        .lines()
        .find_map(|l| {
            let mut cols = l.split_whitespace();
            (cols.next() == Some(op)).then(|| cols.next().unwrap().parse().unwrap())
        })
        .unwrap_or(0)
}

/// A miss is kept by the kernel (a negative entry with the parent's lifetime):
/// probing an absent name again costs no request, and every way of making the
/// name through the mount (create, mkdir, mknod, symlink, link, rename onto it)
/// shows the new entry at once, in merged and lower-only directories alike.
#[test]
fn absent_names_are_cached_and_appear_once_made() {
    if !fixture::require_fuse() {
        return;
    }
    let l = Layers::new(&[LayerBuilder::new()
        .file("lower/f", b"f")
        .file("src", b"moved")]);
    let (mut m, stats) = mount_counting_requests(&l);
    fs::create_dir(m.join("upper")).unwrap();
    let names = ["file", "dir", "fifo", "symlink", "link", "renamed"];
    let mut misses = 0;
    for dir in ["lower", "upper"] {
        for name in names {
            let p = m.join(&format!("{dir}/{name}"));
            for _ in 0..5 {
                assert_errno("stat of an absent name", lstat(&p), ENOENT);
            }
            misses += 1;
        }
    }
    for dir in ["lower", "upper"] {
        let p = |name: &str| m.join(&format!("{dir}/{name}"));
        fs::write(p("file"), "new").unwrap();
        fs::create_dir(p("dir")).unwrap();
        let fifo = std::ffi::CString::new(p("fifo").as_os_str().as_encoded_bytes()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
        std::os::unix::fs::symlink("file", p("symlink")).unwrap();
        fs::hard_link(m.join("lower/f"), p("link")).unwrap();
        let src = if dir == "lower" {
            "src"
        } else {
            "lower/renamed"
        };
        fs::rename(m.join(src), p("renamed")).unwrap();
        assert_eq!(fs::read(p("file")).unwrap(), b"new");
        assert!(fs::metadata(p("dir")).unwrap().is_dir());
        assert!(fs::metadata(p("fifo")).unwrap().file_type().is_fifo());
        assert_eq!(fs::read(p("symlink")).unwrap(), b"new");
        assert_eq!(fs::read(p("link")).unwrap(), b"f");
        assert_eq!(fs::read(p("renamed")).unwrap(), b"moved");
        assert_errno("stat of the name renamed away", lstat(&m.join(src)), ENOENT);
    }
    m.unmount();
    let table = fs::read_to_string(&stats).unwrap();
    // Per absent name one lookup for its 5 probes and one more when it is made (the
    // kernel revalidates a cached miss before an exclusive create or a rename onto
    // it), plus a few for the entries the steps start from; uncached, the probes
    // alone would be 5 per name.
    let lookups = request_count(&table, "lookup");
    assert!(
        lookups < misses * 3,
        "{lookups} lookups for {misses} absent names probed 5 times each:\n{table}"
    );
}

/// Whiteouts are links of one shared whiteout, as kernel overlayfs makes them (no
/// inode allocated per removed lower entry): the removed names stay hidden after a
/// remount, whose whiteouts link a shared whiteout of its own, and kernel
/// overlayfs reads the upper layer as stratafs does.
#[test]
fn whiteouts_share_one_inode_and_hide_across_mounts() {
    if !fixture::require_fuse_and_kernel_overlay() {
        return;
    }
    let l = Layers::new(&[LayerBuilder::new()
        .file("a", b"a")
        .file("b", b"b")
        .file("d/x", b"x")
        .file("later", b"l")]);
    let mut m = StrataMount::new(&l);
    fs::remove_file(m.join("a")).unwrap();
    fs::remove_file(m.join("b")).unwrap();
    fs::remove_file(m.join("d/x")).unwrap();
    fs::remove_dir(m.join("d")).unwrap();
    let ids = |names: &[&str]| -> BTreeSet<(u64, u64)> {
        names
            .iter()
            .map(|n| {
                let st = lstat(&l.upper.join(n)).unwrap();
                assert!(st.file_type().is_char_device() && st.rdev() == 0, "{n}");
                (st.dev(), st.ino())
            })
            .collect()
    };
    assert_eq!(
        ids(&["a", "b", "d"]).len(),
        1,
        "whiteouts of one mount share an inode"
    );
    m.remount();
    for gone in ["a", "b", "d", "d/x"] {
        assert_errno("stat after remount", lstat(&m.join(gone)), ENOENT);
    }
    fs::remove_file(m.join("later")).unwrap();
    let after = ids(&["a", "later"]);
    assert_eq!(
        after.len(),
        2,
        "the remount links a shared whiteout of its own"
    );
    m.unmount();
    let k = fixture::KernelOverlay::new(&l);
    assert_eq!(
        fixture::names(&l.merged),
        Vec::<String>::new(),
        "kernel overlayfs view"
    );
    drop(k);
}

/// The shared whiteout at its filesystem's link limit (ext4: 65,000, reached after as
/// many removals of lower entries in one mount): the next removal still works, with a
/// fresh shared whiteout taking the place of the full one, and the whiteouts linked
/// so far keep hiding their names.
#[test]
fn a_shared_whiteout_at_the_link_limit_is_replaced() {
    if !fixture::require_fuse() {
        return;
    }
    let l = Layers::new(&[LayerBuilder::new()
        .file("first", b"1")
        .file("next", b"2")
        .file("kept", b"3")]);
    let mut m = StrataMount::new(&l);
    fs::remove_file(m.join("first")).unwrap();
    let shared = l.work.join("#stratafs-whiteout");
    let full = lstat(&shared).unwrap();
    // Links made beside it stand for the removals of a long-running mount.
    let filler = l.root.join("links");
    fs::create_dir(&filler).unwrap();
    let mut made = 0u32;
    let at_limit = loop {
        match fs::hard_link(&shared, filler.join(made.to_string())) {
            Ok(()) => made += 1,
            Err(e) if io_errno(&e) == libc::EMLINK => break true,
            Err(e) => panic!("ln {}: {}", shared.display(), errno_name(io_errno(&e))),
        }
        if made > 200_000 {
            break false;
        }
    };
    assert!(
        at_limit,
        "{}: no link limit reached after {made} links; this test needs a filesystem \
         with one (ext4)",
        l.work.display()
    );
    fs::remove_file(m.join("next")).unwrap();
    let next = lstat(&l.upper.join("next")).unwrap();
    assert!(
        next.file_type().is_char_device() && next.rdev() == 0,
        "next is a whiteout"
    );
    assert_ne!(
        next.ino(),
        full.ino(),
        "the full shared whiteout is not linked again"
    );
    assert_eq!(
        lstat(&shared).unwrap().ino(),
        next.ino(),
        "a fresh shared whiteout"
    );
    let first = lstat(&l.upper.join("first")).unwrap();
    assert_eq!(
        first.ino(),
        full.ino(),
        "earlier whiteouts stay as they were"
    );
    for gone in ["first", "next"] {
        assert_errno("stat of a removed name", lstat(&m.join(gone)), ENOENT);
    }
    assert_eq!(fs::read(m.join("kept")).unwrap(), b"3");
    let _ = fs::remove_dir_all(&filler);
    m.unmount();
}

/// Reads of lower files (served by the daemon on a writable mount) return exactly the
/// file's bytes, also when the worker serving them just served a larger read (each
/// worker keeps its read buffer between requests): small files and file tails read
/// after a 1 MiB file, a mapping of a small file shows zeros past its end, and an
/// O_DIRECT read (databases, `dd iflag=direct`, qemu's cache=none), larger than the
/// kept buffer, comes whole. O_DIRECT reads of lower files failed with EINVAL: the
/// daemon opened the layer file with O_DIRECT too and read into its own buffer.
#[test]
fn served_reads_return_exactly_the_files_bytes_o_direct_included() {
    if !fixture::require_fuse() {
        return;
    }
    let big = pattern((1 << 20) + 123, 7);
    let mid = pattern(600 << 10, 9);
    let mut layer = LayerBuilder::new().file("big", &big).file("mid", &mid);
    let smalls: Vec<Vec<u8>> = (1..=40u8).map(|n| vec![n; usize::from(n) * 3]).collect();
    for (i, s) in smalls.iter().enumerate() {
        layer = layer.file(&format!("small{i}"), s);
    }
    let l = Layers::new(&[layer]);
    let m = StrataMount::new(&l);
    assert!(fs::read(m.join("big")).unwrap() == big, "big");
    for (i, s) in smalls.iter().enumerate() {
        assert_eq!(
            &fs::read(m.join(&format!("small{i}"))).unwrap(),
            s,
            "small{i}"
        );
    }
    // The tail of big, from a fresh open: its last partial page.
    let f = File::open(m.join("big")).unwrap();
    let mut tail = vec![0u8; 4096];
    let n = f.read_at(&mut tail, 1 << 20).unwrap();
    assert_eq!(&tail[..n], &big[1 << 20..], "tail of big");
    // A mapping shows the file and zeros to the end of its page.
    let f = File::open(m.join("small39")).unwrap();
    // SAFETY: a private read-only mapping of one page of a file we hold open,
    // unmapped before the file is closed.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ,
            libc::MAP_PRIVATE,
            f.as_raw_fd(),
            0,
        );
        assert_ne!(
            p,
            libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        let page = std::slice::from_raw_parts(p as *const u8, 4096);
        let len = smalls[39].len();
        assert_eq!(&page[..len], &smalls[39][..]);
        assert!(
            page[len..].iter().all(|b| *b == 0),
            "bytes past the end are zeros"
        );
        assert_eq!(libc::munmap(p, 4096), 0);
    }
    // O_DIRECT: one read request of the caller's size, larger than the kept buffer.
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(m.join("mid"))
        .unwrap();
    let mut got = vec![0u8; mid.len() + 4096];
    let mut done = 0;
    while done < got.len() {
        match f.read_at(&mut got[done..], done as u64).unwrap() {
            0 => break,
            n => done += n,
        }
    }
    assert_eq!(done, mid.len());
    assert!(got[..done] == mid[..], "O_DIRECT read of mid");
}
