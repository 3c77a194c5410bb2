//! Differential tests: the same operations on kernel overlayfs and on stratafs, over two
//! identical freshly built layer stacks. Every operation's outcome (value or errno) must
//! agree; then the merged trees and the upper directories must agree, before and after
//! both are unmounted and mounted again.
//!
//! Each step also states what kernel overlayfs is known to answer (`ok`, `gives`,
//! `fails`), so a scenario cannot pass vacuously by doing nothing on both sides.

use std::fmt;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use libc::{EEXIST, EISDIR, ENODATA, ENOENT, ENOTDIR, ENOTEMPTY, EPERM};

use crate::fixture::{
    self, Answer, Errno, Format, KernelOverlay, LayerBuilder, Layers, Meta, StrataMount, Syscall,
    errno_name, summarize,
};

// ---------------------------------------------------------------------------------------
// Steps: a call of the one path vocabulary (`fixture::Syscall`), with what the kernel
// is known to answer
// ---------------------------------------------------------------------------------------

fn read(p: &str) -> Syscall {
    Syscall::Read(p.into())
}
fn readlink(p: &str) -> Syscall {
    Syscall::Readlink(p.into())
}
fn stat(p: &str) -> Syscall {
    Syscall::Stat(p.into())
}
fn readdir(p: &str) -> Syscall {
    Syscall::ReadDir(p.into())
}
fn write(p: &str, off: u64, d: &[u8]) -> Syscall {
    Syscall::Write(p.into(), off, d.to_vec())
}
fn append(p: &str, d: &[u8]) -> Syscall {
    Syscall::Append(p.into(), d.to_vec())
}
fn truncate(p: &str, len: u64) -> Syscall {
    Syscall::Truncate(p.into(), len)
}
fn create(p: &str, mode: u32, d: &[u8]) -> Syscall {
    Syscall::Create(p.into(), mode, d.to_vec())
}
fn mkdir(p: &str, mode: u32) -> Syscall {
    Syscall::Mkdir(p.into(), mode)
}
fn unlink(p: &str) -> Syscall {
    Syscall::Unlink(p.into())
}
fn rmdir(p: &str) -> Syscall {
    Syscall::Rmdir(p.into())
}
fn rename(a: &str, b: &str) -> Syscall {
    Syscall::Rename(a.into(), b.into(), 0)
}
fn rename_noreplace(a: &str, b: &str) -> Syscall {
    Syscall::Rename(a.into(), b.into(), libc::RENAME_NOREPLACE)
}
fn rename_exchange(a: &str, b: &str) -> Syscall {
    Syscall::Rename(a.into(), b.into(), libc::RENAME_EXCHANGE)
}
fn symlink(target: &str, p: &str) -> Syscall {
    Syscall::Symlink(target.into(), p.into())
}
fn link(a: &str, b: &str) -> Syscall {
    Syscall::Link(a.into(), b.into())
}
fn chmod(p: &str, m: u32) -> Syscall {
    Syscall::Chmod(p.into(), m)
}
fn chown(p: &str, u: u32, g: u32) -> Syscall {
    Syscall::Chown(p.into(), u, g)
}
fn utimes(p: &str, a: i64, m: i64) -> Syscall {
    Syscall::Utimes(p.into(), a, m)
}
fn setxattr(p: &str, n: &str, v: &[u8], flags: i32) -> Syscall {
    Syscall::SetXattr(p.into(), n.into(), v.to_vec(), flags)
}
fn getxattr(p: &str, n: &str) -> Syscall {
    Syscall::GetXattr(p.into(), n.into())
}
fn listxattr(p: &str) -> Syscall {
    Syscall::ListXattr(p.into())
}
fn removexattr(p: &str, n: &str) -> Syscall {
    Syscall::RemoveXattr(p.into(), n.into())
}
fn mkfifo(p: &str, m: u32) -> Syscall {
    Syscall::Mkfifo(p.into(), m)
}
fn mknod(p: &str, mode: u32, major: u32, minor: u32) -> Syscall {
    Syscall::Mknod(p.into(), mode, major, minor)
}

/// What an operation answered: a rendered value, or an errno.
type Outcome = Result<String, Errno>;

fn show(o: &Outcome) -> String {
    match o {
        Ok(v) if v.is_empty() => "ok".into(),
        Ok(v) => format!("ok: {v}"),
        Err(e) => errno_name(*e),
    }
}

enum Expect {
    /// Succeeds, whatever the value.
    Ok,
    /// Succeeds with exactly this rendered value.
    Gives(String),
    Fails(Errno),
    /// No claim about the kernel; only kernel == stratafs is checked.
    Same,
}

struct Step {
    op: Syscall,
    expect: Expect,
}

impl Syscall {
    fn ok(self) -> Step {
        Step {
            op: self,
            expect: Expect::Ok,
        }
    }
    fn gives(self, v: impl Into<String>) -> Step {
        Step {
            op: self,
            expect: Expect::Gives(v.into()),
        }
    }
    fn fails(self, e: Errno) -> Step {
        Step {
            op: self,
            expect: Expect::Fails(e),
        }
    }
    fn same(self) -> Step {
        Step {
            op: self,
            expect: Expect::Same,
        }
    }
    /// For reads and getxattr: the exact bytes expected.
    fn is(self, data: &[u8]) -> Step {
        self.gives(summarize(data))
    }

    /// Paths this op changes (for the never-write-through-a-symlink guard), and whether it
    /// follows a symlink in the final component.
    fn mutated_paths(&self) -> (Vec<&str>, bool) {
        match self {
            Syscall::Read(_) | Syscall::Readlink(_) | Syscall::Stat(_) | Syscall::ReadDir(_) => {
                (vec![], false)
            }
            Syscall::GetXattr(..) | Syscall::ListXattr(_) => (vec![], false),
            Syscall::Write(p, ..)
            | Syscall::Append(p, _)
            | Syscall::Truncate(p, _)
            | Syscall::Chmod(p, _) => (vec![p], true),
            Syscall::Create(p, ..)
            | Syscall::Mkdir(p, _)
            | Syscall::Unlink(p)
            | Syscall::Rmdir(p) => (vec![p], false),
            Syscall::Chown(p, ..)
            | Syscall::Utimes(p, ..)
            | Syscall::SetXattr(p, ..)
            | Syscall::RemoveXattr(p, _) => (vec![p], false),
            Syscall::Mkfifo(p, _) | Syscall::Mknod(p, ..) | Syscall::Symlink(_, p) => {
                (vec![p], false)
            }
            Syscall::Rename(a, b, _) | Syscall::Link(a, b) => (vec![a, b], false),
        }
    }
}

impl fmt::Display for Expect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expect::Ok => write!(f, "ok"),
            Expect::Gives(v) => write!(f, "ok: {v}"),
            Expect::Fails(e) => write!(f, "{}", errno_name(*e)),
            Expect::Same => write!(f, "anything"),
        }
    }
}

impl Expect {
    fn matches(&self, o: &Outcome) -> bool {
        match (self, o) {
            (Expect::Same, _) => true,
            (Expect::Ok, Ok(_)) => true,
            (Expect::Gives(v), Ok(got)) => v == got,
            (Expect::Fails(e), Err(got)) => e == got,
            _ => false,
        }
    }
}

/// The test must never modify anything through a symlink (a layer holds `etc -> /`).
fn assert_no_write_through_symlink(root: &Path, op: &Syscall) {
    let (paths, follows_last) = op.mutated_paths();
    for rel in paths {
        let comps: Vec<&str> = rel.split('/').collect();
        let upto = if follows_last {
            comps.len()
        } else {
            comps.len() - 1
        };
        let mut p = root.to_path_buf();
        for c in &comps[..upto] {
            p.push(c);
            if fs::symlink_metadata(&p).is_ok_and(|m| m.file_type().is_symlink()) {
                panic!(
                    "test bug: `{op}` would modify something through the symlink {}",
                    p.display()
                );
            }
        }
    }
}

/// Makes `op` below `root` through the one path executor, its answer rendered.
fn apply(root: &Path, op: &Syscall) -> Outcome {
    assert_no_write_through_symlink(root, op);
    fixture::apply(root, op).and_then(Answer::render)
}

// ---------------------------------------------------------------------------------------
// The harness
// ---------------------------------------------------------------------------------------

/// Kernel overlayfs and stratafs side by side. Field order matters: the mounts drop
/// (unmount) before the scratch directories are removed.
struct Differential {
    kernel: KernelOverlay,
    strata: StrataMount,
    kl: Layers,
    sl: Layers,
    problems: Vec<String>,
    steps_run: usize,
    /// Whether the upper directories must match too (see `upper_differs_by_design`).
    compare_upper: bool,
}

/// Lowers (top-most first) built twice: kernel-native for the kernel, `strata_fmt` for
/// stratafs. `None` when the prerequisites are missing and skipping was asked for.
fn setup(lowers: &[LayerBuilder], strata_fmt: Format) -> Option<Differential> {
    setup_with(lowers, strata_fmt, false)
}

/// [`setup`], with both mounted `metacopy=on` when asked.
fn setup_with(lowers: &[LayerBuilder], strata_fmt: Format, metacopy: bool) -> Option<Differential> {
    if !fixture::require_fuse() || !fixture::require_kernel_overlay() {
        return None;
    }
    let kl = Layers::build(lowers, None, Format::NATIVE);
    let sl = Layers::build(lowers, None, strata_fmt);
    let kernel = KernelOverlay::with_metacopy(&kl, metacopy);
    let strata = if metacopy {
        StrataMount::with_options(
            &format!("{},metacopy=on", sl.rw_options()),
            &sl.merged,
            &sl.root,
        )
    } else {
        StrataMount::new(&sl)
    };
    Some(Differential {
        kernel,
        strata,
        kl,
        sl,
        problems: Vec::new(),
        steps_run: 0,
        compare_upper: true,
    })
}

impl Differential {
    /// For scenarios where both are right but store it differently: both link the
    /// names of a copied-up lower hard-link group to the copy one by one, the kernel
    /// when each is copied up (until then its lookup serves the index copy), stratafs
    /// when each is reached, at its lookup (so the upper layer holds every name a
    /// step touched). The merged views must still agree.
    fn upper_differs_by_design(&mut self) {
        self.compare_upper = false;
    }

    fn run(&mut self, steps: &[Step]) {
        for step in steps {
            let i = self.steps_run;
            self.steps_run += 1;
            let k = apply(self.kernel.path(), &step.op);
            let s = apply(self.strata.path(), &step.op);
            if !step.expect.matches(&k) {
                self.problems.push(format!(
                    "step {i} `{}`: TEST EXPECTATION WRONG: kernel overlayfs answered {}, the \
                     test expected {}",
                    step.op,
                    show(&k),
                    step.expect
                ));
            }
            if k != s {
                self.problems.push(format!(
                    "step {i} `{}`: kernel overlayfs {} / stratafs {}",
                    step.op,
                    show(&k),
                    show(&s)
                ));
            }
        }
    }

    /// Whether the lower stack alone shows a directory at `rel` (the top-most lower entry
    /// at that name is a directory, not a whiteout or a non-directory): only then does an
    /// upper directory's opacity change what the merged view shows.
    fn lower_shows_dir(&self, rel: &str) -> bool {
        for l in &self.kl.lowers {
            if let Ok(md) = fs::symlink_metadata(l.join(rel)) {
                return md.is_dir();
            }
        }
        false
    }

    fn compare(&mut self, stage: &str) {
        let a = fixture::snapshot(self.kernel.path());
        let b = fixture::snapshot(self.strata.path());
        assert!(a.entries.len() > 1, "test bug: the merged tree is empty");
        for d in fixture::diff("kernel", &a, "stratafs", &b) {
            self.problems.push(format!("[{stage}] merged tree: {d}"));
        }
        if !self.compare_upper {
            return;
        }
        let mut ua = fixture::snapshot_layer(&self.kl.upper);
        let mut ub = fixture::snapshot_layer(&self.sl.upper);
        for snap in [&mut ua, &mut ub] {
            let paths: Vec<String> = snap.entries.keys().cloned().collect();
            for p in paths {
                if !self.lower_shows_dir(&p) {
                    snap.entries.get_mut(&p).unwrap().opaque = None;
                }
            }
        }
        for d in fixture::diff("kernel", &ua, "stratafs", &ub) {
            self.problems.push(format!("[{stage}] upper dir: {d}"));
        }
    }

    /// Inode numbers as users see them: paths sharing a number must be the same set on
    /// both (hard links), and every d_ino must equal its entry's st_ino.
    fn compare_inodes(&mut self, stage: &str) {
        let k = InodeSurvey::take(self.kernel.path());
        let s = InodeSurvey::take(self.strata.path());
        let (kg, sg) = (k.link_groups(), s.link_groups());
        if kg != sg {
            self.problems.push(format!(
                "[{stage}] paths sharing an inode: kernel {kg:?} / stratafs {sg:?}"
            ));
        }
        for m in &s.dino_mismatches {
            if !k.dino_mismatches.contains(m) {
                self.problems
                    .push(format!("[{stage}] stratafs d_ino != st_ino: {m}"));
            }
        }
    }

    /// Compares, remounts both, compares again, and panics listing every problem found.
    /// Across the remount, every path whose st_ino the kernel keeps must keep it on
    /// stratafs too.
    fn finish(mut self) {
        self.compare("after the operations");
        self.compare_inodes("after the operations");
        let (k_before, s_before) = (
            InodeSurvey::take(self.kernel.path()),
            InodeSurvey::take(self.strata.path()),
        );
        self.kernel.remount();
        self.strata.remount();
        self.compare("after remounting both");
        self.compare_inodes("after remounting both");
        let (k_after, s_after) = (
            InodeSurvey::take(self.kernel.path()),
            InodeSurvey::take(self.strata.path()),
        );
        for (path, ino) in &k_before.inos {
            if k_after.inos.get(path) != Some(ino) {
                continue;
            }
            let (b, a) = (s_before.inos.get(path), s_after.inos.get(path));
            if b != a {
                self.problems.push(format!(
                    "st_ino of {path} changed across the remount on stratafs: {b:?} -> {a:?} \
                     (kernel overlayfs kept it)"
                ));
            }
        }
        if !self.problems.is_empty() {
            panic!(
                "kernel overlayfs and stratafs disagree ({} problems):\n  {}\nstratafs output:\n{}",
                self.problems.len(),
                self.problems.join("\n  "),
                self.strata.output()
            );
        }
    }
}

/// st_ino of every path of a merged tree, and each listing entry whose d_ino differs
/// from the st_ino of its path.
struct InodeSurvey {
    inos: std::collections::BTreeMap<String, u64>,
    dino_mismatches: Vec<String>,
}

impl InodeSurvey {
    fn take(root: &Path) -> InodeSurvey {
        let mut survey = InodeSurvey {
            inos: Default::default(),
            dino_mismatches: Vec::new(),
        };
        survey.walk(root, "");
        survey
    }

    fn walk(&mut self, dir: &Path, rel: &str) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            use std::os::unix::fs::DirEntryExt;
            let name = e.file_name().to_string_lossy().into_owned();
            let path = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            let Ok(md) = fs::symlink_metadata(e.path()) else {
                continue;
            };
            if e.ino() != md.ino() {
                self.dino_mismatches.push(path.clone());
            }
            self.inos.insert(path.clone(), md.ino());
            if md.is_dir() {
                self.walk(&e.path(), &path);
            }
        }
    }

    /// Sets (of two or more paths) that share one inode, sorted.
    fn link_groups(&self) -> Vec<Vec<String>> {
        let mut by_ino: std::collections::BTreeMap<u64, Vec<String>> = Default::default();
        for (p, i) in &self.inos {
            by_ino.entry(*i).or_default().push(p.clone());
        }
        let mut groups: Vec<Vec<String>> = by_ino.into_values().filter(|g| g.len() > 1).collect();
        groups.sort();
        groups
    }
}

// ---------------------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------------------

#[test]
fn copy_up_of_files_in_nested_lower_dirs() {
    let f3 = fixture::pattern(200_000, 3);
    let lower = LayerBuilder::new()
        .dir_with("a", Meta::new().mode(0o755).xattr("user.dirtag", "a"))
        .dir_with("a/b", Meta::new().mode(0o750).owner(1000, 1000))
        .dir_with("a/b/c", Meta::new().mode(0o700))
        .file_with(
            "a/f1",
            "hello f1\n",
            Meta::new()
                .mode(0o640)
                .owner(1000, 100)
                .xattr("user.tag", "one"),
        )
        .file("a/b/f2", "line1\n")
        .file("a/b/c/f3", &f3)
        .file_with(
            "a/b/c/suid",
            "#!/bin/sh\necho hi\n",
            Meta::new().owner(1000, 1000).mode(0o4755),
        )
        .file_with(
            "a/b/c/sgid",
            "sgid\n",
            Meta::new().owner(1000, 50).mode(0o2755),
        )
        .file("a/b/c/untouched", "keep")
        .file("top", "top file");
    let Some(mut d) = setup(&[lower], Format::NATIVE) else {
        return;
    };
    d.run(&[
        read("a/f1").is(b"hello f1\n"),
        write("a/f1", 0, b"J").ok(),
        read("a/f1").is(b"Jello f1\n"),
        stat("a/f1").gives("file 0640 1000:100 nlink=1 size=9"),
        getxattr("a/f1", "user.tag").is(b"one"),
        append("a/b/f2", b"line2\n").ok(),
        read("a/b/f2").is(b"line1\nline2\n"),
        truncate("a/b/c/f3", 1000).ok(),
        read("a/b/c/f3").is(&f3[..1000]),
        write("a/b/c/f3", 5000, b"tail").ok(),
        stat("a/b/c/f3").gives("file 0644 0:0 nlink=1 size=5004"),
        // Copy-up of a setuid file must keep the bit (chown after chmod would clear it).
        setxattr("a/b/c/suid", "user.x", b"1", 0).ok(),
        stat("a/b/c/suid").gives("file 4755 1000:1000 nlink=1 size=18"),
        chmod("a/b/c/sgid", 0o2750).ok(),
        stat("a/b/c/sgid").gives("file 2750 1000:50 nlink=1 size=5"),
        stat("a/b/c").same(),
        stat("a/b").same(),
        readdir("a/b/c").gives("f3 sgid suid untouched"),
        write("a/b/nope", 0, b"x").fails(ENOENT),
        read("a/b/c/untouched").is(b"keep"),
        readdir("a").gives("b/ f1"),
        getxattr("a", "user.dirtag").is(b"a"),
        readdir(".").gives("a/ top"),
    ]);
    d.finish();
}

#[test]
fn delete_lower_entries_then_recreate_as_file_and_dir() {
    let lower = LayerBuilder::new()
        .file("f", "lower f")
        .file("g", "lower g")
        .file("d/x", "x")
        .file("d/y", "y")
        .file("d/sub/z", "z")
        .file("e/keep", "k")
        .file("e/gone", "g")
        .file("h/inner", "i");
    let Some(mut d) = setup(&[lower], Format::NATIVE) else {
        return;
    };
    d.run(&[
        unlink("f").ok(),
        stat("f").fails(ENOENT),
        read("f").fails(ENOENT),
        create("f", 0o644, b"new f").ok(),
        read("f").is(b"new f"),
        // A directory over a deleted lower file.
        unlink("g").ok(),
        mkdir("g", 0o755).ok(),
        readdir("g").gives(""),
        create("g/child", 0o600, b"c").ok(),
        readdir("g").gives("child"),
        // Empty a lower dir, remove it, make a new one: it must come back empty (opaque).
        unlink("d/x").ok(),
        unlink("d/y").ok(),
        unlink("d/sub/z").ok(),
        rmdir("d/sub").ok(),
        readdir("d").gives(""),
        rmdir("d").ok(),
        stat("d").fails(ENOENT),
        mkdir("d", 0o700).ok(),
        readdir("d").gives(""),
        stat("d/x").fails(ENOENT),
        create("d/new", 0o644, b"n").ok(),
        readdir("d").gives("new"),
        // A file over its own whiteout.
        unlink("e/gone").ok(),
        readdir("e").gives("keep"),
        create("e/gone", 0o644, b"again").ok(),
        read("e/gone").is(b"again"),
        // Errors.
        rmdir("h").fails(ENOTEMPTY),
        rmdir("f").fails(ENOTDIR),
        unlink("h").fails(EISDIR),
        unlink("nope").fails(ENOENT),
        create("f", 0o644, b"x").fails(EEXIST),
        mkdir("e", 0o755).fails(EEXIST),
        rmdir("nope").fails(ENOENT),
        // An upper-only file leaves nothing behind.
        create("u", 0o644, b"upper only").ok(),
        unlink("u").ok(),
        stat("u").fails(ENOENT),
        // A file over a removed lower dir.
        unlink("h/inner").ok(),
        rmdir("h").ok(),
        create("h", 0o644, b"file now").ok(),
        read("h").is(b"file now"),
        readdir(".").gives("d/ e/ f g/ h"),
    ]);
    d.finish();
}

/// Whiteouts and opaque dirs in the top lower, in `fmt` on the stratafs side (the kernel
/// always gets its native char-0/0 + trusted.overlay.opaque): the views must agree.
fn lower_whiteouts_and_opaque_dirs(fmt: Format) {
    let top = LayerBuilder::new()
        .whiteout("w_file")
        .whiteout("w_dir")
        .whiteout("sub/w_nested")
        .file("sub/top_only", "t")
        .opaque_dir("op")
        .file("op/mine", "mine")
        .dir("merge")
        .file("merge/top", "top")
        .file("plain", "plain")
        .opaque_dir("op_empty");
    let bottom = LayerBuilder::new()
        .file("w_file", "hidden")
        .file("w_dir/a", "hidden")
        .file("sub/w_nested", "hidden")
        .file("sub/kept", "kept")
        .file("op/theirs", "hidden")
        .file("op/deep/x", "hidden")
        .file("merge/bottom", "bottom")
        .file("op_empty/hidden", "hidden")
        .file("bottom_only", "b");
    let Some(mut d) = setup(&[top, bottom], fmt) else {
        return;
    };
    d.run(&[
        stat("w_file").fails(ENOENT),
        read("w_file").fails(ENOENT),
        stat("w_dir").fails(ENOENT),
        stat("w_dir/a").fails(ENOENT),
        read("sub/w_nested").fails(ENOENT),
        readdir(".").gives("bottom_only merge/ op/ op_empty/ plain sub/"),
        readdir("op").gives("mine"),
        readdir("op_empty").gives(""),
        readdir("merge").gives("bottom top"),
        readdir("sub").gives("kept top_only"),
        stat("op/theirs").fails(ENOENT),
        stat("op/deep").fails(ENOENT),
        listxattr("op").gives(""),
        listxattr("op_empty").gives(""),
        create("w_file", 0o644, b"new").ok(),
        read("w_file").is(b"new"),
        mkdir("w_dir", 0o755).ok(),
        readdir("w_dir").gives(""),
        unlink("bottom_only").ok(),
        stat("bottom_only").fails(ENOENT),
        unlink("merge/bottom").ok(),
        readdir("merge").gives("top"),
        create("op/theirs", 0o644, b"mine now").ok(),
        readdir("op").gives("mine theirs"),
        read("op/theirs").is(b"mine now"),
        rmdir("op_empty").ok(),
        stat("op_empty").fails(ENOENT),
        mkdir("op_empty", 0o755).ok(),
        readdir("op_empty").gives(""),
        create("sub/w_nested", 0o644, b"back").ok(),
        readdir("sub").gives("kept top_only w_nested"),
        readdir(".").gives("merge/ op/ op_empty/ plain sub/ w_dir/ w_file"),
    ]);
    d.finish();
}

#[test]
fn lower_formats_native_chardev_whiteouts_trusted_opaque() {
    lower_whiteouts_and_opaque_dirs(Format::NATIVE);
}

#[test]
fn lower_formats_aufs_wh_files_and_opq_markers() {
    lower_whiteouts_and_opaque_dirs(Format::AUFS);
}

#[test]
fn lower_formats_user_overlay_opaque_xattr() {
    lower_whiteouts_and_opaque_dirs(Format::USER_XATTR);
}

#[test]
fn three_lowers_shadowing() {
    let l1 = LayerBuilder::new()
        .file("p", "L1 p is a file") // over a dir p/ in L2
        .file("q/in_l1", "q") // a dir over a file q in L2
        .file("r/x", "L1 x")
        .file("s", "L1 s") // over a whiteout in L2 over a file in L3
        .whiteout("t") // hides L3's dir t
        .file("u/l1", "l1");
    let l2 = LayerBuilder::new()
        .file("p/inner", "hidden")
        .file("q", "L2 q")
        .file("r/a", "L2 a")
        .file("r/shadow", "L2 shadow")
        .whiteout("s")
        .file("v", "L2 v") // a file over a dir v/ in L3
        .opaque_dir("u")
        .file("u/l2", "l2");
    let l3 = LayerBuilder::new()
        .file("p/l3", "hidden")
        .file("r/b", "L3 b")
        .file("r/c", "L3 c")
        .file("r/shadow", "L3 shadow")
        .file("s", "L3 s")
        .file("t/gone", "hidden")
        .file("v/deep/x", "hidden")
        .file("u/l3", "hidden")
        .file("w/only_l3", "w");
    let Some(mut d) = setup(&[l1, l2, l3], Format::NATIVE) else {
        return;
    };
    d.run(&[
        read("p").is(b"L1 p is a file"),
        stat("p/inner").fails(ENOTDIR),
        readdir("q").gives("in_l1"),
        readdir("r").gives("a b c shadow x"),
        read("r/shadow").is(b"L2 shadow"),
        read("s").is(b"L1 s"),
        stat("t").fails(ENOENT),
        read("v").is(b"L2 v"),
        readdir("u").gives("l1 l2"),
        readdir("w").gives("only_l3"),
        readdir(".").gives("p q/ r/ s u/ v w/"),
        stat("r").same(),
        stat("w").same(),
        stat("u").same(),
        stat("q").same(),
        write("r/a", 0, b"M").ok(),
        read("r/a").is(b"M2 a"),
        unlink("r/b").ok(),
        readdir("r").gives("a c shadow x"),
        unlink("r/shadow").ok(),
        stat("r/shadow").fails(ENOENT),
        readdir("r").gives("a c x"),
        rmdir("q").fails(ENOTEMPTY),
        unlink("q/in_l1").ok(),
        rmdir("q").ok(),
        stat("q").fails(ENOENT),
        unlink("p").ok(),
        stat("p").fails(ENOENT),
        mkdir("p", 0o755).ok(),
        readdir("p").gives(""),
        unlink("v").ok(),
        stat("v").fails(ENOENT),
        create("w/new", 0o644, b"n").ok(),
        readdir("w").gives("new only_l3"),
        chmod("w/only_l3", 0o600).ok(),
        stat("w/only_l3").gives("file 0600 0:0 nlink=1 size=1"),
        rmdir("u").fails(ENOTEMPTY),
        unlink("u/l1").ok(),
        unlink("u/l2").ok(),
        rmdir("u").ok(),
        stat("u").fails(ENOENT),
        readdir(".").gives("p/ r/ s w/"),
    ]);
    d.finish();
}

#[test]
fn rename_files_across_dirs_noreplace_exchange() {
    let lower = LayerBuilder::new()
        .file("a/f1", "f1")
        .file("a/f2", "f2")
        .file("a/f3", "f3")
        .file("b/g1", "g1")
        .file("b/existing", "old")
        .file("b/olddir/ghost", "must stay hidden")
        .file("x", "x")
        .file("y", "y")
        .file("dirl/inner", "in")
        .dir("emptyl");
    let Some(mut d) = setup(&[lower], Format::NATIVE) else {
        return;
    };
    d.run(&[
        rename("a/f1", "b/new").ok(),
        read("b/new").is(b"f1"),
        stat("a/f1").fails(ENOENT),
        rename("a/f2", "b/existing").ok(),
        read("b/existing").is(b"f2"),
        stat("a/f2").fails(ENOENT),
        rename_noreplace("x", "b/g1").fails(EEXIST),
        read("x").is(b"x"),
        rename_noreplace("x", "b/fresh").ok(),
        stat("x").fails(ENOENT),
        read("b/fresh").is(b"x"),
        rename_exchange("y", "b/g1").ok(),
        read("y").is(b"g1"),
        read("b/g1").is(b"y"),
        rename_exchange("y", "nonexistent").fails(ENOENT),
        rename("y", "dirl").fails(EISDIR),
        rename("dirl", "y").fails(ENOTDIR),
        // A directory with lower content moves too (redirect_dir=on).
        rename("dirl", "dirl2").ok(),
        read("dirl2/inner").is(b"in"),
        stat("dirl").fails(ENOENT),
        rename("emptyl", "emptyl2").same(),
        // Upper-only directories move freely.
        mkdir("newdir", 0o755).ok(),
        create("newdir/inside", 0o644, b"in").ok(),
        mkdir("newdir/sub", 0o755).ok(),
        rename("newdir", "a/moved").ok(),
        readdir("a/moved").gives("inside sub/"),
        read("a/moved/inside").is(b"in"),
        stat("newdir").fails(ENOENT),
        // ... also onto the name of a removed lower dir: its old content must stay hidden.
        unlink("b/olddir/ghost").ok(),
        rmdir("b/olddir").ok(),
        mkdir("fresh", 0o755).ok(),
        create("fresh/f", 0o644, b"fresh").ok(),
        rename("fresh", "b/olddir").ok(),
        readdir("b/olddir").gives("f"),
        rename("a/f3", "a/f3").ok(),
        read("a/f3").is(b"f3"),
        unlink("b/g1").ok(),
        rename_noreplace("b/fresh", "b/g1").ok(),
        read("b/g1").is(b"x"),
        rename("b/new", "x").ok(),
        read("x").is(b"f1"),
        rename_exchange("a/moved", "b/existing").ok(),
        stat("a/moved").gives("file 0644 0:0 nlink=1 size=2"),
        readdir("b/existing").gives("inside sub/"),
        rename("a/f3", "nonexistentdir/f").fails(ENOENT),
        readdir("a").gives("f3 moved"),
        readdir("b").gives("existing/ g1 olddir/"),
        readdir(".").same(),
    ]);
    d.finish();
}

#[test]
fn rmdir_of_merged_dirs_judged_on_the_merged_view() {
    let lower = LayerBuilder::new()
        .file("e/1", "1")
        .file("e/2", "2")
        .file("e/sub/3", "3")
        .file("f/1", "1")
        .dir("g")
        .file("h/1", "1");
    let Some(mut d) = setup(&[lower], Format::NATIVE) else {
        return;
    };
    d.run(&[
        rmdir("f").fails(ENOTEMPTY),
        rmdir("e").fails(ENOTEMPTY),
        unlink("e/1").ok(),
        unlink("e/2").ok(),
        rmdir("e").fails(ENOTEMPTY),
        unlink("e/sub/3").ok(),
        rmdir("e").fails(ENOTEMPTY),
        rmdir("e/sub").ok(),
        readdir("e").gives(""),
        stat("e").same(),
        rmdir("e").ok(),
        stat("e").fails(ENOENT),
        mkdir("e", 0o755).ok(),
        readdir("e").gives(""),
        create("e/1", 0o644, b"fresh").ok(),
        readdir("e").gives("1"),
        read("e/1").is(b"fresh"),
        rmdir("g").ok(),
        stat("g").fails(ENOENT),
        unlink("f/1").ok(),
        create("f/new", 0o644, b"n").ok(),
        rmdir("f").fails(ENOTEMPTY),
        unlink("f/new").ok(),
        rmdir("f").ok(),
        unlink("h/1").ok(),
        mkfifo("h/fifo", 0o644).ok(),
        rmdir("h").fails(ENOTEMPTY),
        readdir(".").gives("e/ h/"),
    ]);
    d.finish();
}

#[test]
fn hard_links_made_through_the_mount() {
    let lower = LayerBuilder::new()
        .file("h/orig", "original")
        .file("h/pair1", "pair")
        .hardlink("h/pair2", "h/pair1")
        .dir("other");
    let Some(mut d) = setup(&[lower], Format::NATIVE) else {
        return;
    };
    d.run(&[
        stat("h/pair1").gives("file 0644 0:0 nlink=2 size=4"),
        link("h/orig", "h/link1").ok(),
        stat("h/orig").gives("file 0644 0:0 nlink=2 size=8"),
        stat("h/link1").gives("file 0644 0:0 nlink=2 size=8"),
        link("h/orig", "other/link2").ok(),
        stat("h/orig").gives("file 0644 0:0 nlink=3 size=8"),
        write("h/link1", 0, b"O").ok(),
        read("h/orig").is(b"Original"),
        read("other/link2").is(b"Original"),
        unlink("h/orig").ok(),
        stat("h/link1").gives("file 0644 0:0 nlink=2 size=8"),
        read("h/link1").is(b"Original"),
        stat("h/orig").fails(ENOENT),
        create("h/new", 0o644, b"n").ok(),
        link("h/new", "h/new2").ok(),
        stat("h/new2").same(),
        link("h/link1", "h/new").fails(EEXIST),
        link("h", "h/dirlink").fails(EPERM),
        link("nope", "h/x").fails(ENOENT),
        readdir("h").gives("link1 new new2 pair1 pair2"),
    ]);
    d.finish();
}

#[test]
fn chmod_chown_truncate_utimes_of_lower_entries() {
    let lower = LayerBuilder::new()
        .file("m/a", "aaaa")
        .file_with("m/b", "b", Meta::new().owner(1000, 1000).mode(0o755))
        .file_with("m/c", "cccc", Meta::new().mode(0o600))
        .file("m/d", "dddddddddd")
        .file("m/e", "e")
        .symlink("m/link", "a")
        .fifo("m/fifo")
        .chardev("m/dev", 1, 3);
    let Some(mut d) = setup(&[lower], Format::NATIVE) else {
        return;
    };
    d.run(&[
        chmod("m/a", 0o600).ok(),
        stat("m/a").gives("file 0600 0:0 nlink=1 size=4"),
        chmod("m/a", 0o4755).ok(),
        stat("m/a").gives("file 4755 0:0 nlink=1 size=4"),
        chown("m/b", 1234, 5678).ok(),
        stat("m/b").gives("file 0755 1234:5678 nlink=1 size=1"),
        chown("m/link", 42, 43).ok(),
        stat("m/link").same(),
        readlink("m/link").gives("a"),
        truncate("m/c", 0).ok(),
        read("m/c").is(b""),
        stat("m/c").gives("file 0600 0:0 nlink=1 size=0"),
        truncate("m/d", 3).ok(),
        read("m/d").is(b"ddd"),
        truncate("m/e", 100_000).ok(),
        stat("m/e").gives("file 0644 0:0 nlink=1 size=100000"),
        utimes("m/a", 1_100_000_000, 1_200_000_000).ok(),
        stat("m/a").same(),
        chmod("m/fifo", 0o600).ok(),
        stat("m/fifo").gives("fifo 0600 0:0 nlink=1"),
        chown("m/dev", 7, 7).ok(),
        stat("m/dev").gives("chr 0644 7:7 nlink=1 rdev=1:3"),
        chmod("m", 0o700).ok(),
        chown("m", 11, 12).ok(),
        stat("m").same(),
        chmod("nope", 0o600).fails(ENOENT),
        chown("nope", 1, 1).fails(ENOENT),
        truncate("m", 0).fails(EISDIR),
        readdir("m").gives("a b c d dev% e fifo| link@"),
    ]);
    d.finish();
}

#[test]
fn symlinks_including_a_hostile_root_link() {
    // `esc` points at a canary directory outside every layer: anything written through a
    // symlink by mistake lands there and is detected. `etc -> /` is only ever read.
    let canary = tempfile::Builder::new()
        .prefix("stratafs-canary-")
        .tempdir()
        .unwrap();
    let canary_dir = canary.path().canonicalize().unwrap();
    fs::write(canary_dir.join("canary"), "safe").unwrap();
    let canary_target = canary_dir.display().to_string();
    let before = fixture::snapshot_layer(&canary_dir);
    let ctimes = |p: &Path| {
        let m = fs::symlink_metadata(p).unwrap();
        (m.ctime(), m.ctime_nsec(), m.mtime(), m.mtime_nsec())
    };
    let canary_times = (ctimes(&canary_dir), ctimes(&canary_dir.join("canary")));

    let lower = LayerBuilder::new()
        .symlink("etc", "/")
        .symlink("esc", &canary_target)
        .symlink("rel", "d/target")
        .file("d/target", "T")
        .symlink("d/up", "../d/target")
        .symlink("dangling", "missing/nowhere");
    let host_passwd = fs::read("/etc/passwd").expect("read /etc/passwd");
    let Some(mut d) = setup(&[lower], Format::NATIVE) else {
        return;
    };
    d.run(&[
        readlink("etc").gives("/"),
        stat("etc").same(),
        // Resolved by the caller's kernel in the caller's namespace, as for any symlink.
        read("etc/etc/passwd").is(&host_passwd),
        readlink("esc").gives(canary_target.clone()),
        read("esc/canary").is(b"safe"),
        read("rel").is(b"T"),
        read("d/up").is(b"T"),
        read("dangling").fails(ENOENT),
        readlink("dangling").gives("missing/nowhere"),
        readlink("d/target").fails(libc::EINVAL),
        create("etc", 0o644, b"x").fails(EEXIST),
        mkdir("etc", 0o755).fails(EEXIST),
        // Operations on the links themselves (each copies the link up, never its target).
        rename("esc", "esc2").ok(),
        readlink("esc2").gives(canary_target.clone()),
        chown("esc2", 4, 4).ok(),
        utimes("esc2", 1_100_000_000, 1_100_000_000).ok(),
        stat("esc2").same(),
        setxattr("esc2", "user.x", b"1", 0).fails(EPERM),
        link("esc2", "esc3").ok(),
        readlink("esc3").gives(canary_target.clone()),
        symlink("/", "newlink").ok(),
        readlink("newlink").gives("/"),
        unlink("etc").ok(),
        stat("etc").fails(ENOENT),
        symlink("elsewhere", "etc").ok(),
        readlink("etc").gives("elsewhere"),
        unlink("dangling").ok(),
        readdir(".").gives("d/ esc2@ esc3@ etc@ newlink@ rel@"),
    ]);
    let after = fixture::snapshot_layer(&canary_dir);
    fixture::assert_same_tree("canary before", &before, "canary after", &after);
    assert_eq!(
        canary_times,
        (ctimes(&canary_dir), ctimes(&canary_dir.join("canary"))),
        "something changed the canary directory through the `esc` symlink"
    );
    d.finish();
    drop(canary);
}

#[test]
fn xattrs_set_get_list_remove_on_lower_entries() {
    let big = vec![b'v'; 4000];
    let lower = LayerBuilder::new()
        .file_with(
            "x/file",
            "f",
            Meta::new().xattr("user.a", "1").xattr("user.b", "two"),
        )
        .file_with("x/file2", "f2", Meta::new().xattr("user.a", "1"))
        .dir_with("x/dir", Meta::new().xattr("user.d", "dir"))
        .file("x/noattr", "n");
    let Some(mut d) = setup(&[lower], Format::NATIVE) else {
        return;
    };
    d.run(&[
        listxattr("x/file").gives("user.a user.b"),
        getxattr("x/file", "user.a").is(b"1"),
        getxattr("x/file", "user.zz").fails(ENODATA),
        setxattr("x/file", "user.c", b"three", 0).ok(),
        listxattr("x/file").gives("user.a user.b user.c"),
        setxattr("x/file", "user.a", b"again", libc::XATTR_CREATE).fails(EEXIST),
        setxattr("x/file", "user.nope", b"v", libc::XATTR_REPLACE).fails(ENODATA),
        setxattr("x/file", "user.a", b"uno", libc::XATTR_REPLACE).ok(),
        getxattr("x/file", "user.a").is(b"uno"),
        removexattr("x/file", "user.b").ok(),
        removexattr("x/file", "user.b").fails(ENODATA),
        listxattr("x/file").gives("user.a user.c"),
        read("x/file").is(b"f"),
        // Removing the only xattr of a lower file copies it up first.
        removexattr("x/file2", "user.a").ok(),
        listxattr("x/file2").gives(""),
        setxattr("x/dir", "user.e", b"E", 0).ok(),
        listxattr("x/dir").gives("user.d user.e"),
        getxattr("x/dir", "user.d").is(b"dir"),
        listxattr("x/noattr").gives(""),
        getxattr("x/noattr", "user.a").fails(ENODATA),
        setxattr("x/noattr", "user.big", &big, 0).ok(),
        getxattr("x/noattr", "user.big").is(&big),
        setxattr("x/missing", "user.a", b"1", 0).fails(ENOENT),
        listxattr("x").same(),
    ]);
    d.finish();
}

#[test]
fn special_files_fifo_socket_devices_and_the_whiteout_device() {
    let lower = LayerBuilder::new()
        .file("dev/existing", "e")
        .fifo("dev/lowerfifo");
    let Some(mut d) = setup(&[lower], Format::NATIVE) else {
        return;
    };
    d.run(&[
        mkfifo("dev/fifo", 0o640).ok(),
        stat("dev/fifo").same(),
        mknod("dev/null", libc::S_IFCHR | 0o644, 1, 3).ok(),
        stat("dev/null").same(),
        // A 0/0 char device is how whiteouts are stored: refused.
        mknod("dev/wh", libc::S_IFCHR | 0o600, 0, 0).fails(EPERM),
        stat("dev/wh").fails(ENOENT),
        mknod("dev/sock", libc::S_IFSOCK | 0o755, 0, 0).ok(),
        stat("dev/sock").same(),
        mknod("dev/existing", libc::S_IFIFO | 0o644, 0, 0).fails(EEXIST),
        stat("dev/lowerfifo").same(),
        unlink("dev/lowerfifo").ok(),
        readdir("dev").gives("existing fifo| null% sock="),
    ]);
    d.finish();
}

/// Directories with lower content (lower-only and merged) renamed every way a plain
/// filesystem allows: again, via a parent, over an empty directory, into another
/// directory, back, exchanged, emptied and removed. The harness then remounts both and
/// compares again, so the redirects must persist.
#[test]
fn rename_of_directories_with_lower_content() {
    let base = LayerBuilder::new()
        .file("src/a.txt", "a")
        .file("src/sub/deep.txt", "deep")
        .dir("src/sub/empty")
        .file("merged/low.txt", "low")
        .file("p/child/c.txt", "c")
        .file("p/other.txt", "o")
        .dir("target_empty")
        .file("ex1/one", "1")
        .file("ex2/two", "2")
        .file("gone/g.txt", "g")
        .dir("dest");
    let top = LayerBuilder::new().file("merged/top.txt", "top");
    let Some(mut d) = setup(&[top, base], Format::NATIVE) else {
        return;
    };
    d.run(&[
        // A lower-only directory, renamed in place, then again, then moved.
        rename("src", "src2").ok(),
        readdir("src2").gives("a.txt sub/"),
        read("src2/sub/deep.txt").is(b"deep"),
        stat("src").fails(ENOENT),
        rename("src2", "src3").ok(),
        rename("src3", "dest/src4").ok(),
        readdir("dest/src4/sub").gives("deep.txt empty/"),
        write("dest/src4/a.txt", 1, b"!").ok(),
        read("dest/src4/a.txt").is(b"a!"),
        create("dest/src4/new.txt", 0o644, b"new").ok(),
        unlink("dest/src4/sub/deep.txt").ok(),
        readdir("dest/src4/sub").gives("empty/"),
        // The old name can be used again without showing the moved content.
        mkdir("src", 0o755).ok(),
        readdir("src").gives(""),
        // A directory merged from two lower layers.
        rename("merged", "m2").ok(),
        readdir("m2").gives("low.txt top.txt"),
        // The parent of a moved directory moves.
        rename("p/child", "p/kid").ok(),
        rename("p", "q").ok(),
        read("q/kid/c.txt").is(b"c"),
        read("q/other.txt").is(b"o"),
        readdir("q").gives("kid/ other.txt"),
        // Over an empty lower directory.
        rename("q/kid", "target_empty").ok(),
        readdir("target_empty").gives("c.txt"),
        // Exchange two lower directories.
        rename_exchange("ex1", "ex2").ok(),
        readdir("ex1").gives("two"),
        readdir("ex2").gives("one"),
        // Moved, emptied and removed.
        rename("gone", "dest/gone2").ok(),
        rmdir("dest/gone2").fails(ENOTEMPTY),
        unlink("dest/gone2/g.txt").ok(),
        rmdir("dest/gone2").ok(),
        stat("gone").fails(ENOENT),
        readdir("dest").gives("src4/"),
        // And back to where it came from.
        rename("m2", "merged").ok(),
        readdir("merged").gives("low.txt top.txt"),
        readdir(".").gives("dest/ ex1/ ex2/ merged/ q/ src/ target_empty/"),
    ]);
    d.finish();
}

/// A file with several names in a lower layer stays one file once written through any
/// of them: the data, st_nlink and inode number agree on every name, before and after
/// the remount the harness does.
#[test]
fn hard_links_of_lower_layers_stay_linked() {
    let lower = LayerBuilder::new()
        .file("h1", "shared")
        .hardlink("d/h2", "h1")
        .hardlink("e/h3", "h1")
        .file("k1", "keep")
        .hardlink("k2", "k1")
        .file("u1", "gone")
        .hardlink("u2", "u1")
        .hardlink("u3", "u1");
    let Some(mut d) = setup(&[lower], Format::NATIVE) else {
        return;
    };
    d.upper_differs_by_design();
    d.run(&[
        // Directories both copy up, so that both show them merged (st_nlink 1).
        create("d/marker", 0o644, b"").ok(),
        create("e/marker", 0o644, b"").ok(),
        stat("h1").gives("file 0644 0:0 nlink=3 size=6"),
        write("d/h2", 0, b"SH").ok(),
        read("h1").is(b"SHared"),
        read("e/h3").is(b"SHared"),
        stat("h1").gives("file 0644 0:0 nlink=3 size=6"),
        stat("e/h3").gives("file 0644 0:0 nlink=3 size=6"),
        chmod("k2", 0o600).ok(),
        stat("k1").gives("file 0600 0:0 nlink=2 size=4"),
        // Removing one name of a lower group: the others count one less.
        unlink("u2").ok(),
        stat("u1").gives("file 0644 0:0 nlink=2 size=4"),
        link("u3", "u4").ok(),
        stat("u1").gives("file 0644 0:0 nlink=3 size=4"),
        rename("u3", "d/u5").ok(),
        read("d/u5").is(b"gone"),
        stat("u4").gives("file 0644 0:0 nlink=3 size=4"),
    ]);
    d.finish();
}

/// With `metacopy=on`, chmod/chown/utimes/setxattr of a lower file copy up metadata
/// only: the merged view is as if the data were copied, the upper file holds no data
/// until a writer comes, and after the remount the data is still found below.
#[test]
fn metadata_only_copy_up_with_metacopy_on() {
    let big = fixture::pattern(3 << 20, 7);
    let lower = LayerBuilder::new()
        .file("big", &big)
        .file("d/meta", &big[..2 << 20])
        .file("written", &big[..(1 << 20) + 5]);
    let Some(mut d) = setup_with(&[lower], Format::NATIVE, true) else {
        return;
    };
    d.run(&[
        chmod("big", 0o600).ok(),
        chown("big", 1000, 1000).ok(),
        utimes("big", 1_000_000_000, 1_100_000_000).ok(),
        stat("big").gives("file 0600 1000:1000 nlink=1 size=3145728"),
        read("big").is(&big),
        setxattr("d/meta", "user.k", b"v", 0).ok(),
        getxattr("d/meta", "user.k").is(b"v"),
        read("d/meta").is(&big[..2 << 20]),
        chmod("written", 0o640).ok(),
        write("written", 10, b"NEW").ok(),
        stat("written").gives("file 0640 0:0 nlink=1 size=1048581"),
    ]);
    // At most an xattr block, none of the data.
    let upper_bytes = |p: &str| fs::symlink_metadata(d.sl.upper.join(p)).unwrap().blocks() * 512;
    assert!(
        upper_bytes("big") <= 8192,
        "chmod copied the data of a 3 MiB file up"
    );
    assert!(upper_bytes("d/meta") <= 8192, "setxattr copied the data up");
    assert!(
        upper_bytes("written") >= 1 << 20,
        "a write must copy the data up"
    );
    d.finish();
}
