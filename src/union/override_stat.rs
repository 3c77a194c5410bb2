//! The value of the `override_stat` xattrs (fuse-overlayfs, containers/storage): the
//! owner, permission bits and, optionally, the type of an entry that an unprivileged
//! writer could not give the real inode. Pure codec, no I/O (fuzzed).
//!
//! Format: `UID:GID:MODE[:TYPE]` — UID and GID decimal, MODE octal permission bits
//! (set-ID and sticky included, a leading `0` allowed), TYPE one of `file`, `dir`,
//! `symlink`, `pipe`, `socket`, `block-MAJ-MIN`, `char-MAJ-MIN`. fuse-overlayfs writes
//! the first three fields only, and for files MODE carries the S_IFMT bits too
//! (1.10 writes `0:0:104755`); containers/storage writes all four with a 4-digit
//! mode (`0:0:0755:dir`), which is what `format` produces. Device types may carry
//! further `-` parts (ignored, as containers/storage ignores them).

use std::fmt;

/// xattr names, in the order a reader prefers them. `xattr_permissions=1` writes the
/// first, `=2` the second; the third is what older fuse-overlayfs releases wrote.
pub const PRIVILEGED_NAME: &str = "security.fuseoverlayfs.override_stat";
pub const CONTAINERS_NAME: &str = "user.containers.override_stat";
pub const LEGACY_NAME: &str = "user.fuseoverlayfs.override_stat";
pub const NAMES: [&str; 3] = [PRIVILEGED_NAME, CONTAINERS_NAME, LEGACY_NAME];

/// Whether `name` is one of the override xattrs.
pub fn is_override_name(name: &[u8]) -> bool {
    NAMES.iter().any(|n| n.as_bytes() == name)
}

/// The recorded type of an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Pipe,
    Socket,
    Block { major: u32, minor: u32 },
    Char { major: u32, minor: u32 },
}

impl Kind {
    /// The S_IFMT bits of this type.
    pub fn format_bits(&self) -> u32 {
        match self {
            Kind::File => libc::S_IFREG,
            Kind::Dir => libc::S_IFDIR,
            Kind::Symlink => libc::S_IFLNK,
            Kind::Pipe => libc::S_IFIFO,
            Kind::Socket => libc::S_IFSOCK,
            Kind::Block { .. } => libc::S_IFBLK,
            Kind::Char { .. } => libc::S_IFCHR,
        }
    }

    /// The type of an st_mode/st_rdev pair; `None` for an unknown S_IFMT value.
    pub fn from_mode(mode: u32, rdev: u64) -> Option<Kind> {
        let (major, minor) = (libc::major(rdev), libc::minor(rdev));
        Some(match mode & libc::S_IFMT {
            libc::S_IFREG => Kind::File,
            libc::S_IFDIR => Kind::Dir,
            libc::S_IFLNK => Kind::Symlink,
            libc::S_IFIFO => Kind::Pipe,
            libc::S_IFSOCK => Kind::Socket,
            libc::S_IFBLK => Kind::Block { major, minor },
            libc::S_IFCHR => Kind::Char { major, minor },
            _ => return None,
        })
    }

    /// st_rdev of a device type, 0 otherwise.
    pub fn rdev(&self) -> u64 {
        match *self {
            Kind::Block { major, minor } | Kind::Char { major, minor } => {
                libc::makedev(major, minor)
            }
            _ => 0,
        }
    }
}

/// One decoded value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverrideStat {
    pub uid: u32,
    pub gid: u32,
    /// Permission, set-ID and sticky bits (at most 0o7777).
    pub mode: u32,
    pub kind: Option<Kind>,
}

/// Why a value was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError(pub String);

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn err<T>(what: impl Into<String>) -> Result<T, ParseError> {
    Err(ParseError(what.into()))
}

fn decimal(field: &str, what: &str) -> Result<u32, ParseError> {
    if field.is_empty() || !field.bytes().all(|b| b.is_ascii_digit()) {
        return err(format!("{what} {field:?} is not a decimal number"));
    }
    field
        .parse()
        .or_else(|_| err(format!("{what} {field:?} is out of range")))
}

fn device(rest: &str, what: &str) -> Result<(u32, u32), ParseError> {
    let mut parts = rest.split('-');
    match (parts.next(), parts.next()) {
        (Some(major), Some(minor)) => Ok((
            decimal(major, &format!("{what} major"))?,
            decimal(minor, &format!("{what} minor"))?,
        )),
        _ => err(format!("{what} device {rest:?} lacks MAJOR-MINOR")),
    }
}

fn kind(field: &str) -> Result<Kind, ParseError> {
    Ok(match field {
        "file" => Kind::File,
        "dir" => Kind::Dir,
        "symlink" => Kind::Symlink,
        "pipe" => Kind::Pipe,
        "socket" => Kind::Socket,
        _ => {
            if let Some(rest) = field.strip_prefix("block-") {
                let (major, minor) = device(rest, "block")?;
                Kind::Block { major, minor }
            } else if let Some(rest) = field.strip_prefix("char-") {
                let (major, minor) = device(rest, "char")?;
                Kind::Char { major, minor }
            } else {
                return err(format!("unknown type {field:?}"));
            }
        }
    })
}

/// Decodes a value. A trailing NUL (some writers count it) is ignored.
pub fn parse(value: &[u8]) -> Result<OverrideStat, ParseError> {
    let value = value.strip_suffix(b"\0").unwrap_or(value);
    let Ok(text) = std::str::from_utf8(value) else {
        return err("not UTF-8");
    };
    let fields: Vec<&str> = text.split(':').collect();
    if fields.len() < 3 || fields.len() > 4 {
        return err(format!(
            "{text:?}: expected UID:GID:MODE[:TYPE], found {} fields",
            fields.len()
        ));
    }
    let uid = decimal(fields[0], "uid")?;
    let gid = decimal(fields[1], "gid")?;
    let mode_field = fields[2];
    if mode_field.is_empty() || !mode_field.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
        return err(format!("mode {mode_field:?} is not an octal number"));
    }
    let full = match u32::from_str_radix(mode_field, 8) {
        Ok(m) if m <= 0o177777 => m,
        _ => return err(format!("mode {mode_field:?} has bits beyond 0177777")),
    };
    // Type bits inside MODE (fuse-overlayfs) name the type when no TYPE field does.
    let mode_kind = match full & libc::S_IFMT {
        0 => None,
        bits => match Kind::from_mode(bits, 0) {
            Some(k @ (Kind::Char { .. } | Kind::Block { .. })) => {
                return err(format!(
                    "mode {mode_field:?} names a {k:?} without MAJOR-MINOR"
                ));
            }
            Some(k) => Some(k),
            None => return err(format!("mode {mode_field:?} has an unknown file type")),
        },
    };
    let kind = match fields.get(3) {
        Some(t) => Some(kind(t)?),
        None => mode_kind,
    };
    Ok(OverrideStat {
        uid,
        gid,
        mode: full & 0o7777,
        kind,
    })
}

/// Encodes a value in the containers/storage form (readable by fuse-overlayfs too,
/// which stops after MODE).
pub fn format(st: &OverrideStat) -> String {
    let mut out = format!("{}:{}:{:04o}", st.uid, st.gid, st.mode & 0o7777);
    if let Some(k) = st.kind {
        out.push(':');
        match k {
            Kind::File => out.push_str("file"),
            Kind::Dir => out.push_str("dir"),
            Kind::Symlink => out.push_str("symlink"),
            Kind::Pipe => out.push_str("pipe"),
            Kind::Socket => out.push_str("socket"),
            Kind::Block { major, minor } => out.push_str(&format!("block-{major}-{minor}")),
            Kind::Char { major, minor } => out.push_str(&format!("char-{major}-{minor}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> OverrideStat {
        parse(s.as_bytes()).unwrap_or_else(|e| panic!("{s:?}: {e}"))
    }

    #[test]
    fn reads_what_fuse_overlayfs_writes() {
        // fuse-overlayfs: "%d:%d:%o", no type, no leading zero.
        assert_eq!(
            ok("0:0:4755"),
            OverrideStat {
                uid: 0,
                gid: 0,
                mode: 0o4755,
                kind: None
            }
        );
        assert_eq!(ok("1000:100:644").mode, 0o644);
        // fuse-overlayfs 1.10 puts the type bits into MODE.
        assert_eq!(
            ok("0:0:104755"),
            OverrideStat {
                uid: 0,
                gid: 0,
                mode: 0o4755,
                kind: Some(Kind::File)
            }
        );
        assert_eq!(ok("0:0:40755").kind, Some(Kind::Dir));
    }

    #[test]
    fn reads_what_containers_storage_writes() {
        let st = ok("0:0:0755:dir");
        assert_eq!((st.uid, st.gid, st.mode), (0, 0, 0o755));
        assert_eq!(st.kind, Some(Kind::Dir));
        assert_eq!(
            ok("5:6:0666:char-1-3").kind,
            Some(Kind::Char { major: 1, minor: 3 })
        );
        assert_eq!(
            ok("0:6:0660:block-8-0").kind,
            Some(Kind::Block { major: 8, minor: 0 })
        );
        // Extra device parts are tolerated, for forward compatibility.
        assert_eq!(
            ok("0:0:0600:char-4-1-extra").kind,
            Some(Kind::Char { major: 4, minor: 1 })
        );
        for (t, k) in [
            ("file", Kind::File),
            ("symlink", Kind::Symlink),
            ("pipe", Kind::Pipe),
            ("socket", Kind::Socket),
        ] {
            assert_eq!(ok(&format!("1:2:0644:{t}")).kind, Some(k));
        }
        assert_eq!(ok("1:2:0644\0").mode, 0o644, "a trailing NUL is ignored");
    }

    #[test]
    fn refuses_malformed_values() {
        for bad in [
            "",
            "0:0",
            "0:0:",
            ":0:0644",
            "0::0644",
            "a:0:0644",
            "-1:0:0644",
            "0:0:0648",
            "0:0:200000",
            "0:0:170644",
            "0:0:20644",
            "0:0:0644:door",
            "0:0:0644:char-1",
            "0:0:0644:char-x-1",
            "0:0:0644:file:more",
            "4294967296:0:0644",
            "0:0:0644:block-4294967296-0",
        ] {
            assert!(parse(bad.as_bytes()).is_err(), "{bad:?} was accepted");
        }
        assert!(parse(b"0:0:\xff").is_err());
    }

    #[test]
    fn format_round_trips() {
        for st in [
            OverrideStat {
                uid: 0,
                gid: 0,
                mode: 0o4755,
                kind: Some(Kind::File),
            },
            OverrideStat {
                uid: 4294967295,
                gid: 7,
                mode: 0o1777,
                kind: Some(Kind::Dir),
            },
            OverrideStat {
                uid: 1,
                gid: 2,
                mode: 0o600,
                kind: Some(Kind::Char { major: 1, minor: 3 }),
            },
            OverrideStat {
                uid: 1,
                gid: 2,
                mode: 0o640,
                kind: Some(Kind::Block {
                    major: 259,
                    minor: 1,
                }),
            },
            OverrideStat {
                uid: 3,
                gid: 3,
                mode: 0,
                kind: None,
            },
        ] {
            assert_eq!(parse(format(&st).as_bytes()), Ok(st));
        }
        assert_eq!(
            format(&OverrideStat {
                uid: 0,
                gid: 0,
                mode: 0o755,
                kind: Some(Kind::Dir)
            }),
            "0:0:0755:dir"
        );
    }

    #[test]
    fn kinds_match_mode_bits() {
        for (mode, rdev) in [
            (libc::S_IFREG, 0),
            (libc::S_IFDIR, 0),
            (libc::S_IFLNK, 0),
            (libc::S_IFIFO, 0),
            (libc::S_IFSOCK, 0),
            (libc::S_IFCHR, libc::makedev(1, 3)),
            (libc::S_IFBLK, libc::makedev(8, 16)),
        ] {
            let k = Kind::from_mode(mode | 0o644, rdev).expect("known type");
            assert_eq!(k.format_bits(), mode);
            assert_eq!(k.rdev(), rdev);
        }
        assert_eq!(Kind::from_mode(0, 0), None);
        assert!(is_override_name(CONTAINERS_NAME.as_bytes()));
        assert!(!is_override_name(b"user.containers.other"));
    }
}
