//! Reference-model tests: random lower layers and operation sequences applied to the
//! engine and to the model (src/testing), compared after every operation; every
//! failure found is pinned below as a named regression test. The same runner also
//! drives a real stratafs mount and kernel overlayfs (a second oracle).

use std::cell::RefCell;
use std::rc::Rc;

use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};
use stratafs::testing::layers::{self, GeneratedLayer, LowerEntry, OpaqueFormat, WhiteoutFormat};
use stratafs::testing::model::Model;
use stratafs::testing::ops;
use stratafs::testing::ops::RenameFlag;
use stratafs::testing::{Checks, Op, Scenario, check_sequence, p, run_engine};

use crate::fixture::{self, KernelOverlay, Layers, MountedSubject, StrataMount};

/// Fixed, so that every run of the suite tries the same cases. For exploring,
/// `STRATAFS_MODEL_SEED=N` changes it and `STRATAFS_MODEL_CASES=N` sets the count.
const SEED: [u8; 32] = *b"stratafs-model-test-seed-2026-11";
/// Cases per run of the engine property test.
const ENGINE_CASES: u32 = 5000;
const MAX_OPS: usize = 40;

fn env_u32(name: &str) -> Option<u32> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

fn runner(cases: u32, max_shrink_iters: u32) -> TestRunner {
    let config = Config {
        cases: env_u32("STRATAFS_MODEL_CASES").unwrap_or(cases),
        max_shrink_iters,
        failure_persistence: None,
        ..Config::default()
    };
    let mut seed = SEED;
    if let Some(n) = env_u32("STRATAFS_MODEL_SEED") {
        seed[..4].copy_from_slice(&n.to_le_bytes());
    }
    TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &seed))
}

fn case() -> impl Strategy<Value = (Scenario, Vec<Op>)> {
    (
        layers::scenario(),
        prop::collection::vec(ops::op(), 1..=MAX_OPS),
    )
}

#[test]
fn engine_matches_model_on_random_sequences() {
    let result = runner(ENGINE_CASES, 4096).run(&case(), |(scenario, ops)| {
        run_engine(&scenario, &ops, Checks::default()).map_err(TestCaseError::fail)
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// The engine run again as root of a user namespace (`unshare -Ur`), as rootless
/// podman runs it: no trusted.* xattrs, so lower layers carry AUFS-format markers and
/// the engine marks opaque directories with user.overlay.opaque.
#[test]
fn engine_matches_model_in_a_user_namespace() {
    if std::env::var_os("STRATAFS_MODEL_IN_USERNS").is_some() {
        return;
    }
    let exe = std::env::current_exe().expect("test binary path");
    let out = std::process::Command::new("unshare")
        .arg("-Ur")
        .arg(&exe)
        .args([
            "--exact",
            "model::engine_matches_model_on_random_sequences",
            "--test-threads=1",
        ])
        .env("STRATAFS_MODEL_IN_USERNS", "1")
        .env("STRATAFS_MODEL_CASES", "600")
        .output()
        .expect("run unshare (util-linux)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains("1 passed"),
        "the model test in a user namespace failed ({}):\n{text}",
        out.status
    );
}

// ---------------------------------------------------------------------------------------
// Regressions: shrunk failures, pinned
// ---------------------------------------------------------------------------------------

fn layer(entries: &[(&str, LowerEntry)]) -> GeneratedLayer {
    GeneratedLayer {
        entries: entries.iter().map(|(k, v)| (p(k), v.clone())).collect(),
    }
}

fn file(len: u8, byte: u8) -> LowerEntry {
    LowerEntry::File {
        len,
        byte,
        mode: 0,
        xattr: None,
    }
}

fn dir() -> LowerEntry {
    LowerEntry::Dir {
        mode: 0,
        opaque: None,
        xattr: None,
    }
}

fn pinned(lowers: Vec<GeneratedLayer>, ops: &[Op]) {
    let scenario = Scenario {
        lowers,
        upper: GeneratedLayer::default(),
    };
    if let Err(e) = run_engine(&scenario, ops, Checks::default()) {
        panic!("{e}");
    }
}

/// Found by the model test: a reader that opened a lower file before a writer
/// copied it up kept reading the lower data (the engine read from the fd it opened
/// on the lower layer). It must see the upper copy, as with kernel overlayfs.
#[test]
fn reader_opened_before_copy_up_sees_the_copy() {
    pinned(
        vec![layer(&[("a", file(0, 0))])],
        &[
            Op::Open {
                slot: 0,
                path: p("a"),
                write: false,
            },
            Op::Truncate {
                path: p("a"),
                size: 1,
            },
            Op::FdRead { slot: 0 },
        ],
    );
    // The same after the name is gone: the reader reads the removed copy.
    pinned(
        vec![layer(&[("a/b", file(3, 1))])],
        &[
            Op::Open {
                slot: 1,
                path: p("a/b"),
                write: false,
            },
            Op::Write {
                path: p("a/b"),
                offset: 1,
                len: 4,
                byte: 7,
            },
            Op::Unlink { path: p("a/b") },
            Op::FdRead { slot: 1 },
        ],
    );
}

/// Found by the model test: a directory moved by redirect merged the content its
/// lower path had in a layer hidden by an opaque directory on that path (lower
/// `b` opaque over a lower `b/a/a`; `mv b/a b/b` showed `b/b/a`). A redirect is now
/// followed the way lookup goes: an opaque directory on the way ends it.
#[test]
fn a_redirect_stops_at_an_opaque_directory_on_its_path() {
    let opaque_dir = LowerEntry::Dir {
        mode: 0,
        opaque: Some(OpaqueFormat::TrustedXattr),
        xattr: None,
    };
    pinned(
        vec![
            layer(&[("b", opaque_dir), ("b/a/b", file(0, 0))]),
            layer(&[("b/a/a", LowerEntry::Symlink { target: 0 })]),
        ],
        &[Op::Rename {
            from: p("b/a"),
            to: p("b/b"),
            flag: RenameFlag::Replace,
        }],
    );
}

/// Found by the mounted model test: with both names cached by the kernel, removing
/// the name a hard-linked file was last reached by made the other name answer
/// ENOENT to open (`echo x > a; ln a c; rm c; cat a`). The engine now opens the
/// object through the handle it pinned at the removal.
#[test]
fn other_hard_link_opens_after_the_last_used_name_is_removed() {
    if !fixture::require_fuse() {
        return;
    }
    let ops = [
        Op::Create {
            path: p("a"),
            mode: 0,
        },
        Op::Write {
            path: p("a"),
            offset: 0,
            len: 3,
            byte: b'x',
        },
        Op::Link {
            from: p("a"),
            to: p("c"),
        },
        Op::Unlink { path: p("c") },
        Op::Read { path: p("a") },
        Op::Write {
            path: p("a"),
            offset: 3,
            len: 1,
            byte: b'y',
        },
        Op::Read { path: p("a") },
        // Metadata calls too reach the object through the pinned handle.
        Op::Chmod {
            path: p("a"),
            mode: 1,
        },
        Op::Stat { path: p("a") },
    ];
    // No tree walk between operations: its readdirplus would look `a` up again and
    // so hide the bug.
    pinned_mounted(vec![GeneratedLayer::default()], &ops);
}

/// Runs `ops` on a stratafs mount (default options) of `lowers` against the model,
/// with no tree walk between operations (which would look every name up again).
fn pinned_mounted(lowers: Vec<GeneratedLayer>, ops: &[Op]) {
    let scenario = Scenario {
        lowers,
        upper: GeneratedLayer::default(),
    };
    let l = mounted_layers(&scenario);
    let m = Rc::new(RefCell::new(StrataMount::new(&l)));
    let remount: Box<dyn FnMut() -> Result<(), String>> = Box::new(move || {
        m.borrow_mut().remount();
        Ok(())
    });
    let mut subject = MountedSubject::new(&l.merged, &l.upper, &l.work, remount);
    let mut model = Model::from_scenario(&scenario, root_mode(&l));
    let checks = Checks {
        tree_every_op: false,
        stable_ino_across_remount: false,
        link_counts: true,
    };
    if let Err(f) = check_sequence(&mut model, &mut subject, ops, checks) {
        panic!("{f}");
    }
}

/// Found by the mounted model test once names of a lower hard-link group were linked
/// to its copy as they are reached: renaming a name of the group whose inode was
/// last reached by another name copied the group up through that other name only,
/// and the rename answered ENOENT (`ls c/a/a; mv b/a a`). The renamed name is now
/// linked to the copy before it moves.
#[test]
fn renaming_a_hard_link_last_reached_by_another_name_moves_it() {
    if !fixture::require_fuse() {
        return;
    }
    let lower = layer(&[
        ("b", dir()),
        ("b/a", file(3, 1)),
        ("c", dir()),
        ("c/a", dir()),
        ("c/a/a", LowerEntry::HardLink { to: p("b/a") }),
    ]);
    let ops = [
        Op::Stat { path: p("b/a") },
        Op::Stat { path: p("c/a/a") },
        Op::Rename {
            from: p("b/a"),
            to: p("a"),
            flag: RenameFlag::Replace,
        },
        Op::Stat { path: p("a") },
        Op::Read { path: p("a") },
        Op::Write {
            path: p("c/a/a"),
            offset: 0,
            len: 1,
            byte: b'z',
        },
        Op::Read { path: p("a") },
        Op::Stat { path: p("c/a/a") },
    ];
    pinned_mounted(vec![lower], &ops);
}

/// The model's own sanity: the layer merge it starts from, with both marker formats.
#[test]
fn model_merges_whiteouts_and_opaque_dirs_of_both_formats() {
    for (wh, op) in [
        (WhiteoutFormat::CharDevice, OpaqueFormat::TrustedXattr),
        (WhiteoutFormat::Aufs, OpaqueFormat::Aufs),
    ] {
        let top = layer(&[
            ("a", LowerEntry::Whiteout(wh)),
            (
                "b",
                LowerEntry::Dir {
                    mode: 0,
                    opaque: Some(op),
                    xattr: None,
                },
            ),
            ("b/c", file(2, 0)),
        ]);
        let bottom = layer(&[
            ("a", file(3, 1)),
            ("b", dir()),
            ("b/a", file(1, 2)),
            ("c", file(4, 3)),
        ]);
        let scenario = Scenario {
            lowers: vec![top, bottom],
            upper: GeneratedLayer::default(),
        };
        let mut model = Model::from_scenario(&scenario, 0o755);
        let names = |m: &mut Model, path| m.apply(&Op::Readdir { path });
        assert_eq!(
            names(&mut model, None),
            Ok(stratafs::testing::model::Outcome::Names(vec![
                "b".into(),
                "c".into()
            ]))
        );
        assert_eq!(
            names(&mut model, Some(p("b"))),
            Ok(stratafs::testing::model::Outcome::Names(vec!["c".into()]))
        );
        // The engine agrees, including after a remount.
        pinned(scenario.lowers.clone(), &[Op::Remount]);
    }
}

// ---------------------------------------------------------------------------------------
// The same runner on real mounts
// ---------------------------------------------------------------------------------------

const MOUNT_CASES: u32 = 500;

/// Builds the scenario's lowers into fixture layers (kernel formats only: kernel
/// overlayfs reads no AUFS markers).
fn mounted_layers(scenario: &Scenario) -> Layers {
    let specs = vec![fixture::LayerBuilder::new(); scenario.lowers.len()];
    let l = Layers::build(&specs, None, fixture::Format::NATIVE);
    for (i, dir) in l.lowers.iter().enumerate() {
        scenario.build_layer(i, dir).expect("build layer");
    }
    scenario.build_upper(&l.upper).expect("build upper");
    l
}

fn root_mode(l: &Layers) -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(&l.upper).expect("upper").mode() & 0o7777
}

/// The two mounted model tests take turns: while one unmounts, a fork of the other
/// (spawning mount or fusermount3) may briefly hold copies of its descriptors.
static MOUNTED_MODEL_TESTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs generated cases on a mount made by `mount` (which returns a remount closure).
fn mounted_cases(
    native_scenario: impl Fn(&Scenario) -> Scenario,
    checks: Checks,
    kernel: bool,
    mount: impl Fn(&Layers) -> Box<dyn FnMut() -> Result<(), String>>,
) {
    let _turn = MOUNTED_MODEL_TESTS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let result = runner(MOUNT_CASES, 64).run(&case(), |(scenario, ops)| {
        let scenario = native_scenario(&scenario);
        let l = mounted_layers(&scenario);
        let remount = mount(&l);
        let mut subject = MountedSubject::new(&l.merged, &l.upper, &l.work, remount);
        if kernel {
            subject = subject.kernel_overlay();
        }
        let mut model = Model::from_scenario(&scenario, root_mode(&l));
        check_sequence(&mut model, &mut subject, &ops, checks)
            .map_err(|f| TestCaseError::fail(format!("{f}\nscenario: {scenario:?}\nops: {ops:#?}")))
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

#[test]
fn stratafs_mount_matches_model() {
    if !fixture::require_fuse() {
        return;
    }
    mounted_cases(
        |s| s.normalized(true, false),
        Checks {
            tree_every_op: false,
            stable_ino_across_remount: true,
            link_counts: true,
        },
        false,
        |l| {
            // The default configuration: passthrough on, lower hard links in the
            // scenarios, nothing turned off.
            let m = Rc::new(RefCell::new(StrataMount::new(l)));
            Box::new(move || {
                m.borrow_mut().remount();
                Ok(())
            })
        },
    );
}

/// Kernel overlayfs (mounted `redirect_dir=on,index=on`) as a second oracle, on
/// scenarios where the model and the kernel agree (see [`kernel_comparable`]).
#[test]
fn kernel_overlay_matches_model() {
    if !fixture::require_kernel_overlay() {
        return;
    }
    mounted_cases(
        |s| kernel_comparable(&s.normalized(true, false)),
        Checks {
            tree_every_op: false,
            stable_ino_across_remount: true,
            // Lower hard-link groups are in the scenarios; the kernel counts a partly
            // copied-up group's links through its index rather than by the names the
            // view shows, so st_nlink alone is left out. Data, which paths are one
            // file, st_ino and every errno are still compared.
            link_counts: false,
        },
        true,
        |l| {
            let k = Rc::new(RefCell::new(KernelOverlay::new(l)));
            Box::new(move || {
                k.borrow_mut().remount();
                Ok(())
            })
        },
    );
}

/// The scenario without what kernel overlayfs deliberately treats otherwise:
/// whiteouts in a directory that is not merged with one below. The kernel lists such a directory straight from its layer, whiteouts
/// included (it assumes a layer never whites out what no layer below has).
fn kernel_comparable(s: &Scenario) -> Scenario {
    let all = s.layers_top_down();
    let keep = |i: usize, l: &GeneratedLayer| GeneratedLayer {
        entries: l
            .entries
            .iter()
            .filter(|(path, e)| match e {
                LowerEntry::Whiteout(_) => {
                    let parent = path.parent();
                    parent.is_empty() || dir_layers(&all, &parent) != [i]
                }
                _ => true,
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    };
    Scenario {
        upper: keep(0, &s.upper),
        lowers: s
            .lowers
            .iter()
            .enumerate()
            .map(|(i, l)| keep(i + 1, l))
            .collect(),
    }
}

/// The layers (indices into `layers`, top-down) merged into the directory `dir`, as
/// lookup finds them.
fn dir_layers(layers: &[&GeneratedLayer], dir: &[&str]) -> Vec<usize> {
    let mut merged: Vec<usize> = (0..layers.len()).collect();
    for depth in 1..=dir.len() {
        let path = p(&dir[..depth].join("/"));
        let mut next = Vec::new();
        for &l in &merged {
            match layers[l].entries.get(&path) {
                None => continue,
                Some(LowerEntry::Dir { opaque, .. }) => {
                    next.push(l);
                    if opaque.is_some() {
                        break;
                    }
                }
                Some(_) => break,
            }
        }
        merged = next;
    }
    merged
}
