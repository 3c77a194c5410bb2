//! The union engine driven directly, with no mount: what the library promises to
//! every caller (FUSE adapter, fuzzers, model tests).

use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use stratafs::MountConfig;
use stratafs::testing::engine::{
    Caller, Errno, GraftSources, Ino, ROOT_INO, RenameMode, SetAttr, Setup, Union,
};

struct Layers {
    _dir: tempfile::TempDir,
    root: PathBuf,
}

impl Layers {
    fn new() -> Layers {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().to_path_buf();
        for d in ["l1", "l2", "upper", "work", "mnt"] {
            fs::create_dir(root.join(d)).expect("mkdir");
        }
        Layers { _dir: dir, root }
    }
    fn p(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }
    fn write(&self, rel: &str, content: &str) {
        let p = self.p(rel);
        fs::create_dir_all(p.parent().expect("parent")).expect("mkdir -p");
        fs::write(p, content).expect("write");
    }
    fn mkdir(&self, rel: &str) {
        fs::create_dir_all(self.p(rel)).expect("mkdir -p");
    }
    fn config(&self, upper: bool) -> MountConfig {
        let mut c = MountConfig::new(vec![self.p("l1"), self.p("l2")], self.p("mnt"));
        if upper {
            c.upperdir = Some(self.p("upper"));
            c.workdir = Some(self.p("work"));
        }
        c
    }
    fn union(&self) -> Union {
        Union::new(
            &self.config(true),
            &Setup::for_mount(),
            GraftSources::none(),
        )
        .expect("union")
    }
}

fn walk(u: &Union, path: &str) -> Result<Ino, Errno> {
    let mut ino = ROOT_INO;
    for part in Path::new(path).iter() {
        ino = u.lookup(ino, part)?.attr.ino;
    }
    Ok(ino)
}

fn read_all(u: &Union, path: &str) -> Result<String, Errno> {
    let ino = walk(u, path)?;
    let (fh, _) = u.open(ino, libc::O_RDONLY)?;
    let data = u.read(fh, 0, 1 << 20)?;
    u.release(fh);
    Ok(String::from_utf8_lossy(&data).into_owned())
}

fn list(u: &Union, path: &str) -> Vec<String> {
    let ino = walk(u, path).expect("dir");
    let fh = u.opendir(ino).expect("opendir");
    let names = u
        .readdir(fh, 0)
        .expect("readdir")
        .iter()
        .map(|e| e.name.to_string_lossy().into_owned())
        .filter(|n| n != "." && n != "..")
        .collect::<Vec<_>>();
    u.releasedir(fh);
    let mut names = names;
    names.sort();
    names
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

const ME: Caller = Caller::ROOT;

#[test]
fn upper_layer_shadows_lower_and_dirs_merge() {
    let l = Layers::new();
    l.write("l2/etc/a", "from l2");
    l.write("l2/etc/b", "b from l2");
    l.write("l1/etc/a", "from l1");
    l.write("upper/etc/c", "from upper");
    let u = l.union();
    assert_eq!(read_all(&u, "etc/a").unwrap(), "from l1");
    assert_eq!(read_all(&u, "etc/b").unwrap(), "b from l2");
    assert_eq!(list(&u, "etc"), ["a", "b", "c"]);
    // A directory merged from several layers reports one link, as overlayfs does.
    let etc = walk(&u, "etc").unwrap();
    assert_eq!(u.getattr(etc).unwrap().nlink, 1);
}

#[test]
fn whiteouts_and_opaque_dirs_in_both_formats_hide_lower_entries() {
    let l = Layers::new();
    l.write("l2/d/gone-aufs", "x");
    l.write("l2/d/kept", "x");
    l.write("l1/d/.wh.gone-aufs", "");
    l.write("l2/opq-aufs/hidden", "x");
    l.write("l1/opq-aufs/.wh..wh..opq", "");
    l.write("l1/opq-aufs/shown", "x");
    if is_root() {
        l.write("l2/d/gone-char", "x");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            l.p("l1/d/gone-char").as_path(),
            rustix::fs::FileType::CharacterDevice,
            rustix::fs::Mode::from_raw_mode(0o644),
            0,
        )
        .expect("mknod whiteout");
        l.write("l2/opq-x/hidden", "x");
        l.write("l1/opq-x/shown", "x");
        rustix::fs::setxattr(
            l.p("l1/opq-x").as_path(),
            "trusted.overlay.opaque",
            b"y",
            rustix::fs::XattrFlags::empty(),
        )
        .expect("opaque xattr");
    }
    let u = l.union();
    assert_eq!(list(&u, "d"), ["kept"]);
    assert_eq!(walk(&u, "d/gone-aufs"), Err(Errno::NOENT));
    assert_eq!(walk(&u, "d/.wh.gone-aufs"), Err(Errno::NOENT));
    assert_eq!(list(&u, "opq-aufs"), ["shown"]);
    if is_root() {
        assert_eq!(walk(&u, "d/gone-char"), Err(Errno::NOENT));
        assert_eq!(list(&u, "opq-x"), ["shown"]);
    }
}

#[test]
fn a_file_in_a_higher_layer_hides_a_directory_below() {
    let l = Layers::new();
    l.write("l2/x/inner", "deep");
    l.write("l1/x", "a file now");
    let u = l.union();
    assert_eq!(read_all(&u, "x").unwrap(), "a file now");
    assert_eq!(walk(&u, "x/inner"), Err(Errno::NOTDIR));
}

#[test]
fn writing_copies_up_with_metadata_and_leaves_lower_untouched() {
    let l = Layers::new();
    l.write("l2/dir/sub/file", "original");
    fs::set_permissions(l.p("l2/dir/sub/file"), fs::Permissions::from_mode(0o640)).unwrap();
    fs::set_permissions(l.p("l2/dir/sub"), fs::Permissions::from_mode(0o750)).unwrap();
    rustix::fs::setxattr(
        l.p("l2/dir/sub/file").as_path(),
        "user.note",
        b"kept",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    let mtime = fs::metadata(l.p("l2/dir/sub/file")).unwrap().mtime();
    let u = l.union();
    let ino = walk(&u, "dir/sub/file").unwrap();
    let (fh, _) = u.open(ino, libc::O_RDWR).unwrap();
    let data = u.read(fh, 0, 100).unwrap();
    assert_eq!(data, b"original");
    assert_eq!(
        u.getattr(ino).unwrap().mtime.sec,
        mtime,
        "copy-up keeps mtime"
    );
    u.write(fh, 8, b"+more").unwrap();
    u.release(fh);
    assert_eq!(
        fs::read_to_string(l.p("upper/dir/sub/file")).unwrap(),
        "original+more"
    );
    assert_eq!(
        fs::read_to_string(l.p("l2/dir/sub/file")).unwrap(),
        "original"
    );
    let md = fs::metadata(l.p("upper/dir/sub/file")).unwrap();
    assert_eq!(md.mode() & 0o7777, 0o640);
    assert_eq!(
        fs::metadata(l.p("upper/dir/sub")).unwrap().mode() & 0o7777,
        0o750
    );
    let mut buf = [0u8; 16];
    let n = rustix::fs::getxattr(
        l.p("upper/dir/sub/file").as_path(),
        "user.note",
        &mut buf[..],
    )
    .unwrap();
    assert_eq!(&buf[..n], b"kept");
    // Nothing is left staged in the work directory.
    assert_eq!(fs::read_dir(l.p("work/work")).unwrap().count(), 0);
    // The inode number is the same before and after copy-up.
    assert_eq!(walk(&u, "dir/sub/file").unwrap(), ino);
}

#[test]
fn copy_up_keeps_sparse_files_sparse() {
    let l = Layers::new();
    let f = fs::File::create(l.p("l2/sparse")).unwrap();
    f.set_len(64 << 20).unwrap();
    drop(f);
    let u = l.union();
    let ino = walk(&u, "sparse").unwrap();
    let (fh, _) = u.open(ino, libc::O_WRONLY).unwrap();
    u.write(fh, 0, b"x").unwrap();
    u.release(fh);
    let md = fs::metadata(l.p("upper/sparse")).unwrap();
    assert_eq!(md.len(), 64 << 20);
    assert!(
        md.blocks() < 1024,
        "copy-up allocated {} blocks",
        md.blocks()
    );
}

#[test]
fn unlink_and_rmdir_of_lower_entries_leave_whiteouts() {
    let l = Layers::new();
    l.write("l2/f", "x");
    l.write("l2/d/inner", "x");
    let u = l.union();
    u.unlink(ROOT_INO, OsStr::new("f")).unwrap();
    assert_eq!(walk(&u, "f"), Err(Errno::NOENT));
    let d = walk(&u, "d").unwrap();
    assert_eq!(
        u.rmdir(ROOT_INO, OsStr::new("d")),
        Err(Errno::NOTEMPTY.into())
    );
    u.unlink(d, OsStr::new("inner")).unwrap();
    u.rmdir(ROOT_INO, OsStr::new("d")).unwrap();
    assert!(list(&u, "").is_empty());
    let md = fs::symlink_metadata(l.p("upper/f")).unwrap();
    if is_root() {
        assert!(
            md.file_type().is_char_device() && md.rdev() == 0,
            "char 0/0 whiteout"
        );
    }
    // Still gone after a "remount".
    drop(u);
    let u = l.union();
    assert!(list(&u, "").is_empty());
    assert_eq!(fs::read_to_string(l.p("l2/f")).unwrap(), "x");
}

use std::os::unix::fs::FileTypeExt;

#[test]
fn a_directory_recreated_over_a_whiteout_is_opaque() {
    let l = Layers::new();
    l.write("l2/d/old", "x");
    let u = l.union();
    let d = walk(&u, "d").unwrap();
    u.unlink(d, OsStr::new("old")).unwrap();
    u.rmdir(ROOT_INO, OsStr::new("d")).unwrap();
    u.mkdir(ME, ROOT_INO, OsStr::new("d"), 0o755).unwrap();
    assert!(list(&u, "d").is_empty());
    drop(u);
    let u = l.union();
    assert!(
        list(&u, "d").is_empty(),
        "old lower content must stay hidden after remount"
    );
}

#[test]
fn rename_of_files_and_dirs_with_and_without_lower_content() {
    let l = Layers::new();
    l.write("l2/a", "content a");
    l.write("l2/merged/x", "x");
    let u = l.union();
    u.rename(
        ROOT_INO,
        OsStr::new("a"),
        ROOT_INO,
        OsStr::new("b"),
        RenameMode::Replace,
    )
    .unwrap();
    assert_eq!(walk(&u, "a"), Err(Errno::NOENT));
    assert_eq!(read_all(&u, "b").unwrap(), "content a");
    // A directory with lower content moves by redirect, without copying its files.
    u.rename(
        ROOT_INO,
        OsStr::new("merged"),
        ROOT_INO,
        OsStr::new("m2"),
        RenameMode::Replace,
    )
    .unwrap();
    assert_eq!(read_all(&u, "m2/x").unwrap(), "x");
    assert!(
        !l.root.join("upper/m2/x").exists(),
        "the moved directory's lower files must not be copied"
    );
    u.rename(
        ROOT_INO,
        OsStr::new("m2"),
        ROOT_INO,
        OsStr::new("merged"),
        RenameMode::Replace,
    )
    .unwrap();
    u.mkdir(ME, ROOT_INO, OsStr::new("fresh"), 0o755).unwrap();
    u.rename(
        ROOT_INO,
        OsStr::new("fresh"),
        ROOT_INO,
        OsStr::new("moved"),
        RenameMode::Replace,
    )
    .unwrap();
    assert_eq!(list(&u, ""), ["b", "merged", "moved"]);
    assert_eq!(
        u.rename(
            ROOT_INO,
            OsStr::new("b"),
            ROOT_INO,
            OsStr::new("moved"),
            RenameMode::NoReplace
        ),
        Err(Errno::EXIST.into())
    );
    drop(u);
    let u = l.union();
    assert_eq!(list(&u, ""), ["b", "merged", "moved"]);
    assert_eq!(read_all(&u, "merged/x").unwrap(), "x");
}

#[test]
fn read_only_mounts_refuse_changes() {
    let l = Layers::new();
    l.write("l2/f", "x");
    let u = Union::new(&l.config(false), &Setup::for_mount(), GraftSources::none()).unwrap();
    let f = walk(&u, "f").unwrap();
    assert_eq!(u.open(f, libc::O_WRONLY).err(), Some(Errno::ROFS.into()));
    assert_eq!(u.unlink(ROOT_INO, OsStr::new("f")), Err(Errno::ROFS.into()));
    assert_eq!(
        u.mkdir(ME, ROOT_INO, OsStr::new("n"), 0o755).err(),
        Some(Errno::ROFS.into())
    );
    assert_eq!(
        u.setattr(
            f,
            &SetAttr {
                mode: Some(0o600),
                ..Default::default()
            },
            None
        )
        .err(),
        Some(Errno::ROFS.into())
    );
    assert_eq!(read_all(&u, "f").unwrap(), "x");
}

#[test]
fn char_device_zero_zero_cannot_be_created() {
    let l = Layers::new();
    let u = l.union();
    assert_eq!(
        u.mknod(ME, ROOT_INO, OsStr::new("c"), libc::S_IFCHR | 0o644, 0)
            .err(),
        Some(Errno::PERM.into())
    );
    assert_eq!(
        u.mknod(ME, ROOT_INO, OsStr::new(".wh.x"), libc::S_IFREG | 0o644, 0)
            .err(),
        Some(Errno::INVAL.into())
    );
}

#[test]
fn private_xattrs_are_hidden_and_protected() {
    let l = Layers::new();
    l.mkdir("l1/d");
    l.write("l2/d/f", "x");
    rustix::fs::setxattr(
        l.p("l1/d").as_path(),
        "user.overlay.opaque",
        b"n",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    rustix::fs::setxattr(
        l.p("l1/d").as_path(),
        "user.visible",
        b"1",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    let u = l.union();
    let d = walk(&u, "d").unwrap();
    let names = u.listxattr(d).unwrap();
    assert!(names.iter().any(|n| n == "user.visible"));
    assert!(!names.iter().any(|n| n == "user.overlay.opaque"));
    assert_eq!(
        u.getxattr(d, OsStr::new("user.overlay.opaque")),
        Err(Errno::NODATA.into())
    );
    assert_eq!(
        u.setxattr(d, OsStr::new("trusted.overlay.opaque"), b"y", 0),
        Err(Errno::OPNOTSUPP.into())
    );
    assert_eq!(list(&u, "d"), ["f"], "a non-'y' opaque value does not hide");
}

#[test]
fn hostile_symlinks_are_never_followed_out_of_a_layer() {
    let l = Layers::new();
    std::os::unix::fs::symlink("/", l.p("l2/etc")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", l.p("l2/pw")).unwrap();
    let u = l.union();
    let etc = walk(&u, "etc").unwrap();
    assert_eq!(u.getattr(etc).unwrap().kind(), libc::S_IFLNK);
    assert_eq!(
        u.lookup(etc, OsStr::new("passwd")).err(),
        Some(Errno::NOTDIR.into())
    );
    assert_eq!(u.readlink(etc).unwrap(), "/");
    // chmod of a symlink's target must not happen through the link.
    let pw = walk(&u, "pw").unwrap();
    let before = fs::metadata("/etc/passwd").unwrap().mode();
    let _ = u.setattr(
        pw,
        &SetAttr {
            mode: Some(0o777),
            ..Default::default()
        },
        None,
    );
    assert_eq!(fs::metadata("/etc/passwd").unwrap().mode(), before);
    // Truncating through it must not reach the target either.
    assert!(
        u.setattr(
            pw,
            &SetAttr {
                size: Some(0),
                ..Default::default()
            },
            None
        )
        .is_err()
    );
    assert!(fs::metadata("/etc/passwd").unwrap().len() > 0);
}

#[test]
fn readdir_offsets_are_stable_for_a_handle() {
    let l = Layers::new();
    for i in 0..50 {
        l.write(&format!("l2/d/f{i:02}"), "x");
    }
    let u = l.union();
    let d = walk(&u, "d").unwrap();
    let fh = u.opendir(d).unwrap();
    let first = u.readdir(fh, 0).unwrap();
    let mid = first[20].next_offset;
    u.unlink(d, OsStr::new("f30")).unwrap();
    let again = u.readdir(fh, mid).unwrap();
    assert_eq!(
        first[21..].iter().map(|e| &e.name).collect::<Vec<_>>(),
        again[mid as usize..]
            .iter()
            .map(|e| &e.name)
            .collect::<Vec<_>>()
    );
    u.releasedir(fh);
}

#[test]
fn hard_links_through_the_engine_share_data() {
    let l = Layers::new();
    l.write("l2/orig", "one");
    let u = l.union();
    let orig = walk(&u, "orig").unwrap();
    let e = u.link(orig, ROOT_INO, OsStr::new("alias")).unwrap();
    assert_eq!(e.attr.ino, orig);
    assert_eq!(e.attr.nlink, 2);
    let (fh, _) = u.open(orig, libc::O_WRONLY | libc::O_TRUNC).unwrap();
    u.write(fh, 0, b"two").unwrap();
    u.release(fh);
    assert_eq!(read_all(&u, "alias").unwrap(), "two");
}
