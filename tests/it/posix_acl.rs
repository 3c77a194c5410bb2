//! POSIX ACLs and set-group-ID handling, compared with kernel overlayfs: the same
//! scenario runs, as root and as unprivileged users (setpriv), on two identical layer
//! stacks, once through each; every observation must agree, and each scenario also
//! states what the kernel is known to answer, so that it cannot pass by doing
//! nothing on both sides.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};

use crate::fixture::{self, KernelOverlay, LayerBuilder, Layers, StrataMount};

/// A user that is in no group of the files below (no supplementary groups).
pub(crate) const BOB: (u32, u32) = (1001, 1001);

/// Runs the shell line `script` in `root` as `ids` (root when `None`), with no
/// supplementary groups and umask `umask`; returns its stdout, "ok" when it printed
/// nothing, or "error: <reason>" (the end of its first stderr line, without the
/// path, which differs between the two mounts).
fn run_as(ids: Option<(u32, u32)>, umask: u32, script: &str, root: &Path) -> String {
    let script = format!("umask {umask:03o}; cd {} && {script}", root.display());
    let mut cmd = match ids {
        Some((uid, gid)) => {
            let mut c = Command::new("setpriv");
            c.args([
                "--reuid",
                &uid.to_string(),
                "--regid",
                &gid.to_string(),
                "--clear-groups",
                "sh",
                "-c",
                &script,
            ]);
            c
        }
        None => {
            let mut c = Command::new("sh");
            c.args(["-c", &script]);
            c
        }
    };
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .expect("run a scenario step");
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if out.status.success() {
        if stdout.is_empty() {
            "ok".into()
        } else {
            stdout
        }
    } else {
        // Messages name the path (different on both sides) before the reason.
        let err = String::from_utf8_lossy(&out.stderr);
        let first = err.lines().next().unwrap_or("").to_string();
        format!("error: {}", first.rsplit(": ").next().unwrap_or(&first))
    }
}

fn mode_of(p: &Path) -> String {
    let md = fs::symlink_metadata(p).unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()));
    format!("{:o}", md.mode() & 0o7777)
}

/// One scenario step: who runs it, with which umask, and what (a shell line run in
/// the merged root, whose output is the observation).
pub(crate) struct Step {
    who: Option<(u32, u32)>,
    umask: u32,
    script: &'static str,
    /// What kernel overlayfs answers.
    kernel: &'static str,
}

pub(crate) fn root(script: &'static str, kernel: &'static str) -> Step {
    Step {
        who: None,
        umask: 0o022,
        script,
        kernel,
    }
}

pub(crate) fn bob(script: &'static str, kernel: &'static str) -> Step {
    Step {
        who: Some(BOB),
        umask: 0o022,
        script,
        kernel,
    }
}

/// Layers both mounts start from: lower files and directories carrying ACLs, and
/// world-traversable directories so that unprivileged users reach the mount.
fn acl_layers() -> Layers {
    let l = Layers::new(&[LayerBuilder::new()
        .file("denied", "secret\n")
        .file("lowfile", "data\n")
        .dir("inherit")
        .dir("shared")]);
    fs::set_permissions(&l.root, fs::Permissions::from_mode(0o755)).unwrap();
    let low = &l.lowers[0];
    for (p, mode) in [
        ("denied", 0o644),
        ("lowfile", 0o644),
        ("inherit", 0o777),
        ("shared", 0o777),
    ] {
        fs::set_permissions(low.join(p), fs::Permissions::from_mode(mode)).unwrap();
    }
    for (acl, p) in [
        ("u:1001:---", "denied"),
        ("d:u::rwx,d:g::rwx,d:o::---,d:u:1002:r-x", "inherit"),
    ] {
        let st = Command::new("setfacl")
            .args(["-m", acl])
            .arg(low.join(p))
            .status()
            .expect("setfacl");
        assert!(st.success(), "setfacl -m {acl} {p}");
    }
    l
}

/// Runs `steps` in the kernel overlay mounted at `kernel` and the stratafs mount at
/// `strata`; returns every observation that differs between the two, or from what
/// the step says the kernel answers.
pub(crate) fn run_steps(steps: &[Step], kernel: &Path, strata: &Path) -> Vec<String> {
    let mut failures = Vec::new();
    for step in steps {
        let on_kernel = run_as(step.who, step.umask, step.script, kernel);
        let on_strata = run_as(step.who, step.umask, step.script, strata);
        if on_kernel != step.kernel {
            failures.push(format!(
                "kernel overlayfs: `{}` gave {on_kernel:?}, the scenario says {:?}",
                step.script, step.kernel
            ));
        }
        if on_kernel != on_strata {
            failures.push(format!(
                "`{}` as {:?}: kernel overlayfs {on_kernel:?}, stratafs {on_strata:?}",
                step.script, step.who
            ));
        }
    }
    failures
}

/// Runs `steps` on kernel overlayfs and on stratafs (default options) over two
/// stacks made by `layers`, and compares every observation, and the modes the upper
/// layers end with at `check_upper`.
fn differential(layers: fn() -> Layers, steps: &[Step], check_upper: &[&str]) {
    let (lk, ls) = (layers(), layers());
    let mut k = KernelOverlay::new(&lk);
    let mut s = StrataMount::new(&ls);
    let mut failures = run_steps(steps, k.path(), s.path());
    k.unmount();
    s.unmount();
    for p in check_upper {
        let (mk, ms) = (mode_of(&lk.upper.join(p)), mode_of(&ls.upper.join(p)));
        if mk != ms {
            failures.push(format!("upper {p}: kernel mode {mk}, stratafs {ms}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn an_acl_that_denies_a_user_is_enforced_on_lower_and_upper_files() {
    if !fixture::require_fuse_and_kernel_overlay() {
        return;
    }
    differential(
        acl_layers,
        &[
            bob("cat denied", "error: Permission denied"),
            bob("cat lowfile", "data"),
            root(
                "echo hi > up && chmod 644 up && setfacl -m u:1001:--- up",
                "ok",
            ),
            bob("cat up", "error: Permission denied"),
            // Copied up by a change of its data: the ACL goes with it.
            root("echo more >> denied", "ok"),
            bob("cat denied", "error: Permission denied"),
            root("getfacl -cp denied | grep 1001", "user:1001:---"),
        ],
        &["denied", "up"],
    );
}

#[test]
fn default_acls_are_inherited_and_override_the_umask() {
    if !fixture::require_fuse_and_kernel_overlay() {
        return;
    }
    differential(
        acl_layers,
        &[
            root("touch inherit/f && stat -c %A inherit/f", "-rw-rw----"),
            root("mkdir inherit/d && stat -c %A inherit/d", "drwxrwx---"),
            root(
                "getfacl -cp inherit/f | tr '\\n\\t' '  '",
                "user::rw- user:1002:r-x #effective:r-- group::rwx #effective:rw- mask::rw- other::---",
            ),
            root(
                "getfacl -cpd inherit/d | tr '\\n' ' '",
                "user::rwx user:1002:r-x group::rwx mask::rwx other::---",
            ),
            // Without a default ACL the umask applies.
            root(
                "touch shared/f && mkdir shared/d && stat -c %A shared/f shared/d | tr '\\n' ' '",
                "-rw-r--r-- drwxr-xr-x",
            ),
            bob(
                "mkdir inherit/by-bob && stat -c %A inherit/by-bob",
                "drwxrwx---",
            ),
            bob(
                "mknod inherit/fifo p && stat -c %A inherit/fifo",
                "prw-rw----",
            ),
        ],
        &["inherit/f", "inherit/d", "shared/f", "shared/d"],
    );
}

#[test]
fn setting_an_access_acl_sets_the_mode_and_chmod_sets_the_mask() {
    if !fixture::require_fuse_and_kernel_overlay() {
        return;
    }
    differential(
        acl_layers,
        &[
            root(
                "echo x > m && chmod 644 m && setfacl -m g::rwx,m::rwx m && stat -c %A m",
                "-rw-rwxr--",
            ),
            root(
                "setfacl -m u:1001:rwx m && chmod 640 m && getfacl -cp m | grep mask",
                "mask::r--",
            ),
            // Others may not read, but the named entry (masked to r--) lets bob.
            bob("cat m", "x"),
            root("chmod 600 m && getfacl -cp m | grep mask", "mask::---"),
            bob("cat m", "error: Permission denied"),
            root("chmod 664 m && getfacl -cp m | grep mask", "mask::rw-"),
            bob("cat m", "x"),
            // A lower file: the copy-up keeps the ACL, the mode follows it.
            root(
                "setfacl -m g::rwx lowfile && stat -c %A lowfile",
                "-rw-rwxr--",
            ),
        ],
        &["m", "lowfile"],
    );
}

#[test]
fn noacl_leaves_acls_unenforced() {
    if !fixture::require_fuse() {
        return;
    }
    let l = acl_layers();
    let opts = format!("{},noacl", l.rw_options());
    let m = StrataMount::with_options(&opts, &l.merged, &l.root);
    // The mode lets everyone read; only the ACL says no.
    assert_eq!(run_as(Some(BOB), 0o022, "cat denied", m.path()), "secret");
    // And the umask applies under a default ACL, as on a filesystem without ACLs.
    assert_eq!(
        run_as(
            None,
            0o022,
            "touch inherit/f && stat -c %A inherit/f",
            m.path()
        ),
        "-rw-r-----"
    );
}

#[test]
fn a_rootless_style_mount_with_override_stat_keeps_working() {
    if !fixture::require_fuse() {
        return;
    }
    let l = acl_layers();
    let opts = format!("{},xattr_permissions=2", l.rw_options());
    let m = StrataMount::with_options(&opts, &l.merged, &l.root);
    // Owners and modes come from the override xattr there: ACLs are not enforced
    // (they would name stored ids), and the umask still applies to new files.
    assert_eq!(
        run_as(
            None,
            0o022,
            "touch shared/f && stat -c %A shared/f",
            m.path()
        ),
        "-rw-r--r--"
    );
    assert_eq!(run_as(Some(BOB), 0o022, "cat lowfile", m.path()), "data");
}

/// Layers for the set-group-ID scenarios: a world-writable directory, and a lower
/// set-group-ID file in group root for the copy-up cases.
fn sgid_layers() -> Layers {
    let l = Layers::new(&[LayerBuilder::new()
        .dir("shared")
        .file("low-sgid", "lower\n")]);
    fs::set_permissions(&l.root, fs::Permissions::from_mode(0o755)).unwrap();
    let low = &l.lowers[0];
    fs::set_permissions(low.join("shared"), fs::Permissions::from_mode(0o777)).unwrap();
    fs::set_permissions(low.join("low-sgid"), fs::Permissions::from_mode(0o2666)).unwrap();
    l
}

#[test]
fn changes_by_a_user_outside_the_group_clear_set_group_id() {
    if !fixture::require_fuse_and_kernel_overlay() {
        return;
    }
    let mk = "for f in w a t o z p c g; do echo x > shared/$f && chmod 2666 shared/$f; done";
    differential(
        sgid_layers,
        &[
            root(mk, "ok"),
            bob("echo y > shared/w && stat -c %a shared/w", "666"),
            bob("echo y >> shared/a && stat -c %a shared/a", "666"),
            bob("truncate -s 1 shared/t && stat -c %a shared/t", "666"),
            bob("fallocate -l 8192 shared/o && stat -c %a shared/o", "666"),
            bob(
                "fallocate -z -o 0 -l 1 shared/z && stat -c %a shared/z",
                "666",
            ),
            bob(
                "fallocate -p -o 0 -l 1 shared/p && stat -c %a shared/p",
                "666",
            ),
            // Group-execute set: the kernel clears it (a regression check).
            root("chmod 2777 shared/c", "ok"),
            bob("echo y >> shared/c && stat -c %a shared/c", "777"),
            // A lower file written (and so copied up) by bob.
            bob("echo y >> low-sgid && stat -c %a low-sgid", "666"),
            // Root keeps the bit (CAP_FSETID).
            root(
                "echo x > r && chmod 2666 r && echo y >> r && stat -c %a r",
                "2666",
            ),
            // The owner outside the file's group changes the group: cleared.
            root("chown 1001:0 shared/g && chmod 2666 shared/g", "ok"),
            bob(
                "chgrp 1001 shared/g && stat -c '%a %g' shared/g",
                "666 1001",
            ),
        ],
        &[
            "shared/w", "shared/a", "shared/t", "shared/o", "low-sgid", "r", "shared/g",
        ],
    );
}

/// Set-user-ID goes as the VFS takes it away: on a write, truncation or fallocate by
/// a caller without CAP_FSETID, and on every chown, root's included. The daemon does
/// all of it (FUSE_HANDLE_KILLPRIV_V2, which spares each write a security.capability
/// round trip), so each path is checked here against kernel overlayfs.
#[test]
fn changes_clear_set_user_id_as_the_kernel_does() {
    if !fixture::require_fuse_and_kernel_overlay() {
        return;
    }
    let layers = || {
        let l = sgid_layers();
        let low = &l.lowers[0];
        fs::write(low.join("low-suid"), "lower\n").unwrap();
        fs::set_permissions(low.join("low-suid"), fs::Permissions::from_mode(0o4666)).unwrap();
        l
    };
    let mk = "for f in w a t o c r d; do echo x > shared/$f && chmod 4666 shared/$f; done \
              && echo x > shared/b && chmod 6777 shared/b";
    differential(
        layers,
        &[
            root(mk, "ok"),
            bob("echo y > shared/w && stat -c %a shared/w", "666"),
            bob("echo y >> shared/a && stat -c %a shared/a", "666"),
            bob("truncate -s 1 shared/t && stat -c %a shared/t", "666"),
            bob("fallocate -l 8192 shared/o && stat -c %a shared/o", "666"),
            // Many writes through one open: the first one clears the bit.
            bob(
                "dd if=/dev/zero of=shared/d bs=4k count=64 conv=notrunc status=none && stat -c %a shared/d",
                "666",
            ),
            // Both bits, group-execute set: both go.
            bob("echo y >> shared/b && stat -c %a shared/b", "777"),
            // A chown clears it even when root makes it.
            root(
                "chown 1001 shared/c && stat -c '%a %u' shared/c",
                "666 1001",
            ),
            // Root's writes keep it (CAP_FSETID).
            root("echo y >> shared/r && stat -c %a shared/r", "4666"),
            // A lower file written (and so copied up) by bob.
            bob("echo y >> low-suid && stat -c %a low-suid", "666"),
        ],
        &[
            "shared/w", "shared/a", "shared/t", "shared/o", "shared/d", "shared/b", "shared/c",
            "shared/r", "low-suid",
        ],
    );
}

#[test]
fn setting_an_acl_follows_the_kernel_on_set_group_id_and_the_mode() {
    if !fixture::require_fuse_and_kernel_overlay() {
        return;
    }
    differential(
        sgid_layers,
        &[
            root(
                "echo > shared/f && chown 1001:0 shared/f && chmod 2755 shared/f && cp -p shared/f shared/r",
                "ok",
            ),
            // By root: the mode follows the ACL, set-group-ID stays.
            root(
                "setfacl -m u::rwx,g::rwx,o::rwx shared/r && stat -c %A shared/r",
                "-rwxrwsrwx",
            ),
            // By the owner, outside the file's group: set-group-ID goes.
            bob(
                "setfacl -m u::rwx,g::rwx,o::rwx shared/f && stat -c %A shared/f",
                "-rwxrwxrwx",
            ),
        ],
        &["shared/f", "shared/r"],
    );
}

#[test]
fn new_entries_of_a_set_group_id_directory_follow_the_kernel() {
    if !fixture::require_fuse_and_kernel_overlay() {
        return;
    }
    differential(
        sgid_layers,
        &[
            root(
                "mkdir -m 2777 shared/sg && chown 0:5 shared/sg && chmod 2777 shared/sg",
                "ok",
            ),
            bob("mkdir shared/sg/d && stat -c '%a %g' shared/sg/d", "2755 5"),
            bob(
                "touch shared/sg/f && chmod 2755 shared/sg/f; stat -c '%a %g' shared/sg/f",
                "755 5",
            ),
            root(
                "umask 0; install -m 2775 /dev/null shared/sg/byroot && stat -c '%a %g' shared/sg/byroot",
                "2775 5",
            ),
        ],
        &["shared/sg/d", "shared/sg/f"],
    );
}
