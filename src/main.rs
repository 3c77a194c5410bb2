//! The stratafs binary: parse the command line, then hand over to the library.

#![deny(unsafe_code)]

mod demo;

use std::path::Path;
use std::process::ExitCode;

use stratafs::cli::{self, Command};
use stratafs::sys::process;

/// Logs to stderr, or appended to `file` (`-o log=FILE`): opened here, before the
/// daemon detaches, so that an unusable file is reported to the caller.
fn init_logging(debug: bool, file: Option<&Path>) -> Result<(), String> {
    // fuser warns when the mount is already gone at shutdown (an external unmount): not
    // news. A log file was asked for to see why a mount ended: it gets info lines too
    // (the configuration, the signal that ended it, passthrough refused).
    let level = match (debug, file.is_some()) {
        (true, _) => "debug",
        (false, true) => "info,fuser=error",
        (false, false) => "warn,fuser=error",
    };
    let mut builder =
        env_logger::Builder::from_env(env_logger::Env::default().filter_or("STRATAFS_LOG", level));
    builder.format_timestamp_millis();
    match file {
        Some(path) => {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| format!("log {}: {e}", path.display()))?;
            builder.target(env_logger::Target::Pipe(Box::new(f)));
        }
        None => {
            builder.target(env_logger::Target::Stderr);
        }
    }
    builder.init();
    Ok(())
}

fn main() -> ExitCode {
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
            log_file,
        }) => match init_logging(debug, log_file.as_deref()) {
            Ok(()) => {
                for line in config.summary() {
                    log::info!("{line}");
                }
                stratafs::fuse::run(&config, foreground || debug)
            }
            Err(e) => {
                eprintln!("stratafs: {e}");
                1
            }
        },
        Ok(Command::Umount { mountpoint, lazy }) => stratafs::fuse::unmount(&mountpoint, lazy),
        Ok(Command::Volume(args)) => stratafs::volume::cli::run(&args),
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
