//! Inode flags (chattr/lsattr) through the mount, compared with kernel overlayfs:
//! append-only and immutable files refuse what the kernel refuses (EPERM, whether
//! the flag was set through the mount or the file carries it in a lower layer),
//! copy-up keeps the flags, only CAP_LINUX_IMMUTABLE sets the two, and the flags
//! outlive a remount.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::fixture::{self, KernelOverlay, LayerBuilder, Layers, Meta, StrataMount, io_errno};
use crate::posix_acl::{BOB, Step, bob, root, run_steps};

/// Clears append-only and immutable below the given directories when dropped, so
/// that the temporary layers can be removed whatever a test left behind. Declared
/// after the layers and before the mounts: it runs after the unmounts.
struct Unfreeze(Vec<PathBuf>);

impl Drop for Unfreeze {
    fn drop(&mut self) {
        for dir in &self.0 {
            let _ = Command::new("chattr")
                .args(["-R", "-f", "-i", "-a"])
                .arg(dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

fn unfreeze(stacks: &[&Layers]) -> Unfreeze {
    let mut dirs = Vec::new();
    for l in stacks {
        dirs.extend(l.lowers.iter().cloned());
        dirs.extend([l.upper.clone(), l.work.clone()]);
    }
    Unfreeze(dirs)
}

/// Both stacks of a differential run, unmounted. Fields drop in order: the flags
/// are cleared before the layers are removed.
struct Stacks {
    _guard: Unfreeze,
    strata: Layers,
    _kernel: Layers,
}

fn chattr(p: &Path, change: &str) {
    let st = Command::new("chattr")
        .arg(change)
        .arg(p)
        .status()
        .expect("chattr");
    assert!(st.success(), "chattr {change} {}", p.display());
}

/// The letters lsattr shows for `p`, of the flags these tests use (a i A S d).
fn shown_flags(p: &Path) -> String {
    let out = Command::new("lsattr")
        .arg("-d")
        .arg(p)
        .output()
        .expect("lsattr");
    assert!(
        out.status.success(),
        "lsattr -d {}: {}",
        p.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let field = text.split_whitespace().next().unwrap_or("");
    field.chars().filter(|c| "aiASd".contains(*c)).collect()
}

/// Lower files for every scenario; those named lo_* carry flags in the lower layer
/// (set on the layer directly, before mounting). World-traversable for BOB.
fn flag_layers() -> Layers {
    let l = Layers::new(&[LayerBuilder::new()
        .file("new.log", "one\n")
        .file("frozen", "ice\n")
        .file("lo_append", "one\n")
        .file("lo_immutable", "ice\n")
        .file("lo_attrs", "x\n")
        .file("dir/inside", "in\n")
        .file_with(
            "owned",
            "mine\n",
            Meta::new().owner(BOB.0, BOB.1).mode(0o644),
        )]);
    fs::set_permissions(&l.root, fs::Permissions::from_mode(0o755)).unwrap();
    let low = &l.lowers[0];
    chattr(&low.join("lo_append"), "+a");
    chattr(&low.join("lo_immutable"), "+i");
    chattr(&low.join("lo_attrs"), "+ASd");
    l
}

/// Runs `steps` on kernel overlayfs and on stratafs over two stacks made by
/// [`flag_layers`]; every observation must agree with the other side and with what
/// the scenario says the kernel answers. Returns both stacks for checks of their
/// layers.
fn differential(steps: &[Step]) -> Stacks {
    let (lk, ls) = (flag_layers(), flag_layers());
    let guard = unfreeze(&[&lk, &ls]);
    let failures = {
        let mut k = KernelOverlay::new(&lk);
        let mut s = StrataMount::new(&ls);
        let failures = run_steps(steps, k.path(), s.path());
        k.unmount();
        s.unmount();
        failures
    };
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    Stacks {
        _guard: guard,
        strata: ls,
        _kernel: lk,
    }
}

const EPERM: &str = "error: Operation not permitted";

#[test]
fn append_only_refuses_writes_truncation_and_removal_but_appends() {
    if !fixture::require_fuse_and_kernel_overlay() {
        return;
    }
    let ls = &differential(&[
        root("chattr +a new.log", "ok"),
        root("lsattr -d new.log | cut -d' ' -f1 | tr -cd aiASd", "a"),
        root("echo two > new.log", EPERM),
        root("echo two >> new.log && cat new.log", "one\ntwo"),
        root("truncate -s 0 new.log", EPERM),
        root("rm -f new.log", EPERM),
        root("mv new.log moved", EPERM),
        root("chmod 600 new.log", EPERM),
        root("ln new.log hard", EPERM),
        root(
            "chattr -a new.log && echo three > new.log && cat new.log",
            "three",
        ),
    ]);
    assert_eq!(
        fs::read(ls.strata.upper.join("new.log")).unwrap(),
        b"three\n"
    );
}

#[test]
fn immutable_refuses_every_change() {
    if !fixture::require_fuse_and_kernel_overlay() {
        return;
    }
    let ls = &differential(&[
        root("chattr +i frozen", "ok"),
        root("lsattr -d frozen | cut -d' ' -f1 | tr -cd aiASd", "i"),
        root("cat frozen", "ice"),
        root("echo x > frozen", EPERM),
        root("echo x >> frozen", EPERM),
        root("truncate -s 0 frozen", EPERM),
        root("rm -f frozen", EPERM),
        root("mv frozen thawed", EPERM),
        root("mv new.log frozen", EPERM),
        root("chmod 600 frozen", EPERM),
        root("chown 1001 frozen", EPERM),
        root("touch frozen", EPERM),
        root("ln frozen hard", EPERM),
        root("setfattr -n user.x -v 1 frozen", EPERM),
        root("cat frozen", "ice"),
        root("chattr -i frozen && echo x > frozen && cat frozen", "x"),
        // A directory: nothing is created in it or removed from it.
        root("chattr +i dir", "ok"),
        root("lsattr -d dir | cut -d' ' -f1 | tr -cd aiASd", "i"),
        root("touch dir/new", EPERM),
        root("rm dir/inside", EPERM),
        root("mv new.log dir/", EPERM),
        root("cat dir/inside", "in"),
        root("chattr -i dir && touch dir/new && ls dir", "inside\nnew"),
    ]);
    assert_eq!(fs::read(ls.strata.upper.join("frozen")).unwrap(), b"x\n");
    assert_eq!(
        fs::read(ls.strata.lowers[0].join("frozen")).unwrap(),
        b"ice\n"
    );
}

#[test]
fn flags_of_lower_files_are_shown_enforced_and_kept_by_copy_up() {
    if !fixture::require_fuse_and_kernel_overlay() {
        return;
    }
    let ls = &differential(&[
        root("lsattr -d lo_append | cut -d' ' -f1 | tr -cd aiASd", "a"),
        root("lsattr -d lo_immutable | cut -d' ' -f1 | tr -cd aiASd", "i"),
        // A lower immutable file is never copied up for a change.
        root("echo x > lo_immutable", EPERM),
        root("echo x >> lo_immutable", EPERM),
        root("truncate -s 0 lo_immutable", EPERM),
        root("rm -f lo_immutable", EPERM),
        root("mv lo_immutable elsewhere", EPERM),
        root("mv new.log lo_immutable", EPERM),
        root("chmod 600 lo_immutable", EPERM),
        root("touch lo_immutable", EPERM),
        root("setfattr -n user.x -v 1 lo_immutable", EPERM),
        root("echo x > lo_append", EPERM),
        root("rm -f lo_append", EPERM),
        // Appending copies it up, flag and all.
        root("echo two >> lo_append && cat lo_append", "one\ntwo"),
        root("lsattr -d lo_append | cut -d' ' -f1 | tr -cd aiASd", "a"),
        root("echo x > lo_append", EPERM),
        // Clearing the flag copies it up too.
        root(
            "chattr -i lo_immutable && echo x > lo_immutable && cat lo_immutable",
            "x",
        ),
        // A metadata change copies the other flags along (kernel overlayfs keeps
        // sync and noatime; stratafs also nodump, checked below).
        root(
            "chmod 600 lo_attrs && lsattr -d lo_attrs | cut -d' ' -f1 | tr -cd aiAS",
            "SA",
        ),
    ]);
    let (low, up) = (&ls.strata.lowers[0], &ls.strata.upper);
    assert_eq!(shown_flags(&up.join("lo_append")), "a");
    assert_eq!(fs::read(up.join("lo_append")).unwrap(), b"one\ntwo\n");
    assert_eq!(shown_flags(&up.join("lo_attrs")), "SdA");
    assert_eq!(shown_flags(&up.join("lo_immutable")), "");
    // The lower layer is untouched.
    assert_eq!(shown_flags(&low.join("lo_immutable")), "i");
    assert_eq!(fs::read(low.join("lo_immutable")).unwrap(), b"ice\n");
    assert_eq!(fs::read(low.join("lo_append")).unwrap(), b"one\n");
}

#[test]
fn only_a_caller_with_cap_linux_immutable_sets_append_only_or_immutable() {
    if !fixture::require_fuse_and_kernel_overlay() {
        return;
    }
    let ls = &differential(&[
        bob(
            "chattr +i owned",
            "error: Operation not permitted while setting flags on owned",
        ),
        bob(
            "chattr +a owned",
            "error: Operation not permitted while setting flags on owned",
        ),
        // The owner may set the other flags; others may set none.
        bob(
            "chattr +d owned && lsattr -d owned | cut -d' ' -f1 | tr -cd aiASd",
            "d",
        ),
        bob(
            "chattr +d new.log",
            "error: Operation not permitted while setting flags on new.log",
        ),
        root("lsattr -d owned | cut -d' ' -f1 | tr -cd aiASd", "d"),
    ]);
    assert_eq!(shown_flags(&ls.strata.upper.join("owned")), "d");
    assert!(!ls.strata.upper.join("new.log").exists());
}

#[test]
fn flags_survive_a_remount_and_refuse_with_eperm_through_any_open() {
    if !fixture::require_fuse() {
        return;
    }
    let l = flag_layers();
    let _guard = unfreeze(&[&l]);
    let mut m = StrataMount::new(&l);
    fs::write(m.join("made.log"), "a\n").unwrap();
    chattr(&m.join("made.log"), "+a");
    chattr(&m.join("frozen"), "+i");
    m.remount();
    assert_eq!(shown_flags(&m.join("made.log")), "a");
    assert_eq!(shown_flags(&m.join("frozen")), "i");
    assert_eq!(shown_flags(&m.join("lo_immutable")), "i");
    for (name, append) in [
        ("made.log", false),
        ("frozen", false),
        ("frozen", true),
        ("lo_immutable", true),
    ] {
        let r = OpenOptions::new()
            .write(!append)
            .append(append)
            .open(m.join(name));
        assert_eq!(
            r.map(drop).map_err(|e| io_errno(&e)).err(),
            Some(libc::EPERM),
            "open {name} for {}",
            if append { "appending" } else { "writing" }
        );
    }
    let mut f = OpenOptions::new()
        .append(true)
        .open(m.join("made.log"))
        .unwrap();
    f.write_all(b"b\n").unwrap();
    drop(f);
    assert_eq!(fs::read(m.join("made.log")).unwrap(), b"a\nb\n");
    assert_eq!(fs::metadata(m.join("made.log")).unwrap().size(), 4);
    m.unmount();
    assert_eq!(shown_flags(&l.upper.join("made.log")), "a");
    assert_eq!(shown_flags(&l.upper.join("frozen")), "i");
}

/// struct fsxattr of linux/fs.h.
#[repr(C)]
#[derive(Default)]
struct FsXattr {
    xflags: u32,
    extsize: u32,
    nextents: u32,
    projid: u32,
    cowextsize: u32,
    pad: [u8; 8],
}

const FS_IOC_FSGETXATTR: libc::c_ulong = 0x801c_581f;
const FS_IOC_FSSETXATTR: libc::c_ulong = 0x401c_5820;
const FS_XFLAG_IMMUTABLE: u32 = 0x8;
const FS_XFLAG_APPEND: u32 = 0x10;

fn fsxattr_ioctl(f: &fs::File, cmd: libc::c_ulong, x: &mut FsXattr) -> Result<(), i32> {
    // SAFETY: a valid fd and a struct fsxattr that outlives the call, as both
    // requests take.
    let r = unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(f), cmd, x as *mut FsXattr) };
    if r == 0 {
        Ok(())
    } else {
        Err(fixture::errno())
    }
}

#[test]
fn fsgetxattr_and_fssetxattr_reach_the_layer_file() {
    if !fixture::require_fuse() {
        return;
    }
    let l = flag_layers();
    let _guard = unfreeze(&[&l]);
    let m = StrataMount::new(&l);
    let lower = fs::File::open(m.join("lo_immutable")).unwrap();
    let mut x = FsXattr::default();
    fsxattr_ioctl(&lower, FS_IOC_FSGETXATTR, &mut x).unwrap();
    assert_eq!(
        x.xflags & (FS_XFLAG_IMMUTABLE | FS_XFLAG_APPEND),
        FS_XFLAG_IMMUTABLE
    );
    let f = fs::File::open(m.join("new.log")).unwrap();
    let mut x = FsXattr::default();
    fsxattr_ioctl(&f, FS_IOC_FSGETXATTR, &mut x).unwrap();
    assert_eq!(x.xflags & (FS_XFLAG_IMMUTABLE | FS_XFLAG_APPEND), 0);
    x.xflags |= FS_XFLAG_APPEND;
    fsxattr_ioctl(&f, FS_IOC_FSSETXATTR, &mut x).unwrap();
    assert_eq!(shown_flags(&m.join("new.log")), "a");
    assert_eq!(shown_flags(&l.upper.join("new.log")), "a");
    assert_eq!(shown_flags(&l.lowers[0].join("new.log")), "");
}
