//! Process-level calls for the daemon: fork/detach, stdio, limits and signals.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};

use super::SysResult;

/// Which side of a fork we are on.
pub enum Forked {
    /// The original process; carries the read end of the readiness pipe.
    Parent(File),
    /// The new process; carries the write end of the readiness pipe.
    Child(File),
}

/// Forks the process, connecting parent and child with a pipe through which the
/// child reports whether the mount came up. Refused (EBUSY) unless the process is
/// single-threaded: after fork only the calling thread exists in the child, so any
/// other thread's locks would stay held forever. The check is what makes this safe
/// to call: with one thread, none can be started between the check and the fork.
pub fn fork_with_pipe() -> SysResult<Forked> {
    if thread_count()? != 1 {
        return Err(rustix::io::Errno::BUSY);
    }
    // SAFETY: the process has one thread (checked above, and only this thread could
    // start another), the condition under which fork in a Rust program is sound.
    unsafe { fork_single_threaded() }
}

/// Threads of this process, from /proc/self/task (one directory per thread).
fn thread_count() -> SysResult<usize> {
    let tasks = std::fs::read_dir("/proc/self/task")
        .map_err(|e| rustix::io::Errno::from_io_error(&e).unwrap_or(rustix::io::Errno::IO))?;
    Ok(tasks.count())
}

/// # Safety
/// The process must be single-threaded.
unsafe fn fork_single_threaded() -> SysResult<Forked> {
    let (read, write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
    // SAFETY: the caller guarantees no other thread exists.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(rustix::io::Errno::from_raw_os_error(errno()));
    }
    if pid == 0 {
        drop(read);
        Ok(Forked::Child(File::from(write)))
    } else {
        drop(write);
        Ok(Forked::Parent(File::from(read)))
    }
}

pub(crate) fn errno() -> i32 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// Reads the child's report: `Ok(())` for "mounted", `Err(message)` otherwise.
pub fn read_report(mut pipe: File) -> Result<(), String> {
    let mut text = String::new();
    let _ = pipe.read_to_string(&mut text);
    match text.strip_prefix("OK") {
        Some(_) => Ok(()),
        None if text.is_empty() => Err("the daemon exited before the mount was ready".into()),
        None => Err(text.trim_end().to_string()),
    }
}

pub fn write_report(mut pipe: File, result: Result<(), &str>) {
    let msg = match result {
        Ok(()) => "OK".to_string(),
        Err(e) => e.to_string(),
    };
    let _ = pipe.write_all(msg.as_bytes());
}

/// Starts a new session so the daemon is not killed with the caller's terminal.
pub fn detach_session() {
    let _ = rustix::process::setsid();
}

/// Points stdin, stdout and stderr at /dev/null. A caller that reads our stderr until
/// it closes (containers/storage does) then sees EOF once the parent exits.
pub fn stdio_to_devnull() -> SysResult<()> {
    let null: OwnedFd = rustix::fs::open(
        "/dev/null",
        rustix::fs::OFlags::RDWR | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )?;
    rustix::stdio::dup2_stdin(null.as_fd())?;
    rustix::stdio::dup2_stdout(null.as_fd())?;
    rustix::stdio::dup2_stderr(null.as_fd())?;
    Ok(())
}

/// Makes sure fds 0-2 are open, so that no file we open later lands on them (fuser
/// refuses a /dev/fuse fd below 3, and a stray write to "stderr" must not hit a layer).
pub fn ensure_stdio_open() {
    for _ in 0..3 {
        match rustix::fs::open(
            "/dev/null",
            rustix::fs::OFlags::RDWR,
            rustix::fs::Mode::empty(),
        ) {
            Ok(fd) => {
                use std::os::fd::{AsRawFd, IntoRawFd};
                if fd.as_raw_fd() > 2 {
                    return; // dropping closes it
                }
                // Keep it: it now fills one of 0, 1, 2.
                let _ = fd.into_raw_fd();
            }
            Err(_) => return,
        }
    }
}

/// Created files must get exactly the mode the kernel sent (it already applied the
/// caller's umask), so the daemon's own umask is cleared.
pub fn clear_umask() {
    rustix::process::umask(rustix::fs::Mode::empty());
}

/// The current (soft) open-file limit, changing nothing.
pub fn nofile_limit() -> u64 {
    rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .unwrap_or(1 << 20)
}

/// Raises the open-file limit as far as this process may: to the system's ceiling
/// (fs.nr_open) where it is privileged to raise the hard limit, else the soft limit
/// to the hard one. Returns the new soft limit. Cached directory handles are
/// budgeted from it: a budget far below a tree's depth makes every lookup near the
/// bottom of a deep tree reopen its way down from the last cached ancestor.
pub fn raise_nofile_limit() -> u64 {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let ceiling = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    let lim = getrlimit(Resource::Nofile);
    let raised = ceiling
        .filter(|c| lim.maximum.is_some_and(|m| m < *c))
        .map(|c| {
            setrlimit(
                Resource::Nofile,
                Rlimit {
                    current: Some(c),
                    maximum: Some(c),
                },
            )
        });
    if !matches!(raised, Some(Ok(()))) && lim.current != lim.maximum {
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: lim.maximum,
                maximum: lim.maximum,
            },
        );
    }
    getrlimit(Resource::Nofile).current.unwrap_or(1 << 20)
}

/// The effective user and group ids of the process.
pub fn ids() -> (u32, u32) {
    (
        rustix::process::geteuid().as_raw(),
        rustix::process::getegid().as_raw(),
    )
}

pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// CAP_FSETID's bit in the capability sets of /proc/PID/status.
const CAP_FSETID: u32 = 4;

/// What the VFS asks of a caller before it keeps a set-user-ID or set-group-ID bit
/// through a change (fs/attr.c: setattr_should_drop_sgid, should_remove_suid).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CallerStanding {
    /// In the group asked about (file-system gid or a supplementary group).
    pub in_group: bool,
    /// Holds CAP_FSETID in its effective set.
    pub may_fsetid: bool,
}

/// How process `pid` stands towards group `gid`, read from /proc/PID/status; `None`
/// when the process cannot be read (gone, or a field unparsable), so that callers can
/// choose to keep a bit rather than clear it on a guess.
pub fn caller_standing(pid: u32, gid: u32) -> Option<CallerStanding> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .map(str::trim)
    };
    // Gid: real, effective, saved, file-system.
    let fsgid: u32 = field("Gid:")?.split_whitespace().nth(3)?.parse().ok()?;
    let groups = field("Groups:")?;
    let in_group = fsgid == gid || groups.split_whitespace().any(|g| g.parse() == Ok(gid));
    let eff = u64::from_str_radix(field("CapEff:")?, 16).ok()?;
    Some(CallerStanding {
        in_group,
        may_fsetid: eff & (1 << CAP_FSETID) != 0,
    })
}

pub fn real_uid() -> u32 {
    rustix::process::getuid().as_raw()
}

pub fn real_gid() -> u32 {
    rustix::process::getgid().as_raw()
}

/// The signals that end the daemon: SIGINT, SIGTERM and SIGHUP.
const TERMINATION: &[i32] = &[libc::SIGINT, libc::SIGTERM, libc::SIGHUP];
/// What a mounted daemon takes synchronously: the termination signals, and SIGUSR1
/// (dump the request stats).
const DAEMON: &[i32] = &[libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGUSR1];

fn signal_set(sigs: &[i32]) -> libc::sigset_t {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset before any use.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for &sig in sigs {
            libc::sigaddset(&mut set, sig);
        }
        set
    }
}

/// Blocks `sigs` in the calling thread (and every thread it creates afterwards), so
/// they can be taken synchronously by [`wait_for_signal`].
fn block_signals(sigs: &[i32]) {
    let set = signal_set(sigs);
    // SAFETY: `set` is a valid, initialised signal set; the old mask is not wanted.
    unsafe {
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// Waits until one of `sigs` (blocked beforehand) arrives; returns its number.
fn wait_for_signal(sigs: &[i32]) -> i32 {
    let set = signal_set(sigs);
    // SAFETY: `set` is valid; sigwait only writes the signal number.
    unsafe {
        let mut sig: libc::c_int = 0;
        loop {
            if libc::sigwait(&set, &mut sig) == 0 {
                return sig;
            }
        }
    }
}

/// Blocks the termination signals, for [`wait_for_termination_signal`].
pub fn block_termination_signals() {
    block_signals(TERMINATION)
}

/// Waits until SIGINT, SIGTERM or SIGHUP arrives; returns its number.
pub fn wait_for_termination_signal() -> i32 {
    wait_for_signal(TERMINATION)
}

/// Blocks the signals a mounted daemon takes, for [`wait_for_daemon_signal`].
pub fn block_daemon_signals() {
    block_signals(DAEMON)
}

/// Waits until a termination signal or SIGUSR1 arrives; returns its number.
pub fn wait_for_daemon_signal() -> i32 {
    wait_for_signal(DAEMON)
}

/// Sets the allocator up for a daemon whose memory follows the kernel's inode cache.
/// A fixed mmap threshold keeps fuser's per-thread request buffers (16 MiB each,
/// mostly never touched) out of the heaps: with glibc's sliding threshold they land
/// inside thread arenas, where the free memory around them is never given back.
/// Two arenas bound the number of heaps that can hold freed inodes. Measured on a
/// 132k-entry walk: 27 MB left after the kernel forgot every inode, 18 MB with this.
/// Must be called before the worker threads start.
pub fn tune_allocator() {
    // SAFETY: mallopt takes two integers and only sets allocator parameters.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Gives the heap's free memory back to the system (glibc's `malloc_trim`): after
/// the kernel forgets many inodes their memory is free but still counted in the
/// daemon's RSS, since the allocator keeps it for reuse.
pub fn release_free_memory() {
    // SAFETY: malloc_trim takes no pointers and only walks the allocator's own
    // free lists, under its own locks.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// f_type of the filesystem holding `path` (used to wait for a mount to be live).
pub fn fs_magic(path: &std::path::Path) -> SysResult<i64> {
    Ok(rustix::fs::statfs(path)?.f_type as i64)
}

/// FUSE_SUPER_MAGIC: what statfs reports once a FUSE mount is live.
pub const FUSE_SUPER_MAGIC: i64 = 0x6573_5546;

/// The kernel's overflow uid and gid (what an unmappable id is shown as); 65534 when
/// /proc does not say.
pub fn overflow_ids() -> (u32, u32) {
    let read = |name: &str| {
        std::fs::read_to_string(format!("/proc/sys/kernel/{name}"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(65534)
    };
    (read("overflowuid"), read("overflowgid"))
}
