//! The FUSE side: the only module that imports `fuser`. `adapter` turns requests
//! into engine calls; this file mounts, detaches the daemon and unmounts.

mod adapter;
mod watchdog;

use std::path::Path;
use std::sync::Arc;

use fuser::{MountOption, Session, SessionACL};

use crate::config::MountConfig;
use crate::sys::process::{self, Forked};
use crate::union::Union;
pub use adapter::StrataFs;

/// Worker threads when the configuration does not say: enough to keep independent
/// requests (and a slow copy-up) from queueing behind each other.
fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| (n.get() * 2).clamp(4, 16))
        .unwrap_or(4)
}

/// fuser's session configuration for a mount.
pub fn session_config(config: &MountConfig) -> fuser::Config {
    let mut opts = vec![
        MountOption::FSName(
            config
                .fuse
                .fsname
                .clone()
                .unwrap_or_else(|| "stratafs".into()),
        ),
        MountOption::Subtype("stratafs".into()),
        // Permission checks are the kernel's, on the attributes we report, exactly as
        // for kernel overlayfs; the daemon itself acts with its own credentials.
        MountOption::DefaultPermissions,
    ];
    if config.read_only() {
        opts.push(MountOption::RO);
    }
    // As root, device nodes and set-ID programs work by default, as on kernel
    // overlayfs; unprivileged FUSE mounts are always nodev,nosuid anyway.
    let root_default = process::is_root().then_some(true);
    for (flag, on, off) in [
        (
            config.fuse.suid.or(root_default),
            MountOption::Suid,
            MountOption::NoSuid,
        ),
        (
            config.fuse.dev.or(root_default),
            MountOption::Dev,
            MountOption::NoDev,
        ),
        (config.fuse.exec, MountOption::Exec, MountOption::NoExec),
        (config.fuse.atime, MountOption::Atime, MountOption::NoAtime),
    ] {
        match flag {
            Some(true) => opts.push(on),
            Some(false) => opts.push(off),
            None => {}
        }
    }
    // Containers run processes under many uids: a root mount serves everyone, as
    // fuse-overlayfs does; others need allow_other (and user_allow_other) to do so.
    let acl = if config.fuse.allow_other || process::is_root() {
        SessionACL::All
    } else if config.fuse.allow_root {
        SessionACL::RootAndOwner
    } else {
        SessionACL::Owner
    };
    let threads = if config.threads == 0 {
        default_threads()
    } else {
        config.threads
    };
    let mut cfg = fuser::Config::default();
    cfg.mount_options = opts;
    cfg.acl = acl;
    cfg.n_threads = Some(threads);
    cfg.clone_fd = threads > 1;
    cfg
}

/// Mounts `config` and serves it until unmounted. Without `foreground`, returns in
/// the caller's process only once the mount is live (exit code 0) or has failed
/// (non-zero, reason on stderr), while the daemon goes on detached.
pub fn run(config: &MountConfig, foreground: bool) -> i32 {
    let report = if foreground {
        None
    } else {
        match process::fork_with_pipe() {
            Err(e) => {
                eprintln!("stratafs: cannot start the daemon: {e}");
                return 1;
            }
            Ok(Forked::Parent(pipe)) => {
                return match process::read_report(pipe) {
                    Ok(()) => 0,
                    Err(msg) => {
                        eprintln!("stratafs: {msg}");
                        1
                    }
                };
            }
            Ok(Forked::Child(pipe)) => {
                process::detach_session();
                Some(pipe)
            }
        }
    };
    let fail = |report: Option<std::fs::File>, msg: String| {
        match report {
            Some(pipe) => process::write_report(pipe, Err(&msg)),
            None => eprintln!("stratafs: {msg}"),
        }
        1
    };
    process::clear_umask();
    let engine = match Union::new(config) {
        Ok(e) => Arc::new(e),
        Err(msg) => return fail(report, msg),
    };
    // Signals are taken by one thread (below); every thread started from here on
    // inherits the block.
    process::block_termination_signals();
    let fs = StrataFs::new(engine.clone(), config.passthrough, config.writeback);
    let mut session = match Session::new(fs, &config.mountpoint, &session_config(config)) {
        Ok(s) => s,
        Err(e) => {
            return fail(
                report,
                format!("mount {}: {e}", config.mountpoint.display()),
            );
        }
    };
    let notifier = session.notifier();
    engine.on_stale_attrs(Box::new(move |ino| {
        // Offset -1: attributes only, no page-cache work, so this is safe to send
        // from inside a request handler.
        if let Err(e) = notifier.inval_inode(fuser::INodeNo(ino), -1, 0) {
            log::debug!("attribute invalidation of inode {ino}: {e}");
        }
    }));
    let mut unmounter = session.unmount_callable();
    let mountpoint = config.mountpoint.clone();
    let _ = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let sig = process::wait_for_termination_signal();
            log::info!("signal {sig}: unmounting {}", mountpoint.display());
            if unmounter.unmount().is_err() {
                let _ = process::lazy_unmount(&mountpoint);
            }
        });
    if let Some(pipe) = report {
        // Detach from the caller's stdio before saying "ready": a caller reading our
        // stderr until EOF must not wait on the daemon.
        let _ = process::stdio_to_devnull();
        process::write_report(pipe, Ok(()));
    }
    match session.run() {
        Ok(()) => 0,
        Err(e) => {
            log::error!("session ended: {e}");
            1
        }
    }
}

/// `stratafs umount MNT`: fusermount3 -u, falling back to a lazy unmount.
pub fn unmount(mountpoint: &Path, _lazy: bool) -> i32 {
    let status = std::process::Command::new("fusermount3")
        .arg("-u")
        .arg(mountpoint)
        .status();
    if matches!(status, Ok(s) if s.success()) {
        return 0;
    }
    match process::lazy_unmount(mountpoint) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("stratafs: umount {}: {e}", mountpoint.display());
            1
        }
    }
}
