//! The public library API (`stratafs::Engine`), as a program embedding the union
//! uses it: opened with the builder, addressed by path, handles that give back what
//! they hold, errors that say what failed. No mount, no root needed.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use stratafs::{Engine, Errno, SetupError};

struct Dirs {
    _tmp: tempfile::TempDir,
    root: PathBuf,
}

impl Dirs {
    /// Two lower layers (`lower` over `base`), an upper and a workdir.
    fn new() -> Dirs {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().to_path_buf();
        for d in ["lower/etc", "base/etc", "base/usr/lib", "upper", "work"] {
            fs::create_dir_all(root.join(d)).expect("mkdir");
        }
        fs::write(root.join("base/etc/motd"), "base motd\n").expect("write");
        fs::write(root.join("base/etc/hosts"), "base hosts\n").expect("write");
        fs::write(root.join("lower/etc/motd"), "lower motd\n").expect("write");
        fs::write(root.join("base/usr/lib/libc.so"), "elf").expect("write");
        Dirs { _tmp: tmp, root }
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    fn engine(&self) -> Engine {
        Engine::builder([self.p("lower"), self.p("base")])
            .upper(self.p("upper"), self.p("work"))
            .open()
            .expect("open")
    }
}

fn names(engine: &Engine, path: &str) -> Vec<String> {
    let mut v: Vec<String> = engine
        .read_dir(path)
        .expect("read_dir")
        .into_iter()
        .map(|e| e.name.to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn reads_see_the_top_layer_and_writes_copy_up_without_touching_the_lowers() {
    let d = Dirs::new();
    let engine = d.engine();
    assert_eq!(engine.read("/etc/motd").unwrap(), b"lower motd\n");
    assert_eq!(names(&engine, "/etc"), ["hosts", "motd"]);

    engine.write("/etc/hosts", b"mine\n").unwrap();
    engine.write("/etc/new", b"new\n").unwrap();
    assert_eq!(engine.read("etc/hosts").unwrap(), b"mine\n");
    assert_eq!(fs::read(d.p("upper/etc/hosts")).unwrap(), b"mine\n");
    assert_eq!(fs::read(d.p("upper/etc/new")).unwrap(), b"new\n");
    assert_eq!(fs::read(d.p("base/etc/hosts")).unwrap(), b"base hosts\n");

    engine.remove_file("/etc/motd").unwrap();
    assert_eq!(names(&engine, "/etc"), ["hosts", "new"]);
    assert_eq!(engine.stat("/etc/motd").unwrap_err(), Errno::NOENT);
    assert!(d.p("lower/etc/motd").exists(), "a lower file was removed");
    let whiteout = fs::symlink_metadata(d.p("upper/etc/motd")).expect("whiteout in upper");
    assert_eq!(whiteout.rdev(), 0, "not a whiteout: {whiteout:?}");

    engine.create_dir("/srv", 0o755).unwrap();
    engine.rename("/etc/new", "/srv/new").unwrap();
    engine.symlink("../usr/lib/libc.so", "/srv/libc").unwrap();
    assert_eq!(
        engine.read_link("/srv/libc").unwrap(),
        Path::new("../usr/lib/libc.so")
    );
    assert_eq!(names(&engine, "/srv"), ["libc", "new"]);
    engine.remove_file("/srv/new").unwrap();
    engine.remove_file("/srv/libc").unwrap();
    engine.remove_dir("/srv").unwrap();
    assert_eq!(engine.stat("/srv").unwrap_err(), Errno::NOENT);
}

#[test]
fn dropped_handles_give_back_every_inode_they_held() {
    let d = Dirs::new();
    let engine = d.engine();
    let root_only = stratafs::testing::held_inodes(&engine);
    {
        let lib = engine.lookup("/usr/lib/libc.so").unwrap();
        let file = lib.open(libc::O_RDONLY).unwrap();
        // The file keeps its inode and every parent, as the kernel does.
        assert_eq!(stratafs::testing::held_inodes(&engine), root_only + 3);
        drop(lib);
        assert_eq!(file.read_at(0, 16).unwrap(), b"elf");
        assert_eq!(stratafs::testing::held_inodes(&engine), root_only + 3);
    }
    engine.write("/usr/lib/other", b"x").unwrap();
    assert_eq!(names(&engine, "/usr/lib"), ["libc.so", "other"]);
    assert_eq!(stratafs::testing::held_inodes(&engine), root_only);
}

#[test]
fn paths_the_engine_cannot_resolve_are_refused_not_guessed() {
    let d = Dirs::new();
    let engine = d.engine();
    assert_eq!(engine.stat("/etc/../etc/motd").unwrap_err(), Errno::INVAL);
    assert_eq!(engine.remove_file("/").unwrap_err(), Errno::INVAL);
    assert_eq!(engine.read("/etc/motd/x").unwrap_err(), Errno::NOTDIR);
}

#[test]
fn a_union_without_upper_is_read_only() {
    let d = Dirs::new();
    let engine = Engine::builder([d.p("lower"), d.p("base")]).open().unwrap();
    assert_eq!(engine.read("/etc/hosts").unwrap(), b"base hosts\n");
    assert_eq!(engine.write("/etc/hosts", b"x").unwrap_err(), Errno::ROFS);
    assert_eq!(engine.create_dir("/x", 0o755).unwrap_err(), Errno::ROFS);
}

#[test]
fn setup_errors_name_the_directory_and_its_role() {
    let d = Dirs::new();
    let err = Engine::builder([d.p("lower"), d.p("missing")])
        .open()
        .err()
        .expect("opened");
    match &err {
        SetupError::Layer { role, path, source } => {
            assert_eq!(*role, "lowerdir");
            assert_eq!(path, &d.p("missing"));
            assert_eq!(*source, Errno::NOENT);
        }
        other => panic!("not a layer error: {other:?}"),
    }
    assert!(
        err.to_string().contains(&*d.p("missing").to_string_lossy()),
        "{err}"
    );
}

#[test]
fn staged_leftovers_of_an_earlier_union_are_cleared_only_when_asked() {
    let d = Dirs::new();
    drop(d.engine());
    let leftover = d.p("work/work/#stratafs-copy-123");
    fs::write(&leftover, "half a copy").unwrap();
    match Engine::builder([d.p("lower")])
        .upper(d.p("upper"), d.p("work"))
        .open()
    {
        Err(SetupError::StaleWork(path)) => assert_eq!(path, d.p("work/work")),
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("opened over staged leftovers"),
    }
    assert!(
        leftover.exists(),
        "the leftover was removed without being asked"
    );
    let engine = Engine::builder([d.p("lower")])
        .upper(d.p("upper"), d.p("work"))
        .clear_stale_work()
        .open()
        .unwrap();
    assert!(!leftover.exists(), "clear_stale_work left it");
    assert_eq!(engine.read("/etc/motd").unwrap(), b"lower motd\n");
}

/// The soft open-file limit of this process, from /proc (what `ulimit -Sn` shows).
fn soft_nofile() -> u64 {
    let limits = fs::read_to_string("/proc/self/limits").expect("limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("Max open files");
    line.split_whitespace()
        .nth(3)
        .expect("soft")
        .parse()
        .expect("number")
}

const CHILD_ENV: &str = "STRATAFS_TEST_LIBRARY_CHILD";

/// Checked in a child process of its own (this test re-run with [`CHILD_ENV`] set
/// and a low soft limit), since the other tests of this process raise the limit as
/// a mount does.
#[test]
fn opening_an_engine_leaves_the_process_limits_alone() {
    if std::env::var_os(CHILD_ENV).is_some() {
        let before = soft_nofile();
        let d = Dirs::new();
        let engine = d.engine();
        engine.write("/etc/hosts", b"x").unwrap();
        assert_eq!(soft_nofile(), before, "the engine changed RLIMIT_NOFILE");
        println!("soft limit kept at {before}");
        return;
    }
    let exe = std::env::current_exe().expect("test binary");
    let out = Command::new("sh")
        .arg("-c")
        .arg("ulimit -Sn 200 && exec \"$0\" --exact --nocapture --test-threads 1 \"$1\"")
        .arg(&exe)
        .arg("library::opening_an_engine_leaves_the_process_limits_alone")
        .env(CHILD_ENV, "1")
        .output()
        .expect("run the child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("soft limit kept at 200"),
        "child failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
