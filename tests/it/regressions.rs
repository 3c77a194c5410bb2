//! Failures reported from outside (real clients, third-party suites), each pinned as
//! a named test on a mount in the default configuration: passthrough on, lower hard
//! links in the layers, nothing turned off.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};

use crate::fixture::{self, LayerBuilder, Layers, StrataMount, Tmpfs, errno_name, io_errno};

/// An upper and a workdir on a tmpfs of `size` (kept mounted while the value
/// lives), and the options of a mount of `l`'s lowers over them.
fn small_upper(l: &Layers, size: &str) -> (Tmpfs, String) {
    let small = Tmpfs::new(&l.root.join("small"), size);
    for d in ["u", "w"] {
        fs::create_dir(small.path.join(d)).unwrap();
    }
    let options = format!(
        "lowerdir={},upperdir={},workdir={}",
        l.lowerdir(),
        small.path.join("u").display(),
        small.path.join("w").display()
    );
    (small, options)
}

fn nlink(p: &Path) -> u64 {
    fs::symlink_metadata(p)
        .unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()))
        .nlink()
}

fn link(from: &Path, to: &Path) {
    if let Err(e) = fs::hard_link(from, to) {
        panic!(
            "ln {} {}: {}",
            from.display(),
            to.display(),
            errno_name(io_errno(&e))
        );
    }
}

/// stress-ng's `link` stressor and package managers: a file gains names and loses
/// them again, and the kernel keeps reaching it by a name the daemon did not see
/// last. Every operation must still find it.
#[test]
fn a_file_is_linked_again_after_the_names_it_was_last_reached_by_are_gone() {
    if !fixture::require_fuse() {
        return;
    }
    let l = Layers::new(&[LayerBuilder::new().dir("d")]);
    let m = StrataMount::new(&l);
    let f = m.join("d/f");
    fs::write(&f, b"x\n").unwrap();
    for round in 0..3 {
        for i in 1..=8 {
            link(&f, &m.join(&format!("d/l{i}")));
        }
        assert_eq!(nlink(&f), 9, "round {round}");
        for i in 1..=8 {
            fs::remove_file(m.join(&format!("d/l{i}"))).unwrap();
        }
        link(&f, &m.join("d/l1"));
        fs::set_permissions(&f, fs::Permissions::from_mode(0o640)).unwrap();
        assert_eq!(fs::read(m.join("d/l1")).unwrap(), b"x\n", "round {round}");
        assert_eq!(nlink(&f), 2, "round {round}");
        fs::remove_file(m.join("d/l1")).unwrap();
    }
}

/// containers/storage and package managers on a lower hard-link group: change one
/// name, remove the other, link it again.
#[test]
fn a_lower_hard_link_is_relinked_after_a_metadata_change_and_an_unlink() {
    if !fixture::require_fuse() {
        return;
    }
    type Change = fn(&Path);
    let changes: [(&str, Change); 3] = [
        ("chmod", |p| {
            fs::set_permissions(p, fs::Permissions::from_mode(0o600)).unwrap()
        }),
        ("chown", |p| {
            std::os::unix::fs::lchown(p, Some(1), Some(1)).unwrap()
        }),
        ("touch", |p| {
            File::options()
                .write(true)
                .open(p)
                .unwrap()
                .set_modified(std::time::SystemTime::UNIX_EPOCH)
                .unwrap()
        }),
    ];
    for (what, change) in changes {
        let l = Layers::new(&[LayerBuilder::new()
            .file("p1", b"shared\n")
            .hardlink("p2", "p1")
            .hardlink("p3", "p1")]);
        let mut m = StrataMount::new(&l);
        change(&m.join("p1"));
        fs::remove_file(m.join("p2")).unwrap();
        link(&m.join("p1"), &m.join("p2"));
        for name in ["p1", "p2", "p3"] {
            assert_eq!(
                fs::read(m.join(name)).unwrap(),
                b"shared\n",
                "{what}: {name}"
            );
            assert_eq!(nlink(&m.join(name)), 3, "{what}: st_nlink of {name}");
        }
        m.remount();
        let ino = fs::metadata(m.join("p1")).unwrap().ino();
        for name in ["p2", "p3"] {
            let md = fs::metadata(m.join(name)).unwrap();
            assert_eq!(
                (md.ino(), md.nlink()),
                (ino, 3),
                "{what}: {name} after remount"
            );
        }
    }
}

/// `exec 3<m/f; echo x >> m/f` on a lower file: kernel overlayfs and fuse-overlayfs
/// accept the writer, and the reader opened before the copy-up reads the new data.
#[test]
fn a_writer_is_accepted_while_a_reader_holds_a_lower_file_and_the_reader_sees_its_data() {
    if !fixture::require_fuse() {
        return;
    }
    let l = Layers::new(&[LayerBuilder::new().file("f", b"lower\n").file("g", b"g\n")]);
    let mut m = StrataMount::new(&l);
    let mut reader = File::open(m.join("f")).unwrap();
    let mut first = String::new();
    reader.read_to_string(&mut first).unwrap();
    assert_eq!(first, "lower\n");
    let mut writer = match OpenOptions::new().append(true).open(m.join("f")) {
        Ok(w) => w,
        Err(e) => panic!(
            "open for append while a reader holds the lower file: {}",
            errno_name(io_errno(&e))
        ),
    };
    writer.write_all(b"appended\n").unwrap();
    reader.seek(SeekFrom::Start(0)).unwrap();
    let mut now = String::new();
    reader.read_to_string(&mut now).unwrap();
    assert_eq!(now, "lower\nappended\n", "the early reader sees the copy");
    // A second reader and a second writer, opened meanwhile, agree as well.
    let mut other = String::new();
    File::open(m.join("f"))
        .unwrap()
        .read_to_string(&mut other)
        .unwrap();
    assert_eq!(other, "lower\nappended\n");
    // The same with truncation while a reader is mapped.
    let g = File::open(m.join("g")).unwrap();
    fs::write(m.join("g"), b"new\n").unwrap();
    let mut gs = String::new();
    (&g).read_to_string(&mut gs).unwrap();
    assert_eq!(gs, "new\n");
    drop((reader, writer, g));
    m.remount();
    assert_eq!(fs::read(m.join("f")).unwrap(), b"lower\nappended\n");
}

/// pjdfstest `open::etxtbsy`: a running executable cannot be opened for writing,
/// whichever name and whatever earlier history: one file is one kernel inode. The
/// refused opens leave its data whole: an `O_RDONLY|O_TRUNC` open reaches the daemon
/// before the kernel checks for a running text (the check is in its truncate step),
/// so a daemon that truncated on open emptied the running binary and then answered
/// ETXTBSY. A file nobody runs is still truncated by that open, as on Linux.
#[test]
fn a_running_executable_cannot_be_opened_for_writing_nor_truncated() {
    if !fixture::require_fuse() {
        return;
    }
    let sleep = fs::read("/bin/sleep").expect("/bin/sleep");
    let l = Layers::new(&[LayerBuilder::new()
        .file("lower-sleep", &sleep)
        .file("lower-data", b"lower data")]);
    fs::set_permissions(
        l.lowers[0].join("lower-sleep"),
        fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let mut m = StrataMount::new(&l);
    // Names come and go around the executable first, as in pjdfstest's run, so that
    // inode numbers of removed files are reused on the upper filesystem.
    for round in 0..20 {
        let p = m.join(&format!("t{round}"));
        fs::write(&p, b"scratch").unwrap();
        fs::remove_file(&p).unwrap();
    }
    let upper_exe = m.join("upper-sleep");
    fs::write(&upper_exe, &sleep).unwrap();
    fs::set_permissions(&upper_exe, fs::Permissions::from_mode(0o755)).unwrap();
    type OpenMode = fn(&mut OpenOptions) -> &mut OpenOptions;
    let open_modes: [(&str, OpenMode); 3] = [
        ("O_WRONLY", |o| o.write(true)),
        ("O_RDWR", |o| o.read(true).write(true)),
        ("O_RDONLY|O_TRUNC", |o| {
            o.read(true).custom_flags(libc::O_TRUNC)
        }),
    ];
    for exe in [upper_exe, m.join("lower-sleep")] {
        let mut child = Command::new(&exe)
            .arg("30")
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("exec {}: {e}", exe.display()));
        let opened: Vec<_> = open_modes
            .iter()
            .map(|(name, how)| (*name, how(&mut OpenOptions::new()).open(&exe)))
            .collect();
        let _ = child.kill();
        let _ = child.wait();
        for (name, result) in opened {
            match result {
                Err(e) if io_errno(&e) == libc::ETXTBSY => {}
                Err(e) => panic!("{} {name}: expected ETXTBSY, got {e}", exe.display()),
                Ok(_) => panic!("{} {name}: opened while running", exe.display()),
            }
        }
        assert!(
            fs::read(&exe).unwrap() == sleep,
            "{}: the refused opens changed the running binary",
            exe.display()
        );
    }
    for name in ["lower-data", "upper-sleep"] {
        let f = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_TRUNC)
            .open(m.join(name))
            .unwrap();
        assert_eq!(
            f.metadata().unwrap().len(),
            0,
            "{name} after O_RDONLY|O_TRUNC"
        );
        drop(f);
        assert_eq!(fs::read(m.join(name)).unwrap(), b"", "{name}");
    }
    m.remount();
    assert_eq!(fs::read(m.join("lower-sleep")).unwrap(), sleep);
    assert_eq!(fs::read(m.join("lower-data")).unwrap(), b"");
}

/// A workdir whose index holds an entry this mount did not make (planted, or left
/// by another tool): a hard link to a file outside the layers must never become
/// the copy users write to, neither at mount nor at the group's copy-up.
#[test]
fn a_planted_index_entry_is_never_linked_into_the_upper_layer() {
    if !fixture::require_fuse() {
        return;
    }
    let l = Layers::new(&[LayerBuilder::new()
        .file("p1", b"lower\n")
        .hardlink("p2", "p1")]);
    let outside = l.root.join("outside");
    fs::write(&outside, b"outside\n").unwrap();
    let ino = fs::metadata(l.lowers[0].join("p1")).unwrap().ino();
    fs::create_dir_all(l.work.join("#stratafs-index")).unwrap();
    fs::hard_link(&outside, l.work.join(format!("#stratafs-index/L0-{ino:x}"))).unwrap();
    let m = StrataMount::new(&l);
    assert_eq!(fs::read(m.join("p2")).unwrap(), b"lower\n");
    OpenOptions::new()
        .append(true)
        .open(m.join("p1"))
        .unwrap()
        .write_all(b"more\n")
        .unwrap();
    assert_eq!(fs::read(m.join("p2")).unwrap(), b"lower\nmore\n");
    assert_eq!(
        fs::read(&outside).unwrap(),
        b"outside\n",
        "the outside file"
    );
    let up = fs::metadata(l.upper.join("p1")).unwrap().ino();
    assert_ne!(up, fs::metadata(&outside).unwrap().ino());
    assert_eq!(nlink(&m.join("p1")), 2);
}

/// Removing names of lower hard-linked files is a whiteout, as for a file with one
/// link, never a copy of their data that is deleted again: rm -rf of such a tree was
/// 10x slower than of plain files, and failed with ENOSPC on an upper layer without
/// room for the copy (users free space by removing files). That holds whether the
/// other names lie outside the layers (hard-link dedup stores, ostree and composefs
/// checkouts) or inside them; the names still shown count one link less for each
/// name removed or replaced, also after a remount, and a later write through one of
/// them copies the group up with that count.
#[test]
fn removing_lower_hard_links_copies_nothing_and_counts_down() {
    if !fixture::require_fuse() {
        return;
    }
    let big = |i: u8| vec![i; 8 << 20];
    let l = Layers::new(&[LayerBuilder::new()
        .file("t/a/f0", big(1))
        .file("t/a/f1", big(2))
        .file("in-layer", big(3))
        .hardlink("t/in-layer-too", "in-layer")
        .hardlink("u/in-layer-3", "in-layer")
        .file("small", b"grouped\n")
        .hardlink("u/small-2", "small")
        .hardlink("u/small-3", "small")
        .file("u/other", b"other\n")]);
    let store = l.root.join("store");
    fs::create_dir(&store).unwrap();
    for i in 0..2 {
        fs::hard_link(
            l.lowers[0].join(format!("t/a/f{i}")),
            store.join(format!("s{i}")),
        )
        .unwrap();
    }
    // Upper and work on a 4 MiB filesystem: no room for a copy of any big file.
    let (_small, options) = small_upper(&l, "4m");
    let mut m = StrataMount::with_options(&options, &l.merged, &l.root);
    assert_eq!(nlink(&m.join("t/a/f0")), 2);
    if let Err(e) = fs::remove_dir_all(m.join("t/a")) {
        panic!("rm -rf t/a: {}", errno_name(io_errno(&e)));
    }
    for i in 0..2u8 {
        let s = store.join(format!("s{i}"));
        assert!(fs::read(&s).unwrap() == big(i + 1), "{}", s.display());
        assert_eq!(
            nlink(&s),
            2,
            "{}: the layer's link is untouched",
            s.display()
        );
    }
    // A group with its other names in the layer: they show one link less each time.
    assert_eq!(nlink(&m.join("in-layer")), 3);
    if let Err(e) = fs::remove_file(m.join("t/in-layer-too")) {
        panic!("rm t/in-layer-too: {}", errno_name(io_errno(&e)));
    }
    assert_eq!(nlink(&m.join("in-layer")), 2);
    assert_eq!(nlink(&m.join("u/in-layer-3")), 2);
    // Replaced by a rename, as removed.
    fs::rename(m.join("u/other"), m.join("u/in-layer-3")).unwrap();
    assert_eq!(nlink(&m.join("in-layer")), 1);
    assert!(fs::read(m.join("in-layer")).unwrap() == big(3));
    assert_eq!(fs::read(m.join("u/in-layer-3")).unwrap(), b"other\n");
    fs::remove_file(m.join("u/small-3")).unwrap();
    assert_eq!(nlink(&m.join("small")), 2);
    m.remount();
    assert!(!m.join("t/a").exists());
    assert!(!m.join("t/in-layer-too").exists());
    assert_eq!(nlink(&m.join("in-layer")), 1, "after a remount");
    assert_eq!(nlink(&m.join("small")), 2, "after a remount");
    for name in ["small", "u/small-2"] {
        assert!(
            !l.upper.join(name).exists(),
            "{name} copied up by a removal"
        );
    }
    // A write copies the group up; its names keep the count and share the data.
    OpenOptions::new()
        .append(true)
        .open(m.join("u/small-2"))
        .unwrap()
        .write_all(b"more\n")
        .unwrap();
    for name in ["small", "u/small-2"] {
        assert_eq!(nlink(&m.join(name)), 2, "{name} after the copy-up");
        assert_eq!(
            fs::read(m.join(name)).unwrap(),
            b"grouped\nmore\n",
            "{name}"
        );
    }
    assert_eq!(
        fs::metadata(m.join("small")).unwrap().ino(),
        fs::metadata(m.join("u/small-2")).unwrap().ino()
    );
    m.remount();
    assert_eq!(nlink(&m.join("small")), 2, "copied up, after a remount");
    assert_eq!(nlink(&m.join("in-layer")), 1, "after a second remount");
    m.unmount();
}

/// The first write to a lower file with several names (hard-link dedup stores, ostree
/// and composefs checkouts, links inside an image) copies it once and links the name
/// written through; its other names are linked to the copy when they are next
/// reached, wherever they are by then (inside a moved directory too), and the group
/// keeps the link count it showed. Moving a directory that holds such names copies
/// nothing. Before, the copy-up walked every lower layer for the other names (half a
/// second per mount on a 50,000-file image) and linked them all, and moving a
/// directory first copied up, data included, every group with a name inside it
/// (ENOSPC on a full upper layer).
#[test]
fn a_lower_hard_link_group_is_copied_once_and_linked_name_by_name() {
    if !fixture::require_fuse() {
        return;
    }
    let big = vec![1u8; 8 << 20];
    let l = Layers::new(&[LayerBuilder::new()
        .file("d/big", &big)
        .hardlink("e/big-2", "d/big")
        .file("g/small", b"grouped\n")
        .hardlink("h/deep/small-2", "g/small")
        .hardlink("k/small-3", "g/small")]);
    let store = l.root.join("store");
    fs::create_dir(&store).unwrap();
    fs::hard_link(l.lowers[0].join("g/small"), store.join("s")).unwrap();
    // Upper and work on a 4 MiB filesystem: no room for a copy of the big file.
    let (small, options) = small_upper(&l, "4m");
    let upper = small.path.join("u");
    let mut m = StrataMount::with_options(&options, &l.merged, &l.root);
    if let Err(e) = fs::rename(m.join("d"), m.join("d2")) {
        panic!("mv d d2: {}", errno_name(io_errno(&e)));
    }
    assert!(fs::read(m.join("d2/big")).unwrap() == big);
    assert_eq!(nlink(&m.join("d2/big")), 2);
    assert_eq!(nlink(&m.join("e/big-2")), 2);

    let names = ["g/small", "h/deep/small-2", "moved/small-3"];
    assert_eq!(nlink(&m.join("g/small")), 4, "three names and the store's");
    OpenOptions::new()
        .append(true)
        .open(m.join("g/small"))
        .unwrap()
        .write_all(b"more\n")
        .unwrap();
    for unreached in ["h", "k"] {
        assert!(
            !upper.join(unreached).exists(),
            "{unreached}: linked (or made) in the upper layer before anything reached it"
        );
    }
    fs::rename(m.join("k"), m.join("moved")).unwrap();
    let check = |m: &StrataMount, count: u64, names: &[&str], when: &str| {
        let ino = fs::metadata(m.join(names[0])).unwrap().ino();
        for name in names {
            assert_eq!(
                fs::read(m.join(name)).unwrap(),
                b"grouped\nmore\n",
                "{name} {when}"
            );
            assert_eq!(nlink(&m.join(name)), count, "{name}: st_nlink {when}");
            assert_eq!(
                fs::metadata(m.join(name)).unwrap().ino(),
                ino,
                "{name}: st_ino {when}"
            );
        }
    };
    check(&m, 4, &names, "after the write");
    m.remount();
    check(&m, 4, &names, "after a remount");
    fs::remove_file(m.join("h/deep/small-2")).unwrap();
    check(&m, 3, &["g/small", "moved/small-3"], "after a removal");
    fs::write(m.join("moved/small-3"), b"one file\n").unwrap();
    assert_eq!(fs::read(m.join("g/small")).unwrap(), b"one file\n");
    m.remount();
    assert_eq!(
        nlink(&m.join("g/small")),
        3,
        "after a removal and a remount"
    );
    assert!(!m.join("h/deep/small-2").exists());
    assert_eq!(fs::read(store.join("s")).unwrap(), b"grouped\n");
    assert_eq!(
        nlink(&store.join("s")),
        4,
        "the layer's links are untouched"
    );
    m.unmount();
}

/// A podman user whose container fails with ENOSPC must be able to tell from the
/// daemon's log which file, copied up from which layer, did not fit: the failed
/// request's line names the operation, the merged path and the engine's context.
#[test]
fn a_failed_copy_up_is_logged_with_its_path_and_layer() {
    if !fixture::require_fuse() {
        return;
    }
    let big = vec![7u8; 3 << 20];
    let l = Layers::new(&[LayerBuilder::new().file("d/big", &big)]);
    let (_small, options) = small_upper(&l, "1m");
    let mut m = StrataMount::with_options(&options, &l.merged, &l.root);
    let err = OpenOptions::new()
        .append(true)
        .open(m.join("d/big"))
        .expect_err("a 3 MiB copy-up fits in a 1 MiB upper");
    assert_eq!(io_errno(&err), libc::ENOSPC, "{err}");
    assert_eq!(
        fs::read(m.join("d/big")).unwrap(),
        big,
        "the lower file shows"
    );
    m.unmount();
    let log = m.log_text();
    let lower = l.lowerdir();
    let line = log
        .lines()
        .find(|line| line.contains("open /d/big: "))
        .unwrap_or_else(|| panic!("no log line for the failed open:\n{log}"));
    for part in [
        "WARN",
        "No space left on device",
        "while copying up \"/d/big\" from layer 1",
        lower.as_str(),
    ] {
        assert!(line.contains(part), "{part:?} missing in {line:?}");
    }
}

/// `-d` is how a user finds out what a mount did to their files: each request with
/// the merged path it concerns, and the union's own steps (copy-ups, whiteouts,
/// redirects) with theirs.
#[test]
fn debug_output_names_the_paths_of_requests_and_union_steps() {
    if !fixture::require_fuse() {
        return;
    }
    let l = Layers::new(&[LayerBuilder::new().file("d/f", "hi\n").file("g", "x\n")]);
    let mut m = StrataMount::with_args(&l.rw_options(), &["-d"], &l.merged, &l.root);
    OpenOptions::new()
        .append(true)
        .open(m.join("d/f"))
        .and_then(|mut f| f.write_all(b"more\n"))
        .unwrap();
    fs::remove_file(m.join("g")).unwrap();
    fs::rename(m.join("d"), m.join("d3")).unwrap();
    assert!(fs::metadata(m.join("missing")).is_err());
    m.unmount();
    let log = m.log_text();
    for line in [
        "open /d/f",
        "copy-up /d/f from layer 1 (",
        "unlink /g",
        "whiteout /g",
        "rename /d -> /d3",
        "redirect /d: lower content at \"/d\"",
        "lookup /missing: No such file or directory",
    ] {
        assert!(log.contains(line), "{line:?} not in the -d output:\n{log}");
    }
    assert!(
        !log.contains("fuser::request"),
        "-d shows requests by path, not fuser's raw lines:\n{log}"
    );
}
