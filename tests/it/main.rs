//! One integration test binary (ripgrep style): shared fixtures in `fixture`, one module per concern.

mod cli;
mod compat;
mod concurrency;
mod crash;
mod differential;
mod engine;
mod fixture;
mod graft_engine;
mod hostile;
mod inode_flags;
mod library;
mod model;
mod mounted;
mod posix;
mod posix_acl;
mod refusals;
mod regressions;
mod security;
mod timestamps;
mod transport;
mod volume_cli;
mod volumes;
