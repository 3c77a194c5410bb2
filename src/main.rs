//! The stratafs binary; the program is the library's (`stratafs::main`), so that
//! everything it uses can stay private to the library.

#![deny(unsafe_code)]

fn main() -> std::process::ExitCode {
    stratafs::main()
}
