//! Crash consistency: the daemon is killed with SIGKILL at a seeded random moment while a
//! workload runs against the mount (copy-up of large files, renames of directories with
//! lower content, `rm -rf` of a lower tree with hard links, `tar -x`), the dead mount is
//! detached, the same upper and work directories are mounted again, and the merged view
//! must be one the workload could have left: every step the workload reported as done
//! (after its fsync) is there, nothing shows a half-copied file in place of lower data,
//! nothing reported removed comes back, a rename happened wholly or not at all, lower
//! hard-link groups agree on every name, `workdir/work` is swept, and the mount answers.
//!
//! Each workload first runs once to completion (which measures how long it takes, and
//! checks the complete end state through a kill after the end), then
//! `STRATAFS_CRASH_TRIALS` times (default 25) with the kill at a delay drawn uniformly
//! from 0 to 1.2 times the quickest complete run seen so far by a xorshift generator
//! seeded with `STRATAFS_CRASH_SEED` (default below; decimal or 0x-hex). The moment a
//! kill lands also depends on timing, so a seed picks the delays, not the exact
//! interleaving: a failure message names the trial, the seed and the delay, and what the
//! workload had reported by then.
//!
//! Only processes this test starts are ended: the daemon (by the fixture's PID) and,
//! on a failure, the workload's own process group.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::fixture::{
    self, ContentDigest, LayerBuilder, Layers, Meta, StrataMount, TreeKind, content_of, hash_bytes,
    kind_of, pattern,
};
use crate::fixture::{lgetxattr, lsetxattr};

const MIB: usize = 1 << 20;
const DEFAULT_SEED: u64 = 0x5eed_c4a5_0f57_a7a5;
const DEFAULT_TRIALS: usize = 25;
/// A workload killed with its daemon stops at its next request; longer means it hangs.
const WORKLOAD_EXIT_LIMIT: Duration = Duration::from_secs(20);
/// Walking and reading the whole remounted tree; longer means the mount hangs.
const CHECK_LIMIT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------
// Seeded delays
// ---------------------------------------------------------------------------------------

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    let parsed = match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => v.parse(),
    };
    Some(parsed.unwrap_or_else(|e| panic!("{name}={v:?} is not a number: {e}")))
}

fn base_seed() -> u64 {
    env_u64("STRATAFS_CRASH_SEED").unwrap_or(DEFAULT_SEED)
}

fn trials() -> usize {
    env_u64("STRATAFS_CRASH_TRIALS").map_or(DEFAULT_TRIALS, |n| n as usize)
}

/// xorshift64*: small, and the same sequence on every machine for a given seed.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d);
        (x >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Each workload draws from its own stream, so adding one does not move the others.
fn workload_seed(name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
    }
    base_seed() ^ h
}

// ---------------------------------------------------------------------------------------
// The merged tree as seen after the remount
// ---------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct Seen {
    kind: TreeKind,
    ino: u64,
    nlink: u64,
    mode: u32,
    mtime: i64,
    content: Option<ContentDigest>,
    target: Option<String>,
}

type Tree = BTreeMap<String, Seen>;

/// Every entry under `root` (relative paths, root itself left out), files read whole.
/// Any failing readdir, lstat, read or readlink of a listed name is an error: the mount
/// must answer for everything it lists.
fn walk(root: &Path) -> Result<Tree, String> {
    fs::symlink_metadata(root).map_err(|e| format!("lstat of the root: {e}"))?;
    let mut out = Tree::new();
    let mut stack = vec![String::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        let rd = fs::read_dir(&dir).map_err(|e| format!("opendir {rel:?}: {e}"))?;
        for ent in rd {
            let ent = ent.map_err(|e| format!("readdir {rel:?}: {e}"))?;
            let name = ent.file_name().to_string_lossy().into_owned();
            let crel = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            let p = root.join(&crel);
            let md = fs::symlink_metadata(&p)
                .map_err(|e| format!("lstat {crel:?} (listed by readdir): {e}"))?;
            let kind = kind_of(&md);
            let content = match kind {
                TreeKind::File => Some(content_of(&p).map_err(|e| format!("read {crel:?}: {e}"))?),
                _ => None,
            };
            let target = match kind {
                TreeKind::Symlink => Some(
                    fs::read_link(&p)
                        .map_err(|e| format!("readlink {crel:?}: {e}"))?
                        .to_string_lossy()
                        .into_owned(),
                ),
                _ => None,
            };
            if kind == TreeKind::Dir {
                stack.push(crel.clone());
            }
            let seen = Seen {
                kind,
                ino: md.ino(),
                nlink: md.nlink(),
                mode: md.mode() & 0o7777,
                mtime: md.mtime(),
                content,
                target,
            };
            if out.insert(crel.clone(), seen).is_some() {
                return Err(format!("readdir lists {crel:?} twice"));
            }
        }
    }
    Ok(out)
}

fn content(data: &[u8]) -> ContentDigest {
    ContentDigest {
        len: data.len() as u64,
        hash: hash_bytes(data),
        head: data[..data.len().min(48)].to_vec(),
    }
}

/// Runs `f` on a helper thread; `Err` says whether it hung past `limit` or panicked.
/// A hung thread is left behind: it ends once the mount is torn down.
fn bounded<T: Send + 'static>(
    limit: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(limit) {
        Ok(v) => Ok(v),
        Err(mpsc::RecvTimeoutError::Timeout) => Err(format!("no answer within {limit:?} (hang)")),
        Err(mpsc::RecvTimeoutError::Disconnected) => Err("the checking thread panicked".into()),
    }
}

/// After the remount the mount must take new work: create, write, fsync, read back,
/// rename, list, remove.
fn mount_takes_work(m: &Path) -> Result<(), String> {
    let e = |what: &str| {
        let what = what.to_string();
        move |err: std::io::Error| format!("{what}: {err}")
    };
    let d = m.join("crash-probe");
    fs::create_dir(&d).map_err(e("mkdir crash-probe"))?;
    let data = pattern(100_000, 77);
    {
        let f = File::create(d.join("f")).map_err(e("create crash-probe/f"))?;
        std::io::Write::write_all(&mut &f, &data).map_err(e("write crash-probe/f"))?;
        f.sync_all().map_err(e("fsync crash-probe/f"))?;
    }
    if fs::read(d.join("f")).map_err(e("read crash-probe/f"))? != data {
        return Err("crash-probe/f reads back other data than was written".into());
    }
    fs::rename(d.join("f"), d.join("g")).map_err(e("rename crash-probe/f"))?;
    let names: Vec<String> = fs::read_dir(&d)
        .map_err(e("opendir crash-probe"))?
        .map(|x| x.map(|x| x.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()
        .map_err(e("readdir crash-probe"))?;
    if names != ["g"] {
        return Err(format!("crash-probe lists {names:?} after the rename"));
    }
    fs::remove_file(d.join("g")).map_err(e("unlink crash-probe/g"))?;
    fs::remove_dir(&d).map_err(e("rmdir crash-probe"))?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Workload processes
// ---------------------------------------------------------------------------------------

/// A `sh -c` workload in its own process group. Its stdout lines are the steps it
/// reports done. Dropped while still running (a failed test), the group is killed.
struct Workload {
    child: Child,
    reaped: bool,
    out: mpsc::Receiver<String>,
}

impl Workload {
    fn spawn(script: &str, mnt: &Path, data: &Path, stderr: &Path) -> Workload {
        let err = File::create(stderr).unwrap();
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .env("M", mnt)
            .env("D", data)
            .env("LC_ALL", "C")
            .current_dir(data)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(err))
            .process_group(0)
            .spawn()
            .expect("run sh");
        let mut stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stdout.read_to_string(&mut s);
            let _ = tx.send(s);
        });
        Workload {
            child,
            reaped: false,
            out: rx,
        }
    }

    /// Its exit status, if it has exited (without waiting).
    fn exited(&mut self) -> Option<ExitStatus> {
        let st = self.child.try_wait().expect("try_wait on the workload")?;
        self.reaped = true;
        Some(st)
    }

    fn wait(&mut self, limit: Duration) -> Option<ExitStatus> {
        let st = fixture::wait_bounded(&mut self.child, limit)?;
        self.reaped = true;
        Some(st)
    }

    /// The lines printed, once the whole group has closed stdout.
    fn lines(&self, limit: Duration) -> Option<Vec<String>> {
        let s = self.out.recv_timeout(limit).ok()?;
        Some(s.lines().map(str::to_string).collect())
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        if !self.reaped {
            // The group is ours: sh was started with its own group, not yet reaped, so
            // the group id cannot have been reused.
            unsafe { libc::kill(-(self.child.id() as libc::pid_t), libc::SIGKILL) };
            let _ = self.child.wait();
        }
    }
}

/// Detaches a FUSE mount whose daemon is dead (lazily: a killed workload may still
/// hold a file of it open).
fn detach(mp: &Path) {
    if fixture::mount_at(mp).is_none() {
        return;
    }
    let ok = Command::new("fusermount3")
        .args(["-u", "-z"])
        .arg(mp)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        let _ = Command::new("umount").arg("-l").arg(mp).status();
    }
    assert!(
        fixture::mount_at(mp).is_none(),
        "the dead mount at {} could not be detached",
        mp.display()
    );
}

fn reset_upper(l: &Layers) {
    for d in [&l.upper, &l.work] {
        fs::remove_dir_all(d).unwrap_or_else(|e| panic!("rm -r {}: {e}", d.display()));
        fs::create_dir(d).unwrap();
    }
}

// ---------------------------------------------------------------------------------------
// The trial loop shared by every workload
// ---------------------------------------------------------------------------------------

/// What a workload's check gets: the tree after the remount and the steps reported.
struct TrialOutcome<'a> {
    tree: &'a Tree,
    lines: &'a [String],
}

impl TrialOutcome<'_> {
    fn reported(&self, step: &str) -> bool {
        self.lines.iter().any(|l| l == step)
    }
}

type Check = fn(&TrialOutcome<'_>) -> Vec<String>;

struct Crash {
    name: &'static str,
    layers: Layers,
    script: String,
    /// Every line a complete run prints (in any order: rm has its own).
    steps: Vec<String>,
    check: Check,
}

struct TrialResult {
    lines: Vec<String>,
    /// Until the workload exited by itself, when it did before the kill.
    took: Option<Duration>,
    interrupted: bool,
    in_staging: bool,
}

impl Crash {
    fn run(&self) {
        let started = Instant::now();
        let seed = base_seed();
        let mut rng = Rng::new(workload_seed(self.name));
        let n = trials();

        let calib = self.trial(0, None, seed);
        let (mut got, mut want) = (calib.lines.clone(), self.steps.clone());
        got.sort();
        want.sort();
        assert!(
            !calib.interrupted && got == want,
            "{}: the workload run to completion reported {:?}, expected {:?}",
            self.name,
            calib.lines,
            self.steps
        );
        let calib_took = calib.took.expect("a complete run");
        // Kills are drawn over 1.2 times the quickest complete run seen so far: the load
        // of the machine changes, and kills after the end would test nothing.
        let bound = |took: Duration| took.mul_f64(1.2).max(Duration::from_millis(20));
        let mut max = bound(calib_took);

        // Steps reported before the kill -> number of trials.
        let mut reached: BTreeMap<usize, usize> = BTreeMap::new();
        let (mut interrupted, mut in_staging) = (0, 0);
        for t in 1..=n {
            let delay = max.mul_f64(rng.unit());
            let r = self.trial(t, Some(delay), seed);
            if let Some(took) = r.took {
                max = max.min(bound(took));
            }
            *reached.entry(r.lines.len()).or_default() += 1;
            interrupted += r.interrupted as usize;
            in_staging += r.in_staging as usize;
        }
        let summary = format!(
            "crash::{}: STRATAFS_CRASH_SEED={seed:#x}: {n} killed trials + 1 complete run \
             ({:.0?}; kills at 0..{max:.0?} by the end): {interrupted} interrupted the \
             workload, {in_staging} with a copy staged in workdir/work; trials by steps reported (of {}) before the kill: \
             {reached:?}; all invariants held; {:.1} s\n",
            self.name,
            calib_took,
            self.steps.len(),
            started.elapsed().as_secs_f64()
        );
        // Straight to fd 2: the counts belong in the CI log of a passing run too.
        let _ = std::io::Write::write_all(&mut std::io::stderr(), summary.as_bytes());
        // Kills that never interrupt the workload would test nothing.
        assert!(
            n < 4 || interrupted * 4 >= n,
            "{}: only {interrupted} of {n} kills interrupted the workload \
             (STRATAFS_CRASH_SEED={seed:#x})",
            self.name
        );
    }

    fn trial(&self, t: usize, delay: Option<Duration>, seed: u64) -> TrialResult {
        let l = &self.layers;
        reset_upper(l);
        let logs = l.root.join(format!("trial-{t}"));
        fs::create_dir_all(&logs).unwrap();
        let what = match delay {
            Some(d) => format!(
                "{} trial {t} (STRATAFS_CRASH_SEED={seed:#x}, kill after {d:?})",
                self.name
            ),
            None => format!("{} complete run", self.name),
        };

        let mut m = StrataMount::with_options(&l.rw_options(), &l.merged, &logs);
        let stderr_log = logs.join("workload.stderr");
        let mut w = Workload::spawn(&self.script, &l.merged, &l.root, &stderr_log);
        let t0 = Instant::now();
        let mut took = None;
        match delay {
            Some(d) => {
                // A workload done before its kill shows how long a complete run takes now.
                while t0.elapsed() < d {
                    if let Some(st) = w.exited() {
                        took = st.success().then(|| t0.elapsed());
                        break;
                    }
                    std::thread::sleep((d - t0.elapsed().min(d)).min(Duration::from_millis(1)));
                }
            }
            None => {
                let st = w.wait(Duration::from_secs(120));
                took = Some(t0.elapsed());
                assert!(
                    st.is_some_and(|s| s.success()),
                    "{what}: the workload failed ({st:?}) with no kill; stderr:\n{}\ndaemon:\n{}",
                    fs::read_to_string(&stderr_log).unwrap_or_default(),
                    m.output()
                );
            }
        }
        let status = m.signal_and_wait(libc::SIGKILL);
        assert_eq!(
            status.signal(),
            Some(libc::SIGKILL),
            "{what}: the daemon had exited by itself ({status}) before the kill; output:\n{}",
            m.output()
        );
        let wst = w.wait(WORKLOAD_EXIT_LIMIT).unwrap_or_else(|| {
            panic!("{what}: the workload still runs {WORKLOAD_EXIT_LIMIT:?} after the daemon died")
        });
        let lines = w
            .lines(WORKLOAD_EXIT_LIMIT)
            .unwrap_or_else(|| panic!("{what}: the workload's stdout stays open"));
        let what = format!("{what}, steps reported: {lines:?}");
        for line in &lines {
            assert!(
                self.steps.contains(line),
                "{what}: the workload printed {line:?}, no step of it"
            );
        }

        detach(&l.merged);
        // Likewise an entry in workdir/work: the kill landed while something was staged.
        let staging = l.work.join("work");
        let in_staging = staging.exists() && !fixture::names(&staging).is_empty();
        m.remount();

        // A crash leaves only staged copies in workdir/work; the new mount sweeps them.
        let work = l.work.join("work");
        let left = fixture::names(&work);
        assert!(
            left.is_empty(),
            "{what}: workdir/work holds {left:?} after the remount"
        );

        let root = l.merged.clone();
        let tree = bounded(CHECK_LIMIT, move || walk(&root))
            .and_then(|r| r)
            .unwrap_or_else(|e| {
                panic!(
                    "{what}: walking the remounted tree: {e}; daemon:\n{}",
                    m.output()
                )
            });
        let problems = (self.check)(&TrialOutcome {
            tree: &tree,
            lines: &lines,
        });
        assert!(
            problems.is_empty(),
            "{what}: after the remount:\n  {}\nworkload stderr:\n{}",
            problems.join("\n  "),
            fs::read_to_string(&stderr_log).unwrap_or_default()
        );

        let root = l.merged.clone();
        bounded(CHECK_LIMIT, move || mount_takes_work(&root))
            .and_then(|r| r)
            .unwrap_or_else(|e| {
                panic!(
                    "{what}: the remounted mount does not take new work: {e}; daemon:\n{}",
                    m.output()
                )
            });
        // The daemon that recovered must also unmount cleanly.
        let unmounted = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| m.unmount()));
        if let Err(e) = unmounted {
            let why = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panic!("{what}: the final unmount: {why}");
        }
        TrialResult {
            lines,
            took,
            interrupted: !wst.success(),
            in_staging,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Shared checks
// ---------------------------------------------------------------------------------------

/// Groups of names of one multiply-linked file in a raw lower layer.
fn lower_groups(lower: &Tree) -> Vec<Vec<String>> {
    let mut by_ino: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for (p, s) in lower {
        if s.kind != TreeKind::Dir && s.nlink > 1 {
            by_ino.entry(s.ino).or_default().push(p.clone());
        }
    }
    by_ino.into_values().collect()
}

/// Every visible name of a lower hard-link group is one file: same st_ino, same data,
/// and st_nlink equal to the number of names the merged view shows for it (what a
/// plain filesystem shows, and what tar, rsync -H and du rely on).
fn check_groups(
    tree: &Tree,
    groups: &[Vec<String>],
    moved: impl Fn(&str) -> Vec<String>,
    out: &mut Vec<String>,
) {
    for group in groups {
        let visible: Vec<(String, &Seen)> = group
            .iter()
            .flat_map(|p| moved(p))
            .filter_map(|p| tree.get(&p).map(|s| (p, s)))
            .collect();
        let Some((first, s0)) = visible.first() else {
            continue;
        };
        for (p, s) in &visible {
            if s.ino != s0.ino || s.content != s0.content || s.nlink != s0.nlink {
                out.push(format!(
                    "hard-link group {group:?}: {p} (ino {}, nlink {}, {:?}) and {first} \
                     (ino {}, nlink {}, {:?}) differ",
                    s.ino, s.nlink, s.content, s0.ino, s0.nlink, s0.content
                ));
            }
        }
        if s0.nlink != visible.len() as u64 {
            let names: Vec<&String> = visible.iter().map(|(p, _)| p).collect();
            out.push(format!(
                "hard-link group {group:?}: {} names visible ({names:?}) but st_nlink is {}",
                visible.len(),
                s0.nlink
            ));
        }
    }
}

fn lower_tree(l: &Layers) -> Tree {
    walk(&l.lowers[0]).expect("walk the lower layer")
}

fn same_entry(seen: &Seen, lower: &Seen) -> bool {
    seen.kind == lower.kind && seen.content == lower.content && seen.target == lower.target
}

// ---------------------------------------------------------------------------------------
// Workloads
// ---------------------------------------------------------------------------------------

struct Patched {
    name: &'static str,
    lower: ContentDigest,
    new: ContentDigest,
}

static COPY_UP: std::sync::OnceLock<Vec<Patched>> = std::sync::OnceLock::new();

/// Copy-up of large files (dense 64 MiB, sparse 64 MiB, a 16 MiB chmod, an append to an
/// 8 MiB file three directories down): a killed copy-up leaves the lower file showing,
/// never an empty or truncated copy; a write reported after its fsync is there.
#[test]
fn kill_during_copy_up_of_large_files() {
    if !fixture::require_fuse() {
        return;
    }
    let big = pattern(64 * MIB, 11);
    let chunks: [(u64, Vec<u8>); 3] = [
        (0, pattern(MIB, 12)),
        ((32 * MIB) as u64, pattern(MIB, 13)),
        ((64 * MIB - 4096) as u64, pattern(4096, 14)),
    ];
    let big2 = pattern(16 * MIB, 15);
    let deep = pattern(8 * MIB, 16);
    let patch = pattern(4096, 99);
    let chunk_refs: Vec<(u64, &[u8])> = chunks.iter().map(|(o, d)| (*o, d.as_slice())).collect();
    let lower = LayerBuilder::new()
        .file("big", &big)
        .sparse("sparse", (64 * MIB) as u64, &chunk_refs, Meta::new())
        .file("big2", &big2)
        .file("a/b/c/deep", &deep);
    let layers = Layers::new(&[lower]);
    fs::write(layers.root.join("patch"), &patch).unwrap();

    let mut sparse = vec![0u8; 64 * MIB];
    for (o, d) in &chunks {
        sparse[*o as usize..*o as usize + d.len()].copy_from_slice(d);
    }
    let patched = |mut v: Vec<u8>, at: usize| {
        v[at..at + 4096].copy_from_slice(&patch);
        v
    };
    let mut deep_new = deep.clone();
    deep_new.extend_from_slice(b"tail\n");
    let files = vec![
        Patched {
            name: "big",
            lower: content(&big),
            new: content(&patched(big.clone(), 4097 * 4096)),
        },
        Patched {
            name: "sparse",
            lower: content(&sparse),
            new: content(&patched(sparse.clone(), 2560 * 4096)),
        },
        Patched {
            name: "big2",
            lower: content(&big2),
            new: content(&big2),
        },
        Patched {
            name: "a/b/c/deep",
            lower: content(&deep),
            new: content(&deep_new),
        },
    ];
    drop((big, sparse, big2, deep, deep_new));
    assert!(COPY_UP.set(files).is_ok(), "set once");

    let script = r#"set -e
dd if="$D/patch" of="$M/big" bs=4096 seek=4097 count=1 conv=notrunc,fsync status=none
echo big
dd if="$D/patch" of="$M/sparse" bs=4096 seek=2560 count=1 conv=notrunc,fsync status=none
echo sparse
chmod 600 "$M/big2"
sync "$M/big2"
echo big2
printf 'tail\n' >> "$M/a/b/c/deep"
sync "$M/a/b/c/deep"
echo deep
"#;
    fn check(o: &TrialOutcome<'_>) -> Vec<String> {
        let mut out = Vec::new();
        for f in COPY_UP.get().unwrap() {
            let step = f.name.rsplit('/').next().unwrap();
            let Some(s) = o.tree.get(f.name) else {
                out.push(format!("{} is gone", f.name));
                continue;
            };
            let c = s.content.as_ref();
            if o.reported(step) {
                if c != Some(&f.new) {
                    out.push(format!(
                        "{}: its step was reported done (after fsync), but it shows {c:?}, \
                         not the new data {:?}",
                        f.name, f.new
                    ));
                }
            } else if c != Some(&f.lower) && c != Some(&f.new) {
                out.push(format!(
                    "{}: shows {c:?}: neither the whole lower data {:?} nor the whole new \
                     data {:?}",
                    f.name, f.lower, f.new
                ));
            }
            if f.name == "big2" {
                let ok = s.mode == 0o600 || (s.mode == 0o644 && !o.reported("big2"));
                if !ok {
                    out.push(format!(
                        "big2: mode {:04o} (chmod 600 reported done: {})",
                        s.mode,
                        o.reported("big2")
                    ));
                }
            }
        }
        let names: BTreeSet<&str> = o.tree.keys().map(String::as_str).collect();
        let want: BTreeSet<&str> = ["a", "a/b", "a/b/c", "a/b/c/deep", "big", "big2", "sparse"]
            .into_iter()
            .collect();
        if names != want {
            out.push(format!("the tree lists {names:?}, expected {want:?}"));
        }
        out
    }
    Crash {
        name: "copy_up",
        layers,
        script: script.into(),
        steps: ["big", "sparse", "big2", "deep"].map(String::from).to_vec(),
        check,
    }
    .run();
}

const RENAMED_DIRS: usize = 12;

fn renamed_to(i: usize) -> String {
    if i % 2 == 1 {
        format!("into/e{i:02}")
    } else {
        format!("e{i:02}")
    }
}

static RENAME_LOWER: std::sync::OnceLock<Tree> = std::sync::OnceLock::new();

/// Maps a merged path back to the lower path its content comes from.
fn rename_origin(p: &str) -> String {
    for i in 0..RENAMED_DIRS {
        let to = renamed_to(i);
        if p == to {
            return format!("d{i:02}");
        }
        if let Some(rest) = p.strip_prefix(&format!("{to}/")) {
            return format!("d{i:02}/{rest}");
        }
    }
    p.to_string()
}

/// Renames of directories with lower content (each holding a name of a hard-link group
/// whose other name stays outside): each happens wholly or not at all, the lower
/// content shows under exactly one of the two names, a reported rename is there.
#[test]
fn kill_during_renames_of_directories_with_lower_content() {
    if !fixture::require_fuse() {
        return;
    }
    let mut lower = LayerBuilder::new().file("into/keep", "keep\n");
    for i in 0..RENAMED_DIRS {
        lower = lower
            .file(&format!("d{i:02}/f1"), format!("f1 of d{i:02}\n"))
            .file(&format!("d{i:02}/f2"), pattern(64 << 10, i as u64))
            .file(&format!("d{i:02}/sub/f3"), format!("f3 of d{i:02}\n"))
            .symlink(&format!("d{i:02}/sub/ln"), "f3")
            .file(&format!("d{i:02}/h"), format!("group {i}\n"))
            .hardlink(&format!("links/h{i:02}"), &format!("d{i:02}/h"));
    }
    let layers = Layers::new(&[lower]);
    assert!(RENAME_LOWER.set(lower_tree(&layers)).is_ok(), "set once");

    let ids: Vec<String> = (0..RENAMED_DIRS).map(|i| format!("{i:02}")).collect();
    let script = format!(
        r#"set -e
for i in {}; do
  case $i in *[13579]) dst="$M/into/e$i" ;; *) dst="$M/e$i" ;; esac
  mv "$M/d$i" "$dst"
  echo "$i"
done
"#,
        ids.join(" ")
    );
    fn check(o: &TrialOutcome<'_>) -> Vec<String> {
        let lower = RENAME_LOWER.get().unwrap();
        let mut out = Vec::new();
        for i in 0..RENAMED_DIRS {
            let (from, to) = (format!("d{i:02}"), renamed_to(i));
            let at = |p: &str| o.tree.get(p).is_some_and(|s| s.kind == TreeKind::Dir);
            match (at(&from), at(&to)) {
                (true, true) => out.push(format!("{from} and {to} both show the directory")),
                (false, false) => out.push(format!("neither {from} nor {to} shows the directory")),
                (true, false) if o.reported(&format!("{i:02}")) => out.push(format!(
                    "the rename of {from} to {to} was reported, but {from} is back"
                )),
                _ => {}
            }
            // All of the lower content is under whichever name shows it.
            let shown = if at(&to) { to } else { from.clone() };
            for (p, s) in lower.range(format!("{from}/")..format!("{from}0")) {
                let here = format!("{shown}{}", &p[from.len()..]);
                match o.tree.get(&here) {
                    Some(seen) if same_entry(seen, s) => {}
                    Some(seen) => out.push(format!(
                        "{here} shows {:?} {:?} {:?}, lower {p} is {:?} {:?} {:?}",
                        seen.kind, seen.content, seen.target, s.kind, s.content, s.target
                    )),
                    None => out.push(format!("{here} (lower {p}) is missing")),
                }
            }
        }
        for (p, s) in o.tree {
            let origin = rename_origin(p);
            match lower.get(&origin) {
                Some(l) if same_entry(s, l) => {}
                Some(l) => out.push(format!("{p}: shows {s:?}, its lower {origin} is {l:?}")),
                None => out.push(format!(
                    "{p}: listed, but no lower entry {origin} is behind it"
                )),
            }
        }
        let groups = lower_groups(lower);
        check_groups(
            o.tree,
            &groups,
            |p| {
                let to = p
                    .strip_prefix("d")
                    .and_then(|r| r.split_once('/'))
                    .map(|(i, rest)| {
                        let i: usize = i.parse().unwrap();
                        format!("{}/{rest}", renamed_to(i))
                    });
                std::iter::once(p.to_string()).chain(to).collect()
            },
            &mut out,
        );
        out
    }
    Crash {
        name: "rename_dirs",
        layers,
        script,
        steps: ids,
        check,
    }
    .run();
}

static RM_LOWER: std::sync::OnceLock<Tree> = std::sync::OnceLock::new();

/// The paths `rm -v` reported removed ("removed 'X'", "removed directory 'X'").
fn removed_paths(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .filter_map(|l| l.strip_prefix("removed "))
        .map(|r| {
            let r = r
                .strip_prefix("directory")
                .map_or(r, |r| r.trim_start_matches(':').trim_start());
            r.trim_matches('\'').to_string()
        })
        .collect()
}

/// `rm -rf` of a lower tree holding hard-link groups (some with a name outside the
/// tree): nothing reported removed comes back, whatever is left shows its whole lower
/// data, and every group agrees on its visible names.
#[test]
fn kill_during_rm_rf_of_a_lower_tree_with_hard_links() {
    if !fixture::require_fuse() {
        return;
    }
    let mut lower = LayerBuilder::new().file("keep/plain", "plain\n");
    for a in 0..6 {
        for b in 0..4 {
            for f in 0..3 {
                lower = lower.file(
                    &format!("tree/a{a}/b{b}/f{f}"),
                    format!("file a{a} b{b} f{f}\n").repeat(20),
                );
            }
        }
        lower = lower
            .symlink(&format!("tree/a{a}/b2/s"), "f0")
            .dir(&format!("tree/a{a}/b3/empty"));
    }
    // Each group has names in several directories not yet copied up, so linking it up
    // takes a while (a window for the kill); half of them also keep a name outside.
    for k in 0..12 {
        let first = format!("tree/a{}/g{k}", k % 6);
        lower = lower.file(&first, pattern(32 << 10, 100 + k as u64));
        for j in 1..4 {
            let other = format!("tree/a{}/b{}/g{k}", (k + j) % 6, j - 1);
            lower = lower.hardlink(&other, &first);
        }
        if k % 2 == 0 {
            lower = lower.hardlink(&format!("keep/g{k}"), &first);
        }
    }
    let layers = Layers::new(&[lower]);
    assert!(RM_LOWER.set(lower_tree(&layers)).is_ok(), "set once");

    let script = r#"cd "$M" && rm -rfv tree && echo done"#;
    fn check(o: &TrialOutcome<'_>) -> Vec<String> {
        let lower = RM_LOWER.get().unwrap();
        let mut out = Vec::new();
        let removed = removed_paths(o.lines);
        for p in &removed {
            if !lower.contains_key(p) {
                out.push(format!("rm reported removing {p:?}, no lower entry"));
            }
            if o.tree.contains_key(p) {
                out.push(format!("{p}: reported removed, but it is back"));
            }
        }
        if o.reported("done") && o.tree.contains_key("tree") {
            out.push("rm -rf tree finished, but tree is back".into());
        }
        for p in lower.keys().filter(|p| p.starts_with("keep")) {
            if !o.tree.contains_key(p) {
                out.push(format!("{p}: outside the removed tree, but gone"));
            }
        }
        for (p, s) in o.tree {
            match lower.get(p) {
                Some(l) if same_entry(s, l) => {}
                Some(l) => out.push(format!(
                    "{p}: shows {:?} {:?} {:?}, lower is {:?} {:?} {:?}",
                    s.kind, s.content, s.target, l.kind, l.content, l.target
                )),
                None => out.push(format!("{p}: listed, but not in the lower layer")),
            }
        }
        check_groups(
            o.tree,
            &lower_groups(lower),
            |p| vec![p.to_string()],
            &mut out,
        );
        out
    }
    let lower = RM_LOWER.get().unwrap();
    let mut steps: Vec<String> = lower
        .iter()
        .filter(|(p, _)| *p == "tree" || p.starts_with("tree/"))
        .map(|(p, s)| match s.kind {
            TreeKind::Dir => format!("removed directory '{p}'"),
            _ => format!("removed '{p}'"),
        })
        .collect();
    steps.push("done".into());
    Crash {
        name: "rm_rf",
        layers,
        script: script.into(),
        steps,
        check,
    }
    .run();
}

/// The archive's tree and the lower layer's.
static TAR: std::sync::OnceLock<(Tree, Tree)> = std::sync::OnceLock::new();
/// The archive's regular files, by path.
static TAR_FILES: std::sync::OnceLock<BTreeMap<String, Vec<u8>>> = std::sync::OnceLock::new();

/// Whether `c` is the content of the first `c.len` bytes of `data`.
fn is_prefix(c: &ContentDigest, data: &[u8]) -> bool {
    c.len <= data.len() as u64 && content(&data[..c.len as usize]) == *c
}
const TAR_TARGETS: usize = 3;

/// `tar -x` of a small archive into three lower directories that already hold some
/// of its names: a target reported done (after `sync` of its files) holds the whole
/// archive; before that every file shows its lower data or a prefix of the archive's
/// (tar writes it in order); lower names the archive does not have stay untouched.
#[test]
fn kill_during_untar_into_lower_directories() {
    if !fixture::require_fuse() {
        return;
    }
    let mut archive = LayerBuilder::new()
        .file("etc/conf", "new conf\n")
        .file_with(
            "usr/bin/tool",
            pattern(256 << 10, 7),
            Meta::new().mode(0o755).mtime(1_100_000_000),
        )
        .hardlink("usr/bin/tool2", "usr/bin/tool")
        .symlink("usr/bin/lnk", "tool")
        .dir("var/empty");
    for j in 0..10 {
        archive = archive.file(&format!("etc/new.d/f{j}"), format!("new f{j}\n"));
    }
    for j in 0..20 {
        archive = archive.file(
            &format!("usr/share/doc/d{j}"),
            format!("doc {j}\n").repeat(200),
        );
    }
    let mut lower = LayerBuilder::new();
    for i in 0..TAR_TARGETS {
        lower = lower
            .file(&format!("t{i}/etc/conf"), format!("old conf {i}\n"))
            .file(&format!("t{i}/usr/bin/tool"), format!("old tool {i}\n"))
            .file(&format!("t{i}/usr/share/doc/d0"), "old doc\n")
            .file(&format!("t{i}/keep"), format!("keep {i}\n"));
    }
    let layers = Layers::new(&[lower]);
    let stage = layers.root.join("stage");
    fs::create_dir(&stage).unwrap();
    archive.build(&stage, fixture::Format::NATIVE);
    let st = Command::new("tar")
        .arg("-cf")
        .arg(layers.root.join("a.tar"))
        .arg("-C")
        .arg(&stage)
        .arg(".")
        .status()
        .unwrap();
    assert!(st.success(), "tar -c of the archive: {st}");
    let arch = walk(&stage).unwrap();
    let files: Vec<&str> = arch
        .iter()
        .filter(|(_, s)| s.kind == TreeKind::File)
        .map(|(p, _)| p.as_str())
        .collect();
    assert!(
        TAR.set((arch.clone(), lower_tree(&layers))).is_ok(),
        "set once"
    );

    let ids: Vec<String> = (0..TAR_TARGETS).map(|i| i.to_string()).collect();
    let script = format!(
        r#"set -e
for i in {}; do
  tar -xf "$D/a.tar" -C "$M/t$i"
  (cd "$M/t$i" && sync {})
  echo "$i"
done
"#,
        ids.join(" "),
        files.join(" ")
    );
    fn check(o: &TrialOutcome<'_>) -> Vec<String> {
        let (arch, lower) = TAR.get().unwrap();
        let data = TAR_FILES.get().unwrap();
        let mut out = Vec::new();
        for i in 0..TAR_TARGETS {
            let t = format!("t{i}");
            let done = o.reported(&i.to_string());
            let keep = format!("{t}/keep");
            match (o.tree.get(&keep), lower.get(&keep)) {
                (Some(s), Some(l)) if same_entry(s, l) => {}
                (s, _) => out.push(format!("{keep}: not in the archive, shows {s:?}")),
            }
            for (p, s) in o.tree.range(format!("{t}/")..format!("{t}0")) {
                let rel = &p[t.len() + 1..];
                let (a, l) = (arch.get(rel), lower.get(p));
                if a.is_none() && l.is_none() {
                    out.push(format!(
                        "{p}: neither in the archive nor in the lower layer"
                    ));
                    continue;
                }
                let ok = match s.kind {
                    TreeKind::File => {
                        let c = s.content.as_ref().unwrap();
                        l.is_some_and(|l| l.content.as_ref() == Some(c))
                            || a.is_some_and(|a| {
                                a.kind == TreeKind::File && is_prefix(c, &data[rel])
                            })
                    }
                    TreeKind::Symlink => a.is_some_and(|a| a.target == s.target),
                    k => a.is_some_and(|a| a.kind == k) || l.is_some_and(|l| l.kind == k),
                };
                if !ok {
                    out.push(format!(
                        "{p}: shows {s:?}: neither its lower entry {l:?} nor (a prefix of) \
                         the archive's {a:?}"
                    ));
                }
            }
            if done {
                for (rel, a) in arch {
                    let p = format!("{t}/{rel}");
                    match o.tree.get(&p) {
                        None => out.push(format!("{p}: tar into {t} was reported done, missing")),
                        Some(s) => {
                            let same = s.kind == a.kind
                                && s.content == a.content
                                && s.target == a.target
                                && (a.kind != TreeKind::File
                                    || (s.mode, s.mtime) == (a.mode, a.mtime));
                            if !same {
                                out.push(format!(
                                    "{p}: tar into {t} was reported done, shows {s:?}, the \
                                     archive has {a:?}"
                                ));
                            }
                        }
                    }
                }
            }
            let (one, two) = (format!("{t}/usr/bin/tool"), format!("{t}/usr/bin/tool2"));
            if let (Some(x), Some(y)) = (o.tree.get(&one), o.tree.get(&two)) {
                let lower_tool = lower.get(&one).and_then(|l| l.content.as_ref());
                // tool2 only ever comes to be by link(2), once the first name is whole.
                if x.content.as_ref() != lower_tool
                    && (x.ino != y.ino || x.nlink != 2 || y.nlink != 2)
                {
                    out.push(format!(
                        "{one} and {two}, linked in the archive: ino {} / {}, nlink {} / {}",
                        x.ino, y.ino, x.nlink, y.nlink
                    ));
                }
            }
        }
        out
    }
    let data: BTreeMap<String, Vec<u8>> = files
        .iter()
        .map(|p| (p.to_string(), fs::read(stage.join(p)).unwrap()))
        .collect();
    assert!(TAR_FILES.set(data).is_ok(), "set once");
    Crash {
        name: "untar",
        layers,
        script,
        steps: ids,
        check,
    }
    .run();
}

/// The state a kill right after a lower hard-link group's copy is published leaves:
/// the copy in `workdir/#stratafs-index` (named as hardlink.rs names it:
/// `L<layer from the bottom>-<lower ino in hex>`), its marker counting every name as
/// not linked yet, and no name linked to it. Made here from a finished copy-up, so
/// that it does not depend on where a kill lands. The next mount must show one file,
/// the copy, under every name, with st_nlink the number of names, and keep it one
/// file through writes and removals.
#[test]
fn a_hard_link_copy_up_cut_short_by_a_crash_is_finished_by_the_next_mount() {
    if !fixture::require_fuse() {
        return;
    }
    let data = pattern(40_000, 5);
    let lower = LayerBuilder::new()
        .file("a/g", &data)
        .hardlink("b/g", "a/g")
        .hardlink("c/d/g", "a/g");
    let l = Layers::new(&[lower]);
    let mut m = StrataMount::new(&l);
    // Opening for writing copies the group up and links this one name.
    fs::OpenOptions::new()
        .write(true)
        .open(m.join("b/g"))
        .unwrap()
        .write_all(b"copied ")
        .unwrap();
    m.unmount();
    let ino = fs::symlink_metadata(l.lowers[0].join("a/g")).unwrap().ino();
    let entry = l.work.join(format!("#stratafs-index/L0-{ino:x}"));
    assert_eq!(
        fs::symlink_metadata(&entry).map(|md| md.nlink()).ok(),
        Some(2),
        "the group's copy in the index, linked to the one name written to"
    );
    assert!(
        !l.upper.join("a/g").exists() && !l.upper.join("c/d").exists(),
        "names not reached are not linked (nor their directories made)"
    );
    // Back to the moment before the first link: the marker counts that name again.
    fs::remove_file(l.upper.join("b/g")).unwrap();
    let marker = "trusted.stratafs.origin";
    let value = String::from_utf8(lgetxattr(&entry, marker).unwrap()).unwrap();
    let (number, adjust) = value.split_once(':').expect("an <ino>:<adjust> marker");
    let adjust: i64 = adjust.parse().unwrap();
    lsetxattr(
        &entry,
        marker,
        format!("{number}:{}", adjust + 1).as_bytes(),
        0,
    )
    .unwrap();

    m.remount();
    let root = l.merged.clone();
    let mut expected = data.clone();
    expected[..7].copy_from_slice(b"copied ");
    let seen = bounded(CHECK_LIMIT, move || {
        ["a/g", "b/g", "c/d/g"].map(|p| {
            let md = fs::symlink_metadata(root.join(p)).unwrap();
            (
                md.ino(),
                md.nlink(),
                fs::read(root.join(p)).unwrap() == expected,
            )
        })
    })
    .unwrap_or_else(|e| panic!("stat of the group's names after the remount: {e}"));
    for (p, (ino, nlink, same_data)) in ["a/g", "b/g", "c/d/g"].iter().zip(seen) {
        assert!(same_data, "{p}: other data than the group's copy");
        assert_eq!(
            (ino, nlink),
            (seen[0].0, 3),
            "{p}: (st_ino, st_nlink) after the remount; every name of the group must be one \
             file with three links (all names: {seen:?})"
        );
    }
    // One file: a write through one name shows through the others, and a removal
    // counts once.
    fs::write(m.join("c/d/g"), "one file").unwrap();
    assert_eq!(fs::read(m.join("a/g")).unwrap(), b"one file");
    assert_eq!(fs::read(m.join("b/g")).unwrap(), b"one file");
    fs::remove_file(m.join("a/g")).unwrap();
    assert_eq!(fs::symlink_metadata(m.join("b/g")).unwrap().nlink(), 2);
    m.remount();
    assert_eq!(fs::symlink_metadata(m.join("c/d/g")).unwrap().nlink(), 2);
    assert!(!m.join("a/g").exists(), "a/g came back");
    // Once no name shows the copy, the next mount drops it from the index.
    fs::remove_file(m.join("b/g")).unwrap();
    fs::remove_file(m.join("c/d/g")).unwrap();
    m.remount();
    let index = l.work.join("#stratafs-index");
    assert!(
        fixture::names(&index).is_empty(),
        "#stratafs-index: {:?} left with no name showing it",
        fixture::names(&index)
    );
}
