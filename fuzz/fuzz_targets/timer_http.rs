#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    whispr_protocol::fuzzing::timer_http(data);
});
