//! The metrics and `tracing` events a reqwest-middleware client with a sturdy stack records
//! against a loopback server: the documented names, labels and values, and no secret or
//! unbounded label value.

use std::sync::{Arc, Mutex};

use metrics::Unit;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};

use crate::client31_util::*;

/// (name, labels, value) of every metric recorded.
type Row = (String, Vec<(String, String)>, DebugValue, Option<Unit>);

fn rows(s: &Snapshotter) -> Vec<Row> {
    s.snapshot()
        .into_vec()
        .into_iter()
        .map(|(ck, unit, _desc, v)| {
            let (_kind, key) = ck.into_parts();
            let labels = key
                .labels()
                .map(|l| (l.key().to_owned(), l.value().to_owned()))
                .collect();
            (key.name().to_owned(), labels, v, unit)
        })
        .collect()
}

fn label<'a>(r: &'a Row, k: &str) -> Option<&'a str> {
    r.1.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str())
}

fn counter(rs: &[Row], name: &str, want: &[(&str, &str)]) -> u64 {
    rs.iter()
        .filter(|r| r.0 == name && want.iter().all(|(k, v)| label(r, k) == Some(*v)))
        .map(|r| match r.2 {
            DebugValue::Counter(n) => n,
            _ => 0,
        })
        .sum()
}

fn assert_bounded(rs: &[Row]) {
    for r in rs {
        for (k, v) in &r.1 {
            assert!(
                !v.contains("SECRET") && !v.contains('/') && !v.contains('?') && !v.contains('='),
                "label {k}={v} of {} is unbounded or secret",
                r.0
            );
            assert!(v.len() < 64, "label {k}={v} of {}", r.0);
        }
        assert!(r.0.starts_with("sturdy."), "{}", r.0);
    }
}

#[tokio::test]
async fn client31_metrics_retries_delays_pauses_with_documented_labels() {
    let rec = DebuggingRecorder::new();
    let snap = rec.snapshotter();
    let _g = metrics::set_default_local_recorder(&rec);
    sturdy::core::events::describe_metrics();

    let s = serve(vec![with_ra(429, "1"), with_ra(503, "0"), ok()]).await;
    let port = s.addr.port().to_string();
    let res = within(
        10,
        mw(true)
            .get(s.url("/orders?api_key=SECRET31&page=2"))
            .bearer_auth("SECRETTOKEN")
            .send(),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(s.count(), 3);

    let rs = rows(&snap);
    let base = [
        ("server.address", "127.0.0.1"),
        ("server.port", port.as_str()),
        ("http.request.method", "GET"),
    ];
    let mut w = base.to_vec();
    w.push(("error.type", "rate_limited"));
    assert_eq!(counter(&rs, "sturdy.retry.retries", &w), 1, "{rs:#?}");
    let mut w = base.to_vec();
    w.push(("error.type", "503"));
    assert_eq!(counter(&rs, "sturdy.retry.retries", &w), 1, "{rs:#?}");

    let delays: Vec<_> = rs.iter().filter(|r| r.0 == "sturdy.retry.delay").collect();
    assert!(
        delays
            .iter()
            .any(|r| label(r, "sturdy.delay.source") == Some("retry_after")
                && label(r, "server.port") == Some(port.as_str())),
        "{rs:#?}"
    );
    for d in &delays {
        assert_eq!(d.3, Some(Unit::Seconds), "{d:?}");
    }
    let pauses = counter(
        &rs,
        "sturdy.ratelimit.pauses",
        &[
            ("server.address", "127.0.0.1"),
            ("sturdy.pause.source", "retry_after"),
            ("http.response.status_code", "429"),
        ],
    );
    assert!(pauses >= 1, "{rs:#?}");
    assert!(
        rs.iter().any(|r| r.0 == "sturdy.ratelimit.pause.duration"
            && label(r, "server.port") == Some(port.as_str())),
        "{rs:#?}"
    );
    assert_bounded(&rs);
}

#[tokio::test]
async fn client31_metrics_huge_retry_after_pause_capped_and_stopped() {
    let rec = DebuggingRecorder::new();
    let snap = rec.snapshotter();
    let _g = metrics::set_default_local_recorder(&rec);
    let s = serve(vec![with_ra(429, "99999999999999999999")]).await;
    let _ = within(10, mw(true).get(s.url("/a")).send())
        .await
        .unwrap_err();
    let rs = rows(&snap);
    assert!(
        counter(
            &rs,
            "sturdy.ratelimit.pauses",
            &[
                ("sturdy.pause.source", "retry_after"),
                ("http.response.status_code", "429")
            ]
        ) >= 1,
        "{rs:#?}"
    );
    for r in rs
        .iter()
        .filter(|r| r.0 == "sturdy.ratelimit.pause.duration")
    {
        if let DebugValue::Histogram(v) = &r.2 {
            assert!(v.iter().all(|x| x.into_inner() <= 300.0), "{r:?}");
        }
    }
    assert_eq!(
        counter(
            &rs,
            "sturdy.retry.stopped",
            &[
                ("error.type", "rate_limited"),
                ("sturdy.retry.stop_reason", "wait_too_long")
            ]
        ),
        1,
        "{rs:#?}"
    );
    assert_bounded(&rs);
}

#[tokio::test]
async fn client31_metrics_stopped_not_idempotent_and_wait_too_long() {
    let rec = DebuggingRecorder::new();
    let snap = rec.snapshotter();
    let _g = metrics::set_default_local_recorder(&rec);

    let s = serve(vec![status(503), ok()]).await;
    let res = within(
        10,
        mw(false).post(s.url("/orders?key=SECRET")).body("x").send(),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 503);
    let s2 = serve(vec![with_ra(503, "120"), ok()]).await;
    let _ = within(10, mw(true).delete(s2.url("/orders/1")).send()).await;
    assert_eq!(s2.count(), 1);

    let rs = rows(&snap);
    assert_eq!(
        counter(
            &rs,
            "sturdy.retry.stopped",
            &[
                ("http.request.method", "POST"),
                ("error.type", "503"),
                ("sturdy.retry.stop_reason", "not_idempotent"),
                ("server.address", "127.0.0.1"),
            ]
        ),
        1,
        "{rs:#?}"
    );
    assert_eq!(
        counter(
            &rs,
            "sturdy.retry.stopped",
            &[
                ("http.request.method", "DELETE"),
                ("error.type", "503"),
                ("sturdy.retry.stop_reason", "wait_too_long"),
            ]
        ),
        1,
        "{rs:#?}"
    );
    assert_bounded(&rs);
}

#[tokio::test]
async fn client31_metrics_plain_success_records_nothing() {
    let rec = DebuggingRecorder::new();
    let snap = rec.snapshotter();
    let _g = metrics::set_default_local_recorder(&rec);
    let s = serve(vec![ok()]).await;
    let res = within(10, mw(true).post(s.url("/orders")).body("x").send())
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let rs = rows(&snap);
    assert!(rs.is_empty(), "{rs:#?}");
}

#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn client31_tracing_pause_capped_warns_without_secrets() {
    let logs = Logs::default();
    let l = logs.clone();
    let sub = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || l.clone())
        .finish();
    let _g = crate::logs13_common::set_default(sub);

    let s = serve(vec![with_ra(429, "99999999999999999999")]).await;
    let err = within(
        10,
        mw(true)
            .get(s.url("/orders?api_key=SECRET31"))
            .header("authorization", "Bearer SECRETTOKEN")
            .header("idempotency-key", "SECRETKEY")
            .send(),
    )
    .await
    .unwrap_err();
    let _ = err;
    let text = String::from_utf8_lossy(&logs.0.lock().unwrap()).into_owned();
    assert!(
        text.contains("WARN"),
        "a capped pause is a tracing warning: {text}"
    );
    for secret in ["SECRET31", "SECRETTOKEN", "SECRETKEY"] {
        assert!(!text.contains(secret), "{secret} in the logs: {text}");
    }
}
