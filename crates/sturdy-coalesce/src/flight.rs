//! Calls in flight, per host: who may join which call, and what a finished call leaves behind.

use std::any::Any;
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use futures_util::future::{Shared, WeakShared};
use http::{HeaderMap, HeaderName, Method, Request};
use sturdy_core::events::EventHook;
use sturdy_core::keyed::{Idle, KeyedMap, Local};
use sturdy_core::BoxError;

/// Which headers make two requests different.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum KeyHeaders {
    /// Every header but these (per-request noise such as trace ids).
    AllExcept(Vec<HeaderName>),
    /// Only these.
    Only(Vec<HeaderName>),
}

/// The headers left out of the key by default: they differ on every request and do not change
/// the response.
pub(crate) fn default_ignored() -> Vec<HeaderName> {
    [
        "traceparent",
        "tracestate",
        "baggage",
        "x-request-id",
        "x-correlation-id",
    ]
    .into_iter()
    .map(HeaderName::from_static)
    .collect()
}

/// The layer's settings.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) headers: KeyHeaders,
    pub(crate) max_body: usize,
    /// How long the shared body may take to arrive once its head has (`None`: unbounded).
    pub(crate) body_timeout: Option<std::time::Duration>,
    pub(crate) max_hosts: usize,
    pub(crate) events: EventHook,
    /// Whether keys are hosts (false once `with_key` chose other keys).
    pub(crate) keys_are_hosts: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            headers: KeyHeaders::AllExcept(default_ignored()),
            max_body: 1 << 20,
            body_timeout: Some(std::time::Duration::from_secs(30)),
            max_hosts: 1_024,
            events: EventHook::none(),
            keys_are_hosts: true,
        }
    }
}

/// Whether a request may share a call: GET or HEAD with an empty body.
pub(crate) fn coalescable<B: http_body::Body>(req: &Request<B>) -> bool {
    let m = req.method();
    (m == Method::GET || m == Method::HEAD)
        && (req.body().is_end_stream() || req.body().size_hint().upper() == Some(0))
        // A request with settings of its own (a deadline, no retries) goes on its own: a shared
        // call would run under the settings of whichever request started it.
        && req.extensions().get::<sturdy_core::CallOptions>().is_none()
}

/// The identity of a request: method, URI and the key headers, each length-prefixed so that no
/// two different requests give the same bytes.
pub(crate) fn key_of<B>(req: &Request<B>, headers: &KeyHeaders) -> Vec<u8> {
    fn push(out: &mut Vec<u8>, bytes: &[u8]) {
        out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        out.extend_from_slice(bytes);
    }
    let mut out = Vec::with_capacity(128);
    let uri = req.uri();
    push(&mut out, req.method().as_str().as_bytes());
    push(&mut out, uri.scheme_str().unwrap_or("").as_bytes());
    let h = req.headers();
    match uri.authority() {
        Some(a) => push(&mut out, a.as_str().as_bytes()),
        // A relative URI (a request an axum app forwards, say) names its host in `Host` only.
        // It is part of the identity whatever the key headers: two hosts' requests for one path
        // can meet in one table (past `with_max_hosts`, or under `with_key`).
        None => {
            push(&mut out, b"");
            let hosts = h.get_all(http::header::HOST);
            out.extend_from_slice(&(hosts.iter().count() as u32).to_le_bytes());
            for value in hosts {
                push(&mut out, value.as_bytes());
            }
        }
    }
    push(
        &mut out,
        uri.path_and_query().map_or("", |p| p.as_str()).as_bytes(),
    );
    match headers {
        KeyHeaders::AllExcept(ignored) => {
            // By name, so that the same headers set in another order are the same request
            // (the order of fields with different names means nothing, RFC 9110 section 5.3);
            // the values of one name keep their order, which does mean something.
            let mut names: Vec<&http::HeaderName> =
                h.keys().filter(|n| !ignored.contains(n)).collect();
            names.sort_unstable_by(|a, b| a.as_str().cmp(b.as_str()));
            for name in names {
                for value in h.get_all(name) {
                    push(&mut out, name.as_str().as_bytes());
                    push(&mut out, value.as_bytes());
                }
            }
        }
        KeyHeaders::Only(names) => {
            for name in names {
                for value in h.get_all(name) {
                    push(&mut out, name.as_str().as_bytes());
                    push(&mut out, value.as_bytes());
                }
            }
        }
    }
    out
}

/// A response with its body (and trailers) in memory.
pub(crate) struct Buffered {
    pub(crate) parts: http::response::Parts,
    pub(crate) body: Bytes,
    pub(crate) trailers: Option<HeaderMap>,
}

/// What a shared call leaves for its callers.
#[derive(Clone)]
pub(crate) enum Outcome {
    /// The response, its body buffered in full.
    Full(Arc<Buffered>),
    /// The body was larger than the bound: the response waits in the call's [`Handoff`] for one
    /// caller, who gets it streamed.
    TooLarge,
    /// The call failed.
    Failed(Arc<BoxError>),
}

impl fmt::Debug for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Full(b) => f
                .debug_struct("Full")
                .field("status", &b.parts.status)
                .field("body_len", &b.body.len())
                .finish(),
            Self::TooLarge => f.write_str("TooLarge"),
            Self::Failed(e) => f.debug_tuple("Failed").field(e).finish(),
        }
    }
}

/// A response too large to share, waiting for the one caller who takes it: the caller that
/// started the call while it is still there, else the first other caller to look.
pub(crate) struct Handoff {
    pub(crate) leader_here: AtomicBool,
    /// Whether any request joined the call: a failure the leader alone met keeps its words.
    pub(crate) joined: AtomicBool,
    response: Mutex<Option<Box<dyn Any + Send>>>,
}

impl Handoff {
    pub(crate) fn new() -> Self {
        Self {
            leader_here: AtomicBool::new(true),
            joined: AtomicBool::new(false),
            response: Mutex::new(None),
        }
    }

    pub(crate) fn put(&self, response: Box<dyn Any + Send>) {
        *lock(&self.response) = Some(response);
    }

    /// Takes the response, if `leader` may and it is still there.
    pub(crate) fn take(&self, leader: bool) -> Option<Box<dyn Any + Send>> {
        if !leader && self.leader_here.load(Ordering::Acquire) {
            return None;
        }
        lock(&self.response).take()
    }
}

pub(crate) type BoxFuture = Pin<Box<dyn Future<Output = Outcome> + Send>>;

struct Entry {
    id: u64,
    /// The shared call, published with the entry itself: a request that arrives before the
    /// leader has called the inner service joins it and waits for that call.
    call: WeakShared<BoxFuture>,
    handoff: Arc<Handoff>,
}

/// One host's calls in flight.
#[derive(Default)]
pub(crate) struct Flights {
    map: Mutex<HashMap<Arc<Vec<u8>>, Entry>>,
    next_id: AtomicU64,
}

impl fmt::Debug for Flights {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Flights")
            .field("in_flight", &lock(&self.map).len())
            .finish()
    }
}

impl Flights {
    /// Calls in the table now.
    pub(crate) fn len(&self) -> usize {
        lock(&self.map).len()
    }
}

impl Idle for Flights {
    fn is_idle(&self) -> bool {
        lock(&self.map).is_empty()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What `join_or_start` found.
pub(crate) enum Joined {
    /// A call with this key is in flight: share it.
    Follow(Shared<BoxFuture>, Arc<Handoff>),
    /// None is: start one with [`Start::launch`].
    Lead(Start),
}

/// The right (and the duty) to send the call for a key. The call is in the table already, as a
/// shared future that waits for [`Start::launch`] to hand it the inner service's future.
pub(crate) struct Start {
    launch: Arc<Launch>,
    shared: Shared<BoxFuture>,
    handoff: Arc<Handoff>,
}

/// Removes a call from the table when it finishes or is abandoned.
struct Guard {
    slot: Arc<Local<Flights>>,
    key: Arc<Vec<u8>>,
    id: u64,
}

impl Drop for Guard {
    fn drop(&mut self) {
        let mut map = lock(&self.slot.value().map);
        if map.get(&self.key).is_some_and(|e| e.id == self.id) {
            map.remove(&self.key);
        }
    }
}

/// Where the leader hands the inner service's future to the shared call.
///
/// Written by hand (a lock and a waker) because the crate has no channel: tokio is not one of
/// its dependencies, and futures-util's channels are behind a feature it does not use.
struct Launch(Mutex<LaunchState>);

enum LaunchState {
    /// Not yet launched; the waker of the shared call, if it was polled.
    Waiting(Option<Waker>),
    Launched(BoxFuture),
    /// Taken by the shared call.
    Taken,
    /// The leader went away without calling the inner service.
    Abandoned,
}

impl Launch {
    fn put(&self, next: LaunchState) {
        let prev = std::mem::replace(&mut *lock(&self.0), next);
        if let LaunchState::Waiting(Some(w)) = prev {
            w.wake();
        }
    }

    /// The leader's call once launched; `None` if it was abandoned.
    fn poll_take(&self, cx: &mut Context<'_>) -> Poll<Option<BoxFuture>> {
        let mut state = lock(&self.0);
        match std::mem::replace(&mut *state, LaunchState::Taken) {
            LaunchState::Launched(f) => Poll::Ready(Some(f)),
            LaunchState::Waiting(_) => {
                *state = LaunchState::Waiting(Some(cx.waker().clone()));
                Poll::Pending
            }
            LaunchState::Taken | LaunchState::Abandoned => Poll::Ready(None),
        }
    }
}

impl Start {
    pub(crate) fn handoff(&self) -> Arc<Handoff> {
        self.handoff.clone()
    }

    /// Hands `call` (the inner service's future, called by the leader) to the shared call,
    /// which every caller of this key, the leader included, awaits.
    pub(crate) fn launch(self, call: BoxFuture) -> Shared<BoxFuture> {
        self.launch.put(LaunchState::Launched(call));
        self.shared.clone()
    }
}

impl Drop for Start {
    fn drop(&mut self) {
        // Launched already, or the leader is unwinding out of the inner service's `call`: the
        // callers who joined are told, not left waiting.
        let mut state = lock(&self.launch.0);
        if let LaunchState::Waiting(w) = &mut *state {
            let w = w.take();
            *state = LaunchState::Abandoned;
            drop(state);
            if let Some(w) = w {
                w.wake();
            }
        }
    }
}

/// The error of callers who joined a call whose leader went away before sending it.
fn abandoned() -> Outcome {
    Outcome::Failed(Arc::new(Box::new(
        sturdy_core::Error::new(
            sturdy_core::ErrorKind::Other,
            "the request that was to send this shared call failed before sending it",
        )
        .with_delivery(sturdy_core::Delivery::NotSent),
    )))
}

/// The error of every caller of a shared call that panicked. It may have been sent: the panic
/// came while the call ran.
fn panicked(payload: &(dyn std::any::Any + Send)) -> Outcome {
    let what = payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".to_owned());
    let mut err = sturdy_core::Error::new(
        sturdy_core::ErrorKind::Other,
        format!("a layer or service below panicked while running it: {what}"),
    )
    .with_delivery(sturdy_core::Delivery::MaybeProcessed);
    // A timer the call made on the runtime it was started on, polled after that runtime shut
    // down (the caller that started it ran there and went with it; one that joined from another
    // runtime polls the call now): tokio panics with these words. The call cannot go on
    // anywhere, and nothing about the request failed, so those who joined send their own, as
    // when the caller sending it went away. The words are tokio's only sign of it.
    if what.contains(RUNTIME_SHUT_DOWN) {
        err = err.with_hidden_source(sturdy_core::DriverGone);
    }
    Outcome::Failed(Arc::new(Box::new(err)))
}

/// What tokio 1.x says when it panics on a timer of a runtime that has shut down, polled from
/// elsewhere.
const RUNTIME_SHUT_DOWN: &str = "Tokio 1.x context was found, but it is being shutdown";

/// Finds a call in flight for `key`, or starts one: the shared call is in the table before this
/// returns, so an identical request that arrives while the leader is still calling the inner
/// service joins it rather than sending its own. `Err(key)` when a full map of hosts has
/// forgotten `slot` (it was idle) since it was looked up: look it up again.
pub(crate) fn join_or_start(slot: &Arc<Local<Flights>>, key: Vec<u8>) -> Result<Joined, Vec<u8>> {
    use futures_util::FutureExt;
    let flights = slot.value();
    let mut map = lock(&flights.map);
    // The map marks a slot forgotten before it takes this lock to see the table empty: a call
    // put in a forgotten table would be one identical requests after it no longer find.
    if slot.forgotten() {
        return Err(key);
    }
    if let Some(e) = map.get(&key) {
        if let Some(call) = e.call.upgrade() {
            // Marked under the table's lock: the call leaves the table (its guard takes this
            // lock) before any caller reads its outcome, so the caller that started it reads
            // `joined` as every caller who joined does.
            e.handoff.joined.store(true, Ordering::Release);
            return Ok(Joined::Follow(call, e.handoff.clone()));
        }
    }
    let id = flights.next_id.fetch_add(1, Ordering::Relaxed);
    let key = Arc::new(key);
    let handoff = Arc::new(Handoff::new());
    let launch = Arc::new(Launch(Mutex::new(LaunchState::Waiting(None))));
    let guard = Guard {
        slot: slot.clone(),
        key: key.clone(),
        id,
    };
    let waiting = launch.clone();
    let call: BoxFuture = Box::pin(async move {
        // Out of the table once finished or abandoned (every caller gone).
        let _guard = guard;
        match std::future::poll_fn(|cx| waiting.poll_take(cx)).await {
            // A panic in the call (the stack below, a hook, the inner service) is caught here:
            // a shared future that panics wakes none of the callers waiting on it and stays in
            // the table, so every identical request would join it and panic in turn.
            Some(call) => match std::panic::AssertUnwindSafe(call).catch_unwind().await {
                Ok(outcome) => outcome,
                Err(payload) => panicked(payload.as_ref()),
            },
            None => abandoned(),
        }
    });
    let shared = call.shared();
    let Some(weak) = shared.downgrade() else {
        unreachable!("a shared future is not complete before it is polled")
    };
    map.insert(
        key,
        Entry {
            id,
            call: weak,
            handoff: handoff.clone(),
        },
    );
    Ok(Joined::Lead(Start {
        launch,
        shared,
        handoff,
    }))
}

/// Counters of a layer, shared by its services and handles.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) calls: AtomicU64,
    pub(crate) upstream: AtomicU64,
    pub(crate) joined: AtomicU64,
    pub(crate) too_large: AtomicU64,
    pub(crate) fallbacks: AtomicU64,
}

/// Every host's flights, bounded in number.
pub(crate) struct Registry {
    pub(crate) config: Arc<Config>,
    pub(crate) map: KeyedMap<Flights>,
    pub(crate) counters: Arc<Counters>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("config", &self.config)
            .field("hosts", &self.map)
            .finish()
    }
}

impl Registry {
    pub(crate) fn new(config: Config, counters: Arc<Counters>) -> Self {
        let max = config.max_hosts;
        Self {
            config: Arc::new(config),
            map: KeyedMap::new(max),
            counters,
        }
    }
}

/// The registry of a layer, its clones and its handles: one cell, so that a setter called after a
/// clone or a handle still applies to all of them.
pub(crate) type Cell = sturdy_core::keyed::SharedCell<Registry>;

/// Setters replace the registry with one of edited settings (counters are kept).
pub(crate) fn edit(cell: &Cell, f: impl FnOnce(&mut Config)) {
    cell.replace(|r| {
        let mut config = (*r.config).clone();
        f(&mut config);
        Registry::new(config, r.counters.clone())
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(uri: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::get(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn relative_requests_to_two_hosts_differ_whatever_the_key_headers() {
        for headers in [
            KeyHeaders::Only(vec![http::header::AUTHORIZATION]),
            KeyHeaders::Only(vec![]),
            KeyHeaders::AllExcept(vec![http::header::HOST]),
        ] {
            let k = |r: &Request<()>| key_of(r, &headers);
            let a = req("/v1/me", &[("host", "a.example")]);
            assert_ne!(k(&a), k(&req("/v1/me", &[("host", "b.example")])));
            assert_ne!(k(&a), k(&req("/v1/me", &[])));
            assert_eq!(k(&a), k(&req("/v1/me", &[("host", "a.example")])));
            // A relative URI's path cannot pass for a host: the parts are length-prefixed.
            assert_ne!(
                k(&req("/", &[("host", "a.example")])),
                k(&req("/a.example", &[]))
            );
        }
    }

    #[test]
    fn keys_tell_requests_apart() {
        let all = KeyHeaders::AllExcept(default_ignored());
        let k = |r: &Request<()>| key_of(r, &all);
        let base = req("http://a.example/x?q=1", &[("authorization", "Bearer a")]);
        assert_eq!(
            k(&base),
            k(&req(
                "http://a.example/x?q=1",
                &[("authorization", "Bearer a"), ("traceparent", "00-1")]
            )),
            "trace ids do not matter"
        );
        assert_ne!(
            k(&base),
            k(&req(
                "http://a.example/x?q=2",
                &[("authorization", "Bearer a")]
            ))
        );
        assert_ne!(
            k(&base),
            k(&req(
                "http://a.example/x?q=1",
                &[("authorization", "Bearer b")]
            ))
        );
        assert_ne!(k(&base), k(&req("http://a.example/x?q=1", &[])));
        assert_ne!(
            k(&base),
            k(&req(
                "http://a.example/x?q=1",
                &[("authorization", "Bearer a"), ("x-api-key", "k")]
            )),
            "any other header matters by default"
        );
        // The order of different names does not matter; the order of one name's values does.
        assert_eq!(
            k(&req(
                "http://a.example/",
                &[("accept", "a/b"), ("x-tenant", "t")]
            )),
            k(&req(
                "http://a.example/",
                &[("x-tenant", "t"), ("accept", "a/b")]
            ))
        );
        assert_ne!(
            k(&req("http://a.example/", &[("x-v", "1"), ("x-v", "2")])),
            k(&req("http://a.example/", &[("x-v", "2"), ("x-v", "1")]))
        );
        // Length prefixes: moving bytes between fields never collides.
        assert_ne!(
            k(&req("http://a.example/", &[("x-a", "bc")])),
            k(&req("http://a.example/", &[("x-ab", "c")]))
        );

        let only = KeyHeaders::Only(vec![HeaderName::from_static("authorization")]);
        assert_eq!(
            key_of(&base, &only),
            key_of(
                &req(
                    "http://a.example/x?q=1",
                    &[("authorization", "Bearer a"), ("x-api-key", "k")]
                ),
                &only
            )
        );
    }

    #[test]
    fn only_empty_gets_and_heads_coalesce() {
        use http_body_util::Full;
        let get = Request::get("/").body(Full::<Bytes>::default()).unwrap();
        assert!(coalescable(&get));
        let head = Request::head("/").body(Full::<Bytes>::default()).unwrap();
        assert!(coalescable(&head));
        let with_body = Request::get("/").body(Full::new(Bytes::from("q"))).unwrap();
        assert!(!coalescable(&with_body));
        let post = Request::post("/").body(Full::<Bytes>::default()).unwrap();
        assert!(!coalescable(&post));
    }
}
