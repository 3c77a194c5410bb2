//! What kernel overlayfs has and a FUSE filesystem cannot have (a kernel or fuser
//! limit, named in the README): each is refused with a clean errno at the first
//! call, never half done.

use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

use crate::fixture::{self, LayerBuilder, Layers, StrataMount, cpath};

/// struct file_handle with room for any handle this kernel makes.
#[repr(C)]
struct FileHandle {
    handle_bytes: u32,
    handle_type: i32,
    f_handle: [u8; 128],
}

const AT_HANDLE_FID: i32 = 0x200;

/// name_to_handle_at(AT_FDCWD, path, ..., flags): Ok(()) or the errno.
fn name_to_handle(path: &std::path::Path, flags: i32) -> Result<(), i32> {
    let c = cpath(path);
    let mut h = FileHandle {
        handle_bytes: 128,
        handle_type: 0,
        f_handle: [0; 128],
    };
    let mut mount_id: libc::c_int = 0;
    // SAFETY: a NUL-terminated path, a handle buffer whose size is in handle_bytes,
    // and an int out-parameter, all live for the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_name_to_handle_at,
            libc::AT_FDCWD,
            c.as_ptr(),
            &mut h as *mut FileHandle,
            &mut mount_id as *mut libc::c_int,
            flags,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(fixture::errno())
    }
}

#[test]
fn file_handles_are_refused_at_name_to_handle_at_not_stale_at_open() {
    if !fixture::require_fuse() {
        return;
    }
    let l = Layers::new(&[LayerBuilder::new().file("lower", "from below")]);
    let m = StrataMount::new(&l);
    fs::write(m.join("f"), "hi").unwrap();
    fs::hard_link(m.join("f"), m.join("f2")).unwrap();
    for name in ["f", "f2", "lower"] {
        // Node ids do not outlive the kernel's references, so a handle could not be
        // opened later: none is given.
        assert_eq!(
            name_to_handle(&m.join(name), 0),
            Err(libc::EOPNOTSUPP),
            "name_to_handle_at {name}"
        );
        // Identifiers only (fanotify FID mode) are still given.
        assert_eq!(
            name_to_handle(&m.join(name), AT_HANDLE_FID),
            Ok(()),
            "{name} (FID)"
        );
    }
}

#[test]
fn o_tmpfile_and_collapse_insert_range_are_refused_cleanly() {
    if !fixture::require_fuse() {
        return;
    }
    let l = Layers::new(&[LayerBuilder::new().file("lower", vec![7u8; 16384])]);
    let m = StrataMount::new(&l);
    let tmp = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_TMPFILE)
        .open(m.path());
    assert_eq!(
        tmp.map(drop).map_err(|e| e.raw_os_error()),
        Err(Some(libc::EOPNOTSUPP)),
        "O_TMPFILE"
    );
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.join("lower"))
        .unwrap();
    for mode in [libc::FALLOC_FL_COLLAPSE_RANGE, libc::FALLOC_FL_INSERT_RANGE] {
        // SAFETY: a valid fd; fallocate takes no pointers.
        let r = unsafe { libc::fallocate(f.as_raw_fd(), mode, 4096, 4096) };
        assert_eq!(
            (r, fixture::errno()),
            (-1, libc::EOPNOTSUPP),
            "fallocate mode {mode:#x}"
        );
    }
    // Refused, the file is as it was.
    assert_eq!(fs::read(m.join("lower")).unwrap(), vec![7u8; 16384]);
    drop(f);
    let _ = File::open(m.join("lower")).unwrap();
}
