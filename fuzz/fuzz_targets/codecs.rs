//! The overlay format's name and value codecs: an AUFS whiteout name always names
//! back the entry it hides, reserved names are exactly the `.wh.` namespace, only
//! "y" marks a directory opaque, only char 0/0 is a whiteout, every private xattr
//! prefix is recognised whatever follows it, and an override_stat value
//! (`uid:gid:mode[:type]`) that parses formats back to one that parses the same.
#![no_main]

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

use libfuzzer_sys::fuzz_target;
use stratafs::testing::codecs::override_stat;
use stratafs::testing::codecs::whiteout::{
    OPAQUE_MARKER, WHITEOUT_PREFIX, is_opaque_value, is_private_xattr, is_reserved_name,
    is_whiteout_stat, whiteout_name, whiteout_target,
};

fuzz_target!(|input: (&[u8], u32, u64)| {
    let (bytes, mode, rdev) = input;
    let name = OsStr::from_bytes(bytes);

    // A whiteout name is reserved, and names back what it hides unless that is itself
    // in the reserved namespace (`.wh..wh.*` is AUFS metadata, never a whiteout).
    let wh = whiteout_name(name);
    assert!(is_reserved_name(&wh));
    let target = whiteout_target(&wh);
    if bytes.is_empty() || is_reserved_name(name) {
        assert_eq!(target, None, "{wh:?}");
    } else {
        assert_eq!(target, Some(name), "{wh:?}");
    }
    // Decoding any name: a target exists only under the prefix, and re-encoding it
    // gives the name back.
    if let Some(t) = whiteout_target(name) {
        assert!(bytes.starts_with(WHITEOUT_PREFIX));
        assert_eq!(whiteout_name(t).as_bytes(), bytes);
        assert!(!t.is_empty() && !is_reserved_name(t));
    }
    assert_eq!(is_reserved_name(name), bytes.starts_with(WHITEOUT_PREFIX));
    assert!(whiteout_target(OsStr::new(OPAQUE_MARKER)).is_none());

    assert_eq!(is_opaque_value(bytes), bytes == b"y");
    assert_eq!(
        is_whiteout_stat(mode, rdev),
        mode & S_IFMT == S_IFCHR && rdev == 0
    );

    for prefix in [
        "trusted.overlay.",
        "user.overlay.",
        "user.fuseoverlayfs.",
        "user.stratafs.",
    ] {
        let mut full = prefix.as_bytes().to_vec();
        full.extend_from_slice(bytes);
        assert!(is_private_xattr(OsStr::from_bytes(&full)));
    }
    if bytes.starts_with(b"user.")
        && !bytes.starts_with(b"user.overlay.")
        && !bytes.starts_with(b"user.fuseoverlayfs.")
        && !bytes.starts_with(b"user.stratafs.")
        && !bytes.starts_with(b"user.containers.override_stat")
    {
        assert!(!is_private_xattr(name), "{name:?}");
    }
    // Every override xattr name is private (never shown through the mount).
    if override_stat::is_override_name(bytes) {
        assert!(is_private_xattr(name), "{name:?}");
    }

    if let Ok(parsed) = override_stat::parse(bytes) {
        let text = override_stat::format(&parsed);
        let again = override_stat::parse(text.as_bytes())
            .unwrap_or_else(|e| panic!("{text:?} (from {bytes:?}) does not parse: {e}"));
        assert_eq!(again, parsed, "{text:?}");
    }
});

/// File type bits of st_mode (stat(2)); spelled out to keep libc out of this crate.
const S_IFMT: u32 = 0o170000;
const S_IFCHR: u32 = 0o020000;
