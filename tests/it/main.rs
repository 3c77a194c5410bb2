//! One integration test binary (ripgrep style): shared fixtures in `fixture`, one module per concern.

mod cli;
mod compat;
mod differential;
mod engine;
mod fixture;
mod mounted;
mod posix;
