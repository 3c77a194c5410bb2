//! The stratafs program: logging set up as the command line asks, and each command
//! handed to the part of the library that carries it out.

use std::io::Write;
use std::os::unix::net::UnixDatagram;
use std::process::ExitCode;

use crate::cli::{self, Command, LogTarget};
use crate::demo;
use crate::sys::process;

/// Logs to stderr, appended to a file (`-o log=FILE`) or to syslog (`-o log=syslog`):
/// the file or socket is opened here, before the daemon detaches, so that an unusable
/// one is reported to the caller.
fn init_logging(debug: bool, target: Option<&LogTarget>) -> Result<(), String> {
    // A log was asked for to see why a mount ended: it gets info lines too (the
    // configuration, the signal that ended it, passthrough refused).
    let level = match (debug, target.is_some()) {
        (true, _) => "debug",
        (false, true) => "info",
        (false, false) => "warn",
    };
    let level = format!("{level},{}", crate::fuse::library_log_filter(debug));
    let mut builder =
        env_logger::Builder::from_env(env_logger::Env::default().filter_or("STRATAFS_LOG", &level));
    builder.format_timestamp_millis();
    match target {
        Some(LogTarget::File(path)) => {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| format!("log {}: {e}", path.display()))?;
            builder.target(env_logger::Target::Pipe(Box::new(f)));
        }
        Some(LogTarget::Syslog) => {
            let socket = UnixDatagram::unbound()
                .and_then(|s| s.connect(SYSLOG_SOCKET).map(|()| s))
                .map_err(|e| format!("log=syslog: cannot reach {SYSLOG_SOCKET}: {e}"))?;
            builder
                .write_style(env_logger::WriteStyle::Never)
                .format(|buf, record| {
                    // RFC 3164 without timestamp and host, which the local syslog daemon
                    // (rsyslog, journald) adds; the pid is read per line because
                    // detaching changes it.
                    writeln!(
                        buf,
                        "<{}>stratafs[{}]: {}",
                        syslog_priority(record.level()),
                        std::process::id(),
                        record.args()
                    )
                })
                .target(env_logger::Target::Pipe(Box::new(SyslogWriter(socket))));
        }
        None => {
            builder.target(env_logger::Target::Stderr);
        }
    }
    builder.init();
    Ok(())
}

const SYSLOG_SOCKET: &str = "/dev/log";

/// Facility daemon (3), severity from the level: error 3, warning 4, info 6, debug 7.
fn syslog_priority(level: log::Level) -> u8 {
    let severity = match level {
        log::Level::Error => 3,
        log::Level::Warn => 4,
        log::Level::Info => 6,
        log::Level::Debug | log::Level::Trace => 7,
    };
    3 * 8 + severity
}

/// One datagram per write: env_logger writes each formatted line with one `write_all`.
/// A line that cannot be sent (syslog restarted, buffer full) is dropped, not retried:
/// logging must not block or fail a request.
struct SyslogWriter(UnixDatagram);

impl Write for SyslogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let line = buf.strip_suffix(b"\n").unwrap_or(buf);
        let _ = self.0.send(line);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `stratafs umount`: like umount(8), then, as `docker run --rm` does before it
/// returns, waits (a bounded while) for the mount's daemon to end its volume claims,
/// so that a `:delete` volume is gone when the command returns. Mounts of the
/// default volume store (or STRATAFS_STATE_DIR's) are waited for; a lazily detached
/// busy mount ends later, by design.
fn unmount(mountpoint: &std::path::Path, lazy: bool) -> i32 {
    let daemons = crate::volume::Store::open(None)
        .map(|store| crate::volume::claims::daemons_at(&store, mountpoint))
        .unwrap_or_default();
    let code = crate::fuse::unmount(mountpoint, lazy);
    if code == 0
        && !lazy
        && !crate::volume::claims::wait_for_exit(&daemons, std::time::Duration::from_secs(10))
    {
        eprintln!(
            "stratafs: {} unmounted; its daemon (pid {daemons:?}) is still releasing its volumes",
            mountpoint.display()
        );
    }
    code
}

/// The `stratafs` program, from its arguments to its exit code.
pub fn main() -> ExitCode {
    // Nothing opened later may land on fds 0-2.
    process::ensure_stdio_open();
    let invocation = cli::parse_args(std::env::args_os().collect());
    for w in &invocation.warnings {
        eprintln!("stratafs: warning: {w}");
    }
    let code = match invocation.command {
        Ok(Command::Print(text)) => {
            print!("{text}");
            0
        }
        Ok(Command::Mount {
            config,
            foreground,
            debug,
            log,
        }) => match init_logging(debug, log.as_ref()) {
            Ok(()) => {
                for line in config.summary() {
                    log::info!("{line}");
                }
                crate::fuse::run(&config, foreground || debug)
            }
            Err(e) => {
                eprintln!("stratafs: {e}");
                1
            }
        },
        Ok(Command::Umount { mountpoint, lazy }) => unmount(&mountpoint, lazy),
        Ok(Command::Volume(args)) => crate::volume::cli::run(&args),
        Ok(Command::Demo) => {
            let _ = init_logging(false, None);
            demo::run()
        }
        Err(e) => {
            eprintln!("stratafs: {e}");
            e.exit_code()
        }
    };
    ExitCode::from(code.clamp(0, 255) as u8)
}
