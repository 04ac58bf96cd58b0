//! `Paginate::page` with a correctly signed cursor around any payload: past the tag check, the
//! decoder and every strategy must cope with whatever the payload says, without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sturdy_fuzz::pagers;

fuzz_target!(|data: &[u8]| {
    let Some((&select, payload)) = data.split_first() else {
        return;
    };
    let p = pagers::get();
    let cursor = pagers::sign(payload);
    let limit = usize::from(select >> 2);
    let _ = match select % 4 {
        0 => p.runtime.block_on(p.json.page(Some(&cursor), limit)),
        1 => p.runtime.block_on(p.link.page(Some(&cursor), limit)),
        2 => p.runtime.block_on(p.number.page(Some(&cursor), limit)),
        _ => p.runtime.block_on(p.offset.page(Some(&cursor), limit)),
    };
});
