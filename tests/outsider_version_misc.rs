//! Outside tests: the version layer, query-parameter credentials, the decision trace and the
//! agent-facing summaries.
use crate::outsider_common;
use std::sync::{Arc, Mutex};

use outsider_common::*;
use sturdy::auth::AuthLayer;
use sturdy::core::summary::tool_result;
use sturdy::core::{find, ErrorSummary, RateLimited, Trace};
use sturdy::version::{Notice, VersionLayer};
use sturdy::ClientBuilder;
use tower::{Layer, ServiceExt};

fn query_pairs(uri: &str) -> Vec<(String, String)> {
    let u: http::Uri = uri.parse().unwrap();
    form_pairs(u.query().unwrap_or(""))
}

fn form_pairs(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|s| !s.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (pct_decode(k), pct_decode(v))
        })
        .collect()
}

fn pct_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() && i + 2 <= b.len() - 1 + 1 {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn query_version_values_are_encoded() {
    let api = Api::new(vec![], ok());
    let svc = VersionLayer::query("api-version", "2024 06&admin=true#x").layer(api.service());
    svc.oneshot(get("http://api.example.com/x?a=1"))
        .await
        .unwrap();
    let uri = api.seen()[0].uri.clone();
    let pairs = query_pairs(&uri);
    eprintln!("{uri} -> {pairs:?}");
    assert!(
        !pairs.iter().any(|(k, _)| k == "admin"),
        "the version injected a parameter: {uri}"
    );
    assert!(
        pairs.contains(&("api-version".into(), "2024 06&admin=true#x".into())),
        "{uri}"
    );
}

#[tokio::test]
async fn query_api_keys_are_encoded() {
    let api = Api::new(vec![], ok());
    let svc = AuthLayer::api_key_query("key", "a+b&c=d")
        .unwrap()
        .layer(api.service());
    svc.oneshot(get("http://api.example.com/x")).await.unwrap();
    let uri = api.seen()[0].uri.clone();
    let pairs = query_pairs(&uri);
    assert_eq!(
        pairs,
        vec![("key".to_owned(), "a+b&c=d".to_owned())],
        "{uri}"
    );
}

#[tokio::test]
async fn a_version_the_caller_set_is_kept() {
    let api = Api::new(vec![], ok());
    let svc = VersionLayer::header("api-version", "2024-06-01")
        .unwrap()
        .layer(api.service());
    let mut r = get("http://api.example.com/x");
    r.headers_mut()
        .insert("api-version", "2020-01-01".parse().unwrap());
    svc.oneshot(r).await.unwrap();
    assert_eq!(
        api.seen()[0]
            .headers
            .get_all("api-version")
            .iter()
            .collect::<Vec<_>>(),
        ["2020-01-01"]
    );
    let api = Api::new(vec![], ok());
    let svc = VersionLayer::query("v", "2").layer(api.service());
    svc.oneshot(get("http://api.example.com/x?v=1"))
        .await
        .unwrap();
    assert_eq!(
        query_pairs(&api.seen()[0].uri),
        vec![("v".to_owned(), "1".to_owned())]
    );
    assert!(VersionLayer::header("bad name", "x").is_err());
    assert!(VersionLayer::header("api-version", "a\nb").is_err());
}

#[tokio::test]
async fn hostile_deprecation_and_sunset_values() {
    let values = [
        ("deprecation", "@-99999999999999999"),
        ("deprecation", "@99999999999999999999999"),
        ("deprecation", "@9223372036854775807"),
        ("deprecation", "@-9223372036854775808"),
        ("deprecation", "true"),
        ("deprecation", "false"),
        ("deprecation", "@"),
        ("deprecation", "@1.5"),
        ("deprecation", "Fri, 31 Dec 9999 23:59:59 GMT"),
        ("deprecation", &"x".repeat(10_000)),
        ("sunset", "Thu, 01 Jan 1970 00:00:00 GMT"),
        ("sunset", "Mon, 01 Jan 0001 00:00:00 GMT"),
        ("sunset", "@123"),
        ("sunset", "garbage"),
        ("sunset", "Fri, 31 Dec 99999 23:59:59 GMT"),
    ];
    let notices = Arc::new(Mutex::new(Vec::<Notice>::new()));
    let log = notices.clone();
    for (i, (name, value)) in values.iter().enumerate() {
        let api = Api::new(
            vec![Answer::Status(200, vec![(name, value.to_string())], "")],
            ok(),
        );
        let log = log.clone();
        let svc = VersionLayer::header("api-version", "1")
            .unwrap()
            .on_notice(move |n: &Notice| log.lock().unwrap().push(n.clone()))
            .layer(api.service());
        let r = tokio::spawn(async move {
            svc.oneshot(get(&format!("http://api.example.com/e{i}")))
                .await
                .map(|r| r.status())
        })
        .await;
        assert!(r.is_ok(), "{name}: {value:.40} panicked");
    }
    for n in notices.lock().unwrap().iter() {
        eprintln!("{} {:?} {:?}", n.endpoint, n.deprecation, n.sunset);
    }
}

/// The composed client, a hostile `Retry-After`: the rate limiter caps the pause at 5 minutes
/// (RELIABILITY.md: "the next call waits at most 5 min"), and the error handed to the caller
/// (and to an AI agent through `tool_result`) is capped too, not millions of years.
#[tokio::test(start_paused = true)]
async fn hostile_retry_after_is_capped_for_the_caller() {
    let api = Api::new(
        vec![status_h(429, &[("retry-after", "99999999999999999999")])],
        ok(),
    );
    let client = ClientBuilder::new().build(api.service());
    let err = client
        .clone()
        .oneshot(get("http://api.example.com/x"))
        .await
        .unwrap_err();
    let summary = ErrorSummary::of(&*err);
    eprintln!(
        "message: {err}\nadvice: {}\nretry_after_ms: {:?}",
        summary.advice(),
        summary.retry_after_ms
    );
    let tool = tool_result::<()>(Err(err));
    eprintln!("tool_result: {tool}");
    let rl = summary.retry_after_ms.unwrap();
    assert!(
        rl <= 300_000,
        "the caller is told to wait {rl} ms although the limiter caps the pause at 5 min"
    );
}

#[tokio::test(start_paused = true)]
async fn the_trace_records_attempts() {
    let api = Api::new(vec![status(503)], ok());
    let client = ClientBuilder::new().build(api.service());
    let trace = Trace::new();
    let mut r = post("http://api.example.com/orders", "{}");
    r.extensions_mut().insert(trace.clone());
    client.oneshot(r).await.unwrap();
    let events = trace.events();
    eprintln!("trace: {events:?}");
    assert!(
        !events.is_empty(),
        "the trace is empty after a retried call"
    );
}

#[tokio::test(start_paused = true)]
async fn rate_limited_error_words() {
    let api = Api::new(vec![status_h(429, &[("retry-after", "3600")])], ok());
    let client = ClientBuilder::new().build(api.service());
    let err = client
        .clone()
        .oneshot(post("http://api.example.com/orders", "{}"))
        .await
        .unwrap_err();
    eprintln!("429 1h on POST: {err}");
    // The server's hour, capped at the 5 minutes the limiter pauses at most.
    assert_eq!(
        find::<RateLimited>(&*err).unwrap().retry_after(),
        sturdy::retry::MAX_REPORTED_WAIT
    );
    // A second call is refused locally: the pause (capped at 5 min) exceeds max_wait 30 s.
    let err = client
        .clone()
        .oneshot(post("http://api.example.com/orders", "{}"))
        .await
        .unwrap_err();
    eprintln!("second call: {err}; summary {:?}", ErrorSummary::of(&*err));
    assert_eq!(api.calls(), 1);
}

/// sturdy_core::headers::date docs: "A date before 1970 is an error". A four-digit year below
/// 100 is not a two-digit RFC 850 year: `Mon, 01 Jan 0001` is not 2001-01-01.
#[test]
fn http_dates_before_1970_are_errors() {
    let mut wrong = Vec::new();
    use std::time::UNIX_EPOCH;
    use sturdy::core::headers::parse_http_date;
    for v in [
        "Mon, 01 Jan 0001 00:00:00 GMT",
        "Sat, 01 Jan 0050 00:00:00 GMT",
        "Thu, 31 Dec 0099 23:59:59 GMT",
        "Wed, 31 Dec 1969 23:59:59 GMT",
        "Sunday, 06-Nov-94 08:49:47 GMT",
        "Sun Nov  6 08:49:47 1994",
        "Fri, 31 Dec 9999 23:59:59 GMT",
        "Sat, 01 Jan 10000 00:00:00 GMT",
    ] {
        let r = parse_http_date(v.as_bytes(), "date");
        let secs = r.as_ref().ok().map(|t| {
            t.duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(-1)
        });
        eprintln!(
            "{v} -> {secs:?} {:?}",
            r.as_ref().err().map(ToString::to_string)
        );
        if (v.contains(" 0001 ")
            || v.contains(" 0050 ")
            || v.contains(" 0099 ")
            || v.contains(" 1969 "))
            && !(r.is_err() || secs == Some(0))
        {
            wrong.push(format!("{v} read as {secs:?}"));
        }
    }
    assert!(wrong.is_empty(), "dates before 1970 accepted: {wrong:?}");
}

/// ARCHITECTURE.md: "Errors: `RateLimited { retry_after }`, `CircuitOpen { retry_in }` ... Find
/// them with `err.downcast_ref::<T>()`." Through the retry layer they are in the chain, not on
/// top: `find` is needed (as the README says).
#[tokio::test(start_paused = true)]
async fn doc_downcast_ref_finds_rate_limited_only_with_find() {
    let api = Api::new(vec![status_h(429, &[("retry-after", "3600")])], ok());
    let client = ClientBuilder::new().build(api.service());
    let err = client
        .oneshot(get("http://api.example.com/x"))
        .await
        .unwrap_err();
    eprintln!(
        "downcast_ref: {:?}, find: {:?}",
        err.downcast_ref::<RateLimited>().is_some(),
        find::<RateLimited>(&*err).is_some()
    );
    assert!(find::<RateLimited>(&*err).is_some());
}
