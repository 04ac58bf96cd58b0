//! Connections to one Redis server or to a Redis Cluster, hash slots, and Lua scripts that run
//! in one round trip on either.

use std::fmt;
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, FromRedisValue, Pipeline, RedisFuture, RedisResult, ToRedisArgs, Value};
use sturdy_core::{BoxError, Error, ErrorKind};

/// A connection to Redis: one server, or a Redis Cluster.
///
/// Every backend of this crate takes one. It is cheap to clone (clones share the connection) and
/// reconnects by itself: after a restart of the server, or a failover in the cluster (a replica
/// promoted in place of a primary that died), the next operations go to the server that holds
/// the data now, without a new `RedisConnection`. It also outlives the tokio runtime it was
/// made on: used on another runtime after that one shut down (a `static` backend used by
/// several `#[tokio::test]`s), it connects again there (on a cluster, a pipeline that finds the
/// old connection gone fails, and the commands after it go on the new one; one made from your
/// own `ClusterConnection` is not made anew).
///
/// On a cluster, requests go to the primary that owns the key's hash slot. Every script of this
/// crate touches keys of one slot only (see the crate docs on key layout), so each operation is
/// still one command to one node.
///
/// # Example
///
/// ```no_run
/// # async fn run() -> Result<(), sturdy_core::BoxError> {
/// use sturdy_redis::{RedisConnection, RedisIdempotencyStore};
///
/// let single = RedisConnection::connect("redis://127.0.0.1:6379/").await?;
/// let cluster = RedisConnection::connect_cluster([
///     "redis://10.0.0.1:6379/",
///     "redis://10.0.0.2:6379/",
///     "redis://10.0.0.3:6379/",
/// ])
/// .await?;
/// assert!(cluster.is_cluster() && !single.is_cluster());
/// let store = RedisIdempotencyStore::new(cluster);
/// # let _ = store;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RedisConnection {
    inner: Inner,
}

#[derive(Clone)]
enum Inner {
    Single(Single),
    Cluster(Cluster),
}

/// A connection to one server: the redis client's connection manager, and what it takes to make
/// a new one.
///
/// The manager reconnects by itself after a broken connection, but a reconnect that Redis
/// refused for its credentials (the password changed, then changed back; a server restarted
/// with a password for a while) stays in the manager for good: it makes a new connection only
/// after an I/O error, and every later command gets the refusal at once, without being sent.
/// So a command refused for its credentials has the manager replaced for every clone (a new
/// one connects at its first command), at most once per [`RENEW_EVERY`], so that a password
/// that stays wrong does not make a connection per command.
#[derive(Clone)]
struct Single {
    manager: ConnectionManager,
    /// Which of `renew`'s managers `manager` is.
    generation: u64,
    /// `None` for a manager made by the application (`From<ConnectionManager>`): it cannot be
    /// made anew here.
    renew: Option<std::sync::Arc<Renew>>,
}

/// The shortest time between two new managers.
const RENEW_EVERY: Duration = Duration::from_millis(100);

struct Renew {
    client: redis::Client,
    config: redis::aio::ConnectionManagerConfig,
    generation: std::sync::atomic::AtomicU64,
    current: std::sync::Mutex<Current>,
}

struct Current {
    manager: ConnectionManager,
    made: tokio::time::Instant,
}

impl Single {
    /// The manager every clone uses now.
    fn manager(&mut self) -> &mut ConnectionManager {
        if let Some(renew) = &self.renew {
            if renew.generation.load(std::sync::atomic::Ordering::Acquire) != self.generation {
                // Under the lock, the manager and its generation change together.
                let current = renew
                    .current
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                self.manager = current.manager.clone();
                self.generation = renew.generation.load(std::sync::atomic::Ordering::Acquire);
            }
        }
        &mut self.manager
    }

    /// After a command's error: a refusal of the credentials replaces the manager (see above).
    /// The command itself is not sent again: the new manager connects at its first command, and
    /// a password still wrong makes that connect try again after a pause (the redis client's
    /// retry), longer than a short operation timeout.
    fn failed(&self, e: &redis::RedisError) {
        let Some(renew) = &self.renew else {
            return;
        };
        // The refusal itself, by its kind or code: not any error whose text mentions it (a
        // script's own error must not make a connection).
        if !crate::refused_credentials(e) {
            return;
        }
        let mut current = renew
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let generation = renew.generation.load(std::sync::atomic::Ordering::Acquire);
        if generation != self.generation || current.made.elapsed() < RENEW_EVERY {
            // Another clone made one already, or one was made a moment ago.
            return;
        }
        if let Ok(manager) =
            ConnectionManager::new_lazy_with_config(renew.client.clone(), renew.config.clone())
        {
            current.manager = manager;
            current.made = tokio::time::Instant::now();
            renew
                .generation
                .store(generation + 1, std::sync::atomic::Ordering::Release);
        }
    }
}

/// A connection to a Redis Cluster, and what it takes to make a new one.
///
/// The cluster client runs its connections in a task on the runtime it was made on. When that
/// runtime shuts down (a `#[tokio::test]`'s runtime, one runtime per thread, a runtime made for
/// a start-up step), every later command fails at once on every runtime, for good: the client
/// cannot hand it to its task any more. So a command that finds the task gone has a new
/// connection made on the runtime it runs on, for every clone, and goes on it (it was sent
/// nowhere).
#[derive(Clone)]
struct Cluster {
    conn: ClusterConnection,
    /// Which of `renew`'s connections `conn` is.
    generation: u64,
    /// `None` for a connection made by the application (`From<ClusterConnection>`).
    renew: Option<std::sync::Arc<ClusterRenew>>,
}

struct ClusterRenew {
    client: ClusterClient,
    timeout: Duration,
    generation: std::sync::atomic::AtomicU64,
    current: std::sync::Mutex<ClusterConnection>,
    /// Set while one clone makes a new connection: the others do not make theirs.
    making: std::sync::atomic::AtomicBool,
}

/// Clears [`ClusterRenew::making`] however the making ends.
struct Making(std::sync::Arc<ClusterRenew>);

impl Drop for Making {
    fn drop(&mut self) {
        self.0
            .making
            .store(false, std::sync::atomic::Ordering::Release);
    }
}

/// A command the cluster client could not hand to its task, because the task is gone: it was
/// sent nowhere. The client's own words are the only sign (the error is an I/O error like any
/// broken connection's). A command whose answer the task dropped ("Unable to receive command")
/// is not one: the task may still run, and the command may have been sent; if the task is
/// gone, the next command finds it so.
fn task_gone(e: &redis::RedisError) -> bool {
    e.is_io_error()
        && e.to_string()
            .contains("redis_cluster: Unable to send command")
}

/// A broken pipe with no words of its own: how the redis client reports a pipeline it could not
/// hand to its task (or whose answer the task lost).
/// (An operating system's broken pipe says "Broken pipe (os error 32)".)
fn bare_broken_pipe(e: &redis::RedisError) -> bool {
    e.is_io_error() && e.to_string() == "broken pipe"
}

impl Cluster {
    /// The connection every clone uses now.
    fn conn(&mut self) -> &mut ClusterConnection {
        if let Some(renew) = &self.renew {
            if renew.generation.load(std::sync::atomic::Ordering::Acquire) != self.generation {
                let current = renew
                    .current
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                self.conn = current.clone();
                self.generation = renew.generation.load(std::sync::atomic::Ordering::Acquire);
            }
        }
        &mut self.conn
    }

    /// After a command failed because the cluster client's task is gone: whether a connection
    /// to use instead is in place now (made on this runtime, or by another clone since).
    ///
    /// The connection is made in a task of its own, so that an operation's timeout shorter than
    /// a connect does not cut it (the next operation finds it made); a command of another clone
    /// that finds the task gone meanwhile waits for it rather than failing.
    async fn renewed(&mut self) -> bool {
        use std::sync::atomic::Ordering::{AcqRel, Acquire};
        let Some(renew) = self.renew.clone() else {
            return false;
        };
        let seen = self.generation;
        if renew.generation.load(Acquire) == seen && !renew.making.swap(true, AcqRel) {
            let making = Making(renew.clone());
            // Made by another clone between the look and the swap: nothing to make.
            if renew.generation.load(Acquire) == seen {
                let made = tokio::spawn(async move {
                    let r = &making.0;
                    let conn = tokio::time::timeout(
                        r.timeout.saturating_mul(2),
                        r.client.get_async_connection(),
                    )
                    .await;
                    if let Ok(Ok(conn)) = conn {
                        let mut current = r
                            .current
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner);
                        *current = conn;
                        r.generation.fetch_add(1, AcqRel);
                    }
                });
                // A runtime shutting down drops the task (and its guard) unrun.
                let _ = made.await;
            }
        } else {
            // Another clone is making one: wait for it (the operation's timeout bounds this).
            while renew.generation.load(Acquire) == seen && renew.making.load(Acquire) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        if renew.generation.load(Acquire) == seen {
            return false;
        }
        self.conn();
        true
    }
}

impl fmt::Debug for RedisConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // No address: a URL may hold a password.
        let kind = match self.inner {
            Inner::Single(_) => "single server",
            Inner::Cluster(_) => "cluster",
        };
        f.debug_struct("RedisConnection")
            .field("kind", &kind)
            .finish_non_exhaustive()
    }
}

impl From<ConnectionManager> for RedisConnection {
    fn from(c: ConnectionManager) -> Self {
        Self {
            inner: Inner::Single(Single {
                manager: c,
                generation: 0,
                renew: None,
            }),
        }
    }
}

/// A connection of your own; unlike one made by [`RedisConnection::connect_cluster`], it is
/// not made anew when the runtime it was made on shuts down.
impl From<ClusterConnection> for RedisConnection {
    fn from(c: ClusterConnection) -> Self {
        Self {
            inner: Inner::Cluster(Cluster {
                conn: c,
                generation: 0,
                renew: None,
            }),
        }
    }
}

/// The default bound of connecting and of each operation.
pub(crate) const TIMEOUT: Duration = Duration::from_secs(1);

impl RedisConnection {
    /// Connects to one Redis server at `url` (`redis://[:password@]host:port/[db]`), within
    /// 2 s. The connection reconnects by itself when the server comes back after a restart.
    ///
    /// # Errors
    /// When the URL is invalid, Redis cannot be reached or does not answer in time (a `PING`
    /// ends the connect), or Redis refuses the credentials: an `Auth` error, also for a Redis
    /// that requires a password reached with none. The message never repeats the URL, which
    /// may hold a password.
    pub async fn connect(url: &str) -> Result<Self, BoxError> {
        let (manager, client, config) = crate::connect_unbounded(url, TIMEOUT).await?;
        Ok(Self {
            inner: Inner::Single(Single {
                manager: manager.clone(),
                generation: 0,
                renew: Some(std::sync::Arc::new(Renew {
                    client,
                    config,
                    generation: std::sync::atomic::AtomicU64::new(0),
                    current: std::sync::Mutex::new(Current {
                        manager,
                        made: tokio::time::Instant::now(),
                    }),
                })),
            }),
        })
    }

    /// Connects to a Redis Cluster through any of its nodes (`redis://host:port/` each; one
    /// reachable node is enough, it tells where the others are), within 2 s.
    ///
    /// The client follows the cluster's slot map: it sends each request to the primary that
    /// owns the key, follows `MOVED`/`ASK` redirections, and learns the new map after a
    /// failover. Requests that fail while the cluster moves a slot or promotes a replica are
    /// tried again a few times within each operation's timeout: a redirection or a dropped
    /// connection at once (after reconnecting), a node that answers `TRYAGAIN`, `CLUSTERDOWN`,
    /// `MASTERDOWN` or `LOADING`, or a node not connected yet, after 10 to 100 ms. When those
    /// tries are spent on an answer that says the command did not run (`MOVED`, `ASK`,
    /// `TRYAGAIN`, `CLUSTERDOWN`, `MASTERDOWN`, `READONLY`, `LOADING`: nodes that disagree for a
    /// moment about who owns a slot send a request back and forth), the command is sent again
    /// 10 ms later, then 20, 40 and so on up to 200 ms apart, until the operation's timeout
    /// ends it (on a connection used directly, until these pauses add up to 5 s; each send
    /// again has the cluster client's own tries). Such an answer means the command did not
    /// run, so sending it again cannot run it twice.
    ///
    /// # Errors
    /// When no URL is given, a URL is invalid, or no node answers in time. The message never
    /// repeats a URL.
    pub async fn connect_cluster<I, S>(nodes: I) -> Result<Self, BoxError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let (conn, client) = connect_cluster_with_client(nodes, TIMEOUT).await?;
        Ok(Self {
            inner: Inner::Cluster(Cluster {
                conn: conn.clone(),
                generation: 0,
                renew: Some(std::sync::Arc::new(ClusterRenew {
                    client,
                    timeout: TIMEOUT,
                    generation: std::sync::atomic::AtomicU64::new(0),
                    current: std::sync::Mutex::new(conn),
                    making: std::sync::atomic::AtomicBool::new(false),
                })),
            }),
        })
    }

    /// Whether this is a connection to a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self.inner, Inner::Cluster(_))
    }
}

/// Connects to a cluster with bounded connect and response times; also the client, which makes
/// new connections.
async fn connect_cluster_with_client<I, S>(
    nodes: I,
    timeout: Duration,
) -> Result<(ClusterConnection, ClusterClient), BoxError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    let nodes: Vec<String> = nodes.into_iter().map(|s| s.as_ref().to_owned()).collect();
    if nodes.is_empty() {
        return Err(Box::new(Error::new(
            ErrorKind::Config,
            "no Redis Cluster node given: pass the URL of at least one node",
        )));
    }
    let client = ClusterClient::builder(nodes)
        .connection_timeout(timeout)
        // Each operation is bounded by the caller's own timeout (a blocking stream read waits
        // longer than one operation), so the client's bound only has to be longer than any.
        .response_timeout(Duration::from_secs(3600))
        .retries(6)
        .min_retry_wait(10)
        .max_retry_wait(100)
        .retry_wait_formula(10, 2)
        .build()
        .map_err(|e| crate::config_error("invalid Redis Cluster URL", e))?;
    let conn = crate::bounded_connect(
        timeout.saturating_mul(2),
        "could not connect to the Redis Cluster",
        client.get_async_connection(),
    )
    .await?;
    Ok((conn, client))
}

// A connection to one server that the server closed while it was idle (a restart) is found
// dead only by the next command: the redis client's connection task has already ended, so the
// command fails at once with a broken pipe, before it was written, and the manager starts
// reconnecting. The redis client sends such a command nowhere and reports it exactly as one
// whose connection broke after it was written, so the difference is read from the future
// itself: a command that was written waits (its future returns `Pending` at least once) for
// the answer, which another task reads. A dropped connection found without waiting is
// therefore one the command never reached, and the command goes once more, on the connection
// the manager makes anew; a command that waited is never sent twice. Without this, the first
// operation of every idle backend after a Redis restart would fail as "may have run".
impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match &mut self.inner {
            Inner::Single(c) => Box::pin(async move {
                let res = match watched(c.manager().req_packed_command(cmd)).await {
                    (Err(e), false) if e.is_connection_dropped() => {
                        c.manager().req_packed_command(cmd).await
                    }
                    (res, _) => res,
                };
                if let Err(e) = &res {
                    c.failed(e);
                }
                res
            }),
            Inner::Cluster(c) => Box::pin(async move {
                let mut again = NotRunAgain::default();
                let mut renewed = false;
                loop {
                    match c.conn().req_packed_command(cmd).await {
                        Err(e) if again.wait(&e).await => {}
                        Err(e) if !renewed && task_gone(&e) && c.renewed().await => {
                            renewed = true;
                        }
                        res => return resent(res),
                    }
                }
            }),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match &mut self.inner {
            Inner::Single(c) => Box::pin(async move {
                let res =
                    match watched(c.manager().req_packed_commands(pipeline, offset, count)).await {
                        (Err(e), false) if e.is_connection_dropped() => {
                            c.manager()
                                .req_packed_commands(pipeline, offset, count)
                                .await
                        }
                        (res, _) => res,
                    };
                if let Err(e) = &res {
                    c.failed(e);
                }
                res
            }),
            Inner::Cluster(c) => Box::pin(async move {
                let mut again = NotRunAgain::default();
                loop {
                    match c.conn().req_packed_commands(pipeline, offset, count).await {
                        Err(e) if again.wait(&e).await => {}
                        // The redis client reports a pipeline it could not hand to its task as
                        // a bare broken pipe, as one whose answer it lost: a `PING` tells
                        // whether the task is gone. If so, a new connection is made for the
                        // next commands; this pipeline is not sent again (it cannot be told
                        // from one that was sent).
                        Err(e) if c.renew.is_some() && bare_broken_pipe(&e) => {
                            let ping = redis::cmd("PING");
                            if let Err(p) = c.conn().req_packed_command(&ping).await {
                                if task_gone(&p) {
                                    c.renewed().await;
                                }
                            }
                            return resent(Err(e));
                        }
                        res => return resent(res),
                    }
                }
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match &self.inner {
            Inner::Single(c) => c.manager.get_db(),
            Inner::Cluster(c) => c.conn.get_db(),
        }
    }
}

/// The cluster client's own tries (six, a few hundred milliseconds at most) can all be spent
/// while nodes disagree about a slot's owner: during a slot move the old owner may already
/// answer `MOVED` to the new one while the new one still answers `MOVED` back, for as long as a
/// gossip round takes. Each of these answers means the command did not run (a pipeline's error
/// is only read this way when the node gave it for the whole pipeline), so the command is sent
/// again after a pause that doubles from 10 ms to 200 ms, while the operation's deadline
/// leaves room for the pause (every backend bounds each operation; the last answer is then
/// the error) and for at most [`NotRunAgain::BUDGET`] of pauses. The redis
/// client has no setting for this (its retries are counted, not timed), hence this loop.
struct NotRunAgain {
    next: Duration,
    paused: Duration,
}

impl Default for NotRunAgain {
    fn default() -> Self {
        Self {
            next: Duration::from_millis(10),
            paused: Duration::ZERO,
        }
    }
}

impl NotRunAgain {
    /// The most time spent pausing for one command.
    const BUDGET: Duration = Duration::from_secs(5);

    /// Whether `e` is an answer that says the command did not run, with time left to send it
    /// again; if so, after the pause.
    async fn wait(&mut self, e: &redis::RedisError) -> bool {
        let not_run = matches!(
            e.code(),
            Some(
                "MOVED"
                    | "ASK"
                    | "TRYAGAIN"
                    | "CLUSTERDOWN"
                    | "MASTERDOWN"
                    | "READONLY"
                    | "LOADING"
            )
        );
        if !not_run || self.paused >= Self::BUDGET {
            return false;
        }
        // Inside a backend's operation: keep the answer (if the operation's timeout cuts the
        // next try, its error names it), and give up when the pause would reach the deadline.
        let deadline = crate::OPERATION
            .try_with(|op| {
                if let Ok(mut kept) = op.not_run.lock() {
                    *kept = Some(e.clone());
                }
                op.deadline
            })
            .ok();
        if deadline.is_some_and(|d| tokio::time::Instant::now() + self.next >= d) {
            return false;
        }
        tokio::time::sleep(self.next).await;
        self.paused += self.next;
        self.next = (self.next * 2).min(Duration::from_millis(200));
        true
    }
}

/// A cluster command's outcome, with a failed connection reported as the cluster client's
/// "no connection" to the node. The cluster client sends a command again after its connection
/// broke, written or not, so a refused connection met by a later try does not show that the
/// command was never sent (its first try may have been written before the node died): the error
/// must not read as "not sent" (`Connect`), which a refusal alone would. The original error's
/// words stay in the detail. A timeout stays a timeout, and refused credentials stay what they
/// are (the cluster client reports them inside an I/O error).
fn resent<T>(res: RedisResult<T>) -> RedisResult<T> {
    // The operation's error is classified knowing this (see `classified`).
    let _ = crate::OPERATION.try_with(|op| {
        op.cluster.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    res.map_err(|e| {
        let broken = e.is_connection_refusal() || e.is_io_error() || e.is_connection_dropped();
        if broken && !e.is_timeout() && !crate::is_auth_failure(&e) {
            redis::RedisError::from((
                redis::ErrorKind::ClusterConnectionNotFound,
                "the cluster client could not reach the node",
                e.to_string(),
            ))
        } else {
            e
        }
    })
}

/// Runs `fut` to its end; also whether it waited (returned `Pending`) on the way.
async fn watched<T>(mut fut: RedisFuture<'_, T>) -> (RedisResult<T>, bool) {
    let mut waited = false;
    let res = std::future::poll_fn(|cx| {
        let poll = fut.as_mut().poll(cx);
        waited |= poll.is_pending();
        poll
    })
    .await;
    (res, waited)
}

// ===== hash slots =====

/// The Redis Cluster hash slot of `key` (CRC16/XMODEM of the key, or of its hash tag: the part
/// between the first `{` and the next `}`, when not empty; modulo 16384).
pub(crate) fn hash_slot(key: &[u8]) -> u16 {
    let hashed = hash_tag(key).unwrap_or(key);
    crc16(hashed) % 16384
}

/// The hash tag of `key`, if it has one that Redis Cluster uses.
pub(crate) fn hash_tag(key: &[u8]) -> Option<&[u8]> {
    hash_tag_span(key).map(|span| &key[span])
}

/// Where the hash tag of `key` lies, between its `{` and its `}` (so the `}` is at the span's
/// end), if it has one that Redis Cluster uses.
pub(crate) fn hash_tag_span(key: &[u8]) -> Option<std::ops::Range<usize>> {
    let open = key.iter().position(|&b| b == b'{')?;
    let len = key[open + 1..].iter().position(|&b| b == b'}')?;
    (len > 0).then_some(open + 1..open + 1 + len)
}

fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in data {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

// ===== scripts =====

/// A Lua script sent as `EVALSHA`; a server that does not know it yet (a new node, a restarted
/// or promoted one) gets it with `EVAL` in its place, on the node that owns the keys. So a
/// script costs one round trip once a node has seen it, and two the first time.
pub(crate) struct Lua {
    src: String,
    hash: String,
}

impl Lua {
    pub(crate) fn new(src: String) -> Self {
        let hash = redis::Script::new(&src).get_hash().to_owned();
        Self { src, hash }
    }

    pub(crate) fn call(&self) -> Call<'_> {
        Call {
            lua: self,
            keys: Vec::new(),
            args: Vec::new(),
        }
    }

    /// Loads the script into every node (on a cluster: every primary and replica).
    pub(crate) async fn load(&self, conn: &mut RedisConnection) -> RedisResult<()> {
        redis::cmd("SCRIPT")
            .arg("LOAD")
            .arg(&self.src)
            .query_async::<Value>(conn)
            .await
            .map(drop)
    }
}

/// One invocation of a [`Lua`] script.
pub(crate) struct Call<'a> {
    lua: &'a Lua,
    keys: Vec<Vec<u8>>,
    args: Vec<Vec<u8>>,
}

impl Call<'_> {
    pub(crate) fn key(&mut self, key: impl ToRedisArgs) -> &mut Self {
        self.keys.extend(key.to_redis_args());
        self
    }

    pub(crate) fn arg(&mut self, arg: impl ToRedisArgs) -> &mut Self {
        self.args.extend(arg.to_redis_args());
        self
    }

    pub(crate) fn cmd(&self, by_hash: bool) -> Cmd {
        let (name, body) = if by_hash {
            ("EVALSHA", &self.lua.hash)
        } else {
            ("EVAL", &self.lua.src)
        };
        let mut cmd = redis::cmd(name);
        cmd.arg(body).arg(self.keys.len());
        for k in &self.keys {
            cmd.arg(k.as_slice());
        }
        for a in &self.args {
            cmd.arg(a.as_slice());
        }
        cmd
    }

    pub(crate) async fn invoke<T: FromRedisValue>(
        &self,
        conn: &mut RedisConnection,
    ) -> RedisResult<T> {
        match self.cmd(true).query_async(conn).await {
            Err(e) if e.code() == Some("NOSCRIPT") => self.cmd(false).query_async(conn).await,
            other => other,
        }
    }

    /// Runs the script, then `WAIT replicas timeout` in the same round trip (one pipeline to
    /// the node that owns the keys): the script's answer, and how many replicas confirmed every
    /// write made so far on this connection to that node (`u64::MAX` when none was asked for).
    pub(crate) async fn invoke_replicated<T: FromRedisValue>(
        &self,
        conn: &mut RedisConnection,
        replication: Replication,
    ) -> RedisResult<(T, u64)> {
        let Replication { replicas, timeout } = replication;
        if replicas == 0 {
            return Ok((self.invoke(conn).await?, u64::MAX));
        }
        // At most `FAR` (Redis reads the timeout as a signed 64-bit count and refuses more).
        let wait_ms = crate::capped_ms(timeout).max(1);
        let pipe = |by_hash: bool| {
            let mut p = redis::pipe();
            p.add_command(self.cmd(by_hash))
                .cmd("WAIT")
                .arg(replicas)
                .arg(wait_ms);
            p
        };
        match pipe(true).query_async(conn).await {
            Err(e) if e.to_string().to_ascii_lowercase().contains("noscript") => {
                pipe(false).query_async(conn).await
            }
            other => other,
        }
    }
}

/// How many replicas must confirm a write before it counts as stored, and how long to wait
/// for them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Replication {
    pub(crate) replicas: u32,
    pub(crate) timeout: Duration,
}

impl Replication {
    pub(crate) const NONE: Self = Self {
        replicas: 0,
        timeout: Duration::ZERO,
    };

    /// What the replication wait adds to an operation's bound: nothing when no replica is
    /// asked for (no `WAIT` is sent), at most `FAR` otherwise (as `WAIT` is sent).
    pub(crate) fn wait(self) -> Duration {
        if self.replicas == 0 {
            Duration::ZERO
        } else {
            self.timeout.min(sturdy_core::clock::FAR)
        }
    }

    /// An error when fewer replicas than asked confirmed a write.
    pub(crate) fn check(self, what: &str, acked: u64) -> Result<(), BoxError> {
        if acked >= u64::from(self.replicas) {
            return Ok(());
        }
        // Kept by the primary, maybe lost by a failover: as a broken connection after a write.
        Err(Box::new(Error::new(
            ErrorKind::Transport,
            format!(
                "{what}: the write reached the Redis primary, but only {acked} of the {} replicas asked for confirmed it within {}, so a failover could lose it; try again",
                self.replicas,
                sturdy_core::human_duration(self.timeout)
            ),
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_redis_cluster() {
        // Values from CLUSTER KEYSLOT on Redis 7.
        assert_eq!(crc16(b"123456789"), 0x31c3);
        assert_eq!(hash_slot(b"foo"), 12182);
        assert_eq!(hash_slot(b"bar"), 5061);
        assert_eq!(hash_slot(b"{user1000}.following"), hash_slot(b"user1000"));
        assert_eq!(hash_slot(b"foo{}{bar}"), hash_slot(b"foo{}{bar}"));
        assert_ne!(hash_slot(b"foo{}{bar}"), hash_slot(b"bar"));
        assert_eq!(hash_slot(b"foo{{bar}}zap"), hash_slot(b"{bar"));
        assert_eq!(hash_slot(b"foo{bar}{zap}"), hash_slot(b"bar"));
        assert_eq!(hash_tag(b"a{}b"), None);
        assert_eq!(hash_tag(b"a{b"), None);
        assert_eq!(hash_tag(b"a{b}c"), Some(&b"b"[..]));
    }
}
