//! The FUSE side: the only module that imports `fuser`. `adapter` turns requests
//! into engine calls, `channel` carries them over /dev/fuse (fuser) and `ring`
//! over io_uring (`wire` its codec); this file mounts, detaches the daemon and
//! unmounts.

mod adapter;
mod channel;
mod passthrough;
mod reply;
mod ring;
mod stats;
mod watchdog;
mod wire;

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fuser::{MountOption, Session, SessionACL};

use crate::cli::os_reason;
use crate::config::MountConfig;
use crate::sys::Errno;
use crate::sys::mount;
use crate::sys::process::{self, Forked};
use crate::union::{Setup, Union};
use crate::volume;
use adapter::StrataFs;
use channel::{FuserFs, RingSlot};
use stats::RequestStats;

/// Threads serving requests, on either transport.
fn worker_threads(config: &MountConfig) -> usize {
    if config.threads == 0 {
        default_threads()
    } else {
        config.threads
    }
}

/// Worker threads when the configuration does not say: enough to keep independent
/// requests (and a slow copy-up) from queueing behind each other.
fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| (n.get() * 2).clamp(4, 16))
        .unwrap_or(4)
}

/// Inodes the kernel must have forgotten since the last trim before the freed
/// memory is handed back (a trim walks the whole heap: not worth it for a few).
const TRIM_AFTER_FORGOTTEN: usize = 4096;

/// Starts the thread that returns the memory of forgotten inodes to the system once
/// the kernel has dropped many of them (drop_caches, memory pressure, a finished
/// walk): otherwise the daemon's RSS stays at its peak. It holds only a weak
/// reference, so it ends with the engine.
fn spawn_memory_trimmer(engine: &Arc<Union>) {
    let weak = Arc::downgrade(engine);
    let spawned = std::thread::Builder::new()
        .name("memory-trim".into())
        .spawn(move || {
            let mut peak = 0;
            loop {
                std::thread::sleep(std::time::Duration::from_secs(1));
                let Some(engine) = weak.upgrade() else {
                    return;
                };
                let now = engine.inode_count();
                if peak >= now + TRIM_AFTER_FORGOTTEN {
                    engine.shrink_inode_table();
                    drop(engine);
                    process::release_free_memory();
                    peak = now;
                }
                peak = peak.max(now);
            }
        });
    if let Err(e) = spawned {
        log::warn!("memory trimmer not started ({e}): freed inode memory stays in RSS");
    }
}

/// fuser's session configuration for a mount.
/// The log filter for the FUSE library's own lines (env_logger syntax), the one
/// place that knows its log targets. It warns when the mount is already gone at
/// shutdown (an external unmount): not news. With `-d` each request is logged with
/// its path by the adapter; the library's own request lines, by inode number,
/// come only with STRATAFS_LOG=debug.
pub fn library_log_filter(debug: bool) -> &'static str {
    match debug {
        true => "fuser::request=info",
        false => "fuser=error",
    }
}

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
    if config.auto_unmount {
        opts.push(MountOption::AutoUnmount);
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
    let threads = worker_threads(config);
    let mut cfg = fuser::Config::default();
    cfg.mount_options = opts;
    cfg.acl = acl;
    cfg.n_threads = Some(threads);
    cfg.clone_fd = threads > 1;
    cfg
}

/// As root, mounts the FUSE connection itself, so that the type is `fuse.stratafs`
/// (fuser's own mount(2) always says `fuse`; fusermount3, which an unprivileged mount
/// goes through, sets the subtype as we do here). `Ok(None)`: not root, or mount(2)
/// refused with EPERM (a user namespace without the right): fuser mounts instead.
fn kernel_mount(config: &MountConfig, cfg: &fuser::Config) -> io::Result<Option<OwnedFd>> {
    // auto_unmount is fusermount3's doing (it waits for the daemon to die).
    if !process::is_root() || config.auto_unmount {
        return Ok(None);
    }
    let mut source = "stratafs".to_string();
    let mut fstype = "fuse".to_string();
    let mut kernel_options = Vec::new();
    // fuser's defaults: nosuid and nodev unless asked for.
    let mut flags = mount::FuseMountFlags {
        nosuid: true,
        nodev: true,
        ..Default::default()
    };
    for o in &cfg.mount_options {
        match o {
            MountOption::FSName(n) => source = n.clone(),
            MountOption::Subtype(t) => fstype = format!("fuse.{t}"),
            MountOption::DefaultPermissions => kernel_options.push("default_permissions"),
            MountOption::RO => flags.read_only = true,
            MountOption::RW => flags.read_only = false,
            MountOption::Suid => flags.nosuid = false,
            MountOption::NoSuid => flags.nosuid = true,
            MountOption::Dev => flags.nodev = false,
            MountOption::NoDev => flags.nodev = true,
            MountOption::Exec => flags.noexec = false,
            MountOption::NoExec => flags.noexec = true,
            MountOption::Atime => flags.noatime = false,
            MountOption::NoAtime => flags.noatime = true,
            // session_config sets none of the others.
            other => log::debug!("mount option {other:?} left to fuser"),
        }
    }
    // The kernel knows only allow_other; allow_root is enforced by fuser's ACL check.
    if cfg.acl != SessionACL::Owner {
        kernel_options.push("allow_other");
    }
    let rootmode = mount::file_type_bits(&config.mountpoint).map_err(io::Error::from)?;
    let dev = mount::open_fuse_device().map_err(io::Error::from)?;
    let mut data = format!(
        "fd={},rootmode={rootmode:o},user_id={},group_id={}",
        dev.as_raw_fd(),
        process::real_uid(),
        process::real_gid()
    );
    for o in kernel_options {
        data.push(',');
        data.push_str(o);
    }
    match mount::mount_fuse(&source, &config.mountpoint, &fstype, flags, &data) {
        Ok(()) => Ok(Some(dev)),
        Err(Errno::PERM) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Opens the union a mount serves: the process set up as a daemon's
/// (`Setup::for_mount`), then the volumes created and claimed before the engine
/// exists, which only receives their opened directories.
pub fn open_engine(config: &MountConfig) -> Result<Union, String> {
    let setup = Setup::for_mount();
    let grafts = volume::attach::open(config, &setup)?;
    Union::new(config, &setup, grafts).map_err(|e| e.to_string())
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
    process::tune_allocator();
    let engine = match open_engine(config) {
        Ok(e) => Arc::new(e),
        Err(msg) => return fail(report, msg),
    };
    // Signals are taken by one thread (below); every thread started from here on
    // inherits the block.
    process::block_daemon_signals();
    let stats = RequestStats::from_env().map(Arc::new);
    let ring = RingSlot::default();
    let fs = FuserFs::new(
        Arc::new(StrataFs::new(
            engine.clone(),
            config.passthrough,
            config.writeback,
            stats.clone(),
        )),
        ring.clone(),
    );
    let session_cfg = session_config(config);
    let acl = session_cfg.acl;
    // Mounted here (as root) or by fuser (through fusermount3 otherwise).
    let mut mounted_here = false;
    let started = kernel_mount(config, &session_cfg).and_then(|own_mount| {
        mounted_here = own_mount.is_some();
        // fuser answers INIT inside `Session::from_fd`/`new`, so the ring's plan must
        // be in place before: it can be only where this process opened /dev/fuse.
        if config.io_uring {
            let plan = match &own_mount {
                Some(fd) => ring::RingPlan::new(fd, worker_threads(config), acl),
                None => Err(io::Error::other(
                    "the mount was made by fusermount3, whose /dev/fuse connection is \
                     handed over only after INIT",
                )),
            };
            // Not a warning: /dev/fuse is the transport everywhere the ring is not.
            match plan {
                Ok(plan) => *ring.lock() = Some(plan),
                Err(e) => log::info!("io_uring: {e}; requests come over /dev/fuse"),
            }
        }
        match own_mount {
            Some(fd) => Session::from_fd(fs, fd, session_cfg.acl, session_cfg),
            None => Session::new(fs, &config.mountpoint, &session_cfg),
        }
    });
    let mut session = match started {
        Ok(s) => s,
        Err(e) => {
            return fail(
                report,
                format!(
                    "mount {}: {}",
                    config.mountpoint.display(),
                    mount_failure(&e)
                ),
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
    spawn_memory_trimmer(&engine);
    let mut unmounter = session.unmount_callable();
    // Set once a termination signal asked the daemon to end (see below).
    let asked_to_end = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let asked_to_end_by_signal = asked_to_end.clone();
    let mountpoint = config.mountpoint.clone();
    let stats_on_signal = stats.clone();
    let _ = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            loop {
                let sig = process::wait_for_daemon_signal();
                if sig == libc::SIGUSR1 {
                    match &stats_on_signal {
                        Some(s) => s.dump(),
                        None => log::info!("SIGUSR1: no request stats (STRATAFS_STATS unset)"),
                    }
                    continue;
                }
                asked_to_end_by_signal.store(true, std::sync::atomic::Ordering::SeqCst);
                log::info!("signal {sig}: unmounting {}", mountpoint.display());
                // fuser unmounts only what it mounted itself.
                if mounted_here || unmounter.unmount().is_err() {
                    let _ = mount::unmount(&mountpoint, true);
                }
                return;
            }
        });
    if let Some(pipe) = report {
        // Detach from the caller's stdio before saying "ready": a caller reading our
        // stderr until EOF must not wait on the daemon.
        let _ = process::stdio_to_devnull();
        process::write_report(pipe, Ok(()));
    }
    let ended = session.run();
    if let Some(s) = &stats {
        s.dump();
    }
    // The session (and its handle on the engine) is gone; the memory trimmer holds
    // the engine for a moment once a second. The last reference must be dropped here,
    // on this thread, so that what the engine's drop does (removing a `:delete`
    // volume, releasing claims) finishes before the process exits.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    while Arc::strong_count(&engine) > 1 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    drop(engine);
    match ended {
        Ok(()) => {
            log::info!("{} unmounted; exiting", config.mountpoint.display());
            0
        }
        // The connection can end aborted rather than unmounted while the kernel tears
        // down a lazily detached mount whose last user just left, or when a signal
        // asked us to end meanwhile. Either way the mount is gone: the end that was
        // asked for. An abort of a mount still in the table (fusectl) is a failure.
        Err(e)
            if e.raw_os_error() == Some(libc::ECONNABORTED)
                && (asked_to_end.load(std::sync::atomic::Ordering::SeqCst)
                    || !still_a_fuse_mount(&config.mountpoint)) =>
        {
            log::info!(
                "{}: connection ended ({e}); exiting",
                config.mountpoint.display()
            );
            0
        }
        Err(e) => {
            log::error!("session ended: {e}");
            1
        }
    }
}

/// `stratafs umount MNT [--lazy]`: exit status 0 when unmounted (a note on stderr if
/// it was only detached), 1 with the reason on stderr otherwise.
pub fn unmount(mountpoint: &Path, lazy: bool) -> i32 {
    match unmount_mount(mountpoint, lazy) {
        Ok(note) => {
            if let Some(note) = note {
                eprintln!("stratafs: {note}");
            }
            0
        }
        Err(msg) => {
            eprintln!("stratafs: umount {}: {msg}", mountpoint.display());
            1
        }
    }
}

/// The mount point as the mount table spells it: absolute, symlinks resolved. A
/// mount whose daemon died cannot be resolved itself (ENOTCONN), so then only its
/// parent is.
/// Whether a FUSE mount is still at `mountpoint` in this namespace's mount table.
fn still_a_fuse_mount(mountpoint: &Path) -> bool {
    table_path(mountpoint)
        .ok()
        .and_then(|p| mount::mount_at(&p).ok().flatten())
        .is_some_and(|e| e.is_fuse())
}

fn table_path(mountpoint: &Path) -> io::Result<PathBuf> {
    match std::fs::canonicalize(mountpoint) {
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            let abs = std::path::absolute(mountpoint)?;
            match (abs.parent(), abs.file_name()) {
                (Some(parent), Some(name)) => Ok(std::fs::canonicalize(parent)?.join(name)),
                _ => Ok(abs),
            }
        }
        other => other,
    }
}

const BUSY: &str = "busy: a process has a file or its working directory on it; \
                    end that, or detach the mount now with --lazy";

/// Unmounts only FUSE mounts, and a busy one only when `lazy` (then says so): a
/// silent lazy detach would leave a caller believing the data is no longer in use.
fn unmount_mount(mountpoint: &Path, lazy: bool) -> Result<Option<String>, String> {
    let path = table_path(mountpoint).map_err(|e| os_reason(&e))?;
    let entry = mount::mount_at(&path)
        .map_err(|e| format!("cannot read the mount table: {}", os_reason(&e)))?
        .ok_or("not mounted")?;
    if !entry.is_fuse() {
        return Err(format!(
            "not a stratafs mount (it is {}); use umount(8)",
            entry.fstype
        ));
    }
    let detached = || {
        Some(format!(
            "{} was busy: detached lazily; it ends once no longer in use",
            mountpoint.display()
        ))
    };
    if process::is_root() {
        return match mount::unmount(&path, false) {
            Ok(()) => Ok(None),
            Err(Errno::BUSY) if lazy => match mount::unmount(&path, true) {
                Ok(()) => Ok(detached()),
                Err(e) => Err(os_reason(&e.into())),
            },
            Err(Errno::BUSY) => Err(BUSY.to_string()),
            Err(e) => Err(os_reason(&e.into())),
        };
    }
    // Unprivileged: the setuid helper, which checks that the mount is the caller's.
    let fusermount = |extra: &[&str]| {
        std::process::Command::new("fusermount3")
            .arg("-u")
            .args(extra)
            .arg(&path)
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|e| format!("cannot run fusermount3: {}", os_reason(&e)))
    };
    let out = fusermount(&[])?;
    if out.status.success() {
        return Ok(None);
    }
    let said = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if !said.contains("Device or resource busy") {
        return Err(said);
    }
    if !lazy {
        return Err(BUSY.to_string());
    }
    let out = fusermount(&["-z"])?;
    if out.status.success() {
        Ok(detached())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// Names what refused a mount. fuser reports an unprivileged caller's refused
/// /dev/fuse as a bare "Permission denied", and a missing fusermount3 as a bare
/// "No such file or directory".
fn mount_failure(e: &io::Error) -> String {
    let reason = os_reason(e);
    let dev = Path::new("/dev/fuse");
    if !dev.exists() {
        return format!("{reason}: /dev/fuse does not exist (load the module: modprobe fuse)");
    }
    if process::is_root() {
        return reason;
    }
    if !mount::can_read_write(dev) {
        return format!(
            "/dev/fuse: {reason}: an unprivileged mount needs read-write access to /dev/fuse \
             (and the setuid-root fusermount3 of fuse3)"
        );
    }
    match e.kind() {
        io::ErrorKind::NotFound => {
            format!("{reason}: an unprivileged mount needs fusermount3 (package fuse3) on PATH")
        }
        io::ErrorKind::PermissionDenied => format!(
            "{reason}: fusermount3 refused the mount (is it installed setuid root, and is \
             the mount point yours?)"
        ),
        _ => reason,
    }
}
