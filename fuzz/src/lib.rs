//! Helpers shared by the fuzz targets: turning fuzz input into header maps, clocks and statuses.

use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

/// The latest "now" a target uses: 9999-12-31T23:59:59Z, the end of HTTP-date's range.
const MAX_NOW_SECS: u64 = 253_402_300_799;

/// Splits off the first 8 bytes (or fewer) as a clock reading between 1970 and 9999.
pub fn take_now(data: &[u8]) -> (SystemTime, &[u8]) {
    let n = data.len().min(8);
    let mut raw = [0u8; 8];
    raw[..n].copy_from_slice(&data[..n]);
    let secs = u64::from_le_bytes(raw) % (MAX_NOW_SECS + 1);
    (
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs),
        &data[n..],
    )
}

/// Splits off the first 2 bytes (or fewer) as a status code (100..=599; 429 when it is out of
/// range).
pub fn take_status(data: &[u8]) -> (StatusCode, &[u8]) {
    let n = data.len().min(2);
    let mut raw = [0u8; 2];
    raw[..n].copy_from_slice(&data[..n]);
    let code = 100 + u16::from_le_bytes(raw) % 500;
    (
        StatusCode::from_u16(code).unwrap_or(StatusCode::TOO_MANY_REQUESTS),
        &data[n..],
    )
}

/// The input's lines, each a field line of one of `names` in turn (lines that are not valid
/// header values are skipped).
pub fn header_lines(names: &[&'static str], data: &[u8]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (i, line) in data.split(|b| *b == b'\n').enumerate() {
        if let Ok(v) = HeaderValue::from_bytes(line) {
            h.append(HeaderName::from_static(names[i % names.len()]), v);
        }
    }
    h
}

/// Pagers over an in-process API that counts its requests, one per strategy, for the cursor
/// targets.
pub mod pagers {
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, OnceLock};

    use base64::Engine as _;
    use bytes::Bytes;
    use hmac::{Hmac, Mac};
    use http::{Request, Response};
    use http_body_util::Full;
    use sha2::Sha256;
    use sturdy_paginate::{JsonCursor, LinkHeader, OffsetLimit, PageNumber, Paginate};
    use tokio::runtime::Runtime;
    use tower::service_fn;

    /// The cursor key every pager here uses.
    pub const KEY: [u8; 32] = [0x5a; 32];
    /// The pagers' URI.
    pub const BASE: &str = "http://api.example.com/items";

    /// The pagers, the runtime that drives them and the API's request count.
    pub struct Pagers {
        /// A [`JsonCursor`] pager.
        pub json: Paginate<JsonCursor>,
        /// A [`LinkHeader`] pager.
        pub link: Paginate<LinkHeader>,
        /// A [`PageNumber`] pager.
        pub number: Paginate<PageNumber>,
        /// An [`OffsetLimit`] pager.
        pub offset: Paginate<OffsetLimit>,
        /// A current-thread runtime with time enabled.
        pub runtime: Runtime,
        requests: Arc<AtomicUsize>,
    }

    impl Pagers {
        /// Requests the API has answered so far.
        pub fn requests(&self) -> usize {
            self.requests.load(Ordering::SeqCst)
        }
    }

    /// Signs `payload` as the pagers here sign their cursors (see sturdy-paginate's cursor
    /// module): base64url of a 16-byte HMAC-SHA-256 tag, then the payload.
    pub fn sign(payload: &[u8]) -> String {
        let mut m = Hmac::<Sha256>::new_from_slice(&KEY).unwrap();
        m.update(b"sturdy-paginate cursor v1\0");
        m.update(BASE.as_bytes());
        m.update(b"\0");
        m.update(payload);
        let tag = m.finalize().into_bytes();
        let mut raw = tag[..16].to_vec();
        raw.extend_from_slice(payload);
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
    }

    /// The pagers, made once per process.
    pub fn get() -> &'static Pagers {
        static PAGERS: OnceLock<Pagers> = OnceLock::new();
        PAGERS.get_or_init(|| {
            let requests = Arc::new(AtomicUsize::new(0));
            let count = requests.clone();
            let api = service_fn(move |_req: Request<Full<Bytes>>| {
                count.fetch_add(1, Ordering::SeqCst);
                async {
                    let mut r = Response::new(Full::<Bytes>::from(
                        r#"{"data":[1,2,3],"items":[1,2,3],"next":"n","total":10}"#,
                    ));
                    r.headers_mut().insert(
                        "link",
                        http::HeaderValue::from_static("</items?page=2>; rel=\"next\""),
                    );
                    Ok::<_, Infallible>(r)
                }
            });
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .unwrap();
            let pagers = Pagers {
                json: Paginate::builder(api.clone(), BASE, JsonCursor::new("/data", "/next"))
                    .with_cursor_key(KEY)
                    .build()
                    .unwrap(),
                link: Paginate::builder(api.clone(), BASE, LinkHeader::new("/data"))
                    .with_cursor_key(KEY)
                    .build()
                    .unwrap(),
                number: Paginate::builder(
                    api.clone(),
                    BASE,
                    PageNumber::new("/items").with_total("/total"),
                )
                .with_cursor_key(KEY)
                .build()
                .unwrap(),
                offset: Paginate::builder(api, BASE, OffsetLimit::new("/items"))
                    .with_cursor_key(KEY)
                    .build()
                    .unwrap(),
                runtime,
                requests,
            };
            // The signing above must match the pagers', or the signed target would only ever
            // test the refusal path.
            let good = sign(br#"{"c":"abc","s":1,"l":3}"#);
            let page = pagers
                .runtime
                .block_on(pagers.json.page(Some(&good), 2))
                .expect("a cursor signed like the pager's is accepted");
            assert_eq!(page.items.len(), 2);
            pagers
        })
    }
}
