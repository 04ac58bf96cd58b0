use std::fmt;
use std::sync::LazyLock;
use std::time::Duration;

use sturdy_core::{BoxError, Error, ErrorKind};
use sturdy_idempotency::server::{
    Begin, BoxFuture, Fingerprint, IdempotencyStore, LockToken, StoredResponse,
};

use crate::conn::{Lua, Replication};
use crate::{bounded, RedisConnection};

/// Locks a key with `SET NX PX`, or reports what holds it. KEYS: key. ARGV: fingerprint (hex),
/// lease (ms), lock token (hex), call (hex, new for each `begin`). Values:
/// `i:<fp>:<token>:<call>` while running, `d:<fp>:<response>` when done.
///
/// The call id is there for the Redis Cluster client, which sends a command again when its
/// connection broke, whether or not the command had been written: a `begin` that had run then
/// finds the lock it took itself, which it tells from another `begin`'s lock (even one with the
/// same token) by the call id, and answers `started` again.
const BEGIN: &str = r"
local mine = 'i:' .. ARGV[1] .. ':' .. ARGV[3] .. ':' .. ARGV[4]
if redis.call('SET', KEYS[1], mine, 'NX', 'PX', ARGV[2]) then
  return {'started'}
end
local v = redis.call('GET', KEYS[1])
if v == mine then return {'started'} end
local fp = string.sub(v, 3, 66)
if fp ~= ARGV[1] then return {'mismatch'} end
if string.sub(v, 1, 2) == 'i:' then return {'inflight'} end
return {'done', string.sub(v, 68)}
";

/// Extends the lock if this token holds it, or takes the key again if it is free (the lease ran
/// out and nobody took it over). ARGV: fp, lease (ms), token. A lock is this token's when it
/// reads `i:<fp>:<token>`, then nothing or `:<call>` (a lock taken before call ids has none).
const RENEW: &str = r"
local v = redis.call('GET', KEYS[1])
local mine = 'i:' .. ARGV[1] .. ':' .. ARGV[3]
local n = #mine
if v and string.sub(v, 1, n) == mine and (#v == n or string.sub(v, n + 1, n + 1) == ':') then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
if not v then
  redis.call('SET', KEYS[1], mine, 'PX', ARGV[2])
  return 1
end
return 0
";

/// Stores the response if this token holds the lock, or if the key is free (the lease ran out
/// and nobody took it over). ARGV: fp, ttl (ms), response, token.
const COMPLETE: &str = r"
local v = redis.call('GET', KEYS[1])
local mine = 'i:' .. ARGV[1] .. ':' .. ARGV[4]
local n = #mine
if not v or (string.sub(v, 1, n) == mine and (#v == n or string.sub(v, n + 1, n + 1) == ':')) then
  redis.call('SET', KEYS[1], 'd:' .. ARGV[1] .. ':' .. ARGV[3], 'PX', ARGV[2])
  return 1
end
return 0
";

/// Drops the lock if this token holds it. ARGV: token (32 hex digits, after `i:`, the
/// fingerprint's 64 and a colon).
const RELEASE: &str = r"
local v = redis.call('GET', KEYS[1])
local mine = string.sub(v or '', 1, 2) == 'i:' and string.sub(v, 68, 99) == ARGV[1]
if mine and (#v == 99 or string.sub(v, 100, 100) == ':') then
  return redis.call('DEL', KEYS[1])
end
return 0
";

static BEGIN_LUA: LazyLock<Lua> = LazyLock::new(|| Lua::new(BEGIN.to_owned()));
static RENEW_LUA: LazyLock<Lua> = LazyLock::new(|| Lua::new(RENEW.to_owned()));
static COMPLETE_LUA: LazyLock<Lua> = LazyLock::new(|| Lua::new(COMPLETE.to_owned()));
static RELEASE_LUA: LazyLock<Lua> = LazyLock::new(|| Lua::new(RELEASE.to_owned()));

/// An idempotency store in Redis, so several app instances agree on keys: the lock is a
/// `SET NX PX` with the lease; renewal, completion and release are atomic scripts that act only
/// for the [`LockToken`] that took the lock (or, for renewal and completion, on a key whose
/// lease ran out with nobody taking it over); stored responses expire with their TTL. One round
/// trip per operation, each bounded by a timeout \[1 s\].
///
/// Each key is one Redis string: `i:<fingerprint>:<lock token>:<call>` while its request runs,
/// then `d:<fingerprint>:<response as JSON>` (see [`StoredResponse::to_json`]), fingerprint,
/// token and call in hex. The call is new for each `begin`: on a Redis Cluster, whose client
/// sends a command again when its connection broke, a `begin` that had run finds its own lock
/// by it and answers [`Begin::Started`], never [`Begin::InFlight`] for itself. The Redis key is
/// the prefix, a hash of the client's scope and the idempotency key; no credential is stored.
/// (A lock written by a version without tokens, `i:<fingerprint>`, is left to run out with its
/// lease; one written by a version without call ids, `i:<fingerprint>:<lock token>`, is still
/// renewed, completed and released by its token.)
///
/// Works on one Redis server and on a Redis Cluster: each operation touches one key, so it goes
/// to the one node that owns it.
#[derive(Clone)]
pub struct RedisIdempotencyStore {
    conn: RedisConnection,
    prefix: String,
    timeout: Duration,
    replication: Replication,
}

impl fmt::Debug for RedisIdempotencyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisIdempotencyStore")
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .field("replicas", &self.replication.replicas)
            .finish_non_exhaustive()
    }
}

fn hex(fp: &Fingerprint) -> String {
    fp.iter().map(|b| format!("{b:02x}")).collect()
}

/// A lease or TTL for Redis: at least 1 ms, at most about 30 years (`Duration::MAX` included).
fn ms(d: Duration) -> u64 {
    crate::capped_ms(d).max(1)
}

impl RedisIdempotencyStore {
    /// Connects to Redis at `url` (keys prefixed `sturdy:idem`).
    ///
    /// # Errors
    /// When Redis cannot be reached or refuses the credentials (see
    /// [`RedisConnection::connect`]).
    pub async fn connect(url: &str) -> Result<Self, BoxError> {
        Ok(Self::new(RedisConnection::connect(url).await?))
    }

    /// Connects to a Redis Cluster through any of its nodes (see
    /// [`RedisConnection::connect_cluster`]); keys prefixed `sturdy:idem`.
    ///
    /// # Errors
    /// When no node can be reached.
    pub async fn connect_cluster<I, S>(nodes: I) -> Result<Self, BoxError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        Ok(Self::new(RedisConnection::connect_cluster(nodes).await?))
    }

    /// A store on an existing connection: a [`RedisConnection`] (one server or a cluster), or
    /// a `redis` crate `ConnectionManager` or cluster `ClusterConnection`.
    pub fn new(conn: impl Into<RedisConnection>) -> Self {
        Self {
            conn: conn.into(),
            prefix: "sturdy:idem".into(),
            timeout: Duration::from_secs(1),
            replication: Replication::NONE,
        }
    }

    /// Counts a lock taken and a response stored only once `replicas` replicas of the Redis
    /// primary confirmed them, waiting up to `timeout` for them \[0: the primary's answer is
    /// enough\].
    ///
    /// Redis replicates asynchronously: after a failover, the promoted replica may lack the
    /// last writes of the primary that failed, so a lock or a stored response could vanish and
    /// a retry would run the handler again. With this set, `begin` and `complete` send
    /// `WAIT replicas timeout` in the same round trip as their script and fail when fewer
    /// replicas confirm in time: the layer then answers 503 without running the handler and
    /// releases the lock in the background, so a retry runs at once (for `begin`), or tries to
    /// store the response again (for `complete`).
    #[must_use]
    pub fn with_replication(mut self, replicas: u32, timeout: Duration) -> Self {
        self.replication = Replication { replicas, timeout };
        self
    }

    /// The key prefix \[`sturdy:idem`\].
    #[must_use]
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The timeout of each operation \[1 s\].
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    fn key(&self, key: &str) -> String {
        format!("{}:{key}", self.prefix)
    }
}

impl IdempotencyStore for RedisIdempotencyStore {
    fn begin(
        &self,
        key: &str,
        fingerprint: Fingerprint,
        token: LockToken,
        lease: Duration,
    ) -> BoxFuture<Result<Begin, BoxError>> {
        let this = self.clone();
        let key = self.key(key);
        Box::pin(async move {
            let mut conn = this.conn.clone();
            let mut inv = BEGIN_LUA.call();
            inv.key(key)
                .arg(hex(&fingerprint))
                .arg(ms(lease))
                .arg(token.to_string())
                .arg(LockToken::random().to_string());
            let rep = this.replication;
            let (v, acked): (Vec<Vec<u8>>, u64) = bounded(
                this.timeout.saturating_add(rep.wait()),
                "idempotency begin",
                inv.invoke_replicated(&mut conn, rep),
            )
            .await?;
            match v.first().map(Vec::as_slice) {
                Some(b"started") => {
                    rep.check("idempotency begin", acked)?;
                    Ok(Begin::Started)
                }
                Some(b"inflight") => Ok(Begin::InFlight),
                Some(b"mismatch") => Ok(Begin::Mismatch),
                Some(b"done") => v
                    .get(1)
                    .and_then(|r| StoredResponse::from_json(r))
                    .map(Begin::Completed)
                    .ok_or_else(|| {
                        Box::new(Error::new(
                            ErrorKind::Other,
                            "a stored response in Redis could not be read",
                        )) as BoxError
                    }),
                _ => Err(Box::new(Error::new(
                    ErrorKind::Other,
                    "unexpected answer from the idempotency script",
                )) as BoxError),
            }
        })
    }

    fn renew(
        &self,
        key: &str,
        fingerprint: Fingerprint,
        token: LockToken,
        lease: Duration,
    ) -> BoxFuture<Result<bool, BoxError>> {
        let this = self.clone();
        let key = self.key(key);
        Box::pin(async move {
            let mut conn = this.conn.clone();
            let mut inv = RENEW_LUA.call();
            inv.key(key)
                .arg(hex(&fingerprint))
                .arg(ms(lease))
                .arg(token.to_string());
            let renewed: i64 =
                bounded(this.timeout, "idempotency renew", inv.invoke(&mut conn)).await?;
            Ok(renewed == 1)
        })
    }

    fn complete(
        &self,
        key: &str,
        fingerprint: Fingerprint,
        token: LockToken,
        response: StoredResponse,
        ttl: Duration,
    ) -> BoxFuture<Result<(), BoxError>> {
        let this = self.clone();
        let key = self.key(key);
        Box::pin(async move {
            let mut conn = this.conn.clone();
            let mut inv = COMPLETE_LUA.call();
            inv.key(key)
                .arg(hex(&fingerprint))
                .arg(ms(ttl))
                .arg(response.to_json())
                .arg(token.to_string());
            let rep = this.replication;
            let (_, acked): (i64, u64) = bounded(
                this.timeout.saturating_add(rep.wait()),
                "idempotency complete",
                inv.invoke_replicated(&mut conn, rep),
            )
            .await?;
            rep.check("idempotency complete", acked)
        })
    }

    fn release(&self, key: &str, token: LockToken) -> BoxFuture<Result<(), BoxError>> {
        let this = self.clone();
        let key = self.key(key);
        Box::pin(async move {
            let mut conn = this.conn.clone();
            let mut inv = RELEASE_LUA.call();
            inv.key(key).arg(token.to_string());
            let _: i64 =
                bounded(this.timeout, "idempotency release", inv.invoke(&mut conn)).await?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::{LockToken, BEGIN, RELEASE, RENEW};

    /// The Redis at `STURDY_REDIS_URL`; a missing server fails when CI set the variable.
    async fn redis() -> Option<redis::aio::MultiplexedConnection> {
        let url = std::env::var("STURDY_REDIS_URL").ok()?;
        let client = redis::Client::open(url).expect("STURDY_REDIS_URL");
        Some(
            client
                .get_multiplexed_async_connection()
                .await
                .expect("the Redis at STURDY_REDIS_URL"),
        )
    }

    async fn begin(
        c: &mut redis::aio::MultiplexedConnection,
        key: &str,
        token: &str,
        call: &str,
    ) -> String {
        let v: Vec<String> = redis::Script::new(BEGIN)
            .key(key)
            .arg("ab".repeat(32))
            .arg(30_000)
            .arg(token)
            .arg(call)
            .invoke_async(c)
            .await
            .unwrap();
        v[0].clone()
    }

    /// The Redis Cluster client sends a command again after its connection broke, written or
    /// not: a `begin` that had run, sent again with the same arguments, is `started` again; a
    /// `begin` of another call is `inflight`, with the same token too.
    #[tokio::test]
    async fn a_begin_sent_twice_finds_its_own_lock_and_another_call_does_not() {
        let Some(mut c) = redis().await else { return };
        let key = format!("sturdy:test:begin-twice:{}", LockToken::random());
        let token = "0123456789abcdef0123456789abcdef";
        let call = "00000000000000000000000000000001";
        assert_eq!(begin(&mut c, &key, token, call).await, "started");
        assert_eq!(begin(&mut c, &key, token, call).await, "started");
        let other = "00000000000000000000000000000002";
        assert_eq!(begin(&mut c, &key, token, other).await, "inflight");
        // The lock is the token's: renewed and released by it, with its call id in the value.
        let renewed: i64 = redis::Script::new(RENEW)
            .key(&key)
            .arg("ab".repeat(32))
            .arg(30_000)
            .arg(token)
            .invoke_async(&mut c)
            .await
            .unwrap();
        assert_eq!(renewed, 1);
        let released: i64 = redis::Script::new(RELEASE)
            .key(&key)
            .arg(token)
            .invoke_async(&mut c)
            .await
            .unwrap();
        assert_eq!(released, 1);
        assert_eq!(begin(&mut c, &key, token, other).await, "started");
        let _: i64 = redis::cmd("DEL")
            .arg(&key)
            .query_async(&mut c)
            .await
            .unwrap();
    }
}
