use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use sturdy_core::headers::format_http_date;
use sturdy_core::WallClock;
use tokio::time::Instant;

use crate::state::{bump, lock, RetryAfterForm, Shared};
use crate::ResetConnection;

type St = State<Arc<Shared>>;

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    let api = Router::new()
        .route("/orders", post(create_order).get(list_cursor))
        .route("/orders/link", get(list_link))
        .route("/orders/pages", get(list_pages))
        .route("/orders/offset", get(list_offset))
        .route("/orders/{id}", get(get_order))
        .layer(middleware::from_fn_with_state(shared.clone(), faults));
    Router::new()
        .merge(api)
        .route("/oauth/token", post(crate::oauth::token))
        .route("/health", get(|| async { "ok" }))
        .route(
            "/counter",
            get(crate::counter::read).put(crate::counter::write),
        )
        .layer(middleware::from_fn_with_state(
            shared.clone(),
            count_and_log,
        ))
        .with_state(shared)
}

async fn count_and_log(State(s): St, req: Request, next: Next) -> Response {
    bump(&s.counters.requests);
    let method = req.method().clone();
    let path = req
        .uri()
        .path_and_query()
        .map_or_else(|| req.uri().path().to_owned(), |p| p.as_str().to_owned());
    let res = next.run(req).await;
    let status = if res.extensions().get::<ResetConnection>().is_some() {
        0
    } else {
        res.status().as_u16()
    };
    s.record(method, path, status);
    res
}

fn problem(status: StatusCode, detail: &str) -> Response {
    (
        status,
        Json(json!({ "error": status.canonical_reason().unwrap_or("error"), "detail": detail })),
    )
        .into_response()
}

fn retry_after_value(form: RetryAfterForm) -> Option<HeaderValue> {
    match form {
        RetryAfterForm::Seconds(s) => Some(HeaderValue::from(s)),
        RetryAfterForm::Date(d) => {
            // A knob of `Duration::MAX` is a date about 30 years ahead, which an HTTP date
            // can write (past year 9999 it cannot), not a panic in the handler.
            let now = sturdy_core::SystemClock.now();
            let at = now
                .checked_add(d.min(sturdy_core::clock::FAR))
                .unwrap_or(now);
            HeaderValue::from_str(&format_http_date(at)).ok()
        }
        RetryAfterForm::Absent => None,
    }
}

/// What the fault layer decided, computed under the lock and acted on after it is released.
enum Verdict {
    Pass,
    Reject(Response),
}

/// Counts an API request in flight until dropped.
struct InFlight<'a>(&'a Shared);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.counters.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn faults(State(s): St, req: Request, next: Next) -> Response {
    bump(&s.counters.api_requests);
    let in_flight = s.counters.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
    let _counted = InFlight(&s);
    s.counters
        .peak_in_flight
        .fetch_max(in_flight, Ordering::Relaxed);
    let (mut latency, tail, capacity, deprecation, sunset) = {
        let k = lock(&s.knobs);
        (
            k.latency,
            k.tail_latency,
            k.capacity,
            k.deprecation,
            k.sunset,
        )
    };
    if let Some((p, slow)) = tail {
        if s.chance(p) {
            latency = slow;
        }
    }
    if let Some(c) = capacity {
        if in_flight > u64::from(c.shed_above) {
            bump(&s.counters.shed);
            return problem(StatusCode::SERVICE_UNAVAILABLE, "over capacity");
        }
        let limit = u64::from(c.limit.max(1));
        if in_flight > limit {
            // Checked: a large latency knob times the factor may not fit a `Duration`.
            let slower = latency.as_secs_f64() * (in_flight as f64 / limit as f64);
            latency = std::time::Duration::try_from_secs_f64(slower)
                .map_or(sturdy_core::clock::FAR, |d| d.min(sturdy_core::clock::FAR));
        }
    }
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let verdict = decide(&s, req.headers());
    let mut res = match verdict {
        Verdict::Pass => next.run(req).await,
        Verdict::Reject(r) => r,
    };
    if let Some(d) = deprecation {
        res.headers_mut().insert(
            "deprecation",
            HeaderValue::from_str(&format!("@{d}")).expect("digits"),
        );
    }
    if let Some(t) = sunset {
        if let Ok(v) = HeaderValue::from_str(&format_http_date(t)) {
            res.headers_mut().insert("sunset", v);
        }
    }
    res
}

fn decide(s: &Shared, headers: &HeaderMap) -> Verdict {
    let mut k = lock(&s.knobs);
    if let Some(want) = &k.api_version {
        let got = headers.get("api-version").and_then(|v| v.to_str().ok());
        if got != Some(want.as_str()) {
            return Verdict::Reject(problem(
                StatusCode::BAD_REQUEST,
                &format!("this API requires API-Version: {want}"),
            ));
        }
    }
    if k.require_auth {
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let valid = token.is_some_and(|t| {
            lock(&s.tokens)
                .get(t)
                .is_some_and(|exp| Instant::now() < *exp)
        });
        if !valid {
            bump(&s.counters.unauthorized);
            let mut r = problem(
                StatusCode::UNAUTHORIZED,
                "missing, expired or revoked token",
            );
            let challenge = if token.is_some() {
                "Bearer error=\"invalid_token\""
            } else {
                "Bearer"
            };
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(challenge),
            );
            return Verdict::Reject(r);
        }
    }
    if let Some(q) = k.server_rate_limit {
        let mut w = lock(&s.window);
        let now = Instant::now();
        if now.duration_since(w.0) >= q.window {
            *w = (now, 0);
        }
        let reset = q.window.saturating_sub(now.duration_since(w.0));
        let reset_secs = reset.as_secs() + u64::from(reset.subsec_nanos() > 0);
        if w.1 >= q.limit {
            bump(&s.counters.rate_limited);
            let mut r = problem(StatusCode::TOO_MANY_REQUESTS, "quota exceeded");
            let h = r.headers_mut();
            h.insert(header::RETRY_AFTER, HeaderValue::from(reset_secs));
            h.insert(
                "ratelimit",
                HeaderValue::from_str(&format!("\"default\";r=0;t={reset_secs}")).expect("ascii"),
            );
            h.insert(
                "ratelimit-policy",
                HeaderValue::from_str(&format!(
                    "\"default\";q={};w={}",
                    q.limit,
                    q.window.as_secs().max(1)
                ))
                .expect("ascii"),
            );
            return Verdict::Reject(r);
        }
        w.1 += 1;
    }
    let limited = if k.rate_limit_next > 0 {
        k.rate_limit_next -= 1;
        true
    } else {
        s.chance(k.rate_limit_rate)
    };
    if limited {
        bump(&s.counters.rate_limited);
        let mut r = problem(StatusCode::TOO_MANY_REQUESTS, "slow down");
        if let Some(v) = retry_after_value(k.retry_after) {
            r.headers_mut().insert(header::RETRY_AFTER, v);
        }
        return Verdict::Reject(r);
    }
    let failed = if k.fail_next > 0 {
        k.fail_next -= 1;
        true
    } else {
        s.chance(k.error_rate)
    };
    if failed {
        bump(&s.counters.server_errors);
        let status =
            StatusCode::from_u16(k.error_status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        return Verdict::Reject(problem(status, "injected failure"));
    }
    Verdict::Pass
}

/// Reads `Idempotency-Key` as a bare token or as a structured-field string.
fn idempotency_key(headers: &HeaderMap) -> Option<String> {
    let raw = headers.get("idempotency-key")?;
    if let Ok((sturdy_core::headers::sf::BareItem::String(s), _)) =
        sturdy_core::headers::sf::parse_item(raw.as_bytes())
    {
        return Some(s);
    }
    raw.to_str()
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

async fn create_order(State(s): St, headers: HeaderMap, body: Bytes) -> Response {
    let Ok(Value::Object(payload)) = serde_json::from_slice::<Value>(&body) else {
        return problem(StatusCode::BAD_REQUEST, "the body must be a JSON object");
    };
    let key = idempotency_key(&headers);
    let (idempotency, reset_next) = {
        let mut k = lock(&s.knobs);
        let reset = if k.reset_after_commit_next > 0 {
            k.reset_after_commit_next -= 1;
            true
        } else {
            s.chance(k.reset_after_commit_rate)
        };
        (k.idempotency, reset)
    };
    let (status, out) = {
        let mut book = lock(&s.book);
        if let Some(key) = &key {
            if let Some((first_payload, status, stored)) = book.keys.get(key) {
                if idempotency {
                    if *first_payload != body {
                        return problem(
                            StatusCode::UNPROCESSABLE_ENTITY,
                            "Idempotency-Key is already used with another payload",
                        );
                    }
                    bump(&s.counters.replayed);
                    let mut r = Response::new(Body::from(stored.clone()));
                    *r.status_mut() = StatusCode::from_u16(*status).unwrap_or(StatusCode::CREATED);
                    r.headers_mut().insert(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/json"),
                    );
                    r.headers_mut()
                        .insert("idempotent-replayed", HeaderValue::from_static("true"));
                    return r;
                }
                bump(&s.counters.duplicates_by_key);
            }
        }
        if !book.payloads.insert(body.clone()) {
            bump(&s.counters.duplicates_by_payload);
        }
        let id = format!("o_{}", book.orders.len() + 1);
        let mut order = payload;
        order.insert("id".into(), Value::String(id));
        if let Some(k) = &key {
            order.insert("idempotency_key".into(), Value::String(k.clone()));
        }
        let order = Value::Object(order);
        let out = Bytes::from(serde_json::to_vec(&order).unwrap_or_default());
        book.orders.push(order);
        if let Some(k) = key {
            book.keys.insert(k, (body, 201, out.clone()));
        }
        (StatusCode::CREATED, out)
    };
    bump(&s.counters.orders_committed);
    let mut r = Response::new(Body::from(out));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if reset_next {
        bump(&s.counters.resets);
        r.extensions_mut().insert(ResetConnection);
    }
    r
}

async fn get_order(State(s): St, Path(id): Path<String>) -> Response {
    let book = lock(&s.book);
    match book.orders.iter().find(|o| o["id"] == id.as_str()) {
        Some(o) => Json(o.clone()).into_response(),
        None => problem(StatusCode::NOT_FOUND, "no such order"),
    }
}

fn slice(s: &Shared, offset: usize, limit: usize) -> (Vec<Value>, usize) {
    bump(&s.counters.page_requests);
    let book = lock(&s.book);
    let total = book.orders.len();
    let end = offset.saturating_add(limit).min(total);
    let items = if offset < total {
        book.orders[offset..end].to_vec()
    } else {
        Vec::new()
    };
    (items, total)
}

fn clamp_limit(l: Option<usize>) -> usize {
    l.unwrap_or(20).clamp(1, 100)
}

#[derive(Deserialize)]
struct CursorQuery {
    cursor: Option<String>,
    limit: Option<usize>,
}

/// `GET /orders?cursor=&limit=` => `{"data": \[...\], "next_cursor": "c40" | null}`.
async fn list_cursor(State(s): St, Query(q): Query<CursorQuery>) -> Response {
    let offset = match q.cursor.as_deref() {
        None | Some("") => 0,
        Some(c) => match c.strip_prefix('c').and_then(|n| n.parse::<usize>().ok()) {
            Some(n) => n,
            None => return problem(StatusCode::BAD_REQUEST, "unknown cursor"),
        },
    };
    let limit = clamp_limit(q.limit);
    let (items, total) = slice(&s, offset, limit);
    let next = (offset + items.len() < total).then(|| format!("c{}", offset + items.len()));
    Json(json!({ "data": items, "next_cursor": next })).into_response()
}

#[derive(Deserialize)]
struct PageQuery {
    page: Option<usize>,
    per_page: Option<usize>,
}

/// `GET /orders/link?page=&per_page=` => a JSON array, with a relative `Link` `rel="next"`.
async fn list_link(State(s): St, Query(q): Query<PageQuery>) -> Response {
    let page = q.page.unwrap_or(1).max(1);
    let per = clamp_limit(q.per_page);
    let (items, total) = slice(&s, (page - 1).saturating_mul(per), per);
    let last = total.div_ceil(per).max(1);
    let mut links = Vec::new();
    if page < last {
        links.push(format!(
            "</orders/link?page={}&per_page={per}>; rel=\"next\"",
            page + 1
        ));
    }
    links.push(format!(
        "</orders/link?page={last}&per_page={per}>; rel=\"last\""
    ));
    let mut r = Json(items).into_response();
    if let Ok(v) = HeaderValue::from_str(&links.join(", ")) {
        r.headers_mut().insert(header::LINK, v);
    }
    r
}

/// `GET /orders/pages?page=&per_page=` => `{"items": \[...\], "page": p, "per_page": n, "total": N}`.
async fn list_pages(State(s): St, Query(q): Query<PageQuery>) -> Response {
    let page = q.page.unwrap_or(1).max(1);
    let per = clamp_limit(q.per_page);
    let (items, total) = slice(&s, (page - 1).saturating_mul(per), per);
    Json(json!({ "items": items, "page": page, "per_page": per, "total": total })).into_response()
}

#[derive(Deserialize)]
struct OffsetQuery {
    offset: Option<usize>,
    limit: Option<usize>,
}

/// `GET /orders/offset?offset=&limit=` => `{"items": \[...\], "offset": o, "limit": l, "total": N}`.
async fn list_offset(State(s): St, Query(q): Query<OffsetQuery>) -> Response {
    let offset = q.offset.unwrap_or(0);
    let limit = clamp_limit(q.limit);
    let (items, total) = slice(&s, offset, limit);
    Json(json!({ "items": items, "offset": offset, "limit": limit, "total": total }))
        .into_response()
}
