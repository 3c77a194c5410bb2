//! The `-o` parser never panics, and whatever it accepts renders back into a string
//! it parses to the same options (`options::to_option_string`). Lines of the input
//! are separate `-o` arguments.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stratafs::options::{parse, to_option_string};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let args: Vec<&str> = text.split('\n').collect();
    let Ok(parsed) = parse(&args) else {
        return;
    };
    let rendered = to_option_string(&parsed);
    assert_eq!(
        parse(&[rendered.as_str()]),
        Ok(parsed),
        "rendered as {rendered:?}"
    );
});
