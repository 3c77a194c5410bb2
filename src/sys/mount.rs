//! Mounting a FUSE connection, the mount table and unmounting, for the daemon and
//! `stratafs umount`.

use std::ffi::CString;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags};
use rustix::mount::MountFlags;

use super::Errno;

use super::SysResult;

/// One line of /proc/self/mountinfo, the fields `stratafs umount` needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub mount_point: PathBuf,
    /// `fuse.stratafs`, `tmpfs`, ...
    pub fstype: String,
    pub source: String,
}

impl MountEntry {
    pub fn is_fuse(&self) -> bool {
        self.fstype == "fuse" || self.fstype.starts_with("fuse.")
    }
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b.get(i + 1..i + 4);
        match octal {
            Some(o) if b[i] == b'\\' && o.iter().all(|c| (b'0'..=b'7').contains(c)) => {
                let v = o.iter().fold(0u32, |v, c| v * 8 + u32::from(c - b'0'));
                out.push(v as u8);
                i += 4;
            }
            _ => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses mountinfo text: `ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS [TAGS...] - TYPE
/// SOURCE SUPEROPTS`. Malformed lines are skipped.
fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let (pre, post) = line.split_once(" - ")?;
            let mount_point = pre.split(' ').nth(4)?;
            let mut post = post.split(' ');
            let fstype = post.next()?;
            let source = post.next()?;
            Some(MountEntry {
                mount_point: PathBuf::from(unescape(mount_point)),
                fstype: fstype.to_string(),
                source: unescape(source),
            })
        })
        .collect()
}

/// The top-most mount at exactly `path` (an absolute path without symlinks), if any.
pub fn mount_at(path: &Path) -> std::io::Result<Option<MountEntry>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(parse_mountinfo(&text)
        .into_iter()
        .rev()
        .find(|e| e.mount_point == path))
}

/// umount2(2): `detach` is MNT_DETACH (a lazy unmount: gone from the namespace now,
/// ended once no longer in use).
pub fn unmount(path: &Path, detach: bool) -> SysResult<()> {
    let flags = if detach {
        rustix::mount::UnmountFlags::DETACH
    } else {
        rustix::mount::UnmountFlags::empty()
    };
    rustix::mount::unmount(path, flags)
}

/// Opens /dev/fuse: one new, not yet mounted, FUSE connection.
pub fn open_fuse_device() -> SysResult<OwnedFd> {
    rustix::fs::open("/dev/fuse", OFlags::RDWR | OFlags::CLOEXEC, Mode::empty())
}

/// The mount(2) flags of a FUSE mount.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FuseMountFlags {
    pub read_only: bool,
    pub nosuid: bool,
    pub nodev: bool,
    pub noexec: bool,
    pub noatime: bool,
}

/// mount(2) of a FUSE connection at `target`. `data` is the kernel's option string
/// (`fd=N,rootmode=...,user_id=...,group_id=...`); `fstype` is `fuse.SUBTYPE`, which
/// is what /proc/mounts shows as the type.
pub fn mount_fuse(
    source: &str,
    target: &Path,
    fstype: &str,
    flags: FuseMountFlags,
    data: &str,
) -> SysResult<()> {
    let mut f = MountFlags::empty();
    for (on, flag) in [
        (flags.read_only, MountFlags::RDONLY),
        (flags.nosuid, MountFlags::NOSUID),
        (flags.nodev, MountFlags::NODEV),
        (flags.noexec, MountFlags::NOEXEC),
        (flags.noatime, MountFlags::NOATIME),
    ] {
        if on {
            f |= flag;
        }
    }
    let data = CString::new(data).map_err(|_| Errno::INVAL)?;
    rustix::mount::mount(source, target, fstype, f, data.as_c_str())
}

/// The file-type bits of `path`'s mode (the `rootmode=` of a FUSE mount on it).
pub fn file_type_bits(path: &Path) -> SysResult<u32> {
    Ok(rustix::fs::stat(path)?.st_mode & libc::S_IFMT)
}

/// Whether this process may open `path` for reading and writing (access(2) with the
/// real ids, which are ours: stratafs is never set-id).
pub fn can_read_write(path: &Path) -> bool {
    rustix::fs::access(
        path,
        rustix::fs::Access::READ_OK | rustix::fs::Access::WRITE_OK,
    )
    .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines() {
        let text = "\
22 1 0:21 / /proc rw,nosuid shared:12 - proc proc rw
97 22 0:50 / /tmp/a\\040b rw,nosuid,nodev - fuse.stratafs my\\040src rw,user_id=0
bad line
";
        let t = parse_mountinfo(text);
        assert_eq!(t.len(), 2);
        assert_eq!(t[1].mount_point, PathBuf::from("/tmp/a b"));
        assert_eq!(t[1].fstype, "fuse.stratafs");
        assert_eq!(t[1].source, "my src");
        assert!(t[1].is_fuse() && !t[0].is_fuse());
    }
}
