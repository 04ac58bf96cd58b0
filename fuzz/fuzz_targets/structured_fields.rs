//! Structured fields (RFC 9651): lists split across field lines, and single items.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sturdy_core::headers::sf;

fuzz_target!(|data: &[u8]| {
    let _ = sf::parse_list(data.split(|b| *b == b'\n'));
    let _ = sf::parse_item(data);
});
