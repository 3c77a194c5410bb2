//! Volumes and bind grafts on a live mount: persistence, read-only grafts, EXDEV/EBUSY
//! at graft boundaries, population, sharing between mounts and with the host,
//! access modes and their claims, size limits and their change under a live mount,
//! the :delete reclaim policy, and bind mounts of a graft.

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use libc::{EBUSY, ENOENT, ENOSPC, EROFS, EXDEV};

use crate::fixture::{
    self, Errno, LayerBuilder, Layers, Meta, StrataMount, assert_errno, io_errno, lgetxattr, lstat,
    mount_at, stratafs_bin,
};

/// A scratch area: the layers of `Layers` plus a volume state directory and room for
/// more containers (each an upper, a workdir and a mountpoint).
struct Scene {
    l: Layers,
    state: PathBuf,
}

impl Scene {
    fn new(lower: LayerBuilder) -> Scene {
        let l = Layers::new(&[lower]);
        let state = l.root.join("state");
        Scene { l, state }
    }

    /// A fresh container's upper, workdir and mountpoint, named `tag`.
    fn container(&self, tag: &str) -> (PathBuf, PathBuf, PathBuf) {
        let dirs = ["upper", "work", "mnt"].map(|d| self.l.root.join(format!("{tag}-{d}")));
        for d in &dirs {
            fs::create_dir_all(d).unwrap();
        }
        let [u, w, m] = dirs;
        (u, w, m)
    }

    fn options(&self, upper: &Path, work: &Path, grafts: &str) -> String {
        format!(
            "lowerdir={},upperdir={},workdir={},{grafts}",
            self.l.lowerdir(),
            upper.display(),
            work.display()
        )
    }

    /// Mounts a container `tag` with `grafts` (comma-separated -o items).
    fn mount(&self, tag: &str, grafts: &str) -> StrataMount {
        let (u, w, m) = self.container(tag);
        StrataMount::with_args(
            &self.options(&u, &w, grafts),
            &["--state-dir", self.state.to_str().unwrap()],
            &m,
            &self.l.root,
        )
    }

    fn data(&self, volume: &str) -> PathBuf {
        self.state.join("volumes").join(volume).join("_data")
    }

    /// Runs `stratafs ARGS` with this scene's state directory; (success, stdout, stderr).
    fn cli(&self, args: &[&str]) -> (bool, String, String) {
        let out = Command::new(stratafs_bin())
            .args(args)
            .env("STRATAFS_STATE_DIR", &self.state)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Runs a daemon-mode mount that must fail; returns its stderr. Should it mount
    /// after all, the mount is taken down before the test fails.
    fn mount_must_fail(&self, tag: &str, grafts: &str) -> String {
        let (u, w, m) = self.container(tag);
        let out = Command::new(stratafs_bin())
            .arg("--state-dir")
            .arg(&self.state)
            .arg("-o")
            .arg(self.options(&u, &w, grafts))
            .arg(&m)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let mounted = mount_at(&m).is_some();
        if mounted {
            let _ = Command::new("fusermount3").arg("-u").arg(&m).status();
        }
        assert!(
            !out.status.success() && !mounted,
            "mount with {grafts} should have failed before mounting"
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }
}

fn res<T>(r: std::io::Result<T>) -> Result<T, Errno> {
    r.map_err(|e| io_errno(&e))
}

fn link(a: &Path, b: &Path) -> Result<(), Errno> {
    res(fs::hard_link(a, b))
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn volume_data_outlives_the_container_and_never_touches_upper() {
    if !fixture::require_fuse() {
        return;
    }
    let s = Scene::new(LayerBuilder::new().file("etc/os", "image"));
    let mut a = s.mount("a", "volume=db:/var/lib/db");
    fs::write(a.join("var/lib/db/table"), "rows").unwrap();
    fs::create_dir(a.join("var/lib/db/sub")).unwrap();
    fs::write(a.join("var/lib/db/sub/x"), "x").unwrap();
    fs::rename(a.join("var/lib/db/table"), a.join("var/lib/db/sub/table")).unwrap();
    fs::write(a.join("etc/os"), "changed").unwrap();
    a.unmount();

    assert_eq!(
        fs::read_to_string(s.data("db").join("sub/table")).unwrap(),
        "rows"
    );
    // The container's upper holds its own change, and nothing of the volume: not even
    // the directories leading to the graft point.
    let upper = s.l.root.join("a-upper");
    assert_eq!(files_in(&upper), ["etc"]);

    // A new container (fresh upper) grafting the same volume sees the data.
    let b = s.mount("b", "volume=db:/data");
    assert_eq!(
        fs::read_to_string(b.join("data/sub/table")).unwrap(),
        "rows"
    );
    assert_eq!(fs::read_to_string(b.join("etc/os")).unwrap(), "image");
}

#[test]
fn graft_point_exists_where_the_layers_lack_it_and_is_listed() {
    if !fixture::require_fuse() {
        return;
    }
    let s = Scene::new(LayerBuilder::new().dir("usr"));
    let host = s.l.root.join("host");
    fs::create_dir(&host).unwrap();
    fs::write(host.join("h"), "host file").unwrap();
    let m = s.mount(
        "a",
        &format!("volume=v:/new/deep/x,bind={}:/usr/share", host.display()),
    );
    assert!(fs::metadata(m.join("new/deep/x")).unwrap().is_dir());
    assert_eq!(files_in(&m.join("new/deep")), ["x"]);
    assert!(files_in(m.path()).contains(&"new".to_string()));
    assert_eq!(files_in(&m.join("usr")), ["share"]);
    assert_eq!(
        fs::read_to_string(m.join("usr/share/h")).unwrap(),
        "host file"
    );
    // d_ino of a graft point is the st_ino of what is mounted there.
    let listed = fs::read_dir(m.join("new/deep"))
        .unwrap()
        .map(|e| std::os::unix::fs::DirEntryExt::ino(&e.unwrap()))
        .collect::<Vec<_>>();
    assert_eq!(listed, [lstat(&m.join("new/deep/x")).unwrap().ino()]);
}

#[test]
fn read_only_grafts_answer_erofs_and_stay_readable() {
    if !fixture::require_fuse() {
        return;
    }
    let s = Scene::new(LayerBuilder::new());
    let host = s.l.root.join("host");
    fs::create_dir(&host).unwrap();
    fs::write(host.join("f"), "bound").unwrap();
    let (ok, _, err) = s.cli(&["volume", "create", "cfg"]);
    assert!(ok, "{err}");
    fs::write(s.data("cfg").join("conf"), "setting").unwrap();
    let m = s.mount(
        "a",
        &format!("volume=cfg:/etc/app:ro,bind={}:/srv:ro", host.display()),
    );
    assert_eq!(
        fs::read_to_string(m.join("etc/app/conf")).unwrap(),
        "setting"
    );
    assert_eq!(fs::read_to_string(m.join("srv/f")).unwrap(), "bound");
    for dir in ["etc/app", "srv"] {
        let d = m.join(dir);
        assert_errno("create", res(File::create(d.join("new"))), EROFS);
        assert_errno("mkdir", res(fs::create_dir(d.join("sub"))), EROFS);
        let existing = fs::read_dir(&d).unwrap().next().unwrap().unwrap().path();
        assert_errno(
            "open for write",
            res(OpenOptions::new().write(true).open(&existing)),
            EROFS,
        );
        assert_errno("unlink", res(fs::remove_file(&existing)), EROFS);
        assert_errno(
            "chmod",
            res(fs::set_permissions(
                &existing,
                fs::Permissions::from_mode(0o600),
            )),
            EROFS,
        );
    }
    // The rest of the mount stays writable.
    fs::write(m.join("elsewhere"), "ok").unwrap();
}

#[test]
fn graft_boundaries_answer_exdev_and_graft_points_ebusy() {
    if !fixture::require_fuse() {
        return;
    }
    let s = Scene::new(LayerBuilder::new().file("top", "t").dir("a/b"));
    let m = s.mount("a", "volume=v:/a/b/vol,volume=w:/w");
    let vol = m.join("a/b/vol");
    fs::write(vol.join("in"), "v").unwrap();
    fs::write(m.join("w/inw"), "w").unwrap();

    assert_errno(
        "rename out of a volume",
        res(fs::rename(vol.join("in"), m.join("out"))),
        EXDEV,
    );
    assert_errno(
        "rename into a volume",
        res(fs::rename(m.join("top"), vol.join("top"))),
        EXDEV,
    );
    assert_errno(
        "rename between volumes",
        res(fs::rename(vol.join("in"), m.join("w/in"))),
        EXDEV,
    );
    assert_errno(
        "link out of a volume",
        link(&vol.join("in"), &m.join("l")),
        EXDEV,
    );
    assert_errno(
        "link into a volume",
        link(&m.join("top"), &vol.join("l")),
        EXDEV,
    );

    assert_errno("rmdir of a graft point", res(fs::remove_dir(&vol)), EBUSY);
    assert_errno(
        "rename of a graft point",
        res(fs::rename(&vol, m.join("a/b/moved"))),
        EBUSY,
    );
    fs::create_dir(m.join("empty")).unwrap();
    assert_errno(
        "rename a dir onto a graft point",
        res(fs::rename(m.join("empty"), m.join("w"))),
        EBUSY,
    );
    assert_errno(
        "rename of an ancestor",
        res(fs::rename(m.join("a"), m.join("z"))),
        EBUSY,
    );
    assert_errno(
        "rmdir of an ancestor",
        res(fs::remove_dir(m.join("a/b"))),
        EBUSY,
    );

    // Within one volume everything works, directories included.
    fs::create_dir(vol.join("d")).unwrap();
    fs::rename(vol.join("in"), vol.join("d/in")).unwrap();
    fs::rename(vol.join("d"), vol.join("e")).unwrap();
    link(&vol.join("e/in"), &vol.join("hard")).unwrap();
    assert_eq!(lstat(&vol.join("hard")).unwrap().nlink(), 2);
    assert_eq!(files_in(&s.data("v")), ["e", "hard"]);
}

#[test]
fn empty_volume_is_filled_from_the_image_unless_nocopy() {
    if !fixture::require_fuse() {
        return;
    }
    let meta = Meta::new()
        .mode(0o640)
        .owner(12, 34)
        .xattr("user.origin", "image");
    let s = Scene::new(
        LayerBuilder::new()
            .file_with("app/conf", "from image", meta)
            .dir_with("app/sub", Meta::new().mode(0o710).owner(5, 6))
            .symlink("app/link", "conf")
            .file("other/file", "image only"),
    );
    let (ok, _, err) = s.cli(&["volume", "create", "kept"]);
    assert!(ok, "{err}");
    fs::write(s.data("kept").join("mine"), "own data").unwrap();
    let m = s.mount("a", "volume=filled:/app,volume=bare:/other:nocopy");
    assert!(
        files_in(&m.join("other")).is_empty(),
        "nocopy volume shows the image"
    );
    drop(m);
    let m2 = s.mount("b", "volume=filled:/x,volume=kept:/app");

    let d = s.data("filled");
    assert_eq!(files_in(&d), ["conf", "link", "sub"]);
    let conf = lstat(&d.join("conf")).unwrap();
    assert_eq!(
        (conf.mode() & 0o7777, conf.uid(), conf.gid()),
        (0o640, 12, 34)
    );
    assert_eq!(lgetxattr(&d.join("conf"), "user.origin").unwrap(), b"image");
    assert_eq!(fs::read_link(d.join("link")).unwrap(), Path::new("conf"));
    let sub = lstat(&d.join("sub")).unwrap();
    assert_eq!((sub.mode() & 0o7777, sub.uid(), sub.gid()), (0o710, 5, 6));
    assert!(
        files_in(&s.data("bare")).is_empty(),
        "nocopy volume was filled"
    );
    // A volume that already has content keeps it and gets nothing from the image.
    assert_eq!(files_in(&s.data("kept")), ["mine"]);
    assert_eq!(files_in(&m2.join("app")), ["mine"]);
    assert_eq!(fs::read_to_string(m2.join("x/conf")).unwrap(), "from image");
}

/// Two mounts and the host use `volume`; every change is seen at once by the others.
fn share_without_stale_caches(s: &Scene, volume: &str) {
    let a = s.mount(&format!("{volume}-a"), &format!("volume={volume}:/data"));
    let b = s.mount(
        &format!("{volume}-b"),
        &format!("volume={volume}:/srv/data"),
    );
    let (fa, fb) = (a.join("data/f"), b.join("srv/data/f"));
    let host = s.data(volume).join("f");

    fs::write(&fa, "first").unwrap();
    assert_eq!(fs::read_to_string(&fb).unwrap(), "first");
    // Same length, new bytes: only an uncached read can see the change.
    fs::write(&fa, "again").unwrap();
    assert_eq!(fs::read_to_string(&fb).unwrap(), "again");
    // Through a file held open in the other mount, too.
    let mut held = File::open(&fb).unwrap();
    let mut buf = String::new();
    held.read_to_string(&mut buf).unwrap();
    OpenOptions::new()
        .append(true)
        .open(&fa)
        .unwrap()
        .write_all(b"+more")
        .unwrap();
    assert_eq!(fs::metadata(&fb).unwrap().len(), 10);
    let mut again = String::new();
    std::io::Seek::rewind(&mut held).unwrap();
    held.read_to_string(&mut again).unwrap();
    assert_eq!(again, "again+more");
    drop(held);

    fs::write(&host, "host").unwrap();
    assert_eq!(fs::read_to_string(&fa).unwrap(), "host");
    // A miss is not cached under a graft: a name the host or the other mount makes
    // after it is found at once.
    for (maker, name) in [(s.data(volume), "by-host"), (b.join("srv/data"), "by-b")] {
        let seen = a.join("data").join(name);
        assert_errno("stat before it was made", res(fs::metadata(&seen)), ENOENT);
        fs::write(maker.join(name), name).unwrap();
        assert_eq!(fs::read_to_string(&seen).unwrap(), name);
        fs::remove_file(&seen).unwrap();
    }
    assert_eq!(fs::metadata(&fb).unwrap().len(), 4);
    // Listings are not cached either: each is taken after one was already read.
    assert_eq!(files_in(&a.join("data")), ["f"]);
    fs::write(s.data(volume).join("new"), "n").unwrap();
    assert_eq!(files_in(&a.join("data")), ["f", "new"]);
    fs::remove_file(b.join("srv/data/new")).unwrap();
    assert_eq!(files_in(&a.join("data")), ["f"]);
    assert_errno(
        "stat after another mount removed it",
        res(fs::metadata(a.join("data/new"))),
        ENOENT,
    );

    let (ok, out, err) = s.cli(&["volume", "inspect", volume]);
    assert!(ok, "{err}");
    let info: serde_json::Value =
        serde_json::from_str::<serde_json::Value>(&out).unwrap()[0].clone();
    let pids: Vec<u64> = info["mounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["pid"].as_u64().unwrap())
        .collect();
    assert_eq!(pids.len(), 2, "{out}");
    assert!(pids.contains(&u64::from(a.pid())) && pids.contains(&u64::from(b.pid())));
    // In use: rm is refused, naming the users.
    let (ok, _, err) = s.cli(&["volume", "rm", volume]);
    assert!(
        !ok && err.contains("in use") && err.contains(&a.pid().to_string()),
        "{err}"
    );
}

#[test]
fn two_mounts_and_the_host_share_a_volume_without_stale_caches() {
    if !fixture::require_fuse() {
        return;
    }
    let s = Scene::new(LayerBuilder::new());
    // Unlimited: files may use passthrough. Size-limited: every write goes through the
    // daemon (served I/O), which must not leave a stale page cache either.
    let (ok, _, err) = s.cli(&["volume", "create", "limited", "--size", "1Gi"]);
    assert!(ok, "{err}");
    share_without_stale_caches(&s, "limited");
    share_without_stale_caches(&s, "shared");
}

#[test]
fn exclusive_volume_has_one_writer_and_the_claim_dies_with_it() {
    if !fixture::require_fuse() {
        return;
    }
    let s = Scene::new(LayerBuilder::new());
    let (ok, _, err) = s.cli(&["volume", "create", "--exclusive", "solo"]);
    assert!(ok, "{err}");
    let mut first = s.mount("a", "volume=solo:/data");
    let holder_mnt = s.l.root.join("a-mnt");

    let err = s.mount_must_fail("b", "volume=solo:/data");
    assert!(
        err.contains("exclusive")
            && err.contains(&format!("pid {}", first.pid()))
            && err.contains(holder_mnt.to_str().unwrap()),
        "message does not name the holder: {err}"
    );
    // Readers do not need the claim.
    let reader = s.mount("c", "volume=solo:/data:ro");
    drop(reader);

    // kill -9 of the holder (the daemon this test started, by its PID) ends the claim.
    first.signal_and_wait(libc::SIGKILL);
    let second = s.mount("b", "volume=solo:/data");
    fs::write(second.join("data/f"), "mine now").unwrap();
    drop(second);
    // The dead mount is cleaned up by its guard (fusermount3 -u / lazy unmount).
    drop(first);
    assert!(mount_at(&holder_mnt).is_none());
}

fn write_at_end(p: &Path, n: usize) -> Result<(), Errno> {
    let mut f = res(OpenOptions::new().append(true).create(true).open(p))?;
    res(f.write_all(&vec![7u8; n]))
}

#[test]
fn size_limit_gives_enospc_and_usage_survives_remounts_and_host_changes() {
    if !fixture::require_fuse() {
        return;
    }
    let s = Scene::new(LayerBuilder::new());
    let (ok, _, err) = s.cli(&["volume", "create", "small", "--size", "64Ki"]);
    assert!(ok, "{err}");
    let mut m = s.mount("a", "volume=small:/data");
    let f = m.join("data/f");
    write_at_end(&f, 60 << 10).unwrap();
    assert_errno("write past the limit", write_at_end(&f, 8 << 10), ENOSPC);
    assert_eq!(
        fs::metadata(&f).unwrap().len(),
        60 << 10,
        "a refused write changed the file"
    );
    assert_errno(
        "second file past the limit",
        write_at_end(&m.join("data/g"), 8 << 10),
        ENOSPC,
    );
    assert_errno(
        "truncate past the limit",
        res(OpenOptions::new()
            .write(true)
            .open(&f)
            .and_then(|h| h.set_len(1 << 20))),
        ENOSPC,
    );
    let st = fixture::statfs(&m.join("data")).unwrap();
    assert_eq!(
        st.f_blocks * st.f_frsize as u64,
        64 << 10,
        "statfs shows the limit"
    );

    m.remount();
    let f = m.join("data/f");
    write_at_end(&f, 4 << 10).unwrap();
    assert_errno(
        "past the limit after a remount",
        write_at_end(&f, 4 << 10),
        ENOSPC,
    );

    // The host frees space behind the mount's back; the next write may use it.
    fs::remove_file(s.data("small").join("f")).unwrap();
    write_at_end(&m.join("data/h"), 32 << 10).unwrap();
    let (ok, out, err) = s.cli(&["volume", "inspect", "small"]);
    assert!(ok, "{err}");
    let info: serde_json::Value =
        serde_json::from_str::<serde_json::Value>(&out).unwrap()[0].clone();
    assert_eq!(info["bytes_used"].as_u64(), Some(32 << 10), "{out}");
    assert_eq!(info["size_limit"].as_u64(), Some(64 << 10), "{out}");
}

#[test]
fn mounts_sharing_a_size_limited_volume_share_its_budget() {
    if !fixture::require_fuse() {
        return;
    }
    let s = Scene::new(LayerBuilder::new());
    let (ok, _, err) = s.cli(&["volume", "create", "budget", "--size", "64Ki"]);
    assert!(ok, "{err}");
    // Both mounted (and their counts taken) before either writes.
    let a = s.mount("a", "volume=budget:/data");
    let b = s.mount("b", "volume=budget:/data");
    write_at_end(&a.join("data/from-a"), 40 << 10).unwrap();
    assert_errno(
        "the other mount's write past the shared limit",
        write_at_end(&b.join("data/from-b"), 40 << 10),
        ENOSPC,
    );
    write_at_end(&b.join("data/from-b"), 20 << 10).unwrap();
    fs::remove_file(a.join("data/from-a")).unwrap();
    write_at_end(&b.join("data/from-b"), 40 << 10).unwrap();
    assert_eq!(
        fs::metadata(s.data("budget").join("from-b")).unwrap().len(),
        60 << 10
    );
}

/// `mount --bind` of a path inside the stratafs mount, undone on drop.
struct BindMount(PathBuf);

impl BindMount {
    fn new(src: &Path, dst: &Path) -> BindMount {
        fs::create_dir_all(dst).unwrap();
        let st = Command::new("mount")
            .arg("--bind")
            .args([src.as_os_str(), dst.as_os_str()])
            .status()
            .unwrap();
        assert!(
            st.success(),
            "mount --bind {} {}",
            src.display(),
            dst.display()
        );
        BindMount(dst.to_path_buf())
    }
}

impl Drop for BindMount {
    fn drop(&mut self) {
        if mount_at(&self.0).is_some() {
            let ok = Command::new("umount")
                .arg(&self.0)
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                let _ = Command::new("umount")
                    .args([OsStr::new("-l"), self.0.as_os_str()])
                    .status();
            }
        }
    }
}

#[test]
fn a_graft_can_be_bind_mounted_elsewhere_and_written_through() {
    if !fixture::require_fuse() {
        return;
    }
    let s = Scene::new(LayerBuilder::new());
    let m = s.mount("a", "volume=exported:/export");
    let elsewhere = s.l.root.join("elsewhere");
    let bind = BindMount::new(&m.join("export"), &elsewhere);
    fs::write(elsewhere.join("through-bind"), "landed").unwrap();
    assert_eq!(
        fs::read_to_string(s.data("exported").join("through-bind")).unwrap(),
        "landed"
    );
    assert_eq!(files_in(&m.join("export")), ["through-bind"]);
    drop(bind);
    assert!(mount_at(&elsewhere).is_none());
}

#[test]
fn bad_volume_names_are_refused_before_mounting() {
    if !fixture::require_fuse() {
        return;
    }
    let s = Scene::new(LayerBuilder::new());
    for bad in ["..", "a/b", "-x", ".hidden", "has space"] {
        let err = s.mount_must_fail("a", &format!("volume={bad}:/data"));
        assert!(err.contains("volume"), "{bad}: {err}");
    }
    let long = "v".repeat(256);
    let err = s.mount_must_fail("a", &format!("volume={long}:/data"));
    assert!(err.contains("volume"), "{err}");
    assert!(!s.state.join("volumes").exists() || files_in(&s.state.join("volumes")).is_empty());
}

/// A daemon-mode mount made with `stratafs mount ...`; unmounted (and its daemon
/// waited for, killed by PID only if it lingers) on drop.
struct SubcommandMount {
    mountpoint: PathBuf,
}

impl Drop for SubcommandMount {
    fn drop(&mut self) {
        fixture::end_daemon_mount("SubcommandMount", &self.mountpoint);
    }
}

#[test]
fn subcommand_form_grafts_volumes_and_binds_in_daemon_mode() {
    if !fixture::require_fuse() {
        return;
    }
    let s = Scene::new(LayerBuilder::new().file("etc/os", "image"));
    let (u, w, m) = s.container("sub");
    let host = s.l.root.join("host");
    fs::create_dir(&host).unwrap();
    let out = Command::new(stratafs_bin())
        .arg("--state-dir")
        .arg(&s.state)
        .arg("mount")
        .args(["--lower", &s.l.lowerdir()])
        .arg("--upper")
        .arg(&u)
        .arg("--work")
        .arg(&w)
        .args(["--volume", "appdata:/var/app"])
        .arg("--bind")
        .arg(format!("{}:/mnt/host:ro", host.display()))
        .arg(&m)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let _guard = SubcommandMount {
        mountpoint: m.clone(),
    };
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    fs::write(m.join("var/app/state"), "kept").unwrap();
    assert_eq!(
        fs::read_to_string(s.data("appdata").join("state")).unwrap(),
        "kept"
    );
    assert_errno(
        "write to a :ro bind",
        res(fs::write(m.join("mnt/host/x"), "x")),
        EROFS,
    );
    // The claim is the daemon's (the forked child), not the launcher's.
    let (ok, info, err) = s.cli(&["volume", "inspect", "appdata"]);
    assert!(ok, "{err}");
    let info: serde_json::Value =
        serde_json::from_str::<serde_json::Value>(&info).unwrap()[0].clone();
    let daemons = fixture::stratafs_pids_for(&m);
    assert_eq!(daemons.len(), 1);
    assert_eq!(
        info["mounts"][0]["pid"].as_i64(),
        Some(i64::from(daemons[0]))
    );
}

/// A size-limited volume filled from the image is charged like any write: image
/// content that does not fit (here a 3 MiB file for a 1 MiB volume, and a sparse
/// file whose apparent size is far over the limit) refuses the mount with one line
/// naming the volume, and the volume receives nothing.
#[test]
fn filling_a_volume_from_the_image_respects_its_size_limit() {
    if !fixture::require_fuse() {
        return;
    }
    let s = Scene::new(
        LayerBuilder::new()
            .file("big/blob", fixture::pattern(3 << 20, 7))
            .sparse("holes/image", 8 << 30, &[(1 << 20, b"data")], Meta::new())
            .file("small/conf", "fits\n"),
    );
    for (volume, target) in [("tiny", "/big"), ("sparse", "/holes")] {
        let (ok, _, err) = s.cli(&["volume", "create", volume, "--size", "1M"]);
        assert!(ok, "{err}");
        let err = s.mount_must_fail(volume, &format!("volume={volume}:{target}"));
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        assert!(
            err.contains(&format!("volume {volume}")) && err.contains("does not fit"),
            "the error names the volume and says why: {err}"
        );
        assert!(
            files_in(&s.data(volume)).is_empty(),
            "{volume}: a refused fill left {:?}",
            files_in(&s.data(volume))
        );
        let (ok, out, err) = s.cli(&["volume", "inspect", volume]);
        assert!(ok, "{err}");
        let info: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(info[0]["bytes_used"].as_u64(), Some(0), "{volume}: {out}");
    }
    let (ok, _, err) = s.cli(&["volume", "create", "roomy", "--size", "1M"]);
    assert!(ok, "{err}");
    let m = s.mount("roomy", "volume=roomy:/small");
    assert_eq!(fs::read_to_string(m.join("small/conf")).unwrap(), "fits\n");
    drop(m);
    let (ok, out, err) = s.cli(&["volume", "inspect", "roomy"]);
    assert!(ok, "{err}");
    let info: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(info[0]["bytes_used"].as_u64(), Some(5), "{out}");
}

/// A mount refused for a graft onto a file of the image leaves nothing behind: the
/// named volume is not created (nor claimed), the workdir gets no work/index and
/// the upper layer stays empty.
#[test]
fn a_refused_graft_creates_nothing() {
    let s = Scene::new(LayerBuilder::new().file("file", "a file\n").dir("dir"));
    let (u, w, _) = s.container("refused");
    for grafts in [
        "volume=newvol:/file".to_string(),
        "volume=newvol:/file/deeper".to_string(),
        format!("volume=newvol:/dir,bind={}:/file", s.l.lowers[0].display()),
    ] {
        let err = s.mount_must_fail("refused", &grafts);
        // One error line; a missing volume is also announced as a warning (issue 13).
        let errors = err
            .trim()
            .lines()
            .filter(|l| !l.contains("warning:"))
            .count();
        assert_eq!(errors, 1, "{grafts}: one error line: {err}");
        assert!(
            err.contains("/file"),
            "{grafts}: the error names the target: {err}"
        );
        assert!(
            !s.state.join("volumes/newvol").exists(),
            "{grafts}: the refused mount created the volume"
        );
        assert!(
            files_in(&w).is_empty(),
            "{grafts}: workdir has {:?}",
            files_in(&w)
        );
        assert!(
            files_in(&u).is_empty(),
            "{grafts}: upper has {:?}",
            files_in(&u)
        );
    }
}

/// Access modes through real mounts: rwo as --exclusive; rwop admits one mount of
/// any kind; rox admits read-only mounts only, refusing a read-write one by name.
#[test]
fn access_modes_rwop_and_rox_are_enforced_by_real_mounts() {
    if !fixture::require_fuse() {
        return;
    }
    let s = Scene::new(LayerBuilder::new());
    for args in [
        &["volume", "create", "--access", "rwop", "pod"][..],
        &["volume", "create", "--access", "rox", "shelf"],
        &["volume", "create", "--access", "rwo", "duo"],
    ] {
        let (ok, _, err) = s.cli(args);
        assert!(ok, "{args:?}: {err}");
    }

    let reader = s.mount("a", "volume=pod:/data:ro");
    for grafts in ["volume=pod:/data:ro", "volume=pod:/data"] {
        let err = s.mount_must_fail("b", grafts);
        assert!(
            err.contains("access rwop")
                && err.contains(&format!("pid {}", reader.pid()))
                && err.contains("read-only"),
            "{grafts}: message does not name the mode and the holder: {err}"
        );
    }
    drop(reader);
    let writer = s.mount("b", "volume=pod:/data");
    fs::write(writer.join("data/f"), "pod").unwrap();
    drop(writer);

    fs::write(s.data("shelf").join("book"), "text").unwrap();
    let err = s.mount_must_fail("c", "volume=shelf:/data");
    assert!(
        err.contains("volume shelf") && err.contains("rox") && err.contains(":ro"),
        "{err}"
    );
    let r1 = s.mount("c", "volume=shelf:/data:ro");
    let r2 = s.mount("d", "volume=shelf:/data:ro");
    assert_eq!(fs::read_to_string(r1.join("data/book")).unwrap(), "text");
    assert_eq!(fs::read_to_string(r2.join("data/book")).unwrap(), "text");
    assert_errno(
        "write to rox",
        res(fs::write(r2.join("data/new"), "x")),
        EROFS,
    );
    drop((r1, r2));

    let w = s.mount("e", "volume=duo:/data");
    let err = s.mount_must_fail("f", "volume=duo:/data");
    assert!(err.contains("access rwo"), "{err}");
    let r = s.mount("f", "volume=duo:/data:ro");
    drop((r, w));
}

/// `volume update --size` on a volume that a mount is writing: the new limit (larger
/// or smaller) holds for that mount at once, and statfs shows it; shrinking below the
/// data is refused; a volume mounted read-write without a limit cannot get one.
#[test]
fn update_resizes_a_volume_under_a_live_mount() {
    if !fixture::require_fuse() {
        return;
    }
    let s = Scene::new(LayerBuilder::new());
    let (ok, _, err) = s.cli(&["volume", "create", "grow", "--size", "64Ki"]);
    assert!(ok, "{err}");
    let m = s.mount("a", "volume=grow:/data,volume=open:/open");
    let f = m.join("data/f");
    write_at_end(&f, 40 << 10).unwrap();

    let (ok, _, err) = s.cli(&["volume", "update", "grow", "--size", "32Ki"]);
    assert!(
        !ok && err.contains("40.0KiB") && err.contains("32.0KiB"),
        "{err}"
    );
    let (ok, out, err) = s.cli(&["volume", "update", "grow", "--size", "48Ki"]);
    assert!(ok, "{err}");
    assert!(out.contains("64.0KiB -> 48.0KiB"), "{out}");
    assert_errno(
        "write past the shrunk limit",
        write_at_end(&f, 16 << 10),
        ENOSPC,
    );
    write_at_end(&f, 8 << 10).unwrap();
    let st = fixture::statfs(&m.join("data")).unwrap();
    assert_eq!(st.f_blocks * st.f_frsize as u64, 48 << 10, "statfs");

    let (ok, _, err) = s.cli(&["volume", "update", "grow", "--size", "1Mi"]);
    assert!(ok, "{err}");
    write_at_end(&f, 100 << 10).unwrap();
    let st = fixture::statfs(&m.join("data")).unwrap();
    assert_eq!(st.f_blocks * st.f_frsize as u64, 1 << 20, "statfs");

    let (ok, _, err) = s.cli(&["volume", "update", "open", "--size", "1Mi"]);
    assert!(
        !ok && err.contains("no size limit")
            && err.contains(&format!("pid {}", m.pid()))
            && err.contains("unmount"),
        "{err}"
    );
    drop(m);
    // Unmounted, it may; the next mount enforces it.
    let (ok, _, err) = s.cli(&["volume", "update", "open", "--size", "8Ki"]);
    assert!(ok, "{err}");
    let m = s.mount("b", "volume=open:/open");
    assert_errno(
        "write past the new limit",
        write_at_end(&m.join("open/g"), 16 << 10),
        ENOSPC,
    );
}

/// `:delete`: the volume a mount creates goes when that mount ends (unmount or
/// SIGTERM), unless another mount still uses it then; an existing volume is kept and
/// the mount says so.
#[test]
fn delete_reclaims_the_volume_a_mount_created_when_it_ends() {
    if !fixture::require_fuse() {
        return;
    }
    let s = Scene::new(LayerBuilder::new());
    let gone = |name: &str| !s.state.join("volumes").join(name).exists();

    let mut m = s.mount("a", "volume=tmp1:/data:delete");
    assert!(
        m.output().contains(
            "volume tmp1 does not exist: creating it; it is removed when this mount ends"
        ),
        "{}",
        m.output()
    );
    fs::write(m.join("data/f"), "scratch").unwrap();
    assert!(s.data("tmp1").join("f").is_file());
    m.unmount();
    assert!(gone("tmp1"), "unmount left the volume");

    let mut m = s.mount("b", "volume=tmp2:/data:delete");
    m.signal_and_wait(libc::SIGTERM);
    assert!(gone("tmp2"), "SIGTERM left the volume");

    // Still in use by another mount when its creator ends: kept.
    let creator = s.mount("c", "volume=tmp3:/data:delete");
    let other = s.mount("d", "volume=tmp3:/data");
    fs::write(other.join("data/f"), "kept").unwrap();
    drop(creator);
    assert_eq!(fs::read_to_string(other.join("data/f")).unwrap(), "kept");
    drop(other);
    assert!(!gone("tmp3"), "a mount that did not create it removed it");

    let (ok, _, err) = s.cli(&["volume", "create", "old"]);
    assert!(ok, "{err}");
    let m = s.mount("e", "volume=old:/data:delete");
    assert!(
        m.output().contains("volume old exists already") && m.output().contains("kept"),
        "{}",
        m.output()
    );
    fs::write(m.join("data/f"), "x").unwrap();
    drop(m);
    assert!(s.data("old").join("f").is_file());

    let err = s.mount_must_fail("f", "volume=v:/data:nocreate:delete");
    assert!(
        err.contains("nocreate and delete exclude each other"),
        "{err}"
    );
}

/// As `docker run --rm`: when `stratafs umount` returns, the `:delete` volume of the
/// mount is gone, not removed a moment later by the exiting daemon.
#[test]
fn umount_returns_once_a_delete_volume_is_removed() {
    if !fixture::require_fuse() {
        return;
    }
    let s = Scene::new(LayerBuilder::new());
    let mut m = s.mount("a", "volume=scratch:/data:delete");
    // Enough entries that removing them takes the exiting daemon a while.
    for i in 0..2000 {
        fs::write(m.join(&format!("data/f{i}")), "x").unwrap();
    }
    let mountpoint = m.path().to_str().unwrap().to_string();
    let (ok, _, err) = s.cli(&["umount", &mountpoint]);
    assert!(ok, "{err}");
    assert!(
        !s.state.join("volumes").join("scratch").exists(),
        "the volume is still there when umount returned"
    );
    let status = m.daemon_exited();
    assert!(
        status.is_some_and(|s| s.success()),
        "the daemon had not ended cleanly when umount returned: {status:?}\n{}",
        m.output()
    );
}
