//! `stratafs volume ...` against a state directory in a tempdir (never the real
//! /var/lib/stratafs): the commands, their output, and their errors. No FUSE needed.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_stratafs");

struct State {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
}

impl State {
    fn new() -> State {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("state");
        State { _tmp: tmp, dir }
    }

    /// `stratafs volume --state-dir DIR ARGS`.
    fn run(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .arg("volume")
            .arg("--state-dir")
            .arg(&self.dir)
            .args(args)
            .env_remove("STRATAFS_STATE_DIR")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    #[track_caller]
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "volume {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A failure with exactly one `stratafs: ` stderr line containing every needle.
    #[track_caller]
    fn fails(&self, args: &[&str], needles: &[&str]) -> Output {
        let out = self.run(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "volume {args:?} should fail");
        let line = err.trim_end();
        assert!(
            line.starts_with("stratafs: ") && !line.contains('\n'),
            "{err:?}"
        );
        for n in needles {
            assert!(line.contains(n), "volume {args:?}: {line:?} lacks {n:?}");
        }
        out
    }

    /// A malformed command line: exit status 2, clap's report ending with a pointer
    /// to the `--help` of `command`.
    #[track_caller]
    fn usage_fails(&self, args: &[&str], command: &str) {
        let out = self.run(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "volume {args:?}: {err}");
        assert!(err.starts_with("stratafs: "), "{err:?}");
        let last = err.trim_end().lines().last().unwrap_or("");
        assert!(last.contains(&format!("try '{command} --help'")), "{err:?}");
    }

    fn data(&self, name: &str) -> PathBuf {
        self.dir.join("volumes").join(name).join("_data")
    }
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

#[test]
fn create_inspect_ls_rm_round_trip() {
    let s = State::new();
    assert_eq!(
        s.ok(&[
            "create",
            "web-data",
            "--size",
            "10Mi",
            "--label",
            "app=web",
            "--label",
            "tier=db",
            "--exclusive"
        ]),
        "web-data\n"
    );
    s.ok(&["create", "plain"]);
    fs::write(s.data("plain").join("f"), vec![0u8; 3000]).unwrap();

    let info = json(&s.ok(&["inspect", "web-data"]))[0].clone();
    assert_eq!(info["name"], "web-data");
    assert_eq!(info["data"], s.data("web-data").to_str().unwrap());
    assert_eq!(info["size_limit"], 10 << 20);
    assert_eq!(info["bytes_used"], 0);
    assert_eq!(info["labels"]["app"], "web");
    assert_eq!(info["labels"]["tier"], "db");
    assert_eq!(info["exclusive"], true);
    assert_eq!(info["mounts"], Value::Array(vec![]));
    assert!(info["created"].as_str().unwrap().ends_with('Z'));

    let table = s.ok(&["ls"]);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    assert!(lines[0].starts_with("NAME"), "{table}");
    assert!(
        lines[1].starts_with("plain ") && lines[1].contains("2.9KiB"),
        "{table}"
    );
    assert!(
        lines[2].starts_with("web-data ") && lines[2].contains("10.0MiB"),
        "{table}"
    );
    let all = json(&s.ok(&["ls", "--json"]));
    let names: Vec<&str> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["plain", "web-data"]);
    assert_eq!(all[0]["bytes_used"], 3000);

    assert_eq!(s.ok(&["rm", "plain", "web-data"]), "plain\nweb-data\n");
    assert!(!s.dir.join("volumes/plain").exists());
    assert_eq!(s.ok(&["ls", "--json"]).trim(), "[]");
}

#[test]
fn prune_removes_unused_volumes_and_reports_the_space() {
    let s = State::new();
    s.ok(&["create", "a"]);
    s.ok(&["create", "b"]);
    fs::write(s.data("a").join("f"), vec![1u8; 2048]).unwrap();
    let out = s.ok(&["prune", "--all", "--force"]);
    assert!(out.contains("Deleted: a (2.0KiB)"), "{out}");
    assert!(out.contains("Deleted: b (0B)"), "{out}");
    assert!(out.contains("(2048 bytes)"), "{out}");
    assert_eq!(s.ok(&["ls"]).lines().count(), 1);
}

#[test]
fn errors_name_the_problem() {
    let s = State::new();
    s.ok(&["create", "taken"]);
    s.fails(&["create", "taken"], &["taken", "already exists"]);
    for bad in ["..", ".", "a/b", "/", "-rf", "_x", ".hidden", "sp ace", "ü"] {
        s.fails(&["create", "--", bad], &["invalid volume name"]);
    }
    s.fails(&["create", ""], &["invalid volume name", "empty"]);
    s.fails(&["create", &"n".repeat(256)], &["longer than 255"]);
    s.ok(&["create", &"n".repeat(255)]);
    s.fails(&["inspect", "missing"], &["no such volume: missing"]);
    s.fails(&["rm", "missing"], &["no such volume: missing"]);
    s.fails(&["inspect", "../etc"], &["invalid volume name"]);
    s.fails(&["create", "x", "--size", "lots"], &["size", "lots"]);
    s.fails(&["create", "x", "--size", "0"], &["size"]);
    s.fails(&["create", "x", "--label", "=v"], &["label", "KEY[=VALUE]"]);
    s.fails(&["create", "x", "--size", "10Q"], &["size", "Gi"]);
    s.fails(&["ls", "--filter", "colour=red"], &["filter", "colour=red"]);
    s.fails(&["ls", "--format", "{{.Nmae}}"], &["format", "Nmae"]);
    s.usage_fails(&["frobnicate"], "stratafs volume");
    s.usage_fails(&["create", "a", "b"], "stratafs volume create");
    // Nothing was created by the failures.
    let names = json(&s.ok(&["ls", "--json"]));
    assert_eq!(names.as_array().unwrap().len(), 2);
}

#[test]
fn racing_creates_leave_exactly_one_volume() {
    let s = State::new();
    let children: Vec<_> = (0..8)
        .map(|_| {
            Command::new(BIN)
                .args(["volume", "create", "raced", "--state-dir"])
                .arg(&s.dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    let wins = children
        .into_iter()
        .map(|mut c| c.wait().unwrap().success())
        .filter(|ok| *ok)
        .count();
    assert_eq!(wins, 1);
    let entries: Vec<_> = fs::read_dir(s.dir.join("volumes"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(entries, ["raced"], "one volume, no temporaries");
}

#[test]
fn state_dir_comes_from_the_flag_or_the_environment() {
    let s = State::new();
    let env_dir = s.dir.with_file_name("from-env");
    let out = Command::new(BIN)
        .args(["volume", "create", "e"])
        .env("STRATAFS_STATE_DIR", &env_dir)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(env_dir.join("volumes/e/_data").is_dir());
    // The flag wins over the environment, and may come before the subcommand.
    let out = Command::new(BIN)
        .arg("--state-dir")
        .arg(&s.dir)
        .args(["volume", "create", "f"])
        .env("STRATAFS_STATE_DIR", &env_dir)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(s.data("f").is_dir() && !env_dir.join("volumes/f").exists());
    assert!(Path::new(&s.dir).join("volumes/f/meta.json").is_file());
}

/// Plays a live mount using `volume`: a claim record held under flock by this test
/// process, exactly as a daemon holds its own. Dropping it ends the "mount".
struct FakeUser {
    _file: fs::File,
}

impl FakeUser {
    fn new(s: &State, volume: &str, pid: u32, mountpoint: &str) -> FakeUser {
        use std::os::fd::AsRawFd;
        let dir = s.dir.join("volumes").join(volume).join("mounts");
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join(pid.to_string());
        let record = format!(
            r#"{{"pid":{pid},"mountpoint":"{mountpoint}","target":"/data","read_only":false}}"#
        );
        fs::write(&path, record).unwrap();
        let file = fs::File::open(&path).unwrap();
        // SAFETY: flock on an fd we own.
        assert_eq!(unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) }, 0);
        FakeUser { _file: file }
    }
}

#[test]
fn volumes_in_use_are_kept_unless_forced_and_dead_users_are_swept() {
    let s = State::new();
    s.ok(&["create", "busy"]);
    s.ok(&["create", "idle"]);
    let user = FakeUser::new(&s, "busy", 4242, "/containers/c1/merged");
    s.fails(
        &["rm", "busy"],
        &[
            "busy",
            "in use",
            "pid 4242 at /containers/c1/merged",
            "--force",
        ],
    );
    let out = s.ok(&["prune", "-a", "-f"]);
    assert!(
        out.contains("Deleted: idle") && !out.contains("busy"),
        "{out}"
    );
    let info = json(&s.ok(&["inspect", "busy"]))[0].clone();
    assert_eq!(info["mounts"][0]["pid"], 4242);
    assert_eq!(info["mounts"][0]["mountpoint"], "/containers/c1/merged");
    assert!(s.ok(&["ls"]).lines().nth(1).unwrap().contains("  1  "));

    // The holder is gone (its lock with it): its record no longer counts and is removed.
    drop(user);
    let info = json(&s.ok(&["inspect", "busy"]))[0].clone();
    assert_eq!(info["mounts"], Value::Array(vec![]));
    assert!(!s.dir.join("volumes/busy/mounts/4242").exists());

    let _again = FakeUser::new(&s, "busy", 4243, "/m");
    assert_eq!(s.ok(&["rm", "--force", "busy"]), "busy\n");
    assert!(!s.dir.join("volumes/busy").exists());
}

/// docker's listing flags: -q, --format (template or json), --filter; labels shown.
#[test]
fn ls_quiet_format_filter_and_labels() {
    let s = State::new();
    s.ok(&[
        "create", "web", "--label", "app=web", "--label", "public", "--size", "1Gi",
    ]);
    s.ok(&["create", "db", "--label", "app=db", "--size", "100M"]);
    s.ok(&["create", "scratch"]);
    let _user = FakeUser::new(&s, "db", 4321, "/c/db");
    assert_eq!(s.ok(&["ls", "-q"]), "db\nscratch\nweb\n");
    assert_eq!(s.ok(&["ls", "-q", "--filter", "label=app"]), "db\nweb\n");
    assert_eq!(s.ok(&["ls", "-q", "--filter", "label=app=web"]), "web\n");
    assert_eq!(s.ok(&["ls", "-q", "--filter", "label=public"]), "web\n");
    assert_eq!(s.ok(&["ls", "-q", "--filter", "name=cra"]), "scratch\n");
    assert_eq!(
        s.ok(&["ls", "-q", "--filter", "dangling=true"]),
        "scratch\nweb\n"
    );
    assert_eq!(s.ok(&["ls", "-q", "--filter", "dangling=false"]), "db\n");
    assert_eq!(
        s.ok(&[
            "ls",
            "--filter",
            "label=app",
            "--format",
            "{{.Name}}\\t{{.Size}} {{.Labels}} {{.Mounts}}"
        ]),
        "db\t95.4MiB app=db 1\nweb\t1.0GiB app=web,public 0\n"
    );
    let lines = s.ok(&["ls", "--format", "json"]);
    let names: Vec<String> = lines
        .lines()
        .map(|l| json(l)["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["db", "scratch", "web"]);
    let table = s.ok(&["ls"]);
    assert!(table.lines().next().unwrap().ends_with("LABELS"), "{table}");
    assert!(table.contains("app=web,public"), "{table}");
}

/// Sizes: Ki/Mi/Gi/Ti are powers of 1024, K/M/G/T powers of 1000 (as Kubernetes).
#[test]
fn sizes_take_binary_and_decimal_suffixes() {
    let s = State::new();
    for (size, bytes) in [
        ("1Gi", 1u64 << 30),
        ("100MB", 100_000_000),
        ("64Ki", 65536),
        ("2G", 2_000_000_000),
    ] {
        let name = format!("v{bytes}");
        s.ok(&["create", &name, "--size", size]);
        assert_eq!(
            json(&s.ok(&["inspect", &name]))[0]["size_limit"],
            bytes,
            "{size}"
        );
    }
}

/// `inspect A B` is one JSON array; `--format` gives one line per volume.
#[test]
fn inspect_prints_one_json_array_and_takes_a_format() {
    let s = State::new();
    s.ok(&["create", "a", "--label", "k"]);
    s.ok(&["create", "b"]);
    let both = json(&s.ok(&["inspect", "a", "b"]));
    let arr = both.as_array().expect("an array");
    assert_eq!(arr.len(), 2);
    assert_eq!(arr[0]["name"], "a");
    assert_eq!(arr[0]["labels"]["k"], "", "--label k is the label k, empty");
    assert_eq!(arr[1]["name"], "b");
    assert_eq!(
        s.ok(&[
            "inspect",
            "--format",
            "{{.Name}}: {{.Mountpoint}}",
            "a",
            "b"
        ]),
        format!(
            "a: {}\nb: {}\n",
            s.data("a").display(),
            s.data("b").display()
        )
    );
    let out = s.run(&["inspect", "a", "missing"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no such volume: missing"));
    let partial = json(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(partial.as_array().map(|a| a.len()), Some(1));
}

/// `volume create` without a name makes a random one, prints it, and marks the volume
/// anonymous: `prune` without `--all` takes only such volumes.
#[test]
fn create_without_a_name_and_prune_without_all() {
    let s = State::new();
    let name = s.ok(&["create"]).trim().to_string();
    assert_eq!(name.len(), 32, "{name}");
    assert!(name.bytes().all(|b| b.is_ascii_hexdigit()), "{name}");
    let other = s.ok(&["create"]).trim().to_string();
    assert_ne!(name, other);
    s.ok(&["create", "named"]);
    let out = s.ok(&["prune", "--force"]);
    assert!(out.contains(&format!("Deleted: {name}")), "{out}");
    assert!(out.contains(&format!("Deleted: {other}")), "{out}");
    assert_eq!(s.ok(&["ls", "-q"]), "named\n");
    assert!(
        s.ok(&["prune", "-f"])
            .contains("named volumes are kept without --all")
    );
    s.ok(&["create", "keep", "--label", "keep"]);
    let out = s.ok(&["prune", "-a", "-f", "--filter", "label=keep"]);
    assert!(
        out.contains("Deleted: keep") && !out.contains("named"),
        "{out}"
    );
}

/// prune asks on a terminal, and refuses without one unless forced.
#[test]
fn prune_asks_for_confirmation() {
    let s = State::new();
    s.ok(&["create", "precious"]);
    s.fails(&["prune", "--all"], &["no terminal", "--force"]);
    assert_eq!(s.ok(&["ls", "-q"]), "precious\n");
    // script(1) runs the command on a pseudo-terminal fed from our stdin.
    let prune_on_tty = |answer: &str| {
        let cmd = format!(
            "'{BIN}' volume --state-dir '{}' prune --all",
            s.dir.display()
        );
        let mut child = Command::new("script")
            .args(["-qec", &cmd, "/dev/null"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("script");
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(answer.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let said = prune_on_tty("n\n");
    assert!(
        said.contains("This will remove 1 volume(s) and their data: precious"),
        "{said}"
    );
    assert!(
        said.contains("[y/N]") && said.contains("Nothing removed"),
        "{said}"
    );
    assert_eq!(s.ok(&["ls", "-q"]), "precious\n");
    let said = prune_on_tty("y\n");
    assert!(said.contains("Deleted: precious"), "{said}");
    assert_eq!(s.ok(&["ls", "-q"]), "");
}

/// `rm -f` of a missing name is not an error; of a volume in use it says what the
/// live mounts are left with.
#[test]
fn rm_force_of_missing_and_of_busy_volumes() {
    let s = State::new();
    s.fails(&["rm", "ghost"], &["no such volume: ghost"]);
    let out = s.run(&["rm", "-f", "ghost"]);
    assert!(out.status.success() && out.stderr.is_empty(), "{out:?}");
    s.ok(&["create", "busy"]);
    let _user = FakeUser::new(&s, "busy", 4242, "/c/merged");
    let out = s.run(&["rm", "--force", "busy"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "busy\n");
    assert!(
        err.contains("warning: volume busy was in use by pid 4242 at /c/merged"),
        "{err}"
    );
    assert!(err.contains("ENOENT"), "{err}");
}

/// Kubernetes access modes: stored at create, shown by inspect/ls/--format; metadata
/// from before access modes (only `exclusive`) reads as rwo or rwx.
#[test]
fn access_modes_are_stored_and_shown_and_old_metadata_still_reads() {
    let s = State::new();
    s.ok(&["create", "pod", "--access", "rwop"]);
    s.ok(&["create", "shelf", "--access", "rox"]);
    s.ok(&["create", "once", "--exclusive"]);
    s.ok(&["create", "kube", "--access", "ReadWriteOnce"]);
    s.ok(&["create", "many"]);
    let infos = json(&s.ok(&["inspect", "pod", "shelf", "once", "kube", "many"]));
    let got: Vec<(&str, bool)> = infos
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["access"].as_str().unwrap(),
                i["exclusive"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("rwop", true),
            ("rox", false),
            ("rwo", true),
            ("rwo", true),
            ("rwx", false)
        ]
    );
    assert_eq!(
        s.ok(&["ls", "--format", "{{.Name}} {{.Access}}"]),
        "kube rwo\nmany rwx\nonce rwo\npod rwop\nshelf rox\n"
    );
    let table = s.ok(&["ls"]);
    let header = table.lines().next().unwrap();
    assert!(header.contains(" ACCESS "), "{table}");
    let pod = table.lines().find(|l| l.starts_with("pod ")).unwrap();
    assert!(pod.contains(" rwop "), "{table}");

    s.fails(
        &["create", "x", "--access", "rw"],
        &["access mode \"rw\"", "rwo", "rwop", "rox", "rwx"],
    );
    s.usage_fails(
        &["create", "x", "--exclusive", "--access", "rwx"],
        "stratafs volume create",
    );
    assert!(!s.dir.join("volumes/x").exists());

    // Metadata written before access modes: `exclusive` alone decides.
    for (name, exclusive, want) in [("old-excl", true, "rwo"), ("old-plain", false, "rwx")] {
        s.ok(&["create", name]);
        let meta = s.dir.join("volumes").join(name).join("meta.json");
        let text = format!(
            "{{\"name\":\"{name}\",\"created\":\"2026-01-01T00:00:00Z\",\"size_limit\":null,\
             \"labels\":{{}},\"exclusive\":{exclusive}}}"
        );
        fs::write(&meta, text).unwrap();
        let info = json(&s.ok(&["inspect", name]))[0].clone();
        assert_eq!(info["access"], want, "{info}");
        assert_eq!(info["exclusive"], exclusive, "{info}");
    }
}

/// `volume update NAME --size S` on a volume no mount uses: grows or shrinks the
/// limit; below the data in it is refused, naming both sizes.
#[test]
fn update_changes_the_size_limit_unless_the_data_does_not_fit() {
    let s = State::new();
    s.ok(&["create", "v", "--size", "10Ki"]);
    fs::write(s.data("v").join("f"), vec![1u8; 6000]).unwrap();
    s.fails(
        &["update", "v", "--size", "5Ki"],
        &["volume v", "5.9KiB", "6000 bytes", "5.0KiB", "5120 bytes"],
    );
    assert_eq!(json(&s.ok(&["inspect", "v"]))[0]["size_limit"], 10 << 10);
    assert_eq!(
        s.ok(&["update", "v", "--size", "6000"]),
        "v: size limit 10.0KiB -> 5.9KiB (5.9KiB used)\n"
    );
    s.ok(&["update", "v", "--size", "1Mi"]);
    assert_eq!(json(&s.ok(&["inspect", "v"]))[0]["size_limit"], 1 << 20);
    // One without a limit gets one.
    s.ok(&["create", "free"]);
    assert_eq!(
        s.ok(&["update", "free", "--size", "1G"]),
        "free: size limit none -> 953.7MiB (0B used)\n"
    );
    assert_eq!(
        json(&s.ok(&["inspect", "free"]))[0]["size_limit"],
        1_000_000_000u64
    );
    s.fails(
        &["update", "ghost", "--size", "1Gi"],
        &["no such volume: ghost"],
    );
    s.fails(&["update", "v", "--size", "0"], &["size \"0\""]);
    s.usage_fails(&["update", "v"], "stratafs volume update");
}
