//! `Paginate::page` with any string as the cursor: it is refused, and no request is sent.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sturdy_fuzz::pagers;

fuzz_target!(|data: &[u8]| {
    let p = pagers::get();
    let cursor = String::from_utf8_lossy(data);
    let before = p.requests();
    let json = p.runtime.block_on(p.json.page(Some(&cursor), 5));
    let link = p.runtime.block_on(p.link.page(Some(&cursor), 5));
    assert!(
        json.is_err() && link.is_err(),
        "an unsigned cursor was accepted"
    );
    assert_eq!(p.requests(), before, "a refused cursor was fetched");
});
