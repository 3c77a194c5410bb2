//! The stratafs binary: parse the command line, then hand over to the library.

mod demo;

use std::process::ExitCode;

use stratafs::cli::{self, Command};
use stratafs::sys::process;

fn init_logging(debug: bool) {
    // fuser warns when the mount is already gone at shutdown (an external unmount): not news.
    let level = if debug { "debug" } else { "warn,fuser=error" };
    env_logger::Builder::from_env(env_logger::Env::default().filter_or("STRATAFS_LOG", level))
        .format_timestamp_millis()
        .target(env_logger::Target::Stderr)
        .init();
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
        }) => {
            init_logging(debug);
            stratafs::fuse::run(&config, foreground || debug)
        }
        Ok(Command::Umount { mountpoint, lazy }) => stratafs::fuse::unmount(&mountpoint, lazy),
        Ok(Command::Volume(args)) => stratafs::volume::cli::run(&args),
        Ok(Command::Demo) => {
            init_logging(false);
            demo::run()
        }
        Err(e) => {
            eprintln!("stratafs: {e}");
            e.exit_code()
        }
    };
    ExitCode::from(code.clamp(0, 255) as u8)
}
