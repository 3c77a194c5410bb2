//! One integration test binary (ripgrep style): shared fixtures in `fixture`, one module per concern.

mod cli;
mod differential;
mod engine;
mod fixture;
mod model;
mod mounted;
