//! The binary's command-line contract: every bad invocation exits non-zero with exactly
//! one stderr line (`stratafs: ...`) naming the offending path or option (or, for a
//! malformed command line, clap's whole report), before anything is mounted. The
//! tests at the end need FUSE: `umount`, mount failures that must name their real
//! cause, and what /proc/mounts shows.

use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::fixture::{LayerBuilder, Layers, StrataDaemon, StrataMount, mount_at, require_fuse};

const BIN: &str = env!("CARGO_BIN_EXE_stratafs");

/// Runs the binary in `cwd`. A run that outlives the deadline means validation let a
/// bad configuration through to the mount; it is killed and reported.
fn run_in(cwd: &Path, args: &[&str]) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .current_dir(cwd)
        .env_remove("RUST_LOG")
        .env_remove("STRATAFS_STATE_DIR")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn stratafs");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let out = child.wait_with_output().expect("wait");
                panic!(
                    "stratafs {args:?} did not exit within 30s; stderr: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    }
    child.wait_with_output().expect("wait")
}

fn run(args: &[&str]) -> Output {
    run_in(Path::new("/"), args)
}

/// Asserts a failed run whose stderr is one `stratafs: ` line containing every needle.
#[track_caller]
fn assert_fails(out: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected failure, got {:?}; stderr: {stderr}",
        out.status
    );
    let text = stderr.trim_end_matches('\n');
    assert!(
        !text.is_empty() && !text.contains('\n'),
        "stderr is not exactly one line: {stderr:?}"
    );
    assert!(text.starts_with("stratafs: "), "stderr: {text:?}");
    for n in needles {
        assert!(text.contains(n), "stderr {text:?} does not mention {n:?}");
    }
}

/// A scratch tree: `l1`, `l2` (lower), `u`, `w` (upper, work), `mnt`, and a regular `file`.
struct Tree {
    _tmp: tempfile::TempDir,
    root: PathBuf,
}

impl Tree {
    fn new() -> Tree {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = fs::canonicalize(tmp.path()).expect("canonicalize");
        for d in ["l1", "l2", "u", "w", "mnt"] {
            fs::create_dir(root.join(d)).expect("mkdir");
        }
        fs::write(root.join("file"), b"not a directory").expect("write");
        Tree { _tmp: tmp, root }
    }

    fn p(&self, rel: &str) -> String {
        self.root.join(rel).to_string_lossy().into_owned()
    }

    fn mkdir(&self, rel: &str) -> String {
        fs::create_dir_all(self.root.join(rel)).expect("mkdir");
        self.p(rel)
    }

    /// `-o OPTS MOUNTPOINT` against this tree's `mnt`.
    fn mount_o(&self, opts: &str) -> Output {
        run(&["-o", opts, &self.p("mnt")])
    }
}

#[test]
fn help_exits_zero_and_lists_every_form() {
    for flag in ["--help", "-h"] {
        let out = run(&[flag]);
        assert!(out.status.success(), "{flag}: {:?}", out.status);
        let text = String::from_utf8_lossy(&out.stdout);
        for needle in [
            "-o OPTIONS",
            "SOURCE MOUNTPOINT",
            "stratafs mount --lower",
            "--upper",
            "--work",
            "--volume",
            "--bind",
            "stratafs umount [-l] MOUNTPOINT",
            "stratafs demo",
            "--version",
            "lowerdir=",
            "upperdir=",
            "workdir=",
            "uidmapping=",
            "squash_to_root",
            "xattr_permissions=",
            "volatile",
            "allow_other",
        ] {
            assert!(
                text.contains(needle),
                "{flag} output lacks {needle:?}:\n{text}"
            );
        }
        // Every -o option the parser accepts, as the table writes it.
        for o in stratafs::options::OPTIONS {
            assert!(
                text.contains(&o.syntax()),
                "{flag} output lacks {}",
                o.syntax()
            );
        }
    }
}

#[test]
fn version_exits_zero() {
    for flag in ["--version", "-V"] {
        let out = run(&[flag]);
        assert!(out.status.success(), "{flag}: {:?}", out.status);
        let text = String::from_utf8_lossy(&out.stdout);
        let first = text.lines().next().unwrap_or("");
        assert_eq!(
            first,
            format!("stratafs version {}", env!("CARGO_PKG_VERSION"))
        );
        assert!(text.contains("FUSE library version: fuser"), "{text}");
    }
}

/// Asserts a malformed command line: exit status 2 and clap's whole report (the
/// problem, any "similar argument" tip, the usage), ending with a pointer to the
/// `--help` of `command`.
#[track_caller]
fn assert_usage_error(out: &Output, command: &str, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert!(stderr.starts_with("stratafs: "), "stderr: {stderr:?}");
    let last = stderr.trim_end().lines().last().unwrap_or("");
    assert!(
        last.contains(&format!("try '{command} --help'")),
        "last line {last:?} does not point at {command} --help; stderr: {stderr}"
    );
    for n in needles {
        assert!(
            stderr.contains(n),
            "stderr {stderr:?} does not mention {n:?}"
        );
    }
}

#[test]
fn usage_errors() {
    assert_usage_error(&run(&[]), "stratafs", &["MOUNTPOINT"]);
    assert_usage_error(&run(&["-o", "lowerdir=/tmp"]), "stratafs", &["MOUNTPOINT"]);
    assert_usage_error(
        &run(&["--no-such-flag", "/mnt"]),
        "stratafs",
        &["--no-such-flag", "Usage: stratafs"],
    );
    assert_usage_error(&run(&["/mnt", "-o"]), "stratafs", &["-o"]);
    assert_usage_error(
        &run(&["-o", "lowerdir=/tmp", "a", "b", "extra"]),
        "stratafs",
        &["extra"],
    );
    assert_usage_error(
        &run(&["mount", "--lower", "/tmp"]),
        "stratafs mount",
        &["<MOUNTPOINT>"],
    );
    assert_usage_error(&run(&["mount", "--lower"]), "stratafs mount", &["--lower"]);
    assert_usage_error(&run(&["umount"]), "stratafs umount", &["<MOUNTPOINT>"]);
    assert_usage_error(&run(&["demo", "extra"]), "stratafs demo", &["extra"]);
    assert_usage_error(&run(&["help", "nope"]), "stratafs", &["nope"]);
}

#[test]
fn subcommand_errors_keep_the_did_you_mean_hint() {
    assert_usage_error(
        &run(&["mount", "--lowr", "/l", "/m"]),
        "stratafs mount",
        &[
            "'--lowr'",
            "tip: a similar argument exists: '--lower'",
            "Usage: stratafs mount",
        ],
    );
    assert_usage_error(
        &run(&["volume", "create", "--sise", "1G", "v"]),
        "stratafs volume create",
        &["tip: a similar argument exists: '--size'"],
    );
    assert_usage_error(
        &run(&["volume", "lss"]),
        "stratafs volume",
        &["'lss'", "similar subcommand", "'ls'"],
    );
    assert_usage_error(
        &run(&["umount", "--lazzy", "/m"]),
        "stratafs umount",
        &["tip: a similar argument exists: '--lazy'"],
    );
}

/// `X --help` and `help X` print X's own help: its usage line and its flags, not the
/// main help with every -o option.
#[test]
fn every_subcommand_has_its_own_help() {
    let cases: &[(&[&str], &str, &[&str])] = &[
        (
            &["mount"],
            "stratafs mount",
            &["--lower", "--upper", "--work", "--volume"],
        ),
        (&["umount"], "stratafs umount", &["--lazy"]),
        (&["demo"], "stratafs demo", &[]),
        (&["volume"], "stratafs volume", &["create", "prune"]),
        (
            &["volume", "create"],
            "stratafs volume create",
            &["--size", "--label"],
        ),
        (&["volume", "ls"], "stratafs volume ls", &["--json"]),
        (&["volume", "inspect"], "stratafs volume inspect", &["NAME"]),
        (&["volume", "rm"], "stratafs volume rm", &["--force"]),
        (&["volume", "prune"], "stratafs volume prune", &[]),
        (&["completions"], "stratafs completions", &["bash"]),
        (&["man"], "stratafs man", &[]),
    ];
    for (words, usage, needles) in cases {
        let mut with_flag = words.to_vec();
        with_flag.push("--help");
        let mut with_help = vec!["help"];
        with_help.extend_from_slice(words);
        for args in [with_flag, with_help] {
            let out = run(&args);
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success(), "{args:?}: {:?}", out.status);
            assert!(
                text.contains(&format!("Usage: {usage}")),
                "{args:?} lacks its usage line:\n{text}"
            );
            assert!(
                !text.contains("Layer options"),
                "{args:?} printed the main help:\n{text}"
            );
            for n in *needles {
                assert!(text.contains(n), "{args:?} lacks {n:?}:\n{text}");
            }
        }
    }
    // `stratafs help` alone is the main help, not a mount on `./help`.
    let out = run(&["help"]);
    assert!(out.status.success(), "{:?}", out.status);
    assert!(String::from_utf8_lossy(&out.stdout).contains("Layer options"));
}

/// A misspelt option is named before the validation error it causes.
#[test]
fn unknown_option_warning_comes_before_the_validation_error() {
    let t = Tree::new();
    let out = t.mount_o(&format!(
        "lowerdir={},upperdr={},workdir={}",
        t.p("l1"),
        t.p("u"),
        t.p("w")
    ));
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 2, "{stderr}");
    assert!(
        lines[0].starts_with("stratafs: warning: unknown option 'upperdr="),
        "{stderr}"
    );
    assert!(
        lines[1].starts_with("stratafs: workdir ") && lines[1].contains("given without upperdir"),
        "{stderr}"
    );
}

#[test]
fn lowerdir_errors() {
    let t = Tree::new();
    assert_fails(&t.mount_o("upperdir=/u,workdir=/w"), &["lowerdir"]);
    assert_fails(&t.mount_o("lowerdir="), &["lowerdir"]);
    assert_fails(&t.mount_o("lowerdir"), &["lowerdir"]);
    assert_fails(
        &t.mount_o(&format!("lowerdir={}:", t.p("l1"))),
        &["lowerdir"],
    );
    assert_fails(
        &t.mount_o(&format!("lowerdir={}::{}", t.p("l1"), t.p("l2"))),
        &["lowerdir"],
    );
    let nope = t.p("nope");
    assert_fails(
        &t.mount_o(&format!("lowerdir={}:{nope}", t.p("l1"))),
        &["lowerdir", &nope, "No such file or directory"],
    );
    let file = t.p("file");
    assert_fails(
        &t.mount_o(&format!("lowerdir={file}")),
        &["lowerdir", &file, "Not a directory"],
    );
}

#[test]
fn relative_lowerdir_is_resolved_from_the_working_directory() {
    // podman runs fuse-overlayfs from its storage directory with `l/ID` symlinks.
    let t = Tree::new();
    t.mkdir("l");
    symlink("../l1", t.root.join("l/ABC")).expect("symlink");
    assert_fails(
        &run_in(&t.root, &["-o", "lowerdir=l/MISSING", "mnt"]),
        &["lowerdir", "l/MISSING", "No such file or directory"],
    );
    // The symlinked layer is accepted: the first problem found is the mountpoint.
    assert_fails(
        &run_in(
            &t.root,
            &["-o", "lowerdir=l/ABC:l2,upperdir=u,workdir=w", "no-mnt"],
        ),
        &["mountpoint", "no-mnt"],
    );
}

#[test]
fn upper_and_work_errors() {
    let t = Tree::new();
    let (l1, u, w) = (t.p("l1"), t.p("u"), t.p("w"));
    assert_fails(
        &t.mount_o(&format!("lowerdir={l1},upperdir={u}")),
        &["upperdir", &u, "workdir"],
    );
    assert_fails(
        &t.mount_o(&format!("lowerdir={l1},workdir={w}")),
        &["workdir", &w, "upperdir"],
    );
    let nope = t.p("nope");
    assert_fails(
        &t.mount_o(&format!("lowerdir={l1},upperdir={nope},workdir={w}")),
        &["upperdir", &nope, "No such file or directory"],
    );
    assert_fails(
        &t.mount_o(&format!("lowerdir={l1},upperdir={u},workdir={nope}")),
        &["workdir", &nope, "No such file or directory"],
    );
    let file = t.p("file");
    assert_fails(
        &t.mount_o(&format!("lowerdir={l1},upperdir={file},workdir={w}")),
        &["upperdir", &file, "Not a directory"],
    );
    assert_fails(
        &t.mount_o(&format!("lowerdir={l1},upperdir={u},workdir={u}")),
        &["workdir", &u],
    );
    let inside_u = t.mkdir("u/work");
    assert_fails(
        &t.mount_o(&format!("lowerdir={l1},upperdir={u},workdir={inside_u}")),
        &["workdir", &inside_u, "upperdir"],
    );
    let inside_w = t.mkdir("w/upper");
    assert_fails(
        &t.mount_o(&format!("lowerdir={l1},upperdir={inside_w},workdir={w}")),
        &["upperdir", &inside_w, "workdir"],
    );
}

#[test]
fn upper_and_lower_must_not_nest() {
    let t = Tree::new();
    let (l1, l2, u, w) = (t.p("l1"), t.p("l2"), t.p("u"), t.p("w"));
    let upper_in_lower = t.mkdir("l1/upper");
    assert_fails(
        &t.mount_o(&format!(
            "lowerdir={l2}:{l1},upperdir={upper_in_lower},workdir={w}"
        )),
        &["upperdir", &upper_in_lower, "lowerdir", &l1],
    );
    let lower_in_upper = t.mkdir("u/lower");
    assert_fails(
        &t.mount_o(&format!(
            "lowerdir={lower_in_upper},upperdir={u},workdir={w}"
        )),
        &["lowerdir", &lower_in_upper, "upperdir"],
    );
    assert_fails(
        &t.mount_o(&format!("lowerdir={u},upperdir={u},workdir={w}")),
        &["upperdir", &u, "lowerdir"],
    );
    // Seen through a symlink, the lower layer still contains the upper one.
    let link = t.p("link");
    symlink(&l1, &link).expect("symlink");
    assert_fails(
        &t.mount_o(&format!(
            "lowerdir={link},upperdir={upper_in_lower},workdir={w}"
        )),
        &["upperdir", &upper_in_lower, &link],
    );
}

#[test]
fn workdir_on_another_filesystem() {
    let t = Tree::new();
    // /dev/shm is a tmpfs on ordinary systems; skip where it is absent or the same fs.
    let Ok(shm) = tempfile::tempdir_in("/dev/shm") else {
        return;
    };
    use std::os::unix::fs::MetadataExt;
    let same = match (fs::metadata(&t.root), fs::metadata(shm.path())) {
        (Ok(a), Ok(b)) => a.dev() == b.dev(),
        _ => true,
    };
    if same {
        return;
    }
    let w = shm.path().to_string_lossy().into_owned();
    assert_fails(
        &t.mount_o(&format!(
            "lowerdir={},upperdir={},workdir={w}",
            t.p("l1"),
            t.p("u")
        )),
        &["workdir", &w, "same filesystem"],
    );
}

#[test]
fn mountpoint_errors() {
    let t = Tree::new();
    let lower = format!("lowerdir={}", t.p("l1"));
    let nope = t.p("nope");
    assert_fails(
        &run(&["-o", &lower, &nope]),
        &["mountpoint", &nope, "No such file or directory"],
    );
    let file = t.p("file");
    assert_fails(
        &run(&["-o", &lower, &file]),
        &["mountpoint", &file, "Not a directory"],
    );
    // The mount(8) helper form: SOURCE is ignored, MOUNTPOINT is checked.
    assert_fails(
        &run(&["stratafs", &nope, "-o", &format!("rw,{lower},dev,suid")]),
        &["mountpoint", &nope],
    );
}

#[test]
fn bad_option_values() {
    let t = Tree::new();
    let l1 = t.p("l1");
    for (opt, needle) in [
        ("xattr_permissions=3", "xattr_permissions"),
        ("xattr_permissions=x", "xattr_permissions"),
        ("squash_to_uid=abc", "squash_to_uid"),
        ("squash_to_gid=-1", "squash_to_gid"),
        ("uidmapping=0:1000", "uidmapping"),
        ("uidmapping=0:1000:1:1", "uidmapping"),
        ("uidmapping=0:x:1", "uidmapping"),
        ("gidmapping=0:4294967295:2", "gidmapping"),
        ("uidmapping=0:1000:10:5:2000:1", "uidmapping"),
        ("timeout=soon", "timeout"),
        ("fsync=2", "fsync"),
        ("writeback=yes", "writeback"),
        ("threaded=x", "threaded"),
        ("passthrough=2", "passthrough"),
        ("max_write=0", "max_write"),
        ("volatile=1", "volatile"),
        ("context=\"unterminated", "context"),
        ("volume=bad/name:/x", "volume"),
        ("volume=data:relative", "volume"),
        ("volume=data:/a/../b", "volume"),
        ("volume=a:/x,volume=b:/x", "/x"),
        ("bind=/only-one-part", "bind"),
        ("\"fsname=a,b\"", "fsname"),
    ] {
        let out = t.mount_o(&format!("lowerdir={l1},{opt}"));
        assert_fails(&out, &[needle]);
    }
    let nope = t.p("nope");
    assert_fails(
        &t.mount_o(&format!("lowerdir={l1},bind={nope}:/srv")),
        &["bind", &nope, "No such file or directory"],
    );
}

#[test]
fn mount_subcommand_errors() {
    let t = Tree::new();
    let (l1, u, w, mnt) = (t.p("l1"), t.p("u"), t.p("w"), t.p("mnt"));
    let nope = t.p("nope");
    assert_fails(
        &run(&["mount", "--lower", &nope, &mnt]),
        &["lowerdir", &nope, "No such file or directory"],
    );
    assert_fails(
        &run(&["mount", "--lower", &l1, "--upper", &u, &mnt]),
        &["upperdir", &u, "workdir"],
    );
    assert_fails(
        &run(&["mount", "--lower", &l1, "--work", &w, &mnt]),
        &["workdir", &w, "upperdir"],
    );
    assert_fails(
        &run(&["mount", "--upper", &u, "--work", &w, &mnt]),
        &["lowerdir"],
    );
    assert_fails(
        &run(&["mount", "--lower", &l1, "--volume", "no colon", &mnt]),
        &["volume"],
    );
    assert_fails(
        &run(&[
            "mount",
            "--lower",
            &l1,
            "--bind",
            &format!("{nope}:/srv"),
            &mnt,
        ]),
        &["bind", &nope],
    );
    assert_usage_error(
        &run(&["mount", "--lower", &l1, "--frobnicate", &mnt]),
        "stratafs mount",
        &["--frobnicate"],
    );
    assert_fails(
        &run(&[
            "mount",
            "--lower",
            &l1,
            "-o",
            &format!("lowerdir={l1}"),
            &mnt,
        ]),
        &["--lower", "lowerdir"],
    );
}

// ---------------------------------------------------------------------------------------
// Mounted: umount, and mount failures that name their cause
// ---------------------------------------------------------------------------------------

fn one_file_layers() -> Layers {
    Layers::new(&[LayerBuilder::new().file("f", b"lower\n")])
}

#[test]
fn umount_of_what_is_not_mounted_says_so() {
    let t = Tree::new();
    let mnt = t.p("mnt");
    assert_fails(&run(&["umount", &mnt]), &[&mnt, "not mounted"]);
    let nope = t.p("nope");
    assert_fails(
        &run(&["umount", &nope]),
        &[&nope, "No such file or directory"],
    );
}

#[test]
fn umount_refuses_a_mount_that_is_not_fuse() {
    if !require_fuse() {
        return;
    }
    let t = Tree::new();
    let mnt = t.root.join("mnt");
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "stratafs-test-tmpfs"])
        .arg(&mnt)
        .status()
        .expect("mount tmpfs");
    assert!(st.success());
    let out = run(&["umount", &t.p("mnt")]);
    let still = mount_at(&mnt).map(|e| e.fstype);
    let _ = Command::new("umount").arg(&mnt).status();
    assert_fails(&out, &["tmpfs", "not a stratafs mount"]);
    assert_eq!(still.as_deref(), Some("tmpfs"), "the tmpfs was unmounted");
}

#[test]
fn busy_mount_is_kept_unless_lazy_and_lazy_says_what_it_did() {
    if !require_fuse() {
        return;
    }
    let l = one_file_layers();
    let mut m = StrataMount::new(&l);
    let open = fs::File::open(m.join("f")).expect("open through the mount");
    let mp = l.merged.to_string_lossy().into_owned();
    assert_fails(&run(&["umount", &mp]), &[&mp, "busy", "--lazy"]);
    assert!(mount_at(&l.merged).is_some(), "a refused umount unmounted");

    let out = run(&["umount", "--lazy", &mp]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("detached lazily"), "{stderr:?}");
    assert!(mount_at(&l.merged).is_none(), "still in the mount table");
    drop(open);
    // Its last user gone, the detached mount ends and so does the daemon (a signal to
    // it, if it has not exited yet, is what an unmount would have done anyway).
    let st = m.signal_and_wait(libc::SIGTERM);
    assert!(
        st.success() || st.code().is_none(),
        "{st:?}; daemon log:\n{}",
        m.log_text()
    );
}

#[test]
fn umount_unmounts_an_idle_mount_quietly() {
    if !require_fuse() {
        return;
    }
    let l = one_file_layers();
    let mut m = StrataMount::new(&l);
    let mp = l.merged.to_string_lossy().into_owned();
    let out = run(&["umount", &mp]);
    assert!(out.status.success(), "{out:?}");
    assert!(out.stderr.is_empty(), "{out:?}");
    assert!(mount_at(&l.merged).is_none());
    let st = m.signal_and_wait(0);
    assert!(st.success(), "{st:?}");
}

#[test]
fn remount_over_a_dead_daemon_says_to_unmount_first() {
    if !require_fuse() {
        return;
    }
    let l = one_file_layers();
    let mut m = StrataMount::new(&l);
    m.signal_and_wait(libc::SIGKILL);
    let mp = l.merged.to_string_lossy().into_owned();
    let out = run(&["-o", &l.rw_options(), &mp]);
    assert_fails(
        &out,
        &[
            &mp,
            "Transport endpoint is not connected",
            &format!("stratafs umount {mp}"),
        ],
    );
    // And that advice works on the dead mount.
    let out = run(&["umount", &mp]);
    assert!(out.status.success(), "{out:?}");
    assert!(mount_at(&l.merged).is_none());
}

/// An unprivileged user who may not open /dev/fuse is told so, not just "Permission
/// denied". /dev/fuse is replaced, in a mount namespace of the test's own, by a file
/// only root may open.
#[test]
fn unprivileged_mount_names_dev_fuse_when_it_is_refused() {
    if !require_fuse() {
        return;
    }
    let l = one_file_layers();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&l.root, fs::Permissions::from_mode(0o755)).expect("chmod");
    let fake = l.root.join("fake-dev-fuse");
    fs::write(&fake, b"").expect("write");
    fs::set_permissions(&fake, fs::Permissions::from_mode(0o600)).expect("chmod");
    let script = format!(
        "mount --bind '{}' /dev/fuse && exec setpriv --reuid=65534 --regid=65534 \
         --clear-groups '{BIN}' -f -o 'lowerdir={}' '{}'",
        fake.display(),
        l.lowers[0].display(),
        l.merged.display()
    );
    let out = sh_in_private_mount_ns(&script, &[]);
    assert_fails(
        &out,
        &["/dev/fuse", "Permission denied", "read-write access"],
    );
}

/// `findmnt -t fuse.stratafs` and tools that look for the subtype find the mount;
/// the source column is the caller's `fsname=`.
#[test]
fn proc_mounts_shows_type_fuse_stratafs_and_the_fsname() {
    if !require_fuse() {
        return;
    }
    let l = one_file_layers();
    for (extra, source) in [("", "stratafs"), (",fsname=my-container", "my-container")] {
        let m =
            StrataMount::with_options(&format!("{}{extra}", l.rw_options()), &l.merged, &l.root);
        let e = mount_at(&l.merged).expect("mounted");
        assert_eq!(e.fstype, "fuse.stratafs", "{e:?}");
        assert_eq!(e.source, source, "{e:?}");
        let found = Command::new("findmnt")
            .args(["-n", "-o", "SOURCE", "-t", "fuse.stratafs", "--mountpoint"])
            .arg(&l.merged)
            .output()
            .expect("findmnt");
        assert_eq!(String::from_utf8_lossy(&found.stdout).trim(), source);
        drop(m);
    }
}

/// Ctrl-C at the demo's prompt: the terminal signals the whole foreground process
/// group. The demo unmounts and cleans up, exits 0 and prints no error.
#[test]
fn demo_ends_cleanly_on_ctrl_c() {
    if !require_fuse() {
        return;
    }
    use std::io::{BufRead, BufReader};
    use std::os::unix::process::CommandExt;
    let mut child = Command::new(BIN)
        .arg("demo")
        .env_remove("STRATAFS_DEMO_NONINTERACTIVE")
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn demo");
    let pgid = child.id() as libc::pid_t;
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let mut seen = String::new();
    let mut merged = None;
    loop {
        let mut line = String::new();
        if stdout.read_line(&mut line).expect("read demo output") == 0 {
            break;
        }
        if let Some(rest) = line.strip_prefix("The mount stays up at ") {
            merged = rest.split(" — ").next().map(PathBuf::from);
        }
        seen.push_str(&line);
        if line.starts_with("Press Ctrl-C") {
            break;
        }
    }
    let merged = merged.unwrap_or_else(|| panic!("no prompt in the demo output:\n{seen}"));
    assert!(mount_at(&merged).is_some(), "{seen}");
    // SAFETY: kill(2) on the process group of our own, unreaped child.
    assert_eq!(unsafe { libc::kill(-pgid, libc::SIGINT) }, 0);
    let mut rest = String::new();
    let _ = std::io::Read::read_to_string(&mut stdout, &mut rest);
    let out = child.wait_with_output().expect("wait demo");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?}; stderr: {stderr}", out.status);
    assert!(stderr.is_empty(), "error lines on Ctrl-C: {stderr:?}");
    assert!(mount_at(&merged).is_none(), "the demo left its mount");
    assert!(!merged.exists(), "the demo left its scratch directory");
}

/// `mount -t fuse.stratafs` and an fstab line, through mount(8) itself. mount(8) runs
/// /sbin/mount.fuse.stratafs; the test puts that helper (a link to this build) in a
/// directory of its own, bound over /usr/sbin (= /sbin) in a private mount namespace,
/// so nothing on the machine changes. Everything mounted there is unmounted there.
#[test]
fn mount_8_and_fstab_run_stratafs_as_the_fuse_stratafs_helper() {
    if !require_fuse() {
        return;
    }
    let l = one_file_layers();
    let sbin = l.root.join("sbin");
    fs::create_dir(&sbin).expect("mkdir");
    symlink(BIN, sbin.join("mount.fuse.stratafs")).expect("symlink");
    let fstab = l.root.join("fstab");
    fs::write(
        &fstab,
        format!(
            "fromfstab {} fuse.stratafs {},fsname=fromfstab,noauto 0 0\n",
            l.merged.display(),
            l.rw_options()
        ),
    )
    .expect("write fstab");
    let script = r#"
set -eu
trap '"$BIN" umount "$MNT" 2>/dev/null || umount -l "$MNT" 2>/dev/null || true' EXIT
mount --bind "$SBIN" /usr/sbin
mount -t fuse.stratafs stratafs "$MNT" -o "$OPTS"
echo "cli: $(findmnt -n -o FSTYPE,SOURCE -t fuse.stratafs --mountpoint "$MNT")"
echo "cli read: $(cat "$MNT/f")"
"$BIN" umount "$MNT"
mount -T "$FSTAB" "$MNT"
echo "fstab: $(findmnt -n -o FSTYPE,SOURCE --mountpoint "$MNT")"
echo "fstab read: $(cat "$MNT/f")"
"$BIN" umount "$MNT"
echo "left: $(findmnt -n --mountpoint "$MNT" || true)"
"#;
    let opts = l.rw_options();
    let out = sh_in_private_mount_ns(
        script,
        &[
            ("BIN", OsStr::new(BIN)),
            ("MNT", l.merged.as_os_str()),
            ("SBIN", sbin.as_os_str()),
            ("FSTAB", fstab.as_os_str()),
            ("OPTS", OsStr::new(&opts)),
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?}\n{stdout}\n{stderr}", out.status);
    let lines: Vec<&str> = stdout.lines().map(|l| l.trim_end()).collect();
    assert_eq!(
        lines,
        [
            "cli: fuse.stratafs stratafs",
            "cli read: lower",
            "fstab: fuse.stratafs fromfstab",
            "fstab read: lower",
            "left:",
        ],
        "{stderr}"
    );
}

/// Every command of the clap definition (the one the parser uses), with its path.
fn all_commands() -> Vec<Vec<String>> {
    fn walk(cmd: &clap::Command, path: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
        for sub in cmd.get_subcommands() {
            path.push(sub.get_name().to_string());
            out.push(path.clone());
            walk(sub, path, out);
            path.pop();
        }
    }
    let mut out = Vec::new();
    walk(&stratafs::cli::command(), &mut Vec::new(), &mut out);
    out
}

/// The man page and the completions come from the parser's own definition: every
/// command and every one of its long flags is in them.
#[test]
fn man_page_and_completions_cover_every_command() {
    let commands = all_commands();
    assert!(commands.len() >= 12, "{commands:?}");
    let man = run(&["man"]);
    assert!(man.status.success(), "{man:?}");
    let page = String::from_utf8_lossy(&man.stdout);
    assert!(page.starts_with(".ie") || page.starts_with(".TH"), "{page}");
    for section in ["NAME", "SYNOPSIS", "ENVIRONMENT", "EXIT STATUS", "EXAMPLES"] {
        assert!(
            page.contains(&format!(".SH {section}\n"))
                || page.contains(&format!(".SH \"{section}\"\n")),
            "no {section}"
        );
    }
    for needle in ["STRATAFS_LOG", "lowerdir=", "fuse.stratafs", "upperdir=DIR"] {
        assert!(page.contains(needle), "the man page lacks {needle:?}");
    }
    for o in stratafs::options::OPTIONS {
        // roff writes '-' as \- and '\' as \e.
        let in_man = o.syntax().replace('\\', "\\e").replace('-', "\\-");
        assert!(
            page.contains(&format!("\\fB{in_man}\\fR")),
            "the man page lacks -o {}",
            o.syntax()
        );
    }
    let scripts: Vec<(String, String)> = ["bash", "zsh", "fish"]
        .iter()
        .map(|shell| {
            let out = run(&["completions", shell]);
            assert!(out.status.success(), "{shell}: {out:?}");
            (
                shell.to_string(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
            )
        })
        .collect();
    let root = stratafs::cli::command();
    for path in &commands {
        let mut cmd = &root;
        for name in path {
            cmd = cmd.find_subcommand(name).expect("listed");
        }
        let title = format!(".SS \"stratafs {}\"", path.join(" "));
        assert!(page.contains(&title), "the man page lacks {title}");
        let leaf = path.last().expect("non-empty");
        for (shell, script) in &scripts {
            assert!(script.contains(leaf.as_str()), "{shell} lacks {path:?}");
        }
        for arg in cmd.get_arguments().filter(|a| !a.is_hide_set()) {
            if let Some(long) = arg.get_long() {
                // roff writes a flag's dashes as \-.
                let in_man = format!("\\-\\-{}", long.replace('-', "\\-"));
                assert!(page.contains(&in_man), "man lacks {path:?} --{long}");
                for (shell, script) in &scripts {
                    assert!(script.contains(long), "{shell} lacks {path:?} --{long}");
                }
            }
        }
    }
    let check = Command::new("groff")
        .args(["-man", "-ww", "-z"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    if let Ok(mut groff) = check {
        use std::io::Write;
        groff
            .stdin
            .take()
            .expect("stdin")
            .write_all(&man.stdout)
            .expect("write");
        let out = groff.wait_with_output().expect("groff");
        assert!(
            out.status.success() && out.stderr.is_empty(),
            "groff warns: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let bash = Command::new("bash")
        .args(["-n", "-c", &scripts[0].1])
        .output()
        .expect("bash");
    assert!(bash.status.success(), "{bash:?}");
}

/// `-d` starts with the configuration the mount really uses, before any request.
#[test]
fn debug_prints_the_resolved_configuration_first() {
    if !require_fuse() {
        return;
    }
    let l = one_file_layers();
    let mut m = StrataMount::with_args(&l.rw_options(), &["-d"], &l.merged, &l.root);
    let _ = fs::read(m.join("f")).expect("read");
    m.unmount();
    let out = m.output();
    let first = out.lines().next().unwrap_or("");
    assert!(first.contains("config: mountpoint"), "{out}");
    for needle in [
        format!("config: lower layers (top first) {}", l.lowers[0].display()),
        format!(
            "config: upper {}, work {}",
            l.upper.display(),
            l.work.display()
        ),
        "config: passthrough on".to_string(),
        "config: uids identity".to_string(),
    ] {
        assert!(out.contains(&needle), "no {needle:?} in:\n{out}");
    }
    let lines: Vec<&str> = out.lines().collect();
    let last_config = lines
        .iter()
        .rposition(|l| l.contains("config: "))
        .unwrap_or(0);
    let first_other = lines
        .iter()
        .position(|l| !l.contains("config: "))
        .unwrap_or(0);
    assert!(
        last_config < first_other,
        "config lines are not first:\n{out}"
    );
}

/// A detached daemon's stderr is /dev/null; `-o log=FILE` keeps its log.
#[test]
fn log_option_keeps_a_detached_daemons_log() {
    if !require_fuse() {
        return;
    }
    let l = one_file_layers();
    let log = l.root.join("daemon.log");
    let d = StrataDaemon::with_options(&l, &format!("{},log={}", l.rw_options(), log.display()));
    let _ = fs::read(d.path().join("f")).expect("read");
    drop(d);
    // It starts with the configuration and ends with why the daemon stopped.
    let text = fs::read_to_string(&log).expect("the log file exists");
    assert!(
        text.contains(&format!(
            "config: lower layers (top first) {}",
            l.lowers[0].display()
        )),
        "{text}"
    );
    assert!(
        text.contains("session ended") || text.contains("unmounted"),
        "{text}"
    );
    let t = Tree::new();
    assert_fails(
        &t.mount_o(&format!(
            "lowerdir={},log=/nonexistent-dir/x.log",
            t.p("l1")
        )),
        &["log", "/nonexistent-dir/x.log", "No such file"],
    );
}

/// A mount naming a missing volume says it creates it; `:nocreate` refuses instead.
/// `-o log=syslog`: one RFC 3164 datagram per line to /dev/log, or a clear error when
/// there is none. Run in a private mount namespace whose /dev is a tmpfs (with /dev/null
/// and /dev/fuse bound back in), so the host's /dev/log is never touched: without
/// `/dev/log` first, then with a socket this test binds mounted over it.
#[test]
fn log_syslog_sends_datagrams_to_dev_log_or_says_it_cannot() {
    use std::os::unix::net::UnixDatagram;
    if !require_fuse() {
        return;
    }
    let l = one_file_layers();
    let sock = l.root.join("log.sock");
    let listener = UnixDatagram::bind(&sock).expect("bind");
    listener
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let hostdev = l.root.join("hostdev");
    fs::create_dir(&hostdev).expect("mkdir");
    let script = r#"
set -eu
trap '"$BIN" umount "$MNT" 2>/dev/null || umount -l "$MNT" 2>/dev/null || true' EXIT
mount --rbind /dev "$HOSTDEV"
mount -t tmpfs none /dev
touch /dev/null /dev/fuse
mount --bind "$HOSTDEV/null" /dev/null
mount --bind "$HOSTDEV/fuse" /dev/fuse
rc=0
"$BIN" -o "$OPTS,log=syslog" "$MNT" || rc=$?
echo "exit $rc"
[ "$rc" -ne 0 ]
touch /dev/log
mount --bind "$SOCK" /dev/log
"$BIN" -o "$OPTS,log=syslog" "$MNT"
echo "read: $(cat "$MNT/f")"
"$BIN" umount "$MNT"
"#;
    let opts = l.rw_options();
    let out = sh_in_private_mount_ns(
        script,
        &[
            ("BIN", OsStr::new(BIN)),
            ("MNT", l.merged.as_os_str()),
            ("HOSTDEV", hostdev.as_os_str()),
            ("SOCK", sock.as_os_str()),
            ("OPTS", OsStr::new(&opts)),
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?}\n{stdout}\n{stderr}", out.status);
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        ["exit 1", "read: lower"],
        "{stderr}"
    );
    assert_eq!(
        stderr.trim_end(),
        "stratafs: log=syslog: cannot reach /dev/log: No such file or directory (os error 2)"
    );
    // The daemon's lines up to its exit after the unmount, each `<PRI>stratafs[PID]: `.
    let mut lines = Vec::new();
    let mut buf = [0u8; 4096];
    while !lines.iter().any(|l: &String| l.contains("unmounted")) {
        let n = listener
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("{e}; received so far: {lines:?}"));
        lines.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    // Facility daemon (3 * 8) + severity info (6).
    let first = &lines[0];
    assert!(
        first.starts_with("<30>stratafs[") && first.contains("]: config: mountpoint "),
        "{lines:?}"
    );
    for line in &lines {
        let rest = line.strip_prefix('<').expect("<PRI>");
        let (pri, rest) = rest.split_once(">stratafs[").expect("tag");
        let (pid, msg) = rest.split_once("]: ").expect("pid");
        assert!(
            pri.parse::<u8>().is_ok() && pid.parse::<u32>().is_ok(),
            "{line:?}"
        );
        assert!(!msg.is_empty() && !msg.contains('\n'), "{line:?}");
    }
}

#[test]
fn missing_volume_at_mount_is_created_and_said_or_refused_with_nocreate() {
    let t = Tree::new();
    let state = t.p("state");
    let refused = run(&[
        "--state-dir",
        &state,
        "mount",
        "--lower",
        &t.p("l1"),
        "--volume",
        "tpyo:/data:nocreate",
        &t.p("mnt"),
    ]);
    assert_fails(&refused, &["volume tpyo does not exist", "nocreate"]);
    assert!(!t.root.join("state/volumes/tpyo").exists());
    if !require_fuse() {
        return;
    }
    let l = one_file_layers();
    let state = l.root.join("state");
    let state_arg = state.to_string_lossy().into_owned();
    let m = StrataMount::with_args(
        &format!("{},volume=tpyo:/data", l.rw_options()),
        &["--state-dir", &state_arg],
        &l.merged,
        &l.root,
    );
    assert!(m.join("data").is_dir());
    let out = m.output();
    assert!(
        out.contains("stratafs: warning: volume tpyo does not exist: creating it"),
        "{out}"
    );
    drop(m);
    assert!(state.join("volumes/tpyo/_data").is_dir());
}

/// Kernel overlayfs syntax and values: accepted where meaningful, refused with the
/// kernel's reasons where not; fuse-overlayfs options warned about when they do
/// nothing here, never silently ignored.
#[test]
fn kernel_and_fuse_overlayfs_option_parity() {
    let t = Tree::new();
    let l1 = t.p("l1");
    for (opt, needles) in [
        (format!("datadir+={l1}"), &["datadir+", "data-only"][..]),
        (format!("lowerdir={l1}::{}", t.p("l2")), &["data-only"]),
        (
            "redirect_dir=nofollow".into(),
            &["redirect_dir", "always followed"],
        ),
        (
            "redirect_dir=maybe".into(),
            &["redirect_dir", "on, follow, nofollow or off"],
        ),
        ("xino=maybe".into(), &["xino", "on, off or auto"]),
        ("index=maybe".into(), &["index"]),
        ("uuid=maybe".into(), &["uuid"]),
        ("max_threads=0".into(), &["max_threads", "positive"]),
        (
            "metacopy=on,redirect_dir=off".into(),
            &["conflicting options: metacopy=on,redirect_dir=off"],
        ),
        (
            "metacopy=on,userxattr".into(),
            &["conflicting options: userxattr,metacopy=on"],
        ),
    ] {
        let o = if opt.starts_with("datadir") || opt.starts_with("lowerdir") {
            opt.clone()
        } else {
            format!("lowerdir={l1},{opt}")
        };
        let out = t.mount_o(&o);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let last = stderr.lines().last().unwrap_or("");
        assert_eq!(out.status.code(), Some(1), "{o}: {stderr}");
        for n in needles {
            assert!(last.contains(n), "{o}: {last:?} lacks {n:?}");
        }
    }
    // Accepted, with a warning each, then the mount point is what fails.
    let out = run(&[
        "-o",
        &format!(
            "lowerdir+={l1},lowerdir+={},plugins=/x.so,max_write=4096,static_nlink,clone_fd,\
             index=off,userxattr,max_threads=3,xino=auto,uuid=null,redirect_dir=follow",
            t.p("l2")
        ),
        &t.p("nope"),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    for name in [
        "plugins=",
        "max_write=",
        "static_nlink",
        "index=off",
        "userxattr",
    ] {
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("stratafs: warning: option '")
                    && l.contains(name)
                    && l.contains("no effect")),
            "no warning for {name}: {stderr}"
        );
    }
    assert!(!stderr.contains("clone_fd"), "{stderr}");
    assert_eq!(lines.len(), 6, "{stderr}");
    assert!(lines[5].contains("mountpoint"), "{stderr}");
}

/// `lowerdir+=` adds layers below the ones before it, as the kernel's syntax does.
#[test]
fn lowerdir_plus_stacks_layers() {
    if !require_fuse() {
        return;
    }
    let l = Layers::new(&[
        LayerBuilder::new().file("top", b"1").file("both", b"top"),
        LayerBuilder::new()
            .file("bottom", b"2")
            .file("both", b"bottom"),
    ]);
    let opts = format!(
        "lowerdir+={},lowerdir+={},upperdir={},workdir={}",
        l.lowers[0].display(),
        l.lowers[1].display(),
        l.upper.display(),
        l.work.display()
    );
    let m = StrataMount::with_options(&opts, &l.merged, &l.root);
    assert_eq!(fs::read(m.join("both")).expect("read"), b"top");
    assert!(m.join("top").exists() && m.join("bottom").exists());
}

/// `auto_unmount`: when the daemon dies, the mount goes with it (fusermount3 stays
/// behind to do that) instead of answering ENOTCONN.
#[test]
fn auto_unmount_removes_the_mount_of_a_dead_daemon() {
    if !require_fuse() {
        return;
    }
    let l = one_file_layers();
    let mut m = StrataMount::with_options(
        &format!("{},auto_unmount", l.rw_options()),
        &l.merged,
        &l.root,
    );
    assert_eq!(
        mount_at(&l.merged).map(|e| e.fstype).as_deref(),
        Some("fuse.stratafs")
    );
    m.signal_and_wait(libc::SIGKILL);
    let deadline = Instant::now() + Duration::from_secs(10);
    while mount_at(&l.merged).is_some() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        mount_at(&l.merged).is_none(),
        "the dead daemon's mount stayed"
    );
}

/// Runs `script` with `sh -c` in a private mount namespace (`unshare --mount`), so
/// that what it mounts over /dev or /sbin never reaches the host, with `env` set.
fn sh_in_private_mount_ns(script: &str, env: &[(&str, &OsStr)]) -> Output {
    Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", script])
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("unshare")
}
