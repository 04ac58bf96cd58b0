//! Redis backends for sturdy, so several processes share one state.
//!
//! - [`RedisIdempotencyStore`]: the idempotency store for
//!   `sturdy_idempotency::server::IdempotencyLayer`, so several app instances agree on keys.
//! - [`RedisStreamQueue`] and [`RedisStreamConsumer`]: a durable webhook queue for
//!   `sturdy_webhook::WebhookReceiver` on a Redis Stream with consumer groups; an event leaves a
//!   group only once its handler acknowledged it or it was dead-lettered ([`DeadLetter`]), and
//!   one a crashed worker left is taken over.
//! - [`RedisQuota`]: a rate-limit quota for `sturdy_ratelimit::RateLimitLayer::with_remote`.
//!   One Lua script per decision (one round trip; two for the first decision after Redis
//!   started or emptied its script cache: `EVALSHA`, answered `NOSCRIPT`, then `EVAL`), atomic
//!   in Redis, timed by Redis's own clock
//!   (`TIME`), so callers whose clocks disagree still share the quota correctly. Pauses that a
//!   server asks for are shared too, and capped (\[5 min\], [`RedisQuota::with_max_pause`]): no
//!   pause key lives longer than the cap, whoever wrote it. A pause can be read and lifted
//!   ([`RedisQuota::try_paused`], [`RedisQuota::try_clear_pause`]), and a slot granted to a call
//!   that was dropped before it went is given back.
//!
//! Every operation has a timeout \[1 s\], and connecting one of 2 s: a Redis that is down or hung
//! gives a clear error, never a hang. What the rate limiter then does is its `with_on_store_error` choice (let calls through by
//! default, or fail them).
//!
//! # One server or a Redis Cluster
//!
//! Each backend has `connect(url, ..)` for one server, `connect_cluster(nodes, ..)` for a Redis
//! Cluster, and `new(conn, ..)` (`join` for the consumer) for a [`RedisConnection`] of either
//! kind. The connection reconnects by itself: after a restart of the server, or a failover in the
//! cluster, the same backend works again without being made anew. The table of what each
//! backend does while Redis is down, hung or failing over is in `docs/RELIABILITY.md`.
//!
//! # Key layout
//!
//! Every script touches the keys of one Redis Cluster hash slot only, so each operation is one
//! command to one node, on a cluster as on one server:
//!
//! | backend | keys | one slot because |
//! |---|---|---|
//! | [`RedisQuota`] | `<prefix>:{<key>}:tat`, `<prefix>:{<key>}:pause` | the hash tag `{<key>}` (an empty key, whose tag Redis would ignore, and a prefix or key with a brace in it, which could otherwise name another pair's keys, get a hex tag instead, with no `<prefix>:` in front: `{x<hex prefix>.<hex key>}:tat`, so a scan of `<prefix>:*` does not find them) |
//! | [`RedisIdempotencyStore`] | `<prefix>:<scope hash>:<idempotency key>` | each operation touches one key |
//! | [`RedisStreamQueue`], [`RedisStreamConsumer`] | the stream, `<base>:seen:<dedup key>`, `<base>:dead` | `<base>` is the stream name when it has a hash tag (`{webhooks}`), else the name made a tag (`webhooks` gives `{webhooks}`), whose slot is the stream's |
//!
//! # Writes a failover could lose
//!
//! Redis replicates asynchronously: a primary that fails just after it answered may not have
//! passed its last writes on, and the replica promoted in its place lacks them.
//! [`RedisStreamQueue::with_replication`] and [`RedisIdempotencyStore::with_replication`] make an
//! enqueue, a lock and a stored response count only once that many replicas confirmed them
//! (`WAIT`, sent in the same round trip), and fail otherwise.
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

mod conn;
mod idempotency;
mod stream;

pub use conn::RedisConnection;
pub use idempotency::RedisIdempotencyStore;
pub use stream::{DeadLetter, Delivery, RedisStreamConsumer, RedisStreamQueue};

use std::fmt;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use conn::{hash_slot, Lua};
use redis::aio::ConnectionManager;
use redis::Client;
use sturdy_core::{BoxError, Error, ErrorKind};
use sturdy_ratelimit::{BoxFuture, Quota, RemoteQuota, Reserve};

/// Reserves a GCRA slot. KEYS: tat, pause. ARGV: interval, tolerance and max wait in microseconds,
/// the longest pause in milliseconds (a longer pause key is cut to it).
/// Returns {granted (0/1), wait in microseconds}.
const RESERVE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local max_wait = tonumber(ARGV[3])
local max_pause = tonumber(ARGV[4])
local at = now
local pause = redis.call('PTTL', KEYS[2])
if pause > max_pause then
  if max_pause > 0 then redis.call('PEXPIRE', KEYS[2], max_pause) else redis.call('DEL', KEYS[2]) end
  pause = max_pause
end
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

/// Extends a pause. KEYS: pause. ARGV: milliseconds (at least 1), the longest pause in
/// milliseconds. A shorter pause never cuts a longer one; none lasts longer than the longest.
const PAUSE: &str = r"
local max_pause = tonumber(ARGV[2])
local ms = math.min(tonumber(ARGV[1]), max_pause)
local left = redis.call('PTTL', KEYS[1])
if left > max_pause then
  redis.call('PEXPIRE', KEYS[1], max_pause)
  left = max_pause
end
if left < ms then redis.call('SET', KEYS[1], '1', 'PX', ms) end
return 1
";

/// Gives one unused slot back. KEYS: tat. ARGV: interval in microseconds. The TAT moves back one
/// interval, never before now. Returns 1 if a slot was given back.
const RELEASE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = tonumber(redis.call('GET', KEYS[1]))
if tat == nil or tat <= now then return 0 end
local new_tat = math.max(tat - tonumber(ARGV[1]), now)
redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', math.floor((new_tat - now) / 1000) + 1000)
return 1
";

/// Ends a pause. KEYS: pause. Returns the milliseconds it had left (or a negative number).
const CLEAR: &str = r"
local left = redis.call('PTTL', KEYS[1])
redis.call('DEL', KEYS[1])
return left
";

static RESERVE_LUA: LazyLock<Lua> = LazyLock::new(|| Lua::new(RESERVE.to_owned()));
static PAUSE_LUA: LazyLock<Lua> = LazyLock::new(|| Lua::new(PAUSE.to_owned()));
static RELEASE_LUA: LazyLock<Lua> = LazyLock::new(|| Lua::new(RELEASE.to_owned()));
static CLEAR_LUA: LazyLock<Lua> = LazyLock::new(|| Lua::new(CLEAR.to_owned()));

/// Connects to Redis with bounded connect and response times: `timeout` for each connection
/// attempt and each response, and twice `timeout` for the whole connect (one retry included).
/// Any `timeout` is accepted, `Duration::MAX` too.
///
/// # Errors
/// When the URL is invalid, Redis cannot be reached or does not answer within twice `timeout`
/// ("could not connect to Redis within ...", or "... did not answer within ..." for a Redis that
/// accepts the connection and does not answer the `PING` that ends the connect), or Redis
/// refuses the credentials (an `Auth` error, also for a Redis that requires a password reached
/// with none).
/// The message never repeats the URL, which may hold a password.
pub async fn connect(url: &str, timeout: Duration) -> Result<ConnectionManager, BoxError> {
    let client = Client::open(url).map_err(|e| config_error("invalid Redis URL", e))?;
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout))
        .set_number_of_retries(1);
    let started = tokio::time::Instant::now();
    match tokio::time::timeout(
        timeout.saturating_mul(2),
        client.get_connection_manager_with_config(config),
    )
    .await
    {
        Ok(Ok(mut c)) => {
            check_answers(&mut c, timeout.saturating_mul(2), started).await?;
            Ok(c)
        }
        Ok(Err(e)) => Err(connect_error("could not connect to Redis", e)),
        Err(_) => Err(Box::new(Error::new(
            ErrorKind::Timeout,
            format!(
                "could not connect to Redis within {}",
                sturdy_core::human_duration(timeout.saturating_mul(2))
            ),
        ))),
    }
}

/// Connects with a bounded connect time and no response timeout of the client's own: each
/// operation is bounded by its caller (a blocking stream read waits longer than one operation).
/// Also the client and the settings, to make the manager anew (see `conn::Single`).
pub(crate) async fn connect_unbounded(
    url: &str,
    timeout: Duration,
) -> Result<
    (
        ConnectionManager,
        Client,
        redis::aio::ConnectionManagerConfig,
    ),
    BoxError,
> {
    let client = Client::open(url).map_err(|e| config_error("invalid Redis URL", e))?;
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(None)
        .set_number_of_retries(1);
    let started = tokio::time::Instant::now();
    let mut c = bounded_connect(
        timeout.saturating_mul(2),
        "could not connect to Redis",
        client.get_connection_manager_with_config(config.clone()),
    )
    .await?;
    check_answers(&mut c, timeout.saturating_mul(2), started).await?;
    Ok((c, client, config))
}

/// Makes `connect` mean that Redis answers: one `PING` within what is left of the connect's
/// `bound`, counted from `started`. A Redis that requires a password, reached with none,
/// accepts the connection and refuses each command after it (an `Auth` error here, not at the
/// first operation); a Redis that accepts and never answers (hung, paused) is a `Timeout`
/// here. Any other answer (a server still loading its data, a user not allowed `PING`) leaves
/// the connection to its operations, which have bounds and messages of their own.
async fn check_answers(
    c: &mut ConnectionManager,
    bound: Duration,
    started: tokio::time::Instant,
) -> Result<(), BoxError> {
    let within = bound.saturating_sub(started.elapsed());
    let ping = redis::cmd("PING");
    match tokio::time::timeout(within, ping.query_async::<()>(c)).await {
        Ok(Err(e)) if is_auth_failure(&e) => {
            Err(classified("could not connect to Redis", e, true, false))
        }
        Ok(_) => Ok(()),
        Err(_) => Err(Box::new(Error::new(
            ErrorKind::Timeout,
            format!(
                "could not connect to Redis: it accepted the connection and did not answer within {}",
                sturdy_core::human_duration(bound)
            ),
        ))),
    }
}

/// The longest duration sent to Redis, `sturdy_core::clock::FAR` (about 30 years): Redis refuses
/// an expiry past `i64::MAX` ms from now, and its Lua numbers are doubles, exact only below 2^53.
pub(crate) use sturdy_core::clock::FAR;

/// `d` in milliseconds for Redis, at most [`FAR`].
pub(crate) fn capped_ms(d: Duration) -> u64 {
    u64::try_from(d.min(FAR).as_millis()).unwrap_or(u64::MAX)
}

/// `d` in microseconds for Redis, at most [`FAR`].
pub(crate) fn capped_micros(d: Duration) -> u64 {
    u64::try_from(d.min(FAR).as_micros()).unwrap_or(u64::MAX)
}

/// Redis refused the credentials, by the error's kind or code (not by its text): what makes a
/// single-server connection make its manager anew (see `conn::Single`).
pub(crate) fn refused_credentials(e: &redis::RedisError) -> bool {
    e.kind() == redis::ErrorKind::AuthenticationFailed
        || matches!(e.code(), Some("WRONGPASS" | "NOAUTH"))
}

/// Whether Redis refused the credentials (a missing or wrong password or user name in the URL). A cluster
/// client reports it inside an I/O error, so the text is read too.
fn is_auth_failure(e: &redis::RedisError) -> bool {
    if refused_credentials(e) {
        return true;
    }
    let text = e.to_string().to_ascii_lowercase();
    // "Protocol error: unauthenticated multibulk length": a Redis that requires a password
    // closes the connection of a client that sends a long command before authenticating.
    text.contains("authentication failed")
        || text.contains("wrongpass")
        || text.contains("noauth")
        || text.contains("invalid username-password")
        || text.contains("unauthenticated")
}

/// A URL or client setting the redis client refused: a mistake in the configuration, which no
/// retry mends. The message names the cause in the redis client's words, which never repeat the
/// URL (and so no password in it).
fn config_error(what: &str, e: redis::RedisError) -> BoxError {
    let detail = e.detail().map_or_else(|| e.to_string(), str::to_owned);
    Box::new(Error::new(ErrorKind::Config, format!("{what}: {detail}")).with_source(e))
}

/// Whether a cluster client found no connection to the node a command goes to ("No
/// connections found"), after its own tries.
fn cluster_unreachable(e: &redis::RedisError) -> bool {
    e.kind() == redis::ErrorKind::ClusterConnectionNotFound
}

fn store_error(what: &str, e: redis::RedisError) -> BoxError {
    classified(what, e, false, false)
}

/// A Redis error met while connecting, before any command of the caller's was sent: a broken
/// or refused connection then means Redis cannot be reached (a cluster client reports seeds
/// that all refuse as an I/O error, not as a refusal).
fn connect_error(what: &str, e: redis::RedisError) -> BoxError {
    classified(what, e, true, false)
}

/// `cluster`: the command went through a Redis Cluster client, which sends a command again
/// after a broken connection, written or not (see `conn::resent`), so a later answer cannot
/// show that no try of it ran.
fn classified(what: &str, e: redis::RedisError, connecting: bool, cluster: bool) -> BoxError {
    let kind = if is_auth_failure(&e) {
        ErrorKind::Auth
    } else if e.is_timeout() {
        ErrorKind::Timeout
    } else if e.is_connection_refusal()
        || (connecting && (e.is_io_error() || e.is_connection_dropped() || cluster_unreachable(&e)))
    {
        ErrorKind::Connect
    } else if e.is_io_error() || e.is_connection_dropped() || cluster_unreachable(&e) {
        // The connection broke, and a multiplexed connection cannot tell whether the command
        // had been written: it may have run. A cluster client that finds no connection to the
        // key's node has tried the command already, after a broken connection, maybe written.
        ErrorKind::Transport
    } else {
        ErrorKind::Other
    };
    let message = match e.code() {
        Some("CROSSSLOT") => format!(
            "{what}: the keys of one operation are in different hash slots of the Redis Cluster; \
             give the names you chose (stream, dead-letter stream) the same hash tag, such as {{webhooks}}"
        ),
        // One server answers `MASTERDOWN` as a replica whose link to its primary is down (with
        // `replica-serve-stale-data no`): no cluster to name.
        Some("MASTERDOWN") if !cluster => format!(
            "{what}: Redis answered that it cannot serve now (a replica whose link to its primary is down, or a failover under way); try again shortly"
        ),
        Some("CLUSTERDOWN" | "TRYAGAIN" | "MASTERDOWN") => format!(
            "{what}: the Redis Cluster cannot serve this key now (a failover or a slot move is under way); try again shortly"
        ),
        // A redirection the cluster client stopped following: a move that did not settle, or
        // nodes that send the key to each other.
        Some("MOVED" | "ASK") => format!(
            "{what}: the Redis Cluster cannot serve this key now (a failover or a slot move is under way, or its nodes keep redirecting the key to each other)"
        ),
        Some("READONLY") => format!(
            "{what}: Redis answered as a read-only replica (a failover is under way); try again shortly"
        ),
        Some("LOADING") => format!("{what}: Redis is loading its data after a restart; try again shortly"),
        // A failover while the write waited for its replicas (`WAIT`): the error may come
        // wrapped in a pipeline's, so its text is read.
        _ if e.to_string().contains("UNBLOCKED") => format!(
            "{what}: the Redis Cluster cannot serve this key now: its primary became a replica while the write waited for its replicas (a failover is under way), so the write may or may not have been kept; try again shortly"
        ),
        _ if kind == ErrorKind::Auth => format!(
            "{what}: Redis refused the credentials (the user name or password in the URL is missing or wrong)"
        ),
        // A server that answers, but not in Redis's protocol: "cannot be reached (down, ...)"
        // would send the reader after a server that is up.
        _ if connecting
            && (e.kind() == redis::ErrorKind::Parse || e.to_string().contains("Parse error")) =>
        {
            format!(
                "{what}: the server did not answer in the Redis protocol (not a Redis server, or a proxy or a TLS port in the way)"
            )
        }
        // A cluster client reports seeds that accepted and never answered as an I/O error
        // whose text says so: "cannot be reached" would send the reader after a stopped server.
        _ if kind == ErrorKind::Connect && e.to_string().contains("timed out") => format!(
            "{what}: Redis did not answer in time (down, hung, overloaded, or behind a network that drops packets); nothing was sent, and the connection recovers by itself once it answers"
        ),
        _ if kind == ErrorKind::Connect => format!(
            "{what}: Redis cannot be reached (down, restarting or failing over); the connection recovers by itself once it is back"
        ),
        _ if cluster_unreachable(&e) => format!(
            "{what}: Redis cannot be reached (the Redis Cluster node that serves this key is down, restarting or failing over); the cluster client sends a command again after a broken connection, so an earlier try may have run; the connection recovers by itself once the node or its replica serves again"
        ),
        _ if kind == ErrorKind::Transport => format!(
            "{what}: the connection to Redis broke before its answer, so the command may have run; the connection recovers by itself once Redis is back"
        ),
        _ if kind == ErrorKind::Timeout => format!("{what}: Redis did not answer in time"),
        _ => what.to_owned(),
    };
    // The answers that say "not now" are transient, and their words say to try again: a
    // command refused before it ran is one that could not be made (retryable, nothing ran);
    // one cut off by a failover while it waited for its replicas may have been kept. On a
    // cluster, an earlier try of the same command may have run before its connection broke
    // (the cluster client sent it again): retryable, but not "nothing ran". A redirection that
    // reaches us (`MOVED`, `ASK`) is one the cluster client stopped following, a loop as often
    // as a move: it stays `Other`.
    let kind = match e.code() {
        _ if kind != ErrorKind::Other => kind,
        Some("CLUSTERDOWN" | "TRYAGAIN" | "MASTERDOWN" | "READONLY" | "LOADING") if cluster => {
            ErrorKind::Transport
        }
        Some("CLUSTERDOWN" | "TRYAGAIN" | "MASTERDOWN" | "READONLY" | "LOADING") => {
            ErrorKind::Connect
        }
        _ if e.to_string().contains("UNBLOCKED") => ErrorKind::Transport,
        _ => kind,
    };
    Box::new(Error::new(kind, message).with_source(e))
}

pub(crate) async fn bounded<T>(
    timeout: Duration,
    what: &'static str,
    fut: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> Result<T, BoxError> {
    bounded_as(timeout, what, fut, false).await
}

/// [`bounded`] for connecting, where errors are classified by [`connect_error`].
pub(crate) async fn bounded_connect<T>(
    timeout: Duration,
    what: &'static str,
    fut: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> Result<T, BoxError> {
    bounded_as(timeout, what, fut, true).await
}

/// The backend operation being polled: when it must end, and the last answer of a Redis
/// Cluster that said a command of it did not run (see `conn::NotRunAgain`, which reads the
/// deadline and keeps the answer).
pub(crate) struct Operation {
    pub(crate) deadline: tokio::time::Instant,
    pub(crate) not_run: std::sync::Mutex<Option<redis::RedisError>>,
    /// Set when a command of it went through a Redis Cluster client.
    pub(crate) cluster: std::sync::atomic::AtomicBool,
}

tokio::task_local! {
    pub(crate) static OPERATION: Arc<Operation>;
}

async fn bounded_as<T>(
    timeout: Duration,
    what: &'static str,
    fut: impl std::future::Future<Output = redis::RedisResult<T>>,
    connecting: bool,
) -> Result<T, BoxError> {
    let deadline = sturdy_core::clock::after(tokio::time::Instant::now(), timeout);
    let op = Arc::new(Operation {
        deadline,
        not_run: std::sync::Mutex::new(None),
        cluster: std::sync::atomic::AtomicBool::new(false),
    });
    match tokio::time::timeout_at(deadline, OPERATION.scope(op.clone(), fut)).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(classified(
            what,
            e,
            connecting,
            op.cluster.load(std::sync::atomic::Ordering::Relaxed),
        )),
        Err(_) => {
            let waited = sturdy_core::human_duration(timeout);
            let not_run = op.not_run.lock().ok().and_then(|mut e| e.take());
            Err(match not_run {
                // The cluster said "not run" and the timeout cut a try sent again (by the
                // cluster client or by `NotRunAgain`): the reader needs the cause, and that
                // last try may have run, so it stays a timeout.
                Some(e) => Box::new(
                    Error::new(
                        ErrorKind::Timeout,
                        format!(
                            "{what}: the Redis Cluster cannot serve this key now (a failover or a slot move is under way): it answered {}, so that try did not run, and the try sent again after it had no answer within {waited}; try again shortly",
                            e.code().unwrap_or("that it cannot")
                        ),
                    )
                    .with_source(e),
                ),
                None => Box::new(Error::new(
                    ErrorKind::Timeout,
                    format!("{what}: Redis did not answer within {waited}"),
                )),
            })
        }
    }
}

/// A rate-limit quota kept in Redis and shared by every process that uses the same keys.
///
/// Works on one Redis server and on a Redis Cluster: the two keys of one limiter (its next free
/// slot and its pause) share a hash tag, so each decision is one script on one node.
#[derive(Clone)]
pub struct RedisQuota {
    conn: RedisConnection,
    quota: Quota,
    prefix: String,
    timeout: Duration,
    max_pause: Duration,
}

impl fmt::Debug for RedisQuota {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisQuota")
            .field("quota", &self.quota)
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .field("max_pause", &self.max_pause)
            .finish_non_exhaustive()
    }
}

impl RedisQuota {
    /// Connects to Redis at `url` and shares `quota` through it (keys prefixed `sturdy:rl`,
    /// 1 s timeout per operation, pauses of at most 5 minutes).
    ///
    /// # Errors
    /// When Redis cannot be reached or refuses the credentials (see
    /// [`RedisConnection::connect`]).
    pub async fn connect(url: &str, quota: Quota) -> Result<Self, BoxError> {
        Ok(Self::new(RedisConnection::connect(url).await?, quota))
    }

    /// Connects to a Redis Cluster through any of its nodes and shares `quota` through it
    /// (see [`RedisConnection::connect_cluster`]); the same defaults as
    /// [`connect`](Self::connect).
    ///
    /// # Errors
    /// When no node can be reached.
    pub async fn connect_cluster<I, S>(nodes: I, quota: Quota) -> Result<Self, BoxError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        Ok(Self::new(
            RedisConnection::connect_cluster(nodes).await?,
            quota,
        ))
    }

    /// Shares `quota` through an existing connection: a [`RedisConnection`] (one server or a
    /// cluster), or a `redis` crate `ConnectionManager` or cluster `ClusterConnection`.
    pub fn new(conn: impl Into<RedisConnection>, quota: Quota) -> Self {
        Self {
            conn: conn.into(),
            quota,
            prefix: "sturdy:rl".to_owned(),
            timeout: Duration::from_secs(1),
            max_pause: sturdy_ratelimit::DEFAULT_MAX_PAUSE,
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

    /// The longest pause kept in Redis \[5 min, `sturdy_ratelimit::DEFAULT_MAX_PAUSE`\]. A longer
    /// pause asked through [`try_pause`](Self::try_pause) is stored as the cap, and a pause key
    /// found with a longer time to live (written with a larger cap) is cut to it by the next
    /// decision or pause. Zero: pauses are not shared (and ones found are removed).
    ///
    /// Give every process on a prefix the same cap, and the `RateLimitLayer`'s
    /// `with_max_pause` the same value.
    #[must_use]
    pub fn with_max_pause(mut self, max_pause: Duration) -> Self {
        self.max_pause = max_pause;
        self
    }

    fn max_pause_ms(&self) -> u64 {
        capped_ms(self.max_pause)
    }

    /// The quota's interval and tolerance in microseconds, as the scripts use them: the
    /// interval at most [`FAR`] (a quota of one call per `Duration::MAX` is one per 30 years),
    /// the tolerance at most 2^52 µs (about 142 years), so that the scripts' sums stay exact.
    fn spacing(&self) -> (u64, u64) {
        let interval = capped_micros(self.quota.interval()).max(1);
        let tolerance = interval
            .saturating_mul(u64::from(self.quota.burst().saturating_sub(1)))
            .min(1 << 52);
        (interval, tolerance)
    }

    /// The Redis keys of one limiter: `<prefix>:{<key>}:tat` and `<prefix>:{<key>}:pause`. The
    /// hash tag keeps both in one Redis Cluster slot. Where it cannot, or where the names would
    /// not be one pair's alone, the prefix and the key are written in hex inside the tag
    /// instead: an empty key (an empty tag, which Redis ignores), and a prefix or key with a
    /// brace in it (prefix `p` with key `t}:{c` would otherwise be prefix `p:{t}` with key `c`).
    fn keys(&self, key: &str) -> (String, String) {
        let braces = |s: &str| s.contains(['{', '}']);
        if !key.is_empty() && !braces(key) && !braces(&self.prefix) {
            let tat = format!("{}:{{{key}}}:tat", self.prefix);
            let pause = format!("{}:{{{key}}}:pause", self.prefix);
            debug_assert_eq!(hash_slot(tat.as_bytes()), hash_slot(pause.as_bytes()));
            return (tat, pause);
        }
        let hex = |s: &str| s.bytes().map(|b| format!("{b:02x}")).collect::<String>();
        let base = format!("{{x{}.{}}}", hex(&self.prefix), hex(key));
        (format!("{base}:tat"), format!("{base}:pause"))
    }

    /// Reserves a slot (see [`RemoteQuota::reserve`]).
    ///
    /// # Errors
    /// When Redis fails or does not answer in time.
    pub async fn try_reserve(&self, key: &str, max_wait: Duration) -> Result<Reserve, BoxError> {
        let (tat, pause) = self.keys(key);
        let (interval, tolerance) = self.spacing();
        let mut conn = self.conn.clone();
        let mut inv = RESERVE_LUA.call();
        inv.key(tat)
            .key(pause)
            .arg(interval)
            .arg(tolerance)
            .arg(capped_micros(max_wait))
            .arg(self.max_pause_ms());
        let (granted, wait): (i64, i64) = bounded(
            self.timeout,
            "rate-limit reservation",
            inv.invoke(&mut conn),
        )
        .await?;
        let wait = Duration::from_micros(u64::try_from(wait).unwrap_or(0));
        Ok(if granted == 1 {
            Reserve::Granted { wait }
        } else {
            Reserve::Denied { retry_after: wait }
        })
    }

    /// Pauses `key` for every process for `duration` (see [`RemoteQuota::pause`]), at most the
    /// cap ([`with_max_pause`](Self::with_max_pause)); a longer pause already there (up to the cap)
    /// is kept. A `duration` of zero pauses nothing (nothing is written); one under a millisecond
    /// pauses for a millisecond, so that no process goes sooner than asked.
    ///
    /// # Errors
    /// When Redis fails or does not answer in time.
    pub async fn try_pause(&self, key: &str, duration: Duration) -> Result<(), BoxError> {
        let cap = self.max_pause_ms();
        if cap == 0 || duration.is_zero() {
            return Ok(());
        }
        let (_, pause) = self.keys(key);
        let ms = capped_ms(duration).clamp(1, cap);
        let mut conn = self.conn.clone();
        let mut inv = PAUSE_LUA.call();
        inv.key(pause).arg(ms).arg(cap);
        let _: i64 = bounded(self.timeout, "rate-limit pause", inv.invoke(&mut conn)).await?;
        Ok(())
    }

    /// How long `key` stays paused for every process (`None`: not paused), never more than the
    /// cap.
    ///
    /// # Errors
    /// When Redis fails or does not answer in time.
    pub async fn try_paused(&self, key: &str) -> Result<Option<Duration>, BoxError> {
        let (_, pause) = self.keys(key);
        let mut conn = self.conn.clone();
        let left: i64 = bounded(
            self.timeout,
            "rate-limit pause lookup",
            redis::cmd("PTTL").arg(pause).query_async(&mut conn),
        )
        .await?;
        Ok(u64::try_from(left)
            .ok()
            .map(|ms| Duration::from_millis(ms).min(self.max_pause))
            // Under a cap of zero, a pause another process wrote is no pause here.
            .filter(|d| !d.is_zero()))
    }

    /// Ends the pause of `key` for every process; returns the time it had left (`None`: it was
    /// not paused). Pair it with `RateLimitHandle::clear_pause` for the pause each process keeps
    /// in memory.
    ///
    /// # Errors
    /// When Redis fails or does not answer in time.
    pub async fn try_clear_pause(&self, key: &str) -> Result<Option<Duration>, BoxError> {
        let (_, pause) = self.keys(key);
        let mut conn = self.conn.clone();
        let left: i64 = bounded(
            self.timeout,
            "rate-limit pause removal",
            CLEAR_LUA.call().key(pause).invoke(&mut conn),
        )
        .await?;
        Ok(u64::try_from(left)
            .ok()
            .map(|ms| Duration::from_millis(ms).min(self.max_pause))
            // Under a cap of zero, a pause another process wrote is no pause here.
            .filter(|d| !d.is_zero()))
    }

    /// Gives back one slot that [`try_reserve`](Self::try_reserve) granted and that will not be
    /// used (see [`RemoteQuota::release`]). The quota's next free slot moves back one interval,
    /// never before now; whether a slot was given back.
    ///
    /// # Errors
    /// When Redis fails or does not answer in time.
    pub async fn try_release(&self, key: &str) -> Result<bool, BoxError> {
        let (tat, _) = self.keys(key);
        let (interval, _) = self.spacing();
        let mut conn = self.conn.clone();
        let mut inv = RELEASE_LUA.call();
        inv.key(tat).arg(interval);
        let released: i64 = bounded(
            self.timeout,
            "rate-limit slot release",
            inv.invoke(&mut conn),
        )
        .await?;
        Ok(released == 1)
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

    fn release(&self, key: &str) -> BoxFuture<Result<(), BoxError>> {
        let this = self.clone();
        let key = key.to_owned();
        Box::pin(async move { this.try_release(&key).await.map(|_| ()) })
    }

    fn clear_pause(&self, key: &str) -> BoxFuture<Result<(), BoxError>> {
        let this = self.clone();
        let key = key.to_owned();
        Box::pin(async move { this.try_clear_pause(&key).await.map(|_| ()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(code: &str, text: &str) -> redis::RedisError {
        redis::make_extension_error(code.to_owned(), Some(text.to_owned()))
    }

    fn kind_of(e: redis::RedisError) -> (ErrorKind, String) {
        let err = store_error("taking a slot", e);
        let e = sturdy_core::find::<Error>(&*err).expect("a sturdy error");
        (e.kind().clone(), e.to_string())
    }

    /// The answers whose words say "try again shortly" are retryable: refused before they ran.
    #[test]
    fn transient_answers_are_retryable_and_say_so() {
        for code in [
            "CLUSTERDOWN",
            "TRYAGAIN",
            "MASTERDOWN",
            "READONLY",
            "LOADING",
        ] {
            let (kind, text) = kind_of(answer(code, "not now"));
            assert_eq!(kind, ErrorKind::Connect, "{code}: {text}");
            assert!(kind.is_retryable(), "{code}");
            assert!(text.contains("try again shortly"), "{code}: {text}");
        }
        // On a cluster an earlier try may have run: retryable, not "nothing ran".
        let err = classified("taking a slot", answer("TRYAGAIN", "not now"), false, true);
        let e = sturdy_core::find::<Error>(&*err).unwrap();
        assert_eq!(e.kind(), &ErrorKind::Transport);
        // A redirection that reaches the caller is not one to try again blindly, and its words
        // do not say so.
        let (kind, text) = kind_of(answer("MOVED", "866 127.0.0.1:1"));
        assert_eq!(kind, ErrorKind::Other);
        assert!(!text.contains("try again"), "{text}");
        // A script's own error is not transient.
        let (kind, _) = kind_of(answer("ERR", "user_script:1: boom"));
        assert_eq!(kind, ErrorKind::Other);
    }
}
