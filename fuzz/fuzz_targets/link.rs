//! RFC 8288 `Link`: the first line is the request URI, the others are field lines. Beyond not
//! panicking, the links found stay within the documented bounds and their memory within a
//! constant times the input's size.
#![no_main]

use std::collections::HashSet;

use libfuzzer_sys::fuzz_target;
use sturdy_core::headers::{next_link, parse_link, resolve_reference, MAX_LINKS, MAX_LINK_PARAMS};
use sturdy_fuzz::header_lines;

fuzz_target!(|data: &[u8]| {
    let (base, rest) = match data.iter().position(|b| *b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let base = String::from_utf8_lossy(base);
    let h = header_lines(&["link"], rest);
    let links = parse_link(&h, &base);
    assert!(links.len() <= MAX_LINKS);
    // Count each shared target and parameter list once.
    let (mut targets, mut lists, mut bytes) = (HashSet::new(), HashSet::new(), 0usize);
    for l in &links {
        assert!(l.params().len() <= MAX_LINK_PARAMS);
        bytes += l.rel().len();
        if targets.insert(l.target().as_ptr()) {
            bytes += l.target().len();
        }
        if lists.insert(l.params().as_ptr()) {
            bytes += l
                .params()
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>();
        }
    }
    // Invalid UTF-8 can triple in size (U+FFFD); resolving a target or an anchor adds at most
    // the base and a few separators.
    let input: usize = h.iter().map(|(_, v)| v.len()).sum();
    let values = targets.len();
    assert!(
        bytes <= 3 * input + values * 2 * (base.len() + 8),
        "{bytes} bytes from {input} input bytes"
    );
    let _ = next_link(&h, &base);
    // Reference resolution on its own: the result is no longer than both parts together.
    let reference = String::from_utf8_lossy(rest);
    let resolved = resolve_reference(&base, &reference);
    assert!(resolved.len() <= base.len() + reference.len() + 8);
});
