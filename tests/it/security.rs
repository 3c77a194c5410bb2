//! What a local user, a layer changing underneath or a stale workdir can make the
//! daemon do (issue 15): nothing outside its own directories. Each case plants its
//! attack, then asserts that a sentinel tree outside upper, work and the volumes is
//! byte-for-byte what it was (contents, modes, xattrs, link counts, empty
//! directories), and that the mount still answers. Mounted calls are bounded (see
//! `hostile::Bounded`): a hang fails the case instead of the whole run.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use libc::{ELOOP, ENXIO};

use crate::fixture::{self, LayerBuilder, Layers};
use crate::hostile::{Bounded, must, sane};

/// A tree the daemon has no business touching: files with xattrs, a hard-link pair,
/// a symlink and empty directories (what a sweep of empty directories would take).
pub(crate) struct Sentinel {
    pub root: PathBuf,
    before: fixture::TreeSnapshot,
}

impl Sentinel {
    pub fn new(root: &Path) -> Sentinel {
        fs::create_dir(root).unwrap();
        let file = root.join("file");
        fs::write(&file, b"sentinel data\n").unwrap();
        fs::set_permissions(&file, fs::Permissions::from_mode(0o640)).unwrap();
        fixture::lsetxattr(&file, "user.sentinel", b"keep", 0).unwrap();
        fs::hard_link(&file, root.join("link")).unwrap();
        std::os::unix::fs::symlink("file", root.join("sym")).unwrap();
        for i in 0..8 {
            fs::create_dir_all(root.join(format!("empty/e{i}/inner"))).unwrap();
        }
        Sentinel {
            root: root.to_path_buf(),
            before: fixture::snapshot(root),
        }
    }

    pub fn file(&self) -> PathBuf {
        self.root.join("file")
    }

    pub fn assert_unchanged(&self, case: &str) {
        let now = fixture::snapshot(&self.root);
        let d = fixture::diff("before", &self.before, "after", &now);
        assert!(
            d.is_empty(),
            "{case}: the sentinel tree {} changed:\n  {}",
            self.root.display(),
            d.join("\n  ")
        );
    }
}

/// Opens `p` read-only, non-blocking (a client that never waits for a FIFO's
/// writer) and without following a symlink there (the client's own business), and
/// reads it if it opened.
fn open_nonblocking_and_read(p: &Path) -> Result<Vec<u8>, fixture::Errno> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
        .open(p)
        .map_err(|e| fixture::io_errno(&e))?;
    let mut v = Vec::new();
    match f.read_to_end(&mut v) {
        Ok(_) => Ok(v),
        // A FIFO opened by the kernel itself, with no writer: nothing to read.
        Err(e) if fixture::io_errno(&e) == libc::EAGAIN => Ok(v),
        Err(e) => Err(fixture::io_errno(&e)),
    }
}

/// Appends to `p`, opened non-blocking (a FIFO found there answers ENXIO instead of
/// waiting for a reader) and without following a symlink there.
fn append_nonblocking(p: &Path, data: &[u8]) -> Result<(), fixture::Errno> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    fs::OpenOptions::new()
        .append(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
        .open(p)
        .and_then(|mut f| f.write_all(data))
        .map_err(|e| fixture::io_errno(&e))
}

/// Lower files replaced while mounted, after the kernel looked them up as regular
/// files: by FIFOs (a blocking open by name would park a worker until a writer
/// comes, and enough readers leave none), by a symlink to a file outside the
/// layers, by a hard link to it, and by a char device. Every reopen by name checks
/// that it opened what was looked up: readers and writers get the new object (after
/// the kernel's own lookup again) or ESTALE, never a hang, and the outside file is
/// never written.
#[test]
fn lower_files_replaced_while_mounted_block_nothing_and_leak_nothing() {
    let case = "lower_files_replaced_while_mounted";
    if !fixture::require_fuse() {
        return;
    }
    const FIFOS: usize = 12;
    let mut spec = LayerBuilder::new().file("plain", "plain\n");
    for i in 0..FIFOS {
        spec = spec.file(&format!("fifo{i}"), "was a file\n");
    }
    for name in ["symlinked", "hardlinked", "device"] {
        spec = spec.file(name, "was a file\n");
    }
    let l = Layers::new(&[spec]);
    let sentinel = Sentinel::new(&l.root.join("sentinel"));
    let mut m = Bounded::mount(case, &l.rw_options(), &l);
    let mut names: Vec<String> = (0..FIFOS).map(|i| format!("fifo{i}")).collect();
    names.extend(["symlinked", "hardlinked", "device"].map(String::from));
    for n in &names {
        assert!(must(case, "lstat", m.lstat(n)).is_file(), "{case}: {n}");
    }
    let lower = &l.lowers[0];
    for n in &names {
        fs::remove_file(lower.join(n)).unwrap();
    }
    for n in &names[..FIFOS] {
        fixture::mkfifo(&lower.join(n), 0o644).unwrap();
    }
    std::os::unix::fs::symlink(sentinel.file(), lower.join("symlinked")).unwrap();
    fs::hard_link(sentinel.file(), lower.join("hardlinked")).unwrap();
    fixture::mknod(&lower.join("device"), libc::S_IFCHR | 0o666, 1, 3).unwrap();

    // All FIFO readers at once: more than the daemon has workers.
    let paths: Vec<PathBuf> = names[..FIFOS].iter().map(|n| m.join(n)).collect();
    let answers = m.probe("concurrent readers of the swapped names", move || {
        let readers: Vec<_> = paths
            .into_iter()
            .map(|p| std::thread::spawn(move || open_nonblocking_and_read(&p)))
            .collect();
        readers
            .into_iter()
            .map(|t| t.join().expect("reader thread"))
            .collect::<Vec<_>>()
    });
    for (n, r) in names.iter().zip(answers) {
        if let Some(data) = sane(case, &format!("read of {n}"), r, &[ENXIO, ELOOP]) {
            assert!(data.is_empty(), "{case}: {n} read {data:?} from a FIFO");
        }
    }
    for n in &names {
        let p = m.join(n);
        let r = m.probe(&format!("non-blocking read of {n}"), move || {
            open_nonblocking_and_read(&p)
        });
        sane(case, &format!("read of {n}"), r, &[ENXIO, ELOOP]);
        let p = m.join(n);
        let r = m.probe(&format!("non-blocking append to {n}"), move || {
            append_nonblocking(&p, b"appended\n")
        });
        sane(case, &format!("append to {n}"), r, &[ENXIO, ELOOP]);
    }
    assert_eq!(must(case, "read of plain", m.read("plain")), b"plain\n");
    must(case, "append to plain", m.append("plain", b"more\n"));
    m.remount();
    assert_eq!(
        must(case, "read of plain", m.read("plain")),
        b"plain\nmore\n"
    );
    // The link the test planted in the lower layer counts in the sentinel's st_nlink.
    fs::remove_file(lower.join("hardlinked")).unwrap();
    sentinel.assert_unchanged(case);
}

/// The unprivileged user the attacks run as (setpriv).
const NOBODY: u32 = 65534;

/// An attacker process (as `nobody`): runs `script` with perl, which must print
/// "ready" once its traps are set. Killed (by its pid) and reaped on drop.
struct Attacker {
    child: std::process::Child,
}

impl Attacker {
    fn start(script: &str, args: &[&Path]) -> Attacker {
        use std::io::BufRead;
        let mut child = std::process::Command::new("setpriv")
            .args([
                &format!("--reuid={NOBODY}"),
                &format!("--regid={NOBODY}"),
                "--clear-groups",
                "perl",
                "-e",
                script,
            ])
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("setpriv perl");
        let mut line = String::new();
        let out = child.stdout.take().expect("stdout");
        let _ = std::io::BufReader::new(out).read_line(&mut line);
        let attacker = Attacker { child };
        assert_eq!(line.trim(), "ready", "the attacker did not set its traps");
        attacker
    }
}

impl Drop for Attacker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Plants stale-looking scaffolds `stratafs-grafts-evilN/a/x` in the directory given
/// as the first argument and, as fast as it can, exchanges each `x` (a directory)
/// with a symlink to the N-th remaining argument (renameat2 RENAME_EXCHANGE, x86_64
/// syscall 316), repairing whatever a sweep removed.
const SCAFFOLD_SWAPPER: &str = r#"
use strict;
my ($tmp, @targets) = @ARGV;
my @dirs = map { "$tmp/stratafs-grafts-evil$_/a" } 0 .. $#targets;
sub plant {
    my ($i) = @_;
    my $d = $dirs[$i];
    (my $top = $d) =~ s{/a$}{};
    mkdir $top;
    mkdir $d;
    # One of x and s is the directory, the other the symlink.
    my $is_dir = sub { -d $_[0] && !-l $_[0] };
    unless ($is_dir->("$d/x") || $is_dir->("$d/s")) {
        unlink "$d/x";
        mkdir "$d/x";
    }
    symlink $targets[$i], "$d/s" unless -l "$d/s" || -l "$d/x";
    utime 0, 0, $top;
}
plant($_) for 0 .. $#dirs;
$| = 1;
print "ready\n";
while (1) {
    for my $i (0 .. $#dirs) {
        # syscall passes strings by address: they must be variables.
        my ($x, $s) = ("$dirs[$i]/x", "$dirs[$i]/s");
        if (syscall(316, -100, $x, -100, $s, 2) != 0) {
            plant($i);
        }
    }
}
"#;

/// A local user plants stale-looking graft scaffolds in a world-writable TMPDIR and
/// swaps directories inside them for symlinks to a tree they cannot write, while
/// root daemons with grafts start (each sweeps the scaffolds of dead daemons). The
/// sweep must only ever remove empty directories inside trees the daemon's uid
/// owns, never through a symlink: the target tree keeps every empty directory.
#[test]
fn a_swapped_in_symlink_never_leads_the_scaffold_sweep_outside() {
    let case = "scaffold_sweep_with_a_racing_swapper";
    if !fixture::require_fuse() {
        return;
    }
    let l = Layers::new(&[LayerBuilder::new().file("plain", "plain\n")]);
    // The attacker must reach its TMPDIR: a sticky, world-writable one like /tmp.
    fs::set_permissions(&l.root, fs::Permissions::from_mode(0o755)).unwrap();
    let tmp = l.root.join("tmp");
    fs::create_dir(&tmp).unwrap();
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o1777)).unwrap();
    let host = l.root.join("host");
    fs::create_dir(&host).unwrap();
    let sentinel = Sentinel::new(&l.root.join("sentinel"));
    let targets: Vec<PathBuf> = (0..2)
        .map(|i| sentinel.root.join(format!("empty/e{i}")))
        .collect();
    let mut args: Vec<&Path> = vec![&tmp];
    args.extend(targets.iter().map(PathBuf::as_path));
    let attacker = Attacker::start(SCAFFOLD_SWAPPER, &args);
    let options = format!("{},bind={}:/g", l.rw_options(), host.display());
    let tmp_env = tmp.display().to_string();
    for round in 0..100 {
        let m = fixture::StrataMount::with_env(
            &options,
            &[],
            &[("TMPDIR", &tmp_env)],
            &l.merged,
            &l.root,
        );
        let mut m = Bounded::new(case, m);
        assert_eq!(
            must(case, "read of plain", m.read("plain")),
            b"plain\n",
            "round {round}"
        );
        drop(m);
    }
    drop(attacker);
    sentinel.assert_unchanged(case);
}

/// The mount's own mountpoint lies inside its lower layer: the daemon never looks
/// up into its own mount (that would wait on itself, and `ls -R` would not end).
/// As with kernel overlayfs, a mount point inside a layer is not crossed: the
/// layer's own (empty) directory shows.
#[test]
fn a_mountpoint_inside_the_lower_layer_is_not_crossed() {
    let case = "mountpoint_inside_the_lower";
    if !fixture::require_fuse() {
        return;
    }
    let l = Layers::new(&[LayerBuilder::new().file("plain", "plain\n").dir("mnt")]);
    let sentinel = Sentinel::new(&l.root.join("sentinel"));
    let mp = l.lowers[0].join("mnt");
    let m = fixture::StrataMount::with_options(&l.rw_options(), &mp, &l.root);
    let mut m = Bounded::new(case, m);
    let root = m.join("");
    let tree = m.probe("ls -R of the merged view", move || {
        let mut seen = Vec::new();
        let mut stack = vec![(root.clone(), 0usize)];
        while let Some((dir, depth)) = stack.pop() {
            assert!(
                depth < 8,
                "the walk went {depth} levels deep at {}",
                dir.display()
            );
            for e in fs::read_dir(&dir).expect("readdir") {
                let e = e.expect("entry");
                let p = e.path();
                seen.push(p.strip_prefix(&root).unwrap().display().to_string());
                if e.file_type().expect("type").is_dir() {
                    stack.push((p, depth + 1));
                }
            }
        }
        seen.sort();
        seen
    });
    assert_eq!(tree, ["mnt", "plain"], "{case}: the merged view");
    assert_eq!(must(case, "read of plain", m.read("plain")), b"plain\n");
    must(case, "append to plain", m.append("plain", b"more\n"));
    assert_eq!(
        must(case, "read of plain", m.read("plain")),
        b"plain\nmore\n"
    );
    drop(m);
    sentinel.assert_unchanged(case);
}

/// A symlink planted in the workdir's index under the name of a lower hard-link
/// group (pointing at a file outside the layers) is never linked into the upper
/// layer: the group's copy-up makes its own copy, the names stay one regular file,
/// and the outside file is untouched.
#[test]
fn a_symlink_planted_in_the_index_is_never_used() {
    let case = "symlink_planted_in_the_index";
    if !fixture::require_fuse() {
        return;
    }
    let l = Layers::new(&[LayerBuilder::new()
        .file("p1", "lower\n")
        .hardlink("p2", "p1")]);
    let sentinel = Sentinel::new(&l.root.join("sentinel"));
    let ino = std::os::unix::fs::MetadataExt::ino(&fs::metadata(l.lowers[0].join("p1")).unwrap());
    fs::create_dir_all(l.work.join("#stratafs-index")).unwrap();
    std::os::unix::fs::symlink(
        sentinel.file(),
        l.work.join(format!("#stratafs-index/L0-{ino:x}")),
    )
    .unwrap();
    let mut m = Bounded::mount(case, &l.rw_options(), &l);
    must(case, "append to p1", m.append("p1", b"more\n"));
    assert_eq!(must(case, "read of p2", m.read("p2")), b"lower\nmore\n");
    m.remount();
    assert_eq!(must(case, "read of p2", m.read("p2")), b"lower\nmore\n");
    drop(m);
    let up = fs::symlink_metadata(l.upper.join("p1")).unwrap();
    assert!(
        up.file_type().is_file(),
        "{case}: upper p1 is {:?}",
        up.file_type()
    );
    sentinel.assert_unchanged(case);
}
