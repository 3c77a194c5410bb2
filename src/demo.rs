//! `stratafs demo`: a two-layer sample image, mounted, with a copy-up and a whiteout
//! shown as they happen; the mount stays up for exploring until Ctrl-C.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::sys::process;

/// Builds the sample image: a base layer and an app layer that overrides and deletes.
fn build_layers(root: &Path) -> std::io::Result<()> {
    let base = root.join("layers/base");
    let app = root.join("layers/app");
    for d in [
        base.join("etc"),
        base.join("usr/share/doc"),
        base.join("var/log"),
        app.join("etc"),
        app.join("srv/www"),
        root.join("upper"),
        root.join("work"),
        root.join("merged"),
    ] {
        fs::create_dir_all(d)?;
    }
    fs::write(base.join("etc/hostname"), "base-image\n")?;
    fs::write(base.join("etc/motd"), "Welcome to the base layer.\n")?;
    fs::write(
        base.join("usr/share/doc/README"),
        "documentation from the base layer\n",
    )?;
    fs::write(base.join("var/log/old.log"), "stale log line\n")?;
    fs::write(app.join("etc/hostname"), "app-image\n")?;
    fs::write(
        app.join("srv/www/index.html"),
        "<h1>served from the app layer</h1>\n",
    )?;
    // The app layer deletes the base layer's old log (AUFS-format whiteout, as
    // container images carry them).
    fs::create_dir_all(app.join("var/log"))?;
    fs::write(app.join("var/log/.wh.old.log"), "")?;
    fs::set_permissions(
        app.join("srv/www/index.html"),
        fs::Permissions::from_mode(0o644),
    )?;
    Ok(())
}

fn tree(title: &str, dir: &Path) {
    println!("--- {title} ({})", dir.display());
    let mut lines = Vec::new();
    walk(dir, dir, &mut lines);
    if lines.is_empty() {
        println!("    (empty)");
    }
    for l in lines {
        println!("    {l}");
    }
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    let mut entries: Vec<_> = rd.filter_map(Result::ok).collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let path = e.path();
        let rel = path
            .strip_prefix(root)
            .unwrap_or(&path)
            .display()
            .to_string();
        let Ok(md) = fs::symlink_metadata(&path) else {
            continue;
        };
        let ft = md.file_type();
        if ft.is_dir() {
            out.push(format!("{rel}/"));
            walk(root, &path, out);
        } else if md.mode() & libc::S_IFMT == libc::S_IFCHR && md.rdev() == 0 {
            out.push(format!("{rel}  [whiteout: char device 0/0]"));
        } else {
            let content = fs::read_to_string(&path).unwrap_or_default();
            out.push(format!("{rel}  {:?}", content.trim_end()));
        }
    }
}

fn wait_mounted(mnt: &Path, child: &mut Child) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if process::fs_magic(mnt).ok() == Some(process::FUSE_SUPER_MAGIC) {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("the mount process exited early ({status})"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err("the mount did not come up within 15 s".into())
}

pub fn run() -> i32 {
    match demo() {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("stratafs demo: {e}");
            1
        }
    }
}

fn demo() -> Result<(), String> {
    let scratch = tempfile::Builder::new()
        .prefix("stratafs-demo-")
        .tempdir()
        .map_err(|e| format!("cannot create a scratch directory: {e}"))?;
    let root = scratch.path();
    build_layers(root).map_err(|e| format!("cannot build the sample layers: {e}"))?;
    let merged = root.join("merged");
    let exe = std::env::current_exe().map_err(|e| format!("cannot find myself: {e}"))?;
    let opts = format!(
        "lowerdir={}:{},upperdir={},workdir={}",
        root.join("layers/app").display(),
        root.join("layers/base").display(),
        root.join("upper").display(),
        root.join("work").display()
    );
    // Ctrl-C (or SIGTERM) from here on is a request to unmount and clean up, taken
    // below in order; the daemon runs in a process group of its own so the
    // terminal's SIGINT does not reach it and make it unmount behind our back.
    process::block_termination_signals();
    println!("stratafs demo: mounting a two-layer image");
    println!("  {} -f -o {opts} {}", exe.display(), merged.display());
    let mut child = Command::new(&exe)
        .args(["-f", "-o", &opts])
        .arg(&merged)
        .stdin(Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot start the mount: {e}"))?;
    if let Err(e) = wait_mounted(&merged, &mut child) {
        let _ = child.kill();
        let _ = child.wait();
        return Err(e);
    }
    let result = show(root, &merged);
    if result.is_ok() && std::env::var_os("STRATAFS_DEMO_NONINTERACTIVE").is_none() {
        println!();
        println!(
            "The mount stays up at {} — explore it from another shell.",
            merged.display()
        );
        println!("Press Ctrl-C to unmount and clean up.");
        let _ = std::io::stdout().flush();
        process::wait_for_termination_signal();
        println!();
    }
    println!("unmounting {}", merged.display());
    // A shell left inside the mount keeps it busy: detach it then (and say so) rather
    // than leave it behind.
    crate::fuse::unmount(&merged, true);
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if let Ok(None) = child.try_wait() {
        let _ = child.kill();
        let _ = child.wait();
    }
    result
}

fn show(root: &Path, merged: &Path) -> Result<(), String> {
    let io = |e: std::io::Error| format!("demo step failed: {e}");
    tree("lower layer 'app' (top)", &root.join("layers/app"));
    tree("lower layer 'base'", &root.join("layers/base"));
    tree(
        "merged view: app's hostname wins, old.log is whited out",
        merged,
    );
    tree("upper dir before any write", &root.join("upper"));

    println!("\n>>> echo 'edited through the mount' >> merged/etc/motd   (copy-up)");
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(merged.join("etc/motd"))
        .map_err(io)?;
    f.write_all(b"edited through the mount\n").map_err(io)?;
    drop(f);
    println!(">>> rm merged/usr/share/doc/README   (whiteout)");
    fs::remove_file(merged.join("usr/share/doc/README")).map_err(io)?;

    tree(
        "upper dir after: the copied-up motd and a whiteout for README",
        &root.join("upper"),
    );
    tree("merged view after", merged);
    tree("lower layer 'base' is untouched", &root.join("layers/base"));
    Ok(())
}
