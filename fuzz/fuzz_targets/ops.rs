//! Operation sequences on generated lower layers, applied to the engine (on scratch
//! directories, no mount) and to the reference model: every answer, the upper
//! layer's invariants and the merged tree must agree (see stratafs::testing::runner).
#![no_main]

use libfuzzer_sys::fuzz_target;
use stratafs::testing::{Checks, Op, Scenario, run_engine};

/// Longer sequences add little that shorter ones over the same tiny tree do not.
const MAX_OPS: usize = 48;

fuzz_target!(|input: (Scenario, Vec<Op>)| {
    let (scenario, mut ops) = input;
    ops.truncate(MAX_OPS);
    if let Err(e) = run_engine(&scenario, &ops, Checks::default()) {
        panic!("{e}");
    }
});
