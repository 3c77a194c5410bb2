//! Generated lower layers: the starting point of every model run. A layer may hold
//! files (some with an xattr, some hard-linked), directories (some opaque), symlinks
//! and whiteouts, in both on-disk formats the engine reads:
//! whiteouts as char 0/0 or `.wh.NAME`, opaque directories as
//! `trusted.overlay.opaque=y` or a `.wh..wh..opq` entry.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;

use arbitrary::{Arbitrary, Unstructured};
use proptest::prelude::*;

use super::ops::{self, RelPath};
use crate::union::whiteout::{OPAQUE_MARKER, whiteout_name};

/// How a whiteout is written in a layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Arbitrary)]
pub enum WhiteoutFormat {
    /// A char device 0/0 at the name (the kernel's format; needs root to make).
    CharDevice,
    /// An empty `.wh.NAME` beside the name (AUFS / OCI layers, as containers/storage
    /// extracts layers rootless).
    Aufs,
}

/// How a directory is marked opaque in a layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpaqueFormat {
    /// `trusted.overlay.opaque=y` (the kernel's format; needs root to set).
    TrustedXattr,
    /// `user.overlay.opaque=y` (kernel overlayfs mounted `userxattr`).
    UserXattr,
    /// A `.wh..wh..opq` entry in the directory (AUFS / OCI layers).
    Aufs,
}

/// The opaque formats generated layers use. Not [`OpaqueFormat::UserXattr`]: with it
/// the same fuzz input or proptest seed would decode to another scenario than before
/// it existed, and the engine reads it through the same code path as the trusted
/// one. Hand-written fixture layers test it.
pub const GENERATED_OPAQUE_FORMATS: [OpaqueFormat; 2] =
    [OpaqueFormat::TrustedXattr, OpaqueFormat::Aufs];

impl<'a> Arbitrary<'a> for OpaqueFormat {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        // The derive's own variant choice (multiply and shift over a u32), so that an
        // input picks the format the derived two-variant enum picked.
        let n = GENERATED_OPAQUE_FORMATS.len() as u64;
        let i = (u64::from(u32::arbitrary(u)?) * n) >> 32;
        Ok(GENERATED_OPAQUE_FORMATS[i as usize])
    }

    fn size_hint(depth: usize) -> (usize, Option<usize>) {
        u32::size_hint(depth)
    }
}

/// Writes a whiteout hiding `hidden` (the path of the name it hides).
pub fn write_whiteout(hidden: &Path, format: WhiteoutFormat) -> io::Result<()> {
    match format {
        // Mode 0, as the kernel makes its own whiteouts.
        WhiteoutFormat::CharDevice => rustix::fs::mknodat(
            rustix::fs::CWD,
            hidden,
            rustix::fs::FileType::CharacterDevice,
            rustix::fs::Mode::empty(),
            0,
        )
        .map_err(io::Error::from),
        WhiteoutFormat::Aufs => {
            let name = hidden.file_name().ok_or(io::ErrorKind::InvalidInput)?;
            fs::write(hidden.with_file_name(whiteout_name(name)), b"")
        }
    }
}

/// Marks the existing directory `dir` opaque.
pub fn mark_opaque(dir: &Path, format: OpaqueFormat) -> io::Result<()> {
    match format {
        OpaqueFormat::TrustedXattr => set_xattr(dir, "trusted.overlay.opaque", b"y"),
        OpaqueFormat::UserXattr => set_xattr(dir, "user.overlay.opaque", b"y"),
        OpaqueFormat::Aufs => fs::write(dir.join(OPAQUE_MARKER), b""),
    }
}

/// One entry of a lower layer. `u8` fields index the tables of [`ops`].
#[derive(Debug, Clone, PartialEq, Eq, Arbitrary)]
pub enum LowerEntry {
    File {
        len: u8,
        byte: u8,
        mode: u8,
        xattr: Option<u8>,
    },
    Dir {
        mode: u8,
        opaque: Option<OpaqueFormat>,
        xattr: Option<u8>,
    },
    Whiteout(WhiteoutFormat),
    Symlink {
        target: u8,
    },
    /// Another name of the file at `to` in the same layer.
    HardLink {
        to: RelPath,
    },
}

/// The file content a `File` entry has: `len % 12` copies of a letter.
pub fn file_data(len: u8, byte: u8) -> Vec<u8> {
    vec![b'A' + byte % 26; (len % 12) as usize]
}

/// One generated layer (a lower, or the upper's starting content) over the name
/// alphabet of [`ops`]: entries by path, each marker in its own format. Parents missing from the map are plain
/// directories; an entry under a non-directory is dropped (see [`Scenario::normalized`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GeneratedLayer {
    pub entries: BTreeMap<RelPath, LowerEntry>,
}

/// The layers one run starts from: lowers top-most first, and what the upper layer
/// already holds (as after an earlier session: files, whiteouts, opaque dirs).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Scenario {
    pub lowers: Vec<GeneratedLayer>,
    pub upper: GeneratedLayer,
}

pub const MAX_LOWERS: usize = 3;
pub const MAX_ENTRIES: usize = 12;

impl<'a> Arbitrary<'a> for GeneratedLayer {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        let n = u.int_in_range(0..=MAX_ENTRIES)?;
        let mut entries = BTreeMap::new();
        for _ in 0..n {
            entries.insert(RelPath::arbitrary(u)?, LowerEntry::arbitrary(u)?);
        }
        Ok(GeneratedLayer { entries })
    }
}

impl<'a> Arbitrary<'a> for Scenario {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        let n = u.int_in_range(1..=MAX_LOWERS)?;
        let mut lowers = Vec::with_capacity(n);
        for _ in 0..n {
            lowers.push(GeneratedLayer::arbitrary(u)?);
        }
        let upper = if u.ratio(1, 3)? {
            GeneratedLayer::arbitrary(u)?
        } else {
            GeneratedLayer::default()
        };
        Ok(Scenario { lowers, upper })
    }
}

fn whiteout_format() -> impl Strategy<Value = WhiteoutFormat> {
    prop_oneof![Just(WhiteoutFormat::CharDevice), Just(WhiteoutFormat::Aufs)]
}

fn opaque_format() -> impl Strategy<Value = OpaqueFormat> {
    // GENERATED_OPAQUE_FORMATS, spelled as before so that seeds keep their meaning.
    prop_oneof![Just(OpaqueFormat::TrustedXattr), Just(OpaqueFormat::Aufs)]
}

fn lower_entry() -> impl Strategy<Value = LowerEntry> {
    prop_oneof![
        4 => (any::<u8>(), any::<u8>(), any::<u8>(), prop::option::weighted(0.3, any::<u8>()))
            .prop_map(|(len, byte, mode, xattr)| LowerEntry::File { len, byte, mode, xattr }),
        4 => (any::<u8>(), prop::option::weighted(0.3, opaque_format()),
              prop::option::weighted(0.2, any::<u8>()))
            .prop_map(|(mode, opaque, xattr)| LowerEntry::Dir { mode, opaque, xattr }),
        2 => whiteout_format().prop_map(LowerEntry::Whiteout),
        1 => any::<u8>().prop_map(|target| LowerEntry::Symlink { target }),
        1 => ops::rel_path().prop_map(|to| LowerEntry::HardLink { to }),
    ]
}

fn layer_spec() -> impl Strategy<Value = GeneratedLayer> {
    prop::collection::btree_map(ops::rel_path(), lower_entry(), 0..=MAX_ENTRIES)
        .prop_map(|entries| GeneratedLayer { entries })
}

/// One to three lower layers; an upper that starts empty two times in three.
pub fn scenario() -> impl Strategy<Value = Scenario> {
    let upper = prop_oneof![2 => Just(GeneratedLayer::default()), 1 => layer_spec()];
    (prop::collection::vec(layer_spec(), 1..=MAX_LOWERS), upper)
        .prop_map(|(lowers, upper)| Scenario { lowers, upper })
}

impl Scenario {
    /// The same layers with every entry that cannot be built dropped: entries under a
    /// non-directory, hard links to anything but an earlier file of the same layer.
    /// Missing parents become explicit plain directories. With `native_only`,
    /// AUFS-format markers become the kernel's (for a kernel overlayfs oracle, which
    /// reads only those); with `rootless`, the reverse (a non-root runner can make
    /// neither char 0/0 nor trusted.* xattrs).
    pub fn normalized(&self, native_only: bool, rootless: bool) -> Scenario {
        let lowers = self
            .lowers
            .iter()
            .map(|layer| normalize_layer(layer, native_only, rootless))
            .collect();
        let upper = normalize_layer(&self.upper, native_only, rootless);
        Scenario { lowers, upper }
    }

    /// Every layer top-down: the upper (index 0), then the lowers.
    pub fn layers_top_down(&self) -> Vec<&GeneratedLayer> {
        std::iter::once(&self.upper).chain(&self.lowers).collect()
    }

    /// Writes lower `i` under `dir` (which must exist and be empty).
    pub fn build_layer(&self, i: usize, dir: &Path) -> io::Result<()> {
        match self.lowers.get(i) {
            Some(layer) => layer.build(dir),
            None => Ok(()),
        }
    }

    /// Writes the upper layer's initial content under `dir`.
    pub fn build_upper(&self, dir: &Path) -> io::Result<()> {
        self.upper.build(dir)
    }
}

impl GeneratedLayer {
    /// Writes the layer under `dir` (which must exist and be empty).
    pub fn build(&self, dir: &Path) -> io::Result<()> {
        let layer = self;
        for (path, entry) in &layer.entries {
            build_entry(dir, path, entry)?;
        }
        // Modes last: a directory without write permission must still get its entries.
        for (path, entry) in &layer.entries {
            let target = dir.join(path.to_path_string());
            match entry {
                LowerEntry::File { mode, .. } => set_mode(&target, ops::file_mode_of(*mode))?,
                LowerEntry::Dir { mode, .. } => set_mode(&target, ops::mode_of(*mode))?,
                _ => {}
            }
        }
        Ok(())
    }
}

fn normalize_layer(layer: &GeneratedLayer, native_only: bool, rootless: bool) -> GeneratedLayer {
    let mut out: BTreeMap<RelPath, LowerEntry> = BTreeMap::new();
    // BTreeMap order puts a parent before its children.
    for (path, entry) in &layer.entries {
        if !ensure_parents(&mut out, path) {
            continue;
        }
        let entry = match entry {
            LowerEntry::HardLink { to } => match out.get(to) {
                Some(LowerEntry::File { .. }) if to < path => entry.clone(),
                _ => continue,
            },
            LowerEntry::Whiteout(_) if native_only && !rootless => {
                LowerEntry::Whiteout(WhiteoutFormat::CharDevice)
            }
            LowerEntry::Whiteout(_) if rootless => LowerEntry::Whiteout(WhiteoutFormat::Aufs),
            LowerEntry::Dir {
                mode,
                opaque: Some(_),
                xattr,
            } if native_only || rootless => LowerEntry::Dir {
                mode: *mode,
                opaque: Some(if rootless {
                    OpaqueFormat::Aufs
                } else {
                    OpaqueFormat::TrustedXattr
                }),
                xattr: *xattr,
            },
            other => other.clone(),
        };
        out.insert(path.clone(), entry);
    }
    GeneratedLayer { entries: out }
}

/// Makes every proper ancestor of `path` a directory in `out`; false when one is
/// already something else (the entry cannot exist in this layer).
fn ensure_parents(out: &mut BTreeMap<RelPath, LowerEntry>, path: &RelPath) -> bool {
    let idx: Vec<u8> = path_indices(path);
    for d in 1..idx.len() {
        let Some(anc) = RelPath::from_indices(&idx[..d]) else {
            return false;
        };
        match out.get(&anc) {
            Some(LowerEntry::Dir { .. }) => {}
            Some(_) => return false,
            None => {
                out.insert(
                    anc,
                    LowerEntry::Dir {
                        mode: 0,
                        opaque: None,
                        xattr: None,
                    },
                );
            }
        }
    }
    true
}

fn path_indices(path: &RelPath) -> Vec<u8> {
    path.components()
        .map(|c| ops::NAMES.iter().position(|n| *n == c).unwrap_or(0) as u8)
        .collect()
}

fn set_mode(path: &Path, mode: u32) -> io::Result<()> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
}

fn set_xattr(path: &Path, name: &str, value: &[u8]) -> io::Result<()> {
    rustix::fs::lsetxattr(path, name, value, rustix::fs::XattrFlags::empty())
        .map_err(io::Error::from)
}

fn build_entry(root: &Path, path: &RelPath, entry: &LowerEntry) -> io::Result<()> {
    let target = root.join(path.to_path_string());
    match entry {
        LowerEntry::File {
            len, byte, xattr, ..
        } => {
            fs::write(&target, file_data(*len, *byte))?;
            if let Some(v) = xattr {
                set_xattr(&target, ops::xattr_name_of(*v), ops::xattr_value_of(*v))?;
            }
        }
        LowerEntry::Dir { opaque, xattr, .. } => {
            fs::create_dir(&target)?;
            if let Some(format) = opaque {
                mark_opaque(&target, *format)?;
            }
            if let Some(v) = xattr {
                set_xattr(&target, ops::xattr_name_of(*v), ops::xattr_value_of(*v))?;
            }
        }
        LowerEntry::Whiteout(format) => write_whiteout(&target, *format)?,
        LowerEntry::Symlink { target: t } => symlink(ops::symlink_target_of(*t), &target)?,
        LowerEntry::HardLink { to } => fs::hard_link(root.join(to.to_path_string()), &target)?,
    }
    Ok(())
}
