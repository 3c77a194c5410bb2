//! Prints the merged view of some layers without mounting anything: the union engine
//! is a library. Uses only the public API (`stratafs::Engine`).
//!
//! Usage: cargo run --example merged_tree -- TOP_LAYER [LOWER_LAYER...]

use std::path::{Path, PathBuf};

use stratafs::{Engine, Node};

/// Prints `dir`'s entries and, depth first, those of its subdirectories. The depth
/// is the tree's: a listing can only name what the layers hold.
fn print_dir(dir: &Node<'_>, prefix: &Path) -> Result<(), stratafs::Error> {
    for entry in dir.read_dir()? {
        let path = prefix.join(&entry.name);
        let node = dir.lookup(&entry.name)?;
        let attr = node.attr()?;
        println!(
            "{:o} {:>8} {}",
            attr.mode & 0o7777,
            attr.size,
            path.display()
        );
        if attr.kind() == libc::S_IFDIR {
            print_dir(&node, &path)?;
        }
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
    let engine = match Engine::builder(layers).open() {
        Ok(engine) => engine,
        Err(e) => {
            eprintln!("merged_tree: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = print_dir(&engine.root(), Path::new("/")) {
        eprintln!("merged_tree: {e}");
        std::process::exit(1);
    }
}
