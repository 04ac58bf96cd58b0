//! Redis backends for sturdy, so several processes share one state.
//!
//! - [`RedisIdempotencyStore`]: the idempotency store for
//!   `sturdy_idempotency::server::IdempotencyLayer`, so several app instances agree on keys.
//! - [`RedisStreamQueue`] and [`RedisStreamConsumer`]: a durable webhook queue for
//!   `sturdy_webhook::WebhookReceiver` on a Redis Stream with consumer groups; an event leaves a
//!   group only once its handler acknowledged it or it was dead-lettered ([`DeadLetter`]), and
//!   one a crashed worker left is taken over.
//! - [`RedisQuota`]: a rate-limit quota for `sturdy_ratelimit::RateLimitLayer::with_remote`.
//!   One Lua script per decision (one round trip), atomic in Redis, timed by Redis's own clock
//!   (`TIME`), so callers whose clocks disagree still share the quota correctly. Pauses that a
//!   server asks for are shared too.
//!
//! Every operation has a timeout \[1 s\]: a Redis that is down or hung gives a clear error, never a
//! hang. What the rate limiter then does is its `on_store_error` choice (let calls through by
//! default, or fail them).
//!
//! # Example
//!
//! ```no_run
//! # async fn run() -> Result<(), sturdy_core::BoxError> {
//! use std::sync::Arc;
//! use sturdy_ratelimit::{Quota, RateLimitLayer};
//! use sturdy_redis::RedisQuota;
//!
//! let quota = Quota::per_second(50)?.with_burst(10)?;
//! let shared = RedisQuota::connect("redis://127.0.0.1:6379/", quota).await?;
//! let layer = RateLimitLayer::new(quota).with_remote(Arc::new(shared));
//! # let _ = layer;
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]

mod idempotency;
mod stream;

pub use idempotency::RedisIdempotencyStore;
pub use stream::{DeadLetter, Delivery, RedisStreamConsumer, RedisStreamQueue};

use std::fmt;
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::{Client, Script};
use sturdy_core::{BoxError, Error, ErrorKind};
use sturdy_ratelimit::{BoxFuture, Quota, RemoteQuota, Reserve};

/// Reserves a GCRA slot. KEYS: tat, pause. ARGV: interval, tolerance and max wait in microseconds.
/// Returns {granted (0/1), wait in microseconds}.
const RESERVE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local max_wait = tonumber(ARGV[3])
local at = now
local pause = redis.call('PTTL', KEYS[2])
if pause > 0 then at = now + pause * 1000 end
local tat = tonumber(redis.call('GET', KEYS[1]))
if tat == nil or tat < at then tat = at end
local wait = tat - tolerance - now
if wait < at - now then wait = at - now end
if wait > max_wait then return {0, wait} end
local new_tat = tat + interval
redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', math.floor((new_tat - now) / 1000) + 1000)
return {1, wait}
";

/// Extends a pause. KEYS: pause. ARGV: milliseconds. A shorter pause never cuts a longer one.
const PAUSE: &str = r"
local left = redis.call('PTTL', KEYS[1])
if left < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], '1', 'PX', ARGV[1]) end
return 1
";

/// Connects to Redis with bounded connect and response times.
///
/// # Errors
/// When the URL is invalid or Redis cannot be reached within `timeout`. The message never
/// repeats the URL, which may hold a password.
pub async fn connect(url: &str, timeout: Duration) -> Result<ConnectionManager, BoxError> {
    let client = Client::open(url).map_err(|e| store_error("invalid Redis URL", e))?;
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout))
        .set_number_of_retries(1);
    match tokio::time::timeout(
        timeout * 2,
        client.get_connection_manager_with_config(config),
    )
    .await
    {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(store_error("could not connect to Redis", e)),
        Err(_) => Err(Box::new(Error::new(
            ErrorKind::Timeout,
            format!(
                "could not connect to Redis within {}",
                sturdy_core::human_duration(timeout * 2)
            ),
        ))),
    }
}

fn store_error(what: &str, e: redis::RedisError) -> BoxError {
    let kind = if e.is_timeout() {
        ErrorKind::Timeout
    } else if e.is_connection_refusal() || e.is_io_error() || e.is_connection_dropped() {
        ErrorKind::Connect
    } else {
        ErrorKind::Other
    };
    Box::new(Error::new(kind, what.to_owned()).with_source(e))
}

pub(crate) async fn bounded<T>(
    timeout: Duration,
    what: &'static str,
    fut: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> Result<T, BoxError> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(store_error(what, e)),
        Err(_) => Err(Box::new(Error::new(
            ErrorKind::Timeout,
            format!(
                "{what}: Redis did not answer within {}",
                sturdy_core::human_duration(timeout)
            ),
        ))),
    }
}

/// A rate-limit quota kept in Redis and shared by every process that uses the same keys.
#[derive(Clone)]
pub struct RedisQuota {
    conn: ConnectionManager,
    quota: Quota,
    prefix: String,
    timeout: Duration,
    reserve: Script,
    pause: Script,
}

impl fmt::Debug for RedisQuota {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisQuota")
            .field("quota", &self.quota)
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl RedisQuota {
    /// Connects to Redis at `url` and shares `quota` through it (keys prefixed `sturdy:rl`,
    /// 1 s timeout per operation).
    ///
    /// # Errors
    /// When Redis cannot be reached.
    pub async fn connect(url: &str, quota: Quota) -> Result<Self, BoxError> {
        let timeout = Duration::from_secs(1);
        Ok(Self::new(connect(url, timeout).await?, quota))
    }

    /// Shares `quota` through an existing connection.
    pub fn new(conn: ConnectionManager, quota: Quota) -> Self {
        Self {
            conn,
            quota,
            prefix: "sturdy:rl".to_owned(),
            timeout: Duration::from_secs(1),
            reserve: Script::new(RESERVE),
            pause: Script::new(PAUSE),
        }
    }

    /// The prefix of the Redis keys \[`sturdy:rl`\]; processes that share a quota share a prefix.
    #[must_use]
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The timeout of each Redis operation \[1 s\].
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    fn keys(&self, key: &str) -> (String, String) {
        // The hash tag keeps both keys of one limiter in one Redis Cluster slot.
        (
            format!("{}:{{{key}}}:tat", self.prefix),
            format!("{}:{{{key}}}:pause", self.prefix),
        )
    }

    /// Reserves a slot (see [`RemoteQuota::reserve`]).
    ///
    /// # Errors
    /// When Redis fails or does not answer in time.
    pub async fn try_reserve(&self, key: &str, max_wait: Duration) -> Result<Reserve, BoxError> {
        let (tat, pause) = self.keys(key);
        let micros = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let interval = micros(self.quota.interval());
        let tolerance = interval.saturating_mul(u64::from(self.quota.burst() - 1));
        let mut conn = self.conn.clone();
        let mut inv = self.reserve.key(tat);
        inv.key(pause)
            .arg(interval)
            .arg(tolerance)
            .arg(micros(max_wait).min(i64::MAX as u64 / 2));
        let (granted, wait): (i64, i64) = bounded(
            self.timeout,
            "rate-limit reservation",
            inv.invoke_async(&mut conn),
        )
        .await?;
        let wait = Duration::from_micros(u64::try_from(wait).unwrap_or(0));
        Ok(if granted == 1 {
            Reserve::Granted { wait }
        } else {
            Reserve::Denied { retry_after: wait }
        })
    }

    /// Pauses `key` for every process for `duration` (see [`RemoteQuota::pause`]).
    ///
    /// # Errors
    /// When Redis fails or does not answer in time.
    pub async fn try_pause(&self, key: &str, duration: Duration) -> Result<(), BoxError> {
        let (_, pause) = self.keys(key);
        let ms = u64::try_from(duration.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let mut conn = self.conn.clone();
        let mut inv = self.pause.key(pause);
        inv.arg(ms);
        let _: i64 = bounded(
            self.timeout,
            "rate-limit pause",
            inv.invoke_async(&mut conn),
        )
        .await?;
        Ok(())
    }
}

impl RemoteQuota for RedisQuota {
    fn reserve(&self, key: &str, max_wait: Duration) -> BoxFuture<Result<Reserve, BoxError>> {
        let this = self.clone();
        let key = key.to_owned();
        Box::pin(async move { this.try_reserve(&key, max_wait).await })
    }

    fn pause(&self, key: &str, duration: Duration) -> BoxFuture<Result<(), BoxError>> {
        let this = self.clone();
        let key = key.to_owned();
        Box::pin(async move { this.try_pause(&key, duration).await })
    }
}
