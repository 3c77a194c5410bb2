//! The fuse-overlayfs contract containers/storage relies on: its exact call forms (run
//! from the storage directory, stderr a pipe read until it closes), the ownership
//! options (uid/gid mappings, squash, override xattrs), and a rootless mount made inside
//! a fresh user namespace.

use std::fs;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::fixture::*;

const STDERR_TIMEOUT: Duration = Duration::from_secs(30);

/// A stratafs started exactly as containers/storage starts its mount program: in `cwd`,
/// stdin and stdout on /dev/null, stderr a pipe read until EOF. On drop: unmount and
/// make sure no daemon is left (killed by PID if it lingers).
struct PipedMount {
    mountpoint: PathBuf,
    status: ExitStatus,
    stderr: String,
}

impl PipedMount {
    fn run(cwd: &Path, args: &[&str], mountpoint: &Path) -> PipedMount {
        let mut child = Command::new(stratafs_bin())
            .args(args)
            .current_dir(cwd)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn stratafs");
        let mut pipe = child.stderr.take().expect("stderr pipe");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            let _ = tx.send(text);
        });
        // The caller's contract: stderr reaches EOF, and only then is the status read.
        let stderr = match rx.recv_timeout(STDERR_TIMEOUT) {
            Ok(t) => t,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                let _ = Command::new("umount").arg("-l").arg(mountpoint).status();
                panic!(
                    "stderr of `stratafs {args:?}` not closed within {STDERR_TIMEOUT:?}: a \
                     caller reading it until EOF would hang"
                );
            }
        };
        let status = wait_bounded(&mut child, EXIT_TIMEOUT).expect("launcher exits");
        PipedMount {
            mountpoint: mountpoint.to_path_buf(),
            status,
            stderr,
        }
    }

    fn assert_live(&self) {
        assert!(
            self.status.success(),
            "exit {}; stderr: {}",
            self.status,
            self.stderr
        );
        // Live the moment the caller saw EOF and exit 0: no polling allowed here.
        let st = statfs(&self.mountpoint).expect("statfs of the mountpoint");
        assert_eq!(st.f_type, FUSE_SUPER_MAGIC, "mount not live after exit 0");
        assert!(
            !stratafs_pids_for(&self.mountpoint).is_empty(),
            "no daemon serves the mount"
        );
    }

    /// `fusermount3 -u`, then the daemon must exit by itself.
    fn unmount(&self) {
        let st = Command::new("fusermount3")
            .arg("-u")
            .arg(&self.mountpoint)
            .status()
            .expect("fusermount3");
        assert!(st.success(), "fusermount3 -u: {st}");
        let deadline = Instant::now() + EXIT_TIMEOUT;
        while !stratafs_pids_for(&self.mountpoint).is_empty() {
            assert!(
                Instant::now() < deadline,
                "daemon still running {EXIT_TIMEOUT:?} after fusermount3 -u"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for PipedMount {
    fn drop(&mut self) {
        end_daemon_mount("PipedMount", &self.mountpoint);
    }
}

/// A containers/storage overlay directory: `l/SHORT -> ../ID/diff` links, layers in
/// AUFS format (containers/storage extracts `.wh.` files for mount programs), and the
/// container's `diff`, `work` and `merged` under its own ID.
struct Storage {
    _tmp: tempfile::TempDir,
    root: PathBuf,
}

impl Storage {
    fn new() -> Storage {
        let tmp = tempfile::Builder::new()
            .prefix("stratafs-compat-")
            .tempdir()
            .unwrap();
        let root = tmp.path().canonicalize().unwrap();
        fs::create_dir(root.join("l")).unwrap();
        let layers = [
            (
                "base",
                "BASE",
                LayerBuilder::new()
                    .file("etc/os-release", "base\n")
                    .file("etc/gone", "x")
                    .file("bin/tool", "tool"),
            ),
            (
                "top",
                "TOP",
                LayerBuilder::new()
                    .file("etc/top", "top\n")
                    .whiteout("etc/gone"),
            ),
        ];
        for (id, short, spec) in layers {
            let diff = root.join(id).join("diff");
            fs::create_dir_all(&diff).unwrap();
            spec.build(&diff, Format::AUFS);
            symlink(format!("../{id}/diff"), root.join("l").join(short)).unwrap();
        }
        for d in ["ctr/diff", "ctr/work", "ctr/merged"] {
            fs::create_dir_all(root.join(d)).unwrap();
        }
        Storage { _tmp: tmp, root }
    }

    fn p(&self, rel: &str) -> String {
        self.root.join(rel).display().to_string()
    }

    fn merged(&self) -> PathBuf {
        self.root.join("ctr/merged")
    }
}

#[test]
fn podman_call_form_is_live_at_exit_zero_and_stderr_eof() {
    if !require_fuse() {
        return;
    }
    let s = Storage::new();
    // Relative `l/` links resolved from the working directory, and a trailing empty option.
    let opts = format!(
        "lowerdir=l/TOP:l/BASE,upperdir={},workdir={},",
        s.p("ctr/diff"),
        s.p("ctr/work")
    );
    let m = PipedMount::run(&s.root, &["-o", &opts, &s.p("ctr/merged")], &s.merged());
    m.assert_live();
    assert!(m.stderr.is_empty(), "unexpected stderr: {}", m.stderr);
    let mp = s.merged();
    assert_eq!(
        fs::read_to_string(mp.join("etc/os-release")).unwrap(),
        "base\n"
    );
    assert_eq!(fs::read_to_string(mp.join("etc/top")).unwrap(), "top\n");
    assert_eq!(lstat(&mp.join("etc/gone")).err(), Some(libc::ENOENT));
    fs::write(mp.join("etc/new"), "n").unwrap();
    assert!(s.root.join("ctr/diff/etc/new").exists());
    m.unmount();
}

#[test]
fn volatile_after_an_empty_option() {
    if !require_fuse() {
        return;
    }
    let s = Storage::new();
    let opts = format!(
        "lowerdir={}:{},upperdir={},workdir={},,volatile",
        s.p("l/TOP"),
        s.p("l/BASE"),
        s.p("ctr/diff"),
        s.p("ctr/work")
    );
    let m = PipedMount::run(&s.root, &["-o", &opts, &s.p("ctr/merged")], &s.merged());
    m.assert_live();
    fs::write(s.merged().join("bin/tool"), "changed").unwrap();
    assert_eq!(
        fs::read_to_string(s.root.join("ctr/diff/bin/tool")).unwrap(),
        "changed"
    );
    m.unmount();
}

#[test]
fn read_only_layer_pair_without_upper() {
    if !require_fuse() {
        return;
    }
    // What containers/storage mounts to diff a layer against its parent.
    let s = Storage::new();
    let opts = format!("lowerdir={}:{}", s.p("top/diff"), s.p("l/BASE"));
    let m = PipedMount::run(&s.root, &["-o", &opts, &s.p("ctr/merged")], &s.merged());
    m.assert_live();
    assert_eq!(
        fs::read_to_string(s.merged().join("etc/top")).unwrap(),
        "top\n"
    );
    let err = fs::write(s.merged().join("etc/x"), "x").unwrap_err();
    assert_eq!(io_errno(&err), libc::EROFS);
    m.unmount();
}

#[test]
fn quoted_context_leading_colon_mappings_and_xattr_permissions() {
    if !require_fuse() {
        return;
    }
    let s = Storage::new();
    let opts = format!(
        "lowerdir=l/TOP:l/BASE,upperdir={},workdir={},xattr_permissions=2,\
         context=\"system_u:object_r:container_file_t:s0:c1,c2\",\
         uidmapping=:0:1000:10,gidmapping=:0:2000:10",
        s.p("ctr/diff"),
        s.p("ctr/work")
    );
    let m = PipedMount::run(&s.root, &["-o", &opts, &s.p("ctr/merged")], &s.merged());
    m.assert_live();
    let f = s.merged().join("etc/os-release");
    let md = lstat(&f).unwrap();
    assert_eq!((md.uid(), md.gid()), (1000, 2000));
    // The override records stored ids: shown 1005:2006 is stored as 5:6.
    lchown(&f, 1005, 2006).unwrap();
    assert_eq!(owner_of(&f), (1005, 2006));
    assert_eq!(
        lgetxattr(
            &s.root.join("ctr/diff/etc/os-release"),
            "user.containers.override_stat"
        )
        .unwrap(),
        b"5:6:0644:file"
    );
    m.unmount();
}

#[test]
fn mount_helper_form_ignores_the_source() {
    if !require_fuse() {
        return;
    }
    let s = Storage::new();
    let opts = format!(
        "rw,lowerdir={},upperdir={},workdir={},dev,suid",
        s.p("l/BASE"),
        s.p("ctr/diff"),
        s.p("ctr/work")
    );
    let m = PipedMount::run(
        Path::new("/"),
        &["overlay", &s.p("ctr/merged"), "-o", &opts],
        &s.merged(),
    );
    m.assert_live();
    let fstab_opts = mount_at(&s.merged()).unwrap().options;
    assert!(!fstab_opts.split(',').any(|o| o == "ro"), "{fstab_opts}");
    m.unmount();
}

#[test]
fn a_failure_in_the_daemon_is_reported_on_stderr() {
    if !require_fuse() {
        return;
    }
    let s = Storage::new();
    // Passes the command-line checks; only the daemon finds `work` unusable.
    fs::write(s.root.join("ctr/work/work"), "not a directory").unwrap();
    let opts = format!(
        "lowerdir=l/BASE,upperdir={},workdir={}",
        s.p("ctr/diff"),
        s.p("ctr/work")
    );
    let m = PipedMount::run(&s.root, &["-o", &opts, &s.p("ctr/merged")], &s.merged());
    assert!(!m.status.success(), "exit 0 despite a broken workdir");
    assert!(
        m.stderr.starts_with("stratafs: workdir ") && m.stderr.contains("directory"),
        "stderr: {:?}",
        m.stderr
    );
    assert_eq!(m.stderr.lines().count(), 1, "stderr: {:?}", m.stderr);
    assert!(
        mount_at(&s.merged()).is_none(),
        "mounted despite the failure"
    );
}

// ---------------------------------------------------------------------------------------
// Ownership options
// ---------------------------------------------------------------------------------------

fn owner_layers() -> Layers {
    Layers::build(
        &[LayerBuilder::new()
            .file_with("root-owned", "r", Meta::new().owner(0, 0).mode(0o644))
            .file_with("five", "5", Meta::new().owner(5, 5).mode(0o644))
            .file_with("fifty", "50", Meta::new().owner(50, 60).mode(0o644))
            .dir_with("shared", Meta::new().owner(0, 0).mode(0o777))],
        None,
        Format::NATIVE,
    )
}

fn owner_of(p: &Path) -> (u32, u32) {
    let md = lstat(p).unwrap_or_else(|e| panic!("lstat {}: {}", p.display(), errno_name(e)));
    (md.uid(), md.gid())
}

/// Runs `argv` as uid/gid `ids` (no supplementary groups).
fn run_as(ids: (u32, u32), argv: &[&str]) -> ExitStatus {
    Command::new("setpriv")
        .args([
            "--reuid",
            &ids.0.to_string(),
            "--regid",
            &ids.1.to_string(),
            "--clear-groups",
        ])
        .args(argv)
        .status()
        .expect("setpriv")
}

#[test]
fn uid_and_gid_mappings_translate_both_ways() {
    if !require_fuse() {
        return;
    }
    let l = owner_layers();
    let opts = format!(
        "{},uidmapping=0:1000:10,gidmapping=0:2000:10",
        l.rw_options()
    );
    let m = StrataMount::with_options(&opts, &l.merged, &l.root);
    // Stored C+i is shown as H+i; an unmapped stored id as the overflow id.
    assert_eq!(owner_of(&m.join("root-owned")), (1000, 2000));
    assert_eq!(owner_of(&m.join("five")), (1005, 2005));
    assert_eq!(owner_of(&m.join("fifty")), (65534, 65534));
    // chown maps back; an id outside the mappings cannot be stored.
    lchown(&m.join("five"), 1003, 2004).unwrap();
    assert_eq!(owner_of(&m.join("five")), (1003, 2004));
    assert_eq!(owner_of(&l.upper.join("five")), (3, 4));
    assert_eq!(lchown(&m.join("root-owned"), 7, 2000), Err(libc::EINVAL));
    // A mapped caller's new file is stored with the caller's stored ids.
    let made = m.join("shared/by-1001");
    let st = run_as((1001, 2001), &["touch", made.to_str().unwrap()]);
    assert!(st.success(), "touch as 1001: {st}");
    assert_eq!(owner_of(&made), (1001, 2001));
    assert_eq!(owner_of(&l.upper.join("shared/by-1001")), (1, 1));
}

#[test]
fn squash_shows_one_owner_and_chown_never_fails() {
    if !require_fuse() {
        return;
    }
    let l = owner_layers();
    let m = StrataMount::with_options(
        &format!("{},squash_to_root", l.rw_options()),
        &l.merged,
        &l.root,
    );
    assert_eq!(owner_of(&m.join("fifty")), (0, 0));
    assert_eq!(owner_of(&m.join("five")), (0, 0));
    lchown(&m.join("fifty"), 7, 8).unwrap();
    assert_eq!(owner_of(&m.join("fifty")), (0, 0));
    assert_eq!(
        owner_of(&l.upper.join("fifty")),
        (7, 8),
        "the chown is stored"
    );
    drop(m);

    let l = owner_layers();
    let m = StrataMount::with_options(
        &format!(
            "{},squash_to_uid=10,squash_to_gid=20,uidmapping=0:1000:1,gidmapping=0:2000:1",
            l.rw_options()
        ),
        &l.merged,
        &l.root,
    );
    assert_eq!(owner_of(&m.join("root-owned")), (10, 20));
    assert_eq!(owner_of(&m.join("fifty")), (10, 20));
    // 7 is outside the mapping: accepted, nothing stored.
    lchown(&m.join("fifty"), 7, 7).unwrap();
    assert_eq!(owner_of(&l.upper.join("fifty")), (50, 60));
}

#[test]
fn xattr_permissions_2_keeps_owner_and_mode_in_the_xattr() {
    if !require_fuse() {
        return;
    }
    let l = owner_layers();
    let m = StrataMount::with_options(
        &format!("{},xattr_permissions=2", l.rw_options()),
        &l.merged,
        &l.root,
    );
    let name = "user.containers.override_stat";
    lchown(&m.join("root-owned"), 5, 6).unwrap();
    chmod(&m.join("root-owned"), 0o4755).unwrap();
    let md = lstat(&m.join("root-owned")).unwrap();
    assert_eq!(
        (md.uid(), md.gid(), md.mode()),
        (5, 6, libc::S_IFREG | 0o4755)
    );
    let up = l.upper.join("root-owned");
    assert_eq!(lgetxattr(&up, name).unwrap(), b"5:6:4755:file");
    let real = lstat(&up).unwrap();
    assert_eq!(
        (real.uid(), real.gid()),
        (0, 0),
        "the real owner is untouched"
    );
    assert_eq!(real.mode() & 0o7000, 0, "no set-ID bit on the real inode");
    // New entries record their creator and mode.
    fs::create_dir(m.join("newdir")).unwrap();
    chmod(&m.join("newdir"), 0o750).unwrap();
    assert_eq!(
        lgetxattr(&l.upper.join("newdir"), name).unwrap(),
        b"0:0:0750:dir"
    );
    // A set-group-ID directory whose group lives in the override passes it on.
    lchown(&m.join("newdir"), 0, 7).unwrap();
    chmod(&m.join("newdir"), 0o2775).unwrap();
    fs::write(m.join("newdir/f"), "f").unwrap();
    fs::create_dir(m.join("newdir/sub")).unwrap();
    assert_eq!(owner_of(&m.join("newdir/f")), (0, 7));
    let sub = lstat(&m.join("newdir/sub")).unwrap();
    assert_eq!((sub.gid(), sub.mode() & 0o2000), (7, 0o2000));
    // The xattr is private: not listed, not readable, not settable through the mount.
    assert_eq!(lgetxattr(&m.join("root-owned"), name), Err(libc::ENODATA));
    assert!(
        !llistxattr(&m.join("root-owned"))
            .unwrap()
            .iter()
            .any(|n| n == name)
    );
    assert!(lsetxattr(&m.join("root-owned"), name, b"0:0:0777:file", 0).is_err());
    assert_eq!(lgetxattr(&up, name).unwrap(), b"5:6:4755:file");
}

#[test]
fn xattr_permissions_1_uses_the_security_name() {
    if !require_fuse() {
        return;
    }
    let l = owner_layers();
    let m = StrataMount::with_options(
        &format!("{},xattr_permissions=1", l.rw_options()),
        &l.merged,
        &l.root,
    );
    lchown(&m.join("five"), 0, 0).unwrap();
    assert_eq!(owner_of(&m.join("five")), (0, 0));
    assert_eq!(
        lgetxattr(
            &l.upper.join("five"),
            "security.fuseoverlayfs.override_stat"
        )
        .unwrap(),
        b"0:0:0644:file"
    );
    assert_eq!(owner_of(&l.upper.join("five")), (5, 5));
}

#[test]
fn override_xattrs_in_lower_layers_are_read_and_survive_copy_up() {
    if !require_fuse() {
        return;
    }
    let l = Layers::build(
        &[LayerBuilder::new()
            .file_with(
                "suid",
                "#!/bin/sh\n",
                Meta::new()
                    .owner(1000, 1000)
                    .mode(0o644)
                    .xattr("user.containers.override_stat", "0:0:4755:file"),
            )
            .file_with(
                "legacy",
                "l",
                Meta::new()
                    .owner(1000, 1000)
                    .mode(0o644)
                    .xattr("user.fuseoverlayfs.override_stat", "7:8:100600"),
            )],
        None,
        Format::NATIVE,
    );
    // containers/storage marks a layer extracted this way on its root.
    lsetxattr(
        &l.lowers[0],
        "user.containers.override_stat",
        b"0:0:0755:dir",
        0,
    )
    .unwrap();
    let m = StrataMount::new(&l);
    let md = lstat(&m.join("suid")).unwrap();
    assert_eq!(
        (md.uid(), md.gid(), md.mode()),
        (0, 0, libc::S_IFREG | 0o4755)
    );
    let md = lstat(&m.join("legacy")).unwrap();
    assert_eq!(
        (md.uid(), md.gid(), md.mode()),
        (7, 8, libc::S_IFREG | 0o600)
    );
    let root = lstat(&l.merged).unwrap();
    assert_eq!(root.mode() & 0o7777, 0o755);
    // Copy-up carries the override along.
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(m.join("suid"))
        .unwrap();
    std::io::Write::write_all(&mut f, b"exit 0\n").unwrap();
    drop(f);
    assert_eq!(
        lgetxattr(&l.upper.join("suid"), "user.containers.override_stat").unwrap(),
        b"0:0:4755:file"
    );
    let md = lstat(&m.join("suid")).unwrap();
    assert_eq!((md.uid(), md.mode()), (0, libc::S_IFREG | 0o4755));
}

// ---------------------------------------------------------------------------------------
// Rootless: inside a fresh user namespace
// ---------------------------------------------------------------------------------------

/// Runs `script` with `sh -eu` inside `unshare --user --map-root-user --mount`, with
/// BIN, MNT and OPTS in its environment. The script mounts with `$BIN -f` in the
/// background (log in `$LOG`), waits for the mount, works on it and unmounts; an exit
/// trap unmounts whatever is left so the daemon never outlives the namespace.
fn in_user_namespace(
    l: &Layers,
    opts: &str,
    env: &[(&str, &str)],
    body: &str,
) -> (ExitStatus, String, String) {
    let log = l.root.join("userns-daemon.log");
    let script = format!(
        r#"
trap 'st=$?; set +e; fusermount3 -u "$MNT" 2>/dev/null || umount -l "$MNT" 2>/dev/null; wait; exit $st' EXIT
"$BIN" -f -o "$OPTS" "$MNT" 2>"$LOG" &
i=0
until grep -q " $MNT fuse" /proc/self/mounts; do
  i=$((i + 1)); [ $i -lt 500 ] || {{ echo "mount not live"; cat "$LOG"; exit 1; }}
  sleep 0.02
done
{body}
fusermount3 -u "$MNT" || umount "$MNT"
wait
"#
    );
    let mut child = Command::new("unshare")
        .args([
            "--user",
            "--map-root-user",
            "--mount",
            "sh",
            "-euc",
            &script,
        ])
        .env("BIN", stratafs_bin())
        .env("MNT", &l.merged)
        .env("OPTS", opts)
        .env("LOG", &log)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("unshare");
    let mut out = String::new();
    let mut err = String::new();
    let mut o = child.stdout.take().unwrap();
    let mut e = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = e.read_to_string(&mut s);
        s
    });
    let _ = o.read_to_string(&mut out);
    err.push_str(&reader.join().unwrap_or_default());
    let status = wait_bounded(&mut child, Duration::from_secs(60)).unwrap_or_else(|| {
        let _ = child.kill();
        panic!("the user-namespace script did not finish");
    });
    let lingering = stratafs_pids_for(&l.merged);
    for pid in &lingering {
        // SAFETY: a stratafs serving this test's own unique mountpoint: ours.
        unsafe { libc::kill(*pid, libc::SIGKILL) };
    }
    assert!(
        lingering.is_empty(),
        "daemon(s) {lingering:?} outlived the user namespace"
    );
    let daemon_log = fs::read_to_string(&log).unwrap_or_default();
    (status, format!("{out}{err}"), daemon_log)
}

/// Reads, writes, deletes and re-creates lower content; checks the results in place.
const ROOTLESS_BODY: &str = r#"
test "$(stat -c %u "$MNT/etc/passwd")" = 0
grep -q root "$MNT/etc/passwd"
rm "$MNT/etc/remove-me"
test ! -e "$MNT/etc/remove-me"
rm -r "$MNT/gone-dir"
rm -r "$MNT/dir"
mkdir "$MNT/dir"
test -z "$(ls -A "$MNT/dir")"
echo appended >> "$MNT/data/big"
tail -c 9 "$MNT/data/big" | grep -q appended
echo new > "$MNT/etc/new"
mkfifo "$MNT/fifo"
test -p "$MNT/fifo"
ls -a "$MNT/etc" | grep -c '^\.wh\.' | grep -qx 0
"#;

fn char_devices_under(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let md = lstat(&p).unwrap();
        if md.file_type().is_dir() {
            found.extend(char_devices_under(&p));
        } else if md.mode() & libc::S_IFMT == libc::S_IFCHR {
            found.push(p);
        }
    }
    found
}

fn userns_layers() -> Layers {
    Layers::build(
        &[LayerBuilder::new()
            .file("etc/passwd", "root:x:0:0\n")
            .file("etc/remove-me", "x")
            .file("data/big", vec![7u8; 300_000])
            .file("dir/inner", "i")
            .dir("gone-dir")
            .file("gone-dir/f", "f")],
        None,
        Format::AUFS,
    )
}

#[test]
fn rootless_mount_in_a_user_namespace_writes_aufs_whiteouts_and_user_xattrs() {
    if !require_fuse() {
        return;
    }
    let l = userns_layers();
    // Since Linux 5.8 a user namespace may make 0/0 whiteouts, so the `.wh.` form is
    // asked for the way fuse-overlayfs users ask for it.
    let (st, out, daemon_log) = in_user_namespace(
        &l,
        &l.rw_options(),
        &[("FUSE_OVERLAYFS_DISABLE_OVL_WHITEOUT", "1")],
        ROOTLESS_BODY,
    );
    assert!(
        st.success(),
        "script failed ({st}):\n{out}\ndaemon:\n{daemon_log}"
    );
    // Passthrough needs CAP_SYS_ADMIN in the initial namespace: the fallback to
    // served I/O must be silent (nothing at warn level or above).
    assert!(
        !daemon_log.contains("WARN") && !daemon_log.contains("ERROR"),
        "daemon log:\n{daemon_log}"
    );
    let u = &l.upper;
    for wh in ["etc/.wh.remove-me", ".wh.gone-dir"] {
        let md = lstat(&u.join(wh)).unwrap_or_else(|e| panic!("{wh}: {}", errno_name(e)));
        assert!(md.is_file(), "{wh} is not an AUFS whiteout file");
    }
    assert!(
        lstat(&u.join("gone-dir")).is_err(),
        "the removed dir is still in upper"
    );
    // The re-created directory hides the lower one with user.* xattr + marker.
    assert_eq!(
        lgetxattr(&u.join("dir"), "user.overlay.opaque").unwrap(),
        b"y"
    );
    assert!(u.join("dir/.wh..wh..opq").is_file());
    assert_eq!(
        lgetxattr(&u.join("dir"), "trusted.overlay.opaque"),
        Err(libc::ENODATA)
    );
    // Nothing in upper is a char device: every whiteout is a `.wh.` file.
    assert_eq!(char_devices_under(u), Vec::<PathBuf>::new());
    assert_eq!(fs::metadata(u.join("data/big")).unwrap().len(), 300_009);
}

#[test]
fn rootless_mount_by_default_writes_the_whiteouts_the_kernel_allows() {
    if !require_fuse() {
        return;
    }
    let l = userns_layers();
    let (st, out, daemon_log) = in_user_namespace(&l, &l.rw_options(), &[], ROOTLESS_BODY);
    assert!(
        st.success(),
        "script failed ({st}):\n{out}\ndaemon:\n{daemon_log}"
    );
    // One whiteout per removed name, in exactly one of the two formats.
    for (dir, name) in [
        (l.upper.join("etc"), "remove-me"),
        (l.upper.clone(), "gone-dir"),
    ] {
        let char_dev = lstat(&dir.join(name))
            .map(|md| md.mode() & libc::S_IFMT == libc::S_IFCHR && md.rdev() == 0)
            .unwrap_or(false);
        let aufs = dir.join(format!(".wh.{name}")).is_file();
        assert!(
            char_dev != aufs,
            "{name}: char 0/0: {char_dev}, .wh. file: {aufs}"
        );
    }
    assert_eq!(
        lgetxattr(&l.upper.join("dir"), "user.overlay.opaque").unwrap(),
        b"y"
    );
}

#[test]
fn rootless_xattr_permissions_keep_set_id_modes_in_user_xattrs() {
    if !require_fuse() {
        return;
    }
    // (Device nodes and foreign owners cannot be tried here: in a user namespace the
    // kernel refuses mknod of a device and chown to an unmapped id before any FUSE
    // daemon sees the request.)
    let l = userns_layers();
    let body = r#"
echo x > "$MNT/owned"
chmod 4711 "$MNT/owned"
test "$(stat -c '%u:%g:%a' "$MNT/owned")" = "0:0:4711"
chmod 2755 "$MNT/etc/passwd"
test "$(stat -c '%a' "$MNT/etc/passwd")" = "2755"
"#;
    let opts = format!("{},xattr_permissions=2", l.rw_options());
    let (st, out, daemon_log) = in_user_namespace(&l, &opts, &[], body);
    assert!(
        st.success(),
        "script failed ({st}):\n{out}\ndaemon:\n{daemon_log}"
    );
    let name = "user.containers.override_stat";
    assert_eq!(
        lgetxattr(&l.upper.join("owned"), name).unwrap(),
        b"0:0:4711:file"
    );
    assert_eq!(
        lgetxattr(&l.upper.join("etc/passwd"), name).unwrap(),
        b"0:0:2755:file"
    );
    for f in ["owned", "etc/passwd"] {
        let mode = fs::metadata(l.upper.join(f)).unwrap().permissions().mode();
        assert_eq!(mode & 0o7000, 0, "{f}: set-ID bit on the real inode");
    }
}

/// Rootless, the correctness features of the kernel's format still work: a directory
/// with lower content is renamed by a `user.overlay.redirect` (no trusted.* there),
/// which is followed again after a remount in a fresh namespace; lower hard links stay
/// linked; copied-up files keep their st_ino through `user.stratafs.origin`.
#[test]
fn rootless_directory_rename_hard_links_and_inode_numbers() {
    if !require_fuse() {
        return;
    }
    let l = Layers::build(
        &[LayerBuilder::new()
            .file("tree/a/deep.txt", "deep")
            .file("tree/top.txt", "top")
            .file("h1", "linked")
            .hardlink("h2", "h1")],
        None,
        Format::AUFS,
    );
    let body = r#"
ino_before=$(stat -c %i "$MNT/tree/top.txt")
mv "$MNT/tree" "$MNT/moved"
test "$(cat "$MNT/moved/a/deep.txt")" = deep
test ! -e "$MNT/tree"
echo more >> "$MNT/moved/top.txt"
test "$(stat -c %i "$MNT/moved/top.txt")" = "$ino_before"
echo "$ino_before" > "$MNT/ino"
echo X >> "$MNT/h2"
test "$(cat "$MNT/h1")" = linkedX
test "$(stat -c %h "$MNT/h1")" = 2
"#;
    let (st, out, log) = in_user_namespace(&l, &l.rw_options(), &[], body);
    assert!(st.success(), "script failed ({st}):\n{out}\ndaemon:\n{log}");
    assert_eq!(
        lgetxattr(&l.upper.join("moved"), "user.overlay.redirect").unwrap(),
        b"/tree"
    );
    assert_eq!(
        lgetxattr(&l.upper.join("moved"), "trusted.overlay.redirect"),
        Err(libc::ENODATA)
    );
    assert!(
        !l.upper.join("moved/a").exists(),
        "the moved directory's content was copied"
    );
    let again = r#"
test "$(cat "$MNT/moved/a/deep.txt")" = deep
test "$(stat -c %i "$MNT/moved/top.txt")" = "$(cat "$MNT/ino")"
test "$(stat -c %h "$MNT/h2")" = 2
test "$(stat -c %i "$MNT/h1")" = "$(stat -c %i "$MNT/h2")"
"#;
    let (st, out, log) = in_user_namespace(&l, &l.rw_options(), &[], again);
    assert!(
        st.success(),
        "after a remount ({st}):\n{out}\ndaemon:\n{log}"
    );
}
