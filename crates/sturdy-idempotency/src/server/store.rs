use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use sturdy_core::BoxError;

/// A boxed, sendable future.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// What identifies a request's content: SHA-256 over the method, the path and query, and the body.
pub type Fingerprint = [u8; 32];

/// A response as stored for replay. Its `Debug` shows the status, the header names and the
/// body's length, never a header value or the body (a stored `Set-Cookie` or a token in the
/// body stays out of logs).
#[derive(Clone, PartialEq, Eq)]
pub struct StoredResponse {
    /// The status code.
    pub status: u16,
    /// The headers, in order (connection-specific ones are not stored).
    pub headers: Vec<(String, Vec<u8>)>,
    /// The body.
    pub body: Bytes,
}

impl std::fmt::Debug for StoredResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Values and body are the application's (cookies, tokens): names and sizes only.
        struct Names<'a>(&'a [(String, Vec<u8>)]);
        impl std::fmt::Debug for Names<'_> {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_list()
                    .entries(self.0.iter().map(|(n, _)| n))
                    .finish()
            }
        }
        f.debug_struct("StoredResponse")
            .field("status", &self.status)
            .field("headers", &Names(&self.headers))
            .field("body_len", &self.body.len())
            .finish()
    }
}

impl StoredResponse {
    /// Serializes to JSON. Header values and the body are written as strings whose characters are
    /// the bytes (code points 0 to 255), which is lossless for any bytes.
    pub fn to_json(&self) -> Vec<u8> {
        let headers: Vec<serde_json::Value> = self
            .headers
            .iter()
            .map(|(k, v)| serde_json::json!([k, latin1(v)]))
            .collect();
        serde_json::to_vec(&serde_json::json!({
            "status": self.status,
            "headers": headers,
            "body": latin1(&self.body),
        }))
        .unwrap_or_default()
    }

    /// Reads what [`to_json`](Self::to_json) wrote.
    pub fn from_json(bytes: &[u8]) -> Option<Self> {
        let v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
        // A status no response can have (a store's entry damaged or written by something
        // else) is not a stored response: replayed, it would read as 200.
        let status = u16::try_from(v.get("status")?.as_u64()?)
            .ok()
            .filter(|s| (100..=999).contains(s))?;
        let headers = v
            .get("headers")?
            .as_array()?
            .iter()
            .map(|h| {
                Some((
                    h.get(0)?.as_str()?.to_owned(),
                    from_latin1(h.get(1)?.as_str()?)?,
                ))
            })
            .collect::<Option<Vec<_>>>()?;
        let body = Bytes::from(from_latin1(v.get("body")?.as_str()?)?);
        Some(Self {
            status,
            headers,
            body,
        })
    }

    /// Bytes held on the heap by this response.
    pub fn heap_bytes(&self) -> usize {
        self.body.len()
            + self.headers.capacity() * std::mem::size_of::<(String, Vec<u8>)>()
            + self
                .headers
                .iter()
                .map(|(k, v)| k.capacity() + v.capacity())
                .sum::<usize>()
    }
}

/// Each byte as the char with that code point: lossless and valid JSON.
fn latin1(b: &[u8]) -> String {
    b.iter().map(|&c| char::from(c)).collect()
}

fn from_latin1(s: &str) -> Option<Vec<u8>> {
    s.chars().map(|c| u8::try_from(u32::from(c)).ok()).collect()
}

/// What [`IdempotencyStore::begin`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Begin {
    /// No live entry: the key is now locked for this request, for the lease.
    Started,
    /// A request with this key and fingerprint is still running.
    InFlight,
    /// A request with this key and fingerprint completed; here is its response.
    Completed(StoredResponse),
    /// The key was used with another fingerprint (another payload, method, path or query).
    Mismatch,
}

/// Which execution holds a lock: drawn at random by the layer for each
/// [`IdempotencyStore::begin`] it sends, and given back with that execution's `renew`,
/// `complete` and `release`.
///
/// A retry of a request has the request's fingerprint, so the fingerprint alone cannot tell the
/// execution that lost its lock (its lease ran out: the store was unreachable, the process
/// stalled) from the retry that took the key over. The token can: a late call from the first
/// changes nothing, whatever its fingerprint.
///
/// ```
/// use sturdy_idempotency::server::LockToken;
///
/// let token = LockToken::random();
/// assert_ne!(token, LockToken::random());
/// assert_eq!(LockToken::from_u128(token.as_u128()), token);
/// assert_eq!(token.to_string().len(), 32);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LockToken(u128);

impl LockToken {
    /// A new token: 122 random bits (a UUID v4), so two executions never share one.
    #[must_use]
    pub fn random() -> Self {
        Self(uuid::Uuid::new_v4().as_u128())
    }

    /// The token with this value (a store reading back what it kept).
    #[must_use]
    pub const fn from_u128(value: u128) -> Self {
        Self(value)
    }

    /// The token's value.
    #[must_use]
    pub const fn as_u128(self) -> u128 {
        self.0
    }
}

/// 32 lowercase hex digits.
impl fmt::Display for LockToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

/// Where keys, locks and stored responses live.
///
/// The contract, which [`conformance::run`](super::conformance::run) checks:
///
/// - `begin` is atomic: of many concurrent `begin`s for one key, exactly one gets
///   [`Begin::Started`], across every handle to the same storage.
/// - A lock lives for its lease unless it is renewed, completed or released; a completed
///   response lives for its TTL. Expired entries are gone: `begin` treats their key as free.
/// - `complete`, `release` and `renew` act only for the [`LockToken`] that took the lock, so a
///   late call from an execution that lost its lock (its lease ran out and a retry of the same
///   request took the key over) changes nothing. `complete` and `renew` also act when the key
///   is free (the lock's lease ran out and nobody took the key over): the execution is still
///   the only one, and its outcome is worth keeping.
pub trait IdempotencyStore: Send + Sync + fmt::Debug + 'static {
    /// Looks the key up and, if it is free, locks it for `lease`, for the execution `token`
    /// names. An entry with another fingerprint is a [`Begin::Mismatch`], whatever its token.
    fn begin(
        &self,
        key: &str,
        fingerprint: Fingerprint,
        token: LockToken,
        lease: Duration,
    ) -> BoxFuture<Result<Begin, BoxError>>;

    /// Extends the lock `token` took to `lease` from now (the layer calls it while a handler
    /// runs), or locks the key again for `token` and `fingerprint` if it is free. Returns
    /// `false` when another execution holds the key or it completed.
    fn renew(
        &self,
        key: &str,
        fingerprint: Fingerprint,
        token: LockToken,
        lease: Duration,
    ) -> BoxFuture<Result<bool, BoxError>>;

    /// Stores the response of the execution `token` names, for `ttl`, if it holds the lock or
    /// the key is free.
    fn complete(
        &self,
        key: &str,
        fingerprint: Fingerprint,
        token: LockToken,
        response: StoredResponse,
        ttl: Duration,
    ) -> BoxFuture<Result<(), BoxError>>;

    /// Drops the lock `token` took, without storing anything (a 5xx, a failed handler), so a
    /// retry can run.
    fn release(&self, key: &str, token: LockToken) -> BoxFuture<Result<(), BoxError>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trip_keeps_every_byte() {
        let r = StoredResponse {
            status: 201,
            headers: vec![
                ("content-type".into(), b"application/json".to_vec()),
                ("x-bin".into(), vec![0, 255, 128]),
            ],
            body: Bytes::from_static(&[0, 1, 2, 200, 255, b'"', b'\\']),
        };
        assert_eq!(StoredResponse::from_json(&r.to_json()), Some(r));
        assert_eq!(StoredResponse::from_json(b"garbage"), None);
        for status in [0, 99, 1000, 65535] {
            let damaged = format!(r#"{{"status":{status},"headers":[],"body":""}}"#);
            assert_eq!(
                StoredResponse::from_json(damaged.as_bytes()),
                None,
                "{status}"
            );
        }
    }

    #[test]
    fn debug_shows_names_and_sizes_never_values_or_the_body() {
        let r = StoredResponse {
            status: 200,
            headers: vec![("set-cookie".into(), b"session=s3cr3t-cookie".to_vec())],
            body: Bytes::from_static(b"{\"token\":\"t0k3n-value\"}"),
        };
        let shown = format!("{r:?}");
        assert!(
            shown.contains("set-cookie") && shown.contains("200"),
            "{shown}"
        );
        assert!(shown.contains("body_len: 23"), "{shown}");
        assert!(
            !shown.contains("s3cr3t") && !shown.contains("t0k3n"),
            "{shown}"
        );
    }
}
