//! POSIX behaviour that conformance suites and everyday tools catch on overlay
//! filesystems: files unlinked while open, long names, shared mappings of copied-up
//! files, inode numbers (unique across layers, stable across remounts, equal in
//! readdir and stat) and `git status` on a repository that lives in a lower layer.

use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{DirEntryExt, FileExt, MetadataExt};
use std::path::Path;
use std::process::Command;

use crate::fixture::{self, LayerBuilder, Layers, StrataMount, Tmpfs, io_errno};

fn fstat(f: &File) -> libc::stat {
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a valid fd and a properly sized out-parameter.
    let r = unsafe { libc::fstat(std::os::fd::AsRawFd::as_raw_fd(f), &mut st) };
    assert_eq!(r, 0, "fstat: {}", std::io::Error::last_os_error());
    st
}

#[test]
fn a_file_unlinked_while_open_keeps_working_and_reports_no_links() {
    if !fixture::require_fuse() {
        return;
    }
    let l = Layers::new(&[LayerBuilder::new().file("lower.txt", "from below")]);
    let m = StrataMount::new(&l);
    fs::write(m.join("upper.txt"), "made here").unwrap();

    let lower = File::open(m.join("lower.txt")).unwrap();
    let mut upper = OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.join("upper.txt"))
        .unwrap();
    fs::remove_file(m.join("lower.txt")).unwrap();
    fs::remove_file(m.join("upper.txt")).unwrap();
    assert!(!m.join("lower.txt").exists() && !m.join("upper.txt").exists());

    let mut buf = vec![0; 10];
    lower.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(buf, b"from below");
    assert_eq!(fstat(&lower).st_nlink, 0, "fstat of an unlinked lower file");

    upper.write_all_at(b"MADE", 0).unwrap();
    let mut s = String::new();
    upper.read_to_string(&mut s).unwrap();
    assert_eq!(s, "MADE here");
    assert_eq!(fstat(&upper).st_nlink, 0, "fstat of an unlinked upper file");
}

#[test]
fn names_longer_than_255_bytes_answer_enametoolong() {
    if !fixture::require_fuse() {
        return;
    }
    let max = "m".repeat(255);
    let l = Layers::new(&[LayerBuilder::new().file(&max, "longest")]);
    let m = StrataMount::new(&l);
    let long = "x".repeat(256);
    let err = |r: std::io::Result<()>| r.map_err(|e| io_errno(&e)).err();
    assert_eq!(
        err(fs::symlink_metadata(m.join(&long)).map(drop)),
        Some(libc::ENAMETOOLONG)
    );
    assert_eq!(
        err(File::create(m.join(&long)).map(drop)),
        Some(libc::ENAMETOOLONG)
    );
    assert_eq!(err(fs::create_dir(m.join(&long))), Some(libc::ENAMETOOLONG));
    assert_eq!(
        err(fs::rename(m.join(&max), m.join(&long))),
        Some(libc::ENAMETOOLONG)
    );
    // 255 bytes is allowed, including the copy-up and removal of such a lower name.
    assert_eq!(fs::read(m.join(&max)).unwrap(), b"longest");
    fs::write(m.join(&max), "rewritten").unwrap();
    fs::remove_file(m.join(&max)).unwrap();
    assert!(!m.join(&max).exists());
    let deep = (0..50).fold(m.path().to_path_buf(), |p, _| p.join("d".repeat(100)));
    assert_eq!(
        err(fs::create_dir_all(&deep)),
        Some(libc::ENAMETOOLONG),
        "a path over PATH_MAX"
    );
}

#[test]
fn shared_mappings_write_through_a_copied_up_file() {
    if !fixture::require_fuse() {
        return;
    }
    let data = fixture::pattern(3 * 4096, 5);
    let l = Layers::new(&[LayerBuilder::new().file("mapped", &data)]);
    let mut m = StrataMount::new(&l);
    {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(m.join("mapped"))
            .unwrap();
        let len = data.len();
        // SAFETY: mapping a file we hold open, of its exact length; unmapped below.
        unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                std::os::fd::AsRawFd::as_raw_fd(&f),
                0,
            );
            assert_ne!(
                p,
                libc::MAP_FAILED,
                "mmap: {}",
                std::io::Error::last_os_error()
            );
            let bytes = std::slice::from_raw_parts_mut(p as *mut u8, len);
            assert_eq!(&bytes[..], &data[..], "mapping shows the lower data");
            bytes[4096..4096 + 6].copy_from_slice(b"MAPPED");
            assert_eq!(libc::msync(p, len, libc::MS_SYNC), 0);
            assert_eq!(libc::munmap(p, len), 0);
        }
    }
    let mut want = data.clone();
    want[4096..4096 + 6].copy_from_slice(b"MAPPED");
    assert_eq!(fs::read(m.join("mapped")).unwrap(), want);
    assert_eq!(
        fs::read(l.upper.join("mapped")).unwrap(),
        want,
        "in the upper file"
    );
    assert_eq!(
        fs::read(l.lowers[0].join("mapped")).unwrap(),
        data,
        "lower untouched"
    );
    m.remount();
    assert_eq!(fs::read(m.join("mapped")).unwrap(), want, "after a remount");
}

/// (path, st_ino) of every entry under `root`, checking on the way that each listing's
/// d_ino equals the st_ino of the entry.
fn inode_numbers(root: &Path) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let md = fs::symlink_metadata(e.path()).unwrap();
            let rel = e.path().strip_prefix(root).unwrap().display().to_string();
            assert_eq!(e.ino(), md.ino(), "d_ino vs st_ino of {rel}");
            if md.is_dir() {
                stack.push(e.path());
            }
            out.push((rel, md.ino()));
        }
    }
    out.sort();
    out
}

#[test]
fn inode_numbers_are_unique_across_layers_on_different_filesystems_and_stable() {
    if !fixture::require_fuse() {
        return;
    }
    let l = Layers::new(&[]);
    // Two fresh tmpfs instances number their files alike: the same st_ino in both.
    let a = Tmpfs::new(&l.root.join("fs-a"), "8m");
    let b = Tmpfs::new(&l.root.join("fs-b"), "8m");
    for (fs_root, tag) in [(&a.path, "a"), (&b.path, "b")] {
        for i in 0..20 {
            fs::write(fs_root.join(format!("{tag}{i}")), tag).unwrap();
        }
    }
    let same_numbers = (0..20).any(|i| {
        let ia = fs::metadata(a.path.join(format!("a{i}"))).unwrap().ino();
        (0..20).any(|j| fs::metadata(b.path.join(format!("b{j}"))).unwrap().ino() == ia)
    });
    assert!(
        same_numbers,
        "test premise: the two tmpfs share inode numbers"
    );
    let options = format!(
        "lowerdir={}:{},upperdir={},workdir={}",
        a.path.display(),
        b.path.display(),
        l.upper.display(),
        l.work.display()
    );
    let mut m = StrataMount::with_options(&options, &l.merged, &l.root);
    fs::write(m.join("a3"), "copied up").unwrap();
    fs::write(m.join("fresh"), "new").unwrap();
    let before = inode_numbers(m.path());
    let mut seen = std::collections::HashMap::new();
    for (p, ino) in &before {
        if let Some(other) = seen.insert(*ino, p.clone()) {
            panic!("{p} and {other} share st_ino {ino}");
        }
    }
    let devs: std::collections::HashSet<u64> = before
        .iter()
        .map(|(p, _)| fs::symlink_metadata(m.join(p)).unwrap().dev())
        .collect();
    assert_eq!(devs.len(), 1, "st_dev differs within one mount: {devs:?}");
    m.remount();
    assert_eq!(
        inode_numbers(m.path()),
        before,
        "st_ino changed across a remount"
    );
    drop(m);
    drop((a, b));
}

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(["-c", "user.name=t", "-c", "user.email=t@example.com"])
        .args(args)
        .current_dir(dir)
        .output()
        .expect("git must be installed for this test (scripts/test installs it)");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn git_status_of_a_repository_in_a_lower_layer_is_clean() {
    if !fixture::require_fuse() {
        return;
    }
    let l = Layers::new(&[LayerBuilder::new().dir("repo")]);
    let repo = l.lowers[0].join("repo");
    for i in 0..30 {
        let d = repo.join(format!("src/m{}", i % 5));
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join(format!("f{i}.txt")), format!("file {i}\n")).unwrap();
    }
    git(&repo, &["init", "-q"]);
    git(&repo, &["add", "."]);
    git(&repo, &["commit", "-qm", "init"]);
    let mut m = StrataMount::new(&l);
    let merged = m.join("repo");
    assert_eq!(git(&merged, &["status", "--porcelain"]), "", "fresh mount");
    // Copy-ups (the index is rewritten by status; a file is touched) keep it clean.
    fs::write(merged.join("src/m1/f1.txt"), "file 1\n").unwrap();
    assert_eq!(
        git(&merged, &["status", "--porcelain"]),
        "",
        "after a copy-up"
    );
    m.remount();
    assert_eq!(
        git(&merged, &["status", "--porcelain"]),
        "",
        "after a remount"
    );
    fs::write(merged.join("src/m2/f2.txt"), "changed\n").unwrap();
    assert_eq!(
        git(&merged, &["status", "--porcelain"]),
        " M src/m2/f2.txt\n",
        "a real change is still seen"
    );
}
