use std::fmt;
use std::sync::LazyLock;
use std::time::Duration;

use bytes::Bytes;
use redis::Value;
use sturdy_core::{BoxError, Error, ErrorKind};
use sturdy_webhook::http;
use sturdy_webhook::{BoxFuture, EventQueue, Push, WebhookEvent};

use crate::conn::{hash_tag_span, Lua, Replication};
use crate::{bounded, RedisConnection};

/// Dedup and append in one step. KEYS: dedup key, stream, and the stream's twin when it has one
/// (refused while it exists, see `twin_of`). ARGV: dedup ttl (ms), max backlog, whether a
/// duplicate may extend the key (`1`: the event has a signed timestamp), then the entry's
/// field/value pairs. A duplicate signed with a later timestamp (a sender's retry) stays
/// replayable for longer: its longer ttl extends the key.
const PUSH: &str = r"
if KEYS[3] and redis.call('EXISTS', KEYS[3]) == 1 then return 'twin' end
if redis.call('EXISTS', KEYS[1]) == 1 then
  if ARGV[3] == '1' and redis.call('PTTL', KEYS[1]) < tonumber(ARGV[1]) then
    redis.call('PEXPIRE', KEYS[1], ARGV[1])
  end
  return 'duplicate'
end
if redis.call('XLEN', KEYS[2]) >= tonumber(ARGV[2]) then return 'full' end
redis.call('XADD', KEYS[2], '*', unpack(ARGV, 4))
redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
return 'enqueued'
";

/// Helpers shared by the consumer's scripts.
///
/// `release` deletes an entry a group is done with, unless another consumer group has yet to
/// read it (its last-delivered id is older) or holds it pending. `dead_letter` copies an entry to
/// the dead-letter stream with why, and releases it for the group.
const HELPERS: &str = r"
local function field(f, name)
  for i = 1, #f, 2 do if f[i] == name then return f[i + 1] end end
  return nil
end
local function id_lt(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  am, as, bm, bs = tonumber(am), tonumber(as), tonumber(bm), tonumber(bs)
  return am < bm or (am == bm and as < bs)
end
local function release(stream, group, id)
  local groups = redis.call('XINFO', 'GROUPS', stream)
  for _, g in ipairs(groups) do
    local name = field(g, 'name')
    if name ~= group then
      if id_lt(field(g, 'last-delivered-id'), id) then return 0 end
      if #redis.call('XPENDING', stream, name, id, id, 1) > 0 then return 0 end
    end
  end
  redis.call('XDEL', stream, id)
  return 1
end
local function dead_letter(stream, dead, maxlen, group, id, fields, deliveries, reason)
  local args = {'XADD', dead, 'MAXLEN', '~', maxlen, '*'}
  for i = 1, #fields, 2 do
    if string.sub(fields[i], 1, 3) ~= 'dl-' and fields[i] ~= 'for-group' then
      args[#args + 1] = fields[i]
      args[#args + 1] = fields[i + 1]
    end
  end
  for _, v in ipairs({'dl-entry', id, 'dl-group', group, 'dl-deliveries', deliveries, 'dl-reason', reason}) do
    args[#args + 1] = v
  end
  redis.call(unpack(args))
  redis.call('XACK', stream, group, id)
  release(stream, group, id)
end
";

/// The next event for a consumer, in one round trip. KEYS: stream, dead-letter stream. ARGV:
/// group, consumer, claim idle (ms), max deliveries, claim cursor, dead-letter max length.
///
/// First an entry left unacknowledged for longer than the claim delay (an entry delivered more
/// than the maximum goes to the dead-letter stream instead), then a new one. Entries replayed
/// for another group are acknowledged and skipped. Returns `{'event', cursor, id, fields,
/// deliveries}`, `{'none', cursor}` (nothing waiting) or `{'again', cursor}` (call again).
const NEXT: &str = r"
local stream, dead = KEYS[1], KEYS[2]
local group, consumer, idle = ARGV[1], ARGV[2], ARGV[3]
local max, cursor, maxlen = tonumber(ARGV[4]), ARGV[5], ARGV[6]
for _ = 1, 16 do
  local r = redis.call('XAUTOCLAIM', stream, group, consumer, idle, cursor, 'COUNT', 1)
  cursor = r[1]
  local e = r[2][1]
  if e then
    local p = redis.call('XPENDING', stream, group, e[1], e[1], 1)
    local n = (p[1] and p[1][4]) or 1
    local target = field(e[2], 'for-group')
    if target and target ~= group then
      redis.call('XACK', stream, group, e[1])
      release(stream, group, e[1])
    elseif n > max then
      dead_letter(stream, dead, maxlen, group, e[1], e[2], n - 1,
        'not acknowledged after ' .. (n - 1) .. ' deliveries')
    else
      return {'event', cursor, e[1], e[2], n}
    end
  elseif cursor == '0-0' then
    break
  end
end
for _ = 1, 16 do
  local r = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', 1, 'STREAMS', stream, '>')
  if not r then return {'none', cursor} end
  local e = r[1][2][1]
  local target = field(e[2], 'for-group')
  if target and target ~= group then
    redis.call('XACK', stream, group, e[1])
    release(stream, group, e[1])
  else
    return {'event', cursor, e[1], e[2], 1}
  end
end
return {'again', cursor}
";

/// Acknowledges. KEYS: stream. ARGV: group, entry id.
const ACK: &str = r"
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
return release(KEYS[1], ARGV[1], ARGV[2])
";

/// Dead-letters at the handler's request. KEYS: stream, dead-letter stream. ARGV: group, entry
/// id, reason, dead-letter max length.
///
/// An entry no longer pending for the group was acknowledged or dead-lettered already (by a
/// consumer that claimed it, or by this call's earlier try whose answer was lost): it is left
/// alone, even when it is still in the stream for another group (a dead letter of it would
/// deliver it to this group again once replayed).
const DEAD: &str = r"
local stream, dead, group, id = KEYS[1], KEYS[2], ARGV[1], ARGV[2]
local e = redis.call('XRANGE', stream, id, id)[1]
if not e then
  redis.call('XACK', stream, group, id)
  return 0
end
local p = redis.call('XPENDING', stream, group, id, id, 1)
if not p[1] then return 0 end
dead_letter(stream, dead, ARGV[4], group, id, e[2], p[1][4], ARGV[3])
return 1
";

/// Puts a dead letter back on the stream for the group that gave up on it. KEYS: dead-letter
/// stream, stream. ARGV: dead-letter entry id, max backlog.
const REPLAY: &str = r"
local e = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])[1]
if not e then return 'missing' end
if redis.call('XLEN', KEYS[2]) >= tonumber(ARGV[2]) then return 'full' end
local args = {'XADD', KEYS[2], '*'}
local group
for i = 1, #e[2], 2 do
  local f = e[2][i]
  if f == 'dl-group' then group = e[2][i + 1] end
  if string.sub(f, 1, 3) ~= 'dl-' then
    args[#args + 1] = f
    args[#args + 1] = e[2][i + 1]
  end
end
if group then
  args[#args + 1] = 'for-group'
  args[#args + 1] = group
end
redis.call(unpack(args))
redis.call('XDEL', KEYS[1], ARGV[1])
return 'replayed'
";

static PUSH_LUA: LazyLock<Lua> = LazyLock::new(|| Lua::new(PUSH.to_owned()));
static REPLAY_LUA: LazyLock<Lua> = LazyLock::new(|| Lua::new(REPLAY.to_owned()));
static NEXT_LUA: LazyLock<Lua> = LazyLock::new(|| Lua::new(format!("{HELPERS}{NEXT}")));
static ACK_LUA: LazyLock<Lua> = LazyLock::new(|| Lua::new(format!("{HELPERS}{ACK}")));
static DEAD_LUA: LazyLock<Lua> = LazyLock::new(|| Lua::new(format!("{HELPERS}{DEAD}")));

/// Refuses an empty stream, group or consumer name before anything is sent.
fn named(what: &str, name: String) -> Result<String, BoxError> {
    if name.is_empty() {
        return Err(Box::new(Error::new(
            ErrorKind::Config,
            format!("the {what} name is empty"),
        )));
    }
    Ok(name)
}

/// The start of the names of the keys that go with `stream` (its dedup keys and its dead-letter
/// stream), chosen so that they are in the stream's Redis Cluster hash slot: the stream name
/// itself when it has a hash tag (`{webhooks}` gives `{webhooks}:dead`), else the name as the
/// tag (`webhooks` gives `{webhooks}:dead`, whose slot is the slot of `webhooks`).
///
/// A name with a hash tag that is itself one of another stream's keys is refused: `<base>:dead`
/// (the dead-letter stream of the stream whose base is `<base>`: a queue on it would answer
/// `Enqueued` for events that then sit among the other's dead letters, where no consumer gets
/// them) and `<base>:seen:...` (a dedup key, which a push would overwrite with the stream in it).
fn key_base(stream: &str) -> Result<String, BoxError> {
    if let Some(tag) = hash_tag_span(stream.as_bytes()) {
        // What follows the tag's `}`: `<base>` is a tagged name, so a suffix after the tag
        // decides whether this name is one of another base's keys.
        let after_tag = &stream[tag.end + 1..];
        if after_tag.ends_with(":dead") {
            let owner = &stream[..stream.len() - ":dead".len()];
            return Err(Box::new(Error::new(
                ErrorKind::Config,
                format!(
                    "the stream name {stream:?} is the dead-letter stream of the stream {owner:?}: events queued there would sit among its dead letters; choose another name"
                ),
            )));
        }
        // `{t}:seen` is no key of `{t}`'s, but its own dedup keys (`{t}:seen:seen:...`) would
        // be `{t}`'s for a scheme named `seen`: one stream's events read as the other's
        // duplicates.
        if after_tag.contains(":seen:") || after_tag.ends_with(":seen") {
            return Err(Box::new(Error::new(
                ErrorKind::Config,
                format!(
                    "the stream name {stream:?} has \":seen\" after its hash tag, where another stream keeps its dedup keys; choose another name"
                ),
            )));
        }
        Ok(stream.to_owned())
    } else if !stream.contains('}') {
        Ok(format!("{{{stream}}}"))
    } else {
        Err(Box::new(Error::new(
            ErrorKind::Config,
            format!(
                "the stream name {stream:?} has a '}}' but no hash tag, so its dedup keys cannot share its Redis Cluster hash slot: give it a hash tag such as {{webhooks}}"
            ),
        )))
    }
}

/// The first entry of an `XREADGROUP` answer: `[[stream, [entry...]]]` (RESP2) or
/// `{stream: [entry...]}` (RESP3); `Nil` or an empty list when there is none.
fn first_entry(v: Value) -> Option<Value> {
    let entries = match v {
        Value::Array(streams) => streams.into_iter().next().and_then(|s| match s {
            Value::Array(pair) => pair.into_iter().nth(1),
            _ => None,
        }),
        Value::Map(m) => m.into_iter().next().map(|(_, e)| e),
        _ => None,
    };
    match entries {
        Some(Value::Array(list)) => list.into_iter().next(),
        _ => None,
    }
}

/// The one other stream name whose keys would start with the same `base`: `{webhooks}` for
/// the stream `webhooks` (whose base it is), and `webhooks` for the stream `{webhooks}`. Any
/// other name has a base of its own.
fn twin_of(stream: &str, base: &str) -> Option<String> {
    if stream != base {
        return Some(base.to_owned());
    }
    let inner = stream.strip_prefix('{')?.strip_suffix('}')?;
    (!inner.is_empty() && !inner.contains('}')).then(|| inner.to_owned())
}

/// Whether `entry` is a whole stream entry id, `<milliseconds>-<sequence>`, each a `u64`: what
/// Redis gives every entry. Redis would also read `<milliseconds>` alone, `-`, `+` or `$`, each
/// naming some entry the caller did not give, or refuse with a script error.
fn is_entry_id(entry: &str) -> bool {
    // `parse` alone would take a leading `+`.
    let number = |s: &str| s.bytes().all(|b| b.is_ascii_digit()) && s.parse::<u64>().is_ok();
    entry
        .split_once('-')
        .is_some_and(|(ms, seq)| number(ms) && number(seq))
}

fn dead_stream(base: &str) -> String {
    format!("{base}:dead")
}

/// A duration for Redis, at most about 30 years (`Duration::MAX` included).
fn millis(d: Duration) -> u64 {
    crate::capped_ms(d)
}

/// Cuts `s` to at most `max` bytes, at a character's boundary.
fn cut(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

fn unexpected(what: &str, v: &impl fmt::Debug) -> BoxError {
    let mut shown = format!("{v:?}");
    // The answer may hold any text (an event's body).
    cut(&mut shown, 200);
    Box::new(Error::new(
        ErrorKind::Other,
        format!("unexpected answer from Redis to {what}: {shown}"),
    ))
}

/// A durable webhook queue on a Redis Stream, shared by several app instances: the dedup and
/// the append happen in one script (a dedup key is remembered only if its event was appended);
/// the backlog is bounded (a full stream answers [`Push::Full`], so the sender redelivers).
/// Consume it with [`RedisStreamConsumer`]; inspect and replay the dead-letter stream here.
///
/// Keys: the stream, `<base>:seen:<dedup key>` for deduplication (one per event, expiring with
/// the dedup TTL) and `<base>:dead` for dead letters, where `<base>` is the stream name if it
/// has a hash tag (`{webhooks}`), else the stream name made one (`webhooks` gives
/// `{webhooks}`). So all of them are in the stream's hash slot, and every script runs on one
/// node of a Redis Cluster. The streams `webhooks` and `{webhooks}` would have one base: while
/// one of them exists in a Redis, a push to the other fails with a `Config` error that names
/// both (the receiver answers 503, so the sender redelivers), instead of taking one's events
/// for duplicates of the other's. A name that is another stream's key is refused when the queue
/// or a consumer is made (a `Config` error): a name with a hash tag that ends in `:dead`
/// (`{webhooks}:dead` holds the dead letters of `webhooks` and `{webhooks}`) or has `:seen:`
/// after its tag or ends in `:seen` (`{webhooks}:seen`'s dedup keys would be those of
/// `{webhooks}` for a scheme named `seen`).
#[derive(Clone)]
pub struct RedisStreamQueue {
    conn: RedisConnection,
    stream: String,
    base: String,
    /// The other stream that would share `base` (see [`twin_of`]).
    twin: Option<String>,
    dead: String,
    max_backlog: u64,
    timeout: Duration,
    replication: Replication,
}

impl fmt::Debug for RedisStreamQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStreamQueue")
            .field("stream", &self.stream)
            .field("dead_letters", &self.dead)
            .field("max_backlog", &self.max_backlog)
            .field("timeout", &self.timeout)
            .field("replicas", &self.replication.replicas)
            .finish_non_exhaustive()
    }
}

/// An event a consumer group gave up on, kept in the dead-letter stream until it is replayed
/// or discarded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The event.
    pub event: WebhookEvent,
    /// Its id in the dead-letter stream: what [`RedisStreamQueue::replay_dead_letter`] and
    /// [`RedisStreamQueue::discard_dead_letter`] take.
    pub entry: String,
    /// Its id in the stream, when it was dead-lettered.
    pub original_entry: String,
    /// The consumer group that gave up on it.
    pub group: String,
    /// How many times it had been handed to a consumer of that group.
    pub deliveries: u64,
    /// Why it was dead-lettered.
    pub reason: String,
}

impl RedisStreamQueue {
    /// A queue on the stream `stream` of the Redis server at `url`: backlog at most 100,000
    /// events, dead letters in `<base>:dead` (see the type's docs), each Redis operation bounded
    /// by 1 s.
    ///
    /// # Errors
    /// When the stream name is empty, has a `}` but no hash tag, or is another stream's key
    /// (see [`RedisStreamQueue`]), or Redis cannot be reached or refuses the credentials (see
    /// [`RedisConnection::connect`](crate::RedisConnection::connect)).
    pub async fn connect(url: &str, stream: impl Into<String>) -> Result<Self, BoxError> {
        let stream = named("stream", stream.into())?;
        key_base(&stream)?;
        Self::new(RedisConnection::connect(url).await?, stream)
    }

    /// A queue on the stream `stream` of a Redis Cluster reached through any of its nodes (see
    /// [`RedisConnection::connect_cluster`]); the same defaults as
    /// [`connect`](Self::connect).
    ///
    /// # Errors
    /// When the stream name is empty, has a `}` but no hash tag, or is another stream's key
    /// (see [`RedisStreamQueue`]), or no node can be reached.
    pub async fn connect_cluster<I, S>(
        nodes: I,
        stream: impl Into<String>,
    ) -> Result<Self, BoxError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let stream = named("stream", stream.into())?;
        key_base(&stream)?;
        Self::new(RedisConnection::connect_cluster(nodes).await?, stream)
    }

    /// A queue on the stream `stream` over an existing connection (one server or a cluster);
    /// the same defaults as [`connect`](Self::connect).
    ///
    /// # Errors
    /// When the stream name is empty, has a `}` but no hash tag, or is another stream's key
    /// (see [`RedisStreamQueue`]).
    pub fn new(
        conn: impl Into<RedisConnection>,
        stream: impl Into<String>,
    ) -> Result<Self, BoxError> {
        let stream = named("stream", stream.into())?;
        let base = key_base(&stream)?;
        Ok(Self {
            conn: conn.into(),
            dead: dead_stream(&base),
            twin: twin_of(&stream, &base),
            base,
            stream,
            max_backlog: 100_000,
            timeout: crate::conn::TIMEOUT,
            replication: Replication::NONE,
        })
    }

    /// Counts an event as enqueued only once `replicas` replicas of the Redis primary confirmed
    /// it, waiting up to `timeout` for them \[0: the primary's answer is enough\].
    ///
    /// Redis replicates asynchronously: a primary that fails right after it answered may not
    /// have passed the event on, and the replica promoted in its place does not have it. With
    /// this set, each enqueue sends `WAIT replicas timeout` in the same round trip as its script
    /// and, when fewer replicas confirm in time, returns an error: the receiver answers 503 and
    /// the sender delivers the event again. The cost is the time a replica takes to confirm
    /// (well under a millisecond on a local network), not another round trip.
    #[must_use]
    pub fn with_replication(mut self, replicas: u32, timeout: Duration) -> Self {
        self.replication = Replication { replicas, timeout };
        self
    }

    /// The most unprocessed events kept \[100,000\] (at least 1).
    #[must_use]
    pub fn with_max_backlog(mut self, n: u64) -> Self {
        self.max_backlog = n.max(1);
        self
    }

    /// The timeout of each Redis operation \[1 s\]: a Redis that is down or hung gives a clear
    /// error (the sender is answered 503 and redelivers), never a hang.
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The dead-letter stream \[`<base>:dead`, see the type's docs\]; the consumers must use
    /// the same. On a Redis Cluster it must be in the stream's hash slot: give both the same
    /// hash tag (`{webhooks}` and `{webhooks}:failed`), or every operation that touches both
    /// fails with an error that says so.
    #[must_use]
    pub fn with_dead_letter_stream(mut self, name: impl Into<String>) -> Self {
        self.dead = name.into();
        // A twin name used as this queue's own dead-letter stream is not another queue.
        if self.twin.as_deref() == Some(self.dead.as_str()) {
            self.twin = None;
        }
        self
    }

    /// Up to `count` dead letters (at most 1,000), oldest first, after the entry `after`
    /// (exclusive) when given: page through them by passing the last `entry` seen.
    ///
    /// # Errors
    /// When Redis fails or does not answer in time.
    pub async fn dead_letters(
        &self,
        after: Option<&str>,
        count: usize,
    ) -> Result<Vec<DeadLetter>, BoxError> {
        if count == 0 {
            return Ok(Vec::new());
        }
        let start = after.map_or_else(|| "-".to_owned(), |a| format!("({a}"));
        let mut conn = self.conn.clone();
        let mut cmd = redis::cmd("XRANGE");
        cmd.arg(&self.dead)
            .arg(start)
            .arg("+")
            .arg("COUNT")
            .arg(count.min(1_000));
        let v: Value = bounded(
            self.timeout,
            "listing dead letters",
            cmd.query_async(&mut conn),
        )
        .await?;
        let Value::Array(entries) = &v else {
            return Err(unexpected("XRANGE", &v));
        };
        Ok(entries.iter().filter_map(dead_letter).collect())
    }

    /// How many dead letters there are.
    ///
    /// # Errors
    /// When Redis fails or does not answer in time.
    pub async fn dead_letter_count(&self) -> Result<u64, BoxError> {
        let mut conn = self.conn.clone();
        let mut cmd = redis::cmd("XLEN");
        cmd.arg(&self.dead);
        bounded(
            self.timeout,
            "counting dead letters",
            cmd.query_async(&mut conn),
        )
        .await
    }

    /// Puts the dead letter `entry` back on the stream, for the consumer group that gave up on
    /// it only (other groups skip it), with a fresh delivery count; it leaves the dead-letter
    /// stream. `Ok(false)` when there is no such dead letter, `entry` not being a whole entry id
    /// (`<milliseconds>-<sequence>`, as in [`DeadLetter::entry`]) included.
    ///
    /// # Errors
    /// When the stream is full (its backlog is at the maximum), or Redis fails or does not
    /// answer in time.
    pub async fn replay_dead_letter(&self, entry: &str) -> Result<bool, BoxError> {
        if !is_entry_id(entry) {
            return Ok(false);
        }
        let mut conn = self.conn.clone();
        let mut inv = REPLAY_LUA.call();
        inv.key(&self.dead)
            .key(&self.stream)
            .arg(entry)
            .arg(self.max_backlog);
        let r: String = bounded(
            self.timeout,
            "replaying a dead letter",
            inv.invoke(&mut conn),
        )
        .await?;
        match r.as_str() {
            "replayed" => Ok(true),
            "missing" => Ok(false),
            "full" => Err(Box::new(Error::new(
                ErrorKind::Other,
                format!(
                    "cannot replay the dead letter: the stream {} is full ({} event{}); retry once the consumers have caught up",
                    self.stream, self.max_backlog, if self.max_backlog == 1 { "" } else { "s" }
                ),
            ))),
            other => Err(unexpected("the replay script", &other)),
        }
    }

    /// Deletes the dead letter `entry` for good. `Ok(false)` when there is no such dead letter,
    /// `entry` not being a whole entry id (`<milliseconds>-<sequence>`) included.
    ///
    /// # Errors
    /// When Redis fails or does not answer in time.
    pub async fn discard_dead_letter(&self, entry: &str) -> Result<bool, BoxError> {
        if !is_entry_id(entry) {
            return Ok(false);
        }
        let mut conn = self.conn.clone();
        let mut cmd = redis::cmd("XDEL");
        cmd.arg(&self.dead).arg(entry);
        let n: u64 = bounded(
            self.timeout,
            "discarding a dead letter",
            cmd.query_async(&mut conn),
        )
        .await?;
        Ok(n > 0)
    }
}

impl EventQueue for RedisStreamQueue {
    fn push(&self, event: WebhookEvent, dedup_ttl: Duration) -> BoxFuture<Result<Push, BoxError>> {
        let this = self.clone();
        Box::pin(async move {
            let mut conn = this.conn.clone();
            let dedup = format!("{}:seen:{}", this.base, event.dedup_key());
            let mut inv = PUSH_LUA.call();
            inv.key(dedup).key(&this.stream);
            if let Some(twin) = &this.twin {
                inv.key(twin);
            }
            inv.arg(millis(dedup_ttl).max(1))
                .arg(this.max_backlog)
                .arg(if event.timestamp.is_some() { "1" } else { "0" })
                .arg("scheme")
                .arg(&event.scheme)
                .arg("route")
                .arg(&event.route)
                .arg("id")
                .arg(&event.id);
            if let Some(ts) = event.timestamp {
                inv.arg("ts").arg(ts);
            }
            for (name, value) in &event.headers {
                inv.arg(format!("h:{name}")).arg(value.as_bytes());
            }
            inv.arg("body").arg(event.body.as_ref());
            let rep = this.replication;
            let (r, acked): (String, u64) = bounded(
                this.timeout.saturating_add(rep.wait()),
                "webhook enqueue",
                inv.invoke_replicated(&mut conn, rep),
            )
            .await?;
            match r.as_str() {
                "enqueued" => {
                    rep.check("webhook enqueue", acked)?;
                    Ok(Push::Enqueued)
                }
                "duplicate" => {
                    rep.check("webhook enqueue", acked)?;
                    Ok(Push::Duplicate)
                }
                "full" => Ok(Push::Full),
                // Two streams that share one base would share dedup keys (an event queued on
                // one would be a "duplicate" on the other, acknowledged and never queued) and
                // dead letters: refused, so the sender redelivers and the cause is named.
                "twin" => Err(Error::new(
                    ErrorKind::Config,
                    format!(
                        "webhook enqueue: the stream {:?} exists in this Redis, and the stream \
                         {:?} would share its dedup keys and dead letters ({}:seen:…, {}): \
                         an event queued on one would be taken for a duplicate on the other; \
                         rename one of them",
                        this.twin.as_deref().unwrap_or_default(),
                        this.stream,
                        this.base,
                        this.dead,
                    ),
                )
                .into()),
                other => Err(unexpected("the enqueue script", &other)),
            }
        })
    }
}

/// One event taken from the stream; acknowledge it with [`RedisStreamConsumer::ack`] once the
/// handler succeeded. An event never acknowledged (the handler failed, or the worker crashed) is
/// delivered again after the claim delay, until it has been delivered the maximum number of
/// times; then it goes to the dead-letter stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The event.
    pub event: WebhookEvent,
    /// The stream entry id.
    pub entry: String,
    /// How many times this event has been handed to a consumer of this group, this time
    /// included (1 the first time).
    pub deliveries: u64,
}

/// A consumer in a group on a Redis Stream: the consumers of one group share the work, each
/// event going to one of them, and an event leaves the group only once acknowledged or
/// dead-lettered.
///
/// Several groups may read one stream, each getting every event (for example one group per
/// independent handler). An entry is deleted from the stream only when no group still needs
/// it: a group that has not read it yet, or holds it unacknowledged, keeps it. A group sees the
/// entries still in the stream when it is created, so create every group (connect one of its
/// consumers) before events arrive.
///
/// # Poison events
///
/// An event delivered \[5\] times without being acknowledged is moved to the dead-letter stream
/// (`<base>:dead`, see [`RedisStreamQueue`]) instead of being delivered again; a handler can also dead-letter an event
/// at once with [`RedisStreamConsumer::dead_letter`]. Dead letters are listed, replayed and
/// discarded through [`RedisStreamQueue`].
///
/// # Example
///
/// ```no_run
/// # async fn handle(_: &sturdy_webhook::WebhookEvent) -> Result<(), String> { Ok(()) }
/// # async fn run() -> Result<(), sturdy_core::BoxError> {
/// use std::time::Duration;
/// use sturdy_redis::{RedisStreamConsumer, RedisStreamQueue};
///
/// let url = "redis://127.0.0.1:6379/";
/// let mut worker =
///     RedisStreamConsumer::connect(url, "{webhooks}", "billing", "worker-1", Duration::from_secs(60))
///         .await?
///         .with_max_deliveries(5);
/// for _ in 0..1_000 {
///     let Some(d) = worker.next().await? else { continue };
///     match handle(&d.event).await {
///         Ok(()) => worker.ack(&d).await?,
///         Err(e) if e.contains("unparseable") => worker.dead_letter(&d, &e).await?,
///         Err(_) => {} // delivered again after the claim delay, up to 5 times in all
///     }
/// }
///
/// // Later, once the handler is fixed:
/// let queue = RedisStreamQueue::connect(url, "{webhooks}").await?;
/// for dead in queue.dead_letters(None, 100).await? {
///     println!("{} ({} deliveries): {}", dead.event.id, dead.deliveries, dead.reason);
///     queue.replay_dead_letter(&dead.entry).await?;
/// }
/// # Ok(())
/// # }
/// ```
pub struct RedisStreamConsumer {
    conn: RedisConnection,
    stream: String,
    dead: String,
    group: String,
    name: String,
    claim_after: Duration,
    wait: Duration,
    timeout: Duration,
    max_deliveries: u64,
    max_dead_letters: u64,
    cursor: String,
}

impl fmt::Debug for RedisStreamConsumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStreamConsumer")
            .field("stream", &self.stream)
            .field("dead_letters", &self.dead)
            .field("group", &self.group)
            .field("name", &self.name)
            .field("claim_after", &self.claim_after)
            .field("wait", &self.wait)
            .field("timeout", &self.timeout)
            .field("max_deliveries", &self.max_deliveries)
            .finish_non_exhaustive()
    }
}

fn bulk(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

fn text(v: &Value) -> Option<String> {
    bulk(v).map(|b| String::from_utf8_lossy(b).into_owned())
}

fn int(v: &Value) -> Option<u64> {
    match v {
        Value::Int(n) => u64::try_from(*n).ok(),
        other => text(other)?.parse().ok(),
    }
}

/// What an entry's fields hold besides the event.
#[derive(Default)]
struct Extra {
    for_group: Option<String>,
    dl_entry: Option<String>,
    dl_group: Option<String>,
    dl_deliveries: Option<u64>,
    dl_reason: Option<String>,
}

/// Reads an entry's `[field, value, ...]`.
fn fields(v: &Value) -> Option<(WebhookEvent, Extra)> {
    let Value::Array(fields) = v else { return None };
    let mut scheme = None;
    let mut route = None;
    let mut id = None;
    let mut ts = None;
    let mut headers = http::HeaderMap::new();
    let mut body = None;
    let mut extra = Extra::default();
    for kv in fields.chunks(2) {
        let (k, v) = (bulk(kv.first()?)?, kv.get(1)?);
        match k {
            b"scheme" => scheme = text(v),
            b"route" => route = text(v),
            b"id" => id = text(v),
            b"ts" => ts = text(v).and_then(|t| t.parse::<i64>().ok()),
            b"body" => body = bulk(v).map(Bytes::copy_from_slice),
            b"for-group" => extra.for_group = text(v),
            b"dl-entry" => extra.dl_entry = text(v),
            b"dl-group" => extra.dl_group = text(v),
            b"dl-deliveries" => extra.dl_deliveries = int(v),
            b"dl-reason" => extra.dl_reason = text(v),
            _ => {
                if let Some(name) = k.strip_prefix(b"h:") {
                    if let (Ok(n), Some(Ok(val))) = (
                        http::HeaderName::from_bytes(name),
                        bulk(v).map(http::HeaderValue::from_bytes),
                    ) {
                        // `try_append`: a map past http's largest size (a foreign writer's
                        // entry with tens of thousands of headers) drops the rest, no panic.
                        let _ = headers.try_append(n, val);
                    }
                }
            }
        }
    }
    let scheme = scheme?;
    let event = WebhookEvent::new(scheme.clone(), id?, body?)
        .with_route(route.unwrap_or(scheme))
        .with_timestamp(ts)
        .with_headers(headers);
    Some((event, extra))
}

/// Reads `[id, [field, value, ...]]`.
fn entry(v: &Value) -> Option<(String, WebhookEvent, Extra)> {
    let Value::Array(parts) = v else { return None };
    let id = text(parts.first()?)?;
    let (event, extra) = fields(parts.get(1)?)?;
    Some((id, event, extra))
}

fn dead_letter(v: &Value) -> Option<DeadLetter> {
    let (entry, event, extra) = entry(v)?;
    Some(DeadLetter {
        event,
        entry,
        original_entry: extra.dl_entry.unwrap_or_default(),
        group: extra.dl_group.unwrap_or_default(),
        deliveries: extra.dl_deliveries.unwrap_or_default(),
        reason: extra.dl_reason.unwrap_or_default(),
    })
}

/// The validated names of a consumer.
struct Names {
    stream: String,
    base: String,
    group: String,
    name: String,
}

impl Names {
    fn new(stream: String, group: String, name: String) -> Result<Self, BoxError> {
        let stream = named("stream", stream)?;
        Ok(Self {
            base: key_base(&stream)?,
            stream,
            group: named("consumer group", group)?,
            name: named("consumer", name)?,
        })
    }
}

/// What the next-event script answered.
enum Next {
    Event(Box<Delivery>),
    /// An entry that could not be read as an event (written by something else): dead-lettered.
    Unreadable(String),
    None,
    Again,
}

impl RedisStreamConsumer {
    /// Joins (creating if needed) the consumer group `group` on `stream` of the Redis server at
    /// `url`, as consumer `name`. Events left unacknowledged for `claim_after` are delivered
    /// again (to this consumer or another), so `claim_after` must be longer than the slowest
    /// handler. Defaults: at most 5 deliveries, dead letters in `<base>:dead` (see
    /// [`RedisStreamQueue`]; at most about 100,000, the oldest dropped first), `next` waits up to
    /// 500 ms for an event, each Redis operation bounded by 1 s (connecting by 2 s).
    ///
    /// # Errors
    /// When a name is empty, the stream name has a `}` but no hash tag or is another stream's
    /// key (see [`RedisStreamQueue`]), Redis cannot be reached or the group cannot be created.
    pub async fn connect(
        url: &str,
        stream: impl Into<String>,
        group: impl Into<String>,
        name: impl Into<String>,
        claim_after: Duration,
    ) -> Result<Self, BoxError> {
        let names = Names::new(stream.into(), group.into(), name.into())?;
        Self::start(RedisConnection::connect(url).await?, names, claim_after).await
    }

    /// Joins the consumer group `group` on `stream` of a Redis Cluster reached through any of
    /// its nodes (see [`RedisConnection::connect_cluster`]); otherwise as
    /// [`connect`](Self::connect).
    ///
    /// # Errors
    /// As [`connect`](Self::connect).
    pub async fn connect_cluster<I, S>(
        nodes: I,
        stream: impl Into<String>,
        group: impl Into<String>,
        name: impl Into<String>,
        claim_after: Duration,
    ) -> Result<Self, BoxError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let names = Names::new(stream.into(), group.into(), name.into())?;
        Self::start(
            RedisConnection::connect_cluster(nodes).await?,
            names,
            claim_after,
        )
        .await
    }

    /// Joins the consumer group `group` on `stream` over an existing connection (one server or
    /// a cluster); otherwise as [`connect`](Self::connect).
    ///
    /// # Errors
    /// When a name is empty, the stream name has a `}` but no hash tag or is another stream's
    /// key (see [`RedisStreamQueue`]), or the group cannot be created.
    pub async fn join(
        conn: impl Into<RedisConnection>,
        stream: impl Into<String>,
        group: impl Into<String>,
        name: impl Into<String>,
        claim_after: Duration,
    ) -> Result<Self, BoxError> {
        let names = Names::new(stream.into(), group.into(), name.into())?;
        Self::start(conn.into(), names, claim_after).await
    }

    async fn start(
        conn: RedisConnection,
        names: Names,
        claim_after: Duration,
    ) -> Result<Self, BoxError> {
        let timeout = crate::conn::TIMEOUT;
        let c = Self {
            conn,
            dead: dead_stream(&names.base),
            stream: names.stream,
            group: names.group,
            name: names.name,
            claim_after,
            wait: Duration::from_millis(500),
            timeout,
            max_deliveries: 5,
            max_dead_letters: 100_000,
            cursor: "0-0".to_owned(),
        };
        let mut conn = c.conn.clone();
        let mut create = redis::cmd("XGROUP");
        create
            .arg("CREATE")
            .arg(&c.stream)
            .arg(&c.group)
            .arg("0")
            .arg("MKSTREAM");
        let created = tokio::time::timeout(timeout, create.query_async::<()>(&mut conn)).await;
        match created {
            Ok(Ok(())) => {}
            Ok(Err(e)) if e.code() == Some("BUSYGROUP") => {}
            Ok(Err(e)) => {
                return Err(crate::store_error("could not create the consumer group", e));
            }
            Err(_) => {
                return Err(Box::new(Error::new(
                    ErrorKind::Timeout,
                    "could not create the consumer group: Redis did not answer in time",
                )))
            }
        }
        // Loaded now, so that `next` and `ack` are one round trip from the first call. Not
        // needed for correctness (a node without a script gets it with the call), so a node
        // that is down now (on a cluster, every node is asked) does not stop the consumer.
        for lua in [&*NEXT_LUA, &*ACK_LUA, &*DEAD_LUA] {
            if let Err(e) =
                bounded(timeout, "loading the consumer scripts", lua.load(&mut conn)).await
            {
                tracing::debug!(error = %e, "the consumer scripts were not loaded in advance");
                break;
            }
        }
        Ok(c)
    }

    /// The most times an event is handed to this group's consumers before it is dead-lettered
    /// \[5\] (at least 1). A delivery is counted when Redis hands the event to a read, even one
    /// whose `next()` was cancelled (a timeout, a `select!`) before it returned the event: with
    /// 1, such an event goes to the dead letters (where it can be replayed) instead of to a
    /// handler; 2 or more leaves room for a cut read.
    #[must_use]
    pub fn with_max_deliveries(mut self, n: u64) -> Self {
        self.max_deliveries = n.max(1);
        self
    }

    /// The dead-letter stream \[`<base>:dead`, see [`RedisStreamQueue`]\]; the queue must use
    /// the same (and on a Redis Cluster, it must share the stream's hash tag).
    #[must_use]
    pub fn with_dead_letter_stream(mut self, name: impl Into<String>) -> Self {
        self.dead = name.into();
        self
    }

    /// About how many dead letters are kept \[100,000\] (at least 1); past it the oldest are
    /// dropped (Redis's approximate `MAXLEN ~` trimming).
    #[must_use]
    pub fn with_max_dead_letters(mut self, n: u64) -> Self {
        self.max_dead_letters = n.max(1);
        self
    }

    /// How long [`RedisStreamConsumer::next`] waits for a new event before answering `None`
    /// \[500 ms\]. It asks Redis every 5 ms at first, then less often, at most 100 ms apart,
    /// so a new event waits about 100 ms at most to be seen; it never blocks the connection,
    /// which its clones (a queue, a store, other consumers) share.
    #[must_use]
    pub fn with_wait(mut self, wait: Duration) -> Self {
        self.wait = wait;
        self
    }

    /// The timeout of each Redis operation \[1 s\] (the wait for a new event comes on top).
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    async fn step(&mut self) -> Result<Next, BoxError> {
        let mut conn = self.conn.clone();
        let mut inv = NEXT_LUA.call();
        inv.key(&self.stream)
            .key(&self.dead)
            .arg(&self.group)
            .arg(&self.name)
            .arg(millis(self.claim_after))
            .arg(self.max_deliveries)
            .arg(&self.cursor)
            .arg(self.max_dead_letters);
        let v: Value = bounded(self.timeout, "webhook next", inv.invoke(&mut conn)).await?;
        let Value::Array(parts) = &v else {
            return Err(unexpected("the next-event script", &v));
        };
        let (Some(kind), Some(cursor)) =
            (parts.first().and_then(text), parts.get(1).and_then(text))
        else {
            return Err(unexpected("the next-event script", &v));
        };
        self.cursor = cursor;
        match kind.as_str() {
            "none" => Ok(Next::None),
            "again" => Ok(Next::Again),
            "event" => {
                let entry = parts.get(2).and_then(text).unwrap_or_default();
                let deliveries = parts.get(4).and_then(int).unwrap_or(1);
                Ok(match parts.get(3).and_then(fields) {
                    Some((event, _)) => Next::Event(Box::new(Delivery {
                        event,
                        entry,
                        deliveries,
                    })),
                    None => Next::Unreadable(entry),
                })
            }
            _ => Err(unexpected("the next-event script", &v)),
        }
    }

    /// Waits up to the wait time for a new entry, asking Redis every 5 ms at first, then less
    /// often, up to every 100 ms.
    ///
    /// Not `XREADGROUP BLOCK`: the connection is multiplexed and its clones share it (the queue
    /// a receiver pushes to, the idempotency store, other consumers), and a blocking command
    /// holds every reply behind it until it ends. A short read also keeps a cancelled `next`
    /// from taking an event on the server after its caller has gone.
    async fn read_new(&mut self) -> Result<Option<(String, WebhookEvent, Extra)>, BoxError> {
        let deadline = tokio::time::Instant::now() + self.wait.min(crate::FAR);
        let mut pause = Duration::from_millis(5);
        let first = loop {
            if let Some(first) = first_entry(self.read_once().await?) {
                break first;
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            tokio::time::sleep(pause.min(deadline - now)).await;
            pause = (pause * 2).min(Duration::from_millis(100));
        };
        let first = &first;
        match entry(first) {
            Some(e) => Ok(Some(e)),
            None => {
                let id = match first {
                    Value::Array(p) => p.first().and_then(text).unwrap_or_default(),
                    _ => String::new(),
                };
                self.give_up(&id, "the entry is not a webhook event")
                    .await?;
                Ok(None)
            }
        }
    }

    /// One `XREADGROUP` for a new entry, without waiting.
    async fn read_once(&self) -> Result<Value, BoxError> {
        let mut conn = self.conn.clone();
        let mut read = redis::cmd("XREADGROUP");
        read.arg("GROUP")
            .arg(&self.group)
            .arg(&self.name)
            .arg("COUNT")
            .arg(1)
            .arg("STREAMS")
            .arg(&self.stream)
            .arg(">");
        bounded(self.timeout, "webhook read", read.query_async(&mut conn)).await
    }

    async fn give_up(&self, entry: &str, reason: &str) -> Result<(), BoxError> {
        tracing::warn!(stream = %self.stream, group = %self.group, entry, reason, "webhook event dead-lettered");
        let mut conn = self.conn.clone();
        let mut inv = DEAD_LUA.call();
        inv.key(&self.stream);
        let mut reason = reason.to_owned();
        cut(&mut reason, 1024);
        inv.key(&self.dead)
            .arg(&self.group)
            .arg(entry)
            .arg(reason)
            .arg(self.max_dead_letters);
        let _: i64 = bounded(self.timeout, "webhook dead-letter", inv.invoke(&mut conn)).await?;
        Ok(())
    }

    /// The next event: first one left unacknowledged for longer than the claim delay (one
    /// delivered the maximum number of times goes to the dead-letter stream instead), else a new
    /// one, waiting up to the wait time \[500 ms\]. `None` when there is none yet.
    ///
    /// When an event is waiting this costs one round trip to Redis (one script); when none is,
    /// short reads follow, 5 ms apart at first and up to 100 ms apart, until one finds a new
    /// event or the wait time ends. None of them blocks the connection its clones share.
    ///
    /// Cancelling it (a `select!` or a timeout around it) loses nothing: an event taken by a
    /// read whose answer was dropped stays pending for this consumer and is delivered again
    /// after the claim delay, counted as a delivery.
    ///
    /// # Errors
    /// When Redis fails or does not answer in time.
    pub async fn next(&mut self) -> Result<Option<Delivery>, BoxError> {
        // Bounded: each pass settles at least one entry (claimed, skipped or dead-lettered).
        for _ in 0..64 {
            match self.step().await? {
                Next::Event(d) => {
                    if d.deliveries > 1 {
                        tracing::info!(id = %d.event.id, deliveries = d.deliveries, "delivering a webhook event again: it was not acknowledged in time");
                    }
                    return Ok(Some(*d));
                }
                Next::Unreadable(entry) => {
                    self.give_up(&entry, "the entry is not a webhook event")
                        .await?;
                }
                Next::Again => {}
                Next::None => loop {
                    let Some((entry, event, extra)) = self.read_new().await? else {
                        return Ok(None);
                    };
                    if extra.for_group.is_some_and(|g| g != self.group) {
                        self.release(&entry).await?;
                        continue;
                    }
                    return Ok(Some(Delivery {
                        event,
                        entry,
                        deliveries: 1,
                    }));
                },
            }
        }
        Ok(None)
    }

    async fn release(&self, entry: &str) -> Result<(), BoxError> {
        let mut conn = self.conn.clone();
        let mut inv = ACK_LUA.call();
        inv.key(&self.stream).arg(&self.group).arg(entry);
        let _: i64 = bounded(self.timeout, "webhook ack", inv.invoke(&mut conn)).await?;
        Ok(())
    }

    /// Acknowledges a delivery after its handler succeeded. The entry is deleted from the stream
    /// unless another consumer group still needs it.
    ///
    /// # Errors
    /// When Redis fails or does not answer in time. The event then stays pending and is
    /// delivered again, unless the command reached Redis before the failure (a `Timeout`, or a
    /// `Transport` error: the connection broke before the answer), in which case it may have
    /// been done. Handlers are to be idempotent either way (delivery is at least once).
    pub async fn ack(&self, d: &Delivery) -> Result<(), BoxError> {
        self.release(&d.entry).await
    }

    /// Gives up on a delivery at once (for example a payload the handler can never process): it
    /// moves to the dead-letter stream with `reason` (at most 1 KiB kept) and is not delivered
    /// again to this group. A delivery the group no longer holds pending (another consumer
    /// claimed it after `claim_after` and acknowledged or dead-lettered it, or an earlier try
    /// of this call ran) is left as it is, and this is still `Ok`: it is not dead-lettered
    /// twice, nor made a dead letter after it was handled.
    ///
    /// # Errors
    /// When Redis fails or does not answer in time. The event then stays pending and is
    /// delivered again, unless the command reached Redis before the failure (a `Timeout`, or a
    /// `Transport` error: the connection broke before the answer), in which case it may have
    /// been done. Handlers are to be idempotent either way (delivery is at least once).
    pub async fn dead_letter(&self, d: &Delivery, reason: &str) -> Result<(), BoxError> {
        self.give_up(&d.entry, reason).await
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_whole_entry_ids_are_entry_ids() {
        for id in [
            "0-0",
            "1-1",
            "1700000000000-0",
            "18446744073709551615-18446744073709551615",
        ] {
            assert!(super::is_entry_id(id), "{id}");
        }
        for id in [
            "",
            "-",
            "+",
            "$",
            ">",
            "1",
            "1-",
            "-1",
            "1-2-3",
            "18446744073709551616-0",
            "+1-0",
            "1-+0",
            " 1-0",
            "1-0 ",
            "ключ",
            "1-0\r\nPING",
        ] {
            assert!(!super::is_entry_id(id), "{id:?}");
        }
    }

    #[test]
    fn a_name_that_is_another_streams_key_has_no_base() {
        for taken in [
            "{webhooks}:dead",
            "a{webhooks}b:dead",
            "{webhooks}:seen:standard:evt_1",
            "{webhooks}x:seen:",
            "{webhooks}:seen",
            "{w}}:dead",
            "{w}{x}:dead",
        ] {
            let e = super::key_base(taken).expect_err(taken);
            assert!(e.to_string().contains(taken), "{e}");
        }
        let e = super::key_base("a{webhooks}b:dead")
            .unwrap_err()
            .to_string();
        assert!(e.contains("of the stream \"a{webhooks}b\""), "{e}");
        for free in [
            "webhooks:dead",
            "{webhooks}:deadline",
            "{webhooks:dead}",
            "{a:seen:b}",
            "{webhooks}:seenx",
            "{webhooks}",
            "webhooks",
        ] {
            assert!(super::key_base(free).is_ok(), "{free}");
        }
    }

    #[test]
    fn an_unexpected_answer_is_cut_at_a_character_boundary() {
        // 'ë' is two bytes: the 200th byte falls inside one, for each of the two alignments.
        for pad in ["", "a"] {
            let text = format!("{pad}{}", "ë".repeat(300));
            let e = super::unexpected("NEXT", &text);
            assert!(e.to_string().contains("ëë"), "{e}");
            assert!(e.to_string().len() < 300, "{e}");
        }
    }
}
