//! Grafts driven through the engine directly, with no mount: routing under a graft,
//! the boundary errors, cache lifetimes, and mount-time refusals.

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};

use stratafs::MountConfig;
use stratafs::config::{GraftSource, GraftSpec};
use stratafs::testing::engine::{
    Caller, DEFAULT_TTL, Errno, GRAFT_TTL, Ino, ROOT_INO, RenameMode, Union, open_as_mount,
};

struct Scene {
    _tmp: tempfile::TempDir,
    root: PathBuf,
}

impl Scene {
    fn new() -> Scene {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        for d in ["lower/etc", "upper", "work", "mnt", "host", "state"] {
            fs::create_dir_all(root.join(d)).unwrap();
        }
        fs::write(root.join("lower/etc/conf"), "c").unwrap();
        fs::write(root.join("host/h"), "h").unwrap();
        Scene { _tmp: tmp, root }
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    fn config(&self, grafts: Vec<GraftSpec>) -> MountConfig {
        let mut c = MountConfig::new(vec![self.p("lower")], self.p("mnt"));
        c.upperdir = Some(self.p("upper"));
        c.workdir = Some(self.p("work"));
        c.state_dir = Some(self.p("state"));
        c.grafts = grafts;
        c
    }
}

fn graft(source: GraftSource, target: &str, read_only: bool) -> GraftSpec {
    GraftSpec {
        source,
        target: target.into(),
        read_only,
        nocopy: false,
        nocreate: false,
        delete: false,
    }
}

fn walk(u: &Union, path: &str) -> Result<Ino, Errno> {
    let mut ino = ROOT_INO;
    for part in Path::new(path).iter() {
        ino = u.lookup(ino, part)?.attr.ino;
    }
    Ok(ino)
}

fn os(s: &str) -> &OsStr {
    OsStr::new(s)
}

#[test]
fn operations_under_a_graft_go_to_the_volume_only() {
    let s = Scene::new();
    let u = open_as_mount(&s.config(vec![
        graft(GraftSource::Volume("v".into()), "/data/v", false),
        graft(GraftSource::Bind(s.p("host")), "/srv", true),
    ]))
    .unwrap();
    let data = walk(&u, "data").unwrap();
    let vol = u.lookup(data, os("v")).unwrap();
    assert_eq!(vol.ttl, GRAFT_TTL);
    assert_eq!(u.lookup(ROOT_INO, os("etc")).unwrap().ttl, DEFAULT_TTL);

    let (e, fh, _) = u
        .create(Caller::ROOT, vol.attr.ino, os("f"), 0o644, 0)
        .unwrap();
    assert_eq!(u.write(fh, 0, b"data").unwrap(), 4);
    u.release(fh);
    assert_eq!(u.attr_ttl(e.attr.ino), GRAFT_TTL);
    let dir = u.mkdir(Caller::ROOT, vol.attr.ino, os("d"), 0o755).unwrap();
    u.rename(
        vol.attr.ino,
        os("f"),
        dir.attr.ino,
        os("g"),
        RenameMode::Replace,
    )
    .unwrap();
    let volume = s.p("state/volumes/v/_data");
    assert_eq!(fs::read_to_string(volume.join("d/g")).unwrap(), "data");
    assert_eq!(
        fs::read_dir(s.p("upper")).unwrap().count(),
        0,
        "upper untouched"
    );

    // Boundaries.
    let etc = walk(&u, "etc").unwrap();
    let conf = walk(&u, "etc/conf").unwrap();
    let g = walk(&u, "data/v/d/g").unwrap();
    assert_eq!(
        u.rename(dir.attr.ino, os("g"), etc, os("g"), RenameMode::Replace),
        Err(Errno::XDEV.into())
    );
    assert_eq!(
        u.link(conf, vol.attr.ino, os("l")).err(),
        Some(Errno::XDEV.into())
    );
    assert_eq!(u.link(g, etc, os("l")).err(), Some(Errno::XDEV.into()));
    assert_eq!(u.rmdir(data, os("v")), Err(Errno::BUSY.into()));
    assert_eq!(u.rmdir(ROOT_INO, os("data")), Err(Errno::BUSY.into()));
    assert_eq!(
        u.rename(
            ROOT_INO,
            os("srv"),
            ROOT_INO,
            os("srv2"),
            RenameMode::Replace
        ),
        Err(Errno::BUSY.into())
    );
    let srv = walk(&u, "srv").unwrap();
    assert_eq!(
        u.mkdir(Caller::ROOT, srv, os("x"), 0o755).err(),
        Some(Errno::ROFS.into())
    );
    let h = walk(&u, "srv/h").unwrap();
    assert_eq!(u.open(h, libc::O_WRONLY).err(), Some(Errno::ROFS.into()));
    assert_eq!(u.unlink(srv, os("h")), Err(Errno::ROFS.into()));

    // Unlinking inside the volume removes the file there, leaving no whiteout.
    u.unlink(dir.attr.ino, os("g")).unwrap();
    assert!(!volume.join("d/g").exists());
    assert_eq!(fs::read_dir(volume.join("d")).unwrap().count(), 0);
}

#[test]
fn mount_time_refusals_name_the_graft() {
    let s = Scene::new();
    let err = |grafts| match open_as_mount(&s.config(grafts)) {
        Err(e) => e,
        Ok(_) => panic!("mounted"),
    };
    let e = err(vec![graft(
        GraftSource::Volume("v".into()),
        "/etc/conf",
        false,
    )]);
    assert!(
        e.contains("volume v") && e.contains("not a directory"),
        "{e}"
    );
    let e = err(vec![
        graft(GraftSource::Volume("outer".into()), "/a", false),
        graft(GraftSource::Volume("inner".into()), "/a/b", false),
    ]);
    assert!(e.contains("nested"), "{e}");
    let e = err(vec![
        graft(GraftSource::Volume("same".into()), "/a", false),
        graft(GraftSource::Volume("same".into()), "/b", false),
    ]);
    assert!(e.contains("twice"), "{e}");
}

fn names(u: &Union, dir: Ino) -> Vec<String> {
    let fh = u.opendir(dir).unwrap();
    let mut v: Vec<String> = u
        .readdir(fh, 0)
        .unwrap()
        .iter()
        .map(|e| e.name.to_string_lossy().into_owned())
        .filter(|n| n != "." && n != "..")
        .collect();
    u.releasedir(fh);
    v.sort();
    v
}

#[test]
fn a_read_only_union_shows_the_path_to_a_graft_and_the_graft_read_only() {
    let s = Scene::new();
    let mut c = s.config(vec![graft(
        GraftSource::Volume("v".into()),
        "/new/deep/v",
        false,
    )]);
    c.upperdir = None;
    c.workdir = None;
    let u = open_as_mount(&c).unwrap();
    assert_eq!(names(&u, ROOT_INO), ["etc", "new"]);
    let deep = walk(&u, "new/deep").unwrap();
    assert_eq!(names(&u, deep), ["v"]);
    let v = walk(&u, "new/deep/v").unwrap();
    assert_eq!(u.getattr(v).unwrap().mode & libc::S_IFMT, libc::S_IFDIR);
    fs::write(s.p("state/volumes/v/_data/from-host"), "h").unwrap();
    // A name that looks like a whiteout is an ordinary file inside a volume.
    fs::write(s.p("state/volumes/v/_data/.wh.plain"), "w").unwrap();
    assert_eq!(names(&u, v), [".wh.plain", "from-host"]);
    assert!(u.lookup(v, os(".wh.plain")).is_ok());
    assert_eq!(
        u.create(Caller::ROOT, v, os("f"), 0o644, 0).err(),
        Some(Errno::ROFS.into())
    );
}

/// `:nocreate` holds where the mount takes the volume, not only in the CLI's early
/// check: a missing volume fails the mount, naming it, and is not created.
#[test]
fn nocreate_is_enforced_when_the_mount_takes_the_volume() {
    let s = Scene::new();
    let mut g = graft(GraftSource::Volume("ghost".into()), "/data", false);
    g.nocreate = true;
    let err = match open_as_mount(&s.config(vec![g])) {
        Ok(_) => panic!("a :nocreate graft of a missing volume mounted"),
        Err(e) => e,
    };
    assert!(
        err.contains("volume ghost does not exist") && err.contains("nocreate"),
        "{err}"
    );
    assert!(!s.p("state/volumes/ghost").exists());
}

/// `:delete` removes the volume the mount created when the mount ends (or fails after
/// creating it), and never one that existed before.
#[test]
fn delete_removes_only_the_volume_the_mount_created() {
    let s = Scene::new();
    let spec = |name: &str| {
        let mut g = graft(GraftSource::Volume(name.into()), &format!("/{name}"), false);
        g.delete = true;
        g
    };
    let u = open_as_mount(&s.config(vec![spec("scratch")])).unwrap();
    assert!(s.p("state/volumes/scratch/_data").is_dir());
    drop(u);
    assert!(!s.p("state/volumes/scratch").exists(), "not removed");

    let kept = open_as_mount(&s.config(vec![graft(
        GraftSource::Volume("kept".into()),
        "/kept",
        false,
    )]))
    .unwrap();
    drop(kept);
    fs::write(s.p("state/volumes/kept/_data/f"), "mine").unwrap();
    let u = open_as_mount(&s.config(vec![spec("kept")])).unwrap();
    drop(u);
    assert_eq!(
        fs::read_to_string(s.p("state/volumes/kept/_data/f")).unwrap(),
        "mine"
    );
}

/// A mount that fails after creating a `:delete` volume (here: another graft's access
/// mode refuses it) removes that volume again, and does so without waiting on the
/// volume lock it still holds itself.
#[test]
fn a_mount_failing_after_creating_a_delete_volume_removes_it() {
    let s = Scene::new();
    let (tx, rx) = std::sync::mpsc::channel();
    let state = s.p("state");
    let config = {
        let mut made = graft(GraftSource::Volume("made".into()), "/made", false);
        made.delete = true;
        s.config(vec![
            made,
            graft(GraftSource::Volume("shelf".into()), "/shelf", false),
        ])
    };
    let created = std::process::Command::new(env!("CARGO_BIN_EXE_stratafs"))
        .args(["volume", "--state-dir"])
        .arg(&state)
        .args(["create", "--access", "rox", "shelf"])
        .status()
        .unwrap();
    assert!(created.success());
    std::thread::spawn(move || {
        let _ = tx.send(open_as_mount(&config).err());
    });
    let err = rx
        .recv_timeout(std::time::Duration::from_secs(20))
        .expect("the failing mount hung (waiting on its own volume lock?)")
        .expect("a read-write graft of an rox volume mounted");
    assert!(err.contains("volume shelf") && err.contains("rox"), "{err}");
    assert!(!state.join("volumes/made").exists(), "made was kept");
    assert!(state.join("volumes/shelf").exists());
}
