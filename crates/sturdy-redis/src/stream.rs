use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use redis::aio::ConnectionManager;
use redis::{Script, Value};
use sturdy_core::{BoxError, Error, ErrorKind};
use sturdy_webhook::{BoxFuture, EventQueue, Push, WebhookEvent};

use crate::bounded;

/// Dedup and append in one step. KEYS: dedup key, stream. ARGV: dedup ttl (ms), max backlog,
/// scheme, id, body.
const PUSH: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return 'duplicate' end
if redis.call('XLEN', KEYS[2]) >= tonumber(ARGV[2]) then return 'full' end
redis.call('XADD', KEYS[2], '*', 'scheme', ARGV[3], 'id', ARGV[4], 'body', ARGV[5])
redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
return 'enqueued'
";

/// A durable webhook queue on a Redis Stream, shared by several app instances: the event-id
/// dedup and the append happen in one script (an id is remembered only if its event was
/// appended); the backlog is bounded (a full stream answers [`Push::Full`], so the sender
/// redelivers). Consume it with [`RedisStreamConsumer`].
#[derive(Clone)]
pub struct RedisStreamQueue {
    conn: ConnectionManager,
    stream: String,
    max_backlog: u64,
    timeout: Duration,
    push: Script,
}

impl fmt::Debug for RedisStreamQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStreamQueue")
            .field("stream", &self.stream)
            .field("max_backlog", &self.max_backlog)
            .finish_non_exhaustive()
    }
}

impl RedisStreamQueue {
    /// A queue on the stream `stream` (backlog at most 100,000 events).
    ///
    /// # Errors
    /// When Redis cannot be reached.
    pub async fn connect(url: &str, stream: impl Into<String>) -> Result<Self, BoxError> {
        Ok(Self {
            conn: crate::connect(url, Duration::from_secs(1)).await?,
            stream: stream.into(),
            max_backlog: 100_000,
            timeout: Duration::from_secs(1),
            push: Script::new(PUSH),
        })
    }

    /// The most unprocessed events kept \[100,000\].
    #[must_use]
    pub fn with_max_backlog(mut self, n: u64) -> Self {
        self.max_backlog = n.max(1);
        self
    }
}

impl EventQueue for RedisStreamQueue {
    fn push(&self, event: WebhookEvent, dedup_ttl: Duration) -> BoxFuture<Result<Push, BoxError>> {
        let this = self.clone();
        Box::pin(async move {
            let mut conn = this.conn.clone();
            let dedup = format!("{}:seen:{}", this.stream, event.id);
            let mut inv = this.push.key(dedup);
            inv.key(&this.stream)
                .arg(
                    u64::try_from(dedup_ttl.as_millis())
                        .unwrap_or(u64::MAX)
                        .max(1),
                )
                .arg(this.max_backlog)
                .arg(&event.scheme)
                .arg(&event.id)
                .arg(event.body.as_ref());
            let r: String =
                bounded(this.timeout, "webhook enqueue", inv.invoke_async(&mut conn)).await?;
            match r.as_str() {
                "enqueued" => Ok(Push::Enqueued),
                "duplicate" => Ok(Push::Duplicate),
                "full" => Ok(Push::Full),
                other => Err(Box::new(Error::new(
                    ErrorKind::Other,
                    format!("unexpected answer from the enqueue script: {other}"),
                )) as BoxError),
            }
        })
    }
}

/// One event taken from the stream; acknowledge it with [`RedisStreamConsumer::ack`] once the
/// handler succeeded. An event never acknowledged (the worker crashed) is claimed by another
/// consumer after the claim delay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The event.
    pub event: WebhookEvent,
    /// The stream entry id.
    pub entry: String,
}

/// A consumer in a group on a Redis Stream: several instances share the work, each event goes to
/// one of them, and an event is removed only after it was acknowledged.
pub struct RedisStreamConsumer {
    conn: ConnectionManager,
    stream: String,
    group: String,
    name: String,
    claim_after: Duration,
    block: Duration,
    timeout: Duration,
}

impl fmt::Debug for RedisStreamConsumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStreamConsumer")
            .field("stream", &self.stream)
            .field("group", &self.group)
            .field("name", &self.name)
            .field("claim_after", &self.claim_after)
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

/// Reads `[id, \[field, value, ...\]]`.
fn entry(v: &Value) -> Option<Delivery> {
    let Value::Array(parts) = v else { return None };
    let id = String::from_utf8(bulk(parts.first()?)?.to_vec()).ok()?;
    let Value::Array(fields) = parts.get(1)? else {
        return None;
    };
    let mut scheme = None;
    let mut eid = None;
    let mut body = None;
    for kv in fields.chunks(2) {
        let (k, v) = (bulk(kv.first()?)?, bulk(kv.get(1)?)?);
        match k {
            b"scheme" => scheme = Some(String::from_utf8_lossy(v).into_owned()),
            b"id" => eid = Some(String::from_utf8_lossy(v).into_owned()),
            b"body" => body = Some(Bytes::copy_from_slice(v)),
            _ => {}
        }
    }
    Some(Delivery {
        event: WebhookEvent::new(scheme?, eid?, body?),
        entry: id,
    })
}

impl RedisStreamConsumer {
    /// Joins (creating if needed) the consumer group `group` on `stream` as consumer `name`.
    /// Events left unacknowledged by another consumer for `claim_after` are taken over.
    ///
    /// # Errors
    /// When Redis cannot be reached or the group cannot be created.
    pub async fn connect(
        url: &str,
        stream: impl Into<String>,
        group: impl Into<String>,
        name: impl Into<String>,
        claim_after: Duration,
    ) -> Result<Self, BoxError> {
        let c = Self {
            conn: crate::connect(url, Duration::from_secs(2)).await?,
            stream: stream.into(),
            group: group.into(),
            name: name.into(),
            claim_after,
            block: Duration::from_millis(500),
            timeout: Duration::from_secs(2),
        };
        let mut conn = c.conn.clone();
        let created: redis::RedisResult<()> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&c.stream)
            .arg(&c.group)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut conn)
            .await;
        if let Err(e) = created {
            if e.code() != Some("BUSYGROUP") {
                return Err(Box::new(
                    Error::new(ErrorKind::Other, "could not create the consumer group")
                        .with_source(e),
                ));
            }
        }
        Ok(c)
    }

    /// The next event: first any event another consumer left unacknowledged for longer than the
    /// claim delay, else a new one (waiting up to half a second). `None` when there is none yet.
    ///
    /// # Errors
    /// When Redis fails.
    pub async fn next(&mut self) -> Result<Option<Delivery>, BoxError> {
        let mut conn = self.conn.clone();
        let idle = u64::try_from(self.claim_after.as_millis()).unwrap_or(u64::MAX);
        let mut claim_cmd = redis::cmd("XAUTOCLAIM");
        claim_cmd
            .arg(&self.stream)
            .arg(&self.group)
            .arg(&self.name)
            .arg(idle)
            .arg("0-0")
            .arg("COUNT")
            .arg(1);
        let claim = claim_cmd.query_async::<Value>(&mut conn);
        let claimed = bounded(self.timeout, "webhook claim", claim).await?;
        if let Value::Array(parts) = &claimed {
            if let Some(Value::Array(entries)) = parts.get(1) {
                if let Some(d) = entries.iter().find_map(entry) {
                    tracing::info!(id = %d.event.id, "took over an event another worker did not acknowledge");
                    return Ok(Some(d));
                }
            }
        }
        let block = u64::try_from(self.block.as_millis()).unwrap_or(500);
        let mut read_cmd = redis::cmd("XREADGROUP");
        read_cmd
            .arg("GROUP")
            .arg(&self.group)
            .arg(&self.name)
            .arg("COUNT")
            .arg(1)
            .arg("BLOCK")
            .arg(block)
            .arg("STREAMS")
            .arg(&self.stream)
            .arg(">");
        let read = read_cmd.query_async::<Value>(&mut conn);
        let v = bounded(self.timeout, "webhook read", read).await?;
        // [[stream, [entry...]]] (RESP2) or {stream: [entry...]} (RESP3); Nil on timeout.
        let entries = match &v {
            Value::Array(streams) => streams.first().and_then(|s| match s {
                Value::Array(pair) => pair.get(1).cloned(),
                _ => None,
            }),
            Value::Map(m) => m.first().map(|(_, e)| e.clone()),
            _ => None,
        };
        Ok(match entries {
            Some(Value::Array(list)) => list.iter().find_map(entry),
            _ => None,
        })
    }

    /// Acknowledges a delivery after its handler succeeded: it is removed from the stream.
    ///
    /// # Errors
    /// When Redis fails (the event then stays pending and is delivered again).
    pub async fn ack(&self, d: &Delivery) -> Result<(), BoxError> {
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("XACK")
            .arg(&self.stream)
            .arg(&self.group)
            .arg(&d.entry)
            .ignore()
            .cmd("XDEL")
            .arg(&self.stream)
            .arg(&d.entry)
            .ignore();
        bounded(
            self.timeout,
            "webhook ack",
            pipe.query_async::<()>(&mut conn),
        )
        .await
    }
}
