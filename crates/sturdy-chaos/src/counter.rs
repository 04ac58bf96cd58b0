//! `/counter`: a resource under optimistic concurrency control (RFC 9110 §13.1.1 `If-Match`).
//!
//! `GET /counter` answers `{"value": v, "version": n}` with `ETag: "n"`. `PUT /counter` with a body
//! `{"value": v}` writes only when its `If-Match` names the current version; a stale version gets
//! 412 and the client must read again. Faults do not apply here; [`Knobs::counter_latency`]
//! delays every request before it is served.
//!
//! [`Knobs::counter_latency`]: crate::Knobs::counter_latency

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use rand::Rng as _;
use serde_json::{json, Value};

use crate::state::{lock, Shared};

/// The state of `/counter` and what it saw, from
/// [`ChaosServer::counter`](crate::ChaosServer::counter).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CounterStats {
    /// The current value (0 at start).
    pub value: i64,
    /// The current version: the number of successful writes (0 at start).
    pub version: u64,
    /// `GET /counter` requests answered.
    pub reads: u64,
    /// `PUT /counter` requests that wrote (200).
    pub writes: u64,
    /// `PUT /counter` requests refused for a stale `If-Match` (412).
    pub conflicts: u64,
    /// `/counter` requests refused as malformed: no `If-Match` (428), or a body that is not
    /// `{"value": <integer>}` (400).
    pub rejected: u64,
}

impl CounterStats {
    /// Every request `/counter` answered: reads, writes, conflicts and rejections.
    pub fn calls(&self) -> u64 {
        self.reads + self.writes + self.conflicts + self.rejected
    }
}

fn etag(version: u64) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{version}\"")).expect("digits and quotes")
}

fn state_response(status: StatusCode, value: i64, version: u64) -> Response {
    let mut r = (status, Json(json!({ "value": value, "version": version }))).into_response();
    r.headers_mut().insert(header::ETAG, etag(version));
    r
}

fn problem(status: StatusCode, detail: &str) -> Response {
    (
        status,
        Json(json!({ "error": status.canonical_reason().unwrap_or("error"), "detail": detail })),
    )
        .into_response()
}

async fn delay(s: &Shared) {
    let (mut latency, jitter) = {
        let k = lock(&s.knobs);
        (k.counter_latency, k.counter_latency_jitter)
    };
    if !jitter.is_zero() {
        let nanos = u64::try_from(jitter.as_nanos()).unwrap_or(u64::MAX);
        latency += Duration::from_nanos(lock(&s.rng).random_range(0..=nanos));
    }
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
}

/// What `If-Match` asks for.
enum Precondition {
    /// No usable header.
    Missing,
    /// `*`: any current representation (the counter always has one).
    Any,
    /// A list of entity tags; only strong tags can match (RFC 9110 §13.1.1 uses strong comparison).
    Tags(Vec<String>),
}

fn precondition(headers: &HeaderMap) -> Precondition {
    let mut tags = Vec::new();
    let mut seen = false;
    for v in headers.get_all(header::IF_MATCH) {
        let Ok(v) = v.to_str() else { continue };
        for item in v.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            seen = true;
            if item == "*" {
                return Precondition::Any;
            }
            if let Some(tag) = item.strip_prefix('"').and_then(|t| t.strip_suffix('"')) {
                tags.push(tag.to_owned());
            }
        }
    }
    if seen {
        Precondition::Tags(tags)
    } else {
        Precondition::Missing
    }
}

/// `GET /counter`.
pub(crate) async fn read(State(s): State<Arc<Shared>>) -> Response {
    delay(&s).await;
    let (value, version) = {
        let mut c = lock(&s.counter);
        c.reads += 1;
        (c.value, c.version)
    };
    state_response(StatusCode::OK, value, version)
}

/// `PUT /counter`: a compare-and-set on the version named by `If-Match`.
pub(crate) async fn write(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    delay(&s).await;
    let pre = precondition(&headers);
    let value = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v.get("value").and_then(Value::as_i64));
    let mut c = lock(&s.counter);
    let Some(value) = value else {
        c.rejected += 1;
        return problem(
            StatusCode::BAD_REQUEST,
            "the body must be {\"value\": <integer>}",
        );
    };
    let current = c.version.to_string();
    let matches = match &pre {
        Precondition::Missing => {
            c.rejected += 1;
            return problem(
                StatusCode::PRECONDITION_REQUIRED,
                "send If-Match with the ETag of the version you read",
            );
        }
        Precondition::Any => true,
        Precondition::Tags(tags) => tags.contains(&current),
    };
    if !matches {
        c.conflicts += 1;
        drop(c);
        return problem(
            StatusCode::PRECONDITION_FAILED,
            "the counter changed since you read it: read it again and retry",
        );
    }
    c.value = value;
    c.version += 1;
    c.writes += 1;
    let (value, version) = (c.value, c.version);
    drop(c);
    state_response(StatusCode::OK, value, version)
}
