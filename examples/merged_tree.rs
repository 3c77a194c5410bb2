//! Prints the merged view of some layers without mounting anything: the union engine
//! is a library.
//!
//! Usage: cargo run --example merged_tree -- TOP_LAYER [LOWER_LAYER...]

use std::ffi::OsStr;
use std::path::PathBuf;

use stratafs::MountConfig;
use stratafs::union::{Ino, ROOT_INO, Union};

fn print_dir(u: &Union, ino: Ino, prefix: &str) -> Result<(), String> {
    let fh = u
        .opendir(ino)
        .map_err(|e| format!("opendir {prefix}: {e}"))?;
    let entries = u
        .readdir(fh, 0)
        .map_err(|e| format!("readdir {prefix}: {e}"))?;
    u.releasedir(fh);
    for e in entries.iter().filter(|e| e.name != "." && e.name != "..") {
        let path = format!("{prefix}/{}", e.name.to_string_lossy());
        let entry = u
            .lookup(ino, OsStr::new(&e.name))
            .map_err(|err| format!("{path}: {err}"))?;
        let kind = entry.attr.kind();
        println!(
            "{:o} {:>8} {path}",
            entry.attr.mode & 0o7777,
            entry.attr.size
        );
        if kind == libc::S_IFDIR {
            print_dir(u, entry.attr.ino, &path)?;
        }
        u.forget(entry.attr.ino, 1);
    }
    Ok(())
}

fn main() {
    let layers: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    if layers.is_empty() {
        eprintln!("usage: merged_tree TOP_LAYER [LOWER_LAYER...]");
        std::process::exit(2);
    }
    // No upper layer: a read-only union, nothing on disk changes.
    let config = MountConfig::new(layers, PathBuf::from("/"));
    let result = Union::new(&config).and_then(|u| print_dir(&u, ROOT_INO, ""));
    if let Err(e) = result {
        eprintln!("merged_tree: {e}");
        std::process::exit(1);
    }
}
