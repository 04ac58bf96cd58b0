use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, Method, Request, Response, StatusCode};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use sturdy_core::classify::{classify_result, Outcome};
use sturdy_core::headers::RetryAfter;
use sturdy_core::keyed::{Idle, KeyedMap, Local, SlotCache};
use sturdy_core::trace::{DelaySource, TraceEvent};
use sturdy_core::{human_duration, BoxError, ErrorKind, RateLimited, Trace, WallClock};
use tokio::time::{Instant, Sleep};
use tower::retry::budget::{Budget, TpsBudget};

use crate::Backoff;

/// How the retry budget is kept.
#[derive(Clone)]
pub(crate) enum BudgetMode {
    /// One `TpsBudget` per host, made with these parameters (ttl, min per second, percent).
    PerHost {
        ttl: Duration,
        min_per_sec: u32,
        percent: f32,
        map: Arc<KeyedMap<HostBudget>>,
    },
    /// One budget for every host.
    Shared(Arc<dyn Budget + Send + Sync>),
    /// No budget.
    Unlimited,
}

/// Hosts past this many share one budget, so a client that talks to unbounded hosts stays bounded.
pub(crate) const MAX_BUDGET_HOSTS: usize = 1_024;

/// One host's budget.
#[derive(Debug)]
pub(crate) struct HostBudget(TpsBudget);

impl Idle for HostBudget {
    fn is_idle(&self) -> bool {
        // A budget's history is what makes it work: never forget one to make room.
        false
    }
}

/// The budget a call spends from.
#[derive(Clone)]
pub(crate) enum BudgetRef {
    Host(Arc<Local<HostBudget>>),
    Shared(Arc<dyn Budget + Send + Sync>),
}

impl BudgetRef {
    fn deposit(&self) {
        match self {
            Self::Host(h) => h.value().0.deposit(),
            Self::Shared(b) => b.deposit(),
        }
    }

    fn withdraw(&self) -> bool {
        match self {
            Self::Host(h) => h.value().0.withdraw(),
            Self::Shared(b) => b.withdraw(),
        }
    }
}

impl BudgetMode {
    /// The budget of `host`, through the calling service's cache.
    pub(crate) fn for_host(
        &self,
        host: &str,
        cache: &mut SlotCache<HostBudget>,
    ) -> Option<BudgetRef> {
        match self {
            Self::Unlimited => None,
            Self::Shared(b) => Some(BudgetRef::Shared(b.clone())),
            Self::PerHost {
                ttl,
                min_per_sec,
                percent,
                map,
            } => Some(BudgetRef::Host(cache.get(map, host, || {
                HostBudget(TpsBudget::new(*ttl, *min_per_sec, *percent))
            }))),
        }
    }
}

impl fmt::Debug for BudgetMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::PerHost {
                ttl,
                min_per_sec,
                percent,
                ..
            } => f
                .debug_struct("PerHost")
                .field("ttl", ttl)
                .field("min_per_sec", min_per_sec)
                .field("percent", percent)
                .finish_non_exhaustive(),
            Self::Shared(_) => f.write_str("Shared"),
            Self::Unlimited => f.write_str("Unlimited"),
        }
    }
}

/// The configuration every clone of a retry layer shares.
#[derive(Debug)]
pub(crate) struct Config {
    pub(crate) max_attempts: u32,
    pub(crate) backoff: Backoff,
    pub(crate) max_retry_after: Duration,
    pub(crate) retry_after_jitter: f64,
    pub(crate) deadline: Option<Duration>,
    pub(crate) attempt_timeout: Option<Duration>,
    pub(crate) body_limit: usize,
    pub(crate) idempotency_header: HeaderName,
    pub(crate) budget: BudgetMode,
    pub(crate) seed: Option<u64>,
    pub(crate) sessions: AtomicU64,
    pub(crate) clock: Arc<dyn WallClock>,
}

/// The retry decision for one logical call, as a [`tower::retry::Policy`].
///
/// [`Retry`](crate::Retry) makes one per call (with the buffered body, the deadline, the host's
/// budget and a random generator) and hands it to tower's retry loop; it is public because it
/// appears in [`ResponseFuture`](crate::ResponseFuture)'s type, not to be built by hand.
#[derive(Clone)]
pub struct RetryPolicy {
    config: Arc<Config>,
    body: Option<Bytes>,
    /// Attempts made so far.
    attempts: u32,
    /// The same count, shared with the response future for the deadline message (only when a
    /// deadline is set).
    shared_attempts: Option<Arc<AtomicU32>>,
    prev: Option<Duration>,
    deadline: Option<Instant>,
    budget: Option<BudgetRef>,
    deposited: bool,
    /// Seeded on the first retry: a call that succeeds at once never pays for it.
    rng: Option<SmallRng>,
}

impl fmt::Debug for RetryPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryPolicy")
            .field("attempts", &self.attempts)
            .field("replayable", &self.body.is_some())
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
    }
}

pub(crate) fn host_of<B>(req: &Request<B>) -> String {
    req.uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            req.headers()
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        })
        .unwrap_or_default()
}

fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::PUT | Method::DELETE | Method::OPTIONS | Method::TRACE
    )
}

impl RetryPolicy {
    pub(crate) fn new(
        config: Arc<Config>,
        budget: Option<BudgetRef>,
        body: Option<Bytes>,
        shared_attempts: Option<Arc<AtomicU32>>,
    ) -> Self {
        Self {
            deadline: config.deadline.map(|d| Instant::now() + d),
            budget,
            body,
            attempts: 0,
            shared_attempts,
            prev: None,
            deposited: false,
            rng: None,
            config,
        }
    }

    fn rng(&mut self) -> &mut SmallRng {
        let config = &self.config;
        self.rng.get_or_insert_with(|| {
            let seed = match config.seed {
                Some(s) => s.wrapping_add(
                    config
                        .sessions
                        .fetch_add(1, Ordering::Relaxed)
                        .wrapping_mul(0x9e37_79b9_7f4a_7c15),
                ),
                None => rand::rng().random(),
            };
            SmallRng::seed_from_u64(seed)
        })
    }

    pub(crate) fn with_body(mut self, body: Bytes) -> Self {
        self.body = Some(body);
        self
    }

    fn safe_to_retry(&self, method: &Method, headers: &HeaderMap, kind: &ErrorKind) -> bool {
        is_idempotent(method)
            || headers.contains_key(&self.config.idempotency_header)
            || kind.proves_not_sent()
    }

    /// Decides whether to retry; may rewrite the result (a too-long `Retry-After` becomes
    /// `RateLimited`, an exhausted error says how many attempts were made).
    fn decide<B, Rb>(
        &mut self,
        req: &Request<B>,
        result: &mut Result<Response<Rb>, BoxError>,
    ) -> Option<Duration> {
        self.attempts += 1;
        let n = self.attempts;
        if let Some(shared) = &self.shared_attempts {
            shared.store(n, Ordering::Relaxed);
        }
        let trace = Trace::of(req);
        let outcome = classify_result(result);
        if let Some(t) = trace {
            t.record(TraceEvent::Attempt {
                number: n,
                outcome: describe(result),
            });
        }
        let Outcome::Retryable(kind) = outcome else {
            return None;
        };
        if !self.safe_to_retry(req.method(), req.headers(), &kind) {
            tracing::debug!(attempt = n, method = %req.method(), "not retried: a non-idempotent request without an idempotency key may already have taken effect");
            return None;
        }
        let host = host_of(req);
        let left = self
            .deadline
            .map(|d| d.saturating_duration_since(Instant::now()));
        let (delay, source) = if let Some(wait) = server_wait(result, self.config.clock.now()) {
            let reason = if wait > self.config.max_retry_after {
                Some(format!(
                    "longer than the {} this client waits",
                    human_duration(self.config.max_retry_after)
                ))
            } else if left.is_some_and(|l| wait >= l) {
                Some("past the overall deadline".to_owned())
            } else if n >= self.config.max_attempts {
                Some(format!("and all {n} attempts are used"))
            } else {
                None
            };
            if let Some(reason) = reason {
                tracing::info!(attempt = n, retry_after_ms = wait.as_millis() as u64, host = %host, "not waiting for Retry-After: {reason}");
                *result = Err(Box::new(RateLimited::new(wait).with_scope(host)));
                return None;
            }
            // Never sooner than asked; a little later, so clients do not return in lock-step.
            let spread = wait
                .max(self.config.backoff.base())
                .mul_f64(self.config.retry_after_jitter);
            let mut delay = wait + self.rng().random_range(Duration::ZERO..=spread);
            if let Some(l) = left {
                delay = delay
                    .min(l.saturating_sub(Duration::from_millis(1)))
                    .max(wait);
            }
            (delay, DelaySource::RetryAfter)
        } else {
            if n >= self.config.max_attempts {
                exhaust(result, &kind, format!("gave up after {n} attempts"));
                return None;
            }
            let prev = self.prev;
            let backoff = self.config.backoff;
            let delay = backoff.delay(n, prev, self.rng());
            if left.is_some_and(|l| delay >= l) {
                exhaust(result, &kind, format!("gave up after {n} attempts: the next retry would pass the overall deadline"));
                return None;
            }
            self.prev = Some(delay);
            (delay, DelaySource::Backoff)
        };
        if let Some(b) = &self.budget {
            if !b.withdraw() {
                tracing::info!(attempt = n, host = %host, "not retried: the retry budget is exhausted");
                exhaust(
                    result,
                    &kind,
                    format!("gave up after {n} attempts: the retry budget for {host} is exhausted"),
                );
                return None;
            }
        }
        tracing::debug!(attempt = n, delay_ms = delay.as_millis() as u64, reason = %kind, source = ?source, "retrying");
        if let Some(t) = trace {
            t.record(TraceEvent::Delay {
                duration: delay,
                source,
            });
        }
        Some(delay)
    }
}

fn describe<Rb>(result: &Result<Response<Rb>, BoxError>) -> String {
    match result {
        Ok(r) => r.status().to_string(),
        Err(e) => e.to_string(),
    }
}

/// How long the server (or a limiter below) asked us to wait, if it did.
fn server_wait<Rb>(
    result: &Result<Response<Rb>, BoxError>,
    now: std::time::SystemTime,
) -> Option<Duration> {
    match result {
        Ok(res)
            if res.status() == StatusCode::TOO_MANY_REQUESTS
                || res.status() == StatusCode::SERVICE_UNAVAILABLE =>
        {
            RetryAfter::from_headers(res.headers()).map(|ra| ra.delay_from(now))
        }
        Ok(_) => None,
        Err(e) => {
            let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(&**e);
            while let Some(err) = cur {
                if let Some(rl) = err.downcast_ref::<RateLimited>() {
                    return Some(rl.retry_after());
                }
                cur = err.source();
            }
            None
        }
    }
}

/// Says why retrying stopped. An error is wrapped (its kind and source kept); a response is
/// returned as it is, so the caller sees the server's last word.
fn exhaust<Rb>(result: &mut Result<Response<Rb>, BoxError>, kind: &ErrorKind, message: String) {
    match result {
        Err(e) => {
            let source =
                std::mem::replace(e, Box::new(sturdy_core::Error::new(ErrorKind::Other, "")));
            *e = Box::new(sturdy_core::Error::new(kind.clone(), message).with_source(source));
        }
        Ok(res) => tracing::info!(status = %res.status(), "{message}; returning the last response"),
    }
}

impl<B, Rb> tower::retry::Policy<Request<B>, Response<Rb>, BoxError> for RetryPolicy
where
    B: From<Bytes>,
{
    type Future = Sleep;

    fn retry(
        &mut self,
        req: &mut Request<B>,
        result: &mut Result<Response<Rb>, BoxError>,
    ) -> Option<Self::Future> {
        self.decide(req, result).map(tokio::time::sleep)
    }

    fn clone_request(&mut self, req: &Request<B>) -> Option<Request<B>> {
        if !self.deposited {
            // One deposit per logical call: retries may spend a fraction of what callers make.
            self.deposited = true;
            if let Some(b) = &self.budget {
                b.deposit();
            }
        }
        let body = self.body.as_ref()?;
        let mut r = Request::new(B::from(body.clone()));
        *r.method_mut() = req.method().clone();
        *r.uri_mut() = req.uri().clone();
        *r.version_mut() = req.version();
        *r.headers_mut() = req.headers().clone();
        *r.extensions_mut() = req.extensions().clone();
        Some(r)
    }
}
