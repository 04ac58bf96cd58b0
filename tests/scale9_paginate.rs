//! The memory a hostile page costs: a page within the byte limit (`with_max_page_bytes`,
//! 16 MiB by default) whose body is an array of the smallest JSON values (`[0,0,0,...]`, two
//! bytes an item). Measured with dhat's peak at page sizes n, 4n and 16n.
#![cfg(feature = "full")]

use std::convert::Infallible;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{Request, Response};
use http_body_util::Full;
use sturdy::paginate::{JsonCursor, Paginate};
use tower::service_fn;

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

fn page_of_zeros(bytes: usize) -> Bytes {
    let items = bytes / 2;
    let mut s = String::with_capacity(bytes + 32);
    s.push_str("{\"data\":[");
    for i in 0..items {
        if i > 0 {
            s.push(',');
        }
        s.push('0');
    }
    s.push_str("],\"next\":null}");
    Bytes::from(s)
}

/// Peak heap bytes while the first page of a walk is fetched and parsed, above what was live
/// before, for a page of `bytes` bytes.
fn peak_for(rt: &tokio::runtime::Runtime, bytes: usize) -> (usize, usize) {
    let body = page_of_zeros(bytes);
    let len = body.len();
    let svc = service_fn(move |_r: Request<Full<Bytes>>| {
        let body = body.clone();
        async move { Ok::<_, Infallible>(Response::new(Full::new(body))) }
    });
    let pager = Paginate::builder(
        svc,
        "http://api.example.com/items",
        JsonCursor::new("/data", "/next"),
    )
    .with_max_items(1_000)
    .build()
    .unwrap();
    let before = dhat::HeapStats::get();
    let items = rt.block_on(async {
        let mut pages = pager.pages();
        let first = pages.next().await.unwrap().unwrap();
        first.items.len()
    });
    let after = dhat::HeapStats::get();
    assert!(items <= 1_000);
    (len, after.max_bytes.saturating_sub(before.curr_bytes))
}

/// A 16 MiB page of `0,` items is 8 million JSON values; each becomes a 32-byte
/// `serde_json::Value`. The items are taken out of the parsed page, not copied, so the peak is
/// the parse: about 16 times a page of such tiny items (paginate.md says so), linear in the page.
#[test]
fn a_page_costs_memory_linear_in_its_size() {
    let _profiler = dhat::Profiler::builder().testing().build();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let mut rows = Vec::new();
    for bytes in [128 * 1024, 512 * 1024, 2 * 1024 * 1024] {
        let (len, peak) = peak_for(&rt, bytes);
        eprintln!(
            "page {len} bytes: peak {peak} bytes ({:.1}x)",
            peak as f64 / len as f64
        );
        rows.push((len, peak));
    }
    // Linear in the page: the factor does not grow with it.
    let f = |(len, peak): (usize, usize)| peak as f64 / len as f64;
    assert!(f(rows[2]) < 2.0 * f(rows[0]) + 1.0, "{rows:?}");
    // And bounded by the parse's factor (the body, its parse; the items are moved, not copied).
    for r in &rows {
        assert!(f(*r) < 20.0, "{rows:?}");
    }
}
